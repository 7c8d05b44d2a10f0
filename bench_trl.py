"""Benchmark: one GRPO step of grpo.py against TRL's GRPOTrainer, same model, prompts, G and lengths.

    pip install --no-deps trl && pip install datasets    # benchmark only: TRL is not a project requirement
    python bench_trl.py --size 5 --group-size 4 --max-new-tokens 32

Both sides run at the same time, each in its own process (so peak memory is its own, and a busy machine slows both
alike): each loads the model, takes one step from the same
training instance (the first DL21 candidate set of `--size` passages drawn with `--seed`), and reports the step's
wall time and the process's peak resident memory (getrusage ru_maxrss). Both sides sample at temperature 1 with
top-k/top-p off, average the loss over tokens (TRL `loss_type="dapo"`), use no KL (beta 0), one update per batch, lr 1e-6,
fp32 on CPU. The step covers generation, reward, loss, backward and the optimizer step; model loading does not count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def instance(args):
    from data import augment, load_dataset

    instances, _ = augment(load_dataset("dl21", args.data_dir), samples=1, size=args.size, seed=args.seed)
    return instances[0]


def run_ours(args) -> dict:
    import grpo
    from data import write_instances

    grpo.save_checkpoint = lambda *a, **k: None  # a benchmark step writes nothing (TRL's side saves nothing either)
    with tempfile.TemporaryDirectory() as tmp:
        write_instances(Path(tmp) / "train.jsonl", [instance(args)])
        cfg = grpo.Config(model=args.model, train_file=str(Path(tmp) / "train.jsonl"), steps=1, batch_size=1,
                          group_size=args.group_size, max_new_tokens=args.max_new_tokens, lr=1e-6, beta=0.0,
                          eval_every=0, save_every=0, dump_every=0, out=tmp, seed=args.seed)
        m = grpo.train(cfg)
    return {"step_s": m["gen_s"] + m["train_s"], "gen_s": m["gen_s"], "completion_len": m["completion_len"]}


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rearank import build_prompt, load_model
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
            output_dir=tmp, per_device_train_batch_size=args.group_size, num_generations=args.group_size,
            max_completion_length=args.max_new_tokens, learning_rate=1e-6, beta=0.0, temperature=1.0, top_k=0,
            top_p=1.0, loss_type="dapo", max_steps=1, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, bf16=False, gradient_checkpointing=False, seed=args.seed, shuffle_dataset=False,
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
    p.add_argument("--impl", choices=("ours", "trl"), help="run one side only (the driver runs both, each in a process)")
    p.add_argument("--model", default="smollm2", help="model for both sides")
    p.add_argument("--size", type=int, default=5, help="passages in the prompt (20 = the paper's window, P ~ 2300)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length cap (C)")
    p.add_argument("--seed", type=int, default=0, help="seed for the candidate set and sampling")
    p.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA, else ./data)")
    args = p.parse_args()
    if args.impl:
        result = run_ours(args) if args.impl == "ours" else run_trl(args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print("RESULT " + json.dumps(result))
        return
    # both sides at once, each in its own process: on a shared machine they then see the same load
    cmds = {impl: [sys.executable, __file__, "--impl", impl] + sys.argv[1:] for impl in ("ours", "trl")}
    procs = {impl: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for impl, cmd in cmds.items()}
    results = {}
    for impl, proc in procs.items():
        stdout, stderr = proc.communicate()
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{impl} failed:\n{stderr[-3000:]}")
        results[impl] = json.loads(line[-1][len("RESULT "):])
        print(f"{impl:4s}: step {results[impl]['step_s']:.1f}s, peak RSS {results[impl]['peak_rss_gb']:.2f} GB, "
              f"mean completion {results[impl]['completion_len']} tokens")
    ours, trl = results["ours"], results["trl"]
    print(f"ratio ours/TRL: step time {ours['step_s'] / trl['step_s']:.2f}, peak memory "
          f"{ours['peak_rss_gb'] / trl['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
