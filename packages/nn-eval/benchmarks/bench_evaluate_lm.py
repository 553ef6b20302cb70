"""Throughput of ``evaluate_lm`` against a plain batched forward loop over the same tokens.

Both run the same equal-length pydoc token blocks in the same batches under
``torch.inference_mode``; the plain loop only computes the logits, ``evaluate_lm`` also
validates the data, builds the batches and scores every token (log-sum-exp, argmax,
float64 sums). Runs alternate between the two, so slow drift in machine load hits both.

Two clocks are read per run: wall time, and this process's CPU time. On a shared
machine other processes slow a run down (never speed it up), by amounts that swamp a
few percent; CPU time counts only the work this process did, so the headline ``ratio``
is tokens per CPU-second of ``evaluate_lm`` over the plain loop's, fastest run of each.
The wall-clock ratio (fastest run of each) is reported beside it; on an idle machine
the two agree. Prints one JSON object.

A second case, ``sliding_ratio``, times variable-length pydoc texts longer than
``--window`` tokens, so ``evaluate_lm`` cuts them into overlapping windows (stride
``window // 2``), scores only each window's new tokens and batches windows of unequal
length; the plain loop runs the same windows, in the same batches and padding, and
only computes the logits. Its throughput counts every window token fed to the model.

    python packages/nn-eval/benchmarks/bench_evaluate_lm.py [--model smollm2-135m]
        [--blocks 8] [--block-len 128] [--batch-size 4] [--rounds 4] [--threads N]
        [--texts 6] [--window 64]

Target: ``ratio >= 0.9`` and ``sliding_ratio >= 0.9`` (evaluate_lm tokens/s over plain).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=8, help="number of token blocks (sequences)")
    ap.add_argument("--block-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--texts", type=int, default=6, help="texts of the sliding-window case")
    ap.add_argument("--window", type=int, default=64, help="max_length of the sliding-window case")
    args = ap.parse_args()

    import torch

    from nn_core.data import load_texts, token_blocks, tokenize_texts
    from nn_core.model.loading import load_model
    from nn_eval import evaluate_lm
    from nn_eval._model import pad_id_of
    from nn_eval.lm import make_segments

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

    def timed(fn) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - cpu, time.perf_counter() - wall

    def compare(plain_fn, ours_fn):
        # Warm-up (allocator, kernels), then alternate which goes first.
        plain_fn()
        res = ours_fn()
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "ours": []}
        for r in range(args.rounds):
            order = [("plain", plain_fn), ("ours", ours_fn)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                runs[name].append(timed(fn))
        best = {name: (min(c for c, _ in v), min(w for _, w in v)) for name, v in runs.items()}
        return res, runs, best

    result, runs, best = compare(plain, ours)
    ratio = best["plain"][0] / best["ours"][0]
    wall_ratio = best["plain"][1] / best["ours"][1]

    # Sliding windows: texts of 2 to 8 windows, of varied length (evenly spaced by length).
    texts = [t for t in load_texts("pydoc") if 2 * args.window < len(t) < 64 * args.window]
    ids = sorted((s for s in tokenize_texts(tok, texts) if 2 * args.window < len(s) <= 8 * args.window),
                 key=len)
    seqs = [ids[round(k * (len(ids) - 1) / max(1, args.texts - 1))] for k in range(args.texts)]
    stride = args.window // 2
    segments, _ = make_segments([(s, None) for s in seqs], args.window, stride)
    seg_ids = sorted((seg.ids for seg in segments), key=len, reverse=True)
    window_tokens = sum(len(s) for s in seg_ids)
    pad = pad_id_of(tok)

    def plain_windows() -> None:
        with torch.inference_mode():
            for i in range(0, len(seg_ids), args.batch_size):
                batch = seg_ids[i : i + args.batch_size]
                x = torch.full((len(batch), len(batch[0])), pad, dtype=torch.long)
                for r, s in enumerate(batch):
                    x[r, : len(s)] = torch.tensor(s)
                _ = model(input_ids=x.to(device), use_cache=False).logits
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours_windows() -> dict:
        res = evaluate_lm(model, tok, seqs, max_length=args.window, stride=stride,
                          batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return res

    s_result, s_runs, s_best = compare(plain_windows, ours_windows)
    sliding_ratio = s_best["plain"][0] / s_best["ours"][0]
    sliding_wall_ratio = s_best["plain"][1] / s_best["ours"][1]
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
        "plain_tokens_per_cpu_s": round(n_tokens / best["plain"][0], 2),
        "evaluate_lm_tokens_per_cpu_s": round(n_tokens / best["ours"][0], 2),
        "plain_tokens_per_s": round(n_tokens / best["plain"][1], 2),
        "evaluate_lm_tokens_per_s": round(n_tokens / best["ours"][1], 2),
        "plain_runs_cpu_wall_s": [[round(c, 3), round(w, 3)] for c, w in runs["plain"]],
        "evaluate_lm_runs_cpu_wall_s": [[round(c, 3), round(w, 3)] for c, w in runs["ours"]],
        "ratio": round(ratio, 4),
        "wall_ratio": round(wall_ratio, 4),
        "target_ratio": 0.9,
        "meets_target": ratio >= 0.9,
        "ppl": round(result["ppl"], 4),
        "n_scored_tokens": result["n_tokens"],
        "sliding": {
            "texts": len(seqs),
            "text_tokens": [len(s) for s in seqs],
            "window": args.window,
            "stride": stride,
            "windows": len(seg_ids),
            "window_tokens": window_tokens,
            "n_scored_tokens": s_result["n_tokens"],
            "plain_tokens_per_cpu_s": round(window_tokens / s_best["plain"][0], 2),
            "evaluate_lm_tokens_per_cpu_s": round(window_tokens / s_best["ours"][0], 2),
            "plain_runs_cpu_wall_s": [[round(c, 3), round(w, 3)] for c, w in s_runs["plain"]],
            "evaluate_lm_runs_cpu_wall_s": [[round(c, 3), round(w, 3)] for c, w in s_runs["ours"]],
        },
        "sliding_ratio": round(sliding_ratio, 4),
        "sliding_wall_ratio": round(sliding_wall_ratio, 4),
        "sliding_meets_target": sliding_ratio >= 0.9,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
