"""Shared CLI plumbing for every nn-* command.

* :func:`make_parser` and :func:`add_common_args` give every tool the same look and the
  same common flags: ``--model``, ``--device``, ``--dtype``, ``--seed``, ``--out``,
  ``--overwrite``, ``--config FILE.yaml``.
* :func:`parse_args` parses and then resolves each option by precedence
  **flags > config file > environment > defaults**. Environment variables are scoped per
  tool: the variable of an option is the tool's prefix + its name in upper case, the
  prefix being ``NN_`` + the program name without ``nn-`` (``NN_ICA_TEMPLATES``,
  ``NN_EVAL_DATA``, ``NN_SENSITIVITY_MODE``, ``NN_CORE_MODEL``; see
  :func:`env_prefix_for`); ``<prefix>CONFIG`` names a config file. So ``NN_MODE`` or
  ``NN_ICA_MODE`` never reach ``nn-sensitivity``. Config keys are option names in kebab
  or snake case; an unknown key is an error that lists the valid ones.
* Required options (``add_argument(..., required=True)``) are checked only after that
  merge, so a config file or the environment can give them; a value still missing is
  one line and exit 2.
* :func:`run_cli` runs a command function and turns an :class:`NNError` (or an
  ``OSError`` such as a missing file or an unwritable output, or Ctrl-C) into one line
  ``<prog>: error: ...`` on stderr and an exit code, never a traceback. :func:`cli_main`
  does all of it for a parser with subcommands, and checks ``--out`` with
  :func:`nn_core.io.check_output_dir` before the command runs (so before any model is
  loaded).

Parsers must come from :func:`make_parser` (subparsers inherit its class): it records
its actions through the public ``add_argument`` API, so nothing here reads or patches
argparse's private state.

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
               "auto, cpu, cuda, cuda:1, mps, or map (spread the model over all devices: "
               "device_map='auto') (default: %(default)s: cuda > mps > cpu)"),
    "dtype": ("--dtype", "auto", str, "DTYPE",
              "auto, float32, bfloat16 or float16 (default: %(default)s: fp32 on CPU)"),
    "seed": ("--seed", 0, int, "N", "random seed (default: %(default)s)"),
    "out": ("--out", None, str, "DIR", "output folder (default: %(default)s)"),
}

_INTERNAL = {"help", "config", "func"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class NNArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that records its own options through the public API.

    ``nn_actions`` lists every action added (also through argument groups),
    ``nn_required`` the optional flags declared ``required=True`` (argparse is told they
    are optional, so that a config file or the environment may supply them; the check
    happens in :func:`resolve_args`), ``nn_subparsers`` the subcommand action, if any.
    Abbreviated long options are off: a flag counts as given only when spelled out.
    """

    def __init__(self, *args, **kwargs):
        self.nn_actions: list[argparse.Action] = []
        self.nn_required: list[argparse.Action] = []
        self.nn_subparsers: argparse.Action | None = None
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _record(self, add: Callable, args, kwargs) -> argparse.Action:
        required = bool(kwargs.get("required")) and bool(args) and str(args[0]).startswith("-")
        if required:
            kwargs = {**kwargs, "required": False}
            if isinstance(kwargs.get("help"), str):
                kwargs["help"] = kwargs["help"] + " (required)"
            elif kwargs.get("help") is None:
                kwargs["help"] = "(required)"
        action = add(*args, **kwargs)
        self.nn_actions.append(action)
        if required:
            self.nn_required.append(action)
        return action

    def add_argument(self, *args, **kwargs):
        return self._record(super().add_argument, args, kwargs)

    def _wrap_group(self, group):
        add = group.add_argument
        group.add_argument = lambda *a, **k: self._record(add, a, k)
        return group

    def add_argument_group(self, *args, **kwargs):
        return self._wrap_group(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *args, **kwargs):
        return self._wrap_group(super().add_mutually_exclusive_group(*args, **kwargs))

    def add_subparsers(self, **kwargs):
        self.nn_subparsers = super().add_subparsers(**kwargs)
        return self.nn_subparsers


