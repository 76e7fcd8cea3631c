"""Exact peak-memory measurement for one training or inference step.

Three ways to get the peak, one interface (:func:`measure_peak`):

* **CUDA**: ``torch.cuda.reset_peak_memory_stats()`` before the step and
  ``torch.cuda.max_memory_allocated()`` after it (what the caching allocator handed out,
  parameters and everything else live on the device included).
* **CPU**: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees every tensor an
  ATen operator returns, adds the bytes of each *new* storage once and subtracts them when the
  storage is freed (a weak-reference callback on the ``UntypedStorage``, which PyTorch keeps
  alive exactly as long as the C++ storage). Tensors that exist before the step (parameters,
  buffers, gradients, optimizer states, the inputs) are registered up front, so the peak is the
  largest total of live tensor bytes at any operator boundary.
* **Estimate**: the same step with the model's parameters, the inputs and every intermediate
  as ``FakeTensor`` s (:class:`torch._subclasses.fake_tensor.FakeTensorMode`): shapes, dtypes
  and storages are propagated but no memory is allocated and no arithmetic is done, and the
  same tracker counts the same storages. This gives the peak for sizes the machine cannot hold.

Three CPU trackers are provided:

* ``backend='torch'``: PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``
  (works on CPU and under ``FakeTensorMode`` in torch 2.13; it also keeps a per-module
  breakdown, which costs a loop over all modules seen so far on every operator),
* ``backend='live'``: :class:`LiveTensorTracker` below, the same accounting in O(1) per
  operator and without the per-module breakdown. It is the default because the chunkwise
  mLSTM kernels issue many small operators per block at large resolutions; the test suite
  checks that both backends report the same peak.
* ``backend='allocator'``: :class:`AllocatorTracker`, real CPU tensors only: the running total of
  what PyTorch's CPU allocator hands out and takes back, from ``torch.profiler``'s memory events.
  It is no dispatch mode, so the step runs as it does unwatched: under a dispatch mode vilseg's ViL
  layers run their autograd form (registered operators, the kernel's Python form) instead of the
  native tiles, which keep more between forward and backward, so the two dispatch-mode trackers
  report the autograd form's peak, not the one a training run has. It also sees what C++ code
  allocates and frees inside one operator (through PyTorch's allocator). The test suite checks it
  against hand-computed peaks and against ``'live'`` on PyTorch operators. The profiler's own
  records are part of what the process holds during such a step.

Next to the live-tensor peak, :func:`measure_peak` reports what the *process* needed for the step
(``PeakMemory.held_bytes``): on CUDA ``max_memory_reserved()`` above the reserved memory at the start
(the caching allocator's segments), on CPU the resident high-water mark above the resident size at the
start (``VmHWM`` - ``VmRSS``, the high-water mark reset first through ``/proc/self/clear_refs``). The
difference to the live growth is allocator overhead: freed memory the allocator keeps, fragmentation,
scratch buffers. Measure it in a fresh process per step: a process that ran a larger step before reuses
the memory its allocator kept and shows a smaller growth.

What neither tracker sees: memory an ATen kernel allocates and frees inside one call (scratch buffers
of oneDNN convolutions or of the CPU flash-attention kernel), allocator rounding and
fragmentation. On CUDA ``max_memory_allocated`` does include kernel workspaces that go through
the caching allocator.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

Trackable = Union[nn.Module, torch.optim.Optimizer, torch.Tensor, None]
Backend = Literal["live", "torch", "allocator"]

__all__ = [
    "LiveTensorTracker",
    "TorchMemTracker",
    "AllocatorTracker",
    "PeakMemory",
    "make_tracker",
    "torch_mem_tracker_available",
    "measure_peak",
    "resident_bytes",
    "resident_peak_bytes",
    "reset_resident_peak",
    "fake_mode",
    "to_fake_module",
]


def _iter_tensors(objs: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Yield every tensor held by modules (params, grads, buffers), optimizers (states) or given
    directly (nested lists/tuples/dicts are flattened)."""
    flat, _ = tree_flatten(list(objs))
    for obj in flat:
        if obj is None:
            continue
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in tree_flatten(state)[0]:
                    if isinstance(v, torch.Tensor):
                        yield v
        else:
            raise TypeError(
                f"cannot track an object of type {type(obj).__name__}: pass modules, "
                "optimizers or tensors"
            )


