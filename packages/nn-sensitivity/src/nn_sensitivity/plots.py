"""PNG figures of a sensitivity study (matplotlib with the Agg backend, imported here so
that importing nn_sensitivity stays light)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nn_core.io import atomic_path

_COLORS = {"top_k": "tab:red", "random_k": "tab:blue", "bottom_k": "tab:green"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


def delta_ppl_vs_k(rows: Sequence[Mapping], path: Path, *, title: str) -> Path:
    """ΔPPL against K (log x axis) for top-K and each control. Rows whose perturbed model
    gave inf/NaN logits (``delta.ppl`` None or inf) are drawn as triangles on the top edge.
    Rows with several random draws (``spread``) show the mean with a min..max bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        finite = [r["delta"]["ppl"] for r in rows if _finite(r["delta"]["ppl"])]
        top = max(0.05, 3 * max(finite)) if finite else 1.0
        for kind in ("top_k", "random_k", "bottom_k"):
            mine = [r for r in rows if r["selection"] == kind]
            pts = sorted((r["k"], r["delta"]["ppl"]) for r in mine if _finite(r["delta"]["ppl"]))
            if pts:
                ks, d = zip(*pts, strict=True)
                ax.plot(ks, d, marker="o", label=kind, color=_COLORS[kind])
            # several random draws: the line is their mean, the bar spans min..max
            spans = sorted((r["k"], r["delta"]["ppl"], r["spread"]["delta"]["ppl"]) for r in mine
                           if _finite(r["delta"]["ppl"]) and r.get("n_draws", 1) > 1
                           and (r.get("spread") or {}).get("delta", {}).get("ppl"))
            if spans:
                ks, mid, sp = zip(*spans, strict=True)
                lo = [m - s["min"] for m, s in zip(mid, sp, strict=True)]
                hi = [s["max"] - m for m, s in zip(mid, sp, strict=True)]
                ax.errorbar(ks, mid, yerr=[lo, hi], fmt="none", capsize=3, color=_COLORS[kind],
                            label=f"{kind}: min..max of {sp[0]['n']} draws")
            bad = sorted(r["k"] for r in mine if not _finite(r["delta"]["ppl"]))
            if bad:
                ax.plot(bad, [top] * len(bad), linestyle="none", marker="^", markersize=9,
                        color=_COLORS[kind], clip_on=False,
                        label=f"{kind}: non-finite (ppl = inf)")
        ax.set_xscale("log")
        # symlog: the controls' tiny changes and the top-K's huge ones on one axis
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(min([-0.05] + [3 * v for v in finite]), top)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("K (weights perturbed)")
        ax.set_ylabel("Δ perplexity (held-out)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        return _save(fig, path)
    finally:
        plt.close(fig)


def layer_histograms(hist: Mapping, path: Path, *, title: str) -> Path:
    """One histogram of log10(score) per group (decoder block), as stacked small panels."""
    plt = _pyplot()
    edges = np.asarray(hist["edges"])
    groups = list(hist["counts"])
    n = len(groups)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False,
                             sharex=True, layout="constrained")
    try:
        for ax, group in zip(axes.flat, groups, strict=False):
            counts = np.asarray(hist["counts"][group], dtype=float)
            ax.stairs(counts, edges, fill=True, color="tab:purple", alpha=0.7)
            ax.set_yscale("log")
            ax.set_ylim(0.8, max(10.0, counts.max() * 2))
            zeros = hist["zeros"].get(group, 0)
            ax.set_title(f"{group}" + (f" ({zeros} zero)" if zeros else ""), fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.supxlabel("log10(score)")
        fig.supylabel("weights")
        fig.suptitle(title, fontsize=10)
        return _save(fig, path)
    finally:
        plt.close(fig)


def stability_heatmap(seeds: Sequence[int], matrices: Mapping[int, np.ndarray], path: Path, *,
                      title: str) -> Path:
    """Jaccard of top-K sets between seeds, one panel per K."""
    plt = _pyplot()
    ks = list(matrices)
    fig, axes = plt.subplots(1, len(ks), figsize=(3.4 * len(ks) + 0.6, 3.2), squeeze=False)
    try:
        im = None
        for ax, k in zip(axes.flat, ks, strict=True):
            m = np.asarray(matrices[k])
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(seeds)), [str(s) for s in seeds])
            ax.set_yticks(range(len(seeds)), [str(s) for s in seeds])
            ax.set_xlabel("seed")
            ax.set_title(f"K={k}", fontsize=9)
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black")
        axes.flat[0].set_ylabel("seed")
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="Jaccard")
        fig.suptitle(title, fontsize=10)
        return _save(fig, path)
    finally:
        plt.close(fig)
