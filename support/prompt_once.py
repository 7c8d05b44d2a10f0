"""The prompt once per group: a GRPO group's G completions share one prompt, so it runs once, not G times, in
generation, in the no-grad log-prob passes and in the policy's forward and backward. Exact: tests/test_prefix.py
compares log-probs and every gradient with the prompt repeated, in float64.

The prompt minus its last token runs once; its per-layer keys and values become a read-only cache (`PrefixCache`)
broadcast to the completion rows, each starting with the prompt's last token. `repeat_prompt=True` is the usual
`cat(prompt, completion)` for every row, for comparison (grpo.py --repeat-prompt).

    with prompt_pass(model, prompt_ids) as score:                  # the prompt, once
        for rows in micro_batches(G, 2):
            loss_of(score(ids[rows], mask[rows])).backward()       # the completions; leaving: the prompt's backward
    logp = completion_logprobs(model, prompt_ids, ids, mask)       # (G, C), e.g. the reference's, under no_grad
    out = generate(model, prompt_ids, prompt_mask, repeats=G, max_new_tokens=256)  # left-padded prompts, each once

A group shares ONE unpadded prompt, `(P,)` or `(1, P)`; completions are right-padded `(G, C)` with `completion_mask`
1 on real tokens. Timing: `python -m bench.prefix`.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

# --- cache layers


class PrefixLayer(CacheLayerMixin):
    """One layer's prompt keys/values `(1, H, P, D)`, broadcast to each completion batch, never modified: a
    checkpointed layer calls `update` twice (forward, then recompute), and every micro-batch must see the same prefix.
    """

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        assert keys.dim() == 4 and keys.shape[0] == 1 and keys.shape == values.shape, "one prompt: (1, H, P, D)"
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        raise AssertionError("a PrefixLayer is built from the prompt's keys and values")

    def update(self, key_states, value_states, *args, **kwargs):
        batch = key_states.shape[0]
        # expand is a view: the prompt is stored once; cat's backward sums the G rows' gradients into it
        keys = torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2)  # (B, H, P+C, D)
        values = torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2)  # (B, H, P+C, D)
        return keys, values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # (kv_length, kv_offset)

    def get_max_length(self) -> int:
        return -1


class _RecordLayer(CacheLayerMixin):
    """Records the keys/values of its first `update` (the prompt pass) and returns them as they are."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        raise AssertionError("unused")

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:  # a checkpointed recompute must not replace what the completions' graph holds
            self.keys, self.values = key_states, value_states
        return key_states, value_states  # no past: the prompt attends to itself only

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class PrefixCache(Cache):
    """A read-only cache: the keys/values of a prompt's first P-1 tokens per layer, and its last token `(1, 1)`,
    with which every row of a forward given this `cache` must start."""

    def __init__(self, layers: list[PrefixLayer], last_token: torch.Tensor):
        super().__init__(layers=layers)
        self.last_token = last_token  # (1, 1)

    def detached(self) -> "PrefixCache":
        """The same prefix as fresh leaf tensors that collect gradients (for `prompt_pass`)."""
        return PrefixCache([PrefixLayer(lay.keys.detach().requires_grad_(), lay.values.detach().requires_grad_())
                            for lay in self.layers], self.last_token)

    def tensors(self) -> list[torch.Tensor]:
        return [t for lay in self.layers for t in (lay.keys, lay.values)]


# --- model plumbing


