from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nn_core.errors import NNError
from nn_eval.continual import cl_metrics, load_baseline, load_matrix, plot_matrix, save_matrix

NAN = math.nan
A = [[0.9, 0.1, NAN],
     [0.7, 0.8, 0.2],
     [0.6, 0.85, 0.95]]
L = [[1.0, 3.0, NAN],
     [1.5, 0.9, 2.5],
     [1.8, 1.0, 0.7]]


def test_definitions_on_a_hand_computed_matrix():
    r = cl_metrics(A, L, baseline=[0.5, 0.05, 0.1], tasks=["a", "b", "c"])
    seen = [b["seen_acc_avg"] for b in r["boundaries"]]
    assert seen == pytest.approx([0.9, 0.75, 0.8])
    assert [b["seen_loss_avg"] for b in r["boundaries"]] == pytest.approx([1.0, 1.2, 3.5 / 3])
    # forgetting_2: task a best 0.9 now 0.6 (0.3); task b best max(0.1, 0.8) now 0.85 (-0.05).
    assert [b["forgetting"] for b in r["boundaries"]] == pytest.approx([0.0, 0.2, 0.125])
    assert [b["bwt"] for b in r["boundaries"]] == pytest.approx([0.0, -0.2, -0.125])
    assert r["seen_acc_auc"] == pytest.approx(((0.9 + 0.75) / 2 + (0.75 + 0.8) / 2) / 2)
    assert r["final_seen_acc_avg"] == r["AA"] == pytest.approx(0.8)
    assert r["final_bwt"] == r["BWT"] == pytest.approx(-0.125)
    assert r["final_forgetting"] == pytest.approx(0.125)
    assert r["final_seen_loss_avg"] == pytest.approx(3.5 / 3)
    assert r["FWT"] == pytest.approx(((0.1 - 0.05) + (0.2 - 0.1)) / 2)
    assert r["FWT_unavailable"] is None
    assert r["tasks"] == ["a", "b", "c"] and r["boundaries"][2]["task"] == "c"
    json.dumps(r)  # JSON-ready


def test_fwt_is_unavailable_not_zero_without_super_diagonal_or_baseline():
    lower = np.tril(np.array(A))
    lower[np.triu_indices(3, 1)] = np.nan
    r = cl_metrics(lower, baseline=[0.5, 0.05, 0.1])
    assert r["FWT"] is None and "A[i-1][i] is missing" in r["FWT_unavailable"]
    r = cl_metrics(A)
    assert r["FWT"] is None and "no baseline" in r["FWT_unavailable"]
    # Without the upper entries the forgetting max runs over k >= j only: b's best is 0.8.
    assert cl_metrics(lower)["final_forgetting"] == pytest.approx((0.3 - 0.05) / 2)
    assert cl_metrics(A, baseline={"task0": 0, "task1": 0.1, "task2": 0.2})["FWT"] == pytest.approx(0.0)


def test_single_task_matrix():
    r = cl_metrics([[0.4]])
    assert r["seen_acc_auc"] == 0.4 and r["final_forgetting"] == 0.0 and r["final_bwt"] == 0.0
    assert r["BWT"] is None and r["FWT"] is None


