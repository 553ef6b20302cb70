"""Model preparation: LoRA / QLoRA through PEFT, or full fine-tuning of chosen modules."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from nn_core.errors import NNError, require
from nn_core.train.config import SFTConfig


def _peft():
    return require("peft", feature="LoRA fine-tuning", package="nn-core", extra="lora")


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if is_peft_model(model) else model


def _linear_names(model: nn.Module) -> list[str]:
    from nn_core.intervene.surgery import SplitLinear

    return [name for name, mod in model.named_modules()
            if name and (isinstance(mod, (nn.Linear, SplitLinear))
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
    from nn_core.model.adapters import get_adapter

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
    A model with split layers (:mod:`nn_core.intervene.surgery`, e.g. a LoKI model) trains
    only the trainable slices of its split layers when ``trainable_modules`` is None
    (:func:`~nn_core.intervene.surgery.train_only_splits`; the frozen rest is a buffer, so it
    has no optimizer state); a split layer named in ``trainable_modules`` trains its slice.
    LoRA on a model with split layers is refused (merge them first).
    """
    from nn_core.intervene.surgery import split_modules, train_only_splits
    from nn_core.model.adapters import get_adapter

    config.check()
    if is_peft_model(model):
        raise NNError("the model is already wrapped by PEFT: pass the plain model to prepare_model")
    has_splits = bool(split_modules(model))
    if config.method == "full":
        if has_splits and not config.trainable_modules:
            train_only_splits(model)
            return model
        if config.trainable_modules:
            wanted = list(config.trainable_modules)
            _check_targets(model, wanted, "trainable module(s)")
            for name, p in model.named_parameters():
                owner = name.rsplit(".", 1)[0]
                p.requires_grad_(any(_matches(owner, w) for w in wanted))
        return model
    if has_splits:
        raise NNError("the model has split layers (e.g. a LoKI model): train it with method full, "
                      "or merge the splits (nn_core.intervene.surgery.merge_all) before LoRA")
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
