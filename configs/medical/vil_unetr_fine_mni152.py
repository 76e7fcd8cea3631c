# ViL-UNETR on 4^3 patches: 1,728 tokens per 48^3 window (8x the 8^3-patch model's 216), so training and
# sliding-window inference run the linear chunkwise mLSTM kernel. Two hidden states: the bottleneck at 1/4 and
# one skip at 1/2 (plus the full-resolution input block), the UNETR wiring for a 4^3 patch.
#   python tools/train_medical.py configs/medical/vil_unetr_fine_mni152.py
_base_ = ['./vil_unetr_mni152.py']

model = dict(patch_size=4)
work_dir = 'work_dirs/vil_unetr_fine_mni152'
