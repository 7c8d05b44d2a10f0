"""Benchmark: one GRPO step of grpo.py (prompt once per group, and repeated as usual) against TRL's GRPOTrainer.

    pip install --no-deps trl && pip install datasets    # benchmark only: TRL is not a project requirement
    python -m bench.trl --size 20 --group-size 8 --max-new-tokens 256 --micro-batch 2   # P ~ 2300, C = 256, G = 8
    python -m bench.trl --size 3 --group-size 4 --max-new-tokens 16                   # a quick look
    python -m bench.trl --sides ours,ours-repeat --size 3 --group-size 2 --max-new-tokens 8   # without TRL

Three sides, one after another, each in its own process (so peak memory is its own): `ours` (grpo.py, each group's
prompt run once: prompt_once.py), `ours-repeat` (grpo.py --repeat-prompt: the prompt repeated per completion, as TRL
does) and `trl` (GRPOTrainer). Each loads the model, takes one step from the same training instance (the first DL21
candidate set of `--size` passages drawn with `--seed`), and reports the step's wall time and the process's peak
resident memory (getrusage ru_maxrss). All sample at temperature 1 with top-k/top-p off, generate exactly
`--max-new-tokens` tokens (EOS and the `</answer>` stop held back, so C is fixed whatever the model writes), average
the loss over tokens (TRL `loss_type="dapo"`), use no KL (beta 0), one update per batch, lr 1e-6, fp32 on CPU. The
step covers generation, reward, loss, backward and the optimizer step; model loading does not count.

`--micro-batch M` runs the forward/backward M completions at a time on every side (ours: `--micro-batch`; TRL:
per-device batch M with G/M accumulation steps and one generation of G per step): at P ~ 2300 the repeated-prompt
path needs over 21 GB for all 8 rows at once.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("ours", "ours-repeat", "trl")


def instance(args):
    from data import augment
    from data import load_dataset

    instances, _ = augment(load_dataset("dl21", args.data_dir), samples=1, size=args.size, seed=args.seed)
    return instances[0]


def run_ours(args, repeat_prompt: bool) -> dict:
    import grpo
    from data import write_instances

    grpo.save_checkpoint = lambda *a, **k: None  # a benchmark step writes nothing (TRL's side saves nothing either)
    grpo.generate_tokens = functools.partial(grpo.generate_tokens, min_new_tokens=args.max_new_tokens,  # C fixed
                                                preallocate=not args.growing_cache)
    with tempfile.TemporaryDirectory() as tmp:
        write_instances(Path(tmp) / "train.jsonl", [instance(args)])
        # --out a fresh folder beside the training file: grpo.py refuses an --out that holds files of a run
        cfg = grpo.Config(model=args.model, train_file=str(Path(tmp) / "train.jsonl"), steps=1, batch_size=1,
                          group_size=args.group_size, max_new_tokens=args.max_new_tokens, lr=1e-6, beta=0.0,
                          eval_every=0, save_every=0, dump_every=0, out=str(Path(tmp) / "run"), seed=args.seed,
                          repeat_prompt=repeat_prompt, micro_batch=args.micro_batch)
        m = grpo.train(cfg)
    return {"step_s": m["gen_s"] + m["train_s"], "gen_s": m["gen_s"], "train_s": m["train_s"],
            "completion_len": m["completion_len"]}


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rearank import build_prompt
    from support.backend import load_model
    from reward import rerank_reward

    inst = instance(args)
    docids = [c.docid for c in inst.candidates]
    prompt = build_prompt(inst.query, [c.text for c in inst.candidates])
    model, tokenizer = load_model(args.model)

    def reward(prompts, completions, **kw):  # the same REARANK reward on the same candidate set
        return [rerank_reward(c[0]["content"], docids, inst.judged).total for c in completions]

    lengths = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.time()

        def on_step_end(self, *a, **k):
            self.seconds = time.time() - self.t

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.micro_batch or args.group_size,
            gradient_accumulation_steps=args.group_size // (args.micro_batch or args.group_size),
            num_generations=args.group_size,  # one generation of G per optimizer step, trained M at a time
            max_completion_length=args.max_new_tokens, learning_rate=1e-6, beta=0.0, temperature=1.0, top_k=0,
            top_p=1.0, loss_type="dapo", max_steps=1, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, bf16=False, gradient_checkpointing=False, seed=args.seed, shuffle_dataset=False,
            generation_kwargs={"min_new_tokens": args.max_new_tokens},  # C fixed, as on our side
            # TRL's defaults differ: bf16=True and gradient_checkpointing=True; set as grpo.py runs on CPU
        )
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[reward], args=cfg,
                              train_dataset=Dataset.from_list([{"prompt": prompt}]), callbacks=[timer])
        trainer.train()
        logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
        if logs:
            lengths.append(logs[-1]["completions/mean_length"])
    return {"step_s": timer.seconds, "completion_len": lengths[0] if lengths else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=SIDES, help="run one side only (the driver runs all three, each in a process)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides for the driver to run")
    p.add_argument("--model", default="smollm2", help="model for all sides")
    p.add_argument("--size", type=int, default=5, help="passages in the prompt (20 = the paper's window, P ~ 2300)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length (C), generated in full")
    p.add_argument("--micro-batch", type=int, default=0, help="completions per forward/backward (0 = all G)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per side (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed for the candidate set and sampling")
    p.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA, else ./data)")
    p.add_argument("--growing-cache", action="store_true",
                   help="our sides decode into a cache grown by a copy every token instead of one preallocated")
    args = p.parse_args()
    if args.micro_batch and args.group_size % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --group-size {args.group_size}")
    if args.impl:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_trl(args) if args.impl == "trl" else run_ours(args, repeat_prompt=args.impl == "ours-repeat")
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print("RESULT " + json.dumps(result))
        return
    sides = args.sides.split(",")
    if unknown := [x for x in sides if x not in SIDES]:
        p.error(f"--sides {args.sides}: unknown side {unknown[0]!r}; choose among {', '.join(SIDES)}")
    if "trl" in sides and importlib.util.find_spec("trl") is None:  # say so before the other sides run for minutes
        sys.exit("error: the trl side needs TRL (pip install --no-deps trl && pip install datasets); or compare our "
                 "two sides alone: --sides ours,ours-repeat")
    results = {}
    for impl in sides:  # one after another: each side has the machine to itself
        cmd = [sys.executable, "-m", "bench.trl", "--impl", impl] + sys.argv[1:]
        root = str(Path(__file__).resolve().parent.parent)  # the project, importable from any working folder
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{impl} failed:\n{proc.stderr[-3000:]}")
        results[impl] = json.loads(line[-1][len("RESULT "):])
        r = results[impl]
        phases = f" (generation {r['gen_s']:.1f}s, training {r['train_s']:.1f}s)" if "gen_s" in r else ""
        print(f"{impl:11s}: step {r['step_s']:.1f}s{phases}, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"mean completion {r['completion_len']} tokens", flush=True)
    if "trl" in results:
        trl = results["trl"]
        for impl in (x for x in results if x != "trl"):
            print(f"ratio {impl}/TRL: step time {results[impl]['step_s'] / trl['step_s']:.2f}, peak memory "
                  f"{results[impl]['peak_rss_gb'] / trl['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
