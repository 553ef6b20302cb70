from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from nn_core.data import Example
from nn_core.errors import NNError
from nn_core.intervene.masks import WeightMask, mask_neurons
from nn_core.model.adapters import get_adapter
from nn_core.model.loading import load_model
from nn_core.select.neuronset import NeuronSet
from nn_core.train import (
    SFTConfig,
    WeightMaskCallback,
    base_model,
    build_trainer,
    prepare_model,
    resolve_target_modules,
    train,
)

EXAMPLES = [Example(f"Add {i} and {i + 1}.", f"The sum is {2 * i + 1}.") for i in range(12)]


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, batch_size=4, learning_rate=1e-2,
                save_steps=100, logging_steps=1)
    return SFTConfig(**{**base, **kw})


@pytest.mark.parametrize("arch,target", [("llama", "mlp.down_proj"), ("gpt2", "mlp.c_proj"),
                                         ("gpt_neox", "mlp.dense_4h_to_h"), ("opt", "fc2")])
def test_lora_targets_the_down_projection_only(tmp_path, arch, target):
    model, _ = load_model(f"tiny-{arch}")
    config = cfg(tmp_path)
    assert resolve_target_modules(model, config) == [target]
    wrapped = prepare_model(model, config)
    lora_modules = {n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    ad = get_adapter(base_model(wrapped))
    # exactly the down-projections (GPT-2's attn.c_proj is not caught by the leaf name)
    assert {n.split("base_model.model.", 1)[-1] for n in lora_modules} == \
        {ad.down_proj_path(i) for i in range(ad.num_layers)}


def test_extra_and_bad_targets(tmp_path):
    model, _ = load_model("tiny-llama")
    names = resolve_target_modules(model, cfg(tmp_path, extra_target_modules=("q_proj",)))
    assert names == ["mlp.down_proj", "q_proj"]
    with pytest.raises(NNError, match="not_a_module not found.*down_proj"):
        resolve_target_modules(model, cfg(tmp_path, extra_target_modules=("not_a_module",)))
    with pytest.raises(NNError, match="unknown fine-tuning method"):
        cfg(tmp_path, method="dora").check()


def test_trainer_masks_prompt_labels(tmp_path):
    model, tok = load_model("tiny-llama")
    trainer = build_trainer(model, tok, EXAMPLES, cfg(tmp_path))
    feat = trainer.train_dataset[0]
    n_prompt = sum(1 for x in feat["labels"] if x == -100)
    assert 0 < n_prompt < len(feat["labels"])
    assert feat["labels"][n_prompt:] == feat["input_ids"][n_prompt:]
    batch = trainer.data_collator(trainer.train_dataset[:3])
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}


def test_train_saves_adapter_manifest_and_resumes(tmp_path):
    model, tok = load_model("tiny-llama")
    config = cfg(tmp_path, max_steps=2, save_steps=1)
    res = train(build_trainer(model, tok, EXAMPLES, config), config, model_spec="tiny-llama")
    assert res.global_step == 2 and res.resumed_from is None
    assert (res.saved / "adapter_model.safetensors").is_file() and res.saved.name == "adapter"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["method"] == "lora" and manifest["seeds"] == {"seed": 0}
    assert manifest["extra"]["trainable_parameters"] > 0
    # a second run with more steps continues from the last checkpoint
    model2, tok2 = load_model("tiny-llama")
    config2 = cfg(tmp_path, max_steps=4, save_steps=1)
    res2 = train(build_trainer(model2, tok2, EXAMPLES, config2), config2)
    assert res2.resumed_from is not None and res2.resumed_from.endswith("checkpoint-2")
    assert res2.global_step == 4
    with pytest.raises(NNError, match="not a training checkpoint"):
        train(build_trainer(*load_model("tiny-llama"), EXAMPLES, config2), config2, resume=str(tmp_path))


def test_same_seed_same_adapter(tmp_path):
    outs = []
    for run in range(2):
        model, tok = load_model("tiny-llama")
        config = cfg(tmp_path / str(run), seed=7)
        res = train(build_trainer(model, tok, EXAMPLES, config), config)
        outs.append({n: p.detach().clone() for n, p in res.model.named_parameters() if "lora_" in n})
    assert outs[0].keys() == outs[1].keys()
    for n in outs[0]:
        assert torch.equal(outs[0][n], outs[1][n]), n


def _lora_grads(wrapped, tok):
    wrapped.zero_grad()
    batch = tok(["hello world, a training text"], return_tensors="pt")
    out = wrapped(input_ids=batch["input_ids"], labels=batch["input_ids"])
    out.loss.backward()
    mod = get_adapter(base_model(wrapped)).down_proj(0)
    return mod.lora_A["default"].weight.grad


