"""What a training run leaves in its --out and reads back: <out>/checkpoint/ (safetensors + JSON, nothing pickled),
which --resume continues from, and <out>/model/, the trained reranker as a Hugging Face model. Both are renamed into
place when whole, so a crash leaves the previous one intact. `cfg` below is grpo.Config.

    python grpo.py --out runs/grpo --resume                 # continue from runs/grpo/checkpoint/
    python eval.py --dataset dl19 --model runs/grpo/model   # evaluate what it trained
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from support.files import DataError, check_out_dir, read_json
from support.runlog import read_jsonl

CHECKPOINT_FORMAT = "rearank-grpo-checkpoint/1"  # state.json says which layout it is; anything else is refused


def check_out(cfg) -> None:
    """An --out holding a run is continued only with --resume, replaced only with --overwrite (which deletes it here,
    so a later --resume cannot pick up the old run)."""
    out = check_out_dir(cfg.out, create=False)
    if cfg.resume:  # here, before the plan, the data and the models: a missing checkpoint is known at once
        check_checkpoint(out, find_checkpoint(out))
        return
    held = sorted(p.name for p in out.iterdir() if p.name != "config.json") if out.is_dir() else []
    if not held:
        return
    if not cfg.overwrite:
        raise DataError(f"{out} holds a training run ({', '.join(held[:6])}): continue it with --resume, use a new "
                        "--out, or pass --overwrite to delete it and start afresh")
    for name in held:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print(f"--overwrite: deleted {', '.join(held)} from {out}")


# what a resumed run may set otherwise than the run it continues: how long, how often, where things are, and how a
# step is computed but not what (a bigger GPU may plan memory otherwise). Everything else is the run.
RESUME_MAY_CHANGE = ("steps", "save_every", "eval_every", "dump_every", "resume", "overwrite", "out", "data_dir",
                     "memory", "memory_gb", "gradient_checkpointing", "micro_batch", "logits_chunk", "reference",
                     "eval_batch_size")


def check_resume_config(cfg) -> None:
    """--resume continues the run <out>/config.json describes: settings that differ from its own are refused, naming
    each, unless RESUME_MAY_CHANGE lists them. `cfg` is resolved (after the memory plan), as config.json was."""
    path = Path(cfg.out) / "config.json"
    if not cfg.resume or not path.is_file():
        return
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise DataError(f"{path}: not a run's config (a JSON object expected); the file is damaged")
    now = json.loads(json.dumps(asdict(cfg)))  # as config.json holds it (tuples as lists)
    differ = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if differ:
        what = "; ".join(f"--{k.replace('_', '-')} {saved[k]!r} there, {now[k]!r} now" for k in differ)
        raise DataError(f"{path}: --resume continues this run with its own settings, and these differ: {what}. Resume "
                        "with that run's settings (only --steps, --save-every, --eval-every, --dump-every, --out, "
                        "--data-dir and memory settings but --bf16-weights may change), or start a new --out")


class CtrlC:
    """While open, the first Ctrl-C (SIGINT) only sets `requested`: the loop finishes its step, checkpoints and stops.
    A second one raises KeyboardInterrupt at once, without a checkpoint."""

    def __enter__(self) -> "CtrlC":
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit without saving)")


# ----------------------------------------------------------------------------------------------------------------------
# folders written beside the old one, then renamed in


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder `tmp` at `dest` without ever leaving `dest` half-written: the previous `dest` moves
    aside to `dest.old` until the new one is in place (`find_checkpoint` falls back to it after a crash)."""
    for f in tmp.iterdir():  # the data must be on disk before the rename makes it the checkpoint
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)  # a stale one: dest is newer and complete
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def fresh_dir(dest: Path) -> Path:
    """An empty `dest.tmp` to write a new `dest` into (what a crash left there is thrown away)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def find_checkpoint(out: Path) -> Path:
    """<out>/checkpoint, or <out>/checkpoint.old when a crash came between replace_dir's two renames."""
    ckpt = out / "checkpoint"
    if ckpt.is_dir() or not (out / "checkpoint.old").is_dir():
        return ckpt
    return out / "checkpoint.old"

