from __future__ import annotations

import pytest

from nn_core.errors import NNError
from nn_core.run.cli import (
    add_common_args,
    args_config,
    cli_main,
    make_parser,
    parse_args,
    run_cli,
)


def _parser(seen: dict | None = None):
    parser = make_parser("nn-test", "A test tool.", "example: nn-test run --seed 1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run it")
    add_common_args(run, defaults={"out": "runs/test"})
    run.add_argument("--max-tokens", type=int, default=16)
    run.add_argument("--fast", action="store_true")
    run.add_argument("--mode", choices=["a", "b"], default="a")

    def _run(args):
        if seen is not None:
            seen.update(args_config(args))
        if args.mode == "b":
            raise NNError("mode b is broken\nsecond line: use mode a")
        return 0

    run.set_defaults(func=_run)
    return parser


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("NN_MODEL", "NN_DEVICE", "NN_DTYPE", "NN_SEED", "NN_OUT", "NN_CONFIG",
                 "NN_MAX_TOKENS", "NN_FAST", "NN_MODE"):
        monkeypatch.delenv(name, raising=False)


def _config(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults():
    args = parse_args(_parser(), ["run"])
    assert (args.model, args.device, args.dtype, args.seed, args.out) == (
        "smollm2-135m", "auto", "auto", 0, "runs/test")
    assert args.max_tokens == 16 and args.fast is False
    assert args._sources["seed"] == "default"


def test_environment_beats_defaults(monkeypatch):
    monkeypatch.setenv("NN_SEED", "5")
    monkeypatch.setenv("NN_MODEL", "tiny-gpt2")
    monkeypatch.setenv("NN_FAST", "yes")
    args = parse_args(_parser(), ["run"])
    assert args.seed == 5 and args.model == "tiny-gpt2" and args.fast is True
    assert args._sources["seed"] == "env"


def test_config_beats_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NN_SEED", "5")
    monkeypatch.setenv("NN_MODEL", "tiny-gpt2")
    cfg = _config(tmp_path, "seed: 7\nmax-tokens: 9\nfast: true\n")
    args = parse_args(_parser(), ["run", "--config", cfg])
    assert args.seed == 7 and args.max_tokens == 9 and args.fast is True
    assert args.model == "tiny-gpt2"  # not in the file: the environment still applies
    assert args._sources["seed"] == "config" and args._sources["model"] == "env"


def test_flags_beat_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("NN_SEED", "5")
    cfg = _config(tmp_path, "seed: 7\nmax_tokens: 9\n")
    # --seed 0 equals the default and must still win: detection is by presence, not value
    args = parse_args(_parser(), ["run", "--config", cfg, "--seed", "0", "--max-tokens", "3"])
    assert args.seed == 0 and args.max_tokens == 3
    assert args._sources["seed"] == "flag"


def test_config_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NN_CONFIG", _config(tmp_path, "model: tiny-opt\n"))
    assert parse_args(_parser(), ["run"]).model == "tiny-opt"


@pytest.mark.parametrize("text, match", [
    ("seed: 1\nlearning-rate: 3\n", "unknown key.*learning_rate.*valid keys are.*max-tokens"),
    ("seed: abc\n", "--seed"),
    ("seed: 1.5\n", "integer"),
    ("mode: c\n", "choose from a, b"),
    ("fast: maybe\n", "true or false"),
    ("- 1\n- 2\n", "mapping"),
    ("seed: [1\n", "not valid YAML"),
])
def test_bad_config(tmp_path, text, match):
    with pytest.raises(NNError, match=match):
        parse_args(_parser(), ["run", "--config", _config(tmp_path, text)])


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv("NN_MAX_TOKENS", "many")
    with pytest.raises(NNError, match="NN_MAX_TOKENS"):
        parse_args(_parser(), ["run"])


def test_cli_main_bad_config_is_one_line_exit_2(tmp_path, capsys):
    cfg = _config(tmp_path, "bogus: 1\n")
    assert cli_main(_parser(), ["run", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nn-test: error: unknown key(s) bogus")
    assert "Traceback" not in err


def test_cli_main_dispatch_and_errors(tmp_path, capsys):
    seen: dict = {}
    assert cli_main(_parser(seen), ["run", "--seed", "4"]) == 0
    assert seen["seed"] == 4 and "func" not in seen and "_sources" not in seen
    capsys.readouterr()
    assert cli_main(_parser(), ["run", "--mode", "b"]) == 2
    err = capsys.readouterr().err
    assert err == "nn-test: error: mode b is broken second line: use mode a\n"
    assert cli_main(_parser(), ["run", "--help"]) == 0
    assert cli_main(_parser(), ["run", "--no-such-flag"]) == 2
    assert cli_main(_parser(), []) == 2
    assert cli_main(_parser(), ["run", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_cli_maps_exceptions(capsys):
    def missing(_):
        open("/definitely/not/here.txt")  # noqa: SIM115

    def interrupted(_):
        raise KeyboardInterrupt

    assert run_cli(missing, None, prog="nn-x") == 2
    assert capsys.readouterr().err == "nn-x: error: file not found: /definitely/not/here.txt: check the path\n"
    assert run_cli(interrupted, None, prog="nn-x") == 130
    assert run_cli(lambda _: 3, None, prog="nn-x") == 3
    assert run_cli(lambda _: None, None, prog="nn-x") == 0
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: it stays loud
        run_cli(lambda _: 1 / 0, None, prog="nn-x")


def test_switching_common_args_off():
    parser = make_parser("p", "d")
    add_common_args(parser, model=False, dtype=False, config=False)
    args = parse_args(parser, [])
    assert not hasattr(args, "model") and not hasattr(args, "config") and args.device == "auto"
    with pytest.raises(ValueError):
        add_common_args(make_parser("p", "d"), defaults={"nope": 1})
