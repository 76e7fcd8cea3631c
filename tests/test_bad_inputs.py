"""Files and arguments from elsewhere: a checkpoint of another model, unreadable or odd images, misspelt options, a
resume with nothing to resume from. Each gets one clear line (exit code 2), a warning, or is handled, and the
README's reliability table says what the tools print for each."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ade_helpers import MINI_CONFIG, REPO, TINY, cli_options, ensure_mini_ade

# case -> text the tool prints for it; the README's reliability table quotes each (checked below)
MESSAGES = {
    "checkpoint of another model": "does not fit the model of",
    "checkpoint of another model, --allow-partial": "partial load of",
    "undecodable image in a folder": "cannot decode image",
    "image thinner than 1:8 or under 64 px": "padded",
    "constant image": "constant image",
    "16-bit PNG holding 12-bit values": "12-bit data",
    "grayscale image": "grayscale image",
    "constant NIfTI volume": "constant volume",
    "--resume with nothing to resume": "nothing to resume in",
    "last_checkpoint empty or naming a missing file": "resuming from",
    "misspelt --cfg-options key": "did you mean",
    "ViL Pretrained checkpoint of another architecture": "does not fit the ViL backbone",
    "--device cuda on a machine without CUDA": "has no CUDA device",
}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint that fits the tiny mini-config model, and one of a 3D ViL-UNETR."""
    from vilseg.apis import init_segmentor
    from vilseg.models.vil_unetr import ViLUNETR

    ensure_mini_ade()
    folder = tmp_path_factory.mktemp("ckpt")
    model = init_segmentor(MINI_CONFIG, None, cfg_options=dict(TINY))
    fits = folder / "tiny_2d.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": dict(model.dataset_meta)}}, fits)
    net = ViLUNETR(in_channels=1, out_channels=3, img_size=(16, 16, 16), patch_size=8, embed_dims=32, num_blocks=2,
                   feature_size=4)
    other = folder / "unetr_3d.pth"
    torch.save({"state_dict": net.state_dict(), "meta": {"iter": 2}}, other)
    return fits, other


def _infer(args, capfd):
    code = _tool("infer").main([MINI_CONFIG, *args, "--cfg-options", *cli_options(TINY)])
    out = capfd.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ checkpoints
def test_infer_refuses_a_checkpoint_of_another_model_in_one_line(checkpoints, tmp_path, capfd):
    fits, other = checkpoints
    image = sorted((ensure_mini_ade() / "images" / "validation").glob("*.jpg"))[0]
    code, out, err = _infer([str(other), str(image), "--out-dir", str(tmp_path / "o")], capfd)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and MESSAGES["checkpoint of another model"] in lines[0], err
    assert str(other) in lines[0] and "vil_upernet_ade20k_mini.py" in lines[0] and "--allow-partial" in lines[0]
    assert not (tmp_path / "o" / "masks").exists() or not list((tmp_path / "o" / "masks").iterdir())
    # the checkpoint that fits loads strictly
    code, out, err = _infer([str(fits), str(image), "--out-dir", str(tmp_path / "ok")], capfd)
    assert code == 0, err
    assert "partial load" not in out + err
    # with --allow-partial the misfit loads what fits (nothing here) and says so
    code, out, err = _infer([str(other), str(image), "--out-dir", str(tmp_path / "p"), "--allow-partial"], capfd)
    assert code == 0, err
    assert MESSAGES["checkpoint of another model, --allow-partial"] in out + err


def test_test_tool_refuses_a_checkpoint_of_another_model(checkpoints, tmp_path, capfd):
    _, other = checkpoints
    code = _tool("test").main([MINI_CONFIG, str(other), "--work-dir", str(tmp_path), "--cfg-options",
                               *cli_options(TINY)])
    err = capfd.readouterr().err
    assert code == 2
    assert "does not fit" in err and str(other) in err and "Traceback" not in err


