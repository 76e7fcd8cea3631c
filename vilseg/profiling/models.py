"""The profiled models, built from config files (the names: :mod:`vilseg.profiling.names`).

A config is read with :func:`vilseg.apis.load_config` (SyncBN -> BN on a machine without CUDA) and the model
built as ``benchmarks/vil_speed.py`` builds it (:func:`vilseg.engine.registry.build_model` with the model's own
``init_weights``); 3D networks through :func:`vilseg.medical.registry.build_network`. Three kinds:

* ``backbone``: the config's ``model.backbone`` (input (B, 3, H, W); loss = mean of the returned maps);
* ``segmentor``: the config's whole ``model`` (mmseg ``EncoderDecoder`` with its neck, heads and losses);
* ``medical``: the config's network (input (B, 1, D, H, W); logits, cross-entropy). Its ``img_size``, where it has
  one, is set to the profiled size (MONAI's UNETR only accepts inputs of that size).

What the profiler may change, by option: the number of classes (``num_classes``) and, for segmentors, whether the
decode heads are vilseg's ``ChunkedLoss*`` heads (``head_loss='chunked'``: the same loss computed in bands of
rows, as the shipped 2D configs have them) or mmseg's own (``'mmseg'``: full-resolution logits in the loss).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .names import MODEL_GROUPS, MODEL_NAMES, SEGMENTOR_SUFFIX, is_config_path, split_name

__all__ = ["ModelSpec", "get_spec", "expand_model_names", "model_config", "build_model", "REF_PATCH",
           "HEAD_LOSSES"]

# token counts are reported per reference patch (16 px / 16^3 voxels) for every model, so that the x axis is the
# same for all: tokens = pixels / 16^2 (2D) or voxels / 16^3 (3D).
REF_PATCH = 16
HEAD_LOSSES = ("chunked", "mmseg")
_CHUNKED = "ChunkedLoss"
_CHUNKABLE_HEADS = ("UPerHead", "FCNHead", "FPNHead")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One profiled model.

    Attributes:
        name: the main spelling of its name (or the config path as given), ``+upernet`` for a segmentor.
        dims: 2 (images) or 3 (volumes).
        kind: 'backbone', 'segmentor' or 'medical' (see the module docstring).
        patch: smallest input edge.
        multiple: input edges must be multiples of this.
        num_classes: the config's number of classes (None for a backbone).
        description: one line for tables.
        config: the config file; options: the overrides applied to it.
    """

    name: str
    dims: int
    kind: str
    patch: int
    multiple: int
    num_classes: Optional[int]
    description: str
    config: str
    options: Tuple[Tuple[str, Any], ...] = ()

    def unavailable_reason(self) -> Optional[str]:
        """None when the model's type can be built here, else why not."""
        cfg = model_config(self.name)
        try:
            if self.kind == "medical":
                from vilseg.medical.registry import network_types

                known = cfg["type"] in network_types()
            else:
                from mmseg.registry import MODELS

                from vilseg.engine.registry import mmseg_scope

                with mmseg_scope():
                    known = MODELS.get((cfg.get("backbone") or cfg)["type"]) is not None
        except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
            return f"{type(exc).__name__}: {exc}"
        return None if known else f"type {cfg['type']!r} is not registered here"


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}. Known models: {', '.join(MODEL_NAMES)} (each also "
                      f"'+upernet'), or a config path; groups: {', '.join(MODEL_GROUPS)}")


@functools.lru_cache(maxsize=None)
def _load(base: str) -> Dict[str, Any]:
    """The ``model`` of a short name's config (with its overrides) or of a config path, as a plain dict (read
    once per process)."""
    from vilseg.apis import load_config
    from vilseg.engine.registry import quiet_mmengine

    entry = MODEL_NAMES.get(base)
    config, options = (entry.config, entry.cfg_options()) if entry else (base, None)
    with quiet_mmengine():  # load_config logs the SyncBN -> BN change at INFO
        cfg = load_config(config, cfg_options=options or None, adapt=True)
    model = cfg.get("model")
    if not model:
        raise ValueError(f"config {config!r} has no model")
    return model.to_dict() if hasattr(model, "to_dict") else dict(model)


def _input_constraints(model: Dict[str, Any], dims: int) -> Tuple[int, int]:
    """(smallest input edge, multiple every edge must be) of the architecture a config names."""
    kind, patch = model.get("type"), model.get("patch_size")
    if kind == "SwinTransformer":
        return int(model.get("patch_size", 4)) * math.prod(model.get("strides", (4, 2, 2, 2))[1:]), 1
    if kind == "Sequencer2D":
        return math.prod(model.get("patch_sizes", (7, 2, 1, 1))), 1
    if "depth" in model:  # ResNet family: five stride-2 stages
        return 32, 1
    if kind == "UNETR":
        return 16, 16  # MONAI's UNETR has 16^3 patches
    if kind == "SwinUNETR":
        return 64, 32  # five halvings; MONAI needs edges divisible by 32
    if isinstance(patch, int):
        return patch, (patch if dims == 3 else 1)
    return 32, (16 if dims == 3 else 1)


