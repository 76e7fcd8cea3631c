"""Training and testing entry points behind ``tools/train.py`` and ``tools/test.py``: mmseg's own tools' logic
(``--work-dir``, ``--resume``, ``--amp``, ``--cfg-options``, ``--launcher``, ``--show-dir``), run through
mmengine's ``Runner``, plus what a CPU-only machine needs (BN instead of SyncBN, gloo for torchrun)."""
from __future__ import annotations

import gc
import logging
import os
import re
from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

from vilseg.utils.allocator import configure_malloc

from .config import load_config, resolve_path

__all__ = ["build_runner", "init_cpu_distributed", "close_distributed", "train", "test", "enable_amp",
           "enable_visualization", "fit_log_interval", "run_log_file", "set_max_iters", "find_resume_checkpoint",
           "check_runner_checkpoint", "NothingToResumeError"]

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")
_CHECKPOINT_NAME = re.compile(r"^(iter|epoch)_(\d+)\.pth$")


class NothingToResumeError(FileNotFoundError):
    """``--resume`` was asked for, but the work dir holds no checkpoint to resume from."""


def find_resume_checkpoint(work_dir: str) -> str:
    """The checkpoint ``--resume`` continues from: the one ``last_checkpoint`` names, or, when that file is missing,
    empty or names a file that is gone (a run killed while writing it), the newest ``iter_N.pth`` /
    ``epoch_N.pth`` in ``work_dir``.

    Raises:
        NothingToResumeError: naming ``work_dir`` and what was looked for.
    """
    pointer = os.path.join(work_dir, "last_checkpoint")
    named = ""
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named and not os.path.isabs(named):
            named = os.path.join(work_dir, named)
        if named and os.path.isfile(named):
            return named
    found = []
    if os.path.isdir(work_dir):
        for name in os.listdir(work_dir):
            m = _CHECKPOINT_NAME.match(name)
            if m:
                found.append((int(m.group(2)), name))
    if found:
        newest = os.path.join(work_dir, max(found)[1])
        why = (f"last_checkpoint names {named}, which does not exist" if named else
               "last_checkpoint is empty" if os.path.isfile(pointer) else "there is no last_checkpoint")
        print_log(f"resuming from {newest} ({why})", logger="current", level=logging.WARNING)
        return newest
    raise NothingToResumeError(
        f"--resume: nothing to resume in {os.path.abspath(work_dir)} (no last_checkpoint, no iter_N.pth or "
        f"epoch_N.pth); run without --resume to start a new training, or pass the checkpoint: --resume PATH")


def check_runner_checkpoint(runner: Runner, checkpoint: str, allow_partial: bool = False) -> None:
    """Check that ``checkpoint`` fits the runner's model before mmengine loads it (mmengine loads non-strictly:
    a checkpoint of another model would only log a warning and leave random weights).

    Raises:
        CheckpointMismatchError: naming the checkpoint, the config and the tensors that do not fit.
    """
    from vilseg.utils.checkpoint import check_fits, describe_model, safe_load

    model = runner.model
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP and test-time-augmentation wrappers
        model = model.module
    name = f"the model of {runner.cfg.filename or 'the config'} ({describe_model(model)})"
    # mapped, not read: only names and shapes are compared here, and mmengine reads the file right after
    _, partial = check_fits(model, safe_load(checkpoint, map_location="cpu", mmap=True), checkpoint, name,
                            allow_partial=allow_partial)
    if partial:
        print_log(partial, logger="current", level=logging.WARNING)


def init_cpu_distributed(launcher: str) -> None:
    """Initialise torch.distributed with gloo for ``--launcher pytorch`` on a machine without CUDA.

    mmengine's own initialisation calls ``torch.cuda.set_device(local_rank)``, which fails on CPU-only torch; the
    Runner skips it when the process group already exists.
    """
    if launcher == "none" or torch.cuda.is_available() or (dist.is_available() and dist.is_initialized()):
        return
    if launcher != "pytorch":
        raise ValueError(f"--launcher {launcher} needs CUDA here; on CPU use --launcher pytorch (torchrun)")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"--launcher pytorch expects torchrun's environment; {missing} not set "
                         "(start it with tools/dist_train.sh or torchrun)")
    dist.init_process_group(backend="gloo")


