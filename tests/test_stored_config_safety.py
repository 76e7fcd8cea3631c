"""A config stored in a checkpoint is data: rebuilding a network from it never imports or runs anything."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vilseg.medical.checkpoint import save_checkpoint
from vilseg.medical.registry import build_loss, build_network, register_network

REPO = Path(__file__).resolve().parents[1]

TINY_UNETR = dict(type="UNETR", in_channels=1, out_channels=2, img_size=16, hidden_size=32, mlp_dim=64,
                  num_heads=4, feature_size=4)


def _stored_config(model: dict, **extra) -> dict:
    cfg = dict(model=model, num_classes=2, class_names=["background", "fg"],
               data=dict(roi_size=[16, 16, 16], pixdim=None, axcodes="RAS"), val=dict(roi_size=[16, 16, 16]))
    cfg.update(extra)
    return cfg


def _evil_checkpoints(marker: Path) -> dict:
    cmd = f"touch {marker}"
    return {
        "import_path": _stored_config({"type": "os.system", "command": cmd}),
        "scope_trick": _stored_config({"type": "system", "_scope_": "os", "command": cmd}),
        "registry_scope": _stored_config({"type": "mmengine.os.system", "command": cmd}),
        "nested_type": _stored_config(dict(TINY_UNETR, norm_name={"type": "os.system", "command": cmd})),
        "intensity_type": _stored_config(TINY_UNETR, data=dict(roi_size=[16, 16, 16], pixdim=None,
                                                               intensity={"type": "os.system", "command": cmd})),
        "file_writing_transform": _stored_config(TINY_UNETR, data=dict(
            roi_size=[16, 16, 16], pixdim=None, intensity={"type": "SaveImaged", "output_dir": str(marker)})),
    }


def _run_medical_infer(args, in_process: bool):
    """tools/medical_infer.py: as a user runs it (a fresh process), or its main() in this process (faster)."""
    if not in_process:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "medical_infer.py"), *args], capture_output=True,
                              text=True, cwd=args[0].rsplit("/", 1)[0], timeout=300)
        return proc.returncode, proc.stderr
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("medical_infer_tool", REPO / "tools" / "medical_infer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = tool.main(list(args))
    return code, err.getvalue()


@pytest.mark.parametrize("case", ["import_path", "scope_trick", "registry_scope", "nested_type", "intensity_type",
                                  "file_writing_transform"])
def test_medical_infer_never_builds_code_from_a_stored_config(case, tmp_path):
    import nibabel as nib
    import numpy as np

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    # real weights of the tiny UNETR, so that a refusal cannot come from a state dict that does not fit
    save_checkpoint(ckpt, {"state_dict": build_network(TINY_UNETR).state_dict(),
                           "meta": {"config": _evil_checkpoints(marker)[case]}})
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), str(scan))
    code, stderr = _run_medical_infer([str(ckpt), str(scan), "-o", str(tmp_path / "out.nii.gz"), "--no-progress"],
                                      in_process=case != "import_path")
    assert not marker.exists(), f"{case}: the stored config ran code"
    assert code == 2, stderr
    expected = {"scope_trick": "'_scope_' is not accepted", "nested_type": "nested 'type' keys are not accepted",
                "intensity_type": "intensity type must be one of", "file_writing_transform": "intensity type must be"
                }.get(case, "is not one of the accepted network types")
    assert expected in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_builder_accepts_registered_names_and_their_dotted_spelling_only():
    assert type(build_network(TINY_UNETR)).__name__ == "UNETR"
    assert type(build_network(dict(TINY_UNETR, type="monai.networks.nets.UNETR"))).__name__ == "UNETR"
    assert type(build_loss(dict(type="DiceCELoss", to_onehot_y=True, softmax=True))).__name__ == "DiceCELoss"
    for bad in ("torch.nn.Linear", "builtins.eval", "mmseg.ViL", "ViL", "monai.networks.nets.unetr.os.system"):
        with pytest.raises(ValueError, match="not one of the accepted network types"):
            build_network(dict(type=bad))
    with pytest.raises(ValueError, match="not one of the accepted loss types"):
        build_loss(dict(type="torch.nn.MSELoss"))
    with pytest.raises(ValueError, match="plain values|expected numbers"):
        build_network(dict(TINY_UNETR, norm_name=object()))


def test_registered_extras_are_accepted(tmp_path):
    class Tiny(torch.nn.Conv3d):
        pass

    register_network("TinyConvForTest", Tiny)
    net = build_network(dict(type="TinyConvForTest", in_channels=1, out_channels=2, kernel_size=1))
    assert isinstance(net, Tiny)


def test_stored_config_of_a_real_checkpoint_still_rebuilds(tmp_path):
    from vilseg.medical.inference import NiftiSegmenter

    net = build_network(TINY_UNETR)
    ckpt = tmp_path / "ok.pth"
    save_checkpoint(ckpt, {"state_dict": net.state_dict(),
                           "meta": {"config": _stored_config(dict(TINY_UNETR, type="monai.networks.nets.UNETR"))}})
    seg = NiftiSegmenter.from_checkpoint(ckpt, progress=False)
    for a, b in zip(seg.model.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
