# ViL-T + UperNet as configs/vil_upernet_ade20k.py, with training tiles as large as the inference ones: the
# recomputing mLSTM layers run in tiles of about 1,024 tokens instead of 512 (untiled at the 512² crop). A little
# faster per step; the process then holds more memory above its live tensors (README, speed section).
_base_ = './vil_upernet_ade20k.py'

model = dict(backbone=dict(training_tile_tokens=1024))
