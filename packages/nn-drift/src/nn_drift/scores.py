"""SNIP and Wanda scores of every linear weight in the decoder blocks, on several datasets.

For a dataset D of instruction examples (loss on response tokens only):

* ``snip``: S = |W| ⊙ Σ_{x∈D} |∂ℓ_x/∂W|, ℓ_x the token-mean NLL of sample x over its
  response tokens; the per-sample absolute gradients are summed (never a running total,
  never |Σ_x g_x|), for all layers in one data pass (nn-sensitivity's ``snip`` on
  :func:`nn_core.numerics.gradients.abs_grad_sum`).
* ``wanda``: S_ij = |W_ij| · ||X_j||₂, X_j input feature j of the weight's module over the
  non-padding tokens of D (nn-sensitivity's ``wanda``).

Storage (:meth:`ScoreTable.save`), never pickle:

* ``store="top"``: for every (dataset, metric), only the top ``fraction`` of each weight
  matrix's **output rows** (``mode="row"``: the int(n_in · fraction) highest entries of
  every row, Wanda's per-output comparison group) or of all scored weights together
  (``mode="global"``), as a :class:`nn_core.select.WeightSet` with scores,
  ``<dataset>-<metric>.safetensors``. Size ∝ fraction.
* ``store="full"``: every score, ``<dataset>-<metric>/layer-XX.safetensors`` (one shard
  per decoder block) in float16 after dividing each tensor by its maximum (kept as
  ``scale`` in the shard's metadata, so values are S / max S ∈ [0, 1] with float16's
  relative precision ~5e-4; zero scores stay zero).

``scores.json`` lists datasets, metrics, storage, parameter names/shapes/layers/kinds and
the model signature; :func:`load_scores` reads either storage back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nn_core.errors import NNError

FORMAT = "nn.drift-scores/1"
METRICS = ("snip", "wanda")
STORES = ("top", "full")
MODES = ("row", "global")


@dataclass(frozen=True)
class ParamMeta:
    """A scored weight: ``kind`` ``linear`` ((out, in)) or ``conv1d`` ((in, out), GPT-2)."""

    name: str
    layer: int
    kind: str
    shape: tuple[int, int]

    @property
    def out_dim(self) -> int:
        """The weight dimension indexed by output features (rows of y = W x)."""
        return 1 if self.kind == "conv1d" else 0

    @property
    def n_out(self) -> int:
        return self.shape[self.out_dim]

    @property
    def n_in(self) -> int:
        return self.shape[1 - self.out_dim]


def as_rows(meta: ParamMeta, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the weight's shape) viewed as (n_out, n_in): one output row per row."""
    return t.t() if meta.out_dim == 1 else t


