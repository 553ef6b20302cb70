"""Which weights are scored: eligible parameters and exact-name filters.

By default every 2-D weight inside the decoder blocks is eligible; the input embedding
and the LM head join only when asked. Filters never match on substrings: a module filter
is a dotted name matched against whole components of the parameter's path, so
``layers.1`` matches ``model.layers.1.mlp.down_proj.weight`` and never
``model.layers.10.mlp.down_proj.weight``, and ``proj`` matches nothing in ``down_proj``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.model.adapters import get_adapter, is_conv1d, linear_in_out


@dataclass(frozen=True)
class ParamInfo:
    """One eligible weight tensor.

    ``layer`` is the decoder block index, or None for the embedding and LM head.
    ``kind`` is how the owning module uses the weight: ``linear`` ((out, in)), ``conv1d``
    (GPT-2, (in, out)), ``embedding`` ((vocab, dim), rows are picked by token id) or
    ``other``. ``input_dim`` is the weight dimension indexed by the module's input
    features (1 for linear, 0 for conv1d and embedding), or None for ``other``.
    """

    name: str
    module: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def input_dim(self) -> int | None:
        return {"linear": 1, "conv1d": 0, "embedding": 0}.get(self.kind)

    @property
    def group(self) -> str:
        """Ranking group for per-layer top-K: the decoder block, else the tensor itself."""
        return f"layer {self.layer}" if self.layer is not None else self.module


def _kind(module: nn.Module) -> str:
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if linear_in_out(module) is not None:
        return "linear"
    return "other"


def parse_layers(spec: str | Iterable[int] | None) -> list[int] | None:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7]; a list of ints passes through; None means all."""
    if spec is None or spec == "" or spec == "all":
        return None
    if not isinstance(spec, str):
        return sorted({int(x) for x in spec})
    out: set[int] = set()
    for part in spec.strip("[]() ").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise NNError(f"bad layer range '{part}': use e.g. --layers 0-3,7") from None
    return sorted(out)


def _components_match(path: Sequence[str], pattern: Sequence[str]) -> bool:
    n = len(pattern)
    return any(tuple(path[i:i + n]) == tuple(pattern) for i in range(len(path) - n + 1))


def eligible_params(
    model: nn.Module,
    *,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
    layers: str | Iterable[int] | None = None,
    modules: str | Iterable[str] | None = None,
) -> list[ParamInfo]:
    """The weights that will be scored, in the model's parameter order.

    ``layers``: decoder block indices (or ``"0-3,7"``); applies to block weights only.
    ``modules``: dotted names matched against whole path components (see module doc).
    Raises :class:`NNError` when a filter selects nothing, naming what exists, and when
    ``include_lm_head`` is asked of a model whose LM head is tied to the input embedding
    unless ``include_embeddings`` is also given (the shared matrix is then listed once,
    as the embedding).
    """
    ad = get_adapter(model)
    prefix = ad.layers_path + "."
    layer_set = parse_layers(layers)
    if layer_set is not None:
        bad = [i for i in layer_set if not 0 <= i < ad.num_layers]
        if bad:
            raise NNError(f"layer {bad[0]} is out of range: this model has layers 0..{ad.num_layers - 1}")
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    patterns = [tuple(m.split(".")) for m in modules] if modules else None

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if mod is emb:  # a tied matrix belongs to the embedding, whatever the order
                owners[id(p)] = (mod_name, mod, pname)
            else:
                owners.setdefault(id(p), (mod_name, mod, pname))
    head_w = getattr(head, "weight", None) if head is not None else None
    tied = head_w is not None and emb is not None and head_w is getattr(emb, "weight", None)
    if include_lm_head and tied and not include_embeddings:
        # One tensor, two roles: scoring it as "the LM head" would label the embedding.
        raise NNError("the LM head is tied to the embeddings in this model: use "
                      "--include-embeddings (the shared matrix is scored once, as the embedding)")
    special = set()
    if include_embeddings and emb is not None:
        special.add(id(emb.weight))
    if include_lm_head and head_w is not None:
        special.add(id(head_w))

    candidates: list[ParamInfo] = []
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        layer = None
        if name.startswith(prefix):
            layer = int(name[len(prefix):].split(".", 1)[0])
        elif id(p) not in special:
            continue
        mod_name, mod, _ = owners[id(p)]
        candidates.append(ParamInfo(name, mod_name, layer, _kind(mod), tuple(p.shape)))
    if not candidates:
        raise NNError("this model has no eligible 2-D weights: check the model or add "
                      "--include-embeddings / --include-lm-head")

    out = candidates
    if layer_set is not None:
        out = [c for c in out if c.layer is None or c.layer in layer_set]
    if patterns is not None:
        out = [c for c in out if any(_components_match(c.name.split("."), pat) for pat in patterns)]
    if not out:
        leaves = sorted({c.module.rsplit(".", 1)[-1] for c in candidates})
        raise NNError(
            f"the filters (layers={layers!r}, modules={modules!r}) select no weights: "
            f"module names here are {', '.join(leaves)} and layers 0..{ad.num_layers - 1}"
        )
    return out


def resolve_params(model: nn.Module, infos: Sequence[ParamInfo]) -> list[torch.Tensor]:
    """The live parameter tensors for ``infos``, in the same order."""
    table = dict(model.named_parameters())
    missing = [i.name for i in infos if i.name not in table]
    if missing:
        raise NNError(f"parameter '{missing[0]}' is not in this model: the selection was made "
                      "for another model")
    return [table[i.name] for i in infos]
