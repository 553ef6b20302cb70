"""Task streams from instruction data: records with a task field, grouped into tasks.

A source is anything :func:`nn_core.data.readers.load_records` reads: a local JSON/JSONL/
CSV/Parquet file or folder (``benchmark.local_path``) or a hub dataset name
``owner/name[:config][@split]`` (``benchmark.dataset``). Every record must be an object
with the prompt, response and task fields (names configurable); its prompt and response
become an :class:`nn_core.data.instructions.Example` through
:func:`nn_core.data.instructions.parse_records` (records with an empty prompt or
response are skipped, as there). Tasks are the distinct values of the task field, in the
order of their first appearance in the source: that order is the stream.

Each task's examples are split by :func:`split_task`: a permutation seeded by ``seed``;
the first ``n_eval`` examples evaluate, the next ``n_train`` train.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from nn_core.data.instructions import Example, parse_records
from nn_core.data.readers import load_records
from nn_core.errors import NNError

__all__ = ["instruction_stream", "split_task"]


def instruction_stream(source: str, *, prompt_field: str = "prompt", response_field: str = "response",
                       task_field: str = "task", tasks: Sequence[str] | None = None,
                       min_tasks: int = 2) -> dict[str, list[Example]]:
    """``{task: examples}`` of ``source``, tasks in order of first appearance (or in the order
    of ``tasks``, which must all occur). Raises one :class:`NNError` line for a record
    without the fields, or a stream of fewer than ``min_tasks`` tasks."""
    records = load_records(source)
    grouped: dict[str, list[dict]] = {}
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise NNError(f"record {n} of '{source}' is not an object: store one JSON object per line")
        missing = [f for f in (prompt_field, response_field, task_field) if f not in r]
        if missing:
            raise NNError(f"record {n} of '{source}' has no field(s) {missing} (it has {sorted(r)}): "
                          "set benchmark.prompt_field/response_field/task_field")
        grouped.setdefault(str(r[task_field]), []).append(
            {"prompt": str(r[prompt_field] or ""), "response": str(r[response_field] or "")})
    if tasks:
        unknown = [t for t in tasks if t not in grouped]
        if unknown:
            raise NNError(f"task(s) {unknown} do not occur in field '{task_field}' of '{source}' "
                          f"(it has {list(grouped)}): use some of those")
        grouped = {t: grouped[t] for t in tasks}
    if len(grouped) < min_tasks:
        raise NNError(f"'{source}' has {len(grouped)} task(s) {list(grouped)} in field '{task_field}': "
                      f"a continual stream needs at least {min_tasks}; set benchmark.task_field")
    out = {}
    for t, rows in grouped.items():
        ex = parse_records(rows, format="simple")
        if not ex:
            raise NNError(f"task '{t}' of '{source}' has no record with a non-empty prompt and response")
        out[t] = ex
    return out


def split_task(examples: Sequence[Example], n_train: int, n_eval: int, seed: int,
               task: str = "?") -> tuple[list[Example], list[Example]]:
    """(train, eval): a ``random.Random(seed)`` permutation of ``examples``; eval is its first
    ``n_eval``, train the next ``n_train`` (fewer when the task is short; at least one each)."""
    if len(examples) < 2:
        raise NNError(f"task '{task}' has {len(examples)} example(s): it needs at least 2 (one to "
                      "train, one to evaluate)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = min(n_eval, len(examples) - 1)
    ev = [examples[i] for i in order[:k]]
    tr = [examples[i] for i in order[k:k + n_train]]
    return tr, ev
