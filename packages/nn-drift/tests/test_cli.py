from __future__ import annotations

import json

import pytest

from nn_drift.cli import main
from nn_drift.scores import load_scores

SMALL = ["--n-samples", "3", "--max-length", "160", "--batch-size", "3"]


def test_score_cli_writes_scores_and_manifest(tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["score", "tiny-llama", *SMALL, "--utility", "task:copy", "--store", "full",
                 "--out", str(out)]) == 0
    t = load_scores(out)
    assert t.keys == [("safety", "snip"), ("safety", "wanda"), ("utility", "snip"),
                      ("utility", "wanda")]
    m = json.loads((out / "manifest.json").read_text())
    assert m["tool"] == "nn-drift score"
    # same command again replaces its own output; a foreign folder is refused
    assert main(["score", "tiny-llama", *SMALL, "--metrics", "wanda", "--out", str(out)]) == 0
    assert load_scores(out).store == "top"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["score", "tiny-llama", *SMALL, "--out", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep"
    assert main(["score", "tiny-llama", "--metrics", "fisher", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'fisher'" in err
    assert not (tmp_path / "x").exists()


def test_groups_cli(tmp_path, capsys):
    from nn_core.select.neuronset import NeuronSet
    from nn_core.select.weightset import WeightSet

    sc = tmp_path / "scores"
    assert main(["score", "tiny-llama", *SMALL, "--metrics", "snip", "--store", "full",
                 "--out", str(sc)]) == 0
    g = tmp_path / "groups"
    assert main(["groups", str(sc), "--k", "2", "--q", "20", "--p", "10", "--out", str(g)]) == 0
    summ = json.loads((g / "summary.json").read_text())
    assert set(summ["sizes"]) == {"snip-top", "set-diff", "utility-top", "random"}
    sd, rnd = WeightSet.load(g / "set-diff.safetensors"), WeightSet.load(g / "random.safetensors")
    assert sd.counts() == rnd.counts() and len(sd) == summ["sizes"]["set-diff"]["total"]
    n = tmp_path / "neurons"
    assert main(["groups", str(sc), "--granularity", "neurons", "--method", "set-diff,random",
                 "--q", "30", "--p", "10", "--out", str(n)]) == 0
    ns = NeuronSet.load(n / "set-diff.json")
    assert ns.sites == ("mlp_act",) and len(ns) > 0
    assert main(["groups", str(sc), "--method", "set-diff", "--q", "5", "--p", "100",
                 "--out", str(tmp_path / "empty")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


def test_finetune_cli(tmp_path, capsys):
    from nn_core.model.loading import load_model
    from nn_core.select.weightset import WeightSet
    from nn_drift.drift import read_drift

    model, _ = load_model("tiny-llama", device="cpu")
    g = tmp_path / "groups"
    g.mkdir()
    name = "model.layers.0.mlp.down_proj.weight"
    WeightSet.for_model(model, {name: [0, 5, 700]}, method="t").save(g / "a.safetensors")
    WeightSet.for_model(model, {name: [130, 4000]}, method="t").save(g / "b.safetensors")
    out = tmp_path / "ft"
    args = ["finetune", "tiny-llama", "task:copy", "--groups", str(g), "--max-steps", "2",
            "--track-every", "1", "--batch-size", "2", "--max-length", "160", "--n-samples", "4",
            "--lr", "0.05", "--freeze-group", "a", "--out", str(out)]
    assert main(args) == 0
    rows = read_drift(out)
    assert {r["group"] for r in rows} == {"a", "b"} and {r["step"] for r in rows} == {0, 1, 2}
    last = {(r["group"], r["metric"]): r for r in rows if r["step"] == 2}
    assert last[("a", "l2")]["max"] == 0.0 and last[("b", "l2")]["max"] > 0
    assert main([*args[:-2], "--freeze-group", "zzz", "--out", str(tmp_path / "bad")]) == 2
    assert "freeze-group 'zzz'" in capsys.readouterr().err


def test_full_chain_score_groups_finetune_analyze(tmp_path):
    """score -> groups -> finetune -> analyze (with behaviour) on tiny-llama, tiny settings."""
    sc, g, ft, an = (tmp_path / x for x in ("sc", "g", "ft", "an"))
    assert main(["score", "tiny-llama", *SMALL, "--utility", "task:copy", "--metrics", "snip",
                 "--store", "full", "--out", str(sc)]) == 0
    assert main(["groups", str(sc), "--method", "set-diff,snip-top,random", "--k", "5",
                 "--q", "20", "--p", "10", "--out", str(g)]) == 0
    assert main(["finetune", "tiny-llama", "task:copy", "--groups", str(g), "--max-steps", "2",
                 "--track-every", "1", "--batch-size", "2", "--max-length", "160",
                 "--n-samples", "4", "--lr", "0.05", "--out", str(ft)]) == 0
    assert main(["analyze", str(ft), "--n-boot", "50", "--behaviour", "--n-eval", "2",
                 "--out", str(an)]) == 0
    stats = json.loads((an / "statistics.json").read_text())
    assert set(stats["groups"]) == {"set-diff", "snip-top"}
    r = stats["groups"]["set-diff"]["relative"]["2"]
    assert r["verdict"] in ("H1", "H2", "less", "inconclusive") and r["n"] > 1
    assert 0 <= stats["behaviour"]["after"]["refusal"]["rate"] <= 1
    assert stats["behaviour"]["before"]["utility"]["nll"] > 0
    assert (an / "drift_relative.png").stat().st_size > 1000
    assert "| set-diff | relative | 2 |" in (an / "report.md").read_text()


@pytest.mark.slow
def test_run_cli_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "tiny-llama", "--align", "yes", "--align-steps", "2", "--n-score", "3",
                 "--finetune-steps", "2", "--track-every", "1", "--batch-size", "2",
                 "--max-length", "160", "--n-eval", "2", "--n-boot", "20", "--k", "5",
                 "--q", "20", "--out", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["aligned"] and set(summ["behaviour"]) == {"original", "aligned", "finetuned"}
    assert set(summ["statistics"]["groups"]) == {"set-diff", "snip-top", "utility-top"}
    assert (out / "finetune" / "drift.jsonl").is_file()
    assert "verdict" in capsys.readouterr().out
