"""A hand-written GRPO loop that teaches an LLM to rerank with reasoning (REARANK; METHOD §3-§5).

    python grpo.py --model Qwen/Qwen2.5-7B-Instruct                         # the paper's recipe, one GPU
    python grpo.py --model smollm2 --dataset dl21 --steps 40 --size 5       # the embedded model on CPU
    python grpo.py --out runs/grpo --resume                                 # continue from the last checkpoint
    python eval.py --dataset dl19 --model runs/grpo/model                   # evaluate what it trained
    python grpo.py --out runs/grpo --plot                                   # redraw the curves of a run
    accelerate launch --config_file launch/ddp.yaml grpo.py ...             # data parallel on several GPUs

One step: B training instances (candidate sets sampled by `augment.py`, METHOD §4), each rendered with the REARANK
prompt -> G completions each, sampled by `backend.generate_tokens` (the generation path evaluation uses) -> the REARANK
reward (reward.py) -> advantages within each group -> the clipped policy-gradient loss on the generated token ids ->
one optimizer step. Everything a step did is one line on stdout and one JSON object in <out>/metrics.jsonl.

A group's G completions share one prompt (~2,300 tokens for 20 passages, against a few hundred per completion), so
the prompt runs once per group, not G times: in the rollout prefill, the old-policy and reference passes and the
policy's forward and backward (prefix.py; exact, its tests compare gradients with the usual way in float64).
`--repeat-prompt` runs it G times, as TRL and verl do, to compare.

How this departs from vanilla GRPO (DeepSeekMath, arXiv 2402.03300):

1. The loss is averaged over all completion tokens of the rollout batch (DAPO; TRL's default `loss_type="dapo"`),
   not per sequence and then per group: every token weighs the same, so a long completion is not diluted and a short
   one not amplified (the per-sequence mean carries a length bias, Dr. GRPO). Gradient accumulation divides by the
   token count of the whole batch, so micro-batches (`--micro-batch`) do not change the gradient.
2. `--no-std` drops the std from the advantage (Dr. GRPO): with std, a group that differs only in a format bit gets
   advantages as large as a group that differs in ranking quality (METHOD §5 pitfalls).
3. The KL penalty to the frozen initial policy is on, as the design has it, with verl's default coefficient
   (`--beta 0.001`, k3 "low_var_kl"; REARANK trained with verl, ReasonRank and nano-aha-moment use 0.001 too): the
   k3 estimator per token, as DeepSeekMath. `--reference offload` keeps the reference in CPU memory and brings it to
   the GPU only for its no-grad pass; `--beta 0` (TRL's and DAPO's default) builds no reference at all.
4. With one update per rollout batch (`--updates 1`, the default) the old policy *is* the current one: the ratio is
   exp(logp - logp.detach()) == 1, the clip is inert and no extra forward pass is made. With `--updates > 1` the old
   log-probs are computed once, under no_grad, before the first update.
5. Generation stops at `</answer>` (or EOS); what follows is masked, as is padding. Completions cut by
   `--max-new-tokens` are kept and scored (their answer is missing, so they mostly score 0) and counted as truncated.
6. Adam steps of size lr = 1e-6 vanish when added to bf16 weights (the bf16 spacing near 0.02 is 1.2e-4), so by
   default the weights stay fp32 (master weights) and the forward runs in bf16 autocast on CUDA. That costs 10 bytes a
   parameter with 8-bit Adam: 76 GB for a 7B model, too much for one 80 GB GPU once activations come in. With
   `--bf16-weights` the weights stay bf16 and `BF16AdamW` keeps bf16 moments and writes each update back with
   stochastic rounding (unbiased: a 1e-6 step moves a weight one bf16 spacing with probability 1e-6 / spacing):
   8 bytes a parameter, 61 GB for 7B. The first step reports how many weights moved.

The loop is generic over a `Task` (training sets, prompt, reward): REARANK's listwise task and Rank-R1's setwise one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

import dist
from augment import AugmentStats, TrainInstance, augment, augment_setwise, make_instance, read_instances
from data import DATASETS, TEST_SETS, DataError, Dataset, load_dataset
from files import check_file, check_out_dir, nonneg_float, nonneg_int, positive_float, positive_int
from prefix import completion_logprobs, group_backward, unpadded
from rearank import ANSWER_END, MAX_CHARS, build_prompt
from setwise import build_setwise_prompt
from backend import ModelError, generate_tokens, load_model
from reward import RANK_REWARDS, Reward, rerank_reward, setwise_set_reward

# ----------------------------------------------------------------------------------------------------------------------
# config


REFERENCE_PLACEMENTS = ("auto", "resident", "offload")


def arg(default, help: str):
    """A Config field with its --help text beside its default (read by `parse_args`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = arg("smollm2", "'smollm2' (the embedded SmolLM2-135M-Instruct), a local checkpoint directory, or a "
                                "hub id")
    method: str = arg("listwise", "listwise (REARANK: reorder the set) or setwise (Rank-R1: name the most relevant "
                                  "passage)")
    prompt: str = arg("rearank", "listwise prompt, for training and held-out evaluation alike: rearank (reasoning "
                                 "in <think>, the list in <answer>) or rankgpt (the list alone; the format terms then "
                                 "never fire unless --list-format)")
    list_format: bool = arg(False, "a departure, off by default: format2 rewards a completion that opens with a "
                                   "ranking list '[a] > [b]' (no tags), so the RankGPT prompt gets a format term too")
    rank_reward: str = arg("normalised", "listwise rank term: normalised (r_rerank - r_init) / (r* - r_init), the "
                                         "default; difference r_rerank - r_init; ndcg r_rerank (the paper's ablation)")
    dataset: str = arg("dl21", "dataset whose judged queries seed the training sets (augmented in memory, METHOD §4)")
    train_file: str = arg("", "JSONL of training instances from `augment.py` (overrides --dataset)")
    samples: int = arg(50, "augmentation: candidate sets sampled per query")
    size: int = arg(20, "augmentation: passages per candidate set (the paper: 20)")
    min_ndcg: float = arg(0.1, "augmentation: drop sets whose best reachable nDCG@10 is below this")
    steps: int = arg(100, "optimizer steps, one rollout batch each")
    batch_size: int = arg(4, "prompts (training instances) per step")
    group_size: int = arg(8, "completions sampled per prompt (G)")
    updates: int = arg(1, "policy updates per rollout batch; >1 computes old-policy log-probs and makes the clip "
                          "matter")
    micro_batch: int = arg(0, "completions per forward/backward pass within a group (0 = all G); bounds activation "
                              "memory")
    repeat_prompt: bool = arg(False, "run each prompt once per completion, as TRL does, instead of once per group (to "
                                     "compare)")
    lr: float = arg(1e-6, "learning rate (AdamW)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "clip the gradient norm to this (0 = no clipping)")
    beta: float = arg(0.001, "KL coefficient of the k3 penalty to the frozen reference (verl's default); 0 = no "
                             "reference model at all")
    clip_eps: float = arg(0.2, "PPO clip range: the ratio is clipped to [1-eps, 1+eps]")
    no_std: bool = arg(False, "advantages r - mean(r) without dividing by std (Dr. GRPO)")
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature")
    max_new_tokens: int = arg(512, "completion length cap for rollouts and held-out evaluation")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, ~30% slower)")
    bf16_weights: bool = arg(False, "bf16 weights updated with stochastic rounding (BF16AdamW): what fits a 7B model "
                                    "on 80 GB")
    eval_dataset: str = arg("dl19", "held-out dataset: its top-N windows are scored greedily (never a training set)")
    eval_size: int = arg(20, "held-out window size N (the top-N candidates of each query)")
    eval_queries: int = arg(0, "held-out queries to use (0 = all judged ones)")
    eval_qids: str = arg("", "only these held-out queries: comma-separated qids or a file with one qid a line (a "
                             "validation split of the training dataset; keep them out of --train-file)")
    eval_every: int = arg(25, "held-out evaluation every N steps, plus before the first and after the last (0 = never)")
    eval_batch_size: int = arg(8, "prompts per generate call in held-out evaluation")
    save_every: int = arg(25, "checkpoint every N steps (also at the end and on Ctrl-C)")
    dump_every: int = arg(10, "write the completions of one group to <out>/episodes.jsonl every N steps (0 = never)")
    out: str = arg("runs/grpo", "output directory: config.json, metrics.jsonl, eval.jsonl, episodes.jsonl, "
                                "checkpoint/, model/ (the trained reranker), curves.png")
    resume: bool = arg(False, "continue from <out>/checkpoint/")
    overwrite: bool = arg(False, "start afresh in an --out that holds a run, deleting it (without this, refused)")
    seed: int = arg(0, "one seed for data order, sampling and augmentation")
    data_dir: str = arg("", "data directory (default $REARANK_DATA, else ./data)")
    memory: str = arg("auto", "auto: plan memory before loading and pick what the user did not set (fp32 or bf16 "
                              "weights, checkpointing, micro-batch, logits chunk, where the reference lives); off: the "
                              "flags as given (memory.py)")
    memory_gb: float = arg(0.0, "memory budget the plan fits in, GB (0 = the device's free memory)")
    logits_chunk: int = arg(0, "positions per lm_head chunk in the training passes (0 = the planner picks; all at "
                               "once with --memory off)")
    reference: str = arg("auto", "where the KL's frozen reference lives: resident (on the device), offload (CPU "
                                 "memory, on the device only for its no-grad pass each step), auto (the memory plan "
                                 "decides)")


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = FLAG_TYPES.get(f.name) or {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=kind, default=f.default, help=f"{f.metadata['help']} (default {f.default!r})")
    p.add_argument("--plot", action="store_true", help="only redraw <out>/curves.png from <out>/metrics.jsonl")
    args = vars(p.parse_args(argv))
    plot = args.pop("plot")
    if args["method"] not in TASKS:
        p.error(f"--method {args['method']!r}: choose one of {', '.join(TASKS)}")
    if args["reference"] not in REFERENCE_PLACEMENTS:
        p.error(f"--reference {args['reference']!r}: choose one of {', '.join(REFERENCE_PLACEMENTS)}")
    if args["prompt"] not in MAX_CHARS or args["rank_reward"] not in RANK_REWARDS:
        p.error(f"--prompt: one of {', '.join(MAX_CHARS)}; --rank-reward: one of {', '.join(RANK_REWARDS)}")
    if args["method"] != "listwise" and (args["prompt"], args["rank_reward"], args["list_format"]) != (
            "rearank", "normalised", False):
        p.error("--prompt, --rank-reward and --list-format are listwise settings; setwise has Rank-R1's prompt and "
                "reward")
    cfg = Config(**args)
    if not plot and (problem := config_problem(cfg)):
        p.error(problem)
    return cfg, plot


# the least value each numeric flag takes, checked when the command is parsed (files.py's argparse types)
FLAG_TYPES = {
    **dict.fromkeys(("samples", "size", "steps", "batch_size", "group_size", "updates", "max_new_tokens", "eval_size",
                     "eval_batch_size"), positive_int),
    **dict.fromkeys(("micro_batch", "eval_queries", "eval_every", "save_every", "dump_every", "seed", "logits_chunk"),
                    nonneg_int),
    **dict.fromkeys(("lr", "clip_eps", "temperature"), positive_float),
    **dict.fromkeys(("min_ndcg", "weight_decay", "max_grad_norm", "beta", "memory_gb"), nonneg_float),
}


def config_problem(cfg: Config) -> str:
    """What is wrong with a parsed Config across flags (argparse checked each one alone), or "" when nothing is."""
    if cfg.group_size < 2:
        return f"--group-size {cfg.group_size}: GRPO compares completions within a group; it needs at least 2"
    if cfg.size < 2:
        return f"--size {cfg.size}: a candidate set needs at least 2 passages to have an order"
    if cfg.min_ndcg > 1:
        return f"--min-ndcg {cfg.min_ndcg}: nDCG@10 is at most 1, so every set would be dropped"
    if cfg.clip_eps >= 1:
        return f"--clip-eps {cfg.clip_eps}: the clip range [1-eps, 1+eps] needs eps < 1"
    if cfg.resume and cfg.overwrite:
        return "--resume continues the run in --out, --overwrite deletes it: choose one"
    if cfg.train_file:
        try:
            check_file(cfg.train_file)
        except DataError as e:
            return f"--train-file {e}"
    elif cfg.dataset not in DATASETS:
        return f"--dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}"
    elif cfg.dataset in TEST_SETS:
        return (f"--dataset {cfg.dataset} is a test set: training on it makes its evaluation meaningless; use dl21 or "
                "scifact-train (or a --train-file from `augment.py --allow-test-set`)")
    if cfg.eval_every and cfg.eval_dataset not in DATASETS:
        return f"--eval-dataset {cfg.eval_dataset!r}: choose one of {', '.join(DATASETS)}"
    if cfg.eval_every and not cfg.train_file and cfg.eval_dataset == cfg.dataset:
        return f"--eval-dataset {cfg.eval_dataset} is also the training --dataset: held-out means not trained on"
    return ""


def check_out(cfg: Config) -> None:
    """Finished work is never lost: an --out holding a run is continued only with --resume, replaced only with
    --overwrite (which deletes it here, checkpoint included, so a later --resume cannot pick up the old run)."""
    out = check_out_dir(cfg.out, create=False)
    held = sorted(p.name for p in out.iterdir() if p.name != "config.json") if out.is_dir() else []
    if not held or cfg.resume:
        return
    if not cfg.overwrite:
        raise DataError(f"{out} holds a training run ({', '.join(held[:6])}): continue it with --resume, use a new "
                        "--out, or pass --overwrite to delete it and start afresh")
    for name in held:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print(f"--overwrite: deleted {', '.join(held)} from {out}")


def explicit_flags(argv: list[str] | None) -> set[str]:
    """The Config fields set on the command line (argparse's unique-prefix abbreviations included), which the memory
    plan must not change."""
    flags = {"--" + f.name.replace("_", "-"): f.name for f in fields(Config)}
    given = set()
    for token in sys.argv[1:] if argv is None else argv:
        name = token.split("=", 1)[0]
        matches = [flags[name]] if name in flags else [v for k, v in flags.items() if k.startswith(name)]
        if token.startswith("--") and len(matches) == 1:
            given |= set(matches)
    return given


def plan_memory(cfg: Config, explicit: set[str] | None) -> None:
    """Print the memory plan and fill in what the user left to it (memory.py), before any weight is loaded.
    `explicit` None (train() called from code): the fields that differ from their defaults count as given."""
    import memory
    from backend import SMOLLM2, smollm2_dir

    if explicit is None:
        explicit = {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default}
    try:
        config = memory.published_config(str(smollm2_dir()) if cfg.model == SMOLLM2 else cfg.model)
    except (OSError, ValueError) as e:
        print(f"memory plan: skipped, cannot read the model's config ({str(e).splitlines()[0][:200]})")
        return
    memory.plan_run(cfg, explicit, config, torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------------------------------
# the task: what a prompt looks like and how a completion is scored


class Task(NamedTuple):
    """What differs between REARANK and Rank-R1: the training sets, the prompt, and the reward. The loop is shared."""

    augment: Callable[[Dataset, Config], tuple[list[TrainInstance], AugmentStats]]
    prompt: Callable[[TrainInstance], list[dict]]
    reward: Callable[[str, TrainInstance], Reward]


TASKS = {
    "listwise": Task(
        augment=lambda ds, cfg: augment(ds, cfg.samples, cfg.size, cfg.seed, cfg.min_ndcg),
        prompt=lambda inst, style="rearank": build_prompt(inst.query, [c.text for c in inst.candidates], style),
        reward=lambda text, inst, variant="normalised", list_format=False: rerank_reward(
            text, [c.docid for c in inst.candidates], inst.judged, variant=variant, list_format=list_format),
    ),
    "setwise": Task(
        augment=lambda ds, cfg: augment_setwise(ds, cfg.samples, cfg.size, cfg.seed),
        prompt=lambda inst: build_setwise_prompt(inst.query, [c.text for c in inst.candidates]),
        reward=lambda text, inst: setwise_set_reward(text, [c.docid for c in inst.candidates], inst.judged),
    ),
}


def configured_task(cfg: Config) -> Task:
    """TASKS[cfg.method] with the listwise prompt style and reward settings of `cfg` bound in (setwise has one of
    each). Only settings that differ from the defaults are bound, so a task's functions with the plain (inst) and
    (text, inst) signatures, as tests swap in, serve a default run unchanged."""
    task = TASKS[cfg.method]
    if cfg.method != "listwise":
        return task
    style = {"style": cfg.prompt} if cfg.prompt != "rearank" else {}
    scoring = {k: v for k, v in (("variant", cfg.rank_reward), ("list_format", cfg.list_format))
               if v != {"variant": "normalised", "list_format": False}[k]}
    return task._replace(prompt=functools.partial(task.prompt, **style),
                         reward=functools.partial(task.reward, **scoring))


# ----------------------------------------------------------------------------------------------------------------------
# the maths: pure functions on tensors (tests/test_grpo.py)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Per-group advantages for rewards laid out group after group, (B*G,) -> (B*G,).

    (r - mean) / (std + eps) within each group (unbiased std, as TRL); with scale=False just r - mean (Dr. GRPO).
    A group whose rewards are all equal gets zero advantages: it teaches nothing.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, scale=False)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    n_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective as a loss: -[min(rho A, clip(rho, 1-eps, 1+eps) A) - beta KL_k3], summed over the unmasked
    tokens and divided by `n_tokens` (the token count of the whole batch; default: of this one).

    logp, old_logp, ref_logp, mask: (N, C); advantages: (N,). old_logp None = one update per batch (rho == 1).
    Returns the loss and token means of the KL, of the ratio and of the clipped fraction (tokens whose gradient the
    clip removed: rho > 1+eps with A > 0, or rho < 1-eps with A < 0, as TRL counts them).
    """
    mask = mask.float()
    n_tokens = n_tokens or int(mask.sum().clamp(min=1))
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)  # (N, C)
    adv = advantages[:, None]  # (N, 1)
    objective = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (N, C)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # k3: pi_ref/pi - log(pi_ref/pi) - 1 >= 0
    per_token = -(objective - beta * kl)
    loss = (per_token * mask).sum() / n_tokens
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    denom = mask.sum().clamp(min=1)
    stats = {
        "kl": float((kl.detach() * mask).sum() / denom),
        "ratio": float((ratio.detach() * mask).sum() / denom),
        "clip_frac": float((clipped.float() * mask).sum() / denom),
    }
    return loss, stats


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The training instances of `step`: a fresh permutation every epoch, a function of (step, seed) only, so a
    resumed run reads exactly the data an uninterrupted one would.

    >>> batch_indices(0, 3, 4, seed=0) + batch_indices(1, 3, 4, seed=0) == batch_indices(0, 6, 4, seed=0)
    True
    """
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        out.append(np.random.default_rng([seed, epoch]).permutation(n)[pos])
    return [int(i) for i in out]


# ----------------------------------------------------------------------------------------------------------------------
# rollouts and held-out evaluation share one path: prompts -> generate_tokens -> rewards


@dataclass
class Rollout:
    prompts: list[torch.Tensor]  # (B,) unpadded prompt ids (P_b,); completions b*G .. b*G+G-1 continue prompt b
    completion_ids: torch.Tensor  # (B*G, C), padded after each completion's stop
    completion_mask: torch.Tensor  # (B*G, C)
    texts: list[str]  # (B*G,)
    rewards: list[Reward]  # (B*G,)
    truncated: list[bool]  # (B*G,) cut by max_new_tokens before the answer closed

    @property
    def group_size(self) -> int:
        return len(self.texts) // len(self.prompts)

    def group(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]:
        """Group b: its prompt (P,), completions (G, C_b) and mask (G, C_b) cut to its longest completion, its rows."""
        rows = slice(b * self.group_size, (b + 1) * self.group_size)
        mask = self.completion_mask[rows]
        length = max(1, int(mask.sum(dim=1).max()))
        return self.prompts[b], self.completion_ids[rows, :length], mask[:, :length], rows


def rollout(model, tokenizer, task: Task, batch: Sequence[TrainInstance], group_size: int, *, max_new_tokens: int,
            temperature: float = 1.0, greedy: bool = False, shared_prompt: bool = True) -> Rollout:
    model.eval()  # no dropout while sampling; generate uses the KV cache
    gen = generate_tokens(
        model, tokenizer, [task.prompt(inst) for inst in batch], max_new_tokens=max_new_tokens,
        do_sample=not greedy, temperature=temperature, num_return_sequences=group_size, shared_prompt=shared_prompt,
    )
    owners = [inst for inst in batch for _ in range(group_size)]  # rows b*G .. b*G+G-1 answer prompt b
    rewards = [task.reward(text, inst) for text, inst in zip(gen.texts, owners)]
    eos = {tokenizer.eos_token_id} | set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    lengths = gen.completion_mask.sum(dim=1).tolist()
    last = [int(gen.completion_ids[i, n - 1]) if n else -1 for i, n in enumerate(lengths)]
    truncated = [ANSWER_END not in t and tok not in eos for t, tok in zip(gen.texts, last)]
    prompts = unpadded(gen.prompt_ids, gen.prompt_mask)
    return Rollout(prompts, gen.completion_ids, gen.completion_mask, gen.texts, rewards, truncated)


def group_logprobs(model, ro: Rollout, cfg: Config) -> list[torch.Tensor]:
    """Log-probs of each group's completions, (G, C_b) per group, under `model` (no grad: old policy, reference)."""
    out = []
    for b in range(len(ro.prompts)):
        prompt, ids, mask, _ = ro.group(b)
        out.append(completion_logprobs(model, prompt, ids, mask, cfg.temperature, shared=not cfg.repeat_prompt,
                                       micro_batch=cfg.micro_batch or None, logits_chunk=cfg.logits_chunk))
    return out


def policy_backward(model, ro: Rollout, adv: torch.Tensor, old_logp: list | None, ref_logp: list | None,
                    cfg: Config, n_tokens: float | None = None) -> tuple[float, dict[str, float]]:
    """One backward of the GRPO loss over the whole rollout batch, group by group and micro-batch by micro-batch.

    Every micro-batch's loss is divided by the token count of the whole batch (DAPO), so the gradients add up to
    those of one loss over the batch. Returns the loss and the token means of grpo_loss's statistics.
    With several processes `n_tokens` is the count over all of them: each returns its share of the global loss and
    of the means, and the shares sum to them (`dist.all_reduce_sum`, `dist.all_reduce_grads`).
    """
    n_tokens = n_tokens or int(ro.completion_mask.sum().clamp(min=1))
    total, sums = 0.0, {"kl": 0.0, "ratio": 0.0, "clip_frac": 0.0}
    for b in range(len(ro.prompts)):
        prompt, ids, mask, rows = ro.group(b)

        def loss_fn(logp: torch.Tensor, sub: slice) -> torch.Tensor:  # sub: rows within the group
            old = None if old_logp is None else old_logp[b][sub]
            ref = None if ref_logp is None else ref_logp[b][sub]
            loss, stats = grpo_loss(logp, old, ref, adv[rows][sub], mask[sub], cfg.clip_eps, cfg.beta, n_tokens)
            for k in sums:  # token-weighted, so the means are over the batch's tokens
                sums[k] += stats[k] * float(mask[sub].sum())
            return loss

        # the backward runs inside (loss.backward()): Accelerate's backward adds nothing on one device with bf16
        total += group_backward(model, prompt, ids, mask, loss_fn, cfg.temperature, cfg.micro_batch or None,
                                shared=not cfg.repeat_prompt, logits_chunk=cfg.logits_chunk)
    return total, {k: v / n_tokens for k, v in sums.items()}


def held_out(cfg: Config) -> list[TrainInstance]:
    """The top-`eval_size` candidates of each judged query of the held-out set, in first-stage order."""
    ds = load_dataset(cfg.eval_dataset, cfg.data_dir or None)
    judged = [r for r in ds.rankings if ds.qrels.get(r.query.qid)]
    if cfg.eval_qids:
        wanted = read_qids(cfg.eval_qids)
        judged = [r for r in judged if r.query.qid in wanted]
        if missing := wanted - {r.query.qid for r in judged}:
            raise DataError(f"--eval-qids: {len(missing)} not judged queries of {cfg.eval_dataset}: "
                            f"{sorted(missing)[:5]}")
    if cfg.eval_queries:
        judged = judged[: cfg.eval_queries]
    return [make_instance(r.query, r.candidates[: cfg.eval_size], ds.qrels[r.query.qid]) for r in judged]


def read_qids(spec: str) -> set[str]:
    """Qids from a comma-separated list or from a file with one qid a line (blank lines skipped)."""
    path = Path(spec)
    text = path.read_text() if path.is_file() else spec.replace(",", "\n")
    return {line.strip() for line in text.splitlines() if line.strip()}


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, instances: list[TrainInstance], cfg: Config,
             gather: Callable[[list], list] = lambda xs: xs) -> dict[str, float]:
    """Greedy completions for the held-out windows: mean reward (and parts) and nDCG@10 of the reordered windows.

    With several processes each passes its block of the windows and `gather` (dist.gather_lists) joins the blocks."""
    from tqdm import tqdm

    rewards, ndcg, base = [], [], []
    for i in tqdm(range(0, len(instances), cfg.eval_batch_size), desc="held-out", unit="batch", leave=False):
        chunk = instances[i : i + cfg.eval_batch_size]
        ro = rollout(model, tokenizer, task, chunk, 1, max_new_tokens=cfg.max_new_tokens, greedy=True)
        rewards += ro.rewards
        ndcg += [r.ndcg for r in ro.rewards]
        base += [inst.r_init for inst in chunk]
    rewards, ndcg, base = gather(rewards), gather(ndcg), gather(base)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return {
        "reward": mean([r.total for r in rewards]),
        "rank": mean([r.rank for r in rewards]),
        "format1": mean([r.format1 for r in rewards]),
        "format2": mean([r.format2 for r in rewards]),
        "ndcg@10": mean(ndcg),
        "ndcg@10_first_stage": mean(base),
        "queries": len(base),
    }


