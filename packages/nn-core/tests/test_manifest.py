from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nn_core.model.loading import load_model
from nn_core.run import manifest as M
from nn_core.run.manifest import PhaseTimer, is_secret_name, run_dir, scrub, write_manifest

HF_SECRET = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
WANDB_SECRET = "0123456789abcdef0123456789abcdef01234567"  # 40 hex, like a W&B key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_manifest_fields_with_tiny_model(tmp_path, cache):
    model, _ = load_model("tiny-llama", device="cpu")
    out = run_dir(tmp_path / "runs", "exp")
    (out / "scores.json").write_text("{}")
    (out / "sub").mkdir()
    (out / "sub" / "w.bin").write_bytes(b"x" * 10)
    timer = PhaseTimer()
    with timer("load"):
        time.sleep(0.01)
    path = write_manifest(out, config={"lr": 1e-4, "layers": (1, 2), "out": out},
                          model=model, seeds={"seed": 7}, phases=timer, extra={"note": "hi"})
    assert path == out / "manifest.json"
    m = json.loads(path.read_text())
    assert m["format"] == "nn.manifest/1"
    assert m["created_at"].endswith("+00:00")
    assert m["command"] == sys.argv
    assert m["config"] == {"lr": 1e-4, "layers": [1, 2], "out": str(out)}
    assert m["seeds"] == {"seed": 7}
    assert m["python"]["python"].count(".") == 2 and m["python"]["platform"]
    for name in ("torch", "transformers", "numpy", "safetensors", "tokenizers", "nn-core"):
        assert m["versions"][name], name
    mod = m["model"]
    assert mod["id"] == "tiny-llama" and mod["model_type"] == "llama"
    assert mod["device"] == "cpu" and mod["dtype"] == "float32"
    assert mod["parameters"] == sum(p.numel() for p in model.parameters())
    assert mod["weights"] == {"source": "random-init"}
    assert m["phases"]["seconds"]["load"] >= 0.01
    assert m["outputs"] == [{"path": "scores.json", "bytes": 2},
                            {"path": "sub/w.bin", "bytes": 10}]
    assert m["extra"] == {"note": "hi"}


