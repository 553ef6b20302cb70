"""nn-cls: complementary learning systems for continual learning of causal LMs.

A fast hippocampus (:class:`Hippocampus`, a mixture of small MLP experts) is injected into
the residual stream of a pretrained causal LM (:class:`CLSSystem`, through
:func:`nn_core.intervene.inject`) and learns new tasks while awake; the episodes it sees go
to a reservoir replay buffer (:class:`ReplayBuffer`) with the teacher's sparse top-k
log-probabilities from the same forward; sleep consolidates them into the base (LoRA) by
sparse-teacher distillation plus online EWC, and refreshes consolidated experts.
:func:`run_stream` runs a method over a task stream (with complete checkpoints and exact
resume); ``nn-cls train`` / ``nn-cls suite`` (:mod:`nn_cls.cli`) are its Hydra apps
(:mod:`nn_cls.config`), logging to ``metrics.jsonl`` and optionally W&B
(:mod:`nn_cls.tracking`). See ``docs/nn-cls.md``.

Public names are resolved lazily (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nn_core.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "hippocampus": ["Hippocampus", "HippocampusConfig"],
    "system": ["CLSSystem", "injection_layer"],
    "engine": ["CHECKPOINT_KEYS", "METHODS", "EngineConfig", "config_hash", "load_checkpoint", "run_stream"],
    "config": ["TrainConfig", "SuiteConfig", "compose", "to_engine"],
    "tracking": ["MetricsLogger"],
    "app": ["run_suite", "run_train"],
    "phases": ["OnlineEWC", "SchedulerConfig", "SleepScheduler", "agreement", "probe_forgetting",
               "refresh", "sleep_step", "wake_step"],
    "replay": ["Episode", "ReplayBuffer", "collate_episodes", "episodes_from_batch", "full_logits_bytes"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from nn_cls.app import run_suite, run_train  # noqa: F401
    from nn_cls.config import SuiteConfig, TrainConfig, compose, to_engine  # noqa: F401
    from nn_cls.engine import (  # noqa: F401
        CHECKPOINT_KEYS,
        METHODS,
        EngineConfig,
        config_hash,
        load_checkpoint,
        run_stream,
    )
    from nn_cls.hippocampus import Hippocampus, HippocampusConfig  # noqa: F401
    from nn_cls.phases import (  # noqa: F401
        OnlineEWC,
        SchedulerConfig,
        SleepScheduler,
        agreement,
        probe_forgetting,
        refresh,
        sleep_step,
        wake_step,
    )
    from nn_cls.replay import (  # noqa: F401
        Episode,
        ReplayBuffer,
        collate_episodes,
        episodes_from_batch,
        full_logits_bytes,
    )
    from nn_cls.system import CLSSystem, injection_layer  # noqa: F401
    from nn_cls.tracking import MetricsLogger  # noqa: F401