def _storage_of(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    if t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
        return None


def _storages(objs: Iterable[Any]) -> Iterator[torch.UntypedStorage]:
    """The storages of every tensor :func:`_iter_tensors` yields for objs (tensors without one left out)."""
    for t in _iter_tensors(objs):
        st = _storage_of(t)
        if st is not None:
            yield st


class LiveTensorTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages at every ATen operator; keep the maximum.

    Use as a context manager around the step; register tensors created before it with
    :meth:`track`. Each storage is counted once however many tensors view it; a storage whose
    size changes (``resize_``) is re-counted when an operator next returns it.

    Example::

        tracker = LiveTensorTracker()
        tracker.track(model, optimizer, inputs)
        with tracker:
            model(inputs).sum().backward()
        tracker.peak_bytes   # int, bytes
    """

    def __init__(self) -> None:
        super().__init__()
        # storage -> [nbytes]; WeakIdKeyDictionary so that a dead storage leaves the table
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current_bytes: int = 0
        self.peak_bytes: int = 0

    # ------------------------------------------------------------------ bookkeeping
    def _release(self, cell: list) -> None:
        self.current_bytes -= cell[0]
        cell[0] = 0

    def _add_storage(self, st: torch.UntypedStorage) -> None:
        cell = self._sizes.get(st)
        nbytes = int(st.nbytes())
        if cell is None:
            cell = [nbytes]
            self._sizes[st] = cell
            # the finalizer fires when PyTorch frees the storage (CPython refcounting: at once)
            weakref.finalize(st, self._release, cell)
            self.current_bytes += nbytes
        elif cell[0] != nbytes:  # resized in place
            self.current_bytes += nbytes - cell[0]
            cell[0] = nbytes

    def track(self, *objs: Trackable) -> "LiveTensorTracker":
        """Register tensors that exist before the step: modules (parameters, their grads,
        buffers), optimizers (state tensors) and plain tensors. Returns ``self``."""
        for st in _storages(objs):
            self._add_storage(st)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return self

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                st = _storage_of(t)
                if st is not None:
                    self._add_storage(st)
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        return out


def torch_mem_tracker_available() -> bool:
    """Whether ``torch.distributed._tools.mem_tracker.MemTracker`` can be imported."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401
    except Exception:  # noqa: BLE001 - builds without torch.distributed
        return False
    return True


class TorchMemTracker:
    """Adapter giving PyTorch's ``MemTracker`` the interface of :class:`LiveTensorTracker`
    (``track``, ``peak_bytes``, ``current_bytes``, context manager)."""

    def __init__(self) -> None:
        from torch.distributed._tools.mem_tracker import MemTracker

        self._mt = MemTracker()

    def track(self, *objs: Trackable) -> "TorchMemTracker":
        tensors, others = [], []
        for o in tree_flatten(list(objs))[0]:
            if isinstance(o, torch.Tensor):
                tensors.append(o)
            elif isinstance(o, (nn.Module, torch.optim.Optimizer)):
                others.append(o)
            elif o is not None:
                raise TypeError(
                    f"cannot track an object of type {type(o).__name__}: pass modules, "
                    "optimizers or tensors"
                )
        # parameters' existing grads are tensors too
        for o in others:
            if isinstance(o, nn.Module):
                tensors.extend(p.grad for p in o.parameters() if p.grad is not None)
        self._mt.track_external(*others, *tensors)
        return self

    @staticmethod
    def _total(snap: dict) -> int:
        return int(sum(dev_snap.get("Total", 0) for dev_snap in snap.values()))

    @property
    def peak_bytes(self) -> int:
        return self._total(self._mt.get_tracker_snapshot("peak"))

    @property
    def current_bytes(self) -> int:
        return self._total(self._mt.get_tracker_snapshot("current"))

    def __enter__(self) -> "TorchMemTracker":
        self._mt.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mt.__exit__(*exc)


class AllocatorTracker:
    """Count the bytes PyTorch's CPU allocator hands out during the step and not yet back; keep the maximum.

    The interface of :class:`LiveTensorTracker` (``track``, ``peak_bytes``, ``current_bytes``, context manager) on
    ``torch.profiler``'s memory events: every allocation and free of the CPU allocator inside the context, read when
    it closes (``peak_bytes`` and ``current_bytes`` are known after the step). Not a dispatch mode: the step runs as
    it does unwatched (native operators, C++ kernels, compiled graphs), and memory that C++ code allocates and frees
    inside one operator counts too. Real CPU tensors only. The profiler does not report frees of storages allocated
    before it started (PyTorch warns once), so for a step that frees tensors it did not make (e.g. gradients of an
    earlier step set to None) the peak is an upper bound.
    """

    def __init__(self) -> None:
        self._start = 0
        self._seen: set = set()  # data pointers of the storages counted into the start (across track() calls)
        self._growth_peak = 0
        self._growth_end = 0
        self._profile: Any = None

    def track(self, *objs: Trackable) -> "AllocatorTracker":
        """Count the storages of tensors that exist before the step (as :meth:`LiveTensorTracker.track`) into the
        start. Returns ``self``."""
        for st in _storages(objs):
            if st.data_ptr() not in self._seen:  # each storage once, however many tensors view it
                self._seen.add(st.data_ptr())
                self._start += int(st.nbytes())
        return self

    @property
    def peak_bytes(self) -> int:
        return self._start + self._growth_peak

    @property
    def current_bytes(self) -> int:
        return self._start + self._growth_end

    def __enter__(self) -> "AllocatorTracker":
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        from torch._C._profiler import _EventType

        prof, self._profile = self._profile, None
        prof.__exit__(*exc)
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
        total = peak = 0
        for _, size in sorted(events):  # frees have negative sizes
            total += size
            peak = max(peak, total)
        self._growth_peak, self._growth_end = peak, total


def make_tracker(backend: Backend = "live") -> Union[LiveTensorTracker, TorchMemTracker, AllocatorTracker]:
    """Create a CPU / fake-tensor tracker. ``backend``: ``'live'`` (:class:`LiveTensorTracker`),
    ``'torch'`` (PyTorch's ``MemTracker``) or ``'allocator'`` (:class:`AllocatorTracker`, real tensors only)."""
    if backend == "live":
        return LiveTensorTracker()
    if backend == "allocator":
        return AllocatorTracker()
    if backend == "torch":
        if not torch_mem_tracker_available():
            raise ValueError(
                "backend='torch' needs torch.distributed._tools.mem_tracker.MemTracker, which "
                "this torch build lacks; use backend='live'"
            )
        return TorchMemTracker()
    raise ValueError(f"unknown memory tracker backend {backend!r}; expected 'live', 'torch' or 'allocator'")


@dataclasses.dataclass
class PeakMemory:
    """Result of :func:`measure_peak`.

    Attributes:
        peak_bytes: largest number of bytes of live tensors during the step, including what was
            live before it (parameters, grads, optimizer states, inputs).
        start_bytes: bytes live when the step began.
        end_bytes: bytes live when it ended.
        method: ``'cuda'`` (allocator statistics), ``'cpu-live'`` / ``'cpu-torch'`` /
            ``'cpu-allocator'`` (tracker on real tensors) or ``'fake-live'`` / ``'fake-torch'`` (tracker
            on fake tensors).
        held_bytes: how much more memory the process held at its fullest during the step than at its
            start (CUDA: reserved by the caching allocator; CPU: resident); None for fake tensors or
            where the platform does not say. Compare it with ``peak_bytes - start_bytes``.
        held_method: ``'cuda-reserved'``, ``'cpu-resident'`` (high-water mark reset before the step) or
            ``'cpu-maxrss-growth'`` (growth of the process's lifetime high-water mark: exact only in a
            fresh process), None with ``held_bytes``.
    """

    peak_bytes: int
    start_bytes: int
    end_bytes: int
    method: str
    held_bytes: Optional[int] = None
    held_method: Optional[str] = None


def resident_bytes() -> tuple[Optional[int], Optional[int]]:
    """(resident set size, its high-water mark) of this process in bytes, from ``/proc/self/status``;
    ``(None, None)`` where there is none (not Linux)."""
    import re

    try:
        with open("/proc/self/status") as fh:
            text = fh.read()
    except OSError:
        return None, None
    values = [re.search(rf"{key}:\s+(\d+) kB", text) for key in ("VmRSS", "VmHWM")]
    if not all(values):
        return None, None
    return int(values[0].group(1)) * 1024, int(values[1].group(1)) * 1024


def reset_resident_peak() -> bool:
    """Reset this process's resident high-water mark to its current resident size (Linux >= 4.0, writing
    5 to ``/proc/self/clear_refs``). Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    rss, hwm = resident_bytes()
    return rss is not None and hwm is not None and hwm <= rss + 2**20


def resident_peak_bytes() -> Optional[int]:
    """This process's resident high-water mark in bytes (``getrusage``'s ``ru_maxrss``); None where there is none
    (not POSIX). Its growth over a step, in a fresh process, is what the step made the process hold."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


