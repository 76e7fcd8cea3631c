"""Training-free architecture scores at initialisation, after As-ViT (Chen et al., ICLR 2022, arXiv 2202.11921),
with parameter counts and FLOPs, so that backbones can be ranked before any GPU hour is spent.

Two scores, each computed on the backbone alone, in eval mode (BatchNorm uses its initial running statistics, so
samples do not interact; dropout / drop-path are off), right after ``init_weights()``:

**Expressivity: length distortion L^E** (:func:`length_distortion`). A closed 1-D curve in input space, the circle

    x(theta) = x0 + r (cos(theta) u1 + sin(theta) u2),   theta_i = 2 pi i / N,  i = 0 .. N-1,

with x0 ~ N(0, I) (an input of shape (C, H, W)), u1, u2 orthonormal (Gram-Schmidt on two N(0, I) draws) and
r = rms_radius * sqrt(D_in), so that every input element moves by ``rms_radius`` (RMS over the circle); all from
``torch.Generator().manual_seed(seed)``. The N points go through the network; ``output='last'`` takes the last
feature map it returns (``'all'``: every returned map, flattened and concatenated). The score is the length of the
closed polygon through the outputs over that through the inputs,

    L^E = [sum_i |f(x_{i+1}) - f(x_i)|] / [sum_i |x_{i+1} - x_i|] * sqrt(D_in / D_out)   (indices mod N),

where the last factor (``normalize=True``) makes it a per-element ratio (RMS change of an output element over that
of an input element), so backbones with different output sizes compare; ``normalize=False`` gives the plain length
ratio (for x -> A x it tends to the perimeter of the ellipse A(circle) over 2 pi r as N grows). Defaults: N = 64,
rms_radius = 1, seed 0, output 'last'.

**Trainability: condition number of the empirical NTK** (:func:`ntk_condition_number`). On a batch of B inputs
(default B = 8, N(0, I) from seed + 1), each sample's output is reduced to one scalar: the output itself when the
network returns one value per sample, otherwise a fixed random read-out s_b = <g, f(x_b)> / sqrt(D_out) with
g ~ N(0, I) (seed + 2) over the selected output (a plain sum would be degenerate after a LayerNorm: the normalised
channels sum to zero). J is the B x P Jacobian of the scalars with respect to all trainable parameters (one
backward pass per sample); the NTK is Theta = J J^T (B x B, accumulated in float64) and the score is
kappa = lambda_max(Theta) / lambda_min(Theta) (inf when Theta is singular). As-ViT prefers *low* kappa and *high*
L^E. For f(x) = w . x, Theta = X X^T, the Gram matrix of the inputs.

**Cost**: FLOPs by mmengine's ``FlopAnalyzer`` (fvcore's counter: one multiply-add = one FLOP) on one input of
``flops_size``, with a handle for ``aten::lstm`` (4 gates x hidden x (input + hidden) multiply-adds per token,
direction and layer), which the analyzer does not count by itself; parameters = trainable parameter count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os.path as osp
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from vilseg.engine.registry import build_model, quiet_mmengine

from .names import MODEL_NAMES, is_config_path

__all__ = ["Candidate", "presets", "ComplexityReport", "resolve_candidate", "build_backbone", "select_output",
           "circle_inputs", "length_distortion", "ntk_condition_number", "count_flops", "count_params", "analyze",
           "format_table", "DEFAULT_CANDIDATES"]


# ---------------------------------------------------------------------------------------------------- candidates
@dataclasses.dataclass(frozen=True)
class Candidate:
    """A backbone to score: a name, one line of description and an mmseg backbone config dict."""

    name: str
    description: str
    backbone: dict


DEFAULT_CANDIDATES: List[str] = ["vil-t", "deit-t", "swin-t", "sequencer2d-s", "lambdaresnet50"]


def presets() -> Dict[str, str]:
    """The 2D model names (:mod:`vilseg.profiling.names`) and their descriptions."""
    return {name: f"{entry.description} ({entry.config})" for name, entry in MODEL_NAMES.items() if entry.dims == 2}


def resolve_candidate(spec: Union[str, Candidate, dict]) -> Candidate:
    """A :class:`Candidate` from a model name (the profiler's vocabulary: the ``model.backbone`` of a shipped
    config, see :mod:`vilseg.profiling.names`), a path to an mmseg/vilseg config file (its ``model.backbone``,
    SyncBN made BN), a backbone config dict, or a Candidate.

    Raises:
        ValueError: an unknown name (the message lists the known ones), a 3D network, a ``+upernet`` name or a
            config without ``model.backbone``.
        FileNotFoundError: a config path that does not exist.
    """
    from .models import get_spec, model_config

    if isinstance(spec, Candidate):
        return spec
    if isinstance(spec, dict):
        if "type" not in spec:
            raise ValueError(f"a backbone config dict needs a 'type', got {spec}")
        return Candidate(str(spec["type"]), "backbone config", dict(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a candidate is a model name, a config path or a backbone dict, got {spec!r}")
    model = get_spec(spec)
    if model.kind != "backbone":
        raise ValueError(f"{spec!r} is a {'3D network' if model.dims == 3 else 'segmentor'}: the scores are "
                         "computed on 2D backbones (a name without '+upernet')")
    name = osp.splitext(osp.basename(spec))[0] if is_config_path(spec) else model.name
    return Candidate(name, model.description, model_config(spec))


def build_backbone(candidate: Union[str, Candidate, dict], seed: int = 0) -> nn.Module:
    """Build a candidate's backbone from mmseg's registry (vilseg backbones included), initialise it with its own
    ``init_weights()`` after ``torch.manual_seed(seed)``, and return it in eval mode on the CPU."""
    cand = resolve_candidate(candidate)
    torch.manual_seed(seed)
    model = build_model(dict(cand.backbone), init_weights=True)
    model.eval()  # (mmseg's ResNet.train() returns None, so no chaining)
    return model


# ---------------------------------------------------------------------------------------------------- helpers
def select_output(out: Any, output: str = "last") -> Tensor:
    """(B, D_out): the network output used by the scores, flattened per sample.

    ``out`` is a tensor or a tuple / list of tensors (multi-scale backbones); ``output='last'`` takes the last one,
    ``'all'`` concatenates all of them.
    """
    if output not in ("last", "all"):
        raise ValueError(f"output must be 'last' or 'all', got {output!r}")
    if isinstance(out, Tensor):
        outs = [out]
    elif isinstance(out, (list, tuple)) and out and all(isinstance(o, Tensor) for o in out):
        outs = list(out)
    else:
        raise ValueError(f"the network must return a tensor or a tuple of tensors, got {type(out).__name__}")
    if output == "last":
        outs = outs[-1:]
    return torch.cat([o.reshape(o.shape[0], -1) for o in outs], dim=1)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def circle_inputs(input_shape: Sequence[int], num_points: int = 64, rms_radius: float = 1.0,
                  seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """The circle of inputs of :func:`length_distortion`.

    Returns:
        points (N, *input_shape), x0 (D_in,), u1 (D_in,), u2 (D_in,) (orthonormal) and the radius r, with
        points[i] = x0 + r (cos(2 pi i / N) u1 + sin(2 pi i / N) u2) reshaped to ``input_shape``.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes without the batch, e.g. (3, 64, 64), got {shape}")
    if num_points < 3:
        raise ValueError(f"num_points must be >= 3 to make a closed curve, got {num_points}")
    if not rms_radius > 0:
        raise ValueError(f"rms_radius must be > 0, got {rms_radius}")
    d = int(np.prod(shape))
    if d < 2:
        raise ValueError(f"a circle needs an input space of dimension >= 2, got shape {shape}")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    u1 = a / a.norm()
    b = b - (b @ u1) * u1
    u2 = b / b.norm()
    r = float(rms_radius) * math.sqrt(d)
    theta = torch.arange(num_points, dtype=torch.float64) * (2 * math.pi / num_points)
    points = x0 + r * (torch.cos(theta)[:, None] * u1 + torch.sin(theta)[:, None] * u2)
    return points.reshape(num_points, *shape), x0, u1, u2, r


