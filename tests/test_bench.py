"""The benchmark harness itself runs end to end (on the CPU, with a small shape): the numbers that
matter come from GPUs, this keeps the one command working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO


def run_bench(module: str, tmp_path: Path, *args: str) -> None:
    """`python -m bench.<module> --shape llama-smoke ...` with its cache and results under tmp_path."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    files = ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "results")]
    cmd = [sys.executable, "-m", f"bench.{module}", "--shape", "llama-smoke", *args, *files]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]


@pytest.mark.bench
def test_bench_run_writes_results_with_ratios(tmp_path: Path):
    run_bench(
        "run",
        tmp_path,
        "--mode",
        "baseline,peer,project",
        "--steps",
        "4",
        "--max-length",
        "256",
        "--rows",
        "200",
        # 4 packed rows per micro batch like the baseline's 4 padded ones (the GPU default of 8192
        # tokens is 32 rows here and takes minutes on two CPU cores)
        "--micro-batch",
        "4",
        "--tag=-mb4",
    )
    (result,) = (tmp_path / "results").glob("*-llama-smoke-mb4.json")
    data = json.loads(result.read_text())
    for key in (
        "gpu",
        "shape",
        "num_gpus",
        "baseline_tokens_per_s",
        "peer_tokens_per_s",
        "project_tokens_per_s",
        "ratio",
        "peer_ratio",
        "baseline_peak_gib",
        "project_peak_gib",
        "mfu",
    ):
        assert key in data, key
    assert data["ratio"] > 0 and data["peer_ratio"] > 0 and data["micro_batch_rows"] == 4
    assert data["results"]["baseline"]["padding_fraction"] > 0  # padded batches of 4
    assert data["results"]["project"]["padding_fraction"] < 0.01  # packed, padding-free rows (measured)
    assert (tmp_path / "results" / result.name.replace(".json", ".md")).is_file()


@pytest.mark.bench
def test_bench_distributed_runs_kills_resumes_and_writes_results(tmp_path: Path):
    """bench/distributed.py end to end on the CPU (the launch-mode matrix itself needs GPUs): a run,
    a run killed after its first checkpoint and relaunched, the results file with the keys the GPU
    results carry. On the CPU the resumed losses equal the uninterrupted run's exactly."""
    run_bench(
        "distributed",
        tmp_path,
        *("--gpus", "1", "--modes", "1gpu", "--steps", "4", "--global-batch", "2"),
        *("--max-length", "256", "--rows", "200", "--kill-resume", "1gpu", "--export", "none"),
        *("--overrides", "train.learning_rate=1e-3"),
    )
    (result,) = (tmp_path / "results").glob("*-llama-smoke-distributed.json")
    data = json.loads(result.read_text())
    assert {"gpu", "shape", "num_gpus", "per_gpu_cap_gib", "results"} <= data.keys()
    (r,) = data["results"]
    for key in ("mode", "gpus", "returncode", "tokens_per_s", "peak_gib_per_rank", "steady_gib_per_rank"):
        assert key in r, key
    assert r["returncode"] == 0 and len(r["losses_first_10"]) == 4 and r["plan_estimate_gib"] > 0
    k = r["kill_resume"]
    assert k["killed_returncode"] != 0 and k["checkpoints_after_kill"] == ["checkpoint-2"]
    assert k["resumed_returncode"] == 0 and k["resumed_from_log"]
    assert sorted(k["resumed_losses"]) == ["3", "4"] and k["max_abs_loss_diff"] == 0.0
    assert k["resume_verified"] and data["checks"]["max_resumed_loss_diff_1gpu"] == 0.0
    # the killed run and its relaunch ran the overridden recipe too (not only the uninterrupted one)
    killed = yaml.safe_load((tmp_path / "cache" / "runs" / "llama-smoke" / "1gpu-killed" / "recipe.yaml").read_text())
    assert killed["train"]["learning_rate"] == 1e-3 and r["overrides"] == ["train.learning_rate=1e-3"]


