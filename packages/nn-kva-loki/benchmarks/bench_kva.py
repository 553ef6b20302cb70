"""Benchmark KVA: the fast engine (KV-cached prefix, all (layer, step) variants of the target
token in one batch) against the Captum reference (``IntegratedGradients`` layer by layer,
full-sequence forwards), same model, samples, method and steps.

Samples are consecutive ``--length``-token blocks of the embedded pydoc text; the target is
the last token of each block and the target token the model's argmax there. The two engines
run interleaved, ``--repeats`` times each (fast, Captum, fast, Captum, ...), after one
warm-up of each, so both see the same machine load; per repeat:

* ``fast_s``: wall time of :func:`nn_kva_loki.attribute` (engine ``fast``) for all
  samples, one sample per call, memory budget ``--memory-gb``; it includes everything the
  engine does (prefix pass, clean pass that picks the argmax target, the variants);
* ``captum_s``: wall time of :func:`nn_kva_loki.captum_attributions` for all samples and
  layers (the reference engine's work minus its clean forward that picks the target). With
  ``--captum-layers K`` only K evenly spaced layers run and the time is scaled by
  ``layers / K`` (``captum_extrapolated``; Captum's cost is one batched forward + backward
  per layer, the backward reaching down to that layer, so evenly spaced layers average it);
* ``ratio``: ``captum_s / fast_s`` of that repeat.

Figures: ``speedup`` = median of the per-repeat ratios (``fast_s_median``,
``captum_s_median`` alongside); ``max_rel_diff`` = ``max |fast - captum| / max |captum|``
over all samples, measured layers and channels; ``max_elementwise_rel`` = the largest
``|fast - captum| / |captum|`` among entries with ``|captum| >= 1e-3 max |captum|``;
``load_average`` before and after (``os.getloadavg``); the settings.

Prints JSON; ``--out FILE`` also writes it.

    python packages/nn-kva-loki/benchmarks/bench_kva.py --captum-layers 3 --threads 1 --out results_kva_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--length", type=int, default=256, help="prompt tokens per sample")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--method", default="riemann_trapezoid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory-gb", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each engine")
    p.add_argument("--skip-captum", action="store_true", help="time only the fast engine")
    p.add_argument("--captum-layers", type=int, default=None, metavar="K",
                   help="run the Captum reference on K evenly spaced layers only and scale its time "
                        "by layers/K (default: all layers)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.samples < 1:
        raise SystemExit("--repeats and --samples must be at least 1")

    import numpy as np
    import torch

    from nn_core.data import load_texts, token_blocks
    from nn_core.model.adapters import get_adapter
    from nn_core.model.loading import load_model
    from nn_core.numerics.integrated_gradients import packed_layout_applies
    from nn_kva_loki.kva import Encoded, attribute, captum_attributions, pairs_per_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    model, tok = load_model(args.model, device=args.device, dtype="float32")
    blocks = token_blocks(tok, load_texts("pydoc"), args.length, n_blocks=args.samples, seed=0)
    enc = [Encoded(f"pydoc:{i}", tuple(int(t) for t in row), None) for i, row in enumerate(blocks.tolist())]
    kw = dict(method=args.method, steps=args.steps, pad_id=tok.pad_token_id or 0,
              memory_budget=args.memory_gb * 2**30)
    n_layers = get_adapter(model).num_layers
    k = n_layers if args.captum_layers is None else max(1, min(args.captum_layers, n_layers))
    layers = sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})

    def sync():
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.synchronize()

    def run_fast():
        t0 = time.perf_counter()
        outs = [attribute(model, [e], engine="fast", **kw) for e in enc]
        sync()
        return time.perf_counter() - t0, outs

    def run_captum(targets):
        t0 = time.perf_counter()
        outs = [captum_attributions(model, e.ids, t, method=args.method, steps=args.steps, layers=layers)
                for e, t in zip(enc, targets, strict=True)]
        sync()
        return (time.perf_counter() - t0) * n_layers / len(layers), outs

    warm = Encoded("warm", enc[0].ids[:8], None)
    attribute(model, [warm], engine="fast", **{**kw, "steps": 2})
    if not args.skip_captum:
        captum_attributions(model, warm.ids, 0, method=args.method, steps=2, layers=layers[:1])
    fast_times, captum_times, fast, ref = [], [], None, None
    for _ in range(args.repeats):
        t, fast = run_fast()
        fast_times.append(t)
        if not args.skip_captum:
            t, ref = run_captum([int(f[1][0]) for f in fast])
            captum_times.append(t)
    load_after = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rows = pairs_per_batch(model, args.length, args.memory_gb * 2**30,
                           variants=n_layers * args.steps if packed_layout_applies(model, args.length) else None)
    result = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "samples": args.samples, "length": args.length, "steps": args.steps, "method": args.method,
        "memory_gb": args.memory_gb, "repeats": args.repeats,
        "layers": n_layers, "hidden": int(fast[0][0].shape[2]),
        "kv_layout": "packed" if packed_layout_applies(model, args.length) else "rows",
        "variants_per_forward": rows,
        "fast_s": [round(t, 3) for t in fast_times], "fast_s_median": round(statistics.median(fast_times), 3),
        "fast_s_per_sample": round(statistics.median(fast_times) / args.samples, 3),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": load_after,
    }
    if not args.skip_captum:
        ratios = [c / f for c, f in zip(captum_times, fast_times, strict=True)]
        a = np.stack([o[0][0][layers] for o in fast])
        b = np.stack(ref)
        scale = float(np.abs(b).max())
        big = np.abs(b) >= 1e-3 * scale
        result.update({
            "captum_layers": layers, "captum_extrapolated": len(layers) < n_layers,
            "captum_s": [round(t, 3) for t in captum_times],
            "captum_s_median": round(statistics.median(captum_times), 3),
            "captum_s_per_sample": round(statistics.median(captum_times) / args.samples, 3),
            "ratios": [round(r, 2) for r in ratios],
            "speedup": round(statistics.median(ratios), 2),
            "max_rel_diff": float(np.abs(a - b).max() / scale),
            "max_elementwise_rel": float((np.abs(a - b)[big] / np.abs(b)[big]).max()),
        })
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
