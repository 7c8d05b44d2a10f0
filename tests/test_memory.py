"""The memory planner's arithmetic against the tensors a real tiny model allocates (CPU), and its choices."""

from dataclasses import replace

import pytest
import torch

from support import cli
import grpo
from support import memory
from support import prompt_once
from support.memory import Settings, Workload
from support.optimizer import BF16AdamW
from support.model_shape import count_parameters, meta_parameters, published_config, shape_of

# ----------------------------------------------------------------------------------------------------------------------
# parameter counts


def tiny_configs():
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2)
    return [LlamaConfig(**common, tie_word_embeddings=True), LlamaConfig(**common, tie_word_embeddings=False),
            LlamaConfig(**common, attention_bias=True, mlp_bias=True, head_dim=16),
            Qwen2Config(**common, tie_word_embeddings=False), Qwen2Config(**common, tie_word_embeddings=True)]


@pytest.mark.parametrize("i", range(5))
def test_parameter_count_equals_the_instantiated_model(i):
    from transformers import AutoModelForCausalLM

    config = tiny_configs()[i]
    model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert meta_parameters(config) == sum(p.numel() for p in model.parameters())


def test_qwen25_7b_published_config():
    # Qwen2.5-7B-Instruct's config.json: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab
    # 152064, untied embeddings, rope theta 1e6, 32768 positions; the model card says 7.61B (7.62 rounded up)
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
                         max_position_embeddings=32768)
    n = count_parameters(config)
    assert n == meta_parameters(config) == 7_615_616_512
    assert round(n / 1e9, 2) == 7.62
    assert shape_of(published_config("qwen2.5-7b")).params == n


# ----------------------------------------------------------------------------------------------------------------------
# byte counts against a real tiny run on CPU


def tiny_llama(vocab=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).train()


def group(vocab, P=40, C=24, rows=3):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (P,), generator=g), torch.randint(0, vocab, (rows, C), generator=g)


def step_bytes(model, optimizer, chunk=0):
    """One GRPO-shaped step; returns the bytes of the gradients, of the moment tensors, and the lm_head outputs."""
    prompt, ids = group(model.config.vocab_size)
    heads = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: heads.append(out.nbytes))
    with prompt_once.prompt_pass(model, prompt, logits_chunk=chunk) as score:
        (-score(ids, torch.ones_like(ids)).sum() / ids.numel()).backward()
    hook.remove()
    grads = sum(p.grad.nbytes for p in model.parameters())
    optimizer.step()
    state = sum(t.nbytes for p in model.parameters() for t in optimizer.state[p].values()
                if torch.is_tensor(t) and t.shape == p.shape)
    return grads, state, heads


@pytest.mark.parametrize("bf16", [False, True])
def test_weight_gradient_and_optimizer_bytes_match_one_step(bf16):
    model = tiny_llama()
    if bf16:
        model.to(torch.bfloat16)
        optimizer = BF16AdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shape = shape_of(model.config)
    plan = memory.estimate(shape, Workload(1, 3, 40, 24, 0.0, cuda=False), Settings(bf16_weights=bf16), 10**12)
    grads, state, _ = step_bytes(model, optimizer)
    assert plan.weights == sum(p.nbytes for p in model.parameters())
    assert plan.grads == grads
    assert plan.optimizer == state


def test_logits_are_made_one_chunk_at_a_time_as_planned():
    model = tiny_llama()
    shape = shape_of(model.config)
    _, _, heads = step_bytes(model, torch.optim.SGD(model.parameters(), lr=0.0), chunk=8)
    plan = memory.estimate(shape, Workload(1, 3, 40, 24, 0.0, cuda=False), Settings(logits_chunk=8), 10**12)
    # 3 rows x 8 positions x 256 fp32 logits per lm_head call, forward and recompute; the plan counts 4 copies
    assert max(heads) == 3 * 8 * 256 * 4 and len(heads) == 2 * 3 + 1  # 24 positions: 3 chunks, twice; 1: prompt
    assert plan.logits == 4 * max(heads)


@pytest.mark.parametrize("autocast", [False, True])
def test_activation_estimate_matches_what_autograd_saves(autocast):
    # every tensor the completions' forward saves for backward (the prompt's keys/values are leaves, as in
    # prompt_pass), against the per-token and per-key arithmetic; autocast on CPU stands in for CUDA's
    model = tiny_llama()
    P, C, rows = 40, 24, 3
    prompt, ids = group(256, P, C, rows)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights and tuple(t.shape) not in shapes:  # not a weight (or cast)
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pre = prompt_once.prompt_forward(model, prompt).detached()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            prompt_once._decoder(model)(input_ids=torch.cat([pre.last_token.expand(rows, 1), ids], 1),
                                   attention_mask=torch.ones(rows, P + C), cache=pre, use_cache=False)
    shape = shape_of(model.config)
    compute = 2 if autocast else 4
    tok, key = memory.token_activation_bytes(shape, 4, compute), memory.key_activation_bytes(shape, compute)
    estimate = (rows * (C + 1) * (tok + key) + rows * (P - 1) * key) * shape.layers
    assert estimate == pytest.approx(sum(saved.values()), rel=0.1)


