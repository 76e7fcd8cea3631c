# CPU demo of configs/lambda/lambda_resnet50_upernet_ade20k.py on the synthetic mini ADE20K set: data, 128x128 crops,
# batch 4, 300 iterations with warm-up + cosine, BN and hooks come from configs/demo/vil_upernet_ade20k_mini.py; the
# backbone is the real LambdaResNet-50 (lambda layers in c4 and c5), UperNet narrowed to 128 channels.
#   python tools/train.py configs/demo/lambda_resnet50_upernet_ade20k_mini.py
_base_ = './vil_upernet_ade20k_mini.py'

norm_cfg = dict(type='BN', requires_grad=True)   # one process on CPU
head_channels = 128
model = dict(
    backbone=dict(
        _delete_=True,
        type='LambdaResNet',
        depth=50,
        lambda_stages=(False, False, True, True),
        lambda_cfg=dict(dim_k=16, heads=4, dim_u=1, r=23),
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        init_cfg=None),
    neck=None,
    decode_head=dict(in_channels=[256, 512, 1024, 2048], channels=head_channels, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=1024, in_index=2, channels=head_channels, norm_cfg=norm_cfg))

# AdamW as in the other demos (SGD at lr 0.01 barely moves in 300 iterations from scratch)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, betas=(0.9, 0.999), weight_decay=0.01))
