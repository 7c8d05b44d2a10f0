"""Every setting the memory plan can choose runs end to end: trains through grpo.train (and so accelerator.prepare) as
a user's run does, saves, resumes and exports a model eval.py loads (CPU, a tiny random model).

The settings (memory.py, optimizer.make_optimizer): the optimizer (torch AdamW with fp32 master weights on CPU,
bitsandbytes' 8-bit AdamW with fp32 master weights on CUDA, BF16AdamW with bf16 weights), gradient checkpointing on or
off, the reference resident or offloaded, the G completions of a group in one micro-batch or several. All 24
combinations would take minutes; the rows below are pairwise (every two values of any two settings meet in some row:
6 rows would do) and hold the plans memory.py prints for the shipped configs themselves (8 rows; the second test
holds that).

bitsandbytes 0.50 runs AdamW8bit on the CPU (its CPU kernels), so the 8-bit rows train with the real optimizer: on a
machine without CUDA make_optimizer picks torch AdamW, and these rows ask it for the one a CUDA run gets (`cuda=True`).
What CPU cannot show: bf16 autocast (CUDA only in grpo.py; tests/test_grpo.py runs update under CPU bf16 autocast).
"""

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from support import checkpoint
import eval as eval_cli
import grpo
from support import memory
from support import optimizer
from support.backend import load_model, rotary_buffers, smollm2_dir
from reward import Reward
from test_grpo import tiny_model, tokenizer, toy_instances  # noqa: F401

G = 2  # completions per prompt: micro-batch 0 is one micro-batch of 2, micro-batch 1 is two

# (optimizer, gradient checkpointing, reference, micro-batch): pairwise over 3 x 2 x 2 x 2, holding the plans of the
# shipped configs (SHIPPED below)
ROWS = [
    ("AdamW", False, "resident", 0),  # the embedded model on a CPU with 32 GB
    ("AdamW", False, "resident", 1),  # ... with 16 GB (micro-batch 4 of G = 8)
    ("AdamW", True, "resident", 0),  # ... with 8 GB
    ("AdamW", True, "offload", 1),
    ("AdamW8bit", False, "offload", 1),  # Qwen2.5-7B on 141 GB (micro-batch 2 of G = 8)
    ("AdamW8bit", True, "resident", 0),
    ("BF16AdamW", True, "offload", 0),  # Qwen2.5-7B on 80 GB: the headline run
    ("BF16AdamW", False, "resident", 1),
]
HEADLINE = ("BF16AdamW", True, "offload", 0)


def combination(optimizer_name: str, checkpointing: bool, reference: str, micro_batch: int, group_size: int):
    """What a row or a plan runs, in the terms both share."""
    several = 0 < micro_batch < group_size
    return optimizer_name, checkpointing, reference, "several micro-batches" if several else "one micro-batch"


