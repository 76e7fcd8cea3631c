"""Fused CPU operators of the ViL layer's inner part (the element-wise work around the mLSTM kernel).

vilseg writes these itself because PyTorch fuses them only under ``torch.compile``: eagerly, each of them is a chain
of operators that each pass over a tile-sized temporary (README, speed section). Here each is one pass over the tokens
in forward and one in backward, in C++ (``vilseg/ops/csrc/vil_layer.cpp``, built by ``make install`` into
``vilseg.ops._native``), with hand-written gradients:

- :func:`conv_silu`: the depthwise k x k grid convolution and SiLU of the layer's conv branch, on the rows of a tile
  whose halo rows come with it;
- :func:`mlstm_cell_inputs`: the 4 x 4 block-diagonal q, k (from the conv branch) and v (from the mLSTM branch)
  projections, written straight into the kernel's head layout, and the gate pre-activations (linear in both branches);
- :func:`gated_head_norm`: the cell's per-head LayerNorm with its affine weight, the learnable skip of the conv branch
  and the SiLU(z) gate.

A layer that runs its inner part tile by tile without autograd (inference, and recomputing training, whose backward
runs each tile's forward again) calls them straight, with the chunkwise mLSTM kernel's C++ form between them
(:func:`inner_tile_forward`), and recomputing training takes each tile's gradients by hand, the operators' backwards
in reverse (:func:`inner_tile_backward`): no autograd graph, no Python per operator.

Tokens are channels-last rows (B, S, C) (a strided view with unit channel stride is fine, e.g. half of the
up-projection's output); float32 or float64 on CPU, without autocast (:func:`fused_ops_supported`). Float32 SiLU and
sigmoid use a vectorised exp within 2 ulp of libm's; float64 uses libm's.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vilseg.ops.mlstm import NEG_LARGE, ChunkwiseRecord

try:  # built by `make install` (setup.py); vilseg runs without it, with PyTorch operators instead
    from vilseg.ops import _native as _ext
except ImportError:  # pragma: no cover - depends on the installation
    _ext = None

__all__ = ["fused_ops_built", "fused_ops_supported", "conv_silu", "mlstm_cell_inputs", "gated_head_norm",
           "InnerWeights", "InnerTileRecord", "tile_fits_chunks", "fold_gate_weights",
           "fold_gate_weights_backward", "inner_tile_forward", "inner_tile_backward"]


def fused_ops_built() -> bool:
    """Whether the native extension ``vilseg.ops._native`` is installed."""
    return _ext is not None


def fused_ops_supported(*tensors: Tensor) -> bool:
    """Whether the fused operators run on these tensors: the extension is built, all are float32 or float64 CPU tensors
    of one dtype, CPU autocast is off, and neither ``torch.compile`` (there inductor fuses) nor a TorchScript trace
    (FLOP counting, which should see the model's operators) is running. Under a TorchDispatchMode (fake tensors, the
    live-memory tracker) they run as registered operators with shape functions (:func:`_native_ops`)."""
    if (_ext is None or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.is_autocast_enabled("cpu")):
        return False
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype
                                                           for t in tensors)


@functools.lru_cache(maxsize=None)
def _native_ops() -> SimpleNamespace:
    """The extension's functions as PyTorch operators (``torch.ops.vilseg.*``) with shape functions, so that fake
    tensors, dispatch modes and the live-memory tracker see them; registered on first use (importing vilseg
    registers nothing). Their gradients are the autograd functions below (torch.library's own autograd wrapper
    costs a few hundred microseconds of Python per backward call)."""

    @torch.library.custom_op("vilseg::conv_silu", mutates_args=())
    def conv_silu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], grid_rows: int, grid_cols: int, row0: int,
                     rows: int) -> Tensor:
        return _ext.conv_silu_forward(x, weight, bias, grid_rows, grid_cols, row0, rows)

    @conv_silu_op.register_fake
    def _(x, weight, bias, grid_rows, grid_cols, row0, rows):
        return x.new_empty(x.shape[0], rows * grid_cols, x.shape[2])

    @torch.library.custom_op("vilseg::conv_silu_backward", mutates_args=())
    def conv_silu_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], grid_rows: int,
                              grid_cols: int, row0: int, rows: int) -> Tuple[Tensor, Tensor, Tensor]:
        dx, dw, db = _ext.conv_silu_backward(grad, x, weight, bias, grid_rows, grid_cols, row0, rows)
        return dx, dw, db

    @conv_silu_backward_op.register_fake
    def _(grad, x, weight, bias, grid_rows, grid_cols, row0, rows):
        return (x.new_empty(x.shape[0], grid_rows * grid_cols, x.shape[2]), torch.empty_like(weight),
                weight.new_empty(weight.shape[0]))

    @torch.library.custom_op("vilseg::cell_inputs", mutates_args=())
    def cell_inputs_op(xc: Tensor, xm: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Optional[Tensor],
                       bk: Optional[Tensor], bv: Optional[Tensor], gate_wc: Tensor, gate_wm: Tensor, gate_b: Tensor,
                       num_heads: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        q, k, v, igate, fgate = _ext.cell_inputs_forward(xc, xm, wq, wk, wv, bq, bk, bv, gate_wc, gate_wm, gate_b,
                                                         num_heads)
        return q, k, v, igate, fgate

    @cell_inputs_op.register_fake
    def _(xc, xm, wq, wk, wv, bq, bk, bv, gate_wc, gate_wm, gate_b, num_heads):
        B, T, C = xc.shape
        return (*(xc.new_empty(B, num_heads, T, C // num_heads) for _ in range(3)),
                *(xc.new_empty(B, num_heads, T) for _ in range(2)))

    @torch.library.custom_op("vilseg::cell_inputs_backward", mutates_args=())
    def cell_inputs_backward_op(dq: Tensor, dk: Tensor, dv: Tensor, digate: Tensor, dfgate: Tensor, xc: Tensor,
                                xm: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, gate_wc: Tensor,
                                gate_wm: Tensor) -> List[Tensor]:
        return list(_ext.cell_inputs_backward(dq, dk, dv, digate, dfgate, xc, xm, wq, wk, wv, gate_wc, gate_wm))

    @cell_inputs_backward_op.register_fake
    def _(dq, dk, dv, digate, dfgate, xc, xm, wq, wk, wv, gate_wc, gate_wm):
        C, G = gate_wc.shape
        return ([xc.new_empty(xc.shape), xc.new_empty(xc.shape)] + [torch.empty_like(wq) for _ in range(3)]
                + [xc.new_empty(C) for _ in range(3)] + [torch.empty_like(gate_wc), torch.empty_like(gate_wm),
                                                          gate_wc.new_empty(G)])

    @torch.library.custom_op("vilseg::gated_head_norm", mutates_args=())
    def norm_op(h: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], skip: Tensor, xc: Tensor,
                z: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        out, mean, rstd = _ext.gated_norm_forward(h, norm_weight, norm_bias, skip, xc, z, eps)
        return out, mean, rstd

    @norm_op.register_fake
    def _(h, norm_weight, norm_bias, skip, xc, z, eps):
        B, NH, T, _ = h.shape
        return xc.new_empty(xc.shape), h.new_empty(B, NH, T), h.new_empty(B, NH, T)

    @torch.library.custom_op("vilseg::gated_head_norm_backward", mutates_args=())
    def norm_backward_op(grad: Tensor, h: Tensor, mean: Tensor, rstd: Tensor, norm_weight: Optional[Tensor],
                         norm_bias: Optional[Tensor], skip: Tensor, xc: Tensor, z: Tensor) -> List[Tensor]:
        dh, dxc, dz, dw, db, dskip = _ext.gated_norm_backward(grad, h, mean, rstd, norm_weight, norm_bias, skip, xc, z)
        # an absent norm weight / bias gets an empty gradient (each its own tensor: outputs may not alias)
        return [dh, dxc, dz, skip.new_empty(0) if dw is None else dw, skip.new_empty(0) if db is None else db, dskip]

    @norm_backward_op.register_fake
    def _(grad, h, mean, rstd, norm_weight, norm_bias, skip, xc, z):
        C = skip.shape[0]
        return [torch.empty_like(h), xc.new_empty(xc.shape), xc.new_empty(xc.shape),
                skip.new_empty(C if norm_weight is not None else 0), skip.new_empty(C if norm_bias is not None else 0),
                skip.new_empty(C)]

    return SimpleNamespace(conv_silu=conv_silu_op, conv_silu_backward=conv_silu_backward_op,
                           cell_inputs=cell_inputs_op, cell_inputs_backward=cell_inputs_backward_op,
                           gated_head_norm=norm_op,
                           gated_head_norm_backward=norm_backward_op)


# the extension's function behind each registered operator
_EXT_FUNCTIONS = {"conv_silu": "conv_silu_forward", "conv_silu_backward": "conv_silu_backward",
                  "cell_inputs": "cell_inputs_forward", "cell_inputs_backward": "cell_inputs_backward",
                  "gated_head_norm": "gated_norm_forward", "gated_head_norm_backward": "gated_norm_backward"}


def _run(name: str, *args):
    """The operator ``name`` on args: the extension's function called directly, or the registered operator
    (:func:`_native_ops`) where a dispatch mode (fake tensors, the live-memory tracker) must see it. torch.library's
    Python dispatch of a registered operator costs tens of microseconds per call; the profiler sees either (the C++
    functions record themselves under the operators' names)."""
    if _get_current_dispatch_mode() is None:
        return getattr(_ext, _EXT_FUNCTIONS[name])(*args)
    return getattr(_native_ops(), name)(*args)


class _ConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, grid_rows, grid_cols, row0, rows):
        ctx.save_for_backward(x, weight, bias)  # (x: a view of the layer's up-projection, which is kept anyway)
        ctx.geometry = (grid_rows, grid_cols, row0, rows)
        return _run("conv_silu", x, weight, bias, grid_rows, grid_cols, row0, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = _run("conv_silu_backward", grad.contiguous(), x, weight, bias, *ctx.geometry)
        return dx, dw, db if bias is not None else None, None, None, None, None


class _CellInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xc, xm, wq, wk, wv, bq, bk, bv, gate_wc, gate_wm, gate_b, num_heads):
        outs = _run("cell_inputs", xc, xm, wq, wk, wv, bq, bk, bv, gate_wc, gate_wm, gate_b, num_heads)
        ctx.save_for_backward(xc, xm, wq, wk, wv, gate_wc, gate_wm)
        ctx.has_bias = (bq is not None, bk is not None, bv is not None)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dk, dv, digate, dfgate):
        xc, xm, wq, wk, wv, gate_wc, gate_wm = ctx.saved_tensors
        grads = [g.contiguous() for g in (dq, dk, dv, digate, dfgate)]  # (unused outputs: zeros, materialised)
        dxc, dxm, dwq, dwk, dwv, dbq, dbk, dbv, dgwc, dgwm, dgb = _run("cell_inputs_backward", *grads, xc, xm, wq, wk,
                                                                       wv, gate_wc, gate_wm)
        dbs = [d if has else None for d, has in zip((dbq, dbk, dbv), ctx.has_bias)]
        return dxc, dxm, dwq, dwk, dwv, *dbs, dgwc, dgwm, dgb, None


