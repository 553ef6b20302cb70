"""Lesion or preserve ICA components and measure the change in perplexity.

For the union S of the chosen components (a NeuronSet on the templates' site):

* ``lesion``: the channels of S are multiplied by 0; every other channel is untouched.
* ``preserve``: only the channels of S pass; *every* layer of the site is masked, so a
  layer in which S has no channel is zeroed entirely. (FunctionalNetworksSFT left such
  layers unmasked, so "preserve" there meant "preserve S, plus all of every layer S does
  not touch"; here it means exactly "keep only S".)
  Templates built on a subset of layers record them, and their NeuronSets carry
  ``meta["layers"]``: preserve then masks only those layers (the others were never
  analysed).

Ranking (:func:`rank_components`): every component is lesioned alone and compared with
``n_random`` size-matched random lesions (``random_like``); its score is
``z = (ΔPPL - mean_r) / sd_r`` (with fewer than two controls or ``sd_r = 0``, the
excess ``ΔPPL - mean_r``), and ``ratio = ΔPPL / mean_r`` is reported beside it.
Components are ranked by score, largest first. :func:`pick_fraction` takes components in
that order until their union covers about a fraction F of the channels of the analysed
layers (the prefix whose coverage is nearest F, never empty).

``ΔPPL = PPL(masked) - PPL(unmasked)`` on held-out text (each text's first ``max_length``
tokens), through :func:`nn_eval.evaluate_lm`.
A control is the same mask built from ``S.random_like(seed)`` (the same number of
channels in every layer, drawn uniformly), for several seeds; the report gives each
control's ΔPPL, their mean and standard deviation, and ``excess = ΔPPL(S) - mean``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from torch import nn

from nn_core.errors import NNError
from nn_core.intervene.masks import check_mode, mask_neurons
from nn_ica.templates import Templates


def check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise NNError(f"--seed must be 0 or more, got {seed}")
    return int(seed)


def heldout_texts(specs: Sequence[str], *, heldout_fraction: float, limit: int | None, seed: int = 0) -> list[str]:
    """The held-out documents of each dataset (the split ``nn-ica build`` leaves out:
    split seed 0), at most ``limit`` of them drawn with ``seed``."""
    from nn_core.data import sample
    from nn_ica.build import split_datasets

    check_seed(seed)
    _, out = split_datasets(specs, heldout_fraction)
    if limit is not None and len(out) > limit:
        out = sample(out, limit, seed)
    return out


def evaluate_components(
    model: nn.Module,
    tokenizer,
    templates: Templates,
    components: Sequence[int],
    texts: Sequence[str],
    *,
    mode: str = "lesion",
    n_random: int = 5,
    seed: int = 0,
    max_length: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    check_id: bool = True,
    site: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """ΔPPL of masking ``components`` (``mode`` lesion or preserve) against random controls.

    Returns ``{"mode", "components", "n_neurons", "layer_counts", "baseline",
    "intervened", "delta_ppl", "random": {"seeds", "delta_ppl", "ppl", "mean", "std"},
    "excess"}`` (``ppl`` entries are nn-eval result dicts)."""
    from nn_core.data import tokenize_texts
    from nn_eval import evaluate_lm

    check_mode(mode)
    check_seed(seed)
    if n_random < 0:
        raise NNError(f"--random must be 0 or more, got {n_random}")
    templates.check(model, site=site, check_id=check_id)
    ns = templates.neuronset(templates.check_ids(components), model=model)
    if not texts:
        raise NNError("no evaluation text: pass --data with a dataset that has held-out documents")
    # Each text is scored on its first max_length tokens: one window, bounded cost.
    data = [ids for ids in tokenize_texts(tokenizer, list(texts), max_length=max_length) if len(ids) > 1]
    kw = dict(max_length=max_length, stride=stride, batch_size=batch_size)
    say = progress or (lambda _msg: None)
    say("baseline")
    baseline = evaluate_lm(model, tokenizer, data, **kw)
    say(f"{mode} components {list(components)}")
    with mask_neurons(model, ns, mode):
        target = evaluate_lm(model, tokenizer, data, **kw)
    seeds = [seed + 1000 + i for i in range(n_random)]
    controls = []
    for s in seeds:
        say(f"random control seed {s}")
        with mask_neurons(model, ns.random_like(s), mode):
            controls.append(evaluate_lm(model, tokenizer, data, **kw))
    deltas = [c["ppl"] - baseline["ppl"] for c in controls]
    delta = target["ppl"] - baseline["ppl"]
    mean = statistics.fmean(deltas) if deltas else None
    return {
        "mode": mode,
        "site": templates.site,
        "components": list(components),
        "n_neurons": len(ns),
        "layer_counts": {str(k): v for k, v in sorted(ns.layer_counts(templates.site).items())},
        "baseline": baseline,
        "intervened": target,
        "delta_ppl": delta,
        "random": {
            "seeds": seeds,
            "delta_ppl": deltas,
            "ppl": [c["ppl"] for c in controls],
            "mean": mean,
            "std": statistics.stdev(deltas) if len(deltas) > 1 else None,
            "min": min(deltas) if deltas else None,
            "max": max(deltas) if deltas else None,
        },
        "excess": None if mean is None else delta - mean,
    }


def _scored_data(tokenizer, texts: Sequence[str], max_length: int) -> list:
    from nn_core.data import tokenize_texts

    if not texts:
        raise NNError("no evaluation text: pass --data with a dataset that has held-out documents")
    return [ids for ids in tokenize_texts(tokenizer, list(texts), max_length=max_length) if len(ids) > 1]


def rank_components(
    model: nn.Module,
    tokenizer,
    templates: Templates,
    texts: Sequence[str],
    *,
    components: Sequence[int] | None = None,
    n_random: int = 3,
    seed: int = 0,
    max_length: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    check_id: bool = True,
    site: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Lesion every component (all when ``components`` is None) alone against ``n_random``
    size-matched random lesions and rank them (see the module docs).

    Returns ``{"baseline", "n_channels", "rows": [{"id", "size", "fraction", "delta_ppl",
    "random_mean", "random_std", "z", "ratio", "score"}, ...]}`` with rows in rank order;
    ``n_channels`` is the number of channels of the analysed layers, the denominator of
    ``fraction``. The random controls of component c use seeds ``seed + 1000 + i``."""
    from nn_eval import evaluate_lm

    check_seed(seed)
    if n_random < 0:
        raise NNError(f"--random must be 0 or more, got {n_random}")
    templates.check(model, site=site, check_id=check_id)
    ids = templates.ids if components is None else templates.check_ids(components)
    data = _scored_data(tokenizer, texts, max_length)
    kw = dict(max_length=max_length, stride=stride, batch_size=batch_size)
    say = progress or (lambda _msg: None)
    say("baseline")
    baseline = evaluate_lm(model, tokenizer, data, **kw)
    n_channels = n_site_channels(model, templates)
    rows = []
    for n, cid in enumerate(ids):
        ns = templates.neuronset([cid], model=model)
        if len(ns) == 0:
            rows.append({"id": cid, "size": 0, "fraction": 0.0, "delta_ppl": 0.0, "random_mean": None,
                         "random_std": None, "z": None, "ratio": None, "score": float("-inf")})
            continue
        say(f"component {cid} ({n + 1}/{len(ids)}, {len(ns)} channels)")
        with mask_neurons(model, ns, "lesion"):
            delta = evaluate_lm(model, tokenizer, data, **kw)["ppl"] - baseline["ppl"]
        deltas = []
        for i in range(n_random):
            with mask_neurons(model, ns.random_like(seed + 1000 + i), "lesion"):
                deltas.append(evaluate_lm(model, tokenizer, data, **kw)["ppl"] - baseline["ppl"])
        mean = statistics.fmean(deltas) if deltas else None
        std = statistics.stdev(deltas) if len(deltas) > 1 else None
        z = (delta - mean) / std if std else None
        ratio = delta / mean if mean else None
        score = z if z is not None else (delta - mean if mean is not None else delta)
        rows.append({"id": cid, "size": len(ns), "fraction": len(ns) / n_channels, "delta_ppl": delta,
                     "random_mean": mean, "random_std": std, "z": z, "ratio": ratio, "score": score})
    rows.sort(key=lambda r: -r["score"])
    return {"baseline": baseline, "n_channels": n_channels, "n_random": n_random, "rows": rows}


