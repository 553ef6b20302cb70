"""Device, dtype and seeding policy."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from nn_core.errors import NNError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is unavailable is an error.
    ``map`` (a model spread with ``device_map="auto"``, see ``load_model``) resolves like
    ``auto``: the device its first block, and so its inputs, land on."""
    if device is None or str(device) in ("auto", "map"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise NNError(f"unknown device '{device}': use auto, map, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NNError(f"device '{device}' was asked for but CUDA is not available: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise NNError(f"device '{device}' does not exist: this machine has "
                      f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise NNError(f"device '{device}' was asked for but MPS is not available: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (exact research numbers), bfloat16 on CUDA where the GPU
    supports it, else float16; float16 on MPS."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise NNError(
            f"unknown dtype '{dtype}': use one of auto, {', '.join(sorted(set(_DTYPES)))}"
        ) from None


def input_device(model) -> torch.device:
    """Where a model's inputs go: its input embedding's device. A model sharded with
    ``device_map="auto"`` keeps its first block there, not on one global device. Falls back
    to the first parameter's device, then the CPU."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices). ``deterministic`` also asks torch for
    deterministic kernels, which can be slower."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
