from __future__ import annotations

import json
import math

import pytest

from nn_cls.cli import main
from nn_cls.engine import EngineConfig, run_stream
from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import SchedulerConfig
from nn_cls.streams import instruction_stream, split_task
from nn_core.errors import NNError

WORDS = ["apple", "river", "stone", "cloud", "green", "light", "sound", "table", "water", "night"]


def _write(path, tasks, fields=("q", "a", "skill")):
    rows = []
    for i, w in enumerate(WORDS):  # tasks interleaved: the stream order is first appearance
        for t in tasks:
            rows.append({fields[0]: f"{t}: {w}", fields[1]: w.upper() if t == "upper" else w[::-1],
                         fields[2]: t, "id": i})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_stream_groups_by_task_in_first_appearance_order(tmp_path):
    src = _write(tmp_path / "d.jsonl", ["upper", "reverse"])
    s = instruction_stream(str(src), prompt_field="q", response_field="a", task_field="skill")
    assert list(s) == ["upper", "reverse"]
    assert [e.response for e in s["upper"]] == [w.upper() for w in WORDS]
    assert s["reverse"][0].prompt == "reverse: apple"
    assert list(instruction_stream(str(src), prompt_field="q", response_field="a", task_field="skill",
                                   tasks=["reverse", "upper"])) == ["reverse", "upper"]
    tr, ev = split_task(s["upper"], n_train=6, n_eval=3, seed=0)
    assert len(tr) == 6 and len(ev) == 3 and not {e.prompt for e in tr} & {e.prompt for e in ev}
    assert split_task(s["upper"], 6, 3, seed=0) == (tr, ev)  # seeded
    with pytest.raises(NNError, match="no field"):
        instruction_stream(str(src))  # default field names are absent
    with pytest.raises(NNError, match="do not occur"):
        instruction_stream(str(src), prompt_field="q", response_field="a", task_field="skill", tasks=["x", "upper"])


def test_jsonl_stream_runs_through_run_stream(tmp_path, fresh_llama):
    model, tok = fresh_llama
    src = _write(tmp_path / "d.jsonl", ["upper", "reverse"])
    cfg = EngineConfig(method="full_cls", tasks=("upper", "reverse"), source=str(src), prompt_field="q",
                       response_field="a", task_field="skill", n_train=6, n_eval=3, steps_per_task=2,
                       batch_size=2, top_k=8, sleep_batch_size=2,
                       experts=HippocampusConfig(num_experts=4, expert_hidden=8),
                       scheduler=SchedulerConfig(min_interval=1, max_interval=2, min_sleep_steps=1,
                                                 max_sleep_steps=2))
    out = run_stream(cfg, model, tok)
    A, C = out["A"], out["counts"]
    assert all(math.isfinite(A[i][j]) and C[i][j] > 0 for i in range(2) for j in range(i + 1))
    assert math.isnan(A[0][1])
    # 3 eval examples per task: every supervised token of their responses is counted
    assert C[1][0] == C[0][0]
    assert [r["task"] for r in out["history"] if r["phase"] == "wake"] == ["upper"] * 2 + ["reverse"] * 2
    assert "task_acc/reverse" in [r for r in out["history"] if r["phase"] == "boundary"][-1]


def _cli(tmp_path, *args):
    return main(["train", "model=tiny_llama", "train=cpu_small", "benchmark=instructions", "experts=small",
                 "replay=small", "scheduler=eager", "train.steps_per_task=1", "train.batch_size=2",
                 "benchmark.n_train=4", "benchmark.n_eval=2", "consolidation.sleep_batch_size=2",
                 "consolidation.probe_size=2", "benchmark.prompt_field=q", "benchmark.response_field=a",
                 "benchmark.task_field=skill", f"hydra.run.dir={tmp_path}/hydra", *args])


def test_cli_instruction_stream_and_one_task_is_one_line_exit_2(tmp_path, capsys):
    one = _write(tmp_path / "one.jsonl", ["upper"])
    assert _cli(tmp_path, f"benchmark.local_path={one}", f"out={tmp_path}/o1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 task(s) ['upper']" in err[0] and "at least 2" in err[0], err
    assert not (tmp_path / "o1").exists()
    assert _cli(tmp_path, f"out={tmp_path}/o0") == 2  # neither local_path nor dataset
    assert "exactly one of benchmark.local_path" in capsys.readouterr().err
    two = _write(tmp_path / "two.jsonl", ["upper", "reverse"])
    assert _cli(tmp_path, f"benchmark.local_path={two}", f"out={tmp_path}/o2") == 0
    res = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert res["tasks"] == ["upper", "reverse"]