def row_flat(meta: ParamMeta, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Flat indices into the weight tensor of (output row, input column) pairs."""
    if meta.out_dim == 1:  # conv1d: tensor (in, out), entry (col, row)
        return cols * meta.shape[1] + rows
    return rows * meta.shape[1] + cols


def flat_rows(meta: ParamMeta, flat: np.ndarray) -> np.ndarray:
    """The output row of each flat index (inverse of :func:`row_flat`'s row part)."""
    return flat % meta.shape[1] if meta.out_dim == 1 else flat // meta.shape[1]


@dataclass
class ScoreTable:
    """Scores ``values[(dataset, metric)][param name]`` (float32, the weight's shape),
    or, when loaded from top storage, ``sparse[(dataset, metric)]`` (a WeightSet)."""

    params: list[ParamMeta]
    model_meta: dict
    values: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    sparse: dict = field(default_factory=dict)
    store: str = "full"
    fraction: float = 1.0
    mode: str = "row"
    info: dict = field(default_factory=dict)

    @property
    def keys(self) -> list[tuple[str, str]]:
        return sorted(set(self.values) | set(self.sparse))

    @property
    def datasets(self) -> list[str]:
        return sorted({d for d, _ in self.keys})

    def param(self, name: str) -> ParamMeta:
        for p in self.params:
            if p.name == name:
                return p
        raise NNError(f"'{name}' is not a scored weight")

    def check_key(self, dataset: str, metric: str) -> tuple[str, str]:
        key = (dataset, metric)
        if key not in self.values and key not in self.sparse:
            have = ", ".join(f"{d}/{m}" for d, m in self.keys)
            raise NNError(f"no {metric} scores on '{dataset}' in these scores (have {have}): "
                          "score that dataset and metric with nn-drift score")
        return key

    # ------------------------------------------------------------------ saving
    def save(self, out: str | Path, *, store: str = "top", fraction: float = 0.05,
             mode: str = "row", extra: Mapping | None = None) -> dict[str, Path]:
        """Write the scores into the folder ``out`` (which must exist; callers use
        :func:`nn_core.io.atomic_dir`). Returns the written files by key."""
        if store not in STORES:
            raise NNError(f"unknown storage '{store}': use {' or '.join(STORES)}")
        if mode not in MODES:
            raise NNError(f"unknown top mode '{mode}': use {' or '.join(MODES)}")
        if not 0 < fraction <= 1:
            raise NNError(f"the stored fraction must be in (0, 1], got {fraction}")
        if not self.values:
            raise NNError("these scores hold no dense values to store (loaded from top "
                          "storage): score again")
        out = Path(out)
        written: dict[str, Path] = {}
        for (ds, metric), vals in sorted(self.values.items()):
            tag = f"{ds}-{metric}"
            if store == "top":
                ws = top_weightset(self, vals, fraction, mode, method=f"nn-drift:{metric}:{ds}")
                written[tag] = ws.save(out / f"{tag}.safetensors")
            else:
                written[tag] = _save_full(self, vals, out / tag)
        header = {
            "format": FORMAT,
            "model": self.model_meta,
            "store": store,
            "fraction": fraction if store == "top" else 1.0,
            "mode": mode if store == "top" else None,
            "keys": [[d, m] for d, m in sorted(self.values)],
            "params": [{"name": p.name, "layer": p.layer, "kind": p.kind, "shape": list(p.shape)}
                       for p in self.params],
            "info": {f"{d}/{m}": i for (d, m), i in self.info.items()},
            **dict(extra or {}),
        }
        (out / "scores.json").write_text(json.dumps(header, indent=2, default=str))
        written["scores.json"] = out / "scores.json"
        return written


def top_weightset(table: ScoreTable, vals: Mapping[str, torch.Tensor], fraction: float,
                  mode: str, *, method: str):
    """The top ``fraction`` of ``vals`` (per output row or globally) as a WeightSet with
    scores. Row mode: k = int(n_in · fraction) per row (at least 1); global mode:
    k = max(1, round(fraction · total)) by nn-sensitivity's streaming top-K."""
    from nn_core.select.weightset import WeightSet

    meta = {**table.model_meta, "shapes": {p.name: list(p.shape) for p in table.params},
            "method": method, "parameters": {"fraction": fraction, "mode": mode}}
    if mode == "global":
        from nn_sensitivity.metrics import Scores
        from nn_sensitivity.params import ParamInfo
        from nn_sensitivity.rank import top_k

        infos = [ParamInfo(p.name, p.name.rsplit(".", 1)[0], p.layer, p.kind, p.shape)
                 for p in table.params]
        total = sum(p.shape[0] * p.shape[1] for p in table.params)
        k = max(1, round(fraction * total))
        ranking = top_k(Scores("score", infos, dict(vals), {"model": table.model_meta}), k)
        entries = ranking.entries()
        return WeightSet({n: e[0] for n, e in entries.items()}, meta,
                         {n: e[1] for n, e in entries.items()})
    entries, scores = {}, {}
    for p in table.params:
        s = as_rows(p, vals[p.name])
        k = max(1, int(p.n_in * fraction))
        v, cols = torch.topk(s, k, dim=1)
        rows = torch.arange(p.n_out).unsqueeze(1).expand_as(cols)
        entries[p.name] = row_flat(p, rows, cols).reshape(-1).numpy()
        scores[p.name] = v.reshape(-1).float().numpy()
    return WeightSet(entries, meta, scores)


def _save_full(table: ScoreTable, vals: Mapping[str, torch.Tensor], folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    by_layer: dict[int, list[ParamMeta]] = {}
    for p in table.params:
        by_layer.setdefault(p.layer, []).append(p)
    for layer, ps in sorted(by_layer.items()):
        tensors, scales = {}, {}
        for p in ps:
            v = vals[p.name].float()
            m = float(v.max()) if v.numel() else 0.0
            scale = m if m > 0 else 1.0
            tensors[p.name] = (v / scale).to(torch.float16).contiguous().cpu()
            scales[p.name] = scale
        save_file(tensors, str(folder / f"layer-{layer:03d}.safetensors"),
                  metadata={"format": FORMAT, "scales": json.dumps(scales)})
    return folder


def load_scores(folder: str | Path) -> ScoreTable:
    """Read a folder written by :meth:`ScoreTable.save` (either storage)."""
    from safetensors import safe_open

    from nn_core.io import read_json
    from nn_core.select.weightset import WeightSet

    folder = Path(folder)
    head = read_json(folder / "scores.json", what="scores file",
                     fix="pass a folder written by nn-drift score")
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise NNError(f"'{folder}' does not hold nn-drift scores (format "
                      f"{head.get('format') if isinstance(head, dict) else None!r}): pass a "
                      "folder written by nn-drift score")
    params = [ParamMeta(p["name"], int(p["layer"]), p["kind"], tuple(p["shape"]))
              for p in head["params"]]
    table = ScoreTable(params, head["model"], store=head["store"],
                       fraction=float(head["fraction"]), mode=head.get("mode") or "row",
                       info=head.get("info", {}))
    for ds, metric in head["keys"]:
        tag = f"{ds}-{metric}"
        if table.store == "top":
            table.sparse[(ds, metric)] = WeightSet.load(folder / f"{tag}.safetensors")
            continue
        vals: dict[str, torch.Tensor] = {}
        for shard in sorted((folder / tag).glob("layer-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                scales = json.loads((f.metadata() or {}).get("scales", "{}"))
                for k in f.keys():  # noqa: SIM118
                    vals[k] = f.get_tensor(k).float() * float(scales.get(k, 1.0))
        missing = [p.name for p in params if p.name not in vals]
        if missing:
            raise NNError(f"'{folder / tag}' lacks scores for {missing[0]}: the folder is "
                          "incomplete; score again")
        table.values[(ds, metric)] = vals
    return table


def scored_params(model: nn.Module, *, layers=None, modules=None) -> list:
    """nn-sensitivity's eligible weights (2-D weights in decoder blocks, exact-name
    filters) restricted to linear and Conv1D layers."""
    from nn_sensitivity.params import eligible_params

    infos = [i for i in eligible_params(model, layers=layers, modules=modules)
             if i.kind in ("linear", "conv1d") and i.layer is not None]
    if not infos:
        raise NNError("no linear weights in the decoder blocks match the filters: widen "
                      "--layers/--modules")
    return infos


def compute_scores(model: nn.Module, datasets: Mapping[str, Sequence[Mapping]],
                   metrics: Iterable[str] = METRICS, *, layers=None, modules=None,
                   progress: bool | None = None) -> ScoreTable:
    """Score every scored weight (see :func:`scored_params`) with each metric on each
    dataset (``{name: list of batches}`` with response-only labels). SNIP runs one
    per-sample gradient pass per dataset covering all layers; Wanda one forward pass."""
    from nn_sensitivity.metrics import _model_meta, score

    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise NNError(f"unknown metric '{bad[0]}': use {', '.join(METRICS)}")
    if not metrics or not datasets:
        raise NNError("nothing to score: pass at least one dataset and one metric")
    infos = scored_params(model, layers=layers, modules=modules)
    params = [ParamMeta(i.name, int(i.layer), i.kind, tuple(i.shape)) for i in infos]
    from nn_core.model.adapters import get_adapter, model_signature

    ad = get_adapter(model)
    meta = {**_model_meta(model), "widths": model_signature(model)["widths"],
            "down_weights": {str(i): ad.down_weight_name(i) for i in range(ad.num_layers)}}
    table = ScoreTable(params, meta)
    for ds, batches in datasets.items():
        for metric in metrics:
            s = score(model, list(batches), metric, params=infos, progress=progress)
            table.values[(ds, metric)] = {k: v.detach().float().cpu() for k, v in s.values.items()}
            table.info[(ds, metric)] = {k: v for k, v in s.info.items() if k != "model"}
    return table


def storage_bytes(folder: str | Path) -> int:
    """Bytes of score files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


