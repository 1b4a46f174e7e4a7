"""A run's checkpoints under hostile conditions: a disk that fills up while a checkpoint, the final
adapter or the logs are written (simulated with RLIMIT_FSIZE in a subprocess, SIGXFSZ ignored: the
writes then fail with EFBIG, as a full disk's fail with ENOSPC), on one rank of two, and a run
directory copied to another place with its data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SHORT_RUN,
    cpu_env,
    free_port,
    losses_by_step,
    recipe_dict,
    short_run_recipe,
    write_recipe,
    write_toy_data,
)

from qlora_sft import checkpoint

pytestmark = pytest.mark.multiprocess

SHORT = SHORT_RUN

# Trains the recipe; at the end of step AT (on RANK, or every rank; 0: before the launch), every later
# write of a file past LIMIT bytes fails with EFBIG. The output goes to a pipe, which the limit does not touch.
DRIVER = """
import resource, signal, sys
from transformers import TrainerCallback
from qlora_sft.errors import UserError
from qlora_sft.recipe import load_recipe
from qlora_sft.train import train

recipe, at, limit, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def disk_fills():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

if at == 0:
    disk_fills()  # before the launch

class DiskFills(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == at and rank in ("any", str(args.process_index)):
            disk_fills()

try:
    train(load_recipe(recipe), extra_callbacks=[DiskFills()])
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""

# what the file size limit these tests fill the disk with is called in the errors
TOO_LARGE = "a file grew past the largest this process may write (`ulimit -f`) or the file system of"


run_recipe = short_run_recipe


def launch(recipe: Path, at: int = -1, limit: int = 0, rank: str = "any", ranks: int = 1):
    env = {**cpu_env(), "PYTHONPATH": str(REPO / "src")}
    script = recipe.with_name("disk_fills.py")
    script.write_text(DRIVER)
    args = [str(script), str(recipe), str(at), str(limit), rank]
    if ranks > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=recipe.parent, env=env, capture_output=True, text=True, timeout=600)


def errors(output: str) -> list[str]:
    """The errors the driver printed (after a progress bar's text on the same line, at times)."""
    return re.findall(r"error: (.*)", output)


def replayed_losses(run: Path) -> dict[int, float]:
    lines = (run / "logs" / "metrics.replayed.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_disk_that_fills_during_a_checkpoint_keeps_the_older_ones_and_the_relaunch_resumes(
    tiny_model: Path, tmp_path: Path, ranks: int
):
    """The disk fills after step 4, with checkpoint.keep_last: 1 (retention would delete checkpoint-2
    once checkpoint-4 completes). Was: with one process, the adapter (safetensors' writer, whose error
    is no OSError) failing ended in a traceback that named neither the path nor the disk, and left the
    half-written save in .staging; with two ranks where only rank 1 could not write (its RNG state),
    the main process said only "failed on another rank" and kept the whole half-written save, while
    rank 1 said nothing of it was kept. Now every rank names the disk and the safe checkpoint, the
    half-written save is gone, checkpoint-2 is kept, and the relaunch resumes from it: the replayed
    steps have the losses they had."""
    recipe = run_recipe(tmp_path, tiny_model, f"full{ranks}", keep_last=1)
    run = tmp_path / "runs" / f"full{ranks}"
    # one process: 20 kB stops the adapter (36 kB); two: rank 1 alone, its 14 kB RNG state
    out = launch(recipe, at=4, limit=20_000 if ranks == 1 else 10_000, rank="any" if ranks == 1 else "1", ranks=ranks)
    assert out.returncode != 0
    said = out.stdout + out.stderr
    # one process: safetensors' writer names the errno (EFBIG); two: torch's zip writer hides it, and the
    # rank that wrote nothing knows only that another rank ran out of room: both read as a full disk
    words = f"saving checkpoint-4: {TOO_LARGE}" if ranks == 1 else "saving checkpoint-4: no space left on the file"
    for line in errors(said) or [said[-3000:]]:
        assert words in line, said[-3000:]
        assert str(run / checkpoint.STAGING) in line and "newest complete checkpoint is checkpoint-2" in line
    assert said.count(f"error: {words}") == ranks  # every rank, the main one too
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [2]  # complete; nothing of step 4 counts
    assert checkpoint.inspect_checkpoint(run / "checkpoint-2", verify=True).complete
    assert not (run / checkpoint.STAGING / "checkpoint-4").exists()
    before = losses_by_step(run)
    assert sorted(before) == [1, 2, 3, 4]

    again = launch(recipe, ranks=ranks)  # space freed: the same command
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resuming from {run / 'checkpoint-2'}" in again.stdout + again.stderr
    after = losses_by_step(run)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert replayed_losses(run) == {3: before[3], 4: before[4]} == {3: after[3], 4: after[4]}
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete


