"""`qlora-sft submit` as a hostile but realistic user runs it: sbatch refusing the job, SLURM not on
PATH, a job folder inside the run directory or with a name that is not UTF-8, a job whose ranks the
recipe's batch does not fit, the same run submitted while its job is still queued. Each is refused
in one line before anything is queued; no SLURM cluster is used (a fake `sbatch`/`srun`/`squeue`
on PATH stands in)."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import MINIMAL_RECIPE, fake_bin, small_recipe

from qlora_sft.errors import UserError


@pytest.fixture()
def slurm_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sbatch` and `srun` on PATH (sbatch records its calls in sbatch.log and answers job 4242);
    `squeue` prints the lines of squeue.txt, if any; `scontrol show partition` those of partitions.txt
    (none: no partition is known, nothing checked), `scontrol show config` config.txt, `sinfo` nodes.txt,
    `sacctmgr` qos.txt (none: it fails)."""
    log = tmp_path / "sbatch.log"
    here = shlex.quote(str(tmp_path))
    bin_dir = fake_bin(
        tmp_path / "bin",
        sbatch=f'echo "$@" >> {shlex.quote(str(log))}\necho "Submitted batch job 4242"\n',
        srun="exit 0\n",
        squeue=f"cat {here}/squeue.txt 2>/dev/null\nexit 0\n",
        scontrol=f'case "$*" in *config*) cat {here}/config.txt ;; *) cat {here}/partitions.txt ;; esac 2>/dev/null\n'
        "exit 0\n",
        sinfo=f"cat {here}/nodes.txt 2>/dev/null\nexit 0\n",
        sacctmgr=f"cat {here}/qos.txt 2>/dev/null && exit 0\n"
        "echo 'sacctmgr: error: Problem talking to the database' >&2\nexit 1\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_sbatch_refusing_the_job_is_one_line_not_a_traceback(tmp_path: Path, slurm_bin: Path):
    """Was: `submit --partition gpuu` (or any setting sbatch refuses, or a host that cannot reach the
    controller): submitit's FailedJobError came out as a Python traceback. Now sbatch's own words, in
    a UserError that says nothing was queued and which settings to fix."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    (tmp_path / "bin" / "sbatch").write_text(
        "#!/usr/bin/env bash\necho 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
        "exit 1\n"
    )
    refused = r"(?s)sbatch refused the job; nothing was queued.*Invalid partition.*--partition"
    with pytest.raises(UserError, match=refused):
        submit(recipe, [], cluster="slurm", partition="gpuu", time="01:00:00")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"partition": "gpu"}, r"SLURM is not on this host's PATH.*cluster.partition \(--partition\).*--cluster local"),
        ({"nodes": 2}, r"SLURM is not on this host's PATH.*cluster.nodes=2"),
        ({"cluster": "slurm"}, r"submit --cluster slurm: srun and sbatch are not on PATH"),
        ({"cluster": "local", "nodes": 2}, r"submit --cluster local: cluster.nodes is 2 .*--nodes 1"),
    ],
    ids=["auto-partition", "auto-nodes", "slurm", "local-nodes"],
)
def test_slurm_not_on_path_is_said_not_trained_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict, expected: str
):
    """A login node where SLURM's module was not loaded: `submit --partition gpu` started the training
    on the login node itself (partition dropped, 'submitted job <pid>'); `--nodes 2` and
    `--cluster slurm` were tracebacks (submitit's ValueError, RuntimeError). Now each is refused, and
    nothing starts."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path / "empty-bin")))
    kwargs = {"gpus_per_node": 0, "time": "01:00:00", **kwargs}
    with pytest.raises(UserError, match=expected):
        submit(recipe, [], **kwargs)
    assert not (tmp_path / "runs").exists()
    if kwargs.get("cluster") == "slurm":  # sbatch found, srun not: only srun is named missing
        monkeypatch.setenv("PATH", str(fake_bin(tmp_path / "sbatch-bin", sbatch="exit 1\n")))
        with pytest.raises(UserError, match=r"submit --cluster slurm: srun is not on PATH .*submitit needs both"):
            submit(recipe, [], **kwargs)
        assert not (tmp_path / "runs").exists()


def test_a_job_folder_inside_the_run_directory_is_refused(tmp_path: Path, slurm_bin: Path):
    """`--folder runs/run/logs`: the job was queued, and its logs made the run directory exist before
    the run did; the job then refused to start in it ('not a qlora-sft run', after getting its nodes),
    and so did every launch after it. Refused before anything is written; outside it, queued."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    run_dir = tmp_path / "runs" / "run"
    with pytest.raises(UserError, match=r"job folder .*runs/run/logs is inside the run directory .*--folder"):
        submit(recipe, [], cluster="slurm", time="01:00:00", folder=str(run_dir / "logs"))
    assert not run_dir.exists() and not slurm_bin.exists()
    assert submit(recipe, [], cluster="slurm", time="01:00:00", folder=str(tmp_path / "logs")).job_id == "4242"


def test_a_job_folder_whose_name_is_not_utf8_is_refused(tmp_path: Path, slurm_bin: Path, monkeypatch):
    """Submitted from a folder named in Latin-1 (`dir \\xff`) with a relative run.output_dir (or with
    --folder there): submitit's UnicodeEncodeError traceback as it wrote the sbatch script, after
    every other check."""
    from qlora_sft.submit import submit

    weird = Path(os.fsdecode(bytes(tmp_path) + b"/dir \xff"))
    weird.mkdir()
    recipe = small_recipe(weird)
    monkeypatch.chdir(weird)
    with pytest.raises(UserError, match=r"job folder .*dir \\xff.* not UTF-8.*--folder"):
        submit(recipe, ["run.output_dir=runs"], cluster="slurm", time="01:00:00")
    assert not slurm_bin.exists()
    assert submit(recipe, ["run.output_dir=runs"], cluster="slurm", time="01:00:00", folder=tmp_path / "jobs").job_id


def test_ranks_the_global_batch_does_not_fit_are_refused_before_queueing(tmp_path: Path, slurm_bin: Path):
    """`train.global_batch_size: 32` with `--gpus-per-node 3`: 3 ranks x micro batch 4 do not divide 32;
    the job was queued and refused by its first step once it had its nodes. Now refused by submit,
    naming the batch and the flags; ranks that fit are queued."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path, train={"global_batch_size": 32, "per_device_train_batch_size": 4})
    with pytest.raises(UserError, match=r"job's 3 rank\(s\).*global_batch_size` is 32.*--gpus-per-node"):
        submit(recipe, [], cluster="slurm", gpus_per_node=3, time="01:00:00")
    assert not slurm_bin.exists()
    assert submit(recipe, [], cluster="slurm", gpus_per_node=2, nodes=2, time="01:00:00").job_id == "4242"


def test_deepspeed_accumulation_for_other_ranks_is_refused_before_queueing(
    tmp_path: Path, slurm_bin: Path, monkeypatch: pytest.MonkeyPatch
):
    """A DeepSpeed JSON written for 8 GPUs (gradient_accumulation_steps 2 = 64 / (4 x 8)) submitted on 2:
    the recipe needs 8 steps of accumulation, which only the job's first step found."""
    import json

    from qlora_sft import launch_config
    from qlora_sft.submit import submit

    monkeypatch.setattr(launch_config, "require_deepspeed", lambda what: None)  # not installed here
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_batch_size": 64,
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
                "zero_optimization": {"stage": 2},
            }
        )
    )
    recipe = small_recipe(tmp_path, train={"global_batch_size": 64, "per_device_train_batch_size": 4})
    with pytest.raises(UserError, match=r"job's 2 rank\(s\).*gradient_accumulation_steps` is 2 .* needs 8"):
        submit(recipe, [], cluster="slurm", gpus_per_node=2, time="01:00:00", deepspeed=ds)
    assert not slurm_bin.exists()
    assert submit(recipe, [], cluster="slurm", gpus_per_node=8, time="01:00:00", deepspeed=ds).job_id == "4242"


