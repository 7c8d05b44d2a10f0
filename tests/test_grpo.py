"""The GRPO maths against oracles and hand-computed values, and the loop end to end on a tiny random model (CPU)."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import data
import grpo
from data import Candidate
from grpo import group_advantages, grpo_loss
from support.optimizer import BF16AdamW, moved_fraction, stochastic_round_, weight_sample
from support.prompt_once import completion_logprobs, token_logprobs
from reward import Reward

# ----------------------------------------------------------------------------------------------------------------------
# a tiny random Llama with the embedded model's tokenizer (its chat template is what the prompts need)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from support.backend import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    tok.padding_side = "left"
    return tok


def tiny_model(vocab_size: int, seed: int = 0, intermediate_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_group(vocab: int):
    """One 6-token prompt with two 4-token completions; the second stops after 2 tokens."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (6,), generator=g)
    completion_ids = torch.randint(3, vocab, (2, 4), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return prompt, completion_ids, completion_mask


# ----------------------------------------------------------------------------------------------------------------------
# log-probs


def test_logprobs_equal_minus_hf_cross_entropy_per_token():
    model = tiny_model(100)
    prompt, cids, cmask = one_group(100)
    logp = completion_logprobs(model, prompt, cids, cmask, temperature=1.0)  # (2, 4), the prompt run once
    for row in range(2):
        ids = torch.cat([prompt, cids[row]])[None]  # (1, 10)
        for t in range(int(cmask[row].sum())):
            labels = torch.full_like(ids, -100)
            labels[0, 6 + t] = ids[0, 6 + t]  # HF shifts labels itself: an off-by-one here would not match
            hf = model(input_ids=ids, labels=labels).loss
            assert logp[row, t].item() == pytest.approx(-hf.item(), abs=1e-5)


def toy_batch(n: int = 2):
    """Training instances whose prompts differ in length, so the rollout batch is left-padded."""
    cands = [Candidate(f"d{i}", "flea " * (1 + 9 * i)) for i in range(6)]
    ds = data.Dataset("toy", [data.Ranking(data.Query("q1", "flea life"), cands)], {"q1": {"d1": 2, "d3": 1}})
    return [data.make_instance(ds.rankings[0].query, cands[i : i + 3], ds.qrels["q1"]) for i in range(n)]


def test_greedy_rollout_of_a_padded_batch_is_what_the_training_pass_scores(tokenizer, true_float64):
    # generation prefills each prompt alone and decodes a left-padded batch; the loss scores each group's unpadded
    # prompt: positions and masks must agree, so every greedy token is the argmax of the teacher-forced logits
    model = tiny_model(len(tokenizer)).double()
    task, batch = grpo.TASKS["listwise"], toy_batch()
    shared = grpo.rollout(model, tokenizer, task, batch, 2, max_new_tokens=6, greedy=True)
    plain = grpo.rollout(model, tokenizer, task, batch, 2, max_new_tokens=6, greedy=True, repeat_prompt=True)
    assert len(shared.prompts[0]) != len(shared.prompts[1])  # the batch really was padded
    assert torch.equal(shared.completion_ids, plain.completion_ids) and shared.texts == plain.texts
    for b in range(2):
        prompt, ids, mask, _ = shared.group(b)
        assert torch.equal(prompt, plain.prompts[b])
        logits = model(input_ids=torch.cat([prompt, ids[0]])[None]).logits[0, len(prompt) - 1 : -1]  # (C, V)
        n = int(mask[0].sum())
        assert torch.equal(logits.argmax(-1)[:n], ids[0, :n])


def hand_rollout(vocab: int, G: int = 3) -> grpo.Rollout:
    """Two groups whose prompts differ in length, G right-padded completions each (one stops after 2 tokens)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (9, 5)]
    ids = torch.randint(3, vocab, (2 * G, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 2:] = 0
    mask[G:, 4:] = 0  # the second group's longest completion is 4 tokens: its passes are cut to 4 columns
    reward = Reward(0.0, False, False, 0.0, 0.0)
    return grpo.Rollout(prompts, ids, mask, [""] * 2 * G, [reward] * 2 * G, [False] * 2 * G)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("micro_batch", [0, 2])
def test_prompt_once_per_group_gives_the_usual_loss_and_gradients_in_float64(true_float64, checkpointing, micro_batch):
    # the loss with every term in play (old policy, clip, KL to a reference) and every parameter's gradient: the
    # prompt run once per group equals the prompt repeated per completion (TRL's way) to 1e-10 relative
    model = tiny_model(100).double().train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref = tiny_model(100, seed=1).double().eval()
    ro = hand_rollout(100)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.2, -0.5], dtype=torch.float64)
    results = {}
    for repeat in (True, False):
        cfg = grpo.Config(beta=0.04, clip_eps=0.2, temperature=0.8, micro_batch=micro_batch, repeat_prompt=repeat)
        with torch.no_grad():
            ref_logp = grpo.group_logprobs(ref, ro, cfg)
            old_logp = [lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(5), dtype=lp.dtype)
                        for lp in grpo.group_logprobs(model, ro, cfg)]  # far enough from the policy to clip
        model.zero_grad()
        loss, stats = grpo.policy_backward(model, ro, adv, old_logp, ref_logp, cfg)
        results[repeat] = loss, stats, {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss0, stats0, grads0), (loss1, stats1, grads1) = results[True], results[False]
    assert 0 < stats0["clip_frac"] < 1 and stats0["kl"] > 0  # the clip and the KL really took part
    assert abs(loss1 - loss0) <= 1e-10 * abs(loss0)
    assert stats1 == pytest.approx(stats0, rel=1e-10)
    for name, g in grads0.items():
        assert (grads1[name] - g).norm() <= 1e-10 * g.norm(), name


def test_logprobs_at_the_sampling_temperature():
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets, 0.7), expected)


# ----------------------------------------------------------------------------------------------------------------------
# advantages


def test_advantages_zero_mean_per_group_and_zero_for_a_constant_group():
    r = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2])
    for scale in (True, False):
        a = group_advantages(r, 4, scale=scale).view(2, 4)
        torch.testing.assert_close(a.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
        assert torch.equal(a[1], torch.zeros(4))
    a = group_advantages(r, 4).view(2, 4)[0]
    assert a.std().item() == pytest.approx(1.0, abs=1e-3)  # unit std (up to eps)


def test_advantages_of_a_group_whose_std_is_near_eps():
    # std of [0, 2e-4] is sqrt(2) 1e-4, eps 1e-4: (+-1e-4) / (sqrt(2) 1e-4 + 1e-4) = +-(sqrt(2) - 1); eps inside the
    # square root (sqrt(var + eps) = 0.01) would give +-0.01
    a = group_advantages(torch.tensor([0.0, 2e-4], dtype=torch.float64), 2)
    torch.testing.assert_close(a, torch.tensor([1 - math.sqrt(2), math.sqrt(2) - 1], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------------
# the loss


def test_loss_on_a_hand_made_batch():
    logp = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.6]]))
    old = torch.log(torch.tensor([[0.25, 0.2], [0.3, 0.4]]))  # ratios [[2, 1], [1, 1.5]]
    ref = torch.log(torch.tensor([[0.5, 0.1], [0.6, 0.6]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    # token (0,0): ratio 2 clipped to 1.2, KL 0 -> -1.2
    # token (0,1): ratio 1, KL(0.1/0.2) = 0.5 - ln 0.5 - 1 -> -(1 - 0.1 KL)
    # token (1,0): ratio 1, A -2, KL(0.6/0.3) = 2 - ln 2 - 1 -> -(-2 - 0.1 KL); token (1,1) is masked
    kl01, kl10 = 0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1
    expected = (-1.2 - (1 - 0.1 * kl01) + (2 + 0.1 * kl10)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(-0.05)
    assert stats["clip_frac"] == pytest.approx(1 / 3) and stats["kl"] == pytest.approx((kl01 + kl10) / 3, abs=1e-6)
    # n_tokens = the whole batch's count: a micro-batch's loss is scaled to add up to the batch loss
    half, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, 0.1, n_tokens=6)
    assert half.item() == pytest.approx(expected / 2, abs=1e-6)


def test_kl_is_nonnegative_and_zero_when_policy_is_reference():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 5, 11), -1)[..., 0]
    ref = torch.log_softmax(torch.randn(4, 5, 11), -1)[..., 0]
    mask, adv = torch.ones(4, 5), torch.randn(4)
    _, stats = grpo_loss(logp, None, ref, adv, mask, beta=0.04)
    assert stats["kl"] > 0
    _, same = grpo_loss(logp, None, logp.clone(), adv, mask, beta=0.04)
    assert same["kl"] == 0.0
    kl = torch.exp(ref - logp) - (ref - logp) - 1  # the k3 term itself, token by token
    assert (kl >= 0).all()


def test_k3_kl_of_a_single_token():
    # pi = 0.2, pi_ref = 0.1: KL_k3 = pi_ref/pi - ln(pi_ref/pi) - 1 = 0.5 - ln 0.5 - 1 = 0.19315 (swapping the two
    # log-probs gives 2 - ln 2 - 1 = 0.30685); with A = 0 the loss is beta * KL
    logp, ref = torch.log(torch.tensor([[0.2]])), torch.log(torch.tensor([[0.1]]))
    loss, stats = grpo_loss(logp, None, ref, torch.tensor([0.0]), torch.ones(1, 1), beta=0.5)
    assert stats["kl"] == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6) and stats["kl"] == pytest.approx(0.19315,
                                                                                                             abs=1e-5)
    assert loss.item() == pytest.approx(0.5 * 0.19315, abs=1e-5)


@pytest.mark.parametrize(
    "ratio, adv, clipped",
    [(1.1, 1.0, False), (1.5, 1.0, True), (1.5, -1.0, False), (0.9, -1.0, False), (0.5, -1.0, True), (0.5, 1.0, False)],
)
def test_clip_is_active_outside_the_trust_region(ratio, adv, clipped):
    old = torch.log(torch.tensor([[0.4]]))
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = grpo_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), clip_eps=0.2)
    loss.backward()
    assert stats["clip_frac"] == float(clipped)
    assert (logp.grad.abs().item() == 0) == clipped  # a clipped token passes no gradient
    assert stats["ratio"] == pytest.approx(ratio)


def test_one_update_per_batch_gives_the_policy_gradient():
    # old_logp None: rho = exp(logp - logp.detach()) == 1, and d loss / d logp = -A / n_tokens
    logp = torch.log(torch.tensor([[0.3, 0.2]])).requires_grad_(True)
    loss, stats = grpo_loss(logp, None, None, torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    assert stats["ratio"] == 1.0 and loss.item() == pytest.approx(-2.0)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0]]))


def test_batch_indices_draw_a_fresh_permutation_every_epoch():
    n = 10
    epochs = [data.batch_indices(e, n, n, seed=0) for e in range(4)]  # one step = one epoch
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch visits every instance once
    assert len({tuple(e) for e in epochs}) == 4  # and in a different order each time
    assert data.batch_indices(1, n, n, seed=1) != epochs[1]  # the seed matters too


# ----------------------------------------------------------------------------------------------------------------------
# weights move at lr 1e-6 (fp32 master weights); in bf16 they would not


def one_step(model, lr=1e-6, optimizer=torch.optim.AdamW):
    prompt, cids, cmask = one_group(model.config.vocab_size)
    opt = optimizer(model.parameters(), lr=lr, weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=next(model.parameters()).dtype == torch.bfloat16):
        logp = completion_logprobs(model.train(), prompt, cids, cmask, 1.0)
    loss, _ = grpo_loss(logp, None, None, torch.tensor([1.0, -1.0]), cmask)
    loss.backward()
    opt.step()
    return moved_fraction(before, [p.detach() for p in model.parameters()])


def test_one_step_at_lr_1e_6_moves_fp32_weights_but_not_bf16_ones():
    model = tiny_model(100)
    assert one_step(copy.deepcopy(model)) > 0.95  # every weight with a gradient moves by about lr
    assert one_step(copy.deepcopy(model).to(torch.bfloat16)) < 0.05  # 1e-6 is below half the bf16 spacing


# ----------------------------------------------------------------------------------------------------------------------
# the loop end to end, and resume


def toy_instances(path):
    cands = [Candidate(f"d{i}", f"passage number {i} about fleas" if i % 2 else f"cats {i}") for i in range(12)]
    ds = data.Dataset("toy", [data.Ranking(data.Query("q1", "flea life"), cands)], {"q1": {"d1": 2, "d3": 1, "d5": 3}})
    instances, _ = data.augment(ds, samples=6, size=3, seed=0, min_ndcg=0.0)
    data.write_instances(path, instances)
    return path


def run(tiny_dir, out, steps, **kw):
    cfg = grpo.Config(model=str(tiny_dir), train_file=str(kw.pop("train_file")), steps=steps, batch_size=2,
                      group_size=3, max_new_tokens=6, lr=1e-3, eval_every=0, save_every=1, dump_every=1,
                      out=str(out), **kw)
    return grpo.train(cfg)


def test_resume_reproduces_the_next_step(tiny_dir, tmp_path):
    train_file = toy_instances(tmp_path / "train.jsonl")
    full = run(tiny_dir, tmp_path / "full", 3, train_file=train_file, updates=2)
    run(tiny_dir, tmp_path / "part", 2, train_file=train_file, updates=2)
    resumed = run(tiny_dir, tmp_path / "part", 3, train_file=train_file, updates=2, resume=True)
    for key in ("reward", "loss", "grad_norm", "completion_len", "ratio"):
        assert resumed[key] == full[key], key
    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "part" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    episodes = (tmp_path / "full" / "episodes.jsonl").read_text().splitlines()
    assert len(episodes) == 3 * 3 and {"completion", "reward", "advantage"} <= set(json.loads(episodes[0]))
    assert (tmp_path / "part" / "episodes.jsonl").read_text().splitlines() == episodes  # one group per step, no repeats


def test_resume_without_a_checkpoint_says_so(tiny_dir, tmp_path):
    with pytest.raises(data.DataError, match="checkpoint not found"):
        run(tiny_dir, tmp_path / "none", 1, train_file=toy_instances(tmp_path / "t.jsonl"), resume=True)


def test_stochastic_rounding_is_unbiased_and_moves_bf16_weights():
    torch.manual_seed(0)
    x = torch.full((200_000,), 0.02) + 1e-6  # 1e-6 is 1/120 of the bf16 spacing near 0.02
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x)
    assert set(out.float().unique().tolist()) <= {0.02001953125, 0.0198974609375}  # the two neighbours
    # unbiased: the mean lands on x (round-to-nearest would give 0.0200195, 1.9e-5 off)
    assert out.double().mean().item() == pytest.approx(x.double().mean().item(), abs=5e-7)


def test_bf16_weights_with_stochastic_rounding_move_at_lr_1e_6():
    # each weight moves one bf16 spacing with probability ~ 1e-6 / spacing: a few percent of a small model's weights
    moved = one_step(tiny_model(100).to(torch.bfloat16), optimizer=BF16AdamW)
    assert 1e-3 < moved < 0.5


def test_bf16_adamw_steps_under_accelerate_which_passes_a_closure():
    # accelerator.prepare wraps the optimizer; AcceleratedOptimizer.step calls optimizer.step(closure), as torch allows
    from accelerate import Accelerator

    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    model, opt = Accelerator(cpu=True).prepare(model, BF16AdamW(model.parameters(), lr=0.1))
    model(torch.ones(1, 4, dtype=torch.bfloat16)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()  # closure=None: the Accelerate way
    assert not torch.equal(model.weight, before)
    assert opt.optimizer.step(lambda: torch.tensor(1.5)) == 1.5  # a closure's loss comes back, as torch's optimizers


@pytest.fixture
def bf16_accelerator():
    """An Accelerator with bf16 autocast, as grpo.setup makes on CUDA (CPU autocast has the same weight cache).
    Accelerate's state is one per process: reset it around, so the other tests' fp32 Accelerators still build."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_update_runs_the_policy_without_autocasts_weight_cache_when_checkpointing(bf16_accelerator, checkpointing):
    # prepare wraps model.forward in an autocast built with the cache on; inside update's cache_enabled=False that
    # wrapper would cache the bf16 casts of every fp32 weight again, to the end of the update (15 GB at 7B)
    model = tiny_model(100).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model, opt, policy = grpo.prepare(bf16_accelerator, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    seen = []  # (autocast on, its cache on) inside each decoder layer's forward, as the policy's passes run it
    for layer in policy.model.layers:
        layer.register_forward_pre_hook(lambda *_: seen.append((torch.is_autocast_enabled("cpu"),
                                                                torch.is_autocast_cache_enabled())))
    ro = hand_rollout(100, G=2)
    cfg = grpo.Config(gradient_checkpointing=checkpointing, beta=0.0)
    grpo.update(bf16_accelerator, model, opt, ro, torch.tensor([1.0, -1.0, 0.5, -0.5]), None, None, cfg)
    assert seen and {on for on, _ in seen} == {True}  # the passes ran under autocast
    assert {cache for _, cache in seen} == {not checkpointing}  # the prompt's pass (prompt_once.prompt_forward) too


def test_setwise_method_trains_with_the_same_loop(tiny_dir, tmp_path, monkeypatch):
    from data import Query, Ranking

    cands = [Candidate(f"d{i}", f"passage number {i}") for i in range(12)]
    ds = data.Dataset("toy", [Ranking(Query("q", "which passage"), cands)], {"q": {"d3": 2}})
    insts, _ = data.augment_setwise(ds, samples=4, size=4, seed=0)
    path = tmp_path / "sw.jsonl"
    data.write_instances(path, insts)
    task, prompts, scored = grpo.TASKS["setwise"], [], []

    def prompt(inst):
        prompts.append(task.prompt(inst))
        return prompts[-1]

    def reward(text, inst):
        scored.append(task.reward(text, inst))
        return scored[-1]

    monkeypatch.setitem(grpo.TASKS, "setwise", task._replace(prompt=prompt, reward=reward))
    last = run(tiny_dir, tmp_path / "sw", 1, train_file=path, method="setwise")
    assert last["step"] == 1 and math.isfinite(last["loss"])
    assert len(prompts) == 2 and "which of the following documents is most relevant?" in prompts[0][1]["content"]
    assert len(scored) == 2 * 3  # B prompts x G completions, each scored by Rank-R1's reward
    with pytest.raises(SystemExit):
        grpo.parse_args(["--method", "pointwise"])


def test_bf16_adamw_second_moment_tracks_a_constant_gradient_over_thousands_of_steps():
    # beta2 = 0.999: v's decay of 0.1 % a step is below half a bf16 spacing; rounded to nearest it stalls and v / c2
    # falls to ~0.25 g^2 after 3,000 steps (updates ~2x too large); rounded stochastically it stays near g^2
    torch.manual_seed(0)
    g = torch.linspace(0.5, 2.0, 4096)
    w = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    opt = BF16AdamW([w], lr=1e-6)
    for _ in range(3000):
        w.grad = g.to(torch.bfloat16)
        opt.step()
    state = opt.state[w]
    v_hat = state["v"].float() / (1 - 0.999 ** state["step"])
    ratio = v_hat / g.to(torch.bfloat16).float() ** 2
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.02)  # unbiased on average
    assert (ratio - 1).abs().max().item() < 0.25  # and no element far off


def test_weight_sample_is_small_and_on_the_cpu_and_sees_a_move():
    model = tiny_model(100)
    params = list(model.parameters())
    before = weight_sample(params, per_tensor=64)
    assert all(t.device.type == "cpu" and t.numel() <= 64 for t in before)
    assert all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for t, p in zip(before, params))
    assert moved_fraction(before, weight_sample(params, per_tensor=64)) == 0.0
    with torch.no_grad():
        params[0].add_(1.0)
    assert 0 < moved_fraction(before, weight_sample(params, per_tensor=64)) < 1


def test_configured_task_binds_the_prompt_style_and_the_reward_variant(tmp_path):
    inst = toy_batch(1)[0]
    task = grpo.configured_task(grpo.Config(prompt="rankgpt", rank_reward="ndcg", list_format=True))
    assert task.prompt(inst)[0]["content"].startswith("You are RankGPT")
    r = task.reward("[2] > [1] > [3] and so on", inst)  # the toy window holds 3 passages: each named once
    assert r.format2 == 1.0 and r.rank == pytest.approx(r.ndcg)  # raw nDCG as the rank term; a RankGPT list counts
    plain = grpo.configured_task(grpo.Config()).reward("[2] > [1] > [3] and so on", inst)
    assert plain.format2 == 0.0 and plain.rank != pytest.approx(plain.ndcg)  # REARANK's reward: no <answer> block
    with pytest.raises(SystemExit):
        grpo.parse_args(["--method", "setwise", "--prompt", "rankgpt"])
    path = tmp_path / "val.qids"
    path.write_text("q1\n\nq7\n")
    assert grpo.read_qids(str(path)) == {"q1", "q7"} == grpo.read_qids("q1,q7")
