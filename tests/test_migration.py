"""Users arriving from axolotl and LLaMA-Factory: their DeepSpeed JSONs and accelerate YAMLs (copies of
the upstream key structure in tests/data/upstream/), read by `plan` and by `train` (on CPUs: everything
up to the GPU check), and the recipe options they expect: lora.init_from, max_rows, the end-token
refusal, prepare --rebuild, the train keys qlora-sft sets itself, the converted example recipes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, DATA, REPO, TESTS, free_port, recipe_dict, write_recipe, write_toy_data

from qlora_sft import launch_config
from qlora_sft.errors import DataError, RecipeError, UserError
from qlora_sft.launch import LaunchMode, from_config_file, mode_from_environment
from qlora_sft.recipe import build_recipe, load_recipe

UPSTREAM = DATA / "upstream"
AXOLOTL_Z3 = UPSTREAM / "axolotl_zero3_bf16.json"
LLAMAFACTORY_Z3 = UPSTREAM / "llamafactory_ds_z3_config.json"
LLAMAFACTORY_FSDP = UPSTREAM / "llamafactory_fsdp_config.yaml"
RANKS = {"world_size": 2, "local_rank": 0, "rank": 0}


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "qlora_sft", *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600
    )


@pytest.fixture()
def shape_recipe(tmp_path: Path) -> Path:
    """A recipe over a model folder with only config.json (plan reads no weights), bf16 compute."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path / "model"
    )
    raw = recipe_dict(
        tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "runs", quantization={"compute_dtype": "bfloat16"}
    )
    return write_recipe(tmp_path / "r.yaml", raw)


def bf16_recipe(**sections):
    raw = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}}
    raw["quantization"] = {"compute_dtype": "bfloat16"}
    raw["train"] = {"global_batch_size": 8, "per_device_train_batch_size": 2}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return build_recipe(raw)


