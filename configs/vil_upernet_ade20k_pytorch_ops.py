# ViL-T + UperNet as configs/vil_upernet_ade20k.py, with every ViL layer on PyTorch operators: the element-wise work
# around the mLSTM kernel (grid conv + SiLU, q/k/v, output norm + skip + gate) without vilseg's fused native CPU
# operators. Same results up to rounding; the reference the fused operators are measured against (README, speed
# section), and what runs wherever the extension is not built.
_base_ = './vil_upernet_ade20k.py'

model = dict(backbone=dict(fused_ops=False))
