"""Checkpoints written by an mmengine Runner load back weights-only; unsafe ones are refused; saves are atomic."""
import os

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import vilseg.engine  # noqa: F401  (registers the hooks)
from vilseg.utils.checkpoint import UnsafeCheckpointError, atomic_write, safe_load


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode="tensor"):
        out = self.linear(torch.stack(inputs) if isinstance(inputs, list) else inputs)
        if mode == "loss":
            return dict(loss=((out.squeeze(-1) - torch.stack(labels)) ** 2).mean())
        return out


class ToyData(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        x = torch.tensor([float(i), 1.0])
        return dict(inputs=x, labels=x.sum())


def _runner(work_dir, max_iters, resume=False, hooks=True):
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type="DefaultSampler", shuffle=False), batch_size=4,
                              num_workers=0),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.001)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=1000),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[dict(type="SafeCheckpointHook"), dict(type="PlainMessageHubHook")] if hooks else [],
        resume=resume, default_scope="mmengine", experiment_name=f"exp{max_iters}{resume}{os.getpid()}")


def test_runner_checkpoint_resumes_weights_only(tmp_path):
    r = _runner(tmp_path, 4)
    r.train()
    weights = r.model.linear.weight.detach().clone()
    ckpt = tmp_path / "iter_4.pth"
    assert ckpt.is_file()
    # torch's own default (weights_only=True) with our allowlist loads it; the message hub is plain data
    data = safe_load(ckpt)
    assert data["meta"]["iter"] == 4
    assert isinstance(data["message_hub"]["log_scalars"]["train/loss"], dict)

    r2 = _runner(tmp_path, 6, resume=True)
    r2.train()
    assert r2.iter == 6
    assert (tmp_path / "iter_6.pth").is_file()
    # the loss history came back as a HistoryBuffer and kept counting
    buf = r2.message_hub.get_scalar("train/loss")
    assert len(buf.data[0]) == 6
    assert not torch.equal(r2.model.linear.weight, weights)  # training went on from the resumed weights


def test_mmengine_default_checkpoint_is_refused_with_a_clear_error(tmp_path):
    r = _runner(tmp_path, 2, hooks=False)  # plain mmengine: pickles HistoryBuffer with bound methods
    r.train()
    with pytest.raises(UnsafeCheckpointError, match=r"iter_2\.pth.*HistoryBuffer.*plain data"):
        safe_load(tmp_path / "iter_2.pth")


def test_disallowed_global_is_named(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "hook": os.system}, path)  # a reference to a callable that runs commands
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*'posix\.system'"):
        safe_load(path)


def test_mapped_loading_gives_the_same_tensors_and_the_same_refusals(tmp_path):
    """mmap=True (what the resume check uses): same tensors as reading the file; a legacy (non-zip) checkpoint is
    read as usual; an unsafe global is refused all the same."""
    sd = {"w": torch.randn(64, 32), "b": torch.arange(5)}
    torch.save(sd, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        loaded = safe_load(tmp_path / name, mmap=True)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd), name
    torch.save({"state_dict": {}, "hook": os.system}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        safe_load(tmp_path / "evil.pth", mmap=True)


def test_missing_empty_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        safe_load(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pth.*empty"):
        safe_load(tmp_path / "empty.pth")
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.pth"):
        safe_load(tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="cut.pth"):
        safe_load(tmp_path / "cut.pth", mmap=True)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "latest.pth"
    atomic_write(b"old complete checkpoint", target)

    def boom(fd):
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill signal handler during the flush

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(b"new checkpoint that never finished", target)
    assert target.read_bytes() == b"old complete checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temporary file left behind


def test_importing_vilseg_leaves_mmengine_checkpoint_io_alone():
    import subprocess
    import sys

    code = ("import vilseg.models, vilseg.engine, vilseg.apis\n"
            "from mmengine.runner.checkpoint import CheckpointLoader\n"
            "from mmengine.fileio import get_file_backend\n"
            "from vilseg.engine import checkpoint as ck\n"
            "before = (ck.installed(), type(get_file_backend('x.pth')).__name__)\n"
            "ck.install()\n"
            "print(before, (ck.installed(), type(get_file_backend('y.pth')).__name__))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "(False, 'LocalBackend') (True, 'AtomicLocalBackend')"


def test_mmengine_save_goes_through_the_atomic_backend(tmp_path):
    from mmengine.fileio import get_file_backend

    from vilseg.engine import checkpoint as ck

    ck.install()
    assert isinstance(get_file_backend(str(tmp_path / "x.pth")), ck.atomic_local_backend())


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(b"x", tmp_path / "ckpt.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pth").stat().st_mode & 0o777 == mode


def test_refusals_name_what_was_refused(tmp_path):
    import pickle

    import numpy as np

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError, match=r"raw.pth: it is a plain pickle \(pickle opcode \d+"):
        safe_load(raw)
    objects = tmp_path / "objects.pth"
    torch.save({"a": np.array([object()], dtype=object)}, objects)
    with pytest.raises(UnsafeCheckpointError, match="needs the global 'numpy.dtypes.ObjectDType'"):
        safe_load(objects)
    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"needs the global '(posix|os)\.system'"):
        safe_load(evil)
