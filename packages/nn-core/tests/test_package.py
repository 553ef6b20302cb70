from __future__ import annotations

import subprocess
import sys

import nn_core


def test_every_export_resolves():
    for name in nn_core.__all__:
        assert getattr(nn_core, name) is not None, name


def test_import_and_help_do_not_load_torch():
    code = ("import sys, nn_core, nn_core.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        nn_core.not_a_thing  # noqa: B018


# Every name nn_core exported before the regrouping into subpackages (and since): users
# import these from `nn_core`, so none may disappear. New names may be added.
PUBLIC_NAMES = {
    "Capture", "Example", "MaskHandle", "MissingExtraError", "ModelAdapter", "NNError",
    "NeuronSet", "PhaseTimer", "SFTConfig", "SITES", "SiteRef", "WeightMask",
    "WeightMaskCallback", "WeightSet", "base_model", "batches", "build_trainer", "capture",
    "collate", "down_proj_weight_mask", "get_adapter", "hooked", "load_instructions",
    "load_model", "load_texts", "mask_neurons", "model_id", "model_signature",
    "neuronset_from_fnsft", "neuronset_from_loki", "neuronset_to_fnsft", "neuronset_to_loki",
    "neuronsets_from_fnsft", "prepare_model", "render", "resolve_device", "resolve_dtype",
    "run_dir", "seed_everything", "split_texts", "token_blocks", "tokenize_examples",
    "tokenize_texts", "train", "write_manifest",
}


def test_no_public_name_disappears():
    missing = PUBLIC_NAMES - set(nn_core.__all__)
    assert not missing, f"public names removed from nn_core: {sorted(missing)}"


def test_type_checking_block_matches_exports():
    """The static import block mirrors _EXPORTS, so type checkers see every export."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(nn_core.__file__).read_text())
    static = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                static.update(alias.name for alias in imp.names)
    assert static == set(nn_core.__all__)