# ----------------------------------------------------------------------------------------------------------------------
# the state as data: safetensors for tensors, JSON for the rest


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_to_data(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """rng_state() as tensors (torch's and CUDA's generator states) and JSON data (python's and numpy's)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], **{f"cuda.{i}": s for i, s in enumerate(state.get("cuda", []))}}
    return tensors, {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def rng_from_data(tensors: dict[str, torch.Tensor], data: dict) -> dict:
    """The inverse of rng_to_data: a state for set_rng_state."""
    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    state = {"python": (version, tuple(internal), gauss),
             "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached), "torch": tensors["torch"]}
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state


def rank_rng(ranks: list[dict], rank: int, world: int) -> dict:
    """This process's RNG state from a checkpoint's (one per process that wrote it): its own when as many wrote it."""
    if len(ranks) != world:
        print(f"resume: the checkpoint holds the RNG states of {len(ranks)} process(es), this run has {world}: the "
              "data order is the same, the samples differ from an uninterrupted run")
        return ranks[0] if rank >= len(ranks) else ranks[rank]
    return ranks[rank]


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict without tied copies (safetensors stores a shared tensor once), and {alias: name kept}.

    >>> w = torch.ones(2)
    >>> unique_tensors({"embed": w, "lm_head": w, "norm": torch.zeros(2)})[1]
    {'lm_head': 'embed'}
    """
    kept, tied, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key], kept[name] = name, t.detach().contiguous()
    return kept, tied


def flat_items(entry: dict, path: tuple[str, ...] = ()):
    """(path, value) of every leaf of a nested dict: bitsandbytes nests each parameter's 8-bit state one level down.

    >>> list(flat_items({"step": 2, "quant": {"qmap1": 0}}))
    [(('step',), 2), (('quant', 'qmap1'), 0)]
    """
    for name, value in entry.items():
        assert "." not in str(name), f"optimizer state key {name!r}: the checkpoint joins keys with '.'"
        if isinstance(value, dict):
            yield from flat_items(value, (*path, str(name)))
        else:
            yield (*path, str(name)), value


def nested_set(entry: dict, path: list[str] | tuple[str, ...], value) -> None:
    for name in path[:-1]:
        entry = entry.setdefault(name, {})
    entry[path[-1]] = value