def check_checkpointing(model) -> None:
    """Refuse reentrant activation checkpointing: it tracks only positional inputs, so the prefix's gradient,
    which reaches the layer through the cache, would be lost silently. Non-reentrant is exact."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            kwargs = getattr(module._gradient_checkpointing_func, "keywords", {})
            # torch's checkpoint defaults to reentrant when use_reentrant is not given (torch/utils/checkpoint.py)
            if kwargs.get("use_reentrant", True) is not False:
                raise ValueError(
                    "the shared prompt needs non-reentrant activation checkpointing: reentrant checkpointing "
                    "drops the gradient that flows through the prompt's keys/values. Use "
                    "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})."
                )


def full_attention(model) -> bool:
    """Every layer attends to the whole past (sliding-window layers would need a cache that drops old keys)."""
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)


def _check_full_attention(model) -> None:
    assert full_attention(model), "only full-attention layers are supported: " + str(model.config.layer_types)


@contextlib.contextmanager
def _cache_survives_checkpointing(model):
    """Let checkpointed decoder layers keep `cache` (transformers drops it, modeling_layers.py): safe, as our caches
    never grow, so the recompute reads the same prefix."""
    layers = [m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    before = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            if b is None:
                del m._can_checkpoint_with_cache  # back to the class attribute
            else:
                m._can_checkpoint_with_cache = b


def one_prompt(prompt_ids: torch.Tensor) -> torch.Tensor:
    """A group's one prompt as (1, P); a left-padded batch of prompts would need per-row positions and masks."""
    assert prompt_ids.dim() == 1 or (prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1), \
        f"one unpadded prompt per group, (P,) or (1, P); got {tuple(prompt_ids.shape)}"
    return prompt_ids.reshape(1, -1)  # (1, P)


def unpadded(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[torch.Tensor]:
    """The rows of a left-padded batch without their padding: (B, P), (B, P) -> B tensors (P_b,)."""
    lengths = prompt_mask.sum(dim=1).tolist()
    P = prompt_ids.shape[1]
    assert all(prompt_mask[b, P - n:].all() for b, n in enumerate(lengths)), "prompts must be left-padded"
    return [prompt_ids[b, P - n:] for b, n in enumerate(lengths)]


def token_logprobs(scores: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(scores / temperature) at `ids`: (B, C, V), (B, C) -> (B, C); at least float32, with no extra
    (B, C, V) copy for float32 scores at T = 1.

    >>> token_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, 3]])).exp()
    tensor([[0.2500, 0.2500]])
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # (B, C, V); a no-op for float32
    if temperature != 1.0:
        scores = scores / temperature
    return scores.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - scores.logsumexp(-1)  # (B, C)


def _head_logprobs(head, hidden: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    return token_logprobs(head(hidden), ids, temperature)  # (B, c, H) -> (B, c, V) -> (B, c)


def head_logprobs(model, hidden: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 0) -> torch.Tensor:
    """lm_head and the log-probs at `ids` from the last hidden states, `chunk` positions at a time (0: all):
    (B, C, H) -> (B, C). Each chunk is checkpointed, so only one chunk's full-vocabulary logits ever live. Exact: the
    same ops on the same rows (tests/test_prefix.py)."""
    head = model.get_output_embeddings()
    if not chunk or chunk >= ids.shape[1]:
        return _head_logprobs(head, hidden, ids, temperature)
    parts = []
    for s in range(0, ids.shape[1], chunk):
        h, t = hidden[:, s : s + chunk], ids[:, s : s + chunk]  # (B, c, H), (B, c)
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_head_logprobs, head, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_head_logprobs(head, h, t, temperature))
    return torch.cat(parts, dim=1)  # (B, C)


def _decoder(model):
    """The decoder stack under the LM head: it returns hidden states, so the head can run in chunks."""
    config = model.config.get_text_config(decoder=True)
    assert getattr(config, "final_logit_softcapping", None) is None, "logits softcapping is not applied here"
    return model.get_decoder()


# --- the prompt once, then the completions


