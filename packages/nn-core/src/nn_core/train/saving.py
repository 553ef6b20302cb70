"""Running a trainer, saving what was trained atomically, and the run manifest."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from nn_core.errors import NNError
from nn_core.train.config import SFTConfig, SFTResult
from nn_core.train.fingerprint import FINGERPRINT_FILE, check_fingerprint
from nn_core.train.lora import base_model, is_peft_model, trainable_parameters
from nn_core.train.trainer import last_checkpoint


def train(trainer, config: SFTConfig, *, resume: bool | str = True, manifest_extra: dict | None = None,
          model_spec: str | None = None, fingerprint: dict | None = None,
          extra_files: Callable[[Path], object] | None = None, tool: str | None = None) -> SFTResult:
    """Run ``trainer``, save what was trained and write ``manifest.json``.

    ``resume``: True continues from the last checkpoint in ``output_dir`` when there is
    one; a path resumes from that checkpoint; False starts over.

    The result is one atomic unit: the adapter (LoRA) or the model (full) goes to
    ``output_dir/adapter`` or ``output_dir/model`` together with the tokenizer,
    ``train_log.json``, the files ``extra_files(folder)`` writes into ``folder`` (e.g.
    nn-ica's ``mask.json``) and ``manifest.json``, all built in one temporary folder and
    renamed into place in one step. A failure at any point before that rename leaves no
    new adapter/model folder (a previous one stays as it was); the folder that exists
    always carries its own provenance. The manifest's ``outputs`` are relative to
    ``output_dir`` (``adapter/adapter_model.safetensors``, ...) and ``extra["saved"]``
    names the folder.

    For convenience ``manifest.json``, ``train_log.json`` and the extra files are then
    copied to ``output_dir`` itself (each atomically, the manifest last); the previous
    run's copies there are deleted (the manifest first) before the rename. So a copy in
    ``output_dir`` is either absent or identical to the one inside the saved folder, even
    after a kill at any moment.

    ``tool`` (e.g. ``"nn-drift finetune"``) is recorded in the manifest, so the tool can later
    recognise the folder as its own previous output.

    ``fingerprint`` (from :func:`run_fingerprint`) is written to ``output_dir`` before
    training; resuming a checkpoint whose folder records a different fingerprint (or
    none) raises :class:`NNError` instead of silently continuing another run.
    """
    from nn_core.io import MANIFEST_NAME, atomic_dir, atomic_write_json
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
    metrics = dict(result.metrics)
    metrics["global_step"] = int(result.global_step)
    metrics["training_loss"] = float(result.training_loss)
    history = [h for h in trainer.state.log_history if "loss" in h]
    trainable, total = trainable_parameters(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(tmp))
        saved_names = {p.name for p in tmp.iterdir()}
        if extra_files is not None:
            extra_files(tmp)
        extras = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in saved_names
                        and not p.name.startswith("."))
        if TRAIN_LOG in extras or MANIFEST_NAME in extras:
            raise ValueError(f"extra_files must not write {TRAIN_LOG} or {MANIFEST_NAME}")
        atomic_write_json(tmp / TRAIN_LOG, {"metrics": metrics, "history": history})
        manifest = write_manifest(
            tmp, config=config.to_dict(), model=base_model(model), model_spec=model_spec,
            seeds=config.seed, phases={"train": train_s, "save": time.perf_counter() - t1}, tool=tool,
            extra={"method": config.method, "saved": target.name, "resumed_from": ckpt,
                   "metrics": _jsonable(metrics),
                   **({"fingerprint": fingerprint["hash"]} if fingerprint is not None else {}),
                   "trainable_parameters": trainable, "total_parameters": total,
                   **(manifest_extra or {})},
        )
        _relative_to_run(manifest, target.name)
        # The previous run's top-level copies go before the new folder arrives, so they
        # never sit beside an adapter they do not describe.
        for name in (MANIFEST_NAME, TRAIN_LOG, *extras):
            (out / name).unlink(missing_ok=True)
    for name in (TRAIN_LOG, *extras, MANIFEST_NAME):
        _copy_atomic(target / name, out / name)
    return SFTResult(out, target, metrics, int(result.global_step), ckpt, model)


TRAIN_LOG = "train_log.json"


def _relative_to_run(manifest: Path, folder: str) -> None:
    """Make the ``outputs`` of a manifest written inside ``folder`` relative to the run
    folder above it (``adapter_model.safetensors`` -> ``adapter/adapter_model.safetensors``)."""
    from nn_core.io import atomic_write_json

    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["outputs"] = [{**row, "path": f"{folder}/{row['path']}"} for row in data.get("outputs") or []]
    atomic_write_json(manifest, data)


def _copy_atomic(src: Path, dst: Path) -> None:
    from nn_core.io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _jsonable(obj: dict) -> dict:
    return json.loads(json.dumps(obj, default=str))
