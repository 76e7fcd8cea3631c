"""Layer-wise learning-rate decay for ViL backbones, as mmseg does it for BEiT / ConvNeXt.

mmseg's ``LearningRateDecayOptimizerConstructor`` picks a layer-id function from the backbone's class name and
only knows ConvNeXt, BEiT and MAE. :class:`ViLLayerDecayOptimizerConstructor` is that constructor with ViL's
parameter names: the same parameter groups (``layer_{id}_{decay|no_decay}`` with ``lr_scale``, ``lr`` and
``weight_decay``), the same scale ``decay_rate ** (num_layers - layer_id - 1)``.

By default the two sub-blocks of a pair (one per reading direction) form one layer, as the official ViL
segmentation recipe does it (``group_two_blocks: true``): a pair has the parameters of one transformer block, so
ViL and a ViT of the same depth decay alike. For a ViL with N sub-blocks (P = N / 2 pairs), ``num_layers`` = P + 2:

* ``backbone.patch_embed.*``, ``backbone.pos_embed`` (and a ``cls_token`` if any): 0, scale rate^(P + 1)
* ``backbone.blocks.{pair}.*``: pair + 1, scale rate^(P - pair)
* everything else (``backbone.norm``, neck, decode and auxiliary heads): P + 1 (learning-rate scale 1)

With ``group_two_blocks=False`` every sub-block is a layer (``num_layers`` = N + 2; sub-block ``2 * pair + 1`` /
``2 * pair + 2``), for experiments.

No weight decay for 1-D parameters (norm weights, biases, gates' biases), any ``.bias`` and position embeddings.

The DeiT baselines (mmseg's ``VisionTransformer``, parameters ``backbone.layers.{i}.*``) get the same treatment
through mmseg's own ``get_layer_id_for_vit`` (layer i -> i + 1), so ViL and DeiT train like for like.

Config::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05),
        constructor='ViLLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(decay_rate=0.65))   # group_two_blocks=True; num_layers: the backbone's num_blocks
"""
from __future__ import annotations

from typing import Dict, List, Optional

from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor
from mmseg.engine.optimizers.layer_decay_optimizer_constructor import get_layer_id_for_vit
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

__all__ = ["get_layer_id_for_vil", "ViLLayerDecayOptimizerConstructor"]

_DIRECTIONS = {"rowwise_from_top_left": 1, "rowwise_from_bot_right": 2}
_EMBED_NAMES = ("patch_embed", "pos_embed", "cls_token")
_NO_DECAY_SUFFIXES = ("pos_embed", "cls_token")


