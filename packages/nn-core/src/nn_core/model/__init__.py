"""The model: loading (aliases, tiny models, the embedded GGUF), architecture adapters,
canonical sites and the byte tokenizer of the tiny models."""
