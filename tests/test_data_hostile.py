"""The data path under a hostile but realistic user: a prepared cache damaged after it was written
(cut off, a piece deleted, bytes flipped in place, its report gone), a disk that fills while the
cache is built, rows that say one field twice. Each is named with the folder, file or row and the
fix; nothing damaged is trained on and nothing is dropped in silence."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import write_toy_data

from qlora_sft import data
from qlora_sft.errors import DataError
from qlora_sft.model import ensure_pad_token
from qlora_sft.recipe import DataConfig, DataSource


@pytest.fixture(scope="module")
def tok():
    from tiny import build_tokenizer

    t = build_tokenizer()
    ensure_pad_token(t)
    return t


def cfg(*paths: Path | str, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    kw.setdefault("num_proc", 1)
    return DataConfig(sources=tuple(DataSource(path=str(p)) for p in paths), **kw)


@pytest.fixture()
def alarm() -> Iterator[None]:
    """Fail a test that hangs (a build that loops for ever) instead of hanging the suite."""

    def hung(*_: object) -> None:
        raise TimeoutError("the call did not return within 60 s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- a prepared cache damaged after it was written --------------------------------------------


def _arrow(folder: Path) -> Path:
    return next((folder / "train").glob("data-*.arrow"))


def _cut(folder: Path) -> None:
    a = _arrow(folder)
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])


def _flip(folder: Path) -> None:
    """Bytes changed in place, the size kept: in the token ids, past the Arrow schema."""
    a = _arrow(folder)
    raw = bytearray(a.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0x01
    st = a.stat()
    a.write_bytes(bytes(raw))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))


DAMAGE = {
    "arrow_cut_off": (_cut, "train/data-00000-of-00001.arrow"),
    "arrow_bytes_flipped": (_flip, "train/data-00000-of-00001.arrow"),
    "train_deleted": (lambda f: shutil.rmtree(f / "train"), "train"),
    "state_deleted": (lambda f: (f / "train" / "state.json").unlink(), "train/state.json"),
    "report_cut_off": (lambda f: (f / "report.json").write_text("{"), "report.json"),
    "report_deleted": (lambda f: (f / "report.json").unlink(), "report.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_is_named_with_the_fix_and_never_trained_on(tmp_path: Path, tok, alarm, damage: str):
    """Was: a cache folder whose report.json was gone was rebuilt for ever (the rename of the new
    build onto the existing folder failed in silence, and the loop built again); a cut-off Arrow
    file, a deleted split or a cut-off report.json raised a bare traceback (FileNotFoundError,
    OSError, JSONDecodeError) naming neither the cache nor the fix; bytes flipped in place were
    trained on. Now each names the cache folder, what is wrong and the fix (data.rebuild, or rm -r),
    and data.rebuild builds it again, the same rows as the first build."""
    f = write_toy_data(tmp_path / "toy.jsonl", n=40)
    root = tmp_path / "cache"
    first = data.prepare_data(cfg(f), tok, 0, root)
    expected = [list(x) for x in first.train["input_ids"]]
    folder = Path(first.cache)
    del first
    spoil, what = DAMAGE[damage]
    spoil(folder)
    with pytest.raises(DataError) as exc:
        data.prepare_data(cfg(f), tok, 0, root)
    msg = str(exc.value)
    assert f"the prepared data cache {folder}" in msg and "damaged" in msg, msg
    assert what in msg, msg
    assert "data.rebuild=true" in msg and f"rm -r {folder}" in msg, msg
    again = data.prepare_data(cfg(f, rebuild=True), tok, 0, root)
    assert not again.found and [list(x) for x in again.train["input_ids"]] == expected
    assert data.prepare_data(cfg(f), tok, 0, root).found