# ----------------------------------------------------------------------------------------------------------------------
# model, optimizer, checkpoints


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up or down at random with probability proportional to closeness, so
    the rounding is unbiased and updates far below bf16's spacing still add up (Gupta et al., 2015).

    bf16 is the top half of fp32: add uniform noise to the 16 bits that get cut, then cut them (sign-magnitude, so this
    rounds away from zero with the right probability for negative numbers too).
    """
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # the low 16 bits are 0: the cast to bf16 is exact


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: moments stored in bf16, the step computed in fp32; weights and moments are written back
    with stochastic rounding. 8 bytes a parameter (weight, grad, two moments), against 10 for fp32 master weights with
    8-bit Adam.

    The moments need the stochastic rounding too: v's 0.1 % decay a step (beta2 = 0.999) is below half a bf16
    spacing (0.39 %), so round-to-nearest leaves v where it was and it stops tracking g^2 (0.25 of the truth after
    3,000 steps of a constant gradient, issue 10); rounded at random, v decays right on average."""

    CHUNK = 1 << 24  # elements per fp32 temporary: a 545M-parameter embedding must not need 4 fp32 copies at once

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                c1, c2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                views = (t.view(-1).split(self.CHUNK) for t in (p, p.grad, state["m"], state["v"]))
                for w, g, m, v in zip(*views):
                    g = g.float()
                    m32 = m.float().mul_(b1).add_(g, alpha=1 - b1)
                    v32 = v.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    stochastic_round_(m, m32)
                    stochastic_round_(v, v32)
                    update = (m32 / c1) / ((v32 / c2).sqrt() + group["eps"])
                    stochastic_round_(w, w.float() * (1 - lr * group["weight_decay"]) - lr * update)


