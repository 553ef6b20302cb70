"""Text corpora: documents, held-out splits, tokenization and equal token blocks."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from nn_core.data.readers import _data_files, _hub_records, _read_records
from nn_core.data.specs import TEXT_FIELDS, TEXT_SUFFIXES, resolve_text_spec
from nn_core.errors import NNError


def _pick_text_field(records: list, where: str, text_field: str | None) -> str | None:
    """The record field holding the text; ``None`` when the records are plain strings."""
    first = next((r for r in records if r is not None), None)
    if isinstance(first, str):
        return None
    if not isinstance(first, dict):
        raise NNError(f"{where}: records must be objects or strings, found {type(first).__name__}")
    fields = list(first)
    if text_field is not None:
        if text_field not in first:
            raise NNError(f"{where} has no field '{text_field}' (fields: {', '.join(fields)}): "
                          "pass --text-field with one of them")
        return text_field
    for name in TEXT_FIELDS:
        if isinstance(first.get(name), str):
            return name
    strings = [k for k, v in first.items() if isinstance(v, str)]
    if len(strings) == 1:
        return strings[0]
    raise NNError(f"{where}: no text field found (fields: {', '.join(fields)}): pass "
                  "--text-field with the one that holds the text")


def _paragraphs(text: str) -> list[str]:
    return [block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def load_texts(spec: str | Path, *, text_field: str | None = None,
               limit: int | None = None) -> list[str]:
    """Load a text corpus as a list of non-empty documents.

    ``spec``: ``pydoc`` (one document per topic of ``pydoc_data.topics``, in key order), a
    ``.txt`` file (one document per blank-line-separated block), a ``.json``/``.jsonl``/
    ``.csv``/``.parquet`` file of records or strings, a folder of such files (read in
    sorted path order), or a hub dataset name. The text field of records is ``text_field``
    or the first of :data:`TEXT_FIELDS` present (or the only string field). ``limit``
    keeps the first ``limit`` documents.
    """
    if limit is not None and limit < 1:
        raise NNError(f"limit must be at least 1, got {limit}")
    src = resolve_text_spec(spec)
    docs: list[str] = []
    if src.kind == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[key] for key in sorted(topics)]
    elif src.kind == "hub":
        records = _hub_records(src, limit)
        if records:
            field = _pick_text_field(records, f"hub dataset '{src.spec}'", text_field)
            docs = [r if field is None else r.get(field) for r in records]
    else:
        for file in _data_files(src.path, TEXT_SUFFIXES):
            if file.suffix.lower() == ".txt":
                docs.extend(_paragraphs(file.read_text(encoding="utf-8")))
            else:
                records = _read_records(file)
                if records:
                    field = _pick_text_field(records, str(file), text_field)
                    docs.extend(r if field is None else r.get(field) for r in records)
            if limit is not None and len(docs) >= limit:
                break
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise NNError(f"no text found in '{src.spec}': check the file has non-empty text "
                      "(or pass --text-field)")
    return docs


def split_texts(texts: Sequence[str], heldout_fraction: float,
                seed: int) -> tuple[list[str], list[str]]:
    """Split documents into ``(train, heldout)``: disjoint, deterministic given ``seed``.

    Whole documents go to one side, and identical documents go to the same side, so no
    held-out text is ever seen in training. The held-out side gets
    ``round(heldout_fraction * n_unique)`` distinct documents (at least one when the
    fraction is positive); both sides keep the corpus order.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise NNError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    unique = list(dict.fromkeys(texts))
    n_held = 0 if heldout_fraction == 0 else max(1, round(heldout_fraction * len(unique)))
    if n_held >= len(unique):
        raise NNError(f"cannot hold out {heldout_fraction:.0%} of {len(unique)} distinct "
                      "documents and keep any for training: give more data or a smaller fraction")
    held = set(random.Random(seed).sample(unique, n_held))
    train = [t for t in texts if t not in held]
    heldout = [t for t in texts if t in held]
    return train, heldout


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends a BOS token when asked for special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _encode(tokenizer, texts: Sequence[str], *, bos: bool) -> list[list[int]]:
    """Token ids without special tokens, with the BOS id prepended when ``bos`` (unless
    the text already starts with the BOS string, as some chat templates write it)."""
    if not texts:
        return []
    # verbose=False: long documents are expected here; blocks are cut afterwards.
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    if not bos:
        return [list(x) for x in ids]
    bos_id, bos_str = tokenizer.bos_token_id, tokenizer.bos_token
    return [list(x) if (bos_str and t.startswith(bos_str)) else [bos_id, *x]
            for t, x in zip(texts, ids, strict=True)]


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text: no special tokens except the tokenizer's own BOS (if it
    adds one). ``max_length`` truncates from the end."""
    ids = _encode(tokenizer, texts, bos=_adds_bos(tokenizer))
    if max_length is not None:
        if max_length < 1:
            raise NNError(f"max_length must be at least 1, got {max_length}")
        ids = [x[:max_length] for x in ids]
    return ids


def token_blocks(tokenizer, texts: Sequence[str], block_len: int, n_blocks: int | None = None,
                 seed: int | None = None):
    """A LongTensor ``(n, block_len)`` of consecutive tokens of the corpus.

    The documents' ids (:func:`tokenize_texts`) are joined with the EOS id between them
    and the stream is cut into ``floor(total / block_len)`` full blocks; the remainder is
    dropped. ``n_blocks=None`` returns every block; otherwise ``n_blocks`` distinct blocks
    are drawn without replacement (with ``seed``, uniformly at random; without, the first
    ones), returned in corpus order.
    """
    import torch

    if block_len < 1:
        raise NNError(f"block length must be at least 1, got {block_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise NNError("the tokenizer has no EOS token to separate documents: use a model "
                      "whose tokenizer defines eos_token")
    stream: list[int] = []
    for i, ids in enumerate(tokenize_texts(tokenizer, texts)):
        if i:
            stream.append(eos)
        stream.extend(ids)
    available = len(stream) // block_len
    if available == 0:
        raise NNError(f"the text has {len(stream)} tokens, fewer than one block of {block_len}: "
                      "give more text or a shorter block length")
    chosen = list(range(available))
    if n_blocks is not None:
        if n_blocks < 1 or n_blocks > available:
            raise NNError(f"asked for {n_blocks} blocks of {block_len} tokens but the text holds "
                          f"{available}: ask for 1..{available} or give more text")
        chosen = sorted(random.Random(seed).sample(chosen, n_blocks)) if seed is not None \
            else chosen[:n_blocks]
    flat = torch.tensor(stream[: available * block_len], dtype=torch.long).view(available, block_len)
    return flat[chosen].clone() if n_blocks is not None else flat


def sample(items: Sequence, n: int | None, seed: int) -> list:
    """``n`` distinct items drawn uniformly without replacement, reproducible by ``seed``
    (``n=None``: all items, in order)."""
    if n is None:
        return list(items)
    if n < 0 or n > len(items):
        raise NNError(f"asked for {n} items but {len(items)} are available: ask for at most "
                      f"{len(items)} or give more data")
    return [items[i] for i in random.Random(seed).sample(range(len(items)), n)]
