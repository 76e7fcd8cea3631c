# ViL-T + UperNet as configs/vil_upernet_ade20k.py, with the layer recompute off: every mLSTM layer keeps its
# activations for backward instead of recomputing the part between its projections. A faster training step where
# memory allows; at the 512² crop the process then holds more than DeiT-T + UperNet's (README, speed section).
_base_ = './vil_upernet_ade20k.py'

model = dict(backbone=dict(layer_recompute=False))
