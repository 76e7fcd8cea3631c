"""Tests of vilseg.profiling: tracker exactness, config-built models, estimate vs real, the sweep end to end, bad
inputs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from vilseg.profiling.memory import (
    fake_mode,
    make_tracker,
    measure_peak,
    resident_bytes,
    resident_peak_bytes,
    to_fake_module,
    torch_mem_tracker_available,
)
from vilseg.utils.env import resolve_device

BACKENDS = ["live", "allocator"] + (["torch"] if torch_mem_tracker_available() else [])


# ------------------------------------------------------------------------------------------ tracker
@pytest.mark.parametrize("backend", BACKENDS)
def test_tracker_peak_equals_hand_computed(backend):
    """Known allocations and frees: the peak is the largest sum of live storages, views and in-place
    ops add nothing, tensors registered before the step count from the start."""
    pre = torch.zeros(250)  # 1000 B, registered up front
    tracker = make_tracker(backend)
    tracker.track(pre)
    assert tracker.current_bytes == 1000
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)  # +4000 -> 5000
        b = torch.empty(500, dtype=torch.float64)  # +4000 -> 9000
        view = b[:10]  # a view: same storage, +0
        b.add_(1)  # in place: +0
        del a  # -4000 -> 5000
        c = torch.empty(3000, dtype=torch.uint8)  # +3000 -> 8000
        d = b * 2  # +4000 -> 12000  <- peak
        del b, d  # b's storage lives on through `view`: -4000 -> 8000
        e = torch.empty(6, 1000, dtype=torch.float16)  # +12000 -> 20000 <- new peak
        del e, c  # -> 5000
        f = torch.empty(100)  # +400 -> 5400
    assert tracker.peak_bytes == 1000 + 4000 + 3000 + 12000
    assert tracker.current_bytes == 1000 + 4000 + 400
    del view
    # the dispatch-mode trackers follow storages after the step too (b's storage died here); the allocator's
    # figures are those of the step
    assert tracker.current_bytes == 1000 + (400 if backend != "allocator" else 4000 + 400)
    del f, pre


@pytest.mark.parametrize("backend", BACKENDS)
def test_tracker_counts_training_step_from_first_principles(backend):
    """Linear(4096 -> 1024, no bias) forward + backward on a (64, 4096) input: hand-derived peak."""
    torch.manual_seed(0)
    lin = nn.Linear(4096, 1024, bias=False)
    x = torch.randn(64, 4096)

    def step():
        y = lin(x)  # (64, 1024): 256 KiB, saved nothing but x (already live)
        y.sum().backward()

    _, pm = measure_peak(step, track=[lin, x], backend=backend)
    w, xb, yb = 4096 * 1024 * 4, 64 * 4096 * 4, 64 * 1024 * 4
    assert pm.start_bytes == w + xb
    # backward of sum gives a (64, 1024) grad_y (ones expanded from a scalar: a few bytes), then
    # grad_W = grad_y^T @ x (4 MiB) while y is still alive; the allocator also sees the contiguous copy of grad_y
    # that the matmul makes inside its operator
    inside = yb if backend == "allocator" else 0
    assert w + xb + yb + w <= pm.peak_bytes <= w + xb + yb + w + inside + 64
    assert pm.end_bytes == w + xb + w  # params, input, .grad


def test_measure_peak_reports_what_the_process_held():
    """A step that fills a 256 MiB tensor: the live growth is its size, and the process's resident high-water mark
    grows by about as much (the pages are touched); a second, smaller step after it is measured on its own (the
    high-water mark is reset first, not the process's lifetime maximum). In a fresh process, as the profiler
    measures: in this one, memory that earlier tests freed may still be resident and serve the step."""
    import subprocess
    import sys

    if resident_bytes()[0] is None:
        pytest.skip("no /proc/self/status on this platform")
    code = """
import json, torch
from vilseg.profiling.memory import measure_peak
n = 64 * 2**20  # floats: 256 MiB
measure_peak(lambda: float(torch.ones(16).sum()))  # first use: the tracker's own imports and set-up
out = []
for count in (n, n // 4):
    _, pm = measure_peak(lambda: float(torch.ones(count).sum()))
    out.append([count, pm.peak_bytes - pm.start_bytes, pm.held_bytes, pm.held_method])
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for count, live, held, held_method in json.loads(res.stdout.strip().splitlines()[-1]):
        assert live >= 4 * count
        assert held_method in ("cpu-resident", "cpu-maxrss-growth")
        if held_method == "cpu-resident":
            assert 0.9 * 4 * count <= held <= 4 * count + 64 * 2**20, (count, live, held)


def test_resident_peak_grows_by_what_a_step_touches():
    """The high-water mark the speed benchmarks read (ru_maxrss, in bytes): filling a 256 MiB tensor raises it to
    about the resident size before plus the tensor (the import's own peak may lie above that resident size, which is
    why the benchmarks warm up first), in a fresh process; freeing does not lower it."""
    import subprocess
    import sys

    if resident_peak_bytes() is None or resident_bytes()[0] is None:
        pytest.skip("no getrusage or /proc/self/status on this platform")
    code = """
import json, torch
from vilseg.profiling.memory import resident_bytes, resident_peak_bytes
resident, before = resident_bytes()[0], resident_peak_bytes()
t = torch.ones(64 * 2**20)
during = resident_peak_bytes()
del t
print(json.dumps([resident, before, during, resident_peak_bytes()]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    resident, before, during, after = json.loads(res.stdout.strip().splitlines()[-1])
    assert resident + 0.9 * 2**28 <= during <= max(before, resident + 2**28) + 64 * 2**20, (resident, before, during)
    assert after == during


def test_backends_agree_on_a_conv_net():
    if not torch_mem_tracker_available():
        pytest.skip("torch.distributed._tools not available in this build")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 8, 3, stride=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    x = torch.randn(2, 3, 32, 32)
    peaks = []
    for backend in ("live", "torch"):
        net.zero_grad(set_to_none=True)
        _, pm = measure_peak(lambda: net(x).logsumexp(-1).sum().backward(), track=[net, x], backend=backend)
        peaks.append(pm.peak_bytes)
    assert peaks[0] == peaks[1]


def test_allocator_tracker_sees_inside_operators_and_the_unwatched_path():
    """The allocator-level tracker counts memory an operator allocates and frees inside one call (at least the live
    peak on a conv net, same start and end), and it is no dispatch mode: under it the mLSTM kernel's C++ form (and
    with it the ViL layer's native tiles) runs as in an unwatched step, under the live tracker it does not. It
    refuses fake tensors."""
    from vilseg.ops.mlstm import native_chunkwise_supported
    from vilseg.ops.vil_layer import fused_ops_built

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 8, 3, stride=2), nn.Flatten())
    x = torch.randn(2, 3, 32, 32)
    peaks = {}
    for backend in ("live", "allocator"):
        net.zero_grad(set_to_none=True)
        _, pm = measure_peak(lambda: net(x).sum().backward(), track=[net, x], backend=backend)
        peaks[backend] = pm
    assert peaks["allocator"].start_bytes == peaks["live"].start_bytes
    assert peaks["allocator"].end_bytes == peaks["live"].end_bytes
    assert peaks["allocator"].peak_bytes >= peaks["live"].peak_bytes
    assert peaks["allocator"].method == "cpu-allocator"

    native = {backend: measure_peak(lambda: native_chunkwise_supported(x), backend=backend)[0]
              for backend in ("live", "allocator")}
    assert native == {"live": False, "allocator": fused_ops_built()}
    with pytest.raises(ValueError, match="fake tensors"):
        measure_peak(lambda: None, backend="allocator", fake=True)


def test_fake_estimate_equals_real_for_a_small_net():
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                             nn.Linear(8 * 16 * 16, 10))

    real_net = make()
    x = torch.randn(4, 3, 16, 16)
    _, real = measure_peak(lambda: real_net(x).sum().backward(), track=[real_net, x])
    mode = fake_mode()
    fake_net = to_fake_module(make(), mode)
    with mode:
        xf = torch.randn(4, 3, 16, 16)
        _, est = measure_peak(lambda: fake_net(xf).sum().backward(), track=[fake_net, xf], fake=True)
    assert est.method == "fake-live" and real.method == "cpu-live"
    assert est.peak_bytes == real.peak_bytes


# ------------------------------------------------------------------------------------------ models
def test_vil_t_upernet_is_the_shipped_configs_model():
    """The profiler's ViL-T + UperNet is configs/vil_upernet_ade20k.py's model: same parameters (names and
    shapes), neck and heads as building that config's model directly."""
    from vilseg.apis import load_config
    from vilseg.engine.registry import build_model as build_from_registry
    from vilseg.profiling.models import build_model

    ours = build_model("vil-t+upernet", (64, 64))
    theirs = build_from_registry(load_config("configs/vil_upernet_ade20k.py").model)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert type(ours.neck).__name__ == "Feature2Pyramid" and tuple(ours.backbone.out_indices) == (7, 11, 15, 23)
    assert type(ours.decode_head).__name__ == "ChunkedLossUPerHead"
    assert not any("SyncBatchNorm" in type(m).__name__ for m in ours.modules())  # one CPU process: BN


def test_names_map_to_configs_and_overrides():
    from vilseg.profiling.models import get_spec, model_config

    assert get_spec("vil-t").config == "configs/vil_upernet_ade20k.py" and get_spec("vil-t").kind == "backbone"
    assert get_spec("deit-t+upernet").kind == "segmentor" and get_spec("deit-t+upernet").num_classes == 150
    assert model_config("vil-t-parallel")["kernel"] == "parallel" and model_config("vil-t")["kernel"] == "auto"
    unetr = get_spec("unetr")
    assert (unetr.dims, unetr.kind, unetr.patch, unetr.multiple) == (3, "medical", 16, 16)
    assert unetr.config == "configs/medical/unetr_mni152.py" and unetr.num_classes == 3
    path = get_spec("configs/baselines/swin_t_upernet_ade20k.py+upernet")
    assert path.kind == "segmentor" and path.patch == 32
    with pytest.raises(ValueError, match="no '\\+upernet' form"):
        get_spec("unetr+upernet")


def test_3d_network_is_built_for_the_profiled_size():
    from vilseg.profiling.models import build_model

    model = build_model("unetr", (32, 32, 32), 4)
    assert tuple(model.feat_size) == (2, 2, 2)  # the 16^3 patches of a 32^3 input
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_mask_free_accuracy_equals_mmsegs_and_works_on_fake_tensors():
    """Why the worker swaps mmseg's decode-head accuracy: mmseg's indexes by a boolean mask, which fake tensors
    refuse (data-dependent output shape), so estimating a segmentor with mmseg's heads would fail."""
    from mmseg.models.decode_heads import decode_head
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    from vilseg.profiling.worker import mask_free_accuracy

    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
    target[0, :3] = 255
    expected = decode_head.accuracy(pred, target, ignore_index=255)
    with mask_free_accuracy():
        got = decode_head.accuracy(pred, target, ignore_index=255)
    torch.testing.assert_close(got.reshape(()), expected.reshape(()))
    mode = fake_mode()
    with mode:
        fp, ft = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
        with pytest.raises(DynamicOutputShapeException):
            decode_head.accuracy(fp, ft, ignore_index=255)
        with mask_free_accuracy():
            assert decode_head.accuracy(fp, ft, ignore_index=255).shape == ()


def _task(model, size, **kw):
    task = dict(model=model, size=list(size), batch=2, infer_batch=1, num_classes=5, device="cpu",
                dtype="float32", steps=["train", "infer"], estimate=True, real=True, max_mem_bytes=None,
                repeats=0, max_repeat_seconds=5.0, optimizer_step=False, backend="live", threads=None,
                count_flops=True)
    task.update(kw)
    return task


@pytest.mark.parametrize("model,size,opt", [
    ("deit-t", (48, 48), False),
    pytest.param("deit-t-sdpa+upernet", (64, 64), True, marks=pytest.mark.slow),
    pytest.param("vil-t", (48, 48), False, marks=pytest.mark.slow),
])
def test_estimate_agrees_with_real_measurement(model, size, opt):
    """Fake-tensor estimate within 5 % of the real tracked peak (train and infer), FLOPs counted."""
    from vilseg.profiling.models import get_spec
    from vilseg.profiling.worker import run_task

    if get_spec(model).unavailable_reason():
        pytest.skip(get_spec(model).unavailable_reason())
    res = run_task(_task(model, size, optimizer_step=opt))
    for step in ("train", "infer"):
        est, real = res["estimate"][step], res["real"][step]
        assert est["status"] == "ok", est
        assert real["status"] == "ok", real
        assert abs(est["peak_bytes"] - real["peak_bytes"]) <= 0.05 * real["peak_bytes"], (step, est, real)
        assert est["flops"] > 0
        assert real["peak_bytes"] > real["start_bytes"] > 0
    assert res["estimate"]["train"]["flops"] > 2 * res["estimate"]["infer"]["flops"]  # bwd ~ 2x fwd, batch 2


def test_sdpa_variant_saves_attention_memory_but_computes_the_same():
    from vilseg.profiling.models import build_model
    from vilseg.profiling.worker import run_task

    torch.manual_seed(0)
    a, b = build_model("deit-t", (64, 64)), build_model("deit-t-sdpa", (64, 64))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[-1], b(x)[-1], rtol=1e-4, atol=1e-4)
    peaks = [run_task(_task(m, (128, 128), real=False, steps=["train"], count_flops=False))["estimate"]["train"]
             ["peak_bytes"] for m in ("deit-t", "deit-t-sdpa")]
    assert peaks[1] < peaks[0]


# ------------------------------------------------------------------------------------------ sweep
def _cfg(tmp_path, **kw):
    from vilseg.profiling.settings import ProfileConfig

    base = dict(models=["deit-t"], sizes_2d=[32, 64], sizes_3d=[], repeats=1, max_repeat_seconds=5.0,
                num_classes=5, timeout_s=300.0, out_dir=str(tmp_path), quiet=True, command="pytest")
    base.update(kw)
    return ProfileConfig(**base)


@pytest.mark.slow  # worker processes: each imports torch + mmseg
def test_sweep_end_to_end_writes_csv_json_png(tmp_path):
    from vilseg.profiling.report import markdown_report, summary_tables
    from vilseg.profiling.sweep import run_profile

    report = run_profile(_cfg(tmp_path, models=["vit-t"], oom_search_gb=0.01, oom_search_max_2d=256))
    files = report["files"]
    for key in ("csv", "json", "png"):
        assert (tmp_path / f"profile_memory.{key}").exists(), key
    rows = list(csv.DictReader(open(files["csv"])))
    assert [(r["model"], r["size"], r["step"]) for r in rows] == [
        ("deit-t", "32x32", "train"), ("deit-t", "32x32", "infer"), ("deit-t", "64x64", "train"),
        ("deit-t", "64x64", "infer")]  # the old spelling vit-t names the same model
    assert all(r["status"] == "ok" and r["peak_source"] == "measured" for r in rows)
    assert all(abs(float(r["estimate_error_pct"])) < 5 for r in rows)
    # what the process held, each real step measured in a worker of its own
    assert all(float(r["held_gib"]) > 0 and r["held_method"] in ("cpu-resident", "cpu-maxrss-growth") for r in rows)
    for side in (32, 64):
        for step in ("train", "infer"):
            assert (tmp_path / "profile_memory_logs" / f"deit-t_{side}_{step}.log").exists(), (side, step)
    data = json.load(open(files["json"]))
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["dtype"] == "float32"
    assert data["machine"]["command"] == "pytest" and data["machine"]["batch_train_2d"] == 2
    fit = data["fits"][0]
    assert fit["model"] == "deit-t" and fit["train_mem_exp_all"] > 0
    # the 0.01 GiB search stops at the first size past it (or says it fits up to the limit); from 64 (over it:
    # a model of 22 MB) it goes down to 32, whose peak the sweep already has: taken from there, not run again
    (oom,) = data["oom"]
    assert oom["first_exceeding_side"] == 32 and oom["first_exceeding_gib"] == round(float(rows[0]["peak_gib"]), 3), oom
    assert not (tmp_path / "profile_memory_logs" / "deit-t_32_oomsearch.log").exists()
    assert (tmp_path / "profile_memory.png").stat().st_size > 10_000
    assert "| deit-t |" in markdown_report(report) and len(summary_tables(report)) >= 1
    from vilseg.profiling.report import main as report_main

    assert report_main([files["json"], "--out", str(tmp_path / "summary.md")]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "Command: `pytest`" in md and "| deit-t |" in md and "what the process held" in md
    assert report_main([str(tmp_path / "missing.json")]) == 2


@pytest.mark.slow
def test_sweep_records_oom_skip_and_timeout_and_goes_on(tmp_path):
    from vilseg.profiling.sweep import run_profile

    # real-only, no estimate gate: the worker's capped data segment makes the step's allocations fail
    rep = run_profile(_cfg(tmp_path / "oom", sizes_2d=[64], steps=("train",), real_only=True,
                           max_mem_gb=1e-3, cap_slack_mb=0.0))
    (row,) = rep["rows"]
    assert row["status"] == "oom", row.get("error")
    assert row["peak_gib"] is None and row["error"]
    # with the estimate: too big for the cap -> real run skipped, recorded as estimated only
    rep = run_profile(_cfg(tmp_path / "gate", sizes_2d=[64], steps=("train",), max_mem_gb=1e-3))
    (row,) = rep["rows"]
    assert row["status"] == "estimated" and row["peak_source"] == "estimated" and "cap" in row["note"]
    # a time-out is recorded and the next configuration still runs
    rep = run_profile(_cfg(tmp_path / "timeout", sizes_2d=[32], steps=("infer",), timeout_s=0.5))
    assert [r["status"] for r in rep["rows"]] == ["timeout"]


def test_refused_allocations_are_classified_as_out_of_memory():
    from vilseg.profiling.worker import classify_exception

    for exc in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] posix_memalign(&data, gAlignment, "
                                            "nbytes) == 0. 12 vs 0"),
                RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
                ImportError("libfoo.so: failed to map segment from shared object"),
                OSError(12, "Cannot allocate memory")):
        assert classify_exception(exc) == "oom", exc
    assert classify_exception(ValueError("shapes do not match")) == "error"
    # at the data-segment cap, C code that failed to allocate may raise anything
    assert classify_exception(SystemError("error return without exception set")) == "error"
    assert classify_exception(SystemError("error return without exception set"), at_memory_cap=True) == "oom"


