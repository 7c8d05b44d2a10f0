"""A hand-written GRPO loop that teaches an LLM to rerank with reasoning (REARANK; docs/method.md §3-§5).

    python grpo.py --model Qwen/Qwen2.5-7B-Instruct                         # the paper's recipe, one GPU
    python grpo.py --model smollm2 --dataset dl21 --steps 40 --size 5       # the embedded model on CPU
    python grpo.py --out runs/grpo --resume                                 # continue from the last checkpoint
    python eval.py --dataset dl19 --model runs/grpo/model                   # evaluate what it trained
    python grpo.py --out runs/grpo --plot                                   # redraw the curves of a run
    accelerate launch --config_file launch/ddp.yaml grpo.py ...             # data parallel on several GPUs
    python grpo.py --model Qwen/Qwen2.5-7B-Instruct --lora-rank 16 --lr 1e-5  # LoRA (Rank-R1): one 24-48 GB GPU

One step (`train`): B training instances -> G sampled completions each (`rollout`) -> the REARANK reward -> advantages
within each group -> the clipped policy-gradient loss and its backward (`policy_backward`) -> one optimizer step.
A group's prompt runs once, not G times (support/prompt_once.py); `--repeat-prompt` repeats it, as TRL and verl do.
Where it departs from vanilla GRPO (DeepSeekMath, arXiv 2402.03300), each said at its line: the loss is a token mean
over the whole batch (DAPO); `--no-std` (Dr. GRPO); a k3 KL to a frozen reference; the ratio is 1 with one update;
tokens after `</answer>` are masked; `--bf16-weights` rounds stochastically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from data import (
    FIRST_STAGE_ORDERS, AugmentStats, DataError, Dataset, TrainInstance, augment,
    augment_setwise, batch_indices, first_stage, load_dataset, make_instance, read_instances,
)
from rearank import ANSWER_END, MAX_CHARS, build_prompt
from reward import RANK_REWARDS, Reward, rerank_reward, setwise_set_reward
from setwise import build_setwise_prompt
from support import dist, lora
from support.backend import ModelError, cast_model, eos_ids, generate_tokens, load_model
from support.checkpoint import (
    CtrlC, check_out, check_resume_config, resume, rng_state, save_checkpoint, set_rng_state, update_model_card,
)
from support.cli import arg, dataclass_parser, explicit_flags, nonneg_float, nonneg_int, positive_float, positive_int
from support.files import read_qids
from support.grpo_checks import config_problem
from support.memory import plan_memory
from support.model_shape import LORA_TARGETS
from support.optimizer import make_optimizer, moved_fraction, weight_sample
from support.prompt_once import completion_logprobs, micro_batches, prompt_pass, unpadded
from support.reference import REFERENCE_PLACEMENTS, make_reference
from support.runlog import append_jsonl, episodes, log_line, plot, read_jsonl, rewind_logs, step_record

# ----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    model: str = arg("smollm2", "'smollm2' (the embedded SmolLM2-135M-Instruct), a local checkpoint directory, or a "
                                "hub id")
    method: str = arg("listwise", "listwise (REARANK: reorder the set) or setwise (Rank-R1: name the most relevant "
                                  "passage)", choices=("listwise", "setwise"))
    prompt: str = arg("rearank", "listwise prompt, for training and held-out evaluation alike: rearank (reasoning "
                                 "in <think>, the list in <answer>) or rankgpt (the list alone; the format terms then "
                                 "never fire unless --list-format)", choices=tuple(MAX_CHARS))
    answer_start: str = arg("", "a departure, empty by default: open each answer with this text for the model to "
                                "continue (e.g. '[' for a small model that writes prose where a list is asked for), in "
                                "training and held-out evaluation alike; it is read as part of the answer, and its "
                                "tokens belong to the prompt (no gradient)")
    list_format: bool = arg(False, "a departure, off by default: format2 pays only for an answer that opens with a "
                                   "complete permutation of the window's ids '[3] > [1] > [2]' (tags not needed), so "
                                   "the RankGPT prompt gets a format term too and copying the prompt's example "
                                   "'[1] > [2]' earns nothing")
    rank_reward: str = arg("normalised", "listwise rank term: normalised (r_rerank - r_init) / (r* - r_init), the "
                                         "default; difference r_rerank - r_init; ndcg r_rerank (the paper's ablation)",
                       choices=tuple(RANK_REWARDS))
    dataset: str = arg("dl21", "dataset whose judged queries seed the training sets (augmented in memory, "
                               "docs/method.md §4)")
    train_file: str = arg("", "JSONL of training instances from `python -m support.augment` (overrides --dataset)")
    samples: int = arg(50, "augmentation: candidate sets sampled per query", positive_int)
    size: int = arg(20, "augmentation: passages per candidate set (the paper: 20)", positive_int)
    min_ndcg: float = arg(0.1, "augmentation: drop sets whose best reachable nDCG@10 is below this", nonneg_float)
    steps: int = arg(100, "optimizer steps, one rollout batch each", positive_int)
    batch_size: int = arg(4, "prompts (training instances) per step", positive_int)
    group_size: int = arg(8, "completions sampled per prompt (G)", positive_int)
    updates: int = arg(1, "policy updates per rollout batch; >1 computes old-policy log-probs and makes the clip "
                          "matter", positive_int)
    micro_batch: int = arg(0, "completions per forward/backward pass within a group (0 = all G); bounds activation "
                              "memory", nonneg_int)
    rollout_batch: int = arg(0, "prompts per generate call in the rollout (0 = all --batch-size at once): the KV cache "
                                "holds this many times G rows", nonneg_int)
    repeat_prompt: bool = arg(False, "run each prompt once per completion, as TRL does, instead of once per group (to "
                                     "compare)")
    lr: float = arg(1e-6, "learning rate (AdamW)", positive_float)
    weight_decay: float = arg(0.0, "AdamW weight decay", nonneg_float)
    max_grad_norm: float = arg(1.0, "clip the gradient norm to this (0 = no clipping)", nonneg_float)
    beta: float = arg(0.001, "KL coefficient of the k3 penalty to the frozen reference (verl's default); 0 = no "
                             "reference model at all", nonneg_float)
    clip_eps: float = arg(0.2, "PPO clip range: the ratio is clipped to [1-eps, 1+eps]", positive_float)
    no_std: bool = arg(False, "advantages r - mean(r) without dividing by std (Dr. GRPO)")
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature",
                             positive_float)
    max_new_tokens: int = arg(512, "completion length cap for rollouts and held-out evaluation", positive_int)
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, ~30% slower)")
    bf16_weights: bool = arg(False, "bf16 weights updated with stochastic rounding (BF16AdamW): what fits a 7B model "
                                    "on 80 GB")
    lora_rank: int = arg(0, "train LoRA adapters of this rank on a frozen base instead of every weight "
                            "(support/lora.py; Rank-R1: 16); 0 = full fine-tuning, the paper's method", nonneg_int)
    lora_alpha: float = arg(32.0, "LoRA scale: each adapted linear adds (alpha / rank) B A x", positive_float)
    lora_targets: str = arg(",".join(LORA_TARGETS), "linears that get adapters, comma-separated module names (default: "
                                                    "every linear of attention and MLP, as Rank-R1)")
    eval_dataset: str = arg("dl19", "held-out dataset: its top-N windows are scored greedily (never a training set)")
    eval_size: int = arg(20, "held-out window size N (the top-N candidates of each query)", positive_int)
    eval_queries: int = arg(0, "held-out queries to use (0 = all judged ones)", nonneg_int)
    eval_order: str = arg("given", "the order the held-out top-N is shown in (eval.py --first-stage-order): given, "
                                   "shuffled (by --seed and the qid) or reversed", choices=FIRST_STAGE_ORDERS)
    eval_qids: str = arg("", "only these held-out queries: comma-separated qids or a file with one qid a line (a "
                             "validation split of the training dataset; keep them out of --train-file); a value "
                             "with a '/' or a suffix such as .txt is a file")
    eval_every: int = arg(25, "held-out evaluation every N steps, plus before the first and after the last (0 = "
                              "never)", nonneg_int)
    eval_batch_size: int = arg(8, "prompts per generate call in held-out evaluation", positive_int)
    save_every: int = arg(25, "checkpoint every N steps (also at the end and on Ctrl-C)", nonneg_int)
    save_optimizer: str = arg("on", "off: checkpoint/ without the optimizer state (a 7B run's 30.5 GB of moments), "
                                    "for a small disk; a --resume then restarts Adam's moments from zero",
                              choices=("on", "off"))
    dump_every: int = arg(10, "write the completions of one group to <out>/episodes.jsonl every N steps (0 = "
                              "never)", nonneg_int)
    out: str = arg("runs/grpo", "output directory: config.json, metrics.jsonl, eval.jsonl, episodes.jsonl, "
                                "checkpoint/, model/ (the trained reranker), curves.png")
    resume: bool = arg(False, "continue from <out>/checkpoint/")
    overwrite: bool = arg(False, "start afresh in an --out that holds a run, deleting it (without this, refused)")
    seed: int = arg(0, "one seed for data order, sampling and augmentation", nonneg_int)
    data_dir: str = arg("", "data directory (default $REARANK_DATA, else ./data)")
    memory: str = arg("auto", "auto: plan memory before loading and pick what the user did not set (fp32 or bf16 "
                              "weights, checkpointing, micro-batch, rollout batch, logits chunk, where the reference "
                              "lives); off: the flags as given (support/memory.py)", choices=("auto", "off"))
    memory_gb: float = arg(0.0, "memory budget the plan fits in, GB (0 = the device's free memory)", nonneg_float)
    logits_chunk: int = arg(0, "positions per lm_head chunk in the training passes (0 = the planner picks; all at "
                               "once with --memory off)", nonneg_int)
    reference: str = arg("auto", "where the KL's frozen reference lives: resident (on the device), offload (CPU "
                                 "memory, on the device only for its no-grad pass each step), auto (the memory plan "
                                 "decides)", choices=REFERENCE_PLACEMENTS)


# ----------------------------------------------------------------------------------------------------------------------
# the task: what a prompt looks like and how a completion is scored


class Task(NamedTuple):
    """What differs between REARANK and Rank-R1: the training sets, the prompt, and the reward. The loop is shared."""

    augment: Callable[[Dataset, object], tuple[list[TrainInstance], AugmentStats]]  # (dataset, grpo.Config)
    prompt: Callable[[TrainInstance], list[dict]]
    reward: Callable[[str, TrainInstance], Reward]


TASKS = {
    "listwise": Task(
        augment=lambda ds, cfg: augment(ds, cfg.samples, cfg.size, cfg.seed, cfg.min_ndcg),
        prompt=lambda inst, style="rearank", answer_start="": build_prompt(
            inst.query, [c.text for c in inst.candidates], style, answer_start),
        reward=lambda text, inst, variant="normalised", list_format=False: rerank_reward(
            text, [c.docid for c in inst.candidates], inst.judged, variant=variant, list_format=list_format),
    ),
    "setwise": Task(
        augment=lambda ds, cfg: augment_setwise(ds, cfg.samples, cfg.size, cfg.seed),
        prompt=lambda inst: build_setwise_prompt(inst.query, [c.text for c in inst.candidates]),
        reward=lambda text, inst: setwise_set_reward(text, [c.docid for c in inst.candidates], inst.judged),
    ),
}


def configured_task(cfg) -> Task:
    """TASKS[cfg.method] with the listwise prompt style and reward settings of `cfg` bound in (setwise has one of
    each). Only settings that differ from the defaults are bound, so a task's functions with the plain (inst) and
    (text, inst) signatures, as tests swap in, serve a default run unchanged."""
    task = TASKS[cfg.method]
    if cfg.method != "listwise":
        return task
    prompting = {k: v for k, v in (("style", cfg.prompt), ("answer_start", cfg.answer_start))
                 if v != {"style": "rearank", "answer_start": ""}[k]}
    scoring = {k: v for k, v in (("variant", cfg.rank_reward), ("list_format", cfg.list_format))
               if v != {"variant": "normalised", "list_format": False}[k]}
    return task._replace(prompt=functools.partial(task.prompt, **prompting),
                         reward=functools.partial(task.reward, **scoring))


def training_sets(cfg, task: Task) -> list[TrainInstance]:
    """--train-file's instances, or the task's training sets augmented in memory from --dataset (docs/method.md §4)."""
    if cfg.train_file:
        return read_instances(cfg.train_file)
    instances, st = task.augment(load_dataset(cfg.dataset, cfg.data_dir or None), cfg)
    print(f"data: {cfg.dataset}: {st.kept} {cfg.method} training sets of {cfg.size} "
          f"({st.no_relevant + st.below} dropped)")
    return instances


# ----------------------------------------------------------------------------------------------------------------------
# rollouts: prompts -> generate_tokens -> rewards; held-out evaluation takes the same path


@dataclass
class Rollout:
    """A rollout batch: B prompts, G scored completions each, laid out group after group."""

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
            temperature: float = 1.0, greedy: bool = False, repeat_prompt: bool = False,
            rollout_batch: int = 0) -> Rollout:
    """G completions of each prompt of `batch`, sampled and scored; `rollout_batch` prompts per generate call (0: all
    at once): the KV cache holds that many times G rows (--rollout-batch, memory.py)."""
    if 0 < rollout_batch < len(batch):
        return joined([rollout(model, tokenizer, task, batch[i : i + rollout_batch], group_size,
                               max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                               repeat_prompt=repeat_prompt) for i in range(0, len(batch), rollout_batch)])
    model.eval()  # no dropout while sampling; generate uses the KV cache
    gen = generate_tokens(
        model, tokenizer, [task.prompt(inst) for inst in batch], max_new_tokens=max_new_tokens,
        do_sample=not greedy, temperature=temperature, num_return_sequences=group_size, repeat_prompt=repeat_prompt,
    )
    owners = [inst for inst in batch for _ in range(group_size)]  # rows b*G .. b*G+G-1 answer prompt b
    rewards = [task.reward(text, inst) for text, inst in zip(gen.texts, owners)]
    # generation stopped at </answer> or EOS and masked what follows (backend.stop_lengths); completions cut by
    # --max-new-tokens are kept and scored (their answer is missing, so they mostly score 0) and counted as truncated
    eos = eos_ids(model, tokenizer)
    lengths = gen.completion_mask.sum(dim=1).tolist()
    last = [int(gen.completion_ids[i, n - 1]) if n else -1 for i, n in enumerate(lengths)]
    truncated = [ANSWER_END not in t and tok not in eos for t, tok in zip(gen.texts, last)]
    prompts = unpadded(gen.prompt_ids, gen.prompt_mask)
    return Rollout(prompts, gen.completion_ids, gen.completion_mask, gen.texts, rewards, truncated)


def joined(parts: list[Rollout]) -> Rollout:
    """Rollouts of consecutive prompts as one, their completions right-padded to the longest (masked, id 0)."""
    width = max(p.completion_ids.shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return Rollout([x for p in parts for x in p.prompts], torch.cat([pad(p.completion_ids) for p in parts]),
                   torch.cat([pad(p.completion_mask) for p in parts]), [x for p in parts for x in p.texts],
                   [x for p in parts for x in p.rewards], [x for p in parts for x in p.truncated])


class StepOutcomes(NamedTuple):
    """What the step's log reports, over every process's completions in global batch order."""

    rewards: list[Reward]
    lengths: list[int]
    truncated: list[bool]


def gather_rollouts(groups: Rollout) -> StepOutcomes:
    parts = dist.gather((groups.rewards, groups.completion_mask.sum(dim=1).tolist(), groups.truncated))
    return StepOutcomes(*([x for part in parts for x in part[i]] for i in range(3)))


# ----------------------------------------------------------------------------------------------------------------------
# the old policy's and the reference's log-probs (no grad)


def group_logprobs(model, groups: Rollout, cfg) -> list[torch.Tensor]:
    """Log-probs of each group's completions, (G, C_b) per group, under `model` (no grad: old policy, reference)."""
    out = []
    for b in range(len(groups.prompts)):
        prompt, ids, mask, _ = groups.group(b)
        out.append(completion_logprobs(model, prompt, ids, mask, cfg.temperature, repeat_prompt=cfg.repeat_prompt,
                                       micro_batch=cfg.micro_batch or None, logits_chunk=cfg.logits_chunk))
    return out


