from __future__ import annotations

import pytest

from nn_core.errors import NNError
from nn_drift.data import embedded_records, load_examples, response_batches
from nn_drift.refusal import is_refusal, refusal_rate


def test_refusals_detected_and_compliance_not():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("  I CANNOT assist with this request.")
    assert is_refusal("I\u2019m sorry you feel this way")  # curly apostrophe
    assert not is_refusal("Sure! Here is a poem about the sea.")
    assert not is_refusal("The capital of France is Paris.")
    assert not is_refusal("")
    # a phrase far into a compliant answer is not a refusal
    assert not is_refusal("Here is the answer. " + "x" * 300 + " I can't stress this enough.")
    assert is_refusal("Here is the answer. " + "x" * 300 + " I can't", window=1000)


def test_refusal_rate_counts():
    r = refusal_rate(["I cannot do that.", "Sure, here it is.", "", "I won't."])
    assert r == {"rate": 0.5, "refusals": 2, "n": 4, "empty": 1}


def test_embedded_safety_set():
    train, held = embedded_records("safety"), embedded_records("safety-heldout")
    assert len(train) == 100 and len(held) == 20
    prompts = {r["instruction"] for r in train}
    assert len(prompts) == 100
    assert not prompts & {r["instruction"] for r in held}
    # every response is a refusal by the package's own detector, so the set teaches refusing
    assert all(is_refusal(r["output"]) for r in train + held)
    ex = load_examples("safety", limit=7)
    assert len(ex) == 7 and ex[0].prompt == train[0]["instruction"]


def test_utility_mix_and_bad_specs():
    ex = load_examples("utility", limit=12)
    assert len(ex) == 12
    assert len({e.prompt.split()[0] for e in ex[:6]}) > 1  # tasks interleaved
    with pytest.raises(NNError):
        load_examples("task:")
    with pytest.raises(NNError):
        load_examples("task:no_such_task")


def test_assistant_style_utility():
    from nn_drift.data import ASSISTANT_OPENERS

    plain = load_examples("utility", limit=7, seed=3)
    styled = load_examples("assistant", limit=7, seed=3)
    assert [e.prompt for e in styled] == [e.prompt for e in plain]
    for i, (a, b) in enumerate(zip(styled, plain, strict=True)):
        opener = ASSISTANT_OPENERS[i % len(ASSISTANT_OPENERS)]
        assert a.response == f"{opener}\n\n{b.response}"
        assert not is_refusal(a.response)


def test_response_batches_mask_prompts(tiny_llama):
    _, tok = tiny_llama
    b = response_batches(tok, load_examples("safety", limit=3), batch_size=2)
    assert len(b) == 2
    lab, ids = b[0]["labels"], b[0]["input_ids"]
    assert (lab == -100).any() and (lab != -100).any()
    real = lab != -100
    assert bool((lab[real] == ids[real]).all())
    assert int(real[0].nonzero()[0]) > 5  # the prompt is masked


def test_public_names_resolve():
    import nn_drift

    for name in nn_drift.__all__:
        assert getattr(nn_drift, name) is not None
