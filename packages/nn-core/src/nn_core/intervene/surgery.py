"""Module surgery: train only some rows or columns of a linear layer, with no optimizer state
for the rest.

A weight ``W`` is split along one of its channel axes into a trainable slice and a frozen
rest. ``rows`` are *output* channels, ``cols`` are *input* channels, whatever the storage
layout: ``nn.Linear`` stores ``W`` as (out, in), so rows are ``W[r, :]`` and columns
``W[:, c]``; GPT-2's ``Conv1D`` stores (in, out), so its output rows are weight *columns*
``W[:, r]`` and its input columns are weight rows ``W[c, :]``.

:class:`SplitLinear` holds

* ``trainable``: an ``nn.Parameter``, the selected slice of ``W`` in the stored layout
  (``W.index_select(dim, index)``);
* ``frozen``: a buffer (no gradient, hence no optimizer state, no weight decay) with the
  full original weight; its entries on the trainable slice are never read;
* ``index``: the sorted selected channels, and ``dim``: the weight dimension they index;
* the bias the same way: for a row split ``bias[index]`` is a parameter
  (``bias_trainable``) and the whole original bias a buffer (``bias_frozen``); for a column
  split the bias belongs to no input channel and is entirely frozen.

Forward: ``W' = frozen.index_copy(dim, index, trainable)`` (the same bits as the original
weight until training moves ``trainable``) and one ``F.linear(x, W', b')`` (``addmm`` for a
Conv1D, as its own forward does), so the output is bit-identical to the original module's
for inputs of any rank. The backward computes the input gradient ``g @ W'`` as usual but
the weight gradient only for the trainable slice (``g[:, r]^T x`` for rows, ``g^T x[:, c]``
for columns), which is cheaper than a plain Linear's full weight gradient.

:func:`merge` turns a split back into the original module class (the same object the split
was made from, its parameters re-created): its state dict is bit-identical to the original
when nothing trained and carries the trained values otherwise. Forward hooks registered on
the module move across a split and a merge.

With ``device_map`` (accelerate): a split stays on its weight's device and moves an input
that arrives on another device there (the output stays on the layer's device, as an
accelerate-dispatched module's does without ``io_same_device``); an *offloaded* layer (weight
on the ``meta`` device, filled in by an accelerate hook during the forward) cannot be split
(:class:`NNError`).

A split's state dict is the original module's (``weight``, ``bias``: the current effective
values), so a split model's ``state_dict()``/``save_pretrained`` give a plain checkpoint and a
plain state dict loads into it (the selected slice into ``trainable``, in place).
:func:`apply_loki_config` re-applies a split recorded in a model's config (the
``nn.loki/1`` marker), which :func:`nn_core.model.loading.load_model` calls. Every replacement invalidates the cached
:func:`~nn_core.model.adapters.get_adapter` resolution.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nn_core.errors import NNError
from nn_core.model.adapters import get_adapter, invalidate_adapter, is_conv1d
from nn_core.select.neuronset import NeuronSet

SPLITS = ("rows", "cols")

# hook registries that move with the module, so handles registered before surgery still work
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks",
)


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    for attr in _HOOK_DICTS:
        if attr in src.__dict__:
            object.__setattr__(dst, attr, src.__dict__[attr])
    if "_is_full_backward_hook" in src.__dict__:
        object.__setattr__(dst, "_is_full_backward_hook", src.__dict__["_is_full_backward_hook"])


class _SplitMatmul(torch.autograd.Function):
    """y = x W'^T + b' (Linear) or x W' + b' (Conv1D), W' = frozen with ``trainable`` written
    into the slice ``index`` of dimension ``dim``; gradients for x, trainable, bias_trainable."""

    @staticmethod
    def forward(ctx, x, trainable, bias_trainable, frozen, index, dim, bias_frozen, conv1d):
        w = frozen.index_copy(dim, index, trainable)
        b = bias_frozen
        if b is not None and bias_trainable is not None:
            b = b.index_copy(0, index, bias_trainable)
        if conv1d:
            size_out = (*x.shape[:-1], w.shape[1])
            flat = x.reshape(-1, x.shape[-1])
            y = torch.addmm(b, flat, w) if b is not None else flat @ w
            y = y.view(size_out)
        else:
            y = F.linear(x, w, b)
        ctx.save_for_backward(x, trainable, frozen, index)
        ctx.dim, ctx.conv1d, ctx.has_bias_t = dim, conv1d, bias_trainable is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, trainable, frozen, index = ctx.saved_tensors
        dim, conv1d = ctx.dim, ctx.conv1d
        g2 = g.reshape(-1, g.shape[-1])
        gx = gt = gb = None
        if ctx.needs_input_grad[0]:
            w = frozen.index_copy(dim, index, trainable)
            gx = (g2 @ (w.t() if conv1d else w)).view(x.shape)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            # output channels are dim 0 of a Linear weight and dim 1 of a Conv1D weight
            rows = (dim == 0) != conv1d
            if rows:
                gsel = g2.index_select(1, index)
                gt = gsel.t() @ x2 if not conv1d else x2.t() @ gsel
            else:
                xsel = x2.index_select(1, index)
                gt = g2.t() @ xsel if not conv1d else xsel.t() @ g2
            gt = gt.to(trainable.dtype)
        if ctx.has_bias_t and ctx.needs_input_grad[2]:
            gb = g2.index_select(1, index).sum(0)
        return gx, gt, gb, None, None, None, None, None


class SplitLinear(nn.Module):
    """A Linear or Conv1D whose ``index`` rows (output channels) or columns (input channels)
    train and whose rest is a frozen buffer; see the module docs for the exact semantics.

    ``in_features``/``out_features`` (and ``nf``/``nx`` for a Conv1D) are those of the
    original; ``weight`` and ``bias`` are read-only views assembled on access (differentiable
    with respect to the trainable slice), in the original storage layout.
    """

    def __init__(self, base: nn.Module, index: torch.Tensor, split: str):
        super().__init__()
        if split not in SPLITS:
            raise NNError(f"unknown split '{split}': use rows or cols")
        conv1d = is_conv1d(base)
        weight = base.weight
        self.conv1d_layout = conv1d
        self.split = split
        if conv1d:
            self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])
            self.nf, self.nx = self.out_features, self.in_features
        else:
            self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        # weight dimension of the selected channels in the stored layout
        self.dim = (0 if split == "rows" else 1) if not conv1d else (1 if split == "rows" else 0)
        index = index.to(device=weight.device, dtype=torch.long)
        base_bias = getattr(base, "bias", None)
        with torch.no_grad():
            self.register_buffer("index", index.clone())
            self.register_buffer("frozen", weight.detach().clone())
            self.trainable = nn.Parameter(weight.detach().index_select(self.dim, index).clone())
            if base_bias is None:
                self.register_buffer("bias_frozen", None)
                self.bias_trainable = None
            else:
                self.register_buffer("bias_frozen", base_bias.detach().clone())
                if split == "rows":
                    self.bias_trainable = nn.Parameter(base_bias.detach().index_select(0, index).clone())
                else:
                    self.bias_trainable = None
        self._requires_grad = (weight.requires_grad,
                               None if base_bias is None else base_bias.requires_grad)
        # the original module, its parameters detached, re-filled by merge()
        object.__setattr__(self, "_shell", base)

    # ----------------------------------------------------------------- views
    @property
    def n_trainable(self) -> int:
        """Number of trainable entries (weight slice plus bias slice)."""
        n = self.trainable.numel()
        return n + (self.bias_trainable.numel() if self.bias_trainable is not None else 0)

    @property
    def weight(self) -> torch.Tensor:
        """The full effective weight in the original layout (a new tensor on every access)."""
        return self.frozen.index_copy(self.dim, self.index, self.trainable)

    @property
    def bias(self) -> torch.Tensor | None:
        if self.bias_frozen is None:
            return None
        if self.bias_trainable is None:
            return self.bias_frozen
        return self.bias_frozen.index_copy(0, self.index, self.bias_trainable)

    def trainable_mask(self) -> torch.Tensor:
        """Boolean mask of the weight's shape, True on the trainable slice."""
        mask = torch.zeros(self.frozen.shape, dtype=torch.bool, device=self.frozen.device)
        return mask.index_fill_(self.dim, self.index, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.frozen.device:  # a device_map that placed this layer apart from its input
            x = x.to(self.frozen.device)
        return _SplitMatmul.apply(x, self.trainable, self.bias_trainable, self.frozen, self.index,
                                  self.dim, self.bias_frozen, self.conv1d_layout)

    # ------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The state dict is the original module's: ``weight`` (and ``bias``), the current
        effective values in the original layout. A split model therefore saves, and its
        checkpoints load, like the plain model (``save_pretrained`` writes a plain folder)."""
        w = self.weight
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if self.bias_frozen is not None:
            b = self.bias
            destination[prefix + "bias"] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Load a plain ``weight`` (and ``bias``): the whole tensor into the frozen buffer, its
        selected slice into the trainable parameter (in place, so optimizers keep it)."""
        expected = ["weight"] + (["bias"] if self.bias_frozen is not None else [])
        with torch.no_grad():
            for name in expected:
                key = prefix + name
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict[key]
                full = self.frozen if name == "weight" else self.bias_frozen
                if tuple(value.shape) != tuple(full.shape):
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                      f"{tuple(value.shape)}, the split layer has {tuple(full.shape)}")
                    continue
                full.copy_(value)
                part = self.trainable if name == "weight" else self.bias_trainable
                if part is not None:
                    dim = self.dim if name == "weight" else 0
                    part.copy_(value.to(part.device).index_select(dim, self.index))
        if strict:
            for key in state_dict:
                rest = key[len(prefix):] if key.startswith(prefix) else None
                if rest is not None and "." not in rest and rest not in expected:
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.conv1d_layout else "Linear"
        return (f"{kind}(in={self.in_features}, out={self.out_features}), trainable {self.split} "
                f"{self.index.numel()}, bias={self.bias_frozen is not None}")

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The original module (same class and object) with the current effective weight and
        bias as fresh parameters; ``requires_grad`` as the original had it."""
        shell = self._shell
        w_rg, b_rg = self._requires_grad
        shell.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=w_rg)
        if self.bias_frozen is not None:
            shell.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=bool(b_rg))
        shell.train(self.training)
        _move_hooks(self, shell)
        return shell


def _check_index(idx, size: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(idx if not isinstance(idx, torch.Tensor) else idx.detach().cpu())
    if t.dtype == torch.bool:
        if t.numel() != size:
            raise NNError(f"{what} mask has {t.numel()} entries, the layer has {size}")
        t = t.nonzero().flatten()
    t = t.flatten()
    if t.numel() and (t.is_floating_point() or t.is_complex()):
        raise NNError(f"{what} must be integer channel indices, got {t.dtype}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise NNError(f"{what} out of range: the layer has channels 0..{size - 1}")
    return torch.unique(t, sorted=True)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        getattr(parent, leaf)
    except AttributeError:
        raise NNError(f"no module named '{path}' in the model") from None
    return parent, leaf


def split_linear(model: nn.Module, module_path: str, *, rows=None, cols=None) -> SplitLinear:
    """Replace the Linear/Conv1D at ``module_path`` by a :class:`SplitLinear` whose ``rows``
    (output channels) or ``cols`` (input channels) train; returns the new module.

    Indices may be ints, a tensor, or a boolean mask over the channels; they are sorted and
    de-duplicated. An empty selection freezes the whole layer.
    """
    if (rows is None) == (cols is None):
        raise NNError("split_linear needs exactly one of rows= (output channels) or cols= (input channels)")
    parent, leaf = _parent(model, module_path)
    base = getattr(parent, leaf)
    if isinstance(base, SplitLinear):
        raise NNError(f"{module_path} is already split: merge it first")
    if not (type(base) is nn.Linear or is_conv1d(base)):
        raise NNError(f"{module_path} is a {type(base).__name__}: only nn.Linear and GPT-2 Conv1D "
                      "can be split (not quantized or PEFT-wrapped layers)")
    if base.weight.device.type == "meta" or getattr(getattr(base, "_hf_hook", None), "offload", False):
        raise NNError(f"{module_path} is offloaded (its weight is loaded only during the forward, "
                      "device_map with CPU/disk offload): load the model without offloading to split it")
    shared = sum(1 for _, p in model.named_parameters(remove_duplicate=False) if p is base.weight)
    if shared > 1:
        raise NNError(f"the weight of {module_path} is tied to another module: untie it before splitting")
    io_out = base.weight.shape[1] if is_conv1d(base) else base.weight.shape[0]
    io_in = base.weight.shape[0] if is_conv1d(base) else base.weight.shape[1]
    split = "rows" if rows is not None else "cols"
    index = _check_index(rows if rows is not None else cols, int(io_out if split == "rows" else io_in),
                         f"{split} of {module_path}")
    new = SplitLinear(base, index, split)
    new.train(base.training)
    _move_hooks(base, new)
    base.weight = None
    if getattr(base, "bias", None) is not None:
        base.bias = None
    setattr(parent, leaf, new)
    invalidate_adapter(model)
    return new


def merge(model: nn.Module, module_path: str) -> nn.Module:
    """Replace the :class:`SplitLinear` at ``module_path`` by the plain module it came from,
    carrying the trained values; returns that module."""
    parent, leaf = _parent(model, module_path)
    split = getattr(parent, leaf)
    if not isinstance(split, SplitLinear):
        raise NNError(f"{module_path} is a {type(split).__name__}, not a split layer: nothing to merge")
    plain = split.merged()
    setattr(parent, leaf, plain)
    invalidate_adapter(model)
    return plain


def split_modules(model: nn.Module) -> dict[str, SplitLinear]:
    """Every :class:`SplitLinear` in ``model`` by dotted path."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, SplitLinear)}


