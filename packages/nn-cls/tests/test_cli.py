from __future__ import annotations

import csv
import json
import statistics

import pytest

from nn_cls.cli import main
from nn_cls.tracking import resolve_wandb_mode

SMALL = ["model=tiny_llama", "train=cpu_small", "benchmark=synthetic2", "experts=small", "replay=small",
         "scheduler=eager", "train.steps_per_task=2", "train.batch_size=2", "benchmark.n_train=8",
         "benchmark.n_eval=4", "consolidation.sleep_batch_size=2", "consolidation.probe_size=2"]
FAKE_WANDB = "0123456789abcdef0123456789abcdef01234567"  # 40 hex, like a real W&B key
FAKE_HF = "hf_FAKEfakeFAKEfakeFAKEfake0123456789"


def _run(tmp_path, *args):
    return main([*args, f"hydra.run.dir={tmp_path}/hydra", f"hydra.sweep.dir={tmp_path}/sweep"])


def _one_error(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nn-cls"), err
    assert needle in err[0], err[0]


@pytest.mark.parametrize(("override", "needle"), [
    ("train.foo=1", "unknown config key 'train.foo'"),
    ("foo=1", "unknown config key 'foo'"),
    ("train.steps_per_task=abc", "bad value for 'train.steps_per_task'"),
    ("logging.wandb_mode=sometimes", "expected one of [disabled, offline, online]"),
    ("model=gpt5", "Could not find 'model/gpt5'"),
    ("benchmark.tasks=[uppercase]", "at least 2 tasks"),
    ("train.method=magic", "unknown method 'magic'"),
    ("consolidation.pseudo_ratio=2.0", "pseudo_ratio must be in [0, 1]"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, override, needle):
    assert _run(tmp_path, "train", *SMALL, override, f"out={tmp_path}/o") == 2
    _one_error(capsys, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "hydra").exists()


def test_bad_sweep_value_and_command(tmp_path, capsys):
    assert _run(tmp_path, "train", "-m", *SMALL, "train.method=naive,magic") == 2
    _one_error(capsys, "unknown method 'magic'")
    assert not (tmp_path / "sweep").exists()
    assert main(["fly"]) == 2
    _one_error(capsys, "unknown command 'fly'")


def test_cfg_job_prints_resolved_config(tmp_path, capsys):
    assert _run(tmp_path, "train", "--cfg", "job", "model=tiny_llama", "train.seed=7") == 0
    out = capsys.readouterr().out
    assert "name: tiny-llama" in out and "seed: 7" in out and "wandb_mode: disabled" in out
    assert "num_experts: 8" in out and "min_interval: 10" in out  # experts and scheduler groups
    assert not (tmp_path / "hydra").exists() or not any((tmp_path / "hydra").rglob("*.jsonl"))


def test_wandb_online_without_key_falls_back(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("online") == "offline"
    assert "logging offline instead" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB)
    assert resolve_wandb_mode("online") == "online" and resolve_wandb_mode("disabled") == "disabled"


def _strict(line):
    def bad(c):
        raise ValueError(c)
    return json.loads(line, parse_constant=bad)


def test_train_writes_everything_and_no_secret_leaks(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "o"
    assert _run(tmp_path, "train", *SMALL, "logging=offline", f"out={out}") == 0
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "results.json", "task_matrix.csv",
                 "accuracy_matrix.png", "manifest.json"):
        assert (out / name).is_file(), name
    rows = [_strict(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    wakes = [r for r in rows if r["phase"] == "wake"]
    assert len(wakes) == 4 and all("core/wake_loss" in r and r["core/nonfinite"] == 0 for r in wakes)
    bounds = [r for r in rows if r["phase"] == "boundary"]
    assert [r["boundary/boundary"] for r in bounds] == [0, 1]
    assert {"boundary/acc/uppercase", "boundary/acc/reverse_words", "boundary/seen_acc"} <= set(bounds[1])
    assert all(k.startswith(("core/", "boundary/", "summary/")) for r in rows for k in r if k not in ("step", "phase"))
    res = json.loads((out / "results.json").read_text())
    assert rows[-1]["summary/final_seen_acc_avg"] == pytest.approx(res["metrics"]["final_seen_acc_avg"])
    assert bounds[1]["boundary/acc/uppercase"] == pytest.approx(res["A"][1][0])
    assert json.loads((out / "manifest.json").read_text())["tool"] == "nn-cls train"
    wandb_files = list(out.rglob("wandb/**/*"))
    assert any(p.suffix == ".wandb" for p in wandb_files)  # the offline run exists
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    for p in written:
        blob = p.read_bytes()
        assert FAKE_WANDB.encode() not in blob and FAKE_HF.encode() not in blob, p


def test_stop_resume_via_cli_equals_whole_run_and_refuses_other_config(tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run(tmp_path, "train", *SMALL, "train.method=ewc", f"out={whole}") == 0
    assert _run(tmp_path, "train", *SMALL, "train.method=ewc", "train.stop_after=3", f"out={part}") == 0
    assert not (part / "results.json").exists()
    before = (part / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _run(tmp_path, "train", *SMALL, "train.method=ewc", "train.lr_wake=0.01",
                f"train.resume={part}", f"out={part}") == 2
    _one_error(capsys, "another config")
    assert (part / "metrics.jsonl").read_text() == before  # nothing written is lost
    assert _run(tmp_path, "train", *SMALL, "train.method=ewc", f"train.resume={part}", f"out={part}") == 0
    a = [_strict(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [_strict(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], abs=1e-6, rel=0), k
            else:
                assert ra[k] == rb[k], k


def test_out_folder_rules_and_unsupervised_tasks(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _run(tmp_path, "train", *SMALL, f"out={foreign}") == 2
    _one_error(capsys, "not an output of nn-cls train")
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    assert _run(tmp_path, "train", *SMALL, "train.max_length=8", f"out={tmp_path}/short") == 2
    _one_error(capsys, "max_length")


def test_multirun_sweep(tmp_path):
    assert _run(tmp_path, "train", "-m", *SMALL, "train.method=naive,replay", "train.steps_per_task=1") == 0
    jobs = sorted(p.parent for p in (tmp_path / "sweep").rglob("metrics.jsonl"))
    assert len(jobs) == 2
    methods = {json.loads((j / "results.json").read_text())["method"] for j in jobs}
    assert methods == {"naive", "replay"}


def test_suite_tables_and_plots(tmp_path):
    out = tmp_path / "suite"
    assert _run(tmp_path, "suite", *SMALL, "train.steps_per_task=1", "suite.methods=[naive,replay]",
                "suite.seeds=[0,1]", f"out={out}") == 0
    summary = list(csv.DictReader((out / "suite_summary.csv").open()))
    assert [r["method"] for r in summary] == ["naive", "replay"]
    for r in summary:
        finals = [json.loads((out / "runs" / f"{r['method']}-seed{s}" / "results.json").read_text())
                  ["metrics"]["final_seen_loss_avg"] for s in (0, 1)]
        assert float(r["final_seen_loss_avg_mean"]) == pytest.approx(statistics.fmean(finals))
        assert float(r["final_seen_loss_avg_sd"]) == pytest.approx(statistics.stdev(finals))
    assert finals[0] != finals[1]  # seeds differ
    assert len(list(csv.DictReader((out / "boundary_metrics.csv").open()))) == 2 * 2 * 2
    assert len(list(csv.DictReader((out / "task_matrix.csv").open()))) == 2 * 2 * 3
    for png in ("accuracy_matrix_naive.png", "accuracy_matrix_replay.png", "seen_acc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "manifest.json").read_text())["tool"] == "nn-cls suite"


def test_console_exit_code_and_single_stderr_line(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "nn_cls.cli", "train", "benchmark.tasks=[uppercase]",
                        f"hydra.run.dir={tmp_path}/h"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "nn-cls train: error: a continual stream needs at least 2 tasks, got ['uppercase']"]
