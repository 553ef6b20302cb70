"""Sleep/EWC details: pseudo-rehearsal labelled once per sleep, the vectorised EWC penalty,
the ewc baseline's single backward, per-sample vs per-batch Fisher and full fine-tuning."""

from __future__ import annotations

import io

import pytest
import torch

from nn_cls.config import compose, to_engine
from nn_cls.engine import EngineConfig, run_stream
from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import OnlineEWC, SchedulerConfig, pseudo_pool, sleep_step, wake_step
from nn_cls.replay import ReplayBuffer
from nn_cls.system import CLSSystem
from nn_core.data.batching import collate
from nn_core.data.chat import tokenize_examples
from nn_core.data.instructions import Example
from nn_core.errors import NNError
from nn_core.numerics.loss import summed_nll
from nn_core.numerics.sparse_logits import top_k
from nn_core.train.config import SFTConfig
from nn_core.train.lora import prepare_model
from nn_eval.tasks import make_split


def _batch(tok, n=4, seed=0):
    rows = make_split("uppercase", n, 1, seed=seed)["train"]
    feats = tokenize_examples(tok, [Example(prompt=r["input"], response=r["output"]) for r in rows], 96)
    return collate(feats, tok.pad_token_id if tok.pad_token_id is not None else 0)


def _lora_system(model, r=2):
    for p in model.parameters():
        p.requires_grad_(False)
    system = CLSSystem(model, HippocampusConfig(num_experts=4, expert_hidden=16, top_k=2))
    system.model = prepare_model(system.model, SFTConfig(method="lora", lora_r=r, target_modules=["down_proj"]))
    trained = {n: p for n, p in system.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in trained.items():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return system, trained


def _count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_pseudo_pool_labels_a_sleep_in_one_pass_with_base_plus_hippocampus(fresh_llama):
    model, tok = fresh_llama
    system, trained = _lora_system(model)
    with torch.no_grad():
        system.hippocampus.w2.normal_(0, 0.3)  # the hippocampus changes the predictions
    replay = ReplayBuffer(32, seed=0)
    opt = torch.optim.AdamW(system.hippocampus.parameters(), lr=1e-3)
    for s in range(3):
        wake_step(system, _batch(tok, seed=s), opt, task=s % 2, step=s, replay=replay, top_k=8)
    usage = system.hippocampus.usage.clone()
    calls = _count_forwards(system.model)
    pool = pseudo_pool(system, replay, 3, batch_size=4, pseudo_ratio=0.5, step=7)
    assert len(calls) == 2  # 3 steps x 2 rows labelled at once, in chunks of the sleep batch (4 + 2)
    assert [len(p) for p in pool] == [2, 2, 2]
    assert torch.equal(system.hippocampus.usage, usage)  # labelling ran in eval mode
    src_tasks = {id(e): e.task for e in replay.items}
    assert src_tasks  # episodes keep their task ids (0 or 1), not the -1 placeholder
    for e in (e for p in pool for e in p):
        assert e.task in (0, 1) and e.step == 7
        with torch.no_grad():
            logits = system.forward({"input_ids": e.input_ids[None]}, hippocampus=True)[0]
            base = system.forward({"input_ids": e.input_ids[None]}, hippocampus=False)[0]
        want = top_k(logits[e.positions], 8)
        assert torch.equal(e.teacher.indices, want.indices)
        assert torch.allclose(e.teacher.values.float(), want.values.float(), atol=2e-3)
        assert not torch.allclose(logits, base)  # so the teacher really is base + hippocampus
    calls.clear()
    hip_calls = []
    system.hippocampus.register_forward_hook(lambda *a: hip_calls.append(1))
    sopt = torch.optim.AdamW(trained.values(), lr=1e-3)
    m, mix = sleep_step(system, replay, sopt, batch_size=4, pseudo_ratio=0.5, pseudo=pool[0])
    assert len(calls) == 1  # a step with its pseudo episodes given: only the student forward
    assert hip_calls == []  # ... of the base alone: the hippocampus hook is off, not zeroed
    assert m["pseudo_batch_size"] == 2 and m["replay_batch_size_sleep"] == 2
    assert all(any(x is e for x in mix) for e in pool[0])
    calls.clear()
    sleep_step(system, replay, sopt, batch_size=4, pseudo_ratio=0.5)  # labels its own: 2 forwards
    assert len(calls) == 2


def test_ewc_penalty_is_the_formula_and_its_views_follow_assignment(fresh_llama):
    model, tok = fresh_llama
    system, trained = _lora_system(model)
    ewc = OnlineEWC(trained, lam=3.0, gamma=0.5)
    assert ewc.penalty().item() == 0
    ewc.update(system, [_batch(tok, n=2)])
    with torch.no_grad():
        for p in trained.values():
            p.add_(0.05 * torch.randn_like(p))
    loop = sum((ewc.fisher[n] * (p - ewc.anchors[n]) ** 2).sum() for n, p in trained.items())
    pen = ewc.penalty()
    assert pen.item() == pytest.approx(0.5 * 3.0 * loop.item(), rel=1e-5)
    grads = torch.autograd.grad(pen, list(trained.values()))
    for (n, p), g in zip(trained.items(), grads, strict=True):
        assert torch.allclose(g, 3.0 * ewc.fisher[n] * (p.detach() - ewc.anchors[n]), rtol=1e-5, atol=1e-12)
    first = next(iter(trained))
    ewc.fisher[first].zero_()  # an in-place edit of a view reaches the penalty's flat buffer
    loop0 = sum((ewc.fisher[n] * (p - ewc.anchors[n]) ** 2).sum() for n, p in trained.items())
    assert ewc.penalty().item() == pytest.approx(0.5 * 3.0 * loop0.item(), rel=1e-5)
    assert loop0 < loop
    buf = io.BytesIO()  # the checkpoint form is plain tensors (weights_only loading)
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = OnlineEWC(trained, lam=3.0, gamma=0.5)
    other.load_state_dict(state)
    assert other.penalty().item() == pytest.approx(ewc.penalty().item(), rel=1e-6)


def test_ewc_baseline_trains_task_loss_plus_penalty_in_one_step(fresh_llama):
    model, tok = fresh_llama
    system, trained = _lora_system(model)
    for p in system.hippocampus.parameters():
        p.requires_grad_(False)
    ewc = OnlineEWC(trained, lam=50.0)
    ewc.update(system, [_batch(tok, n=2)])
    with torch.no_grad():
        for p in trained.values():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(tok, seed=3)
    with system.base_only():  # expected gradient of NLL + penalty at the current weights
        loss, n = summed_nll(system.model, batch)
    g = torch.autograd.grad(loss / n + ewc.penalty(), list(trained.values()))
    before = [p.detach().clone() for p in trained.values()]
    opt = torch.optim.SGD(trained.values(), lr=0.1)
    m = wake_step(system, batch, opt, task=0, step=0, hippocampus=False, ewc=ewc)
    assert m["ewc_penalty"] > 0
    for p, p0, gi in zip(trained.values(), before, g, strict=True):
        assert torch.allclose(p.detach(), p0 - 0.1 * gi, rtol=1e-4, atol=1e-7)


def test_fisher_per_batch_is_the_squared_batch_gradient(fresh_llama):
    model, tok = fresh_llama
    system, trained = _lora_system(model)
    batches = [_batch(tok, n=2, seed=0), _batch(tok, n=3, seed=1)]
    ewc = OnlineEWC(trained, gamma=0.0, per_sample=False)
    info = ewc.update(system, batches)
    assert info["fisher_units"] == 2 and info["fisher_per_sample"] is False
    direct = {n: torch.zeros_like(p) for n, p in trained.items()}
    for b in batches:
        with system.base_only():
            loss, n = summed_nll(system.model, b)
        for (name, _), gi in zip(trained.items(), torch.autograd.grad(loss / n, list(trained.values())),
                                 strict=True):
            direct[name] += gi.pow(2) / 2
    for n in trained:
        assert torch.allclose(ewc.fisher[n], direct[n], rtol=1e-3, atol=1e-10), n
    assert OnlineEWC(trained, per_sample=True).update(system, batches)["fisher_units"] == 5


def _small(**kw):
    return EngineConfig(tasks=("uppercase", "reverse_words"), n_train=8, n_eval=4, steps_per_task=2,
                        batch_size=2, top_k=8, sleep_batch_size=2,
                        experts=HippocampusConfig(num_experts=4, expert_hidden=8),
                        scheduler=SchedulerConfig(min_interval=1, max_interval=2, min_sleep_steps=1,
                                                  max_sleep_steps=2), **kw)


def test_config_exposes_fisher_units_and_full_fine_tuning(fresh_llama):
    e = to_engine(compose("train", ["model=tiny_llama", "consolidation.fisher_per_sample=false",
                                    "model.base_train=full", "model.full_modules=[o_proj]"]))
    assert e.fisher_per_sample is False and e.base_train == "full" and e.full_modules == ("o_proj",)
    assert to_engine(compose("train", ["model=tiny_llama"])).fisher_per_sample is True
    with pytest.raises(NNError, match="base_train must be lora or full"):
        to_engine(compose("train", ["model=tiny_llama", "model.base_train=half"]))
    with pytest.raises(NNError, match="full_modules"):
        to_engine(compose("train", ["model=tiny_llama", "model.base_train=full", "model.full_modules=[]"]))
    model, tok = fresh_llama
    res = run_stream(_small(method="no_hippocampus", fisher_per_sample=False), model, tok)
    ewc = [r for r in res["history"] if r["phase"] == "ewc"]
    assert ewc and all(r["fisher_units"] == 1 and r["fisher_per_sample"] is False for r in ewc)


def test_full_fine_tuning_trains_only_the_chosen_modules(fresh_llama, tmp_path):
    model, tok = fresh_llama
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = run_stream(_small(method="no_hippocampus", base_train="full", full_modules=("down_proj",)),
                     model, tok, checkpoint_dir=tmp_path)
    assert not any("lora" in n for n, _ in model.named_modules())  # no PEFT wrapper
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), init[n])}
    assert moved and all(n.endswith("mlp.down_proj.weight") for n in moved), sorted(moved)[:3]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ck["base"]) == {n for n in init if n.endswith("down_proj.weight")}
    assert ck["ewc"]["fisher"] and set(ck["ewc"]["fisher"]) == set(ck["base"])
    assert res["metrics"]["final_seen_acc_avg"] >= 0
