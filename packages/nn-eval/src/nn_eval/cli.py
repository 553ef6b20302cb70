"""``nn-eval``: perplexity, multiple choice, exact match, the task suite, CL metrics.

Every command that computes something writes its JSON result and ``manifest.json`` into
``--out`` (a fresh ``runs/nn-eval/<timestamp>`` folder when not given).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nn_core.errors import NNError
from nn_core.run.cli import add_common_args, cli_main, make_parser

PROG = "nn-eval"

EPILOG = """examples:
  nn-eval ppl --model smollm2-135m --data pydoc --limit 20 --max-length 512 --out runs/ppl
  nn-eval ppl --model smollm2-135m --data pydoc --convention prefix --out runs/ppl-lm-eval
  nn-eval ppl --model smollm2-135m --data pydoc --neurons sel.json --mode lesion --out runs/lesion
  nn-eval mc --model smollm2-135m --data mmlu_sample.csv --out runs/mc
  nn-eval gen --model smollm2-135m --data task:add --limit 50 --out runs/add
  nn-eval tasks list
  nn-eval tasks export --out data/tasks --n-train 1000 --n-eval 100
  nn-eval cl-metrics acc.csv --baseline baseline.json --plot --out runs/cl
"""


# --------------------------------------------------------------------------- helpers
def _progress(label: str):
    """A batch counter on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: batch {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def _out_dir(args) -> Path:
    from nn_core.run.manifest import run_dir

    return Path(args.out) if args.out else run_dir(Path("runs") / "nn-eval")


def _load(args):
    from nn_core.device import seed_everything
    from nn_core.model.loading import load_model

    seed_everything(args.seed)
    return load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise NNError(f"--{name} must be at least 1, got {value}")


def _need_data(args, what: str) -> None:
    # --data is checked here, not by argparse, so that --config or NN_DATA can supply it.
    if not args.data:
        raise NNError(f"{args.command} needs --data {what} (or data: in --config, or NN_EVAL_DATA)")


def _note_clamp(args, used: int) -> None:
    if used < args.max_length:
        print(f"note: --max-length {args.max_length} is longer than the model's position table; "
              f"used {used}", file=sys.stderr)


def _finish(out: Path, name: str, result: dict, args, *, model=None, timer=None,
            extra_outputs: list[str] | None = None, write_extra=None) -> None:
    """Write ``name`` (and ``write_extra(folder)``'s files) with the manifest as one
    atomic folder: ``out`` appears complete, with its provenance, or not at all."""
    from nn_core.io import atomic_dir, atomic_write_json
    from nn_core.run.cli import args_config
    from nn_core.run.manifest import write_manifest

    tool = getattr(args, "_tool", None) or f"{PROG} {args.command}"
    with atomic_dir(out, tool=tool, overwrite=getattr(args, "overwrite", False)) as tmp:
        atomic_write_json(tmp / name, result)
        if write_extra is not None:
            write_extra(tmp)
        write_manifest(tmp, config=args_config(args), model=model,
                       model_spec=getattr(args, "model", None) if model is not None else None,
                       seeds=getattr(args, "seed", None), phases=timer,
                       outputs=[name, *(extra_outputs or [])], tool=tool)


# --------------------------------------------------------------------------- ppl
def cmd_ppl(args) -> int:
    from nn_core.data import load_texts, split_texts
    from nn_core.run.manifest import PhaseTimer
    from nn_eval.lm import evaluate_lm

    _positive("limit", args.limit)
    if args.heldout is not None and not 0.0 < args.heldout < 1.0:
        raise NNError(f"--heldout must be between 0 and 1, got {args.heldout}")
    if args.mode and not args.neurons:
        raise NNError("--mode needs --neurons FILE (the selection to mask)")
    ns = None
    if args.neurons:  # checked before the model is loaded
        from nn_core.select.neuronset import NeuronSet

        ns = NeuronSet.load(args.neurons)
    timer = PhaseTimer()
    with timer("data"):
        texts = load_texts(args.data, text_field=args.text_field)
        if args.heldout is not None:
            texts = split_texts(texts, args.heldout, args.seed)[1]
        if args.limit is not None:
            texts = texts[: args.limit]
    with timer("load"):
        model, tok = _load(args)
    intervention = None
    if ns is not None:
        from nn_core.intervene.masks import mask_neurons

        intervention = mask_neurons(model, ns, args.mode or "lesion")
    with timer("evaluate"):
        res = evaluate_lm(model, tok, texts, max_length=args.max_length, stride=args.stride,
                          batch_size=args.batch_size, intervention=intervention,
                          progress=_progress("ppl"), first_token=args.convention)
    _note_clamp(args, res["max_length"])
    out = _out_dir(args)
    result = {"model": args.model, "data": args.data, "n_texts": len(texts), **res}
    if args.neurons:
        result = {"neurons": str(args.neurons), "mode": args.mode or "lesion", **result}
    _finish(out, "ppl.json", result, args, model=model, timer=timer)
    if intervention is None:
        print(f"ppl {res['ppl']:.4f}  nll {res['nll']:.4f}  token_acc {res['token_acc']:.4f}  "
              f"({res['n_tokens']} tokens, {res['n_sequences']} sequences, {res['n_skipped']} skipped; "
              f"first token: {_first_token_note(res)})")
        if res.get("word_perplexity") is not None:
            print(f"word_perplexity {res['word_perplexity']:.4f}  byte_perplexity "
                  f"{res['byte_perplexity']:.4f}  bits_per_byte {res['bits_per_byte']:.4f}")
    else:
        b, i, d = res["baseline"], res["intervened"], res["delta"]
        print(f"baseline ppl {b['ppl']:.4f} -> {args.mode or 'lesion'} ppl {i['ppl']:.4f} "
              f"(delta {d['ppl']:+.4f}; nll {d['nll']:+.4f}; token_acc {d['token_acc']:+.4f})")
    print(f"wrote {out / 'ppl.json'}")
    return 0


def _first_token_note(res: dict) -> str:
    if res["first_token"] == "prefix":
        return f"scored after prefix token {res['prefix_token_id']} (lm-eval convention)"
    return "skipped (unscored)"


# --------------------------------------------------------------------------- mc
def cmd_mc(args) -> int:
    from nn_core.run.manifest import PhaseTimer
    from nn_eval.multiple_choice import load_mc, score_multiple_choice

    _need_data(args, "FILE")
    _positive("limit", args.limit)
    timer = PhaseTimer()
    with timer("data"):
        items = load_mc(args.data, style=args.style, limit=args.limit)
    with timer("load"):
        model, tok = _load(args)
    with timer("evaluate"):
        res = score_multiple_choice(model, tok, items, batch_size=args.batch_size,
                                    max_length=args.max_length, progress=_progress("mc"))
    _note_clamp(args, res["max_length"])
    out = _out_dir(args)
    _finish(out, "mc.json", {"model": args.model, "data": args.data, "style": args.style, **res},
            args, model=model, timer=timer)
    print(f"acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}  ({res['n']} items)")
    print(f"wrote {out / 'mc.json'}")
    return 0


# --------------------------------------------------------------------------- gen
def _gen_examples(spec: str, limit: int | None, seed: int):
    if spec.startswith("task:"):
        from nn_eval.tasks import make_split

        split = make_split(spec.removeprefix("task:"), 0, limit or 100, seed)
        return split["eval"]
    from nn_core.data import load_instructions

    return load_instructions(spec, limit=limit)


def cmd_gen(args) -> int:
    from nn_core.run.manifest import PhaseTimer
    from nn_eval.generation import exact_match

    _need_data(args, "FILE|task:NAME")
    _positive("limit", args.limit)
    norm = [s.strip() for s in args.normalize.split(",") if s.strip()]
    timer = PhaseTimer()
    with timer("data"):
        examples = _gen_examples(args.data, args.limit, args.seed)
    with timer("load"):
        model, tok = _load(args)
    with timer("generate"):
        res = exact_match(model, tok, examples, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, stop=args.stop or (),
                          normalize_with=norm, chat_template=not args.no_chat_template,
                          progress=_progress("gen"))
    out = _out_dir(args)
    _finish(out, "gen.json", {"model": args.model, "data": args.data, "normalize": norm, **res},
            args, model=model, timer=timer)
    print(f"exact match {res['accuracy']:.4f}  ({res['n_correct']}/{res['n']})")
    print(f"wrote {out / 'gen.json'}")
    return 0


# --------------------------------------------------------------------------- tasks
def cmd_tasks_list(args) -> int:
    from nn_eval.tasks import TASKS

    width = max(len(n) for n in TASKS)
    for name, task in TASKS.items():
        print(f"{name:<{width}}  {task.description}")
    return 0


def cmd_tasks_export(args) -> int:
    from nn_eval.tasks import TASKS, export_tasks

    if not args.out:
        raise NNError("tasks export needs --out DIR (where to write the JSONL files)")
    if args.n_train < 0 or args.n_eval < 1:
        raise NNError("--n-train must be 0 or more and --n-eval at least 1")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    out = Path(args.out)
    from nn_core.io import atomic_dir
    from nn_core.run.cli import args_config
    from nn_core.run.manifest import write_manifest

    tool = getattr(args, "_tool", None) or f"{PROG} tasks export"
    with atomic_dir(out, tool=tool, overwrite=args.overwrite) as tmp:
        paths = export_tasks(tmp, names, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
        write_manifest(tmp, config=args_config(args), seeds=args.seed, tool=tool,
                       outputs=[p.relative_to(tmp).as_posix() for p in paths])
    print(f"wrote {len(paths)} files for {len(names)} tasks under {out}")
    return 0


# --------------------------------------------------------------------------- cl-metrics
def cmd_cl_metrics(args) -> int:
    from nn_eval.continual import cl_metrics, load_baseline, load_matrix, plot_matrix

    acc, tasks = load_matrix(args.matrix)
    loss = counts = baseline = None
    if args.loss:
        loss, loss_tasks = load_matrix(args.loss)
        if loss_tasks != tasks:
            raise NNError(f"the loss matrix names tasks {loss_tasks}, the accuracy matrix {tasks}")
    if args.counts:
        counts, count_tasks = load_matrix(args.counts)
        if count_tasks != tasks:
            raise NNError(f"the count matrix names tasks {count_tasks}, the accuracy matrix {tasks}")
    if args.baseline:
        baseline = load_baseline(args.baseline, tasks)
    res = cl_metrics(acc, loss, baseline=baseline, counts=counts, tasks=tasks)
    out = _out_dir(args)
    extra = ["accuracy.png"] if args.plot else []
    _finish(out, "cl_metrics.json", {"matrix": str(args.matrix), **res}, args, extra_outputs=extra,
            write_extra=(lambda tmp: plot_matrix(tmp / "accuracy.png", acc, tasks)) if args.plot else None)

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"AA {fmt(res['AA'])}  BWT {fmt(res['BWT'])}  FWT {fmt(res['FWT'])}  "
          f"forgetting {fmt(res['final_forgetting'])}  seen_acc_auc {fmt(res['seen_acc_auc'])}")
    if res["FWT_unavailable"]:
        print(f"FWT unavailable: {res['FWT_unavailable']}")
    if res["seen_acc_auc_unavailable"]:
        print(f"seen_acc_auc unavailable: {res['seen_acc_auc_unavailable']}")
    print(f"wrote {out / 'cl_metrics.json'}" + (f" and {out / 'accuracy.png'}" if args.plot else ""))
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Evaluate language models: perplexity, multiple choice, exact "
                               "match, continual-learning metrics and a synthetic task suite.",
                         EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ppl", help="perplexity, NLL and token accuracy on a text corpus",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Perplexity on texts (pydoc, a local file or folder, a hub "
                                   "dataset); with --neurons, also with those neurons masked.")
    p.add_argument("--data", default="pydoc", help="text source (default: %(default)s)")
    p.add_argument("--text-field", default=None, help="record field holding the text")
    p.add_argument("--limit", type=int, default=None, help="use the first N texts")
    p.add_argument("--heldout", type=float, default=None, metavar="FRACTION",
                   help="evaluate only the held-out split of this fraction (split by --seed)")
    p.add_argument("--max-length", type=int, default=1024, help="window length in tokens (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window after the first (default: max-length // 2)")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    # not --first-token: the run manifest redacts flags whose name has the word "token"
    p.add_argument("--convention", choices=("skip", "prefix"), default="skip",
                   help="first token of each text: skip = left unscored (default); prefix = "
                        "scored after the tokenizer's BOS, else EOS, as lm-evaluation-harness "
                        "does (recorded as first_token in ppl.json)")
    p.add_argument("--neurons", default=None, metavar="FILE", help="NeuronSet JSON to mask")
    p.add_argument("--mode", choices=("lesion", "preserve"), default=None,
                   help="mask mode for --neurons (default: lesion)")
    add_common_args(p)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("mc", help="multiple choice by log-likelihood (acc, acc_norm)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="JSONL/JSON/CSV with question, choices or A-D, answer (required)")
    p.add_argument("--style", choices=("auto", "plain", "mmlu"), default="auto",
                   help="prompt layout (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="score the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--max-length", type=int, default=2048, help="default: %(default)s")
    add_common_args(p)
    p.set_defaults(func=cmd_mc)

    p = sub.add_parser("gen", help="greedy generation scored by exact match")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="instruction file (alpaca/sharegpt/dolly/simple) or task:NAME (required)")
    p.add_argument("--limit", type=int, default=None, help="score the first N examples")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable)")
    p.add_argument("--normalize", default="strip,collapse_whitespace",
                   help="comma list of strip, lowercase, strip_punctuation, collapse_whitespace "
                        "(default: %(default)s)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="use the raw prompt instead of the model's chat template")
    add_common_args(p)
    p.set_defaults(func=cmd_gen)

    p = sub.add_parser("tasks", help="the synthetic instruction task suite")
    tsub = p.add_subparsers(dest="tasks_command", metavar="ACTION")
    t = tsub.add_parser("list", help="list the tasks")
    t.set_defaults(func=cmd_tasks_list)
    t = tsub.add_parser("export", help="write DIR/<task>/{train,eval}.jsonl")
    t.add_argument("--tasks", default=None, help="comma list of tasks (default: all)")
    t.add_argument("--n-train", type=int, default=1000, help="default: %(default)s")
    t.add_argument("--n-eval", type=int, default=100, help="default: %(default)s")
    add_common_args(t, model=False, device=False, dtype=False)
    t.set_defaults(func=cmd_tasks_export)

    p = sub.add_parser("cl-metrics", help="continual-learning metrics of an accuracy matrix")
    p.add_argument("matrix", metavar="MATRIX", help="accuracy matrix A[i][j] (.csv or .json)")
    p.add_argument("--loss", default=None, metavar="FILE", help="loss matrix L[i][j]")
    p.add_argument("--counts", default=None, metavar="FILE",
                   help="evaluation-token counts per entry (0 = not measurable)")
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help="single-task accuracy per task, for FWT (.json or .csv)")
    p.add_argument("--plot", action="store_true", help="also write accuracy.png")
    add_common_args(p, model=False, device=False, dtype=False)
    p.set_defaults(func=cmd_cl_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
