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

import hashlib
import json
import math
import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nn_cls.distributed import MIXED_PRECISION, runtime
from nn_cls.hippocampus import HippocampusConfig
from nn_cls.phases import (
    OnlineEWC,
    SchedulerConfig,
    SleepScheduler,
    probe_forgetting,
    pseudo_pool,
    refresh,
    sleep_step,
    wake_step,
)
from nn_cls.replay import ReplayBuffer, collate_episodes
from nn_cls.streams import instruction_stream, split_task
from nn_cls.system import CLSSystem
from nn_core.data.batching import collate
from nn_core.data.chat import tokenize_examples
from nn_core.data.instructions import Example
from nn_core.errors import NNError
from nn_core.io import atomic_path
from nn_core.numerics.loss import IGNORE_INDEX, causal_labels
from nn_eval.continual import cl_metrics
from nn_eval.tasks import make_split

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEYS", "CHECKPOINT_NAME", "METHODS", "EngineConfig",
           "check_resume", "config_hash", "evaluate", "load_checkpoint", "run_stream"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "nn-cls.checkpoint/1"
#: What a checkpoint holds (``torch.save`` of a dict of tensors and plain containers).
CHECKPOINT_KEYS = {
    "format": "nn-cls.checkpoint/1",
    "config_hash": "config_hash(engine config, identity): resume refuses another",
    "config": "the engine config and identity (model) it was written with",
    "step": "finished wake steps (boundaries included)", "total_steps": "steps of the whole stream",
    "done": "whether the stream is finished",
    "base": "the base's trained parameters (LoRA A/B), by name",
    "hippocampus": "Hippocampus.state_dict(): router, experts, usage, task usage, init weights",
    "wake_opt": "AdamW state of the wake optimizer", "sleep_opt": "AdamW state of the sleep optimizer",
    "replay": "ReplayBuffer.state_dict(): episodes with sparse teachers, seen count, RNG",
    "ewc": "OnlineEWC.state_dict(): Fisher, anchors, update count (None without EWC)",
    "scheduler": "SleepScheduler.state_dict(): loss mean, steps since sleep, novelty",
    "rng": "torch global RNG, the stream's batch-sampling generator, python random",
    "A": "accuracy matrix so far", "L": "loss matrix so far", "counts": "token counts so far",
    "history": "every logged record so far",
    "world_size": "processes of the run (resume needs as many)",
    "ranks": "data parallel: per rank its replay buffer, RNG states and state_sha256 (the hash of "
             "its base + hippocampus weights; equal on every rank), by rank (None in one process)",
    "amp_scaler": "fp16 GradScaler state (None otherwise)",
}

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
    #: how the base trains (sleep; the baselines' wake): ``lora`` (PEFT LoRA on ``lora_targets``)
    #: or ``full`` (full fine-tuning of the modules named in ``full_modules``, the rest frozen)
    base_train: str = "lora"
    full_modules: tuple[str, ...] = ("down_proj",)
    top_k: int = 32
    replay_capacity: int = 256
    replay_sampling: str = "uniform"
    sleep_batch_size: int = 4
    pseudo_ratio: float = 0.25
    ewc_lambda: float = 100.0
    ewc_gamma: float = 0.9
    #: Fisher units: per-sample squared gradients (True) or per-batch (False)
    fisher_per_sample: bool = True
    refresh_threshold: float = 0.6
    refresh_factor: float = 0.5
    probe_size: int = 8
    injection_fraction: float = 0.7
    head_only: bool = False
    seed: int = 0
    #: AMP: no | bf16 | fp16 (fp16 needs CUDA; see nn_cls.distributed)
    mixed_precision: str = "no"
    #: instruction data (local path or hub name) instead of nn-eval's synthetic tasks; then
    #: ``tasks`` names (and orders) values of ``task_field`` there (see :mod:`nn_cls.streams`)
    source: str | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    task_field: str = "task"
    experts: HippocampusConfig = field(default_factory=HippocampusConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def check(self) -> None:
        if self.method not in METHODS:
            raise NNError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if len(self.tasks) < 2:
            raise NNError(f"a continual stream needs at least 2 tasks, got {list(self.tasks)}")
        if self.steps_per_task < 1 or self.batch_size < 1:
            raise NNError("steps_per_task and batch_size must be at least 1")
        if self.base_train not in ("lora", "full"):
            raise NNError(f"model.base_train must be lora or full, got '{self.base_train}'")
        if self.base_train == "full" and not self.full_modules:
            raise NNError("model.base_train=full needs the modules to train: set model.full_modules "
                          "(e.g. [down_proj])")
        if self.mixed_precision not in MIXED_PRECISION:
            raise NNError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got "
                          f"'{self.mixed_precision}'")


