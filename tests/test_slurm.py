"""The sbatch templates and submitit against a real SLURM (slurmctld + slurmd on this machine,
started by tests/slurm/cluster.sh). In CI the cluster must come up: these tests fail, never skip,
when CI=true."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    accelerate_cmd,
    cpu_env,
    losses_by_step,
    recipe_dict,
    small_recipe,
    wait_for_losses,
    write_recipe,
    write_toy_data,
)

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
GOLDEN = REPO / "tests" / "slurm" / "golden"
WEIRD = "dir with spaces;$(touch PWNED)`touch PWNED2`&& 'q' \"dq\""


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    if not shutil.which("slurmctld") or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(
                "SLURM is not installed, or not root, in CI: .ci/run must install it "
                "(apt-get install slurmctld slurmd slurm-client munge)"
            )
        pytest.skip("SLURM not installed (apt-get install -y slurmctld slurmd slurm-client munge) or not root")
    state = Path(os.environ.get("QLORA_SFT_SLURM_DIR", "/tmp/qlora-sft-slurm"))
    probe = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%t"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": str(state / "slurm.conf")},
    )
    started_here = probe.returncode != 0 or "idle" not in probe.stdout  # .ci/run may have started it
    if started_here:
        out = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"cannot start SLURM:\n{out.stdout}\n{out.stderr}"
    env = dict(os.environ)
    env.update(
        SLURM_CONF=str(state / "slurm.conf"),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        QLORA_SFT_HOME=str(REPO),
        QLORA_SFT_PROCS_PER_NODE="2",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    yield env
    if started_here:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=60)


def sbatch(
    env: dict[str, str], cwd: Path, template: str, *args: str, sbatch_args: tuple[str, ...] = (), prepare: bool = False
) -> int:
    """Submit a template. `prepare`: let it run `qlora-sft prepare` before srun, as it does by default
    (tested once, in `straight`; the other jobs skip it to keep the suite short)."""
    env = {**env, "QLORA_SFT_PREPARE": "1" if prepare else "0"}
    cmd = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        "--signal=B:USR1@30",
        *sbatch_args,
        str(REPO / "slurm" / template),
        *args,
    ]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def job_info(env: dict[str, str], job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", str(job)], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def controller_log(env: dict[str, str], job: int) -> str:
    """slurmctld's lines about one job: why it was killed, requeued or not started."""
    path = Path(env["SLURM_CONF"]).parent / "slurmctld.log"
    if not path.is_file():
        return ""
    return "\n".join(line for line in path.read_text(errors="replace").splitlines() if f"JobId={job} " in line + " ")


def wait_state(env: dict[str, str], job: int, states: set[str], timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    info: dict[str, str] = {}
    while time.time() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} never reached {states}: {info}\n{controller_log(env, job)}")


def release_requeued(env: dict[str, str], job: int) -> None:
    """Start a requeued job now instead of after SLURM's requeue delay (BeginTime = requeue + 120 s).
    Not in the same second as the requeue: slurmd refuses a credential created no later than the
    revocation of the previous run's ("Killing non-startable batch job: Job credential revoked"),
    which is what that delay protects against."""
    wait_state(env, job, {"PENDING"}, timeout=120)
    time.sleep(2)  # (StartTime=now+N would wait for the scheduler's next cycle; now starts it at once)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("slurm") / WEIRD  # paths full of spaces and shell characters
    root.mkdir(parents=True)
    data = write_toy_data(root / "toy.jsonl", n=160)
    train = {
        "max_steps": 24,
        "logging_steps": 1,
        "save_steps": 4,
        "global_batch_size": 8,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
    }
    recipe = write_recipe(root / "recipe.yaml", recipe_dict(tiny_model, data, root / "runs", train=train))
    return root, recipe


