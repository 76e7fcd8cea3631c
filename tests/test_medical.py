"""3D medical segmentation: ViL-UNETR, the MNI152 case builder, MONAI training loop + resume, NIfTI inference."""
from __future__ import annotations

import copy
import gzip
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from nibabel.processing import resample_from_to
from torch import nn

from vilseg.medical.mni152 import build_mni152_cases, hemisphere_asymmetry, template_paths, tissue_labels
from vilseg.medical.data import load_datalist, split_datalist
from vilseg.medical.inference import NiftiInputError, NiftiSegmenter, check_nifti, dice_per_class, segment_files
from vilseg.medical.transforms import build_train_transforms
from vilseg.models.vil_unetr import ViLUNETR, default_out_indices

REPO = Path(__file__).resolve().parents[1]


def tiny_vil_unetr(**kw) -> ViLUNETR:
    args = dict(in_channels=1, out_channels=3, img_size=(16, 16, 16), patch_size=8, embed_dims=32, num_blocks=2,
                feature_size=4)
    args.update(kw)
    return ViLUNETR(**args)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- ViL-UNETR
@pytest.mark.parametrize("patch,size", [(8, (32, 48, 40)), (16, (32, 48, 64)), (4, (12, 20, 8))])
def test_vil_unetr_shapes_non_cubic(patch, size):
    torch.manual_seed(0)
    net = tiny_vil_unetr(patch_size=patch, num_blocks=4, img_size=(32, 32, 32))
    x = torch.randn(2, 1, *size)
    states = net.hidden_states(x)
    assert len(states) == int(np.log2(patch))
    for h in states:
        assert h.shape == (2, 32) + tuple(s // patch for s in size)
    assert net(x).shape == (2, 3) + size


def test_vil_unetr_pads_sizes_not_divisible_by_patch():
    net = tiny_vil_unetr()
    out = net(torch.randn(1, 1, 13, 21, 9))
    assert out.shape == (1, 3, 13, 21, 9)


def test_vil_unetr_forward_backward():
    torch.manual_seed(0)
    net = tiny_vil_unetr(num_blocks=4)
    x = torch.randn(1, 1, 16, 24, 32)
    target = torch.randint(0, 3, (1, 16, 24, 32))
    loss = nn.functional.cross_entropy(net(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("vil.patch_embed.proj.weight", "vil.pos_embed", "vil.blocks.1.rowwise_from_bot_right",
                 "encoder1", "skip_encoders.0", "decoders.0", "out.conv"):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_vil_unetr_scan_order_changes_the_function():
    torch.manual_seed(0)
    fixed = tiny_vil_unetr(num_blocks=4, scan_order="fixed").eval()
    cycle = tiny_vil_unetr(num_blocks=4, scan_order="cycle").eval()
    cycle.load_state_dict(fixed.state_dict())  # same weights, only the flattening order differs
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        a, b = fixed(x), cycle(x)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_vil_unetr_matches_unetr_layout_at_patch_16():
    net = tiny_vil_unetr(patch_size=16, num_blocks=12)
    assert net.out_indices == default_out_indices(12, 4) == [3, 5, 9, 11]
    assert [len(m.blocks) for m in net.skip_encoders] == [2, 1, 0]  # as UNETR's encoder2/3/4
    assert [m.transp_conv.conv.out_channels for m in net.decoders] == [32, 16, 8, 4]


def test_vil_unetr_rejects_bad_input_and_arguments():
    net = tiny_vil_unetr()
    with pytest.raises(ValueError, match="5-D"):
        net(torch.randn(1, 16, 16, 16))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        tiny_vil_unetr(patch_size=6)
    with pytest.raises(ValueError, match="out_indices"):
        tiny_vil_unetr(out_indices=[0, 1])


def test_vil_unetr_registry_and_monai_sliding_window():
    from monai.inferers import sliding_window_inference

    from vilseg.medical.registry import build_network

    net = build_network(dict(type="ViLUNETR", in_channels=1, out_channels=2, img_size=16, patch_size=8,
                             embed_dims=32, num_blocks=2, feature_size=4))
    assert isinstance(net, ViLUNETR) and isinstance(net, nn.Module)
    unetr = build_network(dict(type="monai.networks.nets.UNETR", in_channels=1, out_channels=2, img_size=16,
                               hidden_size=32, mlp_dim=64, num_heads=4, feature_size=4))
    assert type(unetr).__name__ == "UNETR"
    with torch.no_grad():
        out = sliding_window_inference(torch.randn(1, 1, 20, 30, 17), (16, 16, 16), 2, net.eval(), overlap=0.25,
                                       mode="gaussian")
    assert out.shape == (1, 2, 20, 30, 17)


# ----------------------------------------------------------------------------------------------- MNI152 case
def test_tissue_labels_rule():
    gm = np.array([0.9, 0.6, 0.3, 0.45, 0.5, 0.0])
    wm = np.array([0.1, 0.4, 0.7, 0.45, 0.5, 0.0])
    np.testing.assert_array_equal(tissue_labels(gm, wm, 0.5), [1, 1, 2, 0, 0, 0])
    with pytest.raises(ValueError, match="shape"):
        tissue_labels(gm, wm[:3])


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("mni152_tiny")
    summary = build_mni152_cases(out, spacing=6.0, crop_mm=((-60, 60), (-80, 40), (-20, 60)))
    return out, summary


def test_mni152_builder_tiny_crop(tiny_case):
    out, summary = tiny_case
    assert set(template_paths()) == {"t1", "gm", "wm"}
    t1 = nib.load(str(template_paths()["t1"]))
    assert hemisphere_asymmetry(t1) == 0.0  # why the split is coronal, not by hemisphere
    train, val = split_datalist(out / "dataset.json")
    assert len(train) == 1 and len(val) == 1
    tr_img, tr_lab = nib.load(train[0]["image"]), nib.load(train[0]["label"])
    va_img, va_lab = nib.load(val[0]["image"]), nib.load(val[0]["label"])
    assert tr_img.shape == tr_lab.shape and va_img.shape == va_lab.shape
    assert np.allclose(tr_img.header.get_zooms(), 6.0)
    for lab in (tr_lab, va_lab):
        values = np.unique(np.asarray(lab.dataobj))
        assert set(values) == {0, 1, 2}
    # the held-out voxels lie strictly anterior (world y) of every training voxel: no overlap
    def y_range(img):
        ys = [(img.affine @ [0, j, 0, 1])[1] for j in (0, img.shape[1] - 1)]
        return min(ys), max(ys)
    assert y_range(tr_img)[1] < y_range(va_img)[0]
    assert y_range(tr_img)[1] < summary["split_plane_y_mm"] < y_range(va_img)[0]
    # the crop box was honoured (voxel centres inside it, within one voxel of margin)
    assert y_range(tr_img)[0] >= -80 - 6 * 3 and y_range(va_img)[1] <= 40 + 6 * 3
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "gray_matter", "2": "white_matter"}
    assert "Louis Collins" in (out / "LICENSE").read_text()


def test_shipped_mni152_case_is_consistent():
    data = REPO / "data" / "mni152"
    if not (data / "dataset.json").is_file():
        pytest.skip("data/mni152 not built (python tools/make_mni152_case.py)")
    train, val = split_datalist(data / "dataset.json")
    assert Path(train[0]["image"]).name == "mni152_posterior.nii.gz"
    assert Path(val[0]["image"]).name == "mni152_anterior.nii.gz"
    assert (data / "LICENSE").is_file() and (data / "README.md").is_file()
    total = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert total < 5 * 2 ** 20


def test_datalist_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_datalist(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_datalist(bad)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="a.nii.gz"):
        load_datalist(ref)


def test_train_transforms_give_balanced_crops(tiny_case):
    out, _ = tiny_case
    train, _ = split_datalist(out / "dataset.json")
    tf = build_train_transforms((16, 16, 16), 3, pixdim=(6.0, 6.0, 6.0), num_samples=3)
    tf.set_random_state(0)
    crops = tf(dict(train[0]))
    assert len(crops) == 3
    for c in crops:
        assert tuple(c["image"].shape) == (1, 16, 16, 16) and tuple(c["label"].shape) == (1, 16, 16, 16)
        assert 0.0 <= float(c["image"].min()) and float(c["image"].max()) <= 1.0
        assert set(torch.unique(c["label"]).tolist()) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------- training loop
def _tiny_cfg(case_dir: Path, max_iters: int) -> dict:
    """The shipped base config (the training loop's only source of settings) with a tiny network, crop and budget."""
    from mmengine.config import Config

    base = Config.fromfile(str(REPO / "configs" / "medical" / "_base_" / "mni152.py")).to_dict()
    base.pop("custom_imports", None)
    return dict(
        base,
        num_classes=3, class_names=["background", "gray_matter", "white_matter"],
        model=dict(type="ViLUNETR", in_channels=1, out_channels=3, img_size=(16, 16, 16), patch_size=8,
                   embed_dims=32, num_blocks=2, feature_size=4),
        loss=dict(type="monai.losses.DiceCELoss", to_onehot_y=True, softmax=True),
        optimizer=dict(type="AdamW", lr=1e-3),
        data=dict(base["data"], dataset_json=str(case_dir / "dataset.json"), pixdim=(6.0, 6.0, 6.0),
                  roi_size=(16, 16, 16), num_samples=1, batch_size=1),
        train=dict(base["train"], max_iters=max_iters, val_interval=2, checkpoint_interval=1, seed=0, device="cpu"),
        val=dict(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25, mode="gaussian"))


def test_validation_dice_is_nan_for_a_class_no_case_has():
    from vilseg.medical.train import evaluate

    class Echo(nn.Module):  # predicts each voxel's own value as its class
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].round().long(), 3).permute(0, 4, 1, 2, 3).float()

    label = torch.zeros(1, 8, 8, 8)
    label[0, :4] = 1  # class 1 in the left half, class 2 nowhere
    out = evaluate(Echo(), [{"image": label.clone(), "label": label.clone()}], lambda d: d, num_classes=3,
                   roi_size=(8, 8, 8))
    assert out["per_class"][0] == pytest.approx(1.0) and np.isnan(out["per_class"][1])
    assert out["mean"] == pytest.approx(1.0) and np.isnan(out["per_case"][0][1])
    assert np.isnan(dice_per_class(label[0].numpy().astype(int), label[0].numpy().astype(int), 3)[1])


