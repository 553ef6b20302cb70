"""``nn-cls``: the Hydra apps ``nn-cls train`` and ``nn-cls suite``.

    nn-cls train model=tiny_llama train=cpu_small train.method=naive out=runs/naive
    nn-cls train --cfg job                      # print the resolved config, run nothing
    nn-cls train -m train.method=full_cls,naive train.seed=0,1   # Hydra multirun sweep
    nn-cls suite suite.methods=[full_cls,naive,replay] suite.seeds=[0,1,2] out=runs/suite

Everything after the command is Hydra's command line (overrides ``key=value``, config group
options ``group=option``, ``--cfg job``, ``-m``, ``hydra.*``). Before Hydra runs, the
overrides are composed with Hydra's compose API and checked (every value of a ``-m`` sweep
too), so an unknown key, a wrong type, an unknown group option or a bad value prints one
line and exits 2 before any model is loaded; errors while running (:class:`NNError`, I/O)
also print one line and exit 2.

Output: ``out=`` (a folder nn-cls owns, checked by :func:`nn_core.io.check_output_dir`
before Hydra runs; under ``-m`` job ``n`` writes ``<out>/<n>``) or else Hydra's run dir
(``hydra.run.dir``, default ``outputs/<date>/<time>``; under ``-m`` the sweep's job dirs).
With ``out=`` and no explicit ``hydra.run.dir`` (``-m``: ``hydra.sweep.dir``), Hydra's run
dir is ``out`` itself (``-m``: its sweep dir is ``out``), so Hydra's ``.hydra/`` folder and
job log land in the output folder and nothing is written under the current directory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nn_core.errors import NNError
from nn_core.run.cli import error_line

__all__ = ["hydra_dir_overrides", "main", "validate_overrides"]

USAGE = """usage: nn-cls {train,suite} [key=value ...] [--cfg job] [-m]

commands:
  train   run one method over the task stream (Hydra app; see docs/nn-cls.md)
  suite   run suite.methods x suite.seeds and write suite_summary.csv, boundary_metrics.csv,
          task_matrix.csv and plots
"""

# Hydra flags that take a value (skipped when collecting overrides).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
_PREFIX = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~", "CHANGE": ""}


def _split(args: Sequence[str]) -> tuple[list[str], bool]:
    overrides, multirun, skip = [], False, False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in _VALUE_FLAGS:
            skip = True
        elif a.startswith("-"):
            continue
        else:
            overrides.append(a)
    return overrides, multirun


def _validation_sets(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Override lists to compose: the overrides themselves, or for a sweep its first point and
    every other value of each swept key (interval sweeps are checked in the jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from nn_cls.config import error_message

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # OverrideParseException and friends
        raise NNError(error_message(exc)) from None
    keep = [o for o in parsed if not o.is_hydra_override()]
    if not multirun or not any(o.is_sweep_override() for o in keep):
        return [[o.input_line for o in keep]]
    choices = []
    for o in keep:
        line = o.input_line
        if o.is_sweep_override():
            try:
                vals = list(o.sweep_string_iterator())
            except Exception:  # interval sweeps have no finite list of values
                vals = []
            head = f"{_PREFIX.get(o.type.name, '')}{o.get_key_element()}="
            choices.append([head + v for v in vals] or [None])
        else:
            choices.append([line])
    first = [c[0] for c in choices]
    sets = [first]
    for i, c in enumerate(choices):
        for v in c[1:]:
            sets.append([*first[:i], v, *first[i + 1:]])
    return [[x for x in s if x is not None] for s in sets]


def validate_overrides(command: str, args: Sequence[str]):
    """Compose and check ``command``'s config for the overrides in ``args`` (every point of
    a ``-m`` sweep's value lists); one :class:`NNError` line when any is bad. Returns the
    first composed config."""
    from nn_cls.config import compose, to_engine

    overrides, multirun = _split(args)
    first = None
    for ov in _validation_sets(overrides, multirun):
        cfg = compose(command, ov)
        first = cfg if first is None else first
        if command == "suite":
            for m in cfg.suite.methods:
                to_engine(cfg, method=m)
        else:
            to_engine(cfg)
    return first


def _quote(value: str) -> str:
    """A Hydra override value in single quotes (backslashes and quotes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hydra_only(folder) -> bool:
    """A sweep job folder holding nothing but Hydra's own files (``.hydra/``, ``*.log``)."""
    return all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir())


