"""A plain MONAI training loop for 3D segmentation, driven by an mmengine ``Config``.

Why not mmengine's ``Runner``: MONAI's data pipeline (dict transforms, ``CacheDataset``, random crops per label
class), ``sliding_window_inference`` and ``DiceMetric`` are the medical-imaging stack users know, and wrapping them
into mmseg's ``SegDataSample``/``BaseSegmentor`` machinery would add glue without adding function. So the config is
an mmengine ``Config`` (``_base_`` inheritance, ``--cfg-options``, ``custom_imports``) and the networks come from
the accepted types of :mod:`vilseg.medical.registry` (``type='ViLUNETR'``, ``'UNETR'``, ``'SwinUNETR'``; never an
import path, since the config is stored in every checkpoint), while the loop itself is an explicit MONAI loop:

    CacheDataset(train transforms) -> random crops -> network -> DiceCELoss -> AdamW + PolyLR
    every val_interval: sliding_window_inference on whole validation volumes -> DiceMetric (per class)
    every checkpoint_interval / at the end: latest.pth (atomic), best.pth on a new best mean Dice

Config keys: ``model``, ``loss``, ``optimizer``, ``param_scheduler``, ``data`` (dataset_json, pixdim, axcodes,
intensity, roi_size, num_samples, ...), ``train`` (max_iters, val_interval, checkpoint_interval, seed, device, amp,
grad_clip), ``val`` (roi_size, sw_batch_size, overlap, mode), ``num_classes``, ``class_names``. Their values live
in ``configs/medical/_base_/mni152.py`` only: this loop has no defaults of its own, and a key it reads that the
config lacks is a :class:`MissingConfigKeyError` naming it (a config inherits them all with ``_base_``).

Resume restores the network, optimizer, LR schedule, iteration, best score and history, and continues
bit-identically: the data loader shuffles with a generator of its own, the resumed run replays the crops already
trained on (cheap: the volumes are cached; it puts every random transform where it was), then restores the random
states (Python, NumPy, torch) saved in the checkpoint.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from vilseg.medical.registry import build_loss, build_network
from vilseg.utils.env import resolve_device

__all__ = ["evaluate", "train", "class_names_from_cfg", "print_summary", "MissingConfigKeyError"]

BASE_CONFIG = "configs/medical/_base_/mni152.py"


class MissingConfigKeyError(ValueError):
    """A key the training loop reads is not in the config."""


def _required(cfg: Dict[str, Any], key: str) -> Any:
    """``cfg`` at the dotted ``key`` ('data.roi_size'); a missing key is an error naming it."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise MissingConfigKeyError(f"the config has no {key!r}: training reads every key of {BASE_CONFIG} "
                                        f"(a config inherits them with _base_)")
        node = node[part]
    return node


