"""ViL-UNETR: UNETR's encoder-decoder layout with the 3D Vision-LSTM backbone as the encoder.

The encoder is vilseg's own :class:`~vilseg.models.backbones.ViL` built with ``spatial_dims=3`` (the same mLSTM
block and kernels as the 2D backbone). The decoder is assembled from MONAI's UNETR blocks (``UnetrBasicBlock``,
``UnetrPrUpBlock``, ``UnetrUpBlock``, ``UnetOutBlock``) and wired as in ``monai.networks.nets.UNETR``, generalised
from UNETR's fixed 16^3 patch to any power-of-two cubic patch ``p = 2^n``:

* ``n`` hidden states are taken from the encoder through ``out_indices`` (shallow to deep); the deepest one is the
  bottleneck at 1/p resolution; hidden state ``j - 1`` (j = 1 .. n-1) becomes the skip at 1/2^j resolution through
  an ``UnetrPrUpBlock`` with ``n - j`` transposed-convolution upsamplings and ``feature_size * 2^j`` channels;
* a ``UnetrBasicBlock`` on the input gives the full-resolution skip (``feature_size`` channels);
* ``n`` ``UnetrUpBlock`` stages go back to full resolution and an ``UnetOutBlock`` gives the logits.

With ``patch_size=16`` this is exactly UNETR's wiring (4 hidden states; skips at 1/2, 1/4, 1/8); with the default
``patch_size=8`` it has 3 hidden states and skips at 1/2 and 1/4. 8^3 patches give 8x more tokens than UNETR's
16^3, affordable because the mLSTM kernels are linear in the sequence length.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from mmseg.registry import MODELS
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import Tensor, nn

from vilseg.models.backbones.vil import ViL
from vilseg.models.layers.checks import check_input
from vilseg.models.layers.vil_block import INFERENCE_TILE_TOKENS, TRAINING_TILE_TOKENS

__all__ = ["ViLUNETR", "default_out_indices"]


def default_out_indices(num_blocks: int, num_states: int) -> List[int]:
    """Sub-block indices of ``num_states`` hidden states spread evenly over the encoder depth.

    Each index is the second sub-block of a pair (both reading directions applied); the last one is
    ``num_blocks - 1``. E.g. 12 sub-blocks, 4 states -> [3, 5, 9, 11]; 12 sub-blocks, 3 states -> [3, 7, 11].
    """
    pairs = num_blocks // 2
    return [2 * max(1, math.ceil((k + 1) * pairs / num_states)) - 1 for k in range(num_states)]


@MODELS.register_module()
class ViLUNETR(nn.Module):
    """UNETR-style 3D segmentation network with a Vision-LSTM encoder.

    Args:
        in_channels: input channels C (e.g. 1 for a T1 or CT volume).
        out_channels: number of classes K (background included).
        img_size: (D, H, W) or an int; sets the size of the learnable position embedding at initialisation.
            Other input sizes work: the embedding is interpolated (trilinear) to the input's patch grid.
        patch_size: cubic patch edge, a power of two >= 2 (default 8; 16 reproduces UNETR's layout).
        embed_dims: encoder width.
        num_blocks: encoder depth in ViL sub-blocks (even; 2 sub-blocks = one pair of reading directions).
        feature_size: decoder width at full resolution (doubles at each coarser stage).
        kernel: mLSTM kernel of the encoder: 'auto' | 'parallel' | 'chunkwise' | 'recurrent'.
        scan_order: 'fixed' or 'cycle' (axis order rotates D-H-W, H-W-D, W-D-H between block pairs).
        out_indices: encoder sub-block indices of the ``log2(patch_size)`` hidden states, shallow to deep
            (default: :func:`default_out_indices`).
        chunk_size: chunk length of the chunkwise kernel.
        layer_recompute: recompute the inner part of each mLSTM layer in backward (see ``ViL``).
        compile_layers: ``torch.compile`` each encoder sub-block (see ``ViL``).
        compile_memory_budget: the compiled sub-blocks' activation budget in training (see ``ViL``).
        inference_tile_tokens, training_tile_tokens: tile sizes of the mLSTM layers (see ``ViL``).
        keep_kernel_output: keep the mLSTM kernel outputs for the recompute (see ``ViL``).
        drop_path_rate: stochastic depth of the encoder.
        with_cp: activation checkpointing of the encoder sub-blocks.
        norm_name: MONAI norm of the decoder blocks ('instance', 'batch', ...).
        conv_block, res_block: as in MONAI's UNETR.
        final_norm: LayerNorm on the deepest hidden state (UNETR normalises its last ViT output too).

    Shapes: forward(x: (B, in_channels, D, H, W)) -> logits (B, out_channels, D, H, W). Any D, H, W >= 1 work;
    sizes that are not multiples of the patch are zero-padded at the end for the network and the logits are
    cropped back, so the output always has the input's spatial size.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2,
                 img_size: Union[int, Sequence[int]] = (96, 96, 96), patch_size: int = 8, embed_dims: int = 192,
                 num_blocks: int = 12, feature_size: int = 16, kernel: str = "auto", scan_order: str = "fixed",
                 out_indices: Optional[Sequence[int]] = None, chunk_size: int = 64,
                 layer_recompute: Optional[bool] = None, compile_layers: bool = False,
                 compile_memory_budget: Optional[float] = None,
                 inference_tile_tokens: int = INFERENCE_TILE_TOKENS, training_tile_tokens: int = TRAINING_TILE_TOKENS,
                 keep_kernel_output: Optional[bool] = None, drop_path_rate: float = 0.0,
                 with_cp: bool = False, norm_name: Union[str, tuple] = "instance", conv_block: bool = True,
                 res_block: bool = True, final_norm: bool = True) -> None:
        super().__init__()
        if isinstance(patch_size, (tuple, list)):
            if len(set(patch_size)) != 1 or len(patch_size) != 3:
                raise ValueError(f"ViLUNETR needs a cubic patch (an int or 3 equal ints), got {patch_size}")
            patch_size = int(patch_size[0])
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two >= 2 (one decoder stage per factor 2), "
                             f"got {patch_size}")
        for name, val in (("in_channels", in_channels), ("out_channels", out_channels),
                          ("embed_dims", embed_dims), ("feature_size", feature_size)):
            if int(val) < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.patch_size = int(patch_size)
        self.num_stages = n = int(math.log2(patch_size))
        if out_indices is None:
            out_indices = default_out_indices(num_blocks, n)
        out_indices = [int(i) % num_blocks if -num_blocks <= int(i) < num_blocks else int(i) for i in out_indices]
        if len(out_indices) != n:
            raise ValueError(f"patch_size {patch_size} needs log2(patch)={n} hidden states, so out_indices must "
                             f"have {n} entries, got {out_indices}")
        if any(not 0 <= i < num_blocks for i in out_indices) or sorted(out_indices) != out_indices:
            raise ValueError(f"out_indices must be non-decreasing sub-block indices in [0, {num_blocks}), "
                             f"got {out_indices}")
        self.out_indices = out_indices
        self._unique_indices = sorted(set(out_indices))
        self.vil = ViL(arch=dict(embed_dims=embed_dims, num_blocks=num_blocks), img_size=img_size,
                       patch_size=patch_size, in_channels=in_channels, spatial_dims=3,
                       out_indices=self._unique_indices, final_norm=final_norm, drop_path_rate=drop_path_rate,
                       with_cp=with_cp, kernel=kernel, chunk_size=chunk_size, scan_order=scan_order,
                       layer_recompute=layer_recompute, compile_layers=compile_layers,
                       compile_memory_budget=compile_memory_budget, inference_tile_tokens=inference_tile_tokens,
                       training_tile_tokens=training_tile_tokens,
                       keep_kernel_output=keep_kernel_output)
        if final_norm and out_indices[-1] != num_blocks - 1:
            raise ValueError(f"final_norm normalises the last sub-block's output; the deepest out index must be "
                             f"{num_blocks - 1}, got {out_indices[-1]} (or pass final_norm=False)")

        f = feature_size
        self.encoder1 = UnetrBasicBlock(spatial_dims=3, in_channels=in_channels, out_channels=f, kernel_size=3,
                                        stride=1, norm_name=norm_name, res_block=res_block)
        # skip j (1 .. n-1) at 1/2^j resolution from hidden state j-1: n-j upsamplings (num_layer = n-j-1)
        self.skip_encoders = nn.ModuleList(
            UnetrPrUpBlock(spatial_dims=3, in_channels=embed_dims, out_channels=f * 2 ** j, num_layer=n - j - 1,
                           kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm_name,
                           conv_block=conv_block, res_block=res_block)
            for j in range(1, n))
        # decoder stage j (n-1 .. 0): up x2 to 1/2^j and fuse with skip j (encoder1 for j = 0)
        self.decoders = nn.ModuleList(
            UnetrUpBlock(spatial_dims=3, in_channels=embed_dims if j == n - 1 else f * 2 ** (j + 1),
                         out_channels=f * 2 ** j, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                         res_block=res_block)
            for j in reversed(range(n)))
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=out_channels)

    def hidden_states(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Encoder hidden states for an input whose size is a multiple of the patch.

        x: (B, C, D, H, W) -> ``log2(patch)`` tensors (B, embed_dims, D/p, H/p, W/p), shallow to deep.
        """
        feats = dict(zip(self._unique_indices, self.vil(x)))
        return tuple(feats[i] for i in self.out_indices)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, D, H, W) -> logits (B, out_channels, D, H, W)."""
        check_input(x, 3, self.in_channels, "ViLUNETR")
        spatial = tuple(x.shape[2:])
        pad = []
        for s in reversed(spatial):
            pad += [0, (-s) % self.patch_size]
        if any(pad):
            x = F.pad(x, pad)
        states = self.hidden_states(x)
        skips = [self.encoder1(x)] + [enc(h) for enc, h in zip(self.skip_encoders, states[:-1])]
        y = states[-1]
        for dec, skip in zip(self.decoders, reversed(skips)):
            y = dec(y, skip)
        y = self.out(y)
        if any(pad):
            y = y[(...,) + tuple(slice(0, s) for s in spatial)]
        return y
