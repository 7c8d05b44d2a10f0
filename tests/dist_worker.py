"""What tests/test_dist.py starts with `torchrun --nproc_per_node 2` (and with plain python, to compare).

    python tests/dist_worker.py grpo CONFIG.json          # grpo.train on a tiny model, sampling made per-prompt
    python tests/dist_worker.py grpo-replicas CONFIG.json # the same, then each rank's weights written out
    python tests/dist_worker.py eval EVAL_ARGS...          # eval.main with a fake model (no weights)

grpo: a rollout samples its prompts' completions together, so which prompts share a process changes the random
numbers each one gets. Here each prompt is rolled out alone, from a seed of its own, so one process with both
prompts and two with one each see the same completions, and the rest of the step (advantages, the global token
count, the gradient exchange, the gathered log) can be compared exactly. The reward is a function of the text (a
tiny random model never earns REARANK's), so groups have a spread and the gradient is not zero.

eval: the fake model orders a window by a hash of each passage (setwise: names the passage with the largest hash),
so its answers depend on what it is shown. FAKE_FAIL_RANK / FAKE_FAIL_AFTER make that rank stop after so many prompts,
as a kill would.
"""

import json
import os
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def crc(text: str) -> int:
    return zlib.crc32(text.encode())


# ----------------------------------------------------------------------------------------------------------------------
# grpo


def per_prompt_rollout(real):
    import torch

    from grpo import joined

    def rollout(model, tokenizer, task, batch, group_size, **kw):
        parts = []
        for inst in batch:
            torch.manual_seed(crc(inst.qid + " ".join(c.docid for c in inst.candidates)))
            parts.append(real(model, tokenizer, task, [inst], group_size, **kw))
        return joined(parts)

    return rollout


def text_reward(text, inst):
    from reward import Reward

    value = (crc(text) % 97) / 96
    return Reward(rank=value, format1=0.0, format2=0.0, total=value, ndcg=0.0)


def run_grpo(config_path: str) -> None:
    import grpo
    from grpo import TASKS

    grpo.rollout = per_prompt_rollout(grpo.rollout)  # the name the loop calls
    TASKS["listwise"] = TASKS["listwise"]._replace(reward=text_reward)
    grpo.train(grpo.Config(**json.loads(Path(config_path).read_text())))


def run_grpo_replicas(config_path: str) -> None:
    """run_grpo, then this rank's final weights in <out>.rank{r}.safetensors and the model the update saw (wrapped in
    DDP or not) in <out>.rank{r}.json: the replicas are compared bitwise."""
    import grpo
    from support import dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    seen = {}
    real = grpo.update

    def update(accelerator, model, *args, **kwargs):
        seen["model"] = model
        return real(accelerator, model, *args, **kwargs)

    grpo.update = update
    run_grpo(config_path)
    model, out = seen["model"], json.loads(Path(config_path).read_text())["out"]
    policy = getattr(model, "module", model)
    save_file({k: v.detach().clone() for k, v in policy.state_dict().items()}, f"{out}.rank{dist.rank()}.safetensors")
    ddp = isinstance(model, DistributedDataParallel)
    Path(f"{out}.rank{dist.rank()}.json").write_text(json.dumps({"ddp": ddp}))


# ----------------------------------------------------------------------------------------------------------------------
# eval


class HashModel:
    """A `Generate` with HFGenerator's counters: answers that depend on the passages shown."""

    def __init__(self, fail_after: int | None = None):
        from test_setwise import WordTokenizer  # the worker's folder, tests/, is on the path

        self.tokenizer, self.fail_after, self.asked = WordTokenizer(), fail_after, 0
        self.prompt_tokens = self.generated_tokens = 0
        self.seconds = 0.0

    def __call__(self, prompts):
        if self.fail_after is not None and self.asked + len(prompts) > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.asked += len(prompts)
        out = []
        for messages in prompts:
            if len(messages) == 2:  # setwise: one user message listing the documents
                import re

                docs = re.findall(r"^\[(\d+)\] (.*)$", messages[1]["content"], re.M)
                best = max(docs, key=lambda d: crc(d[1]))[0]
                out.append(f"<think>hash</think> <answer>[{best}]</answer>")
                continue
            passages = [m["content"] for m in messages if m["role"] == "user" and m["content"].startswith("[")]
            order = sorted(range(len(passages)), key=lambda i: -crc(passages[i]))
            out.append("<think>hash</think><answer>" + " > ".join(f"[{i + 1}]" for i in order) + "</answer>")
        self.prompt_tokens += len(prompts)
        self.generated_tokens += 3 * len(prompts)
        return out


def run_eval(args: list[str]) -> None:
    from support import dist
    import eval as ev

    fail = os.environ.get("FAKE_FAIL_AFTER")
    fails_here = fail is not None and str(dist.rank()) == os.environ.get("FAKE_FAIL_RANK", "0")
    ev.load_generator = lambda cfg: HashModel(int(fail) if fails_here else None)
    ev.main(args)


if __name__ == "__main__":
    {"grpo": lambda: run_grpo(sys.argv[2]), "grpo-replicas": lambda: run_grpo_replicas(sys.argv[2]),
     "eval": lambda: run_eval(sys.argv[2:])}[sys.argv[1]]()
