"""capture_matrix (now a sink of nn_core's padding-aware stream) is bit-identical to the
hand-rolled capture it replaced, reproduced here as the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_core.data import tokenize_texts
from nn_core.intervene.hooks import hooked
from nn_core.model.adapters import get_adapter
from nn_core.model.loading import load_model
from nn_ica.build import capture_matrix

TEXTS = [f"Text {i}: {'lorem ipsum ' * (i % 4)}the fox {i * 3} jumps." for i in range(13)]


@torch.no_grad()
def _reference(model, token_ids, *, site, layers, max_tokens, batch_size, seed, pad_id=0):
    """The capture of nn-ica before it used nn_core.intervene.capture (kept rows chosen in
    advance, forward hooks write them into one preallocated matrix)."""
    width = get_adapter(model).width(site)
    seqs = [list(s) for s in token_ids if len(s) > 0]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    total = int(lengths.sum())
    keep_n = min(max_tokens, total)
    flat_keep = np.sort(np.random.default_rng(seed).choice(total, size=keep_n, replace=False))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    seq_of = np.searchsorted(starts, flat_keep, side="right") - 1
    pos_of = flat_keep - starts[seq_of]
    x = torch.empty((keep_n, len(layers) * width), dtype=torch.float32)
    state = {}

    def writer(block):
        def fn(act):
            x[state["dst"], block * width:(block + 1) * width] = act.reshape(-1, act.shape[-1])[state["src"]].float()
        return fn

    order = np.argsort(-lengths, kind="stable")
    row_of = {}
    for row, (s, p) in enumerate(zip(seq_of.tolist(), pos_of.tolist(), strict=True)):
        row_of.setdefault(s, []).append((p, row))
    model.eval()
    with hooked(model, {(layer, site): writer(b) for b, layer in enumerate(layers)}):
        for idx in [order[i:i + batch_size] for i in range(0, len(order), batch_size)]:
            wanted = [(j, p, row) for j, s in enumerate(idx.tolist()) for p, row in row_of.get(s, [])]
            if not wanted:
                continue
            tmax = int(lengths[idx].max())
            ids = torch.full((len(idx), tmax), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), tmax), dtype=torch.long)
            for j, s in enumerate(idx.tolist()):
                ids[j, : lengths[s]] = torch.tensor(seqs[s], dtype=torch.long)
                mask[j, : lengths[s]] = 1
            state["src"] = torch.tensor([j * tmax + p for j, p, _ in wanted])
            state["dst"] = torch.tensor([r for _, _, r in wanted])
            model(input_ids=ids, attention_mask=mask)
    return x


@pytest.mark.parametrize("arch,site,max_tokens", [("llama", "mlp_act", 40), ("gpt2", "mlp_out", 10_000)])
def test_capture_matrix_bit_identical_to_reference(arch, site, max_tokens):
    model, tok = load_model(f"tiny-{arch}")
    ids = tokenize_texts(tok, TEXTS, max_length=32)
    kw = dict(site=site, layers=[0, 1], max_tokens=max_tokens, batch_size=4, seed=5)
    new = capture_matrix(model, ids, progress=False, **kw)
    ref = _reference(model, ids, **kw)
    assert new.x.shape == ref.shape
    assert torch.equal(new.x, ref)