def _closed_length(y: Tensor) -> float:
    """Length of the closed polygon through the rows of y (N, D)."""
    return float((torch.roll(y, -1, dims=0) - y).norm(dim=1).sum())


@torch.no_grad()
def length_distortion(model: Union[nn.Module, Callable[[Tensor], Any]], input_shape: Sequence[int],
                      num_points: int = 64, rms_radius: float = 1.0, seed: int = 0, output: str = "last",
                      normalize: bool = True, batch_size: int = 16) -> float:
    """Expressivity score L^E (see the module docstring): the length of the image of a circle of inputs over the
    circle's length, per element when ``normalize``.

    Args:
        model: a module (put in eval mode) or any callable mapping (n, *input_shape) to a tensor / tuple.
        input_shape: one input without the batch, e.g. (3, 64, 64).
        num_points: N points on the circle.
        rms_radius: RMS displacement of an input element over the circle (the radius is rms_radius * sqrt(D_in)).
        seed: seed of x0, u1, u2.
        output: 'last' or 'all' returned maps.
        normalize: multiply by sqrt(D_in / D_out).
        batch_size: points per forward pass.
    """
    points, *_ = circle_inputs(input_shape, num_points, rms_radius, seed)
    if isinstance(model, nn.Module):
        model.eval()
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
    else:
        dtype = torch.float32
    outs = []
    for start in range(0, num_points, batch_size):
        x = points[start:start + batch_size].to(dtype)
        outs.append(select_output(model(x), output).double())
    y = torch.cat(outs)
    x = points.reshape(num_points, -1).to(dtype).double()
    ratio = _closed_length(y) / _closed_length(x)
    if normalize:
        ratio *= math.sqrt(x.shape[1] / y.shape[1])
    return ratio


