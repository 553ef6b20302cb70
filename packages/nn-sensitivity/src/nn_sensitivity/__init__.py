"""nn-sensitivity: which weights matter, proven against controls.

Score every weight with a sensitivity metric, rank (global or per-layer top-K with
random and bottom controls of the same size), perturb with exact restore, and measure
the damage on held-out text.

>>> from nn_sensitivity import score, select, perturbed
>>> s = score(model, batches, "grad_x_weight")
>>> top = select(s, 100)
>>> with perturbed(model, top, "sign_flip"):
...     ...
"""

from nn_sensitivity.metrics import METRICS, Scores, histograms, score
from nn_sensitivity.params import ParamInfo, eligible_params
from nn_sensitivity.perturb import PERTURBATIONS, bit_flip_values, perturbed, perturbed_tensors
from nn_sensitivity.rank import CONTROLS, MODES, Ranking, bottom_k, random_k, rank, select, top_k
from nn_sensitivity.runner import StudyConfig, evaluate_weightset, run_study
from nn_sensitivity.stability import jaccard_matrix

__version__ = "0.1.0"

__all__ = [
    "CONTROLS",
    "METRICS",
    "MODES",
    "PERTURBATIONS",
    "ParamInfo",
    "Ranking",
    "Scores",
    "StudyConfig",
    "bit_flip_values",
    "bottom_k",
    "eligible_params",
    "evaluate_weightset",
    "histograms",
    "jaccard_matrix",
    "perturbed",
    "perturbed_tensors",
    "random_k",
    "rank",
    "run_study",
    "score",
    "select",
    "top_k",
]
