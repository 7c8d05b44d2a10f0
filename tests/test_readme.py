"""Every command README.md and docs/*.md show runs here: as written where it is quick, else at a small size.

`readme_commands` reads the commands out of a page (its code blocks, indented blocks and inline `python ...` spans);
`documented_commands` reads README.md, then each docs/*.md in name order; `CASES` holds, for each command, what runs
instead: the command itself plus small-size flags appended (argparse takes the last value of a flag), or another
command, with the reason. A command added to the README or docs/ without a line here fails
`test_every_readme_command_has_a_case`. Commands that need a GPU or the Hub run offline and must fail with the
one-line error a user would read; the two-process ones name the tests/test_dist.py test that runs them.

The cases run in page order (README.md, then docs/) in one working folder (the pages' relative paths: runs/grpo,
runs/exp, ...), each in this process (the module's main() under a patched sys.argv; bench/trl.py starts its own
processes), `--model smollm2` standing for a tiny random model of its vocabulary (tiny_embedded_model).
"""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands(text: str) -> list[str]:
    """The commands of a README: each `python`/`torchrun`/`accelerate launch` line of a code block (fenced or indented
    by four spaces, `\\` continuations joined, comments, `VAR=value` prefixes and `... &&` chains dropped) and each
    inline `python ...` span, once each, in order, with single spaces.

    >>> readme_commands("```bash\\npip install x && A=1 python eval.py --k 1  # note\\n```\\n`python grpo.py\\n--plot`")
    ['python eval.py --k 1', 'python grpo.py --plot']
    """
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S) + re.findall(r"(?m)^(?: {4}.*\n?)+", text)
    found = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s#.*$", "", line.strip().removeprefix("$ "))
            for part in line.split("&&"):
                part = re.sub(r"^(\w+=\S+\s+)+", "", part.strip())
                if re.match(r"(python|torchrun|accelerate launch)\s", part):
                    found.append(part)
    found += re.findall(r"`(python\s[^`]+)`", text)
    out = []
    for cmd in (" ".join(c.split()) for c in found):
        if cmd not in out:
            out.append(cmd)
    return out


@dataclass(frozen=True)
class Case:
    run: str | None  # the command run instead; None: nothing to run (the reason says why)
    why: str = ""  # why `run` is not the README command as written
    fails: str = ""  # run offline, it must fail with this one-line error (no GPU, no Hub)
    needs: tuple[str, ...] = ()  # run first (once): README commands (their cases) or `mkdir -p DIR`


EVAL = "--limit 1 --top-k 4 --max-new-tokens 4"  # one query, one window of 4 passages, 4 tokens
GRPO = "--size 2 --group-size 2 --batch-size 1 --max-new-tokens 4 --steps 1 --eval-every 0"
SMALL = "small: " + "one query, 4 passages, 4 tokens"
TINY_RUN = "one step of 1 prompt x 2 completions of 4 tokens over 2 passages"
OFFLINE = "a 7B model needs a GPU and the Hub; offline it fails at once with what to do instead"

TRAIN = "python grpo.py --model smollm2 --dataset dl21 --size 5 --max-new-tokens 48 --steps 8"
EXP_C = ("python grpo.py --model smollm2 --prompt rankgpt --list-format --rank-reward difference --train-file "
         "runs/exp/dl21-s10-train.jsonl --steps 25 --batch-size 2 --group-size 8 --max-new-tokens 32 --temperature 1.0 "
         "--lr 3e-5 --eval-dataset dl21 --eval-qids runs/exp/dl21-val.qids --eval-size 10 --eval-every 25 "
         "--save-every 5 --dump-every 5 --seed 0 --beta 0 --out runs/exp/C")
BASE_DL19 = ("python eval.py --dataset dl19 --model smollm2 --top-k 10 --window 10 --step 10 --prompt rankgpt "
             "--max-new-tokens 32 --batch-size 8 --out runs/base-dl19")
