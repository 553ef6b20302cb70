from __future__ import annotations

import pytest
import torch

from nn_core.model.loading import load_model


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


class _NoFloat64(torch.Tensor):
    """Logits that behave like a tensor on a device without float64 (Apple MPS): casting
    to float64 raises; ``.cpu()`` gives a plain tensor, where float64 works."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wants64 = func is torch.Tensor.double or (
            func in (torch.Tensor.to, torch.Tensor.sum, torch.Tensor.type)
            and torch.float64 in (*args[1:], *kwargs.values()))
        if wants64:
            raise TypeError("float64 is not supported on this device")
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                # on a CPU tensor .cpu() returns the same object: drop the subclass
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture
def no_float64_logits():
    """``with no_float64_logits(model):`` the model's logits refuse float64 until moved to CPU."""
    import contextlib

    @contextlib.contextmanager
    def patch(model):
        def hook(module, args, out):
            out.logits = out.logits.as_subclass(_NoFloat64)
            return out

        handle = model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    return patch
