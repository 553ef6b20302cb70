"""Benchmarks of nn-sensitivity; prints one JSON object of figures.

1. ``grad_x_weight`` scoring time / a plain forward+backward loop over the same batches
   (target <= 1.2), on smollm2-135m (CPU by default).
2. ``hutchinson_diag`` time per probe / forward+backward (target <= 3): both the average
   over a run with P probes per batch (including the one gradient pass with a graph per
   batch) and the marginal cost of one more probe.
3. Global top-K over a synthetic set of tensors totalling ``--topk-weights`` (1e9) weights:
   peak extra memory of the streaming top-K versus flatten-and-sort (``torch.cat`` then
   ``torch.sort``). Each is measured in a fresh subprocess as the rise of the peak
   resident set size (VmHWM) over the resident size once the score tensors exist.
   Flatten-and-sort needs about 24 bytes per weight on top of the scores, which does not
   fit 1e9 weights in a 24 GiB machine, so it is measured at ``--sort-weights`` and
   extrapolated linearly (its memory is linear in the weight count); the JSON says so.

    python packages/nn-sensitivity/benchmarks/bench_sensitivity.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _batches(tok, n_batches: int, batch_size: int, block_len: int):
    from nn_core.data import load_texts, split_texts, token_blocks

    train, _ = split_texts(load_texts("pydoc"), 0.2, seed=0)
    blocks = token_blocks(tok, train, block_len, n_blocks=n_batches * batch_size, seed=0)
    return [{"input_ids": blocks[i:i + batch_size]} for i in range(0, blocks.shape[0], batch_size)]


def _plain_loop(model, batches) -> float:
    """Forward + backward of the mean token loss, every parameter's gradient, per batch."""
    start = time.perf_counter()
    for b in batches:
        ids = b["input_ids"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_scoring(args) -> dict:
    import torch

    from nn_core.model.loading import load_model
    from nn_sensitivity import score

    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device, dtype="float32")
    batches = _batches(tok, args.batches, args.batch_size, args.block_len)
    _plain_loop(model, batches[:1])  # warm-up (allocator, kernels)
    score(model, batches[:1], "grad_x_weight", progress=False)
    plain, gxw = [], []
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        plain.append(_plain_loop(model, batches))
        gxw.append(_timed(lambda: score(model, batches, "grad_x_weight", progress=False), 1)[0])
    fb = statistics.median(plain)
    out = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "batches": len(batches), "batch_size": args.batch_size, "block_len": args.block_len,
        "forward_backward_s": {"median": fb, "all": plain},
        "grad_x_weight_s": {"median": statistics.median(gxw), "all": gxw},
        "grad_x_weight_ratio": statistics.median(gxw) / fb,
        "grad_x_weight_ratio_target": 1.2,
    }
    hb = batches[: args.hutch_batches]
    fb_h = statistics.median([_plain_loop(model, hb) for _ in range(args.repeats)])
    times = {}
    for p in (1, args.probes):
        times[p] = statistics.median(_timed(
            lambda p=p: score(model, hb, "hutchinson_diag", probes=p, progress=False),
            args.repeats))
    per_probe_avg = times[args.probes] / (args.probes * len(hb))
    marginal = (times[args.probes] - times[1]) / ((args.probes - 1) * len(hb))
    out["hutchinson"] = {
        "batches": len(hb), "probes": args.probes,
        "forward_backward_per_batch_s": fb_h / len(hb),
        "run_s": {str(p): t for p, t in times.items()},
        "time_per_probe_s": per_probe_avg,
        "time_per_probe_ratio": per_probe_avg / (fb_h / len(hb)),
        "marginal_probe_s": marginal,
        "marginal_probe_ratio": marginal / (fb_h / len(hb)),
        "single_probe_run_ratio": times[1] / fb_h,
        "target": 3.0,
    }
    return out


