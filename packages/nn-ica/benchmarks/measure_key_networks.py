"""Key networks of smollm2-135m at ~4 % and ~10 % of the mlp_act channels: lesion and
preserve ΔPPL against size-matched random sets, for canica and fnsft, and the agreement
(IoU) of the two methods' selections.

One process: the model is loaded once, the activations are captured once (``--max-tokens``
rows, then a random ``--tokens`` row subsample for the main runs), each decomposition runs
once, and every threshold is applied to the same maps (re-thresholding is free). The
selections are exactly what ``nn-ica build`` would produce for those settings (the same
functions: ``standardise_``, ``spatial_ica``/``select_z``, ``decompose``/``select_channels``);
the row subsample differs from build's own draw only in which random tokens are kept.

    uv run python packages/nn-ica/benchmarks/measure_key_networks.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from nn_core.data import tokenize_texts
from nn_core.intervene.masks import mask_neurons
from nn_core.model.adapters import model_signature
from nn_core.model.loading import load_model
from nn_eval import evaluate_lm
from nn_ica.build import capture_matrix, sample_texts
from nn_ica.decompose import decompose, select_channels, select_z, spatial_ica, standardise_
from nn_ica.evaluate import heldout_texts
from nn_ica.templates import Component, Templates, component_iou, match_templates

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def canica_maps(x: torch.Tensor, width: int, n_layers: int, k: int, pca: int, seed: int) -> list[np.ndarray]:
    """Per layer: standardise the layer's columns, spatial ICA, z-scored maps (width, k)."""
    out = []
    for b in range(n_layers):
        view = x[:, b * width:(b + 1) * width].clone()
        stats = standardise_(view)
        res = spatial_ica(view, n_components=k, pca_components=pca, seed=seed, dead=stats.zero_variance)
        out.append(res.z)
    return out


def canica_templates(meta: dict, zmaps: list[np.ndarray], layers: list[int], thr: float) -> Templates:
    comps = []
    k = zmaps[0].shape[1]
    for b, z in enumerate(zmaps):
        for j, sel in enumerate(select_z(z, thr)):
            comps.append(Component(b * k + j, {layers[b]: np.asarray(sel, dtype=np.int64)},
                                   threshold=thr, extra={"layer": layers[b], "map": j}))
    return Templates(meta, comps)


def cols_templates(meta: dict, picked: list[np.ndarray], width: int, layers: list[int], thr=None) -> Templates:
    comps = []
    for j, cols in enumerate(picked):
        neurons: dict[int, list[int]] = {}
        for col in np.asarray(cols).tolist():
            b, c = divmod(int(col), width)
            neurons.setdefault(layers[b], []).append(c)
        comps.append(Component(j, {la: np.asarray(sorted(v), dtype=np.int64) for la, v in neurons.items()},
                               threshold=thr))
    return Templates(meta, comps)


def fraction(t: Templates, n_channels: int) -> float:
    return len(t.neuronset()) / n_channels


def union_iou(a: Templates, b: Templates) -> float:
    return a.neuronset().jaccard(b.neuronset())


def random_iou(na: int, nb: int, n: int) -> float:
    """Expected IoU of two uniform random sets of sizes na, nb out of n (intersection ~ na nb / n)."""
    inter = na * nb / n
    return inter / (na + nb - inter)


