"""Groups of weights or neurons from safety and utility scores.

Methods (``x%`` of a comparison unit; the unit is the **output row** of each weight
matrix with ``scope="row"``, the anchor's and Wanda's comparison group, or all scored
weights together with ``scope="global"``):

* ``snip-top``: the top k % by safety score.
* ``utility-top``: the top k % by utility score.
* ``set-diff``: the top q % by safety score that are **not** in the top p % by utility
  score (Wei et al. 2024): S(q) \\ U(p), both taken per unit.
* ``random``: per weight matrix (per layer for neurons) as many entries as a reference
  group holds, drawn uniformly without replacement (seeded).

Counts: per row k_row = int(n_in · x) (the anchor's ``int(W.shape[1] * ratio)``), globally
k = round(x · total). Granularities: ``weights`` (a :class:`~nn_core.select.WeightSet`
over every scored matrix) and ``neurons`` (a :class:`~nn_core.select.NeuronSet` of MLP
down-projection channels: ``mlp_act`` = input channel j scored by Σ_i S_ij, the column
sum; ``mlp_out`` = output row i scored by Σ_j S_ij), where "row" scope means per layer.
Neurons need full scores (``nn-drift score --store full``); weights also work from top
storage when x <= the stored fraction and the stored mode equals the scope.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from nn_core.errors import NNError
from nn_drift.scores import ScoreTable, flat_rows, top_weightset

METHODS = ("snip-top", "set-diff", "utility-top", "random")
SCOPES = ("row", "global")
GRANULARITIES = ("weights", "neurons")
SITES = ("mlp_act", "mlp_out")


def _check_frac(x: float, what: str) -> float:
    if not 0 < x <= 1:
        raise NNError(f"{what} must be a percentage in (0, 100], got {100 * x:g}")
    return float(x)


def _ws_meta(table: ScoreTable, method: str, params: dict) -> dict:
    return {**{k: v for k, v in table.model_meta.items() if k != "down_weights"},
            "shapes": {p.name: list(p.shape) for p in table.params},
            "method": f"nn-drift:{method}", "parameters": params}


def top_weights(table: ScoreTable, dataset: str, metric: str, frac: float, scope: str):
    """The top ``frac`` of (dataset, metric) scores per output row or globally."""
    from nn_core.select.weightset import WeightSet

    _check_frac(frac, "the fraction")
    if scope not in SCOPES:
        raise NNError(f"unknown scope '{scope}': use {' or '.join(SCOPES)}")
    key = table.check_key(dataset, metric)
    meta = _ws_meta(table, f"top:{metric}:{dataset}", {"fraction": frac, "scope": scope})
    if key in table.values:
        if scope == "row":
            ws = top_weightset(table, table.values[key], frac, "row", method="")
            # top_weightset keeps at least 1 per row; the count rule here is int(n_in * frac)
            entries = {}
            for p in table.params:
                k = int(p.n_in * frac)
                if k == 0:
                    continue
                idx, sc = ws.indices_numpy(p.name), ws.scores(p.name).numpy()
                rows = flat_rows(p, idx)
                keep = _top_per_row(rows, sc, k)
                entries[p.name] = (idx[keep], sc[keep])
            return WeightSet({n: e[0] for n, e in entries.items()}, meta,
                             {n: e[1] for n, e in entries.items()})
        return top_weightset(table, table.values[key], frac, "global", method="").with_meta(**meta)
    # top storage: exact only inside what was stored
    if frac > table.fraction + 1e-12 or scope != table.mode:
        raise NNError(f"these scores keep only the top {100 * table.fraction:g} % per "
                      f"{table.mode}: ask for at most that with --scope {table.mode}, or score "
                      "again with --store full")
    ws = table.sparse[key]
    entries = {}
    if scope == "row":
        for p in table.params:
            k = int(p.n_in * frac)
            if k == 0 or p.name not in ws:
                continue
            idx, sc = ws.indices_numpy(p.name), ws.scores(p.name).numpy()
            keep = _top_per_row(flat_rows(p, idx), sc, k)
            entries[p.name] = (idx[keep], sc[keep])
    else:
        total = sum(p.shape[0] * p.shape[1] for p in table.params)
        k = max(1, round(frac * total))
        names = ws.names()
        allsc = np.concatenate([ws.scores(n).numpy() for n in names])
        owner = np.concatenate([np.full(len(ws.indices_numpy(n)), i) for i, n in enumerate(names)])
        flat = np.concatenate([ws.indices_numpy(n) for n in names])
        order = np.lexsort((flat, owner, -allsc))[:k]
        for i, n in enumerate(names):
            sel = order[owner[order] == i]
            if sel.size:
                entries[n] = (flat[sel], allsc[sel])
    return WeightSet({n: e[0] for n, e in entries.items()}, meta,
                     {n: e[1] for n, e in entries.items()})


def _top_per_row(rows: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest scores within each row (ties: lower position)."""
    order = np.lexsort((np.arange(rows.size), -scores, rows))
    r = rows[order]
    start = np.searchsorted(r, r, side="left")
    rank = np.arange(r.size) - start
    return np.sort(order[rank < k])


