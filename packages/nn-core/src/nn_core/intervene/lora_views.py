"""LoRA-aware views of weights: the effective weight of a PEFT-wrapped layer, slice by slice,
and PEFT's parameter names mapped back to the plain model's.

PEFT wraps a targeted layer ``<path>`` of the plain model in a ``LoraLayer`` whose frozen
original is ``<path>.base_layer`` and whose adapters are ``lora_A[name]`` (r x in) and
``lora_B[name]`` (out x r) with a factor ``scaling[name]``. The layer computes
``base(x) + scaling * B(A(x))`` for each active adapter, i.e. it acts as the weight

    W = W0 + sum_a scaling_a * B_a @ A_a          (nn.Linear base, stored (out, in))
    W = W0 + sum_a scaling_a * (B_a @ A_a)^T      (Conv1D base, fan_in_fan_out, stored (in, out))

in the *stored layout of the base weight*, which is the layout of the plain model's
``<path>.weight``. :func:`effective_weight` returns slices of that W without forming the
full ``B @ A``: rows ``r`` and columns ``c`` of the stored weight cost
``W0[r][:, c] + s * L[r] @ R[:, c]`` with ``(L, R) = (B, A)`` for a Linear base and
``(A^T, B^T)`` for a fan_in_fan_out base, i.e. O((|r| + |c|) * rank + |r| * |c|) work.
Adapters already merged into ``W0`` are not added again; with adapters disabled, merged
ones are taken out again (PEFT unmerges them before a disabled forward). The result
equals the same slice of ``merge_and_unload()``'s weight up to float rounding.

Names: :func:`original_param_name` maps PEFT's names
(``base_model.model.<path>.base_layer.weight``, ``base_model.model.<path>.lora_A.default.weight``,
``...modules_to_save.default.weight``, ``...original_module.weight``) to ``<path>.weight``,
so a :class:`~nn_core.select.weightset.WeightSet` made on the plain model addresses the same
weights on the PEFT model.
"""

from __future__ import annotations

import torch
from torch import nn

from nn_core.errors import NNError

_PEFT_PREFIX = "base_model.model."
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def original_param_name(name: str) -> str:
    """The plain model's name of a parameter of a PEFT-wrapped model.

    ``base_model.model.`` is dropped; ``base_layer`` and ``original_module`` segments are
    dropped; ``modules_to_save.<adapter>`` is dropped; a LoRA parameter
    (``<path>.lora_A.<adapter>.weight``, ``lora_B``, ``lora_embedding_*``,
    ``lora_magnitude_vector``) names the weight it modifies, ``<path>.weight`` (a LoRA-B
    bias, ``<path>.lora_B.<adapter>.bias``, names ``<path>.bias``). A plain name is
    returned unchanged.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part in ("base_layer", "original_module"):
            i += 1
            continue
        if part == "modules_to_save":
            i += 2  # the segment and the adapter name
            continue
        if part in _LORA_PARTS:
            out.append("bias" if part == "lora_B" and parts[-1] == "bias" else "weight")
            break
        out.append(part)
        i += 1
    return ".".join(out)


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer: has ``base_layer``, ``lora_A``, ``lora_B`` and ``scaling``."""
    return all(hasattr(module, a) for a in ("base_layer", "lora_A", "lora_B", "scaling"))


def _root(model: nn.Module) -> nn.Module:
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    orig = original_param_name(name)
    path, _, leaf = orig.rpartition(".")
    root = _root(model)
    try:
        mod = root.get_submodule(path) if path else root
    except AttributeError:
        raise NNError(f"no module '{path}' in the model (parameter '{orig}'): use a name of the "
                      "plain model's named_parameters()") from None
    return mod, leaf, orig


def _active_terms(layer: nn.Module) -> list[tuple[str, float]]:
    """(adapter, sign) pairs whose delta the layer's forward adds to its stored base weight."""
    merged = list(getattr(layer, "merged_adapters", []) or [])
    if getattr(layer, "disable_adapters", False):
        terms = [(a, -1.0) for a in merged]
    else:
        active = getattr(layer, "active_adapters", None) or []
        if isinstance(active, str):
            active = [active]
        terms = [(a, 1.0) for a in active if a in layer.lora_A and a not in merged]
    for a, _ in terms:
        variants = getattr(layer, "lora_variant", {}) or {}
        dora = (getattr(layer, "use_dora", {}) or {}).get(a, False)
        if a in variants or dora:
            raise NNError(f"adapter '{a}' is a LoRA variant (e.g. DoRA), not plain LoRA: its "
                          "effective weight is not W0 + s*B@A; merge a copy with merge_and_unload()")
        if a not in layer.lora_B or not hasattr(layer.lora_A[a], "weight"):
            raise NNError(f"adapter '{a}' has no linear lora_A/lora_B: only LoRA on Linear and "
                          "Conv1D layers is supported")
    return terms


def _index(idx, size: int, what: str, device) -> torch.Tensor | None:
    if idx is None:
        return None
    t = torch.as_tensor(idx).to(device=device)
    if t.dtype == torch.bool:
        if t.numel() != size:
            raise NNError(f"{what} mask has {t.numel()} entries, the dimension has {size}")
        t = t.nonzero().flatten()
    t = t.flatten().long()
    if t.numel() and (int(t.min()) < -size or int(t.max()) >= size):
        raise NNError(f"{what} out of range: the dimension has indices 0..{size - 1}")
    return t


