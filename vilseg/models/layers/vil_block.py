"""The ViL (Vision-LSTM v2) block: one implementation for 2D patch grids and 3D voxel-patch grids.

vilseg writes this block itself (no maintained package ships it): it follows the public ViL v2 design
(pre-LayerNorm, x2 up-projection into an mLSTM branch and a gate branch z, depthwise grid convolution + SiLU before
q/k, block-diagonal q/k/v projections with 4x4 blocks, input/forget gates from [q, k, v], multi-head output norm,
learnable skip, SiLU(z) gating, down-projection, DropPath), but routes the cell through vilseg's linear-memory
kernels (:mod:`vilseg.ops.mlstm`) and computes the grid convolution from the actual input grid.

Tokens are (B, S, D) with S = prod(grid_size) in row-major order over the grid. A block with direction
``rowwise_from_bot_right`` flips the sequence before and after its layer, i.e. it reads the grid from the last
token to the first.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from vilseg.ops.mlstm import (MLSTM_KERNELS, ChunkwiseRecord, chunkwise_mlstm, mlstm, native_chunkwise_supported,
                              resolve_kernel)
from vilseg.ops.vil_layer import (InnerWeights, conv_silu, fold_gate_weights, fold_gate_weights_backward,
                                  fused_ops_built, fused_ops_supported, gated_head_norm, inner_tile_backward,
                                  inner_tile_forward, mlstm_cell_inputs, tile_fits_chunks)

__all__ = ["BlockDiagonalLinear", "block_diagonal_heads", "GridConv", "MultiHeadNorm", "MatrixLSTMCell", "ViLLayer",
           "ViLBlock", "ViLBlockPair", "DIRECTIONS"]

DIRECTIONS = ("rowwise_from_top_left", "rowwise_from_bot_right")
# layer_recompute=None recomputes from this many tokens on (a 512^2 crop at patch 16): below it the activations are
# small and recomputing only costs time; from it on it keeps a ViL segmentor's resident memory below a DeiT's
# (benchmarks/results/vil_speed.md)
LAYER_RECOMPUTE_MIN_TOKENS = 1024
# default tile sizes of ViLLayer: the inner part of a long layer runs in tiles of about this many tokens (whole rows of
# the grid), without autograd from twice this many tokens on, and in recomputing training from this many on (a
# sequence shorter than twice the tile is one tile on the native operators, two halves on the autograd tiles): every
# temporary then stays cache-sized and is reused by the allocator, where activation-sized ones cost their page faults
# and memory traffic. The autograd tiles keep two halves at the 512^2 crop: one tile held more than a DeiT's resident
# memory there; the native tiles, without autograd's temporaries, hold no more as one tile and take less time; beyond,
# training tiles of 1,024 tokens take less time than 512 with no more memory (benchmarks/results/vil_speed*.md)
INFERENCE_TILE_TOKENS = 1024
TRAINING_TILE_TOKENS = 1024
# ... and an inference tile holds at least this many rows: each tile's up-projection also covers the halo rows its
# grid convolution reads, so thin tiles of long rows (2048^2 at patch 16: 8 rows of 128 tokens) would spend a quarter
# of that projection on halo rows (benchmarks/results/vil_tiles.md)
INFERENCE_TILE_MIN_ROWS = 16
# keep_kernel_output=None keeps the kernel's output for the recompute up to this many tokens (a 1024^2 image at patch
# 16): there it saves time; beyond it saved none, and the memory it costs matters most there
# (benchmarks/results/kernel_replay.md)
KEEP_KERNEL_OUTPUT_MAX_TOKENS = 4096
# ... and its weighted intra-chunk scores with it up to this many tokens (a 512^2 crop): there handing them to the
# kernel's backward saved a few percent of a layer's step, at 4,096 tokens nothing measurable for as much memory
# (benchmarks/results/layer_revisions_kept_scores.md)
KEEP_KERNEL_SCORES_MAX_TOKENS = 1024


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _keeps_graph(*tensors: Tensor) -> bool:
    """Whether autograd records operations on these tensors: if not, a layer may work in place on its own
    temporaries."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _small_init_(param: Tensor, dim: int) -> None:
    # "Transformers without Tears" init, as in xLSTM/ViL.
    nn.init.normal_(param, mean=0.0, std=math.sqrt(2 / (5 * dim)))


