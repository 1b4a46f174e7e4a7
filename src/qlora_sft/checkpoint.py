"""Run directories and checkpoints: who writes what, what counts as complete, and what resumes.

main_process_writes  the one helper for shared files: barrier, main process writes, barrier
main_process_decides the main process checks something for everyone (a lock, the run directory) and
                     every rank raises the same error, so no rank waits at a barrier for one that left
RunLock              one live writer per run directory: a lock file naming its holder, taken over only
                     from a holder that is provably gone
prepare_run_dir      refuse a different recipe or a live run in an existing run directory; write recipe.yaml
finished_run         a run whose final/ is complete for this recipe's length: a relaunch does nothing
CompletionCallback   (in the Trainer mixin) after the Trainer saves a checkpoint, the main process
                     checks it, writes manifest.json with a digest of every file, then COMPLETE, last
find_resume          the newest complete and intact checkpoint; others are skipped with the reason, and kept
Checkpointing        everything checkpointing wires into one training run: the Trainer class,
                     the preemption and fault callbacks, the manifest fields, the PREEMPTED marker
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import DataError, RecipeError, RunDirError, UserError, agreed
from .files import (
    atomic_prefix,
    atomic_write_text,
    file_digest,
    is_no_space,
    jsonl_records,
    no_space_message,
    os_reason,
    sampled_digest,
)
from .recipe import (
    RUN_RECIPE,
    Recipe,
    fingerprint_differences,
    read_run_recipe,
    read_yaml,
    run_recipe_differences,
    trained_fingerprint,
    write_run_recipe,
)

log = logging.getLogger("qlora_sft")

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
STAGING = ".staging"
DELETING = "deleting-"  # .staging/deleting-checkpoint-<step>: a checkpoint retention is deleting
PREEMPTED = "PREEMPTED"
LOCK = "LOCK"
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved a checkpoint, start me again"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILE = "adapter_model.safetensors"
# what every published checkpoint-<step> holds, and its manifest lists (final/: all but the trainer state)
OWN_FILES = (ADAPTER_FILE, "adapter_config.json", "trainer_state.json")
# Folders of a run directory that belong to the run (export refuses to write over them)
RUN_ENTRIES = ("final", "logs", STAGING, RUN_RECIPE, LOCK, PREEMPTED)


def distributed() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def main_process_writes() -> Iterator[bool]:
    """All ranks meet, the main process writes shared files inside the block (the block gets True
    there, False elsewhere), all ranks meet again. Use it for every shared file. Where the block
    raises on a rank (the main process's write failed), every rank learns it as they meet again: that
    rank raises its own error, the others a UserError naming it (said by rank 0 alone), instead of
    going on as if the files were written and waiting for the failed rank at the next collective."""
    from .launch import distributed_state

    state = distributed_state()
    state.wait_for_everyone()
    try:
        yield state.is_main_process
    except BaseException as exc:  # (the others meet this rank here, then hear of it)
        first_rank_error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        raise
    said = first_rank_error(None)
    if said is not None:
        raise agreed(UserError(f"another rank failed to write the run's shared files: {said}"))
    # and meet once more: a rank that left straight after the gather (export's last step) aborted at exit
    # under gloo now and then ("terminate called without an active exception", 1 run in 3 here)
    state.wait_for_everyone()


def main_process_decides(work: Callable[[], Any]) -> Any:
    """Run `work` on the main process only and give its result to every rank. If it raises an error
    meant for people (UserError), every rank raises it, so that all ranks stop together instead of
    the others waiting at the next barrier until the process group times out. Any other error (a
    bug, an OSError) is raised as it is on the main process, after the other ranks are told: they
    raise a UserError naming it, said by the main process alone, rather than wait in the broadcast
    (under srun, whose tasks do not end with a failed one, until the process group's timeout)."""
    from .launch import distributed_state

    state = distributed_state()
    outcome: list[Any] = [None, None]
    crash: Exception | None = None
    if state.is_main_process:
        try:
            outcome = [work(), None]
        except RecipeError as exc:  # its problems, one a line, as one error
            outcome = [None, (RecipeError, (exc.problems, exc.source))]
        except UserError as exc:
            outcome = [None, (type(exc), str(exc))]
        except Exception as exc:  # (strings only: the exception itself may not pickle)
            crash = exc
            outcome = [None, (UserError, f"the main process (rank 0) failed: {type(exc).__name__}: {exc}")]
    if distributed():
        import torch.distributed as dist

        dist.broadcast_object_list(outcome, src=0)
    if crash is not None:
        raise crash
    result, error = outcome
    if error is not None:
        cls, message = error
        if cls is RecipeError:
            raise agreed(RecipeError(*message))
        raise agreed((cls if issubclass(cls, (RunDirError, DataError)) else UserError)(message))
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one small all-reduce)."""
    if not distributed():
        return flag
    import torch
    import torch.distributed as dist

    from .launch import distributed_state

    t = torch.tensor([1.0 if flag else 0.0], device=distributed_state().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def first_rank_error(message: str | None) -> str | None:
    """What went wrong on any rank, on every rank: each rank gives its error's message (None: none),
    and every rank gets the message of the lowest rank that had one (None where none had), so that
    all raise the same error together instead of the others waiting for the failed one at the next
    collective until the process group times out. Where the ranks run on several hosts, the message
    says which rank and host found it (a node-local file may be damaged on one node only)."""
    if not distributed():
        return message
    import torch.distributed as dist

    said: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(said, (message, socket.gethostname()))
    hosts = {host for _, host in said}
    for rank, (text, host) in enumerate(said):
        if text is not None:
            return text if len(hosts) == 1 else f"{text} (found by rank {rank}, on {host})"
    return None


# --------------------------------------------------------------------------------------------
# One live writer per run directory
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of a process on this host (clock ticks since boot), or None if it is gone (an
    exited process not yet reaped, a zombie, is gone: it holds no files)."""
    if not 0 < pid < 2**22:  # above Linux's largest pid_max
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _machine() -> str:
    """This process's machine as far as its pids mean anything: the kernel's boot id and its pid
    namespace (two containers that share a hostname do not share pids)."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if "boot_id" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("?")
    return ":".join(parts)


def process_record() -> dict[str, Any]:
    """This process as a lock names its holder: host, machine (boot id and pid namespace), pid and the
    pid's start time, which together tell it from a later process given the same pid."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "machine": _machine(), "pid": pid, "pid_start": _process_start(pid)}


def process_gone(pid: int, recorded_start: Any) -> str | None:
    """Why process `pid` of this machine is provably gone: it has exited, or (where its start time was
    recorded and can be read now) the pid belongs to another process; None while it may be it."""
    start = _process_start(pid) if pid else None
    if start is None:
        return f"process {pid} has exited"
    if recorded_start not in (None, "?") and start != "?" and start != str(recorded_start):
        return f"process {pid} has exited (its pid belongs to another process now)"
    return None


def _processes_holding(path: Path) -> list[int]:
    """The processes on this host with `path` open (from /proc; empty where there is none)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if not os.readlink(fd).endswith(f"/{path.name}"):
                        continue  # (no stat of other files: one on a hung mount would block)
                    st = fd.stat()
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        pids.append(int(fd_dir.parent.name))
                        break
    return sorted(pids)


def _slurm_job_running(job_id: str) -> bool | None:
    """Whether SLURM still runs (or holds) the job; None when SLURM cannot be asked."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())


_HELD_LOCKS: list[RunLock] = []  # the locks this process holds (a forked child lets go of them)


def _let_go_in_child() -> None:
    """In a process forked from a lock holder (DataLoader workers, tokenizing pools): close the
    inherited descriptors of the holder's locks, so that the flock is the holder's alone and ends
    with it. (Closing a copy leaves the holder's flock in place; only the last one releases it.)"""
    for lock in _HELD_LOCKS:
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None  # nor may the child release (delete) the holder's lock file
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_let_go_in_child)

LEFTOVER_WAIT_S = 20.0  # how long a launch waits for a dead holder's leftover processes to let go
RECORD_GRACE_S = 1.0  # how long a launch rereads a held lock whose record is missing or names the dead


