"""The benchmark scripts stay runnable: each one imports what it uses and parses its arguments."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


def _load_benchmark(name: str):
    """A benchmark script as a module (its functions, without running it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_benchmark_scripts():
    assert {"vil_kernels.py", "medical_scan_order.py", "ranking_vs_training.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script, capsys, monkeypatch):
    """``python benchmarks/<script> --help``, run as __main__ in this process (which has torch and mmseg imported
    already: a fresh interpreter per script would spend seconds importing them again), with the script's folder
    first on sys.path as Python puts it; the modules it loads from that folder are dropped afterwards."""
    import runpy

    path = REPO / "benchmarks" / script
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])
    before = set(sys.modules)
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(path), run_name="__main__")
    finally:
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(path.parent)):
                del sys.modules[name]
    assert done.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_ranking_candidates_fit_their_heads():
    """Each candidate of the ranking benchmark's config builds, and its feature maps have the channels its heads
    are given (what the benchmark's training run will feed them)."""
    import torch

    from vilseg.profiling.complexity import build_backbone

    bench = _load_benchmark("ranking_vs_training")
    candidates = bench.load_candidates()
    assert len(candidates) == 8 and "vil-64x4" in candidates
    for name, parts in candidates.items():
        model = build_backbone(parts["backbone"], seed=0)  # in eval mode
        with torch.no_grad():
            outs = model(torch.randn(1, 3, bench.CROP, bench.CROP))
        assert [o.shape[1] for o in outs] == list(parts["decode_head"]["in_channels"]), name
        assert parts["auxiliary_head"]["in_channels"] == outs[2].shape[1], name