def _examples(cfg: EngineConfig) -> list[tuple[list, list]]:
    """(train, eval) examples per task of the stream: nn-eval's synthetic split, or the
    instruction source split by :func:`nn_cls.streams.split_task`."""
    if cfg.source is None:
        out = []
        for task in cfg.tasks:
            split = make_split(task, cfg.n_train, cfg.n_eval, seed=cfg.seed)
            out.append(tuple([Example(prompt=f"{r['instruction']}\n{r['input']}".strip(), response=r["output"])
                              for r in split[part]] for part in ("train", "eval")))
        return out
    stream = instruction_stream(cfg.source, prompt_field=cfg.prompt_field, response_field=cfg.response_field,
                                task_field=cfg.task_field, tasks=cfg.tasks)
    return [split_task(stream[t], cfg.n_train, cfg.n_eval, cfg.seed, t) for t in cfg.tasks]


def _features(tok, task: str, parts: tuple[list, list], cfg: EngineConfig) -> tuple[list, list]:
    out = []
    for ex in parts:
        feats = tokenize_examples(tok, ex, cfg.max_length)
        if not any(any(v != IGNORE_INDEX for v in f["labels"]) for f in feats):
            raise NNError(f"task '{task}' has no supervised tokens after tokenization: raise max_length")
        out.append(list(feats))
    return out[0], out[1]


@torch.no_grad()
def evaluate(system: CLSSystem, feats: list, pad_id: int, batch_size: int = 8, *,
             rt=None) -> tuple[float, float, int]:
    """(token accuracy, token-mean loss, tokens) on the supervised tokens of ``feats``.

    ``rt`` (a data-parallel :class:`nn_cls.distributed.Runtime`): this rank evaluates the
    examples ``rank, rank + N, …`` and the sums of hits, losses and tokens are all-reduced,
    so every example counts once and every rank returns the same numbers."""
    hits = loss = 0.0
    n = 0
    was = system.hippocampus.training
    system.hippocampus.eval()  # evaluation must not move the usage statistics
    if rt is not None and rt.distributed:
        feats = feats[rt.rank::rt.world_size]
    for i in range(0, len(feats), batch_size):
        batch = collate(feats[i:i + batch_size], pad_id)
        logits = system.forward(batch, hippocampus=True)[:, :-1].float()
        labels = causal_labels(batch["labels"], batch["attention_mask"])[:, 1:].to(logits.device)
        keep = labels != IGNORE_INDEX
        loss += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                      reduction="sum"))
        hits += float(((logits.argmax(-1) == labels) & keep).sum())
        n += int(keep.sum())
    system.hippocampus.train(was)
    if rt is not None and rt.distributed:
        hits, loss, total = rt.reduce_floats([hits, loss, n], "sum")
        n = round(total)
    return (hits / n, loss / n, n) if n else (math.nan, math.nan, 0)


_HASH_DEFAULTS = {"mixed_precision": "no", "base_train": "lora", "full_modules": ("down_proj",),
                  "fisher_per_sample": True}