def make_optimizer(model, cfg: Config):
    """BF16AdamW with --bf16-weights; else bitsandbytes 8-bit AdamW on CUDA (2 bytes of state a parameter, not 8),
    torch AdamW on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.bf16_weights:
        return BF16AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def reference_placement(choice: str, cuda: bool, ref_bytes: int, device_bytes: int) -> str:
    """Where the frozen reference of the KL term lives: "resident" (on the device, beside the policy) or "offload"
    (in CPU memory, on the device only for its one no-grad pass a step).

    With --memory auto the plan (memory.py) has already replaced "auto" by its choice. Left "auto" (--memory off, or
    no plan): resident on CPU (there is nowhere else to put it) and on a GPU when it takes at most a tenth of the
    device's memory; offloaded otherwise (a bf16 7B reference is 15.2 GB, a fifth of an 80 GB GPU).

    >>> reference_placement("auto", cuda=True, ref_bytes=15_200_000_000, device_bytes=80_000_000_000)
    'offload'
    >>> reference_placement("auto", cuda=False, ref_bytes=15_200_000_000, device_bytes=0)
    'resident'
    """
    if choice != "auto":
        return choice
    return "resident" if not cuda or ref_bytes <= device_bytes / 10 else "offload"


def frozen_copy(model, device, dtype: torch.dtype):
    """A no-grad copy of `model` with its floating-point tensors in `dtype` on `device`, made tensor by tensor, so
    no second full copy ever sits on the model's own device (deepcopy would first clone a 7B model on the GPU).
    Tied weights stay tied: deepcopy's memo maps each original tensor to its one copy."""
    memo: dict = {}
    for t in [*model.parameters(), *model.buffers()]:
        c = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = torch.nn.Parameter(c, requires_grad=False) if isinstance(t, torch.nn.Parameter) else c
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


