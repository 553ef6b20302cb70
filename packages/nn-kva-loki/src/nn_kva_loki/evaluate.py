"""``nn-kva-loki eval``: the paper's claim in one table.

For each model (the base, the trained LoKI model, and a LoRA run with about the same
number of trainable parameters) on the same data:

* **task loss**: mean negative log-likelihood per *response* token of the held-out task
  examples (prompt tokens unscored), ``nn_eval.lm.evaluate_lm`` on
  ``nn_core.data.tokenize_examples`` features; ``task token acc``: the matching top-1
  token accuracy;
* **task accuracy**: exact match of greedy generations (``nn_eval.generation.exact_match``,
  whitespace-normalised) with the reference responses;
* **general PPL**: perplexity on held-out general text (default: the held-out documents of
  CPython's ``pydoc`` topics, ``nn_core.data.split_texts`` with the given fraction and
  seed), and **ΔPPL** = PPL(model) - PPL(base): the damage to what the model already knew.

The LoRA control (:func:`train_lora_control`) trains rank-``r`` LoRA on every layer's
down-projection through :mod:`nn_core.train` with the LoKI run's SFT settings, ``r``
chosen so ``r * L * (in + out)`` is closest to the LoKI run's active parameters
(:func:`nn_kva_loki.loki.lora_rank_for_budget`); both counts are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn


@dataclass
class EvalSettings:
    general: str = "pydoc"
    general_heldout_fraction: float = 0.1
    general_samples: int = 32
    max_length: int = 256
    batch_size: int = 8
    exact_match: bool = True
    max_new_tokens: int = 32
    seed: int = 0
    extra: dict = field(default_factory=dict)


def general_texts(settings: EvalSettings) -> list[str]:
    """The held-out general documents scored for ΔPPL (the first ``general_samples``)."""
    from nn_core.data import load_texts, split_texts

    texts = load_texts(settings.general)
    _, held = split_texts(texts, settings.general_heldout_fraction, settings.seed)
    return held[: settings.general_samples]


def model_metrics(model: nn.Module, tokenizer, task_examples: Sequence, texts: Sequence[str],
                  settings: EvalSettings) -> dict:
    """Task loss / token accuracy / exact-match accuracy and general perplexity of ``model``."""
    from nn_core.data import tokenize_examples
    from nn_eval.lm import evaluate_lm

    out: dict = {}
    if task_examples:
        feats = [dict(f) for f in tokenize_examples(tokenizer, list(task_examples), settings.max_length)]
        lm = evaluate_lm(model, tokenizer, feats, max_length=settings.max_length, batch_size=settings.batch_size)
        out.update(task_loss=lm["nll"], task_token_acc=lm["token_acc"], task_tokens=lm["n_tokens"])
        if settings.exact_match:
            from nn_eval.generation import exact_match

            em = exact_match(model, tokenizer, list(task_examples), max_new_tokens=settings.max_new_tokens,
                             batch_size=settings.batch_size)
            out.update(task_accuracy=em["accuracy"], task_n=em["n"])
    if texts:
        gen = evaluate_lm(model, tokenizer, list(texts), max_length=settings.max_length,
                          batch_size=settings.batch_size)
        out.update(general_ppl=gen["ppl"], general_nll=gen["nll"], general_tokens=gen["n_tokens"])
    return out


def train_lora_control(base_model: nn.Module, tokenizer, train_examples: Sequence, config, budget: int, *,
                       output_dir: str, model_spec: str | None = None, resume: bool = True):
    """Train LoRA on the down-projections with a rank matching ``budget`` trainable
    parameters; returns ``(SFTResult, rank, lora_parameters)`` (the result's ``model`` is
    the trained PEFT model)."""
    from dataclasses import replace

    from nn_core.train import build_trainer, trainable_parameters
    from nn_core.train import train as run_training
    from nn_kva_loki.loki import lora_rank_for_budget

    rank, _ = lora_rank_for_budget(base_model, budget)
    cfg = replace(config, method="lora", lora_r=rank, lora_alpha=2 * rank, target_modules=None,
                  extra_target_modules=(), trainable_modules=None, output_dir=output_dir).check()
    trainer = build_trainer(base_model, tokenizer, train_examples, cfg)
    counted = trainable_parameters(trainer.model)[0]
    result = run_training(trainer, cfg, resume=resume, model_spec=model_spec,
                          manifest_extra={"lora_control": {"rank": rank, "budget": budget,
                                                            "lora_parameters": counted}})
    return result, rank, counted


def delta_table(rows: dict[str, dict]) -> dict[str, dict]:
    """Add ``general_dppl`` (PPL - base PPL) to every row; ``rows["base"]`` is the reference."""
    base = rows.get("base", {}).get("general_ppl")
    for row in rows.values():
        ppl = row.get("general_ppl")
        row["general_dppl"] = None if base is None or ppl is None else ppl - base
    return rows


def format_table(rows: dict[str, dict]) -> str:
    """A fixed-width text table of the comparison."""
    cols = [("trainable", "trainable_parameters", "{:d}"), ("task loss", "task_loss", "{:.4f}"),
            ("token acc", "task_token_acc", "{:.3f}"), ("task acc", "task_accuracy", "{:.3f}"),
            ("general PPL", "general_ppl", "{:.3f}"), ("ΔPPL", "general_dppl", "{:+.3f}")]
    header = f"{'model':<8}" + "".join(f"{name:>13}" for name, _, _ in cols)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        cells = []
        for _, key, fmt in cols:
            v = row.get(key)
            cells.append(f"{'-' if v is None else fmt.format(v):>13}")
        lines.append(f"{name:<8}" + "".join(cells))
    return "\n".join(lines)