def optimizer_to_data(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() split into its tensors ("param.name" -> tensor, for safetensors) and plain data (for
    JSON): nothing needs a pickle. Nested state (bitsandbytes) is flattened to "param.outer.inner"; a tensor several
    parameters share (8-bit Adam's quantisation tables) is stored once and listed under "shared".

    >>> t, d = optimizer_to_data({"state": {0: {"step": 3, "m": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]})
    >>> list(t), d
    (['0.m'], {'numbers': {'0': {'step': 3}}, 'param_groups': [{'lr': 0.1}], 'shared': {}})
    """
    tensors, numbers = {}, {}
    for i, entry in state["state"].items():
        for path, value in flat_items(entry):
            if torch.is_tensor(value):
                tensors[".".join((str(i), *path))] = value
            else:
                nested_set(numbers.setdefault(str(i), {}), path, value)
    kept, shared = unique_tensors(tensors)
    return kept, {"numbers": numbers, "param_groups": state["param_groups"], "shared": shared}


def optimizer_from_data(tensors: dict[str, torch.Tensor], data: dict) -> dict:
    """The inverse of optimizer_to_data: a state dict for optimizer.load_state_dict (shared tensors shared again)."""
    state: dict[int, dict] = {int(i): dict(v) for i, v in data["numbers"].items()}
    for alias, name in data.get("shared", {}).items():
        tensors[alias] = tensors[name]
    for key, t in tensors.items():
        i, *path = key.split(".")
        nested_set(state.setdefault(int(i), {}), path, t)
    return {"state": state, "param_groups": data["param_groups"]}

# ----------------------------------------------------------------------------------------------------------------------
# the checkpoint (--resume)


def write_checkpoint(dest: Path, model, optimizer, step: int, rngs: list[dict], cfg) -> None:
    """Everything the next step depends on, as data only: weights, optimizer state (unless --save-optimizer off), one
    RNG state per process in `rngs`, and state.json (the step, which fixes the data position, and the config)."""
    from safetensors.torch import save_file

    tmp = fresh_dir(dest)
    weights, tied = unique_tensors(model.state_dict())
    save_file(weights, tmp / "model.safetensors")
    del weights
    opt_data = None  # --save-optimizer off: no optimizer state (a resumed run restarts the moments)
    if cfg.save_optimizer == "on":
        opt_tensors, opt_data = optimizer_to_data(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        del opt_tensors
    rng_data = []
    for r, rng in enumerate(rngs):
        rng_tensors, data = rng_to_data(rng)
        save_file(rng_tensors, tmp / ("rng.safetensors" if r == 0 else f"rng.rank{r}.safetensors"))
        rng_data.append(data)
    state = {"format": CHECKPOINT_FORMAT, "step": step, "data_position": step * cfg.batch_size, "tied": tied,
             "rng": rng_data[0], "optimizer": opt_data, "config": asdict(cfg)}
    if len(rng_data) > 1:
        state["rng_ranks"] = rng_data[1:]
    (tmp / "state.json").write_text(json.dumps(state))
    replace_dir(tmp, dest)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file into CPU memory, or a DataError naming the file (missing, truncated, not safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"{path}: missing: the checkpoint is incomplete; start without --resume")
    try:
        return load_file(path, device="cpu")  # on the CPU first: a GPU run must not hold a second copy there
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e}); the file is damaged or not a checkpoint "
                        "of grpo.py: start without --resume") from None


def read_state(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing: the checkpoint is incomplete; start without --resume")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not JSON ({e}); the file is damaged: start without --resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a grpo.py checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return state


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, list[dict]]:
    """Restore weights and optimizer state from a folder written by write_checkpoint; returns (step, the RNG state of
    each process that wrote it). Every file is checked before the model is touched: a truncated file or another
    model's weights is a DataError naming the file; the files are never changed."""
    state = read_state(folder / "state.json")
    path = folder / "model.safetensors"
    weights = read_tensors(path)
    for alias, name in state["tied"].items():
        if name in weights:
            weights[alias] = weights[name]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    differ = [k for k in expected if k in weights
              and (weights[k].shape != expected[k].shape or weights[k].dtype != expected[k].dtype)]
    if missing or unexpected or differ:
        raise DataError(f"{path}: the weights of another model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                        f"other shape or dtype {differ[:3]}): resume with the --model and dtype flags of that run")
    path = folder / "optimizer.safetensors"
    opt_state = None if state["optimizer"] is None else optimizer_from_data(read_tensors(path), state["optimizer"])
    rng_tensors = [read_tensors(folder / "rng.safetensors")]
    ranks = range(1, 1 + len(state.get("rng_ranks", [])))
    rng_tensors += [read_tensors(folder / f"rng.rank{r}.safetensors") for r in ranks]
    model.load_state_dict(weights)
    del weights, expected  # the loaded copy is freed at once, not held for the whole run
    if opt_state is None:
        print(f"resume: {folder} holds no optimizer state (saved with --save-optimizer off): Adam's moments restart "
              "from zero, so the steps differ from an uninterrupted run's")
    else:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise DataError(f"{path}: not this run's optimizer state ({e}): resume with the flags of that "
                            "run") from None
    del opt_state
    datas = [state["rng"]] + state.get("rng_ranks", [])
    return state["step"], [rng_from_data(t, d) for t, d in zip(rng_tensors, datas)]


def check_checkpoint(out: Path, ckpt: Path) -> None:
    """--resume needs a checkpoint folder; a pickled checkpoint.pt of an older grpo.py is never unpickled."""
    if ckpt.is_dir():
        return
    legacy = out / "checkpoint.pt"
    if legacy.exists():
        raise DataError(f"{legacy}: a pickled checkpoint of an older grpo.py: not loaded, since unpickling can run "
                        "any code; start without --resume")
    raise DataError(f"--resume: {ckpt} not found; start without --resume")


def resume(out: Path, model, optimizer, rank: int, world: int) -> int:
    """--resume: the weights, the optimizer state and this process's RNG state as <out>/checkpoint/ holds them;
    returns the step it was taken after (the data position follows from it, see augment.batch_indices)."""
    ckpt = find_checkpoint(out)
    check_checkpoint(out, ckpt)
    step, rngs = load_checkpoint(ckpt, model, optimizer)
    set_rng_state(rank_rng(rngs, rank, world))
    print(f"resumed from {ckpt} at step {step}")
    return step


# ----------------------------------------------------------------------------------------------------------------------
# the exported model (eval.py --model <out>/model)


def export_dtype(weights: torch.dtype, cuda: bool) -> torch.dtype:
    """The dtype of <out>/model: bf16 on CUDA, as backend.load_model serves it there; on CPU the training weights'
    own, so the export reloads to exactly the policy's numbers.

    >>> export_dtype(torch.float32, cuda=True), export_dtype(torch.float32, cuda=False)
    (torch.bfloat16, torch.float32)
    """
    return torch.bfloat16 if cuda else weights


def greedy_generation_config(model, tokenizer):
    """generation_config.json for the export: greedy, the stop ids, and none of the sampling or penalty knobs the
    base model's file may carry, which would bend greedy decoding in other HF tools."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, bos_token_id=model.generation_config.bos_token_id,
                            eos_token_id=model.generation_config.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def eval_flags(cfg) -> str:
    """The eval.py flags that ask the model what it was trained on (its method, prompt and the reply's opening).

    >>> from types import SimpleNamespace as C
    >>> eval_flags(C(method="listwise", prompt="rankgpt", answer_start="[")), eval_flags(C(method="listwise",
    ...     prompt="rearank", answer_start="")), eval_flags(C(method="setwise"))
    (" --prompt rankgpt --answer-start '['", '', ' --method setwise')
    """
    if cfg.method != "listwise":
        return " --method setwise"
    flags = [] if cfg.prompt == "rearank" else ["--prompt", cfg.prompt]
    flags += ["--answer-start", cfg.answer_start] if cfg.answer_start else []
    return "".join(" " + shlex.quote(f) for f in flags)


def model_card(cfg, step: int, dtype: torch.dtype, held: dict | None) -> str:
    """README.md of the export: where it came from and how it did last on the held-out set."""
    if held:
        figures = (f"step {held['step']}, {cfg.eval_dataset} top-{cfg.eval_size} windows of {held['queries']} "
                   f"queries, greedy, {cfg.max_new_tokens} new tokens: reward {held['reward']:.4f}, nDCG@10 "
                   f"{held['ndcg@10']:.4f} (first stage {held['ndcg@10_first_stage']:.4f}), format1 "
                   f"{held['format1']:.2f}, format2 {held['format2']:.2f}")
    else:
        figures = "none yet (--eval-every 0, or no evaluation has run)"
    return (
        f"# REARANK {cfg.method} reranker trained with GRPO (grpo.py)\n\n"
        f"- base model: `{cfg.model}`\n"
        f"- step: {step} of {cfg.steps} (batch {cfg.batch_size} prompts x {cfg.group_size} samples, lr {cfg.lr:g}, "
        f"beta {cfg.beta:g})\n"
        f"- weights: {str(dtype).removeprefix('torch.')} safetensors\n"
        f"- last held-out evaluation: {figures}\n\n"
        f"Use: `python eval.py --dataset dl19 --model <this folder>{eval_flags(cfg)}`. `generation_config.json` is "
        "greedy with no sampling or penalty settings.\n\n"
        f"## Config\n\n```json\n{json.dumps(asdict(cfg), indent=1)}\n```\n"
    )


def export_model(dest: Path, model, tokenizer, cfg, step: int, held: dict | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """<out>/model/: the policy as a Hugging Face checkpoint with its tokenizer, a greedy generation_config.json and a
    model card, in export_dtype, renamed into place when whole. `weights`: CPU tensors to write instead of the
    model's own (lora.merged_weights)."""
    param = next(model.parameters())
    dtype = export_dtype(param.dtype, param.is_cuda)
    tmp = fresh_dir(dest)
    cast: dict = {}  # one CPU copy per tensor, tied weights sharing theirs (save_pretrained then stores them once)
    weights = weights or {k: cast.setdefault((v.data_ptr(), tuple(v.shape)), v.detach().to("cpu", dtype))
                          for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=weights)
    del weights, cast
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained writes the in-memory model's dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    greedy_generation_config(model, tokenizer).save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(cfg, step, dtype, held))
    replace_dir(tmp, dest)


def update_model_card(folder: Path, cfg, step: int) -> None:
    """Rewrite the export's README.md (atomically) so it quotes the last held-out evaluation."""
    dtype = getattr(torch, json.loads((folder / "config.json").read_text())["dtype"])
    held = read_jsonl(folder.parent / "eval.jsonl")
    tmp = folder / "README.md.tmp"
    tmp.write_text(model_card(cfg, step, dtype, held[-1] if held else None))
    tmp.replace(folder / "README.md")


def save_checkpoint(out: Path, model, tokenizer, optimizer, step: int, rngs: list[dict], cfg) -> None:
    """<out>/checkpoint/ (what --resume reads) and <out>/model/ (the trained reranker, for eval.py and HF tools)."""
    write_checkpoint(out / "checkpoint", model, optimizer, step, rngs, cfg)
    held = read_jsonl(out / "eval.jsonl")
    export_model(out / "model", model, tokenizer, cfg, step, held[-1] if held else None)

