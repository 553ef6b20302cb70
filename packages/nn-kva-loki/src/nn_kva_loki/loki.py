"""LoKI models: train only the selected output rows of every MLP down-projection.

A LoKI model is an ordinary causal LM whose down-projection in each layer ``l`` is a
:class:`nn_core.intervene.surgery.SplitLinear` split by *rows* (output channels, site
``mlp_out``): the rows ``P_l`` (the LoKI positions of layer ``l``) and their bias entries are
the only trainable parameters; every other row, and every other parameter of the model, is
frozen (a buffer or ``requires_grad=False``), so it has no gradient, no optimizer state and
no weight decay and stays bit-identical through training. For GPT-2's ``Conv1D`` (weight
stored ``(in, out)``) an output row is a weight *column*; SplitLinear handles the layout.

The forward pass is bit-identical to the plain model's before training: the effective
weight is the frozen original with the trainable slice written back into it.

**On disk** (``"loki_format": "nn.loki/1"``): a LoKI folder *is* a plain Hugging Face
folder (``config.json``, safetensors, tokenizer) holding the full weights, whose config
also records ``loki_format`` and ``target_pos`` (the positions, ``List[List[int]]``, one
list per layer, the field name of the original LoKI configs). Any HF pipeline loads it as
the plain model; :func:`load_loki` and :func:`nn_core.load_model` re-apply the split
(:func:`nn_core.intervene.surgery.apply_loki_config`), without ``trust_remote_code``.
:func:`restore` merges the splits back and drops the marker: create -> save -> load ->
restore gives a state dict bit-identical to the original's when nothing trained (tied
embeddings stay tied).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from nn_core.errors import NNError
from nn_core.intervene.surgery import (
    LOKI_FORMAT,
    LOKI_FORMAT_KEY,
    LOKI_POSITIONS_KEY,
    SplitLinear,
    check_loki_positions,
    merge_all,
    split_down_proj,
    split_modules,
    train_only_splits,
)
from nn_core.model.adapters import get_adapter
from nn_core.select.neuronset import NeuronSet

SITE = "mlp_out"
POSITIONS_FILE = "positions.json"


# ------------------------------------------------------------------ positions
def _raw_positions(source):
    """A NeuronSet, a per-layer list, or what a path holds (LoKI position JSON, a NeuronSet
    JSON, a LoKI/HF config with target_pos, or a folder with positions.json / config.json)."""
    from nn_core.io import read_json

    if isinstance(source, (NeuronSet, list, tuple)):
        return source, "positions"
    if not isinstance(source, (str, os.PathLike)):
        raise NNError("positions must be a NeuronSet, a list of per-layer index lists or a JSON file")
    path = Path(source)
    if path.is_dir():
        for name in (POSITIONS_FILE, "neurons.json", "config.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise NNError(f"'{source}' is a folder without positions.json, neurons.json or config.json: "
                          "pass a LoKI position file or the output folder of nn-kva-loki select")
    obj = read_json(path, what="LoKI position", fix="pass positions.json from nn-kva-loki select")
    if isinstance(obj, dict) and obj.get("format") == "nn.neuronset/1":
        return NeuronSet.from_dict(obj), str(path)
    if isinstance(obj, dict) and LOKI_POSITIONS_KEY in obj:
        return obj[LOKI_POSITIONS_KEY], f"positions file {path}"
    if isinstance(obj, dict):
        raise NNError(f"{path} holds neither LoKI positions (a list of per-layer lists), a NeuronSet nor "
                      "a config with target_pos: pass positions.json from nn-kva-loki select")
    return obj, f"positions file {path}"


def resolve_positions(model: nn.Module, source) -> list[list[int]]:
    """LoKI positions for ``model``: one sorted list of down-projection output channels per
    layer, checked strictly (exactly one list per layer, integers in ``0..hidden-1``, no
    duplicates: :func:`nn_core.intervene.surgery.check_loki_positions`).

    ``source``: a :class:`NeuronSet` of ``mlp_out`` channels (validated against the model;
    layers it does not select get no trainable rows), a ``List[List[int]]``, or a path (a
    LoKI position JSON, a NeuronSet JSON, a config with ``target_pos``, or a folder that
    holds one of them, e.g. the output of ``nn-kva-loki select``)."""
    from nn_core.select.formats import neuronset_to_loki

    ad = get_adapter(model)
    raw, what = _raw_positions(source)
    if isinstance(raw, NeuronSet):
        other = [s for s in raw.sites if s != SITE]
        if other and any(raw.layer_counts(s) for s in other):
            raise NNError(f"{what}: the NeuronSet selects {', '.join(other)} neurons; LoKI trains "
                          f"down-projection output rows ({SITE})")
        raw.validate(model, check_id=False)
        raw = neuronset_to_loki(raw, site=SITE, num_layers=ad.num_layers)
    if isinstance(raw, tuple):
        raw = list(raw)
    return check_loki_positions(raw, ad.num_layers, ad.width(SITE), what=what)


def precheck_positions(source) -> None:
    """Check what can be checked of ``source`` without the model (before loading it): the
    file is readable, and a per-layer list holds distinct non-negative integers. The layer
    count and the upper bound need the model (:func:`resolve_positions`)."""
    raw, what = _raw_positions(source)
    if not isinstance(raw, NeuronSet):
        check_loki_positions(raw, None, None, what=what)


# ------------------------------------------------------------------ model
def is_loki(model: nn.Module) -> bool:
    """True when ``model`` carries the LoKI marker and split down-projections."""
    return getattr(getattr(model, "config", None), LOKI_FORMAT_KEY, None) == LOKI_FORMAT and bool(split_modules(model))


def create_loki(model: nn.Module, positions) -> nn.Module:
    """Turn ``model`` (in place) into a LoKI model for ``positions`` (see
    :func:`resolve_positions`); returns it.

    Every layer's down-projection is split by rows, only the selected rows (and bias
    entries) train, everything else is frozen; ``config.loki_format``/``config.target_pos``
    record the positions. Logits are unchanged (bit-identical forward)."""
    if split_modules(model):
        raise NNError("the model already has split layers (a LoKI model?): restore it first, or load "
                      "the plain model")
    pos = resolve_positions(model, positions)
    split_down_proj(model, pos, by="rows")
    train_only_splits(model)
    setattr(model.config, LOKI_FORMAT_KEY, LOKI_FORMAT)
    setattr(model.config, LOKI_POSITIONS_KEY, pos)
    return model


def loki_positions(model: nn.Module) -> list[list[int]]:
    """The positions a LoKI model trains (from its split layers, one list per layer)."""
    ad = get_adapter(model)
    out = []
    for layer in range(ad.num_layers):
        mod = ad.down_proj(layer)
        if not isinstance(mod, SplitLinear) or mod.split != "rows":
            raise NNError(f"layer {layer}'s down-projection is not a LoKI split: this is not a LoKI model")
        out.append(mod.index.tolist())
    return out


def active_parameters(model: nn.Module) -> int:
    """Trainable entries of a LoKI model: ``sum_l |P_l| * (in_features + has_bias)``."""
    return sum(m.n_trainable for m in split_modules(model).values())


def restore(model: nn.Module) -> nn.Module:
    """Merge a LoKI model back into the plain model (in place; returns it): every split
    down-projection becomes the original module class with the current (trained) weights,
    the config marker is dropped and every parameter has ``requires_grad=True`` again (as
    a freshly loaded HF model)."""
    if not split_modules(model):
        raise NNError("the model has no LoKI split layers: nothing to restore")
    merge_all(model)
    for key in (LOKI_FORMAT_KEY, LOKI_POSITIONS_KEY):
        if hasattr(model.config, key):
            delattr(model.config, key)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------ disk
def write_hf_folder(model: nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer into an existing folder; for a
    LoKI model also ``positions.json``. A split layer saves as its plain ``weight``/``bias``."""
    from nn_core.io import atomic_write_json

    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if getattr(model.config, LOKI_FORMAT_KEY, None) == LOKI_FORMAT:
        atomic_write_json(folder / POSITIONS_FILE, getattr(model.config, LOKI_POSITIONS_KEY), indent=None)
    return folder


