"""Config loading shared by the train / test / infer tools: paths that work from any working directory, and
the few changes a CPU machine needs (SyncBN -> BN, nccl -> gloo, DDP without device ids)."""
from __future__ import annotations

import contextlib
import functools
import logging
import os.path as osp
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

from vilseg.utils.paths import PACKAGE_PARENT, resolve_path

__all__ = ["resolve_path", "resolve_data_roots", "adapt_to_device", "read_config", "load_config", "build_backbone",
           "default_work_dir", "check_cfg_options", "ConfigKeyError", "DATALOADER_KEYS", "iter_datasets"]

DATALOADER_KEYS = ("train_dataloader", "val_dataloader", "test_dataloader")


class ConfigKeyError(ValueError):
    """A ``--cfg-options`` key names nothing the config has or its component accepts (a typo, usually)."""


# top-level keys that mmengine's Runner.from_cfg reads, and the variables mmseg configs commonly define
RUNNER_KEYS = ("model", "work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg", "val_cfg",
               "test_cfg", "auto_scale_lr", "optim_wrapper", "param_scheduler", "val_evaluator", "test_evaluator",
               "default_hooks", "custom_hooks", "data_preprocessor", "load_from", "resume", "launcher", "env_cfg",
               "log_processor", "log_level", "visualizer", "default_scope", "randomness", "experiment_name",
               "model_wrapper_cfg", "runner_type", "custom_imports", "find_unused_parameters", "tta_model",
               "tta_pipeline", "cfg")


def _accepted_arguments(node: dict) -> Optional[List[str]]:
    """The keyword arguments the registered ``type`` of a config dict takes; None where anything goes (a
    ``**kwargs`` constructor) or the type cannot be looked up."""
    import inspect

    kind = node.get("type")
    cls = kind if callable(kind) else None
    if isinstance(kind, str):
        import mmseg.registry as registries
        from mmengine.registry import Registry
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        for reg in vars(registries).values():
            if isinstance(reg, Registry):
                try:
                    cls = reg.get(kind)
                except Exception:  # noqa: BLE001 - a type this registry cannot resolve
                    cls = None
                if cls is not None:
                    break
    if cls is None:
        return None
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_cfg_options(cfg: Config, options: dict) -> None:
    """Refuse ``--cfg-options`` keys that are typos: a new top-level key that the config does not define and the
    runner does not read, or a new nested key in a dict whose ``type`` does not take an argument of that name.
    Keys that exist, and new ones a component accepts, pass.

    Raises:
        ConfigKeyError: naming the option, what was expected and the closest existing key.
    """
    import difflib

    root = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    for option in options:
        node: Any = root
        parts = str(option).split(".")
        for depth, part in enumerate(parts):
            if isinstance(node, (list, tuple)) and part.isdigit():
                node = node[int(part)] if int(part) < len(node) else None
                continue
            if not isinstance(node, dict):
                break
            if part in node:
                node = node[part]
                continue
            where = ".".join(parts[:depth]) or "the config"
            if depth == 0:
                if part in RUNNER_KEYS:
                    break
                known = list(node.keys()) + list(RUNNER_KEYS)
                accepted = None
            else:
                accepted = _accepted_arguments(node)
                if accepted is None or part in accepted:
                    break
                known = sorted(set(accepted) | set(node.keys()))
            close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join(parts[:depth] + close)!r}?" if close else ""
            owner = f"{node.get('type')} ({where})" if depth else where
            raise ConfigKeyError(f"--cfg-options {option}: {owner} has no key {part!r}{hint}")


def iter_datasets(node: Any) -> Iterator[dict]:
    """Every dataset dict inside a dataloader's ``dataset`` (ConcatDataset / RepeatDataset nesting included)."""
    if isinstance(node, dict):
        yield node
        if "dataset" in node:
            yield from iter_datasets(node["dataset"])
        for sub in node.get("datasets", []) or []:
            yield from iter_datasets(sub)
    elif isinstance(node, (list, tuple)):
        for sub in node:
            yield from iter_datasets(sub)


def resolve_data_roots(cfg: Config) -> List[str]:
    """Make relative ``data_root`` entries that do not exist from the working directory point next to the package
    (the checkout of an editable install) when they exist there (``data/mini_ade/...`` works from any directory).
    Returns the changed roots."""
    changed = []
    for key in DATALOADER_KEYS:
        loader = cfg.get(key)
        if not loader:
            continue
        for ds in iter_datasets(loader.get("dataset")):
            root = ds.get("data_root")
            if isinstance(root, str) and root and not osp.isabs(root) and not osp.isdir(root) \
                    and (PACKAGE_PARENT / root).is_dir():
                ds["data_root"] = str(PACKAGE_PARENT / root)
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


