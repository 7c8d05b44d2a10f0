"""LoRA (lora.py) on tiny random models, CPU: the untrained adapters change nothing, the reference with the adapters
off is the base, the prompt once per group stays exact, a LoRA run learns, the merged export generates what the
adapters do, Ctrl-C and --resume give the uninterrupted run bitwise, two processes give one's steps, and the memory
plan counts what peft builds."""

import copy
import json
import re
import signal
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import grpo
from support import reference
from support import lora
from support import memory
from support.backend import generate_tokens, load_model
from support.model_shape import LORA_TARGETS, lora_parameters, published_config, shape_of
from reward import Reward
from test_grpo import hand_rollout, run, tiny_dir, tiny_model, tokenizer, toy_instances  # noqa: F401 (fixtures)

LORA = grpo.Config(lora_rank=4)


def trained(policy, seed: int = 0, scale: float = 0.1):
    """Adapters as training leaves them: B drawn at random (peft starts B at zero, where the adapters add nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


def logprobs(model, ro, cfg=grpo.Config()):
    with torch.no_grad():
        return grpo.group_logprobs(model, ro, cfg)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------------------------------
# the policy and its reference


def test_an_untrained_lora_policy_has_the_base_log_probs_exactly():
    base = tiny_model(100)
    policy = lora.wrap(copy.deepcopy(base), LORA)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} and \
        all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)  # only adapters train
    ro = hand_rollout(100)
    assert same(logprobs(policy, ro), logprobs(base, ro))


def test_the_reference_with_the_adapters_off_is_a_frozen_copy_of_the_base():
    base = tiny_model(100)
    frozen = reference.Reference(base, "cpu", "resident")  # full fine-tuning's reference: a copy of the initial weights
    policy = trained(lora.wrap(base, LORA))
    ro, cfg = hand_rollout(100), grpo.Config()
    with_adapters = logprobs(policy, ro)
    assert same(grpo.reference_logprobs(lora.AdapterOff(policy), ro, cfg), grpo.reference_logprobs(frozen, ro, cfg))
    assert not same(with_adapters, grpo.reference_logprobs(frozen, ro, cfg))  # the adapters do change the policy
    assert same(logprobs(policy, ro), with_adapters)  # and are back on after the reference pass


@pytest.mark.parametrize("targets", [",".join(LORA_TARGETS), "q_proj,v_proj"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("micro_batch", [0, 2])
def test_prompt_once_per_group_gives_the_usual_lora_loss_and_gradients_in_float64(true_float64, targets,
                                                                                 checkpointing, micro_batch):
    # tests/test_grpo.py's exactness check with the adapters as the only trainable weights and the KL against the
    # adapters-off reference; q,v only leaves the first layer's keys without a gradient (prompt_once.prompt_pass)
    policy = trained(lora.wrap(tiny_model(100), grpo.Config(lora_rank=4, lora_targets=targets))).double().train()
    if checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ro = hand_rollout(100)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.2, -0.5], dtype=torch.float64)
    results = {}
    for repeat in (True, False):
        cfg = grpo.Config(beta=0.04, clip_eps=0.2, temperature=0.8, micro_batch=micro_batch, repeat_prompt=repeat)
        ref_logp = grpo.reference_logprobs(lora.AdapterOff(policy), ro, cfg)
        old_logp = [lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(5), dtype=lp.dtype)
                    for lp in logprobs(policy, ro, cfg)]
        policy.zero_grad()
        loss, stats = grpo.policy_backward(policy, ro, adv, old_logp, ref_logp, cfg)
        results[repeat] = loss, stats, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    (loss0, stats0, grads0), (loss1, stats1, grads1) = results[True], results[False]
    assert stats0["kl"] > 0 and 0 < stats0["clip_frac"] < 1
    assert grads0 and all("lora_" in n for n in grads0) and grads0.keys() == grads1.keys()
    assert abs(loss1 - loss0) <= 1e-10 * abs(loss0)
    assert stats1 == pytest.approx(stats0, rel=1e-10)
    for name, g in grads0.items():
        assert g.norm() > 0 and (grads1[name] - g).norm() <= 1e-10 * g.norm(), name


# ----------------------------------------------------------------------------------------------------------------------
# the loop end to end


@pytest.fixture()
def lora_peaked_dir(tmp_path, tokenizer):
    """tests/test_learns.py's peaked model with its projections drawn once more after the embeddings (same 0.02 std).

    The adapters reach the logits only through the 0.02-std layers (a gain of ~0.1 against 0.35-wide embeddings), so
    their first Adam steps, sign-like and mostly noise, wander; on peaked_dir's own draw that walk ends, before the
    36 steps are up, where no sample scores and no gradient is left (at lr 1e-2 to 3e-2 and alpha 8 to 32, tried).
    On this draw it climbs."""
    model = tiny_model(len(tokenizer))
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.35)
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "peaked")
    tokenizer.save_pretrained(tmp_path / "peaked")
    return tmp_path / "peaked"


def test_a_lora_run_raises_a_reachable_reward_far_beyond_its_noise(lora_peaked_dir, tmp_path, monkeypatch):
    import test_learns

    monkeypatch.setitem(grpo.TASKS, "listwise", grpo.TASKS["listwise"]._replace(reward=test_learns.lone_newlines))
    B, G = test_learns.B, test_learns.G
    cfg = grpo.Config(model=str(lora_peaked_dir), train_file=str(toy_instances(tmp_path / "train.jsonl")),
                      steps=test_learns.STEPS, batch_size=B, group_size=G, max_new_tokens=test_learns.C, lr=2e-2,
                      eval_every=0, save_every=0, dump_every=0, out=str(tmp_path / "run"), seed=0, lora_rank=8)
    grpo.train(cfg)
    test_learns.assert_reward_rose(tmp_path / "run")


def crc_reward(text: str, inst) -> Reward:
    """A reward that differs between completions (a tiny random model never ranks), so advantages and gradients do."""
    import zlib

    value = (zlib.crc32(text.encode()) % 97) / 96
    return Reward(value, 0.0, 0.0, value, 0.0)


def test_ctrl_c_then_resume_gives_the_uninterrupted_lora_run_bitwise(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(grpo.TASKS, "listwise", grpo.TASKS["listwise"]._replace(reward=crc_reward))
    train_file = toy_instances(tmp_path / "train.jsonl")
    kw = dict(train_file=train_file, updates=2, beta=0.04, lora_rank=4)
    full = run(tiny_dir, tmp_path / "full", 3, **kw)

    calls = []

    def interrupted(text, inst):  # Ctrl-C in the middle of the second step's rewards
        calls.append(text)
        if len(calls) == 8:
            signal.raise_signal(signal.SIGINT)
        return crc_reward(text, inst)

    monkeypatch.setitem(grpo.TASKS, "listwise", grpo.TASKS["listwise"]._replace(reward=interrupted))
    run(tiny_dir, tmp_path / "part", 3, **kw)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the step finished, was saved, and the run stopped
    monkeypatch.setitem(grpo.TASKS, "listwise", grpo.TASKS["listwise"]._replace(reward=crc_reward))
    resumed = run(tiny_dir, tmp_path / "part", 3, resume=True, **kw)

    assert full["kl"] > 0 and full["grad_norm"] > 0
    for key in ("reward", "loss", "grad_norm", "kl", "ratio"):
        assert resumed[key] == full[key], key
    for name in ("checkpoint/model", "checkpoint/optimizer", "model/model", "adapter/adapter_model"):
        a, b = (load_file(tmp_path / run_ / f"{name}.safetensors") for run_ in ("full", "part"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # checkpoint/ holds the adapters alone, model/ the merged weights under the base's names, moved from the base
    ckpt = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt) and any(k.endswith("lora_B.default.weight") for k in ckpt)
    merged = load_file(tmp_path / "full" / "model" / "model.safetensors")
    base = load_file(tiny_dir / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged.keys() == base.keys() and not torch.equal(merged[q], base[q])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_the_merged_export_generates_the_tokens_the_adapter_model_does(tiny_dir, tmp_path):
    from peft import PeftModel

    from support.checkpoint import rng_state

    model, tok = load_model(str(tiny_dir))
    policy = trained(lora.wrap(model, LORA), scale=1.0)
    cfg = grpo.Config(model=str(tiny_dir), lora_rank=4)
    lora.save(tmp_path, policy, tok, torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad]), 1,
              [rng_state()], cfg)
    merged, _ = load_model(str(tmp_path / "model"))
    served = PeftModel.from_pretrained(load_model(str(tiny_dir))[0], tmp_path / "adapter")  # the base + adapter/
    prompts = [[{"role": "user", "content": f"rank passages about {w}"}] for w in ("fleas", "cats", "the moon")]

    def greedy(m):
        return generate_tokens(m, tok, prompts, max_new_tokens=12).completion_ids

    want = greedy(policy)
    assert torch.equal(greedy(merged), want) and torch.equal(greedy(served), want)
    with policy.disable_adapter():
        assert not torch.equal(greedy(policy), want)  # the adapters change what is generated


def test_lora_flags_that_cannot_work_are_refused_when_parsed(capsys):
    for argv, message in [(["--lora-rank", "8", "--reference", "offload"], "no copy to place"),
                          (["--lora-rank", "8", "--bf16-weights"], "drop --bf16-weights"),
                          (["--lora-alpha", "16"], "need --lora-rank > 0"),
                          (["--lora-rank", "8", "--lora-targets", " , "], "name at least one linear")]:
        with pytest.raises(SystemExit):
            grpo.main(argv)
        assert message in capsys.readouterr().err, argv


def test_lora_targets_the_model_lacks_are_an_error_naming_them(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: --lora-targets q_proj,c_attn"):
        grpo.main(["--model", str(tiny_dir), "--train-file", str(toy_instances(tmp_path / "t.jsonl")),
                   "--lora-rank", "4", "--lora-targets", "q_proj,c_attn", "--memory", "off", "--steps", "1",
                   "--eval-every", "0", "--out", str(tmp_path / "run")])


# ----------------------------------------------------------------------------------------------------------------------
# the memory plan


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q_proj", "v_proj"), ("down_proj",)])
def test_lora_parameter_count_equals_what_peft_builds(targets):
    from test_memory import tiny_configs
    from transformers import AutoModelForCausalLM

    for config in tiny_configs():
        model = AutoModelForCausalLM.from_config(config)
        policy = lora.wrap(model, grpo.Config(lora_rank=3, lora_targets=",".join(targets)))
        built = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        assert lora_parameters(shape_of(config), 3, targets) == built, (config.model_type, targets)


def seven_b_lora(gpu_gb: float, **given):
    work = memory.Workload(4, 8, memory.prompt_tokens(20), 512, 0.001, True, lora_rank=16)
    return memory.choose(shape_of(published_config("qwen2.5-7b")), work, int(gpu_gb * 1e9), given)


@pytest.mark.parametrize("gpu_gb", [24, 48, 80])
def test_7b_lora_fits_24_48_and_80_gb_with_a_bf16_base_and_no_reference_copy(gpu_gb):
    plan, _ = seven_b_lora(gpu_gb)
    n = shape_of(published_config("qwen2.5-7b")).params
    adapters = 40_370_176
    assert plan.fits and plan.settings.reference == memory.ADAPTERS_OFF and plan.reference == 0
    assert not plan.settings.bf16_weights and plan.weights == 2 * n + 4 * adapters and plan.grads == 4 * adapters
    # the same weights, adapters off: no reference bytes, only the pass's own working set
    assert plan.pass_temps > 0 and plan.reference_pass == plan.weights + plan.optimizer + plan.logits + plan.pass_temps


def test_7b_lora_on_24_gb_needs_checkpointing_and_48_gb_does_not():
    assert seven_b_lora(24)[0].settings.checkpointing
    assert not seven_b_lora(48)[0].settings.checkpointing
    assert not seven_b_lora(20)[0].fits  # 15.2 GB of bf16 base and a 5.7 GB KV cache: 20 GB is too small


def test_grpo_takes_the_lora_plan_and_keeps_the_reference_flag(capsys):
    cfg = grpo.Config(model="x", lora_rank=16, memory_gb=24)
    plan = memory.plan_run(cfg, {"lora_rank", "memory_gb"}, published_config("qwen2.5-7b"), cuda=True)
    out = capsys.readouterr().out
    assert "LoRA rank 16" in out and "reference adapters off" in out and "fits" in out
    cfg = replace(cfg, **plan.choices)
    assert cfg.gradient_checkpointing and not cfg.bf16_weights and cfg.reference == "auto"


def test_the_cli_prints_the_lora_plan(capsys):
    memory.main(["--config", "qwen2.5-7b", "--gpu-gb", "24", "--lora-rank", "16"])
    out = capsys.readouterr().out
    assert re.search(r"\n  LoRA adapters +40\.4 M ", out) and ": fits" in out and "adapters off" in out


# ----------------------------------------------------------------------------------------------------------------------
# several processes


def test_two_processes_train_the_adapters_one_process_trains(tiny_dir, tmp_path):
    from test_dist import grpo_config, launch, read_checkpoint

    train_file = toy_instances(tmp_path / "train.jsonl")
    for out, n in (("one", 1), ("two", 2)):
        launch(n, "grpo", str(grpo_config(tiny_dir, train_file, tmp_path / out, 2, lora_rank=4, beta=0.04)))
    one, two = (read_checkpoint(tmp_path / p / "checkpoint") for p in ("one", "two"))
    assert one["model"] and all("lora_" in k for k in one["model"]) and one["model"].keys() == two["model"].keys()
    moments = [k for k in one["optimizer"] if k.endswith(".exp_avg")]
    assert moments and any(one["optimizer"][k].abs().max() > 0 for k in moments)  # the adapters did learn
    for k in moments:  # the gradient summed over the processes, as tests/test_dist.py checks for full fine-tuning
        torch.testing.assert_close(two["optimizer"][k], one["optimizer"][k], rtol=1e-5, atol=1e-9)
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], rtol=0, atol=1e-6)
    m1, m2 = ([json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()]
              for p in ("one", "two"))
    assert m1[-1]["kl"] > 0 and [m["reward"] for m in m2] == [m["reward"] for m in m1]


# ----------------------------------------------------------------------------------------------------------------------
# --rollout-batch: fewer prompts per generate call, for the KV cache a small GPU holds


def test_7b_lora_on_24_gb_with_longer_completions_generates_two_prompts_at_a_time(capsys):
    cfg = grpo.Config(model="x", lora_rank=16, memory_gb=24, max_new_tokens=1024)
    plan = memory.plan_run(cfg, {"lora_rank", "memory_gb", "max_new_tokens"}, published_config("qwen2.5-7b"),
                           cuda=True)
    assert plan.fits and plan.choices["rollout_batch"] == 2 and "rollout batch 2: the KV cache" in capsys.readouterr().out
    whole = memory.estimate(plan.shape, plan.work, replace(plan.settings, rollout_batch=0), plan.budget)
    assert not whole.fits and whole.kv_cache == 2 * plan.kv_cache


def test_a_rollout_in_batches_of_prompts_is_the_rollout_of_all_at_once(tokenizer, tmp_path, true_float64):
    import data as augment

    model = tiny_model(len(tokenizer)).double()
    batch = augment.read_instances(toy_instances(tmp_path / "t.jsonl"))[:3]
    task = grpo.TASKS["listwise"]
    kw = dict(max_new_tokens=5, greedy=True)
    whole = grpo.rollout(model, tokenizer, task, batch, 2, **kw)
    parts = grpo.rollout(model, tokenizer, task, batch, 2, rollout_batch=2, **kw)  # prompts 1-2, then 3
    assert parts.texts == whole.texts and parts.rewards == whole.rewards and parts.truncated == whole.truncated
    assert all(torch.equal(a, b) for a, b in zip(parts.prompts, whole.prompts, strict=True))
    width = whole.completion_ids.shape[1]
    assert torch.equal(parts.completion_mask[:, :width], whole.completion_mask)
    assert torch.equal(parts.completion_ids * parts.completion_mask, whole.completion_ids * whole.completion_mask)


def test_grpo_runs_with_a_rollout_batch(tiny_dir, tmp_path):
    metrics = run(tiny_dir, tmp_path / "run", 1, train_file=toy_instances(tmp_path / "t.jsonl"), rollout_batch=1,
                  lora_rank=4)
    assert metrics["step"] == 1 and json.loads((tmp_path / "run" / "config.json").read_text())["rollout_batch"] == 1
