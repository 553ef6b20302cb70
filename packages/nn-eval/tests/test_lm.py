from __future__ import annotations

import math

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.masks import mask_neurons
from nn_core.model.loading import TINY_ARCHS
from nn_core.select.neuronset import NeuronSet
from nn_eval import NonFiniteLogits, evaluate_lm

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "x",
    "pack my box with five dozen liquor jugs, then sleep",
    "sphinx of black quartz, judge my vow",
    "",
    "how vexingly quick daft zebras jump; a longer line to vary the lengths of the batch",
]


def brute_force(model, seqs, context):
    """Per-token reference: x_t scored from at most ``context`` previous tokens, one forward each."""
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for ids in seqs:
            for t in range(1, len(ids)):
                window = torch.tensor([ids[max(0, t - context) : t + 1]])
                logits = model(input_ids=window).logits[0, -2].double()
                total += float(-torch.log_softmax(logits, -1)[ids[t]])
                correct += int(int(logits.argmax()) == ids[t])
                n += 1
    return total / n, correct / n, n


def test_matches_model_labels_loss_on_single_sequences(tiny):
    model, tok = tiny("llama")
    for text in TEXTS[0], TEXTS[5]:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        res = evaluate_lm(model, tok, [ids])
        assert res["nll"] == pytest.approx(ref, abs=1e-5)
        assert res["ppl"] == pytest.approx(math.exp(res["nll"]))
        assert res["n_tokens"] == len(ids) - 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_batch_size_does_not_change_results(tiny, arch):
    model, tok = tiny(arch)
    one = evaluate_lm(model, tok, TEXTS * 2, batch_size=1, max_length=16, stride=5)
    four = evaluate_lm(model, tok, TEXTS * 2, batch_size=4, max_length=16, stride=5)
    assert one["nll"] == pytest.approx(four["nll"], abs=1e-6)
    assert one["token_acc"] == pytest.approx(four["token_acc"], abs=1e-12)
    assert one["n_tokens"] == four["n_tokens"]
    assert (one["n_sequences"], one["n_skipped"]) == (four["n_sequences"], four["n_skipped"]) == (8, 4)


def test_matches_brute_force_reference_and_short_sequences_are_skipped(tiny):
    model, tok = tiny("qwen2")
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    kept = [s for s in seqs if len(s) >= 2]
    res = evaluate_lm(model, tok, TEXTS, batch_size=3, max_length=4096)
    nll, acc, n = brute_force(model, kept, context=10_000)
    assert res["nll"] == pytest.approx(nll, abs=1e-5)
    assert res["token_acc"] == pytest.approx(acc)
    assert res["n_tokens"] == n
    assert res["n_sequences"] == 4 and res["n_skipped"] == 2


def test_sliding_window_stride_one_gives_each_token_full_window_context(tiny):
    model, tok = tiny("llama")
    seqs = [tok(t)["input_ids"] for t in (TEXTS[0], TEXTS[5])]
    res = evaluate_lm(model, tok, seqs, max_length=12, stride=1, batch_size=7)
    nll, acc, n = brute_force(model, seqs, context=11)
    assert res["n_tokens"] == n == sum(len(s) - 1 for s in seqs)
    assert res["nll"] == pytest.approx(nll, abs=1e-5)
    assert res["token_acc"] == pytest.approx(acc)


@pytest.mark.parametrize("stride", [1, 3, 7, 11])
def test_every_token_is_scored_exactly_once(tiny, stride):
    model, tok = tiny("llama")
    seqs = [tok(t)["input_ids"] for t in TEXTS if len(t) > 1]
    res = evaluate_lm(model, tok, seqs, max_length=12, stride=stride)
    assert res["n_tokens"] == sum(len(s) - 1 for s in seqs)


def test_stride_changes_context_but_long_windows_equal_no_window(tiny):
    model, tok = tiny("llama")
    full = evaluate_lm(model, tok, TEXTS, max_length=4096)
    same = evaluate_lm(model, tok, TEXTS, max_length=200, stride=50)
    short = evaluate_lm(model, tok, TEXTS, max_length=6, stride=5)
    assert full["nll"] == pytest.approx(same["nll"], abs=1e-9)
    assert abs(full["nll"] - short["nll"]) > 1e-6


def test_labels_mask_and_attention_mask(tiny):
    model, tok = tiny("llama")
    ids = tok(TEXTS[0])["input_ids"]
    labels = [-100] * 10 + ids[10:]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    res = evaluate_lm(model, tok, [{"input_ids": ids, "labels": labels}])
    assert res["nll"] == pytest.approx(ref, abs=1e-5)
    assert res["n_tokens"] == len(ids) - 10
    padded = {"input_ids": [0, 0, *ids], "attention_mask": [0, 0] + [1] * len(ids)}
    assert evaluate_lm(model, tok, [padded])["nll"] == pytest.approx(
        evaluate_lm(model, tok, [ids])["nll"], abs=1e-12
    )
    blocks = torch.tensor([ids[:20], ids[20:40]])
    assert evaluate_lm(model, tok, blocks)["n_tokens"] == 38


def _lesion(model):
    return NeuronSet.for_model(model, {(0, "mlp_act"): list(range(0, 128, 2)),
                                       (1, "mlp_act"): list(range(1, 128, 3))})


