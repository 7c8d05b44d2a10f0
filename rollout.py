"""The half of a GRPO step that takes no gradient: sample and score groups, and the log-probs of what was sampled
under frozen models.

    Task          what differs between REARANK (listwise) and Rank-R1 (setwise): training sets, prompt, reward
    rollout       B prompts -> G sampled completions each (backend.generate_tokens, evaluation's path) -> rewards
    group_logprobs  a rollout's log-probs under a frozen model: the old policy (--updates > 1) or the reference
    Reference     the KL's frozen initial policy, resident on the device or offloaded to CPU memory between passes
    evaluate      greedy completions for held-out windows, through the same rollout, scored as in training

A group's G completions share one prompt, so the prompt runs once per group (prefix.py), in the prefill and in the
log-prob passes alike; `shared_prompt=False` / `cfg.repeat_prompt` runs it G times, as TRL does, to compare.

Reading order: after reward.py and prefix.py (what it calls) and backend.py; grpo.py imports it, and its loss and
backward take the Rollout from here. `cfg` below is grpo.Config (this module sits under grpo.py).
"""

from __future__ import annotations

import copy
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

import dist
from augment import AugmentStats, TrainInstance, augment, augment_setwise, make_instance, read_instances
from backend import generate_tokens, rotary_buffers
from data import DataError, Dataset, first_stage, load_dataset
from files import check_file, lines
from prefix import completion_logprobs, unpadded
from rearank import ANSWER_END, build_prompt
from reward import Reward, rerank_reward, setwise_set_reward
from setwise import build_setwise_prompt

REFERENCE_PLACEMENTS = ("auto", "resident", "offload")


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


def configured_task(cfg) -> Task:
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


def training_sets(cfg, task: Task) -> list[TrainInstance]:
    """--train-file's instances, or the task's training sets augmented in memory from --dataset (METHOD §4)."""
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
            temperature: float = 1.0, greedy: bool = False, shared_prompt: bool = True,
            rollout_batch: int = 0) -> Rollout:
    """G completions of each prompt of `batch`, sampled and scored; `rollout_batch` prompts per generate call (0: all
    at once): the KV cache holds that many times G rows (--rollout-batch, memory.py)."""
    if 0 < rollout_batch < len(batch):
        return joined([rollout(model, tokenizer, task, batch[i : i + rollout_batch], group_size,
                               max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                               shared_prompt=shared_prompt) for i in range(0, len(batch), rollout_batch)])
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


