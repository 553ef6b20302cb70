"""``load_model(device_map=...)`` / ``--device map``: a model spread by accelerate's planner.

This machine has no GPU, so every map lands on the CPU; the tests prove the plumbing (the
map is applied and recorded, nothing is moved afterwards, inputs go to the embedding's
device, hooks and logits are unchanged), not placement across several devices.
"""

from __future__ import annotations

import pytest
import torch

from nn_core import load_model
from nn_core.device import input_device, resolve_device
from nn_core.errors import NNError


def _logits(model, tok):
    ids = tok("the quick brown fox", return_tensors="pt").input_ids.to(input_device(model))
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def test_device_map_on_a_local_folder(tmp_path, monkeypatch):
    import transformers

    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["device_map"] = kwargs.get("device_map")
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    mapped, tok2 = load_model(str(tmp_path), device_map="auto")
    assert seen["device_map"] == "auto"  # transformers (and accelerate) place the weights
    assert torch.equal(_logits(mapped, tok2), _logits(model, tok))
    load_model(str(tmp_path), device="map")
    assert seen["device_map"] == "auto"
    load_model(str(tmp_path))
    assert seen["device_map"] is None


def test_device_map_on_a_tiny_model_and_the_map_shorthand():
    plain, tok = load_model("tiny-qwen2", seed=3)
    mapped, _ = load_model("tiny-qwen2", seed=3, device="map")
    assert isinstance(mapped.hf_device_map, dict) and mapped.hf_device_map
    assert input_device(mapped) == torch.device("cpu")
    assert torch.equal(_logits(mapped, tok), _logits(plain, tok))


def test_explicit_map_and_bad_map():
    model, _ = load_model("tiny-llama", device_map={"": "cpu"})
    assert model.hf_device_map == {"": "cpu"}
    with pytest.raises(NNError, match="unknown device_map 'everywhere'"):
        load_model("tiny-llama", device_map="everywhere")


def test_map_resolves_like_auto():
    assert resolve_device("map") == resolve_device("auto")
