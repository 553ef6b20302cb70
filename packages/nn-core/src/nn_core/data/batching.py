"""Padding and length-grouped batching of tokenized features."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from nn_core.data.specs import IGNORE_INDEX
from nn_core.errors import NNError


def collate(features: Sequence, pad_id: int | None, padding_side: str = "right") -> dict:
    """Pad features to one batch: LongTensors ``input_ids``, ``attention_mask``, ``labels``.

    A feature is a dict with ``input_ids`` and optionally ``labels`` (default: the ids
    themselves), or a plain list of ids. Padding positions get ``pad_id`` in
    ``input_ids``, 0 in ``attention_mask`` and -100 in ``labels``.
    """
    import torch

    if pad_id is None:
        raise NNError("no padding id: the tokenizer has no pad token (set tokenizer.pad_token)")
    if padding_side not in ("right", "left"):
        raise NNError(f"padding_side must be 'right' or 'left', got '{padding_side}'")
    if not features:
        raise NNError("cannot collate an empty batch")
    ids_list, labels_list = [], []
    for f in features:
        ids = f["input_ids"] if isinstance(f, dict) else f
        labels = f.get("labels", ids) if isinstance(f, dict) else ids
        ids = [int(x) for x in ids]
        labels = [int(x) for x in labels]
        if len(labels) != len(ids):
            raise NNError(f"labels ({len(labels)}) and input_ids ({len(ids)}) differ in length: "
                          "give one label per token")
        ids_list.append(ids)
        labels_list.append(labels)
    width = max(len(x) for x in ids_list)
    n = len(ids_list)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(zip(ids_list, labels_list, strict=True)):
        if not ids:
            continue
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention[row, span] = 1
        labels[row, span] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _length(feature) -> int:
    return len(feature["input_ids"] if isinstance(feature, dict) else feature)


def batches(features: Sequence, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            sort_by_length: bool = False, pad_id: int | None, padding_side: str = "right",
            drop_last: bool = False) -> Iterator[dict]:
    """Yield collated batches of ``batch_size`` features.

    ``shuffle`` permutes the features with ``seed``. ``sort_by_length`` groups features of
    similar length (longest first) to save padding; combined with ``shuffle``, the order of
    the batches is shuffled instead of their contents. ``drop_last`` drops a short final
    batch.
    """
    if batch_size < 1:
        raise NNError(f"batch size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(features)))
    if shuffle:
        rng.shuffle(order)
    if sort_by_length:
        order.sort(key=lambda i: -_length(features[i]))
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    if shuffle and sort_by_length:
        rng.shuffle(chunks)
    for chunk in chunks:
        yield collate([features[i] for i in chunk], pad_id, padding_side)
