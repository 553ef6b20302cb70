r"""Language-model metrics: negative log-likelihood, perplexity and top-1 token accuracy.

For a sequence of tokens x_0 .. x_{n-1} a causal LM predicts x_t from x_{<t}, so the
sequence contributes n-1 predicted tokens (fewer where labels are -100). Over all scored
tokens T of the data,

    nll       = (1/|T|) * sum_{t in T} -log p(x_t | context_t)        (float64 sum, on CPU)
    ppl       = exp(nll)
    token_acc = (1/|T|) * sum_{t in T} [argmax_v p(v | context_t) == x_t]

A sequence longer than ``max_length`` is cut into overlapping windows of ``max_length``
tokens: the first window scores its tokens 1..max_length-1, each next window ends
``stride`` tokens further and scores only those new tokens, with the rest of the window
as context (the strided-perplexity scheme of the Hugging Face docs, with the last window
also kept full length). Every token after the first is scored exactly once.

The first token of a document: ``first_token="skip"`` (default) leaves x_0 unscored, as
above; ``first_token="prefix"`` follows lm-evaluation-harness's rolling log-likelihood
and prepends a prefix token p (the tokenizer's BOS if it has one, else its EOS), so x_0
is scored as -log p(x_0 | p). A sequence that already starts with the tokenizer's BOS
(its own encoding adds one) gets no second prefix: both conventions then agree.

With texts, lm-eval's per-document normalisations are reported too. With LL = -sum of the
scored NLLs, W = sum over scored documents of len(re.split(r"\s+", doc)) and B = sum of
their UTF-8 byte counts:

    word_perplexity = exp(-LL / W),  byte_perplexity = exp(-LL / B),
    bits_per_byte   = -LL / (B * ln 2)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nn_core.data import IGNORE_INDEX, tokenize_texts
from nn_core.device import input_device
from nn_core.errors import NNError
from nn_core.numerics.loss import token_scores
from nn_eval._model import (
    effective_max_length,
    eval_mode,
    pad_id_of,
    run_with_intervention,
)

IGNORE = IGNORE_INDEX
FIRST_TOKEN = ("skip", "prefix")


class NonFiniteLogits(NNError):
    """The model produced NaN/inf logits (e.g. after a weight perturbation); callers that
    study destructive interventions catch this and record the result as non-finite."""
_DICT_KEYS = ("input_ids", "labels", "attention_mask")


@dataclass
class _Segment:
    seq: int            # index of the source sequence in ``data``
    ids: list[int]
    labels: list[int]   # target at each position; labels[0] is never scored (no context)


def evaluate_lm(
    model: nn.Module,
    tokenizer,
    data,
    *,
    max_length: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    intervention=None,
    progress: Callable[[int, int], None] | None = None,
    allow_empty: bool = False,
    first_token: str = "skip",
) -> dict:
    """NLL, perplexity and token accuracy of ``model`` on ``data`` (see module docs).

    ``data``: a list of texts (needs ``tokenizer``), of token-id lists, or of dicts with
    ``input_ids`` and optional ``labels`` (-100 = not scored) and ``attention_mask``
    (0 = padding, dropped); a 2-D LongTensor counts as a list of rows.
    ``stride``: new tokens scored per window after the first; default ``max_length // 2``.
    ``intervention``: a context manager or a zero-argument factory of one (e.g.
    ``lambda: mask_neurons(model, ns, "lesion")``). Then the result is
    ``{"baseline": ..., "intervened": ..., "delta": {"ppl", "nll", "token_acc"}}``
    (delta = intervened - baseline) and the model is left as it was.
    ``progress``: called as ``progress(batches_done, batches_total)``.
    ``max_length`` is clamped to the model's position limit (``max_position_embeddings``
    or ``n_positions``); the value used is reported as ``"max_length"``.

    Returns ``{"ppl", "nll", "token_acc", "n_tokens", "n_sequences", "n_skipped",
    "max_length"}``; sequences with nothing to score (fewer than 2 tokens, or all labels
    -100) are skipped and counted in ``n_skipped``. When nothing at all is scorable this
    raises NNError, unless ``allow_empty`` is true: then ``ppl``, ``nll`` and ``token_acc``
    are None and ``n_tokens`` is 0 (a task with no evaluation tokens, reported as such).

    ``first_token``: ``"skip"`` (x_0 of each sequence is context only) or ``"prefix"``
    (lm-eval's convention: x_0 is scored after the tokenizer's BOS, else EOS; see the
    module docs). The result records it as ``"first_token"`` with the
    ``"prefix_token_id"`` used (None with ``"skip"``). When ``data`` are all texts the
    result also has ``"word_perplexity"``, ``"byte_perplexity"``, ``"bits_per_byte"``,
    ``"n_words"`` and ``"n_bytes"`` over the scored documents (lm-eval's definitions, in
    the module docs); with token ids these are None.
    """
    if max_length < 2:
        raise NNError(f"max_length={max_length} is too small: use at least 2 tokens")
    requested = max_length
    max_length = effective_max_length(model, max_length)
    clamped = "" if max_length == requested else (
        f" (max_length {requested} was clamped to the model's {max_length} positions)")
    if stride is None:
        stride = max(1, max_length // 2)
    if not 1 <= stride <= max_length - 1:
        raise NNError(
            f"stride={stride} must be between 1 and max_length-1={max_length - 1}{clamped} "
            "so every window scores new tokens with some context"
        )
    if batch_size < 1:
        raise NNError(f"batch_size={batch_size} must be at least 1")
    if first_token not in FIRST_TOKEN:
        raise NNError(f"first_token={first_token!r} is unknown: use 'skip' (first token of a "
                      "document unscored) or 'prefix' (scored after BOS/EOS, as lm-eval does)")
    sequences = sequences_from_data(tokenizer, data)
    prefix = None
    if first_token == "prefix":
        prefix = prefix_token_id(tokenizer)
        sequences = [with_prefix(ids, labels, prefix, getattr(tokenizer, "bos_token_id", None))
                     for ids, labels in sequences]
    doc_sizes = text_sizes(data)
    _check_vocab(model, sequences)
    segments, skipped = make_segments(sequences, max_length, stride)
    if not segments and not allow_empty:
        raise NNError(
            f"nothing to score: all {len(sequences)} sequences have fewer than 2 tokens "
            "or no labelled tokens; pass longer texts"
        )

    def run() -> dict:
        if segments:
            out = _score(model, segments, pad_id_of(tokenizer), batch_size, progress)
        else:
            out = {"ppl": None, "nll": None, "token_acc": None, "n_tokens": 0, "nll_sum": 0.0}
        out["n_sequences"] = len(sequences) - skipped
        out["n_skipped"] = skipped
        out["max_length"] = max_length
        out["first_token"] = first_token
        out["prefix_token_id"] = prefix
        out.update(_per_text_metrics(out.pop("nll_sum"), doc_sizes, {g.seq for g in segments}))
        return out

    if intervention is None:
        return run()
    baseline, changed = run_with_intervention(model, intervention, run)
    delta = {k: None if baseline[k] is None else changed[k] - baseline[k]
             for k in ("ppl", "nll", "token_acc")}
    return {"baseline": baseline, "intervened": changed, "delta": delta, "max_length": max_length,
            "first_token": first_token}


def prefix_token_id(tokenizer) -> int:
    """lm-eval's prefix token for rolling log-likelihoods: BOS if the tokenizer has one,
    else EOS; raises NNError when it has neither."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    raise NNError("first_token='prefix' needs the tokenizer's BOS or EOS token and it has "
                  "neither (or no tokenizer was given): pass the tokenizer or use first_token='skip'")


