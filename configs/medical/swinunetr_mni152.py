# Baseline: MONAI's SwinUNETR with the same pipeline and budget as vil_unetr_mni152.py.
# MONAI >= 1.5 takes no img_size; inputs must be divisible by 32, so the crop is 64^3 here (the 48^3 of the base
# config is not); sliding-window inference uses the same 64^3 windows.
_base_ = ['./_base_/mni152.py']

roi_size = (64, 64, 64)
data = dict(roi_size=roi_size)
val = dict(roi_size=roi_size)
model = dict(
    type='SwinUNETR',
    in_channels=1,
    out_channels={{_base_.num_classes}},
    feature_size=12,
    use_checkpoint=False,
)
work_dir = 'work_dirs/swinunetr_mni152'