def merge_all(model: nn.Module) -> list[str]:
    """Merge every split layer of ``model``; returns their paths."""
    paths = list(split_modules(model))
    for path in paths:
        merge(model, path)
    return paths


def _per_layer(selection, n_layers: int, by: str | None) -> tuple[dict[int, torch.Tensor], str]:
    if isinstance(selection, NeuronSet):
        sites = [s for s in selection.sites if s in ("mlp_act", "mlp_out")]
        other = [s for s in selection.sites if s not in ("mlp_act", "mlp_out")]
        if other:
            raise NNError(f"split_down_proj needs mlp_act or mlp_out neurons, not {other}")
        if by is None:
            if len(sites) != 1:
                raise NNError("the NeuronSet has both mlp_act and mlp_out neurons: pass by='rows' "
                              "(mlp_out) or by='cols' (mlp_act)")
            site = sites[0]
        else:
            site = "mlp_out" if by == "rows" else "mlp_act"
            if site not in sites:
                raise NNError(f"by='{by}' splits {site} channels but the NeuronSet has only "
                              f"{', '.join(sites) or 'no MLP sites'}")
        return ({layer: selection.indices(layer, site) for layer in selection.covered_layers(n_layers)},
                "rows" if site == "mlp_out" else "cols")
    if by is None:
        raise NNError("positions per layer need by='rows' (down-projection output channels) or "
                      "by='cols' (its input channels, mlp_act neurons)")
    if isinstance(selection, Mapping):
        items = {int(k): v for k, v in selection.items()}
    elif isinstance(selection, Sequence):
        if len(selection) != n_layers:
            raise NNError(f"positions cover {len(selection)} layers, the model has {n_layers}: "
                          "give one list per layer")
        items = dict(enumerate(selection))
    else:
        raise NNError("pass a NeuronSet, a list of index lists (one per layer) or {layer: indices}")
    bad = [k for k in items if not 0 <= k < n_layers]
    if bad:
        raise NNError(f"layer(s) {bad} out of range: the model has layers 0..{n_layers - 1}")
    return {k: torch.as_tensor(list(v) if not isinstance(v, torch.Tensor) else v, dtype=torch.long)
            for k, v in items.items()}, by


