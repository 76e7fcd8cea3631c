# CPU demo of configs/sequencer/sequencer2d_s_upernet_ade20k.py on the synthetic mini ADE20K set: data, 128x128
# crops, batch 4, 300 iterations with warm-up + cosine, BN and hooks come from configs/demo/vil_upernet_ade20k_mini.py;
# the backbone is the real Sequencer2D-S, the UperNet head is narrowed to 128 channels as in the ViL demo.
#   python tools/train.py configs/demo/sequencer2d_s_upernet_ade20k_mini.py
_base_ = './vil_upernet_ade20k_mini.py'

norm_cfg = dict(type='BN', requires_grad=True)   # one process on CPU
embed_dims = [192, 384, 384, 384]
head_channels = 128
model = dict(
    backbone=dict(
        _delete_=True,
        type='Sequencer2D',
        arch='s',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None),
    neck=None,
    decode_head=dict(in_channels=embed_dims, channels=head_channels, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=embed_dims[2], in_index=2, channels=head_channels, norm_cfg=norm_cfg))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
