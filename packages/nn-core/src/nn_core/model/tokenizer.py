"""A byte-level tokenizer built in code, for tiny test models: no files, no network.

Ids 0-255 are the raw bytes; four special tokens follow. It carries a ChatML chat
template so instruction formatting is exercised exactly as with real chat models.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = [EOS, PAD, IM_START, IM_END]
VOCAB_SIZE = 256 + len(SPECIALS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Return the byte-level tokenizer (vocabulary size :data:`VOCAB_SIZE`)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps every byte to one printable character; order them by byte value.
    byte_chars = sorted(alphabet, key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i, tok in enumerate(SPECIALS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        model_max_length=4096,
        padding_side="right",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _byte_of(ch: str) -> int:
    # Inverse of the GPT-2 byte->unicode table: printable bytes map to themselves,
    # the others to 256 + their rank among the non-printable ones.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
