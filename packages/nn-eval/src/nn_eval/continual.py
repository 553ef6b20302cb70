"""Continual-learning metrics from a task-by-boundary accuracy matrix.

``A[i][j]`` is the accuracy on task ``j`` measured after training through task ``i``
(boundary ``i``, 0-based); ``L[i][j]`` the matching loss. The lower triangle (``j <= i``)
must be filled; entries above the diagonal are optional (NaN) and only forward transfer
needs the first super-diagonal ``A[i-1][i]``. An optional count matrix ``C[i][j]`` gives
the evaluation tokens behind each entry: entries with ``C[i][j] == 0`` are reported as
such and left out of every average (their value may be NaN); a NaN count (not recorded)
leaves the entry to A.

Per boundary ``i`` (over valid entries only):

    seen_acc_avg_i  = mean_{j<=i} A[i][j]
    seen_loss_avg_i = mean_{j<=i} L[i][j]
    forgetting_i    = mean_{j<i} ( max_{k<=i-1} A[k][j] - A[i][j] )     (0 at i = 0)
    bwt_i           = mean_{j<i} ( A[i][j] - A[j][j] )                   (0 at i = 0)

``forgetting_i`` takes the max over every earlier boundary where ``A[k][j]`` is known
(Chaudhry et al. 2018), so an entry above the diagonal counts when it was measured.
``final_*`` are the values at the last boundary, and

    seen_acc_auc = (1/(T-1)) * sum_{i=0}^{T-2} (seen_acc_avg_i + seen_acc_avg_{i+1}) / 2

(the trapezoid over the boundary trajectory normalised by the number of intervals;
``seen_acc_avg_0`` when T = 1). When a boundary has no valid seen entry it is ``None``
with the reason in ``seen_acc_auc_unavailable``. Over T tasks, after Lopez-Paz & Ranzato (2017):

    AA  = (1/T)     * sum_{j}         A[T-1][j]
    BWT = (1/(T-1)) * sum_{j<T-1}     (A[T-1][j] - A[j][j])
    FWT = (1/(T-1)) * sum_{i=1}^{T-1} (A[i-1][i] - b[i])

with ``b`` the caller's baseline accuracy per task (a single-task or random-init model).
FWT needs every ``A[i-1][i]``; when any is missing or no baseline is given it is
reported as unavailable (``None`` with a reason), never as 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nn_core.errors import NNError
from nn_core.io import atomic_path, atomic_write_text, read_json

MATRIX_FORMAT = "nn.cl-matrix/1"


# --------------------------------------------------------------------------- validation
def as_matrix(m, what: str = "accuracy matrix") -> np.ndarray:
    """``m`` as a square float64 array; raises NNError when it is not one."""
    try:
        arr = np.array(m, dtype=np.float64)
    except (TypeError, ValueError):
        raise NNError(f"the {what} must hold numbers (rows of equal length); "
                      "use NaN or an empty cell for a missing entry") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise NNError(f"the {what} must be square (tasks x tasks), got shape {arr.shape}: "
                      "give one row per boundary and one column per task")
    return arr


def _task_names(tasks: Sequence[str] | None, n: int) -> list[str]:
    if tasks is None:
        return [f"task{j}" for j in range(n)]
    tasks = [str(t) for t in tasks]
    if len(tasks) != n:
        raise NNError(f"{len(tasks)} task names for a {n}x{n} matrix: give one name per task")
    if len(set(tasks)) != n:
        raise NNError("task names must be unique")
    return tasks


def _valid_mask(n: int, counts) -> np.ndarray:
    if counts is None:
        return np.ones((n, n), dtype=bool)
    c = as_matrix(counts, "count matrix")
    if c.shape != (n, n):
        raise NNError(f"the count matrix is {c.shape[0]}x{c.shape[0]}, the accuracy matrix {n}x{n}")
    lower = np.tril(np.ones((n, n), dtype=bool))
    if np.any(~np.isfinite(c[lower])) or np.any(c[lower] < 0):
        raise NNError("the count matrix must hold non-negative token counts in its lower triangle")
    # Only a count of 0 marks an entry unmeasurable: NaN (no count, as above the
    # diagonal) leaves it to the accuracy matrix whether the entry was measured.
    return c != 0


def _check_lower(m: np.ndarray, valid: np.ndarray, what: str) -> None:
    n = m.shape[0]
    for i in range(n):
        for j in range(i + 1):
            if valid[i, j] and not math.isfinite(m[i, j]):
                raise NNError(
                    f"{what} entry [{i}][{j}] is missing or not finite: fill the lower "
                    "triangle (j <= i), or mark it with 0 evaluation tokens in the count matrix"
                )


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------- metrics
def cl_metrics(acc_matrix, loss_matrix=None, *, baseline=None, counts=None,
               tasks: Sequence[str] | None = None) -> dict:
    """Continual-learning metrics of ``acc_matrix`` (see module docs).

    ``loss_matrix``: optional L of the same shape; ``baseline``: optional vector b (one
    accuracy per task) for FWT; ``counts``: optional evaluation-token counts (0 = not
    measurable at that boundary); ``tasks``: task names (default ``task0``...).
    Returns a JSON-ready dict; unavailable values are ``None``.
    """
    a = as_matrix(acc_matrix)
    n = a.shape[0]
    names = _task_names(tasks, n)
    valid = _valid_mask(n, counts)
    _check_lower(a, valid, "accuracy matrix")
    lm = None
    if loss_matrix is not None:
        lm = as_matrix(loss_matrix, "loss matrix")
        if lm.shape != a.shape:
            raise NNError(f"the loss matrix is {lm.shape[0]}x{lm.shape[0]}, the accuracy matrix {n}x{n}")
        _check_lower(lm, valid, "loss matrix")
    known = valid & np.isfinite(a)

    boundaries = []
    for i in range(n):
        seen = [j for j in range(i + 1) if valid[i, j]]
        acc_avg = _mean([a[i, j] for j in seen])
        loss_avg = _mean([lm[i, j] for j in seen]) if lm is not None else None
        if i == 0:
            forgetting, bwt = 0.0, 0.0
        else:
            drops = []
            for j in range(i):
                past = [a[k, j] for k in range(i) if known[k, j]]
                if valid[i, j] and past:
                    drops.append(max(past) - a[i, j])
            forgetting = _mean(drops)
            bwt = _mean([a[i, j] - a[j, j] for j in range(i) if valid[i, j] and valid[j, j]])
        boundaries.append({
            "boundary": i,
            "task": names[i],
            "seen_acc_avg": acc_avg,
            "seen_loss_avg": loss_avg,
            "forgetting": forgetting,
            "bwt": bwt,
            "zero_token_tasks": [names[j] for j in range(i + 1) if not valid[i, j]],
        })

    trajectory = [b["seen_acc_avg"] for b in boundaries]
    gaps = [b["boundary"] for b in boundaries if b["seen_acc_avg"] is None]
    auc_note = None
    if gaps:
        # Skipping a boundary would join non-adjacent points into one trapezoid.
        auc = None
        auc_note = (f"no seen-task accuracy at boundary(ies) {', '.join(map(str, gaps))} "
                    "(every seen task has 0 evaluation tokens there)")
    elif len(trajectory) == 1:
        auc = trajectory[0]
    else:
        y = np.array(trajectory)
        auc = float(np.sum((y[:-1] + y[1:]) / 2.0) / (len(y) - 1))

    last = boundaries[-1]
    fwt, fwt_note = _fwt(a, known, baseline, names)
    return {
        "n_tasks": n,
        "tasks": names,
        "boundaries": boundaries,
        "final_seen_acc_avg": last["seen_acc_avg"],
        "final_seen_loss_avg": last["seen_loss_avg"],
        "final_forgetting": last["forgetting"],
        "final_bwt": last["bwt"],
        "seen_acc_auc": auc,
        "seen_acc_auc_unavailable": auc_note,
        "AA": last["seen_acc_avg"],
        "BWT": last["bwt"] if n > 1 else None,
        "FWT": fwt,
        "FWT_unavailable": fwt_note,
        "zero_token_entries": [[i, j] for i in range(n) for j in range(i + 1) if not valid[i, j]],
    }


def _fwt(a: np.ndarray, known: np.ndarray, baseline, names: list[str]) -> tuple[float | None, str | None]:
    n = a.shape[0]
    if n < 2:
        return None, "forward transfer needs at least 2 tasks"
    if baseline is None:
        return None, "no baseline given: pass the single-task (or random-init) accuracy per task"
    b = np.asarray(baseline_vector(baseline, names), dtype=np.float64)
    missing = [i for i in range(1, n) if not known[i - 1, i]]
    if missing:
        return None, (f"A[i-1][i] is missing for task(s) {', '.join(names[i] for i in missing)}: "
                      "evaluate each task before training on it to get forward transfer")
    if not np.all(np.isfinite(b[1:])):
        raise NNError("the FWT baseline must be finite for every task after the first")
    return float(np.mean([a[i - 1, i] - b[i] for i in range(1, n)])), None


def baseline_vector(baseline, tasks: Sequence[str]) -> list[float]:
    """The baseline as a list in task order: a sequence, or a mapping task name -> value."""
    if isinstance(baseline, dict):
        missing = [t for t in tasks if t not in baseline]
        if missing:
            raise NNError(f"the baseline has no value for task(s) {', '.join(missing)}: "
                          "give one per task, keyed by the matrix's task names")
        return [_baseline_value(baseline[t], f"task {t}") for t in tasks]
    if isinstance(baseline, (str, bytes)) or not hasattr(baseline, "__iter__"):
        raise NNError("the baseline must be a list of numbers or a mapping task -> number")
    values = [_baseline_value(v, f"entry {k}") for k, v in enumerate(baseline)]
    if len(values) != len(tasks):
        raise NNError(f"the baseline has {len(values)} values for {len(tasks)} tasks: give one per task")
    return values


def _baseline_value(v, where: str) -> float:
    # null (JSON) is a missing value, as an empty CSV cell: FWT never reads b[0], and a
    # missing value where it is needed is reported by _fwt.
    if v is None:
        return math.nan
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise NNError(f"the baseline value for {where} is {v!r}, not a number: give one "
                      "accuracy per task (null for none)")
    return float(v)


# --------------------------------------------------------------------------- files
def _cell(v: float) -> str:
    return "" if not math.isfinite(v) else repr(float(v))


def _parse(cell: str, where: str) -> float:
    cell = cell.strip()
    if cell == "" or cell.lower() in ("nan", "na", "null", "none"):
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise NNError(f"{where}: '{cell}' is not a number (use an empty cell for a missing entry)") from None


def save_matrix(path: str | Path, matrix, tasks: Sequence[str] | None = None) -> Path:
    """Write a square matrix as CSV (header: ``task`` then the task names; one row per
    boundary, labelled by its task; empty cell = missing) or as JSON
    (``{"format", "tasks", "matrix"}``, null = missing), by the file's suffix."""
    m = as_matrix(matrix, "matrix")
    names = _task_names(tasks, m.shape[0])
    path = Path(path)
    if path.suffix.lower() == ".json":
        rows = [[None if not math.isfinite(v) else float(v) for v in row] for row in m]
        return atomic_write_text(path, json.dumps({"format": MATRIX_FORMAT, "tasks": names,
                                                   "matrix": rows}, indent=2) + "\n")
    if path.suffix.lower() != ".csv":
        raise NNError(f"cannot tell the matrix format of '{path}': use a .csv or .json file")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", *names])
    for name, row in zip(names, m, strict=True):
        w.writerow([name, *(_cell(v) for v in row)])
    return atomic_write_text(path, buf.getvalue())


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise NNError(f"{what} file '{path}' does not exist: check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NNError(f"'{path}' is not UTF-8 text: pass a {what} CSV or JSON file") from None


def load_matrix(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read a matrix written by :func:`save_matrix` (CSV or JSON); ``(matrix, task names)``."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        obj = read_json(path, what="matrix")
        if isinstance(obj, list):
            rows, names = obj, None
        elif isinstance(obj, dict) and "matrix" in obj:
            rows, names = obj["matrix"], obj.get("tasks")
        else:
            raise NNError(f"'{path}' must hold a list of rows or an object with 'matrix' (and 'tasks')")
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise NNError(f"'{path}': the matrix must be a list of rows, each a list of numbers "
                          "(null for a missing entry)")
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(t, str) for t in names)):
            raise NNError(f"'{path}': 'tasks' must be a list of task names")
        rows = [[math.nan if v is None else v for v in row] for row in rows]
        m = as_matrix(rows)
        return m, _task_names(names, m.shape[0])
    if path.suffix.lower() != ".csv":
        raise NNError(f"cannot tell the matrix format of '{path}': use a .csv or .json file")
    rows = [r for r in csv.reader(io.StringIO(_read_text(path, "matrix"))) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise NNError(f"'{path}' has no matrix rows: write a header of task names and one row per boundary")
    header = [c.strip() for c in rows[0]]
    names = header[1:]
    body = rows[1:]
    if len(body) != len(names):
        raise NNError(f"'{path}' has {len(names)} task columns but {len(body)} rows: the matrix must be square")
    values = []
    for r, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise NNError(f"'{path}' line {r} has {len(row)} cells, the header {len(header)}")
        values.append([_parse(c, f"'{path}' line {r}") for c in row[1:]])
    m = as_matrix(values)
    return m, _task_names(names, m.shape[0])


def load_baseline(path: str | Path, tasks: Sequence[str]) -> list[float]:
    """A baseline vector from JSON (list, ``{"baseline": [...]}`` or task -> value) or CSV
    (a header of task names and one row of values)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        obj = read_json(path, what="baseline")
        if isinstance(obj, dict) and "baseline" in obj:
            obj = obj["baseline"]
        return baseline_vector(obj, tasks)
    rows = [r for r in csv.reader(io.StringIO(_read_text(path, "baseline"))) if any(c.strip() for c in r)]
    if len(rows) != 2:
        raise NNError(f"'{path}' must have a header of task names and one row of values")
    header = [c.strip() for c in rows[0]]
    vals = [_parse(c, f"'{path}' line 2") for c in rows[1]]
    if len(vals) != len(header):
        raise NNError(f"'{path}': the value row has {len(vals)} cells, the header {len(header)}")
    return baseline_vector(dict(zip(header, vals, strict=True)), tasks)


def plot_matrix(path: str | Path, matrix, tasks: Sequence[str] | None = None, *,
                title: str = "accuracy after each training boundary") -> Path:
    """A heatmap PNG of the matrix: rows = boundary (trained through), columns = task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = as_matrix(matrix, "matrix")
    names = _task_names(tasks, m.shape[0])
    n = m.shape[0]
    size = max(4.0, 0.6 * n + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = np.ma.masked_invalid(m)
    image = ax.imshow(shown, cmap="viridis", aspect="equal")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=names)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("trained through task i")
    ax.set_title(title)
    if n <= 12:
        finite = m[np.isfinite(m)]
        mid = float(np.mean([finite.min(), finite.max()])) if finite.size else 0.0
        for i in range(n):
            for j in range(n):
                if math.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if m[i, j] > mid else "white")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)
