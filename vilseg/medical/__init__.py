"""3D medical segmentation with MONAI: transform pipelines, MSD data lists, a training loop driven by mmengine
configs, sliding-window NIfTI inference in the input's own grid, and the CPU demo.

Submodules are imported lazily by their users (``vilseg.medical.train``, ``.inference``, ``.demo``) so that
``import vilseg.medical`` stays cheap.
"""
__all__ = ["transforms", "data", "checkpoint", "train", "inference", "demo"]
