"""``nn-kva-loki``: LoKI (low-damage knowledge implanting) on nn.

    nn-kva-loki analyse [MODEL] [DATA] [--method M] [--steps N] [--engine fast|captum]
                [--target argmax|gold] [--write-mode w|a] [--resume] [--out DIR]
    nn-kva-loki select KVA.h5 --quota Q [--strategy layer-balanced|global]
                [--score signed|abs] [--plot] [--out DIR]
    nn-kva-loki create MODEL POSITIONS [--out DIR]
    nn-kva-loki restore LOKI_DIR [--out DIR]
    nn-kva-loki train MODEL_OR_LOKI_DIR DATA [--positions P] [--merge] [--out DIR]
    nn-kva-loki eval RUN [--lora train|none] [--out DIR]

Bad input exits 2 with one line on stderr; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nn_core.errors import NNError
from nn_core.run.cli import args_config, cli_main, make_parser

PROG = "nn-kva-loki"

EPILOG = """examples:
  nn-kva-loki analyse smollm2-135m mmlu.jsonl --out runs/kva   # KVA -> runs/kva/kva.h5
  nn-kva-loki select runs/kva.h5 --quota 10                # the paper's layer-balanced 10 %
  nn-kva-loki select runs/kva.h5 --quota 5 --score abs --plot --out runs/sel-5
  nn-kva-loki create smollm2-135m runs/sel-5 --out runs/loki-5   # positions from select
  nn-kva-loki train runs/loki-5 task:reverse_words --max-steps 200 --merge --out runs/loki-train
  nn-kva-loki eval runs/loki-train --out runs/loki-eval            # base vs LoKI vs same-budget LoRA
"""


def _quota(text: str) -> float:
    from nn_kva_loki.select import check_quota

    try:
        return check_quota(text)
    except NNError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def default_out(kva: str, strategy: str, score: str, quota: float) -> Path:
    """``<folder of KVA>/<KVA stem>-select-<strategy>-<score>-q<quota>``."""
    p = Path(kva)
    return p.with_name(f"{p.stem}-select-{strategy}-{score}-q{quota:g}")


# --------------------------------------------------------------------------- commands
def _select(args) -> int:
    from nn_core.io import atomic_dir, check_output_dir
    from nn_core.run.manifest import write_manifest
    from nn_kva_loki.select import select_channels

    tool = f"{PROG} select"
    out = Path(args.out) if args.out else default_out(args.kva, args.strategy, args.score, args.quota)
    check_output_dir(out, tool=tool, overwrite=args.overwrite)  # before any work
    t0 = time.perf_counter()
    sel = select_channels(args.kva, args.quota, strategy=args.strategy, score=args.score,
                          chunk_size=args.chunk_size, allow_incomplete=args.allow_incomplete)
    select_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    # selection, positions and manifest land together in one rename
    with atomic_dir(out, tool=tool, overwrite=args.overwrite) as tmp:
        paths = sel.save(tmp, plot=args.plot)
        write_manifest(tmp, config=args_config(args), tool=tool,
                       phases={"select": select_s, "write": time.perf_counter() - t1},
                       extra={"kva": str(args.kva), "num_samples": sel.num_samples, "k": sel.k,
                              "selected": len(sel.neuronset), "parameters": sel.parameters})
    print(sel.summary())
    for name in ("neurons", "positions", "plot"):
        if name in paths:
            print(f"wrote {out / Path(paths[name]).name}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "LoKI: find the MLP down-projection output channels that matter "
                         "least for what a model knows (knowledge-value attribution) and train only "
                         "those.", EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("select", help="choose the trainable channels from a KVA file (LoKI positions)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("kva", metavar="KVA.h5", help="a KVA file written by nn-kva-loki analyse")
    s.add_argument("--quota", type=_quota, required=True, metavar="Q",
                   help="percent of all down-projection output channels to train, in (0, 100]")
    s.add_argument("--strategy", choices=("layer-balanced", "global"), default="layer-balanced",
                   help="layer-balanced: round(Q%% of hidden) channels in every layer, the most often "
                        "lowest-scored across samples (the paper's); global: the Q%% lowest mean "
                        "normalised scores over all layers")
    s.add_argument("--score", choices=("signed", "abs"), default="signed",
                   help="signed: the attribution itself (the paper's code; prefers negative "
                        "contributions); abs: its magnitude (prefers channels that hardly matter)")
    s.add_argument("--plot", action="store_true", help="also write frequencies.png (layers x channels)")
    s.add_argument("--chunk-size", type=_positive_int, default=64, metavar="N",
                   help="samples read at a time (memory ~ N x layers x hidden x 8 bytes)")
    s.add_argument("--allow-incomplete", action="store_true",
                   help="select from an interrupted KVA file's complete samples")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: next to KVA.h5, named after it and the settings)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is not a previous output of this command")
    s.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file of option values; flags win over it, it wins over NN_* variables")
    s.set_defaults(func=_select)
    from nn_kva_loki.cli_analyse import add_analyse_command
    from nn_kva_loki.cli_loki import add_loki_commands

    add_analyse_command(sub)
    add_loki_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