class RunLock:
    """`<run dir>/LOCK`: held by the main process of the one job that writes the run directory, for
    as long as it runs. It names its holder (host, pid, start time, SLURM job). The holder keeps an
    flock on it, which the kernel releases when the process dies however it dies; processes it
    forks close their copies (`_let_go_in_child`). A later launch takes the lock over only when the
    holder is provably gone: its flock is free and it ran on this host (a dead pid), or it was this
    same SLURM job before a requeue, or SLURM says its job ended. A flock still held although the
    holder is provably gone (its pid dead in the same boot and pid namespace, or its SLURM job
    ended) belongs to processes the holder left behind (started without Python's fork): the launch
    waits up to `LEFTOVER_WAIT_S` for them, then names them. A record missing or naming a dead
    holder while the flock is held may be a new holder's not yet written: it is reread for
    `RECORD_GRACE_S` first. Otherwise the launch is refused with who holds it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd: int | None = None

    @staticmethod
    def me() -> dict[str, Any]:
        return {
            **process_record(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": slurm_restart_count(),
        }

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        return f"{holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, since {holder.get('started', '?')}"

    @staticmethod
    def same_machine(holder: dict[str, Any], me: dict[str, Any]) -> bool:
        """Whether the holder's pid means the same process here: the same host name, and (in records
        that say) the same boot and pid namespace, which containers sharing a host name do not."""
        machine = holder.get("machine")
        return holder.get("host") == me["host"] and (machine is None or machine == me["machine"])

    @staticmethod
    def is_me(holder: dict[str, Any]) -> bool:
        me = RunLock.me()
        return RunLock.same_machine(holder, me) and (holder.get("pid"), holder.get("pid_start")) == (
            me["pid"],
            me["pid_start"],
        )

    @staticmethod
    def gone(holder: dict[str, Any], flock_held: bool = False) -> str | None:
        """Why the holder is provably gone, or None. With its flock free, a dead pid on a host of the
        same name proves it (a reboot or a restarted container freed the flock with it); with the
        flock still held, only a dead pid of this boot and pid namespace does."""
        me = RunLock.me()
        job = holder.get("slurm_job_id")
        try:
            restarts = int(holder.get("slurm_restart_count") or 0)
            pid = int(holder.get("pid") or 0)
        except (TypeError, ValueError):
            return None  # a record no qlora-sft wrote: nothing is provable
        if job and job == me["slurm_job_id"] and restarts < me["slurm_restart_count"]:
            return f"SLURM requeued job {job}"
        if holder.get("host") == me["host"] and (not flock_held or RunLock.same_machine(holder, me)):
            return process_gone(pid, holder.get("pid_start"))  # None: alive, with or without the flock
        if job:
            running = _slurm_job_running(str(job))
            if running is False:
                return f"SLURM job {job} is no longer running"
        return None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        warned = False
        judged: tuple[dict[str, Any], str | None] | None = None  # the last record read and why it is gone
        replaced = 0
        while replaced < 5:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                waited = time.monotonic() - started
                if judged is None or judged[0] != holder:  # (not asked again each pass: SLURM is asked by squeue)
                    judged = (holder, self.gone(holder, flock_held=True) if holder else None)
                why = judged[1]
                if waited < RECORD_GRACE_S and (not holder or why is not None):
                    # a launch that has just taken the flock writes its record next: read it again
                    time.sleep(0.05)
                    continue
                if why is None:
                    raise RunDirError(self._held_message(holder)) from None
                # the holder is gone, yet its flock is held: by processes it left behind
                if not warned:
                    warned = True
                    log.warning(
                        "run directory lock of %s: %s, but processes it started still hold %s; waiting up to %.0f s "
                        "for them to exit",
                        self.describe(holder),
                        why,
                        self.path,
                        LEFTOVER_WAIT_S,
                    )
                if waited < LEFTOVER_WAIT_S:
                    time.sleep(0.5)
                    continue
                raise RunDirError(self._leftover_message(holder, why)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our flock: try again
                os.close(fd)
                replaced += 1
                continue
            holder = self._read(fd)
            if holder and not self.is_me(holder):
                why = self.gone(holder)
                if why is None:
                    os.close(fd)
                    raise RunDirError(self._held_message(holder))
                log.warning("run directory lock of %s taken over: %s", self.describe(holder), why)
            record = (json.dumps(self.me()) + "\n").encode()
            try:
                os.pwrite(fd, record, 0)  # then cut to length: the file is never empty while it changes
                os.ftruncate(fd, len(record))
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)  # and with it the flock
                if is_no_space(exc):
                    raise RunDirError(
                        f"writing {self.path}: {no_space_message(self.path.parent, exc)}; nothing was changed. Free "
                        "space and relaunch."
                    ) from None
                raise
            self.fd = fd
            _HELD_LOCKS.append(self)
            return
        raise RunDirError(f"could not take the lock {self.path}: it keeps being replaced by another process")

    @staticmethod
    def live_holder(run_dir: Path) -> dict[str, Any] | None:
        """The record of the job that holds `run_dir`'s lock now (its flock is held), else None. Read
        only: the flock is taken shared for an instant, which a launch taking the lock at that moment
        retries past (`acquire` rereads a record for `RECORD_GRACE_S`)."""
        import fcntl

        try:
            fd = os.open(run_dir / LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return RunLock._read(fd) or {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            record = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _leftover_message(self, holder: dict[str, Any], why: str) -> str:
        pids = _processes_holding(self.path) if self.same_machine(holder, self.me()) else []
        gone = f"run directory {self.path.parent}: its previous job ({self.describe(holder)}) is gone ({why}), but"
        if pids:
            return (
                f"{gone} processes it started (pids {', '.join(map(str, pids))}, on this host) still hold {self.path} "
                f"after {LEFTOVER_WAIT_S:.0f} s. Stop them (kill {' '.join(map(str, pids))}) and relaunch; nothing "
                "was changed."
            )
        return (
            f"{gone} its lock {self.path} is still held after {LEFTOVER_WAIT_S:.0f} s, from another machine (a "
            "network file system keeps a dead node's lock until its lease ends). Relaunch later; or, if no process "
            f"of that job can still be running, delete {self.path} and relaunch. Nothing was changed."
        )

    def _held_message(self, holder: dict[str, Any]) -> str:
        return (
            f"run directory {self.path.parent} is in use by another qlora-sft job ({self.describe(holder)}): one "
            "job writes a run directory at a time. Wait for it, or use another run.name. If that job is gone (its "
            f"node crashed) and this is certain, delete {self.path} and relaunch."
        )

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(ValueError):
            _HELD_LOCKS.remove(self)
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------


def trained_anything(run_dir: Path) -> bool:
    """Did any launch into this run directory take a training step? (checkpoints, final/, a staged
    save, or a logged step)"""
    if (run_dir / "final").exists() or any(
        p.is_dir() and (CHECKPOINT_RE.match(p.name) or p.name.startswith(("checkpoint-", "final.")))
        for p in run_dir.iterdir()
    ):
        return True
    if (run_dir / STAGING).is_dir() and any((run_dir / STAGING).iterdir()):
        return True
    metrics = run_dir / "logs" / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def check_run_dir(recipe: Recipe) -> str:
    """What launching `recipe` would do with its run directory: 'new', 'resume', 'restart' (a
    launch that failed before its first training step left it: nothing to protect) or 'replace'.
    Raises RunDirError when it must not be touched. Reads only."""
    run_dir = recipe.run_dir
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    if recipe.run.overwrite and slurm_requeue_of(run_dir) is None:
        return "replace"
    if not (run_dir / RUN_RECIPE).exists():
        if only_a_launch_began(run_dir):
            # another launch has just taken the lock and writes recipe.yaml next (two launches started at
            # the same instant), or was killed in that moment: its lock decides (a live holder is named)
            return "restart"
        if (run_dir / RUN_RECIPE).exists():  # that launch wrote it while this one looked: read it
            return check_run_dir(recipe)
        raise RunDirError(
            f"run directory {run_dir} exists and is not a qlora-sft run (no recipe.yaml). Choose another "
            "run.name / run.output_dir, or set run.overwrite=true to move it aside."
        )
    try:
        old = read_run_recipe(run_dir)
    except RecipeError as exc:
        if not trained_anything(run_dir):
            return "restart"
        raise RunDirError(
            f"{run_dir}/recipe.yaml cannot be read as a recipe ({exc}). Set run.overwrite=true to move the "
            "old run aside, or choose another run.name."
        ) from None
    if recipe.checkpoint.resume == "never" and list_checkpoints(run_dir):
        raise RunDirError(
            f"checkpoint.resume=never but {run_dir} already has checkpoints. Set run.overwrite=true to move "
            "the old run aside and start over, or use another run.name."
        )
    diffs = run_recipe_differences(old, recipe)
    moved = [d for d in diffs if d.startswith("model.name_or_path:")]
    newest = next((c.path for c in complete_checkpoints(run_dir)), None)
    recorded = json.loads((newest / MANIFEST).read_text()) if newest else {}
    if moved:
        # the same base model found at another path (a run copied from another machine, a model folder
        # moved): its files are what the newest complete checkpoint recorded (not recipe.yaml's launch
        # block, which a launch refused later may have rewritten), so the path alone is no other recipe
        saved = recorded.get("base_model")
        now = base_fingerprint(recipe)
        if saved and now and saved == now:
            diffs = [d for d in diffs if d not in moved]
    sources = [d for d in diffs if d.startswith(tuple(f"{key}:" for key in DATA_SOURCE_KEYS))]
    old_sources, new_sources = (_without_data_paths(trained_fingerprint(r)) for r in (old, recipe))
    if sources and newest and all(old_sources.get(k) == new_sources.get(k) for k in DATA_SOURCE_KEYS):
        # the data copied or moved with the run (another machine, another user): the resume compares the
        # files' content with what the checkpoint recorded (`data_changes`) and refuses other data
        files = (recorded.get("data") or {}).get("files")
        if files and all(len(f) > 3 for f in files):  # content digests recorded (since 2026-12-01)
            diffs = [d for d in diffs if d not in sources]
    if diffs and not trained_anything(run_dir):
        return "restart"
    if diffs:
        shown = "\n".join(f"    {d}" for d in diffs[:12])
        more = f"\n    ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
        raise RunDirError(
            f"run directory {run_dir} holds a run of a different recipe:\n{shown}{more}\n"
            "Use another run.name for a new run, or run.overwrite=true to move the old run aside "
            f"(to {run_dir.name}.replaced-<time>); nothing was changed."
        )
    return "resume"


DATA_SOURCE_KEYS = ("data.sources", "data.eval_sources")


def slurm_restart_count() -> int:
    """$SLURM_RESTART_COUNT (how often SLURM requeued this job), 0 where unset or not a count (SLURM
    sets a whole number; anything else was not set by it)."""
    raw = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(raw) if raw.isdecimal() else 0


def slurm_requeue_of(run_dir: Path) -> str | None:
    """Whether this launch is a SLURM requeue of the job that last launched into `run_dir` (its
    recipe.yaml's `launch:` block): the same SLURM job id, a higher SLURM_RESTART_COUNT. Then
    `run.overwrite` has been done by that job's first launch, and the requeue resumes what it
    trained instead of moving it aside again (a preempted job with the key in its recipe started over
    at every requeue). Returns the job id, or None."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        launch = (read_yaml(run_dir / RUN_RECIPE)[0] or {}).get("launch") or {}
        before = int(launch.get("slurm_restart_count") or 0)
        now = slurm_restart_count()
    except Exception:  # no readable record of the launch: not provably the same job
        return None
    return job if str(launch.get("slurm_job_id")) == job and now > before else None


def only_a_launch_began(run_dir: Path) -> bool:
    """Whether `run_dir` holds only what a launch writes before its recipe.yaml: a `LOCK` holding a
    qlora-sft record (or nothing yet: its holder writes it right after taking it) and an empty logs/.
    A user's folder with a file of that name is no run."""
    # (the recipe.yaml being written: its atomic temporary is there for a moment, or after a kill)
    entries = {p.name for p in run_dir.iterdir() if not p.name.startswith(atomic_prefix(RUN_RECIPE))}
    if LOCK not in entries or not entries <= {LOCK, "logs"}:
        return False
    logs = run_dir / "logs"
    if logs.exists() and (logs.is_symlink() or not logs.is_dir() or any(logs.iterdir())):
        return False
    lock = run_dir / LOCK
    if lock.is_symlink() or not lock.is_file():
        return False
    try:
        text = lock.read_text()
        record = json.loads(text) if text.strip() else {"pid": None, "host": None}
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"pid", "host"} <= record.keys()


