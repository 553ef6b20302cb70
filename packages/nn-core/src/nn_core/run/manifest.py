"""Run manifests: what was run, on what, with which versions, and what it wrote.

Every run directory gets a ``manifest.json`` (``"format": "nn.manifest/1"``) written
atomically, so a reader either sees a complete manifest or none. Secrets never reach it:
config keys and environment variables whose names carry a secret-like word (token, key,
secret, password, ...) are replaced by ``"<redacted>"``, and so is any string anywhere in
the manifest that equals the value of such an environment variable or looks like a
Hugging Face / W&B credential.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from nn_core.io import MANIFEST_NAME, atomic_write_json

FORMAT = "nn.manifest/1"
REDACTED = "<redacted>"

# Third-party distributions whose versions every manifest records (missing ones skipped).
VERSIONED = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "accelerate",
             "peft", "scikit-learn", "datasets", "bitsandbytes", "gguf")

# Environment variables worth recording (by prefix), secrets among them redacted.
ENV_PREFIXES = ("NN_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_",
                "PYTORCH_", "CUDA_", "OMP_", "MKL_", "WANDB_")

# Name components that mark a secret: HF_TOKEN, api_key, WANDB_API_KEY, db_password, ...
# ("pwd" is left out on purpose: $PWD is a path, not a secret.)
_SECRET_PARTS = {"token", "key", "secret", "password", "passwd", "apikey", "auth",
                 "credential", "credentials", "authorization", "bearer"}
# Credentials recognisable by shape, wherever they appear (a config value, argv).
_SECRET_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}|[0-9a-f]{40})\b")


# A "token" or "key" word right after one of these names vocabulary or data, not a
# credential: pad_token, eos_token, first_token, target_token; prompt_key, sort_key.
_NOT_SECRET_BEFORE = {
    "token": {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "first", "last", "target",
              "gold", "answer", "next", "special", "start", "end", "stop", "new", "prompt",
              "response", "sample", "extra", "image", "decoder"},
    "key": {"sort", "task", "prompt", "response", "text", "label", "labels", "field",
            "column", "input", "output", "answer", "question", "choices", "id", "group",
            "metric", "cache", "dict", "primary", "join"},
}


def is_secret_name(name: str) -> bool:
    """Whether a config key, flag or environment variable name marks a secret.

    The name is split into words (``_``, ``-``, ``.`` and camelCase boundaries); it is a
    secret when a word is one of the secret words or ends in ``token``/``key`` (``hfToken``,
    ``apikey``). Counting words such as ``max_tokens`` or ``tokenizer`` are not secrets,
    and neither is ``token``/``key`` right after a word that makes it vocabulary or data
    (``pad_token``, ``first_token``, ``prompt_key``; see ``_NOT_SECRET_BEFORE``).
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]
    for i, w in enumerate(words):
        if i and words[i - 1] in _NOT_SECRET_BEFORE.get(w, ()):
            continue
        if w in _SECRET_PARTS or (len(w) > 5 and w.endswith(("token", "key"))):
            return True
    return False


def _secret_values() -> set[str]:
    """Values of secret-named environment variables (long enough to be unambiguous)."""
    return {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8}


