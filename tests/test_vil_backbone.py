"""ViL backbone: registry, shapes at awkward sizes, direction alternation, kernels, bad input, conversion."""
import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from vilseg.models.backbones.vil import ViL
from vilseg.models.backbones.vil_convert import convert_official_vil, is_official_vil, to_official_vil

TINY = dict(embed_dims=32, num_blocks=4)


def tiny(**kw):
    kw.setdefault("arch", TINY)
    kw.setdefault("out_indices", (1, 3))
    return ViL(**kw).eval()


def test_registered_in_mmseg_registry():
    import vilseg.models  # noqa: F401
    from mmseg.registry import MODELS

    model = MODELS.build(dict(type="ViL", arch=TINY, out_indices=(3,)))
    assert isinstance(model, ViL)


@pytest.mark.parametrize("size", [(224, 224), (512, 512), (513, 769), (64, 2048)])
def test_output_shapes(size):
    model = tiny()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    grid = tuple(-(-s // 16) for s in size)
    assert [o.shape for o in outs] == [torch.Size([1, 32, *grid])] * 2


def test_presets_and_paper_sizes():
    for arch, dims in (("tiny", 192), ("small", 384), ("base", 768)):
        m = ViL(arch=arch)
        assert m.embed_dims == dims and len(m.blocks) == 12
    n_params = sum(p.numel() for p in ViL(arch="tiny").parameters())
    assert 5.0e6 < n_params < 7.0e6  # ViL-T has ~6M parameters


def test_directions_alternate_and_matter():
    """Reversing a pair's directions changes the output: a model whose blocks all read the same way would not."""
    torch.manual_seed(0)
    model = tiny(out_indices=(3,))
    for pair in model.blocks:
        assert pair.rowwise_from_top_left.layer.direction == "rowwise_from_top_left"
        assert pair.rowwise_from_bot_right.layer.direction == "rowwise_from_bot_right"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)[0]
        # a causal scan: the first token read by a top-left block cannot see later tokens; swap the directions
        for pair in model.blocks:
            pair.rowwise_from_top_left.layer.direction = "rowwise_from_bot_right"
            pair.rowwise_from_bot_right.layer.direction = "rowwise_from_top_left"
        swapped = model(x)[0]
    assert not torch.allclose(ref, swapped, atol=1e-4)


def test_top_left_block_is_causal_from_the_top_left():
    """Changing the last patch cannot change a top-left-first block's output at the first patch."""
    torch.manual_seed(0)
    model = tiny(out_indices=(0, 1))
    x = torch.randn(1, 3, 64, 64)
    x2 = x.clone()
    x2[..., 48:, 48:] += 5.0  # last 16x16 patch only
    with torch.no_grad():
        a0, a1 = model(x)
        b0, b1 = model(x2)
    # sub-block 0 (top-left first): first token unchanged apart from the 3x3 conv's reach (not near the corner)
    torch.testing.assert_close(a0[..., 0, 0], b0[..., 0, 0])
    # sub-block 1 reads from the bottom-right: the first token sees the changed patch
    assert not torch.allclose(a1[..., 0, 0], b1[..., 0, 0])


@pytest.mark.parametrize("spatial_dims,size", [(2, (48, 80)), (3, (16, 24, 32))])
def test_kernels_agree_inside_the_model(spatial_dims, size):
    torch.manual_seed(0)
    kw = dict(arch=TINY, out_indices=(3,), spatial_dims=spatial_dims, patch_size=8, img_size=size)
    model = ViL(kernel="parallel", **kw)
    x = torch.randn(2, 3, *size)
    ref = model(x)[0]
    for kernel in ("chunkwise", "recurrent"):
        for pair in model.blocks:
            for blk in pair.sub_blocks():
                blk.layer.mlstm_cell.kernel = kernel
                blk.layer.mlstm_cell.chunk_size = 7
        torch.testing.assert_close(model(x)[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_residual_stream_is_contiguous_token_rows(spatial_dims):
    """Every block (and its pre-norm) reads contiguous (B, S, D) rows in training: a channels-first stream from the
    patch embedding would make each LayerNorm copy its input in forward and backward."""
    model = tiny(spatial_dims=spatial_dims, in_channels=1 if spatial_dims == 3 else 3).train()
    seen = []
    for block in model.modules():
        if type(block).__name__ == "ViLBlock":
            block.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    size = (32, 48, 40) if spatial_dims == 3 else (64, 48)
    sum(o.mean() for o in model(torch.randn(1, 1 if spatial_dims == 3 else 3, *size))).backward()
    assert len(seen) == TINY["num_blocks"] and all(seen)


def test_backward_with_checkpointing_and_drop_path():
    torch.manual_seed(0)
    model = tiny(with_cp=True, drop_path_rate=0.1, kernel="chunkwise", chunk_size=16).train()
    x = torch.randn(2, 3, 64, 48)
    sum(o.sum() for o in model(x)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_with_cp_gives_the_default_gradients_without_nested_recompute():
    from vilseg.models.layers import ViLLayer

    torch.manual_seed(0)
    default = tiny(kernel="chunkwise", chunk_size=16).double().train()
    blockwise = tiny(with_cp=True, kernel="chunkwise", chunk_size=16).double().train()
    blockwise.load_state_dict(default.state_dict())
    layers = [m for m in blockwise.modules() if isinstance(m, ViLLayer)]
    assert layers and all(m.layer_recompute is False and m.mlstm_cell.recompute is False for m in layers)
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    for model in (default, blockwise):
        sum(o.sum() for o in model(x)).backward()
    for (name, a), b in zip(default.named_parameters(), blockwise.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_3d_cycle_scan_order_shapes_and_effect():
    torch.manual_seed(0)
    kw = dict(arch=TINY, spatial_dims=3, patch_size=8, img_size=(32, 32, 32), out_indices=(1, 3))
    fixed = ViL(scan_order="fixed", **kw).eval()
    cycle = ViL(scan_order="cycle", **kw).eval()
    cycle.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, 24, 32, 40)
    with torch.no_grad():
        a, b = fixed(x), cycle(x)
    assert [o.shape for o in a] == [o.shape for o in b] == [torch.Size([1, 32, 3, 4, 5])] * 2
    torch.testing.assert_close(a[0], b[0])  # the first pair reads D-H-W in both
    assert not torch.allclose(a[1], b[1])  # the second pair reads H-W-D with 'cycle'


@pytest.mark.parametrize("x,match", [
    (torch.zeros(1, 2, 32, 32), "3 input channels"),
    (torch.zeros(1, 3, 4, 32, 32), "4-D input"),
    (torch.zeros(1, 3, 0, 32), "empty input"),
])
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        tiny()(x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch must be one of"):
        ViL(arch="huge")
    with pytest.raises(ValueError, match="even"):
        ViL(arch=dict(embed_dims=32, num_blocks=3))
    with pytest.raises(ValueError, match="out_indices"):
        ViL(arch=TINY, out_indices=(4,))
    with pytest.raises(ValueError, match="kernel"):
        ViL(arch=TINY, kernel="flash")


@pytest.mark.parametrize("raw", [False, True])
def test_conversion_round_trip_from_public_layout(raw):
    """``to_official_vil`` (the export) against the real public layout: the state dict of a tiny public
    ``VisionLSTM2`` (tests/data/vil_public_tiny.pt; the features are checked in test_vil_public_reference.py).
    Hub layout: the export gives the public backbone tensors back (up to the rounding of +1 -1). Raw training
    layout: the renaming the public hubconf applies to raw checkpoints (preprocess 'v2', restated here) turns the
    export into the public keys, and ``convert_official_vil`` reads it like the hub layout."""
    import re
    from pathlib import Path

    ref = torch.load(Path(__file__).parent / "data" / "vil_public_tiny.pt", map_location="cpu", weights_only=True)
    public = {k: v for k, v in ref["state_dict"].items() if not k.startswith(("head.", "legacy_norm."))}
    converted = convert_official_vil(ref["state_dict"])
    exported = to_official_vil(converted, raw=raw)
    assert is_official_vil(exported)
    assert ("blocks.1.xlstm.proj_up.weight" in exported) == raw
    assert ("blocks.0.rowwise_from_bot_right.layer.conv.weight" in exported) == (not raw)
    if raw:
        back = convert_official_vil(exported)
        assert set(back) == set(converted)
        for k, v in converted.items():
            torch.testing.assert_close(back[k], v, msg=k)

        def public_rename(key):  # raw -> hub as hubconf.load_model(preprocess="v2") does it
            key = key.replace(".xlstm.", ".layer.").replace("xlstm.", "").replace(".xlstm_norm.", ".norm.")
            key = key.replace(".conv1d.", ".conv.").replace("post_blocks_norm.", "norm.")
            m = re.match(r"blocks\.(\d+)\.(.*)", key)
            if m:
                i = int(m.group(1))
                key = f"blocks.{i // 2}.{('rowwise_from_top_left', 'rowwise_from_bot_right')[i % 2]}.{m.group(2)}"
            return key

        exported = {public_rename(k): v for k, v in exported.items()}
    assert set(exported) == set(public)
    for k, v in public.items():
        torch.testing.assert_close(exported[k], v, msg=k)


def test_library_builds_whatever_default_scope_is_current():
    # a Runner with default_scope='mmengine' leaves that scope current; vilseg's builders must not depend on it
    from mmengine.registry import DefaultScope

    from vilseg.medical.registry import build_network
    from vilseg.engine.registry import build_model

    DefaultScope.get_instance("test-foreign-scope", scope_name="mmengine")
    assert DefaultScope.get_current_instance().scope_name == "mmengine"
    assert isinstance(build_model(dict(type="ViL", arch=TINY, out_indices=(3,))), ViL)
    net = build_network(dict(type="ViLUNETR", in_channels=1, out_channels=2, img_size=(32, 32, 32),
                             patch_size=8, embed_dims=48, num_blocks=2, feature_size=8))
    assert net.__class__.__name__ == "ViLUNETR"
    assert DefaultScope.get_current_instance().scope_name == "mmengine"  # restored afterwards


@pytest.mark.parametrize("bias", [True, False])
def test_block_diagonal_projections_and_folded_gates_equal_their_dense_definitions(bias):
    """The batched block-diagonal projections equal x @ blockdiag(W)^T + b, laid out per head, and the gates folded
    into them equal Linear([q, k, v]) of the cell (float64)."""
    from vilseg.models.layers.vil_block import ViLLayer, block_diagonal_heads

    torch.manual_seed(0)
    layer = ViLLayer(16, num_heads=2, proj_bias=bias).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x_conv, x_mlstm = torch.randn(2, 2, 10, 32, dtype=torch.float64).unbind(0)

    def dense(proj, x):
        y = x @ torch.block_diag(*proj.weight.unbind(0)).T
        return y if proj.bias is None else y + proj.bias

    for projs in ((layer.q_proj, layer.k_proj), (layer.v_proj,)):  # a shared input copy, and one of its own
        got = block_diagonal_heads(x_conv, projs, 2)
        for proj, y in zip(projs, got, strict=True):
            assert y.shape == (2, 2, 10, 16)
            torch.testing.assert_close(y, dense(proj, x_conv).view(2, 10, 2, 16).transpose(1, 2))
        assert all(y.is_contiguous() for y in block_diagonal_heads(x_conv[:1], projs, 2))
    torch.testing.assert_close(layer.v_proj(x_mlstm), dense(layer.v_proj, x_mlstm))
    qkv = torch.cat([dense(layer.q_proj, x_conv), dense(layer.k_proj, x_conv), dense(layer.v_proj, x_mlstm)], -1)
    igate, fgate = layer.gate_preactivations(x_conv, x_mlstm)
    torch.testing.assert_close(igate, layer.mlstm_cell.igate(qkv).transpose(1, 2))
    torch.testing.assert_close(fgate, layer.mlstm_cell.fgate(qkv).transpose(1, 2))


@pytest.mark.parametrize("bias,kernel,chunk_size", [(True, "auto", 64), (False, "auto", 64),
                                                     (True, "chunkwise", 4), (False, "chunkwise", 5)])
def test_inference_in_place_path_equals_the_autograd_path(bias, kernel, chunk_size):
    """Without autograd the layer and block work in place on their own temporaries (and the norm writes straight
    into its output layout); the results equal the out-of-place path's, and the input is left alone."""
    from vilseg.models.layers.vil_block import ViLBlock

    torch.manual_seed(0)
    block = ViLBlock(16, "rowwise_from_bot_right", proj_bias=bias, norm_bias=bias, num_heads=2, kernel=kernel,
                     chunk_size=chunk_size).double()  # parallel, chunkwise with and without a padded last chunk
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    x_before = x.clone()
    with torch.no_grad():
        fast = block(x, (3, 4))
    slow = block(x.requires_grad_(), (3, 4))
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(x.detach(), x_before)


@pytest.mark.parametrize("direction", ["rowwise_from_top_left", "rowwise_from_bot_right"])
@pytest.mark.parametrize("grid,tile_tokens,chunk_size", [((12, 10), 30, 8),  # tiles of 3 rows: 30 tokens, padded chunks
                                                          ((12, 8), 32, 8),  # tiles of whole chunks
                                                          ((5, 4, 6), 48, 16)])  # 3D: tiles of slices
def test_tiled_inference_equals_the_whole_sequence(monkeypatch, direction, grid, tile_tokens, chunk_size):
    """Without autograd a long layer runs in tiles of whole rows with halo rows for the grid convolution and the
    mLSTM state carried between tiles: equal to the untiled autograd path in float64, in either reading order."""
    import vilseg.models.layers.vil_block as vil_block

    torch.manual_seed(0)
    # on PyTorch operators (the fused ones equal them: tests/test_vil_fused_ops.py)
    block = vil_block.ViLBlock(16, direction, spatial_dims=len(grid), num_heads=2, kernel="chunkwise",
                               chunk_size=chunk_size, inference_tile_tokens=tile_tokens, fused_ops=False).double()
    block.layer.inference_tile_min_rows = 1  # tiles of a few rows: many seams on a small grid
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    calls = []
    segment = block.layer.mlstm_cell.forward_segment
    monkeypatch.setattr(block.layer.mlstm_cell, "forward_segment",
                        lambda *a, **kw: calls.append(1) or segment(*a, **kw))
    with torch.no_grad():
        tiled = block(x, grid)
    n_tiles = len(calls)
    assert n_tiles >= 3  # it did run in tiles
    whole = block(x.clone().requires_grad_(), grid).detach()
    assert len(calls) == n_tiles  # the autograd path does not tile
    torch.testing.assert_close(tiled, whole, rtol=1e-10, atol=1e-10)
    # the carried state matters: tiles that each start from a zero state give another result
    monkeypatch.setattr(block.layer.mlstm_cell, "forward_segment",
                        lambda q, k, v, igate, fgate, state, **kw: segment(q, k, v, igate, fgate, None, **kw))
    with torch.no_grad():
        assert not torch.allclose(block(x, grid), whole, atol=1e-3)


@pytest.mark.parametrize("direction", ["rowwise_from_top_left", "rowwise_from_bot_right"])
@pytest.mark.parametrize("grid,tile_tokens,chunk_size", [((12, 10), 30, 8), ((12, 10), 80, 8), ((5, 4, 6), 48, 16)])
def test_tiled_recompute_gradients_equal_the_untiled_layer(direction, grid, tile_tokens, chunk_size):
    """In recomputing training a long layer runs tile by tile, and backward recomputes one tile at a time (last
    first) carrying the state gradient back: output and the gradients of the input and of every parameter equal the
    untiled, non-recomputing layer's in float64; a frozen parameter gets none (one the cell reads directly, and one
    that reaches it through the folded q/k/v weights)."""
    import vilseg.models.layers.vil_block as vil_block

    torch.manual_seed(0)
    block = vil_block.ViLBlock(16, direction, spatial_dims=len(grid), num_heads=2, kernel="chunkwise",
                               chunk_size=chunk_size, layer_recompute=True, training_tile_tokens=tile_tokens).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    block.layer.mlstm_cell.outnorm.bias.requires_grad_(False)
    block.layer.q_proj.weight.requires_grad_(False)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64, requires_grad=True)
    out_grad = torch.randn_like(x)

    def run():
        block.zero_grad(set_to_none=True)
        x.grad = None
        y = block(x, grid)
        y.backward(out_grad)
        return y.detach(), [x.grad] + [p.grad for p in block.parameters()]

    y_tiled, g_tiled = run()
    block.layer.training_tile_tokens = 0
    block.layer.layer_recompute = False
    y_whole, g_whole = run()
    torch.testing.assert_close(y_tiled, y_whole, rtol=1e-10, atol=1e-10)
    names = ["input"] + [name for name, _ in block.named_parameters()]
    for name, a, b in zip(names, g_tiled, g_whole, strict=True):
        if name.endswith(("outnorm.bias", "q_proj.weight")):
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    # it did run tiled: the tiled function sits in the graph of the layer's output
    block.layer.training_tile_tokens = tile_tokens
    block.layer.layer_recompute = True
    y = block.layer(x, grid)
    nodes, seen = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.extend(n for n, _ in node.next_functions)
    assert any(type(n).__name__ == "_TiledInnerRecomputeBackward" for n in seen)


@pytest.mark.parametrize("form", ["cpp", "python"])
@pytest.mark.parametrize("keep", [True, False])
def test_tiled_recompute_replays_the_kept_kernel_output(monkeypatch, keep, form):
    """Recomputing training runs the kernel's intra-chunk forward once per tile (the no-autograd pass); with
    ``keep_kernel_output`` backward replays its record and runs only the kernel's backward, without it the kernel's
    forward runs again (and on the native tiles the grid convolution too). The gradients are the same either way. Both
    forms of the kernel (C++ and Python)."""
    mlstm_module = importlib.import_module("vilseg.ops.mlstm")  # the package attribute "mlstm" is the function
    import vilseg.models.layers.vil_block as vil_block

    torch.manual_seed(0)
    block = vil_block.ViLBlock(16, num_heads=2, kernel="chunkwise", chunk_size=8, layer_recompute=True,
                               training_tile_tokens=32, keep_kernel_output=keep).double()
    x = torch.randn(2, 12 * 8, 16, dtype=torch.float64, requires_grad=True)
    calls = []  # per intra-chunk pass: True for a forward, False for the kernel's backward
    conv_calls = []  # the native tiles' grid convolutions
    intra = mlstm_module._intra_weights
    native = mlstm_module._native
    if form == "python":
        monkeypatch.setattr(mlstm_module, "_native", None)
        monkeypatch.setattr(mlstm_module, "_intra_weights",
                            lambda *a: calls.append(len(a) < 4 or a[3] is None) or intra(*a))
    else:  # the tiles run straight on the extension (vil_layer's inner_tile_forward / _backward)
        vil_layer_module = importlib.import_module("vilseg.ops.vil_layer")
        recording = SimpleNamespace(**{name: getattr(native, name) for name in dir(native) if not name.startswith("_")})
        recording.chunkwise_forward = lambda *a: (calls.append(True if a[-1] else "states")
                                                  or native.chunkwise_forward(*a))
        recording.chunkwise_backward = lambda *a: calls.append(False) or native.chunkwise_backward(*a)
        recording.conv_silu_forward = lambda *a: conv_calls.append(1) or native.conv_silu_forward(*a)
        monkeypatch.setattr(vil_layer_module, "_ext", recording)
    out = block(x, (12, 8))
    n_tiles = len(calls)
    assert n_tiles == 3 and all(calls)  # forward: one intra-chunk pass per tile
    out.square().sum().backward()
    backward = calls[n_tiles:]
    assert backward.count(False) == n_tiles  # the kernel's backward, once per tile
    assert backward.count(True) == (0 if keep else n_tiles)  # its forward again only without the kept output
    if form == "cpp":  # the native tiles keep the chunk states and the conv branch with the record: without it the
        assert len(conv_calls) == n_tiles + (0 if keep else n_tiles)  # convolution runs again,
        assert "states" not in calls  # and the kernel's whole forward (never a states-only replay)
    monkeypatch.undo()
    reference = x.detach().clone().requires_grad_()
    block.layer.training_tile_tokens = 0  # untiled (checkpointed) recompute
    block(reference, (12, 8)).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-10, atol=1e-10)


def test_tiled_recompute_under_bf16_autocast_gives_finite_gradients():
    """The tiles' recompute in backward runs under the autocast state of forward."""
    import vilseg.models.layers.vil_block as vil_block

    torch.manual_seed(0)
    block = vil_block.ViLBlock(32, "rowwise_from_bot_right", kernel="chunkwise", chunk_size=16, layer_recompute=True,
                               training_tile_tokens=32)
    x = torch.randn(1, 12 * 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x, (12, 16))
        y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("grad", [True, False])
def test_residual_stream_keeps_its_dtype_under_autocast(grad):
    """Under bf16 autocast a block's layer returns bfloat16, and the residual x + y stays in x's float32 (in training
    and inference alike), not rounded to the layer's dtype."""
    import vilseg.models.layers.vil_block as vil_block

    torch.manual_seed(0)
    block = vil_block.ViLBlock(16, kernel="chunkwise", chunk_size=8)
    x = torch.randn(1, 64, 16, requires_grad=grad)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        y = block(x, (8, 8))
        layer_out = block.layer(block.norm(x), (8, 8))
    assert layer_out.dtype == torch.bfloat16 and y.dtype == torch.float32
    torch.testing.assert_close(y, x + layer_out.float(), rtol=0, atol=0)


def test_tiled_recompute_runs_under_torch_module_tracking_flop_counter():
    """torch's FlopCounterMode tracks modules with autograd hooks on their inputs (what the profiler's FLOP counts
    and training estimates run under): the tiled recompute's no-autograd forward and its autograd.grad in backward
    must not hand it views without a grad_fn or leaves; the gradients are the same as without the counter."""
    from torch.utils.flop_counter import FlopCounterMode

    import vilseg.models.layers.vil_block as vil_block

    torch.manual_seed(0)
    block = vil_block.ViLBlock(16, num_heads=2, kernel="chunkwise", chunk_size=8, layer_recompute=True,
                               training_tile_tokens=32).double()
    x = torch.randn(2, 12 * 8, 16, dtype=torch.float64, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        block(x, (12, 8)).square().sum().backward()
    block(reference, (12, 8)).square().sum().backward()
    assert counter.get_total_flops() > 0
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-12, atol=1e-12)


def test_tile_sizes_reach_every_layer_and_bad_ones_are_refused():
    """The backbone's tile sizes are every layer's (a config sets them); 0 turns tiling off; anything else that is
    not a non-negative int is one error naming the argument."""
    from vilseg.models.backbones import ViL
    from vilseg.models.layers.vil_block import ViLLayer

    model = ViL(arch=dict(embed_dims=16, num_blocks=2), img_size=64, patch_size=4, out_indices=(1,),
                inference_tile_tokens=0, training_tile_tokens=64, keep_kernel_output=False)
    layers = [m for m in model.modules() if isinstance(m, ViLLayer)]
    assert len(layers) == 2 and all(m.inference_tile_tokens == 0 and m.training_tile_tokens == 64 for m in layers)
    assert not any(m._keeps_kernel_output(256) for m in layers)
    from vilseg.models.layers.vil_block import KEEP_KERNEL_OUTPUT_MAX_TOKENS

    from vilseg.models.layers.vil_block import INFERENCE_TILE_MIN_ROWS

    # an inference tile holds about inference_tile_tokens tokens, but never fewer rows than the minimum (long rows:
    # the halo rows would be a large part of each tile's up-projection); training tiles follow the tokens alone
    row_len, plan = layers[0]._tile_plan(128 * 128, (128, 128), 1024, INFERENCE_TILE_MIN_ROWS)
    rows = [r1 - r0 for r0, r1, _, _ in plan]
    assert row_len == 128 and rows == [INFERENCE_TILE_MIN_ROWS] * (128 // INFERENCE_TILE_MIN_ROWS)
    _, plan = layers[0]._tile_plan(128 * 128, (128, 128), 1024)
    assert [r1 - r0 for r0, r1, _, _ in plan] == [8] * 16
    default = ViLLayer(16, num_heads=2)  # None: kept up to the threshold, not beyond
    assert default._keeps_kernel_output(KEEP_KERNEL_OUTPUT_MAX_TOKENS)
    assert not default._keeps_kernel_output(KEEP_KERNEL_OUTPUT_MAX_TOKENS + 1)
    from vilseg.models.layers.vil_block import KEEP_KERNEL_SCORES_MAX_TOKENS  # (the scores: up to a smaller size)

    assert KEEP_KERNEL_SCORES_MAX_TOKENS < KEEP_KERNEL_OUTPUT_MAX_TOKENS
    assert default._keeps_kernel_output(KEEP_KERNEL_SCORES_MAX_TOKENS, scores=True)
    assert not default._keeps_kernel_output(KEEP_KERNEL_SCORES_MAX_TOKENS + 1, scores=True)
    assert not any(m._keeps_kernel_output(16, scores=True) for m in layers)  # (False: nothing kept)
    # training tiles: training_tile_tokens each, two halves of a sequence shorter than twice that, none below it
    assert [default._training_tile_tokens(n) for n in (1023, 1024, 1536, 2048, 16384)] == [0, 512, 768, 1024, 1024]
    default.training_tile_tokens = 0
    assert default._training_tile_tokens(16384) == 0
    assert not layers[0]._tileable(4096, (64, 64), 0)
    assert layers[0]._tileable(256, (16, 16), 64)
    with pytest.raises(ValueError, match="training_tile_tokens must be an int >= 0"):
        ViL(arch=dict(embed_dims=16, num_blocks=2), out_indices=(1,), training_tile_tokens=-1)
    with pytest.raises(ValueError, match="keep_kernel_output must be None, True or False"):
        ViL(arch=dict(embed_dims=16, num_blocks=2), out_indices=(1,), keep_kernel_output="yes")


@pytest.mark.parametrize("budget", [0, 1.5, True, "0.4"])
def test_bad_compile_memory_budgets_are_refused(budget):
    with pytest.raises(ValueError, match=r"compile_memory_budget must be None or a number in \(0, 1\], got"):
        ViL(arch=dict(embed_dims=16, num_blocks=2), out_indices=(1,), compile_memory_budget=budget)


@pytest.mark.parametrize("group_blocks", [1, 2, 4, 8, 3])
def test_qkv_groups_of_any_size_equal_the_block_diagonal_projection(group_blocks):
    """Dense groups of 1, 2, 4 or 8 blocks within a head (and a size that does not divide a head's 8 blocks, which
    falls back to the whole head), q and k in one batched matmul: each equals x @ blockdiag(W)^T + b per head."""
    from vilseg.models.layers.vil_block import ViLLayer, apply_head_weights, head_weights

    torch.manual_seed(0)
    layer = ViLLayer(32, num_heads=2).double()  # inner 64: 2 heads of 8 blocks of 4
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 10, 64, dtype=torch.float64)
    projs = (layer.q_proj, layer.k_proj)
    got = apply_head_weights(x, [head_weights(p, 2, group_blocks) for p in projs], 2)
    for proj, y in zip(projs, got, strict=True):
        want = x @ torch.block_diag(*proj.weight.unbind(0)).T + proj.bias
        assert y.shape == (3, 2, 10, 32) and y.is_contiguous()
        torch.testing.assert_close(y, want.view(3, 10, 2, 32).transpose(1, 2))
