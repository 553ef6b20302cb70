"""nn-eval: perplexity, benchmark scoring, continual-learning metrics and a task suite."""

from nn_eval.continual import cl_metrics, load_baseline, load_matrix, plot_matrix, save_matrix
from nn_eval.generation import exact_match, greedy_generate, normalize
from nn_eval.lm import NonFiniteLogits, evaluate_lm
from nn_eval.multiple_choice import MCItem, load_mc, loglikelihoods, mc_items, score_multiple_choice
from nn_eval.tasks import TASKS, Task, export_tasks, get_task, make_split

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "MCItem",
    "NonFiniteLogits",
    "Task",
    "cl_metrics",
    "evaluate_lm",
    "exact_match",
    "export_tasks",
    "get_task",
    "greedy_generate",
    "load_baseline",
    "load_matrix",
    "load_mc",
    "loglikelihoods",
    "make_split",
    "mc_items",
    "normalize",
    "plot_matrix",
    "save_matrix",
    "score_multiple_choice",
]
