"""``nn-core``: inspect a model's sites and work with selections.

The capture/lesion/restore walk-through is ``packages/nn-core/examples/capture_and_lesion.py``.

    nn-core sites smollm2-135m                 layers, module paths and widths
    nn-core neurons info sel.json              counts per layer and site, metadata
    nn-core neurons compare a.json b.json      overall and per-layer Jaccard / overlap
    nn-core neurons combine a.json b.json --op union --out c.json
    nn-core neurons import --from loki pos.json --model smollm2-135m --out sel.json
    nn-core neurons export --to fnsft sel.json --out template.json

Selections are NeuronSet JSON files; ``info``, ``compare`` and ``combine`` also take
WeightSet ``.safetensors`` files.
"""

from __future__ import annotations

import argparse
import json

from nn_core.errors import NNError
from nn_core.run.cli import add_common_args, cli_main, make_parser

PROG = "nn-core"
OPS = {"union": "|", "intersection": "&", "difference": "-", "symmetric-difference": "^"}


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _load_selection(path: str):
    """A WeightSet (``.safetensors``) or a NeuronSet (JSON)."""
    from pathlib import Path

    from nn_core.select.neuronset import NeuronSet
    from nn_core.select.weightset import WeightSet

    p = Path(path)
    if not p.is_file():
        raise NNError(f"selection file '{p}' does not exist: check the path")
    if p.suffix == ".safetensors":
        return WeightSet.load(p)
    try:
        return NeuronSet.load(p)
    except UnicodeDecodeError:  # binary: a WeightSet under another name, or not a selection
        return WeightSet.load(p)


# ------------------------------------------------------------------ sites
def _load(args):
    from nn_core.model.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      seed=getattr(args, "seed", 0))


def sites_report(model) -> dict:
    """``describe()`` of the model's adapter plus one row per layer."""
    from nn_core.model.adapters import get_adapter

    ad = get_adapter(model)
    info = ad.describe()
    info["layers"] = [
        {"layer": i, "block": ad.layer_path(i), "down_proj": ad.down_proj_path(i),
         "down_weight_shape": list(ad.down_weight(i).shape), **ad.widths()}
        for i in range(ad.num_layers)
    ]
    return info


def print_sites(info: dict) -> None:
    w = info["widths"]
    print(f"model:     {info['model_id'] or '?'} ({info['model_type']}, adapter: {info['adapter']})")
    print(f"layers:    {info['num_layers']} at {info['layers_path']}")
    print(f"down-proj: {info['down_proj']}")
    print("sites:")
    for site, where in info["sites"].items():
        print(f"  {site:<8} width {w[site]:<6} {where}")
    rows = [("layer", "block", "down_proj", "weight", "mlp_act", "mlp_out", "resid")]
    for r in info["layers"]:
        rows.append((str(r["layer"]), r["block"], r["down_proj"],
                     "x".join(map(str, r["down_weight_shape"])),
                     str(r["mlp_act"]), str(r["mlp_out"]), str(r["resid"])))
    _table(rows)


def _table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())


def cmd_sites(args) -> int:
    model, _ = _load(args)
    info = sites_report(model)
    if args.json:
        _emit_json(info)
    else:
        print_sites(info)
    return 0


# ------------------------------------------------------------------ neurons info
def _meta_lines(meta: dict) -> list[str]:
    keys = ("model_id", "model_type", "num_layers", "widths", "sites", "method", "created_at")
    lines = [f"{k}: {meta[k]}" for k in keys if meta.get(k) is not None]
    if meta.get("parameters"):
        lines.append(f"parameters: {json.dumps(meta['parameters'])}")
    return lines


def neuron_info(ns) -> dict:
    meta = ns.meta
    widths = meta.get("widths") or {}
    n_layers = meta.get("num_layers") or (max((r.layer for r in ns.counts()), default=-1) + 1)
    rows = []
    for site in ns.sites:
        for layer in range(n_layers):
            n = int(ns.indices(layer, site).numel())
            width = widths.get(site)
            rows.append({"layer": layer, "site": site, "count": n, "width": width,
                         "fraction": (n / width) if width else None})
    return {"kind": "neuronset", "total": len(ns), "meta": meta, "per_layer": rows}


