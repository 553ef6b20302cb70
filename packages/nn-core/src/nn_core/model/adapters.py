"""Architecture adapters: where the decoder blocks and the MLP down-projection live.

The down-projection follows one rule for every architecture: inside a decoder block's
MLP, the linear map with ``out_features == hidden_size`` and ``in_features >
hidden_size``. Known architectures are a registry keyed by ``config.model_type``; any
other model gets the structural fallback, which applies that rule to the module tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.model.sites import SITES, SiteRef, as_site_ref, check_site


@dataclass(frozen=True)
class ArchSpec:
    """Where things are for one architecture (paths relative to the top model)."""

    layers: tuple[str, ...]  # candidate paths of the ModuleList of decoder blocks
    down_proj: str  # path of the down-projection inside one block
    conv1d: bool = False  # GPT-2 style Conv1D: weight stored as (in, out)
    final_norm: str = "norm"  # the final norm, a sibling of the decoder-block list


_LLAMA_LIKE = ArchSpec(
    layers=("model.layers", "model.language_model.layers", "language_model.model.layers"),
    down_proj="mlp.down_proj",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": ArchSpec(layers=("transformer.h",), down_proj="mlp.c_proj", conv1d=True,
                     final_norm="ln_f"),
    "gpt_neox": ArchSpec(layers=("gpt_neox.layers",), down_proj="mlp.dense_4h_to_h",
                         final_norm="final_layer_norm"),
    "opt": ArchSpec(layers=("model.decoder.layers",), down_proj="fc2",
                    final_norm="final_layer_norm"),
}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def is_conv1d(mod: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D`` (weight stored as (in, out)) and for modules that keep its
    layout (a :class:`~nn_core.intervene.surgery.SplitLinear` made from one sets
    ``conv1d_layout``)."""
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return True
    return isinstance(mod, nn.Module) and getattr(mod, "conv1d_layout", False) is True


