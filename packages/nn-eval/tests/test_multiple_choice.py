from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from nn_core.errors import NNError
from nn_eval.multiple_choice import (
    _encode_pair,
    decide,
    load_mc,
    loglikelihoods,
    mc_items,
    score_multiple_choice,
)

PAIRS = [
    ("Question: what grows on trees?\nAnswer:", " apple"),
    ("Question: what grows on trees?\nAnswer:", " apple pie"),
    ("Question: what grows on trees?\nAnswer:", " stone"),
    ("The sky is ", "blue"),   # trailing space moves into the continuation
    ("", " hello"),            # empty context: prefix (EOS: the tiny tokenizer has no BOS)
]


def brute(model, tok, context, continuation):
    ctx, cont = _encode_pair(tok, context, continuation)
    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
    return sum(float(lp[len(ctx) - 1 + t, c]) for t, c in enumerate(cont))


def test_encode_pair_follows_the_harness(tiny):
    _, tok = tiny("llama")
    ctx, cont = _encode_pair(tok, "The sky is ", "blue")
    assert tok.decode(ctx) == "The sky is" and tok.decode(cont) == " blue"
    ctx, _ = _encode_pair(tok, "", " hello")
    assert ctx == [tok.eos_token_id]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_loglikelihoods_match_one_forward_per_pair(tiny, batch_size):
    model, tok = tiny("llama")
    got = loglikelihoods(model, tok, [PAIRS[:3], PAIRS[3:]], batch_size=batch_size)
    for (ll, greedy), (context, cont) in zip(got, PAIRS, strict=True):
        assert ll == pytest.approx(brute(model, tok, context, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_single_token_choices_share_one_row(tiny):
    model, tok = tiny("gpt2")
    recs = [{"question": f"q{i}?", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "B"}
            for i in range(3)]
    items = mc_items(recs)
    rows = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        res = score_multiple_choice(model, tok, items, batch_size=16)
    finally:
        handle.remove()
    assert sum(rows) == 3  # one forward row per question for 4 choices
    for it, r in zip(items, res["items"], strict=True):
        ref = [brute(model, tok, it.context, " " + c) for c in it.choices]
        assert r["lls"] == pytest.approx(ref, abs=1e-4)


def test_acc_and_acc_norm_definitions():
    # acc: argmax of the summed log-likelihood; acc_norm: argmax of ll / len(choice in chars).
    d = decide([-10.0, -12.0], ["ab", "abcdefgh"], gold=1)
    assert (d["pred"], d["pred_norm"], d["acc"], d["acc_norm"]) == (0, 1, 0.0, 1.0)
    d = decide([-3.0, -2.0, -9.0], ["one", "two", "three"], gold=1)
    assert (d["acc"], d["acc_norm"]) == (1.0, 1.0)


def test_scores_follow_the_model(tiny):
    model, tok = tiny("llama")
    items = mc_items([{"question": "which word?", "choices": ["apple", "stone", "river bank"], "answer": 0}])
    lls = score_multiple_choice(model, tok, items)["items"][0]["lls"]
    best = max(range(3), key=lambda i: lls[i])
    best_norm = max(range(3), key=lambda i: lls[i] / len(items[0].choices[i]))
    gold = mc_items([{"question": "which word?", "choices": ["apple", "stone", "river bank"],
                      "answer": best}])
    res = score_multiple_choice(model, tok, gold)
    assert res["acc"] == 1.0 and res["n"] == 1
    assert res["acc_norm"] == float(best_norm == best)


def test_record_layouts(tmp_path):
    plain = mc_items([{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])[0]
    assert plain.context == "Question: 2+2?\nAnswer:" and plain.choices == ("3", "4") and plain.gold == 1
    mmlu = mc_items([{"question": "2+2? ", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "b",
                      "subject": "high_school_math"}])[0]
    assert mmlu.context == ("The following are multiple choice questions (with answers) about "
                            "high school math.\n\n2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert mmlu.choices == ("A", "B", "C", "D") and mmlu.gold == 1
    as_text = mc_items([{"question": "q", "choices": ["red", "blue"], "answer": "blue"}], style="mmlu")[0]
    assert as_text.gold == 1 and as_text.choices == ("A", "B")
    (tmp_path / "mmlu.csv").write_text("question,A,B,C,D,answer\nq1,a,b,c,d,C\nq2,a,b,c,d,0\n")
    items = load_mc(tmp_path / "mmlu.csv")
    assert [it.gold for it in items] == [2, 0]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(
        {"question": f"q{i}", "choices": ["x", "y", "z"], "answer": i % 3}) for i in range(5)))
    assert [it.gold for it in load_mc(tmp_path / "mc.jsonl", limit=4)] == [0, 1, 2, 0]


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([], "empty"),
        ([{"prompt": "q", "response": "a"}], "fields prompt, response"),
        ([{"question": "q", "choices": ["a"], "answer": 0}], "at least 2"),
        ([{"question": "q", "choices": ["a", "b"], "answer": 2}], "out of range"),
        ([{"question": "q", "choices": ["a", "b"], "answer": "maybe"}], "not an index"),
        (["just text"], "must be objects"),
    ],
)
def test_bad_records(records, match):
    with pytest.raises(NNError, match=match):
        mc_items(records)


