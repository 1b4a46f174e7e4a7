"""The data cache's lock (`data-<key>.lock`): a launch never waits forever on the lock of a process
that is gone, even when its pid now belongs to another live process (reused after a crash or a
reboot, or a lock copied from another run), and never breaks the lock of a live holder or of one
on another host."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qlora_sft import checkpoint
from qlora_sft.data import cache
from qlora_sft.data.encode import PreparedData
from qlora_sft.data.report import DataReport
from qlora_sft.errors import DataError


def fake_build(work: Path) -> PreparedData:
    import datasets

    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]})
    return PreparedData(rows, None, DataReport(train_rows=1))


@pytest.fixture()
def sleeper() -> Iterator[subprocess.Popen]:
    """A live process on this host that holds no lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def folder_and_lock(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "cache" / "data-0123456789abcdef0123"
    folder.parent.mkdir(parents=True)
    return folder, folder.with_name(folder.name + ".lock")


def test_the_lock_names_its_holder_process_by_pid_and_start_time(tmp_path: Path):
    folder, lock = folder_and_lock(tmp_path)
    seen: dict[str, Any] = {}

    def build(work: Path) -> PreparedData:
        seen.update(json.loads(lock.read_text()))
        return fake_build(work)

    assert cache.build_cache(folder, build) is not None
    assert seen["host"] == socket.gethostname() and seen["pid"] == os.getpid()
    assert seen["pid_start"] == Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    assert not lock.exists()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path: Path, sleeper, caplog):
    """The pid is alive, but its start time is not the one the lock recorded: reused, the holder is gone."""
    folder, lock = folder_and_lock(tmp_path)
    me = cache._lock_record()
    lock.write_text(json.dumps({**me, "pid": sleeper.pid, "pid_start": "12345"}))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        prepared = cache.build_cache(folder, fake_build)
    assert prepared is not None and prepared.report.train_rows == 1
    assert f"pid {sleeper.pid}" in caplog.text and "belongs to another process" in caplog.text
    assert str(lock) in caplog.text
    assert sleeper.poll() is None and not lock.exists()


def test_a_waiting_launch_takes_over_a_reused_pids_lock(tmp_path: Path, sleeper):
    """The main process waits for a lock's holder (until_unlocked) and builds as soon as it is gone."""
    folder, lock = folder_and_lock(tmp_path)
    lock.write_text(json.dumps({**cache._lock_record(), "pid": sleeper.pid, "pid_start": "1"}))
    assert cache._wait_for_cache(folder, time.time(), until_unlocked=True, poll=0.01) is None


def test_a_lock_of_a_live_holder_is_kept(tmp_path: Path, sleeper):
    folder, lock = folder_and_lock(tmp_path)
    record = {**cache._lock_record(), "pid": sleeper.pid, "pid_start": checkpoint._process_start(sleeper.pid)}
    lock.write_text(json.dumps(record))
    assert cache._holder_gone(record) is None
    assert cache.build_cache(folder, fake_build) is None  # another process builds: this one waits
    assert json.loads(lock.read_text()) == record and not folder.exists()


def test_a_lock_of_a_dead_pid_is_taken_over(tmp_path: Path):
    folder, lock = folder_and_lock(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({**cache._lock_record(), "pid": dead.pid, "pid_start": "1"}))
    assert cache.build_cache(folder, fake_build) is not None and not lock.exists()


def test_a_lock_of_another_boot_of_this_host_is_taken_over(tmp_path: Path, sleeper):
    """After a reboot the pid may belong to a process started at the same clock tick: the boot id tells."""
    folder, lock = folder_and_lock(tmp_path)
    record = {**cache._lock_record(), "pid": sleeper.pid, "pid_start": checkpoint._process_start(sleeper.pid)}
    record["machine"] = "another-boot-id:" + record["machine"].split(":", 1)[1]
    lock.write_text(json.dumps(record))
    assert "restarted" in (cache._holder_gone(record) or "")
    assert cache.build_cache(folder, fake_build) is not None


