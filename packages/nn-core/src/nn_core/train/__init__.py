"""Supervised fine-tuning shared by the method packages (:mod:`nn_core.train`).

Three small pieces that compose:

* :class:`SFTConfig`: every knob, as a dataclass (JSON-able, recorded in the manifest).
* :func:`prepare_model`: LoRA / QLoRA through PEFT, or full fine-tuning of chosen modules.
  LoRA targets default to the MLP down-projection, by its real path inside a decoder
  block for the architecture (``mlp.down_proj``, ``mlp.c_proj``, ``mlp.dense_4h_to_h``,
  ``fc2``: from :func:`nn_core.adapters.get_adapter`; the bare leaf name would also catch
  GPT-2's attention ``c_proj``), plus any ``extra_target_modules``.
* :func:`build_trainer` -> a Hugging Face ``Trainer`` on instruction data (loss on the
  response only: labels are -100 on the prompt, :func:`nn_core.data.tokenize_examples`),
  and :func:`train`, which runs it (resuming from the last checkpoint in ``output_dir``
  when there is one), saves the adapter (or the trained model) and the tokenizer
  atomically, and writes ``manifest.json``.

After PEFT wraps a model, resolve nn-core adapters, sites and masks on
``base_model(peft_model)``: the down-projection path then leads to PEFT's LoRA layer, whose
input is the ``mlp_act`` site, so a forward mask attached *after* wrapping acts on both the
frozen weight and the LoRA path (a masked channel gives its LoRA ``A`` column zero
gradient). A mask attached *before* wrapping would sit on the inner base layer and miss
the LoRA path: attach masks after :func:`prepare_model`.

:class:`WeightMaskCallback` keeps a :class:`nn_core.masks.WeightMask` in force during
training: frozen entries get zero gradient and are written back after every optimizer
step, so they stay bit-identical through AdamW weight decay.
"""

from nn_core.train.callbacks import WeightMaskCallback
from nn_core.train.config import METHODS, SFTConfig, SFTResult
from nn_core.train.fingerprint import FINGERPRINT_FILE, check_fingerprint, run_fingerprint
from nn_core.train.lora import (
    base_model,
    down_proj_target,
    is_peft_model,
    prepare_model,
    resolve_target_modules,
    trainable_parameters,
)
from nn_core.train.saving import train
from nn_core.train.trainer import bf16_supported, build_trainer, last_checkpoint

__all__ = ["FINGERPRINT_FILE", "METHODS", "SFTConfig", "SFTResult", "WeightMaskCallback",
           "base_model", "bf16_supported", "build_trainer", "check_fingerprint",
           "down_proj_target", "is_peft_model", "last_checkpoint", "prepare_model",
           "resolve_target_modules", "run_fingerprint", "train", "trainable_parameters"]
