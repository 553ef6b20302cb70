from __future__ import annotations

import json

import pytest

from nn_core.select.weightset import WeightSet
from nn_sensitivity.cli import main

TINY = ["--model", "tiny-llama", "--calib-blocks", "4", "--block-len", "32", "--batch-size", "2",
        "--eval-tokens", "256", "--eval-len", "64"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    code = main(["run", *TINY, "--topk", "5,50", "--seeds", "0,1", "--out", str(out)])
    assert code == 0
    return out


def test_run_writes_a_complete_study(study, capsys):
    for rel in ("manifest.json", "perturbation_results.json", "stability.json",
                "rankings/top_k.csv", "rankings/random_k.csv", "rankings/bottom_k.csv",
                "rankings/top_k_k50.safetensors", "rankings/score_histograms.json",
                "plots/delta_ppl_vs_k.png", "plots/score_histograms.png",
                "plots/stability_heatmap.png"):
        assert (study / rel).is_file(), rel
    for png in (study / "plots").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((study / "perturbation_results.json").read_text())
    assert res["metric"] == "grad_x_weight" and res["perturbation"]["kind"] == "sign_flip"
    got = {(r["selection"], r["k"]) for r in res["results"]}
    assert got == {(s, k) for s in ("top_k", "random_k", "bottom_k") for k in (5, 50)}
    for r in res["results"]:
        assert r["n_weights"] == r["k"] == r["n_changed"]
        assert r["delta"]["ppl"] == pytest.approx(r["ppl"] - res["baseline"]["ppl"])
    # the held-out text is disjoint from the calibration text
    assert res["data"]["documents"]["heldout"] > 0
    stab = json.loads((study / "stability.json").read_text())
    assert stab["enabled"] and stab["seeds"] == [0, 1]
    m = stab["jaccard"]["50"]
    assert m[0][0] == 1.0 and 0.0 <= m[0][1] <= 1.0 and m[0][1] == m[1][0]
    # the seeds drew different calibration blocks
    assert stab["calibration_blocks"]["0"] != stab["calibration_blocks"]["1"]
    top = WeightSet.load(study / "rankings" / "top_k_k50.safetensors")
    assert len(top) == 50 and top.meta["model_id"] == "tiny-llama"
    rows = (study / "rankings" / "top_k.csv").read_text().splitlines()
    assert rows[0] == "rank,name,flat_index,index,layer,module,score" and len(rows) == 51
    manifest = json.loads((study / "manifest.json").read_text())
    assert manifest["config"]["topk"] == [5, 50] and "evaluate" in manifest["phases"]["seconds"]


def test_config_file_and_flags(tmp_path, capsys):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("metric: magnitude\ntopk: [3, 7]\ncontrols: [random_k]\nperturb: zero\n"
                   "no-stability: true\n")
    out = tmp_path / "run"
    assert main(["run", *TINY, "--config", str(cfg), "--mode", "per-layer",
                 "--out", str(out)]) == 0
    res = json.loads((out / "perturbation_results.json").read_text())
    assert res["metric"] == "magnitude" and res["mode"] == "per-layer"
    assert {r["selection"] for r in res["results"]} == {"top_k", "random_k"}
    assert {r["k"] for r in res["results"]} == {3, 7}
    # per-layer: K per decoder block (2 blocks)
    assert {r["n_weights"] for r in res["results"] if r["k"] == 7} == {14}
    assert not json.loads((out / "stability.json").read_text())["enabled"]
    assert "ΔPPL" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "message"), [
    (["--metric", "fisher"], "unknown metric 'fisher': use one of grad_x_weight"),
    (["--perturb", "flip"], "unknown perturbation 'flip': use one of zero, sign_flip"),
    (["--controls", "top_k"], "unknown control 'top_k'"),
    (["--mode", "layer"], "unknown ranking mode"),
    (["--topk", "10,100000000"], "larger than the"),
    (["--modules", "nothing_here"], "select no weights"),
    (["--layers", "9"], "out of range"),
    (["--seeds", "0,-1"], "seed -1 is negative"),
    (["--mode", "per-layer", "--topk", "100000"], "eligible weights in layer 0"),
])
def test_bad_input_exits_2_with_one_line(flags, message, tmp_path, capsys):
    code = main(["run", *TINY, *flags, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x" / "perturbation_results.json").exists()


def test_evaluate_a_saved_weightset(study, tmp_path, capsys):
    weights = study / "rankings" / "top_k_k50.safetensors"
    out = tmp_path / "ev"
    assert main(["evaluate", str(weights), "--model", "tiny-llama", "--perturb", "zero",
                 "--eval-tokens", "256", "--eval-len", "64", "--out", str(out)]) == 0
    res = json.loads((out / "evaluation.json").read_text())
    assert res["weightset"]["n_weights"] == 50 and res["perturbation"]["kind"] == "zero"
    assert res["delta"]["ppl"] == pytest.approx(res["perturbed"]["ppl"] - res["baseline"]["ppl"])
    # a WeightSet made for another model: one line, exit 2
    code = main(["evaluate", str(weights), "--model", "tiny-gpt2", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "made for" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no" / "evaluation.json").exists()


def test_help_and_metrics(capsys):
    assert main(["run", "--help"]) == 0
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    assert "hutchinson_diag" in out and "Rademacher" in out


def test_run_never_deletes_a_users_file_at_out(tmp_path, capsys, monkeypatch):
    import nn_sensitivity.runner as runner

    called = []
    monkeypatch.setattr(runner, "run_study", lambda cfg, **kw: called.append(cfg))
    target = tmp_path / "results.txt"
    target.write_text("my notes")
    assert main(["run", *TINY, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "existing file" in err and "--overwrite" in err
    assert target.read_text() == "my notes" and not called  # refused before any work


def test_nn_mode_of_another_tool_does_not_reach_nn_sensitivity(tmp_path, monkeypatch):
    import nn_sensitivity.runner as runner

    seen = []
    monkeypatch.setattr(runner, "run_study", lambda cfg, **kw: seen.append(cfg))
    monkeypatch.setenv("NN_MODE", "preserve")
    monkeypatch.setenv("NN_ICA_MODE", "preserve")
    assert main(["run", *TINY, "--out", str(tmp_path / "o")]) == 0
    assert seen[-1].mode == "global"
    monkeypatch.setenv("NN_SENSITIVITY_MODE", "per-layer")
    assert main(["run", *TINY, "--out", str(tmp_path / "o")]) == 0
    assert seen[-1].mode == "per-layer"


def test_per_batch_and_random_draws_flags(tmp_path, monkeypatch):
    import nn_sensitivity.runner as runner

    seen = []
    monkeypatch.setattr(runner, "run_study", lambda cfg, **kw: seen.append(cfg))
    assert main(["run", *TINY, "--metric", "grad_squared", "--out", str(tmp_path / "a")]) == 0
    assert seen[-1].per_sample is True and seen[-1].random_draws == 5
    assert main(["run", *TINY, "--metric", "grad_squared", "--per-batch", "--random-draws", "2",
                 "--out", str(tmp_path / "b")]) == 0
    assert seen[-1].per_sample is False and seen[-1].random_draws == 2
    assert seen[-1].metric_options() == {"per_sample": False}
