"""LoRA (Hu et al., arXiv 2106.09685): train small low-rank adapters beside a frozen base instead of every weight, as
Rank-R1 trained its rerankers (rank 16 on every linear of attention and MLP), through `peft`.

    python grpo.py --model Qwen/Qwen2.5-7B-Instruct --lora-rank 16     # 7B on one 24-48 GB GPU (memory.py's plan)

Each adapted linear computes W x + (alpha / r) B A x, with A (r x in) and B (out x r); B starts at zero, so the
untrained policy is the base exactly. What changes in the loop:
- the base is frozen and bf16 on CUDA (no master copy: it never steps), the adapters fp32 and alone in the optimizer;
- the KL's reference is the same model with its adapters switched off (`AdapterOff`): no second copy, no offload;
- checkpoint/ holds the adapters and their optimizer state (megabytes); model/ the merged weights W + (alpha/r) B A
  under the base's own names, so eval.py loads it as any model; adapter/ peft's own files, for serving the base with
  adapters (transformers, vLLM and TGI read them).
`cfg` below is grpo.Config; the reference pass is grpo.group_logprobs under `AdapterOff`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from support.backend import cast_model
from support.checkpoint import export_dtype, export_model, fresh_dir, replace_dir, write_checkpoint
from data import DataError
from support.model_shape import parse_targets
from support.runlog import read_jsonl


def wrap(model, cfg):
    """The loaded model as a peft model: every base weight frozen (bf16 on CUDA, fp32 on CPU), rank-`cfg.lora_rank`
    adapters on `cfg.lora_targets`, trainable and fp32 (Adam's steps of 1e-6 would vanish in bf16)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    cast_model(model, torch.bfloat16 if torch.cuda.is_available() else torch.float32)  # RoPE's frequencies stay fp32
    targets = list(parse_targets(cfg.lora_targets))
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    try:
        policy = get_peft_model(model, config)
    except ValueError as e:  # peft names the targets it did not find
        raise DataError(f"--lora-targets {cfg.lora_targets}: {str(e).splitlines()[0][:300]}") from None
    for p in policy.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    print(f"lora: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {cfg.lora_targets}: {trainable / 1e6:.2f} M "
          f"trainable parameters ({trainable / total:.2%} of {total / 1e6:.1f} M)")
    return policy


class AdapterOff:
    """The KL's frozen reference under LoRA: the policy itself with its adapters switched off, which is the initial
    model exactly (the base never trains). Used as rollout.Reference is, in the same no-grad pass."""

    def __init__(self, policy):
        self.policy = policy

    @contextlib.contextmanager
    def on_device(self):
        """The policy with its adapters switched off: the initial model, for one no-grad pass."""
        with self.policy.disable_adapter():
            yield self.policy


def make_reference(policy) -> AdapterOff:
    print("reference: the base with the adapters switched off (no copy: 0 GB)")
    return AdapterOff(policy)


class Adapters:
    """The trainable tensors of a peft model as a module-like state dict: what checkpoint/ saves and --resume loads
    (checkpoint.write_checkpoint / load_checkpoint take it in the model's place)."""

    def __init__(self, policy):
        self.params = {name: p for name, p in policy.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.copy_(weights[name])


def checkpointed(policy, cfg):
    """What checkpoint/ holds and --resume restores: the adapters with LoRA, else the whole policy."""
    return Adapters(policy) if cfg.lora_rank else policy


@torch.no_grad()
def merged_weights(policy, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's state dict with each adapted weight replaced by W + (alpha/r) B A, in `dtype` on the CPU, one
    tensor at a time (a merged copy of the whole model never sits on the GPU). The policy itself is not touched:
    merging in place and unmerging after would leave the bf16 base a rounding away from where it was."""
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight("default")
              for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    out, cast = {}, {}  # tied weights share one CPU copy (save_pretrained stores them once)
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = value.to(deltas[key].dtype) + deltas[key]  # the sum in the adapters' fp32
        out[key.replace(".base_layer.", ".")] = cast.setdefault((value.data_ptr(), tuple(value.shape)),
                                                                value.to("cpu", dtype))
    return out


def export_adapter(dest: Path, policy) -> None:
    """<out>/adapter/: adapter_config.json and adapter_model.safetensors as peft writes them, renamed into place."""
    tmp = fresh_dir(dest)
    policy.save_pretrained(tmp)
    replace_dir(tmp, dest)


def save(out: Path, policy, tokenizer, optimizer, step: int, rngs: list[dict], cfg) -> None:
    """With LoRA: checkpoint/ (adapters + their optimizer state), model/ (merged), adapter/ (peft's format)."""
    write_checkpoint(out / "checkpoint", Adapters(policy), optimizer, step, rngs, cfg)
    held = read_jsonl(out / "eval.jsonl")
    base = policy.get_base_model()
    param = next(base.parameters())
    export_model(out / "model", base, tokenizer, cfg, step, held[-1] if held else None,
                 weights=merged_weights(policy, export_dtype(param.dtype, param.is_cuda)))
    export_adapter(out / "adapter", policy)
