"""A refused checkpoint ends every tool that loads one with one error line and exit code 2, no traceback."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evil")
    path = folder / "evil.pth"
    path.write_bytes(pickle.dumps(_Payload()))
    return path


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("tool", ["convert", "medical_infer", "infer"])
def test_tools_refuse_in_one_line(tool, evil, tmp_path):
    img = tmp_path / "x.nii.gz"
    if tool == "convert":
        args = [str(REPO / "tools/convert_official_vil.py"), str(evil), str(tmp_path / "out.pth")]
    elif tool == "medical_infer":
        import nibabel as nib
        import numpy as np

        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(img))
        args = [str(REPO / "tools/medical_infer.py"), str(evil), str(img), "-o", str(tmp_path / "o.nii.gz"),
                "--no-progress"]
    else:
        args = [str(REPO / "tools/infer.py"), str(REPO / "configs/demo/vil_upernet_ade20k_mini.py"), str(evil),
                str(REPO / "data"), "--out-dir", str(tmp_path / "o")]
    proc = _run(args, tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "refusing to load checkpoint" in lines[0] and "plain pickle" in lines[0], proc.stderr