def test_training_refuses_a_config_without_a_key_and_names_it(tiny_case, tmp_path):
    from vilseg.medical.train import MissingConfigKeyError, train

    case_dir, _ = tiny_case
    cfg = _tiny_cfg(case_dir, 1)
    del cfg["data"]["flip_prob"]
    with pytest.raises(MissingConfigKeyError, match=r"'data\.flip_prob'.*configs/medical/_base_/mni152\.py"):
        train(cfg, work_dir=tmp_path, progress=False, verbose=False)
    cfg = _tiny_cfg(case_dir, 1)
    del cfg["param_scheduler"]
    with pytest.raises(MissingConfigKeyError, match="'param_scheduler'"):
        train(cfg, work_dir=tmp_path, progress=False, verbose=False)


@pytest.fixture(scope="module")
def trained(tiny_case, tmp_path_factory):
    from vilseg.medical.train import train

    case_dir, _ = tiny_case
    work = tmp_path_factory.mktemp("train")
    first = train(_tiny_cfg(case_dir, 2), work_dir=work, progress=False, verbose=False)
    return case_dir, work, first


def test_training_step_checkpoint_and_resume(trained):
    from vilseg.medical.checkpoint import load_checkpoint
    from vilseg.medical.train import train

    case_dir, work, first = trained
    assert first["start_iter"] == 0 and len(first["history"]) == 1
    assert len(first["val"]["per_class"]) == 2 and np.isfinite(first["history"][0]["train_loss"])
    ckpt = load_checkpoint(work / "latest.pth")  # weights-only
    assert ckpt["meta"]["iter"] == 2 and ckpt["meta"]["config"]["model"]["type"] == "ViLUNETR"
    assert not [p for p in work.iterdir() if p.name.startswith(".tmp")]  # atomic writes leave no temp file
    before = {k: v.clone() for k, v in ckpt["state_dict"].items()}

    # resume with a longer budget: continues at iteration 3, LR schedule follows the new length
    resumed = train(_tiny_cfg(case_dir, 4), work_dir=work, resume=True, progress=False, verbose=False)
    assert resumed["start_iter"] == 2
    after = load_checkpoint(work / "latest.pth")
    assert after["meta"]["iter"] == 4
    assert [h["iter"] for h in after["meta"]["history"]] == [2, 4]
    steps = {int(s["step"]) for s in after["optimizer"]["state"].values()}
    assert steps == {4}  # AdamW state continued from iteration 2
    assert any(not torch.equal(before[k], after["state_dict"][k]) for k in before)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        train(_tiny_cfg(case_dir, 3), work_dir=work, resume=work / "nope.pth", progress=False, verbose=False)


