"""Cost of a split Linear (nn_core.intervene.surgery) against a plain Linear, on SmolLM2's
down-projection shape (in 1536, out 576), input 4 x 128 tokens, fp32.

Prints JSON: median seconds of one forward + backward (input and weight gradients; the
plain Linear trains its full weight) for

* ``plain``: ``nn.Linear`` training the whole weight (the baseline);
* ``split_rows`` / ``split_cols``: :class:`SplitLinear` training ``--frac`` of the output
  rows / input columns (one matmul with the assembled weight, custom backward that
  computes only the trainable slice's weight gradient) - what the library uses;
* ``index_copy_autograd``: the same forward through autograd's own ``index_copy`` (the
  full weight gradient is formed, then gathered);
* ``two_matmul_rows``: trainable and frozen rows as two matmuls whose outputs are
  scattered into place (not bit-identical to the plain forward in general);

and each one's ratio to ``plain`` (target <= 1.1). Repetitions are interleaved so that
noise from a shared machine hits all variants alike; ``--threads 1`` by default, since on a
loaded machine multi-threaded BLAS timings are dominated by contention.

    uv run python packages/nn-core/benchmarks/bench_split_linear.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch import nn

    from nn_core.intervene.surgery import split_linear

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--frac", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: stable figures on a shared, loaded machine)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    n_in, n_out = 1536, 576
    plain = nn.Linear(n_in, n_out, bias=False, device=dev)
    rows = torch.randperm(n_out)[: int(n_out * args.frac)].sort().values
    cols = torch.randperm(n_in)[: int(n_in * args.frac)].sort().values

    def split(**kw):
        holder = nn.Sequential(nn.Linear(n_in, n_out, bias=False, device=dev))
        holder[0].weight.data.copy_(plain.weight.data)
        return split_linear(holder, "0", **kw)

    s_rows, s_cols = split(rows=rows), split(cols=cols)
    frozen = plain.weight.detach().clone()
    t_rows = nn.Parameter(frozen[rows.to(dev)].clone())
    rest = torch.ones(n_out, dtype=torch.bool)
    rest[rows] = False
    rest_idx = rest.nonzero().flatten().to(dev)
    rows_d = rows.to(dev)
    frozen_rest = frozen[rest_idx].clone()

    def index_copy_autograd(x):
        return nn.functional.linear(x, frozen.index_copy(0, rows_d, t_rows))

    def two_matmul(x):
        y = x.new_empty(*x.shape[:-1], n_out)
        y = y.index_copy(-1, rest_idx, nn.functional.linear(x, frozen_rest))
        return y.index_copy(-1, rows_d, nn.functional.linear(x, t_rows))

    variants = {"plain": plain, "split_rows": s_rows, "split_cols": s_cols,
                "index_copy_autograd": index_copy_autograd, "two_matmul_rows": two_matmul}
    x0 = torch.randn(args.batch, args.seq, n_in, device=dev)

    def step(fn) -> float:
        x = x0.clone().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x).square().mean().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in variants.values():  # warm-up
        for _ in range(3):
            step(fn)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, fn in variants.items():
            times[k].append(step(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    with torch.no_grad():
        identical = bool(torch.equal(s_rows(x0), plain(x0)) and torch.equal(s_cols(x0), plain(x0)))
    print(json.dumps({
        "shape": {"in": n_in, "out": n_out, "tokens": args.batch * args.seq, "frac": args.frac},
        "device": str(dev), "threads": torch.get_num_threads(),
        "median_s": med,
        "ratio_to_plain": {k: med[k] / med["plain"] for k in med},
        "split_forward_bit_identical": identical,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