def test_layer_revisions_compares_a_revision_with_the_working_tree(tmp_path):
    """The revision benchmark loads the layer of a git revision beside the working tree's, checks that both give the
    same results and writes its table (here HEAD against the working tree, on a grid too small to time)."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "layer_revisions.py"), "--ref", "HEAD",
                          "--sides", "8", "--layers", "2", "--rounds", "1", "--threads", "1", "--out-dir",
                          str(tmp_path)],
                         cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "layer_revisions.md").read_text()
    assert "| 8x8 (64) |" in table and "- command: `python benchmarks/layer_revisions.py --ref HEAD" in table


def test_layer_revisions_times_every_native_operator_of_a_layer_step():
    """--operators: each native operator of a layer's step, called on fixed inputs through an extension module
    (here the installed one standing for both revisions), checked to agree, and timed per call."""
    from vilseg.ops import _native

    bench = _load_benchmark("layer_revisions")
    rows = bench.measure_operators(_native, side=8, rounds=1)
    assert [r[0] for r in rows] == ["conv_silu_forward", "cell_inputs_forward", "chunkwise_forward",
                                    "gated_norm_forward", "gated_norm_backward", "chunkwise_backward",
                                    "cell_inputs_backward", "conv_silu_backward"]
    assert all(t_ref > 0 and t_new > 0 for _, t_ref, t_new in rows)


def test_alternating_medians_interleaves_the_variants():
    """The A/B benchmarks' timing loop: one untimed call of each variant, then rounds that run every variant once in
    order, each after its untimed selection; one median per variant."""
    from vilseg.profiling.timing import alternating_medians

    calls = []
    out = alternating_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3,
                              select=lambda k: calls.append(f"select {k}"))
    assert calls == ["select a", "a", "select b", "b"] * 4
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        alternating_medians({"a": lambda: None}, 0)


def test_backbone_training_step_runs_backward_and_clears_gradients():
    """The speed benchmarks' one training step: the loss is the mean of the outputs (summed over a tuple of outputs),
    its gradient reaches the parameters, and they are cleared afterwards; under autocast too."""
    from vilseg.profiling.timing import backbone_training_step

    model = torch.nn.Linear(4, 3)
    seen = []
    model.weight.register_hook(lambda g: seen.append(g.clone()))
    x = torch.randn(2, 4)
    backbone_training_step(model, x)()
    assert model.weight.grad is None and len(seen) == 1
    torch.testing.assert_close(seen[0], x.mean(0).expand(3, 4) / 3)
    two_outputs = torch.nn.Module()
    two_outputs.inner = model
    two_outputs.forward = lambda inp: (model(inp), 2 * model(inp))
    backbone_training_step(two_outputs, x, torch.bfloat16)()
    assert len(seen) == 2 and model.weight.grad is None
    torch.testing.assert_close(seen[1], 3 * seen[0], rtol=0.02, atol=0.02)


@pytest.mark.slow  # the script end to end: processes that build and step shipped models
def test_step_profile_splits_the_profiled_step_into_its_parts(tmp_path):
    """The step-profile benchmark builds a shipped config's backbone in a worker process, profiles a training step
    and splits its wall time into operator kinds and the rest, which add up to the profiled step."""
    import json

    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--models", "vil_t",
                          "--size", "64", "--precisions", "fp32", "--repeats", "1", "--threads", "1", "--out-dir",
                          str(tmp_path)],
                         cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cell = json.loads((tmp_path / "step_profile.json").read_text())["cells"]["vil_t/fp32"]
    assert "error" not in cell, cell
    split = cell["split"]
    assert set(split) == {"matmul", "convolution", "copies", "other_aten", "fused", "framework"}
    assert split["matmul"] > 0 and split["convolution"] > 0 and cell["aten_calls"] > 100
    assert split["fused"] > 0  # the ViL layers ran on vilseg's fused operators
    assert abs(sum(split.values()) - cell["profiled_s"]) < 1e-6 + 1e-3 * cell["profiled_s"]
    assert cell["flops"]["matmul"] > 0 and cell["flops"]["convolution"] > 0
    assert set(cell["regions"]) == {"mlstm_kernel", "layer_inner"}  # empty at 64² (parallel kernel, no tiles)
    table = (tmp_path / "step_profile.md").read_text()
    assert "| vil_t (`configs/vil_upernet_ade20k.py`) | fp32 |" in table and "- command: `python" in table
    assert (tmp_path / "step_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_profile_regions_hold_the_kernel_and_its_matmuls():
    """The step profile's regions: the chunkwise kernel's forward and backward calls (named after its autograd
    function) are found in a real profile, hold its matmuls, and a call nested in a call of the same region counts
    once; an absent function's region is empty."""
    from torch.profiler import profile, record_function

    from vilseg.ops import chunkwise_mlstm

    bench = _load_benchmark("step_profile")
    q, k, v = (torch.randn(1, 2, 96, 8, requires_grad=True) for _ in range(3))
    ig, fg = (torch.randn(1, 2, 96, requires_grad=True) for _ in range(2))
    with profile() as prof:
        with record_function("outer_region"):
            with record_function("outer_region"):
                torch.mm(torch.randn(32, 32), torch.randn(32, 32))
        chunkwise_mlstm(q, k, v, ig, fg, chunk_size=32).sum().backward()
    events = prof.events()
    kernel = bench.region_times(events, *bench.REGIONS["mlstm_kernel"][1:])  # (its C++ calls nested: once)
    forward = [e for e in events if e.name == "_ChunkwiseMLSTM"]
    backward = [e for e in events if e.name == "_ChunkwiseMLSTMBackward"]
    assert len(forward) == 1 and len(backward) == 1
    expected = (forward[0].cpu_time_total + backward[0].cpu_time_total) / 1e6
    assert kernel["seconds"] == pytest.approx(expected)
    assert 0 < kernel["matmul"] < kernel["seconds"]
    outer = bench.region_times(events, "outer_region")
    (first,) = [e for e in events if e.name == "outer_region" and e.cpu_parent is None]
    assert outer["seconds"] == pytest.approx(first.cpu_time_total / 1e6) and outer["matmul"] > 0
    assert bench.region_times(events, "no_such_function") == dict(seconds=0.0, matmul=0.0)


