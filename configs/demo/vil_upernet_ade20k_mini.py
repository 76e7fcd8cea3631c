# The CPU demo: configs/vil_upernet_ade20k.py shrunk to what a 2-core CPU trains in a few minutes, on the
# synthetic mini ADE20K set (tools/make_mini_ade.py -> data/mini_ade/ADEChallengeData2016, 150-class label space,
# reduce_zero_label). Changed here, and only here:
# - data root, crop (128) and resize scale, batch 4 (>= 2: the PPM's BatchNorm sees 1x1 maps), BN for SyncBN;
# - ViL depth / width (8 sub-blocks x 128) and head width (64);
# - patch 8 with Feature2Pyramid rescales (2, 1, 0.5, 0.25): a 128 crop cut in 16-pixel patches is an 8x8 grid, too
#   coarse for persons and cars; patch 8 gives 16x16 tokens and keeps the pyramid at strides 4, 8, 16, 32 as in the
#   real config;
# - 400 iterations, 30 warm-up; lr 3e-3 and layer decay 0.9 (the backbone starts from random weights here: the
#   paper's 5e-4 / 0.65 fine-tune ImageNet weights and would leave this one under-trained in 400 steps);
# - logging / checkpoint intervals; evaluation once, at the end.
# Everything else (ViL blocks, Feature2Pyramid + UperNet + auxiliary FCN head, AdamW with weight decay 0.05, warm-up +
# cosine, sliding-window test, mmseg's pipeline, the 150-class label space) is the real config's.
# Its run time and mIoU (against a constant prediction) are measured in the README's "What `make demo` produces".
_base_ = '../vil_upernet_ade20k.py'

crop_size = (128, 128)
embed_dims = 128
head_channels = 64
num_blocks = 8
max_iters = 400
warmup_iters = 30
lr = 3e-3
norm_cfg = dict(type='BN', requires_grad=True)   # one process on CPU

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=embed_dims, num_blocks=num_blocks),
        img_size=crop_size,
        patch_size=8,
        out_indices=(1, 3, 5, 7)),
    neck=dict(embed_dim=embed_dims, rescales=[2, 1, 0.5, 0.25], norm_cfg=norm_cfg),
    decode_head=dict(in_channels=[embed_dims] * 4, channels=head_channels, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=embed_dims, channels=head_channels, norm_cfg=norm_cfg),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(85, 85)))

# relative to this file, so that the tools work from any working directory
data_root = '{{ fileDirname }}/../../data/mini_ade/ADEChallengeData2016'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(data_root=data_root, check_files='full', pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1,
    persistent_workers=True,
    dataset=dict(data_root=data_root, check_files='full', pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=lr), paramwise_cfg=dict(decay_rate=0.9))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-6 / lr, by_epoch=False, begin=warmup_iters, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2))
randomness = dict(seed=0)
