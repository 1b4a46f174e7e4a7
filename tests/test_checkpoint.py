"""Complete-or-absent checkpoints, exact resume, preemption, retention, world-size changes.
Real processes: 2 CPU ranks over gloo through `accelerate launch`, killed and signalled for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    accelerate_cmd,
    cpu_env,
    fake_checkpoint,
    losses_by_step,
    recipe_dict,
    wait_for_losses,
    write_recipe,
    write_toy_data,
)

from qlora_sft import checkpoint
from qlora_sft.errors import RunDirError

pytestmark = pytest.mark.multiprocess

TRAIN = {
    "max_steps": 12,
    "logging_steps": 1,
    "save_steps": 1,
    "global_batch_size": 8,
    "per_device_train_batch_size": 4,
    "learning_rate": 5e-3,
}


def launch(
    recipe: Path, cwd: Path, ranks: int = 2, fault: str = "", extra: tuple[str, ...] = (), wait: bool = True
) -> subprocess.Popen | subprocess.CompletedProcess:
    env = cpu_env()
    if fault:
        env["QLORA_SFT_FAULT"] = fault
    if ranks == 1:
        cmd = [sys.executable, "-m", "qlora_sft", "train", str(recipe), *extra]
    else:
        cmd = accelerate_cmd("train", str(recipe), *extra, ranks=ranks)
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def rank_pids(launcher_pid: int) -> list[int]:
    """The training ranks under a launcher (its descendants running qlora_sft, launcher excluded)."""
    import psutil

    kids = psutil.Process(launcher_pid).children(recursive=True)
    return sorted(
        k.pid for k in kids if "qlora_sft" in " ".join(k.cmdline()) and "accelerate" not in " ".join(k.cmdline())
    )


@pytest.fixture(scope="module")
def setup(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ckpt")
    data = write_toy_data(root / "toy.jsonl", n=160)

    def recipe(name: str, **train) -> Path:
        return write_recipe(
            root / f"{name}.yaml",
            recipe_dict(tiny_model, data, root / "runs", run={"name": name}, train={**TRAIN, **train}),
        )

    return root, recipe


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, recipe = setup
    out = launch(recipe("straight"), root)
    assert out.returncode == 0, out.stderr[-3000:]
    return losses_by_step(root / "runs" / "straight")


def test_kill_one_rank_then_relaunch_gives_identical_losses(setup, uninterrupted):
    root, recipe = setup
    r = recipe("killed")
    first = launch(r, root, fault="kill@8:1")  # rank 1 is SIGKILLed as step 8 begins
    assert first.returncode != 0
    run_dir = root / "runs" / "killed"
    assert (run_dir / "checkpoint-7" / checkpoint.COMPLETE).is_file()
    assert not (run_dir / "checkpoint-8").exists()
    second = launch(r, root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "checkpoint-7" in second.stdout
    resumed = losses_by_step(run_dir)
    assert [resumed[s] for s in range(8, 13)] == [uninterrupted[s] for s in range(8, 13)]


def test_resume_on_a_different_world_size(setup, uninterrupted):
    """2 ranks -> 1 rank (accumulation 1 -> 2, same global batch) -> 2 ranks again, one run."""
    root, recipe = setup
    r = recipe("resize")
    assert launch(r, root, fault="kill@7").returncode != 0  # checkpoint-6 is the newest complete one
    out = launch(r, root, ranks=1, fault="kill@10")  # resumes at 6 on one rank, saves 9, is killed
    assert out.returncode != 0
    assert "saved by 2 rank(s), on 1 rank(s)" in out.stdout + out.stderr
    assert checkpoint.inspect_checkpoint(root / "runs" / "resize" / "checkpoint-9").complete
    out = launch(r, root)  # and back: 1 rank -> 2 ranks, from checkpoint-9
    assert out.returncode == 0, out.stderr[-3000:]
    assert "saved by 1 rank(s), on 2 rank(s)" in out.stdout + out.stderr
    got = losses_by_step(root / "runs" / "resize")
    for s in range(7, 13):
        assert got[s] == pytest.approx(uninterrupted[s], rel=1e-5), s


def test_preemption_signal_saves_and_exits_for_requeue(setup):
    root, recipe = setup
    r = recipe("preempt", max_steps=400, save_steps=1000)
    proc = launch(r, root, wait=False)
    run_dir = root / "runs" / "preempt"
    wait_for_losses(run_dir, 3)
    workers = rank_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGUSR1)  # one rank only: the other learns it at the step boundary
    t0 = time.time()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun reports a non-zero worker exit; the marker says why
    marker = json.loads((run_dir / checkpoint.PREEMPTED).read_text())
    step = marker["step"]
    assert marker["signal"] in ("SIGUSR1", "another rank's signal")
    assert (run_dir / f"checkpoint-{step}" / checkpoint.COMPLETE).is_file()
    assert "exiting with code 75" in out and time.time() - t0 < 120
    manifest = json.loads((run_dir / f"checkpoint-{step}" / checkpoint.MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == step
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= set(manifest["files"])
    # the requeued launch resumes there and finishes
    done = launch(r, root, extra=(f"train.max_steps={step + 2}",))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (run_dir / checkpoint.PREEMPTED).exists()
    assert (run_dir / "final" / checkpoint.COMPLETE).is_file()
    assert max(losses_by_step(run_dir)) == step + 2


def test_single_process_preemption_exit_code_is_75(setup):
    root, recipe = setup
    r = recipe("preempt1", max_steps=400, save_steps=1000)
    proc = launch(r, root, ranks=1, wait=False)
    run_dir = root / "runs" / "preempt1"
    wait_for_losses(run_dir, 1)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGTERM)  # a second signal while saving changes nothing
    proc.communicate(timeout=300)
    assert proc.returncode == checkpoint.REQUEUE_EXIT_CODE
    step = json.loads((run_dir / checkpoint.PREEMPTED).read_text())["step"]
    assert checkpoint.inspect_checkpoint(run_dir / f"checkpoint-{step}").complete


def test_crash_during_save_resumes_from_the_previous_checkpoint(setup):
    root, recipe = setup
    r = recipe("crash", max_steps=8, save_steps=4)
    first = launch(r, root, ranks=1, fault="crashsave@8:0")
    assert first.returncode == -signal.SIGKILL
    run_dir = root / "runs" / "crash"
    assert checkpoint.inspect_checkpoint(run_dir / "checkpoint-4").complete
    assert not (run_dir / "checkpoint-8").exists()  # never visible: it stayed in staging
    assert (run_dir / checkpoint.STAGING / "checkpoint-8" / "adapter_model.safetensors").is_file()
    second = launch(r, root, ranks=1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "an interrupted save" in second.stdout and "resuming from" in second.stdout
    assert "checkpoint-4" in second.stdout
    assert checkpoint.inspect_checkpoint(run_dir / "checkpoint-8").complete


def test_a_staged_checkpoint_with_its_marker_is_not_called_never_completed(tmp_path: Path, caplog):
    """Killed between a save's COMPLETE marker and the rename out of .staging/, the checkpoint was complete
    but not yet in place; the resume called it "an interrupted save (it never completed)". It is still
    not resumed from (only checkpoints in the run directory are); a staged one without the marker is
    what that sentence describes."""
    import logging

    from qlora_sft.recipe import build_recipe

    recipe = build_recipe(recipe_dict(tmp_path / "model", tmp_path / "x.jsonl", tmp_path / "runs"))
    staging = recipe.run_dir / checkpoint.STAGING
    fake_checkpoint(recipe.run_dir / "checkpoint-2", 2, world_size=1, global_batch=8)
    fake_checkpoint(staging / "checkpoint-4", 4, world_size=1, global_batch=8)  # marker written, not renamed
    (staging / "checkpoint-6").mkdir()  # the save itself was interrupted
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert checkpoint.find_resume(recipe) == recipe.run_dir / "checkpoint-2"
    said = {Path(r.args[0]).name: r.getMessage() for r in caplog.records if r.args}
    assert "never completed" not in said["checkpoint-4"], said
    assert (
        "it was complete (its COMPLETE marker is written) but not yet moved into place as "
        f"{recipe.run_dir / 'checkpoint-4'} when the launch that saved it stopped" in said["checkpoint-4"]
    ), said
    assert "an interrupted save (it never completed)" in said["checkpoint-6"], said
    assert (staging / "checkpoint-4").is_dir() and (staging / "checkpoint-6").is_dir()


def test_corrupt_or_unmarked_checkpoints_are_skipped_not_deleted(tmp_path: Path, tiny_model: Path):
    from qlora_sft.recipe import build_recipe

    data = write_toy_data(tmp_path / "toy.jsonl", n=40)
    recipe = build_recipe(recipe_dict(tiny_model, data, tmp_path / "runs"))
    run_dir = recipe.run_dir
    for step in (2, 4, 6):
        fake_checkpoint(run_dir / f"checkpoint-{step}", step, world_size=1, global_batch=8)
    assert checkpoint.find_resume(recipe) == run_dir / "checkpoint-6"
    size = (run_dir / "checkpoint-6" / "adapter_model.safetensors").stat().st_size
    (run_dir / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"x" * 40)  # truncated
    (run_dir / "checkpoint-4" / checkpoint.COMPLETE).unlink()  # marker gone
    infos = {i.step: i for i in checkpoint.list_checkpoints(run_dir)}
    assert f"has 40 bytes, expected {size}" in infos[6].reason
    assert "no COMPLETE marker" in infos[4].reason
    assert checkpoint.find_resume(recipe) == run_dir / "checkpoint-2"
    assert (run_dir / "checkpoint-6").is_dir() and (run_dir / "checkpoint-4").is_dir()


def test_retention_keeps_the_newest_and_never_touches_another_run(setup):
    root, recipe = setup
    other = root / "runs" / "someone-else" / "checkpoint-1"
    other.mkdir(parents=True)
    checkpoint.write_manifest(other, {"step": 1})
    r = recipe("keep", max_steps=10, save_steps=2)
    out = launch(r, root, ranks=1, extra=("checkpoint.keep_last=2",))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = root / "runs" / "keep"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]
    assert (other / checkpoint.COMPLETE).is_file()
    # an incomplete checkpoint is never removed by retention
    (run_dir / "checkpoint-1").mkdir()
    assert checkpoint.apply_retention(run_dir, 1) == [run_dir / "checkpoint-8"]
    assert (run_dir / "checkpoint-1").is_dir() and (run_dir / "checkpoint-10").is_dir()


def test_deepspeed_checkpoint_on_another_world_size_is_refused(tmp_path: Path):
    d = tmp_path / "checkpoint-5"
    (d / "global_step5").mkdir(parents=True)
    (d / "latest").write_text("global_step5")
    checkpoint.write_manifest(d, {"step": 5, "world_size": 4, "global_batch": 16})
    assert json.loads((d / checkpoint.MANIFEST).read_text())["deepspeed_tag"] == "global_step5"
    with pytest.raises(RunDirError, match=r"of 4 rank\(s\).*this launch is deepspeed with 2.*ds_to_uni"):
        checkpoint.check_resume(d, world_size=2, global_batch=16, mode_kind="deepspeed")
    with pytest.raises(RunDirError, match=r"DeepSpeed checkpoint of 4 rank\(s\).*this launch is ddp with 4"):
        checkpoint.check_resume(d, world_size=4, global_batch=16, mode_kind="ddp")
    with pytest.raises(RunDirError, match="saved with global batch 16, this launch has 32"):
        checkpoint.check_resume(d, world_size=4, global_batch=32, mode_kind="deepspeed")
    assert checkpoint.check_resume(d, world_size=4, global_batch=16, mode_kind="deepspeed")["step"] == 5


def test_which_launch_changes_a_checkpoint_survives(tmp_path: Path):
    """Refused before anything loads: a checkpoint of one launch mode family resumed in another, or
    an FSDP checkpoint on another world size (its optimizer state is keyed by FSDP's parameter names).
    Allowed: one process, CPU ranks and DDP on any number of processes, same global batch."""
    ddp = tmp_path / "checkpoint-3"
    ddp.mkdir()
    checkpoint.write_manifest(ddp, {"step": 3, "world_size": 2, "global_batch": 8, "mode": "ddp"})
    assert checkpoint.check_resume(ddp, world_size=1, global_batch=8, mode_kind="single_gpu")["step"] == 3
    assert checkpoint.check_resume(ddp, world_size=4, global_batch=8, mode_kind="ddp")["step"] == 3
    with pytest.raises(RunDirError, match=r"saved by a ddp launch of 2 rank\(s\); this launch is fsdp with 2"):
        checkpoint.check_resume(ddp, world_size=2, global_batch=8, mode_kind="fsdp")
    fsdp = tmp_path / "checkpoint-4"
    fsdp.mkdir()
    checkpoint.write_manifest(fsdp, {"step": 4, "world_size": 2, "global_batch": 8, "mode": "fsdp"})
    assert checkpoint.check_resume(fsdp, world_size=2, global_batch=8, mode_kind="fsdp")["step"] == 4
    with pytest.raises(RunDirError, match=r"fsdp launch of 2 rank\(s\); this launch is fsdp with 4.*as it was"):
        checkpoint.check_resume(fsdp, world_size=4, global_batch=8, mode_kind="fsdp")
    with pytest.raises(RunDirError, match="this launch is ddp with 2"):
        checkpoint.check_resume(fsdp, world_size=2, global_batch=8, mode_kind="ddp")


def test_checkpoint_files_are_listed_in_the_manifest(setup, uninterrupted):
    root, _ = setup
    ckpt = root / "runs" / "straight" / "checkpoint-12"
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 12 and manifest["examples_consumed"] == 96 and manifest["world_size"] == 2
    for rel, entry in manifest["files"].items():  # every file with its size and digest
        assert (ckpt / rel).stat().st_size == entry["size"]
        assert entry["digest"] == checkpoint.file_digest(ckpt / rel)
    assert {
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "adapter_model.safetensors",
    } <= set(manifest["files"])
    assert not list((root / "runs" / "straight" / checkpoint.STAGING).glob("checkpoint-*"))
    assert REPO.is_dir()
