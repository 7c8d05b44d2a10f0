"""Compute a GRPO group's prompt once, with exact gradients (issue 6).

GRPO samples G completions of the same prompt. The usual trainers (TRL, verl) feed `cat(prompt, completion)` G times,
so the rollout prefill, the reference pass and the policy forward and backward all recompute the same ~2,300-token
prompt G times. Its activations are identical for all G rows, so here the prompt runs once (with autograd), its
per-layer keys and values are broadcast to the G completions, and gradients flow back through them to the single
prompt pass. This is exact, not an approximation.

The prefix is the prompt minus its last token; each completion row starts with that last token, whose logits score
the first completion token. That costs one token per row and keeps every logit in one batched pass: scoring the
first token from the prompt pass's single last-logits row made float32 gradients ~4x further from float64 than the
plain path's, because CPU float32 matmuls with 1-7 rows (the (1, V) @ (V, H) lm_head backward) are ~10x less
accurate than with 35+ (measured here: 4e-6 vs 4e-7 relative at K=49152).

    prefix = prompt_forward(model, prompt_ids)                         # the prompt, once
    logp = prefix_logprobs(model, prefix, ids, mask)                   # (G, C), any micro-batch of completions
    logp = completion_logprobs(model, prompt_ids, ids, mask)           # both steps; shared=False: the usual way
    loss = group_backward(model, prompt_ids, ids, mask, loss_fn, micro_batch=2)   # micro-batched backward

The rollout's side, each prompt prefilled once for `generate`, is prefill.py's, built on `prompt_forward`.
Tests: `python -m pytest tests/test_prefix.py`; timing: `nice python bench_prefix.py` (see its docstring).

For the log-probs a group shares ONE unpadded prompt: `prompt_ids` is `(P,)` or `(1, P)`, never a left-padded batch
(`prefill.generate` takes a left-padded batch and strips each prompt's padding itself, `unpadded`). Completions are
right-padded `(G, C)` with `completion_mask` 1 on real tokens (pad with any valid token id).

Pitfalls in transformers 5.24 that shape this file:
- A checkpointed decoder layer (`GradientCheckpointingLayer`, modeling_layers.py) drops `cache` (and
  `use_cache`) unless the layer sets `_can_checkpoint_with_cache`. Our caches only read (or record once), so we set
  that flag on the model's layers for the duration of a forward (`_cache_survives_checkpointing`).
- A checkpointed layer calls the cache's `update` twice: forward, then recompute in backward. So `PrefixLayer.update`
  never stores or mutates; it returns `cat(prefix broadcast to the batch, new)` each time. The same object then also
  serves several micro-batches.
- Reentrant checkpointing runs the layer under no_grad and only tracks its positional inputs; the broadcast prefix
  reaches the layer through the cache, so its gradient is silently lost (issue 6 measured a relative error of ~1.15).
  We refuse it (`check_checkpointing`). Non-reentrant checkpointing (`activation_checkpointing_enable`'s default)
  is exact.
- Positions and the mask come from the cache: `get_seq_length()` (position ids, query offset) and
  `get_mask_sizes()` (kv length = prefix + completion). A `DynamicCache` built from existing tensors copies them
  (`cat([empty, k])`), so the layers here hold the prompt's tensors directly.

Reading order: the cache layers (`PrefixLayer`, `_RecordLayer`, `PrefixCache`), the model plumbing (the checks, one
prompt per group, `token_logprobs`, `head_logprobs` in chunks), then the prompt once and the completions
(`prompt_forward`, `prefix_logprobs` and the usual `plain_logprobs`, `completion_logprobs`, `group_backward`).
"""

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, CacheLayerMixin

# --- cache layers


