from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.masks import mask_neurons
from nn_core.model.loading import TINY_ARCHS
from nn_core.select.neuronset import NeuronSet
from nn_eval import NonFiniteLogits, evaluate_lm
from nn_eval.lm import make_segments

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
                   "n_sequences": 0, "n_skipped": 2, "max_length": 512,
                   "first_token": "skip", "prefix_token_id": None,
                   "word_perplexity": None, "byte_perplexity": None, "bits_per_byte": None,
                   "n_words": 0, "n_bytes": 0}
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


def windowed_reference(model, ids, max_length, stride):
    """Direct computation of the strided scheme, one unbatched forward per window: the
    first window is ids[:L] scoring positions 1..L-1; window k ends at
    e_k = min(L + k*stride, n), starts at e_k - L and scores positions e_{k-1}..e_k - 1.
    Returns {position: (nll, hit)}."""
    n, L = len(ids), max_length
    scored = {}
    ends = [min(n, L)]
    while ends[-1] < n:
        ends.append(min(ends[-1] + stride, n))
    with torch.no_grad():
        for k, end in enumerate(ends):
            begin = 0 if k == 0 else end - L
            first = 1 if k == 0 else ends[k - 1]
            logits = model(input_ids=torch.tensor([ids[begin:end]])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            for t in range(first, end):
                assert t not in scored, "a position was scored twice"
                row = t - 1 - begin
                scored[t] = (-float(lp[row, ids[t]]), int(lp[row].argmax()) == ids[t])
    return scored


@pytest.mark.parametrize(("max_length", "stride"), [(16, 5), (12, 11), (20, 3)])
def test_strided_windows_on_long_texts_score_every_token_once_and_match_direct_computation(
        tiny, max_length, stride):
    model, tok = tiny("gpt2")
    seqs = [tok(t)["input_ids"] for t in (LONG_TEXT[:50], TEXTS[3], TEXTS[0])]
    assert all(len(s) > max_length for s in seqs)  # every text opens several windows
    segments, skipped = make_segments([(s, None) for s in seqs], max_length, stride)
    assert skipped == 0 and len(segments) > len(seqs)
    for i, ids in enumerate(seqs):
        # the scored targets of a sequence's windows, in order, are exactly x_1 .. x_{n-1}
        own = [g for g in segments if g.seq == i]
        assert all(len(g.ids) <= max_length for g in own)
        assert [v for g in own for v in g.labels[1:] if v != -100] == ids[1:]
    res = evaluate_lm(model, tok, seqs, max_length=max_length, stride=stride, batch_size=3)
    ref = [windowed_reference(model, ids, max_length, stride) for ids in seqs]
    assert all(sorted(r) == list(range(1, len(ids))) for r, ids in zip(ref, seqs, strict=True))
    n = sum(len(r) for r in ref)
    assert res["n_tokens"] == n
    assert res["nll"] == pytest.approx(sum(v[0] for r in ref for v in r.values()) / n, abs=1e-5)
    assert res["token_acc"] == pytest.approx(sum(v[1] for r in ref for v in r.values()) / n)


DOCS = ["  leading space and a trailing one ", "naïve café — ünïcödé text\twith a tab",
        "plain words only here"]


def lm_eval_reference(model, tok, docs, prefix):
    """lm-eval's rolling loglikelihood for documents that fit one window, and its
    word_perplexity / byte_perplexity / bits_per_byte aggregations."""
    lls = []
    with torch.no_grad():
        for doc in docs:
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            inp = torch.tensor([[prefix, *ids]])
            lp = torch.log_softmax(model(input_ids=inp).logits[0].double(), -1)
            lls.append(sum(float(lp[t, ids[t]]) for t in range(len(ids))))
    words = [len(re.split(r"\s+", d)) for d in docs]
    nbytes = [len(d.encode("utf-8")) for d in docs]
    return {
        "word_perplexity": math.exp(-sum(lls) / sum(words)),
        "byte_perplexity": math.exp(-sum(lls) / sum(nbytes)),
        "bits_per_byte": -sum(lls) / sum(nbytes) / math.log(2),
        "n_words": sum(words), "n_bytes": sum(nbytes), "ll": sum(lls),
        "n_tokens": sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs),
    }