def n_site_channels(model: nn.Module, templates: Templates) -> int:
    """Channels of the templates' site in the layers they analysed (all layers when unrecorded)."""
    from nn_core.model.adapters import get_adapter

    ad = get_adapter(model)
    layers = templates.layers if templates.layers is not None else list(range(ad.num_layers))
    return len(layers) * ad.width(templates.site)


def pick_fraction(templates: Templates, ranked: Sequence[int], fraction: float, n_channels: int
                  ) -> tuple[list[int], float]:
    """The prefix of ``ranked`` whose union covers the fraction of ``n_channels`` nearest
    ``fraction`` (at least one component). Returns (ids, covered fraction)."""
    if not 0 < fraction < 1:
        raise NNError(f"--preserve-fraction must be in (0, 1), got {fraction}")
    if not ranked:
        raise NNError("no components to choose from: build templates with at least one component")
    best: tuple[float, int, float] | None = None
    covered: dict[int, set] = {}
    total = 0
    for n, cid in enumerate(ranked, 1):
        for layer, arr in templates.component(cid).neurons.items():
            seen = covered.setdefault(layer, set())
            before = len(seen)
            seen.update(arr.tolist())
            total += len(seen) - before
        frac = total / n_channels
        if best is None or abs(frac - fraction) < best[0]:
            best = (abs(frac - fraction), n, frac)
        if frac >= fraction:
            break
    _, n, frac = best
    return list(ranked[:n]), frac
