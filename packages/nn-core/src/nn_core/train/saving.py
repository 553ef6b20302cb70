"""Running a trainer, saving what was trained atomically, and the run manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

from nn_core.errors import NNError
from nn_core.train.config import SFTConfig, SFTResult
from nn_core.train.fingerprint import FINGERPRINT_FILE, check_fingerprint
from nn_core.train.lora import base_model, is_peft_model, trainable_parameters
from nn_core.train.trainer import last_checkpoint


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
    from nn_core.run.manifest import write_manifest

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
