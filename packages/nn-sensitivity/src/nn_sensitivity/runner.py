"""The sensitivity study: score, rank, perturb against controls, measure, check stability.

``run_study(StudyConfig(...))`` is what ``nn-sensitivity run`` calls. One run:

1. loads the model and the text, split once into calibration and held-out documents
   (whole documents, disjoint);
2. for each seed draws ``calib_blocks`` token blocks from the calibration side and scores
   every eligible weight on them (the first seed's scores drive the study; the others
   only measure rank stability);
3. ranks the top-K for the largest K of the sweep, plus each control of the same size
   (``random_k``, ``bottom_k``); smaller K are prefixes of the same ranking;
4. measures the baseline on the held-out blocks once, then ΔPPL, ΔNLL and Δtoken-accuracy
   with each selection perturbed (restored exactly after each measurement);
5. writes ``rankings/``, ``perturbation_results.json``, ``stability.json``, ``plots/`` and
   ``manifest.json``, and returns the summary.

Under torch.distributed every rank scores its share of the calibration blocks (scores are
all-reduced); rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nn_core.errors import NNError
from nn_sensitivity import dist
from nn_sensitivity.metrics import check_metric, histograms, score
from nn_sensitivity.params import eligible_params
from nn_sensitivity.perturb import check_perturbation, perturbed
from nn_sensitivity.rank import MODES, Ranking, check_controls, rank
from nn_sensitivity.stability import jaccard_matrix, shared_fraction, summarise

# The commands whose outputs these are (recorded in manifest.json; an existing `out` is
# replaced only when it is a previous output of the same command, see nn_core.io).
RUN_TOOL = "nn-sensitivity run"
EVALUATE_TOOL = "nn-sensitivity evaluate"


@dataclass
class StudyConfig:
    """Everything a study depends on (recorded in the manifest). Defaults finish in a
    few minutes on a 2-core CPU with the embedded smollm2-135m and pydoc text."""

    model: str = "smollm2-135m"
    data: str = "pydoc"
    metric: str = "grad_x_weight"
    topk: list[int] = field(default_factory=lambda: [10, 100, 1000])
    mode: str = "global"
    perturb: str = "sign_flip"
    perturb_scale: float = 1.0
    perturb_absolute: bool = False
    bit: int | None = None
    prob: float = 1.0
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    stability: bool = True
    calib_blocks: int = 8
    block_len: int = 128
    batch_size: int = 4
    heldout_fraction: float = 0.2
    split_seed: int = 0
    eval_tokens: int = 2048
    eval_len: int = 256
    probes: int = 4
    per_sample: bool = True
    random_draws: int = 5
    include_embeddings: bool = False
    include_lm_head: bool = False
    layers: str | None = None
    modules: str | None = None
    csv_rows: int = 1000
    device: str = "auto"
    dtype: str = "auto"
    out: str = "runs/sensitivity"
    overwrite: bool = False  # replace an `out` that is not a previous output of this command

    def check(self) -> StudyConfig:
        check_metric(self.metric)
        check_perturbation(self.perturb)
        self.controls = check_controls(self.controls)
        if self.mode not in MODES:
            raise NNError(f"unknown ranking mode '{self.mode}': use one of {', '.join(MODES)}")
        if not self.topk or any(k < 1 for k in self.topk):
            raise NNError(f"--topk needs positive integers, got {self.topk}: e.g. --topk 10,100,1000")
        self.topk = sorted(set(self.topk))
        if not self.seeds:
            raise NNError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
        self.seeds = list(dict.fromkeys(self.seeds))
        negative = [s for s in self.seeds if s < 0]
        if negative:
            raise NNError(f"seed {negative[0]} is negative: --seeds takes integers >= 0, e.g. 0,1,2")
        for name in ("calib_blocks", "block_len", "batch_size", "eval_tokens", "eval_len",
                     "probes", "random_draws"):
            if getattr(self, name) < 1:
                raise NNError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.eval_len < 2:
            raise NNError("--eval-len must be at least 2 tokens")
        return self

    def metric_options(self) -> dict:
        if self.metric == "hutchinson_diag":
            return {"probes": self.probes}
        if self.metric == "grad_squared":
            return {"per_sample": self.per_sample}
        return {}


def _quiet(progress: bool | None) -> bool:
    if progress is None:
        import sys

        return not sys.stderr.isatty()
    return not progress


class _Data:
    """Calibration blocks (all of them, sampled per seed) and the held-out eval blocks."""

    def __init__(self, cfg: StudyConfig, tokenizer):
        from nn_core.data import load_texts, split_texts, token_blocks

        texts = load_texts(cfg.data)
        if len(texts) < 2:
            raise NNError(f"'{cfg.data}' holds one document; calibration and held-out text must "
                          "be different documents: give a corpus of several documents")
        train, heldout = split_texts(texts, cfg.heldout_fraction, cfg.split_seed)
        if not heldout:
            raise NNError("the held-out fraction is 0: pass --heldout-fraction 0.2")
        self.n_docs = (len(train), len(heldout))
        self.calib = token_blocks(tokenizer, train, cfg.block_len)
        if self.calib.shape[0] < cfg.calib_blocks:
            raise NNError(f"the calibration text holds {self.calib.shape[0]} blocks of "
                          f"{cfg.block_len} tokens, fewer than --calib-blocks {cfg.calib_blocks}: "
                          "give more text or ask for fewer blocks")
        held = token_blocks(tokenizer, heldout, cfg.eval_len)
        n_eval = min(held.shape[0], math.ceil(cfg.eval_tokens / cfg.eval_len))
        self.eval = held[:n_eval]
        self.cfg = cfg

    def blocks_for(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.calib.shape[0], self.cfg.calib_blocks, replace=False))

    def batches_for(self, seed: int) -> list[dict]:
        """This rank's calibration batches for ``seed`` (blocks are full: no padding)."""
        return calibration_batches(self.calib, self.blocks_for(seed).tolist(),
                                   self.cfg.batch_size)


