"""nn-core: models, adapters, sites, hooks, masks and the NeuronSet/WeightSet currency."""

from nn_core.adapters import ModelAdapter, get_adapter, model_id
from nn_core.device import resolve_device, resolve_dtype, seed_everything
from nn_core.errors import MissingExtraError, NNError
from nn_core.hooks import Capture, capture, hooked
from nn_core.masks import MaskHandle, WeightMask, down_proj_weight_mask, mask_neurons
from nn_core.models import load_model
from nn_core.neuronset import NeuronSet
from nn_core.sites import SITES, SiteRef, model_signature

__version__ = "0.1.0"

__all__ = [
    "SITES",
    "Capture",
    "MaskHandle",
    "MissingExtraError",
    "ModelAdapter",
    "NNError",
    "NeuronSet",
    "SiteRef",
    "WeightMask",
    "capture",
    "down_proj_weight_mask",
    "get_adapter",
    "hooked",
    "load_model",
    "mask_neurons",
    "model_id",
    "model_signature",
    "resolve_device",
    "resolve_dtype",
    "seed_everything",
]
