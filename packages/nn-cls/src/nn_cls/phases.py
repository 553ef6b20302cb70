"""Wake, sleep, online EWC, refresh and the sleep-pressure scheduler.

Wake (:func:`wake_step`): one forward of base + hippocampus on a batch; loss = token-mean
NLL on the supervised (response) tokens + the hippocampus' auxiliary routing loss; the
optimizer holds what wakes trains (the hippocampus for CLS; the base's LoRA for the
baselines). The replay episodes are cut from the logits of this same forward.

Sleep (:func:`sleep_step`): the base alone (hippocampus disabled) learns by distillation
toward the sparse teacher, ``KL_S(teacher ‖ base)`` over the teacher's top-k support plus
the tail bucket (:func:`nn_core.numerics.sparse_logits.sparse_kl`; equals the full KL at
k = V), averaged over the supervised positions of a batch mixing ``n_r`` replay episodes
(teacher stored while awake) and ``n_p = round(B · pseudo_ratio)`` pseudo-rehearsal episodes
(replay prompts whose teacher is the current base + hippocampus), plus the EWC penalty.

Online EWC (:class:`OnlineEWC`): ``penalty = (λ/2) Σ_i F_i (θ_i − θ*_i)²`` over the trained
parameters only. After a sleep, ``F ← γ F + F_new`` with ``F_new`` the mean of squared
per-sample (or per-batch) gradients of the base's token-mean log-likelihood on the sleep's
replay + pseudo data (:func:`nn_core.numerics.gradients.squared_grad_mean`), and the anchors
``θ*`` are snapshot.

Refresh (:func:`refresh`): the consolidation criterion is the base's top-1 agreement with the
stored teacher on a replay probe, ``agree = #{t : argmax base_t = argmax teacher_t} / #t`` over
supervised positions; when ``agree ≥ threshold`` the experts that carried more than
``min_share`` of the consolidated tasks' assignments are moved toward their initial weights
by ``factor`` (router rows and usage counters too).

Scheduler (:class:`SleepScheduler`): ``pressure = w_s·saturation + w_f·forgetting +
w_n·novelty`` with every term in [0, 1]:

* saturation = ``clip(Σ_e u_e · drift_e / drift_scale, 0, 1)``, u the hippocampus' running
  usage, drift_e its experts' relative distance from their initial weights;
* novelty = ``clip(loss / mean − 1, 0, 1)``, the wake loss against its running mean (EMA with
  ``novelty_decay``; 0 until the mean exists);
* forgetting = ``clip(mean_probe (loss_now − loss_stored) / loss_stored, 0, 1)``, the base +
  hippocampus loss on a replay probe against each episode's loss when it was stored.

Sleep starts when at least ``min_interval`` wake steps passed and pressure ≥ ``threshold``,
or when ``max_interval`` steps passed; it lasts
``round(min_sleep_steps + (max_sleep_steps − min_sleep_steps) · clip(pressure, 0, 1))`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nn_cls.distributed import backward
from nn_cls.replay import Episode, ReplayBuffer, collate_episodes, episodes_from_batch
from nn_cls.system import CLSSystem
from nn_core.errors import NNError
from nn_core.numerics.gradients import squared_grad_mean
from nn_core.numerics.loss import IGNORE_INDEX, causal_labels
from nn_core.numerics.sparse_logits import sparse_kl

__all__ = ["OnlineEWC", "SchedulerConfig", "SleepScheduler", "agreement", "probe_forgetting",
           "pseudo_pool", "pseudo_rehearsal", "refresh", "sleep_step", "wake_step"]


def _lm_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    ids = batch["input_ids"].to(logits.device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(logits.device)
    labels = causal_labels(batch.get("labels", ids).to(logits.device), mask)[:, 1:]
    n = int((labels != IGNORE_INDEX).sum())
    if n == 0:
        raise NNError("the batch has no supervised tokens: every label is -100 (check the "
                      "response field and max_length)")
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                           ignore_index=IGNORE_INDEX, reduction="sum") / n
    return loss, n


def wake_step(system: CLSSystem, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, *,
              task: int, step: int, replay: ReplayBuffer | None = None, top_k: int = 32,
              hippocampus: bool = True, ewc: OnlineEWC | None = None) -> dict:
    """One wake step (see the module docs); returns its metrics.

    ``ewc`` (the ``ewc`` baseline, which trains the base while awake): its penalty
    ``(λ/2) Σ F (θ − θ*)²`` joins the task loss, ``loss = NLL (+ aux) + penalty``, and one
    backward and one optimizer step train on the sum (no-op before the first Fisher)."""
    h = system.hippocampus
    h.train()
    h.task_id = task
    use_h = hippocampus and system.use_hippocampus
    logits = system.forward(batch, hippocampus=use_h)
    lm, n = _lm_loss(logits, batch)
    loss = lm + h.aux_loss if use_h else lm
    penalty = ewc.penalty() if ewc is not None and ewc.fisher else None
    if penalty is not None:
        loss = loss + penalty.to(loss.device)
    optimizer.zero_grad(set_to_none=True)
    backward(optimizer, loss)  # loss.backward(); fp16 loss scaling under AMP (nn_cls.distributed)
    optimizer.step()
    h.task_id = None
    added = 0
    n_rows = int(batch["input_ids"].shape[0])
    if replay is not None:
        eps = episodes_from_batch(batch, logits, task=task, step=step, k=top_k)
        replay.add_batch(eps)
        added = len(eps)
    total = int(batch["input_ids"].numel())
    out = {"ewc_penalty": float(penalty.detach())} if penalty is not None else {}
    return {**out, "wake_loss": float(lm.detach()), "aux_loss": float(h.aux_loss.detach()) if use_h else 0.0,
            "replay_added_this_step": added, "batch_rows": n_rows,
            "batch_supervised_tokens": n, "batch_supervised_fraction": n / max(total, 1)}


def pseudo_rehearsal(system: CLSSystem, episodes: Sequence[Episode], *, k: int, step: int = 0,
                     chunk: int = 8) -> list[Episode]:
    """``episodes``' prompts relabelled by the current base + hippocampus: one no-grad forward
    per ``chunk`` rows (hippocampus in eval mode, so its usage statistics do not move); each
    new episode keeps its source's tokens, labels and task and gets the top-``k`` teacher of
    that forward at the same supervised positions."""
    out: list[Episode] = []
    if not episodes:
        return out
    was = system.hippocampus.training
    system.hippocampus.eval()
    try:
        for i in range(0, len(episodes), max(int(chunk), 1)):
            part = episodes[i:i + max(int(chunk), 1)]
            batch, _, _ = collate_episodes(part, 0)
            with torch.no_grad():
                logits = system.forward(batch, hippocampus=True)
            new = episodes_from_batch(batch, logits, task=-1, step=step, k=k)
            for e, src in zip(new, part, strict=True):
                e.task = src.task
            out += new
    finally:
        system.hippocampus.train(was)
    return out


def pseudo_pool(system: CLSSystem, replay: ReplayBuffer, steps: int, *, batch_size: int = 8,
                pseudo_ratio: float = 0.25, step: int = 0) -> list[list[Episode]]:
    """The pseudo-rehearsal episodes of a whole sleep of ``steps`` steps, labelled at once:
    ``steps · n_p`` replay prompts (``n_p = round(batch_size · pseudo_ratio)``) drawn from
    ``replay`` and relabelled by :func:`pseudo_rehearsal` with the base + hippocampus as they
    are when the sleep starts (the hippocampus does not change during a sleep); entry ``s``
    is step ``s``'s share, for ``sleep_step(..., pseudo=pool[s])``."""
    if not 0.0 <= pseudo_ratio <= 1.0:
        raise NNError(f"consolidation.pseudo_ratio must be in [0, 1], got {pseudo_ratio}")
    n_p = round(batch_size * pseudo_ratio)
    if n_p == 0 or steps < 1 or not len(replay):
        return [[] for _ in range(max(steps, 0))]
    k = replay.items[0].teacher.k
    src = [e for _ in range(steps) for e in replay.sample(n_p)]
    eps = pseudo_rehearsal(system, src, k=k, step=step, chunk=max(batch_size, n_p))
    return [eps[s * n_p:(s + 1) * n_p] for s in range(steps)]


