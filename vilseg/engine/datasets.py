"""Dataset checks that fail with one clear error naming the file, hooked into mmseg's own dataset.

Bad inputs in an mmseg dataset otherwise surface as an ``AssertionError`` from deep inside a transform, a numpy
broadcasting error in ``RandomCrop``, an ``os.scandir`` error, or a silent ``uint8`` wrap-around of out-of-range
labels. :class:`CheckedADE20KDataset` (registered in mmseg's ``DATASETS``) is mmseg's ``ADE20KDataset`` (same
layout, same ``load_data_list``, same pipelines, so mmseg's configs, ``inference_model`` and ``MMSegInferencer``
work unchanged) plus:

* when the sample list is built: missing image / annotation folders, an empty image folder, an image without
  its annotation file (``check_files='exist'``, the default); ``check_files='full'`` also checks every sample
  up front (cheap on small sets: a long run then fails at its start, not hours in);
* before each sample enters the pipeline (``check_samples=True``): missing or unreadable image, missing or
  unreadable annotation, annotation size different from the image size, label values outside the class range;
  any other exception raised by the pipeline is re-raised naming the sample's image.

Every failure raises a :class:`DatasetValidationError` (a ``FileNotFoundError`` for missing files, a
``ValueError`` otherwise) whose message starts with the offending path. Raised in a ``DataLoader`` worker, torch
re-raises it in the main process with the worker's traceback glued into the message; the error classes strip
that again (kept in ``worker_traceback``) so ``str(err)`` is still the one clear line.
"""
from __future__ import annotations

import os.path as osp
from typing import List, Optional, Sequence, Tuple

import mmcv
import numpy as np
from mmengine import fileio
from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DatasetValidationError", "MissingDataError", "InvalidDataError", "check_image_file", "check_annotation_file",
    "check_sample", "check_split_dirs", "allowed_label_range", "read_image_size", "CheckedADE20KDataset",
]

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "Original Traceback"


class DatasetValidationError(Exception):
    """Base of vilseg's dataset errors; ``str(err)`` names the offending file and what was expected."""

    def __init__(self, message: str = "") -> None:
        message = str(message)
        self.worker_traceback: Optional[str] = None
        # torch's DataLoader re-raises a worker exception as exc_type("Caught X in DataLoader worker process N.\n
        # Original Traceback ...\n<module>.X: <message>\n"): keep the original message only.
        if message.startswith(_WORKER_PREFIX) and _WORKER_MARK in message:
            tag = f"{type(self).__module__}.{type(self).__qualname__}: "
            pos = message.rfind(tag)
            if pos >= 0:
                self.worker_traceback = message
                message = message[pos + len(tag):].rstrip("\n")
        super().__init__(message)


class MissingDataError(DatasetValidationError, FileNotFoundError):
    """A dataset file or folder does not exist."""


class InvalidDataError(DatasetValidationError, ValueError):
    """A dataset file exists but is unreadable or inconsistent (size, label values, empty folder)."""


def _is_local(path: str, backend_args: Optional[dict]) -> bool:
    return not backend_args and "://" not in str(path)


