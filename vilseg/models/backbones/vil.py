"""Vision-LSTM (ViL, Alkin et al. 2024, arXiv 2406.04303) as an mmseg backbone, for 2D images and 3D volumes.

Written for vilseg (no package provides it): the public code evaluates the mLSTM in its quadratic parallel form;
this backbone runs the same blocks on vilseg's chunkwise kernel so memory grows linearly with the token count.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vilseg.models.layers import PatchEmbed, ViLBlockPair, ViLLayer, resize_pos_embed, to_ntuple
from vilseg.models.layers.checks import check_input
from vilseg.models.layers.vil_block import INFERENCE_TILE_TOKENS, TRAINING_TILE_TOKENS
from vilseg.ops.mlstm import MLSTM_KERNELS

__all__ = ["ViL", "VIL_ARCHS"]

# num_blocks counts sub-blocks: 24 = 12 pairs (one per reading direction), as in ViL-T/S/B.
VIL_ARCHS: Dict[str, Dict[str, int]] = {
    "tiny": dict(embed_dims=192, num_blocks=24),
    "small": dict(embed_dims=384, num_blocks=24),
    "base": dict(embed_dims=768, num_blocks=24),
}
VIL_ARCHS["t"], VIL_ARCHS["s"], VIL_ARCHS["b"] = VIL_ARCHS["tiny"], VIL_ARCHS["small"], VIL_ARCHS["base"]
SCAN_ORDERS = ("fixed", "cycle")


@MODELS.register_module()
class ViL(BaseModule):
    """Vision-LSTM backbone: patch embedding + position embedding + pairs of mLSTM blocks that read alternately
    from the first and from the last token of the row-major patch sequence.

    Args:
        arch: 'tiny' | 'small' | 'base' (embed dims 192 / 384 / 768, 24 sub-blocks) or
            dict(embed_dims=..., num_blocks=...) with an even num_blocks.
        img_size: size the position embedding is created for (int or tuple); other input sizes interpolate it.
        patch_size: patch edge (int or one per spatial axis).
        in_channels: input channels.
        spatial_dims: 2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W).
        out_indices: sub-block indices (0 .. num_blocks-1, negatives count from the end) whose outputs are returned.
        final_norm: apply a LayerNorm to the output of the last sub-block (when it is returned).
        drop_path_rate: stochastic depth, linearly increasing over the sub-blocks from 0 to this value.
        with_cp: activation checkpointing per sub-block (trades compute for memory at high resolution); turns the
            layer and kernel recompute below off, as they would only repeat work inside the recomputed sub-block.
        kernel: mLSTM kernel, 'auto' (parallel for short sequences, chunkwise otherwise), 'parallel',
            'chunkwise' or 'recurrent'.
        chunk_size: chunk length of the chunkwise kernel.
        layer_recompute: in training, keep only each mLSTM layer's up-projection output and down-projection input
            for backward and recompute what lies between (grid conv, q/k/v, gates, kernel, norm, gating) there:
            exact. None (default): from ``LAYER_RECOMPUTE_MIN_TOKENS`` tokens on (long sequences); True forces it;
            False keeps the layer's activations. ``with_cp`` recomputes whole sub-blocks instead.
        compile_layers: run each sub-block (pre-norm, mLSTM layer, residual) through ``torch.compile``, the layer
            untiled (one compiled function shared by all sub-blocks; compiles again for every new input shape);
            inference on sequences long enough for the layer's tiles stays eager and tiled. Off by default: the
            compile time only pays off in long trainings at a fixed crop.
        compile_memory_budget: with ``compile_layers``, in training: the compiled sub-blocks keep at most this
            fraction (0, 1] of the activations they would keep without any recompute, AOTAutograd's partitioner
            choosing what to recompute (the cheap fused element-wise chains first), in place of the layer recompute
            (see ``ViLBlock``). None (default): the layer recompute runs inside the compiled graph as configured.
        inference_tile_tokens, training_tile_tokens: a layer runs its inner part in tiles of about this many
            tokens, without autograd from twice this many tokens on, in recomputing training from this many on
            (below twice this many one tile on the native operators, two halves otherwise); same results, tile-sized
            temporaries (see ``ViLLayer``); 0 never tiles.
        keep_kernel_output: in tiled recomputing training, keep each layer's mLSTM kernel output until backward
            (one (B, S, inner) fp32 tensor per layer), so that the recompute skips the kernel's forward. None
            (default): up to ``KEEP_KERNEL_OUTPUT_MAX_TOKENS`` tokens, where it saves time; beyond, memory comes first
            (``ViLLayer``).
        fused_ops: run the element-wise work around each layer's mLSTM kernel (grid conv + SiLU, q/k/v, output norm
            + skip + gate) as vilseg's fused native CPU operators (``vilseg.ops.vil_layer``). None (default): on CPU
            in float32 / float64 without autocast, where the extension is built (``make install``); True: the same,
            an error if the extension is not built; False: PyTorch operators everywhere. Same results up to rounding.
        scan_order: 'fixed' reads every pair in the same flattened order; 'cycle' rotates the axis order between
            pairs (3D: D-H-W, H-W-D, W-D-H; 2D: H-W, W-H).
        conv_kernel_size: edge of the depthwise grid convolution before q and k.
        init_cfg: mmengine init config; dict(type='Pretrained', checkpoint=...) accepts vilseg checkpoints,
            mmseg segmentor checkpoints (``backbone.`` prefix) and the public ViL v2 checkpoints (converted); the
            weights must fit this backbone exactly unless the init config says ``allow_partial=True``.

    Shapes: forward(x: (B, in_channels, *spatial)) -> tuple of (B, embed_dims, *grid), grid = ceil(spatial/patch).
    """

    def __init__(self, arch: Union[str, dict] = "tiny", img_size: Union[int, Sequence[int]] = 224,
                 patch_size: Union[int, Sequence[int]] = 16, in_channels: int = 3, spatial_dims: int = 2,
                 out_indices: Union[int, Sequence[int]] = (23,), final_norm: bool = False,
                 drop_path_rate: float = 0.0, with_cp: bool = False, kernel: str = "auto", chunk_size: int = 64,
                 layer_recompute: Optional[bool] = None, compile_layers: bool = False,
                 compile_memory_budget: Optional[float] = None,
                 inference_tile_tokens: int = INFERENCE_TILE_TOKENS, training_tile_tokens: int = TRAINING_TILE_TOKENS,
                 keep_kernel_output: Optional[bool] = None, fused_ops: Optional[bool] = None,
                 scan_order: str = "fixed", conv_kernel_size: int = 3, norm_bias: bool = True, proj_bias: bool = True,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if isinstance(arch, str):
            if arch.lower() not in VIL_ARCHS:
                raise ValueError(f"arch must be one of {sorted(set(VIL_ARCHS))} or a dict, got {arch!r}")
            arch = VIL_ARCHS[arch.lower()]
        if not {"embed_dims", "num_blocks"} <= set(arch):
            raise ValueError(f"an arch dict needs 'embed_dims' and 'num_blocks', got {arch}")
        embed_dims, num_blocks = int(arch["embed_dims"]), int(arch["num_blocks"])
        if num_blocks < 2 or num_blocks % 2:
            raise ValueError(f"num_blocks counts sub-blocks and must be even and >= 2, got {num_blocks}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if kernel not in MLSTM_KERNELS:
            raise ValueError(f"kernel must be one of {MLSTM_KERNELS}, got {kernel!r}")
        if scan_order not in SCAN_ORDERS:
            raise ValueError(f"scan_order must be one of {SCAN_ORDERS}, got {scan_order!r}")
        self.embed_dims, self.num_blocks = embed_dims, num_blocks
        self.in_channels, self.spatial_dims = in_channels, spatial_dims
        self.with_cp, self.scan_order, self.final_norm = with_cp, scan_order, final_norm
        out_indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        self.out_indices = []
        for idx in out_indices:
            if not -num_blocks <= idx < num_blocks:
                raise ValueError(f"out_indices entries must be in [-{num_blocks}, {num_blocks}), got {idx}")
            self.out_indices.append(idx % num_blocks)

        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, spatial_dims)
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.patch_embed.grid_size(self.img_size), embed_dims))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.blocks = nn.ModuleList(
            ViLBlockPair(embed_dims, spatial_dims, drop_path=(dpr[2 * p], dpr[2 * p + 1]),
                         conv_kernel_size=conv_kernel_size, kernel=kernel, chunk_size=chunk_size,
                         layer_recompute=layer_recompute, compile_layers=compile_layers,
                         compile_memory_budget=compile_memory_budget, inference_tile_tokens=inference_tile_tokens,
                         training_tile_tokens=training_tile_tokens, keep_kernel_output=keep_kernel_output,
                         fused_ops=fused_ops, norm_bias=norm_bias, proj_bias=proj_bias)
            for p in range(num_blocks // 2))
        if with_cp:  # whole sub-blocks are recomputed: recomputing inside them again would only repeat work
            for module in self.blocks.modules():
                if isinstance(module, ViLLayer):
                    module.layer_recompute = False
                    module.mlstm_cell.recompute = False
        self.norm = nn.LayerNorm(embed_dims, eps=1e-6, bias=norm_bias) if final_norm else None

    # ------------------------------------------------------------------ helpers
    def _axis_order(self, pair: int) -> Tuple[int, ...]:
        """Grid axis order in which pair ``pair`` flattens the tokens (a rotation of (0, .., n-1))."""
        n = self.spatial_dims
        shift = pair % n if self.scan_order == "cycle" else 0
        return tuple((a + shift) % n for a in range(n))

    def _run(self, block: nn.Module, x: Tensor, grid: Tuple[int, ...]) -> Tensor:
        if self.with_cp and x.requires_grad:
            return checkpoint(block, x, grid, use_reentrant=False)
        return block(x, grid)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        check_input(x, self.spatial_dims, self.in_channels, f"ViL(spatial_dims={self.spatial_dims})")
        x = self.patch_embed(x)  # (B, *grid, D)
        grid = tuple(x.shape[1:-1])
        x = x + resize_pos_embed(self.pos_embed, grid)
        B, D = x.shape[0], x.shape[-1]
        outs = []
        order = tuple(range(self.spatial_dims))
        for p, pair in enumerate(self.blocks):
            new_order = self._axis_order(p)
            if new_order != order:  # re-flatten the grid in this pair's axis order
                x = x.permute(0, *(1 + order.index(a) for a in new_order), self.spatial_dims + 1)
                order = new_order
            x = x.reshape(B, -1, D)
            pgrid = tuple(grid[a] for a in order)
            for j, block in enumerate(pair.sub_blocks()):
                x = self._run(block, x, pgrid)
                idx = 2 * p + j
                if idx in self.out_indices:
                    y = self.norm(x) if (self.norm is not None and idx == self.num_blocks - 1) else x
                    y = y.reshape(B, *pgrid, D)
                    inverse = tuple(order.index(a) for a in range(self.spatial_dims))
                    y = y.permute(0, self.spatial_dims + 1, *(1 + a for a in inverse))
                    outs.append(y.contiguous())
            x = x.reshape(B, *pgrid, D)
        return tuple(outs)

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=...)`` in vilseg, mmseg or public ViL format."""
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get("type") == "Pretrained"):
            super().init_weights()
            return
        from vilseg.models.backbones.vil_convert import load_vil_pretrained

        missing, unexpected = load_vil_pretrained(self, self.init_cfg["checkpoint"],
                                                  prefix=self.init_cfg.get("prefix"),
                                                  allow_partial=bool(self.init_cfg.get("allow_partial", False)))
        note = f" (left out: missing {missing}; unexpected {unexpected})" if missing or unexpected else ""
        print_log(f"ViL: loaded {self.init_cfg['checkpoint']}{note}", logger="current")
        self._is_init = True
