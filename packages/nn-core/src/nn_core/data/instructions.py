"""Instruction data: Alpaca, ShareGPT, Dolly and simple records as :class:`Example`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nn_core.data.readers import _records_for
from nn_core.data.specs import RECORD_SUFFIXES
from nn_core.errors import NNError


@dataclass(frozen=True)
class Example:
    """One instruction example: the user's ``prompt``, the target ``response``, an optional
    ``system`` message and, for multi-turn conversations, the earlier ``history`` as
    ``(role, content)`` pairs (roles ``user``/``assistant``) that precede ``prompt``."""

    prompt: str
    response: str
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()


FORMATS = ("alpaca", "sharegpt", "dolly", "simple")

_USER_ROLES = {"human", "user", "prompter"}
_ASSISTANT_ROLES = {"gpt", "assistant", "bot", "model", "chatgpt"}


def detect_format(records: Sequence) -> str:
    """Name the instruction format of ``records`` from the fields of the first one.

    ``sharegpt``: a ``conversations`` (or ``messages``) list; ``alpaca``: ``instruction``
    and ``output``; ``dolly``: ``instruction`` and ``response``; ``simple``: ``prompt`` and
    ``response``. Anything else raises :class:`NNError` listing the fields found.
    """
    first = next((r for r in records if r is not None), None)
    if not isinstance(first, dict):
        raise NNError("instruction data must be a list of records (objects), found "
                      f"{type(first).__name__ if first is not None else 'nothing'}")
    keys = set(first)
    if ("conversations" in keys or "messages" in keys):
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"prompt", "response"} <= keys:
        return "simple"
    raise NNError(f"cannot tell the instruction format from the fields {', '.join(first)}: "
                  "expected alpaca (instruction/input/output), sharegpt (conversations), "
                  "dolly (instruction/context/response) or simple (prompt/response); rename "
                  "the fields or pass the format")


def _joined(head, tail) -> str:
    head, tail = (head or "").strip(), (tail or "").strip()
    return f"{head}\n\n{tail}" if tail else head


def _from_alpaca(r: dict) -> Example:
    return Example(_joined(r.get("instruction"), r.get("input")), (r.get("output") or "").strip(),
                   r.get("system") or None)


def _from_dolly(r: dict) -> Example:
    return Example(_joined(r.get("instruction"), r.get("context")),
                   (r.get("response") or "").strip(), r.get("system") or None)


def _from_simple(r: dict) -> Example:
    return Example((r.get("prompt") or "").strip(), (r.get("response") or "").strip(),
                   r.get("system") or None)


def _from_sharegpt(r: dict) -> Example | None:
    """All turns up to the last assistant turn: that turn is the response, the user turn
    before it the prompt, earlier turns the history; later turns are dropped."""
    turns = r.get("conversations", r.get("messages"))
    if not isinstance(turns, list):
        return None
    system = r.get("system") or None
    msgs: list[tuple[str, str]] = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise NNError("sharegpt turns must be objects with from/value or role/content, "
                          f"found {type(turn).__name__}")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            continue
        if role == "system":
            system = content
        elif role in _USER_ROLES:
            msgs.append(("user", content))
        elif role in _ASSISTANT_ROLES:
            msgs.append(("assistant", content))
        else:
            raise NNError(f"unknown sharegpt role '{role}': use human/user, gpt/assistant or system")
    last = max((i for i, (role, _) in enumerate(msgs) if role == "assistant"), default=None)
    if last is None or last == 0 or msgs[last - 1][0] != "user":
        return None
    return Example(msgs[last - 1][1].strip(), msgs[last][1].strip(), system,
                   tuple(msgs[: last - 1]))


_PARSERS = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "dolly": _from_dolly,
            "simple": _from_simple}


def parse_records(records: Sequence, format: str = "auto") -> list[Example]:
    """Examples from records in ``format`` (or the detected one); records without a
    prompt or a response are skipped."""
    fmt = detect_format(records) if format == "auto" else format
    if fmt not in _PARSERS:
        raise NNError(f"unknown instruction format '{format}': use auto, {', '.join(FORMATS)}")
    out = []
    for r in records:
        if not isinstance(r, dict):
            raise NNError(f"instruction records must be objects, found {type(r).__name__}")
        ex = _PARSERS[fmt](r)
        if ex is not None and ex.prompt and ex.response:
            out.append(ex)
    return out


def load_instructions(spec: str | Path, format: str = "auto", limit: int | None = None) -> list[Example]:
    """Load instruction examples from a JSON/JSONL/CSV/Parquet file, a folder of them, or a
    hub dataset; ``format`` is ``auto`` or one of :data:`FORMATS`; ``limit`` keeps the
    first examples."""
    if limit is not None and limit < 1:
        raise NNError(f"limit must be at least 1, got {limit}")
    src, records = _records_for(spec, RECORD_SUFFIXES, limit)
    examples = parse_records(records, format) if records else []
    if not examples:
        raise NNError(f"no instruction examples found in '{src.spec}': check it holds records "
                      "with a non-empty prompt and response")
    return examples[:limit] if limit is not None else examples
