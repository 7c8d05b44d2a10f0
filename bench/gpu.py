"""The GPU check in one command: a Qwen2.5-7B-shaped model (random bf16 weights) trained by grpo.train under the 80 GB
plan at the paper's shape, then eval.py's generation speed. Every figure goes to --out as JSON.

    python -m bench.gpu --prepare                          # here: the few files the GPU machine lacks, into .gl/
    python -m bench.gpu --out gpu.json                     # on one H100/H200: well within 10 minutes
    python -m bench.gpu --tiny --out /tmp/tiny.json        # a tiny config on CPU in seconds (tests/test_bench_gpu.py)

1. smoke (seconds): python, torch, transformers and accelerate versions, the device, one forward of a tiny model.
2. training, through grpo.train and grpo.Config as a user's run (the model comes from its config instead of a
   checkpoint: `grpo.load_model` is swapped for `random_model`, and the plan reads the published config): B = 1
   prompt of 20 DL21 passages (~2,300 tokens) x G = 8, the KL on (beta 0.001), --memory-gb 80 (on a larger GPU the
   allocator is capped at 80 GB too), completions forced to 512 and then 2,048 tokens (min_new_tokens: random
   weights would hardly stop anyway). Two steps each, a save, and at 512 tokens a --resume for one more step. Then
   LoRA (rank 16 on every linear, --lora-rank) under the 24 GB plan, the allocator capped at 24 GB: two steps at 512.
   Printed per step: peak memory of each phase (rollout / reference / policy update, the allocator's peak, reset
   between phases) against the plan's figure for it, the time of each, and the fraction of watched weights the
   first step moved. The saves use --save-optimizer off: the GPU machine's 64 GiB disk holds 45.7 GB at once that
   way (checkpoint/ 15.2 GB + model/ 15.2 GB, the old checkpoint kept while the new one is written), not the
   107 GB a save with BF16AdamW's moments needs (memory.py's disk line says so, and grpo.py would stop). The reward
   is a hash of the text (`text_reward`): random weights earn no REARANK reward, and equal rewards move nothing.
3. generation: 8 DL19 top-20 windows, greedy, through backend.generate_tokens (what eval.py's HFGenerator calls) at
   batch 1 and 8, every completion forced to --eval-tokens: tokens/s.

The GPU machine has neither the data nor the embedded model's tokenizer: `--prepare` writes what the check reads
(8 DL21 training sets, 8 DL19 windows, the embedded model's tokenizer, ~4 MB) into --assets, a git-ignored folder
the device run carries. The tokenizer has 49,152 ids and the model 152,064: ids beyond it decode to nothing, which
changes no shape.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

ASSETS = Path(".gl/bench_gpu")
TINY = dict(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)


# ----------------------------------------------------------------------------------------------------------------------
# the files the GPU machine lacks


def prepare(assets: Path, windows: int = 8) -> None:
    """8 DL21 training sets of 20 passages, 8 DL19 top-20 windows and the embedded model's tokenizer, into `assets`."""
    from transformers import AutoTokenizer

    from data import augment, write_instances
    from support.backend import smollm2_dir
    from data import load_dataset

    assets.mkdir(parents=True, exist_ok=True)
    instances, _ = augment(load_dataset("dl21"), samples=1, size=20, seed=0, min_ndcg=0.1)
    write_instances(assets / "train.jsonl", instances[:windows])
    dl19 = load_dataset("dl19")
    judged = [r for r in dl19.rankings if r.query.qid in dl19.qrels][:windows]
    rows = [{"qid": r.query.qid, "query": r.query.text, "passages": [c.text for c in r.candidates[:20]]}
            for r in judged]
    (assets / "dl19_windows.json").write_text(json.dumps(rows))
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(assets / "tokenizer")
    print(f"wrote {assets}: {len(instances[:windows])} training sets, {len(rows)} DL19 windows, the tokenizer")


