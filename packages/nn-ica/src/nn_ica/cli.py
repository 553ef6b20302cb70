"""``nn-ica``: build ICA templates, inspect and match them, evaluate and train with masks.

    nn-ica build MODEL DATA... [--site mlp_act] [--components 20] [--out DIR]
    nn-ica show FILE
    nn-ica match A B
    nn-ica eval --templates FILE --components IDS --mode lesion|preserve
    nn-ica train --templates FILE --components IDS --mode lesion|preserve --data INSTR

Bad input exits 2 with one line on stderr; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nn_core.errors import NNError
from nn_core.run.cli import add_common_args, args_config, cli_main, make_parser

EPILOG = """examples:
  nn-ica build smollm2-135m pydoc --out runs/ica
  nn-ica show runs/ica/templates.json
  nn-ica eval --templates runs/ica/templates.json --components 0 --mode lesion
  nn-ica train --templates runs/ica/templates.json --components 0,1 --mode preserve \\
      --data alpaca.json --max-steps 100 --freeze-masked --out runs/ica-train
"""


# --------------------------------------------------------------------------- parsing helpers
def parse_layers(text: str | None) -> list[int] | None:
    """``all`` -> None; ``0-9`` -> 0..9; ``0,4,8`` -> those; ranges and lists combine."""
    if text is None or text.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise NNError(f"bad --layers '{text}': use all, a range such as 0-9, or a list such as 0,4,8") from None
    return out


def parse_ids(text: str, templates) -> list[int]:
    """Component ids: ``0,2,5``, ranges ``0-3``, or ``largest``."""
    if text.strip().lower() == "largest":
        return [templates.largest()]
    try:
        ids = parse_layers(text)
    except NNError:
        raise NNError(f"bad --components '{text}': use ids such as 0 or 0,2,5 or 0-3, or largest") from None
    if ids is None:
        return templates.ids
    return templates.check_ids(ids)


def eval_datasets(templates, data: list[str] | None) -> list[str]:
    """``--data`` if given, else the datasets recorded in the templates."""
    if data:
        return list(data)
    recorded = [d for d in (templates.metadata.get("datasets") or []) if isinstance(d, str) and d != "<texts>"]
    if not recorded:
        raise NNError("the templates record no dataset to evaluate on: pass --data, e.g. --data pydoc")
    return recorded


def _load(args, spec: str | None, *, what: str):
    from nn_core.model.loading import load_model

    if not spec:
        raise NNError(f"no model for {what}: pass --model (the templates do not name one)")
    return load_model(spec, device=args.device, dtype=args.dtype, seed=args.seed)


def _tool(args) -> str:
    return getattr(args, "_tool", None) or f"nn-ica {args.command}"


def _write_outputs(out: Path, args, model, spec: str, phases: dict, extra: dict, files) -> None:
    """``files(folder)`` writes the results; they and ``manifest.json`` land in ``out``
    together (one rename), so no result is ever seen without its provenance."""
    from nn_core.io import atomic_dir
    from nn_core.run.manifest import write_manifest

    with atomic_dir(out, tool=_tool(args), overwrite=args.overwrite) as tmp:
        files(tmp)
        write_manifest(tmp, config=args_config(args), model=model, model_spec=spec, seeds=args.seed,
                       phases=phases, extra=extra, tool=_tool(args))


# --------------------------------------------------------------------------- commands
def _build(args) -> int:
    from nn_ica.build import BuildConfig, build_templates

    cfg = BuildConfig(
        site=args.site, layers=parse_layers(args.layers), samples=args.samples,
        max_length=args.max_length, max_tokens=args.max_tokens, batch_size=args.batch_size,
        pca_components=args.pca_components, components=args.components,
        percentile=args.percentile, backend=args.backend, seed=args.seed,
        max_iter=args.max_iter, tol=args.tol, heldout_fraction=args.heldout_fraction,
        method=args.method, z_threshold=args.z_threshold, layout=args.layout, subsets=args.subsets,
    ).check()
    from nn_core.io import check_output_dir

    out = check_output_dir(args.out or f"ica-{Path(args.model_spec).name}", tool=_tool(args),
                           overwrite=args.overwrite)  # before minutes of work, not after
    t0 = time.perf_counter()
    model, tok = _load(args, args.model_spec, what="nn-ica build")
    load_s = time.perf_counter() - t0
    templates = build_templates(model, tok, args.data, cfg, progress=None)
    path = out / "templates.json"
    phases = {"load_model": load_s, **{k.removesuffix("_s"): v for k, v in templates.metadata["timings"].items()
                                        if k != "total_s"}}
    _write_outputs(out, args, model, args.model_spec, phases,
                   {"templates": str(path), "matrix": templates.metadata["matrix"],
                    "ica": templates.metadata["ica"]},
                   lambda tmp: templates.save(tmp / "templates.json"))
    print(templates.summary())
    if not templates.metadata["ica"]["converged"]:
        print(f"warning: FastICA did not converge in {cfg.max_iter} iterations; raise --max-iter "
              "or --tol", file=sys.stderr)
    print(f"wrote {path}")
    return 0


def _show(args) -> int:
    from nn_ica.templates import Templates

    t = Templates.load(args.file)
    if args.json:
        print(json.dumps({"metadata": t.metadata,
                          "components": [{"id": c.id, "size": c.size, "variance": c.variance,
                                          "layers": c.layer_sizes()} for c in t.components]}, indent=2))
    else:
        print(t.summary())
    return 0


def _match(args) -> int:
    from nn_ica.templates import Templates, match_templates

    a, b = Templates.load(args.a), Templates.load(args.b)
    pairs = match_templates(a, b)
    if args.json:
        print(json.dumps(pairs, indent=2))
        return 0
    print(f"{'A':>4} {'B':>4} {'IoU':>7}")
    for p in pairs:
        print(f"{p['a']:>4} {p['b']:>4} {p['iou']:>7.3f}")
    if pairs:
        print(f"mean IoU {sum(p['iou'] for p in pairs) / len(pairs):.3f} over {len(pairs)} pairs")
    return 0


def _eval(args) -> int:
    from nn_core.io import atomic_write_json
    from nn_ica.evaluate import check_seed, evaluate_components, heldout_texts
    from nn_ica.templates import Templates

    check_seed(args.seed)
    templates = Templates.load(args.templates)
    ranking = args.components.strip().lower() == "all"
    ids = templates.ids if ranking else parse_ids(args.components, templates)
    if args.preserve_fraction is not None and not 0 < args.preserve_fraction < 1:
        raise NNError(f"--preserve-fraction must be in (0, 1), got {args.preserve_fraction}")
    data = eval_datasets(templates, args.data)
    built_frac = templates.metadata.get("heldout_fraction")
    if args.heldout_fraction is None and built_frac is not None and float(built_frac) == 0:
        print("warning: the templates were built with --heldout-fraction 0, so these evaluation texts "
              "overlap the texts the templates were built on", file=sys.stderr)
    spec = args.model or templates.metadata.get("model_id")
    t0 = time.perf_counter()
    model, tok = _load(args, spec, what="nn-ica eval")
    load_s = time.perf_counter() - t0
    frac = templates.metadata.get("heldout_fraction", 0.1) if args.heldout_fraction is None else args.heldout_fraction
    texts = heldout_texts(data, heldout_fraction=frac, limit=args.samples, seed=args.seed)
    t1 = time.perf_counter()
    if ranking or args.preserve_fraction is not None:
        report = _rank_and_preserve(args, model, tok, templates, ids, texts)
        report["data"] = {"datasets": list(data), "heldout_fraction": frac, "n_texts": len(texts)}
        if args.out:
            out = Path(args.out)
            _write_outputs(out, args, model, spec, {"load_model": load_s, "eval": time.perf_counter() - t1},
                           {"templates": str(args.templates), "components": ids, "ranking": True},
                           lambda tmp: atomic_write_json(tmp / "eval.json", report))
            print(f"wrote {out / 'eval.json'}")
        return 0
    report = evaluate_components(
        model, tok, templates, ids, texts, mode=args.mode, n_random=args.random, seed=args.seed,
        max_length=args.max_length, batch_size=args.batch_size, check_id=not args.ignore_model_id,
        site=args.site, progress=lambda m: print(f"[nn-ica eval] {m}", file=sys.stderr),
    )
    report["data"] = {"datasets": list(data), "heldout_fraction": frac, "n_texts": len(texts)}
    eval_s = time.perf_counter() - t1
    r = report["random"]
    print(f"{args.mode} components {ids} ({report['n_neurons']} neurons, site {report['site']})")
    print(f"  baseline PPL {report['baseline']['ppl']:.4f}; masked PPL {report['intervened']['ppl']:.4f}; "
          f"ΔPPL {report['delta_ppl']:+.4f}")
    if r["delta_ppl"]:
        std = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        print(f"  random controls ({len(r['delta_ppl'])} seeds, same per-layer sizes): ΔPPL mean "
              f"{r['mean']:+.4f}{std}; excess {report['excess']:+.4f}")
    if args.out:
        out = Path(args.out)
        _write_outputs(out, args, model, spec, {"load_model": load_s, "eval": eval_s},
                       {"templates": str(args.templates), "components": ids, "mode": args.mode},
                       lambda tmp: atomic_write_json(tmp / "eval.json", report))
        print(f"wrote {out / 'eval.json'}")
    return 0


def _rank_and_preserve(args, model, tok, templates, ids, texts) -> dict:
    """``--components all``: rank every component by its lesion effect against size-matched
    random lesions (one table), then lesion the union of the ranked components; with
    ``--preserve-fraction F``, preserve the top-ranked union covering about F."""
    from nn_ica.evaluate import evaluate_components, pick_fraction, rank_components

    say = lambda m: print(f"[nn-ica eval] {m}", file=sys.stderr)  # noqa: E731
    kw = dict(seed=args.seed, max_length=args.max_length, batch_size=args.batch_size,
              check_id=not args.ignore_model_id, site=args.site, progress=say)
    rank = rank_components(model, tok, templates, texts, components=ids, n_random=args.random, **kw)
    base = rank["baseline"]["ppl"]
    print(f"components ranked by lesion ΔPPL vs {args.random} size-matched random lesions "
          f"(baseline PPL {base:.4f}; {rank['n_channels']} channels)")
    print(f"{'rank':>4} {'id':>5} {'size':>6} {'frac%':>6} {'ΔPPL':>9} {'random mean ± sd':>20} {'z':>7} {'ratio':>7}")
    for i, r in enumerate(rank["rows"]):
        rnd = "-" if r["random_mean"] is None else (
            f"{r['random_mean']:+.3f}" + ("" if r["random_std"] is None else f" ± {r['random_std']:.3f}"))
        z = "-" if r["z"] is None else f"{r['z']:.2f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{i:>4} {r['id']:>5} {r['size']:>6} {100 * r['fraction']:>6.2f} {r['delta_ppl']:>+9.3f} "
              f"{rnd:>20} {z:>7} {ratio:>7}")
    order = [r["id"] for r in rank["rows"] if r["size"] > 0]
    report: dict = {"ranking": rank}

    def summary(name: str, picked: list[int], mode: str) -> dict:
        rep = evaluate_components(model, tok, templates, picked, texts, mode=mode, n_random=args.random, **kw)
        rnd = rep["random"]
        std = "" if rnd["std"] is None else f" ± {rnd['std']:.3f}"
        print(f"{name}: {mode} {len(picked)} components, {rep['n_neurons']} channels "
              f"({100 * rep['n_neurons'] / rank['n_channels']:.2f} %): ΔPPL {rep['delta_ppl']:+.3f}; "
              f"random {rnd['mean']:+.3f}{std}" if rnd["mean"] is not None else
              f"{name}: {mode} ΔPPL {rep['delta_ppl']:+.3f}")
        return rep

    if order:
        report["lesion_all"] = summary("key networks (union of all)", order, "lesion")
    if args.preserve_fraction is not None and order:
        picked, covered = pick_fraction(templates, order, args.preserve_fraction, rank["n_channels"])
        report["preserve"] = summary(f"preserve top-ranked ≈{100 * args.preserve_fraction:.0f} %", picked, "preserve")
        report["preserve"]["covered_fraction"] = covered
    return report


def _train(args) -> int:
    from nn_core.data import load_instructions
    from nn_core.io import check_output_dir
    from nn_core.train import SFTConfig
    from nn_core.train.fingerprint import FINGERPRINT_FILE
    from nn_ica.templates import Templates
    from nn_ica.train import masked_finetune

    # training resumes in its folder, so an unfinished run (fingerprint, no manifest yet)
    # is ours too; with --overwrite training writes into --out as it is
    check_output_dir(args.out or "ica-train", tool=_tool(args), overwrite=args.overwrite,
                     markers=(FINGERPRINT_FILE,))
    templates = Templates.load(args.templates)
    ids = parse_ids(args.components, templates)
    spec = args.model or templates.metadata.get("model_id")
    examples = load_instructions(args.data, format=args.format, limit=args.limit)
    cfg = SFTConfig(
        output_dir=args.out or "ica-train", method=args.method, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        extra_target_modules=tuple(args.lora_targets or ()), learning_rate=args.lr,
        weight_decay=args.weight_decay, num_train_epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16, seed=args.seed, save_steps=args.save_steps, logging_steps=args.logging_steps,
    ).check()
    if args.quantization and args.method != "qlora":
        raise NNError("--quantization needs --method qlora")
    from nn_core.model.loading import load_model

    model, tok = load_model(spec, device=args.device, dtype=args.dtype, seed=args.seed,
                            quantization=args.quantization)
    result = masked_finetune(model, tok, examples, templates, ids, cfg, mode=args.mode,
                             freeze_masked=args.freeze_masked, site=args.site, check_id=not args.ignore_model_id,
                             model_spec=spec, resume=not args.no_resume, tool=_tool(args))
    print(f"trained {result.global_step} steps ({args.method}, {args.mode} components {ids}); "
          f"loss {result.metrics.get('training_loss', float('nan')):.4f}")
    print(f"wrote {result.saved} and {result.output_dir / 'manifest.json'}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("nn-ica", "Functional networks of LLM neurons by PCA and FastICA: build "
                         "templates, lesion/preserve them, fine-tune with them masked.", EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("build", help="capture activations and build ICA templates",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("model_spec", metavar="MODEL", help="alias, local folder or hub id")
    b.add_argument("data", metavar="DATA", nargs="+", help="text datasets: pydoc, files, folders, hub names")
    g = b.add_argument_group("capture")
    g.add_argument("--site", choices=("mlp_act", "mlp_out"), default="mlp_act",
                   help="mlp_act: input of the down-projection (the masking point); mlp_out: its output")
    g.add_argument("--layers", default="all", help="all, a range 0-9 or a list 0,4,8")
    g.add_argument("--samples", type=int, default=64, help="texts drawn from the data")
    g.add_argument("--max-length", type=int, default=128, help="tokens per text")
    g.add_argument("--max-tokens", type=int, default=4096, help="tokens kept (rows of the matrix)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="documents of each dataset kept out for nn-ica eval")
    g = b.add_argument_group("decomposition")
    g.add_argument("--pca-components", type=int, default=50)
    g.add_argument("--components", type=int, default=10,
                   help="ICA components k (canica --layout per-layer: maps per layer)")
    g.add_argument("--method", choices=("fnsft", "canica"), default="canica",
                   help="canica: spatial ICA (neurons as samples), |z| > --z-threshold (Liu et al.); "
                        "fnsft: temporal ICA of all layers, top (100 - --percentile) %% per component")
    g.add_argument("--layout", choices=("per-layer", "concat"), default="per-layer",
                   help="canica: one ICA per layer (--components maps each) or all layers concatenated")
    g.add_argument("--z-threshold", type=float, default=3.6,
                   help="canica: keep neurons with |z| above this in a z-scored map")
    g.add_argument("--subsets", type=int, default=1,
                   help="canica: split the tokens into this many text subsets and union matched maps")
    g.add_argument("--percentile", type=float, default=98.0, help="fnsft: per-component |loading| threshold")
    g.add_argument("--backend", choices=("torch", "sklearn"), default="torch")
    g.add_argument("--max-iter", type=int, default=1000)
    g.add_argument("--tol", type=float, default=1e-4)
    add_common_args(b, model=False)
    b.set_defaults(func=_build)

    s = sub.add_parser("show", help="summarise a templates file (nn-ica or FunctionalNetworksSFT)")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_show)

    m = sub.add_parser("match", help="pair the components of two templates files by IoU (Hungarian)")
    m.add_argument("a", metavar="A")
    m.add_argument("b", metavar="B")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_match)

    def masked_args(p, *, ranking: bool = False):
        p.add_argument("--templates", required=True, metavar="FILE")
        if ranking:
            p.add_argument("--components", default="all", metavar="IDS",
                           help="all: rank every component by lesion effect vs random (one table), then "
                                "lesion their union; or ids 0 or 0,2,5 or 0-3 or largest (their union)")
        else:
            p.add_argument("--components", required=True, metavar="IDS",
                           help="component ids: 0 or 0,2,5 or 0-3 or largest (all: every component)")
        p.add_argument("--mode", choices=("lesion", "preserve"), default="lesion",
                       help="lesion: zero the components' channels; preserve: keep only them "
                            "(every layer of the site masked)")
        p.add_argument("--model", default=None, help="default: the model the templates name")
        p.add_argument("--site", default=None, help="check the templates are for this site")
        p.add_argument("--ignore-model-id", action="store_true",
                       help="accept templates recorded under another id of the same weights")

    e = sub.add_parser("eval", help="ΔPPL of lesioning/preserving components vs random controls",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    masked_args(e, ranking=True)
    e.add_argument("--preserve-fraction", type=float, default=None, metavar="F",
                   help="rank the components, then preserve the top-ranked union covering about F "
                        "of the channels (vs random sets of the same per-layer sizes)")
    e.add_argument("--data", nargs="+", default=None,
                   help="text datasets (their held-out split); default: those the templates were built on")
    e.add_argument("--heldout-fraction", type=float, default=None,
                   help="default: the fraction the templates were built with")
    e.add_argument("--samples", type=int, default=32, help="held-out texts scored")
    e.add_argument("--random", type=int, default=5, help="random control seeds")
    e.add_argument("--max-length", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=8)
    add_common_args(e, model=False)
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="fine-tune with components lesioned/preserved",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    masked_args(t)
    t.add_argument("--data", required=True, help="instruction data (alpaca, sharegpt, dolly, simple)")
    t.add_argument("--format", default="auto")
    t.add_argument("--limit", type=int, default=None, help="use the first N examples")
    t.add_argument("--method", choices=("lora", "qlora", "full"), default="lora",
                   help="full trains the down-projections only")
    t.add_argument("--quantization", choices=("4bit", "8bit"), default=None, help="with --method qlora")
    t.add_argument("--freeze-masked", action="store_true",
                   help="keep the down-projection weights of masked channels bit-identical "
                        "(preserve: outside the network; lesion: the network)")
    t.add_argument("--lora-r", type=int, default=8)
    t.add_argument("--lora-alpha", type=int, default=16)
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--lora-targets", nargs="*", default=None,
                   help="more LoRA target modules besides the down-projection (not channel-masked)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=-1)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=512)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on where supported")
    t.add_argument("--save-steps", type=int, default=200)
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT has checkpoints")
    add_common_args(t, model=False)
    t.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
