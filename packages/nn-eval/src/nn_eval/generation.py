"""Greedy generation and exact-match scoring of instruction data.

Prompts are left-padded into batches (so every row's next token sits in the last
column), with ``position_ids = cumsum(attention_mask) - 1`` so a padded row sees the same
positions as the prompt alone. Decoding is greedy with the key/value cache; a row stops
at an end-of-sequence token (the tokenizer's and the model's EOS, plus the chat
template's end-of-turn token when the vocabulary has one) or when its decoded text holds
one of the stop strings, which is cut off together with everything after it.

    accuracy = (1/N) * sum_i [norm(prediction_i) == norm(reference_i)]

where ``norm`` applies the chosen normalisations in the order of :data:`NORMALIZERS`.
Instruction examples are rendered with the model's chat template through
``nn_core.data.render`` (the plain ``### Instruction`` layout when it has none).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nn_core.device import input_device
from nn_core.errors import NNError
from nn_eval._model import eval_mode, pad_id_of

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

NORMALIZERS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lowercase": str.lower,
    "strip_punctuation": lambda s: _PUNCT.sub("", s),
    "collapse_whitespace": lambda s: re.sub(r"\s+", " ", s).strip(),
}
"""Answer normalisations by name: surrounding whitespace, case, ASCII punctuation, runs of
whitespace (collapsed to one space, ends stripped)."""

DEFAULT_NORMALIZE = ("strip", "collapse_whitespace")
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def normalize(text: str, options: Sequence[str] = DEFAULT_NORMALIZE) -> str:
    """``text`` with the named normalisations applied (order of :data:`NORMALIZERS`)."""
    unknown = [o for o in options if o not in NORMALIZERS]
    if unknown:
        raise NNError(f"unknown normalisation {', '.join(unknown)}: use {', '.join(NORMALIZERS)}")
    for name, fn in NORMALIZERS.items():
        if name in options:
            text = fn(text)
    return text


def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """EOS ids of the tokenizer and the model, and the chat template's end-of-turn token."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    gen = getattr(model, "generation_config", None)
    g_eos = getattr(gen, "eos_token_id", None)
    if isinstance(g_eos, int):
        ids.add(g_eos)
    elif isinstance(g_eos, (list, tuple)):
        ids.update(int(x) for x in g_eos)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if getattr(tokenizer, "chat_template", None):
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return ids


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                    batch_size: int = 8, stop: Sequence[str] = (),
                    progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The greedy continuation of each prompt (special tokens removed, cut at a stop string)."""
    from nn_core.data import tokenize_texts

    if max_new_tokens < 1:
        raise NNError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if batch_size < 1:
        raise NNError(f"batch_size={batch_size} must be at least 1")
    if not prompts:
        raise NNError("no prompts to generate from: the data are empty")
    encoded = tokenize_texts(tokenizer, list(prompts))
    for i, ids in enumerate(encoded):
        if not ids:
            raise NNError(f"prompt {i} is empty: give every example a prompt")
    eos = stop_token_ids(model, tokenizer)
    pad = pad_id_of(tokenizer)
    device = input_device(model)
    order = sorted(range(len(encoded)), key=lambda k: (-len(encoded[k]), k))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[str] = [""] * len(encoded)
    with eval_mode(model), torch.inference_mode():
        for b, idx in enumerate(batches):
            rows = [encoded[k] for k in idx]
            for k, text in zip(idx, _generate_batch(model, tokenizer, rows, max_new_tokens, eos, stop,
                                                    pad, device), strict=True):
                out[k] = text
            if progress is not None:
                progress(b + 1, len(batches))
    return out


def _generate_batch(model, tokenizer, rows, max_new_tokens, eos, stop, pad, device) -> list[str]:
    n = len(rows)
    width = max(len(r) for r in rows)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    generated: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]
        if not bool(torch.isfinite(logits).all()):
            raise NNError(f"non-finite logits while generating token {step}: try --dtype float32")
        nxt = logits.argmax(-1)
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok in eos:
                done[i] = True
                continue
            generated[i].append(tok)
            if stop and _cut(tokenizer.decode(generated[i], skip_special_tokens=True), stop)[1]:
                done[i] = True
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding a pad token; their output is no longer read.
        feed = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, pad), nxt)
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return [_cut(tokenizer.decode(g, skip_special_tokens=True), stop)[0] for g in generated]


def _as_pairs(tokenizer, examples, chat_template: bool) -> list[tuple[str, str]]:
    from nn_core.data import Example, parse_records, render

    if not examples:
        raise NNError("no examples to score: the data are empty")
    if isinstance(examples[0], dict):
        examples = parse_records(list(examples))
    pairs = []
    for i, ex in enumerate(examples):
        if isinstance(ex, Example):
            if chat_template:
                prompt = render(tokenizer, ex)[0]
            else:
                prompt = ex.prompt
            pairs.append((prompt, ex.response))
        elif isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(x, str) for x in ex):
            pairs.append((ex[0], ex[1]))
        else:
            raise NNError(f"example {i} is a {type(ex).__name__}: give instruction records, "
                          "nn_core.data.Example objects or (prompt, reference) pairs")
    if not pairs:
        raise NNError("no examples with both a prompt and a response: check the data")
    return pairs


def exact_match(model: nn.Module, tokenizer, examples, *, max_new_tokens: int = 64, batch_size: int = 8,
                stop: Sequence[str] = (), normalize_with: Sequence[str] = DEFAULT_NORMALIZE,
                chat_template: bool = True,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy generation scored by exact match (see module docs).

    ``examples``: instruction records (alpaca, sharegpt, dolly, simple), ``Example``
    objects (rendered with the chat template unless ``chat_template=False``), or raw
    ``(prompt, reference)`` pairs used as they are.
    Returns ``{"accuracy", "n", "n_correct", "predictions": [{prompt, prediction,
    reference, correct}]}``.
    """
    normalize("", normalize_with)  # fail on an unknown option before any generation
    pairs = _as_pairs(tokenizer, examples, chat_template)
    preds = greedy_generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                            batch_size=batch_size, stop=stop, progress=progress)
    rows = []
    for (prompt, ref), pred in zip(pairs, preds, strict=True):
        ok = normalize(pred, normalize_with) == normalize(ref, normalize_with)
        rows.append({"prompt": prompt, "prediction": pred, "reference": ref, "correct": ok})
    n_correct = sum(r["correct"] for r in rows)
    return {"accuracy": n_correct / len(rows), "n": len(rows), "n_correct": n_correct,
            "predictions": rows}
