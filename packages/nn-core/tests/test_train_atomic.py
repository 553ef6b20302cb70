"""nn_core.train.train writes its result as one unit: the adapter (or model) folder holds
its own train_log.json, extra files and manifest.json, renamed into place together."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

import nn_core.run.manifest
from nn_core.data import Example
from nn_core.model.loading import load_model
from nn_core.train import SFTConfig, build_trainer, train

EXAMPLES = [Example(f"Add {i} and {i + 1}.", f"The sum is {2 * i + 1}.") for i in range(8)]


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, batch_size=4, learning_rate=1e-2,
                save_steps=100, logging_steps=1)
    return SFTConfig(**{**base, **kw})


def run(config, **kw):
    model, tok = load_model("tiny-llama")
    return train(build_trainer(model, tok, EXAMPLES, config), config, **kw)


def _fail(*a, **k):
    raise RuntimeError("killed after training")


@pytest.mark.parametrize("method,folder", [("lora", "adapter"), ("full", "model")])
def test_a_failure_after_training_leaves_no_folder_without_manifest(tmp_path, monkeypatch, method, folder):
    monkeypatch.setattr(nn_core.run.manifest, "write_manifest", _fail)
    with pytest.raises(RuntimeError, match="killed after training"):
        run(cfg(tmp_path, method=method, trainable_modules=["mlp.down_proj"] if method == "full" else None))
    assert not (tmp_path / folder).exists()
    assert not (tmp_path / "train_log.json").exists() and not (tmp_path / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{folder}")]  # no temp left


def test_a_failing_extra_file_leaves_no_adapter(tmp_path):
    def extra(folder):
        (folder / "mask.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run(cfg(tmp_path), extra_files=extra)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "mask.json").exists()


def test_saved_folder_carries_its_provenance_and_top_level_copies_match(tmp_path):
    res = run(cfg(tmp_path), extra_files=lambda folder: (folder / "note.json").write_text('{"a": 1}\n'),
              model_spec="tiny-llama")
    inner = json.loads((res.saved / "manifest.json").read_text())
    assert inner["extra"]["saved"] == "adapter"
    paths = {row["path"] for row in inner["outputs"]}
    assert {"adapter/adapter_model.safetensors", "adapter/train_log.json", "adapter/note.json"} <= paths
    for name in ("manifest.json", "train_log.json", "note.json"):
        assert (tmp_path / name).read_bytes() == (res.saved / name).read_bytes(), name


def test_a_failed_rerun_keeps_the_previous_adapter_with_its_own_manifest(tmp_path, monkeypatch):
    first = run(cfg(tmp_path, seed=1))
    weights = (first.saved / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(nn_core.run.manifest, "write_manifest", _fail)
    with pytest.raises(RuntimeError, match="killed after training"):
        run(cfg(tmp_path, seed=2), resume=False)
    # the second run's adapter never arrived: the folder still pairs run 1's weights with run 1's manifest
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    assert (tmp_path / "manifest.json").read_bytes() == (tmp_path / "adapter" / "manifest.json").read_bytes()
    assert json.loads((tmp_path / "manifest.json").read_text())["seeds"] == {"seed": 1}


def test_a_kill_after_the_rename_leaves_no_stale_top_level_manifest(tmp_path, monkeypatch):
    """Between the rename and the top-level copies, the previous run's copies are already
    gone: a copy at the top is absent or describes the adapter beside it."""
    import nn_core.train.saving as saving

    run(cfg(tmp_path, seed=1))
    monkeypatch.setattr(saving, "_copy_atomic", _fail)
    with pytest.raises(RuntimeError, match="killed after training"):
        run(cfg(tmp_path, seed=2), resume=False)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "train_log.json").exists()
    assert json.loads((tmp_path / "adapter" / "manifest.json").read_text())["seeds"] == {"seed": 2}
