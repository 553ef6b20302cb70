from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from nn_cls.replay import ReplayBuffer, collate_episodes, episodes_from_batch, full_logits_bytes
from nn_core.errors import NNError
from nn_core.numerics.sparse_logits import sparse_kl, top_k


@dataclass
class Item:
    id: int
    task: int = 0


def test_reservoir_keeps_every_item_with_probability_capacity_over_n():
    n, cap, trials = 60, 10, 600
    hits = torch.zeros(n)
    for seed in range(trials):
        buf = ReplayBuffer(cap, seed=seed)
        buf.add_batch([Item(i) for i in range(n)])
        assert len(buf) == cap and buf.seen == n
        for it in buf.items:
            hits[it.id] += 1
    p = cap / n
    expected = trials * p
    chi2 = float(((hits - expected) ** 2 / (expected * (1 - p))).sum())
    # 59 degrees of freedom: the 0.999 quantile is about 99; a buffer that kept the first
    # or the last items would be far beyond it
    assert chi2 < 99, chi2
    # early and late halves equally represented
    assert abs(hits[: n // 2].sum() - hits[n // 2:].sum()) < 0.1 * trials * cap


def test_seeded_and_restorable():
    a, b = ReplayBuffer(5, seed=3), ReplayBuffer(5, seed=3)
    for buf in (a, b):
        buf.add_batch([Item(i, task=i % 3) for i in range(40)])
    assert [i.id for i in a.items] == [i.id for i in b.items]
    state = a.state_dict()
    c = ReplayBuffer(5, seed=99)
    c.load_state_dict(state)
    a.add_batch([Item(100 + i) for i in range(20)])
    c.add_batch([Item(100 + i) for i in range(20)])
    assert [i.id for i in a.items] == [i.id for i in c.items]
    assert [i.id for i in a.sample(3)] == [i.id for i in c.sample(3)]
    with pytest.raises(NNError, match="capacity"):
        ReplayBuffer(6).load_state_dict(state)


def test_task_balanced_sampling():
    buf = ReplayBuffer(100, seed=0, sampling="task_balanced")
    buf.add_batch([Item(i, task=0) for i in range(90)] + [Item(90 + i, task=1) for i in range(10)])
    draws = buf.sample(2000)
    share = sum(d.task == 1 for d in draws) / len(draws)
    assert 0.45 < share < 0.55  # uniform sampling would give 0.10
    uni = ReplayBuffer(100, seed=0)
    uni.add_batch(buf.items)
    assert len(uni.sample(500)) == 100  # without replacement


def test_episodes_all_rows_sparse_teacher_and_bytes():
    torch.manual_seed(0)
    V = 50
    ids = torch.randint(0, V, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    labels = ids.clone()
    labels[:, :2] = -100  # prompt
    logits = torch.randn(3, 6, V)
    eps = episodes_from_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, logits,
                              task=2, step=7, k=V)
    assert len(eps) == 3 and all(e.task == 2 and e.step == 7 for e in eps)
    assert eps[1].input_ids.tolist() == ids[1, :4].tolist()
    assert eps[0].positions.tolist() == [1, 2, 3, 4]
    batch, teacher, kl_mask = collate_episodes(eps, pad_id=0)
    assert torch.equal(batch["input_ids"][0], ids[0])
    # k = V: the sparse KL against the stored teacher is the full KL against the logits
    student = torch.randn(3, 5, V)
    got = sparse_kl(student, teacher, kl_mask, reduction="none")
    p = logits[:, :-1].log_softmax(-1)
    q = student.log_softmax(-1)
    full = (p.exp() * (p - q)).sum(-1) * kl_mask
    assert torch.allclose(got.float(), full, atol=2e-3)
    # bytes: k=32 on a 49,152 vocabulary
    big = episodes_from_batch({"input_ids": ids[:1], "labels": labels[:1]}, torch.randn(1, 6, 49152),
                              task=0, step=0, k=32)[0]
    ratio = full_logits_bytes(big, 49152) / big.nbytes
    assert ratio > 500, ratio
    assert big.teacher.values.dtype == torch.float16 and big.teacher.indices.dtype == torch.int32
    assert math.isfinite(big.loss)
    top = top_k(logits[0, 1:5], 4)
    assert torch.equal(top.indices, episodes_from_batch(
        {"input_ids": ids[:1], "labels": labels[:1]}, logits[:1], task=0, step=0, k=4)[0].teacher.indices)
