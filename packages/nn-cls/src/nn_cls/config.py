"""Structured configs of the ``nn-cls`` Hydra apps, their config groups and validation.

The primary configs ``nn_cls_train`` (:class:`TrainConfig`) and ``nn_cls_suite``
(:class:`SuiteConfig`) are dataclasses registered in Hydra's ``ConfigStore``; every section
is a config group whose options are registered presets:

============== ====================================== =====================================
group          options (default first)                 what it sets
============== ====================================== =====================================
model          smollm2_135m, tiny_llama                base LM, device, injection, LoRA
train          default, cpu_small                      method, seed, steps, lr, checkpoints
benchmark      synthetic, synthetic2, instructions     the task stream (synthetic or records)
experts        default, small                          :class:`HippocampusConfig`
replay         default, small                          reservoir capacity, sampling, top-k
consolidation  default                                 sleep batch, pseudo ratio, EWC, refresh
scheduler      default, eager                          :class:`SchedulerConfig`
logging        disabled, offline, online               W&B mode and project
============== ====================================== =====================================

Because the nodes are typed dataclasses (OmegaConf struct mode), an unknown key or a
value of the wrong type fails composition; :func:`compose` turns any composition error
into one :class:`NNError` line, and :func:`to_engine` adds the semantic checks
(:meth:`EngineConfig.check`, the experts' and scheduler's ``check``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import SchedulerConfig
from nn_core.errors import NNError

__all__ = ["PRIMARY", "BenchmarkConfig", "ConsolidationConfig", "LoggingConfig", "ModelConfig",
           "ReplayConfig", "SuiteConfig", "SuiteSection", "TrainConfig", "TrainSection", "WandbMode",
           "compose", "register", "to_engine"]


class WandbMode(Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # any nn-core model spec (smollm2-135m is embedded, offline)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    injection_fraction: float = 0.7  # hippocampus injected at layer round(L * fraction)
    head_only: bool = False  # inject before the LM head instead (the seed's fallback)
    lora_r: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["down_proj"])
    base_train: str = "lora"  # how the base trains: lora (on lora_targets) | full (full_modules, rest frozen)
    full_modules: list[str] = field(default_factory=lambda: ["down_proj"])  # base_train=full: modules to train


@dataclass
class TrainSection:
    method: str = "full_cls"  # see nn_cls.engine.METHODS
    seed: int = 0
    steps_per_task: int = 20
    batch_size: int = 4
    lr_wake: float = 1e-3
    lr_sleep: float = 1e-3
    max_length: int = 96
    checkpoint_every: int = 0  # 0 = only at the end (and at stop_after)
    resume: str | None = None  # a checkpoint.pt or the run folder holding it
    stop_after: int | None = None  # stop (with a checkpoint) after this many wake steps
    mixed_precision: str = "no"  # AMP: no | bf16 | fp16 (fp16 needs CUDA; bf16 also runs on CPU)


@dataclass
class BenchmarkConfig:
    kind: str = "synthetic"  # synthetic (nn_eval.tasks, offline) | instructions (records with a task field)
    # synthetic: task names; instructions: values of task_field to use, in order ([] = all, by first appearance)
    tasks: list[str] = field(default_factory=lambda: ["uppercase", "first_letters", "reverse_words"])
    n_train: int = 64  # per task
    n_eval: int = 16  # per task
    local_path: str | None = None  # instructions: a JSON/JSONL/CSV/Parquet file or folder
    dataset: str | None = None  # instructions: a hub dataset owner/name[:config][@split] (nn_core.data)
    prompt_field: str = "prompt"
    response_field: str = "response"
    task_field: str = "task"


@dataclass
class ReplayConfig:
    capacity: int = 256
    sampling: str = "uniform"  # uniform | task_balanced
    top_k: int = 32  # teacher log-probs kept per supervised position


@dataclass
class ConsolidationConfig:
    sleep_batch_size: int = 4
    pseudo_ratio: float = 0.25
    ewc_lambda: float = 100.0
    ewc_gamma: float = 0.9
    fisher_per_sample: bool = True  # Fisher of per-sample (true) or per-batch (false) squared gradients
    refresh_threshold: float = 0.6
    refresh_factor: float = 0.5
    probe_size: int = 8


@dataclass
class LoggingConfig:
    wandb_mode: WandbMode = WandbMode.disabled
    project: str = "nn-cls"
    run_name: str | None = None
    log_every: int = 1  # wake/sleep records every n steps (boundaries always)
    artifacts: bool = True  # resolved config + final checkpoint as W&B artifacts


_DEFAULTS = ["_self_", {"model": "smollm2_135m"}, {"train": "default"}, {"benchmark": "synthetic"},
             {"experts": "default"}, {"replay": "default"}, {"consolidation": "default"},
             {"scheduler": "default"}, {"logging": "disabled"}]


@dataclass
class TrainConfig:
    defaults: list[Any] = field(default_factory=lambda: list(_DEFAULTS))
    model: ModelConfig = MISSING
    train: TrainSection = MISSING
    benchmark: BenchmarkConfig = MISSING
    experts: HippocampusConfig = MISSING
    replay: ReplayConfig = MISSING
    consolidation: ConsolidationConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    logging: LoggingConfig = MISSING
    out: str | None = None  # output folder (default: Hydra's run dir)
    overwrite: bool = False  # replace an out= folder that is not an nn-cls output


@dataclass
class SuiteSection:
    methods: list[str] = field(default_factory=lambda: ["full_cls", "naive", "replay"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])


@dataclass
class SuiteConfig(TrainConfig):
    suite: SuiteSection = field(default_factory=SuiteSection)


PRIMARY = {"train": "nn_cls_train", "suite": "nn_cls_suite"}

_GROUPS: dict[str, dict[str, object]] = {
    "model": {"smollm2_135m": ModelConfig(),
              "tiny_llama": ModelConfig(name="tiny-llama", device="cpu")},
    "train": {"default": TrainSection(),
              "cpu_small": TrainSection(steps_per_task=8, batch_size=2)},
    "benchmark": {"synthetic": BenchmarkConfig(),
                  "synthetic2": BenchmarkConfig(tasks=["uppercase", "reverse_words"], n_train=16, n_eval=8),
                  "instructions": BenchmarkConfig(kind="instructions", tasks=[])},
    "experts": {"default": HippocampusConfig(), "small": HippocampusConfig(num_experts=4, expert_hidden=8)},
    "replay": {"default": ReplayConfig(), "small": ReplayConfig(capacity=32, top_k=8)},
    "consolidation": {"default": ConsolidationConfig()},
    "scheduler": {"default": SchedulerConfig(),
                  "eager": SchedulerConfig(min_interval=1, max_interval=2, min_sleep_steps=1, max_sleep_steps=2)},
    "logging": {"disabled": LoggingConfig(), "offline": LoggingConfig(wandb_mode=WandbMode.offline),
                "online": LoggingConfig(wandb_mode=WandbMode.online)},
}

_registered = False


def register() -> None:
    """Store the primary configs and every group option in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name=PRIMARY["train"], node=TrainConfig)
    cs.store(name=PRIMARY["suite"], node=SuiteConfig)
    for group, options in _GROUPS.items():
        for name, node in options.items():
            cs.store(group=group, name=name, node=node)
    _registered = True


