# Baseline: MONAI's UNETR (ViT encoder, patch 16 fixed by MONAI) with the same pipeline and budget as
# vil_unetr_mni152.py. UNETR needs img_size = the training crop; sliding-window inference keeps that size.
_base_ = ['./_base_/mni152.py']

model = dict(
    type='UNETR',
    in_channels=1,
    out_channels={{_base_.num_classes}},
    img_size={{_base_.roi_size}},
    feature_size=16,
    hidden_size=96,
    mlp_dim=384,
    num_heads=4,
    norm_name='instance',
    res_block=True,
)
work_dir = 'work_dirs/unetr_mni152'
