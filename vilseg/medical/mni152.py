"""A labelled 3D brain case derived from the MNI ICBM152 2009 template that ships inside the ``nilearn`` wheel.

nilearn bundles three volumes of the ICBM152 2009a nonlinear symmetric template (1 mm, 197 x 233 x 189, RAS,
uint8 rescaled to 0..255)::

    nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz   T1-weighted average
    nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz   gray-matter probability x 255
    nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz   white-matter probability x 255

:func:`build_mni152_cases` turns them into a segmentation case without any download:

1. the T1 and both probability maps are resampled (trilinear, nibabel) to an isotropic ``spacing`` (default 2 mm);
2. labels on that grid: ``p_gm = gm / 255``, ``p_wm = wm / 255``; a voxel is **1 (gray matter)** if
   ``p_gm >= p_wm`` and ``p_gm > threshold``, **2 (white matter)** if ``p_wm > p_gm`` and ``p_wm > threshold``,
   **0** otherwise (``threshold`` = 0.5 by default: the tissue must be the more likely of the two *and* more likely
   than not);
3. the volumes are cropped to the bounding box of ``p_gm + p_wm > 0.1`` plus a margin;
4. the cropped volume is cut in two by a **coronal plane** (world y = constant, chosen so that both parts hold about
   the same number of brain voxels) into two cases with their own affines: the posterior part is the training
   case, the anterior part the held-out case.

Why not one hemisphere each: this template is *exactly* left-right symmetric (the "sym" in its name; every voxel
equals its mirror image, checked by :func:`hemisphere_asymmetry`), so the right hemisphere is the left one flipped
and a left/right split would evaluate on a mirror copy of the training data. The coronal split keeps every
evaluation voxel (and every voxel that could be seen as context) out of training, and the two halves hold
different anatomy (frontal/temporal lobes vs. parietal/occipital lobes and cerebellum).
"""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np

__all__ = ["TEMPLATE_FILES", "LABELS", "template_paths", "tissue_labels", "hemisphere_asymmetry",
           "build_mni152_cases", "LICENSE_TEXT"]

TEMPLATE_FILES: Dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABELS: Dict[int, str] = {0: "background", 1: "gray_matter", 2: "white_matter"}

LICENSE_TEXT = """\
The MNI ICBM152 2009 nonlinear template (T1 image and tissue probability maps) from which the files in this folder
are derived carries the following notice:

Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
University. Permission to use, copy, modify, and distribute this software and its documentation for any purpose and
without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors and McGill
University make no representations about the suitability of this software for any purpose. It is provided "as is"
without express or implied warranty. The authors are not responsible for any data loss, equipment damage, property
loss, or injury to subjects or patients resulting from the use or misuse of this software package.

References:
  VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG. Unbiased average age-appropriate
  atlases for pediatric studies. NeuroImage 54(1), 2011. doi:10.1016/j.neuroimage.2010.07.033
  VS Fonov, AC Evans, RC McKinstry, CR Almli and DL Collins. Unbiased nonlinear average age-appropriate brain
  templates from birth to adulthood. NeuroImage 47, Supplement 1, 2009, S102. doi:10.1016/S1053-8119(09)70884-5
  DL Collins, AP Zijdenbos, WFC Baare and AC Evans. ANIMAL+INSECT: improved cortical structure segmentation.
  IPMI 1999.

The source files are the copies bundled with nilearn (nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_
converted.nii.gz, rescaled to uint8 by nilearn). The resampling, labelling and split were done by vilseg
(tools/make_mni152_case.py); they are not part of the original template.
"""


def template_paths() -> Dict[str, Path]:
    """Paths of the three template volumes inside the installed nilearn package.

    Returns: {'t1': Path, 'gm': Path, 'wm': Path}.
    Raises: FileNotFoundError if nilearn is missing or does not bundle them.
    """
    try:
        root = importlib.resources.files("nilearn.datasets") / "data"
    except ModuleNotFoundError as err:
        raise FileNotFoundError("nilearn is not installed; the MNI152 case is derived from the template files "
                                "bundled in its wheel (pip install nilearn)") from err
    paths = {}
    for key, name in TEMPLATE_FILES.items():
        path = Path(str(root / name))
        if not path.is_file():
            raise FileNotFoundError(f"MNI152 template file not found: {path} (expected inside the nilearn package)")
        paths[key] = path
    return paths


