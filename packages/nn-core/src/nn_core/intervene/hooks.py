"""Forward hooks on sites: ``hooked`` (edit or read) and ``capture`` (stream activations).

Hooks are global state on the model: every function here registers inside ``try`` and
removes in ``finally``, so an exception inside the block never leaves a hook behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from nn_core.device import input_device
from nn_core.errors import NNError
from nn_core.model.adapters import site_module
from nn_core.model.sites import SiteRef, as_site_ref

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]

REDUCERS = ("mean", "abs_mean", "sumsq")


def _make_hook(fn: SiteFn, kind: str):
    if kind == "pre":
        def pre_hook(module, args):
            new = fn(args[0])
            if new is None:
                return None
            return (new, *args[1:])
        return pre_hook

    def post_hook(module, args, output):
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        new = fn(output)
        return new
    return post_hook


def register_site_hooks(model: nn.Module, fns: Mapping) -> list:
    """Register ``{site: fn}`` hooks and return their handles (caller removes them).

    Prefer :func:`hooked`; this is for long-lived handles such as training masks.
    ``fn(tensor)`` sees the site tensor (batch, seq, width) and returns a replacement or None.
    """
    handles = []
    try:
        for key, fn in fns.items():
            ref = as_site_ref(key)
            module, kind = site_module(model, ref)
            hook = _make_hook(fn, kind)
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(hook))
            else:
                handles.append(module.register_forward_hook(hook))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


@contextlib.contextmanager
def hooked(model: nn.Module, fns: Mapping) -> Iterator[None]:
    """Run a block with site hooks installed; they are removed on exit, also on errors.

    >>> with hooked(model, {(3, "mlp_act"): lambda x: x * 0}):
    ...     logits = model(**batch).logits
    """
    handles = register_site_hooks(model, fns)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Capture:
    """Result of :func:`capture`.

    Without a reducer, ``values[ref]`` is (n_tokens, width) float32 on the CPU, tokens in
    batch order, padding excluded. With a reducer it is (width,) float64: the per-channel
    mean, mean of absolute values, or sum of squares over all non-padding tokens.
    """

    values: dict[SiteRef, torch.Tensor]
    n_tokens: int
    reducer: str | None = None
    n_batches: int = 0
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key) -> torch.Tensor:
        return self.values[as_site_ref(key)]

    def keys(self):
        return self.values.keys()


@torch.no_grad()
def capture(
    model: nn.Module,
    sites: Iterable,
    batches: Iterable[Mapping[str, torch.Tensor]],
    reducer: str | None = None,
    *,
    token_mask_key: str = "attention_mask",
    progress: bool | None = None,
) -> Capture:
    """Stream activations at ``sites`` over ``batches`` with padding excluded.

    ``batches`` yields dicts with ``input_ids`` and ``attention_mask`` (extra keys such as
    ``labels`` are ignored). Tokens where the mask is 0 are dropped. With ``reducer``
    ("mean", "abs_mean", "sumsq") only running float64 sums are kept, so memory does not
    grow with the number of tokens. Non-finite activations raise :class:`NNError`.
    """
    from tqdm.auto import tqdm

    if reducer is not None and reducer not in REDUCERS:
        raise NNError(f"unknown reducer '{reducer}': use one of {', '.join(REDUCERS)} or None")
    refs = [as_site_ref(s) for s in sites]
    if not refs:
        raise NNError("capture needs at least one site, e.g. (0, 'mlp_act')")
    device = input_device(model)
    chunks: dict[SiteRef, list[torch.Tensor]] = {r: [] for r in refs}
    sums: dict[SiteRef, torch.Tensor | None] = {r: None for r in refs}
    state = {"keep": None, "batch": 0}

    def reader(ref: SiteRef):
        def fn(x: torch.Tensor):
            keep = state["keep"]
            flat = x.detach().reshape(-1, x.shape[-1])
            if keep is not None:
                flat = flat[keep]
            if not torch.isfinite(flat).all():
                raise NNError(f"non-finite activations at {ref} in batch {state['batch']}: "
                              "load the model in float32 (--dtype float32) or check the inputs")
            if reducer is None:
                chunks[ref].append(flat.float().cpu())
            else:
                # float64 sums; MPS has no float64, so there the per-batch sum is float32
                # and the running total float64 on the CPU
                f = flat.float() if flat.device.type == "mps" else flat.double()
                part = {"mean": f.sum(0), "abs_mean": f.abs().sum(0), "sumsq": (f * f).sum(0)}[reducer]
                if part.device.type == "mps":
                    part = part.cpu().double()
                sums[ref] = part if sums[ref] is None else sums[ref] + part
            return None
        return fn

    n_tokens = 0
    n_batches = 0
    takes_pos = _takes_position_ids(model)
    was_training = model.training
    model.eval()
    try:
        with hooked(model, {r: reader(r) for r in refs}):
            for batch in tqdm(batches, desc="capture", disable=_quiet(progress), leave=False):
                ids = batch["input_ids"].to(device)
                mask = batch.get(token_mask_key)
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                state["keep"] = mask.reshape(-1).bool()
                state["batch"] = n_batches
                extra = {}
                if takes_pos and bool((mask[:, 0] == 0).any()):
                    # left padding: count positions from each row's first real token, as in
                    # an unpadded run (matters for absolute position embeddings, e.g. GPT-2)
                    extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
                model(input_ids=ids, attention_mask=mask, **extra)
                n_tokens += int(mask.sum())
                n_batches += 1
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise NNError("capture saw no tokens: the data is empty or fully padded")
    if reducer is None:
        values = {r: torch.cat(chunks[r]) for r in refs}
    elif reducer == "sumsq":
        values = {r: sums[r].cpu() for r in refs}
    else:
        values = {r: (sums[r] / n_tokens).cpu() for r in refs}
    return Capture(values, n_tokens, reducer, n_batches)


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
