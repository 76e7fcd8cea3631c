# The candidates of benchmarks/ranking_vs_training.py: small ViL depth / width variants, a ViT, a Swin, a
# Sequencer2D and a LambdaResNet for 128x128 crops of the mini ADE20K set. Each entry is what the benchmark puts into
# configs/demo/vil_upernet_ade20k_mini.py's model: `backbone` and `neck` replace the mini config's, `decode_head`
# and `auxiliary_head` are merged into its heads (UperNet + auxiliary FCN head, 64 channels, BN). Columnar
# backbones (ViL, ViT) go through mmseg's Feature2Pyramid (x4, x2, x1, x0.5), hierarchical ones have no neck.
crop = 128
head_channels = 64
norm_cfg = dict(type='BN', requires_grad=True)


def _vil(dims, blocks):
    return dict(
        backbone=dict(type='ViL', arch=dict(embed_dims=dims, num_blocks=blocks), img_size=(crop, crop),
                      patch_size=8, out_indices=tuple(blocks // 4 * (i + 1) - 1 for i in range(4)),
                      drop_path_rate=0.0, kernel='auto'),
        neck=dict(type='Feature2Pyramid', embed_dim=dims, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
        decode_head=dict(in_channels=[dims] * 4, channels=head_channels, norm_cfg=norm_cfg),
        auxiliary_head=dict(in_channels=dims, in_index=2, channels=head_channels, norm_cfg=norm_cfg))


def _hierarchical(backbone, channels):
    return dict(
        backbone=backbone,
        neck=None,
        decode_head=dict(in_channels=channels, channels=head_channels, norm_cfg=norm_cfg),
        auxiliary_head=dict(in_channels=channels[2], in_index=2, channels=head_channels, norm_cfg=norm_cfg))


candidates = {
    'vil-64x4': _vil(64, 4),
    'vil-64x8': _vil(64, 8),
    'vil-128x4': _vil(128, 4),
    'vil-128x8': _vil(128, 8),
    'vit-128x4': dict(
        backbone=dict(type='VisionTransformer', img_size=(crop, crop), patch_size=8, embed_dims=128, num_layers=4,
                      num_heads=4, mlp_ratio=4, out_indices=(0, 1, 2, 3), qkv_bias=True, drop_path_rate=0.0,
                      with_cls_token=True, norm_cfg=dict(type='LN', eps=1e-6), act_cfg=dict(type='GELU'),
                      interpolate_mode='bicubic'),
        neck=dict(type='Feature2Pyramid', embed_dim=128, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
        decode_head=dict(in_channels=[128] * 4, channels=head_channels, norm_cfg=norm_cfg),
        auxiliary_head=dict(in_channels=128, in_index=2, channels=head_channels, norm_cfg=norm_cfg)),
    'swin-mini': _hierarchical(
        dict(type='SwinTransformer', pretrain_img_size=crop, embed_dims=32, patch_size=4, window_size=4, mlp_ratio=4,
             depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], strides=(4, 2, 2, 2), out_indices=(0, 1, 2, 3),
             qkv_bias=True, drop_path_rate=0.0, use_abs_pos_embed=False, act_cfg=dict(type='GELU'),
             norm_cfg=dict(type='LN')),
        [32, 64, 128, 256]),
    'seq-mini': _hierarchical(
        dict(type='Sequencer2D', arch=dict(depths=[1, 1, 2, 1], embed_dims=[64, 128, 128, 128]),
             out_indices=(0, 1, 2, 3)),
        [64, 128, 128, 128]),
    'lambda-r50-w16': _hierarchical(
        dict(type='LambdaResNet', depth=50, stem_channels=16, base_channels=16, out_indices=(0, 1, 2, 3),
             norm_cfg=norm_cfg),
        [64, 128, 256, 512]),
}