class _GatedHeadNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, norm_weight, norm_bias, skip, xc, z, eps):
        out, mean, rstd = _run("gated_head_norm", h, norm_weight, norm_bias, skip, xc, z, eps)
        ctx.save_for_backward(h, mean, rstd, norm_weight, norm_bias, skip, xc, z)
        ctx.has_affine = (norm_weight is not None, norm_bias is not None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, mean, rstd, norm_weight, norm_bias, skip, xc, z = ctx.saved_tensors
        dh, dxc, dz, dw, db, dskip = _run("gated_head_norm_backward", grad.contiguous(), h, mean, rstd, norm_weight,
                                          norm_bias, skip, xc, z)
        has_w, has_b = ctx.has_affine
        return dh, dw if has_w else None, db if has_b else None, dskip, dxc, dz, None


def conv_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], grid_size: Sequence[int],
              rows: Tuple[int, int]) -> Tensor:
    """SiLU(depthwise convolution) of a token grid, on some of its rows.

    Args:
        x: (B, H * W, C) tokens of an H x W grid (row-major), unit channel stride.
        weight: (C, 1, k, k) depthwise kernel (odd k, 'same' zero padding at the grid's border); bias: (C) or None.
        grid_size: (H, W).
        rows: [first, end) of the grid rows to compute; rows of x outside them are read as the convolution's halo.
    Returns (B, (end - first) * W, C), contiguous.
    """
    H, W = grid_size
    k = weight.shape[-1]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[-2] != k or k % 2 != 1:
        raise ValueError(f"weight must be a depthwise (C, 1, k, k) kernel with odd k, got {tuple(weight.shape)}")
    if x.dim() != 3 or x.shape[1] != H * W or x.shape[2] != weight.shape[0]:
        raise ValueError(f"x must be (B, {H} * {W}, {weight.shape[0]}), got {tuple(x.shape)}")
    first, end = rows
    if not 0 <= first < end <= H:
        raise ValueError(f"rows must satisfy 0 <= first < end <= {H}, got {rows}")
    w = weight.reshape(weight.shape[0], -1)
    return _ConvSiLU.apply(_unit_channel_stride(x), w, bias, H, W, first, end - first)


