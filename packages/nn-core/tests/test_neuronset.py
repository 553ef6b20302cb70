from __future__ import annotations

import json

import numpy as np
import pytest

from nn_core.errors import NNError
from nn_core.select.formats import (
    neuronset_from_fnsft,
    neuronset_from_loki,
    neuronset_to_fnsft,
    neuronset_to_loki,
)
from nn_core.select.neuronset import FORMAT, NeuronSet


@pytest.fixture
def llama(tiny_models):
    return tiny_models("llama")[0]  # 2 layers, mlp_act 128, mlp_out/resid 64


def _random_set(model, seed, sites=("mlp_act",), frac=0.3):
    rng = np.random.default_rng(seed)
    widths = {"mlp_act": 128, "mlp_out": 64, "resid": 64}
    entries = {}
    for layer in range(2):
        for site in sites:
            w = widths[site]
            entries[(layer, site)] = rng.choice(w, size=int(w * frac), replace=False)
    return NeuronSet.for_model(model, entries, method=f"random{seed}")


def _triples(ns):
    return set(ns)


# ------------------------------------------------------------------ round trips
def test_json_roundtrip(llama, tmp_path):
    ns = _random_set(llama, 0, sites=("mlp_act", "mlp_out"))
    path = ns.save(tmp_path / "ns.json")
    obj = json.loads(path.read_text())
    assert obj["format"] == FORMAT and obj["meta"]["model_id"] == "tiny-llama"
    back = NeuronSet.load(path)
    assert back == ns and back.meta == ns.meta


def test_loki_roundtrip(llama, tmp_path):
    ns = _random_set(llama, 1, sites=("mlp_out",))
    back = neuronset_from_loki(neuronset_to_loki(ns, tmp_path / "pos.json"), model=llama)
    assert back == ns
    assert neuronset_from_loki(tmp_path / "pos.json", model=llama) == ns


def test_fnsft_roundtrip(llama, tmp_path):
    ns = _random_set(llama, 2, sites=("mlp_act",))
    neuronset_to_fnsft(ns, tmp_path / "tpl.json")
    assert neuronset_from_fnsft(tmp_path / "tpl.json", model=llama) == ns


def test_load_errors(tmp_path):
    with pytest.raises(NNError, match="does not exist"):
        NeuronSet.load(tmp_path / "none.json")
    (tmp_path / "loki.json").write_text("[[1], [2]]")
    with pytest.raises(NNError, match="nn_core.select.formats"):
        NeuronSet.load(tmp_path / "loki.json")


# ------------------------------------------------------------------ algebra laws
@pytest.fixture
def abc(llama):
    return tuple(_random_set(llama, s, sites=("mlp_act", "mlp_out")) for s in (10, 11, 12))


def test_algebra_matches_python_sets(abc):
    a, b, _ = abc
    assert _triples(a | b) == _triples(a) | _triples(b)
    assert _triples(a & b) == _triples(a) & _triples(b)
    assert _triples(a - b) == _triples(a) - _triples(b)
    assert _triples(a ^ b) == _triples(a) ^ _triples(b)


def test_commutativity_and_associativity(abc):
    a, b, c = abc
    assert a | b == b | a and a & b == b & a and a ^ b == b ^ a
    assert (a | b) | c == a | (b | c)
    assert (a & b) & c == a & (b & c)
    assert (a ^ b) ^ c == a ^ (b ^ c)


def test_de_morgan_and_difference_via_complement(abc):
    a, b, _ = abc
    assert (a | b).complement() == a.complement() & b.complement()
    assert (a & b).complement() == a.complement() | b.complement()
    assert a - b == a & b.complement()
    assert a.complement().complement() == a
    assert len(a) + len(a.complement()) == 2 * (128 + 64)


def test_jaccard_properties(abc):
    a, b, _ = abc
    assert a.jaccard(a) == 1.0
    assert a.jaccard(b) == pytest.approx(b.jaccard(a))
    assert 0.0 <= a.jaccard(b) <= 1.0
    assert a.jaccard(a.complement()) == 0.0
    assert a.jaccard(b) == pytest.approx(len(a & b) / len(a | b))


