"""Sparse teacher logits for distillation and replay: top-k log-probabilities plus a tail.

A teacher distribution ``p = softmax(z / T)`` over a vocabulary of ``V`` tokens is kept, per
position, as its ``k`` largest log-probabilities ``log p_i`` (float16), their token ids
(int32) and the log of the remaining mass ``log p_tail = log(1 − Σ_{i∈S} p_i)`` (float32),
computed exactly as ``logsumexp`` of the log-probabilities outside the top-k set ``S``
(``-inf`` when ``k = V``). Log-probabilities, not raw logits, are stored: they are
shift-free (no per-position logsumexp to keep) and the tail bucket needs them anyway.

Size per position: ``2k + 4k + 4`` bytes. For ``k = 32`` that is 196 bytes, against
``49152 × 4 = 196,608`` bytes of full float32 logits for a 49,152-token vocabulary
(SmolLM2): about 1003× smaller.

:func:`sparse_kl` is ``KL(teacher ‖ student)`` on the coarsened support ``S ∪ {tail}``:

    KL = Σ_{i∈S} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)

with ``log q = log_softmax(s / T)`` from the student logits ``s`` and
``log q_tail = log(1 − Σ_{i∈S} q_i) = log1mexp(logsumexp_{i∈S} log q_i)``, computed in log
space (``log1mexp(x) = log(−expm1(x))`` for ``x > −ln 2``, else ``log1p(−exp(x))``). Terms with
``p = 0`` are 0. By the log-sum inequality this never exceeds the full-vocabulary KL and
equals it when ``k = V`` (no tail) or when the student is proportional to the teacher
inside the tail.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from nn_core.errors import NNError

__all__ = ["SparseLogits", "log1mexp", "sparse_kl", "top_k"]

_KEYS = ("values", "indices", "log_tail", "temperature")


@dataclass(frozen=True)
class SparseLogits:
    """Top-k teacher log-probabilities per position (see the module docstring).

    ``values``: ``[..., k]`` log-probabilities ``log softmax(z / temperature)`` of the top-k
    tokens, descending, float16 by default. ``indices``: ``[..., k]`` int32 token ids.
    ``log_tail``: ``[...]`` float32 (float64 if ``values`` are), log of the probability mass outside the top k (``-inf``
    when ``k`` is the vocabulary size). ``temperature``: the ``T`` the teacher was softened
    with; :func:`sparse_kl` applies the same ``T`` to the student.
    """

    values: torch.Tensor
    indices: torch.Tensor
    log_tail: torch.Tensor
    temperature: float = 1.0

    def __post_init__(self):
        if self.values.shape != self.indices.shape:
            raise NNError(f"values {tuple(self.values.shape)} and indices {tuple(self.indices.shape)} "
                          "must have the same shape")
        if self.log_tail.shape != self.values.shape[:-1]:
            raise NNError(f"log_tail shape {tuple(self.log_tail.shape)} must be values' shape "
                          f"without the last dim, {tuple(self.values.shape[:-1])}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise NNError(f"temperature must be a positive number, got {self.temperature}")

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading (position) shape, e.g. ``(batch, seq)``."""
        return tuple(self.values.shape[:-1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.log_tail))

    def log_probs(self) -> torch.Tensor:
        """The stored top-k log-probabilities as float32."""
        return self.values.float()

    def to(self, device) -> SparseLogits:
        return SparseLogits(self.values.to(device), self.indices.to(device),
                            self.log_tail.to(device), self.temperature)

    def __getitem__(self, index) -> SparseLogits:
        """Index the position dims, e.g. ``teacher[:, :-1]``."""
        if not isinstance(index, tuple):
            index = (index,)
        return SparseLogits(self.values[(*index, ...)], self.indices[(*index, ...)],
                            self.log_tail[index], self.temperature)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A dict of tensors (safetensors-compatible): values, indices, log_tail, temperature."""
        return {"values": self.values, "indices": self.indices, "log_tail": self.log_tail,
                "temperature": torch.tensor([self.temperature], dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SparseLogits:
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise NNError(f"not a SparseLogits state dict: missing {', '.join(missing)}")
        return cls(state["values"], state["indices"], state["log_tail"],
                   float(state["temperature"].reshape(-1)[0]))

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically)."""
        from safetensors.torch import save_file

        from nn_core.io import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                      str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> SparseLogits:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not os.path.exists(path):
            raise NNError(f"sparse logits file not found: {path}: check the path")
        try:
            state = load_file(str(path), device=str(device))
        except SafetensorError as err:
            raise NNError(f"{path} is not a safetensors file ({err}): write it with SparseLogits.save") from None
        return cls.from_state_dict(state)