def prompt_forward(model, prompt_ids: torch.Tensor) -> PrefixCache:
    """Run all but the last token of one prompt once (with autograd if enabled): their per-layer keys/values. The
    last token starts every completion row instead, so the logits scoring the first completion token come from the
    batched pass (a single row's float32 lm_head product is less accurate on CPU)."""
    check_checkpointing(model)
    _check_full_attention(model)
    prompt_ids = one_prompt(prompt_ids)  # (1, P)
    assert prompt_ids.shape[1] >= 2, "the prefix is the prompt minus its last token"
    record = Cache(layers=[_RecordLayer() for _ in range(model.config.get_text_config(decoder=True).num_hidden_layers)])
    with _cache_survives_checkpointing(model):
        # logits_to_keep=1: the prefix's logits are never used, so skip the (P, V) lm_head product
        model(input_ids=prompt_ids[:, :-1], cache=record, use_cache=False, logits_to_keep=1)
    return PrefixCache([PrefixLayer(lay.keys, lay.values) for lay in record.layers], prompt_ids[:, -1:])


def _scored_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_ids: torch.Tensor,
                    temperature: float, logits_chunk: int, cache: Cache | None = None) -> torch.Tensor:
    """Log-probs `(B, C)` of the completion that ends each row of `input_ids`, from one forward: position t scores
    token t+1, so the last C+1 positions score the C tokens."""
    keep = completion_ids.shape[1] + 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=False)
    if not logits_chunk:
        logits = model(**inputs, logits_to_keep=keep).logits  # (B, 1+C, V)
        return token_logprobs(logits[:, :-1], completion_ids, temperature)
    hidden = _decoder(model)(**inputs).last_hidden_state[:, -keep:]  # (B, 1+C, H)
    return head_logprobs(model, hidden[:, :-1], completion_ids, temperature, logits_chunk)


def prefix_logprobs(model, prefix: PrefixCache, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    temperature: float = 1.0, logits_chunk: int = 0) -> torch.Tensor:
    """Log-probs `(B, C)` of a batch of completions continuing the prompt held by `prefix`; the logits are made
    `logits_chunk` positions at a time (`head_logprobs`)."""
    check_checkpointing(model)
    batch, _ = completion_ids.shape
    input_ids = torch.cat([prefix.last_token.expand(batch, 1), completion_ids], dim=1)  # (B, 1+C)
    ones = completion_mask.new_ones(batch, prefix.get_seq_length() + 1)
    attention_mask = torch.cat([ones, completion_mask], dim=1)  # (B, P+C)
    with _cache_survives_checkpointing(model):
        # positions start at P-1 because they are derived from prefix.get_seq_length() (LlamaModel.forward)
        return _scored_forward(model, input_ids, attention_mask, completion_ids, temperature, logits_chunk, prefix)


def plain_logprobs(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                   temperature: float = 1.0, logits_chunk: int = 0) -> torch.Tensor:
    """The usual way, for comparison: the prompt repeated per row, one forward over `cat(prompt, completion)`."""
    prompt_ids = one_prompt(prompt_ids)  # (1, P)
    batch, _ = completion_ids.shape
    input_ids = torch.cat([prompt_ids.expand(batch, -1), completion_ids], dim=1)  # (B, P+C)
    attention_mask = torch.cat([completion_mask.new_ones(batch, prompt_ids.shape[1]), completion_mask], dim=1)
    # score with the last prompt position and the completion's: positions P-1 .. P+C-2
    return _scored_forward(model, input_ids, attention_mask, completion_ids, temperature, logits_chunk)


def micro_batches(n: int, micro_batch: int | None) -> list[slice]:
    step = micro_batch or n
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def completion_logprobs(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0, repeat_prompt: bool = False,
                        micro_batch: int | None = None, logits_chunk: int = 0) -> torch.Tensor:
    """Log-probs `(G, C)` of a group's completions. Micro-batches bound activation memory under no_grad only; with
    grad every graph lives until backward (`prompt_pass` frees them as it goes)."""
    chunks = micro_batches(completion_ids.shape[0], micro_batch)
    if repeat_prompt:
        return torch.cat([plain_logprobs(model, prompt_ids, completion_ids[rows], completion_mask[rows], temperature,
                                         logits_chunk) for rows in chunks])
    prefix = prompt_forward(model, prompt_ids)
    return torch.cat([prefix_logprobs(model, prefix, completion_ids[rows], completion_mask[rows], temperature,
                                      logits_chunk) for rows in chunks])  # (G, C)