@torch.no_grad()
def reference_logprobs(ref, groups: Rollout, cfg) -> list[torch.Tensor]:
    """The rollout's log-probs under the frozen reference (a Reference, or LoRA's base with the adapters off)."""
    with ref.on_device() as model:
        return group_logprobs(model, groups, cfg)


def frozen_logprobs(policy, ref: Reference | None, groups: Rollout, cfg,
                    accelerator) -> tuple[list | None, list | None, float]:
    """The log-probs a step compares the policy with, under no_grad: the old policy's, only with --updates > 1 (with
    one update the old policy is the current one, the ratio is 1), and the reference's, only with --beta > 0. Returns
    them (None where not needed) and the seconds the reference pass took."""
    from accelerate.utils import AutocastKwargs

    old_logp = ref_logp = None
    ref_s = 0.0
    # autocast caches a bf16 cast of every fp32 weight until its context ends (15 GB at 7B): worth it across the
    # rollout's decoding steps, but a no-grad pass never needs the casts afterwards
    with torch.no_grad(), accelerator.autocast(AutocastKwargs(cache_enabled=False)):
        if cfg.updates > 1:
            old_logp = group_logprobs(policy, groups, cfg)
        if ref is not None:
            t = time.time()
            ref_logp = reference_logprobs(ref, groups, cfg)
            ref_s = time.time() - t
    return old_logp, ref_logp, ref_s


