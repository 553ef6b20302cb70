from __future__ import annotations

import pytest
import torch

from nn_core.data import Example, render
from nn_core.errors import NNError
from nn_eval.generation import exact_match, greedy_generate, normalize, stop_token_ids

PROMPTS = ["hello there, how are", "a", "the quick brown fox jumps over the lazy", "zz top"]


def reference(model, tok, prompt, n):
    ids = torch.tensor([tok(prompt)["input_ids"]])
    eos = sorted(stop_token_ids(model, tok))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2"])
def test_batched_left_padded_greedy_matches_transformers_generate(tiny, arch):
    model, tok = tiny(arch)
    batched = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=4)
    assert batched == [reference(model, tok, p, 10) for p in PROMPTS]
    assert greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=1) == batched


def test_stop_strings_cut_the_output(tiny):
    model, tok = tiny("llama")
    full = greedy_generate(model, tok, PROMPTS[:1], max_new_tokens=12)[0]
    assert len(full) >= 4
    stop = full[2:4]
    cut = greedy_generate(model, tok, PROMPTS[:1], max_new_tokens=12, stop=[stop])[0]
    assert cut == full[: full.find(stop)]


def test_stops_at_eos(tiny):
    model, tok = tiny("llama")
    eos = tok.eos_token_id
    bias = torch.zeros(model.lm_head.out_features)
    bias[eos] = 1e4  # force EOS as the first generated token
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out + bias)
    try:
        assert greedy_generate(model, tok, PROMPTS, max_new_tokens=5) == [""] * len(PROMPTS)
    finally:
        handle.remove()


def test_normalisations():
    assert normalize("  Hello,   World! ", ["strip"]) == "Hello,   World!"
    assert normalize("  Hello,   World! ", ["strip", "lowercase", "strip_punctuation",
                                            "collapse_whitespace"]) == "hello world"
    with pytest.raises(NNError, match="unknown normalisation"):
        normalize("x", ["upper"])


def test_exact_match_uses_the_chat_template_and_scores(tiny):
    model, tok = tiny("llama")
    examples = [Example(f"say {w}", "x") for w in ("one", "two", "three")]
    prompts = [render(tok, ex)[0] for ex in examples]
    assert prompts[0].startswith("<|im_start|>user\nsay one")
    preds = greedy_generate(model, tok, prompts, max_new_tokens=6)
    right = [Example(ex.prompt, f"  {p.upper()}  ") for ex, p in zip(examples, preds, strict=True)]
    res = exact_match(model, tok, right, max_new_tokens=6, normalize_with=["strip", "lowercase"])
    assert res["accuracy"] == 1.0 and res["n_correct"] == 3
    assert [r["prediction"] for r in res["predictions"]] == preds
    res = exact_match(model, tok, right, max_new_tokens=6, normalize_with=["strip"])
    assert res["accuracy"] == pytest.approx(sum(p == p.upper() for p in preds) / 3)
    records = [{"instruction": "say one", "input": "", "output": preds[0]}]
    assert exact_match(model, tok, records, max_new_tokens=6)["predictions"][0]["prompt"] == prompts[0]
    raw = exact_match(model, tok, [("abc", "zzz")], max_new_tokens=3)
    assert raw["predictions"][0]["prompt"] == "abc" and raw["n"] == 1


def test_bad_generation_input(tiny):
    model, tok = tiny("llama")
    with pytest.raises(NNError, match="empty"):
        exact_match(model, tok, [])
    with pytest.raises(NNError, match="cannot tell the instruction format"):
        exact_match(model, tok, [{"q": 1}])
    with pytest.raises(NNError, match="example 0"):
        exact_match(model, tok, [42])
    with pytest.raises(NNError, match="max_new_tokens"):
        greedy_generate(model, tok, ["a"], max_new_tokens=0)
