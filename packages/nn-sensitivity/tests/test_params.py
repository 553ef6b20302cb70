from __future__ import annotations

import pytest

from nn_core.errors import NNError
from nn_core.model.loading import load_model
from nn_sensitivity.params import eligible_params, parse_layers


def test_default_is_every_2d_weight_in_decoder_blocks(llama):
    model, _ = llama
    infos = eligible_params(model)
    names = {i.name for i in infos}
    expected = {n for n, p in model.named_parameters()
                if p.ndim == 2 and n.startswith("model.layers.")}
    assert names == expected
    assert all(i.layer in (0, 1) and i.kind == "linear" for i in infos)


def test_embeddings_and_head_only_by_flag(llama):
    model, _ = llama
    names = {i.name for i in eligible_params(model, include_embeddings=True)}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    names = {i.name for i in eligible_params(model, include_lm_head=True)}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    kinds = {i.name: i.kind for i in eligible_params(model, include_embeddings=True)}
    assert kinds["model.embed_tokens.weight"] == "embedding"


def test_gpt2_conv1d_kind(gpt2):
    model, _ = gpt2
    infos = {i.name: i for i in eligible_params(model)}
    info = infos["transformer.h.0.mlp.c_proj.weight"]
    assert info.kind == "conv1d" and info.input_dim == 0 and info.shape == (128, 64)


def _twelve_layer_llama():
    """tiny-llama grown to 12 blocks, so that layers.1 and layers.10/11 all exist."""
    import copy

    model, _ = load_model("tiny-llama", device="cpu")
    for _ in range(10):
        model.model.layers.append(copy.deepcopy(model.model.layers[0]))
    model.config.num_hidden_layers = 12
    object.__setattr__(model, "_nn_adapter", None)  # re-resolve the adapter
    return model


def test_module_filter_is_exact_on_path_components():
    model, _ = load_model("tiny-llama", device="cpu")
    big = _twelve_layer_llama()
    names = {i.name for i in eligible_params(big, modules="layers.1")}
    assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)
    assert not any(n.startswith(("model.layers.10.", "model.layers.11.")) for n in names)
    names = {i.name for i in eligible_params(big, layers=[1])}
    assert names == {i.name for i in eligible_params(big, modules="layers.1")}
    assert {i.layer for i in eligible_params(big, layers="10-11")} == {10, 11}
    # a partial component never matches
    with pytest.raises(NNError, match="select no weights"):
        eligible_params(model, modules="proj")
    down = eligible_params(model, modules="down_proj")
    assert [i.name for i in down] == ["model.layers.0.mlp.down_proj.weight",
                                      "model.layers.1.mlp.down_proj.weight"]
    assert len(eligible_params(model, modules="mlp.down_proj,self_attn.q_proj")) == 4


def test_layer_ranges():
    assert parse_layers("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_layers(None) is None
    with pytest.raises(NNError, match="bad layer range"):
        parse_layers("3-1")


def test_empty_filters_raise(llama):
    model, _ = llama
    with pytest.raises(NNError, match="select no weights"):
        eligible_params(model, modules="no_such_module")
    with pytest.raises(NNError, match="out of range"):
        eligible_params(model, layers="5")


def test_tied_lm_head_needs_include_embeddings_and_is_scored_once():
    model, _ = load_model("tiny-llama", device="cpu", dtype="float32")
    untied = {i.name for i in eligible_params(model, include_lm_head=True)}
    assert "lm_head.weight" in untied  # the untied model keeps its separate head
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as tie_word_embeddings does
    with pytest.raises(NNError, match="LM head is tied to the embeddings.*--include-embeddings"):
        eligible_params(model, include_lm_head=True)
    infos = eligible_params(model, include_lm_head=True, include_embeddings=True)
    shared = [i for i in infos if i.layer is None]
    assert len(shared) == 1
    assert shared[0].name == "model.embed_tokens.weight" and shared[0].kind == "embedding"
    assert shared[0].module == "model.embed_tokens"