def test_the_same_run_submitted_while_its_job_is_queued_is_refused(tmp_path: Path, slurm_bin: Path):
    """Submitting again while the first job still waits: the second waited too, then started beside the
    first (refused the run directory) or after it (found the run trained), each after getting its
    nodes. Refused while squeue still lists the job; queued once it left, or chained after it."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    assert submit(recipe, [], cluster="slurm", time="01:00:00").job_id == "4242"
    assert (tmp_path / "runs" / "run.submitit" / "4242" / "4242_submitted.pkl").is_file()
    (tmp_path / "squeue.txt").write_text("977 RUNNING\n4242 PENDING\n")
    with pytest.raises(UserError, match=r"job 4242 \(PENDING\) of this run .*is still in SLURM's queue.*scancel 4242"):
        submit(recipe, [], cluster="slurm", time="01:00:00")
    assert len(slurm_bin.read_text().splitlines()) == 1
    after = submit(recipe, [], cluster="slurm", time="01:00:00", extra_sbatch=["--dependency=afterany:4242"])
    assert after.job_id == "4242"
    (tmp_path / "squeue.txt").write_text("977 RUNNING\n4242 COMPLETING\n")  # it has trained: its processes end
    assert submit(recipe, [], cluster="slurm", time="01:00:00").job_id == "4242"
    (tmp_path / "squeue.txt").write_text("977 RUNNING\n")
    assert submit(recipe, [], cluster="slurm", time="01:00:00").job_id == "4242"


@pytest.mark.parametrize("key", ["partition", "account", "qos", "constraint"])
def test_an_empty_cluster_value_is_refused_not_dropped(key: str):
    """`--partition "$PART"` with PART unset: the empty value was dropped and the job went to the
    default partition, unsaid."""
    from qlora_sft.recipe import build_recipe
    from qlora_sft.submit import executor_parameters

    with pytest.raises(UserError, match=rf"cluster.{key} is empty"):
        executor_parameters(build_recipe(MINIMAL_RECIPE).cluster, **{key: ""})


@pytest.mark.parametrize("text", ["time: 1:00:00", "time: 90"])
def test_an_unquoted_time_limit_in_the_recipe_says_to_quote_it(tmp_path: Path, text: str):
    """`time: 1:00:00` unquoted is YAML 1.1's base-60 number 3600: the message was '`cluster.time` is
    3600; expected str', a number the user never wrote, and no fix."""
    from qlora_sft.errors import RecipeError
    from qlora_sft.recipe import load_recipe

    recipe = small_recipe(tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**raw, "cluster": None}).replace("cluster: null", f"cluster:\n  {text}"))
    with pytest.raises(RecipeError, match=r'cluster.time` is the number \d+: write the time in quotes, e.g. time: "04'):
        load_recipe(recipe)


