"""Launching as a hostile but realistic user does it: odd cluster settings, hand-edited accelerate
configs, launch-script variables that are not numbers, a python whose path has spaces. Every case
is refused (or honoured) before a job is queued or a process started; no SLURM cluster is used
(a fake `sbatch`/`srun` on PATH records what would have been run)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import MINIMAL_RECIPE, REPO, fake_bin, small_recipe, write_recipe

from qlora_sft.errors import UserError

PY = sys.executable


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([PY, *args], capture_output=True, text=True, cwd=cwd, env=full, timeout=120)


def cluster(**values: object):
    from qlora_sft.recipe import build_recipe

    return build_recipe({**MINIMAL_RECIPE, "cluster": values}).cluster


# --------------------------------------------------------------------------------------------
# submit: the sbatch script submitit writes
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sbatch` on PATH that keeps the script it was given and answers as sbatch does; `scontrol`, `sinfo`
    and `squeue` that know no partition and no job (else the test cluster CI runs, through SLURM_CONF,
    would answer: one node, no GPUs)."""
    log = tmp_path / "sbatch.log"
    bin_dir = fake_bin(
        tmp_path / "bin",
        sbatch=f'cp "${{@: -1}}" {shlex.quote(str(tmp_path))}/submitted.sh\necho "$@" >> {shlex.quote(str(log))}\n'
        'echo "Submitted batch job 4242"\n',
        scontrol="exit 0\n",
        sinfo="exit 0\n",
        squeue="exit 0\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_submit_quotes_a_python_path_with_spaces_in_the_sbatch_script(
    tmp_path: Path, fake_sbatch: Path, monkeypatch: pytest.MonkeyPatch
):
    """A virtual environment under a folder with a space (`~/My Projects/.venv`): submitit writes the
    python it is given into the job's command line as is (it quotes only its own default), so the job
    ran `/home/me/My` and failed once it had its nodes. The path now arrives as one word."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    env_dir = tmp_path / "My Projects $HOME" / "bin"
    env_dir.mkdir(parents=True)
    python = env_dir / "python"
    python.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.chdir(tmp_path)
    job = submit(recipe, [], cluster="slurm", gpus_per_node=1, time="01:00:00")
    assert job.job_id == "4242"
    script = (tmp_path / "submitted.sh").read_text()
    # run the script as the batch host would, with an `srun` that prints the words it was given
    srun_bin = fake_bin(tmp_path / "srun-bin", srun='printf "%s\\n" "$@"\n')
    out = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{srun_bin}:{os.environ['PATH']}"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    words = out.stdout.splitlines()
    assert str(python) in words, words
    assert words[words.index(str(python)) + 1 :][:3] == ["-u", "-m", "submitit.core._submit"]


@pytest.mark.parametrize("value", ["0", "00:00:00", "0-00:00"])
def test_a_time_limit_of_zero_is_refused_not_made_one_minute(value: str):
    """`cluster.time: "0"` (SLURM's "no limit") became a one-minute job: killed as it loaded the model."""
    from qlora_sft.submit import executor_parameters

    with pytest.raises(UserError, match=r"cluster.time='.*': .*no time limit"):
        executor_parameters(cluster(time=value))


@pytest.mark.parametrize("value", ["1-25:00:00", "1:75:00", "90:99", "2:30:61", "1-05:60"])
def test_a_time_limit_with_a_field_out_of_range_is_refused(value: str):
    """`1-25:00:00` was read as 2 days 1 hour, `90:99` as 91 minutes: a typo became a time limit."""
    from qlora_sft.submit import executor_parameters

    with pytest.raises(UserError, match=r"cluster.time='.*': .* out of range"):
        executor_parameters(cluster(time=value))


def test_sound_time_limits_still_parse():
    from qlora_sft.submit import executor_parameters

    for value, minutes in (("90", 90), ("90:00", 90), ("23:59:59", 1440), ("2-00", 2880), ("1-23:59", 2879)):
        assert executor_parameters(cluster(time=value))["timeout_min"] == minutes, value


def test_a_time_limit_inside_the_signal_grace_is_refused_before_queueing(tmp_path: Path, fake_sbatch: Path):
    """`--time 5` with the default 300 s grace: SLURM signals "save and requeue" as the job starts; the
    job saved, requeued, and did it again, forever. Now refused before sbatch runs."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    with pytest.raises(UserError, match=r"cluster.time.*5 minute.*cluster.signal_grace_s.*300"):
        submit(recipe, [], cluster="slurm", gpus_per_node=1, time="5")
    assert not fake_sbatch.exists()
    # the same limit with a shorter grace is queued
    job = submit(recipe, ["cluster.signal_grace_s=60"], cluster="slurm", gpus_per_node=1, time="5")
    assert job.job_id == "4242" and "--signal=USR2@60" in (tmp_path / "submitted.sh").read_text()


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("--time=10", "cluster.time"),
        ("--signal=USR1@60", "cluster.signal_grace_s"),
        ("--output=/tmp/x.out", "submitit"),
        ("--error=/tmp/x.err", "submitit"),
        ("--open-mode=truncate", "submitit"),
        ("--nodes=3", "cluster.nodes"),
        ("--ntasks-per-node=4", "cluster.tasks_per_node"),
        ("--gpus-per-node=4", "cluster.gpus_per_node"),
        ("--gres=gpu:a100:2", "cluster.gpus_per_node"),
        ("--job-name=x", "cluster.job_name"),
    ],
)
def test_extra_sbatch_may_not_override_what_submit_sets(line: str, key: str):
    """submitit lets an additional parameter replace its own (`--time`, `--signal`, the log files) or
    add a second line beside it (`--open-mode`): the job then ran under other settings than the ones
    submit printed, or lost its preemption signal (`USR1` kills a rank that waits for USR2)."""
    from qlora_sft.submit import executor_parameters

    with pytest.raises(UserError, match=rf"cluster.extra_sbatch: {line.split('=')[0]}.*{key}"):
        executor_parameters(cluster(extra_sbatch=[line]))
    # options submit does not set still pass
    params = executor_parameters(cluster(extra_sbatch=["--exclusive", "--reservation=r1", "--gres=nvme:1"]))
    assert params["slurm_additional_parameters"] == {"exclusive": True, "reservation": "r1", "gres": "nvme:1"}


def test_extra_sbatch_and_a_cluster_key_may_not_both_set_an_option():
    """`extra_sbatch: [--partition=big]` beside `--partition gpu`: the extra line won, the flag was dropped."""
    from qlora_sft.submit import executor_parameters

    with pytest.raises(UserError, match=r"--partition conflicts with cluster.partition='gpu'"):
        executor_parameters(cluster(extra_sbatch=["--partition=big"]), partition="gpu")
    params = executor_parameters(cluster(extra_sbatch=["--partition=big"]))  # given once, it is passed
    assert params["slurm_additional_parameters"] == {"partition": "big"}


@pytest.mark.parametrize(
    ("line", "option", "key"),
    [("--time 10", "--time", "cluster.time"), ("--gpus-per-node  8", "--gpus-per-node", "cluster.gpus_per_node")],
)
def test_extra_sbatch_written_with_a_space_is_checked_like_with_an_equals_sign(line: str, option: str, key: str):
    """`extra_sbatch: ["--time 10"]` (sbatch's other spelling, as in `#SBATCH --time 10`) was taken as an
    option named `time 10`: it passed the check `--time=10` meets, and the job script held `--time=600`
    and then `--time 10`, the last of which sbatch keeps. An option submit does not set keeps its value."""
    from qlora_sft.submit import executor_parameters

    with pytest.raises(UserError, match=rf"cluster.extra_sbatch: {option} is set by submit.*{key}"):
        executor_parameters(cluster(extra_sbatch=[line]))
    params = executor_parameters(cluster(extra_sbatch=["--reservation r1", "--gres nvme:1"]))
    assert params["slurm_additional_parameters"] == {"reservation": "r1", "gres": "nvme:1"}


@pytest.mark.parametrize(
    "values",
    [
        {"partition": "gpu\n#SBATCH --time=99999"},
        {"job_name": "run\nrm -rf ~"},
        {"account": "acct\r"},
        {"extra_sbatch": ["--comment=a\nb"]},
    ],
)
def test_control_characters_in_cluster_settings_are_refused(values: dict):
    """A newline in a cluster value split the generated sbatch script: the rest of the line became a
    shell command of the job, and the #SBATCH lines after it were no longer read by sbatch."""
    from qlora_sft.submit import executor_parameters

    key = next(iter(values))
    with pytest.raises(UserError, match=rf"cluster.{key}.*control character"):
        executor_parameters(cluster(**values))


# --------------------------------------------------------------------------------------------
# accelerate configs that accelerate itself refuses
# --------------------------------------------------------------------------------------------


def accelerate_refuses(path: Path) -> str:
    """What accelerate's own reader of `--config_file` says about the file."""
    from accelerate.commands.config.config_args import load_config_from_file

    with pytest.raises((ValueError, AttributeError, TypeError)) as exc:
        load_config_from_file(str(path))
    return str(exc.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_proceses: 4\n", "num_proceses"),
        ("distributed_type: MULTI_GPU\nnum_processes: 2\nipex_config: {}\n", "ipex_config"),
        ("num_processes: 2\nmixed_precision: 'no'\n", "distributed_type"),
        ("", "empty"),
        ("distributed_type: multi_gpu\nnum_processes: 2\n", "MULTI_GPU"),
    ],
)
def test_an_accelerate_config_accelerate_refuses_is_refused_by_plan_and_the_launch_scripts(
    tmp_path: Path, text: str, expected: str
):
    """A misspelt key was a note ("accelerate ignores it"), a missing or lower-case distributed_type
    and an empty file a one-process plan; `accelerate launch` refuses each ("had unknown keys", "A
    distributed_type must be specified", a traceback): on a cluster, on every node, once the job ran."""
    config = tmp_path / "acc.yaml"
    config.write_text(text)
    accelerate_refuses(config)
    from qlora_sft.launch_config import read_accelerate

    with pytest.raises(UserError, match=expected) as exc:
        read_accelerate(config)
    assert str(config) in str(exc.value)
    out = run_cli("-m", "qlora_sft.launch_config", "accelerate-args", str(config), cwd=tmp_path)
    assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("text", "key", "fix"),
    [
        ("distributed_type: NO\nnum_processes: 1\n", "distributed_type", "distributed_type: 'NO'"),
        ("distributed_type: no\n", "distributed_type", "distributed_type: 'NO'"),
        ("distributed_type: 'NO'\nmixed_precision: no\n", "mixed_precision", "mixed_precision: 'no'"),
        ("distributed_type: 'NO'\ndynamo_config:\n  dynamo_backend: NO\n", "dynamo_backend", "dynamo_backend: 'NO'"),
        ("distributed_type: 'NO'\ngpu_ids: 0\n", "gpu_ids", "gpu_ids: '0'"),
    ],
)
def test_an_accelerate_config_word_yaml_reads_as_a_bool_or_number_says_to_quote_it(
    tmp_path: Path, text: str, key: str, fix: str
):
    """Was: a bare `distributed_type: NO` (YAML 1.1 reads NO as false) was refused with "distributed_type
    is False; ... write distributed_type: FALSE", advice that fails again (accelerate itself keeps the
    false and starts one process, as for 'NO'). A bare `mixed_precision: no`, `dynamo_backend: NO` or
    `gpu_ids: 0` passed plan (or was called torch.compile) and `accelerate launch` then stopped on an
    AttributeError ('bool' object has no attribute 'lower' / 'upper', 'int' ... 'split'). Now each
    names the key and the quoted spelling that works."""
    from qlora_sft.launch_config import read_accelerate

    config = tmp_path / "acc.yaml"
    config.write_text(text)
    with pytest.raises(UserError) as exc:
        read_accelerate(config)
    msg = str(exc.value)
    assert str(config) in msg and f"{key} is " in msg and fix in msg and "quoted" in msg, msg
    assert "FALSE" not in msg and "torch.compile" not in msg, msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"\xff\xfedistributed_type: NO\n", "not UTF-8"),
        (b"distributed_type: MULTI_GPU\nnum_processes: eight\n", "num_processes"),
        (b"distributed_type: MULTI_GPU\nnum_processes: 2.5\n", "num_processes"),
        (b"distributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: two\n", "num_machines"),
    ],
)
def test_an_unreadable_accelerate_config_names_the_file_and_key(tmp_path: Path, text: bytes, expected: str):
    """Bytes that are not UTF-8, or a process count that is not a whole number: a traceback
    (UnicodeDecodeError, `int('eight')`), or 2.5 processes silently planned as 2."""
    from qlora_sft.launch_config import read_accelerate

    config = tmp_path / "acc.yaml"
    config.write_bytes(text)
    with pytest.raises(UserError, match=expected) as exc:
        read_accelerate(config)
    assert str(config) in str(exc.value)


