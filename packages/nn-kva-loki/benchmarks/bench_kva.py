"""Benchmark KVA: the fast engine (KV-cached prefix, all (layer, step) variants of the target
token in one batch) against the Captum reference (``IntegratedGradients`` layer by layer,
full-sequence forwards), same model, samples, method and steps.

Samples are consecutive ``--length``-token blocks of the embedded pydoc text; the target is
the last token of each block and the target token the model's argmax there. Figures:

* ``fast_s``: wall time of :func:`nn_kva_loki.attribute` (engine ``fast``) for all
  samples, one sample per call, memory budget ``--memory-gb`` (includes the clean forward
  that picks the argmax target);
* ``captum_s``: wall time of :func:`nn_kva_loki.captum_attributions` for all samples and
  layers (the reference engine's work minus that clean forward). With ``--captum-layers K``
  only K evenly spaced layers run and the time is scaled by ``layers / K``
  (``captum_extrapolated``; Captum's cost is one batched forward + backward per layer, the
  backward reaching down to that layer, so evenly spaced layers average it);
* ``speedup``: ``captum_s / fast_s``;
* ``max_rel_diff``: ``max |fast - captum| / max |captum|`` over all samples, layers and
  channels; ``max_elementwise_rel``: the largest ``|fast - captum| / |captum|`` among
  entries with ``|captum| >= 1e-3 max |captum|``.

Prints JSON; ``--out FILE`` also writes it.

    python packages/nn-kva-loki/benchmarks/bench_kva.py --samples 1 --out results_kva_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-captum", action="store_true", help="time only the fast engine")
    p.add_argument("--captum-layers", type=int, default=None, metavar="K",
                   help="run the Captum reference on K evenly spaced layers only and scale its time "
                        "by layers/K (default: all layers)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from nn_core.data import load_texts, token_blocks
    from nn_core.model.loading import load_model
    from nn_kva_loki.kva import Encoded, attribute, captum_attributions, pairs_per_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device, dtype="float32")
    blocks = token_blocks(tok, load_texts("pydoc"), args.length, n_blocks=args.samples, seed=0)
    enc = [Encoded(f"pydoc:{i}", tuple(int(t) for t in row), None) for i, row in enumerate(blocks.tolist())]
    kw = dict(method=args.method, steps=args.steps, pad_id=tok.pad_token_id or 0,
              memory_budget=args.memory_gb * 2**30)

    def run(engine: str):
        outs, t0 = [], time.perf_counter()
        for e in enc:
            outs.append(attribute(model, [e], engine=engine, **kw))
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, outs

    attribute(model, [Encoded("warm", enc[0].ids[:8], None)], engine="fast", **{**kw, "steps": 2})
    fast_s, fast = run("fast")
    result = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "samples": args.samples, "length": args.length, "steps": args.steps, "method": args.method,
        "layers": int(fast[0][0].shape[1]), "hidden": int(fast[0][0].shape[2]),
        "rows_per_forward": pairs_per_batch(model, args.length - 1, args.memory_gb * 2**30),
        "fast_s": round(fast_s, 3), "fast_s_per_sample": round(fast_s / args.samples, 3),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if not args.skip_captum:
        n_layers = int(fast[0][0].shape[1])
        k = n_layers if args.captum_layers is None else max(1, min(args.captum_layers, n_layers))
        layers = sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
        t0 = time.perf_counter()
        ref = [captum_attributions(model, e.ids, int(f[1][0]), method=args.method, steps=args.steps,
                                   layers=layers) for e, f in zip(enc, fast, strict=True)]
        measured = time.perf_counter() - t0
        # Captum's cost is one batched forward + backward per layer: scale to all layers
        captum_s = measured * n_layers / len(layers)
        a = np.stack([o[0][0][layers] for o in fast])
        b = np.stack(ref)
        result.update({"captum_layers": layers, "captum_measured_s": round(measured, 3),
                       "captum_extrapolated": len(layers) < n_layers})
        scale = float(np.abs(b).max())
        big = np.abs(b) >= 1e-3 * scale
        result.update({
            "captum_s": round(captum_s, 3), "captum_s_per_sample": round(captum_s / args.samples, 3),
            "speedup": round(captum_s / fast_s, 2),
            "max_rel_diff": float(np.abs(a - b).max() / scale),
            "max_elementwise_rel": float((np.abs(a - b)[big] / np.abs(b)[big]).max()),
        })
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
