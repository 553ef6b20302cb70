"""Gradient statistics of a causal-LM loss over a stream of batches, for chosen tensors.

The primitive under per-weight sensitivity scores (nn-sensitivity), SNIP scores, the
empirical Fisher of EWC and the Hessian diagonal. Every function takes the model, the
tensors to differentiate (``params``: a list of parameters, a ``{name: parameter}``
mapping or ``model.named_parameters()``-style pairs) and an iterable of batch dicts
(``input_ids``, optional ``attention_mask``, optional ``labels`` with -100 = no loss),
and returns a :class:`GradStats` whose ``values`` have the shapes of the tensors.

Notation. A batch b has summed loss L_b = Σ_t NLL_t over its n_b loss tokens (``loss_fn``,
default :func:`nn_core.numerics.loss.summed_nll`); a *sample* x is one row (sequence) of a
batch, with summed loss L_x over n_x loss tokens and token-mean loss ℓ_x = L_x / n_x.
N = Σ_b n_b is the stream's token count. Rows or batches with no loss token are skipped
(they count nowhere).

* :func:`mean_gradient`: ḡ = ∂/∂W [(1/N) Σ_b L_b], the gradient of the stream's
  token-weighted mean loss (every token counts once however the tokens are batched).
* :func:`abs_grad_sum`: A = Σ_x |∂ℓ_x/∂W|, the sum over samples of the absolute
  per-sample gradient of each sample's token-mean loss (SNIP's ingredient). Not |Σ_x g_x|:
  signs do not cancel between samples.
* :func:`squared_grad_mean`: F = (1/U) Σ_u g_u ⊙ g_u with g_u = ∂ℓ_u/∂W, the empirical
  Fisher diagonal; units u are samples (``per_sample=True``, the default) or whole batches
  (ℓ_b = L_b / n_b). Per-batch Fisher depends on the batch size (averaging B samples'
  gradients before squaring shrinks it by up to B), per-sample Fisher does not.
* :func:`hutchinson_diagonal`: diag(H) of (1/N) Σ_b L_b by Hutchinson's estimator with
  Rademacher probes v (±1, E[v vᵀ] = I, so E[v ⊙ Hv] = diag H): for every batch and
  probe one Hessian-vector product over all chosen tensors jointly (double backward),
  diag ≈ (1/N) Σ_b mean_k v_bk ⊙ (H_b v_bk), H_b the Hessian of L_b, with a per-entry
  standard error se = sqrt(Σ_b Var_k(v ⊙ H_b v) / K) / N.

Per-sample gradients (``method``): ``"loop"`` runs forward+backward on each row alone;
``"vmap"`` uses ``torch.func`` (``vmap(grad(functional_call))``) over the rows of a
batch, in chunks of ``chunk_size`` rows. vmap needs the default loss and rows without
left padding (the model runs without an attention mask inside vmap, because HF mask
construction branches on data; under a causal mask right padding cannot change the real
tokens' logits); other batches, custom ``loss_fn``, tensors that are not parameters of
``model`` and models whose forward cannot run under vmap (GPT-2 in transformers 5: the
first failure is remembered per model) use the loop. ``"auto"`` (default) picks vmap, from the measurement in
``packages/nn-core/benchmarks/bench_per_sample_grads.py`` (CPU, 2 threads shared with other
jobs, torch 2.15, fp32, batches of 8 rows, ``squared_grad_mean``; ratio = vmap time / loop
time, < 1: vmap is faster; results agree to 4e-7): tiny-llama (hidden 64, 2 layers), all
block weights, T=32: ratio 0.31 and 0.30 (two runs); SmolLM2-135M shapes (hidden 576,
MLP 1536, 2 of its 30 blocks), the MLP weights, T=64: ratio 0.53 and 0.43. The loop pays
a full forward/backward per row at batch size 1, where small kernels waste the threads.
vmap holds ``chunk_size`` per-sample gradients at once; by default the chunk is as many
rows as fit ``VMAP_BUDGET_BYTES`` (1 GiB) of float gradients (at least 1, at most 8).

Memory: accumulators are float32 of the tensors' shapes (token counts in float64); a
per-sample gradient lives only while it is added in (``vmap``: one chunk of them). Nothing
per sample is kept over the stream. Models may be bf16/fp16: gradients are cast to
float32 before they are accumulated.

Distributed data parallel: pass ``all_reduce`` (sums a list of tensors in place across
processes, e.g. ``torch.distributed.all_reduce`` in a loop); sums and counts are reduced
before the division, so ranks seeing disjoint shards get the single-process result.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nn_core.errors import NNError

__all__ = [
    "GradStats",
    "abs_grad_sum",
    "hutchinson_diagonal",
    "mean_gradient",
    "per_sample_gradients",
    "squared_grad_mean",
]

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, int]]
AllReduce = Callable[[list[torch.Tensor]], None]
Params = Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
Batches = Iterable[Mapping[str, torch.Tensor]]

METHODS = ("auto", "loop", "vmap")
DEFAULT_METHOD = "vmap"  # what "auto" resolves to; see the module docstring for the numbers
VMAP_BUDGET_BYTES = 1 << 30


@dataclass
class GradStats:
    """One gradient statistic per chosen tensor.

    ``values[i]`` (float32, shape and device of tensor i) is the statistic; ``names[i]``
    the tensor's name (its key, its model parameter name, or ``"0"``, ``"1"``, ...).
    ``n_tokens`` counts loss tokens, ``n_units`` the samples or batches the statistic
    averages or sums over (``unit``: ``"sample"``, ``"batch"`` or ``"token"``).
    ``stderr`` (Hutchinson only) is the per-entry standard error of ``values``.
    """

    kind: str
    names: list[str]
    values: list[torch.Tensor]
    n_tokens: int
    n_units: int
    unit: str
    stderr: list[torch.Tensor] | None = None
    info: dict = field(default_factory=dict)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if isinstance(key, str):
            return self.values[self.names.index(key)]
        return self.values[key]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values, strict=True))


# --------------------------------------------------------------------------- plumbing
def _resolve(model: nn.Module, params: Params) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(params, Mapping):
        items = list(params.items())
    else:
        items = list(params)
    if not items:
        raise NNError("no tensors to differentiate: pass a non-empty list of parameters")
    if all(isinstance(x, tuple) and len(x) == 2 for x in items):
        names, tensors = [str(n) for n, _ in items], [t for _, t in items]
    else:
        by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        tensors = list(items)
        names = [by_id.get(id(t), str(i)) for i, t in enumerate(tensors)]
    for n, t in zip(names, tensors, strict=True):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise NNError(f"'{n}' is not a floating-point tensor: gradients need float weights "
                          "(dequantize or exclude it)")
        if not t.is_leaf:
            raise NNError(f"'{n}' is not a leaf tensor: pass the model's parameters themselves")
    return names, tensors


def _loss_fn(loss_fn: LossFn | None) -> LossFn:
    if loss_fn is not None:
        return loss_fn
    from nn_core.numerics.loss import summed_nll

    return summed_nll


@contextlib.contextmanager
def grad_mode(model: nn.Module, tensors: Sequence[torch.Tensor]):
    """Eval mode (no dropout) and autograd on, with ``requires_grad`` set on ``tensors``
    only for the duration (restored afterwards, also on error)."""
    was_training = model.training
    old = [t.requires_grad for t in tensors]
    model.eval()
    try:
        for t in tensors:
            t.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for t, r in zip(tensors, old, strict=True):
            t.requires_grad_(r)
        model.train(was_training)


def math_sdpa():
    """The reference attention kernel: fused SDPA kernels are differentiable once only,
    so double backward (Hessian-vector products) needs this."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _grads(loss: torch.Tensor, tensors: Sequence[torch.Tensor], **kw) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, list(tensors), allow_unused=True, **kw)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors, strict=True)]