def calibration_batches(calib: torch.Tensor, blocks: Sequence[int], batch_size: int, *,
                        ws: int | None = None, rk: int | None = None) -> list[dict]:
    """The calibration batches of rank ``rk`` out of ``ws`` (default: this process).

    All chosen ``blocks`` are grouped into batches of ``batch_size`` first and the batches
    are then dealt round robin to the ranks, so every batch holds the same blocks whatever
    the world size: per-batch metrics (``grad_squared`` squares each batch's gradient) then
    give the same sums under data parallelism as in one process.
    """
    rows = calib[torch.as_tensor(list(blocks), dtype=torch.long)]
    batches = [{"input_ids": rows[i:i + batch_size]} for i in range(0, rows.shape[0], batch_size)]
    world = dist.world_size() if ws is None else ws
    if len(batches) < world:
        raise NNError(f"{len(batches)} calibration batches cannot be shared by {world} processes: "
                      "raise --calib-blocks or lower --batch-size")
    return dist.shard(batches, ws=world, rk=rk)


def check_k_fits(params, k: int, mode: str) -> None:
    """Raise :class:`NNError` before any scoring when ``k`` exceeds the eligible weights
    (``global``) or the eligible weights of some decoder block (``per-layer``)."""
    if mode != "per-layer":
        n = sum(p.numel for p in params)
        if k > n:
            raise NNError(f"K={k} is larger than the {n} eligible weights: "
                          "pick a smaller --topk or widen the filters")
        return
    sizes: dict[str, int] = {}
    for p in params:
        sizes[p.group] = sizes.get(p.group, 0) + p.numel
    group, n = min(sizes.items(), key=lambda kv: kv[1])
    if k > n:
        raise NNError(f"K={k} is larger than the {n} eligible weights in {group} (per-layer mode): "
                      "pick a smaller --topk or widen the filters")


_METRICS = ("ppl", "nll", "token_acc")


def _measure_perturbed(model, tokenizer, data: torch.Tensor, cfg: StudyConfig, ws,
                       seed: int) -> tuple[dict, dict]:
    """Evaluate with ``ws`` perturbed; returns (perturbation info, result). A perturbation
    that drives the logits to inf/NaN (an exponent bit flip) is a finding, not a failure:
    its result is ``{"ppl": None, "nll": None, "token_acc": None, "non_finite": True}``
    (JSON has no inf). The weights are restored either way (``perturbed`` restores in its
    ``finally``)."""
    from nn_eval.lm import NonFiniteLogits

    with perturbed(model, ws, cfg.perturb, scale=cfg.perturb_scale,
                   absolute=cfg.perturb_absolute, bit=cfg.bit, prob=cfg.prob,
                   seed=seed) as info:
        try:
            res = dict(_evaluate(model, tokenizer, data, cfg))
            res["non_finite"] = False
        except NonFiniteLogits:
            res = {m: None for m in _METRICS} | {"non_finite": True}
    return info, res