class BlockDiagonalLinear(nn.Module):
    """Linear map with a block-diagonal weight: ``dim // block_size`` independent (block_size x block_size) maps.

    Weight layout (num_blocks, out, in), as in the public ViL checkpoints. Input/output (..., dim).
    """

    def __init__(self, dim: int, block_size: int = 4, bias: bool = True) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim ({dim}) must be divisible by block_size ({block_size})")
        self.dim, self.num_blocks = dim, dim // block_size
        self.weight = nn.Parameter(torch.empty(self.num_blocks, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        # a batched matmul over the blocks (blocks x tokens x block size), on a strided view of x: no copy in
        shape = x.shape
        xs = x.reshape(-1, self.num_blocks, self.weight.shape[-1]).transpose(0, 1)
        weight = self.weight.transpose(1, 2)
        if self.bias is None:
            y = torch.bmm(xs, weight)
        else:
            y = torch.baddbmm(self.bias.view(self.num_blocks, 1, -1), xs, weight)
        return y.transpose(0, 1).reshape(shape)


# 4 x 4 blocks are applied in dense groups of this many blocks (16 x 16 for ViL): a batched matmul over 4 x 4
# blocks is memory-bound, a dense matmul per head does dim / (NH * 4) times the blocks' multiply-adds; groups of a
# few blocks do 4x the multiply-adds in GEMMs that are still well-shaped (benchmarks/results/qkv_groups.md)
QKV_GROUP_BLOCKS = 4


def block_diagonal_heads(x: Tensor, projs: Sequence[BlockDiagonalLinear], num_heads: int) -> List[Tensor]:
    """Block-diagonal projections of one input x (B, S, dim), each straight into a kernel's head layout
    (B, num_heads, S, dim // num_heads).

    The blocks are applied in dense groups of ``QKV_GROUP_BLOCKS`` blocks (:func:`head_weights`), one batched
    matmul over the groups for all projections of one input together; blocks and groups never straddle heads.
    """
    return apply_head_weights(x, [head_weights(proj, num_heads) for proj in projs], num_heads)


def head_weights(proj: BlockDiagonalLinear, num_heads: int,
                 group_blocks: int = QKV_GROUP_BLOCKS) -> Tuple[Tensor, Optional[Tensor]]:
    """A block-diagonal projection as dense weights of groups of ``group_blocks`` consecutive blocks within a head
    (G, GS, GS) (group, in, out) and bias (G, 1, GS) or None, for :func:`apply_head_weights`. A head whose block
    count ``group_blocks`` does not divide is one group."""
    nb, bs = proj.num_blocks, proj.weight.shape[-1]
    if nb % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide the {nb} blocks of a projection of dim {proj.dim}")
    nbh = nb // num_heads
    g = group_blocks if 0 < group_blocks <= nbh and nbh % group_blocks == 0 else nbh
    blocks = proj.weight.view(nb // g, g, bs, bs).transpose(-1, -2)  # (group, block, in, out)
    eye = torch.eye(g, dtype=blocks.dtype, device=blocks.device)
    weight = torch.einsum("gjio,jk->gjiko", blocks, eye).reshape(nb // g, g * bs, g * bs)
    return weight, None if proj.bias is None else proj.bias.view(nb // g, 1, g * bs)


def apply_head_weights(x: Tensor, weights: Sequence[Tuple[Tensor, Optional[Tensor]]],
                       num_heads: int) -> List[Tensor]:
    """x (B, S, dim) through each (weight (G, GS, GS), bias) of :func:`head_weights` -> list of contiguous
    (B, num_heads, S, dim // num_heads). Several weights run as one batched matmul (their outputs side by side)."""
    B, S, dim = x.shape
    G, GS = weights[0][0].shape[:2]
    if G * GS != dim or G % num_heads:
        raise ValueError(f"input dim {dim} does not fit {G} groups of {GS} channels in {num_heads} heads")
    xg = x.reshape(B * S, G, GS).transpose(0, 1)
    if len(weights) == 1:
        weight, bias = weights[0]
    else:
        weight = torch.cat([w for w, _ in weights], dim=-1)
        bias = None if weights[0][1] is None else torch.cat([b for _, b in weights], dim=-1)
    y = torch.bmm(xg, weight) if bias is None else torch.baddbmm(bias, xg, weight)  # (G, B S, n GS)
    # (head, group in head, B, S, n, GS) -> n x (B, head, S, group in head, GS)
    y = y.view(num_heads, G // num_heads, B, S, len(weights), GS).permute(4, 2, 0, 3, 1, 5)
    return [t.contiguous() for t in y.reshape(len(weights), B, num_heads, S, dim // num_heads).unbind(0)]


class GridConv(nn.Module):
    """Depthwise convolution over the token grid (2D: k x k, 3D: k x k x k), 'same' padding.

    forward(x: (B, S, C), grid_size: (H, W) or (D, H, W)) -> (B, S, C). The grid comes from the actual input,
    so one module serves every resolution.
    """

    def __init__(self, channels: int, kernel_size: int = 3, spatial_dims: int = 2, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: Tensor, grid_size: Sequence[int]) -> Tensor:
        B, S, C = x.shape
        # channels-last view of the token sequence: no transpose copies around the convolution, and oneDNN's
        # depthwise convolution is faster in that layout, forward and backward
        dims = len(grid_size)
        x = x.reshape(B, *grid_size, C).permute(0, dims + 1, *range(1, dims + 1))
        y = self.conv(x)
        return y.permute(0, *range(2, dims + 2), 1).reshape(B, S, C)


class MultiHeadNorm(nn.Module):
    """Per-head LayerNorm (a GroupNorm with one group per head) of (B, NH, S, DH) -> (B, S, NH * DH)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, h: Tensor) -> Tensor:
        B, NH, S, DH = h.shape
        # a LayerNorm over each head's channels in the kernel's (B, NH, S, DH) layout: equal to a GroupNorm over
        # (B * S, NH * DH) but without its transpose copy and with a faster backward
        h = F.layer_norm(h, (DH,), eps=self.eps)
        weight = self.weight.to(h.dtype).view(NH, 1, DH)
        bias = None if self.bias is None else self.bias.to(h.dtype).view(NH, 1, DH)
        if _keeps_graph(h, self.weight):
            h = h * weight if bias is None else torch.addcmul(bias, h, weight)
            return h.transpose(1, 2).reshape(B, S, NH * DH)
        # no autograd: the affine part writes straight into the (B, S, NH * DH) layout (one pass, no copy after it)
        out = h.new_empty(B, S, NH, DH)
        if bias is None:
            torch.mul(h, weight, out=out.permute(0, 2, 1, 3))
        else:
            torch.addcmul(bias, h, weight, out=out.permute(0, 2, 1, 3))
        return out.view(B, S, NH * DH)


class MatrixLSTMCell(nn.Module):
    """mLSTM cell: the input/forget gates (linear in [q, k, v]), a vilseg kernel, multi-head output norm.

    forward(q, k, v: (B, NH, S, DH) head-major, igate, fgate: (B, NH, S)) -> (B, S, NH * DH). The gate weights live
    here (``igate``, ``fgate``: Linear(3 dim, NH), as in the public checkpoints); :class:`ViLLayer` folds them into its
    q/k/v projections (:meth:`ViLLayer.gate_preactivations`). ``recompute``: in training, run the kernel again in
    backward instead of keeping its intermediates (see ``vilseg.ops.mlstm.mlstm``); None = off. ``native``: the
    chunkwise kernel in C++ where it applies (``vilseg.ops.mlstm.native_chunkwise_supported``); False: its Python form.
    """

    def __init__(self, dim: int, num_heads: int = 4, norm_bias: bool = True, kernel: str = "auto",
                 chunk_size: int = 64, recompute: Optional[bool] = None, native: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if kernel not in MLSTM_KERNELS:
            raise ValueError(f"kernel must be one of {MLSTM_KERNELS}, got {kernel!r}")
        self.dim, self.num_heads, self.kernel, self.chunk_size = dim, num_heads, kernel, chunk_size
        self.recompute, self.native = recompute, native
        self.igate = nn.Linear(3 * dim, num_heads)
        self.fgate = nn.Linear(3 * dim, num_heads)
        self.outnorm = MultiHeadNorm(dim, num_heads, bias=norm_bias)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():  # forget-gate bias linearly spaced in [3, 6]: long memory at initialisation
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor,
                recompute: Optional[bool] = None) -> Tensor:
        """``recompute`` overrides the cell's setting for this call (the ViL layer turns it off when it recomputes
        the whole inner part itself)."""
        h = mlstm(q, k, v, igate, fgate, kernel=self.kernel, chunk_size=self.chunk_size,
                  recompute=self.recompute if recompute is None else recompute, native=self.native)
        return self.outnorm(h)

    def forward_segment(self, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor,
                        state: Optional[Tuple[Tensor, Tensor, Tensor]], record: Optional[ChunkwiseRecord] = None,
                        return_record: bool = False) -> Tuple:
        """One segment of a longer sequence through the chunkwise kernel, from the state (C, n, m) after the previous
        segment (None: the start) -> (output (B, S, NH * DH), state after this segment), and the kernel's
        :class:`~vilseg.ops.mlstm.ChunkwiseRecord` if ``return_record``. ``record``: the kernel's record of an
        earlier call on the same inputs, replayed instead of computed again (see ``chunkwise_mlstm``)."""
        out = chunkwise_mlstm(q, k, v, igate, fgate, chunk_size=self.chunk_size, initial_state=state,
                              return_state=True, record=record, return_record=return_record, native=self.native)
        return (self.outnorm(out[0]), *out[1:])


class ViLLayer(nn.Module):
    """The mLSTM layer of a ViL block (without the pre-norm and residual). (B, S, dim) -> (B, S, dim).

    ``layer_recompute`` (training only): keep for backward only the up-projection's output and the down-projection's
    input, and run everything between them (grid conv, q/k/v, gates, mLSTM kernel, output norm, gating) again in
    backward. Selective recomputation (Korthikanti et al. 2022): those ops are cheap next to the projections but
    hold most of the block's activations. Exact. None (default): from ``LAYER_RECOMPUTE_MIN_TOKENS`` tokens on.

    From twice ``inference_tile_tokens`` tokens on in inference and from ``training_tile_tokens`` tokens on in
    recomputing training (chunkwise kernel, not under torch.compile), the inner part runs in tiles of about that
    many tokens (whole grid rows; in inference at least ``INFERENCE_TILE_MIN_ROWS`` rows; in training a sequence
    shorter than twice the tile is one tile on the native operators and two halves otherwise,
    :meth:`_training_tile_tokens`), with halo rows for the grid
    convolution and the mLSTM state carried from tile to tile: without autograd the whole layer does
    (:meth:`_forward_tiled`), in recomputing training forward and recompute do (:class:`_TiledInnerRecompute`).
    Same results; temporaries of tile size instead of activation size. 0 never tiles.

    ``keep_kernel_output`` (tiled recomputing training): keep each tile's mLSTM kernel record (its output and three
    numbers per token and head: one more (B, S, inner) fp32 tensor per layer until backward), so that backward's
    recompute replays it instead of running the kernel's intra-chunk forward again; on the native tiles also the conv
    branch's output (another (B, S, inner) tensor), the kernel's chunk states (a DH x DH matrix per chunk and
    head: as much as DH / chunk_size such tensors, 1.5 in ViL-T) and its weighted intra-chunk scores (chunk_size
    numbers per token and head: chunk_size / DH such tensors, 0.67 in ViL-T), which backward then does not compute
    again.
    False: keep less, compute more. None (default): up to ``KEEP_KERNEL_OUTPUT_MAX_TOKENS`` tokens, the scores up to
    ``KEEP_KERNEL_SCORES_MAX_TOKENS``.

    Under ``torch.compile`` (:class:`ViLBlock`'s ``compile_layers``) the layer never tiles: the compiler fuses the
    untiled inner part, and its recompute runs as torch's checkpoint inside the compiled graph.

    ``fused_ops`` (eager CPU, float32 / float64, 2D grids): run the grid conv + SiLU, the q/k/v projections and gates
    and the output norm + skip + gate as vilseg's fused native operators (:mod:`vilseg.ops.vil_layer`) instead of
    chains of PyTorch operators; same results up to rounding. None (default): wherever they apply and the extension
    is built; True: the same, but an error at construction if the extension is not built; False: never, and the
    chunkwise kernel runs its Python form too (it runs in C++ on CPU float32 / float64 otherwise, 3D grids included).
    """

    def __init__(self, dim: int, direction: str = "rowwise_from_top_left", spatial_dims: int = 2,
                 expansion: int = 2, qkv_block_size: int = 4, num_heads: int = 4, conv_kernel_size: int = 3,
                 proj_bias: bool = True, norm_bias: bool = True, kernel: str = "auto", chunk_size: int = 64,
                 layer_recompute: Optional[bool] = None,
                 inference_tile_tokens: int = INFERENCE_TILE_TOKENS,
                 training_tile_tokens: int = TRAINING_TILE_TOKENS,
                 keep_kernel_output: Optional[bool] = None, fused_ops: Optional[bool] = None) -> None:
        super().__init__()
        if fused_ops not in (None, True, False):
            raise ValueError(f"fused_ops must be None, True or False, got {fused_ops!r}")
        if fused_ops and not fused_ops_built():
            raise ValueError("fused_ops=True: vilseg's native extension vilseg.ops._native is not built (`make "
                             "install` builds it; it needs a C++ compiler); set fused_ops=None or False to run the "
                             "layer with PyTorch operators")
        self.fused_ops = fused_ops
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        for name, value in (("inference_tile_tokens", inference_tile_tokens),
                            ("training_tile_tokens", training_tile_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: never tile), got {value!r}")
        self.inference_tile_tokens, self.training_tile_tokens = inference_tile_tokens, training_tile_tokens
        if keep_kernel_output not in (None, True, False):
            raise ValueError(f"keep_kernel_output must be None, True or False, got {keep_kernel_output!r}")
        self.keep_kernel_output = keep_kernel_output
        self.qkv_group_blocks = QKV_GROUP_BLOCKS  # see head_weights; an attribute for benchmarks/qkv_groups.py
        self.inference_tile_min_rows = INFERENCE_TILE_MIN_ROWS  # an attribute for benchmarks/vil_tiles.py
        self.direction, self.layer_recompute = direction, layer_recompute
        inner = expansion * dim
        self.proj_up = nn.Linear(dim, 2 * inner, bias=proj_bias)
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.conv = GridConv(inner, conv_kernel_size, spatial_dims)
        self.mlstm_cell = MatrixLSTMCell(inner, num_heads, norm_bias=norm_bias, kernel=kernel, chunk_size=chunk_size,
                                         native=fused_ops is not False)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim, bias=proj_bias)
        _small_init_(self.proj_up.weight, dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _small_init_(proj.weight, dim)
        nn.init.normal_(self.proj_down.weight, std=2 / math.sqrt(dim))  # "wang" init with one block
        for lin in (self.proj_up, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, grid_size: Sequence[int], recompute: Optional[bool] = None) -> Tensor:
        """``recompute`` overrides ``layer_recompute`` for this call (None: the layer's own setting)."""
        grid_size = tuple(grid_size)
        if self.tiles_inference(x, grid_size):
            return self._forward_tiled(x, grid_size)
        flip = self.direction == "rowwise_from_bot_right"
        if flip:  # reversing the flattened sequence == reversing every grid axis, so the grid conv stays valid
            x = x.flip(1)
        up = self.proj_up(x)
        params = self._inner_parameters()
        recompute = self._recompute(x.shape[1]) if recompute is None else recompute
        if recompute and torch.is_grad_enabled() and (up.requires_grad or any(p.requires_grad for p in params)):
            seq_len = x.shape[1]
            tile = self._training_tile_tokens(seq_len, self._native_tiles(up, seq_len))
            if self._tileable(seq_len, grid_size, tile, min_tiles=1 if tile == seq_len else 2):
                h = _TiledInnerRecompute.apply(self, up, grid_size, tile, *params)
            else:  # the cell must not checkpoint its kernel again inside this checkpoint (it would run three times)
                h = checkpoint(ViLLayer._inner, self, up, grid_size, False, use_reentrant=False)
        else:
            h = self._inner(up, grid_size)
        x = self.proj_down(h)
        return x.flip(1) if flip else x

    def tiles_inference(self, x: Tensor, grid_size: Tuple[int, ...], *more: Tensor) -> bool:
        """Whether the layer runs x (B, S, dim) tile by tile without autograd (:meth:`_forward_tiled`): nothing
        records a graph (on x, the layer's parameters or ``more``) and the sequence holds at least two inference
        tiles."""
        return (self._tileable(x.shape[1], grid_size, self.inference_tile_tokens)
                and not _keeps_graph(x, *self.parameters(), *more))

    def _inner_parameters(self) -> List[nn.Parameter]:
        """The parameters of the inner part (everything between the up- and the down-projection)."""
        return [p for _, p in self._inner_named_parameters()]

    def _inner_named_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if not name.startswith(("proj_up.", "proj_down."))]

    def _tileable(self, seq_len: int, grid_size: Tuple[int, ...], tile_tokens: int, min_tiles: int = 2) -> bool:
        """Whether the inner part may run in tiles: not under torch.compile, a chunkwise kernel, at least
        ``min_tiles`` tiles of rows."""
        cell = self.mlstm_cell
        return (not torch.compiler.is_compiling() and 0 < min_tiles * tile_tokens <= seq_len
                and grid_size[0] > (2 if min_tiles > 1 else 0)
                and resolve_kernel(cell.kernel, seq_len, cell.chunk_size) == "chunkwise")

    def _training_tile_tokens(self, seq_len: int, native: bool = False) -> int:
        """Tokens per tile of recomputing training: ``training_tile_tokens``; where the sequence holds fewer than
        twice that many, the whole sequence on the native tiles (``native``, :meth:`_native_tiles`) and half of it
        on the autograd tiles; 0 (untiled) below ``training_tile_tokens`` tokens."""
        tile = self.training_tile_tokens
        if not 0 < tile <= seq_len:
            return 0
        return tile if 2 * tile <= seq_len else seq_len if native else seq_len // 2

    def _tile_plan(self, seq_len: int, grid_size: Tuple[int, ...], tile_tokens: int,
                   min_rows: int = 1) -> Tuple[int, List[Tuple[int, int, int, int]]]:
        """Tiles of whole rows (slices of the first grid axis) in reading order: the row length in tokens and, per
        tile, its rows [r0, r1) and the rows [h0, h1) its grid convolution reads (the tile and its halo). A tile
        holds about ``tile_tokens`` tokens but at least ``min_rows`` rows, and a multiple of the chunk size where
        the row length allows, so the chunks are the untiled ones."""
        rows = grid_size[0]
        row_len = seq_len // rows
        chunk = self.mlstm_cell.chunk_size
        tile_rows = max(1, min_rows, tile_tokens // row_len)
        rows_per_chunks = chunk // math.gcd(chunk, row_len)  # fewest rows that fill whole chunks
        if rows_per_chunks <= tile_rows:
            tile_rows -= tile_rows % rows_per_chunks
        halo = self.conv.conv.padding[0]
        plan = []
        for r0 in range(0, rows, tile_rows):
            r1 = min(rows, r0 + tile_rows)
            plan.append((r0, r1, max(0, r0 - halo), min(rows, r1 + halo)))
        return row_len, plan

    def _prepared_weights(self, fused: bool = False) -> Tuple:
        """The per-head q/k/v and the folded gate weights, prepared once per call (for all its tiles); with
        ``fused`` (:meth:`_uses_fused_ops`) only the gate weights (the fused q/k/v read the blocks themselves)."""
        if fused:
            return None, None, self._folded_gate_weights()
        NH = self.mlstm_cell.num_heads
        g = self.qkv_group_blocks
        return ([head_weights(proj, NH, g) for proj in (self.q_proj, self.k_proj)], [head_weights(self.v_proj, NH, g)],
                self._folded_gate_weights())

    def _native_tiles(self, x: Tensor, tile_tokens: int) -> bool:
        """Whether the fused inner part runs tiles of ``tile_tokens`` tokens of x without autograd, forward and
        backward straight on the native operators (:func:`~vilseg.ops.vil_layer.inner_tile_forward`): the fused
        operators and the kernel's C++ form both apply (the latter also means no dispatch mode watches: fake tensors,
        the live-memory tracker and FLOP counters see the autograd tiles) and the tiles are whole chunks."""
        return (self._uses_fused_ops(x) and self.mlstm_cell.native and native_chunkwise_supported(x)
                and tile_fits_chunks(tile_tokens, self.mlstm_cell.chunk_size))

    def _gate_parameters(self) -> Tuple[Tensor, Tensor]:
        """The cell's input and forget gates as one (2 NH, 3 inner) weight and (2 NH) bias, input gates first."""
        cell = self.mlstm_cell
        return (torch.cat([cell.igate.weight, cell.fgate.weight]).detach(),
                torch.cat([cell.igate.bias, cell.fgate.bias]).detach())

    def _inner_weights(self) -> InnerWeights:
        """The inner part's weights for the native tile functions (no autograd), the gate weights folded."""
        cell, projs = self.mlstm_cell, (self.q_proj, self.k_proj, self.v_proj)
        norm = cell.outnorm
        weights, biases = tuple(p.weight.detach() for p in projs), tuple(_detached(p.bias) for p in projs)
        return InnerWeights(self.conv.conv.weight.detach(), _detached(self.conv.conv.bias), weights, biases,
                            fold_gate_weights(weights, biases, *self._gate_parameters()), _detached(norm.weight),
                            _detached(norm.bias), norm.eps, self.learnable_skip.detach(), cell.num_heads,
                            cell.chunk_size)

    def _inner_weight_gradients(self, grads: dict, weights: InnerWeights) -> dict:
        """Parameter name -> gradient, from the gradients ``grads`` of :func:`inner_tile_backward`'s ``weights``
        summed over the tiles (the folded gate weights' taken back through the fold)."""
        unfolded = fold_gate_weights_backward(grads["gate_weights"], weights.proj_weights, weights.proj_biases,
                                              self._gate_parameters()[0])
        NH = self.mlstm_cell.num_heads
        out = {"conv.conv.weight": grads["conv_weight"], "conv.conv.bias": grads["conv_bias"],
               "mlstm_cell.outnorm.weight": grads["norm_weight"], "mlstm_cell.outnorm.bias": grads["norm_bias"],
               "learnable_skip": grads["skip"]}
        for gate, rows in (("igate", slice(0, NH)), ("fgate", slice(NH, 2 * NH))):  # (own tensors, not views)
            out[f"mlstm_cell.{gate}.weight"] = unfolded["gate_weight"][rows].clone()
            out[f"mlstm_cell.{gate}.bias"] = unfolded["gate_bias"][rows].clone()
        for name, direct, through_gates in zip(("q_proj", "k_proj", "v_proj"), grads["proj_weights"],
                                               unfolded["proj_weights"]):
            out[f"{name}.weight"] = direct.add_(through_gates)
        for name, direct, through_gates in zip(("q_proj", "k_proj", "v_proj"), grads["proj_biases"],
                                               unfolded["proj_biases"]):
            out[f"{name}.bias"] = None if direct is None else direct.add_(through_gates)
        return out

    def _uses_fused_ops(self, x: Tensor) -> bool:
        """Whether the inner part runs on the fused native operators for input x (see ``fused_ops``)."""
        return (self.fused_ops is not False and self.conv.spatial_dims == 2 and self.q_proj.weight.shape[-1] == 4
                and (self.mlstm_cell.dim // self.mlstm_cell.num_heads) % 4 == 0
                and fused_ops_supported(x, self.learnable_skip))

    def _fused_inner(self, x_mlstm: Tensor, z: Tensor, grid_size: Tuple[int, ...], own: slice,
                     gate_weights: Tuple[Tensor, Tensor, Tensor], kernel: Callable) -> Tuple:
        """The inner part on the fused operators: the mLSTM half of the up-projection on a grid (B, H * W, inner),
        the gate half on the tokens ``own`` (whole rows) of it -> (gated cell output (B, T, inner), *whatever
        ``kernel`` (q, k, v, igate, fgate -> (h, ...)) returned after h)."""
        row_len = grid_size[1]
        conv = self.conv.conv
        x_conv = conv_silu(x_mlstm, conv.weight, conv.bias, grid_size, (own.start // row_len, own.stop // row_len))
        x_own = x_mlstm[:, own]
        projs = (self.q_proj, self.k_proj, self.v_proj)
        h, *rest = kernel(*mlstm_cell_inputs(x_conv, x_own, [p.weight for p in projs], [p.bias for p in projs],
                                             gate_weights, self.mlstm_cell.num_heads))
        norm = self.mlstm_cell.outnorm
        return (gated_head_norm(h, norm.weight, norm.bias, self.learnable_skip, x_conv, z, norm.eps), *rest)

    def _tile(self, x_mlstm: Tensor, z: Tensor, grid_size: Tuple[int, ...], own: slice,
              state: Optional[Tuple[Tensor, ...]], weights: Tuple, z_is_temporary: bool = False,
              record: Optional[ChunkwiseRecord] = None, return_record: bool = False) -> Tuple:
        """The inner part on one tile: the mLSTM half of the up-projection on the tile and its halo rows
        (B, T_halo, inner) on their grid, and the gate half on the tile's own tokens ``own`` (B, T, inner) ->
        (gated cell output of the own tokens (B, T, inner), mLSTM state after the tile[, the kernel's record]).
        Without autograd it works in place on its own temporaries, and on ``z`` if ``z_is_temporary``. ``record``:
        the kernel's record of an earlier run of this tile, replayed."""
        if weights[0] is None:  # prepared for the fused operators
            cell = self.mlstm_cell

            def kernel(*inputs: Tensor) -> Tuple:
                return chunkwise_mlstm(*inputs, chunk_size=cell.chunk_size, initial_state=state, return_state=True,
                                       record=record, return_record=return_record, native=cell.native)

            return self._fused_inner(x_mlstm, z, grid_size, own, weights[2], kernel)
        grad = _keeps_graph(x_mlstm, z, *self._inner_parameters())
        x_conv = F.silu(self.conv(x_mlstm, grid_size)[:, own], inplace=not grad)
        h, *rest = self.mlstm_cell.forward_segment(*self._cell_inputs(x_conv, x_mlstm[:, own], weights), state,
                                                   record=record, return_record=return_record)
        return (self._gated(h, x_conv, z, grad, z_is_temporary=z_is_temporary), *rest)

    def _cell_inputs(self, x_conv: Tensor, x_mlstm: Tensor, weights: Tuple) -> Tuple[Tensor, ...]:
        """q, k, v (B, NH, S, DH) and the gate pre-activations (B, NH, S) from the conv branch and the mLSTM branch,
        with the weights of :meth:`_prepared_weights`."""
        qk_weights, v_weights, gate_weights = weights
        NH = self.mlstm_cell.num_heads
        q, k = apply_head_weights(x_conv, qk_weights, NH)
        (v,) = apply_head_weights(x_mlstm, v_weights, NH)
        return (q, k, v, *self._apply_gate_weights(x_conv, x_mlstm, gate_weights))

    def _gated(self, h: Tensor, x_conv: Tensor, z: Tensor, grad: bool, z_is_temporary: bool) -> Tensor:
        """(cell output + learnable skip of x_conv) * SiLU(z)."""
        if grad:
            return torch.addcmul(h, self.learnable_skip, x_conv) * F.silu(z)
        # no autograd: in place (h is the norm's fresh output, z too where nothing reads it after this); at large
        # grids every fresh activation-sized tensor costs its page faults
        return h.addcmul_(self.learnable_skip, x_conv).mul_(F.silu(z, inplace=z_is_temporary))

    def _forward_tiled(self, x: Tensor, grid_size: Tuple[int, ...]) -> Tensor:
        """The whole layer without autograd, tile by tile (:meth:`_tile_plan`): each tile's up-projection covers its
        halo rows (zero padding only at the grid's own border, as untiled) and the mLSTM carries its state from tile
        to tile, so the result is the untiled layer's up to rounding. The bottom-right direction reads the tiles
        from the end of x, without flipping all of it."""
        B, S, _ = x.shape
        row_len, plan = self._tile_plan(S, grid_size, self.inference_tile_tokens, self.inference_tile_min_rows)
        flip = self.direction == "rowwise_from_bot_right"

        def tokens(r0: int, r1: int) -> slice:  # positions in x of rows [r0, r1) of the reading order
            return slice(S - r1 * row_len, S - r0 * row_len) if flip else slice(r0 * row_len, r1 * row_len)

        # straight on the native operators where they apply (:func:`~vilseg.ops.vil_layer.inner_tile_forward`)
        native = all(self._native_tiles(x, (r1 - r0) * row_len) for r0, r1, _, _ in plan)
        weights = self._inner_weights() if native else self._prepared_weights(self._uses_fused_ops(x))
        out, state = None, None
        for r0, r1, h0, h1 in plan:
            x_tile = x[:, tokens(h0, h1)]
            x_mlstm, z = self.proj_up(x_tile.flip(1) if flip else x_tile).chunk(2, dim=-1)
            own = slice((r0 - h0) * row_len, (r1 - h0) * row_len)
            tile_grid = (h1 - h0, *grid_size[1:])
            if native:
                h, state, _ = inner_tile_forward(x_mlstm, z[:, own], tile_grid, (r0 - h0, r1 - h0), weights, state,
                                                 keep_kernel_record=False)
            else:
                h, state = self._tile(x_mlstm, z[:, own], tile_grid, own, state, weights, z_is_temporary=True)
            y = self.proj_down(h)
            if out is None:  # in the projection's dtype (autocast), as untiled
                out = y.new_empty(B, S, y.shape[-1])
            out[:, tokens(r0, r1)] = y.flip(1) if flip else y
        return out

    def _keeps_kernel_output(self, seq_len: int, scores: bool = False) -> bool:
        """Whether recomputing training keeps the kernel's record (``scores``: its weighted scores too)."""
        if self.keep_kernel_output is not None:
            return bool(self.keep_kernel_output)
        return seq_len <= (KEEP_KERNEL_SCORES_MAX_TOKENS if scores else KEEP_KERNEL_OUTPUT_MAX_TOKENS)

    def _recompute(self, seq_len: int) -> bool:
        if self.layer_recompute is not None:
            return bool(self.layer_recompute)
        return seq_len >= LAYER_RECOMPUTE_MIN_TOKENS

    def _inner(self, up: Tensor, grid_size: Sequence[int], kernel_recompute: Optional[bool] = None) -> Tensor:
        """Up-projection output (B, S, 2 inner) -> gated cell output (B, S, inner), the down-projection's input."""
        x_mlstm, z = up.chunk(2, dim=-1)
        if self._uses_fused_ops(up):
            cell = self.mlstm_cell

            def kernel(*inputs: Tensor) -> Tuple:
                return (mlstm(*inputs, kernel=cell.kernel, chunk_size=cell.chunk_size,
                              recompute=cell.recompute if kernel_recompute is None else kernel_recompute,
                              native=cell.native),)

            return self._fused_inner(x_mlstm, z, tuple(grid_size), slice(0, up.shape[1]),
                                     self._folded_gate_weights(), kernel)[0]
        grad = _keeps_graph(up, *self._inner_parameters())
        x_conv = F.silu(self.conv(x_mlstm, grid_size), inplace=not grad)
        h = self.mlstm_cell(*self._cell_inputs(x_conv, x_mlstm, self._prepared_weights()), recompute=kernel_recompute)
        return self._gated(h, x_conv, z, grad, z_is_temporary=True)  # up: the fresh up-projection output

    def gate_preactivations(self, x_conv: Tensor, x_mlstm: Tensor) -> Tuple[Tensor, Tensor]:
        """Input and forget gate pre-activations (B, NH, S) each, = Linear([q, k, v]) of the cell.

        q, k, v are linear in (x_conv, x_mlstm), so the gate weights are folded into the q/k/v projections first
        (a few thousand multiply-adds on the weights): the gates are then two thin matmuls on the layer's inputs,
        with no (B, S, 3 inner) concatenation and no product per head."""
        return self._apply_gate_weights(x_conv, x_mlstm, self._folded_gate_weights())

    def _folded_gate_weights(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The gate weights folded into the projections: on x_conv (inner, 2 NH), on x_mlstm (inner, 2 NH), bias
        (2 NH); input gates first."""
        cell = self.mlstm_cell
        NH, dim = cell.num_heads, cell.dim
        weight = torch.cat([cell.igate.weight, cell.fgate.weight])  # (2 NH, 3 inner): [q, k, v] columns
        bias = torch.cat([cell.igate.bias, cell.fgate.bias])
        folded = []
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), weight.split(dim, dim=1)):
            w = w.reshape(2 * NH, proj.num_blocks, -1)  # (gate, block, out)
            folded.append(torch.einsum("boi,gbo->big", proj.weight, w).reshape(dim, 2 * NH))
            if proj.bias is not None:
                bias = bias + w.flatten(1) @ proj.bias
        return folded[0] + folded[1], folded[2], bias

    def _apply_gate_weights(self, x_conv: Tensor, x_mlstm: Tensor,
                            weights: Tuple[Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        w_conv, w_mlstm, bias = weights
        B, S, dim = x_conv.shape
        NH = self.mlstm_cell.num_heads
        # computed transposed, (2 NH, B S) = W^T x^T: with only 2 NH output columns the BLAS runs the product and
        # both of its backward products about 3x faster in this orientation (the weights row-major, or autograd
        # computes their gradient in the slow one), and it is the kernel's gate layout
        gates = torch.addmm(bias.to(x_conv.dtype).unsqueeze(-1), w_conv.to(x_conv.dtype).t().contiguous(),
                            x_conv.reshape(B * S, dim).t())
        gates = torch.addmm(gates, w_mlstm.to(x_mlstm.dtype).t().contiguous(), x_mlstm.reshape(B * S, dim).t())
        igate, fgate = gates.view(2 * NH, B, S).transpose(0, 1).split(NH, dim=1)
        return igate, fgate


class _TiledInnerRecompute(torch.autograd.Function):
    """A ViL layer's inner part in recomputing training, tile by tile (:meth:`ViLLayer._tile_plan`).

    Forward runs the tiles without autograd and keeps only the up-projection output (B, S, 2 inner), the mLSTM
    state entering each tile and, with the layer's ``keep_kernel_output``, the kernel's record of each tile (its
    output and three numbers per token and head: :class:`~vilseg.ops.mlstm.ChunkwiseRecord`). Backward recomputes
    one tile at a time with autograd, the last first, replaying a kept record instead of running the kernel's
    intra-chunk forward again, and hands the gradient of the state it entered with to the tile before it: the
    gradients of the checkpointed layer, with tile-sized temporaries. The parameter gradients are returned, not
    accumulated here (hooks see them as usual). Where every tile runs on the native operators
    (:meth:`ViLLayer._native_tiles`), forward keeps each tile's output-norm statistics too and backward takes the
    tiles' gradients by hand (:func:`~vilseg.ops.vil_layer.inner_tile_backward`), without autograd.
    """

    @staticmethod
    def forward(ctx, layer: ViLLayer, up: Tensor, grid_size: Tuple[int, ...], tile_tokens: int,
                *params: Tensor) -> Tensor:
        B, S, _ = up.shape
        row_len, plan = layer._tile_plan(S, grid_size, tile_tokens)
        fused = layer._uses_fused_ops(up)
        inner = up.shape[-1] // 2
        # the tiles read a detached alias: a view of `up` made here (autograd off) would still say requires_grad
        # without a grad_fn, which module hooks that track autograd (torch's FlopCounterMode) cannot handle
        up_values = up.detach()
        # without autograd, straight on the native operators where they apply: then backward too (by hand)
        native = fused and all(layer._native_tiles(up, (r1 - r0) * row_len) for r0, r1, _, _ in plan)
        inner_weights = layer._inner_weights() if native else None
        weights = None if native else layer._prepared_weights(fused)
        keep, keep_scores = layer._keeps_kernel_output(S), layer._keeps_kernel_output(S, scores=True)
        h = up.new_empty(B, S, inner) if native else None  # (the native tiles write their rows of it)
        state, entering, records = None, [], []
        for r0, r1, h0, h1 in plan:
            entering.append(state)
            own = slice((r0 - h0) * row_len, (r1 - h0) * row_len)
            x_tile = up_values[:, h0 * row_len:h1 * row_len, :inner]
            z_tile = up_values[:, r0 * row_len:r1 * row_len, inner:]
            tile_grid = (h1 - h0, *grid_size[1:])
            if native:
                _, state, record = inner_tile_forward(x_tile, z_tile, tile_grid, (r0 - h0, r1 - h0), inner_weights,
                                                      state, keep_kernel_record=keep, keep_conv=keep,
                                                      keep_scores=keep_scores, out=h[:, r0 * row_len:r1 * row_len])
            else:
                h_tile, state, *record = layer._tile(x_tile, z_tile, tile_grid, own, state, weights,
                                                     return_record=keep)
                record = record[0] if record else None
                if h is None:
                    h = h_tile.new_empty(B, S, h_tile.shape[-1])
                h[:, r0 * row_len:r1 * row_len] = h_tile
            records.append(record)
        device = up.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.layer, ctx.grid_size, ctx.row_len, ctx.plan, ctx.entering = layer, grid_size, row_len, plan, entering
        ctx.records, ctx.fused, ctx.inner_weights = records, fused, inner_weights
        ctx.save_for_backward(up, *params)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor):
        up, *params = ctx.saved_tensors
        layer, grid_size, row_len = ctx.layer, ctx.grid_size, ctx.row_len
        inner = up.shape[-1] // 2
        d_up = None
        if ctx.needs_input_grad[1]:
            # the gate half is written once per token (tiles' own rows do not overlap); in the mLSTM half a tile
            # writes the rows of its halo range that no later tile reached and adds to the rows a later tile's halo
            # shares (tiles run last first): no zero fill
            d_up = torch.empty_like(up)
        trainable = [i for i, needs in enumerate(ctx.needs_input_grad[4:]) if needs]
        if ctx.inner_weights is not None:
            return _TiledInnerRecompute._native_backward(ctx, dh, up, params, d_up, trainable)
        written_from = ctx.plan[-1][1] * row_len  # d_up's mLSTM half holds gradients from this token on
        d_params: List[Optional[Tensor]] = [None] * len(params)
        d_state = None  # gradient of (C, n) after the current tile
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            # the folded q/k/v and gate weights once, not per tile: every tile's recompute reads detached leaves of
            # them, whose gradients are summed over the tiles and go back to the parameters in one product at the end
            prepared = layer._prepared_weights(ctx.fused)
            prepared_flat, prepared_spec = tree_flatten(prepared)
            leaves = [None if w is None else w.detach().requires_grad_(w.requires_grad) for w in prepared_flat]
            weights = tree_unflatten(leaves, prepared_spec)
            weight_leaves = [j for j, w in enumerate(leaves) if w is not None and w.requires_grad]
            d_weights: List[Optional[Tensor]] = [None] * len(leaves)
            for i in reversed(range(len(ctx.plan))):
                (r0, r1, h0, h1), state, record = ctx.plan[i], ctx.entering[i], ctx.records[i]
                ctx.records[i] = None  # freed as soon as its tile is done
                # the two halves of the tile's up-projection as separate leaves: their gradients go straight into
                # d_up's halves, with no concatenation and no zero-filled gradient for the halo rows' gate half
                halo_rows, own_rows = slice(h0 * row_len, h1 * row_len), slice(r0 * row_len, r1 * row_len)
                x_tile = up[:, halo_rows, :inner].detach().requires_grad_(d_up is not None)
                z_tile = up[:, own_rows, inner:].detach().requires_grad_(d_up is not None)
                if d_up is not None:  # a non-leaf alias: module hooks that track autograd (torch's module
                    x_tile = x_tile.view_as(x_tile)  # tracker, FlopCounterMode) refuse leaves inside autograd.grad
                if state is not None:
                    state = (state[0].detach().requires_grad_(), state[1].detach().requires_grad_(), state[2])
                own = slice((r0 - h0) * row_len, (r1 - h0) * row_len)
                h_tile, (c_out, n_out, _) = layer._tile(x_tile, z_tile, (h1 - h0, *grid_size[1:]), own, state,
                                                        weights, record=record)
                outputs, grads = [h_tile], [dh[:, own_rows]]
                if d_state is not None:
                    outputs += [c_out, n_out]
                    grads += list(d_state)
                inputs = ([x_tile, z_tile] if d_up is not None else []) + (list(state[:2]) if state is not None
                                                                             else [])
                got = torch.autograd.grad(outputs, inputs + [leaves[j] for j in weight_leaves]
                                          + [params[i] for i in trainable], grads, allow_unused=True)
                if d_up is not None:
                    start, split = h0 * row_len, min(h1 * row_len, written_from)
                    d_up[:, start:split, :inner] = got[0][:, :split - start]
                    d_up[:, split:h1 * row_len, :inner] += got[0][:, split - start:]
                    written_from = start
                    d_up[:, own_rows, inner:] = got[1]
                    got = got[2:]
                if state is not None:
                    d_state, got = got[:2], got[2:]
                _accumulate(d_weights, weight_leaves, got[:len(weight_leaves)])
                # the parameters a tile reads directly (conv, norm, skip)
                _accumulate(d_params, trainable, got[len(weight_leaves):])
            reached = [j for j in weight_leaves if d_weights[j] is not None]
            if reached and trainable:
                _accumulate(d_params, trainable, torch.autograd.grad(
                    [prepared_flat[j] for j in reached], [params[i] for i in trainable],
                    [d_weights[j] for j in reached], allow_unused=True))
        return (None, d_up, None, None, *d_params)

    @staticmethod
    def _native_backward(ctx, dh: Tensor, up: Tensor, params: List[Tensor], d_up: Optional[Tensor],
                         trainable: List[int]):
        """Backward of the tiles that forward ran on the native operators: each tile's backward by hand
        (:func:`~vilseg.ops.vil_layer.inner_tile_backward`), the last first, with no autograd graph, their weight
        gradients summed and taken back through the gate fold once."""
        layer, grid_size, row_len, plan, weights = ctx.layer, ctx.grid_size, ctx.row_len, ctx.plan, ctx.inner_weights
        inner = up.shape[-1] // 2
        up_values = up.detach()
        sums: dict = {}  # InnerWeights field -> gradient summed over the tiles (tuples for the tuple fields)
        d_state = None  # gradient of (C, n) after the current tile
        written_from = plan[-1][1] * row_len  # as in backward: d_up's mLSTM half holds gradients from here on
        for i in reversed(range(len(plan))):
            (r0, r1, h0, h1), state, record = plan[i], ctx.entering[i], ctx.records[i]
            ctx.records[i] = None  # freed as soon as its tile is done
            own_rows, halo_rows = slice(r0 * row_len, r1 * row_len), slice(h0 * row_len, h1 * row_len)
            # the input gradients straight into d_up's halves
            outputs = {} if d_up is None else dict(
                dx_out=d_up[:, halo_rows, :inner], dz_out=d_up[:, own_rows, inner:],
                accumulate_from=min(h1 * row_len, written_from) - h0 * row_len)
            written_from = h0 * row_len
            _, _, d_state, grads = inner_tile_backward(
                dh[:, own_rows], d_state, up_values[:, halo_rows, :inner], up_values[:, own_rows, inner:],
                (h1 - h0, *grid_size[1:]), (r0 - h0, r1 - h0), weights, state, record, **outputs)
            for field, g in grads.items():
                if field not in sums:
                    sums[field] = g
                elif isinstance(g, tuple):
                    sums[field] = tuple(None if a is None else a.add_(b) for a, b in zip(sums[field], g))
                elif g is not None:
                    sums[field].add_(g)
        by_name = layer._inner_weight_gradients(sums, weights)
        names = [name for name, _ in layer._inner_named_parameters()]
        d_params: List[Optional[Tensor]] = [None] * len(params)
        for i in trainable:
            d_params[i] = by_name[names[i]]
        return (None, d_up, None, None, *d_params)


def _accumulate(sums: List[Optional[Tensor]], indices: Sequence[int], grads: Sequence[Optional[Tensor]]) -> None:
    """sums[i] += g for each index i and gradient g of autograd.grad (None: unused, skipped); the first g is kept
    as the sum (a fresh tensor of autograd.grad, added to in place afterwards)."""
    for i, g in zip(indices, grads, strict=True):
        if g is not None:
            sums[i] = g if sums[i] is None else sums[i].add_(g)


class ViLBlock(nn.Module):
    """Residual pre-norm ViL block: x + DropPath(ViLLayer(LayerNorm(x))). (B, S, dim) -> (B, S, dim).

    ``compile_layers``: run the whole block through ``torch.compile`` (inductor fuses the norm, the layer's
    element-wise chains and the residual; the layer then runs untiled, see :class:`ViLLayer`). One compiled
    function serves every block; each new input shape, direction or grad mode compiles again (up to torch's
    recompile limit, then that variant runs eagerly), so it pays off in long runs at a fixed crop, not in short ones.
    Where the layer would run tile by tile without autograd (long sequences in inference) the block stays eager:
    there the tiles take less time and hold less than the compiled untiled layer (README, speed section).

    ``compile_memory_budget`` (with ``compile_layers``, training): instead of the layer's own recompute (a checkpoint
    inside the compiled graph, which runs the whole inner part again, its matmuls included), let AOTAutograd's
    partitioner choose what the compiled block keeps for backward: at most this fraction of what it would keep
    without any recompute (``torch._functorch.config.activation_memory_budget``), recomputing the ops that cost the
    fewest FLOPs per byte saved, i.e. the fused element-wise chains and not the matmuls. None: the layer's recompute
    as configured. An eager run of the block (inference tiles, or past torch's recompile limit) keeps the layer's
    own recompute.
    """

    def __init__(self, dim: int, direction: str = "rowwise_from_top_left", spatial_dims: int = 2,
                 drop_path: float = 0.0, norm_bias: bool = True, compile_layers: bool = False,
                 compile_memory_budget: Optional[float] = None, **layer_kwargs) -> None:
        super().__init__()
        if compile_memory_budget is not None and not (
                isinstance(compile_memory_budget, (int, float)) and not isinstance(compile_memory_budget, bool)
                and 0.0 < compile_memory_budget <= 1.0):
            raise ValueError(
                f"compile_memory_budget must be None or a number in (0, 1], got {compile_memory_budget!r}")
        self.norm = nn.LayerNorm(dim, elementwise_affine=True, bias=norm_bias)
        self.layer = ViLLayer(dim, direction=direction, spatial_dims=spatial_dims, norm_bias=norm_bias,
                              **layer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.compile_layers = compile_layers
        self.compile_memory_budget = None if compile_memory_budget is None else float(compile_memory_budget)

    def forward(self, x: Tensor, grid_size: Sequence[int]) -> Tensor:
        if (self.compile_layers and not torch.compiler.is_compiling()
                and not self.layer.tiles_inference(x, tuple(grid_size), self.norm.weight)):
            try:
                with _partitioner_budget(self.compile_memory_budget):
                    return _compiled_block()(self, x, tuple(grid_size))
            except torch._dynamo.exc.BackendCompilerFailed as err:  # the environment, not the model: say what to do
                cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise RuntimeError(
                    f"ViL's compile_layers=True: torch.compile could not compile the ViL blocks ({cause}). It needs "
                    "a working C++ compiler on CPU (or Triton on CUDA); set compile_layers=False in the backbone's "
                    "config to run them eagerly.") from None
        return self._forward(x, grid_size)

    def _forward(self, x: Tensor, grid_size: Sequence[int]) -> Tensor:
        # in a compiled graph with a memory budget the partitioner recomputes; the layer must not as well
        budgeted = self.compile_memory_budget is not None and torch.compiler.is_compiling()
        y = self.drop_path(self.layer(self.norm(x), grid_size, recompute=False if budgeted else None))
        # the residual into y, the block's own fresh output, also under autograd (the backward of the projection,
        # flip or drop path that made y does not read y; autograd's version check would refuse it if one did), but
        # not where x + y has a wider dtype than y (autocast: the residual stream stays in x's float32)
        return y.add_(x) if torch.promote_types(x.dtype, y.dtype) == y.dtype else x + y


def _partitioner_budget(budget: Optional[float]):
    """AOTAutograd's activation memory budget for the graphs compiled inside this context (a compile happens
    during the call that first needs it); no change where ``budget`` is None."""
    if budget is None:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=budget)


@functools.lru_cache(maxsize=None)
def _compiled_block() -> Callable:
    """``ViLBlock._forward`` through ``torch.compile``, created once and shared by every block: the whole block
    (not only the layer's inner part) in one graph, so that the norm and the residual fuse with their neighbours."""
    return torch.compile(ViLBlock._forward, dynamic=False)


class ViLBlockPair(nn.Module):
    """Two ViL blocks: the first reads the grid from the top-left, the second from the bottom-right."""

    def __init__(self, dim: int, spatial_dims: int = 2, drop_path: Tuple[float, float] = (0.0, 0.0),
                 **block_kwargs) -> None:
        super().__init__()
        self.rowwise_from_top_left = ViLBlock(dim, "rowwise_from_top_left", spatial_dims, drop_path[0],
                                              **block_kwargs)
        self.rowwise_from_bot_right = ViLBlock(dim, "rowwise_from_bot_right", spatial_dims, drop_path[1],
                                               **block_kwargs)

    def sub_blocks(self) -> Tuple[ViLBlock, ViLBlock]:
        return self.rowwise_from_top_left, self.rowwise_from_bot_right

    def forward(self, x: Tensor, grid_size: Sequence[int]) -> Tensor:
        for block in self.sub_blocks():
            x = block(x, grid_size)
        return x
