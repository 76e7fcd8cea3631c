# ViL-S + UperNet on ADE20K (paper: 46.3 mIoU single-scale). Differs from ViL-T in width, drop path and head width.
_base_ = './vil_upernet_ade20k.py'

embed_dims = 384
head_channels = 384
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.05),
    neck=dict(embed_dim=embed_dims),
    decode_head=dict(in_channels=[embed_dims] * 4, channels=head_channels),
    auxiliary_head=dict(in_channels=embed_dims, channels=head_channels))
