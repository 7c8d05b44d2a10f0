"""Speed of window generation: the same fixed DL19 windows generated one at a time and in batches.

    python -m bench.rerank                                   # embedded model, 8 windows, batch sizes 1 4 8, 64 tokens
    python -m bench.rerank --prompt rankgpt --max-new-tokens 128
    python -m bench.rerank --padded-prefill                  # plain generate on the padded batch (the old way)
    python -m bench.rerank --fixed-length                    # every window generates exactly --max-new-tokens
    python -m bench.rerank --fixed-length --growing-cache    # decode into a cache grown every token (the old way)

Each window is a query's BM25 top-20 as one prompt (what `eval.py --top-k 20` sends). Every batch size generates the
same windows with the same greedy settings through `backend.generate_tokens`, the path evaluation and GRPO use, and
stops each sequence at EOS or `</answer>` as they do. Reported: windows/s, prompt tokens/s (real tokens, padding not
counted), generated tokens/s (tokens up to each sequence's stop), the CPU seconds used (on a shared machine they
compare better than wall time), and the share of the computed positions that were padding or ran past a sequence's
stop (the cost of batching sequences of unequal length). Each prompt is prefilled alone (`prompt_once.generate`), so its
padding is only computed with `--padded-prefill`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from data import load_dataset
from rearank import build_prompt
from support.backend import SMOLLM2, generate_tokens, load_model


@dataclass
class BenchConfig:
    model: str = SMOLLM2
    dataset: str = "dl19"
    data_dir: str | None = None
    windows: int = 8
    window: int = 20
    prompt: str = "rearank"
    batch_sizes: str = "1,4,8"
    max_new_tokens: int = 64
    padded_prefill: bool = False
    fixed_length: bool = False
    growing_cache: bool = False
    out: str = "runs/bench_rerank.json"


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2, help="'smollm2' (embedded), a hub id or a local directory")
    p.add_argument("--dataset", default="dl19", help="where the windows come from")
    p.add_argument("--data-dir", default=None, help="data directory (default: $REARANK_DATA, else ./data)")
    p.add_argument("--windows", type=int, default=8, help="how many windows (the first N queries, one window each)")
    p.add_argument("--window", type=int, default=20, help="passages per window")
    p.add_argument("--prompt", default="rearank", choices=["rearank", "rankgpt"], help="prompt style")
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes to compare")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per window (fixed for comparison)")
    p.add_argument("--padded-prefill", action="store_true",
                   help="prefill the left-padded batch in one forward (plain generate) instead of each prompt alone")
    p.add_argument("--fixed-length", action="store_true",
                   help="hold EOS back: every window generates exactly --max-new-tokens (decoding-bound workload)")
    p.add_argument("--growing-cache", action="store_true",
                   help="decode into a cache that grows by a copy every token instead of one preallocated")
    p.add_argument("--out", default="runs/bench_rerank.json", help="where to save the table as JSON")
    return BenchConfig(**vars(p.parse_args(argv)))


def bench(model, tokenizer, prompts: list, batch_size: int, max_new_tokens: int, padded_prefill: bool,
          fixed_length: bool, growing_cache: bool = False) -> dict:
    """Generate all `prompts` in batches of `batch_size`; throughput and waste."""
    t, cpu = time.perf_counter(), time.process_time()
    prompt_tokens = prompt_positions = generated = generated_positions = 0
    for b in range(0, len(prompts), batch_size):
        g = generate_tokens(model, tokenizer, prompts[b : b + batch_size], max_new_tokens=max_new_tokens,
                            repeat_prompt=padded_prefill, min_new_tokens=max_new_tokens if fixed_length else 0,
                            preallocate=not growing_cache)
        prompt_tokens += int(g.prompt_mask.sum())
        prompt_positions += g.prompt_mask.numel() if padded_prefill else int(g.prompt_mask.sum())
        generated += int(g.completion_mask.sum())
        generated_positions += g.completion_mask.numel()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),  # on a shared machine, work done per CPU second compares better than wall time
        "windows_per_s": len(prompts) / seconds,
        "prompt_tokens_per_s": prompt_tokens / seconds,
        "generated_tokens_per_s": generated / seconds,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wasted": 1 - (prompt_tokens + generated) / (prompt_positions + generated_positions),
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    cfg = parse_args(argv)
    print("config: " + json.dumps(asdict(cfg)))
    rankings = load_dataset(cfg.dataset, cfg.data_dir).rankings[: cfg.windows]
    prompts = [build_prompt(r.query.text, [c.text for c in r.candidates[: cfg.window]], cfg.prompt) for r in rankings]
    prompts.sort(key=lambda m: sum(len(x["content"]) for x in m))  # as rerank() batches them: less padding
    model, tokenizer = load_model(cfg.model)
    device = f"{model.device}" + ("" if model.device.type == "cuda" else f", {torch.get_num_threads()} threads")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{cfg.model} on {device}; {len(prompts)} windows of {cfg.window} passages, greedy; load average {load}")
    generate_tokens(model, tokenizer, prompts[:1], max_new_tokens=2)  # warm-up: allocator, kernels, stop criterion
    rows = []
    for bs in [int(x) for x in cfg.batch_sizes.split(",")]:
        rows.append(bench(model, tokenizer, prompts, bs, cfg.max_new_tokens, cfg.padded_prefill, cfg.fixed_length,
                          cfg.growing_cache))
        print(f"batch {bs}: {rows[-1]['seconds']}s", flush=True)
    print("\n| batch size | windows/s | prompt tokens/s | generated tokens/s | wall s | CPU s | padded/after-stop |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['windows_per_s']:.3f} | {r['prompt_tokens_per_s']:.0f} | "
            f"{r['generated_tokens_per_s']:.1f} | {r['seconds']} | {r['cpu_seconds']} | {r['wasted']:.1%} |"
        )
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps({"config": asdict(cfg), "device": device, "rows": rows}, indent=1))
    print(f"\nwrote {cfg.out}")


if __name__ == "__main__":
    main()
