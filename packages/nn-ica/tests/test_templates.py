from __future__ import annotations

import json

import numpy as np
import pytest

from nn_core.errors import NNError
from nn_core.model.loading import load_model
from nn_core.select.neuronset import NeuronSet
from nn_ica.templates import FORMAT, Component, Templates, component_iou, match_templates


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def make_templates(model, site="mlp_act"):
    from nn_core.model.adapters import model_signature

    comps = [
        Component(0, {0: np.array([1, 5, 9]), 1: np.array([2])}, variance=0.3, threshold=0.1),
        Component(1, {1: np.array([3, 4])}, variance=0.5, threshold=0.2),
        Component(2, {0: np.array([9, 10])}, variance=0.1, threshold=0.05),
    ]
    return Templates({**model_signature(model), "site": site, "percentile": 98.0}, comps)


def test_roundtrip(tmp_path, tiny):
    model, _ = tiny
    t = make_templates(model)
    path = t.save(tmp_path / "t.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == FORMAT
    assert raw["components"][0]["neurons"] == {"0": [1, 5, 9], "1": [2]}
    back = Templates.load(path)
    assert back.ids == [0, 1, 2] and back.site == "mlp_act"
    for a, b in zip(t.components, back.components, strict=True):
        assert a.layer_sizes() == b.layer_sizes() and a.variance == b.variance
    assert back.largest() == 1


def test_neuronset_is_union_and_fits_model(tiny):
    model, _ = tiny
    t = make_templates(model)
    ns = t.neuronset([0, 2], model=model)
    assert isinstance(ns, NeuronSet)
    assert ns[0, "mlp_act"].tolist() == [1, 5, 9, 10]
    assert ns[1, "mlp_act"].tolist() == [2]
    assert ns.sites == ("mlp_act",)
    offline = t.neuronset([1])  # without a model: the recorded signature
    assert offline.meta["num_layers"] == 2 and offline[1, "mlp_act"].tolist() == [3, 4]
    assert offline.meta["parameters"]["components"] == [1]


def test_unknown_component_ids(tiny):
    model, _ = tiny
    t = make_templates(model)
    with pytest.raises(NNError, match=r"component id\(s\) 7, 9 not in the templates"):
        t.neuronset([0, 7, 9])
    with pytest.raises(NNError, match="no component ids"):
        t.check_ids([])


def test_other_model_or_site_names_both(tiny):
    model, _ = tiny
    t = make_templates(model)
    t.check(model)
    other, _ = load_model("tiny-gpt2")
    with pytest.raises(NNError, match=r"built for model 'tiny-llama' at site mlp_act, not model 'tiny-gpt2'"):
        t.check(other)
    with pytest.raises(NNError, match=r"at site mlp_act, not site mlp_out"):
        t.check(model, site="mlp_out")
    renamed = Templates({**t.metadata, "model_id": "some/other-llama"}, t.components)
    with pytest.raises(NNError, match="'some/other-llama'.*'tiny-llama'"):
        renamed.check(model)
    renamed.check(model, check_id=False)  # same layout, id check skipped


def test_out_of_range_channel_rejected(tiny):
    model, _ = tiny
    meta = make_templates(model).metadata
    with pytest.raises(NNError, match="beyond the mlp_act width 128"):
        Templates(meta, [Component(0, {0: np.array([128])})])


def test_fnsft_import(tmp_path, tiny):
    model, _ = tiny
    fnsft = {"components": {"0": {"layer_0": [3, 1], "layer_1": [7]}, "1": {"layer_1": [2, 4]}},
             "metadata": {"num_components": 2, "model_name": "tiny-llama", "num_layers": 2}}
    path = tmp_path / "global_templates.json"
    path.write_text(json.dumps(fnsft))
    t = Templates.load(path)
    assert t.site == "mlp_act" and t.ids == [0, 1]
    assert t[0].neurons[0].tolist() == [1, 3] and t[1].neurons[1].tolist() == [2, 4]
    assert t.metadata["source"] == "FunctionalNetworksSFT"
    t.check(model)
    assert t.neuronset([0, 1], model=model)[1, "mlp_act"].tolist() == [2, 4, 7]
    # and it saves as nn.ica-templates/1
    back = Templates.load(t.save(tmp_path / "converted.json"))
    assert back.metadata["source"] == "FunctionalNetworksSFT" and back.ids == [0, 1]


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(NNError, match="not valid JSON"):
        Templates.load(bad)
    with pytest.raises(NNError, match="does not exist"):
        Templates.load(tmp_path / "missing.json")
    other = tmp_path / "ns.json"
    other.write_text(json.dumps({"format": "nn.neuronset/1", "neurons": {}}))
    with pytest.raises(NNError, match="not an ICA templates file"):
        Templates.load(other)


def test_match_pairs_by_iou(tiny):
    model, _ = tiny
    a = make_templates(model)
    # b: a's components permuted, one perturbed
    b = Templates(a.metadata, [
        Component(0, {0: np.array([9, 10])}),
        Component(1, {0: np.array([1, 5, 9]), 1: np.array([2, 6])}),
        Component(2, {1: np.array([3, 4])}),
    ])
    pairs = {p["a"]: (p["b"], p["iou"]) for p in match_templates(a, b)}
    assert pairs[1] == (2, 1.0)
    assert pairs[2] == (0, 1.0)
    assert pairs[0][0] == 1 and pairs[0][1] == pytest.approx(4 / 5)
    assert component_iou(a[0], a[1]) == 0.0
    mlp_out = Templates({**a.metadata, "site": "mlp_out"}, [])
    with pytest.raises(NNError, match="site mlp_act with templates of site mlp_out"):
        match_templates(a, mlp_out)


def test_neurons_as_list_and_non_utf8_are_one_line_errors(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text(json.dumps({"format": FORMAT, "metadata": {},
                               "components": [{"id": 0, "neurons": [[1, 2]]}]}))
    with pytest.raises(NNError, match="'neurons' must map layer to channel list") as err:
        Templates.load(bad)
    assert "\n" not in str(err.value)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"format": "nn.ica-templates/1", "metadata": {"model_id": "caf\xe9"}, "components": []}')
    with pytest.raises(NNError, match="is not UTF-8 text"):
        Templates.load(latin)


def test_neuronset_records_the_analysed_layers(tiny):
    model, _ = tiny
    t = make_templates(model)
    assert "layers" not in t.neuronset([0]).meta  # the templates do not say: no scope
    scoped = Templates({**t.metadata, "layers": [1, 0]}, t.components)
    assert scoped.neuronset([1]).meta["layers"] == [0, 1]
    assert scoped.neuronset([1], model=model).meta["layers"] == [0, 1]