def _zeros(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in tensors]


def _progress(items, desc: str, progress: bool | None):
    import sys

    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, desc=desc, total=total, disable=disable, leave=False)


def _reduce(sums: list[torch.Tensor], counts: Sequence[float], all_reduce: AllReduce | None,
            device: torch.device) -> list[float]:
    """All-reduce ``sums`` in place and return the reduced ``counts``."""
    if all_reduce is None:
        return [float(c) for c in counts]
    c = torch.tensor([float(x) for x in counts], dtype=torch.float64, device=device)
    all_reduce([*sums, c])
    return c.tolist()


def _no_tokens() -> NNError:
    return NNError("the data has no loss tokens (empty, fully padded or all prompt): pass "
                   "more or longer text")


def _rows(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            for i in range(n)]


# --------------------------------------------------------------------------- per-sample engine
def _check_method(method: str) -> str:
    if method not in METHODS:
        raise NNError(f"unknown per-sample method '{method}': use one of {', '.join(METHODS)}")
    return DEFAULT_METHOD if method == "auto" else method


def _vmap_targets(model: nn.Module, batch: Mapping[str, torch.Tensor]):
    """(ids, shifted targets, tokens per row) for the vmap path, or None when the batch
    has left padding (the vmapped forward runs without an attention mask)."""
    from nn_core.device import input_device
    from nn_core.numerics.loss import causal_labels

    dev = input_device(model)
    ids = batch["input_ids"].to(dev)
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = mask.to(dev)
        # right padding only: each row's mask is non-increasing (1...1 0...0)
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            return None
    labels = batch.get("labels")
    labels = causal_labels(ids if labels is None else labels.to(dev), mask)
    targets = labels[:, 1:]
    return ids, targets, (targets != -100).sum(-1)


