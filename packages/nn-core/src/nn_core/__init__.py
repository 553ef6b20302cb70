"""nn-core: models, adapters, sites, hooks, masks and the NeuronSet/WeightSet currency.

Names are exported lazily (PEP 562) so that ``import nn_core.cli`` and ``nn-core --help``
do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "adapters": ["ModelAdapter", "get_adapter", "model_id"],
    "data": ["Example", "batches", "collate", "load_instructions", "load_texts", "render",
             "split_texts", "token_blocks", "tokenize_examples", "tokenize_texts"],
    "device": ["resolve_device", "resolve_dtype", "seed_everything"],
    "errors": ["MissingExtraError", "NNError"],
    "formats": ["neuronset_from_fnsft", "neuronset_from_loki", "neuronset_to_fnsft",
                "neuronset_to_loki", "neuronsets_from_fnsft"],
    "hooks": ["Capture", "capture", "hooked"],
    "manifest": ["PhaseTimer", "run_dir", "write_manifest"],
    "masks": ["MaskHandle", "WeightMask", "down_proj_weight_mask", "mask_neurons"],
    "models": ["load_model"],
    "neuronset": ["NeuronSet"],
    "sft": ["SFTConfig", "WeightMaskCallback", "base_model", "build_trainer", "prepare_model", "train"],
    "sites": ["SITES", "SiteRef", "model_signature"],
    "weightset": ["WeightSet"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nn_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"nn_core.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers see the real names
    from nn_core.adapters import ModelAdapter, get_adapter, model_id  # noqa: F401
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
    from nn_core.formats import (  # noqa: F401
        neuronset_from_fnsft,
        neuronset_from_loki,
        neuronset_to_fnsft,
        neuronset_to_loki,
        neuronsets_from_fnsft,
    )
    from nn_core.hooks import Capture, capture, hooked  # noqa: F401
    from nn_core.manifest import PhaseTimer, run_dir, write_manifest  # noqa: F401
    from nn_core.masks import MaskHandle, WeightMask, down_proj_weight_mask, mask_neurons  # noqa: F401
    from nn_core.models import load_model  # noqa: F401
    from nn_core.neuronset import NeuronSet  # noqa: F401
    from nn_core.sft import (  # noqa: F401
        SFTConfig,
        WeightMaskCallback,
        base_model,
        build_trainer,
        prepare_model,
        train,
    )
    from nn_core.sites import SITES, SiteRef, model_signature  # noqa: F401
    from nn_core.weightset import WeightSet  # noqa: F401
