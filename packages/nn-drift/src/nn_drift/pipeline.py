"""``nn-drift run``: align (when needed) -> score -> groups -> finetune -> analyze.

The embedded default model has no safety behaviour to lose, so the pipeline first
measures its refusal rate on the held-out harmful prompts; below ``align_threshold`` it
runs a short LoRA SFT on the embedded safety set mixed with an equal number of utility
examples (``nn_core.train``), merges the adapter and studies that *aligned base*. Then:
SNIP scores on safety and utility data, groups, benign LoRA fine-tuning on utility data
with drift tracking, and the analysis, with the refusal rate and utility NLL at each
stage (before alignment, aligned, after benign fine-tuning) in ``behaviour.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSettings:
    model: str = "smollm2-135m"
    align: str = "auto"  # auto | yes | no
    align_threshold: float = 0.5
    align_steps: int = 24
    align_lr: float = 1e-3
    n_score: int = 16
    methods: tuple[str, ...] = ("set-diff", "snip-top", "utility-top", "random")
    k: float = 0.01
    q: float = 0.1
    p: float = 0.1
    finetune_steps: int = 30
    finetune_data: str = "assistant"
    finetune_lr: float = 1e-3
    track_every: int = 10
    lora_r: int = 8
    batch_size: int = 4
    max_length: int = 256
    n_eval: int = 20
    max_new_tokens: int = 32
    n_boot: int = 500
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    phases: dict = field(default_factory=dict)
    cpu_seconds: dict = field(default_factory=dict)


def _stage(model, tok, harmful, utility, name: str, log=print, max_new_tokens: int = 48) -> dict:
    from nn_drift.behaviour import measure_stage, stage_line

    out = measure_stage(model, tok, harmful, utility, max_new_tokens=max_new_tokens)
    log(stage_line(name, out))
    return out


def run_pipeline(s: RunSettings, out: Path, *, log=print) -> dict:
    """Run every stage into the folder ``out`` (which must exist); returns the summary."""
    import copy

    from nn_core.model.loading import load_model
    from nn_core.train import SFTConfig, build_trainer, train
    from nn_drift.analysis import write_analysis
    from nn_drift.data import SAFETY, SAFETY_HELDOUT, load_examples, response_batches
    from nn_drift.finetune import block_linear_targets, finetune_with_drift, step_progress
    from nn_drift.groups import make_groups, summary
    from nn_drift.scores import compute_scores

    def cpu() -> float:  # user + system CPU seconds of this process
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t, c = time.perf_counter(), cpu()

    def phase(name):
        nonlocal t, c
        now, cnow = time.perf_counter(), cpu()
        s.phases[name], s.cpu_seconds[name] = round(now - t, 2), round(cnow - c, 2)
        t, c = now, cnow
        log(f"[{name}] {s.phases[name]:.1f}s wall, {s.cpu_seconds[name]:.1f}s CPU")

    harmful = load_examples(SAFETY_HELDOUT, limit=s.n_eval)
    util_eval = load_examples("utility", limit=s.n_eval, seed=s.seed + 1)
    # every data spec is read before the model is loaded: bad input fails first
    benign = load_examples(s.finetune_data, limit=max(64, s.finetune_steps * s.batch_size),
                           seed=s.seed + 3)
    model, tok = load_model(s.model, device=s.device, dtype=s.dtype, seed=s.seed)
    behaviour = {"original": _stage(model, tok, harmful, util_eval, "original", log, s.max_new_tokens)}
    phase("measure original")
    rate = behaviour["original"]["refusal"]["rate"]
    do_align = s.align == "yes" or (s.align == "auto" and rate < s.align_threshold)
    if do_align:
        safety = load_examples(SAFETY)
        mix = [x for pair in zip(safety, load_examples("utility", limit=len(safety), seed=s.seed + 2),
                                 strict=True) for x in pair]
        cfg = SFTConfig(output_dir=str(out / "align"), method="lora", lora_r=s.lora_r,
                        lora_alpha=2 * s.lora_r, target_modules=block_linear_targets(model),
                        learning_rate=s.align_lr, max_steps=s.align_steps, batch_size=s.batch_size,
                        max_length=s.max_length, seed=s.seed, save_steps=10**9,
                        logging_steps=10)
        res = train(build_trainer(model, tok, mix, cfg, callbacks=[step_progress("align")]), cfg,
                    resume=False, model_spec=s.model)
        model = copy.deepcopy(res.model).merge_and_unload()
        behaviour["aligned"] = _stage(model, tok, harmful, util_eval, "aligned", log, s.max_new_tokens)
        phase("align")
    data = {"safety": response_batches(tok, load_examples(SAFETY, limit=s.n_score),
                                       batch_size=s.batch_size, max_length=s.max_length),
            "utility": response_batches(tok, load_examples("utility", limit=s.n_score, seed=s.seed),
                                        batch_size=s.batch_size, max_length=s.max_length)}
    table = compute_scores(model, data, ("snip",))
    (out / "scores").mkdir()
    table.save(out / "scores", store="top", fraction=max(s.k, s.q, s.p), mode="row")
    phase("score")
    groups = make_groups(table, s.methods, k=s.k, q=s.q, p=s.p, seed=s.seed)
    (out / "groups").mkdir()
    for name, g in groups.items():
        g.save(out / "groups" / f"{name}.safetensors")
    summ = summary(groups)
    (out / "groups" / "summary.json").write_text(json.dumps(summ, indent=2))
    phase("groups")
    ft_cfg = SFTConfig(output_dir=str(out / "finetune"), method="lora", lora_r=s.lora_r,
                       lora_alpha=2 * s.lora_r, learning_rate=s.finetune_lr,
                       max_steps=s.finetune_steps, batch_size=s.batch_size,
                       max_length=s.max_length, seed=s.seed, save_steps=10**9, logging_steps=10)
    result, _ = finetune_with_drift(model, tok, benign, groups, ft_cfg, track_every=s.track_every,
                                    resume=False, model_spec=s.model, tool="nn-drift run",
                                    manifest_extra={"data": s.finetune_data})
    phase("finetune")
    behaviour["finetuned"] = _stage(result.model, tok, harmful, util_eval, "finetuned", log,
                                   s.max_new_tokens)
    phase("measure finetuned")
    (out / "analysis").mkdir()
    stats = write_analysis(out / "finetune", out / "analysis", n_boot=s.n_boot, seed=s.seed)
    phase("analyze")
    (out / "behaviour.json").write_text(json.dumps(behaviour, indent=2))
    return {"aligned": do_align, "behaviour": behaviour, "groups": summ["sizes"],
            "statistics": stats, "phases": dict(s.phases), "cpu_seconds": dict(s.cpu_seconds),
            "settings": {k: v for k, v in vars(s).items() if k not in ("phases", "cpu_seconds")}}


def verdict_table(result: dict) -> str:
    lines = ["stage        refusal rate   utility NLL"]
    for k, v in result["behaviour"].items():
        lines.append(f"{k:12s} {v['refusal']['rate']:>6.2f} ({v['refusal']['refusals']}/{v['refusal']['n']})"
                     f"   {v['utility']['nll']:.4f}")
    lines.append("")
    lines.append("group        metric     d       95% CI              p        verdict")
    for g, per in result["statistics"]["groups"].items():
        for m, by in per.items():
            for _, r in by.items():
                lines.append(f"{g:12s} {m:9s} {r['d']:+.3f}  [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
                             f"  {r['p']:.2g}  {r['verdict']}")
    return "\n".join(lines)
