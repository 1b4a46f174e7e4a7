"""The prepared cache: `prepare_data` builds the data once under `cache_root/data-<key>` (the key
covers the data section, the content of the sources' files, the tokenizer and the seed; the files'
digests are memoised beside the caches, `DigestMemo`, so unchanged files are not read again). One
process per node builds it, holding a lock file; every other process waits by polling the folder,
never in a collective; `data.rebuild` sets an old cache aside first. Streamed training data gets
its eval sources prepared and cached the same way. `data_fingerprint` is what a checkpoint records
of the data, from the same files and digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .. import files as files_module
from ..errors import DataError, first_line, interrupted
from ..files import (
    atomic_write_text,
    file_digest,
    no_space_behind,
    os_reason,
    sweep_temporaries,
    temporary_for,
    write_problem,
)
from ..recipe import DataConfig, DataSource
from .encode import PreparedData, build_data
from .report import EVAL_SUFFIX, DataReport, as_eval_sources_error, check_end_tokens
from .sources import resolve_path
from .stream import stream_data

log = logging.getLogger("qlora_sft")


# Bump when the tokenised output for the same inputs changes, to invalidate caches.
CACHE_VERSION = "17"  # 2: assistant spans from generation markers, tool calls; 3: cache folder layout;
# 4: eval rows held out before repetition (weight > 1), truncated conversations counted as not ending;
# 5: a messages row's tools, system and reasoning_content reach the chat template; 6: the stored report
# names the skipped rows and counts the eval rows dropped for no trained tokens; 7: axolotl's per-turn
# training flags are bad rows;
# 8: LLaMA-Factory's alpaca history is read; 9: a KTO row labelled undesirable is a bad row;
# 10: LLaMA-Factory's sharegpt function_call/observation turns and `tools` are read, OpenAI's developer role
# is the system turn; 11: axolotl's training flag read by value (1/0 kept), the stored report tells rows the
# template marks nothing in from those truncation left nothing of
# 12: OpenAI's deprecated function_call read as a tool call, LLaMA-Factory's alpaca `tools` read, axolotl's
# `training: null` read as no flag, the rows' near_miss column names their turns' keys not read;
# 13: a turn's `weight` null, or 0/1 agreeing with what trains, read (SlimOrca, OpenHermes), not a bad row
# 14: an assistant turn's reasoning_content in text parts read (another type a bad row), a turn's `name` that
# is not a string named in the near_miss column, a prompt's function_call with its result in the completion read
# 15: a prompt_completion row's assistant turns inside a conversational prompt untrained (TRL's
# completion_only_loss), a template that renders the prompt otherwise alone a bad row (prompt_rendered_differently)
# 16: bare tool definitions (LLaMA-Factory's) given to the template in OpenAI's form, a definition that is no
# function a bad row; a <think> block before a LLaMA-Factory function_call's JSON read as its reasoning_content
# 17: a conversational prompt's assistant turns with weight 0 (or training: false) read, not bad rows


def _source_files(src: DataSource, base_dir: str | os.PathLike[str] | None) -> list[Path] | None:
    """A local source's files (resolved), or None for a hub dataset."""
    local = resolve_path(src.path, base_dir)
    if local is None:
        return None
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    return [p.resolve() for p in files]


def _source_fingerprint(src: DataSource, base_dir: str | os.PathLike[str] | None, memo: DigestMemo) -> dict[str, Any]:
    """The source as the recipe gives it, and each of its files' path, size and content digest (not
    its modification time: an edit that keeps the size and sets the time back still changes the key,
    and the same bytes copied again keep it)."""
    fp: dict[str, Any] = {"source": asdict(src)}
    files = _source_files(src, base_dir)
    if files is not None:
        fp["files"] = [(str(p), p.stat().st_size, memo.digest(p)) for p in files]
    return fp


# Where the content digests of data files are kept, in the cache root, and how recent a file's change
# time may be for its digest to be kept there (see `DigestMemo`).
DIGEST_MEMO = "file-digests.json"
RACY_NS = 2_000_000_000


