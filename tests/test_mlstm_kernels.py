"""The three mLSTM kernels compute the same function (forward and every gradient), at any length."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vilseg.ops import chunkwise_mlstm, mlstm, parallel_mlstm, recurrent_mlstm, resolve_kernel

MLSTM = importlib.import_module("vilseg.ops.mlstm")  # the package attribute "mlstm" is the function


class _RecordingNative:
    """vilseg.ops._native with the chunkwise kernel's calls recorded: forward's ``intra`` flag, backward calls."""

    def __init__(self, native):
        self._native, self.forward_intra, self.backward_calls = native, [], 0

    def chunkwise_forward(self, *args):
        self.forward_intra.append(args[-1])
        return self._native.chunkwise_forward(*args)

    def chunkwise_backward(self, *args):
        self.backward_calls += 1
        return self._native.chunkwise_backward(*args)


@pytest.fixture(params=["cpp", "python"])
def form(request, monkeypatch):
    """Runs a test on each form of the chunkwise kernel, C++ (the default on CPU) and Python; gives the C++ form's
    call recorder (None for the Python form) and checks afterwards that the C++ form ran."""
    if request.param == "python":
        monkeypatch.setattr(MLSTM, "_native", None)
        yield None
        return
    assert MLSTM._native is not None, "`make install` builds vilseg.ops._native"
    recorder = _RecordingNative(MLSTM._native)
    monkeypatch.setattr(MLSTM, "_native", recorder)
    yield recorder
    assert recorder.forward_intra, "the C++ form did not run"


def _inputs(B, NH, S, DH, dtype=torch.float64, seed=0, gate_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, NH, S, DH, generator=g, dtype=dtype) for _ in range(3))
    igate = torch.randn(B, NH, S, generator=g, dtype=dtype) * gate_scale
    fgate = torch.randn(B, NH, S, generator=g, dtype=dtype) * gate_scale + 2.0
    return [t.requires_grad_() for t in (q, k, v, igate, fgate)]


@pytest.mark.parametrize("S,L", [(1, 16), (2, 1), (37, 8), (64, 64), (100, 7), (50, 64), (129, 32), (100, 3)])
@pytest.mark.parametrize("B", [1, 3])
def test_chunkwise_equals_parallel_forward_and_grads(S, L, B, form):
    inputs = _inputs(B, 2, S, 6)
    ref = parallel_mlstm(*inputs)
    out = chunkwise_mlstm(*inputs, chunk_size=L)
    assert out.shape == ref.shape == (B, 2, S, 6)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(ref)  # a random cotangent exercises every output element
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    g_out = torch.autograd.grad((out * w).sum(), inputs)
    for name, a, b in zip("q k v igate fgate".split(), g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("S", [1, 5, 33])
def test_recurrent_equals_parallel(S):
    inputs = _inputs(2, 3, S, 4)
    ref = parallel_mlstm(*inputs)
    out = recurrent_mlstm(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g_ref = torch.autograd.grad(ref.sum(), inputs)
    g_out = torch.autograd.grad(out.sum(), inputs)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_fp32_tolerance_and_trailing_gate_dim():
    """In fp32, chunkwise is as close to the fp64 result as the parallel reference is (outputs reach ~300)."""
    x = [t.detach() for t in _inputs(2, 4, 200, 16, seed=1)]
    truth = parallel_mlstm(*x)
    q, k, v, i, f = (t.float() for t in x)
    err_parallel = (parallel_mlstm(q, k, v, i, f).double() - truth).abs().max()
    out = chunkwise_mlstm(q, k, v, i.unsqueeze(-1), f.unsqueeze(-1), chunk_size=64)
    assert out.dtype == torch.float32
    err_chunk = (out.double() - truth).abs().max()
    assert err_chunk <= 2 * err_parallel + 1e-6, (err_chunk, err_parallel)
    torch.testing.assert_close(out.double(), truth, rtol=1e-3, atol=1e-2)


def test_state_carry_splits_a_sequence(form):
    """Feeding a sequence in two pieces with the carried state equals one pass (streaming inference)."""
    inputs = [t.detach() for t in _inputs(1, 2, 90, 5, seed=2)]
    full = parallel_mlstm(*inputs)
    first = [t[:, :, :40] for t in inputs]
    second = [t[:, :, 40:] for t in inputs]
    for fn in (recurrent_mlstm, lambda *a, **kw: chunkwise_mlstm(*a, chunk_size=16, **kw)):
        h1, state = fn(*first, return_state=True)
        h2 = fn(*second, initial_state=state)
        torch.testing.assert_close(torch.cat([h1, h2], dim=2), full, rtol=1e-9, atol=1e-10)


def test_state_carry_gradients_equal_one_pass(form):
    """Gradients flow through a carried state: two chunkwise segments equal one parallel pass in fp64."""
    inputs = _inputs(2, 2, 61, 5, seed=5)
    w = torch.randn(2, 2, 61, 5, dtype=torch.float64)
    ref = parallel_mlstm(*inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    h1, state = chunkwise_mlstm(*[t[:, :, :29] for t in inputs], chunk_size=8, return_state=True)
    h2 = chunkwise_mlstm(*[t[:, :, 29:] for t in inputs], chunk_size=16, initial_state=state)
    out = torch.cat([h1, h2], dim=2)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for name, a, b in zip("q k v igate fgate".split(), torch.autograd.grad((out * w).sum(), inputs), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=f"gradient of {name} differs")


def test_many_chunks_with_carried_and_returned_state(form):
    """More chunks than one group of the state scan (two-level scan over chunk states): a carried initial state and
    the returned final state, fp64, against the parallel form (outputs, gradients) and the recurrent one (state)."""
    from vilseg.ops.mlstm import STATE_GROUP

    inputs = _inputs(2, 2, 5 * STATE_GROUP + 3, 4, seed=8)
    S = inputs[0].shape[2]
    w = torch.randn(2, 2, S, 4, dtype=torch.float64)
    ref = parallel_mlstm(*inputs)
    _, (c_rec, n_rec, _) = recurrent_mlstm(*inputs, return_state=True)
    wc, wn = torch.randn_like(c_rec), torch.randn_like(n_rec)
    split = 2 * STATE_GROUP + 1
    h1, state = chunkwise_mlstm(*[t[:, :, :split] for t in inputs], chunk_size=1, return_state=True)
    h2, (c, n, _) = chunkwise_mlstm(*[t[:, :, split:] for t in inputs], chunk_size=2, initial_state=state,
                                    return_state=True)
    out = torch.cat([h1, h2], dim=2)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(c, c_rec, rtol=1e-9, atol=1e-10)
    loss = lambda h, c, n: (h * w).sum() + (c * wc).sum() + (n * wn).sum()  # noqa: E731
    g_ref = torch.autograd.grad(loss(ref, c_rec, n_rec), inputs)
    for name, a, b in zip("q k v igate fgate".split(), torch.autograd.grad(loss(out, c, n), inputs), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("S,L", [(37, 8), (64, 16)])
def test_replayed_record_gives_the_same_output_state_and_gradients(monkeypatch, S, L, form):
    """A call handed the record of an earlier no-autograd call on the same inputs returns that call's output without
    the intra-chunk forward (it only rebuilds the chunk states), and its backward gives the gradients of a plain call
    (fp64: inputs, carried state, returned state); a record of other inputs is refused."""
    mlstm_module = MLSTM
    inputs = _inputs(2, 2, S, 4, seed=3)
    g = torch.Generator().manual_seed(4)
    c0, n0 = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 2, 4, generator=g,
                                                                                     dtype=torch.float64)
    state = (c0.requires_grad_(), n0.requires_grad_(), torch.zeros(2, 2, dtype=torch.float64))
    with torch.no_grad():
        h_first, _, record = chunkwise_mlstm(*inputs, chunk_size=L, initial_state=state, return_state=True,
                                             return_record=True)
    intra_calls = []
    intra = mlstm_module._intra_weights
    monkeypatch.setattr(mlstm_module, "_intra_weights", lambda *a: intra_calls.append(1) or intra(*a))
    h, (c, n, _) = chunkwise_mlstm(*inputs, chunk_size=L, initial_state=state, return_state=True, record=record)
    assert intra_calls == []  # replayed: no intra-chunk forward
    assert form is None or form.forward_intra[-1] is False  # (nor in C++)
    assert torch.equal(h, h_first)
    ref, (c_ref, n_ref, _) = chunkwise_mlstm(*inputs, chunk_size=L, initial_state=state, return_state=True)
    torch.testing.assert_close(h, ref, rtol=0, atol=0)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=0)
    w, wc, wn = torch.randn_like(ref), torch.randn_like(c_ref), torch.randn_like(n_ref)
    leaves = [*inputs, c0, n0]
    got = torch.autograd.grad((h * w).sum() + (c * wc).sum() + (n * wn).sum(), leaves)
    want = torch.autograd.grad((ref * w).sum() + (c_ref * wc).sum() + (n_ref * wn).sum(), leaves)
    for name, a, b in zip("q k v igate fgate c0 n0".split(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"gradient of {name} differs")
    with pytest.raises(ValueError, match="record"):
        chunkwise_mlstm(*[t[:, :, :S - 2 * L] for t in inputs], chunk_size=L, record=record)


def test_final_state_is_differentiable(form):
    """d(final C, n) / d(inputs) of the chunkwise kernel equals the recurrent form's (autograd through every step)."""
    inputs = _inputs(1, 2, 23, 4, seed=6)
    _, (c_rec, n_rec, _) = recurrent_mlstm(*inputs, return_state=True)
    _, (c_chk, n_chk, _) = chunkwise_mlstm(*inputs, chunk_size=8, return_state=True)
    wc, wn = torch.randn_like(c_rec), torch.randn_like(n_rec)
    # the states are stored relative to their stabiliser m, which both forms compute identically
    torch.testing.assert_close(c_chk, c_rec, rtol=1e-9, atol=1e-10)
    g_rec = torch.autograd.grad((c_rec * wc).sum() + (n_rec * wn).sum(), inputs, allow_unused=True)
    g_chk = torch.autograd.grad((c_chk * wc).sum() + (n_chk * wn).sum(), inputs, allow_unused=True)
    g_rec = [torch.zeros_like(x) if g is None else g for g, x in zip(g_rec, inputs)]  # q does not enter a state
    g_chk = [torch.zeros_like(x) if g is None else g for g, x in zip(g_chk, inputs)]
    assert g_rec[2].abs().max() > 0 and g_rec[4].abs().max() > 0
    for name, a, b in zip("q k v igate fgate".split(), g_chk, g_rec):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=f"gradient of {name} differs")


