"""Token losses of causal LMs: one implementation for evaluation and for gradients.

Conventions (those of Hugging Face ``labels=``): ``labels`` has the shape of
``input_ids``; ``labels[b, t] = IGNORE_INDEX`` (-100) marks a token that carries no loss;
the logits at position t predict ``labels[b, t+1]``. So a batch contributes

    NLL_sum = sum_{b, t : labels[b, t+1] != -100}  -log softmax(z[b, t])[labels[b, t+1]]

over ``n_tokens = #{(b, t) : labels[b, t+1] != -100}`` tokens, and the mean NLL that
``model(..., labels=labels).loss`` reports is ``NLL_sum / n_tokens``. Padding
(``attention_mask == 0``) never carries loss, whatever ``labels`` says.

* :func:`causal_labels` builds such labels from ids, padding and an optional prompt mask.
* :func:`token_scores` gives per-position log-probabilities and greedy hits from logits,
  computed in cache-sized chunks without autograd-friendly temporaries (evaluation).
* :func:`summed_nll` and :func:`per_row_nll` run the model on a batch dict and return the
  loss as a tensor that carries gradients (sensitivity, attribution, training code).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nn_core.data.specs import IGNORE_INDEX
from nn_core.device import input_device
from nn_core.errors import NNError

__all__ = ["IGNORE_INDEX", "causal_labels", "per_row_nll", "summed_nll", "token_scores"]


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for the causal-LM loss: a copy of ``input_ids`` with ``IGNORE_INDEX`` (-100)
    where ``attention_mask == 0`` (padding), right after padding (``attention_mask[t-1] ==
    0``: the first real token of a left-padded row, which an unpadded run cannot predict
    either) or ``prompt_mask != 0`` (prompt tokens that are context only). Not shifted:
    position t of the labels is the token at position t, as HF's ``labels=`` expects.

    Both masks must have the shape of ``input_ids``; raises NNError otherwise.
    """
    labels = input_ids.clone()
    for name, mask in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
        if mask is not None and tuple(mask.shape) != tuple(input_ids.shape):
            raise NNError(f"{name} has shape {tuple(mask.shape)} but input_ids {tuple(input_ids.shape)}: "
                          "give one mask entry per token")
    if attention_mask is not None:
        pad = attention_mask.to(labels.device) == 0
        labels[pad] = IGNORE_INDEX
        # a token right after padding (the first real token of a left-padded row) has no
        # context in its row: as in an unpadded run, it is not predicted
        labels[..., 1:][pad[..., :-1]] = IGNORE_INDEX
    if prompt_mask is not None:
        labels[prompt_mask.to(labels.device) != 0] = IGNORE_INDEX
    return labels


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position ``log softmax(z)[y]`` (float32) and ``[argmax z == y]`` over the last dim.

    ``logits`` is ``(N, V)`` or ``(B, T, V)`` (a view is fine), ``targets`` the matching
    ``(N,)`` or ``(B, T)`` of valid class indices (no -100: select or clamp first). No
    shifting is done here. Computed in chunks of rows small enough to stay in cache: one
    pass gives the max m and the argmax, a second the sum of exp(z - m), so
    ``logsumexp = m + log(sum)`` and the result is ``z[y] - logsumexp`` in float32. On CPU
    this is about twice as fast as whole-tensor ops. Runs without building an autograd
    graph only when called under ``torch.no_grad``/``inference_mode``; use
    :func:`summed_nll` for losses to differentiate.
    """
    if logits.shape[:-1] != targets.shape or logits.dim() not in (2, 3):
        raise NNError(f"logits of shape {tuple(logits.shape)} do not match targets of shape "
                      f"{tuple(targets.shape)}: give (N, V) with (N,) or (B, T, V) with (B, T)")
    vocab = logits.shape[-1]
    budget = 1 << 20 if logits.device.type == "cpu" else 1 << 28
    chunk = max(1, budget // vocab)
    blocks = [logits] if logits.dim() == 2 else list(logits)
    labels = [targets] if targets.dim() == 1 else list(targets)
    logp, hit = [], []
    for z_all, y_all in zip(blocks, labels, strict=True):
        for s in range(0, z_all.shape[0], chunk):
            z = z_all[s : s + chunk].float()
            y = y_all[s : s + chunk]
            top, arg = z.max(-1)
            lse = top + (z - top[:, None]).exp_().sum(-1).log_()
            logp.append(z.gather(-1, y[:, None]).squeeze(-1) - lse)
            hit.append(arg == y)
    if not logp:
        empty = logits.new_empty(targets.shape, dtype=torch.float32)
        return empty, torch.zeros(targets.shape, dtype=torch.bool, device=logits.device)
    return torch.cat(logp).view(targets.shape), torch.cat(hit).view(targets.shape)


def _forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits[:, :-1] as float32, shifted targets with -100 on non-loss tokens)``."""
    if "input_ids" not in batch:
        raise NNError(f"the batch has keys {sorted(batch)}: it needs input_ids "
                      "(and optionally attention_mask and labels)")
    device = input_device(model)
    ids = batch["input_ids"].to(device)
    if ids.dim() != 2:
        raise NNError(f"input_ids must be 2-D (batch, tokens), got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    labels = batch.get("labels")
    if labels is not None and tuple(labels.shape) != tuple(ids.shape):
        raise NNError(f"labels have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}: "
                      "give one label per token (-100 = no loss)")
    labels = causal_labels(ids if labels is None else labels.to(device), mask)
    extra = {}
    if bool((mask[:, 0] == 0).any()) and _takes_position_ids(model):
        # left padding: positions count from each row's first real token, as in an
        # unpadded run (matters for absolute position embeddings, e.g. GPT-2)
        extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
    return logits[:, :-1].float(), labels[:, 1:].to(logits.device)


def summed_nll(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(NLL_sum, n_tokens)`` of ``batch`` under ``model`` (see the module docs).

    ``batch``: ``input_ids`` (B, T), optional ``attention_mask`` (0 = padding, left or
    right) and ``labels`` (unshifted, -100 = no loss; default: the ids). Runs the model
    with autograd as the caller's mode allows: ``NLL_sum`` is a 0-d float32 tensor on the
    logits' device, differentiable w.r.t. the parameters. Left-padded rows get position
    ids counted from their first real token, so padding does not change any row's loss.
    To weigh every token equally over many batches, add the sums and divide by the total
    count (a mean of batch means would overweight short batches).
    """
    pred, targets = _forward(model, batch)
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def per_row_nll(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll (B,), n_tokens (B,))``: each row's summed NLL (float32, with grad as the
    caller's mode allows) and its number of loss tokens (int64, CPU). A row with no loss
    token has nll 0 and count 0; its mean is the caller's choice."""
    pred, targets = _forward(model, batch)
    each = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    keep = targets != IGNORE_INDEX
    return (each * keep).sum(-1), keep.sum(-1).cpu()


def _takes_position_ids(model: nn.Module) -> bool:
    import inspect

    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
