# ViL-T + UperNet on ADE20K, in the setting of the ViL paper (Alkin et al. 2024, arXiv 2406.04303):
# features from sub-blocks 7, 11, 15, 23 of the 24 (no final norm) -> mmseg's Feature2Pyramid (x4, x2, x1, x0.5)
# -> UperNet (192 channels for T) + auxiliary FCN head (loss weight 0.4); 512x512 crops, 160k iterations,
# batch 16 in total (8 GPUs x 2), AdamW lr 5e-4, weight decay 0.05, layer-wise lr decay 0.65, 1500 linear
# warm-up iterations then cosine decay to 1e-6, sliding-window evaluation (crop 512, stride 341).
# Reference single-scale mIoU (paper, ImageNet-1K pre-trained backbones): ViL-T 41.2, ViL-S 46.3, ViL-B 48.6.
#
#   python tools/train.py configs/vil_upernet_ade20k.py                        # 1 process
#   bash tools/dist_train.sh configs/vil_upernet_ade20k.py 8                   # 8 GPUs x 2 images = 16
# Pre-trained backbone: --cfg-options model.backbone.init_cfg.type=Pretrained \
#                         model.backbone.init_cfg.checkpoint=pretrain/vil-tiny.pth   (no download at run time)
_base_ = [
    'mmseg::_base_/models/upernet_beit.py',       # Feature2Pyramid + UPerHead + FCNHead (as for BEiT)
    'mmseg::_base_/datasets/ade20k.py',           # ADE20K at data/ade/ADEChallengeData2016, mmseg's pipeline
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',   # IterBasedTrainLoop 160k, eval + checkpoint every 16k
    './_base_/vilseg_runtime.py',                 # vilseg imports, weights-only resume-safe checkpoints
]

crop_size = (512, 512)
embed_dims = 192          # ViL-T
head_channels = 192       # UperNet channels: 192 for T, 384 for S / B
norm_cfg = dict(type='SyncBN', requires_grad=True)   # tools/train.py turns it into BN on CPU
lr = 5e-4
min_lr = 1e-6
warmup_iters = 1500
max_iters = 160000

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='ViL',
        arch='tiny',
        img_size=crop_size,
        patch_size=16,
        in_channels=3,
        out_indices=(7, 11, 15, 23),
        final_norm=False,
        drop_path_rate=0.0,   # 0 / 0.05 / 0.1 for T / S / B
        kernel='auto',
        init_cfg=None),
    neck=dict(type='Feature2Pyramid', embed_dim=embed_dims, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    # mmseg's UPerHead / FCNHead with the same cross-entropy computed in bands of rows (vilseg.models.decode_heads):
    # the logits upsampled to the crop are never held whole (the saving: README, memory section)
    decode_head=dict(
        type='ChunkedLossUPerHead',
        in_channels=[embed_dims] * 4,
        channels=head_channels,
        num_classes=150,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        type='ChunkedLossFCNHead',
        in_channels=embed_dims,
        in_index=2,
        channels=head_channels,
        num_classes=150,
        norm_cfg=norm_cfg,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# mmseg's ADE20K dataset and pipelines; the dataset type adds file checks (a bad file -> one error naming it)
dataset_type = 'CheckedADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
# the official recipe's augmentation: bicubic random resize, crops with at most 75 % of one class, flips and
# torchvision-style colour jitter (vilseg.engine.ColorJitter) where mmseg's recipe has PhotoMetricDistortion
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True, interpolation='bicubic'),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='ColorJitter', brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,   # per GPU: 8 GPUs x 2 = 16
    dataset=dict(type=dataset_type, data_root=data_root, reduce_zero_label=True, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, dataset=dict(type=dataset_type, data_root=data_root, reduce_zero_label=True))
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)

# AdamW + layer-wise lr decay 0.65 over the 12 pairs of sub-blocks, as the official recipe groups them
# (vilseg.engine.layer_decay.ViLLayerDecayOptimizerConstructor); no weight decay for 1-D parameters, biases and the
# position embedding. Mixed precision on CUDA (mmengine's AmpOptimWrapper: bf16 where supported, else fp16 with
# dynamic loss scaling, which skips non-finite steps); float32 on CPU (vilseg.engine.AmpOnCudaOptimWrapper).
optim_wrapper = dict(
    _delete_=True,
    type='AmpOnCudaOptimWrapper',
    dtype='auto',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=lr, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='ViLLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.65, group_two_blocks=True))
# linear warm-up, then cosine to min_lr (as a ratio, so every layer-decayed group ends at its scale x 1e-6)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', eta_min_ratio=min_lr / lr, by_epoch=False, begin=warmup_iters,
         end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=16000)
