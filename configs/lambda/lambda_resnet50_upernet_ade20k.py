# LambdaResNet-50 (Bello 2021, arXiv 2102.08602; vilseg.models.backbones.lambda_resnet) + UperNet on ADE20K.
# mmseg's ResNet-50 (V1c deep stem) with the 3x3 convolution of every bottleneck in c4 and c5 replaced by a lambda
# layer (|k| = 16, |h| = 4, |u| = 1, local positional lambdas over 23 x 23 windows), strides 4, 8, 16, 32, channels
# 256 ... 2048. Head and optimizer are mmseg's ResNet-50 UperNet recipe (configs/_base_/models/upernet_r50.py,
# SGD lr 0.01, momentum 0.9, wd 5e-4, poly decay); data pipeline, crops, batch 16, 160k iterations and the
# sliding-window test as configs/vil_upernet_ade20k.py.
#
#   python tools/train.py configs/lambda/lambda_resnet50_upernet_ade20k.py
_base_ = '../vil_upernet_ade20k.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)   # tools/train.py turns it into BN on CPU
max_iters = 160000
model = dict(
    backbone=dict(
        _delete_=True,
        type='LambdaResNet',
        depth=50,
        lambda_stages=(False, False, True, True),
        lambda_cfg=dict(dim_k=16, heads=4, dim_u=1, r=23),
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 1, 1),
        strides=(1, 2, 2, 2),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True,
        init_cfg=None),
    neck=None,                     # hierarchical backbone: no Feature2Pyramid
    decode_head=dict(in_channels=[256, 512, 1024, 2048], channels=512, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=1024, in_index=2, channels=256, norm_cfg=norm_cfg))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