def neuron_scores(table: ScoreTable, dataset: str, metric: str, site: str) -> dict[int, torch.Tensor]:
    """Per layer, the score of each down-projection channel: the sum of its weights'
    scores (``mlp_act``: over the output rows of input column j; ``mlp_out``: over the
    input columns of output row i)."""
    if site not in SITES:
        raise NNError(f"unknown neuron site '{site}': use {' or '.join(SITES)}")
    key = table.check_key(dataset, metric)
    if key not in table.values:
        raise NNError("neuron groups need every score: score with --store full")
    down = table.model_meta.get("down_weights") or {}
    if not down:
        raise NNError("these scores do not record the down-projections: score again")
    out = {}
    for layer, name in sorted(down.items(), key=lambda kv: int(kv[0])):
        if name not in table.values[key]:
            continue  # layer not scored
        p = table.param(name)
        s = table.values[key][name].double()
        s = s.t() if p.out_dim == 1 else s  # (out, in)
        out[int(layer)] = (s.sum(0) if site == "mlp_act" else s.sum(1)).float()
    if not out:
        raise NNError("no down-projection weights were scored: score the mlp modules")
    return out


def top_neurons(table: ScoreTable, dataset: str, metric: str, frac: float, scope: str,
                site: str) -> dict[int, np.ndarray]:
    """Top ``frac`` of the channels per layer (``row`` scope) or over all layers."""
    _check_frac(frac, "the fraction")
    ns = neuron_scores(table, dataset, metric, site)
    if scope == "row":
        return {layer: np.sort(torch.topk(v, int(v.numel() * frac)).indices.numpy())
                for layer, v in ns.items() if int(v.numel() * frac) > 0}
    layers = list(ns)
    allv = torch.cat([ns[layer] for layer in layers])
    k = max(1, round(frac * allv.numel()))
    top = torch.topk(allv, k).indices.numpy()
    bounds = np.cumsum([0] + [ns[layer].numel() for layer in layers])
    out = {}
    for i, layer in enumerate(layers):
        sel = top[(top >= bounds[i]) & (top < bounds[i + 1])] - bounds[i]
        if sel.size:
            out[layer] = np.sort(sel)
    return out


def _neuronset(table: ScoreTable, entries: Mapping[int, np.ndarray], site: str, method: str,
               params: dict):
    from nn_core.select.neuronset import NeuronSet

    meta = {k: table.model_meta[k] for k in ("model_id", "model_type", "num_layers", "widths")
            if k in table.model_meta}
    return NeuronSet({(layer, site): idx for layer, idx in entries.items()},
                     {**meta, "sites": [site], "method": f"nn-drift:{method}", "parameters": params})