def with_prefix(ids: list[int], labels: list[int] | None, prefix: int,
                bos: int | None) -> tuple[list[int], list[int] | None]:
    """``ids`` with ``prefix`` prepended (its label -100), unless they already start with
    ``bos`` (then the first real token is already scored after BOS)."""
    if ids and bos is not None and ids[0] == bos:
        return ids, labels
    return [prefix, *ids], None if labels is None else [IGNORE, *labels]


def text_sizes(data) -> list[tuple[int, int]] | None:
    r"""``[(words, UTF-8 bytes)]`` per document when ``data`` are all texts, else None.

    Words are counted as lm-eval does: ``len(re.split(r"\s+", doc))`` (so leading or
    trailing whitespace adds an empty "word", and an empty text counts as 1 word)."""
    if isinstance(data, torch.Tensor) or not isinstance(data, Sequence) or isinstance(data, str):
        return None
    if not data or not all(isinstance(x, str) for x in data):
        return None
    return [(len(re.split(r"\s+", doc)), len(doc.encode("utf-8"))) for doc in data]


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def _per_text_metrics(nll_sum: float, sizes, scored: set[int]) -> dict:
    """Word/byte perplexity and bits per byte over the scored documents (module docs)."""
    if sizes is None or not scored:
        return {"word_perplexity": None, "byte_perplexity": None, "bits_per_byte": None,
                "n_words": None if sizes is None else 0, "n_bytes": None if sizes is None else 0}
    words = sum(sizes[i][0] for i in scored)
    n_bytes = sum(sizes[i][1] for i in scored)
    return {
        "word_perplexity": _exp(nll_sum / words),
        "byte_perplexity": _exp(nll_sum / n_bytes) if n_bytes else None,
        "bits_per_byte": nll_sum / (n_bytes * math.log(2)) if n_bytes else None,
        "n_words": words,
        "n_bytes": n_bytes,
    }


