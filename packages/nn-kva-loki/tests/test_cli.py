from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from nn_core.select.formats import neuronset_from_loki
from nn_core.select.neuronset import NeuronSet
from nn_kva_loki.cli import default_out, main


@pytest.fixture
def kva(tmp_path, make_kva):
    data = np.random.default_rng(0).standard_normal((8, 3, 16)).astype(np.float32)
    return make_kva(tmp_path / "kva.h5", data)


def test_select_writes_neuronset_positions_and_manifest(tmp_path, kva, capsys):
    out = tmp_path / "sel"
    assert main(["select", str(kva), "--quota", "25", "--score", "abs", "--out", str(out), "--plot"]) == 0
    ns = NeuronSet.load(out / "neurons.json")
    assert ns.meta["parameters"]["quota"] == 25.0 and ns.meta["parameters"]["score"] == "abs"
    assert ns.layer_counts("mlp_out") == {0: 4, 1: 4, 2: 4}
    positions = json.loads((out / "positions.json").read_text())
    assert len(positions) == 3 and neuronset_from_loki(positions, num_layers=3, width=16) == ns
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["selected"] == 12 and manifest["config"]["quota"] == 25.0
    assert (out / "frequencies.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "12 of 48 mlp_out channels" in printed and "wrote" in printed


def test_select_default_out_and_global(tmp_path, kva):
    assert main(["select", str(kva), "--quota", "10", "--strategy", "global"]) == 0
    out = default_out(str(kva), "global", "signed", 10.0)
    assert out.parent == tmp_path and out.name == "kva-select-global-signed-q10"
    ns = NeuronSet.load(out / "neurons.json")
    assert len(ns) == 5 and ns.meta["parameters"]["strategy"] == "global"  # round(0.1 * 48)


@pytest.mark.parametrize("quota", ["0", "150", "-5", "abc", "nan"])
def test_bad_quota_exits_2(kva, quota, capsys):
    assert main(["select", str(kva), "--quota", quota]) == 2
    assert "quota" in capsys.readouterr().err


def test_bad_files_exit_2_with_one_line(tmp_path, make_kva, capsys):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    part = make_kva(tmp_path / "part.h5", np.zeros((2, 3, 16), np.float32), finish=False)
    cases = [(tmp_path / "missing.h5", "file not found"), (plain, "not a KVA file"),
             (text, "not a readable HDF5 file"), (part, "interrupted")]
    for path, message in cases:
        assert main(["select", str(path), "--quota", "10", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("nn-kva-loki: error:")
    assert not (tmp_path / "o").exists()  # nothing written on refusal
    assert main(["select", str(part), "--quota", "10", "--allow-incomplete",
                 "--out", str(tmp_path / "o")]) == 0


def test_usage_errors_exit_2(kva):
    assert main([]) == 2
    assert main(["select", str(kva)]) == 2  # --quota is required
    assert main(["select", str(kva), "--quota", "5", "--chunk-size", "0"]) == 2
    assert main(["--help"]) == 0


def test_select_out_rules(tmp_path, kva, capsys):
    """--out is replaced only when it is a previous select output; a user's file or folder
    is refused before any work and left as it was, unless --overwrite."""
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    assert main(["select", str(kva), "--quota", "25", "--out", str(mine)]) == 2
    assert mine.read_text() == "keep me"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]

    out = tmp_path / "sel"
    assert main(["select", str(kva), "--quota", "25", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tool"] == "nn-kva-loki select"
    assert main(["select", str(kva), "--quota", "50", "--out", str(out)]) == 0  # its own output
    assert NeuronSet.load(out / "neurons.json").meta["parameters"]["quota"] == 50.0
    assert not [p for p in tmp_path.iterdir() if ".nn-tmp-" in p.name]  # no temp folder left

    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "data.csv").write_text("x")
    assert main(["select", str(kva), "--quota", "25", "--out", str(folder)]) == 2
    assert (folder / "data.csv").read_text() == "x"
    assert main(["select", str(kva), "--quota", "25", "--out", str(folder), "--overwrite"]) == 0
    assert (folder / "neurons.json").is_file()