def test_interrupted_training_resumes_bit_identically(tiny_case, tmp_path, monkeypatch):
    """A run stopped right after its iteration-2 checkpoint and resumed ends with exactly the weights and optimizer
    state of an uninterrupted run: same crops, same random states."""
    import vilseg.medical.checkpoint as ckpt_module
    from vilseg.medical.checkpoint import load_checkpoint
    from vilseg.medical.train import train

    case_dir, _ = tiny_case
    cfg = _tiny_cfg(case_dir, 4)
    cfg["model"]["drop_path_rate"] = 0.2  # training draws random numbers besides the crops
    train(copy.deepcopy(cfg), work_dir=tmp_path / "whole", progress=False, verbose=False)

    save = ckpt_module.save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        if state["meta"]["iter"] == 2 and Path(path).name == "latest.pth":
            raise KeyboardInterrupt("stopped after the iteration-2 checkpoint")

    monkeypatch.setattr(ckpt_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(cfg), work_dir=tmp_path / "split", progress=False, verbose=False)
    monkeypatch.setattr(ckpt_module, "save_checkpoint", save)
    assert load_checkpoint(tmp_path / "split" / "latest.pth")["meta"]["iter"] == 2
    resumed = train(copy.deepcopy(cfg), work_dir=tmp_path / "split", resume=True, progress=False, verbose=False)
    assert resumed["start_iter"] == 2

    a, b = (load_checkpoint(tmp_path / d / "latest.pth") for d in ("whole", "split"))
    assert a["meta"]["iter"] == b["meta"]["iter"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pid][name])), (pid, name)
    assert [h["val_mean_dice"] for h in a["meta"]["history"]] == [h["val_mean_dice"] for h in b["meta"]["history"]]


