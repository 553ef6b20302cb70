"""nn-eval: perplexity, benchmark scoring, continual-learning metrics and a task suite."""

from nn_eval.lm import evaluate_lm

__version__ = "0.1.0"

__all__ = ["evaluate_lm"]
