"""NeuronSet: an immutable selection of neurons, ``{(layer, site): sorted unique indices}``.

Every method in nn ends in a selection and every intervention starts from one. A
NeuronSet records the model it was made for in ``meta`` (model id, number of layers,
widths per site) and is validated against a model before use. On disk it is JSON with
``"format": "nn.neuronset/1"``; see docs/formats.md.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from nn_core.errors import NNError
from nn_core.model.adapters import model_signature
from nn_core.model.sites import SITES, SiteRef, as_site_ref

FORMAT = "nn.neuronset/1"


def _indices(values, ref: SiteRef) -> np.ndarray:
    arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise NNError(f"indices for {ref} must be a flat list, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise NNError(f"indices for {ref} must be integers")
    arr = np.unique(arr.astype(np.int64))
    if arr[0] < 0:
        raise NNError(f"negative index {arr[0]} in {ref}: indices count from 0")
    return arr


class NeuronSet:
    """Immutable neuron selection.

    >>> ns = NeuronSet({(0, "mlp_act"): [3, 1, 3]}, meta={"num_layers": 2})
    >>> ns[0, "mlp_act"]            # tensor([1, 3])
    >>> (ns | other).jaccard(other)
    """

    __slots__ = ("_data", "_meta")

    def __init__(self, entries: Mapping | None = None, meta: Mapping | None = None):
        data: dict[SiteRef, np.ndarray] = {}
        for key, values in (entries or {}).items():
            ref = as_site_ref(key)
            arr = _indices(values, ref)
            if arr.size:
                data[ref] = arr
        meta = dict(meta or {})
        sites = set(meta.get("sites") or []) | {r.site for r in data}
        meta["sites"] = [s for s in SITES if s in sites]
        widths = meta.get("widths") or {}
        for ref, arr in data.items():
            n_layers = meta.get("num_layers")
            if n_layers is not None and ref.layer >= n_layers:
                raise NNError(f"layer {ref.layer} is out of range for a {n_layers}-layer model")
            width = widths.get(ref.site)
            if width is not None and arr[-1] >= width:
                raise NNError(f"index {arr[-1]} is out of range for {ref} (width {width})")
        covered = meta.get("layers")
        if covered is not None:
            if not isinstance(covered, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in covered):
                raise NNError("meta['layers'] must be a list of layer indices (the layers the selection is about)")
            meta["layers"] = sorted(set(covered))
            outside = sorted({r.layer for r in data} - set(meta["layers"]))
            if outside:
                raise NNError(f"neurons in layers {outside} are outside meta['layers'] {meta['layers']}: "
                              "add those layers or drop the neurons")
        self._data = dict(sorted(data.items()))
        self._meta = meta

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_model(cls, model, entries: Mapping | None = None, **meta) -> NeuronSet:
        """A NeuronSet stamped with ``model``'s signature and a creation time."""
        sig = model_signature(model)
        full = {**sig, "created_at": _now(), **meta}
        ns = cls(entries, full)
        ns.validate(model)
        return ns

    def with_meta(self, **updates) -> NeuronSet:
        return NeuronSet(self._data, {**self._meta, **updates})

    # ---------------------------------------------------------------- access
    @property
    def meta(self) -> dict:
        return dict(self._meta)

    def covered_layers(self, num_layers: int) -> list[int]:
        """Layers the selection is about: ``meta["layers"]`` when the producer analysed only
        some layers, else all ``num_layers``. Preserve masks act on these layers only."""
        layers = self._meta.get("layers")
        return list(range(num_layers)) if layers is None else [v for v in layers if v < num_layers]

    @property
    def sites(self) -> tuple[str, ...]:
        """Sites this selection is about (also those with no selected channel)."""
        return tuple(self._meta["sites"])

    def keys(self) -> list[SiteRef]:
        return list(self._data)

    def items(self) -> Iterator[tuple[SiteRef, torch.Tensor]]:
        for ref, arr in self._data.items():
            yield ref, torch.from_numpy(arr.copy())

    def indices(self, layer: int, site: str) -> torch.Tensor:
        arr = self._data.get(SiteRef(layer, site))
        return torch.from_numpy(arr.copy()) if arr is not None else torch.zeros(0, dtype=torch.long)

    def __getitem__(self, key) -> torch.Tensor:
        ref = as_site_ref(key)
        return self.indices(ref.layer, ref.site)

    def __contains__(self, key) -> bool:
        if isinstance(key, tuple) and len(key) == 3:
            layer, site, idx = key
            arr = self._data.get(SiteRef(layer, site))
            return arr is not None and bool(np.isin(idx, arr))
        return as_site_ref(key) in self._data

    def __len__(self) -> int:
        return int(sum(a.size for a in self._data.values()))

    def __bool__(self) -> bool:
        return bool(self._data)

    def __iter__(self) -> Iterator[tuple[int, str, int]]:
        for ref, arr in self._data.items():
            for i in arr.tolist():
                yield ref.layer, ref.site, i

    def counts(self) -> dict[SiteRef, int]:
        """Selected channels per (layer, site)."""
        return {ref: int(arr.size) for ref, arr in self._data.items()}

    def layer_counts(self, site: str | None = None) -> dict[int, int]:
        out: dict[int, int] = {}
        for ref, arr in self._data.items():
            if site is None or ref.site == site:
                out[ref.layer] = out.get(ref.layer, 0) + int(arr.size)
        return out

    @property
    def scope(self) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
        """What the selection is *about*: ``(sites, layers)``, the sites in canonical order
        and ``meta["layers"]`` (None: every layer). It decides what a preserve mask
        zeroes (every unselected channel of these sites in these layers), so it is part of
        equality and hashing: two sets with the same neurons but another scope differ."""
        layers = self._meta.get("layers")
        return tuple(self._meta["sites"]), (None if layers is None else tuple(layers))

    def __eq__(self, other) -> bool:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return self.scope == other.scope and self._data.keys() == other._data.keys() and all(
            np.array_equal(a, other._data[k]) for k, a in self._data.items()
        )

    def __hash__(self):
        return hash((self.scope, tuple(sorted((k, a.tobytes()) for k, a in self._data.items()))))

    def __repr__(self) -> str:
        layers = sorted({r.layer for r in self._data})
        return (f"NeuronSet({len(self)} neurons, sites={list(self.sites)}, "
                f"layers={layers[:8]}{'...' if len(layers) > 8 else ''}, "
                f"model={self._meta.get('model_id', '?')!r})")

    # ---------------------------------------------------------------- algebra
    def _combine(self, other: NeuronSet, op) -> NeuronSet:
        """``|``, ``&``, ``-``, ``^`` per ``(layer, site)``. The result's :attr:`scope` is
        the union of the operands' scopes whatever the operator (sites: union; layers:
        union, or every layer when either operand covers every layer): the result is about
        everything either operand was about, so ``A - B`` used as a preserve mask still
        masks B's sites. Other meta comes from ``self``, then ``other``."""
        if not isinstance(other, NeuronSet):
            return NotImplemented
        _check_compatible(self._meta, other._meta)
        out = {}
        for ref in set(self._data) | set(other._data):
            a = self._data.get(ref, np.zeros(0, np.int64))
            b = other._data.get(ref, np.zeros(0, np.int64))
            out[ref] = op(a, b)
        meta = {**other._meta, **self._meta}
        meta["sites"] = sorted(set(self.sites) | set(other.sites), key=SITES.index)
        a, b = self._meta.get("layers"), other._meta.get("layers")
        meta["layers"] = None if a is None or b is None else sorted(set(a) | set(b))
        if meta["layers"] is None:
            meta.pop("layers")
        return NeuronSet(out, meta)

    def __or__(self, other):
        return self._combine(other, np.union1d)

    def __and__(self, other):
        return self._combine(other, lambda a, b: np.intersect1d(a, b, assume_unique=True))

    def __sub__(self, other):
        return self._combine(other, lambda a, b: np.setdiff1d(a, b, assume_unique=True))

    def __xor__(self, other):
        return self._combine(other, lambda a, b: np.setxor1d(a, b, assume_unique=True))

    def jaccard(self, other: NeuronSet) -> float:
        """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
        union = len(self | other)
        return 1.0 if union == 0 else len(self & other) / union

    def complement(self, widths: Mapping[str, int] | None = None,
                   num_layers: int | None = None) -> NeuronSet:
        """Every channel of this set's sites (in the layers it covers) that is not selected."""
        widths = dict(widths or self._meta.get("widths") or {})
        num_layers = num_layers or self._meta.get("num_layers")
        if num_layers is None or any(s not in widths for s in self.sites):
            raise NNError("complement needs num_layers and widths in meta: build the set with NeuronSet.for_model")
        out = {}
        for site in self.sites:
            full = np.arange(widths[site], dtype=np.int64)
            for layer in self.covered_layers(num_layers):
                sel = self._data.get(SiteRef(layer, site), np.zeros(0, np.int64))
                out[(layer, site)] = np.setdiff1d(full, sel, assume_unique=True)
        return NeuronSet(out, {**self._meta, "widths": widths, "num_layers": num_layers})

    def random_like(self, seed: int, widths: Mapping[str, int] | None = None) -> NeuronSet:
        """Same count per (layer, site), indices drawn uniformly without replacement."""
        widths = dict(widths or self._meta.get("widths") or {})
        rng = np.random.default_rng(seed)
        out = {}
        for ref, arr in self._data.items():
            if ref.site not in widths:
                raise NNError("random_like needs widths in meta: build the set with NeuronSet.for_model")
            out[ref] = rng.choice(widths[ref.site], size=arr.size, replace=False)
        meta = {**self._meta, "method": "random_like", "parameters": {"seed": seed, "of": self._meta.get("method")}}
        return NeuronSet(out, meta)

    def filter(self, *, layers: Iterable[int] | None = None, sites: Iterable[str] | None = None) -> NeuronSet:
        layers = set(layers) if layers is not None else None
        sites = set(sites) if sites is not None else None
        keep = {r: a for r, a in self._data.items()
                if (layers is None or r.layer in layers) and (sites is None or r.site in sites)}
        meta = dict(self._meta)
        if sites is not None:
            meta["sites"] = [s for s in self.sites if s in sites]
        if layers is not None and meta.get("layers") is not None:
            meta["layers"] = [v for v in meta["layers"] if v in layers]
        return NeuronSet(keep, meta)

    # ---------------------------------------------------------------- validation
    def validate(self, model, *, check_id: bool = True) -> NeuronSet:
        """Raise :class:`NNError` unless this set fits ``model`` (layers, widths, identity)."""
        sig = model_signature(model)
        _check_against(self._meta, sig, what="neuron set", check_id=check_id)
        bad = [v for v in (self._meta.get("layers") or []) if v >= sig["num_layers"]]
        if bad:
            raise NNError(f"meta['layers'] names layers {bad} but the model has {sig['num_layers']}: "
                          "the selection was made for another model")
        for ref, arr in self._data.items():
            if ref.layer >= sig["num_layers"]:
                raise NNError(f"layer {ref.layer} is out of range for {sig['model_id'] or 'this model'} "
                              f"({sig['num_layers']} layers): the selection was made for another model")
            width = sig["widths"][ref.site]
            if arr[-1] >= width:
                raise NNError(f"index {arr[-1]} is out of range for {ref} (width {width}): "
                              "the selection was made for another model")
        return self

    # ---------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "meta": self._meta,
            "neurons": {str(ref): arr.tolist() for ref, arr in self._data.items()},
        }

    @classmethod
    def from_dict(cls, obj: Mapping) -> NeuronSet:
        fmt = obj.get("format") if isinstance(obj, Mapping) else None
        if fmt != FORMAT:
            raise NNError(f"not a NeuronSet file (format {fmt!r}, expected {FORMAT!r}): "
                          "foreign formats are read with nn_core.select.formats")
        neurons, meta = obj.get("neurons") or {}, obj.get("meta") or {}
        if not isinstance(neurons, Mapping) or not isinstance(meta, Mapping):
            raise NNError("malformed NeuronSet file: 'neurons' and 'meta' must be JSON objects")
        for key, values in neurons.items():
            if not isinstance(values, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise NNError(f"malformed NeuronSet file: neurons[{key!r}] must be a list of integers")
            if len(set(values)) != len(values):
                dup = sorted(v for v, n in Counter(values).items() if n > 1)[:5]
                raise NNError(f"malformed NeuronSet file: neurons[{key!r}] lists index(es) {dup} more "
                              "than once: each neuron must appear once; fix the producer of this file")
        ns = cls(neurons, meta)  # checks the keys first (bad site, negative layer, ...)
        if not meta or (meta.get("model_id") is None and meta.get("num_layers") is None):
            raise NNError("NeuronSet file has no 'meta' naming the model it was made for "
                          "(model_id or num_layers), so it would fit any model: re-create it "
                          "with NeuronSet.for_model or 'nn-core neurons import --model MODEL'")
        return ns

    def save(self, path) -> Path:
        from nn_core.io import atomic_write_json

        return atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path) -> NeuronSet:
        from nn_core.io import read_json

        return cls.from_dict(read_json(path, what="neuron set"))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _check_compatible(a: Mapping, b: Mapping) -> None:
    for key in ("num_layers", "model_id"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise NNError(f"cannot combine selections made for different models ({key}: "
                          f"{a[key]!r} vs {b[key]!r})")


def _check_against(meta: Mapping, sig: Mapping, *, what: str, check_id: bool = True) -> None:
    """Compare a selection's recorded model signature with a model's.

    Layer count, widths and architecture must match; the model id must match too unless
    ``check_id`` is False (the same weights loaded under another path or alias)."""
    mid, sid = meta.get("model_id"), sig.get("model_id")
    if check_id and mid and sid and mid != sid:
        raise NNError(f"this {what} was made for model '{mid}', not '{sid}': rebuild it for "
                      "this model (or pass check_id=False if they are the same weights)")
    mt = meta.get("model_type")
    if mt and sig.get("model_type") and mt != sig["model_type"]:
        raise NNError(f"this {what} was made for a '{mt}' model, not '{sig['model_type']}': "
                      "rebuild it for this model")
    if meta.get("num_layers") is not None and meta["num_layers"] != sig["num_layers"]:
        raise NNError(f"this {what} was made for a {meta['num_layers']}-layer model "
                      f"({meta.get('model_id') or '?'}), not {sig['model_id'] or 'this model'} "
                      f"({sig['num_layers']} layers): rebuild it for this model")
    for site, width in (meta.get("widths") or {}).items():
        if site in sig["widths"] and sig["widths"][site] != width:
            raise NNError(f"this {what} was made for {site} width {width} "
                          f"({meta.get('model_id') or '?'}), but {sig['model_id'] or 'this model'} "
                          f"has {sig['widths'][site]}: rebuild it for this model")