def _check_extreme_gates(kernel, gate):
    """Gate pre-activations anywhere in [-1e4, 1e4], fp32: outputs and all five gradients stay finite."""
    q, k, v, i, f = (t.detach().float() for t in _inputs(2, 2, 70, 4, dtype=torch.float32, seed=7))
    if gate == "mixed":
        g = torch.Generator().manual_seed(0)
        i = (torch.rand(i.shape, generator=g) * 2 - 1) * 1e4
        f = (torch.rand(f.shape, generator=g) * 2 - 1) * 1e4
    else:
        i = torch.full_like(i, gate)
        f = f * 30
    x = [t.requires_grad_() for t in (q, k, v, i, f)]
    out = mlstm(*x, kernel=kernel, chunk_size=16)
    assert torch.isfinite(out).all(), kernel
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
    for name, gr in zip("q k v igate fgate".split(), grads):
        assert torch.isfinite(gr).all(), f"{kernel}: non-finite gradient of {name} at gate {gate}"


GATES = [-1e4, -100.0, 0.0, 100.0, 1e4, "mixed"]


@pytest.mark.parametrize("kernel", ["parallel", "recurrent"])
@pytest.mark.parametrize("gate", GATES)
def test_extreme_gates_give_finite_outputs_and_gradients(kernel, gate):
    _check_extreme_gates(kernel, gate)


