"""Padding-aware capture of activations at sites or module inputs/outputs.

One engine, :func:`stream_tokens`, runs the model over batches and hands every hooked
point's *real-token rows* to a sink, batch by batch. Everything else is a use of it:

* :func:`capture` keeps all rows (``(n_tokens, width)``) or float64 running sums
  (``reducer="mean" | "abs_mean" | "sumsq"``, memory independent of the token count);
* :func:`capture_padded` keeps the shape ``[batch, position, width]`` with padding zeroed;
* nn-ica's ICA matrix and nn-sensitivity's input statistics are sinks.

Semantics shared by all of them, for a batch ``{input_ids [B, T], attention_mask [B, T]}``
(a missing mask means all ones; extra keys such as ``labels`` are ignored):

* The model sees ``input_ids`` and ``attention_mask``. When some row starts with padding
  (left padding) and ``model.forward`` takes ``position_ids``, it also gets
  ``position_ids[b, t] = max(0, sum_{s<=t} mask[b, s] - 1)``: positions counted from each
  row's first real token, so absolute-position models (GPT-2) see what an unpadded run sees.
* A point's tensor ``x`` is made token-major: ``[B, T, ...] -> [B*T, ...]`` (a tensor that
  is already ``[B*T, ...]`` is taken as is; any other leading shape is an error, e.g. the
  routed inputs of a mixture-of-experts layer). The rows handed on are ``x[keep]``, in
  row-major (batch row, then position) order, where ``keep = attention_mask != 0``,
  narrowed by ``batch[select_key] != 0`` when a ``select_key`` is given.
* A batch without any kept token is not run.
* Non-finite kept rows raise :class:`NNError` naming the point and the batch index
  (``check_finite=True``, the default).
* The model runs in eval mode under ``torch.no_grad()``; its mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from nn_core.device import input_device
from nn_core.errors import NNError
from nn_core.intervene.hooks import HookPoint, SiteHooks, as_hook_point

REDUCERS = ("mean", "abs_mean", "sumsq")


@dataclass
class TokenBatch:
    """What a sink knows about the batch whose rows it receives.

    ``index``: position of the batch in the input iterable (0-based, skipped batches
    counted); ``keep``: [B, T] bool mask of the kept tokens (on the input device);
    ``input_ids``: [B, T] as given to the model.
    """

    index: int
    keep: torch.Tensor
    input_ids: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.keep.sum())


Sink = Callable[[HookPoint, torch.Tensor, TokenBatch], None]


@dataclass
class StreamStats:
    """Counts of a :func:`stream_tokens` run: kept tokens, batches seen, forward passes run."""

    n_tokens: int
    n_batches: int
    n_forwards: int


def _takes_position_ids(model: nn.Module) -> bool:
    import inspect

    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _quiet(progress: bool | None) -> bool:
    if progress is None:
        import sys

        return not sys.stderr.isatty()
    return not progress


def left_pad_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """``max(0, cumsum(mask) - 1)`` per row: positions counted from the first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    points: Iterable,
    batches: Iterable[Mapping[str, torch.Tensor]],
    sink: Sink,
    *,
    mask_key: str = "attention_mask",
    select_key: str | None = None,
    check_finite: bool = True,
    progress: bool | None = None,
    desc: str = "capture",
) -> StreamStats:
    """Call ``sink(point, rows, batch)`` with the real-token rows of every point, every batch.

    ``points``: sites or :class:`~nn_core.intervene.hooks.ModuleTap` s. ``rows`` is a
    detached view-or-copy of the point's tensor restricted to kept tokens (module docs),
    in the model's dtype and on the point's device; the sink must not keep it beyond the
    call if it needs a stable copy (it is not cloned). ``mask_key`` names the batch's
    attention mask; ``select_key`` an optional [B, T] mask that narrows the kept tokens
    (e.g. rows drawn in advance). Hooks are removed when the function returns or raises.
    """
    from tqdm.auto import tqdm

    pts = [as_hook_point(p) for p in points]
    if not pts:
        raise NNError("capture needs at least one site, e.g. (0, 'mlp_act')")
    if len(set(pts)) != len(pts):
        raise NNError("capture was given the same site twice: list each site once")
    device = input_device(model)
    state: dict = {"batch": None, "keep": {}, "shape": None}

    def keep_on(dev: torch.device) -> torch.Tensor:
        k = state["keep"].get(dev)
        if k is None:
            k = state["keep"][dev] = state["keep"][device].to(dev)
        return k

    def reader(point: HookPoint):
        def fn(x: torch.Tensor) -> None:
            b, t = state["shape"]
            x = x.detach()
            if x.dim() >= 2 and tuple(x.shape[:2]) == (b, t):
                flat = x.reshape(b * t, *x.shape[2:])
            elif x.dim() >= 1 and x.shape[0] == b * t:
                flat = x
            else:
                raise NNError(f"{point} has shape {tuple(x.shape)} for a batch of {b} x {t} tokens "
                              "(routed or reshaped inputs): it has no per-token rows; exclude it "
                              "(e.g. --modules) or capture another module or site")
            rows = flat[keep_on(flat.device)]
            if check_finite and rows.is_floating_point() and not torch.isfinite(rows).all():
                raise NNError(f"non-finite activations at {point} in batch {state['batch'].index}: "
                              "load the model in float32 (--dtype float32) or check the inputs")
            sink(point, rows, state["batch"])
            return None
        return fn

    takes_pos = _takes_position_ids(model)
    n_tokens = n_batches = n_forwards = 0
    was_training = model.training
    model.eval()
    try:
        with SiteHooks(model, {p: reader(p) for p in pts}):
            for batch in tqdm(batches, desc=desc, disable=_quiet(progress), leave=False):
                ids = batch["input_ids"].to(device)
                mask = batch.get(mask_key)
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                keep = mask != 0
                if select_key is not None and batch.get(select_key) is not None:
                    keep = keep & (batch[select_key].to(device) != 0)
                index = n_batches
                n_batches += 1
                n_keep = int(keep.sum())
                if n_keep == 0:
                    continue
                state["batch"] = TokenBatch(index, keep, ids)
                state["keep"] = {device: keep.reshape(-1)}
                state["shape"] = tuple(ids.shape)
                extra = {}
                if takes_pos and bool((mask[:, 0] == 0).any()):
                    extra["position_ids"] = left_pad_position_ids(mask)
                model(input_ids=ids, attention_mask=mask, **extra)
                n_tokens += n_keep
                n_forwards += 1
    finally:
        model.train(was_training)
        state.clear()
    return StreamStats(n_tokens, n_batches, n_forwards)