def test_a_run_copied_with_its_data_to_another_place_resumes_by_the_datas_content(tiny_model: Path, tmp_path: Path):
    """A run directory copied (cp -a) from another machine with its data, the data now at another
    path. Was: refused as "a run of a different recipe" (data.sources' path), with only a new run or
    run.overwrite offered, although the files hold the same bytes. Now the same data at another path
    resumes with the losses of the uninterrupted run; other data there is refused naming the files;
    the copied lock of the other machine is refused naming its host and the file to delete."""
    from qlora_sft.errors import RunDirError
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    first, copy = tmp_path / "first", tmp_path / "copy"
    first.mkdir()
    train(load_recipe(run_recipe(first, tiny_model, "r")))  # 6 steps, checkpoints 2, 4, 6
    shutil.copytree(first, copy, symlinks=True)
    shutil.rmtree(copy / "runs" / ".cache")  # only the run and the data were copied
    run = copy / "runs" / "r"
    for done in ("final", "checkpoint-6", "checkpoint-4"):  # as a crash after checkpoint-2 leaves it
        shutil.rmtree(run / done)
    recipe = load_recipe(run_recipe(copy, tiny_model, "r"))  # run.output_dir and the data under copy/
    assert recipe.data.sources[0].path == str(copy / "toy.jsonl")

    lock = {"host": "gpu-node-17", "machine": "x:1", "pid": 4242, "pid_start": "99", "started": "yesterday"}
    (run / checkpoint.LOCK).write_text(json.dumps(lock) + "\n")  # copied while the other machine ran it
    held = rf"in use by another qlora-sft job \(gpu-node-17 pid 4242.*delete {re.escape(str(run))}/LOCK and relaunch"
    with pytest.raises(RunDirError, match=held):
        train(recipe)
    (run / checkpoint.LOCK).unlink()

    data = copy / "toy.jsonl"
    same = data.read_bytes()
    data.write_text("".join(reversed(same.decode().splitlines(keepends=True))))  # other data, same size
    with pytest.raises(RunDirError, match=r"training data changed since .*checkpoint-2 was written:\n.*toy.jsonl"):
        train(recipe)
    data.write_bytes(same)
    assert train(recipe).global_step == 6
    assert losses_by_step(run) == losses_by_step(first / "runs" / "r")
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete


def test_a_disk_that_fills_while_the_logs_are_written_names_them_and_the_relaunch_resumes(
    tiny_model: Path, tmp_path: Path
):
    """The disk fills after step 3, between checkpoints: the next write is the logs' (metrics.jsonl,
    TensorBoard's events). Was: a traceback from TensorBoard's writer thread or the metrics callback,
    naming neither the folder nor the disk nor what is safe. Now the error names the logs, the disk
    and the newest complete checkpoint, and the relaunch resumes from it, each step logged once."""
    recipe = run_recipe(tmp_path, tiny_model, "logs")
    run = tmp_path / "runs" / "logs"
    out = launch(recipe, at=3, limit=1_000)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    error = (errors(out.stderr) or [out.stderr[-3000:]])[0]
    assert f"step 3: writing {run / 'logs'}" in error and "(the run's logs) failed: a file grew past" in error
    assert f"the newest complete checkpoint is {run / 'checkpoint-2'}" in error
    again = launch(recipe)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert sorted(losses_by_step(run)) == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == sorted(set(steps))  # each step once


