"""Generation with each prompt prefilled once, for evaluation and GRPO rollouts; built on prefix.py's `prompt_forward`.

`prefilled_cache` runs each prompt of a left-padded batch once, alone and unpadded, and lays its keys/values into a
`DynamicCache`, repeated for its samples; `generate` hands that cache to `model.generate`, which then feeds only the
last prompt token. The tokens are plain `generate`'s (tests/test_prefix.py), without its padded prefill of every row.

    out = generate(model, prompt_ids, prompt_mask, repeats=8, max_new_tokens=256)  # left-padded prompts, each once
    ids, mask = rollout(model, prompt_ids, group_size=8, max_new_tokens=256)      # one prompt: G completions, mask

Checkpointed layers drop the cache whenever `model.training`, even under no_grad (transformers 5.24,
modeling_layers.py), so `generate` runs in eval mode.

Reading order: `_StoredAs` and `cache_dtype` (the dtype the cache keeps), `prefilled_cache`, `generate`, `rollout`
and its `completion_mask_after_eos`.
"""

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from prefix import full_attention, one_prompt, prompt_forward, unpadded


class _StoredAs(DynamicLayer):
    """A DynamicLayer that stores what it is given in one dtype: autocast's compute dtype (bf16) for fp32 weights.

    Under autocast with fp32 weights the rotary embedding makes the keys fp32 (its cos/sin follow the fp32 hidden
    stream) while the values come out of v_proj in bf16, and `cat` promotes: a plain cache grows in fp32, twice the
    memory, and SDPA casts all of it back to bf16 at every decoding step. Storing bf16 is lossless for what the
    attention sees (autocast's SDPA casts keys and values to bf16 anyway).
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.stored_dtype = dtype

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(key_states.to(self.stored_dtype), value_states.to(self.stored_dtype), *args, **kwargs)


def cache_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on for this device, else the tensor's own."""
    device = like.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype


def prefilled_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int = 1) -> DynamicCache:
    """A cache for `generate` holding all but the last token of each left-padded prompt, each row repeated `repeats`
    times (the G samples of a group): (B, P) -> per layer (B*repeats, H, P-1, D).

    Each prompt runs once, alone and unpadded. That is what makes batched generation fast on CPU: a padded batch
    needs an attention mask, which sends SDPA to a slower kernel (8 DL19 windows, 12% padding: 69.4 s as one padded
    batch, 39.8 s one at a time; `bench_rerank.py --padded-prefill --batch-sizes 8,1`). The padding slots hold
    zeros; the attention mask hides them from every decoding step. Keys and values are stored in the dtype attention
    computes in (`_StoredAs`): bf16 under autocast, even with fp32 weights.
    """
    prompts = unpadded(prompt_ids, prompt_mask)
    prefixes = [prompt_forward(model, p) for p in prompts]  # each (1, H, P_b - 1, D) per layer
    P, N = prompt_ids.shape[1], len(prompts) * repeats
    cache = DynamicCache(config=model.config)
    assert len(cache.layers) == len(prefixes[0].layers)
    dtype = cache_dtype(prefixes[0].layers[0].values)
    for i, layer in enumerate(cache.layers):
        assert type(layer) is DynamicLayer
        layer = cache.layers[i] = _StoredAs(dtype)
        first = prefixes[0].layers[i].keys
        keys = first.new_zeros(N, first.shape[1], P - 1, first.shape[3], dtype=dtype)  # (N, H, P-1, D), left-padded
        values = torch.zeros_like(keys)
        for b, pre in enumerate(prefixes):
            n = pre.layers[i].keys.shape[-2]
            rows = slice(b * repeats, (b + 1) * repeats)
            keys[rows, :, P - 1 - n:] = pre.layers[i].keys
            values[rows, :, P - 1 - n:] = pre.layers[i].values
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int = 1, shared: bool = True,
             **generate_kwargs) -> torch.Tensor:
    """`model.generate` on a left-padded batch of prompts, each sampled `repeats` times: (B, P) -> (B*repeats, P+C).

    `shared=True` prefills every prompt once (`prefilled_cache`) and generate then feeds only the last prompt token
    (it runs just the tokens the cache has not seen). `shared=False` is the usual way: one padded forward over the
    B*repeats rows. Either way positions count from each row's first real token (generate derives them from the mask).
    """
    input_ids = prompt_ids.repeat_interleave(repeats, dim=0)  # (B*repeats, P): rows b*R .. b*R+R-1 are prompt b
    attention_mask = prompt_mask.repeat_interleave(repeats, dim=0)
    was_training = model.training
    model.eval()  # checkpointed layers in train mode would drop the cache (modeling_layers.py)
    try:
        if shared and full_attention(model):  # else plain generate: sliding-window layers need their own cache
            generate_kwargs["cache"] = prefilled_cache(model, prompt_ids, prompt_mask, repeats)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    finally:
        model.train(was_training)


def rollout(model, prompt_ids: torch.Tensor, group_size: int, max_new_tokens: int, shared: bool = True,
            **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or greedily decode) `group_size` completions of one prompt.

    Returns the completion ids `(G, C)`, padded with `pad_token_id` after EOS, and their mask (1 up to and including
    the first EOS).
    """
    prompt_ids = one_prompt(prompt_ids)  # (1, P)
    out = generate(model, prompt_ids, torch.ones_like(prompt_ids), group_size, shared,
                   max_new_tokens=max_new_tokens, **generate_kwargs)
    completion_ids = out[:, prompt_ids.shape[1]:]  # (G, C)
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    return completion_ids, completion_mask_after_eos(completion_ids, eos)


def completion_mask_after_eos(ids: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after.

    >>> completion_mask_after_eos(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), eos_token_id=2)
    tensor([[1, 1, 0, 0],
            [1, 1, 1, 1]])
    """
    if eos_token_id is None:
        return torch.ones_like(ids)
    eos = torch.isin(ids, torch.tensor(eos_token_id, device=ids.device).reshape(-1))  # (G, C)
    after = (eos.cumsum(1) - eos.long()) > 0  # an EOS strictly before this position
    return (~after).long()
