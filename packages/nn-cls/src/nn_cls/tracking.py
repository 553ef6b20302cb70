"""Run logging: ``metrics.jsonl`` always, Weights & Biases optionally.

Every engine record (one per wake step, sleep step, schedule decision, EWC update, refresh,
task boundary) becomes one JSON object in ``metrics.jsonl``: ``{"step", "phase", ...}`` plus
curated metrics under two namespaces (:func:`curate`; glossary in ``docs/nn-cls.md``):
``core/*`` for the training dynamics and ``boundary/*`` for the per-boundary evaluation; the
final ``cl_metrics`` summary is one last ``{"phase": "summary", "summary/*": ...}`` line.
Non-finite floats are written as ``null`` (strict JSON), and ``core/nonfinite`` counts them.

W&B (``logging.wandb_mode``): ``disabled`` (default) does not import wandb; ``offline`` writes
the run under ``<out>/wandb`` (``wandb sync`` uploads it later); ``online`` needs
``WANDB_API_KEY`` in the environment, and without it falls back to ``offline`` with one
warning line on stderr. When enabled, the resolved config (``config.yaml``) and the final
checkpoint are logged as artifacts. Secrets never reach a log: the config passes through
:func:`nn_core.run.manifest.scrub`, W&B gets no environment, code, git or machine metadata.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from nn_core.errors import NNError
from nn_core.run.manifest import scrub

__all__ = ["METRICS_NAME", "MetricsLogger", "curate", "resolve_wandb_mode"]

METRICS_NAME = "metrics.jsonl"

_CORE = {  # engine key -> curated core/* name
    "wake_loss": "core/wake_loss", "aux_loss": "core/aux_loss", "novelty": "core/novelty",
    "replay_loss": "core/replay_loss", "replay_size": "core/replay_size",
    "replay_added_this_step": "core/replay_added", "batch_rows": "core/batch_rows",
    "batch_supervised_tokens": "core/batch_supervised_tokens",
    "batch_supervised_fraction": "core/batch_supervised_fraction",
    "pressure": "core/sleep_pressure", "saturation": "core/saturation", "forgetting": "core/forgetting",
    "sleep_steps": "core/sleep_steps", "sleep_kl": "core/sleep_kl", "ewc_penalty": "core/ewc_penalty",
    "replay_batch_size_sleep": "core/sleep_replay_rows", "pseudo_batch_size": "core/sleep_pseudo_rows",
    "sleep_mix_ratio_pseudo": "core/sleep_pseudo_fraction", "fisher_mean": "core/fisher_mean",
    "fisher_units": "core/fisher_units", "refresh_agreement": "core/refresh_agreement",
}


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def curate(rec: Mapping) -> dict:
    """The curated form of one engine record (see the module docstring)."""
    out: dict = {"step": int(rec.get("step", 0)), "phase": rec.get("phase")}
    bad = 0
    for k, v in rec.items():
        if isinstance(v, float) and not math.isfinite(v):
            bad += 1
        if k in _CORE:
            out[_CORE[k]] = _finite(v)
        elif k == "refreshed_experts":
            out["core/refreshed_experts"] = list(v)
            out["core/refreshed_count"] = len(v)
        elif k in ("reason", "refresh_reason", "task") and v:
            out[f"core/{'sleep_reason' if k == 'reason' else k}"] = v
        elif k.startswith(("task_acc/", "task_loss/", "task_tokens/")):
            kind, task = k.split("/", 1)
            out[f"boundary/{kind.removeprefix('task_')}/{task}"] = _finite(v)
        elif k in ("seen_acc", "seen_loss", "boundary"):
            out[f"boundary/{k}"] = _finite(v)
    if rec.get("phase") in ("wake", "sleep"):
        out["core/nonfinite"] = bad
    return out


def resolve_wandb_mode(mode: str) -> str:
    """``mode``, or ``offline`` for ``online`` without ``WANDB_API_KEY`` (says so on stderr)."""
    mode = getattr(mode, "value", mode)
    if mode not in ("disabled", "offline", "online"):
        raise NNError(f"logging.wandb_mode must be disabled, offline or online, got '{mode}'")
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("nn-cls: warning: logging.wandb_mode=online needs WANDB_API_KEY in the environment; "
              "logging offline instead (upload later with `wandb sync`)", file=sys.stderr)
        return "offline"
    return mode


class MetricsLogger:
    """Writes ``out/metrics.jsonl`` (and W&B when enabled); use as ``log`` of ``run_stream``.

    ``history`` (records already logged by the run being resumed) rewrites the file first, so
    a resumed run's file equals an uninterrupted run's. Wake and sleep records are kept every
    ``log_every`` steps; every other record always.
    """

    def __init__(self, out: str | os.PathLike, *, wandb_mode: str = "disabled", project: str = "nn-cls",
                 run_name: str | None = None, config: Mapping | None = None, log_every: int = 1,
                 history: list | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / METRICS_NAME
        self.log_every = max(int(log_every), 1)
        self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        self.mode = resolve_wandb_mode(wandb_mode)
        self.run = None
        if self.mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise NNError('logging.wandb_mode needs wandb: pip install "nn-cls[wandb]", or set '
                              "logging.wandb_mode=disabled") from None
            settings = wandb.Settings(console="off", save_code=False, disable_git=True, x_disable_meta=True,
                                      x_disable_stats=True, x_disable_machine_info=True, silent=True)
            self.run = wandb.init(mode=self.mode, project=project, name=run_name, dir=str(self.out),
                                  config=scrub(dict(config or {})), settings=settings)
        for rec in history or []:
            self.log(rec)

    def log(self, rec: Mapping) -> None:
        if rec.get("phase") in ("wake", "sleep") and int(rec.get("step", 0)) % self.log_every:
            return
        row = curate(rec)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                         step=row["step"])

    def summary(self, metrics: Mapping) -> None:
        row = {"phase": "summary"}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) or v is None:
                row[f"summary/{k}"] = _finite(v)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.run is not None:
            for k, v in row.items():
                if k != "phase":
                    self.run.summary[k] = v

    def finish(self, artifacts: Mapping[str, os.PathLike] | None = None) -> None:
        """Close the file; log ``{name: path}`` artifacts (existing files) and end the W&B run."""
        self._fh.close()
        if self.run is None:
            return
        import wandb

        for name, path in (artifacts or {}).items():
            if Path(path).is_file():
                art = wandb.Artifact(name, type="checkpoint" if str(path).endswith(".pt") else "config")
                art.add_file(str(path))
                self.run.log_artifact(art)
        self.run.finish()
        self.run = None