def close_distributed() -> None:
    """Collect unreachable objects, wait for every rank, then destroy the process group (a no-op without one).

    A process that exits with the group still alive can abort in the backend's destructor (gloo threads still
    joinable: ``terminate called without an active exception``) after its work is done, and torchrun then
    reports the whole run as failed. Objects that use the group (a DDP wrapper and the work it last queued) must
    go first, while the interpreter is alive, not during its shutdown: callers drop their runner before this call,
    and the collection here frees what reference cycles still hold.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def enable_amp(cfg: Config) -> None:
    """Switch the optimizer wrapper to mmengine's ``AmpOptimWrapper`` (dynamic loss scale), as mmseg's tool does."""
    if not torch.cuda.is_available():
        raise ValueError("--amp needs a CUDA device (mmengine's AmpOptimWrapper); none is available here")
    wrapper = cfg.optim_wrapper.get("type", "OptimWrapper")
    if wrapper in ("AmpOptimWrapper", "AmpOnCudaOptimWrapper"):
        print_log("AMP training is already enabled in the config.", logger="current", level=logging.WARNING)
        return
    if wrapper != "OptimWrapper":
        raise ValueError(f"--amp works with optim_wrapper.type='OptimWrapper', the config has {wrapper!r}")
    cfg.optim_wrapper.type = "AmpOptimWrapper"
    cfg.optim_wrapper.loss_scale = "dynamic"


def enable_visualization(cfg: Config, show_dir: Optional[str] = None, show: bool = False,
                         wait_time: float = 2.0, interval: int = 1) -> None:
    """Turn on mmseg's ``SegVisualizationHook`` drawing (image with ground truth | with prediction), saving the
    pictures under ``show_dir/vis_data/vis_image`` for every ``interval``-th image. A relative ``show_dir`` lies
    in the work dir (as in mmseg's test tool), never in the working directory."""
    if interval < 1:
        raise ValueError(f"the visualization interval must be >= 1, got {interval}")
    hooks = cfg.get("default_hooks", {})
    if "visualization" not in hooks:
        raise ValueError("the config has no default_hooks.visualization (SegVisualizationHook) to draw with")
    hooks["visualization"]["draw"] = True
    hooks["visualization"]["interval"] = interval
    if show:
        hooks["visualization"]["show"] = True
        hooks["visualization"]["wait_time"] = wait_time
    if show_dir:
        cfg.visualizer["save_dir"] = overlay_dir(cfg, show_dir)


def overlay_dir(cfg: Config, show_dir: str) -> str:
    """The folder that ``--show-dir show_dir`` means: absolute as given, relative under the config's work dir."""
    return show_dir if os.path.isabs(show_dir) else os.path.join(cfg.work_dir, show_dir)


def build_runner(cfg: Config, verbose: bool = True) -> Runner:
    """``Runner.from_cfg``, or the registered runner named by ``runner_type``. ``verbose=False``: vilseg's
    :class:`~vilseg.engine.ConsoleRunner`, whose console leaves out the environment/config dumps and known
    deprecation notices (its log file keeps everything). mmengine loads and saves checkpoints through vilseg's
    safe loader and atomic writer (:func:`vilseg.engine.install_safe_checkpoints`)."""
    from vilseg.engine import install_safe_checkpoints

    install_safe_checkpoints()
    init_cpu_distributed(cfg.get("launcher", "none"))
    if "runner_type" in cfg:
        from mmseg.registry import RUNNERS

        return RUNNERS.build(cfg)
    if verbose:
        return Runner.from_cfg(cfg)
    from vilseg.engine import ConsoleRunner

    return ConsoleRunner.from_cfg(cfg)


def fit_log_interval(cfg: Config, lines: int = 5) -> None:
    """Log the training loss at least ``lines`` times in a short iteration-based run: a 5-iteration run with the
    configs' interval of 50 would otherwise show no loss at all."""
    max_iters = cfg.get("train_cfg", {}).get("max_iters")
    logger = cfg.get("default_hooks", {}).get("logger")
    if not max_iters or not logger or "interval" not in logger:
        return
    logger["interval"] = max(1, min(int(logger["interval"]), int(max_iters) // lines))


def run_log_file(runner: Runner) -> str:
    """The log file of ``runner``'s run (mmengine's layout: <work_dir>/<timestamp>/<timestamp>.log)."""
    return os.path.join(runner.log_dir, runner.timestamp + ".log")


def announce(runner: Runner, what: str, malloc: Optional[str] = None) -> None:
    """One header line: what runs, from which config, where it writes, on which device (and, where given, what
    :func:`~vilseg.utils.allocator.configure_malloc` said)."""
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else \
        f"cpu ({torch.get_num_threads()} threads)"
    config = runner.cfg.filename or "(config object)"
    print_log(f"{what} {config} | work dir {runner.work_dir} | device {device} | log {run_log_file(runner)}"
              + (f" | {malloc}" if malloc else ""), logger="current")


def train(config: Union[str, Config], work_dir: Optional[str] = None, resume: Union[bool, str] = False,
          amp: bool = False, cfg_options: Optional[dict] = None, launcher: str = "none",
          verbose: bool = True, malloc: str = "system") -> Runner:
    """Train a segmentor from a config, as ``mmseg/tools/train.py`` does.

    Args:
        config: config path (relative to the working directory or the repository root) or a loaded Config.
        work_dir: logs and checkpoints; CLI > config > ``./work_dirs/<config name>``.
        resume: True resumes from the last checkpoint in ``work_dir`` (see :func:`find_resume_checkpoint`; none
            there is an error); a path resumes from that checkpoint. The checkpoint must fit the model.
        amp: mixed precision (CUDA only).
        cfg_options: ``--cfg-options`` overrides.
        launcher: 'none' | 'pytorch' | 'slurm' | 'mpi'.
        verbose: False: the console shows a header line, loss lines (at least five in a short run), evaluation
            and checkpoint paths; the log file keeps the full output.
        malloc: this process's glibc malloc (:func:`~vilseg.utils.allocator.configure_malloc`, before anything
            is built): 'keep' keeps freed memory for the next step (``tools/train.py``'s default), 'system'
            leaves the process as it is (a library call changes no process-wide setting unless asked).

    Returns:
        the Runner after training (``runner.iter``, ``runner.work_dir``, ...).
    """
    malloc_setting = configure_malloc(malloc) if malloc != "system" else None
    cfg = _config_for(config, cfg_options, work_dir, launcher)
    if amp:
        enable_amp(cfg)
    if isinstance(resume, str) and resume not in ("", "auto"):
        cfg.load_from = resolve_path(resume, "checkpoint to resume from")
        cfg.resume = True
    elif resume:
        cfg.load_from = find_resume_checkpoint(cfg.work_dir)
        cfg.resume = True
    else:
        cfg.resume = False
    if not verbose:
        fit_log_interval(cfg)
    runner = build_runner(cfg, verbose)
    if cfg.resume:
        check_runner_checkpoint(runner, cfg.load_from)
    announce(runner, "training", malloc_setting)
    runner.train()
    return runner


def _config_for(config: Union[str, Config], cfg_options: Optional[dict], work_dir: Optional[str],
                launcher: str) -> Config:
    """A loaded config (path) or the given one (Config), with the launcher checked and set."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if isinstance(config, Config):
        config.launcher = launcher
        return config
    return load_config(config, cfg_options, work_dir, launcher)


def test(config: Union[str, Config], checkpoint: str, work_dir: Optional[str] = None,
         cfg_options: Optional[dict] = None, launcher: str = "none", show_dir: Optional[str] = None,
         show: bool = False, wait_time: float = 2.0, out: Optional[str] = None, tta: bool = False,
         show_interval: int = 1, verbose: bool = True, allow_partial: bool = False) -> Dict[str, float]:
    """Evaluate a checkpoint on the config's test set, as ``mmseg/tools/test.py`` does.

    The per-class IoU / accuracy table is logged by mmseg's ``IoUMetric``; ``show_dir`` saves overlays drawn by
    mmseg's ``SegVisualizationHook``; ``out`` keeps the predicted label maps as PNGs. The checkpoint must fit the
    model (:class:`~vilseg.utils.checkpoint.CheckpointMismatchError` otherwise) unless ``allow_partial``.

    Returns:
        the metrics, e.g. {'aAcc': .., 'mIoU': .., 'mAcc': ..} (percentages, as mmseg reports them).
    """
    cfg = _config_for(config, cfg_options, work_dir, launcher)
    cfg.load_from = resolve_path(checkpoint, "checkpoint")
    if show or show_dir:
        enable_visualization(cfg, show_dir, show, wait_time, show_interval)
    if tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if out is not None:
        cfg.test_evaluator["output_dir"] = out
        cfg.test_evaluator["keep_results"] = True
    runner = build_runner(cfg, verbose)
    check_runner_checkpoint(runner, cfg.load_from, allow_partial)
    announce(runner, "testing")
    metrics = dict(runner.test())
    if show_dir:  # mmengine's LocalVisBackend writes under <save_dir>/vis_data/vis_image
        shown = os.path.join(overlay_dir(cfg, show_dir), "vis_data", "vis_image")
        print_log(f"overlays (image with ground truth | prediction): {os.path.abspath(shown)}", logger="current")
    return metrics


def set_max_iters(cfg: Config, max_iters: int) -> None:
    """Shorten or lengthen an iteration-based run to ``max_iters``, scaling every parameter scheduler's
    ``begin``/``end`` with it (a 30-iteration warm-up of a 400-iteration schedule becomes 1 iteration of a
    5-iteration one), so that any budget from 1 iteration on gives a valid schedule. A validation interval equal to
    the old length follows the new one."""
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    old = int(cfg.train_cfg.max_iters)
    cfg.train_cfg.max_iters = int(max_iters)
    if cfg.train_cfg.get("val_interval") == old:
        cfg.train_cfg.val_interval = int(max_iters)
    schedulers = cfg.get("param_scheduler") or []
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    kept = []
    for sched in schedulers:
        begin = round(sched.get("begin", 0) * max_iters / old)
        end = round(min(sched.get("end", old), old) * max_iters / old)
        if begin >= max_iters:  # it would never be active
            continue
        sched["begin"], sched["end"] = begin, max(end, begin + 1)
        kept.append(sched)
    if schedulers:
        cfg.param_scheduler = kept
