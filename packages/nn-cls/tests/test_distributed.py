"""Data parallel (2 CPU processes, gloo, launched like ``accelerate launch``) and AMP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from nn_cls.cli import main
from nn_cls.config import compose, to_engine
from nn_cls.distributed import Runtime, SyncedOptimizer, runtime
from nn_cls.engine import EngineConfig, _examples, _features, load_checkpoint, run_stream
from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import SchedulerConfig
from nn_core.data.batching import collate
from nn_core.errors import NNError
from nn_core.model.loading import load_model
from nn_core.numerics.loss import causal_labels

TINY = ["model=tiny_llama", "train=cpu_small", "train.steps_per_task=3", "benchmark=synthetic2",
        "benchmark.n_train=8", "benchmark.n_eval=5", "experts=small", "replay=small", "scheduler=eager",
        "consolidation.sleep_batch_size=2", "consolidation.probe_size=2",
        "consolidation.refresh_threshold=0.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, out, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "nn_cls.cli", "train", *TINY,
           "train.method=full_cls", f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One uninterrupted 2-process CPU (gloo) ``nn-cls train`` run (its output folder)."""
    tmp = tmp_path_factory.mktemp("dp")
    _launch(tmp, tmp / "two")
    return tmp / "two"


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_train_in_lockstep(two_process_run):
    """``nn-cls train`` under a 2-process CPU (gloo) launch: it completes, both ranks end
    with the same LoRA and hippocampus weights (per-rank hashes in the checkpoint), the
    boundary evaluation covers every evaluation example once, and rank 0 alone writes the
    metrics (every wake step and boundary exactly once)."""
    out = two_process_run
    ck = load_checkpoint(out)
    assert ck["done"] and ck["world_size"] == 2 and len(ck["ranks"]) == 2
    hashes = {r["state_sha256"] for r in ck["ranks"]}
    assert len(hashes) == 1, hashes
    # each rank kept its own shard: 2 rows x 6 wake steps offered, different rows
    assert [r["replay"]["seen"] for r in ck["ranks"]] == [12, 12]
    ids = [[tuple(e["input_ids"].tolist()) for e in r["replay"]["items"]] for r in ck["ranks"]]
    assert ids[0] != ids[1]
    assert ck["ewc"]["fisher"] and ck["history"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    wake = [r for r in rows if r["phase"] == "wake"]
    assert [r["step"] for r in wake] == list(range(6))
    assert all(r["core/batch_rows"] == 4 for r in wake)  # 2 rows on each of 2 ranks
    assert [r["boundary/boundary"] for r in rows if r["phase"] == "boundary"] == [0, 1]
    assert sum(r["phase"] == "summary" for r in rows) == 1
    assert {r["phase"] for r in rows} >= {"sleep", "ewc", "refresh", "schedule"}
    res = json.loads((out / "results.json").read_text())
    assert res["counts"][1][0] == res["counts"][0][0] > 0  # all 5 eval examples of task 0, once
    one = to_engine(compose("train", TINY))
    tok = load_model("tiny-llama", device="cpu")[1]
    feats = _features(tok, one.tasks[0], _examples(one)[0], one)[1]
    batch = collate(feats, tok.pad_token_id or 0)
    supervised = int((causal_labels(batch["labels"], batch["attention_mask"])[:, 1:] != -100).sum())
    assert res["counts"][0][0] == supervised
    assert all(math.isfinite(a) for a in (res["A"][1][0], res["A"][1][1]))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_stop_and_resume_equals_uninterrupted(two_process_run, tmp_path):
    """A 2-process run stopped after 4 wake steps (inside task 2, after a boundary, sleeps,
    EWC and refresh) and resumed by 2 processes ends with the uninterrupted run's metrics,
    weights and replay shards; resuming with 1 process is refused."""
    out = tmp_path / "part"
    _launch(tmp_path, out, "train.stop_after=4")
    part = load_checkpoint(out)
    assert part["step"] == 4 and not part["done"] and part["world_size"] == 2
    with pytest.raises(NNError, match="written by 2 process"):
        run_stream(to_engine(compose("train", [*TINY, "train.method=full_cls"])),
                   *load_model("tiny-llama", device="cpu"), resume=part, identity={"model": "tiny-llama"})
    _launch(tmp_path, out, f"train.resume={out}")
    whole, resumed = load_checkpoint(two_process_run), load_checkpoint(out)
    assert resumed["done"]
    assert [r["state_sha256"] for r in resumed["ranks"]] == [r["state_sha256"] for r in whole["ranks"]]
    for a, b in zip(whole["ranks"], resumed["ranks"], strict=True):
        assert a["replay"]["seen"] == b["replay"]["seen"]
        for ea, eb in zip(a["replay"]["items"], b["replay"]["items"], strict=True):
            assert torch.equal(ea["input_ids"], eb["input_ids"])
    rows = [(out / "metrics.jsonl").read_text(), (two_process_run / "metrics.jsonl").read_text()]
    assert rows[0] == rows[1]


def test_plain_runtime_is_the_identity(tiny_llama):
    rt = runtime(tiny_llama[0], "no")
    assert rt.plain and rt.world_size == 1 and rt.rank == 0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert rt.wrap(opt) is opt
    assert rt.reduce_metrics({"a": 1.5}) == {"a": 1.5} and rt.mean(2.0) == 2.0
    assert isinstance(Runtime(None, mixed_precision="bf16").wrap(opt), SyncedOptimizer)


def test_fp16_without_cuda_is_one_error_before_loading(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(NNError, match="fp16 needs a CUDA device"):
        to_engine(compose("train", ["model=tiny_llama", "train.mixed_precision=fp16"]))
    with pytest.raises(NNError, match="mixed_precision must be one of"):
        to_engine(compose("train", ["model=tiny_llama", "train.mixed_precision=fp8"]))
    assert main(["train", "model=tiny_llama", "train.mixed_precision=fp16", f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16 needs a CUDA device" in err[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_bf16_autocast_run_on_cpu_completes_with_finite_losses():
    cfg = EngineConfig(method="full_cls", tasks=("uppercase", "reverse_words"), n_train=8, n_eval=4,
                       steps_per_task=2, batch_size=2, top_k=8, sleep_batch_size=2, probe_size=2,
                       mixed_precision="bf16", experts=HippocampusConfig(num_experts=4, expert_hidden=8),
                       scheduler=SchedulerConfig(min_interval=1, max_interval=2, min_sleep_steps=1,
                                                 max_sleep_steps=1))
    model, tok = load_model("tiny-llama", device="cpu")
    seen = []
    orig = model.forward

    def spy(*a, **k):  # the forwards really run under bf16 autocast
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return orig(*a, **k)

    model.forward = spy
    res = run_stream(cfg, model, tok)
    assert sum(seen) >= len(cfg.tasks) * cfg.steps_per_task  # every wake forward (EWC's Fisher runs fp32)
    wake = [r["wake_loss"] for r in res["history"] if r["phase"] == "wake"]
    sleep = [r["sleep_kl"] for r in res["history"] if r["phase"] == "sleep"]
    assert wake and sleep and all(math.isfinite(v) for v in wake + sleep)
    assert all(math.isfinite(v) for row in res["L"] for v in row[:1])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # AMP: weights stay fp32
