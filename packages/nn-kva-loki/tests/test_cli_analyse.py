from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from nn_core.model.loading import load_model
from nn_kva_loki.cli import main
from nn_kva_loki.cli_analyse import default_out
from nn_kva_loki.kva import analyse
from nn_kva_loki.kva_file import KVASettings, read_kva

FAST = ["--steps", "2", "--per-task", "2"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_analyse_writes_kva_and_manifest(tmp_path, capsys):
    out = tmp_path / "kva"
    assert main(["analyse", "tiny-llama", "synthetic:add,copy", *FAST, "--out", str(out)]) == 0
    with read_kva(out / "kva.h5") as f:
        assert f.complete and f.shape == (4, 2, 64)
        assert f.sample_ids() == ["synthetic/add:0", "synthetic/add:1", "synthetic/copy:0", "synthetic/copy:1"]
        attrs = f.attrs
        assert (attrs["method"], attrs["steps"], attrs["engine"], attrs["dtype"], attrs["target"]) == (
            "riemann_trapezoid", 2, "fast", "float32", "argmax")
        assert attrs["dataset"].startswith("synthetic:add,copy")
        assert json.loads(attrs["model_signature"])["model_id"] == "tiny-llama"
        assert np.abs(f.attributions()).max() > 0 and ((f.target_prob() > 0) & (f.target_prob() <= 1)).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tool"] == "nn-kva-loki analyse"
    assert manifest["config"]["steps"] == 2 and manifest["config"]["engine"] == "fast"
    assert manifest["extra"]["n_written"] == 4 and manifest["extra"]["settings"]["method"] == "riemann_trapezoid"
    assert "analyse" in manifest["phases"]["seconds"]
    printed = capsys.readouterr().out
    assert "KVA of 4 samples" in printed and "samples/s" in printed
    # a second run with the default write mode w replaces the folder's complete file
    assert main(["analyse", "tiny-llama", "synthetic:add", *FAST, "--out", str(out)]) == 0
    with read_kva(out / "kva.h5") as f:
        assert f.num_samples == 2


def test_default_out():
    assert str(default_out("smollm2-135m", "synthetic")) == os.path.join("runs", "kva-smollm2-135m-synthetic")
    assert default_out("/models/llama/", "data/mmlu.csv").name == "kva-llama-mmlu.csv"


def test_gold_target_on_mc_file(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"{i}+1?", "choices": [str(i + 1), "x"], "answer": 0}) + "\n"
                          for i in range(3)))
    out = tmp_path / "kva"
    assert main(["analyse", "tiny-gpt2", str(mc), "--target", "gold", "--steps", "2", "--out", str(out)]) == 0
    _, tok = load_model("tiny-gpt2", device="cpu")
    with read_kva(out / "kva.h5") as f:
        assert f.settings["target"] == "gold" and f.settings["dataset"] == "mc.jsonl"
        want = [tok(f" {i + 1}", add_special_tokens=False)["input_ids"][0] for i in range(3)]
        assert f.target_token().tolist() == want


def test_bad_input_is_one_line_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "kva"
    for args, msg in ((["--steps", "0"], "steps must be"), (["--method", "gausslegendre", "--steps", "-3"], "steps must be"),
                      (["--position", "500"], "target position 500 is beyond sample")):
        assert main(["analyse", "tiny-llama", "synthetic:add", "--per-task", "2", *args, "--out", str(out)]) == 2
        assert msg in _one_error_line(capsys)
        assert not (out / "kva.h5").exists()
    assert main(["analyse", "tiny-llama", "synthetic:add", *FAST, "--out", str(out)]) == 0
    kva = out / "kva.h5"
    before = kva.read_bytes()
    capsys.readouterr()
    # another model, in either write mode; a target position beyond the prompts
    for args in (["tiny-gpt2", "synthetic:add"], ["tiny-gpt2", "synthetic:add", "--write-mode", "a"],
                 ["tiny-llama", "synthetic:add", "--position", "900"]):
        assert main(["analyse", *args, *FAST, "--out", str(out)]) == 2
        err = _one_error_line(capsys)
        assert "holds attributions of model 'tiny-llama'" in err or "beyond sample" in err
        assert kva.read_bytes() == before
    # a folder that is not an analyse output
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["analyse", "tiny-llama", "synthetic:add", *FAST, "--out", str(other)]) == 2
    assert "not an output of nn-kva-loki analyse" in _one_error_line(capsys)


def test_interrupted_file_needs_resume(tmp_path, capsys):
    model, tok = load_model("tiny-llama", device="cpu")
    out = tmp_path / "kva"
    out.mkdir()

    def stop(n):
        raise KeyboardInterrupt

    from nn_kva_loki.kva import load_samples

    samples, label = load_samples("synthetic:add", tok, per_task=2)
    settings = KVASettings(method="riemann_trapezoid", steps=2, engine="fast", dataset=label)
    with pytest.raises(KeyboardInterrupt):
        analyse(model, tok, samples, out / "kva.h5", settings=settings, batch_size=1, on_write=stop,
                progress=False)
    before = (out / "kva.h5").read_bytes()
    assert main(["analyse", "tiny-llama", "synthetic:add", *FAST, "--out", str(out)]) == 2
    assert "interrupted KVA file (1 samples written): pass --resume" in _one_error_line(capsys)
    assert (out / "kva.h5").read_bytes() == before
    assert main(["analyse", "tiny-llama", "synthetic:add", *FAST, "--out", str(out), "--resume"]) == 0
    assert "resumed at 1" in capsys.readouterr().out
    with read_kva(out / "kva.h5") as f:
        assert f.complete and f.sample_ids() == [s.id for s in samples]
    uninterrupted = tmp_path / "whole"
    assert main(["analyse", "tiny-llama", "synthetic:add", *FAST, "--batch-size", "1", "--out", str(uninterrupted)]) == 0
    with read_kva(out / "kva.h5") as a, read_kva(uninterrupted / "kva.h5") as b:
        np.testing.assert_allclose(a.attributions(), b.attributions(), rtol=1e-5,
                                   atol=1e-5 * float(np.abs(b.attributions()).max()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_write_the_same_file_as_one(tmp_path):
    """torchrun with 2 CPU (gloo) processes: every sample exactly once, in data order, with
    the single-process numbers (7 samples: an uneven last round)."""
    args = ["analyse", "tiny-llama", "synthetic:add,copy,uppercase", "--per-task", "3", "--limit", "7",
            "--steps", "3", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "nn_kva_loki.cli", *args,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with read_kva(tmp_path / "two" / "kva.h5") as two, read_kva(tmp_path / "one" / "kva.h5") as one:
        assert two.complete and two.num_samples == 7
        assert two.sample_ids() == one.sample_ids()
        np.testing.assert_array_equal(two.target_token(), one.target_token())
        np.testing.assert_allclose(two.target_prob(), one.target_prob(), rtol=1e-6)
        ref = one.attributions()
        np.testing.assert_allclose(two.attributions(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
        assert two.settings == one.settings
