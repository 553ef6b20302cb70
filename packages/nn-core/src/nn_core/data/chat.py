"""Rendering examples through the chat template and tokenizing with prompt masking."""

from __future__ import annotations

from collections.abc import Sequence

from nn_core.data.corpora import _adds_bos, _encode
from nn_core.data.instructions import Example
from nn_core.data.specs import IGNORE_INDEX
from nn_core.errors import NNError


def _messages(example: Example, *, fold_system: bool = False) -> list[dict]:
    msgs = [{"role": role, "content": text} for role, text in example.history]
    msgs.append({"role": "user", "content": example.prompt})
    if example.system:
        if fold_system:
            msgs[0] = {"role": "user", "content": f"{example.system}\n\n{msgs[0]['content']}"}
        else:
            msgs.insert(0, {"role": "system", "content": example.system})
    return msgs


def _fallback_prompt(example: Example) -> str:
    parts = [f"### System:\n{example.system}\n\n"] if example.system else []
    for role, text in example.history:
        head = "### Instruction:" if role == "user" else "### Response:"
        parts.append(f"{head}\n{text}\n\n")
    parts.append(f"### Instruction:\n{example.prompt}\n\n### Response:\n")
    return "".join(parts)


def render(tokenizer, example: Example) -> tuple[str, str]:
    """``(prompt_text, full_text)`` for ``example``; ``full_text`` starts with ``prompt_text``.

    With a chat template: the prompt is the conversation up to the user turn with the
    generation prompt (``add_generation_prompt=True``), the full text adds the assistant
    turn. Templates that render the assistant turn differently after the generation
    prompt (so the prompt is not a prefix) get ``prompt_text + response``. Without a
    template: a plain ``### Instruction:`` / ``### Response:`` layout.
    """
    if not getattr(tokenizer, "chat_template", None):
        prompt = _fallback_prompt(example)
        return prompt, prompt + example.response
    msgs = _messages(example)
    try:
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template error; jinja2's type is not ours to import
        if not example.system:
            raise
        # Templates that reject a system role (Gemma) get it folded into the first turn.
        msgs = _messages(example, fold_system=True)
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": example.response}],
                                         tokenize=False)
    if not full.startswith(prompt):
        full = prompt + example.response
    return prompt, full


class Features(list):
    """A list of ``{"input_ids", "labels"}`` dicts; ``dropped`` counts examples left out
    because truncation removed their whole response."""

    dropped: int = 0


def tokenize_examples(tokenizer, examples: Sequence[Example], max_length: int | None) -> Features:
    """Token ids and labels for supervised fine-tuning, loss on the response only.

    ``labels[i] = -100`` for every prompt token and equals ``input_ids[i]`` on the response,
    which ends with the EOS token (appended unless the rendered response already holds it).
    The prompt ids come from tokenizing ``prompt_text`` alone; when they are not a prefix
    of the ids of ``full_text`` (a merge across the boundary), the response is tokenized on
    its own and concatenated, so the masked span is exactly the prompt. Sequences over
    ``max_length`` lose the end of the response; examples whose prompt alone fills
    ``max_length`` are dropped and counted in ``.dropped``.
    """
    if max_length is not None and max_length < 2:
        raise NNError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    bos = _adds_bos(tokenizer)
    rendered = [render(tokenizer, ex) for ex in examples]
    prompts = _encode(tokenizer, [p for p, _ in rendered], bos=bos)
    fulls = _encode(tokenizer, [f for _, f in rendered], bos=bos)
    out = Features()
    for (prompt_text, full_text), p_ids, f_ids in zip(rendered, prompts, fulls, strict=True):
        if f_ids[: len(p_ids)] == p_ids:
            r_ids = f_ids[len(p_ids):]
        else:
            r_ids = _encode(tokenizer, [full_text[len(prompt_text):]], bos=False)[0]
        if eos is not None and eos not in r_ids:
            r_ids = [*r_ids, eos]
        if max_length is not None and len(p_ids) + len(r_ids) > max_length:
            if len(p_ids) >= max_length:
                out.dropped += 1
                continue
            r_ids = r_ids[: max_length - len(p_ids)]
        out.append({"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids})
    if examples and not out:
        raise NNError(f"every example's prompt is at least max_length={max_length} tokens: raise "
                      "--max-length or shorten the prompts")
    return out
