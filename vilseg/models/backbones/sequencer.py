"""Sequencer2D (Tatsunami & Taki, NeurIPS 2022, arXiv 2205.01972) as an mmseg backbone.

Sequencer replaces self-attention with bidirectional LSTMs that read the rows and the columns of the feature map
(BiLSTM2D). Its memory grows linearly with the number of tokens, which makes it one of the attention-free
baselines ViL is compared with.

Why vilseg writes it itself: no maintained mmseg-style segmentation backbone exists, and timm's classification
model (``sequencer2d_s``) is not worth the dependency here: ``pip install timm`` resolves the newest torchvision,
which pins another torch (a multi-GB CUDA build replacing vilseg's pinned CPU torch); keeping torch would need a
torchvision pin tied to vilseg's torch pin, for a ~200-line model. This one is written from the paper with
``torch.nn.LSTM`` (cuDNN on GPU), returns NCHW multi-scale maps and takes any input size.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmseg.registry import MODELS
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vilseg.models.layers.checks import check_input

__all__ = ["BiLSTM2D", "Sequencer2DBlock", "Sequencer2D", "SEQUENCER2D_ARCHS"]

# The paper's Table 1: depths per stage, widths [192, 384, 384, 384], patch sizes 7 (stem) then 2, 1, 1,
# BiLSTM hidden size C/4 per direction (48, 96, 96, 96), MLP ratio 3.
SEQUENCER2D_ARCHS: Dict[str, Dict[str, List[int]]] = {
    "s": dict(depths=[4, 3, 8, 3], embed_dims=[192, 384, 384, 384]),     # 18 blocks, ~28M parameters
    "m": dict(depths=[4, 3, 14, 3], embed_dims=[192, 384, 384, 384]),    # 24 blocks
    "l": dict(depths=[8, 8, 16, 4], embed_dims=[192, 384, 384, 384]),    # 36 blocks
}
SEQUENCER2D_ARCHS["small"] = SEQUENCER2D_ARCHS["s"]
SEQUENCER2D_ARCHS["medium"] = SEQUENCER2D_ARCHS["m"]
SEQUENCER2D_ARCHS["large"] = SEQUENCER2D_ARCHS["l"]


class BiLSTM2D(nn.Module):
    """BiLSTM2D token mixer: a bidirectional LSTM down every column (vertical) and one along every row
    (horizontal), outputs concatenated (4 x hidden channels) and fused by a linear layer back to ``dim``.

    Args:
        dim: channels C of the input.
        hidden_size: LSTM hidden size per direction (the paper: C / 4, so the concatenation has C channels).

    Shapes: forward(x: (B, H, W, C)) -> (B, H, W, C).
    """

    def __init__(self, dim: int, hidden_size: int) -> None:
        super().__init__()
        self.lstm_v = nn.LSTM(dim, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.lstm_h = nn.LSTM(dim, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(4 * hidden_size, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        # vertical: every column is a sequence of H tokens
        v = x.permute(0, 2, 1, 3).reshape(B * W, H, C)
        v = self.lstm_v(v)[0].reshape(B, W, H, -1).permute(0, 2, 1, 3)
        # horizontal: every row is a sequence of W tokens
        h = self.lstm_h(x.reshape(B * H, W, C))[0].reshape(B, H, W, -1)
        return self.fc(torch.cat([v, h], dim=-1))


class Sequencer2DBlock(nn.Module):
    """LayerNorm -> BiLSTM2D -> residual, LayerNorm -> channel MLP (ratio 3, GELU) -> residual, with DropPath.

    Shapes: forward(x: (B, H, W, C)) -> (B, H, W, C).
    """

    def __init__(self, dim: int, hidden_size: int, mlp_ratio: float = 3.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.rnn_tokens = BiLSTM2D(dim, hidden_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.rnn_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _Downsample(nn.Module):
    """Patch embedding / merging: pad H, W up to multiples of ``patch`` (right / bottom), then a ``patch`` x
    ``patch`` convolution with stride ``patch``. Shapes: (B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C_out)."""

    def __init__(self, in_channels: int, out_channels: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.proj(x).permute(0, 2, 3, 1)


@MODELS.register_module()
class Sequencer2D(BaseModule):
    """Sequencer2D backbone: 4 stages of BiLSTM2D blocks; a 7x7 / stride-7 patch embedding before stage 1, a 2x2
    patch merging before stage 2 and point-wise (1x1) embeddings before stages 3 and 4 (the paper's layout, so
    the output strides are 7, 14, 14, 14).

    Args:
        arch: 's' | 'm' | 'l' (depths [4, 3, 8, 3] / [4, 3, 14, 3] / [8, 8, 16, 4], widths [192, 384, 384, 384])
            or a dict(depths=[...], embed_dims=[...]) with one entry per stage.
        in_channels: input channels.
        patch_sizes: patch edge of the embedding before each stage.
        hidden_ratio: LSTM hidden size per direction as a fraction of the stage width (the paper: 1/4).
        mlp_ratio: channel-MLP expansion (the paper: 3).
        drop_path_rate: stochastic depth, linearly increasing over all blocks from 0 to this value.
        out_indices: stages (0..3) whose outputs are returned, each after its own LayerNorm.
        with_cp: activation checkpointing per block.
        init_cfg: mmengine init config (e.g. dict(type='Pretrained', checkpoint=...)).

    Shapes: forward(x: (B, in_channels, H, W)) -> tuple of (B, embed_dims[i], H_i, W_i) for i in out_indices,
    with H_i = ceil(H / prod(patch_sizes[:i + 1])) (inputs are padded at the right / bottom when needed).
    """

    def __init__(self, arch: Union[str, dict] = "s", in_channels: int = 3,
                 patch_sizes: Sequence[int] = (7, 2, 1, 1), hidden_ratio: float = 0.25, mlp_ratio: float = 3.0,
                 drop_path_rate: float = 0.0, out_indices: Sequence[int] = (0, 1, 2, 3), with_cp: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if isinstance(arch, str):
            if arch.lower() not in SEQUENCER2D_ARCHS:
                raise ValueError(f"arch must be one of {sorted(SEQUENCER2D_ARCHS)} or a dict, got {arch!r}")
            arch = SEQUENCER2D_ARCHS[arch.lower()]
        if not isinstance(arch, dict) or not {"depths", "embed_dims"} <= set(arch):
            raise ValueError(f"an arch dict needs 'depths' and 'embed_dims', got {arch!r}")
        depths, dims = [int(d) for d in arch["depths"]], [int(c) for c in arch["embed_dims"]]
        num_stages = len(depths)
        if len(dims) != num_stages or len(patch_sizes) != num_stages:
            raise ValueError(f"depths {depths}, embed_dims {dims} and patch_sizes {list(patch_sizes)} must have "
                             "one entry per stage")
        if any(int(round(c * hidden_ratio)) < 1 for c in dims):
            raise ValueError(f"hidden_ratio {hidden_ratio} gives an empty LSTM for widths {dims}")
        out_indices = tuple(int(i) % num_stages if int(i) < 0 else int(i) for i in out_indices)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must index the {num_stages} stages, got {out_indices}")
        self.depths, self.embed_dims, self.patch_sizes = depths, dims, [int(p) for p in patch_sizes]
        self.in_channels = in_channels
        self.out_indices = out_indices
        self.with_cp = with_cp

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev, k = in_channels, 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            self.downsamples.append(_Downsample(prev, dim, self.patch_sizes[i]))
            hidden = int(round(dim * hidden_ratio))
            self.stages.append(nn.Sequential(*[
                Sequencer2DBlock(dim, hidden, mlp_ratio, dpr[k + j]) for j in range(depth)]))
            prev, k = dim, k + depth
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i], eps=1e-6))

    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) linear layers, LayerNorm (1, 0), PyTorch's default LSTM and conv init;
        an ``init_cfg`` (e.g. Pretrained) is applied by mmengine on top."""
        if self.init_cfg is None:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        super().init_weights()

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        check_input(x, 2, self.in_channels, "Sequencer2D")
        outs = []
        for i, (down, stage) in enumerate(zip(self.downsamples, self.stages)):
            x = down(x)  # (B, H_i, W_i, C_i), channels last inside the stage
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False) if (self.with_cp and x.requires_grad) else block(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            x = x.permute(0, 3, 1, 2)
        return tuple(outs)
