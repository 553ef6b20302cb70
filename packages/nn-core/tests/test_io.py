from __future__ import annotations

import pytest

from nn_core.errors import NNError
from nn_core.io import atomic_write_json, read_json


def test_read_json_round_trip(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert read_json(path, what="test") == {"a": [1, 2]}


@pytest.mark.parametrize(("content", "match"), [
    (None, "test file .* does not exist: make one"),
    (b"\xff\xfe\x00", "not UTF-8 text"),
    (b"{not json", "not valid JSON .* at line 1"),
])
def test_read_json_bad_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NNError, match=match) as exc:
        read_json(path, what="test", fix="make one")
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ output folders
import json  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from nn_core.io import (  # noqa: E402
    atomic_dir,
    check_output_dir,
    output_tool,
    sweep_stale,
    temp_prefix,
)


def _output(tmp, tool, text="new"):
    (tmp / "result.txt").write_text(text)
    (tmp / "manifest.json").write_text(json.dumps({"format": "nn.manifest/1", "tool": tool}))


def test_atomic_dir_never_replaces_a_users_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(NNError, match="existing file.*--overwrite"):
        with atomic_dir(target, tool="nn-x run") as tmp:
            _output(tmp, "nn-x run")
    assert target.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # no temp left behind


def test_atomic_dir_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "run"
    with atomic_dir(out, tool="nn-x run") as tmp:
        _output(tmp, "nn-x run", "first")
    assert output_tool(out) == "nn-x run"
    with atomic_dir(out, tool="nn-x run") as tmp:
        _output(tmp, "nn-x run", "second")
    assert (out / "result.txt").read_text() == "second"
    with pytest.raises(NNError, match="holds the output of nn-x run"):
        check_output_dir(out, tool="nn-y build")
    with atomic_dir(out, tool="nn-y build", overwrite=True) as tmp:
        _output(tmp, "nn-y build", "third")
    assert output_tool(out) == "nn-y build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_dir_with_tool_demands_the_manifest_inside(tmp_path):
    with pytest.raises(RuntimeError, match="manifest.json"):
        with atomic_dir(tmp_path / "run", tool="nn-x run") as tmp:
            (tmp / "result.txt").write_text("no provenance")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make", ["user_folder", "empty", "under_file", "fresh"])
def test_check_output_dir_cases(tmp_path, make):
    p = tmp_path / "out"
    if make == "user_folder":
        p.mkdir()
        (p / "thesis.tex").write_text("x")
        with pytest.raises(NNError, match="not an output of nn-x run") as exc:
            check_output_dir(p, tool="nn-x run")
        assert "\n" not in str(exc.value)
        assert check_output_dir(p, tool="nn-x run", overwrite=True) == p
    elif make == "empty":
        p.mkdir()
        assert check_output_dir(p, tool="nn-x run") == p
    elif make == "under_file":
        (tmp_path / "f").write_text("x")
        with pytest.raises(NNError, match="is a file, not a folder"):
            check_output_dir(tmp_path / "f" / "a" / "b", tool="nn-x run")
    else:
        assert check_output_dir(tmp_path / "a" / "b", tool="nn-x run") == tmp_path / "a" / "b"
        assert not (tmp_path / "a").exists()  # checking creates nothing


def test_check_output_dir_unwritable(tmp_path, monkeypatch):
    # root ignores permission bits, so the refusal is checked through os.access itself
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(NNError, match="cannot be written"):
        check_output_dir(tmp_path / "out", tool="nn-x run")


def test_markers_accept_an_unfinished_run_of_the_same_tool(tmp_path):
    p = tmp_path / "train"
    p.mkdir()
    (p / "fingerprint.json").write_text("{}")
    with pytest.raises(NNError):
        check_output_dir(p, tool="nn-x train")
    assert check_output_dir(p, tool="nn-x train", markers=("fingerprint.json",)) == p


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(proc.stdout)  # exited, so not alive (pids are not reused this fast)
    dead = tmp_path / (temp_prefix(out, pid=dead_pid) + "abc123")
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"x")
    dead_file = tmp_path / (temp_prefix(out, pid=dead_pid) + "f00")
    dead_file.write_text("x")
    live = tmp_path / (temp_prefix(out, pid=os.getpid()) + "xyz789")
    live.mkdir()
    other_host = tmp_path / f".run.nn-tmp-00000000-{dead_pid}-zzz"
    other_host.mkdir()
    other_name = tmp_path / (temp_prefix(tmp_path / "other", pid=dead_pid) + "q")
    other_name.mkdir()
    assert sorted(sweep_stale(out)) == sorted([dead, dead_file])
    assert live.is_dir() and other_name.is_dir()
    if temp_prefix(out).split("-")[2] != "00000000":
        assert other_host.is_dir()
    # atomic_dir sweeps too
    dead.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("x")
    assert not dead.exists() and live.is_dir()


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_respect_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        f = atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "run") as tmp:
            atomic_write_json(tmp / "r.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "run" / "r.json").stat().st_mode) == file_mode