def test_an_accelerate_config_that_is_a_directory_says_so(tmp_path: Path):
    from qlora_sft.launch_config import read_accelerate

    with pytest.raises(UserError, match="is a directory"):
        read_accelerate(tmp_path)


def test_the_known_accelerate_keys_are_accelerates(tmp_path: Path):
    """What read_accelerate accepts at the top level is what the installed accelerate accepts."""
    import dataclasses

    from accelerate.commands.config.config_args import ClusterConfig

    from qlora_sft.launch_config import ACCELERATE_KEYS

    assert ACCELERATE_KEYS == {f.name for f in dataclasses.fields(ClusterConfig)} | {"fp16", "dynamo_backend"}


# --------------------------------------------------------------------------------------------
# plan: the config's own node count
# --------------------------------------------------------------------------------------------


def test_plan_of_a_multi_node_config_uses_its_node_count(tmp_path: Path):
    """`plan R --config multi_node.yaml` (num_machines 2, num_processes 16) planned 1 node x 8 = world
    size 8 (an accumulation of 4 where the launch the file describes has 2): --nodes defaulted to 1
    over the file."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path / "model"
    )
    recipe = small_recipe(
        tmp_path,
        model={"name_or_path": str(tmp_path / "model")},
        quantization={"compute_dtype": "bfloat16"},
        train={"global_batch_size": 64, "per_device_train_batch_size": 2},
    )
    config = str(REPO / "configs" / "accelerate" / "multi_node.yaml")
    out = run_cli("-m", "qlora_sft", "plan", str(recipe), "--config", config, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 node(s) x 8 process(es) = world size 16" in out.stdout
    assert "16 process(es) x micro batch 2 x gradient accumulation 2" in out.stdout
    out = run_cli("-m", "qlora_sft", "plan", str(recipe), "--config", config, "--nodes", "4", cwd=tmp_path)
    assert out.returncode == 0 and "4 node(s) x 8 process(es) = world size 32" in out.stdout, out.stderr


@pytest.mark.parametrize("count", [0, -2, -1])
def test_an_accelerate_config_without_a_process_count_is_refused_by_plan_unless_given(tmp_path: Path, count: int):
    """`num_processes: 0` (or -2) under MULTI_GPU: plan planned one process (world size 1), and
    `accelerate launch` without --num_processes stopped in torch's launcher with a bare AssertionError;
    -1 (accelerate's "pass --num_processes") was planned as one process too. plan now names the key
    and the fix; --gpus (what the launch scripts pass as --num_processes) plans it as given."""
    from qlora_sft.launch import from_config_file

    config = tmp_path / "acc.yaml"
    config.write_text(f"distributed_type: MULTI_GPU\nnum_processes: {count}\n")
    with pytest.raises(UserError) as exc:
        from_config_file(config)
    message = str(exc.value)
    assert str(config) in message and f"num_processes is {count}" in message and "--gpus" in message, message
    assert from_config_file(config, gpus_per_node=2).world_size == 2
    # one process (distributed_type NO) runs whatever the count: accelerate starts one process
    config.write_text("distributed_type: 'NO'\nnum_processes: 0\n")
    assert from_config_file(config).world_size == 1


# --------------------------------------------------------------------------------------------
# the launch scripts' variables
# --------------------------------------------------------------------------------------------


def sbatch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = fake_bin(
        tmp_path / "slurm-bin",
        srun=f"echo srun >> {shlex.quote(str(tmp_path / 'srun.log'))}\n",
        scontrol='[ "$1 $2" = "show hostnames" ] && printf "node1\\nnode2\\n"\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "QLORA_SFT_", "MASTER_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHONPATH=str(REPO / "src"),
        QLORA_SFT_PYTHON=PY,
        QLORA_SFT_HOME=str(REPO),
        QLORA_SFT_PREPARE="0",
        SLURM_JOB_ID="77",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_GPUS_ON_NODE="8",
    )
    env.update(extra)
    return env


def run_sbatch_script(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """slurm/multi_node.sbatch run by bash outside SLURM, with the environment `sbatch_env` gives."""
    cmd = ["bash", str(REPO / "slurm" / "multi_node.sbatch"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("QLORA_SFT_GPUS_PER_NODE", "eight"),
        ("QLORA_SFT_GPUS_PER_NODE", "-2"),
        ("SLURM_GPUS_ON_NODE", "8(x2)"),
        ("QLORA_SFT_PROCS_PER_NODE", "0"),
        ("QLORA_SFT_PROCS_PER_NODE", "x"),
        ("MASTER_PORT", "abc"),
        ("MASTER_PORT", "70000"),
    ],
)
def test_sbatch_template_refuses_a_count_that_is_not_a_number(tmp_path: Path, var: str, value: str):
    """QLORA_SFT_GPUS_PER_NODE=eight failed bash's `-gt` test and the job ran CPU ranks on its GPU
    nodes (ACCELERATE_USE_CPU=true); PROCS_PER_NODE=0 divided by zero, `x` died on an unbound
    variable; a MASTER_PORT that is no port reached every node's launcher. Now one line naming the
    variable, before srun."""
    recipe = small_recipe(tmp_path)
    env = sbatch_env(tmp_path, **{var: value})
    if var == "QLORA_SFT_PROCS_PER_NODE":
        env["QLORA_SFT_GPUS_PER_NODE"] = "0"
    out = run_sbatch_script(tmp_path, env, str(recipe))
    assert out.returncode == 2, out.stderr
    assert f"{var}='{value}'" in out.stderr, out.stderr
    assert not (tmp_path / "srun.log").exists()


def test_sbatch_template_with_sound_counts_still_runs(tmp_path: Path):
    recipe = small_recipe(tmp_path)
    env = sbatch_env(tmp_path, QLORA_SFT_GPUS_PER_NODE="4", MASTER_PORT="29555", QLORA_SFT_DRY_RUN="1")
    out = run_sbatch_script(tmp_path, env, str(recipe))
    assert out.returncode == 0, out.stderr
    assert "MASTER_PORT=29555 QLORA_SFT_NUM_PROCESSES=8" in out.stdout


def test_local_sh_refuses_a_gpu_count_that_is_not_a_number(tmp_path: Path):
    """NUM_GPUS=two failed `-gt` and local.sh launched one process with single_gpu.yaml."""
    recipe = small_recipe(tmp_path)
    bin_dir = fake_bin(
        tmp_path / "acc-bin",
        accelerate=f"echo accelerate >> {shlex.quote(str(tmp_path / 'launched.log'))}\n",
        python=f'exec {shlex.quote(PY)} "$@"\n',
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "ACCELERATE": str(bin_dir / "accelerate")}
    for value in ("two", "-1"):
        out = subprocess.run(
            [str(REPO / "launch" / "local.sh"), str(recipe)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**env, "NUM_GPUS": value},
            timeout=120,
        )
        assert out.returncode == 2 and f"NUM_GPUS='{value}'" in out.stderr, out.stderr
        assert not (tmp_path / "launched.log").exists()
    out = subprocess.run(
        [str(REPO / "launch" / "local.sh"), str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "NUM_GPUS": "2"},
        timeout=120,
    )
    assert out.returncode == 0 and "multi_gpu.yaml" in out.stderr, out.stderr
    assert (tmp_path / "launched.log").exists()


def test_the_accelerate_yaml_test_files_are_yaml():
    """(the bundled configs still read, with every key accelerate knows)"""
    from qlora_sft.launch_config import read_accelerate

    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        cfg = read_accelerate(path)
        assert cfg.distributed_type in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP"), path
        assert yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------
# DeepSpeed JSONs with values of the wrong shape
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"gradient_clipping": "abc"}, '`gradient_clipping` is "abc"'),
        ({"train_micro_batch_size_per_gpu": "2"}, '`train_micro_batch_size_per_gpu` is "2"'),
        ({"train_batch_size": 0}, "`train_batch_size` is 0"),
        ({"bf16": True}, "`bf16` is true; DeepSpeed reads an object"),
        ({"zero_optimization": {"stage": 3, "offload_param": "cpu"}}, "`zero_optimization.offload_param` is"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": "1e-4"}}}, '`optimizer.params.lr` is "1e-4"'),
    ],
)
def test_a_deepspeed_value_of_the_wrong_shape_names_the_key(tmp_path: Path, extra: dict, expected: str):
    """`"bf16": true` or `"offload_param": "cpu"` stopped plan with a traceback ('bool' object has no
    attribute 'get'); `"gradient_clipping": "abc"` with float()'s; a quoted micro batch "2" was called
    a mismatch with the recipe's 2 ("is 2 but the recipe's micro batch is 2")."""
    import json

    from qlora_sft.launch_config import read_deepspeed

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **extra}))
    with pytest.raises(UserError, match="DeepSpeed config .*ds.json: " + __import__("re").escape(expected)):
        read_deepspeed(path)
    recipe = small_recipe(tmp_path, train={"global_batch_size": 8, "per_device_train_batch_size": 2})
    out = run_cli("-m", "qlora_sft", "plan", str(recipe), "--config", str(path), "--gpus", "2", cwd=tmp_path)
    assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_deepspeed_numbers_that_deepspeed_reads_still_pass(tmp_path: Path):
    import json

    from qlora_sft.launch_config import read_deepspeed

    path = tmp_path / "ds.json"
    raw = {
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": 2.0,
        "gradient_clipping": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": "auto"}},
    }
    path.write_text(json.dumps(raw))
    assert read_deepspeed(path).offload_param == "cpu"