def test_a_checkpoint_that_retention_cannot_delete_is_kept_and_training_goes_on(
    tiny_model: Path, tmp_path: Path, monkeypatch, capsys
):
    """checkpoint.keep_last: 1, and checkpoint-2 cannot be deleted (its owner made it read-only; seen
    as root with a read-only bind mount: EROFS from rmtree). Was: the PermissionError/EROFS from
    rmtree stopped training with a traceback right after checkpoint-4 had been published. Now it is
    named and kept, and training finishes. (rmtree fails here as it does on a folder without write
    permission: the tests may run as root, whom permission bits do not stop.)"""
    import errno

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    recipe = load_recipe(run_recipe(tmp_path, tiny_model, "kept", keep_last=1))
    run = tmp_path / "runs" / "kept"
    protected = run / "checkpoint-2"
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) in (protected, run / checkpoint.STAGING / (checkpoint.DELETING + protected.name)):
            raise PermissionError(errno.EACCES, "Permission denied", str(protected / "adapter_model.safetensors"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert train(recipe).global_step == 6
    assert [c.step for c in checkpoint.list_checkpoints(run) if c.complete] == [6, 2]
    said = capsys.readouterr()
    assert (
        f"checkpoint.keep_last=1: could not remove {protected} ({protected / 'adapter_model.safetensors'}: "
        "permission denied); training goes on" in said.out + said.err
    )


def test_a_relaunch_on_a_disk_still_full_names_the_lock_and_leaves_no_stale_one(tiny_model: Path, tmp_path: Path):
    """Relaunching before space was freed: the first file written is the run directory's LOCK. Was: a
    traceback of OSError (ENOSPC from os.pwrite on a full tmpfs; here EFBIG from os.ftruncate), with an
    empty or cut-off LOCK left behind. Now the error names the lock, the disk and what to do, and the
    lock is free for the next launch."""
    recipe = run_recipe(tmp_path, tiny_model, "still")
    run = tmp_path / "runs" / "still"
    out = launch(recipe, at=0, limit=100)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    error = (errors(out.stderr) or [out.stderr[-3000:]])[0]
    assert f"writing {run / checkpoint.LOCK}: {TOO_LARGE} {run}" in error, error
    assert error.endswith("nothing was changed. Free space and relaunch.")
    lock = checkpoint.RunLock(run)
    lock.acquire()  # nobody holds it
    lock.release()


def test_a_full_disk_names_the_checkpoints_that_can_go_and_a_lower_keep_last_frees_them_at_once(
    tiny_model: Path, tmp_path: Path, capsys
):
    """The disk fills while checkpoint-6 is saved, checkpoints 2 and 4 complete. Was: "Free space (or
    lower checkpoint.keep_last) and relaunch the same command", but a relaunch with a lower keep_last
    deleted nothing before its next save, which failed the same way (seen on a full 700 kB tmpfs).
    Now the error names the checkpoints that can go, and a relaunch with checkpoint.keep_last=1
    removes them as it resumes from the newest complete one, before training."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    run = tmp_path / "runs" / "lower"
    out = launch(run_recipe(tmp_path, tiny_model, "lower"), at=6, limit=50_000)  # the optimizer's 89 kB
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    error = (errors(out.stderr) or [out.stderr[-3000:]])[0]
    assert (
        "nothing of checkpoint-6 was kept and the newest complete checkpoint is checkpoint-4. Free space (the "
        "older checkpoints checkpoint-2 can go: delete them, or relaunch with checkpoint.keep_last=1 and they are "
        "removed before training resumes) and relaunch: training resumes from checkpoint-4." in error
    ), error
    capsys.readouterr()
    assert train(load_recipe(run_recipe(tmp_path, tiny_model, "lower", keep_last=1))).global_step == 6
    said = capsys.readouterr().out
    removed = said.index(f"checkpoint.keep_last=1: removed {run / 'checkpoint-2'}")
    assert removed < said.index(f"resuming from {run / 'checkpoint-4'}")
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [6]


def test_a_finished_run_whose_final_adapter_is_damaged_publishes_it_again(tiny_model: Path, tmp_path: Path, capsys):
    """final/adapter_model.safetensors corrupted to the same size (a bad disk, a bit flip in a copy).
    Was: the relaunch said "final is complete ... Nothing to do" (sizes only), and the damage showed
    only at export. Now the relaunch names the file, publishes final/ again from checkpoint-6 (the
    last step's) without training, and keeps the damaged one aside, not under a good one's name."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    recipe = load_recipe(run_recipe(tmp_path, tiny_model, "bitrot"))
    run = tmp_path / "runs" / "bitrot"
    train(recipe)
    losses = losses_by_step(run)
    adapter = run / "final" / "adapter_model.safetensors"
    raw = bytearray(adapter.read_bytes())
    raw[-100] ^= 0xFF
    adapter.write_bytes(bytes(raw))
    capsys.readouterr()
    again = train(recipe)
    assert not again.finished and again.global_step == 6
    said = capsys.readouterr().out
    assert f"{run / 'final'} is not intact: file adapter_model.safetensors does not match its checksum" in said
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete
    assert adapter.read_bytes() == (run / "checkpoint-6" / "adapter_model.safetensors").read_bytes()
    assert losses_by_step(run) == losses  # nothing trained
    kept = [p.name for p in run.iterdir() if p.name.startswith("final.")]
    assert len(kept) == 1 and kept[0].startswith("final.incomplete-"), kept
    assert (run / kept[0] / "adapter_model.safetensors").read_bytes() == bytes(raw)
    assert train(recipe).finished


def test_a_full_disk_while_final_is_published_from_the_last_checkpoint_names_it(tiny_model: Path, tmp_path: Path):
    """A job stopped after its last step's checkpoint (final/ not written) is relaunched on a disk
    that fills while final/ is copied from that checkpoint. Was: a traceback of OSError from
    shutil.copy2 (seen on a full tmpfs: ENOSPC from os.sendfile), the half-copied .staging/final left
    on the full disk. Now the error names final/, the disk and the complete checkpoint, nothing of it
    is left, and the relaunch after freeing space publishes it without training."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    recipe = run_recipe(tmp_path, tiny_model, "last")
    run = tmp_path / "runs" / "last"
    train(load_recipe(recipe))
    losses = losses_by_step(run)
    shutil.rmtree(run / "final")
    out = launch(recipe, at=0, limit=20_000)  # the adapter (36 kB) is copied first
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    error = (errors(out.stderr) or [out.stderr[-3000:]])[0]
    assert f"publishing {run / 'final'} from checkpoint-6: {TOO_LARGE} {run}" in error, error
    assert f"nothing of it was kept, and {run / 'checkpoint-6'} is complete. Free space and relaunch" in error
    assert not (run / "final").exists() and not (run / checkpoint.STAGING / "final").exists()
    again = train(load_recipe(recipe))
    assert again.global_step == 6 and losses_by_step(run) == losses
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete


def test_retention_keeps_a_checkpoint_holding_files_the_run_did_not_write(tiny_model: Path, tmp_path: Path, capsys):
    """checkpoint.keep_last: 1, and the user saved an evaluation into checkpoint-2 while the run went
    on. Was: retention deleted checkpoint-2 with the user's file in it. Now a checkpoint holding files
    its manifest does not list is kept, naming them; the others go as before."""
    from transformers import TrainerCallback

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    run = tmp_path / "runs" / "notes"

    class UserSavesAnEval(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                (run / "checkpoint-2" / "my-eval.json").write_text('{"accuracy": 0.5}\n')

    train(load_recipe(run_recipe(tmp_path, tiny_model, "notes", keep_last=1)), extra_callbacks=[UserSavesAnEval()])
    assert (run / "checkpoint-2" / "my-eval.json").read_text() == '{"accuracy": 0.5}\n'
    assert not (run / "checkpoint-4").exists()  # nothing of the user's there: removed as before
    assert [c.step for c in checkpoint.list_checkpoints(run) if c.complete] == [6, 2]
    said = capsys.readouterr().out
    assert (
        f"checkpoint.keep_last=1: kept {run / 'checkpoint-2'}: it holds files the run did not write (my-eval.json)"
        in said
    )


def test_a_checkpoint_of_another_recipe_put_into_the_run_is_not_resumed(tiny_model: Path, tmp_path: Path, capsys):
    """checkpoint-4 of another run (learning rate 0.01) copied into this run (0.005), which has only
    reached checkpoint-2. Was: the relaunch resumed from the stranger's checkpoint-4 without a word
    (the manifest's recipe_hash was never compared), continuing another training under this recipe.
    Now it is skipped naming the difference and kept; the run resumes from its own checkpoint-2; a
    checkpoint.resume naming it is refused."""
    import dataclasses

    import yaml

    from qlora_sft.errors import RunDirError
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    other = tmp_path / "runs" / "other"
    train(load_recipe(run_recipe(tmp_path, tiny_model, "other", train={"max_steps": 4})))
    mine = tmp_path / "runs" / "mine"
    recipe = run_recipe(tmp_path, tiny_model, "mine", train={"max_steps": 2, "learning_rate": 0.005})
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    shutil.copytree(other / "checkpoint-4", mine / "checkpoint-4", symlinks=True)
    raw["train"]["max_steps"] = 6
    recipe.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert train(load_recipe(recipe)).global_step == 6
    said = capsys.readouterr().out
    assert (
        f"skipping {mine / 'checkpoint-4'} for resume: written by another recipe (train.learning_rate: 0.01 -> 0.005)"
        in said
    )
    assert f"resuming from {mine / 'checkpoint-2'}" in said
    assert sorted(losses_by_step(mine)) == [1, 2, 3, 4, 5, 6]
    stranger = [p for p in mine.iterdir() if p.name.startswith("checkpoint-4.")]  # kept aside, not deleted
    assert (
        len(stranger) == 1
        and (stranger[0] / "adapter_model.safetensors").read_bytes()
        == (other / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    )
    named = load_recipe(recipe)
    named = dataclasses.replace(named, checkpoint=dataclasses.replace(named.checkpoint, resume=str(stranger[0])))
    with pytest.raises(RunDirError, match=r"written by another recipe:\n    train.learning_rate: 0.01 -> 0.005"):
        checkpoint.find_resume(named)


def test_a_restart_from_step_0_when_no_checkpoint_is_usable_logs_each_step_once(tiny_model: Path, tmp_path: Path):
    """The only checkpoint left is damaged (trainer_state.json grew), so the relaunch trains from step
    0 again. Was: metrics.jsonl kept the earlier lines, every step appeared twice (1..6, 1..6) and the
    loss plot drew both. Now the earlier lines move to metrics.replayed.jsonl, as at any resume."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    recipe = load_recipe(run_recipe(tmp_path, tiny_model, "again"))
    run = tmp_path / "runs" / "again"
    train(recipe)
    before = (run / "logs" / "metrics.jsonl").read_text()
    for done in ("final", "checkpoint-6", "checkpoint-4"):
        shutil.rmtree(run / done)
    with (run / "checkpoint-2" / "trainer_state.json").open("a") as f:
        f.write("garbage")
    assert train(recipe).global_step == 6
    lines = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (run / "logs" / "metrics.replayed.jsonl").read_text() == before


@pytest.mark.parametrize("keep_last", [None, 1])
def test_load_best_model_at_end_publishes_the_best_checkpoints_adapter(tiny_model: Path, tmp_path: Path, keep_last):
    """train.load_best_model_at_end with the best evaluation at step 2 (greater_is_better on a falling
    eval loss makes the first one best). Was: the Trainer recorded the staging folder
    (.staging/checkpoint-2, renamed away when published) as the best checkpoint, could not find it at
    the end, and final/ silently held step 6's adapter. Now final/ holds checkpoint-2's, and the
    checkpoints' trainer_state.json name the published folder. With checkpoint.keep_last: 1, retention
    deleted the best checkpoint (the Trainer's own rotation keeps it): it is kept now, besides the
    newest."""
    import torch
    from safetensors.torch import load_file

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    best = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": True}
    train(load_recipe(run_recipe(tmp_path, tiny_model, "best", train=best, keep_last=keep_last)))
    run = tmp_path / "runs" / "best"
    assert [c.step for c in checkpoint.list_checkpoints(run)] == ([6, 2] if keep_last else [6, 4, 2])
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_global_step"] == 2 and state["best_model_checkpoint"] == str(run / "checkpoint-2")

    def adapter(folder: str) -> dict:  # values (final/ is saved from the loaded best adapter, in fp32)
        return {k: v.float() for k, v in load_file(str(run / folder / "adapter_model.safetensors")).items()}

    final = adapter("final")
    assert all(torch.equal(final[k], v) for k, v in adapter("checkpoint-2").items())
    assert not all(torch.equal(final[k], v) for k, v in adapter("checkpoint-6").items())


def test_a_write_out_of_room_is_named_by_what_stopped_it(tmp_path: Path):
    """The tests above fill the disk with a file size limit (EFBIG): its message says so rather than
    "no space left ... (75 GiB free)", which contradicted itself. A full disk, a quota and the writers
    that hide the errno (safetensors' "(os error 28)", torch's zip writer) each read as what they are."""
    import errno
    import os

    from qlora_sft.files import is_no_space, no_space_errno, no_space_message

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    cases = {
        "no space left on the file system of": [full, RuntimeError("I/O error: No space left on device (os error 28)")],
        "the disk quota on the file system of": [OSError(errno.EDQUOT, "Disk quota exceeded")],
        "a file grew past the largest this process may write": [OSError(errno.EFBIG, "File too large")],
    }
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    cases["no space left on the file system of"].append(torch_zip)
    for words, errors in cases.items():
        for exc in errors:
            assert is_no_space(exc) and no_space_errno(exc) is not None, exc
            assert no_space_message(tmp_path, exc).startswith(words), (exc, no_space_message(tmp_path, exc))
            assert str(tmp_path) in no_space_message(tmp_path, exc)
    for other in (OSError(errno.EACCES, "Permission denied"), RuntimeError("(os error 13)"), ValueError("x")):
        assert not is_no_space(other) and no_space_errno(other) is None
    assert no_space_message(tmp_path).startswith("no space left on the file system of")


def test_a_keep_last_lowered_at_a_resume_keeps_the_best_checkpoint(tiny_model: Path, tmp_path: Path):
    """train.load_best_model_at_end, best at step 2; the run is relaunched to train longer with
    checkpoint.keep_last: 1. The retention a resume applies before training did not know the best
    checkpoint and deleted it, so final/ could not hold its adapter. It is kept now, and final/ holds it."""
    import torch
    from safetensors.torch import load_file

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    best = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": True}
    train(load_recipe(run_recipe(tmp_path, tiny_model, "lowered", train=best)))
    run = tmp_path / "runs" / "lowered"
    shutil.rmtree(run / "final")  # as if stopped after step 6's checkpoint: the relaunch resumes from it
    longer = run_recipe(tmp_path, tiny_model, "lowered", train={**best, "max_steps": 8}, keep_last=1)
    kept = load_file(str(run / "checkpoint-2" / "adapter_model.safetensors"))
    assert train(load_recipe(longer)).global_step == 8
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [8, 2]
    final = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k].float(), v.float()) for k, v in kept.items())


def test_a_run_moved_elsewhere_publishes_its_best_checkpoint_from_where_it_is_now(tiny_model: Path, tmp_path: Path):
    """The checkpoints' trainer_state.json name the best checkpoint by its absolute path. A run moved to
    another folder (another machine, another file system) and resumed looked for it there: gone, so
    final/ held the last step's adapter (or, with the old folder still present, read another run's)."""
    import torch
    from safetensors.torch import load_file

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    best = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": True}
    train(load_recipe(run_recipe(tmp_path, tiny_model, "moved", train=best)))
    shutil.rmtree(tmp_path / "runs" / "moved" / "final")
    shutil.move(tmp_path / "runs", tmp_path / "elsewhere")
    raw = recipe_dict(
        tiny_model,
        tmp_path / "toy.jsonl",
        tmp_path / "elsewhere",
        run={"name": "moved"},
        train={**SHORT, **best, "max_steps": 8},
    )
    run = tmp_path / "elsewhere" / "moved"
    kept = load_file(str(run / "checkpoint-2" / "adapter_model.safetensors"))
    assert train(load_recipe(write_recipe(tmp_path / "moved.yaml", raw))).global_step == 8
    final = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k].float(), v.float()) for k, v in kept.items())