# ----------------------------------------------------------------------------------------------------------------------
# held-out evaluation


def held_out(cfg) -> list[TrainInstance]:
    """The top-`eval_size` candidates of each judged query of the held-out set, in first-stage order (or reordered
    as `eval_order` says: data.first_stage, the lists eval.py --first-stage-order gives)."""
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
    shown = [first_stage(r, cfg.eval_size, cfg.eval_order, cfg.seed) for r in judged]
    return [make_instance(r.query, r.candidates, ds.qrels[r.query.qid]) for r in shown]


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, instances: list[TrainInstance], cfg,
             gather: Callable[[list], list] = lambda xs: xs) -> dict[str, float]:
    """Greedy completions for the held-out windows: mean reward (and parts) and nDCG@10 of the reordered windows.

    With several processes each passes its block of the windows and `gather` (dist.gather_lists) joins the blocks."""
    from tqdm import tqdm

    rewards, ndcg, base = [], [], []
    for i in tqdm(range(0, len(instances), cfg.eval_batch_size), desc="held-out", unit="batch", leave=False):
        chunk = instances[i : i + cfg.eval_batch_size]
        groups = rollout(model, tokenizer, task, chunk, 1, max_new_tokens=cfg.max_new_tokens, greedy=True)
        rewards += groups.rewards
        ndcg += [r.ndcg for r in groups.rewards]
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
    # one update per rollout batch: the old policy is the current one, so rho = exp(logp - logp.detach()) == 1, the
    # clip is inert, and no old-policy pass is made
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)  # (N, C)
    adv = advantages[:, None]  # (N, 1)
    objective = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (N, C)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        # k3, as DeepSeekMath (verl's "low_var_kl"): pi_ref/pi - log(pi_ref/pi) - 1 >= 0, per token
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token = -(objective - beta * kl)
    # DAPO (TRL's loss_type="dapo"): a mean over every token of the batch, not per sequence then per group, so a long
    # completion is not diluted nor a short one amplified (the per-sequence mean's length bias, Dr. GRPO)
    loss = (per_token * mask).sum() / n_tokens
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    denom = mask.sum().clamp(min=1)
    stats = {
        "kl": float((kl.detach() * mask).sum() / denom),
        "ratio": float((ratio.detach() * mask).sum() / denom),
        "clip_frac": float((clipped.float() * mask).sum() / denom),
    }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# the update: the loss and its backward, then the optimizer step


