"""Timing variants of one computation side by side: interleaved rounds in one process, the median of each; the one
backbone training step the speed benchmarks time; and the FLOPs such a step executes."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, TypeVar

__all__ = ["alternating_times", "alternating_medians", "backbone_training_step", "executed_flops",
           "compiles_blocks"]

K = TypeVar("K", bound=Hashable)


def alternating_times(steps: Mapping[K, Callable[[], object]], rounds: int,
                      select: Optional[Callable[[K], None]] = None,
                      after_round: Optional[Callable[[Dict[K, List[float]]], None]] = None) -> Dict[K, List[float]]:
    """Seconds of every call of each variant's ``steps[k]()`` over ``rounds`` rounds that run every variant once, in
    order.

    Each variant runs once untimed first (allocator and caches warm). ``select(k)``, if given, runs untimed before
    every call of variant k (for variants that differ in a setting of one shared model). ``after_round(samples)``, if
    given, runs after every round with the seconds so far (for a caller that saves partial results). Interleaving the
    variants lets all of them see the same machine state, which on a shared VM drifts by more than most changes are
    worth.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: Dict[K, List[float]] = {k: [] for k in steps}
    for k, step in steps.items():
        if select is not None:
            select(k)
        step()
    for _ in range(rounds):
        for k, step in steps.items():
            if select is not None:
                select(k)
            start = time.perf_counter()
            step()
            samples[k].append(time.perf_counter() - start)
        if after_round is not None:
            after_round(samples)
    return samples


def alternating_medians(steps: Mapping[K, Callable[[], object]], rounds: int,
                        select: Optional[Callable[[K], None]] = None) -> Dict[K, float]:
    """Median seconds of each variant over the alternating rounds of :func:`alternating_times`."""
    return {k: statistics.median(s) for k, s in alternating_times(steps, rounds, select).items()}


def backbone_training_step(model: Any, x: Any, autocast: Optional[Any] = None) -> Callable[[], None]:
    """A backbone training step as the speed benchmarks time it: ``model(x)`` (under autocast to the dtype
    ``autocast`` where given), the sum of the outputs' means in fp32 as the loss, backward, gradients cleared, and a
    CUDA synchronisation where x is on a GPU (so that the step's time is the device's)."""
    import torch

    def step() -> None:
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            outs = model(x)
            loss = sum(o.float().mean() for o in (outs if isinstance(outs, (list, tuple)) else [outs]))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return step


# torch's FlopCounterMode knows the out-of-place products only (the mLSTM kernel accumulates into buffers in place)
# and not the CPU form of fused attention (what SDPA runs on CPU)
_CONVOLUTIONS = ("convolution", "_convolution", "convolution_backward", "cudnn_convolution", "_slow_conv2d_forward",
                 "convolution_overrideable")


def _accumulating_product_flops(acc: Any, a: Any, b: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``acc += a @ b`` (``addmm_`` on 2-D, ``baddbmm_`` on 3-D shapes): 2 per multiply-add."""
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def _cpu_attention_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def _cpu_attention_backward_flops(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                                  **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, q, k, v)


def executed_flops(fn: Callable[[], object]) -> Dict[str, int]:
    """The FLOPs (2 per multiply-add, torch's ``FlopCounterMode`` convention) that ``fn()`` executes, by kind:
    ``matmul`` (mm, addmm, bmm, baddbmm, their in-place forms, fused attention) and ``convolution``. What runs is
    counted, forward and backward, a recompute's second forward included. Under the counter's dispatch mode
    ``torch.compile`` runs eagerly, so a compiled model is counted as its eager form."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={
        aten.addmm_: _accumulating_product_flops, aten.baddbmm_: _accumulating_product_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops})
    with counter:
        fn()
    totals = {"matmul": 0, "convolution": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        totals["convolution" if str(op).split(".")[-1] in _CONVOLUTIONS else "matmul"] += int(flops)
    return totals


def compiles_blocks(model: Any) -> bool:
    """Whether any of the model's modules runs through ``torch.compile`` (vilseg's ``compile_layers``): dispatch
    modes (the live-tensor tracker, the FLOP counter) make such blocks run eagerly, so what they measure would be the
    eager model's."""
    return any(getattr(m, "compile_layers", False) for m in model.modules())