@pytest.mark.parametrize(
    "option", ["--nodes", "--gpus-per-node", "--tasks-per-node", "--cpus-per-task"], ids=lambda o: o.strip("-")
)
def test_a_count_past_what_slurm_takes_is_refused_naming_the_option(
    tmp_path: Path, slurm_bin: Path, capsys: pytest.CaptureFixture, option: str
):
    """`submit --nodes 99999999999999999999999`: an OverflowError traceback from inside submitit, after
    sbatch had queued the job (submitit makes one object per task once sbatch answers). A count
    SLURM wraps (its counts are 16- and 32-bit: `sbatch --nodes=4294967296` asks for 0 nodes) is
    refused in one line naming the option, before anything is written."""
    from qlora_sft.cli import main

    recipe = small_recipe(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["submit", str(recipe), "--cluster", "slurm", "--time", "01:00:00", option, "99999999999999999999999"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(rf"argument {option}: '99999999999999999999999' .*at most 65535", err), err
    assert not slurm_bin.exists() and not (tmp_path / "runs").exists()


def test_a_count_past_what_slurm_takes_in_the_recipe_or_the_api_is_refused(tmp_path: Path, slurm_bin: Path):
    """The same counts from the recipe's cluster section, or from `submit(nodes=...)` in Python."""
    from qlora_sft.errors import RecipeError
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path, cluster={"nodes": 2**32, "time": "01:00:00"})
    with pytest.raises(RecipeError, match=r"`cluster.nodes` is 4294967296; it must be <= 65535"):
        submit(recipe, [], cluster="slurm")
    recipe = small_recipe(tmp_path, cluster={"time": "01:00:00"})
    with pytest.raises(UserError, match=r"cluster.tasks_per_node=70000 \(--tasks-per-node\).*at most 65535"):
        submit(recipe, [], cluster="slurm", gpus_per_node=0, tasks_per_node=70000)
    assert not slurm_bin.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("existed", [True, False], ids=["folder-existed", "new-folder"])
def test_a_refused_submission_leaves_nothing_in_the_job_folder(tmp_path: Path, slurm_bin: Path, existed: bool):
    """sbatch refusing the job left submitit's `.submission_file_<id>.sh` and `<id>.pkl` in the job
    folder, a pair per refused try. What this submission wrote goes; what was there stays; a job
    folder it made and left empty goes too."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    (tmp_path / "bin" / "sbatch").write_text(
        "#!/usr/bin/env bash\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\nexit 1\n"
    )
    folder = tmp_path / "jobs" / "logs"
    before: set[str] = set()
    if existed:  # an earlier job's files, and a user's own that look like submitit's
        (folder / "4242").mkdir(parents=True)
        for name in (
            ".submission_file_0123456789abcdef0123456789abcdef.sh",
            "0123456789abcdef0123456789abcdef.pkl",
            "notes.pkl",
            "4242/x",
        ):
            (folder / name).write_text("mine\n")
        before = {str(p.relative_to(folder)) for p in folder.rglob("*")}
    with pytest.raises(UserError, match=r"sbatch refused the job; nothing was queued"):
        submit(recipe, [], cluster="slurm", time="01:00:00", account="nope", folder=str(folder))
    if existed:
        assert {str(p.relative_to(folder)) for p in folder.rglob("*")} == before
    else:
        assert not folder.exists() and not (tmp_path / "jobs").exists()


def test_wait_on_a_job_that_fails_names_the_job_its_logs_and_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """`submit --wait` on a job that fails (here: a model that only the job loads, and cannot):
    submitit's FailedJobError came out as a traceback of the submitting process holding the job's.
    Now one message: the job, its log files, the last lines of its error; exit 1."""
    from qlora_sft.cli import main

    recipe = small_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["submit", str(recipe), "--cluster", "local", "--gpus-per-node", "0", "--time", "10", "--wait"])
    out, err = capsys.readouterr()
    job = re.search(r"submitted job (\d+)", out).group(1)  # type: ignore[union-attr]
    assert code == 1, err
    assert "Traceback" not in err, err
    logs = tmp_path / "runs" / "run.submitit" / job
    assert (
        f"job {job} failed" in err and str(logs / f"{job}_0_log.err") in err and str(logs / f"{job}_0_log.out") in err
    )
    assert re.search(r"UserError: model.name_or_path='m': could not load its tokenizer", err), err


def test_wait_prints_rank_0s_result_of_a_job_of_several_tasks(monkeypatch: pytest.MonkeyPatch, capsys):
    """`submit --wait --tasks-per-node 2`: submitit's `job.result()` is for one task only; a job of
    several ended (after training) in its AssertionError 'You should use `results()`'."""
    import submitit

    from qlora_sft import cli

    submit_module = importlib.import_module("qlora_sft.submit")  # (the package's `submit` is the function)

    class TwoTasks(submitit.Job):
        def __init__(self, folder: Path = Path("/nowhere"), job_id: str = "77", tasks: tuple = (0, 1)) -> None:
            super().__init__(folder=folder, job_id=job_id, tasks=tasks)

        def wait(self) -> None:
            pass

        def exception(self) -> None:
            return None

        def results(self) -> list:
            return [{"global_step": 3, "rank": 0}, {"global_step": 3, "rank": 1}]

    monkeypatch.setattr(submit_module, "submit", lambda *a, **k: TwoTasks())
    assert cli.main(["submit", "r.yaml", "--wait"]) == 0
    assert "result: {'global_step': 3, 'rank': 0}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("squeue", "said"),
    [
        ("echo 'slurm_load_jobs error: Unable to contact controller' >&2\nexit 1\n", r"squeue exited 1 \(.*Unable"),
        ("exec sleep 30\n", r"squeue did not answer within 1 s"),
        (None, r"squeue is not on PATH"),
    ],
    ids=["exits-1", "times-out", "missing"],
)
def test_squeue_failing_is_warned_not_silent(
    tmp_path: Path,
    slurm_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    squeue: str | None,
    said: str,
):
    """squeue failing (the controller unreachable, not answering, not on PATH) skipped the check for
    a job of the same run still queued, without a word: a second job could be queued unsaid."""
    import logging

    from qlora_sft.submit import submit

    submit_module = importlib.import_module("qlora_sft.submit")
    recipe = small_recipe(tmp_path)
    assert submit(recipe, [], cluster="slurm", time="01:00:00").job_id == "4242"
    if squeue is None:  # a PATH of the fakes and bash alone (the system's squeue is in /usr/bin)
        (tmp_path / "bin" / "squeue").unlink()
        (tmp_path / "shell").mkdir()
        (tmp_path / "shell" / "bash").symlink_to(shutil.which("bash"))
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{tmp_path / 'shell'}")
    else:
        fake_bin(tmp_path / "bin", squeue=squeue)
    monkeypatch.setattr(submit_module, "SLURM_QUERY_TIMEOUT_S", 1)
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert submit(recipe, [], cluster="slurm", time="01:00:00").job_id == "4242"
    assert re.search(rf"{said}.*job\(s\) 4242 .*a second job of this run may be queued", caplog.text), caplog.text


@pytest.mark.parametrize("cluster", [None, "slurm"], ids=["auto", "slurm"])
def test_srun_without_sbatch_on_path_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster: str | None
):
    """A partial SLURM client (srun on PATH, sbatch not): submit chose SLURM (submitit looks for srun
    alone), wrote the job folder, its pickle and script, then came out as submitit's FileNotFoundError
    traceback as it ran sbatch. Refused in one line naming sbatch, with nothing written."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    fake_bin(tmp_path / "bin", srun="exit 0\n")
    (tmp_path / "bin" / "bash").symlink_to(shutil.which("bash"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(UserError, match=r"srun is on PATH but sbatch is not.*module load slurm.*nothing was queued"):
        submit(recipe, [], cluster=cluster, time="01:00:00")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        ("99999-00:00:00", r"cluster.time='99999-00:00:00' \(--time\) is more than SLURM's longest limit, 24855-03:13"),
        ("35791394", r"cluster.time='35791394' \(--time\) is more than SLURM's longest limit"),
        ("UNLIMITED", r"cluster.time='UNLIMITED' \(--time\) is SLURM's no time limit, which submit cannot ask for"),
        ("infinite", r"cluster.time='infinite' \(--time\) is SLURM's no time limit"),
    ],
    ids=["days", "minutes", "unlimited", "infinite"],
)
def test_a_time_limit_past_what_slurm_reads_is_refused_naming_the_option(
    tmp_path: Path, slurm_bin: Path, time: str, expected: str
):
    """`--time 99999-00:00:00`: passed to sbatch, which counts the limit in seconds in a signed 32-bit
    int: past 24855 days it overflows, and sbatch refuses it or reads another limit (a wrap onto -1 is
    no limit at all). `UNLIMITED`/`INFINITE` (SLURM's no limit) were 'use minutes, HH:MM:SS...', as if
    misspelt. Limits SLURM reads pass, the longest included."""
    from qlora_sft.submit import parse_time, submit

    recipe = small_recipe(tmp_path)
    with pytest.raises(UserError, match=expected):
        submit(recipe, [], cluster="slurm", time=time)
    assert not slurm_bin.exists() and not (tmp_path / "runs").exists()
    assert parse_time("7-00:00:00") == 7 * 1440 and parse_time("30-00:00:00") == 30 * 1440
    assert parse_time("35791393") == parse_time("24855-03:13:00") == 35791393


def test_ctrl_c_while_waiting_on_a_slurm_job_says_it_goes_on_and_how_to_follow_or_cancel_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """Ctrl-C during `submit --wait`: the job goes on in SLURM (rightly), but the line said only
    'interrupted', as if it had stopped too. Now it names the job, that it is still queued or running,
    how to follow it (squeue, its logs) and to cancel it (scancel); exit 130, no traceback."""
    import submitit

    from qlora_sft import cli

    submit_module = importlib.import_module("qlora_sft.submit")

    class Waiting(submitit.SlurmJob):
        def wait(self) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(submit_module, "submit", lambda *a, **k: Waiting(folder=Path("/jobs/%j"), job_id="77"))
    assert cli.main(["submit", "r.yaml", "--wait"]) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.search(
        r"interrupted\. Job 77 is still queued or running in SLURM.*squeue -j 77.*/jobs/77/77_0_log.out.*"
        r"/jobs/77/77_0_log.err.*scancel 77",
        err,
    ), err


def test_ctrl_c_while_waiting_on_a_local_job_says_whether_it_stopped(tmp_path: Path):
    """--cluster local: submitit starts the job's controller in this terminal's process group, so a
    Ctrl-C there reaches it too, and it stops the tasks; a SIGINT to the submitting process alone
    leaves it running. The line says which, from the job's state."""
    import signal
    import time

    import submitit

    from qlora_sft.submit import interrupted_wait_note

    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    executor.update_parameters(timeout_min=1)
    running = executor.submit(time.sleep, 30)
    note = interrupted_wait_note(running, settle_s=1)
    assert re.search(rf"local job {running.job_id} is still running.*kill -INT {running.job_id}", note), note
    stopped = executor.submit(time.sleep, 30)
    os.kill(int(stopped.job_id), signal.SIGINT)  # what the terminal's Ctrl-C sends it
    note = interrupted_wait_note(stopped, settle_s=10)
    assert re.search(rf"local job {stopped.job_id} stopped with it.*Submit again", note), note
    running.cancel()
    running.wait()


# A cluster as `scontrol --all --oneliner show partition` and `sinfo --Node --format=%R|%c|%G` show it: gpu
# (the default: 4 nodes of 64 CPUs, 4 or 8 GPUs of several types), cpu (2 nodes without GPUs), long (no limits).
PARTITIONS = """\
PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL Default=YES QoS=N/A DefaultTime=NONE MaxNodes=2 \
MaxTime=1-00:00:00 MinNodes=0 MaxCPUsPerNode=UNLIMITED Nodes=g[1-4] State=UP TotalCPUs=256 TotalNodes=4 \
TRES=cpu=256,mem=1000G,node=4,billing=256,gres/gpu=24
PartitionName=cpu AllowGroups=ALL Default=NO QoS=N/A MaxNodes=UNLIMITED MaxTime=01:00:00 MaxCPUsPerNode=4 \
MaxMemPerNode=16000 Nodes=c[1-2] State=UP TotalCPUs=16 TotalNodes=2
PartitionName=long AllowGroups=ALL Default=NO QoS=N/A MaxNodes=UNLIMITED MaxTime=UNLIMITED Nodes=g[1-4] State=UP \
TotalCPUs=256 TotalNodes=4
"""
NODES = """\
gpu|64|gpu:a100:4(S:0-1)
gpu|64|gpu:a100:4(S:0-1)
gpu|64|gpu:h100:4(S:0),gpu:a100:4(S:1),shard:16
gpu|64|gpu:8
cpu|8|(null)
cpu|8|(null)
long|64|gpu:8
"""


@pytest.fixture()
def partitions(tmp_path: Path, slurm_bin: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake SLURM of `slurm_bin` with the partitions above, and no accounting (no QOS)."""
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    (tmp_path / "partitions.txt").write_text(PARTITIONS)
    (tmp_path / "nodes.txt").write_text(NODES)
    (tmp_path / "config.txt").write_text("AccountingStorageType   = accounting_storage/none\n")
    return slurm_bin


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"time": "2-00:00:00"},
            r"SLURM's default partition gpu can never run this job, so SLURM would queue it and leave it pending for "
            r"ever: cluster.time \(--time\) is 2-00:00:00, longer than its MaxTime=1-00:00:00; give --time "
            r"1-00:00:00 or less \(squeue would say Reason=PartitionTimeLimit\)\. Or choose another partition",
        ),
        ({"nodes": 3}, r"cluster.nodes=3 \(--nodes\) is more than its MaxNodes=2; give --nodes 2 or fewer"),
        (
            {"partition": "cpu", "nodes": 3, "gpus_per_node": 0},
            r"cluster.partition=cpu \(--partition\) can never run .*cluster.nodes=3 \(--nodes\) is more than the 2 "
            r"node\(s\) it has; give --nodes 2 or fewer",
        ),
        (
            {"gpus_per_node": 16},
            r"cluster.gpus_per_node=16 \(--gpus-per-node\), but its nodes have 8 at most; give --gpus-per-node 8 or "
            r"fewer \(squeue would say Reason=BadConstraints\)",
        ),
        (
            {"partition": "cpu", "gpus_per_node": 1},
            r"cluster.gpus_per_node=1 \(--gpus-per-node\), but none of its 2 node\(s\) has a GPU; give "
            r"--gpus-per-node 0 for CPU ranks",
        ),
        (
            {"gpus_per_node": 8, "cpus_per_task": 16},
            r"8 task\(s\) per node x 16 CPU\(s\) per task .*is 128 CPUs on a node, but its nodes have 64 at most.*"
            r"Reason=PartitionConfig",
        ),
        (
            {"partition": "cpu,gpu", "time": "2-00:00:00", "gpus_per_node": 0},
            r"cluster.partition=cpu,gpu \(--partition\): none of these partitions can ever run.*partition cpu: "
            r"cluster.time .*MaxTime=01:00:00.*; partition gpu: cluster.time .*MaxTime=1-00:00:00",
        ),
        # (its nodes have 8 CPUs; SLURM 22.05 leaves the job pending with Reason=PartitionConfig)
        (
            {"partition": "cpu", "gpus_per_node": 0, "cpus_per_task": 6},
            r"1 task\(s\) per node x 6 CPU\(s\) per task .*is 6 CPUs on a node, more than its "
            r"MaxCPUsPerNode=4; ask for 4 or fewer \(squeue would say Reason=PartitionConfig\)",
        ),
        # (SLURM 22.05 queues --mem past MaxMemPerNode, pending with Reason=MaxMemPerLimit)
        (
            {"partition": "cpu", "gpus_per_node": 0, "mem": "20G"},
            r"cluster.mem=20G \(--mem\) is more than its MaxMemPerNode=16000 \(megabytes\); give --mem 16000M "
            r"or less \(squeue would say Reason=MaxMemPerLimit\)",
        ),
    ],
    ids=["time", "max-nodes", "total-nodes", "gpus", "no-gpus", "cpus", "every-partition", "max-cpus", "max-mem"],
)
def test_a_job_past_its_partitions_limits_is_refused_not_left_pending(
    tmp_path: Path, partitions: Path, kwargs: dict, expected: str
):
    """`submit --time 2-00:00:00` on a partition of MaxTime=1-00:00:00 (or more nodes, GPUs or CPUs per
    node than it has or allows): SLURM (EnforcePartLimits=NO, its default) queued the job, and it stayed
    PENDING for ever (Reason=PartitionTimeLimit, PartitionNodeLimit, BadConstraints, PartitionConfig),
    the user waiting for hours. Refused, naming the option, the partition's limit and the fix."""
    from qlora_sft.submit import submit

    recipe = small_recipe(tmp_path)
    with pytest.raises(UserError, match=rf"(?s)submit: .*{expected}.*nothing was queued"):
        submit(recipe, [], cluster="slurm", **{"time": "01:00:00", **kwargs})
    assert not partitions.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"time": "1-00:00:00", "nodes": 2, "gpus_per_node": 8, "cpus_per_task": 8},
        {"partition": "long", "time": "30-00:00:00", "nodes": 4},
        {"partition": "cpu,gpu", "time": "02:00:00", "gpus_per_node": 0},  # (gpu can run it)
        {"gpus_per_node": 8, "cpus_per_task": 16, "extra_sbatch": ["--overcommit"]},  # (tasks share CPUs)
        {"partition": "nope", "time": "3-00:00:00"},  # (unknown: sbatch says so)
        # (at its MaxCPUsPerNode=4, within its MaxMemPerNode=16000)
        {"partition": "cpu", "time": "01:00:00", "gpus_per_node": 0, "cpus_per_task": 4, "mem": "15625M"},
        {"partition": "cpu", "time": "01:00:00", "gpus_per_node": 0, "mem": "0"},  # (all of a node's memory)
    ],
    ids=["at-the-limits", "unlimited", "one-of-two", "overcommit", "unknown-partition", "at-cpu-mem", "mem-0"],
)
def test_a_job_within_its_partitions_limits_is_queued(tmp_path: Path, partitions: Path, kwargs: dict):
    from qlora_sft.submit import submit

    assert submit(small_recipe(tmp_path), [], cluster="slurm", **kwargs).job_id == "4242"


