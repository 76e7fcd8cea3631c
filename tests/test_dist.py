"""Distributed training: torchrun with two CPU processes (gloo) on the mini config through tools/dist_train.sh."""
from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from ade_helpers import MINI_CONFIG, REPO, TINY, cli_options, ensure_mini_ade, tool_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_two_cpu_processes(tmp_path):
    import sys

    ensure_mini_ade()
    work = tmp_path / "work"
    iters = 4
    opts = dict(TINY)
    opts.update({"train_cfg.max_iters": iters, "train_cfg.val_interval": 1000,
                 "default_hooks.checkpoint.interval": iters})
    env = tool_env()
    env.update(PORT=str(_free_port()), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(REPO / "tools" / "dist_train.sh"), MINI_CONFIG, "2", "--work-dir", str(work),
                          "--cfg-options", *cli_options(opts)],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=560)
    log = res.stdout + res.stderr
    # torchrun exits 0 only when every rank exited 0
    assert res.returncode == 0, log[-6000:]
    # the environment dump goes to the log file (the console shows a header line instead)
    env_dump = "".join(p.read_text() for p in work.glob("*/*.log"))
    assert re.search(r"Distributed training: True", env_dump) and re.search(r"GPU number: 2", env_dump), log[-3000:]
    assert re.search(rf"Iter\(train\) \[{iters}/{iters}\]", log)
    # the gloo backend was used (no CUDA) and exactly one checkpoint was written (by rank 0)
    ckpts = sorted(p.name for p in work.glob("*.pth"))
    assert ckpts == [f"iter_{iters}.pth"], ckpts
    assert (work / "last_checkpoint").read_text().strip().endswith(f"iter_{iters}.pth")


def test_launcher_names_an_interpreter_without_torch():
    """PYTHON pointing to an interpreter without torch: one error line saying what to do, exit 2 (not
    'No module named torch' from inside torchrun)."""
    res = subprocess.run(["bash", str(REPO / "tools" / "dist_train.sh"), MINI_CONFIG, "2"],
                         env=dict(os.environ, PYTHON="/bin/false"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: /bin/false cannot import torch; run 'make install' in {REPO} or set "
                                  "PYTHON=/path/to/python")