def _stat_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What a memoised digest holds for: size, modification and change times, inode."""
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def _data_files(cfg: DataConfig, base_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The local files of every source and eval source (resolved)."""
    return [p for src in (*cfg.sources, *cfg.eval_sources) for p in _source_files(src, base_dir) or []]


class DigestMemo:
    """Content digests of data files (`files.file_digest`), kept in `path` so that a launch does not
    read unchanged files again. An entry holds while the file's resolved path, size, modification
    time, change time and inode are the ones it was read with: the change time moves on every write
    and cannot be set back (`touch -r`, `cp -p` and `os.utime` set the modification time only), so an
    edit that restores the modification time is read again. A file changed within `RACY_NS` of being
    read is not kept (a second write within the file system's time resolution would leave its times
    as they were). Several processes use one memo at once: it is replaced whole (a temporary file
    renamed over it), never written in place, and one that cannot be read or is not a memo (cut off,
    corrupt, another version) is ignored, its files read again. Failing to write it costs only time."""

    VERSION = 1

    def __init__(self, path: Path | None, read: Callable[[Path], str] | None = None):
        self.path = path
        self.read = read  # how a file's digest is read (default: `file_digest`)
        self.entries = self._read()
        self.changed: dict[str, tuple[int, int, int, int, str]] = {}

    def _read(self) -> dict[str, tuple[int, int, int, int, str]]:
        if self.path is None:
            return {}
        try:
            memo = json.loads(self.path.read_text(encoding="utf-8"))
            if memo["version"] != self.VERSION:
                return {}
            entries = {}
            for path, size, mtime, ctime, inode, digest in memo["files"]:
                if not (isinstance(path, str) and isinstance(digest, str)):
                    return {}
                if not all(type(x) is int for x in (size, mtime, ctime, inode)):
                    return {}
                entries[path] = (size, mtime, ctime, inode, digest)
            return entries
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            return {}

    def digest(self, path: Path) -> str:
        """The content digest of `path` (resolved): from the memo while its file is unchanged, else read."""
        stat = path.stat()
        key = _stat_key(stat)
        entry = self.entries.get(str(path))
        if entry is not None and entry[:4] == key:
            return entry[4]
        digest = (self.read or file_digest)(path)
        if _stat_key(path.stat()) == key and time.time_ns() - stat.st_ctime_ns >= RACY_NS:
            self.entries[str(path)] = self.changed[str(path)] = (*key, digest)
        return digest

    def knows(self, path: Path) -> bool:
        """Whether the memo holds `path`'s digest for the file as it is now (no read needed)."""
        try:
            stat = path.stat()
        except OSError:
            return False
        entry = self.entries.get(str(path))
        return entry is not None and entry[:4] == _stat_key(stat)

    def save(self) -> None:
        """Write the digests read since the memo was loaded over what the memo holds now (another
        process may have written it meanwhile), less the files that are gone, if the cache root exists."""
        if self.path is None or not self.changed or not self.path.parent.is_dir():
            return
        entries = {**self._read(), **self.changed}
        entries = {path: e for path, e in entries.items() if path in self.changed or os.path.exists(path)}
        files = [[path, *entry] for path, entry in sorted(entries.items())]
        try:
            atomic_write_text(self.path, json.dumps({"version": self.VERSION, "files": files}))
        except OSError as exc:  # a read-only or full cache root: the next launch reads the files again
            log.debug("data: could not write %s: %s", self.path, exc)
        self.changed = {}


def _tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    return {
        "name": getattr(tokenizer, "name_or_path", ""),
        "content": _tokenizer_digest(tokenizer),
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token,
        "bos": tokenizer.bos_token,
        "add_bos": getattr(tokenizer, "add_bos_token", None),
    }


