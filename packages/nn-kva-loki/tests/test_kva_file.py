from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from nn_core.errors import NNError
from nn_kva_loki.kva_file import FORMAT, KVAFile, KVASettings, open_kva_writer, read_kva


def _data(n=5, L=3, H=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, L, H)).astype(np.float32)


def _write(path, sig, data, start=0, stop=None, settings=None, **kw):
    w = open_kva_writer(path, sig, settings or KVASettings(dataset="synthetic"), **kw)
    stop = len(data) if stop is None else stop
    for i in range(max(start, w.start), stop):
        w.append([f"s{i}"], data[i:i + 1], [100 + i], [i / 10])
    return w


def test_roundtrip_layout_and_attributes(tmp_path, sig):
    data = _data()
    path = tmp_path / "kva.h5"
    w = _write(path, sig, data)
    w.finish()
    with h5py.File(path, "r") as f:
        ds = f["attributions"]
        assert ds.shape == (5, 3, 16) and ds.dtype == np.float32
        assert ds.chunks == (1, 3, 16) and ds.compression == "gzip" and ds.maxshape[0] is None
        assert f.attrs["format"] == FORMAT and f.attrs["site"] == "mlp_out"
        assert json.loads(f.attrs["model_signature"]) == sig
        assert f.attrs["steps"] == 7 and f.attrs["method"] == "riemann_trapezoid"
        assert f.attrs["engine"] == "fast" and f.attrs["dtype"] == "float32"
        assert f.attrs["dataset"] == "synthetic" and bool(f.attrs["complete"])
        assert f.attrs["n_written"] == 5
    with read_kva(path) as kva:
        assert kva.shape == (5, 3, 16) and kva.complete
        np.testing.assert_array_equal(kva.attributions(), data)
        np.testing.assert_array_equal(np.concatenate(list(kva.iter_chunks(2))), data)
        assert [len(c) for c in kva.iter_chunks(2)] == [2, 2, 1]
        assert kva.sample_ids() == [f"s{i}" for i in range(5)]
        np.testing.assert_array_equal(kva.target_token(), 100 + np.arange(5))
        np.testing.assert_allclose(kva.target_prob(), np.arange(5) / 10, rtol=1e-6)
        assert kva.signature == sig and kva.settings["dataset"] == "synthetic"


def test_interrupted_file_is_refused_without_resume_and_resume_continues(tmp_path, sig):
    data = _data(n=6)
    whole = tmp_path / "whole.h5"
    _write(whole, sig, data).finish()
    part = tmp_path / "part.h5"
    _write(part, sig, data, stop=3).close()  # no finish: interrupted
    with read_kva(part) as kva:
        assert not kva.complete and kva.num_samples == 3
    for mode in ("w", "a"):
        with pytest.raises(NNError, match="interrupted.*--resume"):
            open_kva_writer(part, sig, KVASettings(dataset="synthetic"), write_mode=mode)
    w = open_kva_writer(part, sig, KVASettings(dataset="synthetic"), resume=True)
    assert w.start == 3
    w.check_prefix([f"s{i}" for i in range(6)])
    for i in range(w.start, 6):
        w.append([f"s{i}"], data[i:i + 1], [100 + i], [i / 10])
    w.finish()
    with read_kva(part) as a, read_kva(whole) as b:
        np.testing.assert_array_equal(a.attributions(), b.attributions())
        assert a.sample_ids() == b.sample_ids() and a.complete
        np.testing.assert_array_equal(a.target_token(), b.target_token())


def test_rows_beyond_the_counter_are_ignored_and_dropped_on_resume(tmp_path, sig):
    data = _data(n=4)
    path = tmp_path / "kva.h5"
    _write(path, sig, data, stop=2).close()
    with h5py.File(path, "r+") as f:  # a write cut off after the rows, before the counter
        f["attributions"].resize(3, axis=0)
        f["attributions"][2] = 999.0
    with read_kva(path) as kva:
        assert kva.num_samples == 2
        assert len(kva.attributions()) == 2
    w = _write(path, sig, data, resume=True)
    assert w.start == 2
    w.finish()
    with read_kva(path) as kva:
        np.testing.assert_array_equal(kva.attributions(), data)


