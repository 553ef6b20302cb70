from __future__ import annotations

import json

import pytest

from nn_drift.behaviour import STAGES
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
    assert json.loads((ft / "manifest.json").read_text())["tool"] == "nn-drift finetune"
    assert main(["analyze", str(ft), "--n-boot", "50", "--behaviour", "--n-eval", "2",
                 "--out", str(an)]) == 0
    stats = json.loads((an / "statistics.json").read_text())
    assert set(stats["groups"]) == {"set-diff", "snip-top"}
    r = stats["groups"]["set-diff"]["relative"]["2"]
    assert r["verdict"] in ("H1", "H2", "less", "inconclusive") and r["n"] > 1
    # one stage vocabulary with `run` (nn_drift.behaviour.STAGES)
    assert list(stats["behaviour"]) == ["original", "finetuned"]
    assert json.loads((an / "behaviour.json").read_text()) == stats["behaviour"]
    assert 0 <= stats["behaviour"]["finetuned"]["refusal"]["rate"] <= 1
    assert stats["behaviour"]["original"]["utility"]["nll"] > 0
    assert "| finetuned | " in (an / "report.md").read_text()
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
    assert summ["aligned"] and list(summ["behaviour"]) == list(STAGES)
    assert json.loads((out / "behaviour.json").read_text()) == summ["behaviour"]
    assert set(summ["statistics"]["groups"]) == {"set-diff", "snip-top", "utility-top"}
    assert (out / "finetune" / "drift.jsonl").is_file()
    assert "verdict" in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_one_line_exit_2_nothing_lost(tmp_path, capsys):
    """The issue's bad-input list: unknown methods, data without responses, groups made
    for another model, an identical safety and utility set (warned); each refused with
    one line and exit 2 before anything of the user's is touched."""
    from nn_core.model.loading import load_model
    from nn_core.select.weightset import WeightSet

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")

    sc = tmp_path / "scores"
    with pytest.warns(UserWarning, match="identical"):
        assert main(["score", "tiny-llama", *SMALL, "--safety", "safety", "--utility", "safety",
                     "--metrics", "snip", "--out", str(sc)]) == 0
    assert "identical" in capsys.readouterr().out
    # ... so set-diff is empty: refused, nothing written
    assert main(["groups", str(sc), "--method", "set-diff", "--out", str(tmp_path / "g")]) == 2
    assert "empty" in _one_line_error(capsys) and not (tmp_path / "g").exists()

    assert main(["groups", str(sc), "--method", "set-diff,top-k", "--out", str(tmp_path / "g")]) == 2
    assert "unknown method 'top-k'" in _one_line_error(capsys) and not (tmp_path / "g").exists()
    assert main(["score", "tiny-llama", "--metrics", "snip,fisher", "--out", str(tmp_path / "s")]) == 2
    assert "unknown metric 'fisher'" in _one_line_error(capsys) and not (tmp_path / "s").exists()
    for argv in (["groups", str(sc)], ["score", "tiny-llama", *SMALL],
                 ["run", "tiny-llama", "--n-eval", "2"]):  # a folder of the user's is never replaced
        assert main([*argv, "--out", str(mine)]) == 2
        assert "not an output of" in _one_line_error(capsys)

    noresp = tmp_path / "noresp.jsonl"
    noresp.write_text('{"instruction": "say hi", "output": ""}\n')
    assert main(["score", "tiny-llama", *SMALL, "--utility", str(noresp), "--out",
                 str(tmp_path / "s2")]) == 2
    assert "non-empty prompt and response" in _one_line_error(capsys)
    assert not (tmp_path / "s2").exists()

    gpt, _ = load_model("tiny-gpt2", device="cpu")
    name = next(n for n, p in gpt.named_parameters() if p.ndim == 2 and ".h.0." in n)
    other = tmp_path / "other"
    other.mkdir()
    WeightSet.for_model(gpt, {name: [0, 1]}, method="t").save(other / "g.safetensors")
    assert main(["finetune", "tiny-llama", "task:copy", "--groups", str(other), "--max-steps", "1",
                 "--n-samples", "2", "--batch-size", "2", "--max-length", "128",
                 "--out", str(tmp_path / "ft")]) == 2
    assert "made for a 'gpt2' model" in _one_line_error(capsys)
    assert not (tmp_path / "ft" / "drift.jsonl").exists()
    assert main(["finetune", "tiny-llama", str(noresp), "--groups", str(other),
                 "--out", str(tmp_path / "ft2")]) == 2
    assert "non-empty prompt and response" in _one_line_error(capsys)
    assert not (tmp_path / "ft2").exists()
    assert (mine / "notes.txt").read_text() == "keep" and sorted(mine.iterdir()) == [mine / "notes.txt"]
