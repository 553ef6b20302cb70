from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.masks import mask_neurons
from nn_core.model.adapters import get_adapter
from nn_core.model.loading import load_model
from nn_core.select.weightset import FORMAT, WeightSet, sample_indices


@pytest.fixture
def llama(tiny_models):
    return tiny_models("llama")[0]


@pytest.fixture
def gpt2(tiny_models):
    return tiny_models("gpt2")[0]


def _down(model, layer=0):
    return get_adapter(model).down_weight_name(layer)


def _random_ws(model, seed, k=40, with_scores=True):
    """A set over two down-projections and one attention weight, with scores."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    names = [_down(model, 0), _down(model, 1), "model.layers.0.self_attn.q_proj.weight"]
    entries = {n: rng.choice(params[n].numel(), size=k, replace=False) for n in names}
    scores = {n: rng.random(k).astype(np.float32) for n in names} if with_scores else None
    return WeightSet.for_model(model, entries, scores, method=f"test{seed}")


def _as_sets(ws):
    return {(n, int(i)) for n, idx in ws.items() for i in idx.tolist()}


# ------------------------------------------------------------------ construction
def test_for_model_sorts_dedupes_and_keeps_scores_aligned(llama):
    name = _down(llama)
    ws = WeightSet.for_model(llama, {name: [9, 2, 9, 5]}, {name: [0.9, 0.2, 0.0, 0.5]}, method="m")
    assert ws.indices(name).tolist() == [2, 5, 9]
    # the first occurrence of a duplicate keeps its score
    assert ws.scores(name).tolist() == pytest.approx([0.2, 0.5, 0.9])
    assert ws.meta["shapes"][name] == list(dict(llama.named_parameters())[name].shape)
    assert ws.meta["model_type"] == "llama" and ws.meta["num_layers"] == 2
    assert ws.meta["method"] == "m" and "created_at" in ws.meta
    assert len(ws) == 3 and ws.counts() == {name: 3}


def test_bad_inputs_raise(llama):
    name = _down(llama)
    with pytest.raises(NNError, match="does not exist"):
        WeightSet.for_model(llama, {"model.layers.9.mlp.nope.weight": [1]})
    with pytest.raises(NNError, match="negative"):
        WeightSet.for_model(llama, {name: [-1, 3]})
    with pytest.raises(NNError, match="integers"):
        WeightSet.for_model(llama, {name: [1.5]})
    with pytest.raises(NNError, match="one score per index"):
        WeightSet.for_model(llama, {name: [1, 2]}, {name: [0.1]})
    numel = dict(llama.named_parameters())[name].numel()
    with pytest.raises(NNError, match="out of range"):
        WeightSet.for_model(llama, {name: [numel]})


# ------------------------------------------------------------------ validation
def test_validate_errors_name_the_problem(llama, gpt2):
    name = _down(llama)
    numel = dict(llama.named_parameters())[name].numel()
    # index out of range without recorded shapes: caught by validate
    bare = WeightSet({name: [numel + 3]})
    with pytest.raises(NNError, match="out of range"):
        bare.validate(llama)
    # recorded shape differs from the model's
    lying = WeightSet({name: [1]}, {"shapes": {name: [3, 3]}})
    with pytest.raises(NNError, match="shape"):
        lying.validate(llama)
    # unknown parameter name
    with pytest.raises(NNError, match="does not exist"):
        WeightSet({"not.a.param": [0]}).validate(llama)
    # made for another model
    ws = _random_ws(llama, 0)
    with pytest.raises(NNError, match="tiny-llama"):
        ws.validate(gpt2)
    # same architecture under another id: refused unless check_id=False
    other, _ = load_model("tiny-llama", device="cpu", seed=1)
    other.config.name_or_path = "elsewhere/llama"
    with pytest.raises(NNError, match="check_id=False"):
        ws.validate(other)
    assert ws.validate(other, check_id=False) is ws


def test_wrapped_names_get_a_hint(llama):
    with pytest.raises(NNError, match="this model has 'model.layers.0"):
        WeightSet({"base_model.model.model.layers.0.mlp.down_proj.weight": [0]}).validate(llama)


# ------------------------------------------------------------------ algebra
@pytest.mark.parametrize("op", ["|", "&", "-", "^"])
def test_algebra_matches_python_sets(llama, op):
    a, b = _random_ws(llama, 1, k=60), _random_ws(llama, 2, k=60)
    f = {"|": lambda x, y: x | y, "&": lambda x, y: x & y,
         "-": lambda x, y: x - y, "^": lambda x, y: x ^ y}[op]
    got = f(a, b)
    assert _as_sets(got) == f(_as_sets(a), _as_sets(b))
    for name in got.names():
        idx = got.indices(name)
        assert torch.all(idx[1:] > idx[:-1])  # sorted, unique


def test_algebra_laws(llama):
    a, b, c = (_random_ws(llama, s, k=50) for s in (3, 4, 5))
    assert a | b == b | a and a & b == b & a and a ^ b == b ^ a
    assert (a | b) | c == a | (b | c)
    assert (a & b) & c == a & (b & c)
    assert a - b == a - (a & b)
    assert a ^ b == (a | b) - (a & b)
    assert a & (b | c) == (a & b) | (a & c)
    assert len(a | b) == len(a) + len(b) - len(a & b)


def test_scores_follow_the_left_operand(llama):
    name = _down(llama)
    a = WeightSet.for_model(llama, {name: [1, 2, 3]}, {name: [0.1, 0.2, 0.3]})
    b = WeightSet.for_model(llama, {name: [3, 4]}, {name: [9.0, 0.4]})
    plain = WeightSet.for_model(llama, {name: [3, 5]})
    u = a | b
    assert u.indices(name).tolist() == [1, 2, 3, 4]
    assert u.scores(name).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])  # 3 keeps a's score
    assert (b | a).scores(name).tolist() == pytest.approx([0.1, 0.2, 9.0, 0.4])
    assert (a & b).scores(name).tolist() == pytest.approx([0.3])
    assert (a - b).scores(name).tolist() == pytest.approx([0.1, 0.2])
    assert (a ^ b).scores(name).tolist() == pytest.approx([0.1, 0.2, 0.4])
    # an unscored left operand takes the right's scores; indices nobody scored get NaN
    mixed = (plain | b).scores(name).numpy()
    assert (plain | b).indices(name).tolist() == [3, 4, 5]
    assert mixed[0] == pytest.approx(9.0) and mixed[1] == pytest.approx(0.4) and np.isnan(mixed[2])
    assert (plain & a).scores(name).tolist() == pytest.approx([0.3])
    assert (plain - a).scores(name) is None


def test_combining_different_models_fails(llama, gpt2):
    with pytest.raises(NNError, match="different models"):
        _ = _random_ws(llama, 0) | WeightSet.for_model(gpt2, {_down(gpt2): [1]})


def test_jaccard(llama):
    a, b = _random_ws(llama, 6), _random_ws(llama, 7)
    assert a.jaccard(a) == 1.0
    assert a.jaccard(b) == pytest.approx(b.jaccard(a))
    assert a.jaccard(b) == pytest.approx(len(a & b) / len(a | b))
    assert (a - b).jaccard(b - a) == 0.0
    assert WeightSet().jaccard(WeightSet()) == 1.0


def test_counts_per_layer(llama):
    ws = _random_ws(llama, 8, k=30)
    # layer 0 holds the q_proj and layer-0 down-proj entries
    assert ws.layer_counts() == {0: 60, 1: 30}
    emb = WeightSet.for_model(llama, {"model.embed_tokens.weight": [0, 1]})
    assert emb.layer_counts() == {}
    assert emb.counts() == {"model.embed_tokens.weight": 2}


def test_random_like_keeps_counts_and_differs(llama):
    ws = _random_ws(llama, 9, k=200)
    r = ws.random_like(seed=0)
    assert r.counts() == ws.counts()
    assert r != ws and r.jaccard(ws) < 0.5
    assert r == ws.random_like(seed=0) and r != ws.random_like(seed=1)
    assert r.meta["method"] == "random_like" and r.meta["parameters"]["of"] == "test9"
    r.validate(llama)


def test_sample_indices_is_uniform_and_exact():
    rng = np.random.default_rng(0)
    for n, k in [(10, 0), (10, 10), (1000, 3), (1000, 999), (10**9, 10**4)]:
        s = sample_indices(rng, n, k)
        assert s.size == k and (k == 0 or (s[0] >= 0 and s[-1] < n))
        assert np.all(np.diff(s) > 0)
    # every element equally likely: 20 000 draws of 5 out of 20, each element ~5000 times
    hits = np.zeros(20)
    for _ in range(20_000):
        hits[sample_indices(rng, 20, 5)] += 1
    assert np.abs(hits - 5000).max() < 5 * np.sqrt(5000)
    with pytest.raises(NNError):
        sample_indices(rng, 5, 6)


def test_dense_mask(gpt2):
    name = _down(gpt2)
    ws = WeightSet.for_model(gpt2, {name: [0, 65]})
    mask = ws.dense_mask(name)
    shape = dict(gpt2.named_parameters())[name].shape
    assert mask.shape == shape and int(mask.sum()) == 2
    assert mask[0, 0] and mask[1, 1]  # flat 65 in a (128, 64) weight is row 1, column 1


# ------------------------------------------------------------------ I/O
def test_save_load_roundtrip(llama, tmp_path):
    ws = _random_ws(llama, 10)
    path = ws.save(tmp_path / "sel.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["sel.safetensors"]  # no temp files left
    back = WeightSet.load(path)
    assert back == ws and back.meta == ws.meta
    for name in ws.names():
        assert torch.equal(back.scores(name), ws.scores(name))
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert f.metadata()["format"] == FORMAT
        assert json.loads(f.metadata()["nn.meta"])["model_id"] == "tiny-llama"
    unscored = _random_ws(llama, 11, with_scores=False)
    assert not WeightSet.load(unscored.save(tmp_path / "u.safetensors")).has_scores
    assert len(WeightSet.load(WeightSet().save(tmp_path / "empty.safetensors"))) == 0


def test_load_errors(tmp_path):
    with pytest.raises(NNError, match="does not exist"):
        WeightSet.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "x.safetensors"
    bad.write_text('{"format": "nn.neuronset/1"}')
    with pytest.raises(NNError, match="safetensors"):
        WeightSet.load(bad)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(NNError, match="not a WeightSet file"):
        WeightSet.load(tmp_path / "model.safetensors")


# ------------------------------------------------------------------ to NeuronSet
def _channel_entries(model, layer, channels, by):
    """Flat indices of every weight of the given down-projection channels, by the math:
    Linear y = x W^T stores W as (out, in); GPT-2 Conv1D y = x W stores it as (in, out)."""
    w = get_adapter(model).down_weight(layer)
    mask = torch.zeros_like(w, dtype=torch.bool)
    conv = get_adapter(model).conv1d
    input_dim = 0 if conv else 1
    dim = input_dim if by == "columns" else 1 - input_dim
    for c in channels:
        mask.select(dim, c).fill_(True)
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("by", ["columns", "rows"])
def test_to_neuronset_maps_channels(arch, by, request):
    model = request.getfixturevalue(arch)
    chans = [3, 17, 40]
    ws = WeightSet.for_model(model, {_down(model, 1): _channel_entries(model, 1, chans, by)},
                             method="m")
    ns = ws.to_neuronset(model, by=by)
    site = "mlp_act" if by == "columns" else "mlp_out"
    assert ns.sites == (site,)
    assert ns.indices(1, site).tolist() == chans and ns.indices(0, site).numel() == 0
    assert ns.meta["method"] == "weightset:m"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zeroing_selected_columns_equals_lesioning_their_neurons(arch, request):
    """The functional meaning of by="columns": zeroing every weight of mlp_act channel c
    in the down-projection is the same as lesioning neuron (layer, mlp_act, c)."""
    model = request.getfixturevalue(arch)
    entries = {_down(model, i): _channel_entries(model, i, [i + 2, 50], "columns") for i in (0, 1)}
    ws = WeightSet.for_model(model, entries)
    ns = ws.to_neuronset(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mask_neurons(model, ns, "lesion"):
        lesioned = model(input_ids=ids).logits
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in ws.names()}
    try:
        with torch.no_grad():
            for n in ws.names():
                params[n][ws.dense_mask(n)] = 0.0
            zeroed = model(input_ids=ids).logits
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
    torch.testing.assert_close(zeroed, lesioned, rtol=1e-5, atol=1e-6)


def test_to_neuronset_min_count_and_skips(llama):
    name = _down(llama, 0)
    cols = 128  # (hidden 64, intermediate 128): flat = row * 128 + column
    entries = {name: [0 * cols + 3, 1 * cols + 3, 5 * cols + 9],
               "model.layers.0.self_attn.q_proj.weight": [0, 1, 2, 3]}
    ws = WeightSet.for_model(llama, entries)
    assert ws.to_neuronset(llama).indices(0, "mlp_act").tolist() == [3, 9]
    ns = ws.to_neuronset(llama, min_count=2)
    assert ns.indices(0, "mlp_act").tolist() == [3]
    assert ns.meta["parameters"]["skipped"] == {"parameters": 1, "weights": 4}
    assert ws.to_neuronset(llama, by="rows").indices(0, "mlp_out").tolist() == [0, 1, 5]
    with pytest.raises(NNError, match="by="):
        ws.to_neuronset(llama, by="diagonal")
    with pytest.raises(NNError, match="min_count"):
        ws.to_neuronset(llama, min_count=0)


def test_large_set_stays_vectorised():
    """Two million indices: algebra and I/O agree with numpy references."""
    rng = np.random.default_rng(1)
    shape = [4096, 1024]
    a = WeightSet({"w": sample_indices(rng, 4096 * 1024, 2_000_000)}, {"shapes": {"w": shape}})
    b = a.random_like(2)
    inter = np.intersect1d(a.indices_numpy("w"), b.indices_numpy("w"), assume_unique=True)
    assert len(a & b) == inter.size
    assert len(a | b) == 4_000_000 - inter.size
    assert a.jaccard(b) == pytest.approx(inter.size / (4_000_000 - inter.size))