def test_random_like_keeps_per_layer_counts(abc):
    a, _, _ = abc
    r = a.random_like(seed=3)
    assert r.counts() == a.counts()
    assert r.layer_counts("mlp_act") == a.layer_counts("mlp_act")
    assert r != a
    assert r == a.random_like(seed=3)
    assert r.meta["parameters"] == {"seed": 3, "of": a.meta["method"]}


# ------------------------------------------------------------------ validation
def test_validation_errors(llama, tiny_models):
    gpt2 = tiny_models("gpt2")[0]
    ns = _random_set(llama, 4)
    with pytest.raises(NNError, match="tiny-llama"):
        ns.validate(gpt2)  # other model
    three_layers = NeuronSet({(2, "mlp_act"): [1]}, {"num_layers": 3})
    with pytest.raises(NNError, match="3-layer"):
        three_layers.validate(llama)  # wrong layer count
    with pytest.raises(NNError, match="out of range"):
        NeuronSet({(0, "mlp_out"): [64]}).validate(llama)  # index past the width
    with pytest.raises(NNError, match="out of range"):
        NeuronSet({(5, "mlp_act"): [0]}).validate(llama)
    with pytest.raises(NNError, match="different models"):
        _ = ns | NeuronSet({(0, "mlp_act"): [1]}, {"num_layers": 7})


# ------------------------------------------------------------------ files and scope
def _file(tmp_path, neurons, meta):
    import json

    path = tmp_path / "sel.json"
    obj = {"format": "nn.neuronset/1", "neurons": neurons}
    if meta is not None:
        obj["meta"] = meta
    path.write_text(json.dumps(obj))
    return path


def test_file_with_duplicate_indices_is_refused(tmp_path, capsys):
    from nn_core.cli import main as core_main

    path = _file(tmp_path, {"0.mlp_act": [3, 1, 3]}, {"num_layers": 2})
    with pytest.raises(NNError, match=r"lists index\(es\) \[3\] more than once"):
        NeuronSet.load(path)
    assert core_main(["neurons", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than once" in err


@pytest.mark.parametrize("meta", [None, {}, {"method": "ica"}])
def test_file_without_model_meta_is_refused(tmp_path, meta, capsys):
    from nn_core.cli import main as core_main

    path = _file(tmp_path, {"0.mlp_act": [1]}, meta)
    with pytest.raises(NNError, match="no 'meta' naming the model"):
        NeuronSet.load(path)
    assert core_main(["neurons", "info", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_scope_is_part_of_equality_and_hash():
    base = {(0, "mlp_act"): [1, 2]}
    a = NeuronSet(base, {"num_layers": 2})
    b = NeuronSet(base, {"num_layers": 2, "sites": ["mlp_act", "mlp_out"]})
    c = NeuronSet(base, {"num_layers": 2, "layers": [0]})
    assert a.scope == (("mlp_act",), None)
    assert b.scope == (("mlp_act", "mlp_out"), None) and c.scope == (("mlp_act",), (0,))
    assert a != b and a != c and b != c
    assert len({a, b, c, NeuronSet(base, {"num_layers": 2, "method": "other"})}) == 3
    assert a == NeuronSet({(0, "mlp_act"): [2, 1]}, {"num_layers": 2, "method": "x"})


def test_algebra_takes_the_union_of_scopes():
    a = NeuronSet({(0, "mlp_act"): [1, 2]}, {"num_layers": 3, "layers": [0]})
    b = NeuronSet({(1, "mlp_out"): [5]}, {"num_layers": 3, "layers": [1]})
    for r in (a | b, a & b, a - b, a ^ b):
        assert r.scope == (("mlp_act", "mlp_out"), (0, 1))
    everywhere = NeuronSet({(2, "mlp_act"): [0]}, {"num_layers": 3})
    assert (a - everywhere).scope == (("mlp_act",), None)
    assert (a - b) == a.with_meta(sites=["mlp_act", "mlp_out"], layers=[0, 1])