def test_deepspeed_optimizer_and_scheduler_numbers_that_contradict_the_recipe_are_named(tmp_path: Path):
    """A DeepSpeed JSON whose optimizer has `"betas": [0.9, 0.95]` (a common LLM setting) beside a recipe
    with AdamW's defaults (0.9, 0.999), an `eps` other than train.adam_epsilon, or a scheduler whose
    `warmup_max_lr` is not train.learning_rate: transformers refuses each ("DeepSpeed config values
    that mismatch TrainingArguments") only in trainer.train(), after the model has loaded; plan passed
    them. lr and weight_decay were checked already; "auto" and matching values still pass."""
    import json

    from qlora_sft.launch_config import deepspeed_problems, read_deepspeed
    from qlora_sft.recipe import load_recipe

    recipe = load_recipe(small_recipe(tmp_path, train={"learning_rate": 2e-4, "adam_epsilon": 1e-8}))
    path = tmp_path / "ds.json"

    def problems(optimizer: dict | None = None, scheduler: dict | None = None) -> str:
        raw: dict = {"zero_optimization": {"stage": 2}}
        if optimizer is not None:
            raw["optimizer"] = {"type": "AdamW", "params": optimizer}
        if scheduler is not None:
            raw["scheduler"] = {"type": "WarmupDecayLR", "params": scheduler}
        path.write_text(json.dumps(raw))
        return "\n".join(deepspeed_problems(read_deepspeed(path), recipe))

    text = problems({"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-6})
    assert "`optimizer.params.betas` is [0.9, 0.95] but train.adam_beta1, train.adam_beta2 are [0.9, 0.999]" in text
    assert "`optimizer.params.eps` is 1e-06 but train.adam_epsilon is 1e-08" in text
    text = problems(scheduler={"warmup_max_lr": 1e-3, "warmup_num_steps": "auto"})
    assert "`scheduler.params.warmup_max_lr` is 0.001 but train.learning_rate is 0.0002" in text
    assert problems({"lr": "auto", "betas": "auto", "eps": "auto"}, {"warmup_max_lr": "auto"}) == ""
    assert problems({"betas": [0.9, 0.999], "eps": 1e-8}, {"warmup_max_lr": 2e-4}) == ""


def test_deepspeed_scheduler_step_counts_that_contradict_the_recipe_are_named_before_loading(tmp_path: Path):
    """A DeepSpeed JSON whose scheduler has `"total_num_steps": 1000` or `"warmup_num_steps": 100`
    copied from another run: transformers compares them with the step count and train.warmup_steps
    only in trainer.train() (trainer_config_finalize, "DeepSpeed config values that mismatch
    TrainingArguments"), after the model has loaded; validate and plan passed them. With
    train.max_steps the counts are known and compared; counted in epochs the step count depends on
    the data, and the message says so. "auto" and agreeing numbers still pass."""
    import json

    from qlora_sft.launch_config import deepspeed_problems, read_deepspeed
    from qlora_sft.recipe import load_recipe

    path = tmp_path / "ds.json"

    def problems(train: dict, scheduler: dict) -> str:
        recipe = load_recipe(small_recipe(tmp_path, train=train))
        raw = {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupDecayLR", "params": scheduler}}
        path.write_text(json.dumps(raw))
        return "\n".join(deepspeed_problems(read_deepspeed(path), recipe))

    steps = {"max_steps": 100, "warmup_steps": 10}
    text = problems(steps, {"total_num_steps": 1000, "warmup_num_steps": "auto"})
    assert "`scheduler.params.total_num_steps` is 1000 but train.max_steps is 100" in text and '"auto"' in text
    text = problems(steps, {"total_num_steps": "auto", "warmup_num_steps": 100})
    assert "`scheduler.params.warmup_num_steps` is 100 but the recipe warms up for 10 steps" in text
    assert "train.warmup_steps" in text
    # a fraction of the steps: 0.05 of 100
    text = problems({"max_steps": 100, "warmup_steps": 0.05}, {"total_num_steps": 100, "warmup_num_steps": 10})
    assert "`scheduler.params.warmup_num_steps` is 10 but the recipe warms up for 5 steps" in text
    # no warmup: transformers fills in 1 (DeepSpeed refuses 0) and refuses 0
    text = problems({"max_steps": 100}, {"total_num_steps": 100, "warmup_num_steps": 0})
    assert "`scheduler.params.warmup_num_steps` is 0 but the recipe warms up for 1 step" in text
    # counted in epochs: the step count depends on the data
    text = problems({"num_train_epochs": 2}, {"total_num_steps": 500, "warmup_num_steps": "auto"})
    assert "`scheduler.params.total_num_steps` is 500" in text and "depends on the data" in text
    assert '"auto"' in text and "train.max_steps" in text
    text = problems({"num_train_epochs": 2, "warmup_steps": 0.1}, {"warmup_num_steps": 30})
    assert "`scheduler.params.warmup_num_steps` is 30" in text and "depends on the data" in text
    # what transformers accepts still passes
    assert problems(steps, {"total_num_steps": "auto", "warmup_num_steps": "auto"}) == ""
    assert problems(steps, {"total_num_steps": 100, "warmup_num_steps": 10}) == ""
    assert problems(steps, {"total_num_steps": 100.0, "warmup_num_steps": 10.0}) == ""
    assert problems({"max_steps": 100, "warmup_steps": 0.05}, {"total_num_steps": 100, "warmup_num_steps": 5}) == ""
    assert problems({"max_steps": 100}, {"warmup_num_steps": 1}) == ""
    by_epochs = {"num_train_epochs": 2, "warmup_steps": 10}  # a warmup of whole steps is known without the data
    assert problems(by_epochs, {"total_num_steps": "auto", "warmup_num_steps": 10}) == ""

    # validate refuses it, before anything loads
    recipe = small_recipe(tmp_path, train={"max_steps": 100, "deepspeed": str(path)})
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"params": {"total_num_steps": 7}}}))
    out = run_cli("-m", "qlora_sft", "validate", str(recipe), cwd=tmp_path)
    assert out.returncode == 2 and "`scheduler.params.total_num_steps` is 7 but train.max_steps is 100" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("train", "scheduler"),
    [
        ({"max_steps": 100, "warmup_steps": 10}, {"total_num_steps": 1000}),
        ({"max_steps": 100, "warmup_steps": 10}, {"total_num_steps": 100, "warmup_num_steps": 10}),
        ({"max_steps": 100, "warmup_steps": 10}, {"total_num_steps": 100.0, "warmup_num_steps": 11}),
        ({"max_steps": 100, "warmup_steps": 0.05}, {"warmup_num_steps": 5}),
        ({"max_steps": 100, "warmup_steps": 0.05}, {"warmup_num_steps": 6}),
        ({"max_steps": 100, "warmup_steps": 0.001}, {"warmup_num_steps": 1}),
        ({"max_steps": 100}, {"warmup_num_steps": 0}),
        ({"max_steps": 100}, {"warmup_num_steps": 1}),
        ({"max_steps": 100}, {"warmup_num_steps": "auto", "total_num_steps": "auto"}),
    ],
)
def test_the_scheduler_step_check_agrees_with_transformers(tmp_path: Path, train: dict, scheduler: dict):
    """What deepspeed_problems says of the scheduler's step counts is what transformers' own check
    (HfTrainerDeepSpeedConfig.trainer_config_finalize, run after the model loads) refuses."""
    import json

    from accelerate.utils.deepspeed import HfDeepSpeedConfig as AccelerateConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from qlora_sft.launch_config import deepspeed_problems, read_deepspeed
    from qlora_sft.recipe import load_recipe

    raw = {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupDecayLR", "params": scheduler}}
    (tmp_path / "ds.json").write_text(json.dumps(raw))
    ours = deepspeed_problems(read_deepspeed(tmp_path / "ds.json"), load_recipe(small_recipe(tmp_path, train=train)))

    class Finalize(HfTrainerDeepSpeedConfig, AccelerateConfig):
        """transformers' checks over accelerate's reader, its base where deepspeed is installed (its own
        __init__ needs deepspeed, and registers the config globally)."""

        def __init__(self, config: dict):
            AccelerateConfig.__init__(self, config)
            self.mismatches = []

    hf = Finalize(json.loads(json.dumps(raw)))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **train)
    try:
        hf.trainer_config_finalize(args, None, train["max_steps"])
        refused = False
    except ValueError as exc:
        refused = "mismatch" in str(exc)
    assert bool(ours) == refused, (ours, refused)