def mlstm_cell_inputs(xc: Tensor, xm: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                      gate_weights: Tuple[Tensor, Tensor, Tensor], num_heads: int) -> Tuple[Tensor, ...]:
    """The mLSTM cell's inputs from the ViL layer's conv branch ``xc`` and mLSTM branch ``xm`` (both (B, T, C), unit
    channel stride): q, k from xc and v from xm through block-diagonal projections with 4 x 4 blocks (``weights``:
    three (C / 4, 4, 4) in (out, in) layout, as ``BlockDiagonalLinear``; ``biases``: three (C) or None), and the gate
    pre-activations xc @ gate_wc + xm @ gate_wm + gate_b (``gate_weights``: (C, 2 NH), (C, 2 NH), (2 NH), input gates
    first, as ``ViLLayer`` folds them) -> q, k, v (B, num_heads, T, C / num_heads), igate, fgate (B, num_heads, T),
    contiguous. Blocks must not straddle heads."""
    C = xc.shape[-1]
    for w in weights:
        if tuple(w.shape) != (C // 4, 4, 4):
            raise ValueError(f"block weights must be ({C // 4}, 4, 4) for {C} channels, got {tuple(w.shape)}")
    if C % num_heads or (C // num_heads) % 4 or xm.shape != xc.shape:
        raise ValueError(f"xc and xm must be (B, T, C) alike with C / num_heads a multiple of 4, got "
                         f"{tuple(xc.shape)}, {tuple(xm.shape)} and {num_heads} heads")
    gate_wc, gate_wm, gate_b = gate_weights
    if gate_wc.shape != (C, 2 * num_heads) or gate_wm.shape != gate_wc.shape or gate_b.shape != (2 * num_heads,):
        raise ValueError(f"gate weights must be ({C}, {2 * num_heads}) twice and a bias ({2 * num_heads}), got "
                         f"{tuple(gate_wc.shape)}, {tuple(gate_wm.shape)}, {tuple(gate_b.shape)}")
    return _CellInputs.apply(_unit_channel_stride(xc), _unit_channel_stride(xm), *weights, *biases,
                             gate_wc.contiguous(), gate_wm.contiguous(), gate_b.contiguous(), num_heads)


def gated_head_norm(h: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], skip: Tensor, xc: Tensor,
                    z: Tensor, eps: float = 1e-5) -> Tensor:
    """(LayerNorm over each head's channels of h, times ``norm_weight`` plus ``norm_bias`` (C or None), in the token
    layout) + ``skip`` * xc, all times SiLU(z).

    Args:
        h: (B, NH, T, DH) the mLSTM kernel's output.
        skip: (C) with C = NH * DH; xc, z: (B, T, C), unit channel stride.
    Returns (B, T, C), contiguous.
    """
    B, NH, T, DH = h.shape
    if xc.shape != (B, T, NH * DH) or z.shape != xc.shape:
        raise ValueError(f"xc and z must be (B, T, C) = {(B, T, NH * DH)} for h {tuple(h.shape)}, got "
                         f"{tuple(xc.shape)} and {tuple(z.shape)}")
    return _GatedHeadNorm.apply(h.contiguous(), norm_weight, norm_bias, skip, _unit_channel_stride(xc),
                                _unit_channel_stride(z), float(eps))


def _unit_channel_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class InnerWeights(NamedTuple):
    """The weights of a ViL layer's inner part for :func:`inner_tile_forward` / :func:`inner_tile_backward`:
    ``conv_weight`` (C, 1, k, k) depthwise and ``conv_bias`` (C) or None; the three 4 x 4 block-diagonal projections
    q, k, v (``proj_weights``: (C / 4, 4, 4) each, ``proj_biases``: (C) or None each); ``gate_weights``: the gate
    weights folded into them ((C, 2 NH), (C, 2 NH), (2 NH), see :func:`mlstm_cell_inputs`); the output norm
    (``norm_weight``, ``norm_bias``: (C) or None, ``norm_eps``); the learnable ``skip`` (C); ``num_heads``, the
    kernel's ``chunk_size`` and its ``eps``."""

    conv_weight: Tensor
    conv_bias: Optional[Tensor]
    proj_weights: Tuple[Tensor, Tensor, Tensor]
    proj_biases: Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]
    gate_weights: Tuple[Tensor, Tensor, Tensor]
    norm_weight: Optional[Tensor]
    norm_bias: Optional[Tensor]
    norm_eps: float
    skip: Tensor
    num_heads: int
    chunk_size: int
    eps: float = 1e-6


