"""The models the profiler compares, each built from mmseg / MONAI / vilseg registries.

2D (input (B, 3, H, W)):
    ``vil-t``            vilseg ViL-T backbone (192 dims, 24 sub-blocks, chunkwise mLSTM kernel)
    ``vil-t-parallel``   the same with the quadratic parallel kernel (the public ViL's form)
    ``vit-t``            mmseg ``VisionTransformer`` at DeiT-T size (192 dims, 12 layers, 3 heads)
                         as mmseg ships it (explicit attention matrix)
    ``vit-t-sdpa``       the same through ``scaled_dot_product_attention`` (memory-efficient)
    ``swin-t``           mmseg ``SwinTransformer`` (Swin-T)
    ``sequencer2d``      vilseg ``Sequencer2D`` (BiLSTM baseline), when importable
    ``lambdaresnet``     vilseg ``LambdaResNet``, when importable
    ``<backbone>+upernet``  the backbone inside mmseg's ``EncoderDecoder`` with ``UPerHead`` and an
                         auxiliary ``FCNHead``; the columnar ones (ViL, ViT) through mmseg's
                         ``MultiLevelNeck`` (scales 4, 2, 1, 0.5 of four intermediate outputs).
                         ``head_loss='chunked'`` (default) uses vilseg's ``ChunkedLossUPerHead`` /
                         ``ChunkedLossFCNHead`` (the same heads and loss, computed in bands of rows: the
                         full-resolution logits are never held); ``'mmseg'`` mmseg's heads unchanged.
3D (input (B, 1, D, H, W)):
    ``vil-unetr``        vilseg ``ViLUNETR``, when importable
    ``unetr``            MONAI ``UNETR`` (ViT-B encoder, patch 16)
    ``swin-unetr``       MONAI ``SwinUNETR`` (feature size 48)

Head widths: UPerHead ``channels`` is 192 for the 192-dim columnar models (ViL-T, DeiT-T), so
the two are compared with the same neck and head; Swin-T keeps mmseg's 512 (its config).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from vilseg.engine.registry import build_model as build_from_registry

from .names import known_name

__all__ = ["ModelSpec", "MODEL_SPECS", "MODEL_GROUPS", "get_spec", "expand_model_names",
           "build_model", "REF_PATCH", "HEAD_LOSSES"]

# token counts are reported per reference patch (16 px / 16^3 voxels) for every model, so
# that the x axis is the same for all: tokens = pixels / 16^2 (2D) or voxels / 16^3 (3D).
REF_PATCH = 16


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One profiled model.

    Attributes:
        name: the name given on the command line.
        dims: 2 (images) or 3 (volumes).
        kind: 'backbone' (loss = mean of the feature maps) or 'segmentor' (mmseg EncoderDecoder
            with its own losses) or 'medical' (3D network with logits, cross-entropy).
        patch: smallest input edge (the patch size).
        multiple: input edges must be multiples of this (e.g. 32 for SwinUNETR).
        requires: module that must be importable (models written by other vilseg authors).
        description: one line for tables.
    """

    name: str
    dims: int
    kind: str
    family: str
    patch: int
    multiple: int
    requires: Optional[str]
    description: str
    builder: Callable[..., nn.Module] = dataclasses.field(compare=False, repr=False)

    def unavailable_reason(self) -> Optional[str]:
        """None when the model can be built here, else why not."""
        if self.requires is None:
            return None
        try:
            importlib.import_module(self.requires)
        except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
            return f"{self.requires} not importable ({type(exc).__name__}: {exc})"
        return None


# ---------------------------------------------------------------------------- 2D configs
NORM_CFG = dict(type="BN", requires_grad=True)  # SyncBN -> BN: one process, CPU
HEAD_LOSSES = ("chunked", "mmseg")
DROP_PATH = 0.1


def _vil_backbone(kernel: str, out_indices: Sequence[int] = (23,)) -> dict:
    return dict(type="ViL", arch="tiny", img_size=224, patch_size=16, in_channels=3,
                out_indices=tuple(out_indices), drop_path_rate=DROP_PATH, kernel=kernel, chunk_size=64)