def test_sbatch_partition_in_the_environment_is_the_partition_checked(
    tmp_path: Path, partitions: Path, monkeypatch: pytest.MonkeyPatch
):
    """SBATCH_PARTITION (a site's module may set it) is what sbatch reads over the script's --partition:
    where submit is given no partition, it is the partition whose limits are checked; where submit is given
    another one, the environment check refuses first (sbatch would silently replace it)."""
    from qlora_sft.submit import submit

    monkeypatch.setenv("SBATCH_PARTITION", "cpu")
    with pytest.raises(UserError, match=r"SBATCH_PARTITION=cpu \(sbatch reads it over --partition\) can never run"):
        submit(small_recipe(tmp_path), [], cluster="slurm", time="02:00:00", gpus_per_node=1)
    with pytest.raises(UserError, match=r"SBATCH_PARTITION='cpu' would replace --partition gpu"):
        submit(small_recipe(tmp_path), [], cluster="slurm", partition="gpu", time="02:00:00", gpus_per_node=0)
    # the same for the memory: SBATCH_MEM_PER_NODE is what sbatch asks for
    monkeypatch.setenv("SBATCH_MEM_PER_NODE", "20G")
    with pytest.raises(UserError, match=r"SBATCH_MEM_PER_NODE=20G \(sbatch reads it over --mem\) is more than its "):
        submit(small_recipe(tmp_path), [], cluster="slurm", time="01:00:00", gpus_per_node=0)
    assert not partitions.exists()


