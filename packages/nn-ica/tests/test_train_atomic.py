"""nn-ica train: adapter, mask.json and manifest.json arrive as one unit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nn_core.data import Example
from nn_core.model.adapters import model_signature
from nn_core.model.loading import load_model
from nn_core.select.neuronset import NeuronSet
from nn_core.train import SFTConfig
from nn_ica.templates import Component, Templates
from nn_ica.train import masked_finetune

EXAMPLES = [Example(f"Add {i} and {i + 1}.", f"The sum is {2 * i + 1}.") for i in range(8)]


def _setup(tmp_path):
    model, tok = load_model("tiny-llama")
    t = Templates({**model_signature(model), "site": "mlp_act"},
                  [Component(0, {0: np.array([0, 3]), 1: np.array([5])}, variance=0.1)])
    config = SFTConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, save_steps=100, logging_steps=1)
    return model, tok, t, config


def test_a_failing_mask_save_leaves_no_adapter(tmp_path, monkeypatch):
    model, tok, t, config = _setup(tmp_path)

    def boom(self, path):
        raise RuntimeError("killed while saving the mask")

    monkeypatch.setattr(NeuronSet, "save", boom)
    with pytest.raises(RuntimeError, match="killed while saving the mask"):
        masked_finetune(model, tok, EXAMPLES, t, [0], config)
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "mask.json").exists()


def test_adapter_folder_holds_mask_and_manifest(tmp_path):
    model, tok, t, config = _setup(tmp_path)
    res = masked_finetune(model, tok, EXAMPLES, t, [0], config)
    for name in ("mask.json", "manifest.json", "train_log.json"):
        assert (res.saved / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert len(NeuronSet.load(res.saved / "mask.json")) == 3
    manifest = json.loads((res.saved / "manifest.json").read_text())
    assert "adapter/mask.json" in {row["path"] for row in manifest["outputs"]}
    assert manifest["extra"]["ica"]["components"] == [0]
