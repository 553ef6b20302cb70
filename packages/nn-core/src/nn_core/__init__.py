"""nn-core: models, adapters, sites, hooks, masks and the NeuronSet/WeightSet currency.

The package is organised by concern (see docs/architecture.md); the names most users need
are exported here. They are resolved lazily (PEP 562) so that ``import nn_core.cli`` and
``nn-core --help`` do not pay for importing torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nn_core.lazy import lazy_exports

__version__ = "0.1.0"

# submodule (relative to nn_core) -> the public names it provides
_EXPORTS = {
    "data": ["Example", "batches", "collate", "load_instructions", "load_texts", "render", "split_texts", "token_blocks", "tokenize_examples", "tokenize_texts"],
    "device": ["resolve_device", "resolve_dtype", "seed_everything"],
    "errors": ["MissingExtraError", "NNError"],
    "intervene.capture": ["Capture", "PaddedCapture", "TokenBatch", "capture", "capture_padded", "stream_tokens"],
    "intervene.hooks": ["ModuleTap", "SiteHooks", "hooked"],
    "intervene.inject": ["inject"],
    "intervene.lora_views": ["effective_values", "effective_weight", "is_lora_layer", "original_param_name"],
    "intervene.masks": ["MaskHandle", "WeightMask", "down_proj_weight_mask", "mask_neurons"],
    "intervene.surgery": ["LOKI_FORMAT", "SplitLinear", "apply_loki_config", "check_loki_positions", "merge",
                          "merge_all", "split_down_proj", "split_linear", "split_modules", "train_only_splits"],
    "model.adapters": ["ModelAdapter", "get_adapter", "model_id", "model_signature"],
    "model.loading": ["load_model"],
    "model.sites": ["SITES", "SiteRef"],
    "numerics.gradients": ["GradStats", "abs_grad_sum", "hutchinson_diagonal", "mean_gradient", "per_sample_gradients", "squared_grad_mean"],
    "numerics.integrated_gradients": ["integrated_gradients", "target_positions"],
    "numerics.loss": ["causal_labels", "per_row_nll", "summed_nll", "token_scores"],
    "numerics.sparse_logits": ["SparseLogits", "sparse_kl", "top_k"],
    "run.manifest": ["PhaseTimer", "run_dir", "write_manifest"],
    "select.formats": ["neuronset_from_fnsft", "neuronset_from_loki", "neuronset_to_fnsft", "neuronset_to_loki", "neuronsets_from_fnsft"],
    "select.neuronset": ["NeuronSet"],
    "select.weightset": ["WeightSet"],
    "train": ["SFTConfig", "WeightMaskCallback", "base_model", "build_trainer", "prepare_model", "train"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers see the real names
    from nn_core.data import (  # noqa: F401
        Example,
        batches,
        collate,
        load_instructions,
        load_texts,
        render,
        split_texts,
        token_blocks,
        tokenize_examples,
        tokenize_texts,
    )
    from nn_core.device import resolve_device, resolve_dtype, seed_everything  # noqa: F401
    from nn_core.errors import MissingExtraError, NNError  # noqa: F401
    from nn_core.intervene.capture import (  # noqa: F401
        Capture,
        PaddedCapture,
        TokenBatch,
        capture,
        capture_padded,
        stream_tokens,
    )
    from nn_core.intervene.hooks import ModuleTap, SiteHooks, hooked  # noqa: F401
    from nn_core.intervene.inject import inject  # noqa: F401
    from nn_core.intervene.lora_views import (  # noqa: F401
        effective_values,
        effective_weight,
        is_lora_layer,
        original_param_name,
    )
    from nn_core.intervene.masks import MaskHandle, WeightMask, down_proj_weight_mask, mask_neurons  # noqa: F401
    from nn_core.intervene.surgery import (  # noqa: F401
        LOKI_FORMAT,
        SplitLinear,
        apply_loki_config,
        check_loki_positions,
        merge,
        merge_all,
        split_down_proj,
        split_linear,
        split_modules,
        train_only_splits,
    )
    from nn_core.model.adapters import ModelAdapter, get_adapter, model_id, model_signature  # noqa: F401
    from nn_core.model.loading import load_model  # noqa: F401
    from nn_core.model.sites import SITES, SiteRef  # noqa: F401
    from nn_core.numerics.gradients import (  # noqa: F401
        GradStats,
        abs_grad_sum,
        hutchinson_diagonal,
        mean_gradient,
        per_sample_gradients,
        squared_grad_mean,
    )
    from nn_core.numerics.integrated_gradients import integrated_gradients, target_positions  # noqa: F401
    from nn_core.numerics.loss import causal_labels, per_row_nll, summed_nll, token_scores  # noqa: F401
    from nn_core.numerics.sparse_logits import SparseLogits, sparse_kl, top_k  # noqa: F401
    from nn_core.run.manifest import PhaseTimer, run_dir, write_manifest  # noqa: F401
    from nn_core.select.formats import (  # noqa: F401
        neuronset_from_fnsft,
        neuronset_from_loki,
        neuronset_to_fnsft,
        neuronset_to_loki,
        neuronsets_from_fnsft,
    )
    from nn_core.select.neuronset import NeuronSet  # noqa: F401
    from nn_core.select.weightset import WeightSet  # noqa: F401
    from nn_core.train import (  # noqa: F401
        SFTConfig,
        WeightMaskCallback,
        base_model,
        build_trainer,
        prepare_model,
        train,
    )
