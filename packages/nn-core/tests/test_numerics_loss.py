from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nn_core
from nn_core.data import IGNORE_INDEX
from nn_core.errors import NNError
from nn_core.model.loading import TINY_ARCHS
from nn_core.numerics.loss import causal_labels, per_row_nll, summed_nll, token_scores

TEXTS = ("the quick brown fox jumps over the lazy dog", "pack my box", "sphinx of black quartz, judge")


def _padded(tok, texts, side):
    tok.padding_side = side
    try:
        return dict(tok(list(texts), return_tensors="pt", padding=True))
    finally:
        tok.padding_side = "right"


def _hf_loss_sum(model, batch, labels, **extra):
    """HF's own ``labels=`` loss (a mean over loss tokens) times the number of loss tokens."""
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    labels=labels, **extra)
    return float(out.loss) * n, n


def test_exported_from_nn_core():
    assert nn_core.summed_nll is summed_nll and nn_core.token_scores is token_scores
    assert nn_core.causal_labels is causal_labels and nn_core.per_row_nll is per_row_nll


def test_causal_labels_masks_padding_and_prompt():
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    prompt = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    labels = causal_labels(ids, mask, prompt)
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 10]]
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]  # input untouched
    assert causal_labels(ids).tolist() == ids.tolist()
    with pytest.raises(NNError, match="one mask entry per token"):
        causal_labels(ids, mask[:, :3])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_summed_nll_equals_hf_labels_loss_on_every_tiny_arch(tiny_models, arch):
    model, tok = tiny_models(arch)
    batch = _padded(tok, TEXTS, "right")
    labels = causal_labels(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        loss, n = summed_nll(model, batch)
    ref, n_ref = _hf_loss_sum(model, batch, labels)
    assert n == n_ref == int(batch["attention_mask"].sum()) - len(TEXTS)
    assert loss.dim() == 0 and float(loss) == pytest.approx(ref, rel=1e-5)
    # the same, row by row without padding: padding changes nothing
    with torch.no_grad():
        rows, counts = per_row_nll(model, batch)
    for r, text in enumerate(TEXTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        one, k = _hf_loss_sum(model, {"input_ids": ids}, ids)
        assert float(rows[r]) == pytest.approx(one, rel=1e-4) and int(counts[r]) == k


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_left_padding_gives_the_unpadded_losses(tiny_models, arch):
    model, tok = tiny_models(arch)
    right = _padded(tok, TEXTS, "right")
    left = _padded(tok, TEXTS, "left")
    assert bool((left["attention_mask"][:, 0] == 0).any())
    with torch.no_grad():
        rows_l, n_l = per_row_nll(model, left)
        rows_r, n_r = per_row_nll(model, right)
        total, n = summed_nll(model, left)
    assert torch.equal(n_l, n_r) and n == int(n_l.sum())
    assert torch.allclose(rows_l, rows_r, rtol=1e-4)
    assert float(total) == pytest.approx(float(rows_r.sum()), rel=1e-5)
    # equal to HF's loss given the same position ids (counted from the first real token)
    pos = (left["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    ref, _ = _hf_loss_sum(model, left, causal_labels(left["input_ids"], left["attention_mask"]),
                          position_ids=pos)
    assert float(total) == pytest.approx(ref, rel=1e-5)


def test_prompt_mask_and_labels_select_the_loss_tokens(tiny_models):
    model, tok = tiny_models("llama")
    batch = _padded(tok, TEXTS, "right")
    prompt = torch.zeros_like(batch["input_ids"])
    prompt[:, :5] = 1
    labels = causal_labels(batch["input_ids"], batch["attention_mask"], prompt)
    with torch.no_grad():
        loss, n = summed_nll(model, {**batch, "labels": labels})
        full, n_full = summed_nll(model, batch)
    ref, n_ref = _hf_loss_sum(model, batch, labels)
    assert n == n_ref == n_full - 4 * len(TEXTS)  # label positions 1..4 of each row dropped
    assert float(loss) == pytest.approx(ref, rel=1e-5) and float(loss) < float(full)
    # padding is never a loss token, even when labels claim it
    claims = batch["input_ids"].clone()
    with torch.no_grad():
        again, k = summed_nll(model, {**batch, "labels": claims})
    assert k == n_full and float(again) == pytest.approx(float(full), rel=1e-6)


def test_summed_nll_carries_gradients_equal_to_the_hf_loss_gradients(tiny_models):
    model, tok = tiny_models("gpt2")
    batch = _padded(tok, TEXTS, "right")
    labels = causal_labels(batch["input_ids"], batch["attention_mask"])
    w = model.lm_head.weight if not model.config.tie_word_embeddings else model.get_input_embeddings().weight
    loss, n = summed_nll(model, batch)
    (g,) = torch.autograd.grad(loss / n, [w])
    ref = model(**batch, labels=labels).loss
    (g_ref,) = torch.autograd.grad(ref, [w])
    assert g.abs().sum() > 0
    assert torch.allclose(g, g_ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", [(45,), (3, 17)])
def test_token_scores_match_log_softmax_across_chunks(shape):
    vocab = 50_000  # the CPU chunk (2**20 // vocab = 20 rows) splits the rows
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets.view(-1)[0] = logits.reshape(-1, vocab)[0].argmax()
    logp, hit = token_scores(logits, targets)
    ref = -F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    assert logp.shape == hit.shape == targets.shape and logp.dtype == torch.float32
    assert torch.allclose(logp.reshape(-1), ref, atol=1e-5)
    assert torch.equal(hit.reshape(-1), logits.reshape(-1, vocab).argmax(-1) == targets.reshape(-1))
    assert bool(hit.view(-1)[0])


def test_token_scores_chunked_equals_unchunked_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    vocab = 30_000  # 34 rows per CPU chunk
    logits = torch.randn(100, vocab, generator=gen) * 4
    targets = torch.randint(0, vocab, (100,), generator=gen)
    logp, hit = token_scores(logits, targets)
    # each row alone (a chunk of one) gives exactly the same bits as the chunked pass
    for r in (0, 33, 34, 99):
        one, h = token_scores(logits[r : r + 1], targets[r : r + 1])
        assert torch.equal(one[0], logp[r]) and bool(h[0]) == bool(hit[r])
    # 3-D input is the same computation row by row
    logp3, _ = token_scores(logits.view(4, 25, vocab), targets.view(4, 25))
    assert torch.equal(logp3.reshape(-1), logp)
    # the unchunked formula of the docstring: z[y] - (m + log sum exp(z - m))
    m = logits.max(-1).values
    lse = m + (logits - m[:, None]).exp().sum(-1).log()
    assert torch.allclose(logp, logits.gather(-1, targets[:, None]).squeeze(-1) - lse, atol=1e-6)


def test_bad_inputs_are_one_line_errors(tiny_models):
    model, _ = tiny_models("llama")
    with pytest.raises(NNError, match="input_ids"):
        summed_nll(model, {"ids": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(NNError, match="one label per token"):
        summed_nll(model, {"input_ids": torch.ones(1, 3, dtype=torch.long),
                           "labels": torch.ones(1, 2, dtype=torch.long)})
    with pytest.raises(NNError, match="do not match"):
        token_scores(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
