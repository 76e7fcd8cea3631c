# Sequencer2D-S (Tatsunami & Taki 2022, arXiv 2205.01972; vilseg.models.backbones.sequencer) + UperNet on ADE20K.
# Attention-free baseline: BiLSTM2D token mixers, 4 stages of widths 192, 384, 384, 384 at strides 7, 14, 14, 14.
# The Sequencer paper reports Semantic FPN only (configs/sequencer/sequencer2d_s_fpn_ade20k.py); this UperNet config
# compares like for like with configs/baselines/swin_t_upernet_ade20k.py: vilseg's ADE20K pipeline, 512 crops,
# batch 16, 160k iterations, warm-up + cosine, sliding-window test (all from configs/vil_upernet_ade20k.py), UperNet
# 512 channels and Swin's published UperNet optimizer (AdamW 6e-5, wd 0.01, no decay on norms).
#
#   python tools/train.py configs/sequencer/sequencer2d_s_upernet_ade20k.py
# Pre-trained backbone (ImageNet): --cfg-options model.backbone.init_cfg.type=Pretrained \
#     model.backbone.init_cfg.checkpoint=pretrain/sequencer2d_s.pth
_base_ = '../vil_upernet_ade20k.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)   # tools/train.py turns it into BN on CPU
embed_dims = [192, 384, 384, 384]
model = dict(
    backbone=dict(
        _delete_=True,
        type='Sequencer2D',
        arch='s',                  # depths [4, 3, 8, 3]; 'm' / 'l' for Sequencer2D-M / -L
        patch_sizes=(7, 2, 1, 1),
        hidden_ratio=0.25,         # BiLSTM hidden size C/4 per direction
        mlp_ratio=3.0,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None),
    neck=None,                     # hierarchical backbone: no Feature2Pyramid
    decode_head=dict(in_channels=embed_dims, channels=512, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=embed_dims[2], in_index=2, channels=256, norm_cfg=norm_cfg))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
