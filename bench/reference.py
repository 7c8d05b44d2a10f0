"""Time the KL's reference pass in a GRPO step, the reference resident on the device or offloaded to CPU memory.

    python -m bench.reference --size 5 --batch-size 4 --group-size 8 --max-new-tokens 32 --threads 1

One rollout batch is sampled once (DL21 training sets of `--size` passages, grpo.rollout, the embedded model), then
grpo.reference_logprobs (what one training step runs) is timed for each placement in turn, `--repeats` times, best
wall-clock and CPU seconds printed. On CPU "offload" copies the weights within CPU memory for the pass (as it copies
them to a GPU), so its figure adds that copy. On CUDA it adds the copy in from pinned memory.
"""

import argparse
import time

import torch

import grpo
from data import augment, load_dataset
from support import reference
from support.backend import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--size", type=int, default=5, help="passages per training set")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step (B)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = grpo.Config(model=args.model, size=args.size, batch_size=args.batch_size, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, seed=args.seed)
    instances, _ = augment(load_dataset("dl21"), cfg.samples, cfg.size, cfg.seed, cfg.min_ndcg)
    model, tokenizer = load_model(args.model)
    model.to(torch.float32)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        ro = grpo.rollout(model, tokenizer, grpo.TASKS["listwise"], instances[: args.batch_size], args.group_size,
                          max_new_tokens=args.max_new_tokens)
        tokens = int(ro.completion_mask.sum())
        print(f"{args.model} on {device}: {args.batch_size} prompts x {args.group_size} completions, "
              f"{tokens} completion tokens")
        refs = {}
        for placement in ("resident", "offload"):
            t = time.time()
            refs[placement] = reference.Reference(model, device, placement)
            print(f"{placement}: built in {time.time() - t:.2f}s")
        best = {k: (float("inf"), float("inf")) for k in refs}
        results = {}
        for _ in range(args.repeats):
            for placement, ref in refs.items():  # alternated, so a busy machine weighs on both alike
                t, c = time.time(), time.process_time()
                results[placement] = grpo.reference_logprobs(ref, ro, cfg)
                wall, cpu = time.time() - t, time.process_time() - c
                best[placement] = min(best[placement][0], wall), min(best[placement][1], cpu)
    same = all(torch.equal(a, b) for a, b in zip(results["resident"], results["offload"]))
    for placement, (wall, cpu) in best.items():
        print(f"reference pass, {placement}: {wall:.2f} s wall, {cpu:.2f} s CPU (best of {args.repeats})")
    print(f"log-probs identical across placements: {same}")


if __name__ == "__main__":
    main()