# ----------------------------------------------------------------------------------------------------------------------
# the choices


SEVEN_B = None


def seven_b():
    global SEVEN_B
    SEVEN_B = SEVEN_B or shape_of(published_config("qwen2.5-7b"))
    return SEVEN_B


PAPER = Workload(batch_size=4, group_size=8, prompt_tokens=memory.prompt_tokens(20), max_new_tokens=512, beta=0.001,
                 cuda=True)


def test_7b_on_80_gb_needs_bf16_weights_checkpointing_and_an_offloaded_reference():
    plan, why = memory.choose(seven_b(), PAPER, int(80e9), {})
    s = plan.settings
    assert plan.fits and s.bf16_weights and s.checkpointing and s.reference == "offload"
    assert plan.weights + plan.grads + plan.optimizer == 8 * seven_b().params
    assert any("fp32 master weights do not fit" in line for line in why)
    fp32 = memory.estimate(seven_b(), PAPER, Settings(False, True, 1, 64, "offload"), int(80e9))
    assert not fp32.fits  # 10 bytes a parameter before any activation: 76 GB of the 72 usable


def test_7b_on_141_gb_keeps_fp32_master_weights_and_the_reference_resident_when_it_fits():
    plan, _ = memory.choose(seven_b(), PAPER, int(141e9), {})
    assert plan.fits and not plan.settings.bf16_weights and not plan.settings.checkpointing
    assert plan.settings.reference == "offload"  # resident, the activations would need checkpointing
    roomy, _ = memory.choose(seven_b(), PAPER, int(180e9), {})
    assert roomy.settings.reference == "resident" and not roomy.settings.bf16_weights


def test_explicit_settings_are_kept_and_nothing_fitting_is_an_error_that_says_what_would():
    cfg = grpo.Config(model="x", beta=0.001, memory_gb=80, micro_batch=8)
    with pytest.raises(memory.PlanError, match="no settings fit in 80.0 GB.*device with >= "):
        memory.plan_run(cfg, {"bf16_weights", "micro_batch", "memory_gb"}, published_config("qwen2.5-7b"),
                        cuda=True)
    cfg = grpo.Config(model="x", beta=0.001, memory_gb=80, micro_batch=2)
    plan = memory.plan_run(cfg, {"micro_batch", "memory_gb"}, published_config("qwen2.5-7b"), cuda=True)
    cfg = replace(cfg, **plan.choices)
    assert cfg.micro_batch == 2 and cfg.bf16_weights and cfg.reference == "offload" and cfg.logits_chunk > 0


def test_memory_off_takes_the_flags_as_given(capsys):
    cfg = grpo.Config(model="x", memory="off", memory_gb=80)
    plan = memory.plan_run(cfg, set(), published_config("qwen2.5-7b"), cuda=True)
    assert not plan.fits and not plan.choices and not cfg.bf16_weights and cfg.logits_chunk == 0
    assert "does not fit" in capsys.readouterr().out


def test_explicit_flags_from_the_command_line():
    assert cli.explicit_flags(grpo.Config, ["--micro-batch", "0", "--grad", "--beta=0.1", "--out", "x"]) == \
        {"micro_batch", "gradient_checkpointing", "beta", "out"}


def test_the_cli_prints_the_plan(capsys):
    memory.main(["--config", "qwen2.5-7b", "--gpu-gb", "80", "--beta", "0.001"])
    out = capsys.readouterr().out
    assert "7.62 B" in out and "fits" in out and "bf16 weights" in out


def test_the_reason_given_for_an_offloaded_reference_is_true():
    def resident_fits(budget, checkpointing, bf16):
        return any(memory.estimate(seven_b(), PAPER, Settings(bf16, checkpointing, 0 if mb == 8 else mb,
                                                              memory.auto_logits_chunk(seven_b(), mb), "resident"),
                                   budget).fits for mb in memory.halvings(8))

    plan, why = memory.choose(seven_b(), PAPER, int(80e9), {})  # checkpointing on, the reference offloaded
    line = next(x for x in why if x.startswith("reference offload"))
    assert plan.settings.checkpointing and line.endswith("does not fit, even with checkpointing")
    assert not resident_fits(int(80e9), True, True)
    plan, why = memory.choose(seven_b(), PAPER, int(141e9), {})  # checkpointing off, the reference offloaded
    line = next(x for x in why if x.startswith("reference offload"))
    assert not plan.settings.checkpointing and "does not fit without checkpointing" in line
    assert not resident_fits(int(141e9), False, False)


def test_the_plan_counts_the_backward_and_the_reference_pass_temporaries():
    plan, _ = memory.choose(seven_b(), PAPER, int(80e9), {})
    assert plan.settings.checkpointing and plan.settings.reference == "offload"
    assert 0.5e9 < plan.backward_temps < 3e9 and 0.5e9 < plan.pass_temps < 3e9  # ~1 GB each at 7B
    assert plan.training == (plan.weights + plan.grads + plan.optimizer + plan.activations + plan.logits
                             + plan.backward_temps)
    assert plan.reference_pass == plan.weights + plan.optimizer + plan.reference + plan.logits + plan.pass_temps
    assert "backward temps" in plan.table() and "no-grad pass temps" in plan.table()
