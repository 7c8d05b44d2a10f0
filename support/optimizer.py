"""The optimizer of the GRPO loop (AdamW, 8-bit AdamW on CUDA, BF16AdamW with --bf16-weights), and a check that a
step moves the weights at all (weight_sample, moved_fraction).

A 1e-6 Adam step vanishes when added to a bf16 weight (the spacing near 0.02 is 1.2e-4), so by default weights stay
fp32; BF16AdamW keeps them bf16 and rounds stochastically, so the updates still add up on average.
"""

from __future__ import annotations

import torch


def make_optimizer(model, cfg, cuda: bool | None = None):
    """BF16AdamW with --bf16-weights; else 8-bit AdamW on CUDA, torch AdamW on CPU. `cuda` None: whether CUDA is
    available; True on CPU builds the CUDA run's 8-bit AdamW (tests/test_plan_matrix.py trains with it there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.bf16_weights:
        return BF16AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)
    if torch.cuda.is_available() if cuda is None else cuda:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up or down at random in proportion to closeness: unbiased, so
    updates far below bf16's spacing still add up (Gupta et al., 2015)."""
    # bf16 is the top half of fp32: add uniform noise to the 16 bits that get cut, then cut them (sign-magnitude,
    # so negative numbers round with the right probability too)
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=bits.dtype, device=bits.device, generator=generator)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # the low 16 bits are 0: the cast to bf16 is exact


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights and bf16 moments, the step computed in fp32, all written back with stochastic rounding
    (8 bytes a parameter against 10 for fp32 master weights with 8-bit Adam).

    The rounding's noise depends on (seed, step, parameter) only, so replicas round the same all-reduced update alike
    and stay bitwise equal, and a resumed run rounds as an uninterrupted one."""

    CHUNK = 1 << 24  # elements per fp32 temporary: a 545M-parameter embedding must not need 4 fp32 copies at once

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def rounding_generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        """The generator of parameter `index`'s rounding at `step`: seeded from (seed, step, index) alone."""
        if device not in self.generators:
            self.generators[device] = torch.Generator(device)
        return self.generators[device].manual_seed(((self.seed * 1_000_003 + step) * 1_000_003 + index) % 2**63)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; returns `closure`'s loss (Accelerate always passes a closure, None by default)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # the parameter's place in the groups: its rounding generator's seed
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                c1, c2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                gen = self.rounding_generator(p.device, state["step"], index)
                views = (t.view(-1).split(self.CHUNK) for t in (p, p.grad, state["m"], state["v"]))
                for w, g, m, v in zip(*views):
                    g = g.float()
                    m32 = m.float().mul_(b1).add_(g, alpha=1 - b1)
                    v32 = v.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    stochastic_round_(m, m32, gen)
                    stochastic_round_(v, v32, gen)  # v's 0.1 % decay is below half a spacing: nearest would freeze it
                    update = (m32 / c1) / ((v32 / c2).sqrt() + group["eps"])
                    stochastic_round_(w, w.float() * (1 - lr * group["weight_decay"]) - lr * update, gen)
        return loss


def weight_sample(params: list[torch.Tensor], per_tensor: int = 1024) -> list[torch.Tensor]:
    """Up to `per_tensor` evenly spaced entries of each tensor, copied to the CPU: enough to see whether the weights
    move, at a few MB for a 7B model."""
    out = []
    for p in params:
        flat = p.detach().reshape(-1)
        out.append(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].to("cpu", copy=True))
    return out


def moved_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum(int((a != b).sum()) for a, b in zip(after, before))
    return changed / sum(b.numel() for b in before)
