"""LambdaNetworks (Bello, ICLR 2021, arXiv 2102.08602): the lambda layer and a LambdaResNet backbone for mmseg.

A lambda layer summarises its context into small linear functions ("lambdas") and applies them to each query,
so it never builds an attention map:

* queries Q = BN(X W_Q), |h| heads of |k| channels; keys K = X W_K and values V = BN(X W_V), each with an
  intra-depth |u|; the keys are softmax-normalised over the context positions;
* content lambda (shared by all queries): lambda_c = sum_m softmax(K)_m V_m^T, a |k| x |v| matrix;
* positional lambdas (one per query position n): lambda_p(n) = sum_{m in the r x r window around n} E(n - m) V_m^T,
  computed as the paper's *lambda convolution*: a 3-D convolution over (v, height, width) with a (1, r, r)
  kernel, |u| input and |k| output channels, whose weights are the relative position embeddings E. Memory is
  O(|k| |v| n), linear in the number of positions n;
* output y_n = (lambda_c + lambda_p(n))^T q_n per head, concatenated over the |h| heads (d = |h| |v|).

LambdaResNet is mmseg's ResNet (deep stem, ResNet-V1c, as mmseg's segmentation configs use) with the 3x3
convolution (``conv2``) of every bottleneck in the chosen stages replaced by a lambda layer; by default the
c4 and c5 stages (the paper's hybrid "C -> C -> L -> L", its speed/accuracy compromise for ResNet-50). A lambda
layer in a strided block is followed by a 3x3 average pooling with that stride, so feature sizes are ResNet's.

Why vilseg writes it itself: no mmseg backbone exists; timm's ``LambdaLayer`` fixes |u| = 1, lives in timm's
own ResNet family (lambda_resnet50ts is not the paper's placement), and ``pip install timm`` pulls a torchvision
that replaces vilseg's pinned torch. Here the ResNet is mmseg's own and only ``conv2`` is swapped.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from mmseg.models.backbones import ResNet
from mmseg.models.backbones.resnet import Bottleneck
from mmseg.registry import MODELS
from torch import Tensor, nn

from vilseg.models.layers.checks import check_input

__all__ = ["LambdaLayer", "LambdaResNet"]


@MODELS.register_module()
class LambdaLayer(nn.Module):
    """Multi-query lambda layer with content and local positional lambdas (lambda convolution).

    Args:
        in_channels: input channels.
        out_channels: output channels d (a multiple of ``heads``; |v| = d / heads).
        dim_k: query / key depth |k| (the paper: 16).
        heads: number of query heads |h| (the paper: 4).
        dim_u: intra-depth |u| (the paper: 1, or 4 with local contexts).
        r: edge of the local context of the positional lambdas (odd; the paper: 23).
        stride: spatial stride; >1 adds a 3x3 average pooling with this stride after the layer.
        dilation: dilation of the positional window (a r x r window with holes), for dilated ResNets.
        kernel_size, padding, bias: accepted and ignored, so it takes a 3x3 convolution's arguments.

    Shapes: forward(x: (B, in_channels, H, W)) -> (B, out_channels, H', W'), H' = H when stride is 1, else
    floor((H - 1) / stride) + 1 (as a 3x3 convolution with padding 1).
    """

    def __init__(self, in_channels: int, out_channels: int, dim_k: int = 16, heads: int = 4, dim_u: int = 1,
                 r: int = 23, stride: int = 1, dilation: int = 1, kernel_size: Optional[int] = None,
                 padding: Optional[int] = None, bias: bool = False) -> None:
        super().__init__()
        if out_channels % heads:
            raise ValueError(f"out_channels ({out_channels}) must be a multiple of heads ({heads})")
        if r < 1 or r % 2 == 0:
            raise ValueError(f"r (the positional context edge) must be a positive odd number, got {r}")
        if min(dim_k, heads, dim_u, stride, dilation) < 1:
            raise ValueError("dim_k, heads, dim_u, stride and dilation must be >= 1, got "
                             f"{dim_k}, {heads}, {dim_u}, {stride}, {dilation}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dim_k, self.heads, self.dim_u, self.r = dim_k, heads, dim_u, r
        self.dim_v = out_channels // heads
        self.stride, self.dilation = stride, dilation
        self.to_q = nn.Conv2d(in_channels, dim_k * heads, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(dim_k * heads)
        self.to_k = nn.Conv2d(in_channels, dim_k * dim_u, 1, bias=False)
        self.to_v = nn.Conv2d(in_channels, self.dim_v * dim_u, 1, bias=False)
        self.norm_v = nn.BatchNorm2d(self.dim_v * dim_u)
        # the lambda convolution: (B, u, v, H, W) -> (B, k, v, H, W); its weights are the embeddings E (k, u, r, r)
        pad = dilation * (r // 2)
        self.pos_conv = nn.Conv3d(dim_u, dim_k, (1, r, r), padding=(0, pad, pad), dilation=(1, dilation, dilation),
                                  bias=False)
        self.pool = nn.AvgPool2d(3, stride, 1) if stride > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        n, k, u, v, h = H * W, self.dim_k, self.dim_u, self.dim_v, self.heads
        q = self.norm_q(self.to_q(x)).reshape(B, h, k, n)
        keys = self.to_k(x).reshape(B, k, u, n).softmax(dim=-1)   # normalised over the context positions
        vals = self.norm_v(self.to_v(x)).reshape(B, v, u, n)
        content = torch.einsum("bkum,bvum->bkv", keys, vals)                              # (B, k, v)
        position = self.pos_conv(vals.permute(0, 2, 1, 3).reshape(B, u, v, H, W))          # (B, k, v, H, W)
        y = torch.einsum("bhkn,bkv->bhvn", q, content) + \
            torch.einsum("bhkn,bkvn->bhvn", q, position.reshape(B, k, v, n))
        return self.pool(y.reshape(B, h * v, H, W))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, dim_k={self.dim_k}, heads={self.heads}, "
                f"dim_u={self.dim_u}, r={self.r}, stride={self.stride}, dilation={self.dilation}")


@MODELS.register_module()
class LambdaResNet(ResNet):
    """mmseg ResNet whose bottleneck 3x3 convolutions in ``lambda_stages`` are lambda layers.

    Args:
        depth: 50, 101 or 152 (bottleneck ResNets; the lambda layer replaces the bottleneck's 3x3 conv).
        lambda_stages: one bool per stage; default (False, False, True, True) = lambda layers in c4 and c5.
        lambda_cfg: LambdaLayer arguments (default dim_k=16, heads=4, dim_u=1, r=23).
        deep_stem, avg_down: ResNet stem / shortcut options (defaults: ResNet-V1c, mmseg's segmentation ResNet;
            avg_down=True gives ResNet-D).
        **kwargs: every other argument of mmseg's ``ResNet`` (strides, dilations, out_indices, norm_cfg,
            norm_eval, with_cp, frozen_stages, init_cfg, ...).

    Shapes: forward(x: (B, in_channels, H, W)) -> tuple of (B, 256 * 2**i, H / 2**(i+2), W / 2**(i+2)) for i in
    out_indices (ResNet's sizes; any H, W).
    """

    def __init__(self, depth: int = 50, lambda_stages: Sequence[bool] = (False, False, True, True),
                 lambda_cfg: Optional[dict] = None, deep_stem: bool = True, avg_down: bool = False,
                 **kwargs) -> None:
        if depth not in (50, 101, 152):
            raise ValueError(f"LambdaResNet needs a bottleneck ResNet: depth 50, 101 or 152, got {depth}")
        super().__init__(depth=depth, deep_stem=deep_stem, avg_down=avg_down, **kwargs)
        if len(lambda_stages) != self.num_stages:
            raise ValueError(f"lambda_stages needs one bool per stage ({self.num_stages}), got {list(lambda_stages)}")
        cfg = dict(dim_k=16, heads=4, dim_u=1, r=23)
        cfg.update(lambda_cfg or {})
        self.lambda_stages = tuple(bool(s) for s in lambda_stages)
        self.lambda_cfg = cfg
        for i, use in enumerate(self.lambda_stages):
            if not use:
                continue
            for block in getattr(self, self.res_layers[i]):
                assert isinstance(block, Bottleneck)
                conv = block.conv2
                block.conv2 = LambdaLayer(conv.in_channels, conv.out_channels, stride=block.conv2_stride,
                                          dilation=block.dilation, **cfg)
        self._freeze_stages()  # again: frozen lambda stages must freeze the new layers too

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        check_input(x, 2, None, "LambdaResNet")
        return tuple(super().forward(x))
