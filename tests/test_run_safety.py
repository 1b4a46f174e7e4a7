"""Nothing lost, nothing silently changed: the run directory under misuse, corruption, bad numbers and
untrusted runs (issue 24). Each test is a case a user hit: export --overwrite next to the run, a
finished run relaunched, two launches at once, a run that diverges, a same-size corrupt file, remote
code named by a copied run directory, changed data under a resume, a full disk, a launch that failed
before training."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, losses_by_step, recipe_dict, write_recipe, write_toy_data

from qlora_sft import checkpoint
from qlora_sft.errors import DataError, RunDirError, UserError
from qlora_sft.export import export
from qlora_sft.recipe import build_recipe, load_recipe, read_run_recipe
from qlora_sft.train import setup_logging, train

SHORT = {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-2}


def recipe_of(tiny_model: Path, root: Path, name: str = "a", **train_args) -> object:
    data = root / "toy.jsonl"
    if not data.exists():
        write_toy_data(data, n=48)
    return build_recipe(recipe_dict(tiny_model, data, root / "runs", run={"name": name}, train={**SHORT, **train_args}))


@pytest.fixture(scope="module")
def finished(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two finished runs side by side, a and b."""
    root = tmp_path_factory.mktemp("safety")
    for name in ("a", "b"):
        train(recipe_of(tiny_model, root, name))
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. export --overwrite never deletes the run or anything it did not create


def test_export_refuses_an_out_that_is_or_holds_the_run(finished: Path):
    runs = finished / "runs"
    before = {name: snapshot(runs / name) for name in ("a", "b")}
    for out, why in [
        (runs, "a folder around the run being exported"),
        (runs / "a", "is the run being exported"),
        (runs / "a" / "checkpoint-2", "belongs to the run"),
        (runs / "a" / "final", "belongs to the run"),
        (runs / "a" / "logs" / "merged", "belongs to the run"),
    ]:
        with pytest.raises(UserError, match=why):
            export(runs / "a", out, overwrite=True)
    with pytest.raises(UserError, match=r"holds a qlora-sft run .*never a run"):
        export(runs / "a", runs / "b", overwrite=True)
    assert {name: snapshot(runs / name) for name in ("a", "b")} == before  # nothing touched