def find_threshold(make, n_channels: int, target: float, lo: float, hi: float, steps: int = 30) -> float:
    """Bisect a monotone threshold (fraction decreasing in it) to the value giving ``target``."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fraction(make(mid), n_channels) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def measure(model, tok, t: Templates, data, n_random: int, baseline: dict) -> dict:
    ns = t.neuronset(model=model)
    kw = dict(max_length=128, batch_size=4)
    out = {"n_neurons": len(ns)}
    for mode in ("lesion", "preserve"):
        with mask_neurons(model, ns, mode):
            r = evaluate_lm(model, tok, data, **kw)
        rand = []
        for i in range(n_random):
            with mask_neurons(model, ns.random_like(1000 + i), mode):
                rand.append(evaluate_lm(model, tok, data, **kw))
        d = [c["ppl"] - baseline["ppl"] for c in rand]
        out[mode] = {
            "delta_ppl": r["ppl"] - baseline["ppl"], "nll": r["nll"],
            "random_delta_ppl": d, "random_nll": [c["nll"] for c in rand],
            "random_mean": statistics.fmean(d), "random_std": statistics.stdev(d) if len(d) > 1 else None,
        }
        say(f"  {mode}: ΔPPL {out[mode]['delta_ppl']:.4g} (nll {r['nll']:.3f}); random "
            f"{out[mode]['random_mean']:.4g} ± {out[mode]['random_std'] or 0:.3g} "
            f"(nll {[round(c['nll'], 3) for c in rand]})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="key_networks.json")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--pca", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--fnsft-k", type=int, default=20)
    ap.add_argument("--fnsft-pca", type=int, default=100)
    ap.add_argument("--random", type=int, default=3)
    ap.add_argument("--eval-texts", type=int, default=8)
    ap.add_argument("--targets", default="0.044,0.10")
    args = ap.parse_args()
    torch.manual_seed(0)
    res: dict = {"settings": vars(args), "torch_threads": torch.get_num_threads(), "runs": []}
    outp = Path(args.out)

    def dump():
        outp.write_text(json.dumps(res, indent=1, default=float))

    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    say("model loaded")
    texts, _ = sample_texts(["pydoc"], args.samples, seed=0, heldout_fraction=0.1)
    ids = tokenize_texts(tok, texts, max_length=128)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mat = capture_matrix(model, ids, max_tokens=args.max_tokens, batch_size=8, seed=0, pad_id=int(pad or 0))
    layers, width = mat.layers, mat.width
    n_channels = len(layers) * width
    say(f"captured {tuple(mat.x.shape)} of {mat.n_tokens_seen} tokens")
    rows = np.sort(np.random.default_rng(0).choice(mat.n_tokens, size=min(args.tokens, mat.n_tokens),
                                                   replace=False))
    x_main = mat.x[torch.as_tensor(rows)]
    meta = {**model_signature(model), "site": "mlp_act", "layers": layers, "width": width}

    ev_texts = heldout_texts(["pydoc"], heldout_fraction=0.1, limit=args.eval_texts, seed=0)
    data = [s for s in tokenize_texts(tok, ev_texts, max_length=128) if len(s) > 1]
    baseline = evaluate_lm(model, tok, data, max_length=128, batch_size=4)
    res["baseline"] = {"ppl": baseline["ppl"], "nll": baseline["nll"], "n_tokens": baseline["n_tokens"]}
    say(f"baseline PPL {baseline['ppl']:.3f}")

    # ---- canica, per layer
    t1 = time.perf_counter()
    zmaps = canica_maps(x_main, width, len(layers), args.k, args.pca, 0)
    res["canica_s"] = time.perf_counter() - t1
    say(f"canica maps in {res['canica_s']:.1f}s")
    curve = {thr: fraction(canica_templates(meta, zmaps, layers, thr), n_channels)
             for thr in (2.0, 2.25, 2.5, 2.75, 3.0, 3.3, 3.6, 4.0)}
    res["canica_fraction_by_z"] = curve
    say(f"canica fraction by |z|: {curve}")

    # ---- fnsft (temporal ICA of all layers concatenated)
    t1 = time.perf_counter()
    xf = x_main.clone()
    standardise_(xf)
    dec = decompose(xf, n_components=args.fnsft_k, pca_components=args.fnsft_pca, seed=0)
    del xf
    res["fnsft_s"] = time.perf_counter() - t1
    fmaps = dec.maps

    def fn_t(pct: float) -> Templates:
        picked, _ = select_channels(fmaps, pct)
        return cols_templates(meta, picked, width, layers, thr=pct)

    res["fnsft_fraction_by_percentile"] = {p: fraction(fn_t(p), n_channels) for p in (95.0, 97.0, 98.0, 99.0)}
    say(f"fnsft in {res['fnsft_s']:.1f}s; fraction by percentile {res['fnsft_fraction_by_percentile']}")

    # ---- canica, all layers concatenated (comparable, per component, with fnsft)
    t1 = time.perf_counter()
    xc = x_main.clone()
    st = standardise_(xc)
    cres = spatial_ica(xc, n_components=args.fnsft_k, pca_components=args.fnsft_pca, seed=0, dead=st.zero_variance)
    del xc
    res["canica_concat_s"] = time.perf_counter() - t1
    say(f"canica concat in {res['canica_concat_s']:.1f}s")

    def cc_t(thr: float) -> Templates:
        return cols_templates(meta, select_z(cres.z, thr), width, layers, thr=thr)

    # ---- sets at the target sizes, evaluated
    sets = {}
    for target in [float(v) for v in args.targets.split(",")]:
        thr = find_threshold(lambda t: canica_templates(meta, zmaps, layers, t), n_channels, target, 1.0, 8.0)
        sets[("canica", target)] = (f"|z| > {thr:.3f}", canica_templates(meta, zmaps, layers, thr))
        pct = find_threshold(fn_t, n_channels, target, 50.0, 99.99)
        sets[("fnsft", target)] = (f"top {100 - pct:.2f} % per component ({args.fnsft_k} comps)", fn_t(pct))
        thr_c = find_threshold(cc_t, n_channels, target, 1.0, 12.0)
        sets[("canica-concat", target)] = (f"|z| > {thr_c:.3f}", cc_t(thr_c))
    sets[("canica", "default")] = ("|z| > 3.6", canica_templates(meta, zmaps, layers, 3.6))
    sets[("fnsft", "default")] = ("top 2 % per component (98th pct)", fn_t(98.0))

    for target in [float(v) for v in args.targets.split(",")]:
        a, b, c = (sets[(m, target)][1] for m in ("canica", "fnsft", "canica-concat"))
        na, nb, nc = len(a.neuronset()), len(b.neuronset()), len(c.neuronset())
        agree = {
            "target": target,
            "iou_canica_fnsft": union_iou(a, b), "random_iou_canica_fnsft": random_iou(na, nb, n_channels),
            "iou_canica_concat": union_iou(a, c), "random_iou_canica_concat": random_iou(na, nc, n_channels),
            "iou_concat_fnsft": union_iou(c, b), "random_iou_concat_fnsft": random_iou(nc, nb, n_channels),
        }
        m = match_templates(c, b)
        agree["match_concat_fnsft"] = m
        best_fn = [max(component_iou(y, x) for x in a.components) for y in b.components]
        agree["fnsft_best_iou_in_canica_perlayer"] = best_fn
        agree["fnsft_best_iou_in_canica_concat"] = [max(component_iou(y, x) for x in c.components)
                                                     for y in b.components]
        res.setdefault("agreement", []).append(agree)
        say(f"target {target}: union IoU canica/fnsft {agree['iou_canica_fnsft']:.3f} "
            f"(random {agree['random_iou_canica_fnsft']:.3f}); concat/fnsft {agree['iou_concat_fnsft']:.3f}; "
            f"canica/concat {agree['iou_canica_concat']:.3f}; Hungarian concat-fnsft "
            f"{[round(p['iou'], 3) for p in m]}; fnsft best in per-layer {np.round(best_fn, 3).tolist()}")
    dump()

    order = [("canica", 0.10), ("fnsft", 0.10), ("canica", "default"), ("fnsft", "default"),
             ("canica", 0.044), ("fnsft", 0.044), ("canica-concat", 0.10)]
    for key in order:
        if key not in sets:
            continue
        desc, t = sets[key]
        frac = fraction(t, n_channels)
        say(f"{key[0]} {desc}: {frac:.4f} of channels")
        r = measure(model, tok, t, data, args.random, baseline)
        res["runs"].append({"method": key[0], "target": key[1], "threshold": desc, "fraction": frac, **r})
        dump()

    # ---- tokens: canica per layer on all captured rows, at ~10 %
    if mat.n_tokens > x_main.shape[0]:
        t1 = time.perf_counter()
        z4 = canica_maps(mat.x, width, len(layers), args.k, args.pca, 0)
        res["canica_full_tokens_s"] = time.perf_counter() - t1
        res["canica_full_tokens_fraction_by_z"] = {
            thr: fraction(canica_templates(meta, z4, layers, thr), n_channels) for thr in (2.5, 2.75, 3.0, 3.6)}
        say(f"canica {mat.n_tokens} tokens: {res['canica_full_tokens_fraction_by_z']}")
        for target in (0.10, None):
            if target is None:
                thr = 3.6
            else:
                thr = find_threshold(lambda t: canica_templates(meta, z4, layers, t), n_channels, target, 1.0, 8.0)
            t = canica_templates(meta, z4, layers, thr)
            frac = fraction(t, n_channels)
            say(f"canica {mat.n_tokens} tokens |z| > {thr:.3f}: {frac:.4f}")
            r = measure(model, tok, t, data, args.random, baseline)
            res["runs"].append({"method": f"canica-{mat.n_tokens}tok", "target": target,
                                "threshold": f"|z| > {thr:.3f}", "fraction": frac,
                                "iou_with_2048": union_iou(t, canica_templates(meta, zmaps, layers, thr)), **r})
            dump()
    res["total_s"] = time.perf_counter() - T0
    dump()
    say("done")


if __name__ == "__main__":
    main()