def test_bad_files(tmp_path):
    with pytest.raises(NNError, match="does not exist"):
        load_mc(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": 1}\n{oops\n')
    with pytest.raises(NNError, match="line 2"):
        load_mc(tmp_path / "bad.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(NNError, match="unsupported"):
        load_mc(tmp_path / "x.txt")


def test_max_length_beyond_the_position_table_is_clamped_and_reported(tiny):
    model, tok = tiny("gpt2")
    question = " ".join(f"clause {i} of a very long question" for i in range(30))
    items = mc_items([{"question": question, "choices": ["yes", "no"], "answer": 0}])
    assert len(tok(items[0].context)["input_ids"]) > 600
    res = score_multiple_choice(model, tok, items)  # default max_length 2048 > 512 positions
    ref = score_multiple_choice(model, tok, items, max_length=512)
    assert res["max_length"] == ref["max_length"] == 512
    assert res["items"][0]["lls"] == pytest.approx(ref["items"][0]["lls"], abs=1e-9)


def test_float64_sums_happen_on_the_cpu(tiny, no_float64_logits):
    model, tok = tiny("llama")
    ref = loglikelihoods(model, tok, [PAIRS[:3], PAIRS[3:]], batch_size=2)
    with no_float64_logits(model):
        assert loglikelihoods(model, tok, [PAIRS[:3], PAIRS[3:]], batch_size=2) == ref


def test_auto_style_uses_the_mmlu_prompt_for_mmlu_records():
    # cais/mmlu rows: question, subject, choices (a list) and an integer answer
    rec = {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
           "answer": 1}
    item = mc_items([rec])[0]
    assert item.context.startswith("The following are multiple choice questions (with answers) "
                                   "about elementary mathematics.\n\n2+2?\nA. 3\nB. 4")
    assert item.choices == ("A", "B", "C", "D") and item.gold == 1
    both = mc_items([{"question": "q", "choices": ["x", "y"], "A": "x", "B": "y", "answer": 0}])[0]
    assert both.choices == ("A", "B")
    assert mc_items([rec], style="plain")[0].choices == ("3", "4", "5", "6")
    assert mc_items([{k: v for k, v in rec.items() if k != "subject"}])[0].context.startswith("Question:")


def test_a_string_answer_that_is_both_an_index_and_a_choice_is_refused():
    choices = ["1", "2", "3", "4"]
    with pytest.raises(NNError, match=r"ambiguous.*letter \(B\)"):
        mc_items([{"question": "1+1?", "choices": choices, "answer": "2"}])
    with pytest.raises(NNError, match="ambiguous"):  # the letter A, or the text of choice 1
        mc_items([{"question": "q", "choices": ["B", "A"], "answer": "A"}])
    # unambiguous forms still work: an int index, a letter, a digit string that is no choice
    assert mc_items([{"question": "1+1?", "choices": choices, "answer": 1}])[0].gold == 1
    assert mc_items([{"question": "1+1?", "choices": choices, "answer": "B"}])[0].gold == 1
    assert mc_items([{"question": "q", "choices": ["x", "y"], "answer": "1"}])[0].gold == 1
    # both readings agree: "0" is index 0 and the text of choice 0
    assert mc_items([{"question": "q", "choices": ["0", "5"], "answer": "0"}])[0].gold == 0


def _prefixed_ll(model, prefix, cont):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([[prefix, *cont]])).logits[0].double(), -1)
    return sum(float(lp[t, c]) for t, c in enumerate(cont))


