"""What a random-kill sweep (SIGKILL) did not exercise: Ctrl-C (a real SIGINT) at moments of a
checkpoint's save, two launches of one run directory at the same instant, and a finished run
relaunched with another recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, losses_by_step, short_run_recipe, torchrun_script

from qlora_sft import checkpoint

pytestmark = pytest.mark.multiprocess


# `qlora-sft ARGS` with a real SIGINT (what Ctrl-C sends) sent to this process at one moment of the
# save of checkpoint STEP: `optimizer` (its optimizer state half-written), `marker` (manifest written,
# COMPLETE not yet), `retention` (the retention after it has begun to delete an older checkpoint).
CTRL_C = """
import os, shutil, signal, sys
from pathlib import Path
import torch
from qlora_sft import files

where, step, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at the next instruction

save = torch.save
def torch_save(obj, f, *a, **k):
    if where == "optimizer" and str(f).endswith(f"checkpoint-{step}/optimizer.pt"):
        with open(f, "wb") as out:
            out.write(b"x" * 1000)
            ctrl_c()
    return save(obj, f, *a, **k)
torch.save = torch_save

atomic_write = files.atomic_write
def atomic(path, write):
    if where == "marker" and path.name == "COMPLETE" and path.parent.name == f"checkpoint-{step}":
        ctrl_c()
    return atomic_write(path, write)
files.atomic_write = atomic

rmtree = shutil.rmtree
def rm(path, *a, **k):
    if where == "retention" and Path(path).name.startswith("deleting-checkpoint-"):
        (Path(path) / "adapter_model.safetensors").unlink(missing_ok=True)
        ctrl_c()
    return rmtree(path, *a, **k)
shutil.rmtree = rm

