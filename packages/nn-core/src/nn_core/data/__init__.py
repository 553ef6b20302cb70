"""Text corpora, instruction data, chat rendering, tokenization with prompt masking, batching.

Two kinds of data flow through the workspace:

* **Text corpora** (``load_texts``) for language-model statistics: perplexity, activation
  capture, sensitivity. A corpus is a list of documents; ``token_blocks`` joins them with
  the EOS token and cuts the stream into equal blocks.
* **Instruction data** (``load_instructions``) for supervised fine-tuning: a list of
  :class:`Example`, rendered through the model's chat template (``render``) and tokenized
  so that the loss sees only the response (``tokenize_examples``: labels are -100 on
  every prompt token).

Sources are named by one string (see :func:`resolve_text_spec`): ``pydoc`` (CPython's
``pydoc_data.topics``, present in every Python, about 465 k characters), a local file or
folder (``.txt``, ``.json``, ``.jsonl``, ``.csv``, ``.parquet``), or a hub dataset name
``owner/name[:config][@split]`` read through ``datasets`` (extra ``nn-core[datasets]``).

A ``.txt`` file is split into documents at blank lines (one document per paragraph
block). A whole file as one document would leave a single large text with nothing to
hold out; paragraph blocks keep documents whole, so ``split_texts`` never cuts a sentence
in two, while ``token_blocks`` still sees the same text (joined by EOS instead of a blank
line).
"""

from nn_core.data.batching import batches, collate
from nn_core.data.chat import Features, render, tokenize_examples
from nn_core.data.corpora import load_texts, sample, split_texts, token_blocks, tokenize_texts
from nn_core.data.instructions import (
           FORMATS,
           Example,
           detect_format,
           load_instructions,
           parse_records,
)
from nn_core.data.specs import IGNORE_INDEX, TextSource, resolve_text_spec

__all__ = ["FORMATS", "IGNORE_INDEX", "Example", "Features", "TextSource", "batches", "collate",
           "detect_format", "load_instructions", "load_texts", "parse_records", "render",
           "resolve_text_spec", "sample", "split_texts", "token_blocks", "tokenize_examples",
           "tokenize_texts"]
