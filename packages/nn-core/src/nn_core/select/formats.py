"""Foreign selection formats: LoKI position JSON and FunctionalNetworksSFT templates.

These are import/export functions only; inside nn every selection is a NeuronSet.

**LoKI position JSON** (``target_pos``): ``List[List[int]]``, exactly one list per decoder
layer, each the positions LoKI makes trainable in that layer's MLP down-projection.
LoKI's ``LoKILinear`` splits the down-projection weight along ``out_features`` (its
rows), so a position is an *output* channel of the down-projection: the ``mlp_out``
site (width hidden_size). That is the default ``site``; pass ``site="mlp_act"`` for
variants that index the down-projection's inputs.

**FunctionalNetworksSFT (FNSFT) template JSON**: ICA components, each a map from layer
to the channel indices masked at the *input* of the MLP down-projection (the ``mlp_act``
site), plus free-form metadata::

    {"components": {"0": {"layer_0": [12, 40], "layer_1": [7]}, "1": {...}},
     "metadata": {"num_components": 2, "model_name": "...", ...}}

The reader also accepts: components as a list, integer-like or ``"component_3"`` ids,
layer keys ``"layer_3"``, ``"3"``, ``"layers.3"`` or a module path such as
``"model.layers.3.mlp.down_proj"``, a component given as a list of per-layer lists, a
bare layer map (one component), and ``"meta"`` instead of ``"metadata"``.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from nn_core.errors import NNError
from nn_core.io import read_json
from nn_core.model.sites import SITES
from nn_core.select.neuronset import NeuronSet

LOKI_SITE = "mlp_out"
FNSFT_SITE = "mlp_act"


# ------------------------------------------------------------------ shared helpers
def _read_json(obj_or_path, what: str):
    """Return (parsed object, source label)."""
    if isinstance(obj_or_path, (str, Path)):
        return read_json(obj_or_path, what=what), str(obj_or_path)
    return obj_or_path, "<object>"


def _int_list(values, where: str) -> list[int]:
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise NNError(f"{where} must be a list of integers, got {type(values).__name__}")
    out = []
    for v in values:
        # bool is an int subclass; a float like 3.0 is tolerated, 3.5 is not
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise NNError(f"{where} holds {v!r}: neuron indices must be integers")
        if v < 0:
            raise NNError(f"{where} holds negative index {int(v)}: indices count from 0")
        out.append(int(v))
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _build(entries: dict, site: str, *, model, num_layers, width, method, parameters,
           extra_meta: Mapping | None = None) -> NeuronSet:
    """A NeuronSet for ``model`` (validated) or from the given sizes (checked by NeuronSet)."""
    if site not in SITES:
        raise NNError(f"unknown site '{site}': use one of {', '.join(SITES)}")
    meta = {"sites": [site], "method": method, "parameters": parameters, **(extra_meta or {})}
    if model is not None:
        from nn_core.model.adapters import get_adapter

        ad = get_adapter(model)
        if num_layers is not None and num_layers != ad.num_layers:
            raise NNError(f"the {method} selection has {num_layers} layers but the model has "
                          f"{ad.num_layers}: it was made for another model")
        try:
            return NeuronSet.for_model(model, entries, **meta)
        except NNError as exc:
            raise NNError(f"{exc} (importing {method})") from None
    meta.update(num_layers=num_layers, created_at=_now())
    if width is not None:
        meta["widths"] = {site: int(width)}
    return NeuronSet(entries, meta)


def _pick_site(ns: NeuronSet, site: str, fmt: str) -> str:
    if site not in SITES:
        raise NNError(f"unknown site '{site}': use one of {', '.join(SITES)}")
    selected = sorted({r.site for r in ns.counts()}, key=SITES.index)
    if (selected and selected != [site]) or (not selected and ns.sites and site not in ns.sites):
        have = ", ".join(selected or ns.sites)
        raise NNError(f"{fmt} holds {site} neurons but this set is about {have}: filter or "
                      f"convert it first, or pass site= if your variant of the format means {have}")
    return site


def _num_layers_of(ns: NeuronSet) -> int:
    n = ns.meta.get("num_layers")
    if n is None:
        n = max((r.layer for r in ns.counts()), default=-1) + 1
    return int(n)


def _write_json(path, obj) -> None:
    from nn_core.io import atomic_write_json

    atomic_write_json(path, obj, indent=None)


# ------------------------------------------------------------------ LoKI
def neuronset_from_loki(obj_or_path, model=None, num_layers: int | None = None,
                        width: int | None = None, *, site: str = LOKI_SITE) -> NeuronSet:
    """Read a LoKI position list (``List[List[int]]``, one list per layer).

    With ``model`` the set is stamped with its signature and validated (layer count,
    index range). Without it, ``num_layers`` (default: the list's length) and ``width``
    (optional) are checked when given."""
    obj, source = _read_json(obj_or_path, "LoKI position")
    if isinstance(obj, Mapping) and "target_pos" in obj:  # a LoKI model config
        obj = obj["target_pos"]
    if not isinstance(obj, list) or not all(isinstance(x, list) for x in obj):
        raise NNError(f"{source} is not a LoKI position list: expected a JSON list of per-layer "
                      "lists of neuron indices, e.g. [[3, 17], [], [5]]")
    if num_layers is not None and len(obj) != num_layers:
        raise NNError(f"{source} has {len(obj)} layer lists but the model has {num_layers} "
                      "layers: LoKI needs exactly one list per layer")
    entries = {}
    for layer, values in enumerate(obj):
        idx = _int_list(values, f"layer {layer} of {source}")
        if width is not None and idx and max(idx) >= width:
            raise NNError(f"layer {layer} of {source} holds index {max(idx)}, out of range for "
                          f"width {width}: the positions were made for another model")
        entries[(layer, site)] = idx
    return _build(entries, site, model=model, num_layers=len(obj), width=width,
                  method="loki", parameters={"source": source, "site": site})


def neuronset_to_loki(ns: NeuronSet, path=None, *, site: str = LOKI_SITE,
                      num_layers: int | None = None) -> list[list[int]]:
    """The LoKI position list of ``ns``'s ``site`` neurons (one list per layer, sorted).

    Writes it to ``path`` (atomically) when given."""
    site = _pick_site(ns, site, "LoKI position JSON")
    n = num_layers if num_layers is not None else _num_layers_of(ns)
    deepest = max((r.layer for r in ns.counts()), default=-1)
    if deepest >= n:
        raise NNError(f"the set selects layer {deepest} but only {n} layers were asked for")
    out = [ns.indices(layer, site).tolist() for layer in range(n)]
    if path is not None:
        _write_json(path, out)
    return out


# ------------------------------------------------------------------ FNSFT
_INT_RE = re.compile(r"\d+")


def _layer_of_key(key, where: str) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    runs = _INT_RE.findall(str(key))
    if len(runs) != 1:
        raise NNError(f"cannot read a layer number from key '{key}' in {where}: "
                      "use keys like 'layer_3'")
    return int(runs[0])


def _component_id(key) -> str:
    """'3', 3 and 'component_3' all name component '3'; other names are kept as they are."""
    runs = _INT_RE.findall(str(key))
    return runs[0] if len(runs) == 1 else str(key)


def _layer_map(comp, where: str) -> dict[int, list[int]]:
    if isinstance(comp, Mapping):
        items = [(_layer_of_key(k, where), v) for k, v in comp.items()]
    elif isinstance(comp, list) and all(isinstance(x, list) for x in comp):
        items = list(enumerate(comp))
    else:
        raise NNError(f"{where} must map layers to channel lists, e.g. {{\"layer_0\": [3, 7]}}")
    out: dict[int, list[int]] = {}
    for layer, values in items:
        if layer in out:
            raise NNError(f"layer {layer} appears twice in {where}")
        out[layer] = _int_list(values, f"layer {layer} of {where}")
    return out


def _looks_like_layer_map(obj: Mapping) -> bool:
    """A bare ``{layer: [channels]}`` map (one component) rather than ``{id: component}``."""
    if not obj:
        return False
    if all(str(k).startswith(("layer", "model.", "transformer.")) for k in obj):
        return True
    return all(isinstance(v, list) and v and not isinstance(v[0], list) for v in obj.values())


def _fnsft_components(obj, source: str) -> tuple[dict[str, dict[int, list[int]]], dict]:
    if not isinstance(obj, (Mapping, list)):
        raise NNError(f"{source} is not an FNSFT template: expected a JSON object with "
                      "'components' (component -> layer -> channel indices)")
    metadata: dict = {}
    comps = obj
    if isinstance(obj, Mapping):
        metadata = dict(obj.get("metadata") or obj.get("meta") or {})
        if "components" in obj:
            comps = obj["components"]
        elif _looks_like_layer_map(obj):
            comps = {"0": obj}
        else:
            comps = {k: v for k, v in obj.items() if k not in ("metadata", "meta")}
    if isinstance(comps, list):
        comps = {str(i): c for i, c in enumerate(comps)}
    if not isinstance(comps, Mapping) or not comps:
        raise NNError(f"{source} has no components: an FNSFT template needs "
                      "{\"components\": {\"0\": {\"layer_0\": [...]}}}")
    out = {}
    for key, comp in comps.items():
        cid = _component_id(key)
        if cid in out:
            raise NNError(f"component {cid} appears twice in {source}")
        out[cid] = _layer_map(comp, f"component {key} of {source}")
    return out, metadata


def _meta_num_layers(metadata: Mapping) -> int | None:
    for key in ("num_layers", "n_layers", "num_hidden_layers"):
        v = metadata.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def neuronsets_from_fnsft(obj_or_path, model=None, num_layers: int | None = None,
                          width: int | None = None, *, components=None,
                          site: str = FNSFT_SITE) -> dict[str, NeuronSet]:
    """Read an FNSFT template: ``{component id: NeuronSet}`` (ids as strings, sorted).

    ``components`` picks some ids (default: all). The layer count comes from ``model``,
    ``num_layers``, the template's metadata, or the deepest layer named, in that order."""
    obj, source = _read_json(obj_or_path, "FNSFT template")
    comps, metadata = _fnsft_components(obj, source)
    if components is not None:
        wanted = [str(c) for c in components]
        missing = [c for c in wanted if c not in comps]
        if missing:
            raise NNError(f"component(s) {', '.join(missing)} not in {source}: it has "
                          f"{', '.join(sorted(comps, key=_sort_key))}")
        comps = {c: comps[c] for c in wanted}
    deepest = max((layer for c in comps.values() for layer in c), default=-1)
    n = num_layers if num_layers is not None else _meta_num_layers(metadata)
    if n is None and model is None:
        n = deepest + 1
    if n is not None and deepest >= n:
        raise NNError(f"{source} names layer {deepest} but the model has {n} layers: "
                      "it was made for another model")
    out = {}
    for cid in sorted(comps, key=_sort_key):
        entries = {(layer, site): idx for layer, idx in comps[cid].items()}
        if width is not None:
            for layer, idx in comps[cid].items():
                if idx and max(idx) >= width:
                    raise NNError(f"component {cid}, layer {layer} of {source} holds index "
                                  f"{max(idx)}, out of range for width {width}")
        out[cid] = _build(entries, site, model=model, num_layers=n, width=width, method="fnsft",
                          parameters={"source": source, "component": cid, "site": site,
                                      "template_metadata": metadata})
    return out


def neuronset_from_fnsft(obj_or_path, model=None, num_layers: int | None = None,
                         width: int | None = None, *, components=None,
                         site: str = FNSFT_SITE) -> NeuronSet:
    """The union of some components of an FNSFT template (default: all of them), the set
    FNSFT masks for ``--ica_component_ids``."""
    sets = neuronsets_from_fnsft(obj_or_path, model, num_layers, width,
                                 components=components, site=site)
    ids = list(sets)
    union = sets[ids[0]]
    for cid in ids[1:]:
        union = union | sets[cid]
    params = {**union.meta["parameters"], "component": None, "components": ids}
    return union.with_meta(parameters=params)


def _sort_key(cid: str):
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)


