"""Additive injection at sites: ``x' = x + delta``.

``inject(model, {point: delta})`` returns a :class:`~nn_core.intervene.hooks.SiteHooks`
(nothing registered until ``attach()`` or ``with``). ``delta`` is either

* a tensor broadcastable to the site tensor (e.g. ``(width,)`` to shift every token, or
  ``(batch, position, width)``), or
* a callable ``delta_fn(x) -> tensor`` of the site tensor ``x`` (batch, position, width),
  e.g. an ``nn.Module`` such as a mixture of experts reading the residual stream.

The sum is taken in autograd (no ``no_grad``, no detach), so gradients flow into the
parameters of ``delta_fn`` (and into a tensor delta that requires grad) through
everything downstream of the site. The delta is cast to the site tensor's dtype and
device; it may not change the site tensor's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.intervene.hooks import HookPoint, SiteHooks, as_hook_point
from nn_core.model.sites import SiteRef

Delta = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def _adder(point: HookPoint, delta: Delta):
    fn = delta if callable(delta) and not isinstance(delta, torch.Tensor) else None

    def add(x: torch.Tensor) -> torch.Tensor:
        d = fn(x) if fn is not None else delta
        if not isinstance(d, torch.Tensor):
            raise NNError(f"the delta function at {point} returned {type(d).__name__}, not a tensor")
        if d.shape != x.shape:
            try:
                shape = torch.broadcast_shapes(x.shape, d.shape)
            except RuntimeError:
                shape = None
            if shape != x.shape:
                raise NNError(f"the delta at {point} has shape {tuple(d.shape)}, which does not "
                              f"broadcast to the site tensor {tuple(x.shape)}: return (..., width) values")
        return x + d.to(dtype=x.dtype, device=x.device)
    return add


def inject(model: nn.Module, deltas: Mapping) -> SiteHooks:
    """Hooks adding ``delta`` to each point's tensor; see the module docs.

    >>> with inject(model, {(round(L * 0.7), "resid"): moe}):   # moe: nn.Module, x -> delta
    ...     loss = model(**batch, labels=batch["input_ids"]).loss
    >>> loss.backward()                                           # grads reach moe's params
    """
    from nn_core.model.adapters import get_adapter

    fns = {}
    for key, delta in deltas.items():
        point = as_hook_point(key)
        if isinstance(delta, torch.Tensor):
            if isinstance(point, SiteRef):
                width = get_adapter(model).width(point.site)
                if delta.dim() == 0 or delta.shape[-1] not in (1, width):
                    raise NNError(f"the delta at {point} has shape {tuple(delta.shape)}: its last "
                                  f"dimension must be the site width {width}")
        elif not callable(delta):
            raise NNError(f"the delta at {point} is a {type(delta).__name__}: give a tensor or a "
                          "function of the site tensor")
        fns[point] = _adder(point, delta)
    return SiteHooks(model, fns)
