"""Run fingerprints: a checkpoint is resumed only by the run that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

from nn_core.errors import NNError
from nn_core.train.config import SFTConfig

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