@pytest.mark.parametrize(
    ("qos", "refused"),
    [
        ("normal|\nlong|DenyOnLimit,PartitionTimeLimit\n", None),
        ("normal|\nbig|PartitionMaxNodes\n", "cluster.time"),  # (another flag: refused)
        (None, None),  # (sacctmgr fails: not known)
    ],
    ids=["qos-lifts-it", "qos-without-the-flag", "sacctmgr-fails"],
)
def test_a_time_limit_a_qos_may_lift_is_warned_not_refused(
    tmp_path: Path, partitions: Path, caplog: pytest.LogCaptureFixture, qos: str | None, refused: str | None
):
    """With accounting, a QOS with the PartitionTimeLimit flag lets its jobs past the partition's
    MaxTime: such a job is queued with a warning saying so; without one it is refused. A GPU count no
    node has is refused whatever the QOS."""
    import logging

    from qlora_sft.submit import submit

    (tmp_path / "config.txt").write_text("AccountingStorageType   = accounting_storage/slurmdbd\n")
    if qos is not None:
        (tmp_path / "qos.txt").write_text(qos)
    recipe = small_recipe(tmp_path)
    if refused:
        with pytest.raises(UserError, match=rf"{refused}.*MaxTime=1-00:00:00"):
            submit(recipe, [], cluster="slurm", time="2-00:00:00")
        return
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert submit(recipe, [], cluster="slurm", time="2-00:00:00").job_id == "4242"
    why = "QOS long lift.s. it .PartitionTimeLimit flag" if qos else "whether a QOS lifts it .* sacctmgr exited 1"
    assert re.search(
        rf"default partition gpu cannot run this job as it is set: .*MaxTime=1-00:00:00.*{why}", caplog.text
    )
    with pytest.raises(UserError, match=r"cluster.gpus_per_node=16 .*its nodes have 8 at most"):
        submit(recipe, [], cluster="slurm", time="2-00:00:00", gpus_per_node=16)