C_DL19 = BASE_DL19.replace("smollm2", "runs/exp/C/model").replace("runs/base-dl19", "runs/C-dl19") + " " + EVAL
VAL_QIDS = ("python -c \"import random; from data import load_dataset; ds = load_dataset('dl21'); "
            "q = sorted(r.query.qid for r in ds.rankings if ds.qrels.get(r.query.qid)); "
            "open('runs/exp/dl21-val.qids', 'w').write('\\n'.join(sorted(random.Random(0).sample(q, 13))) + '\\n')\"")
TRAIN_SPLIT = ("python -c \"import json; val = set(open('runs/exp/dl21-val.qids').read().split()); open('runs/exp/"
               "dl21-s10-train.jsonl', 'w').writelines(l for l in open('runs/exp/dl21-s10-all.jsonl') if json.loads(l)"
               "['qid'] not in val)\"")
COST_RUN = "python grpo.py --model smollm2 --dataset dl21 --size 5 --max-new-tokens 32 --steps 2 --eval-every 0 --out X"
REPORT_A, REPORT_B = (f"python eval.py --dataset dl19 --model smollm2 {EVAL} --out runs/{x}" for x in "AB")
DEMO = "python eval.py --dataset dl19 --model smollm2 --limit 3 --top-k 20 --max-new-tokens 64 --out runs/report-demo"
DIST = "tests/test_dist.py::"
LORA_RUN = ("python grpo.py --model smollm2 --dataset dl21 --size 5 --max-new-tokens 32 --steps 2 --eval-every 0 "
            "--lora-rank 8 --out X")
TINY = "tiny-smollm2"  # see tiny_embedded_model
EXP2_VAL = VAL_QIDS.replace("runs/exp/dl21-val.qids", "docs/dl21-val.qids")
EXP2_ALL = "python -m support.augment --dataset dl21 --samples 50 --size 5 --seed 0 --out runs/exp2/dl21-s5-all.jsonl"
EXP2_SPLIT = TRAIN_SPLIT.replace("runs/exp/dl21-val.qids", "docs/dl21-val.qids").replace(
    "runs/exp/dl21-s10-", "runs/exp2/dl21-s5-")
EXP2_TRAIN = ("python grpo.py --model smollm2 --prompt rankgpt --list-format --rank-reward difference --train-file "
              "runs/exp2/dl21-s5-train.jsonl --steps 200 --batch-size 2 --group-size 16 --max-new-tokens 24 "
              "--temperature 1.0 --lr 3e-5 --eval-dataset dl21 --eval-qids docs/dl21-val.qids --eval-size 5 "
              "--eval-order shuffled --eval-every 25 --save-every 5 --dump-every 10 --seed 0 --out runs/exp2/lr3e-5 "
              "--steps 1 --batch-size 1 --group-size 2 --max-new-tokens 4 --eval-size 4 --eval-queries 1")
EXP2_EVAL = ("python eval.py --dataset $data --model $MODEL --prompt rankgpt --top-k 20 --window 5 --step 3 "
             "--max-new-tokens 24 --first-stage-order $order --seed 0 --batch-size 8 --out runs/exp2/eval/$NAME-$data-$order")


EXP3_EVAL = EXP2_EVAL.replace("--prompt rankgpt", '--prompt rankgpt --answer-start "["').replace(
    "--max-new-tokens 24", "--max-new-tokens 8").replace("runs/exp2/eval", "runs/exp3/eval")
EXP3_COMPARE = ("python eval.py --compare runs/exp3/eval/base-$data-$order runs/exp3/eval/trained-$data-$order "
                "--dataset $data")


def exp2_eval(name: str, model: str, command: str = EXP2_EVAL) -> str:
    """An experiment's held-out command for one model, on DL19's shuffled lists, small."""
    return (command.replace("$data", "dl19").replace("$order", "shuffled").replace("$MODEL", model)
            .replace("$NAME", name) + " " + EVAL)


BENCH_REFERENCE = ("python -m bench.reference --size 5 --batch-size 4 --group-size 8 --max-new-tokens 32 --threads 1 "
                   "--repeats 2")

