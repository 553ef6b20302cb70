from __future__ import annotations

import json

import pytest

from nn_core.errors import NNError
from nn_core.select.formats import (
    neuronset_from_fnsft,
    neuronset_from_loki,
    neuronset_to_fnsft,
    neuronset_to_loki,
    neuronsets_from_fnsft,
)
from nn_core.select.neuronset import NeuronSet


@pytest.fixture
def llama(tiny_models):
    return tiny_models("llama")[0]  # 2 layers, hidden 64, intermediate 128


# ------------------------------------------------------------------ LoKI
def test_loki_roundtrip_with_model(llama, tmp_path):
    pos = [[5, 1, 63], []]
    ns = neuronset_from_loki(pos, model=llama)
    assert ns.sites == ("mlp_out",)
    assert ns.indices(0, "mlp_out").tolist() == [1, 5, 63]
    assert ns.meta["model_id"] == "tiny-llama" and ns.meta["method"] == "loki"
    out = neuronset_to_loki(ns, tmp_path / "pos.json")
    assert out == [[1, 5, 63], []]
    assert json.loads((tmp_path / "pos.json").read_text()) == out
    assert neuronset_from_loki(tmp_path / "pos.json", model=llama) == ns


def test_loki_without_model_and_config_form():
    ns = neuronset_from_loki({"target_pos": [[2], [0, 3], []]}, width=4)
    assert ns.meta["num_layers"] == 3 and ns.meta["widths"] == {"mlp_out": 4}
    assert neuronset_to_loki(ns) == [[2], [0, 3], []]
    act = neuronset_from_loki([[7]], site="mlp_act")
    assert act.sites == ("mlp_act",) and neuronset_to_loki(act, site="mlp_act") == [[7]]


@pytest.mark.parametrize("bad, match", [
    ({"a": 1}, "not a LoKI position list"),
    ([1, 2, 3], "not a LoKI position list"),
    ([[1, "x"], []], "must be integers"),
    ([[1.5], []], "must be integers"),
    ([[True], []], "must be integers"),
    ([[-1], []], "negative"),
])
def test_loki_malformed(bad, match):
    with pytest.raises(NNError, match=match):
        neuronset_from_loki(bad)


