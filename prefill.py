"""Generation with each prompt prefilled once, for evaluation and GRPO rollouts; built on prefix.py's `prompt_forward`.

`prefilled_cache` runs each prompt of a left-padded batch once, alone and unpadded, and lays its keys/values into a
`DynamicCache`, repeated for its samples; `generate` hands that cache to `model.generate`, which then feeds only the
last prompt token. The tokens are plain `generate`'s (tests/test_prefix.py), without its padded prefill of every row.

The cache is preallocated for the prompt and every new token (`_Preallocated`): a decoding step writes one position
per layer and attends over a view of the filled part, the same positions a growing `DynamicLayer` would hand it, but
without `cat` copying the whole cache into a fresh tensor every token (~0.9 GB a token at 8 rows of ~2,550 positions on
the embedded model). `preallocate=False` keeps the growing cache, for comparison (tests/test_decode_cache.py).

    out = generate(model, prompt_ids, prompt_mask, repeats=8, max_new_tokens=256)  # left-padded prompts, each once
    ids, mask = rollout(model, prompt_ids, group_size=8, max_new_tokens=256)      # one prompt: G completions, mask

Checkpointed layers drop the cache whenever `model.training`, even under no_grad (transformers 5.24,
modeling_layers.py), so `generate` runs in eval mode.

Reading order: `_StoredAs` and `cache_dtype` (the dtype the cache keeps), `_Preallocated`, `prefilled_cache`,
`new_tokens`, `generate`, `rollout`
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


class _Preallocated(_StoredAs):
    """A cache layer over fixed buffers `(N, H, capacity, D)` and a length: `update` writes the new positions in place
    and returns views of the filled part, so attention sees exactly the positions a growing DynamicLayer holds.

    `keys`/`values` are those views (`get_seq_length` and `get_mask_sizes` read them, as DynamicLayer's do).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__(keys.dtype)
        self.lazy_initialization(keys, values)
        self.buffer_keys, self.buffer_values = keys, values
        self._fill(length)

    def _fill(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self.buffer_keys[..., :length, :], self.buffer_values[..., :length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.buffer_keys.shape[-2]:
            raise RuntimeError(f"preallocated cache of {self.buffer_keys.shape[-2]} positions overflows at {end}")
        self.buffer_keys[..., start:end, :] = key_states  # the copy casts to the stored dtype, as _StoredAs does
        self.buffer_values[..., start:end, :] = value_states
        self._fill(end)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove <= 0, "crop takes the number of positions to drop, negated"
        self._fill(self.length + tokens_to_remove)


def cache_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on for this device, else the tensor's own."""
    device = like.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype


def prefilled_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int = 1,
                    room: int | None = None) -> DynamicCache:
    """A cache for `generate` holding all but the last token of each left-padded prompt, each row repeated `repeats`
    times (the G samples of a group): (B, P) -> per layer (B*repeats, H, P-1, D).

    `room`: positions to preallocate after the prompt's (`_Preallocated`); `generate` writes `max_new_tokens` of them
    (the last prompt token and every new token but the last). None: a growing cache (`_StoredAs`).

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
        first = prefixes[0].layers[i].keys
        keys = first.new_zeros(N, first.shape[1], P - 1 + (room or 0), first.shape[3], dtype=dtype)  # left-padded
        values = torch.zeros_like(keys)
        for b, pre in enumerate(prefixes):
            n = pre.layers[i].keys.shape[-2]
            rows = slice(b * repeats, (b + 1) * repeats)
            keys[rows, :, P - 1 - n:P - 1] = pre.layers[i].keys
            values[rows, :, P - 1 - n:P - 1] = pre.layers[i].values
        if room is None:
            layer = cache.layers[i] = _StoredAs(dtype)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        else:
            cache.layers[i] = _Preallocated(keys, values, P - 1)
    return cache


def new_tokens(model, generate_kwargs: dict) -> int | None:
    """The `max_new_tokens` `model.generate` will run to, from its kwargs or their generation config (None: unset)."""
    config = generate_kwargs.get("generation_config") or model.generation_config
    return generate_kwargs.get("max_new_tokens", config.max_new_tokens)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int = 1, shared: bool = True,
             preallocate: bool = True, **generate_kwargs) -> torch.Tensor:
    """`model.generate` on a left-padded batch of prompts, each sampled `repeats` times: (B, P) -> (B*repeats, P+C).

    `shared=True` prefills every prompt once (`prefilled_cache`) and generate then feeds only the last prompt token
    (it runs just the tokens the cache has not seen). `shared=False` is the usual way: one padded forward over the
    B*repeats rows. Either way positions count from each row's first real token (generate derives them from the mask).
    `preallocate` (with `shared`): the prefilled cache holds room for every new token; False grows it by `cat`.
    """
    input_ids = prompt_ids.repeat_interleave(repeats, dim=0)  # (B*repeats, P): rows b*R .. b*R+R-1 are prompt b
    attention_mask = prompt_mask.repeat_interleave(repeats, dim=0)
    was_training = model.training
    model.eval()  # checkpointed layers in train mode would drop the cache (modeling_layers.py)
    try:
        if shared and full_attention(model):  # else plain generate: sliding-window layers need their own cache
            room = new_tokens(model, generate_kwargs) if preallocate else None
            generate_kwargs["cache"] = prefilled_cache(model, prompt_ids, prompt_mask, repeats, room)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    finally:
        model.train(was_training)


def rollout(model, prompt_ids: torch.Tensor, group_size: int, max_new_tokens: int, shared: bool = True,
            preallocate: bool = True, **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or greedily decode) `group_size` completions of one prompt.

    Returns the completion ids `(G, C)`, padded with `pad_token_id` after EOS, and their mask (1 up to and including
    the first EOS).
    """
    prompt_ids = one_prompt(prompt_ids)  # (1, P)
    out = generate(model, prompt_ids, torch.ones_like(prompt_ids), group_size, shared, preallocate,
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
