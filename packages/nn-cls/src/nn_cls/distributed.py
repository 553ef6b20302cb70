"""Process and precision context of an nn-cls run: data parallel under ``accelerate launch`` and AMP.

:func:`runtime` returns a :class:`Runtime`. Without a launcher (``WORLD_SIZE`` unset or 1)
and with ``mixed_precision="no"`` it is the *plain* runtime: every method is the identity
(reductions return their argument, :meth:`Runtime.wrap` returns the optimizer itself,
autocast is a null context), so a single-process fp32 run computes exactly what it did
before this module existed.

**Data parallel** (``accelerate launch --multi_gpu --num_processes N -m nn_cls.cli train ...``,
or ``torchrun``): the processes join accelerate's process group (``PartialState``: gloo on
CPU, NCCL on CUDA, each process on its own GPU ``cuda:<local rank>``). The engine then gives
every rank its own shard of the stream (each wake step draws one global batch of
``N · batch_size`` rows with the shared stream generator; rank r trains on rows
``r·batch_size … (r+1)·batch_size − 1``) and its own replay buffer (fed by its own wake
rows, seeded per rank). Every optimizer is wrapped in :class:`SyncedOptimizer`, which
all-reduces (mean over ranks) the gradients of its parameters before each step, so every
rank applies the same update: the hippocampus/router awake, the base's LoRA asleep.
Parameters start identical (broadcast from rank 0) and stay identical.

Why not ``Accelerator.prepare`` (DDP): DDP fixes the set of trainable parameters when it
wraps the model, while CLS alternates between two disjoint trainable sets (hippocampus
awake, LoRA asleep, with ``requires_grad`` toggled between them), and the hippocampus sits
in a forward hook outside the wrapped module. The gradient all-reduce is therefore explicit
(:func:`accelerate.utils.reduce`, one flat tensor per step); the process group, device
placement and collectives are accelerate's. Also, ``Accelerator``'s mixed-precision state
is a process-wide singleton that cannot change between runs in one process (a suite, the
tests), so AMP uses ``torch.autocast`` and ``torch.amp.GradScaler`` directly.

Everything that decides control flow is computed from reduced quantities, so ranks never
diverge in when they sleep, for how long, or whether they refresh: the wake loss (novelty)
and the forgetting probe are averaged over ranks; the hippocampus' usage statistics are
synchronised (:meth:`Runtime.sync_hippocampus`: the usage EMA becomes the mean over ranks,
the assignment counters add every rank's increments); the refresh agreement is averaged;
the EWC Fisher is the unit-weighted mean of the ranks' Fishers
(:meth:`Runtime.average_fisher`). Boundary evaluation: each rank evaluates a shard of every
seen task's evaluation set (examples ``r, r+N, …``) and the sums (hits, loss, tokens) are
all-reduced, so every example is counted once and every rank holds the same A and L.

**AMP** (``mixed_precision``): ``bf16`` or ``fp16`` autocast of every model forward (the
logits are returned as float32 for the losses); ``fp16`` needs CUDA and uses a
``GradScaler`` (:meth:`SyncedOptimizer.backward` scales the loss, the step unscales, skips
steps with non-finite gradients and updates the scale; the scale is identical on all ranks
because the check runs after the all-reduce). ``bf16`` works on CPU too (autocast to
bfloat16 on CPU); the trained parameters stay float32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence

import torch

from nn_core.errors import NNError

__all__ = ["MIXED_PRECISION", "Runtime", "SyncedOptimizer", "backward", "check_mixed_precision", "launched_rank",
           "launched_world_size", "runtime"]

MIXED_PRECISION = ("no", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def launched_world_size() -> int:
    """Processes of the launch this process belongs to (``WORLD_SIZE`` set by ``accelerate
    launch``/``torchrun``; 1 without a launcher)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process' rank in the launch (``RANK``; 0 without a launcher): before the process
    group exists, rank 0 is the one process that writes files."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def check_mixed_precision(mixed_precision: str, device: torch.device | str) -> None:
    """One :class:`NNError` line for a mixed precision this device cannot run."""
    if mixed_precision not in MIXED_PRECISION:
        raise NNError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got "
                      f"'{mixed_precision}'")
    if mixed_precision == "fp16" and torch.device(device).type != "cuda":
        raise NNError(f"train.mixed_precision=fp16 needs a CUDA device (the model is on "
                      f"{torch.device(device).type}): use train.mixed_precision=bf16 or no")


