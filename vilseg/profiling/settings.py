"""The options of one profiling run, their defaults (defined here only; ``tools/profile_memory.py`` reads them)
and their checks."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

__all__ = ["ProfileConfig", "validate_config", "STATUSES", "GIB", "STEPS", "DTYPES", "BACKENDS"]

GIB = 2**30
STEPS = ("train", "infer")
DTYPES = ("float32", "bfloat16")
BACKENDS = ("live", "torch")
STATUSES = {
    "ok": "measured on real tensors",
    "estimated": "real run skipped (estimate only: see note)",
    "oom": "real run ran out of memory (allocation failed)",
    "timeout": "did not finish within --timeout",
    "killed": "worker killed by a signal (likely the system's OOM killer)",
    "error": "failed (see error)",
    "unavailable": "model not buildable here",
}


@dataclasses.dataclass
class ProfileConfig:
    """Everything one profiling run needs (``tools/profile_memory.py`` fills it from the command line).

    Sizes are input edges in pixels / voxels (a size s means s x s, or s x s x s in 3D). ``None`` for a list of
    real-run sizes means every size may run for real; ``None`` classes mean the config's.
    """

    models: List[str] = dataclasses.field(default_factory=lambda: ["2d"])
    sizes_2d: List[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024, 2048])
    sizes_3d: List[int] = dataclasses.field(default_factory=lambda: [64, 96, 128, 160])
    real_sizes_2d: Optional[List[int]] = None
    real_sizes_3d: Optional[List[int]] = None
    real_train_sizes_2d: Optional[List[int]] = None  # None: as real_sizes_2d (training is the slow step)
    real_train_sizes_3d: Optional[List[int]] = None
    device: str = "cpu"
    dtype: str = "float32"  # 'float32' | 'bfloat16' (autocast)
    batch: int = 2  # 2D training batch (UperNet's BatchNorm on 1x1 maps needs >= 2)
    infer_batch: int = 1
    batch_3d: int = 1
    infer_batch_3d: int = 1
    num_classes: Optional[int] = None
    num_classes_3d: Optional[int] = None
    steps: Tuple[str, ...] = STEPS
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
    out_dir: str = "work_dirs/profile_memory"
    prefix: str = "profile_memory"
    command: str = ""
    plot: bool = True
    quiet: bool = False


def validate_config(cfg: ProfileConfig) -> ProfileConfig:
    """Check names, sizes and the device; expand model groups. Returns the checked config.

    Raises:
        ValueError: unknown model (lists the known ones), a size below a model's patch size or not
            a multiple its model needs, a device that does not exist, or an out-of-range option.
        FileNotFoundError: a config path that does not exist.
    """
    from vilseg.profiling.models import HEAD_LOSSES, expand_model_names, get_spec
    from vilseg.utils.env import resolve_device

    cfg.models = expand_model_names(cfg.models)
    cfg.device = str(resolve_device(cfg.device))
    for option, value, allowed in (("dtype", cfg.dtype, DTYPES), ("head-loss", cfg.head_loss, HEAD_LOSSES),
                                   ("backend", cfg.backend, BACKENDS)):
        if value not in allowed:
            raise ValueError(f"--{option} must be one of {allowed}, got {value!r}")
    if cfg.estimate_only and cfg.real_only:
        raise ValueError("--estimate and --real-only exclude each other")
    for name in ("batch", "infer_batch", "batch_3d", "infer_batch_3d", "repeats"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("num_classes", "num_classes_3d"):
        if getattr(cfg, name) is not None and int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_mem_gb is not None and cfg.max_mem_gb <= 0:
        raise ValueError(f"--max-mem-gb must be > 0, got {cfg.max_mem_gb}")
    if cfg.timeout_s <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {cfg.timeout_s}")
    if set(cfg.steps) - set(STEPS) or not cfg.steps:
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
                    raise ValueError(f"resolution {s} is below the patch size {spec.patch} of model "
                                     f"{spec.name!r}: use sizes >= {spec.patch}")
                if s % spec.multiple:
                    raise ValueError(f"resolution {s} is not a multiple of {spec.multiple}, which model "
                                     f"{spec.name!r} needs")
    return cfg
