# Baseline: DeiT-T + UperNet with attention through torch's scaled_dot_product_attention (O(S) memory; mmseg's
# VisionTransformer asks torch for the attention weights and so materialises the S x S matrix). Same weights,
# parameter names and results as configs/baselines/deit_t_upernet_ade20k.py; only the attention kernel differs.
_base_ = './deit_t_upernet_ade20k.py'

model = dict(backbone=dict(type='VisionTransformerSDPA'))
