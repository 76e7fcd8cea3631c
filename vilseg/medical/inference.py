"""Sliding-window segmentation of NIfTI volumes, written back in each input's own grid.

For every input file:

1. :func:`check_nifti` validates it (exists, not empty, a NIfTI-1/2 file, exactly 3-D with more than one voxel
   along each axis, finite voxels) and raises one ``ValueError``/``FileNotFoundError`` naming the file otherwise;
2. the volume becomes a MONAI ``MetaTensor`` carrying the file's affine and goes through the inference pipeline of
   the training config (``Orientationd`` -> ``Spacingd`` -> intensity scaling);
3. ``monai.inferers.sliding_window_inference`` (roi size, overlap, Gaussian blending, ``sw_batch_size``; windows on
   ``sw_device`` while the whole volume and the blended output stay on ``device``, e.g. CPU) gives class logits;
4. ``monai.transforms.Invertd`` undoes spacing and orientation on the softmax probabilities (trilinear), so the
   arg-max label map has exactly the input's shape;
5. the labels are saved with a copy of the input's NIfTI header (same qform/sform, so exactly the same affine),
   data type uint8.

``--label`` files are compared in that same input grid (per-class Dice, background excluded).
"""
from __future__ import annotations

import gzip
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
import torch
from torch import nn

