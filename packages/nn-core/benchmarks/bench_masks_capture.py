"""nn-core benchmark on smollm2-135m (CPU): cost of masks and memory of streaming capture.

Prints JSON. Figures are ratios against baselines measured in the same run (the machines
are shared and noisy), never absolute thresholds:

* ``mask_overhead``: forward with a lesion mask on every layer's mlp_act / plain forward
  (target <= 1.05). Median of several interleaved repetitions.
* ``capture_memory_growth``: peak resident-memory growth of ``capture(reducer="mean")``
  when the number of tokens is multiplied by 4 (target < 10 %), measured in fresh
  subprocesses so the peaks do not contaminate each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _mask_overhead(reps: int, batch: int, seq: int) -> dict:
    import torch

    from nn_core.intervene.masks import mask_neurons
    from nn_core.model.adapters import get_adapter
    from nn_core.model.loading import load_model
    from nn_core.select.neuronset import NeuronSet

    torch.set_num_threads(torch.get_num_threads())
    model, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
    ad = get_adapter(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ns = NeuronSet.for_model(model, {(i, "mlp_act"): range(0, ad.intermediate_size, 5)
                                     for i in range(ad.num_layers)})
    handle = mask_neurons(model, ns, "lesion")

    def run() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        return time.perf_counter() - t

    run()  # warm-up
    plain, masked = [], []
    for _ in range(reps):
        plain.append(run())
        with handle:
            masked.append(run())
    return {
        "tokens_per_forward": batch * seq,
        "plain_s_median": statistics.median(plain),
        "masked_s_median": statistics.median(masked),
        "mask_overhead_ratio": statistics.median(masked) / statistics.median(plain),
        "target": "<= 1.05",
    }


def _capture_peak(n_batches: int, batch: int, seq: int) -> None:
    """Child process: capture with a reducer over n_batches and print peak RSS growth."""
    import resource

    import torch

    from nn_core.intervene.hooks import capture
    from nn_core.model.adapters import get_adapter
    from nn_core.model.loading import load_model

    model, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
    ad = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    sites = [(i, s) for i in range(ad.num_layers) for s in ("mlp_act", "mlp_out")]

    def batches():
        for _ in range(n_batches):
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # one warm-up batch so allocator pools exist before the baseline is read
    capture(model, sites, [next(batches())], reducer="mean")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = capture(model, sites, batches(), reducer="mean")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": res.n_tokens, "peak_kib_before": before, "peak_kib_after": after}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--capture-batches", type=int, default=2)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _capture_peak(args.child, args.batch, args.seq)
        return
    out = {"benchmark": "nn-core masks and capture", "model": "smollm2-135m", "device": "cpu"}
    out["mask"] = _mask_overhead(args.reps, args.batch, args.seq)
    peaks = {}
    for mult in (1, 4):
        n = args.capture_batches * mult
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch", str(args.batch),
                               "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        peaks[mult] = json.loads(proc.stdout.strip().splitlines()[-1])
    base, big = peaks[1]["peak_kib_after"], peaks[4]["peak_kib_after"]
    out["capture"] = {
        "tokens_x1": peaks[1]["tokens"],
        "tokens_x4": peaks[4]["tokens"],
        "peak_rss_mib_x1": round(base / 1024, 1),
        "peak_rss_mib_x4": round(big / 1024, 1),
        "capture_memory_growth": (big - base) / base,
        "target": "< 0.10",
        "peak_rss_growth_mib": round((big - base) / 1024, 1),
        # what keeping every token (no reducer) would add at x4, for scale: tokens x
        # (30 layers x (1536 + 576) channels) x 4 bytes
        "unreduced_storage_mib_x4": round(peaks[4]["tokens"] * 30 * (1536 + 576) * 4 / 2**20, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
