"""The optimizer of the GRPO loop, and a check that it moves the weights at all.

    make_optimizer    AdamW: bitsandbytes' 8-bit AdamW on CUDA, torch's on CPU, BF16AdamW with --bf16-weights
    BF16AdamW         AdamW for bf16 weights and moments, written back with stochastic rounding
    weight_sample     a small CPU sample of every tensor, to report what fraction of the weights a step moved

Why BF16AdamW exists (grpo.py's docstring, departure 6): Adam steps of lr = 1e-6 vanish when added to bf16 weights
(the bf16 spacing near 0.02 is 1.2e-4), so by default the weights stay fp32; but fp32 master weights with 8-bit Adam
cost 10 bytes a parameter, 76 GB for a 7B model. bf16 weights with stochastic rounding cost 8 and still learn:
a 1e-6 step moves a weight one bf16 spacing with probability 1e-6 / spacing, so the updates add up on average.

Reading order: beside prefix.py (independent of the rest); grpo.py imports it.
"""

from __future__ import annotations

import torch


def make_optimizer(model, cfg, cuda: bool | None = None):
    """BF16AdamW with --bf16-weights; else bitsandbytes 8-bit AdamW on CUDA (2 bytes of state a parameter, not 8),
    torch AdamW on CPU. `cuda` None: whether CUDA is available; True on CPU builds the 8-bit AdamW a CUDA run gets
    (bitsandbytes 0.50 runs it on the CPU too: tests/test_plan_matrix.py trains with it there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.bf16_weights:
        return BF16AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)
    if torch.cuda.is_available() if cuda is None else cuda:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up or down at random with probability proportional to closeness, so
    the rounding is unbiased and updates far below bf16's spacing still add up (Gupta et al., 2015).

    bf16 is the top half of fp32: add uniform noise to the 16 bits that get cut, then cut them (sign-magnitude, so this
    rounds away from zero with the right probability for negative numbers too).
    """
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=bits.dtype, device=bits.device, generator=generator)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # the low 16 bits are 0: the cast to bf16 is exact


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: moments stored in bf16, the step computed in fp32; weights and moments are written back
    with stochastic rounding. 8 bytes a parameter (weight, grad, two moments), against 10 for fp32 master weights with
    8-bit Adam.

    The moments need the stochastic rounding too: v's 0.1 % decay a step (beta2 = 0.999) is below half a bf16
    spacing (0.39 %), so round-to-nearest leaves v where it was and it stops tracking g^2 (0.25 of the truth after
    3,000 steps of a constant gradient); rounded at random, v decays right on average.

    The rounding's random numbers are a function of (seed, step, parameter), drawn from a generator of their own: on
    several processes every replica rounds the same all-reduced update the same way, so the replicas stay bitwise
    equal (each process's own sampling generator would make them drift apart from the first step); and a resumed run
    rounds as an uninterrupted one, the step being in the optimizer state."""

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
        """One AdamW step; `closure` re-evaluates the loss, as torch's optimizers take it (Accelerate's
        AcceleratedOptimizer always passes one, None by default). Returns its loss."""
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
                    stochastic_round_(v, v32, gen)
                    update = (m32 / c1) / ((v32 / c2).sqrt() + group["eps"])
                    stochastic_round_(w, w.float() * (1 - lr * group["weight_decay"]) - lr * update, gen)
        return loss


def weight_sample(params: list[torch.Tensor], per_tensor: int = 1024) -> list[torch.Tensor]:
    """Up to `per_tensor` evenly spaced entries of each tensor, copied to the CPU: enough to see whether the weights
    move, at a few MB for a 7B model (a copy of every 10th tensor would take 5.4 GB of GPU memory)."""
    out = []
    for p in params:
        flat = p.detach().reshape(-1)
        out.append(flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].to("cpu", copy=True))
    return out


def moved_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum(int((a != b).sum()) for a, b in zip(after, before))
    return changed / sum(b.numel() for b in before)
