"""Weight perturbations that restore exactly.

``perturbed(model, weightset, kind, ...)`` changes only the selected entries, saving
their original values (nothing else is copied), and writes those values back on exit,
also when the block raises. Saving and writing back the stored values themselves
(not recomputing them) makes the restore bit-identical in every dtype.

Kinds (w = a selected weight, w' = its perturbed value):

- ``zero``: w' = 0
- ``sign_flip``: w' = -w (integer tensors: two's complement negation, -(-128) stays -128)
- ``gauss_noise``: w' = w + ε, ε ~ N(0, σ²), σ = scale·|w| (relative, default) or σ = scale
  (``absolute=True``); seeded. Integer tensors round and saturate.
- ``bit_flip``: w' = w with one bit of its stored IEEE-754 pattern inverted (bit 0 = least
  significant mantissa bit; fp32: 31 = sign, 23-30 exponent; fp16: 15 sign, 10-14
  exponent; bf16: 15 sign, 7-14 exponent; int8 tensors: bits of the byte). Either
  ``bit=B`` for every selected weight, or (``bit=None``) a uniformly random bit per weight,
  each weight flipped with probability ``prob``; seeded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.select.weightset import WeightSet

PERTURBATIONS = ("zero", "sign_flip", "gauss_noise", "bit_flip")

# Integer view used to flip bits of each storage dtype, and its width in bits.
_BIT_VIEWS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float64: (torch.int64, 64),
    torch.float32: (torch.int32, 32),
    torch.float16: (torch.int16, 16),
    torch.bfloat16: (torch.int16, 16),
    torch.int8: (torch.uint8, 8),
    torch.uint8: (torch.uint8, 8),
}


def check_perturbation(kind: str) -> str:
    if kind not in PERTURBATIONS:
        raise NNError(f"unknown perturbation '{kind}': use one of {', '.join(PERTURBATIONS)}")
    return kind


def _bit_mask(bit: int, width: int, dtype: torch.dtype) -> int:
    """The integer with only ``bit`` set, as a value of the signed view dtype."""
    value = 1 << bit
    if dtype != torch.uint8 and bit == width - 1:
        value -= 1 << width  # the sign bit of a signed view is a negative number
    return value


def bit_flip_values(values: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``values`` with bit ``bits[i]`` of element i's stored pattern inverted (bits < 0: no flip).

    Works on the raw bit pattern via an integer view of the same width, so it is an exact
    IEEE-754 (or two's complement) bit flip, never an arithmetic approximation."""
    if values.dtype not in _BIT_VIEWS:
        raise NNError(f"bit_flip supports {', '.join(str(d).removeprefix('torch.') for d in _BIT_VIEWS)}"
                      f" tensors, not {values.dtype}: load the model in one of those dtypes")
    view_dtype, width = _BIT_VIEWS[values.dtype]
    raw = values.contiguous().view(view_dtype).clone()
    bits = bits.to(raw.device).reshape(raw.shape)
    # A lookup table of single-bit masks avoids shifting into a signed sign bit.
    table = torch.tensor([_bit_mask(b, width, view_dtype) for b in range(width)],
                         dtype=view_dtype, device=raw.device)
    masks = table[bits.clamp(0, width - 1).long()]
    raw = torch.where(bits >= 0, raw ^ masks, raw)
    return raw.view(values.dtype)


def _new_values(kind: str, orig: torch.Tensor, gen: torch.Generator, *, scale: float,
                absolute: bool, bit: int | None, prob: float) -> torch.Tensor:
    if kind == "zero":
        return torch.zeros_like(orig)
    if kind == "sign_flip":
        return -orig
    if kind == "gauss_noise":
        eps = torch.randn(orig.shape, generator=gen, dtype=torch.float64)
        w = orig.double().cpu()
        sigma = torch.full_like(w, scale) if absolute else scale * w.abs()
        new = w + sigma * eps
        if not orig.is_floating_point():
            info = torch.iinfo(orig.dtype)
            new = new.round().clamp(info.min, info.max)
        return new.to(orig.dtype).to(orig.device)
    # bit_flip
    width = _BIT_VIEWS.get(orig.dtype, (None, 0))[1]
    if width == 0:
        bit_flip_values(orig, torch.zeros(0))  # raises the dtype error
    if bit is not None:
        if not 0 <= bit < width:
            raise NNError(f"bit {bit} is out of range for {orig.dtype} (bits 0..{width - 1})")
        bits = torch.full(orig.shape, bit, dtype=torch.int64)
    else:
        bits = torch.randint(0, width, orig.shape, generator=gen)
        if prob < 1.0:
            hit = torch.rand(orig.shape, generator=gen, dtype=torch.float64) < prob
            bits = torch.where(hit, bits, torch.full_like(bits, -1))
    return bit_flip_values(orig, bits)