from qlora_sft.cli import main
sys.exit(main(args))
"""


run_recipe = short_run_recipe


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}


@pytest.mark.parametrize(
    ("where", "step", "left", "resumes"),
    [
        ("optimizer", 4, [2], 2),  # checkpoint-4 half-written: it never counts
        ("marker", 4, [2], 2),  # files and manifest written, no COMPLETE: it never counts
        ("retention", 6, [6, 4], 6),  # checkpoint-6 complete, checkpoint-2 half-deleted
    ],
)
def test_ctrl_c_during_a_checkpoint_save_names_the_run_and_what_a_relaunch_resumes(
    tiny_model: Path, tmp_path: Path, where: str, step: int, left: list[int], resumes: int
):
    """Ctrl-C (a real SIGINT) at three moments of a checkpoint's save, with checkpoint.keep_last: 2.
    The save's state was right before (a partial save never counts, nothing complete is lost, the
    relaunch resumes from the newest complete one), but all Ctrl-C said was "qlora-sft train:
    interrupted", after a progress bar on the same line: not which run, nor what a relaunch does.
    Now it exits 130 with one line on a line of its own that names the run directory, its newest
    complete checkpoint and the command that resumes it; no traceback."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    name = f"ctrl-c-{where}"
    recipe = run_recipe(tmp_path, tiny_model, name, keep_last=2)
    run = tmp_path / "runs" / name
    driver = tmp_path / "ctrl_c.py"
    driver.write_text(CTRL_C)
    out = subprocess.run(
        [sys.executable, str(driver), where, str(step), "train", str(recipe)],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 130, (out.stdout + out.stderr)[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.rstrip("\n").split("\n")[-1]
    newest = run / f"checkpoint-{left[0]}"
    assert last == (
        f"qlora-sft train: interrupted. Run {run}: its newest complete checkpoint is {newest} (step {left[0]}); "
        "run the same command again to resume from it."
    ), out.stderr[-3000:]

    assert [c.step for c in checkpoint.list_checkpoints(run)] == left  # no partial one under a checkpoint's name
    for s in left:
        assert checkpoint.inspect_checkpoint(run / f"checkpoint-{s}", verify=True).complete
    assert not (run / checkpoint.LOCK).exists()  # released on the way out
    before = losses_by_step(run)

    result = train(load_recipe(recipe))  # the same command
    assert result.global_step == 6
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete
    after = losses_by_step(run)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert {s: after[s] for s in before if s <= resumes} == {s: before[s] for s in before if s <= resumes}
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [6, 4]
    assert not any((run / checkpoint.STAGING).glob(f"{checkpoint.DELETING}*"))


HOLD = """
import sys, time
from pathlib import Path
from qlora_sft.checkpoint import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("moment", ["lock-taken", "recipe-being-written"])
def test_a_second_launch_meeting_a_new_run_directorys_lock_names_the_job_that_holds_it(
    tiny_model: Path, tmp_path: Path, monkeypatch, moment: str
):
    """Two launches of a new run at the same instant: the first has taken the run directory's LOCK and
    not yet written recipe.yaml (a few milliseconds), or is writing it (its atomic temporary lies beside
    the LOCK: CI, 2026-12-02, the race test below). Was: the second was refused with "exists and is
    not a qlora-sft run (no recipe.yaml) ... set run.overwrite=true to move it aside", naming neither
    the other job nor the lock, and pointing at a flag that moves a live run aside. The same when the
    first was killed in that moment: every relaunch was refused until the user deleted the folder.
    Now the lock decides: a live holder is named (before any model loads), a dead one's run directory
    is taken over and trains (a cut-off temporary removed)."""
    from qlora_sft import model
    from qlora_sft.errors import RunDirError
    from qlora_sft.files import atomic_prefix
    from qlora_sft.recipe import RUN_RECIPE, load_recipe
    from qlora_sft.train import train

    recipe = load_recipe(run_recipe(tmp_path, tiny_model, "twin", train={"max_steps": 2}))
    run = tmp_path / "runs" / "twin"
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    holder = subprocess.Popen([sys.executable, str(script), str(run)], env=env(), stdout=subprocess.PIPE, text=True)
    stray = run / f"{atomic_prefix(RUN_RECIPE)}otherhost-{holder.pid}-0a1b2c3d"
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert sorted(p.name for p in run.iterdir()) == [checkpoint.LOCK]
        if moment == "recipe-being-written":
            (run / "logs").mkdir()
            stray.write_text("model:\n  name_or_path: half-writ")
        left = sorted(p.name for p in run.iterdir())

        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded")

        with monkeypatch.context() as m:
            m.setattr(model, "load_model", no_model)
            with pytest.raises(RunDirError) as refused:
                train(recipe)
        said = str(refused.value)
        assert f"run directory {run} is in use by another qlora-sft job" in said, said
        assert f"pid {holder.pid}" in said and "not a qlora-sft run" not in said
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in run.iterdir()) == left  # as the killed launch left it
    assert json.loads((run / checkpoint.LOCK).read_text())["pid"] == holder.pid
    assert train(recipe).global_step == 2  # its holder is provably gone: the run starts
    assert not stray.exists()
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete


def test_a_users_folder_holding_a_file_named_lock_is_not_a_run(tiny_model: Path, tmp_path: Path):
    """A folder of the user's that happens to hold a file named LOCK is not taken for a launch's run
    directory: refused, the file untouched."""
    from qlora_sft.errors import RunDirError
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / checkpoint.LOCK).write_text("my lock notes\n")
    other = load_recipe(run_recipe(tmp_path, tiny_model, "mine", train={"max_steps": 2}))
    with pytest.raises(RunDirError, match=r"exists and is not a qlora-sft run"):
        train(other)
    assert (mine / checkpoint.LOCK).read_text() == "my lock notes\n"


def test_both_launches_started_at_the_same_instant_one_trains_the_other_is_refused(tiny_model: Path, tmp_path: Path):
    """Two `qlora-sft train` of one new run started together, twice: exactly one trains, the other
    exits 2 naming the run directory and the other job, never 'not a qlora-sft run'."""
    recipe = run_recipe(tmp_path, tiny_model, "race", train={"max_steps": 1, "save_steps": 1})
    for i in range(2):
        run = tmp_path / "runs" / f"race{i}"
        cmd = [sys.executable, "-m", "qlora_sft", "train", str(recipe), f"run.name=race{i}"]
        logs = [tmp_path / f"race{i}-{who}.err" for who in "ab"]
        both = [
            subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=log.open("w"))
            for log in logs
        ]
        outs = [(p.wait(timeout=600), log.read_text()) for p, log in zip(both, logs, strict=True)]
        codes = sorted(rc for rc, _ in outs)
        assert codes == [0, 2], [err[-2000:] for _, err in outs]
        refused = next(err for rc, err in outs if rc == 2)
        assert f"run directory {run} is in use by another qlora-sft job" in refused, refused[-2000:]
        assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete


def test_a_finished_run_relaunched_with_another_recipe_is_refused_not_reported_done(
    tiny_model: Path, tmp_path: Path, capsys
):
    """A finished run relaunched with a changed recipe (another learning rate, another LoRA rank, a
    sweep reusing one run.name). Was: "finished at step 6 ... Nothing to do", exit 0: the change
    silently ignored, and a sweep's script took the old run for the new setting's result. Likewise
    `checkpoint.resume=never` (which is refused where checkpoints exist) and `run.overwrite=true` with
    another recipe (the user asks to move the old run aside: nothing happened). Now another recipe is
    refused naming the change, as for a run that has not finished; resume=never is refused; with
    run.overwrite the old run is moved aside and the new recipe trains. The same recipe, or only a
    different max_steps at or below the finished step, is still 'finished', nothing written."""
    from qlora_sft.errors import RunDirError
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    path = run_recipe(tmp_path, tiny_model, "done", train={"max_steps": 2})
    run = tmp_path / "runs" / "done"
    assert train(load_recipe(path)).global_step == 2

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    before = snapshot()
    assert train(load_recipe(path)).finished
    assert train(load_recipe(path, ["train.max_steps=1"])).finished
    assert snapshot() == before

    with pytest.raises(RunDirError, match=r"holds a run of a different recipe:\n    train.learning_rate: 0.01 -> 0.02"):
        train(load_recipe(path, ["train.learning_rate=0.02"]))
    with pytest.raises(RunDirError, match=r"different recipe:\n    lora.r: 8 -> 4"):
        train(load_recipe(path, ["lora.r=4"]))
    with pytest.raises(RunDirError, match=r"checkpoint.resume=never but .* already has checkpoints"):
        train(load_recipe(path, ["checkpoint.resume=never"]))
    assert snapshot() == before

    capsys.readouterr()
    replaced = train(load_recipe(path, ["train.learning_rate=0.02", "run.overwrite=true"]))
    assert not replaced.finished and replaced.global_step == 2
    (aside,) = run.parent.glob("done.replaced-*")
    assert {str(p.relative_to(aside)): p.read_bytes() for p in sorted(aside.rglob("*")) if p.is_file()} == before
    assert read_lr(run) == 0.02
    assert train(load_recipe(path, ["train.learning_rate=0.02"])).finished  # the new run, finished
    # run.overwrite with the same recipe: still finished, nothing moved, and the log says why (it said
    # only "Nothing to do", the key the user gave unmentioned)
    capsys.readouterr()
    assert train(load_recipe(path, ["train.learning_rate=0.02", "run.overwrite=true"])).finished
    said = "".join(capsys.readouterr())
    assert "Nothing to do" in said and "run.overwrite replaces a run only for another recipe, and this" in said
    assert len(list(run.parent.glob("done.replaced-*"))) == 1


def read_lr(run: Path) -> float:
    import yaml

    return float(yaml.safe_load((run / "recipe.yaml").read_text())["train"]["learning_rate"])


def test_ctrl_c_before_the_run_directory_is_touched_says_only_interrupted(tiny_model: Path, tmp_path: Path):
    """Ctrl-C while the launch is still starting (here: as it reads the recipe's data): nothing of the
    run was written, so there is nothing to name; exit 130, one line, no traceback."""
    recipe = run_recipe(tmp_path, tiny_model, "early")
    driver = tmp_path / "early.py"
    driver.write_text(
        "import os, signal, sys\n"
        "from qlora_sft import plan\n"
        "def check(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "plan.check_output_dir = check\n"
        "from qlora_sft.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = subprocess.run(
        [sys.executable, str(driver), "train", str(recipe)], cwd=tmp_path, env=env(), capture_output=True, text=True
    )
    assert out.returncode == 130 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.rstrip("\n").split("\n")[-1] == "qlora-sft train: interrupted", out.stderr[-3000:]
    assert not (tmp_path / "runs" / "early").exists()


# Under torchrun (2 CPU ranks): rank 0 presses Ctrl-C for the user, as a terminal does (SIGINT to the
# launcher's process group; torchrun starts each rank in a session of its own and passes the SIGINT on
# to every rank) at one moment: `step` (as training step STEP begins on rank 0) or `optimizer` (checkpoint STEP's
# optimizer state half-written). Each rank notes its pid in PIDS/<rank>, and the CLI's exit code in
# PIDS/<rank>.exit.
CTRL_C_RANKS = """
import os, signal, sys, time
from pathlib import Path
import torch, transformers

where, step, pids, args = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
rank = int(os.environ["RANK"])
(pids / str(rank)).write_text(str(os.getpid()))

def ctrl_c():
    os.killpg(os.getpgid(os.getppid()), signal.SIGINT)  # the launcher's group: what the terminal signals

training_step = transformers.Trainer.training_step
def step_begins(self, *a, **k):
    if where == "step" and rank == 0 and self.state.global_step == step - 1:
        ctrl_c()
        time.sleep(60)  # until torchrun's SIGINT reaches this rank (rank 1 waits in the step's all-reduce)
    return training_step(self, *a, **k)
transformers.Trainer.training_step = step_begins

save = torch.save
def torch_save(obj, f, *a, **k):
    if where == "optimizer" and str(f).endswith(f"checkpoint-{step}/optimizer.pt"):
        with open(f, "wb") as out:
            out.write(b"x" * 1000)
            ctrl_c()
            time.sleep(60)  # until torchrun's SIGINT reaches this rank
    return save(obj, f, *a, **k)
torch.save = torch_save

from qlora_sft.cli import main
code = main(args)
(pids / f"{rank}.exit").write_text(str(code))
sys.exit(code)
"""


@pytest.mark.parametrize(("where", "step"), [("step", 4), ("optimizer", 4)])
def test_ctrl_c_of_two_ranks_under_torchrun_ends_every_rank_with_one_line_and_the_relaunch_resumes(
    tiny_model: Path, tmp_path: Path, where: str, step: int
):
    """Ctrl-C of `torchrun --nproc_per_node 2 -m qlora_sft train R` (the launcher's process group gets
    SIGINT; torchrun passes it on to both ranks) as step 4 begins, or halfway through checkpoint-4's
    optimizer state. Every rank exits, the launch fails (torchrun itself exits 1 over its own
    SignalException: its warnings and traceback are torchrun's, not the ranks'), the lock is released,
    the half-written checkpoint never counts, and the same command resumes from checkpoint-2 and
    finishes. Was: each rank printed the same "interrupted" line; now rank 0 alone says it (the others
    exit 130 without a word)."""
    import psutil

    name = f"ctrl-c-ranks-{where}"
    recipe = run_recipe(tmp_path, tiny_model, name)
    run = tmp_path / "runs" / name
    driver = tmp_path / "ctrl_c_ranks.py"
    driver.write_text(CTRL_C_RANKS)
    pids = tmp_path / "pids"
    pids.mkdir()
    code, out, err = torchrun_script(str(driver), where, str(step), str(pids), "train", str(recipe), cwd=tmp_path)
    assert code != 0, (out + err)[-3000:]
    ranks = [int((pids / str(r)).read_text()) for r in (0, 1)]
    alive = [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive  # no rank outlives the launcher
    assert [(pids / f"{r}.exit").read_text() for r in (0, 1)] == ["130", "130"], err[-3000:]

    said = [line for line in (out + err).splitlines() if "qlora-sft train: interrupted" in line]
    newest = run / "checkpoint-2"
    assert said == [
        f"qlora-sft train: interrupted. Run {run}: its newest complete checkpoint is {newest} (step 2); "
        "run the same command again to resume from it."
    ], (out + err)[-3000:]
    for traceback in err.split("Traceback (most recent call last)")[1:]:  # torchrun's own, if any: no rank's
        assert "qlora_sft" not in traceback and str(driver) not in traceback, err[-3000:]

    assert [c.step for c in checkpoint.list_checkpoints(run)] == [2]  # no partial one under a checkpoint's name
    assert checkpoint.inspect_checkpoint(newest, verify=True).complete
    assert not (run / checkpoint.LOCK).exists()  # released on the way out
    before = losses_by_step(run)

    code, again, err = torchrun_script("-m", "qlora_sft", "train", str(recipe), cwd=tmp_path)
    assert code == 0, (again + err)[-3000:]
    assert f"resuming from {newest}" in again, again[-3000:]
    assert checkpoint.inspect_checkpoint(run / "final", verify=True).complete
    after = losses_by_step(run)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert {s: after[s] for s in (1, 2)} == {s: before[s] for s in (1, 2)}
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [6, 4, 2]
