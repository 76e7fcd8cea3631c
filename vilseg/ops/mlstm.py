"""mLSTM sequence kernels: parallel (reference), chunkwise (default for long sequences) and recurrent (streaming).

vilseg owns these kernels rather than depending on ``mlstm_kernels``: that package's licence carries commercial
terms, and its native chunkwise kernel requires the chunk size to divide the sequence length (see README).

All three compute, per head, with a_t = logsigmoid(f_t) and log D(t, s) = a_{s+1} + ... + a_t + i_s (s <= t):

    m_t = max_s log D(t, s),   w(t, s) = exp(log D(t, s) - m_t)
    h_t = sum_s w(t, s) (q_t . k_s / sqrt(d)) v_s / (max(|sum_s w(t, s) (q_t . k_s / sqrt(d))|, exp(-m_t)) + eps)

Shapes (all kernels): q, k, v are (B, NH, S, DH); igate, fgate are (B, NH, S) pre-activations (a trailing
singleton dimension (B, NH, S, 1) is accepted too). The result is (B, NH, S, DH) in q's dtype.

The gates, the stabiliser m and every exponential are computed in fp32 even under autocast, so bf16/fp16 training
keeps the same numerics as fp32 inside the cell; float64 inputs stay float64 (used by the tests).
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

__all__ = [
    "parallel_mlstm",
    "chunkwise_mlstm",
    "recurrent_mlstm",
    "mlstm",
    "resolve_kernel",
    "MLSTM_KERNELS",
]

MLSTMKernel = Literal["auto", "parallel", "chunkwise", "recurrent"]
MLSTM_KERNELS = ("auto", "parallel", "chunkwise", "recurrent")
# 'auto' uses the parallel form up to AUTO_PARALLEL_MAX_LEN tokens (or one chunk, if longer) and chunkwise beyond.
# Measured on 2 CPU cores (ViL-T forward + backward, benchmarks/results/vil_kernels.md): parallel is faster at 196 and
# 256 tokens, chunkwise from about 576 tokens on (1024 tokens: 0.5x parallel's time), and its memory is linear.
AUTO_PARALLEL_MAX_LEN = 256
# Stand-in for m_0 = -inf: exp(x + NEG_LARGE) underflows to 0 without producing (-inf) - (-inf) = NaN.
NEG_LARGE = -1e30


def _prepare(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor) -> Tuple[Tensor, ...]:
    """Validate shapes and cast everything to the kernel's compute dtype (fp32, or fp64 when given fp64)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, NH, S, DH), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, NH, S, DHv) with (B, NH, S) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    gates = []
    for name, g in (("igate", igate), ("fgate", fgate)):
        if g.dim() == 4 and g.shape[-1] == 1:
            g = g.squeeze(-1)
        if g.shape != q.shape[:3]:
            raise ValueError(f"{name} must be (B, NH, S) = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
        gates.append(g)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return tuple(t.to(dtype) for t in (q, k, v, *gates))


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def parallel_mlstm(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6) -> Tensor:
    """Quadratic reference form: materialises the S x S decay matrix per head (O(S^2) memory)."""
    out_dtype = q.dtype
    with _no_autocast(q.device.type):
        q, k, v, ig, fg = _prepare(q, k, v, igate, fgate)
        S, DH = q.shape[-2], q.shape[-1]
        log_f_cum = torch.cumsum(F.logsigmoid(fg), dim=-1)  # (B, NH, S)
        # log D(t, s) = F_t - F_s + i_s for s <= t
        log_d = log_f_cum.unsqueeze(-1) - log_f_cum.unsqueeze(-2) + ig.unsqueeze(-2)
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        log_d = log_d.masked_fill(~causal, float("-inf"))
        m = log_d.amax(dim=-1, keepdim=True)  # (B, NH, S, 1); finite: the diagonal holds i_t
        c = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(DH)) * torch.exp(log_d - m)
        normaliser = torch.maximum(c.sum(dim=-1, keepdim=True).abs(), torch.exp(-m))
        h = (c / (normaliser + eps)) @ v
    return h.to(out_dtype)