@functools.lru_cache(maxsize=None)
def _spec(base: str, segmentor: bool) -> Tuple[ModelSpec, Dict[str, Any]]:
    entry = MODEL_NAMES.get(base)
    if entry is None and not is_config_path(base):
        raise _unknown(base + (SEGMENTOR_SUFFIX if segmentor else ""))
    config, options = (entry.config, entry.options) if entry else (base, ())
    model = _load(base)
    if "backbone" in model:
        dims, kind = 2, ("segmentor" if segmentor else "backbone")
        part = model if segmentor else model["backbone"]
        classes = model.get("decode_head", {}).get("num_classes") if segmentor else None
        desc = entry.description if entry else f"model.backbone of {base}"
        if segmentor:
            desc = f"{entry.description} + UperNet" if entry else f"segmentor of {base}"
    elif segmentor:
        raise ValueError(f"{base!r} is a 3D network: it has no '{SEGMENTOR_SUFFIX}' form")
    else:
        dims, kind, part, classes = 3, "medical", model, model.get("out_channels")
        desc = entry.description if entry else f"network of {base}"
    patch, multiple = _input_constraints(part.get("backbone", part), dims)
    name = base + (SEGMENTOR_SUFFIX if segmentor else "")
    spec = ModelSpec(name, dims, kind, patch, multiple, classes, desc, config, options)
    return spec, part


def get_spec(name: str) -> ModelSpec:
    """The spec for a short name (any spelling, ``+upernet`` for the segmentor) or a config path.

    Raises:
        ValueError: unknown name (the message lists the known names and groups), or a config without a model.
        FileNotFoundError: a config path that does not exist.
    """
    return _spec(*split_name(name))[0]


def model_config(name: str) -> Dict[str, Any]:
    """The config dict of ``name``'s model (backbone, segmentor or 3D network), a fresh copy."""
    return copy.deepcopy(_spec(*split_name(name))[1])


def expand_model_names(names: Sequence[str]) -> List[str]:
    """Expand groups ('2d', '3d', 'all', ...) and check names (order kept, duplicates dropped)."""
    out: List[str] = []
    for raw in names:
        for name in (n.strip() for n in raw.split(",")):
            if not name:
                continue
            for member in MODEL_GROUPS.get(name.lower(), [name]):
                member = get_spec(member).name  # raises for unknown names; the main spelling
                if member not in out:
                    out.append(member)
    if not out:
        raise ValueError(f"no model given: pass --models with names or groups ({', '.join(MODEL_GROUPS)})")
    return out


def _head_type(kind: str, head_loss: str) -> str:
    base = kind[len(_CHUNKED):] if kind.startswith(_CHUNKED) else kind
    if head_loss == "mmseg":
        return base
    return _CHUNKED + base if base in _CHUNKABLE_HEADS else kind


def build_model(name: str, size: Sequence[int], num_classes: Optional[int] = None,
                head_loss: str = "chunked") -> nn.Module:
    """Build ``name``'s model, in train mode on the CPU, for inputs of spatial ``size`` (3D networks only use it:
    their ``img_size``). ``num_classes`` (None: the config's) and ``head_loss`` (see the module docstring) apply
    to segmentors and 3D networks."""
    from mmengine.model import revert_sync_batchnorm

    from vilseg.engine.registry import build_model as build_from_registry

    if head_loss not in HEAD_LOSSES:
        raise ValueError(f"head_loss must be one of {HEAD_LOSSES}, got {head_loss!r}")
    spec = get_spec(name)
    cfg = model_config(name)
    if spec.kind == "medical":
        from vilseg.medical.registry import build_network

        if "img_size" in cfg:
            cfg["img_size"] = tuple(int(s) for s in size)
        if num_classes is not None:
            cfg["out_channels"] = int(num_classes)
        model = build_network(cfg)
    else:
        for key in ("decode_head", "auxiliary_head") if spec.kind == "segmentor" else ():
            heads = cfg.get(key)
            for head in (heads if isinstance(heads, list) else [heads] if heads else []):
                head["type"] = _head_type(head["type"], head_loss)
                if num_classes is not None:
                    head["num_classes"] = int(num_classes)
        model = build_from_registry(cfg, init_weights=True)
    # on CUDA load_config keeps SyncBN, which needs a process group; the profiler runs one process
    model = revert_sync_batchnorm(model)
    model.train()
    return model