# --------------------------------------------------------------------------- capture
@dataclass
class Capture:
    """Result of :func:`capture`.

    Without a reducer, ``values[point]`` is (n_tokens, width) float32 on the CPU, tokens in
    batch order, padding excluded. With a reducer it is (width,) float64: the per-channel
    mean, mean of absolute values, or sum of squares over all non-padding tokens.
    """

    values: dict[HookPoint, torch.Tensor]
    n_tokens: int
    reducer: str | None = None
    n_batches: int = 0
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key) -> torch.Tensor:
        return self.values[as_hook_point(key)]

    def keys(self):
        return self.values.keys()


def capture(
    model: nn.Module,
    sites: Iterable,
    batches: Iterable[Mapping[str, torch.Tensor]],
    reducer: str | None = None,
    *,
    token_mask_key: str = "attention_mask",
    progress: bool | None = None,
) -> Capture:
    """Stream activations at ``sites`` (sites or module taps) over ``batches``, padding excluded.

    With ``reducer`` ("mean", "abs_mean", "sumsq") only running float64 sums per channel
    are kept, ``mean = sum_t x_t / N``, ``abs_mean = sum_t |x_t| / N``, ``sumsq = sum_t x_t^2``
    over the N kept tokens, so memory does not grow with the number of tokens. Without, all
    kept rows are concatenated. ``token_mask_key`` names the attention mask. Non-finite
    activations raise :class:`NNError` naming the site and the batch.
    """
    if reducer is not None and reducer not in REDUCERS:
        raise NNError(f"unknown reducer '{reducer}': use one of {', '.join(REDUCERS)} or None")
    pts = [as_hook_point(s) for s in sites]
    chunks: dict[HookPoint, list[torch.Tensor]] = {p: [] for p in pts}
    sums: dict[HookPoint, torch.Tensor | None] = {p: None for p in pts}

    def sink(point: HookPoint, rows: torch.Tensor, _batch: TokenBatch) -> None:
        flat = rows.reshape(rows.shape[0], -1) if rows.dim() != 2 else rows
        if reducer is None:
            chunks[point].append(flat.float().cpu())
            return
        # float64 sums; MPS has no float64, so there the per-batch sum is float32 and the
        # running total float64 on the CPU
        f = flat.float() if flat.device.type == "mps" else flat.double()
        if reducer == "mean":
            part = f.sum(0)
        elif reducer == "abs_mean":
            part = f.abs().sum(0)
        else:
            part = (f * f).sum(0)
        if part.device.type == "mps":
            part = part.cpu().double()
        sums[point] = part if sums[point] is None else sums[point] + part

    stats = stream_tokens(model, pts, batches, sink, mask_key=token_mask_key, progress=progress)
    if stats.n_tokens == 0:
        raise NNError("capture saw no tokens: the data is empty or fully padded")
    if reducer is None:
        values = {p: torch.cat(chunks[p]) for p in pts}
    elif reducer == "sumsq":
        values = {p: sums[p].cpu() for p in pts}
    else:
        values = {p: (sums[p] / stats.n_tokens).cpu() for p in pts}
    return Capture(values, stats.n_tokens, reducer, stats.n_batches)


