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


# --------------------------------------------------------------------------------------
# Instruction data
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Rendering and tokenization with prompt masking
# --------------------------------------------------------------------------------------


def _messages(example: Example, *, fold_system: bool = False) -> list[dict]:
    msgs = [{"role": role, "content": text} for role, text in example.history]
    msgs.append({"role": "user", "content": example.prompt})
    if example.system:
        if fold_system:
            msgs[0] = {"role": "user", "content": f"{example.system}\n\n{msgs[0]['content']}"}
        else:
            msgs.insert(0, {"role": "system", "content": example.system})
    return msgs


def _fallback_prompt(example: Example) -> str:
    parts = [f"### System:\n{example.system}\n\n"] if example.system else []
    for role, text in example.history:
        head = "### Instruction:" if role == "user" else "### Response:"
        parts.append(f"{head}\n{text}\n\n")
    parts.append(f"### Instruction:\n{example.prompt}\n\n### Response:\n")
    return "".join(parts)


def render(tokenizer, example: Example) -> tuple[str, str]:
    """``(prompt_text, full_text)`` for ``example``; ``full_text`` starts with ``prompt_text``.

    With a chat template: the prompt is the conversation up to the user turn with the
    generation prompt (``add_generation_prompt=True``), the full text adds the assistant
    turn. Templates that render the assistant turn differently after the generation
    prompt (so the prompt is not a prefix) get ``prompt_text + response``. Without a
    template: a plain ``### Instruction:`` / ``### Response:`` layout.
    """
    if not getattr(tokenizer, "chat_template", None):
        prompt = _fallback_prompt(example)
        return prompt, prompt + example.response
    msgs = _messages(example)
    try:
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template error; jinja2's type is not ours to import
        if not example.system:
            raise
        # Templates that reject a system role (Gemma) get it folded into the first turn.
        msgs = _messages(example, fold_system=True)
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": example.response}],
                                         tokenize=False)
    if not full.startswith(prompt):
        full = prompt + example.response
    return prompt, full


class Features(list):
    """A list of ``{"input_ids", "labels"}`` dicts; ``dropped`` counts examples left out
    because truncation removed their whole response."""

    dropped: int = 0


def tokenize_examples(tokenizer, examples: Sequence[Example], max_length: int | None) -> Features:
    """Token ids and labels for supervised fine-tuning, loss on the response only.

    ``labels[i] = -100`` for every prompt token and equals ``input_ids[i]`` on the response,
    which ends with the EOS token (appended unless the rendered response already holds it).
    The prompt ids come from tokenizing ``prompt_text`` alone; when they are not a prefix
    of the ids of ``full_text`` (a merge across the boundary), the response is tokenized on
    its own and concatenated, so the masked span is exactly the prompt. Sequences over
    ``max_length`` lose the end of the response; examples whose prompt alone fills
    ``max_length`` are dropped and counted in ``.dropped``.
    """
    if max_length is not None and max_length < 2:
        raise NNError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    bos = _adds_bos(tokenizer)
    rendered = [render(tokenizer, ex) for ex in examples]
    prompts = _encode(tokenizer, [p for p, _ in rendered], bos=bos)
    fulls = _encode(tokenizer, [f for _, f in rendered], bos=bos)
    out = Features()
    for (prompt_text, full_text), p_ids, f_ids in zip(rendered, prompts, fulls, strict=True):
        if f_ids[: len(p_ids)] == p_ids:
            r_ids = f_ids[len(p_ids):]
        else:
            r_ids = _encode(tokenizer, [full_text[len(prompt_text):]], bos=False)[0]
        if eos is not None and eos not in r_ids:
            r_ids = [*r_ids, eos]
        if max_length is not None and len(p_ids) + len(r_ids) > max_length:
            if len(p_ids) >= max_length:
                out.dropped += 1
                continue
            r_ids = r_ids[: max_length - len(p_ids)]
        out.append({"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids})
    if examples and not out:
        raise NNError(f"every example's prompt is at least max_length={max_length} tokens: raise "
                      "--max-length or shorten the prompts")
    return out
