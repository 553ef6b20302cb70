"""Calibration batches: device placement, loss targets and the token-weighted loss.

A batch is a dict with ``input_ids`` and optionally ``attention_mask`` and ``labels``
(-100 marks tokens that carry no loss: prompt tokens from instruction data). Padding
(``attention_mask == 0``) never carries loss, whatever ``labels`` says.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nn_core.device import input_device

IGNORE = -100


def prepare(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move ``batch`` to ``device`` and derive ``attention_mask`` and ``labels``."""
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    labels = batch.get("labels")
    labels = ids.clone() if labels is None else labels.to(device).clone()
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def summed_nll(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over the batch's loss tokens, and their count.

    L_sum = sum over positions t with labels[t+1] != -100 of -log p(labels[t+1] | x_<=t).
    Callers divide summed losses by the TOTAL token count of the calibration set, which
    weighs every token equally (a mean of batch means would overweight short batches).
    """
    b = prepare(batch, input_device(model))
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    targets = b["labels"][:, 1:].to(logits.device)
    pred = logits[:, :-1].float()
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def count_loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    b = prepare(batch, torch.device("cpu"))
    return int((b["labels"][:, 1:] != IGNORE).sum())


def split_rows(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One single-sequence batch per row (for per-sample gradients)."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            for i in range(n)]
