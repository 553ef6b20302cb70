"""nn-cls on the embedded smollm2-135m: a 3-task synthetic stream for full_cls, naive and replay.

Small settings so the file fits a few minutes on a quiet 2-core CPU: 6 wake steps of 4 rows
per task, 24 training and 8 evaluation examples per task, and sleeps only at task
boundaries (``min_interval`` above the task length), 2 steps each. ``max_length=64`` keeps
whole examples (the chat-formatted prompts are 40-55 tokens; a shorter cap cuts the
responses, i.e. the only supervised tokens). Replay samples task-balanced, so on the third
task two thirds of a replay batch rehearse the earlier tasks. Only invariants are asserted,
plus the robust effect that rehearsing old tasks (``replay``) forgets less than sequential
fine-tuning (``naive``). The table (final seen accuracy, forgetting, BWT and seconds per
method) is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import copy
import math
import os
import time

import pytest

from nn_cls.engine import EngineConfig, run_stream
from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import SchedulerConfig

TASKS = ("uppercase", "first_letters", "reverse_words")
SETTINGS = dict(tasks=TASKS, n_train=24, n_eval=8, max_length=64, steps_per_task=6, batch_size=4,
                lr_wake=5e-3, lr_sleep=5e-3, top_k=16, replay_capacity=64, replay_sampling="task_balanced",
                sleep_batch_size=4, probe_size=4, experts=HippocampusConfig(num_experts=4, expert_hidden=32),
                scheduler=SchedulerConfig(min_interval=12, max_interval=12, min_sleep_steps=2, max_sleep_steps=2))


@pytest.fixture(scope="module")
def results(smollm2):
    model0, tok = smollm2
    out = {}
    for method in ("full_cls", "naive", "replay"):
        model = copy.deepcopy(model0)  # every method starts from the pretrained weights
        t = time.perf_counter()
        out[method] = run_stream(EngineConfig(method=method, **SETTINGS), model, tok)
        out[method]["seconds"] = time.perf_counter() - t
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    print("method      final_seen_acc  forgetting     BWT   seconds")
    for method, r in out.items():
        m = r["metrics"]
        print(f"{method:<10} {m['final_seen_acc_avg']:>15.3f} {m['final_forgetting']:>11.3f} "
              f"{m['final_bwt']:>7.3f} {r['seconds']:>9.1f}")
    return out


def test_matrices_filled_and_metrics_finite(results):
    T = len(TASKS)
    for method, r in results.items():
        A, L, C = r["A"], r["L"], r["counts"]
        for i in range(T):
            for j in range(T):
                if j <= i:
                    assert 0.0 <= A[i][j] <= 1.0 and math.isfinite(L[i][j]) and L[i][j] > 0, (method, i, j)
                    assert C[i][j] == C[j][j] > 0, (method, i, j)  # the same eval tokens at every boundary
                else:
                    assert math.isnan(A[i][j]), (method, i, j)
        m = r["metrics"]
        for k in ("final_seen_acc_avg", "final_seen_loss_avg", "final_forgetting", "final_bwt", "seen_acc_auc"):
            assert math.isfinite(m[k]), (method, k)
        assert m["final_seen_acc_avg"] == pytest.approx(sum(A[T - 1]) / T)
        assert not any(rec.get("nonfinite") for rec in r["history"]), method
    wakes = [x for x in results["replay"]["history"] if x["phase"] == "wake"]
    assert sum("replay_loss" in x for x in wakes) >= len(wakes) - 2  # replay steps really ran
    assert any(x["phase"] == "sleep" for x in results["full_cls"]["history"])


def test_replay_forgets_less_than_naive(results):
    naive, replay = results["naive"]["metrics"], results["replay"]["metrics"]
    assert replay["final_forgetting"] < naive["final_forgetting"], (replay, naive)
    assert replay["final_bwt"] > naive["final_bwt"], (replay, naive)
