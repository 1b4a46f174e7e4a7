"""Writing and checking files so that nothing is half-written or silently wrong.

atomic_write_text   write beside the target, then rename over it (a crash leaves the old file or the
                    new one, and never a stray temporary)
file_digest         xxHash (XXH3, 128 bits) of a file, read once in large blocks
sampled_digest      the same of a large file's size and three 1 MiB samples (weights told apart cheaply)
no_space_message    what a full disk means for the user: which device, what is still safe
jsonl_records       the lines of a JSON-lines log, each with its object or None (a line cut off by a crash
                    or a full disk, or edited), never an exception
append_jsonl        one record appended on a line of its own (after a cut-off last line too)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

DIGEST = "xxh3_128"
_BLOCK = 8 << 20


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder; the temporary file is
    removed if anything fails (a full disk included)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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


def is_no_space(exc: BaseException) -> bool:
    """A full disk (or quota), however the writer reported it: OSError ENOSPC/EDQUOT, or torch's
    zip writer ("unexpected pos", "file write failed") which hides the errno."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "unexpected pos" in text or "file write failed" in text or "No space left" in text
    )


def no_space_message(path: Path) -> str:
    """'no space left on <mount> (<free> free of <total>)' for the file system holding `path`."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
        free = f" ({usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB)"
    except OSError:
        free = ""
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
