"""Config loading shared by the train / test / infer tools: paths that work from any working directory, and
the few changes a CPU machine needs (SyncBN -> BN, nccl -> gloo, DDP without device ids)."""
from __future__ import annotations

import logging
import os
import os.path as osp
from pathlib import Path
from typing import Any, Iterator, List, Optional

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

__all__ = ["REPO_ROOT", "resolve_path", "resolve_data_roots", "adapt_to_device", "load_config",
           "default_work_dir"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_DATALOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


def resolve_path(path: str, what: str = "config") -> str:
    """Absolute path of ``path``: as given (absolute or relative to the working directory) if it exists, else
    relative to the repository root.

    Raises:
        FileNotFoundError: naming ``path`` and both places looked at.
    """
    path = os.fspath(path)
    if osp.exists(path):
        return osp.abspath(path)
    candidate = REPO_ROOT / path
    if not osp.isabs(path) and candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"{what} not found: {path!r} (looked in {os.getcwd()} and {REPO_ROOT})")


def _datasets(node: Any) -> Iterator[dict]:
    """Every dataset dict inside a dataloader's ``dataset`` (ConcatDataset / RepeatDataset nesting included)."""
    if isinstance(node, dict):
        yield node
        if "dataset" in node:
            yield from _datasets(node["dataset"])
        for sub in node.get("datasets", []) or []:
            yield from _datasets(sub)
    elif isinstance(node, (list, tuple)):
        for sub in node:
            yield from _datasets(sub)


def resolve_data_roots(cfg: Config) -> List[str]:
    """Make relative ``data_root`` entries that do not exist from the working directory point into the repository
    root when they exist there (``data/mini_ade/...`` works from any directory). Returns the changed roots."""
    changed = []
    for key in _DATALOADERS:
        loader = cfg.get(key)
        if not loader:
            continue
        for ds in _datasets(loader.get("dataset")):
            root = ds.get("data_root")
            if isinstance(root, str) and root and not osp.isabs(root) and not osp.isdir(root) \
                    and (REPO_ROOT / root).is_dir():
                ds["data_root"] = str(REPO_ROOT / root)
                changed.append(root)
    return sorted(set(changed))


def _replace_sync_bn(node: Any) -> int:
    """Replace norm configs of type SyncBN / MMSyncBN by BN in place; returns how many were replaced."""
    n = 0
    if isinstance(node, dict):
        if node.get("type") in ("SyncBN", "MMSyncBN"):
            node["type"] = "BN"
            n += 1
        for value in node.values():
            n += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            n += _replace_sync_bn(value)
    return n


def adapt_to_device(cfg: Config, distributed: bool) -> List[str]:
    """Adapt a GPU config to a machine without CUDA, in place; returns notes on what changed.

    * SyncBN -> BN in ``cfg.model`` (SyncBN needs GPUs; on one CPU process it is plain BN anyway),
    * dist backend nccl -> gloo,
    * DDP wrapper without ``device_ids`` (mmengine passes the local rank as a CUDA device otherwise).
    """
    notes: List[str] = []
    if torch.cuda.is_available():
        return notes
    if _replace_sync_bn(cfg.get("model")):
        notes.append("SyncBN -> BN (no CUDA)")
    if distributed:
        env = cfg.setdefault("env_cfg", ConfigDict())
        dist_cfg = env.setdefault("dist_cfg", ConfigDict())
        if dist_cfg.get("backend", "nccl") == "nccl":
            dist_cfg["backend"] = "gloo"
            notes.append("dist backend nccl -> gloo (no CUDA)")
        wrapper = cfg.get("model_wrapper_cfg") or ConfigDict(type="MMDistributedDataParallel")
        if wrapper.get("type", "MMDistributedDataParallel") == "MMDistributedDataParallel":
            wrapper.setdefault("device_ids", None)
            wrapper.setdefault("broadcast_buffers", False)
            wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))
            cfg.model_wrapper_cfg = wrapper
            notes.append("DDP on CPU (device_ids=None)")
    return notes


def default_work_dir(config_path: str) -> str:
    """``./work_dirs/<config name>``, as mmseg's tools do."""
    return osp.join("./work_dirs", osp.splitext(osp.basename(config_path))[0])


def load_config(config: str, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                launcher: str = "none", adapt: bool = True) -> Config:
    """Load an mmseg/vilseg config the way mmseg's tools do, from any working directory.

    Args:
        config: config path, relative to the working directory or to the repository root.
        cfg_options: ``--cfg-options`` overrides (merged after loading).
        work_dir: output folder; CLI > ``work_dir`` in the config > ``./work_dirs/<config name>``.
        launcher: 'none' | 'pytorch' | 'slurm' | 'mpi'.
        adapt: apply :func:`adapt_to_device`.
    """
    path = resolve_path(config, "config")
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = default_work_dir(path)
    changed = resolve_data_roots(cfg)
    if changed:
        print_log(f"data_root resolved against the repository root: {changed}", logger="current")
    if adapt:
        for note in adapt_to_device(cfg, launcher != "none"):
            print_log(note, logger="current", level=logging.INFO)
    return cfg