def _delta(res: dict, baseline: dict) -> dict:
    return {m: None if res[m] is None else res[m] - baseline[m] for m in _METRICS}


def _evaluate(model, tokenizer, data: torch.Tensor, cfg: StudyConfig) -> dict:
    from nn_eval import evaluate_lm

    return evaluate_lm(model, tokenizer, data, max_length=cfg.eval_len,
                       stride=max(1, cfg.eval_len - 1), batch_size=cfg.batch_size)


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["rank", "name", "flat_index", "index", "layer", "module", "score"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "score": f"{r['score']:.6e}"})
    return buf.getvalue()


def _random_summary(measured: list, k: int, baseline: dict, seed0: int) -> dict:
    """The random_k row over all draws: its ppl/nll/token_acc/delta become the means over
    the draws with finite results, ``spread`` holds mean, sd (n-1; 0 for one draw), min
    and max per metric and delta, and ``draws`` every draw's seed and result."""
    draws = []
    for d, ranking, info, res in measured:
        draws.append({"draw": d, "seed": seed0 + d, "n_changed": info["n_changed"],
                      "ppl": res["ppl"], "nll": res["nll"], "token_acc": res["token_acc"],
                      "non_finite": res["non_finite"], "delta": _delta(res, baseline),
                      "score_mean": float(np.mean(ranking.prefix(k).score))})
    ok = [x for x in draws if not x["non_finite"]]

    def stats(values: list[float]) -> dict | None:
        if not values:
            return None
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}

    spread = {m: stats([x[m] for x in ok]) for m in _METRICS}
    spread["delta"] = {m: stats([x["delta"][m] for x in ok]) for m in _METRICS}
    out = {"draws": draws, "spread": spread, "n_draws": len(draws),
           "n_non_finite_draws": len(draws) - len(ok)}
    if ok:
        out.update({m: spread[m]["mean"] for m in _METRICS})
        out["delta"] = {m: spread["delta"][m]["mean"] for m in _METRICS}
        out["non_finite"] = False
        out["score_mean"] = float(np.mean([x["score_mean"] for x in draws]))
    return out