def test_export_overwrite_moves_a_foreign_folder_aside_and_replaces_its_own(finished: Path, tmp_path: Path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    result = export(finished / "runs" / "a", out, overwrite=True)
    assert result.ok and (out / "config.json").is_file() and (out / "qlora-sft-export.json").is_file()
    (aside,) = tmp_path.glob("merged.replaced-*")
    assert (aside / "notes.txt").read_text() == "my notes"  # kept, not deleted
    export(finished / "runs" / "a", out, overwrite=True)  # an earlier export: replaced
    assert not list(tmp_path.glob("merged.old-*")) and len(list(tmp_path.glob("merged.replaced-*"))) == 1


def test_an_interrupted_export_leaves_no_copy_and_the_next_one_sweeps_older_ones(
    finished: Path, tmp_path: Path, monkeypatch, capsys
):
    """An export interrupted after the merge (Ctrl-C or an error during the verification) removes its
    temporary folder, a whole model; the next export removes those that exports killed on this
    machine left (their process gone) and names those of another machine, which it leaves."""
    from qlora_sft import export as export_module

    out = tmp_path / "merged"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(export_module, "verify_merge", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export(finished / "runs" / "a", out)
    assert not out.exists() and not list(tmp_path.glob("merged.tmp-*"))

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f"merged.tmp-{socket.gethostname()}-{dead.pid}"  # as a SIGKILLed export leaves it
    elsewhere = tmp_path / "merged.tmp-another-host-123"
    for folder in (killed, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    setup_logging(True)  # this test's stdout
    capsys.readouterr()
    assert export(finished / "runs" / "a", out).ok
    said = capsys.readouterr().out
    assert not killed.exists() and f"removed {killed}" in said
    assert elsewhere.is_dir() and str(elsewhere) in said and "left alone" in said


def test_a_checkpoint_deleted_while_it_is_exported_is_named(finished: Path, tmp_path: Path):
    """Exporting a checkpoint of a run that is still training with checkpoint.keep_last: retention may
    delete it between the merge and the verification. The export stops naming it (it raised a raw
    ValueError from peft) and leaves no temporary copy of the model."""
    from qlora_sft import export as export_module

    run = tmp_path / "runs" / "a"
    shutil.copytree(finished / "runs" / "a", run)
    real = export_module.verify_merge

    def retention(source, *args, **kwargs):
        shutil.rmtree(source.adapter_dir)  # as apply_retention does once a newer checkpoint is complete
        return real(source, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(export_module, "verify_merge", retention)
        with pytest.raises(UserError, match=r"checkpoint-2 was deleted while it was exported .*keep_last"):
            export(run / "checkpoint-2", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob("merged.tmp-*"))


def test_an_out_that_appears_during_the_export_is_not_replaced_without_overwrite(finished: Path, tmp_path: Path):
    """Two exports to one --out at once: the one that finishes second does not replace the first's
    folder (each checked that --out was free when it started); it keeps its own beside it and says so."""
    from qlora_sft import export as export_module

    out = tmp_path / "merged"
    real = export_module.verify_merge

    def meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        out.mkdir()
        (out / "config.json").write_text('{"torch_dtype": "float32"}')  # another export finished first
        return result

    with pytest.MonkeyPatch.context() as m:
        m.setattr(export_module, "verify_merge", meanwhile)
        with pytest.raises(UserError, match="appeared while this export ran") as refused:
            export(finished / "runs" / "a", out)
    assert (out / "config.json").read_text() == '{"torch_dtype": "float32"}'  # the other one's, untouched
    (kept,) = tmp_path.glob("merged.export-*")
    assert str(kept) in str(refused.value) and (kept / "qlora-sft-export.json").is_file()
    assert not list(tmp_path.glob("merged.tmp-*"))


# 2. a finished run stays finished


def test_relaunching_a_finished_run_does_nothing(finished: Path, tiny_model: Path, capsys):
    run = finished / "runs" / "a"
    before = snapshot(run)
    result = train(recipe_of(tiny_model, finished, "a"))
    assert result.finished and result.global_step == -1
    assert snapshot(run) == before
    out = capsys.readouterr().out
    assert "finished at step 4" in out and "raise train.max_steps" in out
    recipe = recipe_of(tiny_model, finished, "a")
    named = dataclasses.replace(
        recipe, checkpoint=dataclasses.replace(recipe.checkpoint, resume=str(run / "checkpoint-2"))
    )
    assert checkpoint.finished_run(named) is None  # naming a checkpoint asks to train from it again


def test_training_longer_continues_from_the_final_step(tiny_model: Path, tmp_path: Path):
    first = train(recipe_of(tiny_model, tmp_path, "longer"))
    assert first.global_step == 4
    longer = train(recipe_of(tiny_model, tmp_path, "longer", max_steps=6))
    assert longer.global_step == 6 and not longer.finished
    run = tmp_path / "runs" / "longer"
    assert sorted(losses_by_step(run)) == [1, 2, 3, 4, 5, 6]  # continued from checkpoint-4, each step once
    assert json.loads((run / "final" / "manifest.json").read_text())["step"] == 6
    assert json.loads((run / "final.step-4" / "manifest.json").read_text())["step"] == 4  # kept aside


def test_a_run_stopped_after_its_last_checkpoint_publishes_it_without_training_further(
    tiny_model: Path, tmp_path: Path, capsys
):
    """A job preempted during its last step, or killed while final/ was saved, leaves the last step's
    checkpoint complete and final/ incomplete. The relaunch publishes that checkpoint as final/; the
    Trainer, resumed there, would train one step past max_steps (a different adapter, no word said)."""
    first = train(recipe_of(tiny_model, tmp_path, "last"))
    run = tmp_path / "runs" / "last"
    assert first.global_step == 4
    (run / "final" / "COMPLETE").unlink()  # as a kill while final/ was being saved leaves it
    losses = losses_by_step(run)
    adapter = (run / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    again = train(recipe_of(tiny_model, tmp_path, "last"))
    assert again.global_step == 4 and not again.finished
    assert "checkpoint-4 is at step 4 and train.max_steps is 4" in capsys.readouterr().out
    assert not (run / "checkpoint-5").exists() and losses_by_step(run) == losses  # nothing trained
    final = run / "final"
    assert checkpoint.inspect_checkpoint(final, verify=True).complete
    assert (final / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((final / "manifest.json").read_text())["step"] == 4
    assert not (final / "optimizer.pt").exists() and not (final / "trainer_state.json").exists()
    assert [p.name for p in run.glob("final.incomplete-*")]  # the interrupted one kept aside, not deleted
    assert train(recipe_of(tiny_model, tmp_path, "last")).finished  # and the run is finished now


def test_a_cut_off_metrics_line_neither_stops_the_run_nor_is_lost(tiny_model: Path, tmp_path: Path, capsys):
    """A crash or a full disk mid-append leaves logs/metrics.jsonl with a cut-off last line. The
    relaunch resumes and finishes (the loss plot, drawn during training, used to raise on it at every
    relaunch), the next record starts on a line of its own, and the cut-off line moves to
    metrics.replayed.jsonl instead of staying in the log or being deleted."""
    train(recipe_of(tiny_model, tmp_path, "cut"))
    run = tmp_path / "runs" / "cut"
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoint-4")
    metrics = run / "logs" / "metrics.jsonl"
    early = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 2]
    metrics.write_text("\n".join(early) + '\n{"step": 3, "epoch": 0.5, "time": 17961')  # no newline: cut off
    again = train(recipe_of(tiny_model, tmp_path, "cut"))
    assert again.global_step == 4
    lines = metrics.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)  # every line one record
    assert sorted({json.loads(line)["step"] for line in lines if "loss" in json.loads(line)}) == [1, 2, 3, 4]
    assert '{"step": 3, "epoch": 0.5, "time": 17961' in (run / "logs" / "metrics.replayed.jsonl").read_text()
    assert (run / "logs" / "loss.png").stat().st_size > 0

    # `qlora-sft plot` over lines no record could come from: drawn, the lines named, nothing raised
    from qlora_sft import plots

    losses = losses_by_step(run)
    with metrics.open("ab") as f:
        f.write(b'\n{"step": 9, "loss": \xff\xfe}\n{"loss": 1.0}\n\n["a list"]\n{"step": 5, "loss": "x"}\n{"step": 5')
    capsys.readouterr()
    plots.draw([run], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    said = capsys.readouterr().out
    assert "left out 5 line(s)" in said and str(metrics) in said, said
    assert plots.series(run)["loss"] == losses


def test_the_base_model_is_checked_by_its_files_not_its_path(tiny_model: Path, tmp_path: Path, monkeypatch):
    """A relative model path found from another working directory (another model of the same shape
    there) is refused at resume, and export refuses to merge onto it or to write over it; the same
    model at another path (a run copied from another machine, moved elsewhere) resumes and exports."""
    from tiny import build_tiny_model

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(tiny_model, project / "model")
    build_tiny_model(elsewhere / "model", seed=1)  # same config and file sizes, other weights
    write_toy_data(project / "toy.jsonl", n=48)
    raw = recipe_dict(Path("model"), project / "toy.jsonl", project / "runs", run={"name": "rel"}, train=SHORT)
    recipe_file = write_recipe(project / "r.yaml", raw)
    monkeypatch.chdir(project)
    assert train(load_recipe(recipe_file, ["train.max_steps=2"])).global_step == 2
    run = project / "runs" / "rel"
    monkeypatch.chdir(elsewhere)  # `model` could be ./model of this folder or the one beside the recipe
    with pytest.raises(UserError, match="model.name_or_path: model names two different folders"):
        train(load_recipe(recipe_file))
    with pytest.raises(DataError, match="toy.jsonl names two different files"):
        shutil.copy(project / "toy.jsonl", elsewhere / "toy.jsonl")
        (elsewhere / "toy.jsonl").write_text((elsewhere / "toy.jsonl").read_text()[::-1][1:] + "\n")
        raw2 = recipe_dict(project / "model", Path("toy.jsonl"), project / "runs", run={"name": "d"}, train=SHORT)
        train(load_recipe(write_recipe(project / "d.yaml", raw2)))
    monkeypatch.chdir(project)
    shutil.rmtree(project / "model.keep", ignore_errors=True)
    (project / "model").rename(project / "model.keep")
    shutil.copytree(elsewhere / "model", project / "model")  # the folder now holds another model
    with pytest.raises(RunDirError, match="is not the base model .*checkpoint-2 was trained on") as refused:
        train(load_recipe(recipe_file))
    assert "other contents, same size" in str(refused.value) and not (run / "checkpoint-4").exists()
    with pytest.raises(UserError, match="is not the base model .* was trained on"):
        export(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    shutil.rmtree(project / "model")
    (project / "model.keep").rename(project / "model")  # the model it trained on, back in place
    with pytest.raises(UserError, match="is \\(or holds\\) the base model folder"):
        export(run, project / "model", overwrite=True)
    assert (project / "model" / "config.json").is_file() and not list(project.glob("model.*"))

    # the run and its base model copied to another place (another user's machine): the same run
    moved = tmp_path / "copy"
    shutil.copytree(project / "runs", moved / "runs")
    shutil.copytree(project / "model", moved / "base")
    resumed = train(
        load_recipe(recipe_file, [f"run.output_dir={moved / 'runs'}", f"model.name_or_path={moved / 'base'}"])
    )
    assert resumed.global_step == 4 and sorted(losses_by_step(moved / "runs" / "rel")) == [1, 2, 3, 4]
    assert export(moved / "runs" / "rel", tmp_path / "merged2").ok


# 3. one live writer per run directory


def test_a_second_launch_on_a_live_run_is_refused_naming_the_holder(tiny_model: Path, tmp_path: Path):
    recipe = recipe_of(tiny_model, tmp_path, "busy", max_steps=400, save_steps=1000)
    path = write_recipe(tmp_path / "busy.yaml", recipe.to_dict())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    first = subprocess.Popen([sys.executable, "-m", "qlora_sft", "train", str(path)], env=env, cwd=tmp_path)
    lock = tmp_path / "runs" / "busy" / checkpoint.LOCK
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.is_file() and str(first.pid) in lock.read_text()):
            time.sleep(0.2)
        assert str(first.pid) in lock.read_text()
        second = subprocess.run(
            [sys.executable, "-m", "qlora_sft", "train", str(path)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2
        assert f"in use by another qlora-sft job ({socket.gethostname()} pid {first.pid}" in second.stderr
        assert f"delete {lock}" in second.stderr
    finally:
        first.kill()
        first.wait()
    # killed: its lock names a dead process on this host, so the relaunch takes it over
    holder = json.loads(lock.read_text())
    assert checkpoint.RunLock.gone(holder) is not None
    lock_again = checkpoint.RunLock(lock.parent)
    lock_again.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock_again.release()
    assert not lock.exists()


def test_a_lock_held_elsewhere_is_taken_over_only_when_provably_gone(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    other = {"host": "node-17", "pid": 4242, "started": "2026-11-30 01:00:00", "slurm_job_id": None}
    (run / checkpoint.LOCK).write_text(json.dumps(other))
    with pytest.raises(RunDirError, match=r"in use by another qlora-sft job \(node-17 pid 4242"):
        checkpoint.RunLock(run).acquire()
    # the same SLURM job, requeued: its previous incarnation has ended
    monkeypatch.setenv("SLURM_JOB_ID", "881")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (run / checkpoint.LOCK).write_text(json.dumps({**other, "slurm_job_id": "881", "slurm_restart_count": 0}))
    lock = checkpoint.RunLock(run)
    lock.acquire()
    assert json.loads((run / checkpoint.LOCK).read_text())["slurm_restart_count"] == 1
    lock.release()


HOLDER_WITH_WORKER = """
import multiprocessing, os, signal, sys, time
from pathlib import Path
from qlora_sft import checkpoint

def work():
    time.sleep(60)

if __name__ == "__main__":
    lock = checkpoint.RunLock(Path(sys.argv[1]))
    lock.acquire()
    worker = multiprocessing.get_context("fork").Process(target=work, daemon=True)  # as a DataLoader worker
    worker.start()
    print(worker.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: the worker outlives the holder for a while
"""


def test_a_crashed_jobs_forked_workers_do_not_keep_its_lock(tmp_path: Path):
    """A DataLoader worker forked by the lock holder outlives a SIGKILLed holder by up to 5 s. It
    must not hold the run's lock: a relaunch at once takes it over (found by a kill-and-resume that
    relaunched within seconds and was refused)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER_WITH_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    worker = int(holder.stdout.readline())  # (not read to its end: the worker holds the pipe too)
    assert holder.wait() == -9
    holder.stdout.close()
    try:
        assert checkpoint._process_start(worker) is not None  # the worker is still alive
        lock = checkpoint.RunLock(tmp_path / "run")
        lock.acquire()  # at once, without waiting for the worker
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, 9)


def test_leftover_processes_of_a_dead_holder_are_waited_for_then_named(tmp_path: Path, monkeypatch):
    """A process the holder started without Python's fork (here `sleep`, handed the lock's
    descriptor) keeps the flock after the holder died: the relaunch waits for it, and if it stays,
    refuses naming it and how to stop it."""
    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "LEFTOVER_WAIT_S", 1.5)
    for linger, taken in ((0.5, True), (30, False)):
        holder_code = (
            "import os, subprocess, sys\n"
            "from pathlib import Path\n"
            "from qlora_sft import checkpoint\n"
            "lock = checkpoint.RunLock(Path(sys.argv[1])); lock.acquire()\n"
            f"p = subprocess.Popen(['sleep', '{linger}'], pass_fds=[lock.fd], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL)\n"  # (not our pipes, which the run below reads to their end)
            "print(p.pid, flush=True)\n"
            "os._exit(0)\n"  # gone without releasing, as a crash
        )
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        out = subprocess.run([sys.executable, "-c", holder_code, str(run)], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        leftover = int(out.stdout.split()[0])
        lock = checkpoint.RunLock(run)
        try:
            if taken:
                lock.acquire()  # waited for the sleep to exit
                lock.release()
            else:
                with pytest.raises(RunDirError) as e:
                    lock.acquire()
                msg = str(e.value)
                assert "is gone (process" in msg and f"processes it started (pids {leftover}, on this host)" in msg, msg
                assert f"kill {leftover}" in msg and "nothing was changed" in msg, msg
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(leftover, 0)


@pytest.fixture
def held_lock(tmp_path: Path):
    """A run directory whose LOCK another open file description holds (as another process would),
    and a function writing the holder's record."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    path = run / checkpoint.LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def record(content: object) -> Path:
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return run

    yield record
    os.close(fd)


@pytest.mark.parametrize(
    "content",
    [[1], 5, "pid", None, b"\xff\xfe not json", {"host": "HOST", "pid": "abc"}, {"host": "HOST", "pid": [1]}],
    ids=["list", "number", "string", "null", "non-utf8", "pid-text", "pid-list"],
)
def test_a_held_lock_with_a_record_no_qlora_sft_wrote_is_refused_cleanly(held_lock, content, monkeypatch):
    """Whatever the held lock's file says, a launch is refused with the run directory's error (not a
    crash in the record's parsing), after at most the short reread a fresh holder's record needs."""
    monkeypatch.setattr(checkpoint, "LEFTOVER_WAIT_S", 0.5)
    if isinstance(content, dict):
        content = {**content, "host": socket.gethostname()}
    run = held_lock(content)
    t0 = time.monotonic()
    with pytest.raises(RunDirError, match="in use by another qlora-sft job"):
        checkpoint.RunLock(run).acquire()
    assert time.monotonic() - t0 < checkpoint.RECORD_GRACE_S + 1


def test_a_held_lock_from_another_pid_namespace_is_not_called_gone(held_lock, monkeypatch):
    """Two containers sharing a host name and a run folder: the holder's pid (1 in its namespace)
    means nothing here, so a held lock is refused at once naming it, never 'gone' with advice to
    kill the live job."""
    monkeypatch.setattr(checkpoint, "LEFTOVER_WAIT_S", 0.5)
    other = {"host": socket.gethostname(), "machine": "another-boot:4026532001", "pid": 1, "pid_start": "1"}
    run = held_lock(other)
    t0 = time.monotonic()
    with pytest.raises(RunDirError, match=r"in use by another qlora-sft job \(\S+ pid 1,") as e:
        checkpoint.RunLock(run).acquire()
    assert time.monotonic() - t0 < 0.5 and "kill" not in str(e.value)
    # its flock free (the container is gone): a dead pid of a host of the same name is proof enough
    assert checkpoint.RunLock.gone({**other, "pid": 2**22 + 5}) == f"process {2**22 + 5} has exited"


def test_a_held_lock_of_a_requeued_job_elsewhere_keeps_the_delete_advice(held_lock, monkeypatch):
    """A node died and SLURM ended its job, but the network file system still holds the node's
    lock: after the wait, the refusal says so and names the file to delete."""
    monkeypatch.setattr(checkpoint, "LEFTOVER_WAIT_S", 1.5)
    monkeypatch.setattr(checkpoint, "_slurm_job_running", lambda job: False)
    run = held_lock({"host": "node-9", "pid": 4242, "slurm_job_id": "77", "started": "2026-12-01 01:00:00"})
    with pytest.raises(RunDirError) as e:
        checkpoint.RunLock(run).acquire()
    msg = str(e.value)
    assert "is gone (SLURM job 77 is no longer running)" in msg and "from another machine" in msg, msg
    assert f"delete {run / checkpoint.LOCK}" in msg and "kill" not in msg, msg


def test_lock_records_of_zombies_and_of_my_pid_elsewhere(tmp_path: Path):
    """A holder that exited but was not reaped (a zombie) holds nothing: its lock is taken over. A
    record with this process's pid from another host is someone else's: refused."""
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while checkpoint._process_start(zombie.pid) is not None and time.time() < deadline:
        time.sleep(0.05)
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": zombie.pid}))
    lock = checkpoint.RunLock(run)
    lock.acquire()  # while the zombie is still unreaped
    assert Path(f"/proc/{zombie.pid}").exists()
    lock.release()
    zombie.wait()
    (run / checkpoint.LOCK).write_text(json.dumps({"host": "node-17", "pid": os.getpid(), "pid_start": "1"}))
    with pytest.raises(RunDirError, match=r"in use by another qlora-sft job \(node-17 pid"):
        checkpoint.RunLock(run).acquire()


def test_overwriting_twice_in_one_second_keeps_both_old_runs(tmp_path: Path, monkeypatch):
    """run.overwrite moves the old run aside under its time; a second overwrite in the same second
    gets a name of its own instead of failing (and leaving the old run's lock held)."""
    monkeypatch.setattr(checkpoint.time, "strftime", lambda fmt, *args: "20261201-120000")  # one second
    base = recipe_dict(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    for i in range(2):
        run.mkdir(parents=True)
        (run / "marker").write_text(str(i))
        write_recipe(run / "recipe.yaml", {**base, "train": {**base["train"], "learning_rate": 1e-4 * (i + 1)}})
        recipe = build_recipe({**base, "run": {**base["run"], "overwrite": True}})
        lock = checkpoint.prepare_run_dir(recipe, {})
        assert lock is not None
        lock.release()
        shutil.rmtree(run)
    kept = {p.name: (p / "marker").read_text() for p in (tmp_path / "runs").iterdir()}
    assert kept == {"tiny.replaced-20261201-120000": "0", "tiny.replaced-20261201-120000-2": "1"}, kept
    assert checkpoint._HELD_LOCKS == []


# 4. non-finite training stops, and nothing non-finite is published


def test_divergence_stops_with_the_step_and_publishes_nothing_nonfinite(tiny_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("QLORA_SFT_FAULT", "nan@3")  # a LoRA weight becomes NaN as step 3 begins
    recipe = recipe_of(tiny_model, tmp_path, "nan", max_steps=10, save_steps=2)
    with pytest.raises(checkpoint.NonFiniteError, match=r"not finite for 3 optimizer steps in a row \(steps 3-5") as e:
        train(recipe)
    assert "the newest complete checkpoint is checkpoint-2" in str(e.value)
    run = tmp_path / "runs" / "nan"
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [2]  # steps 3-5 were never saved
    assert not (run / "final").exists()
    assert checkpoint.nonfinite_tensors(run / "checkpoint-2" / "adapter_model.safetensors") == []


def test_a_nonfinite_adapter_is_neither_resumed_nor_exported(finished: Path, tmp_path: Path):
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "copy"
    shutil.copytree(finished / "runs" / "a", run)
    for ckpt in (run / "checkpoint-4", run / "final"):
        tensors = load_file(str(ckpt / "adapter_model.safetensors"))
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, str(ckpt / "adapter_model.safetensors"))
        # a manifest that matches (as a version without the finiteness check would have written it)
        manifest = json.loads((ckpt / "manifest.json").read_text())
        checkpoint.write_manifest(ckpt, {k: v for k, v in manifest.items() if k not in ("files", "completed")})
    info = checkpoint.inspect_checkpoint(run / "checkpoint-4", verify=True)
    assert not info.complete and "holds non-finite values" in info.reason
    saved = read_run_recipe(run)
    recipe = dataclasses.replace(saved, run=dataclasses.replace(saved.run, output_dir=str(tmp_path), name="copy"))
    assert checkpoint.find_resume(recipe) == run / "checkpoint-2"  # the NaN checkpoint is skipped
    with pytest.raises(UserError, match=r"final cannot be exported: adapter_model.safetensors holds non-finite"):
        export(run, tmp_path / "out")


# 4b. a step out of GPU memory: what is kept and what to lower, and the smaller micro batch resumes


def test_out_of_gpu_memory_names_the_checkpoint_and_a_smaller_micro_batch_resumes(
    tiny_model: Path, tmp_path: Path, monkeypatch
):
    """A step that runs out of GPU memory (QLORA_SFT_FAULT raises torch's own error, as the CUDA
    allocator would) stops with an error for people: the rank and step, the newest complete
    checkpoint kept, and what to lower. Relaunched with half the micro batch (train.micro_batch_tokens
    may change between launches of a run: the global batch stays), the run resumes from that
    checkpoint and its steps match an uninterrupted run's."""
    data = write_toy_data(tmp_path / "toy.jsonl", n=48)

    def recipe(name: str, micro_batch_tokens: int, max_steps: int) -> object:
        raw = recipe_dict(tiny_model, data, tmp_path / "runs", run={"name": name}, train={**SHORT})
        raw["train"].pop("per_device_train_batch_size")  # packed rows of data.max_length (64) per micro batch
        raw["train"].update(micro_batch_tokens=micro_batch_tokens, max_steps=max_steps)
        return build_recipe(raw)

    whole = train(recipe("whole", 256, 6))
    monkeypatch.setenv("QLORA_SFT_FAULT", "oom@5")
    with pytest.raises(UserError) as e:
        train(recipe("oom", 256, 6))
    text = str(e.value)
    assert "rank 0 ran out of GPU memory in optimizer step 5 (CUDA out of memory. Tried to allocate 2.00 GiB" in text
    run = tmp_path / "runs" / "oom"
    assert f"{run / 'checkpoint-4'} is the newest complete checkpoint (step 4); a relaunch resumes" in text
    assert "train.micro_batch_tokens" in text and "train.offload_activations=true" in text
    assert [c.step for c in checkpoint.list_checkpoints(run) if c.complete] == [4, 2]
    assert not (run / "final").exists()

    monkeypatch.setenv("QLORA_SFT_FAULT", "")
    smaller = recipe("oom", 128, 6)
    assert smaller.train.args["per_device_train_batch_size"] == 2
    result = train(smaller)
    assert result.global_step == 6
    got, want = losses_by_step(run), losses_by_step(whole.run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):  # trained after the resume, two micro batches of 2 rows where the first run took one of 4
        assert abs(got[step] - want[step]) <= 1e-4 * abs(want[step]), (step, got[step], want[step])


def test_a_smaller_micro_batch_that_changes_the_global_batch_is_refused_at_resume(tiny_model: Path, tmp_path: Path):
    """train.micro_batch_tokens may change between launches only where the global batch stays: without
    train.global_batch_size, half the micro batch halves the global batch, and the resume is refused
    before the model loads, naming both and the fix; the checkpoint is left as it was."""
    data = write_toy_data(tmp_path / "toy.jsonl", n=48)

    def recipe(micro_batch_tokens: int, max_steps: int) -> object:
        raw = recipe_dict(tiny_model, data, tmp_path / "runs", train={**SHORT, "max_steps": max_steps})
        del raw["train"]["per_device_train_batch_size"], raw["train"]["global_batch_size"]
        raw["train"].update(micro_batch_tokens=micro_batch_tokens, gradient_accumulation_steps=2)
        return build_recipe(raw)

    train(recipe(256, 2))
    run = tmp_path / "runs" / "tiny"
    before = (run / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"checkpoint-2 was saved with global batch 8, this launch has 4") as e:
        train(recipe(128, 4))
    assert "Keep train.global_batch_size as it was" in str(e.value)
    assert (run / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == before
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [2]


def test_gpu_outlook_says_what_fits_and_what_to_lower(tiny_model: Path, tmp_path: Path):
    """train's pre-flight line and out-of-memory advice, from plan's numbers for the GPU it runs on."""
    from qlora_sft.launch import plan_mode
    from qlora_sft.plan import GpuOutlook, gpu_outlook, usable_gib

    recipe = recipe_of(tiny_model, tmp_path)
    mode = plan_mode(recipe, None, None, 1)
    roomy = gpu_outlook(recipe, mode, None, 24.0)
    assert roomy.fits and roomy.micro == 4 and roomy.max_length == 64 and roomy.largest_micro >= 4
    tight = gpu_outlook(recipe, mode, None, roomy.estimate_gib)  # the estimate alone leaves no headroom
    assert not tight.fits and tight.largest_micro < 4 and "it will likely run out of memory" in tight.line()
    # the launch modes train sees on GPUs (read from the launcher's environment, as launch.detect does)
    from qlora_sft.launch import mode_from_environment

    ranks = {"world_size": 2, "local_rank": 0, "rank": 0}
    zero3 = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "configs/deepspeed/zero3.json"),
    }
    for env in ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_OFFLOAD_PARAMS": "true"}, zero3):
        launched = mode_from_environment(env, cpu=False, **ranks)
        outlook = gpu_outlook(recipe, launched, None, 24.0)
        assert 0 < outlook.estimate_gib < 24 and outlook.fits, (launched.kind, outlook)

    fits = GpuOutlook(gpu_gib=24.0, estimate_gib=13.0, largest_micro=8, micro=8, max_length=2048)
    assert fits.fits and fits.line().endswith(f"of which an estimate may reach {usable_gib(24.0):.2f}: fits")
    over = GpuOutlook(gpu_gib=16.0, estimate_gib=15.2, largest_micro=11, micro=13, max_length=2048)
    assert not over.fits
    assert "it will likely run out of memory. plan's largest micro batch on this GPU: 11 rows of 2048 tokens" in (
        over.line()
    )
    assert "train.micro_batch_tokens=22528" in over.advice() and "--gpu-mem 16`" in over.advice()
    unpacked = GpuOutlook(16.0, 15.2, 3, 4, 2048, packing=False)
    assert "(train.per_device_train_batch_size=3;" in unpacked.advice()
    none = GpuOutlook(gpu_gib=8.0, estimate_gib=40.0, largest_micro=0, micro=4, max_length=4096)
    assert "Not even one row of 4096 tokens fits" in none.advice() and "fsdp_qlora.yaml" in none.advice()
    above = GpuOutlook(gpu_gib=24.0, estimate_gib=13.0, largest_micro=8, micro=8, max_length=2048)
    assert "so the peak is above it" in above.advice()  # what an out-of-memory error says when plan said it fits
    # the frozen tables are suggested only where they are not in host memory already (auto may have put them there)
    assert all("model.lm_head_in_host_memory=true" in o.advice() for o in (none, above))
    for outlook in (none, above):
        there = dataclasses.replace(outlook, tables_in_host=True)
        assert "host_memory" not in there.advice() and "offload_activations" in there.advice()


# 5. same-size corruption: found by the checksum, the previous checkpoint used, the file named


def test_same_size_corruption_falls_back_to_the_previous_checkpoint(finished: Path, tmp_path: Path, capsys):
    run_root = tmp_path / "runs"
    shutil.copytree(finished / "runs" / "a", run_root / "a")
    state = run_root / "a" / "checkpoint-4" / "trainer_state.json"
    state.write_bytes(b"\0" * state.stat().st_size)  # garbage of the right size
    saved = read_run_recipe(run_root / "a")
    recipe = dataclasses.replace(saved, run=dataclasses.replace(saved.run, output_dir=str(run_root)))
    setup_logging(True)  # the log handler on this test's captured stdout
    assert checkpoint.find_resume(recipe) == run_root / "a" / "checkpoint-2"
    out = capsys.readouterr()
    assert "checkpoint-4 for resume: file trainer_state.json does not match its checksum" in out.out + out.err
    assert (run_root / "a" / "checkpoint-4").is_dir()  # kept for the user to inspect
    adapter = run_root / "a" / "checkpoint-2" / "adapter_model.safetensors"
    raw = bytearray(adapter.read_bytes())
    raw[-10:] = b"0123456789"
    adapter.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"checkpoint-2 cannot be exported: file adapter_model.safetensors does not"):
        export(run_root / "a" / "checkpoint-2", tmp_path / "out")


def _recipe_dict(run: Path) -> dict:
    import yaml

    data = yaml.safe_load((run / "recipe.yaml").read_text())
    data.pop("launch", None)
    return data


# 6. remote code runs only when the command says so


def test_export_and_chat_run_remote_code_only_with_the_flag(finished: Path, tmp_path: Path, tiny_model: Path):
    base = tmp_path / "custom-base"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    run = tmp_path / "shared-run"
    shutil.copytree(finished / "runs" / "a", run)
    raw = _recipe_dict(run)
    raw["model"]["name_or_path"] = str(base)
    raw["model"]["trust_remote_code"] = True
    (run / "recipe.yaml").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"would run its own code \(modeling_evil.py from .*--trust-remote-code"):
        export(run, tmp_path / "merged")
    out = subprocess.run(
        [sys.executable, "-m", "qlora_sft", "chat", str(run / "checkpoint-4"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert out.returncode == 2 and "modeling_evil.py" in out.stderr and "--trust-remote-code" in out.stderr


# 8. resuming over changed data is refused, unless allowed


def test_resume_over_changed_data_is_refused_naming_the_change(tiny_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("QLORA_SFT_FAULT", "")
    recipe = recipe_of(tiny_model, tmp_path, "data", max_steps=4, save_steps=2)
    train(build_recipe({**recipe.to_dict(), "train": {**recipe.to_dict()["train"], "max_steps": 2}}))
    data = tmp_path / "toy.jsonl"
    # the same bytes staged again (a requeued job copying its data to local disk, `cp` without -p): a
    # new modification time, the same data: resumes
    data.write_bytes(data.read_bytes())
    later = data.stat().st_mtime_ns + 3600 * 10**9
    os.utime(data, ns=(later, later))
    assert (
        train(build_recipe({**recipe.to_dict(), "train": {**recipe.to_dict()["train"], "max_steps": 3}})).global_step
        == 3
    )
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[::-1] + lines[:30]) + "\n")  # reshuffled, 30 rows added
    with pytest.raises(RunDirError, match=r"training data changed since .*checkpoint-3 was written:\n.*toy.jsonl: "):
        train(recipe)
    allowed = build_recipe(
        {**recipe.to_dict(), "checkpoint": {**recipe.to_dict()["checkpoint"], "allow_data_change": True}}
    )
    assert train(allowed).global_step == 4


def test_a_same_size_edit_with_its_modification_time_set_back_is_a_data_change(tmp_path: Path):
    """Was: a file of the same size and modification time counted as unchanged whatever its digest
    said, so a resume trained on edited data whose time was set back (`touch -r`, `cp -p`)."""
    from qlora_sft import data
    from qlora_sft.recipe import DataConfig, DataSource

    f = tmp_path / "rows.jsonl"
    f.write_text('{"instruction": "Name a colour.", "output": "Blue."}\n')
    cfg = DataConfig(sources=(DataSource(path=str(f)),))
    saved = data.data_fingerprint(cfg, None, data.DataReport())
    before = f.stat()
    f.write_text('{"instruction": "Name a colour.", "output": "Pink."}\n')
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    changes = checkpoint.data_changes(saved, data.data_fingerprint(cfg, None, data.DataReport()))
    assert changes == [f"{f.resolve()}: its content changed, with the same size and modification time"]
    # the same bytes, the same time: no change
    assert checkpoint.data_changes(saved, saved) == []


# 9. a full disk says where, and what is still safe


def test_a_full_disk_during_a_save_names_the_disk_and_the_safe_checkpoint(
    tiny_model: Path, tmp_path: Path, monkeypatch
):
    import torch

    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(
        UserError, match=r"saving checkpoint-4: no space left on .*newest complete checkpoint is checkpoint-2"
    ):
        train(recipe_of(tiny_model, tmp_path, "full", max_steps=6, save_steps=2))
    run = tmp_path / "runs" / "full"
    assert not list((run / checkpoint.STAGING).glob("checkpoint-4*"))  # the half-written save was removed
    assert not list(run.rglob(".*.tmp-*"))
    assert [c.step for c in checkpoint.list_checkpoints(run) if c.complete] == [2]


# 10. a launch that failed before training does not block the corrected relaunch


def test_a_launch_that_trained_nothing_does_not_block_the_corrected_one(tiny_model: Path, tmp_path: Path):
    bad = recipe_of(tiny_model, tmp_path, "fix")
    bad_dict = bad.to_dict()
    bad_dict["data"]["sources"] = [{"path": str(tmp_path / "missing.jsonl")}]
    with pytest.raises(UserError):
        train(build_recipe(bad_dict))
    assert (tmp_path / "runs" / "fix" / "recipe.yaml").is_file()  # it got as far as writing its recipe
    assert train(bad).global_step == 4
