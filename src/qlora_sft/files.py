"""Writing and checking files so that nothing is half-written or silently wrong.

atomic_write_text   write beside the target, then rename over it (a crash leaves the old file or the
                    new one, and never a stray temporary); atomic_prefix names those temporaries
file_digest         xxHash (XXH3, 128 bits) of a file, read once in large blocks
sampled_digest      the same of a large file's size and three 1 MiB samples (weights told apart cheaply)
no_space_message    what a full disk means for the user: which device, what is still safe
jsonl_records       the lines of a JSON-lines log, each with its object or None (a line cut off by a crash
                    or a full disk, or edited), never an exception
append_jsonl        one record appended on a line of its own (after a cut-off last line too)
temporary_for       `<target>.tmp-<host>-<pid>`: where a build is written before it is renamed into place
sweep_temporaries   remove those that processes of this host left when they were killed
local_path          a relative path from the working directory, else beside the recipe, and the other file
                    it names where both exist and differ (the caller refuses that)
write_problem       why files cannot be created in a folder (permissions, a read-only file system, a file
                    where a folder should be), tried for real: root, whom permission bits do not stop, passes
read_problem        why a file, or a file under a folder, cannot be read
not_utf8            a text's bytes that are not UTF-8 (surrogates from an argument), shown as \\x escapes
link_loop           the link on a path whose symbolic links lead back to themselves (pathlib's resolve
                    raises a RuntimeError there)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import behind

DIGEST = "xxh3_128"
_BLOCK = 8 << 20


def atomic_prefix(name: str) -> str:
    """How the temporary files `atomic_write` writes beside `name` begin (one exists only while a write
    of that file is under way, or after a process was killed in one)."""
    return f".{name}.tmp-"


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file in `path`'s folder, then rename it over `path`; the
    temporary file is removed if anything fails (a full disk included). The temporary name is this
    write's own (host, pid and a random part, created exclusively): writers of one file, in processes
    or on hosts sharing the folder, never meet in it."""
    tmp = path.with_name(f"{atomic_prefix(path.name)}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) into `path`, whole or not at all (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def user_cache_dir() -> Path:
    """The user's qlora-sft cache folder: `$QLORA_SFT_CACHE`, else `$XDG_CACHE_HOME/qlora-sft`, else
    ~/.cache/qlora-sft (small files kept between commands; losing them costs only time)."""
    return Path(
        os.environ.get("QLORA_SFT_CACHE", "").strip()
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qlora-sft")
    )


def file_digest(path: Path) -> str:
    """`xxh3_128:<hex>` of the file's bytes."""
    import xxhash

    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return f"{DIGEST}:{h.hexdigest()}"


def sampled_digest(path: Path, chunk: int = 1 << 20) -> str:
    """`xxh3_128:<hex>` of a large file's size and three 1 MiB samples (start, middle, end): tells two
    weight files of one shape apart (a base model and its fine-tune) without reading gigabytes."""
    import xxhash

    size = path.stat().st_size
    h = xxhash.xxh3_128(str(size).encode())
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
            f.seek(offset)
            h.update(f.read(chunk))
    return f"{DIGEST}:{h.hexdigest()}"


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space_errno(exc: BaseException | None) -> int | None:
    """ENOSPC, EDQUOT or EFBIG (a file size limit) where `exc` is a write that ran out of room, however
    the writer reported it, else None: an OSError's errno; the writers in Rust (safetensors,
    tokenizers) "... (os error 28)", which are no OSError; torch's zip writer ("unexpected pos",
    "file write failed"), which hides the errno (counted as ENOSPC)."""
    if exc is None:
        return None
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in NO_SPACE_ERRNOS else None
    text = str(exc)
    m = re.search(r"\(os error (\d+)\)", text)
    if m and int(m.group(1)) in NO_SPACE_ERRNOS:
        return int(m.group(1))
    torch_zip = ("unexpected pos", "file write failed", "No space left")
    if isinstance(exc, RuntimeError) and any(s in text for s in torch_zip):
        return errno.ENOSPC
    return None


def is_no_space(exc: BaseException) -> bool:
    """A write that ran out of room: a full disk, a quota or a file size limit (`no_space_errno`)."""
    return no_space_errno(exc) is not None


def no_space_behind(exc: BaseException) -> BaseException | None:
    """The write that ran out of room (`is_no_space`) behind `exc`: itself, or what it was raised
    from or while handling (datasets and pyarrow raise their own errors over the OSError)."""
    return behind(exc, is_no_space)


def no_space_message(path: Path, exc: BaseException | None = None) -> str:
    """'no space left on the file system of <mount> (<free> free of <total>)' for the file system
    holding `path`; where `exc` says a quota or a file size limit stopped the write, that instead."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
        free = f" ({usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB)"
    except OSError:
        free = ""
    code = no_space_errno(exc)
    if code == errno.EFBIG:
        return (
            f"a file grew past the largest this process may write (`ulimit -f`) or the file system of {probe} "
            "takes (file too large)"
        )
    if code == errno.EDQUOT:
        return f"the disk quota on the file system of {probe} is used up{free}"
    return f"no space left on the file system of {probe}{free}"


def jsonl_records(path: Path) -> list[tuple[int, str, dict | None]]:
    """Each non-blank line of a JSON-lines file: its number (from 1), its text and its object, or None
    where the line is not one JSON object (cut off by a crash or a full disk, edited by hand).
    Bytes that are not UTF-8 are replaced, so reading never fails on the file's content."""
    out: list[tuple[int, str, dict | None]] = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        out.append((number, line, record if isinstance(record, dict) else None))
    return out


def append_jsonl(path: Path, record: dict) -> None:
    """Append `record` as one line. A last line left without its newline (a crash mid-write) is ended
    first, so the new record never joins it."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    with path.open("ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.seek(0, os.SEEK_END)
        f.write(line)


def local_path(path: str, base_dir: str | os.PathLike[str] | None) -> tuple[Path | None, Path | None]:
    """(found, other): `path` as given (relative to the working directory) where it exists, else
    relative to `base_dir` (the recipe's folder), else None; `other` is the different file or folder
    the same relative path names beside the recipe where both exist (callers refuse the ambiguity,
    naming both), else None."""
    here = Path(path).expanduser()
    beside = Path(base_dir) / here if base_dir is not None and not here.is_absolute() else None
    if not here.exists():
        return (beside if beside is not None and beside.exists() else None), None
    if beside is None or not beside.exists():
        return here, None
    try:
        same = here.resolve() == beside.resolve() or os.path.samefile(here, beside)
    except OSError:
        same = False
    return here, (None if same else beside)


def temporary_for(target: Path) -> Path:
    """Where this process builds `target` before renaming it into place."""
    return target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def sweep_temporaries(target: Path, gone: Callable[[int], bool]) -> tuple[list[Path], list[tuple[Path, str, int]]]:
    """Remove the `temporary_for(target)` folders that processes of this host left when they were
    killed (`gone(pid)`; a name without a host is this host's): a whole model or dataset each.
    Returns (removed, the others as (folder, host, pid): another host's or a live process's)."""
    here = socket.gethostname()
    removed, others = [], []
    for tmp in sorted(target.parent.glob(f"{target.name}.tmp-*")):
        m = re.fullmatch(rf"{re.escape(target.name)}\.tmp-(?:(.+)-)?(\d+)", tmp.name)
        if not m or not tmp.is_dir():
            continue
        host, pid = m.group(1) or here, int(m.group(2))
        if host == here and pid != os.getpid() and gone(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        elif tmp != temporary_for(target):
            others.append((tmp, host, pid))
    return removed, others


def os_reason(exc: OSError) -> str:
    """What an OSError means for the user, in a few words ('permission denied')."""
    reasons = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "a read-only file system",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ENOSPC: "no space left",
        errno.EDQUOT: "disk quota exceeded",
        errno.ENOENT: "no such file or folder",
    }
    return reasons.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()


def not_utf8(text: str) -> str | None:
    """`text` shown with its bytes that are not UTF-8 as \\x escapes (Python hands such bytes of an
    argument or stdin on as surrogates, which the tokenizer refuses with a TypeError); None if it is
    all UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            return text.encode("utf-8", "backslashreplace").decode("ascii")
    return None


def link_loop(path: Path) -> Path | None:
    """The first part of `path` (itself included) whose symbolic links lead back to themselves, or
    None. `Path.resolve()` raises there (RuntimeError before Python 3.13, OSError ELOOP after)."""
    path = Path(os.path.abspath(path))
    for part in (*reversed(path.parents), path):
        try:
            os.stat(part)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return part
            return None  # missing (or unreadable): the parts below it cannot loop
    return None


def write_problem(folder: Path) -> str | None:
    """Why files cannot be created in `folder`, or None. Where it does not exist yet, the nearest
    folder above it that does is tried (where its missing parents would be made); nothing is
    created. Tried for real, by creating and removing an empty file: permission bits, ACLs and a
    read-only file system all count, and root, whom permission bits do not stop, passes."""
    probe = Path(folder)
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        if link_loop(probe) is not None:
            return f"{probe} is a symbolic link loop (its links lead back to themselves; `ls -l {probe}` shows them)"
        if probe.is_symlink() and not probe.exists():
            return f"{probe} is a link to {os.readlink(probe)}, which does not exist"
        return f"{probe} is a file, not a folder"
    try:
        # An unnamed file (Linux's O_TMPFILE): a check killed half-way leaves nothing behind.
        os.close(os.open(probe, os.O_TMPFILE | os.O_WRONLY, 0o600))
        return None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return f"cannot write to {probe} ({os_reason(exc)})"
    except AttributeError:
        pass  # no O_TMPFILE on this system
    try:  # a file system without unnamed files: a named one, removed at once
        fd, name = tempfile.mkstemp(prefix=".qlora-sft-write-check-", dir=probe)
    except OSError as exc:
        return f"cannot write to {probe} ({os_reason(exc)})"
    try:
        os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None


def _open_for_reading(path: str) -> None:
    """Open and close a regular file (never blocks: devices and pipes are left to their reader's checks)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # a link to nothing: its reader names it, if it reads it at all
    if stat.S_ISREG(mode):
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))


def read_problem(path: Path) -> str | None:
    """Why the file `path`, or a folder's files and subfolders, cannot be read, or None."""

    def fail(exc: OSError) -> None:
        raise exc

    try:
        if Path(path).is_dir():
            for root, _, names in os.walk(path, onerror=fail):
                for name in names:
                    _open_for_reading(os.path.join(root, name))
        else:
            _open_for_reading(str(path))
    except OSError as exc:
        return f"cannot read {exc.filename or path} ({os_reason(exc)})"
    return None