def test_executed_flops_counts_products_in_place_and_in_backward():
    """The FLOPs a step executes: out-of-place and accumulating products and CPU fused attention (which torch's
    counter alone misses), backward's products, convolutions apart; 2 per multiply-add."""
    import torch.nn.functional as F

    from vilseg.profiling.timing import executed_flops

    a, b = torch.randn(4, 8, 16, requires_grad=True), torch.randn(4, 16, 32)
    acc, acc2 = torch.zeros(4, 8, 32), torch.zeros(8, 32)
    conv = torch.nn.Conv2d(3, 4, 3)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))

    def step():
        acc.baddbmm_(a.detach(), b)
        acc2.addmm_(a[0].detach(), b[0])
        (a @ b).sum().backward()  # forward and the gradient of a: two batched products
        conv(torch.randn(1, 3, 8, 8))
        F.scaled_dot_product_attention(q, k, v)  # q k^T and the weights times v

    flops = executed_flops(step)
    assert flops == {"matmul": 2 * 4 * 8 * 16 * 32 * 3 + 2 * 8 * 16 * 32 + 2 * (2 * 2 * 64 * 64 * 16),
                     "convolution": 2 * 4 * 3 * 9 * 6 * 6}


def test_executed_flops_see_the_vil_layer_recompute():
    """A ViL layer that recomputes its inner part in backward executes more matmul work per training step than one
    that keeps its activations, and the same in inference."""
    from vilseg.models.layers.vil_block import ViLLayer
    from vilseg.profiling.timing import executed_flops

    counts = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        layer = ViLLayer(32, num_heads=2, layer_recompute=recompute, kernel="chunkwise", chunk_size=16)
        x = torch.randn(1, 64, 32, requires_grad=True)
        train = executed_flops(lambda: layer(x, (8, 8)).sum().backward())["matmul"]
        with torch.no_grad():
            infer = executed_flops(lambda: layer(x, (8, 8)))["matmul"]
        counts[recompute] = (train, infer)
    assert counts[True][0] > counts[False][0] > 2 * counts[False][1] > 0
    assert counts[True][1] == counts[False][1]


def test_compiles_blocks_finds_compiled_vil_blocks_anywhere_in_a_model():
    """The speed benchmarks skip dispatch-mode measurements for models with compiled blocks: the check finds a
    compiled ViL block nested in a model and nothing in an eager one."""
    from vilseg.models.layers.vil_block import ViLBlock
    from vilseg.profiling.timing import compiles_blocks

    def model(compiled):
        return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ModuleList([ViLBlock(16, num_heads=2,
                                                                                          compile_layers=compiled)]))

    assert compiles_blocks(model(True)) and not compiles_blocks(model(False))


