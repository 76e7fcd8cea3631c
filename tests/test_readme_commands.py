"""Every command the README shows works as pasted: the script exists, its options parse with the tool's own
argparse parser (a renamed option or a literal ``[--resume]`` fails here), the repository files it names exist, shell
scripts are valid bash and make targets exist. Long runs (160k-iteration training, 2048^2 profiling) are only parsed,
not run; the cheap listing commands run in full."""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# placeholders a reader replaces (CKPT, path/to/..., <node0 address>)
PLACEHOLDER = re.compile(r"^(CKPT|CONFIG|PATH|path/to/.*|.*<.*>.*)$")


def _commands() -> List[str]:
    found = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = re.split(r"\s#\s|\s{2,}#", line)[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    for span in re.findall(r"`((?:python|bash|make) [^`]+)`", README, re.S):
        found.append(" ".join(span.split()))
    # environment assignments in front (NNODES=2 ... bash tools/dist_train.sh) are the shell's business
    return list(dict.fromkeys(re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", c) for c in found))


COMMANDS = _commands()


class _Parsed(Exception):
    pass


def _parse_only(script: Path, argv: List[str], monkeypatch) -> None:
    """Run ``script`` as __main__ until its argparse parser has parsed ``argv``, then stop."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # SystemExit(2) with argparse's message on a bad option
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(_Parsed):
        runpy.run_path(str(script), run_name="__main__")


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 15
    assert any(c.startswith("python tools/train.py") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_valid_as_pasted(command, monkeypatch, capsys):
    words = shlex.split(command)
    tool, args = words[0], words[1:]
    if tool == "make":
        makefile = (REPO / "Makefile").read_text()
        targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
        variables = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[?:]?=", makefile, re.M))
        assignments = {a for a in args if "=" in a}
        assert {a.split("=")[0] for a in assignments} <= variables, f"{command}: no such make variable"
        assert set(args) - assignments <= targets, f"{command}: no such make target"
        return
    script = REPO / args[0]
    assert script.is_file(), f"{command}: {args[0]} does not exist"
    for arg in args[1:]:  # repository files it names (configs, scripts); data and outputs are made by the user
        if re.match(r"^(configs|tools|benchmarks)/", arg) and not PLACEHOLDER.match(arg):
            assert (REPO / arg).exists(), f"{command}: {arg} does not exist"
    if tool == "bash":
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return
    assert tool == "python", command
    monkeypatch.chdir(REPO)
    try:
        _parse_only(script, args[1:], monkeypatch)
    except SystemExit as exc:
        pytest.fail(f"{command}: the tool rejects its arguments (exit {exc.code}): {capsys.readouterr().err[-500:]}")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.endswith("--list-models")])
def test_listing_commands_run(command):
    res = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "vil-t" in res.stdout