@pytest.mark.parametrize("gate", GATES)
def test_extreme_gates_give_finite_chunkwise_outputs_and_gradients(gate, form):
    _check_extreme_gates("chunkwise", gate)


def test_chunkwise_runs_in_cpp_only_where_it_applies(monkeypatch):
    """The C++ form runs on CPU float32 / float64 (forward and backward) and not under autocast, under a dispatch
    mode (fake tensors, FLOP counters, the live-memory tracker see the Python form's operators) or with
    native=False; both forms give the same output and gradients in float64."""
    recorder = _RecordingNative(MLSTM._native)
    monkeypatch.setattr(MLSTM, "_native", recorder)
    inputs = _inputs(2, 2, 45, 8, seed=9)
    outs = []
    for native in (True, False):
        out = chunkwise_mlstm(*inputs, chunk_size=8, native=native)
        outs.append((out, torch.autograd.grad((out * out).sum(), inputs)))
        assert (len(recorder.forward_intra), recorder.backward_calls) == (1, 1)  # the Python call adds none
    for a, b in zip([outs[0][0], *outs[0][1]], [outs[1][0], *outs[1][1]]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    x32 = [t.detach().float().requires_grad_() for t in inputs]
    chunkwise_mlstm(*x32, chunk_size=8).sum().backward()
    assert (len(recorder.forward_intra), recorder.backward_calls) == (2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunkwise_mlstm(*x32, chunk_size=8).sum().backward()
    with _OpDtypes():
        chunkwise_mlstm(*x32, chunk_size=8).sum().backward()
    assert (len(recorder.forward_intra), recorder.backward_calls) == (2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_backward_handed_forwards_scores_equals_computing_them(dtype):
    """The C++ backward handed forward's weighted scores (as the layer's native tiles do) returns the same gradients
    as computing them again, bit for bit, with a carried state and a final-state gradient (and other scores change
    them); scores of another shape get one clear error."""
    B, NH, NC, L, DH = 2, 2, 5, 8, 6
    q, k, v, ig, fg = (t.detach().to(dtype) for t in _inputs(B, NH, NC * L, DH, seed=4))
    q, k, v = (t.view(B, NH, NC, L, DH) for t in (q, k, v))
    ig, fg = ig.view(B, NH, NC, L), fg.view(B, NH, NC, L)
    g = torch.Generator().manual_seed(5)
    c0 = torch.randn(B, NH, DH, DH, generator=g, dtype=dtype)
    n0, m0 = torch.randn(B, NH, DH, generator=g, dtype=dtype), torch.randn(B, NH, generator=g, dtype=dtype)
    c_in, n_in, m_in, c_f, n_f, m_f, h, denom, normaliser, m, scores = MLSTM._native.chunkwise_forward(
        q, k, v, ig, fg, c0, n0, m0, 1e-6, True)
    assert scores.shape == (B, NH, NC, L, L)
    dh, dc_f, dn_f = torch.randn_like(h), torch.randn_like(c_f), torch.randn_like(n_f)
    args = (dh, dc_f, dn_f, q, k, v, ig, fg, c_in, n_in, m_in, m_f, h, denom, normaliser, m, True)
    computed = MLSTM._native.chunkwise_backward(*args)
    handed = MLSTM._native.chunkwise_backward(*args, scores)
    assert len(handed) == len(computed) == 7
    for a, b in zip(handed, computed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(MLSTM._native.chunkwise_backward(*args, scores * 2)[2], computed[2])  # (they are read)
    with pytest.raises(RuntimeError, match="scores must be forward's contiguous"):
        MLSTM._native.chunkwise_backward(*args, scores[:, :, :-1])


class _OpDtypes(TorchDispatchMode):
    """Records the dtype of every matmul and exponential that runs."""

    def __init__(self):
        super().__init__()
        self.matmul, self.exp = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm", "matmul", "addmm", "baddbmm"):
            a, b = args[-2:] if name.startswith("add") else args[:2]
            # contraction length (the state-mixing products over chunks contract over at most chunks + 1) and
            # whether one side is a vector (the normaliser's products)
            self.matmul.add((a.dtype, a.shape[-1], a.shape[-2] == 1 or b.shape[-1] == 1))
        elif name in ("exp", "exp_"):
            self.exp.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_matmuls_in_low_precision_and_gates_in_fp32(dtype):
    """Under autocast the large matmuls (forward and backward) run in the autocast dtype, every exponential in fp32;
    the result stays within a stated tolerance of fp64."""
    x64 = _inputs(1, 2, 80, 16, seed=3)
    x = [t.detach().float().requires_grad_() for t in x64]
    with _OpDtypes() as seen, torch.autocast("cpu", dtype=dtype):
        out = chunkwise_mlstm(*x, chunk_size=32)
        grads = torch.autograd.grad(out.float().sum(), x)
    # S = 80, chunks of 32: 3 chunks. Every matrix-matrix product over tokens or head channels runs in the autocast
    # dtype; the products that carry the states across chunks (contracting over <= 4 chunk entries) and the
    # normaliser's matrix-vector products stay fp32
    assert {d for d, n, vec in seen.matmul if n > 4 and not vec} == {dtype}, seen.matmul
    assert {d for d, n, vec in seen.matmul if n <= 4} == {torch.float32}, seen.matmul
    assert {d for d, n, vec in seen.matmul if vec and n > 4} == {torch.float32}, seen.matmul
    assert seen.exp == {torch.float32}, seen.exp
    truth = parallel_mlstm(*x64)
    g_truth = torch.autograd.grad(truth.sum(), x64)
    # tolerance: the error that rounding the inputs alone to the autocast dtype causes (fp64 arithmetic after it);
    # the kernel's low-precision matmuls must add less than that. Errors relative to each tensor's largest entry.
    x_round = [t.detach().to(dtype).double().requires_grad_() for t in x64]
    rounded = parallel_mlstm(*x_round)
    g_rounded = torch.autograd.grad(rounded.sum(), x_round)

    def rel(a, b):
        return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())

    assert rel(out, truth) <= rel(rounded, truth), (rel(out, truth), rel(rounded, truth))
    for name, a, r, b in zip("q k v igate fgate".split(), grads, g_rounded, g_truth):
        assert rel(a, b) <= rel(r, b), (name, rel(a, b), rel(r, b))
    if dtype == torch.float16:
        assert rel(out, truth) < 0.01
    # without autocast every matmul is fp32
    with _OpDtypes() as seen32:
        chunkwise_mlstm(*x, chunk_size=32).sum().backward()
    assert {d for d, _, _ in seen32.matmul} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forget_gate_gradients_stay_accurate_where_gates_forget_fast(dtype):
    """With forget gates that decay fast (pre-activations around -2, as trained models' faster-forgetting heads),
    the forget gates' gradient is small next to the pairs' products it sums: computed as a reverse cumulative sum of
    q . dq - k . dk, those products cancel and the low-precision matmuls' rounding swamped it (errors of more than
    its own size). It stays within twice the error that rounding q, k, v alone to the autocast dtype causes (the
    gates stay fp32 in the kernel)."""
    x64 = _inputs(2, 2, 192, 32, seed=5, gate_scale=1.0)
    with torch.no_grad():
        x64[4].sub_(4.0)  # forget-gate pre-activations around -2
    x = [t.detach().float().requires_grad_() for t in x64]
    with torch.autocast("cpu", dtype=dtype):
        out = chunkwise_mlstm(*x, chunk_size=64)
        d_fgate = torch.autograd.grad(out.float().sum(), x[4])[0]
    truth = torch.autograd.grad(parallel_mlstm(*x64).sum(), x64[4])[0]
    x_round = [t.detach().to(dtype).double() if i < 3 else t.detach() for i, t in enumerate(x64)]
    x_round[4].requires_grad_()
    rounded = torch.autograd.grad(parallel_mlstm(*x_round).sum(), x_round[4])[0]

    def rel(a, b):
        return float((a.detach().double() - b).abs().max() / b.abs().max())

    assert rel(d_fgate, truth) <= 2 * rel(rounded, truth), (rel(d_fgate, truth), rel(rounded, truth))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forget_gate_gradients_summed_over_a_long_sequence_stay_accurate(dtype):
    """The sum over the tokens of the forget gates' gradient (what a forget-gate bias shared by the tokens gets),
    gates forgetting fast (pre-activations around -6), 1,024 tokens in 16 chunks: the pairs across chunk boundaries,
    taken as a reverse cumulative sum over the whole sequence, cancelled for every token before them, and their
    rounding errors added up over the sequence (errors of a third of the result in bf16, 30 times the rounding's in
    fp16). Summed directly per chunk, the result stays within 3 times the error that rounding q, k, v alone to the
    autocast dtype causes."""
    x64 = _inputs(1, 2, 1024, 32, seed=5, gate_scale=1.0)
    with torch.no_grad():
        x64[4].sub_(8.0)
    x = [t.detach().float().requires_grad_() for t in x64]
    with torch.autocast("cpu", dtype=dtype):
        out = chunkwise_mlstm(*x, chunk_size=64)
        summed = torch.autograd.grad(out.float().sum(), x[4])[0].sum(-1)
    truth = torch.autograd.grad(parallel_mlstm(*x64).sum(), x64[4])[0].sum(-1)
    x_round = [t.detach().to(dtype).double() if i < 3 else t.detach() for i, t in enumerate(x64)]
    x_round[4].requires_grad_()
    rounded = torch.autograd.grad(parallel_mlstm(*x_round).sum(), x_round[4])[0].sum(-1)

    def rel(a, b):
        return float((a.detach().double() - b).abs().max() / b.abs().max())

    assert rel(summed, truth) <= 3 * rel(rounded, truth), (rel(summed, truth), rel(rounded, truth))


def test_fp32_forget_gate_gradients_of_a_fast_forgetting_layer_stay_accurate():
    """In float32 too (the C++ form on CPU): a ViL-T layer whose forget gates decay fast (biases -6) has forget-gate
    gradients far smaller than the pairs' products they sum; they stay within 1e-3 of their largest entry of the
    float64 step's (the difference of sums came to a few percent)."""
    from vilseg.models.layers.vil_block import ViLLayer

    torch.manual_seed(0)
    layer = ViLLayer(192).train()
    with torch.no_grad():
        layer.mlstm_cell.fgate.bias.fill_(-6.0)
    x = torch.randn(1, 32 * 32, 192, dtype=torch.float64)

    def forget_gate_grads(dtype):
        layer.to(dtype)
        layer(x.to(dtype), (32, 32)).square().mean().backward()
        grads = [p.grad.double().clone() for p in (layer.mlstm_cell.fgate.weight, layer.mlstm_cell.fgate.bias)]
        layer.zero_grad(set_to_none=True)
        return grads

    truth = forget_gate_grads(torch.float64)
    for a, b in zip(forget_gate_grads(torch.float32), truth):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-3


def test_auto_kernel_choice_and_bad_arguments():
    assert resolve_kernel("auto", 16, chunk_size=64) == "parallel"
    assert resolve_kernel("auto", 196, chunk_size=64) == "parallel"  # ImageNet-size grids (14 x 14)
    assert resolve_kernel("auto", 201, chunk_size=64) == "chunkwise"
    assert resolve_kernel("auto", 256, chunk_size=512) == "chunkwise"  # one chunk: still the linear-memory form
    assert resolve_kernel("recurrent", 10) == "recurrent"
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve_kernel("flash", 10)
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="igate must be"):
        parallel_mlstm(q, q, q, torch.zeros(1, 2, 6), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        chunkwise_mlstm(q, q, q, torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), chunk_size=0)


def test_chunkwise_autograd_memory_is_linear():
    """Saved activations of chunkwise grow ~linearly with S, those of parallel quadratically."""
    def saved_bytes(fn, S):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        q, k, v, i, f = (t.detach().float().requires_grad_() for t in _inputs(1, 1, S, 16, seed=4))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q, k, v, i, f).sum()
        return total

    chunk = lambda *a: chunkwise_mlstm(*a, chunk_size=32)  # noqa: E731
    c1, c2 = saved_bytes(chunk, 512), saved_bytes(chunk, 2048)
    p1, p2 = saved_bytes(parallel_mlstm, 512), saved_bytes(parallel_mlstm, 2048)
    assert c2 / c1 < 4.6, (c1, c2)  # 4x the tokens -> ~4x the memory
    assert p2 / p1 > 12, (p1, p2)  # -> ~16x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_low_precision_qkv_for_backward_without_fp32_copies(dtype):
    """Under autocast, q, k, v that arrive in the autocast dtype (as from autocast projections) are saved for backward
    in that dtype: no fp32 copy of them is made or kept; the gates stay fp32, and the result is fp32."""
    q, k, v, i, f = (t.detach().float() for t in _inputs(1, 2, 80, 16, seed=5))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    i, f = i.requires_grad_(), f.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=dtype):
        out = chunkwise_mlstm(q, k, v, i, f, chunk_size=32)
    # tensors of q's size (padded to 3 chunks of 32): q, k, v in the autocast dtype, and the output h in fp32
    token_sized = [(t.dtype, tuple(t.shape)) for t in saved if t.shape[-1] == 16 and t.numel() >= q.numel()]
    assert sorted(d is dtype for d, _ in token_sized) == [False, True, True, True], token_sized
    assert {t.dtype for t in saved if t.shape[-1] == 32 and t.dim() == 4} == {torch.float32}  # gates (B, NH, NC, L)
    # the result in fp32 (as autocast's fp32 operators), from every kernel; outside autocast in q's dtype
    assert out.dtype == torch.float32
    with torch.autocast("cpu", dtype=dtype):
        assert {mlstm(q, k, v, i, f, kernel=name).dtype for name in ("parallel", "recurrent")} == {torch.float32}
    assert chunkwise_mlstm(q, k, v, i, f, chunk_size=32).dtype == dtype
    grads = torch.autograd.grad(out.sum(), (q, k, v, i, f))
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, torch.float32, torch.float32]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kernel", ["parallel", "chunkwise"])
def test_recompute_gives_the_same_gradients_and_keeps_only_inputs(kernel):
    inputs = _inputs(2, 2, 45, 6)
    w = torch.randn(2, 2, 45, 6, dtype=torch.float64)
    outs, grads = [], []
    for recompute in (False, True):
        out = mlstm(*inputs, kernel=kernel, chunk_size=8, recompute=recompute)
        outs.append(out)
        grads.append(torch.autograd.grad((out * w).sum(), inputs))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)

    # what stays alive for backward: with recompute, nothing beyond the five inputs (plus the output itself)
    from vilseg.profiling.memory import LiveTensorTracker

    q, k, v, i, f = (t.detach().float().requires_grad_() for t in _inputs(1, 2, 512, 16, seed=1))
    kept = {}
    for recompute in (False, True):
        tracker = LiveTensorTracker().track(q, k, v, i, f)
        base = tracker.current_bytes
        with tracker:
            out = mlstm(q, k, v, i, f, kernel=kernel, chunk_size=32, recompute=recompute)
            kept[recompute] = tracker.current_bytes - base - out.numel() * out.element_size()
        del out
    assert kept[True] == 0, kept
    # without: the parallel form keeps its S x S matrices; the chunkwise kernel keeps its inputs themselves (no
    # copy) plus the chunk-boundary states and per-token statistics, less than one more input's worth
    if kernel == "parallel":
        assert kept[False] > q.numel() * q.element_size(), kept
    else:
        assert 0 < kept[False] < q.numel() * q.element_size(), kept


