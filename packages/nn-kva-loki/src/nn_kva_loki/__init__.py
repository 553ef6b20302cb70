"""nn-kva-loki: LoKI (low-damage knowledge implanting) on nn.

Knowledge-value attribution (KVA: integrated gradients of the target-token probability
w.r.t. each layer's MLP down-projection output) is stored in an ``nn.kva/1`` HDF5 file;
:func:`select_channels` picks the channels that matter least (layer-balanced or global)
as a :class:`nn_core.NeuronSet` and LoKI position list.

Public names are resolved lazily (PEP 562), so ``nn-kva-loki --help`` does not import
h5py or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# submodule (relative to nn_kva_loki) -> the public names it provides
_EXPORTS = {
    "kva_file": ["FORMAT", "KVAFile", "KVASettings", "KVAWriter", "open_kva_writer", "read_kva"],
    "select": ["SCORES", "STRATEGIES", "Selection", "per_layer_k", "plot_frequencies",
               "select_channels", "select_from_arrays"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nn_kva_loki' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"nn_kva_loki.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers see the real names
    from nn_kva_loki.kva_file import (  # noqa: F401
        FORMAT,
        KVAFile,
        KVASettings,
        KVAWriter,
        open_kva_writer,
        read_kva,
    )
    from nn_kva_loki.select import (  # noqa: F401
        SCORES,
        STRATEGIES,
        Selection,
        per_layer_k,
        plot_frequencies,
        select_channels,
        select_from_arrays,
    )
