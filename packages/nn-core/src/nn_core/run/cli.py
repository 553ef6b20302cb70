"""Shared CLI plumbing for every nn-* command.

* :func:`make_parser` and :func:`add_common_args` give every tool the same look and the
  same common flags: ``--model``, ``--device``, ``--dtype``, ``--seed``, ``--out``,
  ``--config FILE.yaml``.
* :func:`parse_args` parses and then resolves each option by precedence
  **flags > config file > environment > defaults**. The environment variable of an
  option is ``NN_`` + its name in upper case (``NN_MODEL``, ``NN_SEED``, ``NN_OUT``, ...);
  ``NN_CONFIG`` names a config file. Config keys are option names in kebab or snake
  case; an unknown key is an error that lists the valid ones.
* :func:`run_cli` runs a command function and turns an :class:`NNError` (or a missing
  file, or Ctrl-C) into one line ``<prog>: error: ...`` on stderr and an exit code,
  never a traceback. :func:`cli_main` does all of it for a parser with subcommands.

A command module then reads::

    def main(argv=None) -> int:
        parser = make_parser("nn-x", "What nn-x does.", "example: nn-x run --model tiny-llama")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        run = sub.add_parser("run", help="...")
        add_common_args(run)
        run.set_defaults(func=_run)
        return cli_main(parser, argv)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nn_core.errors import NNError

ENV_PREFIX = "NN_"
EXIT_USAGE = 2  # bad input: argparse's own convention
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention for Ctrl-C

# dest -> (flag, default, type, metavar, help)
COMMON_ARGS: dict[str, tuple] = {
    "model": ("--model", "smollm2-135m", str, "MODEL",
              "alias (smollm2-135m, tiny-llama, ...), local folder or hub id (default: %(default)s)"),
    "device": ("--device", "auto", str, "DEVICE",
               "auto, cpu, cuda, cuda:1 or mps (default: %(default)s: cuda > mps > cpu)"),
    "dtype": ("--dtype", "auto", str, "DTYPE",
              "auto, float32, bfloat16 or float16 (default: %(default)s: fp32 on CPU)"),
    "seed": ("--seed", 0, int, "N", "random seed (default: %(default)s)"),
    "out": ("--out", None, str, "DIR", "output folder (default: %(default)s)"),
}

_INTERNAL = {"help", "config", "func"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def make_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser that keeps the description's and epilog's line breaks."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(parser: argparse.ArgumentParser, *, model: bool = True, device: bool = True,
                    dtype: bool = True, seed: bool = True, out: bool = True, config: bool = True,
                    defaults: dict | None = None) -> argparse.ArgumentParser:
    """Add the common flags (each can be switched off); ``defaults`` overrides built-in
    defaults, e.g. ``defaults={"out": "runs/demo"}``."""
    wanted = {"model": model, "device": device, "dtype": dtype, "seed": seed, "out": out}
    defaults = dict(defaults or {})
    unknown = set(defaults) - set(COMMON_ARGS)
    if unknown:
        raise ValueError(f"no common argument named {sorted(unknown)}")
    group = parser.add_argument_group("common options")
    for dest, (flag, default, typ, metavar, help_) in COMMON_ARGS.items():
        if wanted[dest]:
            group.add_argument(flag, dest=dest, default=defaults.get(dest, default), type=typ,
                               metavar=metavar, help=help_)
    if config:
        group.add_argument("--config", metavar="FILE.yaml", default=None,
                           help="YAML file of option values (keys like the flags: model, "
                                "max-tokens or max_tokens); flags given here win over it, it "
                                f"wins over {ENV_PREFIX}* environment variables")
    return parser


# ------------------------------------------------------------------ resolution
def _actions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[argparse.Action]:
    """The actions of ``parser`` and of the subcommand chain ``args`` selected."""
    out: list[argparse.Action] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None) if action.dest != argparse.SUPPRESS else None
            if chosen in action.choices:
                out.extend(_actions(action.choices[chosen], args))
            elif action.dest == argparse.SUPPRESS:
                # the subcommand is not recorded: every subparser's options are candidates
                for sub in action.choices.values():
                    out.extend(_actions(sub, args))
        else:
            out.append(action)
    return out


def _options(parser, args) -> dict[str, argparse.Action]:
    opts = {}
    for action in _actions(parser, args):
        if action.dest in _INTERNAL or action.dest == argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        opts.setdefault(action.dest, action)
    return opts


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Dests the user actually gave on the command line: parse again with every default
    suppressed, so only given options appear in the namespace."""
    saved: list[tuple[object, str, object]] = []

    def suppress(p: argparse.ArgumentParser) -> None:
        saved.append((p, "_defaults", p._defaults))
        p._defaults = {}
        for action in p._actions:
            saved.append((action, "default", action.default))
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)

    try:
        suppress(parser)
        given = vars(parser.parse_args(list(argv)))
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
    return set(given)


def _convert(action: argparse.Action, value, source: str):
    """A config or environment value, converted and checked like the flag would be."""
    name = action.option_strings[-1] if action.option_strings else action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, str):
            low = value.strip().lower()
            if low not in _TRUE | _FALSE:
                raise NNError(f"{source} sets {name} to '{value}': use true or false")
            value = low in _TRUE
        if not isinstance(value, bool):
            raise NNError(f"{source} sets {name} to {value!r}: use true or false")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else str(value).split()
        return [_convert_one(action, v, source, name) for v in items]
    if isinstance(value, (list, dict)):
        raise NNError(f"{source} sets {name} to a {type(value).__name__}: give a single value")
    return _convert_one(action, value, source, name)