@pytest.fixture(scope="module")
def straight(slurm, workdir):
    root, recipe = workdir
    job = sbatch(slurm, root, "single_node.sbatch", str(recipe), "run.name=straight", prepare=True)
    info = wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = (root / f"slurm-qlora-sft-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    return job, log


def test_single_node_job_runs_two_ranks_to_completion(straight, workdir):
    _, log = straight
    root, _ = workdir
    run_dir = root / "runs" / "straight"
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoint-24").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert "1 node(s) x 2 process(es) = 2" in log and "training finished" in log
    assert "SLURM job" in log and "restart count 0" in log
    # the batch script tokenized once before the ranks started; the ranks found that cache
    assert "`train` finds it there" in log
    assert "data: found the prepared cache" in log and "(built by `qlora-sft prepare`" in log
    assert not list(root.glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def test_preempted_job_saves_requeues_resumes_and_matches(slurm, workdir, straight):
    root, recipe = workdir
    job = sbatch(slurm, root, "single_node.sbatch", str(recipe), "run.name=preempted")
    run_dir = root / "runs" / "preempted"
    wait_for_losses(run_dir, 6)
    # what SLURM does before a time limit with --signal=B:USR1@N: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm, check=True)
    info = wait_state(slurm, job, {"PENDING", "REQUEUED", "COMPLETED", "FAILED"}, timeout=300)
    log = (root / f"slurm-qlora-sft-{job}.out").read_text()
    assert info["JobState"] in ("PENDING", "REQUEUED"), log[-4000:]
    assert "requeueing job" in log
    stopped = json.loads((run_dir / "PREEMPTED").read_text())["step"]
    assert (run_dir / f"checkpoint-{stopped}" / "COMPLETE").is_file()
    release_requeued(slurm, job)
    info = wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = (root / f"slurm-qlora-sft-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:] + "\n" + controller_log(slurm, job)
    assert info.get("Restarts") == "1"
    assert "restart 1" in log and f"resuming from {run_dir}/checkpoint-{stopped}" in log
    assert not (run_dir / "PREEMPTED").exists()
    assert (run_dir / "final" / "COMPLETE").is_file()
    got, want = losses_by_step(run_dir), losses_by_step(root / "runs" / "straight")
    assert max(got) == 24
    for step in range(stopped + 1, 25):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_failed_run_is_not_requeued(slurm, workdir):
    root, recipe = workdir
    job = sbatch(slurm, root, "single_node.sbatch", str(recipe), "run.name=broken", "model.name_or_path=/nope/model")
    info = wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = (root / f"slurm-qlora-sft-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info.get("Restarts") == "0", log[-3000:]
    # stopped by the recipe check, the data preparation or training, and never requeued
    assert "not requeueing" in log or "not starting" in log, log[-3000:]


def test_multi_node_template_under_srun_with_one_node(slurm, workdir):
    root, recipe = workdir
    job = sbatch(
        slurm, root, "multi_node.sbatch", str(recipe), "run.name=multi", "train.max_steps=4", sbatch_args=("--nodes=1",)
    )
    info = wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = (root / f"slurm-qlora-sft-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert f"rendezvous {host}:{20000 + job % 20000}" in log
    assert (root / "runs" / "multi" / "final" / "COMPLETE").is_file()


def render(env: dict[str, str], nodes: int, nodelist: str, gpus: int, recipe: str, *overrides: str) -> str:
    e = {
        **env,
        "QLORA_SFT_DRY_RUN": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_GPUS_ON_NODE": str(gpus),
        "QLORA_SFT_PYTHON": "python",
    }
    e.pop("QLORA_SFT_PROCS_PER_NODE", None)
    out = subprocess.run(
        ["bash", str(REPO / "slurm" / "multi_node.sbatch"), recipe, *overrides],
        env=e,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.replace(str(REPO), "<repo>")


@pytest.mark.parametrize(("nodes", "nodelist"), [(1, "gpu01"), (2, "gpu[01-02]"), (4, "gpu[07-10]")])
def test_rendered_multi_node_command_matches_golden(slurm, nodes: int, nodelist: str):
    got = render(
        slurm, nodes, nodelist, 8, "configs/recipes/demo.yaml", "train.learning_rate=1e-4", "run.name=x;$(touch PWNED)"
    )
    golden = GOLDEN / f"multi_node_{nodes}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert got == golden.read_text()
    first = re.match(r"gpu\[?(\d+)", nodelist).group(1)
    assert f"MASTER_ADDR=gpu{first}" in got and f"QLORA_SFT_NUM_PROCESSES={nodes * 8}" in got
    # per-task variables are expanded by each task, not once in the batch shell
    assert '--machine_rank\\ \\"\\$SLURM_NODEID\\"' in got
    assert not list(REPO.glob("PWNED*"))


def test_per_task_ranks_and_no_silent_localhost(slurm, tmp_path: Path):
    """Evaluate the rendered task command the way each node's shell does: distinct machine ranks."""
    got = render(slurm, 3, "n[1-3]", 4, "configs/recipes/demo.yaml")
    task = re.search(r"bash -c (.*) qlora-sft configs/recipes/demo\.yaml", got).group(1)
    script = subprocess.run(["bash", "-c", f"printf %s {task}"], capture_output=True, text=True).stdout
    ranks = []
    for node in range(3):
        env = {
            "SLURM_NODEID": str(node),
            "QLORA_SFT_PY": "echo",
            "QLORA_SFT_NUM_MACHINES": "3",
            "QLORA_SFT_NUM_PROCESSES": "12",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "24242",
            "QLORA_SFT_ACCELERATE_CONFIG": "c.yaml",
            "PATH": os.environ["PATH"],
        }
        out = subprocess.run(["bash", "-c", script, "qlora-sft", "r.yaml"], env=env, capture_output=True, text=True)
        ranks.append(re.search(r"--machine_rank (\d+)", out.stdout).group(1))
        assert "--num_processes 12" in out.stdout and "--main_process_ip n1" in out.stdout
    assert ranks == ["0", "1", "2"]
    e = {**slurm, "SLURM_JOB_NODELIST": "", "SLURM_JOB_ID": "1", "QLORA_SFT_DRY_RUN": "1"}
    e.pop("MASTER_ADDR", None)
    out = subprocess.run(
        ["bash", str(REPO / "slurm" / "multi_node.sbatch"), "configs/recipes/demo.yaml"],
        env=e,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2 and "cannot find the first node" in out.stderr


def submitit_job_done(job, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not job.done() and time.time() < deadline:
        time.sleep(1)
    assert job.done(), f"submitit job {job.job_id} did not finish"


def test_submitit_two_tasks_run_to_completion(slurm, workdir, monkeypatch):
    from qlora_sft import submit

    root, recipe = workdir
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(root)
    job = submit(
        recipe,
        ["run.name=submitit", "train.max_steps=8"],
        nodes=1,
        gpus_per_node=0,
        tasks_per_node=2,
        cpus_per_task=1,
        time="00:20:00",
        cluster="slurm",
    )
    submitit_job_done(job)
    results = job.results()  # one per task
    assert len(results) == 2 and all(r["global_step"] == 8 for r in results), job.stderr()
    run_dir = root / "runs" / "submitit"
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoint-8").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert "'WORLD_SIZE': '2'" in job.stdout()


def test_submit_refuses_a_job_the_partition_can_never_start(slurm, tmp_path: Path, monkeypatch):
    """Read from the real scontrol and sinfo: the test cluster's one partition (debug, the default:
    one node, no GPUs; EnforcePartLimits=NO) queued `--nodes 2` and left it PENDING for ever
    (Reason=PartitionNodeLimit); `--gpus-per-node 1` was sbatch's 'Invalid generic resource (gres)
    specification', which names no option. Both refused, naming the option and the partition's limit.
    And the same run from a second job folder while its job waits (found by the job's comment)."""
    from qlora_sft import submit
    from qlora_sft.errors import UserError

    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    recipe = small_recipe(tmp_path)
    nodes = r"default partition debug can never run this job.*cluster.nodes=2 \(--nodes\) is more than the 1 node"
    with pytest.raises(UserError, match=nodes):
        submit(recipe, [], nodes=2, gpus_per_node=0, time="00:10:00", cluster="slurm")
    with pytest.raises(UserError, match=r"cluster.gpus_per_node=1 \(--gpus-per-node\), but none of its 1 node"):
        submit(recipe, [], gpus_per_node=1, time="00:10:00", cluster="slurm")
    assert not (tmp_path / "runs").exists()
    # the run's tag, sbatch's --comment, read back by the real squeue: the same run from another job folder
    held = submit(recipe, [], gpus_per_node=0, time="00:10:00", cluster="slurm", extra_sbatch=["--hold"])
    try:
        with pytest.raises(UserError, match=rf"job {held.job_id} \(PENDING\) of this run .*still in SLURM's queue"):
            submit(recipe, [], gpus_per_node=0, time="00:10:00", cluster="slurm", folder=tmp_path / "other")
    finally:
        subprocess.run(["scancel", held.job_id], env=slurm, check=True)


def slow_exiting_scontrol(folder: Path) -> Path:
    """An `scontrol` that does what the real one does, then takes 3 s more to exit after `requeue`.
    A requeue makes SLURM send SIGTERM to every process of the job, the scontrol that asked
    included; whether it has exited by then is a race (CI lost it once). This makes the race
    certain: a job that requeues from inside must survive its own scontrol being signalled."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "scontrol"
    real = shutil.which("scontrol")
    assert real, "scontrol not on PATH"
    wrapper.write_text(f'#!/bin/bash\n"{real}" "$@"; rc=$?\n[ "$1" = requeue ] && sleep 3\nexit $rc\n')
    wrapper.chmod(0o755)
    return folder


def test_submitit_job_requeued_by_preemption_resumes(slurm, workdir, straight, monkeypatch, tmp_path):
    from qlora_sft import submit

    root, recipe = workdir
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", f"{slow_exiting_scontrol(tmp_path / 'bin')}:{slurm['PATH']}")  # the job inherits it
    monkeypatch.chdir(root)
    job = submit(
        recipe,
        ["run.name=submitit-preempted"],
        nodes=1,
        gpus_per_node=0,
        tasks_per_node=2,
        cpus_per_task=1,
        time="00:20:00",
        cluster="slurm",
    )
    run_dir = root / "runs" / "submitit-preempted"
    wait_for_losses(run_dir, 6)
    # submitit's preemption signal, to every task the way SLURM delivers --signal=USR2@N
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], env=slurm, check=True)
    info = wait_state(slurm, int(job.job_id), {"PENDING", "REQUEUED", "COMPLETED", "FAILED"}, timeout=300)
    assert info["JobState"] in ("PENDING", "REQUEUED"), job.stderr()
    stopped = json.loads((run_dir / "PREEMPTED").read_text())["step"]
    assert (run_dir / f"checkpoint-{stopped}" / "COMPLETE").is_file()
    release_requeued(slurm, int(job.job_id))
    submitit_job_done(job)
    assert all(r["global_step"] == 24 and not r["preempted"] for r in job.results()), job.stderr()
    got, want = losses_by_step(run_dir), losses_by_step(root / "runs" / "straight")
    for step in range(stopped + 1, 25):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_started_under_sbatch_finished_under_accelerate_launch(slurm, workdir, straight):
    """The run directory is the same whoever launches: a preempted sbatch job, cancelled while
    queued again, is finished on the workstation with accelerate launch."""
    root, recipe = workdir
    job = sbatch(slurm, root, "single_node.sbatch", str(recipe), "run.name=handover")
    run_dir = root / "runs" / "handover"
    wait_for_losses(run_dir, 6)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm, check=True)
    wait_state(slurm, job, {"PENDING", "REQUEUED"}, timeout=300)
    subprocess.run(["scancel", str(job)], env=slurm, check=True)
    stopped = json.loads((run_dir / "PREEMPTED").read_text())["step"]
    out = subprocess.run(
        accelerate_cmd("train", str(recipe), "run.name=handover"),
        cwd=root,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint-{stopped}" in out.stdout
    got, want = losses_by_step(run_dir), losses_by_step(root / "runs" / "straight")
    for step in range(stopped + 1, 25):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_submit_local_executor_on_a_workstation(tmp_path: Path, tiny_model: Path, monkeypatch):
    from qlora_sft import submit

    data = write_toy_data(tmp_path / "toy.jsonl", n=60)
    recipe = write_recipe(
        tmp_path / "r.yaml", recipe_dict(tiny_model, data, tmp_path / "runs", train={"max_steps": 3, "save_steps": 3})
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = submit(recipe, [], gpus_per_node=0, tasks_per_node=2, cluster="local", time=10)
    submitit_job_done(job, timeout=300)
    assert [r["global_step"] for r in job.results()] == [3, 3], job.stderr()
    assert (tmp_path / "runs" / "tiny" / "final" / "COMPLETE").is_file()


def test_two_single_task_submissions_at_once_both_train(tmp_path: Path, tiny_model: Path, monkeypatch):
    """Two one-task jobs on one machine at once (two `--cluster local` submissions, or two jobs that
    share a node): each takes a free port for its process group, not the same fixed one (the second
    died with EADDRINUSE on 29500)."""
    from qlora_sft import submit

    data = write_toy_data(tmp_path / "toy.jsonl", n=60)
    recipe = write_recipe(
        tmp_path / "r.yaml", recipe_dict(tiny_model, data, tmp_path / "runs", train={"max_steps": 3, "save_steps": 3})
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    jobs = [
        submit(recipe, [f"run.name={name}"], gpus_per_node=0, tasks_per_node=1, cluster="local", time=10)
        for name in ("alpha", "beta")
    ]
    for job in jobs:
        submitit_job_done(job, timeout=300)
        assert [r["global_step"] for r in job.results()] == [3], job.stderr()
    for name in ("alpha", "beta"):
        assert (tmp_path / "runs" / name / "final" / "COMPLETE").is_file()


def test_submit_refuses_bad_recipes_before_submitting(tmp_path: Path, tiny_model: Path):
    from qlora_sft.errors import RecipeError, UserError

    data = write_toy_data(tmp_path / "toy.jsonl", n=10)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, data, tmp_path / "runs"))
    out = subprocess.run(
        [sys.executable, "-m", "qlora_sft", "submit", str(recipe), "lora.rank=4", "--cluster", "local"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "did you mean `lora.r`" in out.stderr
    assert not (tmp_path / "runs").exists()
    from qlora_sft.recipe import build_recipe
    from qlora_sft.submit import executor_parameters, parse_sbatch_lines

    r = build_recipe(
        recipe_dict(
            tiny_model,
            data,
            tmp_path,
            cluster={"partition": "gpu", "gpus_per_node": 8, "extra_sbatch": ["--exclusive", "--reservation=r1"]},
        )
    )
    params = executor_parameters(r.cluster, nodes=2, time="1-00:00:00")
    assert params["nodes"] == 2 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["timeout_min"] == 1440 and params["slurm_partition"] == "gpu"
    assert params["slurm_additional_parameters"] == {"exclusive": True, "reservation": "r1"}
    with pytest.raises(RecipeError):
        build_recipe(recipe_dict(tiny_model, data, tmp_path, cluster={"nodez": 2}))
    with pytest.raises(Exception, match="not an sbatch option"):
        parse_sbatch_lines(["exclusive"])
    # memory in SLURM's syntax (sbatch refused `--mem=10XB` only once submitted, in its own words)
    assert executor_parameters(r.cluster, mem="200G")["slurm_mem"] == "200G"
    assert executor_parameters(r.cluster, mem="64000")["slurm_mem"] == "64000"
    for bad in ("10XB", "1.5G", "G", "200 G", "-4G"):
        with pytest.raises(UserError, match=r"cluster.mem='.*': give SLURM's memory per node"):
            executor_parameters(r.cluster, mem=bad)


def test_signal_to_the_job_step_stops_every_rank_at_the_same_step(slurm, workdir):
    """SLURM's other way (`--signal=USR1@N` without B:, or scancel without --batch): the signal goes to
    the step's processes, launcher and ranks alike. Every rank stops at the same step, one complete
    checkpoint exists, and the job requeues."""
    root, recipe = workdir
    job = sbatch(
        slurm,
        root,
        "single_node.sbatch",
        str(recipe),
        "run.name=stepsignal",
        "train.max_steps=400",
        "train.save_steps=1000",
    )
    run_dir = root / "runs" / "stepsignal"
    wait_for_losses(run_dir, 3)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm, check=True)
    wait_state(slurm, job, {"PENDING", "REQUEUED"}, timeout=300)
    subprocess.run(["scancel", str(job)], env=slurm, check=True)
    log = (root / f"slurm-qlora-sft-{job}.out").read_text()
    stops = [int(x) for x in re.findall(r"preempted: checkpoint-(\d+) is complete", log)]
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]
    assert [p.name for p in run_dir.glob("checkpoint-*")] == [f"checkpoint-{stops[0]}"]
    assert (run_dir / f"checkpoint-{stops[0]}" / "COMPLETE").is_file()
