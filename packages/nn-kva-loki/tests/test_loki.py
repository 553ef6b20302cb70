"""LoKI models: conversion, training invariants, save/load/restore, nn-core on the result."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.masks import mask_neurons
from nn_core.intervene.surgery import SplitLinear, split_modules
from nn_core.model.adapters import get_adapter
from nn_core.model.loading import TINY_ARCHS, load_model
from nn_core.select.neuronset import NeuronSet
from nn_kva_loki.loki import (
    active_parameters,
    count_optimizer_state,
    create_loki,
    is_loki,
    load_loki,
    loki_positions,
    lora_rank_for_budget,
    resolve_positions,
    restore,
    save_loki,
)


def _positions(model, every=7, offset=0):
    ad = get_adapter(model)
    return [list(range((layer + offset) % every, ad.width("mlp_out"), every)) for layer in range(ad.num_layers)]


def _batch(tok, texts=("hello world, this is nn", "short")):
    return dict(tok(list(texts), return_tensors="pt", padding=True))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_conversion_keeps_logits_and_state(arch):
    model, tok = load_model(f"tiny-{arch}", device="cpu", dtype="float32")
    ref = copy.deepcopy(model)
    sd0 = ref.state_dict()
    create_loki(model, _positions(model))
    assert is_loki(model)
    b = _batch(tok)
    with torch.no_grad():
        diff = (model(**b).logits - ref(**b).logits).abs().max().item()
    assert diff <= 1e-6
    sd = model.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".trainable" in n or ".bias_trainable" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == active_parameters(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adamw_weight_decay_moves_only_active_rows(arch):
    model, tok = load_model(f"tiny-{arch}", device="cpu", dtype="float32")
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    pos = _positions(model, every=5)
    create_loki(model, pos)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    b = _batch(tok)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**b, labels=b["input_ids"]).loss.backward()
        opt.step()
    assert count_optimizer_state(opt) == 2 * active_parameters(model)
    ad = get_adapter(model)
    restore(model)
    sd = model.state_dict()
    for layer in range(ad.num_layers):
        w = ad.down_weight_name(layer)
        rows = torch.zeros(ad.width("mlp_out"), dtype=torch.bool)
        rows[pos[layer]] = True
        dim = 1 if ad.conv1d else 0  # output rows are Conv1D weight columns
        assert torch.equal(sd[w].index_select(dim, (~rows).nonzero().flatten()),
                           sd0[w].index_select(dim, (~rows).nonzero().flatten()))
        assert not torch.equal(sd[w].index_select(dim, rows.nonzero().flatten()),
                               sd0[w].index_select(dim, rows.nonzero().flatten()))
        bias = w[: -len("weight")] + "bias"
        if bias in sd:
            assert torch.equal(sd[bias][~rows], sd0[bias][~rows])
            assert not torch.equal(sd[bias][rows], sd0[bias][rows])
    changed = [k for k in sd0 if not torch.equal(sd[k], sd0[k])]
    assert sorted(changed) == sorted(n for layer in range(ad.num_layers)
                                     for n in [ad.down_weight_name(layer),
                                               ad.down_weight_name(layer)[: -len("weight")] + "bias"] if n in sd0)


def _tied_llama():
    import transformers as T

    from nn_core.model.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, tok


def test_round_trip_is_bit_identical_with_tied_embeddings(tmp_path):
    model, tok = _tied_llama()
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    create_loki(model, _positions(model))
    save_loki(model, tmp_path / "loki", tok)
    cfg = json.loads((tmp_path / "loki" / "config.json").read_text())
    assert cfg["loki_format"] == "nn.loki/1" and cfg["target_pos"] == _positions(model)
    assert (tmp_path / "loki" / "model.safetensors").is_file()
    loaded, _ = load_loki(tmp_path / "loki", device="cpu", dtype="float32")
    assert loki_positions(loaded) == _positions(model)
    # nn-core's loader splits it too, without trust_remote_code
    via_core, _ = load_model(str(tmp_path / "loki"), device="cpu", dtype="float32")
    assert is_loki(via_core)
    restore(loaded)
    assert not split_modules(loaded) and not hasattr(loaded.config, "loki_format")
    sd = loaded.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_nn_core_still_resolves_the_down_projection(arch):
    from nn_core.intervene.capture import capture

    model, tok = load_model(f"tiny-{arch}", device="cpu", dtype="float32")
    ref = copy.deepcopy(model)
    create_loki(model, _positions(model))
    ad = get_adapter(model)
    assert isinstance(ad.down_proj(1), SplitLinear)
    assert ad.width("mlp_out") == get_adapter(ref).width("mlp_out")
    b = _batch(tok)
    sites = [(0, "mlp_act"), (1, "mlp_out")]
    got, want = capture(model, sites, [b]), capture(ref, sites, [b])
    for s in sites:
        assert torch.equal(got[s], want[s])
    lesion = NeuronSet.for_model(model, {(1, "mlp_out"): [0, 3, 9]})
    with torch.no_grad(), mask_neurons(model, lesion), mask_neurons(ref, lesion):
        masked = model(**b).logits
        assert torch.equal(masked, ref(**b).logits)
    with torch.no_grad():
        assert not torch.equal(masked, model(**b).logits)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5), (2, 2, 3, 5)])
def test_any_input_rank(shape):
    model, _ = load_model("tiny-gpt2", device="cpu", dtype="float32")
    ref = copy.deepcopy(model)
    create_loki(model, _positions(model))
    for layer in range(2):
        mod, base = get_adapter(model).down_proj(layer), get_adapter(ref).down_proj(layer)
        x = torch.randn(*shape[:-1], 128)
        assert torch.equal(mod(x), base(x))


def test_resolve_positions_sources(tmp_path):
    model, _ = load_model("tiny-llama")
    ns = NeuronSet.for_model(model, {(0, "mlp_out"): [4, 2], (1, "mlp_out"): [9]})
    assert resolve_positions(model, ns) == [[2, 4], [9]]
    ns.save(tmp_path / "neurons.json")
    assert resolve_positions(model, tmp_path / "neurons.json") == [[2, 4], [9]]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"target_pos": [[1], [0, 5]]}))
    assert resolve_positions(model, tmp_path / "cfg") == [[1], [0, 5]]
    act = NeuronSet.for_model(model, {(0, "mlp_act"): [1]})
    with pytest.raises(NNError, match="mlp_act"):
        resolve_positions(model, act)
    gpt2, _ = load_model("tiny-gpt2")
    with pytest.raises(NNError, match="gpt2"):  # a selection made for another model
        resolve_positions(model, NeuronSet.for_model(gpt2, {(1, "mlp_out"): [63]}))
    three = NeuronSet({(2, "mlp_out"): [1]}, {"sites": ["mlp_out"], "num_layers": 3,
                                              "widths": {"mlp_out": 64}})
    with pytest.raises(NNError):
        resolve_positions(model, three)
    with pytest.raises(NNError, match="already has split layers"):
        create_loki(create_loki(model, [[1], [2]]), [[1], [2]])


def test_lora_rank_for_budget():
    model, _ = load_model("tiny-llama")  # 2 layers x (128 + 64) = 384 parameters per rank
    assert lora_rank_for_budget(model, 640) == (2, 768)
    assert lora_rank_for_budget(model, 500) == (1, 384)
    assert lora_rank_for_budget(model, 10) == (1, 384)
    assert lora_rank_for_budget(model, 384 * 7 + 10) == (7, 384 * 7)
