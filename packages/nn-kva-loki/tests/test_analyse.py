from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nn_core.errors import NNError
from nn_core.intervene.hooks import hooked
from nn_core.model.loading import TINY_ARCHS, load_model
from nn_core.model.sites import SiteRef
from nn_kva_loki.kva import (
    Encoded,
    Sample,
    analyse,
    attribute,
    captum_attributions,
    encode_samples,
    load_samples,
    pairs_per_batch,
    quadrature,
)
from nn_kva_loki.kva_file import KVASettings, read_kva

PROMPTS = ["The capital of France is", "one two three four five six", "abc", "Hello there, how"]


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(f"tiny-{arch}", device="cpu", dtype="float32")
        return cache[arch]
    return get


def _close(a: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> None:
    """``a`` equals ``ref`` to ``rel`` relative (elementwise, and against the largest value)."""
    scale = float(np.abs(ref).max())
    assert scale > 0
    np.testing.assert_allclose(a, ref, rtol=rel, atol=rel * scale)


def _encoded(tok, prompts=PROMPTS[:2]):
    return encode_samples(tok, [Sample(f"s{i}", p) for i, p in enumerate(prompts)])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_equals_captum_on_every_architecture(tiny, arch):
    """The KV-cached all-layers batch equals Captum's IntegratedGradients layer by layer, for
    a left-padded batch of two lengths (argmax target)."""
    model, tok = tiny(arch)
    enc = _encoded(tok)
    assert len(enc[0].ids) != len(enc[1].ids)
    method = "gausslegendre" if arch in ("gpt2", "qwen3") else "riemann_trapezoid"
    att, token, prob = attribute(model, enc, method=method, steps=4, engine="fast",
                                 pad_id=tok.pad_token_id)
    ref, ref_token, ref_prob = attribute(model, enc, method=method, steps=4, engine="captum",
                                         pad_id=tok.pad_token_id)
    assert att.shape == (2, 2, model.config.hidden_size) and att.dtype == np.float32
    np.testing.assert_array_equal(token, ref_token)
    np.testing.assert_allclose(prob, ref_prob, rtol=1e-6)
    _close(att, ref)


def test_captum_reference_is_the_site_ig_not_an_input_baseline(tiny):
    """The reference integrates the target-position activation from zero: its attributions
    sum (completeness) to F(a) - F(0) with F the target probability, the other positions
    untouched."""
    model, tok = tiny("llama")
    (enc,) = _encoded(tok, PROMPTS[:1])
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        target = int(model(input_ids=ids).logits[0, -1].argmax())
    att = captum_attributions(model, enc.ids, target, method="gausslegendre", steps=48)

    def prob(layer, zero):
        def fn(out):
            new = out.clone()
            new[:, -1] = 0
            return new
        with torch.no_grad(), hooked(model, {SiteRef(layer, "mlp_out"): fn} if zero else {}):
            return float(torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)[target])

    for layer in range(2):
        delta = prob(layer, False) - prob(layer, True)
        assert abs(delta) > 1e-7
        assert float(att[layer].astype(np.float64).sum()) == pytest.approx(delta, rel=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_lengths_batch_equals_batch_size_one(tiny, arch):
    model, tok = tiny(arch)
    enc = _encoded(tok, PROMPTS)
    assert len({len(e.ids) for e in enc}) == len(enc)
    batched, tok_b, prob_b = attribute(model, enc, method="riemann_trapezoid", steps=3,
                                       pad_id=tok.pad_token_id)
    for i, e in enumerate(enc):
        one, tok_1, prob_1 = attribute(model, [e], method="riemann_trapezoid", steps=3,
                                       pad_id=tok.pad_token_id)
        _close(batched[i], one[0])
        assert tok_b[i] == tok_1[0] and prob_b[i] == pytest.approx(prob_1[0], rel=1e-5)


def test_fast_engine_reads_the_prompt_once(tiny):
    """The fast engine's forwards: the prefix (all but the target token) once with a KV
    cache, the target token once (clean activations, target token and probability), then
    every (layer, step) variant as extra tokens of the one sequence, plus the check
    variant, in a single forward. No full-prompt pass."""
    model, tok = tiny("llama")
    enc = _encoded(tok, PROMPTS[:1])
    n, steps = len(enc[0].ids), 3
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        _, token, prob = attribute(model, enc, method="riemann_trapezoid", steps=steps,
                                   pad_id=tok.pad_token_id)
    finally:
        hook.remove()
    assert shapes == [(1, n - 1), (1, 1), (1, model.config.num_hidden_layers * steps + 1)]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([enc[0].ids])).logits[0, -1], -1)
    assert int(token[0]) == int(probs.argmax())
    assert float(prob[0]) == pytest.approx(float(probs.max()), rel=1e-5)