CASES: dict[str, Case] = {
    "python eval.py --dataset dl19": Case(f"python eval.py --dataset dl19 {EVAL}", SMALL),
    "python grpo.py --model Qwen/Qwen2.5-7B-Instruct": Case(
        "python grpo.py --model Qwen/Qwen2.5-7B-Instruct", OFFLINE,
        fails="cannot load model 'Qwen/Qwen2.5-7B-Instruct': it is not a local directory"),
    "python eval.py --dataset dl19 --limit 2 --top-k 20 --max-new-tokens 256": Case(
        f"python eval.py --dataset dl19 --limit 2 --top-k 20 --max-new-tokens 256 {EVAL}", SMALL),
    "python -m pytest -q": Case(None, "the suite itself: this file runs inside it"),
    "python eval.py --candidates my_top100.json --qrels my.qrels --model smollm2": Case(
        f"python eval.py --candidates my_top100.json --qrels my.qrels --model smollm2 {EVAL}",
        SMALL + "; my_top100.json, my.qrels: DL19's first 2 queries (my_files)"),
    "python eval.py --run my.trec --qrels my.qrels": Case(
        "python eval.py --run my.trec --qrels my.qrels", "my.trec: BM25's DL19 run (my_files)"),
    "python eval.py --compare runs/base-dl19 runs/A-dl19 --dataset dl19": Case(
        "python eval.py --compare runs/base-dl19 runs/A-dl19 --dataset dl19", "runs/A-dl19: the base run's settings",
        needs=(BASE_DL19, BASE_DL19.replace("base-dl19", "A-dl19"))),
    "python eval.py --dataset dl19 --model smollm2 --top-k 20": Case(
        f"python eval.py --dataset dl19 --model smollm2 --top-k 20 {EVAL}", SMALL),
    "python eval.py --dataset dl19 --model le723z/Rearank-7B": Case(
        "python eval.py --dataset dl19 --model le723z/Rearank-7B", OFFLINE,
        fails="cannot load model 'le723z/Rearank-7B': it is not a local directory"),
    "python eval.py --dataset dl19 --model smollm2 --prompt rankgpt": Case(
        f"python eval.py --dataset dl19 --model smollm2 --prompt rankgpt {EVAL}", SMALL),
    "python eval.py --dataset dl19 --model smollm2 --method setwise --limit 1 --top-k 20": Case(
        f"python eval.py --dataset dl19 --model smollm2 --method setwise --limit 1 --top-k 20 {EVAL}", SMALL),
    "python eval.py --dataset dl19 --model smollm2 --limit 1 --top-k 20": Case(
        f"python eval.py --dataset dl19 --model smollm2 --limit 1 --top-k 20 {EVAL}", SMALL),
    DEMO: Case(f"{DEMO} {EVAL}", SMALL),
    "python eval.py --report runs/report-demo": Case("python eval.py --report runs/report-demo", needs=(DEMO,)),
    "python eval.py --report runs/A --against runs/B": Case(
        "python eval.py --report runs/A --against runs/B", "runs/A, runs/B: two small runs",
        needs=(REPORT_A, REPORT_B)),
    "python -m support.augment --dataset dl21 --samples 50 --size 20 --out train.jsonl": Case(
        "python -m support.augment --dataset dl21 --samples 50 --size 20 --out train.jsonl --samples 1", "one sample a query"),
    "python -m support.augment --dataset dl21 --method setwise --samples 50 --out setwise.jsonl": Case(
        "python -m support.augment --dataset dl21 --method setwise --samples 50 --out setwise.jsonl --samples 1",
        "one sample a query"),
    TRAIN: Case(f"{TRAIN} {GRPO}", TINY_RUN),
    "python grpo.py --method setwise --model smollm2 --dataset dl21": Case(
        f"python grpo.py --method setwise --model smollm2 --dataset dl21 {GRPO} --out runs/grpo-setwise",
        TINY_RUN + "; --out: runs/grpo holds the listwise run above (docs/training.md shows them as alternatives)"),
    "python grpo.py --out runs/grpo --resume": Case(
        f"python grpo.py --out runs/grpo --resume --model smollm2 --dataset dl21 {GRPO} --steps 2",
        "the run's own small settings, one step more", needs=(TRAIN,)),
    "python grpo.py --out runs/grpo --plot": Case("python grpo.py --out runs/grpo --plot", needs=(TRAIN,)),
    "python eval.py --dataset dl19 --model runs/grpo/model": Case(
        f"python eval.py --dataset dl19 --model runs/grpo/model {EVAL}", SMALL,
        needs=("python grpo.py --out runs/grpo --resume",)),
    VAL_QIDS: Case(VAL_QIDS, needs=("mkdir -p runs/exp",)),
    "python -m support.augment --dataset dl21 --samples 50 --size 10 --seed 0 --out runs/exp/dl21-s10-all.jsonl": Case(
        "python -m support.augment --dataset dl21 --samples 50 --size 10 --seed 0 --out runs/exp/dl21-s10-all.jsonl "
        "--samples 1", "one sample a query"),
    TRAIN_SPLIT: Case(TRAIN_SPLIT, needs=(VAL_QIDS, "python -m support.augment --dataset dl21 --samples 50 --size 10 --seed 0 "
                                          "--out runs/exp/dl21-s10-all.jsonl")),
    EXP_C: Case(f"{EXP_C} --steps 1 --batch-size 1 --group-size 2 --max-new-tokens 4 --eval-size 4 --eval-queries 1",
                "one step; held-out evaluation on 1 validation query, before and after it", needs=(TRAIN_SPLIT,)),
    BASE_DL19: Case(f"{BASE_DL19} {EVAL}", SMALL),
    "python eval.py --compare runs/base-dl19 runs/C-dl19 --dataset dl19": Case(
        "python eval.py --compare runs/base-dl19 runs/C-dl19 --dataset dl19", "runs/C-dl19: the small run's C model",
        needs=(BASE_DL19, EXP_C, C_DL19)),
    "python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --micro-batch 2 --threads 1": Case(
        "python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --micro-batch 2 --threads 1 --sides ours "
        f"--size 2 --group-size 2 --max-new-tokens 4 --micro-batch 1 --model {TINY}",
        "our side alone, tiny (TRL is no requirement: test_bench_trl_without_trl checks its message)"),
    "python -m support.memory --config qwen2.5-7b --gpu-gb 80 --beta 0.001": Case(
        "python -m support.memory --config qwen2.5-7b --gpu-gb 80 --beta 0.001"),
    "python -m support.memory --config qwen2.5-7b --gpu-gb 141 --beta 0.001": Case(
        "python -m support.memory --config qwen2.5-7b --gpu-gb 141 --beta 0.001"),
    "torchrun --nproc_per_node 2 eval.py --dataset dl19 --model smollm2 --limit 2 --top-k 20 --max-new-tokens 32 "
    "--out A": Case(f"python eval.py --dataset dl19 --model smollm2 --limit 2 --top-k 20 --max-new-tokens 32 --out A "
                    f"{EVAL}", f"one process, small; two: {DIST}test_two_process_eval_with_the_embedded_model_equals_"
                    "one_process"),
    "accelerate launch --config_file launch/ddp.yaml eval.py --dataset dl19": Case(
        f"python eval.py --dataset dl19 {EVAL}", "8 GPUs; the same eval.py on CPU, small, one process (launchers: "
        f"{DIST}test_two_process_eval_writes_what_one_process_writes)"),
    "torchrun --nproc_per_node 2 grpo.py --model smollm2 --dataset dl21 --size 5 --batch-size 2 --group-size 2 "
    "--max-new-tokens 16 --steps 2 --eval-every 0 --out C": Case(
        f"python grpo.py --model smollm2 --dataset dl21 --size 5 --batch-size 2 --group-size 2 --max-new-tokens 16 "
        f"--steps 2 --eval-every 0 --out C {GRPO}", f"one process, tiny; two: {DIST}test_two_processes_with_one_"
        "prompt_each_take_the_steps_of_one_process_with_both_and_resume"),
    "accelerate launch --config_file launch/ddp.yaml grpo.py --model Qwen/Qwen2.5-1.5B-Instruct --batch-size 8": Case(
        "python grpo.py --model Qwen/Qwen2.5-1.5B-Instruct --batch-size 8 --out runs/grpo-1.5b",
        OFFLINE + " (and several GPUs); --out: runs/grpo holds the run above",
        fails="cannot load model 'Qwen/Qwen2.5-1.5B-Instruct': it is not a local directory"),
    "python eval.py --dataset dl19 --model bm25": Case("python eval.py --dataset dl19 --model bm25"),
    "python eval.py --dataset dl20 --model bm25": Case("python eval.py --dataset dl20 --model bm25"),
    "python eval.py --dataset scifact --model bm25": Case(
        "python eval.py --dataset scifact --model bm25 --limit 2", "2 queries (the index is built all the same)"),
    "python eval.py --dataset dl19 --model smollm2 --limit 5 --top-k 20": Case(
        f"python eval.py --dataset dl19 --model smollm2 --limit 5 --top-k 20 {EVAL}", SMALL),
    "python -m bench.rerank": Case(
        "python -m bench.rerank --windows 1 --window 4 --batch-sizes 1 --max-new-tokens 4", "1 window of 4, 4 tokens"),
    "python -m bench.rerank --padded-prefill --batch-sizes 8,1": Case(
        "python -m bench.rerank --padded-prefill --batch-sizes 8,1 --windows 2 --window 4 --batch-sizes 2,1 "
        "--max-new-tokens 4", "2 windows of 4 at batch 2 and 1, 4 tokens"),
    "python -m bench.rerank --fixed-length --growing-cache": Case(
        "python -m bench.rerank --fixed-length --growing-cache --windows 2 --window 4 --batch-sizes 2 "
        "--max-new-tokens 4", "2 windows of 4 at batch 2, 4 tokens"),
    "python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --micro-batch 2 --threads 1 --sides ours "
    "--growing-cache": Case(
        "python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --micro-batch 2 --threads 1 --sides ours "
        f"--growing-cache --size 2 --group-size 2 --max-new-tokens 4 --micro-batch 1 --model {TINY}", "tiny"),
    "python -m bench.rerank --fixed-length --max-new-tokens 256 --batch-sizes 8 --growing-cache": Case(
        "python -m bench.rerank --fixed-length --max-new-tokens 256 --batch-sizes 8 --growing-cache --windows 2 "
        "--window 4 --batch-sizes 2 --max-new-tokens 4", "2 windows of 4 at batch 2, 4 tokens"),
    "python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --micro-batch 2 --threads 1 --sides ours,trl": Case(
        "python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --micro-batch 2 --threads 1 --sides ours "
        f"--size 2 --group-size 2 --max-new-tokens 4 --micro-batch 1 --model {TINY}",
        "our side alone, tiny (TRL is no requirement: test_bench_trl_without_trl checks its message)"),
    "python -m bench.report": Case("python -m bench.report --top-k 20 --tokens 16", "top 20, 16 tokens a window"),
    "python -m bench.report --method setwise": Case(
        "python -m bench.report --method setwise --top-k 20 --tokens 16", "top 20, 16 tokens a call"),
    "python eval.py --report runs/bench-report-listwise --against runs/bench-report-setwise": Case(
        "python eval.py --report runs/bench-report-listwise --against runs/bench-report-setwise",
        needs=("python -m bench.report", "python -m bench.report --method setwise")),
    COST_RUN: Case(f"{COST_RUN} {GRPO}", TINY_RUN),
    BENCH_REFERENCE: Case(
        f"{BENCH_REFERENCE} --size 2 --batch-size 1 --group-size 2 --max-new-tokens 4 --repeats 1", TINY_RUN),
    "python grpo.py --plot --out runs/exp/C": Case("python grpo.py --plot --out runs/exp/C", needs=(EXP_C,)),
    "python -m bench.prefix --prompt-len 512 --completion-len 64 --group-size 4 --threads 1": Case(
        "python -m bench.prefix --prompt-len 512 --completion-len 64 --group-size 4 --threads 1 --prompt-len 32 "
        "--completion-len 4 --group-size 2 --repeats 1", "a 32-token prompt, 2 x 4 tokens"),
    "python eval.py --suite standard --model le723z/Rearank-7B": Case(
        "python eval.py --suite standard --model le723z/Rearank-7B", OFFLINE,
        fails="cannot load model 'le723z/Rearank-7B': it is not a local directory"),
    "python eval.py --suite bright --model le723z/Rearank-7B": Case(
        "python eval.py --suite bright --model le723z/Rearank-7B", OFFLINE,
        fails="cannot load model 'le723z/Rearank-7B': it is not a local directory"),
    "python eval.py --suite standard --model bm25": Case("python eval.py --suite standard --model bm25"),
    "python -m support.datasets list": Case("python -m support.datasets list"),
    "python -m support.datasets bm25 --dataset scifact": Case("python -m support.datasets bm25 --dataset scifact"),
    "python -m pytest -q tests/test_prefix.py -k float32": Case(None, "a test of the suite: it runs there"),
    "python -m pytest -q tests/test_prefix.py -k reentrant": Case(None, "a test of the suite: it runs there"),
    "python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256": Case(
        f"python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --sides ours --size 2 --group-size 2 "
        f"--max-new-tokens 4 --model {TINY}", "our side alone, tiny, all rows at once (no --micro-batch)"),
    "python -m bench.reference": Case(
        f"python -m bench.reference --size 2 --batch-size 1 --group-size 2 --max-new-tokens 4 --repeats 1", TINY_RUN),
    "python grpo.py --model Qwen/Qwen2.5-7B-Instruct --lora-rank 16 --lr 1e-5": Case(
        "python grpo.py --model Qwen/Qwen2.5-7B-Instruct --lora-rank 16 --lr 1e-5 --out runs/grpo-lora",
        OFFLINE + "; --out: runs/grpo holds the run above", fails="cannot load model 'Qwen/Qwen2.5-7B-Instruct': it is not a local directory"),
    LORA_RUN: Case(f"{LORA_RUN} {GRPO} --out X-lora", TINY_RUN + "; --out: X holds the run of the cost example"),
    "python eval.py --dataset dl19 --model X/model --limit 2 --top-k 20 --max-new-tokens 64": Case(
        f"python eval.py --dataset dl19 --model X-lora/model --limit 2 --top-k 20 --max-new-tokens 64 {EVAL} --out "
        "runs/X-lora-dl19", SMALL + "; the LoRA run's model/ (X-lora above); --out: the default names a model/ folder "
        "by its last part, as runs/grpo/model's", needs=(LORA_RUN,)),
    "python -m support.memory --config qwen2.5-7b --gpu-gb N --lora-rank 16": Case(
        "python -m support.memory --config qwen2.5-7b --gpu-gb 24 --lora-rank 16", "N = 24, the smallest of the table in docs/measurements.md"),
    "python eval.py --dataset dl19 --model bm25 --first-stage-order shuffled --seed 0": Case(
        "python eval.py --dataset dl19 --model bm25 --first-stage-order shuffled --seed 0"),
    "python eval.py --dataset dl19 --model bm25 --first-stage-order reversed": Case(
        "python eval.py --dataset dl19 --model bm25 --first-stage-order reversed"),
    "python -m bench.gpu --prepare": Case("python -m bench.gpu --prepare"),
    "python -m bench.gpu --out gpu.json": Case(
        "python -m bench.gpu --out gpu.json", "a GPU check; without CUDA it stops at once and names its CPU twin",
        fails="the GPU check needs CUDA", needs=("python -m bench.gpu --prepare",)),
    "python -m bench.gpu --tiny --out tiny.json": Case(
        "python -m bench.gpu --tiny --out tiny.json", needs=("python -m bench.gpu --prepare",)),
    "python -m pytest -q -s tests/test_kill.py": Case(None, "a test file of the suite: it runs there"),
    EXP3_EVAL: Case(exp2_eval("base", "smollm2", EXP3_EVAL),
                    "NAME=base MODEL=smollm2, DL19's shuffled lists; " + SMALL),
    EXP3_COMPARE: Case(
        EXP3_COMPARE.replace("$data", "dl19").replace("$order", "shuffled"),
        "DL19's shuffled lists; the trained model: one tiny step of the second experiment's training command",
        needs=(EXP3_EVAL, EXP2_SPLIT, EXP2_TRAIN, exp2_eval("trained", "runs/exp2/lr3e-5/model", EXP3_EVAL))),
    EXP2_VAL: Case(EXP2_VAL, "writes docs/dl21-val.qids under the working folder", needs=("mkdir -p docs",)),
    EXP2_ALL: Case(f"{EXP2_ALL} --samples 1", "one sample a query"),
    EXP2_SPLIT: Case(EXP2_SPLIT, needs=(EXP2_VAL, EXP2_ALL)),
    EXP2_EVAL: Case(exp2_eval("base", "smollm2"), "NAME=base MODEL=smollm2, DL19's shuffled lists; " + SMALL),
    "python eval.py --dataset $data --model bm25 --top-k 20 --first-stage-order $order --seed 0 --out "
    "runs/exp2/eval/bm25-$data-$order": Case(
        "python eval.py --dataset dl19 --model bm25 --top-k 20 --first-stage-order shuffled --seed 0 --out "
        "runs/exp2/eval/bm25-dl19-shuffled", "DL19's shuffled lists"),
    "python eval.py --compare runs/exp2/eval/base-$data-$order runs/exp2/eval/trained-$data-$order --dataset $data": Case(
        "python eval.py --compare runs/exp2/eval/base-dl19-shuffled runs/exp2/eval/trained-dl19-shuffled --dataset dl19",
        "DL19's shuffled lists; the trained model: one tiny step of the experiment's training command",
        needs=(EXP2_EVAL, EXP2_SPLIT, EXP2_TRAIN, exp2_eval("trained", "runs/exp2/lr3e-5/model"))),
    "python grpo.py --out runs/exp2/lr$LR --plot": Case(
        "python grpo.py --out runs/exp2/lr3e-5 --plot", "LR=3e-5; the tiny run of the experiment's training command",
        needs=(EXP2_SPLIT, EXP2_TRAIN)),
    "python -m bench.rerank --fixed-length": Case(
        "python -m bench.rerank --fixed-length --windows 2 --window 4 --batch-sizes 2 --max-new-tokens 4",
        "2 windows of 4 at batch 2, 4 tokens"),
    "python eval.py ... --out B": Case(None, "the torchrun command's one-process twin, elided ('...'); "
                                             f"{DIST}test_two_process_eval_writes_what_one_process_writes runs both"),
}


