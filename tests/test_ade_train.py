"""ADE20K training: one iteration of each head at tiny size, resume after SIGKILL, and one clear error naming the
file for each kind of bad input."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ade_helpers import MINI_CONFIG, NO_VAL, REPO, TINY, cli_options, ensure_mini_ade, tool_env


def _tiny_cfg(config, work_dir, **extra):
    from vilseg.apis import load_config

    options = dict(TINY)
    options.update(NO_VAL)
    options.update({"train_cfg.max_iters": 1, "default_hooks.checkpoint.interval": 1000,
                    "default_hooks.checkpoint.save_last": False})
    options.update(extra)
    return load_config(config, options, work_dir=str(work_dir))


def _train_one_iter(cfg):
    from vilseg.apis import build_runner

    runner = build_runner(cfg)
    before = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    runner.train()
    assert runner.iter == 1
    after = runner.model.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    return runner, changed


def test_one_iteration_upernet(tmp_path):
    ensure_mini_ade()
    cfg = _tiny_cfg(MINI_CONFIG, tmp_path)
    runner, changed = _train_one_iter(cfg)
    # the step updated the backbone, the neck, the UperNet head and the auxiliary head
    for prefix in ("backbone.blocks.0.", "neck.", "decode_head.", "auxiliary_head."):
        assert any(k.startswith(prefix) for k in changed), prefix
    losses = runner.message_hub.get_scalar("train/loss").current()
    assert np.isfinite(losses)


def test_one_iteration_fpn(tmp_path):
    """configs/vil_fpn_ade20k.py as written (Feature2Pyramid -> FPN -> ChunkedLossFPNHead), shrunk to the tiny size and fed
    by the mini config's data."""
    from vilseg.apis import load_config

    ensure_mini_ade()
    mini = load_config(MINI_CONFIG, dict(TINY))
    cfg = load_config("configs/vil_fpn_ade20k.py", {
        "model.backbone.out_indices": (0, 1, 2, 3), "model.backbone.img_size": (64, 64),
        "model.neck.0.embed_dim": 32, "model.neck.1.in_channels": [32] * 4, "model.neck.1.out_channels": 32,
        "model.decode_head.in_channels": [32] * 4, "model.decode_head.channels": 32,
        "train_cfg.max_iters": 1, "default_hooks.checkpoint.interval": 1000,
        "default_hooks.checkpoint.save_last": False, "default_hooks.logger.interval": 1,
        "param_scheduler.0.end": 1, "param_scheduler.1.begin": 1, "param_scheduler.1.end": 2, **NO_VAL,
    }, work_dir=str(tmp_path))
    cfg.model.backbone.arch = dict(embed_dims=32, num_blocks=4)
    cfg.train_dataloader = mini.train_dataloader
    cfg.model.data_preprocessor = mini.model.data_preprocessor
    assert cfg.model.decode_head.type == "ChunkedLossFPNHead" and cfg.model.get("auxiliary_head") is None
    runner, changed = _train_one_iter(cfg)
    for prefix in ("backbone.", "neck.0.", "neck.1.", "decode_head.scale_heads."):
        assert any(k.startswith(prefix) for k in changed), prefix


# ------------------------------------------------------------------------------------------ resume after kill
def _last_checkpoint(work_dir: Path):
    marker = work_dir / "last_checkpoint"
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    return text or None