class Reference:
    """The frozen reference policy pi_ref of the KL penalty: the initial weights, bf16 on CUDA (fp32 on CPU).

    Resident, it stays on the device. Offloaded, it lives in CPU memory and is brought to the device only for its
    no-grad pass, once a step, then sent back (as nano-aha-moment does): it costs no second resident copy, only the
    transfer (15.2 GB each way for 7B). Either way the log-probs are the same numbers (tests/test_grpo.py).
    """

    def __init__(self, model, device, placement: str):
        assert placement in ("resident", "offload"), placement
        self.device, self.placement = torch.device(device), placement
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # it never trains: bf16 is enough
        self.model = frozen_copy(model, self.device if placement == "resident" else "cpu", dtype)

    @torch.no_grad()
    def logprobs(self, ro: Rollout, cfg: Config) -> list[torch.Tensor]:
        if self.placement == "offload":
            self.model.to(self.device)
        try:
            return group_logprobs(self.model, ro, cfg)
        finally:
            if self.placement == "offload":
                self.model.to("cpu")


def make_reference(model, cfg: Config) -> Reference:
    """The reference for --beta > 0, placed as --reference says (printed: it decides a GPU's memory)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ref_bytes = sum(p.numel() for p in model.parameters()) * (2 if cuda else 4)
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    placement = reference_placement(cfg.reference, cuda, ref_bytes, total)
    print(f"reference: {placement} ({ref_bytes / 1e9:.2f} GB; --reference {cfg.reference})")
    return Reference(model, device, placement)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weight_sample(params: list[torch.Tensor], per_tensor: int = 1024) -> list[torch.Tensor]:
    """Up to `per_tensor` evenly spaced entries of each tensor, copied to the CPU: enough to see whether the weights
    move, at a few MB for a 7B model (a copy of every 10th tensor took 5.4 GB of GPU memory, issue 10)."""
    out = []
    for p in params:
        flat = p.detach().reshape(-1)
        out.append(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].to("cpu", copy=True))
    return out


def moved_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum(int((a != b).sum()) for a, b in zip(after, before))
    return changed / sum(b.numel() for b in before)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints (resume) and the exported model (eval.py --model <out>/model), both written beside the old, then renamed

CHECKPOINT_FORMAT = "rearank-grpo-checkpoint/1"  # state.json says which layout it is; anything else is refused


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder `tmp` at `dest` without ever leaving `dest` half-written.

    A folder cannot be renamed over a non-empty one, so the previous `dest` moves aside to `dest.old` first and is
    deleted only once the new one is in place. A crash between the two renames leaves `dest.old` and no `dest`:
    `find_checkpoint` falls back to it.
    """
    for f in tmp.iterdir():  # the data must be on disk before the rename makes it the checkpoint
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)  # a stale one: dest is newer and complete
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def fresh_dir(dest: Path) -> Path:
    """An empty `dest.tmp` to write a new `dest` into (what a crash left there is thrown away)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def find_checkpoint(out: Path) -> Path:
    """<out>/checkpoint, or <out>/checkpoint.old when a crash came between replace_dir's two renames."""
    ckpt = out / "checkpoint"
    if ckpt.is_dir() or not (out / "checkpoint.old").is_dir():
        return ckpt
    return out / "checkpoint.old"


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict without tied copies (safetensors stores a shared tensor once), and {alias: name kept}.

    >>> w = torch.ones(2)
    >>> unique_tensors({"embed": w, "lm_head": w, "norm": torch.zeros(2)})[1]
    {'lm_head': 'embed'}
    """
    kept, tied, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key], kept[name] = name, t.detach().contiguous()
    return kept, tied


def optimizer_to_data(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() split into its tensors ("param.name" -> tensor, for safetensors) and plain data (the
    numbers of each parameter's state and the param groups, for JSON): nothing in it needs a pickle.

    >>> t, d = optimizer_to_data({"state": {0: {"step": 3, "m": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]})
    >>> list(t), d
    (['0.m'], {'numbers': {'0': {'step': 3}}, 'param_groups': [{'lr': 0.1}]})
    """
    tensors, numbers = {}, {}
    for i, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{i}.{name}"] = value.detach().contiguous()
            else:
                numbers.setdefault(str(i), {})[name] = value
    return tensors, {"numbers": numbers, "param_groups": state["param_groups"]}


