"""Ranking weights by score: streaming top-K / bottom-K and the random control.

Global top-K never flattens the model's scores: each tensor contributes its own top-K
(``torch.topk`` on a view), which is merged with the running best K, so the extra memory
at any time is O(K) plus what ``topk`` needs for the one tensor in hand. Selected
weights are kept as three parallel numpy arrays (tensor position, flat index, score),
never as one Python object per weight.

Per-layer mode ranks each decoder block on its own (K per block); weights outside the
blocks (embedding, LM head) are each a group of their own.

A :class:`Ranking` is ordered (most sensitive first for top-K, least first for bottom-K,
draw order for random-K), so the K sweep takes nested prefixes of one ranking.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nn_core.errors import NNError
from nn_core.select.weightset import WeightSet, sample_indices
from nn_sensitivity.metrics import Scores
from nn_sensitivity.params import ParamInfo

MODES = ("global", "per-layer")
KINDS = ("top_k", "bottom_k", "random_k")
CONTROLS = ("random_k", "bottom_k")


@dataclass
class Ranking:
    """An ordered selection of weights.

    ``pos[j]`` indexes ``params``, ``flat[j]`` is the flat index inside that tensor,
    ``score[j]`` its score and ``rank[j]`` its rank (within its group in per-layer mode).
    """

    kind: str
    mode: str
    k: int
    metric: str
    params: list[ParamInfo]
    pos: np.ndarray
    flat: np.ndarray
    score: np.ndarray
    rank: np.ndarray
    model_meta: dict
    seed: int | None = None

    def __len__(self) -> int:
        return int(self.pos.size)

    def prefix(self, k: int) -> Ranking:
        """The first ``k`` of this ranking (per group in per-layer mode)."""
        if k > self.k:
            raise NNError(f"K={k} is larger than this ranking's K={self.k}: rank with the largest K first")
        keep = self.rank < k
        return Ranking(self.kind, self.mode, k, self.metric, self.params, self.pos[keep],
                       self.flat[keep], self.score[keep], self.rank[keep], self.model_meta,
                       self.seed)

    def entries(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{param name: (flat indices, scores)}`` for the selected weights."""
        out = {}
        order = np.argsort(self.pos, kind="stable")
        pos, flat, score = self.pos[order], self.flat[order], self.score[order]
        bounds = np.flatnonzero(np.diff(pos)) + 1
        for seg_pos, seg_flat, seg_score in zip(np.split(pos, bounds), np.split(flat, bounds),
                                                np.split(score, bounds), strict=True):
            if seg_pos.size:
                out[self.params[int(seg_pos[0])].name] = (seg_flat, seg_score)
        return out

    def to_weightset(self, **meta) -> WeightSet:
        """The selection as a :class:`WeightSet` with scores, stamped with the model it
        was scored on (validated against a model when used)."""
        entries = self.entries()
        shapes = {p.name: list(p.shape) for p in self.params if p.name in entries}
        full = {
            **self.model_meta,
            "shapes": shapes,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "method": f"nn-sensitivity:{self.metric}:{self.kind}",
            "parameters": {"metric": self.metric, "kind": self.kind, "mode": self.mode,
                           "k": self.k, "seed": self.seed},
            **meta,
        }
        return WeightSet({n: e[0] for n, e in entries.items()}, full,
                         {n: e[1] for n, e in entries.items()})

    def rows(self, limit: int | None = None) -> list[dict]:
        """Rows for the CSV: name, flat index, unravelled index, layer, module, score, rank."""
        n = len(self) if limit is None else min(limit, len(self))
        order = np.lexsort((self.pos, self.rank))[:n] if self.mode == "per-layer" else np.arange(n)
        out = []
        for j in order.tolist():
            p = self.params[int(self.pos[j])]
            idx = np.unravel_index(int(self.flat[j]), p.shape)
            out.append({
                "rank": int(self.rank[j]),
                "name": p.name,
                "flat_index": int(self.flat[j]),
                "index": "(" + ", ".join(str(int(i)) for i in idx) + ")",
                "layer": "" if p.layer is None else p.layer,
                "module": p.module,
                "score": float(self.score[j]),
            })
        return out


def _groups(params: Sequence[ParamInfo], mode: str) -> list[list[int]]:
    if mode == "global":
        return [list(range(len(params)))]
    groups: dict[str, list[int]] = {}
    for j, p in enumerate(params):
        groups.setdefault(p.group, []).append(j)
    return list(groups.values())


def _check(scores: Scores, k: int, mode: str) -> list[list[int]]:
    if mode not in MODES:
        raise NNError(f"unknown ranking mode '{mode}': use one of {', '.join(MODES)}")
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise NNError(f"K must be a positive integer, got {k!r}")
    groups = _groups(scores.params, mode)
    for g in groups:
        n = sum(scores.params[j].numel for j in g)
        if k > n:
            where = "eligible weights" if mode == "global" else \
                f"weights in {scores.params[g[0]].group}"
            raise NNError(f"K={k} is larger than the {n} {where}: pick a smaller K or widen the "
                          "filters")
    return groups


