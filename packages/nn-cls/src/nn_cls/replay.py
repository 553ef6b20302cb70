"""Episodic replay: episodes with sparse teacher logits, kept in a seeded reservoir buffer.

An :class:`Episode` is one supervised sequence seen while awake: its real tokens
(``input_ids``, no padding), ``labels`` (-100 = no loss; prompt tokens), the ``task`` id, the
wake ``step``, the teacher's distribution at every supervised position and the episode's
token-mean loss when it was stored (for the scheduler's forgetting term). Supervised
positions are the ``t`` with ``labels[t + 1] != -100`` (the logits at t predict token t+1);
the teacher there is :func:`nn_core.numerics.sparse_logits.top_k` of the wake logits: ``k``
float16 log-probabilities, ``k`` int32 token ids and the float32 log of the remaining mass,
``6k + 4`` bytes per supervised position (196 bytes at k = 32) instead of ``4·V`` for full
float32 logits (196,608 bytes for SmolLM2's V = 49,152: about 1003× less). Episodes come
from the same forward that trains (:func:`episodes_from_batch` takes its logits).

:class:`ReplayBuffer` is a reservoir (Vitter's algorithm R) of fixed ``capacity``: the n-th
episode offered is kept with probability ``capacity / n`` (replacing a uniformly chosen
resident), so at any time the buffer is a uniform sample of everything offered. Every row
of a batch is offered. Sampling is ``uniform`` (without replacement) or ``task_balanced``
(a task drawn uniformly among the resident tasks, then an episode of it). Randomness comes
from the buffer's own seeded generator, saved with :meth:`ReplayBuffer.state_dict`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from nn_core.errors import NNError
from nn_core.numerics.loss import IGNORE_INDEX, causal_labels
from nn_core.numerics.sparse_logits import SparseLogits, top_k

__all__ = ["SAMPLING", "Episode", "ReplayBuffer", "collate_episodes", "episodes_from_batch",
           "full_logits_bytes"]

SAMPLING = ("uniform", "task_balanced")


@dataclass
class Episode:
    input_ids: torch.Tensor  # (n,) long
    labels: torch.Tensor  # (n,) long, -100 = no loss
    task: int
    step: int
    teacher: SparseLogits  # (m, k) at the m supervised positions
    loss: float = float("nan")  # token-mean NLL of the wake forward

    @property
    def positions(self) -> torch.Tensor:
        """The supervised positions t (labels[t + 1] != -100)."""
        return torch.nonzero(self.labels[1:] != IGNORE_INDEX).flatten()

    @property
    def nbytes(self) -> int:
        """Bytes of the episode's tensors (ids, labels, teacher)."""
        return (self.input_ids.numel() * self.input_ids.element_size()
                + self.labels.numel() * self.labels.element_size() + self.teacher.nbytes)

    def state(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "task": self.task,
                "step": self.step, "teacher": self.teacher.state_dict(), "loss": self.loss}

    @classmethod
    def from_state(cls, s: Mapping) -> Episode:
        return cls(s["input_ids"], s["labels"], int(s["task"]), int(s["step"]),
                   SparseLogits.from_state_dict(s["teacher"]), float(s["loss"]))


def full_logits_bytes(episode: Episode, vocab: int, bytes_per_value: int = 4) -> int:
    """What the episode would take with full-vocabulary logits at every position (the seed's
    layout): ids + labels + ``n · V · bytes_per_value``."""
    n = episode.input_ids.numel()
    return (n * episode.input_ids.element_size() + n * episode.labels.element_size()
            + n * vocab * bytes_per_value)


