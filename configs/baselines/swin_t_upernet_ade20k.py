# Baseline: Swin-T (mmseg's SwinTransformer) + UperNet on ADE20K, with vilseg's data pipeline, crops, batch 16,
# 160k iterations, 1500 warm-up iterations + cosine schedule and sliding-window test (configs/vil_upernet_ade20k.py).
# Swin is hierarchical (strides 4..32): no Feature2Pyramid neck; head widths and the optimizer values (AdamW 6e-5,
# wd 0.01, no decay on norms and position tables, no layer decay) are Swin's own published UperNet recipe.
_base_ = '../vil_upernet_ade20k.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        pretrain_img_size=224,
        embed_dims=96,
        patch_size=4,
        window_size=7,
        mlp_ratio=4,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        strides=(4, 2, 2, 2),
        out_indices=(0, 1, 2, 3),
        qkv_bias=True,
        qk_scale=None,
        patch_norm=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.3,
        use_abs_pos_embed=False,
        act_cfg=dict(type='GELU'),
        norm_cfg=dict(type='LN', requires_grad=True),
        init_cfg=None),
    neck=None,
    decode_head=dict(in_channels=[96, 192, 384, 768], channels=512),
    auxiliary_head=dict(in_channels=384, channels=256))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'absolute_pos_embed': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    }))
