"""Bad LoKI positions fail in one line (exit 2) before any model is loaded, where that can be
known without the model; positions that need the model (layer count, width) fail after
loading, with nothing written."""

from __future__ import annotations

import json

import pytest

from nn_core.errors import NNError
from nn_kva_loki.cli import main
from nn_kva_loki.loki import precheck_positions


@pytest.mark.parametrize("bad, match", [
    ([[1, 1], [2]], "index 1 twice: give each channel once"),
    ([[3], [-1]], "layer 1 holds the negative index -1"),
    ([[1.5], [2]], "non-integer index"),
    ([[True], [2]], "non-integer index"),
    ([1, 2, 3], "one list of channel indices per layer"),
    ({"something": 1}, "neither LoKI positions"),
    ("not json", "LoKI position"),
])
def test_positions_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, bad, match):
    import nn_core.model.loading as loading

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before the positions were checked")

    monkeypatch.setattr(loading, "load_model", no_loading)
    path = tmp_path / "bad.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(NNError, match=match):
        precheck_positions(path)
    capsys.readouterr()
    out = tmp_path / "loki"
    assert main(["create", "tiny-llama", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert match.split(":")[0] in err and len(err.splitlines()) == 1
    assert not out.exists()
    run = tmp_path / "run"
    assert main(["train", "tiny-llama", "task:copy", "--positions", str(path), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert match.split(":")[0] in err and len(err.splitlines()) == 1
    assert not run.exists() or not any(run.iterdir())


def test_missing_positions_file_is_one_line(tmp_path, capsys):
    assert main(["create", "tiny-llama", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.json" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("good", [[[0, 5], []], [[], []], [[7, 3, 9], [1]]])
def test_precheck_lets_well_formed_positions_through(tmp_path, good):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(good))
    precheck_positions(path)  # no error: range and layer count are checked against the model


@pytest.mark.parametrize("bad, match", [
    ([[600] * 1 + [3]] * 30, "cover 30 layers but the model has 2"),  # smollm2's 30 layers
    ([[575], [3]], "index 575, out of range 0..63: they were made for another model"),
])
def test_positions_for_another_model(tmp_path, capsys, bad, match):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(bad))
    precheck_positions(path)  # well formed; only the model can tell
    out = tmp_path / "loki"
    assert main(["create", "tiny-llama", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
