"""LoKI training: supervised fine-tuning of only the selected down-projection rows.

A LoKI model (:mod:`nn_kva_loki.loki`) goes through :mod:`nn_core.train` unchanged: the
SFT method is ``full`` with no ``trainable_modules``, which on a model with split layers
trains exactly their trainable slices (:func:`nn_core.train.prepare_model`). The Hugging
Face Trainer sees only those parameters, so AdamW keeps ``exp_avg``/``exp_avg_sq`` for the
active rows alone, and weight decay cannot touch the frozen rows (they are buffers).

Training data (:func:`load_task_data`): ``task:NAME`` draws a synthetic task of
:mod:`nn_eval.tasks` (``n_train`` training and ``n_eval`` disjoint held-out examples);
anything else is read by :func:`nn_core.data.load_instructions` (Alpaca, ShareGPT, Dolly,
simple JSON/JSONL/CSV/Parquet, or a hub dataset) and ``heldout_fraction`` of it (chosen
with ``random.Random(seed)``, at most ``n_eval``) is kept out of training for
``nn-kva-loki eval``.

Output of :func:`train_loki` (under ``config.output_dir``): ``model/`` the trained LoKI
folder (a plain HF folder plus the ``nn.loki/1`` marker and ``positions.json``),
``manifest.json`` and ``train_log.json`` from :func:`nn_core.train.train`, checkpoints
(plain HF folders too: a split layer saves as its full weight), and with ``merge`` a
restored plain model in ``merged/``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from nn_core.errors import NNError
from nn_kva_loki.loki import (
    POSITIONS_FILE,
    active_parameters,
    is_loki,
    loki_positions,
    restore,
    write_hf_folder,
)

TASK_PREFIX = "task:"


def load_task_data(spec: str, *, format: str = "auto", limit: int | None = None, n_train: int = 256,
                   n_eval: int = 32, heldout_fraction: float = 0.1, seed: int = 0):
    """``(train, heldout)`` lists of :class:`nn_core.data.Example` (see the module docs)."""
    from nn_core.data import load_instructions, parse_records

    if n_train < 1 or n_eval < 0:
        raise NNError(f"need --n-train >= 1 and --n-eval >= 0, got {n_train} and {n_eval}")
    if isinstance(spec, str) and spec.startswith(TASK_PREFIX):
        from nn_eval.tasks import make_split

        split = make_split(spec[len(TASK_PREFIX):], n_train, n_eval, seed)
        return parse_records(split["train"], "alpaca"), parse_records(split["eval"], "alpaca")
    if not 0.0 <= heldout_fraction < 1.0:
        raise NNError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    examples = load_instructions(spec, format=format, limit=limit)
    n_held = min(n_eval, round(heldout_fraction * len(examples))) if heldout_fraction > 0 else 0
    if n_held >= len(examples):
        n_held = len(examples) - 1
    held = set(random.Random(seed).sample(range(len(examples)), n_held)) if n_held > 0 else set()
    train = [e for i, e in enumerate(examples) if i not in held]
    heldout = [e for i, e in enumerate(examples) if i in held]
    return train, heldout


def examples_digest(examples: Sequence) -> str:
    """SHA-256 of the examples' fields, in order (identifies training data in fingerprints)."""
    from dataclasses import asdict, is_dataclass

    h = hashlib.sha256()
    for ex in examples:
        obj = asdict(ex) if is_dataclass(ex) else ex
        h.update(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def loki_sft_config(config):
    """``config`` with ``method="full"`` and no ``trainable_modules``: on a LoKI model that
    trains exactly the active rows."""
    return replace(config, method="full", trainable_modules=None).check()


def train_loki(model: nn.Module, tokenizer, train_examples: Sequence, config, *, merge: bool = False,
               model_spec: str | None = None, resume: bool | str = True, manifest_extra: dict | None = None,
               callbacks: Sequence = (), tool: str | None = None):
    """Train a LoKI model (:func:`nn_kva_loki.create_loki` or :func:`nn_kva_loki.load_loki`)
    on instruction examples through :mod:`nn_core.train`; returns its
    :class:`~nn_core.train.SFTResult` (``saved`` is the trained LoKI folder). ``config`` is an
    :class:`nn_core.train.SFTConfig`; its method is forced to ``full`` over the active rows
    (:func:`loki_sft_config`). With ``merge`` the trained model is also restored to a plain
    HF model in ``output_dir/merged`` (the in-memory model is restored too)."""
    from nn_core.io import atomic_dir, atomic_write_json
    from nn_core.train import build_trainer, run_fingerprint
    from nn_core.train import train as run_training

    if not is_loki(model):
        raise NNError("not a LoKI model: create one with nn-kva-loki create (or create_loki) first")
    cfg = loki_sft_config(config)
    positions = loki_positions(model)
    trainer = build_trainer(model, tokenizer, train_examples, cfg, callbacks=callbacks)
    active = active_parameters(model)
    fingerprint = run_fingerprint(cfg, {"positions": positions, "data": examples_digest(train_examples),
                                        "model": model_spec})
    extra = {"loki": {"active_parameters": active, "positions_per_layer": [len(p) for p in positions],
                      "n_train": len(train_examples)}, **(manifest_extra or {})}
    result = run_training(trainer, cfg, resume=resume, manifest_extra=extra, model_spec=model_spec,
                          fingerprint=fingerprint, tool=tool)
    atomic_write_json(Path(result.saved) / POSITIONS_FILE, positions, indent=None)
    if merge:
        plain = restore(trainer.model)
        with atomic_dir(Path(cfg.output_dir) / "merged") as tmp:
            write_hf_folder(plain, tmp, tokenizer)
    return result