# ----------------------------------------------------------------------------------------------- inference
class IntensityCentres(nn.Module):
    """A point-wise stand-in for a trained network: each voxel goes to the class whose mean intensity is nearest.

    It has no spatial context, so a prediction can only match the labels if the inference pipeline puts every
    voxel back where it came from.
    """

    def __init__(self, centres):
        super().__init__()
        self.register_buffer("centres", torch.as_tensor(centres, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x):
        return -100.0 * (x - self.centres) ** 2


def _reorient_resample(img: nib.Nifti1Image, axcodes, zooms, order: int) -> nib.Nifti1Image:
    """Reorient to ``axcodes`` and resample to voxel sizes ``zooms`` (same field of view)."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    img = nib.Nifti1Image(data, img.affine)
    img = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes)))
    old = np.asarray(img.header.get_zooms()[:3])
    aff = img.affine.copy()
    aff[:3, :3] = img.affine[:3, :3] @ np.diag(np.asarray(zooms) / old)
    shape = tuple(int(np.ceil(s * o / z)) for s, o, z in zip(img.shape, old, zooms))
    return resample_from_to(img, (shape, aff), order=order)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    data = REPO / "data" / "mni152"
    if not (data / "dataset.json").is_file():  # not shipped yet: build the same case (about 5 s)
        data = tmp_path_factory.mktemp("mni152_2mm")
        build_mni152_cases(data, spacing=2.0, write_docs=False)
    return data / "imagesTs" / "mni152_anterior.nii.gz", data / "labelsTs" / "mni152_anterior.nii.gz"


def _centre_segmenter(image_path: Path, label_path: Path) -> NiftiSegmenter:
    from vilseg.medical.transforms import build_val_transforms

    img = nib.load(str(image_path))
    d = build_val_transforms(pixdim=img.header.get_zooms()[:3])({"image": str(image_path), "label": str(label_path)})
    image, label = d["image"].numpy()[0], d["label"].numpy()[0]
    centres = [float(image[label == c].mean()) for c in range(3)]
    return NiftiSegmenter(IntensityCentres(centres), 3, (32, 32, 32), pixdim=img.header.get_zooms()[:3],
                          progress=False)


def _direct_dice(seg: NiftiSegmenter, image_path: Path, label_path: Path):
    """Dice of the point-wise stand-in applied in the file's own grid (no resampling at all)."""
    from vilseg.medical.transforms import build_val_transforms

    d = build_val_transforms(pixdim=None, axcodes=None)({"image": str(image_path), "label": str(label_path)})
    with torch.no_grad():
        pred = seg.model(d["image"][None].float()).argmax(1)[0].numpy()
    return dice_per_class(pred, d["label"].numpy()[0], 3)


@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.3)], ids=["lps", "lps_anisotropic"])
def test_inference_round_trip_lps_anisotropic(heldout, tmp_path, factors):
    image_path, label_path = heldout
    seg = _centre_segmenter(image_path, label_path)
    res = segment_files(seg, image_path, tmp_path / "orig_seg.nii.gz", label=label_path, progress=False)[0]
    assert res.ok, res.error
    base = res.dice
    assert min(base) > 0.8  # the stand-in is a reasonable segmenter on the original grid

    img, lab = nib.load(str(image_path)), nib.load(str(label_path))
    zooms = np.asarray(img.header.get_zooms()[:3]) * np.asarray(factors)
    moved_img = _reorient_resample(img, ("L", "P", "S"), zooms, order=1)
    moved_lab = _reorient_resample(lab, ("L", "P", "S"), zooms, order=0)
    assert nib.aff2axcodes(moved_img.affine) == ("L", "P", "S")
    nib.save(moved_img, str(tmp_path / "moved.nii.gz"))
    nib.save(moved_lab, str(tmp_path / "moved_label.nii.gz"))

    res2 = segment_files(seg, tmp_path / "moved.nii.gz", tmp_path / "out", label=tmp_path / "moved_label.nii.gz",
                         progress=False)[0]
    assert res2.ok, res2.error
    out = nib.load(res2.output)
    src = nib.load(str(tmp_path / "moved.nii.gz"))
    assert out.shape == src.shape
    assert np.array_equal(out.affine, src.affine)
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    assert out.get_data_dtype() == np.uint8
    if factors == (1.0, 1.0, 1.0):  # a pure reorientation loses nothing: the same Dice
        np.testing.assert_allclose(res2.dice, base, atol=1e-3)
    else:  # resampling the image and labels costs a little, nothing more
        for d0, d1 in zip(base, res2.dice):
            assert abs(d0 - d1) < 0.05, (base, res2.dice)
    # and the pipeline (to 2 mm RAS, windows, back) agrees with the stand-in applied directly in the moved grid
    direct = _direct_dice(seg, tmp_path / "moved.nii.gz", tmp_path / "moved_label.nii.gz")
    np.testing.assert_allclose(res2.dice, direct, atol=0.02)
    # a prediction flipped top-bottom would not match: the Dice above measures alignment (not left-right: the
    # template is symmetric)
    flipped = np.asarray(out.dataobj)[:, :, ::-1]
    assert np.mean(dice_per_class(flipped, np.asarray(moved_lab.dataobj), 3)) < np.mean(res2.dice) - 0.1