# --------------------------------------------------------------------------------------------
# submit: a run with nothing left to do
# --------------------------------------------------------------------------------------------


def test_submitting_a_finished_run_queues_nothing(tiny_model: Path, tmp_path: Path, fake_sbatch: Path):
    """A finished run submitted again (the same recipe, the same max_steps): the job was queued, got its
    nodes, started every rank and the process group, and only then said "nothing to do". submit now
    says so before sbatch; asking for more steps still queues (training continues from the last step)."""
    from helpers import recipe_dict, write_toy_data

    from qlora_sft.recipe import load_recipe
    from qlora_sft.submit import submit
    from qlora_sft.train import train

    data = write_toy_data(tmp_path / "toy.jsonl", n=24)
    raw = recipe_dict(tiny_model, data, tmp_path / "runs", train={"max_steps": 1, "save_steps": 1})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    assert train(load_recipe(recipe)).global_step == 1
    with pytest.raises(UserError, match=r"finished at step 1.*Nothing was queued"):
        submit(recipe, [], cluster="slurm", gpus_per_node=1, time="01:00:00")
    assert not fake_sbatch.exists()
    job = submit(recipe, ["train.max_steps=2"], cluster="slurm", gpus_per_node=1, time="01:00:00")
    assert job.job_id == "4242"


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"time": "90:99"}, r"cluster.time='90:99': .* out of range"),
        ({"time": "01:00:00", "extra_sbatch": ["--time=10"]}, r"cluster.extra_sbatch: --time is set by submit"),
        ({"time": "5"}, r"cluster.time is 5 minute.*cluster.signal_grace_s"),
        ({"time": "01:00:00", "tasks_per_node": 2}, r"2 tasks per node on 1 GPUs per node"),
    ],
    ids=["time-out-of-range", "extra-sbatch-time", "time-inside-grace", "tasks-past-gpus"],
)
def test_submit_prepare_checks_the_cluster_settings_before_it_tokenizes(
    tiny_model: Path, tmp_path: Path, fake_sbatch: Path, bad: dict, expected: str
):
    """Was: `submit --prepare --time 90:99` (or `extra_sbatch: ["--time=10"]`, a limit inside the
    signal grace, more tasks than GPUs) read and tokenized the whole dataset into the cache, and only
    then was refused ("nothing was queued"). Now the cluster settings are checked first: refused with
    no data cache built; sound settings still prepare, then queue."""
    from helpers import recipe_dict, write_toy_data

    from qlora_sft.submit import submit

    data = write_toy_data(tmp_path / "toy.jsonl", n=24)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, data, tmp_path / "runs"))
    cache = tmp_path / "runs" / ".cache"
    with pytest.raises(UserError, match=expected):
        submit(recipe, [], cluster="slurm", gpus_per_node=1, prepare=True, **bad)
    assert not list(cache.glob("data-*")), list(cache.iterdir())
    assert not fake_sbatch.exists()
    assert submit(recipe, [], cluster="slurm", gpus_per_node=1, time="01:00:00", prepare=True).job_id == "4242"
    assert list(cache.glob("data-*"))


