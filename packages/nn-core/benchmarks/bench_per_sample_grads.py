"""Per-sample gradients: batch-1 loop against ``torch.func`` vmap (nn_core.numerics.gradients).

Prints JSON. For each model shape, the time of ``squared_grad_mean(per_sample=True)`` over
the same batches with ``method="loop"`` and ``method="vmap"`` (median of interleaved
repetitions after a warm-up), the ratio ``vmap_over_loop`` (> 1: the loop is faster) and
the largest relative difference of the results (they must agree):

* ``tiny``: tiny-llama (hidden 64, MLP 128, 2 layers), every 2-D weight of the blocks.
* ``smollm2_shapes``: a random-initialised Llama with SmolLM2-135M's shapes (hidden 576,
  MLP 1536, 9 heads / 3 KV heads, vocab 49152) but ``--layers`` decoder blocks (default
  2 of 30, to fit shared CPUs), the MLP weights of every block. Per-layer cost is what
  the choice depends on; the full model repeats the same blocks.

    uv run python packages/nn-core/benchmarks/bench_per_sample_grads.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _case(model, params, batches, reps: int, chunk: int) -> dict:
    import torch

    from nn_core.numerics.gradients import squared_grad_mean

    def run(method):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = squared_grad_mean(model, params, batches, method=method, chunk_size=chunk,
                                progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    _, ref = run("loop")
    _, got = run("vmap")
    diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
               for a, b in zip(got.values, ref.values, strict=True))
    times = {"loop": [], "vmap": []}
    for _ in range(reps):
        for m in ("loop", "vmap"):
            times[m].append(run(m)[0])
    loop, vmap = statistics.median(times["loop"]), statistics.median(times["vmap"])
    return {"loop_s": round(loop, 4), "vmap_s": round(vmap, 4),
            "vmap_over_loop": round(vmap / loop, 3), "max_rel_diff": diff,
            "n_samples": ref.n_units, "params": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers as T

    from nn_core.model.loading import load_model

    g = torch.Generator().manual_seed(0)
    out = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "batch": args.batch, "chunk": args.chunk}

    model, _ = load_model("tiny-llama", device=args.device, dtype="float32")
    params = [p for n, p in model.named_parameters() if n.startswith("model.layers.") and p.ndim == 2]
    batches = [{"input_ids": torch.randint(0, 256, (args.batch, 32), generator=g)} for _ in range(2)]
    out["tiny"] = {**_case(model, params, batches, args.reps, args.chunk), "seq": 32}

    if not args.skip_smollm2:
        cfg = T.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_hidden_layers=args.layers, num_attention_heads=9,
                            num_key_value_heads=3, max_position_embeddings=2048,
                            tie_word_embeddings=True)
        torch.manual_seed(0)
        big = T.LlamaForCausalLM(cfg).to(args.device).eval()
        params = [p for n, p in big.named_parameters() if ".mlp." in n]
        batches = [{"input_ids": torch.randint(0, 49152, (args.batch, 64), generator=g)}]
        out["smollm2_shapes"] = {**_case(big, params, batches, args.reps, args.chunk),
                                 "seq": 64, "layers": args.layers}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
