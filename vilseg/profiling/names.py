"""The one model vocabulary of the profiler (``tools/profile_memory.py``) and the complexity tool
(``tools/analyze_complexity.py``): each short name stands for a shipped config file, optionally with overrides
in ``--cfg-options`` style. Nothing here defines a model; the configs do.

A 2D name alone means the config's ``model.backbone``; ``<name>+upernet`` the config's whole segmentor (its own
neck and heads). A 3D name means the config's network (``model``, built by ``vilseg.medical.registry``). Wherever a
name is accepted, so is a config path (``configs/vil_upernet_ade20k.py``, ``configs/...py+upernet``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

__all__ = ["ModelName", "MODEL_NAMES", "ALIASES", "MODEL_GROUPS", "SEGMENTOR_SUFFIX", "split_name", "is_config_path"]

SEGMENTOR_SUFFIX = "+upernet"


@dataclasses.dataclass(frozen=True)
class ModelName:
    """A short name: the config it stands for and the overrides applied to it (``--cfg-options`` keys)."""

    name: str
    config: str
    description: str
    options: Tuple[Tuple[str, Any], ...] = ()
    dims: int = 2

    def cfg_options(self) -> Dict[str, Any]:
        return dict(self.options)


def _n(name: str, config: str, description: str, dims: int = 2, **options: Any) -> ModelName:
    """A name; ``options`` are ``--cfg-options`` keys with ``__`` for the dots."""
    return ModelName(name, config, description, tuple((k.replace("__", "."), v) for k, v in options.items()), dims)


_VIL = "configs/vil_upernet_ade20k.py"
_SEQ = "configs/sequencer/sequencer2d_s_upernet_ade20k.py"
_LAMBDA = "configs/lambda/lambda_resnet50_upernet_ade20k.py"

MODEL_NAMES: Dict[str, ModelName] = {n.name: n for n in [
    # 2D, the shipped configs
    _n("vil-t", _VIL, "ViL-T (192 dims, 24 sub-blocks)"),
    _n("deit-t", "configs/baselines/deit_t_upernet_ade20k.py", "DeiT-T, mmseg VisionTransformer as shipped"),
    _n("deit-t-sdpa", "configs/baselines/deit_t_sdpa_upernet_ade20k.py", "DeiT-T, attention through SDPA"),
    _n("swin-t", "configs/baselines/swin_t_upernet_ade20k.py", "Swin-T, mmseg SwinTransformer"),
    _n("sequencer2d-s", _SEQ, "Sequencer2D-S (BiLSTM2D, depths 4-3-8-3)"),
    _n("lambdaresnet50", _LAMBDA, "LambdaResNet-50 (lambda layers in c4, c5)"),
    _n("vil-s", "configs/vil_s_upernet_ade20k.py", "ViL-S (384 dims, 24 sub-blocks)"),
    _n("vil-b", "configs/vil_b_upernet_ade20k.py", "ViL-B (768 dims, 24 sub-blocks)"),
    _n("deit-s", "configs/baselines/deit_s_upernet_ade20k.py", "DeiT-S, mmseg VisionTransformer"),
    # 2D, overrides of the shipped configs
    _n("vil-t-parallel", _VIL, "ViL-T on the parallel (quadratic) mLSTM kernel", model__backbone__kernel="parallel"),
    _n("vil-t-d12", _VIL, "ViL-T at half depth (12 sub-blocks)",
       model__backbone__arch=dict(_delete_=True, embed_dims=192, num_blocks=12),
       model__backbone__out_indices=(3, 5, 7, 11)),
    _n("vil-t-d36", _VIL, "ViL-T at 1.5x depth (36 sub-blocks)",
       model__backbone__arch=dict(_delete_=True, embed_dims=192, num_blocks=36),
       model__backbone__out_indices=(11, 17, 23, 35)),
    _n("vil-w288", _VIL, "ViL-T widened to 288 dims",
       model__backbone__arch=dict(_delete_=True, embed_dims=288, num_blocks=24), model__neck__embed_dim=288,
       model__decode_head__in_channels=[288] * 4, model__auxiliary_head__in_channels=288),
    _n("sequencer2d-m", _SEQ, "Sequencer2D-M (depths 4-3-14-3)", model__backbone__arch="m"),
    _n("sequencer2d-l", _SEQ, "Sequencer2D-L (depths 8-8-16-4)", model__backbone__arch="l"),
    _n("resnet50", _LAMBDA, "ResNet-50 (V1c): LambdaResNet-50 without its lambda layers",
       model__backbone__lambda_stages=(False, False, False, False)),
    # 3D
    _n("vil-unetr", "configs/medical/vil_unetr_mni152.py", "ViL-UNETR (patch 8, 6 sub-blocks x 96)", dims=3),
    _n("vil-unetr-fine", "configs/medical/vil_unetr_fine_mni152.py", "ViL-UNETR on 4^3 patches", dims=3),
    _n("unetr", "configs/medical/unetr_mni152.py", "MONAI UNETR (patch 16, hidden 96)", dims=3),
    _n("swin-unetr", "configs/medical/swinunetr_mni152.py", "MONAI SwinUNETR (feature size 12)", dims=3),
]}

# other spellings of the same models (the profiler's earlier names)
ALIASES: Mapping[str, str] = {"vit-t": "deit-t", "vit-t-sdpa": "deit-t-sdpa", "sequencer2d": "sequencer2d-s",
                              "lambdaresnet": "lambdaresnet50", "lambda-resnet50": "lambdaresnet50"}

# named groups the profiler's --models accepts
_2D = ["vil-t", "deit-t", "deit-t-sdpa", "swin-t", "sequencer2d-s", "lambdaresnet50"]
MODEL_GROUPS: Dict[str, List[str]] = {
    "2d-backbones": _2D,
    "2d-segmentors": [n + SEGMENTOR_SUFFIX for n in _2D],
    "3d": ["vil-unetr", "unetr", "swin-unetr"],
}
MODEL_GROUPS["2d"] = MODEL_GROUPS["2d-backbones"] + MODEL_GROUPS["2d-segmentors"]
MODEL_GROUPS["all"] = MODEL_GROUPS["2d"] + MODEL_GROUPS["3d"]


def is_config_path(text: str) -> bool:
    return text.endswith(".py") or "/" in text


def split_name(text: str) -> Tuple[str, bool]:
    """``(base, segmentor)``: the short name in its main spelling (or the config path as given) and whether
    ``+upernet`` asked for the whole segmentor. Unknown names come back as given (lower-cased)."""
    text = text.strip()
    segmentor = text.lower().endswith(SEGMENTOR_SUFFIX)
    base = text[:-len(SEGMENTOR_SUFFIX)] if segmentor else text
    if is_config_path(base):
        return base, segmentor
    base = base.lower()
    return ALIASES.get(base, base), segmentor