def test_intervention_reports_baseline_intervened_delta_and_restores(tiny):
    model, tok = tiny("llama")
    plain = evaluate_lm(model, tok, TEXTS)
    ns = _lesion(model)
    handle = mask_neurons(model, ns, "lesion")
    for intervention in (handle, lambda: mask_neurons(model, ns, "lesion")):
        res = evaluate_lm(model, tok, TEXTS, intervention=intervention)
        assert res["baseline"] == plain
        assert res["intervened"]["nll"] != plain["nll"]
        assert res["delta"]["nll"] == res["intervened"]["nll"] - plain["nll"]
        assert res["delta"]["ppl"] == res["intervened"]["ppl"] - plain["ppl"]
        assert evaluate_lm(model, tok, TEXTS) == plain
    assert not handle.attached
    with handle:
        inside = evaluate_lm(model, tok, TEXTS)
    assert inside == res["intervened"]


def test_model_mode_is_restored(tiny):
    model, tok = tiny("llama")
    model.train()
    try:
        evaluate_lm(model, tok, TEXTS[:1])
        assert model.training
    finally:
        model.eval()


def test_non_finite_logits_name_the_batch(tiny):
    model, tok = tiny("llama")
    seqs = [tok(t)["input_ids"] for t in TEXTS if len(t) > 1]
    calls = []

    def poison(_module, _inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    handle = model.lm_head.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteLogits, match="non-finite logits in batch 1"):
            evaluate_lm(model, tok, seqs, batch_size=2)
    finally:
        handle.remove()


def test_progress_is_called_per_batch(tiny):
    model, tok = tiny("llama")
    seen = []
    evaluate_lm(model, tok, TEXTS, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        ([], {}, "empty"),
        ("just a string", {}, "must be a list"),
        (["a", ""], {}, "nothing to score"),
        ([{"input_ids": [1, 2, 3], "text": "x"}], {}, "fields"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], {}, "labels"),
        ([[1, 2, 99999]], {}, "vocabulary"),
        ([[1.5, 2.0]], {}, "integer"),
        ([[1, 2, 3]], {"max_length": 1}, "max_length"),
        ([[1, 2, 3]], {"max_length": 8, "stride": 8}, "stride"),
        ([[1, 2, 3]], {"batch_size": 0}, "batch_size"),
        ([[1, 2, 3]], {"intervention": 5}, "intervention"),
    ],
)
def test_bad_input_is_one_line_nnerror(tiny, data, kwargs, match):
    model, tok = tiny("llama")
    with pytest.raises(NNError, match=match) as info:
        evaluate_lm(model, tok, data, **kwargs)
    assert "\n" not in str(info.value)


LONG_TEXT = " ".join(f"word{i} and some filler text to make it long" for i in range(40))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_max_length_beyond_the_position_table_is_clamped_and_reported(tiny, arch):
    model, tok = tiny(arch)
    ids = tok(LONG_TEXT)["input_ids"]
    assert len(ids) > 1024 and model.config.max_position_embeddings == 512
    res = evaluate_lm(model, tok, [ids], max_length=1024, batch_size=2)
    ref = evaluate_lm(model, tok, [ids], max_length=512, batch_size=2)
    assert res["max_length"] == ref["max_length"] == 512
    assert res["nll"] == pytest.approx(ref["nll"], abs=1e-9) and res["n_tokens"] == len(ids) - 1
    assert evaluate_lm(model, tok, [ids[:40]], max_length=16)["max_length"] == 16
    with pytest.raises(NNError, match="clamped to the model's 512 positions"):
        evaluate_lm(model, tok, [ids], max_length=1024, stride=600)


def test_float64_sums_happen_on_the_cpu(tiny, no_float64_logits):
    model, tok = tiny("llama")
    ref = evaluate_lm(model, tok, TEXTS, max_length=16, stride=5, batch_size=3)
    with no_float64_logits(model):
        res = evaluate_lm(model, tok, TEXTS, max_length=16, stride=5, batch_size=3)
    assert res == ref


def test_allow_empty_reports_no_tokens_instead_of_raising(tiny):
    model, tok = tiny("llama")
    with pytest.raises(NNError, match="nothing to score"):
        evaluate_lm(model, tok, ["x", ""])
    res = evaluate_lm(model, tok, ["x", ""], allow_empty=True)
    assert res == {"ppl": None, "nll": None, "token_acc": None, "n_tokens": 0,
                   "n_sequences": 0, "n_skipped": 2, "max_length": 512}
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 2]})
    both = evaluate_lm(model, tok, ["x"], allow_empty=True, intervention=lambda: mask_neurons(model, ns, "lesion"))
    assert both["delta"] == {"ppl": None, "nll": None, "token_acc": None}
    assert both["intervened"]["n_tokens"] == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_matches_labels_loss_on_every_tiny_architecture(tiny, arch):
    model, tok = tiny(arch)
    for text in TEXTS[0], TEXTS[5]:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        res = evaluate_lm(model, tok, [ids])
        assert res["nll"] == pytest.approx(ref, abs=1e-5), arch
        assert res["n_tokens"] == len(ids) - 1
