"""A model's shape, read from its config before any weight is loaded: what the memory plan (memory.py) depends on.
Parameter counts by arithmetic for the Llama layout (`count_parameters`) or for any model on the meta device
(`meta_parameters`); `PUBLISHED` holds Qwen2.5-7B's config, so a plan prints without the Hub.
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


# LoRA's default targets: every linear of attention and MLP (Rank-R1), by their Llama-layout names
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_targets(spec: str) -> tuple[str, ...]:
    """--lora-targets: comma-separated module names.

    >>> parse_targets("q_proj, v_proj")
    ('q_proj', 'v_proj')
    """
    return tuple(t.strip() for t in spec.split(",") if t.strip())


def linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of a Llama-layout decoder layer."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_parameters(shape: Shape, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Trainable parameters of rank-`rank` LoRA adapters on `targets` in every layer: A (rank x in) and B (out x rank)
    per linear. Qwen2.5-7B at rank 16 on every linear: 40.4 M (0.53% of its 7.6 B).

    >>> from support.model_shape import shape_of, published_config
    >>> lora_parameters(shape_of(published_config("qwen2.5-7b")), 16)
    40370176
    """
    dims = linear_shapes(shape)
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise ValueError(f"LoRA targets {unknown}: the plan knows the Llama layout's {', '.join(dims)}")
    return shape.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def published_config(name: str):
    """A transformers config object from PUBLISHED (or a local directory / hub id's config.json)."""
    from transformers import AutoConfig

    if name in PUBLISHED:
        fields = dict(PUBLISHED[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(name)

