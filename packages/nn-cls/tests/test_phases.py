from __future__ import annotations

import pytest
import torch

from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import (
    OnlineEWC,
    SchedulerConfig,
    SleepScheduler,
    agreement,
    refresh,
    sleep_step,
    wake_step,
)
from nn_cls.replay import ReplayBuffer, collate_episodes
from nn_cls.system import CLSSystem
from nn_core.data.batching import collate
from nn_core.data.chat import tokenize_examples
from nn_core.data.instructions import Example
from nn_core.numerics.sparse_logits import top_k
from nn_core.train.config import SFTConfig
from nn_core.train.lora import prepare_model
from nn_eval.tasks import make_split


def _batch(tok, task="uppercase", n=4, seed=0):
    rows = make_split(task, n, 1, seed=seed)["train"]
    ex = [Example(prompt=r["input"], response=r["output"]) for r in rows]
    feats = tokenize_examples(tok, ex, 96)
    return collate(feats, tok.pad_token_id if tok.pad_token_id is not None else 0)


@pytest.fixture
def setup(fresh_llama):
    model, tok = fresh_llama
    for p in model.parameters():
        p.requires_grad_(False)
    system = CLSSystem(model, HippocampusConfig(num_experts=4, expert_hidden=16, top_k=2))
    return system, tok


def test_wake_one_forward_trains_hippocampus_only_and_stores_same_forward_teacher(setup):
    system, tok = setup
    batch = _batch(tok)
    calls = []
    system.model.register_forward_hook(lambda *a: calls.append(1))
    base_before = {n: p.clone() for n, p in system.model.named_parameters()}
    with torch.no_grad():
        expected = system.forward(batch)
    calls.clear()
    replay = ReplayBuffer(16, seed=0)
    opt = torch.optim.AdamW(system.hippocampus.parameters(), lr=1e-2)
    m = wake_step(system, batch, opt, task=0, step=0, replay=replay, top_k=8)
    assert len(calls) == 1  # one forward per wake step
    assert m["replay_added_this_step"] == batch["input_ids"].shape[0] == len(replay)
    ep = replay.items[0]
    pos = ep.positions
    n = ep.input_ids.numel()
    assert torch.equal(ep.teacher.indices, top_k(expected[0, :n][pos], 8).indices)
    assert all(torch.equal(p, base_before[n]) for n, p in system.model.named_parameters())
    assert system.hippocampus.w2.abs().sum() > 0
    assert system.hippocampus.task_usage[0].sum() > 0


