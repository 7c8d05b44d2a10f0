"""A training run's logs: one line a step on stdout, and JSON lines under --out, each record tagged with its `step`:
metrics.jsonl (one a step), eval.jsonl (one a held-out evaluation), episodes.jsonl (one group in full every
--dump-every steps); and curves.png drawn from them.

    python grpo.py --out runs/grpo --plot                  # redraw runs/grpo/curves.png from its logs
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from support.files import DataError


def log_line(m: dict) -> str:
    return (
        f"step {m['step']}/{m['steps']} | reward {m['reward']:.3f}±{m['reward_std']:.3f} "
        f"(rank {m['rank']:+.3f} in-group std {m.get('rank_group_std', 0.0):.3f} f1 {m['format1']:.2f} "
        f"f2 {m['format2']:.2f}) | zero-std {m['frac_zero_std']:.2f} | "
        f"len {m['completion_len']:.0f} trunc {m['frac_truncated']:.2f} | kl {m['kl']:.3g} clip {m['clip_frac']:.3f} | "
        f"gnorm {m['grad_norm']:.3f} lr {m['lr']:.1e} | gen {m['gen_s']:.0f}s train {m['train_s']:.0f}s "
        f"(ref {m.get('ref_s', 0.0):.1f}s)"
    )


def step_record(step: int, steps: int, outcomes, group_size: int, losses: list[float], stats: dict[str, float],
                grad_norm: float, lr: float, seconds: dict[str, float]) -> dict:
    """What one step did, as the JSON object of metrics.jsonl; `outcomes` holds every process's completions."""
    r = torch.tensor([x.total for x in outcomes.rewards])  # (B*G,) groups laid out one after another
    rank = torch.tensor([x.rank for x in outcomes.rewards]).view(-1, group_size)  # (B, G)
    return {
        "step": step,
        "steps": steps,
        "reward": r.mean().item(),
        "reward_std": r.std().item() if r.numel() > 1 else 0.0,
        "rank": float(np.mean([x.rank for x in outcomes.rewards])),
        "format1": float(np.mean([x.format1 for x in outcomes.rewards])),
        "format2": float(np.mean([x.format2 for x in outcomes.rewards])),
        "ndcg@10": float(np.mean([x.ndcg for x in outcomes.rewards])),
        "frac_zero_std": (r.view(-1, group_size).std(dim=1) == 0).float().mean().item(),  # groups teaching nothing
        # how far apart the orders of one group score: near 0, the advantages come from the format terms or noise
        "rank_group_std": rank.std(dim=1).mean().item(),
        "completion_len": torch.tensor(outcomes.lengths, dtype=torch.float32).mean().item(),
        "frac_truncated": float(np.mean(outcomes.truncated)),
        "loss": float(np.mean(losses)),
        **stats,
        "grad_norm": grad_norm,
        "lr": lr,
        **seconds,  # train_s includes the reference pass, ref_s
    }


def episodes(step: int, inst, ro, adv) -> list[dict]:
    """The first group of a rollout batch in full, for episodes.jsonl (`adv`: (B*G,))."""
    return [{"step": step, "qid": inst.qid, "query": inst.query, "completion": ro.texts[g],
             "reward": ro.rewards[g].asdict(), "advantage": adv[g].item()} for g in range(ro.group_size)]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a log file; a half-written last line (a killed run) is dropped, a damaged earlier line is an
    error naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno < len(lines) and line.strip():
                raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg}); use a new --out") from None
    return records


def append_jsonl(path: Path, *records: dict) -> None:
    """Records at the end of a log, one a line, flushed when the file closes: a kill loses at most these lines."""
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def rewind_logs(out: Path, step: int, write: bool) -> None:
    """The logs as the checkpoint of `step` left them (step 0 removes them); every process reads, only a `write`r
    writes."""
    # eval.jsonl's record of `step` goes too: the resumed loop evaluates before the step it resumes at
    for name, keep in (("metrics.jsonl", step), ("episodes.jsonl", step), ("eval.jsonl", step - 1)):
        kept = [m for m in read_jsonl(out / name) if m["step"] <= keep] if step else None
        if write and kept is None:
            (out / name).unlink(missing_ok=True)
        elif write:
            (out / name).write_text("".join(json.dumps(m) + "\n" for m in kept))


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
    """Draws and returns curves.png: training reward, its terms, held-out nDCG@10, and the KL."""
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
    for key in ("rank", "rank_group_std", "format1", "format2", "frac_zero_std"):
        if key in train[0]:  # logs written before a figure existed lack it
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
