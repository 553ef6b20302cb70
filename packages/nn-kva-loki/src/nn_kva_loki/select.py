"""Choose the down-projection output channels LoKI trains, from a KVA file.

Notation: a KVA file holds ``A[n, l, c]`` for samples ``n < N``, layers ``l < L`` and
channels ``c < H`` of the down-projection output (site ``mlp_out``).

**Score** (``score=``):

* ``"signed"`` (the paper's code): ``s = A``. Low means the channel's contribution to
  the target-token probability was the most *negative* (or least positive): raising it
  lowers what the model already predicts. Channels with large positive attribution
  (knowledge carriers) are avoided; strongly negative ones are preferred.
* ``"abs"``: ``s = |A|``. Low means the channel hardly moves the target probability
  either way: the least influential channels, which is the "low-damage" reading.

**Normalisation.** Per sample and layer, min-max over channels:
``z[n, l, c] = (s[n, l, c] - min_c s[n, l, :]) / (max_c s[n, l, :] - min_c s[n, l, :])``
in float64, so ``z`` lies in ``[0, 1]``; a constant row (max = min) gives ``z = 0``
everywhere.

**Layer-balanced** (``strategy="layer-balanced"``, the paper's): the quota ``Q`` (percent
of all ``L * H`` down-projection output channels, ``0 < Q <= 100``) is split equally
over layers, ``k = floor(Q / 100 * H + 1/2)`` channels per layer (round half up; ``k = 0``
is refused). For each sample and layer the ``k`` channels with the lowest ``z`` are
*chosen* (equal ``z`` at the boundary: lower channel index first). ``count[l, c]`` is how
many samples chose channel ``c`` of layer ``l``; per layer the ``k`` channels with the
highest count are kept, ties broken by the lower mean ``z`` (i.e. lower
``sum_n z[n, l, c]``, summed in sample order in float64), then by the lower index.

**Global** (``strategy="global"``): ``K = floor(Q / 100 * L * H + 1/2)`` channels over all
layers, the ``K`` lowest mean ``z`` (same per-layer normalisation; ties by lower layer,
then lower index). Layers may get very different counts, or none.

Both stream the file in blocks of ``chunk_size`` samples: memory is ``O(chunk_size * L *
H)`` whatever ``N``, and the result does not depend on ``chunk_size`` (sums run in sample
order).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nn_core.errors import NNError
from nn_core.select.neuronset import NeuronSet
from nn_kva_loki.kva_file import SITE, KVAFile

STRATEGIES = ("layer-balanced", "global")
SCORES = ("signed", "abs")
METHOD = "kva-loki"


# ------------------------------------------------------------------ validation
def check_quota(quota) -> float:
    """``quota`` as a float in (0, 100], else a one-line NNError."""
    if isinstance(quota, bool):
        raise NNError(f"quota must be a percentage in (0, 100], got {quota!r}")
    try:
        q = float(quota)
    except (TypeError, ValueError):
        raise NNError(f"quota must be a percentage in (0, 100], got {quota!r}") from None
    if not np.isfinite(q) or not 0 < q <= 100:
        raise NNError(f"quota {quota} is outside (0, 100]: pass a percentage of the down-projection "
                      "output channels, e.g. --quota 10")
    return q


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def per_layer_k(quota: float, hidden_size: int) -> int:
    """Channels per layer under the layer-balanced split: ``floor(quota/100 * H + 1/2)``."""
    q = check_quota(quota)
    k = round_half_up(q * hidden_size / 100.0)
    if k < 1:
        raise NNError(f"quota {quota}% of {hidden_size} channels rounds to 0 per layer: pass at least "
                      f"--quota {50.0 / hidden_size:.4g}")
    return min(k, hidden_size)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise NNError(f"unknown {what} '{value}': use one of {', '.join(choices)}")
    return value


# ------------------------------------------------------------------ per-chunk kernels
def transform(block: np.ndarray, score: str) -> np.ndarray:
    """The score ``s`` of an attribution block, as float64 (``signed``: A; ``abs``: |A|)."""
    s = np.asarray(block, dtype=np.float64)
    return np.abs(s) if score == "abs" else s


def minmax(s: np.ndarray) -> np.ndarray:
    """Min-max normalise over the last axis; constant rows become 0."""
    lo = s.min(axis=-1, keepdims=True)
    span = s.max(axis=-1, keepdims=True) - lo
    out = s - lo
    np.divide(out, span, out=out, where=span > 0)  # constant rows: s - min is already 0
    return out


def lowest_k_mask(z: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest entries along the last axis, ties at the
    boundary resolved by lower index (vectorised: ``np.partition`` for the k-th value,
    then the earliest entries equal to it fill the remaining places)."""
    width = z.shape[-1]
    if k >= width:
        return np.ones(z.shape, dtype=bool)
    kth = np.partition(z, k - 1, axis=-1)[..., k - 1:k]
    mask = z < kth
    need = k - mask.sum(axis=-1, keepdims=True)  # >= 1: the k-th value itself
    equal = z == kth
    n_equal = equal.sum(axis=-1, keepdims=True)
    exact = n_equal == need
    mask |= equal & exact  # no surplus tie at the boundary: take every equal entry
    tied = ~exact[..., 0]
    if tied.any():  # more equal entries than places: the earliest ones
        eq = equal[tied]
        mask[tied] |= eq & (np.cumsum(eq, axis=-1, dtype=np.int32) <= need[tied])
    return mask


