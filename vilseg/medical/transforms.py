"""MONAI transform pipelines for 3D segmentation (training, validation, inference).

All pipelines work on dictionaries with keys ``image`` (and ``label``), read NIfTI through ``LoadImaged`` and bring
every volume to a canonical grid: channel first, orientation ``axcodes`` (RAS by default), voxel size ``pixdim``.
The intensity transform is configurable (one of ``vilseg.medical.registry.INTENSITY_TRANSFORMS`` given as ``dict(type=name, **kwargs)``),
e.g. percentiles for MRI or a fixed HU window for CT::

    dict(type='ScaleIntensityRangePercentilesd', lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)   # MRI
    dict(type='ScaleIntensityRanged', a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True)              # CT
"""
from __future__ import annotations

from typing import Optional, Sequence

import monai.transforms as mt

from vilseg.medical.registry import intensity_transform

__all__ = ["DEFAULT_INTENSITY", "build_intensity", "build_train_transforms", "build_val_transforms",
           "build_infer_transforms"]

# axis labels of NIfTI world space (nibabel affines map voxels to RAS+ mm), passed explicitly to Orientationd
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
DEFAULT_INTENSITY = dict(type="ScaleIntensityRangePercentilesd", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                         clip=True)


def build_intensity(cfg: Optional[dict], keys: Sequence[str] = ("image",)) -> mt.MapTransform:
    """A MONAI dictionary intensity transform from ``dict(type=<name in INTENSITY_TRANSFORMS>, **kwargs)``."""
    return intensity_transform(DEFAULT_INTENSITY if cfg is None else cfg, keys)


def _spatial(keys: Sequence[str], pixdim: Optional[Sequence[float]], axcodes: Optional[str],
             modes: Sequence[str]) -> list:
    out = [mt.EnsureChannelFirstd(keys=list(keys))]
    if axcodes:
        out.append(mt.Orientationd(keys=list(keys), axcodes=axcodes, labels=RAS_LABELS))
    if pixdim is not None:
        out.append(mt.Spacingd(keys=list(keys), pixdim=tuple(float(p) for p in pixdim), mode=tuple(modes)))
    return out


def build_train_transforms(roi_size: Sequence[int], num_classes: int,
                           pixdim: Optional[Sequence[float]] = (1.0, 1.0, 1.0), axcodes: Optional[str] = "RAS",
                           intensity: Optional[dict] = None, num_samples: int = 2,
                           ratios: Optional[Sequence[float]] = None, flip_prob: float = 0.5,
                           flip_axes: Sequence[int] = (0, 1, 2), crop_foreground: bool = False) -> mt.Compose:
    """Training pipeline: load, canonical grid, intensity, pad to ``roi_size``, class-balanced random crops, flips.

    Each input dict yields ``num_samples`` crops {'image': (1, *roi_size) float32, 'label': (1, *roi_size)}; crop
    centres are drawn per class with ``ratios`` (default: equal for all ``num_classes`` classes).
    """
    keys = ("image", "label")
    roi_size = tuple(int(r) for r in roi_size)
    steps = [mt.LoadImaged(keys=list(keys), image_only=True)]
    steps += _spatial(keys, pixdim, axcodes, ("bilinear", "nearest"))
    steps.append(build_intensity(intensity))
    if crop_foreground:
        steps.append(mt.CropForegroundd(keys=list(keys), source_key="image", allow_smaller=True))
    steps += [
        mt.SpatialPadd(keys=list(keys), spatial_size=roi_size),
        mt.EnsureTyped(keys=list(keys), track_meta=False),
        mt.RandCropByLabelClassesd(keys=list(keys), label_key="label", spatial_size=roi_size,
                                   num_classes=int(num_classes), ratios=None if ratios is None else list(ratios),
                                   num_samples=int(num_samples), image_key="image", warn=False),
    ]
    steps += [mt.RandFlipd(keys=list(keys), prob=float(flip_prob), spatial_axis=int(a)) for a in flip_axes]
    return mt.Compose(steps)


def build_val_transforms(pixdim: Optional[Sequence[float]] = (1.0, 1.0, 1.0), axcodes: Optional[str] = "RAS",
                         intensity: Optional[dict] = None, with_label: bool = True) -> mt.Compose:
    """Validation pipeline (whole volumes): load, canonical grid, intensity. image (1, X, Y, Z), label likewise."""
    keys = ("image", "label") if with_label else ("image",)
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps = [mt.LoadImaged(keys=list(keys), image_only=True)]
    steps += _spatial(keys, pixdim, axcodes, modes)
    steps.append(build_intensity(intensity))
    return mt.Compose(steps)


def build_infer_transforms(pixdim: Optional[Sequence[float]] = (1.0, 1.0, 1.0),
                           axcodes: Optional[str] = "RAS", intensity: Optional[dict] = None) -> mt.Compose:
    """Inference pipeline for one image that is already loaded as a MetaTensor (1, X, Y, Z) with its affine.

    Only invertible spatial steps (orientation, spacing) and the intensity scaling: ``monai.transforms.Invertd``
    with this Compose maps a prediction back onto the input's own grid.
    """
    steps = []
    if axcodes:
        steps.append(mt.Orientationd(keys=["image"], axcodes=axcodes, labels=RAS_LABELS))
    if pixdim is not None:
        steps.append(mt.Spacingd(keys=["image"], pixdim=tuple(float(p) for p in pixdim), mode="bilinear"))
    steps.append(build_intensity(intensity))
    return mt.Compose(steps)