# --------------------------------------------------------------------------- inputs
def sequences_from_data(tokenizer, data) -> list[tuple[list[int], list[int] | None]]:
    """Normalise ``data`` to ``[(input_ids, labels or None)]``; raises NNError on bad input."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise NNError(f"a tensor of token ids must be 2-D (sequences, tokens), got shape {tuple(data.shape)}")
        data = list(data)
    if isinstance(data, (str, dict)) or not isinstance(data, Sequence | list):
        raise NNError(
            f"data must be a list of texts, token-id lists or dicts with input_ids, "
            f"not {type(data).__name__}"
        )
    if len(data) == 0:
        raise NNError("no data to evaluate: the list is empty; pass at least one text or sequence")

    texts = [i for i, x in enumerate(data) if isinstance(x, str)]
    encoded: dict[int, list[int]] = {}
    if texts:
        if tokenizer is None:
            raise NNError("data are texts but no tokenizer was given: pass the model's tokenizer")
        ids = tokenize_texts(tokenizer, [data[i] for i in texts])
        encoded = dict(zip(texts, ids, strict=True))

    out: list[tuple[list[int], list[int] | None]] = []
    for i, item in enumerate(data):
        if i in encoded:
            out.append((list(encoded[i]), None))
        elif isinstance(item, dict):
            out.append(_from_dict(i, item))
        else:
            out.append((_as_ids(item, f"sequence {i}"), None))
    return out


def _as_ids(x, what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.is_floating_point():
            raise NNError(f"{what} must be a 1-D integer tensor, got {x.dtype} of shape {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
            raise NNError(f"{what} must hold integer token ids only")
        return list(x)
    raise NNError(
        f"{what} is a {type(x).__name__}: items must be texts, token-id lists or dicts with input_ids"
    )


def _from_dict(i: int, item: dict) -> tuple[list[int], list[int] | None]:
    unknown = sorted(set(item) - set(_DICT_KEYS))
    if unknown or "input_ids" not in item:
        raise NNError(
            f"sequence {i} has fields {sorted(item)}: expected input_ids with optional "
            "labels and attention_mask"
        )
    ids = _as_ids(item["input_ids"], f"input_ids of sequence {i}")
    labels = _as_ids(item["labels"], f"labels of sequence {i}") if item.get("labels") is not None else None
    if labels is not None and len(labels) != len(ids):
        raise NNError(f"sequence {i} has {len(ids)} input_ids but {len(labels)} labels: they must match")
    if item.get("attention_mask") is not None:
        mask = _as_ids(item["attention_mask"], f"attention_mask of sequence {i}")
        if len(mask) != len(ids):
            raise NNError(f"sequence {i} has {len(ids)} input_ids but {len(mask)} attention_mask entries")
        keep = [k for k, m in enumerate(mask) if m]
        ids = [ids[k] for k in keep]
        labels = None if labels is None else [labels[k] for k in keep]
    return ids, labels


def _check_vocab(model: nn.Module, sequences) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if n is None:
        return
    for i, (ids, _) in enumerate(sequences):
        if ids and (max(ids) >= n or min(ids) < 0):
            raise NNError(
                f"sequence {i} has token id {max(ids) if max(ids) >= n else min(ids)} outside the "
                f"model's vocabulary of {n}: tokenize with the model's own tokenizer"
            )


def make_segments(sequences, max_length: int, stride: int) -> tuple[list[_Segment], int]:
    """Cut sequences into scoring windows; returns ``(segments, n_skipped)``."""
    segments: list[_Segment] = []
    skipped = 0
    for s, (ids, labels) in enumerate(sequences):
        labels = ids if labels is None else labels
        if len(ids) < 2 or all(v == IGNORE for v in labels[1:]):
            skipped += 1
            continue
        n = len(ids)
        end = min(n, max_length)
        segments.append(_Segment(s, ids[:end], list(labels[:end])))
        while end < n:
            new_end = min(end + stride, n)
            begin = new_end - max_length
            # Positions begin..end-1 are context only; end..new_end-1 are the new targets.
            seg_labels = [IGNORE] * (end - begin) + list(labels[end:new_end])
            segments.append(_Segment(s, ids[begin:new_end], seg_labels))
            end = new_end
    return segments, skipped


# --------------------------------------------------------------------------- scoring
def _score(model, segments: list[_Segment], pad_id: int, batch_size: int, progress) -> dict:
    device = input_device(model)
    # Longest first: padding stays small and an out-of-memory error shows up at once.
    order = sorted(range(len(segments)), key=lambda k: (-len(segments[k].ids), k))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    total_nll = 0.0
    n_tokens = 0
    n_correct = 0
    with eval_mode(model), torch.inference_mode():
        for b, idx in enumerate(batches):
            width = len(segments[idx[0]].ids)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
            for r, k in enumerate(idx):
                seg = segments[k]
                ids[r, : len(seg.ids)] = torch.tensor(seg.ids)
                labels[r, : len(seg.labels)] = torch.tensor(seg.labels)
            # Right padding under a causal mask never reaches a real position, so no
            # attention_mask is passed: the fast causal attention path stays in use.
            logits = model(input_ids=ids.to(device), use_cache=False).logits
            targets = labels[:, 1:].to(device)
            keep = targets != IGNORE
            pred = logits[:, :-1]
            if int(keep.sum()) * 2 < keep.numel():
                # Mostly context (sliding windows) or padding: score only the kept rows.
                pred, tgt = pred[keep], targets[keep]
            else:
                # Mostly scored: work on the logits in place instead of copying rows out.
                tgt = targets.clamp(min=0)
            logp, hit = token_scores(pred, tgt)
            nll = -logp
            if nll.dim() == 2:
                nll, hit, tgt = nll[keep], hit[keep], tgt[keep]
            if not bool(torch.isfinite(nll).all()):
                seqs = sorted({segments[k].seq for k in idx})
                raise NonFiniteLogits(
                    f"non-finite logits in batch {b} (sequences {_short(seqs)}): the model "
                    "produced NaN/inf; try --dtype float32 or check the intervention"
                )
            # float64 sum on the CPU: some devices (Apple MPS) have no float64.
            total_nll += float(nll.cpu().double().sum())
            n_correct += int(hit.sum())
            n_tokens += int(tgt.numel())
            if progress is not None:
                progress(b + 1, len(batches))
    mean = total_nll / n_tokens
    return {
        "ppl": _exp(mean),
        "nll": mean,
        "token_acc": n_correct / n_tokens,
        "n_tokens": n_tokens,
        "nll_sum": total_nll,
    }


def _short(items: list[int], limit: int = 8) -> str:
    head = ", ".join(str(v) for v in items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")