def test_the_cap_is_detected_while_the_step_holds_its_memory():
    from vilseg.profiling.worker import _at_cap, _vmdata_bytes

    now = _vmdata_bytes()
    assert now > 0 and _at_cap(now) and _at_cap(now + 2**20)
    assert not _at_cap(now + 2**30) and not _at_cap(None)


def test_fit_exponent_recovers_power_laws():
    from vilseg.profiling.fits import extrapolate_oom_side, fit_exponent

    t = [256, 1024, 4096, 16384]
    assert math.isclose(fit_exponent(t, [3.0 * x for x in t]), 1.0)
    assert math.isclose(fit_exponent(t, [1e-6 * x ** 2 + 0 for x in t]), 2.0)
    assert fit_exponent([5], [1.0]) is None
    # 1 GiB at 1024 tokens, linear: 80 GiB at 81920 tokens = sqrt(81920 * 256) px edge
    side = extrapolate_oom_side([1.0, -math.log(1024)], 80, 2)
    assert side == round(math.sqrt(81920 * 256))


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_model_lists_known_ones():
    from vilseg.profiling.models import expand_model_names

    with pytest.raises(ValueError, match=r"unknown model 'vit-xl'.*vil-t.*deit-t"):
        expand_model_names(["vit-xl"])
    with pytest.raises(FileNotFoundError, match="no_such.py"):
        expand_model_names(["configs/no_such.py"])


