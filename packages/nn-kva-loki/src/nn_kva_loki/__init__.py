"""nn-kva-loki: LoKI (low-damage knowledge implanting) on nn.

Knowledge-value attribution (KVA: integrated gradients of the target-token probability
w.r.t. each layer's MLP down-projection output; :func:`analyse`) is stored in an
``nn.kva/1`` HDF5 file;
:func:`select_channels` picks the channels that matter least (layer-balanced or global)
as a :class:`nn_core.NeuronSet` and LoKI position list; :func:`create_loki` makes only
those rows of every down-projection trainable, :func:`train_loki` trains them through
``nn_core.train``, :func:`restore` merges them back into a plain model.

Public names are resolved lazily (PEP 562), so ``nn-kva-loki --help`` does not import
h5py or numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nn_core.lazy import lazy_exports

__version__ = "0.1.0"

# submodule (relative to nn_kva_loki) -> the public names it provides
_EXPORTS = {
    "kva": ["ENGINES", "METHODS", "TARGETS", "Encoded", "Sample", "analyse", "attribute",
            "captum_attributions", "encode_samples", "load_samples", "pairs_per_batch", "quadrature"],
    "kva_file": ["FORMAT", "KVAFile", "KVASettings", "KVAWriter", "open_kva_writer", "read_kva"],
    "loki": ["active_parameters", "count_optimizer_state", "create_loki", "is_loki", "load_loki",
             "loki_positions", "lora_rank_for_budget", "resolve_positions", "restore", "save_loki"],
    "train": ["load_task_data", "train_loki"],
    "evaluate": ["EvalSettings", "format_table", "general_texts", "model_metrics", "train_lora_control"],
    "select": ["SCORES", "STRATEGIES", "Selection", "per_layer_k", "plot_frequencies",
               "select_channels", "select_from_arrays"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers see the real names
    from nn_kva_loki.evaluate import (  # noqa: F401
        EvalSettings,
        format_table,
        general_texts,
        model_metrics,
        train_lora_control,
    )
    from nn_kva_loki.kva import (  # noqa: F401
        ENGINES,
        METHODS,
        TARGETS,
        Encoded,
        Sample,
        analyse,
        attribute,
        captum_attributions,
        encode_samples,
        load_samples,
        pairs_per_batch,
        quadrature,
    )
    from nn_kva_loki.kva_file import (  # noqa: F401
        FORMAT,
        KVAFile,
        KVASettings,
        KVAWriter,
        open_kva_writer,
        read_kva,
    )
    from nn_kva_loki.loki import (  # noqa: F401
        active_parameters,
        count_optimizer_state,
        create_loki,
        is_loki,
        load_loki,
        loki_positions,
        lora_rank_for_budget,
        resolve_positions,
        restore,
        save_loki,
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
    from nn_kva_loki.train import load_task_data, train_loki  # noqa: F401
