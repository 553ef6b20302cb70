from __future__ import annotations

import pytest
import torch

from nn_core.model.loading import load_model


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer) of tiny-llama, built once per session (tests must not train it
    in place: use ``fresh_llama``)."""
    return load_model("tiny-llama", device="cpu")


@pytest.fixture
def fresh_llama():
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