# ------------------------------------------------------------------- top-K memory
_CHILD = r"""
import json, sys, time
import torch
from nn_sensitivity.metrics import Scores
from nn_sensitivity.params import ParamInfo
from nn_sensitivity.rank import top_k

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

n_total, tensor_size, k, how = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
params, values = [], {}
left, j = n_total, 0
while left > 0:
    n = min(tensor_size, left)
    name = f"model.layers.{j}.w.weight"
    params.append(ParamInfo(name, name[:-7], j, "linear", (n,)))
    values[name] = torch.rand(n, generator=g)
    left -= n
    j += 1
s = Scores("synthetic", params, values, {"model": {}})
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
    f.write("5")
base = rss("VmRSS:")
start = time.perf_counter()
if how == "stream":
    r = top_k(s, k)
    kth = float(r.score[-1])
else:
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    vals, idx = torch.sort(flat, descending=True)
    kth = float(vals[k - 1])
seconds = time.perf_counter() - start
peak = rss("VmHWM:")
print(json.dumps({"weights": n_total, "tensors": len(params), "largest_tensor": tensor_size,
                  "k": k, "method": how, "extra_peak_bytes": peak - base, "seconds": seconds,
                  "kth_score": kth, "scores_bytes": 4 * n_total}))
"""


def _child(n_total: int, tensor_size: int, k: int, how: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _CHILD, str(n_total), str(tensor_size), str(k), how],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_topk(args) -> dict:
    stream = _child(args.topk_weights, args.tensor_size, args.k, "stream")
    sort_small = _child(args.sort_weights, args.tensor_size, args.k, "sort")
    stream_small = _child(args.sort_weights, args.tensor_size, args.k, "stream")
    factor = args.topk_weights / args.sort_weights
    return {
        "weights": args.topk_weights, "largest_tensor": args.tensor_size, "k": args.k,
        "streaming": stream,
        "streaming_at_sort_size": stream_small,
        "flatten_and_sort_measured": sort_small,
        "flatten_and_sort_extrapolated_extra_bytes": sort_small["extra_peak_bytes"] * factor,
        "same_kth_score_at_sort_size": stream_small["kth_score"] == sort_small["kth_score"],
        "note": (f"flatten-and-sort measured at {args.sort_weights:.0e} weights and scaled by "
                 f"{factor:g}: its extra memory (a concatenated copy, sorted values, int64 "
                 "indices and sort workspace: "
                 f"{sort_small['extra_peak_bytes'] / args.sort_weights:.1f} bytes per weight) is "
                 f"linear in the weight count; at {args.topk_weights:.0e} weights that is "
                 f"~{sort_small['extra_peak_bytes'] * factor / 2**30:.0f} GiB on top of the "
                 f"{4 * args.topk_weights / 2**30:.1f} GiB of scores"
                 + (", more than a 24 GiB machine holds, so it was not run at full size"
                    if sort_small["extra_peak_bytes"] * factor > 16 * 2**30 else "")),
        "streaming_vs_sort_ratio": stream["extra_peak_bytes"]
        / (sort_small["extra_peak_bytes"] * factor),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-len", type=int, default=128)
    p.add_argument("--hutch-batches", type=int, default=2)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--topk-weights", type=float, default=1e9)
    p.add_argument("--sort-weights", type=float, default=1e8)
    p.add_argument("--tensor-size", type=int, default=2048 * 2048)
    p.add_argument("--k", type=int, default=1_000_000)
    p.add_argument("--skip-scoring", action="store_true")
    p.add_argument("--skip-topk", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.topk_weights, args.sort_weights = int(args.topk_weights), int(args.sort_weights)
    if args.quick:
        args.model, args.batches, args.batch_size, args.block_len = "tiny-llama", 2, 2, 32
        args.hutch_batches, args.repeats = 1, 1
        args.topk_weights, args.sort_weights, args.tensor_size, args.k = 10**6, 10**5, 10**4, 1000
    out = {}
    if not args.skip_scoring:
        out["scoring"] = bench_scoring(args)
    if not args.skip_topk:
        out["global_topk_memory"] = bench_topk(args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        from nn_core.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