class PrefixLayer(CacheLayerMixin):
    """One layer's prompt keys/values `(1, H, P, D)`, broadcast to each completion batch, never modified.

    `update(k, v)` with `k` of shape `(B, H, C, D)` returns `(cat(prefix expanded to B, k), ...)`: `(B, H, P+C, D)`.
    Nothing is stored, so a checkpointed layer's recompute and every micro-batch see the same prefix.
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
    """Records the keys/values of its first `update` (the prompt pass) and returns them as they are.

    A checkpointed layer calls `update` again on recompute; that call must not overwrite the recorded tensors, which
    the completions' graph already holds.
    """

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        raise AssertionError("unused")

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        return key_states, value_states  # no past: the prompt attends to itself only

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class PrefixCache(Cache):
    """A read-only cache: the keys/values of a prompt's first P-1 tokens per layer, and its last token `(1, 1)`.

    Pass it as `cache` to a forward whose rows start with `last_token`.
    """

    def __init__(self, layers: list[PrefixLayer], last_token: torch.Tensor):
        super().__init__(layers=layers)
        self.last_token = last_token  # (1, 1)

    def detached(self) -> "PrefixCache":
        """The same prefix as fresh leaf tensors that collect gradients (for `group_backward`)."""
        return PrefixCache([PrefixLayer(lay.keys.detach().requires_grad_(), lay.values.detach().requires_grad_())
                            for lay in self.layers], self.last_token)

    def tensors(self) -> list[torch.Tensor]:
        return [t for lay in self.layers for t in (lay.keys, lay.values)]


# --- model plumbing


def check_checkpointing(model) -> None:
    """Refuse reentrant activation checkpointing: it silently drops the prefix's gradient (issue 6)."""
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
    """Let checkpointed decoder layers keep `cache` (transformers drops it, modeling_layers.py).

    Safe here because our caches never grow: the recompute reads the same prefix. The flag is only read when the
    layer is called, so restoring it afterwards does not affect the later recompute.
    """
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
    """log_softmax(scores / temperature) at `ids`: (B, C, V), (B, C) -> (B, C); at least float32.

    One float32 copy of bf16 scores, none of float32 ones, and no division at T = 1 (a (B, C, V) copy each).

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
    """lm_head and the log-probs at `ids` from the last hidden states, `chunk` positions at a time: (B, C, H) -> (B, C).

    The full-vocabulary logits of a micro-batch are its largest tensor ((8, 513, 152064) fp32 is 2.5 GB a copy, and
    log-softmax and its backward make ~4 copies). Each chunk runs under non-reentrant checkpointing, so its logits are
    freed at once and recomputed in the backward one chunk at a time: only one chunk's logits ever live. Exact: the
    same ops on the same rows (tests/test_prefix.py). chunk 0: all positions at once.
    """
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
    """Run all but the last token of one prompt once (with autograd if enabled): their per-layer keys/values."""
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
    token t+1, so the last C+1 positions score the C tokens. Unchunked the model's own forward makes the logits (only
    those positions', `logits_to_keep`); chunked the decoder's hidden states go through `head_logprobs`."""
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
                        completion_mask: torch.Tensor, temperature: float = 1.0, shared: bool = True,
                        micro_batch: int | None = None, logits_chunk: int = 0) -> torch.Tensor:
    """Log-probs `(G, C)` of a group's completions; `shared=False` repeats the prompt per row (the usual way).

    Micro-batches bound the completions' activation memory under no_grad (reference and old-policy passes). With
    grad, all micro-batches' graphs stay alive until backward; use `group_backward` to free them as it goes.
    """
    chunks = micro_batches(completion_ids.shape[0], micro_batch)
    if not shared:
        return torch.cat([plain_logprobs(model, prompt_ids, completion_ids[rows], completion_mask[rows], temperature,
                                         logits_chunk) for rows in chunks])
    prefix = prompt_forward(model, prompt_ids)
    return torch.cat([prefix_logprobs(model, prefix, completion_ids[rows], completion_mask[rows], temperature,
                                      logits_chunk) for rows in chunks])  # (G, C)


def group_backward(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, slice], torch.Tensor], temperature: float = 1.0,
                   micro_batch: int | None = None, shared: bool = True, logits_chunk: int = 0) -> float:
    """Backward of `sum over micro-batches of loss_fn(logp_rows (b, C), rows)` for one group; returns the total loss.

    `loss_fn` must return this micro-batch's share of the total (e.g. divide by the whole batch's token count, not the
    micro-batch's), so that the summed gradients equal one backward of the whole loss.

    shared=True runs the prompt once: each micro-batch backpropagates into detached copies of the prompt's keys/values,
    so its graph is freed at once; their summed gradients then go through the single prompt pass (linearity).
    shared=False is the usual way: each micro-batch repeats the prompt in its own forward and backward.
    """
    if shared:
        prefix = prompt_forward(model, prompt_ids)
        # any one of them: LoRA on q and v only leaves the first layer's keys without a gradient
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in prefix.tensors())):
            raise ValueError("group_backward needs grad enabled and trainable parameters")
        leaves = prefix.detached()
        logprobs = functools.partial(prefix_logprobs, model, leaves)
    else:
        logprobs = functools.partial(plain_logprobs, model, prompt_ids)
    total = 0.0
    for rows in micro_batches(completion_ids.shape[0], micro_batch):
        logp = logprobs(completion_ids[rows], completion_mask[rows], temperature, logits_chunk)  # (b, C)
        loss = loss_fn(logp, rows)
        loss.backward()  # parameter grads of these completions; shared: prompt-side grads pile up in the leaves
        total += loss.item()
    if shared:  # the prompt's share of the gradient, once for the whole group
        pairs = [(t, leaf.grad) for t, leaf in zip(prefix.tensors(), leaves.tensors())
                 if leaf.grad is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return total