def test_chunking_to_a_small_memory_budget_changes_nothing(tiny):
    model, tok = tiny("qwen2")
    enc = _encoded(tok)
    assert pairs_per_batch(model, 6, 1) == 1 and pairs_per_batch(model, 6, 1e12) == 4096
    big = attribute(model, enc, method="riemann_middle", steps=3, pad_id=tok.pad_token_id)[0]
    small = attribute(model, enc, method="riemann_middle", steps=3, pad_id=tok.pad_token_id,
                      memory_budget=1)[0]
    _close(small, big)


def test_gold_target_and_position(tiny):
    model, tok = tiny("llama")
    samples = [Sample("a", "Question: 2+2?\nAnswer:", " 4"), Sample("b", "xyz", " q")]
    gold = encode_samples(tok, samples, target="gold")
    assert [e.gold_id for e in gold] == [tok(" 4", add_special_tokens=False)["input_ids"][0],
                                         tok(" q", add_special_tokens=False)["input_ids"][0]]
    _, token, prob = attribute(model, gold, target="gold", method="riemann_trapezoid", steps=2,
                               pad_id=tok.pad_token_id)
    assert token.tolist() == [e.gold_id for e in gold] and (prob > 0).all()
    # position 2 of "xyz": the ids are cut after it; -1 is the last token
    cut = encode_samples(tok, samples, position=2)
    full = encode_samples(tok, samples)
    assert cut[1].ids == full[1].ids[:3] and cut[0].ids == full[0].ids[:3]
    with pytest.raises(NNError, match=r"target position 10 is beyond sample b \(3 tokens\)"):
        encode_samples(tok, samples, position=10)
    with pytest.raises(NNError, match="beyond sample"):
        encode_samples(tok, samples, position=-100)
    with pytest.raises(NNError, match="no gold answer"):
        encode_samples(tok, [Sample("c", "no answer")], target="gold")


def test_quadrature_is_captums():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for method in ("riemann_trapezoid", "gausslegendre", "riemann_left", "riemann_right", "riemann_middle"):
        alphas, weights = quadrature(method, 5)
        step_sizes, al = approximation_parameters(method)
        assert alphas == pytest.approx(al(5)) and weights == pytest.approx(step_sizes(5))
        # Captum's trapezoid weights are 1/n with halved ends: they sum to (n-1)/n
        assert sum(weights) == pytest.approx(0.8 if method == "riemann_trapezoid" else 1.0)
    assert quadrature("gausslegendre", 1) == ([0.5], [1.0])
    with pytest.raises(NNError, match="steps must be"):
        quadrature("gausslegendre", 0)
    with pytest.raises(NNError, match="needs --steps >= 2"):
        quadrature("riemann_trapezoid", 1)
    with pytest.raises(NNError, match="unknown integration method"):
        quadrature("simpson", 5)


