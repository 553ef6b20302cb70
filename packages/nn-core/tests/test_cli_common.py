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
    for name in ("NN_TEST_MODEL", "NN_TEST_DEVICE", "NN_TEST_DTYPE", "NN_TEST_SEED", "NN_TEST_OUT",
                 "NN_TEST_CONFIG",
                 "NN_TEST_MAX_TOKENS", "NN_TEST_FAST", "NN_TEST_MODE", "NN_MODE"):
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
    monkeypatch.setenv("NN_TEST_SEED", "5")
    monkeypatch.setenv("NN_TEST_MODEL", "tiny-gpt2")
    monkeypatch.setenv("NN_TEST_FAST", "yes")
    args = parse_args(_parser(), ["run"])
    assert args.seed == 5 and args.model == "tiny-gpt2" and args.fast is True
    assert args._sources["seed"] == "env"


def test_config_beats_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NN_TEST_SEED", "5")
    monkeypatch.setenv("NN_TEST_MODEL", "tiny-gpt2")
    cfg = _config(tmp_path, "seed: 7\nmax-tokens: 9\nfast: true\n")
    args = parse_args(_parser(), ["run", "--config", cfg])
    assert args.seed == 7 and args.max_tokens == 9 and args.fast is True
    assert args.model == "tiny-gpt2"  # not in the file: the environment still applies
    assert args._sources["seed"] == "config" and args._sources["model"] == "env"


def test_flags_beat_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("NN_TEST_SEED", "5")
    cfg = _config(tmp_path, "seed: 7\nmax_tokens: 9\n")
    # --seed 0 equals the default and must still win: detection is by presence, not value
    args = parse_args(_parser(), ["run", "--config", cfg, "--seed", "0", "--max-tokens", "3"])
    assert args.seed == 0 and args.max_tokens == 3
    assert args._sources["seed"] == "flag"


def test_config_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NN_TEST_CONFIG", _config(tmp_path, "model: tiny-opt\n"))
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
    monkeypatch.setenv("NN_TEST_MAX_TOKENS", "many")
    with pytest.raises(NNError, match="NN_TEST_MAX_TOKENS"):
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


