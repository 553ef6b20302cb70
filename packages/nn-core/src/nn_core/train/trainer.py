"""A Hugging Face ``Trainer`` on instruction data, loss on the response only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.train.config import SFTConfig
from nn_core.train.lora import prepare_model, trainable_parameters


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