def joined(parts: list[Rollout]) -> Rollout:
    """Rollouts of consecutive prompts as one, their completions right-padded to the longest (masked, id 0)."""
    width = max(p.completion_ids.shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return Rollout([x for p in parts for x in p.prompts], torch.cat([pad(p.completion_ids) for p in parts]),
                   torch.cat([pad(p.completion_mask) for p in parts]), [x for p in parts for x in p.texts],
                   [x for p in parts for x in p.rewards], [x for p in parts for x in p.truncated])


class Seen(NamedTuple):
    """What the step's log reports, over every process's completions in global batch order."""

    rewards: list[Reward]
    lengths: list[int]
    truncated: list[bool]


def gather_rollouts(ro: Rollout) -> Seen:
    parts = dist.gather((ro.rewards, ro.completion_mask.sum(dim=1).tolist(), ro.truncated))
    return Seen(*([x for part in parts for x in part[i]] for i in range(3)))


def group_logprobs(model, ro: Rollout, cfg) -> list[torch.Tensor]:
    """Log-probs of each group's completions, (G, C_b) per group, under `model` (no grad: old policy, reference)."""
    out = []
    for b in range(len(ro.prompts)):
        prompt, ids, mask, _ = ro.group(b)
        out.append(completion_logprobs(model, prompt, ids, mask, cfg.temperature, shared=not cfg.repeat_prompt,
                                       micro_batch=cfg.micro_batch or None, logits_chunk=cfg.logits_chunk))
    return out

# ----------------------------------------------------------------------------------------------------------------------
# the frozen reference of the KL term


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
    Tied weights stay tied: deepcopy's memo maps each original tensor to its one copy. RoPE's inverse frequencies keep
    their dtype (fp32), as backend.cast_model keeps the policy's."""
    memo: dict = {}
    rotary = {id(b) for b in rotary_buffers(model).values()}
    for t in [*model.parameters(), *model.buffers()]:
        cast = t.is_floating_point() and id(t) not in rotary
        c = t.detach().to(device=device, dtype=dtype if cast else t.dtype, copy=True)
        memo[id(t)] = torch.nn.Parameter(c, requires_grad=False) if isinstance(t, torch.nn.Parameter) else c
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


class Reference:
    """The frozen reference policy pi_ref of the KL penalty: the initial weights, bf16 on CUDA (fp32 on CPU).

    Resident, it stays on the device. Offloaded, it lives in CPU memory and is copied to the device only for its
    no-grad pass, once a step (as nano-aha-moment does): it costs no second resident copy, only the transfer (15.2 GB
    for 7B). The CPU copy is made once, pinned when CUDA is there (copied in without a staging copy, asynchronously:
    ~0.4 s at 7B, against seconds of page faults from fresh pageable memory each step); after the pass the model
    points back at it, so nothing is copied back (the weights never change) and the device copy is freed. On CPU the
    pass runs on a copy too, as on a GPU. Either way the log-probs are the same numbers (tests/test_grpo.py).
    """

    def __init__(self, model, device, placement: str):
        assert placement in ("resident", "offload"), placement
        self.device, self.placement = torch.device(device), placement
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # it never trains: bf16 is enough
        self.model = frozen_copy(model, self.device if placement == "resident" else "cpu", dtype)
        self.host: list[torch.Tensor] = []  # offloaded: the one CPU copy of each tensor, reused every step
        if placement == "offload":
            for t in self.tensors():
                t.data = t.data.pin_memory() if torch.cuda.is_available() else t.data
                self.host.append(t.data)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]  # tied weights once

    @torch.no_grad()
    def logprobs(self, ro: Rollout, cfg) -> list[torch.Tensor]:
        for t, h in zip(self.tensors(), self.host):  # offloaded: in, ordered before the pass's kernels
            t.data = h.to(self.device, non_blocking=True, copy=True)
        try:
            return group_logprobs(self.model, ro, cfg)
        finally:
            for t, h in zip(self.tensors(), self.host):
                t.data = h  # back to the CPU copy: the device copy is freed


def make_reference(model, cfg) -> Reference:
    """The reference for --beta > 0, placed as --reference says (printed: it decides a GPU's memory)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ref_bytes = sum(p.numel() for p in model.parameters()) * (2 if cuda else 4)
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    placement = reference_placement(cfg.reference, cuda, ref_bytes, total)
    print(f"reference: {placement} ({ref_bytes / 1e9:.2f} GB; --reference {cfg.reference})")
    return Reference(model, device, placement)


def frozen_logprobs(policy, ref: Reference | None, ro: Rollout, cfg,
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
            old_logp = group_logprobs(policy, ro, cfg)
        if ref is not None:
            t = time.time()
            ref_logp = ref.logprobs(ro, cfg)
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


def names_a_file(spec: str) -> bool:
    """Whether --eval-qids `spec` is a file rather than qids: it exists, or it looks like a path (a '/' or a
    file-name suffix such as .txt, .tsv, .qids), so a mistyped file is an error, not a query id.

    >>> [names_a_file(s) for s in ("1037798,104861", "q1", "splits/val", "missing.txt")]
    [False, False, True, True]
    """
    return Path(spec).exists() or "/" in spec or re.search(r"\.[A-Za-z]\w*$", spec) is not None


def read_qids(spec: str) -> set[str]:
    """Qids from a comma-separated list or from a file with one qid a line (blank lines skipped)."""
    if names_a_file(spec):
        qids = {line for _, line in lines(check_file(spec))}
    else:
        qids = {q.strip() for q in spec.split(",") if q.strip()}
    if not qids:
        raise DataError(f"{spec}: no query ids in it")
    return qids


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, instances: list[TrainInstance], cfg,
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