def documented_pages() -> list[Path]:
    """README.md first, then docs/*.md in name order: the pages whose commands must run."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[str]:
    """The commands of every documented page, once each, in page order."""
    out = []
    for page in documented_pages():
        out += [c for c in readme_commands(page.read_text()) if c not in out]
    return out


def test_every_readme_command_has_a_case():
    commands = documented_commands()
    missing = [c for c in commands if c not in CASES]
    stale = [c for c in CASES if c not in commands]
    assert not missing, f"README/docs commands without a case in tests/test_readme.py: {missing}"
    assert not stale, f"cases for commands no longer in README.md or docs/: {stale}"


def test_the_named_dist_tests_exist():
    text = (ROOT / "tests/test_dist.py").read_text()
    for case in CASES.values():
        for name in re.findall(re.escape(DIST) + r"(\w+)", case.why):
            assert f"def {name}(" in text, name


def test_bench_trl_without_trl(tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("TRL is installed: the trl side runs")
    monkeypatch.chdir(tmp_path)
    code, text = run_in_process("python -m bench.trl --size 2 --group-size 2 --max-new-tokens 4", capsys)
    assert code == 1 and "error: the trl side needs TRL (pip install --no-deps trl" in text
    assert "--sides ours,ours-repeat" in text and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------------
# running them


def run_in_process(command: str, capsys) -> tuple[int, str]:
    """(exit status, what was printed) of a `python script.py ...` or `python -c ...` command, run in this process."""
    argv = shlex.split(command)
    assert argv[0] == "python", command
    code = 0
    try:
        if argv[1] == "-c":
            exec(compile(argv[2], "<readme>", "exec"), {"__name__": "__main__"})
        else:
            name, args = (argv[2], argv[3:]) if argv[1] == "-m" else (Path(argv[1]).stem, argv[2:])
            module = importlib.import_module(name)
            sys.argv = [name, *args]  # the scripts without a main(argv) read sys.argv
            module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    printed = capsys.readouterr()
    return code, printed.out + printed.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_root) -> Path:
    """The folder the README's commands run in, with the inputs they name (my_top100.json, my.qrels, my.trec)."""
    import data
    from support import formats

    work = tmp_path_factory.mktemp("readme")
    dl19 = data.load_dataset("dl19", data_root)
    formats.write_rankgpt(work / "my_top100.json", dl19.rankings[:2])
    (work / "my.qrels").write_text((data_root / "trec_dl/qrels.dl19-passage.txt").read_text())
    formats.write_run(work / "my.trec", dl19.rankings[:2], "bm25")
    return work


