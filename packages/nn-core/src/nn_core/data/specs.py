"""Naming a data source by one string: pydoc, a local file or folder, or a hub dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nn_core.errors import NNError

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips (prompt and padding)."""

TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")
RECORD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# Field names tried, in order, when a record file does not say which field holds the text.
TEXT_FIELDS = ("text", "content", "document", "body", "passage", "article", "sentence",
               "story", "code", "raw")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.\[\]%:+-]+)?$")



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
