"""The networks, losses and intensity transforms a medical config may name, and the one builder that uses them.

A medical config is also stored inside every checkpoint the MONAI loop writes (``meta.config``), and
``tools/medical_infer.py`` rebuilds the network from it. A checkpoint is data from elsewhere, so building never
resolves a ``type`` through an import path or a registry scope: a type is looked up, as a plain string, in the
tables below, and anything else is refused with one error naming the allowed types. The fully qualified spelling of
an allowed class (``'monai.networks.nets.UNETR'``) is accepted as an alias of its short name, for configs and
checkpoints written before the short names existed; it is matched as text, never imported.

Extra entries come from :func:`register_network` / :func:`register_loss`, called from the user's own code (a
trusted config's ``custom_imports``, never a stored one).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from torch import nn

__all__ = ["register_network", "register_loss", "build_network", "build_loss", "intensity_transform",
           "network_types", "loss_types", "INTENSITY_TRANSFORMS"]

# MONAI dictionary intensity transforms a pipeline may use (all plain numeric arguments; nothing writes files)
INTENSITY_TRANSFORMS = ("ScaleIntensityRangePercentilesd", "ScaleIntensityRanged", "ScaleIntensityd",
                        "NormalizeIntensityd", "ClipIntensityPercentilesd", "ThresholdIntensityd")

_EXTRA_NETWORKS: Dict[str, Callable[..., nn.Module]] = {}
_EXTRA_LOSSES: Dict[str, Callable[..., nn.Module]] = {}


def _builtin_networks() -> Dict[str, Callable[..., nn.Module]]:
    from monai.networks import nets

    from vilseg.models.vil_unetr import ViLUNETR

    return {"ViLUNETR": ViLUNETR, "UNETR": nets.UNETR, "SwinUNETR": nets.SwinUNETR, "UNet": nets.UNet,
            "BasicUNet": nets.BasicUNet, "SegResNet": nets.SegResNet}


def _builtin_losses() -> Dict[str, Callable[..., nn.Module]]:
    from monai import losses

    return {"DiceCELoss": losses.DiceCELoss, "DiceLoss": losses.DiceLoss, "DiceFocalLoss": losses.DiceFocalLoss,
            "GeneralizedDiceLoss": losses.GeneralizedDiceLoss, "FocalLoss": losses.FocalLoss}


def _with_aliases(table: Mapping[str, Callable]) -> Dict[str, Callable]:
    out = dict(table)
    for cls in table.values():
        module = getattr(cls, "__module__", "")
        # the public path (monai.networks.nets.UNETR) and the defining one (monai.networks.nets.unetr.UNETR)
        out.setdefault(f"{module.rsplit('.', 1)[0]}.{cls.__name__}", cls)
        out.setdefault(f"{module}.{cls.__name__}", cls)
    return out


def network_types() -> Dict[str, Callable[..., nn.Module]]:
    """Every accepted network ``type`` (short names, their dotted aliases, then registered extras)."""
    return {**_with_aliases(_builtin_networks()), **_EXTRA_NETWORKS}


def loss_types() -> Dict[str, Callable[..., nn.Module]]:
    """Every accepted loss ``type``."""
    return {**_with_aliases(_builtin_losses()), **_EXTRA_LOSSES}


def _register(table: Dict[str, Callable[..., nn.Module]], name: str, cls: Optional[Callable[..., nn.Module]]):
    def add(obj):
        table[str(name)] = obj
        return obj
    return add if cls is None else add(cls)


def register_network(name: str, cls: Optional[Callable[..., nn.Module]] = None):
    """Allow ``type=name`` for a network class (usable as a decorator)."""
    return _register(_EXTRA_NETWORKS, name, cls)


def register_loss(name: str, cls: Optional[Callable[..., nn.Module]] = None):
    """Allow ``type=name`` for a loss class (usable as a decorator)."""
    return _register(_EXTRA_LOSSES, name, cls)


def _plain(cfg: Any) -> Any:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else cfg


def _check_plain_data(value: Any, where: str) -> None:
    """Arguments are numbers, strings, None and containers of them; no nested ``type`` or ``_scope_``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in ("type", "_scope_"):
                raise ValueError(f"{where}: nested {key!r} keys are not accepted (arguments must be plain values)")
            _check_plain_data(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain_data(item, f"{where}[{i}]")
    elif not isinstance(value, (bool, int, float, str, type(None))):
        raise ValueError(f"{where}: a {type(value).__name__} value; expected numbers, strings or lists of them")


def _build(cfg: Any, table: Mapping[str, Callable], what: str) -> nn.Module:
    cfg = _plain(cfg)
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ValueError(f"{what} config must be a dict with a 'type', got {cfg!r}")
    kwargs = dict(cfg)
    name = kwargs.pop("type")
    if "_scope_" in kwargs:
        raise ValueError(f"{what} config: '_scope_' is not accepted; name one of the {what} types directly")
    if not isinstance(name, str) or name not in table:
        short = sorted(k for k in table if "." not in k)
        raise ValueError(f"{what} type {name!r} is not one of the accepted {what} types {short}; register others "
                         f"with vilseg.medical.registry.register_{what}() in your own code")
    _check_plain_data(kwargs, f"{what} config ({name})")
    return table[name](**kwargs)


def build_network(cfg: Any) -> nn.Module:
    """A network from ``dict(type=<accepted name>, **plain_kwargs)``; raises ValueError for anything else."""
    return _build(cfg, network_types(), "network")


def build_loss(cfg: Any) -> nn.Module:
    """A loss from ``dict(type=<accepted name>, **plain_kwargs)``; raises ValueError for anything else."""
    return _build(cfg, loss_types(), "loss")


def intensity_transform(cfg: Mapping[str, Any], keys=("image",)):
    """A MONAI intensity transform from ``dict(type=<one of INTENSITY_TRANSFORMS>, **plain_kwargs)``."""
    import monai.transforms as mt

    kwargs = dict(_plain(cfg))
    name = kwargs.pop("type", None)
    if name not in INTENSITY_TRANSFORMS or not hasattr(mt, name):
        raise ValueError(f"intensity type must be one of {list(INTENSITY_TRANSFORMS)}, got {name!r}")
    _check_plain_data(kwargs, f"intensity ({name})")
    return getattr(mt, name)(keys=list(keys), **kwargs)