def error_message(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error (unknown key, wrong type, unknown
    group option, unparsable override)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, (ConfigKeyError, ValidationError,
                                                                  ConfigAttributeError)):
        cause = cause.__cause__
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return (f"unknown config key '{key or first}': see `nn-cls train --cfg job` for the keys "
                "(a config group option is chosen with group=option)")
    if isinstance(cause, ValidationError):
        return f"bad value for '{key}': {first}: pass a value of the key's type"
    if isinstance(exc, MissingConfigException):
        opts = ", ".join(sorted(getattr(exc, "options", None) or []))
        return f"{first}: choose one of {opts}" if opts else f"{first}: check the config group option"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override: {first}: write key=value"
    return f"{first}: check the overrides"


def compose(command: str = "train", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the ``command``'s config with ``overrides`` (Hydra's compose API), or raise one
    :class:`NNError` line."""
    from hydra import compose as hydra_compose
    from hydra import initialize
    from hydra.core.global_hydra import GlobalHydra

    register()
    if command not in PRIMARY:
        raise NNError(f"unknown command '{command}': use one of {', '.join(PRIMARY)}")
    was = GlobalHydra.instance().is_initialized()
    if was:  # inside a running Hydra app: reuse its search path
        return _compose_guarded(hydra_compose, command, overrides)
    with initialize(version_base="1.3", config_path=None):
        return _compose_guarded(hydra_compose, command, overrides)


def _compose_guarded(fn, command, overrides) -> DictConfig:
    try:
        return fn(config_name=PRIMARY[command], overrides=list(overrides))
    except NNError:
        raise
    except Exception as exc:  # Hydra and OmegaConf raise many types; all become one line
        raise NNError(error_message(exc)) from None


def to_engine(cfg: DictConfig | TrainConfig, *, method: str | None = None, seed: int | None = None):
    """The :class:`~nn_cls.engine.EngineConfig` of a composed config (checked: one
    :class:`NNError` line for a bad value)."""
    from nn_cls.engine import EngineConfig

    c = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    b = c.benchmark
    source = None
    tasks = tuple(b.tasks)
    if b.kind == "synthetic":
        from nn_eval.tasks import TASKS

        unknown = [t for t in b.tasks if t not in TASKS]
        if unknown:
            raise NNError(f"unknown synthetic task(s) {unknown} in benchmark.tasks: use some of {', '.join(TASKS)}")
    elif b.kind == "instructions":
        if (b.local_path is None) == (b.dataset is None):
            raise NNError("benchmark=instructions needs exactly one of benchmark.local_path (a file) or "
                          "benchmark.dataset (a hub dataset name)")
        from pathlib import Path

        from nn_cls.streams import instruction_stream

        source = str(Path(b.local_path).expanduser().resolve()) if b.local_path is not None else b.dataset
        tasks = tuple(instruction_stream(source, prompt_field=b.prompt_field, response_field=b.response_field,
                                         task_field=b.task_field, tasks=tasks or None))
    else:
        raise NNError(f"benchmark.kind '{b.kind}' is unknown: use synthetic or instructions")
    for name, v, lo in (("benchmark.n_train", c.benchmark.n_train, 1), ("benchmark.n_eval", c.benchmark.n_eval, 1),
                        ("train.max_length", c.train.max_length, 8), ("replay.top_k", c.replay.top_k, 1),
                        ("consolidation.sleep_batch_size", c.consolidation.sleep_batch_size, 1),
                        ("consolidation.probe_size", c.consolidation.probe_size, 1),
                        ("logging.log_every", c.logging.log_every, 1), ("model.lora_r", c.model.lora_r, 1),
                        ("train.checkpoint_every", c.train.checkpoint_every, 0)):
        if v < lo:
            raise NNError(f"{name} must be at least {lo}, got {v}")
    if c.train.stop_after is not None and c.train.stop_after < 1:
        raise NNError(f"train.stop_after must be at least 1 (or null), got {c.train.stop_after}")
    e = EngineConfig(
        method=method or c.train.method, tasks=tasks, source=source, prompt_field=b.prompt_field,
        response_field=b.response_field, task_field=b.task_field, n_train=c.benchmark.n_train,
        n_eval=c.benchmark.n_eval, max_length=c.train.max_length, steps_per_task=c.train.steps_per_task,
        batch_size=c.train.batch_size, lr_wake=c.train.lr_wake, lr_sleep=c.train.lr_sleep,
        lora_r=c.model.lora_r, lora_targets=tuple(c.model.lora_targets), top_k=c.replay.top_k,
        base_train=c.model.base_train, full_modules=tuple(c.model.full_modules),
        fisher_per_sample=c.consolidation.fisher_per_sample,
        replay_capacity=c.replay.capacity, replay_sampling=c.replay.sampling,
        sleep_batch_size=c.consolidation.sleep_batch_size, pseudo_ratio=c.consolidation.pseudo_ratio,
        ewc_lambda=c.consolidation.ewc_lambda, ewc_gamma=c.consolidation.ewc_gamma,
        refresh_threshold=c.consolidation.refresh_threshold, refresh_factor=c.consolidation.refresh_factor,
        probe_size=c.consolidation.probe_size, injection_fraction=c.model.injection_fraction,
        head_only=c.model.head_only, seed=c.train.seed if seed is None else seed,
        mixed_precision=c.train.mixed_precision,
        experts=c.experts, scheduler=c.scheduler)
    e.check()
    e.experts.check()
    e.scheduler.check()
    if not 0.0 <= e.pseudo_ratio <= 1.0:
        raise NNError(f"consolidation.pseudo_ratio must be in [0, 1], got {e.pseudo_ratio}")
    if not 0.0 <= e.ewc_gamma <= 1.0:
        raise NNError(f"consolidation.ewc_gamma must be in [0, 1], got {e.ewc_gamma}")
    if e.mixed_precision == "fp16":  # before any model is loaded
        from nn_cls.distributed import check_mixed_precision
        from nn_core.device import resolve_device

        check_mixed_precision(e.mixed_precision, resolve_device(c.model.device))
    if not 0.0 <= e.injection_fraction <= 1.0:
        raise NNError(f"model.injection_fraction must be in [0, 1], got {e.injection_fraction}")
    from nn_cls.replay import SAMPLING

    if e.replay_sampling not in SAMPLING:
        raise NNError(f"replay.sampling must be one of {', '.join(SAMPLING)}, got '{e.replay_sampling}'")
    return e
