"""Mixed precision where the hardware has it, full precision elsewhere, chosen from one config."""
from __future__ import annotations

import logging
from typing import Any, Union

import torch
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmseg.registry import OPTIM_WRAPPERS

__all__ = ["AmpOnCudaOptimWrapper", "amp_dtype"]


def amp_dtype(dtype: Union[str, torch.dtype, None]) -> Union[str, torch.dtype, None]:
    """'auto' -> 'bfloat16' where the current CUDA device supports it, else 'float16'; anything else unchanged."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def AmpOnCudaOptimWrapper(dtype: Union[str, torch.dtype, None] = "auto", loss_scale: Any = "dynamic",
                          **kwargs: Any) -> OptimWrapper:
    """mmengine's ``AmpOptimWrapper`` when CUDA is available, its plain ``OptimWrapper`` (fp32) otherwise.

    The ADE20K recipe trains in mixed precision on GPUs (float16 with dynamic loss scaling, whose scaler skips
    steps with non-finite gradients); on a CPU machine autocast would only slow training down. A factory rather
    than a subclass, so the object the runner holds is exactly mmengine's class.

    Args:
        dtype: autocast dtype on CUDA; 'auto' picks bfloat16 where supported, else float16.
        loss_scale: ``AmpOptimWrapper``'s loss scale ('dynamic', a float or a GradScaler dict).
        kwargs: ``OptimWrapper`` arguments (``optimizer``, ``clip_grad``, ``accumulative_counts``).
    """
    if not torch.cuda.is_available():
        print_log("precision: float32 (no CUDA device; mixed precision is used on GPUs only)", logger="current",
                  level=logging.INFO)
        return OptimWrapper(**kwargs)
    dtype = amp_dtype(dtype)
    print_log(f"precision: mixed, autocast {dtype}, loss scale {loss_scale}", logger="current", level=logging.INFO)
    return AmpOptimWrapper(dtype=dtype, loss_scale=loss_scale, **kwargs)


OPTIM_WRAPPERS.register_module(name="AmpOnCudaOptimWrapper", module=AmpOnCudaOptimWrapper)
