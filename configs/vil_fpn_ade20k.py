# ViL-T + Semantic FPN on ADE20K: the same backbone features (sub-blocks 7, 11, 15, 23), turned into a pyramid by
# mmseg's Feature2Pyramid (x4, x2, x1, x0.5), then mmseg's FPN neck and FPNHead (no auxiliary head; as
# ChunkedLossFPNHead, its loss computed in bands of rows), same data, optimizer and schedule as
# configs/vil_upernet_ade20k.py.
_base_ = './vil_upernet_ade20k.py'

embed_dims = 192   # ViL-T
norm_cfg = dict(type='SyncBN', requires_grad=True)   # tools/train.py turns it into BN on CPU

model = dict(
    # two mmseg necks in a row (mmengine builds a list of configs as a Sequential)
    neck=[
        dict(type='Feature2Pyramid', embed_dim=embed_dims, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
        dict(type='FPN', in_channels=[embed_dims] * 4, out_channels=256, num_outs=4),
    ],
    decode_head=dict(
        _delete_=True,
        type='ChunkedLossFPNHead',   # mmseg's FPNHead, loss computed in bands of rows
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=None)
