"""One (model, size) measurement, in the process that runs it: ``python -m vilseg.profiling.worker TASK OUT``.

1. **estimate** (``task['estimate']``): the model's parameters, the inputs and every intermediate are fake tensors
   (:func:`vilseg.profiling.memory.fake_mode`); the live-tensor tracker gives the peak of one training step
   (forward + backward [+ optimizer step]) and of one inference forward, and
   ``torch.utils.flop_counter.FlopCounterMode`` counts their FLOPs (matmuls / convolutions / attention;
   elementwise work is not counted).
2. **real** (``task['real']``; a step whose estimate exceeds ``max_mem_bytes`` is skipped): the same two steps on
   real tensors: peak memory (tracker on CPU, allocator statistics on CUDA) and what the process held (resident
   or reserved growth, see :func:`vilseg.profiling.memory.measure_peak`) in a first run, which is also the
   warm-up, then ``repeats`` timed runs (median reported; repeats stop early once ``max_repeat_seconds`` are
   spent). On CPU the worker caps its own data segment (``RLIMIT_DATA``) a little above ``max_mem_bytes``, so a
   run that goes past it fails with an allocation error that is recorded as ``oom`` instead of taking the machine
   down.

The result is written to OUT (atomically) after every phase, so that a parent that kills a worker on a time-out
keeps what it finished.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .settings import GIB

__all__ = ["run_task", "classify_exception", "mask_free_accuracy", "main"]


# ---------------------------------------------------------------------------------------------------- limits
def _vmdata_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(r"VmData:\s+(\d+) kB", fh.read())
        return int(m.group(1)) * 1024 if m else 0
    except OSError:
        return 0


def _cap_data_segment(max_bytes: Optional[int], slack_bytes: int) -> Optional[int]:
    """Limit this process's data segment to what it uses now + 1.25 x ``max_bytes`` + ``slack_bytes`` and return
    the limit (None: no cap). Linux >= 4.7 counts anonymous mmaps, so a large tensor allocation past it fails with
    an error instead of the machine running out of memory."""
    if max_bytes is None or not sys.platform.startswith("linux"):
        return None
    import resource

    limit = _vmdata_bytes() + int(max_bytes * 1.25) + int(slack_bytes)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def _at_cap(limit: Optional[int]) -> bool:
    """Whether the data segment is within 16 MiB (or a tenth of the limit) of ``limit``. Checked while the
    exception's traceback still holds the step's tensors."""
    if limit is None:
        return False
    try:
        return _vmdata_bytes() >= limit - max(16 * 2**20, limit // 10)
    except Exception:  # noqa: BLE001 - not even /proc could be read: no memory left
        return True


def _uncap_data_segment() -> None:
    if not sys.platform.startswith("linux"):
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))


def classify_exception(exc: BaseException, at_memory_cap: bool = False) -> str:
    """'oom' for an allocation refused (under the data-segment cap or by the GPU), else 'error'.

    ``at_memory_cap``: the process was at its data-segment cap when ``exc`` was raised. Then any failure counts as
    out of memory: near the cap even Python's own small allocations fail, and C code that does not check them
    raises whatever follows (a ``SystemError`` "error return without exception set", a ``TypeError``)."""
    import torch

    if at_memory_cap or isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "oom"
    msg = str(exc).lower()
    # the wordings of a refused allocation: torch's CPU allocator (two variants), the C++ runtime, numpy, the
    # dynamic loader (a lazily loaded library), errno 12 (ENOMEM)
    if any(s in msg for s in ("can't allocate memory", "cannot allocate memory", "out of memory",
                              "not enough memory", "bad_alloc", "posix_memalign", "unable to allocate",
                              "failed to map segment", "memory allocation failed", "errno 12", "error code 12")):
        return "oom"
    return "error"


# ---------------------------------------------------------------------------------------------------- steps
@contextlib.contextmanager
def mask_free_accuracy() -> Iterator[None]:
    """mmseg's decode-head ``accuracy``, rewritten without its boolean-mask indexing, inside the block."""
    import torch
    from mmseg.models.decode_heads import decode_head

    # why: mmseg's accuracy indexes by a boolean mask, a data-dependent shape that fake tensors cannot estimate
    original = decode_head.accuracy

    def accuracy(pred, target, topk=1, thresh=None, ignore_index=None):  # noqa: ANN001 - mmseg's signature
        with torch.no_grad():
            valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
            correct = ((pred.argmax(dim=1) == target) & valid).sum()
            return correct.float() * 100.0 / valid.sum().clamp(min=1)

    decode_head.accuracy = accuracy
    try:
        yield
    finally:
        decode_head.accuracy = original


