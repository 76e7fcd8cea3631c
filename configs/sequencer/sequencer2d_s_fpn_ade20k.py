# Sequencer2D-S + Semantic FPN on ADE20K, the segmentation setting of the Sequencer paper (Tatsunami & Taki 2022,
# arXiv 2205.01972), which follows PoolFormer / PVT: mmseg's FPN neck (256 channels) + FPNHead, 512x512 crops,
# batch 32 in total, 40k iterations, AdamW lr 2e-4 with weight decay 1e-4, polynomial decay (power 0.9).
# Data pipeline, dataset checks and sliding-window test come from configs/vil_upernet_ade20k.py.
# The four stage outputs have strides 7, 14, 14, 14 (7x7 stem, then 2x2, 1x1, 1x1 embeddings); FPNHead upsamples
# the three stride-14 levels once (x2) and resizes them onto the stride-7 level.
#
#   bash tools/dist_train.sh configs/sequencer/sequencer2d_s_fpn_ade20k.py 8      # 8 GPUs x 4 images = 32
_base_ = '../vil_upernet_ade20k.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)   # tools/train.py turns it into BN on CPU
embed_dims = [192, 384, 384, 384]
max_iters = 40000
model = dict(
    backbone=dict(
        _delete_=True,
        type='Sequencer2D',
        arch='s',
        patch_sizes=(7, 2, 1, 1),
        hidden_ratio=0.25,
        mlp_ratio=3.0,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None),
    neck=dict(_delete_=True, type='FPN', in_channels=embed_dims, out_channels=256, num_outs=4),
    decode_head=dict(
        _delete_=True,
        type='FPNHead',
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[7, 14, 14, 14],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=None)

train_dataloader = dict(batch_size=4)   # per GPU: 8 GPUs x 4 = 32
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
    clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0.0, by_epoch=False, begin=0, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=4000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000))