@pytest.mark.parametrize(
    ("tool", "body", "said"),
    [
        (
            "scontrol",
            "echo 'slurm_load_partitions: Unable to contact slurm controller' >&2\nexit 1\n",
            r"scontrol exited 1 \(.*Unable",
        ),
        (
            "scontrol",
            "exec sleep 30\n",
            r"scontrol did not answer within 1 s, so whether SLURM's default partition can",
        ),
        (
            "sinfo",
            "echo 'sinfo: error: Unable to contact slurm controller' >&2\nexit 1\n",
            r"sinfo exited 1 .*so whether the nodes of SLURM's default partition gpu have the GPUs and CPUs",
        ),
    ],
    ids=["scontrol-exits-1", "scontrol-times-out", "sinfo-exits-1"],
)
def test_partition_limits_that_cannot_be_read_are_warned_not_refused(
    tmp_path: Path,
    partitions: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tool: str,
    body: str,
    said: str,
):
    import logging

    from qlora_sft.submit import submit

    submit_module = importlib.import_module("qlora_sft.submit")
    fake_bin(tmp_path / "bin", **{tool: body})
    monkeypatch.setattr(submit_module, "SLURM_QUERY_TIMEOUT_S", 1)
    recipe = small_recipe(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert submit(recipe, [], cluster="slurm", gpus_per_node=16).job_id == "4242"
    assert re.search(rf"{said}.* is not checked", caplog.text), caplog.text
    if tool == "sinfo":  # (the partition's own limits are still read)
        with pytest.raises(UserError, match=r"cluster.time \(--time\) is 2-00:00:00, longer than its MaxTime"):
            submit(recipe, [], cluster="slurm", time="2-00:00:00")


def test_the_same_run_queued_from_another_job_folder_is_refused(tmp_path: Path, slurm_bin: Path):
    """`submit --folder jobs-b` for a run whose job was queued from `jobs-a` (or from the default
    folder): the check looked only into the job folder it was given, so a second job was queued, waited
    its turn, and was then refused the run directory by the first one's lock. Each job now carries the
    run's tag as its SLURM comment, which squeue reads back from any folder; another run's job, or one
    of another comment, does not stop it; a user's own --comment stays theirs."""
    from qlora_sft.submit import run_tag, submit

    recipe = small_recipe(tmp_path)
    tag = run_tag(tmp_path / "runs" / "run")
    assert submit(recipe, [], cluster="slurm", time="01:00:00", folder=tmp_path / "jobs-a").job_id == "4242"
    script = (tmp_path / "jobs-a" / "4242" / "4242_submission.sh").read_text()
    assert f"#SBATCH --comment={tag}\n" in script, script  # (what sbatch reads; squeue's %k shows it)
    (tmp_path / "squeue.txt").write_text(f"977 RUNNING qlora-sft-run:0123456789abcdef0123\n555 PENDING {tag}\n")
    with pytest.raises(UserError, match=r"job 555 \(PENDING\) of this run \(run directory .*runs/run\) is still in"):
        submit(recipe, [], cluster="slurm", time="01:00:00", folder=tmp_path / "jobs-b")
    assert len(slurm_bin.read_text().splitlines()) == 1 and not (tmp_path / "jobs-b").exists()
    other = submit(recipe, ["run.name=other"], cluster="slurm", time="01:00:00", folder=tmp_path / "jobs-b")
    assert other.job_id == "4242"
    mine = submit(recipe, ["run.name=mine"], cluster="slurm", time="01:00:00", extra_sbatch=["--comment=my note"])
    assert "#SBATCH --comment='my note'\n" in Path(mine.paths.submission_file).read_text()


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"SBATCH_TIMELIMIT": "7"}, r"SBATCH_TIMELIMIT='7' would replace --time 01:00:00 \(cluster\.time\)"),
        ({"SBATCH_PARTITION": "short"}, r"SBATCH_PARTITION='short' would replace --partition gpu"),
        ({"SBATCH_SIGNAL": "B:TERM@60"}, r"SBATCH_SIGNAL='B:TERM@60' would replace --signal=USR2@\d+"),
        ({"SBATCH_NO_REQUEUE": "1"}, r"SBATCH_NO_REQUEUE='1' would forbid the requeue"),
        ({"SBATCH_OPEN_MODE": "truncate"}, r"SBATCH_OPEN_MODE='truncate' would replace --open-mode=append"),
    ],
)
def test_sbatch_variables_of_the_shell_that_would_replace_submits_options_are_refused(
    tmp_path: Path, slurm_bin: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], said: str
):
    """sbatch reads SBATCH_* variables over the #SBATCH lines submitit writes (seen on SLURM 22.05:
    SBATCH_TIMELIMIT=7 made a --time=5 job's limit 7 minutes). Was: queued with another time limit or
    partition than submit checked and printed, or without what a resumable job needs (its USR2
    signal, its requeue, logs appended across requeues). Now refused before sbatch runs, naming the
    variable, the option it replaces and `unset`."""
    from qlora_sft.submit import submit

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match=rf"(?s){said}.*unset {next(iter(env))}.*nothing was queued"):
        submit(small_recipe(tmp_path), [], cluster="slurm", partition="gpu", time="01:00:00")
    assert not slurm_bin.exists()


