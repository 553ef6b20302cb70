"""What ``nn-cls train`` and ``nn-cls suite`` do with a composed config (Hydra-free, testable).

``train`` writes into its output folder: ``config.yaml`` (the resolved config, secrets
scrubbed), ``metrics.jsonl`` (:mod:`nn_cls.tracking`), ``checkpoint.pt`` (everything needed to
resume, :data:`nn_cls.engine.CHECKPOINT_KEYS`), and when the stream is finished
``results.json`` (A, L, counts, ``cl_metrics``, replay bytes), ``task_matrix.csv``,
``accuracy_matrix.png`` and ``manifest.json`` (``tool: "nn-cls train"``).

``suite`` runs every ``suite.methods`` × ``suite.seeds`` as a train run under
``runs/<method>-seed<seed>/`` and writes ``suite_summary.csv`` (per method: the mean and
sample standard deviation over seeds of the final seen accuracy, seen loss, forgetting, BWT
and seen-accuracy AUC), ``boundary_metrics.csv`` (per run and boundary: seen accuracy and
loss, forgetting, BWT), ``task_matrix.csv`` (per run, boundary and task: accuracy, loss,
tokens), ``accuracy_matrix_<method>.png`` (seed-mean A), ``seen_acc.png`` (seen-accuracy
trajectories, mean ± sd over seeds) and its ``manifest.json`` (``tool: "nn-cls suite"``).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nn_cls.config import to_engine
from nn_cls.distributed import launched_rank
from nn_cls.engine import CHECKPOINT_NAME, EngineConfig, check_resume, load_checkpoint, run_stream
from nn_cls.tracking import METRICS_NAME, MetricsLogger
from nn_core.errors import NNError
from nn_core.io import atomic_write_json, atomic_write_text, check_output_dir
from nn_core.run.manifest import scrub, write_manifest

__all__ = ["SUMMARY_METRICS", "resolved_config", "run_suite", "run_train"]

SUMMARY_METRICS = ("final_seen_acc_avg", "final_seen_loss_avg", "final_forgetting", "final_bwt", "seen_acc_auc")


def resolved_config(cfg: DictConfig) -> dict:
    """The resolved config as plain JSON-ready data, secrets scrubbed."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    data.pop("defaults", None)
    return scrub(data)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in r])
    atomic_write_text(path, buf.getvalue())


def _matrix_rows(res: dict, tasks) -> list[list]:
    T = len(tasks)
    return [[i, tasks[i], tasks[j], res["A"][i][j], res["L"][i][j], res["counts"][i][j]]
            for i in range(T) for j in range(i + 1)]