def _vmap_chunks(model, names, tensors, batch, chunk_size):
    """Yield (per-sample grads [c, *shape] per tensor, token counts (c,)) over the batch,
    or None when this batch cannot be vmapped."""
    from torch.func import functional_call, grad, vmap

    prep = _vmap_targets(model, batch)
    if prep is None:
        return None
    ids, targets, counts = prep
    fixed = {n: t.detach() for n, t in zip(names, tensors, strict=True)}

    def loss(p, row_ids, row_targets):
        logits = functional_call(model, p, (), {"input_ids": row_ids[None], "use_cache": False},
                                 strict=False).logits
        return F.cross_entropy(logits[0, :-1].float(), row_targets, ignore_index=-100,
                               reduction="sum")

    per_row = vmap(grad(loss), in_dims=(None, 0, 0))

    def chunks():
        keep = (counts > 0).nonzero().reshape(-1)
        for s in range(0, keep.numel(), chunk_size):
            sel = keep[s:s + chunk_size]
            # torch.func.grad differentiates at its own level; no_grad stops the outer
            # autograd from recording a graph through the other (grad-requiring) weights
            with torch.no_grad(), warnings.catch_warnings():
                # SDPA has no vmap batching rule yet: torch warns it loops (still faster)
                warnings.filterwarnings("ignore", message="There is a performance drop")
                g = per_row(fixed, ids[sel], targets[sel])
            yield [g[n] for n in names], counts[sel]

    return chunks()


def _model_names(model: nn.Module, tensors: Sequence[torch.Tensor]) -> list[str] | None:
    """The model's parameter name of each tensor (by identity), or None if any is not one."""
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names = [by_id.get(id(t)) for t in tensors]
    return None if any(n is None for n in names) else names


