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