def _train_one(cfg: DictConfig, e: EngineConfig, out: Path, *, tool: str, quiet: bool = False) -> dict:
    """One stream run of ``e`` into ``out`` (see the module docstring)."""
    from nn_core.model.loading import load_model

    identity = {"model": cfg.model.name}
    state = None
    if cfg.train.resume:
        state = load_checkpoint(cfg.train.resume)
        check_resume(state, e, identity)  # before anything in out is touched
    main = launched_rank() == 0  # data parallel (accelerate launch): only rank 0 writes files
    resolved = resolved_config(cfg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    model, tok = load_model(cfg.model.name, device=cfg.model.device)
    log = cfg.logging
    logger = MetricsLogger(out, wandb_mode=log.wandb_mode, project=log.project, run_name=log.run_name,
                           config=resolved, log_every=log.log_every,
                           history=state["history"] if state is not None else None) if main else None
    finished = False
    try:
        res = run_stream(e, model, tok, log=logger.log if main else None, checkpoint_dir=out,
                         checkpoint_every=cfg.train.checkpoint_every, resume=state,
                         stop_after=cfg.train.stop_after, identity=identity)
        finished = not res["stopped"]
        if finished and main:
            logger.summary(res["metrics"])
    finally:
        if main:
            logger.finish({"config": out / "config.yaml", "checkpoint": out / CHECKPOINT_NAME}
                          if finished and log.artifacts else None)
    if not main:
        return res
    if finished:
        tasks = list(e.tasks)
        atomic_write_json(out / "results.json", scrub({
            "method": e.method, "tasks": tasks, "A": res["A"], "L": res["L"], "counts": res["counts"],
            "metrics": res["metrics"], "replay_bytes": res["replay_bytes"],
            "replay_episodes": res["replay_episodes"], "config_hash": res["config_hash"]}))
        _csv(out / "task_matrix.csv", ["boundary", "trained_through", "task", "acc", "loss", "tokens"],
             _matrix_rows(res, tasks))
        from nn_eval.continual import plot_matrix

        plot_matrix(out / "accuracy_matrix.png", res["A"], tasks, title=f"{e.method}: token accuracy")
    write_manifest(out, config=resolved, model=model, model_spec=cfg.model.name, seeds=e.seed, tool=tool,
                   extra={"method": e.method, "step": res["step"], "total_steps": res["total_steps"],
                          "stopped": res["stopped"], "config_hash": res["config_hash"]})
    if not quiet:
        m = res["metrics"]
        msg = (f"{e.method}: final seen acc {m['final_seen_acc_avg']:.4f}, BWT {m['final_bwt']}"
               if finished else f"{e.method}: stopped after step {res['step']} of {res['total_steps']}; "
               f"resume with train.resume={out / CHECKPOINT_NAME}")
        print(f"nn-cls train: {msg} -> {out}", file=sys.stderr)
    return res


def _check_out(out: str | Path, owned: bool, tool: str, overwrite: bool) -> Path:
    if owned and launched_rank() == 0:  # data parallel: rank 0 owns the folder
        return check_output_dir(out, tool=tool, overwrite=overwrite, flag="out",
                                markers=(CHECKPOINT_NAME, METRICS_NAME))
    return Path(out)


def run_train(cfg: DictConfig, out: str | Path, *, owned: bool = True) -> dict:
    """``nn-cls train``: one stream run into ``out`` (``owned``: a folder ``out=`` named, checked
    with :func:`nn_core.io.check_output_dir`; otherwise Hydra's run dir)."""
    e = to_engine(cfg)
    out = _check_out(out, owned, "nn-cls train", cfg.overwrite)
    return _train_one(cfg, e, Path(out), tool="nn-cls train")


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def run_suite(cfg: DictConfig, out: str | Path, *, owned: bool = True) -> dict:
    """``nn-cls suite``: methods × seeds (module docstring); returns ``{(method, seed): result}``."""
    methods, seeds = list(cfg.suite.methods), [int(s) for s in cfg.suite.seeds]
    if not methods or not seeds:
        raise NNError("suite.methods and suite.seeds must each name at least one entry")
    if cfg.train.resume or cfg.train.stop_after:
        raise NNError("nn-cls suite does not resume or stop runs: unset train.resume and train.stop_after")
    engines = {(m, s): to_engine(cfg, method=m, seed=s) for m in methods for s in seeds}  # all checked first
    out = Path(_check_out(out, owned, "nn-cls suite", cfg.overwrite))
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for (m, s), e in engines.items():
        results[(m, s)] = _train_one(cfg, e, out / "runs" / f"{m}-seed{s}", tool="nn-cls train", quiet=True)
        print(f"nn-cls suite: {m} seed {s}: final seen acc "
              f"{results[(m, s)]['metrics']['final_seen_acc_avg']:.4f}", file=sys.stderr)
    if launched_rank() != 0:  # data parallel: rank 0 writes the suite's files
        return results
    tasks = list(next(iter(engines.values())).tasks)
    summary, bounds, cells = [], [], []
    for m in methods:
        row = [m, len(seeds)]
        for key in SUMMARY_METRICS:
            row += list(_mean_sd([results[(m, s)]["metrics"][key] for s in seeds]))
        summary.append(row)
        for s in seeds:
            r = results[(m, s)]
            for b in r["metrics"]["boundaries"]:
                bounds.append([m, s, b["boundary"], b["task"], b["seen_acc_avg"], b["seen_loss_avg"],
                               b["forgetting"], b["bwt"]])
            cells += [[m, s, *row_] for row_ in _matrix_rows(r, tasks)]
    _csv(out / "suite_summary.csv",
         ["method", "n_seeds"] + [f"{k}_{x}" for k in SUMMARY_METRICS for x in ("mean", "sd")], summary)
    _csv(out / "boundary_metrics.csv", ["method", "seed", "boundary", "trained_through", "seen_acc",
                                        "seen_loss", "forgetting", "bwt"], bounds)
    _csv(out / "task_matrix.csv", ["method", "seed", "boundary", "trained_through", "task", "acc", "loss",
                                   "tokens"], cells)
    _plots(out, methods, seeds, tasks, results)
    write_manifest(out, config=resolved_config(cfg), model_spec=cfg.model.name, seeds={"seeds": seeds},
                   tool="nn-cls suite", extra={"methods": methods, "runs": [f"runs/{m}-seed{s}" for m, s in results]})
    return results


def _plots(out: Path, methods, seeds, tasks, results) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nn_core.io import atomic_path
    from nn_eval.continual import plot_matrix

    for m in methods:
        mean_a = np.mean(np.array([results[(m, s)]["A"] for s in seeds], dtype=float), axis=0)
        plot_matrix(out / f"accuracy_matrix_{m}.png", mean_a, tasks,
                    title=f"{m}: token accuracy (mean of {len(seeds)} seed(s))")
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(tasks))
    for m in methods:
        traj = np.array([[b["seen_acc_avg"] if b["seen_acc_avg"] is not None else np.nan
                          for b in results[(m, s)]["metrics"]["boundaries"]] for s in seeds], dtype=float)
        mu = np.nanmean(traj, axis=0)
        sd = np.nanstd(traj, axis=0, ddof=1) if len(seeds) > 1 else np.zeros_like(mu)
        ax.errorbar(x, mu, yerr=sd, marker="o", capsize=3, label=m)
    ax.set_xticks(x, labels=tasks, rotation=30, ha="right")
    ax.set_xlabel("trained through task")
    ax.set_ylabel("seen-task token accuracy")
    ax.set_title("seen accuracy after each boundary (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "seen_acc.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