def save_loki(model: nn.Module, out: str | os.PathLike, tokenizer=None, *, tool: str = "nn-kva-loki create",
              overwrite: bool = False, manifest: dict | None = None, model_spec: str | None = None) -> Path:
    """Write a LoKI model as a standard HF folder (see the module docs) atomically, with a
    ``manifest.json`` naming ``tool``; ``out`` may replace only a previous output of the same
    tool unless ``overwrite`` (:func:`nn_core.io.check_output_dir`)."""
    from nn_core.io import atomic_dir
    from nn_core.run.manifest import write_manifest

    if not is_loki(model):
        raise NNError("not a LoKI model: make one with create_loki(model, positions)")
    with atomic_dir(out, tool=tool, overwrite=overwrite) as tmp:
        write_hf_folder(model, tmp, tokenizer)
        write_manifest(tmp, config=dict(manifest or {}), model=model, model_spec=model_spec, tool=tool,
                       extra={"format": LOKI_FORMAT, "active_parameters": active_parameters(model),
                              "positions_per_layer": [len(p) for p in loki_positions(model)]})
    return Path(out)


def load_loki(folder: str | os.PathLike, *, device="auto", dtype="auto"):
    """``(model, tokenizer)`` of a LoKI folder, split again (only the recorded rows train).
    A folder without the ``nn.loki/1`` marker raises :class:`NNError`."""
    from nn_core.model.loading import load_model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise NNError(f"'{folder}' is not a model folder (no config.json): pass a folder written by "
                      "nn-kva-loki create or train")
    from nn_core.io import read_json

    cfg = read_json(folder / "config.json", what="model config")
    if not isinstance(cfg, dict) or cfg.get(LOKI_FORMAT_KEY) != LOKI_FORMAT:
        raise NNError(f"'{folder}' is a plain model folder, not a LoKI model (no \"{LOKI_FORMAT_KEY}\": "
                      f"\"{LOKI_FORMAT}\" in config.json): create one with nn-kva-loki create")
    model, tok = load_model(str(folder), device=device, dtype=dtype)
    if not is_loki(model):  # the loader's config hook did not split it
        raise NNError(f"'{folder}' records LoKI positions but loading did not split the model: update nn-core")
    return model, tok


def count_optimizer_state(optimizer) -> int:
    """Elements held in an optimizer's per-parameter state tensors (AdamW: ``exp_avg`` and
    ``exp_avg_sq``; the scalar ``step`` is not counted)."""
    import torch

    return sum(t.numel() for st in optimizer.state.values() for k, t in st.items()
               if isinstance(t, torch.Tensor) and k != "step")


def lora_rank_for_budget(model: nn.Module, budget: int) -> tuple[int, int]:
    """The LoRA rank ``r >= 1`` on every layer's down-projection whose parameter count
    ``r * L * (in + out)`` is closest to ``budget`` (ties: the smaller r); returns
    ``(r, r * L * (in + out))``."""
    ad = get_adapter(model)
    mod = ad.down_proj(0)
    d_in = int(getattr(mod, "in_features", 0) or ad.width("mlp_act"))
    d_out = int(getattr(mod, "out_features", 0) or ad.width("mlp_out"))
    per_rank = ad.num_layers * (d_in + d_out)
    lo = max(1, budget // per_rank)
    best = min((lo, lo + 1), key=lambda r: (abs(r * per_rank - budget), r))
    return best, best * per_rank