def _module_to_save(mod: nn.Module) -> nn.Module:
    saved = mod.modules_to_save
    active = getattr(mod, "active_adapters", None) or []
    if isinstance(active, str):
        active = [active]
    if getattr(mod, "disable_adapters", False) or not active or any(a not in saved for a in active):
        return mod.original_module
    return saved[active[0]]


@torch.no_grad()
def effective_weight(model: nn.Module, original_name: str, rows=None, cols=None) -> torch.Tensor:
    """Rows and/or columns of the weight ``original_name`` as the (PEFT) model applies it.

    ``original_name`` is the plain model's parameter name (a PEFT name is mapped with
    :func:`original_param_name`). ``rows`` index dim 0 and ``cols`` dim 1 of the weight *as
    stored* in the plain model (for GPT-2's Conv1D, stored (in, out), rows are input
    channels); ints, tensors or boolean masks, None for all. Returns the detached
    ``W[rows][:, cols]`` with ``W = W0 + sum_a s_a * ΔW_a`` (see the module docs), computed
    without forming the full ΔW; a bias (1-D) takes ``rows`` only. On a layer PEFT did not
    wrap, or a plain model, it is that parameter's slice.
    """
    mod, leaf, orig = _owner(model, original_name)
    if is_lora_layer(mod):
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod.base_layer
        terms = _active_terms(mod)
    elif hasattr(mod, "modules_to_save") and hasattr(mod, "original_module"):
        base, terms = _module_to_save(mod), []
    else:
        base, terms = mod, []
    w0 = getattr(base, leaf, None)
    if not isinstance(w0, torch.Tensor):
        raise NNError(f"'{orig}' is not a parameter of the model: use a name of the plain model's "
                      "named_parameters()")
    r = _index(rows, w0.shape[0], f"rows of {orig}", w0.device)
    if w0.dim() == 1:
        if cols is not None:
            raise NNError(f"'{orig}' is 1-D: select entries with rows=, not cols=")
        out = w0 if r is None else w0.index_select(0, r)
        if leaf == "bias":
            for a, sign in terms:
                b = getattr(mod.lora_B[a], "bias", None)
                if b is not None:
                    b = b if r is None else b.index_select(0, r.to(b.device))
                    out = out + (sign * mod.scaling[a]) * b.to(device=out.device, dtype=out.dtype)
        return out.detach().clone() if out is w0 else out
    if w0.dim() != 2:
        raise NNError(f"'{orig}' has {w0.dim()} dimensions: only 1-D and 2-D weights have rows/cols")
    c = _index(cols, w0.shape[1], f"cols of {orig}", w0.device)
    out = w0 if r is None else w0.index_select(0, r)
    out = out if c is None else out.index_select(1, c)
    if leaf != "weight" or not terms:
        return out.detach().clone() if out is w0 else out
    fan_in_fan_out = bool(getattr(mod, "fan_in_fan_out", False))
    out = out.clone() if out is w0 else out
    for a, sign in terms:
        A = mod.lora_A[a].weight  # (rank, in)
        B = mod.lora_B[a].weight  # (out, rank)
        left, right = (A.t(), B.t()) if fan_in_fan_out else (B, A)  # stored W ~ left @ right
        if left.shape[0] != w0.shape[0] or right.shape[1] != w0.shape[1]:
            raise NNError(f"LoRA adapter '{a}' of '{orig}' has shapes {tuple(B.shape)} @ {tuple(A.shape)} "
                          f"that do not match the weight {tuple(w0.shape)} (fan_in_fan_out={fan_in_fan_out})")
        lft = left if r is None else left.index_select(0, r.to(left.device))
        rgt = right if c is None else right.index_select(1, c.to(right.device))
        compute = torch.float32 if lft.dtype in (torch.float16, torch.bfloat16) else lft.dtype
        delta = (lft.to(compute) @ rgt.to(compute)) * (sign * mod.scaling[a])
        out += delta.to(device=out.device, dtype=out.dtype)
    return out


@torch.no_grad()
def effective_values(model: nn.Module, original_name: str, flat_index) -> torch.Tensor:
    """Entries of the effective weight at flat (row-major, stored layout) indices, as a
    :class:`~nn_core.select.weightset.WeightSet` addresses them: ``W.flatten()[flat_index]``
    with ``W`` as in :func:`effective_weight`, at O(len(flat_index) * rank) cost."""
    mod, leaf, orig = _owner(model, original_name)
    if not (is_lora_layer(mod) and leaf == "weight"):
        full = effective_weight(model, orig)
        idx = _index(flat_index, full.numel(), f"indices of {orig}", full.device)
        return full.flatten().index_select(0, idx)
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod.base_layer
    w0 = base.weight
    idx = _index(flat_index, w0.numel(), f"indices of {orig}", w0.device)
    idx = torch.where(idx < 0, idx + w0.numel(), idx)
    n_cols = w0.shape[1]
    i, j = idx // n_cols, idx % n_cols
    out = w0.flatten().index_select(0, idx).clone()
    fan_in_fan_out = bool(getattr(mod, "fan_in_fan_out", False))
    for a, sign in _active_terms(mod):
        A, B = mod.lora_A[a].weight, mod.lora_B[a].weight
        left, right = (A.t(), B.t()) if fan_in_fan_out else (B, A)
        compute = torch.float32 if left.dtype in (torch.float16, torch.bfloat16) else left.dtype
        lft = left.index_select(0, i.to(left.device)).to(compute)  # (n, rank)
        rgt = right.index_select(1, j.to(right.device)).t().to(compute)  # (n, rank)
        out += ((lft * rgt).sum(-1) * (sign * mod.scaling[a])).to(device=out.device, dtype=out.dtype)
    return out
