"""Weight masks address plain parameters; on a split (surgery) model they say so in one line."""

from __future__ import annotations

import pytest

from nn_core import NeuronSet, NNError, down_proj_weight_mask, load_model
from nn_core.intervene.surgery import merge_all, split_down_proj


def test_weight_mask_on_split_model_is_one_clear_error():
    model, _ = load_model("tiny-llama", seed=0)
    ns = NeuronSet.for_model(model, {(0, "mlp_out"): [1, 2], (1, "mlp_out"): [3]})
    split_down_proj(model, ns)
    with pytest.raises(NNError, match="merge the split layers first"):
        down_proj_weight_mask(model, ns, "preserve")
    merge_all(model)
    assert down_proj_weight_mask(model, ns, "preserve").n_trainable() > 0