def policy_backward(model, groups: Rollout, adv: torch.Tensor, old_logp: list | None, ref_logp: list | None,
                    cfg: Config, n_tokens: float | None = None) -> tuple[float, dict[str, float]]:
    """One backward of the GRPO loss over the whole rollout batch, group by group and micro-batch by micro-batch.
    Returns the loss and the token means of grpo_loss's statistics.

    With several processes `n_tokens` is the count over all of them: each returns its share of the global loss and
    of the means, and the shares sum to them (`dist.all_reduce_sum`, `dist.all_reduce_grads`).
    """
    n_tokens = n_tokens or int(groups.completion_mask.sum().clamp(min=1))
    total, sums = 0.0, {"kl": 0.0, "ratio": 0.0, "clip_frac": 0.0}
    for b in range(len(groups.prompts)):
        prompt, ids, mask, rows = groups.group(b)
        # the group's prompt runs once (support/prompt_once.py); leaving the block backpropagates through it once
        with prompt_pass(model, prompt, cfg.repeat_prompt, cfg.temperature, cfg.logits_chunk) as score:
            for sub in micro_batches(len(ids), cfg.micro_batch):  # sub: rows within the group
                logp = score(ids[sub], mask[sub])  # (b, C)
                old = None if old_logp is None else old_logp[b][sub]
                ref = None if ref_logp is None else ref_logp[b][sub]
                # DAPO: every micro-batch divides by the whole batch's token count, so the gradients add up to
                # those of one loss over the batch
                loss, stats = grpo_loss(logp, old, ref, adv[rows][sub], mask[sub], cfg.clip_eps, cfg.beta, n_tokens)
                for k in sums:  # token-weighted, so the means are over the batch's tokens
                    sums[k] += stats[k] * float(mask[sub].sum())
                # not accelerator.backward: it adds nothing on one device with bf16; the graph is freed at once
                loss.backward()
                total += loss.item()
    return total, {k: v / n_tokens for k, v in sums.items()}


