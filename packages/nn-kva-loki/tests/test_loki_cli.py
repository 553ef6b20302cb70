"""nn-kva-loki create / train / restore / eval on tiny models, and their bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nn_kva_loki.cli import main


@pytest.fixture
def positions(tmp_path):
    path = tmp_path / "positions.json"
    path.write_text(json.dumps([[1, 5, 9], [0, 63]]))
    return path


@pytest.mark.parametrize("bad, match", [
    ([[1, 64], [2]], "out of range 0..63"),
    ([[1, 1], [2]], "index 1 twice"),
    ([[1]], "cover 1 layers but the model has 2"),
    ({"something": 1}, "neither LoKI positions"),
])
def test_bad_positions_exit_2_and_keep_previous_output(tmp_path, positions, capsys, bad, match):
    out = tmp_path / "loki"
    assert main(["create", "tiny-llama", str(positions), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(bad))
    capsys.readouterr()
    assert main(["create", "tiny-llama", str(bad_file), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # training with bad positions fails the same way before anything is written
    assert main(["train", "tiny-llama", "task:copy", "--positions", str(bad_file), "--max-steps", "1",
                 "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_create_refuses_a_foreign_out_folder(tmp_path, positions, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["create", "tiny-llama", str(positions), "--out", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1


def test_train_restore_eval(tmp_path, positions, capsys):
    loki = tmp_path / "loki"
    assert main(["create", "tiny-llama", str(positions), "--out", str(loki)]) == 0
    base = load_file(str(loki / "model.safetensors"))
    run = tmp_path / "run"
    assert main(["train", str(loki), "task:copy", "--n-train", "8", "--n-eval", "2", "--max-steps", "2",
                 "--batch-size", "4", "--max-length", "128", "--lr", "1e-2", "--weight-decay", "0.1",
                 "--merge", "--out", str(run)]) == 0
    trained = load_file(str(run / "model" / "model.safetensors"))
    merged = load_file(str(run / "merged" / "model.safetensors"))
    assert json.loads((run / "model" / "config.json").read_text())["target_pos"] == [[1, 5, 9], [0, 63]]
    assert "loki_format" not in json.loads((run / "merged" / "config.json").read_text())
    assert json.loads((run / "manifest.json").read_text())["tool"] == "nn-kva-loki train"
    for name, w in base.items():
        assert torch.equal(trained[name], merged[name])
        if name.endswith("mlp.down_proj.weight"):
            layer = int(name.split(".")[2])
            rows = torch.zeros(64, dtype=torch.bool)
            rows[[[1, 5, 9], [0, 63]][layer]] = True
            assert torch.equal(trained[name][~rows], w[~rows])
            assert not torch.equal(trained[name][rows], w[rows])
        else:
            assert torch.equal(trained[name], w), name
    restored = tmp_path / "plain"
    assert main(["restore", str(run / "model"), "--out", str(restored)]) == 0
    plain = load_file(str(restored / "model.safetensors"))
    assert plain.keys() == merged.keys() and all(torch.equal(plain[k], merged[k]) for k in plain)
    capsys.readouterr()
    ev = tmp_path / "eval"
    assert main(["eval", str(run), "--general-samples", "2", "--no-exact-match", "--eval-max-length", "128",
                 "--out", str(ev)]) == 0
    table = capsys.readouterr().out
    assert "loki" in table and "lora" in table and "ΔPPL" in table
    res = json.loads((ev / "results.json").read_text())
    assert res["rows"]["base"]["general_dppl"] == 0
    assert res["rows"]["loki"]["trainable_parameters"] == 5 * 128
    assert res["lora"]["rank"] == 2 and res["rows"]["lora"]["trainable_parameters"] == 2 * 2 * (128 + 64)
    assert res["rows"]["loki"]["task_loss"] != res["rows"]["base"]["task_loss"]