# ------------------------------------------------------------------ result
@dataclass
class Selection:
    """The outcome of :func:`select_channels`.

    ``neuronset``: the kept channels (site ``mlp_out``); ``counts[l, c]``: how many samples
    chose channel c of layer l (layer-balanced; zeros for global); ``mean_z[l, c]``: mean
    normalised score; ``k``: channels per layer (layer-balanced) or in total (global)."""

    neuronset: NeuronSet
    counts: np.ndarray
    mean_z: np.ndarray
    num_samples: int
    k: int
    quota: float
    strategy: str
    score: str
    source: str
    parameters: dict = field(default_factory=dict)

    @property
    def frequencies(self) -> np.ndarray:
        """``counts / num_samples``: the fraction of samples that chose each channel."""
        return self.counts / max(self.num_samples, 1)

    def positions(self) -> list[list[int]]:
        """The LoKI position list (one sorted list per layer)."""
        from nn_core.select.formats import neuronset_to_loki

        return neuronset_to_loki(self.neuronset, num_layers=self.counts.shape[0])

    def save(self, out: str | os.PathLike, *, plot: bool = False) -> dict[str, Path]:
        """Write ``neurons.json`` (NeuronSet), ``positions.json`` (LoKI), ``frequencies.npz``
        (counts, mean_z) and with ``plot`` ``frequencies.png``; return the paths."""
        from nn_core.io import atomic_path
        from nn_core.select.formats import neuronset_to_loki

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"neurons": self.neuronset.save(out / "neurons.json"),
                 "positions": out / "positions.json"}
        neuronset_to_loki(self.neuronset, paths["positions"], num_layers=self.counts.shape[0])
        paths["frequencies"] = out / "frequencies.npz"
        with atomic_path(paths["frequencies"]) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, counts=self.counts, mean_z=self.mean_z, num_samples=self.num_samples)
        if plot:
            paths["plot"] = plot_frequencies(self, out / "frequencies.png")
        return paths

    def summary(self) -> str:
        per_layer = self.neuronset.layer_counts(SITE)
        L = self.counts.shape[0]
        counts = [per_layer.get(layer, 0) for layer in range(L)]
        total = sum(counts)
        lines = [f"{self.strategy} selection, score {self.score}, quota {self.quota:g}%: {total} of "
                 f"{L * self.counts.shape[1]} mlp_out channels over {L} layers, from {self.num_samples} samples"]
        if self.strategy == "layer-balanced":
            kept = self.counts[np.arange(L)[:, None], _kept_matrix(self)] if total else np.zeros((L, 0))
            lines.append(f"  {self.k} per layer; mean selection frequency of kept channels "
                         f"{kept.mean() / max(self.num_samples, 1):.3f}")
        else:
            lines.append(f"  per layer: min {min(counts)}, max {max(counts)}")
        return "\n".join(lines)


def _kept_matrix(sel: Selection) -> np.ndarray:
    return np.stack([sel.neuronset.indices(layer, SITE).numpy() for layer in range(sel.counts.shape[0])])