def optimizer_from_data(tensors: dict[str, torch.Tensor], data: dict) -> dict:
    """The inverse of optimizer_to_data: a state dict for optimizer.load_state_dict."""
    state: dict[int, dict] = {int(i): dict(v) for i, v in data["numbers"].items()}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = t
    return {"state": state, "param_groups": data["param_groups"]}


def rng_to_data(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """rng_state() as tensors (torch's and CUDA's generator states) and JSON data (python's and numpy's)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], **{f"cuda.{i}": s for i, s in enumerate(state.get("cuda", []))}}
    return tensors, {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def rng_from_data(tensors: dict[str, torch.Tensor], data: dict) -> dict:
    """The inverse of rng_to_data: a state for set_rng_state."""
    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    state = {"python": (version, tuple(internal), gauss),
             "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached), "torch": tensors["torch"]}
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state


def write_checkpoint(dest: Path, model, optimizer, step: int, rngs: list[dict], cfg: Config) -> None:
    """Everything the next step depends on, as data only (safetensors and JSON; nothing that runs code when read):

        model.safetensors      the weights in their training dtype (tied weights once; state.json lists the aliases)
        optimizer.safetensors  the optimizer's tensors (moments, AdamW's step counts)
        rng.safetensors        torch's (and CUDA's) generator states (rng.rank{r}.safetensors: process r's, when
                               several processes trained; `rngs` holds one state per process)
        state.json             the step (it fixes the data position, see batch_indices), python's and numpy's
                               generator states, the optimizer's numbers and param groups, the config

    Written into dest.tmp, then renamed into place (replace_dir): a crash never touches the previous checkpoint.
    """
    from safetensors.torch import save_file

    tmp = fresh_dir(dest)
    weights, tied = unique_tensors(model.state_dict())
    save_file(weights, tmp / "model.safetensors")
    del weights
    opt_tensors, opt_data = optimizer_to_data(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    del opt_tensors
    rng_data = []
    for r, rng in enumerate(rngs):
        rng_tensors, data = rng_to_data(rng)
        save_file(rng_tensors, tmp / ("rng.safetensors" if r == 0 else f"rng.rank{r}.safetensors"))
        rng_data.append(data)
    state = {"format": CHECKPOINT_FORMAT, "step": step, "data_position": step * cfg.batch_size, "tied": tied,
             "rng": rng_data[0], "optimizer": opt_data, "config": asdict(cfg)}
    if len(rng_data) > 1:
        state["rng_ranks"] = rng_data[1:]
    (tmp / "state.json").write_text(json.dumps(state))
    replace_dir(tmp, dest)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file into CPU memory, or a DataError naming the file (missing, truncated, not safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"{path}: missing: the checkpoint is incomplete; start without --resume")
    try:
        return load_file(path, device="cpu")  # on the CPU first: a GPU run must not hold a second copy there
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e}); the file is damaged or not a checkpoint "
                        "of grpo.py: start without --resume") from None


def read_state(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing: the checkpoint is incomplete; start without --resume")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not JSON ({e}); the file is damaged: start without --resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a grpo.py checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return state


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, list[dict]]:
    """Restore weights and optimizer state from a folder written by write_checkpoint; returns (step, the RNG state of
    each process that wrote it).

    Reads data only. Every file is checked before the model is touched: a truncated file, another model's weights
    (other names, shapes or dtypes) or another optimizer's state is a DataError naming the file. The files are only
    read, never changed, so a refused checkpoint stays as it was.
    """
    state = read_state(folder / "state.json")
    path = folder / "model.safetensors"
    weights = read_tensors(path)
    for alias, name in state["tied"].items():
        if name in weights:
            weights[alias] = weights[name]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    differ = [k for k in expected if k in weights
              and (weights[k].shape != expected[k].shape or weights[k].dtype != expected[k].dtype)]
    if missing or unexpected or differ:
        raise DataError(f"{path}: the weights of another model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                        f"other shape or dtype {differ[:3]}): resume with the --model and dtype flags of that run")
    path = folder / "optimizer.safetensors"
    opt_state = optimizer_from_data(read_tensors(path), state["optimizer"])
    rng_tensors = [read_tensors(folder / "rng.safetensors")]
    rng_tensors += [read_tensors(folder / f"rng.rank{r}.safetensors") for r in range(1, 1 + len(state.get("rng_ranks", [])))]
    model.load_state_dict(weights)
    del weights, expected  # the loaded copy is freed at once, not held for the whole run
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"{path}: not this run's optimizer state ({e}): resume with the flags of that run") from None
    del opt_state
    datas = [state["rng"]] + state.get("rng_ranks", [])
    return state["step"], [rng_from_data(t, d) for t, d in zip(rng_tensors, datas)]


def export_dtype(weights: torch.dtype, cuda: bool) -> torch.dtype:
    """The dtype of <out>/model: bf16 on CUDA, the dtype backend.load_model serves in there (half the bytes of fp32
    master weights); on CPU the training weights' own dtype, so the export reloads to exactly the policy's numbers.

    >>> export_dtype(torch.float32, cuda=True), export_dtype(torch.float32, cuda=False)
    (torch.bfloat16, torch.float32)
    """
    return torch.bfloat16 if cuda else weights


def greedy_generation_config(model, tokenizer):
    """generation_config.json for the export: greedy, the stop ids, and no sampling or penalty knob at all.

    The base model's file may carry some (Qwen2.5: repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7);
    generate_tokens sets every knob itself, but other HF tools read the file, and those would bend greedy decoding.
    """
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, bos_token_id=model.generation_config.bos_token_id,
                            eos_token_id=model.generation_config.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def model_card(cfg: Config, step: int, dtype: torch.dtype, held: dict | None) -> str:
    """README.md of the export: where it came from and how it did last on the held-out set."""
    if held:
        figures = (f"step {held['step']}, {cfg.eval_dataset} top-{cfg.eval_size} windows of {held['queries']} "
                   f"queries, greedy, {cfg.max_new_tokens} new tokens: reward {held['reward']:.4f}, nDCG@10 "
                   f"{held['ndcg@10']:.4f} (first stage {held['ndcg@10_first_stage']:.4f}), format1 "
                   f"{held['format1']:.2f}, format2 {held['format2']:.2f}")
    else:
        figures = "none yet (--eval-every 0, or no evaluation has run)"
    return (
        f"# REARANK {cfg.method} reranker trained with GRPO (grpo.py)\n\n"
        f"- base model: `{cfg.model}`\n"
        f"- step: {step} of {cfg.steps} (batch {cfg.batch_size} prompts x {cfg.group_size} samples, lr {cfg.lr:g}, "
        f"beta {cfg.beta:g})\n"
        f"- weights: {str(dtype).removeprefix('torch.')} safetensors\n"
        f"- last held-out evaluation: {figures}\n\n"
        f"Use: `python eval.py --dataset dl19 --model <this folder>`. `generation_config.json` is greedy with no "
        f"sampling or penalty settings.\n\n"
        f"## Config\n\n```json\n{json.dumps(asdict(cfg), indent=1)}\n```\n"
    )


def export_model(dest: Path, model, tokenizer, cfg: Config, step: int, held: dict | None = None) -> None:
    """<out>/model/: the policy as a Hugging Face checkpoint (`save_pretrained` safetensors, config, tokenizer with
    its chat template, a greedy generation_config.json, a model card), in export_dtype. Written into dest.tmp, then
    renamed into place: a crash never leaves half a model."""
    param = next(model.parameters())
    dtype = export_dtype(param.dtype, param.is_cuda)
    tmp = fresh_dir(dest)
    cast: dict = {}  # one CPU copy per tensor, tied weights sharing theirs (save_pretrained then stores them once)
    weights = {k: cast.setdefault((v.data_ptr(), tuple(v.shape)), v.detach().to("cpu", dtype))
               for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=weights)
    del weights, cast
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained writes the in-memory model's dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    greedy_generation_config(model, tokenizer).save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(cfg, step, dtype, held))
    replace_dir(tmp, dest)


def update_model_card(folder: Path, cfg: Config, step: int) -> None:
    """Rewrite the export's README.md (atomically) so it quotes the last held-out evaluation."""
    dtype = getattr(torch, json.loads((folder / "config.json").read_text())["dtype"])
    held = read_jsonl(folder.parent / "eval.jsonl")
    tmp = folder / "README.md.tmp"
    tmp.write_text(model_card(cfg, step, dtype, held[-1] if held else None))
    tmp.replace(folder / "README.md")


