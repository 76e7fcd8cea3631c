"""The README's commands run, as a new user pastes them into a fresh clone: in an empty working folder (nothing is
written into the repository), with only the substitutions a reader makes (a checkpoint for ``CKPT``, an image for
``path/to/image_or_folder``, a public checkpoint file where the README names one). Without ADE20K on the machine, the training commands must end in the one-line error that says where
the data goes; that is what a fresh clone shows.

Every README command is either run here (``RUNS``) or listed in ``NOT_RUN`` with the reason and the test that runs
the same tool end to end; a new README command fails :func:`test_every_readme_command_is_run_or_accounted_for`
until it is classified. All runs share one Python process (``_DRIVER``), so the suite pays the import cost once.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from ade_helpers import ensure_mini_ade, tool_env
from test_readme_commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "vil_public_tiny.pt"
NO_CUDA = not torch.cuda.is_available()

# README command -> (substitutions, expected exit code, regex the output must match, files made)
RUNS: Dict[str, Tuple[Dict[str, str], int, str, List[str]]] = {
    "python tools/train.py configs/vil_upernet_ade20k.py": (
        {}, 2, r"error: .*data/ade/ADEChallengeData2016.*", []),
    "python tools/train.py configs/vil_upernet_ade20k_compiled.py": (
        {}, 2, r"error: .*data/ade/ADEChallengeData2016.*", []),
    "python tools/train.py configs/vil_upernet_ade20k.py --resume": (
        {}, 2, r"error: --resume: nothing to resume in .*work_dirs/vil_upernet_ade20k", []),
    "python tools/test.py  configs/vil_upernet_ade20k.py work_dirs/vil_upernet_ade20k/iter_160000.pth --show-dir vis": (
        {}, 2, r"error: .*iter_160000\.pth", []),
    "python tools/infer.py configs/vil_upernet_ade20k.py CKPT path/to/image_or_folder --out-dir outputs/infer": (
        {"CKPT": "none", "path/to/image_or_folder": "{image}"}, 0, r"1 image\(s\)",
        ["outputs/infer/masks/{stem}.png", "outputs/infer/overlays/{stem}.png"]),
    "python tools/convert_official_vil.py vil2_tiny16_e800_in1k.th pretrained/vil_t.pth --img-size 512": (
        {}, 0, r"pretrained/vil_t\.pth", ["pretrained/vil_t.pth"]),
    "python tools/medical_infer.py work_dirs/vil_unetr/latest.pth data/mni152/imagesTs -o outputs/seg --label "
    "data/mni152/labelsTs": ({}, 2, r"error: .*latest\.pth", []),
}
if NO_CUDA:
    RUNS["python tools/train.py configs/vil_upernet_ade20k.py --amp --cfg-options train_dataloader.batch_size=4"] = (
        {}, 2, r"error: --amp needs a CUDA device", [])

_LONG = "long by design; its options are parsed by test_readme_commands.py"
NOT_RUN: Dict[str, str] = {
    "make demo": "the demo itself; `python tools/demo.py --ade-iters 1 --medical-iters 1` is its shrunk form",
    "make demo-ade": "make target of tools/demo.py --skip-medical",
    "make demo-medical": "make target of tools/demo.py --skip-ade",
    "make install": "runs before every test (the Makefile's test target depends on it)",
    "make test": "this suite",
    "make test-fast": "this suite without the slow tests",
    "python tools/demo.py": _LONG + "; the ADE and MONAI training it drives run in test_ade_train.py, "
                            "test_medical.py",
    "python tools/train.py configs/vil_upernet_ade20k.py --cfg-options model.backbone.init_cfg.type=Pretrained":
        "needs ADE20K like the plain training command; the Pretrained path runs in test_vil_public_reference.py",
    "python tools/make_mni152_case.py": "builds data/mni152, which the medical tests build the same way",
    "python tools/train_medical.py": "the MONAI loop; runs shrunk in test_medical.py (train, resume)",
    "python tools/medical_demo.py": _LONG,
    "python tools/profile_memory.py --models": _LONG + "; the profiler's sweep runs shrunk in test_profiling.py",
    "python tools/profile_memory.py --list-models": "run by test_readme_commands.py::test_listing_commands_run",
    "python tools/analyze_complexity.py": "FLOP counts of five models at 512^2; run shrunk in test_complexity.py",
    "bash benchmarks/profile_all.sh": _LONG,
    "bash benchmarks/gpu_check.sh": "needs a GPU",
    "bash tools/dist_train.sh": "8 GPUs and ADE20K; torchrun with two CPU processes runs in test_dist.py",
    "python benchmarks/": _LONG + "; each script's --help runs in test_benchmark_scripts.py",
}

_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
results = []
for script, argv, cwd in json.loads(sys.argv[1]):
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [script, *argv]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            code = "exception"
            err.write(traceback.format_exc())
    results.append(dict(code=code, stdout=out.getvalue(), stderr=err.getvalue()))
print("@@RESULTS@@" + json.dumps(results))
"""


