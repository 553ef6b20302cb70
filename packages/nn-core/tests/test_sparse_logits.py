from __future__ import annotations

import math

import pytest
import torch

from nn_core.errors import NNError
from nn_core.numerics.sparse_logits import SparseLogits, log1mexp, sparse_kl, top_k


def full_kl(student, teacher, temperature=1.0):
    """Per-position KL(softmax(t/T) ‖ softmax(s/T)) over the whole vocabulary."""
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def coarse_kl(student, teacher, k, temperature=1.0):
    """Reference: KL between the two distributions coarsened to top-k(teacher) + one tail."""
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    idx = log_p.topk(k, -1).indices
    p, q = log_p.exp(), log_q.exp()
    p_s, q_s = p.gather(-1, idx), q.gather(-1, idx)
    p_t, q_t = p.sum(-1) - p_s.sum(-1), q.sum(-1) - q_s.sum(-1)
    return (p_s * (p_s / q_s).log()).sum(-1) + p_t * (p_t / q_t).log()


def test_top_k_contents_and_tail():
    logits = torch.randn(2, 5, 40) * 3
    sl = top_k(logits, 6)
    assert sl.values.dtype == torch.float16 and sl.indices.dtype == torch.int32
    assert sl.values.shape == (2, 5, 6) and sl.log_tail.shape == (2, 5) and sl.k == 6
    log_p = torch.log_softmax(logits, -1)
    ref = log_p.topk(6, -1)
    assert torch.equal(sl.indices.long(), ref.indices)
    torch.testing.assert_close(sl.values.float(), ref.values, atol=2e-3, rtol=1e-3)
    # tail mass + top-k mass = 1
    total = sl.log_tail.exp() + ref.values.exp().sum(-1)
    torch.testing.assert_close(total, torch.ones(2, 5), atol=1e-6, rtol=0)
    full = top_k(logits, 40)
    assert bool(torch.isneginf(full.log_tail).all())


def test_nbytes_and_compression():
    sl = top_k(torch.randn(3, 7, 49152), 32)
    assert sl.nbytes == 3 * 7 * (32 * 2 + 32 * 4 + 4)  # 196 bytes per position
    assert 49152 * 4 / (sl.nbytes / 21) > 1000


def test_equals_full_kl_when_k_is_vocab():
    torch.manual_seed(1)
    teacher = torch.randn(2, 4, 30, dtype=torch.float64) * 2
    student = torch.randn(2, 4, 30, dtype=torch.float64) * 2
    for temperature in (1.0, 2.5):
        sl = top_k(teacher, 30, temperature=temperature, dtype=torch.float64)
        got = sparse_kl(student, sl, reduction="none")
        torch.testing.assert_close(got, full_kl(student, teacher, temperature), rtol=1e-12, atol=1e-14)
    # float16 storage stays close to the exact value
    got16 = sparse_kl(student.float(), top_k(teacher.float(), 30), reduction="none")
    torch.testing.assert_close(got16.double(), full_kl(student, teacher), rtol=5e-3, atol=5e-4)