class _Steps:
    """The training and inference steps of one model at one size (inputs made on construction, so under a fake
    mode they are fake)."""

    def __init__(self, model: Any, kind: str, size: Tuple[int, ...], task: Dict[str, Any], device: Any,
                 fake: bool = False) -> None:
        import torch

        self.model, self.kind, self.device = model, kind, device
        # real runs keep mmseg's accuracy as users run it; only fake tensors need the mask-free one
        self.accuracy = mask_free_accuracy if fake else contextlib.nullcontext
        self.autocast = task["dtype"] == "bfloat16"
        in_ch = 1 if kind == "medical" else 3
        n_train, n_infer = int(task["batch"]), int(task["infer_batch"])
        self.x_train = torch.randn(n_train, in_ch, *size, device=device)
        self.x_infer = torch.randn(n_infer, in_ch, *size, device=device)
        self.y_train = torch.randint(0, int(task["num_classes"] or 2), (n_train, *size), device=device)
        self.data_samples = None
        if kind == "segmentor":
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample

            self.data_samples = []
            for i in range(n_train):
                ds = SegDataSample(metainfo=dict(img_shape=tuple(size), pad_shape=tuple(size), ori_shape=tuple(size)))
                ds.gt_sem_seg = PixelData(data=self.y_train[i:i + 1])
                self.data_samples.append(ds)
        self.optimizer = None
        if task["optimizer_step"]:
            self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def _autocast(self) -> Any:
        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def get(self, step: str) -> Tuple[Callable[[], None], List[Any], Callable[[], None]]:
        """(the step, the objects alive before it, its preparation) for 'train' or 'infer'."""
        if step == "train":
            return self.train, [self.model, self.optimizer, self.x_train, self.y_train], self.prepare_train
        return self.infer, [self.model, self.x_infer], self.prepare_infer

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
            if self.kind == "segmentor":
                with self.accuracy():
                    losses = self.model.loss(self.x_train, self.data_samples)
                loss = sum(v for k, v in losses.items() if "loss" in k)
                del losses
            elif self.kind == "medical":
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
            out = self.model(self.x_infer, mode="tensor") if self.kind == "segmentor" else self.model(self.x_infer)
            del out


# ---------------------------------------------------------------------------------------------------- phases
def _estimate(task: Dict[str, Any], model: Any, kind: str, size: Tuple[int, ...], step: str) -> Dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vilseg.profiling.memory import fake_mode, measure_peak, to_fake_module

    t0 = time.perf_counter()
    mode = fake_mode()
    fake = to_fake_module(copy.deepcopy(model), mode)
    with mode:
        st = _Steps(fake, kind, size, task, torch.device("cpu"), fake=True)
        fn, tracked, prepare = st.get(step)
        prepare()
        _, pm = measure_peak(fn, device="cpu", track=tracked, backend=task["backend"], fake=True)
        entry: Dict[str, Any] = dict(status="ok", peak_bytes=pm.peak_bytes, start_bytes=pm.start_bytes)
        if task["count_flops"]:
            # a pass of its own: under activation checkpointing the counter's module hooks keep recomputed tensors
            # alive longer, which would inflate the tracked peak
            prepare()
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            entry["flops"] = int(counter.get_total_flops())
    entry["seconds"] = time.perf_counter() - t0
    return entry