def neuronset_to_fnsft(sets, path=None, *, metadata: Mapping | None = None,
                       site: str = FNSFT_SITE) -> dict:
    """An FNSFT template from one NeuronSet (component "0"), a list (ids 0..n-1) or a
    mapping ``{id: NeuronSet}``. Writes it to ``path`` (atomically) when given."""
    if isinstance(sets, NeuronSet):
        sets = {"0": sets}
    elif isinstance(sets, Sequence) and not isinstance(sets, (str, bytes)):
        sets = {str(i): s for i, s in enumerate(sets)}
    if not isinstance(sets, Mapping) or not sets:
        raise NNError("neuronset_to_fnsft needs a NeuronSet, a list or a {id: NeuronSet} mapping")
    components, n_layers, model_id = {}, 0, None
    for cid, ns in sets.items():
        if not isinstance(ns, NeuronSet):
            raise NNError(f"component {cid} is a {type(ns).__name__}, not a NeuronSet")
        _pick_site(ns, site, "an FNSFT template")
        layers = sorted({r.layer for r in ns.counts() if r.site == site})
        components[str(cid)] = {f"layer_{i}": ns.indices(i, site).tolist() for i in layers}
        n_layers = max(n_layers, _num_layers_of(ns))
        model_id = model_id or ns.meta.get("model_id")
    meta = {"num_components": len(components), "num_layers": n_layers, "site": site,
            "model_name": model_id, "exported_by": "nn_core.select.formats", "created_at": _now()}
    meta.update(metadata or {})
    out = {"components": components, "metadata": meta}
    if path is not None:
        _write_json(path, out)
    return out
