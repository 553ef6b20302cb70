"""act_mag / wanda input statistics (now a sink of nn_core's padding-aware stream over
module-input taps) are bit-identical to the hand-rolled hooks they replaced, reproduced
here as the reference."""

from __future__ import annotations

import pytest
import torch

from nn_core.model.loading import load_model
from nn_sensitivity.metrics import _input_stats
from nn_sensitivity.params import _kind, eligible_params


@torch.no_grad()
def _reference(model, infos, batches, what):
    """Pre-hooks on every scored module: Σ|x| or Σx² over non-padding tokens (float64),
    token-id counts for an embedding."""
    modules = dict(model.named_modules())
    wanted = {i.module: modules[i.module] for i in infos}
    sums, counts, state = {}, {m: 0 for m in wanted}, {}

    def hook_for(name, mod):
        def pre(module, args):
            keep = state["keep"]
            if _kind(mod) == "embedding":
                ids = state["ids"][keep]
                part, n = torch.bincount(ids, minlength=mod.num_embeddings).double(), ids.numel()
            else:
                flat = args[0].reshape(-1, args[0].shape[-1])[keep].double()
                part = flat.abs().sum(0) if what == "abs_sum" else (flat * flat).sum(0)
                n = flat.shape[0]
            sums[name] = part if name not in sums else sums[name] + part
            counts[name] += n
        return pre

    handles = [mod.register_forward_pre_hook(hook_for(n, mod)) for n, mod in wanted.items()]
    model.eval()
    try:
        for b in batches:
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            state["keep"], state["ids"] = mask.reshape(-1).bool(), b["input_ids"].reshape(-1)
            model(input_ids=b["input_ids"], attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return sums, counts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("what", ["abs_sum", "sq_sum"])
def test_input_stats_bit_identical_to_reference(arch, what):
    model, _ = load_model(f"tiny-{arch}", device="cpu", dtype="float32")
    infos = eligible_params(model, include_embeddings=True, include_lm_head=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0  # right padding
    batches = [{"input_ids": ids, "attention_mask": mask},
               {"input_ids": torch.randint(0, 256, (2, 9), generator=g)}]
    sums, counts = _input_stats(model, infos, batches, what, False)
    ref_sums, ref_counts = _reference(model, infos, batches, what)
    assert set(sums) == set(ref_sums) and counts == ref_counts
    assert any(_kind(m) == "embedding" for n, m in model.named_modules() if n in sums)
    for name in sums:
        assert torch.equal(sums[name], ref_sums[name]), name
