from __future__ import annotations

import pytest
import torch

from nn_core.model.loading import TINY_ARCHS, load_model


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny model per architecture, built once per test session."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(f"tiny-{arch}", device="cpu")
        return cache[arch]

    return get


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


def _encode(tok, texts, padding_side="right"):
    tok.padding_side = padding_side
    try:
        return tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"


@pytest.fixture
def batch(tiny_models):
    def make(arch: str, texts=("hello world, this is nn", "short one")):
        _, tok = tiny_models(arch)
        return dict(_encode(tok, list(texts)))

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def encode():
    """encode(tok, texts, padding_side="right") -> BatchEncoding."""
    return _encode
