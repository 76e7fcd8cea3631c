"""vilseg: Vision-LSTM for high-resolution semantic and 3D medical segmentation."""
__version__ = "0.1.0"