def _vit_backbone(sdpa: bool, out_indices: Sequence[int] = (11,)) -> dict:
    # DeiT-T as mmseg's deit configs set it up (upernet_deit-s16 with DeiT-T width/heads)
    return dict(type="VisionTransformerSDPA" if sdpa else "VisionTransformer", img_size=(512, 512),
                patch_size=16, in_channels=3, embed_dims=192, num_layers=12, num_heads=3, mlp_ratio=4,
                out_indices=tuple(out_indices), qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                drop_path_rate=DROP_PATH, with_cls_token=True, norm_cfg=dict(type="LN", eps=1e-6),
                act_cfg=dict(type="GELU"), norm_eval=False, interpolate_mode="bicubic")


def _swin_backbone() -> dict:
    # mmseg configs/_base_/models/upernet_swin.py with Swin-T sizes (swin-tiny config)
    return dict(type="SwinTransformer", pretrain_img_size=224, embed_dims=96, patch_size=4, window_size=7,
                mlp_ratio=4, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], strides=(4, 2, 2, 2),
                out_indices=(0, 1, 2, 3), qkv_bias=True, qk_scale=None, patch_norm=True, drop_rate=0.0,
                attn_drop_rate=0.0, drop_path_rate=0.3, use_abs_pos_embed=False, act_cfg=dict(type="GELU"),
                norm_cfg=dict(type="LN"))


def _build_mmseg(cfg: dict) -> nn.Module:
    return build_from_registry(cfg, init_weights=True)


def _segmentor(backbone: dict, in_channels: List[int], channels: int, neck: Optional[dict],
               aux_in_index: int, num_classes: int, head_loss: str = "chunked") -> dict:
    prefix = "ChunkedLoss" if head_loss == "chunked" else ""  # head_loss is checked by build_model
    return dict(
        type="EncoderDecoder",
        data_preprocessor=None,
        backbone=backbone,
        neck=neck,
        decode_head=dict(type=prefix + "UPerHead", in_channels=in_channels, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=channels, dropout_ratio=0.1,
                         num_classes=num_classes, norm_cfg=NORM_CFG, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type=prefix + "FCNHead", in_channels=in_channels[aux_in_index], in_index=aux_in_index,
                            channels=256, num_convs=1, concat_input=False, dropout_ratio=0.1,
                            num_classes=num_classes, norm_cfg=NORM_CFG, align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )


def _columnar_segmentor(backbone: dict, dim: int, num_classes: int, head_loss: str) -> dict:
    neck = dict(type="MultiLevelNeck", in_channels=[dim] * 4, out_channels=dim, scales=[4, 2, 1, 0.5])
    return _segmentor(backbone, [dim] * 4, dim, neck, 3, num_classes, head_loss)


def build_vil(size: Tuple[int, ...], num_classes: int, segmentor: bool, kernel: str,
              head_loss: str = "chunked") -> nn.Module:
    if not segmentor:
        return _build_mmseg(_vil_backbone(kernel))
    return _build_mmseg(_columnar_segmentor(_vil_backbone(kernel, (5, 11, 17, 23)), 192, num_classes, head_loss))


def build_vit(size: Tuple[int, ...], num_classes: int, segmentor: bool, sdpa: bool,
              head_loss: str = "chunked") -> nn.Module:
    if not segmentor:
        return _build_mmseg(_vit_backbone(sdpa))
    return _build_mmseg(_columnar_segmentor(_vit_backbone(sdpa, (2, 5, 8, 11)), 192, num_classes, head_loss))


def build_swin(size: Tuple[int, ...], num_classes: int, segmentor: bool, head_loss: str = "chunked") -> nn.Module:
    if not segmentor:
        return _build_mmseg(_swin_backbone())
    return _build_mmseg(_segmentor(_swin_backbone(), [96, 192, 384, 768], 512, None, 2, num_classes, head_loss))


def _hierarchical_channels(backbone: nn.Module, dims: int = 2) -> List[int]:
    """Output channels of a multi-scale backbone, found with one tiny forward pass."""
    import torch

    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        outs = backbone(torch.zeros(1, 3, 64, 64))
        backbone.train(was_training)
    return [int(o.shape[1]) for o in outs]


def build_registered(type_name: str, size: Tuple[int, ...], num_classes: int, segmentor: bool,
                     backbone_kwargs: Optional[dict] = None, head_loss: str = "chunked") -> nn.Module:
    """A vilseg-registered multi-scale backbone (Sequencer2D, LambdaResNet) alone or under UperNet
    (channels 512, as for Swin-T; the aux head reads the third level)."""
    cfg = dict(type=type_name, **(backbone_kwargs or {}))
    if not segmentor:
        return _build_mmseg(cfg)
    chans = _hierarchical_channels(_build_mmseg(cfg))
    if len(chans) != 4:
        raise ValueError(f"{type_name} returns {len(chans)} feature maps; UperNet here needs 4")
    return _build_mmseg(_segmentor(cfg, chans, 512, None, 2, num_classes, head_loss))


# ---------------------------------------------------------------------------- 3D configs
def build_unetr(size: Tuple[int, ...], num_classes: int) -> nn.Module:
    from monai.networks.nets import UNETR

    return UNETR(in_channels=1, out_channels=num_classes, img_size=tuple(size), feature_size=16,
                 hidden_size=768, mlp_dim=3072, num_heads=12, proj_type="conv", norm_name="instance",
                 res_block=True, dropout_rate=0.0)


def build_swin_unetr(size: Tuple[int, ...], num_classes: int) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=num_classes, feature_size=48, spatial_dims=3,
                     use_checkpoint=False)


