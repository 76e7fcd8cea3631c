"""The fused native operators of the ViL layer (vilseg.ops.vil_layer) against PyTorch operators, and the layer on
them against the layer on PyTorch operators."""
import math

import pytest
import torch
import torch.nn.functional as F

from vilseg.models.layers.vil_block import BlockDiagonalLinear, ViLBlock, ViLLayer
from vilseg.ops import vil_layer


def test_the_install_built_the_extension():
    """`make install` builds vilseg.ops._native (setup.py); without it every test below would only check the
    fallback."""
    assert vil_layer.fused_ops_built()


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(0, 7), (2, 5), (6, 7)])
def test_conv_silu_equals_conv2d_and_silu(rows, bias):
    """Forward and the gradients of input (a strided half of an up-projection, halo rows included), weight and bias
    in float64; float32 forward (vectorised exp) close."""
    torch.manual_seed(0)
    B, C, H, W = 2, 12, 7, 5
    up = torch.randn(B, H * W, 2 * C, dtype=torch.float64, requires_grad=True)
    x = up[..., :C]
    weight = torch.randn(C, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if bias else None
    out = vil_layer.conv_silu(x, weight, b, (H, W), rows)
    ref = F.silu(F.conv2d(x.reshape(B, H, W, C).permute(0, 3, 1, 2), weight, b, padding=1, groups=C))
    ref = ref.permute(0, 2, 3, 1)[:, rows[0]:rows[1]].reshape(B, -1, C)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for got, want in zip(_grads(out, [up, weight, b], g), _grads(ref, [up, weight, b], g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        args = [t.float() if t is not None else None for t in (x, weight, b)]
        ref32 = F.silu(F.conv2d(args[0].reshape(B, H, W, C).permute(0, 3, 1, 2), args[1], args[2], padding=1,
                                groups=C)).permute(0, 2, 3, 1)[:, rows[0]:rows[1]].reshape(B, -1, C)
        torch.testing.assert_close(vil_layer.conv_silu(*args[:2], args[2], (H, W), rows), ref32, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("C,rows,bias", [(32, (0, 7), True), (32, (2, 5), True), (48, (6, 7), True),
                                         (32, (1, 6), False), (12, (1, 4), True)])
def test_conv_silu_float32_equals_float64(C, rows, bias):
    """The operator pair in float32 (SIMD loops, vectorised exp; with AVX-512 and channels in whole registers its
    register-blocked form, else the generic loops: C = 12) against float64 (checked against conv2d above) on the same
    values, batch 2: forward, and backward into a new gradient and into a given one (written before
    `accumulate_from`, added to after, plus an addend on the own rows)."""
    if not vil_layer.fused_ops_built():
        pytest.skip("the extension is not built (test_the_install_built_the_extension fails)")
    ext = vil_layer._ext
    torch.manual_seed(0)
    B, H, W = 2, 7, 5
    T = (rows[1] - rows[0]) * W
    x, weight, bias = torch.randn(B, H * W, C), torch.randn(C, 9) * 0.5, torch.randn(C) if bias else None
    grad, out, addend = torch.randn(B, T, C), torch.randn(B, H * W, C), torch.randn(B, T, C)

    def run(dtype):
        a = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
        grid = (H, W, rows[0], rows[1] - rows[0])
        fwd = ext.conv_silu_forward(*a, *grid)
        new = ext.conv_silu_backward(grad.to(dtype), *a, *grid)
        into = ext.conv_silu_backward(grad.to(dtype), *a, *grid, out=out.to(dtype).clone(), accumulate_from=2 * W,
                                      addend=addend.to(dtype))
        return [fwd] + list(new) + list(into)

    for got, want in zip(run(torch.float32), run(torch.float64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("bias", [True, False])
def test_mlstm_cell_inputs_equal_the_projections_and_gates(bias):
    """q, k from one input and v from another through 4 x 4 block-diagonal projections, in the kernel's head layout,
    and the gate pre-activations linear in both inputs: forward and every gradient in float64 (also with outputs
    that reach no loss); float32 (the SIMD path) close."""
    torch.manual_seed(0)
    B, T, C, NH = 2, 5, 48, 3
    projs = [BlockDiagonalLinear(C, 4, bias=bias).double() for _ in range(3)]
    for p in projs:
        for t in p.parameters():
            torch.nn.init.normal_(t)
    up = torch.randn(B, T, 2 * C, dtype=torch.float64, requires_grad=True)
    xc, xm = up[..., :C], up[..., C:]
    gates = [torch.randn(C, 2 * NH, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    gates.append(torch.randn(2 * NH, dtype=torch.float64, requires_grad=True))
    weights, biases = [p.weight for p in projs], [p.bias for p in projs]

    def reference(xc, xm, projs, gates):
        qkv = [p(x).view(B, T, NH, C // NH).transpose(1, 2) for p, x in zip(projs, (xc, xc, xm))]
        pre = (xc @ gates[0] + xm @ gates[1] + gates[2]).transpose(1, 2)  # (B, 2 NH, T)
        return qkv + [pre[:, :NH], pre[:, NH:]]

    got = vil_layer.mlstm_cell_inputs(xc, xm, weights, biases, gates, NH)
    want = reference(xc, xm, projs, gates)
    assert [tuple(t.shape) for t in got] == [(B, NH, T, C // NH)] * 3 + [(B, NH, T)] * 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    params = [up] + weights + [b for b in biases if b is not None] + gates
    for used in (range(5), (0, 2, 4)):  # k and the forget gates reaching no loss: zero gradients
        gs = [torch.randn_like(got[i]) for i in used]
        for a, b in zip(torch.autograd.grad([got[i] for i in used], params, gs, retain_graph=True,
                                               allow_unused=True, materialize_grads=True),
                           torch.autograd.grad([want[i] for i in used], params, gs, retain_graph=True,
                                               allow_unused=True, materialize_grads=True)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        projs32 = [p.float() for p in projs]
        got32 = vil_layer.mlstm_cell_inputs(xc.float(), xm.float(), [p.weight for p in projs32],
                                            [p.bias for p in projs32], [g.float() for g in gates], NH)
        for a, b in zip(got32, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,T,C,NH", [(2, 5, 48, 3), (2, 70, 128, 4), (1, 33, 32, 1), (1, 9, 40, 5), (2, 7, 24, 2)])
def test_cell_inputs_float32_equal_float64(B, T, C, NH):
    """The operator pair in float32 (where the CPU has AVX-512: the register-blocked form for 1-4 heads of a multiple
    of 16 channels, token blocks across batch boundaries; otherwise the per-token form) against float64 (checked
    against PyTorch above) on the same values: forward, backward, and backward adding into a given input gradient."""
    if not vil_layer.fused_ops_built():
        pytest.skip("the extension is not built (test_the_install_built_the_extension fails)")
    ext = vil_layer._ext
    torch.manual_seed(0)
    G = 2 * NH
    up = torch.randn(B, T, 2 * C)
    args = [up[..., :C], up[..., C:]] + [torch.randn(C // 4, 4, 4) * 0.5 for _ in range(3)]
    args += [torch.randn(C) for _ in range(3)] + [torch.randn(C, G) * 0.2, torch.randn(C, G) * 0.2, torch.randn(G)]
    grads = [torch.randn(B, NH, T, C // NH) for _ in range(3)] + [torch.randn(B, NH, T) for _ in range(2)]
    addend = torch.randn(B, T, C)

    def run(dtype):
        a = [t.to(dtype) for t in args]
        g = [t.to(dtype) for t in grads]
        fwd = ext.cell_inputs_forward(*a, NH)
        bwd_args = g + a[:5] + a[8:10]
        bwd = ext.cell_inputs_backward(*bwd_args)
        added = ext.cell_inputs_backward(*bwd_args, dxc_addend=addend.to(dtype).clone())
        return list(fwd) + list(bwd) + list(added)

    for got, want in zip(run(torch.float32), run(torch.float64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("affine", [True, False])
def test_gated_head_norm_equals_layer_norm_skip_and_gate(affine):
    """(per-head LayerNorm with affine weight + skip * xc) * SiLU(z): forward and every gradient in float64;
    float32 close."""
    torch.manual_seed(0)
    B, NH, T, DH = 2, 3, 5, 8
    C = NH * DH
    h = torch.randn(B, NH, T, DH, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None
    skip = torch.randn(C, dtype=torch.float64, requires_grad=True)
    up = torch.randn(B, T, 2 * C, dtype=torch.float64, requires_grad=True)
    xc, z = up[..., :C], up[..., C:]

    def reference(h, w, b, skip, xc, z):
        n = F.layer_norm(h, (DH,), eps=1e-5)
        if w is not None:
            n = n * w.view(NH, 1, DH) + b.view(NH, 1, DH)
        return (n.transpose(1, 2).reshape(B, T, C) + skip * xc) * F.silu(z)

    got = vil_layer.gated_head_norm(h, w, b, skip, xc, z, 1e-5)
    want = reference(h, w, b, skip, xc, z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    inputs = [h, w, b, skip, up]
    for a, c in zip(_grads(got, inputs, g), _grads(want, inputs, g)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        args = [t.float() if t is not None else None for t in (h, w, b, skip, xc, z)]
        torch.testing.assert_close(vil_layer.gated_head_norm(*args, 1e-5), reference(*args), rtol=1e-5, atol=1e-5)


def test_bad_arguments_get_one_clear_error():
    x = torch.randn(1, 12, 8)
    with pytest.raises(ValueError, match="rows must satisfy"):
        vil_layer.conv_silu(x, torch.randn(8, 1, 3, 3), None, (3, 4), (2, 5))
    with pytest.raises(ValueError, match="odd k"):
        vil_layer.conv_silu(x, torch.randn(8, 1, 2, 2), None, (3, 4), (0, 3))
    gates = (torch.randn(8, 4), torch.randn(8, 4), torch.randn(4))
    with pytest.raises(ValueError, match=r"block weights must be \(2, 4, 4\)"):
        vil_layer.mlstm_cell_inputs(x, x, [torch.randn(4, 2, 2)] * 3, [None] * 3, gates, 2)
    with pytest.raises(ValueError, match=r"gate weights must be \(8, 4\)"):
        vil_layer.mlstm_cell_inputs(x, x, [torch.randn(2, 4, 4)] * 3, [None] * 3, gates[1:] + gates[:1], 2)
    with pytest.raises(ValueError, match="xc and z must be"):
        vil_layer.gated_head_norm(torch.randn(1, 2, 12, 4), None, None, torch.randn(8), x, x[:, :6], 1e-5)


def _block(dim: int, grid, fused, **kw) -> ViLBlock:
    torch.manual_seed(0)
    block = ViLBlock(dim, kw.pop("direction", "rowwise_from_top_left"), num_heads=2, fused_ops=fused, **kw).double()
    block.layer.inference_tile_min_rows = 1  # tiles of a few rows: many seams on a small grid
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def _run(block: ViLBlock, x: torch.Tensor, grid, train: bool):
    x = x.clone().requires_grad_(train)
    if not train:
        with torch.no_grad():
            return [block(x, grid)]
    out = block(x, grid)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return [out.detach(), x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("direction", ["rowwise_from_top_left", "rowwise_from_bot_right"])
@pytest.mark.parametrize("mode", ["tiled recompute", "untiled", "untiled recompute", "tiled inference"])
def test_layer_on_fused_operators_equals_the_layer_on_pytorch_operators(monkeypatch, mode, direction):
    """Output, input gradient and every parameter gradient of a ViL block with fused operators equal those of the
    same block on PyTorch operators in float64, in each of the layer's paths; and the fused operators did run."""
    grid = (12, 10)
    kw = dict(direction=direction, kernel="chunkwise", chunk_size=8, inference_tile_tokens=30,
              training_tile_tokens=30)
    if mode == "untiled":
        kw.update(layer_recompute=False)
    elif mode == "untiled recompute":
        kw.update(layer_recompute=True, training_tile_tokens=0)
    else:
        kw.update(layer_recompute=True)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    train = mode != "tiled inference"
    want = _run(_block(16, grid, False, **kw), x, grid, train)
    calls = []
    norm = vil_layer.gated_head_norm
    monkeypatch.setattr("vilseg.models.layers.vil_block.gated_head_norm",
                        lambda *a, **k: calls.append(1) or norm(*a, **k))
    fused = _block(16, grid, True, **kw)
    got = _run(fused, x, grid, train)
    assert calls, "the fused operators did not run"
    if mode in ("tiled recompute", "tiled inference"):
        assert len(calls) >= 4  # tile by tile
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_native_gate_fold_equals_the_layers_fold_and_its_gradients(bias):
    """The gates folded into the q/k/v projections natively (fold_gate_weights) equal the layer's autograd fold, and
    fold_gate_weights_backward gives the gradients autograd takes through it (projection weights and biases, gate
    weights and bias), in float64."""
    torch.manual_seed(0)
    layer = ViLLayer(8, num_heads=2, proj_bias=bias).double()  # inner 16: four blocks, two per head
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    projs = (layer.q_proj, layer.k_proj, layer.v_proj)
    weights, biases = [p.weight for p in projs], [p.bias for p in projs]
    gate_w, gate_b = layer._gate_parameters()
    cell = layer.mlstm_cell
    want = layer._folded_gate_weights()
    plain_weights, plain_biases = [w.detach() for w in weights], [None if b is None else b.detach() for b in biases]
    got = vil_layer.fold_gate_weights(plain_weights, plain_biases, gate_w, gate_b)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    d_folded = [torch.randn_like(t) for t in want]
    inputs = weights + [b for b in biases if b is not None] + [cell.igate.weight, cell.fgate.weight, cell.igate.bias,
                                                               cell.fgate.bias]
    expected = torch.autograd.grad(want, inputs, d_folded)
    grads = vil_layer.fold_gate_weights_backward(d_folded, plain_weights, plain_biases, gate_w)
    assert all(b is None for b in grads["proj_biases"]) == (not bias)
    actual = (list(grads["proj_weights"]) + [b for b in grads["proj_biases"] if b is not None]
              + list(grads["gate_weight"].split(2)) + list(grads["gate_bias"].split(2)))
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", ["rowwise_from_top_left", "rowwise_from_bot_right"])
@pytest.mark.parametrize("keep,bias", [(True, True), (False, True), (True, False), (None, True)])
def test_native_tiles_equal_the_autograd_tiles(monkeypatch, keep, bias, direction):
    """Where a tile's tokens fill whole chunks, recomputing training runs each tile straight on the native operators,
    forward and a hand-written backward without autograd: output, input gradient and every parameter gradient equal
    those of the same block's autograd tiles and of the untiled layer in float64, with frozen parameters (one the
    tile reads, one reaching it through the folded gate weights), with the kept kernel record and scores, with
    neither, with the record alone (None: the default's choice beyond the scores' size), with and without biases;
    and inference tiles run on the same native forward."""
    import vilseg.models.layers.vil_block as vil_block

    if keep is None:  # the record kept, its scores not
        monkeypatch.setattr(vil_block, "KEEP_KERNEL_SCORES_MAX_TOKENS", 0)

    grid = (12, 8)  # tiles of 4 rows = 32 tokens = 4 chunks of 8
    kw = dict(direction=direction, kernel="chunkwise", chunk_size=8, training_tile_tokens=32, inference_tile_tokens=32,
              layer_recompute=True, keep_kernel_output=keep, proj_bias=bias, norm_bias=bias)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    calls, kept = [], set()  # kept: what backward was handed, (the kernel record, its scores)

    def recorded(name, real):
        def call(*a, **k):
            calls.append(name)
            if name == "inner_tile_backward":
                kept.add((a[8].kernel is not None, a[8].scores is not None))
            return real(*a, **k)
        return call

    for name in ("inner_tile_forward", "inner_tile_backward"):
        monkeypatch.setattr(vil_block, name, recorded(name, getattr(vil_block, name)))

    def run(block, train=True):
        if train:
            block.layer.mlstm_cell.outnorm.weight.requires_grad_(False)
            block.layer.mlstm_cell.igate.weight.requires_grad_(False)
        return _run(block, x, grid, train)

    got = run(_block(16, grid, True, **kw))
    assert calls.count("inner_tile_forward") == 3 and calls.count("inner_tile_backward") == 3
    assert kept == {{True: (True, True), False: (False, False), None: (True, False)}[keep]}
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(vil_block, "native_chunkwise_supported", lambda *a: False)  # (the layer's check only)
        autograd_tiles = run(_block(16, grid, True, **kw))
    assert not calls
    untiled = run(_block(16, grid, True, **dict(kw, training_tile_tokens=0, layer_recompute=False)))
    for want in (autograd_tiles, untiled):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            if b is None:  # the frozen parameters
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    inference = run(_block(16, grid, True, **kw), train=False)
    assert calls == ["inner_tile_forward"] * 3
    torch.testing.assert_close(inference[0], untiled[0], rtol=1e-10, atol=1e-10)


def test_a_sequence_shorter_than_two_training_tiles_is_one_native_tile(monkeypatch):
    """Recomputing training with fewer than twice ``training_tile_tokens`` tokens: one tile (the whole sequence) on
    the native operators, two halves on the autograd tiles; the gradients equal either way."""
    import vilseg.models.layers.vil_block as vil_block

    grid = (12, 8)
    kw = dict(kernel="chunkwise", chunk_size=8, training_tile_tokens=64, layer_recompute=True)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    plans = []
    real_plan = vil_block.ViLLayer._tile_plan
    monkeypatch.setattr(vil_block.ViLLayer, "_tile_plan",
                        lambda self, *a, **k: plans.append(real_plan(self, *a, **k)[1]) or real_plan(self, *a, **k))
    native = _run(_block(16, grid, True, **kw), x, grid, True)
    assert [len(p) for p in plans] == [1]
    plans.clear()
    autograd_tiles = _run(_block(16, grid, False, **kw), x, grid, True)
    assert [len(p) for p in plans] == [2]
    for a, b in zip(native, autograd_tiles, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_layer_float32_close_and_falls_back_where_unsupported(monkeypatch):
    """float32: the fused layer is close to the operator layer; under CPU autocast (bfloat16), for 3D grids and with
    fused_ops=False the layer runs on PyTorch operators."""
    grid = (8, 8)
    x = torch.randn(2, 64, 16)
    kw = dict(kernel="chunkwise", chunk_size=8)
    ref = _block(16, grid, False, **kw).float()
    fused = _block(16, grid, None, **kw).float()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, grid), ref(x, grid), rtol=2e-5, atol=2e-5)
    monkeypatch.setattr("vilseg.models.layers.vil_block.gated_head_norm", lambda *a, **k: pytest.fail("fused"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x, grid)
    block3d = ViLBlock(16, spatial_dims=3, num_heads=2, kernel="chunkwise", chunk_size=8)
    with torch.no_grad():
        block3d(torch.randn(1, 64, 16), (4, 4, 4))
    fused.layer.fused_ops = False
    with torch.no_grad():
        fused(x, grid)


def test_fake_tensors_and_the_live_tracker_see_the_fused_layer():
    """The fused operators have shape functions: a training step of a fused ViL block runs under FakeTensorMode (the
    profiler's estimates), and the live-tensor tracker's peak of a real step agrees with the fake one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vilseg.profiling.memory import LiveTensorTracker

    grid = (12, 10)
    kw = dict(kernel="chunkwise", chunk_size=8, training_tile_tokens=30, layer_recompute=True)
    block = _block(16, grid, True, **kw).float()
    peaks = []
    for fake in (False, True):
        block.zero_grad(set_to_none=True)
        tracker = LiveTensorTracker()
        if fake:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                x = torch.randn(2, 120, 16, requires_grad=True)
        else:
            x = torch.randn(2, 120, 16, requires_grad=True)
        tracker.track(x)
        with tracker:
            if fake:
                with mode:
                    block(x, grid).sum().backward()
            else:
                block(x, grid).sum().backward()
        peaks.append(tracker.peak_bytes)
    assert peaks[0] > 0 and abs(peaks[1] - peaks[0]) <= 0.05 * peaks[0], peaks


def test_fused_ops_true_without_the_extension_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("vilseg.models.layers.vil_block.fused_ops_built", lambda: False)
    with pytest.raises(ValueError, match="not built .*make install"):
        ViLLayer(16, fused_ops=True)
    ViLLayer(16, fused_ops=None)  # auto: falls back
    with pytest.raises(ValueError, match="fused_ops must be None, True or False"):
        ViLLayer(16, fused_ops="yes")
