"""Reading records from local files (json, jsonl, csv, parquet) and hub datasets."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from nn_core.data.specs import TextSource, resolve_text_spec
from nn_core.errors import NNError, require


def _data_files(path: Path, suffixes: Sequence[str]) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise NNError(f"{path} has an unsupported type: use one of {', '.join(suffixes)}")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise NNError(f"folder {path} holds no {'/'.join(suffixes)} files: point at a data "
                      "file or a folder of them")
    return files


def _read_json(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved with a .json name
            return _read_jsonl(path)
        raise NNError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): fix the file") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise NNError(f"{path} holds a JSON object, not a list of records: store a list "
                          "(or an object with exactly one list inside)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise NNError(f"{path} must hold a JSON list of records or strings")
    return obj


def _read_jsonl(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise NNError(f"{path} line {lineno} is not valid JSON ({exc.msg}): fix "
                              "that line") from None
    return rows


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _read_parquet(path: Path) -> list[dict]:
    # pyarrow comes with the `datasets` extra; a bare nn-core install reads no parquet.
    pq = require("pyarrow.parquet", feature="reading .parquet files", package="nn-core",
                 extra="datasets")
    return pq.read_table(path).to_pylist()


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv,
            ".parquet": _read_parquet}


def _read_records(path: Path) -> list:
    return _READERS[path.suffix.lower()](path)


def _hub_records(src: TextSource, limit: int | None) -> list[dict]:
    datasets = require("datasets", feature="loading a hub dataset", package="nn-core",
                       extra="datasets")
    split = src.split
    if limit is not None and "[" not in split:
        split = f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(src.name, src.config, split=split)
    except Exception as exc:  # datasets raises many types; each means "not loadable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise NNError(f"could not load hub dataset '{src.spec}' ({first}): check the name and "
                      "the network, or pass a local file (offline: use 'pydoc')") from None
    return list(ds)


def _records_for(spec: str | Path, suffixes: Sequence[str], limit: int | None) -> tuple[TextSource, list]:
    src = resolve_text_spec(spec)
    if src.kind == "hub":
        return src, _hub_records(src, limit)
    if src.kind == "pydoc":
        raise NNError("'pydoc' is a text corpus, not instruction data: pass a JSON/JSONL/CSV/"
                      "Parquet file of instructions")
    rows: list = []
    for file in _data_files(src.path, suffixes):
        rows.extend(_read_records(file))
        if limit is not None and len(rows) >= limit:
            break
    return src, rows


def load_records(spec: str | Path, limit: int | None = None) -> list:
    """The raw records (objects, or strings) of ``spec``: a local JSON/JSONL/CSV/Parquet
    file, a folder of them, or a hub dataset ``owner/name[:config][@split]`` (through
    ``datasets``); ``limit`` keeps the first records. For callers that need fields beyond
    an instruction's prompt and response (e.g. a task label)."""
    from nn_core.data.specs import RECORD_SUFFIXES

    if limit is not None and limit < 1:
        raise NNError(f"limit must be at least 1, got {limit}")
    _, rows = _records_for(spec, RECORD_SUFFIXES, limit)
    return rows[:limit] if limit is not None else rows