def _plain(cfg: Any) -> Any:
    """mmengine ConfigDict -> plain dict (recursively); other objects unchanged."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return copy.deepcopy(cfg)


def class_names_from_cfg(cfg: Any, num_classes: int) -> List[str]:
    """Class names from ``cfg.class_names``, else the dataset.json ``labels``, else 'class_k'."""
    names = cfg.get("class_names") if hasattr(cfg, "get") else None
    if not names:
        data = cfg.get("data", {}) if hasattr(cfg, "get") else {}
        path = data.get("dataset_json") if data else None
        try:
            labels = json.loads(Path(path).read_text()).get("labels", {}) if path else {}
            names = [labels.get(str(k), f"class_{k}") for k in range(num_classes)]
        except (OSError, ValueError):
            names = None
    if not names:
        names = [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries for {num_classes} classes: {names}")
    return list(names)


@torch.no_grad()
def evaluate(model: nn.Module, items: Sequence[dict], transforms, num_classes: int, roi_size: Sequence[int],
             sw_batch_size: int = 1, overlap: float = 0.25, mode: str = "gaussian",
             device: Union[str, torch.device] = "cpu", sw_device: Optional[Union[str, torch.device]] = None,
             progress: bool = False) -> Dict[str, Any]:
    """Sliding-window Dice on whole volumes, in the pipeline's (resampled) space.

    items: [{'image': path, 'label': path}]; transforms: the validation Compose (image/label (1, X, Y, Z)).
    Returns {'per_class': [Dice of class 1 .. K-1], 'mean': float, 'per_case': [[...], ...]} (background
    excluded). MONAI's ``DiceMetric``: a case whose label lacks a class has no Dice for it (NaN in 'per_case');
    'per_class' averages over the cases that have the class, NaN when none has it ('mean' skips it).
    """
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    was_training = model.training
    model.eval()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
    per_case = []
    device = torch.device(device)
    for item in items:
        data = transforms(dict(item))
        image = torch.as_tensor(data["image"])[None].to(device)
        label = torch.as_tensor(data["label"])[None].long().cpu()
        logits = sliding_window_inference(image, tuple(roi_size), int(sw_batch_size), model, overlap=overlap,
                                          mode=mode, sw_device=sw_device, device=device, progress=progress)
        pred = torch.as_tensor(logits).argmax(1, keepdim=True).cpu()
        dice = metric(one_hot(pred, num_classes), one_hot(label, num_classes))
        per_case.append([float(v) for v in torch.as_tensor(dice).reshape(-1)])
    per_class = []
    if items:
        mean, counted = metric.aggregate()  # MONAI reports 0, not NaN, for a class no case has
        per_class = [float(v) if n > 0 else float("nan") for v, n in zip(mean.reshape(-1), counted.reshape(-1))]
    metric.reset()
    model.train(was_training)
    valid = [v for v in per_class if not math.isnan(v)]
    return {"per_class": per_class, "mean": float(sum(valid) / len(valid)) if valid else float("nan"),
            "per_case": per_case}


def print_summary(title: str, rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Print a table (rich; no value is ever cut, see :func:`vilseg.utils.console.print_tables`) and return its
    plain-text form."""
    lines = [" | ".join(str(h) for h in header)] + [" | ".join(str(c) for c in r) for r in rows]
    from rich.table import Table

    from vilseg.utils.console import print_tables

    table = Table(title=title)
    for h in header:
        table.add_column(str(h))
    for r in rows:
        table.add_row(*[str(c) for c in r])
    print_tables([table])
    return "\n".join([title] + lines)


