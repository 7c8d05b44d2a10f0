"""The disk line of the plan against what a save really writes, grpo.py stopping before it loads a model when --out's
disk cannot hold its saves (the free-space call patched), and --save-optimizer off end to end (tiny model, CPU)."""

import json
import shutil
from collections import namedtuple

import pytest

import grpo
from support import memory
from support.memory import Settings
from support.model_shape import published_config, shape_of
from test_grpo import tiny_dir, tokenizer, toy_instances  # noqa: F401 (fixtures)

Usage = namedtuple("Usage", "total used free")


def argv(tiny_dir, train_file, out, *extra: str) -> list[str]:
    return ["--model", str(tiny_dir), "--train-file", str(train_file), "--steps", "2", "--batch-size", "1",
            "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "0", "--save-every", "1", "--lr", "1e-3",
            "--out", str(out), *extra]  # fmt: skip


def planned(tiny_dir, out, bf16: bool = False, save_optimizer: bool = True) -> memory.Disk:
    shape = shape_of(published_config(str(tiny_dir)))
    return memory.disk_plan(shape, Settings(bf16_weights=bf16), False, str(out), save_optimizer, True)


def test_the_disk_line_counts_the_bytes_a_save_writes(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    grpo.main(argv(tiny_dir, toy_instances(tmp_path / "t.jsonl"), out))
    assert "disk: one save writes" in capsys.readouterr().out
    disk = planned(tiny_dir, tmp_path / "elsewhere")
    written = {name: (out / name).stat().st_size for name in
               ("checkpoint/model.safetensors", "checkpoint/optimizer.safetensors", "model/model.safetensors")}
    # safetensors adds a JSON header of the tensors' names; AdamW its step counts: well under 1 %
    assert disk.weights == pytest.approx(written["checkpoint/model.safetensors"], rel=0.01)
    assert disk.optimizer == pytest.approx(written["checkpoint/optimizer.safetensors"], rel=0.01)
    assert disk.export == pytest.approx(written["model/model.safetensors"], rel=0.01)
    # the saves of a run that is there come back: a resumed run needs only what its saves add
    resumed = planned(tiny_dir, out)
    assert resumed.existing >= sum(written.values()) and resumed.need == resumed.at_once - resumed.existing


def test_the_most_at_once_keeps_the_old_checkpoint_until_the_new_one_is_whole():
    disk = memory.Disk(weights=15, optimizer=30, export=15, replaces=True, existing=0, free=10**3, where="/")
    assert disk.save == 60 and disk.at_once == 105  # old checkpoint/ + old model/ + the new checkpoint/
    assert memory.Disk(15, 30, 15, False, 0, 10**3, "/").at_once == 60  # one save: nothing to replace
    assert memory.Disk(15, 30, 15, True, 60, 10**3, "/").need == 45  # resumed: its 60 come back


class Loaded(Exception):
    pass


def load_model(*args, **kwargs):
    raise Loaded


def test_grpo_stops_before_loading_when_the_saves_do_not_fit_and_says_what_would(tiny_dir, tmp_path, monkeypatch):
    train_file, out = toy_instances(tmp_path / "t.jsonl"), tmp_path / "run"
    disk = planned(tiny_dir, out)
    lean = planned(tiny_dir, out, save_optimizer=False)
    monkeypatch.setattr(grpo, "load_model", load_model)
    for free, would in ((1000, []), (int(lean.need / 0.9), ["--save-optimizer off"]),
                        (int(disk.save / 0.9), ["--save-optimizer off", "--save-every 0"])):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))
        with pytest.raises(SystemExit) as stop:
            grpo.main(argv(tiny_dir, train_file, out))
        message = str(stop.value)
        assert message.startswith("error: disk: the saves need") and "would fit: --out on a disk with >= " in message
        assert [w for w in ("--save-optimizer off", "--save-every 0") if w in message] == would
        assert not out.exists()  # stopped before anything was written
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - lean.need * 2, lean.need * 2))
    with pytest.raises(Loaded):  # enough room: it goes on to load
        grpo.main(argv(tiny_dir, train_file, out, "--save-optimizer", "off"))


def test_save_optimizer_off_writes_no_moments_and_a_resume_restarts_them(tiny_dir, tmp_path, capsys):
    train_file, out = toy_instances(tmp_path / "t.jsonl"), tmp_path / "run"
    grpo.main(argv(tiny_dir, train_file, out, "--save-optimizer", "off", "--bf16-weights"))
    assert "(no optimizer state)" in capsys.readouterr().out
    names = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert names == ["model.safetensors", "rng.safetensors", "state.json"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["optimizer"] is None
    assert (out / "model" / "model.safetensors").is_file()
    grpo.main(argv(tiny_dir, train_file, out, "--save-optimizer", "off", "--bf16-weights", "--resume", "--steps", "3"))
    assert "holds no optimizer state (saved with --save-optimizer off): Adam's moments restart" in \
        capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_the_cli_prints_the_disk_line_of_the_7b_plan(capsys, tmp_path):
    memory.main(["--config", "qwen2.5-7b", "--gpu-gb", "80", "--beta", "0.001", "--out", str(tmp_path / "x")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # bf16 weights 15.2 GB + BF16AdamW's bf16 moments 30.5 GB in checkpoint/, the bf16 export 15.2 GB in model/
    assert line.startswith("disk: one save writes 60.9 GB (checkpoint/ 45.7 GB: weights 15.2 GB + optimizer state "
                           "30.5 GB; model/ 15.2 GB); at most 106.6 GB at once")
    assert f"free under {tmp_path / 'x'}:" in line
    memory.main(["--config", "qwen2.5-7b", "--gpu-gb", "80", "--out", str(tmp_path / "x"), "--save-optimizer", "off"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(checkpoint/ 15.2 GB: weights 15.2 GB (no optimizer state); model/ 15.2 GB); at most 45.7 GB at once" in line


def test_with_lora_the_disk_line_counts_the_adapters_and_the_merged_model(tiny_dir, tmp_path, monkeypatch):
    out, plans, disk_plan = tmp_path / "run", [], memory.disk_plan
    monkeypatch.setattr(memory, "disk_plan", lambda *a: plans.append(disk_plan(*a)) or plans[-1])
    grpo.main(argv(tiny_dir, toy_instances(tmp_path / "t.jsonl"), out, "--lora-rank", "4"))
    shape = shape_of(published_config(str(tiny_dir)))
    adapters = memory.lora_parameters(shape, 4, memory.LORA_TARGETS)
    disk = memory.disk_plan(shape, Settings(), False, str(tmp_path / "elsewhere"), True, True, adapters)
    def size(*names):  # the tensors' bytes: at this size the files' JSON headers of names are not negligible
        from safetensors import safe_open

        total = 0
        for name in names:
            with safe_open(out / name, "pt") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys())
        return total

    # a full-weights plan would count the base in checkpoint/: here the adapters alone, a few % of it
    assert disk.weights == size("checkpoint/model.safetensors")
    assert disk.optimizer == pytest.approx(size("checkpoint/optimizer.safetensors"), rel=0.01)  # + step counts
    assert disk.export == size("model/model.safetensors", "adapter/adapter_model.safetensors")
    assert (plans[0].weights, plans[0].optimizer, plans[0].export) == (disk.weights, disk.optimizer, disk.export)
