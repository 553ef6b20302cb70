"""Masked fine-tuning: train with ICA networks lesioned or preserved.

The chosen components' union S is masked in the forward pass for the whole run
(:func:`nn_core.intervene.masks.mask_neurons`, modes as in :mod:`nn_ica.evaluate`). The mask is
attached to the down-projection *after* PEFT wraps the model, so it sits on the LoRA
layer itself and gates the input (``mlp_act``) or output (``mlp_out``) of the frozen
weight and of the LoRA path alike. A masked channel therefore contributes nothing to the
loss and its weights get exactly zero gradient: the down-projection slice it owns, its
LoRA ``A`` column (``mlp_act``) or ``B`` row (``mlp_out``), and, through it, nothing
reaches the gate/up projections.

Zero gradient alone does not keep a masked channel's weights fixed:

* full fine-tuning: AdamW's decoupled weight decay still shrinks them;
* LoRA: the merged update is ``ΔW = (α/r) B A``; ``A`` starts random, so once ``B``
  trains, the column ``ΔW[:, j] = (α/r) B A[:, j]`` of a masked channel j is non-zero
  although ``A[:, j]`` never received a gradient.

That matters whenever the model is later used *without* the mask (the point of
protecting a network from forgetting). ``freeze_masked=True`` makes it exact: the weight
slices owned by masked channels (lesion: S; preserve: everything outside S) stay
bit-identical. Full fine-tuning of the down-projection uses a row/column
:class:`~nn_core.intervene.masks.WeightMask` (zero gradient + write-back after every optimizer
step) and freezes the down-projection's bias, which belongs to no channel; LoRA zeroes ``A[:, j]`` (``B[c, :]`` for ``mlp_out``) of masked channels before
training and keeps them zero the same way, so ``ΔW`` is exactly zero on those slices and
the merged weight equals the original there. A channel j of ``mlp_act`` owns column j of
an ``nn.Linear`` down-projection weight (row j of GPT-2's Conv1D); a channel c of
``mlp_out`` owns output row c.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.intervene.masks import WeightMask, check_mode, mask_neurons
from nn_core.select.neuronset import NeuronSet
from nn_ica.templates import Templates


def lora_channel_mask(peft_model: nn.Module, neurons: NeuronSet, mode: str) -> WeightMask:
    """A WeightMask over the down-projections' LoRA matrices that freezes (and zeroes)
    the slices of masked channels: ``A[:, j]`` for ``mlp_act`` channel j, ``B[c, :]``
    for ``mlp_out`` channel c. Masked means "in S" for lesion, "not in S" for preserve.

    Only the layers ``neurons`` covers (:meth:`NeuronSet.covered_layers`: ``meta["layers"]``
    when the templates were built on some layers, else all) are constrained; the LoRA
    matrices of other layers are neither zeroed nor frozen."""
    from nn_core.model.adapters import get_adapter
    from nn_core.train import base_model

    check_mode(mode)
    base = base_model(peft_model)
    ad = get_adapter(base)
    names = {id(p): n for n, p in base.named_parameters()}
    trainable: dict[str, torch.Tensor] = {}
    # Only the layers the set is about (meta["layers"], else all): a layer the templates never
    # analysed is not constrained, in lesion or preserve (as nn_core.intervene.masks does).
    for layer in neurons.covered_layers(ad.num_layers):
        mod = ad.down_proj(layer)
        if not hasattr(mod, "lora_A") or not len(mod.lora_A):
            raise NNError(f"the down-projection of layer {layer} ({ad.down_proj_path(layer)}) has no LoRA "
                          "adapter: keep the down-projection among the LoRA targets")
        for site, group, dim in (("mlp_act", mod.lora_A, 1), ("mlp_out", mod.lora_B, 0)):
            if site not in neurons.sites:
                continue
            sel_idx = neurons.indices(layer, site)
            for lin in group.values():
                w = lin.weight
                passes = torch.zeros(w.shape[dim], dtype=torch.bool)
                passes[sel_idx] = True
                if mode == "lesion":
                    passes = ~passes
                shape = [1, 1]
                shape[dim] = -1
                mask = passes.view(shape).expand(w.shape).clone()
                with torch.no_grad():
                    w.mul_(mask.to(device=w.device, dtype=w.dtype))
                trainable[names[id(w)]] = mask
    return WeightMask(base, trainable)


def masked_finetune(
    model: nn.Module,
    tokenizer,
    examples: Sequence,
    templates: Templates,
    components: Sequence[int],
    config,
    *,
    mode: str = "lesion",
    freeze_masked: bool = False,
    site: str | None = None,
    check_id: bool = True,
    model_spec: str | None = None,
    callbacks: Sequence = (),
    resume: bool | str = True,
    tool: str | None = None,
):
    """Fine-tune ``model`` with components ``components`` masked (see the module docs).

    ``config`` is an :class:`nn_core.train.SFTConfig`; with ``method="full"`` and no
    ``trainable_modules`` only the down-projections train. Writes ``adapter/`` (or
    ``model/``) holding the weights, ``mask.json`` (the NeuronSet, to re-apply the mask at
    inference), ``train_log.json`` and ``manifest.json``, renamed into place as one unit
    (:func:`nn_core.train.train`), and copies of those three files in
    ``config.output_dir``. Returns the :class:`nn_core.train.SFTResult`.

    ``site``, when given, must be the templates' site. A run fingerprint (templates
    content, component ids, mode, freeze flag, SFT settings, training data) is written to
    the output folder; resuming a checkpoint left there by a different run raises
    :class:`NNError`. ``mask.json`` is written in the same temporary folder as the adapter
    (or model) and its manifest, so a folder never pairs an adapter with another run's
    mask or holds one without its mask and manifest.
    """
    from pathlib import Path

    from nn_core.model.adapters import get_adapter
    from nn_core.train import (
        WeightMaskCallback,
        base_model,
        build_trainer,
        prepare_model,
        run_fingerprint,
        train,
    )

    check_mode(mode)
    config.check()
    templates.check(model, site=site, check_id=check_id)
    ids = templates.check_ids(components)
    ns = templates.neuronset(ids, model=model)
    if config.method == "full" and not config.trainable_modules:
        config = replace(config, trainable_modules=[get_adapter(model).down_rel])
    fingerprint = run_fingerprint(config, {
        "templates": templates.to_dict(), "components": list(ids), "mode": mode,
        "freeze_masked": bool(freeze_masked), "data": _examples_digest(examples),
    })
    wrapped = prepare_model(model, config)
    base = base_model(wrapped)
    cbs = list(callbacks)
    if freeze_masked:
        if config.method == "full":
            from nn_core.intervene.masks import down_proj_weight_mask

            # A bias (GPT-2, OPT) belongs to no channel: training it would move every output.
            for layer in range(get_adapter(base).num_layers):
                bias = getattr(get_adapter(base).down_proj(layer), "bias", None)
                if bias is not None:
                    bias.requires_grad_(False)
            cbs.append(WeightMaskCallback(lambda: down_proj_weight_mask(base, ns, mode)))
        else:
            cbs.append(WeightMaskCallback(lambda: lora_channel_mask(wrapped, ns, mode)))
    trainer = build_trainer(wrapped, tokenizer, examples, config, callbacks=cbs, prepare=False)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    handle = mask_neurons(base, ns, mode)  # after wrapping: on the LoRA layer, see module docs
    handle.attach()
    try:
        # mask.json goes into the adapter's temporary folder: adapter, mask and manifest
        # arrive together in one rename (then are copied to ``out``), never one without the other
        result = train(trainer, config, resume=resume, model_spec=model_spec, fingerprint=fingerprint, tool=tool,
                       extra_files=lambda folder: ns.save(folder / "mask.json"), manifest_extra={
            "ica": {"components": ids, "mode": mode, "site": templates.site, "n_neurons": len(ns),
                    "freeze_masked": freeze_masked,
                    "templates": {k: templates.metadata.get(k) for k in ("model_id", "backend", "seed",
                                                                         "percentile", "created_at")}},
        })
    finally:
        handle.remove()
    return result


def _examples_digest(examples: Sequence) -> str:
    """A hash of the training data as given (Examples or ready features)."""
    import dataclasses
    import hashlib
    import json

    h = hashlib.sha256()
    for ex in examples:
        obj = dataclasses.asdict(ex) if dataclasses.is_dataclass(ex) else ex
        h.update(json.dumps(obj, sort_keys=True, default=_plain).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _plain(obj):
    # tensors/arrays in full: str() of a large tensor elides its middle
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)
