"""``nn-drift``: safety-critical weights/neurons and their drift under fine-tuning.

    nn-drift score MODEL [--safety DATA] [--utility DATA] [--metrics snip,wanda]
                [--store top|full] [--top-percent P] [--out DIR]
    nn-drift groups SCORES --method snip-top|set-diff|utility-top|random [...] [--out DIR]
    nn-drift finetune MODEL [DATA] --groups G... [--track-every N] [--freeze-group G] [--out DIR]
    nn-drift analyze RUN_DIR [--baseline random] [--steps S,...] [--behaviour] [--out DIR]
    nn-drift run [MODEL] [--no-align] [--align-steps N] [--finetune-steps N] [--out DIR]

Bad input exits 2 with one line on stderr; outputs are written atomically.
"""

from __future__ import annotations

import argparse

from nn_core.run.cli import cli_main, make_parser

PROG = "nn-drift"

EPILOG = """examples:
  nn-drift score smollm2-135m --safety safety --utility utility --out runs/scores
  nn-drift groups runs/scores --method set-diff --p 10 --q 10 --out runs/g-setdiff
  nn-drift finetune smollm2-135m utility --groups runs/g-setdiff --max-steps 200 --out runs/ft
"""


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Find the weights and neurons that matter for safety but not for "
                         "utility, and measure how far they drift under fine-tuning.", EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from nn_drift.cli_analyze import add_analyze_command
    from nn_drift.cli_finetune import add_finetune_command
    from nn_drift.cli_groups import add_groups_command
    from nn_drift.cli_run import add_run_command
    from nn_drift.cli_score import add_score_command

    add_score_command(sub)
    add_groups_command(sub)
    add_finetune_command(sub)
    add_analyze_command(sub)
    add_run_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