def test_zero_token_entries_are_reported_and_not_averaged():
    acc = [[0.9, NAN, NAN], [NAN, 0.8, NAN], [0.5, 0.7, 0.6]]
    counts = [[10, 0, 0], [0, 12, 0], [10, 12, 9]]
    r = cl_metrics(acc, counts=counts)
    b1 = r["boundaries"][1]
    assert b1["zero_token_tasks"] == ["task0"]
    assert b1["seen_acc_avg"] == pytest.approx(0.8)
    assert b1["forgetting"] is None and b1["bwt"] is None   # nothing measurable before task1
    assert r["boundaries"][2]["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert r["zero_token_entries"] == [[1, 0]]
    # With every entry measurable, the same finite values give the plain averages.
    full = cl_metrics([[0.9, NAN, NAN], [0.1, 0.8, NAN], [0.5, 0.7, 0.6]])
    assert full["boundaries"][1]["seen_acc_avg"] == pytest.approx(0.45)


@pytest.mark.parametrize(
    ("matrix", "kwargs", "match"),
    [
        ([[0.1, 0.2]], {}, "square"),
        ([[0.1, 0.2], [0.3]], {}, "square|numbers"),
        ([[0.5, NAN], [NAN, 0.4]], {}, r"\[1\]\[0\] is missing"),
        ([["x"]], {}, "numbers"),
        ([[0.5]], {"tasks": ["a", "b"]}, "task names"),
        ([[0.5, NAN], [0.4, 0.3]], {"loss_matrix": [[1.0]]}, "loss matrix"),
        ([[0.5, NAN], [0.4, 0.3]], {"loss_matrix": [[1.0, NAN], [NAN, 1.0]]}, "loss matrix entry"),
        ([[0.5, 0.1], [0.4, 0.3]], {"baseline": [1.0]}, "baseline"),
        ([[0.5, NAN], [0.4, 0.3]], {"counts": [[1, 0], [-1, 1]]}, "count"),
    ],
)
def test_bad_matrices(matrix, kwargs, match):
    with pytest.raises(NNError, match=match) as info:
        cl_metrics(matrix, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_round_trip(tmp_path, suffix):
    m = np.array(A) / 3.0  # values that need every digit
    path = save_matrix(tmp_path / f"acc{suffix}", m, ["alpha", "beta", "gamma"])
    back, names = load_matrix(path)
    assert names == ["alpha", "beta", "gamma"]
    assert np.array_equal(back, m, equal_nan=True)


def test_csv_layout_and_baseline_files(tmp_path):
    path = save_matrix(tmp_path / "acc.csv", A, ["a", "b", "c"])
    lines = path.read_text().splitlines()
    assert lines[0] == "task,a,b,c" and lines[1] == "a,0.9,0.1,"
    (tmp_path / "b.json").write_text(json.dumps({"c": 0.3, "a": 0.1, "b": 0.2}))
    (tmp_path / "b.csv").write_text("b,a,c\n0.2,0.1,0.3\n")
    assert load_baseline(tmp_path / "b.json", ["a", "b", "c"]) == [0.1, 0.2, 0.3]
    assert load_baseline(tmp_path / "b.csv", ["a", "b", "c"]) == [0.1, 0.2, 0.3]
    (tmp_path / "bad.csv").write_text("task,a,b\na,0.1,x\nb,0.2,0.3\n")
    with pytest.raises(NNError, match="not a number"):
        load_matrix(tmp_path / "bad.csv")
    (tmp_path / "rect.csv").write_text("task,a,b\na,0.1,\n")
    with pytest.raises(NNError, match="square"):
        load_matrix(tmp_path / "rect.csv")
    with pytest.raises(NNError, match="does not exist"):
        load_matrix(tmp_path / "missing.csv")


def test_heatmap_png(tmp_path):
    out = plot_matrix(tmp_path / "acc.png", A, ["a", "b", "c"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert list(tmp_path.iterdir()) == [out]


def test_a_nan_count_above_the_diagonal_does_not_hide_a_measured_entry():
    # A[0][1] and A[1][2] were measured; nobody recorded their token counts (NaN).
    counts = [[10, NAN, NAN], [10, 12, NAN], [10, 12, 9]]
    r = cl_metrics(A, counts=counts, baseline=[0.5, 0.05, 0.1])
    assert r["FWT"] == pytest.approx(((0.1 - 0.05) + (0.2 - 0.1)) / 2)
    assert r["FWT_unavailable"] is None and r["zero_token_entries"] == []
    # a count of 0 still marks an entry unmeasurable
    zero = cl_metrics(A, counts=[[10, 0, NAN], [10, 12, NAN], [10, 12, 9]], baseline=[0.5, 0.05, 0.1])
    assert zero["FWT"] is None and "task1" in zero["FWT_unavailable"]


def test_seen_acc_auc_is_unavailable_when_a_boundary_has_no_seen_accuracy():
    acc = [[0.9, NAN, NAN], [NAN, NAN, NAN], [0.5, 0.7, 0.6]]
    counts = [[10, 0, 0], [0, 0, 0], [10, 12, 9]]
    r = cl_metrics(acc, counts=counts)
    assert r["boundaries"][1]["seen_acc_avg"] is None
    assert r["seen_acc_auc"] is None and "boundary(ies) 1" in r["seen_acc_auc_unavailable"]
    assert cl_metrics(A)["seen_acc_auc_unavailable"] is None


@pytest.mark.parametrize("baseline", [{"a": "x", "b": 0.1, "c": 0.2}, {"a": 0.1, "b": None, "c": 0.2},
                                      {"a": 0.1, "b": [1], "c": 0.2}, [0.1, "x", 0.2], 5])
def test_bad_baseline_values_are_one_line_nnerrors(baseline):
    with pytest.raises(NNError, match="baseline") as info:
        cl_metrics(A, baseline=baseline, tasks=["a", "b", "c"])
    assert "\n" not in str(info.value)


def test_baseline_null_for_the_first_task_is_allowed_since_fwt_never_reads_it():
    r = cl_metrics(A, baseline={"a": None, "b": 0.05, "c": "0.1"}, tasks=["a", "b", "c"])
    assert r["FWT"] == pytest.approx(((0.1 - 0.05) + (0.2 - 0.1)) / 2)


@pytest.mark.parametrize("obj", [{"matrix": [[0.5, None], 7]}, [{"a": 1}, {"b": 2}], {"matrix": "ab"},
                                 {"matrix": [[0.5]], "tasks": "a"}])
def test_json_matrix_with_rows_that_are_not_lists(tmp_path, obj):
    (tmp_path / "m.json").write_text(json.dumps(obj))
    with pytest.raises(NNError, match="m.json") as info:
        load_matrix(tmp_path / "m.json")
    assert "\n" not in str(info.value)
