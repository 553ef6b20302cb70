"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness defines it.

An item has a context c, choices s_1..s_m and a gold index g. Each choice is scored as
the continuation ``" " + s_i`` of c:

    ll_i     = sum_t log p(y_t | c, y_{<t})         (y = tokens of the continuation)
    acc      = [argmax_i ll_i == g]
    acc_norm = [argmax_i ll_i / len(s_i) == g]      (len in characters of the choice text)

Tokenization follows the harness: trailing whitespace of the context moves to the
continuation, the pair is encoded whole and the continuation is what follows the
context's own tokens; an empty context is replaced by the BOS token (EOS where the
tokenizer has no BOS); inputs longer than
``max_length`` lose tokens on the left.

Every choice of an item shares its context: when one choice's input (context plus all
but the last continuation token) is a prefix of another's, its log-probabilities are
read from the same forward row (single-token answers such as MMLU's A-D cost one row per
question). Rows are batched longest first and right-padded.

Records (local JSONL, JSON or CSV): ``question``, then either a
``choices`` list or columns ``A``, ``B``, ``C``, ``D`` (more letters allowed), and
``answer`` as an index, a letter or the text of the right choice. Prompt styles:

* ``plain``: context ``"Question: {question}\\nAnswer:"``, choices scored as their text;
* ``mmlu``: the harness's MMLU layout, ``"{question}\\nA. ..\\nB. ..\\nAnswer:"`` (after
  ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``
  when a ``subject`` field exists) with the letters as choices.

``auto`` picks ``mmlu`` for records with a ``subject`` or letter columns, else ``plain``.

A string answer that reads as an index or a letter and is also the text of a different
choice (choices ``"1", "2", "3"``, answer ``"2"``) is refused as ambiguous.
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nn_core.device import input_device
from nn_core.errors import NNError
from nn_eval._model import effective_max_length, eval_mode, pad_id_of

