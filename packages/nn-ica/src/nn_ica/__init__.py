"""nn-ica: functional networks of LLM neurons by PCA and FastICA.

Build templates (capture -> standardise -> PCA -> FastICA -> threshold), use each
component as a :class:`nn_core.NeuronSet`, lesion or preserve components and measure
ΔPPL against random controls, and fine-tune with the masks in force.
"""

from nn_ica.build import ActivationMatrix, BuildConfig, build_templates, capture_matrix
from nn_ica.decompose import (
    BACKENDS,
    Decomposition,
    decompose,
    fastica_torch,
    match_columns,
    randomized_pca_torch,
    select_channels,
    select_z,
    spatial_ica,
    standardise_,
)
from nn_ica.evaluate import evaluate_components, heldout_texts, pick_fraction, rank_components
from nn_ica.templates import FORMAT, Component, Templates, component_iou, match_templates
from nn_ica.train import lora_channel_mask, masked_finetune

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FORMAT",
    "ActivationMatrix",
    "BuildConfig",
    "Component",
    "Decomposition",
    "Templates",
    "build_templates",
    "capture_matrix",
    "component_iou",
    "decompose",
    "evaluate_components",
    "fastica_torch",
    "heldout_texts",
    "lora_channel_mask",
    "masked_finetune",
    "match_columns",
    "match_templates",
    "pick_fraction",
    "randomized_pca_torch",
    "rank_components",
    "select_channels",
    "select_z",
    "spatial_ica",
    "standardise_",
]