def linear_in_out(mod: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear, a quantized Linear or a GPT-2 Conv1D."""
    if is_conv1d(mod):
        return int(mod.weight.shape[0]), int(mod.nf)
    if isinstance(mod, nn.Linear) or (
        hasattr(mod, "in_features") and hasattr(mod, "out_features")
    ):
        return int(mod.in_features), int(mod.out_features)
    return None


def _hidden_size(config) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    text = getattr(config, "text_config", None)
    if text is not None:
        return _hidden_size(text)
    raise NNError("cannot find hidden_size in the model config: this architecture is not supported")


class ModelAdapter:
    """Resolved view of one model: decoder blocks, down-projections and site widths.

    >>> ad = get_adapter(model)
    >>> ad.num_layers, ad.hidden_size, ad.intermediate_size
    >>> ad.down_proj(3)          # the module; ad.down_proj_path(3) its dotted name
    """

    def __init__(self, model: nn.Module, layers_path: str, down_rel: str, conv1d: bool,
                 source: str, final_norm_name: str | None = None):
        self.model = model
        self.final_norm_name = final_norm_name  # registry hint; None: find it structurally
        self.model_type = getattr(model.config, "model_type", type(model).__name__)
        self.layers_path = layers_path
        self.down_rel = down_rel
        self.conv1d = conv1d
        self.source = source  # "registry" or "structural"
        blocks = _get(model, layers_path)
        assert isinstance(blocks, nn.ModuleList)
        self.layers: list[nn.Module] = list(blocks)
        self.hidden_size = _hidden_size(model.config)
        first = self.down_proj(0)
        io = linear_in_out(first)
        if io is None:
            raise NNError(f"{self.down_proj_path(0)} is not a linear layer: unsupported model")
        self.intermediate_size = io[0]

    # ----------------------------------------------------------------- structure
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def down_proj_name(self) -> str:
        """Leaf name of the down-projection (what PEFT ``target_modules`` matches)."""
        return self.down_rel.rsplit(".", 1)[-1]

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise NNError(
                f"layer {layer} is out of range: this model has layers 0..{self.num_layers - 1}"
            )
        return layer

    def layer(self, layer: int) -> nn.Module:
        return self.layers[self.check_layer(layer)]

    def layer_path(self, layer: int) -> str:
        return f"{self.layers_path}.{self.check_layer(layer)}"

    def down_proj(self, layer: int) -> nn.Module:
        mod = _get(self.layer(layer), self.down_rel)
        if mod is None:
            raise NNError(f"{self.down_proj_path(layer)} does not exist: unsupported model layout")
        return mod

    def down_proj_path(self, layer: int) -> str:
        return f"{self.layer_path(layer)}.{self.down_rel}"

    def down_weight_name(self, layer: int) -> str:
        return f"{self.down_proj_path(layer)}.weight"

    def down_weight(self, layer: int) -> torch.Tensor:
        return self.down_proj(layer).weight

    # ------------------------------------------------------- embedding, norm, head
    def _path_of(self, target: nn.Module, what: str) -> str:
        for name, mod in self.model.named_modules():
            if mod is target:
                return name
        raise NNError(f"the {what} is not a submodule of the model: unsupported model layout")

    def embedding(self) -> nn.Module:
        """The input token embedding (``model.get_input_embeddings()``): ids -> the vectors the
        model adds position embeddings to (GPT-2, OPT) or scales (Gemma 2) before block 0.
        Its output passed as ``inputs_embeds=`` gives the same logits as the ids."""
        get = getattr(self.model, "get_input_embeddings", None)
        emb = None
        try:
            emb = get() if get is not None else None
        except (AttributeError, NotImplementedError):
            emb = None
        if emb is None:
            vocab = getattr(self.model.config, "vocab_size", None)
            found = [m for _, m in self.model.named_modules()
                     if isinstance(m, nn.Embedding) and m.num_embeddings == vocab]
            if len(found) != 1:
                raise NNError("cannot find the input embedding: the model has no "
                              "get_input_embeddings() and no single vocab-sized nn.Embedding")
            emb = found[0]
        return emb

    def embedding_path(self) -> str:
        return self._path_of(self.embedding(), "input embedding")

    def final_norm_path(self) -> str:
        """Dotted name of the norm applied to the last block's output before the LM head: a
        sibling of the decoder-block list (``model.norm``, ``transformer.ln_f``,
        ``gpt_neox.final_layer_norm``, ``model.decoder.final_layer_norm``)."""
        parent_path = self.layers_path.rsplit(".", 1)[0] if "." in self.layers_path else ""
        parent = _get(self.model, parent_path) if parent_path else self.model
        prefix = f"{parent_path}." if parent_path else ""
        if self.final_norm_name is not None and _get(parent, self.final_norm_name) is not None:
            return prefix + self.final_norm_name
        norms = [name for name, mod in parent.named_children()
                 if "norm" in type(mod).__name__.lower() or name in ("ln_f", "norm")]
        if len(norms) != 1:
            raise NNError(f"cannot find the final norm next to {self.layers_path}: found "
                          f"{norms or 'none'}; unsupported model layout")
        return prefix + norms[0]

    def final_norm(self) -> nn.Module:
        """The final norm: ``lm_head(final_norm(h))`` are the logits for the last block's
        output ``h`` (before Gemma 2's final logit soft-capping, where configured)."""
        return _get(self.model, self.final_norm_path())

    def lm_head(self) -> nn.Module:
        """The output projection hidden -> vocabulary logits (``get_output_embeddings()``)."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = None
        try:
            head = get() if get is not None else None
        except (AttributeError, NotImplementedError):
            head = None
        if head is None:
            vocab = getattr(self.model.config, "vocab_size", None)
            found = [m for n, m in self.model.named_modules()
                     if not n.startswith(self.layers_path + ".")
                     and (io := linear_in_out(m)) is not None and io[1] == vocab]
            if len(found) != 1:
                raise NNError("cannot find the LM head: the model has no get_output_embeddings() "
                              "and no single vocab-sized linear layer outside the blocks")
            head = found[0]
        return head

    def lm_head_path(self) -> str:
        return self._path_of(self.lm_head(), "LM head")

    def neuron_dim(self) -> int:
        """Dimension of the down-projection weight indexed by ``mlp_act`` channels.

        ``nn.Linear`` stores (out, in): the input channel is dim 1. Conv1D stores (in, out):
        dim 0. ``mlp_out`` channels live on the other dimension.
        """
        return 0 if self.conv1d else 1

    def width(self, site: str) -> int:

        site = check_site(site)
        return self.intermediate_size if site == "mlp_act" else self.hidden_size

    def widths(self) -> dict[str, int]:

        return {s: self.width(s) for s in SITES}

    def describe(self) -> dict:
        """A JSON-able summary: what ``nn-core sites MODEL`` prints."""
        return {
            "model_id": model_id(self.model),
            "model_type": self.model_type,
            "adapter": self.source,
            "num_layers": self.num_layers,
            "widths": self.widths(),
            "layers_path": self.layers_path,
            "down_proj": self.down_rel + (" (Conv1D, weight is (in, out))" if self.conv1d else ""),
            "sites": {
                "mlp_act": f"input of {self.down_proj_path(0).replace('.0.', '.{i}.')}",
                "mlp_out": f"output of {self.down_proj_path(0).replace('.0.', '.{i}.')}",
                "resid": f"output of {self.layer_path(0).replace('.0', '.{i}')}",
            },
        }


def model_id(model: nn.Module) -> str:
    """The id a model was loaded under (alias, hub id or path); '' if unknown."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or "")


def _num_layers_from_config(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    text = getattr(config, "text_config", None)
    return _num_layers_from_config(text) if text is not None else None


def _structural(model: nn.Module) -> ModelAdapter:
    """Find the decoder blocks and the down-projection by the seed rule."""
    config = model.config
    hidden = _hidden_size(config)
    n_layers = _num_layers_from_config(config)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    for layers_path, blocks in candidates:
        block = blocks[0]
        downs = []
        for rel, sub in block.named_modules():
            io = linear_in_out(sub)
            if io is not None and io[1] == hidden and io[0] > hidden:
                downs.append((rel, sub))
        if len(downs) == 1:
            rel, sub = downs[0]
            return ModelAdapter(model, layers_path, rel, is_conv1d(sub), "structural")
        # prefer the candidate inside an MLP-named submodule when there are several
        mlp = [d for d in downs if any(k in d[0] for k in ("mlp", "ffn", "feed_forward"))]
        if len(mlp) == 1:
            rel, sub = mlp[0]
            return ModelAdapter(model, layers_path, rel, is_conv1d(sub), "structural")
    raise NNError(
        f"unsupported architecture '{getattr(config, 'model_type', type(model).__name__)}': "
        f"no MLP down-projection found; supported types are {', '.join(sorted(ARCHITECTURES))}"
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Resolve the adapter for ``model`` (cached on the model object)."""
    cached = getattr(model, "_nn_adapter", None)
    if cached is not None and cached.model is model:
        return cached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise NNError("the model has no config.model_type: pass a Hugging Face causal LM")
    spec = ARCHITECTURES.get(model_type)
    adapter = None
    if spec is not None:
        for path in spec.layers:
            blocks = _get(model, path)
            if isinstance(blocks, nn.ModuleList) and _get(blocks[0], spec.down_proj) is not None:
                adapter = ModelAdapter(model, path, spec.down_proj, spec.conv1d, "registry",
                                       spec.final_norm)
                break
    if adapter is None:
        adapter = _structural(model)
    object.__setattr__(model, "_nn_adapter", adapter)
    return adapter


def invalidate_adapter(model: nn.Module) -> None:
    """Drop the adapter cached on ``model``; the next :func:`get_adapter` resolves afresh.

    Call after replacing modules (e.g. :mod:`nn_core.intervene.surgery` does)."""
    if getattr(model, "_nn_adapter", None) is not None:
        object.__setattr__(model, "_nn_adapter", None)


def model_signature(model: nn.Module) -> dict:
    """What a selection records about the model it was made for."""
    ad = get_adapter(model)
    return {
        "model_id": model_id(model),
        "model_type": ad.model_type,
        "num_layers": ad.num_layers,
        "widths": ad.widths(),
    }


def site_module(model: nn.Module, ref: SiteRef) -> tuple[nn.Module, str]:
    """The module to hook for ``ref`` and how: ``"pre"`` (its input) or ``"post"`` (its output)."""
    ad = get_adapter(model)
    ref = as_site_ref(ref)
    if ref.site == "mlp_act":
        return ad.down_proj(ref.layer), "pre"
    if ref.site == "mlp_out":
        return ad.down_proj(ref.layer), "post"
    return ad.layer(ref.layer), "post"
