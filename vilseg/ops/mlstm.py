"""mLSTM sequence kernels: parallel (reference), chunkwise (default for long sequences) and recurrent (streaming).

vilseg owns these kernels rather than depending on ``mlstm_kernels``: that package's licence carries commercial
terms, and its native chunkwise kernel requires the chunk size to divide the sequence length (see README).

All three compute, per head, with a_t = logsigmoid(f_t) and log D(t, s) = a_{s+1} + ... + a_t + i_s (s <= t):

    m_t = max_s log D(t, s),   w(t, s) = exp(log D(t, s) - m_t)
    h_t = sum_s w(t, s) (q_t . k_s / sqrt(d)) v_s / (max(|sum_s w(t, s) (q_t . k_s / sqrt(d))|, exp(-m_t)) + eps)

Shapes (all kernels): q, k, v are (B, NH, S, DH); igate, fgate are (B, NH, S) pre-activations (a trailing
singleton dimension (B, NH, S, 1) is accepted too). The result is (B, NH, S, DH) in q's dtype; under autocast in fp32,
as autocast's own fp32 operators: it is computed in fp32, and what reads it (the ViL cell's output norm) computes in
fp32, so a cast down and back up would only lose precision.

The chunkwise kernel runs in C++ (``vilseg/ops/csrc/mlstm_chunkwise.cpp``, built by ``make install``) where it applies
(:func:`native_chunkwise_supported`: CPU float32 / float64 without autocast), the same arithmetic as its Python form
below, which serves everything else and is the reference.

The gates, the stabiliser m and every exponential are computed in fp32 even under autocast; the chunkwise kernel runs
its large matmuls in the autocast dtype and keeps q, k, v in it (the parallel and recurrent forms keep everything in
fp32). float64 inputs stay float64 (used by the tests). The stabiliser carries no gradient (it cancels apart from
eps).
"""
from __future__ import annotations

import math
from typing import List, Literal, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:  # built by `make install` (setup.py); without it the Python form runs everywhere
    from vilseg.ops import _native
except ImportError:  # pragma: no cover - depends on the installation
    _native = None

__all__ = [
    "parallel_mlstm",
    "chunkwise_mlstm",
    "ChunkwiseRecord",
    "recurrent_mlstm",
    "mlstm",
    "resolve_kernel",
    "native_chunkwise_supported",
    "MLSTM_KERNELS",
]

MLSTMKernel = Literal["auto", "parallel", "chunkwise", "recurrent"]
MLSTM_KERNELS = ("auto", "parallel", "chunkwise", "recurrent")
# 'auto' uses the parallel form up to AUTO_PARALLEL_MAX_LEN tokens (ImageNet-size grids: there it is faster than the
# chunkwise form, forward + backward at ViL-T's head shape on CPU) and the chunkwise form beyond (linear memory).
AUTO_PARALLEL_MAX_LEN = 200
# Chunks per group of the two-level scan over chunk states (see _scan_states).
STATE_GROUP = 16
# Stand-in for m_0 = -inf: exp(x + NEG_LARGE) underflows to 0 without producing (-inf) - (-inf) = NaN.
NEG_LARGE = -1e30


def _prepare(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor,
             qkv_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, ...]:
    """Validate shapes and cast everything to the kernel's compute dtype (fp32, or fp64 when given fp64); q, k, v
    to ``qkv_dtype`` instead where given."""
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
        gates.append(g.contiguous())  # a strided gate view slows every L x L broadcast that reads it
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # plain tensors inside: a subclass (MONAI's MetaTensor) would route every operator through its
    # __torch_function__ and changes some factory signatures; as_subclass keeps the autograd graph
    return tuple((t if type(t) is Tensor else t.as_subclass(Tensor)).to(qkv_dtype if j < 3 and qkv_dtype else dtype)
                 for j, t in enumerate((q, k, v, *gates)))