def test_strict_fit_names_missing_unexpected_and_reshaped_tensors():
    from vilseg.utils.checkpoint import CheckpointMismatchError, check_fits

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = model.state_dict()
    state, note = check_fits(model, {"state_dict": dict(sd)}, "a.pth", "net")
    assert note is None and set(state) == set(sd)
    bad = dict(sd)
    bad.pop("1.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointMismatchError) as info:
        check_fits(model, {"state_dict": bad}, "a.pth", "net")
    msg = str(info.value)
    assert "1 of the model's 4 tensors are missing (1.bias)" in msg and "extra.weight" in msg
    assert "0.weight: checkpoint (5, 3), model (4, 3)" in msg
    state, note = check_fits(model, {"state_dict": bad}, "a.pth", "net", allow_partial=True)
    assert set(state) == {"0.bias", "1.weight"} and note.startswith("partial load of a.pth into net")


def test_vil_pretrained_is_strict(tmp_path):
    from vilseg.models.backbones.vil import ViL
    from vilseg.utils.checkpoint import CheckpointMismatchError

    arch = dict(embed_dims=32, num_blocks=4)
    src = ViL(arch=dict(embed_dims=32, num_blocks=2), out_indices=(1,))
    ckpt = tmp_path / "vil2.pth"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    dst = ViL(arch=arch, out_indices=(3,), init_cfg=dict(type="Pretrained", checkpoint=str(ckpt)))
    with pytest.raises(CheckpointMismatchError, match=MESSAGES["ViL Pretrained checkpoint of another architecture"]):
        dst.init_weights()
    part = ViL(arch=arch, out_indices=(3,), init_cfg=dict(type="Pretrained", checkpoint=str(ckpt),
                                                          allow_partial=True))
    part.init_weights()
    torch.testing.assert_close(part.blocks[0].state_dict(), src.blocks[0].state_dict())


def test_pretrained_through_cfg_options_on_a_config_without_init_cfg():
    """The shipped configs say init_cfg=None; the README's --cfg-options for a pretrained backbone still merge."""
    from vilseg.apis import load_config

    cfg = load_config("configs/vil_upernet_ade20k.py", {"model.backbone.init_cfg.type": "Pretrained",
                                                        "model.backbone.init_cfg.checkpoint": "pretrained/vil_t.pth"})
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint="pretrained/vil_t.pth")


# ------------------------------------------------------------------------------------------ images
def test_folder_with_a_bad_file_processes_the_others_and_fails_at_the_end(checkpoints, tmp_path, capfd):
    fits, _ = checkpoints
    src = sorted((ensure_mini_ade() / "images" / "validation").glob("*.jpg"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(src[0].read_bytes())
    (folder / "b_broken.jpg").write_bytes(b"not an image at all")
    (folder / "c.jpg").write_bytes(src[1].read_bytes())
    code, out, err = _infer([str(fits), str(folder), "--out-dir", str(tmp_path / "o")], capfd)
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "o" / "masks").iterdir()) == ["a.png", "c.png"]
    assert err.count("b_broken.jpg") == 1 and MESSAGES["undecodable image in a folder"] in err
    assert "1 of 3 file(s) failed" in err and "2 image(s)" in out


@pytest.mark.parametrize("shape,native", [((1, 200), False), ((200, 1), False), ((8, 8), True), ((3, 90), True)],
                         ids=["1x200", "200x1", "8x8-native", "3x90-native"])
