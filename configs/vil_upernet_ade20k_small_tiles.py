# ViL-T + UperNet as configs/vil_upernet_ade20k.py, with the recomputing mLSTM layers in training tiles of 512 tokens
# at every size instead of 1,024 from a 724² crop on (the same two halves at 512²). Slower at large crops, holding a
# little less memory at 1024² (README, speed section); kept to measure that choice.
_base_ = './vil_upernet_ade20k.py'

model = dict(backbone=dict(training_tile_tokens=512))