def _not_run_reason(command: str) -> str:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), "")


def test_every_readme_command_is_run_or_accounted_for():
    unclassified = [c for c in COMMANDS if c not in RUNS and not _not_run_reason(c)
                    and not (c.endswith("--amp --cfg-options train_dataloader.batch_size=4") and not NO_CUDA)]
    assert not unclassified, f"README commands neither run here nor listed in NOT_RUN: {unclassified}"
    assert set(RUNS) <= set(COMMANDS), f"RUNS names commands the README no longer shows: {set(RUNS) - set(COMMANDS)}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, dict]:
    work = tmp_path_factory.mktemp("fresh_clone_user")
    image = sorted((ensure_mini_ade() / "images" / "validation").glob("*.jpg"))[0]
    # the public ViL checkpoint the README converts: the tiny public model of the reference fixture, as its file
    public = torch.load(FIXTURE, weights_only=True)
    torch.save({"model": public["state_dict"]}, work / "vil2_tiny16_e800_in1k.th")
    jobs, names = [], []
    for command, (subs, *_rest) in RUNS.items():
        words = shlex.split(command)
        args = [subs.get(w, w).format(image=image) for w in words[2:]]
        jobs.append([str(REPO / words[1]), args, str(work)])
        names.append(command)
    res = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(jobs)], cwd=str(work), env=tool_env(2),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "@@RESULTS@@" in res.stdout, res.stderr[-3000:]
    results = json.loads(res.stdout.split("@@RESULTS@@", 1)[1])
    return {name: dict(result, work=work, stem=image.stem) for name, result in zip(names, results)}


@pytest.mark.parametrize("command", list(RUNS))
def test_readme_command_runs_as_pasted(runs, command):
    _subs, code, pattern, files = RUNS[command]
    result = runs[command]
    output = result["stdout"] + result["stderr"]
    assert result["code"] == code, f"{command}: exit {result['code']}, expected {code}:\n{output[-3000:]}"
    assert re.search(pattern, output), f"{command}: output does not match {pattern!r}:\n{output[-3000:]}"
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    if code != 0:  # a refusal is one error line (the tools' own warning lines may come before it)
        errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result["stderr"][-3000:]
    for name in files:
        assert (result["work"] / name.format(stem=result["stem"])).is_file(), f"{command}: {name} not written"


def test_the_converted_public_checkpoint_loads_into_a_vil(runs):
    from vilseg.models.backbones.vil import ViL
    from vilseg.utils.checkpoint import safe_load, state_dict_from

    work = runs["python tools/convert_official_vil.py vil2_tiny16_e800_in1k.th pretrained/vil_t.pth --img-size 512"][
        "work"]
    state = state_dict_from(safe_load(work / "pretrained" / "vil_t.pth"))
    dims, pairs = state["pos_embed"].shape[-1], len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    model = ViL(arch=dict(embed_dims=int(dims), num_blocks=2 * pairs), img_size=512, out_indices=(-1,),
                final_norm=True)
    assert model.pos_embed.shape == state["pos_embed"].shape  # resized to the 32x32 grid of --img-size 512
    model.load_state_dict(state, strict=True)