def ntk_condition_number(model: nn.Module, inputs: Optional[Tensor] = None, input_shape: Optional[Sequence[int]] = None,
                         batch_size: int = 8, seed: int = 0, output: str = "last") -> Tuple[float, np.ndarray]:
    """Trainability score: the condition number of the empirical NTK Theta = J J^T on a batch.

    Args:
        model: the network (evaluated in eval mode).
        inputs: (B, *input_shape) batch; when None, ``batch_size`` N(0, I) samples of ``input_shape`` from seed + 1.
        input_shape, batch_size: see ``inputs``.
        seed: seeds the inputs (seed + 1) and the random read-out (seed + 2).
        output: 'last' or 'all' returned maps (then reduced to one scalar per sample, see the module docstring).

    Returns:
        (kappa, eigenvalues of Theta in ascending order); kappa = inf when the smallest eigenvalue is <= 0.
    """
    if inputs is None:
        if input_shape is None:
            raise ValueError("give either inputs (B, ...) or input_shape")
        if batch_size < 2:
            raise ValueError(f"the NTK condition number needs a batch of >= 2 samples, got {batch_size}")
        g = torch.Generator().manual_seed(seed + 1)
        inputs = torch.randn(batch_size, *input_shape, generator=g)
    if inputs.dim() < 2 or inputs.shape[0] < 2:
        raise ValueError(f"inputs must be a batch (B >= 2, ...), got shape {tuple(inputs.shape)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    model.eval()
    dtype = params[0].dtype
    out = select_output(model(inputs.to(dtype)), output)  # (B, D_out)
    n = out.shape[0]
    if out.shape[1] == 1:
        scalars = out[:, 0]
    else:
        g = torch.Generator().manual_seed(seed + 2)
        readout = torch.randn(out.shape[1], generator=g).to(out.dtype)
        scalars = out @ readout / math.sqrt(out.shape[1])
    rows = []
    for b in range(n):
        grads = torch.autograd.grad(scalars[b], params, retain_graph=b < n - 1, allow_unused=True)
        rows.append(torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                               for gr, p in zip(grads, params)]).detach())
    jac = torch.stack(rows)                      # (B, P)
    del rows
    ntk = _gram(jac)
    eig = np.linalg.eigvalsh(ntk.numpy())
    kappa = float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
    return kappa, eig


def _gram(jac: Tensor, chunk: int = 1_000_000) -> Tensor:
    """J J^T accumulated in float64, chunk by chunk of parameters (no float64 copy of all of J)."""
    gram = torch.zeros(jac.shape[0], jac.shape[0], dtype=torch.float64)
    for start in range(0, jac.shape[1], chunk):
        block = jac[:, start:start + chunk].double()
        gram += block @ block.T
    return gram