@pytest.mark.parametrize("args", [["--deepspeed="], ["--deepspeed", ""]])
def test_an_empty_deepspeed_flag_is_refused_not_dropped(tmp_path: Path, args: list[str]):
    """`--deepspeed=$DS` with DS unset: both launch scripts trained without DeepSpeed (DDP) and said
    nothing. Now a usage line, and nothing starts."""
    recipe = small_recipe(tmp_path)
    out = run_sbatch_script(tmp_path, sbatch_env(tmp_path, QLORA_SFT_DRY_RUN="1"), *args, str(recipe))
    assert out.returncode == 2 and "--deepspeed is empty" in out.stderr, out.stderr + out.stdout
    bin_dir = fake_bin(
        tmp_path / "acc-bin",
        accelerate=f"echo accelerate >> {shlex.quote(str(tmp_path / 'launched.log'))}\n",
        python=f'exec {shlex.quote(PY)} "$@"\n',
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "ACCELERATE": str(bin_dir / "accelerate"), "NUM_GPUS": "0"}
    out = subprocess.run(
        [str(REPO / "launch" / "local.sh"), *args, str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and "--deepspeed is empty" in out.stderr, out.stderr
    assert not (tmp_path / "launched.log").exists()


def test_a_global_batch_no_micro_batch_fits_says_why():
    """32 over 3 processes: no micro batch divides it, and the message said "(32 is smaller than the 3
    processes)"; 32 is larger. It now says what is wrong: not a multiple of the process count."""
    from qlora_sft.errors import RecipeError
    from qlora_sft.recipe import build_recipe, resolve_batch

    recipe = build_recipe({**MINIMAL_RECIPE, "train": {"global_batch_size": 32, "per_device_train_batch_size": 2}})
    with pytest.raises(RecipeError) as exc:
        resolve_batch(recipe.train, 3)
    text = str(exc.value)
    assert "smaller" not in text and "32 is not a multiple of the 3 processes" in text
    assert "WORLD_SIZE" in text  # where the count came from (a stray WORLD_SIZE=1000 was not named)
    with pytest.raises(RecipeError, match="2 is smaller than the 4 processes: the launcher's WORLD_SIZE"):
        resolve_batch(build_recipe({**MINIMAL_RECIPE, "train": {"global_batch_size": 2}}).train, 4)


def test_an_accelerate_config_written_as_json_is_read_as_one(tmp_path: Path):
    """`accelerate config --config_file acc.json` writes JSON, and `accelerate launch --config_file
    acc.json` reads it; `plan --config acc.json` took every .json for a DeepSpeed config and refused it
    as one ("has no zero_optimization.stage"). It is now read as the accelerate config it is; the
    launch scripts, which take a .json for --deepspeed, say what it is."""
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    from qlora_sft.launch import from_config_file

    config = tmp_path / "acc.json"
    config.write_text(json.dumps({"distributed_type": "MULTI_GPU", "num_processes": 4, "mixed_precision": "no"}))
    assert load_config_from_file(str(config)).num_processes == 4  # accelerate reads it
    mode = from_config_file(config)
    assert (mode.kind, mode.world_size) == ("ddp", 4)
    out = run_cli("-m", "qlora_sft.launch_config", "deepspeed", str(config), cwd=tmp_path)
    assert out.returncode == 2 and "is an accelerate config (distributed_type)" in out.stderr, out.stderr


def test_more_tasks_than_gpus_per_node_is_refused_before_queueing(tmp_path: Path, fake_sbatch: Path):
    """`--gpus-per-node 2 --tasks-per-node 3`: each task is one rank and takes the GPU numbered by its
    local rank (submitit exports CUDA_VISIBLE_DEVICES=<local rank>), so rank 2 found no GPU once the job
    had its nodes. Refused before sbatch; as many tasks as GPUs (or fewer) is queued."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    with pytest.raises(UserError, match=r"3 tasks per node.*2 GPUs per node"):
        submit(recipe, [], cluster="slurm", gpus_per_node=2, tasks_per_node=3, time="01:00:00")
    assert not fake_sbatch.exists()
    assert submit(recipe, [], cluster="slurm", gpus_per_node=2, tasks_per_node=2, time="01:00:00").job_id == "4242"


@pytest.mark.parametrize("flags", [["--gpus", "8"], ["--nodes", "2"], ["--config", "single_gpu.yaml", "--gpus", "4"]])
def test_plan_does_not_drop_gpus_or_nodes_it_cannot_use(tmp_path: Path, flags: list[str]):
    """`plan R --gpus 8` without a config (or with single_gpu.yaml) planned one process, a gradient
    accumulation 8 times the launch the user meant, and said nothing about the 8. Now refused, naming
    a multi-process config."""
    recipe = small_recipe(tmp_path, train={"global_batch_size": 32, "per_device_train_batch_size": 2})
    flags = [str(REPO / "configs" / "accelerate" / f) if f.endswith(".yaml") else f for f in flags]
    out = run_cli("-m", "qlora_sft", "plan", str(recipe), *flags, cwd=tmp_path)
    assert out.returncode == 2, out.stdout
    assert "runs one process" in out.stderr and "configs/accelerate/multi_gpu.yaml" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "task_env",
    [
        # what submitit's local executor gives each task (local/local.py: start_controller, Controller.start_tasks)
        {
            "SUBMITIT_EXECUTOR": "local",
            "SUBMITIT_LOCAL_NTASKS": "2",
            "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_LOCAL_JOB_ID": "4242",
            "SUBMITIT_LOCAL_GLOBALID": "1",
            "SUBMITIT_LOCAL_LOCALID": "1",
        },
        # and its slurm executor (the sbatch script exports SUBMITIT_EXECUTOR; srun sets SLURM_*)
        {
            "SUBMITIT_EXECUTOR": "slurm",
            "SLURM_JOB_ID": "4242",
            "SLURM_NTASKS": "2",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_PROCID": "1",
            "SLURM_LOCALID": "1",
        },
    ],
    ids=["local", "slurm"],
)
def test_ranks_submitit_started_are_not_told_no_launcher_started_them(
    monkeypatch: pytest.MonkeyPatch, task_env: dict[str, str]
):
    """Was: under `submit --cluster local` with several tasks, export_torch_env sets WORLD_SIZE=2, but
    none of the variables submitit's local executor sets was a launcher's, so every rank warned "no
    launcher ... started this process ... unset WORLD_SIZE" (and added it to a "did not form" error).
    Now SUBMITIT_LOCAL_GLOBALID (the task's rank, set only by the executor's controller) counts as a
    launcher's; the same variables without it (left in a shell) still warn."""
    from qlora_sft.launch import LAUNCHER_VARIABLES, stray_rank_variables
    from qlora_sft.submit import TORCH_ENV, export_torch_env

    ours = [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]
    for name in (*ours, *LAUNCHER_VARIABLES, *TORCH_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(name, "")  # (recorded, so that what export_torch_env sets is undone after)
        monkeypatch.delenv(name)
    for name, value in task_env.items():
        monkeypatch.setenv(name, value)
    torch_env = export_torch_env()
    assert torch_env["WORLD_SIZE"] == "2" and torch_env["RANK"] == "1", torch_env
    assert stray_rank_variables() is None
    rank = "SUBMITIT_LOCAL_GLOBALID" if task_env["SUBMITIT_EXECUTOR"] == "local" else "SLURM_PROCID"
    monkeypatch.delenv(rank)
    assert "no launcher" in (stray_rank_variables() or "")


def test_rank_variables_left_in_the_shell_are_named_not_waited_on_in_silence(tiny_model: Path, tmp_path: Path):
    """WORLD_SIZE/RANK/MASTER_ADDR left exported (a tutorial's `export WORLD_SIZE=2 ...`), then a plain
    `qlora-sft train`: no launcher started the other rank, and the process waited for it at the
    rendezvous without a word until train.ddp_timeout (30 minutes by default), then died with torch's
    traceback. Now it says at once what it waits for and how to run one process, and the timeout ends
    in an error naming the variables."""
    from helpers import cpu_env, free_port, recipe_dict, write_toy_data

    data = write_toy_data(tmp_path / "toy.jsonl", n=16)
    recipe = write_recipe(
        tmp_path / "r.yaml", recipe_dict(tiny_model, data, tmp_path / "runs", train={"ddp_timeout": 6, "max_steps": 1})
    )
    env = {**cpu_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    for launcher in ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(launcher, None)
    res = subprocess.run(
        [sys.executable, "-m", "qlora_sft", "train", str(recipe)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    assert "WORLD_SIZE=2 is set, but no launcher (torchrun, accelerate launch, srun, mpirun) started this" in out
    assert "unset WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR MASTER_PORT" in out
    assert "the other rank(s) did not join within train.ddp_timeout=6" in out
    assert not (tmp_path / "runs" / "tiny" / "checkpoint-1").exists()


def test_plan_run_dir_under_a_symlink_loop_is_named_not_a_traceback(tmp_path: Path):
    """`plan R --run-dir` (the run directory, for scripts) with run.output_dir a symlink loop raised
    pathlib's `RuntimeError: Symlink loop` traceback; train and submit name it as unwritable."""
    recipe = small_recipe(tmp_path)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = run_cli("-m", "qlora_sft", "plan", str(recipe), "--run-dir", f"run.output_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (
        f"run.output_dir {tmp_path / 'a'}: the run directory {tmp_path / 'a' / 'run'} goes through a symbolic link loop"
        in out.stderr
    ), out.stderr
    assert "choose another run.output_dir" in out.stderr and not out.stdout, out.stdout


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ('\ufeff{"zero_optimization": {"stage": 2}}', "It begins with a byte-order mark (BOM): save it as UTF-8"),
        ('{\n  // ZeRO-2\n  "zero_optimization": {"stage": 2}\n}', "JSON has no comments: remove the // or /* */"),
        ('{"zero_optimization": {"stage": 2,},}', "JSON allows no comma before a closing } or ]"),
        ('{"zero_optimization": {"stage": 2}', ""),  # cut off: the position alone
    ],
)
def test_a_hand_edited_deepspeed_json_is_refused_saying_what_json_forbids(tmp_path: Path, text: str, hint: str):
    """A DeepSpeed JSON with comments, a trailing comma or a BOM (hand-edited, copied from a
    tutorial) was refused with json's position only ("Expecting property name enclosed in double
    quotes"; for the BOM, "decode using utf-8-sig"), not what JSON forbids."""
    from qlora_sft.launch_config import read_deepspeed

    path = tmp_path / "ds.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=r"DeepSpeed config .*ds\.json is not valid JSON: ") as exc:
        read_deepspeed(path)
    message = str(exc.value)
    assert (hint in message) if hint else message.rstrip().endswith(")"), message


@pytest.mark.parametrize("value", ["1", "0", "no", "", "abc"])
def test_dry_run_switch_reads_0_as_off(tmp_path: Path, value: str):
    """QLORA_SFT_DRY_RUN=0 used to turn the dry run on (any value that was not empty did): the job
    printed its srun line and trained nothing, and `launch_config deepspeed` skipped its DeepSpeed
    check. It is read as every switch now: 1/true/yes on, 0/false/no/empty off, anything else refused
    before anything runs."""
    from qlora_sft import launch_config
    from qlora_sft.errors import UserError

    recipe = small_recipe(tmp_path)
    out = run_sbatch_script(tmp_path, sbatch_env(tmp_path, QLORA_SFT_DRY_RUN=value), str(recipe))
    ran = (tmp_path / "srun.log").exists()
    if value == "abc":
        assert out.returncode == 2 and "QLORA_SFT_DRY_RUN=abc: use 1 (on) or 0 (off)" in out.stderr, out.stderr
        assert not ran
    elif value == "1":
        assert out.returncode == 0 and "QLORA_SFT_NUM_PROCESSES=" in out.stdout and not ran, out.stderr
    else:
        assert ran and "QLORA_SFT_NUM_PROCESSES=" not in out.stdout, (out.stdout, out.stderr)
    env = {"QLORA_SFT_DRY_RUN": value}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_SFT_DRY_RUN", value)
        if value == "abc":
            with pytest.raises(UserError, match="QLORA_SFT_DRY_RUN="):
                launch_config.dry_run()
        else:
            assert launch_config.dry_run() == (value == "1"), env