__all__ = ["NiftiInputError", "check_nifti", "NiftiSegmenter", "dice_per_class", "collect_inputs",
           "output_path_for", "SegmentationResult", "segment_files"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class NiftiInputError(ValueError):
    """An input file is not a usable 3-D NIfTI volume (the message names the file and the problem)."""


def check_nifti(path: Union[str, Path]) -> Tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Load and validate one 3-D NIfTI volume.

    Returns (image, data) with data float32 of shape (X, Y, Z).
    Raises FileNotFoundError (missing), NiftiInputError (empty file, not NIfTI, not 3-D, a single slice, NaN/Inf).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if not path.is_file():
        raise NiftiInputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise NiftiInputError(f"{path}: empty file (0 bytes); expected a NIfTI volume (.nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, ... for non-NIfTI content
        raise NiftiInputError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiInputError(f"{path}: a {type(img).__name__} file, expected a NIfTI volume (.nii or .nii.gz)")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise NiftiInputError(f"{path}: a {len(shape)}-D image of shape {shape}; expected a 3-D volume")
    if len(shape) > 3:
        raise NiftiInputError(f"{path}: a {len(shape)}-D volume of shape {shape}; expected a 3-D volume "
                              f"(split series first, e.g. with nibabel.funcs.four_to_three)")
    if min(shape) < 2:
        axis = shape.index(min(shape))
        raise NiftiInputError(f"{path}: shape {shape} has {shape[axis]} voxel(s) along axis {axis}, i.e. a 2-D "
                              f"image; expected a 3-D volume")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise NiftiInputError(f"{path}: voxel data could not be read, the file looks truncated "
                              f"({type(err).__name__}: {err})") from None
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise NiftiInputError(f"{path}: {bad} of {data.size} voxels are NaN or Inf; expected finite intensities")
    return img, data


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> List[float]:
    """Dice of classes 1 .. num_classes-1 between two integer label maps of the same shape, by MONAI's
    ``DiceMetric``: NaN for a class the label does not contain, whatever the prediction (``ignore_empty``)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    p = one_hot(torch.as_tensor(pred.astype(np.int64))[None, None], num_classes)
    g = one_hot(torch.as_tensor(np.rint(label).astype(np.int64))[None, None], num_classes)
    return [float(v) for v in metric(p, g).reshape(-1)]


class NiftiSegmenter:
    """Segment 3-D NIfTI volumes with a network and the inference pipeline of its training config.

    Args:
        model: network mapping (B, C, *roi) -> logits (B, K, *roi) (ViLUNETR, MONAI UNETR/SwinUNETR, ...).
        num_classes: K.
        roi_size: sliding-window size (voxels, in the pipeline's grid).
        pixdim, axcodes, intensity: the training pipeline's spacing, orientation and intensity transform.
        sw_batch_size, overlap, mode: ``sliding_window_inference`` settings (mode 'gaussian' or 'constant').
        device: where the whole (resampled) volume and the blended output live ('cpu' keeps them in host memory).
        sw_device: where each window batch runs (default ``device``); the model is moved there.
        progress: show MONAI's per-window progress bar.
    """

    def __init__(self, model: nn.Module, num_classes: int, roi_size: Sequence[int],
                 pixdim: Optional[Sequence[float]] = (1.0, 1.0, 1.0), axcodes: Optional[str] = "RAS",
                 intensity: Optional[dict] = None, sw_batch_size: int = 1, overlap: float = 0.25,
                 mode: str = "gaussian", device: Union[str, torch.device] = "cpu",
                 sw_device: Optional[Union[str, torch.device]] = None, progress: bool = True) -> None:
        from vilseg.medical.transforms import build_infer_transforms

        if mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.device = torch.device(device)
        self.sw_device = torch.device(sw_device) if sw_device is not None else self.device
        self.model = model.to(self.sw_device).eval()
        self.num_classes = int(num_classes)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.sw_batch_size, self.overlap, self.mode, self.progress = int(sw_batch_size), float(overlap), mode, progress
        self.pre = build_infer_transforms(pixdim=pixdim, axcodes=axcodes, intensity=intensity)

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, Path], config: Optional[Union[str, Path, Any]] = None,
                        **overrides: Any) -> "NiftiSegmenter":
        """Build the network from ``config`` (a path or Config/dict; default: the config stored in the checkpoint)
        and load the checkpoint's weights (weights-only). ``overrides``: constructor arguments (roi_size,
        overlap, sw_batch_size, mode, device, sw_device, progress)."""
        from vilseg.medical.checkpoint import load_checkpoint
        from vilseg.medical.registry import build_network
        from vilseg.utils.checkpoint import check_fits

        ckpt = load_checkpoint(checkpoint)
        if config is None:
            cfg = dict(ckpt.get("meta", {}).get("config") or {})
            if not cfg:
                raise ValueError(f"checkpoint {checkpoint} stores no config; pass --config")
        elif isinstance(config, (str, Path)):
            from mmengine.config import Config

            cfg = Config.fromfile(str(config)).to_dict()
        else:
            cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        model = build_network(cfg["model"])
        state, _ = check_fits(model, ckpt, str(checkpoint), f"the configured {cfg['model'].get('type')} network")
        model.load_state_dict(state)
        data, val = dict(cfg.get("data") or {}), dict(cfg.get("val") or {})
        kwargs = dict(num_classes=int(cfg["num_classes"]), roi_size=val.get("roi_size", data.get("roi_size")),
                      pixdim=data.get("pixdim"), axcodes=data.get("axcodes", "RAS"),
                      intensity=data.get("intensity"), sw_batch_size=int(val.get("sw_batch_size", 1)),
                      overlap=float(val.get("overlap", 0.25)), mode=val.get("mode", "gaussian"))
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        seg = cls(model, **kwargs)
        seg.class_names = list(cfg.get("class_names") or ckpt.get("meta", {}).get("class_names") or
                               [f"class_{k}" for k in range(seg.num_classes)])
        return seg

    @torch.no_grad()
    def predict(self, img: nib.spatialimages.SpatialImage, data: np.ndarray) -> np.ndarray:
        """Label map (X, Y, Z) in the grid of ``img`` for its voxel array ``data`` (X, Y, Z)."""
        from monai.data import MetaTensor
        from monai.inferers import sliding_window_inference
        from monai.transforms import Invertd

        affine = torch.as_tensor(np.asarray(img.affine, dtype=np.float64))
        image = MetaTensor(torch.as_tensor(data, dtype=torch.float32)[None], affine=affine,
                           meta={"filename_or_obj": getattr(img, "get_filename", lambda: None)() or "",
                                 "original_affine": affine.clone(), "spatial_shape": np.asarray(data.shape)})
        d = self.pre({"image": image})
        x = d["image"].as_tensor()[None].to(self.device)
        logits = sliding_window_inference(x, self.roi_size, self.sw_batch_size, self.model, overlap=self.overlap,
                                          mode=self.mode, sw_device=self.sw_device, device=self.device,
                                          progress=self.progress)
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()
        d["pred"] = MetaTensor(probs, meta=dict(d["image"].meta))
        inv = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False)(d)
        labels = torch.as_tensor(inv["pred"]).argmax(0).numpy()
        if labels.shape != data.shape:  # Invertd restores the original spatial shape; guard against surprises
            raise RuntimeError(f"inverted prediction has shape {labels.shape}, input {data.shape}")
        return labels.astype(np.uint8 if self.num_classes <= 256 else np.int16)

    def save(self, labels: np.ndarray, like: nib.spatialimages.SpatialImage, out_path: Union[str, Path]) -> Path:
        """Write ``labels`` with a copy of ``like``'s header: same shape, qform, sform (hence affine)."""
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        header = like.header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_slope_inter(1.0, 0.0)
        header.set_intent("label")
        out = type(like)(labels, None, header=header)
        nib.save(out, str(out_path))
        return out_path


def collect_inputs(path: Union[str, Path], pattern: str = "*") -> List[Path]:
    """A file -> [file]; a folder -> its non-hidden regular files matching ``pattern``, sorted.

    Raises FileNotFoundError if ``path`` does not exist; ValueError for an empty folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"input folder {path} holds no file matching {pattern!r}")
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def output_path_for(in_path: Path, output: Union[str, Path], single: bool) -> Path:
    """Output file: ``output`` itself for a single input named *.nii(.gz), else ``output/<stem>_seg.nii.gz``."""
    output = Path(output)
    if single and output.name.lower().endswith(NIFTI_SUFFIXES):
        return output
    return output / f"{_stem(in_path)}_seg.nii.gz"


def _label_path_for(in_path: Path, label: Optional[Union[str, Path]], single: bool) -> Optional[Path]:
    if label is None:
        return None
    label = Path(label)
    if label.is_dir():
        return label / in_path.name
    if not single:
        raise ValueError(f"--label {label} must be a folder (one label file per input name) for a folder input")
    return label


@dataclass
class SegmentationResult:
    """Outcome of one input file."""

    input: str
    output: Optional[str] = None
    shape: Optional[Tuple[int, ...]] = None
    dice: Optional[List[float]] = None
    seconds: float = 0.0
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)  # doubtful content, e.g. a constant volume
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def segment_files(segmenter: NiftiSegmenter, inputs: Union[str, Path], output: Union[str, Path],
                  label: Optional[Union[str, Path]] = None, pattern: str = "*",
                  progress: bool = True) -> List[SegmentationResult]:
    """Segment a file or every file of a folder; a failing file is recorded and the others still run.

    Returns one :class:`SegmentationResult` per input file (``error`` holds the message of a failure).
    """
    from tqdm import tqdm

    files = collect_inputs(inputs, pattern)
    single = Path(inputs).is_file()
    results = []
    for path in tqdm(files, desc="volumes", unit="vol", disable=not progress or len(files) < 2):
        t0 = time.perf_counter()
        res = SegmentationResult(input=str(path))
        try:
            img, data = check_nifti(path)
            if data.size and float(data.min()) == float(data.max()):
                res.notes.append(f"constant volume (every voxel {float(data.min()):g}): the segmentation carries "
                                 f"no information")
            labels = segmenter.predict(img, data)
            out = segmenter.save(labels, img, output_path_for(path, output, single))
            res.output, res.shape = str(out), tuple(int(s) for s in labels.shape)
            lab_path = _label_path_for(path, label, single)
            if lab_path is not None:
                lab_img, lab = check_nifti(lab_path)
                if lab.shape != labels.shape:
                    raise NiftiInputError(f"{lab_path}: label shape {lab.shape} differs from the input's "
                                          f"{labels.shape}")
                if not np.allclose(lab_img.affine, img.affine, atol=1e-3):
                    raise NiftiInputError(f"{lab_path}: label affine differs from the input's affine")
                res.dice = dice_per_class(labels, lab, segmenter.num_classes)
        except (FileNotFoundError, ValueError) as err:
            res.error = str(err)
        res.seconds = time.perf_counter() - t0
        results.append(res)
    return results