def test_json_worker_results_and_failures(tmp_path):
    """A benchmark cell's worker: its last JSON line is the result; a crash, a kill or the time limit come back as one
    error message, and a run keeps every finished cell in its report file."""
    import json

    from vilseg.profiling.cells import run_cells, run_json_worker

    ok = run_json_worker([sys.executable, "-c", "print('log line'); print('{\"seconds\": 1.5}')"], 60)
    assert ok["seconds"] == 1.5 and ok["wall_s"] > 0
    crash = run_json_worker([sys.executable, "-c", "raise ValueError('bad config: x.py')"], 60)
    assert crash == {"error": "ValueError: bad config: x.py"}
    killed = run_json_worker([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], 60)
    assert killed == {"error": "out of memory"}
    slow = run_json_worker([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert slow == {"error": "over 1 s"}
    code = "import json, os; print(json.dumps({'bind': os.environ.get('OMP_PROC_BIND'), 'path': 'PATH' in os.environ}))"
    with_env = run_json_worker([sys.executable, "-c", code], 60, env={"OMP_PROC_BIND": "true"})
    assert (with_env["bind"], with_env["path"]) == ("true", True)  # added to the environment, not replacing it
    report = {"title": "t"}
    text = run_cells(report, [("a", lambda: {"v": 1}), ("b", lambda: {"v": 2})], str(tmp_path), "run",
                     lambda r: " ".join(f"{k}={c['v']}" for k, c in r["cells"].items()))
    assert text == "a=1 b=2" == (tmp_path / "run.md").read_text().strip()
    assert json.loads((tmp_path / "run.json").read_text())["cells"] == {"a": {"v": 1}, "b": {"v": 2}}


@pytest.mark.slow  # the script end to end: processes that build and step shipped models
def test_speed_alternating_times_shipped_backbones_in_one_process(tmp_path):
    """The alternating speed benchmark builds the shipped configs' backbones in one process and writes each model's
    median step with its ratio to the reference model, and the first (compiling) step apart."""
    script = str(REPO / "benchmarks" / "speed_alternating.py")
    res = subprocess.run([sys.executable, script, "--models", "vil_t", "deit_t", "--sizes", "64", "--rounds", "1",
                          "--threads", "1", "--out-dir", str(tmp_path)], cwd=str(REPO), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "speed_alternating.md").read_text().splitlines()
    rows = {line.split(" (")[0].strip("| "): line for line in table if line.startswith(("| vil_t", "| deit_t"))}
    assert set(rows) == {"vil_t", "deit_t"}
    assert "[" in rows["vil_t"] and "[" not in rows["deit_t"] and "first" in rows["vil_t"]
    bad = subprocess.run([sys.executable, script, "--models", "vil_t", "--reference", "deit_t"], cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--reference deit_t must be one of --models" in bad.stderr


def test_speed_alternating_keeps_the_rounds_of_a_run_cut_short(tmp_path, monkeypatch):
    """A speed_alternating.py run that ends during its rounds (gpu_check.sh's time limit) has rewritten its table
    after every round: the medians of the rounds it finished, saying how many, and no second bandwidth probe; one
    that ends during a first step (a compile) keeps the first steps before it."""
    bench = _load_benchmark("speed_alternating")
    calls, clock = [], [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])  # steps advance a clock: no real timing here

    def slow_step():  # the first step, the untimed warm-up, one round, then the run ends
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("time limit")
        clock[0] += 0.02

    def fast_step():
        clock[0] += 0.01

    monkeypatch.setattr(bench, "training_steps", lambda models, side, device: {"vil_t": slow_step,
                                                                              "deit_t": fast_step})
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 10.0)
    with pytest.raises(RuntimeError, match="time limit"):
        bench.main(["--models", "vil_t", "deit_t", "--sizes", "64", "128", "--rounds", "3",
                    "--out-dir", str(tmp_path)])
    table = (tmp_path / "speed_alternating.md").read_text()
    rows = {line.split(" (")[0].strip("| "): line for line in table.splitlines()
            if line.startswith(("| vil_t", "| deit_t"))}
    assert rows["vil_t"].endswith("| 0.020 s [2.00] (1 of 3 rounds), first 0.0 s | - (not run) |"), rows["vil_t"]
    assert rows["deit_t"].endswith("| 0.010 s (1 of 3 rounds), first 0.0 s | - (not run) |"), rows["deit_t"]
    assert "10.0 GB/s before the steps, not measured (the run ended before)" in table

    def compiling_step():  # the run ends during the second model's first step
        raise RuntimeError("time limit")

    monkeypatch.setattr(bench, "training_steps", lambda models, side, device: {"vil_t": fast_step,
                                                                              "deit_t": compiling_step})
    with pytest.raises(RuntimeError, match="time limit"):
        bench.main(["--models", "vil_t", "deit_t", "--sizes", "64", "--rounds", "3", "--out-dir", str(tmp_path)])
    rows = [line for line in (tmp_path / "speed_alternating.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[-2].endswith("| - (no round finished), first 0.0 s |") and rows[-1].endswith("| - (not run) |")


@pytest.mark.slow  # the script end to end: processes that build and step shipped models
def test_step_time_states_reports_every_step_per_process_and_setting(tmp_path):
    """The step-time benchmark runs each setting in its own fresh processes, with that setting's environment and
    threads, and writes every step's time, a table of medians and ratios, and the plot."""
    import json

    script = str(REPO / "benchmarks" / "step_time_states.py")
    res = subprocess.run([sys.executable, script, "--models", "vil_t", "deit_t", "--size", "64", "--rounds", "2",
                          "--processes", "1", "--settings", "default", "one_thread", "--threads", "1",
                          "--out-dir", str(tmp_path)],
                         cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "step_time_states.json").read_text())
    assert list(report["runs"]) == ["default", "one_thread"] and report["threads"] == 1
    for runs in report["runs"].values():
        assert len(runs) == 1 and "error" not in runs[0], runs
        assert all(len(runs[0][m]) == 2 and min(runs[0][m]) > 0 for m in ("vil_t", "deit_t"))
    table = (tmp_path / "step_time_states.md").read_text()
    assert "| one_thread | 1 |" in table and "vil_t " in table.split("| one_thread | 1 |")[1]
    assert "- command: `python benchmarks/step_time_states.py" in table
    assert (tmp_path / "step_time_states.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vil_speed_renders_the_cells_of_a_run_cut_short(tmp_path):
    """A vil_speed.py run killed by a time limit (benchmarks/gpu_check.sh) has saved its finished cells in its JSON;
    --render turns them into the table, and a cell that never ran reads 'not run', not a blank."""
    import json

    report = dict(machine="m", versions={"torch": "t"}, date="d", command="c", environment={},
                  models=["vil_t", "deit_t"], sizes=[512, 1024], parts=["backbone"], modes=["train"],
                  cells={"vil_t/512/backbone/train": dict(seconds=0.9, held_mib=250.0, live_mib=208.0),
                         "deit_t/512/backbone/train": dict(seconds=0.6, held_mib=340.0, live_mib=312.0),
                         "vil_t/1024/backbone/train": dict(seconds=3.5, held_mib=900.0, live_mib=794.0)})
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(report))
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vil_speed.py"), "--render", str(path)],
                         cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split(" (")[0].strip("| "): line for line in (tmp_path / "cut.md").read_text().splitlines()
            if line.startswith(("| vil_t", "| deit_t"))}
    assert rows["vil_t"].endswith("| 0.900 s, live 208, held 250 | 3.500 s, live 794, held 900 |")
    assert rows["deit_t"].endswith("| 0.600 s [ViL-T / this: 1.50], live 312, held 340 | - (not run) |")
    # the `live` column says how it was measured: a report from before the allocator-level tracker names the
    # dispatch-mode tracker's live tensors, a report of today's runs the allocator's figures
    bench = _load_benchmark("vil_speed")
    assert "`live` = peak of live tensors above model and input" in (tmp_path / "cut.md").read_text()
    allocator = bench.markdown({**report, "live_method": "allocator"})
    assert "`live` = peak of what PyTorch's allocator handed out" in allocator and "live tensors" not in allocator
    # and how malloc was set and over which steps `held` grew: an older report (glibc's defaults, the first step)
    old = (tmp_path / "cut.md").read_text()
    assert "- malloc in every cell: the C library's default malloc settings (vilseg did not set it)" in old
    assert "reserved memory (CUDA) in the first step at the size, both MiB" in old
    cells = {k: dict(v, malloc="glibc malloc keeps freed memory (...)") for k, v in report["cells"].items()}
    new = bench.markdown({**report, "cells": cells, "held_over": "all steps"})
    assert "- malloc in every cell: glibc malloc keeps freed memory (...)\n" in new
    assert "over the first step at the size and the timed steps, both MiB" in new


def test_vil_speed_rounds_take_turns_and_report_medians(tmp_path, monkeypatch):
    """With --rounds, a size's models run in turn, round after round, every other round in reverse order (each a
    fresh process: the cell runner is replaced here), and each cell reports the median of its rounds with their
    range; a round that failed is left out of the median."""
    bench = _load_benchmark("vil_speed")
    order = []
    times = {"vil_t": iter([0.5, 0.7, 0.6]), "deit_t": iter([0.8, 0.4, 0.6])}

    def fake_cell(model, size, part, mode, args):
        order.append((model, size))
        seconds = next(times[model]) if size == 64 else None
        if seconds == 0.7:
            return dict(error="killed")
        return dict(seconds=seconds or 1.0, first_s=1.0, held_mib=100.0 + len(order), live_mib=None)

    monkeypatch.setattr(bench, "run_cell", fake_cell)
    bench.main(["--models", "vil_t", "deit_t", "--sizes", "64", "128", "--parts", "backbone", "--modes", "train",
                "--rounds", "3", "--out-dir", str(tmp_path)])
    turns = ["vil_t", "deit_t", "deit_t", "vil_t", "vil_t", "deit_t"]  # every other round in reverse order
    assert order == [(m, 64) for m in turns] + [(m, 128) for m in turns]
    table = (tmp_path / "vil_speed.md").read_text()
    assert "each cell ran in 3 fresh processes" in table
    rows = {line.split(" (")[0].strip("| "): line for line in table.splitlines()
            if line.startswith(("| vil_t", "| deit_t"))}
    assert "| 0.550 s (0.500-0.600), held " in rows["vil_t"], rows["vil_t"]  # the failed round left out
    assert "| 0.600 s (0.400-0.800) [ViL-T / this: 0.92], held " in rows["deit_t"], rows["deit_t"]
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0", "--out-dir", str(tmp_path)])


def test_gpu_check_keeps_what_a_part_cut_short_finished(tmp_path):
    """benchmarks/gpu_check.sh's orchestration, with a stand-in interpreter (no GPU here): every part's output lands
    in a .log beside its table, a speed part that ends early (its time limit) still leaves the table of the cells
    it finished, and the script's exit status says that a part failed."""
    import json
    import os
    import stat

    cut = dict(machine="m", versions={"torch": "t"}, date="d", command="c", environment={}, models=["vil_t"],
               sizes=[512, 4096], parts=["backbone"], modes=["train"],
               planned=["vil_t/512/backbone/train", "vil_t/4096/backbone/train"],
               cells={"vil_t/512/backbone/train": dict(seconds=0.1, held_mib=10.0, live_mib=9.0)})
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    stub = tmp_path / "python"
    stub.write_text(f"""#!{sys.executable}
import os, shutil, sys
args = sys.argv[1:]
if args[0] == "-c":  # the script's CUDA check: a device is there
    sys.exit(0)
if "--render" in args:  # rendering is the real script's
    os.execv({sys.executable!r}, [{sys.executable!r}] + args)
script = os.path.basename(args[0])
print("stand-in for", script, flush=True)
if script == "vil_speed.py":  # the cells it finished, then cut short
    out, name = args[args.index("--out-dir") + 1], args[args.index("--name") + 1]
    shutil.copy({str(tmp_path / "cut.json")!r}, os.path.join(out, name + ".json"))
    sys.exit(124)
""")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "gpu"
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=str(REPO), capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHON": str(stub), "OUT_DIR": str(out)})
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    for name in ("gpu_check", "autocast_gate_gradients", "vil_speed_backbone", "vil_speed_segmentor",
                 "speed_alternating_compiled"):
        assert (out / f"{name}.log").read_text().startswith("stand-in for "), name
    table = (out / "vil_speed_backbone.md").read_text()
    assert "| vil_t (`configs/vil_upernet_ade20k.py`) | 0.100 s, live 9, held 10 |" in table
    assert "Not run (the run ended before them): `vil_t/4096/backbone/train`." in table
    assert json.loads((out / "vil_speed_segmentor.json").read_text())["cells"]  # rendered too
    assert (out / "vil_speed_segmentor.md").exists()


def test_compile_budget_configs_and_table(tmp_path, monkeypatch):
    """compile_budget.py's per-budget configs are the compiled ViL-T config with only the budget changed ('none':
    the layer recompute inside the graph), its memory process is vil_speed.py's segmentor training cell, its table
    gives each process's time ratio and the memory ratio, a failed process says why, and a budget outside (0, 1] is
    refused before anything runs."""
    from vilseg.apis import load_config

    bench = _load_benchmark("compile_budget")
    shipped = load_config(str(REPO / "configs" / "vil_upernet_ade20k_compiled.py")).model.backbone
    for budget, expected in (("0.25", 0.25), ("none", None)):
        backbone = load_config(bench.budget_config(budget, str(tmp_path))).model.backbone
        assert backbone.compile_memory_budget == expected and backbone.compile_layers
        assert {k: v for k, v in backbone.items() if k != "compile_memory_budget"} == {
            k: v for k, v in shipped.items() if k != "compile_memory_budget"}
    report = dict(args=dict(reference="configs/baselines/deit_t_upernet_ade20k.py", size=512, rounds=7),
                  provenance=["- command: `c`"], started="s", reference_memory=dict(held_mib=1600.0),
                  budgets={"0.4": dict(time=[dict(vil_s=0.6, reference_s=0.6, first_s=11.0),
                                             dict(vil_s=0.7, reference_s=0.56, first_s=9.0)],
                                       memory=dict(held_mib=1400.0)),
                           "none": dict(time=[dict(error="over 600 s")], memory=dict(error="out of memory"))})
    rows = [line for line in bench.markdown(report) if line.startswith(("| 0.4", "| none"))]
    assert rows[0] == "| 0.4 | 1.00 (0.600 s) / 1.25 (0.700 s) | 1400 | 0.88 | 11.0 s |"
    assert rows[1] == "| none | - (over 600 s) | - (out of memory) | - | - |"
    # the memory process is vil_speed.py's own cell: its segmentor training step on the budget's config, one repeat
    commands = []
    monkeypatch.setattr("vilseg.profiling.cells.run_json_worker", lambda cmd, timeout: commands.append(cmd) or {})
    bench.memory_cell("budget.py", 512, argparse.Namespace(threads=2, cell_timeout_s=60.0))
    assert commands[0][1] == str(REPO / "benchmarks" / "vil_speed.py")
    assert commands[0][2:] == ["--worker", "budget.py", "512", "segmentor", "train", "--repeats", "1", "--long-s",
                               "20.0", "--threads", "2", "--malloc", "keep", "--no-live"]
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_budget.py"), "--budgets", "0.4", "1.5"],
                         cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "each must be a number in (0, 1] or 'none', got '1.5'" in bad.stderr


def test_page_faults_counts_each_native_operator_and_tables_every_cell():
    """page_faults.py: the stand-in for the extension handle adds each call's page faults to its function's count
    (and still returns the call's result); the table has a row per model and malloc setting, an error row where a
    process failed, and the ViL-T operators under each setting."""
    import collections
    import mmap
    import resource
    import types

    def touch(n: int) -> int:
        """Writes every page of a fresh anonymous mapping of n bytes; returns the page faults it saw itself."""
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        region = mmap.mmap(-1, n)
        for offset in range(0, n, mmap.PAGESIZE):
            region[offset] = 1
        region.close()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    bench = _load_benchmark("page_faults")
    counts = collections.Counter()
    ext = bench._CountingExtension(types.SimpleNamespace(touch=touch), counts)
    faulted = ext.touch(8 * 2**20)  # the call's own result comes back through the stand-in
    assert faulted > 0 and counts["touch"] >= faulted
    report = dict(provenance=["- command: `c`"], date="d", side=512,
                  page_price=dict(mib=64, first_s=0.03, again_s=0.01, pages=16384, us_per_page=1.2, gb_per_s=6.7),
                  cells={"vil_t/system": dict(malloc="defaults", faults=[10, 30, 20], seconds=[0.5, 0.7, 0.6],
                                              operators={"chunkwise_backward": 12.0, "cell_inputs_forward": 3.0}),
                         "vil_t/keep": dict(malloc="kept", faults=[0, 2, 1], seconds=[0.4, 0.4, 0.5],
                                            operators={"chunkwise_backward": 1.0}),
                         "deit_t/system": dict(error="out of memory")})
    lines = bench.markdown(report)
    assert "| vil_t | system | 0.600 s | 20 (10-30) |" in lines and "| vil_t | keep | 0.400 s | 1 (0-2) |" in lines
    assert "| deit_t | system | - (out of memory) | - |" in lines
    assert "| `chunkwise_backward` | 12 | 1 |" in lines and "| `cell_inputs_forward` | 3 | 0 |" in lines
    assert any("**1.20 µs per fresh page**" in line for line in lines)
