from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_core.select.neuronset import NeuronSet
from nn_core.select.weightset import WeightSet
from nn_core.train import SFTConfig
from nn_drift.data import load_examples
from nn_drift.drift import member_metrics, read_drift
from nn_drift.finetune import finetune_with_drift


def _groups(model):
    rng = np.random.default_rng(0)
    down, q = "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    ws = WeightSet.for_model(model, {down: rng.choice(64 * 128, 20, replace=False)},
                             method="test")
    wq = WeightSet.for_model(model, {q: rng.choice(64 * 64, 100, replace=False)}, method="test")
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 5, 9, 30]}, method="test")
    return {"down": ws, "q": wq, "neurons": ns}


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, learning_rate=5e-2,
                max_length=160, save_steps=2, logging_steps=1, lora_r=4,
                target_modules=["down_proj"])
    base.update(kw)
    return SFTConfig(**base)


def test_member_metrics_direct():
    init = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0])
    cur = torch.tensor([1.0, 1.0, 2.0, 2.0, 0.0])
    m = member_metrics(cur, init, torch.tensor([0, 0, 1, 1, 2]), 3)
    torch.testing.assert_close(m["cosine"], torch.tensor([2 ** -0.5, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m["l2"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(m["relative"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_drift_matches_merged_weights_and_untargeted_is_zero(tmp_path):
    from nn_core.model.loading import load_model

    model, tok = load_model("tiny-llama", device="cpu")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = _groups(model)
    ex = load_examples("utility", limit=8)
    result, _ = finetune_with_drift(model, tok, ex, groups, _cfg(tmp_path), track_every=2)
    rows = read_drift(tmp_path / "run")
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    by = {(r["step"], r["group"], r["metric"]): r for r in rows}
    # q_proj is not a LoRA target: zero drift at every step, by construction
    for s in (0, 2, 4):
        assert by[(s, "q", "l2")]["max"] == 0.0 and by[(s, "q", "cosine")]["min"] == 1.0
    assert by[(0, "down", "l2")]["max"] == 0.0
    assert by[(4, "down", "l2")]["mean"] > 0
    # against the merged model: members = selected entries of each output row
    merged = copy.deepcopy(result.model).merge_and_unload()
    wd = dict(merged.named_parameters())
    name = "model.layers.1.mlp.down_proj.weight"
    idx = torch.from_numpy(groups["down"].indices_numpy(name))
    cur, ini = wd[name].detach().reshape(-1)[idx].double(), w0[name].reshape(-1)[idx].double()
    rows_of = idx // 128
    l2 = [float((cur[rows_of == r] - ini[rows_of == r]).norm()) for r in rows_of.unique()]
    assert by[(4, "down", "l2")]["mean"] == pytest.approx(np.mean(l2), rel=1e-4)
    assert by[(4, "down", "l2")]["n"] == len(l2)
    # neurons: column j of down_proj in layer 0
    dn = "model.layers.0.mlp.down_proj.weight"
    cols = torch.tensor([1, 5, 9, 30])
    c, i = wd[dn].detach()[:, cols].double(), w0[dn][:, cols].double()
    cos = (c * i).sum(0) / (c.norm(dim=0) * i.norm(dim=0))
    assert by[(4, "neurons", "cosine")]["mean"] == pytest.approx(float(cos.mean()), rel=1e-6)


def test_freeze_group_keeps_rows_bit_identical(tmp_path):
    from nn_core.model.loading import load_model

    model, tok = load_model("tiny-llama", device="cpu")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = _groups(model)
    ex = load_examples("utility", limit=8)
    result, _ = finetune_with_drift(model, tok, ex, groups, _cfg(tmp_path), track_every=2,
                                    freeze=["down", "neurons"])
    merged = copy.deepcopy(result.model).merge_and_unload()
    wd = dict(merged.named_parameters())
    name = "model.layers.1.mlp.down_proj.weight"
    rows = np.unique(groups["down"].indices_numpy(name) // 128)
    assert torch.equal(wd[name][rows], w0[name][rows])
    others = np.setdiff1d(np.arange(64), rows)
    assert not torch.equal(wd[name][others], w0[name][others])
    dn = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(wd[dn][:, [1, 5, 9, 30]], w0[dn][:, [1, 5, 9, 30]])
    last = max(r["step"] for r in read_drift(tmp_path / "run"))
    by = {(r["group"], r["metric"]): r for r in read_drift(tmp_path / "run") if r["step"] == last}
    assert by[("down", "l2")]["max"] == 0.0 and by[("neurons", "l2")]["max"] == 0.0


def test_resume_keeps_initial_values_and_log(tmp_path):
    from nn_core.model.loading import load_model

    ex = load_examples("utility", limit=8)
    model, tok = load_model("tiny-llama", device="cpu")
    groups = _groups(model)
    finetune_with_drift(model, tok, ex, groups, _cfg(tmp_path, max_steps=4), track_every=1)
    full = read_drift(tmp_path / "run")
    # a second run in another folder, stopped at step 2, then resumed to 4
    model, tok = load_model("tiny-llama", device="cpu")
    cfg2 = _cfg(tmp_path, output_dir=str(tmp_path / "run2"), max_steps=4)
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        # after checkpoint-2 and after the tracker logged step 3 (rows the resume must drop)
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    import nn_core.train as T

    real_build = T.build_trainer

    def build_with_stop(*a, callbacks=(), **kw):
        return real_build(*a, callbacks=[*callbacks, Stop()], **kw)

    T.build_trainer = build_with_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune_with_drift(model, tok, ex, groups, cfg2, track_every=1)
    finally:
        T.build_trainer = real_build
    assert max(r["step"] for r in read_drift(tmp_path / "run2")) == 3
    assert (tmp_path / "run2" / "checkpoint-2").is_dir()
    model, tok = load_model("tiny-llama", device="cpu")
    result, _ = finetune_with_drift(model, tok, ex, groups,
                                    _cfg(tmp_path, output_dir=str(tmp_path / "run2")), track_every=1)
    assert result.resumed_from is not None and result.resumed_from.endswith("checkpoint-2")
    resumed = read_drift(tmp_path / "run2")
    key = lambda r: (r["step"], r["group"], r["metric"])  # noqa: E731
    assert [key(r) for r in resumed] == [key(r) for r in full]
    for a, b in zip(resumed, full, strict=True):
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-4, abs=1e-7)


def test_groups_for_another_model_refused(tmp_path):
    from nn_core.model.loading import load_model

    gpt, _ = load_model("tiny-gpt2", device="cpu")
    model, tok = load_model("tiny-llama", device="cpu")
    ns = NeuronSet.for_model(gpt, {(0, "mlp_act"): [1]}, method="x")
    with pytest.raises(NNError):
        finetune_with_drift(model, tok, load_examples("utility", limit=4), {"g": ns},
                            _cfg(tmp_path))
    with pytest.raises(NNError, match="freeze-group"):
        finetune_with_drift(model, tok, load_examples("utility", limit=4), _groups(model),
                            _cfg(tmp_path), freeze=["nope"])
