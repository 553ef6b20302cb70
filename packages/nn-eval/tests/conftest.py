from __future__ import annotations

import pytest
import torch

from nn_core.models import load_model


@pytest.fixture(scope="session")
def tiny():
    """Tiny random models with the byte tokenizer, built once per session."""
    cache: dict[str, tuple] = {}

    def get(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = load_model(f"tiny-{arch}", device="cpu")
        return cache[arch]

    return get


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