def _result_dtype(q: Tensor) -> torch.dtype:
    """Dtype of a kernel's result: q's, except under autocast, where it is fp32 as for autocast's own fp32 operators
    (the result is a normalised fp32 quotient, and the layer's output norm reads it in fp32)."""
    if q.dtype != torch.float64 and torch.is_autocast_enabled(q.device.type):
        return torch.float32
    return q.dtype


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def parallel_mlstm(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6) -> Tensor:
    """Quadratic reference form: materialises the S x S decay matrix per head (O(S^2) memory)."""
    out_dtype = _result_dtype(q)
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


def native_chunkwise_supported(q: Tensor, matmul_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether :func:`chunkwise_mlstm` runs its C++ form on inputs like q: the extension is built, q is a CPU tensor,
    the matmuls run in q's float32 / float64 (no autocast: ``matmul_dtype``, default that of the current autocast
    state), and nothing traces, compiles or intercepts the operators (TorchScript tracing, ``torch.compile``, a
    dispatch mode such as fake tensors, the live-memory tracker or a FLOP counter): those see the Python form's
    operators."""
    if matmul_dtype is None:
        matmul_dtype = _matmul_dtype(q, torch.float64 if q.dtype == torch.float64 else torch.float32)
    return (_native is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and matmul_dtype == q.dtype and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _get_current_dispatch_mode() is None)


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


def _segment_sums(g: Tensor) -> Tuple[Tensor, Tensor]:
    """seg[c, J] = the sum of the chunk log-decays g over chunks J .. c - 1 (B, NH, G + 1, G + 1; zero on and above
    the diagonal), as segment sums (no differences of long cumulative sums, which lose precision), and the mask of
    the entries on and below the diagonal."""
    T = g.shape[-1] + 1
    y = F.pad(g, (1, 0))  # y_0 = 0, y_c = g_{c-1}
    lower = torch.ones(T, T, dtype=torch.bool, device=g.device).tril(-1)
    seg = torch.cumsum(y.unsqueeze(-1).expand(*y.shape, T).masked_fill(~lower, 0.0), dim=-2)  # sum_{J<k<=c} y_k
    return seg, lower.diagonal_scatter(torch.ones(T, dtype=torch.bool, device=g.device))


def _state_weights(g: Tensor, m_loc: Tensor, m0: Tensor) -> Tuple[Tensor, Tensor]:
    """The inter-chunk recurrence unrolled into one stabilised (NC + 1) x (NC + 1) matrix per head.

    Row c is the state entering chunk c (row NC: the final state); column 0 is the initial state, column j + 1
    chunk j's own contribution. log A[c, J] = (sum of the chunk log-decays g from chunk J to chunk c - 1) + l_J with
    l = (m0, m_loc), for J <= c; the decay sums are segment sums (no differences of long cumulative sums, which
    lose precision). Returns A (B, NH, NC + 1, NC + 1), zero above the diagonal, and the row stabiliser m_state
    (B, NH, NC + 1): the same m as the step-by-step recurrence m_{c+1} = max(g_c + m_c, m_loc_c)."""
    seg, causal = _segment_sums(g)
    log_a = (seg + torch.cat([m0.unsqueeze(-1), m_loc], dim=-1).unsqueeze(-2)).masked_fill_(~causal, float("-inf"))
    m_state = log_a.amax(dim=-1)
    return log_a.sub_(m_state.unsqueeze(-1)).exp_(), m_state


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


def _states(a: Tensor, local: Tensor, initial: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """States from the chunks' own contributions ``local`` (B, NH, G, *X) and the initial state (B, NH, *X) or None
    (zero), through the weights of :func:`_state_weights`: those entering each chunk (B, NH, G, *X), contiguous,
    and the final one (B, NH, *X)."""
    B, NH, G = local.shape[:3]
    flat = local.reshape(B, NH, G, -1)
    entering, final = a[..., :G, 1:] @ flat, a[..., G:, 1:] @ flat
    if initial is not None:  # rank-one updates in place: no (G, *X) product temporary
        initial = initial.reshape(B * NH, 1, -1).to(entering.dtype)
        entering.view(B * NH, G, -1).baddbmm_(a[..., :G, :1].reshape(B * NH, G, 1), initial)
        final.view(B * NH, 1, -1).baddbmm_(a[..., G:, :1].reshape(B * NH, 1, 1), initial)
    return entering.view(local.shape), final.view(B, NH, *local.shape[3:])


def _scan_states(g: Tensor, m_loc: Tensor, m0: Tensor, kv: Tensor, nk: Tensor, c0: Optional[Tensor],
                 n0: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """States (C, n, m) entering every chunk and after the last one, from the chunks' contributions kv
    (B, NH, NC, DH, DHV) and nk (B, NH, NC, DH).

    A two-level scan: the matrix form of :func:`_state_weights` inside groups of ``STATE_GROUP`` chunks, a loop over
    the groups. One group covers a 512^2 crop at patch 16 and chunk 64; the groups keep the work linear in NC (one
    matrix over all NC chunks would cost NC^2 DH^2) with NC / STATE_GROUP sequential steps."""
    NC = g.shape[-1]
    if NC <= STATE_GROUP:
        a, m_state = _state_weights(g, m_loc, m0)
        (c_in, c_final), (n_in, n_final) = _states(a, kv, c0), _states(a, nk, n0)
        return c_in, n_in, m_state[..., :NC], c_final, n_final, m_state[..., NC]
    c_in, n_in, m_in = torch.empty_like(kv), torch.empty_like(nk), torch.empty_like(g)
    c_state, n_state, m_state = c0, n0, m0
    for start in range(0, NC, STATE_GROUP):
        part = slice(start, start + STATE_GROUP)
        a, m_all = _state_weights(g[..., part], m_loc[..., part], m_state)
        c_in[:, :, part], c_state = _states(a, kv[:, :, part], c_state)
        n_in[:, :, part], n_state = _states(a, nk[:, :, part], n_state)
        m_in[..., part], m_state = m_all[..., :-1], m_all[..., -1]
    return c_in, n_in, m_in, c_state, n_state, m_state


def _transition_weights(g: Tensor, m_states: Tensor) -> Tensor:
    """How each stored state of a group reaches the later ones: W[r, J] = exp(sum of the chunk log-decays g from
    chunk J to chunk r - 1 + m_J - m_r) for J <= r (B, NH, G + 1, G + 1), zero above the diagonal, for the G + 1
    states of a group of G chunks (those entering its chunks, then the one after it) and their stabilisers
    ``m_states`` (B, NH, G + 1). At most 1: the stabiliser recurrence m_{c+1} = max(g_c + m_c, m_loc_c)."""
    seg, causal = _segment_sums(g)
    log_w = seg + m_states.unsqueeze(-2) - m_states.unsqueeze(-1)
    return log_w.masked_fill_(~causal, float("-inf")).exp_()


def _scan_states_backward(g: Tensor, m_loc: Tensor, m_in: Tensor, m_final: Tensor, dc_in: Tensor, dn_in: Tensor,
                          dc_final: Optional[Tensor], dn_final: Optional[Tensor], initial: bool,
                          c_in: Tensor, n_in: Tensor, mm_dtype: torch.dtype) -> Tuple:
    """Transpose of :func:`_scan_states`: gradients of the chunk contributions (dkv, dnk) and of the initial state
    (or None) from those of the entering states (dc_in, dn_in) and of the final state (or None); and, per chunk c
    (B, NH, NC), the pairs that straddle it: dP * P summed over the pairs whose source lies before the chunk (or is
    the initial state) and whose target after it (or is the final state), i.e. the inner product of the state
    entering c, decayed through it, with the whole gradient of the state after it (``c_in``, ``n_in``: the states
    entering the chunks; their products with the gradients in ``mm_dtype``, as the kernel's other matrix products).
    The groups run in reverse; each one's weights are rebuilt from forward's stabilisers."""
    B, NH, NC = g.shape
    single = NC <= STATE_GROUP  # one group: its products are the results, no copy into a buffer
    if not single:
        dkv, dnk = torch.empty_like(dc_in), torch.empty_like(dn_in)
    straddling = g.new_empty(B, NH, NC)
    d_c, d_n = dc_final, dn_final  # gradient of the state after the current group
    for start in reversed(range(0, NC, STATE_GROUP)):
        part = slice(start, start + STATE_GROUP)
        a, _ = _state_weights(g[..., part], m_loc[..., part], m_in[..., start])
        G = a.shape[-1] - 1
        m_after = m_in[..., start + G] if start + G < NC else m_final
        w = _transition_weights(g[..., part], torch.cat([m_in[..., part], m_after.unsqueeze(-1)], -1))
        step = torch.diagonal(w, offset=-1, dim1=-2, dim2=-1)  # (B, NH, G): W[c + 1, c], the decay through c
        straddling[..., part] = 0.0
        a_t = a.transpose(-2, -1).reshape(B * NH, G + 1, G + 1)  # column J of A: how source J reaches every state
        grads, befores = [], []
        for d_entering, d_after, entering in ((dc_in[:, :, part], d_c, c_in[:, :, part]),
                                              (dn_in[:, :, part], d_n, n_in[:, :, part])):
            flat = d_entering.reshape(B * NH, G, -1)
            after = None if d_after is None else d_after.reshape(B * NH, 1, -1)
            grad = torch.bmm(a_t[:, 1:, :G], flat)
            if after is not None:  # the final state's gradient reaches every source: a rank-one update in place
                grad.baddbmm_(a_t[:, 1:, G:], after)
            grads.append(grad.view(d_entering.shape))
            d_before = None
            if start > 0 or initial:
                d_before = torch.bmm(a_t[:, :1, :G], flat)
                if after is not None:
                    d_before.baddbmm_(a_t[:, :1, G:], after)
                d_before = d_before.view(B, NH, *d_entering.shape[3:])
            befores.append(d_before)
            # the whole gradient of the state after chunk c reaches it from every later state r (weight W[r, c + 1]),
            # so its product with the state entering c is a weighted sum of the products <d(r), S(c)>: a G x G
            # product per head instead of the whole gradients (as large as the states)
            states_t = entering.reshape(B * NH, G, -1).transpose(1, 2).to(mm_dtype)
            gram = torch.bmm(flat.to(mm_dtype), states_t)  # (B NH, G, G): <d(r), S(c)>
            if after is not None:
                gram = torch.cat([gram, torch.bmm(after.to(mm_dtype), states_t)], 1)
            else:
                gram = F.pad(gram, (0, 0, 0, 1))
            straddling[..., part] += (w[..., 1:] * gram.to(w.dtype).view(B, NH, G + 1, G)).sum(-2) * step
        if single:
            dkv, dnk = grads
        else:
            dkv[:, :, part], dnk[:, :, part] = grads
        d_c, d_n = befores
    return dkv, dnk, d_c, d_n, straddling


def _mm_add(acc: Tensor, x: Tensor, y: Tensor, mm_dtype: torch.dtype) -> Tensor:
    """acc + x @ y for (N, *, *) batches, the product in ``mm_dtype``, accumulated into ``acc`` (a temporary of the
    kernel: no autograd here) in place: by one baddbmm when no cast is needed, else the low-precision product is
    added (and so widened) in the same pass."""
    if acc.dtype == mm_dtype:
        return acc.baddbmm_(x.to(mm_dtype), y.to(mm_dtype))
    return acc.add_(torch.bmm(x.to(mm_dtype), y.to(mm_dtype)))


class ChunkwiseRecord(NamedTuple):
    """What a :func:`chunkwise_mlstm` call computed beyond its chunk states, in the kernel's chunked layout: the
    output h (B, NH, NC, L, DHV) and per token the denominator, the normaliser and the stabiliser (B, NH, NC, L).

    A layer that recomputes its forward in backward hands the record of its first (no-autograd) call to the second
    call on the same inputs, which then skips the intra-chunk work and only rebuilds the chunk states."""

    h: Tensor
    denom: Tensor
    normaliser: Tensor
    m: Tensor


class _ChunkwiseMLSTM(torch.autograd.Function):
    """Chunkwise mLSTM with a hand-written backward (TFLA / gated linear attention style, see DESIGN notes).

    Forward keeps q, k, v, the gates, the per-token stabiliser and normaliser, and the states entering each chunk;
    nothing L x L survives to backward. The inter-chunk recurrence is a two-level scan of matrix products over chunks
    (:func:`_scan_states`; backward: the transposed products), not a loop per chunk. The stabilisers carry no
    gradient (they cancel exactly, apart from the eps term). The gate gradients come from the identities
    di_s = k_s . dk_s and dF_t = q_t . dq_t - k_t . dk_t (F: the cumulative log forget gate).

    Inputs are already cast, padded and contiguous: q, k (B, NH, NC, L, DH), v (B, NH, NC, L, DHV) in the matmul
    dtype ``mm_dtype``; ig, fg (B, NH, NC, L), c0 (B, NH, DH, DHV) and n0 (B, NH, DH) or both None (zero state), m0
    (B, NH) in the compute dtype (fp32 / fp64), which is also that of the result and of every temporary that is not a
    matmul operand. ``record``: a
    :class:`ChunkwiseRecord` of an earlier call on the same inputs (replay: forward rebuilds only the chunk states);
    ``sink``: a list that receives this call's record. ``native``: forward and backward in C++ (the caller checked
    :func:`native_chunkwise_supported`).
    """

    @staticmethod
    def forward(ctx, q, k, v, ig, fg, c0, n0, m0, eps: float, mm_dtype: torch.dtype,
                record: Optional[ChunkwiseRecord] = None, sink: Optional[List[ChunkwiseRecord]] = None,
                native: bool = False):
        B, NH, NC, L, DH = q.shape
        DHV = v.shape[-1]
        dt = ig.dtype
        if record is not None:
            h, denom, normaliser, m = record
            h = h.detach()  # a fresh alias gets this call's history (the recorded tensor keeps none)
            if h.shape != v.shape or denom.shape != ig.shape:
                raise ValueError(f"the record (h {tuple(h.shape)}, denom {tuple(denom.shape)}) is not of a call with "
                                 f"these inputs (v {tuple(v.shape)}, gates {tuple(ig.shape)})")
        if native:
            c_in, n_in, m_in, c_final, n_final, m_final, *intra = _native.chunkwise_forward(
                q, k, v, ig, fg, c0, n0, m0, eps, record is None)
            if record is None:
                h, denom, normaliser, m = intra[:4]  # (the weighted scores after them: not kept here)
                if sink is not None:
                    sink.append(ChunkwiseRecord(h, denom, normaliser, m))
            return _ChunkwiseMLSTM._saved(ctx, q, k, v, ig, fg, c0, c_in, n_in, m_in, c_final, n_final, m_final, h,
                                          denom, normaliser, m, mm_dtype, native)
        scale = 1.0 / math.sqrt(DH)
        b, g, u, m_loc = _chunk_gates(ig, fg, scale)
        q3, k3, v3 = q.view(-1, L, DH), k.view(-1, L, DH), v.view(-1, L, DHV)
        vm = v3.to(mm_dtype)
        ku = k * u.unsqueeze(-1)
        kv = torch.bmm(ku.view(-1, L, DH).to(mm_dtype).transpose(1, 2), vm).to(dt)  # (B NH NC, DH, DHV)
        c_in, n_in, m_in, c_final, n_final, m_final = _scan_states(g, m_loc, m0, kv.view(B, NH, NC, DH, DHV),
                                                                   ku.sum(-2), c0, n0)
        if record is None:
            w, w_inter, m = _intra_weights(b, ig, m_in)
            scores = torch.bmm(q3.to(mm_dtype), k3.to(mm_dtype).transpose(1, 2)).to(dt)
            scores = scores.view(w.shape).mul_(w).mul_(scale)  # P(t, s), (B, NH, NC, L, L)
            # the entering state's weight on each query, into ku's buffer (dead by now: a fresh activation-sized
            # tensor costs its page faults)
            qw = torch.mul(q, w_inter.unsqueeze(-1), out=ku)
            num = _mm_add(torch.bmm(scores.view(-1, L, L).to(mm_dtype), vm).to(dt), qw.view(-1, L, DH),
                          c_in.view(-1, DH, DHV), mm_dtype)
            denom = scores.sum(-1) + (qw @ n_in.unsqueeze(-1)).squeeze(-1)  # a matrix-vector product
            normaliser = torch.maximum(denom.abs(), torch.exp(-m)) + eps
            h = num.view(B, NH, NC, L, DHV).div_(normaliser.unsqueeze(-1))
            if sink is not None:
                sink.append(ChunkwiseRecord(h, denom, normaliser, m))
        return _ChunkwiseMLSTM._saved(ctx, q, k, v, ig, fg, c0, c_in, n_in, m_in, c_final, n_final, m_final, h, denom,
                                      normaliser, m, mm_dtype, native)

    @staticmethod
    def _saved(ctx, q, k, v, ig, fg, c0, c_in, n_in, m_in, c_final, n_final, m_final, h, denom, normaliser, m,
               mm_dtype, native):
        """Keeps what backward needs and returns forward's outputs."""
        ctx.save_for_backward(q, k, v, ig, fg, c_in, n_in, m_in, m_final, h, denom, normaliser, m)
        ctx.mm_dtype, ctx.initial, ctx.native = mm_dtype, c0 is not None, native
        ctx.mark_non_differentiable(m_final)
        ctx.set_materialize_grads(False)
        return h, c_final, n_final, m_final

    @staticmethod
    def backward(ctx, dh, dc_final, dn_final, _dm_final):
        saved = ctx.saved_tensors
        if ctx.native:
            grads = _native.chunkwise_backward(dh, dc_final, dn_final, *saved, ctx.initial)
            return (*grads, None, None, None, None, None, None)
        q, k, v, ig, fg, c_in, n_in, m_in, m_final, h, denom, normaliser, m = saved
        mm, dt = ctx.mm_dtype, ig.dtype
        B, NH, NC, L, DH = q.shape
        DHV = v.shape[-1]
        scale = 1.0 / math.sqrt(DH)
        with _no_autocast(q.device.type):
            b, g, u, m_loc = _chunk_gates(ig, fg, scale)
            w, w_inter, _ = _intra_weights(b, ig, m_in, m)
            q3, k3, v3 = q.view(-1, L, DH), k.view(-1, L, DH), v.view(-1, L, DHV)
            qm, km, vm = q3.to(mm), k3.to(mm), v3.to(mm)
            # h = N / n, n = max(|D|, exp(-m)) + eps with m constant
            dnum = q.new_empty((B, NH, NC, L, DHV), dtype=dt)
            if dh is None:
                dnum.zero_()
                d_denom = torch.zeros_like(denom)
            else:
                dh = dh.to(dt)
                torch.div(dh, normaliser.unsqueeze(-1), out=dnum)
                active = denom.abs() >= torch.exp(-m)
                d_denom = torch.where(active, -torch.sign(denom) * (dh * h).sum(-1) / normaliser, 0.0)
            dnm = dnum.view(-1, L, DHV).to(mm)
            # intra-chunk: P = scale * (q k^T) * W; N = P v, D = P 1
            p = torch.bmm(qm, km.transpose(1, 2)).to(dt).view(w.shape).mul_(w).mul_(scale)
            dv = torch.bmm(p.view(-1, L, L).to(mm).transpose(1, 2), dnm).to(dt)
            dp = torch.bmm(dnm, vm.transpose(1, 2)).to(dt).view(w.shape).add_(d_denom.unsqueeze(-1))
            # the forget gates' gradient over the pairs inside each chunk, from the pairs' dP * P directly (zero above
            # the diagonal; below, why): along the chunk, the strictly lower column sums minus row sums
            pair = p.mul_(dp)
            del p
            pair.diagonal(dim1=-2, dim2=-1).zero_()
            step = pair.sum(-2) - pair.sum(-1)  # (B, NH, NC, L): straddling pairs from position j to j + 1
            inside = torch.nn.functional.pad(torch.cumsum(step, -1)[..., :-1], (1, 0))
            del pair, step
            dsm = dp.mul_(w).mul_(scale).view(-1, L, L).to(mm)
            del dp
            # inter-chunk: output from the entering state (weights w_inter), then the state gradients through the
            # transposed state weights
            dn_w = dnum * w_inter.unsqueeze(-1)
            dd_w = d_denom * w_inter
            dq = torch.bmm(dn_w.view(-1, L, DHV).to(mm), c_in.view(-1, DH, DHV).transpose(1, 2).to(mm)).to(dt)
            dq = dq.view(q.shape).addcmul_(dd_w.unsqueeze(-1), n_in.unsqueeze(-2))
            rows_before = (q * dq).sum(-1)  # per token t: dP * P summed over the sources in earlier chunks
            dq = _mm_add(dq.view(-1, L, DH), dsm, km, mm).view(q.shape)
            dc_local = torch.bmm(qm.transpose(1, 2), dn_w.view(-1, L, DHV).to(mm)).to(dt)  # (B NH NC, DH, DHV)
            dn_local = (dd_w.unsqueeze(-2) @ q.to(dt)).squeeze(-2)  # (B, NH, NC, DH)
            dc_final = None if dc_final is None else dc_final.to(dt)
            dn_final = None if dn_final is None else dn_final.to(dt)
            dkv, dnk, dc0, dn0, straddling = _scan_states_backward(
                g, m_loc, m_in, m_final, dc_local.view(c_in.shape), dn_local, dc_final, dn_final, ctx.initial, c_in,
                n_in, mm)
            dkv3 = dkv.view(-1, DH, DHV)
            dk = torch.bmm((v * u.unsqueeze(-1)).view(-1, L, DHV).to(mm), dkv3.transpose(1, 2).to(mm)).to(dt)
            dk = dk.view(k.shape).addcmul_(u.unsqueeze(-1), dnk.unsqueeze(-2))
            cols_after = (k * dk).sum(-1)  # per token s: dP * P summed over the targets in later chunks
            dk = _mm_add(dk.view(-1, L, DH), dsm.transpose(1, 2), qm, mm).view(k.shape)
            del dsm
            dv = _mm_add(dv, (k * u.unsqueeze(-1)).view(-1, L, DH), dkv3, mm).view(v.shape)
            # gates: di_s = k_s . dk_s (dP * P over the pairs with source s); d a_j = dP * P over the pairs (t, s)
            # with s < j <= t, each set of pairs summed directly. Not as the reverse cumulative sum of q . dq - k . dk
            # over the sequence: every pair after j enters that twice and cancels, and where gates forget fast the
            # pairs' sums are mostly such terms (the diagonal above all), so the rounding of low-precision products
            # left little of the result. For j in chunk c: the pairs inside c (`inside`, above); those from an
            # earlier chunk to t >= j in c (a suffix sum of rows_before along the chunk); those from s < j in c to a
            # later chunk (a prefix sum of cols_after); and those from before c to after it (`straddling`).
            di = (k * dk).sum(-1)
            suffix = torch.flip(torch.cumsum(torch.flip(rows_before, (-1,)), -1), (-1,))
            prefix = torch.nn.functional.pad(torch.cumsum(cols_after, -1)[..., :-1], (1, 0))
            da = inside + suffix + prefix + straddling.unsqueeze(-1)
            dfg = da * torch.sigmoid(-fg)
        return dq, dk, dv, di, dfg, dc0, dn0, None, None, None, None, None, None


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
    record: Optional[ChunkwiseRecord] = None,
    return_record: bool = False,
    native: bool = True,
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
        return_record: also return this call's :class:`ChunkwiseRecord` (last in the returned tuple).
        record: the record of an earlier call on the same inputs and initial state: the output is that call's
            (forward only rebuilds the chunk states that backward needs), with this call's backward. For a layer
            that runs its forward again in backward (recompute): the second run skips the intra-chunk work.
        native: run forward and backward in C++ where :func:`native_chunkwise_supported` (False: the Python form).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = _result_dtype(q)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm_dtype = _matmul_dtype(q, compute)
    with _no_autocast(q.device.type):
        # q, k, v in the matmul dtype: under autocast they come from low-precision projections, and they feed the
        # kernel's matmuls (and its saved activations) in that dtype without a round trip through fp32
        q, k, v, ig, fg = _prepare(q, k, v, igate, fgate, qkv_dtype=mm_dtype)
        B, NH, S, DH = q.shape
        DHV = v.shape[-1]
        L = min(chunk_size, S)
        NC = -(-S // L)
        pad = NC * L - S
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            ig = F.pad(ig, (0, pad), value=-1e4)  # exp(-1e4 - m) == 0: the token writes nothing
            fg = F.pad(fg, (0, pad), value=1e4)  # logsigmoid(1e4) == 0: the state is not decayed
        if initial_state is None:
            c0 = n0 = None
            m0 = ig.new_full((B, NH), NEG_LARGE)
        else:
            c0, n0, m0 = (t.to(ig.dtype) for t in initial_state)
            m0 = m0.detach()
        # contiguous once: bmm cannot batch a head view of a (B, S, NH * DH) projection without a copy, which each
        # matmul of forward and backward would otherwise make again
        chunked = [t.contiguous().reshape(B, NH, NC, L, t.shape[-1]) for t in (q, k, v)]
        sink: Optional[List[ChunkwiseRecord]] = [] if return_record else None
        use_native = native and native_chunkwise_supported(q, mm_dtype)
        h, c_final, n_final, m_final = _ChunkwiseMLSTM.apply(
            *chunked, ig.reshape(B, NH, NC, L), fg.reshape(B, NH, NC, L), c0, n0, m0, eps, mm_dtype, record, sink,
            use_native)
        h = h.reshape(B, NH, NC * L, DHV)
        if pad:  # (a no-op slice would still cost a zero-filled gradient buffer and a copy in backward)
            h = h[:, :, :S]
    h = h.to(out_dtype)
    out = (h, (c_final, n_final, m_final)) if return_state else (h,)
    if return_record:
        out += (sink[0] if sink else record,)
    return out if len(out) > 1 else h


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
    out_dtype = _result_dtype(q)
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
    native: bool = True,
) -> Tensor:
    """Dispatch to one of the three kernels (same signature and results). See the module docstring for shapes.

    ``recompute`` (training only): keep just the kernel's inputs for backward and run its forward again there
    (activation checkpointing of the cell alone, exact). ``None`` (default): off. The chunkwise kernel's own backward
    already keeps no L x L matrix; recompute matters only for the parallel form on long sequences. ``native``: as in
    :func:`chunkwise_mlstm`.
    """
    name = resolve_kernel(kernel, q.shape[-2], chunk_size)
    if recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, igate, fgate)):
        return torch.utils.checkpoint.checkpoint(mlstm, q, k, v, igate, fgate, name, chunk_size, eps, False, native,
                                                 use_reentrant=False)
    if name == "parallel":
        return parallel_mlstm(q, k, v, igate, fgate, eps=eps)
    if name == "chunkwise":
        return chunkwise_mlstm(q, k, v, igate, fgate, chunk_size=chunk_size, eps=eps, native=native)
    return recurrent_mlstm(q, k, v, igate, fgate, eps=eps)
