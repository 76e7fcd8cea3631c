# Baseline: DeiT-S (mmseg's VisionTransformer, 384 dims, 12 layers, 6 heads, drop path 0.05 like ViL-S) + UperNet
# on ADE20K, like for like with configs/vil_s_upernet_ade20k.py. Paper reference (same protocol): DeiT-S 43.1 mIoU.
_base_ = './deit_t_upernet_ade20k.py'

embed_dims = 384
model = dict(
    backbone=dict(embed_dims=embed_dims, num_heads=6, drop_path_rate=0.05),
    neck=dict(embed_dim=embed_dims),
    decode_head=dict(in_channels=[embed_dims] * 4, channels=384),
    auxiliary_head=dict(in_channels=embed_dims, channels=384))