def test_a_manifest_that_lists_none_of_the_checkpoints_own_files_does_not_vouch_for_it(tmp_path: Path):
    """A manifest edited by hand (or written by some other tool) to `"files": {}` checked nothing, and
    the checkpoint counted as complete: a resume trusted an adapter and a trainer state nobody had
    verified. The files every checkpoint holds must be listed; the one that lacks them is skipped, named
    and kept, and the resume takes the older one."""
    from helpers import fake_checkpoint

    from qlora_sft.recipe import build_recipe

    recipe = build_recipe(recipe_dict(tmp_path / "model", tmp_path / "x.jsonl", tmp_path / "runs"))
    for step in (2, 4):
        fake_checkpoint(recipe.run_dir / f"checkpoint-{step}", step, world_size=1, global_batch=8)
    newest = recipe.run_dir / "checkpoint-4"
    manifest = json.loads((newest / checkpoint.MANIFEST).read_text())
    assert checkpoint.inspect_checkpoint(newest, verify=True).complete
    (newest / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "files": {}}))
    info = checkpoint.inspect_checkpoint(newest, verify=True)
    assert not info.complete
    assert "lists none of adapter_model.safetensors, adapter_config.json, trainer_state.json" in info.reason
    assert checkpoint.find_resume(recipe) == recipe.run_dir / "checkpoint-2"
    assert newest.is_dir()
    # one of them left out is enough
    files = {k: v for k, v in manifest["files"].items() if k != "trainer_state.json"}
    (newest / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "files": files}))
    assert "lists none of trainer_state.json" in checkpoint.inspect_checkpoint(newest).reason
    # final/ holds no trainer state: its manifest need not list one
    final = recipe.run_dir / "final"
    fake_checkpoint(final, 4)
    (final / "trainer_state.json").unlink()
    checkpoint.write_manifest(final, {"step": 4})
    assert checkpoint.inspect_checkpoint(final, verify=True).complete


