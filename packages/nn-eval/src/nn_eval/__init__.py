"""nn-eval: perplexity, benchmark scoring, continual-learning metrics and a task suite."""

from nn_eval.continual import cl_metrics, load_baseline, load_matrix, plot_matrix, save_matrix
from nn_eval.lm import evaluate_lm
from nn_eval.tasks import TASKS, Task, export_tasks, get_task, make_split

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "Task",
    "cl_metrics",
    "evaluate_lm",
    "export_tasks",
    "get_task",
    "load_baseline",
    "load_matrix",
    "make_split",
    "plot_matrix",
    "save_matrix",
]
