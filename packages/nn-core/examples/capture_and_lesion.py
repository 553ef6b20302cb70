"""A walk through nn-core's library calls on one model.

Resolve the sites, capture the mean ``mlp_act`` activation of every layer over a few
pydoc texts, lesion a random fraction of neurons per layer and, as a contrast, the same
number of neurons with the largest |mean activation|, and check that the logits come
back bit-identical once the masks are removed. Writes ``neurons.json``,
``top_activation_neurons.json``, ``results.json`` and ``manifest.json`` to ``--out`` as
one unit.

    uv run python packages/nn-core/examples/capture_and_lesion.py --model tiny-llama
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from nn_core import NeuronSet, capture, get_adapter, load_model, mask_neurons, seed_everything
from nn_core.data import collate, load_texts, sample, tokenize_texts
from nn_core.device import input_device
from nn_core.io import atomic_dir
from nn_core.run.manifest import PhaseTimer, write_manifest


def next_token_change(base: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mean KL(p_base || p_other) over real tokens (nats) and top-1 agreement."""
    keep = mask.reshape(-1).bool()
    lp = torch.log_softmax(base.reshape(-1, base.shape[-1])[keep].double(), -1)
    lq = torch.log_softmax(other.reshape(-1, other.shape[-1])[keep].double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    agree = (lp.argmax(-1) == lq.argmax(-1)).double()
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(agree.mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="runs/capture_and_lesion")
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0.0 < args.fraction < 1.0:
        ap.error(f"--fraction must be between 0 and 1, got {args.fraction}")

    timer = PhaseTimer()
    seed_everything(args.seed)
    t0 = time.perf_counter()
    with timer("load"):
        model, tok = load_model(args.model, seed=args.seed)
    ad = get_adapter(model)
    print(json.dumps(ad.describe(), indent=2))

    with timer("data"):
        texts = sample(load_texts("pydoc"), args.texts, args.seed)
        batch = collate(tokenize_texts(tok, texts, max_length=args.max_tokens), tok.pad_token_id)
        device = input_device(model)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}

    sites = [(layer, "mlp_act") for layer in range(ad.num_layers)]
    with timer("capture"):
        cap = capture(model, sites, [inputs], reducer="mean")

    width = ad.intermediate_size
    k = max(1, round(args.fraction * width))
    rng = np.random.default_rng(args.seed)
    random_ns = NeuronSet.for_model(
        model, {s: rng.choice(width, size=k, replace=False) for s in sites},
        method="random", parameters={"fraction": args.fraction, "seed": args.seed})
    top_ns = NeuronSet.for_model(
        model, {s: torch.topk(cap[s].abs(), k).indices.numpy() for s in sites},
        method="top_abs_mean_activation", parameters={"fraction": args.fraction, "texts": args.texts})

    with timer("interventions"), torch.no_grad():
        base = model(**inputs).logits.float().cpu()
        with mask_neurons(model, random_ns, "lesion"):
            lesioned = model(**inputs).logits.float().cpu()
        with mask_neurons(model, top_ns, "lesion"):
            top_lesioned = model(**inputs).logits.float().cpu()
        restored = model(**inputs).logits.float().cpu()
    exact = bool(torch.equal(base, restored))
    mask = batch["attention_mask"]
    results = {
        "model": args.model, "num_layers": ad.num_layers, "widths": ad.widths(),
        "texts": args.texts, "tokens": int(mask.sum()), "lesion_fraction": args.fraction,
        "lesioned_per_layer": k,
        "capture": {"reducer": "mean", "tokens": cap.n_tokens,
                    "per_layer": [{"layer": s[0], "mean_abs": float(cap[s].abs().mean()),
                                   "max_abs": float(cap[s].abs().max())} for s in sites]},
        "random_lesion": next_token_change(base, lesioned, mask),
        "top_activation_lesion": next_token_change(base, top_lesioned, mask),
        "restored_exactly": exact,
        "max_abs_logit_diff_after_restore": float((base - restored).abs().max()),
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    with atomic_dir(args.out) as tmp:  # results and provenance land together or not at all
        random_ns.save(tmp / "neurons.json")
        top_ns.save(tmp / "top_activation_neurons.json")
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        write_manifest(tmp, config=vars(args), model=model, model_spec=args.model,
                       seeds=args.seed, phases=timer)

    r, t = results["random_lesion"], results["top_activation_lesion"]
    print(f"random {args.fraction:.0%} lesion ({k}/{width} per layer): next-token KL "
          f"{r['kl_mean']:.4f} nats, top-1 agreement {r['top1_agreement']:.1%}")
    print(f"largest-|mean| lesion: next-token KL {t['kl_mean']:.4f} nats, "
          f"top-1 agreement {t['top1_agreement']:.1%}")
    print(f"masks removed: logits restored {'exactly' if exact else 'NOT exactly'}")
    print(f"wrote {args.out}")
    if not exact:
        print("error: logits differ after removing the masks; a hook leaked", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