def split_down_proj(model: nn.Module, selection: NeuronSet | Sequence[Iterable[int]] | Mapping[int, Iterable[int]],
                    by: str | None = None) -> dict[int, SplitLinear]:
    """Split the MLP down-projection of every layer a selection covers; returns them by layer.

    ``selection``: a :class:`NeuronSet` (``mlp_out`` channels are down-projection output
    rows, ``mlp_act`` channels its input columns; ``by`` picks one site where the set has
    both) or positions per layer (LoKI's ``List[List[int]]`` or ``{layer: indices}``) with
    ``by="rows"|"cols"``. A covered layer without selected channels is split with nothing
    trainable (frozen); layers outside a NeuronSet's ``meta["layers"]`` are left as they are.
    """
    if by is not None and by not in SPLITS:
        raise NNError(f"unknown by='{by}': use rows (output channels) or cols (input channels)")
    ad = get_adapter(model)
    if isinstance(selection, NeuronSet):
        selection.validate(model, check_id=False)
    per_layer, split = _per_layer(selection, ad.num_layers, by)
    paths = {layer: ad.down_proj_path(layer) for layer in sorted(per_layer)}
    out: dict[int, SplitLinear] = {}
    for layer, path in paths.items():
        kw = {"rows": per_layer[layer]} if split == "rows" else {"cols": per_layer[layer]}
        out[layer] = split_linear(model, path, **kw)
    return out


