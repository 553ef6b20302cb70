"""ICA templates: components as neuron selections, on disk as ``nn.ica-templates/1`` JSON.

A component is the set of channels of one site whose spatial-map loading passed the
threshold, per layer (see :mod:`nn_ica.decompose`). The file records how the templates
were made (model signature, site, layers, data, token counts, PCA and ICA parameters and
convergence, backend, seed) so that using them on another model or site fails loudly.

File layout::

    {"format": "nn.ica-templates/1",
     "metadata": {"model_id": ..., "model_type": ..., "num_layers": ..., "widths": {...},
                  "site": "mlp_act", "layers": [...], ...},
     "components": [{"id": 0, "variance": 0.012, "threshold": 0.031, "size": 922,
                     "neurons": {"0": [5, 17, ...], "3": [...]}}, ...]}

FunctionalNetworksSFT templates (``{"components": {"0": {"layer_0": [...]}}, ...}``) are
imported by :meth:`Templates.load`; they carry no model signature, so they are checked
against a model only by layer count and width.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nn_core.errors import NNError
from nn_core.model.adapters import model_signature
from nn_core.model.sites import SITES
from nn_core.select.neuronset import NeuronSet

FORMAT = "nn.ica-templates/1"


@dataclass(frozen=True)
class Component:
    """One functional network: ``neurons[layer]`` are sorted channel indices of the site."""

    id: int
    neurons: Mapping[int, np.ndarray]
    variance: float | None = None
    threshold: float | None = None
    extra: Mapping = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(sum(a.size for a in self.neurons.values()))

    def layer_sizes(self) -> dict[int, int]:
        return {layer: int(a.size) for layer, a in sorted(self.neurons.items()) if a.size}

    def to_dict(self) -> dict:
        out = {"id": self.id}
        if self.variance is not None:
            out["variance"] = float(self.variance)
        if self.threshold is not None:
            out["threshold"] = float(self.threshold)
        out["size"] = self.size
        out.update(dict(self.extra))
        out["neurons"] = {str(k): v.tolist() for k, v in sorted(self.neurons.items()) if v.size}
        return out

    @classmethod
    def from_dict(cls, obj: Mapping) -> Component:
        if not isinstance(obj, Mapping):
            raise NNError("malformed component in templates file (not a JSON object): rebuild it with nn-ica build")
        raw = obj.get("neurons") or {}
        if not isinstance(raw, Mapping):
            raise NNError(f"malformed component {obj.get('id')!r} in templates file: 'neurons' must map layer "
                          f"to channel list, not a {type(raw).__name__}: rebuild it with nn-ica build")
        try:
            cid = int(obj["id"])
            neurons = {int(k): _as_indices(v, f"component {obj['id']} layer {k}") for k, v in raw.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise NNError(f"malformed component in templates file ({exc}): rebuild it with nn-ica build") from None
        extra = {k: v for k, v in obj.items() if k not in ("id", "variance", "threshold", "size", "neurons")}
        return cls(cid, neurons, obj.get("variance"), obj.get("threshold"), extra)


def _as_indices(values, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise NNError(f"{what}: channel indices must be a flat list of integers")
    arr = np.unique(arr.astype(np.int64))
    if arr[0] < 0:
        raise NNError(f"{what}: negative channel index {arr[0]}")
    return arr


class Templates:
    """A set of ICA components for one model and one site.

    >>> t = Templates.load("templates.json")
    >>> t.check(model)                         # same model, layers and widths, or NNError
    >>> ns = t.neuronset([0, 2])               # union of components 0 and 2 as a NeuronSet
    """

    def __init__(self, metadata: Mapping, components: Sequence[Component]):
        meta = dict(metadata)
        site = meta.get("site", "mlp_act")
        if site not in SITES:
            raise NNError(f"templates name an unknown site '{site}': use one of {', '.join(SITES)}")
        meta["site"] = site
        ids = [c.id for c in components]
        if len(set(ids)) != len(ids):
            raise NNError("templates file has duplicate component ids: rebuild it with nn-ica build")
        width = (meta.get("widths") or {}).get(site)
        n_layers = meta.get("num_layers")
        for c in components:
            for layer, arr in c.neurons.items():
                if n_layers is not None and not 0 <= layer < n_layers:
                    raise NNError(f"component {c.id} names layer {layer}, but the templates are for a "
                                  f"{n_layers}-layer model: the file is inconsistent")
                if width is not None and arr.size and arr[-1] >= width:
                    raise NNError(f"component {c.id} names channel {arr[-1]} in layer {layer}, beyond "
                                  f"the {site} width {width}: the file is inconsistent")
        self.metadata = meta
        self.components = list(components)
        self._by_id = {c.id: c for c in self.components}

    # ------------------------------------------------------------------ access
    @property
    def site(self) -> str:
        return self.metadata["site"]

    @property
    def layers(self) -> list[int] | None:
        """The layers the templates were built on (None when the file does not say)."""
        layers = self.metadata.get("layers")
        return None if layers is None else sorted(int(x) for x in layers)

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.components]

    def __len__(self) -> int:
        return len(self.components)

    def __getitem__(self, cid: int) -> Component:
        return self.component(cid)

    def component(self, cid: int) -> Component:
        if cid not in self._by_id:
            raise NNError(f"component {cid} is not in the templates (ids {_ranges(self.ids)}): "
                          "pick ids that nn-ica show lists")
        return self._by_id[cid]

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = list(ids)
        if not ids:
            raise NNError("no component ids given: pass --components, e.g. 0 or 0,2,5")
        missing = [i for i in ids if i not in self._by_id]
        if missing:
            raise NNError(f"component id(s) {', '.join(map(str, missing))} not in the templates "
                          f"(ids {_ranges(self.ids)}): pick ids that nn-ica show lists")
        return ids

    def largest(self) -> int:
        """Id of the component explaining most variance (the first, as built)."""
        with_var = [c for c in self.components if c.variance is not None]
        if with_var:
            return max(with_var, key=lambda c: c.variance).id
        return max(self.components, key=lambda c: c.size).id

    # ------------------------------------------------------------------ checks
    def check(self, model, *, site: str | None = None, check_id: bool = True) -> Templates:
        """Raise :class:`NNError` unless these templates fit ``model`` (and ``site``)."""
        sig = model_signature(model)
        meta = self.metadata
        made_for = f"model '{meta.get('model_id') or '?'}' at site {self.site}"
        if site is not None and site != self.site:
            raise NNError(f"the templates were built for {made_for}, not site {site}: build templates "
                          f"for {site} or drop --site")
        mid = meta.get("model_id")
        if check_id and mid and sig["model_id"] and mid != sig["model_id"]:
            raise NNError(f"the templates were built for {made_for}, not model '{sig['model_id']}': "
                          "build templates for this model (or pass --ignore-model-id if the weights are the same)")
        if meta.get("model_type") and meta["model_type"] != sig["model_type"]:
            raise NNError(f"the templates were built for {made_for} (a {meta['model_type']} model), not "
                          f"'{sig['model_id']}' (a {sig['model_type']} model): build templates for this model")
        if meta.get("num_layers") is not None and meta["num_layers"] != sig["num_layers"]:
            raise NNError(f"the templates were built for {made_for} with {meta['num_layers']} layers, "
                          f"not '{sig['model_id']}' with {sig['num_layers']}: build templates for this model")
        width = (meta.get("widths") or {}).get(self.site)
        if width is not None and width != sig["widths"][self.site]:
            raise NNError(f"the templates were built for {made_for} (width {width}), not '{sig['model_id']}' "
                          f"(width {sig['widths'][self.site]}): build templates for this model")
        self.neuronset(self.ids, model=model)  # every index within range
        return self

    # ------------------------------------------------------------------ conversion
    def neuronset(self, ids: Iterable[int] | None = None, *, model=None) -> NeuronSet:
        """The union of components ``ids`` (all when None) as a NeuronSet on the templates' site.

        With ``model`` the set is stamped with (and validated against) its signature;
        otherwise the signature recorded in the templates is used."""
        ids = self.ids if ids is None else self.check_ids(ids)
        entries: dict[tuple[int, str], np.ndarray] = {}
        for cid in ids:
            for layer, arr in self._by_id[cid].neurons.items():
                key = (layer, self.site)
                entries[key] = np.union1d(entries.get(key, np.zeros(0, np.int64)), arr)
        params = {"components": list(ids), "percentile": self.metadata.get("percentile"),
                  "backend": self.metadata.get("backend"), "seed": self.metadata.get("seed")}
        # The layers the templates analysed: a selection says nothing about the others, so
        # preserve masks only these layers (nn_core.intervene.masks honours meta["layers"]).
        scope = {"layers": [int(x) for x in self.layers]} if self.layers is not None else {}
        if model is not None:
            return NeuronSet.for_model(model, entries, sites=[self.site], method="ica", parameters=params, **scope)
        meta = {k: self.metadata[k] for k in ("model_id", "model_type", "num_layers", "widths")
                if self.metadata.get(k) is not None}
        return NeuronSet(entries, {**meta, "sites": [self.site], "method": "ica", "parameters": params, **scope})

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return {"format": FORMAT, "metadata": self.metadata,
                "components": [c.to_dict() for c in self.components]}

    @classmethod
    def from_dict(cls, obj: Mapping) -> Templates:
        if not isinstance(obj, Mapping):
            raise NNError("templates file is not a JSON object: pass an nn-ica or FunctionalNetworksSFT templates file")
        fmt = obj.get("format")
        if fmt == FORMAT:
            comps = obj.get("components")
            if not isinstance(comps, list):
                raise NNError("templates file has no component list: rebuild it with nn-ica build")
            return cls(obj.get("metadata") or {}, [Component.from_dict(c) for c in comps])
        if fmt is None and isinstance(obj.get("components"), Mapping):
            return cls.from_fnsft(obj)
        raise NNError(f"not an ICA templates file (format {fmt!r}, expected {FORMAT!r} or "
                      "FunctionalNetworksSFT templates): pass a file written by nn-ica build")

    @classmethod
    def from_fnsft(cls, obj: Mapping, *, site: str = "mlp_act") -> Templates:
        """Import FunctionalNetworksSFT templates through :mod:`nn_core.select.formats` (their masks
        act on the down-projection input, i.e. ``mlp_act``). Numeric component ids are kept;
        other names get ids 0, 1, ... in file order and keep their name as ``name``."""
        from nn_core.select.formats import neuronsets_from_fnsft

        sets = neuronsets_from_fnsft(obj, site=site)
        meta_in = dict(obj.get("metadata") or obj.get("meta") or {}) if isinstance(obj, Mapping) else {}
        numeric = all(k.isdigit() for k in sets)
        comps = []
        for pos, (name, ns) in enumerate(sets.items()):
            neurons = {ref.layer: idx.numpy().astype(np.int64) for ref, idx in ns.items()}
            extra = {} if numeric else {"name": name}
            comps.append(Component(int(name) if numeric else pos, neurons, extra=extra))
        meta = {"site": site, "source": "FunctionalNetworksSFT", "fnsft_metadata": meta_in}
        for key in ("num_layers", "n_layers", "num_hidden_layers"):
            if isinstance(meta_in.get(key), int):
                meta["num_layers"] = meta_in[key]
                break
        name = meta_in.get("model_name") or meta_in.get("model_id")
        if isinstance(name, str) and name:
            meta["model_id"] = name
        return cls(meta, comps)

    def save(self, path) -> Path:
        from nn_core.io import atomic_write_json

        return atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path) -> Templates:
        from nn_core.io import read_json

        return cls.from_dict(read_json(path, what="templates", fix="build one with nn-ica build"))

    # ------------------------------------------------------------------ summaries
    def summary(self) -> str:
        """Human-readable table: per component, size and sizes per layer."""
        m = self.metadata
        lines = [f"ICA templates: model {m.get('model_id') or '?'}, site {self.site}, "
                 f"{len(self)} components"]
        if m.get("n_tokens") is not None:
            lines.append(f"  data: {', '.join(m.get('datasets') or [])}; {m.get('n_samples')} samples, "
                         f"{m.get('n_tokens')} tokens used of {m.get('n_tokens_seen')}")
        if m.get("pca"):
            lines.append(f"  PCA {m['pca'].get('components')} dims, explained variance "
                         f"{m['pca'].get('explained_variance_total', float('nan')):.3f}")
        if m.get("ica"):
            ica = m["ica"]
            state = "converged" if ica.get("converged") else "NOT converged"
            lines.append(f"  FastICA ({m.get('backend')}, seed {m.get('seed')}): {state} after "
                         f"{ica.get('n_iter')} iterations (tol {ica.get('tol')})")
        lines.append(f"  {'id':>4} {'size':>7} {'var':>8}  per layer (layer:count)")
        for c in self.components:
            var = f"{c.variance:.4f}" if c.variance is not None else "-"
            per = " ".join(f"{k}:{v}" for k, v in c.layer_sizes().items())
            lines.append(f"  {c.id:>4} {c.size:>7} {var:>8}  {per}")
        return "\n".join(lines)


def _ranges(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids))


def component_iou(a: Component, b: Component) -> float:
    """|a ∩ b| / |a ∪ b| over (layer, channel) pairs (1.0 for two empty components)."""
    inter = union = 0
    for layer in set(a.neurons) | set(b.neurons):
        x = a.neurons.get(layer, np.zeros(0, np.int64))
        y = b.neurons.get(layer, np.zeros(0, np.int64))
        i = np.intersect1d(x, y, assume_unique=True).size
        inter += i
        union += x.size + y.size - i
    return 1.0 if union == 0 else inter / union


def match_templates(a: Templates, b: Templates) -> list[dict]:
    """Pair the components of ``a`` and ``b`` one to one, maximising the total IoU
    (Hungarian algorithm). Returns ``[{"a": id, "b": id, "iou": x}, ...]`` sorted by IoU,
    best first; components left over (different counts) are not listed."""
    from scipy.optimize import linear_sum_assignment

    if a.site != b.site:
        raise NNError(f"cannot match templates of site {a.site} with templates of site {b.site}: "
                      "build both for the same site")
    for key in ("num_layers",):
        va, vb = a.metadata.get(key), b.metadata.get(key)
        if va is not None and vb is not None and va != vb:
            raise NNError(f"cannot match templates for different models ({key} {va} vs {vb})")
    if not a.components or not b.components:
        return []
    iou = np.array([[component_iou(x, y) for y in b.components] for x in a.components])
    rows, cols = linear_sum_assignment(-iou)
    pairs = [{"a": a.components[r].id, "b": b.components[c].id, "iou": float(iou[r, c])}
             for r, c in zip(rows, cols, strict=True)]
    return sorted(pairs, key=lambda p: -p["iou"])
