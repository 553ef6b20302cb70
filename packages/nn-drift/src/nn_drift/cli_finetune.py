"""``nn-drift finetune``: LoRA fine-tuning with drift tracking of groups."""

from __future__ import annotations

import argparse

from nn_core.run.cli import add_common_args
from nn_drift.cli_score import _positive

TOOL = "nn-drift finetune"


def _finetune(args) -> int:
    from nn_core.io import check_output_dir
    from nn_core.model.loading import load_model
    from nn_core.train import SFTConfig
    from nn_core.train.fingerprint import FINGERPRINT_FILE
    from nn_drift.data import load_examples
    from nn_drift.drift import DRIFT_LOG, load_groups, read_drift
    from nn_drift.finetune import finetune_with_drift

    out = args.out or "drift-finetune"
    # training resumes in its folder, so an unfinished run (fingerprint or drift log, no
    # manifest yet) is ours too
    check_output_dir(out, tool=TOOL, overwrite=args.overwrite, markers=(FINGERPRINT_FILE, DRIFT_LOG))
    groups = load_groups(args.groups)
    examples = load_examples(args.data, limit=args.n_samples, seed=args.seed)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    cfg = SFTConfig(output_dir=out, method="lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                    target_modules=targets, learning_rate=args.lr, max_steps=args.max_steps,
                    num_train_epochs=args.epochs, batch_size=args.batch_size,
                    max_length=args.max_length, seed=args.seed, save_steps=args.save_steps,
                    logging_steps=max(1, args.track_every)).check()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    result, _ = finetune_with_drift(model, tok, examples, groups, cfg, track_every=args.track_every,
                                    freeze=args.freeze_group or (), resume=not args.no_resume,
                                    model_spec=args.model, tool=TOOL)
    rows = [r for r in read_drift(out) if r["step"] == result.global_step and r["metric"] == "relative"]
    print(f"trained {result.global_step} steps (LoRA r={args.lora_r} on {', '.join(cfg.target_modules)}); "
          f"loss {result.metrics.get('training_loss', float('nan')):.4f}")
    for r in rows:
        print(f"  {r['group']:14s} relative change: mean {r['mean']:.3e}  median {r['median']:.3e}  (n={r['n']})")
    print(f"wrote {out}/{DRIFT_LOG} and {result.saved}")
    return 0


def add_finetune_command(sub) -> None:
    s = sub.add_parser("finetune", help="LoRA fine-tuning that logs how far each group drifts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("model", metavar="MODEL", help="alias, local folder or hub id")
    s.add_argument("data", metavar="DATA", nargs="?", default="utility",
                   help="fine-tuning data: utility (synthetic tasks), task:NAME, a file or hub dataset")
    s.add_argument("--groups", nargs="+", required=True, metavar="G",
                   help="group files (.safetensors WeightSet, .json NeuronSet) or nn-drift groups folders")
    s.add_argument("--track-every", type=_positive, default=10, metavar="N",
                   help="log drift every N optimizer steps (and at 0 and the end)")
    s.add_argument("--freeze-group", action="append", default=None, metavar="G",
                   help="keep this group's rows (channels) out of LoRA's update; repeatable")
    s.add_argument("--lora-r", type=_positive, default=8)
    s.add_argument("--lora-alpha", type=_positive, default=16)
    s.add_argument("--targets", default=None,
                   help="comma-separated LoRA target modules (default: every linear layer of the blocks)")
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--max-steps", type=int, default=100)
    s.add_argument("--epochs", type=float, default=1.0)
    s.add_argument("--batch-size", type=_positive, default=4)
    s.add_argument("--max-length", type=_positive, default=256)
    s.add_argument("--n-samples", type=_positive, default=None, metavar="N", help="examples used")
    s.add_argument("--save-steps", type=_positive, default=50, help="checkpoint every N steps")
    s.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    add_common_args(s, model=False, defaults={"out": None})
    s.set_defaults(func=_finetune)