def _without_data_paths(trained: dict[str, Any]) -> dict[str, Any]:
    """A trained fingerprint with its data sources' paths left out (where the files lie; a resume
    checks what they hold, `data_changes`)."""
    out = dict(trained)
    for key in DATA_SOURCE_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [{k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s for s in out[key]]
    return out


def recipe_changes(ckpt: Path, recipe: Recipe) -> list[str]:
    """How `recipe` differs, in what it trains, from the recipe that wrote the checkpoint (a checkpoint
    of another run put into this one). Where the base model and the data lie is left out: a resume
    checks their files by content. Empty for manifests that record no recipe (before 2026-12-01)."""
    saved = json.loads((ckpt / MANIFEST).read_text()).get("recipe")
    if not isinstance(saved, dict):
        return []
    a, b = _without_data_paths(saved), _without_data_paths(trained_fingerprint(recipe))
    for trained in (a, b):
        trained.pop("model.name_or_path", None)
    return fingerprint_differences(a, b)


def prepare_run_dir(recipe: Recipe, launch: dict[str, Any]) -> RunLock | None:
    """The main process checks the run directory, takes its lock (refusing a directory another live
    job writes), moves an old run aside (with run.overwrite) and writes the resolved recipe; every
    rank gets the same outcome. Returns the held lock on the main process (release it when done),
    None elsewhere."""
    run_dir = recipe.run_dir
    held: list[RunLock] = []

    def work() -> None:
        action = check_run_dir(recipe)
        if action == "replace":
            old = RunLock(run_dir)
            old.acquire()  # a live job in the old run directory keeps it
            try:
                aside = keep_aside(run_dir, "replaced")
            except OSError as e:
                old.release()
                raise RunDirError(f"run.overwrite: could not move {run_dir} aside ({e}); nothing was changed") from e
            old.path = aside / LOCK  # the lock moved with the folder: release it there
            old.release()
            log.warning("run.overwrite: moved the previous run %s aside to %s", run_dir, aside)
        elif recipe.run.overwrite and action != "new":
            log.warning(
                "run.overwrite: this launch is SLURM job %s requeued, whose first launch replaced %s: it goes on "
                "with that run instead of replacing it again",
                os.environ.get("SLURM_JOB_ID"),
                run_dir,
            )
        lock = RunLock(run_dir)
        lock.acquire()
        held.append(lock)
        try:
            if action == "restart":
                log.info("%s: the previous launch took no training step; starting with this recipe", run_dir)
                for stray in run_dir.glob(f"{atomic_prefix(RUN_RECIPE)}*"):  # its recipe.yaml cut off by a kill
                    stray.unlink(missing_ok=True)
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            (run_dir / PREEMPTED).unlink(missing_ok=True)  # this launch is the requeued one
            write_run_recipe(run_dir, recipe, launch)
        except OSError as exc:
            lock.release()
            if is_no_space(exc):
                raise RunDirError(f"writing {run_dir / RUN_RECIPE}: {no_space_message(run_dir, exc)}") from None
            raise

    main_process_decides(work)
    return held[0] if held else None


def finished_run(recipe: Recipe) -> str | None:
    """If the run directory's final/ is complete and this recipe asks for no more training (the same
    max_steps, or the same epochs without max_steps), the line that says so; else None. A launch that
    names a checkpoint to resume from (`checkpoint.resume: PATH`) asks to train from there."""
    final = recipe.run_dir / "final"
    if not final.is_dir() or recipe.checkpoint.resume not in ("auto", "never"):
        return None
    info = inspect_checkpoint(final, verify=True)  # (an adapter and a tokenizer: read in moments)
    if not info.complete:
        if (final / COMPLETE).is_file():
            log.warning(
                "%s is not intact: %s. It is made again (from the last step's checkpoint, or by training to it); "
                "the damaged one is kept aside",
                final,
                info.reason,
            )
        return None
    manifest = json.loads((final / MANIFEST).read_text())
    steps = recipe.train.args.get("max_steps", -1)
    steps = -1 if steps is None else int(steps)
    done = manifest.get("step", 0)
    if steps > 0:
        finished = done >= steps
    else:
        finished = manifest.get("max_steps_arg", -1) in (-1, None) and float(
            recipe.train.args.get("num_train_epochs", 3.0)
        ) <= float(manifest.get("num_train_epochs", -1) or -1)
    if not finished:
        return None
    # The run is finished for this recipe's length; a recipe that differs otherwise (a sweep reusing one
    # run.name) is refused as it is for a run not finished, not answered with "Nothing to do" (exit 0,
    # the change ignored); with run.overwrite the old run is moved aside and the new recipe trains.
    same = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, overwrite=False))
    try:
        check_run_dir(same)
    except RunDirError:
        if recipe.run.overwrite:
            return None
        raise
    again = (
        f" run.overwrite replaces a run only for another recipe, and this one is the same: to train it again "
        f"from the start, give another run.name, or move {recipe.run_dir} aside."
        if recipe.run.overwrite
        else ""
    )
    return (
        f"run {recipe.run_dir} finished at step {done}: {final} is complete (written "
        f"{manifest.get('completed', '?')}). Nothing to do. To train longer, raise train.max_steps (or "
        f"train.num_train_epochs): training continues from checkpoint-{done}; or start a new run with another "
        f"run.name.{again}"
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    complete: bool
    reason: str = ""


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at: its manifest's, else its name's (`checkpoint-<step>`), else -1."""
    try:
        step = json.loads((path / MANIFEST).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    if _count(step):
        return step
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def _count(value: Any, least: int = 0) -> bool:
    """Whether a manifest's value is a whole number (JSON's integer, not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """What makes a checkpoint's manifest values unfit to be read, or None. Only the values that are
    read later are checked, where present (a manifest written before a key existed lacks it): the
    step, the epochs and max_steps a relaunch compares, the world size and global batch a resume
    compares. Its files are checked one by one in inspect_checkpoint."""
    for key, least in (("step", 0), ("world_size", 1), ("global_batch", 1)):
        if key in manifest and not _count(manifest[key], least):
            return f"says {key} {manifest[key]!r}, not a whole number of at least {least}"
    if manifest.get("max_steps_arg") is not None and not _count(manifest["max_steps_arg"], -1):
        return f"says max_steps_arg {manifest['max_steps_arg']!r}, not a whole number (or -1)"
    for key in ("num_train_epochs", "epoch"):
        value = manifest.get(key)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        ):
            return f"says {key} {value!r}, not a finite number of at least 0"
    return None