# ---------------------------------------------------------------------------------------------------- FLOPs
def _lstm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of ``aten::lstm`` (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first): per token, direction and layer 4 * hidden * (layer input + hidden)."""
    from mmengine.analysis.jit_handles import get_shape

    shape = get_shape(inputs[0])
    weights = list(inputs[2].node().inputs())
    w_ih = get_shape(weights[0])          # (4 * hidden, input)
    num_layers = int(inputs[4].toIValue())
    bidirectional = bool(inputs[7].toIValue())
    dirs = 2 if bidirectional else 1
    hidden = w_ih[0] // 4
    tokens = int(np.prod(shape[:-1]))      # batch x time (unbatched: time)
    total, layer_in = 0, shape[-1]
    for _ in range(num_layers):
        total += dirs * tokens * 4 * hidden * (layer_in + hidden)
        layer_in = hidden * dirs
    return total


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs (fvcore convention: multiply-adds) of one forward pass on one input of ``input_shape`` (C, H, W), by
    mmengine's ``FlopAnalyzer`` (jit trace) plus the LSTM handle above."""
    from mmengine.analysis import FlopAnalyzer

    model.eval()
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.zeros(1, *input_shape, dtype=dtype)
    with torch.no_grad(), quiet_mmengine(), _no_trace_warnings():
        analyzer = FlopAnalyzer(model, (x,))
        analyzer.set_op_handle("aten::lstm", _lstm_flop_jit)
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analyzer.total())


@contextlib.contextmanager
def _no_trace_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class ComplexityReport:
    """One row of the table: parameters, FLOPs and the two scores of a candidate (None where not computed)."""

    name: str
    description: str
    params: int
    flops: Optional[int]
    length_distortion: Optional[float]
    ntk_condition: Optional[float]
    seconds: float


def analyze(candidates: Sequence[Union[str, Candidate, dict]], input_size: Tuple[int, int] = (64, 64),
            flops_size: Optional[Tuple[int, int]] = (512, 512), num_points: int = 64, rms_radius: float = 1.0,
            ntk_batch: int = 8, seed: int = 0, output: str = "last", in_channels: int = 3,
            progress: bool = True) -> List[ComplexityReport]:
    """Build each candidate (seeded init), count parameters and FLOPs (at ``flops_size``; None skips them), and
    compute L^E (``num_points`` points, ``rms_radius``) and the NTK condition number (``ntk_batch`` samples) at
    ``input_size``, all from ``seed``. Unknown names fail before anything is built (ValueError)."""
    cands = [resolve_candidate(c) for c in candidates]
    if not cands:
        raise ValueError("no candidate given")
    shape = (in_channels, int(input_size[0]), int(input_size[1]))
    reports: List[ComplexityReport] = []
    iterator: Any = cands
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cands, desc="scoring", unit="net")
    for cand in iterator:
        if progress:
            iterator.set_postfix_str(cand.name)
        start = time.perf_counter()
        model = build_backbone(cand, seed)
        params = count_params(model)
        flops = count_flops(model, (in_channels, *flops_size)) if flops_size else None
        le = length_distortion(model, shape, num_points, rms_radius, seed, output)
        kappa, _ = ntk_condition_number(model, input_shape=shape, batch_size=ntk_batch, seed=seed, output=output)
        reports.append(ComplexityReport(cand.name, cand.description, params, flops, le, kappa,
                                        time.perf_counter() - start))
        del model
    return reports


def format_table(reports: Sequence[ComplexityReport], flops_size: Optional[Tuple[int, int]] = None) -> str:
    """A Markdown table of the reports."""
    flops_head = f"GFLOPs @{flops_size[0]}x{flops_size[1]}" if flops_size else "GFLOPs"
    lines = [f"| model | params (M) | {flops_head} | L^E (expressivity, higher = better) | "
             "NTK cond. (trainability, lower = better) | time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        flops = f"{r.flops / 1e9:.2f}" if r.flops is not None else "-"
        le = f"{r.length_distortion:.4g}" if r.length_distortion is not None else "-"
        kappa = f"{r.ntk_condition:.4g}" if r.ntk_condition is not None else "-"
        lines.append(f"| {r.name} | {r.params / 1e6:.2f} | {flops} | {le} | {kappa} | {r.seconds:.1f} |")
    return "\n".join(lines)
