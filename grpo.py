"""A hand-written GRPO loop that teaches an LLM to rerank with reasoning (REARANK; METHOD §3-§5).

    python grpo.py --model Qwen/Qwen2.5-7B-Instruct                         # the paper's recipe, one GPU
    python grpo.py --model smollm2 --dataset dl21 --steps 40 --size 5       # the embedded model on CPU
    python grpo.py --out runs/grpo --resume                                 # continue from the last checkpoint
    python eval.py --dataset dl19 --model runs/grpo/model                   # evaluate what it trained
    python grpo.py --out runs/grpo --plot                                   # redraw the curves of a run
    accelerate launch --config_file launch/ddp.yaml grpo.py ...             # data parallel on several GPUs
    python grpo.py --model Qwen/Qwen2.5-7B-Instruct --lora-rank 16 --lr 1e-5  # LoRA (Rank-R1): one 24-48 GB GPU

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
   `--bf16-weights` the weights stay bf16 and `BF16AdamW` (optimizer.py) keeps bf16 moments and writes each update
   back with stochastic rounding (unbiased: a 1e-6 step moves a weight one bf16 spacing with probability
   1e-6 / spacing): 8 bytes a parameter, 61 GB for 7B. The first step reports how many weights moved.

Reading order: the top of the project. Here: the config, the maths (advantages, the loss), the backward, and the
loop in labelled phases. The no-grad half of a step is rollout.py: the `Task` (REARANK's listwise or Rank-R1's
setwise training sets, prompt and reward: the loop serves both), sampling and scoring groups, the old-policy and
reference log-probs, the held-out evaluation. Then optimizer.py (AdamW, 8-bit on CUDA, BF16AdamW), runlog.py (the
step's line, the JSONL logs, curves.png), checkpoint.py (the --out guard, --resume's checkpoint, the exported model,
Ctrl-C), lora.py (--lora-rank: adapters on a frozen base, the reference with them off), memory.py (the plan made
before loading) and dist.py (several processes).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import dist
import lora
from augment import batch_indices
from backend import ModelError, cast_model, load_model
from checkpoint import (
    CtrlC, check_out, check_resume_config, resume, rng_state, save_checkpoint, set_rng_state, update_model_card,
)
from cli import arg, dataclass_parser, explicit_flags, nonneg_float, nonneg_int, positive_float, positive_int
from data import DATASETS, FIRST_STAGE_ORDERS, TEST_SETS, DataError
from files import check_file
from memory import plan_memory
from model_shape import LORA_TARGETS, parse_targets
from optimizer import make_optimizer, moved_fraction, weight_sample
from prefix import group_backward
from rearank import MAX_CHARS
from reward import RANK_REWARDS
from rollout import (
    REFERENCE_PLACEMENTS, TASKS, Rollout, configured_task, evaluate, frozen_logprobs, gather_rollouts, held_out,
    make_reference, read_qids, rollout, training_sets,
)
from runlog import append_jsonl, episodes, log_line, plot, read_jsonl, rewind_logs, step_record

# ----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    model: str = arg("smollm2", "'smollm2' (the embedded SmolLM2-135M-Instruct), a local checkpoint directory, or a "
                                "hub id")
    method: str = arg("listwise", "listwise (REARANK: reorder the set) or setwise (Rank-R1: name the most relevant "
                                  "passage)", choices=tuple(TASKS))
    prompt: str = arg("rearank", "listwise prompt, for training and held-out evaluation alike: rearank (reasoning "
                                 "in <think>, the list in <answer>) or rankgpt (the list alone; the format terms then "
                                 "never fire unless --list-format)", choices=tuple(MAX_CHARS))
    list_format: bool = arg(False, "a departure, off by default: format2 pays only for an answer that opens with a "
                                   "complete permutation of the window's ids '[3] > [1] > [2]' (tags not needed), so "
                                   "the RankGPT prompt gets a format term too and copying the prompt's example "
                                   "'[1] > [2]' earns nothing")
    rank_reward: str = arg("normalised", "listwise rank term: normalised (r_rerank - r_init) / (r* - r_init), the "
                                         "default; difference r_rerank - r_init; ndcg r_rerank (the paper's ablation)",
                       choices=tuple(RANK_REWARDS))
    dataset: str = arg("dl21", "dataset whose judged queries seed the training sets (augmented in memory, METHOD §4)")
    train_file: str = arg("", "JSONL of training instances from `augment.py` (overrides --dataset)")
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
    lora_rank: int = arg(0, "train LoRA adapters of this rank on a frozen base instead of every weight (lora.py; "
                            "Rank-R1: 16); 0 = full fine-tuning, the paper's method", nonneg_int)
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
                              "lives); off: the flags as given (memory.py)", choices=("auto", "off"))
    memory_gb: float = arg(0.0, "memory budget the plan fits in, GB (0 = the device's free memory)", nonneg_float)
    logits_chunk: int = arg(0, "positions per lm_head chunk in the training passes (0 = the planner picks; all at "
                               "once with --memory off)", nonneg_int)
    reference: str = arg("auto", "where the KL's frozen reference lives: resident (on the device), offload (CPU "
                                 "memory, on the device only for its no-grad pass each step), auto (the memory plan "
                                 "decides)", choices=REFERENCE_PLACEMENTS)


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    p = dataclass_parser(Config, __doc__)
    p.add_argument("--plot", action="store_true", help="only redraw <out>/curves.png from <out>/metrics.jsonl")
    args = vars(p.parse_args(argv))
    plot_only = args.pop("plot")
    cfg = Config(**args)
    if not plot_only and (problem := config_problem(cfg)):
        p.error(problem)
    return cfg, plot_only


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
    if cfg.method != "listwise" and (cfg.prompt, cfg.rank_reward, cfg.list_format) != ("rearank", "normalised", False):
        return ("--prompt, --rank-reward and --list-format are listwise settings; setwise has Rank-R1's prompt and "
                "reward")
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
    if cfg.eval_qids:
        try:
            read_qids(cfg.eval_qids)
        except DataError as e:
            return f"--eval-qids {e}"
    if cfg.eval_every and cfg.eval_dataset not in DATASETS:
        return f"--eval-dataset {cfg.eval_dataset!r}: choose one of {', '.join(DATASETS)}"
    if cfg.eval_every and not cfg.train_file and cfg.eval_dataset == cfg.dataset:
        return f"--eval-dataset {cfg.eval_dataset} is also the training --dataset: held-out means not trained on"
    return lora_problem(cfg)


def lora_problem(cfg: Config) -> str:
    """What is wrong with the LoRA flags given together with the others, or ""."""
    if not cfg.lora_rank:
        if (cfg.lora_alpha, cfg.lora_targets) != (Config.lora_alpha, Config.lora_targets):
            return "--lora-alpha and --lora-targets shape LoRA adapters: they need --lora-rank > 0"
        return ""
    if not parse_targets(cfg.lora_targets):
        return "--lora-targets: name at least one linear module, e.g. q_proj,v_proj"
    if cfg.reference != "auto":
        return (f"--reference {cfg.reference}: with --lora-rank the KL's reference is the base with the adapters "
                "switched off, the same weights as the policy's: there is no copy to place; drop --reference")
    if cfg.bf16_weights:
        return ("--bf16-weights trains every weight in bf16; with --lora-rank the base is frozen (bf16 on CUDA "
                "already) and the adapters stay fp32: drop --bf16-weights")
    return ""


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


# ----------------------------------------------------------------------------------------------------------------------
# the policy-gradient half of a step (the no-grad half is rollout.py)


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


def update(accelerator, model, optimizer, ro: Rollout, adv: torch.Tensor, old_logp: list | None,
           ref_logp: list | None, cfg: Config) -> tuple[list[float], dict[str, float], float]:
    """`cfg.updates` passes of the loss over the rollout batch, each followed by an optimizer step. Returns the
    losses, grpo_loss's statistics of the last pass (the first pass's ratio is 1) and its gradient norm."""
    from accelerate.utils import AutocastKwargs

    # autocast's cache of bf16 weight casts: without checkpointing the graphs save the casts anyway (the cache makes
    # the prompt's graph and each micro-batch's share one copy); with checkpointing they are recomputed layer by
    # layer, so a cache would only keep them all alive (15 GB at 7B)
    casts = AutocastKwargs(cache_enabled=not cfg.gradient_checkpointing)
    policy = accelerator.unwrap_model(model)
    n_tokens = max(dist.all_reduce_sum([float(ro.completion_mask.sum())])[0], 1.0)  # DAPO: the global count
    losses, stats, grad_norm = [], {}, 0.0
    for _ in range(cfg.updates):
        with accelerator.autocast(casts), dist.grad_sync(accelerator, model):
            loss, stats = policy_backward(policy, ro, adv, old_logp, ref_logp, cfg, n_tokens)
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

    generate() and the prefix-sharing passes (prefix.py reads model.config) run on the bare model; on several
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
    CUDA, the weights keep their dtype), the config saved and printed, the seeds. Returns the Accelerator."""
    from accelerate import Accelerator

    if dist.is_main() or not cfg.overwrite:  # only the main process deletes what --overwrite replaces
        check_out(cfg)  # before anything is written: never replace a run by mistake
    dist.use_local_gpu()  # before the plan reads the device's free memory
    plan_memory(cfg, explicit)
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
    return accelerator


