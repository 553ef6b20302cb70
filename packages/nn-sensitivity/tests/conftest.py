from __future__ import annotations

import pytest
import torch

from nn_core.model.loading import load_model


def make_batches(n_batches: int = 3, batch: int = 2, seq: int = 24, seed: int = 0,
                 vocab: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
            for _ in range(n_batches)]


@pytest.fixture(scope="module")
def llama():
    model, tok = load_model("tiny-llama", device="cpu", dtype="float32")
    return model, tok


@pytest.fixture(scope="module")
def gpt2():
    model, tok = load_model("tiny-gpt2", device="cpu", dtype="float32")
    return model, tok


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def batch_maker():
    """``make_batches`` for tests (pytest's importlib mode cannot import conftest)."""
    return make_batches
