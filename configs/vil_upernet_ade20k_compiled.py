# ViL-T + UperNet as configs/vil_upernet_ade20k.py, with each mLSTM layer's inner part (grid conv, q/k/v, gates,
# kernel, norm, gating) run through torch.compile: one compiled graph shared by all 24 layers, compiled again for
# every new input shape (training crop, evaluation windows). Worth it for long trainings at a fixed crop; the compile
# time and the measured step times are in the README (benchmarks/results/vil_speed.md).
_base_ = './vil_upernet_ade20k.py'

model = dict(backbone=dict(compile_layers=True))