def top_k(logits: torch.Tensor, k: int, *, temperature: float = 1.0,
          dtype: torch.dtype = torch.float16) -> SparseLogits:
    """Keep the top ``k`` of ``log_softmax(logits / temperature)`` per position plus the tail.

    ``logits``: ``[..., vocab]``. Computed in float32 (float64 input stays float64); values
    stored in ``dtype`` (float16 default; float32/64 for exact round trips); ``log_tail`` is
    float32 (float64 when ``dtype`` is float64).
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise NNError("logits must have a non-empty last (vocabulary) dimension")
    vocab = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise NNError(f"k must be an int in 1..{vocab} (the vocabulary size), got {k!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise NNError(f"temperature must be a positive number, got {temperature}")
    with torch.no_grad():
        work = logits.detach()
        work = work.double() if work.dtype == torch.float64 else work.float()
        logp = torch.log_softmax(work / temperature, dim=-1)
        vals, idx = logp.topk(k, dim=-1)
        rest = logp.scatter(-1, idx, float("-inf"))
        log_tail = torch.logsumexp(rest, dim=-1)
        log_tail = log_tail.double() if dtype == torch.float64 else log_tail.float()
    return SparseLogits(vals.to(dtype), idx.to(torch.int32), log_tail, float(temperature))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate over the whole range (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_kl(
    student_logits: torch.Tensor,
    teacher: SparseLogits,
    mask: torch.Tensor | None = None,
    temperature: float | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """``KL(teacher ‖ student)`` over the teacher's top-k support plus one tail bucket.

    ``student_logits``: ``[..., vocab]`` with the same leading shape as ``teacher``
    (aligning positions, e.g. the causal shift, is the caller's job). ``mask``: ``[...]``,
    nonzero for positions that count (padding excluded). ``temperature``: defaults to (and
    must equal) ``teacher.temperature``; the student is softened with it too. No ``T²``
    factor is applied. ``reduction``: ``"mean"`` (default) averages over the real positions,
    ``"sum"`` sums them, ``"none"`` returns per-position values (zero at masked positions).
    The formula is in the module docstring. Differentiable w.r.t. ``student_logits``.
    """
    if temperature is None:
        temperature = teacher.temperature
    if not math.isclose(float(temperature), teacher.temperature, rel_tol=1e-9):
        raise NNError(f"temperature {temperature} differs from the teacher's {teacher.temperature}: "
                      f"build the teacher with top_k(logits, k, temperature={temperature})")
    if reduction not in ("mean", "sum", "none"):
        raise NNError(f"unknown reduction '{reduction}': use mean, sum or none")
    if tuple(student_logits.shape[:-1]) != teacher.shape:
        raise NNError(f"student logits {tuple(student_logits.shape)} do not match the teacher's "
                      f"positions {teacher.shape}: align (shift) them first")
    vocab = student_logits.shape[-1]
    idx = teacher.indices.to(student_logits.device).long()
    if bool((idx >= vocab).any()) or bool((idx < 0).any()):
        raise NNError(f"teacher token ids exceed the student's vocabulary ({vocab}): "
                      "use a teacher with the same tokenizer")
    work = student_logits.double() if student_logits.dtype == torch.float64 else student_logits.float()
    log_q = torch.log_softmax(work / temperature, dim=-1)
    log_q_s = log_q.gather(-1, idx)
    log_p_s = teacher.values.to(log_q.device, log_q.dtype)
    p_s = log_p_s.exp()
    # 0 · log 0 = 0: a teacher probability that underflowed to 0 contributes nothing
    head = torch.where(p_s > 0, p_s * (log_p_s - log_q_s), torch.zeros_like(log_q_s)).sum(-1)

    log_p_tail = teacher.log_tail.to(log_q.device, log_q.dtype)
    has_tail = log_p_tail > float("-inf")
    # log q_tail = log(1 − Σ_S q_i); kept finite (≥ log tiny) so gradients never see inf/nan
    log_mass = torch.logsumexp(log_q_s, dim=-1).clamp(max=-torch.finfo(log_q.dtype).tiny)
    log_mass = torch.where(has_tail, log_mass, torch.full_like(log_mass, -1.0))
    log_q_tail = log1mexp(log_mass)
    safe_log_p_tail = torch.where(has_tail, log_p_tail, torch.zeros_like(log_p_tail))
    tail = torch.where(has_tail, safe_log_p_tail.exp() * (safe_log_p_tail - log_q_tail),
                       torch.zeros_like(log_q_tail))
    kl = head + tail

    if mask is None:
        keep = torch.ones_like(kl, dtype=torch.bool)
    else:
        if tuple(mask.shape) != teacher.shape:
            raise NNError(f"mask shape {tuple(mask.shape)} must equal the positions {teacher.shape}")
        keep = mask.to(kl.device).bool()
    kl = torch.where(keep, kl, torch.zeros_like(kl))
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    n = int(keep.sum())
    if n == 0:
        raise NNError("sparse_kl: the mask has no real positions")
    return kl.sum() / n