class Runtime:
    """Rank, world size, device, autocast and the collectives an nn-cls run uses."""

    def __init__(self, state=None, *, mixed_precision: str = "no", device: torch.device | None = None):
        self.state = state  # accelerate PartialState when world_size > 1
        self.world_size = int(state.num_processes) if state is not None else 1
        self.rank = int(state.process_index) if state is not None else 0
        self.is_main = self.rank == 0
        self.mixed_precision = mixed_precision
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.amp_dtype = _AMP_DTYPES.get(mixed_precision)
        self.scaler = (torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def plain(self) -> bool:
        """Single process, fp32: every method is the identity."""
        return not self.distributed and self.amp_dtype is None

    # ------------------------------------------------------------------ precision
    def autocast(self):
        """``torch.autocast`` to the AMP dtype on the run's device type (a null context
        without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ collectives
    def _reduce(self, t: torch.Tensor, how: str) -> torch.Tensor:
        from accelerate.utils import reduce

        comm = self._comm_device()
        return reduce(t.to(comm), reduction=how).to(t.device)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def reduce_floats(self, values: Sequence[float], how: str = "mean") -> list[float]:
        """``values`` summed (``how="sum"``) or averaged (``"mean"``) over ranks, in one
        all-reduce (float64)."""
        if not self.distributed or not values:
            return list(values)
        t = self._reduce(torch.tensor([float(v) for v in values], dtype=torch.float64), how)
        return [float(x) for x in t]

    def mean(self, value: float) -> float:
        return self.reduce_floats([value])[0] if self.distributed else value

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank."""
        if not self.distributed:
            return bool(flag)
        return self.reduce_floats([1.0 if flag else 0.0], "sum")[0] >= self.world_size - 0.5

    def reduce_metrics(self, m: dict, *, sums: Iterable[str] = ()) -> dict:
        """``m`` with its numeric entries reduced over ranks: the keys in ``sums`` summed
        (counts), every other int/float averaged (losses, fractions); others untouched."""
        if not self.distributed:
            return m
        sums = set(sums)
        keys = [k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summed = self.reduce_floats([m[k] if k in sums else m[k] / self.world_size for k in keys], "sum")
        out = dict(m)
        for k, v in zip(keys, summed, strict=True):
            out[k] = round(v) if isinstance(m[k], int) and k in sums else v
        return out

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        if not self.distributed:
            return
        from accelerate.utils import broadcast

        with torch.no_grad():
            for t in tensors:
                t.copy_(broadcast(t.detach().to(self._comm_device()).contiguous(), from_process=0).to(t.device))

    def gather_object(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, …]`` on every rank."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def barrier(self) -> None:
        if self.distributed:
            self.state.wait_for_everyone()

    # ------------------------------------------------------------------ training state
    def wrap(self, optimizer: torch.optim.Optimizer):
        """``optimizer`` itself for the plain runtime, else a :class:`SyncedOptimizer`."""
        return optimizer if self.plain else SyncedOptimizer(optimizer, self)

    def hippocampus_snapshot(self, hippocampus) -> dict:
        """The counters :meth:`sync_hippocampus` measures increments from (take it once the
        ranks agree, e.g. after setup or resume)."""
        if not self.distributed:
            return {}
        return {"usage_count": hippocampus.usage_count.detach().clone(),
                "task_usage": hippocampus.task_usage.detach().clone()}

    def sync_hippocampus(self, hippocampus, since: Mapping[str, torch.Tensor] | None) -> dict:
        """Make the hippocampus' statistics identical on every rank; returns the snapshot to
        pass next time. ``usage`` (an EMA over assignment fractions) becomes the mean over
        ranks; ``usage_count`` and ``task_usage`` (counters) become their value at the last
        sync plus the sum of every rank's increments since (``since``: that snapshot)."""
        if not self.distributed:
            return {}
        with torch.no_grad():
            h = hippocampus
            h.usage.copy_(self._reduce(h.usage, "mean"))
            for name in ("usage_count", "task_usage"):
                cur = getattr(h, name)
                old = (since or {}).get(name)
                if old is None or old.shape != cur.shape:
                    old = torch.zeros_like(cur) if old is None else _pad_rows(old, cur.shape[0])
                cur.copy_(old + self._reduce(cur - old, "sum"))
        return self.hippocampus_snapshot(h)

    def average_fisher(self, ewc, units: int) -> dict:
        """After every rank's ``OnlineEWC.update``: each Fisher tensor becomes
        ``Σ_r n_r F_r / Σ_r n_r`` (n_r the rank's units). Since ``F_r = γ F_old + F_new,r``
        with ``F_old`` identical on all ranks, this is ``γ F_old`` plus the unit-weighted
        mean of the new Fishers: the Fisher of all ranks' data. Returns the EWC record's
        ``fisher_units`` (all ranks) and ``fisher_mean``."""
        if not self.distributed:
            raise RuntimeError("average_fisher is for data-parallel runs")
        total = self.reduce_floats([units], "sum")[0]
        flat = ewc.flat_fisher  # one all-reduce for every parameter's Fisher
        with torch.no_grad():
            flat.copy_(self._reduce(flat * units, "sum") / max(total, 1.0))
        return {"fisher_units": round(total), "fisher_mean": float(flat.mean())}


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class SyncedOptimizer:
    """An optimizer whose :meth:`step` first all-reduces (mean over ranks) the gradients of
    its parameters, with optional fp16 loss scaling (:meth:`backward`).

    A parameter whose gradient is ``None`` on every rank keeps ``None`` (AdamW skips it, as
    in one process); one that has a gradient on some rank only gets zeros on the others
    before the reduction. The all-reduce is one flat tensor per step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rt: Runtime):
        self.optimizer = optimizer
        self.rt = rt

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the loss scaled by the fp16 ``GradScaler`` when there is one."""
        (self.rt.scaler.scale(loss) if self.rt.scaler is not None else loss).backward()

    def sync_grads(self) -> None:
        rt = self.rt
        if not rt.distributed:
            return
        params = self._params()
        has = rt.reduce_floats([0.0 if p.grad is None else 1.0 for p in params], "sum")
        live = [p for p, h in zip(params, has, strict=True) if h > 0]
        if not live:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        flat = rt._reduce(flat, "mean")
        i = 0
        for p, g in zip(live, grads, strict=True):
            n = g.numel()
            p.grad = flat[i:i + n].view_as(p).to(p.dtype)
            i += n

    def step(self) -> None:
        self.sync_grads()
        if self.rt.scaler is not None:
            self.rt.scaler.step(self.optimizer)
            self.rt.scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.optimizer.load_state_dict(state)


def backward(optimizer, loss: torch.Tensor) -> None:
    """``optimizer.backward(loss)`` for a :class:`SyncedOptimizer` (fp16 loss scaling), else
    ``loss.backward()``."""
    if isinstance(optimizer, SyncedOptimizer):
        optimizer.backward(loss)
    else:
        loss.backward()


_registered_exit = False


def _destroy_at_exit() -> None:
    """End the process group when the process exits, so no rank leaves while gloo's threads
    still run ('terminate called without an active exception'). No barrier there: a rank
    that failed must not wait for the others (they fail on their next collective)."""
    global _registered_exit
    if _registered_exit:
        return
    import atexit

    import torch.distributed as dist

    def close() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(close)
    _registered_exit = True


def runtime(model: torch.nn.Module, mixed_precision: str = "no") -> Runtime:
    """The :class:`Runtime` of a run on ``model``: the plain runtime without a launcher and
    AMP; else, under ``accelerate launch``/``torchrun``, accelerate's process state (gloo when
    the model is on CPU, NCCL on CUDA) with the model moved to this rank's device."""
    p = next(model.parameters())
    check_mixed_precision(mixed_precision, p.device)
    if launched_world_size() <= 1:
        return Runtime(None, mixed_precision=mixed_precision, device=p.device)
    devices = {str(d) for d in getattr(model, "hf_device_map", {}).values()}
    if len(devices) > 1:
        raise NNError("data parallel needs the model on one device per process, but it is spread over "
                      f"{sorted(devices)} (device_map): load it on one device (model.device=auto or cuda)")
    from accelerate import PartialState

    state = PartialState(cpu=p.device.type == "cpu")
    _destroy_at_exit()
    device = state.device if p.device.type != "cpu" else torch.device("cpu")
    if p.device != device:
        model.to(device)
    return Runtime(state, mixed_precision=mixed_precision, device=device)
