"""The continual-learning engine: one loop over a task stream for CLS, its ablations and baselines.

A method is the set of parts that are on (:data:`METHODS`):

==================  ===========  =====================  =====  =====  =======
method              hippocampus  wake trains            sleep  EWC    refresh
==================  ===========  =====================  =====  =====  =======
``full_cls``        yes          hippocampus            yes    yes    yes
``no_sleep``        yes          hippocampus            no     no     no
``no_ewc``          yes          hippocampus            yes    no     yes
``no_refresh``      yes          hippocampus            yes    yes    no
``no_hippocampus``  no           base (LoRA)            yes    yes    no
``naive``           no           base (LoRA)            no     no     no
``replay``          no           base (LoRA) + replay   no     no     no
``ewc``             no           base (LoRA) + EWC      no     yes    no
==================  ===========  =====================  =====  =====  =======

``replay`` adds, after every wake step, an LM step on a replay sample of the batch size;
``ewc`` adds the EWC penalty to the wake loss and updates the Fisher on replay at every task
boundary. The sleep methods sleep when the :class:`~nn_cls.phases.SleepScheduler` says so
and at every task boundary. At each boundary all seen tasks are evaluated (token accuracy
and loss on the supervised tokens, with the token count) into the A and L matrices, and
:func:`nn_eval.continual.cl_metrics` gives the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import (
    OnlineEWC,
    SchedulerConfig,
    SleepScheduler,
    probe_forgetting,
    refresh,
    sleep_step,
    wake_step,
)
from nn_cls.replay import ReplayBuffer, collate_episodes
from nn_cls.system import CLSSystem
from nn_core.data.batching import collate
from nn_core.data.chat import tokenize_examples
from nn_core.data.instructions import Example
from nn_core.errors import NNError
from nn_core.numerics.loss import IGNORE_INDEX, causal_labels
from nn_core.train.config import SFTConfig
from nn_core.train.lora import prepare_model
from nn_eval.continual import cl_metrics
from nn_eval.tasks import make_split

__all__ = ["METHODS", "EngineConfig", "run_stream"]

METHODS: dict[str, dict[str, bool]] = {
    "full_cls": dict(hippocampus=True, sleep=True, ewc=True, refresh=True, replay_steps=False),
    "no_sleep": dict(hippocampus=True, sleep=False, ewc=False, refresh=False, replay_steps=False),
    "no_ewc": dict(hippocampus=True, sleep=True, ewc=False, refresh=True, replay_steps=False),
    "no_refresh": dict(hippocampus=True, sleep=True, ewc=True, refresh=False, replay_steps=False),
    "no_hippocampus": dict(hippocampus=False, sleep=True, ewc=True, refresh=False, replay_steps=False),
    "naive": dict(hippocampus=False, sleep=False, ewc=False, refresh=False, replay_steps=False),
    "replay": dict(hippocampus=False, sleep=False, ewc=False, refresh=False, replay_steps=True),
    "ewc": dict(hippocampus=False, sleep=False, ewc=True, refresh=False, replay_steps=False),
}


@dataclass
class EngineConfig:
    method: str = "full_cls"
    tasks: tuple[str, ...] = ("uppercase", "first_letters", "reverse_words")
    n_train: int = 64
    n_eval: int = 16
    max_length: int = 96
    steps_per_task: int = 20
    batch_size: int = 4
    lr_wake: float = 1e-3
    lr_sleep: float = 1e-3
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("down_proj",)
    top_k: int = 32
    replay_capacity: int = 256
    replay_sampling: str = "uniform"
    sleep_batch_size: int = 4
    pseudo_ratio: float = 0.25
    ewc_lambda: float = 100.0
    ewc_gamma: float = 0.9
    refresh_threshold: float = 0.6
    refresh_factor: float = 0.5
    probe_size: int = 8
    injection_fraction: float = 0.7
    head_only: bool = False
    seed: int = 0
    experts: HippocampusConfig = field(default_factory=HippocampusConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def check(self) -> None:
        if self.method not in METHODS:
            raise NNError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if len(self.tasks) < 2:
            raise NNError(f"a continual stream needs at least 2 tasks, got {list(self.tasks)}")
        if self.steps_per_task < 1 or self.batch_size < 1:
            raise NNError("steps_per_task and batch_size must be at least 1")


def _features(tok, task: str, cfg: EngineConfig) -> tuple[list, list]:
    split = make_split(task, cfg.n_train, cfg.n_eval, seed=cfg.seed)
    out = []
    for part in ("train", "eval"):
        ex = [Example(prompt=f"{r['instruction']}\n{r['input']}".strip(), response=r["output"])
              for r in split[part]]
        feats = tokenize_examples(tok, ex, cfg.max_length)
        if not any(any(v != IGNORE_INDEX for v in f["labels"]) for f in feats):
            raise NNError(f"task '{task}' has no supervised tokens after tokenization: raise max_length")
        out.append(list(feats))
    return out[0], out[1]


@torch.no_grad()
def evaluate(system: CLSSystem, feats: list, pad_id: int, batch_size: int = 8) -> tuple[float, float, int]:
    """(token accuracy, token-mean loss, tokens) on the supervised tokens of ``feats``."""
    hits = loss = 0.0
    n = 0
    for i in range(0, len(feats), batch_size):
        batch = collate(feats[i:i + batch_size], pad_id)
        logits = system.forward(batch, hippocampus=True)[:, :-1].float()
        labels = causal_labels(batch["labels"], batch["attention_mask"])[:, 1:].to(logits.device)
        keep = labels != IGNORE_INDEX
        loss += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                      reduction="sum"))
        hits += float(((logits.argmax(-1) == labels) & keep).sum())
        n += int(keep.sum())
    return (hits / n, loss / n, n) if n else (math.nan, math.nan, 0)


def run_stream(cfg: EngineConfig, model, tok, *, log=None) -> dict:
    """Run ``cfg.method`` over ``cfg.tasks``; returns A, L, counts, ``cl_metrics`` and history."""
    cfg.check()
    parts = METHODS[cfg.method]
    torch.manual_seed(cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    data = [_features(tok, t, cfg) for t in cfg.tasks]
    for p in model.parameters():
        p.requires_grad_(False)
    system = CLSSystem(model, cfg.experts, injection_fraction=cfg.injection_fraction,
                       head_only=cfg.head_only, seed=cfg.seed, use_hippocampus=parts["hippocampus"])
    system.model = prepare_model(system.model, SFTConfig(method="lora", lora_r=cfg.lora_r,
                                                         target_modules=list(cfg.lora_targets),
                                                         seed=cfg.seed))
    base_params = {n: p for n, p in system.model.named_parameters() if p.requires_grad}
    if parts["hippocampus"]:
        for p in base_params.values():
            p.requires_grad_(False)
        wake_opt = torch.optim.AdamW(system.hippocampus.parameters(), lr=cfg.lr_wake)
    else:
        wake_opt = torch.optim.AdamW(base_params.values(), lr=cfg.lr_wake)
    sleep_opt = torch.optim.AdamW(base_params.values(), lr=cfg.lr_sleep)
    replay = ReplayBuffer(cfg.replay_capacity, seed=cfg.seed, sampling=cfg.replay_sampling)
    with torch.enable_grad():
        for p in base_params.values():
            p.requires_grad_(True)
        ewc = OnlineEWC(base_params, lam=cfg.ewc_lambda, gamma=cfg.ewc_gamma) if parts["ewc"] else None
        if parts["hippocampus"]:
            for p in base_params.values():
                p.requires_grad_(False)
    sched = SleepScheduler(cfg.scheduler)
    T = len(cfg.tasks)
    A = [[math.nan] * T for _ in range(T)]
    L = [[math.nan] * T for _ in range(T)]
    C = [[math.nan] * T for _ in range(T)]
    history: list[dict] = []
    step = 0
    gen = torch.Generator().manual_seed(cfg.seed)

    def emit(rec):
        history.append(rec)
        if log is not None:
            log(rec)

    def do_sleep(n_steps: int, tasks_done: list[int], reason: str) -> None:
        if not len(replay):
            return
        for p in base_params.values():
            p.requires_grad_(True)
        mix = []
        for s in range(n_steps):
            m, mix = sleep_step(system, replay, sleep_opt, batch_size=cfg.sleep_batch_size,
                                pseudo_ratio=cfg.pseudo_ratio, ewc=ewc, pad_id=pad_id, step=step)
            emit({"phase": "sleep", "step": step, "sleep_step": s, "reason": reason, **m})
        if ewc is not None and mix:
            info = ewc.update(system, [collate_episodes(mix, pad_id)[0]])
            emit({"phase": "ewc", "step": step, **info})
        if parts["hippocampus"]:
            for p in base_params.values():
                p.requires_grad_(False)
        if parts["refresh"]:
            info = refresh(system, replay.sample(cfg.probe_size), tasks_done,
                           threshold=cfg.refresh_threshold, factor=cfg.refresh_factor, pad_id=pad_id)
            emit({"phase": "refresh", "step": step, **info})
        sched.slept()

    for i, (train, _) in enumerate(data):
        for _ in range(cfg.steps_per_task):
            pick = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
            batch = collate([train[j] for j in pick], pad_id)
            pen_opt = wake_opt
            m = wake_step(system, batch, pen_opt, task=i, step=step, replay=replay, top_k=cfg.top_k,
                          hippocampus=parts["hippocampus"])
            if parts["replay_steps"] and len(replay) > cfg.batch_size:
                rb = collate_episodes(replay.sample(cfg.batch_size), pad_id)[0]
                m["replay_loss"] = wake_step(system, rb, wake_opt, task=i, step=step,
                                             hippocampus=False)["wake_loss"]
            if ewc is not None and not parts["sleep"] and ewc.fisher:
                wake_opt.zero_grad(set_to_none=True)
                ewc.penalty().backward()
                wake_opt.step()
            m["novelty"] = sched.observe_wake(m["wake_loss"])
            emit({"phase": "wake", "step": step, "task": cfg.tasks[i], **m})
            step += 1
            if parts["sleep"]:
                d = sched.decide(saturation=sched.saturation(system) if parts["hippocampus"] else 0.0,
                                 forgetting=probe_forgetting(system, replay.sample(min(2, len(replay))), pad_id)
                                 if len(replay) else 0.0)
                if d["sleep"]:
                    emit({"phase": "schedule", "step": step, **d})
                    do_sleep(d["sleep_steps"], list(range(i + 1)), d["reason"])
        if parts["sleep"]:
            do_sleep(cfg.scheduler.min_sleep_steps or 1, list(range(i + 1)), "task_boundary")
        if ewc is not None and not parts["sleep"]:
            eps = [e for e in replay.items if e.task == i][: cfg.probe_size]
            if eps:
                ewc.update(system, [collate_episodes(eps, pad_id)[0]])
        for j in range(i + 1):
            acc, loss, n = evaluate(system, data[j][1], pad_id)
            A[i][j], L[i][j], C[i][j] = acc, loss, n
        emit({"phase": "boundary", "step": step, "boundary": i,
              **{f"task_acc/{cfg.tasks[j]}": A[i][j] for j in range(i + 1)},
              **{f"task_loss/{cfg.tasks[j]}": L[i][j] for j in range(i + 1)},
              **{f"task_tokens/{cfg.tasks[j]}": C[i][j] for j in range(i + 1)}})
    metrics = cl_metrics(A, L, counts=C, tasks=list(cfg.tasks))
    system.close()
    return {"method": cfg.method, "A": A, "L": L, "counts": C, "metrics": metrics, "history": history,
            "replay_bytes": replay.nbytes(), "replay_episodes": len(replay)}