def check_checkpoint(out: Path, ckpt: Path) -> None:
    """--resume needs a checkpoint folder; a pickled checkpoint.pt of an older grpo.py is never unpickled."""
    if ckpt.is_dir():
        return
    legacy = out / "checkpoint.pt"
    if legacy.exists():
        raise DataError(f"{legacy}: a pickled checkpoint of an older grpo.py: not loaded, since unpickling can run "
                        "any code; start without --resume")
    raise DataError(f"--resume: {ckpt} not found; start without --resume")


def save_checkpoint(out: Path, model, tokenizer, optimizer, step: int, rngs: list[dict], cfg: Config) -> None:
    """<out>/checkpoint/ (what --resume reads) and <out>/model/ (the trained reranker, for eval.py and HF tools)."""
    write_checkpoint(out / "checkpoint", model, optimizer, step, rngs, cfg)
    held = read_jsonl(out / "eval.jsonl")
    export_model(out / "model", model, tokenizer, cfg, step, held[-1] if held else None)


# ----------------------------------------------------------------------------------------------------------------------
# logging and the plot


def log_line(m: dict) -> str:
    return (
        f"step {m['step']}/{m['steps']} | reward {m['reward']:.3f}±{m['reward_std']:.3f} "
        f"(rank {m['rank']:+.3f} f1 {m['format1']:.2f} f2 {m['format2']:.2f}) | zero-std {m['frac_zero_std']:.2f} | "
        f"len {m['completion_len']:.0f} trunc {m['frac_truncated']:.2f} | kl {m['kl']:.3g} clip {m['clip_frac']:.3f} | "
        f"gnorm {m['grad_norm']:.3f} lr {m['lr']:.1e} | gen {m['gen_s']:.0f}s train {m['train_s']:.0f}s "
        f"(ref {m.get('ref_s', 0.0):.1f}s)"
    )


