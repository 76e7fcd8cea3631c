"""Profile peak memory, time and FLOPs of models against input resolution.

For every (model, size) one *worker* process (``python -m vilseg.profiling.runner TASK OUT``):

1. **estimate** (unless ``real_only``): the model's parameters, the inputs and every intermediate
   are fake tensors (:func:`vilseg.profiling.memory.fake_mode`); the live-tensor tracker gives the
   peak of one training step (forward + backward [+ optimizer step]) and of one inference forward,
   and ``torch.utils.flop_counter.FlopCounterMode`` counts their FLOPs (matmuls / convolutions /
   attention; elementwise work is not counted).
2. **real** (unless ``estimate_only``, the size is not in ``real_sizes``, or the estimate exceeds
   ``max_mem_gb``): the same two steps on real tensors: peak memory (tracker on CPU, allocator
   statistics on CUDA) in a first run, which is also the warm-up, then ``repeats`` timed runs
   (median reported; repeats stop early once ``max_repeat_seconds`` are spent). On CPU the worker
   caps its own data segment (``RLIMIT_DATA``) a little above ``max_mem_gb``, so a run that goes past
   it fails with an allocation error that is recorded as ``oom`` instead of taking the machine down.

The worker writes its results to OUT after each phase; the parent enforces ``timeout_s`` (process
group killed, unfinished phases recorded as ``timeout``), records a child killed by a signal as
``killed`` and goes on to the next configuration. Results go to ``<out_dir>/profile_memory.{csv,json,png}``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "ProfileConfig",
    "validate_config",
    "run_profile",
    "run_task",
    "fit_exponent",
    "write_outputs",
    "summarize",
    "machine_info",
    "STATUSES",
]

GIB = 2**30
STATUSES = {
    "ok": "measured on real tensors",
    "estimated": "real run skipped (estimate only: see note)",
    "oom": "real run ran out of memory (allocation failed)",
    "timeout": "did not finish within --timeout",
    "killed": "worker killed by a signal (likely the system's OOM killer)",
    "error": "failed (see error)",
    "unavailable": "model not importable here",
}


# ============================================================================ configuration
@dataclasses.dataclass
class ProfileConfig:
    """Everything one profiling run needs (the CLI fills it; see tools/profile_memory.py).

    Sizes are input edges in pixels / voxels (a size s means s x s, or s x s x s in 3D).
    """

    models: List[str]
    sizes_2d: List[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024, 2048])
    sizes_3d: List[int] = dataclasses.field(default_factory=lambda: [64, 96, 128, 160])
    real_sizes_2d: Optional[List[int]] = None  # None: every size may run for real
    real_sizes_3d: Optional[List[int]] = None
    real_train_sizes_2d: Optional[List[int]] = None  # None: as real_sizes_2d (training is the slow step)
    real_train_sizes_3d: Optional[List[int]] = None
    device: str = "cpu"
    dtype: str = "float32"  # 'float32' | 'bfloat16' (autocast)
    batch: int = 2  # training batch (2D; UperNet's BatchNorm on 1x1 maps needs >= 2)
    infer_batch: int = 1
    batch_3d: int = 1
    infer_batch_3d: int = 1
    num_classes: int = 150
    num_classes_3d: int = 4
    steps: Tuple[str, ...] = ("train", "infer")
    estimate_only: bool = False
    real_only: bool = False  # skip the estimate (and its gate): real runs only
    max_mem_gb: Optional[float] = 16.0  # cap for real runs (None: no cap)
    cap_slack_mb: float = 256.0  # allowance above 1.25 x max_mem_gb for the allocator and libraries
    timeout_s: float = 900.0
    repeats: int = 3
    max_repeat_seconds: float = 60.0
    optimizer_step: bool = False
    head_loss: str = "chunked"  # 2D segmentors' decode heads: 'chunked' (vilseg ChunkedLoss*Head) or 'mmseg'
    backend: str = "live"
    threads: Optional[int] = None
    count_flops: bool = True
    oom_search_gb: Optional[float] = None  # e.g. 80: estimate at growing sizes until this is exceeded
    oom_search_max_2d: int = 8192
    oom_search_max_3d: int = 512
    oom_search_timeout_s: Optional[float] = None  # per search step (default: timeout_s)
    out_dir: str = "benchmarks/results"
    prefix: str = "profile_memory"
    command: str = ""
    plot: bool = True
    quiet: bool = False


def validate_config(cfg: ProfileConfig) -> ProfileConfig:
    """Check names, sizes and the device; expand model groups. Returns the checked config.

    Raises:
        ValueError: unknown model (lists the known ones), a size below a model's patch size or not
            a multiple its model needs, a device that does not exist, or an out-of-range option.
    """
    from vilseg.utils.env import resolve_device
    from vilseg.profiling.models import HEAD_LOSSES, expand_model_names, get_spec

    cfg.models = expand_model_names(cfg.models)
    cfg.device = str(resolve_device(cfg.device))
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    if cfg.head_loss not in HEAD_LOSSES:
        raise ValueError(f"--head-loss must be one of {HEAD_LOSSES}, got {cfg.head_loss!r}")
    if cfg.backend not in ("live", "torch"):
        raise ValueError(f"--backend must be 'live' or 'torch', got {cfg.backend!r}")
    if cfg.estimate_only and cfg.real_only:
        raise ValueError("--estimate and --real-only exclude each other")
    for name in ("batch", "infer_batch", "batch_3d", "infer_batch_3d", "num_classes", "num_classes_3d", "repeats"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_mem_gb is not None and cfg.max_mem_gb <= 0:
        raise ValueError(f"--max-mem-gb must be > 0, got {cfg.max_mem_gb}")
    if cfg.timeout_s <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {cfg.timeout_s}")
    bad_steps = set(cfg.steps) - {"train", "infer"}
    if bad_steps or not cfg.steps:
        raise ValueError(f"--steps takes 'train' and/or 'infer', got {list(cfg.steps)}")
    for dims, sizes in ((2, cfg.sizes_2d), (3, cfg.sizes_3d)):
        specs = [get_spec(m) for m in cfg.models if get_spec(m).dims == dims]
        if specs and not sizes:
            raise ValueError(f"{dims}D models given ({', '.join(s.name for s in specs)}) but no {dims}D sizes")
        for s in sizes:
            if int(s) != s or s <= 0:
                raise ValueError(f"sizes must be positive integers, got {s}")
            for spec in specs:
                if s < spec.patch:
                    raise ValueError(
                        f"resolution {s} is below the patch size {spec.patch} of model {spec.name!r}: "
                        f"use sizes >= {spec.patch}")
                if s % spec.multiple:
                    raise ValueError(
                        f"resolution {s} is not a multiple of {spec.multiple}, which model {spec.name!r} needs")
    return cfg


# ============================================================================ worker side
def _vmdata_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(r"VmData:\s+(\d+) kB", fh.read())
        return int(m.group(1)) * 1024 if m else 0
    except OSError:
        return 0


def _cap_data_segment(max_bytes: Optional[int], slack_bytes: int = 256 * 2**20) -> Optional[int]:
    """Limit this process's data segment to what it uses now + ``max_bytes`` (+ slack for the
    allocator). Linux >= 4.7 counts anonymous mmaps, so a large tensor allocation past it fails with
    a RuntimeError instead of the machine running out of memory. Returns the limit set."""
    if max_bytes is None or not sys.platform.startswith("linux"):
        return None
    import resource

    limit = _vmdata_bytes() + int(max_bytes * 1.25) + int(slack_bytes)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def _uncap_data_segment() -> None:
    if not sys.platform.startswith("linux"):
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))


def _classify_exception(exc: BaseException) -> str:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "oom"
    msg = str(exc).lower()
    # the wordings of an allocation refused under the data-segment cap: torch's CPU allocator (two variants),
    # the C++ runtime, numpy, the dynamic loader (a lazily loaded library), errno 12 (ENOMEM)
    if any(s in msg for s in ("can't allocate memory", "cannot allocate memory", "out of memory",
                              "not enough memory", "bad_alloc", "posix_memalign", "unable to allocate",
                              "failed to map segment", "memory allocation failed", "errno 12", "error code 12")):
        return "oom"
    return "error"


@contextlib.contextmanager
def _mask_free_accuracy() -> Iterable[None]:
    """mmseg's ``accuracy`` indexes with a boolean mask (data-dependent shape), which fake tensors
    cannot do. Swap in the same metric written without it, in real and estimate runs alike (the
    metric is a few (B, H, W) tensors next to (B, classes, H, W) logits)."""
    import torch
    from mmseg.models.decode_heads import decode_head

    original = decode_head.accuracy

    def accuracy(pred, target, topk=1, thresh=None, ignore_index=None):  # noqa: ANN001
        with torch.no_grad():
            pred_label = pred.argmax(dim=1)
            valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
            correct = ((pred_label == target) & valid).sum()
            return correct.float() * 100.0 / valid.sum().clamp(min=1)

    decode_head.accuracy = accuracy
    try:
        yield
    finally:
        decode_head.accuracy = original


class _Steps:
    """The training and inference steps of one model at one size (inputs made on construction, so
    under a fake mode they are fake)."""

    def __init__(self, model: Any, spec: Any, size: Tuple[int, ...], task: Dict[str, Any], device: Any) -> None:
        import torch

        self.model, self.spec, self.size, self.device = model, spec, size, device
        self.num_classes = int(task["num_classes"])
        self.autocast = task["dtype"] == "bfloat16"
        self.optimizer_step = bool(task["optimizer_step"])
        in_ch = 1 if spec.dims == 3 else 3
        gen_train, gen_infer = int(task["batch"]), int(task["infer_batch"])
        self.x_train = torch.randn(gen_train, in_ch, *size, device=device)
        self.x_infer = torch.randn(gen_infer, in_ch, *size, device=device)
        self.y_train = torch.randint(0, self.num_classes, (gen_train, *size), device=device)
        self.data_samples = None
        if spec.kind == "segmentor":
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample

            self.data_samples = []
            for i in range(gen_train):
                ds = SegDataSample(metainfo=dict(img_shape=tuple(size), pad_shape=tuple(size),
                                                 ori_shape=tuple(size)))
                ds.gt_sem_seg = PixelData(data=self.y_train[i:i + 1])
                self.data_samples.append(ds)
        self.optimizer = None
        if self.optimizer_step:
            self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def _autocast(self) -> Any:
        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def tracked_train(self) -> List[Any]:
        return [self.model, self.optimizer, self.x_train, self.y_train]

    def tracked_infer(self) -> List[Any]:
        return [self.model, self.x_infer]

    def prepare_train(self) -> None:
        self.model.train()
        self.model.zero_grad(set_to_none=True)

    def prepare_infer(self) -> None:
        self.model.eval()
        self.model.zero_grad(set_to_none=True)

    def train(self) -> None:
        import torch
        import torch.nn.functional as F

        with self._autocast():
            if self.spec.kind == "segmentor":
                with _mask_free_accuracy():
                    losses = self.model.loss(self.x_train, self.data_samples)
                loss = sum(v for k, v in losses.items() if "loss" in k)
                del losses
            elif self.spec.kind == "medical":
                logits = self.model(self.x_train)
                loss = F.cross_entropy(logits.float(), self.y_train)
                del logits
            else:
                outs = self.model(self.x_train)
                outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
                loss = sum(o.float().mean() for o in outs)
                del outs
        loss.backward()
        del loss
        if self.optimizer is not None:
            self.optimizer.step()

    def infer(self) -> None:
        import torch

        with torch.no_grad(), self._autocast():
            if self.spec.kind == "segmentor":
                out = self.model(self.x_infer, mode="tensor")
            else:
                out = self.model(self.x_infer)
            del out


def _write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def run_task(task: Dict[str, Any], out_path: Optional[str] = None) -> Dict[str, Any]:
    """Run one (model, size) configuration in this process; see the module docstring.

    ``task`` keys: model, size (list of ints), batch, infer_batch, num_classes, device, dtype, steps,
    estimate (bool), real (bool), max_mem_bytes (int or None), repeats, max_repeat_seconds,
    optimizer_step, backend, threads, count_flops. Returns (and writes to ``out_path`` after every
    phase) ``{"params": int, "estimate": {step: {...}}, "real": {step: {...}}}``.
    """
    import torch

    from vilseg.profiling.memory import fake_mode, measure_peak, to_fake_module
    from vilseg.profiling.models import build_model, get_spec

    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    torch.manual_seed(0)
    spec = get_spec(task["model"])
    size = tuple(int(s) for s in task["size"])
    device = torch.device(task["device"])
    steps = list(task["steps"])
    result: Dict[str, Any] = {"params": None, "estimate": {}, "real": {}, "threads": torch.get_num_threads()}

    def save() -> None:
        if out_path:
            _write_json_atomic(out_path, result)

    save()
    base: Dict[str, Any] = {}

    def get_model() -> Any:
        """The model, built once per worker (initialisers are slow); estimates use fake copies."""
        if "model" not in base:
            base["model"] = build_model(spec.name, size, int(task["num_classes"]),
                                        head_loss=task.get("head_loss", "chunked"))
            result["params"] = sum(p.numel() for p in base["model"].parameters())
        return base["model"]

    # ------------------------------------------------------------------ estimate
    if task["estimate"]:
        from torch.utils.flop_counter import FlopCounterMode

        for step in steps:
            entry: Dict[str, Any] = {}
            try:
                t0 = time.perf_counter()
                mode = fake_mode()
                model = to_fake_module(copy.deepcopy(get_model()), mode)
                with mode:
                    st = _Steps(model, spec, size, task, torch.device("cpu"))
                    fn, tracked = (st.train, st.tracked_train()) if step == "train" else (st.infer, st.tracked_infer())
                    (st.prepare_train if step == "train" else st.prepare_infer)()
                    _, pm = measure_peak(fn, device="cpu", track=tracked, backend=task["backend"], fake=True)
                    entry.update(status="ok", peak_bytes=pm.peak_bytes, start_bytes=pm.start_bytes)
                    if task["count_flops"]:
                        # a pass of its own: under activation checkpointing the counter's module hooks keep
                        # recomputed tensors alive longer, which would inflate the tracked peak
                        (st.prepare_train if step == "train" else st.prepare_infer)()
                        counter = FlopCounterMode(display=False)
                        with counter:
                            fn()
                        entry["flops"] = int(counter.get_total_flops())
                entry["seconds"] = time.perf_counter() - t0
                del st, model, mode
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
            gc.collect()
            result["estimate"][step] = entry
            save()

    # ------------------------------------------------------------------ real
    if task["real"]:
        cap = task.get("max_mem_bytes")
        model = None
        for step in task.get("real_steps", steps):
            entry = {}
            est = result["estimate"].get(step, {})
            if cap is not None and est.get("status") == "ok" and est["peak_bytes"] > cap:
                entry.update(status="estimated", note=f"estimate {est['peak_bytes'] / GIB:.2f} GiB > cap "
                                                      f"{cap / GIB:.2f} GiB")
                result["real"][step] = entry
                save()
                continue
            st = None
            try:
                if model is None:
                    model = get_model().to(device)
                    base.clear()
                    torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before capping
                if device.type == "cpu":
                    _cap_data_segment(cap, int(task.get("cap_slack_bytes", 256 * 2**20)))
                st = _Steps(model, spec, size, task, device)
                fn, tracked, prep = ((st.train, st.tracked_train(), st.prepare_train) if step == "train"
                                     else (st.infer, st.tracked_infer(), st.prepare_infer))
                prep()
                t0 = time.perf_counter()
                _, pm = measure_peak(fn, device=device, track=tracked, backend=task["backend"])
                first = time.perf_counter() - t0
                entry.update(status="ok", peak_bytes=pm.peak_bytes, start_bytes=pm.start_bytes,
                             method=pm.method, first_run_seconds=first)
                result["real"][step] = entry
                save()
                times: List[float] = []
                if int(task["repeats"]) < 1:
                    continue
                for _ in range(int(task["repeats"])):
                    prep()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                    if sum(times) + first > float(task["max_repeat_seconds"]):
                        break
                entry.update(times=times, time_median_s=statistics.median(times), time_min_s=min(times))
            except Exception as exc:  # noqa: BLE001
                kind = _classify_exception(exc)
                entry.update(status=kind, error=f"{type(exc).__name__}: {exc}"[:500])
            finally:
                if st is not None:
                    st.model = None
                del st
                if model is not None:
                    model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cpu":
                    _uncap_data_segment()
            result["real"][step] = entry
            save()
    return result


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of a worker process: ``python -m vilseg.profiling.runner TASK.json OUT.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m vilseg.profiling.runner TASK.json OUT.json", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    with open(argv[0]) as fh:
        task = json.load(fh)
    run_task(task, argv[1])
    return 0


# ============================================================================ parent side
def _task_for(cfg: ProfileConfig, model: str, side: int, *, estimate: bool, real: bool,
              steps: Sequence[str]) -> Dict[str, Any]:
    from vilseg.profiling.models import get_spec

    spec = get_spec(model)
    three = spec.dims == 3
    return dict(
        model=model, size=[side] * spec.dims,
        batch=cfg.batch_3d if three else cfg.batch,
        infer_batch=cfg.infer_batch_3d if three else cfg.infer_batch,
        num_classes=cfg.num_classes_3d if three else cfg.num_classes,
        device=cfg.device, dtype=cfg.dtype, steps=list(steps), estimate=estimate, real=real,
        max_mem_bytes=None if cfg.max_mem_gb is None else int(cfg.max_mem_gb * GIB),
        cap_slack_bytes=int(cfg.cap_slack_mb * 2**20),
        repeats=cfg.repeats, max_repeat_seconds=cfg.max_repeat_seconds, optimizer_step=cfg.optimizer_step,
        head_loss=cfg.head_loss, backend=cfg.backend, threads=cfg.threads, count_flops=cfg.count_flops,
    )


def _run_worker(task: Dict[str, Any], timeout_s: float, log_path: Optional[Path]) -> Tuple[Dict[str, Any], str]:
    """Run ``task`` in a fresh interpreter. Returns (partial or full result, outcome) where outcome is
    'done', 'timeout', 'killed: <signal>' or 'crashed: <code>'."""
    repo_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="vilseg-prof-") as tmp:
        task_path, out_path = os.path.join(tmp, "task.json"), os.path.join(tmp, "out.json")
        with open(task_path, "w") as fh:
            json.dump(task, fh)
        log = open(log_path, "w") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen([sys.executable, "-m", "vilseg.profiling.runner", task_path, out_path],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
                if rc == 0:
                    outcome = "done"
                elif rc < 0:
                    outcome = f"killed: {signal.Signals(-rc).name}"
                else:
                    outcome = f"crashed: exit code {rc}"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                outcome = "timeout"
        finally:
            if log_path:
                log.close()
        result: Dict[str, Any] = {"params": None, "estimate": {}, "real": {}}
        if os.path.exists(out_path):
            with open(out_path) as fh:
                result = json.load(fh)
    return result, outcome


def _fill_unfinished(result: Dict[str, Any], task: Dict[str, Any], outcome: str, log_path: Optional[Path]) -> None:
    """Mark the phases a dead / timed-out worker did not finish."""
    if outcome == "done":
        return
    if outcome == "timeout":
        status, note = "timeout", "worker exceeded --timeout"
    elif outcome.startswith("killed"):
        status, note = "killed", f"worker {outcome} (likely out of memory)"
    else:
        status, note = "error", f"worker {outcome}"
        if log_path and log_path.exists():
            note += ": " + log_path.read_text()[-300:].strip().replace("\n", " | ")
    for phase in ("estimate", "real"):
        if not task[phase]:
            continue
        for step in (task.get("real_steps", task["steps"]) if phase == "real" else task["steps"]):
            entry = result[phase].get(step)
            if entry is None:
                result[phase][step] = {"status": status, "error": note}
            elif entry.get("status") == "ok" and phase == "real" and "time_median_s" not in entry:
                entry["note"] = f"timing not finished ({note})"


def _size_label(side: int, dims: int) -> str:
    return "x".join([str(side)] * dims)


def _rows_for(cfg: ProfileConfig, model: str, side: int, result: Dict[str, Any], task: Dict[str, Any],
              real_reason: Optional[str]) -> List[Dict[str, Any]]:
    from vilseg.profiling.models import REF_PATCH, get_spec

    spec = get_spec(model)
    rows = []
    for step in task["steps"]:
        est = result["estimate"].get(step, {})
        real = result["real"].get(step, {})
        batch = task["batch"] if step == "train" else task["infer_batch"]
        row: Dict[str, Any] = dict(
            model=model, description=spec.description, dims=spec.dims, kind=spec.kind, step=step,
            size=_size_label(side, spec.dims), side=side, pixels=side ** spec.dims,
            tokens=side ** spec.dims // REF_PATCH ** spec.dims, batch=batch,
            params_m=None if result.get("params") is None else round(result["params"] / 1e6, 3),
        )
        est_peak = est.get("peak_bytes") if est.get("status") == "ok" else None
        real_peak = real.get("peak_bytes") if real.get("status") == "ok" else None
        if real:
            status = real.get("status", "error")
        elif est.get("status") == "ok":
            status = "estimated"
        else:
            status = est.get("status", "error")
        if not real and real_reason is None and task["real"] is not None and est.get("status") == "ok":
            real_reason = "real run not requested for this step at this size"
        note = real.get("note") or (real_reason if not real and est.get("status") == "ok" else None)
        errors = [e.get("error") for e in (real, est) if e.get("error")]
        row.update(
            status=status,
            peak_gib=None if (real_peak or est_peak) is None else round((real_peak or est_peak) / GIB, 4),
            peak_source="measured" if real_peak else ("estimated" if est_peak else None),
            measured_peak_gib=None if real_peak is None else round(real_peak / GIB, 4),
            estimated_peak_gib=None if est_peak is None else round(est_peak / GIB, 4),
            estimate_error_pct=(None if not (real_peak and est_peak)
                                else round(100.0 * (est_peak - real_peak) / real_peak, 3)),
            time_median_s=None if real.get("time_median_s") is None else round(real["time_median_s"], 4),
            n_repeats=len(real.get("times", [])) or None,
            gflops=None if est.get("flops") is None else round(est["flops"] / 1e9, 2),
            note=note, error="; ".join(errors) or None,
            threads=result.get("threads"),
        )
        rows.append(row)
    return rows


def fit_exponent(tokens: Sequence[float], values: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(values) against log(tokens) (the growth exponent); None with fewer
    than two distinct points."""
    pts = [(math.log(t), math.log(v)) for t, v in zip(tokens, values) if t and v and t > 0 and v > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx


def _fit_line(tokens: Sequence[float], values: Sequence[float]) -> Optional[Tuple[float, float]]:
    slope = fit_exponent(tokens, values)
    if slope is None:
        return None
    pts = [(math.log(t), math.log(v)) for t, v in zip(tokens, values) if t and v and t > 0 and v > 0]
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return slope, my - slope * mx


def compute_fits(rows: List[Dict[str, Any]], largest: int = 3) -> List[Dict[str, Any]]:
    """Growth exponents per model: peak training / inference memory and time against tokens, over all
    sizes and over the ``largest`` largest sizes. Memory uses the measured peak where the real run
    happened and the estimate elsewhere (they agree to within the tested tolerance)."""
    fits = []
    for model in dict.fromkeys(r["model"] for r in rows):
        entry: Dict[str, Any] = {"model": model}
        for step in ("train", "infer"):
            sel = sorted((r for r in rows if r["model"] == model and r["step"] == step), key=lambda r: r["tokens"])
            mem = [(r["tokens"], r["peak_gib"]) for r in sel if r["peak_gib"]]
            tim = [(r["tokens"], r["time_median_s"]) for r in sel if r["time_median_s"]]
            entry[f"{step}_mem_exp_all"] = _round(fit_exponent(*zip(*mem)) if len(mem) >= 2 else None)
            big = mem[-largest:]
            entry[f"{step}_mem_exp_largest"] = _round(fit_exponent(*zip(*big)) if len(big) >= 2 else None)
            entry[f"{step}_mem_largest_n"] = len(big)
            entry[f"{step}_time_exp_all"] = _round(fit_exponent(*zip(*tim)) if len(tim) >= 2 else None)
            line = _fit_line(*zip(*big)) if len(big) >= 2 else None
            entry[f"{step}_mem_fit"] = None if line is None else [round(line[0], 5), round(line[1], 5)]
        fits.append(entry)
    return fits


def _round(x: Optional[float], nd: int = 3) -> Optional[float]:
    return None if x is None else round(x, nd)


def extrapolate_oom_side(fit: Optional[Sequence[float]], limit_gib: float, dims: int) -> Optional[int]:
    """Input edge at which the power-law fit ``log(gib) = a log(tokens) + b`` reaches ``limit_gib``."""
    from vilseg.profiling.models import REF_PATCH

    if not fit or fit[0] <= 0:
        return None
    a, b = fit
    tokens = math.exp((math.log(limit_gib) - b) / a)
    return int(round((tokens * REF_PATCH ** dims) ** (1.0 / dims)))


def machine_info(cfg: ProfileConfig) -> Dict[str, Any]:
    """CPU / GPU name, core count, library versions, dtype, batch, command line, date."""
    import torch

    from vilseg.utils.env import cpu_name, library_versions

    info: Dict[str, Any] = dict(
        cpu=cpu_name(), cpu_count=os.cpu_count(), torch_threads=cfg.threads or torch.get_num_threads(),
        platform=platform.platform(), torch=torch.__version__,
        device=cfg.device, dtype=cfg.dtype, batch_train_2d=cfg.batch, batch_infer_2d=cfg.infer_batch,
        batch_train_3d=cfg.batch_3d, batch_infer_3d=cfg.infer_batch_3d, num_classes_2d=cfg.num_classes,
        num_classes_3d=cfg.num_classes_3d, optimizer_step=cfg.optimizer_step, head_loss=cfg.head_loss,
        memory_backend=cfg.backend,
        max_mem_gb=cfg.max_mem_gb, command=cfg.command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as fh:
            m = re.search(r"MemTotal:\s+(\d+) kB", fh.read())
            if m:
                info["memory_gib"] = round(int(m.group(1)) / 2**20, 1)
    if cfg.device.startswith("cuda"):
        dev = torch.device(cfg.device)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / GIB, 1)
    info.update(library_versions(("mmseg", "mmengine", "mmcv", "monai")))
    return info


def _oom_search(cfg: ProfileConfig, model: str, start_side: int, start_gib: Optional[float], limit_gib: float,
                progress: Any, log_dir: Optional[Path]) -> Dict[str, Any]:
    """Estimate the training peak at sizes a factor sqrt(2) in tokens apart, starting next to the largest
    swept size (``start_side``, whose peak is ``start_gib``): upwards while it fits in ``limit_gib``,
    downwards while it does not, until the boundary is bracketed (or a limit / time-out stops it)."""
    from vilseg.profiling.models import get_spec

    spec = get_spec(model)
    mult = max(spec.multiple, 32 if spec.dims == 2 else 16)
    max_side = cfg.oom_search_max_2d if spec.dims == 2 else cfg.oom_search_max_3d
    factor = 2 ** (1.0 / (2 * spec.dims))  # sqrt(2) x the tokens per step
    fits_side = fits_gib = over_side = over_gib = None
    if start_gib is not None:
        if start_gib > limit_gib:
            over_side, over_gib = start_side, start_gib
        else:
            fits_side, fits_gib = start_side, start_gib
    up = start_gib is None or start_gib <= limit_gib
    side, status = start_side, "ok"
    timeout = cfg.oom_search_timeout_s or cfg.timeout_s
    for _ in range(64):
        if fits_side is not None and over_side is not None:
            break
        side = (int(math.ceil(side * factor / mult)) if up else int(math.floor(side / factor / mult))) * mult
        if side > max_side:
            status = f"fits up to the search limit {max_side}"
            break
        if side < spec.patch or side < mult:
            status = "exceeds the limit at every size tried"
            break
        task = _task_for(cfg, model, side, estimate=True, real=False, steps=["train"])
        task["count_flops"] = False
        if progress:
            progress(f"{model} {_size_label(side, spec.dims)} ({limit_gib:g} GiB search, estimate)")
        log_path = log_dir / f"{model}_{side}_oomsearch.log" if log_dir else None
        result, outcome = _run_worker(task, timeout, log_path)
        est = result["estimate"].get("train", {})
        if est.get("status") != "ok":
            status = f"stopped at {side}: {outcome if outcome != 'done' else est.get('error', 'error')}"
            break
        gib = est["peak_bytes"] / GIB
        if gib > limit_gib:
            over_side, over_gib = side, gib
        else:
            fits_side, fits_gib = side, gib
    return dict(model=model, limit_gib=limit_gib, largest_fitting_side=fits_side,
                largest_fitting_gib=None if fits_gib is None else round(fits_gib, 3),
                first_exceeding_side=over_side, first_exceeding_gib=None if over_gib is None else round(over_gib, 3),
                status=status)


def run_profile(cfg: ProfileConfig) -> Dict[str, Any]:
    """Run every configuration, write CSV / JSON / PNG into ``cfg.out_dir`` and return the report
    (keys: machine, config, rows, fits, oom, checks, files)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vilseg.profiling.models import get_spec

    validate_config(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / f"{cfg.prefix}_logs"
    log_dir.mkdir(exist_ok=True)
    console = Console(stderr=True, quiet=cfg.quiet)
    configs: List[Tuple[str, int]] = []
    for model in cfg.models:
        spec = get_spec(model)
        for side in (cfg.sizes_2d if spec.dims == 2 else cfg.sizes_3d):
            configs.append((model, int(side)))
    rows: List[Dict[str, Any]] = []
    oom: List[Dict[str, Any]] = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False, disable=cfg.quiet) as progress:
        bar = progress.add_task("profiling", total=len(configs))
        for model, side in configs:
            spec = get_spec(model)
            label = f"{model} {_size_label(side, spec.dims)}"
            progress.update(bar, description=label)
            reason = spec.unavailable_reason()
            if reason is not None:
                rows += _unavailable_rows(cfg, model, side, reason)
                progress.advance(bar)
                continue
            real_sizes = cfg.real_sizes_2d if spec.dims == 2 else cfg.real_sizes_3d
            train_sizes = cfg.real_train_sizes_2d if spec.dims == 2 else cfg.real_train_sizes_3d
            real = not cfg.estimate_only and (real_sizes is None or side in real_sizes)
            real_steps = [s for s in cfg.steps
                          if real and (s != "train" or train_sizes is None or side in train_sizes)]
            real_reason = ("--estimate" if cfg.estimate_only else
                           None if real else f"size not in the real-run sizes {real_sizes}")
            task = _task_for(cfg, model, side, estimate=not cfg.real_only, real=bool(real_steps), steps=cfg.steps)
            task["real_steps"] = real_steps
            log_path = log_dir / f"{model}_{side}.log"
            t0 = time.perf_counter()
            result, outcome = _run_worker(task, cfg.timeout_s, log_path)
            _fill_unfinished(result, task, outcome, log_path)
            new = _rows_for(cfg, model, side, result, task, real_reason)
            rows += new
            progress.advance(bar)
            _save_partial(cfg, rows, out_dir)
            progress.console.print(_row_line(new, time.perf_counter() - t0))
        if cfg.oom_search_gb:
            for model in cfg.models:
                spec = get_spec(model)
                if spec.unavailable_reason() is not None or "train" not in cfg.steps:
                    continue
                sides = cfg.sizes_2d if spec.dims == 2 else cfg.sizes_3d
                top = [r for r in rows if r["model"] == model and r["step"] == "train" and r["side"] == max(sides)]
                search = progress.add_task(f"{model}: {cfg.oom_search_gb:g} GiB search", total=None)
                oom.append(_oom_search(cfg, model, max(sides), top[0]["peak_gib"] if top else None,
                                       cfg.oom_search_gb, lambda d, s=search: progress.update(s, description=d),
                                       log_dir))
                progress.remove_task(search)
    fits, checks = summarize(rows, oom, cfg.oom_search_gb)
    report = dict(machine=machine_info(cfg), config=_config_dict(cfg), rows=rows, fits=fits, oom=oom,
                  checks=checks, statuses=STATUSES)
    report["files"] = write_outputs(report, out_dir, cfg.prefix, plot=cfg.plot)
    return report


def _save_partial(cfg: ProfileConfig, rows: List[Dict[str, Any]], out_dir: Path) -> None:
    """Write CSV / JSON of the rows so far (no plot), so an interrupted sweep keeps its results."""
    try:
        partial = dict(machine=machine_info(cfg), config=_config_dict(cfg), rows=rows, fits=compute_fits(rows),
                       oom=[], checks=[], statuses=STATUSES, partial=True)
        write_outputs(partial, out_dir, cfg.prefix, plot=False)
    except Exception:  # noqa: BLE001 - a failed partial save must not stop the sweep
        pass


def _unavailable_rows(cfg: ProfileConfig, model: str, side: int, reason: str) -> List[Dict[str, Any]]:
    task = _task_for(cfg, model, side, estimate=False, real=False, steps=cfg.steps)
    rows = _rows_for(cfg, model, side, {"params": None, "estimate": {}, "real": {}}, task, None)
    for r in rows:
        r.update(status="unavailable", error=reason)
    return rows


def _row_line(rows: List[Dict[str, Any]], seconds: float) -> str:
    parts = []
    for r in rows:
        mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.3f} GiB ({r['peak_source'][:4]})"
        t = "" if r["time_median_s"] is None else f", {r['time_median_s']:.3f} s"
        parts.append(f"{r['step']}: {r['status']} {mem}{t}")
    return f"  {rows[0]['model']:<22} {rows[0]['size']:>14}  " + " | ".join(parts) + f"  [{seconds:.0f} s]"


def summarize(rows: List[Dict[str, Any]], oom: List[Dict[str, Any]], limit_gib: Optional[float]
              ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """What a report derives from its rows: the growth fits (with the out-of-memory side extrapolated to
    ``limit_gib``, also written into ``oom``'s entries) and the memory checks."""
    fits = compute_fits(rows)
    if limit_gib:
        _add_extrapolation(fits, oom, rows, float(limit_gib))
    return fits, memory_checks(rows, fits)


def _add_extrapolation(fits: List[Dict[str, Any]], oom: List[Dict[str, Any]], rows: List[Dict[str, Any]],
                       limit_gib: float) -> None:
    dims = {r["model"]: r["dims"] for r in rows}
    by_model = {o["model"]: o for o in oom}
    for f in fits:
        side = extrapolate_oom_side(f.get("train_mem_fit"), limit_gib, dims[f["model"]])
        f["train_oom_side_extrapolated"] = side
        if f["model"] in by_model:
            by_model[f["model"]]["extrapolated_side"] = side


def _config_dict(cfg: ProfileConfig) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["steps"] = list(cfg.steps)
    return d


MIN_TOKENS_FOR_GROWTH_CHECK = 4096


def memory_checks(rows: List[Dict[str, Any]], fits: List[Dict[str, Any]], side: int = 2048) -> List[Dict[str, Any]]:
    """The memory comparisons the profiler checks (ViL vs attention), from whatever rows are present (a check
    whose models or size is missing is left out): growth exponents of ViL and ViT, and at ``side`` the peak training
    memory ratio DeiT-T+UperNet / ViL-T+UperNet (>= 5) and ViL vs ViT inference time. The growth checks need
    a largest size of at least ``MIN_TOKENS_FOR_GROWTH_CHECK`` tokens."""
    checks: List[Dict[str, Any]] = []
    fit = {f["model"]: f for f in fits}

    def row(model: str, step: str) -> Optional[Dict[str, Any]]:
        for r in rows:
            if r["model"] == model and r["step"] == step and r["side"] == side:
                return r
        return None

    for model, target, op in (("vil-t", 1.1, "<="), ("vil-t+upernet", 1.1, "<="),
                              ("vit-t", 2.0, "~"), ("vit-t+upernet", 2.0, "~")):
        largest = max((r["tokens"] for r in rows if r["model"] == model and r["step"] == "train"), default=0)
        # below a 1024^2 grid fixed costs (weights, the stem, the heads) dominate the peak and the exponent says
        # nothing about the sequence part: no check rather than a false alarm
        if largest < MIN_TOKENS_FOR_GROWTH_CHECK:
            continue
        if model in fit and fit[model].get("train_mem_exp_largest") is not None:
            e = fit[model]["train_mem_exp_largest"]
            ok = e <= target if op == "<=" else abs(e - target) <= 0.3
            checks.append(dict(check=f"{model}: growth exponent of peak training memory (largest sizes)",
                               value=e, target=f"{op} {target}", passed=ok))
    vil, vit = row("vil-t+upernet", "train"), row("vit-t+upernet", "train")
    if vil and vit and vil["peak_gib"] and vit["peak_gib"]:
        ratio = vit["peak_gib"] / vil["peak_gib"]
        checks.append(dict(check=f"{side}^2 peak training memory DeiT-T+UperNet / ViL-T+UperNet "
                                 f"({vit['peak_gib']:.2f} / {vil['peak_gib']:.2f} GiB, "
                                 f"{vit['peak_source']} / {vil['peak_source']})",
                           value=round(ratio, 2), target=">= 5", passed=ratio >= 5))
    for a, b in (("vil-t+upernet", "vit-t+upernet"), ("vil-t", "vit-t")):
        ra, rb = row(a, "infer"), row(b, "infer")
        if ra and rb and ra["time_median_s"] and rb["time_median_s"]:
            ratio = rb["time_median_s"] / ra["time_median_s"]
            checks.append(dict(check=f"{side}^2 inference time {b} / {a} "
                                     f"({rb['time_median_s']:.2f} s / {ra['time_median_s']:.2f} s)",
                               value=round(ratio, 2), target="> 1 (ViL faster)", passed=ratio > 1))
    return checks


# ============================================================================ outputs
CSV_COLUMNS = ["model", "description", "dims", "kind", "step", "size", "side", "pixels", "tokens", "batch",
               "status", "peak_gib", "peak_source", "measured_peak_gib", "estimated_peak_gib",
               "estimate_error_pct", "time_median_s", "n_repeats", "gflops", "params_m", "threads", "note", "error"]


def write_outputs(report: Dict[str, Any], out_dir: Path, prefix: str, plot: bool = True) -> Dict[str, str]:
    """Write ``<prefix>.csv`` (one row per model, size and step), ``<prefix>.json`` (machine, config,
    rows, fits, 80 GB search, checks) and ``<prefix>.png`` (log-log plots). Returns the paths."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(out_dir / f"{prefix}.csv"), "json": str(out_dir / f"{prefix}.json")}
    with open(files["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in report["rows"]:
            w.writerow(r)
    if plot:
        files["png"] = str(out_dir / f"{prefix}.png")
        plot_report(report, files["png"])
    report = dict(report, files=files)
    with open(files["json"], "w") as fh:
        json.dump(report, fh, indent=1)
    return files


def plot_report(report: Dict[str, Any], path: str) -> None:
    """Log-log plots against tokens, one line per model: peak training / inference memory (filled
    markers measured, hollow markers estimated) and training / inference time; 2D and 3D in separate
    rows, one legend for all panels. Dotted lines mark the real-run cap and 80 GiB where they are within a
    decade of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    dims_present = sorted({r["dims"] for r in rows})
    panels = [("train", "peak_gib", "peak training memory (GiB)"), ("infer", "peak_gib", "peak inference memory (GiB)"),
              ("train", "time_median_s", "training step time (s)"), ("infer", "time_median_s", "inference time (s)")]
    fig, axes = plt.subplots(len(dims_present), 4, figsize=(22, 5.2 * len(dims_present)), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    cmap = plt.get_cmap("tab10")
    bases = list(dict.fromkeys(m.split("+")[0] for m in models))  # a backbone and its +UperNet share a colour
    colors = {m: cmap(bases.index(m.split("+")[0]) % 10) for m in models}
    cap = report.get("machine", {}).get("max_mem_gb")
    for ri, dims in enumerate(dims_present):
        for ci, (step, key, title) in enumerate(panels):
            ax = axes[ri][ci]
            for m in models:
                sel = sorted((r for r in rows if r["model"] == m and r["step"] == step and r["dims"] == dims
                              and r.get(key)), key=lambda r: r["tokens"])
                if not sel:
                    continue
                xs = [r["tokens"] for r in sel]
                ys = [r[key] for r in sel]
                style = "--" if "+upernet" in m else "-"
                ax.plot(xs, ys, style, color=colors[m], label=m, linewidth=1.5)
                if key == "peak_gib":
                    meas = [(x, y) for x, y, r in zip(xs, ys, sel) if r["peak_source"] == "measured"]
                    est = [(x, y) for x, y, r in zip(xs, ys, sel) if r["peak_source"] != "measured"]
                    if meas:
                        ax.plot(*zip(*meas), "o", color=colors[m], markersize=5)
                    if est:
                        ax.plot(*zip(*est), "o", mfc="none", color=colors[m], markersize=6)
                else:
                    ax.plot(xs, ys, "o", color=colors[m], markersize=5)
            if key == "peak_gib":
                top = max((line.get_ydata().max() for line in ax.lines if len(line.get_ydata())), default=0.0)
                # reference lines only where they are within a decade of the data: drawn far above it they would
                # squeeze the measured curves to the bottom of the panel
                for level, label, colour in ((cap, f"real-run cap {cap:g} GiB" if cap else "", "grey"),
                                             (80, "80 GiB (one 80 GB GPU)", "red")):
                    if level and top and level <= 10 * top:
                        ax.axhline(level, color=colour, linestyle=":", linewidth=1)
                        ax.annotate(label, xy=(0.01, level), xycoords=("axes fraction", "data"), va="bottom",
                                    fontsize=8, color=colour)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"tokens ({'pixels / 16^2' if dims == 2 else 'voxels / 16^3'})")
            ax.set_title(f"{dims}D: {title}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    # one legend for every panel: each model once, in the colour and line style of its curves
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], linestyle="--" if "+upernet" in m else "-", marker="o",
                      markersize=5, label=m) for m in models]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=10, frameon=False)
    machine = report.get("machine", {})
    styles = "filled: measured, hollow: estimated (fake tensors)"
    if any("+upernet" in m for m in models):
        styles += "; solid: backbone, dashed: + UperNet"
    fig.suptitle(f"{machine.get('device', '')} ({machine.get('gpu') or machine.get('cpu', '')}), "
                 f"torch {machine.get('torch', '')}, {machine.get('dtype', '')}; {styles}", fontsize=10)
    legend_rows = -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * legend_rows / len(dims_present), 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_tables(report: Dict[str, Any]) -> List[Any]:
    """rich tables: per model the growth exponents, the peak and time at the largest size, the
    80 GB estimate; then the memory checks."""
    from rich.table import Table

    rows, fits = report["rows"], report["fits"]
    oom = {o["model"]: o for o in report.get("oom", [])}
    t = Table(title="Growth of peak memory with tokens (slope of log(peak) vs log(tokens))")
    for col in ("model", "train exp. (all)", "train exp. (largest)", "infer exp. (all)", "infer exp. (largest)",
                "largest size", "train peak GiB", "infer peak GiB", "train s", "infer s", "80 GB OOM side"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def fmt(x: Any, nd: int = 2) -> str:
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    for f in fits:
        m = f["model"]
        sel = [r for r in rows if r["model"] == m]
        if not sel:
            continue
        side = max(r["side"] for r in sel)
        at = {r["step"]: r for r in sel if r["side"] == side}

        def cell(step: str, key: str) -> str:
            r = at.get(step)
            if r is None:
                return "-"
            if r.get(key) is None:
                return r["status"] if key == "peak_gib" or r["status"] not in ("ok", "estimated") else "-"
            suffix = "*" if key == "peak_gib" and r["peak_source"] == "estimated" else ""
            return fmt(r[key], 3) + suffix

        o = oom.get(m)
        oom_txt = "-"
        if o:
            if o.get("first_exceeding_side"):
                oom_txt = f"{o['first_exceeding_side']} (fits {o.get('largest_fitting_side') or '<'})"
            else:
                oom_txt = o.get("status", "-")
            if o.get("extrapolated_side"):
                oom_txt += f"; fit {o['extrapolated_side']}"
        n = f.get("train_mem_largest_n", 0)
        t.add_row(m, fmt(f["train_mem_exp_all"]), fmt(f["train_mem_exp_largest"]) + (f" ({n})" if n else ""),
                  fmt(f["infer_mem_exp_all"]), fmt(f["infer_mem_exp_largest"]),
                  next(iter(at.values()))["size"], cell("train", "peak_gib"), cell("infer", "peak_gib"),
                  cell("train", "time_median_s"), cell("infer", "time_median_s"), oom_txt)
    tables = [t]
    if report.get("checks"):
        c = Table(title="Memory checks (ViL vs attention)")
        for col in ("check", "value", "target", "passed"):
            c.add_column(col)
        for ch in report["checks"]:
            c.add_row(ch["check"], str(ch["value"]), ch["target"], "yes" if ch["passed"] else "NO")
        tables.append(c)
    return tables


def summary_markdown(report: Dict[str, Any]) -> str:
    """The summary tables as Markdown (for benchmarks/results/profile_memory.md)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None, force_terminal=False)
    for t in summary_tables(report):
        console.print(t)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(worker_main())
