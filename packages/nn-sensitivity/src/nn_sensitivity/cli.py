"""``nn-sensitivity``: which weights matter, proven against controls.

``nn-sensitivity run`` with no flags runs the whole study on the embedded defaults
(smollm2-135m, pydoc text) in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  nn-sensitivity run
  nn-sensitivity run --metric hutchinson_diag --probes 8 --topk 10,100,1000,10000 \\
      --perturb bit_flip --bit 30 --controls random_k,bottom_k --seeds 0,1,2 --out runs/hutch
  nn-sensitivity run --config study.yaml --mode per-layer
  nn-sensitivity evaluate runs/sensitivity/rankings/top_k_k100.safetensors --perturb zero
  nn-sensitivity metrics
"""


def _int_list(text: str) -> list[int]:
    from nn_sensitivity.runner import parse_int_list

    try:
        return parse_int_list(text)
    except Exception as exc:  # argparse turns this into a usage error (exit 2)
        raise argparse.ArgumentTypeError(str(exc)) from None


def _name_list(text: str) -> list[str]:
    return [p.strip() for p in str(text).strip("[]").replace("'", "").split(",") if p.strip()]


def _flat(values) -> list:
    """``--topk 10,100 1000`` and YAML lists arrive as lists of lists."""
    return [v for part in values for v in (part if isinstance(part, list) else [part])]