def weight_info(ws) -> dict:
    shapes = ws.shapes
    rows = []
    for name, n in ws.counts().items():
        numel = 1
        for d in shapes.get(name, []):
            numel *= d
        rows.append({"parameter": name, "layer": ws.layer_of(name), "count": n,
                     "shape": shapes.get(name), "fraction": n / numel if shapes.get(name) else None})
    return {"kind": "weightset", "total": len(ws), "has_scores": ws.has_scores,
            "meta": ws.meta, "per_layer": [{"layer": k, "count": v} for k, v in ws.layer_counts().items()],
            "per_parameter": rows}


def cmd_info(args) -> int:
    sel = _load_selection(args.file)
    from nn_core.select.weightset import WeightSet

    info = weight_info(sel) if isinstance(sel, WeightSet) else neuron_info(sel)
    if args.json:
        _emit_json(info)
        return 0
    print(f"{args.file}: {info['kind']}, {info['total']} selected")
    for line in _meta_lines(info["meta"]):
        print(f"  {line}")
    if info["kind"] == "neuronset":
        rows = [("layer", "site", "count", "width", "fraction")]
        for r in info["per_layer"]:
            frac = f"{r['fraction']:.2%}" if r["fraction"] is not None else "?"
            rows.append((str(r["layer"]), r["site"], str(r["count"]), str(r["width"] or "?"), frac))
    else:
        rows = [("parameter", "layer", "count", "shape", "fraction")]
        for r in info["per_parameter"]:
            frac = f"{r['fraction']:.3%}" if r["fraction"] is not None else "?"
            rows.append((r["parameter"], str(r["layer"]), str(r["count"]),
                         "x".join(map(str, r["shape"] or [])) or "?", frac))
    _table(rows)
    return 0


# ------------------------------------------------------------------ neurons compare
def _same_kind(a, b, what: str):
    if type(a) is not type(b):
        raise NNError(f"cannot {what} a {type(a).__name__} with a {type(b).__name__}: "
                      "convert the WeightSet with WeightSet.to_neuronset first")


def _check_models(a, b, ignore_model: bool) -> None:
    ma, mb = a.meta, b.meta
    if ma.get("num_layers") is not None and mb.get("num_layers") is not None \
            and ma["num_layers"] != mb["num_layers"]:
        raise NNError(f"the selections are for different models ({ma.get('model_id')!r}, "
                      f"{ma['num_layers']} layers vs {mb.get('model_id')!r}, {mb['num_layers']} "
                      "layers): compare selections made for the same model")
    wa, wb = ma.get("widths") or {}, mb.get("widths") or {}
    for site in set(wa) & set(wb):
        if wa[site] != wb[site]:
            raise NNError(f"the selections are for different models ({site} width {wa[site]} vs "
                          f"{wb[site]}): compare selections made for the same model")
    if ma.get("model_id") and mb.get("model_id") and ma["model_id"] != mb["model_id"] \
            and not ignore_model:
        raise NNError(f"the selections are for different models ('{ma['model_id']}' vs "
                      f"'{mb['model_id']}'): pass --ignore-model-id if they are the same weights")


def _strip_id(sel):
    return sel.with_meta(model_id=None)


