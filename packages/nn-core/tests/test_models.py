from __future__ import annotations

import json

import pytest
import torch

from nn_core.errors import NNError
from nn_core.model.loading import load_model, tiny_model


def test_tiny_models_are_seeded():
    a, _ = tiny_model("llama", seed=1)
    b, _ = tiny_model("llama", seed=1)
    c, _ = tiny_model("llama", seed=2)
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_tiny_tokenizer_has_chat_template_and_pad(tiny_models):
    _, tok = tiny_models("llama")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok("é").input_ids == list("é".encode())


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path))
    x = tok(["abc def"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**x).logits, again(**x).logits)
    assert again.config.name_or_path == str(tmp_path)


def test_missing_local_path_is_one_line_error(tmp_path):
    with pytest.raises(NNError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(NNError, match="without config.json"):
        load_model(str(tmp_path))


def test_unknown_tiny_arch():
    with pytest.raises(NNError, match="tiny-llama"):
        load_model("tiny-bogus")


def test_unreachable_hub_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(NNError, match="local folder"):
        load_model("someone/definitely-not-cached-model")


def test_quantization_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(NNError, match="CUDA"):
        load_model("someone/model", device="cpu", quantization="4bit")


def test_token_never_in_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(NNError) as exc:
        load_model("someone/private-model")
    assert "hf_secretvalue123" not in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_dtype():
    with pytest.raises(NNError, match="unknown dtype"):
        load_model("tiny-llama", dtype="float8")


def test_dtype_applied():
    model, _ = load_model("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_config_json_keeps_name(tmp_path):
    model, _ = load_model("tiny-opt")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "opt"


def test_input_device_is_the_embeddings_device(tiny_models):
    from torch import nn

    from nn_core.device import input_device

    model, _ = tiny_models("llama")
    assert input_device(model) == model.get_input_embeddings().weight.device
    assert input_device(nn.Module()) == torch.device("cpu")

    class Meta(nn.Module):  # embedding on another device than the first parameter
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(2, 2)
            self.emb = nn.Embedding(3, 2, device="meta")

        def get_input_embeddings(self):
            return self.emb

    assert input_device(Meta()) == torch.device("meta")
