"""What the study is about, measured: refusal rate on held-out harmful prompts and utility
loss on held-out utility examples."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def refusal_eval(model: nn.Module, tokenizer, examples: Sequence, *, max_new_tokens: int = 48,
                 batch_size: int = 8) -> dict:
    """Greedy answers (nn-eval) to the examples' prompts rendered through the chat template,
    scored by :func:`nn_drift.refusal.is_refusal`: ``{"rate", "refusals", "n", "empty",
    "samples"}`` (``samples``: the first three prompt/answer pairs)."""
    from nn_core.data.chat import render
    from nn_drift.refusal import refusal_rate
    from nn_eval.generation import greedy_generate

    prompts = [render(tokenizer, e)[0] for e in examples]
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    out = refusal_rate(answers)
    out["samples"] = [{"prompt": e.prompt, "answer": a} for e, a in zip(examples[:3], answers[:3],
                                                                         strict=False)]
    return out


def utility_eval(model: nn.Module, tokenizer, examples: Sequence, *, max_length: int = 256,
                 batch_size: int = 8) -> dict:
    """Response-token NLL and perplexity of the examples (nn-eval ``evaluate_lm`` on
    prompt-masked features)."""
    from nn_core.data.chat import tokenize_examples
    from nn_eval.lm import evaluate_lm

    feats = list(tokenize_examples(tokenizer, examples, max_length))
    r = evaluate_lm(model, tokenizer, feats, max_length=max_length, batch_size=batch_size)
    return {"nll": r["nll"], "ppl": r["ppl"], "n_tokens": r["n_tokens"]}