def update(accelerator, model, optimizer, groups: Rollout, adv: torch.Tensor, old_logp: list | None,
           ref_logp: list | None, cfg: Config) -> tuple[list[float], dict[str, float], float]:
    """`cfg.updates` passes of the loss over the rollout batch, each followed by an optimizer step. Returns the
    losses, grpo_loss's statistics of the last pass (the first pass's ratio is 1) and its gradient norm."""
    from accelerate.utils import AutocastKwargs

    # autocast's cache of bf16 weight casts: without checkpointing the graphs save the casts anyway (the cache makes
    # the prompt's graph and each micro-batch's share one copy); with checkpointing they are recomputed layer by
    # layer, so a cache would only keep them all alive (15 GB at 7B)
    casts = AutocastKwargs(cache_enabled=not cfg.gradient_checkpointing)
    policy = accelerator.unwrap_model(model)
    n_tokens = max(dist.all_reduce_sum([float(groups.completion_mask.sum())])[0], 1.0)  # DAPO: the global count
    losses, stats, grad_norm = [], {}, 0.0
    for _ in range(cfg.updates):
        with accelerator.autocast(casts), dist.grad_sync(accelerator, model):
            loss, stats = policy_backward(policy, groups, adv, old_logp, ref_logp, cfg, n_tokens)
        loss, *parts = dist.all_reduce_sum([loss, *stats.values()])  # the shares sum to the global values
        stats = dict(zip(stats, parts))
        losses.append(loss)
        # the norm before clipping; an infinite bound measures without clipping
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, stats, grad_norm


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def prepare(accelerator, model, optimizer):
    """accelerator.prepare, and the bare policy every pass runs on: (model, optimizer, policy).

    generate() and the prompt-once passes (prompt_once.py reads model.config) run on the bare model; on several
    processes it is not wrapped in DDP (`dist.prepare`): gradients are exchanged by `dist.grad_sync`.
    With mixed precision, prepare also wraps model.forward in an autocast built once with the weight cache on; every
    pass here runs inside its own `accelerator.autocast`, and the wrapper would turn the cache back on inside
    `update`'s cache_enabled=False (15 GB of cached bf16 casts at 7B with checkpointing), so the policy gets its
    original forward back (keep_fp32_wrapper=False).
    """
    model, optimizer = dist.prepare(accelerator, model, optimizer)
    return model, optimizer, accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def setup(cfg: Config, explicit: set[str] | None):
    """Everything before the data: the --out guard, the memory plan, the processes (an Accelerator: bf16 autocast on
    CUDA, the weights keep their dtype), the config saved and printed, the seeds. Returns the config with the plan's
    choices in it, and the Accelerator."""
    from accelerate import Accelerator

    if dist.is_main() or not cfg.overwrite:  # only the main process deletes what --overwrite replaces
        check_out(cfg)  # before anything is written: never replace a run by mistake
    dist.use_local_gpu()  # before the plan reads the device's free memory
    plan = plan_memory(cfg, explicit)
    if plan is not None:  # the settings the user left to the plan, as its printed line says
        cfg = dataclasses.replace(cfg, **plan.choices)
    check_resume_config(cfg)  # after the plan, which resolves the settings config.json holds resolved
    cuda = torch.cuda.is_available()
    # cpu=True on a machine without CUDA, else torchrun's ranks are ignored
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    dist.check_world(accelerator, cfg.batch_size)
    dist.quiet_unless_main()
    if accelerator.is_main_process:  # with several processes only the main one writes files (and prints)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    print(json.dumps(asdict(cfg), indent=1))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # each process samples its own completions
    return cfg, accelerator


