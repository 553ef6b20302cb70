"""Supervised fine-tuning factory shared by the method packages.

Three small pieces that compose:

* :class:`SFTConfig`: every knob, as a dataclass (JSON-able, recorded in the manifest).
* :func:`prepare_model`: LoRA / QLoRA through PEFT, or full fine-tuning of chosen modules.
  LoRA targets default to the MLP down-projection, by its real path inside a decoder
  block for the architecture (``mlp.down_proj``, ``mlp.c_proj``, ``mlp.dense_4h_to_h``,
  ``fc2``: from :func:`nn_core.adapters.get_adapter`; the bare leaf name would also catch
  GPT-2's attention ``c_proj``), plus any ``extra_target_modules``.
* :func:`build_trainer` -> a Hugging Face ``Trainer`` on instruction data (loss on the
  response only: labels are -100 on the prompt, :func:`nn_core.data.tokenize_examples`),
  and :func:`train`, which runs it (resuming from the last checkpoint in ``output_dir``
  when there is one), saves the adapter (or the trained model) and the tokenizer
  atomically, and writes ``manifest.json``.

After PEFT wraps a model, resolve nn-core adapters, sites and masks on
``base_model(peft_model)``: the down-projection path then leads to PEFT's LoRA layer, whose
input is the ``mlp_act`` site, so a forward mask attached *after* wrapping acts on both the
frozen weight and the LoRA path (a masked channel gives its LoRA ``A`` column zero
gradient). A mask attached *before* wrapping would sit on the inner base layer and miss
the LoRA path: attach masks after :func:`prepare_model`.

:class:`WeightMaskCallback` keeps a :class:`nn_core.masks.WeightMask` in force during
training: frozen entries get zero gradient and are written back after every optimizer
step, so they stay bit-identical through AdamW weight decay.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from nn_core.errors import NNError, require

METHODS = ("lora", "qlora", "full")


def _peft():
    return require("peft", feature="LoRA fine-tuning", package="nn-core", extra="lora")


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


# --------------------------------------------------------------------------- model preparation
def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if is_peft_model(model) else model


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules()
            if name and (isinstance(mod, nn.Linear)
                         or type(mod).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"))]


def _matches(name: str, suffix: str) -> bool:
    """PEFT's rule for a target given as a string: the module path equals it or ends in
    ``.suffix``."""
    return name == suffix or name.endswith("." + suffix)


def _check_targets(model: nn.Module, names: Sequence[str], what: str) -> None:
    linears = _linear_names(model)
    missing = [n for n in names if not any(_matches(x, n) for x in linears)]
    if missing:
        leaves = sorted({x.rsplit(".", 1)[-1] for x in linears})
        raise NNError(f"{what} {', '.join(missing)} not found in the model: its linear layers are "
                      f"named {', '.join(leaves)} (a name matches a module path or its end, e.g. mlp.down_proj)")


def down_proj_target(model: nn.Module) -> str:
    """The down-projection as a PEFT target: its path inside a decoder block (``mlp.down_proj``,
    ``mlp.c_proj``, ``mlp.dense_4h_to_h``, ``fc2``). The leaf name alone is not enough: GPT-2
    also has an ``attn.c_proj``."""
    from nn_core.adapters import get_adapter

    return get_adapter(base_model(model)).down_rel


def resolve_target_modules(model: nn.Module, config: SFTConfig) -> list[str]:
    """LoRA targets: ``config.target_modules`` or the down-projection (:func:`down_proj_target`),
    plus ``extra_target_modules``. Each matches module paths equal to it or ending in
    ``.name`` (PEFT's rule) and must match at least one linear layer."""
    names = list(config.target_modules) if config.target_modules else [down_proj_target(model)]
    names += [n for n in config.extra_target_modules if n not in names]
    _check_targets(model, names, "LoRA target module(s)")
    return names


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_quantized", False))


def prepare_model(model: nn.Module, config: SFTConfig) -> nn.Module:
    """Wrap ``model`` for ``config.method``; returns the model to train.

    ``lora``/``qlora``: a PEFT ``PeftModel`` with LoRA on the resolved targets (GPT-2's
    Conv1D gets ``fan_in_fan_out``); ``qlora`` needs a model loaded quantized
    (``load_model(..., quantization="4bit")``) and prepares it for k-bit training.
    ``full``: parameters outside ``trainable_modules`` are frozen (``requires_grad=False``).
    """
    from nn_core.adapters import get_adapter

    config.check()
    if is_peft_model(model):
        raise NNError("the model is already wrapped by PEFT: pass the plain model to prepare_model")
    if config.method == "full":
        if config.trainable_modules:
            wanted = list(config.trainable_modules)
            _check_targets(model, wanted, "trainable module(s)")
            for name, p in model.named_parameters():
                owner = name.rsplit(".", 1)[0]
                p.requires_grad_(any(_matches(owner, w) for w in wanted))
        return model
    peft = _peft()
    quantized = _is_quantized(model)
    if config.method == "qlora":
        if not quantized:
            raise NNError("qlora needs a model loaded in 4 or 8 bits: load it with --quantization 4bit "
                          "(CUDA and bitsandbytes), or use --method lora")
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif quantized:
        raise NNError("the model is quantized: use --method qlora (LoRA on a frozen quantized model)")
    targets = resolve_target_modules(model, config)
    from nn_core.device import seed_everything

    # LoRA A is drawn at random when PEFT wraps the model: seed it so a run is reproducible.
    seed_everything(config.seed)
    lora = peft.LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, task_type="CAUSAL_LM", bias="none",
        fan_in_fan_out=get_adapter(model).conv1d,
    )
    return peft.get_peft_model(model, lora)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# --------------------------------------------------------------------------- callbacks