def config_hash(cfg: EngineConfig, identity: Mapping | None = None) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON of ``asdict(cfg)`` plus
    ``identity`` (e.g. the model name): two runs may share a checkpoint only if they agree.
    Keys added later are left out at their defaults (:data:`_HASH_DEFAULTS`:
    ``mixed_precision="no"``, ``base_train="lora"``, ``full_modules=("down_proj",)``,
    ``fisher_per_sample=True``), so checkpoints written before they existed keep their hash."""
    engine = asdict(cfg)
    for key, default in _HASH_DEFAULTS.items():
        if key in engine and engine[key] == default:
            del engine[key]
    blob = json.dumps({"engine": engine, "identity": dict(identity or {})}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _differences(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`run_stream` (``weights_only`` unpickling: tensors and
    plain containers only); one :class:`NNError` line when it is missing or not a checkpoint."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise NNError(f"checkpoint '{p}' does not exist: pass a {CHECKPOINT_NAME} written by nn-cls "
                      "(or the run folder holding it)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means "not a checkpoint"
        raise NNError(f"'{p}' is not an nn-cls checkpoint ({type(exc).__name__}): pass a "
                      f"{CHECKPOINT_NAME} written by nn-cls train") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise NNError(f"'{p}' is not an nn-cls checkpoint (no format {CHECKPOINT_FORMAT}): pass a "
                      f"{CHECKPOINT_NAME} written by nn-cls train")
    return state


def check_resume(state: Mapping, cfg: EngineConfig, identity: Mapping | None = None) -> None:
    """Refuse (one :class:`NNError` line naming the differing keys) a checkpoint written by
    another config than ``cfg`` + ``identity``."""
    chash = config_hash(cfg, identity)
    if state.get("config_hash") != chash:
        diff = _differences(state.get("config", {}), {"engine": asdict(cfg), "identity": dict(identity or {})})
        raise NNError(f"the checkpoint was written by another config (hash {state.get('config_hash')} "
                      f"!= {chash}; differs in {', '.join(diff[:4]) or 'unknown keys'}): resume with "
                      "the config it was written with")


def run_stream(cfg: EngineConfig, model, tok, *, log=None, checkpoint_dir: str | os.PathLike | None = None,
               checkpoint_every: int = 0, resume: str | os.PathLike | Mapping | None = None,
               stop_after: int | None = None, identity: Mapping | None = None,
               progress: bool | None = None) -> dict:
    """Run ``cfg.method`` over ``cfg.tasks``; returns A, L, counts, ``cl_metrics`` and history.

    The stream is ``len(cfg.tasks) · cfg.steps_per_task`` wake steps; after step ``s`` (1-based
    count of finished wake steps, including the sleeps it triggered and, when ``s`` ends a
    task, the boundary sleep and evaluation) a checkpoint goes to
    ``checkpoint_dir/checkpoint.pt`` when ``checkpoint_every`` divides ``s``, at
    ``stop_after`` (the run then returns with ``stopped=True``) and at the end. A checkpoint
    holds everything the rest of the run depends on (see :data:`CHECKPOINT_KEYS`), so
    ``resume`` (a checkpoint path, run folder or loaded state) continues exactly where it
    stopped: a resumed run reproduces the uninterrupted one. A checkpoint whose config hash
    (:func:`config_hash` of ``cfg`` and ``identity``) differs is refused.

    ``progress``: a tqdm bar over the wake steps on stderr (task, wake loss); ``None`` shows
    it only when stderr is a terminal.

    Under ``accelerate launch``/``torchrun`` the run is data parallel (see
    :mod:`nn_cls.distributed`): every rank trains on its own shard of each global batch of
    ``N · batch_size`` rows and keeps its own replay buffer, gradients are averaged over
    ranks, decisions come from reduced quantities, and only rank 0 calls ``log`` and writes
    the checkpoint (which then holds every rank's replay buffer and RNG states; resume needs
    the same number of processes). ``cfg.mixed_precision`` (bf16/fp16) autocasts the
    forwards.
    """
    cfg.check()
    if checkpoint_every < 0:
        raise NNError(f"train.checkpoint_every must be >= 0, got {checkpoint_every}")
    parts = METHODS[cfg.method]
    chash = config_hash(cfg, identity)
    state = None
    if resume is not None:
        state = resume if isinstance(resume, Mapping) else load_checkpoint(resume)
        check_resume(state, cfg, identity)
    from nn_core.train.config import SFTConfig  # peft is imported only when a run starts
    from nn_core.train.lora import prepare_model

    rt = runtime(model, cfg.mixed_precision)  # the plain runtime in one fp32 process
    if state is not None and int(state.get("world_size", 1)) != rt.world_size:
        raise NNError(f"the checkpoint was written by {int(state.get('world_size', 1))} process(es), this "
                      f"run has {rt.world_size}: resume with as many processes")
    torch.manual_seed(cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    data = [_features(tok, t, p, cfg) for t, p in zip(cfg.tasks, _examples(cfg), strict=True)]
    for p in model.parameters():
        p.requires_grad_(False)
    system = CLSSystem(model, cfg.experts, injection_fraction=cfg.injection_fraction,
                       head_only=cfg.head_only, seed=cfg.seed, use_hippocampus=parts["hippocampus"])
    if rt.amp_dtype is not None:
        system.autocast = rt.autocast
    system.model = prepare_model(system.model, SFTConfig(
        method=cfg.base_train, lora_r=cfg.lora_r, target_modules=list(cfg.lora_targets), seed=cfg.seed,
        trainable_modules=list(cfg.full_modules) if cfg.base_train == "full" else None))
    base_params = {n: p for n, p in system.model.named_parameters() if p.requires_grad}
    if parts["hippocampus"]:
        for p in base_params.values():
            p.requires_grad_(False)
        wake_opt = rt.wrap(torch.optim.AdamW(system.hippocampus.parameters(), lr=cfg.lr_wake))
    else:
        wake_opt = rt.wrap(torch.optim.AdamW(base_params.values(), lr=cfg.lr_wake))
    sleep_opt = rt.wrap(torch.optim.AdamW(base_params.values(), lr=cfg.lr_sleep))
    # each rank its own replay shard, sampled with its own seeded generator (rank 0: cfg.seed)
    replay = ReplayBuffer(cfg.replay_capacity, seed=cfg.seed + 7919 * rt.rank, sampling=cfg.replay_sampling)
    with torch.enable_grad():
        for p in base_params.values():
            p.requires_grad_(True)
        ewc = OnlineEWC(base_params, lam=cfg.ewc_lambda, gamma=cfg.ewc_gamma,
                        per_sample=cfg.fisher_per_sample) if parts["ewc"] else None
        if parts["hippocampus"]:
            for p in base_params.values():
                p.requires_grad_(False)
    sched = SleepScheduler(cfg.scheduler)
    T = len(cfg.tasks)
    total = T * cfg.steps_per_task
    A = [[math.nan] * T for _ in range(T)]
    L = [[math.nan] * T for _ in range(T)]
    C = [[math.nan] * T for _ in range(T)]
    history: list[dict] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if state is not None:
        with torch.no_grad():
            missing = set(base_params) ^ set(state["base"])
            if missing:
                raise NNError(f"the checkpoint's base parameters differ from this run's "
                              f"({sorted(missing)[:2]}): resume with the same config")
            for n, p in base_params.items():
                p.copy_(state["base"][n])
        system.hippocampus.load_state_dict(state["hippocampus"])
        wake_opt.load_state_dict(state["wake_opt"])
        sleep_opt.load_state_dict(state["sleep_opt"])
        own = state["ranks"][rt.rank] if rt.distributed else state
        replay.load_state_dict(own["replay"])
        if ewc is not None:
            ewc.load_state_dict(state["ewc"])
        sched.load_state_dict(state["scheduler"])
        if rt.scaler is not None and state.get("amp_scaler"):
            rt.scaler.load_state_dict(state["amp_scaler"])
        A, L, C = state["A"], state["L"], state["counts"]
        history = list(state["history"])
        start = int(state["step"])
        gen.set_state(own["rng"]["stream"])
        torch.set_rng_state(own["rng"]["torch"])
        random.setstate(own["rng"]["python"])
    # data parallel: every rank starts from rank 0's trained state (identical by seeding
    # already; the broadcast makes it a guarantee) and counts hippocampus usage from here
    rt.broadcast_([*base_params.values(), *system.hippocampus.parameters(), *system.hippocampus.buffers()])
    hsnap = rt.hippocampus_snapshot(system.hippocampus)

    def sync_usage() -> None:
        nonlocal hsnap
        if rt.distributed and parts["hippocampus"]:
            hsnap = rt.sync_hippocampus(system.hippocampus, hsnap)

    def emit(rec):
        history.append(rec)
        if log is not None and rt.is_main:
            log(rec)

    def rng_state() -> dict:
        return {"torch": torch.get_rng_state(), "stream": gen.get_state(), "python": random.getstate()}

    def save(done: int) -> Path | None:
        if checkpoint_dir is None:
            return None
        ranks = rt.gather_object({"replay": replay.state_dict(), "rng": rng_state(),
                                  "state_sha256": _trained_state_hash(base_params, system.hippocampus)}) \
            if rt.distributed else None
        if not rt.is_main:
            return None
        ck = {
            "format": CHECKPOINT_FORMAT, "config_hash": chash,
            "config": {"engine": asdict(cfg), "identity": dict(identity or {})},
            "step": done, "total_steps": total, "done": done >= total,
            "base": {n: p.detach().cpu().clone() for n, p in base_params.items()},
            "hippocampus": {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                            for k, v in system.hippocampus.state_dict().items()},
            "wake_opt": wake_opt.state_dict(), "sleep_opt": sleep_opt.state_dict(),
            "replay": replay.state_dict(), "ewc": ewc.state_dict() if ewc is not None else None,
            "scheduler": sched.state_dict(), "rng": rng_state(),
            "A": A, "L": L, "counts": C, "history": history,
            "world_size": rt.world_size, "ranks": ranks,
            "amp_scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
        }
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        with atomic_path(path) as tmp:
            torch.save(ck, tmp)
        return path

    def do_sleep(n_steps: int, tasks_done: list[int], reason: str, step: int) -> None:
        nonlocal hsnap
        if not len(replay):
            return
        for p in base_params.values():
            p.requires_grad_(True)
        mix = []
        # the sleep's pseudo-rehearsal episodes, labelled in one no-grad pass before its steps
        pool = pseudo_pool(system, replay, n_steps, batch_size=cfg.sleep_batch_size,
                           pseudo_ratio=cfg.pseudo_ratio, step=step)
        for s in range(n_steps):
            m, mix = sleep_step(system, replay, sleep_opt, batch_size=cfg.sleep_batch_size,
                                pseudo_ratio=cfg.pseudo_ratio, ewc=ewc, pad_id=pad_id, step=step,
                                pseudo=pool[s])
            m = rt.reduce_metrics(m, sums=("replay_batch_size_sleep", "pseudo_batch_size"))
            emit({"phase": "sleep", "step": step, "sleep_step": s, "reason": reason, **m})
        if ewc is not None and mix:
            info = ewc.update(system, [collate_episodes(mix, pad_id)[0]])
            if rt.distributed:
                info.update(rt.average_fisher(ewc, info["fisher_units"]))
            emit({"phase": "ewc", "step": step, **info})
        if parts["hippocampus"]:
            for p in base_params.values():
                p.requires_grad_(False)
        if parts["refresh"]:
            info = refresh(system, replay.sample(cfg.probe_size), tasks_done,
                           threshold=cfg.refresh_threshold, factor=cfg.refresh_factor, pad_id=pad_id,
                           reduce=rt.mean if rt.distributed else None)
            hsnap = rt.hippocampus_snapshot(system.hippocampus)  # the reset is the same on every rank
            emit({"phase": "refresh", "step": step, **info})
        sched.slept()

    stopped = False
    bar = _bar(total, start, cfg.method, progress if rt.is_main else False)
    try:
        for s in range(start, total):
            i = s // cfg.steps_per_task
            train = data[i][0]
            # one global batch of N·batch_size rows from the shared generator; this rank's shard
            pick = torch.randint(len(train), (cfg.batch_size * rt.world_size,), generator=gen).tolist()
            pick = pick[rt.rank * cfg.batch_size:(rt.rank + 1) * cfg.batch_size]
            batch = collate([train[j] for j in pick], pad_id)
            # the ewc baseline: penalty in the same loss as the task loss (one backward)
            m = wake_step(system, batch, wake_opt, task=i, step=s, replay=replay, top_k=cfg.top_k,
                          hippocampus=parts["hippocampus"], ewc=ewc if not parts["sleep"] else None)
            if parts["replay_steps"] and len(replay) > cfg.batch_size:
                rb = collate_episodes(replay.sample(cfg.batch_size), pad_id)[0]
                m["replay_loss"] = wake_step(system, rb, wake_opt, task=i, step=s,
                                             hippocampus=False)["wake_loss"]
            if rt.distributed:  # losses: mean over ranks; rows, tokens, replay sizes: sums
                m["replay_size"] = len(replay)
                m = rt.reduce_metrics(m, sums=("replay_added_this_step", "batch_rows",
                                               "batch_supervised_tokens", "replay_size"))
                sync_usage()
            m["novelty"] = sched.observe_wake(m["wake_loss"])
            m["replay_size"] = m.get("replay_size", len(replay))
            emit({"phase": "wake", "step": s, "task": cfg.tasks[i], **m})
            bar.update(1)
            bar.set_postfix(task=cfg.tasks[i], loss=f"{m['wake_loss']:.3f}", refresh=False)
            done = s + 1
            if parts["sleep"]:
                sat = sched.saturation(system) if parts["hippocampus"] else 0.0
                forg = rt.mean(probe_forgetting(system, replay.sample(min(2, len(replay))), pad_id)) \
                    if len(replay) else 0.0
                sync_usage()  # the probe ran the hippocampus in training mode
                d = sched.decide(saturation=sat, forgetting=forg)
                if d["sleep"]:
                    emit({"phase": "schedule", "step": done, **d})
                    do_sleep(d["sleep_steps"], list(range(i + 1)), d["reason"], done)
            if done % cfg.steps_per_task == 0:
                _boundary(cfg, system, data, i, parts, ewc, replay, pad_id, do_sleep, emit, A, L, C, done, rt)
            periodic = bool(checkpoint_every) and done % checkpoint_every == 0
            if done in (total, stop_after) or periodic:
                save(done)
            if stop_after is not None and done >= stop_after and done < total:
                stopped = True
                break
        rt.barrier()  # no rank leaves while another still needs a collective
    finally:
        bar.close()
        system.close()
    metrics = cl_metrics(A, L, counts=C, tasks=list(cfg.tasks)) if not stopped else None
    ck = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    return {"method": cfg.method, "A": A, "L": L, "counts": C, "metrics": metrics, "history": history,
            "replay_bytes": replay.nbytes(), "replay_episodes": len(replay), "stopped": stopped,
            "step": min(stop_after, total) if stopped else total, "total_steps": total,
            "config_hash": chash, "checkpoint": str(ck) if ck is not None and ck.exists() else None}


def _trained_state_hash(base_params: Mapping[str, torch.Tensor], hippocampus) -> str:
    """SHA-256 of the bytes of the base's trained parameters and the hippocampus' state
    (parameters and usage buffers), in name order: data-parallel ranks must agree on it."""
    h = hashlib.sha256()
    items = [(f"base.{n}", p) for n, p in base_params.items()]
    items += [(f"hippocampus.{n}", t) for n, t in hippocampus.state_dict().items() if torch.is_tensor(t)]
    for name, t in sorted(items, key=lambda x: x[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def _bar(total: int, start: int, method: str, progress: bool | None):
    import sys

    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, initial=start, desc=f"nn-cls {method}", unit="step", disable=disable,
                file=sys.stderr, leave=False)


def _boundary(cfg, system, data, i, parts, ewc, replay, pad_id, do_sleep, emit, A, L, C, done, rt) -> None:
    """End of task ``i``: boundary sleep (sleep methods), the ``ewc`` baseline's Fisher update,
    and the evaluation of every seen task into row ``i`` of A, L and C (data parallel: only
    when every rank holds episodes of task ``i``, the Fisher then averaged over ranks)."""
    if parts["sleep"]:
        do_sleep(cfg.scheduler.min_sleep_steps or 1, list(range(i + 1)), "task_boundary", done)
    if ewc is not None and not parts["sleep"]:
        eps = [e for e in replay.items if e.task == i][: cfg.probe_size]
        if rt.all_true(bool(eps)):
            info = ewc.update(system, [collate_episodes(eps, pad_id)[0]])
            if rt.distributed:
                rt.average_fisher(ewc, info["fisher_units"])
    for j in range(i + 1):
        acc, loss, n = evaluate(system, data[j][1], pad_id, rt=rt)
        A[i][j], L[i][j], C[i][j] = acc, loss, n
    seen = [A[i][j] for j in range(i + 1)]
    emit({"phase": "boundary", "step": done, "boundary": i,
          **{f"task_acc/{cfg.tasks[j]}": A[i][j] for j in range(i + 1)},
          **{f"task_loss/{cfg.tasks[j]}": L[i][j] for j in range(i + 1)},
          **{f"task_tokens/{cfg.tasks[j]}": C[i][j] for j in range(i + 1)},
          "seen_acc": sum(seen) / len(seen),
          "seen_loss": sum(L[i][j] for j in range(i + 1)) / (i + 1)})
