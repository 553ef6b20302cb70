from __future__ import annotations

import json

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