def _real(task: Dict[str, Any], model: Any, kind: str, size: Tuple[int, ...], step: str, device: Any,
          save: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Peak (first run) and times of one step; ``save`` gets the entry once the peak is known."""
    import torch

    from vilseg.profiling.memory import measure_peak

    st = _Steps(model, kind, size, task, device)
    try:
        fn, tracked, prepare = st.get(step)
        prepare()
        t0 = time.perf_counter()
        _, pm = measure_peak(fn, device=device, track=tracked, backend=task["backend"])
        first = time.perf_counter() - t0
        entry = dict(status="ok", peak_bytes=pm.peak_bytes, start_bytes=pm.start_bytes, method=pm.method,
                     held_bytes=pm.held_bytes, held_method=pm.held_method, first_run_seconds=first)
        save(entry)
        times: List[float] = []
        for _ in range(int(task["repeats"])):
            prepare()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            if sum(times) + first > float(task["max_repeat_seconds"]):
                break
        if times:
            entry.update(times=times, time_median_s=statistics.median(times), time_min_s=min(times))
        return entry
    finally:
        st.model = None


def run_task(task: Dict[str, Any], out_path: Optional[str] = None) -> Dict[str, Any]:
    """Run one (model, size) configuration in this process (see the module docstring).

    ``task`` keys: model, size (list of ints), batch, infer_batch, num_classes, device, dtype, steps,
    estimate (bool), real (bool), real_steps (default: steps), max_mem_bytes (int or None), cap_slack_bytes,
    repeats, max_repeat_seconds, optimizer_step, head_loss, backend, threads, count_flops, known_estimates
    (optional: {step: estimate entry} from an earlier worker, for the cap). Returns (and writes to
    ``out_path`` after every phase) ``{"params": int, "threads": int, "estimate": {step: {...}}, "real": {step:
    {...}}}``.
    """
    import torch

    from vilseg.profiling.models import build_model, get_spec
    from vilseg.utils.checkpoint import atomic_write

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
            atomic_write(json.dumps(result, indent=1).encode(), out_path)

    save()
    try:
        model = build_model(spec.name, size, task.get("num_classes"), head_loss=task.get("head_loss", "chunked"))
    except Exception as exc:  # noqa: BLE001 - recorded for every step asked for
        error = dict(status="error", error=f"building the model: {type(exc).__name__}: {exc}"[:500])
        for phase, phase_steps in (("estimate", steps), ("real", task.get("real_steps", steps))):
            if task[phase]:
                result[phase] = {step: dict(error) for step in phase_steps}
        save()
        return result
    result["params"] = sum(p.numel() for p in model.parameters())

    if task["estimate"]:
        for step in steps:
            try:
                entry = _estimate(task, model, spec.kind, size, step)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                entry = dict(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
            gc.collect()
            result["estimate"][step] = entry
            save()

    if task["real"]:
        cap = task.get("max_mem_bytes")
        model = model.to(device)
        torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before capping
        for step in task.get("real_steps", steps):
            est = result["estimate"].get(step) or task.get("known_estimates", {}).get(step, {})
            if cap is not None and est.get("status") == "ok" and est["peak_bytes"] > cap:
                result["real"][step] = dict(status="estimated", note=f"estimate {est['peak_bytes'] / GIB:.2f} GiB "
                                                                     f"> cap {cap / GIB:.2f} GiB")
                save()
                continue

            def keep(entry: Dict[str, Any], step: str = step) -> None:
                result["real"][step] = entry
                save()

            limit = None
            try:
                if device.type == "cpu":
                    limit = _cap_data_segment(cap, int(task.get("cap_slack_bytes", 256 * 2**20)))
                entry = _real(task, model, spec.kind, size, step, device, keep)
            except Exception as exc:  # noqa: BLE001
                entry = dict(status=classify_exception(exc, _at_cap(limit)),
                             error=f"{type(exc).__name__}: {exc}"[:500])
            finally:
                model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cpu":
                    _uncap_data_segment()
            keep(entry)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vilseg.profiling.worker TASK.json OUT.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m vilseg.profiling.worker TASK.json OUT.json", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    with open(argv[0]) as fh:
        task = json.load(fh)
    run_task(task, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
