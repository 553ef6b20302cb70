"""Benchmark of ``nn-ica build`` with the default settings, and of the two backends.

Prints one JSON object:

* ``phases``: wall time (s) and peak resident memory (MiB, the process high-water mark
  after the phase, and how much the phase raised it) for load, data, capture,
  standardise, PCA + FastICA (torch backend, the default) and threshold;
* ``backends``: torch vs scikit-learn on the *same* standardised matrix: seconds for
  PCA and FastICA, the time ratio, and agreement: |correlation| of Hungarian-matched
  spatial maps and IoU of the selected channels of matched components.

    python packages/nn-ica/benchmarks/bench_build.py [--model smollm2-135m] [--device cpu]
        [--skip-sklearn] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import warnings


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Phases:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def run(self, name, fn, *a, **kw):
        before = peak_mib()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        sync()
        self.rows[name] = {"seconds": round(time.perf_counter() - t0, 3),
                           "peak_rss_mib": round(peak_mib(), 1),
                           "peak_rss_increase_mib": round(peak_mib() - before, 1)}
        return out


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    import numpy as np
    import torch

    from nn_core.data import tokenize_texts
    from nn_core.model.loading import load_model
    from nn_ica.build import BuildConfig, capture_matrix, sample_texts
    from nn_ica.decompose import decompose, match_columns, select_channels, standardise_

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="pydoc")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = BuildConfig(method="fnsft", components=20, pca_components=100)  # the temporal path, as measured
    ph = Phases()
    total0 = time.perf_counter()
    model, tok = ph.run("load_model", load_model, args.model, device=args.device, dtype="float32")
    texts, _ = ph.run("data", sample_texts, [args.data], cfg.samples, seed=cfg.seed,
                      heldout_fraction=cfg.heldout_fraction)
    ids = tokenize_texts(tok, texts, max_length=cfg.max_length)
    mat = ph.run("capture", capture_matrix, model, ids, site=cfg.site, max_tokens=cfg.max_tokens,
                 batch_size=cfg.batch_size, seed=cfg.seed, pad_id=int(tok.pad_token_id or 0))
    ph.run("standardise", standardise_, mat.x)
    x_std = mat.x.clone() if not args.skip_sklearn else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dec = ph.run("pca_ica_torch", decompose, mat.x, n_components=cfg.components,
                     pca_components=cfg.pca_components, backend="torch", seed=cfg.seed,
                     max_iter=cfg.max_iter, tol=cfg.tol)
    picked, _ = ph.run("threshold", select_channels, dec.maps, cfg.percentile)
    end_to_end = time.perf_counter() - total0
    result = {
        "benchmark": "nn-ica build (defaults)",
        "model": args.model, "device": args.device,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "config": {"samples": cfg.samples, "max_length": cfg.max_length, "max_tokens": cfg.max_tokens,
                   "pca_components": cfg.pca_components, "components": cfg.components,
                   "percentile": cfg.percentile},
        "matrix": {"shape": list(mat.x.shape), "mib": round(mat.nbytes / 2**20, 1),
                   "tokens_seen": mat.n_tokens_seen},
        "phases": ph.rows,
        "ica": {**dec.ica_metadata(), "pca_s": round(dec.timings["pca_s"], 3),
                "ica_s": round(dec.timings["ica_s"], 3)},
        "end_to_end_seconds": round(end_to_end, 2),
    }
    if x_std is not None:
        del model
        t_torch = dec.timings["pca_s"] + dec.timings["ica_s"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sk = ph.run("pca_ica_sklearn", decompose, x_std.numpy(), n_components=cfg.components,
                        pca_components=cfg.pca_components, backend="sklearn", seed=cfg.seed,
                        max_iter=cfg.max_iter, tol=cfg.tol)
        t_sk = sk.timings["pca_s"] + sk.timings["ica_s"]
        order, corr = match_columns(dec.maps.astype(np.float64), sk.maps.astype(np.float64))
        sk_picked, _ = select_channels(sk.maps, cfg.percentile)
        ious = []
        for j, k in enumerate(order):
            a, b = set(picked[j].tolist()), set(sk_picked[k].tolist())
            ious.append(len(a & b) / max(1, len(a | b)))
        result["backends"] = {
            "torch": {"pca_s": round(dec.timings["pca_s"], 3), "ica_s": round(dec.timings["ica_s"], 3),
                      "total_s": round(t_torch, 3), "converged": dec.converged, "n_iter": dec.n_iter},
            "sklearn": {"pca_s": round(sk.timings["pca_s"], 3), "ica_s": round(sk.timings["ica_s"], 3),
                        "total_s": round(t_sk, 3), "converged": sk.converged, "n_iter": sk.n_iter},
            "sklearn_over_torch_time": round(t_sk / t_torch, 3),
            "explained_variance_max_abs_diff": float(np.abs(dec.explained_variance_ratio
                                                            - sk.explained_variance_ratio).max()),
            "matched_map_abs_corr": {"min": round(float(corr.min()), 4), "median": round(float(np.median(corr)), 4),
                                     "mean": round(float(corr.mean()), 4)},
            "same_order_fraction": float(np.mean(order == np.arange(len(order)))),
            "selected_channels_iou": {"min": round(min(ious), 4), "median": round(float(np.median(ious)), 4),
                                      "mean": round(float(np.mean(ious)), 4)},
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from nn_core.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
