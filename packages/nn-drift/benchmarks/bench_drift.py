"""Drift-tracking overhead and score storage, printed as JSON.

    uv run python packages/nn-drift/benchmarks/bench_drift.py [--model tiny-llama] [--steps 30]

overhead: wall time of LoRA fine-tuning (``--steps`` steps, every linear layer of the
blocks) with drift tracking every 10 steps of a set-diff group and a same-size random
group, divided by the same run without tracking (issue target <= 1.1). storage: bytes of
top-10 % row storage and of full float16 storage of SNIP scores vs the scored weights'
fp32 bytes, and the peak RSS growth of scoring (tracemalloc does not see torch memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n-score", type=int, default=8)
    args = ap.parse_args()

    from nn_core.model.loading import load_model
    from nn_core.train import SFTConfig, build_trainer, prepare_model
    from nn_drift.data import load_examples, response_batches
    from nn_drift.drift import DriftTracker
    from nn_drift.finetune import block_linear_targets
    from nn_drift.groups import make_groups
    from nn_drift.scores import compute_scores, storage_bytes

    model, tok = load_model(args.model, device="cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = {d: response_batches(tok, load_examples(d, limit=args.n_score), batch_size=4,
                                max_length=256) for d in ("safety", "utility")}
    t0 = time.perf_counter()
    table = compute_scores(model, data, ("snip",))
    score_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    param_bytes = sum(p.shape[0] * p.shape[1] * 4 for p in table.params)
    out: dict = {"model": args.model, "score_seconds": round(score_s, 2),
                 "score_peak_rss_growth_bytes": (rss1 - rss0) * 1024,
                 "scored_param_bytes_fp32": param_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        for store, frac in (("top", 0.01), ("top", 0.1), ("full", 1.0)):
            d = Path(tmp) / f"{store}-{frac}"
            d.mkdir()
            table.save(d, store=store, fraction=frac)
            out[f"storage_{store}_{frac:g}_bytes"] = storage_bytes(d)
        groups = make_groups(table, ["set-diff", "random"], q=0.1, p=0.1)
        examples = load_examples("utility", limit=4 * args.steps)
        times = {}
        for track in (False, True, False, True):
            m, _ = load_model(args.model, device="cpu")
            cfg = SFTConfig(output_dir=str(Path(tmp) / f"ft-{track}-{time.time()}"),
                            target_modules=block_linear_targets(m), max_steps=args.steps,
                            batch_size=4, max_length=256, save_steps=10**9, logging_steps=10**9)
            pm = prepare_model(m, cfg)
            cbs = [DriftTracker(pm, groups, cfg.output_dir, every=10)] if track else []
            tr = build_trainer(pm, tok, examples, cfg, callbacks=cbs, prepare=False)
            t0 = time.perf_counter()
            tr.train()
            times.setdefault(track, []).append(time.perf_counter() - t0)
        out["train_seconds_without"] = [round(x, 2) for x in times[False]]
        out["train_seconds_with_tracking"] = [round(x, 2) for x in times[True]]
        out["overhead_ratio"] = round(min(times[True]) / min(times[False]), 3)
        out["group_sizes"] = {k: len(v) for k, v in groups.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
