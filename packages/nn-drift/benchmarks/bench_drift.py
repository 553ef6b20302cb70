"""Drift-tracking overhead and score memory/storage, as JSON.

    OMP_NUM_THREADS=1 uv run python packages/nn-drift/benchmarks/bench_drift.py \
        --model smollm2-135m --out packages/nn-drift/benchmarks/results_cpu.json

overhead: wall time of LoRA fine-tuning (``--steps`` optimizer steps, every linear layer
of the blocks) with a :class:`~nn_drift.drift.DriftTracker` logging a set-diff group and a
same-size random group every ``--every`` steps (plus step 0 and the end), divided by the
same run without tracking. Runs are interleaved (without, with, without, with, ...)
``--repeats`` times each; reported: median(with) / median(without) (issue target
<= 1.1), the median of the adjacent pairs' ratios, and ``overhead_ratio_accounted`` = 1 +
(the tracker's own seconds per run: initial capture + measurements) / median(without),
the overhead without the noise of a shared machine.

memory: peak resident memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``
before each phase) growth during SNIP scoring and during storing the scores, against the
scored weights' fp32 bytes; bytes on disk of top-fraction storage (1 %, 5 %, 10 % per
output row) and of full float16 storage. Top storage is expected to be proportional to
the fraction (``top_bytes_per_fraction`` nearly constant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _peak_growth(fn):
    """(result, seconds, peak RSS growth in bytes) of ``fn()``."""
    _reset_peak()
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return out, dt, max(0, _rss_kib("VmHWM") - base) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="runs with and without tracking, each")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--n-score", type=int, default=8)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    import torch

    from nn_core.model.loading import load_model
    from nn_core.train import SFTConfig, build_trainer, prepare_model
    from nn_drift.data import load_examples, response_batches
    from nn_drift.drift import DriftTracker
    from nn_drift.finetune import block_linear_targets
    from nn_drift.groups import make_groups
    from nn_drift.scores import compute_scores, storage_bytes

    model, tok = load_model(args.model, device="cpu", dtype="float32")
    data = {d: response_batches(tok, load_examples(d, limit=args.n_score), batch_size=4,
                                max_length=256) for d in ("safety", "utility")}
    table, score_s, score_peak = _peak_growth(lambda: compute_scores(model, data, ("snip",),
                                                                     progress=False))
    param_bytes = sum(p.shape[0] * p.shape[1] * 4 for p in table.params)
    out: dict = {"model": args.model, "torch_threads": torch.get_num_threads(),
                 "load_average": list(os.getloadavg()), "n_score": args.n_score,
                 "score_seconds": round(score_s, 2), "score_peak_rss_growth_bytes": score_peak,
                 "scored_param_bytes_fp32": param_bytes,
                 "score_peak_over_param_bytes": round(score_peak / param_bytes, 3)}
    with tempfile.TemporaryDirectory() as tmp:
        per_frac = {}
        for store, frac in (("top", 0.01), ("top", 0.05), ("top", 0.1), ("full", 1.0)):
            d = Path(tmp) / f"{store}-{frac}"
            d.mkdir()
            _, save_s, save_peak = _peak_growth(lambda d=d, store=store, frac=frac:
                                                table.save(d, store=store, fraction=frac))
            key = f"{store}_{frac:g}"
            nbytes = storage_bytes(d)
            out[f"storage_{key}_bytes"] = nbytes
            out[f"storage_{key}_over_param_bytes"] = round(nbytes / param_bytes, 4)
            out[f"store_{key}_peak_rss_growth_bytes"] = save_peak
            out[f"store_{key}_seconds"] = round(save_s, 2)
            if store == "top":
                per_frac[f"{frac:g}"] = round(nbytes / frac / param_bytes, 4)
        out["top_bytes_per_fraction_over_param_bytes"] = per_frac
        groups = make_groups(table, ["set-diff", "random"], q=0.1, p=0.1)
        out["group_sizes"] = {k: len(v) for k, v in groups.items()}
        examples = load_examples("utility", limit=args.batch_size * args.steps)
        times: dict[bool, list[float]] = {False: [], True: []}
        measure: list[float] = []
        capture: list[float] = []
        for i in range(args.repeats):
            for track in (False, True):
                m, _ = load_model(args.model, device="cpu", dtype="float32")
                cfg = SFTConfig(output_dir=str(Path(tmp) / f"ft-{i}-{track}"),
                                target_modules=block_linear_targets(m), max_steps=args.steps,
                                batch_size=args.batch_size, max_length=args.max_length,
                                save_steps=10**9, logging_steps=10**9, seed=0)
                pm = prepare_model(m, cfg)
                cbs = []
                if track:
                    tracker = DriftTracker(pm, groups, cfg.output_dir, every=args.every)
                    orig = tracker.measure

                    def timed(step, orig=orig):
                        t = time.perf_counter()
                        r = orig(step)
                        measure.append(time.perf_counter() - t)
                        return r

                    tracker.measure = timed
                    orig_cap = tracker.capture_initial

                    def timed_cap(orig_cap=orig_cap):
                        t = time.perf_counter()
                        orig_cap()
                        capture.append(time.perf_counter() - t)

                    tracker.capture_initial = timed_cap
                    cbs = [tracker]
                tr = build_trainer(pm, tok, examples, cfg, callbacks=cbs, prepare=False)
                t0 = time.perf_counter()
                tr.train()
                times[track].append(time.perf_counter() - t0)
                print(f"repeat {i} tracking={track}: {times[track][-1]:.1f}s", flush=True)
        without, with_ = statistics.median(times[False]), statistics.median(times[True])
        out.update({
            "steps": args.steps, "every": args.every, "batch_size": args.batch_size,
            "train_seconds_without": [round(x, 2) for x in times[False]],
            "train_seconds_with_tracking": [round(x, 2) for x in times[True]],
            "overhead_ratio_median": round(with_ / without, 3),
            "overhead_ratio_paired_median": round(statistics.median(
                w / o for w, o in zip(times[True], times[False], strict=True)), 3),
            # the tracker's own seconds per run (initial capture + measurements) over the
            # untracked run: the overhead without the noise of a shared machine
            "overhead_ratio_accounted": round(
                1 + (sum(measure) + sum(capture)) / args.repeats / without, 4),
            "capture_seconds_median": round(statistics.median(capture), 3) if capture else None,
            "measure_calls_per_run": len(measure) // max(1, args.repeats),
            "measure_seconds_median": round(statistics.median(measure), 3) if measure else None,
            "measure_share_of_untracked_run": round(
                statistics.median(measure) * len(measure) / args.repeats / without, 4)
            if measure else None,
            "load_average_end": list(os.getloadavg()),
        })
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
