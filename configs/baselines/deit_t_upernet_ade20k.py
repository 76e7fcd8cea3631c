# Baseline: DeiT-T (mmseg's VisionTransformer, 192 dims, 12 layers, 3 heads) + UperNet on ADE20K, like for like
# with configs/vil_upernet_ade20k.py: same pipeline, crops, batch, iterations, optimizer (AdamW 5e-4, wd 0.05,
# layer-wise lr decay 0.65 over the 12 layers), warm-up + cosine schedule and sliding-window test.
# Features from layers 3, 5, 7, 11 (the same depths as ViL's sub-blocks 7, 11, 15, 23) through Feature2Pyramid.
# Paper reference (ViL paper, same protocol): DeiT-T 38.1 mIoU.
_base_ = '../vil_upernet_ade20k.py'

embed_dims = 192
model = dict(
    backbone=dict(
        _delete_=True,
        type='VisionTransformer',
        img_size=(512, 512),
        patch_size=16,
        in_channels=3,
        embed_dims=embed_dims,
        num_layers=12,
        num_heads=3,
        mlp_ratio=4,
        out_indices=(3, 5, 7, 11),
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        with_cls_token=True,
        final_norm=False,
        norm_cfg=dict(type='LN', eps=1e-6),
        act_cfg=dict(type='GELU'),
        norm_eval=False,
        interpolate_mode='bicubic',
        init_cfg=None),
    neck=dict(embed_dim=embed_dims),
    decode_head=dict(in_channels=[embed_dims] * 4, channels=192),
    auxiliary_head=dict(in_channels=embed_dims, channels=192))