def _tensors(obj, prefix=""):
    """Every tensor in a nested dict / list, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}.{i}"))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Train in a subprocess, SIGKILL it after a checkpoint, --resume; the resumed run ends with exactly the weights
    and optimizer state of an uninterrupted run with the same seed (shipped dropout, a data-loader worker)."""
    from vilseg.utils.checkpoint import safe_load

    ensure_mini_ade()
    max_iters = 8
    opts = dict(TINY)
    opts.update({"train_cfg.max_iters": max_iters, "train_cfg.val_interval": 1000,
                 "default_hooks.checkpoint.interval": 2, "default_hooks.checkpoint.max_keep_ckpts": 10,
                 "train_dataloader.num_workers": 1, "randomness.seed": 0})
    from vilseg.apis import load_config

    shipped = load_config(MINI_CONFIG, dict(opts))
    assert shipped.model.decode_head.dropout_ratio > 0  # the heads' dropout draws random numbers

    def args(work):
        return [str(REPO / "tools" / "train.py"), MINI_CONFIG, "--work-dir", str(work), "--cfg-options",
                *cli_options(opts)]

    whole = subprocess.run([sys.executable, *args(tmp_path / "whole")], cwd=str(tmp_path), env=tool_env(),
                           capture_output=True, text=True, timeout=400)
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-3000:]

    work = tmp_path / "work"
    # from another working directory: the tool resolves the config and the data root against the repository
    proc = subprocess.Popen([sys.executable, *args(work)], cwd=str(tmp_path), env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _last_checkpoint(work) is None:
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed:\n" + proc.stdout.read()[-3000:]
        assert _last_checkpoint(work) is not None, "no checkpoint within the time limit"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last = _last_checkpoint(work)
    killed_at = int(re.search(r"iter_(\d+)\.pth", last).group(1))
    assert killed_at < max_iters
    # no temporary leftovers are mistaken for checkpoints; the recorded one is complete
    assert Path(last).is_file() and Path(last).stat().st_size > 0

    resumed = subprocess.run([sys.executable, *args(work), "--resume"], cwd=str(tmp_path), env=tool_env(),
                             capture_output=True, text=True, timeout=400)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-5000:]
    assert "holds no random states" not in log
    logged = (work / "last_checkpoint").read_text()
    assert logged.strip().endswith(f"iter_{max_iters}.pth")

    a = safe_load(tmp_path / "whole" / f"iter_{max_iters}.pth")
    b = safe_load(work / f"iter_{max_iters}.pth")
    ta, tb = _tensors({"w": a["state_dict"], "o": a["optimizer"]}), _tensors({"w": b["state_dict"], "o": b["optimizer"]})
    assert set(ta) == set(tb) and len(ta) > 100
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ after resuming at iteration {killed_at}: {differ[:5]}"
    # and a resume without the saved states would not be identical: the states are what makes it exact
    assert len(a["meta"]["rng_state"]) == 1 and a["meta"]["rng_state"][0]["torch"].dtype == torch.uint8


# ------------------------------------------------------------------------------------------ bad inputs
def _copy_split(tmp_path: Path, n: int = 3) -> Path:
    """A small ADE20K-layout copy of the mini set's first ``n`` training samples under tmp_path/ade."""
    src = ensure_mini_ade()
    dst = tmp_path / "ade"
    for kind, ext in (("images", ".jpg"), ("annotations", ".png")):
        (dst / kind / "training").mkdir(parents=True)
        for p in sorted((src / kind / "training").glob(f"*{ext}"))[:n]:
            shutil.copy(p, dst / kind / "training" / p.name)
    return dst


def _dataset(root: Path, **kw):
    import vilseg.engine  # noqa: F401  (registers CheckedADE20KDataset)
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
                dict(type="RandomCrop", crop_size=(64, 64)), dict(type="PackSegInputs")]
    return DATASETS.build(dict(type="CheckedADE20KDataset", data_root=str(root),
                               data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                               pipeline=pipeline, **kw))


def _first(root: Path, kind: str) -> Path:
    return sorted((root / kind / "training").iterdir())[0]


def test_good_copy_loads(tmp_path):
    root = _copy_split(tmp_path)
    ds = _dataset(root, check_files="full")
    assert len(ds) == 3
    sample = ds[0]
    assert tuple(sample["inputs"].shape) == (3, 64, 64)


def test_missing_image(tmp_path):
    from vilseg.engine import MissingDataError

    root = _copy_split(tmp_path)
    ds = _dataset(root)
    img = _first(root, "images")
    img.unlink()
    with pytest.raises(MissingDataError, match=re.escape(str(img))) as info:
        ds[0]
    assert isinstance(info.value, FileNotFoundError)


def test_unreadable_image(tmp_path):
    from vilseg.engine import InvalidDataError

    root = _copy_split(tmp_path)
    img = _first(root, "images")
    img.write_bytes(b"this is not a jpeg")
    with pytest.raises(InvalidDataError, match=re.escape(str(img))):
        _dataset(root)[0]
    with pytest.raises(InvalidDataError, match=re.escape(str(img))):
        _dataset(root, check_files="full")  # up-front check names the same file
    # a truncated JPEG (valid header, missing data) is found by the full decode
    good = sorted((ensure_mini_ade() / "images" / "training").glob("*.jpg"))[0].read_bytes()
    img.write_bytes(good[:200])
    with pytest.raises(InvalidDataError, match=re.escape(str(img))):
        _dataset(root, check_files="full")


