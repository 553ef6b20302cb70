"""Every knob of a supervised fine-tuning run (:class:`SFTConfig`) and its result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from nn_core.errors import NNError

METHODS = ("lora", "qlora", "full")


@dataclass
class SFTConfig:
    """Settings of a supervised fine-tuning run (defaults suit a small model on a CPU)."""

    output_dir: str = "sft-out"
    method: str = "lora"  # lora | qlora (model loaded 4/8-bit) | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Sequence[str] | None = None  # None: the down-projection (mlp.down_proj, ...)
    extra_target_modules: Sequence[str] = ()  # added to the LoRA targets
    trainable_modules: Sequence[str] | None = None  # method=full: module names/suffixes to train (None: all)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    warmup_steps: float = 0  # a number of steps, or a fraction of training when < 1
    lr_scheduler_type: str = "linear"
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on where supported (CUDA with bf16)
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int | None = 2
    optim: str = "adamw_torch"
    extra_args: dict = field(default_factory=dict)  # passed to TrainingArguments

    def check(self) -> SFTConfig:
        if self.method not in METHODS:
            raise NNError(f"unknown fine-tuning method '{self.method}': use one of {', '.join(METHODS)}")
        if self.lora_r < 1:
            raise NNError(f"--lora-r must be at least 1, got {self.lora_r}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise NNError("--batch-size and --grad-accum must be at least 1")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise NNError("nothing to train: give --epochs > 0 or --max-steps > 0")
        if int(self.seed) < 0:
            raise NNError(f"--seed must be 0 or more, got {self.seed}")
        return self

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class SFTResult:
    output_dir: Path
    saved: Path  # the adapter folder (LoRA) or the model folder (full)
    metrics: dict
    global_step: int
    resumed_from: str | None
    model: nn.Module | None = None  # the trained model (PEFT-wrapped for LoRA)
