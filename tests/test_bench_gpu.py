"""bench/gpu.py, the GPU check, end to end on CPU in its --tiny mode: the same code path as on a GPU (grpo.train under
the plan, a save, a resume, generation at batch 1 and 8), a tiny config and a few tokens."""

import json

from bench import gpu as bench_gpu


def test_the_gpu_check_runs_end_to_end_in_tiny_mode(data_root, tmp_path):
    assets = tmp_path / "assets"
    bench_gpu.prepare(assets)
    out, work = tmp_path / "figures.json", tmp_path / "work"
    bench_gpu.main(["--tiny", "--out", str(out), "--work", str(work), "--assets", str(assets)])
    figures = json.loads(out.read_text())
    assert figures["smoke"]["forward_ok"] and figures["smoke"]["torch"]
    first, second = figures["training"]
    assert (first["max_new_tokens"], second["max_new_tokens"]) == (4, 8)
    for run in (first, second):
        assert run["steps"] == [1, 2] and run["first_step_moved"] > 0  # the weights moved
        assert run["completion_len"] == [run["max_new_tokens"]] * 2  # forced to the full length
        assert [r["phase"] for r in run["phases"]] == ["rollout", "reference", "policy"] * 2 + ["save"]
        assert all(r["s"] > 0 for r in run["phases"]) and run["plan"]["peak_gb"] > 0
    assert first["resumed"]["steps"] == [1, 2, 3]  # one more step from the save, the log continued
    assert not (work / "C4").exists() and not (work / "C8").exists()  # each run's folder deleted after it
    lora = figures["lora"]  # the adapters move, the reference is the base with them off (no copy)
    assert lora["steps"] == [1, 2] and lora["first_step_moved"] > 0 and lora["plan"]["settings"].startswith("LoRA")
    speeds = figures["generation"]
    assert [s["batch"] for s in speeds] == [1, 8]
    assert all(s["generated_tokens"] == 8 * 4 and s["tokens_per_s"] > 0 for s in speeds)
