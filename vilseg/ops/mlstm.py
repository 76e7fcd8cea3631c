"""mLSTM sequence kernels: parallel (reference), chunkwise (default for long sequences) and recurrent (streaming).

vilseg owns these kernels rather than depending on ``mlstm_kernels``: that package's licence carries commercial
terms, and its native chunkwise kernel requires the chunk size to divide the sequence length (see README).

All three compute, per head, with a_t = logsigmoid(f_t) and log D(t, s) = a_{s+1} + ... + a_t + i_s (s <= t):

    m_t = max_s log D(t, s),   w(t, s) = exp(log D(t, s) - m_t)
    h_t = sum_s w(t, s) (q_t . k_s / sqrt(d)) v_s / (max(|sum_s w(t, s) (q_t . k_s / sqrt(d))|, exp(-m_t)) + eps)

Shapes (all kernels): q, k, v are (B, NH, S, DH); igate, fgate are (B, NH, S) pre-activations (a trailing
singleton dimension (B, NH, S, 1) is accepted too). The result is (B, NH, S, DH) in q's dtype.

The gates, the stabiliser m and every exponential are computed in fp32 even under autocast; the chunkwise kernel runs
its large matmuls in the autocast dtype (the parallel and recurrent forms keep everything in fp32). float64 inputs
stay float64 (used by the tests). The stabiliser carries no gradient (it cancels apart from eps).
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
# 'auto' uses the parallel form up to AUTO_PARALLEL_MAX_LEN tokens (ImageNet-size grids: there it is faster than the
# chunkwise form, forward + backward at ViL-T's head shape on CPU) and the chunkwise form beyond (linear memory).
AUTO_PARALLEL_MAX_LEN = 200
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
    # plain tensors inside: a subclass (MONAI's MetaTensor) would route every operator through its
    # __torch_function__ and changes some factory signatures; as_subclass keeps the autograd graph
    return tuple((t if type(t) is Tensor else t.as_subclass(Tensor)).to(dtype) for t in (q, k, v, *gates))


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
        # (B, NH, S, 1); finite: the diagonal holds i_t. A stabiliser only (it cancels apart from eps): no gradient,
        # which also keeps exp(-m) = inf for very negative input gates out of backward (0 * inf = NaN)
        m = log_d.amax(dim=-1, keepdim=True).detach()
        c = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(DH)) * torch.exp(log_d - m)
        normaliser = torch.maximum(c.sum(dim=-1, keepdim=True).abs(), torch.exp(-m))
        h = (c / (normaliser + eps)) @ v
    return h.to(out_dtype)


def _matmul_dtype(q: Tensor, compute: torch.dtype) -> torch.dtype:
    """Dtype of the kernel's large matmuls: the autocast dtype when autocast is on, a half-precision input's own
    dtype, else the compute dtype (fp32 / fp64)."""
    if compute == torch.float64:
        return compute
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else compute


def _chunk_gates(ig: Tensor, fg: Tensor, scale: float) -> Tuple[Tensor, ...]:
    """Within-chunk log-decays shared by forward and backward, all (B, NH, NC, L) or (B, NH, NC).

    b: cumulative log forget gate inside each chunk; g = b at the chunk end; u: weight of token s in its chunk's
    end state (times the key scale), stabilised by the chunk's own maximum m_loc."""
    b = torch.cumsum(F.logsigmoid(fg), dim=-1)
    g = b[..., -1]
    log_u = g.unsqueeze(-1) - b + ig
    m_loc = log_u.amax(dim=-1)
    u = torch.exp(log_u - m_loc.unsqueeze(-1)) * scale
    return b, g, u, m_loc


def _intra_weights(b: Tensor, ig: Tensor, m_in: Tensor, m: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Stabilised intra-chunk decay matrix W (B, NH, NC, L, L), inter-chunk weights (B, NH, NC, L) and the
    per-token stabiliser m (B, NH, NC, L); backward passes forward's ``m`` instead of recomputing it."""
    L = b.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=b.device).tril()
    log_d = (b.unsqueeze(-1) - b.unsqueeze(-2) + ig.unsqueeze(-2)).masked_fill_(~causal, float("-inf"))
    log_inter = b + m_in.unsqueeze(-1)
    if m is None:
        m = torch.maximum(log_inter, log_d.amax(dim=-1))
    w = log_d.sub_(m.unsqueeze(-1)).exp_()
    return w, torch.exp(log_inter - m), m