@pytest.fixture(scope="module")
def tiny_embedded_model(workdir):
    """`--model smollm2` loads a 2-layer random Llama with SmolLM2's tokenizer (saved in the working folder as
    tiny-smollm2/, which bench/trl.py's own processes get by --model): the commands, flags and files are the README's,
    the weights a few MB, since one AdamW step of the 135M model takes minutes on a busy 2-core machine (the real
    weights run in tests/test_e2e.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from support import backend

    tok = AutoTokenizer.from_pretrained(backend.smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(workdir / TINY)
    tok.save_pretrained(workdir / TINY)
    load = backend.load_model

    def load_tiny(name: str):
        return load(str(workdir / TINY) if name == backend.SMOLLM2 else name)

    modules = [backend] + [importlib.import_module(m) for m in ("grpo", "bench.rerank", "bench.reference")]
    saved = [(m, m.load_model) for m in modules]
    for m in modules:
        m.load_model = load_tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; on a busy machine they wait for each other
    yield
    torch.set_num_threads(threads)
    for m, f in saved:
        m.load_model = f


DONE: dict[str, tuple[int, str]] = {}  # command -> its result: a case's needs run once


def run_case(command: str, capsys) -> tuple[int, str]:
    case = CASES.get(command)
    if case is None:  # a command of its own (a need), not one of the README's
        if command.startswith("mkdir -p "):
            Path(command.split()[-1]).mkdir(parents=True, exist_ok=True)
            return 0, ""
        case = Case(command)
    for need in case.needs:
        run_case(need, capsys)
    if case.run not in DONE:
        DONE[case.run] = run_in_process(case.run, capsys)
        code, text = DONE[case.run]
        assert code == (1 if case.fails else 0), f"{case.run}\n{text[-3000:]}"
    return DONE[case.run]


@pytest.mark.parametrize("command", [c for c in documented_commands() if c in CASES and CASES[c].run])
def test_readme_command_runs(command, workdir, tiny_embedded_model, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as offline as CI: no Hub retries
    code, text = run_case(command, capsys)
    case = CASES[command]
    if case.fails:
        assert case.fails in text and "Traceback" not in text, text[-3000:]
