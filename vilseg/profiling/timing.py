"""Timing variants of one computation side by side: interleaved rounds in one process, the median of each; and the
one backbone training step the speed benchmarks time."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, TypeVar

__all__ = ["alternating_medians", "backbone_training_step"]

K = TypeVar("K", bound=Hashable)


def alternating_medians(steps: Mapping[K, Callable[[], object]], rounds: int,
                        select: Optional[Callable[[K], None]] = None) -> Dict[K, float]:
    """Median seconds of each variant's ``steps[k]()`` over ``rounds`` rounds that run every variant once, in order.

    Each variant runs once untimed first (allocator and caches warm). ``select(k)``, if given, runs untimed before
    every call of variant k (for variants that differ in a setting of one shared model). Interleaving the variants
    lets all of them see the same machine state, which on a shared VM drifts by more than most changes are worth.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: Dict[K, list] = {k: [] for k in steps}
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
    return {k: statistics.median(s) for k, s in samples.items()}


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
