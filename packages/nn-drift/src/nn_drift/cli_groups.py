"""``nn-drift groups``: snip-top / set-diff / utility-top / random groups from scores."""

from __future__ import annotations

import argparse
import json
import time

from nn_core.errors import NNError
from nn_core.run.cli import add_common_args, args_config
from nn_drift.cli_score import _fraction_percent

TOOL = "nn-drift groups"


def group_path(folder, name: str, granularity: str):
    from pathlib import Path

    return Path(folder) / (f"{name}.safetensors" if granularity == "weights" else f"{name}.json")


def _groups(args) -> int:
    from nn_core.io import atomic_dir, check_output_dir
    from nn_core.run.manifest import write_manifest
    from nn_drift.groups import METHODS, make_groups, summary
    from nn_drift.scores import load_scores

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise NNError(f"unknown method '{bad[0] if bad else args.method}': use "
                      f"{', '.join(METHODS)} (comma-separated)")
    out = check_output_dir(args.out or f"{str(args.scores).rstrip('/')}-groups", tool=TOOL,
                           overwrite=args.overwrite)
    t0 = time.perf_counter()
    table = load_scores(args.scores)
    groups = make_groups(table, methods, k=args.k / 100, q=args.q / 100, p=args.p / 100,
                         scope=args.scope, granularity=args.granularity, site=args.site,
                         metric=args.metric, like=args.like, seed=args.seed)
    summ = summary(groups)
    with atomic_dir(out, tool=TOOL, overwrite=args.overwrite) as tmp:
        files = []
        for name, g in groups.items():
            files.append(g.save(group_path(tmp, name, args.granularity)).name)
        (tmp / "summary.json").write_text(json.dumps({**summ, "granularity": args.granularity,
                                                      "files": files}, indent=2))
        write_manifest(tmp, config=args_config(args), model_spec=table.model_meta.get("model_id"),
                       phases={"groups": time.perf_counter() - t0}, tool=TOOL,
                       extra={"scores": str(args.scores)})
    for name, s in summ["sizes"].items():
        print(f"{name:12s} {s['total']:>10d} {args.granularity}")
    for pair, j in summ["jaccard"].items():
        print(f"jaccard {pair}: {j:.4f}")
    print(f"wrote {out}")
    return 0


def add_groups_command(sub) -> None:
    s = sub.add_parser("groups", help="weight or neuron groups from nn-drift scores",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("scores", metavar="SCORES", help="a folder written by nn-drift score")
    s.add_argument("--method", default="snip-top,set-diff,utility-top,random",
                   help="comma-separated: snip-top, set-diff, utility-top, random")
    s.add_argument("--k", type=_fraction_percent, default=1.0, help="percent for snip-top/utility-top")
    s.add_argument("--q", type=_fraction_percent, default=10.0, help="set-diff: top q %% by safety score")
    s.add_argument("--p", type=_fraction_percent, default=10.0, help="set-diff: minus top p %% by utility")
    s.add_argument("--scope", choices=("row", "global"), default="row",
                   help="percentages of every output row (per layer for neurons) or of all weights")
    s.add_argument("--granularity", choices=("weights", "neurons"), default="weights")
    s.add_argument("--site", choices=("mlp_act", "mlp_out"), default="mlp_act",
                   help="neurons: down-projection input channel or output row")
    s.add_argument("--metric", choices=("snip", "wanda"), default="snip")
    s.add_argument("--like", default=None, help="random copies this group's per-matrix counts")
    add_common_args(s, model=False, device=False, dtype=False, defaults={"out": None})
    s.set_defaults(func=_groups)