def run_study(cfg: StudyConfig, *, model=None, tokenizer=None, progress: bool | None = None,
              echo: Callable[[str], None] | None = print) -> dict:
    """Run the whole study and write its outputs under ``cfg.out``; returns the summary
    (also written as ``perturbation_results.json`` and ``stability.json``).

    ``model``/``tokenizer`` may be given already loaded (then ``cfg.model`` only labels it).
    """
    from tqdm.auto import tqdm

    from nn_core.io import atomic_dir, atomic_write_json, atomic_write_text
    from nn_core.model.loading import load_model
    from nn_core.run.manifest import PhaseTimer, write_manifest

    cfg = cfg.check()
    timer = PhaseTimer()
    dist.maybe_init_from_env()
    main_rank = dist.rank() == 0
    out = Path(cfg.out)
    say = echo if (echo is not None and main_rank) else (lambda _msg: None)

    with timer("load"):
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                          seed=cfg.seeds[0])
        elif tokenizer is None:
            raise NNError("run_study got a model without its tokenizer: pass both")
        params = eligible_params(model, include_embeddings=cfg.include_embeddings,
                                 include_lm_head=cfg.include_lm_head, layers=cfg.layers,
                                 modules=cfg.modules)
        n_eligible = sum(p.numel for p in params)
        check_k_fits(params, cfg.topk[-1], cfg.mode)
        data = _Data(cfg, tokenizer)
    say(f"nn-sensitivity: {cfg.model}, {len(params)} tensors / {n_eligible:,} eligible weights, "
        f"metric {cfg.metric}, {cfg.calib_blocks}x{cfg.block_len} calibration tokens per seed, "
        f"{int(data.eval.numel()):,} held-out tokens")

    kmax = cfg.topk[-1]
    opts = cfg.metric_options()
    seed0 = cfg.seeds[0]
    with timer("score"):
        scores = score(model, data.batches_for(seed0), cfg.metric, params=params,
                       progress=progress, **({"seed": seed0} if "probes" in opts else {}), **opts)
    with timer("rank"):
        rankings: dict[str, Ranking] = {"top_k": rank(scores, kmax, "top_k", cfg.mode)}
        for ctrl in cfg.controls:
            rankings[ctrl] = rank(scores, kmax, ctrl, cfg.mode, seed=seed0)
        # random_k is drawn several times (seeds seed0, seed0+1, ...): "top-K beats random"
        # is judged against the spread between draws, not against one lucky or unlucky draw
        random_draws = {d: rank(scores, kmax, "random_k", cfg.mode, seed=seed0 + d)
                        for d in range(1, cfg.random_draws)} if "random_k" in rankings else {}
        hist = histograms(scores)
    score_info = {k: v for k, v in scores.info.items() if k != "model"}
    del scores  # the stability seeds need the memory more

    stab_sets: dict[int, dict[int, object]] = {}
    if cfg.stability and len(cfg.seeds) > 1:
        with timer("stability"):
            stab_sets[seed0] = {k: rankings["top_k"].prefix(k).to_weightset() for k in cfg.topk}
            for seed in cfg.seeds[1:]:
                s = score(model, data.batches_for(seed), cfg.metric, params=params,
                          progress=progress, **({"seed": seed} if "probes" in opts else {}),
                          **opts)
                top = rank(s, kmax, "top_k", cfg.mode)
                del s
                stab_sets[seed] = {k: top.prefix(k).to_weightset() for k in cfg.topk}

    if not main_rank:
        return {}

    # Everything is built in a temporary sibling folder and swapped in whole at the end:
    # a failed run leaves the previous results untouched, a finished one never mixes with them.
    with atomic_dir(out, tool=RUN_TOOL, overwrite=cfg.overwrite) as tmp:
        with timer("write_rankings"):
            rdir = tmp / "rankings"
            for kind, r in rankings.items():
                for k in cfg.topk:
                    r.prefix(k).to_weightset().save(rdir / f"{kind}_k{k}.safetensors")
            for d, r in random_draws.items():
                for k in cfg.topk:
                    r.prefix(k).to_weightset().save(rdir / f"random_k_k{k}_draw{d}.safetensors")
            atomic_write_text(rdir / "top_k.csv", _csv_text(rankings["top_k"].rows(cfg.csv_rows)))
            for ctrl in cfg.controls:
                atomic_write_text(rdir / f"{ctrl}.csv",
                                  _csv_text(rankings[ctrl].rows(cfg.csv_rows)))

        jobs = [(k, kind) for k in cfg.topk for kind in rankings]
        rows = []
        with timer("evaluate"):
            baseline = _evaluate(model, tokenizer, data.eval, cfg)
            bar = tqdm(jobs, desc="perturb+evaluate", disable=_quiet(progress), leave=False)
            for k, kind in bar:
                start = time.perf_counter()
                draws = [(0, rankings[kind])]
                if kind == "random_k":
                    draws += list(random_draws.items())
                measured = []
                for d, ranking in draws:
                    ws = ranking.prefix(k).to_weightset()
                    info, res = _measure_perturbed(model, tokenizer, data.eval, cfg, ws, seed0)
                    measured.append((d, ranking, info, res))
                _, ranking, info, res = measured[0]
                row = {
                    "selection": kind, "k": k, "n_weights": info["n_weights"],
                    "n_changed": info["n_changed"],
                    "ppl": res["ppl"], "nll": res["nll"], "token_acc": res["token_acc"],
                    "non_finite": res["non_finite"],
                    "delta": _delta(res, baseline),
                    "score_mean": float(np.mean(ranking.prefix(k).score)),
                }
                if kind == "random_k":
                    row.update(_random_summary(measured, k, baseline, seed0))
                row["seconds"] = time.perf_counter() - start
                rows.append(row)

        stability = {"enabled": bool(stab_sets), "seeds": list(stab_sets), "k": cfg.topk}
        if stab_sets:
            seeds = list(stab_sets)
            mats = {k: jaccard_matrix([stab_sets[s][k] for s in seeds]) for k in cfg.topk}
            shared = shared_fraction({s: data.blocks_for(s) for s in seeds})
            stability.update({
                "jaccard": {str(k): m.tolist() for k, m in mats.items()},
                "summary": {str(k): summarise(m) for k, m in mats.items()},
                "calibration_blocks_shared": shared.tolist(),
                "calibration_blocks": {str(s): data.blocks_for(s).tolist() for s in seeds},
            })
        elif cfg.stability:
            stability["note"] = "rank stability needs at least two --seeds"

        results = {
            "format": "nn.sensitivity-results/1",
            "random_draws": cfg.random_draws if "random_k" in rankings else 0,
            "model": cfg.model,
            "metric": cfg.metric,
            "metric_info": score_info,
            "mode": cfg.mode,
            "perturbation": {"kind": cfg.perturb, "scale": cfg.perturb_scale,
                             "absolute": cfg.perturb_absolute, "bit": cfg.bit, "prob": cfg.prob,
                             "seed": seed0},
            "eligible": {"tensors": len(params), "weights": n_eligible},
            "data": {"spec": cfg.data, "documents": {"calibration": data.n_docs[0],
                                                     "heldout": data.n_docs[1]},
                     "calibration_tokens_per_seed": cfg.calib_blocks * cfg.block_len,
                     "heldout_tokens": int(data.eval.numel())},
            "baseline": baseline,
            "results": rows,
        }
        with timer("write"):
            atomic_write_json(tmp / "perturbation_results.json", results)
            atomic_write_json(tmp / "stability.json", stability)
            atomic_write_json(tmp / "rankings" / "score_histograms.json", hist)
            from nn_sensitivity import plots

            title = f"{cfg.model} · {cfg.metric} · {cfg.perturb} · {cfg.mode}"
            plots.delta_ppl_vs_k(rows, tmp / "plots" / "delta_ppl_vs_k.png", title=title)
            plots.layer_histograms(hist, tmp / "plots" / "score_histograms.png",
                                   title=f"{cfg.model} · {cfg.metric} scores per layer")
            if stab_sets:
                plots.stability_heatmap(
                    list(stab_sets),
                    {k: np.asarray(stability["jaccard"][str(k)]) for k in cfg.topk},
                    tmp / "plots" / "stability_heatmap.png",
                    title=f"top-K Jaccard across calibration seeds ({cfg.metric})")
        write_manifest(tmp, config=asdict(cfg), model=model, model_spec=cfg.model,
                       seeds={"seeds": cfg.seeds, "split_seed": cfg.split_seed}, phases=timer,
                       extra={"world_size": dist.world_size()}, tool=RUN_TOOL)
    summary = {"results": results, "stability": stability, "phases": dict(timer.phases),
               "out": str(out)}
    say(format_summary(summary))
    return summary


