"""Template building: capture a (tokens x neurons) matrix, decompose it, threshold the maps.

Capture keeps memory bounded by deciding *before* the forward passes which tokens to
keep: of all T non-padding tokens of the N sampled texts, ``max_tokens`` positions are
drawn uniformly without replacement (seeded), and the matrix ``X`` (kept tokens, layers x
width) is allocated once. Every forward hook writes only its kept rows into its column
block, so memory is ``max_tokens * n_layers * width * 4`` bytes however long the texts
are; the figure is reported in the metadata.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from nn_core.errors import NNError
from nn_ica.decompose import (
    decompose,
    match_columns,
    select_channels,
    select_z,
    spatial_ica,
    standardise_,
)
from nn_ica.templates import Component, Templates

CAPTURE_SITES = ("mlp_act", "mlp_out")
METHODS = ("fnsft", "canica")
LAYOUTS = ("per-layer", "concat")


@dataclass
class BuildConfig:
    """Settings of :func:`build_templates`; the defaults are the CLI defaults.

    The defaults finish ``nn-ica build smollm2-135m pydoc`` in a few minutes on 2 CPU
    cores (see benchmarks/); raise ``samples``, ``max_tokens`` and ``components`` for
    better-resolved networks.
    """

    site: str = "mlp_act"
    layers: Sequence[int] | None = None  # None: all layers
    samples: int = 64  # texts drawn from the data
    max_length: int = 128  # tokens per text (truncated)
    max_tokens: int = 4096  # rows of X, drawn from all non-padding tokens
    batch_size: int = 8
    pca_components: int = 50
    components: int = 10  # canica per-layer: maps per layer; otherwise in all
    percentile: float = 98.0
    backend: str = "torch"
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-4
    heldout_fraction: float = 0.1  # documents kept out of building (nn-ica eval scores them)
    # "canica": spatial ICA (neurons as samples), maps z-scored, |z| > z_threshold (Liu et al.);
    # "fnsft": temporal ICA of all layers concatenated, top (100 - percentile) % per component.
    method: str = "canica"
    z_threshold: float = 3.6  # canica only
    layout: str = "per-layer"  # canica only: one ICA per layer ("per-layer") or all layers ("concat")
    subsets: int = 1  # canica only: text subsets whose matched maps are unioned

    def check(self) -> BuildConfig:
        if self.site not in CAPTURE_SITES:
            raise NNError(f"ICA templates are built at {' or '.join(CAPTURE_SITES)}, not '{self.site}'")
        for name in ("samples", "max_length", "max_tokens", "batch_size", "pca_components",
                     "components", "max_iter"):
            if int(getattr(self, name)) < 1:
                raise NNError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.pca_components < self.components:
            raise NNError(f"--pca-components ({self.pca_components}) must be at least "
                          f"--components ({self.components})")
        if self.max_tokens <= self.pca_components:
            raise NNError(f"--max-tokens ({self.max_tokens}) must exceed --pca-components "
                          f"({self.pca_components}): PCA needs more tokens than dimensions")
        # Checked here, before any capture/PCA/ICA work, so a typo fails in a second.
        if not 0 <= self.percentile < 100:
            raise NNError(f"--percentile must be in [0, 100), got {self.percentile}")
        if not self.tol > 0:
            raise NNError(f"--tol must be positive, got {self.tol}")
        if int(self.seed) < 0:
            raise NNError(f"--seed must be 0 or more, got {self.seed}")
        if not 0 <= self.heldout_fraction < 1:
            raise NNError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.method not in METHODS:
            raise NNError(f"unknown --method '{self.method}': use one of {', '.join(METHODS)}")
        if self.layout not in LAYOUTS:
            raise NNError(f"unknown --layout '{self.layout}': use one of {', '.join(LAYOUTS)}")
        if not self.z_threshold > 0:
            raise NNError(f"--z-threshold must be positive, got {self.z_threshold}")
        if int(self.subsets) < 1:
            raise NNError(f"--subsets must be at least 1, got {self.subsets}")
        if self.method == "canica" and self.max_tokens // int(self.subsets) <= self.pca_components:
            raise NNError(f"--max-tokens {self.max_tokens} split into {self.subsets} subsets leaves "
                          f"{self.max_tokens // int(self.subsets)} tokens each, not more than --pca-components "
                          f"{self.pca_components}: raise --max-tokens or lower --subsets / --pca-components")
        return self


@dataclass
class ActivationMatrix:
    """Captured activations: ``x`` (n_tokens, len(layers) * width), columns layer-major."""

    x: torch.Tensor
    site: str
    layers: list[int]
    width: int
    n_samples: int
    n_tokens_seen: int
    timings: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def nbytes(self) -> int:
        return self.x.element_size() * self.x.numel()

    def column(self, col: int) -> tuple[int, int]:
        """(layer, channel) of column ``col``."""
        block, channel = divmod(int(col), self.width)
        return self.layers[block], channel


def _layer_list(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    from nn_core.model.adapters import get_adapter

    ad = get_adapter(model)
    if layers is None:
        return list(range(ad.num_layers))
    out = sorted({ad.check_layer(int(i)) for i in layers})
    if not out:
        raise NNError("no layers selected: pass --layers all, a range such as 0-9, or a list 0,4,8")
    return out


@torch.no_grad()
def capture_matrix(
    model: nn.Module,
    token_ids: Sequence[Sequence[int]],
    *,
    site: str = "mlp_act",
    layers: Sequence[int] | None = None,
    max_tokens: int = 4096,
    batch_size: int = 8,
    seed: int = 0,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> ActivationMatrix:
    """Run ``model`` over ``token_ids`` and keep the activations of ``max_tokens`` tokens.

    Padding is never kept (kept positions are drawn from real tokens only). Non-finite
    activations raise :class:`NNError` naming the layer. ``device`` is where ``X`` lives
    (default: the model's device).
    """
    from nn_core.intervene.capture import stream_tokens
    from nn_core.model.adapters import get_adapter

    if site not in CAPTURE_SITES:
        raise NNError(f"ICA templates are built at {' or '.join(CAPTURE_SITES)}, not '{site}'")
    ad = get_adapter(model)
    layer_list = _layer_list(model, layers)
    width = ad.width(site)
    seqs = [list(s) for s in token_ids if len(s) > 0]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        raise NNError("no tokens to capture: the data is empty")
    keep_n = min(max_tokens, total)
    rng = np.random.default_rng(seed)
    flat_keep = np.sort(rng.choice(total, size=keep_n, replace=False))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    seq_of = np.searchsorted(starts, flat_keep, side="right") - 1
    pos_of = flat_keep - starts[seq_of]

    model_dev = next(model.parameters()).device
    x_dev = torch.device(device) if device is not None else model_dev
    try:
        x = torch.empty((keep_n, len(layer_list) * width), dtype=torch.float32, device=x_dev)
    except RuntimeError as exc:  # out of memory
        raise NNError(f"cannot allocate the {keep_n} x {len(layer_list) * width} activation matrix "
                      f"({keep_n * len(layer_list) * width * 4 / 2**30:.1f} GiB): lower --max-tokens "
                      f"or select fewer --layers ({str(exc).splitlines()[0][:80]})") from None

    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    row_of: dict[int, list[tuple[int, int]]] = {}
    for row, (s, p) in enumerate(zip(seq_of.tolist(), pos_of.tolist(), strict=True)):
        row_of.setdefault(s, []).append((p, row))  # positions ascending within a text
    dst: dict[int, torch.Tensor] = {}  # batch index -> rows of X, in the stream's row-major order

    def batches():
        for bi, idx in enumerate(groups):
            tmax = int(lengths[idx].max())
            ids = torch.full((len(idx), tmax), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), tmax), dtype=torch.long)
            chosen = torch.zeros((len(idx), tmax), dtype=torch.bool)
            rows = []
            for j, s in enumerate(idx.tolist()):
                ids[j, : lengths[s]] = torch.tensor(seqs[s], dtype=torch.long)
                mask[j, : lengths[s]] = 1
                for p, row in row_of.get(s, []):
                    chosen[j, p] = True
                    rows.append(row)
            dst[bi] = torch.tensor(rows, dtype=torch.long, device=x_dev)
            yield {"input_ids": ids, "attention_mask": mask, "chosen": chosen}  # none chosen: not run

    block_of = {layer: b for b, layer in enumerate(layer_list)}

    def write(point, rows: torch.Tensor, batch) -> None:
        block = block_of[point.layer]
        if not torch.isfinite(rows).all():
            raise NNError(f"non-finite activations at layer {point.layer} ({site}) in batch {batch.index}: "
                          "load the model in float32 (--dtype float32) or check the inputs")
        x[dst[batch.index], block * width:(block + 1) * width] = rows.to(device=x_dev, dtype=torch.float32)

    t0 = time.perf_counter()
    stream_tokens(model, [(layer, site) for layer in layer_list], batches(), write,
                  select_key="chosen", check_finite=False, progress=progress)
    return ActivationMatrix(x, site, layer_list, width, len(seqs), total,
                            {"capture_s": time.perf_counter() - t0})


def split_datasets(specs: Sequence[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Each dataset split into (build, held-out) documents with split seed 0, concatenated
    over datasets: the one split that ``build`` draws from and ``eval`` scores."""
    from nn_core.data import load_texts, split_texts

    build: list[str] = []
    heldout: list[str] = []
    for spec in specs:
        texts = load_texts(spec)
        if heldout_fraction > 0 and len(set(texts)) > 1:
            kept, held = split_texts(texts, heldout_fraction, seed=0)
        else:
            kept, held = texts, texts  # nothing held out: eval overlaps build (cli warns)
        build.extend(kept)
        heldout.extend(held)
    return build, heldout


def sample_texts(specs: Sequence[str], samples: int, *, seed: int, heldout_fraction: float
                 ) -> tuple[list[str], dict]:
    """Load every dataset, hold out ``heldout_fraction`` of each (split seed 0, the split
    ``nn-ica eval`` scores), and draw ``samples`` texts from the rest (seeded)."""
    from nn_core.data import sample

    if not specs:
        raise NNError("no data given: pass one or more datasets, e.g. pydoc or texts.jsonl")
    pool, _ = split_datasets(specs, heldout_fraction)
    n = min(samples, len(pool))
    return sample(pool, n, seed), {"available": len(pool), "drawn": n}


def build_templates(
    model: nn.Module,
    tokenizer,
    datasets: Sequence[str] | None = None,
    config: BuildConfig | None = None,
    *,
    texts: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Templates:
    """Capture -> standardise -> PCA -> FastICA -> threshold; see the module docs.

    Give ``datasets`` (specs for :func:`nn_core.data.load_texts`) or ``texts`` directly.
    ``device`` is where the matrix and the torch backend run (default: the model's).
    """
    from nn_core.data import tokenize_texts

    cfg = (config or BuildConfig()).check()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if texts is None:
        texts, drawn = sample_texts(list(datasets or []), cfg.samples, seed=cfg.seed,
                                    heldout_fraction=cfg.heldout_fraction)
    else:
        texts = list(texts)[: cfg.samples]
        drawn = {"available": len(texts), "drawn": len(texts)}
    ids = tokenize_texts(tokenizer, texts, max_length=cfg.max_length)
    timings["data_s"] = time.perf_counter() - t0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mat = capture_matrix(model, ids, site=cfg.site, layers=cfg.layers, max_tokens=cfg.max_tokens,
                         batch_size=cfg.batch_size, seed=cfg.seed, pad_id=int(pad or 0),
                         device=device, progress=progress)
    timings.update(mat.timings)
    if mat.n_tokens <= cfg.components or mat.n_tokens < cfg.pca_components:
        raise NNError(f"only {mat.n_tokens} tokens captured, fewer than --components {cfg.components} / "
                      f"--pca-components {cfg.pca_components}: use more samples, longer --max-length or "
                      "fewer components")
    if cfg.method == "canica":
        components, method_meta = _canica_components(mat, cfg, device=device, timings=timings)
        return _templates(model, mat, cfg, datasets, drawn, components, method_meta, timings, t_start)
    t0 = time.perf_counter()
    stats = standardise_(mat.x)
    timings["standardise_s"] = time.perf_counter() - t0
    dec = decompose(mat.x, n_components=cfg.components, pca_components=cfg.pca_components,
                    backend=cfg.backend, seed=cfg.seed, max_iter=cfg.max_iter, tol=cfg.tol)
    timings.update(dec.timings)
    t0 = time.perf_counter()
    picked, thresholds = select_channels(dec.maps, cfg.percentile)
    components = []
    for j, cols in enumerate(picked):
        neurons: dict[int, list[int]] = {}
        for col in cols.tolist():
            layer, channel = mat.column(col)
            neurons.setdefault(layer, []).append(channel)
        components.append(Component(
            j, {k: np.asarray(v, dtype=np.int64) for k, v in neurons.items()},
            variance=float(dec.components_variance[j]), threshold=float(thresholds[j]),
        ))
    timings["threshold_s"] = time.perf_counter() - t0
    method_meta = {
        "matrix": {"shape": list(mat.x.shape), "bytes": mat.nbytes, "dtype": "float32",
                   "zero_variance_columns": stats.n_zero_variance},
        "pca": {"components": cfg.pca_components, "solver": "randomized",
                "explained_variance_ratio": [round(float(v), 6) for v in dec.explained_variance_ratio],
                "explained_variance_total": float(dec.explained_variance_ratio.sum())},
        "ica": dec.ica_metadata(),
        "percentile": cfg.percentile,
        "sign_rule": "positive skewness of each spatial map (tie: largest |loading| positive)",
        "order": "by variance explained, largest first",
    }
    return _templates(model, mat, cfg, datasets, drawn, components, method_meta, timings, t_start)


def _templates(model, mat: ActivationMatrix, cfg: BuildConfig, datasets, drawn, components,
               method_meta: dict, timings: dict, t_start: float) -> Templates:
    from nn_core.model.adapters import model_signature

    timings["total_s"] = time.perf_counter() - t_start
    sig = model_signature(model)
    meta = {
        **sig,
        "site": cfg.site,
        "layers": mat.layers,
        "width": mat.width,
        "datasets": list(datasets or ["<texts>"]),
        "n_samples": mat.n_samples,
        "texts": drawn,
        "max_length": cfg.max_length,
        "n_tokens_seen": mat.n_tokens_seen,
        "n_tokens": mat.n_tokens,
        "max_tokens": cfg.max_tokens,
        "method": cfg.method,
        **method_meta,
        "backend": cfg.backend,
        "seed": cfg.seed,
        "heldout_fraction": cfg.heldout_fraction,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return Templates(meta, components)


def _canica_components(mat: ActivationMatrix, cfg: BuildConfig, *, device, timings: dict
                       ) -> tuple[list[Component], dict]:
    """Spatial ICA (:func:`nn_ica.decompose.spatial_ica`) per layer or on all layers
    concatenated, on each of ``cfg.subsets`` text subsets, thresholded at ``|z| > z_threshold``.

    The kept rows of ``X`` are in text order, so ``subsets`` contiguous row ranges are
    (nearly) disjoint groups of texts. Each subset is standardised per neuron on its own
    rows. With several subsets, the maps of subset s are paired with those of subset 0 by
    |correlation| (Hungarian) and component j is the union of its paired maps' selections.
    Per layer, component ``b * k + j`` is map j of the b-th layer (``extra``: layer, map).
    """
    t0 = time.perf_counter()
    k, width = cfg.components, mat.width
    if cfg.layout == "per-layer":
        blocks = [(slice(b * width, (b + 1) * width), [layer]) for b, layer in enumerate(mat.layers)]
    else:
        blocks = [(slice(0, len(mat.layers) * width), list(mat.layers))]
    bounds = np.linspace(0, mat.n_tokens, int(cfg.subsets) + 1).astype(int)
    components: list[Component] = []
    runs = []
    dead_total = 0
    for b, (cols, _layers) in enumerate(blocks):
        ref = None
        picked: list[np.ndarray] = []
        variance = None
        for s in range(int(cfg.subsets)):
            view = mat.x[bounds[s]:bounds[s + 1], cols]
            stats = standardise_(view)
            if s == 0:
                dead_total += stats.n_zero_variance
            res = spatial_ica(view, n_components=k, pca_components=cfg.pca_components, backend=cfg.backend,
                              seed=cfg.seed, max_iter=cfg.max_iter, tol=cfg.tol, device=device,
                              dead=stats.zero_variance)
            runs.append({"block": b, "subset": s, "n_iter": res.n_iter, "converged": res.converged})
            sel = select_z(res.z, cfg.z_threshold)
            if ref is None:
                ref, picked, variance = res.z, sel, res.variance
            else:
                pair, _ = match_columns(ref.astype(np.float64), res.z.astype(np.float64))
                picked = [np.union1d(picked[j], sel[pair[j]]) for j in range(k)]
        for j in range(k):
            neurons: dict[int, list[int]] = {}
            for col in (np.asarray(picked[j]) + cols.start).tolist():
                layer, channel = mat.column(col)
                neurons.setdefault(layer, []).append(channel)
            extra = {"layer": _layers[0], "map": j} if cfg.layout == "per-layer" else {"map": j}
            components.append(Component(
                len(components), {la: np.asarray(v, dtype=np.int64) for la, v in neurons.items()},
                variance=float(variance[j]), threshold=float(cfg.z_threshold), extra=extra))
    timings["ica_s"] = time.perf_counter() - t0
    meta = {
        "matrix": {"shape": list(mat.x.shape), "bytes": mat.nbytes, "dtype": "float32",
                   "zero_variance_columns": dead_total},
        "pca": {"components": cfg.pca_components, "solver": "randomized", "over": "tokens"},
        "ica": {"kind": "spatial (neurons as samples)", "algorithm": "parallel", "fun": "logcosh",
                "n_components": k, "layout": cfg.layout, "subsets": int(cfg.subsets),
                "max_iter": cfg.max_iter, "tol": cfg.tol, "n_runs": len(runs),
                "n_iter": max(r["n_iter"] for r in runs),
                "converged": all(r["converged"] for r in runs),
                "not_converged_runs": sum(not r["converged"] for r in runs)},
        "z_threshold": cfg.z_threshold,
        "sign_rule": "positive skewness of each z-scored map (tie: largest |z| positive); selection uses |z|",
        "order": ("per layer, then by variance explained within the layer" if cfg.layout == "per-layer"
                  else "by variance explained, largest first"),
    }
    return components, meta