class _ChunkwiseMLSTM(torch.autograd.Function):
    """Chunkwise mLSTM with a hand-written backward (TFLA / gated linear attention style, see DESIGN notes).

    Forward keeps q, k, v (with a column of ones appended to v, so that the numerator and the normaliser come from
    one matmul), the gates, the per-token stabiliser and normaliser, and the states entering each chunk; nothing
    L x L survives to backward. The stabilisers carry no gradient (they cancel exactly, apart from the eps term).
    Backward: intra-chunk parts batched over chunks, one reverse recurrence over chunks for the state gradient,
    and the gate gradients from the identities di_s = k_s . dk_s and dF_t = q_t . dq_t - k_t . dk_t.

    Inputs are already cast and padded: q, k (B, NH, NC, L, DH), v1 (B, NH, NC, L, DHV + 1), ig, fg
    (B, NH, NC, L), c0 (B, NH, DH, DHV + 1), m0 (B, NH).
    """

    @staticmethod
    def forward(ctx, q, k, v1, ig, fg, c0, m0, eps: float, mm_dtype: torch.dtype):
        B, NH, NC, L, DH = q.shape
        scale = 1.0 / math.sqrt(DH)
        b, g, u, m_loc = _chunk_gates(ig, fg, scale)
        qm, km, vm = q.to(mm_dtype), k.to(mm_dtype), v1.to(mm_dtype)
        kv = ((km * u.unsqueeze(-1).to(mm_dtype)).transpose(-2, -1) @ vm).to(q.dtype)  # (B, NH, NC, DH, DHV+1)
        c_in = q.new_empty((B, NH, NC, DH, v1.shape[-1]))
        m_in = q.new_empty((B, NH, NC))
        c_state, m_state = c0, m0
        for c in range(NC):  # NC small steps: the only sequential part
            c_in[:, :, c] = c_state
            m_in[:, :, c] = m_state
            m_new = torch.maximum(g[..., c] + m_state, m_loc[..., c])
            c_state = (torch.exp(g[..., c] + m_state - m_new)[..., None, None] * c_state
                       + torch.exp(m_loc[..., c] - m_new)[..., None, None] * kv[:, :, c])
            m_state = m_new
        w, w_inter, m = _intra_weights(b, ig, m_in)
        scores = (qm @ km.transpose(-2, -1)).to(q.dtype).mul_(w).mul_(scale)  # P(t, s), (B, NH, NC, L, L)
        num = (scores.to(mm_dtype) @ vm).to(q.dtype)
        num += w_inter.unsqueeze(-1) * (qm @ c_in.to(mm_dtype)).to(q.dtype)
        denom = num[..., -1]
        normaliser = torch.maximum(denom.abs(), torch.exp(-m)) + eps
        h = num[..., :-1] / normaliser.unsqueeze(-1)
        ctx.save_for_backward(q, k, v1, ig, fg, c_in, m_in, c_state, m_state, h, denom, normaliser, m)
        ctx.mm_dtype = mm_dtype
        ctx.mark_non_differentiable(m_state)
        return h, c_state, m_state

    @staticmethod
    def backward(ctx, dh, dc_final, _dm_final):
        q, k, v1, ig, fg, c_in, m_in, c_final, m_final, h, denom, normaliser, m = ctx.saved_tensors
        mm = ctx.mm_dtype
        B, NH, NC, L, DH = q.shape
        scale = 1.0 / math.sqrt(DH)
        with _no_autocast(q.device.type):
            dh = dh.to(q.dtype)
            b, g, u, m_loc = _chunk_gates(ig, fg, scale)
            w, w_inter, _ = _intra_weights(b, ig, m_in, m)
            # h = N / n, n = max(|D|, exp(-m)) + eps with m constant
            dn = dh / normaliser.unsqueeze(-1)
            active = denom.abs() >= torch.exp(-m)
            d_denom = torch.where(active, -torch.sign(denom) * (dh * h).sum(-1) / normaliser, 0.0)
            dn1 = torch.cat([dn, d_denom.unsqueeze(-1)], dim=-1)  # gradient of [N, D]
            qm, km, vm, dnm = q.to(mm), k.to(mm), v1.to(mm), dn1.to(mm)
            # intra-chunk: P = scale * (q k^T) * W
            p = (qm @ km.transpose(-2, -1)).to(q.dtype).mul_(w).mul_(scale)
            dv1 = (p.to(mm).transpose(-2, -1) @ dnm).to(q.dtype)
            del p
            ds = (dnm @ vm.transpose(-2, -1)).to(q.dtype).mul_(w).mul_(scale)  # dP * W * scale
            dsm = ds.to(mm)
            dq = (dsm @ km).to(q.dtype)
            dk = (dsm.transpose(-2, -1) @ qm).to(q.dtype)
            del ds, dsm
            # inter-chunk: output from the entering state, then the state gradients in reverse
            dq += w_inter.unsqueeze(-1) * (dnm @ c_in.to(mm).transpose(-2, -1)).to(q.dtype)
            dc_local = ((qm * w_inter.unsqueeze(-1).to(mm)).transpose(-2, -1) @ dnm).to(q.dtype)
            grad_state = torch.zeros_like(c_final) if dc_final is None else dc_final.to(q.dtype)
            d_end_decay = (grad_state * c_final).sum((-2, -1))  # d loss / d (log-decay up to the last token)
            dkv = torch.empty_like(c_in)
            m_next = torch.cat([m_in[:, :, 1:], m_final.unsqueeze(-1)], dim=-1)  # stabiliser after each chunk
            for c in reversed(range(NC)):
                dkv[:, :, c] = torch.exp(m_loc[..., c] - m_next[..., c])[..., None, None] * grad_state
                grad_state = (dc_local[:, :, c]
                              + torch.exp(g[..., c] + m_in[:, :, c] - m_next[..., c])[..., None, None] * grad_state)
            dkvm = dkv.to(mm)
            dk += u.unsqueeze(-1) * (vm @ dkvm.transpose(-2, -1)).to(q.dtype)
            dv1 += ((km * u.unsqueeze(-1).to(mm)) @ dkvm).to(q.dtype)
            # gates: di_s = k_s . dk_s; dF_t = q_t . dq_t - k_t . dk_t; d a = reverse cumulative sum of dF
            di = (k * dk).sum(-1)
            d_cum = (q * dq).sum(-1) - di
            d_cum = d_cum.reshape(B, NH, NC * L)
            d_cum[..., -1] += d_end_decay
            da = torch.flip(torch.cumsum(torch.flip(d_cum, (-1,)), -1), (-1,)).reshape(B, NH, NC, L)
            dfg = da * torch.sigmoid(-fg)
        return dq, dk, dv1, di, dfg, grad_state, None, None, None


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

    Runs as one autograd node with its own backward (:class:`_ChunkwiseMLSTM`): memory kept for backward is
    O(S * DH + (S / L) * DH^2) per head (the inputs, per-token statistics and one state per chunk boundary); the
    L x L matrices exist only inside forward and backward. Any S works: the last chunk is padded with neutral
    tokens (input gate -> -inf, forget gate -> +inf) that change neither outputs nor state.

    Under autocast (or with half-precision inputs) the large matmuls run in that dtype; gates, stabilisers,
    exponentials, the normaliser and the carried states stay fp32.

    Args:
        chunk_size: tokens per chunk (L). 64 to 256 suit vision sequences.
        initial_state: optional (C (B, NH, DH, DHv), n (B, NH, DH), m (B, NH)) carried from a previous segment;
            gradients flow into C and n.
        return_state: also return the final (C, n, m) (differentiable in C and n).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm_dtype = _matmul_dtype(q, compute)
    with _no_autocast(q.device.type):
        q, k, v, ig, fg = _prepare(q, k, v, igate, fgate)
        B, NH, S, DH = q.shape
        DHV = v.shape[-1]
        L = min(chunk_size, S)
        NC = -(-S // L)
        pad = NC * L - S
        v1 = torch.cat([v, v.new_ones((B, NH, S, 1))], dim=-1)
        if pad:
            q, k, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v1))
            ig = F.pad(ig, (0, pad), value=-1e4)  # exp(-1e4 - m) == 0: the token writes nothing
            fg = F.pad(fg, (0, pad), value=1e4)  # logsigmoid(1e4) == 0: the state is not decayed
        if initial_state is None:
            c0 = q.new_zeros((B, NH, DH, DHV + 1))
            m0 = q.new_full((B, NH), NEG_LARGE)
        else:
            c_init, n_init, m_init = initial_state
            c0 = torch.cat([c_init.to(q.dtype), n_init.to(q.dtype).unsqueeze(-1)], dim=-1)
            m0 = m_init.to(q.dtype).detach()
        # contiguous once: bmm cannot batch a head view of a (B, S, NH * DH) projection without a copy, which each
        # matmul of forward and backward would otherwise make again
        chunked = [t.contiguous().reshape(B, NH, NC, L, t.shape[-1]) for t in (q, k, v1)]
        h, c_final, m_final = _ChunkwiseMLSTM.apply(*chunked, ig.reshape(B, NH, NC, L), fg.reshape(B, NH, NC, L),
                                                    c0, m0, eps, mm_dtype)
        h = h.reshape(B, NH, NC * L, DHV)[:, :, :S]
    h = h.to(out_dtype)
    if return_state:
        return h, (c_final[..., :-1], c_final[..., -1], m_final)
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
            c = q.new_zeros((B, NH, DH, v.shape[-1]))
            n = q.new_zeros((B, NH, DH))
            m = q.new_full((B, NH), NEG_LARGE)
        else:
            c, n, m = (t.to(q.dtype) for t in initial_state)
        outs = []
        for t in range(S):
            m_new = torch.maximum(log_f[..., t] + m, ig[..., t]).detach()  # stabiliser: no gradient
            f_scale = torch.exp(log_f[..., t] + m - m_new)
            i_scale = torch.exp(ig[..., t] - m_new)
            k_t, v_t, q_t = k[:, :, t], v[:, :, t], q[:, :, t]
            c = f_scale[..., None, None] * c + i_scale[..., None, None] * (k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
            n = f_scale[..., None] * n + i_scale[..., None] * k_t
            m = m_new
            num = (q_t.unsqueeze(-2) @ c).squeeze(-2)
            den = torch.maximum((n * q_t).sum(-1).abs(), torch.exp(-m))
            outs.append(num / (den + eps).unsqueeze(-1))
        h = torch.stack(outs, dim=2) if outs else q.new_zeros((B, NH, 0, v.shape[-1]))
    h = h.to(out_dtype)
    if return_state:
        return h, (c, n, m)
    return h


def resolve_kernel(kernel: str, seq_len: int, chunk_size: int = 64) -> str:
    """Map ``kernel`` ('auto' or a concrete name) to the concrete kernel used for a sequence of ``seq_len``."""
    if kernel not in MLSTM_KERNELS:
        raise ValueError(f"kernel must be one of {MLSTM_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "parallel" if seq_len <= AUTO_PARALLEL_MAX_LEN else "chunkwise"
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
    (activation checkpointing of the cell alone, exact). ``None`` (default): off. The chunkwise kernel's own backward
    already keeps no L x L matrix; recompute matters only for the parallel form on long sequences.
    """
    name = resolve_kernel(kernel, q.shape[-2], chunk_size)
    if recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, igate, fgate)):
        return torch.utils.checkpoint.checkpoint(mlstm, q, k, v, igate, fgate, name, chunk_size, eps, False,
                                                 use_reentrant=False)
    if name == "parallel":
        return parallel_mlstm(q, k, v, igate, fgate, eps=eps)
    if name == "chunkwise":
        return chunkwise_mlstm(q, k, v, igate, fgate, chunk_size=chunk_size, eps=eps)
    return recurrent_mlstm(q, k, v, igate, fgate, eps=eps)
