"""Text corpora, instruction data, chat rendering, tokenization with prompt masking, batching.

Two kinds of data flow through the workspace:

* **Text corpora** (``load_texts``) for language-model statistics: perplexity, activation
  capture, sensitivity. A corpus is a list of documents; ``token_blocks`` joins them with
  the EOS token and cuts the stream into equal blocks.
* **Instruction data** (``load_instructions``) for supervised fine-tuning: a list of
  :class:`Example`, rendered through the model's chat template (``render``) and tokenized
  so that the loss sees only the response (``tokenize_examples``: labels are -100 on
  every prompt token).

Sources are named by one string (see :func:`resolve_text_spec`): ``pydoc`` (CPython's
``pydoc_data.topics``, present in every Python, about 465 k characters), a local file or
folder (``.txt``, ``.json``, ``.jsonl``, ``.csv``, ``.parquet``), or a hub dataset name
``owner/name[:config][@split]`` read through ``datasets`` (extra ``nn-core[datasets]``).

A ``.txt`` file is split into documents at blank lines (one document per paragraph
block). A whole file as one document would leave a single large text with nothing to
hold out; paragraph blocks keep documents whole, so ``split_texts`` never cuts a sentence
in two, while ``token_blocks`` still sees the same text (joined by EOS instead of a blank
line).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nn_core.errors import NNError, require

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips (prompt and padding)."""

TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")
RECORD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# Field names tried, in order, when a record file does not say which field holds the text.
TEXT_FIELDS = ("text", "content", "document", "body", "passage", "article", "sentence",
               "story", "code", "raw")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.\[\]%:+-]+)?$")

# --------------------------------------------------------------------------------------
# Resolving a data spec
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """What a data spec names: ``kind`` is ``"pydoc"``, ``"path"`` or ``"hub"``.

    For ``"path"`` ``path`` is set; for ``"hub"`` ``name``, ``config`` and ``split``
    (default ``"train"``).
    """

    kind: str
    spec: str
    path: Path | None = None
    name: str | None = None
    config: str | None = None
    split: str = "train"


def resolve_text_spec(spec: str | Path) -> TextSource:
    """Tell ``pydoc``, a local path and a hub dataset name apart.

    A spec that exists on disk is a path. A spec that looks like a path (starts with
    ``.``, ``/`` or ``~``, has a data-file suffix, or has more than one ``/``) but does not
    exist is an error (``file X does not exist``) rather than a hub lookup, so a typo
    never turns into a network request. Anything else of the form
    ``owner/name[:config][@split]`` is a hub dataset.
    """
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise NNError("no data given: pass 'pydoc', a local file or folder, or a hub dataset name")
    spec = spec.strip()
    if spec == "pydoc":
        return TextSource("pydoc", spec)
    path = Path(spec).expanduser()
    if path.exists():
        return TextSource("path", spec, path=path)
    pathlike = (
        spec.startswith((".", "/", "~", "\\"))
        or spec.count("/") > 1
        or path.suffix.lower() in (*TEXT_SUFFIXES, ".gz", ".zip", ".tsv")
    )
    if pathlike:
        raise NNError(f"file {spec} does not exist: check the path, or use 'pydoc' or a hub "
                      "dataset name")
    if not _HUB_NAME.match(spec):
        raise NNError(f"'{spec}' is neither 'pydoc', an existing file, nor a hub dataset name "
                      "(owner/name[:config][@split]): check the spelling")
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    return TextSource("hub", spec, name=name, config=config or None, split=split or "train")


# --------------------------------------------------------------------------------------
# Reading records from files and the hub
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Text corpora
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Padding and batching
# --------------------------------------------------------------------------------------


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
            raise ValueError(f"labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
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
