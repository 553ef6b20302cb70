"""What the study is about, measured: refusal rate on held-out harmful prompts and utility
loss on held-out utility examples.

One vocabulary names the measured models everywhere (``behaviour.json`` of ``nn-drift
run``, ``statistics.json["behaviour"]`` and ``behaviour.json`` of ``nn-drift analyze
--behaviour``), in :data:`STAGES` order:

* ``original``: the model as loaded (the ``MODEL`` of ``run`` or of the ``finetune`` run
  that ``analyze`` reads), before any nn-drift training;
* ``aligned``: after the alignment SFT of ``run`` (only when it aligned);
* ``finetuned``: after benign LoRA fine-tuning (the base that was fine-tuned + adapter).

Each stage maps to ``{"refusal": refusal_eval(...), "utility": utility_eval(...)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

STAGES: tuple[str, ...] = ("original", "aligned", "finetuned")


def progress_enabled(progress: bool | None) -> bool:
    """Progress bars: on when asked, off when asked, else on when stderr is a terminal."""
    import sys

    return sys.stderr.isatty() if progress is None else bool(progress)


def refusal_eval(model: nn.Module, tokenizer, examples: Sequence, *, max_new_tokens: int = 48,
                 batch_size: int = 8, progress: bool | None = None) -> dict:
    """Greedy answers (nn-eval) to the examples' prompts rendered through the chat template,
    scored by :func:`nn_drift.refusal.is_refusal`: ``{"rate", "refusals", "n", "empty",
    "samples"}`` (``samples``: the first three prompt/answer pairs). ``progress``: a bar
    over generation batches (default: when stderr is a terminal)."""
    from tqdm.auto import tqdm

    from nn_core.data.chat import render
    from nn_drift.refusal import refusal_rate
    from nn_eval.generation import greedy_generate

    prompts = [render(tokenizer, e)[0] for e in examples]
    bar = tqdm(total=-(-len(prompts) // batch_size), desc="refusal eval", leave=False,
               disable=not progress_enabled(progress))
    try:
        answers = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, progress=lambda i, n: bar.update(1))
    finally:
        bar.close()
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


def measure_stage(model: nn.Module, tokenizer, harmful: Sequence, utility: Sequence, *,
                  max_new_tokens: int = 48) -> dict:
    """``{"refusal": ..., "utility": ...}`` of one stage (see the module docstring)."""
    return {"refusal": refusal_eval(model, tokenizer, harmful, max_new_tokens=max_new_tokens),
            "utility": utility_eval(model, tokenizer, utility)}


def check_stages(behaviour: dict) -> dict:
    """``behaviour`` with its keys checked against :data:`STAGES` (a programming error,
    not user input, when they differ) and put in stage order."""
    bad = [k for k in behaviour if k not in STAGES]
    if bad:
        raise ValueError(f"unknown behaviour stage {bad[0]!r}: stages are {', '.join(STAGES)}")
    return {k: behaviour[k] for k in STAGES if k in behaviour}


def stage_line(name: str, stage: dict) -> str:
    """One log line: refusal rate (refusals/n) and utility NLL and perplexity."""
    r, u = stage["refusal"], stage["utility"]
    return (f"{name}: refusal rate {r['rate']:.2f} ({r['refusals']}/{r['n']}), utility NLL "
            f"{u['nll']:.4f} (ppl {u['ppl']:.3f})")


def behaviour_markdown(behaviour: dict) -> str:
    """The markdown table of refusal rate and utility NLL / perplexity per stage."""
    lines = ["| stage | refusal rate | utility NLL | utility ppl |", "|---|---|---|---|"]
    for k, v in check_stages(behaviour).items():
        r, u = v["refusal"], v["utility"]
        lines.append(f"| {k} | {r['rate']:.2f} ({r['refusals']}/{r['n']}) | {u['nll']:.4f} | "
                     f"{u['ppl']:.3f} |")
    return "\n".join(lines) + "\n"
