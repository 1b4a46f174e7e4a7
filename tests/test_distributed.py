"""Launch modes on the CPU for real: 2 ranks over gloo through `accelerate launch` (the DDP config
users run on GPUs), two launchers as two "nodes", and the bundled launch configs themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    ACCELERATE,
    CONFIGS,
    REPO,
    accelerate_cmd,
    cpu_env,
    free_port,
    metrics,
    recipe_dict,
    write_recipe,
    write_toy_data,
)

pytestmark = pytest.mark.multiprocess


def run(cmd: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env={**cpu_env(), **env}, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-6000:]}"
    return out


TRAIN = {
    "max_steps": 6,
    "logging_steps": 1,
    "save_steps": 3,
    "global_batch_size": 8,
    "per_device_train_batch_size": 4,
    "learning_rate": 5e-3,
}


@pytest.fixture(scope="module")
def ddp_runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same recipe twice: 2 CPU ranks with accumulation 1 (step 2 profiled on each rank), and 1
    process with accumulation 2."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_toy_data(root / "toy.jsonl", n=120)
    two = write_recipe(
        root / "two.yaml", recipe_dict(tiny_model, data, root / "runs", run={"name": "two"}, train=TRAIN)
    )
    one = write_recipe(
        root / "one.yaml", recipe_dict(tiny_model, data, root / "runs", run={"name": "one"}, train=TRAIN)
    )
    ddp = run(accelerate_cmd("train", str(two)), root, QLORA_SFT_PROFILE_STEP="2")
    single = run([sys.executable, "-m", "qlora_sft", "train", str(one)], root)
    return root / "runs" / "two", root / "runs" / "one", ddp, single


def test_ddp_uses_two_ranks_and_derives_accumulation(ddp_runs):
    two, one, ddp, _ = ddp_runs
    launch_two = yaml.safe_load((two / "recipe.yaml").read_text())["launch"]
    launch_one = yaml.safe_load((one / "recipe.yaml").read_text())["launch"]
    assert launch_two["world_size"] == 2 and launch_two["grad_accum"] == 1 and launch_two["global_batch"] == 8
    assert launch_one["world_size"] == 1 and launch_one["grad_accum"] == 2 and launch_one["global_batch"] == 8
    assert "2 process(es) x micro batch 4 x gradient accumulation 1 = global batch 8" in ddp.stdout
    # both ranks computed: each wrote its own RNG state into the checkpoint
    assert sorted(p.name for p in (two / "checkpoint-6").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert sorted(p.name for p in (one / "checkpoint-6").glob("rng_state*")) == ["rng_state.pth"]


def test_only_the_main_process_wrote_shared_files(ddp_runs):
    two, *_ = ddp_runs
    rows = metrics(two)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once, not once per rank
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1
    assert (two / "final" / "COMPLETE").is_file() and (two / "checkpoint-3" / "COMPLETE").is_file()
    manifest = json.loads((two / "checkpoint-6" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 8
    # each rank wrote its own files: its memory and sharding record, and the profile of the step asked for
    per_rank = sorted(p.name for p in (two / "logs").glob("*rank*"))
    assert per_rank == [
        *("profile-rank0.txt", "profile-rank1.txt", "rank0.json", "rank1.json"),
        *("timeline-rank0.json", "timeline-rank1.json"),
    ]
    for rank in (0, 1):
        assert json.loads((two / "logs" / f"timeline-rank{rank}.json").read_text())["step"] == 2


def test_ddp_loss_matches_one_process_with_accumulation(ddp_runs):
    two, one, *_ = ddp_runs
    a = [r["loss"] for r in metrics(two) if "loss" in r]
    b = [r["loss"] for r in metrics(one) if "loss" in r]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5), (a, b)  # bit-identical on the machines we tried
    # and the trained adapters agree (eval_loss is a mean of per-batch means, so it depends on how
    # the eval set is split over ranks; the weights do not)
    from safetensors.torch import load_file

    wa = load_file(two / "final" / "adapter_model.safetensors")
    wb = load_file(one / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert (wa[k].float() - wb[k].float()).abs().max() <= 1e-3, k  # at most one bf16 ulp
    changed = [k for k in wa if "lora_B" in k and wa[k].abs().max() > 0]
    assert changed, "the adapters did not train"


def test_two_launchers_as_two_nodes(tiny_model: Path, tmp_path: Path):
    """multi_node.yaml with machine_rank 0 and 1 on localhost: the rendezvous and rank arithmetic
    users rely on across machines (1 process per "node", world size 2)."""
    data = write_toy_data(tmp_path / "toy.jsonl", n=80)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(tiny_model, data, tmp_path / "runs", train={**TRAIN, "max_steps": 2, "save_steps": 2}),
    )
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = [
            ACCELERATE,
            "launch",
            "--config_file",
            str(CONFIGS / "multi_node.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "-m",
            "qlora_sft",
            "train",
            str(recipe),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=tmp_path, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    launch = yaml.safe_load((run_dir / "recipe.yaml").read_text())["launch"]
    assert launch["world_size"] == 2 and launch["grad_accum"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoint-2").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert "global batch 8" in outs[0]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_accelerate_configs_load_and_name_existing_files(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # accelerate's own parser: unknown keys fail here
    raw = yaml.safe_load(path.read_text())
    expected = {
        "single_gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "multi_node": "MULTI_GPU",
        "fsdp_qlora": "FSDP",
        "fsdp_qlora_offload": "FSDP",
    }
    kind = expected.get(path.stem, "DEEPSPEED")
    assert str(cfg.distributed_type).split(".")[-1] == kind
    if kind == "DEEPSPEED":
        ds_file = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        # batch sizes, learning rate and precision come from the recipe, never from two places
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert ds[key] == "auto", (ds_file, key)
        assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
        assert ds["zero_optimization"]["stage"] == (3 if "zero3" in path.stem else 2)
    assert raw.get("mixed_precision", "no") == "no"  # precision comes from the recipe


def test_plan_prints_batch_arithmetic_and_memory(tiny_model: Path, tmp_path: Path):
    data = write_toy_data(tmp_path / "toy.jsonl", n=100)
    recipe = write_recipe(
        tmp_path / "r.yaml", recipe_dict(tiny_model, data, tmp_path / "runs", train={"global_batch_size": 16})
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_sft",
            "plan",
            str(recipe),
            "--config",
            str(CONFIGS / "deepspeed_zero3.yaml"),
            "--gpus",
            "2",
            "--gpu-mem",
            "24",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "world size 2" in out.stdout
    assert "2 process(es) x micro batch 4 x gradient accumulation 2 = global batch 16" in out.stdout
    assert "data: 90 training examples -> at most 6 optimizer steps per epoch (packing" in out.stdout
    assert "estimated peak GPU memory per rank" in out.stdout and "deepspeed_zero3.yaml" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_plan_counts_the_save_of_fsdp_that_shards_nothing(tiny_model: Path, tmp_path: Path):
    """FSDP on one process runs as NO_SHARD, whose full state dict copies every weight on the GPU at
    each checkpoint save (one H200, 8B: 10.82 GiB at the save, 7.22 on single_gpu.yaml): plan says so
    and counts it, and counts nothing of it with two processes or without saves."""
    from qlora_sft import launch
    from qlora_sft.plan import ModelShape, estimate_memory, plan_lines
    from qlora_sft.recipe import load_recipe

    data = write_toy_data(tmp_path / "toy.jsonl", n=40)
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, data, tmp_path / "runs"))
    fsdp = str(CONFIGS / "fsdp_qlora.yaml")
    one = "\n".join(plan_lines(load_recipe(path), fsdp, 1))
    assert "warning: FSDP here shards nothing" in one and "configs/accelerate/single_gpu.yaml" in one, one
    assert "shards nothing" not in "\n".join(plan_lines(load_recipe(path), fsdp, 2))
    assert "shards nothing" not in "\n".join(plan_lines(load_recipe(path), str(CONFIGS / "single_gpu.yaml"), 1))
    quiet_plan = "\n".join(plan_lines(load_recipe(path, ["train.save_strategy=no"]), fsdp, 1))
    assert "shards nothing" in quiet_plan and "checkpoint save" not in quiet_plan, quiet_plan
    offloaded = str(CONFIGS / "fsdp_qlora_offload.yaml")  # parameter offload does something on one GPU
    assert "shards nothing" not in "\n".join(plan_lines(load_recipe(path), offloaded, 1))
    from bench.workload import SHAPES

    # the 8B shape's weights with the tiny recipe's short rows: the save's copy sets the peak
    shape = ModelShape.from_config({"architectures": ["LlamaForCausalLM"], **SHAPES["llama3-8b"]})
    key = "checkpoint save (NO_SHARD copies the weights)"
    saving = estimate_memory(shape, load_recipe(path), launch.from_config_file(fsdp, 1)).parts
    assert saving[key] > 0, saving
    quiet = estimate_memory(shape, load_recipe(path, ["train.save_strategy=no"]), launch.from_config_file(fsdp, 1))
    assert key not in quiet.parts
    assert key not in estimate_memory(shape, load_recipe(path), launch.from_config_file(fsdp, 2)).parts


@pytest.mark.parametrize(("shape", "gpu_mem"), [("qwen2.5-14b", 16.0), ("qwen2.5-32b", 24.0), ("qwen2.5-32b", 16.0)])
def test_plan_names_the_largest_micro_batch_that_fits(shape: str, gpu_mem: float, tmp_path: Path):
    """`plan --gpu-mem` names the most rows per micro batch whose estimate fits, for the consumer-GPU
    shapes of the benchmark (config.json only: plan reads no weights), or says that none does."""
    from bench.workload import SHAPES
    from qlora_sft.launch import plan_mode
    from qlora_sft.plan import (
        CUDA_CONTEXT_GIB,
        USABLE_FRACTION,
        ModelShape,
        estimate_memory,
        largest_micro_batch,
        plan_lines,
        resolve_host_tables,
    )
    from qlora_sft.recipe import build_recipe

    # a card also holds the CUDA context, outside what PyTorch's allocator may reserve
    usable = (gpu_mem - CUDA_CONTEXT_GIB) * USABLE_FRACTION
    model = tmp_path / shape
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], **SHAPES[shape]}))
    data = write_toy_data(tmp_path / "toy.jsonl", n=20)
    recipe = build_recipe(recipe_dict(model, data, tmp_path / "runs", data={"max_length": 2048}))
    lines = plan_lines(recipe, gpu_mem=gpu_mem)
    (line,) = [x for x in lines if x.startswith("largest micro batch")]
    mode = plan_mode(recipe, None, None, 1)
    dims = ModelShape.from_config(json.loads((model / "config.json").read_text()))
    # on these cards the frozen tables go to host memory (model.*_in_host_memory: auto), as plan says
    recipe = resolve_host_tables(recipe, mode, dims, gpu_mem)
    assert recipe.model.embedding_in_host_memory is recipe.model.lm_head_in_host_memory is True
    assert any(x.startswith("frozen tables: ") and "in host memory on a" in x for x in lines), lines
    micro = largest_micro_batch(dims, recipe, mode, gpu_mem)
    if micro:
        assert estimate_memory(dims, recipe, mode, micro).total <= usable
        assert estimate_memory(dims, recipe, mode, micro + 1).total > usable
        assert f": {micro} x 2048 tokens (train.micro_batch_tokens={micro * 2048}, estimated" in line
        gbs = recipe.train.global_batch_size
        if gbs % micro:  # the recipe's global batch takes only a divisor
            best = max(m for m in range(1, micro) if gbs % m == 0)
            assert line.endswith(
                f"train.global_batch_size {gbs} on 1 process(es) takes a micro batch that divides it: at most {best}"
            )
    else:
        assert estimate_memory(dims, recipe, mode, 1).total > usable
        assert "none; one row of 2048 tokens needs" in line
    assert (shape, gpu_mem, bool(micro)) != ("qwen2.5-32b", 16.0, True)  # 4-bit 32B weights alone are ~17 GiB
    assert f"estimate at most {usable:.2f} GiB" in line
    # The recipe the GPU runs used (bench.distributed), against what they measured on one H200
    from bench.distributed import recipe_for

    raw = recipe_for(model, data, tmp_path / "bench", 10, 8, 2048)
    raw["train"]["offload_activations"] = True
    # those runs kept the frozen tables on the GPU (the default until 2026-12-02)
    raw["model"].update(embedding_in_host_memory=False, lm_head_in_host_memory=False)
    measured = largest_micro_batch(dims, build_recipe(raw), mode, gpu_mem)
    if (shape, gpu_mem) == ("qwen2.5-32b", 24.0):
        # capped at 24 GiB (2026-11-30/12-01): 4 x 2048 trained, 23.12 GiB in all (reserved 22.05 plus
        # 1.07 outside the allocator); 8 x 2048 failed. plan stays one row on the safe side
        assert measured == 3, measured
    if (shape, gpu_mem) == ("qwen2.5-14b", 16.0):
        # capped at 16 GiB: 8 x 2048 trained with 0.9 GiB to spare; 11 x 2048 trained only by using
        # every byte (240 allocator retries under the cap that keeps 0.95 GiB for the context)
        assert 8 <= measured <= 10, measured
    # the default (auto: both tables in host memory under these caps), measured on one H200 on
    # 2026-12-02 (bench/results/2026-12-02-NVIDIA_H200-qwen2.5-*-auto): the peak at each micro batch
    # that ran, and plan's largest micro batch, which trained
    raw["model"].update(embedding_in_host_memory="auto", lm_head_in_host_memory="auto")
    peaks = {("qwen2.5-14b", 16.0): {8: 10.19, 19: 14.77}, ("qwen2.5-32b", 24.0): {4: 18.69, 7: 20.30}}
    for rows, peak in peaks.get((shape, gpu_mem), {}).items():
        at = resolve_host_tables(build_recipe(raw), mode, dims, gpu_mem, rows)
        assert at.model.embedding_in_host_memory is at.model.lm_head_in_host_memory is True
        assert abs(estimate_memory(dims, at, mode, rows).total / peak - 1) <= 0.15, (rows, peak)
    if (shape, gpu_mem) in peaks:
        # 14B at 19 x 2048 took 15.91 GiB in all (458 allocator retries: the edge), 32B at 7 x 2048 22.46
        assert largest_micro_batch(dims, build_recipe(raw), mode, gpu_mem) == max(peaks[shape, gpu_mem])


def test_plan_works_from_an_installed_wheel(tiny_model: Path, tmp_path: Path):
    """The bundled configs ship inside the wheel: `plan --gpu-mem` lists them when qlora-sft is
    installed from it and run away from the source tree."""
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(REPO),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("qlora_sft-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path / "runs"))
    code = "import sys, qlora_sft, qlora_sft.cli as c; print(qlora_sft.__file__); sys.exit(c.main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, "plan", str(recipe), "--gpu-mem", "24"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(str(site))  # the wheel's copy, not the source tree's
    for name in ("fsdp_qlora.yaml", "fsdp_qlora_offload.yaml", "deepspeed_zero3.yaml", "single_gpu.yaml"):
        assert name in out.stdout


def test_local_sh_picks_single_gpu_without_gpus(tiny_model: Path, tmp_path: Path):
    data = write_toy_data(tmp_path / "toy.jsonl", n=40)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(tiny_model, data, tmp_path / "runs", train={**TRAIN, "max_steps": 1, "save_steps": 1}),
    )
    env = cpu_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["NUM_GPUS"] = "0"
    out = subprocess.run(
        [str(REPO / "launch" / "local.sh"), str(recipe), "run.name=via-local-sh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "single_gpu.yaml" in out.stderr
    assert (tmp_path / "runs" / "via-local-sh" / "final" / "COMPLETE").is_file()
    assert shutil.which("bash")


def test_impossible_launch_combinations_fail_before_loading(tiny_model: Path, tmp_path: Path):
    from qlora_sft.launch import LaunchMode, check_launch_compat, from_config_file
    from qlora_sft.recipe import build_recipe

    def recipe(**q):
        return build_recipe(recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path, quantization=q))

    zero3, fsdp = LaunchMode("deepspeed", 2, zero_stage=3), LaunchMode("fsdp", 2)
    assert check_launch_compat(recipe(method="int8"), LaunchMode("ddp", 2)) == []
    (p,) = check_launch_compat(recipe(method="int8"), zero3)
    assert "int8, which DeepSpeed ZeRO-3 cannot shard" in p
    (p,) = check_launch_compat(recipe(method="int8"), fsdp)
    assert "FSDP cannot shard" in p
    (p,) = check_launch_compat(recipe(compute_dtype="bfloat16", quant_storage="float16"), fsdp)
    assert "quant_storage` is float16 but the compute dtype is bfloat16" in p
    assert check_launch_compat(recipe(compute_dtype="bfloat16"), fsdp) == []
    assert (
        check_launch_compat(
            recipe(compute_dtype="bfloat16", quant_storage="uint8"), LaunchMode("deepspeed", 2, zero_stage=2)
        )
        == []
    )
    # the bundled configs are accepted as they are; FSDP2 and sharded state dicts are refused with the reason
    assert check_launch_compat(recipe(), from_config_file(CONFIGS / "fsdp_qlora.yaml")) == []
    (p,) = check_launch_compat(recipe(), LaunchMode("fsdp", 2, fsdp_version=2))
    assert "FSDP2" in p and "bitsandbytes#1945" in p
    (p,) = check_launch_compat(recipe(), LaunchMode("fsdp", 2, state_dict_type="SHARDED_STATE_DICT"))
    assert "FULL_STATE_DICT" in p
    # the plan command refuses the same way, exit code 2
    f = write_recipe(
        tmp_path / "r.yaml", recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path, quantization={"method": "int8"})
    )
    out = subprocess.run(
        [sys.executable, "-m", "qlora_sft", "plan", str(f), "--config", str(CONFIGS / "deepspeed_zero3.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2 and "cannot shard" in out.stderr


def test_adapter_trained_under_ddp_exports_and_reproduces(ddp_runs, tmp_path: Path):
    """A DDP checkpoint is the same peft format as a one-process one: it merges and verifies."""
    from qlora_sft.export import export

    two, *_ = ddp_runs
    res = export(two / "checkpoint-6", out=tmp_path / "merged", dtype="fp32")
    assert res.ok and res.merged_vs_trained is not None
    assert res.merged_vs_trained.top1_agreement == 1.0 and res.merged_vs_trained.relative < 1e-3
    assert (tmp_path / "merged" / "config.json").is_file()


def test_allocator_expandable_segments_by_default_and_the_users_settings_kept(tmp_path: Path, monkeypatch):
    """`train`, `export` and `chat` turn on the CUDA allocator's expandable segments before torch starts
    CUDA, unless the user configured the allocator under either of torch's names (then nothing is
    changed or added); the children accelerate starts inherit the variable."""
    from qlora_sft import cli
    from qlora_sft.launch import DEFAULT_ALLOC_CONF, default_allocator_settings, describe_allocator_settings

    env: dict[str, str] = {}
    default_allocator_settings(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": DEFAULT_ALLOC_CONF}
    for users in (
        {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"},
        {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"},
    ):
        env = dict(users)
        default_allocator_settings(env)
        assert env == users
        assert describe_allocator_settings(env).startswith("=".join(next(iter(users.items()))))

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert cli.main(["plan", str(tmp_path / "missing.yaml")]) == 2  # plan loads no model: left alone
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert cli.main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "out")]) == 2
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == DEFAULT_ALLOC_CONF


def test_fsdp_environment_switches_are_checked():
    """QLORA_SFT_FSDP_UNITS and QLORA_SFT_FSDP_RELEASE_HEAD: known values taken, anything else refused
    with the variable, the value and what to use (read when the launch mode is resolved, before any
    model is loaded)."""
    from qlora_sft.errors import UserError
    from qlora_sft.launch import fsdp_release_head, fsdp_units

    assert fsdp_units({}) == "layers" and fsdp_units({"QLORA_SFT_FSDP_UNITS": " PEFT "}) == "peft"
    assert fsdp_release_head({}) is True  # the default since 2026-11-30
    assert fsdp_release_head({"QLORA_SFT_FSDP_RELEASE_HEAD": "1"}) is True
    assert fsdp_release_head({"QLORA_SFT_FSDP_RELEASE_HEAD": "0"}) is False
    assert fsdp_release_head({"QLORA_SFT_FSDP_RELEASE_HEAD": " No "}) is False
    with pytest.raises(UserError, match=r"QLORA_SFT_FSDP_RELEASE_HEAD='on': use 1 \(on\) or 0 \(off\)"):
        fsdp_release_head({"QLORA_SFT_FSDP_RELEASE_HEAD": "on"})
    with pytest.raises(UserError, match=r"QLORA_SFT_FSDP_UNITS='modules': use one of layers, peft"):
        fsdp_units({"QLORA_SFT_FSDP_UNITS": "modules"})


def test_gpu_memory_cap_counts_the_cuda_context_and_refuses_nonsense():
    """QLORA_SFT_GPU_MEMORY_GIB stands for a card of that size: what is in use outside PyTorch's
    allocator (the CUDA context) counts against it and the allocator gets the rest; a cap that is not
    a number, NaN, infinite, zero, negative, above the GPU, or eaten whole by the context is refused
    with the variable, the value and the fix. `plan --gpu-mem` refuses the same values."""
    from qlora_sft import cli
    from qlora_sft.errors import UserError
    from qlora_sft.launch import allocator_fraction

    cap, fraction = allocator_fraction("16", 140.0, 0.5)
    assert cap == 16.0 and fraction == pytest.approx(15.5 / 140.0)
    assert allocator_fraction("140", 140.0, 0.0) == (140.0, 1.0)
    for raw in ("sixteen", "nan", "inf", "-inf", "0", "-4", "141"):
        with pytest.raises(UserError, match=rf"QLORA_SFT_GPU_MEMORY_GIB={raw!r}|QLORA_SFT_GPU_MEMORY_GIB={raw}:"):
            allocator_fraction(raw, 140.0, 0.5)
    with pytest.raises(UserError, match=r"=1: 1\.20 GiB of this GPU count as outside PyTorch's allocator"):
        allocator_fraction("1", 140.0, 1.2)
    for raw in ("nan", "inf", "0", "-24", "24GB"):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(["plan", "r.yaml", "--gpu-mem", raw])
        assert exc.value.code == 2


def test_gpu_sm_cap_values_and_refusals(monkeypatch):
    """QLORA_SFT_GPU_SMS (a benchmark's slower card: the kernels on N of the GPU's SMs) takes a whole
    number from 1 to the GPU's count; anything else is refused with the variable and the value; and
    without a CUDA GPU it does nothing."""
    import torch

    from qlora_sft.errors import UserError
    from qlora_sft.launch import GPU_SMS_ENV, apply_gpu_sm_cap, sm_count

    assert sm_count("16", 132) == 16 and sm_count("132", 132) == 132
    for raw in ("sixteen", "16.5", "nan", "inf", "0", "-8", "133", ""):
        with pytest.raises(UserError, match=rf"{GPU_SMS_ENV}={raw!r}|{GPU_SMS_ENV}={raw}:"):
            sm_count(raw, 132)
    if not torch.cuda.is_available():
        monkeypatch.setenv(GPU_SMS_ENV, "16")
        assert apply_gpu_sm_cap() is None
        monkeypatch.setenv(GPU_SMS_ENV, "-16")  # checked even without a GPU to hold it to
        with pytest.raises(UserError, match=f"{GPU_SMS_ENV}=-16: must be > 0$"):  # (no GPU's count to name)
            apply_gpu_sm_cap()


@pytest.mark.gpu
def test_gpu_memory_cap_on_a_gpu_behaves_like_a_card_of_that_size(monkeypatch):
    """On a CUDA GPU, QLORA_SFT_GPU_MEMORY_GIB=2 lets PyTorch's allocator reserve 2 GiB less what is
    counted outside it (what the GPU holds there now, at least the 0.95 GiB the CUDA context grows
    to): an allocation that a 2 GiB card could not hold fails with torch's out-of-memory error, a
    smaller one succeeds."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from qlora_sft.launch import apply_gpu_memory_cap

    monkeypatch.setenv("QLORA_SFT_GPU_MEMORY_GIB", "2")
    torch.cuda.empty_cache()  # what is reserved is then what live tensors hold
    try:
        cap, outside = apply_gpu_memory_cap()
        assert cap == 2.0 and 0 < outside < 2, outside  # a CUDA context exists once CUDA is in use
        room = 2.0 - outside - torch.cuda.memory_reserved() / 2**30
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int((room + 0.05) * 2**30), dtype=torch.uint8, device="cuda")
        kept = torch.empty(int((room - 0.1) * 2**30), dtype=torch.uint8, device="cuda")
        assert kept.numel() > 0
        del kept
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