def allowed_label_range(num_classes: int, reduce_zero_label: bool) -> Tuple[int, int]:
    """Inclusive range of raw annotation values for ``num_classes`` classes.

    With ``reduce_zero_label`` (ADE20K), 0 is "other" and classes are 1..num_classes; otherwise 0..num_classes-1.
    The ignore index (255) is accepted in both cases.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return (0, num_classes) if reduce_zero_label else (0, num_classes - 1)


def check_image_file(path: str, backend_args: Optional[dict] = None) -> np.ndarray:
    """Read an image and return it, (H, W, C) uint8 BGR as mmcv decodes it.

    Raises:
        MissingDataError: ``path`` does not exist.
        InvalidDataError: ``path`` cannot be read or decoded as an image.
    """
    if _is_local(path, backend_args) and not osp.isfile(path):
        raise MissingDataError(f"{path}: image file not found")
    try:
        img = mmcv.imfrombytes(fileio.get(path, backend_args=backend_args), flag="color")
    except Exception as exc:  # decoder errors differ by backend; report them all the same way
        raise InvalidDataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if img is None or img.size == 0:
        raise InvalidDataError(f"{path}: cannot decode image (not a readable image file)")
    return img


def check_annotation_file(path: str, image_shape: Optional[Sequence[int]] = None,
                          num_classes: Optional[int] = None, reduce_zero_label: bool = True,
                          ignore_index: int = 255, backend_args: Optional[dict] = None) -> np.ndarray:
    """Read a label map and check it; returns it as decoded, (H, W) of its stored dtype.

    Args:
        path: annotation file (single-channel PNG).
        image_shape: (H, W, ...) of the matching image; the annotation must have the same H and W.
        num_classes: number of classes; values must lie in :func:`allowed_label_range` or equal ``ignore_index``.
            None skips the range check.
        reduce_zero_label: see :func:`allowed_label_range`.
        ignore_index: label value that is always allowed.

    Raises:
        MissingDataError: ``path`` does not exist.
        InvalidDataError: unreadable, not single-channel, wrong size, or values outside the class range.
    """
    if _is_local(path, backend_args) and not osp.isfile(path):
        raise MissingDataError(f"{path}: annotation file not found")
    try:
        seg = mmcv.imfrombytes(fileio.get(path, backend_args=backend_args), flag="unchanged")
    except Exception as exc:
        raise InvalidDataError(f"{path}: cannot decode annotation ({type(exc).__name__}: {exc})") from None
    if seg is None or seg.size == 0:
        raise InvalidDataError(f"{path}: cannot decode annotation (not a readable image file)")
    if seg.ndim == 3 and seg.shape[2] == 1:
        seg = seg[..., 0]
    if seg.ndim != 2:
        raise InvalidDataError(f"{path}: annotation must be a single-channel label map, got shape {seg.shape}")
    if image_shape is not None and tuple(seg.shape[:2]) != tuple(image_shape[:2]):
        raise InvalidDataError(f"{path}: annotation size {seg.shape[0]}x{seg.shape[1]} (HxW) differs from its "
                               f"image size {image_shape[0]}x{image_shape[1]}")
    if num_classes is not None:
        lo, hi = allowed_label_range(num_classes, reduce_zero_label)
        values = np.unique(seg)
        bad = values[((values < lo) | (values > hi)) & (values != ignore_index)]
        if bad.size:
            shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
            raise InvalidDataError(f"{path}: label values {shown} outside the class range {lo}..{hi} "
                                   f"(num_classes={num_classes}, reduce_zero_label={reduce_zero_label}, "
                                   f"ignore_index={ignore_index})")
    return seg


_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def read_image_size(path: str, backend_args: Optional[dict] = None) -> Tuple[int, int]:
    """(H, W) of an image from its header only (no full decode), as cv2 / mmcv will decode it (EXIF rotation
    applied).

    Raises:
        MissingDataError: ``path`` does not exist.
        InvalidDataError: ``path`` is not a readable image.
    """
    if _is_local(path, backend_args) and not osp.isfile(path):
        raise MissingDataError(f"{path}: image file not found")
    try:
        if _is_local(path, backend_args):
            with Image.open(path) as im:
                w, h = im.size
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        else:
            img = check_image_file(path, backend_args)
            return int(img.shape[0]), int(img.shape[1])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidDataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    if w < 1 or h < 1:
        raise InvalidDataError(f"{path}: image has an empty size {w}x{h}")
    return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def check_sample(img_path: str, seg_map_path: Optional[str], num_classes: Optional[int] = None,
                 reduce_zero_label: bool = True, ignore_index: int = 255, backend_args: Optional[dict] = None,
                 decode_image: bool = False) -> Tuple[int, int]:
    """Check one image and its annotation (if any); returns the image's (H, W).

    Args:
        decode_image: fully decode the image (finds truncated files) instead of reading its header only.
    """
    if decode_image:
        img = check_image_file(img_path, backend_args)
        shape = (int(img.shape[0]), int(img.shape[1]))
    else:
        shape = read_image_size(img_path, backend_args)
    if seg_map_path is not None:
        check_annotation_file(seg_map_path, shape, num_classes, reduce_zero_label, ignore_index, backend_args)
    return shape


def check_split_dirs(img_dir: str, ann_dir: Optional[str]) -> None:
    """Check that the image folder (and the annotation folder, if given) of a split exist.

    Raises:
        MissingDataError: naming the missing folder.
    """
    if not img_dir or not osp.isdir(img_dir):
        raise MissingDataError(f"{img_dir}: image folder not found")
    if ann_dir and not osp.isdir(ann_dir):
        raise MissingDataError(f"{ann_dir}: annotation folder not found")



# --------------------------------------------------------------------------------------------- mmseg hook
@DATASETS.register_module()
class CheckedADE20KDataset(ADE20KDataset):
    """mmseg's ``ADE20KDataset`` with file checks (see the module docstring).

    Args:
        check_files: when the sample list is built: 'exist' (default): folders exist, the image folder is not
            empty, every image has its annotation file; 'full': additionally decode and check every sample
            (progress bar on large sets); 'none': mmseg's behaviour.
        check_samples: check each sample's files before the pipeline runs (image header, annotation size and
            values: about a millisecond per sample) and name the image in any error the pipeline raises.
        **kwargs: ``ADE20KDataset`` / ``BaseSegDataset`` arguments (``data_root``, ``data_prefix``,
            ``pipeline``, ``reduce_zero_label``, ...).
    """

    CHECK_MODES = ("none", "exist", "full")

    def __init__(self, *args, check_files: str = "exist", check_samples: bool = True, **kwargs) -> None:
        if check_files not in self.CHECK_MODES:
            raise ValueError(f"check_files must be one of {self.CHECK_MODES}, got {check_files!r}")
        self.check_files = check_files
        self.check_samples = bool(check_samples)
        super().__init__(*args, **kwargs)

    @property
    def _num_classes_to_check(self) -> Optional[int]:
        # with a label_map (a subset of classes) raw values are original ids: the range check does not apply
        if self.label_map is not None:
            return None
        return len(self.metainfo.get("classes", ())) or None

    def load_data_list(self) -> List[dict]:
        img_dir = self.data_prefix.get("img_path", None)
        ann_dir = self.data_prefix.get("seg_map_path", None)
        local = _is_local(img_dir or "", self.backend_args)
        uses_ann_file = bool(self.ann_file) and not osp.isdir(self.ann_file)
        if self.check_files != "none" and local:
            check_split_dirs(img_dir, ann_dir)
            if uses_ann_file and not osp.isfile(self.ann_file):
                raise MissingDataError(f"{self.ann_file}: split list (ann_file) not found")
        data_list = super().load_data_list()
        if self.check_files != "none" and not data_list:
            where = self.ann_file if uses_ann_file else img_dir
            raise InvalidDataError(f"{where}: empty dataset, no '*{self.img_suffix}' images found (expected "
                                   f"mmseg's ADE20K layout images/<split>/*{self.img_suffix} + "
                                   f"annotations/<split>/*{self.seg_map_suffix})")
        if self.check_files == "exist" and local:
            for info in data_list:
                if uses_ann_file and not osp.isfile(info["img_path"]):
                    raise MissingDataError(f"{info['img_path']}: image file not found")
                seg = info.get("seg_map_path")
                if seg is not None and not osp.isfile(seg):
                    raise MissingDataError(f"{seg}: annotation file not found (for image {info['img_path']})")
        elif self.check_files == "full":
            from tqdm import tqdm

            for info in tqdm(data_list, desc=f"checking {len(data_list)} samples", unit="img", leave=False,
                             disable=len(data_list) < 500):
                self._check_sample(info, decode_image=True)
        return data_list

    def _check_sample(self, info: dict, decode_image: bool = False) -> None:
        check_sample(info["img_path"], info.get("seg_map_path"), self._num_classes_to_check,
                     bool(self.reduce_zero_label), self.ignore_index, self.backend_args, decode_image)

    def prepare_data(self, idx: int):
        """``BaseDataset.prepare_data`` (sample info -> pipeline) with the per-sample checks around it."""
        info = self.get_data_info(idx)
        if self.check_samples:
            self._check_sample(info)
        try:
            return self.pipeline(info)
        except DatasetValidationError:
            raise
        except Exception as exc:
            raise InvalidDataError(f"{info.get('img_path')}: {type(exc).__name__} in the data pipeline: {exc} "
                                   f"(annotation: {info.get('seg_map_path')})") from exc