def test_missing_annotation(tmp_path):
    from vilseg.engine import MissingDataError

    root = _copy_split(tmp_path)
    ann = _first(root, "annotations")
    ann.unlink()
    with pytest.raises(MissingDataError, match=re.escape(str(ann))):
        _dataset(root)


def test_annotation_size_mismatch(tmp_path):
    from vilseg.engine import InvalidDataError

    root = _copy_split(tmp_path)
    ann = _first(root, "annotations")
    seg = cv2.imread(str(ann), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(ann), seg[:-7, :])
    with pytest.raises(InvalidDataError, match=re.escape(str(ann)) + ".*121x160.*128x160"):
        _dataset(root)[0]


@pytest.mark.parametrize("bad_value", [151, 200])
def test_label_values_out_of_range(tmp_path, bad_value):
    from vilseg.engine import InvalidDataError

    root = _copy_split(tmp_path)
    ann = _first(root, "annotations")
    seg = cv2.imread(str(ann), cv2.IMREAD_UNCHANGED)
    seg[5:9, 5:9] = bad_value
    cv2.imwrite(str(ann), seg)
    with pytest.raises(InvalidDataError, match=re.escape(str(ann)) + f".*{bad_value}.*0..150"):
        _dataset(root)[0]
    # 16-bit annotations would wrap around in mmseg's uint8 cast: 300 -> 44 looks valid there, not here
    cv2.imwrite(str(ann), seg.astype(np.uint16) * 0 + 300)
    with pytest.raises(InvalidDataError, match="300"):
        _dataset(root)[0]


def test_empty_and_missing_dirs(tmp_path):
    from vilseg.engine import InvalidDataError, MissingDataError

    root = _copy_split(tmp_path)
    for p in (root / "images" / "training").iterdir():
        p.unlink()
    with pytest.raises(InvalidDataError, match=re.escape(str(root / "images" / "training")) + ".*empty"):
        _dataset(root)
    with pytest.raises(MissingDataError, match=re.escape(str(tmp_path / "nowhere" / "images" / "training"))):
        _dataset(tmp_path / "nowhere")


def test_error_from_dataloader_worker_keeps_one_clear_message(tmp_path):
    """Raised in a DataLoader worker, torch re-raises with the worker traceback in the message: the error class
    restores the one-line message (the traceback stays available as ``worker_traceback``)."""
    from torch.utils.data import DataLoader

    from vilseg.engine import InvalidDataError

    root = _copy_split(tmp_path)
    ann = _first(root, "annotations")
    cv2.imwrite(str(ann), cv2.imread(str(ann), cv2.IMREAD_UNCHANGED)[:-3])
    loader = DataLoader(_dataset(root), batch_size=1, num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(InvalidDataError) as info:
        next(iter(loader))
    assert str(info.value).startswith(str(ann) + ": annotation size")
    assert "\n" not in str(info.value)
    assert info.value.worker_traceback and "Traceback" in info.value.worker_traceback


def test_train_tool_reports_bad_label_in_one_line(tmp_path):
    """tools/train.py on a dataset with a bad label: exit code 2, one 'error:' line naming the file, no traceback."""
    root = _copy_split(tmp_path)
    ann = _first(root, "annotations")
    seg = cv2.imread(str(ann), cv2.IMREAD_UNCHANGED)
    seg[0, 0] = 177
    cv2.imwrite(str(ann), seg)
    opts = dict(TINY)
    opts.update({"train_dataloader.dataset.data_root": str(root), "val_dataloader.dataset.data_root": str(root),
                 "test_dataloader.dataset.data_root": str(root), "train_dataloader.num_workers": 1,
                 "train_cfg.max_iters": 2})
    res = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), MINI_CONFIG, "--work-dir",
                          str(tmp_path / "work"), "--cfg-options", *cli_options(opts)],
                         cwd=str(tmp_path), env=tool_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.stdout + res.stderr)[-4000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(ann) in errors[0] and "177" in errors[0], res.stderr[-2000:]