def test_prefix_convention_reproduces_lm_eval_rolling_loglikelihood_and_its_normalisations(tiny):
    model, tok = tiny("llama")
    assert tok.bos_token_id is None  # no BOS: lm-eval's prefix is EOS
    ref = lm_eval_reference(model, tok, DOCS, tok.eos_token_id)
    assert ref["n_words"] == 8 + 8 + 4  # re.split counts the empty strings at the edges
    assert ref["n_bytes"] > sum(len(d) for d in DOCS)  # non-ASCII: bytes, not characters
    res = evaluate_lm(model, tok, DOCS, first_token="prefix")
    assert res["first_token"] == "prefix" and res["prefix_token_id"] == tok.eos_token_id
    assert res["n_tokens"] == ref["n_tokens"]  # the first token of each document is scored
    assert res["nll"] * res["n_tokens"] == pytest.approx(-ref["ll"], rel=1e-6)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert res[key] == pytest.approx(ref[key], rel=1e-6), key
    assert (res["n_words"], res["n_bytes"]) == (ref["n_words"], ref["n_bytes"])
    # the default leaves each document's first token unscored: fewer tokens, other totals
    skip = evaluate_lm(model, tok, DOCS)
    assert skip["first_token"] == "skip" and skip["prefix_token_id"] is None
    assert skip["n_tokens"] == ref["n_tokens"] - len(DOCS)
    assert skip["word_perplexity"] < res["word_perplexity"]  # fewer NLL terms, same words
    assert skip["n_words"] == ref["n_words"]


def test_prefix_is_bos_where_the_tokenizer_has_one_and_is_not_doubled(tiny):
    model, tok = tiny("llama")
    with_bos = copy.deepcopy(tok)
    with_bos.bos_token = with_bos.pad_token  # a BOS the tokenizer does not add by itself
    bos = with_bos.bos_token_id
    assert bos is not None and bos != tok.eos_token_id
    res = evaluate_lm(model, with_bos, DOCS, first_token="prefix")
    ref = lm_eval_reference(model, with_bos, DOCS, bos)
    assert res["prefix_token_id"] == bos
    assert res["nll"] * res["n_tokens"] == pytest.approx(-ref["ll"], rel=1e-6)
    # token ids that already start with BOS get no second prefix: same as skip
    ids = [[bos, *tok(d)["input_ids"]] for d in DOCS]
    assert evaluate_lm(model, with_bos, ids, first_token="prefix")["nll"] == \
        evaluate_lm(model, with_bos, ids)["nll"]
    # token ids carry no text: no word or byte figures
    plain = evaluate_lm(model, tok, [tok(d)["input_ids"] for d in DOCS], first_token="prefix")
    assert plain["nll"] == evaluate_lm(model, tok, DOCS, first_token="prefix")["nll"]
    assert plain["word_perplexity"] is None and plain["n_bytes"] is None
    assert plain["n_tokens"] == ref["n_tokens"]


def test_prefix_labels_keep_their_meaning(tiny):
    model, tok = tiny("llama")
    ids = tok(TEXTS[0])["input_ids"]
    labels = [-100] * 10 + ids[10:]
    res = evaluate_lm(model, tok, [{"input_ids": ids, "labels": labels}], first_token="prefix")
    assert res["n_tokens"] == len(ids) - 10  # the prefix adds no scored token when x_0 is -100
    full = evaluate_lm(model, tok, [{"input_ids": ids}], first_token="prefix")
    assert full["n_tokens"] == len(ids)


def test_first_token_errors(tiny):
    model, tok = tiny("llama")
    with pytest.raises(NNError, match="first_token"):
        evaluate_lm(model, tok, TEXTS, first_token="bos")
    with pytest.raises(NNError, match="BOS or EOS"):
        evaluate_lm(model, None, [[1, 2, 3]], first_token="prefix")