def test_git_sha_and_dirty_flag(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x")
    (repo / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "y")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    out = tmp_path / "out"
    m = json.loads(write_manifest(out, config={}).read_text())
    assert m["git"]["sha"] == sha and m["git"]["dirty"] is False
    (repo / "f.txt").write_text("changed")
    m = json.loads(write_manifest(out, config={}).read_text())
    assert m["git"]["dirty"] is True
    assert M.git_info(tmp_path / "out") is None or M.git_info(tmp_path / "out")["sha"] != sha


def test_secrets_scrubbed_from_config_env_and_argv(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("NN_DB_PASSWORD", "correct horse battery")
    monkeypatch.setenv("HF_HOME", "/some/where")
    monkeypatch.setattr(sys, "argv", ["nn-x", "run", "--hf-token", HF_SECRET,
                                      f"--wandb-key={WANDB_SECRET}", "--max-tokens", "5"])
    config = {
        "hf_token": HF_SECRET,
        "nested": {"apiKey": "abc12345", "list": [{"client_secret": "s3cr3t-value"}]},
        "note": f"pasted {HF_SECRET} by mistake",
        "innocent": WANDB_SECRET,  # a secret's value under a harmless name
        "max_new_tokens": 32,
        "tokenizer": "byte",
        "password": None,
    }
    path = write_manifest(tmp_path, config=config, extra={"auth": "Bearer xyz-123456"})
    text = path.read_text()
    for secret in (HF_SECRET, WANDB_SECRET, "abc12345", "s3cr3t-value", "correct horse",
                   "xyz-123456"):
        assert secret not in text, secret
    m = json.loads(text)
    assert m["config"]["hf_token"] == "<redacted>"
    assert m["config"]["nested"]["apiKey"] == "<redacted>"
    assert m["config"]["nested"]["list"][0]["client_secret"] == "<redacted>"
    assert m["config"]["note"] == "pasted <redacted> by mistake"
    assert m["config"]["max_new_tokens"] == 32 and m["config"]["tokenizer"] == "byte"
    assert m["config"]["password"] is None
    assert m["env"]["HF_TOKEN"] == "<redacted>" and m["env"]["WANDB_API_KEY"] == "<redacted>"
    assert m["env"]["HF_HOME"] == "/some/where"
    assert m["command"] == ["nn-x", "run", "--hf-token", "<redacted>", "--wandb-key=<redacted>",
                            "--max-tokens", "5"]


def test_secret_names():
    for name in ("HF_TOKEN", "WANDB_API_KEY", "api_key", "hfToken", "db_password", "secret",
                 "HUGGING_FACE_HUB_TOKEN", "apikey"):
        assert is_secret_name(name), name
    for name in ("max_tokens", "tokenizer", "n_tokens", "model", "layers", "HF_HOME", "author"):
        assert not is_secret_name(name), name
    # vocabulary and data names that merely contain the word
    for name in ("pad_token", "eos_token", "first_token", "target_token", "prompt_key",
                 "response_key", "sort_key"):
        assert not is_secret_name(name), name
    # ... while the same word after a credential-ish qualifier still is one
    for name in ("access_token", "auth_token", "hub_token", "secret_key", "private_key",
                 "WANDB_API_KEY", "token_pad"):
        assert is_secret_name(name), name
    sha = "a" * 40
    assert scrub({"revision": sha}) == {"revision": sha}  # a git SHA is not a secret


def test_write_is_atomic(tmp_path, monkeypatch):
    first = write_manifest(tmp_path, config={"v": 1})
    before = first.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(tmp_path, config={"v": 2})
    monkeypatch.undo()
    assert first.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_local_folder_weights_hashed_and_cached(tmp_path, cache, monkeypatch):
    import hashlib

    model, _ = load_model("tiny-gpt2", device="cpu")
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    info = M.model_info(model, model_spec=str(folder))
    assert info["weights"] == {"source": "local", "sha256": {"model.safetensors": expected}}
    # The second call reads the cache instead of hashing again.
    calls = []
    monkeypatch.setattr("nn_core.model.loading.file_sha256", lambda p: calls.append(p) or "x")
    assert M.cached_sha256(weights) == expected and calls == []
    os.utime(weights, ns=(1, 1))  # a changed mtime invalidates the entry
    assert M.cached_sha256(weights) == "x" and len(calls) == 1


def test_smollm2_records_gguf_sha(tmp_path, cache, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF fake bytes")
    monkeypatch.setattr("nn_core.model.loading.smollm2_gguf_path", lambda: fake)
    import hashlib

    info = M.model_info(None, model_spec="smollm2-135m")
    assert info["weights"] == {"source": "gguf", "file": "model.gguf",
                               "sha256": hashlib.sha256(b"GGUF fake bytes").hexdigest()}


def test_phase_timer_accumulates_and_survives_errors():
    timer = PhaseTimer()
    with timer("a"):
        time.sleep(0.02)
    with pytest.raises(ValueError), timer("b"):
        time.sleep(0.01)
        raise ValueError
    with timer("a"):
        time.sleep(0.02)
    assert set(timer.phases) == {"a", "b"}
    assert timer.phases["a"] >= 0.04 and timer.phases["b"] >= 0.01
    assert timer.total == pytest.approx(timer.phases["a"] + timer.phases["b"])


def test_run_dir_is_fresh(tmp_path):
    a = run_dir(tmp_path, "x")
    b = run_dir(tmp_path, "x")
    assert a.name == "x" and b.name == "x-2" and a.is_dir() and b.is_dir()
    auto = run_dir(tmp_path / "deeper")
    assert auto.is_dir() and auto.parent == tmp_path / "deeper"
    assert run_dir(tmp_path / "deeper") != auto
