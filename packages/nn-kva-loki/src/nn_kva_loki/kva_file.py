"""The KVA file: knowledge-value attributions of one model over many samples (``nn.kva/1``).

One HDF5 file (h5py) holds, for ``N`` samples of a model with ``L`` decoder layers and
hidden size ``H``:

=================  ==============  =========  =================================================
dataset            shape           dtype      meaning
=================  ==============  =========  =================================================
``attributions``   ``[N, L, H]``   float32    ``A[n, l, c]``: integrated gradient of sample n's
                                              target-token probability w.r.t. channel c of
                                              layer l's down-projection output (site
                                              ``mlp_out``) at the target position
``sample_ids``     ``[N]``         str        a stable id of each sample (e.g. ``mmlu:17``)
``target_token``   ``[N]``         int64      the token whose probability was attributed
``target_prob``    ``[N]``         float32    that probability on the unmodified input
=================  ==============  =========  =================================================

``attributions`` is chunked one sample per chunk (``(1, L, H)``) and gzip-compressed with
the byte-shuffle filter, so a reader can stream samples without reading the whole file.
Every dataset is resizable along the sample axis: the file is written incrementally.

File attributes (``h5py`` ``attrs``):

* ``format`` = ``"nn.kva/1"``; ``site`` = ``"mlp_out"``.
* ``model_signature``: JSON of :func:`nn_core.model_signature` (``model_id``,
  ``model_type``, ``num_layers``, ``widths``); also ``num_layers`` and ``hidden_size``
  as plain integers.
* the settings that determine the numbers: ``method`` (integration rule, e.g.
  ``riemann_trapezoid``), ``steps``, ``engine`` (``fast`` or ``captum``), ``dataset``
  (a label of the samples' source), ``dtype`` (the model's compute dtype), ``target``
  (``argmax`` or ``gold``).
* ``n_written``: how many samples are complete. Rows beyond it (a write that was cut
  off) are garbage and are dropped on resume. It is raised only after a sample's rows of
  every dataset are written and flushed.
* ``complete``: true once the producer finished; false while writing. A file with
  ``complete`` false was interrupted (or is being written).
* ``created_at``, ``updated_at`` (UTC ISO 8601).

Write modes (the seed's ``--write-mode``):

* ``w``: start a new file; an existing *complete* file at the path is replaced. An
  existing *interrupted* file is never replaced silently: pass ``resume=True`` to continue
  it, or delete it.
* ``a``: add samples to an existing complete file with the same model and settings
  (``dataset`` may differ: the labels are joined with ``", "``); a missing file is
  created.
* ``resume=True`` (either mode): continue an interrupted (or complete) file with the
  same model and settings (``dataset`` included); the writer's ``start`` is the index of
  the first missing sample. A missing file is created.

A file made for another model (signature) or with other settings is refused with one
:class:`~nn_core.errors.NNError` line naming the difference.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from nn_core.errors import NNError

FORMAT = "nn.kva/1"
SITE = "mlp_out"
WRITE_MODES = ("w", "a")
SIGNATURE_KEYS = ("model_id", "model_type", "num_layers", "widths")
_STR = h5py.string_dtype(encoding="utf-8")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class KVASettings:
    """What determines the attribution numbers besides the model.

    ``method``: Captum's integration rule (``riemann_trapezoid``, ``gausslegendre``,
    ``riemann_left|right|middle``); ``steps``: integration points (>= 1); ``engine``:
    ``fast`` (KV-cached single-position batch) or ``captum`` (reference); ``dataset``: a
    label of where the samples came from; ``dtype``: compute dtype of the model;
    ``target``: ``argmax`` (the model's own prediction) or ``gold``."""

    method: str = "riemann_trapezoid"
    steps: int = 7
    engine: str = "fast"
    dataset: str = ""
    dtype: str = "float32"
    target: str = "argmax"

    def check(self) -> KVASettings:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise NNError(f"steps must be an integer >= 1, got {self.steps!r}: pass --steps 7 or more")
        for name in ("method", "engine", "dataset", "dtype", "target"):
            if not isinstance(getattr(self, name), str):
                raise NNError(f"KVA setting {name} must be text, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ signature helpers
def _signature(sig: Mapping) -> dict:
    """The comparable part of a model signature (widths as a plain ``{site: int}``)."""
    missing = [k for k in ("num_layers", "widths") if k not in sig]
    if missing or SITE not in (sig.get("widths") or {}):
        raise NNError(f"model signature lacks {missing or ['widths.' + SITE]}: build it with "
                      "nn_core.model_signature(model)")
    out = {k: sig.get(k) for k in SIGNATURE_KEYS}
    out["num_layers"] = int(out["num_layers"])
    out["widths"] = {str(s): int(w) for s, w in dict(out["widths"]).items()}
    return out


def _describe(sig: Mapping) -> str:
    return (f"'{sig.get('model_id') or '?'}' ({sig.get('model_type') or '?'}, {sig['num_layers']} layers, "
            f"hidden {sig['widths'][SITE]})")


def _check_signature(path: Path, have: Mapping, want: Mapping) -> None:
    have, want = _signature(have), _signature(want)
    if have != want:
        diff = [k for k in SIGNATURE_KEYS if have.get(k) != want.get(k)]
        raise NNError(f"{path} holds attributions of model {_describe(have)}, not {_describe(want)} "
                      f"(differs in {', '.join(diff)}): use another --out file or the matching model")


def _check_settings(path: Path, have: Mapping, want: KVASettings, *, with_dataset: bool) -> None:
    wanted = want.to_dict()
    keys = [k for k in wanted if with_dataset or k != "dataset"]
    diff = [f"{k} {have.get(k)!r} vs {wanted[k]!r}" for k in keys if have.get(k) != wanted[k]]
    if diff:
        raise NNError(f"{path} was written with other settings ({'; '.join(diff)}): use the file's "
                      "settings or another --out file")


# ------------------------------------------------------------------ reading
def _attr(f: h5py.File, name: str, default=None):
    value = f.attrs.get(name, default)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _open_h5(path: Path, mode: str) -> h5py.File:
    if not path.exists():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise NNError(f"{path} is not a readable HDF5 file ({' '.join(str(exc).split())[:120]}): "
                      "pass a KVA file written by nn-kva-loki analyse") from None


def _check_format(path: Path, f: h5py.File) -> None:
    fmt = _attr(f, "format")
    if fmt != FORMAT:
        raise NNError(f"{path} is not a KVA file (format {fmt!r}, expected {FORMAT!r}): pass a file "
                      "written by nn-kva-loki analyse")
    if "attributions" not in f or f["attributions"].ndim != 3:
        raise NNError(f"{path} has no [samples, layers, hidden] 'attributions' dataset: the file is damaged")


class KVAFile:
    """A KVA file opened for reading (a context manager; :meth:`close` when done).

    ``num_samples`` counts complete samples only (``n_written``); rows beyond it are
    never returned."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = _open_h5(self.path, "r")
        try:
            _check_format(self.path, self._f)
            self.signature = _signature(json.loads(_attr(self._f, "model_signature", "{}")))
            self.num_samples = int(_attr(self._f, "n_written", 0))
            self.complete = bool(_attr(self._f, "complete", False))
            ds = self._f["attributions"]
            self.num_layers, self.hidden_size = int(ds.shape[1]), int(ds.shape[2])
            if (self.num_layers, self.hidden_size) != (self.signature["num_layers"],
                                                       self.signature["widths"][SITE]):
                raise NNError(f"{self.path}: attributions are [*, {self.num_layers}, {self.hidden_size}] but the "
                              f"recorded model has {self.signature['num_layers']} layers x hidden "
                              f"{self.signature['widths'][SITE]}: the file is damaged")
            if self.num_samples > ds.shape[0]:
                raise NNError(f"{self.path} claims {self.num_samples} samples but holds {ds.shape[0]}: "
                              "the file is damaged")
        except BaseException:
            self._f.close()
            raise

    # ---------------------------------------------------------------- metadata
    @property
    def settings(self) -> dict:
        """The recorded :class:`KVASettings` fields (as stored)."""
        return {k: _attr(self._f, k) for k in KVASettings.__dataclass_fields__}

    @property
    def attrs(self) -> dict:
        return {k: _attr(self._f, k) for k in self._f.attrs}

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_samples, self.num_layers, self.hidden_size)

    # ---------------------------------------------------------------- data
    def attributions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``attributions[start:stop]`` as a float32 array (``stop`` capped at ``num_samples``)."""
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        return np.asarray(self._f["attributions"][start:stop], dtype=np.float32)

    def iter_chunks(self, chunk_size: int = 64) -> Iterator[np.ndarray]:
        """Successive ``[<= chunk_size, L, H]`` blocks of complete samples, in order."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise NNError(f"chunk size must be a positive integer, got {chunk_size!r}")
        for start in range(0, self.num_samples, chunk_size):
            yield self.attributions(start, start + chunk_size)

    def sample_ids(self) -> list[str]:
        return [s.decode("utf-8") if isinstance(s, bytes) else str(s)
                for s in self._f["sample_ids"][: self.num_samples]]

    def target_token(self) -> np.ndarray:
        return np.asarray(self._f["target_token"][: self.num_samples], dtype=np.int64)

    def target_prob(self) -> np.ndarray:
        return np.asarray(self._f["target_prob"][: self.num_samples], dtype=np.float32)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> KVAFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "interrupted"
        return (f"KVAFile({str(self.path)!r}, {self.num_samples} samples x {self.num_layers} layers x "
                f"{self.hidden_size}, {state}, model={self.signature.get('model_id')!r})")


def read_kva(path: str | os.PathLike) -> KVAFile:
    """Open a KVA file for reading (checks the format)."""
    return KVAFile(path)


# ------------------------------------------------------------------ writing
class KVAWriter:
    """Appends samples to a KVA file; see the module docstring for modes and resume.

    >>> with open_kva_writer("kva.h5", model_signature(model), KVASettings(dataset="mmlu")) as w:
    ...     for i in range(w.start, n):          # first missing sample on resume
    ...         w.append([ids[i]], attr[i:i+1], [tok[i]], [prob[i]])
    ...     w.finish()                           # marks the file complete

    Without :meth:`finish` the file stays marked interrupted, so a crash or Ctrl-C leaves a
    file that ``resume=True`` continues from ``start``."""

    def __init__(self, f: h5py.File, path: Path, start: int):
        self._f = f
        self.path = path
        self.start = start
        self.n_written = start
        self.num_layers = int(f["attributions"].shape[1])
        self.hidden_size = int(f["attributions"].shape[2])

    def check_prefix(self, sample_ids: Sequence[str]) -> None:
        """Raise unless the file's samples are the first ``n_written`` of ``sample_ids``
        (so that resuming continues the same sample order)."""
        stored = [s.decode("utf-8") if isinstance(s, bytes) else str(s)
                  for s in self._f["sample_ids"][: self.n_written]]
        given = [str(s) for s in sample_ids[: self.n_written]]
        if stored != given:
            first = next((i for i, (a, b) in enumerate(zip(stored, given, strict=False)) if a != b),
                         min(len(stored), len(given)))
            raise NNError(f"{self.path} holds other samples than this run (first difference at sample "
                          f"{first}): resume with the same data, order and limit, or use another --out file")

    def append(self, sample_ids: Sequence[str], attributions, target_token, target_prob) -> int:
        """Write ``len(sample_ids)`` samples (attributions ``[n, L, H]``); return ``n_written``."""
        att = np.asarray(attributions, dtype=np.float32)
        n = len(sample_ids)
        if att.ndim != 3 or att.shape[0] != n or att.shape[1:] != (self.num_layers, self.hidden_size):
            raise NNError(f"attributions of shape {tuple(att.shape)} do not fit the file: expected "
                          f"[{n}, {self.num_layers}, {self.hidden_size}]")
        tok = np.asarray(target_token, dtype=np.int64).reshape(-1)
        prob = np.asarray(target_prob, dtype=np.float32).reshape(-1)
        if tok.shape[0] != n or prob.shape[0] != n:
            raise NNError(f"{n} sample ids but {tok.shape[0]} target tokens and {prob.shape[0]} probabilities")
        lo, hi = self.n_written, self.n_written + n
        for name, values in (("attributions", att), ("sample_ids", np.asarray([str(s) for s in sample_ids], dtype=object)),
                             ("target_token", tok), ("target_prob", prob)):
            ds = self._f[name]
            if ds.shape[0] < hi:
                ds.resize(hi, axis=0)
            ds[lo:hi] = values
        self._f.flush()  # the rows are on disk before the counter says so
        self._f.attrs["n_written"] = hi
        self._f.attrs["updated_at"] = _now()
        self._f.flush()
        self.n_written = hi
        return hi

    def finish(self) -> None:
        """Mark the file complete (``n_written`` samples) and close it."""
        self._truncate(self.n_written)
        self._f.attrs["complete"] = True
        self._f.attrs["updated_at"] = _now()
        self.close()

    def _truncate(self, n: int) -> None:
        for name in ("attributions", "sample_ids", "target_token", "target_prob"):
            if self._f[name].shape[0] != n:
                self._f[name].resize(n, axis=0)

    def close(self) -> None:
        if self._f.id.valid:
            self._f.flush()
            self._f.close()

    def __enter__(self) -> KVAWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _create(path: Path, sig: dict, settings: KVASettings) -> h5py.File:
    L, H = sig["num_layers"], sig["widths"][SITE]
    path.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(path, "w")
    f.create_dataset("attributions", shape=(0, L, H), maxshape=(None, L, H), dtype=np.float32,
                     chunks=(1, L, H), compression="gzip", compression_opts=4, shuffle=True)
    f.create_dataset("sample_ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
    f.create_dataset("target_token", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
    f.create_dataset("target_prob", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1024,))
    attrs = {"format": FORMAT, "site": SITE, "model_signature": json.dumps(sig, sort_keys=True),
             "num_layers": L, "hidden_size": H, **settings.to_dict(), "n_written": 0,
             "complete": False, "created_at": _now(), "updated_at": _now()}
    for k, v in attrs.items():
        f.attrs[k] = v
    f.flush()
    return f


def open_kva_writer(path: str | os.PathLike, signature: Mapping, settings: KVASettings, *,
                    write_mode: str = "w", resume: bool = False) -> KVAWriter:
    """Open ``path`` for writing attributions of the model with ``signature``.

    Returns a :class:`KVAWriter` whose ``start`` is the index of the first sample still to
    write (0 for a new file). Refuses (one-line :class:`NNError`) a file of another format,
    model or settings, and an interrupted file unless ``resume`` is set."""
    path = Path(path)
    if write_mode not in WRITE_MODES:
        raise NNError(f"unknown write mode '{write_mode}': use w (new file) or a (append)")
    sig = _signature(signature)
    settings = settings.check()
    if not path.exists():
        return KVAWriter(_create(path, sig, settings), path, 0)
    with KVAFile(path) as old:  # format, shape and counter checks
        complete, n = old.complete, old.num_samples
        _check_signature(path, old.signature, sig)
        old_settings = old.settings
    if write_mode == "w" and not resume:
        if not complete:
            raise NNError(f"{path} is an interrupted KVA file ({n} samples written): pass --resume to "
                          "continue it, or delete it to start over")
        path.unlink()
        return KVAWriter(_create(path, sig, settings), path, 0)
    if not resume and not complete:
        raise NNError(f"{path} is an interrupted KVA file ({n} samples written): pass --resume to "
                      "continue it before appending to it")
    _check_settings(path, old_settings, settings, with_dataset=resume)
    f = _open_h5(path, "r+")
    writer = KVAWriter(f, path, n)
    writer._truncate(n)  # drop the rows of a cut-off write
    if not resume and settings.dataset and settings.dataset not in old_settings["dataset"].split(", "):
        f.attrs["dataset"] = ", ".join(x for x in (old_settings["dataset"], settings.dataset) if x)
    f.attrs["complete"] = False
    f.attrs["updated_at"] = _now()
    f.flush()
    return writer