def _convert_one(action, value, source: str, name: str):
    typ = action.type
    bad = f"{source} sets {name} to {value!r}"
    if value is not None and callable(typ):
        if typ in (int, float):
            if isinstance(value, bool) or (typ is int and isinstance(value, float)
                                           and not value.is_integer()):
                raise NNError(f"{bad}: expected {'an integer' if typ is int else 'a number'}")
        elif not isinstance(value, str):
            value = str(value)  # argparse types receive text, as from the command line
        try:
            value = typ(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise NNError(f"{bad}, which is not valid ({exc})") from None
    if action.choices is not None and value not in action.choices:
        raise NNError(f"{bad}: choose from {', '.join(map(str, action.choices))}")
    return value


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML config file into a flat ``{snake_case key: value}`` mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NNError(f"config file '{path}' does not exist: check the --config path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise NNError(f"config file '{path}' is not valid YAML{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NNError(f"config file '{path}' must hold a mapping of option: value, "
                      f"not a {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                 argv: Sequence[str] | None = None, *,
                 env_prefix: str = ENV_PREFIX) -> argparse.Namespace:
    """Fill every option the user did not pass on the command line from the config
    file, then the environment, else keep its default. Records where each value came
    from in ``args._sources`` (``{dest: "flag"|"config"|"env"|"default"}``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = _explicit(parser, argv)
    options = _options(parser, args)
    sources = {dest: ("flag" if dest in explicit else "default") for dest in options}

    config_path = getattr(args, "config", None)
    if config_path is None and "config" not in explicit and os.environ.get(f"{env_prefix}CONFIG"):
        config_path = os.environ[f"{env_prefix}CONFIG"]
        args.config = config_path
    config = load_config(config_path) if config_path else {}
    unknown = sorted(set(config) - set(options))
    if unknown:
        valid = ", ".join(sorted(k.replace("_", "-") for k in options))
        raise NNError(f"unknown key(s) {', '.join(unknown)} in config file '{config_path}': "
                      f"valid keys are {valid}")

    for dest, action in options.items():
        if dest in explicit:
            continue
        if dest in config:
            setattr(args, dest, _convert(action, config[dest], f"config file '{config_path}'"))
            sources[dest] = "config"
            continue
        env_name = f"{env_prefix}{dest.upper()}"
        if env_name in os.environ:
            setattr(args, dest, _convert(action, os.environ[env_name], f"environment variable {env_name}"))
            sources[dest] = "env"
    args._sources = sources
    return args


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
               env_prefix: str = ENV_PREFIX) -> argparse.Namespace:
    """``parser.parse_args(argv)`` followed by :func:`resolve_args`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return resolve_args(parser.parse_args(argv), parser, argv, env_prefix=env_prefix)


def args_config(args: argparse.Namespace) -> dict:
    """The resolved options as a plain dict (for manifests): no functions, no private keys."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if not k.startswith("_") and not callable(v)}


# ------------------------------------------------------------------ running
def error_line(prog: str, message: str) -> str:
    flat = " ".join(str(message).split())  # one line, whatever the message held
    return f"{prog}: error: {flat}"


def run_cli(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
            prog: str | None = None) -> int:
    """Run ``fn(args)``; return its exit code (None -> 0). An :class:`NNError` or a
    missing file prints one line on stderr and returns 2; Ctrl-C returns 130."""
    prog = prog or Path(sys.argv[0]).name or "nn"
    try:
        code = fn(args)
    except NNError as exc:
        print(error_line(prog, str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        name = exc.filename or str(exc)
        print(error_line(prog, f"file not found: {name}: check the path"), file=sys.stderr)
        return EXIT_USAGE
    except IsADirectoryError as exc:
        print(error_line(prog, f"{exc.filename or exc} is a folder: pass a file"), file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as exc:
        print(error_line(prog, f"permission denied: {exc.filename or exc}: check the path's permissions"),
              file=sys.stderr)
        return EXIT_USAGE
    except UnicodeDecodeError as exc:
        print(error_line(prog, f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                               "convert it to UTF-8"), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(error_line(prog, "interrupted by the user"), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if code is None else int(code)


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The innermost (sub)parser the command line selected."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _chosen_parser(action.choices[chosen], args)
    return parser


def cli_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
             env_prefix: str = ENV_PREFIX) -> int:
    """Parse, resolve and dispatch to ``args.func``; every failure becomes an exit code.

    ``--help`` returns 0; argparse usage errors return 2 (argparse prints them); a
    missing subcommand prints the usage and returns 2."""
    prog = parser.prog
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        deepest = _chosen_parser(parser, args)
        deepest.print_usage(sys.stderr)
        print(error_line(prog, "no command given: pick one of the commands above "
                               f"(see {deepest.prog} --help)"), file=sys.stderr)
        return EXIT_USAGE

    def resolved(ns):
        resolve_args(ns, parser, list(sys.argv[1:] if argv is None else argv), env_prefix=env_prefix)
        return func(ns)

    return run_cli(resolved, args, prog=prog)
