"""Small helpers shared by the evaluators: device lookup, interventions, eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from nn_core.errors import NNError


def position_limit(model: nn.Module) -> int | None:
    """The longest input the model's position table allows, or None when it names none.

    Read from ``config.max_position_embeddings`` (rotary models too: beyond it they run,
    but outside the range they were trained on) or ``config.n_positions`` (GPT-2).
    """
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def effective_max_length(model: nn.Module, max_length: int) -> int:
    """``max_length`` clamped to the model's :func:`position_limit`."""
    limit = position_limit(model)
    return max_length if limit is None else min(max_length, limit)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are never scored)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def open_intervention(intervention):
    """A context manager from ``intervention``: a zero-argument factory or a context manager."""
    if hasattr(intervention, "__enter__") and hasattr(intervention, "__exit__"):
        return intervention
    if callable(intervention):
        cm = intervention()
        if hasattr(cm, "__enter__") and hasattr(cm, "__exit__"):
            return cm
        raise NNError(
            f"intervention factory returned {type(cm).__name__}, not a context manager: "
            "pass e.g. lambda: mask_neurons(model, ns, 'lesion')"
        )
    raise NNError(
        f"intervention must be a context manager or a zero-argument factory of one, "
        f"not {type(intervention).__name__}"
    )


def _hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def run_with_intervention(model: nn.Module, intervention, fn):
    """``(fn(), fn() inside the intervention)``; checks that the intervention left no hooks."""
    before = _hook_count(model)
    baseline = fn()
    with open_intervention(intervention):
        changed = fn()
    if _hook_count(model) != before:
        raise NNError(
            "the intervention left forward hooks on the model after it exited: "
            "use a context manager that removes what it registers (e.g. nn_core.intervene.masks.mask_neurons)"
        )
    return baseline, changed
