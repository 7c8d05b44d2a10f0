"""The GRPO loop learns: on a tiny random model, a reward the policy can reach rises far beyond its noise.

Every other test checks a piece (the loss, the advantages, the log-probs, resume); this one checks that the pieces
are wired so that the loop climbs the reward it is given. A wrong advantage sign, log-probs shifted by one token, or
rewards paired with the wrong samples each make it fail (checked by breaking each once, by hand).
"""

import json
import statistics

import pytest
import torch

import grpo
from reward import Reward
from test_grpo import tiny_model, tokenizer, toy_instances  # noqa: F401 (tokenizer is a fixture)

STEPS, B, G, C = 36, 2, 16, 4


def lone_newlines(text: str, inst) -> Reward:
    """The toy reward: 0.5 a newline, up to two, in a 4-token completion, and 0 if two newlines touch.

    Touching newlines score 0 so that "repeat the token you just wrote" cannot climb it: that is what log-probs
    shifted by one token teach (each token's log-prob read where the model predicts the token after it), and a reward
    plain newline counts would reward anyway.
    """
    score = 0.0 if "\n\n" in text else min(text.count("\n"), 2) / 2
    return Reward(score, 0.0, 0.0, score, 0.0)


@pytest.fixture()
def peaked_dir(tmp_path, tokenizer):
    # with the default 0.02 init the tiny model's next token is near-uniform over 49k ids: nothing is reachable in a
    # few hundred samples. Embeddings 0.35 wide give a peaked policy that samples a newline now and then (~10%)
    model = tiny_model(len(tokenizer))
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.35)
    model.save_pretrained(tmp_path / "peaked")
    tokenizer.save_pretrained(tmp_path / "peaked")
    return tmp_path / "peaked"


def test_the_loop_raises_a_reachable_reward_far_beyond_its_noise(peaked_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(grpo.TASKS, "listwise", grpo.TASKS["listwise"]._replace(reward=lone_newlines))
    cfg = grpo.Config(model=str(peaked_dir), train_file=str(toy_instances(tmp_path / "train.jsonl")), steps=STEPS,
                      batch_size=B, group_size=G, max_new_tokens=C, lr=1e-2, eval_every=0, save_every=0,
                      dump_every=0, out=str(tmp_path / "run"), seed=0)
    grpo.train(cfg)
    assert_reward_rose(tmp_path / "run")


def assert_reward_rose(out) -> None:
    """The run's mean reward over its last 5 steps is far above its first 5, by 10x the noise of such a mean."""
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in steps]
    first, last = statistics.fmean(rewards[:5]), statistics.fmean(rewards[-5:])
    # the noise of a 5-step mean of B*G samples each, from the per-sample spread at the start
    noise = statistics.fmean(m["reward_std"] for m in steps[:5]) / (5 * B * G) ** 0.5
    assert first < 0.2 and last > 0.35 and last - first > 10 * noise, rewards
