"""Every rank trains the same recipe with the same packages. Was: each rank read the recipe file and
its own command line, and nothing compared them: a node started with another override (a SLURM
script that adds one per node), a recipe edited between two nodes' starts, or a node with another
transformers trained another learning rate, or saved other files, and DDP said nothing (it averages
gradients; each rank's optimizer steps with its own settings), so the replicas drifted apart. Now
the ranks' recipes and versions are gathered with their ranks, before the run directory, the data or
the model, and a difference is refused naming the key, both values and both ranks' hosts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import REPO, cpu_env, short_run_recipe, torchrun_script

from qlora_sft.launch import RANK_PACKAGES, sameness_problem

VERSIONS = dict.fromkeys(RANK_PACKAGES, "1.0")


def report(rank: int, host: str = "a", versions: dict | None = None, **recipe: object) -> dict:
    flat = {"train.learning_rate": 2e-4, "model.name_or_path": "/models/m", "data.sources": [{"path": "/d/a.jsonl"}]}
    return {"rank": rank, "host": host, "recipe": {**flat, **recipe}, "versions": versions or VERSIONS}


def test_ranks_with_other_recipes_or_packages_are_refused_and_other_paths_noted():
    assert sameness_problem([report(0), report(1, "b")]) == (None, [])

    problem, _ = sameness_problem([report(0), report(1), report(2, "b", **{"train.learning_rate": 1e-3})])
    assert problem is not None and problem.startswith(
        "the ranks read different recipes (train.learning_rate: 0.0002 on rank 0 (host a), 0.001 on rank 2 (host b))"
    ), problem
    assert "give every node the same command line" in problem and problem.endswith("Nothing was loaded or written.")

    other = {**VERSIONS, "transformers": "5.23.0"}
    problem, _ = sameness_problem([report(0), report(1, "b", versions=other)])
    assert problem is not None and "transformers 1.0 on rank 0 (host a), 5.23.0 on rank 1 (host b)" in problem
    assert "Install one environment on every node" in problem

    # a node-local copy of the model and the data: noted once, not refused
    local = {"model.name_or_path": "/scratch/m", "data.sources": [{"path": "/scratch/a.jsonl"}]}
    problem, notes = sameness_problem([report(0), report(1, "b", **local), report(2, "c", **local)])
    assert problem is None and len(notes) == 1, notes
    assert "rank 1 (host b) names its files by other paths than rank 0 (host a)" in notes[0]
    assert "and 1 more rank(s) as well: each node reads its own copy, which must hold the same files" in notes[0]
    # a source that differs in more than its path is another recipe
    weighted = {"data.sources": [{"path": "/d/a.jsonl", "weight": 2.0}]}
    assert sameness_problem([report(0), report(1, **weighted)])[0] is not None


DRIVER = """
import os, sys
from qlora_sft.cli import main
args = sys.argv[1:]
if os.environ["RANK"] == "1":  # this node's command line carries one more override
    args.append("train.learning_rate=0.001")