def _scrub_str(text: str, secrets: set[str]) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    if len(text) == 40 and re.fullmatch(r"[0-9a-f]{40}", text):
        return text  # a whole 40-hex value is a git SHA or a hub revision, kept on purpose
    return _SECRET_SHAPES.sub(REDACTED, text)


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def scrub(obj, secrets: set[str] | None = None):
    """A JSON-ready copy of ``obj`` with secrets redacted (see the module docstring).

    Mappings keep their keys; values under secret-named keys become ``"<redacted>"``.
    Paths, tuples, sets, dtypes and other objects become strings or lists.
    """
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(obj, Mapping):
        return {str(k): (REDACTED if is_secret_name(str(k)) and not _blank(v) else scrub(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(x, secrets) for x in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(scrub(x, secrets) for x in obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return _scrub_str(str(obj), secrets)


def scrub_argv(argv: Sequence[str], secrets: set[str] | None = None) -> list[str]:
    """The command line with the values of secret-named flags redacted
    (``--hf-token X`` and ``--hf-token=X`` alike)."""
    secrets = _secret_values() if secrets is None else secrets
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-"):
            flag, eq, _ = arg.partition("=")
            if is_secret_name(flag.lstrip("-")):
                if eq:
                    out.append(f"{flag}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(_scrub_str(arg, secrets))
    return out


def environment_snapshot() -> dict[str, str]:
    """Environment variables with the prefixes in :data:`ENV_PREFIXES`, secrets redacted."""
    return {k: (REDACTED if is_secret_name(k) else v)
            for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


# --------------------------------------------------------------------------------------
# Git, versions, platform
# --------------------------------------------------------------------------------------


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None  # no git binary, or it hung: the manifest simply has no git entry
    return res.stdout.strip() if res.returncode == 0 else None


def git_info(path: str | Path | None = None) -> dict | None:
    """``{"sha", "dirty", "root"}`` of the git repository holding ``path`` (default: the
    current directory, else this package's source); ``None`` outside any repository.
    ``dirty`` means tracked files differ from the commit (untracked files do not count)."""
    candidates = [Path(path)] if path is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for where in candidates:
        if not where.is_dir():
            continue
        sha = _git(["rev-parse", "HEAD"], where)
        if not sha:
            continue
        status = _git(["status", "--porcelain", "--untracked-files=no"], where)
        root = _git(["rev-parse", "--show-toplevel"], where)
        return {"sha": sha, "dirty": bool(status) if status is not None else None, "root": root}
    return None


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED` and of every ``nn-*`` distribution."""
    from importlib import metadata

    out: dict[str, str] = {}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    nn = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("nn-"):
            nn[name] = dist.version
    out.update(sorted(nn.items()))
    return out


def platform_info() -> dict:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------------------


def _hash_cache_path() -> Path:
    from nn_core.model.loading import cache_dir

    return cache_dir() / "file_hashes.json"


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered under the nn cache by (path, size, mtime) so a
    multi-gigabyte weights file is hashed once, not on every run."""
    import json

    from nn_core.model.loading import file_sha256

    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_path()
    cache: dict = {}
    if cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}  # a damaged cache is rebuilt, never trusted
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = file_sha256(path)
    cache[key] = digest
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        atomic_write_json(cache_file, cache)
    return digest


def model_info(model=None, model_spec: str | None = None) -> dict | None:
    """Id, type, revision, weights hash, device, dtype and parameter count of a model.

    The weights hash is the sha256 of each ``*.safetensors`` file when the model came from
    a local folder, or of the embedded GGUF file for ``smollm2-135m``; hub models record
    the revision (commit) transformers resolved instead.
    """
    if model is None and model_spec is None:
        return None
    from nn_core.model.adapters import model_id

    config = getattr(model, "config", None)
    spec = model_spec or (model_id(model) if model is not None else "")
    info: dict = {"id": spec or None,
                  "model_type": getattr(config, "model_type", None)}
    revision = getattr(config, "_commit_hash", None) or getattr(config, "revision", None)
    if revision:
        info["revision"] = revision
    info["weights"] = _weights_identity(spec)
    if model is not None:
        params = list(model.parameters())
        if params:
            from nn_core.device import dtype_name

            info["device"] = str(params[0].device)
            info["dtype"] = dtype_name(params[0].dtype)
        info["parameters"] = int(sum(p.numel() for p in params))
        info["trainable_parameters"] = int(sum(p.numel() for p in params if p.requires_grad))
    return info


def _weights_identity(spec: str) -> dict | None:
    from nn_core.model.loading import SMOLLM2_ALIAS, smollm2_gguf_path

    if not spec:
        return None
    if spec == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        if gguf is not None:
            return {"source": "gguf", "file": gguf.name, "sha256": cached_sha256(gguf)}
        return {"source": "hub"}
    if spec.startswith("tiny-"):
        return {"source": "random-init"}
    folder = Path(spec).expanduser()
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        return {"source": "local",
                "sha256": {f.name: cached_sha256(f) for f in files} or None}
    return {"source": "hub"}


# --------------------------------------------------------------------------------------
# Outputs, timing, run directories
# --------------------------------------------------------------------------------------


def _outputs(out_dir: Path, outputs: Sequence[str | Path] | None) -> list[dict]:
    """Relative paths and sizes; a folder lists its files; ``None`` lists everything in
    ``out_dir`` except the manifest itself and hidden (temporary) files."""
    paths = [out_dir] if outputs is None else [Path(p) if Path(p).is_absolute() else out_dir / p
                                               for p in outputs]
    rows = []
    for path in paths:
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file())
        else:
            files = [path]
        for f in files:
            try:
                rel = f.relative_to(out_dir)
            except ValueError:
                rel = f  # an output outside the run folder keeps its absolute path
            if rel.name == MANIFEST_NAME and rel.parent == Path("."):
                continue
            if any(part.startswith(".") for part in rel.parts):
                continue
            rows.append({"path": rel.as_posix(),
                         "bytes": f.stat().st_size if f.is_file() else None})
    return rows


class PhaseTimer:
    """Wall time per named phase: ``with timer("train"): ...``; ``timer.phases`` maps
    names to seconds (a repeated name accumulates). Time is recorded even when the phase
    raises."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + (time.perf_counter() - start)

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def run_dir(base: str | Path, name: str | None = None) -> Path:
    """Create and return a fresh run directory under ``base``.

    The name is ``name`` or a UTC timestamp; if it is taken, ``-2``, ``-3``, ... is
    appended, so an earlier run is never overwritten (creation is atomic, so two
    concurrent runs cannot get the same folder).
    """
    base = Path(base).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    stem = name or _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    if "/" in stem or stem in ("", ".", ".."):
        from nn_core.errors import NNError

        raise NNError(f"run name '{stem}' must be a plain folder name")
    for n in range(1, 10_000):
        path = base / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"could not create a fresh run folder under {base}")


def write_manifest(
    out_dir: str | Path,
    *,
    config: Mapping | None,
    model=None,
    model_spec: str | None = None,
    seeds: Mapping | int | None = None,
    phases: Mapping[str, float] | PhaseTimer | None = None,
    outputs: Sequence[str | Path] | None = None,
    extra: Mapping | None = None,
    tool: str | None = None,
) -> Path:
    """Write ``out_dir/manifest.json`` atomically and return its path.

    Fields: ``format``, ``tool`` (the command that wrote the folder, e.g. ``"nn-eval ppl"``:
    how :func:`nn_core.io.check_output_dir` recognises a previous output it may replace),
    ``created_at`` (UTC ISO 8601), ``command`` (``sys.argv``),
    ``cwd``, ``config``, ``seeds``, ``git`` (sha, dirty, root, or null), ``python`` /
    platform, ``versions``, ``env`` (selected variables), ``model`` (id, model_type,
    revision, weights hash, device, dtype, parameters), ``phases`` (seconds per phase and
    their total), ``outputs`` (relative paths with sizes; default: every file in
    ``out_dir``), ``extra``. Everything passes through :func:`scrub`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(phases, PhaseTimer):
        phases = phases.phases
    phase_map = {str(k): round(float(v), 6) for k, v in (phases or {}).items()}
    secrets = _secret_values()
    manifest = {
        "format": FORMAT,
        "tool": tool,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": scrub_argv(sys.argv, secrets),
        "cwd": str(Path.cwd()),
        "config": config,
        "seeds": {"seed": seeds} if isinstance(seeds, int) else seeds,
        "git": git_info(),
        "python": platform_info(),
        "versions": package_versions(),
        "env": environment_snapshot(),
        "model": model_info(model, model_spec),
        "phases": {"seconds": phase_map, "total_seconds": round(sum(phase_map.values()), 6)},
        "outputs": _outputs(out_dir, outputs),
        "extra": extra,
    }
    manifest = {k: (v if k == "command" else scrub(v, secrets)) for k, v in manifest.items()}
    return atomic_write_json(out_dir / MANIFEST_NAME, manifest)
