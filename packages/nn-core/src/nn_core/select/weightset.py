"""WeightSet: an immutable per-weight selection, ``{parameter name: sorted unique flat indices}``.

Per-weight methods (sensitivity top-K, SNIP/Wanda entries) select individual entries
of weight matrices. One percent of a 7B model is 70 M entries, so a WeightSet holds one
int64 numpy array per parameter (flat, row-major indices into ``param.view(-1)``) and,
optionally, a float32 score per selected entry in the same order. Nothing here loops in
Python over weights; every operation is a vectorised numpy call.

On disk a WeightSet is a safetensors file: ``indices/<name>`` (int64) and
``scores/<name>`` (float32) tensors, and the JSON ``meta`` in the header's metadata
under ``"nn.meta"`` with ``"format": "nn.weightset/1"``. See docs/formats.md.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from nn_core.errors import NNError

FORMAT = "nn.weightset/1"
_EMPTY = np.zeros(0, dtype=np.int64)


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _sorted_unique(arr: np.ndarray, *, first_index: bool = False):
    """Sorted distinct values (and, optionally, the index of each one's first occurrence).

    Sort-and-compare; numpy 2.4's ``np.unique`` hashes and is ~100x slower on 10^7 ints."""
    if first_index:
        order = np.argsort(arr, kind="stable")
        s = arr[order]
    else:
        s = np.sort(arr)
    keep = np.empty(s.size, dtype=bool)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return (s[keep], order[keep]) if first_index else s[keep]


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not a.size or not b.size:
        return (a if a.size else b).copy()
    return _sorted_unique(np.concatenate([a, b]))


def _normalise(name: str, values, scores) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted unique int64 indices and their scores (first occurrence wins on duplicates)."""
    arr = _as_numpy(values)
    sc = None if scores is None else _as_numpy(scores).astype(np.float32, copy=False)
    if arr.size == 0:
        return _EMPTY, (None if sc is None else np.zeros(0, np.float32))
    if arr.ndim != 1:
        raise NNError(f"indices for '{name}' must be flat (index into param.view(-1)), got shape {arr.shape}")
    if arr.dtype == bool or (not np.issubdtype(arr.dtype, np.integer)
                             and not np.all(np.mod(arr, 1) == 0)):
        raise NNError(f"indices for '{name}' must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if sc is not None and sc.shape != arr.shape:
        raise NNError(f"scores for '{name}' have shape {sc.shape} but its indices {arr.shape}: "
                      "give one score per index, in the same order")
    # Fast path: already strictly increasing (every loaded file, most producers).
    if arr.size > 1 and not np.all(arr[1:] > arr[:-1]):
        arr, first = _sorted_unique(arr, first_index=True)
        if sc is not None:
            sc = sc[first]
    if arr[0] < 0:
        raise NNError(f"negative index {arr[0]} in '{name}': indices count from 0")
    return arr, sc


def _numel(shape) -> int:
    return int(math.prod(int(d) for d in shape))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def sample_indices(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` distinct indices from ``range(n)``, uniformly, sorted, in O(k) memory.

    Draw with replacement, keep the distinct values, repeat until there are at least
    ``k``, then drop a uniformly chosen surplus. Every step commutes with relabelling
    ``range(n)``, so the result is a uniform k-subset. For ``k > n/2`` the complement is
    sampled instead (a boolean array of ``n`` bytes), so the loop always converges fast.
    """
    if not 0 <= k <= n:
        raise NNError(f"cannot draw {k} distinct indices from {n}")
    if k == 0:
        return _EMPTY
    if 2 * k > n:
        keep = np.ones(n, dtype=bool)
        keep[sample_indices(rng, n, n - k)] = False
        return np.flatnonzero(keep).astype(np.int64)
    out = _EMPTY
    while out.size < k:
        need = k - out.size
        draw = rng.integers(0, n, size=need + need // 8 + 16, dtype=np.int64)
        out = _union(out, _sorted_unique(draw))
    if out.size > k:
        out = np.sort(rng.choice(out, size=k, replace=False))
    return out


class WeightSet:
    """Immutable per-weight selection with optional scores.

    >>> ws = WeightSet.for_model(model, {"model.layers.0.mlp.down_proj.weight": [5, 1, 9]},
    ...                          scores={"model.layers.0.mlp.down_proj.weight": [0.5, 0.1, 0.9]},
    ...                          method="grad_x_weight")
    >>> ws.indices("model.layers.0.mlp.down_proj.weight")     # tensor([1, 5, 9])
    >>> ws.save("top1pct.safetensors"); WeightSet.load("top1pct.safetensors") == ws
    """

    __slots__ = ("_data", "_meta", "_scores")

    def __init__(self, entries: Mapping | None = None, meta: Mapping | None = None,
                 scores: Mapping | None = None):
        scores = dict(scores or {})
        unknown = set(scores) - set(entries or {})
        if unknown:
            raise NNError(f"scores given for parameters without indices: {sorted(unknown)[:3]}")
        data: dict[str, np.ndarray] = {}
        sc_out: dict[str, np.ndarray] = {}
        for name, values in (entries or {}).items():
            if not isinstance(name, str) or not name:
                raise NNError(f"parameter names must be non-empty strings, got {name!r}")
            arr, sc = _normalise(name, values, scores.get(name))
            if arr.size:
                data[name] = arr
                if sc is not None:
                    sc_out[name] = sc
        meta = dict(meta or {})
        shapes = {k: [int(d) for d in v] for k, v in (meta.get("shapes") or {}).items()}
        if shapes:
            for name, arr in data.items():
                if name not in shapes:
                    raise NNError(f"no shape recorded for parameter '{name}': build the set "
                                  "with WeightSet.for_model so every parameter's shape is known")
                if arr[-1] >= _numel(shapes[name]):
                    raise NNError(f"index {arr[-1]} is out of range for '{name}' "
                                  f"(shape {shapes[name]}, {_numel(shapes[name])} entries)")
            meta["shapes"] = shapes
        self._data = dict(sorted(data.items()))
        self._scores = sc_out
        self._meta = meta

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_model(cls, model, entries: Mapping | None = None, scores: Mapping | None = None,
                  **meta) -> WeightSet:
        """A WeightSet stamped with ``model``'s signature, parameter shapes and a time.

        ``shapes`` records every parameter named in ``entries``; unknown names raise.
        """
        from nn_core.model.adapters import get_adapter, model_signature

        sig = model_signature(model)
        params = dict(model.named_parameters())
        shapes = {}
        for name in entries or {}:
            if name not in params:
                raise NNError(_unknown_param(name, params))
            shapes[name] = list(params[name].shape)
        full = {
            "model_id": sig["model_id"],
            "model_type": sig["model_type"],
            "num_layers": sig["num_layers"],
            "layers_path": get_adapter(model).layers_path,
            "shapes": shapes,
            "created_at": _now(),
            **meta,
        }
        ws = cls(entries, full, scores)
        ws.validate(model)
        return ws

    def with_meta(self, **updates) -> WeightSet:
        return WeightSet(self._data, {**self._meta, **updates}, self._scores)

    # ---------------------------------------------------------------- access
    @property
    def meta(self) -> dict:
        return copy.deepcopy(self._meta)

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in (self._meta.get("shapes") or {}).items()}

    def names(self) -> list[str]:
        """Parameters with at least one selected entry."""
        return list(self._data)

    keys = names

    def indices(self, name: str) -> torch.Tensor:
        """Selected flat indices of ``name`` (LongTensor; empty if none)."""
        arr = self._data.get(name)
        return torch.from_numpy(arr.copy()) if arr is not None else torch.zeros(0, dtype=torch.long)

    def indices_numpy(self, name: str) -> np.ndarray:
        """Read-only numpy view of the indices (no copy; for large sets)."""
        arr = self._data.get(name, _EMPTY).view()
        arr.flags.writeable = False
        return arr

    def scores(self, name: str) -> torch.Tensor | None:
        """Scores of ``name`` in index order (float32), or None when the set has none."""
        sc = self._scores.get(name)
        return None if sc is None else torch.from_numpy(sc.copy())

    @property
    def has_scores(self) -> bool:
        return bool(self._scores)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._data:
            raise KeyError(name)
        return self.indices(name)

    def __contains__(self, name) -> bool:
        return name in self._data

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._data:
            yield name, self.indices(name)

    def __len__(self) -> int:
        return int(sum(a.size for a in self._data.values()))

    def __bool__(self) -> bool:
        return bool(self._data)

    def counts(self) -> dict[str, int]:
        """Selected entries per parameter."""
        return {name: int(arr.size) for name, arr in self._data.items()}

    def layer_of(self, name: str) -> int | None:
        """Decoder block a parameter belongs to, or None (embeddings, final norm, head).

        Uses ``meta["layers_path"]`` (set by :meth:`for_model`) when present, else the
        first all-digit component of the dotted name."""
        path = self._meta.get("layers_path")
        if path:
            prefix = path + "."
            if not name.startswith(prefix):
                return None
            head = name[len(prefix):].split(".", 1)[0]
            return int(head) if head.isdigit() else None
        m = _LAYER_RE.search(name)
        return int(m.group(1)) if m else None

    def layer_counts(self) -> dict[int, int]:
        """Selected entries per decoder block; parameters outside blocks are left out."""
        out: dict[int, int] = {}
        for name, arr in self._data.items():
            layer = self.layer_of(name)
            if layer is not None:
                out[layer] = out.get(layer, 0) + int(arr.size)
        return dict(sorted(out.items()))

    def dense_mask(self, name: str) -> torch.Tensor:
        """Boolean tensor of ``name``'s shape, True at selected entries."""
        shape = self.shapes.get(name)
        if shape is None:
            raise NNError(f"no shape recorded for '{name}': build the set with WeightSet.for_model")
        mask = torch.zeros(_numel(shape), dtype=torch.bool)
        if name in self._data:
            mask[torch.from_numpy(self._data[name])] = True
        return mask.view(shape)

    def __eq__(self, other) -> bool:
        if not isinstance(other, WeightSet):
            return NotImplemented
        return self._data.keys() == other._data.keys() and all(
            np.array_equal(a, other._data[k]) for k, a in self._data.items()
        )

    def __hash__(self):
        return hash(tuple((k, a.tobytes()) for k, a in self._data.items()))

    def __repr__(self) -> str:
        return (f"WeightSet({len(self)} weights in {len(self._data)} parameters, "
                f"scores={self.has_scores}, model={self._meta.get('model_id', '?')!r})")

    # ---------------------------------------------------------------- algebra
    def _combine(self, other: WeightSet, op) -> WeightSet:
        if not isinstance(other, WeightSet):
            return NotImplemented
        from nn_core.select.neuronset import _check_compatible

        _check_compatible(self._meta, other._meta)
        shapes = dict(other.shapes)
        for name, shape in self.shapes.items():
            if name in shapes and shapes[name] != shape:
                raise NNError(f"cannot combine weight sets: '{name}' has shape {shape} in one "
                              f"and {shapes[name]} in the other (different models)")
            shapes[name] = shape
        out, out_scores = {}, {}
        for name in set(self._data) | set(other._data):
            res, sc = _combine_arrays(op, self._data.get(name, _EMPTY), self._scores.get(name),
                                      other._data.get(name, _EMPTY), other._scores.get(name))
            if res.size:
                out[name] = res
                if sc is not None:
                    out_scores[name] = sc
        meta = {**other._meta, **self._meta}
        if shapes:
            meta["shapes"] = shapes
        return WeightSet(out, meta, out_scores)

    def __or__(self, other):
        return self._combine(other, "or")

    def __and__(self, other):
        return self._combine(other, "and")

    def __sub__(self, other):
        return self._combine(other, "sub")

    def __xor__(self, other):
        return self._combine(other, "xor")

    def intersection_size(self, other: WeightSet) -> int:
        """|A ∩ B| without building the intersection's metadata."""
        n = 0
        for name in set(self._data) & set(other._data):
            n += int(np.count_nonzero(np.isin(self._data[name], other._data[name], assume_unique=True)))
        return n

    def jaccard(self, other: WeightSet) -> float:
        """|A ∩ B| / |A ∪ B|, with |A ∪ B| = |A| + |B| - |A ∩ B| (1.0 for two empty sets)."""
        from nn_core.select.neuronset import _check_compatible

        _check_compatible(self._meta, other._meta)
        inter = self.intersection_size(other)
        union = len(self) + len(other) - inter
        return 1.0 if union == 0 else inter / union

    def random_like(self, seed: int) -> WeightSet:
        """Same count per parameter, entries drawn uniformly without replacement.

        Scores are not carried over (they belong to the original entries)."""
        shapes = self.shapes
        rng = np.random.default_rng(seed)
        out = {}
        for name, arr in self._data.items():
            if name not in shapes:
                raise NNError("random_like needs parameter shapes in meta: build the set with WeightSet.for_model")
            out[name] = sample_indices(rng, _numel(shapes[name]), int(arr.size))
        meta = {**self._meta, "method": "random_like",
                "parameters": {"seed": seed, "of": self._meta.get("method")}}
        return WeightSet(out, meta)

    def filter(self, names) -> WeightSet:
        """Only the parameters in ``names`` (an iterable of names or a predicate)."""
        keep = (lambda n: names(n)) if callable(names) else set(names).__contains__
        data = {n: a for n, a in self._data.items() if keep(n)}
        return WeightSet(data, self._meta, {n: s for n, s in self._scores.items() if n in data})

    # ---------------------------------------------------------------- validation
    def validate(self, model, *, check_id: bool = True) -> WeightSet:
        """Raise :class:`NNError` unless every parameter exists in ``model`` with the
        recorded shape and every index is below its number of entries."""
        from nn_core.model.adapters import model_signature
        from nn_core.select.neuronset import _check_against

        sig = model_signature(model)
        _check_against(self._meta, sig, what="weight set", check_id=check_id)
        params = dict(model.named_parameters())
        shapes = self.shapes
        for name, arr in self._data.items():
            p = params.get(name)
            if p is None:
                raise NNError(_unknown_param(name, params))
            actual = list(p.shape)
            if name in shapes and shapes[name] != actual:
                raise NNError(f"'{name}' has shape {actual} in this model but {shapes[name]} in the "
                              "weight set: it was made for another model; rebuild it for this one")
            if arr[-1] >= p.numel():
                raise NNError(f"index {arr[-1]} is out of range for '{name}' ({p.numel()} entries): "
                              "the weight set was made for another model; rebuild it for this one")
        return self

    # ---------------------------------------------------------------- conversion
    def to_neuronset(self, model, by: str = "columns", min_count: int = 1):
        """Neurons whose down-projection weights are selected.

        ``by="columns"``: input channels of the down-projection, i.e. ``mlp_act`` neurons
        (a column of W in y = W x). ``by="rows"``: output channels, i.e. ``mlp_out``. A
        channel c is selected when ``|{selected entries in c}| >= min_count``. GPT-2 Conv1D
        stores W transposed (in, out); the adapter's ``neuron_dim()`` accounts for it.
        Parameters that are not a down-projection weight are skipped; how many (and how
        many entries they held) is recorded in ``meta["parameters"]["skipped"]``.
        """
        from nn_core.model.adapters import get_adapter
        from nn_core.select.neuronset import NeuronSet

        if by not in ("columns", "rows"):
            raise NNError(f"unknown by='{by}': use 'columns' (mlp_act) or 'rows' (mlp_out)")
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise NNError(f"min_count must be an integer >= 1, got {min_count!r}")
        self.validate(model, check_id=False)
        ad = get_adapter(model)
        site = "mlp_act" if by == "columns" else "mlp_out"
        dim = ad.neuron_dim() if by == "columns" else 1 - ad.neuron_dim()
        down = {ad.down_weight_name(i): i for i in range(ad.num_layers)}
        entries = {}
        for name, arr in self._data.items():
            layer = down.get(name)
            if layer is None:
                continue
            rows, cols = ad.down_weight(layer).shape
            channel = arr // cols if dim == 0 else arr % cols
            hits = np.bincount(channel, minlength=rows if dim == 0 else cols)
            entries[(layer, site)] = np.flatnonzero(hits >= min_count)
        skipped = [n for n in self._data if n not in down]
        return NeuronSet.for_model(
            model, entries, sites=[site],
            method=f"weightset:{self._meta.get('method') or 'unknown'}",
            parameters={
                "by": by,
                "min_count": min_count,
                "source": {"method": self._meta.get("method"),
                           "parameters": self._meta.get("parameters")},
                "skipped": {"parameters": len(skipped),
                            "weights": int(sum(self._data[n].size for n in skipped))},
            },
        )

    # ---------------------------------------------------------------- I/O
    def save(self, path) -> Path:
        """Write ``path`` (safetensors) atomically."""
        from safetensors.numpy import save_file

        from nn_core.io import atomic_path

        tensors = {f"indices/{n}": a for n, a in self._data.items()}
        tensors.update({f"scores/{n}": s for n, s in self._scores.items()})
        header = {"format": FORMAT, "nn.meta": json.dumps(self._meta, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return Path(path)

    @classmethod
    def load(cls, path) -> WeightSet:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise NNError(f"weight set file '{path}' does not exist: check the path")
        try:
            with safe_open(str(path), framework="np") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise NNError(f"'{path}' is not a WeightSet file (format "
                                  f"{header.get('format')!r}, expected {FORMAT!r}): write it "
                                  "with WeightSet.save")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except SafetensorError as exc:
            raise NNError(f"'{path}' is not a readable safetensors file ({exc}): "
                          "pass a file written by WeightSet.save") from None
        try:
            meta = json.loads(header.get("nn.meta") or "{}")
        except json.JSONDecodeError:
            raise NNError(f"'{path}' has a corrupt WeightSet header: write it again with WeightSet.save") from None
        entries, scores = {}, {}
        for key, arr in tensors.items():
            kind, _, name = key.partition("/")
            if kind == "indices":
                entries[name] = arr
            elif kind == "scores":
                scores[name] = arr
            else:
                raise NNError(f"'{path}' holds an unexpected tensor '{key}': not a WeightSet file")
        return cls(entries, meta, scores)


def _combine_arrays(op: str, a: np.ndarray, sa, b: np.ndarray, sb):
    """One parameter of ``A op B``: the result indices and their scores (or None).

    The result is ``a[ma]`` merged with ``b[mb]`` (disjoint parts of two sorted arrays), so
    one stable argsort (a linear-time run merge) orders indices and scores together.
    Scores: the left operand's where it has scores for the parameter, else the right's,
    else NaN (an index only an unscored operand contributed); none if every one is NaN."""
    a_in_b = np.isin(a, b, assume_unique=True) if a.size and b.size else np.zeros(a.size, bool)
    b_in_a = np.isin(b, a, assume_unique=True) if a.size and b.size else np.zeros(b.size, bool)
    if op == "or":
        ma, mb = np.ones(a.size, bool), ~b_in_a
    elif op == "and":
        ma, mb = a_in_b, np.zeros(b.size, bool)
    elif op == "sub":
        ma, mb = ~a_in_b, np.zeros(b.size, bool)
    else:  # xor
        ma, mb = ~a_in_b, ~b_in_a
    pa, pb = a[ma], b[mb]
    qa = qb = None
    if sa is not None or sb is not None:
        if sa is not None:
            qa = sa[ma]
        else:
            full = np.full(a.size, np.nan, dtype=np.float32)
            full[a_in_b] = sb[b_in_a]  # same values in the same (sorted) order
            qa = full[ma]
        qb = sb[mb] if sb is not None else np.full(pb.size, np.nan, dtype=np.float32)
        if np.isnan(qa).all() and np.isnan(qb).all():
            qa = qb = None  # no result index carries a score (e.g. unscored A minus scored B)
    if not pb.size:
        return pa, qa
    if not pa.size:
        return pb, qb
    cat = np.concatenate([pa, pb])
    if qa is None:
        return np.sort(cat), None
    order = np.argsort(cat, kind="stable")
    return cat[order], np.concatenate([qa, qb])[order]


def _unknown_param(name: str, params: Mapping) -> str:
    # A wrapper (PEFT, DDP) changes names by a prefix; point at the match if there is one.
    near = [p for p in params if p.endswith("." + name) or name.endswith("." + p)]
    hint = f" (this model has '{near[0]}')" if near else ""
    return (f"parameter '{name}' does not exist in this model{hint}: the weight set was made "
            "for another model or a wrapped one; rebuild it for this model")
