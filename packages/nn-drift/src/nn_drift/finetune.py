"""LoRA fine-tuning with drift tracking, through :mod:`nn_core.train`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from nn_core.errors import NNError


def block_linear_targets(model: nn.Module) -> list[str]:
    """The distinct leaf names of the linear (and Conv1D) layers inside the decoder
    blocks, e.g. ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``: LoRA
    on all of them, as a user fine-tuning for utility would."""
    from nn_core.model.adapters import get_adapter, is_conv1d

    prefix = get_adapter(model).layers_path + "."
    names = []
    for name, mod in model.named_modules():
        if name.startswith(prefix) and (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    if not names:
        raise NNError("no linear layers in the decoder blocks: pass --targets")
    return names


def finetune_with_drift(model: nn.Module, tokenizer, examples: Sequence, groups: Mapping,
                        config, *, track_every: int = 10, freeze: Sequence[str] = (),
                        resume: bool = True, model_spec: str | None = None,
                        manifest_extra: Mapping | None = None, progress: bool | None = None,
                        tool: str | None = None):
    """Fine-tune ``model`` (plain) with ``config`` (an :class:`nn_core.train.SFTConfig`;
    ``target_modules=None`` means every linear layer of the blocks) while a
    :class:`~nn_drift.drift.DriftTracker` logs the drift of ``groups`` into
    ``config.output_dir/drift.jsonl``; groups named in ``freeze`` are kept out of LoRA's
    update (:class:`~nn_drift.drift.FreezeRows`). ``progress``: a bar of optimizer steps
    (default: when stderr is a terminal). Returns (SFTResult, tracker)."""
    from nn_core.train import build_trainer, prepare_model, train
    from nn_core.train.fingerprint import run_fingerprint
    from nn_drift.drift import DriftTracker, FreezeRows

    if config.method != "lora":
        raise NNError("drift tracking reads LoRA adapters: use method lora")
    missing = [f for f in freeze if f not in groups]
    if missing:
        raise NNError(f"--freeze-group '{missing[0]}' is not one of the groups "
                      f"({', '.join(groups)}): name a tracked group")
    if config.target_modules is None:
        config.target_modules = block_linear_targets(model)
    for name, g in groups.items():  # groups made for another model fail here, before training
        g.validate(model, check_id=False) if hasattr(g, "shapes") else g.validate(model)
        del name
    peft_model = prepare_model(model, config)
    tracker = DriftTracker(peft_model, groups, config.output_dir, every=track_every)
    callbacks = [tracker, *[FreezeRows(peft_model, groups[f]) for f in freeze],
                 step_progress("finetune", progress)]
    trainer = build_trainer(peft_model, tokenizer, examples, config, callbacks=callbacks,
                            prepare=False)
    parts = {"groups": {n: [g.meta.get("method"), len(g)] for n, g in groups.items()},
             "freeze": list(freeze), "track_every": track_every,
             "data": [[e.prompt, e.response] for e in examples[:50]], "n_examples": len(examples)}
    result = train(trainer, config, resume=resume, model_spec=model_spec, tool=tool,
                   fingerprint=run_fingerprint(config, parts),
                   manifest_extra={"groups": {n: len(g) for n, g in groups.items()},
                                   "freeze": list(freeze), "track_every": track_every,
                                   **dict(manifest_extra or {})})
    return result, tracker


def step_progress(desc: str, progress: bool | None = None):
    """A ``TrainerCallback`` that shows a progress bar of optimizer steps (nn-core's trainer
    runs with the Trainer's own bars disabled); ``progress`` as in
    :func:`nn_drift.behaviour.progress_enabled`."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    from nn_drift.behaviour import progress_enabled

    class _StepProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc,
                            leave=False, disable=not progress_enabled(progress))

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return _StepProgress()