def tissue_labels(p_gm: np.ndarray, p_wm: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Hard labels from tissue probabilities (same shape, values in [0, 1]).

    Returns uint8 of the same shape: 1 where p_gm >= p_wm and p_gm > threshold, 2 where p_wm > p_gm and
    p_wm > threshold, 0 elsewhere.
    """
    p_gm, p_wm = np.asarray(p_gm, dtype=np.float32), np.asarray(p_wm, dtype=np.float32)
    if p_gm.shape != p_wm.shape:
        raise ValueError(f"gray/white probability maps differ in shape: {p_gm.shape} vs {p_wm.shape}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    label = np.where(p_gm >= p_wm, 1, 2).astype(np.uint8)
    label[np.maximum(p_gm, p_wm) <= threshold] = 0
    return label


def hemisphere_asymmetry(img: nib.Nifti1Image) -> float:
    """Mean absolute difference between a RAS volume and its left-right mirror (0.0 = exactly symmetric)."""
    data = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float64)
    return float(np.abs(data - data[::-1]).mean())


def _resample(img: nib.Nifti1Image, spacing: float, order: int = 1) -> nib.Nifti1Image:
    from nibabel.processing import resample_to_output

    data = np.asarray(img.dataobj, dtype=np.float32)
    return resample_to_output(nib.Nifti1Image(data, img.affine), voxel_sizes=(spacing,) * 3, order=order)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code="mni")
    img.set_qform(affine, code="mni")
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def build_mni152_cases(out_dir: Union[str, Path], spacing: float = 2.0, threshold: float = 0.5,
                       margin_vox: int = 2, crop_mm: Optional[Sequence[Tuple[float, float]]] = None,
                       write_docs: bool = True) -> Dict[str, object]:
    """Write the two-case MNI152 gray/white-matter data set under ``out_dir``.

    Args:
        out_dir: target folder; receives imagesTr/, labelsTr/, imagesTs/, labelsTs/, dataset.json and, with
            ``write_docs``, LICENSE and README.md.
        spacing: isotropic voxel size in mm of the written volumes (1.0 keeps the template grid).
        threshold: probability a tissue must exceed to be labelled (see :func:`tissue_labels`).
        margin_vox: voxels kept around the brain bounding box.
        crop_mm: optional world-space box ((x0, x1), (y0, y1), (z0, z1)) in mm (RAS) to keep only part of the brain
            (tests use a small box); the coronal split is then made inside that box.
        write_docs: also write LICENSE and README.md.

    Returns:
        A summary dict: shapes of both cases, label voxel counts, the split plane (world y in mm), output paths.
    Volumes: image uint8 (T1, 0..255), label uint8 {0, 1, 2}; shape (X, Y, Z) in RAS at ``spacing`` mm.
    """
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0 mm, got {spacing}")
    out_dir = Path(out_dir)
    paths = template_paths()
    src = {k: nib.as_closest_canonical(nib.load(str(p))) for k, p in paths.items()}
    res = {k: _resample(v, spacing) for k, v in src.items()}
    affine = res["t1"].affine
    t1 = np.asarray(res["t1"].dataobj, dtype=np.float32)
    p_gm = np.clip(np.asarray(res["gm"].dataobj, dtype=np.float32) / 255.0, 0.0, 1.0)
    p_wm = np.clip(np.asarray(res["wm"].dataobj, dtype=np.float32) / 255.0, 0.0, 1.0)
    label = tissue_labels(p_gm, p_wm, threshold)

    keep = (p_gm + p_wm) > 0.1
    if crop_mm is not None:
        if len(crop_mm) != 3:
            raise ValueError(f"crop_mm must be three (min, max) pairs in mm, got {crop_mm}")
        ijk = np.indices(t1.shape).reshape(3, -1)
        xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *t1.shape)
        for axis, (lo, hi) in enumerate(crop_mm):
            keep &= (xyz[axis] >= lo) & (xyz[axis] <= hi)
    if not keep.any():
        raise ValueError(f"no brain voxels inside crop_mm={crop_mm}")
    lo = [max(int(np.min(ix)) - margin_vox, 0) for ix in np.nonzero(keep)]
    hi = [min(int(np.max(ix)) + margin_vox + 1, n) for ix, n in zip(np.nonzero(keep), t1.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, label, keep = t1[box], label[box], keep[box]
    shift = np.eye(4)
    shift[:3, 3] = lo
    affine = affine @ shift

    # coronal split (axis 1 = A-P in RAS): both parts hold about half of the brain voxels
    counts = np.cumsum(keep.sum(axis=(0, 2)))
    cut = int(np.searchsorted(counts, counts[-1] / 2.0)) + 1
    cut = min(max(cut, 1), t1.shape[1] - 1)
    image_u8 = np.clip(np.rint(t1), 0, 255).astype(np.uint8)
    parts = {"posterior": (slice(0, cut), "Tr"), "anterior": (slice(cut, t1.shape[1]), "Ts")}
    summary: Dict[str, object] = {"spacing_mm": spacing, "threshold": threshold,
                                  "split_plane_y_mm": float((affine @ [0, cut - 0.5, 0, 1])[1])}
    files = {}
    for name, (sl, suffix) in parts.items():
        aff = affine.copy()
        aff[:3, 3] = (affine @ [0, sl.start, 0, 1])[:3]
        img_path = out_dir / f"images{suffix}" / f"mni152_{name}.nii.gz"
        lab_path = out_dir / f"labels{suffix}" / f"mni152_{name}.nii.gz"
        _save(image_u8[:, sl], aff, img_path)
        _save(label[:, sl], aff, lab_path)
        files[name] = {"image": f"./images{suffix}/{img_path.name}", "label": f"./labels{suffix}/{lab_path.name}"}
        summary[name] = {"shape": tuple(int(s) for s in label[:, sl].shape),
                         "voxels": {LABELS[c]: int((label[:, sl] == c).sum()) for c in LABELS},
                         "image": str(img_path), "label": str(lab_path)}

    dataset = {
        "name": "MNI152_GM_WM",
        "description": ("Gray/white-matter labels derived from the MNI ICBM152 2009a nonlinear symmetric template "
                        f"bundled with nilearn, at {spacing:g} mm; split by a coronal plane: posterior part = "
                        "training, anterior part = held-out (validation/test). See README.md."),
        "reference": "Fonov et al. 2009/2011; Collins et al. 1999 (see LICENSE)",
        "licence": "MNI ICBM152 notice, see LICENSE",
        "release": "vilseg derived case 1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": 1,
        "numTest": 1,
        "training": [files["posterior"]],
        "validation": [files["anterior"]],
        "test": [files["anterior"]["image"]],
        "vilseg": {"spacing_mm": spacing, "label_rule": f"argmax(p_gm, p_wm) where max > {threshold}",
                   "split": "coronal plane; posterior = training, anterior = validation/test",
                   "split_plane_y_mm": summary["split_plane_y_mm"]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    if write_docs:
        (out_dir / "LICENSE").write_text(LICENSE_TEXT)
        (out_dir / "README.md").write_text(_readme(summary, threshold))
    summary["dataset_json"] = str(out_dir / "dataset.json")
    summary["asymmetry"] = hemisphere_asymmetry(src["t1"])
    return summary


def _readme(summary: Dict[str, object], threshold: float) -> str:
    post, ant = summary["posterior"], summary["anterior"]
    return f"""# MNI152 gray/white-matter case (derived, for the vilseg 3D demo)

Made by `python tools/make_mni152_case.py` from the MNI ICBM152 2009a nonlinear symmetric template that nilearn
bundles (`nilearn/datasets/data/mni_icbm152_{{t1,gm,wm}}_tal_nlin_sym_09a_converted.nii.gz`); license notice in
`LICENSE`. No download is needed to rebuild it.

- Grid: RAS, {summary['spacing_mm']:g} mm isotropic (T1 and probability maps resampled trilinearly with nibabel),
  cropped to the brain (p_gm + p_wm > 0.1) plus a margin.
- Labels: 1 = gray matter where p_gm >= p_wm and p_gm > {threshold}; 2 = white matter where p_wm > p_gm and
  p_wm > {threshold}; 0 = everything else (CSF, background, uncertain voxels). p = template value / 255.
- Image: the T1 template, uint8 0..255. Label: uint8.
- Split: a coronal plane at world y = {summary['split_plane_y_mm']:.1f} mm cuts the brain into two cases with
  about equal brain volume.
  - training: `imagesTr/mni152_posterior.nii.gz` (shape {post['shape']}, voxels {post['voxels']})
  - held out (the `validation` and `test` entries of dataset.json): `imagesTs/mni152_anterior.nii.gz`
    (shape {ant['shape']}, voxels {ant['voxels']})
- Why not a left/right split: the template is exactly left-right symmetric (each voxel equals its mirror), so the
  other hemisphere would be a mirror copy of the training data. The coronal halves share no voxel and hold
  different anatomy. Training never reads the held-out file.
- This is one averaged template, not a population: Dice on it shows that a pipeline learns and generalises across
  brain regions, not clinical accuracy.
"""