def _write_bad_inputs(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "notes.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), aff), str(folder / "flat2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1), np.float32), aff), str(folder / "slice.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), aff), str(folder / "series4d.nii.gz"))
    nan = np.ones((8, 8, 8), np.float32)
    nan[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(nan, aff), str(folder / "nan.nii.gz"))
    inf = np.ones((8, 8, 8), np.float32)
    inf[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(inf, aff), str(folder / "inf.nii"))
    return {"empty.nii.gz": "empty", "notes.nii.gz": "not a readable NIfTI", "photo.png": "not a readable NIfTI",
            "flat2d.nii.gz": "2-D image", "slice.nii.gz": "2-D image", "series4d.nii.gz": "4-D volume",
            "nan.nii.gz": "NaN or Inf", "inf.nii": "NaN or Inf"}


def test_check_nifti_rejects_each_bad_input(tmp_path):
    expected = _write_bad_inputs(tmp_path)
    for name, message in expected.items():
        with pytest.raises(NiftiInputError) as err:
            check_nifti(tmp_path / name)
        assert name in str(err.value) and message in str(err.value), str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        check_nifti(tmp_path / "missing.nii.gz")


def test_constant_volume_is_segmented_with_a_warning(heldout, tmp_path):
    image_path, label_path = heldout
    seg = _centre_segmenter(image_path, label_path)
    img = nib.load(str(image_path))
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(flat))
    (res,) = segment_files(seg, flat, tmp_path / "out.nii.gz", progress=False)
    assert res.ok and res.notes and "constant volume" in res.notes[0]
    (res,) = segment_files(seg, image_path, tmp_path / "out2.nii.gz", progress=False)
    assert res.ok and not res.notes


