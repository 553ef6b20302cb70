"""WeightMaskCallback under gradient accumulation and across a resume from a checkpoint:
frozen entries stay bit-identical to the weights training started from."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from nn_core.data import Example
from nn_core.intervene.masks import WeightMask
from nn_core.model.adapters import get_adapter
from nn_core.model.loading import load_model
from nn_core.train import SFTConfig, WeightMaskCallback, build_trainer, train

EXAMPLES = [Example(f"Add {i} and {i + 1}.", f"The sum is {2 * i + 1}.") for i in range(12)]


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), method="full", trainable_modules=["mlp.down_proj"],
                batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-2, weight_decay=0.5,
                save_steps=100, logging_steps=1)
    return SFTConfig(**{**base, **kw})


def frozen_cols(shape) -> torch.Tensor:
    frozen = torch.zeros(shape, dtype=torch.bool)
    frozen[:, ::3] = True  # every third input column of the down-projection
    return frozen


def masked_trainer(model, tok, config, name, frozen, steps: list):
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            steps.append(state.global_step)

    holder = {}

    def build():
        return WeightMask(holder["trainer"].model, {name: ~frozen})

    holder["trainer"] = build_trainer(model, tok, EXAMPLES, config,
                                      callbacks=[WeightMaskCallback(build), CountSteps()])
    return holder["trainer"]


def test_gradient_accumulation_keeps_frozen_entries_bit_identical(tmp_path):
    model, tok = load_model("tiny-llama")
    name = get_adapter(model).down_weight_name(0)
    before = dict(model.named_parameters())[name].detach().clone()
    frozen = frozen_cols(before.shape)
    steps: list = []
    res = train(masked_trainer(model, tok, cfg(tmp_path, max_steps=3), name, frozen, steps),
                cfg(tmp_path, max_steps=3), resume=False)
    assert res.global_step == 3
    assert len(steps) == 3  # one optimizer step (and one write-back) per 2 micro-batches
    after = dict(res.model.named_parameters())[name].detach()
    assert torch.equal(after[frozen], before[frozen])  # zero grad + weight decay undone
    assert not torch.equal(after[~frozen], before[~frozen])


def test_resume_keeps_the_checkpoints_frozen_entries(tmp_path):
    """The mask is built after the checkpoint is loaded: frozen entries stay equal to the
    checkpoint's weights, not to the freshly loaded (differently initialised) model's."""
    from safetensors.torch import load_file

    model, tok = load_model("tiny-llama", seed=0)
    name = get_adapter(model).down_weight_name(1)
    frozen = frozen_cols(dict(model.named_parameters())[name].shape)
    first = cfg(tmp_path, max_steps=2, save_steps=1)
    train(masked_trainer(model, tok, first, name, frozen, []), first)
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))[name]

    fresh, tok = load_model("tiny-llama", seed=1)
    start = dict(fresh.named_parameters())[name].detach().clone()
    assert not torch.equal(start[frozen], saved[frozen])  # the resumed weights must come from the checkpoint
    steps: list = []
    second = cfg(tmp_path, max_steps=4, save_steps=1)
    res = train(masked_trainer(fresh, tok, second, name, frozen, steps), second)
    assert res.resumed_from is not None and res.resumed_from.endswith("checkpoint-2")
    assert res.global_step == 4 and len(steps) == 2
    after = dict(res.model.named_parameters())[name].detach()
    assert torch.equal(after[frozen], saved[frozen])
    assert not torch.equal(after[~frozen], saved[~frozen])
