"""Writing and checking files so that nothing is half-written or silently wrong.

atomic_write_text   write beside the target, then rename over it (a crash leaves the old file or the
                    new one, and never a stray temporary)
file_digest         xxHash (XXH3, 128 bits) of a file, read once in large blocks
no_space_message    what a full disk means for the user: which device, what is still safe
"""

from __future__ import annotations

import contextlib
import errno
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
