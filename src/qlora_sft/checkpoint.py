"""Run directories and checkpoints: who writes what, and what counts as complete.

main_process_writes  the one helper for shared files: barrier, main process writes, barrier
prepare_run_dir      refuse a different recipe in an existing run directory; write recipe.yaml
CompletionCallback   after the Trainer saves a checkpoint, the main process writes
                     manifest.json and then COMPLETE, last
find_resume          the newest complete checkpoint; incomplete ones are skipped with the reason
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError, RunDirError
from .recipe import Recipe, build_recipe

log = logging.getLogger("qlora_sft")

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Keys that may change between launches of the same run (they do not change what is trained).
RESUMABLE_CHANGES = (
    "run.overwrite",
    "checkpoint.",
    "train.max_steps",
    "train.num_train_epochs",
    "train.logging_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.dataloader_num_workers",
    "train.per_device_eval_batch_size",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
)


@contextlib.contextmanager
def main_process_writes() -> Iterator[bool]:
    """All ranks meet, the main process writes shared files inside the block (the block gets True
    there, False elsewhere), all ranks meet again. Use it for every shared file."""
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    try:
        yield state.is_main_process
    finally:
        state.wait_for_everyone()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------


def _ignorable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    a, b = old.fingerprint(), new.fingerprint()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _ignorable(key):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def read_run_recipe(run_dir: Path) -> Recipe:
    data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    data.pop("launch", None)
    return build_recipe(data, source=str(run_dir / "recipe.yaml"))


def check_run_dir(recipe: Recipe) -> str:
    """What launching `recipe` would do with its run directory: 'new', 'resume' or 'replace'.
    Raises RunDirError when it must not be touched. Reads only; safe on any rank."""
    run_dir = recipe.run_dir
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    if recipe.run.overwrite:
        return "replace" if (run_dir / "recipe.yaml").exists() or any(run_dir.iterdir()) else "new"
    if not (run_dir / "recipe.yaml").exists():
        raise RunDirError(
            f"run directory {run_dir} exists and is not a qlora-sft run (no recipe.yaml). Choose another "
            "run.name / run.output_dir, or set run.overwrite=true to move it aside."
        )
    try:
        old = read_run_recipe(run_dir)
    except RecipeError as exc:
        raise RunDirError(
            f"{run_dir}/recipe.yaml cannot be read as a recipe ({exc}). Set run.overwrite=true to move the "
            "old run aside, or choose another run.name."
        ) from None
    if recipe.checkpoint.resume == "never" and list_checkpoints(run_dir):
        raise RunDirError(
            f"checkpoint.resume=never but {run_dir} already has checkpoints. Set run.overwrite=true to move "
            "the old run aside and start over, or use another run.name."
        )
    diffs = recipe_differences(old, recipe)
    if diffs:
        shown = "\n".join(f"    {d}" for d in diffs[:12])
        more = f"\n    ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
        raise RunDirError(
            f"run directory {run_dir} holds a run of a different recipe:\n{shown}{more}\n"
            "Use another run.name for a new run, or run.overwrite=true to move the old run aside "
            f"(to {run_dir.name}.replaced-<time>); nothing was changed."
        )
    return "resume"


def prepare_run_dir(recipe: Recipe, launch: dict[str, Any]) -> Path:
    """Check the run directory on every rank, then let the main process move an old run aside
    (with run.overwrite) and write the resolved recipe. Returns the run directory."""
    action = check_run_dir(recipe)
    run_dir = recipe.run_dir
    with main_process_writes() as is_main:
        if is_main:
            if action == "replace":
                aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                run_dir.rename(aside)
                log.warning("run.overwrite: moved the previous run %s aside to %s", run_dir, aside)
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            resolved = recipe.to_dict()
            resolved["launch"] = launch
            atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    complete: bool
    reason: str = ""


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Is this checkpoint complete? Marker present, manifest readable, every listed file present
    with its recorded size."""
    m = CHECKPOINT_RE.match(path.name)
    step = int(m.group(1)) if m else -1
    if not (path / COMPLETE).is_file():
        return CheckpointInfo(step, path, False, f"no {COMPLETE} marker (interrupted while saving)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return CheckpointInfo(step, path, False, f"{MANIFEST} unreadable ({exc})")
    for rel, size in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return CheckpointInfo(step, path, False, f"file {rel} is missing")
        if f.stat().st_size != size:
            return CheckpointInfo(step, path, False, f"file {rel} has {f.stat().st_size} bytes, expected {size}")
    return CheckpointInfo(step, path, True)


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """All checkpoint-<step> folders of a run, newest first."""
    if not run_dir.is_dir():
        return []
    found = [inspect_checkpoint(p) for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda c: c.step, reverse=True)


def find_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from per `checkpoint.resume`, warning about skipped ones."""
    choice = recipe.checkpoint.resume
    if choice == "never":
        return None
    if choice != "auto":
        path = Path(choice)
        info = inspect_checkpoint(path) if path.is_dir() else None
        if info is None or not info.complete:
            why = info.reason if info else "not a folder"
            raise RunDirError(f"checkpoint.resume={choice}: cannot resume from it ({why})")
        return path
    for info in list_checkpoints(recipe.run_dir):
        if info.complete:
            return info.path
        log.warning("skipping %s for resume: %s", info.path, info.reason)
    return None


def write_manifest(ckpt: Path, meta: dict[str, Any]) -> None:
    """Record every file with its size, then the marker, last. Main process only."""
    files = {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE, MANIFEST) and not p.name.startswith(".")
    }
    atomic_write_text(ckpt / MANIFEST, json.dumps({**meta, "files": files}, indent=2))
    atomic_write_text(ckpt / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")


def completion_callback(meta: dict[str, Any]) -> Any:
    """A TrainerCallback that marks each checkpoint complete once every rank has saved."""
    from transformers import TrainerCallback

    class CompletionCallback(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            with main_process_writes() as is_main:
                if is_main and ckpt.is_dir():
                    write_manifest(ckpt, {**meta, "step": state.global_step})

    return CompletionCallback()