sys.exit(main(args))
"""


def test_two_ranks_launched_with_other_overrides_are_refused_before_anything_is_written(
    tiny_model: Path, tmp_path: Path
):
    recipe = short_run_recipe(tmp_path, tiny_model, "drift")
    driver = tmp_path / "drift.py"
    driver.write_text(DRIVER)
    code, out, err = torchrun_script(str(driver), "train", str(recipe), cwd=tmp_path, timeout=300)
    said = out + err
    assert code != 0, said[-3000:]
    assert "launch: the ranks read different recipes (train.learning_rate: 0.01 on rank 0" in said, said[-3000:]
    assert "0.001 on rank 1" in said and "Nothing was loaded or written." in said, said[-3000:]
    assert not (tmp_path / "runs" / "drift").exists()  # refused before the run directory was made
    # said once, by rank 0, though both ranks met it (each printed it before)
    assert said.count("the ranks read different recipes") == 1, said[-3000:]


def test_a_refusal_the_main_process_decides_is_said_once_not_once_per_rank(tiny_model: Path, tmp_path: Path):
    """An outcome rank 0 decides and every rank raises (`main_process_decides`: here a run directory
    that is someone's folder, not a run) was printed by each rank; rank 0 alone says it now, and every
    rank still exits 2."""
    recipe = short_run_recipe(tmp_path, tiny_model, "mine")
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    code, out, err = torchrun_script("-m", "qlora_sft", "train", str(recipe), cwd=tmp_path, timeout=300)
    said = out + err
    assert code != 0, said[-3000:]
    assert said.count(f"run directory {mine} exists and is not a qlora-sft run") == 1, said[-3000:]
    assert "exitcode: 2" in said, said[-3000:]  # (torchrun's line for the failed rank)
    assert (mine / "notes.txt").read_text() == "my notes\n" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_an_agreed_refusal_in_a_single_process_with_a_stray_rank_variable_is_said(tiny_model: Path, tmp_path: Path):
    """A refusal every rank raises alike is said by rank 0 alone. Was: rank 0 was told by $RANK, so a
    single process (no process group) in a shell that had RANK=1 left exported exited 2 in silence."""
    recipe = short_run_recipe(tmp_path, tiny_model, "mine")
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    env = {**cpu_env(), "PYTHONPATH": str(REPO / "src"), "RANK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "qlora_sft", "train", str(recipe)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: run directory {mine} exists and is not a qlora-sft run" in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_ranks_whose_model_paths_name_other_models_are_refused_not_noted(tiny_model: Path, tmp_path: Path):
    """`model.name_or_path` may differ between ranks for a node-local copy of the model. Was: any
    difference was taken for one and noted, so a node started with another model (`Qwen/Qwen2.5-0.5B`
    here, `...-Instruct` there, of one shape: DDP averages their gradients without an error) trained.
    Now each rank reports what its path holds (`base_fingerprint`) and other files are refused; a
    copy of the same files is still noted."""
    from qlora_sft.checkpoint import model_folder_fingerprint

    hub = {"model.name_or_path": "Qwen/Qwen2.5-0.5B"}
    instruct = {"model.name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}
    a = {**report(0, **hub), "base_model": {"hub_id": "Qwen/Qwen2.5-0.5B", "revision": None}}
    b = {**report(1, "b", **instruct), "base_model": {"hub_id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": None}}
    problem, _ = sameness_problem([a, b])
    assert problem is not None and "model.name_or_path: 'Qwen/Qwen2.5-0.5B' on rank 0 (host a)" in problem, problem
    assert "'Qwen/Qwen2.5-0.5B-Instruct' on rank 1 (host b)" in problem and "other model files" in problem, problem

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    same = {**report(1, "b", **{"model.name_or_path": str(copy)}), "base_model": model_folder_fingerprint(copy)}
    here = {**report(0, **{"model.name_or_path": str(tiny_model)}), "base_model": model_folder_fingerprint(tiny_model)}
    problem, notes = sameness_problem([here, same])
    assert problem is None and len(notes) == 1 and "names its files by other paths" in notes[0], (problem, notes)
    weights = next(f for f in copy.iterdir() if f.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one byte of the weights: another model of the same shape
    weights.write_bytes(bytes(data))
    other = {**same, "base_model": model_folder_fingerprint(copy)}
    problem, _ = sameness_problem([here, other])
    assert problem is not None and f"{weights.name}: other contents, same size" in problem, problem


def test_an_error_not_meant_for_people_on_the_main_process_is_told_to_the_other_ranks(tmp_path: Path):
    """`main_process_decides`: rank 0's work raising anything but a UserError (an OSError making the
    run directory, a bug) left the other ranks waiting in the broadcast for an outcome never sent;
    under srun, whose tasks do not end with a failed one, until the process group's timeout. Now
    they raise a UserError naming rank 0's error, at once, and rank 0 raises its own."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys, time\n"
        "import torch.distributed as dist\n"
        "from qlora_sft.checkpoint import main_process_decides\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "def work():\n"
        "    raise PermissionError(13, 'Permission denied', '/shared/runs/x')\n"
        "try:\n"
        "    main_process_decides(work)\n"
        "except Exception as exc:\n"
        "    print(f'rank {rank} raised {type(exc).__name__}: {exc}', flush=True)\n"
        "    time.sleep(3 if rank == 0 else 0)  # (rank 0 stays: without the outcome, rank 1 would still wait)\n"
        "    sys.exit(2)\n"
    )
    code, out, err = torchrun_script(str(driver), cwd=tmp_path, timeout=120)
    said = out + err
    assert code != 0, said[-3000:]
    assert "rank 0 raised PermissionError: [Errno 13] Permission denied: '/shared/runs/x'" in said, said[-3000:]
    assert (
        "rank 1 raised UserError: the main process (rank 0) failed: PermissionError: [Errno 13] Permission denied: "
        "'/shared/runs/x'" in said
    ), said[-3000:]


def test_a_failed_shared_write_on_the_main_process_stops_the_other_ranks_too(tmp_path: Path):
    """`main_process_writes`: the main process's write failing inside the block (a full disk, a run
    directory made read-only) let the other ranks meet it at the closing barrier and go on as if the
    files were written: `export` under accelerate launch exited 0 on every rank but rank 0, and a
    training rank went on to wait for rank 0 at its next collective. Now they raise a UserError naming
    rank 0's error as they meet, and rank 0 raises its own."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys, time\n"
        "import torch.distributed as dist\n"
        "from qlora_sft.checkpoint import main_process_writes\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "try:\n"
        "    with main_process_writes() as is_main:\n"
        "        if is_main:\n"
        "            raise OSError(28, 'No space left on device')\n"
        "    print(f'rank {rank} went on', flush=True)\n"
        "except Exception as exc:\n"
        "    print(f'rank {rank} raised {type(exc).__name__}: {exc}', flush=True)\n"
        "    time.sleep(3 if rank == 0 else 0)\n"
        "    sys.exit(2)\n"
    )
    code, out, err = torchrun_script(str(driver), cwd=tmp_path, timeout=120)
    said = out + err
    assert code != 0, said[-3000:]
    assert "rank 0 raised OSError: [Errno 28] No space left on device" in said, said[-3000:]
    assert (
        "rank 1 raised UserError: another rank failed to write the run's shared files: OSError: [Errno 28] No space "
        "left on device" in said
    ), said[-3000:]
    assert "went on" not in said, said[-3000:]