def accelerate_env(config: Path, *extra: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file CONFIG` gives each rank (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "-m", "qlora_sft", "train", "r"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys())
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


# --------------------------------------------------------------------------------------------
# 1. A DeepSpeed JSON is a launch config
# --------------------------------------------------------------------------------------------


def test_plan_reads_a_deepspeed_json_as_what_it_is(shape_recipe: Path):
    """Was: `plan --config zero3_bf16.json --gpus 2` exited 0 with single_gpu, world size 1."""
    for config in (AXOLOTL_Z3, LLAMAFACTORY_Z3):
        out = cli("plan", str(shape_recipe), "--config", str(config), "--gpus", "2")
        assert out.returncode == 0, out.stderr
        how = "zero3, each decoder layer gathered whole, released after its backward"
        launch = f"launch: {config.name} ({how}), 1 node(s) x 2 process(es)"
        assert f"{launch} = world size 2" in out.stdout
        assert "single_gpu" not in out.stdout
        assert f"deepspeed: {config.name}: ZeRO-3" in out.stdout
        assert "filled from the recipe: gradient_accumulation_steps" in out.stdout
        assert "pip install 'qlora-sft[deepspeed]'" in out.stdout  # a note where deepspeed is missing
    mode = from_config_file(AXOLOTL_Z3, 4, 2)
    assert (mode.kind, mode.zero_stage, mode.world_size, mode.shards_parameters) == ("deepspeed", 3, 8, True)


def test_upstream_deepspeed_jsons_are_read_fully():
    axolotl = launch_config.read_deepspeed(AXOLOTL_Z3)
    assert (axolotl.stage, axolotl.enabled("bf16"), axolotl.enabled("fp16"), axolotl.offload) == (3, True, None, False)
    assert axolotl.gathers_16bit_weights()
    # the same file in DeepSpeed's newer spelling (no stage3_ prefix)
    assert launch_config.read_deepspeed(UPSTREAM / "axolotl_zero3_bf16_unprefixed.json").gathers_16bit_weights()
    factory = launch_config.read_deepspeed(LLAMAFACTORY_Z3)
    assert (factory.stage, factory.enabled("bf16"), factory.enabled("fp16")) == (3, "auto", "auto")
    recipe = bf16_recipe()
    for ds in (axolotl, factory):
        assert launch_config.deepspeed_problems(ds, recipe, micro_batch=2, grad_accum=2, global_batch=8) == []
        assert launch_config.deepspeed_problems(ds, recipe, compute_dtype="bfloat16") == []


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_deepspeed_values_that_contradict_the_recipe_name_both(tmp_path: Path):
    base = json.loads(AXOLOTL_Z3.read_text())
    recipe = bf16_recipe()

    def problems(change: dict, **launch) -> str:
        data = {**base, **change}
        ds = launch_config.read_deepspeed(write_json(tmp_path / "x.json", data))
        return "\n".join(launch_config.deepspeed_problems(ds, recipe, **launch))

    text = problems({"train_micro_batch_size_per_gpu": 4})
    assert "`train_micro_batch_size_per_gpu` is 4" in text and "train.per_device_train_batch_size) is 2" in text
    text = problems({"bf16": {"enabled": False}, "fp16": {"enabled": True}}, compute_dtype="bfloat16")
    assert "`fp16.enabled` is true but the recipe computes in bfloat16 (quantization.compute_dtype)" in text
    assert "x.json" in text
    text = problems({"gradient_accumulation_steps": 8}, micro_batch=2, grad_accum=2, global_batch=8)
    assert "`gradient_accumulation_steps` is 8 but the recipe needs 2" in text
    absent = {k: v for k, v in base.items() if k != "gradient_accumulation_steps"}
    ds = launch_config.read_deepspeed(write_json(tmp_path / "y.json", absent))
    text = "\n".join(launch_config.deepspeed_problems(ds, recipe, micro_batch=2, grad_accum=2, global_batch=8))
    assert "(absent: accelerate uses 1) but the recipe needs 2" in text
    assert "`train_batch_size` is 16 but the recipe's global batch" in problems({"train_batch_size": 16})
    assert "`gradient_clipping` is 0.3 but train.max_grad_norm is 1" in problems({"gradient_clipping": 0.3})
    zero = {**base["zero_optimization"], "stage3_gather_16bit_weights_on_model_save": False}
    assert "saves an empty adapter" in problems({"zero_optimization": zero})
    offload = {**base["zero_optimization"], "offload_optimizer": {"device": "cpu"}}
    assert "zero_force_ds_cpu_optimizer" in problems({"zero_optimization": offload})
    assert problems({"zero_optimization": offload, "zero_force_ds_cpu_optimizer": False}) == ""
    optimizer = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    assert "`optimizer.params.lr` is 0.001 but train.learning_rate is 0.0002" in problems(optimizer)
    with pytest.raises(UserError, match="no zero_optimization.stage"):
        launch_config.read_deepspeed(write_json(tmp_path / "z.json", {"bf16": {"enabled": True}}))


def test_train_deepspeed_in_the_recipe_is_read_by_validate_and_plan(shape_recipe: Path, tmp_path: Path):
    """Was: `train.deepspeed=X.json` passed validate and plan ignored it."""
    out = cli("plan", str(shape_recipe), f"train.deepspeed={AXOLOTL_Z3}", "--gpus", "2")
    assert out.returncode == 0, out.stderr
    assert "launch: train.deepspeed: axolotl_zero3_bf16.json (zero3, each decoder layer" in out.stdout
    assert "world size 2" in out.stdout
    bad = write_json(
        tmp_path / "fixed.json", {**json.loads(AXOLOTL_Z3.read_text()), "train_micro_batch_size_per_gpu": 16}
    )
    for command in ("validate", "plan"):
        out = cli(command, str(shape_recipe), f"train.deepspeed={bad}")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert (
            "`train_micro_batch_size_per_gpu` is 16" in out.stderr and "per_device_train_batch_size) is 4" in out.stderr
        )
    # a DeepSpeed JSON next to an FSDP config is refused
    out = cli("plan", str(shape_recipe), f"train.deepspeed={AXOLOTL_Z3}", "--config", str(LLAMAFACTORY_FSDP))
    assert out.returncode == 2 and "FSDP config; use one" in out.stderr


def test_missing_deepspeed_is_one_line_before_anything_loads(shape_recipe: Path, tmp_path: Path):
    """Was: a PackageNotFoundError traceback from transformers, after the model had loaded."""
    assert not launch_config.deepspeed_installed()  # the suite runs without it, on purpose
    out = cli("train", str(shape_recipe), f"train.deepspeed={AXOLOTL_Z3}")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "qlora-sft train: error: train.deepspeed (axolotl_zero3_bf16.json) asks for DeepSpeed, which is not "
        "installed: pip install 'qlora-sft[deepspeed]'"
    ]
    assert not (tmp_path / "runs").exists()  # nothing was written, nothing loaded
    out = cli("submit", str(shape_recipe), "--deepspeed", str(AXOLOTL_Z3), "--cluster", "local", cwd=tmp_path)
    assert out.returncode == 2 and "pip install 'qlora-sft[deepspeed]'" in out.stderr and "Traceback" not in out.stderr


def test_train_starts_the_recipes_deepspeed_as_accelerate_would(tmp_path: Path, monkeypatch):
    """`train.deepspeed` gives the rank the variables of `accelerate launch --use_deepspeed
    --deepspeed_config_file X.json`; the launch mode read from them is the file's."""
    monkeypatch.setattr(launch_config, "deepspeed_installed", lambda: True)
    recipe = bf16_recipe(train={"deepspeed": str(AXOLOTL_Z3)})
    env: dict[str, str] = {}
    launch_config.prepare_environment(recipe, env)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(AXOLOTL_Z3)
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true" and env["WORLD_SIZE"] == "1"  # one process, no launcher
    mode = mode_from_environment(env, cpu=False, **RANKS)
    assert (mode.kind, mode.zero_stage, mode.deepspeed.path) == ("deepspeed", 3, AXOLOTL_Z3)
    # the same DeepSpeed JSON through accelerate's own launcher arguments gives the same mode
    launched = accelerate_env(CONFIGS / "multi_gpu.yaml", "--use_deepspeed", "--deepspeed_config_file", str(AXOLOTL_Z3))
    assert mode_from_environment(launched, cpu=False, **RANKS).deepspeed.raw == mode.deepspeed.raw
    with pytest.raises(UserError, match="the launcher started FSDP"):
        launch_config.prepare_environment(recipe, {"ACCELERATE_USE_FSDP": "true"})
    other = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(LLAMAFACTORY_Z3)}
    with pytest.raises(UserError, match="two DeepSpeed configs"):
        launch_config.prepare_environment(recipe, other)
    with pytest.raises(UserError, match="DeepSpeed needs CUDA GPUs"):
        launch_config.prepare_environment(recipe, {"ACCELERATE_USE_CPU": "true"})
    # and the JSON's values are checked against the resolved launch
    fp16 = write_json(
        tmp_path / "fp16.json",
        {**json.loads(AXOLOTL_Z3.read_text()), "bf16": {"enabled": False}, "fp16": {"enabled": True}},
    )
    mode = mode_from_environment(
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(fp16)}, cpu=False, **RANKS
    )
    text = "\n".join(launch_config.launch_problems(recipe, mode, None, "bfloat16"))
    assert "fp16.json: `fp16.enabled` is true but the recipe computes in bfloat16" in text


def test_relative_paths_resolve_against_the_file_that_names_them(tmp_path: Path, monkeypatch):
    """Was: `deepspeed_config_file:` in an accelerate YAML resolved against the current directory."""
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    mode = from_config_file(UPSTREAM / "accelerate_deepspeed_file.yaml")
    assert (mode.kind, mode.zero_stage, mode.deepspeed.path) == ("deepspeed", 3, AXOLOTL_Z3)
    # the launch scripts hand accelerate the resolved file (accelerate opens it from the working directory)
    monkeypatch.setenv("QLORA_SFT_DRY_RUN", "1")
    extra = launch_config.accelerate_args(UPSTREAM / "accelerate_deepspeed_file.yaml")
    assert extra == ["--deepspeed_config_file", str(AXOLOTL_Z3)]
    env = accelerate_env(UPSTREAM / "accelerate_deepspeed_file.yaml", *extra)
    assert mode_from_environment(env, cpu=False, **RANKS).deepspeed.path == AXOLOTL_Z3
    # launched without them, a rank cannot find the file: a clear error, not accelerate's traceback
    env = accelerate_env(UPSTREAM / "accelerate_deepspeed_file.yaml")
    monkeypatch.setattr(launch_config, "deepspeed_installed", lambda: True)
    with pytest.raises(UserError, match="not found from the working directory"):
        launch_config.prepare_environment(bf16_recipe(), env)
    # the recipe's train.deepspeed: relative to the recipe file; an override's, to the working directory
    (tmp_path / "sub" / "ds").mkdir(parents=True)
    shutil.copy(AXOLOTL_Z3, tmp_path / "sub" / "ds" / "z3.json")
    raw = {"model": {"name_or_path": "m"}, "data": {"sources": ["a.jsonl"]}, "train": {"deepspeed": "ds/z3.json"}}
    recipe = load_recipe(write_recipe(tmp_path / "sub" / "r.yaml", raw))
    assert recipe.train.args["deepspeed"] == str(tmp_path / "sub" / "ds" / "z3.json")
    recipe = load_recipe(tmp_path / "sub" / "r.yaml", ["train.deepspeed=sub/ds/z3.json"])
    assert recipe.train.args["deepspeed"] == str(tmp_path / "sub" / "ds" / "z3.json")


def shell_env(tmp_path: Path) -> dict[str, str]:
    """PATH with a `python` that imports this checkout (and a fake `accelerate` that prints its
    arguments), as the launch scripts look for them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    fake = bin_dir / "accelerate"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO / "src"),
        "ACCELERATE": str(fake),
        "NUM_GPUS": "2",
    }


def test_launch_scripts_take_a_deepspeed_json(tmp_path: Path, shape_recipe: Path):
    env = shell_env(tmp_path)
    local = str(REPO / "launch" / "local.sh")
    out = subprocess.run(
        ["bash", local, "--deepspeed", str(AXOLOTL_Z3), str(shape_recipe)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and "pip install 'qlora-sft[deepspeed]'" in out.stderr  # checked before launching
    env["QLORA_SFT_DRY_RUN"] = "1"  # (no package check: what is launched)
    for how in (["--deepspeed", str(AXOLOTL_Z3)], []):
        e = {**env, **({} if how else {"ACCELERATE_CONFIG": str(AXOLOTL_Z3)})}
        out = subprocess.run(
            ["bash", local, *how, str(shape_recipe), "lora.r=4"], env=e, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        args = out.stdout.splitlines()
        assert args[-3:] == [str(shape_recipe), "lora.r=4", f"train.deepspeed={AXOLOTL_Z3}"]
        assert args[args.index("--config_file") + 1].endswith("multi_gpu.yaml")
    e = {**env, "ACCELERATE_CONFIG": str(UPSTREAM / "accelerate_deepspeed_file.yaml")}
    out = subprocess.run(["bash", local, str(shape_recipe)], env=e, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    assert args[args.index("--deepspeed_config_file") + 1] == str(AXOLOTL_Z3)


def render_sbatch(tmp_path: Path, *args: str, **env: str) -> str:
    e = {
        **shell_env(tmp_path),
        "QLORA_SFT_DRY_RUN": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "MASTER_ADDR": "gpu01",
        "SLURM_GPUS_ON_NODE": "8",
        "QLORA_SFT_PYTHON": "python",
        "QLORA_SFT_HOME": str(REPO),
        **env,
    }
    for key in ("ACCELERATE_CONFIG", "MASTER_PORT", "QLORA_SFT_PROCS_PER_NODE"):
        if key not in env:
            e.pop(key, None)
    out = subprocess.run(
        ["bash", str(REPO / "slurm" / "multi_node.sbatch"), *args], env=e, capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.replace(str(REPO), "<repo>")


def test_sbatch_templates_take_a_deepspeed_json(tmp_path: Path):
    """Without a SLURM cluster: the templates' dry run (the golden renders stay as they were)."""
    recipe = "configs/recipes/demo.yaml"
    golden = (TESTS / "slurm" / "golden" / "multi_node_2.txt").read_text()
    plain = render_sbatch(tmp_path, recipe, "train.learning_rate=1e-4", "run.name=x;$(touch PWNED)")
    assert plain == golden
    ds = "<repo>/tests/data/upstream/axolotl_zero3_bf16.json"
    for how, env in (((("--deepspeed", str(AXOLOTL_Z3))), {}), ((), {"ACCELERATE_CONFIG": str(AXOLOTL_Z3)})):
        got = render_sbatch(tmp_path, *how, recipe, "run.name=x", **env)
        assert f"train.deepspeed={ds}" in got.splitlines()[-1] and f"train.deepspeed={ds}" in got.splitlines()[1]
        assert '--config_file\\ \\"\\$QLORA_SFT_ACCELERATE_CONFIG\\"' in got
    got = render_sbatch(tmp_path, recipe, ACCELERATE_CONFIG=str(UPSTREAM / "accelerate_deepspeed_file.yaml"))
    assert '--deepspeed_config_file\\ \\"\\$QLORA_SFT_DEEPSPEED_CONFIG_FILE\\"' in got
    assert not list(REPO.glob("PWNED*"))


# --------------------------------------------------------------------------------------------
# 2. Any accelerate YAML is read fully
# --------------------------------------------------------------------------------------------

YAMLS = [
    LLAMAFACTORY_FSDP,
    UPSTREAM / "llamafactory_fsdp_config_fp16_offload.yaml",
    CONFIGS / "fsdp_qlora.yaml",
    CONFIGS / "fsdp_qlora_offload.yaml",
    CONFIGS / "deepspeed_zero3.yaml",
    CONFIGS / "deepspeed_zero2.yaml",
    CONFIGS / "multi_gpu.yaml",
]


@pytest.mark.parametrize("config", YAMLS, ids=[p.name for p in YAMLS])
def test_plan_and_train_read_an_accelerate_config_alike(config: Path, monkeypatch):
    """`plan` reads the file; a rank reads what accelerate's own launcher made of it. Same settings."""
    monkeypatch.chdir(REPO)  # (where the bundled DeepSpeed YAMLs' relative file paths start)
    planned = from_config_file(config, 2)
    ranked = mode_from_environment(accelerate_env(config), cpu=False, **RANKS)
    assert (ranked.kind, ranked.zero_stage, ranked.offload) == (planned.kind, planned.zero_stage, planned.offload)
    assert ranked.fsdp == (dataclasses.replace(planned.fsdp, notes=()) if planned.fsdp else None)
    assert (ranked.fsdp_version, ranked.sync_module_states, ranked.state_dict_type) == (
        planned.fsdp_version,
        planned.sync_module_states,
        planned.state_dict_type,
    )
    assert ranked.mixed_precision == planned.mixed_precision
    if planned.deepspeed is not None:
        assert ranked.deepspeed.path.resolve() == planned.deepspeed.path.resolve()
        assert ranked.deepspeed.raw == planned.deepspeed.raw


def test_llamafactory_fsdp_config_is_read_and_honoured(shape_recipe: Path):
    """Was: accepted unchecked; plan read neither use_orig_params, prefetch nor mixed precision."""
    mode = from_config_file(LLAMAFACTORY_FSDP)
    fs = mode.fsdp
    assert (fs.use_orig_params, fs.backward_prefetch, fs.forward_prefetch, fs.sharding_strategy) == (
        True,
        "BACKWARD_PRE",
        False,
        "FULL_SHARD",
    )
    assert (fs.auto_wrap_policy, fs.state_dict_type, fs.cpu_ram_efficient_loading, mode.mixed_precision) == (
        "TRANSFORMER_BASED_WRAP",
        "FULL_STATE_DICT",
        True,
        "bf16",
    )
    assert mode.config_problems == () and mode.config_notes == ()  # tpu_env: [] and downcast_bf16: 'no' are no-ops
    out = cli("plan", str(shape_recipe), "--config", str(LLAMAFACTORY_FSDP))
    assert out.returncode == 0, out.stderr
    assert "fsdp: full_shard, use_orig_params true, backward prefetch backward_pre" in out.stdout
    assert "mixed precision: bf16" in out.stdout
    # its fp16 revision contradicts a bf16 recipe: refused, naming both
    out = cli("plan", str(shape_recipe), "--config", str(UPSTREAM / "llamafactory_fsdp_config_fp16_offload.yaml"))
    assert out.returncode == 2
    assert "sets mixed_precision: fp16 but the recipe computes in bfloat16 (quantization.compute_dtype" in out.stderr
    # and a float16 recipe runs it (params offloaded)
    out = cli(
        "plan",
        str(shape_recipe),
        "quantization.compute_dtype=float16",
        "--config",
        str(UPSTREAM / "llamafactory_fsdp_config_fp16_offload.yaml"),
    )
    assert out.returncode == 0 and "(fsdp+offload)" in out.stdout, out.stderr


def fsdp_yaml(tmp_path: Path, name: str, **changes) -> Path:
    cfg = yaml.safe_load(LLAMAFACTORY_FSDP.read_text())
    for key, value in changes.items():
        if key.startswith("fsdp_"):
            cfg["fsdp_config"][key] = value
        else:
            cfg[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_accelerate_settings_that_break_qlora_are_refused_with_the_reason(tmp_path: Path):
    recipe = bf16_recipe()

    def problems(**changes) -> str:
        mode = from_config_file(fsdp_yaml(tmp_path, "c", **changes), 2)
        from qlora_sft.launch import check_launch_compat

        return "\n".join(check_launch_compat(recipe, mode) + launch_config.launch_problems(recipe, mode, None, None))

    assert problems() == ""
    assert "peft's (one unit per decoder layer" in problems(fsdp_auto_wrap_policy="SIZE_BASED_WRAP")
    assert "cannot be honoured" in problems(fsdp_auto_wrap_policy="NO_WRAP")
    assert "transformers refuses both at once" in problems(fsdp_activation_checkpointing=True)
    assert "accelerate refuses that" in problems(fsdp_sync_module_states=False)
    assert "FSDP2" in problems(fsdp_version=2)
    assert "FULL_STATE_DICT" in problems(fsdp_state_dict_type="SHARDED_STATE_DICT")
    assert "does not run" in problems(mixed_precision="fp8")
    assert "torch.compile" in problems(dynamo_config={"dynamo_backend": "INDUCTOR"})
    assert "dynamo_backend is INDUCTOR: torch.compile" in problems(dynamo_backend="INDUCTOR")  # the older key
    assert "CUDA GPUs" in problems(distributed_type="XLA")
    assert "tensor/context parallelism" in problems(parallelism_config={"parallelism_config_tp_size": 2})
    ds_yaml = tmp_path / "ds.yaml"
    ds_yaml.write_text(
        yaml.safe_dump(
            {
                "distributed_type": "DEEPSPEED",
                "deepspeed_config": {"deepspeed_config_file": str(AXOLOTL_Z3), "zero_stage": 2},
            }
        )
    )
    assert "accelerate refuses beside a DeepSpeed file" in "\n".join(from_config_file(ds_yaml).config_problems)
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}}))
    mode = from_config_file(inline, 2)
    assert "deepspeed_config.zero3_save_16bit_model" in "\n".join(launch_config.launch_problems(recipe, mode))


def test_accelerate_settings_without_effect_are_noted_not_dropped(tmp_path: Path, shape_recipe: Path):
    path = fsdp_yaml(
        tmp_path,
        "n",
        fsdp_reshard_after_forward=False,
        fsdp_min_num_params=1000,
        fsdp_bogus=1,
        tpu_name="v4",
    )
    notes = "\n".join(from_config_file(path).config_notes)
    assert "fsdp_reshard_after_forward applies to FSDP2" in notes
    assert "fsdp_min_num_params applies to SIZE_BASED_WRAP only" in notes
    assert "fsdp_config.fsdp_bogus is not an accelerate FSDP setting" in notes
    assert "tpu_name applies to TPUs" in notes  # (an unknown top-level key is refused: test_launch_hostile.py)
    out = cli("plan", str(shape_recipe), "--config", str(path))
    assert out.returncode == 0 and "note: n.yaml: fsdp_config.fsdp_reshard_after_forward applies to FSDP2" in out.stdout


def test_fsdp_settings_that_work_are_honoured_in_plan(tmp_path: Path):
    """Prefetch, sharding strategy and offload change what each rank holds; plan says so."""
    from transformers import LlamaConfig

    from qlora_sft.plan import ModelShape, estimate_memory

    shape = ModelShape.from_config(
        LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32).to_dict()
    )
    recipe = bf16_recipe()

    def parts(**changes) -> dict[str, float]:
        return estimate_memory(shape, recipe, from_config_file(fsdp_yaml(tmp_path, "m", **changes), 4)).parts

    full = parts()
    no_prefetch = parts(fsdp_backward_prefetch="NO_PREFETCH")
    assert no_prefetch["gathered for compute"] < full["gathered for compute"]  # one layer, not two
    post = parts(fsdp_backward_prefetch="BACKWARD_POST")
    assert parts(fsdp_backward_prefetch="NO_PREFETCH", fsdp_forward_prefetch=True) == post
    # BACKWARD_PRE (this config's) and BACKWARD_POST both hold the running layer and the next; the
    # embedding's unit is not gathered again in the backward (model.sharding), whichever prefetch
    assert full["gathered for compute"] == post["gathered for compute"]
    grad_op = parts(fsdp_sharding_strategy="SHARD_GRAD_OP")
    assert grad_op["gathered for compute"] > 4 * full["gathered for compute"]  # every layer kept gathered
    no_shard = parts(fsdp_sharding_strategy="NO_SHARD")
    assert no_shard["4-bit base weights"] == pytest.approx(4 * full["4-bit base weights"])
    assert parts(fsdp_sharding_strategy=3) == no_shard  # accelerate's numbers for strategies
    assert parts(fsdp_offload_params=True)["4-bit base weights"] == 0
    assert parts(fsdp_use_orig_params=False) == full  # same memory; see the CPU FSDP run for the rest


def test_fsdp_wrap_classes_are_checked_against_the_model(tiny_model: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    fs = launch_config.FsdpSettings(
        auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_layer_cls_to_wrap=("LlamaDecoderLayer",)
    )
    launch_config.check_wrap_classes(model, fs)  # the model's own layer class: honoured (peft's policy wraps it)
    wrong = launch_config.FsdpSettings(transformer_layer_cls_to_wrap=("Qwen2DecoderLayer",))
    with pytest.raises(UserError, match=r"does not have \(its layer classes: LlamaDecoderLayer"):
        launch_config.check_wrap_classes(model, wrong)


def test_fsdp_ignored_modules_are_honoured(tiny_model: Path, tmp_path: Path):
    """`fsdp_ignored_modules` (a regex accelerate hands the plugin) is kept, with the rotary
    embeddings added to it (their fp32 buffers stay out of FSDP's bf16 casting)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from qlora_sft.model import keep_buffers_fp32_under_fsdp

    path = fsdp_yaml(tmp_path, "ignored", fsdp_ignored_modules="model\\.norm")
    assert from_config_file(path).fsdp.ignored_modules == "model\\.norm"
    assert mode_from_environment(accelerate_env(path), cpu=False, **RANKS).fsdp.ignored_modules == "model\\.norm"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    plugin = SimpleNamespace(ignored_modules="model\\.norm")
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"))
    )
    keep_buffers_fp32_under_fsdp(trainer)
    assert model.model.norm in plugin.ignored_modules and model.model.rotary_emb in plugin.ignored_modules


@pytest.mark.multiprocess
def test_fsdp1_with_use_orig_params_shards_trains_and_saves_the_adapter(tiny_model: Path, tmp_path: Path):
    """LLaMA-Factory's `fsdp_use_orig_params: true` on two CPU ranks (torch's FSDP1, as accelerate wraps
    for the Trainer): the 4-bit model flattens and shards, the loss is the unsharded model's, the
    adapter goes out and back in, and the sharding report counts each rank's shard (it reads FSDP's
    flat parameters, which `parameters()` hides under use_orig_params)."""
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(TESTS / "fsdp_cpu.py")]
    proc = subprocess.run(
        [*cmd, str(tiny_model), str(out), "use_orig_params"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["loss"] == pytest.approx(r["loss_unsharded"], rel=1e-3)
    assert r["saved_equal_reference"] and r["unexpected_on_load"] == 0 and r["loaded_all_twos"]
    assert r["held_parameter_bytes"] <= 0.6 * r["unsharded_parameter_bytes"]  # half each, plus padding


@pytest.mark.multiprocess
def test_an_fsdp_launch_of_the_llamafactory_config_reaches_the_gpu_check(shape_recipe: Path, tmp_path: Path):
    """The whole chain on CPUs: accelerate launches the YAML, qlora-sft starts, and stops at the
    check that the FSDP launch has GPUs (instead of training on CPU ranks)."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", str(LLAMAFACTORY_FSDP), "--main_process_port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [*cmd, "-m", "qlora_sft", "train", str(shape_recipe)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode != 0
    assert "the launcher started FSDP for GPUs, but this process sees no CUDA GPU" in proc.stderr


# --------------------------------------------------------------------------------------------
# 3. lora.init_from
# --------------------------------------------------------------------------------------------


def adapter_folder(path: Path, **config) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    base = {
        "peft_type": "LORA",
        "base_model_name_or_path": "m",
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj"],
    }
    (path / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file({}, str(path / "adapter_model.safetensors"))
    return path


def test_init_from_is_checked_against_the_recipe_before_loading(tmp_path: Path):
    from qlora_sft.init_adapter import check_before_loading

    good = adapter_folder(tmp_path / "good")
    recipe = bf16_recipe(lora={"init_from": str(good), "target_modules": ["q_proj"]})
    assert check_before_loading(recipe).config["r"] == 16
    bad = adapter_folder(
        tmp_path / "bad", r=8, lora_alpha=16, base_model_name_or_path="org/other", target_modules=["v_proj"]
    )
    with pytest.raises(RecipeError) as exc:
        check_before_loading(bf16_recipe(lora={"init_from": str(bad), "target_modules": ["q_proj"]}))
    text = str(exc.value)
    assert "trained on org/other, but model.name_or_path is m" in text
    assert "rank r=8, the recipe lora.r=16" in text and "lora_alpha=16" in text and "adapts ['v_proj']" in text
    with pytest.raises(UserError, match="no adapter_config.json"):
        check_before_loading(bf16_recipe(lora={"init_from": str(tmp_path)}))


def test_an_adapter_config_with_a_rank_that_is_no_number_names_its_other_problems_too(tmp_path: Path):
    """Was: a config whose r (or lora_alpha) is no number was reported alone: the problems found
    before it (trained on another base model) were dropped, to be found one relaunch later."""
    from qlora_sft.init_adapter import check_before_loading

    bad = adapter_folder(tmp_path / "bad", r="sixteen", base_model_name_or_path="org/other", use_dora=True)
    with pytest.raises(RecipeError) as exc:
        check_before_loading(bf16_recipe(lora={"init_from": str(bad), "target_modules": ["q_proj"]}))
    assert len(exc.value.problems) == 3, exc.value.problems
    text = str(exc.value)
    assert f"{bad / 'adapter_config.json'} has r='sixteen', which is not a whole number" in text
    assert "trained on org/other, but model.name_or_path is m" in text and "is a DoRA adapter" in text


@pytest.mark.parametrize(
    "damage", ["json_cut_off", "not_utf8", "json_list", "rank_not_a_number", "weights_nan", "final_corrupted"]
)
def test_an_init_from_adapter_that_cannot_be_trusted_is_named_before_loading(tmp_path: Path, damage: str):
    """An adapter folder whose config does not read (cut off, not UTF-8, not a mapping, a rank that is
    no number) ended on a bare JSONDecodeError / UnicodeDecodeError / ValueError traceback; one whose
    weights hold NaN, or a run's final/ whose adapter no longer matches its manifest's digest (same
    size, other bytes), was loaded and trained from. Each is named with the file, before loading."""
    import torch
    from safetensors.torch import save_file

    from qlora_sft import checkpoint
    from qlora_sft.init_adapter import check_before_loading

    folder = adapter_folder(tmp_path / "runs" / "old" / "final")
    config = folder / "adapter_config.json"
    weights = folder / "adapter_model.safetensors"
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(16, 8)}, str(weights))
    said = {
        "json_cut_off": f"{config} does not read as JSON",
        "not_utf8": f"{config} does not read as JSON",
        "json_list": f"{config} holds a list, not an adapter's settings",
        "rank_not_a_number": f"{config} has r='sixteen', which is not a whole number",
        "weights_nan": f"{weights} holds non-finite values (base_model.model.q_proj.lora_A.weight)",
        "final_corrupted": "adapter_model.safetensors does not match its checksum",
    }[damage]
    if damage == "json_cut_off":
        config.write_text(config.read_text()[:20])
    elif damage == "not_utf8":
        config.write_bytes(b"\xff\xfe" + config.read_bytes())
    elif damage == "json_list":
        config.write_text("[1, 2]")
    elif damage == "rank_not_a_number":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": "sixteen"}))
    elif damage == "weights_nan":
        save_file({"base_model.model.q_proj.lora_A.weight": torch.full((16, 8), float("nan"))}, str(weights))
    else:
        checkpoint.write_manifest(folder, {"step": 4})
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    recipe = bf16_recipe(lora={"init_from": str(folder), "target_modules": ["q_proj"]})
    with pytest.raises(UserError) as err:
        check_before_loading(recipe)
    assert said in str(err.value) and f"lora.init_from={folder}" in str(err.value)


def test_resume_from_an_adapter_points_at_init_from(tmp_path: Path, shape_recipe: Path):
    """Was: accepted, then FileNotFoundError for trainer_state.json after the model had loaded."""
    final = adapter_folder(tmp_path / "runs" / "old" / "final")
    (final / "COMPLETE").write_text("")  # a run's final/ is published complete, like a checkpoint
    out = cli("train", str(shape_recipe), f"checkpoint.resume={final}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is an adapter (adapter_config.json, no trainer_state.json), not a checkpoint" in out.stderr
    assert f"set lora.init_from: {final}" in out.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # refused before the run directory and the model


def test_training_starts_from_an_existing_adapter(tiny_model: Path, tmp_path: Path):
    """An adapter trained by one run seeds the next (new optimizer, step 0): its weights are the start,
    and the new run's first loss is the old run's last, not a fresh adapter's first."""
    from helpers import losses_by_step
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_model, recipe_tokenizer

    toy = write_toy_data(tmp_path / "toy.jsonl")
    train = {"max_steps": 8, "logging_steps": 1, "save_steps": 100, "learning_rate": 5e-3}
    first = write_recipe(
        tmp_path / "a.yaml", recipe_dict(tiny_model, toy, tmp_path / "runs", run={"name": "a"}, train=train)
    )
    out = cli("train", str(first), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    final = tmp_path / "runs" / "a" / "final"
    raw = recipe_dict(
        tiny_model, toy, tmp_path / "runs", run={"name": "b"}, train=train, lora={"init_from": str(final)}
    )
    second = write_recipe(tmp_path / "b.yaml", raw)
    recipe = load_recipe(second)
    model = load_model(recipe, recipe_tokenizer(recipe), LaunchMode("cpu"))
    saved = load_file(str(final / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all((loaded[k].float() == saved[k].float()).all() for k in saved)
    out = cli("train", str(second), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "started from the adapter" in out.stdout
    a, b = losses_by_step(tmp_path / "runs" / "a"), losses_by_step(tmp_path / "runs" / "b")
    assert min(b) == 1 and b[1] < 0.7 * a[1]  # a new run (step 1), starting where the adapter left off


# Trains RECIPE (torchrun's ranks, or one process) and appends to LOG a line "<rank> <function> <file>" for
# each read of a file in WATCHED: the digests and the finite-value check, and the load of its weights.
WATCH_READS = """
import os, sys
from pathlib import Path
import safetensors.torch
from qlora_sft import checkpoint
from qlora_sft.errors import UserError
from qlora_sft.recipe import load_recipe
from qlora_sft.train import train

recipe, watched, log = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3])

def watch(module, name):
    real = getattr(module, name)
    def read(path, *args, **kwargs):
        if watched in Path(path).resolve().parents:
            with log.open("a") as f:
                f.write(f"{os.environ.get('RANK', '0')} {name} {Path(path).name}\\n")
        return real(path, *args, **kwargs)
    setattr(module, name, read)

for module, name in ((checkpoint, "file_digest"), (checkpoint, "nonfinite_tensors"), (safetensors.torch, "load_file")):
    watch(module, name)
try:
    train(load_recipe(recipe))
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.multiprocess
def test_init_from_is_checked_once_and_not_read_by_a_resume(tiny_model: Path, tmp_path: Path):
    """Was: every rank read the whole lora.init_from adapter (its digests, every tensor for non-finite
    values) at every launch, also at a relaunch that resumes a checkpoint, which then loaded the
    adapter's weights only to replace them with the checkpoint's: an adapter damaged or removed after
    the first launch stopped the resume of a run it no longer had a part in. Now the main process
    checks it once for all ranks, and a resume does not read it; a new run from it is still refused."""
    from helpers import cpu_env

    from qlora_sft import checkpoint
    from qlora_sft.model import load_model, recipe_tokenizer

    toy = write_toy_data(tmp_path / "toy.jsonl", n=48)
    train = {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4}
    runs = tmp_path / "runs"
    seed = load_recipe(write_recipe(tmp_path / "a.yaml", recipe_dict(tiny_model, toy, runs, run={"name": "a"})))
    final = runs / "a" / "final"  # a run's final/: an adapter with its manifest of digests
    load_model(seed, recipe_tokenizer(seed), LaunchMode("cpu")).save_pretrained(str(final))
    checkpoint.write_manifest(final, {"step": 4})
    raw = recipe_dict(tiny_model, toy, runs, run={"name": "b"}, train=train, lora={"init_from": str(final)})
    recipe = write_recipe(tmp_path / "b.yaml", raw)
    driver, reads = tmp_path / "watch_reads.py", tmp_path / "reads.txt"
    driver.write_text(WATCH_READS)

    def launch(recipe: Path, ranks: int = 2, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        reads.write_text("")
        args = [str(driver), str(recipe), str(final), str(reads)]
        torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
        cmd = [*torchrun, "--master_port", str(free_port()), *args] if ranks == 2 else [sys.executable, *args]
        env = {**cpu_env(), "PYTHONPATH": str(REPO / "src"), **env}
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        return out, sorted(reads.read_text().splitlines())

    first, read = launch(recipe, QLORA_SFT_FAULT="kill@3")  # both ranks killed as step 3 begins
    assert first.returncode != 0 and "started from the adapter" in first.stdout + first.stderr
    assert [c.step for c in checkpoint.complete_checkpoints(runs / "b")] == [2], (first.stdout + first.stderr)[-3000:]
    checked = [line for line in read if "load_file" not in line]  # digests and values: once, on rank 0
    assert checked and all(line.startswith("0 ") for line in checked), read
    values = [line for line in checked if "nonfinite_tensors" in line]
    assert values == ["0 nonfinite_tensors adapter_model.safetensors"], read
    assert read.count("0 file_digest adapter_model.safetensors") == 1, read
    # each rank loads the adapter's weights into its model
    assert [line for line in read if "load_file" in line] == [f"{r} load_file adapter_model.safetensors" for r in "01"]

    weights = final / "adapter_model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-4:] = bytes(b ^ 0xFF for b in damaged[-4:])  # in the last tensor's values, the size kept
    weights.write_bytes(bytes(damaged))
    again, read = launch(recipe)
    said = again.stdout + again.stderr
    assert again.returncode == 0, said[-3000:]
    assert f"resuming from {runs / 'b' / 'checkpoint-2'}" in said and f"lora.init_from: {final} is not read" in said
    assert read == []  # the adapter was not read at all
    assert checkpoint.inspect_checkpoint(runs / "b" / "final", verify=True).complete

    raw["run"]["name"] = "c"  # a new run from the damaged adapter: refused, naming the file, before anything
    fresh, _ = launch(write_recipe(tmp_path / "c.yaml", raw), ranks=1)
    assert fresh.returncode == 2, (fresh.stdout + fresh.stderr)[-3000:]
    assert f"lora.init_from={final}: {final} is not intact" in fresh.stderr
    assert "adapter_model.safetensors does not match its checksum" in fresh.stderr
    assert not (runs / "c").exists()


# --------------------------------------------------------------------------------------------
# 4.-7. Data: max_rows, the end token, rebuilding the cache
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from tiny import build_tokenizer

    from qlora_sft.model import ensure_pad_token

    t = build_tokenizer()
    ensure_pad_token(t)
    return t


def test_max_rows_takes_the_first_rows_or_a_seeded_sample(tmp_path: Path, tok):
    from qlora_sft.data import build_data, read_documents
    from qlora_sft.recipe import DataConfig, DataSource

    toy = write_toy_data(tmp_path / "toy.jsonl", n=50)
    first = DataSource(path=str(toy), max_rows=10)
    assert [r for r, _ in read_documents(first)] == list(range(1, 11))
    sample = DataSource(path=str(toy), max_rows=10, max_rows_seed=3)
    rows = [r for r, _ in read_documents(sample)]
    assert len(rows) == 10 and rows == sorted(rows) and rows != list(range(1, 11))
    assert rows == [r for r, _ in read_documents(sample)]  # seeded
    assert rows != [r for r, _ in read_documents(DataSource(path=str(toy), max_rows=10, max_rows_seed=4))]
    prepared = build_data(DataConfig(sources=(first, DataSource(path=str(toy))), eval_fraction=0.0), tok, 0)
    lines = prepared.report.lines()
    assert lines[0].startswith(f"source {toy} [alpaca]: 10 rows (the first 10 rows (max_rows)), 10 kept")
    assert lines[1].startswith(f"source {toy} [alpaca]: 50 rows, 50 kept")
    assert prepared.report.train_rows == 60
    seeded = build_data(DataConfig(sources=(sample,), eval_fraction=0.0), tok, 0).report.lines()[0]
    assert "a sample of 10 rows drawn with seed 3 (max_rows, max_rows_seed)" in seeded
    with pytest.raises(RecipeError) as exc:
        build_recipe({"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a", "max_rows_seed": 1}]}})
    text = str(exc.value)
    assert "max_rows_seed` is set without max_rows" in text


def test_validate_reports_max_rows(tiny_model: Path, tmp_path: Path):
    toy = write_toy_data(tmp_path / "toy.jsonl", n=40)
    raw = recipe_dict(tiny_model, toy, tmp_path / "runs", data={"sources": [{"path": str(toy), "max_rows": 12}]})
    out = cli("validate", str(write_recipe(tmp_path / "r.yaml", raw)))
    assert out.returncode == 0, out.stderr
    assert "12 rows (the first 12 rows (max_rows)), 12 kept" in out.stdout


NO_END_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"


def test_no_trained_end_token_is_refused(tmp_path: Path, tok):
    """Was: the validate report said 0.0% and training went ahead (a model that never stops)."""
    import copy

    from qlora_sft.data import DataReport, build_data
    from qlora_sft.recipe import DataConfig, DataSource

    no_end = copy.deepcopy(tok)
    no_end.chat_template = NO_END_TEMPLATE
    cfg = DataConfig(sources=(DataSource(path=str(DATA / "alpaca.jsonl")),), eval_fraction=0.0)
    with pytest.raises(DataError) as exc:
        build_data(cfg, no_end, 0)
    text = str(exc.value)
    assert "trains the end-of-turn token" in text and "data.allow_no_eos: true" in text
    assert "a template whose end token is in the tokenizer" in text
    allowed = build_data(DataConfig(sources=cfg.sources, eval_fraction=0.0, allow_no_eos=True), no_end, 0)
    assert allowed.report.eos_trained_fraction == 0.0
    assert build_data(cfg, tok, 0).report.eos_trained_fraction == 1.0  # the tokenizer's own template
    text_rows = DataConfig(sources=(DataSource(path=str(DATA / "text.jsonl")),), eval_fraction=0.0)
    build_data(text_rows, no_end, 0)  # plain text rows have no turns to end: not refused
    report = DataReport(end_token="<|im_end|>", eos_trained_fraction=0.5, chat_rows=10)
    assert any(line.startswith("warning: 50.0% of the conversations train no end token") for line in report.lines())
    assert not any(
        "warning" in line for line in DataReport(end_token="x", eos_trained_fraction=0.96, chat_rows=9).lines()
    )


def test_prepare_rebuild_rebuilds_the_cache(tiny_model: Path, tmp_path: Path):
    toy = write_toy_data(tmp_path / "toy.jsonl", n=40)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy, tmp_path / "runs"))

    def built() -> dict:
        (report,) = (tmp_path / "runs" / ".cache").glob("data-*/report.json")
        return json.loads(report.read_text())["built"]

    assert cli("prepare", str(recipe)).returncode == 0
    before = built()
    again = cli("prepare", str(recipe))
    assert "found the prepared cache" in again.stdout and built() == before
    rebuilt = cli("prepare", str(recipe), "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "found" not in rebuilt.stdout and built()["pid"] != before["pid"]
    assert len(list((tmp_path / "runs" / ".cache").glob("data-*"))) == 1  # replaced, not one more folder
    key = built()
    assert cli("prepare", str(recipe), "data.rebuild=true").returncode == 0 and built()["pid"] != key["pid"]


# --------------------------------------------------------------------------------------------
# 5. The train keys qlora-sft sets
# --------------------------------------------------------------------------------------------


def test_every_train_key_the_project_sets_is_refused_or_kept():
    """train.sft_args forces these SFTConfig fields: each is refused with its owner, or merged."""
    from qlora_sft.recipe import TRAIN_OWNED
    from qlora_sft.train import sft_args

    forced = {"output_dir", "seed", "data_seed", "max_length", "packing", "padding_free", "run_name", "bf16", "fp16"}
    forced |= {"save_total_limit", "use_cpu", "fsdp", "fsdp_config"}
    for key in sorted(forced):
        assert key in TRAIN_OWNED
        with pytest.raises(RecipeError, match=f"`train.{key}` is set by"):
            bf16_recipe(train={key: 1})
    with pytest.raises(RecipeError, match="use_reentrant: true; qlora-sft checkpoints with the non-reentrant"):
        bf16_recipe(train={"gradient_checkpointing_kwargs": {"use_reentrant": True}})
    with pytest.raises(RecipeError, match="eval_on_start` asks for an evaluation before training but there is no eval"):
        bf16_recipe(train={"eval_on_start": True}, data={"eval_fraction": 0.0})
    recipe = bf16_recipe(train={"gradient_checkpointing_kwargs": {"preserve_rng_state": False}})
    from qlora_sft.recipe import resolve_batch

    args = sft_args(recipe, resolve_batch(recipe.train, 1), LaunchMode("cpu"), None, has_eval=False)
    assert args.gradient_checkpointing_kwargs == {"preserve_rng_state": False, "use_reentrant": False}
    ds = bf16_recipe(train={"deepspeed": str(AXOLOTL_Z3)})
    assert sft_args(ds, resolve_batch(ds.train, 1), LaunchMode("cpu"), None, has_eval=False).deepspeed is None


# --------------------------------------------------------------------------------------------
# 8. The converted example recipes
# --------------------------------------------------------------------------------------------


def test_converted_upstream_recipes_load():
    axolotl = load_recipe(REPO / "configs" / "recipes" / "axolotl_llama3_qlora.yaml")
    assert axolotl.model.name_or_path == "NousResearch/Meta-Llama-3-8B"
    assert (axolotl.lora.r, axolotl.lora.alpha, axolotl.lora.dropout, axolotl.lora.target_modules) == (
        32,
        16.0,
        0.05,
        "all-linear",
    )
    assert (axolotl.data.max_length, axolotl.data.packing, axolotl.data.chat_template) == (4096, True, "alpaca")
    assert axolotl.train.args["optim"] == "paged_adamw_32bit" and axolotl.train.global_batch_size == 8
    factory = load_recipe(REPO / "configs" / "recipes" / "llamafactory_llama3_qlora_sft.yaml")
    assert factory.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert [s.max_rows for s in factory.data.sources] == [1000, 1000]
    assert (factory.data.max_length, factory.data.packing, factory.data.eval_fraction) == (2048, False, 0.1)
    assert factory.train.args["learning_rate"] == pytest.approx(1e-4) and factory.train.global_batch_size == 8
    assert factory.data.rebuild is True  # overwrite_cache: true
    docs = (REPO / "docs" / "migration.md").read_text()
    for name in ("axolotl_llama3_qlora.yaml", "llamafactory_llama3_qlora_sft.yaml", "lora_model_dir", "max_samples"):
        assert name in docs


AXOLOTL_AS_IT_IS = """\
base_model: NousResearch/Meta-Llama-3-8B
load_in_4bit: true
adapter: qlora
lora_r: 32
datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
sequence_len: 4096
micro_batch_size: 2
learning_rate: 0.0002
cutoff_len: 1024
max_length: 512
"""


def top_level_problems(path: Path, text: str) -> tuple[dict[str, str], list[str]]:
    """`text` written to `path` and loaded as a recipe: its problems by the top-level option each
    names (those of the file itself), and all of them."""
    path.write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    problems = exc.value.problems
    return {p.split("`")[1]: p for p in problems if p.startswith(f"{path}:") and "`" in p}, problems


def test_an_axolotl_or_llamafactory_config_as_it_is_is_mapped_key_by_key(tmp_path: Path):
    """A user's first try is their old config as it is: each top-level option is named with the
    recipe key that sets it (it said only "is not a recipe section; did you mean `model`?")."""
    found, problems = top_level_problems(tmp_path / "qlora.yml", AXOLOTL_AS_IT_IS)
    expected = {
        "base_model": "model.name_or_path",
        "load_in_4bit": "quantization.method: nf4",
        "adapter": "quantization.method (qlora: nf4; lora: none)",
        "lora_r": "lora.r",
        "datasets": "data.sources",
        "sequence_len": "data.max_length",
        "micro_batch_size": "train.per_device_train_batch_size",
        "learning_rate": "train.learning_rate",  # any trl.SFTConfig field
        "cutoff_len": "data.max_length",  # LLaMA-Factory's
        "max_length": "data.max_length",  # a section's own field, written at the top
    }
    for key, place in expected.items():
        assert f"`{key}` is not a recipe section; a recipe sets this as `{place}`" in found[key], found[key]
    assert any("docs/migration.md maps every option" in p for p in problems)
    with pytest.raises(RecipeError) as typo:  # a plain typo still gets the closest section
        build_recipe({"modle": {"name_or_path": "m"}, "data": {"sources": ["a.jsonl"]}})
    assert typo.value.problems[0] == "`modle` is not a recipe section; did you mean `model`?"
    assert not any("migration" in p for p in typo.value.problems)


def test_the_foreign_option_names_match_the_migration_table():
    """recipe.FOREIGN_OPTIONS and docs/migration.md's table say the same: each option stands in the
    axolotl or LLaMA-Factory column of a row whose qlora-sft column names the same recipe key."""
    import re

    from qlora_sft.recipe import FOREIGN_OPTIONS

    rows = []
    for line in (REPO / "docs" / "migration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3:
            names = {re.split(r"[:=\s]", span)[0] for span in re.findall(r"`([^`]+)`", cells[0] + cells[1])}
            rows.append((names, cells[2]))
    for option, place in FOREIGN_OPTIONS.items():
        key = re.split(r"[:\s]", place)[0]
        assert any(option in names and f"`{key}" in ours for names, ours in rows), (option, key)


def test_every_top_level_option_of_the_migration_table_is_named_with_its_key(tmp_path: Path):
    """docs/migration.md: validate names, for each top-level option in its table, the recipe key that
    sets it. These table options got only "is not a recipe section" (or "did you mean `quantization`?")."""
    found, _ = top_level_problems(
        tmp_path / "old.yml",
        "shuffle_merged_datasets: true\nwarmup_ratio: 0.1\nbnb_config_kwargs:\n  bnb_4bit_quant_type: nf4\n"
        "quantization_method: bitsandbytes\nfinetuning_type: lora\noverwrite_cache: true\n"
        "disable_gradient_checkpointing: true\n",
    )
    expected = {
        "shuffle_merged_datasets": "run.seed",
        "warmup_ratio": "train.warmup_steps",
        "bnb_config_kwargs": "quantization.method",
        "quantization_method": "quantization.method",
        "finetuning_type": "quantization.method",
        "overwrite_cache": "data.rebuild",
        "disable_gradient_checkpointing": "train.gradient_checkpointing",
    }
    for key, place in expected.items():
        assert f"`{key}` is not a recipe section; a recipe sets this as `{place}" in found[key], found[key]
