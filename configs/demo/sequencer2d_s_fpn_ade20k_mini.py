# CPU demo of configs/sequencer/sequencer2d_s_fpn_ade20k.py (Semantic FPN, the Sequencer paper's setting) on the
# synthetic mini ADE20K set; data, crops, schedule, BN and hooks from configs/demo/vil_upernet_ade20k_mini.py.
#   python tools/train.py configs/demo/sequencer2d_s_fpn_ade20k_mini.py
_base_ = './vil_upernet_ade20k_mini.py'

norm_cfg = dict(type='BN', requires_grad=True)   # one process on CPU
embed_dims = [192, 384, 384, 384]
model = dict(
    backbone=dict(
        _delete_=True,
        type='Sequencer2D',
        arch='s',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None),
    neck=dict(_delete_=True, type='FPN', in_channels=embed_dims, out_channels=128, num_outs=4),
    decode_head=dict(
        _delete_=True,
        type='FPNHead',
        in_channels=[128, 128, 128, 128],
        in_index=[0, 1, 2, 3],
        feature_strides=[7, 14, 14, 14],
        channels=64,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=None)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, weight_decay=1e-4))
