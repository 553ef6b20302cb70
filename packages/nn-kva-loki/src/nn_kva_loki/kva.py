"""Knowledge-value attribution (KVA): per-sample integrated gradients to an ``nn.kva/1`` file.

For sample ``n`` with prompt tokens ``x_1..x_T`` and target position ``t`` (default the last
prompt token, the one that predicts the answer), let ``y`` be the target token (``argmax``:
the model's own prediction at ``t``; ``gold``: the first token of the gold answer) and

    F(h) = softmax(logits_t)[y]

computed with layer ``l``'s down-projection output (site ``mlp_out``) at position ``t``
replaced by ``h``; every other position and every other layer is computed naturally. With
``a_l`` the clean activation there and the zero baseline,

    A[n, l] = a_l ⊙ Σ_k w_k ∂F/∂h |_{h = α_k a_l}        (a vector of hidden_size)

where ``(α_k, w_k)`` are Captum's points and weights for ``method`` and ``steps``
(``captum.attr._utils.approximation_methods.approximation_parameters``): the quadrature of
``a_l ⊙ ∫_0^1 ∂F(α a_l)/∂h dα``, so ``Σ_c A[n, l, c] ≈ F(a_l) − F(0)``.

Engines (same numbers to float precision; tests hold them to 1e-5 relative):

* ``captum`` (reference): Captum's ``IntegratedGradients`` over ``h ↦ F(h)``, one layer at
  a time, each step a full forward of the sequence (cut after ``t``).
* ``fast`` (default): :func:`nn_core.numerics.integrated_gradients` with
  ``engine="kv_cache"``: the prefix ``x_1..x_{t-1}`` once with a KV cache, then every
  ``(sample, layer, step)`` variant of the single token ``x_t`` as rows of one batch
  (chunked by ``max_pairs``), gradients w.r.t. the substituted activations.

Unlike the LoKI reference code, the baseline is zero *at the site*, not the input sequence
of token id 0 (which interpolates every position between the activations of an all-id-0
sequence and the real ones).

Samples are left-padded into batches; each row's target is its own last real token, so
attributions do not depend on the batch composition.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nn_core.device import dtype_name, input_device
from nn_core.errors import NNError
from nn_core.intervene.hooks import hooked
from nn_core.model.adapters import get_adapter, model_signature
from nn_core.model.sites import SiteRef
from nn_kva_loki.kva_file import SITE, KVASettings, open_kva_writer

METHODS = ("riemann_trapezoid", "gausslegendre", "riemann_left", "riemann_right", "riemann_middle")
ENGINES = ("fast", "captum")
TARGETS = ("argmax", "gold")
DEFAULT_DATA = "synthetic"
DEFAULT_PER_TASK = 5

__all__ = [
    "DEFAULT_DATA", "ENGINES", "METHODS", "TARGETS", "Encoded", "Sample", "analyse",
    "attribute", "captum_attributions", "encode_samples", "load_samples", "pairs_per_batch",
    "quadrature",
]


# --------------------------------------------------------------------------- quadrature
def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Captum's ``(alphas, weights)`` for ``method`` with ``steps`` points (>= 2 for the
    Riemann rules, as in Captum).

    As Captum defines them: ``riemann_left|right|middle`` use weights ``1/n`` at
    ``α = k/n`` (k = 0..n-1, 1..n, k + 1/2); ``riemann_trapezoid`` uses ``α = k/(n-1)``
    with weights ``1/n`` halved at both ends, so its weights sum to ``(n-1)/n``, not 1
    (attributions are scaled by that factor relative to the exact integral; kept for
    comparability with Captum and the LoKI code); ``gausslegendre`` uses the n-point
    Gauss-Legendre nodes and weights on [0, 1]."""
    if method not in METHODS:
        raise NNError(f"unknown integration method '{method}': use one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise NNError(f"steps must be an integer >= 1, got {steps!r}: pass --steps 7 or more")
    if steps < 2 and method != "gausslegendre":
        raise NNError(f"{method} needs --steps >= 2 (got {steps}); only gausslegendre works with 1 step")
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(method)
    return [float(a) for a in alphas(steps)], [float(w) for w in step_sizes(steps)]


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Sample:
    """One sample: a stable ``id``, the ``prompt`` text as fed to the model, and the
    ``gold`` answer text that continues it (None where the data have none)."""

    id: str
    prompt: str
    gold: str | None = None


def _synthetic(spec: str, per_task: int, seed: int) -> list[Sample]:
    from nn_core.data.instructions import Example
    from nn_eval.tasks import TASKS, make_split

    names = [n for n in spec.partition(":")[2].split(",") if n] or list(TASKS)
    samples = []
    for name in names:
        for i, ex in enumerate(make_split(name, 0, per_task, seed)["eval"]):
            prompt = ex["instruction"] + (f"\n\n{ex['input']}" if ex["input"] else "")
            samples.append((f"synthetic/{name}:{i}", Example(prompt=prompt, response=ex["output"])))
    return samples


def _records_kind(records: list, path: Path) -> str:
    first = records[0]
    if not isinstance(first, dict):
        raise NNError(f"{path}: records must be objects, found {type(first).__name__}")
    if "question" in first:
        return "mc"
    if "prompt" in first and "response" not in first:
        return "prompt"
    return "instruction"


def load_samples(data: str, tokenizer=None, *, style: str = "auto", per_task: int = DEFAULT_PER_TASK,
                 seed: int = 0, limit: int | None = None) -> tuple[list[Sample], str]:
    """Samples of ``data`` and a label of the source (recorded as the file's ``dataset``).

    ``data``:

    * ``synthetic`` or ``synthetic:TASK,TASK``: nn-eval's synthetic task suite, the first
      ``per_task`` eval examples of each task (``make_split(task, 0, per_task, seed)``),
      rendered through the tokenizer's chat template (:func:`nn_core.data.render`); gold =
      the exact answer. Deterministic and offline: the default.
    * a multiple-choice file (``.jsonl``/``.json``/``.csv`` records with ``question``;
      nn-eval's formats, including the MMLU column layout ``A``-``D``): prompt = the item's
      context (``style``: ``auto``/``plain``/``mmlu`` as in :func:`nn_eval.multiple_choice.mc_items`),
      gold = ``" " + gold choice``.
    * a prompt file: ``.txt`` (one prompt per non-empty line) or records with ``prompt``
      (and optionally ``answer``, the gold continuation), fed as is.
    * instruction records (Alpaca, Dolly, ShareGPT, simple ``prompt``/``response``):
      rendered through the chat template like the synthetic suite.

    ``limit`` keeps the first N samples.
    """
    if limit is not None and limit < 1:
        raise NNError(f"limit must be at least 1, got {limit}")
    if per_task < 1:
        raise NNError(f"per-task must be at least 1, got {per_task}")
    pending: list[tuple[str, object]] = []  # (id, Sample or Example to render)
    if data == DEFAULT_DATA or data.startswith(DEFAULT_DATA + ":"):
        pending = _synthetic(data, per_task, seed)
        label = f"{data}(n={per_task},seed={seed})"
    else:
        path = Path(data).expanduser()
        if not path.is_file():
            raise NNError(f"data '{data}' is neither 'synthetic[:TASK,...]' nor an existing file: "
                          "pass a .jsonl/.json/.csv/.txt file or 'synthetic'")
        label = path.name
        if path.suffix.lower() == ".txt":
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            pending = [(f"{path.stem}:{i}", Sample(f"{path.stem}:{i}", ln)) for i, ln in enumerate(lines)]
        else:
            from nn_eval.multiple_choice import mc_items, read_records

            records = read_records(path)
            if not records:
                raise NNError(f"{path} holds no records: add one sample per line")
            kind = _records_kind(records, path)
            if kind == "mc":
                for i, item in enumerate(mc_items(records, style=style)):
                    sid = f"{path.stem}:{i}"
                    pending.append((sid, Sample(sid, item.context, " " + item.choices[item.gold].lstrip())))
            elif kind == "prompt":
                for i, rec in enumerate(records):
                    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                        raise NNError(f"{path} record {i} has no text field 'prompt'")
                    sid = str(rec.get("id", f"{path.stem}:{i}"))
                    gold = rec.get("answer")
                    pending.append((sid, Sample(sid, rec["prompt"], None if gold is None else str(gold))))
            else:
                from nn_core.data.instructions import parse_records

                pending = [(f"{path.stem}:{i}", ex) for i, ex in enumerate(parse_records(records))]
    if limit is not None:
        pending = pending[:limit]
    if not pending:
        raise NNError(f"data '{data}' gave no samples")
    samples = []
    for sid, obj in pending:
        if isinstance(obj, Sample):
            samples.append(obj)
            continue
        if tokenizer is None:
            raise NNError("instruction data need the tokenizer (its chat template) to make prompts")
        from nn_core.data.chat import render

        prompt, full = render(tokenizer, obj)
        samples.append(Sample(sid, prompt, full[len(prompt):]))
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise NNError(f"data '{data}' has repeated sample ids: give every record a distinct 'id'")
    return samples, label


@dataclass(frozen=True)
class Encoded:
    """A sample as token ids cut after its target position (the target is the last id),
    with the gold answer's first token (or None)."""

    id: str
    ids: tuple[int, ...]
    gold_id: int | None


def _first_answer_token(tokenizer, prompt_ids: list[int], prompt: str, answer: str) -> int | None:
    from nn_core.data import tokenize_texts

    if not answer:
        return None
    (whole,) = tokenize_texts(tokenizer, [prompt + answer])
    if len(whole) > len(prompt_ids) and whole[: len(prompt_ids)] == prompt_ids:
        return int(whole[len(prompt_ids)])
    alone = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return int(alone[0]) if alone else None


def encode_samples(tokenizer, samples: Sequence[Sample], *, position: int = -1, target: str = "argmax",
                   max_length: int | None = None) -> list[Encoded]:
    """Token ids of each prompt (:func:`nn_core.data.tokenize_texts`), cut after the target
    position (``position`` indexes the prompt's tokens, negative from the end; default the
    last), then left-truncated to ``max_length`` tokens (the target stays last).

    A position outside a sample's tokens, or ``target="gold"`` for a sample without a gold
    answer, raises :class:`NNError` (before anything is written)."""
    from nn_core.data import tokenize_texts

    if target not in TARGETS:
        raise NNError(f"unknown target '{target}': use one of {', '.join(TARGETS)}")
    if max_length is not None and max_length < 1:
        raise NNError(f"max-length must be at least 1, got {max_length}")
    all_ids = tokenize_texts(tokenizer, [s.prompt for s in samples])
    out = []
    for s, ids in zip(samples, all_ids, strict=True):
        n = len(ids)
        p = position if position >= 0 else n + position
        if not 0 <= p < n:
            raise NNError(f"target position {position} is beyond sample {s.id} ({n} tokens): pass a "
                          f"--position in {-n}..{n - 1} or drop that sample")
        gold_id = None
        if target == "gold":
            if s.gold is None:
                raise NNError(f"sample {s.id} has no gold answer: use --target argmax, or data with answers")
            gold_id = _first_answer_token(tokenizer, ids, s.prompt, s.gold)
            if gold_id is None:
                raise NNError(f"the gold answer of sample {s.id} encodes to no tokens")
        cut = ids[: p + 1]
        if max_length is not None:
            cut = cut[-max_length:]
        out.append(Encoded(s.id, tuple(int(t) for t in cut), gold_id))
    return out


# --------------------------------------------------------------------------- engines
def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _forward_kwargs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    import inspect

    params = inspect.signature(model.forward).parameters
    kw = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if "position_ids" in params:
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    return kw


def _last_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax at the last column (every row's target, left-padded), float32 ``[b, vocab]``."""
    with torch.no_grad():
        logits = model(**_forward_kwargs(model, ids, mask)).logits[:, -1]
    return torch.softmax(logits.float(), dim=-1)


def captum_attributions(model: nn.Module, ids: Sequence[int], target_id: int, *, method: str,
                        steps: int, layers: Sequence[int] | None = None) -> np.ndarray:
    """The reference: Captum ``IntegratedGradients`` per layer for one sample whose target
    is its last token (``ids``, no padding). Returns ``[len(layers), hidden]`` float32."""
    from captum.attr import IntegratedGradients

    quadrature(method, steps)  # validates
    ad = get_adapter(model)
    layers = list(range(ad.num_layers)) if layers is None else [ad.check_layer(int(x)) for x in layers]
    device = input_device(model)
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    mask = torch.ones_like(x)
    store: dict = {}

    def reader(layer):
        def fn(out):
            store[layer] = out.reshape(1, -1, out.shape[-1])[0, -1].detach().clone()
        return fn

    with torch.no_grad(), hooked(model, {SiteRef(la, SITE): reader(la) for la in set(layers)}):
        model(**_forward_kwargs(model, x, mask))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        rows = []
        for layer in layers:
            def forward(h: torch.Tensor, layer=layer) -> torch.Tensor:
                k = h.shape[0]

                def sub(out: torch.Tensor) -> torch.Tensor:
                    new = out.clone()
                    new.view(k, -1, out.shape[-1])[:, -1] = h.to(device=new.device, dtype=new.dtype)
                    return new

                with hooked(model, {SiteRef(layer, SITE): sub}):
                    kw = _forward_kwargs(model, x.expand(k, -1), mask.expand(k, -1))
                    logits = model(**kw).logits[:, -1]
                return torch.softmax(logits.float(), dim=-1)[:, target_id]

            a = store[layer][None]
            with torch.enable_grad():
                att = IntegratedGradients(forward).attribute(
                    a, baselines=torch.zeros_like(a), n_steps=steps, method=method)
            rows.append(att[0].detach().float().cpu())
        return torch.stack(rows).numpy()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _kv_bytes_per_token(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1024)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or hidden // heads)
    param = next(model.parameters())
    return 2 * get_adapter(model).num_layers * kv_heads * head_dim * param.element_size()


def pairs_per_batch(model: nn.Module, prefix_len: int, budget_bytes: float, *, variants: int | None = None) -> int:
    """How many (sample, layer, step) variants one fast-path forward may hold in
    ``budget_bytes``.

    ``variants=None``: the ``rows`` layout, where each variant attends over its own copy of
    its sample's KV cache (``2 × layers × kv_heads × head_dim × prefix_len`` elements).
    ``variants=V`` (variants per sample): the ``packed`` layout, where the cache is shared
    and each variant instead keeps its attention weights over ``prefix_len + V`` keys
    (``layers × heads`` of them) for the backward. Both add, per variant, about ``layers ×
    (16 × hidden + 4 × intermediate)`` activations and three vocabulary-sized float32
    vectors (logits, softmax, its gradient)."""
    ad = get_adapter(model)
    widths = ad.widths()
    elem = next(model.parameters()).element_size()
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    if variants is None:
        attention = _kv_bytes_per_token(model) * max(prefix_len, 1)
    else:
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
        heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
        attention = ad.num_layers * heads * (max(prefix_len, 1) + variants) * elem
    per_row = (attention + ad.num_layers * (16 * widths["mlp_out"] + 4 * widths["mlp_act"]) * elem
               + 3 * vocab * 4)
    return int(max(1, min(4096, budget_bytes // per_row)))


def attribute(model: nn.Module, batch: Sequence[Encoded], *, target: str = "argmax", method: str,
              steps: int, engine: str = "fast", pad_id: int = 0,
              memory_budget: float = 2 * 2**30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KVA of a batch of encoded samples: ``(attributions [b, L, H] float32, target_token [b]
    int64, target_prob [b] float32)`` (module docstring)."""
    if engine not in ENGINES:
        raise NNError(f"unknown engine '{engine}': use one of {', '.join(ENGINES)}")
    if target not in TARGETS:
        raise NNError(f"unknown target '{target}': use one of {', '.join(TARGETS)}")
    alphas, weights = quadrature(method, steps)
    device = input_device(model)
    ids, mask = _left_pad([e.ids for e in batch], pad_id, device)
    if target == "gold":
        if any(e.gold_id is None for e in batch):
            raise NNError("target 'gold' needs a gold answer token for every sample")
        gold = torch.tensor([e.gold_id for e in batch], dtype=torch.long, device=device)
    if engine == "fast":
        from nn_core.numerics.integrated_gradients import integrated_gradients

        variants = len(alphas) * get_adapter(model).num_layers

        def max_pairs(layout: str) -> int:  # the engine's packed or rows layout, sized to the budget
            return pairs_per_batch(model, ids.shape[1], memory_budget,
                                   variants=variants if layout == "packed" else None)

        # the clean logits (target token and probability) come from the engine's own cached
        # forward of the target token: no separate full-prompt pass
        att, logits = integrated_gradients(
            model, ids, mask, alphas=alphas, weights=weights, site=SITE,
            target_ids=gold if target == "gold" else "argmax", max_batch=max_pairs, engine="kv_cache",
            return_logits=True)
        att = att.numpy()
        probs = torch.softmax(logits, dim=-1)
        tok = gold.cpu() if target == "gold" else probs.argmax(-1)
        prob = probs.gather(-1, tok[:, None])[:, 0]
    else:
        probs = _last_probs(model, ids, mask)
        tok = gold.to(probs.device) if target == "gold" else probs.argmax(-1)
        prob = probs.gather(-1, tok[:, None])[:, 0]
        att = np.stack([captum_attributions(model, e.ids, int(t), method=method, steps=steps)
                        for e, t in zip(batch, tok.tolist(), strict=True)])
    return (att.astype(np.float32, copy=False), tok.cpu().numpy().astype(np.int64),
            prob.cpu().numpy().astype(np.float32))


# --------------------------------------------------------------------------- the run
def _state(device: str | torch.device | None = None):
    """accelerate's ``PartialState`` (one per process). On a machine without CUDA, or with
    ``device="cpu"`` or ``accelerate launch --cpu``, processes started by ``torchrun`` /
    ``accelerate launch`` join a CPU (gloo) process group."""
    import os

    from accelerate import PartialState

    cpu = (str(device) == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
           or not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _broadcast(state, value):
    """``value`` of rank 0 on every rank."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def analyse(model: nn.Module, tokenizer, samples: Sequence[Sample], out: str | Path, *,
            settings: KVASettings, position: int = -1, max_length: int | None = None,
            batch_size: int = 4, memory_budget: float = 2 * 2**30, write_mode: str = "w",
            resume: bool = False, progress: bool | None = None,
            on_write: Callable[[int], None] | None = None) -> dict:
    """Attribute ``samples`` and write them to the KVA file ``out`` (``settings``: method,
    steps, engine, target, dataset; ``dtype`` is taken from the model).

    Runs data-parallel under ``accelerate launch``/``torchrun``: every process attributes
    its share of each round of ``batch_size × processes`` samples
    (``PartialState.split_between_processes``), rank 0 gathers them in sample order and
    appends them, so every sample is written exactly once, in data order. ``resume``
    continues an interrupted file from its first missing sample (the stored sample ids
    must be this run's first ones). ``on_write(n_written)`` is called on rank 0 after each
    append. Returns a summary (rank 0's; other ranks get the same keys)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NNError(f"batch size must be a positive integer, got {batch_size!r}")
    state = _state(next(model.parameters()).device)
    main = state.is_main_process
    param = next(model.parameters())
    settings = KVASettings(**{**settings.to_dict(), "dtype": dtype_name(param.dtype)}).check()
    quadrature(settings.method, settings.steps)
    if settings.engine not in ENGINES:
        raise NNError(f"unknown engine '{settings.engine}': use one of {', '.join(ENGINES)}")
    encoded = encode_samples(tokenizer, samples, position=position, target=settings.target,
                             max_length=max_length)
    sample_ids = [e.id for e in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    writer, start, error = None, 0, None
    if main:
        try:
            writer = open_kva_writer(out, model_signature(model), settings, write_mode=write_mode,
                                     resume=resume)
            # resume: the file's samples are this run's first ones; append: new rows after them
            start = writer.start if resume else 0
            if resume:
                writer.check_prefix(sample_ids)
                if start > len(sample_ids):
                    raise NNError(f"{out} holds {start} samples but this run has {len(sample_ids)}: "
                                  "resume with the same data and limit")
        except NNError as exc:
            error = str(exc)
            if writer is not None:
                writer.close()
                writer = None
    error, start = _broadcast(state, (error, start))
    if error is not None:
        raise NNError(error)

    t0 = time.perf_counter()
    todo = len(encoded) - start
    bar = None
    if main:
        from tqdm.auto import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=todo, unit="sample", desc="kva", disable=not show, dynamic_ncols=True)
    finished = False
    try:
        per_round = batch_size * state.num_processes
        for lo in range(start, len(encoded), per_round):
            chunk = list(range(lo, min(lo + per_round, len(encoded))))
            with state.split_between_processes(chunk) as mine:
                mine = list(mine)
                result = None
                if mine:
                    att, tok, prob = attribute(model, [encoded[i] for i in mine], target=settings.target,
                                               method=settings.method, steps=settings.steps,
                                               engine=settings.engine, pad_id=pad_id,
                                               memory_budget=memory_budget)
                    result = (mine, att, tok, prob)
            gathered = [result]
            if state.num_processes > 1:
                from accelerate.utils import gather_object

                gathered = gather_object([result])
            if main:
                parts = sorted((r for r in gathered if r is not None), key=lambda r: r[0][0])
                idx = [i for r in parts for i in r[0]]
                if idx != chunk:
                    raise RuntimeError(f"gathered samples {idx} differ from the round's {chunk}")
                n = writer.append([sample_ids[i] for i in idx], np.concatenate([r[1] for r in parts]),
                                  np.concatenate([r[2] for r in parts]), np.concatenate([r[3] for r in parts]))
                bar.update(len(idx))
                if on_write is not None:
                    on_write(n)
        if main:
            n_total = writer.n_written
            writer.finish()
            finished = True
        state.wait_for_everyone()
    finally:
        if bar is not None:
            bar.close()
        if writer is not None and not finished:
            writer.close()  # stays marked interrupted: --resume continues it
    seconds = time.perf_counter() - t0
    summary = {"out": str(out), "num_samples": len(encoded), "written_this_run": todo, "resumed_from": start,
               "seconds": seconds, "samples_per_s": todo / seconds if seconds > 0 else math.inf,
               "processes": state.num_processes, "settings": settings.to_dict()}
    if main:
        summary["n_written"] = n_total
    return summary


def summary_line(summary: dict) -> str:
    s = summary["settings"]
    rate = summary["samples_per_s"]
    held = summary.get("n_written", summary["num_samples"])
    return (f"KVA of {summary['written_this_run']} samples ({held} in the file"
            f"{', resumed at ' + str(summary['resumed_from']) if summary['resumed_from'] else ''}) "
            f"with {s['engine']} / {s['method']} x {s['steps']} steps in {summary['seconds']:.1f} s "
            f"({rate:.2f} samples/s, {summary['processes']} process(es))")