def build_vil_unetr(size: Tuple[int, ...], num_classes: int) -> nn.Module:
    from vilseg.models.vil_unetr import ViLUNETR

    # the medical helper's defaults (patch 8, 192 dims, 12 sub-blocks), on the chunkwise kernel like ViL-T
    return ViLUNETR(in_channels=1, out_channels=num_classes, img_size=tuple(size), kernel="chunkwise")


# ---------------------------------------------------------------------------- the table
def _spec(name: str, dims: int, kind: str, family: str, patch: int, multiple: int,
          requires: Optional[str], description: str, builder: Callable[..., nn.Module]) -> ModelSpec:
    return ModelSpec(name, dims, kind, family, patch, multiple, requires, description, builder)


def _make_specs() -> Dict[str, ModelSpec]:
    specs: List[ModelSpec] = []
    two_d = [
        ("vil-t", "vil", 16, 1, "vilseg.models.backbones.vil", "ViL-T (chunkwise mLSTM)",
         lambda seg: (lambda size, nc, **o: build_vil(size, nc, seg, "chunkwise", **o))),
        ("vil-t-parallel", "vil", 16, 1, "vilseg.models.backbones.vil", "ViL-T (parallel mLSTM, quadratic)",
         lambda seg: (lambda size, nc, **o: build_vil(size, nc, seg, "parallel", **o))),
        ("vit-t", "vit", 16, 1, None, "mmseg ViT DeiT-T (explicit attention)",
         lambda seg: (lambda size, nc, **o: build_vit(size, nc, seg, False, **o))),
        ("vit-t-sdpa", "vit", 16, 1, None, "mmseg ViT DeiT-T (SDPA attention)",
         lambda seg: (lambda size, nc, **o: build_vit(size, nc, seg, True, **o))),
        ("swin-t", "swin", 32, 1, None, "mmseg Swin-T",
         lambda seg: (lambda size, nc, **o: build_swin(size, nc, seg, **o))),
        ("sequencer2d", "sequencer", 14, 1, "vilseg.models.backbones.sequencer", "vilseg Sequencer2D-S",
         lambda seg: (lambda size, nc, **o: build_registered("Sequencer2D", size, nc, seg, **o))),
        ("lambdaresnet", "lambda", 32, 1, "vilseg.models.backbones.lambda_resnet", "vilseg LambdaResNet-50",
         lambda seg: (lambda size, nc, **o: build_registered("LambdaResNet", size, nc, seg, **o))),
    ]
    for name, family, patch, multiple, requires, desc, make in two_d:
        specs.append(_spec(name, 2, "backbone", family, patch, multiple, requires, desc + " backbone", make(False)))
        specs.append(_spec(name + "+upernet", 2, "segmentor", family, patch, multiple, requires,
                           desc + " + UperNet", make(True)))
    specs += [
        _spec("vil-unetr", 3, "medical", "vil", 8, 8, "vilseg.models.vil_unetr",
              "vilseg ViL-UNETR (ViL-T width, patch 8)",
              build_vil_unetr),
        _spec("unetr", 3, "medical", "vit", 16, 16, None, "MONAI UNETR (ViT-B/16)", build_unetr),
        _spec("swin-unetr", 3, "medical", "swin", 64, 32, None, "MONAI SwinUNETR (feature 48)",
              build_swin_unetr),
    ]
    return {s.name: s for s in specs}