def optimizer_steps(folder) -> set[int]:
    """Each parameter's step count in a checkpoint's optimizer state (a tensor in torch's AdamW, a number in the
    others')."""
    state = checkpoint.read_state(folder / "state.json")
    opt = checkpoint.optimizer_from_data(checkpoint.read_tensors(folder / "optimizer.safetensors"), state["optimizer"])
    return {int(entry["step"]) for entry in opt["state"].values()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """test_grpo's tiny Llama with an MLP of 32 x 128 = 4,096 weights a matrix: bitsandbytes keeps 8-bit state for
    tensors from 4,096 entries on, so 8-bit AdamW has several 8-bit parameters, which share its qmap tables."""
    path = tmp_path_factory.mktemp("tiny-llama-128")
    tiny_model(len(tokenizer), intermediate_size=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_eval_set(tmp_path_factory):
    """One query with three passages in RankGPT format, and its qrels: enough for eval.py to rerank one window."""
    folder = tmp_path_factory.mktemp("tiny-eval")
    hits = [{"qid": "q1", "docid": f"d{i}", "content": text, "rank": i + 1, "score": 3.0 - i}
            for i, text in enumerate(["cats sleep", "fleas live on cats", "dogs bark"])]
    (folder / "candidates.json").write_text(json.dumps([{"query": "flea life", "hits": hits}]))
    (folder / "qrels").write_text("q1 0 d1 2\nq1 0 d0 0\n")
    return folder


@pytest.mark.parametrize("optimizer_name, checkpointing, reference, micro_batch", ROWS,
                         ids=["-".join(map(str, row)) for row in ROWS])
def test_every_setting_the_plan_can_choose_trains_saves_resumes_and_exports(
        optimizer_name, checkpointing, reference, micro_batch, tiny_dir, tiny_eval_set, tmp_path, monkeypatch):
    built = {}

    def make_optimizer(model, cfg):  # the optimizer this row names, and a look at what train built
        built["policy"] = model
        built["optimizer"] = optimizer.make_optimizer(model, cfg, cuda=optimizer_name == "AdamW8bit")
        return built["optimizer"]

    make_reference = grpo.make_reference  # the real one, before the patch below
    monkeypatch.setattr(grpo, "make_optimizer", make_optimizer)
    monkeypatch.setattr(grpo, "make_reference", lambda *a: built.setdefault("reference", make_reference(*a)))
    # rewards that differ within each group (4 random tokens never hold an answer: all 0, no gradient at all)
    task = grpo.TASKS["listwise"]
    monkeypatch.setitem(grpo.TASKS, "listwise", task._replace(
        reward=lambda text, inst: Reward(0.0, 0.0, 0.0, float(len(text) % 7), 0.0)))
    out = tmp_path / "run"
    cfg = grpo.Config(model=str(tiny_dir), train_file=str(toy_instances(tmp_path / "train.jsonl")), steps=2,
                      batch_size=1, group_size=G, max_new_tokens=4, lr=1e-3, eval_every=0, save_every=0,
                      dump_every=0, out=str(out), bf16_weights=optimizer_name == "BF16AdamW",
                      gradient_checkpointing=checkpointing, micro_batch=micro_batch, logits_chunk=2,
                      reference=reference)
    given = set(memory.PLANNED)  # as a user who typed each of these flags: the plan keeps them

    # --- 2 steps and a save
    metrics = grpo.train(replace(cfg), given)
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert type(built["optimizer"]).__name__ == optimizer_name
    policy, dtype = built["policy"], torch.bfloat16 if cfg.bf16_weights else torch.float32
    assert {p.dtype for p in policy.parameters()} == {dtype}
    assert {b.dtype for b in rotary_buffers(policy).values()} == {torch.float32}  # RoPE's frequencies stay fp32
    assert policy.is_activation_checkpointing == checkpointing
    assert built["reference"].placement == reference
    assert optimizer_steps(out / "checkpoint") == {2}
    if optimizer_name == "AdamW8bit":  # the state that once failed to save: nested, with shared quantisation tables
        quant = [e["__bnb_optimizer_quant_state__"] for e in built["optimizer"].state_dict()["state"].values()]
        tables = [q["qmap1"] for q in quant if "qmap1" in q]
        assert len(tables) > 1 and all(t is tables[0] for t in tables)

    # --- --resume to step 3: the optimizer continues from its saved state (a fresh one would count 1)
    built.clear()
    metrics = grpo.train(replace(cfg, steps=3, resume=True), given)
    assert metrics["step"] == 3 and metrics["grad_norm"] > 0 and metrics["kl"] > 0  # the policy left the reference
    assert optimizer_steps(out / "checkpoint") == {3}
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    trained = load_file(out / "checkpoint" / "model.safetensors")
    initial = load_file(tiny_dir / "model.safetensors")
    changed = sum(int((trained[k] != initial[k].to(dtype)).sum()) for k in initial)
    assert changed > 0.5 * sum(t.numel() for t in initial.values())  # 3 steps at lr 1e-3 moved the weights

    # --- the exported model/: what eval.py loads, with the trained weights; eval.py reranking with it (one row: the
    # export does not depend on the settings but for the weights' dtype, which the headline row has in bf16)
    model, _ = load_model(str(out / "model"))
    exported = model.state_dict()
    assert all(torch.equal(exported[k], v.to(exported[k].dtype)) for k, v in trained.items())
    if (optimizer_name, checkpointing, reference, micro_batch) != HEADLINE:
        return
    eval_cli.main(["--candidates", str(tiny_eval_set / "candidates.json"), "--qrels", str(tiny_eval_set / "qrels"),
                   "--model", str(out / "model"), "--top-k", "3", "--window", "3", "--step", "1",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["windows"] == 1 and 0 <= scored["mean"]["nDCG@10"] <= 1 and (tmp_path / "eval" / "run.trec").is_file()


# memory.py's command lines for the shipped configs: the published 7B on 80 and 141 GB, and the embedded model on CPU,
# whose plan depends on the RAM (8, 16 and 32 GB machines; from 20 GB on it no longer changes)
SHIPPED = [
    ["--config", "qwen2.5-7b", "--gpu-gb", "80", "--beta", "0.001"],
    ["--config", "qwen2.5-7b", "--gpu-gb", "141", "--beta", "0.001"],
    *[["--config", "smollm2", "--cpu", "--gpu-gb", gb, "--beta", "0.001"] for gb in ("8", "16", "32")],
]


@pytest.mark.parametrize("argv", SHIPPED, ids=["7b-80gb", "7b-141gb", "smollm2-cpu-8gb", "smollm2-cpu-16gb",
                                               "smollm2-cpu-32gb"])
def test_every_plan_memory_py_prints_for_the_shipped_configs_is_a_combination_the_matrix_runs(argv, monkeypatch,
                                                                                           capsys):
    plans = []
    choose = memory.choose
    monkeypatch.setattr(memory, "choose", lambda *a, **k: plans.append(choose(*a, **k)) or plans[-1])
    argv = [str(smollm2_dir()) if a == "smollm2" else a for a in argv]  # memory.py reads a model directory's config
    memory.main(argv)
    plan, _ = plans[0]  # the plan it printed (what_would_fit would choose more, only when nothing fits)
    s, work = plan.settings, plan.work
    assert plan.fits and f"plan: {s.describe(work.group_size)}" in capsys.readouterr().out
    # the optimizer grpo.py would build for it, named by make_optimizer itself
    opt = optimizer.make_optimizer(torch.nn.Linear(2, 2), SimpleNamespace(bf16_weights=s.bf16_weights, lr=1e-6,
                                                                          weight_decay=0.0, seed=0), cuda=work.cuda)
    runs = {combination(*row, G) for row in ROWS}
    assert combination(type(opt).__name__, s.checkpointing, s.reference, s.micro_batch, work.group_size) in runs