def get_layer_id_for_vil(var_name: str, num_blocks: int, prefix: str = "backbone.",
                         group_two_blocks: bool = True) -> int:
    """Layer id of a segmentor parameter for a ViL backbone with ``num_blocks`` sub-blocks.

    Args:
        var_name: parameter name as in ``segmentor.named_parameters()`` (e.g. ``backbone.blocks.3.rowwise_from_
            bot_right.layer.proj_up.weight``).
        num_blocks: number of sub-blocks of the backbone (2 per pair).
        prefix: name prefix of the backbone's parameters.
        group_two_blocks: one layer per pair of sub-blocks (the official recipe) instead of one per sub-block.

    Returns:
        int: 0 for the embeddings; pair + 1 for a pair's parameters (grouped) or 2*pair+1 / 2*pair+2 for its two
        sub-blocks (not grouped); the largest id (num_blocks // 2 + 1, or num_blocks + 1) for everything else.
    """
    last = num_blocks // 2 + 1 if group_two_blocks else num_blocks + 1
    if not var_name.startswith(prefix):
        return last
    name = var_name[len(prefix):]
    if name.split(".", 1)[0] in _EMBED_NAMES:
        return 0
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        pair = int(parts[1])
        if group_two_blocks:
            return pair + 1
        if parts[2] in _DIRECTIONS:
            return 2 * pair + _DIRECTIONS[parts[2]]
        return 2 * pair + 2  # a parameter of the pair itself: treat it like the pair's last sub-block
    return last


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViLLayerDecayOptimizerConstructor(LearningRateDecayOptimizerConstructor):
    """mmseg's learning-rate decay constructor for ViL backbones (see the module docstring).

    ``paramwise_cfg`` keys:
        decay_rate (float): per-layer factor, e.g. 0.65 (``layer_decay_rate`` is accepted as an alias).
        group_two_blocks (bool): ViL only; one layer per pair of sub-blocks (default True, the official recipe),
            False for one layer per sub-block.
        num_layers (int, optional): number of ViL sub-blocks (ViT layers); defaults to the backbone's.
        decay_type (str, optional): only 'layer_wise' is supported.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        paramwise_cfg = dict(paramwise_cfg or {})
        if "layer_decay_rate" in paramwise_cfg:
            paramwise_cfg.setdefault("decay_rate", paramwise_cfg.pop("layer_decay_rate"))
        if "decay_rate" not in paramwise_cfg:
            raise ValueError("ViLLayerDecayOptimizerConstructor needs paramwise_cfg['decay_rate'] (e.g. 0.65)")
        rate = float(paramwise_cfg["decay_rate"])
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"paramwise_cfg['decay_rate'] must be in (0, 1], got {rate}")
        if paramwise_cfg.get("decay_type", "layer_wise") != "layer_wise":
            raise ValueError(f"ViLLayerDecayOptimizerConstructor supports decay_type='layer_wise' only, got "
                             f"{paramwise_cfg['decay_type']!r}")
        if not isinstance(paramwise_cfg.setdefault("group_two_blocks", True), bool):
            raise ValueError(f"paramwise_cfg['group_two_blocks'] must be True or False, got "
                             f"{paramwise_cfg['group_two_blocks']!r}")
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def _backbone_kind(self, module: nn.Module) -> tuple:
        """('vil' | 'vit', number of layers) of ``module.backbone``."""
        backbone = getattr(module, "backbone", None)
        configured = self.paramwise_cfg.get("num_layers")
        if backbone is not None and hasattr(backbone, "num_blocks") and hasattr(backbone, "blocks"):
            return "vil", int(configured if configured is not None else backbone.num_blocks)
        if backbone is not None and isinstance(getattr(backbone, "layers", None), nn.ModuleList):
            return "vit", int(configured if configured is not None else len(backbone.layers))
        raise ValueError("ViLLayerDecayOptimizerConstructor supports ViL backbones (`backbone.blocks`, "
                         "`backbone.num_blocks`) and mmseg's VisionTransformer (`backbone.layers`); got "
                         f"{type(backbone).__name__}")

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Append one parameter group per (layer id, decay / no decay) to ``params`` (in place)."""
        kind_of_backbone, num_blocks = self._backbone_kind(module)
        grouped = kind_of_backbone == "vil" and self.paramwise_cfg["group_two_blocks"]
        if grouped and num_blocks % 2:
            raise ValueError(f"group_two_blocks needs an even number of ViL sub-blocks, got {num_blocks}")
        num_layers = (num_blocks // 2 if grouped else num_blocks) + 2
        decay_rate = float(self.paramwise_cfg["decay_rate"])
        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue  # frozen weights
            if param.ndim == 1 or name.endswith(".bias") or name.endswith(_NO_DECAY_SUFFIXES):
                kind, weight_decay = "no_decay", 0.0
            else:
                kind, weight_decay = "decay", self.base_wd
            if kind_of_backbone == "vil":
                layer_id = get_layer_id_for_vil(name, num_blocks, group_two_blocks=grouped)
            else:
                layer_id = get_layer_id_for_vit(name, num_layers)
            group_name = f"layer_{layer_id}_{kind}"
            if group_name not in groups:
                scale = decay_rate ** (num_layers - layer_id - 1)
                groups[group_name] = dict(weight_decay=weight_decay, params=[], param_names=[], lr_scale=scale,
                                          group_name=group_name, lr=scale * self.base_lr)
            groups[group_name]["params"].append(param)
            groups[group_name]["param_names"].append(name)
        rank, _ = get_dist_info()
        if rank == 0:
            lines = [f"{g:>22s}: {len(v['params']):4d} tensors, lr_scale {v['lr_scale']:.3e}, "
                     f"lr {v['lr']:.3e}, weight_decay {v['weight_decay']}"
                     for g, v in sorted(groups.items(), key=lambda kv: (int(kv[0].split('_')[1]), kv[0]))]
            if kind_of_backbone == "vil":
                how = (f"embeddings, {num_blocks // 2} pairs of sub-blocks (2 per layer), heads"
                       if grouped else f"embeddings, {num_blocks} sub-blocks (1 per layer), heads")
            else:
                how = f"embeddings, {num_blocks} transformer layers, heads"
            print_log(f"layer-wise lr decay {decay_rate} over {num_layers} layers ({kind_of_backbone} backbone: "
                      f"{how}):\n" + "\n".join(lines), logger="current")
        params.extend(groups.values())