def _check_options(kind: str, scale: float, bit: int | None, prob: float) -> None:
    check_perturbation(kind)
    if kind == "gauss_noise" and not scale >= 0:
        raise NNError(f"noise scale must be >= 0, got {scale}: pass --perturb-scale 0.1")
    if kind == "bit_flip" and not 0.0 <= prob <= 1.0:
        raise NNError(f"bit flip probability must be in [0, 1], got {prob}: pass --prob 1.0")
    if bit is not None and (not isinstance(bit, int) or bit < 0):
        raise NNError(f"bit index must be a non-negative integer, got {bit!r}")


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    for table in (model.named_parameters, model.named_buffers):
        for n, t in table():
            if n == name:
                return t
    raise NNError(f"'{name}' is not a parameter of this model: the weight set was made for another model")


@contextlib.contextmanager
def perturbed_tensors(
    tensors: Mapping[str, torch.Tensor],
    indices: Mapping[str, torch.Tensor],
    kind: str,
    *,
    scale: float = 1.0,
    absolute: bool = False,
    bit: int | None = None,
    prob: float = 1.0,
    seed: int = 0,
) -> Iterator[dict]:
    """The engine of :func:`perturbed` on plain tensors: perturb ``tensors[name]`` at the
    flat ``indices[name]`` in place for the block, then write the saved values back."""
    _check_options(kind, scale, bit, prob)
    gen = torch.Generator().manual_seed(seed)
    saved: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]] = []
    changed = total = 0
    try:
        with torch.no_grad():
            for name, idx in indices.items():
                t = tensors[name]
                flat = torch.as_tensor(idx, dtype=torch.long).to(t.device)
                if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= t.numel()):
                    raise NNError(f"index out of range for '{name}' ({t.numel()} entries): "
                                  "the selection was made for another model")
                # Unravelled coordinates index any strided tensor in place (no .view(-1)).
                coords = torch.unravel_index(flat, t.shape)
                orig = t[coords].clone()
                saved.append((t, coords, orig))
                new = _new_values(kind, orig, gen, scale=scale, absolute=absolute, bit=bit,
                                  prob=prob)
                t[coords] = new
                changed += int((_raw(new) != _raw(orig)).sum())
                total += flat.numel()
        yield {"kind": kind, "n_weights": total, "n_changed": changed}
    finally:
        with torch.no_grad():
            for t, coords, orig in reversed(saved):
                t[coords] = orig


@contextlib.contextmanager
def perturbed(
    model: nn.Module,
    weightset: WeightSet,
    kind: str,
    *,
    scale: float = 1.0,
    absolute: bool = False,
    bit: int | None = None,
    prob: float = 1.0,
    seed: int = 0,
    check_id: bool = True,
) -> Iterator[dict]:
    """Apply perturbation ``kind`` to the weights in ``weightset`` for the block, then
    restore them bit for bit (also when the block raises).

    Yields a summary ``{"kind", "n_weights", "n_changed"}``. ``weightset`` is validated
    against ``model`` first (a set made for another model raises :class:`NNError`).

    >>> with perturbed(model, top100, "sign_flip"):
    ...     ppl = evaluate_lm(model, tok, texts, max_length=256)["ppl"]
    """
    _check_options(kind, scale, bit, prob)
    if not isinstance(weightset, WeightSet):
        raise NNError(f"perturbed() needs a WeightSet, not {type(weightset).__name__}")
    weightset.validate(model, check_id=check_id)
    names = weightset.names()
    tensors = {n: _tensor_of(model, n) for n in names}
    with perturbed_tensors(tensors, {n: weightset.indices(n) for n in names}, kind,
                           scale=scale, absolute=absolute, bit=bit, prob=prob,
                           seed=seed) as info:
        yield info


def _raw(x: torch.Tensor) -> torch.Tensor:
    view = _BIT_VIEWS.get(x.dtype)
    return x.view(view[0]) if view is not None else x
