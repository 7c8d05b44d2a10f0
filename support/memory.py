"""A memory plan for a GRPO run, made from the model's config before any weight is loaded, and the disk its saves need.

    python -m support.memory --config qwen2.5-7b --gpu-gb 80 --beta 0.001     # the published 7B config, no Hub needed
    python -m support.memory --config path/to/model --gpu-gb 24 --size 5      # any local HF checkpoint's config.json
    python -m support.memory --config qwen2.5-7b --gpu-gb 24 --lora-rank 16   # LoRA adapters on a frozen bf16 base

grpo.py calls `plan_memory` first: it prints the table and, with `--memory auto`, fills in the settings the user did
not give with the cheapest plan that fits (`choose`); flags the user gave always win. The last line is the disk's.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from support.cli import positive_float
from data import DataError
from support.model_shape import (
    LORA_TARGETS, PUBLISHED, Shape, lora_parameters, parse_targets, published_config, shape_of,
)

GB = 1e9
TEMPLATE_TOKENS = 300  # the REARANK prompt without passages (SmolLM2's tokenizer: ~280 on DL19/DL21)
PASSAGE_TOKENS = 115  # per passage: DL19/DL21 top-20 prompts average ~100 tokens a passage, the longest ~115
LOGITS_CHUNK_BYTES = 512 * 2**20  # one fp32 copy of a chunk's logits (micro-batch x positions x vocab) at most
HEADROOM = 0.9  # plan within 90% of the free memory: allocator fragmentation, CUDA workspaces, small buffers
ADAPTERS_OFF = "adapters off"  # LoRA's reference: the policy's own base, no copy (lora.py)


# ----------------------------------------------------------------------------------------------------------------------
# the arithmetic


@dataclass(frozen=True)
class Workload:
    """What the run does each step (grpo.Config's fields that move memory)."""

    batch_size: int  # B prompts
    group_size: int  # G completions each
    prompt_tokens: int  # P
    max_new_tokens: int  # C
    beta: float  # > 0: a reference model
    cuda: bool  # bf16 autocast, 8-bit Adam; CPU: no autocast, torch AdamW
    lora_rank: int = 0  # > 0: a frozen base (bf16 on CUDA) and fp32 adapters, the only trainable weights
    lora_targets: tuple[str, ...] = LORA_TARGETS


@dataclass(frozen=True)
class Settings:
    """The choices the planner makes (each also a grpo.py flag)."""

    bf16_weights: bool = False
    checkpointing: bool = False
    micro_batch: int = 0  # 0 = all G
    logits_chunk: int = 0  # positions per lm_head chunk; 0 = all at once
    reference: str = "none"  # none (beta 0), resident, offload, adapters off (LoRA)
    rollout_batch: int = 0  # prompts per generate call; 0 = all B

    def describe(self, group_size: int, lora_rank: int = 0) -> str:
        mb = self.micro_batch or group_size
        weights = 'bf16 weights (BF16AdamW)' if self.bf16_weights else 'fp32 master weights'
        weights = f"LoRA rank {lora_rank} (fp32 adapters, frozen base)" if lora_rank else weights
        rollout = f", rollout batch {self.rollout_batch}" if self.rollout_batch else ""
        return (f"{weights}{rollout}, "
                f"checkpointing {'on' if self.checkpointing else 'off'}, micro-batch {mb}, "
                f"logits in chunks of {self.logits_chunk or 'all'} positions, reference {self.reference}")


@dataclass(frozen=True)
class Plan:
    """Bytes per item and per phase; `peak` is the largest phase."""

    shape: Shape
    work: Workload
    settings: Settings
    weights: int
    grads: int
    optimizer: int
    casts: int  # autocast's cached bf16 copies of fp32 weights: rollout; training too unless checkpointing
    reference: int  # on the device during the training phase (resident) / the reference pass (either)
    kv_cache: int
    activations: int
    logits: int  # one chunk's logits, all their copies
    budget: int
    backward_temps: int = 0  # one layer's activation gradients during its backward (training)
    pass_temps: int = 0  # a no-grad log-prob pass's working set: the prompt's keys/values, one layer's tensors
    # the grpo.Config fields (names from PLANNED) `plan_run` chose with --memory auto; grpo.setup applies them
    choices: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def rollout(self) -> int:
        resident = self.reference if self.settings.reference == "resident" else 0
        return self.weights + self.optimizer + self.casts + resident + self.kv_cache

    @property
    def reference_pass(self) -> int:
        return self.weights + self.optimizer + self.reference + self.logits + self.pass_temps

    @property
    def training(self) -> int:
        resident = self.reference if self.settings.reference == "resident" else 0
        casts = 0 if self.settings.checkpointing else self.casts  # checkpointing: grpo.py turns autocast's cache off
        return (self.weights + self.grads + self.optimizer + resident + casts + self.activations + self.logits
                + self.backward_temps)

    @property
    def peak(self) -> int:
        return max(self.rollout, self.reference_pass, self.training)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget * HEADROOM

    def table(self) -> str:
        s, w = self.shape, self.work
        rows = [
            ("parameters", f"{s.params / 1e9:.2f} B", f"{s.layers} layers, hidden {s.hidden}, vocab {s.vocab}"),
            ("weights", gb(self.weights), "bf16" if self.settings.bf16_weights else "fp32 master"),
            ("gradients", gb(self.grads), "same dtype as the weights"),
            *lora_rows(self),  # LoRA: the two rows above say what they hold instead
            ("optimizer", gb(self.optimizer), optimizer_name(self.settings, w.cuda)),
            ("autocast casts", gb(self.casts), "-" if not self.casts else "bf16 copies of fp32 weights"
                                               + (", rollout only" if self.settings.checkpointing else "")),
            ("reference", gb(self.reference), self.settings.reference),
            ("KV cache", gb(self.kv_cache), f"{(self.settings.rollout_batch or w.batch_size) * w.group_size} rows x "
                                            f"{w.prompt_tokens + w.max_new_tokens} positions"),
            ("activations", gb(self.activations),
             f"prompt {w.prompt_tokens} once + {self.settings.micro_batch or w.group_size} x {w.max_new_tokens + 1}, "
             f"checkpointing {'on' if self.settings.checkpointing else 'off'}"),
            ("logits", gb(self.logits), f"chunks of {self.settings.logits_chunk or 'all'} positions"),
            ("backward temps", gb(self.backward_temps),
             "one layer's activation gradients" + (" beside its recompute" if self.settings.checkpointing else "")),
            ("no-grad pass temps", gb(self.pass_temps),
             "reference pass: the prompt's keys/values, one layer's tensors"),
            ("peak: rollout", gb(self.rollout), ""),
            ("peak: reference", gb(self.reference_pass), "" if w.beta > 0 else "no reference (beta 0)"),
            ("peak: training", gb(self.training), ""),
            ("peak", gb(self.peak), f"of {gb(self.budget)} free ({HEADROOM:.0%} usable): "
                                    f"{'fits' if self.fits else 'does NOT fit'}"),
        ]
        rows = list({name: (name, size, note) for name, size, note in rows}.values())  # a later row of a name wins
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {size:>9}  {note}".rstrip() for name, size, note in rows)


def gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def lora_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """With LoRA: the adapters' size, and the weights and gradients rows (replacing the earlier rows of those names)."""
    w = plan.work
    if not w.lora_rank:
        return []
    n = lora_parameters(plan.shape, w.lora_rank, w.lora_targets)
    return [("weights", gb(plan.weights), f"{'bf16' if w.cuda else 'fp32'} frozen base + fp32 adapters"),
            ("gradients", gb(plan.grads), "the adapters' only"),
            ("LoRA adapters", f"{n / 1e6:.1f} M", f"rank {w.lora_rank} on {', '.join(w.lora_targets)}")]


def optimizer_name(s: Settings, cuda: bool) -> str:
    if s.bf16_weights:
        return "BF16AdamW: bf16 moments, stochastic rounding"
    return "bitsandbytes AdamW8bit" if cuda else "torch AdamW, fp32 moments"


def prompt_tokens(size: int) -> int:
    """P for a REARANK prompt of `size` passages, from the measured per-passage length (an upper estimate).

    >>> prompt_tokens(20)
    2600
    """
    return TEMPLATE_TOKENS + PASSAGE_TOKENS * size


def optimizer_bytes(params: int, s: Settings, cuda: bool) -> int:
    if s.bf16_weights:
        return 4 * params  # m and v in bf16 (optimizer.BF16AdamW)
    if cuda:
        return params * 2 + params // 256 * 8  # 8-bit m and v, an fp32 absmax per 256-block each (bitsandbytes)
    return 8 * params  # fp32 m and v (torch.optim.AdamW)


def token_activation_bytes(shape: Shape, residual: int, compute: int) -> int:
    """Bytes autograd saves per query token per layer, keys/values aside (Llama layout under SDPA); `residual`: bytes
    of the hidden stream's dtype, `compute`: of the matmuls' (bf16 under autocast)."""
    h, i = shape.hidden, shape.intermediate
    norms = 2 * (4 * h + residual * h)  # x.float() (x itself in fp32), normalised
    if compute == residual:
        inputs = 2 * residual * h  # the weighted output, shared by the linears it feeds
    else:
        inputs = 5 * compute * h  # autocast: one cast per linear; the fp32 output is not saved
    attention = 2 * compute * h + compute * h + 4 * shape.heads  # q and out (SDPA), o_proj's contiguous input, lse
    mlp = 4 * compute * i  # gate out (silu's input), silu out, up out, their product (down_proj's input)
    return norms + inputs + attention + mlp


def key_activation_bytes(shape: Shape, compute: int) -> int:
    """Bytes SDPA saves per row per key position per layer: keys and values repeated to every head (repeat_kv)."""
    return 2 * compute * shape.heads * shape.head_dim


def auto_logits_chunk(shape: Shape, rows: int) -> int:
    """The largest power-of-two number of positions whose fp32 logits for `rows` rows stay within the chunk bytes."""
    chunk = LOGITS_CHUNK_BYTES // (4 * rows * shape.vocab)
    return max(1, 2 ** int(math.log2(max(1, chunk))))


def estimate(shape: Shape, work: Workload, s: Settings, budget: int) -> Plan:
    """The bytes of a run with settings `s`, per item and per phase of a step (rollout, reference, training); the
    peak is the largest. Activations are what autograd saves, per token per layer from the layers' own ops (Llama
    layout, SDPA); the shared prompt's graph counts once beside one micro-batch of completions. tests/test_memory.py
    checks the counts against what a tiny model really allocates.

    Pitfall: the training pass carries a 4-D mask, so SDPA saves keys/values repeated to every query head
    (`repeat_kv`), 2 x heads x head_dim values per key position, the prompt's P included.
    """
    N, L = shape.params, shape.layers
    lora = adapter_parameters(shape, work)
    wbytes = 2 if s.bf16_weights or (lora and work.cuda) else 4  # LoRA: the frozen base is bf16 on CUDA
    compute = 2 if (work.cuda or s.bf16_weights) else 4
    P, C = work.prompt_tokens, work.max_new_tokens
    rows = s.micro_batch or work.group_size
    reference = 0 if s.reference == "none" else (2 if work.cuda else 4) * N  # grpo.py: bf16 on CUDA, fp32 on CPU
    casts = 2 * N if work.cuda and not s.bf16_weights else 0
    if lora:  # the base is bf16 already; only the fp32 adapters get cast
        casts = 2 * lora if work.cuda else 0
    kv_cache = (s.rollout_batch or work.batch_size) * work.group_size * (P + C) * L * 2 * shape.kv_dim * compute
    tok = token_activation_bytes(shape, wbytes, compute)
    tok += compute * work.lora_rank * len(work.lora_targets)  # each lora_B saves its rank-wide input
    key = key_activation_bytes(shape, compute)
    prompt_layer = P * (tok + key)  # one layer of the prompt pass: one row, P positions
    completion_layer = rows * (C + 1) * (tok + key)  # the completions' own positions as queries and as keys
    completion_layer += rows * P * key  # each row's SDPA keys include the prompt's P positions
    prefix_kv = 3 * P * shape.kv_dim * (wbytes + compute) * L  # the prompt's keys/values, their leaves, their grads
    if s.checkpointing:  # each layer keeps its input; one layer's activations live during its recompute
        activations = (P + rows * (C + 1)) * wbytes * shape.hidden * L + max(prompt_layer, completion_layer)
    else:
        activations = (prompt_layer + completion_layer) * L
    activations += prefix_kv
    positions = s.logits_chunk or (C + 1)
    logits = rows * min(positions, C + 1) * shape.vocab * (compute + 12)  # bf16 out, fp32 copy, exp temp, grad
    # the backward of a layer holds the gradients of its saved activations (recomputed first, with checkpointing):
    # about as many bytes as the layer's activations themselves
    backward_temps = max(prompt_layer, completion_layer)
    pass_temps = no_grad_pass_bytes(shape, work, rows, 2 if work.cuda else 4) if s.reference != "none" else 0
    if lora:  # the frozen base plus fp32 adapters; gradients and Adam for the adapters only; the reference is free
        return Plan(shape, work, s, N * wbytes + 4 * lora, 4 * lora, optimizer_bytes(lora, s, work.cuda), casts, 0,
                    kv_cache, activations, logits, budget, backward_temps=backward_temps, pass_temps=pass_temps)
    return Plan(shape, work, s, N * wbytes, N * wbytes, optimizer_bytes(N, s, work.cuda), casts, reference,
                kv_cache, activations, logits, budget, backward_temps=backward_temps, pass_temps=pass_temps)


def no_grad_pass_bytes(shape: Shape, work: Workload, rows: int, dtype: int) -> int:
    """The working set of a no-grad log-prob pass beside its weights and logits: the prompt's keys and values for
    every layer, and one layer's tensors for a micro-batch of completions (keys/values repeated to every head)."""
    P, C = work.prompt_tokens, work.max_new_tokens
    prompt_kv = P * shape.layers * 2 * shape.kv_dim * dtype
    layer = rows * (C + 1) * token_activation_bytes(shape, dtype, dtype) + rows * (P + C + 1) * key_activation_bytes(
        shape, dtype)
    return prompt_kv + layer


# ----------------------------------------------------------------------------------------------------------------------
# the choice


def halvings(n: int) -> list[int]:
    """n, n/2, ..., 1: the micro-batch sizes (n = G) and rollout batches (n = B) worth trying.

    >>> halvings(8), halvings(6)
    ([8, 4, 2, 1], [6, 3, 1])
    """
    out, m = [], n
    while m >= 1:
        out.append(m)
        m //= 2
    return out if out[-1] == 1 else out + [1]


def preference(s: Settings, group_size: int) -> tuple:
    """Lower is better: every prompt in one generate call (decoding reads all the weights each token, whatever the
    rows), then checkpointing off (it recomputes the forward), then the reference resident (else it crosses PCIe
    each step), then the largest micro-batch."""
    return -(s.rollout_batch or math.inf), s.checkpointing, s.reference == "offload", -(s.micro_batch or group_size)


def choose(shape: Shape, work: Workload, budget: int, given: dict) -> tuple[Plan, list[str]]:
    """The cheapest plan that fits, keeping the settings in `given` (Settings field -> value): fp32 master weights
    before bf16 ones (noisier: stochastic rounding), then by `preference`. Returns the plan and why; a plan that does
    not fit means nothing fits."""
    def options(name, values):
        return [given[name]] if name in given else values

    refs = ["none"] if work.beta <= 0 else options("reference", ["resident", "offload"])
    if work.lora_rank and work.beta > 0:
        refs = [ADAPTERS_OFF]
    mbs = options("micro_batch", halvings(work.group_size))
    rbs = options("rollout_batch", [0] + halvings(work.batch_size)[1:])  # 0: all B prompts at once
    tried = []
    for bf16 in options("bf16_weights", [False] if work.lora_rank else [False, True]):  # LoRA: fp32 adapters
        fitting = []
        for ckpt in options("checkpointing", [False, True]):
            for mb in mbs:
                for ref in refs:
                    for rb in rbs:
                        rows = mb or work.group_size
                        chunk = given.get("logits_chunk") or auto_logits_chunk(shape, rows)
                        s = Settings(bf16, ckpt, 0 if rows == work.group_size else rows, chunk, ref,
                                     0 if rb >= work.batch_size else rb)
                        plan = estimate(shape, work, s, budget)
                        tried.append(plan)
                        if plan.fits:
                            fitting.append(plan)
        if fitting:
            best = min(fitting, key=lambda p: preference(p.settings, work.group_size))
            return best, reasons(best, given, work)
    return min(tried, key=lambda p: p.peak), []


def reasons(plan: Plan, given: dict, work: Workload) -> list[str]:
    s, out = plan.settings, []
    weights = plan.weights + plan.grads + plan.optimizer
    if work.lora_rank:
        out.append(f"LoRA rank {work.lora_rank}: {gb(weights)} of frozen base, adapters, their gradients and "
                   "optimizer state")
    elif "bf16_weights" not in given:
        out.append("bf16 weights: fp32 master weights do not fit" if s.bf16_weights else
                   f"fp32 master weights fit ({gb(weights)} with gradients and optimizer state)")
    if "checkpointing" not in given and s.checkpointing:
        out.append("activation checkpointing: the activations do not fit otherwise")
    if "micro_batch" not in given and s.micro_batch:
        out.append(f"micro-batch {s.micro_batch}: all {work.group_size} completions at once do not fit")
    if "reference" not in given and s.reference not in ("none", ADAPTERS_OFF):
        out.append(f"reference {s.reference}: " + reference_reason(s, work))
    if "rollout_batch" not in given and s.rollout_batch:
        out.append(f"rollout batch {s.rollout_batch}: the KV cache of all {work.batch_size} prompts' "
                   f"{work.batch_size * work.group_size} rows at once does not fit")
    if "logits_chunk" not in given:
        out.append(f"logits in chunks of {s.logits_chunk} positions: one fp32 chunk <= "
                   f"{LOGITS_CHUNK_BYTES / 2**20:.0f} MiB")
    return out


def reference_reason(s: Settings, work: Workload) -> str:
    """Why the plan put the reference where it did, as `preference` ranks the plans."""
    if s.reference == "resident":
        return "it fits beside the policy"
    copy = "a resident bf16 copy" if work.cuda else "a resident fp32 copy"
    if s.checkpointing:
        return f"{copy} does not fit, even with checkpointing"
    return f"{copy} does not fit without checkpointing, and offloading costs less than its recompute"


def what_would_fit(shape: Shape, work: Workload, budget: int, given: dict) -> str:
    """For the error message: the device size the leanest plan needs, and the longest completions that fit."""
    lean = {"bf16_weights": not work.lora_rank, "checkpointing": True, "micro_batch": 1, "rollout_batch": 1, **given}
    if work.beta > 0:
        lean.setdefault("reference", ADAPTERS_OFF if work.lora_rank else "offload")
    need = estimate(shape, work, Settings(lean["bf16_weights"], lean["checkpointing"], lean["micro_batch"],
                                          lean.get("logits_chunk") or auto_logits_chunk(shape, 1),
                                          lean.get("reference", "none"), lean["rollout_batch"]), budget).peak
    parts = [f"the leanest settings need {gb(need)}: a device with >= {gb(int(need / HEADROOM))} free"]
    if not {"micro_batch", "checkpointing", "bf16_weights"} <= set(given):
        parts.append("or drop --micro-batch/--gradient-checkpointing/--bf16-weights choices so the planner may "
                     "use them")
    for c in (work.max_new_tokens // 2, work.max_new_tokens // 4, 128, 64):
        w = replace(work, max_new_tokens=c)
        if c >= 16 and choose(shape, w, budget, given)[0].fits:
            parts.append(f"or --max-new-tokens {c}")
            break
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# the disk: what the run's saves write under --out


@dataclass(frozen=True)
class Disk:
    """The bytes one save writes under --out (checkpoint.save_checkpoint), the most the run needs at once, and the
    free space there."""

    weights: int  # checkpoint/model.safetensors: the weights in their training dtype
    optimizer: int  # checkpoint/optimizer.safetensors (0 with --save-optimizer off)
    export: int  # model/: the weights in checkpoint.export_dtype (bf16 on CUDA, the training dtype on CPU)
    replaces: bool  # a save replaces an earlier one (several saves this run, or a resumed run's folders)
    existing: int  # bytes already in --out's checkpoint/ and model/ (a resumed run): replaced, so they come back
    free: int
    where: str  # --out as given (its free space is its nearest existing folder's)

    @property
    def save(self) -> int:
        return self.weights + self.optimizer + self.export

    @property
    def at_once(self) -> int:
        """The most on disk at once: checkpoint.replace_dir keeps each old folder until the new one is whole."""
        return self.save + (max(self.weights + self.optimizer, self.export) if self.replaces else 0)

    @property
    def need(self) -> int:
        return max(0, self.at_once - self.existing)

    @property
    def fits(self) -> bool:
        return self.need <= self.free * DISK_HEADROOM

    def line(self) -> str:
        ckpt = f"checkpoint/ {size(self.weights + self.optimizer)}: weights {size(self.weights)}" + (
            f" + optimizer state {size(self.optimizer)}" if self.optimizer else " (no optimizer state)")
        existing = f", {size(self.existing)} of it already there" if self.existing else ""
        return (f"disk: one save writes {size(self.save)} ({ckpt}; model/ {size(self.export)}); at most "
                f"{size(self.at_once)} at once" + (" (the old checkpoint kept until the new one is whole)"
                                                   if self.replaces else "") +
                f"{existing}; {size(self.free)} free under {self.where}: {'fits' if self.fits else 'does NOT fit'}")


def size(n: int) -> str:
    """GB, or MB below a tenth of one (a tiny model's saves).

    >>> size(60_900_000_000), size(6_300_000)
    ('60.9 GB', '6.3 MB')
    """
    return gb(n) if n >= GB / 10 else f"{n / 1e6:.1f} MB"


DISK_HEADROOM = 0.95  # the tokenizer files, the logs, the filesystem's own reserve


def free_disk(out: str) -> int:
    """Free bytes of the filesystem --out will be on: its nearest existing folder's (--out may not exist yet)."""
    where = Path(out).absolute()
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free


def folder_bytes(*folders: Path) -> int:
    return sum(f.stat().st_size for d in folders if d.is_dir() for f in d.rglob("*") if f.is_file())


def adapter_parameters(shape: Shape, work: Workload) -> int:
    """The LoRA adapters' parameter count (0 without LoRA)."""
    return lora_parameters(shape, work.lora_rank, work.lora_targets) if work.lora_rank else 0


def disk_plan(shape: Shape, s: Settings, cuda: bool, out: str, save_optimizer: bool, replaces: bool,
              lora: int = 0) -> Disk:
    """What the saves of a run with settings `s` write under `out` (its checkpoint/ and model/ as they are now); with
    `lora` adapters, checkpoint/ holds only them and their optimizer state."""
    n = shape.params
    weights = 4 * lora if lora else n * (2 if s.bf16_weights else 4)
    optimizer = optimizer_bytes(lora or n, s, cuda) if save_optimizer else 0
    export = n * (2 if cuda or (s.bf16_weights and not lora) else 4) + 4 * lora  # checkpoint.export_dtype
    existing = folder_bytes(Path(out) / "checkpoint", Path(out) / "model")
    return Disk(weights, optimizer, export, replaces or existing > 0, existing, free_disk(out), out)


def what_fits_on_disk(disk: Disk) -> str:
    """For the error message: a bigger disk, and the settings that write less and would fit this one."""
    parts = [f"--out on a disk with >= {size(int(disk.need / DISK_HEADROOM))} free"]
    lean = replace(disk, optimizer=0)
    if disk.optimizer and lean.fits:
        parts.append(f"--save-optimizer off (checkpoint/ without Adam's moments: {size(lean.need)} at once; a "
                     "--resume restarts the moments from zero)")
    if disk.replaces and not disk.existing and replace(disk, replaces=False).fits:
        parts.append(f"--save-every 0 (one save, at the end: {size(disk.save)})")
    return "; or ".join(parts)


def check_disk(cfg, plan: Plan) -> Disk:
    """Print what the run's saves need under --out, and stop (PlanError) before any weight is loaded when the disk
    cannot hold them, rather than at the first checkpoint."""
    replaces = 0 < cfg.save_every < cfg.steps  # a save before the last one: the last replaces it
    disk = disk_plan(plan.shape, plan.settings, plan.work.cuda, cfg.out, cfg.save_optimizer == "on", replaces,
                     adapter_parameters(plan.shape, plan.work))
    print(disk.line())
    if not disk.fits:
        raise PlanError(f"disk: the saves need {size(disk.need)} under {disk.where}, {size(disk.free)} free "
                        f"({DISK_HEADROOM:.0%} usable); would fit: {what_fits_on_disk(disk)}")
    return disk


# ----------------------------------------------------------------------------------------------------------------------
# the device and the grpo.py hook


def free_bytes(cuda: bool) -> int:
    """Free memory of the device the run will use: CUDA's free memory, else the RAM the kernel calls available."""
    if cuda:
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PlanError(DataError):
    """Nothing fits: the message says what would."""


PLANNED = ("bf16_weights", "gradient_checkpointing", "micro_batch", "logits_chunk", "reference", "rollout_batch")


def plan_memory(cfg, explicit: set[str] | None) -> Plan | None:
    """Print and return the plan for grpo.Config `cfg` (not changed), before any weight is loaded; None for a model
    whose config cannot be read. `explicit` None: the fields that differ from their defaults count as given."""
    import torch

    from support.backend import SMOLLM2, smollm2_dir

    if explicit is None:
        explicit = {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default}
    try:
        config = published_config(str(smollm2_dir()) if cfg.model == SMOLLM2 else cfg.model)
    except (OSError, ValueError) as e:
        print(f"memory plan: skipped, cannot read the model's config ({str(e).splitlines()[0][:200]})")
        return None
    plan = plan_run(cfg, explicit, config, torch.cuda.is_available())
    check_disk(cfg, plan)
    return plan


def lora_work(cfg, shape: Shape) -> tuple[int, tuple[str, ...]]:
    """Workload's LoRA fields from grpo.Config `cfg`; targets outside the Llama layout are a DataError."""
    rank, targets = getattr(cfg, "lora_rank", 0), parse_targets(getattr(cfg, "lora_targets", ""))
    if not rank:
        return 0, LORA_TARGETS
    try:
        lora_parameters(shape, rank, targets)
    except ValueError as e:
        raise DataError(f"--lora-targets {cfg.lora_targets}: {e} (or plan nothing: --memory off)") from None
    return rank, targets


def plan_run(cfg, explicit: set[str], config, cuda: bool, budget: int | None = None) -> Plan:
    """Print the plan for `cfg`; with --memory auto its `choices` fill in the fields not in `explicit` (those set on
    the command line). Raises PlanError if nothing fits."""
    shape = shape_of(config)
    budget = budget or int(cfg.memory_gb * GB) or free_bytes(cuda)
    work = Workload(cfg.batch_size, cfg.group_size, prompt_tokens(cfg.size), cfg.max_new_tokens, cfg.beta, cuda,
                    *lora_work(cfg, shape))
    ref = getattr(cfg, "reference", "auto")
    ref = ADAPTERS_OFF if work.lora_rank else ref
    as_given = dict(bf16_weights=cfg.bf16_weights, checkpointing=cfg.gradient_checkpointing,
                    micro_batch=cfg.micro_batch if cfg.micro_batch < cfg.group_size else 0,
                    logits_chunk=cfg.logits_chunk, reference=ref if ref != "auto" else "resident",
                    rollout_batch=getattr(cfg, "rollout_batch", 0) if cfg.rollout_batch < cfg.batch_size else 0)
    names = {"gradient_checkpointing": "checkpointing"}
    if cfg.memory == "off":
        s = Settings(**{**as_given, "reference": as_given["reference"] if cfg.beta > 0 else "none"})
        plan = estimate(shape, work, s, budget)
        print(f"memory plan (--memory off: the flags as given): {s.describe(cfg.group_size, work.lora_rank)}\n"
              f"{plan.table()}")
        if not plan.fits:
            print("memory: this plan does not fit; --memory auto would choose settings that do")
        return plan
    given = {names.get(k, k): as_given[names.get(k, k)] for k in explicit if k in PLANNED}
    if given.get("reference") == "auto":
        del given["reference"]
    if not given.get("logits_chunk", 1):
        del given["logits_chunk"]  # 0 = let the planner pick
    plan, why = choose(shape, work, budget, given)
    print(f"memory plan (--memory auto): {plan.settings.describe(cfg.group_size, work.lora_rank)}\n{plan.table()}")
    if not plan.fits:
        raise PlanError(f"memory: no settings fit in {gb(budget)} ({gb(int(budget * HEADROOM))} usable); "
                           + what_would_fit(shape, work, budget, given))
    for line in why:
        print(f"  chose {line}")
    s = plan.settings
    choices = dict(bf16_weights=s.bf16_weights, gradient_checkpointing=s.checkpointing, micro_batch=s.micro_batch,
                   logits_chunk=s.logits_chunk, rollout_batch=s.rollout_batch)
    if s.reference not in ("none", ADAPTERS_OFF):  # beta 0 and LoRA leave --reference as it is
        choices["reference"] = s.reference
    return replace(plan, choices=choices)


def config_for(name: str):
    """--config: a shipped name (PUBLISHED, or smollm2), a local directory holding a config.json, or a hub id that is
    cached or reachable; anything else is a DataError that says what to pass."""
    from support.backend import SMOLLM2, ModelError, check_loadable, smollm2_dir

    shipped = f"a shipped config ({', '.join([*PUBLISHED, SMOLLM2])})"
    if name == SMOLLM2:
        name = str(smollm2_dir())
    elif Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise DataError(f"--config {name}: the directory holds no config.json; pass {shipped} or a model directory")
    elif name not in PUBLISHED:
        try:
            check_loadable(name)
        except ModelError:
            raise DataError(f"--config {name!r}: not {shipped}, not a local directory with a config.json, and not a "
                            "hub id this machine has cached or can reach; pass one of those (a hub id needs the "
                            "Hub online)") from None
    try:
        return published_config(name)
    except (OSError, ValueError) as e:
        raise DataError(f"--config {name}: cannot read its config ({str(e).splitlines()[0][:200]})") from None


def main(argv: list[str] | None = None) -> None:
    try:
        plan_cli(argv)
    except DataError as e:
        sys.exit(f"error: {e}")


def plan_cli(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen2.5-7b", help=f"{', '.join(PUBLISHED)}, or a model directory / hub id")
    p.add_argument("--gpu-gb", type=positive_float, default=80.0, help="free device memory in GB")
    p.add_argument("--cpu", action="store_true", help="plan for a CPU run (no autocast, torch AdamW)")
    p.add_argument("--beta", type=float, default=0.001)
    p.add_argument("--size", type=int, default=20, help="passages per prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--out", default="runs/grpo", help="where the run saves: the disk line checks its free space")
    p.add_argument("--save-optimizer", default="on", choices=("on", "off"))
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on a frozen base (0 = full "
                                                             "fine-tuning)")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="linears with adapters, comma-separated")
    args = p.parse_args(argv)
    shape = shape_of(config_for(args.config))
    work = Workload(args.batch_size, args.group_size, prompt_tokens(args.size), args.max_new_tokens, args.beta,
                    not args.cpu, *lora_work(args, shape))
    budget = int(args.gpu_gb * GB)
    plan, why = choose(shape, work, budget, {})
    print(f"{args.config} on {args.gpu_gb:g} GB, beta {args.beta:g}, B {args.batch_size} x G {args.group_size}, "
          f"P {work.prompt_tokens} (--size {args.size}), C {args.max_new_tokens}")
    print(f"plan: {plan.settings.describe(args.group_size, work.lora_rank)}\n{plan.table()}")
    if not plan.fits:  # a script that plans before it trains must see the failure
        raise DataError("nothing fits: " + what_would_fit(shape, work, budget, {}))
    for line in why:
        print(f"  chose {line}")
    print(disk_plan(shape, plan.settings, not args.cpu, args.out, args.save_optimizer == "on", True,
                    adapter_parameters(shape, work)).line())


if __name__ == "__main__":
    main()