def read_jsonl(path: Path) -> list[dict]:
    """The records of a log file; a half-written last line (the run was killed mid-write) is dropped, a damaged line
    before it is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno < len(lines) and line.strip():
                raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg}); use a new --out") from None
    return records


def moving_average(ys: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start), so the curve starts at the first step.

    >>> moving_average([1.0, 3.0, 5.0, 7.0], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(out: Path) -> Path:
    """curves.png: the training reward (per step, faint, and its moving average), the reward's terms (smoothed), the
    held-out nDCG@10 against the untrained model's (the step-0 evaluation) and the first stage's, and the KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, held = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval.jsonl")
    if not train:
        raise DataError(f"{out / 'metrics.jsonl'}: no steps to plot")
    steps = [m["step"] for m in train]
    window = max(3, len(train) // 10)
    smooth = lambda key: moving_average([m[key] for m in train], window)  # noqa: E731
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    ax = axes[0]
    ax.plot(steps, [m["reward"] for m in train], lw=0.8, alpha=0.35, color="C0", label="per step")
    ax.plot(steps, smooth("reward"), lw=2, color="C0", label=f"moving average ({window} steps)")
    ax.set_title("training reward")
    ax = axes[1]
    for key in ("rank", "format1", "format2", "frac_zero_std"):
        ax.plot(steps, smooth(key), lw=1.5, label=key)
    ax.set_title(f"reward terms, zero-std groups ({window}-step average)")
    ax = axes[2]
    ax.set_title("held-out nDCG@10 (greedy)")
    if held:
        hs = [h["step"] for h in held]
        ax.plot(hs, [h["ndcg@10"] for h in held], marker="o", lw=1.5, label="policy")
        if held[0]["step"] == 0:
            ax.axhline(held[0]["ndcg@10"], ls="--", color="gray", label="untrained (step 0)")
        ax.plot(hs, [h["ndcg@10_first_stage"] for h in held], ls=":", color="k", label="first-stage order")
    ax = axes[3]
    ax.plot(steps, [m["kl"] for m in train], lw=0.8, alpha=0.35, color="C3")
    ax.plot(steps, smooth("kl"), lw=2, color="C3")
    ax.set_title("KL to the reference (k3, token mean)" + ("" if any(m["kl"] for m in train) else ": 0, beta = 0"))
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return out / "curves.png"


# ----------------------------------------------------------------------------------------------------------------------
# several processes (torchrun / accelerate launch): data parallel over whole groups; in one process all of it is inert


def quiet_unless_main(main: bool) -> None:
    """One log on stdout, the main process's: the others' prints go nowhere (errors still reach stderr)."""
    if not main:
        sys.stdout = open(os.devnull, "w")


def rank_rng(ranks: list[dict], rank: int, world: int) -> dict:
    """This process's RNG state from a checkpoint's (one per process that wrote it): its own when as many wrote it."""
    if len(ranks) != world:
        print(f"resume: the checkpoint holds the RNG states of {len(ranks)} process(es), this run has {world}: the "
              "data order is the same, the samples differ from an uninterrupted run")
        return ranks[0] if rank >= len(ranks) else ranks[rank]
    return ranks[rank]


class Seen(NamedTuple):
    """What the step's log reports, over every process's completions in global batch order."""

    rewards: list[Reward]
    lengths: list[int]
    truncated: list[bool]


def gather_rollouts(ro: Rollout) -> Seen:
    parts = dist.gather((ro.rewards, ro.completion_mask.sum(dim=1).tolist(), ro.truncated))
    return Seen(*([x for part in parts for x in part[i]] for i in range(3)))


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def gathered_params(accelerator, model):
    """Generation under FSDP: every process holds only a shard of each weight, so the weights are gathered whole
    for the rollout and sharded again after (FSDP2's unshard / reshard).

    Left sharded, generation would still be right (FSDP gathers each layer for its forward and frees it after), but
    then a 2,048-token completion gathers the whole model 2,048 times. Gathered once, it costs the memory of one
    unsharded bf16 copy on every GPU (15 GB for 7B) for the length of the rollout, and one all-gather of the model.
    Without FSDP this does nothing."""
    if not is_fsdp(accelerator):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ModelError("FSDP version 1 is not supported: set fsdp_version: 2 (see launch/fsdp-7b.yaml)")
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)  # or the first decoding step would shard them again
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def grad_sync(accelerator, model):
    """One gradient exchange per update, however many backward passes it takes.

    DDP all-reduces in the backward of every forward made through its wrapper, and `prefix.group_backward` makes
    several a step (one per micro-batch, then the shared prompt's), whose sum is the gradient. So the loop runs the
    bare module (which DDP's hooks ignore; `no_sync` says so outright) and the gradients are summed over the processes
    once after (`dist.all_reduce_grads`). Each process's loss is its share of the global loss (divided by the global
    token count), so the sum, not DDP's mean, is the gradient one process computes over the whole batch.
    FSDP reduce-scatters in every backward itself (its no_sync would keep whole unsharded gradients on every GPU) and
    averages over the processes: multiplying by their number makes that average the sum.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with accelerator.no_sync(model):
            yield
        dist.all_reduce_grads(model.parameters())
        return
    yield
    if is_fsdp(accelerator) and accelerator.num_processes > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(accelerator.num_processes)


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, explicit: set[str] | None = None) -> dict:
    """Run GRPO as `cfg` says; returns the last step's metrics (tests compare runs with them). `explicit`: the fields
    the user set (the memory plan keeps them); None: those that differ from the defaults."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    if dist.is_main() or not cfg.overwrite:  # only the main process deletes what --overwrite replaces
        check_out(cfg)  # before anything is written: never replace a run by mistake
    plan_memory(cfg, explicit)
    out = Path(cfg.out)
    cuda = torch.cuda.is_available()
    # bf16 autocast, weights keep their dtype; cpu=True on a machine without CUDA, else torchrun's ranks are ignored
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    main, world = accelerator.is_main_process, accelerator.num_processes
    if world > 1 and cfg.batch_size % world:
        raise DataError(f"--batch-size {cfg.batch_size} does not split over {world} processes: use a multiple of "
                        f"{world} (each process rolls out whole groups)")
    if is_fsdp(accelerator):  # launch/fsdp-7b.yaml: see README "More than one GPU"
        raise ModelError("FSDP training is not finished: a step's parts are written (gathered_params, grad_sync) but "
                         "sharded checkpoints are not, and it has never run on GPUs; use launch/ddp.yaml "
                         "(with --bf16-weights a 7B model fits 80 GB per GPU)")
    quiet_unless_main(main)
    if main:  # with several processes only the main one writes files (and prints)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    print(json.dumps(asdict(cfg), indent=1))
    # autocast caches a bf16 cast of every fp32 weight until its context ends (15 GB at 7B): worth it across the
    # rollout's decoding steps; in no-grad passes nothing needs the casts afterwards; in the backward without
    # checkpointing the graphs save the casts anyway (the cache makes the prompt's graph and each micro-batch's share
    # one copy), with checkpointing they are recomputed layer by layer, so a cache would only keep them all alive
    uncached = AutocastKwargs(cache_enabled=False)
    training_casts = AutocastKwargs(cache_enabled=not cfg.gradient_checkpointing)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # each process samples its own completions
    task = configured_task(cfg)

    # --- data
    if cfg.train_file:
        instances = read_instances(cfg.train_file)
    else:
        instances, st = task.augment(load_dataset(cfg.dataset, cfg.data_dir or None), cfg)
        print(f"data: {cfg.dataset}: {st.kept} {cfg.method} training sets of {cfg.size} "
              f"({st.no_relevant + st.below} dropped)")
    held = held_out(cfg) if cfg.eval_every else []

    # --- model: fp32 master weights (or bf16 ones with stochastic rounding), optimizer, optional frozen reference
    model, tokenizer = load_model(cfg.model)
    model.to(torch.bfloat16 if cfg.bf16_weights else torch.float32)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref = make_reference(model, cfg) if cfg.beta > 0 else None  # --beta 0: no reference is ever built
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    # generate() and the prefix-sharing passes (prefix.py reads model.config) run on the bare model; under DDP,
    # whose wrapper it bypasses, gradients are exchanged by `grad_sync` (the wrapper's part: equal initial weights)
    policy = accelerator.unwrap_model(model)

    start, ckpt = 0, find_checkpoint(out)
    if cfg.resume:
        check_checkpoint(out, ckpt)
        start, rngs = load_checkpoint(ckpt, policy, optimizer)
        set_rng_state(rank_rng(rngs, accelerator.process_index, world))
        for name, keep in (("metrics.jsonl", start), ("episodes.jsonl", start), ("eval.jsonl", start - 1)):
            kept = [m for m in read_jsonl(out / name) if m["step"] <= keep]  # forget what came after the checkpoint
            if main:
                (out / name).write_text("".join(json.dumps(m) + "\n" for m in kept))
        print(f"resumed from {ckpt} at step {start}")
    elif main:
        for name in ("metrics.jsonl", "eval.jsonl", "episodes.jsonl"):
            (out / name).unlink(missing_ok=True)

    def held_out_eval(step: int) -> None:
        mine = dist.shard(held, accelerator.process_index, world)  # each process greedily scores its block
        with accelerator.autocast(), gathered_params(accelerator, model):
            ev = {"step": step, **evaluate(policy, tokenizer, task, mine, cfg, gather=dist.gather_lists)}
        print(f"eval step {step} | reward {ev['reward']:.3f} | nDCG@10 {ev['ndcg@10']:.4f} "
              f"(first stage {ev['ndcg@10_first_stage']:.4f}) | f1 {ev['format1']:.2f} f2 {ev['format2']:.2f}")
        if main:
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(ev) + "\n")

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish this step, checkpoint, stop; second: stop now
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit without saving)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    metrics: dict = {}
    try:
        for step in range(start, cfg.steps):
            rng = rng_state()  # the state this step starts from: what a checkpoint taken now must restore

            # --- held-out evaluation (before the first step, every eval_every, and after the last one below)
            if cfg.eval_every and step % cfg.eval_every == 0:
                held_out_eval(step)
                set_rng_state(rng)  # evaluation is greedy, but keep sampling independent of whether it ran

            # --- rollout
            t0 = time.time()
            # the global batch is a function of (step, seed); each process takes its block of whole groups
            indices = batch_indices(step, cfg.batch_size, len(instances), cfg.seed)
            batch = [instances[i] for i in dist.shard(indices, accelerator.process_index, world)]
            with accelerator.autocast(), gathered_params(accelerator, model):
                ro = rollout(policy, tokenizer, task, batch, cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, shared_prompt=not cfg.repeat_prompt)
            gen_s = time.time() - t0

            # --- reward
            r = torch.tensor([x.total for x in ro.rewards])  # (B*G,) this process's groups

            # --- advantages (within each group, so they never need the other processes)
            adv = group_advantages(r, cfg.group_size, scale=not cfg.no_std).to(accelerator.device)  # (B*G,)
            seen = gather_rollouts(ro)  # what the log reports: every process's completions, in global order
            r_all = torch.tensor([x.total for x in seen.rewards])
            zero_std = (r_all.view(-1, cfg.group_size).std(dim=1) == 0).float().mean().item()

            # --- log-probs of the old policy and the reference (no grad; only when they differ from the policy)
            t1 = time.time()
            model.train()
            N = r_all.numel()
            old_logp = ref_logp = None
            ref_s = 0.0
            with torch.no_grad(), accelerator.autocast(uncached):
                if cfg.updates > 1:
                    old_logp = group_logprobs(policy, ro, cfg)
                if ref is not None:
                    t_ref = time.time()
                    ref_logp = ref.logprobs(ro, cfg)
                    ref_s = time.time() - t_ref

            # --- update: `updates` passes over the batch, each followed by an optimizer step
            first = step == start and not cfg.resume
            if first:  # prove the weights move at this lr (METHOD §5): a small sample of every tensor, on the CPU
                watched = [p for p in policy.parameters() if p.requires_grad]
                before = weight_sample(watched)
            losses, stats, grad_norm = [], {}, 0.0  # stats: of the last update (the first one's ratio is 1)
            n_tokens = max(dist.all_reduce_sum([float(ro.completion_mask.sum())])[0], 1.0)  # DAPO: the global count
            for _ in range(cfg.updates):
                with accelerator.autocast(training_casts), grad_sync(accelerator, model):
                    loss, stats = policy_backward(policy, ro, adv, old_logp, ref_logp, cfg, n_tokens)
                loss, *parts = dist.all_reduce_sum([loss, *stats.values()])  # the shares sum to the global values
                stats = dict(zip(stats, parts))
                losses.append(loss)
                # the norm before clipping; an infinite bound measures without clipping
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            train_s = time.time() - t1
            if first:
                moved = moved_fraction(before, weight_sample(watched))
                del before
                print(f"weights: {moved:.1%} of the watched parameters changed in the first step at lr {cfg.lr:g}")

            # --- log / checkpoint
            lengths = torch.tensor(seen.lengths, dtype=torch.float32)
            metrics = {
                "step": step + 1,
                "steps": cfg.steps,
                "reward": r_all.mean().item(),
                "reward_std": r_all.std().item() if N > 1 else 0.0,
                "rank": float(np.mean([x.rank for x in seen.rewards])),
                "format1": float(np.mean([x.format1 for x in seen.rewards])),
                "format2": float(np.mean([x.format2 for x in seen.rewards])),
                "ndcg@10": float(np.mean([x.ndcg for x in seen.rewards])),
                "frac_zero_std": zero_std,
                "completion_len": lengths.mean().item(),
                "frac_truncated": float(np.mean(seen.truncated)),
                "loss": float(np.mean(losses)),
                **stats,
                "grad_norm": grad_norm,
                "lr": optimizer.param_groups[0]["lr"],
                "gen_s": gen_s,
                "train_s": train_s,  # the reference pass included
                "ref_s": ref_s,
            }
            print(log_line(metrics), flush=True)
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if main and cfg.dump_every and (step + 1) % cfg.dump_every == 0:
                with open(out / "episodes.jsonl", "a") as f:
                    for g in range(cfg.group_size):  # the first group of the batch, in full
                        f.write(json.dumps({"step": step + 1, "qid": batch[0].qid, "query": batch[0].query,
                                            "completion": ro.texts[g], "reward": ro.rewards[g].asdict(),
                                            "advantage": adv[g].item()}) + "\n")
            last = step + 1 == cfg.steps
            stop["requested"] = dist.any_rank(stop["requested"])  # stop together, or the others wait forever
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last or stop["requested"]:
                rngs = dist.gather(rng_state())  # each process's sampling continues where it stopped
                if main:
                    save_checkpoint(out, policy, tokenizer, optimizer, step + 1, rngs, cfg)
            if stop["requested"] and not last:
                print(f"stopped after step {step + 1}; continue with --resume")
                break
        else:  # the final weights, unless already evaluated (resuming a finished run only evaluates it)
            if cfg.eval_every and not any(e["step"] == cfg.steps for e in read_jsonl(out / "eval.jsonl")):
                held_out_eval(cfg.steps)
                update_model_card(out / "model", cfg, cfg.steps)  # the card quotes the final evaluation
    finally:
        signal.signal(signal.SIGINT, previous)
    if main:
        plot(out)
    accelerator.wait_for_everyone()  # nobody leaves (and tears the group down) before the files are written
    return metrics


def main(argv: list[str] | None = None) -> None:
    cfg, only_plot = parse_args(argv)
    try:
        if only_plot:
            print(f"wrote {plot(Path(cfg.out))}")
            return
        train(cfg, explicit_flags(argv))
    except (DataError, ModelError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
