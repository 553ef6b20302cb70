"""ModelAdapter.embedding / final_norm / lm_head: each is the module whose output feeds the
next stage of the forward pass."""

from __future__ import annotations

import pytest
import torch

from nn_core.intervene.hooks import hooked
from nn_core.model.adapters import ARCHITECTURES, get_adapter, invalidate_adapter
from nn_core.model.loading import load_model


def _softcap(model, logits):
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def test_embedding_output_drives_the_model(tiny_models, batch, arch):
    model, _ = tiny_models(arch)
    ad = get_adapter(model)
    b = batch(arch)
    emb = ad.embedding()
    assert model.get_submodule(ad.embedding_path()) is emb
    with torch.no_grad():
        ref = model(**b).logits
        via_embeds = model(inputs_embeds=emb(b["input_ids"]), attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(via_embeds, ref, rtol=0, atol=1e-5)
    # a different embedding output gives different logits (the test can fail)
    with torch.no_grad():
        other = model(inputs_embeds=emb(b["input_ids"]).flip(0), attention_mask=b["attention_mask"]).logits
    assert not torch.allclose(other, ref, atol=1e-3)


def test_lm_head_of_final_norm_of_last_block_is_the_logits(tiny_models, batch, arch):
    model, _ = tiny_models(arch)
    ad = get_adapter(model)
    norm, head = ad.final_norm(), ad.lm_head()
    assert model.get_submodule(ad.final_norm_path()) is norm
    assert model.get_submodule(ad.lm_head_path()) is head
    assert head.weight.shape[0] == model.config.vocab_size
    b = batch(arch)
    seen = {}
    handle = norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach().clone()))
    try:
        with torch.no_grad(), hooked(model, {(ad.num_layers - 1, "resid"): lambda x: seen.__setitem__("r", x.detach().clone())}):
            logits = model(**b).logits
    finally:
        handle.remove()
    # the final norm reads the last block's output ...
    torch.testing.assert_close(seen["h"], seen["r"], rtol=0, atol=0)
    # ... and the head of its output are the logits
    with torch.no_grad():
        again = _softcap(model, head(norm(seen["h"])))
        skipped = _softcap(model, head(seen["h"]))
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(skipped, logits, atol=1e-3)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "gpt_neox", "opt"])
def test_structural_fallback_finds_the_same_modules(arch_name):
    model, _ = load_model(f"tiny-{arch_name}")
    reg = get_adapter(model)
    expect = (reg.embedding_path(), reg.final_norm_path(), reg.lm_head_path())
    backup = dict(ARCHITECTURES)
    try:
        ARCHITECTURES.pop(arch_name)
        invalidate_adapter(model)
        ad = get_adapter(model)
        assert ad.source == "structural"
        assert (ad.embedding_path(), ad.final_norm_path(), ad.lm_head_path()) == expect
    finally:
        ARCHITECTURES.clear()
        ARCHITECTURES.update(backup)
        invalidate_adapter(model)
    assert expect[1] in {"model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                         "model.decoder.final_layer_norm"}


def test_invalidate_adapter_forces_a_fresh_resolution(tiny_models):
    model, _ = tiny_models("llama")
    first = get_adapter(model)
    assert get_adapter(model) is first
    invalidate_adapter(model)
    assert get_adapter(model) is not first
