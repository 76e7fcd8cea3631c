"""The training-free scores (vilseg.profiling.complexity) on networks where they are known in closed form, the LSTM
FLOP handle, candidate resolution and the CLI's error path."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import ellipe
from torch import nn

from vilseg.profiling.complexity import (analyze, circle_inputs, count_flops, format_table, length_distortion,
                                         ntk_condition_number, presets, resolve_candidate, select_output)

REPO = Path(__file__).resolve().parents[1]


def _ellipse_ratio(a: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> float:
    """Perimeter of the ellipse A(circle of radius r) over the circle's 2 pi r: the ellipse has semi-axes r s1, r s2
    (s = singular values of A [u1 u2]); perimeter = 4 r s1 E(1 - s2^2 / s1^2)."""
    s = torch.linalg.svdvals(a.double() @ torch.stack([u1, u2], dim=1))
    s1, s2 = float(s[0]), (float(s[1]) if len(s) > 1 else 0.0)   # 1-D output: a segment run twice, 4 r s1
    return 4 * s1 * ellipe(1 - (s2 / s1) ** 2) / (2 * math.pi)


def test_circle_inputs_lie_on_the_stated_circle():
    points, x0, u1, u2, r = circle_inputs((2, 3, 4), num_points=10, rms_radius=0.5, seed=3)
    assert points.shape == (10, 2, 3, 4)
    assert abs(float(u1 @ u2)) < 1e-12 and abs(float(u1.norm()) - 1) < 1e-12 and abs(float(u2.norm()) - 1) < 1e-12
    assert r == pytest.approx(0.5 * math.sqrt(24))
    offsets = points.reshape(10, -1) - x0
    assert torch.allclose(offsets.norm(dim=1), torch.full((10,), r, dtype=torch.float64))
    same, *_ = circle_inputs((2, 3, 4), num_points=10, rms_radius=0.5, seed=3)
    other, *_ = circle_inputs((2, 3, 4), num_points=10, rms_radius=0.5, seed=4)
    assert torch.equal(points, same) and not torch.equal(points, other)


@pytest.mark.parametrize("d_out", [1, 5, 12])
def test_length_distortion_of_a_linear_map_is_the_ellipse_perimeter_ratio(d_out):
    torch.manual_seed(0)
    shape = (3, 2, 2)                      # D_in = 12, flattened by the model
    lin = nn.Linear(12, d_out, bias=True)  # the bias only translates the curve
    model = nn.Sequential(nn.Flatten(), lin).double()
    n, seed = 4096, 7
    _, _, u1, u2, _ = circle_inputs(shape, n, 1.0, seed)
    expected = _ellipse_ratio(lin.weight.detach(), u1, u2)
    got = length_distortion(model, shape, num_points=n, seed=seed, normalize=False, batch_size=4096)
    assert got == pytest.approx(expected, rel=1e-5)
    got_norm = length_distortion(model, shape, num_points=n, seed=seed, normalize=True, batch_size=1000)
    assert got_norm == pytest.approx(expected * math.sqrt(12 / d_out), rel=1e-5)


def test_length_distortion_of_scaled_identity_and_constant():
    shape = (4, 4)
    ident = length_distortion(lambda x: 2.5 * x, shape, num_points=32)
    assert ident == pytest.approx(2.5, rel=1e-6)
    const = length_distortion(lambda x: torch.ones(x.shape[0], 3), shape, num_points=32)
    assert const == 0.0


def test_ntk_of_a_linear_model_is_the_gram_matrix():
    torch.manual_seed(0)
    x = torch.randn(6, 10, dtype=torch.float64)
    model = nn.Linear(10, 1, bias=False).double()       # f(x) = w . x  ->  J = X,  NTK = X X^T
    kappa, eig = ntk_condition_number(model, x)
    gram = (x @ x.T).numpy()
    ref = np.linalg.eigvalsh(gram)
    assert np.allclose(eig, ref, rtol=1e-10)
    assert kappa == pytest.approx(ref[-1] / ref[0], rel=1e-8)
    # with a bias the Jacobian row is [x, 1]: NTK = X X^T + 1 1^T
    model_b = nn.Linear(10, 1, bias=True).double()
    _, eig_b = ntk_condition_number(model_b, x)
    assert np.allclose(eig_b, np.linalg.eigvalsh(gram + 1.0), rtol=1e-10)


def test_ntk_random_readout_keeps_the_gram_condition_number():
    # f(x) = W x with a many-element output: the read-out s = <g, W x> / sqrt(M) gives NTK = |g|^2 / M * X X^T,
    # whose condition number is that of X X^T whatever g is
    torch.manual_seed(1)
    x = torch.randn(5, 8, dtype=torch.float64)
    model = nn.Linear(8, 16, bias=False).double()
    gram = (x @ x.T).numpy()
    ref = np.linalg.eigvalsh(gram)
    for seed in (0, 1):
        kappa, _ = ntk_condition_number(model, x, seed=seed)
        assert kappa == pytest.approx(ref[-1] / ref[0], rel=1e-8)


def test_ntk_singular_and_bad_batches():
    x = torch.randn(4, 3, dtype=torch.float64)
    x[3] = x[0]                                          # two equal samples: singular NTK
    kappa, eig = ntk_condition_number(nn.Linear(3, 1, bias=False).double(), x)
    assert kappa == float("inf") or kappa > 1e12
    with pytest.raises(ValueError, match="batch"):
        ntk_condition_number(nn.Linear(3, 1), torch.randn(1, 3))
    with pytest.raises(ValueError, match="input_shape"):
        ntk_condition_number(nn.Linear(3, 1))


def test_select_output():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    assert torch.equal(select_output((a, b), "last"), b.reshape(2, -1))
    assert select_output((a, b), "all").shape == (2, 3 * 16 + 5 * 4)
    with pytest.raises(ValueError, match="output"):
        select_output(a, "first")
    with pytest.raises(ValueError, match="tensor"):
        select_output({"x": a})


class _LSTMNet(nn.Module):
    def __init__(self, bidirectional: bool, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 5, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)

    def forward(self, x):  # x: (1, B, T, C) -> run the LSTM on (B, T, C)
        return self.lstm(x[0])[0]


@pytest.mark.parametrize("bidirectional,num_layers", [(False, 1), (True, 1), (True, 2)])
def test_lstm_flops_handle(bidirectional, num_layers):
    batch, steps, c, h = 3, 7, 6, 5
    dirs = 2 if bidirectional else 1
    expected = dirs * batch * steps * 4 * h * (c + h)
    if num_layers == 2:
        expected += dirs * batch * steps * 4 * h * (h * dirs + h)
    assert count_flops(_LSTMNet(bidirectional, num_layers), (batch, steps, c)) == expected


def test_resolve_candidate_errors_and_config_paths():
    with pytest.raises(ValueError, match="unknown model 'vil-xxl'.*Known models.*sequencer2d-s"):
        resolve_candidate("vil-xxl")
    with pytest.raises(FileNotFoundError, match="no_such_config.py"):
        resolve_candidate("configs/no_such_config.py")
    cand = resolve_candidate("configs/lambda/lambda_resnet50_upernet_ade20k.py")
    assert cand.name == "lambda_resnet50_upernet_ade20k"
    assert cand.backbone["type"] == "LambdaResNet" and cand.backbone["norm_cfg"]["type"] == "BN"  # SyncBN -> BN
    # a name is its shipped config's backbone (any spelling), with the name's overrides
    assert resolve_candidate("LambdaResNet").backbone == cand.backbone
    assert resolve_candidate("lambda-ResNet50").name == "lambdaresnet50"
    with pytest.raises(ValueError, match="segmentor"):
        resolve_candidate("lambdaresnet+upernet")
    assert "vil-t" in presets() and "unetr" not in presets()


def test_cli_bad_name_is_one_clear_error():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "analyze_complexity.py"), "--models", "vil-t",
                           "nonexistent-net"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'nonexistent-net'" in proc.stderr and "Traceback" not in proc.stderr


def test_analyze_tiny_backbones_end_to_end():
    tiny_seq = dict(type="Sequencer2D", arch=dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 32, 32]))
    tiny_vil = dict(type="ViL", arch=dict(embed_dims=16, num_blocks=2), img_size=32, patch_size=8, out_indices=(1,))
    reports = analyze([tiny_seq, tiny_vil], input_size=(32, 32), flops_size=(32, 32), num_points=8, ntk_batch=3,
                      progress=False)
    assert [r.name for r in reports] == ["Sequencer2D", "ViL"]
    for r in reports:
        assert r.params > 0 and r.flops > 0
        assert math.isfinite(r.length_distortion) and r.length_distortion > 0
        assert r.ntk_condition >= 1.0
    again = analyze([tiny_seq], input_size=(32, 32), flops_size=None, num_points=8, ntk_batch=3, progress=False)
    assert again[0].length_distortion == pytest.approx(reports[0].length_distortion, rel=1e-6)  # seeded
    assert again[0].flops is None
    table = format_table(reports, (32, 32))
    assert "Sequencer2D" in table and "ViL" in table and "GFLOPs @32x32" in table