STYLES = ("auto", "plain", "mmlu")
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: the ``context``, the ``choices`` as scored and the ``gold`` index."""

    context: str
    choices: tuple[str, ...]
    gold: int


# --------------------------------------------------------------------------- records
def _letter_columns(record: dict) -> list[str]:
    cols = []
    for letter in LETTERS:
        if letter not in record:
            break
        cols.append(letter)
    return cols


def _gold(answer, choices: Sequence[str], where: str) -> int:
    n = len(choices)
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, (int, np.integer)) or (isinstance(answer, float) and float(answer).is_integer()):
        idx = int(answer)
    elif isinstance(answer, str) and ((answer.strip().isascii() and answer.strip().isdigit()) or (
            len(answer.strip()) == 1 and answer.strip().upper() in LETTERS)):
        key = answer.strip()
        idx = int(key) if key.isascii() and key.isdigit() else LETTERS.index(key.upper())
        # Also the text of another choice (choices "1", "2", "3", answer "2"): it could
        # mean either, so refuse to guess.
        texts = [c.strip() for c in choices]
        if key in texts and texts.index(key) != idx:
            raise NNError(
                f"{where}: answer {answer!r} is ambiguous, an index or letter and also the text "
                f"of choice {texts.index(key)}: give the letter ({LETTERS[texts.index(key)]}) "
                "or an integer index (a JSON number)"
            )
    elif isinstance(answer, str) and answer in choices:
        idx = list(choices).index(answer)
    else:
        raise NNError(f"{where}: answer {answer!r} is not an index, a letter or one of the choices")
    if not 0 <= idx < n:
        raise NNError(f"{where}: answer {answer!r} is out of range for {n} choices")
    return idx


def mc_items(records: Sequence, *, style: str = "auto") -> list[MCItem]:
    """Items from records with ``question``, ``choices`` or ``A``-``D``, and ``answer``."""
    if style not in STYLES:
        raise NNError(f"unknown prompt style '{style}': use {', '.join(STYLES)}")
    if not records:
        raise NNError("no multiple-choice records: the data are empty")
    items = []
    for r, rec in enumerate(records):
        where = f"record {r}"
        if not isinstance(rec, dict):
            raise NNError(f"{where} is a {type(rec).__name__}: multiple-choice records must be objects")
        letters = _letter_columns(rec)
        if "question" not in rec or "answer" not in rec or ("choices" not in rec and len(letters) < 2):
            raise NNError(
                f"{where} has fields {', '.join(map(str, rec))}: expected question, choices "
                "(a list) or columns A, B, C, D, and answer"
            )
        if "choices" in rec:
            choices = rec["choices"]
            if isinstance(choices, np.ndarray):
                choices = choices.tolist()
            if not isinstance(choices, (list, tuple)) or len(choices) < 2:
                raise NNError(f"{where}: choices must be a list of at least 2 options")
        else:
            choices = [rec[c] for c in letters]
        choices = [str(c) for c in choices]
        gold = _gold(rec["answer"], choices, where)
        question = str(rec["question"])
        # The MMLU layout (a subject, or letter columns) gets the MMLU prompt even when a
        # choices list is given too (as in the hub's cais/mmlu rows).
        mmlu_like = bool(rec.get("subject")) or len(letters) >= 2
        use = style if style != "auto" else ("mmlu" if mmlu_like else "plain")
        if use == "plain":
            items.append(MCItem(f"Question: {question}\nAnswer:", tuple(choices), gold))
        else:
            if len(choices) > len(LETTERS):
                raise NNError(f"{where}: the mmlu style supports at most {len(LETTERS)} choices")
            head = ""
            if rec.get("subject"):
                head = ("The following are multiple choice questions (with answers) about "
                        f"{str(rec['subject']).replace('_', ' ')}.\n\n")
            lines = "".join(f"{LETTERS[i]}. {c.strip()}\n" for i, c in enumerate(choices))
            items.append(MCItem(f"{head}{question.strip()}\n{lines}Answer:",
                                tuple(LETTERS[: len(choices)]), gold))
    return items


def read_records(path: str | Path) -> list:
    """Records of a local ``.jsonl``, ``.json`` (a list) or ``.csv`` file."""
    path = Path(path)
    if not path.is_file():
        raise NNError(f"data file '{path}' does not exist: pass a local .jsonl, .json or .csv file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise NNError(f"{path} line {lineno} is not valid JSON ({exc.msg}): fix that line") from None
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NNError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): fix the file") from None
        if not isinstance(obj, list):
            raise NNError(f"{path} must hold a JSON list of records")
        return obj
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    raise NNError(f"{path} has an unsupported type: use .jsonl, .json or .csv")


def load_mc(path: str | Path, *, style: str = "auto", limit: int | None = None) -> list[MCItem]:
    """Items from a local JSONL/JSON/CSV file (see :func:`mc_items`); ``limit`` keeps the first."""
    if limit is not None and limit < 1:
        raise NNError(f"limit must be at least 1, got {limit}")
    records = read_records(path)
    if not records:
        raise NNError(f"{path} holds no records: add one multiple-choice question per line")
    return mc_items(records[:limit] if limit is not None else records, style=style)


# --------------------------------------------------------------------------- scoring
def decide(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """acc and acc_norm of one item from its per-choice log-likelihoods."""
    ll = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    if np.any(lengths == 0):
        raise NNError("a choice is empty: acc_norm divides by the choice's length in characters")
    pred = int(np.argmax(ll))
    pred_norm = int(np.argmax(ll / lengths))
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold),
            "acc_norm": float(pred_norm == gold)}


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    from nn_core.data import tokenize_texts

    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx, whole = tokenize_texts(tokenizer, [context, context + continuation])
    cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else []
    if not cont:  # the pair merged across the boundary: encode the continuation alone
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ctx:
        # as lm-eval: an empty context becomes the prefix token, BOS where the tokenizer
        # has one, else EOS
        prefix = next((v for v in (getattr(tokenizer, "bos_token_id", None),
                                   getattr(tokenizer, "eos_token_id", None)) if isinstance(v, int)), None)
        if prefix is None:
            raise NNError("an empty context needs the tokenizer's BOS or EOS token as a prefix, "
                          "and it has neither: give every item a context")
        ctx = [prefix]
    if not cont:
        raise NNError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


@dataclass
class _Request:
    row: int
    cont: list[int]
    end: int  # input length; continuation logits are at positions end-len(cont) .. end-1


def loglikelihoods(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]] | Sequence[Sequence[tuple[str, str]]],
                   *, batch_size: int = 8, max_length: int = 2048,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` per ``(context, continuation)`` pair.

    ``pairs`` may be grouped (a list of lists): forward rows are shared only within a group.
    ``max_length`` is clamped to the model's position limit (see ``nn_eval._model``).
    """
    if max_length < 2:
        raise NNError(f"max_length={max_length} is too small: use at least 2 tokens")
    max_length = effective_max_length(model, max_length)
    if batch_size < 1:
        raise NNError(f"batch_size={batch_size} must be at least 1")
    grouped = [list(g) for g in pairs] if pairs and isinstance(pairs[0], list) else [list(pairs)]
    rows: list[list[int]] = []
    requests: list[_Request] = []
    for group in grouped:
        encoded = []
        for context, continuation in group:
            ctx, cont = _encode_pair(tokenizer, context, continuation)
            if len(cont) > max_length:
                raise NNError(f"a continuation of {len(cont)} tokens does not fit max_length={max_length}")
            # Left truncation keeps the whole continuation and as much context as fits.
            full = (ctx + cont)[-(max_length + 1):]
            encoded.append((full[:-1], cont))
        group_rows: list[int] = []
        order = sorted(range(len(encoded)), key=lambda k: -len(encoded[k][0]))
        slots: dict[int, _Request] = {}
        for k in order:
            inp, cont = encoded[k]
            host = next((r for r in group_rows if rows[r][: len(inp)] == inp), None)
            if host is None:
                rows.append(inp)
                host = len(rows) - 1
                group_rows.append(host)
            slots[k] = _Request(host, cont, len(inp))
        requests.extend(slots[k] for k in range(len(encoded)))

    by_row: dict[int, list[int]] = {}
    for q, req in enumerate(requests):
        by_row.setdefault(req.row, []).append(q)
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r]), r))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    device = input_device(model)
    pad = pad_id_of(tokenizer)
    with eval_mode(model), torch.inference_mode():
        for b, idx in enumerate(batches):
            width = len(rows[idx[0]])
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            for i, r in enumerate(idx):
                ids[i, : len(rows[r])] = torch.tensor(rows[r])
            # Right padding under a causal mask: real positions never see the pads.
            logits = model(input_ids=ids.to(device), use_cache=False).logits
            for i, r in enumerate(idx):
                for q in by_row[r]:
                    req = requests[q]
                    n = len(req.cont)
                    lp = torch.log_softmax(logits[i, req.end - n : req.end].float(), dim=-1)
                    target = torch.tensor(req.cont, device=lp.device)
                    # float64 on the CPU: some devices (Apple MPS) have no float64.
                    ll = lp.gather(1, target[:, None]).cpu().double().sum()
                    if not bool(torch.isfinite(ll)):
                        raise NNError(f"non-finite logits in batch {b}: the model produced NaN/inf; "
                                      "try --dtype float32 or check the intervention")
                    out[q] = (float(ll), bool((lp.argmax(-1) == target).all()))
            if progress is not None:
                progress(b + 1, len(batches))
    return out  # type: ignore[return-value]


def score_multiple_choice(model: nn.Module, tokenizer, items: Sequence[MCItem], *,
                          batch_size: int = 8, max_length: int = 2048,
                          progress: Callable[[int, int], None] | None = None) -> dict:
    """``{"acc", "acc_norm", "n", "max_length", "items": [{gold, pred, pred_norm, acc,
    acc_norm, lls}]}``; ``max_length`` is the value used after clamping to the model's
    position limit."""
    if not items:
        raise NNError("no multiple-choice items to score: the data are empty")
    groups = [[(it.context, " " + c) for c in it.choices] for it in items]
    results = loglikelihoods(model, tokenizer, groups, batch_size=batch_size,
                             max_length=max_length, progress=progress)
    per_item = []
    pos = 0
    for it in items:
        lls = [ll for ll, _ in results[pos : pos + len(it.choices)]]
        pos += len(it.choices)
        per_item.append({"gold": it.gold, **decide(lls, it.choices, it.gold), "lls": lls})
    return {
        "acc": float(np.mean([p["acc"] for p in per_item])),
        "acc_norm": float(np.mean([p["acc_norm"] for p in per_item])),
        "n": len(per_item),
        "max_length": effective_max_length(model, max_length),
        "items": per_item,
    }
