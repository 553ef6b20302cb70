"""LoKI on models loaded with ``device_map`` (accelerate): ``device_map="auto"`` (on a
CPU-only machine every module maps to the CPU) works through create -> forward -> AdamW
steps -> restore, a LoKI folder loaded that way is split again by nn-core's config hook, and
an offloaded model is refused in one line before anything is replaced."""

from __future__ import annotations

import json

import pytest
import torch

from nn_core.device import input_device
from nn_core.errors import NNError
from nn_core.intervene.surgery import SplitLinear, apply_loki_config, split_modules
from nn_core.model.loading import load_model
from nn_kva_loki.loki import create_loki, is_loki, restore, save_loki

POSITIONS = [[1, 5, 9], [0, 63]]


@pytest.fixture
def folder(tmp_path):
    model, tok = load_model("tiny-llama", device="cpu")
    path = tmp_path / "plain"
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _auto(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map="auto", dtype=torch.float32)


def test_device_map_auto_create_train_restore(folder):
    ref = load_model(str(folder), device="cpu")[0]
    model = _auto(folder)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    dev = input_device(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    create_loki(model, POSITIONS)
    assert all(m.frozen.device == dev for m in split_modules(model).values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids.to(dev)).logits, ref(input_ids=ids).logits)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(input_ids=ids.to(dev), labels=ids.to(dev)).loss.backward()
        opt.step()
        opt.zero_grad()
    restore(model)
    sd = model.state_dict()
    assert list(sd) == list(sd0)
    for name, w0 in sd0.items():
        if name.endswith("mlp.down_proj.weight"):
            rows = torch.zeros(w0.shape[0], dtype=torch.bool)
            rows[POSITIONS[int(name.split(".")[2])]] = True
            assert torch.equal(sd[name][~rows], w0[~rows]) and not torch.equal(sd[name][rows], w0[rows])
        else:
            assert torch.equal(sd[name], w0), name


def test_loki_folder_loaded_with_device_map_auto_splits_again(folder, tmp_path):
    model, tok = load_model(str(folder), device="cpu")
    create_loki(model, POSITIONS)
    out = save_loki(model, tmp_path / "loki", tok)
    assert json.loads((out / "config.json").read_text())["target_pos"] == POSITIONS
    auto = _auto(out)  # transformers alone loads the plain model...
    assert not split_modules(auto)
    splits = apply_loki_config(auto)  # ...nn-core's config hook re-applies the split
    assert sorted(splits) == [0, 1] and is_loki(auto)
    assert [s.index.tolist() for s in splits.values()] == POSITIONS
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, model(input_ids=ids).logits)


def test_offloaded_model_is_refused_before_any_change(folder):
    from accelerate import cpu_offload

    model = load_model(str(folder), device="cpu")[0]
    cpu_offload(model, execution_device=torch.device("cpu"))  # weights on meta, loaded per forward
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(NNError, match=r"offloaded .* load the model without offloading") as info:
        create_loki(model, POSITIONS)
    assert "\n" not in str(info.value)
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