def train(cfg: Any, work_dir: Optional[Union[str, Path]] = None, resume: Union[bool, str, Path, None] = False,
          progress: bool = True, verbose: bool = True) -> Dict[str, Any]:
    """Train (or resume) a 3D segmentation network as described by ``cfg`` (an mmengine Config or dict).

    Args:
        cfg: the config (see module docstring).
        work_dir: output folder (latest.pth, best.pth, log.jsonl, summary.json); default cfg.work_dir or
            work_dirs/medical.
        resume: False; True = resume from work_dir/latest.pth (an error when there is none); or a checkpoint path.
        progress: show a progress bar.
        verbose: print the summary table.

    Returns: {'iters', 'val': last evaluation dict, 'best_mean_dice', 'best_iter', 'class_names', 'time_s',
    'latest', 'best', 'work_dir', 'history'}.
    """
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from monai.utils import set_determinism
    import mmengine.optim  # noqa: F401  (registers torch's optimizers and mmengine's LR schedulers)
    from mmengine.registry import OPTIMIZERS, PARAM_SCHEDULERS
    from tqdm import tqdm

    from vilseg.medical.checkpoint import load_checkpoint, save_checkpoint
    from vilseg.medical.data import infinite_loader, split_datalist
    from vilseg.utils.checkpoint import check_fits
    from vilseg.utils.rng import get_rng_state, set_rng_state
    from vilseg.medical.transforms import build_train_transforms, build_val_transforms

    cfg_plain = _plain(cfg)

    def need(key: str) -> Any:
        return _required(cfg_plain, key)

    num_classes = int(need("num_classes"))
    max_iters = int(need("train.max_iters"))
    val_interval = int(need("train.val_interval") or max_iters)   # 0 / None: only after the last iteration
    ckpt_interval = int(need("train.checkpoint_interval") or val_interval)
    seed = int(need("train.seed"))
    device = resolve_device(need("train.device"), "train.device")
    amp = bool(need("train.amp")) and device.type == "cuda"
    grad_clip = need("train.grad_clip")
    work_dir = Path(work_dir or cfg_plain.get("work_dir") or "work_dirs/medical")
    work_dir.mkdir(parents=True, exist_ok=True)
    latest_path, best_path = work_dir / "latest.pth", work_dir / "best.pth"
    class_names = class_names_from_cfg(cfg_plain, num_classes)

    resume_path: Optional[Path] = None
    if resume is True:
        if not latest_path.is_file():
            raise FileNotFoundError(f"--resume: nothing to resume in {work_dir.resolve()} (no latest.pth); run "
                                    f"without --resume to start a new training, or pass the checkpoint: --resume PATH")
        resume_path = latest_path
    elif resume:
        resume_path = Path(resume)
        if not resume_path.is_file():
            raise FileNotFoundError(f"--resume checkpoint not found: {resume_path}")

    set_determinism(seed=seed)
    model = build_network(need("model")).to(device)
    loss_fn = build_loss(need("loss"))
    optimizer = OPTIMIZERS.build(dict(need("optimizer"), params=model.parameters()))
    sched_cfg = dict(need("param_scheduler"))
    sched_cfg.setdefault("begin", 0)
    sched_cfg.setdefault("end", max_iters)
    scheduler = PARAM_SCHEDULERS.build(dict(sched_cfg, optimizer=optimizer, by_epoch=False))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_iter, best, best_iter, history, rng_state = 0, -1.0, -1, [], None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location=device)
        state, _ = check_fits(model, ckpt, str(resume_path), f"the {cfg_plain['model'].get('type')} network of the "
                              f"config")
        model.load_state_dict(state)
        optimizer.load_state_dict(ckpt["optimizer"])
        meta = ckpt.get("meta", {})
        start_iter = int(meta.get("iter", 0))
        # replay the LR schedule from its start instead of loading its state: identical when max_iters is
        # unchanged, and a run resumed with a larger max_iters follows the schedule of the new length
        for group in optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
        scheduler = PARAM_SCHEDULERS.build(dict(sched_cfg, optimizer=optimizer, by_epoch=False))
        with warnings.catch_warnings():  # replaying without optimizer steps is intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(start_iter, max_iters)):
                scheduler.step()
        best, best_iter = float(meta.get("best_mean_dice", -1.0)), int(meta.get("best_iter", -1))
        history = list(meta.get("history", []))
        rng_state = meta.get("rng_state")
        if verbose:
            print(f"resumed from {resume_path} at iteration {start_iter}/{max_iters}")

    train_items, val_items = split_datalist(need("data.dataset_json"), need("data.base_dir"),
                                            need("data.train_key"), need("data.val_key"),
                                            float(need("data.val_fraction")))
    common = dict(pixdim=need("data.pixdim"), axcodes=need("data.axcodes"), intensity=need("data.intensity"))
    roi_size = tuple(int(r) for r in need("data.roi_size"))
    train_tf = build_train_transforms(roi_size, num_classes, num_samples=int(need("data.num_samples")),
                                      ratios=need("data.ratios"), flip_prob=float(need("data.flip_prob")),
                                      flip_axes=tuple(need("data.flip_axes")),
                                      crop_foreground=bool(need("data.crop_foreground")), **common)
    val_tf = build_val_transforms(**common)
    dataset = CacheDataset(train_items, train_tf, cache_rate=float(need("data.cache_rate")),
                           num_workers=int(need("data.cache_num_workers")) or None, progress=False)
    # the loader shuffles with a generator of its own, so that its order does not depend on what training draws
    # from the global one; it starts as a copy of the global one, so the transforms' seeds that MONAI draws from
    # it are those it would draw from the global generator, which it would then reset to its seed: done here too
    shuffle_gen = torch.Generator()
    shuffle_gen.set_state(torch.get_rng_state())
    global_seed = torch.initial_seed()
    num_workers = int(need("data.num_workers"))
    loader = DataLoader(dataset, batch_size=int(need("data.batch_size")), shuffle=True,
                        num_workers=num_workers, collate_fn=list_data_collate,
                        generator=shuffle_gen)
    if num_workers == 0:
        torch.manual_seed(global_seed)
    batches = infinite_loader(loader)
    if start_iter:
        for _ in tqdm(range(min(start_iter, max_iters)), desc="replaying crops", unit="it", leave=False,
                      disable=not progress):
            next(batches)
        if rng_state is not None:
            set_rng_state(rng_state)
        else:
            set_determinism(seed=seed + start_iter)
            if verbose:
                print(f"{resume_path} holds no random states (an older checkpoint): the run continues "
                      f"reproducibly, not bit-identically")
    val_kw = dict(num_classes=num_classes, roi_size=tuple(need("val.roi_size")),
                  sw_batch_size=int(need("val.sw_batch_size")), overlap=float(need("val.overlap")),
                  mode=need("val.mode"), device=device)

    def state(it: int) -> Dict[str, Any]:
        return {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "meta": {"iter": it, "max_iters": max_iters, "best_mean_dice": best, "best_iter": best_iter,
                         "history": history, "config": cfg_plain, "class_names": class_names,
                         "num_classes": num_classes, "rng_state": get_rng_state()}}

    log_path = work_dir / "log.jsonl"
    t0 = time.perf_counter()
    last_val: Dict[str, Any] = {}
    running = []
    model.train()
    bar = tqdm(total=max_iters, initial=start_iter, disable=not progress, desc="train", unit="it", leave=True)
    for it in range(start_iter, max_iters):
        batch = next(batches)
        image, label = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(model(image), label)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at iteration {it + 1}")
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        running.append(float(loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{running[-1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        done = it + 1
        if val_items and (done % val_interval == 0 or done == max_iters):
            last_val = evaluate(model, val_items, val_tf, **val_kw)
            entry = {"iter": done, "train_loss": sum(running) / len(running), "val_per_class": last_val["per_class"],
                     "val_mean_dice": last_val["mean"], "time_s": time.perf_counter() - t0}
            running = []
            history.append(entry)
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}", dice=f"{last_val['mean']:.4f}")
            if not math.isnan(last_val["mean"]) and last_val["mean"] > best:
                best, best_iter = last_val["mean"], done
                save_checkpoint(best_path, state(done))
        if done % ckpt_interval == 0 or done == max_iters:
            save_checkpoint(latest_path, state(done))
    bar.close()
    elapsed = time.perf_counter() - t0
    if start_iter >= max_iters and val_items:  # nothing left to train: still report the checkpoint's Dice
        last_val = evaluate(model, val_items, val_tf, **val_kw)

    result = {"iters": max_iters, "start_iter": start_iter, "val": last_val, "best_mean_dice": best,
              "best_iter": best_iter, "class_names": class_names, "time_s": elapsed,
              "latest": str(latest_path), "best": str(best_path) if best_path.is_file() else None,
              "work_dir": str(work_dir), "history": history}
    (work_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    if verbose:
        rows = []
        if last_val:
            rows += [[name, f"{d:.4f}"] for name, d in zip(class_names[1:], last_val["per_class"])]
            rows.append(["mean Dice (last)", f"{last_val['mean']:.4f}"])
        rows += [["best mean Dice", f"{best:.4f} @ iter {best_iter}" if best_iter > 0 else "-"],
                 ["iterations", f"{start_iter} -> {max_iters}"], ["train time", f"{elapsed:.1f} s"],
                 ["latest checkpoint", str(latest_path)]]
        print_summary(f"{cfg_plain['model'].get('type')} on {need('data.dataset_json')}", rows,
                      ["metric", "value"])
    return result