@dataclass
class PaddedCapture:
    """Result of :func:`capture_padded`: ``values[point]`` is [B, T, width] float32 on the
    CPU with every padding position exactly 0; ``mask`` is the [B, T] bool mask of real
    tokens."""

    values: dict[HookPoint, torch.Tensor]
    mask: torch.Tensor

    def __getitem__(self, key) -> torch.Tensor:
        return self.values[as_hook_point(key)]

    def keys(self):
        return self.values.keys()


def capture_padded(
    model: nn.Module,
    sites: Iterable,
    batch: Mapping[str, torch.Tensor],
    *,
    token_mask_key: str = "attention_mask",
) -> PaddedCapture:
    """Activations of one batch at ``sites``, shape-preserving: ``[B, T, width]`` per site,
    ``values[b, t] = x[b, t]`` where ``mask[b, t]`` and 0 elsewhere (same run as
    :func:`capture`, incl. left-padding position ids), plus the mask."""
    pts = [as_hook_point(s) for s in sites]
    ids = batch["input_ids"]
    bsz, seq = ids.shape
    mask = batch.get(token_mask_key)
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu() != 0
    flat_keep = mask.reshape(-1)
    values: dict[HookPoint, torch.Tensor] = {}

    def sink(point: HookPoint, rows: torch.Tensor, _batch: TokenBatch) -> None:
        out = torch.zeros((bsz * seq, *rows.shape[1:]), dtype=torch.float32)
        out[flat_keep] = rows.float().cpu()
        values[point] = out.reshape(bsz, seq, *rows.shape[1:])

    stats = stream_tokens(model, pts, [batch], sink, mask_key=token_mask_key, progress=False)
    if stats.n_tokens == 0:
        raise NNError("capture saw no tokens: the batch is empty or fully padded")
    return PaddedCapture(values, mask)