@contextlib.contextmanager
def prompt_pass(model, prompt_ids: torch.Tensor, repeat_prompt: bool = False, temperature: float = 1.0,
                logits_chunk: int = 0) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """One group's prompt for a micro-batched backward: yields `score(completion_ids, completion_mask)`, the log-probs
    `(b, C)` of a micro-batch of the group's completions, with grad.

    Call `loss.backward()` on each micro-batch's loss inside the block (its share of the total: divide by the whole
    batch's token count); the detached prompt keys/values collect the gradients, and leaving the block sends their sum
    through the one prompt pass (by linearity, one backward of the whole loss). On an exception nothing is sent.
    """
    if repeat_prompt:
        yield functools.partial(plain_logprobs, model, prompt_ids, temperature=temperature, logits_chunk=logits_chunk)
        return
    prefix = prompt_forward(model, prompt_ids)
    # any one of them: LoRA on q and v only leaves the first layer's keys without a gradient
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in prefix.tensors())):
        raise ValueError("prompt_pass needs grad enabled and trainable parameters")
    leaves = prefix.detached()
    yield functools.partial(prefix_logprobs, model, leaves, temperature=temperature, logits_chunk=logits_chunk)
    pairs = [(t, leaf.grad) for t, leaf in zip(prefix.tensors(), leaves.tensors())
             if leaf.grad is not None and t.requires_grad]
    if pairs:  # the prompt's share of the gradient, once for the whole group
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


# --- generation: each prompt prefilled once


class _StoredAs(DynamicLayer):
    """A DynamicLayer that stores what it is given in one dtype, autocast's: with fp32 weights RoPE makes the keys
    fp32 and `cat` would promote the whole cache to fp32. Lossless, as autocast's SDPA casts to bf16 anyway."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.stored_dtype = dtype

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(key_states.to(self.stored_dtype), value_states.to(self.stored_dtype), *args, **kwargs)


class _Preallocated(_StoredAs):
    """A cache layer over fixed buffers `(N, H, capacity, D)`: `update` writes in place and `keys`/`values` are views
    of the filled part, the positions a growing DynamicLayer holds, without a `cat` every token
    (tests/test_decode_cache.py)."""

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

    `room`: positions to preallocate after the prompt's (`generate` writes `max_new_tokens` of them); None: a growing
    cache. Each prompt runs alone and unpadded: a padded prefill sends SDPA to a slower kernel on CPU
    (`python -m bench.rerank --padded-prefill`).
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
        # the padding slots stay zero: the attention mask hides them from every decoding step
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
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int = 1,
             repeat_prompt: bool = False, preallocate: bool = True, **generate_kwargs) -> torch.Tensor:
    """`model.generate` on a left-padded batch of prompts, each sampled `repeats` times: (B, P) -> (B*repeats, P+C).
    Every prompt is prefilled once (`prefilled_cache`), so generate feeds only the last prompt token;
    `repeat_prompt=True` is one padded forward over all rows. `preallocate=False` grows the cache by `cat`.
    """
    input_ids = prompt_ids.repeat_interleave(repeats, dim=0)  # (B*repeats, P): rows b*R .. b*R+R-1 are prompt b
    attention_mask = prompt_mask.repeat_interleave(repeats, dim=0)
    was_training = model.training
    model.eval()  # checkpointed layers in train mode drop the cache, even under no_grad (modeling_layers.py)
    try:
        # sliding-window layers need a cache of their own: plain generate
        if not repeat_prompt and full_attention(model):
            room = new_tokens(model, generate_kwargs) if preallocate else None
            generate_kwargs["cache"] = prefilled_cache(model, prompt_ids, prompt_mask, repeats, room)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    finally:
        model.train(was_training)