def tokenizer_from(assets: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    tok.padding_side = "left"  # as backend.load_model
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------------------------------
# the model: random weights from a config, built on the device


def random_model(config, device: torch.device, seed: int = 0):
    """A causal LM of `config`'s shape with random weights, built straight on `device` (bf16 on CUDA)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def smoke(device: torch.device) -> dict:
    import accelerate
    import transformers
    from transformers import LlamaConfig

    t = time.time()
    model = random_model(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}), device)
    with torch.no_grad():
        logits = model(torch.arange(8, device=device)[None]).logits
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "forward_ok": bool(torch.isfinite(logits).all()), "seconds": round(time.time() - t, 2)}
    print("smoke: " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# grpo.train, with each phase timed and its peak memory read


class Phases:
    """Wraps the names grpo.train calls for its phases; records seconds and the allocator's peak of each call."""

    NAMES = {"rollout": "rollout", "frozen_logprobs": "reference", "update": "policy", "save_checkpoint": "save"}

    def __init__(self, device: torch.device):
        self.device, self.records, self.plan, self.moved = device, [], None, None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wrap(self, fn, phase: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.time()
            result = fn(*args, **kwargs)
            self.sync()
            peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
            self.records.append({"phase": phase, "s": round(time.time() - t, 3),
                                 "peak_gb": None if peak is None else round(peak / 1e9, 2)})
            return result

        return timed

    @contextlib.contextmanager
    def installed(self, model_fn):
        import grpo

        saved = {name: getattr(grpo, name) for name in [*self.NAMES, "load_model", "plan_memory", "moved_fraction"]}

        def plan_memory(*args, **kwargs):
            self.plan = saved["plan_memory"](*args, **kwargs)
            return self.plan

        def moved_fraction(*args):
            self.moved = saved["moved_fraction"](*args)
            return self.moved

        for name, phase in self.NAMES.items():
            setattr(grpo, name, self.wrap(saved[name], phase))
        grpo.load_model, grpo.plan_memory, grpo.moved_fraction = model_fn, plan_memory, moved_fraction
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(grpo, name, fn)


def plan_figures(plan) -> dict:
    if plan is None:
        return {}
    return {"settings": plan.settings.describe(plan.work.group_size, plan.work.lora_rank),
            "budget_gb": round(plan.budget / 1e9, 1),
            "rollout_gb": round(plan.rollout / 1e9, 2), "reference_gb": round(plan.reference_pass / 1e9, 2),
            "policy_gb": round(plan.training / 1e9, 2), "peak_gb": round(plan.peak / 1e9, 2)}


def text_reward(text: str, inst):
    """A reward that differs between completions: random weights never earn REARANK's, and a group of equal rewards
    has no gradient (only the KL's, zero in the first step), so the weights would not move."""
    from reward import Reward

    value = (zlib.crc32(text.encode()) % 97) / 96
    return Reward(rank=value, format1=0.0, format2=0.0, total=value, ndcg=0.0)


def train_run(cfg, device: torch.device, model_fn, forced: int) -> dict:
    """grpo.train(cfg) with the phases recorded, every completion forced to `forced` tokens and `text_reward`."""
    import grpo
    from support import backend

    phases = Phases(device)
    real, task = grpo.generate_tokens, grpo.TASKS["listwise"]
    grpo.generate_tokens = functools.partial(backend.generate_tokens, min_new_tokens=forced)
    grpo.TASKS["listwise"] = task._replace(reward=text_reward)
    try:
        with phases.installed(model_fn):
            t = time.time()
            grpo.train(cfg)
            seconds = time.time() - t
    finally:
        grpo.generate_tokens, grpo.TASKS["listwise"] = real, task
    planned = plan_figures(phases.plan)
    steps = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    report = {"max_new_tokens": cfg.max_new_tokens, "steps": [s["step"] for s in steps], "plan": planned,
              "phases": phases.records, "first_step_moved": phases.moved, "seconds": round(seconds, 1),
              "completion_len": [s["completion_len"] for s in steps], "kl": [s["kl"] for s in steps]}
    for r in phases.records:
        if r["peak_gb"] is not None and r["phase"] in ("rollout", "reference", "policy"):
            r["plan_gb"] = planned.get(f"{r['phase']}_gb")
    print(f"C {cfg.max_new_tokens}: steps {report['steps']} in {seconds:.0f}s, first step moved "
          f"{phases.moved if phases.moved is None else f'{phases.moved:.2%}'} of the watched weights")
    for r in phases.records:
        print(f"  {r['phase']:<9} {r['s']:8.2f} s   peak {r['peak_gb']} GB (plan {r.get('plan_gb', '-')})")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# eval.py's generation at batch 1 and 8


def generation_speed(model, tokenizer, windows: list[dict], tokens: int, batch: int) -> dict:
    from support.backend import generate_tokens
    from rearank import build_prompt

    prompts = [build_prompt(w["query"], w["passages"]) for w in windows]
    generated, t = 0, time.time()
    for b in range(0, len(prompts), batch):
        g = generate_tokens(model, tokenizer, prompts[b : b + batch], max_new_tokens=tokens, min_new_tokens=tokens)
        generated += int(g.completion_mask.sum())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t
    out = {"batch": batch, "windows": len(prompts), "generated_tokens": generated, "seconds": round(seconds, 2),
           "tokens_per_s": round(generated / seconds, 1)}
    print(f"generation, batch {batch}: {generated} tokens in {seconds:.1f}s = {out['tokens_per_s']} tokens/s")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the command


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_gpu.json", help="the figures, as JSON (rewritten after each part)")
    p.add_argument("--assets", default=str(ASSETS), help="what --prepare writes and the check reads")
    p.add_argument("--work", default="runs/bench_gpu", help="the training runs' --out folders (deleted after each)")
    p.add_argument("--prepare", action="store_true", help="only write --assets (needs the data and the embedded model)")
    p.add_argument("--tiny", action="store_true", help="a tiny config, a few tokens: the whole check on CPU in seconds")
    p.add_argument("--lengths", default="", help="completion lengths to force (default 512,2048; --tiny 4,8)")
    p.add_argument("--group-size", type=int, default=0, help="G (default 8; --tiny 2)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="the memory the plan fits and the allocator is capped at")
    p.add_argument("--lora-gb", type=float, default=24.0, help="the memory the LoRA run's plan fits and the allocator "
                                                             "is capped at")
    p.add_argument("--eval-tokens", type=int, default=0, help="tokens per generated window (default 256; --tiny 4)")
    args = p.parse_args(argv)
    assets = Path(args.assets)
    if args.prepare:
        prepare(assets)
        return {}
    if not (assets / "train.jsonl").is_file():
        raise SystemExit(f"error: {assets} holds no prepared files: run `python -m bench.gpu --prepare` first")
    if not args.tiny and not torch.cuda.is_available():  # a 7B-shaped model on the CPU would take hours
        raise SystemExit("error: the GPU check needs CUDA; on a CPU run its small twin: python -m bench.gpu --tiny")
    import grpo
    from support.model_shape import published_config

    device = torch.device("cpu" if args.tiny else "cuda")
    lengths = [int(x) for x in (args.lengths or ("4,8" if args.tiny else "512,2048")).split(",")]
    group_size = args.group_size or (2 if args.tiny else 8)
    typed = sys.argv[1:] if argv is None else argv
    results: dict = {"command": "python -m bench.gpu " + " ".join(typed), "tiny": args.tiny}
    write = lambda: Path(args.out).write_text(json.dumps(results, indent=1))  # noqa: E731
    results["smoke"] = smoke(device)
    write()

    work = Path(args.work)
    if args.tiny:  # a config folder the plan reads, as it reads a checkpoint's
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(TINY))
    name = str(work) if args.tiny else "qwen2.5-7b"
    config, tokenizer = published_config(name), tokenizer_from(assets)
    if device.type == "cuda":  # an 80 GB device on a larger one
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gb * 1e9 / total))
    model_fn = lambda _name: (random_model(config, device), tokenizer)  # noqa: E731
    size = len(json.loads((assets / "train.jsonl").read_text().splitlines()[0])["candidates"])
    base = dict(model=name, train_file=str(assets / "train.jsonl"), size=size, batch_size=1, group_size=group_size,
                beta=0.001, eval_every=0, save_every=0, dump_every=0, save_optimizer="off", seed=0,
                memory_gb=0.0 if args.tiny else args.gpu_gb)

    results["training"] = []
    for i, length in enumerate(lengths):
        out = work / f"C{length}"
        shutil.rmtree(out, ignore_errors=True)
        run = train_run(grpo.Config(**base, max_new_tokens=length, steps=2, out=str(out)), device, model_fn, length)
        if i == 0:  # the save read back: one more step from the checkpoint
            run["resumed"] = train_run(grpo.Config(**base, max_new_tokens=length, steps=3, out=str(out), resume=True),
                                       device, model_fn, length)
        shutil.rmtree(out, ignore_errors=True)
        results["training"].append(run)
        write()

    # LoRA on a smaller card: rank 16 on every linear, the reference the base with its adapters off
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.lora_gb * 1e9 / total))
    out = work / "lora"
    shutil.rmtree(out, ignore_errors=True)
    lora = dict(base, memory_gb=0.0 if args.tiny else args.lora_gb, lora_rank=4 if args.tiny else 16, lr=1e-5)
    results["lora"] = train_run(grpo.Config(**lora, max_new_tokens=lengths[0], steps=2, out=str(out)), device,
                                model_fn, lengths[0])
    shutil.rmtree(out, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gb * 1e9 / total))
    write()

    windows = json.loads((assets / "dl19_windows.json").read_text())
    model = random_model(config, device)
    tokens = args.eval_tokens or (4 if args.tiny else 256)
    results["generation"] = [generation_speed(model, tokenizer, windows, tokens, b) for b in (1, 8)]
    write()
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
