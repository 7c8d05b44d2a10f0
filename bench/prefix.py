"""Time the prompt once (prompt_once.py) against the usual path: policy forward+backward and the no-grad reference pass.

    nice python -m bench.prefix --prompt-len 512 --completion-len 64 --group-size 4

The model is the embedded SmolLM2-135M-Instruct when it is cached (~/.cache/rearank/smollm2-135m-instruct, see
backend.smollm2_dir), else a random model of the same shape (`--random` forces it). Token ids are random: the cost
of a forward does not depend on them. Each figure is the best of `--repeats` runs, in wall-clock and in CPU seconds
(this process's, all threads): on a shared machine the CPU seconds are the steadier figure, and `--threads 1`
keeps idle threads from spinning while a busy machine holds the others back.
"""

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from support import prompt_once

EMBEDDED = Path(os.environ.get("REARANK_CACHE") or Path.home() / ".cache" / "rearank") / "smollm2-135m-instruct"

# SmolLM2-135M's shape (its config.json)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 100000.0})


@dataclass
class Config:
    prompt_len: int = 512
    completion_len: int = 64
    group_size: int = 4
    micro_batch: int = 0  # 0: the whole group at once
    checkpointing: bool = False  # non-reentrant activation checkpointing
    random: bool = False  # a random SmolLM2-shaped model even when the embedded one is cached
    repeats: int = 2
    threads: int = 0  # 0: torch's default
    seed: int = 0


def parse_args() -> Config:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help=f"(default {f.default})")
        else:
            flag = f"--{f.name.replace('_', '-')}"
            p.add_argument(flag, type=f.type, default=f.default, help=f"(default {f.default})")
    return Config(**vars(p.parse_args()))


def load_model(cfg: Config):
    if not cfg.random and (EMBEDDED / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32), str(EMBEDDED)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)), "random SmolLM2-135M-shaped"


def best_time(fn, repeats: int) -> tuple[float, float]:
    """The fastest of `repeats` runs: (wall seconds, CPU seconds)."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(times)


def main():
    cfg = parse_args()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(cfg, f"threads {torch.get_num_threads()}")
    model, name = load_model(cfg)
    model.train()  # dropout is 0 in these configs; train() is what turns checkpointing on
    if cfg.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    print(f"model: {name} | load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (cfg.prompt_len,), generator=gen)  # (P,)
    completions = torch.randint(0, vocab, (cfg.group_size, cfg.completion_len), generator=gen)  # (G, C)
    mask = torch.ones_like(completions)
    micro = cfg.micro_batch or None

    def policy(repeat_prompt):
        model.zero_grad(set_to_none=True)
        with prompt_once.prompt_pass(model, prompt, repeat_prompt) as score:
            for rows in prompt_once.micro_batches(len(completions), micro):
                score(completions[rows], mask[rows]).mean().backward()

    @torch.no_grad()
    def reference(repeat_prompt):
        prompt_once.completion_logprobs(model, prompt, completions, mask, repeat_prompt=repeat_prompt,
                                        micro_batch=micro)

    for label, fn in [("policy forward+backward", policy), ("reference pass (no grad)", reference)]:
        plain = best_time(lambda: fn(True), cfg.repeats)
        shared = best_time(lambda: fn(False), cfg.repeats)
        print(f"{label}: plain {plain[0]:.1f}s (cpu {plain[1]:.1f}s) | shared {shared[0]:.1f}s (cpu {shared[1]:.1f}s)"
              f" | plain/shared {plain[0] / shared[0]:.2f}x (cpu {plain[1] / shared[1]:.2f}x)")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