def test_vil_block_keeps_less_with_layer_recompute():
    # once the chunkwise kernel keeps no L x L matrix, the layer's element-wise and small ops between its two
    # projections dominate what a ViL block keeps; layer_recompute keeps just the projections' boundaries
    from vilseg.models.layers.vil_block import ViLBlock
    from vilseg.profiling.memory import LiveTensorTracker

    def kept_per_token(layer_recompute):
        torch.manual_seed(0)
        block = ViLBlock(32, chunk_size=16, kernel="chunkwise", num_heads=2, layer_recompute=layer_recompute)
        x = torch.randn(1, 256, 32, requires_grad=True)
        tracker = LiveTensorTracker().track(block, x)
        base = tracker.current_bytes
        with tracker:
            y = block(x, (16, 16))
            kept = tracker.current_bytes - base - y.numel() * 4
            y.sum().backward()  # and backward still works
        assert x.grad is not None and torch.isfinite(x.grad).all()
        return kept / 4 / 256

    everything, layer = kept_per_token(False), kept_per_token(True)
    # layer recompute keeps the up-projection output (4 x 32), the down-projection input (2 x 32) and the
    # block's norm input / output (2 x 32) per token: 8 x 32 values, plus per-row LayerNorm statistics
    assert layer <= 8 * 32 + 8, layer
    assert layer < 0.4 * everything, (layer, everything)