def train(cfg: Config, explicit: set[str] | None = None) -> dict:
    """Run GRPO as `cfg` says; returns the last step's metrics (tests compare runs with them). `explicit`: the fields
    the user set (the memory plan keeps them); None: those that differ from the defaults."""
    cfg, accelerator = setup(cfg, explicit)
    out, main = Path(cfg.out), accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    task = configured_task(cfg)

    # --- data: the training sets, and the held-out windows evaluated as the run goes
    instances = training_sets(cfg, task)
    eval_windows = held_out(cfg) if cfg.eval_every else []

    # --- model: fp32 master weights (or bf16 ones with stochastic rounding), optimizer, optional frozen reference
    model, tokenizer = load_model(cfg.model)
    if cfg.lora_rank:  # a frozen base (bf16 on CUDA) and fp32 adapters, the only trainable weights (lora.py)
        model = lora.wrap(model, cfg)
    else:
        # fp32 master weights: an Adam step of lr 1e-6 vanishes when added to a bf16 weight (the spacing near 0.02 is
        # 1.2e-4). --bf16-weights keeps them bf16 and BF16AdamW rounds each update stochastically (optimizer.py)
        cast_model(model, torch.bfloat16 if cfg.bf16_weights else torch.float32)  # RoPE's frequencies stay fp32
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # the k3 KL to the frozen initial policy, at verl's default --beta 0.001 (REARANK trained with verl); --beta 0
    # (TRL's and DAPO's default) builds no reference at all; with LoRA it is the base itself, adapters off
    ref = None
    if cfg.beta > 0:
        ref = lora.make_reference(model) if cfg.lora_rank else make_reference(model, cfg)
    model, optimizer, policy = prepare(accelerator, model, make_optimizer(model, cfg))

    # --- resume: weights, optimizer and RNG states from <out>/checkpoint/; the logs cut back to its step
    start = resume(out, lora.checkpointed(policy, cfg), optimizer, rank, world) if cfg.resume else 0
    rewind_logs(out, start, write=main)

    def held_out_eval(step: int) -> None:  # greedy; each process scores its block of the windows
        with accelerator.autocast(), dist.gathered_params(accelerator, model):
            mine = dist.shard(eval_windows, rank, world)
            ev = {"step": step, **evaluate(policy, tokenizer, task, mine, cfg, gather=dist.gather_lists)}
        print(f"eval step {step} | reward {ev['reward']:.3f} | nDCG@10 {ev['ndcg@10']:.4f} "
              f"(first stage {ev['ndcg@10_first_stage']:.4f}) | f1 {ev['format1']:.2f} f2 {ev['format2']:.2f}")
        if main:
            append_jsonl(out / "eval.jsonl", ev)

    metrics: dict = {}
    with CtrlC() as stop:  # the first Ctrl-C: finish this step, checkpoint, stop
        for step in range(start, cfg.steps):
            rng = rng_state()  # the state this step starts from: what a checkpoint taken now must restore

            # --- held-out evaluation (before the first step, every eval_every, and after the last one below)
            if cfg.eval_every and step % cfg.eval_every == 0:
                held_out_eval(step)
                set_rng_state(rng)  # evaluation is greedy, but keep sampling independent of whether it ran

            # --- rollout: the global batch is a function of (step, seed); each process takes its block of groups
            t0 = time.time()
            indices = batch_indices(step, cfg.batch_size, len(instances), cfg.seed)
            batch = [instances[i] for i in dist.shard(indices, rank, world)]
            with accelerator.autocast(), dist.gathered_params(accelerator, model):
                groups = rollout(policy, tokenizer, task, batch, cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, repeat_prompt=cfg.repeat_prompt,
                                 rollout_batch=cfg.rollout_batch)
            gen_s = time.time() - t0

            # --- reward (scored as each completion came) -> advantages, within each group: no other process needed
            r = torch.tensor([x.total for x in groups.rewards])  # (B*G,) this process's groups
            # --no-std (Dr. GRPO): with the std, a group that differs only in a format bit gets advantages as large
            # as one that differs in ranking quality (docs/method.md §5)
            adv = group_advantages(r, cfg.group_size, scale=not cfg.no_std).to(accelerator.device)  # (B*G,)

            # --- log-probs of the old policy and the reference (no grad; only when they differ from the policy)
            t1 = time.time()
            model.train()
            old_logp, ref_logp, ref_s = frozen_logprobs(policy, ref, groups, cfg, accelerator)

            # --- update; the first step proves the weights move at this lr (docs/method.md §5), on a small CPU sample
            first_step = step == start and not cfg.resume
            trainable = [p for p in policy.parameters() if p.requires_grad] if first_step else []
            before = weight_sample(trainable)
            losses, stats, grad_norm = update(accelerator, model, optimizer, groups, adv, old_logp, ref_logp, cfg)
            train_s = time.time() - t1
            if first_step:
                moved = moved_fraction(before, weight_sample(trainable))
                print(f"weights: {moved:.1%} of the watched parameters changed in the first step at lr {cfg.lr:g}")

            # --- log / checkpoint (the log reports every process's completions, gathered in global order)
            metrics = step_record(step + 1, cfg.steps, gather_rollouts(groups), cfg.group_size, losses, stats,
                                  grad_norm, optimizer.param_groups[0]["lr"],
                                  dict(gen_s=gen_s, train_s=train_s, ref_s=ref_s))
            print(log_line(metrics), flush=True)
            if main:
                append_jsonl(out / "metrics.jsonl", metrics)
            if main and cfg.dump_every and (step + 1) % cfg.dump_every == 0:
                append_jsonl(out / "episodes.jsonl", *episodes(step + 1, batch[0], groups, adv))
            last = step + 1 == cfg.steps
            stop.requested = dist.any_rank(stop.requested)  # stop together, or the others wait forever
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last or stop.requested:
                rngs = dist.gather(rng_state())  # each process's sampling continues where it stopped
                if main:
                    save = lora.save if cfg.lora_rank else save_checkpoint  # LoRA: adapters, merged model
                    save(out, policy, tokenizer, optimizer, step + 1, rngs, cfg)
            if stop.requested and not last:
                print(f"stopped after step {step + 1}; continue with --resume")
                break
        else:  # the final weights, unless already evaluated (resuming a finished run only evaluates it)
            if cfg.eval_every and not any(e["step"] == cfg.steps for e in read_jsonl(out / "eval.jsonl")):
                held_out_eval(cfg.steps)
                if main:
                    update_model_card(out / "model", cfg, cfg.steps)  # the card quotes the final evaluation
    if main:
        plot(out)
    accelerator.wait_for_everyone()  # nobody leaves (and tears the group down) before the files are written
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    p = dataclass_parser(Config, __doc__)
    p.add_argument("--plot", action="store_true", help="only redraw <out>/curves.png from <out>/metrics.jsonl")
    args = vars(p.parse_args(argv))
    plot_only = args.pop("plot")
    cfg = Config(**args)
    if not plot_only and (problem := config_problem(cfg)):
        p.error(problem)
    return cfg, plot_only


def main(argv: list[str] | None = None) -> None:
    cfg, only_plot = parse_args(argv)
    try:
        if only_plot:
            print(f"wrote {plot(Path(cfg.out))}")
            return
        train(cfg, explicit_flags(Config, argv))
    except (DataError, ModelError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