def test_an_older_versions_lock_on_a_reused_pid_is_taken_over(tmp_path: Path, sleeper):
    """A lock without a start time (written before it was recorded): a live process that started after
    the lock was written cannot be its holder."""
    folder, lock = folder_and_lock(tmp_path)
    old = {"host": socket.gethostname(), "pid": sleeper.pid, "started": time.time() - 3600}
    lock.write_text(json.dumps(old))
    assert "belongs to another process" in (cache._holder_gone(old) or "")
    assert cache.build_cache(folder, fake_build) is not None
    # ... and one whose live pid started before the lock was written is kept (it may be the holder)
    held = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    assert cache._holder_gone(held) is None


def test_a_lock_from_another_host_is_not_broken_and_the_wait_names_the_file(tmp_path: Path, caplog):
    """On a shared file system a pid of another host means nothing here: wait, and say which file to
    delete if that process is certainly gone."""
    folder, lock = folder_and_lock(tmp_path)
    record = {**cache._lock_record(), "host": "node-elsewhere-17", "pid": 4_000_000}
    lock.write_text(json.dumps(record))
    assert cache._holder_gone(record) is None
    assert cache.build_cache(folder, fake_build) is None
    timer = threading.Timer(0.5, lambda: lock.unlink())
    timer.start()
    with caplog.at_level(logging.INFO, logger="qlora_sft"):
        assert cache._wait_for_cache(folder, time.time(), until_unlocked=True, poll=0.01, note_every=0.1) is None
    timer.join()
    assert "node-elsewhere-17 pid 4000000" in caplog.text
    assert f"rm {lock}" in caplog.text and "another host" in caplog.text


def test_an_empty_lock_left_by_a_process_killed_before_it_wrote_it_is_taken_over(tmp_path: Path):
    folder, lock = folder_and_lock(tmp_path)
    lock.touch()
    assert cache.build_cache(folder, fake_build) is None  # just created: its writer may be writing it
    old = time.time() - 2 * cache.EMPTY_LOCK_GRACE_S
    os.utime(lock, (old, old))
    assert cache.build_cache(folder, fake_build) is not None and not lock.exists()


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path: Path, monkeypatch):
    """A full disk while writing the lock's record: the empty lock is removed, not left for every
    later launch to wait on."""
    folder, lock = folder_and_lock(tmp_path)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.json, "dump", full)
    with pytest.raises((OSError, DataError)):
        cache.build_cache(folder, fake_build)
    assert not lock.exists()


def test_a_lock_from_another_pid_namespace_of_this_host_is_not_broken(tmp_path: Path):
    """Two containers that share a hostname and a kernel (host networking) do not share pids: the pid
    of a live build in the other container means nothing here, so its lock is kept (found by a hostile test)."""
    folder, lock = folder_and_lock(tmp_path)
    record = {**cache._lock_record(), "pid": 4_000_000, "pid_start": "12345"}
    record["machine"] = record["machine"].split(":", 1)[0] + ":4026599999"  # same boot, another pid namespace
    lock.write_text(json.dumps(record))
    assert cache._holder_gone(record, lock) is None
    assert cache.build_cache(folder, fake_build) is None and lock.exists()


def test_a_lock_that_is_a_folder_is_named_with_the_fix(tmp_path: Path):
    """Something made a folder where the lock file goes: the error names that folder and says to remove
    it, not that the cache folder cannot be written (found by a hostile test)."""
    folder, lock = folder_and_lock(tmp_path)
    lock.mkdir()
    old = time.time() - 2 * cache.EMPTY_LOCK_GRACE_S
    os.utime(lock, (old, old))
    with pytest.raises(DataError) as err:
        cache.build_cache(folder, fake_build)
    assert f"{lock} is a folder" in str(err.value) and f"rm -r {lock}" in str(err.value)