def test_resolution_below_patch_size(tmp_path):
    from vilseg.profiling.settings import validate_config

    with pytest.raises(ValueError, match="resolution 8 is below the patch size 16 of model 'deit-t'"):
        validate_config(_cfg(tmp_path, sizes_2d=[8, 64]))


@pytest.mark.parametrize("device", ["cuda:7", "cuda", "tpu", "nonsense:x"])
def test_nonexistent_device(device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=r"--device"):
        resolve_device(device)


def test_cli_reports_bad_input_clearly(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "profile_memory.py"
    spec = importlib.util.spec_from_file_location("profile_memory_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert cli.main(["--models", "vit-t", "--sizes", "4"]) == 2
    assert "below the patch size" in capsys.readouterr().err
    assert cli.main(["--models", "vit-t", "--device", "cuda:7"]) == 2
    assert "cuda:7" in capsys.readouterr().err
    # the parser's defaults are ProfileConfig's
    from vilseg.profiling.settings import ProfileConfig

    args, default = cli.build_parser().parse_args([]), ProfileConfig()
    assert (args.sizes, args.timeout, args.max_mem_gb, args.out_dir) == (
        default.sizes_2d, default.timeout_s, default.max_mem_gb, default.out_dir)


def test_head_loss_option_picks_the_heads_and_rejects_unknown_values():
    from vilseg.profiling.models import build_model

    chunked = build_model("deit-t+upernet", (64, 64), 5)
    plain = build_model("deit-t+upernet", (64, 64), 5, head_loss="mmseg")
    assert type(chunked.decode_head).__name__ == "ChunkedLossUPerHead"
    assert type(chunked.auxiliary_head).__name__ == "ChunkedLossFCNHead"
    assert type(plain.decode_head).__name__ == "UPerHead" and type(plain.auxiliary_head).__name__ == "FCNHead"
    assert plain.decode_head.num_classes == 5
    with pytest.raises(ValueError, match="head_loss"):
        build_model("deit-t+upernet", (64, 64), 5, head_loss="fused")


def test_growth_checks_only_where_the_sizes_can_show_growth():
    """Profiling small sizes alone gives no growth-exponent check (fixed costs dominate there), not a false 'NO'."""
    from vilseg.profiling.fits import MIN_TOKENS_FOR_GROWTH_CHECK, memory_checks

    fits = [dict(model="deit-t", train_mem_exp_largest=0.7)]
    small = [dict(model="deit-t", step="train", tokens=t, side=int((t ** 0.5) * 16)) for t in (256, 1024)]
    assert memory_checks(small, fits) == []
    large = small + [dict(model="deit-t", step="train", tokens=MIN_TOKENS_FOR_GROWTH_CHECK, side=1024)]
    (check,) = memory_checks(large, fits)
    assert "growth exponent" in check["check"] and check["passed"] is False


def test_profiler_and_complexity_tool_share_one_vocabulary():
    from vilseg.profiling.complexity import resolve_candidate
    from vilseg.profiling.models import expand_model_names

    assert expand_model_names(["vit-t+upernet", "sequencer2d", "lambdaresnet", "deit-t"]) == [
        "deit-t+upernet", "sequencer2d-s", "lambdaresnet50", "deit-t"]
    assert [resolve_candidate(n).name for n in ("vit-t", "sequencer2d", "lambdaresnet", "deit-t")] == [
        "deit-t", "sequencer2d-s", "lambdaresnet50", "deit-t"]
    assert resolve_candidate("swin-t").backbone == resolve_candidate(
        "configs/baselines/swin_t_upernet_ade20k.py").backbone
    with pytest.raises(ValueError, match="unknown model 'deit-x'"):
        expand_model_names(["deit-x"])
    with pytest.raises(ValueError, match="unknown model 'deit-x'"):
        resolve_candidate("deit-x")