def evaluate_weightset(cfg: StudyConfig, weights: str | Path, *, model=None, tokenizer=None,
                       echo: Callable[[str], None] | None = print) -> dict:
    """Perturb a saved :class:`WeightSet` (e.g. ``rankings/top_k_k100.safetensors``) in
    ``cfg.model`` and measure the held-out change; writes ``evaluation.json`` and
    ``manifest.json`` under ``cfg.out``. A set made for another model is an NNError."""
    from nn_core.io import atomic_dir, atomic_write_json
    from nn_core.model.loading import load_model
    from nn_core.run.manifest import PhaseTimer, write_manifest
    from nn_core.select.weightset import WeightSet

    check_perturbation(cfg.perturb)
    timer = PhaseTimer()
    ws = WeightSet.load(weights)
    with timer("load"):
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        ws.validate(model)
        data = _Data(cfg, tokenizer)
    with timer("evaluate"):
        baseline = _evaluate(model, tokenizer, data.eval, cfg)
        info, res = _measure_perturbed(model, tokenizer, data.eval, cfg, ws, cfg.seeds[0])
    out = {
        "format": "nn.sensitivity-evaluation/1", "model": cfg.model, "weights": str(weights),
        "weightset": {"n_weights": len(ws), "method": ws.meta.get("method"),
                      "parameters": ws.meta.get("parameters")},
        "perturbation": {"kind": cfg.perturb, "scale": cfg.perturb_scale,
                         "absolute": cfg.perturb_absolute, "bit": cfg.bit, "prob": cfg.prob,
                         "seed": cfg.seeds[0], "n_changed": info["n_changed"]},
        "baseline": baseline, "perturbed": res,
        "delta": _delta(res, baseline),
    }
    with atomic_dir(cfg.out, tool=EVALUATE_TOOL, overwrite=cfg.overwrite) as tmp:
        atomic_write_json(tmp / "evaluation.json", out)
        write_manifest(tmp, config={**asdict(cfg), "weights": str(weights)}, model=model,
                       model_spec=cfg.model, seeds={"seeds": cfg.seeds}, phases=timer,
                       tool=EVALUATE_TOOL)
    if echo is not None:
        d = out["delta"]
        change = ("non-finite logits (ppl inf)" if res["non_finite"] else
                  f"ppl {baseline['ppl']:.3f} -> {res['ppl']:.3f} (ΔPPL {d['ppl']:+.3f}, "
                  f"ΔNLL {d['nll']:+.4f}, Δacc {d['token_acc']:+.4f})")
        echo(f"{len(ws):,} weights, {cfg.perturb}: {change} "
             f"on {baseline['n_tokens']:,} held-out tokens; written to {cfg.out}/evaluation.json")
    return out