def make_parser(prog: str, description: str, epilog: str | None = None) -> NNArgumentParser:
    """An :class:`NNArgumentParser` that keeps the description's and epilog's line breaks."""
    return NNArgumentParser(prog=prog, description=description, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def env_prefix_for(prog: str) -> str:
    """The environment prefix of a tool: ``nn-ica`` -> ``NN_ICA_``, ``nn-eval`` ->
    ``NN_EVAL_``, ``nn-sensitivity`` -> ``NN_SENSITIVITY_``, ``nn-core`` -> ``NN_CORE_``
    (the first word of ``prog``, without ``nn-``, upper case, ``-`` -> ``_``)."""
    name = (prog.split() or ["nn"])[0]
    name = name[3:] if name.lower().startswith("nn-") else name
    return ENV_PREFIX + "".join(c if c.isalnum() else "_" for c in name).upper() + "_"


def add_common_args(parser: argparse.ArgumentParser, *, model: bool = True, device: bool = True,
                    dtype: bool = True, seed: bool = True, out: bool = True, config: bool = True,
                    defaults: dict | None = None) -> argparse.ArgumentParser:
    """Add the common flags (each can be switched off); ``defaults`` overrides built-in
    defaults, e.g. ``defaults={"out": "runs/demo"}``. With ``out`` comes ``--overwrite``
    (replace an ``--out`` that is not a previous output of this command)."""
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
    if out:
        group.add_argument("--overwrite", action="store_true",
                           help="replace --out even if it is not a previous output of this "
                                "command (a file, a folder of yours, another tool's output)")
    if config:
        group.add_argument("--config", metavar="FILE.yaml", default=None,
                           help="YAML file of option values (keys like the flags: model, "
                                "max-tokens or max_tokens); flags given here win over it, it "
                                f"wins over {env_prefix_for(parser.prog)}* environment variables")
    return parser


# ------------------------------------------------------------------ resolution
def _parser_actions(parser) -> list[argparse.Action]:
    actions = getattr(parser, "nn_actions", None)
    if actions is None:
        raise TypeError(f"parser {parser.prog!r} was not made by nn_core.run.cli.make_parser")
    return actions


def _chain(parser, args: argparse.Namespace, argv: Sequence[str] = ()) -> list:
    """The parser and the subcommand parsers the command line selected, outermost first."""
    chain = [parser]
    while True:
        sub = getattr(chain[-1], "nn_subparsers", None)
        if sub is None:
            return chain
        chosen = getattr(args, sub.dest, None) if sub.dest != argparse.SUPPRESS else None
        if chosen is None:  # subcommand not recorded: the first token that names one
            chosen = next((t for t in argv if t in sub.choices), None)
        if chosen not in sub.choices:
            return chain
        chain.append(sub.choices[chosen])


def _options(chain) -> dict[str, argparse.Action]:
    opts: dict[str, argparse.Action] = {}
    for p in chain:
        for action in _parser_actions(p):
            if action.dest in _INTERNAL or action.dest in (argparse.SUPPRESS, "version"):
                continue
            opts.setdefault(action.dest, action)
    return opts


def _given(action: argparse.Action, tokens: Sequence[str]) -> bool:
    """Whether ``tokens`` spell out the optional ``action`` (``--x``, ``--x=v``, ``-xV``)."""
    for opt in action.option_strings:
        for tok in tokens:
            if tok == opt or (opt.startswith("--") and tok.startswith(opt + "=")):
                return True
            if len(opt) == 2 and not opt.startswith("--") and tok.startswith(opt) \
                    and not tok.startswith("--"):
                return True
    return False


def _explicit(options: dict[str, argparse.Action], args: argparse.Namespace,
              argv: Sequence[str]) -> set[str]:
    """Dests the user gave on the command line (abbreviations are off, so a given option
    is spelled out in ``argv``; ``--`` ends the options). A positional counts as given
    when it is required or its value differs from its default."""
    argv = list(argv)
    tokens = argv[: argv.index("--")] if "--" in argv else argv
    given = set()
    for dest, action in options.items():
        if action.option_strings:
            if _given(action, tokens):
                given.add(dest)
        elif action.nargs not in ("?", "*") or getattr(args, dest, None) != action.default:
            given.add(dest)
    return given


def _convert(action: argparse.Action, value, source: str):
    """A config or environment value, converted and checked like the flag would be."""
    name = action.option_strings[-1] if action.option_strings else action.dest
    if action.nargs == 0:  # a switch: store_true / store_false / BooleanOptionalAction
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


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                 argv: Sequence[str] | None = None, *,
                 env_prefix: str | None = None) -> argparse.Namespace:
    """Fill every option the user did not pass on the command line from the config
    file, then the environment (``env_prefix``, default :func:`env_prefix_for` of the
    parser's prog), else keep its default; then check that every required option has a
    value. Records where each value came from in ``args._sources``
    (``{dest: "flag"|"config"|"env"|"default"}``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env_prefix = env_prefix_for(parser.prog) if env_prefix is None else env_prefix
    chain = _chain(parser, args, argv)
    options = _options(chain)
    explicit = _explicit(options, args, argv)
    sources = {dest: ("flag" if dest in explicit else "default") for dest in options}

    config_path = getattr(args, "config", None)
    if config_path is None and os.environ.get(f"{env_prefix}CONFIG"):
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
    for p in chain:
        for action in p.nn_required:
            if getattr(args, action.dest, None) is None:
                flag = _flag(action)
                metavar = action.metavar or action.dest.upper()
                raise NNError(f"{chain[-1].prog} needs {flag} {metavar}: give it on the command "
                              f"line, as '{flag.lstrip('-')}:' in --config, or in "
                              f"{env_prefix}{action.dest.upper()}")
    return args


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
               env_prefix: str | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` followed by :func:`resolve_args`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return resolve_args(parser.parse_args(argv), parser, argv, env_prefix=env_prefix)


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 argv: Sequence[str] = ()) -> str:
    """The full command the arguments select, e.g. ``"nn-eval ppl"``: the ``tool`` that
    manifests record and :func:`nn_core.io.check_output_dir` compares."""
    return _chain(parser, args, argv)[-1].prog


def args_config(args: argparse.Namespace) -> dict:
    """The resolved options as a plain dict (for manifests): no functions, no private keys."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if not k.startswith("_") and not callable(v)}