def test_a_kill_while_retention_deletes_a_checkpoint_leaves_no_half_deleted_one(
    tiny_model: Path, tmp_path: Path, monkeypatch
):
    """SIGKILL while checkpoint.keep_last's retention deletes checkpoint-2, after checkpoint-4 (the last
    step's) was published (QLORA_SFT_FAULT=killretain@4: its adapter is gone, the rest not yet; a random
    kill lands there when deleting a large optimizer state takes seconds). Was: the half-deleted
    checkpoint-2 stayed in the run for good, as an incomplete checkpoint that retention never deleted
    (it counts only complete ones) and that no launch named (resume stops at the newest intact one),
    and the relaunch that published final/ from checkpoint-4 applied no retention at all. Now a deletion
    is a rename into .staging first, so a kill leaves no checkpoint-<step> that is half there, and the
    next launch finishes the deletion and says so."""
    import signal

    recipe = run_recipe(tmp_path, tiny_model, "retire", train={"max_steps": 4, "save_steps": 1}, keep_last=2)
    run = tmp_path / "runs" / "retire"
    monkeypatch.setenv("QLORA_SFT_FAULT", "killretain@4")
    first = launch(recipe)
    assert first.returncode == -signal.SIGKILL, (first.stdout + first.stderr)[-3000:]
    assert checkpoint.inspect_checkpoint(run / "checkpoint-4", verify=True).complete
    assert not (run / "final").exists()
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [4, 3]  # nothing half-deleted shows as one
    monkeypatch.delenv("QLORA_SFT_FAULT")
    again = launch(recipe)
    said = again.stdout + again.stderr
    assert again.returncode == 0, said[-3000:]
    assert "published as" in said and "finished deleting checkpoint-2" in said, said[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    assert not any((run / checkpoint.STAGING).iterdir())
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete


def test_a_training_gives_the_preemption_signals_back_when_it_returns(tiny_model: Path, tmp_path: Path):
    """`train` in a process that goes on (a notebook, a test worker) left its preemption handler on
    SIGTERM/SIGUSR1, which only notes the signal: the process then ignored SIGTERM, and a process pool
    it started later (datasets' tokenization with data.num_proc > 1) inherited the handler, so
    Pool.terminate after a Ctrl-C waited for its workers for ever (a CI run hung there)."""
    import signal

    from qlora_sft.recipe import build_recipe
    from qlora_sft.train import train

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    toy = write_toy_data(tmp_path / "toy.jsonl", n=24)
    train(build_recipe(recipe_dict(tiny_model, toy, tmp_path / "runs", train={"max_steps": 1})))
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_manifest_whose_step_was_edited_does_not_vouch_for_its_checkpoint(tmp_path: Path):
    """A manifest is not covered by a digest: its `step` edited by hand to the same size (`"step": 4` ->
    `"step": 6`) was believed. Export recorded the adapter of step 4 as step 6, and a relaunch of a run
    whose checkpoint-6 and final/ were gone published checkpoint-4's adapter as the final step-6 adapter
    "without training further". A checkpoint-<N> whose manifest says another step vouches for nothing:
    named, kept, and the resume takes the older one."""
    from helpers import fake_checkpoint

    from qlora_sft.recipe import build_recipe

    recipe = build_recipe(recipe_dict(tmp_path / "model", tmp_path / "x.jsonl", tmp_path / "runs"))
    for step in (2, 4):
        fake_checkpoint(recipe.run_dir / f"checkpoint-{step}", step, world_size=1, global_batch=8)
    edited = recipe.run_dir / "checkpoint-4"
    text = (edited / checkpoint.MANIFEST).read_text()
    (edited / checkpoint.MANIFEST).write_text(text.replace('"step": 4', '"step": 6', 1))
    for verify in (False, True):
        info = checkpoint.inspect_checkpoint(edited, verify=verify)
        assert not info.complete
        assert "step 6" in info.reason and "checkpoint-4" in info.reason
    assert checkpoint.find_resume(recipe) == recipe.run_dir / "checkpoint-2"
    assert edited.is_dir()
    # a renamed checkpoint folder is the same mismatch
    renamed = recipe.run_dir / "checkpoint-8"
    shutil.copytree(recipe.run_dir / "checkpoint-2", renamed)
    assert "step 2" in checkpoint.inspect_checkpoint(renamed).reason


def test_replayed_metrics_with_a_step_of_no_number_move_aside_without_a_crash(tmp_path: Path):
    """A metrics.jsonl line whose step is Infinity (valid JSON to Python), text or null, from an edit or
    another tool, crashed the resume that trims the replayed steps (OverflowError from int(inf)). Such a
    line moves to metrics.replayed.jsonl, kept out of the log like a line cut off by a crash; the steps
    up to the checkpoint stay."""
    from qlora_sft.checkpoint import trim_replayed_metrics

    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [
        '{"step": 1, "loss": 2.0}',
        '{"step": 2, "loss": 1.5}',
        '{"step": Infinity, "loss": 1.0}',
        '{"step": "x", "loss": 1.0}',
        '{"step": 3, "loss": 1.2}',
    ]
    (logs / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert trim_replayed_metrics(tmp_path, 2) == 3
    assert (logs / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    assert (logs / "metrics.replayed.jsonl").read_text() == "\n".join(lines[2:]) + "\n"