def _tokenizer_digest(tokenizer: Any) -> str | None:
    """A digest of what the tokenizer does (vocabulary, merges, normalizer, added tokens): a tokenizer
    replaced in place by another of the same size and special tokens (a re-download of a changed hub
    revision, an edited tokenizer.json) gets a cache of its own instead of the other's token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is not None:
            text = backend.to_str()
        else:  # a slow (Python) tokenizer: its vocabulary
            text = json.dumps(sorted(tokenizer.get_vocab().items()))
    except Exception:  # a tokenizer that cannot say: the other fields only, as before
        return None
    return hashlib.sha256(text.encode()).hexdigest()


# Data settings that change how the cache is built, not what it holds.
OUTPUT_INDEPENDENT = ("num_proc", "allow_no_eos", "rebuild")


def cache_key(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    base_dir: str | os.PathLike[str] | None,
    cache_root: str | os.PathLike[str] | None = None,
) -> str:
    """The key of the prepared cache: the data section, the content of the sources' files (their
    digests memoised in `cache_root`, see `DigestMemo`), the tokenizer and the seed."""
    memo = DigestMemo(Path(cache_root) / DIGEST_MEMO if cache_root is not None else None)
    blob = {
        "version": CACHE_VERSION,
        "data": {k: v for k, v in asdict(cfg).items() if k not in OUTPUT_INDEPENDENT},
        "seed": seed,
        "sources": [_source_fingerprint(s, base_dir, memo) for s in (*cfg.sources, *cfg.eval_sources)],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    memo.save()
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _written_files(folder: Path) -> dict[str, list[Any]]:
    """The files of a cache folder's splits as `build_cache` wrote them: relative path -> [size, content
    digest]; `load_prepared` checks them."""
    splits = [folder / split for split in ("train", "eval") if (folder / split).is_dir()]
    written = sorted(p for split in splits for p in split.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, files_module.file_digest(p)] for p in written}


def damaged_cache_message(folder: Path, what: str) -> str:
    """A prepared cache folder that is not as it was written: which, what is wrong, and the fix."""
    return (
        f"the prepared data cache {folder} is damaged: {what}. It is built from the data files and can be built "
        f"again: launch with data.rebuild=true after the recipe (`qlora-sft prepare RECIPE --rebuild`), or delete "
        f"it (rm -r {folder}) and launch again; nothing was trained on it."
    )


def load_prepared(folder: Path, verify: bool = True) -> PreparedData | None:
    """The cache folder written by `prepare_data`, or None where there is none. A folder that is there
    but not as `build_cache` wrote it (its report missing or cut off, a file of its splits missing, cut
    off or, with `verify`, changed in place: each file's size and content digest are recorded in its
    report, the digests memoised beside the caches like the data files') is a `DataError` naming it and
    the fix; never loaded, never built again in its place."""
    import datasets

    if not folder.exists():
        return None
    report = folder / "report.json"
    try:
        meta = json.loads(report.read_text(encoding="utf-8"))
        summary = DataReport.from_dict(meta["report"])
    except FileNotFoundError:
        raise DataError(damaged_cache_message(folder, "report.json is missing")) from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(damaged_cache_message(folder, f"report.json cannot be read ({first_line(exc)})")) from None
    written = meta.get("files")
    if isinstance(written, dict):
        memo = DigestMemo(folder.parent / DIGEST_MEMO, read=files_module.file_digest) if verify else None
        for rel, (size, digest) in sorted(written.items()):
            path = folder / rel
            try:
                now = path.stat().st_size
            except OSError:
                raise DataError(damaged_cache_message(folder, f"{rel} is missing")) from None
            if now != size:
                raise DataError(damaged_cache_message(folder, f"{rel} holds {now} bytes where {size} were written"))
            if memo is not None and memo.digest(path) != digest:
                raise DataError(
                    damaged_cache_message(folder, f"{rel} is not the bytes that were written (its content changed)")
                )
        if memo is not None:
            memo.save()
    try:
        train = datasets.load_from_disk(str(folder / "train"))
        evald = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    except Exception as exc:  # a folder cut off or deleted in part: datasets' or pyarrow's own words
        raise DataError(damaged_cache_message(folder, f"its splits cannot be read ({first_line(exc)})")) from None
    return PreparedData(train, evald, summary, str(folder), meta.get("built", {}))


DIGEST_WAIT_MIN_S = 60.0  # how long a rank waits for its node's main process to read the data files
DIGEST_WAIT_BYTES_PER_S = 100e6  # ... plus their size at this rate


def wait_for_digests(
    cfg: DataConfig, base_dir: str | os.PathLike[str] | None, cache_root: str | os.PathLike[str], poll: float = 1.0
) -> bool:
    """On a rank that is not its node's main process: wait until the digest memo in `cache_root`
    holds every local data file as it is now (the main process reads them for the cache key and
    writes the memo), so that the data is read once per node, not once per rank. Gives up after
    `DIGEST_WAIT_MIN_S` plus the files' size at `DIGEST_WAIT_BYTES_PER_S` (a file changed within
    the last seconds is not memoised, a memo that cannot be written is never there): the rank then
    reads the files itself, which costs time only. Returns whether the memo had them."""
    files = _data_files(cfg, base_dir)
    if not files:
        return True
    try:
        size = sum(p.stat().st_size for p in files)
    except OSError:
        size = 0  # a file gone: its reader names it
    deadline = time.monotonic() + DIGEST_WAIT_MIN_S + size / DIGEST_WAIT_BYTES_PER_S
    memo_path = Path(cache_root) / DIGEST_MEMO
    while True:
        memo = DigestMemo(memo_path)
        if all(memo.knows(p) for p in files):
            return True
        if time.monotonic() >= deadline:
            log.info("data: the digests of the data files did not appear in %s: reading the files here", memo_path)
            return False
        time.sleep(poll)


def cache_folder(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None,
) -> Path:
    return Path(cache_root) / f"data-{cache_key(cfg, tokenizer, seed, base_dir, cache_root)}"


EMPTY_LOCK_GRACE_S = 60.0  # a lock still without its record this long after it was created: its writer died
CLOCK_SLACK_S = 2.0  # how much later than a lock's record its holder may seem to start (whole-second boot time)


def _lock_record() -> dict[str, Any]:
    """What a lock records of its holder: host, machine (boot id and pid namespace), pid and the
    pid's start time (clock ticks since boot), which together tell the holder from a later process
    that was given the same pid."""
    from ..checkpoint import process_record

    return {**process_record(), "started": time.time()}


def _lock_holder(lock: Path) -> dict[str, Any]:
    """The lock's record, or {} where it is missing, empty or not a JSON object."""
    try:
        record = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _process_started_at(start: str) -> float | None:
    """A start time read from /proc/<pid>/stat (clock ticks since boot) as a wall-clock time."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        btime = next(int(line.split()[1]) for line in lines if line.startswith("btime "))
        return btime + int(start) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def _holder_gone(holder: dict[str, Any], lock: Path | None = None) -> str | None:
    """Why the lock's holder is provably gone, or None (alive, or not provable from here).

    - Another host's lock (a cache folder on a shared file system), or one of another pid namespace
      of this host (a container sharing its hostname): never provable here, where its pid means
      nothing; the waiting launch says which file to delete.
    - This host's lock: gone when it was written in another boot (the boot id differs), when its pid
      has exited, or when the pid now belongs to another process (its start time differs from the
      recorded one: reused after a crash or a reboot, or a lock copied from another run).
    - A lock of an older qlora-sft (no start time recorded): gone when its pid has exited, or when
      the process with that pid started after the lock was written (it cannot be the holder). A pid
      alive since before then is taken for the holder, as before.
    - An empty lock, or one naming no process, still so `EMPTY_LOCK_GRACE_S` after it was created:
      its creator was killed before it wrote the record (which it does at once)."""
    from ..checkpoint import _machine, _process_start, process_gone

    if not holder.get("pid") and lock is not None:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return None
        if _lock_holder(lock).get("pid") or age < EMPTY_LOCK_GRACE_S:
            return None
        return f"it names no process {age:.0f} s after it was created: its creator was killed before writing it"
    if holder.get("host") != socket.gethostname():
        return None
    try:
        pid = int(holder.get("pid") or 0)
    except (TypeError, ValueError):
        return None  # a record no qlora-sft wrote: nothing is provable
    if not pid:
        return None
    boot, my_boot = str(holder.get("machine") or "?").split(":")[0], _machine().split(":")[0]
    if "?" not in (boot, my_boot) and boot != my_boot:
        return f"this host restarted since process {pid} wrote it"
    if not _same_pid_namespace(holder):
        return None  # another container sharing this hostname: its pid means nothing here
    why = process_gone(pid, holder.get("pid_start"))
    if why is not None or holder.get("pid_start") not in (None, "?"):
        return why
    # written by an older qlora-sft, without the start time
    start = _process_start(pid)
    started_at = _process_started_at(start) if start not in (None, "?") else None
    try:
        written = float(holder.get("started"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if started_at is not None and started_at > written + CLOCK_SLACK_S:
        return f"process {pid} has exited (its pid belongs to another process now, started after the lock was written)"
    return None


def _same_pid_namespace(holder: dict[str, Any]) -> bool:
    """The holder's pids are this process's (its recorded pid namespace is this one, or unknown)."""
    from ..checkpoint import _machine

    theirs, mine = str(holder.get("machine") or "?").split(":")[1:2], _machine().split(":")[1:2]
    return not theirs or not mine or "?" in (theirs[0], mine[0]) or theirs == mine


def _wait_note(holder: dict[str, Any] | None, folder: Path, lock: Path) -> str:
    """Who the wait is for, and what to do if that process is gone."""
    if not holder:
        return f"the main process to finish the data cache {folder}"
    host, pid = holder.get("host"), holder.get("pid")
    if not holder.get("pid"):
        who = "the process that created its lock (it has not named itself yet)"
    elif host == socket.gethostname() and not _same_pid_namespace(holder):
        who = f"{host} pid {pid} (in another container of this host: whether it still runs cannot be seen from here)"
    elif host == socket.gethostname():
        who = f"{host} pid {pid} (alive on this host)"
    else:
        who = f"{host} pid {pid} (on another host: whether it still runs cannot be seen from here)"
    return (
        f"{who} to finish the data cache {folder}. If no qlora-sft process is preparing this data any more, delete "
        f"its lock (rm {lock}): the waiting launch then builds the cache itself"
    )


def _wait_for_cache(
    folder: Path, since: float, until_unlocked: bool = False, poll: float = 1.0, note_every: float = 60.0
) -> PreparedData | None:
    """Wait (no collective, no timeout) until another process has written the cache; fail when it
    failed or died. `until_unlocked`: return None when nobody holds the lock, or its holder is
    provably gone (`_holder_gone`), and there is no cache (the caller may build it). Logs every
    `note_every` seconds whom it waits for and which lock file to delete if that process is gone."""
    lock, failed = folder.with_name(folder.name + ".lock"), folder.with_name(folder.name + ".failed")
    start, next_note = time.monotonic(), note_every
    while True:
        prepared = load_prepared(folder, verify=False)  # just written by the process waited for
        if prepared is not None:
            return prepared
        holder = _lock_holder(lock) if lock.exists() else None
        if holder is None and failed.exists() and failed.stat().st_mtime >= since - 5:
            raise DataError(f"preparing the data failed in another process: {failed.read_text().strip()}")
        if until_unlocked and (holder is None or _holder_gone(holder, lock)):
            return None  # nobody builds it (any more): the caller takes the lock
        waited = time.monotonic() - start
        if waited >= next_note:
            log.info("data: waiting %.0f s for %s", waited, _wait_note(holder, folder, lock))
            next_note += note_every
        time.sleep(poll)


def unwritable_cache_message(cache_root: Path, problem: str) -> str:
    """The data cache folder cannot be written: which folder, why, and what to do."""
    return (
        f"the data cache folder {cache_root}: {problem}. The prepared data is built there and training writes beside "
        "it (run.output_dir/.cache, shared by the runs of one run.output_dir): fix the folder's permissions, or "
        "choose a writable run.output_dir; nothing was written."
    )


def _unwritable_cache(folder: Path, exc: OSError | None) -> DataError:
    """The cache folder (its lock) cannot be written."""
    problem = write_problem(folder.parent) or (
        f"cannot write to {folder.parent} ({os_reason(exc)})" if exc is not None else "cannot be written"
    )
    return DataError(unwritable_cache_message(folder.parent, problem))


def build_cache(folder: Path, build: Any, by: str = "train") -> PreparedData | None:
    """Build the cache folder once: the process that creates its lock file builds (into a temporary
    folder, renamed when complete), the others wait for it. Returns what this process loaded, or
    None if another process holds the lock."""
    lock, failed = folder.with_name(folder.name + ".lock"), folder.with_name(folder.name + ".failed")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if not folder.parent.is_dir():
            raise _unwritable_cache(folder, None) from None
        if lock.is_dir():
            raise DataError(
                f"the data cache lock {lock} is a folder, not the file a build creates: remove it (rm -r {lock}) "
                "and launch again; nothing was written."
            ) from None
        holder = _lock_holder(lock)
        why = _holder_gone(holder, lock)
        if why is None or _lock_holder(lock) != holder:  # (alive, or replaced since it was read)
            return None
        log.warning(
            "data: removed the lock %s of a data cache build that is gone (%s pid %s): %s",
            lock,
            holder.get("host", "?"),
            holder.get("pid", "?"),
            why,
        )
        try:
            lock.unlink(missing_ok=True)
        except OSError as exc:
            raise _unwritable_cache(folder, exc) from None
        return build_cache(folder, build, by)
    except OSError as exc:
        raise _unwritable_cache(folder, exc) from None
    started = time.time()
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_lock_record(), f)
    except BaseException:
        lock.unlink(missing_ok=True)  # an empty lock would hold every later launch up
        raise
    tmp = temporary_for(folder)
    # builds of this key killed on this host (this process holds the lock: no live build has it)
    here = socket.gethostname()
    for left in sweep_temporaries(folder, lambda pid: _holder_gone({"host": here, "pid": pid}) is not None)[0]:
        log.info("data: removed %s, left by a build that was killed", left)
    try:
        failed.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        prepared = build(tmp / "work")
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(tmp / "eval"))
        built = {
            "by": by,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(time.time() - started, 1),
        }
        meta = {"report": prepared.report.to_dict(), "built": built, "files": _written_files(tmp)}
        (tmp / "report.json").write_text(json.dumps(meta, indent=2))
        del prepared
        shutil.rmtree(tmp / "work", ignore_errors=True)
        with contextlib.suppress(OSError):  # a process on another node may have won the rename
            tmp.rename(folder)
    except BaseException as exc:
        full = no_space_behind(exc)
        error = DataError(no_space_in_cache_message(folder, full)) if full is not None else None
        stopped = interrupted(exc)  # Ctrl-C, perhaps under the error datasets' pool raised cleaning up
        with contextlib.suppress(OSError):
            failed.write_text(
                str(error)
                if error is not None
                else "interrupted (Ctrl-C) while it was built"
                if stopped
                else f"{type(exc).__name__}: {exc}"
            )
        if error is not None:
            raise error from None
        if stopped and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)
    return load_prepared(folder, verify=False)  # just written (here, or by the process that won the rename)


def no_space_in_cache_message(folder: Path, exc: BaseException) -> str:
    """Building the cache folder ran out of room: where, why, what was kept, and what to do."""
    return (
        f"preparing the data cache {folder}: {files_module.no_space_message(folder.parent, exc)} "
        f"({first_line(exc)}). The partial cache was removed: nothing was kept that a later launch could take for "
        f"the prepared data, and nothing was trained. Free space in {folder.parent} (a data-<key> folder there of data "
        "no recipe uses any more can be deleted), or choose a run.output_dir on a file system with room for the "
        "tokenized data, and launch again."
    )


OTHER_CACHES_NAMED = 5  # how many of the other caches `other_caches` names


def _folder_size(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total


def _size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def other_caches(folder: Path) -> list[str]:
    """Lines naming the prepared caches beside `folder` of other keys: each edit of the data, a data
    key or the tokenizer gets a cache of its own, and qlora-sft deletes none (another run of the same
    output_dir may use it). What each was built from, when and its size, and how to remove one."""
    root = folder.parent
    try:
        others = sorted(
            (p for p in root.glob("data-*") if p.is_dir() and "." not in p.name and p.name != folder.name),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    except OSError:
        return []
    if not others:
        return []
    described, total = [], 0
    for p in others:
        size = _folder_size(p)
        total += size
        if len(described) >= OTHER_CACHES_NAMED:
            continue
        try:
            meta = json.loads((p / "report.json").read_text(encoding="utf-8"))
            built = meta.get("built", {})
            paths = [str(s.get("path")) for s in meta["report"].get("sources", [])]
            what = f"built by {built.get('by', '?')} at {built.get('at', '?')} from {', '.join(paths) or '?'}"
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            what = "its report cannot be read"
        described.append(f"{p.name} ({what}; {_size_text(size)})")
    more = f" and {len(others) - len(described)} more" if len(others) > len(described) else ""
    n = len(others)
    return [
        f"{root} holds {n} other prepared data cache{'s' if n > 1 else ''} ({_size_text(total)}): "
        f"{'; '.join(described)}{more}. Each change of the data files, the data section, the tokenizer or the seed "
        "builds a cache of its own, and qlora-sft never deletes one (another run of this run.output_dir may still "
        f"use it): remove those no run needs, e.g. rm -r {others[0]}"
    ]


def set_cache_aside(folder: Path) -> None:
    """`data.rebuild`: every process of the launch meets; one process per node moves the existing
    cache folder aside and deletes it (qlora-sft wrote it); all meet again, so no process can find
    the old cache, before the usual build-once-and-wait starts. The meetings come before the long
    work, so no collective waits for a build."""
    from ..launch import distributed_state

    state = distributed_state()
    state.wait_for_everyone()
    if state.is_local_main_process and folder.exists():
        aside = folder.with_name(f"{folder.name}.old-{socket.gethostname()}-{os.getpid()}")
        with contextlib.suppress(OSError):  # another node's process may have moved it first
            folder.rename(aside)
            log.info("data: data.rebuild: the prepared cache %s is rebuilt", folder)
        shutil.rmtree(aside, ignore_errors=True)
    state.wait_for_everyone()


def _prepare_stream(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None,
    by: str,
) -> PreparedData:
    """The training stream (under several ranks, accelerate's default for iterable datasets has the
    main process read it and send each rank its share of every batch), and the eval
    sources prepared and cached like non-streamed data."""
    prepared = stream_data(cfg, tokenizer, seed, base_dir)
    if cfg.eval_sources:
        held = replace(cfg, sources=cfg.eval_sources, eval_sources=(), eval_fraction=0.0, streaming=False)
        try:
            evald = prepare_data(held, tokenizer, seed, cache_root, base_dir, by)
        except DataError as exc:  # said of the training sources, which they were for this build
            said = as_eval_sources_error(str(exc), [s.path for s in cfg.eval_sources])
            if said is None:
                raise
            raise DataError(said) from None
        prepared.eval = evald.train
        prepared.report.eval_rows = evald.report.train_rows
        prepared.report.eval_dropped_no_loss = evald.report.dropped_no_loss
        for r in evald.report.sources:
            prepared.report.sources.append(replace(r, path=r.path + EVAL_SUFFIX))
        prepared.cache, prepared.built, prepared.found = evald.cache, evald.built, evald.found
    return prepared


def _load_on_every_rank(folder: Path) -> PreparedData | None:
    """`load_prepared` on every rank of the launch, with one outcome: each node's main process reads
    the cache's files against their digests (memoised), the other ranks check their sizes only, and
    where any of them finds the cache damaged, every rank raises that DataError (one small gather,
    before anything is built, so no rank waits in it for a build). Otherwise the ranks that found
    the cache continued into training while the one that found it changed had stopped, and waited
    for it in the next collective until train.ddp_timeout; with several nodes, each node's main
    process checks its own view of a cache that may be node-local."""
    from ..checkpoint import first_rank_error
    from ..launch import distributed_state

    prepared, problem = None, None
    try:
        prepared = load_prepared(folder, verify=distributed_state().is_local_main_process)
    except DataError as exc:
        problem = str(exc)
    said = first_rank_error(problem)
    if said is not None:
        raise DataError(said)
    return prepared


def prepare_data(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    by: str = "train",
) -> PreparedData:
    """`build_data`, cached under `cache_root/data-<key>` (the key covers the data section, the
    sources' files, the tokenizer and the seed). One process per node builds it (the local main
    process, or `qlora-sft prepare` beforehand); every other process waits for the cache folder by
    polling it, never in a collective that could time out. Where the folder is shared between
    nodes, the first node builds and the others wait."""
    from ..launch import distributed_state

    if cfg.streaming:
        return _prepare_stream(cfg, tokenizer, seed, cache_root, base_dir, by)
    with contextlib.suppress(OSError):  # where the key's digests are kept (building fails on its own if it cannot)
        Path(cache_root).mkdir(parents=True, exist_ok=True)
    if not distributed_state().is_local_main_process:
        wait_for_digests(cfg, base_dir, cache_root)  # the node's main process reads the files for the key
    seen = _file_states(cfg, base_dir)  # as the key reads them: a build over files changed since is not kept
    folder = cache_folder(cfg, tokenizer, seed, cache_root, base_dir)
    if cfg.rebuild:
        set_cache_aside(folder)
    since = time.time()
    prepared = _load_on_every_rank(folder)
    if prepared is not None:
        prepared.found = True
        check_end_tokens(prepared.report, cfg)
        return prepared
    if distributed_state().is_local_main_process:
        # build it, or wait while another process (another node, `qlora-sft prepare`) holds the lock
        while prepared is None:
            prepared = build_cache(
                folder,
                lambda work: unchanged_since(seen, cfg, base_dir, build_data(cfg, tokenizer, seed, base_dir, work)),
                by,
            )
            prepared = prepared or _wait_for_cache(folder, since, until_unlocked=True)
        return prepared
    prepared = _wait_for_cache(folder, since)
    assert prepared is not None
    return prepared


def _file_states(cfg: DataConfig, base_dir: str | os.PathLike[str] | None) -> dict[str, tuple[int, ...] | None]:
    """Each local data file's size, times and inode (None: gone), by resolved path."""
    states: dict[str, tuple[int, ...] | None] = {}
    for p in _data_files(cfg, base_dir):
        try:
            states[str(p)] = _stat_key(p.stat())
        except OSError:
            states[str(p)] = None
    return states


