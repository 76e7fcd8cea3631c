# Shared pipeline, loss, optimisation budget and evaluation for the MNI152 gray/white-matter case
# (data/mni152, built by tools/make_mni152_case.py). Every network config in configs/medical/*_mni152.py inherits
# this file, so ViL-UNETR, UNETR and SwinUNETR see the same data, crops, loss, optimizer and iteration budget.
# Driven by tools/train_medical.py (a plain MONAI loop; see vilseg/medical/train.py). The loop has no defaults of
# its own: it reads every key below, and a config without one of them is refused with the key's name.
custom_imports = dict(imports=['vilseg.models.vil_unetr'], allow_failed_imports=False)

num_classes = 3
class_names = ['background', 'gray_matter', 'white_matter']
roi_size = (48, 48, 48)

data = dict(
    dataset_json='data/mni152/dataset.json',  # any MSD dataset.json works (e.g. Task09_Spleen)
    base_dir=None,                # default: the json's folder
    train_key='training',
    # MNI152: 'validation' is the held-out anterior half (there is no third part), so best.pth is selected on it;
    # unbiased numbers come from the final model (latest.pth), as the demo reports. Other MSD sets without a
    # 'validation' list hold out the last val_fraction of 'training'.
    val_key='validation',
    val_fraction=0.2,
    pixdim=(2.0, 2.0, 2.0),       # mm; the MNI case is stored at 2 mm, so this is a no-op for it
    axcodes='RAS',
    intensity=dict(type='ScaleIntensityRangePercentilesd', lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                   clip=True),
    roi_size=roi_size,
    num_samples=2,                # random crops per volume and step, centres balanced over the 3 classes
    ratios=None,
    flip_prob=0.5,
    flip_axes=(0, 1, 2),
    crop_foreground=False,
    batch_size=1,
    cache_rate=1.0,
    cache_num_workers=0,          # threads filling the cache (0: one per CPU)
    num_workers=0,
)

loss = dict(type='DiceCELoss', to_onehot_y=True, softmax=True)
optimizer = dict(type='AdamW', lr=2e-3, weight_decay=1e-5)
param_scheduler = dict(type='PolyLR', power=0.9, eta_min=0.0)   # per iteration over max_iters

train = dict(max_iters=400, val_interval=100, checkpoint_interval=100, seed=0, device='auto', amp=False,
             grad_clip=1.0)
val = dict(roi_size=roi_size, sw_batch_size=2, overlap=0.25, mode='gaussian')