# --------------------------------------------------------------------------- data
def test_load_samples_formats(tmp_path, tiny):
    _, tok = tiny("llama")
    syn, label = load_samples("synthetic:add,copy", tok, per_task=2)
    assert [s.id for s in syn] == ["synthetic/add:0", "synthetic/add:1", "synthetic/copy:0", "synthetic/copy:1"]
    assert "synthetic:add,copy" in label and all(s.gold for s in syn)
    assert syn == load_samples("synthetic:add,copy", tok, per_task=2)[0]  # deterministic
    assert len(load_samples("synthetic", tok, per_task=1)[0]) == 10

    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}) + "\n")
    (s,), label = load_samples(str(mc), tok)
    assert s.prompt == "Question: 2+2?\nAnswer:" and s.gold == " 4" and label == "mc.jsonl"
    mmlu = tmp_path / "mmlu.csv"
    mmlu.write_text("question,A,B,C,D,answer\nSky colour?,red,blue,green,black,B\n")
    (s,), _ = load_samples(str(mmlu), tok)
    assert s.prompt.endswith("A. red\nB. blue\nC. green\nD. black\nAnswer:") and s.gold == " B"

    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    got, _ = load_samples(str(txt), tok)
    assert [(s.id, s.prompt, s.gold) for s in got] == [("p:0", "first prompt", None), ("p:1", "second prompt", None)]
    pj = tmp_path / "p.jsonl"
    pj.write_text(json.dumps({"prompt": "x is", "answer": " y"}) + "\n" + json.dumps({"prompt": "z"}) + "\n")
    got, _ = load_samples(str(pj), tok, limit=1)
    assert [(s.prompt, s.gold) for s in got] == [("x is", " y")]
    with pytest.raises(NNError, match="neither"):
        load_samples(str(tmp_path / "missing.jsonl"), tok)


# --------------------------------------------------------------------------- the run
def _run(model, tok, samples, out, **kw):
    settings = KVASettings(method="riemann_trapezoid", steps=2, engine="fast", dataset="t")
    return analyse(model, tok, samples, out, settings=settings, progress=False, **kw)


def test_interrupted_run_resumes_to_the_uninterrupted_file(tmp_path, tiny):
    model, tok = tiny("llama")
    samples = [Sample(f"s{i}", p) for i, p in enumerate(PROMPTS * 2)]
    whole = tmp_path / "whole.h5"
    summary = _run(model, tok, samples, whole, batch_size=3)
    assert summary["n_written"] == 8

    class Boom(Exception):
        pass

    def stop_after_two(n):
        if n >= 2:
            raise Boom

    cut = tmp_path / "cut.h5"
    with pytest.raises(Boom):
        _run(model, tok, samples, cut, batch_size=1, on_write=stop_after_two)
    with read_kva(cut) as f:
        assert f.num_samples == 2 and not f.complete
    before = cut.read_bytes()
    with pytest.raises(NNError, match="interrupted KVA file .*--resume"):
        _run(model, tok, samples, cut, batch_size=3)
    assert cut.read_bytes() == before  # nothing written is lost
    with pytest.raises(NNError, match="other samples"):
        _run(model, tok, samples[1:], cut, batch_size=3, resume=True)
    summary = _run(model, tok, samples, cut, batch_size=3, resume=True)
    assert summary["resumed_from"] == 2 and summary["written_this_run"] == 6
    with read_kva(cut) as a, read_kva(whole) as b:
        assert a.complete and a.sample_ids() == b.sample_ids() == [s.id for s in samples]
        _close(a.attributions(), b.attributions())
        np.testing.assert_array_equal(a.target_token(), b.target_token())
        assert a.settings == b.settings and a.settings["dtype"] == "float32"


def test_append_mode_and_other_model_refused(tmp_path, tiny):
    model, tok = tiny("llama")
    other, _ = tiny("gpt2")
    out = tmp_path / "kva.h5"
    _run(model, tok, [Sample("a", "one"), Sample("b", "two")], out)
    _run(model, tok, [Sample("c", "three")], out, write_mode="a")
    with read_kva(out) as f:
        assert f.sample_ids() == ["a", "b", "c"] and f.complete
    before = out.read_bytes()
    with pytest.raises(NNError, match="holds attributions of model 'tiny-llama'"):
        _run(other, tok, [Sample("a", "one")], out, write_mode="a")
    assert out.read_bytes() == before


def test_encoded_target_is_the_last_token(tiny):
    model, tok = tiny("llama")
    e = Encoded("x", tuple(tok("hello", add_special_tokens=False)["input_ids"]), None)
    _, token, prob = attribute(model, [e], method="riemann_trapezoid", steps=2, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([e.ids])).logits[0, -1]
    assert token[0] == int(logits.argmax())
    assert prob[0] == pytest.approx(float(torch.softmax(logits.float(), -1).max()), rel=1e-5)
