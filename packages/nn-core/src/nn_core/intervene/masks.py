"""Neuron masks (forward) and weight masks (gradient), both from selections.

``mask_neurons(model, ns, mode)`` zeroes site channels given by a 0/1 vector:

* ``lesion``: the selected channels are zeroed, everything else untouched.
* ``preserve``: only the selected channels pass; for every site the set is about, every
  layer the set covers is masked, and a covered layer with no selected channel is zeroed
  entirely. A set covers all layers unless its producer analysed only some and recorded
  them in ``meta["layers"]``; layers outside that list are left untouched.

Kept channels are not touched (``masked_fill``), so they are bit-identical to an unhooked
forward, and a masked channel is exactly 0 even where it held inf or NaN. The handle is a
:class:`~nn_core.intervene.hooks.SiteHooks`: a context manager, or attached (training)
until ``remove()``; it registers nothing until entered or attached, so it cannot leak.

``WeightMask`` trains only some rows/columns of weights: gradients of frozen entries are
set to 0 by a tensor hook (``masked_fill``, so a NaN gradient there becomes 0 as well)
and, after every optimizer step, frozen entries are written back from a saved copy, so
decoupled weight decay and stale Adam moments cannot move them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.intervene.hooks import SiteHooks
from nn_core.model.sites import SiteRef
from nn_core.select.neuronset import NeuronSet

MODES = ("lesion", "preserve")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise NNError(f"unknown mask mode '{mode}': use lesion or preserve")
    return mode


def site_masks(model: nn.Module, neurons: NeuronSet, mode: str) -> dict[SiteRef, torch.Tensor]:
    """The 0/1 float vectors ``mask_neurons`` applies, per (layer, site)."""
    from nn_core.model.adapters import get_adapter

    check_mode(mode)
    ad = get_adapter(model)
    neurons.validate(model, check_id=False)
    out: dict[SiteRef, torch.Tensor] = {}
    for site in neurons.sites:
        width = ad.width(site)
        for layer in neurons.covered_layers(ad.num_layers):
            idx = neurons.indices(layer, site)
            if mode == "lesion":
                if idx.numel() == 0:
                    continue
                vec = torch.ones(width)
                vec[idx] = 0.0
            else:
                vec = torch.zeros(width)
                vec[idx] = 1.0
            out[SiteRef(layer, site)] = vec
    return out


class MaskHandle(SiteHooks):
    """Forward masks on a model: a :class:`~nn_core.intervene.hooks.SiteHooks` whose hooks
    zero the masked channels. Use ``with handle:`` or ``handle.attach()``/``remove()``;
    ``handle.disabled()`` gives the unmasked model without unregistering."""

    def __init__(self, model: nn.Module, masks: Mapping[SiteRef, torch.Tensor], mode: str):
        self.mode = mode
        self.masks = dict(masks)
        self._cache: dict[tuple, torch.Tensor] = {}
        super().__init__(model, {r: self._fn(r) for r in self.masks})

    def _fn(self, ref: SiteRef):
        base = self.masks[ref]

        def apply(x: torch.Tensor) -> torch.Tensor:
            # masked_fill, not a multiply: an inf activation in a masked channel becomes 0,
            # not NaN (inf * 0), and kept channels are untouched bit for bit.
            drop = self._cache.get((ref, x.device))
            if drop is None:
                drop = self._cache[(ref, x.device)] = base.to(x.device) == 0
            return x.masked_fill(drop, 0)
        return apply


def mask_neurons(model: nn.Module, neurons: NeuronSet, mode: str = "lesion") -> MaskHandle:
    """Mask the neurons of ``neurons`` (validated against ``model``); see module docs."""
    return MaskHandle(model, site_masks(model, neurons, mode), mode)


# --------------------------------------------------------------------------- gradients
class WeightMask:
    """Freeze part of some parameters during training.

    ``trainable`` maps a parameter (or its name) to a boolean tensor of its shape that is
    True where the entry may change. Call ``attach(optimizer)``; every optimizer step then
    leaves the frozen entries bit-identical.
    """

    def __init__(self, model: nn.Module, trainable: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.model = model
        self._entries: list[tuple[str, nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for name, mask in trainable.items():
            if name not in params:
                raise NNError(f"no parameter named '{name}' in the model")
            p = params[name]
            if tuple(mask.shape) != tuple(p.shape):
                raise NNError(f"mask for {name} has shape {tuple(mask.shape)}, parameter has {tuple(p.shape)}")
            m = mask.to(device=p.device, dtype=torch.bool)
            self._entries.append((name, p, m, p.detach().clone()))
        self._handles: list = []

    def n_trainable(self) -> int:
        return int(sum(int(m.sum()) for _, _, m, _ in self._entries))

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> WeightMask:
        """Register the gradient hooks (and the restore after ``optimizer.step()``); a
        second call while attached does nothing."""
        if self._handles:
            return self
        for _, p, m, _ in self._entries:
            # masked_fill, not g * m: a NaN or inf gradient of a frozen entry becomes 0
            # (NaN * 0 would stay NaN and poison the optimizer state)
            frozen = ~m
            self._handles.append(p.register_hook(lambda g, f=frozen: g.masked_fill(f.to(g.device), 0)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *a, **k: self.restore()))
        return self

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen entries back to their saved values."""
        for _, p, m, saved in self._entries:
            p.copy_(torch.where(m, p, saved))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> WeightMask:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def down_proj_weight_mask(model: nn.Module, neurons: NeuronSet, mode: str = "preserve") -> WeightMask:
    """WeightMask over the down-projections from a NeuronSet on ``mlp_act`` or ``mlp_out``.

    An ``mlp_act`` channel j owns input column j of the down-projection (weight[:, j] for
    ``nn.Linear``, weight[j, :] for GPT-2's Conv1D); an ``mlp_out`` channel c owns output row c.
    ``preserve`` trains only the selected slices, ``lesion`` everything but them. Covered
    layers without a selected channel are entirely frozen (preserve) or entirely trainable
    (lesion); layers outside ``meta["layers"]`` are not constrained.
    """
    from nn_core.model.adapters import get_adapter

    check_mode(mode)
    ad = get_adapter(model)
    neurons.validate(model, check_id=False)
    bad = [s for s in neurons.sites if s not in ("mlp_act", "mlp_out")]
    if bad:
        raise NNError(f"weight masks need mlp_act or mlp_out neurons, not {bad}")
    names = {id(p): n for n, p in model.named_parameters()}
    trainable: dict[str, torch.Tensor] = {}
    for layer in neurons.covered_layers(ad.num_layers):
        w = ad.down_weight(layer)
        if id(w) not in names:  # e.g. a split (surgery) down-projection assembles its weight
            raise NNError(f"the down-projection of layer {layer} has no plain weight parameter "
                          f"({type(ad.down_proj(layer)).__name__}): weight masks need plain "
                          "Linear/Conv1D layers; merge the split layers first (nn_core.merge_all)")
        sel = torch.zeros(w.shape, dtype=torch.bool)
        for site in neurons.sites:
            idx = neurons.indices(layer, site)
            act_dim = ad.neuron_dim()
            dim = act_dim if site == "mlp_act" else 1 - act_dim
            sel.index_fill_(dim, idx, True)
        trainable[names[id(w)]] = sel if mode == "preserve" else ~sel
    return WeightMask(model, trainable)
