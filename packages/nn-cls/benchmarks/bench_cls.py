"""nn-cls step costs and replay memory on smollm2-135m (CPU by default). Prints JSON.

Measured in one run, on the same model, batch and data (nn-eval's synthetic ``uppercase``
task, ``--batch`` rows cut at ``--max-length`` tokens, LoRA rank 8 on ``down_proj`` as the
engine's default), each time the median of ``--reps`` interleaved repetitions after a
warm-up (interleaving makes a loaded machine slow both sides alike):

* ``wake``: :func:`nn_cls.phases.wake_step` (base + hippocampus forward, LM loss + routing aux,
  backward into the hippocampus, AdamW step, top-k episodes written to replay) against a
  plain step of the same model: forward of the LoRA'd base alone, token-mean NLL on the
  response tokens, backward, AdamW step on the LoRA parameters. ``ratio = wake / plain``
  (target <= 1.3).
* ``sleep``: a whole sleep of ``--sleep-steps`` steps as the engine runs it, per step:
  :func:`nn_cls.phases.pseudo_pool` (the sleep's pseudo-rehearsal prompts labelled once by
  base + hippocampus, no grad) plus that many :func:`nn_cls.phases.sleep_step` (replay +
  pseudo mix with ``pseudo_ratio`` 0.25, sparse top-k KL, EWC penalty with a filled Fisher,
  one backward, AdamW step), against as many plain LoRA distillation steps: forward of the
  base on the same number of replay rows, full-vocab ``KL(softmax(teacher) ‖
  softmax(student))`` on their supervised positions toward dense teacher logits held in
  memory, backward, AdamW step. ``ratio = sleep / plain`` (target <= 1.3). The parts are
  timed too (same interleaving): ``label_s`` (the pool's labelling, per sleep step),
  ``ewc_s`` (EWC penalty forward + backward alone) and ``step_s`` (a sleep step with its
  pseudo episodes already labelled).
* ``replay``: bytes per episode as stored (ids, labels, top-k float16 log-probs + int32 ids
  + log tail mass per supervised position) against the seed's layout (full-vocab float32
  logits at every position, :func:`nn_cls.replay.full_logits_bytes`), mean over the buffer.

The load average (``os.getloadavg``) before and after is recorded: the ratios are the
meaningful figures on a shared machine, not the seconds.

    uv run python packages/nn-cls/benchmarks/bench_cls.py [--reps 5] [--batch 4] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--sleep-steps", type=int, default=4, help="steps per timed sleep (the pool is labelled once)")
    ap.add_argument("--fill", type=int, default=6, help="wake steps that fill replay before timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from nn_cls.hippocampus import HippocampusConfig
    from nn_cls.phases import OnlineEWC, _lm_loss, pseudo_pool, sleep_step, wake_step
    from nn_cls.replay import ReplayBuffer, collate_episodes, full_logits_bytes
    from nn_cls.system import CLSSystem
    from nn_core.data.batching import collate
    from nn_core.data.chat import tokenize_examples
    from nn_core.data.instructions import Example
    from nn_core.model.loading import load_model
    from nn_core.train.config import SFTConfig
    from nn_core.train.lora import prepare_model
    from nn_eval.tasks import make_split

    load_before = os.getloadavg()
    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device, dtype="float32")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = make_split("uppercase", 64, 1, seed=0)["train"]
    feats = tokenize_examples(tok, [Example(f"{r['instruction']}\n{r['input']}", r["output"]) for r in rows],
                              args.max_length)
    batches = [collate(list(feats[i:i + args.batch]), pad) for i in range(0, len(feats) - args.batch + 1, args.batch)]
    for p in model.parameters():
        p.requires_grad_(False)
    system = CLSSystem(model, HippocampusConfig(), seed=0)
    system.model = prepare_model(system.model, SFTConfig(method="lora", lora_r=8, target_modules=["down_proj"], seed=0))
    lora = {n: p for n, p in system.model.named_parameters() if p.requires_grad}
    wake_opt = torch.optim.AdamW(system.hippocampus.parameters(), lr=1e-3)
    lora_opt = torch.optim.AdamW(lora.values(), lr=1e-3)
    replay = ReplayBuffer(256, seed=0)
    dev = next(system.model.parameters()).device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    counter = {"i": 0}

    def next_batch():
        counter["i"] += 1
        return batches[counter["i"] % len(batches)]

    def cls_wake():
        for p in lora.values():
            p.requires_grad_(False)
        wake_step(system, next_batch(), wake_opt, task=0, step=counter["i"], replay=replay, top_k=args.top_k)

    def plain_step(batch):
        for p in lora.values():
            p.requires_grad_(True)
        logits = system.forward(batch, hippocampus=False)
        loss, _ = _lm_loss(logits, batch)
        lora_opt.zero_grad(set_to_none=True)
        loss.backward()
        lora_opt.step()

    def plain_wake():
        plain_step(next_batch())

    for _ in range(max(args.fill, 2)):  # fill replay (and warm up)
        cls_wake()
    plain_wake()
    wt = {"cls": [], "plain": []}
    for _ in range(args.reps):
        wt["cls"].append(timed(cls_wake))
        wt["plain"].append(timed(plain_wake))

    # sleep: EWC with a filled Fisher, teacher-dense plain distillation on the same rows
    for p in lora.values():
        p.requires_grad_(True)
    ewc = OnlineEWC(lora, lam=100.0, gamma=0.9)
    ewc.update(system, [collate_episodes(replay.sample(args.batch), pad)[0]])
    sleep_opt = torch.optim.AdamW(lora.values(), lr=1e-3)
    dense = []
    with torch.no_grad():
        for _ in range(4):
            b, _, m = collate_episodes(replay.sample(args.batch), pad)
            dense.append((b, system.forward(b, hippocampus=True)[:, :-1].detach().clone(), m))

    S = max(args.sleep_steps, 1)

    def cls_sleep():
        pool = pseudo_pool(system, replay, S, batch_size=args.batch, pseudo_ratio=0.25)
        for s in range(S):
            sleep_step(system, replay, sleep_opt, batch_size=args.batch, pseudo_ratio=0.25, ewc=ewc,
                       pad_id=pad, pseudo=pool[s])

    def plain_one():
        counter["i"] += 1
        b, teacher, m = dense[counter["i"] % len(dense)]
        s = F.log_softmax(system.forward(b, hippocampus=False)[:, :-1].float(), -1)
        t = F.log_softmax(teacher.float(), -1)
        kl = ((t.exp() * (t - s)).sum(-1) * m.to(s.device)).sum() / m.sum().clamp_min(1)
        sleep_opt.zero_grad(set_to_none=True)
        kl.backward()
        sleep_opt.step()

    def plain_sleep():
        for _ in range(S):
            plain_one()

    def label_only():
        pseudo_pool(system, replay, S, batch_size=args.batch, pseudo_ratio=0.25)

    fixed_pool = pseudo_pool(system, replay, 1, batch_size=args.batch, pseudo_ratio=0.25)[0]

    def step_only():
        sleep_step(system, replay, sleep_opt, batch_size=args.batch, pseudo_ratio=0.25, ewc=ewc,
                   pad_id=pad, pseudo=fixed_pool)

    def ewc_only():
        sleep_opt.zero_grad(set_to_none=True)
        ewc.penalty().backward()

    cls_sleep()
    plain_sleep()
    st = {"cls": [], "plain": [], "label": [], "step": [], "ewc": []}
    for _ in range(args.reps):
        st["cls"].append(timed(cls_sleep) / S)
        st["plain"].append(timed(plain_sleep) / S)
        st["label"].append(timed(label_only) / S)
        st["step"].append(timed(step_only))
        st["ewc"].append(timed(ewc_only))

    vocab = system.model.get_output_embeddings().weight.shape[0]
    eps = replay.items
    stored = sum(e.nbytes for e in eps) / len(eps)
    full = sum(full_logits_bytes(e, vocab) for e in eps) / len(eps)
    med = statistics.median
    out = {
        "model": args.model, "device": str(dev), "batch": args.batch, "max_length": args.max_length,
        "reps": args.reps, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "wake": {"cls_s": round(med(wt["cls"]), 4), "plain_s": round(med(wt["plain"]), 4),
                 "ratio": round(med(wt["cls"]) / med(wt["plain"]), 3), "target": 1.3},
        "sleep": {"cls_s": round(med(st["cls"]), 4), "plain_s": round(med(st["plain"]), 4),
                  "ratio": round(med(st["cls"]) / med(st["plain"]), 3), "target": 1.3,
                  "sleep_steps": S, "label_s": round(med(st["label"]), 4),
                  "step_s": round(med(st["step"]), 4), "ewc_s": round(med(st["ewc"]), 5)},
        "replay": {"top_k": args.top_k, "vocab": vocab, "episodes": len(eps),
                   "tokens_per_episode": round(sum(e.input_ids.numel() for e in eps) / len(eps), 1),
                   "supervised_per_episode": round(sum(e.positions.numel() for e in eps) / len(eps), 1),
                   "bytes_per_episode": round(stored, 1), "full_vocab_bytes_per_episode": round(full, 1),
                   "ratio": round(stored / full, 6)},
    }
    out["load_average"] = {"before": [round(x, 2) for x in load_before],
                           "after": [round(x, 2) for x in os.getloadavg()]}
    system.close()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