@pytest.mark.parametrize("spatial", [(4, 6), (3, 4, 5)])
def test_layer_recompute_is_exact(spatial):
    from vilseg.models.layers.vil_block import ViLBlock

    torch.manual_seed(0)
    block = ViLBlock(16, "rowwise_from_bot_right", spatial_dims=len(spatial), chunk_size=8, kernel="chunkwise",
                     num_heads=2).double()
    S = int(torch.tensor(spatial).prod())
    x = torch.randn(2, S, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, S, 16, dtype=torch.float64)
    results = []
    for layer_recompute in (False, True):
        block.layer.layer_recompute = layer_recompute
        block.zero_grad()
        x.grad = None
        y = block(x, spatial)
        (y * w).sum().backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in block.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-12)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_layer_recompute_default_follows_the_token_count():
    from vilseg.models.layers.vil_block import LAYER_RECOMPUTE_MIN_TOKENS, ViLLayer

    layer = ViLLayer(16, num_heads=2)
    assert not layer._recompute(LAYER_RECOMPUTE_MIN_TOKENS - 1) and layer._recompute(LAYER_RECOMPUTE_MIN_TOKENS)
    layer.layer_recompute = False
    assert not layer._recompute(10 ** 6)


@pytest.mark.slow
def test_compiled_layers_equal_eager_layers():
    """compile_layers (torch.compile of the whole block, the layer untiled) gives eager's outputs and gradients in
    fp64, with and without the layer recompute and with a partitioner memory budget instead of it, from one graph
    per variant without graph breaks; the budget keeps less for backward than no recompute does."""
    from torch._dynamo.utils import counters

    from vilseg.models.layers.vil_block import ViLBlock

    torch.manual_seed(0)
    block = ViLBlock(16, "rowwise_from_bot_right", chunk_size=8, kernel="chunkwise", num_heads=2).double()
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    results, saved = [], []
    counters.clear()
    for compiled, recompute, budget in ((False, False, None), (True, False, None), (True, True, None),
                                        (True, True, 0.3)):
        block.compile_layers, block.layer.layer_recompute, block.compile_memory_budget = compiled, recompute, budget
        block.zero_grad()
        x.grad = None
        kept = []  # bytes of every tensor autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
            y = block(x, (4, 6))
        (y * y).sum().backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in block.parameters()]))
        saved.append(sum(kept))
    # the compiled variants really ran compiled: a graph each, nothing left to eager Python by a graph break
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    # the budget's graph recomputes part of what the graph without any recompute keeps
    assert 0 < saved[3] < 0.6 * saved[1], saved
    for y, gx, gp in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx, results[0][1], rtol=1e-10, atol=1e-12)
        for a, b in zip(gp, results[0][2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_compiled_blocks_stay_eager_where_inference_runs_in_tiles():
    """A compiled block whose layer would run tile by tile in inference (a long sequence, no autograd) runs eagerly,
    tiled, and compiles nothing: there the tiles beat the compiled untiled layer."""
    from torch._dynamo.utils import counters

    from vilseg.models.layers.vil_block import ViLBlock

    torch.manual_seed(0)
    block = ViLBlock(16, "rowwise_from_bot_right", chunk_size=8, kernel="chunkwise", num_heads=2,
                     inference_tile_tokens=16, compile_layers=True).double().eval()
    x = torch.randn(1, 8 * 6, 16, dtype=torch.float64)
    assert not block.layer.tiles_inference(x, (8, 6))  # with autograd (training): compiled
    counters.clear()
    with torch.no_grad():
        assert block.layer.tiles_inference(x, (8, 6))
        y = block(x, (8, 6))
        block.compile_layers = False
        reference = block(x, (8, 6))
    assert not counters["stats"]["unique_graphs"]
    torch.testing.assert_close(y, reference, rtol=0, atol=0)


def test_compiled_blocks_without_a_compiler_fail_with_one_clear_error(tmp_path):
    """compile_layers=True where inductor finds no C++ compiler (and nothing is cached): one error that says what
    is missing and which config setting runs the blocks eagerly, not inductor's traceback alone."""
    import os
    import subprocess
    import sys

    code = """
import torch
from vilseg.models.layers.vil_block import ViLBlock
block = ViLBlock(16, compile_layers=True, num_heads=2)
block(torch.randn(1, 16, 16, requires_grad=True), (4, 4)).sum().backward()
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: ViL's compile_layers=True: torch.compile could not compile"), last
    assert "C++ compiler" in last and "set compile_layers=False" in last


def test_kernels_accept_monai_metatensors():
    """MONAI pipelines hand MetaTensors to ViLUNETR: every kernel computes on them as on plain tensors."""
    from monai.data import MetaTensor

    plain = _inputs(1, 2, 40, 4, seed=8)
    meta = [MetaTensor(t.detach()).requires_grad_() for t in plain]
    for kernel in ("parallel", "chunkwise", "recurrent"):
        ref = mlstm(*plain, kernel=kernel, chunk_size=16)
        out = mlstm(*meta, kernel=kernel, chunk_size=16)
        torch.testing.assert_close(torch.as_tensor(out), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), meta)[4].as_tensor(),
                                   torch.autograd.grad(ref.sum(), plain)[4], rtol=1e-10, atol=1e-12)


def test_cpp_form_shows_in_the_profiler_as_vilseg_operators():
    """The C++ form's forward and backward appear in torch.profiler as vilseg:: operators (the step profile counts
    them as vilseg's native operators), their batched products inside as aten::bmm."""
    from torch.profiler import profile

    inputs = _inputs(1, 2, 40, 8, dtype=torch.float32)
    with profile() as prof:
        chunkwise_mlstm(*inputs, chunk_size=8).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"vilseg::chunkwise_forward", "vilseg::chunkwise_backward", "aten::bmm"} <= names


def test_cpp_kernel_flushes_denormals_only_while_it_runs():
    """With strongly decaying gates the C++ kernel's decay weights reach denormal floats, which it flushes to zero on
    the threads that run it (x86 spends a microcode assist on each): its float32 results stay as close to the
    float64 parallel form as the Python form's, and afterwards every thread of the pool (the caller's and PyTorch's
    workers) handles denormals again."""
    assert MLSTM._native is not None, "`make install` builds vilseg.ops._native"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
        igate = torch.randn(1, 2, 256, generator=g)
        fgate = torch.randn(1, 2, 256, generator=g) - 1.0  # forget gates around 0.27: decays of e^-90 within 70 tokens
        results = {}
        for form, dtype in (("cpp", torch.float32), ("python", torch.float32), ("fp64", torch.float64)):
            x = [t.to(dtype).requires_grad_() for t in (q, k, v, igate, fgate)]
            out = (parallel_mlstm(*x) if form == "fp64" else
                   chunkwise_mlstm(*x, chunk_size=64, native=form == "cpp"))
            grads = torch.autograd.grad((out * x[2].sum(-1, keepdim=True)).sum(), x)
            results[form] = [t.double() for t in (out, *grads)]
        for i, name in enumerate("h dq dk dv digate dfgate".split()):
            ref = results["fp64"][i]
            err_cpp, err_py = ((results[form][i] - ref).abs().max().item() for form in ("cpp", "python"))
            assert err_cpp <= 2 * err_py + 1e-7 * ref.abs().max().item(), (name, err_cpp, err_py)
        tiny = torch.full((1 << 17,), 1e-40)  # a denormal; the product runs on both threads of the pool
        assert tiny[0].item() > 0 and bool(((tiny * 1.0) > 0).all()), "denormals stay flushed after the kernel"
    finally:
        torch.set_num_threads(threads)