class _NoSpecialTokens:
    """A tokenizer that has neither BOS nor EOS."""

    bos_token_id = eos_token_id = bos_token = eos_token = pad_token_id = None

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def test_empty_context_is_bos_where_the_tokenizer_has_one_else_eos(tiny):
    model, tok = tiny("llama")
    with_bos = copy.deepcopy(tok)
    with_bos.bos_token = with_bos.pad_token
    bos, eos = with_bos.bos_token_id, tok.eos_token_id
    assert tok.bos_token_id is None and bos is not None and bos != eos
    ctx, cont = _encode_pair(with_bos, "", " hello")
    assert ctx == [bos] and tok.decode(cont) == " hello"
    assert _encode_pair(tok, "", " hello")[0] == [eos]
    (ll_bos, _), = loglikelihoods(model, with_bos, [("", " hello")])
    (ll_eos, _), = loglikelihoods(model, tok, [("", " hello")])
    assert ll_bos == pytest.approx(_prefixed_ll(model, bos, cont), abs=1e-4)
    assert ll_eos == pytest.approx(_prefixed_ll(model, eos, cont), abs=1e-4)
    assert abs(ll_bos - ll_eos) > 1e-3
    # a non-empty context gets no prefix
    assert _encode_pair(with_bos, "Hi", " there")[0] == tok("Hi")["input_ids"]
    with pytest.raises(NNError, match="BOS or EOS"):
        _encode_pair(_NoSpecialTokens(tok), "", " hello")


def test_acc_norm_divides_by_characters_of_the_choice_end_to_end(tiny):
    # lm-eval: acc_norm = [argmax_i ll_i / len(choice_i) == gold], len in characters of the
    # choice text (not its bytes or tokens, not counting the " " delimiter). Find two
    # choices where acc and acc_norm disagree and characters and bytes disagree too.
    model, tok = tiny("llama")
    pool = ["a", "no", "yes", "stone", "river bank", "naïve café", "über", "é", "ééé", "zz", "ça"]
    context = "Question: which one?\nAnswer:"
    lls = dict(zip(pool, (ll for ll, _ in loglikelihoods(model, tok, [(context, " " + c) for c in pool])),
                   strict=True))

    def best(pair, norm):
        return max(range(2), key=lambda k: lls[pair[k]] / norm(pair[k]))

    pair = next((p for p in itertools.combinations(pool, 2)
                 if best(p, lambda c: 1) != best(p, len) != best(p, lambda c: len(c.encode()))), None)
    assert pair is not None, "no pair separates acc, acc_norm by characters and by bytes"
    by_ll, by_chars = best(pair, lambda c: 1), best(pair, len)
    items = mc_items([{"question": "which one?", "choices": list(pair), "answer": by_chars}])
    res = score_multiple_choice(model, tok, items)
    item = res["items"][0]
    assert item["lls"] == pytest.approx([lls[c] for c in pair], abs=1e-5)
    assert (item["pred"], item["pred_norm"]) == (by_ll, by_chars)
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)
    # and the other way round when the gold is the raw-likelihood winner
    items = mc_items([{"question": "which one?", "choices": list(pair), "answer": by_ll}])
    res = score_multiple_choice(model, tok, items)
    assert (res["acc"], res["acc_norm"]) == (1.0, 0.0)