def unchanged_since(
    seen: dict[str, tuple[int, ...] | None], cfg: DataConfig, base_dir: str | os.PathLike[str] | None, built: Any
) -> Any:
    """`built` where the data files are as they were when the cache key read them; else a DataError
    naming the file that was written to (or added, or removed) meanwhile: its rows are of neither
    version, and the cache would keep them under the key of the old one."""
    now = _file_states(cfg, base_dir)
    for path in sorted(set(seen) | set(now)):
        if seen.get(path) != now.get(path):
            what = "appeared" if path not in seen else "was removed" if path not in now else "changed"
            raise DataError(
                f"data: {path} {what} while its rows were read (another process writing or copying it?): "
                "the rows read are of neither version, so nothing was cached or trained. Let the writer finish, "
                "then launch again."
            )
    return built


def data_fingerprint(
    cfg: DataConfig,
    base_dir: str | os.PathLike[str] | None,
    report: DataReport,
    digests: bool = True,
    cache_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """What a checkpoint records of the data it was trained on (a resume over changed data is
    refused): every local file of every source (path, size, modification time and, with `digests`,
    content digest) and the split's row counts. Hub datasets are named by the recipe (id, split,
    revision), which resume compares. `digests` reads every file that the memo in `cache_root` (the
    one the cache key keeps) does not know unchanged: only the process that writes the manifests and
    checks a resume needs them."""
    # with each file's content digest: a byte-identical copy (data staged again by a requeued job, a
    # checkout, a `cp` without -p) has a new modification time and is still the same data
    memo = DigestMemo(Path(cache_root) / DIGEST_MEMO if cache_root is not None and digests else None)
    files = []
    for p in _data_files(cfg, base_dir):
        stat = p.stat()
        files.append([str(p), stat.st_size, stat.st_mtime_ns, *([memo.digest(p)] if digests else [])])
    memo.save()
    return {"files": files, "train_rows": report.train_rows, "eval_rows": report.eval_rows}
