"""Integrated gradients with respect to a site's activation at one token position.

For row ``b`` of a batch, a target position ``t_b`` (default: the row's last real token),
a scalar target ``F`` of the model output at ``t_b`` and a site at layer ``l`` (``mlp_out``,
``mlp_act`` or ``resid``), let ``a = a_l[b, t_b]`` (a vector of the site's width) be the
clean activation there. ``F(x)`` is the target computed with the site's activation at
``(b, t_b)`` *only* replaced by ``x``; every other position and every other layer is computed
naturally from the real input (positions after ``t_b`` cannot influence it: the model is
causal). With a zero baseline,

    IG_l[b] = (a - 0) ⊙ Σ_k w_k · ∂F/∂x |_{x = α_k a}

where the quadrature points ``α_k`` and weights ``w_k`` are arguments. They approximate
``a ⊙ ∫_0^1 ∂F(αa)/∂x dα``, so with enough steps the attributions are *complete*:
``Σ_j IG_l[b, j] ≈ F(a) − F(0)``. Captum's ``approximation_parameters(method)`` gives
``(step_sizes, alphas)`` for ``riemann_*`` and ``gausslegendre``: pass
``alphas=alphas(n)``, ``weights=step_sizes(n)`` (nn-core does not depend on captum).

Implementation: for one layer, the ``K`` interpolation steps of all rows are one batch of
``(row, step)`` pairs, run ``max_batch`` sequences per forward. A forward hook at the site
writes ``α_k · a`` into the target position of each pair's sequence, as a leaf tensor that
``torch.autograd.grad`` differentiates ``F`` with respect to; model parameters are frozen for
the duration, so no graph is built below layer ``l``. Sequences are cut after the last
target position of the chunk, and only the logits at the target positions are computed
where the model accepts ``logits_to_keep``.

``engine="kv_cache"`` computes the same quantity by running each row's prefix (the tokens
before ``t_b``) once with ``use_cache=True`` and then forwards of only the target token: one
*variant* per ``(row, layer, step)`` triple (all layers together, ``max_batch`` variants per
forward). A hook at every requested layer writes ``α_k · a_l`` (slices of one leaf tensor)
into the variants of that layer only; the variants of other layers pass through it
naturally, so each variant sees exactly one substitution, as in the per-layer computation.
Since only the target token is recomputed and attention is causal, this is exact, not an
approximation. The clean activations ``a`` and the clean logits come from one cached
forward of the target token (no full-sequence pass). Two layouts of the variants:

* ``"packed"``: the variants of one row are *extra tokens of that row's sequence* after its
  prefix cache, all at the target's position id, with a 4-D attention mask letting each
  attend to the prefix and to itself only. The prefix cache is shared, never copied per
  variant, and the linear layers see one ``[variants, hidden]`` matrix. Needs a model whose
  forward takes ``position_ids`` and a prepared 4-D additive mask (transformers' ``sdpa`` and
  ``eager`` attention) and no sliding window shorter than the sequence; the first forward
  also carries one unsubstituted variant whose logits must equal the clean logits (else
  the layout is not used).
* ``"rows"``: each variant is a batch row of one token over its own view of the prefix
  cache (any model with a transformers ``Cache``).

``layout="auto"`` (default) takes ``"packed"`` where it applies and ``"rows"`` otherwise.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nn_core.device import input_device
from nn_core.errors import NNError
from nn_core.intervene.hooks import hooked
from nn_core.model.adapters import get_adapter
from nn_core.model.sites import SiteRef, check_site

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ENGINES = ("full", "kv_cache")
LAYOUTS = ("auto", "packed", "rows")

__all__ = ["ENGINES", "LAYOUTS", "integrated_gradients", "packed_layout_applies", "target_positions"]


def target_positions(attention_mask: torch.Tensor, positions=None) -> torch.Tensor:
    """Per-row target positions (int64, shape ``[batch]``).

    ``positions=None``: each row's last real token (the last index where the mask is 1), so
    left and right padding both work. Given positions (an int for every row, or one per
    row) must lie in ``[0, seq_len)`` and point at a real token.
    """
    if attention_mask.dim() != 2:
        raise NNError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    batch, seq = mask.shape
    if not bool(mask.any(-1).all()):
        raise NNError("a row of the batch is all padding: drop empty sequences before attribution")
    if positions is None:
        last = seq - 1 - mask.flip(-1).long().argmax(-1)
        return last.to(torch.long)
    pos = torch.as_tensor(positions, dtype=torch.long, device=mask.device)
    if pos.dim() == 0:
        pos = pos.expand(batch)
    if pos.shape != (batch,):
        raise NNError(f"positions must be one int or one per row ({batch}), got shape {tuple(pos.shape)}")
    if bool(((pos < 0) | (pos >= seq)).any()):
        raise NNError(f"a target position is out of range: positions must lie in 0..{seq - 1}")
    if not bool(mask[torch.arange(batch, device=mask.device), pos].all()):
        raise NNError("a target position points at padding: pick a real token (attention_mask == 1)")
    return pos.clone()


def _quadrature(alphas, weights) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if a.numel() == 0 or a.shape != w.shape:
        raise NNError(f"alphas and weights must be non-empty and of equal length, got "
                      f"{a.numel()} and {w.numel()}: pass captum's alphas(n) and step_sizes(n)")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(w).all())):
        raise NNError("alphas and weights must be finite numbers")
    return a, w


def _takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (as in an unpadded run)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _default_target(target_ids: torch.Tensor) -> TargetFn:
    def prob(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1).gather(-1, target_ids[rows, None])[:, 0]
    return prob


class _Runner:
    """Forward passes of selected rows with logits only at the target positions."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor):
        self.model = model
        self.ids, self.mask, self.pos = ids, mask, pos
        self.takes_pos = _takes(model, "position_ids")
        self.takes_keep = _takes(model, "logits_to_keep")

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` at the target positions of ``rows`` (sequences cut after
        the chunk's last target)."""
        pos = self.pos[rows]
        end = int(pos.max()) + 1
        ids, mask = self.ids[rows, :end], self.mask[rows, :end]
        kw = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self.takes_pos:
            kw["position_ids"] = _position_ids(mask)
        if self.takes_keep:
            keep = torch.unique(pos)
            kw["logits_to_keep"] = keep
            logits = self.model(**kw).logits
            col = torch.searchsorted(keep, pos)
        else:
            logits = self.model(**kw).logits
            col = pos
        return logits[torch.arange(len(rows), device=logits.device), col]


def _freeze(model: nn.Module) -> list[nn.Parameter]:
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _setter(pos_in_chunk: torch.Tensor, value: torch.Tensor):
    """Site fn writing ``value[i]`` into row i at position ``pos_in_chunk[i]``."""
    n = pos_in_chunk.numel()

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        # some architectures (OPT) flatten [batch, seq] inside the MLP: view it back
        view = out.view(n, -1, x.shape[-1])
        view[torch.arange(n, device=x.device), pos_in_chunk.to(x.device)] = value.to(x.dtype)
        return out
    return fn


def _reader(pos_in_chunk: torch.Tensor, store: dict, key):
    n = pos_in_chunk.numel()

    def fn(x: torch.Tensor) -> None:
        view = x.reshape(n, -1, x.shape[-1])
        store[key] = view[torch.arange(n, device=x.device), pos_in_chunk.to(x.device)].detach()
        return None
    return fn


def integrated_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    alphas: Sequence[float] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    layers: Sequence[int] | None = None,
    site: str = "mlp_out",
    target_ids: Sequence[int] | torch.Tensor | None = None,
    target_fn: TargetFn | None = None,
    positions: int | Sequence[int] | torch.Tensor | None = None,
    max_batch: int | Callable[[str], int] = 64,
    engine: str = "full",
    layout: str = "auto",
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of a target w.r.t. ``site`` activations at one position per row.

    Returns ``[batch, len(layers), width]`` float32 on the CPU: ``IG_l[b] = a ⊙ Σ_k w_k
    ∂F/∂x(α_k a)`` with ``a`` the clean activation at ``(b, positions[b])`` (module
    docstring). ``layers`` defaults to all layers, in the order given. ``site`` is one of
    ``mlp_out`` (default), ``mlp_act``, ``resid``.

    Target: by default ``F = softmax(logits[b, t_b])[target_ids[b]]`` (``target_ids``: one
    token id per row, or ``"argmax"``: each row's argmax of its clean logits at the target
    position). Or ``target_fn(logits, rows) -> [n]``, called with the logits at the
    target positions (``[n, vocab]``) and the batch row index of each (``[n]``, int64),
    returning one scalar per row; it must be row-wise (row ``i`` of the result depends only
    on row ``i`` of ``logits``).

    ``positions``: default each row's last real token; otherwise an int or one per row,
    each a real token. ``max_batch`` caps the sequences per forward: ``(row, step)`` pairs of
    one layer for ``"full"``, ``(row, layer, step)`` triples of all layers for
    ``"kv_cache"`` (in the ``rows`` layout each holds a view of its row's prefix cache, which
    attention copies: memory ~ ``max_batch`` x the cache of one row; in the ``packed``
    layout the cache is shared). It may also be a function of the layout actually used
    (``"full"``, ``"packed"`` or ``"rows"``, the latter also for the clean passes)
    returning that cap, so a caller can size each to a memory budget. ``engine``: ``"full"`` (full-sequence forwards, one layer
    at a time) or ``"kv_cache"`` (prefix once with a KV cache, then only the target token,
    all layers and steps in one batch; same result to float precision). ``layout``: the
    ``kv_cache`` engine's arrangement of the variants (module docstring): ``"auto"``,
    ``"packed"`` (raises :class:`NNError` where it does not apply) or ``"rows"``.

    ``return_logits=True`` returns ``(attributions, logits)`` with the clean logits at the
    target positions, ``[batch, vocab]`` float32 on the CPU (from the pass that reads the
    clean activations, so no extra forward).
    """
    check_site(site)
    if engine not in ENGINES:
        raise NNError(f"unknown engine '{engine}': use one of {', '.join(ENGINES)}")
    if layout not in LAYOUTS:
        raise NNError(f"unknown layout '{layout}': use one of {', '.join(LAYOUTS)}")
    if callable(max_batch):
        cap = max_batch
    else:
        _check_cap(max_batch)

        def cap(name: str) -> int:
            return max_batch
    alpha, weight = _quadrature(alphas, weights)
    adapter = get_adapter(model)
    if layers is None:
        layers = list(range(adapter.num_layers))
    layers = [adapter.check_layer(int(la)) for la in layers]
    if not layers:
        raise NNError("layers is empty: pass at least one layer index")
    if input_ids.dim() != 2:
        raise NNError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    device = input_device(model)
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    if mask.shape != ids.shape:
        raise NNError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    pos = target_positions(mask, positions)
    batch = ids.shape[0]
    if target_fn is None and isinstance(target_ids, str):
        if target_ids != "argmax":
            raise NNError(f"target_ids '{target_ids}' is not a token list: pass ids or 'argmax'")

        def make_target(logits: torch.Tensor) -> TargetFn:
            return _default_target(logits.argmax(-1).to(device))
    elif target_fn is None:
        if target_ids is None:
            raise NNError("pass target_ids (one token id per row) or a target_fn(logits, rows)")
        tid = torch.as_tensor(target_ids, dtype=torch.long, device=device).reshape(-1)
        if tid.numel() == 1:
            tid = tid.expand(batch)
        if tid.shape != (batch,):
            raise NNError(f"target_ids must be one id per row ({batch}), got {tid.numel()}")
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
        if bool((tid < 0).any()) or (vocab is not None and bool((tid >= vocab).any())):
            raise NNError(f"a target id is out of range: token ids must lie in 0..{vocab - 1 if vocab else '?'}")
        fixed = _default_target(tid)

        def make_target(logits: torch.Tensor) -> TargetFn:
            return fixed
    else:
        def make_target(logits: torch.Tensor) -> TargetFn:
            return target_fn

    was_training = model.training
    model.eval()
    frozen = _freeze(model)
    try:
        if engine == "full":
            att, logits = _ig_full(model, ids, mask, pos, layers, site, alpha, weight, make_target,
                                   _check_cap(cap("full")))
        else:
            att, logits = _ig_kv(model, ids, mask, pos, layers, site, alpha, weight, make_target,
                                 cap, layout)
        return (att, logits.float().cpu()) if return_logits else att
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _check_cap(max_batch) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise NNError(f"max_batch must be a positive int, got {max_batch!r}")
    return max_batch


def _clean(runner: _Runner, layers, site: str, max_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean activations at the target positions, ``[batch, n_layers, width]`` (model dtype),
    and the clean logits there, ``[batch, vocab]``."""
    batch = runner.ids.shape[0]
    parts, logits = [], []
    with torch.no_grad():
        for start in range(0, batch, max_batch):
            rows = torch.arange(start, min(start + max_batch, batch), device=runner.ids.device)
            store: dict = {}
            fns = {SiteRef(la, site): _reader(runner.pos[rows], store, la) for la in set(layers)}
            with hooked(runner.model, fns):
                logits.append(runner.logits(rows))
            parts.append(torch.stack([store[la] for la in layers], dim=1))
    return torch.cat(parts), torch.cat(logits)


def _pairs(batch: int, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.arange(batch * steps, device=device)
    return flat // steps, flat % steps


def _accumulate(clean_l: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``a ⊙ Σ_k w_k ∂F/∂x`` in float64, returned as float32."""
    return (clean_l.to(torch.float64) * grads).to(torch.float32)


def _ig_full(model, ids, mask, pos, layers, site, alpha, weight, make_target, max_batch):
    runner = _Runner(model, ids, mask, pos)
    clean, clean_logits = _clean(runner, layers, site, max_batch)
    target_fn = make_target(clean_logits)
    batch, device = ids.shape[0], ids.device
    rows_all, steps_all = _pairs(batch, alpha.numel(), device)
    alpha_d, weight_d = alpha.to(device), weight.to(device)
    out = torch.empty(batch, len(layers), clean.shape[-1], dtype=torch.float32)
    for li, layer in enumerate(layers):
        gsum = torch.zeros(batch, clean.shape[-1], dtype=torch.float64, device=device)
        for start in range(0, rows_all.numel(), max_batch):
            rows = rows_all[start:start + max_batch]
            steps = steps_all[start:start + max_batch]
            z = (alpha_d[steps, None] * clean[rows, li].to(torch.float64)).to(clean.dtype)
            z.requires_grad_(True)
            with torch.enable_grad(), hooked(model, {SiteRef(layer, site): _setter(pos[rows], z)}):
                value = target_fn(runner.logits(rows), rows)
                (grad,) = torch.autograd.grad(value.sum(), z)
            gsum.index_add_(0, rows, weight_d[steps, None] * grad.to(torch.float64))
        out[:, li] = _accumulate(clean[:, li], gsum).cpu()
    return out, clean_logits


def _left_pack(ids, mask, pos):
    """Each row's real tokens up to its target, right-aligned (left padding): the target
    becomes the last column. Returns (ids, mask) of shape [batch, P]."""
    batch, seq = ids.shape
    col = torch.arange(seq, device=ids.device)
    keep = mask.bool() & (col[None, :] <= pos[:, None])
    lengths = keep.sum(-1)
    width = int(lengths.max())
    new_ids = torch.zeros(batch, width, dtype=ids.dtype, device=ids.device)
    new_mask = torch.zeros(batch, width, dtype=mask.dtype, device=ids.device)
    for b in range(batch):
        tokens = ids[b][keep[b]]
        new_ids[b, width - tokens.numel():] = tokens
        new_mask[b, width - tokens.numel():] = 1
    return new_ids, new_mask


def _select_cache(cache, rows: torch.Tensor):
    """A copy of ``cache`` holding batch rows ``rows`` (with repeats); the prefix cache's
    tensors are not modified (cache layers rebind, never write in place, on update)."""
    if getattr(cache, "layers", None) is None:
        raise NNError("engine='kv_cache' needs a transformers Cache with .layers: use engine='full'")
    new = _fresh(cache)
    new.batch_select_indices(rows)
    return new


def _fresh(cache):
    """A shallow copy of ``cache`` whose layer objects are copies: a forward over it appends
    to the copies (cache layers rebind their tensors on update, never write in place), so
    ``cache`` itself stays the prefix."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def packed_layout_applies(model: nn.Module, seq_len: int) -> bool:
    """Whether the ``packed`` layout of ``engine="kv_cache"`` can serve ``model`` for
    sequences of up to ``seq_len`` tokens (prefix + target): the forward takes
    ``position_ids``, the attention implementation is ``sdpa`` or ``eager`` (they take a
    prepared 4-D additive mask as is), and no sliding or chunked attention window is
    shorter than ``seq_len``. (A run still checks one unsubstituted variant against the
    clean logits before trusting the layout.)"""
    cfg = _text_config(model)
    if cfg is None or not _takes(model, "position_ids"):
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    for name in ("sliding_window", "attention_chunk_size", "window_size"):
        window = getattr(cfg, name, None)
        if isinstance(window, int) and not isinstance(window, bool) and window < seq_len:
            return False
    return True


def _variant_mask(prefix_mask: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask ``[b, 1, n, P + n]`` for ``n`` variant tokens after a prefix of
    ``P`` cached positions: variant ``j`` sees the row's real prefix tokens and itself."""
    b, p = prefix_mask.shape
    allow = torch.cat([prefix_mask.bool()[:, None, :].expand(b, n, p),
                       torch.eye(n, dtype=torch.bool, device=prefix_mask.device).expand(b, n, n)], dim=-1)
    mask = torch.zeros(b, 1, n, p + n, dtype=dtype, device=prefix_mask.device)
    return mask.masked_fill_(~allow[:, None], torch.finfo(dtype).min)


def _col_setter(b: int, n: int, cols: torch.Tensor, value: torch.Tensor):
    """Site fn for ``b`` rows of ``n`` variant tokens: token columns ``cols`` get
    ``value[:, cols]``, the others keep their natural activation."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        view = out.view(b, n, x.shape[-1])
        idx = cols.to(x.device)
        view[:, idx] = value[:, idx].to(x.dtype)
        return out
    return fn


def _close_logits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The unsubstituted variant's logits equal the clean ones up to the rounding of a
    different matrix layout (relative to the largest clean logit)."""
    tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 5e-2
    got, want = got.double(), want.double()
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= tol * (
        float(want.abs().max()) + 1.0)


def _kv_packed(model, prefix, last_ids, prefix_mask, last_pos, layers, site, alpha, weight,
               target_fn, clean, clean_logits, max_batch):
    """``Σ_k w_k ∂F/∂x`` for every (row, layer) by the packed layout, or None when its
    unsubstituted check variant disagrees with the clean logits."""
    batch, device = last_ids.shape[0], last_ids.device
    n_layers, k = len(layers), alpha.numel()
    n_var = n_layers * k
    per = min(n_var, max_batch)  # variant tokens of one row per forward
    group = max(1, max_batch // per)  # rows per forward
    var = torch.arange(n_var, device=device)
    li_all, st_all = var // k, var % k
    layer_of = torch.tensor(layers, dtype=torch.long, device=device)
    alpha_d, weight_d = alpha.to(device), weight.to(device)
    dtype = model.get_input_embeddings().weight.dtype
    gsum = torch.zeros(batch, n_layers, clean.shape[-1], dtype=torch.float64, device=device)
    checked = False
    for g0 in range(0, batch, group):
        rows = torch.arange(g0, min(g0 + group, batch), device=device)
        b = rows.numel()
        cache = prefix if b == batch else _select_cache(prefix, rows)
        for t0 in range(0, n_var, per):
            lis, steps = li_all[t0:t0 + per], st_all[t0:t0 + per]
            n = lis.numel()
            ntok = n + (0 if checked else 1)  # the first forward carries one clean variant
            z = (alpha_d[steps][None, :, None] * clean[rows][:, lis].to(torch.float64)).to(clean.dtype)
            z.requires_grad_(True)
            fns = {}
            for layer in torch.unique(layer_of[lis]).tolist():
                cols = torch.nonzero(layer_of[lis] == layer)[:, 0]
                fns[SiteRef(layer, site)] = _col_setter(b, ntok, cols, z)
            kw = {"input_ids": last_ids[rows].expand(b, ntok),
                  "position_ids": last_pos[rows].expand(b, ntok),
                  "attention_mask": _variant_mask(prefix_mask[rows], ntok, dtype),
                  "past_key_values": _fresh(cache), "use_cache": True}
            with torch.enable_grad(), hooked(model, fns):
                logits = model(**kw).logits
                if not checked:
                    if not _close_logits(logits[:, -1].detach(), clean_logits[rows]):
                        return None
                    checked = True
                flat = logits[:, :n].reshape(b * n, -1)
                value = target_fn(flat, rows.repeat_interleave(n))
                (grad,) = torch.autograd.grad(value.sum(), z)
            contrib = weight_d[steps][None, :, None] * grad.to(torch.float64)
            gsum.index_put_((rows[:, None].expand(b, n), lis[None, :].expand(b, n)), contrib,
                            accumulate=True)
    return gsum


def _kv_rows(model, last_logits, layers, site, alpha, weight, target_fn, clean, max_batch):
    """``Σ_k w_k ∂F/∂x`` for every (row, layer) by the rows layout."""
    batch, device = clean.shape[0], clean.device
    n_layers, k = len(layers), alpha.numel()
    flat = torch.arange(batch * n_layers * k, device=device)
    rows_all, li_all, steps_all = flat // (n_layers * k), (flat // k) % n_layers, flat % k
    layer_of = torch.tensor(layers, dtype=torch.long, device=device)
    alpha_d, weight_d = alpha.to(device), weight.to(device)
    gsum = torch.zeros(batch, n_layers, clean.shape[-1], dtype=torch.float64, device=device)
    for start in range(0, flat.numel(), max_batch):
        rows = rows_all[start:start + max_batch]
        lis = li_all[start:start + max_batch]
        steps = steps_all[start:start + max_batch]
        z = (alpha_d[steps, None] * clean[rows, lis].to(torch.float64)).to(clean.dtype)
        z.requires_grad_(True)
        fns = {}
        for layer in torch.unique(layer_of[lis]).tolist():
            mine = torch.nonzero(layer_of[lis] == layer)[:, 0]
            fns[SiteRef(layer, site)] = _col_setter(1, len(rows), mine, z[None])  # one token per row
        with torch.enable_grad(), hooked(model, fns):
            value = target_fn(last_logits(rows), rows)
            (grad,) = torch.autograd.grad(value.sum(), z)
        gsum.index_put_((rows, lis), weight_d[steps, None] * grad.to(torch.float64), accumulate=True)
    return gsum


def _ig_kv(model, ids, mask, pos, layers, site, alpha, weight, make_target, cap, layout):
    packed_ids, packed_mask = _left_pack(ids, mask, pos)
    width = packed_ids.shape[1]
    last = torch.full_like(pos, width - 1)
    if width == 1:  # no prefix to cache
        return _ig_full(model, packed_ids, packed_mask, last, layers, site, alpha, weight,
                        make_target, _check_cap(cap("full")))
    max_batch = _check_cap(cap("rows"))
    takes_pos = _takes(model, "position_ids")
    posids = _position_ids(packed_mask)
    batch, device = ids.shape[0], ids.device
    with torch.no_grad():
        kw = {"input_ids": packed_ids[:, :-1], "attention_mask": packed_mask[:, :-1], "use_cache": True}
        if takes_pos:
            kw["position_ids"] = posids[:, :-1]
        if _takes(model, "logits_to_keep"):
            kw["logits_to_keep"] = 1
        prefix = model(**kw).past_key_values
    if prefix is None or getattr(prefix, "layers", None) is None:
        raise NNError("the model returned no KV cache with .layers: use engine='full'")

    def last_logits(rows: torch.Tensor) -> torch.Tensor:
        kw = {"input_ids": packed_ids[rows, -1:], "attention_mask": packed_mask[rows],
              "past_key_values": _select_cache(prefix, rows), "use_cache": True}
        if takes_pos:
            kw["position_ids"] = posids[rows, -1:]
        return model(**kw).logits[:, -1]

    zero = torch.zeros(max_batch, dtype=torch.long, device=device)
    # clean activations and logits from one cached forward of the target token
    parts, logit_parts = [], []
    with torch.no_grad():
        for start in range(0, batch, max_batch):
            rows = torch.arange(start, min(start + max_batch, batch), device=device)
            store: dict = {}
            fns = {SiteRef(la, site): _reader(zero[:len(rows)], store, la) for la in set(layers)}
            with hooked(model, fns):
                logit_parts.append(last_logits(rows))
            parts.append(torch.stack([store[la] for la in layers], dim=1))
    clean, clean_logits = torch.cat(parts), torch.cat(logit_parts)
    target_fn = make_target(clean_logits)

    applies = packed_layout_applies(model, width)
    if layout == "packed" and not applies:
        raise NNError("the packed layout needs position_ids, sdpa/eager attention and no attention "
                      f"window shorter than {width} tokens: use layout='rows' or 'auto'")
    gsum = None
    if layout == "packed" or (layout == "auto" and applies):
        gsum = _kv_packed(model, prefix, packed_ids[:, -1:], packed_mask[:, :-1], posids[:, -1:],
                          layers, site, alpha, weight, target_fn, clean, clean_logits,
                          _check_cap(cap("packed")))
        if gsum is None and layout == "packed":
            raise NNError("the packed layout does not reproduce this model's clean logits (its "
                          "attention does not take a 4-D mask as is): use layout='rows'")
    if gsum is None:
        gsum = _kv_rows(model, last_logits, layers, site, alpha, weight, target_fn, clean, max_batch)
    return (clean.to(torch.float64) * gsum).to(torch.float32).cpu(), clean_logits
