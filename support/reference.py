"""The frozen reference of the KL term: resident on the device or offloaded to CPU memory between passes."""

from __future__ import annotations

import contextlib
import copy

import torch

from support.backend import rotary_buffers

REFERENCE_PLACEMENTS = ("auto", "resident", "offload")


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
    for 7B). The CPU copy is made once, pinned when CUDA is there (copied in without a staging copy, asynchronously,
    instead of page-faulting fresh pageable memory each step: docs/from-code-method.md); after the pass the model
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

    @contextlib.contextmanager
    def on_device(self):
        """The reference model, on the device for one no-grad pass (offloaded: copied in, then freed)."""
        for t, h in zip(self.tensors(), self.host):  # offloaded: in, ordered before the pass's kernels
            t.data = h.to(self.device, non_blocking=True, copy=True)
        try:
            yield self.model
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