def test_a_killed_writer_leaves_a_resumable_file(tmp_path, sig):
    path = tmp_path / "kva.h5"
    data = _data(n=8)
    np.save(tmp_path / "data.npy", data)
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from nn_kva_loki.kva_file import KVASettings, open_kva_writer
        data = np.load({str(tmp_path / 'data.npy')!r})
        w = open_kva_writer({str(path)!r}, {sig!r}, KVASettings(dataset="synthetic"))
        for i in range(8):
            w.append([f"s{{i}}"], data[i:i + 1], [100 + i], [i / 10])
            if i == 4:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    with read_kva(path) as kva:
        assert not kva.complete and kva.num_samples == 5
    with pytest.raises(NNError, match="interrupted"):
        open_kva_writer(path, sig, KVASettings(dataset="synthetic"))
    _write(path, sig, data, resume=True).finish()
    with read_kva(path) as kva:
        np.testing.assert_array_equal(kva.attributions(), data)
        assert kva.sample_ids() == [f"s{i}" for i in range(8)]


def test_other_model_or_settings_are_refused_with_one_line(tmp_path, sig):
    path = tmp_path / "kva.h5"
    _write(path, sig, _data()).finish()
    other = {**sig, "num_layers": 4}
    with pytest.raises(NNError, match="not 'tiny-test'.*differs in num_layers") as err:
        open_kva_writer(path, other, KVASettings(dataset="synthetic"), write_mode="a")
    assert "\n" not in str(err.value)
    with pytest.raises(NNError, match="model_id"):
        open_kva_writer(path, {**sig, "model_id": "other"}, KVASettings(dataset="synthetic"), resume=True)
    with pytest.raises(NNError, match="other settings.*steps 7 vs 3"):
        open_kva_writer(path, sig, KVASettings(dataset="synthetic", steps=3), write_mode="a")
    with pytest.raises(NNError, match="dataset"):  # resume means the same run: dataset too
        open_kva_writer(path, sig, KVASettings(dataset="mmlu"), resume=True)
    with pytest.raises(NNError, match="steps must be"):
        open_kva_writer(tmp_path / "new.h5", sig, KVASettings(steps=0))
    with pytest.raises(NNError, match="write mode"):
        open_kva_writer(tmp_path / "new.h5", sig, KVASettings(), write_mode="x")


def test_write_mode_w_replaces_a_complete_file_and_a_appends(tmp_path, sig):
    path = tmp_path / "kva.h5"
    data = _data(n=4)
    _write(path, sig, data, stop=2).finish()
    _write(path, sig, data * 2, stop=3, write_mode="w").finish()
    with read_kva(path) as kva:
        np.testing.assert_array_equal(kva.attributions(), data[:3] * 2)
    w = open_kva_writer(path, sig, KVASettings(dataset="mmlu"), write_mode="a")
    assert w.start == 3
    w.append(["m0"], data[3:4], [1], [0.1])
    w.finish()
    with read_kva(path) as kva:
        assert kva.num_samples == 4 and kva.sample_ids()[-1] == "m0"
        assert kva.settings["dataset"] == "synthetic, mmlu"
        np.testing.assert_array_equal(kva.attributions()[3], data[3])


def test_check_prefix_and_append_shape(tmp_path, sig):
    path = tmp_path / "kva.h5"
    _write(path, sig, _data(), stop=2).close()
    w = open_kva_writer(path, sig, KVASettings(dataset="synthetic"), resume=True)
    with pytest.raises(NNError, match="other samples.*sample 1"):
        w.check_prefix(["s0", "x1", "s2"])
    with pytest.raises(NNError, match=r"expected \[1, 3, 16\]"):
        w.append(["s2"], np.zeros((1, 3, 15)), [0], [0.0])
    w.close()


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros((2, 3, 4))
    with pytest.raises(NNError, match="not a KVA file"):
        KVAFile(plain)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(NNError, match="not a readable HDF5 file"):
        KVAFile(text)
    with pytest.raises(FileNotFoundError):
        KVAFile(tmp_path / "missing.h5")
