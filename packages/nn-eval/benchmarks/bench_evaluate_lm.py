"""Throughput of ``evaluate_lm`` against a plain batched forward loop over the same tokens.

Both run the same equal-length pydoc token blocks in the same batches under
``torch.inference_mode``; the plain loop only computes the logits, ``evaluate_lm`` also
validates the data, builds the batches and scores every token (cross-entropy, argmax,
float64 sums). Runs alternate between the two, so slow drift in machine load hits both.
On a shared machine a run can only be slowed down, never sped up, so the headline
``ratio`` compares the fastest run of each (best plain seconds / best evaluate_lm
seconds); the median of the per-round ratios is reported beside it. Prints one JSON object.

    python packages/nn-eval/benchmarks/bench_evaluate_lm.py [--model smollm2-135m]
        [--blocks 8] [--block-len 128] [--batch-size 4] [--rounds 5] [--threads N]

Target: ``ratio >= 0.9`` (evaluate_lm tokens/s over plain tokens/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=8, help="number of token blocks (sequences)")
    ap.add_argument("--block-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from nn_core.data import load_texts, token_blocks
    from nn_core.models import load_model
    from nn_eval import evaluate_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device, dtype="float32")
    device = next(model.parameters()).device
    blocks = token_blocks(tok, load_texts("pydoc"), args.block_len, n_blocks=args.blocks, seed=0)
    n_tokens = blocks.numel()

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, blocks.shape[0], args.batch_size):
                _ = model(input_ids=blocks[i : i + args.batch_size].to(device), use_cache=False).logits
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> dict:
        res = evaluate_lm(model, tok, blocks, max_length=args.block_len, batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return res

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    # Warm-up (allocator, kernels), then alternate.
    plain()
    result = ours()
    plain_s, ours_s, ratios = [], [], []
    for r in range(args.rounds):
        first, second = (plain, ours) if r % 2 == 0 else (ours, plain)
        t1, _ = timed(first)
        t2, _ = timed(second)
        tp, to = (t1, t2) if first is plain else (t2, t1)
        plain_s.append(tp)
        ours_s.append(to)
        ratios.append(tp / to)
    plain_tps = n_tokens / min(plain_s)
    ours_tps = n_tokens / min(ours_s)
    ratio = min(plain_s) / min(ours_s)
    print(json.dumps({
        "benchmark": "evaluate_lm_vs_plain_forward",
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "sequences": int(blocks.shape[0]),
        "tokens_per_sequence": args.block_len,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "tokens": n_tokens,
        "plain_tokens_per_s": round(plain_tps, 2),
        "evaluate_lm_tokens_per_s": round(ours_tps, 2),
        "plain_seconds": [round(x, 3) for x in plain_s],
        "evaluate_lm_seconds": [round(x, 3) for x in ours_s],
        "ratio": round(ratio, 4),
        "median_round_ratio": round(statistics.median(ratios), 4),
        "target_ratio": 0.9,
        "meets_target": ratio >= 0.9,
        "ppl": round(result["ppl"], 4),
        "n_scored_tokens": result["n_tokens"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
