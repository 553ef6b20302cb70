from __future__ import annotations

import json

import pytest

from nn_core.cli import main
from nn_core.select.neuronset import NeuronSet
from nn_core.select.weightset import WeightSet


@pytest.fixture
def llama(tiny_models):
    return tiny_models("llama")[0]


@pytest.fixture
def two_sets(llama, tmp_path):
    a = NeuronSet.for_model(llama, {(0, "mlp_act"): [1, 2, 3, 4], (1, "mlp_act"): [10]}, method="a")
    b = NeuronSet.for_model(llama, {(0, "mlp_act"): [3, 4, 5], (1, "mlp_act"): [11]}, method="b")
    return a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("nn-core: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_sites_prints_widths(capsys):
    assert main(["sites", "tiny-gpt2"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in out and "Conv1D" in out
    assert "width 128" in out and "width 64" in out
    assert main(["sites", "tiny-llama", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["widths"] == {"mlp_act": 128, "mlp_out": 64, "resid": 64}
    assert [r["down_proj"] for r in info["layers"]] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert info["layers"][0]["down_weight_shape"] == [64, 128]


def test_sites_unknown_model_is_one_line(capsys):
    assert main(["sites", "tiny-nonexistent"]) == 2
    assert "tiny-llama" in _one_error_line(capsys)


def test_neurons_info(two_sets, capsys):
    a, _ = two_sets
    assert main(["neurons", "info", str(a)]) == 0
    out = capsys.readouterr().out
    assert "5 selected" in out and "tiny-llama" in out
    assert main(["neurons", "info", str(a), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["count"]) for r in info["per_layer"]] == [(0, 4), (1, 1)]
    assert info["per_layer"][0]["fraction"] == pytest.approx(4 / 128)


def test_neurons_compare(two_sets, capsys):
    a, b = two_sets
    assert main(["neurons", "compare", str(a), str(b), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["a"] == 5 and rep["b"] == 4 and rep["overlap"] == 2 and rep["union"] == 7
    assert rep["jaccard"] == pytest.approx(2 / 7)
    layer0, layer1 = rep["per_layer"]
    assert (layer0["overlap"], layer0["jaccard"]) == (2, pytest.approx(2 / 5))
    assert (layer1["overlap"], layer1["jaccard"]) == (0, 0.0)
    assert layer0["expected_overlap"] == pytest.approx(4 * 3 / 128)
    assert main(["neurons", "compare", str(a), str(b)]) == 0
    assert "Jaccard 0.2857" in capsys.readouterr().out


def test_neurons_compare_other_model(two_sets, tiny_models, tmp_path, capsys):
    a, _ = two_sets
    gpt2 = tiny_models("gpt2")[0]
    other = NeuronSet.for_model(gpt2, {(0, "mlp_act"): [1]}).save(tmp_path / "g.json")
    assert main(["neurons", "compare", str(a), str(other)]) == 2
    assert "different models" in _one_error_line(capsys)
    renamed = NeuronSet.load(a).with_meta(model_id="my/llama").save(tmp_path / "r.json")
    assert main(["neurons", "compare", str(a), str(renamed)]) == 2
    assert "--ignore-model-id" in _one_error_line(capsys)
    assert main(["neurons", "compare", str(a), str(renamed), "--ignore-model-id"]) == 0


@pytest.mark.parametrize("op, expected", [
    ("union", {(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 10), (1, 11)}),
    ("intersection", {(0, 3), (0, 4)}),
    ("difference", {(0, 1), (0, 2), (1, 10)}),
    ("symmetric-difference", {(0, 1), (0, 2), (0, 5), (1, 10), (1, 11)}),
])
def test_neurons_combine(two_sets, tmp_path, op, expected, capsys):
    a, b = two_sets
    out = tmp_path / "c.json"
    assert main(["neurons", "combine", str(a), str(b), "--op", op, "--out", str(out)]) == 0
    c = NeuronSet.load(out)
    assert {(layer, i) for layer, _, i in c} == expected
    assert c.meta["method"] == f"combine:{op}"


def test_weightset_files(llama, tmp_path, capsys):
    name = "model.layers.0.mlp.down_proj.weight"
    a = WeightSet.for_model(llama, {name: [1, 2, 3]}, method="a").save(tmp_path / "a.safetensors")
    b = WeightSet.for_model(llama, {name: [3, 4]}, method="b").save(tmp_path / "b.safetensors")
    assert main(["neurons", "info", str(a)]) == 0
    assert "weightset, 3 selected" in capsys.readouterr().out
    assert main(["neurons", "compare", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overlap"] == 1
    out = tmp_path / "u.safetensors"
    assert main(["neurons", "combine", str(a), str(b), "--op", "union", "--out", str(out)]) == 0
    assert WeightSet.load(out).indices(name).tolist() == [1, 2, 3, 4]


def test_import_export(tmp_path, capsys):
    pos = tmp_path / "pos.json"
    pos.write_text(json.dumps([[3, 1], [63]]))
    ns_path = tmp_path / "ns.json"
    assert main(["neurons", "import", "--from", "loki", str(pos), "--model", "tiny-llama",
                 "--out", str(ns_path)]) == 0
    ns = NeuronSet.load(ns_path)
    assert ns.indices(0, "mlp_out").tolist() == [1, 3] and ns.meta["model_id"] == "tiny-llama"
    back = tmp_path / "back.json"
    assert main(["neurons", "export", "--to", "loki", str(ns_path), "--out", str(back)]) == 0
    assert json.loads(back.read_text()) == [[1, 3], [63]]

    tpl = tmp_path / "tpl.json"
    tpl.write_text(json.dumps({"components": {"0": {"layer_0": [5]}, "1": {"layer_1": [7]}}}))
    assert main(["neurons", "import", "--from", "fnsft", str(tpl), "--model", "tiny-llama",
                 "--component", "1", "--out", str(ns_path)]) == 0
    ns = NeuronSet.load(ns_path)
    assert len(ns) == 1 and ns.indices(1, "mlp_act").tolist() == [7]
    assert main(["neurons", "export", "--to", "fnsft", str(ns_path), "--out", str(back)]) == 0
    assert json.loads(back.read_text())["components"] == {"0": {"layer_1": [7]}}


@pytest.mark.parametrize("argv, needle", [
    (["neurons", "info", "missing.json"], "does not exist"),
    (["neurons", "import", "--from", "loki", "BAD", "--model", "tiny-llama", "--out", "x.json"],
     "not a LoKI position list"),
    (["neurons", "import", "--from", "loki", "BIG", "--model", "tiny-llama", "--out", "x.json"],
     "out of range"),
    (["neurons", "export", "--to", "loki", "A", "--out", "x.json"], "mlp_act"),
])
def test_bad_input_exits_2(two_sets, tmp_path, monkeypatch, argv, needle, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD").write_text('{"x": 1}')
    (tmp_path / "BIG").write_text("[[1000], []]")
    argv = [str(two_sets[0]) if a == "A" else a for a in argv]
    assert main(argv) == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "x.json").exists()  # nothing half-written


def test_usage_errors(capsys):
    assert main(["neurons", "combine", "a", "b", "--op", "merge", "--out", "c"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0