def chunkwise_mlstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate: Tensor,
    fgate: Tensor,
    chunk_size: int = 64,
    eps: float = 1e-6,
    initial_state: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    return_state: bool = False,
):
    """Chunkwise form: parallel inside chunks of ``chunk_size`` tokens, recurrent on (C, n, m) across chunks.

    Memory under plain autograd is O(S * L + (S / L) * DH^2) per head for chunk length L: the intra-chunk L x L
    matrices for all chunks, plus one (DH x DH) matrix state per chunk boundary. Any S works: the last chunk is
    padded with neutral tokens (input gate -> -inf, forget gate -> +inf) that change neither outputs nor state.

    Args:
        chunk_size: tokens per chunk (L). 64 to 256 suit vision sequences.
        initial_state: optional (C (B, NH, DH, DHv), n (B, NH, DH), m (B, NH)) carried from a previous segment.
        return_state: also return the final (C, n, m).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = q.dtype
    with _no_autocast(q.device.type):
        q, k, v, ig, fg = _prepare(q, k, v, igate, fgate)
        B, NH, S, DH = q.shape
        DHV = v.shape[-1]
        L = min(chunk_size, S)
        NC = -(-S // L)
        pad = NC * L - S
        k = k * (1.0 / math.sqrt(DH))
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            ig = F.pad(ig, (0, pad), value=-1e4)  # exp(-1e4 - m) == 0: the token writes nothing
            fg = F.pad(fg, (0, pad), value=1e4)  # logsigmoid(1e4) == 0: the state is not decayed
        q, k, v = (t.reshape(B, NH, NC, L, t.shape[-1]) for t in (q, k, v))
        ig = ig.reshape(B, NH, NC, L)
        b = torch.cumsum(F.logsigmoid(fg).reshape(B, NH, NC, L), dim=-1)  # within-chunk cumulative log forget
        b_last = b[..., -1]  # (B, NH, NC)

        # Per-chunk contribution to the state, stabilised by its own local maximum.
        g = b_last.unsqueeze(-1) - b + ig  # log weight of token s in the chunk-end state
        m_local = g.amax(dim=-1)  # (B, NH, NC)
        w = torch.exp(g - m_local.unsqueeze(-1)).unsqueeze(-1)
        kv_chunk = (k * w).transpose(-2, -1) @ v  # (B, NH, NC, DH, DHV)
        n_chunk = (k * w).sum(dim=-2)  # (B, NH, NC, DH)

        # Recurrence across chunks: states *entering* each chunk. Only NC small steps run sequentially.
        if initial_state is None:
            c_prev = q.new_zeros(B, NH, DH, DHV)
            n_prev = q.new_zeros(B, NH, DH)
            m_prev = q.new_full((B, NH), NEG_LARGE)
        else:
            c_prev, n_prev, m_prev = (t.to(q.dtype) for t in initial_state)
        # unbind, not x[:, :, c]: each indexing op's backward would write a zero-filled gradient of the whole
        # (NC, ...) tensor, NC times over (quadratic in S); unbind's backward stacks the NC slices once
        c_states, n_states, m_states = [], [], []
        steps = zip(b_last.unbind(-1), m_local.unbind(-1), kv_chunk.unbind(2), n_chunk.unbind(2))
        for b_c, m_c, kv_c, n_c in steps:
            c_states.append(c_prev)
            n_states.append(n_prev)
            m_states.append(m_prev)
            decayed = b_c + m_prev
            m_new = torch.maximum(decayed, m_c)
            scale_prev = torch.exp(decayed - m_new)
            scale_chunk = torch.exp(m_c - m_new)
            c_prev = scale_prev[..., None, None] * c_prev + scale_chunk[..., None, None] * kv_c
            n_prev = scale_prev[..., None] * n_prev + scale_chunk[..., None] * n_c
            m_prev = m_new
        c_in = torch.stack(c_states, dim=2)  # (B, NH, NC, DH, DHV)
        n_in = torch.stack(n_states, dim=2)  # (B, NH, NC, DH)
        m_in = torch.stack(m_states, dim=2)  # (B, NH, NC)

        # Outputs: inter-chunk (from the carried state) + intra-chunk (L x L), one shared stabiliser m_j.
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        log_d = (b.unsqueeze(-1) - b.unsqueeze(-2) + ig.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
        log_inter = b + m_in.unsqueeze(-1)  # (B, NH, NC, L)
        m = torch.maximum(log_inter, log_d.amax(dim=-1))  # (B, NH, NC, L)
        w_inter = torch.exp(log_inter - m).unsqueeze(-1)
        c_intra = (q @ k.transpose(-2, -1)) * torch.exp(log_d - m.unsqueeze(-1))  # (B, NH, NC, L, L)
        num = w_inter * (q @ c_in) + c_intra @ v
        den = w_inter.squeeze(-1) * (q * n_in.unsqueeze(-2)).sum(-1) + c_intra.sum(-1)
        h = num / (torch.maximum(den.abs(), torch.exp(-m)) + eps).unsqueeze(-1)
        h = h.reshape(B, NH, NC * L, DHV)[:, :, :S]
    h = h.to(out_dtype)
    if return_state:
        return h, (c_prev, n_prev, m_prev)
    return h


def recurrent_mlstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate: Tensor,
    fgate: Tensor,
    eps: float = 1e-6,
    initial_state: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    return_state: bool = False,
):
    """Recurrent form: one token at a time with O(DH^2) state; for streaming inference of any length.

    ``initial_state``/``return_state`` as in :func:`chunkwise_mlstm`, so a long sequence can be fed in pieces.
    """
    out_dtype = q.dtype
    with _no_autocast(q.device.type):
        q, k, v, ig, fg = _prepare(q, k, v, igate, fgate)
        B, NH, S, DH = q.shape
        k = k * (1.0 / math.sqrt(DH))
        log_f = F.logsigmoid(fg)
        if initial_state is None:
            c = q.new_zeros(B, NH, DH, v.shape[-1])
            n = q.new_zeros(B, NH, DH)
            m = q.new_full((B, NH), NEG_LARGE)
        else:
            c, n, m = (t.to(q.dtype) for t in initial_state)
        outs = []
        for t in range(S):
            m_new = torch.maximum(log_f[..., t] + m, ig[..., t])
            f_scale = torch.exp(log_f[..., t] + m - m_new)
            i_scale = torch.exp(ig[..., t] - m_new)
            k_t, v_t, q_t = k[:, :, t], v[:, :, t], q[:, :, t]
            c = f_scale[..., None, None] * c + i_scale[..., None, None] * (k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
            n = f_scale[..., None] * n + i_scale[..., None] * k_t
            m = m_new
            num = (q_t.unsqueeze(-2) @ c).squeeze(-2)
            den = torch.maximum((n * q_t).sum(-1).abs(), torch.exp(-m))
            outs.append(num / (den + eps).unsqueeze(-1))
        h = torch.stack(outs, dim=2) if outs else q.new_zeros(B, NH, 0, v.shape[-1])
    h = h.to(out_dtype)
    if return_state:
        return h, (c, n, m)
    return h


def resolve_kernel(kernel: str, seq_len: int, chunk_size: int = 64) -> str:
    """Map ``kernel`` ('auto' or a concrete name) to the concrete kernel used for a sequence of ``seq_len``."""
    if kernel not in MLSTM_KERNELS:
        raise ValueError(f"kernel must be one of {MLSTM_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "parallel" if seq_len <= max(chunk_size, AUTO_PARALLEL_MAX_LEN) else "chunkwise"
    return kernel


def mlstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate: Tensor,
    fgate: Tensor,
    kernel: MLSTMKernel = "auto",
    chunk_size: int = 64,
    eps: float = 1e-6,
    recompute: Optional[bool] = None,
) -> Tensor:
    """Dispatch to one of the three kernels (same signature and results). See the module docstring for shapes.

    ``recompute`` (training only): keep just the kernel's inputs for backward and run its forward again there
    (activation checkpointing of the cell alone, exact). The intra-chunk matrices and per-chunk states then never
    stay alive beyond one block. ``None`` (default): recompute when the chunkwise kernel runs, i.e. for the long
    sequences where those intermediates dominate; short sequences (parallel) keep them, which is faster.
    """
    name = resolve_kernel(kernel, q.shape[-2], chunk_size)
    if recompute is None:
        recompute = name == "chunkwise"
    if recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, igate, fgate)):
        return torch.utils.checkpoint.checkpoint(mlstm, q, k, v, igate, fgate, name, chunk_size, eps, False,
                                                 use_reentrant=False)
    if name == "parallel":
        return parallel_mlstm(q, k, v, igate, fgate, eps=eps)
    if name == "chunkwise":
        return chunkwise_mlstm(q, k, v, igate, fgate, chunk_size=chunk_size, eps=eps)
    return recurrent_mlstm(q, k, v, igate, fgate, eps=eps)
