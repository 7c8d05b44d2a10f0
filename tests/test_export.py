"""The trained reranker as a Hugging Face checkpoint, checkpoints that are data only (refused when damaged or foreign,
never destroyed by a crash), and the KL's reference resident or offloaded (CPU, tiny random models)."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from support import checkpoint
import grpo
from support import reference
from support.backend import cast_model, generate_tokens, load_model, rotary_buffers
from data import DataError
from rearank import build_prompt
from reward import Reward
from test_grpo import hand_rollout, one_step, run, tiny_dir, tiny_model, tokenizer, toy_instances  # noqa: F401

# ----------------------------------------------------------------------------------------------------------------------
# <out>/model/: the export


def test_exported_model_reloads_to_the_same_weights_and_greedy_completions(tokenizer, tmp_path):
    policy = tiny_model(len(tokenizer))
    assert one_step(policy, lr=1e-3) > 0.5  # trained one step: the export must be of the moved weights
    dest = tmp_path / "model"
    checkpoint.export_model(dest, policy, tokenizer, grpo.Config(model="tiny", steps=7), step=1)
    assert not (tmp_path / "model.tmp").exists()

    model, tok = load_model(str(dest))  # what eval.py --model <out>/model does
    theirs = model.state_dict()
    assert set(theirs) == set(policy.state_dict())
    assert all(torch.equal(theirs[k], v) for k, v in policy.state_dict().items())
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    prompts = [build_prompt("flea life", ["fleas live on cats", "dogs bark"]), build_prompt("q", ["a"])]
    assert tok.apply_chat_template(prompts[0], tokenize=False) == tokenizer.apply_chat_template(prompts[0],
                                                                                                tokenize=False)
    ours = generate_tokens(policy.eval(), tokenizer, prompts, max_new_tokens=8)
    reloaded = generate_tokens(model, tok, prompts, max_new_tokens=8)
    assert torch.equal(ours.completion_ids, reloaded.completion_ids) and ours.completion_mask.sum() > 0

    # greedy, with no knob another HF tool could pick up and bend decoding with
    gen = json.loads((dest / "generation_config.json").read_text())
    assert gen["do_sample"] is False
    assert not {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size"} & set(gen)
    assert json.loads((dest / "config.json").read_text())["dtype"] == "float32"  # CPU: the training dtype
    card = (dest / "README.md").read_text()
    assert "`tiny`" in card and "step: 1 of 7" in card and "none yet" in card


def test_export_replaces_the_previous_one_whole(tokenizer, tmp_path, monkeypatch):
    dest = tmp_path / "model"
    checkpoint.export_model(dest, tiny_model(len(tokenizer)), tokenizer, grpo.Config(), step=1)
    before = (dest / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)  # dies after the weights, before the tokenizer
    with pytest.raises(OSError):
        checkpoint.export_model(dest, tiny_model(len(tokenizer), seed=1), tokenizer, grpo.Config(), step=2)
    assert (dest / "model.safetensors").read_bytes() == before and "step: 1 " in (dest / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints: data only, refused when damaged or foreign, never destroyed


@pytest.fixture
def trained(tiny_dir, tmp_path):
    """A one-step run with its checkpoint, and how to resume it to two steps."""
    train_file = toy_instances(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    run(tiny_dir, out, 1, train_file=train_file)
    return out, lambda **kw: run(tiny_dir, out, 2, train_file=train_file, resume=True, **kw)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_run_leaves_its_model_beside_its_checkpoint(trained):
    out, _ = trained
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and state["format"] == checkpoint.CHECKPOINT_FORMAT
    trained_weights = load_file(out / "checkpoint" / "model.safetensors")
    exported = load_file(out / "model" / "model.safetensors")
    assert set(exported) == set(trained_weights)
    assert all(torch.equal(exported[k], v) for k, v in trained_weights.items())
    assert "step: 1 of 1" in (out / "model" / "README.md").read_text()


def pickle_file(path):
    path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def other_model(path):
    big = torch.nn.Linear(4, 4)
    save_file({"weight": big.weight.detach(), "bias": big.bias.detach()}, path)


def other_vocabulary(path):
    # the same names, the embedding of another tokenizer: load_state_dict would stop with a size-mismatch traceback
    weights = load_file(path)
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = torch.zeros(embed.shape[0] + 8, embed.shape[1], dtype=embed.dtype)
    save_file(weights, path)


@pytest.mark.parametrize("name, damage, says", [
    ("model.safetensors", truncate, "not a readable safetensors file"),
    ("model.safetensors", pickle_file, "not a readable safetensors file"),
    ("model.safetensors", other_model, "the weights of another model"),
    ("model.safetensors", other_vocabulary, "the weights of another model .*other shape or dtype "
                                            r"\['model.embed_tokens.weight'"),
    ("optimizer.safetensors", truncate, "not a readable safetensors file"),
    ("state.json", truncate, "not JSON"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused_naming_the_file(trained, name, damage, says):
    out, resume = trained
    damage(out / "checkpoint" / name)
    files, metrics = snapshot(out / "checkpoint"), (out / "metrics.jsonl").read_text()
    with pytest.raises(DataError, match=f"{out / 'checkpoint' / name}: {says}"):
        resume()
    assert snapshot(out / "checkpoint") == files and (out / "metrics.jsonl").read_text() == metrics  # untouched


def test_resume_refuses_settings_that_differ_from_the_runs_own_and_names_them(trained):
    out, resume = trained
    config = (out / "config.json").read_text()
    with pytest.raises(DataError, match=r"config.json: --resume continues this run with its own settings, and these "
                                        r"differ: --clip-eps 0.2 there, 0.3 now; --seed 0 there, 3 now\. Resume"):
        resume(clip_eps=0.3, seed=3, micro_batch=1)  # the micro-batch may change: not named
    assert (out / "config.json").read_text() == config  # refused before anything was written
    assert resume(micro_batch=1, gradient_checkpointing=True, eval_batch_size=2)["step"] == 2  # these may change
    assert json.loads((out / "config.json").read_text())["micro_batch"] == 1  # and the run's config says so now


def test_an_old_pickled_checkpoint_is_never_unpickled(tiny_dir, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    pickle_file(out / "checkpoint.pt")
    with pytest.raises(DataError, match="checkpoint.pt: a pickled checkpoint .* not loaded"):
        run(tiny_dir, out, 1, train_file=toy_instances(tmp_path / "t.jsonl"), resume=True)


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(trained, monkeypatch):
    out, resume = trained
    files = snapshot(out / "checkpoint")
    real_save = checkpoint.write_checkpoint.__globals__["json"].dumps

    def crash(obj, *args, **kwargs):  # dies writing state.json, after the tensors of step 2 are on disk
        if isinstance(obj, dict) and obj.get("format") == checkpoint.CHECKPOINT_FORMAT:
            raise KeyboardInterrupt
        return real_save(obj, *args, **kwargs)

    monkeypatch.setattr(checkpoint.json, "dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        resume()
    monkeypatch.undo()
    assert snapshot(out / "checkpoint") == files  # step 1's checkpoint, byte for byte
    assert resume()["step"] == 2  # and it still resumes


def test_8bit_adam_state_round_trips_through_a_checkpoint_exactly(tmp_path):
    # bitsandbytes 0.50 runs AdamW8bit on the CPU too, so this is its real state: per parameter a nested
    # "__bnb_optimizer_quant_state__" dict (uint8 moments, absmax scales, and the qmap1/qmap2 tables that every 8-bit
    # parameter shares: one tensor, which safetensors refuses to store twice); parameters under 4,096 entries keep
    # 32-bit moments
    import bitsandbytes as bnb

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(300, 32), torch.nn.Linear(32, 300))  # 9,600 entries: 8-bit
        return model, bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)

    def step(model, opt):
        model(torch.arange(7)).logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad()

    model, opt = model_and_optimizer()
    step(model, opt), step(model, opt)
    saved = opt.state_dict()
    quant = saved["state"][0]["__bnb_optimizer_quant_state__"]
    assert quant["qmap1"] is saved["state"][1]["__bnb_optimizer_quant_state__"]["qmap1"]  # the shape of the problem
    checkpoint.write_checkpoint(tmp_path / "ckpt", model, opt, 2, [checkpoint.rng_state()], grpo.Config())

    fresh, fresh_opt = model_and_optimizer()
    assert checkpoint.load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)[0] == 2
    loaded = fresh_opt.state_dict()
    assert loaded["param_groups"] == json.loads(json.dumps(saved["param_groups"]))
    for i, entry in saved["state"].items():
        want, got = dict(checkpoint.flat_items(entry)), dict(checkpoint.flat_items(loaded["state"][i]))
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, (i, key)
    step(model, opt), step(fresh, fresh_opt)  # and the next step is the same step
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_a_crash_between_the_two_renames_leaves_the_old_folder_to_resume_from(tmp_path, monkeypatch):
    dest, tmp = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp"
    for folder, text in ((dest, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "state.json").write_text(text)
    real_rename = type(dest).rename

    def rename(self, target):
        if self == tmp:
            raise KeyboardInterrupt  # the previous checkpoint has moved aside; the new one is not in place
        return real_rename(self, target)

    monkeypatch.setattr(type(dest), "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.replace_dir(tmp, dest)
    monkeypatch.undo()
    assert not dest.exists() and (checkpoint.find_checkpoint(tmp_path) / "state.json").read_text() == "old"
    checkpoint.replace_dir(tmp, dest)  # the next save completes and clears the old one
    assert (dest / "state.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


# ----------------------------------------------------------------------------------------------------------------------
# the reference of the KL term


def test_offloaded_reference_gives_the_resident_log_probs_and_is_a_frozen_copy():
    policy = tiny_model(100)
    ro, cfg = hand_rollout(100), grpo.Config(temperature=0.8)
    with torch.no_grad():
        initial = grpo.group_logprobs(policy, ro, cfg)
    resident = reference.Reference(policy, "cpu", "resident")
    offloaded = reference.Reference(policy, "cpu", "offload")
    host = [t.data_ptr() for t in offloaded.tensors()]
    lm_head = offloaded.model.lm_head
    ran_on = []  # the storage the pass read: a copy brought in, as a GPU's would be, never the CPU copy itself
    lm_head.register_forward_pre_hook(lambda m, args: ran_on.append(m.weight.data_ptr()))
    with torch.no_grad():
        for p in policy.parameters():  # the policy trains on; the reference must keep the initial weights
            p.add_(0.1)
    a = grpo.reference_logprobs(resident, ro, cfg)
    for _ in range(2):  # two steps: one CPU copy for the run, and the model points back at it after each pass
        b = grpo.reference_logprobs(offloaded, ro, cfg)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(a, initial))
        assert [t.data_ptr() for t in offloaded.tensors()] == host
    assert ran_on and lm_head.weight.data_ptr() not in ran_on
    # pinned where CUDA can copy from it asynchronously; plain memory without CUDA (pinning needs the driver)
    assert all(t.is_pinned() == torch.cuda.is_available() for t in offloaded.tensors())
    ref = offloaded.model
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied weights stay one tensor
    assert not any(p.requires_grad for p in ref.parameters())


def test_bf16_weights_and_a_bf16_reference_keep_ropes_frequencies_in_fp32():
    # model.to(bf16) casts buffers too; RoPE's inverse frequencies in bf16 put position 2,600 radians off
    policy, fp32 = tiny_model(100), tiny_model(100)
    cast_model(policy, torch.bfloat16)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    frozen = reference.frozen_copy(policy, "cpu", torch.bfloat16)  # the CUDA reference's dtype
    x, position = torch.zeros(1, 1, 32, dtype=torch.bfloat16), torch.tensor([[2600]])
    want = fp32.model.rotary_emb(x.float(), position)
    for model in (policy, frozen):
        rotary = rotary_buffers(model)
        assert {name.rpartition(".")[2] for name in rotary} == {"inv_freq", "original_inv_freq"}
        assert all(b.dtype == torch.float32 and torch.equal(b, fp32.model.rotary_emb.inv_freq) for b in rotary.values())
        assert not set(rotary) & set(model.state_dict())  # still not saved with the weights
        cos, sin = model.model.rotary_emb(x, position)
        assert torch.equal(cos, want[0].to(torch.bfloat16)) and torch.equal(sin, want[1].to(torch.bfloat16))


def test_beta_0_builds_no_reference_and_the_default_beta_gives_a_kl(tiny_dir, tmp_path, monkeypatch):
    train_file = toy_instances(tmp_path / "t.jsonl")
    built = []
    real = reference.Reference
    monkeypatch.setattr(reference, "Reference", lambda *a, **k: (built.append(a[2]), real(*a, **k))[1])
    # rewards that differ within each group (the toy's are all 0), so the policy moves away from the reference
    task = grpo.TASKS["listwise"]
    monkeypatch.setitem(grpo.TASKS, "listwise", task._replace(
        reward=lambda text, inst: Reward(0.0, 0.0, 0.0, float(len(text) % 7), 0.0)))
    off = run(tiny_dir, tmp_path / "off", 1, train_file=train_file, beta=0.0)
    assert built == [] and off["kl"] == 0.0 and off["ref_s"] == 0.0
    on = run(tiny_dir, tmp_path / "on", 2, train_file=train_file, reference="offload")
    assert grpo.Config().beta == 0.001 and built == ["offload"]
    assert on["kl"] > 0 and on["ref_s"] > 0  # step 2: the policy has moved away from the reference
    with pytest.raises(SystemExit):
        grpo.parse_args(["--reference", "gpu"])
