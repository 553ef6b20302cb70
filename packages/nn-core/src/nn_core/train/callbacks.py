"""Trainer callbacks that keep nn-core weight masks in force during training."""

from __future__ import annotations

from collections.abc import Callable


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class WeightMaskCallback(_callback_base()):
    """Keep a :class:`~nn_core.intervene.masks.WeightMask` in force while a Trainer trains.

    ``build`` makes the mask at the start of training (after a resumed checkpoint is
    loaded, so the saved copy is of the weights actually trained from): its gradient hooks
    zero the frozen entries' gradients and, after every optimizer step, the frozen entries
    are written back, so they remain bit-identical.
    """

    def __init__(self, build: Callable[[], object]):
        self.build = build
        self.mask = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.mask = self.build()
        self.mask.attach(None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.mask is not None:
            self.mask.restore()

    def on_train_end(self, args, state, control, **kwargs):
        if self.mask is not None:
            self.mask.restore()
            self.mask.remove()