def test_small_k_is_coarsened_kl_and_bounded_by_full():
    torch.manual_seed(2)
    teacher = torch.randn(3, 50, dtype=torch.float64) * 2
    student = torch.randn(3, 50, dtype=torch.float64) * 2
    for k in (1, 5, 20):
        got = sparse_kl(student, top_k(teacher, k, dtype=torch.float64), reduction="none")
        torch.testing.assert_close(got, coarse_kl(student, teacher, k), rtol=1e-10, atol=1e-12)
        assert bool((got <= full_kl(student, teacher) + 1e-12).all())
        assert bool((got > 0).all())
    # identical distributions: zero divergence
    same = sparse_kl(teacher, top_k(teacher, 5, dtype=torch.float64), reduction="none")
    torch.testing.assert_close(same, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_mask_and_reductions():
    torch.manual_seed(3)
    teacher = torch.randn(2, 5, 20)
    student = torch.randn(2, 5, 20)
    sl = top_k(teacher, 4, dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    per = sparse_kl(student, sl, reduction="none")
    masked = sparse_kl(student, sl, mask, reduction="none")
    assert bool((masked[0, 3:] == 0).all()) and torch.equal(masked[1], per[1])
    mean = sparse_kl(student, sl, mask)
    torch.testing.assert_close(mean, per[mask.bool()].mean())
    torch.testing.assert_close(sparse_kl(student, sl, mask, reduction="sum"), per[mask.bool()].sum())
    # garbage at padding does not change the loss
    noisy = student.clone()
    noisy[0, 3:] = 1e4
    torch.testing.assert_close(sparse_kl(noisy, sl, mask), mean)


def test_gradient_flows_to_student():
    torch.manual_seed(4)
    teacher = top_k(torch.randn(2, 3, 12, dtype=torch.float64), 4, temperature=1.5,
                    dtype=torch.float64)
    student = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert torch.autograd.gradcheck(lambda s: sparse_kl(s, teacher, mask), (student,))
    loss = sparse_kl(student, teacher, mask)
    loss.backward()
    assert student.grad.abs().sum() > 0
    assert bool((student.grad[0, 2] == 0).all())  # masked position gets no gradient
    # k = vocab: no tail, gradient still finite and equal to the full KL's
    t_full = torch.randn(2, 12, dtype=torch.float64)
    s = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    (g_sparse,) = torch.autograd.grad(sparse_kl(s, top_k(t_full, 12, dtype=torch.float64)), s)
    (g_full,) = torch.autograd.grad(full_kl(s, t_full).mean(), s)
    torch.testing.assert_close(g_sparse, g_full)


def test_peaked_student_stays_finite():
    teacher = torch.zeros(1, 10)
    student = torch.tensor([[60.0, 59.0, 58.0, 0, 0, 0, 0, 0, 0, 0]], requires_grad=True)
    sl = top_k(teacher, 3, dtype=torch.float32)
    loss = sparse_kl(student, sl)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(student.grad).all())


def test_log1mexp_accuracy():
    x = torch.tensor([-1e-20, -1e-8, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64)
    # log(1 - e^x) = log(-expm1(x)); for x << 0 it is -e^x to within e^(2x) (expm1 rounds to -1)
    ref = torch.tensor([-math.exp(v) if v < -30 else math.log(-math.expm1(v)) for v in x.tolist()],
                       dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), ref, rtol=1e-14, atol=0)


def test_state_dict_and_file_round_trip(tmp_path):
    sl = top_k(torch.randn(2, 3, 25), 5, temperature=2.0)
    back = SparseLogits.from_state_dict(sl.state_dict())
    path = tmp_path / "teacher.safetensors"
    sl.save(path)
    loaded = SparseLogits.load(path)
    for other in (back, loaded):
        assert torch.equal(other.values, sl.values) and torch.equal(other.indices, sl.indices)
        assert torch.equal(other.log_tail, sl.log_tail) and other.temperature == 2.0
    assert loaded[:, 1:].shape == (2, 2)
    torch.testing.assert_close(loaded[:, 1:].values, sl.values[:, 1:])
    with pytest.raises(NNError, match="missing"):
        SparseLogits.from_state_dict({"values": sl.values})
    with pytest.raises(NNError, match="not found"):
        SparseLogits.load(tmp_path / "nope.safetensors")


def test_bad_input():
    sl = top_k(torch.randn(2, 10), 3)
    with pytest.raises(NNError, match="k must be"):
        top_k(torch.randn(2, 10), 11)
    with pytest.raises(NNError, match="temperature"):
        sparse_kl(torch.randn(2, 10), sl, temperature=2.0)
    with pytest.raises(NNError, match="align"):
        sparse_kl(torch.randn(3, 10), sl)
    with pytest.raises(NNError, match="vocabulary"):
        sparse_kl(torch.randn(2, 5), SparseLogits(sl.values, torch.full((2, 3), 9, dtype=torch.int32),
                                                  sl.log_tail))
    with pytest.raises(NNError, match="no real positions"):
        sparse_kl(torch.randn(2, 10), sl, torch.zeros(2))
