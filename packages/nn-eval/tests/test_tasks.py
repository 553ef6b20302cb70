from __future__ import annotations

import json
import random

import pytest

from nn_core.errors import NNError
from nn_eval.tasks import TASKS, Task, export_tasks, get_task, make_split, number_words


def test_at_least_eight_documented_tasks():
    assert len(TASKS) >= 8
    for name, task in TASKS.items():
        assert task.name == name and len(task.description) > 10


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_deterministic_disjoint_and_alpaca(name):
    a = make_split(name, 200, 50, seed=3)
    b = make_split(name, 200, 50, seed=3)
    assert a == b
    assert make_split(name, 200, 50, seed=4) != a
    assert make_split(name, 10, 50, seed=3)["eval"] == a["eval"]
    keys = lambda xs: {(x["instruction"], x["input"]) for x in xs}  # noqa: E731
    assert len(keys(a["train"])) == 200 and len(keys(a["eval"])) == 50
    assert not keys(a["train"]) & keys(a["eval"])
    for ex in a["train"][:20]:
        assert set(ex) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) and v for v in ex.values())


def test_answers_follow_the_rules():
    rng = random.Random(0)
    for _ in range(50):
        ex = TASKS["reverse_words"].example(rng)
        assert ex["output"].split() == ex["input"].split()[::-1]
        ex = TASKS["sort_numbers"].example(rng)
        assert [int(x) for x in ex["output"].split(", ")] == sorted(int(x) for x in ex["input"].split(", "))
        ex = TASKS["add"].example(rng)
        a, b = ex["input"].split(" and ")
        assert int(ex["output"]) == int(a) + int(b)
        ex = TASKS["count_letter"].example(rng)
        letter = ex["instruction"].split("'")[1]
        assert int(ex["output"]) == ex["input"].count(letter)
        ex = TASKS["kth_word"].example(rng)
        k = int("".join(c for c in ex["instruction"].split()[2] if c.isdigit()))
        assert ex["output"] == ex["input"].split()[k - 1]
        ex = TASKS["uppercase"].example(rng)
        assert ex["output"] == ex["input"].upper()
        ex = TASKS["copy"].example(rng)
        assert ex["output"] == ex["input"]


@pytest.mark.parametrize(("n", "words"), [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (42, "forty-two"), (100, "one hundred"),
    (342, "three hundred forty-two"), (1000, "one thousand"),
    (90017, "ninety thousand seventeen"), (999999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
])
def test_number_words(n, words):
    assert number_words(n) == words


def test_scorer_is_exact_up_to_whitespace():
    t = get_task("copy")
    assert t.score("  apple  river\n", "apple river")
    assert not t.score("Apple river", "apple river")
    assert not t.score("apple river.", "apple river")
    assert t.accuracy(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5


def test_export_writes_jsonl_per_task_and_split(tmp_path):
    paths = export_tasks(tmp_path, ["add", "copy"], n_train=5, n_eval=3, seed=1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == [
        "add/eval.jsonl", "add/train.jsonl", "copy/eval.jsonl", "copy/train.jsonl"]
    rows = [json.loads(x) for x in (tmp_path / "add" / "eval.jsonl").read_text().splitlines()]
    assert rows == make_split("add", 5, 3, seed=1)["eval"]


def test_bad_task_requests(monkeypatch):
    with pytest.raises(NNError, match="unknown task 'nope'"):
        get_task("nope")
    digit = Task("digit", "one of ten digits", lambda rng: ("Copy.", str(rng.randint(0, 9)), "x"))
    monkeypatch.setitem(TASKS, "digit", digit)
    assert len(make_split("digit", 6, 4)["train"]) == 6
    with pytest.raises(NNError, match="found only 6 distinct train examples of 7"):
        make_split("digit", 7, 4)
    with pytest.raises(NNError, match="non-negative"):
        make_split("add", -1, 2)