def episodes_from_batch(batch: Mapping[str, torch.Tensor], logits: torch.Tensor, *, task: int,
                        step: int, k: int = 32, temperature: float = 1.0) -> list[Episode]:
    """One :class:`Episode` per row of ``batch`` (right or left padded), the teacher taken from
    ``logits`` (B, T, V) of the forward that trains on this batch (detached here)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labels = causal_labels(batch.get("labels", ids).to(ids.device), mask.to(ids.device))
    logits = logits.detach()
    k = min(k, logits.shape[-1])
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(logits.device),
        ignore_index=IGNORE_INDEX, reduction="none").cpu()
    out = []
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b].cpu() != 0).flatten()
        if real.numel() == 0:
            continue
        lo, hi = int(real[0]), int(real[-1]) + 1
        row_ids = ids[b, lo:hi].cpu()
        row_labels = labels[b, lo:hi].cpu()
        pos = torch.nonzero(row_labels[1:] != IGNORE_INDEX).flatten()
        teacher = top_k(logits[b, lo + pos], k, temperature=temperature).to("cpu")
        loss = float(nll[b, lo + pos].mean()) if pos.numel() else float("nan")
        out.append(Episode(row_ids, row_labels, int(task), int(step), teacher, loss))
    return out


def collate_episodes(episodes: Sequence[Episode], pad_id: int) -> tuple[dict, SparseLogits, torch.Tensor]:
    """``(batch, teacher, kl_mask)``: right-padded ``input_ids``/``attention_mask``/``labels``
    (B, T); the teacher scattered to (B, T − 1, k) positions aligned with ``logits[:, :-1]``;
    ``kl_mask`` (B, T − 1) is 1 at supervised positions. Unsupervised positions hold a
    placeholder distribution (token 0 with probability 1) that the mask excludes."""
    if not episodes:
        raise NNError("no episodes to collate: the replay buffer is empty")
    T = max(int(e.input_ids.numel()) for e in episodes)
    k = episodes[0].teacher.k
    B = len(episodes)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    lab = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    vals = torch.full((B, max(T - 1, 1), k), float("-inf"), dtype=episodes[0].teacher.values.dtype)
    vals[..., 0] = 0.0
    idx = torch.zeros((B, max(T - 1, 1), k), dtype=torch.int32)
    idx[..., :] = torch.arange(k, dtype=torch.int32)
    tail = torch.full((B, max(T - 1, 1)), float("-inf"), dtype=episodes[0].teacher.log_tail.dtype)
    kl_mask = torch.zeros((B, max(T - 1, 1)))
    for b, e in enumerate(episodes):
        if e.teacher.k != k:
            raise NNError(f"episodes hold teachers with different k ({e.teacher.k} vs {k}): "
                          "keep one replay.top_k per buffer")
        n = e.input_ids.numel()
        ids[b, :n] = e.input_ids
        att[b, :n] = 1
        lab[b, :n] = e.labels
        pos = e.positions
        vals[b, pos] = e.teacher.values
        idx[b, pos] = e.teacher.indices
        tail[b, pos] = e.teacher.log_tail
        kl_mask[b, pos] = 1.0
    T1 = T - 1
    teacher = SparseLogits(vals[:, :T1], idx[:, :T1], tail[:, :T1], episodes[0].teacher.temperature)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}, teacher, kl_mask[:, :T1]


class ReplayBuffer:
    """Reservoir buffer of :class:`Episode` (or any objects with a ``task`` attribute)."""

    def __init__(self, capacity: int, *, seed: int = 0, sampling: str = "uniform"):
        if capacity < 1:
            raise NNError(f"replay.capacity must be at least 1, got {capacity}")
        if sampling not in SAMPLING:
            raise NNError(f"replay.sampling must be one of {', '.join(SAMPLING)}, got '{sampling}'")
        self.capacity = int(capacity)
        self.sampling = sampling
        self.items: list = []
        self.seen = 0
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item) -> bool:
        """Offer one item; True when it was kept."""
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return True
        j = self._rng.randrange(self.seen)
        if j < self.capacity:
            self.items[j] = item
            return True
        return False

    def add_batch(self, items: Sequence) -> int:
        """Offer every item (all rows of a batch); returns how many were kept."""
        return sum(self.add(it) for it in items)

    def tasks(self) -> list[int]:
        return sorted({int(it.task) for it in self.items})

    def sample(self, n: int) -> list:
        """``n`` items (fewer if the buffer holds fewer for uniform sampling)."""
        if not self.items:
            raise NNError("the replay buffer is empty: wake on some data before sleeping")
        if self.sampling == "uniform":
            return self._rng.sample(self.items, min(n, len(self.items)))
        by_task: dict[int, list] = {}
        for it in self.items:
            by_task.setdefault(int(it.task), []).append(it)
        keys = sorted(by_task)
        return [self._rng.choice(by_task[self._rng.choice(keys)]) for _ in range(n)]

    def nbytes(self) -> int:
        return sum(getattr(it, "nbytes", 0) for it in self.items)

    def state_dict(self) -> dict:
        items = [it.state() if isinstance(it, Episode) else it for it in self.items]
        return {"capacity": self.capacity, "sampling": self.sampling, "seen": self.seen,
                "rng": self._rng.getstate(), "items": items}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["capacity"]) != self.capacity:
            raise NNError(f"the checkpoint's replay buffer has capacity {state['capacity']}, this run "
                          f"{self.capacity}: resume with the same replay.capacity")
        self.sampling = state["sampling"]
        self.seen = int(state["seen"])
        self._rng.setstate(state["rng"])
        self.items = [Episode.from_state(s) if isinstance(s, Mapping) and "teacher" in s else s
                      for s in state["items"]]