def test_infer_tool_folder_keeps_going_and_fails_at_the_end(trained, tmp_path, capsys):
    case_dir, work, _ = trained
    folder = tmp_path / "in"
    expected = _write_bad_inputs(folder)
    good = case_dir / "imagesTs" / "mni152_anterior.nii.gz"
    (folder / "good.nii.gz").write_bytes(good.read_bytes())
    tool = _load_tool("medical_infer")
    code = tool.main([str(work / "latest.pth"), str(folder), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    for name in expected:
        assert name in err
    out = nib.load(str(tmp_path / "out" / "good_seg.nii.gz"))
    src = nib.load(str(good))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert len(list((tmp_path / "out").iterdir())) == 1

    lab = case_dir / "labelsTs" / "mni152_anterior.nii.gz"
    code = tool.main([str(work / "latest.pth"), str(good), "-o", str(tmp_path / "one.nii.gz"), "--label", str(lab),
                      "--roi-size", "16", "16", "16", "--overlap", "0.5", "--sw-batch-size", "2", "--no-progress"])
    assert code == 0
    assert "gray_matter=" in capsys.readouterr().out
    assert nib.load(str(tmp_path / "one.nii.gz")).shape == src.shape


# ----------------------------------------------------------------------------------------------- configs and tools
@pytest.mark.parametrize("name", ["vil_unetr", "unetr", "swinunetr"])
def test_medical_configs_build(name):
    from mmengine.config import Config

    from vilseg.medical.registry import build_network

    cfg = Config.fromfile(str(REPO / "configs" / "medical" / f"{name}_mni152.py"))
    net = build_network(cfg.model)
    assert sum(p.numel() for p in net.parameters()) > 0
    assert cfg.data.roi_size == cfg.val.roi_size
    reference = Config.fromfile(str(REPO / "configs" / "medical" / "vil_unetr_mni152.py"))
    for key in ("train", "optimizer", "loss", "param_scheduler"):  # same budget and optimisation for every model
        assert cfg[key] == reference[key], key
    divisor = {"vil_unetr": cfg.model.get("patch_size", 8), "unetr": 16, "swinunetr": 32}[name]
    assert all(r % divisor == 0 for r in cfg.data.roi_size)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vil_unetr", "unetr", "swinunetr"])
def test_medical_configs_forward_backward_at_roi(name):
    from mmengine.config import Config

    from vilseg.medical.registry import build_network

    cfg = Config.fromfile(str(REPO / "configs" / "medical" / f"{name}_mni152.py"))
    net = build_network(cfg.model)
    out = net(torch.randn(1, 1, *cfg.data.roi_size))
    assert out.shape == (1, cfg.num_classes, *cfg.data.roi_size)
    out.mean().backward()


def test_train_tool_cli(tiny_case, tmp_path):
    case_dir, _ = tiny_case
    cfg = _tiny_cfg(case_dir, 1)
    cfg["custom_imports"] = dict(imports=["vilseg.models.vil_unetr"], allow_failed_imports=False)
    cfg_path = tmp_path / "tiny_cfg.py"
    cfg_path.write_text("\n".join(f"{k} = {v!r}" for k, v in cfg.items()) + "\n")
    tool = _load_tool("train_medical")
    work = tmp_path / "work"
    # (--malloc system: the tool runs inside this test process, whose malloc it would otherwise set)
    assert tool.main([str(cfg_path), "--work-dir", str(work), "--no-progress", "--malloc", "system",
                      "--cfg-options", "train.val_interval=1", "model.scan_order=cycle"]) == 0
    summary = json.loads((work / "summary.json").read_text())
    assert summary["iters"] == 1 and len(summary["history"]) == 1
    from vilseg.medical.checkpoint import load_checkpoint

    assert load_checkpoint(work / "latest.pth")["meta"]["config"]["model"]["scan_order"] == "cycle"


def test_fine_vil_unetr_runs_the_chunkwise_kernel_in_training_and_inference(monkeypatch):
    """configs/medical/vil_unetr_fine_mni152.py: 4^3 patches on its windows give a sequence long enough for 'auto'
    to pick the chunkwise kernel, and one training step and one sliding window really go through it (whole
    sequences, or tiles of slices that together cover whole sequences)."""
    import importlib

    from mmengine.config import Config

    from vilseg.medical.registry import build_network
    from vilseg.ops.mlstm import resolve_kernel

    mlstm_ops = importlib.import_module("vilseg.ops.mlstm")  # the module (vilseg.ops.mlstm is also a function)
    cfg = Config.fromfile(str(REPO / "configs" / "medical" / "vil_unetr_fine_mni152.py"))
    roi, patch = cfg.val.roi_size, cfg.model.patch_size
    tokens = int(np.prod([s // patch for s in roi]))
    assert patch == 4 and tokens == 1728
    assert resolve_kernel(cfg.model.kernel, tokens, cfg.model.get("chunk_size", 64)) == "chunkwise"

    model_cfg = cfg.model.to_dict()
    model_cfg.update(embed_dims=32, num_blocks=2, feature_size=8)  # small but the shipped patch and window
    net = build_network(model_cfg)
    calls = []
    real = mlstm_ops.chunkwise_mlstm
    counting = lambda *a, **k: calls.append(a[0].shape[-2]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(mlstm_ops, "chunkwise_mlstm", counting)
    monkeypatch.setattr(importlib.import_module("vilseg.models.layers.vil_block"), "chunkwise_mlstm", counting)

    def covers_whole_sequences(lengths):
        return bool(lengths) and max(lengths) <= tokens and sum(lengths) % tokens == 0
    x = torch.randn(1, 1, *roi)
    net.train()
    net(x).mean().backward()
    assert covers_whole_sequences(calls)
    calls.clear()
    net.eval()
    with torch.no_grad():
        from monai.inferers import sliding_window_inference

        sliding_window_inference(torch.randn(1, 1, 56, 56, 56), roi, 1, net, overlap=0.25)
    assert covers_whole_sequences(calls)