def make_groups(table: ScoreTable, methods: Sequence[str], *, k: float = 0.01, q: float = 0.1,
                p: float = 0.1, scope: str = "row", granularity: str = "weights",
                site: str = "mlp_act", metric: str = "snip", like: str | None = None,
                seed: int = 0, safety: str = "safety", utility: str = "utility") -> dict:
    """``{method: WeightSet | NeuronSet}``. ``k``, ``q``, ``p`` are fractions (0, 1];
    ``random`` copies the per-matrix (per-layer) counts of ``like`` (default: ``set-diff``
    when asked for or when nothing else is, else the first method asked for). Empty groups raise."""
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise NNError(f"unknown method '{bad[0] if bad else ''}': use {', '.join(METHODS)}")
    if granularity not in GRANULARITIES:
        raise NNError(f"unknown granularity '{granularity}': use {' or '.join(GRANULARITIES)}")
    if scope not in SCOPES:
        raise NNError(f"unknown scope '{scope}': use {' or '.join(SCOPES)}")
    for x, what in ((k, "k"), (q, "q"), (p, "p")):
        _check_frac(x, what)
    neurons = granularity == "neurons"

    def top(ds: str, frac: float):
        if neurons:
            return _neuronset(table, top_neurons(table, ds, metric, frac, scope, site), site,
                              f"top:{metric}:{ds}", {"fraction": frac, "scope": scope})
        return top_weights(table, ds, metric, frac, scope)

    params = {"metric": metric, "scope": scope, "granularity": granularity,
              **({"site": site} if neurons else {})}
    out: dict = {}
    for m in methods:
        if m == "random":
            continue
        if m == "snip-top":
            g = top(safety, k).with_meta(method=f"nn-drift:{m}", parameters={**params, "k": k})
        elif m == "utility-top":
            g = top(utility, k).with_meta(method=f"nn-drift:{m}", parameters={**params, "k": k})
        else:
            g = (top(safety, q) - top(utility, p)).with_meta(
                method=f"nn-drift:{m}", parameters={**params, "q": q, "p": p})
        if not len(g):
            fix = ("raise q or lower p" if m == "set-diff" else "raise k")
            raise NNError(f"the {m} group is empty (k={100 * k:g} %, q={100 * q:g} %, "
                          f"p={100 * p:g} %): {fix}")
        out[m] = g
    if "random" in methods:
        others = [m for m in methods if m != "random"]
        ref_name = like or ("set-diff" if "set-diff" in others or not others else others[0])
        if ref_name == "random" or ref_name not in METHODS:
            raise NNError(f"--like must name a non-random method, got '{ref_name}'")
        ref = out.get(ref_name) or make_groups(
            table, [ref_name], k=k, q=q, p=p, scope=scope, granularity=granularity, site=site,
            metric=metric, seed=seed, safety=safety, utility=utility)[ref_name]
        rnd = ref.random_like(seed)
        out["random"] = rnd.with_meta(method="nn-drift:random",
                                      parameters={**params, "like": ref_name, "seed": seed})
    return out


def summary(groups: Mapping) -> dict:
    """Sizes per layer and per module (weights) or site (neurons), and pairwise Jaccard."""
    sizes = {}
    for name, g in groups.items():
        if hasattr(g, "shapes"):  # WeightSet
            per_module: dict[str, int] = {}
            for pname, n in g.counts().items():
                mod = pname.rsplit(".", 2)[-2] if pname.count(".") >= 2 else pname
                per_module[mod] = per_module.get(mod, 0) + n
            sizes[name] = {"total": len(g), "per_layer": {str(k): v for k, v in g.layer_counts().items()},
                           "per_module": per_module}
        else:
            sizes[name] = {"total": len(g),
                           "per_layer": {str(k): v for k, v in g.layer_counts().items()},
                           "per_site": {s: sum(v for r, v in g.counts().items() if r.site == s)
                                        for s in g.sites}}
    jac = {f"{a}|{b}": groups[a].jaccard(groups[b]) for a, b in itertools.combinations(groups, 2)}
    return {"sizes": sizes, "jaccard": jac}