def test_bench_distributed_merges_a_table_split_over_calls(tmp_path: Path):
    """`--merge`: one results file from the files of calls that each ran some modes (the GPU
    machine's commands are time-limited); a later file's row replaces an earlier row of the same
    mode, every call's command is kept, and the goals are judged over the union: met, missed, or
    not measured. Files of different tables are refused."""
    sys.path.insert(0, str(REPO))
    from bench import distributed

    def call(command: str, rows: list[dict], **over: object) -> Path:
        payload = {"gpu": "GPU X", "shape": "s", "num_gpus": 2, "per_gpu_cap_gib": None, "prequantized": False}
        payload |= {"steps": 10, "global_batch": 8, "max_length": 2048, "command": command, "results": rows, **over}
        path = tmp_path / f"{len(list(tmp_path.glob('*.json')))}.json"
        path.write_text(json.dumps(payload))
        return path

    def row(mode: str, tps: float, peak: list[float], **more: object) -> dict:
        losses = [2.0 - i / 10 for i in range(10)]
        r = {"mode": mode, "gpus": 2, "returncode": 0, "tokens_per_s": tps, "peak_gib_per_rank": peak}
        return r | {"plan_estimate_gib": 7.0, "losses_first_10": losses, **more}

    resumed = {"killed_at_step": 7, "save_steps": 5, "killed_returncode": 1, "checkpoints_after_kill": []}
    resumed |= {"resumed_returncode": 0, "resumed_from_log": True, "resume_verified": True, "max_abs_loss_diff": 1e-3}
    a = call("first", [row("1gpu", 100.0, [7.0]), row("ddp", 195.0, [7.0], kill_resume=resumed), row("zero3", 1, [9])])
    b = call(
        "second",
        [
            row("zero3", 30.0, [9.0], export={"returncode": 0, "seconds": 9.0, "verified": True}),
            row("fsdp", 190.0, [5.0, 5.1]),
        ],
    )
    path = distributed.merge([a, b], tmp_path / "out", "-t", ["a note"])
    merged = json.loads(path.read_text())
    assert merged["commands"] == ["first", "second"] and merged["notes"] == ["a note"]
    assert [r["mode"] for r in merged["results"]] == ["1gpu", "ddp", "zero3", "fsdp"]
    assert merged["results"][2]["tokens_per_s"] == 30.0  # the later call's zero3 row
    checks = merged["checks"]
    assert checks["speedup_vs_1gpu_ddp"] == 1.95 and checks["tokens_per_s_vs_ddp_zero3"] == 30.0 / 195.0
    md = path.with_suffix(".md").read_text()
    assert "- met: DDP on 2 GPUs at least 1.9x one GPU's tokens/s: speedup_vs_1gpu_ddp = 1.95" in md
    assert "- **missed**: sharded tokens/s at least 0.9x DDP's: tokens_per_s_vs_ddp_zero3 = 0.1538" in md
    assert "- met: sharded peak per rank at most 0.75x DDP's: peak_vs_ddp_fsdp = 0.7286" in md
    assert "- met: the merged export of the zero3 adapter verifies" in md
    assert "- not measured: the merged export of the fsdp adapter verifies" in md
    assert "- not measured: kill and resume of fsdp in this run" in md
    assert "- met: resumed losses within 2e-3 of the uninterrupted run, from the checkpoint, state verified: ddp:" in md
    # a relaunch that did not verify the state, and a launch that failed, are missed, never met
    unverified = {**resumed, "resume_verified": False}
    crashed = row("zero2", 500.0, [1.0], returncode=1)
    c = call("fourth", [row("ddp", 195.0, [7.0], kill_resume=unverified), crashed])
    md = distributed.merge([a, c], tmp_path / "out2", "-t", []).with_suffix(".md").read_text()
    assert (
        "- **missed**: resumed losses within 2e-3 of the uninterrupted run, from the checkpoint, state verified: ddp:"
        in md
    )
    assert "- **missed**: zero2 failed (rc 1)" in md and "speedup_vs_1gpu_zero2" not in md
    longer = call("fifth", [row("fsdp", 1.0, [1.0])], max_length=4096)
    with pytest.raises(SystemExit, match="max_length is 4096"):
        distributed.merge([a, longer], tmp_path / "out", "-v", [])
    other = call("third", [row("fsdp", 1.0, [1.0])], num_gpus=4)
    try:
        distributed.merge([a, other], tmp_path / "out", "-u", [])
    except SystemExit as e:
        assert "num_gpus is 4" in str(e) and "not one table" in str(e)
    else:
        raise AssertionError("files of different tables were merged")


def test_every_bench_mode_is_a_launch_the_project_accepts(tmp_path: Path):
    """Each row of bench.distributed (ablation rows included) names a config the project reads as the
    intended launch, with its changed FSDP or DeepSpeed keys in place, and overrides the recipe
    loader accepts: a typo in a row must fail here, not after a GPU machine was started."""
    sys.path.insert(0, str(REPO))
    import yaml

    from bench import distributed
    from qlora_sft import launch
    from qlora_sft.recipe import load_recipe

    recipe = distributed.recipe_for(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "runs", 10, 8, 2048)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    kinds = {"single_gpu.yaml": "single_gpu", "multi_gpu.yaml": "ddp", "fsdp_qlora.yaml": "fsdp"}
    for name, m in distributed.MODES.items():
        path = distributed.config_file(name, tmp_path / "configs")
        lm = launch.from_config_file(path, m.processes(2))
        assert lm.world_size == (1 if name.startswith("1gpu") else 2), name
        if m.config in kinds:
            assert lm.kind == kinds[m.config], name
        accel = yaml.safe_load(path.read_text())
        for key, value in m.fsdp:
            assert accel["fsdp_config"][key] == value, (name, key)
        if m.zero:
            ds = json.loads(Path(accel["deepspeed_config"]["deepspeed_config_file"]).read_text())
            for key, value in m.zero:
                assert ds["zero_optimization"][key] == value, (name, key)
        loaded = load_recipe(recipe_path, list(m.overrides))
        for o in m.overrides:
            section, rest = o.split(".", 1)
            key, value = rest.split("=", 1)
            got = getattr(loaded, section)
            got = got.args.get(key) if section == "train" and not hasattr(got, key) else getattr(got, key)
            assert str(got).lower() == value.lower(), (name, o, got)


