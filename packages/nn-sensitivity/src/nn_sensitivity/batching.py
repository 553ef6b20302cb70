"""Calibration batches: device placement, loss targets and the token-weighted loss.

A batch is a dict with ``input_ids`` and optionally ``attention_mask`` and ``labels``
(-100 marks tokens that carry no loss: prompt tokens from instruction data). Padding
(``attention_mask == 0``) never carries loss, whatever ``labels`` says.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nn_core.data import IGNORE_INDEX as IGNORE
from nn_core.numerics.loss import causal_labels
from nn_core.numerics.loss import summed_nll as _core_summed_nll


def prepare(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move ``batch`` to ``device`` and derive ``attention_mask`` and ``labels``."""
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    labels = batch.get("labels")
    labels = causal_labels(ids if labels is None else labels.to(device), mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def summed_nll(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over the batch's loss tokens, and their count.

    L_sum = sum over positions t with labels[t+1] != -100 of -log p(labels[t+1] | x_<=t),
    computed by :func:`nn_core.numerics.loss.summed_nll` (padding-aware, differentiable).
    Callers divide summed losses by the TOTAL token count of the calibration set, which
    weighs every token equally (a mean of batch means would overweight short batches).
    """
    return _core_summed_nll(model, batch)


def count_loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    b = prepare(batch, torch.device("cpu"))
    return int((b["labels"][:, 1:] != IGNORE).sum())


def split_rows(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One single-sequence batch per row (for per-sample gradients)."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            for i in range(n)]
