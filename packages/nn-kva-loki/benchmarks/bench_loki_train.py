"""LoKI train step vs a plain step that trains the same down-projection weights fully.

Two copies of the model (default: smollm2-135m, fp32, CPU):

* **loki**: :func:`nn_kva_loki.create_loki` with ``--quota`` percent of each layer's
  down-projection output rows (random, seeded), AdamW over the active rows only;
* **plain**: every parameter frozen except the down-projection weights (and biases), which
  train fully, AdamW over them.

One step = forward + backward + ``optimizer.step()`` + ``zero_grad`` on the same batch
(``--batch`` x ``--seq`` random tokens, labels = inputs). Steps alternate between the two
models (after ``--warmup`` steps each) to share the machine's noise; the figure is the
median step time. Reported: ``time_ratio = median(loki) / median(plain)`` (target <= 1.1),
the AdamW state elements of each (``exp_avg`` + ``exp_avg_sq``), ``memory_ratio`` =
loki / plain state and ``active_fraction`` = active rows / all rows (the ratio should equal
it). JSON on stdout and in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quota", type=float, default=5.0, help="percent of each layer's rows trained")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=str(Path(__file__).with_name("results_loki_train_cpu.json")))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from nn_core.model.adapters import get_adapter
    from nn_core.model.loading import load_model
    from nn_kva_loki.loki import active_parameters, count_optimizer_state, create_loki

    torch.manual_seed(0)
    loki, _ = load_model(args.model, device="cpu", dtype="float32")
    plain, _ = load_model(args.model, device="cpu", dtype="float32")
    ad = get_adapter(loki)
    L, H = ad.num_layers, ad.width("mlp_out")
    k = max(1, int(args.quota / 100 * H + 0.5))
    gen = torch.Generator().manual_seed(0)
    positions = [sorted(torch.randperm(H, generator=gen)[:k].tolist()) for _ in range(L)]
    create_loki(loki, positions)
    pad = get_adapter(plain)
    down = {id(p) for layer in range(L) for p in pad.down_proj(layer).parameters()}
    for prm in plain.parameters():
        prm.requires_grad_(id(prm) in down)
    opts = {
        "loki": torch.optim.AdamW([q for q in loki.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.01),
        "plain": torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.01),
    }
    models = {"loki": loki, "plain": plain}
    for m in models.values():
        m.train()
    vocab = loki.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)

    cpu: dict[str, list[float]] = {"loki": [], "plain": []}

    def step(name: str) -> float:
        m, opt = models[name], opts[name]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu[name].append(time.process_time() - c0)
        return time.perf_counter() - t0

    load_before = os.getloadavg()
    for _ in range(args.warmup):
        step("loki")
        step("plain")
    for v in cpu.values():
        v.clear()
    times: dict[str, list[float]] = {"loki": [], "plain": []}
    for i in range(args.steps):
        for name in (("loki", "plain") if i % 2 == 0 else ("plain", "loki")):
            times[name].append(step(name))
    load_after = os.getloadavg()
    med = {n: statistics.median(t) for n, t in times.items()}
    med_cpu = {n: statistics.median(t) for n, t in cpu.items()}
    state = {n: count_optimizer_state(o) for n, o in opts.items()}
    trained = {"loki": active_parameters(loki),
               "plain": sum(q.numel() for q in plain.parameters() if q.requires_grad)}
    result = {
        "model": args.model, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
        "num_layers": L, "hidden_size": H, "rows_per_layer": k, "quota_percent": args.quota,
        "active_fraction": k / H,
        "step_seconds_median": med, "step_seconds": times,
        "time_ratio": med["loki"] / med["plain"],
        "cpu_seconds_median": med_cpu, "cpu_seconds": cpu,
        "cpu_time_ratio": med_cpu["loki"] / med_cpu["plain"],
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "trainable_parameters": trained,
        "optimizer_state_elements": state,
        "optimizer_state_bytes": {n: 4 * v for n, v in state.items()},
        "memory_ratio": state["loki"] / state["plain"],
        "state_equals_2x_trainable": {n: state[n] == 2 * trained[n] for n in state},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