def hydra_dir_overrides(command: str, args: Sequence[str], cfg) -> list[str]:
    """The Hydra overrides that put Hydra's run dir at ``out`` (``-m``: its sweep dir), after
    checking ``out`` (one :class:`NNError` line) before Hydra creates anything; ``[]`` when
    ``out`` is unset, Hydra's dir is given explicitly, ``out`` is swept, or with ``--cfg``."""
    from pathlib import Path

    from nn_cls.engine import CHECKPOINT_NAME
    from nn_cls.tracking import METRICS_NAME
    from nn_core.io import check_output_dir

    overrides, multirun = _split(args)
    given = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    out = getattr(cfg, "out", None) if cfg is not None else None
    if not out or any(a in ("--cfg", "-c") for a in args) or (multirun and any(
            k == "out" and "," in o for k, o in zip(given, overrides, strict=True))):
        return []
    tool, markers = f"nn-cls {command}", (CHECKPOINT_NAME, METRICS_NAME)
    if not multirun:
        if "hydra.run.dir" in given:
            return []
        check_output_dir(out, tool=tool, overwrite=bool(cfg.overwrite), flag="out", markers=markers)
        return [f"hydra.run.dir={_quote(str(out))}"]
    if "hydra.sweep.dir" in given:
        return []
    root = Path(out).expanduser()
    if root.is_dir() and (root / "multirun.yaml").is_file() and not cfg.overwrite:
        for job in root.iterdir():  # a previous sweep: every job folder must be nn-cls's
            if job.name != "multirun.yaml" and not (job.is_dir() and _hydra_only(job)):
                check_output_dir(job, tool="nn-cls train" if command == "train" else tool,
                                 flag="out", markers=markers)
    else:
        check_output_dir(root, tool=tool, overwrite=bool(cfg.overwrite), flag="out", markers=markers)
    return [f"hydra.sweep.dir={_quote(str(out))}"]


def _job(command: str, checked: bool = False):
    def job(cfg) -> None:
        from pathlib import Path

        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from nn_cls.app import run_suite, run_train
        from nn_core.run.cli import run_cli

        hc = HydraConfig.get()
        out = cfg.out
        if out and hc.mode == RunMode.MULTIRUN:
            out = str(Path(out) / str(hc.job.num))
        fn = run_train if command == "train" else run_suite
        # checked: out was checked before Hydra wrote its .hydra/ there (hydra_dir_overrides)
        code = run_cli(lambda _: fn(cfg, out or hc.runtime.output_dir, owned=bool(out) and not checked)
                       and None, None,
                       prog=f"nn-cls {command}")
        if code:
            raise SystemExit(code)

    return job


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from nn_cls.config import PRIMARY, register

    if command not in PRIMARY:
        print(error_line("nn-cls", f"unknown command '{command}': use train or suite (nn-cls --help)"),
              file=sys.stderr)
        return 2
    helping = any(a in ("-h", "--help", "--hydra-help", "--info", "-i") for a in rest)
    extra: list[str] = []
    if not helping:
        try:
            extra = hydra_dir_overrides(command, rest, validate_overrides(command, rest))
        except NNError as exc:
            print(error_line(f"nn-cls {command}", str(exc)), file=sys.stderr)
            return 2
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    saved = sys.argv
    sys.argv = [f"nn-cls-{command}", *rest, *extra]
    try:
        hydra.main(version_base="1.3", config_path=None,
                   config_name=PRIMARY[command])(_job(command, checked=bool(extra)))()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