class InnerTileRecord(NamedTuple):
    """What :func:`inner_tile_forward` keeps for :func:`inner_tile_backward`: the output norm's per-head mean and
    reciprocal standard deviation (B, NH, T) (always: two numbers per token and head) and, where asked for, the mLSTM
    kernel's :class:`~vilseg.ops.mlstm.ChunkwiseRecord` (else None: backward runs the kernel's forward again), its
    chunk ``states`` (C, n and m entering each chunk and m after the last: one DH x DH matrix per chunk and head;
    else None: backward rebuilds them), its weighted intra-chunk ``scores`` (B, NH, T / L, L, L) (else None: backward
    computes them again) and the conv branch's output ``conv`` (B, T, C) (else None: backward runs the convolution
    again)."""

    mean: Tensor
    rstd: Tensor
    kernel: Optional[ChunkwiseRecord]
    conv: Optional[Tensor] = None
    states: Optional[Tuple[Tensor, ...]] = None
    scores: Optional[Tensor] = None


def tile_fits_chunks(tokens: int, chunk_size: int) -> bool:
    """Whether a tile of ``tokens`` tokens is whole chunks of the kernel (its last chunk needs no padding)."""
    return tokens % min(chunk_size, tokens) == 0


def fold_gate_weights(proj_weights: Sequence[Tensor], proj_biases: Sequence[Optional[Tensor]], gate_weight: Tensor,
                      gate_bias: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The mLSTM cell's gates, linear in [q, k, v] (``gate_weight`` (2 NH, 3 C): the input gates' rows first, columns
    [q, k, v]; ``gate_bias`` (2 NH)), folded into the 4 x 4 block-diagonal q, k, v projections (``proj_weights``:
    three (C / 4, 4, 4) as (out, in); ``proj_biases``: three (C) or None) of the conv branch (q, k) and the mLSTM
    branch (v): -> weights on the conv branch (C, 2 NH), on the mLSTM branch (C, 2 NH) and a bias (2 NH), as
    :func:`mlstm_cell_inputs` takes them. Native, without autograd (:func:`fold_gate_weights_backward`)."""
    return tuple(_ext.fold_gate_weights(*proj_weights, *proj_biases, gate_weight, gate_bias))


def fold_gate_weights_backward(d_folded: Sequence[Tensor], proj_weights: Sequence[Tensor],
                               proj_biases: Sequence[Optional[Tensor]], gate_weight: Tensor) -> dict:
    """Backward of :func:`fold_gate_weights`: the gradients of its three results -> a dict of the gradients of
    ``proj_weights`` and ``proj_biases`` (tuples of three; None for an absent bias), ``gate_weight`` and
    ``gate_bias``."""
    dwq, dwk, dwv, dbq, dbk, dbv, d_gate_w, d_gate_b = _ext.fold_gate_weights_backward(
        *d_folded, *proj_weights, *proj_biases, gate_weight)
    return dict(proj_weights=(dwq, dwk, dwv), proj_biases=(dbq, dbk, dbv), gate_weight=d_gate_w, gate_bias=d_gate_b)


def _chunked(t: Tensor, L: int) -> Tensor:
    """(B, NH, T[, D]) contiguous -> the kernel's (B, NH, T / L, L[, D])."""
    return t.view(*t.shape[:2], t.shape[2] // L, L, *t.shape[3:])


def _tile_cell_inputs(x: Tensor, grid_size: Tuple[int, int], rows: Tuple[int, int],
                      weights: InnerWeights, xc: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """The conv branch xc (B, T, C) of the tile's rows (given, or computed), their mLSTM-branch tokens xm (a view of
    x) and the kernel's inputs q, k, v, igate, fgate in its chunked layout."""
    H, W = grid_size
    r0, r1 = rows
    if xc is None:
        xc = _ext.conv_silu_forward(x, weights.conv_weight.reshape(weights.conv_weight.shape[0], -1),
                                    weights.conv_bias, H, W, r0, r1 - r0)
    xm = x[:, r0 * W:r1 * W]
    cell = _ext.cell_inputs_forward(xc, xm, *weights.proj_weights, *weights.proj_biases, *weights.gate_weights,
                                    weights.num_heads)
    L = min(weights.chunk_size, xc.shape[1])
    return xc, xm, [_chunked(t, L) for t in cell]


def _entering_state(state: Optional[Tuple[Tensor, Tensor, Tensor]], ig: Tensor) -> Tuple:
    """(c0, n0, m0) for the kernel: the carried state, or none (zero) with m0 = NEG_LARGE."""
    if state is None:
        return None, None, ig.new_full(ig.shape[:2], NEG_LARGE)
    return state


def inner_tile_forward(x: Tensor, z: Tensor, grid_size: Tuple[int, int], rows: Tuple[int, int],
                       weights: InnerWeights, state: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
                       keep_kernel_record: bool = True, keep_conv: bool = False, keep_scores: bool = True,
                       out: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor], InnerTileRecord]:
    """A ViL layer's inner part on one tile of a 2D grid, without autograd, straight on the native operators. For
    tensors on which both the fused operators (:func:`fused_ops_supported`) and the chunkwise kernel's C++ form
    (:func:`~vilseg.ops.mlstm.native_chunkwise_supported`: no dispatch mode watching, which would see neither) apply.

    Args:
        x: (B, H * W, C) the mLSTM half of the up-projection on the tile and its halo rows (an H x W grid),
            unit channel stride.
        z: (B, T, C) the gate half on the tile's own rows ``rows`` = [r0, r1) of that grid (T = (r1 - r0) W).
        state: the mLSTM state (C, n, m) entering the tile (None: the sequence starts here).
        keep_kernel_record: keep the kernel's record and chunk states in the returned :class:`InnerTileRecord`
            (for a backward that skips the kernel's forward), and with ``keep_scores`` its weighted scores too (for
            a backward that skips computing them again).
        keep_conv: keep the conv branch's output (B, T, C) in it too (for a backward that skips the convolution).
        out: where given, a (B, T, C) view with unit channel stride (e.g. the tile's rows of the whole layer's
            output) that receives the output.
    Returns the gated cell output (B, T, C), the state after the tile, and what :func:`inner_tile_backward` needs
    besides the inputs. The tile's tokens must fill whole chunks (:func:`tile_fits_chunks`).
    """
    xc, _, (q, k, v, ig, fg) = _tile_cell_inputs(x, grid_size, rows, weights)
    c0, n0, m0 = _entering_state(state, ig)
    c_in, n_in, m_in, c_f, n_f, m_f, h, denom, normaliser, m, scores = _ext.chunkwise_forward(
        q, k, v, ig, fg, c0, n0, m0, weights.eps, True)
    B, NH, NC, L, DH = h.shape
    out, mean, rstd = _ext.gated_norm_forward(h.view(B, NH, NC * L, DH), weights.norm_weight, weights.norm_bias,
                                              weights.skip, xc, z, weights.norm_eps, out)
    if not keep_kernel_record:
        return out, (c_f, n_f, m_f), InnerTileRecord(mean, rstd, None, xc if keep_conv else None)
    return out, (c_f, n_f, m_f), InnerTileRecord(mean, rstd, ChunkwiseRecord(h, denom, normaliser, m),
                                                 xc if keep_conv else None, (c_in, n_in, m_in, m_f),
                                                 scores if keep_scores else None)


def inner_tile_backward(grad: Tensor, d_state: Optional[Tuple[Tensor, Tensor]], x: Tensor, z: Tensor,
                        grid_size: Tuple[int, int], rows: Tuple[int, int], weights: InnerWeights,
                        state: Optional[Tuple[Tensor, Tensor, Tensor]], record: InnerTileRecord,
                        dx_out: Optional[Tensor] = None, accumulate_from: Optional[int] = None,
                        dz_out: Optional[Tensor] = None) -> Tuple:
    """The backward of :func:`inner_tile_forward`, by hand: what of its forward ``record`` does not hold again (the
    q/k/v operator always, the convolution and the kernel where not kept, the output norm never) and the native
    operators' backwards in reverse, with no autograd graph.

    Args:
        grad: (B, T, C) gradient of the tile's output; d_state: gradients of (C, n) after the tile, or None.
        x, z, grid_size, rows, weights, state: as given to :func:`inner_tile_forward`; record: what it returned.
        dx_out, dz_out: where given, views (unit channel stride) that receive dx and dz (e.g. of the gradient of
            the whole up-projection); dx is added to dx_out from its token ``accumulate_from`` on (where an
            adjacent tile's halo already wrote), written before it.
    Returns (dx (B, H * W, C), dz (B, T, C), gradients of the entering (C, n) or None, and a dict of weight
    gradients keyed by :class:`InnerWeights`' field names: ``conv_weight``, ``conv_bias``, ``proj_weights`` and
    ``proj_biases`` (tuples of three), ``gate_weights`` (three), ``norm_weight``, ``norm_bias``, ``skip``; a weight
    that is None gets None).
    """
    xc, xm, (q, k, v, ig, fg) = _tile_cell_inputs(x, grid_size, rows, weights, record.conv)
    c0, n0, m0 = _entering_state(state, ig)
    if record.kernel is None:
        c_in, n_in, m_in, _, _, m_f, h, denom, normaliser, m, scores = _ext.chunkwise_forward(
            q, k, v, ig, fg, c0, n0, m0, weights.eps, True)
    else:
        if record.states is None:
            c_in, n_in, m_in, _, _, m_f = _ext.chunkwise_forward(q, k, v, ig, fg, c0, n0, m0, weights.eps, False)
        else:
            c_in, n_in, m_in, m_f = record.states
        h, denom, normaliser, m = record.kernel
        scores = record.scores
    B, NH, NC, L, DH = h.shape
    dh, dxc, dz, d_norm_w, d_norm_b, d_skip = _ext.gated_norm_backward(
        grad.contiguous(), h.view(B, NH, NC * L, DH), record.mean, record.rstd, weights.norm_weight,
        weights.norm_bias, weights.skip, xc, z, dz_out)
    dc_f, dn_f = (None, None) if d_state is None else d_state
    dq, dk, dv, dig, dfg, dc0, dn0 = _ext.chunkwise_backward(
        dh.view(h.shape), dc_f, dn_f, q, k, v, ig, fg, c_in, n_in, m_in, m_f, h, denom, normaliser, m,
        state is not None, scores)
    T = NC * L
    dxc, dxm, dwq, dwk, dwv, dbq, dbk, dbv, d_gwc, d_gwm, d_gb = _ext.cell_inputs_backward(
        dq.view(B, NH, T, -1), dk.view(B, NH, T, -1), dv.view(B, NH, T, -1), dig.view(B, NH, T),
        dfg.view(B, NH, T), xc, xm, *weights.proj_weights, weights.gate_weights[0], weights.gate_weights[1], dxc)
    H, W = grid_size
    r0, r1 = rows
    cw = weights.conv_weight
    dx, d_cw, d_cb = _ext.conv_silu_backward(dxc, x, cw.reshape(cw.shape[0], -1), weights.conv_bias, H, W, r0,
                                             r1 - r0, dx_out, H * W if accumulate_from is None else accumulate_from,
                                             dxm)
    biases = weights.proj_biases
    grads = dict(conv_weight=d_cw.view(cw.shape), conv_bias=None if weights.conv_bias is None else d_cb,
                 proj_weights=(dwq, dwk, dwv),
                 proj_biases=tuple(None if b is None else d for b, d in zip(biases, (dbq, dbk, dbv))),
                 gate_weights=(d_gwc, d_gwm, d_gb), norm_weight=d_norm_w, norm_bias=d_norm_b, skip=d_skip)
    return dx, dz, None if state is None else (dc0, dn0), grads