def format_summary(summary: dict) -> str:
    """A readable table of the study's numbers."""
    res, stab = summary["results"], summary["stability"]
    base = res["baseline"]
    lines = [
        "",
        f"metric {res['metric']} · perturbation {res['perturbation']['kind']} · mode {res['mode']}"
        f" · {res['eligible']['weights']:,} eligible weights",
        f"baseline: ppl {base['ppl']:.3f}  nll {base['nll']:.4f}  token_acc {base['token_acc']:.4f}"
        f"  ({base['n_tokens']:,} held-out tokens)",
        "",
        f"{'K':>7}  {'selection':<9}  {'ppl':>10}  {'ΔPPL':>10}  {'ΔNLL':>8}  {'Δacc':>8}",
    ]
    for r in res["results"]:
        d = r["delta"]
        if r.get("non_finite"):
            lines.append(f"{r['k']:>7}  {r['selection']:<9}  {'non-finite':>10}  {'inf':>10}  "
                         f"{'inf':>8}  {'n/a':>8}")
            continue
        line = (f"{r['k']:>7}  {r['selection']:<9}  {r['ppl']:>10.3f}  {d['ppl']:>+10.3f}  "
                f"{d['nll']:>+8.4f}  {d['token_acc']:>+8.4f}")
        spread = (r.get("spread") or {}).get("delta", {}).get("ppl")
        if spread and r.get("n_draws", 1) > 1:
            line += (f"  mean of {spread['n']} draws: ΔPPL sd {spread['sd']:.3f}, "
                     f"min {spread['min']:+.3f}, max {spread['max']:+.3f}")
        lines.append(line)
    if any(r.get("non_finite") for r in res["results"]):
        lines.append("non-finite: the perturbed model produced inf/NaN logits (ppl = inf)")
    if stab.get("enabled"):
        lines.append("")
        parts = [f"K={k}: {stab['summary'][str(k)]['mean']:.3f}" for k in stab["k"]]
        shared = np.asarray(stab["calibration_blocks_shared"])
        off = shared[~np.eye(shared.shape[0], dtype=bool)]
        lines.append(f"rank stability (mean Jaccard of top-K across seeds {stab['seeds']}): "
                     + ", ".join(parts)
                     + f"  [calibration blocks shared between seeds: {off.mean():.0%}]")
    phases = summary.get("phases", {})
    if phases:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items())
                     + f"  (total {sum(phases.values()):.1f}s)")
    lines.append(f"outputs in {summary['out']}/")
    return "\n".join(lines)


def parse_int_list(text: str | Sequence[int]) -> list[int]:
    """``"10,100,1000"`` (or a YAML list) -> [10, 100, 1000]; ``1e3`` style is accepted."""
    if not isinstance(text, str):
        return [int(x) for x in text]
    out = []
    for part in text.strip("[]() ").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise NNError(f"'{part}' is not an integer: give a comma-separated list like 10,100") from None
        if not value.is_integer():
            raise NNError(f"'{part}' is not an integer: give a comma-separated list like 10,100")
        out.append(int(value))
    return out