# ------------------------------------------------------------------ required options, env scope
def _required_parser(prog="nn-test", seen=None):
    parser = make_parser(prog, "A test tool.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ev = sub.add_parser("eval")
    ev.add_argument("--templates", required=True, metavar="FILE")
    ev.add_argument("--components", required=True, metavar="IDS")
    ev.add_argument("--mode", choices=("lesion", "preserve"), default="lesion")
    add_common_args(ev, model=False)
    ev.set_defaults(func=lambda a: seen.update(args_config(a)) if seen is not None else 0)
    return parser


def test_required_flags_can_come_from_the_config_file(tmp_path, capsys):
    seen: dict = {}
    cfg = _config(tmp_path, "templates: t.json\ncomponents: 0,1\nmode: preserve\n")
    assert cli_main(_required_parser(seen=seen), ["eval", "--config", cfg]) == 0, capsys.readouterr().err
    assert seen["templates"] == "t.json" and seen["components"] == "0,1" and seen["mode"] == "preserve"
    # a flag still beats the file
    assert cli_main(_required_parser(seen=seen), ["eval", "--config", cfg, "--templates", "u.json"]) == 0
    assert seen["templates"] == "u.json"


def test_required_flags_can_come_from_the_tools_environment(monkeypatch):
    monkeypatch.setenv("NN_TEST_TEMPLATES", "env.json")
    monkeypatch.setenv("NN_TEST_COMPONENTS", "3")
    args = parse_args(_required_parser(), ["eval"])
    assert (args.templates, args.components) == ("env.json", "3")
    assert args._sources["templates"] == "env"


def test_missing_required_value_after_merging_is_one_line_exit_2(tmp_path, capsys):
    cfg = _config(tmp_path, "templates: t.json\n")
    assert cli_main(_required_parser(), ["eval", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --components IDS" in err and "NN_TEST_COMPONENTS" in err
    assert "Traceback" not in err


def test_environment_is_scoped_per_tool(monkeypatch):
    """NN_MODE (or another tool's NN_ICA_MODE) must not reach nn-sensitivity."""
    def sens_parser():
        parser = make_parser("nn-sensitivity", "d")
        sub = parser.add_subparsers(dest="command")
        run = sub.add_parser("run")
        run.add_argument("--mode", choices=("global", "per-layer"), default="global")
        return parser

    monkeypatch.setenv("NN_MODE", "preserve")
    monkeypatch.setenv("NN_ICA_MODE", "preserve")
    args = parse_args(sens_parser(), ["run"])
    assert args.mode == "global" and args._sources["mode"] == "default"
    monkeypatch.setenv("NN_SENSITIVITY_MODE", "per-layer")
    assert parse_args(sens_parser(), ["run"]).mode == "per-layer"


def test_env_prefix_for():
    from nn_core.run.cli import env_prefix_for

    assert [env_prefix_for(p) for p in ("nn-ica", "nn-eval ppl", "nn-sensitivity", "nn-core")] == \
        ["NN_ICA_", "NN_EVAL_", "NN_SENSITIVITY_", "NN_CORE_"]


def test_parse_leaves_argparse_state_alone():
    """Resolution must not mutate the parser (the old second parse swapped defaults)."""
    parser = _parser()
    parse_args(parser, ["run", "--seed", "3"])
    assert parse_args(parser, ["run"]).seed == 0
    assert parse_args(parser, ["run", "--seed=7"]).seed == 7


def test_abbreviated_flags_are_refused():
    # with abbreviations a given flag could not be told apart from a default
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--max-tok", "3"])


# ------------------------------------------------------------------ --out and OSErrors
def _writer_parser(seen=None):
    parser = make_parser("nn-test", "d")
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("write")
    add_common_args(w, model=False)

    def _write(args):
        from nn_core.io import atomic_dir
        from nn_core.run.manifest import write_manifest

        if seen is not None:
            seen["called"] = True
        with atomic_dir(args.out, tool=args._tool, overwrite=args.overwrite) as tmp:
            (tmp / "r.txt").write_text("x")
            write_manifest(tmp, config=args_config(args), tool=args._tool)
        return 0

    w.set_defaults(func=_write)
    return parser


def test_cli_refuses_a_users_file_as_out_before_running(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    seen: dict = {}
    assert cli_main(_writer_parser(seen), ["write", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "existing file" in err and "--overwrite" in err
    assert target.read_text() == "mine" and "called" not in seen
    # under a file / a folder of the user's
    assert cli_main(_writer_parser(seen), ["write", "--out", str(target / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1")
    assert cli_main(_writer_parser(seen), ["write", "--out", str(mine)]) == 2
    assert "not an output of nn-test write" in capsys.readouterr().err
    assert (mine / "data.csv").read_text() == "1" and "called" not in seen
    # a previous output of the same command is replaced; --overwrite replaces anything
    out = tmp_path / "run"
    assert cli_main(_writer_parser(), ["write", "--out", str(out)]) == 0
    assert cli_main(_writer_parser(), ["write", "--out", str(out)]) == 0
    assert cli_main(_writer_parser(), ["write", "--out", str(target), "--overwrite"]) == 0
    assert (target / "r.txt").read_text() == "x"


def test_run_cli_maps_output_oserrors(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")

    def under_file(_):
        (f / "out").mkdir(parents=True)

    def exists(_):
        f.mkdir()

    def readonly(_):
        raise OSError(30, "Read-only file system", str(tmp_path / "o"))

    for fn, text in ((under_file, "not a folder"), (exists, "already exists"),
                     (readonly, "Read-only file system")):
        assert run_cli(fn, None, prog="nn-x") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err
