"""With ``out=`` and no explicit Hydra dir, Hydra's own files go to ``out``, never the cwd."""

from __future__ import annotations

import json

from nn_cls.cli import main

SMALL = ["model=tiny_llama", "train=cpu_small", "benchmark=synthetic2", "experts=small", "replay=small",
         "scheduler=eager", "train.steps_per_task=1", "train.batch_size=2", "benchmark.n_train=8",
         "benchmark.n_eval=4", "consolidation.sleep_batch_size=2", "consolidation.probe_size=2",
         "train.method=naive"]


def test_hydra_run_dir_follows_out(tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "run"
    assert main(["train", *SMALL, f"out={out}"]) == 0
    assert list(cwd.iterdir()) == []  # no outputs/ (nor anything else) in the working directory
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "results.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["tool"] == "nn-cls train"
    # the folder (now holding Hydra's files too) is an nn-cls output: a rerun into it is allowed
    assert main(["train", *SMALL, f"out={out}"]) == 0
    # a foreign folder is refused before Hydra writes anything into it
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["train", *SMALL, f"out={foreign}"]) == 2
    assert "not an output of nn-cls train" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert list(cwd.iterdir()) == []


def test_sweep_dir_follows_out(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "sweep"
    assert main(["train", "-m", *SMALL, "train.seed=0,1", f"out={out}"]) == 0
    assert list(cwd.iterdir()) == []
    assert (out / "multirun.yaml").is_file()
    for n in ("0", "1"):
        assert (out / n / ".hydra").is_dir() and (out / n / "results.json").is_file()
    # rerunning the sweep into its own folder is allowed (every job folder is nn-cls's)
    assert main(["train", "-m", *SMALL, "train.seed=0,1", f"out={out}"]) == 0
    assert list(cwd.iterdir()) == []
