"""Neocortex + hippocampus: a causal LM with the hippocampus injected into its residual stream.

The injection point is the input of decoder layer ``s = round(L · injection_fraction)``
(clamped to 1..L), i.e. the ``resid`` site (block output) of layer ``s − 1``, so layers
``s … L−1`` process the delta. ``head_only=True`` (the seed's fallback for stacks without
mid-layer access) adds the delta to the final norm's output, right before the LM head.
The injection is a :func:`nn_core.intervene.inject` handle: gradients flow into the
hippocampus; :meth:`CLSSystem.base_only` disables it for a block. Token ids are passed to
the model unchanged (no vocabulary folding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from nn_cls.hippocampus import Hippocampus, HippocampusConfig
from nn_core.errors import NNError
from nn_core.intervene.hooks import ModuleTap
from nn_core.intervene.inject import inject
from nn_core.model.adapters import get_adapter
from nn_core.model.sites import SiteRef

__all__ = ["CLSSystem", "injection_layer"]


def injection_layer(num_layers: int, fraction: float) -> int:
    """``s = round(L · fraction)`` clamped to ``1..L``: the first decoder layer that sees the delta."""
    if not 0.0 <= fraction <= 1.0:
        raise NNError(f"model.injection_fraction must be in [0, 1], got {fraction}")
    return min(max(round(num_layers * fraction), 1), num_layers)


class CLSSystem:
    """``model`` (a causal LM nn-core loads) with a :class:`Hippocampus` attached.

    ``model`` may later be replaced by a PEFT wrapper of itself (:attr:`model`); the hooks
    sit on the decoder modules, which the wrapper keeps.
    """

    def __init__(self, model: nn.Module, config: HippocampusConfig | None = None, *,
                 injection_fraction: float = 0.7, head_only: bool = False, seed: int = 0,
                 use_hippocampus: bool = True):
        self.model = model
        adapter = get_adapter(model)
        self.num_layers = adapter.num_layers
        width = adapter.width("resid")
        p = next(model.parameters())
        self.hippocampus = Hippocampus(width, config, seed=seed).to(device=p.device)
        self.head_only = bool(head_only)
        self.use_hippocampus = bool(use_hippocampus)
        if head_only:
            self.layer = self.num_layers
            self.point = ModuleTap(adapter.final_norm_path(), "output")
        else:
            self.layer = injection_layer(self.num_layers, injection_fraction)
            self.point = SiteRef(self.layer - 1, "resid")
        #: ``None`` (default: the model's own precision) or a factory of an autocast context
        #: (:meth:`nn_cls.distributed.Runtime.autocast`) entered around every forward; the
        #: logits then come back as float32 for the losses.
        self.autocast = None
        self.hooks = inject(model, {self.point: self.hippocampus})
        if self.use_hippocampus:
            self.hooks.attach()

    @property
    def injection_mode(self) -> str:
        return "head_only" if self.head_only else "mid_layer"

    @contextlib.contextmanager
    def base_only(self):
        """The base model alone inside the block (the hippocampus adds nothing)."""
        with self.hooks.disabled():
            yield

    def forward(self, batch: Mapping[str, torch.Tensor], *, hippocampus: bool = True) -> torch.Tensor:
        """Logits (B, T, V) of ``batch`` (``input_ids``, optional ``attention_mask``)."""
        device = next(self.model.parameters()).device
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        self.hippocampus.token_mask = mask
        ctx = contextlib.nullcontext() if (hippocampus and self.use_hippocampus) else self.base_only()
        try:
            if self.autocast is None:
                with ctx:
                    return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            with ctx, self.autocast():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return logits.float()
        finally:
            self.hippocampus.token_mask = None

    def close(self) -> None:
        self.hooks.remove()