def test_peak_breakdown_names_what_is_alive_at_the_peak():
    """`peak_breakdown` (the profiled step's memory file) from a recorded allocation trace: the peak
    is found where the live bytes are largest, blocks freed before it do not count, and each live
    block is charged to the first frame of a known package (torch's own frames skipped)."""
    from qlora_sft.profiling import peak_breakdown

    def frame(path: str, line: int, name: str) -> dict:
        return {"filename": path, "line": line, "name": name}

    torch_frame = frame("/x/site-packages/torch/nn/functional.py", 10, "linear")
    head = [torch_frame, frame("/x/site-packages/liger_kernel/ops/flce.py", 77, "chunk")]
    layer = [frame("/x/site-packages/qlora_sft/model/offload.py", 50, "fetch")]
    mib = 2**20
    trace = [
        {"action": "alloc", "addr": 1, "size": 300 * mib, "frames": layer},
        {"action": "alloc", "addr": 2, "size": 200 * mib, "frames": head},
        {"action": "free_completed", "addr": 1, "size": 300 * mib, "frames": layer},
        {"action": "alloc", "addr": 3, "size": 400 * mib, "frames": head},  # peak: 600 MiB live
        {"action": "free_completed", "addr": 99, "size": 50 * mib, "frames": []},  # held before recording
        {"action": "free_completed", "addr": 3, "size": 400 * mib, "frames": head},
        {"action": "alloc", "addr": 4, "size": 100 * mib, "frames": layer},
    ]
    out = peak_breakdown({"device_traces": [trace]}, held_before=2**30, peak=2**30 + 600 * mib)
    assert out["above_held_before_at_peak_gib"] == 600 / 1024
    assert out["by_line_mib"] == {"liger_kernel/ops/flce.py:77 chunk": 600.0}
    assert out["held_before_gib"] == 1.0 and out["freed_before_peak_gib"] == 0.0
    # without the allocator's number, the step's peak is what was held plus the largest live total
    assert peak_breakdown({"device_traces": [trace]}, held_before=2**30)["peak_gib"] == 1 + 600 / 1024


def test_bench_plan_estimate_resolves_auto_tables_at_the_cap(tmp_path: Path):
    """The bench's plan estimate resolves `auto` of the frozen tables at the GPU's memory or the cap,
    as the launch does: the 14B shape at 8 x 2048 puts both in host memory under a 16 GiB cap, none on
    a 139 GiB GPU, and the estimate is the smaller with them in host memory. A row whose run kept
    other tables than plan said is reported as a missed goal."""
    sys.path.insert(0, str(REPO))
    from bench import distributed, workload

    model = tmp_path / "qwen2.5-14b"
    model.mkdir()
    workload.shape_config("qwen2.5-14b").save_pretrained(model)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(distributed.recipe_for(model, data, tmp_path / "runs", 10, 8, 2048)))
    over = ["train.micro_batch_tokens=16384"]
    capped = distributed.plan_estimate(recipe, "1gpu", 1, over, tmp_path / "c", 16.0)
    roomy = distributed.plan_estimate(recipe, "1gpu", 1, over, tmp_path / "c", 139.8)
    assert capped[1] == ["embedding_in_host_memory", "lm_head_in_host_memory"] and roomy[1] == []
    assert 1.0 < roomy[0] - capped[0] < 4.0  # two 152,064 x 5,120 bf16 tables: 2.9 GiB
    # a mode whose overrides pin the tables is estimated as pinned, whatever the cap
    assert distributed.plan_estimate(recipe, "1gpu_gputables", 1, over, tmp_path / "c", 16.0) == roomy
    row = {"mode": "1gpu", "returncode": 0, "plan_host_tables": capped[1]}
    payload = {"num_gpus": 1, "checks": {}, "results": [row | {"host_tables": capped[1]}]}
    assert any(x.startswith("- met: plan puts the same frozen tables") for x in distributed.goals_of(payload))
    payload["results"] = [row | {"host_tables": []}]
    assert any(x.startswith("- **missed**: plan puts the same") for x in distributed.goals_of(payload))


def test_bench_hostops_refuses_without_a_gpu(capsys):
    """bench.hostops times what the host pays per GPU operation: without CUDA it says so and exits 2
    (a GPU-only benchmark; its numbers are in bench/results/*-hostops.*)."""
    import torch

    from bench import hostops

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    assert hostops.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