def compare_neuronsets(a, b) -> dict:
    """Overall and per-(layer, site) overlap. ``expected_overlap`` is what two uniform
    random selections of the same per-layer sizes would share: sum |A_l| |B_l| / width_l."""
    widths = {**(b.meta.get("widths") or {}), **(a.meta.get("widths") or {})}
    n_layers = max(a.meta.get("num_layers") or 0, b.meta.get("num_layers") or 0,
                   max((r.layer + 1 for r in (a | b).counts()), default=0))
    sites = [s for s in ("mlp_act", "mlp_out", "resid") if s in a.sites or s in b.sites]
    inter_all = a & b
    rows, expected = [], 0.0
    for site in sites:
        for layer in range(n_layers):
            na, nb = int(a.indices(layer, site).numel()), int(b.indices(layer, site).numel())
            ov = int(inter_all.indices(layer, site).numel())
            union = na + nb - ov
            exp = (na * nb / widths[site]) if widths.get(site) else None
            expected += exp or 0.0
            rows.append({"layer": layer, "site": site, "a": na, "b": nb, "overlap": ov,
                         "jaccard": (ov / union) if union else 1.0, "expected_overlap": exp})
    n_a, n_b, ov = len(a), len(b), len(inter_all)
    return {
        "a": n_a, "b": n_b, "overlap": ov, "union": n_a + n_b - ov,
        "jaccard": a.jaccard(b),
        "overlap_coefficient": (ov / min(n_a, n_b)) if min(n_a, n_b) else None,
        "expected_overlap": expected if all(widths.get(s) for s in sites) else None,
        "per_layer": rows,
    }


def compare_weightsets(a, b) -> dict:
    rows = []
    for name in sorted(set(a.names()) | set(b.names())):
        ov = a.filter([name]).intersection_size(b.filter([name]))
        na, nb = a.counts().get(name, 0), b.counts().get(name, 0)
        rows.append({"parameter": name, "a": na, "b": nb, "overlap": ov,
                     "jaccard": ov / (na + nb - ov) if na + nb - ov else 1.0})
    ov = a.intersection_size(b)
    return {"a": len(a), "b": len(b), "overlap": ov, "union": len(a) + len(b) - ov,
            "jaccard": a.jaccard(b),
            "overlap_coefficient": (ov / min(len(a), len(b))) if min(len(a), len(b)) else None,
            "per_parameter": rows}


def cmd_compare(args) -> int:
    a, b = _load_selection(args.a), _load_selection(args.b)
    _same_kind(a, b, "compare")
    _check_models(a, b, args.ignore_model_id)
    if args.ignore_model_id:
        a, b = _strip_id(a), _strip_id(b)
    from nn_core.select.neuronset import NeuronSet

    report = compare_neuronsets(a, b) if isinstance(a, NeuronSet) else compare_weightsets(a, b)
    if args.json:
        _emit_json(report)
        return 0
    coef = report["overlap_coefficient"]
    print(f"A: {args.a} ({report['a']})   B: {args.b} ({report['b']})")
    line = (f"overlap {report['overlap']}, union {report['union']}, Jaccard {report['jaccard']:.4f}"
            f", overlap coefficient {coef:.4f}" if coef is not None else
            f"overlap {report['overlap']}, union {report['union']}, Jaccard {report['jaccard']:.4f}")
    if report.get("expected_overlap") is not None:
        line += f" (random selections of these sizes would share {report['expected_overlap']:.1f})"
    print(line)
    if "per_layer" in report:
        rows = [("layer", "site", "A", "B", "overlap", "jaccard")]
        for r in report["per_layer"]:
            rows.append((str(r["layer"]), r["site"], str(r["a"]), str(r["b"]), str(r["overlap"]),
                         f"{r['jaccard']:.4f}"))
    else:
        rows = [("parameter", "A", "B", "overlap", "jaccard")]
        for r in report["per_parameter"]:
            rows.append((r["parameter"], str(r["a"]), str(r["b"]), str(r["overlap"]),
                         f"{r['jaccard']:.4f}"))
    _table(rows)
    return 0


# ------------------------------------------------------------------ neurons combine
def cmd_combine(args) -> int:
    a, b = _load_selection(args.a), _load_selection(args.b)
    _same_kind(a, b, "combine")
    _check_models(a, b, args.ignore_model_id)
    if args.ignore_model_id:
        b = b.with_meta(model_id=a.meta.get("model_id"))
    op = OPS[args.op]
    result = {"|": a.__or__, "&": a.__and__, "-": a.__sub__, "^": a.__xor__}[op](b)
    result = result.with_meta(method=f"combine:{args.op}",
                              parameters={"op": args.op, "a": args.a, "b": args.b,
                                          "a_method": a.meta.get("method"),
                                          "b_method": b.meta.get("method")})
    result.save(args.out)
    print(f"{args.op}: {len(a)} {op} {len(b)} -> {len(result)}; wrote {args.out}")
    return 0