def _open_unset_parents(cfg: Config, options: dict) -> None:
    """``model.backbone.init_cfg.checkpoint=X`` where the config has ``init_cfg=None``: make that None an empty
    dict first, so the option sets a key in it (mmengine would refuse to merge a dict into None)."""
    for option in options:
        parts = str(option).split(".")
        node: Any = cfg
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, (dict, Config)) else None
            if isinstance(node, (dict, Config)) and part in node and child is None:
                node[part] = ConfigDict()
                child = node[part]
            if child is None:
                break
            node = child


@functools.lru_cache(maxsize=None)
def _metafile_index(package_path: str) -> Dict[str, str]:
    """Experiment name -> config path (relative to the package) of every model an OpenMMLab package's metafiles
    list, the first entry of a name winning, as mmengine reads them."""
    from mmengine.fileio import load

    mim = osp.join(package_path, ".mim")
    index: Dict[str, str] = {}
    for meta_path in load(osp.join(mim, "model-index.yml"))["Import"]:
        for model in load(osp.join(mim, meta_path))["Models"]:
            if "Config" in model:
                index.setdefault(model["Config"].partition("/")[-1], model["Config"])
    return index


def _external_config_path(package_path: str, cfg_file: str) -> str:
    """mmengine's ``_get_external_cfg_path`` over :func:`_metafile_index`: ValueError where the metafiles do not
    list the name (for a ``_base_/...`` path mmengine then takes it under ``.mim/configs``)."""
    from mmengine.utils import check_file_exist

    name = cfg_file.split(".")[0]
    index = _metafile_index(package_path)
    if name not in index:
        raise ValueError(f"{name!r} is not an experiment listed in the metafiles of {package_path}")
    path = osp.join(package_path, index[name])
    check_file_exist(path)
    return path


@contextlib.contextmanager
def _indexed_external_configs() -> Iterator[None]:
    """While it lasts, mmengine resolves a config's ``mmseg::`` bases through an index of mmseg's metafiles read
    once per process: by itself it reads all of them (some 200 YAML files) again for every such base of every
    config it loads, most of a config's loading time."""
    import mmengine.config.config as config_module

    original = config_module._get_external_cfg_path
    config_module._get_external_cfg_path = _external_config_path
    try:
        yield
    finally:
        config_module._get_external_cfg_path = original


def read_config(path: str) -> Config:
    """``Config.fromfile(path)``, with the package bases (``mmseg::...``) it names resolved as mmengine does but
    without re-reading mmseg's metafiles on every load (:func:`_indexed_external_configs`)."""
    with _indexed_external_configs():
        return Config.fromfile(path)


def load_config(config: str, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                launcher: str = "none", adapt: bool = True) -> Config:
    """Load an mmseg/vilseg config the way mmseg's tools do, from any working directory.

    Args:
        config: config path, relative to the working directory or to the checkout (:func:`resolve_path`).
        cfg_options: ``--cfg-options`` overrides (merged after loading).
        work_dir: output folder; CLI > ``work_dir`` in the config > ``./work_dirs/<config name>``.
        launcher: 'none' | 'pytorch' | 'slurm' | 'mpi'.
        adapt: apply :func:`adapt_to_device`.
    """
    path = resolve_path(config, "config")
    cfg = read_config(path)
    cfg.launcher = launcher
    if cfg_options:
        check_cfg_options(cfg, cfg_options)
        _open_unset_parents(cfg, cfg_options)
        try:
            cfg.merge_from_dict(cfg_options)
        except TypeError as err:  # e.g. a key set inside a value that is None in the config
            raise ConfigKeyError(f"--cfg-options {' '.join(map(str, cfg_options))}: {err}") from None
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


def build_backbone(config: str, side: Optional[int] = None) -> "nn.Module":
    """A config's ``model.backbone``, built with its initial weights, as the benchmarks measure the shipped models.
    ``side``: the square image side its position embedding is made for, where the backbone has one (``img_size``)."""
    from vilseg.engine.registry import build_model

    cfg = load_config(config, adapt=True).model.backbone
    if side is not None and "img_size" in cfg:
        cfg.img_size = (side, side)
    return build_model(cfg, init_weights=True)
