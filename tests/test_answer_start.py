"""--answer-start: the reply opened with a text the model continues, in the rollout, the held-out windows and eval.py
alike; the opening is part of the prompt's tokens and of the answer that is parsed and rewarded."""

from __future__ import annotations

import json

import pytest
import torch

import eval as ev
import grpo
from data import load_dataset
from support.backend import generate_tokens
from support.grpo_checks import config_problem
from tests.test_grpo import tiny_dir, tiny_model, tokenizer, toy_batch, toy_instances  # noqa: F401 (fixtures)


def test_the_prompt_ends_inside_the_opened_reply_and_every_text_starts_with_it(tokenizer):
    model = tiny_model(len(tokenizer))
    task = grpo.configured_task(grpo.Config(prompt="rankgpt", answer_start="[", list_format=True))
    plain = grpo.configured_task(grpo.Config(prompt="rankgpt", list_format=True))
    batch = toy_batch()
    torch.manual_seed(0)
    opened = grpo.rollout(model, tokenizer, task, batch, 3, max_new_tokens=5)
    torch.manual_seed(0)
    closed = grpo.rollout(model, tokenizer, plain, batch, 3, max_new_tokens=5)
    for prompt, other in zip(opened.prompts, closed.prompts):
        # the same chat, then "[" where the closed one ends its generation prompt
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n[")
        assert tokenizer.decode(other).endswith("<|im_start|>assistant\n")
    owners = [inst for inst in batch for _ in range(3)]
    assert len(opened.texts) == len(opened.rewards) == len(owners)
    for text, ids, mask, reward, inst in zip(opened.texts, opened.completion_ids, opened.completion_mask,
                                             opened.rewards, owners):
        assert text == "[" + tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        assert reward == task.reward(text, inst)  # scored on the answer as read, opening included


def test_an_opened_answer_names_its_first_passage_for_the_parser_and_the_reward():
    task = grpo.configured_task(grpo.Config(prompt="rankgpt", answer_start="[", list_format=True))
    inst = toy_batch(1)[0]  # d0, d1, d2 in this order; only d1 is relevant
    # what the 135M model writes after "[": one passage's number and its text, no list; the parser puts that
    # passage first and keeps the others' order, so naming the relevant one is rewarded and naming the first is not
    assert task.reward("[2] flea flea flea", inst).rank > 0
    assert task.reward("[1] flea", inst).rank == 0
    assert task.reward("[2] > [1] > [3]", inst).format2 and not task.reward("[2] flea", inst).format2


def test_generate_tokens_opens_each_prompt_on_its_own(tokenizer):
    model = tiny_model(len(tokenizer))
    chat = [{"role": "user", "content": "rank"}]
    gen = generate_tokens(model, tokenizer, [chat + [{"role": "assistant", "content": "[2"}], chat],
                          max_new_tokens=3)
    assert gen.texts[0].startswith("[2") and not gen.texts[1].startswith("[2")


def test_setwise_refuses_an_answer_start():
    assert "--answer-start" in config_problem(grpo.Config(method="setwise", answer_start="["))
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--dataset", "dl19", "--method", "setwise", "--answer-start", "["])
    assert e.value.code == 2


def test_grpo_command_trains_and_evaluates_with_an_opened_answer(tiny_dir, tmp_path, data_root):
    train_file = toy_instances(tmp_path / "t.jsonl")
    out = tmp_path / "run"
    grpo.main(["--model", str(tiny_dir), "--train-file", str(train_file), "--prompt", "rankgpt", "--answer-start",
               "[", "--steps", "1", "--batch-size", "1", "--group-size", "2", "--max-new-tokens", "4",
               "--eval-dataset", "dl21", "--eval-queries", "1", "--eval-size", "3", "--eval-every", "1",
               "--dump-every", "1", "--data-dir", str(data_root), "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["answer_start"] == "["
    # the exported model's card says how to evaluate it as it was trained
    assert "--model <this folder> --prompt rankgpt --answer-start '['`" in (out / "model" / "README.md").read_text()
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 2 and all(e["completion"].startswith("[") for e in episodes)
    assert [e["step"] for e in map(json.loads, (out / "eval.jsonl").read_text().splitlines())] == [0, 1]


def test_eval_command_opens_every_window_and_names_the_setting(tiny_dir, tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--dataset", "dl19", "--model", str(tiny_dir), "--limit", "1", "--top-k", "4", "--window", "4",
             "--step", "2", "--max-new-tokens", "4", "--data-dir", str(data_root)]
    ev.main([*flags, "--answer-start", "["])
    (out,) = (tmp_path / "runs").iterdir()
    assert out.name.endswith("-start1e5c2f"), out.name  # "[" has no letters: its digest names it
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 1 and traces[0]["completion"].startswith("[")
    shown = load_dataset("dl19", data_root).rankings[0].candidates[:4]
    assert sorted(traces[0]["order"]) == list(range(len(shown)))
    with pytest.raises(SystemExit) as e:  # another opening is another run: not mixed into this one
        ev.main([*flags, "--answer-start", "<answer>", "--out", str(out)])
    assert "answer_start" in str(e.value) or "answer-start" in str(e.value)