def measure_peak(
    fn: Callable[[], Any],
    *,
    device: Union[str, torch.device] = "cpu",
    track: Sequence[Trackable] = (),
    backend: Backend = "live",
    fake: bool = False,
) -> tuple[Any, PeakMemory]:
    """Run ``fn()`` once and return ``(its result, PeakMemory)``.

    Args:
        fn: the step (no arguments). Its result is returned; hold no references to large
            intermediates in it if later measurements should not see them.
        device: where the step runs. ``'cuda[:i]'`` uses the caching allocator's statistics
            (``track`` and ``backend`` are ignored); anything else uses a tracker.
        track: modules / optimizers / tensors that exist before the step and count towards the
            peak (parameters, grads and optimizer states that exist, inputs).
        backend: ``'live'``, ``'torch'`` or ``'allocator'`` (real tensors only), see the module docstring.
        fake: only a label for ``PeakMemory.method``: set it when the tensors are fake.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not fake:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start, reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return result, PeakMemory(peak, start, torch.cuda.memory_allocated(dev), "cuda",
                                  torch.cuda.max_memory_reserved(dev) - reserved, "cuda-reserved")
    if fake and backend == "allocator":
        raise ValueError("backend='allocator' counts what the CPU allocator hands out, which fake tensors never "
                         "touch; use backend='live' or 'torch' for fake tensors")
    tracker = make_tracker(backend)
    tracker.track(*track)
    start = tracker.current_bytes
    held_start = held_method = None
    if not fake:
        if reset_resident_peak():
            held_start, held_method = resident_bytes()[0], "cpu-resident"
        else:
            held_start, held_method = resident_peak_bytes(), "cpu-maxrss-growth"
    with tracker:
        result = fn()
    held = None
    if held_start is not None:
        after = resident_bytes()[1] if held_method == "cpu-resident" else resident_peak_bytes()
        held = None if after is None else max(0, after - held_start)
    method = ("fake-" if fake else "cpu-") + backend
    return result, PeakMemory(int(tracker.peak_bytes), int(start), int(tracker.current_bytes), method, held,
                              held_method if held is not None else None)


# ---------------------------------------------------------------------- fake tensors
def fake_mode() -> Any:
    """A fresh ``FakeTensorMode`` for estimate runs (tensors created inside it are fake)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def to_fake_module(module: nn.Module, mode: Any) -> nn.Module:
    """Replace, in place, every parameter and buffer of ``module`` by a fake copy owned by
    ``mode`` (same shape, dtype, ``requires_grad``; no memory). Returns ``module``.

    Models are built for real first (their initialisers may call ``.item()``, which fake tensors
    refuse) and converted afterwards; parameters are small next to activations at the sizes the
    estimate mode is for.
    """
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
            mod._parameters[name] = memo[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            if id(b) not in memo:
                memo[id(b)] = mode.from_tensor(b)
            mod._buffers[name] = memo[id(b)]
    return module