def sleep_step(system: CLSSystem, replay: ReplayBuffer, optimizer: torch.optim.Optimizer, *,
               batch_size: int = 8, pseudo_ratio: float = 0.25, ewc: OnlineEWC | None = None,
               pad_id: int = 0, step: int = 0,
               pseudo: Sequence[Episode] | None = None) -> tuple[dict, list[Episode]]:
    """One sleep step; returns its metrics and the episodes it used (for the Fisher).

    ``pseudo``: this step's pseudo-rehearsal episodes, already labelled (:func:`pseudo_pool`
    labels a whole sleep in one pass); ``None`` labels ``n_p`` fresh replay prompts here with
    one extra no-grad forward. The student forward runs with the hippocampus hook disabled
    (base only); the loss is ``KL_S + (λ/2) Σ F (θ − θ*)²`` with one backward."""
    if not 0.0 <= pseudo_ratio <= 1.0:
        raise NNError(f"consolidation.pseudo_ratio must be in [0, 1], got {pseudo_ratio}")
    n_p = round(batch_size * pseudo_ratio) if pseudo is None else len(pseudo)
    n_r = batch_size - n_p
    real = replay.sample(n_r) if n_r > 0 else []
    if pseudo is None:
        k = replay.items[0].teacher.k
        pseudo = pseudo_rehearsal(system, replay.sample(n_p), k=k, step=step) if n_p else []
    mix = real + list(pseudo)
    batch, teacher, kl_mask = collate_episodes(mix, pad_id)
    logits = system.forward(batch, hippocampus=False)
    kl = sparse_kl(logits[:, :-1], teacher.to(logits.device), kl_mask.to(logits.device))
    penalty = ewc.penalty() if ewc is not None else None
    loss = kl + penalty if penalty is not None else kl
    optimizer.zero_grad(set_to_none=True)
    backward(optimizer, loss)  # loss.backward(); fp16 loss scaling under AMP (nn_cls.distributed)
    optimizer.step()
    return ({"sleep_kl": float(kl.detach()), "ewc_penalty": float(penalty.detach()) if penalty is not None else 0.0,
             "replay_batch_size_sleep": len(real), "pseudo_batch_size": len(pseudo),
             "sleep_mix_ratio_pseudo": len(pseudo) / max(len(mix), 1)}, mix)


