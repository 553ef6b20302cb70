"""``nn-drift analyze``: statistics, plots and verdicts of a drift run."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nn_core.run.cli import add_common_args, args_config
from nn_drift.cli_score import _positive

TOOL = "nn-drift analyze"


def _analyze(args) -> int:
    from nn_core.io import atomic_dir, check_output_dir
    from nn_core.run.manifest import write_manifest
    from nn_drift.analysis import write_analysis

    out = check_output_dir(args.out or f"{str(args.run).rstrip('/')}-analysis", tool=TOOL,
                           overwrite=args.overwrite)
    t0 = time.perf_counter()
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    behaviour = _behaviour(args) if args.behaviour else None
    with atomic_dir(out, tool=TOOL, overwrite=args.overwrite) as tmp:
        write_analysis(args.run, tmp, baseline=args.baseline, steps=steps, n_boot=args.n_boot,
                       seed=args.seed, behaviour=behaviour)
        write_manifest(tmp, config=args_config(args), phases={"analyze": time.perf_counter() - t0},
                       tool=TOOL, extra={"run": str(args.run)})
    print((out / "report.md").read_text())
    print(f"wrote {out}")
    return 0


def _behaviour(args) -> dict:
    """Refusal rate and utility loss of the run's base model (stage ``original``) and of
    base + adapter (``finetuned``): the stage names of :data:`nn_drift.behaviour.STAGES`."""
    from nn_core.errors import NNError
    from nn_core.model.loading import load_model
    from nn_drift.behaviour import measure_stage
    from nn_drift.data import SAFETY_HELDOUT, load_examples

    manifest = json.loads((Path(args.run) / "manifest.json").read_text()) \
        if (Path(args.run) / "manifest.json").is_file() else {}
    spec = args.model or (manifest.get("model") or {}).get("id")
    if not spec:
        raise NNError("cannot tell the run's base model: pass --model")
    harmful = load_examples(SAFETY_HELDOUT, limit=args.n_eval)
    utility = load_examples("utility", limit=args.n_eval, seed=args.seed + 1)
    model, tok = load_model(spec, device=args.device, dtype=args.dtype, seed=args.seed)
    original = measure_stage(model, tok, harmful, utility)
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, str(Path(args.run) / "adapter"))
    return {"original": original, "finetuned": measure_stage(tuned, tok, harmful, utility)}


def add_analyze_command(sub) -> None:
    s = sub.add_parser("analyze", help="drift statistics (Cohen's d, bootstrap CI, Mann-Whitney), "
                       "plots and verdicts of a finetune run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("run", metavar="RUN_DIR", help="a folder written by nn-drift finetune")
    s.add_argument("--baseline", default="random", help="the group every other is compared with")
    s.add_argument("--steps", default=None, help="comma-separated logged steps (default: the last)")
    s.add_argument("--n-boot", type=_positive, default=1000, help="bootstrap resamples")
    s.add_argument("--behaviour", action="store_true",
                   help="also measure refusal rate (held-out harmful prompts) and utility NLL "
                        "before and after fine-tuning")
    s.add_argument("--model", default=None, help="base model of the run (default: from its manifest)")
    s.add_argument("--n-eval", type=_positive, default=20, help="examples per behaviour measurement")
    add_common_args(s, model=False, defaults={"out": None})
    s.set_defaults(func=_analyze)