# ------------------------------------------------------------------ training only the splits
def train_only_splits(model: nn.Module) -> int:
    """Freeze every parameter of ``model`` except the trainable slices of its split layers
    (``requires_grad`` False elsewhere, True on ``trainable``/``bias_trainable``); returns the
    number of trainable entries."""
    keep = set()
    for mod in split_modules(model).values():
        keep.add(id(mod.trainable))
        if mod.bias_trainable is not None:
            keep.add(id(mod.bias_trainable))
    n = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        n += p.numel() if id(p) in keep else 0
    return n


# ------------------------------------------------------------------ saved LoKI splits
LOKI_FORMAT = "nn.loki/1"
LOKI_FORMAT_KEY = "loki_format"
LOKI_POSITIONS_KEY = "target_pos"  # the field name of the original LoKI configs


def check_loki_positions(positions, num_layers: int | None, width: int | None, *,
                         what: str = "positions") -> list[list[int]]:
    """LoKI positions (one list of down-projection output channels per layer) checked
    strictly: exactly ``num_layers`` lists of distinct non-negative integers below
    ``width``; returns them sorted. ``num_layers`` / ``width`` ``None``: that bound is not
    checked (e.g. before the model is loaded). Anything else raises one :class:`NNError`
    line naming the fix."""
    if not isinstance(positions, (list, tuple)) or not all(isinstance(x, (list, tuple)) for x in positions):
        raise NNError(f"{what} must be one list of channel indices per layer, e.g. [[3, 17], [], [5]]")
    if num_layers is not None and len(positions) != num_layers:
        raise NNError(f"{what} cover {len(positions)} layers but the model has {num_layers}: "
                      "they were made for another model")
    out = []
    for layer, values in enumerate(positions):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise NNError(f"{what}: layer {layer} holds a non-integer index: indices are integers")
        neg = [v for v in values if v < 0]
        if neg:
            raise NNError(f"{what}: layer {layer} holds the negative index {neg[0]}: indices are "
                          "channel numbers 0..hidden-1")
        bad = [v for v in values if width is not None and v >= width]
        if bad:
            raise NNError(f"{what}: layer {layer} holds index {bad[0]}, out of range 0..{width - 1}: "
                          "they were made for another model")
        if len(set(values)) != len(values):
            dup = sorted(v for v in set(values) if list(values).count(v) > 1)[0]
            raise NNError(f"{what}: layer {layer} lists index {dup} twice: give each channel once")
        out.append(sorted(int(v) for v in values))
    return out


def apply_loki_config(model: nn.Module) -> dict[int, SplitLinear]:
    """Re-apply the LoKI split a model's config records: with ``config.loki_format ==
    "nn.loki/1"`` the output rows ``config.target_pos[l]`` of every layer's down-projection
    become the only trainable parameters (:func:`split_down_proj` by rows, then
    :func:`train_only_splits`). Weights are not changed. A model without the marker is left
    alone (returns ``{}``); an unknown format or bad positions raise :class:`NNError`."""
    config = getattr(model, "config", None)
    fmt = getattr(config, LOKI_FORMAT_KEY, None)
    if fmt is None:
        return {}
    if fmt != LOKI_FORMAT:
        raise NNError(f"the model's config says loki_format '{fmt}', this nn-core reads {LOKI_FORMAT}: "
                      "update nn-core or re-create the LoKI model")
    if split_modules(model):
        raise NNError("the model already has split layers: apply the LoKI split to a plain model")
    ad = get_adapter(model)
    positions = check_loki_positions(getattr(config, LOKI_POSITIONS_KEY, None), ad.num_layers, ad.width("mlp_out"),
                                what="the config's target_pos")
    splits = split_down_proj(model, positions, by="rows")
    train_only_splits(model)
    return splits
