from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llama():
    from nn_core.model.loading import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