def _add_run(sub) -> None:
    from nn_core.run.cli import add_common_args

    p = sub.add_parser(
        "run", help="score, rank, perturb against controls, evaluate and plot",
        description="Run a sensitivity study and write rankings/, perturbation_results.json, "
                    "stability.json, plots/ and manifest.json under --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, seed=False, defaults={"out": "runs/sensitivity"})
    g = p.add_argument_group("study")
    g.add_argument("--data", default="pydoc", metavar="SPEC",
                   help="text: pydoc, a .txt/.json/.jsonl/.csv/.parquet file or folder, or a hub "
                        "dataset (default: %(default)s)")
    g.add_argument("--metric", default="grad_x_weight", metavar="NAME",
                   help="grad_x_weight, grad_squared, snip, hutchinson_diag, magnitude, act_mag "
                        "or wanda (default: %(default)s)")
    g.add_argument("--topk", type=_int_list, nargs="+", default=[[10, 100, 1000]], metavar="LIST",
                   help="K sweep, comma-separated (default: 10,100,1000)")
    g.add_argument("--mode", default="global", metavar="MODE",
                   help="global (K over all eligible weights) or per-layer (K per decoder block)"
                        " (default: %(default)s)")
    g.add_argument("--controls", type=_name_list, nargs="+", default=[["random_k", "bottom_k"]],
                   metavar="LIST", help="random_k, bottom_k or both (default: random_k,bottom_k);"
                                        " 'none' for no controls")
    g.add_argument("--seeds", type=_int_list, nargs="+", default=[[0, 1, 2]], metavar="LIST",
                   help="calibration seeds: the first drives the study, all of them the "
                        "stability check (default: 0,1,2)")
    g.add_argument("--random-draws", type=int, default=5, metavar="N",
                   help="random_k control: draws per K (seeds S, S+1, ... from the first "
                        "seed), reported as mean, sd, min and max (default: %(default)s)")
    g.add_argument("--stability", action="store_true", default=True,
                   help="compare top-K sets across --seeds (on by default)")
    g.add_argument("--no-stability", action="store_true", default=False,
                   help="skip the stability check")
    pg = p.add_argument_group("perturbation")
    pg.add_argument("--perturb", default="sign_flip", metavar="KIND",
                    help="zero, sign_flip, gauss_noise or bit_flip (default: %(default)s)")
    pg.add_argument("--perturb-scale", type=float, default=1.0, metavar="S",
                    help="gauss_noise sigma = S*|w| (or S with --perturb-absolute) (default: 1.0)")
    pg.add_argument("--perturb-absolute", action="store_true",
                    help="gauss_noise sigma is S itself, not S*|w|")
    pg.add_argument("--bit", type=int, default=None, metavar="B",
                    help="bit_flip: flip bit B of every selected weight (fp32: 31 sign, 23-30 "
                         "exponent); default: a random bit per weight")
    pg.add_argument("--prob", type=float, default=1.0, metavar="P",
                    help="bit_flip with a random bit: flip each selected weight with "
                         "probability P (default: 1.0)")
    dg = p.add_argument_group("data sizes")
    dg.add_argument("--calib-blocks", type=int, default=8, metavar="N",
                    help="calibration blocks per seed (default: %(default)s)")
    dg.add_argument("--block-len", type=int, default=128, metavar="T",
                    help="tokens per calibration block (default: %(default)s)")
    dg.add_argument("--batch-size", type=int, default=4, metavar="B",
                    help="sequences per forward pass (default: %(default)s)")
    dg.add_argument("--heldout-fraction", type=float, default=0.2, metavar="F",
                    help="fraction of documents held out for evaluation (default: %(default)s)")
    dg.add_argument("--eval-tokens", type=int, default=2048, metavar="N",
                    help="held-out tokens to evaluate on (default: %(default)s)")
    dg.add_argument("--eval-len", type=int, default=256, metavar="T",
                    help="tokens per held-out sequence (default: %(default)s)")
    mg = p.add_argument_group("metric and weights")
    mg.add_argument("--probes", type=int, default=4, metavar="N",
                    help="hutchinson_diag: Rademacher probes per batch (default: %(default)s)")
    mg.add_argument("--per-sample", action="store_true",
                    help="grad_squared: square per-sequence gradients (the default)")
    mg.add_argument("--per-batch", action="store_true",
                    help="grad_squared: square per-batch gradients instead (scores then depend "
                         "on --batch-size)")
    mg.add_argument("--include-embeddings", action="store_true",
                    help="also score the input embedding")
    mg.add_argument("--include-lm-head", action="store_true", help="also score the LM head")
    mg.add_argument("--layers", default=None, metavar="RANGE",
                    help="decoder blocks to score, e.g. 0-3,7 (default: all)")
    mg.add_argument("--modules", default=None, metavar="NAMES",
                    help="exact dotted module names, e.g. mlp.down_proj,self_attn.q_proj "
                         "(layers.1 never matches layers.10) (default: all)")
    mg.add_argument("--csv-rows", type=int, default=1000, metavar="N",
                    help="rows in the ranking CSVs (default: %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from nn_sensitivity.runner import StudyConfig, run_study

    controls = [c for c in _flat(args.controls) if c != "none"]
    cfg = StudyConfig(
        model=args.model, data=args.data, metric=args.metric, topk=_flat(args.topk),
        mode=args.mode, perturb=args.perturb, perturb_scale=args.perturb_scale,
        perturb_absolute=args.perturb_absolute, bit=args.bit, prob=args.prob,
        controls=controls, seeds=_flat(args.seeds),
        stability=bool(args.stability) and not args.no_stability,
        calib_blocks=args.calib_blocks, block_len=args.block_len, batch_size=args.batch_size,
        heldout_fraction=args.heldout_fraction, eval_tokens=args.eval_tokens,
        eval_len=args.eval_len, probes=args.probes,
        per_sample=not args.per_batch, random_draws=args.random_draws,
        include_embeddings=args.include_embeddings, include_lm_head=args.include_lm_head,
        layers=args.layers, modules=args.modules, csv_rows=args.csv_rows,
        device=args.device, dtype=args.dtype, out=args.out or "runs/sensitivity",
        overwrite=args.overwrite,
    )
    run_study(cfg)
    return 0


def _add_evaluate(sub) -> None:
    from nn_core.run.cli import add_common_args

    p = sub.add_parser(
        "evaluate", help="perturb a saved WeightSet and measure the held-out change",
        description="Load a WeightSet (e.g. rankings/top_k_k100.safetensors from a run), perturb "
                    "it in --model and report ΔPPL, ΔNLL and Δtoken-accuracy.",
        epilog="example:\n  nn-sensitivity evaluate runs/sensitivity/rankings/top_k_k100.safetensors"
               " --perturb zero --out runs/eval-zero",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", metavar="WEIGHTS.safetensors", help="a WeightSet file")
    add_common_args(p, defaults={"out": "runs/sensitivity-eval"})
    p.add_argument("--data", default="pydoc", metavar="SPEC", help="text (default: %(default)s)")
    p.add_argument("--perturb", default="sign_flip", metavar="KIND",
                   help="zero, sign_flip, gauss_noise or bit_flip (default: %(default)s)")
    p.add_argument("--perturb-scale", type=float, default=1.0, metavar="S")
    p.add_argument("--perturb-absolute", action="store_true")
    p.add_argument("--bit", type=int, default=None, metavar="B")
    p.add_argument("--prob", type=float, default=1.0, metavar="P")
    p.add_argument("--heldout-fraction", type=float, default=0.2, metavar="F")
    p.add_argument("--eval-tokens", type=int, default=2048, metavar="N")
    p.add_argument("--eval-len", type=int, default=256, metavar="T")
    p.add_argument("--batch-size", type=int, default=4, metavar="B")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from nn_sensitivity.runner import StudyConfig, evaluate_weightset

    cfg = StudyConfig(model=args.model, data=args.data, perturb=args.perturb,
                      perturb_scale=args.perturb_scale, perturb_absolute=args.perturb_absolute,
                      bit=args.bit, prob=args.prob, seeds=[args.seed],
                      heldout_fraction=args.heldout_fraction, eval_tokens=args.eval_tokens,
                      eval_len=args.eval_len, batch_size=args.batch_size, calib_blocks=1,
                      block_len=16, device=args.device, dtype=args.dtype,
                      out=args.out or "runs/sensitivity-eval", overwrite=args.overwrite)
    evaluate_weightset(cfg, args.weights)
    return 0


def _metrics(args: argparse.Namespace) -> int:
    from nn_sensitivity.metrics import METRICS
    from nn_sensitivity.perturb import PERTURBATIONS

    for name, fn in METRICS.items():
        doc = " ".join((fn.__doc__ or "").split())
        print(f"{name}\n    {doc}\n")
    print("perturbations: " + ", ".join(PERTURBATIONS))
    return 0


def main(argv: list[str] | None = None) -> int:
    from nn_core.run.cli import cli_main, make_parser

    parser = make_parser("nn-sensitivity",
                         "Per-weight sensitivity: score, rank against controls, perturb, "
                         "measure.", EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_evaluate(sub)
    m = sub.add_parser("metrics", help="list the metrics with their formulas")
    m.set_defaults(func=_metrics)
    return cli_main(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
