"""Standardise -> PCA -> FastICA -> spatial maps, with a scikit-learn and a torch backend.

The data matrix ``X`` is (n_tokens, p): one row per captured token, one column per neuron
(layer, channel), layers concatenated. The steps:

1. **Standardise** every column: ``x <- (x - mean) / std``. Columns whose standard
   deviation is below ``eps`` (dead channels) are set to zero instead of divided, and
   are reported; their loadings are then exactly zero and they are never selected.
2. **PCA** (randomized SVD) to ``d`` dimensions: ``X ≈ U S Vᵀ``; the scores are
   ``X_r = X V`` (n, d) and ``V`` (p, d) holds the principal axes.
3. **FastICA** (parallel, logcosh, i.e. ``G(u) = log cosh u``, ``g = tanh``) on ``X_r``:
   whiten to ``k`` dimensions (``Z = X_r K``, ``cov(Z) = I``), then iterate on the
   orthogonal unmixing ``W``::

       W <- E[g(W z) zᵀ] - diag(E[g'(W z)]) W ;   W <- (W Wᵀ)^(-1/2) W

   until ``max |(|diag(W_new Wᵀ)| - 1)| < tol``. Sources ``s = Wᵀ-unmix(x_r)`` are scaled
   to unit variance; ``M = pinv(unmixing)`` (d, k) is the mixing matrix, so
   ``X_r ≈ S Mᵀ``.
4. **Spatial maps** ``A = V M`` (p, k): since ``X ≈ X_r Vᵀ ≈ S (V M)ᵀ``, column j of A is
   how strongly every neuron carries component j. With unit-variance, uncorrelated
   sources the variance of the standardised data explained by component j is
   ``‖A_j‖²``; components are ordered by it, largest first.
5. **Sign**: ICA leaves each component's sign free. We flip component j so that its
   spatial map has positive skewness (``Σ (A_ij - mean_j)³ > 0``: the heavy tail, where
   the network's neurons sit, points up); if that sum is exactly zero, so that the
   largest-|A| loading is positive. Sources and unmixing rows flip with it.

Both backends follow these steps; they differ in the random initialisations, so they
agree up to the order and sign of components (which the ordering and sign rules above
then fix) and the numerical tolerance of FastICA.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from nn_core.errors import NNError

BACKENDS = ("torch", "sklearn")


@dataclass
class Standardised:
    """Per-column statistics of a standardisation (float64)."""

    mean: np.ndarray
    std: np.ndarray
    zero_variance: np.ndarray  # bool (p,)

    @property
    def n_zero_variance(self) -> int:
        return int(self.zero_variance.sum())


@dataclass
class Decomposition:
    """Result of :func:`decompose`.

    ``maps`` (p, k) are the spatial maps A, ``sources`` (n, k) the unit-variance time
    courses, ``mixing`` (d, k) and ``unmixing`` (k, d) the ICA matrices in PCA space,
    ``components_variance`` (k,) the fraction of the standardised variance each
    component explains (``‖A_j‖² / total``).
    """

    maps: np.ndarray
    sources: np.ndarray
    mixing: np.ndarray
    unmixing: np.ndarray
    explained_variance_ratio: np.ndarray
    components_variance: np.ndarray
    backend: str
    seed: int
    pca_components: int
    n_components: int
    max_iter: int
    tol: float
    n_iter: int
    converged: bool
    timings: dict = field(default_factory=dict)

    def ica_metadata(self) -> dict:
        return {
            "algorithm": "parallel",
            "fun": "logcosh",
            "n_components": self.n_components,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "n_iter": self.n_iter,
            "converged": self.converged,
        }


# --------------------------------------------------------------------------- standardise
@torch.no_grad()
def standardise_(x: torch.Tensor, *, eps: float = 1e-6, chunk: int = 2048) -> Standardised:
    """Standardise the columns of ``x`` in place (see module docs); returns the statistics.

    Columns are processed in blocks of ``chunk``, each converted to float64 for the mean
    and the (n - 1)-normalised variance, so a float32 matrix of many tokens is
    standardised exactly without a float64 copy of the whole matrix.
    """
    if x.ndim != 2:
        raise NNError(f"expected a (tokens, neurons) matrix, got shape {tuple(x.shape)}")
    n, p = x.shape
    if n < 2:
        raise NNError(f"only {n} token(s) captured: standardising needs at least 2; use more samples")
    means, stds = [], []
    for c in range(0, p, chunk):
        block = x[:, c:c + chunk].double()
        if not torch.isfinite(block).all():
            raise NNError("the activation matrix has non-finite values: load the model in float32 "
                          "(--dtype float32) or check the inputs")
        mean = block.mean(0)
        std = block.std(0, correction=1)
        zero = std < eps
        block = (block - mean) / torch.where(zero, torch.ones_like(std), std)
        block[:, zero] = 0.0
        x[:, c:c + chunk] = block.to(x.dtype)
        means.append(mean)
        stds.append(std)
    mean, std = torch.cat(means), torch.cat(stds)
    return Standardised(mean.cpu().numpy(), std.cpu().numpy(), (std < eps).cpu().numpy())


# --------------------------------------------------------------------------- torch backend
def randomized_pca_torch(x: torch.Tensor, d: int, *, seed: int, n_oversamples: int = 10,
                         n_iter: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized PCA of a column-centred ``x`` (n, p) (Halko, Martinsson & Tropp 2011).

    A Gaussian test matrix Ω (p, d + oversamples) gives ``Y = X Ω``; ``n_iter`` power
    iterations ``Y <- X (Xᵀ Q)`` (re-orthonormalised by QR each time) sharpen the
    spectrum; with ``Q = qr(Y)``, the SVD of the small ``B = Qᵀ X`` gives ``X ≈ (Q U_B) S Vᵀ``.
    Returns (scores ``X V`` (n, d), axes ``Vᵀ`` (d, p), explained-variance ratios (d,)).
    Signs follow ``svd_flip``: the largest-|value| entry of every score column is positive.
    """
    n, p = x.shape
    ell = min(d + n_oversamples, n, p)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(p, ell, generator=gen, device=x.device, dtype=x.dtype)
    q, _ = torch.linalg.qr(x @ omega)
    for _ in range(n_iter):
        q, _ = torch.linalg.qr(x @ (x.T @ q))
    b = q.T @ x
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = (q @ ub)[:, :d]
    s, vh = s[:d], vh[:d]
    idx = u.abs().argmax(0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs[:, None]
    total_var = _total_variance(x)
    ratio = (s.double() ** 2 / (n - 1)) / total_var if total_var > 0 else torch.zeros_like(s.double())
    return u * s, vh, ratio


def _sym_decorrelate(w: torch.Tensor) -> torch.Tensor:
    """``(W Wᵀ)^(-1/2) W``: the orthogonal matrix nearest to W."""
    s, u = torch.linalg.eigh(w @ w.T)
    s = torch.clamp(s, min=torch.finfo(w.dtype).tiny)
    return (u * (1.0 / torch.sqrt(s))) @ u.T @ w


def fastica_torch(xr: torch.Tensor, k: int, *, seed: int, max_iter: int, tol: float
                  ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Parallel FastICA with the logcosh contrast on ``xr`` (n, d); see module docs.

    Returns (unmixing (k, d) scaled so the sources have unit variance, mean (d,), number
    of iterations, converged)."""
    n = xr.shape[0]
    mean = xr.mean(0)
    xc = xr - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    if float(s[k - 1]) <= float(s[0]) * 1e-12:
        raise NNError(f"the data has rank below --components {k}: use fewer components or more tokens")
    whiten = (vh[:k].T / s[:k]) * math.sqrt(n)  # (d, k); Z = xc @ whiten has cov I
    z = xc @ whiten
    gen = torch.Generator(device=xr.device).manual_seed(seed)
    w = _sym_decorrelate(torch.randn(k, k, generator=gen, device=xr.device, dtype=xr.dtype))
    converged, it = False, 0
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is reported after the loop
        g = torch.tanh(z @ w.T)
        w_new = (g.T @ z) / n - (1.0 - g * g).mean(0)[:, None] * w
        w_new = _sym_decorrelate(w_new)
        lim = float((torch.abs(torch.abs(torch.einsum("ij,ij->i", w_new, w)) - 1.0)).max())
        w = w_new
        if lim < tol:
            converged = True
            break
    unmixing = w @ whiten.T  # (k, d)
    src_std = (xc @ unmixing.T).std(0)
    unmixing = unmixing / src_std[:, None]
    return unmixing, mean, it, converged


# --------------------------------------------------------------------------- sklearn backend
def _sklearn_pca(x: np.ndarray, d: int, seed: int):
    from sklearn.decomposition import PCA

    pca = PCA(n_components=d, svd_solver="randomized", random_state=seed, copy=False)
    scores = pca.fit_transform(x)
    return scores, pca.components_, pca.explained_variance_ratio_


def _sklearn_ica(xr: np.ndarray, k: int, seed: int, max_iter: int, tol: float):
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    ica = FastICA(n_components=k, algorithm="parallel", fun="logcosh", whiten="unit-variance",
                  max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ica.fit(xr)
    not_converged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ica.components_, ica.mean_, int(ica.n_iter_), not not_converged


# --------------------------------------------------------------------------- entry point
def decompose(
    x: torch.Tensor | np.ndarray,
    *,
    n_components: int,
    pca_components: int,
    backend: str = "torch",
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
) -> Decomposition:
    """PCA -> FastICA -> spatial maps of a standardised matrix ``x`` (n, p).

    ``x`` should already be standardised (:func:`standardise_`); it may be modified. Non
    convergence is not an error but is reported in the result and as a ``UserWarning``.
    """
    if backend not in BACKENDS:
        raise NNError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    if n_components < 1:
        raise NNError(f"--components must be at least 1, got {n_components}")
    if pca_components < n_components:
        raise NNError(f"--pca-components ({pca_components}) must be at least --components ({n_components})")
    n, p = x.shape
    if n < pca_components or n <= n_components:
        raise NNError(f"only {n} tokens captured, fewer than --pca-components {pca_components} / "
                      f"--components {n_components}: use more samples or --max-tokens, or fewer components")
    if p < pca_components:
        raise NNError(f"only {p} neurons (columns), fewer than --pca-components {pca_components}: "
                      "use fewer PCA components or more layers")
    timings: dict[str, float] = {}
    # Before PCA: scikit-learn's PCA(copy=False) may overwrite x.
    total_var = _total_variance(x)
    t0 = time.perf_counter()
    if backend == "torch":
        xt = torch.as_tensor(x)
        if device is not None:
            xt = xt.to(device)
        scores, axes, ratio = randomized_pca_torch(xt, pca_components, seed=seed)
        timings["pca_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        xr = scores.double()
        unmixing, mean, n_iter, converged = fastica_torch(xr, n_components, seed=seed,
                                                          max_iter=max_iter, tol=tol)
        mixing = torch.linalg.pinv(unmixing)
        sources = (xr - mean) @ unmixing.T
        maps = axes.double().T @ mixing
        timings["ica_s"] = time.perf_counter() - t1
        arrays = [a.cpu().numpy() for a in (maps, sources, mixing, unmixing, ratio)]
        maps_np, sources_np, mixing_np, unmixing_np, ratio_np = arrays
    else:
        xn = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        scores, axes, ratio_np = _sklearn_pca(xn, pca_components, seed)
        timings["pca_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        xr = scores.astype(np.float64)
        unmixing_np, mean, n_iter, converged = _sklearn_ica(xr, n_components, seed, max_iter, tol)
        mixing_np = np.linalg.pinv(unmixing_np)
        sources_np = (xr - mean) @ unmixing_np.T
        maps_np = axes.astype(np.float64).T @ mixing_np
        timings["ica_s"] = time.perf_counter() - t1
    if not np.all(np.isfinite(maps_np)):
        raise NNError("ICA produced non-finite maps: check the activations (float32) and use fewer components")
    if not converged:
        warnings.warn(f"FastICA did not converge in {max_iter} iterations (tol {tol}); the "
                      "templates are usable but approximate: raise --max-iter or --tol",
                      UserWarning, stacklevel=2)
    maps_np, sources_np, mixing_np, unmixing_np = orient(maps_np, sources_np, mixing_np, unmixing_np)
    var = (maps_np ** 2).sum(0) / total_var if total_var > 0 else np.zeros(maps_np.shape[1])
    order = np.argsort(-var, kind="stable")
    return Decomposition(
        maps=maps_np[:, order].astype(np.float32),
        sources=sources_np[:, order].astype(np.float32),
        mixing=mixing_np[:, order],
        unmixing=unmixing_np[order],
        explained_variance_ratio=np.asarray(ratio_np, dtype=np.float64),
        components_variance=var[order],
        backend=backend, seed=seed, pca_components=pca_components, n_components=n_components,
        max_iter=max_iter, tol=tol, n_iter=n_iter, converged=converged, timings=timings,
    )


def _total_variance(x) -> float:
    """Sum of the column variances of the (standardised) matrix."""
    n = x.shape[0]
    if isinstance(x, torch.Tensor):
        return sum(float(torch.linalg.vector_norm(x[i:i + 256], dtype=torch.float64) ** 2)
                   for i in range(0, n, 256)) / (n - 1)
    return float(np.einsum("ij,ij->", x, x, dtype=np.float64)) / (n - 1)


def orient(maps: np.ndarray, sources: np.ndarray, mixing: np.ndarray, unmixing: np.ndarray):
    """Apply the sign rule of the module docs: positive skewness of each spatial map, else
    the largest-|A| loading positive. Returns flipped copies."""
    centred = maps - maps.mean(0)
    third = (centred ** 3).sum(0)
    largest = maps[np.abs(maps).argmax(0), np.arange(maps.shape[1])]
    signs = np.where(third != 0, np.sign(third), np.sign(largest))
    signs[signs == 0] = 1.0
    return maps * signs, sources * signs, mixing * signs, unmixing * signs[:, None]


def select_channels(maps: np.ndarray, percentile: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Per component j, the columns i with ``|A_ij| >= q_j`` where ``q_j`` is the
    ``percentile``-th percentile of ``|A_j|`` (linear interpolation). Columns with a zero
    loading (dead channels) are never selected. Returns (column indices per component,
    thresholds)."""
    if not 0.0 <= percentile < 100.0:
        raise NNError(f"--percentile must be in [0, 100), got {percentile}")
    absmap = np.abs(maps)
    thresholds = np.percentile(absmap, percentile, axis=0)
    picked = [np.flatnonzero((absmap[:, j] >= thresholds[j]) & (absmap[:, j] > 0))
              for j in range(maps.shape[1])]
    return picked, thresholds


def match_columns(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair the columns of ``a`` and ``b`` (same number of rows) by absolute correlation with
    the Hungarian algorithm. Returns (column of b for every column of a, |corr| per pair)."""
    from scipy.optimize import linear_sum_assignment

    za = (a - a.mean(0)) / a.std(0)
    zb = (b - b.mean(0)) / b.std(0)
    corr = np.abs(za.T @ zb) / a.shape[0]
    rows, cols = linear_sum_assignment(-corr)
    out = np.full(a.shape[1], -1)
    out[rows] = cols
    return out, corr[rows, cols]


# --------------------------------------------------------------------------- spatial ICA
@dataclass
class SpatialMaps:
    """Result of :func:`spatial_ica`: ``z`` (p, k) z-scored spatial maps (neurons x
    components), ``variance`` (k,) the fraction of the block's variance each map explains,
    and the FastICA convergence record."""

    z: np.ndarray
    variance: np.ndarray
    n_iter: int
    converged: bool
    timings: dict = field(default_factory=dict)


def spatial_ica(
    x: torch.Tensor,
    *,
    n_components: int,
    pca_components: int,
    backend: str = "torch",
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
    dead: np.ndarray | None = None,
) -> SpatialMaps:
    """Spatial ICA (neurons as samples, as CanICA does) of a matrix ``x`` (n_tokens, p)
    whose columns are already standardised per neuron (:func:`standardise_`).

    1. Centre every token (row) across the p neurons: ``x_t <- x_t - mean_i x_ti`` (in place).
    2. Run :func:`decompose` on ``xᵀ`` (p, n): PCA reduces the token dimension to
       ``pca_components``, FastICA finds ``n_components`` sources that are independent
       *across neurons*. Those sources (p, k) are the spatial maps; what
       :func:`decompose` calls maps (n, k) are here the components' token time courses.
    3. Z-score each spatial map over the neurons, ``z_ij = (s_ij - mean_j) / std_j``, and
       orient it by the sign rule of the module docs (positive skewness of ``z_j``).
       Neurons flagged in ``dead`` (zero-variance columns) get ``z = 0``: never selected.

    Maps are ordered by the variance they explain, largest first (as :func:`decompose`).
    """
    if x.ndim != 2:
        raise NNError(f"expected a (tokens, neurons) matrix, got shape {tuple(x.shape)}")
    x -= x.mean(1, keepdim=True)
    dec = decompose(x.T, n_components=n_components, pca_components=pca_components, backend=backend,
                    seed=seed, max_iter=max_iter, tol=tol, device=device)
    s = dec.sources.astype(np.float64)
    std = s.std(0)
    std[std == 0] = 1.0
    z = (s - s.mean(0)) / std
    if dead is not None:
        z[np.asarray(dead, dtype=bool)] = 0.0
    third = (z ** 3).sum(0)
    largest = z[np.abs(z).argmax(0), np.arange(z.shape[1])]
    signs = np.where(third != 0, np.sign(third), np.sign(largest))
    signs[signs == 0] = 1.0
    return SpatialMaps((z * signs).astype(np.float32), dec.components_variance, dec.n_iter,
                       dec.converged, dec.timings)


def select_z(z: np.ndarray, threshold: float = 3.6) -> list[np.ndarray]:
    """Per z-scored map j, the rows i with ``|z_ij| > threshold`` (both tails: ICA's sign
    is arbitrary and a network may be anti-correlated with the component)."""
    if not threshold > 0:
        raise NNError(f"--z-threshold must be positive, got {threshold}")
    return [np.flatnonzero(np.abs(z[:, j]) > threshold) for j in range(z.shape[1])]