def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class WeightMaskCallback(_callback_base()):
    """Keep a :class:`~nn_core.masks.WeightMask` in force while a Trainer trains.

    ``build`` makes the mask at the start of training (after a resumed checkpoint is
    loaded, so the saved copy is of the weights actually trained from): its gradient hooks
    zero the frozen entries' gradients and, after every optimizer step, the frozen entries
    are written back, so they remain bit-identical.
    """

    def __init__(self, build: Callable[[], object]):
        self.build = build
        self.mask = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.mask = self.build()
        self.mask.attach(None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.mask is not None:
            self.mask.restore()

    def on_train_end(self, args, state, control, **kwargs):
        if self.mask is not None:
            self.mask.restore()
            self.mask.remove()


# --------------------------------------------------------------------------- trainer
def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _features(tokenizer, train, max_length: int):
    """Examples -> tokenized features (labels -100 on the prompt); features pass through."""
    from nn_core.data import Example, tokenize_examples

    train = list(train)
    if not train:
        raise NNError("no training examples: check the instruction data file")
    if isinstance(train[0], Example):
        return list(tokenize_examples(tokenizer, train, max_length))
    if isinstance(train[0], dict) and "input_ids" in train[0]:
        return train
    raise NNError("training data must be nn_core.data.Example objects or dicts with input_ids")


def build_trainer(
    model: nn.Module,
    tokenizer,
    train_examples: Sequence,
    config: SFTConfig,
    *,
    eval_examples: Sequence | None = None,
    callbacks: Sequence = (),
    prepare: bool = True,
):
    """A Hugging Face ``Trainer`` for ``config``.

    ``model`` is wrapped by :func:`prepare_model` unless ``prepare`` is False (pass an
    already prepared model then, e.g. to attach masks in between). ``train_examples`` are
    :class:`nn_core.data.Example` objects (rendered with the chat template and tokenized,
    loss on the response) or ready features ``{"input_ids", "labels"}``.
    """
    from transformers import Trainer, TrainingArguments

    from nn_core.data import collate
    from nn_core.device import seed_everything

    config.check()
    seed_everything(config.seed)
    if prepare:
        model = prepare_model(model, config)
    if trainable_parameters(model)[0] == 0:
        raise NNError("no parameter is trainable: check --method and the target/trainable modules")
    train_features = _features(tokenizer, train_examples, config.max_length)
    eval_features = _features(tokenizer, eval_examples, config.max_length) if eval_examples else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bf16 = bf16_supported() if config.bf16 is None else bool(config.bf16)
    if bf16 and not bf16_supported():
        raise NNError("bf16 was asked for but this device does not support it: drop --bf16")
    on_cpu = not any(p.is_cuda for p in model.parameters())
    args = TrainingArguments(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        bf16=bf16,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        optim=config.optim,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=on_cpu,
        disable_tqdm=True,
        **config.extra_args,
    )
    return Trainer(
        model=model, args=args, train_dataset=train_features, eval_dataset=eval_features,
        data_collator=lambda feats: collate(feats, pad_id), processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` that holds trainer state."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    if not out.is_dir():
        return None
    ckpt = get_last_checkpoint(str(out))
    if ckpt is None or not (Path(ckpt) / "trainer_state.json").is_file():
        return None
    return ckpt


FINGERPRINT_FILE = "run_fingerprint.json"
# Bookkeeping that may change between a run and its resumption without changing what is trained.
_FINGERPRINT_SKIP = ("output_dir", "logging_steps", "save_steps", "save_total_limit")


def _digest(obj) -> str:
    import hashlib

    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_fingerprint(config: SFTConfig, parts: dict | None = None) -> dict:
    """What identifies a training run: the SFT settings (less output/logging bookkeeping)
    and the caller's ``parts`` (data hash, masks, ...), each with its own hash so a
    mismatch can be named; ``hash`` covers them all."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _FINGERPRINT_SKIP}
    flat = {f"config.{k}": _digest(v) for k, v in sorted(fields.items())}
    flat.update({str(k): _digest(v) for k, v in sorted((parts or {}).items())})
    return {"version": 1, "parts": flat, "hash": _digest(flat)}


def check_fingerprint(folder: str | Path, fingerprint: dict) -> None:
    """Raise :class:`NNError` unless ``folder`` holds the same run fingerprint (a checkpoint
    there is about to be resumed)."""
    path = Path(folder) / FINGERPRINT_FILE
    fix = "use a fresh --out or --no-resume"
    if not path.is_file():
        raise NNError(f"'{folder}' holds a checkpoint but no {FINGERPRINT_FILE}, so it cannot be shown to "
                      f"belong to this run: {fix}")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_parts = dict(old["parts"])
    except (ValueError, KeyError, TypeError):
        raise NNError(f"'{path}' is unreadable, so the checkpoint cannot be shown to belong to this run: {fix}") from None
    if old.get("hash") == fingerprint["hash"]:
        return
    new_parts = fingerprint["parts"]
    diff = sorted(k for k in set(old_parts) | set(new_parts) if old_parts.get(k) != new_parts.get(k))
    raise NNError(f"the checkpoint in '{folder}' belongs to a different run ({', '.join(diff) or 'fingerprint'} "
                  f"differ): {fix}")


def train(trainer, config: SFTConfig, *, resume: bool | str = True, manifest_extra: dict | None = None,
          model_spec: str | None = None, fingerprint: dict | None = None) -> SFTResult:
    """Run ``trainer``, save what was trained and write ``manifest.json``.

    ``resume``: True continues from the last checkpoint in ``output_dir`` when there is
    one; a path resumes from that checkpoint; False starts over. The adapter (LoRA) or the
    model (full) goes to ``output_dir/adapter`` or ``output_dir/model`` atomically, with the
    tokenizer.

    ``fingerprint`` (from :func:`run_fingerprint`) is written to ``output_dir`` before
    training; resuming a checkpoint whose folder records a different fingerprint (or
    none) raises :class:`NNError` instead of silently continuing another run.
    """
    from nn_core.io import atomic_dir, atomic_write_json
    from nn_core.manifest import write_manifest

    out = Path(config.output_dir)
    ckpt: str | None = None
    if isinstance(resume, (str, Path)):
        if not (Path(resume) / "trainer_state.json").is_file():
            raise NNError(f"'{resume}' is not a training checkpoint (no trainer_state.json): "
                          "pass a checkpoint-N folder or --no-resume")
        ckpt = str(resume)
    elif resume:
        ckpt = last_checkpoint(out)
    if fingerprint is not None:
        if ckpt is not None:
            check_fingerprint(Path(ckpt).parent, fingerprint)
        atomic_write_json(out / FINGERPRINT_FILE, fingerprint)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=ckpt)
    train_s = time.perf_counter() - t0
    model = trainer.model
    peft = is_peft_model(model)
    target = out / ("adapter" if peft else "model")
    t1 = time.perf_counter()
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(tmp))
    metrics = dict(result.metrics)
    metrics["global_step"] = int(result.global_step)
    metrics["training_loss"] = float(result.training_loss)
    history = [h for h in trainer.state.log_history if "loss" in h]
    atomic_write_json(out / "train_log.json", {"metrics": metrics, "history": history})
    trainable, total = trainable_parameters(model)
    write_manifest(
        out, config=config.to_dict(), model=base_model(model), model_spec=model_spec,
        seeds=config.seed, phases={"train": train_s, "save": time.perf_counter() - t1},
        extra={"method": config.method, "resumed_from": ckpt, "metrics": _jsonable(metrics),
               **({"fingerprint": fingerprint["hash"]} if fingerprint is not None else {}),
               "trainable_parameters": trainable, "total_parameters": total,
               **(manifest_extra or {})},
    )
    return SFTResult(out, target, metrics, int(result.global_step), ckpt, model)


def _jsonable(obj: dict) -> dict:
    return json.loads(json.dumps(obj, default=str))