def test_sleep_distils_into_lora_with_ewc_and_refresh(setup):
    system, tok = setup
    replay = ReplayBuffer(32, seed=0)
    with torch.no_grad():  # a hippocampus that changes the base's predictions clearly
        system.hippocampus.w2.normal_(0, 0.3)
    opt = torch.optim.AdamW(system.hippocampus.parameters(), lr=1e-3)
    for s in range(4):
        wake_step(system, _batch(tok, seed=s), opt, task=0, step=s, replay=replay, top_k=8)
    hip_before = {n: p.clone() for n, p in system.hippocampus.named_parameters()}
    system.model = prepare_model(system.model, SFTConfig(method="lora", lora_r=4,
                                                        target_modules=["down_proj"]))
    trained = {n: p for n, p in system.model.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)
    base_before = {n: p.clone() for n, p in system.model.named_parameters() if not p.requires_grad}
    sopt = torch.optim.AdamW(trained.values(), lr=2e-2)
    ewc = OnlineEWC(trained, lam=10.0, gamma=0.5)
    probe = replay.items[:8]
    agree0 = agreement(system, probe)
    batch, teacher, mask = collate_episodes(probe, 0)
    from nn_core.numerics.sparse_logits import sparse_kl
    with torch.no_grad():
        kl0 = float(sparse_kl(system.forward(batch, hippocampus=False)[:, :-1], teacher, mask))
    mix = []
    for s in range(12):
        m, mix = sleep_step(system, replay, sopt, batch_size=4, pseudo_ratio=0.25, ewc=ewc, step=s)
        assert m["pseudo_batch_size"] == 1 and m["replay_batch_size_sleep"] == 3
    with torch.no_grad():
        kl1 = float(sparse_kl(system.forward(batch, hippocampus=False)[:, :-1], teacher, mask))
    assert kl1 < kl0, (kl0, kl1)
    assert agreement(system, probe) >= agree0
    assert all(torch.equal(p, base_before[n]) for n, p in system.model.named_parameters()
               if not p.requires_grad)
    assert all(torch.equal(p, hip_before[n]) for n, p in system.hippocampus.named_parameters())
    # EWC: Fisher only on trained params, online decay, penalty pulls toward anchors
    fb = [collate_episodes(mix, 0)[0]]
    ewc.update(system, fb)
    f1 = {n: f.clone() for n, f in ewc.fisher.items()}
    assert set(f1) == set(trained)
    assert ewc.penalty().item() == 0
    ewc.update(system, fb)
    for n in f1:
        assert torch.allclose(ewc.fisher[n], 1.5 * f1[n], rtol=1e-4, atol=1e-10)
    with torch.no_grad():
        next(iter(trained.values())).add_(0.1)
    assert ewc.penalty().item() > 0
    # refresh: threshold above 1 never fires; threshold 0 resets the task's experts
    info = refresh(system, probe, [0], threshold=1.01)
    assert info["refreshed_experts"] == [] and "<" in info["refresh_reason"]
    info = refresh(system, probe, [0], threshold=0.0, factor=1.0)
    assert info["refreshed_experts"]
    e = info["refreshed_experts"]
    assert torch.equal(system.hippocampus.w2[e], torch.zeros_like(system.hippocampus.w2[e]))


def test_fisher_matches_direct_per_sample_computation(setup):
    system, tok = setup
    system.model = prepare_model(system.model, SFTConfig(method="lora", lora_r=2,
                                                        target_modules=["down_proj"]))
    trained = {n: p for n, p in system.model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # make LoRA B non-zero so every gradient is informative
        for n, p in trained.items():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = _batch(tok, n=3)
    ewc = OnlineEWC(trained, gamma=0.0)
    ewc.update(system, [batch])
    direct = {n: torch.zeros_like(p) for n, p in trained.items()}
    from nn_core.numerics.loss import summed_nll
    for b in range(3):
        row = {k: v[b:b + 1] for k, v in batch.items()}
        real = row["attention_mask"][0].bool()
        row = {k: v[:, real] for k, v in row.items()}
        with system.base_only():
            loss, n = summed_nll(system.model, row)
        grads = torch.autograd.grad(loss / n, list(trained.values()))
        for (name, _), g in zip(trained.items(), grads, strict=True):
            direct[name] += g.pow(2) / 3
    for n in trained:
        assert torch.allclose(ewc.fisher[n], direct[n], rtol=1e-3, atol=1e-9), n


def test_scheduler_decisions():
    s = SleepScheduler(SchedulerConfig(min_interval=2, max_interval=5, threshold=0.5,
                                       min_sleep_steps=2, max_sleep_steps=10))
    s.observe_wake(1.0)
    assert not s.decide(saturation=1.0, forgetting=1.0)["sleep"]  # before min_interval
    nov = s.observe_wake(1.4)
    assert abs(nov - 0.4) < 1e-6
    d = s.decide(saturation=0.0, forgetting=0.2)
    assert d["sleep"] and d["reason"] == "pressure" and abs(d["pressure"] - 0.6) < 1e-6
    assert d["sleep_steps"] == round(2 + 8 * 0.6)
    s.slept()
    for _ in range(2):
        s.observe_wake(0.5)
    assert not s.decide(saturation=0.0, forgetting=0.0)["sleep"]
    for _ in range(3):
        s.observe_wake(0.5)
    d = s.decide(saturation=0.0, forgetting=0.0)
    assert d["sleep"] and d["reason"] == "max_interval" and d["sleep_steps"] == 2
