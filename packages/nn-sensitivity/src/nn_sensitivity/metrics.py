"""Per-weight sensitivity metrics: a registry of plain functions, one per metric.

Notation: W is a scored weight tensor, N the total number of loss tokens in the
calibration set (padding and prompt tokens excluded), and the calibration loss is the
token-weighted mean

    L(W) = (1/N) * sum over calibration batches b of L_b,   L_b = sum of the token NLLs in b

so every token counts once, however the tokens are split into batches. Every metric
returns, per tensor, a float32 score of W's shape (on W's device), larger = more
sensitive. Under torch.distributed, sums and counts are all-reduced across ranks, so
data-parallel ranks that each see a shard of the batches get the single-process scores.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.model.adapters import linear_in_out
from nn_core.numerics import gradients as G
from nn_sensitivity import dist
from nn_sensitivity.params import ParamInfo, eligible_params, resolve_params

Batches = Iterable[Mapping[str, torch.Tensor]]


@dataclass
class Scores:
    """Scores of one metric: ``values[name]`` has the shape of that parameter.

    ``info`` holds counts (tokens, batches), timing and, for ``hutchinson_diag``, a
    summary of the standard error; ``stderr[name]`` is the per-weight standard error
    of the Hutchinson estimate and ``signed[name]`` the signed diagonal estimate whose
    absolute value is the score (both None for the other metrics).
    """

    metric: str
    params: list[ParamInfo]
    values: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    stderr: dict[str, torch.Tensor] | None = None
    signed: dict[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _scoring_mode(model: nn.Module, tensors: Sequence[torch.Tensor], *, grad: bool):
    """Eval mode (no dropout), grad enabled on the scored tensors only for the duration."""
    was_training = model.training
    old = [t.requires_grad for t in tensors]
    model.eval()
    try:
        if grad:
            for t in tensors:
                t.requires_grad_(True)
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for t, r in zip(tensors, old, strict=True):
            t.requires_grad_(r)
        model.train(was_training)


def _progress(items, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    if progress is None:
        import sys

        disable = not sys.stderr.isatty()
    else:
        disable = not progress
    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, desc=desc, total=total, disable=disable, leave=False)


def _no_tokens() -> NNError:
    return NNError("the calibration data has no loss tokens (empty, fully padded or all "
                   "prompt): pass more or longer calibration text")


# --------------------------------------------------------------------------- metrics
def magnitude(model, infos, tensors, batches, *, progress=None):
    """``magnitude``: s = |W|. Needs no data."""
    return {i.name: t.detach().abs().float() for i, t in zip(infos, tensors, strict=True)}, {}


def grad_x_weight(model, infos, tensors, batches, *, progress=None):
    """``grad_x_weight``: s = |W ⊙ ḡ| with ḡ = ∂L/∂W the gradient of the token-weighted
    mean calibration loss L = (1/N) Σ_b L_b (a first-order Taylor estimate of the loss
    change when the weight is removed). Signs of different samples' gradients cancel in
    ḡ; ``snip`` sums absolute per-sample gradients instead."""
    g = G.mean_gradient(model, tensors, batches, all_reduce=dist.all_reduce_, progress=progress)
    values = {i.name: (a * t.detach().float()).abs()
              for i, a, t in zip(infos, g.values, tensors, strict=True)}
    return values, {"n_tokens": g.n_tokens, "n_batches": g.n_units}


def grad_squared(model, infos, tensors, batches, *, per_sample: bool = True, progress=None):
    """``grad_squared``: the empirical Fisher diagonal F = (1/U) Σ_u g_u ⊙ g_u, where
    g_u = ∂ℓ_u/∂W is the gradient of the token-mean loss ℓ_u of one sequence (default;
    U counts sequences) or, with ``per_sample=False`` (``--per-batch``), of a whole
    batch (U counts batches; the score then shrinks as the batch grows, because the
    batch gradient averages the sequences' gradients before squaring). The mean of
    squared gradients, not the square of the summed gradient (which cancels signs)."""
    f = G.squared_grad_mean(model, tensors, batches, per_sample=per_sample,
                            all_reduce=dist.all_reduce_, progress=progress)
    values = {i.name: a for i, a in zip(infos, f.values, strict=True)}
    unit = "sequences" if per_sample else "batches"
    return values, {"n_tokens": f.n_tokens, f"n_{unit}": f.n_units, "per_sample": per_sample}


def snip(model, infos, tensors, batches, *, progress=None):
    """``snip``: s = |W| ⊙ Σ_x |∂ℓ_x/∂W|, summed over calibration sequences x, ℓ_x the
    token-mean loss of sequence x over its loss tokens only (labels -100, prompt and
    padding carry none: give instruction data with prompt-masked labels to score on
    responses), as in Wei et al. (2024, "Assessing the brittleness of safety alignment
    via pruning and low-rank modifications"). Per-sample gradients: unlike
    ``grad_x_weight`` (|W ⊙ mean g|), a weight whose gradient changes sign between
    sequences still scores high."""
    a = G.abs_grad_sum(model, tensors, batches, all_reduce=dist.all_reduce_, progress=progress)
    values = {i.name: t.detach().abs().float() * s
              for i, s, t in zip(infos, a.values, tensors, strict=True)}
    return values, {"n_tokens": a.n_tokens, "n_sequences": a.n_units}


def hutchinson_diag(model, infos, tensors, batches, *, probes: int = 8, seed: int = 0,
                    stderr: bool = True, progress=None):
    """``hutchinson_diag``: the Hessian diagonal of L, diag(H) ≈ (1/N) Σ_b mean_k z_bk ⊙ (H_b z_bk)
    with Rademacher probes z (±1, E[z zᵀ] = I, so E[z ⊙ Hz] = diag(H)) and H_b the Hessian
    of the summed batch loss L_b. One Hessian-vector product per probe over all scored
    tensors at once (double backward through the retained gradient graph). The score is
    |diag(H)|; the per-weight standard error over probes is
    se = sqrt(Σ_b Var_k(z ⊙ H_b z) / probes) / N (needs probes >= 2)."""
    if probes < 1:
        raise NNError(f"hutchinson_diag needs at least 1 probe, got {probes}: pass --probes 8")
    h = G.hutchinson_diagonal(model, tensors, batches, probes=probes,
                              seed=seed + 7919 * dist.rank(), stderr=stderr,
                              all_reduce=dist.all_reduce_, progress=progress)
    diag = {i.name: d for i, d in zip(infos, h.values, strict=True)}
    values = {k: v.abs() for k, v in diag.items()}
    info = {"n_tokens": h.n_tokens, "n_batches": h.n_units, "probes": probes, "seed": seed,
            **{k: v for k, v in h.info.items() if k not in ("probes", "seed")}}
    se = None if h.stderr is None else \
        {i.name: v for i, v in zip(infos, h.stderr, strict=True)}
    return values, info, se, diag


def _input_stats(model, infos, batches, what: str, progress) -> tuple[dict, int]:
    """Per input feature of each scored tensor's module, over non-padding tokens:
    ``abs_sum`` = Σ_t |x_t| or ``sq_sum`` = Σ_t x_t², plus the token count. An embedding's
    input is a one-hot token vector, so its feature statistic is the token's count."""
    from nn_core.intervene.capture import stream_tokens
    from nn_core.intervene.hooks import ModuleTap
    from nn_sensitivity.params import _kind

    modules = dict(model.named_modules())
    wanted = {}
    for i in infos:
        if i.kind == "other":
            raise NNError(f"{i.name} belongs to a {type(modules[i.module]).__name__}, whose input "
                          "features are unknown: exclude it (--modules) or use a gradient metric")
        wanted[i.module] = modules[i.module]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {m: 0 for m in wanted}
    kinds = {name: _kind(mod) for name, mod in wanted.items()}

    def add(tap, rows: torch.Tensor, _batch) -> None:
        # rows: the module's input at the batch's real tokens (nn_core.intervene.capture)
        name = tap.module
        if kinds[name] == "embedding":  # input = token ids
            mod = wanted[name]
            c = torch.bincount(rows.reshape(-1), minlength=mod.num_embeddings).double()
            part, n = c.to(mod.weight.device), rows.numel()
        else:
            flat = rows.reshape(-1, rows.shape[-1]).double()
            if flat.shape[0] != rows.shape[0]:
                raise NNError(f"{name} sees inputs of shape {tuple(rows.shape[1:])} per token (routed "
                              "or reshaped inputs): exclude it with --modules or use a gradient metric")
            part = flat.abs().sum(0) if what == "abs_sum" else (flat * flat).sum(0)
            n = flat.shape[0]
        sums[name] = part if name not in sums else sums[name] + part
        counts[name] += n

    stream_tokens(model, [ModuleTap(name, "input") for name in wanted], batches, add,
                  check_finite=False, progress=progress, desc=what.replace("_sum", "") + " stats")
    for name, mod in wanted.items():
        if name not in sums:
            width = mod.num_embeddings if _kind(mod) == "embedding" else linear_in_out(mod)[0]
            sums[name] = torch.zeros(width, dtype=torch.float64, device=mod.weight.device)
    names = list(wanted)
    stacked = [sums[m] for m in names]
    dist.all_reduce_(stacked)
    total = {m: int(dist.all_reduce_count(counts[m])) for m in names}
    if all(v == 0 for v in total.values()):
        raise _no_tokens()
    return dict(zip(names, stacked, strict=True)), total


def _along_input(info: ParamInfo, w: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """|W| scaled by a per-input-feature vector laid along W's input dimension
    (dim 1 for Linear (out, in); dim 0 for GPT-2 Conv1D (in, out) and embeddings)."""
    shape = [1] * w.ndim
    shape[info.input_dim] = -1
    return w.detach().abs().float() * feat.to(device=w.device, dtype=torch.float32).reshape(shape)


def act_mag(model, infos, tensors, batches, *, progress=None):
    """``act_mag``: s_ij = |W_ij| · E_t[|x_t,j|], j the weight's input feature and the mean
    over the non-padding calibration tokens t that enter W's module."""
    sums, counts = _input_stats(model, infos, batches, "abs_sum", progress)
    values = {i.name: _along_input(i, t, sums[i.module] / max(1, counts[i.module]))
              for i, t in zip(infos, tensors, strict=True)}
    return values, {"n_tokens": max(counts.values())}


def wanda(model, infos, tensors, batches, *, progress=None):
    """``wanda``: s_ij = |W_ij| · ||X_j||_2 = |W_ij| · sqrt(Σ_t x_t,j²), the L2 norm of input
    feature j over the non-padding calibration tokens (Sun et al., 2023)."""
    sums, counts = _input_stats(model, infos, batches, "sq_sum", progress)
    values = {i.name: _along_input(i, t, sums[i.module].sqrt())
              for i, t in zip(infos, tensors, strict=True)}
    return values, {"n_tokens": max(counts.values())}


METRICS: dict[str, Callable] = {
    "grad_x_weight": grad_x_weight,
    "grad_squared": grad_squared,
    "hutchinson_diag": hutchinson_diag,
    "snip": snip,
    "magnitude": magnitude,
    "act_mag": act_mag,
    "wanda": wanda,
}
DATA_FREE = frozenset({"magnitude"})


def check_metric(name: str) -> Callable:
    if name not in METRICS:
        raise NNError(f"unknown metric '{name}': use one of {', '.join(METRICS)}")
    return METRICS[name]


def _model_meta(model: nn.Module) -> dict:
    """What a selection records about the model it was scored on."""
    from nn_core.model.adapters import get_adapter, model_signature

    sig = model_signature(model)
    return {"model_id": sig["model_id"], "model_type": sig["model_type"],
            "num_layers": sig["num_layers"], "layers_path": get_adapter(model).layers_path}


def score(
    model: nn.Module,
    batches: Batches | None = None,
    metric: str = "grad_x_weight",
    *,
    params: Sequence[ParamInfo] | None = None,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
    layers=None,
    modules=None,
    progress: bool | None = None,
    **options,
) -> Scores:
    """Score every eligible weight of ``model`` with ``metric`` over calibration ``batches``.

    ``batches``: dicts with ``input_ids`` and optional ``attention_mask``/``labels``
    (-100 = no loss). ``params`` (from :func:`eligible_params`) overrides the selection
    flags. ``options`` go to the metric: ``per_sample`` (grad_squared, default True), ``probes``,
    ``seed``, ``stderr`` (hutchinson_diag); an option the metric does not take is an error.

    >>> s = score(model, batches, "grad_x_weight", modules="mlp")
    """
    fn = check_metric(metric)
    accepted = set(inspect.signature(fn).parameters) - {"model", "infos", "tensors", "batches",
                                                        "progress"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise NNError(f"metric '{metric}' takes no option '{unknown[0]}': its options are "
                      f"{', '.join(sorted(accepted)) or 'none'}")
    infos = list(params) if params is not None else eligible_params(
        model, include_embeddings=include_embeddings, include_lm_head=include_lm_head,
        layers=layers, modules=modules)
    tensors = resolve_params(model, infos)
    if metric not in DATA_FREE:
        if batches is None:
            raise NNError(f"metric '{metric}' needs calibration batches: pass data")
        if not isinstance(batches, list):
            batches = list(batches)
        if not batches:
            raise _no_tokens()
    start = time.perf_counter()
    out = fn(model, infos, tensors, batches, progress=progress, **options)
    values, info = out[0], dict(out[1])
    se = out[2] if len(out) > 2 else None
    signed = out[3] if len(out) > 3 else None
    for name, v in values.items():
        if not torch.isfinite(v).all():
            raise NNError(f"non-finite {metric} scores in {name}: load the model in float32 "
                          "(--dtype float32) or check the calibration data")
    info["seconds"] = time.perf_counter() - start
    info["model"] = _model_meta(model)
    return Scores(metric, infos, values, info, se, signed)


def histograms(scores: Scores, bins: int = 60) -> dict:
    """Per-group (decoder block) histograms of log10(score) over shared bin edges, built
    tensor by tensor (no concatenated copy). Zero scores have no logarithm and are
    counted apart in ``zeros``."""
    lo, hi = math.inf, -math.inf
    for v in scores.values.values():
        pos = v[v > 0]
        if pos.numel():
            lo = min(lo, float(pos.min().log10()))
            hi = max(hi, float(pos.max().log10()))
    if not math.isfinite(lo):
        lo, hi = -1.0, 0.0
    if hi <= lo:
        hi = lo + 1.0
    edges = torch.linspace(lo, hi, bins + 1)
    counts: dict[str, torch.Tensor] = {}
    zeros: dict[str, int] = {}
    for info in scores.params:
        v = scores.values[info.name]
        pos = v[v > 0].float().log10().cpu()
        h = torch.histc(pos, bins=bins, min=lo, max=hi)
        counts[info.group] = counts.get(info.group, torch.zeros(bins)) + h
        zeros[info.group] = zeros.get(info.group, 0) + int((v == 0).sum())
    return {"edges": edges.tolist(), "counts": {g: c.long().tolist() for g, c in counts.items()},
            "zeros": zeros}
