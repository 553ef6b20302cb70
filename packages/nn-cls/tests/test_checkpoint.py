from __future__ import annotations

import math

import pytest
import torch

from nn_cls.engine import CHECKPOINT_NAME, EngineConfig, load_checkpoint, run_stream
from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import SchedulerConfig
from nn_core.errors import NNError
from nn_core.model.loading import load_model


def _cfg(**kw):
    base = dict(method="full_cls", tasks=("uppercase", "reverse_words"), n_train=8, n_eval=4,
                steps_per_task=3, batch_size=2, top_k=8, sleep_batch_size=2, probe_size=2,
                refresh_threshold=0.0, experts=HippocampusConfig(num_experts=4, expert_hidden=8),
                scheduler=SchedulerConfig(min_interval=1, max_interval=2, min_sleep_steps=1,
                                          max_sleep_steps=2))
    base.update(kw)
    return EngineConfig(**base)


def _same(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys(), (ra, rb)
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), k
            elif isinstance(va, float):
                assert va == pytest.approx(vb, abs=1e-6, rel=0), (k, ra, rb)
            else:
                assert va == vb, (k, ra, rb)


class _Killed(RuntimeError):
    pass


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = _cfg()
    whole = run_stream(cfg, *load_model("tiny-llama", device="cpu"))

    def kill(rec):  # dies inside wake step 5 (0-based 4), after the step-4 checkpoint
        if rec["phase"] == "wake" and rec["step"] == 4:
            raise _Killed

    with pytest.raises(_Killed):
        run_stream(cfg, *load_model("tiny-llama", device="cpu"), log=kill, checkpoint_dir=tmp_path,
                   checkpoint_every=2)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 4 and not state["done"]
    assert state["ewc"]["fisher"] and state["replay"]["items"] and state["wake_opt"]["state"]
    assert math.isfinite(state["A"][0][0]) and math.isnan(state["A"][1][0])  # boundary 0 inside
    resumed = run_stream(cfg, *load_model("tiny-llama", device="cpu"), resume=tmp_path,
                         checkpoint_dir=tmp_path)
    assert resumed["A"][0][0] == whole["A"][0][0]
    for key in ("A", "L", "counts"):
        for ra, rb in zip(whole[key], resumed[key], strict=True):
            for va, vb in zip(ra, rb, strict=True):
                assert (math.isnan(va) and math.isnan(vb)) or va == pytest.approx(vb, abs=1e-6, rel=0)
    _same(whole["history"], resumed["history"])
    assert {r["phase"] for r in whole["history"]} >= {"sleep", "ewc", "refresh", "boundary"}
    for k, v in whole["metrics"].items():
        if isinstance(v, float):
            assert v == pytest.approx(resumed["metrics"][k], abs=1e-6, rel=0, nan_ok=True)
    final = load_checkpoint(tmp_path)
    assert final["done"] and final["step"] == 6


def test_stop_after_then_resume_and_config_refusal(tmp_path):
    cfg = _cfg(method="replay", steps_per_task=2)
    whole = run_stream(cfg, *load_model("tiny-llama", device="cpu"))
    part = run_stream(cfg, *load_model("tiny-llama", device="cpu"), checkpoint_dir=tmp_path, stop_after=3)
    assert part["stopped"] and part["metrics"] is None and load_checkpoint(tmp_path)["step"] == 3
    with pytest.raises(NNError, match=r"another config .*differs in engine\.lr_wake"):
        run_stream(_cfg(method="replay", steps_per_task=2, lr_wake=5e-4), *load_model("tiny-llama", device="cpu"),
                   resume=tmp_path)
    rest = run_stream(cfg, *load_model("tiny-llama", device="cpu"), resume=tmp_path)
    flat = [v for row in rest["L"] for v in row]
    assert flat == pytest.approx([v for row in whole["L"] for v in row], abs=1e-6, rel=0, nan_ok=True)
    assert rest["metrics"]["final_seen_acc_avg"] == pytest.approx(whole["metrics"]["final_seen_acc_avg"], abs=1e-6)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(NNError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "x.pt").write_text("hello")
    with pytest.raises(NNError, match="not an nn-cls checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save({"a": 1}, tmp_path / "y.pt")
    with pytest.raises(NNError, match="not an nn-cls checkpoint"):
        load_checkpoint(tmp_path / "y.pt")
