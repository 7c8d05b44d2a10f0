"""Decoding into a preallocated cache (prompt_once.py's `_Preallocated`) gives exactly what the growing cache gives: the
same tokens and bit-identical logits, greedy and sampled, for left-padded batches, G samples a prompt and rows that
stop early; every step writes into the buffer allocated at prefill; the memory plan counts that buffer.
"""

import pytest
import torch

from support import memory
from support import prompt_once
from support.model_shape import shape_of
from test_prefix import EOS, P, group, tiny_model


def padded_batch():
    """Two prompts, left-padded to P: row 1 has 4 pad positions."""
    prompt, *_ = group()
    ids = torch.stack([prompt, torch.cat([torch.zeros(4, dtype=torch.long), prompt[4:]])])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def both_paths(model, ids, mask, repeats, seed=None, **kwargs):
    """(growing, preallocated) `generate` outputs with their logits and cache, each from the same seed if given."""
    kwargs = dict(pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kwargs)
    out = []
    for preallocate in (False, True):
        if seed is not None:
            torch.manual_seed(seed)
        out.append(prompt_once.generate(model, ids, mask, repeats, preallocate=preallocate, **kwargs))
    return out


def assert_identical(old, new):
    assert torch.equal(new.sequences, old.sequences)
    assert len(new.logits) == len(old.logits)
    assert all(torch.equal(a, b) for a, b in zip(new.logits, old.logits))  # bit for bit, every step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, "autocast"])
def test_greedy_padded_batch_with_an_early_stopping_row_is_identical(dtype):
    # 2 left-padded prompts x 3 samples; prompt 0's rows meet EOS after 4 tokens, prompt 1's run all 9
    model = tiny_model(torch.float32 if dtype == "autocast" else dtype).eval()
    ids, mask = padded_batch()
    probe = prompt_once.generate(model, ids, mask, max_new_tokens=9, do_sample=False, pad_token_id=0)[:, P:]
    eos = int(probe[0, 3])
    assert eos not in probe[1].tolist()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
        old, new = both_paths(model, ids, mask, 3, max_new_tokens=9, do_sample=False, eos_token_id=eos)
    assert_identical(old, new)
    completions = new.sequences[:, P:]
    assert completions.shape == (6, 9) and (completions[:3, 4:] == 0).all()  # stopped, then padded
    assert not torch.equal(completions[0], completions[3])  # the prompts really continue differently
    stored = torch.bfloat16 if dtype == "autocast" else dtype
    assert {lay.keys.dtype for lay in new.cache.layers} == {stored}


def test_seeded_sampling_of_g_samples_a_prompt_is_identical():
    model = tiny_model(torch.float32).eval()
    ids, mask = padded_batch()
    sample = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=0, top_p=1.0, eos_token_id=EOS)
    old, new = both_paths(model, ids, mask, 4, seed=7, **sample)
    assert_identical(old, new)
    assert len({tuple(r) for r in new.sequences[:4, P:].tolist()}) > 1  # really sampled: the 4 samples differ


def test_every_step_writes_into_the_buffer_allocated_at_prefill(monkeypatch):
    model = tiny_model(torch.float32).eval()
    ids, mask = padded_batch()
    C = 6
    cache = prompt_once.prefilled_cache(model, ids, mask, repeats=2, room=C)
    buffers = [(lay.buffer_keys, lay.buffer_values) for lay in cache.layers]
    assert buffers[0][0].shape == (4, 2, P - 1 + C, 8) and cache.get_seq_length() == P - 1
    grown = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: grown.append(max(t.numel() for t in ts)) or cat(ts, *a, **k))
    out = model.generate(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                         cache=cache, max_new_tokens=C, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == P + C and cache.get_seq_length() == P - 1 + C  # every buffer position written
    assert max(grown) < buffers[0][0][:, :, :P - 1].numel()  # no cat of anything cache-sized (masks and ids only)
    for lay, (k, v) in zip(cache.layers, buffers):
        assert lay.buffer_keys is k and lay.keys.data_ptr() == k.data_ptr() and lay.values.data_ptr() == v.data_ptr()
    with pytest.raises(RuntimeError, match="overflows"):
        cache.layers[0].update(k[:, :, :1], v[:, :, :1])


def test_embedded_model_greedy_completions_are_identical():
    from support.backend import generate_tokens, load_model

    model, tokenizer = load_model("smollm2")
    prompts = [[{"role": "user", "content": "Rank these passages about rivers: [1] The Nile. [2] Paris."}],
               [{"role": "user", "content": "Say hello."}]]  # different lengths: the second is left-padded
    old, new = (generate_tokens(model, tokenizer, prompts, max_new_tokens=12, preallocate=p) for p in (False, True))
    assert torch.equal(new.completion_ids, old.completion_ids) and new.texts == old.texts
    assert int(new.prompt_mask[1].sum()) < new.prompt_mask.shape[1] and new.completion_mask.sum() > 12


def test_memory_plan_counts_the_preallocated_cache():
    # the plan budgets B*G rows of P + C positions; the buffer holds P - 1 + C (the last token is never fed back)
    model = tiny_model(torch.float32).eval()
    prompt, *_ = group()
    C, G = 24, 3
    cache = prompt_once.prefilled_cache(model, prompt[None], torch.ones(1, P, dtype=torch.long), repeats=G, room=C)
    held = sum(lay.buffer_keys.nbytes + lay.buffer_values.nbytes for lay in cache.layers)
    shape = shape_of(model.config)
    plan = memory.estimate(shape, memory.Workload(1, G, P, C, 0.0, cuda=False), memory.Settings(), 10**12)
    assert held == G * (P - 1 + C) * shape.layers * 2 * shape.kv_dim * 4
    assert plan.kv_cache == held * (P + C) // (P - 1 + C)
