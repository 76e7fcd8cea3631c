# ViL-UNETR (Vision-LSTM encoder, MONAI UNETR decoder blocks) on the MNI152 gray/white-matter case.
#   python tools/train_medical.py configs/medical/vil_unetr_mni152.py [--work-dir DIR] [--resume]
_base_ = ['./_base_/mni152.py']

model = dict(
    type='ViLUNETR',
    in_channels=1,
    out_channels={{_base_.num_classes}},
    img_size={{_base_.roi_size}},
    patch_size=8,            # 8^3 patches: 216 tokens per 48^3 crop
    embed_dims=96,
    num_blocks=6,            # sub-blocks (3 pairs of reading directions)
    feature_size=16,
    kernel='auto',
    scan_order='fixed',
)
work_dir = 'work_dirs/vil_unetr_mni152'