# ------------------------------------------------------------------ import / export
def cmd_import(args) -> int:
    from nn_core.select import formats

    model, _ = _load(args)
    if args.fmt == "loki":
        if args.component:
            raise NNError("--component applies to --from fnsft only")
        ns = formats.neuronset_from_loki(args.file, model=model, site=args.site or formats.LOKI_SITE)
    else:
        ns = formats.neuronset_from_fnsft(args.file, model=model, components=args.component,
                                          site=args.site or formats.FNSFT_SITE)
    ns.save(args.out)
    print(f"imported {len(ns)} neurons ({', '.join(ns.sites)}) from {args.fmt} {args.file}; "
          f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from nn_core.select import formats
    from nn_core.select.neuronset import NeuronSet

    ns = NeuronSet.load(args.file)
    if args.fmt == "loki":
        formats.neuronset_to_loki(ns, args.out, site=args.site or formats.LOKI_SITE)
    else:
        formats.neuronset_to_fnsft(ns, args.out, site=args.site or formats.FNSFT_SITE)
    print(f"exported {len(ns)} neurons to {args.fmt} {args.out}")
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Inspect a model's sites and work with neuron selections.",
                         "examples:\n  nn-core sites smollm2-135m\n"
                         "  nn-core neurons compare a.json b.json --json")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sites", help="print layers, module paths and site widths of a model")
    p.add_argument("model", nargs="?", default="smollm2-135m", metavar="MODEL",
                   help="alias, local folder or hub id (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_common_args(p, model=False, out=False)
    p.set_defaults(func=cmd_sites)

    neurons = sub.add_parser("neurons", help="inspect, compare, combine, import and export selections")
    nsub = neurons.add_subparsers(dest="neurons_command", metavar="ACTION")

    p = nsub.add_parser("info", help="counts per layer and site, and metadata")
    p.add_argument("file", metavar="FILE", help="NeuronSet .json or WeightSet .safetensors")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = nsub.add_parser("compare", help="overall and per-layer Jaccard and overlap of two selections")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--ignore-model-id", action="store_true",
                   help="compare selections whose model ids differ (same weights, other path)")
    p.set_defaults(func=cmd_compare)

    p = nsub.add_parser("combine", help="union, intersection or difference of two selections")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--op", required=True, choices=list(OPS))
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--ignore-model-id", action="store_true",
                   help="combine selections whose model ids differ (same weights, other path)")
    p.set_defaults(func=cmd_combine)

    p = nsub.add_parser("import", help="read a LoKI position JSON or an FNSFT template")
    p.add_argument("--from", dest="fmt", required=True, choices=["loki", "fnsft"])
    p.add_argument("file", metavar="FILE")
    p.add_argument("--out", required=True, metavar="FILE", help="NeuronSet JSON to write")
    p.add_argument("--component", nargs="+", metavar="ID",
                   help="FNSFT components to take (their union; default: all)")
    p.add_argument("--site", choices=["mlp_act", "mlp_out", "resid"],
                   help="site the positions index (default: mlp_out for loki, mlp_act for fnsft)")
    add_common_args(p, seed=False, out=False)
    p.set_defaults(func=cmd_import)

    p = nsub.add_parser("export", help="write a NeuronSet as LoKI position JSON or an FNSFT template")
    p.add_argument("--to", dest="fmt", required=True, choices=["loki", "fnsft"])
    p.add_argument("file", metavar="FILE", help="NeuronSet JSON")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--site", choices=["mlp_act", "mlp_out", "resid"],
                   help="site to export (default: mlp_out for loki, mlp_act for fnsft)")
    p.set_defaults(func=cmd_export)

    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