def inspect_checkpoint(path: Path, verify: bool = False) -> CheckpointInfo:
    """Is this checkpoint complete? Marker present, manifest readable, every listed file present with
    its recorded size; with `verify`, every file's bytes match the digest the manifest recorded and
    the adapter's tensors are finite (what a resume or an export relies on)."""
    m = CHECKPOINT_RE.match(path.name)
    step = int(m.group(1)) if m else -1
    if not (path / COMPLETE).is_file():
        return CheckpointInfo(step, path, False, f"no {COMPLETE} marker (interrupted while saving)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError(f"its files are a {type(files).__name__}, not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return CheckpointInfo(step, path, False, f"{MANIFEST} unreadable ({exc})")
    edited = "(edited by hand, or by another tool)"
    wrong = manifest_problem(manifest)
    if wrong:  # what a resume, export or relaunch reads must hold
        return CheckpointInfo(step, path, False, f"its {MANIFEST} {wrong} {edited}")
    unlisted = [name for name in OWN_FILES if name not in files and (m or name != "trainer_state.json")]
    if unlisted:  # a manifest edited by hand, or written by another tool, vouches for nothing
        return CheckpointInfo(
            step, path, False, f"{MANIFEST} lists none of {', '.join(unlisted)}, which every checkpoint holds"
        )
    if m and "step" in manifest and manifest["step"] != step:  # the manifest has no digest: edited, or renamed
        return CheckpointInfo(
            step,
            path,
            False,
            f"its {MANIFEST} says step {manifest['step']!r}, but the folder is {path.name} (the manifest edited by "
            "hand, or the folder renamed)",
        )
    for rel, entry in files.items():
        size, digest = (entry.get("size"), entry.get("digest")) if isinstance(entry, dict) else (entry, None)
        if not _count(size) or (digest is not None and not isinstance(digest, str)):
            return CheckpointInfo(
                step, path, False, f"its {MANIFEST} lists file {rel!r} with {entry!r}, not a size in bytes {edited}"
            )
        if not rel or PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts or "\\" in rel:
            return CheckpointInfo(
                step, path, False, f"its {MANIFEST} lists file {rel!r}, outside the checkpoint {edited}"
            )
        f = path / rel
        if not f.is_file():
            return CheckpointInfo(step, path, False, f"file {rel} is missing")
        if f.stat().st_size != size:
            return CheckpointInfo(step, path, False, f"file {rel} has {f.stat().st_size} bytes, expected {size}")
        if verify and digest and file_digest(f) != digest:
            return CheckpointInfo(step, path, False, f"file {rel} does not match its checksum (corrupted)")
    if verify and (path / ADAPTER_FILE).is_file():
        try:
            bad = nonfinite_tensors(path / ADAPTER_FILE)
        except Exception as exc:  # safetensors' own errors for a damaged file
            return CheckpointInfo(step, path, False, f"{ADAPTER_FILE} cannot be read ({exc})")
        if bad:
            return CheckpointInfo(step, path, False, f"{ADAPTER_FILE} holds non-finite values ({', '.join(bad[:3])})")
    return CheckpointInfo(step, path, True)


def nonfinite_tensors(file: Path) -> list[str]:
    """Names of the tensors of a safetensors file that hold NaN or inf."""
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(key)
    return bad


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """All checkpoint-<step> folders of a run, newest first (sizes checked, not digests)."""
    if not run_dir.is_dir():
        return []
    found = [inspect_checkpoint(p) for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda c: c.step, reverse=True)


def complete_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """The complete checkpoints of a run (sizes checked, not digests), newest first: what the errors
    of a failed save, a full disk, a divergence or an OOM name as safe."""
    return [c for c in list_checkpoints(run_dir) if c.complete]


def may_resume(recipe: Recipe) -> bool:
    """Whether this launch may resume a checkpoint (`find_resume` decides, reading digests): one named by
    `checkpoint.resume`, or with `auto` a complete one (sizes checked) in the run directory."""
    choice = recipe.checkpoint.resume
    if choice in ("never", "auto"):
        return choice == "auto" and bool(complete_checkpoints(recipe.run_dir))
    return True


def find_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from per `checkpoint.resume`: the newest one that is complete and
    intact (every file matches its digest). Skipped ones are named with the reason, and kept."""
    choice = recipe.checkpoint.resume
    if choice == "never":
        return None
    if choice != "auto":
        path = Path(choice)
        if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / MANIFEST).is_file():
            raise RunDirError(
                f"checkpoint.resume={choice}: that folder is an adapter, not a checkpoint of a run (no {MANIFEST}, "
                "optimizer or trainer state). To start training from an adapter's weights, set lora.init_from: "
                f"{choice} (a new run, new optimizer)."
            )
        info = inspect_checkpoint(path, verify=True) if path.is_dir() else None
        if info is None or not info.complete:
            why = info.reason if info else "not a folder"
            raise RunDirError(f"checkpoint.resume={choice}: cannot resume from it ({why})")
        changes = recipe_changes(path, recipe)
        if changes:
            shown = "\n".join(f"    {c}" for c in changes[:12])
            raise RunDirError(
                f"checkpoint.resume={choice}: it was written by another recipe:\n{shown}\nA resume continues the "
                "same training. Resume it with the recipe that wrote it, or start a new run from its adapter with "
                f"lora.init_from: {choice} (new optimizer)."
            )
        return path
    staging = recipe.run_dir / STAGING
    if staging.is_dir():
        for p in sorted(staging.glob("checkpoint-*")):
            if (p / COMPLETE).is_file():  # killed between the marker and the rename (`publish`)
                log.warning(
                    "skipping %s for resume: it was complete (its %s marker is written) but not yet moved into "
                    "place as %s when the launch that saved it stopped; a resume reads the run directory only; "
                    "left in place",
                    p,
                    COMPLETE,
                    recipe.run_dir / p.name,
                )
            else:
                log.warning("skipping %s for resume: an interrupted save (it never completed); left in place", p)
    for info in list_checkpoints(recipe.run_dir):
        if info.complete:
            info = inspect_checkpoint(info.path, verify=True)
        if info.complete and (changes := recipe_changes(info.path, recipe)):
            reason = f"written by another recipe ({'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''})"
            info = CheckpointInfo(info.step, info.path, False, reason)
        if info.complete:
            return info.path
        log.warning("skipping %s for resume: %s; left in place", info.path, info.reason)
    return None


def checkpoint_files(ckpt: Path) -> list[Path]:
    """The files a checkpoint's manifest lists, in order: every file in it (subfolders too) but the
    marker, the manifest and hidden files."""
    return [
        p
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE, MANIFEST) and not p.name.startswith(".")
    ]


def write_manifest(ckpt: Path, meta: dict[str, Any]) -> None:
    """Record every file with its size and digest, then the marker, last. Main process only, after
    every rank has written its files (read back once, from the page cache they were just written to)."""
    files = {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "digest": file_digest(p)} for p in checkpoint_files(ckpt)
    }
    latest = ckpt / "latest"  # DeepSpeed's tag file: the folder holding its per-rank shards
    if latest.is_file():
        meta = {**meta, "deepspeed_tag": latest.read_text().strip()}
    completed = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(ckpt / MANIFEST, json.dumps({**meta, "completed": completed, "files": files}, indent=2))
    atomic_write_text(ckpt / COMPLETE, completed + "\n")


class InvalidAdapterError(RuntimeError):
    """A saved adapter holds no real LoRA weights (e.g. ZeRO-3 partitions saved as Size([0])), or
    non-finite ones."""


def check_adapter(folder: Path) -> int:
    """Re-read a saved adapter: every lora_A/lora_B must be 2-D, non-empty and of the configured
    rank, and every tensor finite. Guards against the empty adapters ZeRO-3 and FSDP can save
    (trl#4416, peft#2892, DeepSpeed#7900) and against publishing a diverged run. Returns the number
    of LoRA tensors; raises InvalidAdapterError."""
    from safetensors import safe_open

    weights = folder / ADAPTER_FILE
    config_file = folder / "adapter_config.json"
    if not weights.is_file() or not config_file.is_file():
        raise InvalidAdapterError(f"{folder}: adapter_model.safetensors or adapter_config.json was not written")
    config = json.loads(config_file.read_text())
    r, pattern = int(config.get("r", 0)), config.get("rank_pattern") or {}
    n, problems = 0, []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = re.search(r"(.+)\.lora_([AB])(?:\.\w+)?\.weight$", key)
            if not m:
                continue
            n += 1
            shape = tuple(f.get_slice(key).get_shape())
            module = m.group(1).removeprefix("base_model.model.")
            rank = next((v for k, v in pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), r)
            want = shape[0] if m.group(2) == "A" else (shape[1] if len(shape) == 2 else -1)
            if len(shape) != 2 or 0 in shape or want != rank:
                problems.append(f"{key} has shape {shape}")
    if n == 0:
        problems.append("no lora_A/lora_B tensors at all")
    if problems:
        raise InvalidAdapterError(
            f"the adapter saved in {folder} is not a real LoRA adapter of rank {r}: {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}. Under ZeRO-3/FSDP this means partitioned parameters were "
            "saved without gathering them; the checkpoint was not published."
        )
    bad = nonfinite_tensors(weights)
    if bad:
        raise InvalidAdapterError(
            f"the adapter saved in {folder} holds NaN/inf values ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}): training diverged. It was not published."
        )
    return n


def keep_aside(path: Path, why: str) -> Path:
    """Move a folder out of the way, next to where it was (never deleted): `<name>.<why>-<time>`, or
    `<name>.<why>-<time>-2`, `-3`, ... where one of that second is there already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    os.rename(path, aside)
    return aside


def publish(staged: Path, final: Path, meta: dict[str, Any]) -> None:
    """Check the adapter, complete a staged folder (manifest, then marker) and rename it into place.
    Main process only, after every rank has written its part. A folder already at `final` is kept
    aside, never deleted: an incomplete or corrupt checkpoint of the same step (skipped at resume),
    one of a timeline abandoned by an explicit `checkpoint.resume`, or the final/ of a shorter run."""
    check_adapter(staged)
    write_manifest(staged, meta)
    if final.exists():
        info = inspect_checkpoint(final, verify=True)  # a damaged one is not kept as a good one
        why = "replaced" if info.complete else "incomplete"
        if final.name == "final" and info.complete:
            step = json.loads((final / MANIFEST).read_text()).get("step", "?")
            aside = final.with_name(f"final.step-{step}")
            if aside.exists():
                aside = keep_aside(final, why)
            else:
                os.rename(final, aside)
        else:
            aside = keep_aside(final, why)
        log.warning("%s already existed (%s): kept aside as %s", final, why, aside.name)
    os.rename(staged, final)


TRAINING_STATE_FILES = re.compile(
    r"(optimizer|scheduler|scaler|rng_state)[^/]*\.(pt|pth|bin)|trainer_state\.json|latest|zero_to_fp32\.py"
)


def final_from_checkpoint(ckpt: Path, final: Path) -> None:
    """Publish `final/` from a complete checkpoint of the run's last step, without training: the job
    stopped after that checkpoint and before final/ (preempted during the last step, killed while
    final/ was saved). The Trainer, resumed there, would train one step past max_steps. The adapter
    and tokenizer files are copied, not the training state; the manifest is the checkpoint's. Main
    process only."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    staged = final.parent / STAGING / final.name
    shutil.rmtree(staged, ignore_errors=True)
    try:
        staged.mkdir(parents=True)
        for path in sorted(ckpt.iterdir()):
            state = path.name in (COMPLETE, MANIFEST) or TRAINING_STATE_FILES.fullmatch(path.name)
            if path.is_file() and not state:
                shutil.copy2(path, staged / path.name)
        publish(staged, final, {k: v for k, v in manifest.items() if k not in ("files", "completed", "deepspeed_tag")})
    except Exception as exc:
        if not is_no_space(exc):
            raise
        shutil.rmtree(staged, ignore_errors=True)
        raise UserError(
            f"publishing {final} from {ckpt.name}: {no_space_message(staged, exc)}; nothing of it was kept, and {ckpt} "
            "is complete. Free space and relaunch: final/ is published from it without training."
        ) from None


def unlisted_files(ckpt: Path) -> list[str]:
    """Files in a complete checkpoint that its manifest does not list (put there after it was saved:
    a user's evaluation, notes), as paths inside it."""
    listed = set(json.loads((ckpt / MANIFEST).read_text()).get("files") or {})
    return [rel for p in checkpoint_files(ckpt) if (rel := str(p.relative_to(ckpt))) not in listed]


def best_checkpoint(ckpt: Path) -> str | None:
    """The best checkpoint that `ckpt`'s trainer_state.json names (train.load_best_model_at_end), or None."""
    try:
        return json.loads((ckpt / "trainer_state.json").read_text()).get("best_model_checkpoint") or None
    except (OSError, ValueError, AttributeError):
        return None


def apply_retention(
    run_dir: Path,
    keep_last: int | None,
    newest: Path | None = None,
    best: str | None = None,
    midway: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` complete ones of this run.
    Incomplete checkpoints are left for the user to inspect. One that cannot be deleted (made
    read-only, another user's) is named and kept: training goes on. With `newest` (the checkpoint a
    resume verified), nothing is deleted unless it is the newest complete one. `best` (the Trainer's
    best checkpoint, with train.load_best_model_at_end) is kept too, as the Trainer's rotation keeps
    it. A checkpoint is deleted by renaming it into `.staging/deleting-checkpoint-<step>` first, so
    that a launch killed while deleting leaves no half-deleted `checkpoint-<step>`: the next
    retention finishes what it began (`finish_deletions`). `midway(folder)` is called as a folder's
    deletion begins (fault injection). Main process only."""
    finish_deletions(run_dir)
    if not keep_last:
        return []
    complete = complete_checkpoints(run_dir)
    if newest is not None and (not complete or complete[0].path != newest):
        return []
    removed = []
    for info in complete[keep_last:]:
        if best and Path(best).name == info.path.name:  # (by name: a run copied elsewhere keeps its old path)
            continue
        theirs = unlisted_files(info.path)
        if theirs:
            log.warning(
                "checkpoint.keep_last=%d: kept %s: it holds files the run did not write (%s%s). Move them out and "
                "delete it yourself",
                keep_last,
                info.path,
                ", ".join(theirs[:5]),
                " ..." if len(theirs) > 5 else "",
            )
            continue
        doomed = run_dir / STAGING / f"{DELETING}{info.path.name}"
        try:
            doomed.parent.mkdir(exist_ok=True)
            os.rename(info.path, doomed)  # (atomic: the checkpoint is there whole, or gone from the run)
        except OSError:
            doomed = info.path  # one that cannot be moved is deleted where it is, or named and kept below
        try:
            if midway is not None:
                midway(doomed)
            shutil.rmtree(doomed)
        except OSError as exc:
            if doomed != info.path:
                with contextlib.suppress(OSError):
                    os.rename(doomed, info.path)  # kept where it was
            log.warning(
                "checkpoint.keep_last=%d: could not remove %s (%s: %s); training goes on. Delete it yourself "
                "once it can be (a checkpoint it removed part of is skipped at resume)",
                keep_last,
                info.path,
                exc.filename or info.path,
                os_reason(exc),
            )
            continue
        removed.append(info.path)
        log.info("checkpoint.keep_last=%d: removed %s", keep_last, info.path)
    return removed


def finish_deletions(run_dir: Path) -> None:
    """Delete what a retention killed while deleting left in `.staging/deleting-checkpoint-<step>`
    (the checkpoint retention had decided to delete, moved out of the run before its files went).
    Main process only."""
    staging = run_dir / STAGING
    if not staging.is_dir():
        return
    for p in sorted(staging.glob(f"{DELETING}checkpoint-*")):
        name = p.name.removeprefix(DELETING)
        try:
            shutil.rmtree(p)
        except OSError as exc:
            log.warning(
                "checkpoint.keep_last: could not finish deleting %s (%s: %s), which an interrupted launch began to "
                "delete; delete %s yourself",
                name,
                exc.filename or p,
                os_reason(exc),
                p,
            )
            continue
        log.info("checkpoint.keep_last: finished deleting %s, which an interrupted launch began to delete", name)


def trim_replayed_metrics(run_dir: Path, step: int) -> int:
    """Resuming from checkpoint-`step` replays the steps after it: their lines in logs/metrics.jsonl
    (written before the interruption) move to logs/metrics.replayed.jsonl, so that every step appears
    once in metrics.jsonl. Main process only. Returns how many lines moved."""
    metrics = run_dir / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    keep, moved = [], []
    for _, line, record in jsonl_records(metrics):
        try:
            # a line that is no record (cut off by a crash or a full disk) moves too: kept, out of the log
            later = record is None or int(record.get("step", 0)) > step
        except (ValueError, TypeError, OverflowError):  # (OverflowError: a step of Infinity)
            later = True
        (moved if later else keep).append(line)
    if moved:
        with (run_dir / "logs" / "metrics.replayed.jsonl").open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in moved))
    if moved or not metrics.read_bytes().endswith(b"\n"):
        atomic_write_text(metrics, "".join(line + "\n" for line in keep))
    return len(moved)


# --------------------------------------------------------------------------------------------
# What a resume restores: the data it continues on, the adapter, the optimizer state
# --------------------------------------------------------------------------------------------


def data_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between the data a checkpoint was trained on and the data of this launch."""
    if not saved:
        return []
    changes = []
    old_files = {f[0]: f for f in saved.get("files", [])}
    new_files = {f[0]: f for f in now.get("files", [])}
    # a file at another path with the same size and content (the data copied or moved with the run) is
    # the same file: paired with one of the paths no longer listed
    gone = [old_files[p] for p in sorted(set(old_files) - set(new_files))]
    for path in sorted(set(new_files) - set(old_files)):
        b = new_files[path]
        a = next((a for a in gone if len(a) > 3 and len(b) > 3 and (a[1], a[3]) == (b[1], b[3])), None)
        if a is not None:
            gone.remove(a)
            del old_files[a[0]], new_files[path]
    for path in sorted(set(old_files) | set(new_files)):
        a, b = old_files.get(path), new_files.get(path)
        if a is None:
            changes.append(f"{path}: new file")
        elif b is None:
            changes.append(f"{path}: gone")
        elif a[1] != b[1]:
            changes.append(f"{path}: {a[1]:,} bytes -> {b[1]:,} bytes")
        elif a[2] != b[2] and not (len(a) > 3 and len(b) > 3 and a[3] == b[3]):  # not the same bytes again
            changes.append(
                f"{path}: modified at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(b[2] / 1e9))} "
                f"(was {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(a[2] / 1e9))}), same size"
            )
        elif len(a) > 3 and len(b) > 3 and a[3] != b[3]:  # edited, its modification time set back
            changes.append(f"{path}: its content changed, with the same size and modification time")
    for key in ("train_rows", "eval_rows"):
        if saved.get(key) is not None and saved.get(key) != now.get(key):
            changes.append(f"{key.replace('_', ' ')}: {saved.get(key)} -> {now.get(key)}")
    return changes


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def base_fingerprint(recipe: Recipe) -> dict[str, Any] | None:
    """What identifies the base model a run trains on, wherever it lies: for a local folder its
    `model_folder_fingerprint`; for a hub id the id and revision. None where model.name_or_path names
    nothing here."""
    from .model.load import local_model_path

    base_dir = Path(recipe.source).parent if recipe.source else None
    try:
        path = Path(local_model_path(recipe.model, base_dir))
    except UserError:
        return None
    if not path.is_dir():
        return {"hub_id": recipe.model.name_or_path, "revision": recipe.model.revision}
    return model_folder_fingerprint(path)


def model_folder_fingerprint(path: Path) -> dict[str, Any]:
    """A model folder's config.json digest and, for each weight file, its size and a digest of three
    samples of it (two models of one architecture have the same config and sizes)."""
    config = path / "config.json"
    weights = {
        f.name: {"size": f.stat().st_size, "sample": sampled_digest(f)}
        for f in sorted(path.iterdir())
        if f.suffix in WEIGHT_SUFFIXES and f.is_file()
    }
    return {"config": file_digest(config) if config.is_file() else None, "weights": weights}


def base_changes(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """How the base model `now` differs from the one a run or checkpoint recorded (empty where either
    is unknown: runs written before 2026-12-01 record none)."""
    if not saved or not now or saved == now:
        return []
    if "hub_id" in saved or "hub_id" in now:
        was, gone = saved.get("hub_id") or "a local folder", now.get("hub_id") or "a local folder"
        return [f"base model {was} (revision {saved.get('revision')}) -> {gone} (revision {now.get('revision')})"]
    out = [] if saved.get("config") == now.get("config") else ["config.json differs"]
    old, new = saved.get("weights") or {}, now.get("weights") or {}
    for name in sorted(set(old) | set(new)):
        was, now_ = old.get(name), new.get(name)
        if was == now_:
            continue
        if was and now_ and was.get("size") == now_.get("size"):
            out.append(f"{name}: other contents, same size ({now_['size']:,} bytes)")
        else:
            before = f"{was['size']:,} bytes" if was else "absent"
            after = f"{now_['size']:,} bytes" if now_ else "absent"
            out.append(f"{name}: {before} -> {after}")
    return out


def check_base_unchanged(checkpoint: Path, now: dict[str, Any] | None, name_or_path: str) -> None:
    """Refuse to resume on another base model than the one the checkpoint trained on (a relative
    model path found from another working directory, a folder that now holds another model)."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    changes = base_changes(manifest.get("base_model"), now)
    if not changes:
        return
    shown = "\n".join(f"    {c}" for c in changes[:10])
    raise RunDirError(
        f"model.name_or_path={name_or_path!r} is not the base model {checkpoint} was trained on:\n{shown}\n"
        "Resuming would continue the adapter on other weights. Point model.name_or_path at the model the run "
        "trained on (an absolute path avoids a relative one being found from another working directory), or "
        "start a new run (another run.name)."
    )


def check_data_unchanged(checkpoint: Path, now: dict[str, Any], allow: bool) -> None:
    """Refuse to resume over changed training data (the order of examples and the eval split would
    no longer be the ones the checkpoint continued), unless `checkpoint.allow_data_change`."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    changes = data_changes(manifest.get("data"), now)
    if not changes:
        return
    shown = "\n".join(f"    {c}" for c in changes[:10])
    if allow:
        log.warning("resuming %s over changed data (checkpoint.allow_data_change):\n%s", checkpoint, shown)
        return
    raise RunDirError(
        f"the training data changed since {checkpoint} was written:\n{shown}\n"
        "Resuming would re-split and re-order the examples, so some would be seen twice or never, and the eval "
        "split would change. Restore the data, or set checkpoint.allow_data_change=true to continue knowingly, or "
        "start a new run (another run.name)."
    )


def repage_optimizer_state(optimizer: Any) -> int:
    """After a bitsandbytes paged optimizer's state is loaded, put its large state tensors back in
    paged (CUDA managed) memory. torch.save keeps the Python attribute `is_paged=True` that
    bitsandbytes sets on them, so the loaded copies claim to be paged while being ordinary tensors:
    loaded onto the GPU (what the Trainer does when world_size > 1) the next step's prefetch fails
    on them (`Error invalid argument at line 578 in pythonInterface.cpp`, the process exits); loaded
    onto the CPU (one process) bitsandbytes never moves them to the GPU and steps on host memory.
    Here every state tensor bitsandbytes would page is copied into a fresh paged buffer on its
    parameter's device, and the stale tag is dropped from the others. Returns how many were paged."""
    try:
        import bitsandbytes.functional as F
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:  # pragma: no cover
        return 0
    import torch

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not isinstance(opt, Optimizer8bit):
        return 0
    paged = 0
    for p, state in opt.state.items():
        if not isinstance(p, torch.Tensor):
            continue
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor):
                continue
            # bitsandbytes' own rule (Optimizer8bit.get_state_buffer): paged on CUDA from 1e5 elements
            if opt.is_paged and key in ("state1", "state2") and p.device.type == "cuda" and p.numel() >= 1e5:
                buf = F.get_paged(*value.shape, dtype=value.dtype, device=p.device)
                buf.copy_(value)
                opt.page_mng.paged_tensors.append(buf)
                state[key] = buf
                paged += 1
            elif getattr(value, "is_paged", False):
                state[key] = value.to(p.device, copy=True)  # a new tensor, without the stale tag
    if paged:
        torch.cuda.synchronize()
    return paged


def _fsdp_units(model: Any) -> list[tuple[str, Any]]:
    """(plain name, unit) of the FSDP1 units that hold trainable parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def trains(unit: Any) -> bool:
        handle = getattr(unit, "_handle", None)
        return handle is not None and handle.flat_param.requires_grad

    return [
        (name.replace("_fsdp_wrapped_module.", ""), m)
        for name, m in model.named_modules()
        if isinstance(m, FSDP) and trains(m)
    ]


def adapter_parameters(model: Any, writeback: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, full parameter) of every trainable parameter, names as in the PeftModel (FSDP and
    DDP wrappers left out). Under FSDP1 each unit holding trainable parameters is unsharded in turn
    (collective: every rank iterates in the same order), with `writeback` copying changes back to
    the shards; under ZeRO-3 the parameters are gathered (read only)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if any(isinstance(m, FSDP) for m in model.modules()):
        from torch.distributed.fsdp._flat_param import FlatParameter
        from torch.distributed.fsdp._runtime_utils import _lazy_init

        if isinstance(model, FSDP):
            # the root first: a unit unsharded before the root's (lazy) initialisation would take the
            # root's role, and the first forward would then fail (or, worse, run as two roots)
            _lazy_init(model, model)
        for unit_name, unit in _fsdp_units(model):
            with FSDP.summon_full_params(unit, recurse=False, writeback=writeback):
                for name, p in unit.named_parameters():
                    if "_fsdp_wrapped_module" in name.replace("_fsdp_wrapped_module.", "", 1):
                        continue  # a nested unit's: visited as its own unit
                    if p.requires_grad:
                        full = f"{unit_name}.{name.replace('_fsdp_wrapped_module.', '')}".lstrip(".")
                        yield full.removeprefix("module."), p
        for name, p in model.named_parameters():  # parameters FSDP ignores (replicated adapters)
            if p.requires_grad and not isinstance(p, FlatParameter):
                yield name.replace("_fsdp_wrapped_module.", "").removeprefix("module."), p
        return
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in params):  # DeepSpeed ZeRO-3: gather to read
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            yield from ((n.removeprefix("module."), p) for n, p in params)
        return
    yield from ((n.removeprefix("module."), p) for n, p in params)


def _saved_key(name: str, adapter: str) -> str:
    """peft's name for a parameter in adapter_model.safetensors: the adapter name left out."""
    return name.replace(f".{adapter}", "")


def load_adapter_in_place(model: Any, folder: Path, adapter: str = "default") -> int:
    """Copy a checkpoint's adapter into the model's trainable parameters, in place (each keeps its
    storage and dtype: under FSDP the flat parameter's shard is what the optimizer steps, and a
    parameter given new storage would no longer be the one trained). Every trainable parameter must
    be in the file with its shape. Returns how many were loaded."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(folder / ADAPTER_FILE))
    missing, wrong, n = [], [], 0
    with torch.no_grad():
        for name, p in adapter_parameters(model, writeback=True):
            t = saved.get(_saved_key(name, adapter))
            if t is None:
                missing.append(_saved_key(name, adapter))
            elif tuple(t.shape) != tuple(p.shape):
                wrong.append(f"{name} {tuple(t.shape)} vs {tuple(p.shape)}")
            else:
                p.copy_(t.to(device=p.device, dtype=p.dtype))
                n += 1
    if missing or wrong or n == 0:
        raise RunDirError(
            f"{folder / ADAPTER_FILE} does not fit this model: "
            + "; ".join(
                [f"{len(missing)} trainable weights missing ({', '.join(missing[:3])})"] * bool(missing)
                + [f"shapes differ: {', '.join(wrong[:3])}"] * bool(wrong)
                + ["no trainable weights"] * (n == 0 and not missing and not wrong)
            )
            + ". Was it written by this recipe (lora.r, lora.target_modules, the base model)?"
        )
    return n


def resume_problems(model: Any, optimizer: Any, folder: Path, adapter: str = "default") -> list[str]:
    """After a resume has loaded everything: the model's trainable weights equal the checkpoint's
    adapter exactly, and the optimizer (None: not checked) holds state for every trainable parameter
    (a missing state would restart its moments from zero: the run would silently drift from an
    uninterrupted one). Checked on every rank (collective under FSDP/ZeRO-3)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(folder / ADAPTER_FILE))
    problems = []
    for name, p in adapter_parameters(model):
        t = saved.get(_saved_key(name, adapter))
        if t is None:
            problems.append(f"{name} is not in {ADAPTER_FILE}")
        elif not torch.equal(p.detach().cpu(), t.to(p.dtype)):
            diff = (p.detach().float().cpu() - t.float()).abs().max().item()
            problems.append(f"{name} differs from the checkpoint's value (max |diff| {diff:.3g})")
    opt = getattr(optimizer, "optimizer", optimizer)
    if opt is not None and hasattr(opt, "param_groups"):
        trainable = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        empty = sum(1 for p in trainable if not opt.state.get(p))
        if empty:
            problems.append(f"the optimizer has no state for {empty} of {len(trainable)} trainable parameters")
    return problems


# --------------------------------------------------------------------------------------------
# The Trainer, checkpointing this way
# --------------------------------------------------------------------------------------------


class Fault:
    """Fault injection for tests, from QLORA_SFT_FAULT="<action>@<step>[:<rank>]":
    `kill@8:1` SIGKILLs rank 1 as step 8 begins; `crashsave@10:0` SIGKILLs rank 0 while
    checkpoint 10 is saved (files written, marker not yet); `killretain@10` SIGKILLs the main process
    while the retention after checkpoint 10 deletes an older checkpoint (its adapter file removed, the
    rest not yet); `nan@3` makes the loss of step 3 (and later ones) NaN on every rank; `oom@6:0`
    raises torch's out-of-memory error on rank 0 as step 6 begins, as the CUDA allocator would. Off
    unless the variable is set."""

    def __init__(self, spec: str | None = None):
        spec = spec if spec is not None else os.environ.get("QLORA_SFT_FAULT", "")
        self.action = ""
        self.step = -1
        self.rank: int | None = None
        m = re.fullmatch(r"(kill|crashsave|killretain|nan|oom)@(\d+)(?::(\d+))?", spec.strip())
        if m:
            self.action, self.step = m.group(1), int(m.group(2))
            self.rank = int(m.group(3)) if m.group(3) is not None else None

    def due(self, action: str, step: int, rank: int) -> bool:
        """Whether the configured fault is `action` at `step` on this rank."""
        return self.action == action and self.step == step and self.rank in (None, rank)

    def trigger(self, action: str, step: int, rank: int) -> None:
        """SIGKILL this process when the configured fault is `action` at `step` on this rank."""
        if self.due(action, step, rank):
            log.warning("QLORA_SFT_FAULT: %s at step %d on rank %d", action, step, rank)
            os.kill(os.getpid(), signal.SIGKILL)


class NonFiniteError(UserError):
    """Training diverged: the loss or the gradient norm stayed non-finite."""


class CheckpointingMixin:
    """Mixed into the Trainer by `Checkpointing.trainer`: complete-or-absent checkpoints, exact
    resume (adapter copied in place and verified, paged optimizer state re-paged, optimizer state
    checked), and a stop on non-finite training that publishes nothing non-finite. `ckpt` is the
    run's Checkpointing."""

    ckpt: Checkpointing
    _staging_save = False
    _nonfinite: list[tuple[int, str]]

    def _get_output_dir(self, trial: Any) -> str:  # Trainer hook: where checkpoint-<step> is written
        base = super()._get_output_dir(trial)  # type: ignore[misc]
        return str(Path(base) / STAGING) if self._staging_save else base

    # -- saving ----------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        state = self.state  # type: ignore[attr-defined]
        args = self.args  # type: ignore[attr-defined]
        run_dir = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        name = f"checkpoint-{state.global_step}"
        staged = run_dir / STAGING / name
        with main_process_writes() as is_main:
            if is_main:
                shutil.rmtree(staged, ignore_errors=True)  # leftovers of an interrupted save
                staged.parent.mkdir(parents=True, exist_ok=True)
        self._staging_save = True
        error: BaseException | None = None
        try:
            with peft_sees_fsdp_names(self):
                super()._save_checkpoint(model, trial)  # type: ignore[misc]
            if state.best_model_checkpoint and Path(state.best_model_checkpoint) == staged:
                # the Trainer named the staging folder as the best checkpoint (load_best_model_at_end), which
                # is renamed away: name the folder it is published as, also in its trainer_state.json
                state.best_model_checkpoint = str(run_dir / name)
                if args.should_save:
                    state.save_to_json(str(staged / "trainer_state.json"))
        except Exception as exc:  # every rank must learn that the save failed, or the others wait
            error = exc
        finally:
            self._staging_save = False
        self._after_save(staged, error, what=name)
        self.ckpt.fault.trigger("crashsave", state.global_step, args.process_index)
        self._publish(staged, run_dir / name, retention=True)

    def _publish(self, staged: Path, final: Path, retention: bool = False) -> None:
        """The main process publishes what every rank has written (manifest, marker, rename) and
        applies retention; a failure there (a full disk while writing the manifest) stops every rank."""
        error: BaseException | None = None
        with main_process_writes() as is_main:
            if is_main:
                try:
                    publish(staged, final, self.manifest(self.state.global_step))  # type: ignore[attr-defined]
                    if retention:
                        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
                        apply_retention(final.parent, self.ckpt.keep_last, best=best, midway=self._retention_fault)
                except Exception as exc:
                    error = exc
        self._after_save(staged, error, what=final.name)

    def _retention_fault(self, folder: Path) -> None:
        """QLORA_SFT_FAULT=killretain@<step>: SIGKILLed while retention deletes `folder`, partway."""
        fault, step = self.ckpt.fault, self.state.global_step  # type: ignore[attr-defined]
        if fault.due("killretain", step, self.args.process_index):  # type: ignore[attr-defined]
            (folder / ADAPTER_FILE).unlink(missing_ok=True)
            fault.trigger("killretain", step, self.args.process_index)  # type: ignore[attr-defined]

    def _after_save(self, staged: Path, error: BaseException | None, what: str) -> None:
        """All ranks agree whether the save worked; if not, every rank raises the same error (a full
        disk says which, and what is still safe). The staged files stay under .staging for a look
        (never resumed from, replaced by the next save of that step), except on a full disk (on any
        rank: the main process removes them and says so too), where they go to give the space back."""
        failed = any_rank(error is not None)
        if not failed:
            return
        no_space = any_rank(error is not None and is_no_space(error))
        with main_process_writes() as is_main:
            if is_main and no_space:
                shutil.rmtree(staged, ignore_errors=True)
        run_dir = staged.parent.parent
        complete = [c.path.name for c in complete_checkpoints(run_dir)]
        newest = complete[0] if complete else None
        safe = f"the newest complete checkpoint is {newest}" if newest else "no complete checkpoint exists yet"
        if no_space:
            older = (
                f" (the older checkpoints {', '.join(complete[1:])} can go: delete them, or relaunch with "
                f"checkpoint.keep_last=1 and they are removed before training resumes)"
                if len(complete) > 1
                else ""
            )
            raise UserError(
                f"saving {what}: {no_space_message(staged, error)}; nothing of {what} was kept and {safe}. Free space"
                f"{older} and relaunch: training resumes from {newest or 'the start'}."
            ) from error
        if error is not None:
            raise error
        raise UserError(f"saving {what} failed on another rank (see its log); {safe}")

    def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        """Every optimizer step: a step whose loss or gradient norm is not finite is neither saved
        nor evaluated; after `train.nonfinite_patience` such steps in a row, training stops with an
        error (the same decision on every rank)."""

        state = self.state  # type: ignore[attr-defined]
        # the Trainer keeps non-finite micro-step losses out of tr_loss (logging_nan_inf_filter):
        # `training_step` notes them
        flags = getattr(self, "_losses_finite", None)
        loss_ok = flags is None or bool(flags)
        self._losses_finite = None
        norm = float(grad_norm) if grad_norm is not None else 0.0
        # with fp16 loss scaling, an overflowing gradient only skips the step (the scaler's job)
        scaler = getattr(getattr(self, "accelerator", None), "scaler", None)
        norm_ok = math.isfinite(norm) or (scaler is not None and loss_ok)
        if not hasattr(self, "_nonfinite"):
            self._nonfinite = []
        if getattr(self, "_checked_step", None) == state.global_step:  # the epoch end's second call
            bad_before = bool(self._nonfinite) and self._nonfinite[-1][0] == state.global_step
            if bad_before:
                self.control.should_save = False  # type: ignore[attr-defined]
                self.control.should_evaluate = False  # type: ignore[attr-defined]
            super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)  # type: ignore[misc]
            return
        self._checked_step = state.global_step
        bad = any_rank(not (loss_ok and norm_ok))
        if bad:
            what = f"loss {'finite' if loss_ok else 'nan/inf'}, grad norm {norm:g}"
            self._nonfinite.append((state.global_step, what))
            self.control.should_save = False  # type: ignore[attr-defined]
            self.control.should_evaluate = False  # type: ignore[attr-defined]
            if len(self._nonfinite) >= self.ckpt.nonfinite_patience:
                self._stop_nonfinite()
        else:
            self._nonfinite = []
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)  # type: ignore[misc]

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Notes whether every micro-step loss of the current optimizer step is finite (kept on the
        device; read once per optimizer step)."""
        import torch

        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        finite = torch.isfinite(loss.detach()).all()
        flags = getattr(self, "_losses_finite", None)
        self._losses_finite = finite if flags is None else (flags & finite)
        return loss

    def _stop_nonfinite(self) -> None:
        steps = self._nonfinite
        run_dir = Path(super()._get_output_dir(None))  # type: ignore[misc]
        newest = next((c.path.name for c in complete_checkpoints(run_dir)), None)
        lr = self.args.learning_rate  # type: ignore[attr-defined]
        raise NonFiniteError(
            f"training diverged: the loss or gradient norm was not finite for {len(steps)} optimizer steps in a row "
            f"(steps {steps[0][0]}-{steps[-1][0]}; step {steps[0][0]}: {steps[0][1]}). Nothing was saved from those "
            f"steps; {'the newest complete checkpoint is ' + newest if newest else 'no checkpoint was written'}. "
            f"Lower train.learning_rate (now {lr:g}) or check the data; train.nonfinite_patience "
            f"(now {self.ckpt.nonfinite_patience}) sets how many such steps are tolerated."
        )

    def manifest(self, step: int) -> dict[str, Any]:
        state = self.state  # type: ignore[attr-defined]
        meta = self.ckpt.meta
        return {
            **meta,
            "recipe": self.ckpt.trained,  # what a resume compares (a checkpoint of another run put here)
            "step": step,
            "epoch": state.epoch,
            "max_steps": state.max_steps,
            "examples_consumed": step * meta.get("global_batch", 0),
        }

    def save_final(self, final: Path) -> None:
        """The end-of-training adapter + tokenizer, staged and published like a checkpoint. Not when
        the last steps were not finite: nothing non-finite is published."""
        if getattr(self, "_nonfinite", None):
            self._stop_nonfinite()
        staged = final.parent / STAGING / final.name
        with main_process_writes() as is_main:
            if is_main:
                shutil.rmtree(staged, ignore_errors=True)
        error: BaseException | None = None
        try:
            with peft_sees_fsdp_names(self):
                self.save_model(str(staged))  # type: ignore[attr-defined]
        except Exception as exc:
            error = exc
        self._after_save(staged, error, what=final.name)
        self._publish(staged, final)

    # -- resuming --------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """The adapter is copied into the trainable parameters in place (`load_adapter_in_place`)
        instead of peft's `load_adapter`, which gives the adapter weights new fp32 storage: a fresh
        QLoRA run trains them in bf16 (TRL casts them), and under FSDP the parameter with new storage
        is no longer the shard the optimizer steps."""
        target = model if model is not None else self.model  # type: ignore[attr-defined]
        folder = Path(resume_from_checkpoint)
        if (folder / ADAPTER_FILE).is_file() and hasattr(self.accelerator.unwrap_model(target), "peft_config"):  # type: ignore[attr-defined]
            n = load_adapter_in_place(target, folder)
            log.info("resume: %d adapter tensors of %s copied into the model", n, folder.name)
            return
        with peft_sees_fsdp_names(self):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is None:
            return
        paged = repage_optimizer_state(self.optimizer)  # type: ignore[attr-defined]
        if paged:
            log.info("resume: %d optimizer state tensors back in paged memory", paged)
        model = self.model_wrapped if self.is_fsdp_enabled else self.model  # type: ignore[attr-defined]
        # DeepSpeed keeps its optimizer state in its own partitions (and restores it itself)
        optimizer = None if self.is_deepspeed_enabled else self.optimizer  # type: ignore[attr-defined]
        problems = resume_problems(model, optimizer, Path(checkpoint))
        if any_rank(bool(problems)):
            raise RunDirError(
                f"resuming from {checkpoint} did not restore the training state exactly: "
                + ("; ".join(problems[:4]) if problems else "another rank found a difference (see its log)")
                + ". Stopping instead of continuing on a different run. Resume from another checkpoint "
                "(checkpoint.resume=PATH) or report this."
            )
        log.info("resume: adapter and optimizer state verified against %s", Path(checkpoint).name)


@functools.cache
def trainer_class(base: type) -> type:
    """`base` (a Trainer class) with complete-or-absent checkpoints mixed in."""
    return type(f"Checkpointing{base.__name__}", (CheckpointingMixin, base), {})


def run_metadata(recipe: Recipe, mode: Any, batch: Any) -> dict[str, Any]:
    """What a launch was: written as recipe.yaml's `launch:` block and into every manifest (resume
    checks the world size and global batch against it)."""
    steps = recipe.train.args.get("max_steps", -1)
    return {
        "recipe_hash": recipe.hash(),
        "mode": mode.kind,
        "world_size": mode.world_size,
        "zero_stage": mode.zero_stage,
        "micro_batch": batch.micro_batch,
        "grad_accum": batch.grad_accum,
        "global_batch": batch.global_batch,
        "max_steps_arg": -1 if steps is None else int(steps),
        "num_train_epochs": float(recipe.train.args.get("num_train_epochs", 3.0)),
        # the weights trained on (resume and export check them: a path alone can name another model)
        "base_model": base_fingerprint(recipe),
        # a requeue of this SLURM job resumes this run even with run.overwrite (slurm_requeue_of)
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": str(slurm_restart_count()),
    }


class Checkpointing:
    """Everything checkpointing wires into one training run: the Trainer class with staged,
    published checkpoints, the preemption and fault-injection callbacks, and the PREEMPTED marker
    for the launcher."""

    def __init__(self, recipe: Recipe, meta: dict[str, Any], rank: int):
        self.meta = meta
        self.trained = trained_fingerprint(recipe)
        self.keep_last = recipe.checkpoint.keep_last
        self.nonfinite_patience = recipe.train.nonfinite_patience
        self.rank = rank
        self.fault = Fault()
        self.preemption = preemption_callback(list(recipe.checkpoint.signals))

    def callbacks(self) -> list[Any]:
        return [self.preemption, fault_callback(self.fault, self.rank), best_checkpoint_callback()]

    def trainer(self, base: type, **kwargs: Any) -> Any:
        """An instance of `base` (e.g. trl.SFTTrainer) that checkpoints this way."""
        trainer = trainer_class(base)(**kwargs)
        trainer.ckpt = self
        return trainer

    @property
    def preempted(self) -> bool:
        return self.preemption.stopped_at_step is not None

    def record_preemption(self, run_dir: Path, step: int) -> float:
        """After a preemption stop (the checkpoint at `step` is complete): the main process writes
        PREEMPTED for launchers that lose the exit code. Returns seconds from the signal."""
        p = self.preemption
        waited = time.time() - (p.signalled_at or time.time())
        with main_process_writes() as is_main:
            if is_main:
                record = {"step": step, "signal": p.signal_name, "seconds_from_signal_to_exit": round(waited, 3)}
                atomic_write_text(run_dir / PREEMPTED, json.dumps(record) + "\n")
        log.warning(
            "preempted: checkpoint-%d is complete; %.1f s from signal to exit; exiting with code %d "
            "so the launcher requeues the job",
            step,
            waited,
            REQUEUE_EXIT_CODE,
        )
        return waited


@contextlib.contextmanager
def peft_sees_fsdp_names(trainer: Any) -> Iterator[None]:
    """peft (0.21) picks a model's adapter tensors out of a state dict by the model's module names.
    Under FSDP1 those names carry a `_fsdp_wrapped_module.` segment per wrapped unit (every decoder
    layer and every LoRA layer is one), while FSDP's full state dict has plain keys: peft then finds
    no adapter tensor, saves an empty adapter and, on resume, loads nothing without a word (seen on an
    H100: the adapter check refused the save; `test_checkpoint.py` reproduces it on the CPU). While
    the Trainer saves or loads, the FSDP-wrapped model and the PeftModel inside it report their
    module names as the state dict spells them. Nothing changes outside FSDP."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        yield
        return
    models = [trainer.model, trainer.accelerator.unwrap_model(trainer.model)]
    with plain_fsdp_names(*models):
        yield


@contextlib.contextmanager
def plain_fsdp_names(*models: Any) -> Iterator[None]:
    """`named_modules()` of each model without FSDP's `_fsdp_wrapped_module.` segments (an instance
    attribute over the class method, removed on exit)."""
    patched = []
    for m in {id(m): m for m in models}.values():
        method = type(m).named_modules

        def named_modules(*args: Any, _model: Any = m, _method: Any = method, **kwargs: Any) -> Iterator[Any]:
            for name, module in _method(_model, *args, **kwargs):
                yield name.replace("_fsdp_wrapped_module.", ""), module

        m.named_modules = named_modules
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.named_modules


# Launch modes whose checkpoints hold the same optimizer state format (torch's / bitsandbytes'
# state dict of the whole optimizer): a checkpoint of one resumes in another
PLAIN_STATE_MODES = ("cpu", "single_gpu", "ddp")


def check_resume(path: Path, world_size: int, global_batch: int, mode_kind: str) -> dict[str, Any]:
    """Refuse resumes that would restore silently partially, before anything loads. Returns the
    manifest. A checkpoint of one process, DDP or CPU ranks resumes on any number of those (the
    optimizer state is whole); a DeepSpeed or FSDP checkpoint resumes only in its own mode and world
    size (sharded or differently keyed optimizer state)."""
    manifest = json.loads((path / MANIFEST).read_text())
    old_ws, old_gb, old_mode = manifest.get("world_size"), manifest.get("global_batch"), manifest.get("mode")
    if old_gb and old_gb != global_batch:
        raise RunDirError(
            f"{path} was saved with global batch {old_gb}, this launch has {global_batch}: the data position "
            "and the schedule would not match. Keep train.global_batch_size as it was (the micro batch and "
            "the number of GPUs may change)."
        )
    if manifest.get("deepspeed_tag") or mode_kind == "deepspeed" or old_mode == "deepspeed":
        if old_mode not in (None, "deepspeed") or mode_kind != "deepspeed" or old_ws != world_size:
            raise RunDirError(
                f"{path} holds a DeepSpeed checkpoint of {old_ws} rank(s) (tag {manifest.get('deepspeed_tag')}); "
                f"this launch is {mode_kind} with {world_size}. DeepSpeed's optimizer state is sharded per rank: "
                f"relaunch with DeepSpeed and {old_ws} processes, or convert it with DeepSpeed's universal "
                f"checkpoint tool (python -m deepspeed.checkpoint.ds_to_universal --input_folder {path}/"
                f"{manifest.get('deepspeed_tag', 'global_stepN')} --output_folder <dir>) and resume from that."
            )
    elif (old_mode == "fsdp") != (mode_kind == "fsdp") or (mode_kind == "fsdp" and old_ws != world_size):
        raise RunDirError(
            f"{path} was saved by a {old_mode} launch of {old_ws} rank(s); this launch is {mode_kind} with "
            f"{world_size}. FSDP checkpoints keep the optimizer state by FSDP's parameter names and are resumed "
            f"only under FSDP with the same number of processes: relaunch as it was ({old_mode}, {old_ws} "
            "processes), then change the launch after a later checkpoint of a plain run, or start a new run."
        )
    if old_ws != world_size:
        log.warning(
            "resuming %s, saved by %s rank(s), on %d rank(s): same global batch %s and data position (step %s); "
            "per-rank RNG streams are not restored, so dropout masks differ from an uninterrupted run",
            path,
            old_ws,
            world_size,
            global_batch,
            manifest.get("step"),
        )
    return manifest


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------


def parse_signal(name: str) -> signal.Signals:
    name = name.upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


# the handlers the preemption signals had before a training in this process took them over
_HANDLERS_BEFORE_TRAINING: dict[signal.Signals, Any] = {}


def restore_signal_handlers() -> None:
    """Give the preemption signals back the handlers they had before training (when `train` returns
    or raises): a process that goes on after training (a notebook, a test worker) otherwise only
    noted a SIGTERM, and a process pool it started later (datasets' tokenization) could not stop its
    workers, which inherited the handler: `Pool.terminate` after a Ctrl-C waited for them for ever."""
    while _HANDLERS_BEFORE_TRAINING:
        sig, previous = _HANDLERS_BEFORE_TRAINING.popitem()
        with contextlib.suppress(ValueError, TypeError, OSError):  # (not the main thread; a handler set in C)
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def preemption_callback(signals: list[str]) -> Any:
    """A TrainerCallback: the handler only records the signal; at each step boundary the ranks agree
    (all-reduce MAX) and, if any rank was signalled, save a checkpoint together and stop."""
    import torch
    from transformers import TrainerCallback

    class Preemption(TrainerCallback):
        def __init__(self) -> None:
            self.signalled_at: float | None = None
            self.signal_name = ""
            self.stopped_at_step: int | None = None
            for name in signals:
                sig = parse_signal(name)
                previous = signal.signal(sig, self._handler)
                _HANDLERS_BEFORE_TRAINING.setdefault(sig, previous)

        def _handler(self, signum: int, frame: Any) -> None:  # only sets a flag: no I/O, no collectives
            if self.signalled_at is None:
                self.signalled_at = time.time()
                self.signal_name = signal.Signals(signum).name

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            flag = 1 if self.signalled_at is not None else 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                from .launch import distributed_state

                t = torch.tensor([flag], device=distributed_state().device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                flag = int(t.item())
            if flag and self.stopped_at_step is None:
                if self.signalled_at is None:  # another rank got the signal
                    self.signalled_at = time.time()
                    self.signal_name = "another rank's signal"
                self.stopped_at_step = state.global_step
                control.should_save = True
                control.should_training_stop = True
                log.warning(
                    "preemption (%s): saving a checkpoint at step %d and stopping", self.signal_name, state.global_step
                )

    return Preemption()


def best_checkpoint_callback() -> Any:
    """train.load_best_model_at_end after a resume: the resumed trainer_state.json names the best
    checkpoint by the absolute path it had when saved. In a run moved or copied elsewhere, the Trainer
    dropped it as missing (final/ then held the last step's adapter) or kept the old run's folder. At
    the first step (the resumed state is loaded by then), it is named where this run has it."""
    from transformers import TrainerCallback

    class BestCheckpointHere(TrainerCallback):
        checked = False

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.checked:
                return
            self.checked = True
            if not args.load_best_model_at_end or state.global_step == 0:
                return
            run_dir = Path(args.output_dir)
            recorded = best_checkpoint(run_dir / f"checkpoint-{state.global_step}")
            here = run_dir / Path(recorded).name if recorded else None
            if here is not None and here.is_dir() and str(here) != state.best_model_checkpoint:
                log.info("the best checkpoint recorded as %s is %s in this run directory", recorded, here)
                state.best_model_checkpoint = str(here)

    return BestCheckpointHere()


def fault_callback(fault: Fault, rank: int) -> Any:
    from transformers import TrainerCallback

    class FaultCallback(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            fault.trigger("kill", state.global_step + 1, rank)
            if fault.due("oom", state.global_step + 1, rank):
                import torch

                log.warning("QLORA_SFT_FAULT: out of GPU memory as step %d begins on rank %d", fault.step, rank)
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (simulated by QLORA_SFT_FAULT)"
                )
            if fault.action == "nan" and fault.step == state.global_step + 1 and model is not None:
                import torch

                log.warning("QLORA_SFT_FAULT: a trainable weight becomes NaN as step %d begins", fault.step)
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    return FaultCallback()