MODEL_SPECS: Dict[str, ModelSpec] = _make_specs()

# named groups accepted by --models
MODEL_GROUPS: Dict[str, List[str]] = {
    "2d-backbones": ["vil-t", "vit-t", "vit-t-sdpa", "swin-t", "sequencer2d", "lambdaresnet"],
    "2d-segmentors": ["vil-t+upernet", "vit-t+upernet", "vit-t-sdpa+upernet", "swin-t+upernet",
                      "sequencer2d+upernet", "lambdaresnet+upernet"],
    "3d": ["vil-unetr", "unetr", "swin-unetr"],
}
MODEL_GROUPS["2d"] = MODEL_GROUPS["2d-backbones"] + MODEL_GROUPS["2d-segmentors"]
MODEL_GROUPS["all"] = MODEL_GROUPS["2d"] + MODEL_GROUPS["3d"]


def get_spec(name: str) -> ModelSpec:
    """The spec for ``name``.

    Raises:
        ValueError: unknown name; the message lists the known names and groups.
    """
    key = known_name(name, MODEL_SPECS)  # also the complexity tool's spelling (deit-t, sequencer2d-s, ...)
    if key not in MODEL_SPECS:
        raise ValueError(
            f"unknown model {name!r}. Known models: {', '.join(sorted(MODEL_SPECS))}; "
            f"groups: {', '.join(sorted(MODEL_GROUPS))}"
        )
    return MODEL_SPECS[key]


def expand_model_names(names: Sequence[str]) -> List[str]:
    """Expand groups ('2d', '3d', 'all', ...) and validate names (order kept, duplicates dropped)."""
    out: List[str] = []
    for raw in names:
        for name in (n.strip().lower() for n in raw.split(",")):
            if not name:
                continue
            members = MODEL_GROUPS.get(name, [name])
            for m in members:
                m = get_spec(m).name  # raises for unknown names; the profiler's spelling
                if m not in out:
                    out.append(m)
    if not out:
        raise ValueError("no model given: pass --models with names or groups "
                         f"({', '.join(sorted(MODEL_GROUPS))})")
    return out


def build_model(name: str, size: Tuple[int, ...], num_classes: int, head_loss: str = "chunked") -> nn.Module:
    """Build model ``name`` for inputs of spatial ``size`` (in train mode, on CPU). ``head_loss`` ('chunked' or
    'mmseg') picks the decode heads of the 2D segmentors (see the module docstring); other models ignore it."""
    spec = get_spec(name)
    reason = spec.unavailable_reason()
    if reason is not None:
        raise ValueError(f"model {name!r} is not available: {reason}")
    if head_loss not in HEAD_LOSSES:
        raise ValueError(f"head_loss must be one of {HEAD_LOSSES}, got {head_loss!r}")
    opts = dict(head_loss=head_loss) if spec.kind == "segmentor" else {}
    model = spec.builder(tuple(size), num_classes, **opts)
    model.train()
    return model