def test_thin_and_tiny_images_are_padded_and_cropped_back(checkpoints, tmp_path, capfd, shape, native):
    fits, _ = checkpoints
    rng = np.random.default_rng(0)
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
    code, out, err = _infer([str(fits), str(path), "--out-dir", str(tmp_path / "o"), "--save-labels"]
                            + (["--native-resolution"] if native else []), capfd)
    assert code == 0, err
    labels = cv2.imread(str(tmp_path / "o" / "labels" / "odd.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == shape
    assert MESSAGES["image thinner than 1:8 or under 64 px"] in err


def test_pad_for_inference_bounds():
    from vilseg.apis.inference import MAX_ASPECT, MIN_SIDE, pad_for_inference

    img = np.ones((100, 120, 3), np.uint8)
    assert pad_for_inference(img) is img
    assert pad_for_inference(np.ones((1, 2000, 3), np.uint8)).shape == (2000 // MAX_ASPECT, 2000, 3)
    assert pad_for_inference(np.ones((8, 8, 3), np.uint8)).shape == (MIN_SIDE, MIN_SIDE, 3)


def test_doubtful_images_get_a_warning(checkpoints, tmp_path, capfd):
    fits, _ = checkpoints
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "constant.png"), np.full((80, 80, 3), 7, np.uint8))
    cv2.imwrite(str(folder / "twelve_bit.png"), rng.integers(0, 4096, (80, 80), dtype=np.uint16))
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 255, (80, 80), dtype=np.uint8))
    cv2.imwrite(str(folder / "fine.png"), rng.integers(0, 255, (80, 80, 3), dtype=np.uint8))
    code, out, err = _infer([str(fits), str(folder), "--out-dir", str(tmp_path / "o")], capfd)
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert any("constant.png" in w and MESSAGES["constant image"] in w for w in warnings), err
    assert any("twelve_bit.png" in w and MESSAGES["16-bit PNG holding 12-bit values"] in w for w in warnings), err
    assert any("gray.png" in w and MESSAGES["grayscale image"] in w for w in warnings), err
    assert not any("fine.png" in w for w in warnings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_one_line(checkpoints, tmp_path, capfd):
    fits, _ = checkpoints
    image = sorted((ensure_mini_ade() / "images" / "validation").glob("*.jpg"))[0]
    code, out, err = _infer([str(fits), str(image), "--device", "cuda"], capfd)
    assert code == 2 and err.count("error:") == 1 and MESSAGES["--device cuda on a machine without CUDA"] in err
    code = _tool("medical_infer").main([str(fits), str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                                        "--sw-device", "cuda"])
    err = capfd.readouterr().err
    assert code == 2 and "--sw-device 'cuda'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ resume, options
def test_resume_point(tmp_path):
    from vilseg.apis.train import NothingToResumeError, find_resume_checkpoint

    with pytest.raises(NothingToResumeError, match=MESSAGES["--resume with nothing to resume"]):
        find_resume_checkpoint(str(tmp_path))
    for n in (2, 10, 4):
        (tmp_path / f"iter_{n}.pth").write_bytes(b"x")
    assert find_resume_checkpoint(str(tmp_path)).endswith("iter_10.pth")  # no last_checkpoint
    (tmp_path / "last_checkpoint").write_text("")
    assert find_resume_checkpoint(str(tmp_path)).endswith("iter_10.pth")  # empty
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_12.pth"))
    assert find_resume_checkpoint(str(tmp_path)).endswith("iter_10.pth")  # names a file that is gone
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_4.pth"))
    assert find_resume_checkpoint(str(tmp_path)).endswith("iter_4.pth")  # as recorded


def test_train_tool_resume_without_checkpoint_and_misspelt_options(tmp_path, capfd):
    train = _tool("train")
    code = train.main([MINI_CONFIG, "--work-dir", str(tmp_path / "empty"), "--resume"])
    err = capfd.readouterr().err
    assert code == 2 and err.count("error:") == 1 and MESSAGES["--resume with nothing to resume"] in err, err
    assert "Traceback" not in err
    from vilseg.apis.train import NothingToResumeError

    with pytest.raises(NothingToResumeError):  # --debug: the traceback instead of the line
        train.main([MINI_CONFIG, "--work-dir", str(tmp_path / "empty"), "--resume", "--debug"])
    capfd.readouterr()
    for option, suggestion in (("optim_wraper.optimizer.lr=0.5", "'optim_wrapper'"),
                               ("train_cfg.max_iter=3", "'train_cfg.max_iters'"),
                               ("model.backbone.patch_sz=8", "'model.backbone.patch_size'")):
        code = train.main([MINI_CONFIG, "--work-dir", str(tmp_path / "w"), "--cfg-options", option])
        err = capfd.readouterr().err
        assert code == 2, option
        assert err.count("error:") == 1 and MESSAGES["misspelt --cfg-options key"] in err and suggestion in err, err
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_new_keys_that_components_accept_pass():
    from vilseg.apis import load_config

    cfg = load_config(MINI_CONFIG, {"model.backbone.drop_path_rate": 0.2, "randomness.deterministic": True,
                                    "train_cfg.val_begin": 5, "model.decode_head.loss_decode.avg_non_ignore": True})
    assert cfg.model.backbone.drop_path_rate == 0.2 and cfg.train_cfg.val_begin == 5


# ------------------------------------------------------------------------------------------ the README's table
def test_readme_reliability_table_quotes_what_the_tools_say():
    text = (REPO / "README.md").read_text()
    section = text[text.index("| bad input |"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    body = {re.split(r"\s*\|\s*", ln.strip("| "))[0]: ln for ln in rows[2:]}
    for case, said in MESSAGES.items():
        assert case in body, f"README reliability table has no row for {case!r}"
        assert said in body[case], f"README row for {case!r} does not quote {said!r}"