class OnlineEWC:
    """Online EWC over ``params`` (``{name: parameter}``, the parameters the base trains).

    Fisher diagonal and anchors live in two flat float32 buffers (one entry per trained
    scalar, parameters concatenated in ``params`` order); :attr:`fisher` and :attr:`anchors`
    are per-parameter views of them (edit them in place, or the whole buffer through
    :attr:`flat_fisher`, e.g. a data-parallel average). :meth:`penalty` is then one fused expression
    ``(λ/2) · Σ F ⊙ (θ − θ*)²`` over the concatenated parameters, not a Python loop of
    small kernels per tensor (whose backward would be as long again).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], *, lam: float = 1.0,
                 gamma: float = 0.9, per_sample: bool = True):
        if not 0.0 <= gamma <= 1.0:
            raise NNError(f"consolidation.ewc_gamma must be in [0, 1], got {gamma}")
        self.params = {n: p for n, p in params.items() if p.requires_grad}
        if not self.params:
            raise NNError("EWC needs trainable parameters: the base has none (check the sleep method)")
        self.lam, self.gamma, self.per_sample = float(lam), float(gamma), bool(per_sample)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self._flat_f: torch.Tensor | None = None
        self._flat_a: torch.Tensor | None = None
        self.updates = 0

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        views, o = {}, 0
        for n, p in self.params.items():
            views[n] = flat[o:o + p.numel()].view(p.shape)
            o += p.numel()
        return views

    @property
    def flat_fisher(self) -> torch.Tensor | None:
        """The Fisher diagonal as one flat float32 buffer (``None`` before the first update);
        :attr:`fisher` holds views of it."""
        return self._flat_f

    def _set(self, fisher: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor]) -> None:
        dev = next(iter(self.params.values())).device
        self._flat_f = torch.cat([fisher[n].reshape(-1).to(dev, torch.float32) for n in self.params])
        self._flat_a = torch.cat([anchors[n].reshape(-1).to(dev, torch.float32) for n in self.params])
        self.fisher, self.anchors = self._views(self._flat_f), self._views(self._flat_a)

    def penalty(self) -> torch.Tensor:
        """``(λ/2) Σ_i F_i (θ_i − θ*_i)²`` (differentiable w.r.t. the parameters; 0 before the
        first :meth:`update`)."""
        if self._flat_f is None:
            return torch.zeros((), device=next(iter(self.params.values())).device)
        theta = torch.cat([p.reshape(-1) for p in self.params.values()]).float()
        d = theta - self._flat_a
        return 0.5 * self.lam * torch.dot(self._flat_f * d, d)

    def update(self, system: CLSSystem, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict:
        """``F ← γ F + F_new`` on ``batches`` (base only), then snapshot the anchors."""
        with system.base_only():
            stats = squared_grad_mean(system.model, self.params, batches, per_sample=self.per_sample)
        new = stats.as_dict()
        fisher = {n: (self.gamma * self.fisher[n] + new[n].to(self.fisher[n].device)) if self.fisher else new[n]
                  for n in self.params}
        self._set(fisher, {n: p.detach() for n, p in self.params.items()})
        self.updates += 1
        return {"fisher_units": stats.n_units, "fisher_per_sample": self.per_sample,
                "fisher_mean": float(self._flat_f.mean())}

    def state_dict(self) -> dict:
        return {"fisher": dict(self.fisher), "anchors": dict(self.anchors), "updates": self.updates,
                "lam": self.lam, "gamma": self.gamma, "per_sample": self.per_sample}

    def load_state_dict(self, state: Mapping) -> None:
        missing = set(state["fisher"]) ^ set(self.params) if state["fisher"] else set()
        if missing:
            raise NNError(f"the checkpoint's EWC state names other parameters than this run trains "
                          f"({sorted(missing)[:3]}...): resume with the same config")
        if state["fisher"]:
            self._set(state["fisher"], state["anchors"])
        else:
            self.fisher, self.anchors, self._flat_f, self._flat_a = {}, {}, None, None
        self.updates = int(state["updates"])


@torch.no_grad()
def agreement(system: CLSSystem, episodes: Sequence[Episode], pad_id: int = 0) -> float:
    """Top-1 agreement of the base alone with the stored teachers (supervised positions)."""
    batch, teacher, kl_mask = collate_episodes(episodes, pad_id)
    logits = system.forward(batch, hippocampus=False)[:, :-1]
    hit = (logits.argmax(-1).cpu() == teacher.indices[..., 0].long()).float()
    return float((hit * kl_mask).sum() / kl_mask.sum().clamp(min=1))


@torch.no_grad()
def probe_forgetting(system: CLSSystem, episodes: Sequence[Episode], pad_id: int = 0) -> float:
    """``clip(mean (loss_now − loss_stored) / loss_stored, 0, 1)`` over ``episodes``."""
    rel = []
    for e in episodes:
        if not math.isfinite(e.loss) or e.loss <= 0:
            continue
        batch, _, _ = collate_episodes([e], pad_id)
        logits = system.forward(batch, hippocampus=True)
        now, _ = _lm_loss(logits, batch)
        rel.append((float(now) - e.loss) / e.loss)
    return min(max(sum(rel) / len(rel), 0.0), 1.0) if rel else 0.0


def refresh(system: CLSSystem, probe: Sequence[Episode], tasks: Sequence[int], *, threshold: float = 0.6,
            factor: float = 0.5, min_share: float = 0.05, pad_id: int = 0, reduce=None) -> dict:
    """Refresh experts after a sleep when the base agrees with the teacher (module docs).
    ``reduce`` (data parallel): maps this process' agreement to the mean over processes, so
    every process takes the same decision."""
    agree = agreement(system, probe, pad_id) if probe else 0.0
    if reduce is not None:
        agree = reduce(agree)
    info = {"refresh_agreement": agree, "refresh_threshold": threshold, "refreshed_experts": [],
            "refresh_reason": ""}
    if agree < threshold:
        info["refresh_reason"] = f"agreement {agree:.3f} < threshold {threshold}"
        return info
    experts = system.hippocampus.experts_for_tasks(tasks, min_share)
    system.hippocampus.reset_experts(experts, factor)
    info["refreshed_experts"] = experts
    info["refresh_reason"] = (f"agreement {agree:.3f} >= {threshold}: experts carrying > {min_share:.0%} "
                              f"of tasks {list(tasks)} moved {factor:.0%} toward init")
    return info


@dataclass
class SchedulerConfig:
    w_saturation: float = 1.0
    w_forgetting: float = 1.0
    w_novelty: float = 1.0
    threshold: float = 0.5
    min_interval: int = 10
    max_interval: int = 50
    min_sleep_steps: int = 2
    max_sleep_steps: int = 8
    drift_scale: float = 1.0
    novelty_decay: float = 0.9

    def check(self) -> None:
        if not 1 <= self.min_interval <= self.max_interval:
            raise NNError(f"scheduler needs 1 <= min_interval <= max_interval, got "
                          f"{self.min_interval} and {self.max_interval}")
        if not 0 <= self.min_sleep_steps <= self.max_sleep_steps:
            raise NNError("scheduler needs 0 <= min_sleep_steps <= max_sleep_steps")


class SleepScheduler:
    """Decides when to sleep and for how long (module docs)."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.config.check()
        self.loss_mean: float | None = None
        self.since_sleep = 0
        self.last_novelty = 0.0

    def observe_wake(self, loss: float) -> float:
        """Count a wake step and update novelty from its loss; returns the novelty."""
        self.since_sleep += 1
        if self.loss_mean is None or not math.isfinite(self.loss_mean):
            nov = 0.0
            self.loss_mean = loss
        else:
            nov = min(max(loss / max(self.loss_mean, 1e-8) - 1.0, 0.0), 1.0)
            d = self.config.novelty_decay
            self.loss_mean = d * self.loss_mean + (1 - d) * loss
        self.last_novelty = nov
        return nov

    def saturation(self, system: CLSSystem) -> float:
        h = system.hippocampus
        s = float((h.usage.detach().cpu() * h.drift()).sum()) / self.config.drift_scale
        return min(max(s, 0.0), 1.0)

    def decide(self, *, saturation: float, forgetting: float, novelty: float | None = None) -> dict:
        c = self.config
        nov = self.last_novelty if novelty is None else novelty
        pressure = c.w_saturation * saturation + c.w_forgetting * forgetting + c.w_novelty * nov
        sleep = (self.since_sleep >= c.min_interval and pressure >= c.threshold) or \
            self.since_sleep >= c.max_interval
        steps = round(c.min_sleep_steps + (c.max_sleep_steps - c.min_sleep_steps) * min(max(pressure, 0.0), 1.0))
        why = ("max_interval" if self.since_sleep >= c.max_interval else "pressure") if sleep else ""
        return {"sleep": sleep, "sleep_steps": steps if sleep else 0, "pressure": pressure,
                "saturation": saturation, "forgetting": forgetting, "novelty": nov, "reason": why}

    def slept(self) -> None:
        self.since_sleep = 0

    def state_dict(self) -> dict:
        return {"loss_mean": self.loss_mean, "since_sleep": self.since_sleep, "last_novelty": self.last_novelty}

    def load_state_dict(self, s: Mapping) -> None:
        self.loss_mean, self.since_sleep, self.last_novelty = s["loss_mean"], int(s["since_sleep"]), s["last_novelty"]