def test_mask_attached_after_wrapping_gates_the_lora_path(tmp_path):
    model, tok = load_model("tiny-llama")
    config = cfg(tmp_path, lora_dropout=0.0)
    wrapped = prepare_model(model, config)
    with torch.no_grad():  # make B non-zero so A receives gradient at all
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    base = base_model(wrapped)
    ns = NeuronSet.for_model(base, {(0, "mlp_act"): [1, 2, 3]})
    with mask_neurons(base, ns, "lesion"):
        grad = _lora_grads(wrapped, tok)
    assert torch.all(grad[:, [1, 2, 3]] == 0)
    assert grad[:, 4:].abs().sum() > 0
    # a mask built on the model *before* wrapping sits on the inner base layer and misses LoRA
    model2, tok2 = load_model("tiny-llama")
    early = mask_neurons(model2, NeuronSet.for_model(model2, {(0, "mlp_act"): [1, 2, 3]}), "lesion")
    early.attach()
    wrapped2 = prepare_model(model2, config)
    with torch.no_grad():
        for n, p in wrapped2.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    grad2 = _lora_grads(wrapped2, tok2)
    early.remove()
    assert grad2[:, [1, 2, 3]].abs().sum() > 0


def test_weight_mask_callback_keeps_frozen_entries_bit_identical(tmp_path):
    model, tok = load_model("tiny-llama")
    config = cfg(tmp_path, method="full", trainable_modules=["mlp.down_proj"], weight_decay=0.5,
                 max_steps=3)
    name = get_adapter(model).down_weight_name(0)
    before = dict(model.named_parameters())[name].detach().clone()
    frozen = torch.zeros_like(before, dtype=torch.bool)
    frozen[:, :64] = True  # freeze the first 64 input columns of layer 0

    def build():
        return WeightMask(trainer.model, {name: ~frozen})

    trainer = build_trainer(model, tok, EXAMPLES, config, callbacks=[WeightMaskCallback(build)])
    res = train(trainer, config)
    after = dict(res.model.named_parameters())[name].detach()
    assert torch.equal(after[frozen], before[frozen])
    assert not torch.equal(after[~frozen], before[~frozen])
    # non-target modules are frozen with method=full
    assert not dict(res.model.named_parameters())["model.layers.0.mlp.up_proj.weight"].requires_grad


def test_negative_seed_rejected():
    with pytest.raises(NNError, match="--seed must be 0 or more"):
        SFTConfig(seed=-3).check()


def test_lora_init_follows_the_training_seed(tmp_path):
    """prepare_model seeds PEFT's random A: same seed, same initial adapter, whatever the
    global RNG state was before."""
    inits = []
    for noise in (1, 2, 2):
        torch.manual_seed(noise)
        model, _ = load_model("tiny-llama")
        wrapped = prepare_model(model, cfg(tmp_path, seed=5 if len(inits) < 2 else 6))
        inits.append({n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_A" in n})
    assert inits[0] and all(torch.equal(inits[0][n], inits[1][n]) for n in inits[0])
    assert not all(torch.equal(inits[0][n], inits[2][n]) for n in inits[0])


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    from nn_core.train import FINGERPRINT_FILE, run_fingerprint

    config = cfg(tmp_path, max_steps=2, save_steps=1)
    model, tok = load_model("tiny-llama")
    fp = run_fingerprint(config, {"data": "a"})
    train(build_trainer(model, tok, EXAMPLES, config), config, fingerprint=fp)
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["hash"] == fp["hash"]
    longer = cfg(tmp_path, max_steps=3, save_steps=1, lora_r=4)
    model, tok = load_model("tiny-llama")
    other = run_fingerprint(longer, {"data": "b"})
    with pytest.raises(NNError, match=r"different run \(config.lora_r, config.max_steps, data differ\): "
                                      "use a fresh --out or --no-resume"):
        train(build_trainer(model, tok, EXAMPLES, longer), longer, fingerprint=other)
    # the same run resumes; --no-resume starts over and records the new fingerprint
    model, tok = load_model("tiny-llama")
    res = train(build_trainer(model, tok, EXAMPLES, longer), longer, fingerprint=other, resume=False)
    assert res.resumed_from is None
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["hash"] == other["hash"]


def test_checkpoint_without_fingerprint_is_not_resumed(tmp_path):
    from nn_core.train import check_fingerprint, run_fingerprint

    with pytest.raises(NNError, match="no run_fingerprint.json.*use a fresh --out or --no-resume"):
        check_fingerprint(tmp_path, run_fingerprint(SFTConfig()))
