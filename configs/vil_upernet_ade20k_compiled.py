# ViL-T + UperNet as configs/vil_upernet_ade20k.py, with each ViL sub-block (pre-norm, mLSTM layer, residual) run
# through torch.compile: one compiled function shared by all 24 sub-blocks, compiled again for every new input shape
# (training crop, evaluation windows); inside it the layers run untiled, their recompute a checkpoint within the
# compiled graph. Worth it for long trainings at a fixed crop; the compile time and the measured step times are in
# the README (benchmarks/results/speed_alternating.md, vil_speed_compiled.md).
_base_ = './vil_upernet_ade20k.py'

model = dict(backbone=dict(compile_layers=True))