def test_loki_checks_the_model(llama, tmp_path):
    with pytest.raises(NNError, match="3 layer lists but the model has 2"):
        neuronset_from_loki([[1], [2], [3]], num_layers=2)
    with pytest.raises(NNError, match="layers"):
        neuronset_from_loki([[1], [2], [3]], model=llama)
    with pytest.raises(NNError, match="out of range"):
        neuronset_from_loki([[64], []], model=llama)  # mlp_out width is 64
    with pytest.raises(NNError, match="out of range"):
        neuronset_from_loki([[9], []], width=8)
    with pytest.raises(NNError, match="does not exist"):
        neuronset_from_loki(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[[1, 2]")
    with pytest.raises(NNError, match="not valid JSON"):
        neuronset_from_loki(tmp_path / "broken.json")


def test_loki_export_refuses_the_wrong_site(llama):
    act = NeuronSet.for_model(llama, {(0, "mlp_act"): [3]})
    with pytest.raises(NNError, match="mlp_act"):
        neuronset_to_loki(act)
    assert neuronset_to_loki(act, site="mlp_act") == [[3], []]


# ------------------------------------------------------------------ FNSFT
TEMPLATE = {
    "components": {
        "0": {"layer_0": [3, 1], "layer_1": [100]},
        "1": {"layer_1": [5, 6]},
    },
    "metadata": {"num_components": 2, "percentile": 95.0, "num_layers": 2},
}


def test_fnsft_read_components(llama, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TEMPLATE))
    sets = neuronsets_from_fnsft(path, model=llama)
    assert list(sets) == ["0", "1"]
    assert sets["0"].sites == ("mlp_act",)
    assert sets["0"].indices(0, "mlp_act").tolist() == [1, 3]
    assert sets["0"].indices(1, "mlp_act").tolist() == [100]
    assert sets["1"].indices(1, "mlp_act").tolist() == [5, 6]
    assert sets["1"].meta["parameters"]["template_metadata"]["percentile"] == 95.0
    union = neuronset_from_fnsft(path, model=llama)
    assert union == sets["0"] | sets["1"]
    assert union.meta["parameters"]["components"] == ["0", "1"]
    assert neuronset_from_fnsft(path, model=llama, components=[1]) == sets["1"]
    with pytest.raises(NNError, match="component\\(s\\) 7 not in"):
        neuronsets_from_fnsft(path, components=[7])


def test_fnsft_roundtrip(llama, tmp_path):
    sets = neuronsets_from_fnsft(TEMPLATE, model=llama)
    tpl = neuronset_to_fnsft(sets, tmp_path / "out.json", metadata={"note": "x"})
    assert tpl["components"] == {"0": {"layer_0": [1, 3], "layer_1": [100]},
                                 "1": {"layer_1": [5, 6]}}
    assert tpl["metadata"]["num_components"] == 2 and tpl["metadata"]["note"] == "x"
    assert tpl["metadata"]["model_name"] == "tiny-llama" and tpl["metadata"]["num_layers"] == 2
    back = neuronsets_from_fnsft(tmp_path / "out.json", model=llama)
    assert back == sets
    single = neuronset_to_fnsft(sets["1"])
    assert list(single["components"]) == ["0"]


@pytest.mark.parametrize("variant", [
    # components as a list, component names, numeric layer keys
    {"components": [{"layer_0": [1]}, {"1": [2]}]},
    {"components": {"component_0": {"0": [1]}, "component_1": {"layers.1": [2]}}},
    # module paths as layer keys, "meta" instead of "metadata"
    {"components": {"0": {"model.layers.0.mlp.down_proj": [1]},
                    "1": {"model.layers.1.mlp.down_proj": [2]}}, "meta": {}},
    # a component as a list of per-layer lists; a bare map of components
    {"0": [[1], []], "1": [[], [2]]},
])
def test_fnsft_variants(variant):
    sets = neuronsets_from_fnsft(variant, num_layers=2)
    assert list(sets) == ["0", "1"]
    assert sets["0"].indices(0, "mlp_act").tolist() == [1]
    assert sets["1"].indices(1, "mlp_act").tolist() == [2]


def test_fnsft_bare_layer_map_is_one_component():
    sets = neuronsets_from_fnsft({"layer_0": [4], "layer_2": [1, 2]})
    assert list(sets) == ["0"] and sets["0"].meta["num_layers"] == 3


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "map layers"),
    (42, "not an FNSFT template"),
    ({"components": {}}, "no components"),
    ({"components": {"0": {"layer_0": [1, "x"]}}}, "must be integers"),
    ({"components": {"0": {"first_layer_0_b1": [1]}}}, "layer number"),
    ({"components": {"0": {"layer_0": [1], "0": [2]}}}, "twice"),
    ({"components": {"0": {"layer_5": [1]}}, "metadata": {"num_layers": 2}}, "layer 5"),
])
def test_fnsft_malformed(bad, match):
    with pytest.raises(NNError, match=match):
        neuronsets_from_fnsft(bad)


def test_fnsft_checks_the_model(llama):
    with pytest.raises(NNError, match="out of range"):
        neuronsets_from_fnsft({"components": {"0": {"layer_0": [128]}}}, model=llama)
    with pytest.raises(NNError, match="2-layer model"):
        neuronsets_from_fnsft({"components": {"0": {"layer_3": [1]}}}, model=llama)


def test_fnsft_export_refuses_other_sites(llama):
    out = NeuronSet.for_model(llama, {(0, "mlp_out"): [1]})
    with pytest.raises(NNError, match="mlp_out"):
        neuronset_to_fnsft(out)
    with pytest.raises(NNError, match="NeuronSet"):
        neuronset_to_fnsft({"0": [1, 2]})
