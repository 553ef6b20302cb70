"""``nn-drift score``: SNIP/Wanda scores on a safety and a utility set."""

from __future__ import annotations

import argparse
import time
import warnings

from nn_core.errors import NNError
from nn_core.run.cli import add_common_args, args_config

TOOL = "nn-drift score"


def _fraction_percent(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], got '{text}'") from None
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], got {v:g}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _score(args) -> int:
    from nn_core.io import atomic_dir, check_output_dir
    from nn_core.model.loading import load_model
    from nn_core.run.manifest import write_manifest
    from nn_drift.data import load_examples, response_batches
    from nn_drift.scores import METRICS, compute_scores, storage_bytes

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise NNError(f"unknown metric '{bad[0] if bad else args.metrics}': use "
                      f"{', '.join(METRICS)} (comma-separated)")
    out = check_output_dir(args.out or "drift-scores", tool=TOOL, overwrite=args.overwrite)
    t0 = time.perf_counter()
    safety = load_examples(args.safety, limit=args.n_samples, seed=args.seed)
    utility = load_examples(args.utility, limit=args.n_samples, seed=args.seed)
    if [(e.prompt, e.response) for e in safety] == [(e.prompt, e.response) for e in utility]:
        warnings.warn("the safety and utility sets are identical: set-diff groups will be empty",
                      stacklevel=1)
        print("warning: the safety and utility sets are identical; set-diff groups will be empty")
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    data = {name: response_batches(tok, ex, batch_size=args.batch_size, max_length=args.max_length)
            for name, ex in (("safety", safety), ("utility", utility))}
    t1 = time.perf_counter()
    table = compute_scores(model, data, metrics, layers=args.layers, modules=args.modules)
    t2 = time.perf_counter()
    with atomic_dir(out, tool=TOOL, overwrite=args.overwrite) as tmp:
        table.save(tmp, store=args.store, fraction=args.top_percent / 100, mode=args.top_mode,
                   extra={"data": {"safety": args.safety, "utility": args.utility,
                                   "n_safety": len(safety), "n_utility": len(utility)}})
        nbytes = storage_bytes(tmp)
        write_manifest(tmp, config=args_config(args), model=model, model_spec=args.model,
                       phases={"load": t1 - t0, "score": t2 - t1}, tool=TOOL,
                       extra={"storage_bytes": nbytes,
                              "scored_param_bytes_fp32": sum(p.shape[0] * p.shape[1] * 4
                                                             for p in table.params)})
    print(f"scored {len(table.params)} weight matrices with {', '.join(metrics)} on "
          f"{len(safety)} safety and {len(utility)} utility examples in {t2 - t1:.1f}s; "
          f"stored {args.store} ({nbytes / 2**20:.2f} MiB)")
    print(f"wrote {out}")
    return 0


def add_score_command(sub) -> None:
    s = sub.add_parser("score", help="SNIP and Wanda scores on the safety and utility sets",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("model", nargs="?", default="smollm2-135m", metavar="MODEL",
                   help="alias, local folder or hub id")
    s.add_argument("--safety", default="safety",
                   help="safety data: 'safety' (embedded), a local instruction file or a hub dataset")
    s.add_argument("--utility", default="utility",
                   help="utility data: 'utility' (nn-eval synthetic tasks), task:NAME, a file or hub dataset")
    s.add_argument("--metrics", default="snip,wanda", help="comma-separated: snip, wanda")
    s.add_argument("--n-samples", type=_positive, default=64, metavar="N",
                   help="examples per dataset")
    s.add_argument("--batch-size", type=_positive, default=8)
    s.add_argument("--max-length", type=_positive, default=256, help="tokens per example")
    s.add_argument("--store", choices=("top", "full"), default="top",
                   help="top: only the top --top-percent as WeightSets with scores; full: every "
                        "score as float16 safetensors shards")
    s.add_argument("--top-percent", type=_fraction_percent, default=10.0, metavar="P",
                   help="percent kept with --store top (groups can use any q, p <= P)")
    s.add_argument("--top-mode", choices=("row", "global"), default="row",
                   help="top P%% of every output row (the anchor's comparison group) or of all weights")
    s.add_argument("--layers", default=None, help="decoder blocks to score, e.g. 0-3,7")
    s.add_argument("--modules", default=None, help="dotted module names, e.g. mlp or mlp.down_proj")
    add_common_args(s, model=False, defaults={"out": None})
    s.set_defaults(func=_score)