def train(cfg: Config, explicit: set[str] | None = None) -> dict:
    """Run GRPO as `cfg` says; returns the last step's metrics (tests compare runs with them). `explicit`: the fields
    the user set (the memory plan keeps them); None: those that differ from the defaults."""
    accelerator = setup(cfg, explicit)
    out, main = Path(cfg.out), accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    task = configured_task(cfg)

    # --- data: the training sets, and the held-out windows evaluated as the run goes
    instances = training_sets(cfg, task)
    held = held_out(cfg) if cfg.eval_every else []

    # --- model: fp32 master weights (or bf16 ones with stochastic rounding), optimizer, optional frozen reference
    model, tokenizer = load_model(cfg.model)
    if cfg.lora_rank:  # a frozen base (bf16 on CUDA) and fp32 adapters, the only trainable weights (lora.py)
        model = lora.wrap(model, cfg)
    else:
        cast_model(model, torch.bfloat16 if cfg.bf16_weights else torch.float32)  # RoPE's frequencies stay fp32
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref = None  # --beta 0: no reference is ever built; with LoRA it is the base itself, adapters off
    if cfg.beta > 0:
        ref = lora.make_reference(model) if cfg.lora_rank else make_reference(model, cfg)
    model, optimizer, policy = prepare(accelerator, model, make_optimizer(model, cfg))

    # --- resume: weights, optimizer and RNG states from <out>/checkpoint/; the logs cut back to its step
    start = resume(out, lora.checkpointed(policy, cfg), optimizer, rank, world) if cfg.resume else 0
    rewind_logs(out, start, write=main)

    def held_out_eval(step: int) -> None:  # greedy; each process scores its block of the windows
        with accelerator.autocast(), dist.gathered_params(accelerator, model):
            mine = dist.shard(held, rank, world)
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
                ro = rollout(policy, tokenizer, task, batch, cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, shared_prompt=not cfg.repeat_prompt,
                             rollout_batch=cfg.rollout_batch)
            gen_s = time.time() - t0

            # --- reward (scored as each completion came) -> advantages, within each group: no other process needed
            r = torch.tensor([x.total for x in ro.rewards])  # (B*G,) this process's groups
            adv = group_advantages(r, cfg.group_size, scale=not cfg.no_std).to(accelerator.device)  # (B*G,)

            # --- log-probs of the old policy and the reference (no grad; only when they differ from the policy)
            t1 = time.time()
            model.train()
            old_logp, ref_logp, ref_s = frozen_logprobs(policy, ref, ro, cfg, accelerator)

            # --- update; the first step proves the weights move at this lr (METHOD §5), on a small CPU sample
            first = step == start and not cfg.resume
            watched = [p for p in policy.parameters() if p.requires_grad] if first else []
            before = weight_sample(watched)
            losses, stats, grad_norm = update(accelerator, model, optimizer, ro, adv, old_logp, ref_logp, cfg)
            train_s = time.time() - t1
            if first:
                moved = moved_fraction(before, weight_sample(watched))
                print(f"weights: {moved:.1%} of the watched parameters changed in the first step at lr {cfg.lr:g}")

            # --- log / checkpoint (the log reports every process's completions, gathered in global order)
            metrics = step_record(step + 1, cfg.steps, gather_rollouts(ro), cfg.group_size, losses, stats, grad_norm,
                                  optimizer.param_groups[0]["lr"], dict(gen_s=gen_s, train_s=train_s, ref_s=ref_s))
            print(log_line(metrics), flush=True)
            if main:
                append_jsonl(out / "metrics.jsonl", metrics)
            if main and cfg.dump_every and (step + 1) % cfg.dump_every == 0:
                append_jsonl(out / "episodes.jsonl", *episodes(step + 1, batch[0], ro, adv))
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
