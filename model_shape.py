"""A model's shape, read from its config before any weight is loaded: what the memory plan (memory.py) depends on.

Reading order: `PUBLISHED` (Qwen2.5-7B's config, so a plan prints without the Hub), `Shape`, the two parameter counts
(`count_parameters` by arithmetic for the Llama layout, `meta_parameters` for any model, built on the meta device),
then `shape_of` (a config -> its Shape) and `published_config` (a name -> its config). tests/test_memory.py checks
both counts against instantiated models.
"""

from __future__ import annotations

from dataclasses import dataclass

# Qwen2.5-7B-Instruct's published config.json (the numbers that matter here), so the plan prints without the Hub
PUBLISHED = {
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1e6, max_position_embeddings=32768),
}


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only transformer."""

    params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def count_parameters(config) -> int:
    """Parameters of a Llama-layout model (Llama, Qwen2, Mistral, SmolLM2) from its config, by arithmetic.

    Per layer: q, k, v, o (and their biases), gate/up/down, two RMSNorm weights; then the embedding, the
    final norm and an untied lm_head. Other architectures: `meta_parameters`.
    """
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    bias = q + 2 * kv if config.model_type == "qwen2" else 0  # Qwen2: biases on q, k, v
    if getattr(config, "attention_bias", False):
        bias = q + 2 * kv + h  # Llama's attention_bias: on q, k, v and o
    attention = h * (q + 2 * kv) + q * h + bias
    mlp = 3 * h * i + (2 * i + h if getattr(config, "mlp_bias", False) else 0)
    per_layer = attention + mlp + 2 * h
    return L * per_layer + V * h + h + (0 if config.tie_word_embeddings else V * h)


def meta_parameters(config) -> int:
    """Parameters of any HF causal LM, counted exactly by building it on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


LLAMA_LAYOUT = {"llama", "qwen2", "mistral"}


def shape_of(config) -> Shape:
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = count_parameters(config) if config.model_type in LLAMA_LAYOUT else meta_parameters(config)
    return Shape(params, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                 config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size)


def published_config(name: str):
    """A transformers config object from PUBLISHED (or a local directory / hub id's config.json)."""
    from transformers import AutoConfig

    if name in PUBLISHED:
        fields = dict(PUBLISHED[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(name)