# ------------------------------------------------------------------ running
def error_line(prog: str, message: str) -> str:
    flat = " ".join(str(message).split())  # one line, whatever the message held
    return f"{prog}: error: {flat}"


def _user_error(exc: Exception) -> str:
    """The one-line message for an error the user can fix (a bad input, path or disk)."""
    name = getattr(exc, "filename", None) or str(exc)
    if isinstance(exc, NNError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it to UTF-8"
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {name}: check the path"
    if isinstance(exc, IsADirectoryError):
        return f"{name} is a folder: pass a file"
    if isinstance(exc, PermissionError):
        return f"permission denied: {name}: check the path's permissions"
    if isinstance(exc, NotADirectoryError):
        return f"{name}: a part of this path is a file, not a folder: check the path"
    if isinstance(exc, FileExistsError):
        return f"{name} already exists: choose another path"
    # any other OSError, e.g. a full disk or a read-only file system while writing output
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}: check the path, its permissions and free space"


def run_cli(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
            prog: str | None = None) -> int:
    """Run ``fn(args)``; return its exit code (None -> 0). An :class:`NNError` or a
    missing file, an unwritable output or another ``OSError`` prints one line on stderr
    and returns 2; Ctrl-C returns 130."""
    prog = prog or Path(sys.argv[0]).name or "nn"
    try:
        code = fn(args)
    except (NNError, OSError, UnicodeDecodeError) as exc:
        print(error_line(prog, _user_error(exc)), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(error_line(prog, "interrupted by the user"), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if code is None else int(code)


def cli_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
             env_prefix: str | None = None) -> int:
    """Parse, resolve and dispatch to ``args.func``; every failure becomes an exit code.

    ``--help`` returns 0; argparse usage errors return 2 (argparse prints them); a
    missing subcommand prints the usage and returns 2. Before the command runs, an
    ``--out`` (of :func:`add_common_args`) is checked by
    :func:`nn_core.io.check_output_dir` for the command :func:`command_name` names (it
    is also left in ``args._tool``), so a bad output location fails before any model
    is loaded."""
    prog = parser.prog
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        deepest = _chain(parser, args, argv)[-1]
        deepest.print_usage(sys.stderr)
        print(error_line(prog, "no command given: pick one of the commands above "
                               f"(see {deepest.prog} --help)"), file=sys.stderr)
        return EXIT_USAGE

    def resolved(ns):
        from nn_core.io import check_output_dir

        resolve_args(ns, parser, argv, env_prefix=env_prefix)
        ns._tool = command_name(parser, ns, argv)
        if getattr(ns, "out", None) and hasattr(ns, "overwrite"):
            check_output_dir(ns.out, tool=ns._tool, overwrite=ns.overwrite,
                             markers=getattr(ns, "_out_markers", ()))
        return func(ns)

    return run_cli(resolved, args, prog=prog)
