"""The LoKI model commands of ``nn-kva-loki``: create, restore, train, eval.

    nn-kva-loki create MODEL POSITIONS [--out DIR]
    nn-kva-loki restore LOKI_DIR [--out DIR]
    nn-kva-loki train MODEL_OR_LOKI_DIR DATA [--positions P] [--merge] [SFT flags] [--out DIR]
    nn-kva-loki eval RUN [--base MODEL] [--lora train|none] [--out DIR]

Registered on the main parser by :func:`add_loki_commands`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nn_core.errors import NNError
from nn_core.run.cli import add_common_args, args_config

EPILOG = """  nn-kva-loki create smollm2-135m runs/sel-5 --out runs/loki-5        # positions from select
  nn-kva-loki train runs/loki-5 task:reverse_words --max-steps 200 --merge --out runs/loki-train
  nn-kva-loki eval runs/loki-train --out runs/loki-eval                  # base vs LoKI vs LoRA
  nn-kva-loki restore runs/loki-train/model --out runs/plain
"""


# files only `train` writes into its --out before the manifest exists (an interrupted run's
# fingerprint): such a folder may be resumed (nn_core.train.FINGERPRINT_FILE; not imported
# here so that --help stays light)
TRAIN_OUT_MARKERS = ("run_fingerprint.json",)


def _tool(args, name: str) -> str:
    return getattr(args, "_tool", None) or f"nn-kva-loki {name}"


def _name(spec: str) -> str:
    return Path(spec.rstrip("/")).name or "model"


# --------------------------------------------------------------------------- create
def _create(args) -> int:
    from nn_core.io import check_output_dir
    from nn_core.model.loading import load_model
    from nn_kva_loki.loki import active_parameters, create_loki, precheck_positions, save_loki

    tool = _tool(args, "create")
    out = check_output_dir(args.out or f"{_name(args.model_spec)}-loki", tool=tool, overwrite=args.overwrite)
    precheck_positions(args.positions)  # before the model loads
    t0 = time.perf_counter()
    model, tok = load_model(args.model_spec, device=args.device, dtype=args.dtype, seed=args.seed)
    create_loki(model, args.positions)
    save_loki(model, out, tok, tool=tool, overwrite=args.overwrite, model_spec=args.model_spec,
              manifest={**args_config(args), "seconds": time.perf_counter() - t0})
    n, total = active_parameters(model), sum(p.numel() for p in model.parameters())
    print(f"LoKI model: {n} trainable parameters ({100 * n / max(total, 1):.3f} % of {total})")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- restore
def _restore(args) -> int:
    from nn_core.io import atomic_dir, check_output_dir
    from nn_core.run.manifest import write_manifest
    from nn_kva_loki.loki import load_loki, restore, write_hf_folder

    tool = _tool(args, "restore")
    out = check_output_dir(args.out or f"{str(args.loki_dir).rstrip('/')}-restored", tool=tool,
                           overwrite=args.overwrite)
    model, tok = load_loki(args.loki_dir, device=args.device, dtype=args.dtype)
    restore(model)
    with atomic_dir(out, tool=tool, overwrite=args.overwrite) as tmp:
        write_hf_folder(model, tmp, tok)
        write_manifest(tmp, config=args_config(args), model=model, model_spec=str(args.loki_dir), tool=tool)
    print(f"wrote the plain model {out}")
    return 0


# --------------------------------------------------------------------------- train
def _load_for_training(args):
    """(model, tokenizer, base spec): a LoKI folder as it is, or MODEL made LoKI by --positions."""
    from nn_core.io import read_json
    from nn_core.model.loading import load_model
    from nn_kva_loki.loki import (
        LOKI_FORMAT,
        create_loki,
        load_loki,
        loki_positions,
        resolve_positions,
    )

    spec = args.model_spec
    cfg = Path(spec) / "config.json"
    is_loki_dir = cfg.is_file() and (read_json(cfg, what="model config") or {}).get("loki_format") == LOKI_FORMAT
    if is_loki_dir:
        model, tok = load_loki(spec, device=args.device, dtype=args.dtype)
        if args.positions is not None and resolve_positions(model, args.positions) != loki_positions(model):
            raise NNError(f"--positions differ from the positions recorded in {spec}: drop --positions, or "
                          "pass the plain model")
        return model, tok
    if args.positions is None:
        raise NNError(f"{spec} is not a LoKI folder: pass --positions (positions.json from nn-kva-loki "
                      "select) to make it one")
    model, tok = load_model(spec, device=args.device, dtype=args.dtype, seed=args.seed)
    create_loki(model, args.positions)
    return model, tok


def _sft_config(args, output_dir: str):
    from nn_core.train import SFTConfig

    return SFTConfig(
        output_dir=output_dir, method="full", learning_rate=args.lr, weight_decay=args.weight_decay,
        num_train_epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, seed=args.seed,
        save_steps=args.save_steps, logging_steps=args.logging_steps, warmup_steps=args.warmup_steps,
    ).check()


def _data_settings(args) -> dict:
    return {"spec": args.data, "format": args.format, "limit": args.limit, "n_train": args.n_train,
            "n_eval": args.n_eval, "heldout_fraction": args.heldout_fraction, "seed": args.seed}


def _train(args) -> int:
    from nn_core.io import check_output_dir
    from nn_core.train.fingerprint import FINGERPRINT_FILE
    from nn_kva_loki.train import load_task_data, train_loki

    out = check_output_dir(args.out or "loki-train", tool=_tool(args, "train"), overwrite=args.overwrite,
                           markers=(FINGERPRINT_FILE,))
    cfg = _sft_config(args, str(out))
    data = _data_settings(args)
    if args.positions is not None:
        from nn_kva_loki.loki import precheck_positions

        precheck_positions(args.positions)  # before the data and the model load
    train_examples, heldout = load_task_data(
        args.data, format=args.format, limit=args.limit, n_train=args.n_train, n_eval=args.n_eval,
        heldout_fraction=args.heldout_fraction, seed=args.seed)
    model, tok = _load_for_training(args)
    base = args.model_spec  # a LoKI folder before training holds the base weights
    result = train_loki(model, tok, train_examples, cfg, merge=args.merge, model_spec=args.model_spec,
                        resume=not args.no_resume, tool=_tool(args, "train"),
                        manifest_extra={"base_model": base, "data": data, "n_heldout": len(heldout)})
    loss = result.metrics.get("training_loss", float("nan"))
    print(f"trained {result.global_step} steps on {len(train_examples)} examples (LoKI rows only); loss {loss:.4f}")
    print(f"wrote {result.saved}" + (f" and {Path(out) / 'merged'}" if args.merge else ""))
    return 0


# --------------------------------------------------------------------------- eval
def _eval(args) -> int:
    from nn_core.intervene.surgery import split_modules
    from nn_core.io import atomic_dir, check_output_dir, read_json
    from nn_core.model.loading import load_model
    from nn_core.run.manifest import write_manifest
    from nn_core.train import SFTConfig
    from nn_kva_loki.evaluate import (
        EvalSettings,
        delta_table,
        format_table,
        general_texts,
        model_metrics,
        train_lora_control,
    )
    from nn_kva_loki.loki import active_parameters, load_loki, restore
    from nn_kva_loki.train import load_task_data

    tool = _tool(args, "eval")
    run = Path(args.run)
    out = check_output_dir(args.out or f"{str(run).rstrip('/')}-eval", tool=tool, overwrite=args.overwrite)
    man = read_json(run / "manifest.json", what="LoKI training manifest",
                    fix="pass the --out folder of nn-kva-loki train")
    extra = man.get("extra") or {}
    if "loki" not in extra or not (run / "model" / "config.json").is_file():
        raise NNError(f"'{run}' is not the output of nn-kva-loki train (no LoKI model/ and manifest): "
                      "pass the --out folder of a finished training run")
    data = dict(extra.get("data") or {})
    if args.data is not None:
        data["spec"] = args.data
    base_spec = args.base or extra.get("base_model")
    settings = EvalSettings(general=args.general, general_heldout_fraction=args.general_heldout_fraction,
                            general_samples=args.general_samples, max_length=args.eval_max_length,
                            batch_size=args.eval_batch_size, exact_match=not args.no_exact_match,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    train_examples, heldout = load_task_data(
        data["spec"], format=data.get("format", "auto"), limit=data.get("limit"),
        n_train=data.get("n_train", 256), n_eval=data.get("n_eval", 32),
        heldout_fraction=data.get("heldout_fraction", 0.1), seed=data.get("seed", 0))
    if not heldout:
        raise NNError("the training run kept no held-out task examples: train with --n-eval > 0 and "
                      "--heldout-fraction > 0, or pass a task:NAME data set")
    texts = general_texts(settings)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    base, tok = load_model(base_spec, device=args.device, dtype=args.dtype, seed=args.seed)
    if split_modules(base):  # the run started from a LoKI folder: its weights are the base's
        restore(base)
    rows["base"] = {"trainable_parameters": None, **model_metrics(base, tok, heldout, texts, settings)}
    loki, ltok = load_loki(run / "model", device=args.device, dtype=args.dtype)
    budget = active_parameters(loki)
    rows["loki"] = {"trainable_parameters": budget, **model_metrics(loki, ltok, heldout, texts, settings)}
    del loki
    lora_info = None
    with atomic_dir(out, tool=tool, overwrite=args.overwrite) as tmp:
        if args.lora == "train":
            known = set(SFTConfig.__dataclass_fields__)
            cfg = SFTConfig(**{k: v for k, v in (man.get("config") or {}).items() if k in known})
            result, rank, counted = train_lora_control(base, tok, train_examples, cfg, budget,
                                                       output_dir=str(Path(tmp) / "lora"), model_spec=base_spec,
                                                       resume=False)
            lora_info = {"rank": rank, "lora_parameters": counted, "loki_parameters": budget}
            rows["lora"] = {"trainable_parameters": counted,
                            **model_metrics(result.model, tok, heldout, texts, settings)}
        delta_table(rows)
        table = format_table(rows)
        (Path(tmp) / "table.txt").write_text(table + "\n", encoding="utf-8")
        (Path(tmp) / "results.json").write_text(json.dumps({"rows": rows, "lora": lora_info,
                                                            "settings": settings.__dict__}, indent=2) + "\n")
        write_manifest(tmp, config=args_config(args), model_spec=base_spec, tool=tool,
                       phases={"eval": time.perf_counter() - t0}, extra={"rows": rows, "lora": lora_info})
    print(table)
    if lora_info:
        print(f"LoRA rank {lora_info['rank']}: {lora_info['lora_parameters']} trainable parameters vs LoKI "
              f"{budget}")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- parser
def _sft_args(t: argparse.ArgumentParser) -> None:
    g = t.add_argument_group("training")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-length", type=int, default=512)
    g.add_argument("--warmup-steps", type=float, default=0)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on where supported")
    g.add_argument("--save-steps", type=int, default=200)
    g.add_argument("--logging-steps", type=int, default=10)
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT has checkpoints")


def add_loki_commands(sub) -> None:
    """Add create, restore, train and eval to the ``nn-kva-loki`` subparsers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = sub.add_parser("create", help="make a LoKI model: only the selected down-projection rows train",
                       formatter_class=fmt)
    c.add_argument("model_spec", metavar="MODEL", help="alias, local folder or hub id")
    c.add_argument("positions", metavar="POSITIONS",
                   help="LoKI positions: positions.json (or the folder) from nn-kva-loki select, a NeuronSet "
                        "JSON of mlp_out channels, or a LoKI config with target_pos")
    add_common_args(c, model=False)
    c.set_defaults(func=_create)

    r = sub.add_parser("restore", help="merge a LoKI model back into a plain HF model", formatter_class=fmt)
    r.add_argument("loki_dir", metavar="LOKI_DIR", help="a LoKI folder (create, or train's model/)")
    add_common_args(r, model=False, seed=False)
    r.set_defaults(func=_restore)

    t = sub.add_parser("train", help="train only the LoKI rows on instruction data (nn_core.train)",
                       formatter_class=fmt)
    t.add_argument("model_spec", metavar="MODEL_OR_LOKI_DIR", help="a LoKI folder, or a model with --positions")
    t.add_argument("data", metavar="DATA",
                   help="instruction data (Alpaca/ShareGPT/Dolly/simple JSON, JSONL, CSV, Parquet) or "
                        "task:NAME (nn-eval's synthetic tasks, e.g. task:reverse_words)")
    t.add_argument("--positions", default=None, metavar="P", help="LoKI positions (needed for a plain MODEL)")
    t.add_argument("--merge", action="store_true", help="also write the restored plain model to OUT/merged")
    g = t.add_argument_group("data")
    g.add_argument("--format", default="auto", help="instruction format: auto, alpaca, sharegpt, dolly, simple")
    g.add_argument("--limit", type=int, default=None, help="use the first N records of a file")
    g.add_argument("--n-train", type=int, default=256, help="task:NAME training examples")
    g.add_argument("--n-eval", type=int, default=32, help="held-out task examples (at most, for files)")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="fraction of a data file kept out of training for eval")
    _sft_args(t)
    add_common_args(t, model=False, defaults={"out": "loki-train"})
    t.set_defaults(func=_train, _out_markers=TRAIN_OUT_MARKERS)

    e = sub.add_parser("eval", help="base vs LoKI vs same-budget LoRA: task loss/accuracy, general ΔPPL",
                       formatter_class=fmt)
    e.add_argument("run", metavar="RUN", help="the --out folder of nn-kva-loki train")
    e.add_argument("--base", default=None, metavar="MODEL", help="base model (default: the run's)")
    e.add_argument("--data", default=None, help="task data (default: the run's, same held-out split)")
    e.add_argument("--lora", choices=("train", "none"), default="train",
                   help="train: a LoRA control on the down-projections with the same trainable budget and "
                        "the run's SFT settings")
    e.add_argument("--general", default="pydoc", help="general text corpus for ΔPPL")
    e.add_argument("--general-heldout-fraction", type=float, default=0.1)
    e.add_argument("--general-samples", type=int, default=32, help="held-out documents scored")
    e.add_argument("--eval-max-length", type=int, default=256)
    e.add_argument("--eval-batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens for exact match")
    e.add_argument("--no-exact-match", action="store_true", help="skip generation (loss only)")
    add_common_args(e, model=False)
    e.set_defaults(func=_eval)
