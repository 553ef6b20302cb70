"""``nn-drift run``: the whole study in one command."""

from __future__ import annotations

import argparse
import json
import time

from nn_core.run.cli import add_common_args, args_config
from nn_drift.cli_score import _fraction_percent, _positive

TOOL = "nn-drift run"


def _run(args) -> int:
    from nn_core.io import atomic_dir, check_output_dir
    from nn_core.run.manifest import write_manifest
    from nn_drift.pipeline import RunSettings, run_pipeline, verdict_table

    out = check_output_dir(args.out or "drift-run", tool=TOOL, overwrite=args.overwrite)
    s = RunSettings(model=args.model, align="no" if args.no_align else args.align,
                    align_steps=args.align_steps, n_score=args.n_score,
                    k=args.k / 100, q=args.q / 100, p=args.p / 100,
                    finetune_steps=args.finetune_steps,
                    finetune_data=args.finetune_data, track_every=args.track_every,
                    lora_r=args.lora_r, batch_size=args.batch_size, max_length=args.max_length,
                    n_eval=args.n_eval, max_new_tokens=args.max_new_tokens, n_boot=args.n_boot,
                    seed=args.seed, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    with atomic_dir(out, tool=TOOL, overwrite=args.overwrite) as tmp:
        result = run_pipeline(s, tmp)
        (tmp / "summary.json").write_text(json.dumps(result, indent=2, default=str))
        write_manifest(tmp, config=args_config(args), model_spec=args.model, phases=s.phases,
                       tool=TOOL, extra={"aligned": result["aligned"],
                                         "total_seconds": time.perf_counter() - t0})
    print(verdict_table(result))
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {out}")
    return 0


def add_run_command(sub) -> None:
    s = sub.add_parser("run", help="align (when needed) -> score -> groups -> finetune -> analyze",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("model", nargs="?", default="smollm2-135m", metavar="MODEL")
    s.add_argument("--align", choices=("auto", "yes", "no"), default="auto",
                   help="auto: align when the held-out refusal rate is below 50 %%")
    s.add_argument("--no-align", action="store_true", help="same as --align no")
    s.add_argument("--align-steps", type=_positive, default=24)
    s.add_argument("--n-score", type=_positive, default=16, help="examples per dataset for scores")
    s.add_argument("--k", type=_fraction_percent, default=1.0)
    s.add_argument("--q", type=_fraction_percent, default=10.0)
    s.add_argument("--p", type=_fraction_percent, default=10.0)
    s.add_argument("--finetune-steps", type=_positive, default=30)
    s.add_argument("--finetune-data", default="assistant",
                   help="benign fine-tuning data: assistant (synthetic tasks, answers opening "
                        "like a chat assistant's), utility (plain task answers), task:NAME, a "
                        "file or hub dataset")
    s.add_argument("--track-every", type=_positive, default=10)
    s.add_argument("--lora-r", type=_positive, default=8)
    s.add_argument("--batch-size", type=_positive, default=4)
    s.add_argument("--max-length", type=_positive, default=256)
    s.add_argument("--n-eval", type=_positive, default=20, help="held-out prompts per measurement")
    s.add_argument("--max-new-tokens", type=_positive, default=32,
                   help="greedy tokens generated per held-out prompt (refusal rate)")
    s.add_argument("--n-boot", type=_positive, default=500)
    add_common_args(s, model=False, defaults={"out": None})
    s.set_defaults(func=_run)