@pytest.mark.parametrize(
    "env",
    [
        {"SBATCH_TIMELIMIT": "60"},  # the same limit, written otherwise
        {"SBATCH_ACCOUNT": "lab"},  # an option submit leaves unset: SLURM's to read
        {"SBATCH_NO_REQUEUE": "0"},  # a flag's variable sbatch does not read as set
        {"SBATCH_OPEN_MODE": "append", "SBATCH_SIGNAL": "SIGUSR2@300"},  # (cluster.signal_grace_s: 300 s),
    ],
)
def test_sbatch_variables_that_agree_with_submit_are_queued(
    tmp_path: Path, slurm_bin: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
):
    from qlora_sft.submit import submit

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    recipe = small_recipe(tmp_path)
    submit(recipe, [], cluster="slurm", partition="gpu", time="01:00:00")
    assert slurm_bin.exists()  # sbatch ran: queued


def test_a_partition_that_is_down_is_queued_with_a_warning(
    tmp_path: Path, partitions: Path, caplog: pytest.LogCaptureFixture
):
    """A partition an administrator set DOWN takes the job and starts nothing (Reason=PartitionDown):
    it is queued (the partition may come back up), with a warning that names it and the way out. One
    of two partitions down says nothing: the other can run it."""
    import logging

    from qlora_sft.submit import submit

    (tmp_path / "partitions.txt").write_text(PARTITIONS.replace("Nodes=g[1-4] State=UP", "Nodes=g[1-4] State=DOWN", 1))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert submit(small_recipe(tmp_path), [], cluster="slurm", time="02:00:00").job_id == "4242"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "SLURM's default partition gpu is State=DOWN" in said and "Reason=PartitionDown" in said, said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        submit(small_recipe(tmp_path), [], cluster="slurm", partition="gpu,long", time="02:00:00")
    assert "State=DOWN" not in " ".join(r.getMessage() for r in caplog.records)
