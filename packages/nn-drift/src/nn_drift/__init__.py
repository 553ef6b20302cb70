"""nn-drift: safety-critical weights and neurons, and how they drift under fine-tuning.

SNIP and Wanda scores on a safety and a utility set (:mod:`nn_drift.scores`), groups of
weights or neurons (top-k, set difference, utility top, random; :mod:`nn_drift.groups`),
LoRA fine-tuning with drift tracking (:mod:`nn_drift.drift`), a refusal detector
(:mod:`nn_drift.refusal`) and the embedded data (:mod:`nn_drift.data`).

Public names are resolved lazily (PEP 562), so ``nn-drift --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nn_core.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "data": ["ASSISTANT_OPENERS", "UTILITY_TASKS", "embedded_records", "load_examples",
             "response_batches"],
    "refusal": ["REFUSAL_PHRASES", "is_refusal", "refusal_rate"],
    "scores": ["ParamMeta", "ScoreTable", "compute_scores", "load_scores"],
    "groups": ["make_groups", "neuron_scores", "summary", "top_neurons", "top_weights"],
    "drift": ["DriftTracker", "FreezeRows", "load_groups", "member_metrics", "read_drift"],
    "finetune": ["block_linear_targets", "finetune_with_drift"],
    "analysis": ["bootstrap_ci", "cohens_d", "compare", "mann_whitney_p", "verdict",
                 "write_analysis"],
    "behaviour": ["STAGES", "behaviour_markdown", "measure_stage", "refusal_eval", "utility_eval"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers see the real names
    from nn_drift.analysis import (  # noqa: F401
        bootstrap_ci,
        cohens_d,
        compare,
        mann_whitney_p,
        verdict,
        write_analysis,
    )
    from nn_drift.behaviour import (  # noqa: F401
        STAGES,
        behaviour_markdown,
        measure_stage,
        refusal_eval,
        utility_eval,
    )
    from nn_drift.data import (  # noqa: F401
        ASSISTANT_OPENERS,
        UTILITY_TASKS,
        embedded_records,
        load_examples,
        response_batches,
    )
    from nn_drift.drift import (  # noqa: F401
        DriftTracker,
        FreezeRows,
        load_groups,
        member_metrics,
        read_drift,
    )
    from nn_drift.finetune import block_linear_targets, finetune_with_drift  # noqa: F401
    from nn_drift.groups import (  # noqa: F401
        make_groups,
        neuron_scores,
        summary,
        top_neurons,
        top_weights,
    )
    from nn_drift.refusal import REFUSAL_PHRASES, is_refusal, refusal_rate  # noqa: F401
    from nn_drift.scores import ParamMeta, ScoreTable, compute_scores, load_scores  # noqa: F401