def _chunk(tensors: Sequence[torch.Tensor], chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    per_row = sum(t.numel() * t.element_size() for t in tensors)
    return max(1, min(8, VMAP_BUDGET_BYTES // max(1, per_row)))


# Models whose forward failed under vmap (data-dependent control flow, .item(), ...):
# they use the loop from then on.
_NO_VMAP: weakref.WeakSet = weakref.WeakSet()


def _per_sample(model, tensors, batch, how, loss_fn, chunk_size):
    if how == "vmap" and loss_fn is None and model not in _NO_VMAP:
        names = _model_names(model, tensors)
        gen = None if names is None else _vmap_chunks(model, names, tensors, batch,
                                                      _chunk(tensors, chunk_size))
        if gen is not None:
            try:
                first = next(gen, None)
            except RuntimeError as exc:
                if "vmap" not in str(exc):
                    raise
                _NO_VMAP.add(model)  # e.g. GPT-2's forward branches on data
            else:
                if first is not None:
                    yield first
                    yield from gen
                return
    fn = _loss_fn(loss_fn)
    for row in _rows(batch):
        loss, n = fn(model, row)
        if n == 0:
            continue
        gs = _grads(loss, tensors)
        yield [g.unsqueeze(0) for g in gs], torch.tensor([n], device=gs[0].device)


def per_sample_gradients(model: nn.Module, params: Params, batch: Mapping[str, torch.Tensor], *,
                         method: str = "auto", loss_fn: LossFn | None = None,
                         chunk_size: int | None = None):
    """Yield ``(grads, n_tokens)`` for the rows of ``batch`` with at least one loss token:
    ``grads[i]`` is ``[c, *shape_i]``, the gradients of the c rows' SUMMED losses L_x
    (divide by ``n_tokens`` (c,) for the token-mean ℓ_x) in the model's dtype. The loop
    yields one row at a time (c = 1), vmap up to ``chunk_size`` rows. Runs in
    :func:`grad_mode` (eval mode, grad on the chosen tensors) while it is consumed."""
    _, tensors = _resolve(model, params)
    how = _check_method(method)
    with grad_mode(model, tensors):
        yield from _per_sample(model, tensors, batch, how, loss_fn, chunk_size)


def _unit_stat(model, params, batches, *, kind: str, per_sample: bool, method: str,
               loss_fn, all_reduce, progress, chunk_size, combine) -> GradStats:
    """Shared loop of the per-unit statistics: ``combine(acc, g_mean_units)`` adds
    ``f(g_u)`` summed over the leading unit dimension into ``acc`` (float32)."""
    names, tensors = _resolve(model, params)
    fn = _loss_fn(loss_fn)
    how = _check_method(method)
    acc = _zeros(tensors)
    n_units = n_tok = 0
    with grad_mode(model, tensors):
        for batch in _progress(batches, kind, progress):
            if per_sample:
                for gs, counts in _per_sample(model, tensors, batch, how, loss_fn, chunk_size):
                    for a, g in zip(acc, gs, strict=True):
                        scale = counts.to(device=g.device, dtype=torch.float32)
                        g = g.float() / scale.reshape(-1, *([1] * (g.dim() - 1)))
                        combine(a, g)
                    n_units += counts.numel()
                    n_tok += int(counts.sum())
            else:
                loss, n = fn(model, batch)
                if n == 0:
                    continue
                for a, g in zip(acc, _grads(loss, tensors), strict=True):
                    combine(a, (g.float() / n).unsqueeze(0))
                n_units += 1
                n_tok += n
    n_units, n_tok = _reduce(acc, [n_units, n_tok], all_reduce, tensors[0].device)
    if n_tok == 0:
        raise _no_tokens()
    return GradStats(kind, names, acc, int(n_tok), int(n_units),
                     "sample" if per_sample else "batch",
                     info={"per_sample": per_sample,
                           "method": how if per_sample else None})


# --------------------------------------------------------------------------- statistics
def mean_gradient(model: nn.Module, params: Params, batches: Batches, *,
                  loss_fn: LossFn | None = None, all_reduce: AllReduce | None = None,
                  progress: bool | None = None) -> GradStats:
    """ḡ = ∂/∂W [(1/N) Σ_b L_b]: the gradient of the token-weighted mean loss of the whole
    stream (one backward per batch; batching does not change it). ``n_units`` counts
    batches."""
    names, tensors = _resolve(model, params)
    fn = _loss_fn(loss_fn)
    acc = _zeros(tensors)
    n_tok = n_batches = 0
    with grad_mode(model, tensors):
        for batch in _progress(batches, "mean_gradient", progress):
            loss, n = fn(model, batch)
            if n == 0:
                continue
            for a, g in zip(acc, _grads(loss, tensors), strict=True):
                a.add_(g.float())
            n_tok += n
            n_batches += 1
    n_tok, n_batches = _reduce(acc, [n_tok, n_batches], all_reduce, tensors[0].device)
    if n_tok == 0:
        raise _no_tokens()
    for a in acc:
        a.div_(n_tok)
    return GradStats("mean_gradient", names, acc, int(n_tok), int(n_batches), "batch")


def abs_grad_sum(model: nn.Module, params: Params, batches: Batches, *,
                 method: str = "auto", loss_fn: LossFn | None = None,
                 all_reduce: AllReduce | None = None, chunk_size: int | None = None,
                 progress: bool | None = None) -> GradStats:
    """A = Σ_x |∂ℓ_x/∂W|, ℓ_x = L_x / n_x the token-mean loss of sample (row) x: the sum of
    absolute per-sample gradients (SNIP: score = |W| ⊙ A). A sum, so it grows with the
    number of samples (``n_units``); divide by it for the mean."""
    return _unit_stat(model, params, batches, kind="abs_grad_sum", per_sample=True,
                      method=method, loss_fn=loss_fn, all_reduce=all_reduce, progress=progress,
                      chunk_size=chunk_size, combine=lambda a, g: a.add_(g.abs().sum(0)))


def squared_grad_mean(model: nn.Module, params: Params, batches: Batches, *,
                      per_sample: bool = True, method: str = "auto",
                      loss_fn: LossFn | None = None, all_reduce: AllReduce | None = None,
                      chunk_size: int | None = None, progress: bool | None = None) -> GradStats:
    """Empirical Fisher diagonal F = (1/U) Σ_u g_u ⊙ g_u, g_u = ∂ℓ_u/∂W the gradient of unit
    u's token-mean loss; units are samples (rows; default) or batches
    (``per_sample=False``, which makes F depend on the batch size). The mean of squares,
    never the square of a summed gradient."""

    def add_squares(a, g):
        for row in g:
            a.addcmul_(row, row)

    out = _unit_stat(model, params, batches, kind="squared_grad_mean", per_sample=per_sample,
                     method=method, loss_fn=loss_fn, all_reduce=all_reduce, progress=progress,
                     chunk_size=chunk_size, combine=add_squares)
    for a in out.values:
        a.div_(out.n_units)
    return out


def hutchinson_diagonal(model: nn.Module, params: Params, batches: Batches, *, probes: int = 8,
                        seed: int = 0, stderr: bool = True, loss_fn: LossFn | None = None,
                        all_reduce: AllReduce | None = None,
                        progress: bool | None = None) -> GradStats:
    """Signed Hessian diagonal of the stream's token-mean loss (1/N) Σ_b L_b by Hutchinson:
    diag ≈ (1/N) Σ_b (1/K) Σ_k v_bk ⊙ (H_b v_bk), K = ``probes`` fresh Rademacher vectors
    per batch spanning all chosen tensors jointly (one double-backward Hessian-vector
    product per probe, so cross-tensor Hessian blocks enter Hv exactly as they should and
    cancel in expectation). ``stderr`` (K >= 2): se = sqrt(Σ_b s²_b / K) / N with s²_b the
    unbiased variance over the K probes of batch b (Welford, float32). Probes come from a
    torch.Generator per device seeded with ``seed`` (offset it per process under data
    parallel)."""
    if probes < 1:
        raise NNError(f"Hutchinson needs at least 1 probe, got {probes}: pass probes=8")
    names, tensors = _resolve(model, params)
    fn = _loss_fn(loss_fn)
    est = _zeros(tensors)
    var = _zeros(tensors) if stderr and probes > 1 else None
    gens: dict[torch.device, torch.Generator] = {}

    def rademacher(t: torch.Tensor) -> torch.Tensor:
        gen = gens.get(t.device)
        if gen is None:
            gen = gens[t.device] = torch.Generator(device=t.device)
            gen.manual_seed(int(seed))
        z = torch.randint(0, 2, t.shape, generator=gen, device=t.device, dtype=torch.int8)
        return z.to(t.dtype).mul_(2).sub_(1)

    n_tok = n_batches = 0
    with grad_mode(model, tensors), math_sdpa():
        for batch in _progress(batches, "hutchinson", progress):
            loss, n = fn(model, batch)
            if n == 0:
                continue
            grads = _grads(loss, tensors, create_graph=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            mean = _zeros(tensors) if var is not None else None
            m2 = _zeros(tensors) if var is not None else None
            for k in range(probes):
                zs = [rademacher(tensors[i]) for i in live]
                hz = torch.autograd.grad([grads[i] for i in live], [tensors[i] for i in live],
                                         grad_outputs=zs, retain_graph=k < probes - 1,
                                         allow_unused=True)
                for i, z, h in zip(live, zs, hz, strict=True):
                    if h is None:
                        continue
                    s = (z * h).float()
                    est[i].add_(s, alpha=1.0 / probes)
                    if var is not None:
                        delta = s - mean[i]
                        mean[i].add_(delta, alpha=1.0 / (k + 1))
                        m2[i].addcmul_(delta, s - mean[i])
            del grads
            if var is not None:
                for v, q in zip(var, m2, strict=True):
                    v.add_(q, alpha=1.0 / ((probes - 1) * probes))
            n_tok += n
            n_batches += 1
    n_tok, n_batches = _reduce(est + (var or []), [n_tok, n_batches], all_reduce,
                               tensors[0].device)
    if n_tok == 0:
        raise _no_tokens()
    for e in est:
        e.div_(n_tok)
    se = None
    info: dict = {"probes": probes, "seed": seed}
    if var is not None:
        se = [v.clamp_min_(0).sqrt_().div_(n_tok) for v in var]
        tot_se = sum(float(s.double().pow(2).sum()) for s in se)
        tot_d = sum(float(d.double().pow(2).sum()) for d in est)
        info["stderr_rms"] = math.sqrt(tot_se / max(1, sum(t.numel() for t in tensors)))
        info["relative_stderr"] = math.sqrt(tot_se / tot_d) if tot_d > 0 else float("inf")
    return GradStats("hutchinson_diagonal", names, est, int(n_tok), int(n_batches), "batch",
                     stderr=se, info=info)
