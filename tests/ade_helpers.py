"""Shared helpers for the ADE20K tests: paths, tiny-model overrides of the mini config, subprocess runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
MINI_CONFIG = "configs/demo/vil_upernet_ade20k_mini.py"
MINI_ROOT = REPO / "data" / "mini_ade" / "ADEChallengeData2016"

# a 4-sub-block, 32-dim ViL with 32-channel heads on 64x64 crops: one training step takes well under a second
TINY: Dict[str, object] = {
    "model.backbone.arch": dict(embed_dims=32, num_blocks=4),
    "model.backbone.out_indices": (0, 1, 2, 3),
    "model.backbone.img_size": (64, 64),
    "model.neck.embed_dim": 32,
    "model.decode_head.in_channels": [32, 32, 32, 32],
    "model.decode_head.channels": 32,
    "model.auxiliary_head.in_channels": 32,
    "model.auxiliary_head.channels": 32,
    "model.data_preprocessor.size": (64, 64),
    "train_dataloader.batch_size": 2,
    "train_dataloader.num_workers": 0,
    "train_dataloader.persistent_workers": False,
    "val_dataloader.num_workers": 0,
    "val_dataloader.persistent_workers": False,
    "test_dataloader.num_workers": 0,
    "test_dataloader.persistent_workers": False,
    "train_dataloader.dataset.pipeline.3.crop_size": (64, 64),
    "model.test_cfg.crop_size": (64, 64),
    "model.test_cfg.stride": (48, 48),
    "default_hooks.logger.interval": 1,
    "default_hooks.visualization.draw": False,
}


# no evaluation (mmengine's train loop otherwise evaluates after the last iteration)
NO_VAL: Dict[str, object] = {"val_dataloader": None, "val_cfg": None, "val_evaluator": None}


def cli_options(options: Dict[str, object]) -> List[str]:
    """Dict of overrides -> ``--cfg-options`` arguments (mmengine DictAction syntax, no spaces; dict values are
    flattened into dotted keys, so they merge into a dict of the config)."""
    out = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += cli_options({f"{key}.{k}": v for k, v in value.items()})
            continue
        if isinstance(value, (list, tuple)):
            inner = ",".join(str(v) for v in value)
            value = f"[{inner}]" if isinstance(value, list) else f"({inner})"
        elif value is None:
            value = "None"
        out.append(f"{key}={value}")
    return out


def ensure_mini_ade() -> Path:
    from vilseg.apis.mini_ade import generate_mini_ade, mini_ade_exists

    if not mini_ade_exists(str(MINI_ROOT)):
        generate_mini_ade(str(MINI_ROOT), progress=False)
    return MINI_ROOT


def tool_env(threads: int = 1) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def run_tool(args: Sequence[str], cwd: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=tool_env(), capture_output=True, text=True,
                          timeout=timeout, **kw)