# ------------------------------------------------------------------ selection
def _accumulate(chunks: Iterable[np.ndarray], L: int, H: int, *, score: str,
                k: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    counts = np.zeros((L, H), dtype=np.int64)
    zsum = np.zeros((L, H), dtype=np.float64)
    n = 0
    for block in chunks:
        if block.shape[1:] != (L, H):
            raise NNError(f"attribution block of shape {block.shape} does not match [*, {L}, {H}]")
        if not np.isfinite(block).all():
            bad = n + int(np.argwhere(~np.isfinite(block).reshape(len(block), -1).all(axis=1))[0, 0])
            raise NNError(f"sample {bad} holds non-finite attributions: re-run the analysis for it "
                          "(e.g. in float32)")
        z = minmax(transform(block, score))
        if k is not None:
            counts += lowest_k_mask(z, k).sum(axis=0)
        for row in z:  # sample order, so the sums do not depend on the chunk size
            zsum += row
        n += len(block)
    if n == 0:
        raise NNError("the KVA file holds no complete sample: run nn-kva-loki analyse first")
    return counts, zsum, n


def select_from_arrays(chunks: Iterable[np.ndarray], num_layers: int, hidden_size: int, *,
                       quota: float, strategy: str = "layer-balanced",
                       score: str = "signed") -> tuple[list[np.ndarray], np.ndarray, np.ndarray, int, int]:
    """Core of :func:`select_channels` over any iterable of ``[n, L, H]`` blocks.

    Returns ``(kept indices per layer, counts, mean_z, num_samples, k)``."""
    _check_choice(strategy, STRATEGIES, "strategy")
    _check_choice(score, SCORES, "score")
    q = check_quota(quota)
    L, H = int(num_layers), int(hidden_size)
    if strategy == "layer-balanced":
        k = per_layer_k(q, H)
        counts, zsum, n = _accumulate(chunks, L, H, score=score, k=k)
        idx = np.broadcast_to(np.arange(H), (L, H))
        # np.lexsort: the last key is primary -> count desc, z-sum asc, index asc
        order = np.lexsort((idx, zsum, -counts), axis=-1)
        kept = [np.sort(order[layer, :k]) for layer in range(L)]
    else:
        k = round_half_up(q * L * H / 100.0)
        if k < 1:
            raise NNError(f"quota {quota}% of {L * H} channels rounds to 0: pass at least "
                          f"--quota {50.0 / (L * H):.4g}")
        k = min(k, L * H)
        counts, zsum, n = _accumulate(chunks, L, H, score=score, k=None)
        flat = zsum.reshape(-1)
        order = np.lexsort((np.arange(L * H), flat))[:k]  # z-sum asc, then flat (layer, index) asc
        layer_of, chan = np.divmod(np.sort(order), H)
        kept = [chan[layer_of == layer] for layer in range(L)]
    return kept, counts, zsum / n, n, k


def select_channels(kva: str | os.PathLike | KVAFile, quota: float, *,
                    strategy: str = "layer-balanced", score: str = "signed",
                    chunk_size: int = 64, allow_incomplete: bool = False) -> Selection:
    """Select LoKI's trainable ``mlp_out`` channels from a KVA file (see module docstring).

    The NeuronSet is stamped with the model signature recorded in the file (no model is
    loaded): ``meta`` holds ``model_id``, ``model_type``, ``num_layers``, ``widths``,
    ``sites=["mlp_out"]``, ``method="kva-loki"`` and ``parameters`` with ``quota``,
    ``strategy``, ``score``, ``k``, ``num_samples``, ``source`` (the KVA file) and the
    file's KVA settings."""
    own = not isinstance(kva, KVAFile)
    f = KVAFile(kva) if own else kva
    try:
        if not f.complete and not allow_incomplete:
            raise NNError(f"{f.path} is an interrupted KVA file ({f.num_samples} samples written): resume "
                          "the analysis, or pass --allow-incomplete to select from what is there")
        kept, counts, mean_z, n, k = select_from_arrays(
            f.iter_chunks(chunk_size), f.num_layers, f.hidden_size,
            quota=quota, strategy=strategy, score=score)
        settings = f.settings
        signature = f.signature
        source = str(f.path)
        complete = f.complete
    finally:
        if own:
            f.close()
    params = {"quota": check_quota(quota), "strategy": strategy, "score": score, "k": k,
              "k_is": "per layer" if strategy == "layer-balanced" else "total",
              "num_samples": n, "source": source, "complete": complete, "kva": settings}
    meta = {**signature, "sites": [SITE], "method": METHOD, "parameters": params,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    ns = NeuronSet({(layer, SITE): idx for layer, idx in enumerate(kept)}, meta)
    return Selection(neuronset=ns, counts=counts, mean_z=mean_z, num_samples=n, k=k,
                     quota=params["quota"], strategy=strategy, score=score, source=source,
                     parameters=params)


# ------------------------------------------------------------------ plot
def plot_frequencies(sel: Selection, path: str | os.PathLike) -> Path:
    """A PNG heatmap: layers (rows) x channels (columns) of selection frequency
    (layer-balanced) or mean normalised score (global), with the kept channels marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nn_core.io import atomic_path

    L, H = sel.counts.shape
    if sel.strategy == "layer-balanced":
        data, label = sel.frequencies, "selection frequency (fraction of samples)"
    else:
        data, label = sel.mean_z, "mean normalised score"
    fig = Figure(figsize=(min(4 + H / 60, 24), 2 + L * 0.22), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(-0.5, H - 0.5, L - 0.5, -0.5))
    ys, xs = [], []
    for layer in range(L):
        idx = sel.neuronset.indices(layer, SITE).numpy()
        xs.extend(idx.tolist())
        ys.extend([layer] * idx.size)
    ax.scatter(xs, ys, s=1.5, c="red", marker="s", linewidths=0, label="kept")
    ax.set_xlabel("down-projection output channel (mlp_out)")
    ax.set_ylabel("layer")
    ax.set_title(f"KVA {sel.strategy} selection, score {sel.score}, quota {sel.quota:g}% "
                 f"({sel.num_samples} samples)")
    ax.legend(loc="upper right", markerscale=4, fontsize="small")
    fig.colorbar(im, ax=ax, label=label)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
