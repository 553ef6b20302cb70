"""``nn-kva-loki train`` interrupted after a checkpoint and run again resumes it, and ends
with the weights of an uninterrupted run; the frozen rows stay the base's bits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nn_kva_loki.cli import main

POSITIONS = [[1, 5, 9], [0, 63]]


class _Interrupted(Exception):
    pass


def _interrupt_after(step: int):
    """A Trainer callback that raises once ``step`` optimizer steps have been saved (the
    checkpoint for ``step`` is on disk when ``on_step_end`` of the next step runs)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > step:
                raise _Interrupted(f"killed at step {state.global_step}")

    return Kill()


def _train_args(loki, out) -> list[str]:
    return ["train", str(loki), "task:copy", "--n-train", "16", "--n-eval", "2", "--max-steps", "4",
            "--batch-size", "2", "--max-length", "96", "--lr", "1e-2", "--weight-decay", "0.1",
            "--save-steps", "2", "--logging-steps", "1", "--out", str(out)]


def test_interrupted_train_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    import nn_core.train as sft

    pos = tmp_path / "positions.json"
    pos.write_text(json.dumps(POSITIONS))
    loki = tmp_path / "loki"
    assert main(["create", "tiny-llama", str(pos), "--out", str(loki)]) == 0
    base = load_file(str(loki / "model.safetensors"))

    full = tmp_path / "full"
    assert main(_train_args(loki, full)) == 0
    ref = load_file(str(full / "model" / "model.safetensors"))

    # the same command, killed during step 3 (checkpoint-2 written), then run again
    part = tmp_path / "part"
    real_build = sft.build_trainer

    def build_and_kill(*a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", ()), _interrupt_after(2)]
        return real_build(*a, **kw)

    monkeypatch.setattr(sft, "build_trainer", build_and_kill)
    with pytest.raises(_Interrupted):
        main(_train_args(loki, part))
    monkeypatch.setattr(sft, "build_trainer", real_build)
    assert (part / "checkpoint-2").is_dir() and not (part / "model").exists()
    ckpt = load_file(str(part / "checkpoint-2" / "model.safetensors"))
    assert main(_train_args(loki, part)) == 0
    man = json.loads((part / "manifest.json").read_text())
    assert man["extra"]["resumed_from"].endswith("checkpoint-2")
    assert man["extra"]["metrics"]["global_step"] == 4
    got = load_file(str(part / "model" / "model.safetensors"))

    assert got.keys() == ref.keys() == base.keys()
    moved = 0
    for name, w0 in base.items():
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
        if name.endswith("mlp.down_proj.weight"):
            rows = torch.zeros(w0.shape[0], dtype=torch.bool)
            rows[POSITIONS[int(name.split(".")[2])]] = True
            assert torch.equal(got[name][~rows], w0[~rows]), name
            assert torch.equal(ckpt[name][~rows], w0[~rows]), name
            # training went on after the checkpoint: the resumed run did real steps
            assert not torch.equal(got[name][rows], ckpt[name][rows]), name
            moved += 1
        else:
            assert torch.equal(got[name], w0), name
    assert moved == 2


def test_train_out_marker_is_nn_cores_fingerprint_file():
    from nn_core.train import FINGERPRINT_FILE
    from nn_kva_loki.cli_loki import TRAIN_OUT_MARKERS

    assert TRAIN_OUT_MARKERS == (FINGERPRINT_FILE,)