def _stream_extreme(scores: Scores, group: list[int], k: int, largest: bool):
    """Best ``k`` of the tensors in ``group``: per-tensor top-k merged into a running best."""
    best_v = torch.zeros(0, dtype=torch.float32)
    best_p = torch.zeros(0, dtype=torch.int32)
    best_f = torch.zeros(0, dtype=torch.int64)
    for j in group:
        s = scores.values[scores.params[j].name].reshape(-1)
        kk = min(k, s.numel())
        v, i = torch.topk(s, kk, largest=largest, sorted=False)
        best_v = torch.cat([best_v, v.float().cpu()])
        best_f = torch.cat([best_f, i.cpu()])
        best_p = torch.cat([best_p, torch.full((kk,), j, dtype=torch.int32)])
        if best_v.numel() > k:
            _, keep = torch.topk(best_v, k, largest=largest, sorted=False)
            best_v, best_p, best_f = best_v[keep], best_p[keep], best_f[keep]
    v, p, f = best_v.numpy(), best_p.numpy(), best_f.numpy()
    # Deterministic order: by score, ties by tensor then index.
    order = np.lexsort((f, p, -v if largest else v))
    return p[order], f[order], v[order]


def _assemble(scores: Scores, kind: str, mode: str, k: int, parts, seed=None) -> Ranking:
    pos = np.concatenate([x[0] for x in parts]).astype(np.int32)
    flat = np.concatenate([x[1] for x in parts]).astype(np.int64)
    score = np.concatenate([x[2] for x in parts]).astype(np.float32)
    rank = np.concatenate([np.arange(x[0].size, dtype=np.int64) for x in parts])
    return Ranking(kind, mode, k, scores.metric, list(scores.params), pos, flat, score, rank,
                   dict(scores.info.get("model", {})), seed)


def top_k(scores: Scores, k: int, mode: str = "global", *, largest: bool = True) -> Ranking:
    """The ``k`` highest-scoring weights (``largest=False``: lowest), globally or per layer."""
    groups = _check(scores, k, mode)
    parts = [_stream_extreme(scores, g, k, largest) for g in groups]
    return _assemble(scores, "top_k" if largest else "bottom_k", mode, k, parts)


def bottom_k(scores: Scores, k: int, mode: str = "global") -> Ranking:
    """The ``k`` lowest-scoring weights: the control that should matter least."""
    return top_k(scores, k, mode, largest=False)


def random_k(scores: Scores, k: int, mode: str = "global", *, seed: int = 0) -> Ranking:
    """``k`` weights drawn uniformly without replacement from the eligible weights (per
    group in per-layer mode), reproducible by ``seed``.

    Positions are drawn in the concatenated index space [0, M) of the group's tensors
    (M = total weights, O(k) memory) and mapped back to (tensor, flat index) by the
    cumulative tensor sizes. The draw order is shuffled, so every prefix is itself a
    uniform sample (the K sweep uses prefixes)."""
    groups = _check(scores, k, mode)
    rng = np.random.default_rng(seed)
    parts = []
    for g in groups:
        sizes = np.array([scores.params[j].numel for j in g], dtype=np.int64)
        cum = np.cumsum(sizes)
        drawn = rng.permutation(sample_indices(rng, int(cum[-1]), k))
        which = np.searchsorted(cum, drawn, side="right")
        flat = drawn - (cum[which] - sizes[which])
        pos = np.asarray(g, dtype=np.int32)[which]
        vals = np.empty(k, dtype=np.float32)
        for j in np.unique(pos).tolist():
            hit = pos == j
            v = scores.values[scores.params[j].name].reshape(-1)
            vals[hit] = v[torch.from_numpy(flat[hit]).to(v.device)].float().cpu().numpy()
        parts.append((pos, flat, vals))
    return _assemble(scores, "random_k", mode, k, parts, seed)


def rank(scores: Scores, k: int, kind: str = "top_k", mode: str = "global", *,
         seed: int = 0) -> Ranking:
    """Dispatch on ``kind``: ``top_k``, ``bottom_k`` or ``random_k``."""
    if kind == "top_k":
        return top_k(scores, k, mode)
    if kind == "bottom_k":
        return bottom_k(scores, k, mode)
    if kind == "random_k":
        return random_k(scores, k, mode, seed=seed)
    raise NNError(f"unknown selection '{kind}': use one of {', '.join(KINDS)}")


def select(scores: Scores, k: int, kind: str = "top_k", mode: str = "global", *,
           seed: int = 0) -> WeightSet:
    """The selected weights as a :class:`WeightSet` with their scores.

    >>> top = select(s, 100)                         # global top-100
    >>> ctrl = select(s, 100, "random_k", seed=0)    # same size, uniform
    """
    return rank(scores, k, kind, mode, seed=seed).to_weightset()


def check_controls(controls: str | Sequence[str] | None) -> list[str]:
    if controls is None:
        return []
    if isinstance(controls, str):
        controls = [c.strip() for c in controls.split(",") if c.strip()]
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise NNError(f"unknown control '{bad[0]}': use one of {', '.join(CONTROLS)}")
    return list(dict.fromkeys(controls))
