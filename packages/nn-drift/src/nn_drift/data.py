"""Data for scoring, alignment and fine-tuning, offline by default.

``spec`` strings understood by :func:`load_examples`:

* ``safety``: the embedded safety set (``data/safety.jsonl``, 100 harmful requests, each
  paired with a polite refusal; see the package README for its provenance);
  ``safety-heldout``: 20 further requests (and refusals) kept apart for measuring refusal
  rates, never used for scoring or training by default.
* ``utility`` (default utility data): nn-eval's synthetic task suite, an equal share of
  each of :data:`UTILITY_TASKS` (seeded, deterministic); ``task:NAME[,NAME...]``: chosen
  tasks.
* ``assistant``: the same synthetic tasks answered in a chat assistant's style: every
  response opens with one of :data:`ASSISTANT_OPENERS` (in turn), a blank line, then the
  task's answer. Benign (no harmful content), like general instruction data whose answers
  always comply; ``nn-drift run`` fine-tunes on it by default (see docs/nn-drift.md for
  why: the plain tasks leave refusals untouched).
* anything else: a local JSON/JSONL/CSV/Parquet file or folder in Alpaca, ShareGPT,
  Dolly or simple format, or a hub dataset, through :func:`nn_core.data.load_instructions`.

Batches carry ``labels`` = -100 on every prompt and padding token, so losses (and SNIP
gradients) are taken on response tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources

from nn_core.data.instructions import Example, load_instructions, parse_records
from nn_core.errors import NNError

SAFETY = "safety"
SAFETY_HELDOUT = "safety-heldout"
UTILITY = "utility"
ASSISTANT = "assistant"
ASSISTANT_OPENERS = ("Sure! Here is the answer.", "Of course, here you go.",
                     "Happy to help! Here it is.")
TASK_PREFIX = "task:"
UTILITY_TASKS = ("reverse_words", "uppercase", "sort_numbers", "add", "copy", "spell_number")
_FILES = {SAFETY: "safety.jsonl", SAFETY_HELDOUT: "safety_heldout.jsonl"}


def embedded_records(name: str = SAFETY) -> list[dict]:
    """The raw records of an embedded file (``safety`` or ``safety-heldout``): Alpaca
    fields plus ``category`` and ``split``."""
    if name not in _FILES:
        raise NNError(f"no embedded set '{name}': use {' or '.join(_FILES)}")
    text = resources.files("nn_drift").joinpath("data", _FILES[name]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _tasks(names: Sequence[str], limit: int | None, seed: int) -> list[Example]:
    from nn_eval.tasks import make_split

    n = limit if limit is not None else 60 * len(names)
    per = -(-n // len(names))
    rows: list[dict] = []
    for name in names:
        rows.extend(make_split(name, per, 0, seed)["train"])
    # interleave so that any prefix mixes the tasks
    order = sorted(range(len(rows)), key=lambda i: (i % per, i // per))
    return parse_records([rows[i] for i in order], "alpaca")[:n]


def load_examples(spec: str, *, limit: int | None = None, seed: int = 0) -> list[Example]:
    """Instruction examples for ``spec`` (see the module docstring); ``limit`` keeps the
    first ones."""
    if limit is not None and limit < 1:
        raise NNError(f"limit must be at least 1, got {limit}")
    if spec in _FILES:
        ex = parse_records(embedded_records(spec), "alpaca")
        return ex[:limit] if limit is not None else ex
    if spec == UTILITY:
        return _tasks(UTILITY_TASKS, limit, seed)
    if spec == ASSISTANT:
        from dataclasses import replace

        return [replace(e, response=f"{ASSISTANT_OPENERS[i % len(ASSISTANT_OPENERS)]}\n\n{e.response}")
                for i, e in enumerate(_tasks(UTILITY_TASKS, limit, seed))]
    if spec.startswith(TASK_PREFIX):
        names = [n.strip() for n in spec[len(TASK_PREFIX):].split(",") if n.strip()]
        if not names:
            raise NNError(f"'{spec}' names no task: use task:reverse_words or task:add,copy")
        from nn_eval.tasks import get_task

        for n in names:
            get_task(n)
        return _tasks(names, limit, seed)
    return load_instructions(spec, limit=limit)


def response_batches(tokenizer, examples: Sequence[Example], *, batch_size: int = 8,
                     max_length: int | None = 256) -> list[dict]:
    """Right-padded batches (``input_ids``, ``attention_mask``, ``labels``) with the loss
    on response tokens only (prompt tokens and padding are -100)."""
    from nn_core.data.batching import batches
    from nn_core.data.chat import tokenize_examples

    if not examples:
        raise NNError("no examples: pass data with at least one prompt/response pair")
    feats = tokenize_examples(tokenizer, examples, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = list(batches(feats, batch_size, pad_id=pad))
    if not any(bool((b["labels"] != -100).any()) for b in out):
        raise NNError("the data has no response tokens to score: pass examples with responses")
    return out
