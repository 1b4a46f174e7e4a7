"""Folders that cannot be written and files that cannot be read: each command stops with an error
that names the path and the fix, before any model is loaded, instead of a PermissionError traceback.

Three ways to make a path fail, since root ignores permission bits: chmod (skipped as root), a path
under a regular file (NotADirectoryError, for everyone), and kernel file systems that refuse root too
(creating a file in /sys, reading the write-only /proc/sys/vm/compact_memory: skipped where they
do not)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import recipe_dict, write_recipe, write_toy_data

from qlora_sft import cli
from qlora_sft.errors import DataError, RunDirError, UserError
from qlora_sft.files import atomic_write_text, read_problem, write_problem
from qlora_sft.recipe import load_recipe

ROOT = os.geteuid() == 0
as_user = pytest.mark.skipif(ROOT, reason="root ignores permission bits (see the root-safe variants)")
SHORT = {"max_steps": 2, "save_steps": 2, "logging_steps": 1}


def denied_folder() -> Path:
    """A folder in which nobody, root included, may create a file (sysfs)."""
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return Path("/sys")
        pytest.skip(f"/sys: {exc}")
    os.close(fd)
    os.unlink(name)
    pytest.skip("/sys accepts new files here")


def denied_file(tmp_path: Path, name: str) -> Path:
    """A link to a file nobody, root included, may read (a write-only sysctl)."""
    target = Path("/proc/sys/vm/compact_memory")
    try:
        os.close(os.open(target, os.O_RDONLY))
    except PermissionError:
        link = tmp_path / name
        link.symlink_to(target)
        return link
    except OSError as exc:
        pytest.skip(f"{target}: {exc}")
    pytest.skip(f"{target} is readable here")


@contextlib.contextmanager
def chmodded(path: Path, mode: int) -> Iterator[Path]:
    old = path.stat().st_mode & 0o777
    path.chmod(mode)
    try:
        yield path
    finally:
        path.chmod(old)


def unwritable(kind: str, tmp_path: Path) -> tuple[Path, Path, contextlib.AbstractContextManager]:
    """(a folder that cannot be created or written, the path an error must name, the context to hold)."""
    if kind == "under_a_file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "out", tmp_path / "afile", contextlib.nullcontext()
    if kind == "sysfs":
        folder = denied_folder()
        return folder / "qlora-sft-test" / "out", folder, contextlib.nullcontext()
    locked = tmp_path / "locked"
    locked.mkdir()
    return locked / "out", locked, chmodded(locked, 0o555)


WRITE_KINDS = ["under_a_file", "sysfs", pytest.param("chmod", marks=as_user)]


@pytest.fixture()
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load the tokenizer or the model fails the test: the error must come first."""
    from qlora_sft import model

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model or tokenizer was loaded before the error")

    monkeypatch.setattr(model, "load_model", refuse)
    monkeypatch.setattr(model, "recipe_tokenizer", refuse)


def test_write_and_read_problems_name_the_path_and_why(tmp_path: Path):
    assert write_problem(tmp_path) is None and write_problem(tmp_path / "new" / "deeper") is None
    assert not list(tmp_path.iterdir())  # the check leaves nothing behind, and creates no folder
    (tmp_path / "afile").write_text("x")
    assert write_problem(tmp_path / "afile") == f"{tmp_path / 'afile'} is a file, not a folder"
    assert write_problem(tmp_path / "afile" / "sub") == f"{tmp_path / 'afile'} is a file, not a folder"
    assert read_problem(tmp_path / "afile") is None and read_problem(tmp_path) is None


@pytest.mark.parametrize("unnamed_files", [True, False], ids=["O_TMPFILE", "named-fallback"])
def test_a_write_check_interrupted_half_way_leaves_no_file(tmp_path: Path, monkeypatch, unnamed_files: bool):
    """Stopped between creating its probe and removing it (here: the close is interrupted), the check
    leaves nothing in the user's folder (it left `.qlora-sft-write-check-*` files before)."""
    real_open, real_close = os.open, os.close
    if not unnamed_files:  # a file system without O_TMPFILE (some network file systems)

        def no_tmpfile(path, flags, *args):
            if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", no_tmpfile)

    def interrupted(fd: int) -> None:
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_problem(tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())
    assert write_problem(tmp_path) is None


def test_write_problem_in_a_folder_root_may_not_write_either():
    folder = denied_folder()
    assert write_problem(folder / "x" / "y") == f"cannot write to {folder} (permission denied)"


@as_user
def test_write_and_read_problems_under_chmod(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "secret.jsonl").write_text("{}\n")
    with chmodded(locked, 0o555), chmodded(tmp_path / "secret.jsonl", 0o000):
        assert write_problem(locked / "new") == f"cannot write to {locked} (permission denied)"
        assert read_problem(tmp_path / "secret.jsonl") == f"cannot read {tmp_path / 'secret.jsonl'} (permission denied)"


def test_read_problem_of_a_file_root_may_not_read(tmp_path: Path):
    link = denied_file(tmp_path, "data.jsonl")
    assert read_problem(link) == f"cannot read {link} (permission denied)"
    folder = tmp_path / "folder"
    folder.mkdir()
    denied_file(folder, "part.jsonl")
    assert read_problem(folder) == f"cannot read {folder / 'part.jsonl'} (permission denied)"


def write_tiny_recipe(tiny_model: Path, tmp_path: Path, **run: object) -> Path:
    data = write_toy_data(tmp_path / "toy.jsonl", n=48)
    r = recipe_dict(tiny_model, data, tmp_path / "runs", train=SHORT)
    r["run"].update(run)
    return write_recipe(tmp_path / "r.yaml", r)


@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_train_names_an_unwritable_output_dir_before_loading(
    kind: str, tiny_model: Path, tmp_path: Path, no_model_loads: None
):
    from qlora_sft.train import train

    out, named, hold = unwritable(kind, tmp_path)
    recipe = load_recipe(write_tiny_recipe(tiny_model, tmp_path), [f"run.output_dir={out}"])
    with hold, pytest.raises(RunDirError) as err:
        train(recipe)
    message = str(err.value)
    assert f"run.output_dir {out}" in message and str(named) in message
    assert "Choose a writable run.output_dir" in message and "nothing was written" in message


@pytest.mark.parametrize("kind", ["proc", pytest.param("chmod", marks=as_user)])
def test_train_validate_and_prepare_name_an_unreadable_data_file_before_loading(
    kind: str, tiny_model: Path, tmp_path: Path, no_model_loads: None, capsys: pytest.CaptureFixture
):
    from qlora_sft.train import train

    path = write_tiny_recipe(tiny_model, tmp_path)
    if kind == "proc":
        (tmp_path / "toy.jsonl").unlink()
        denied_file(tmp_path, "toy.jsonl")
        hold: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        hold = chmodded(tmp_path / "toy.jsonl", 0o000)
    data = tmp_path / "toy.jsonl"
    with hold:
        with pytest.raises(DataError) as err:
            train(load_recipe(path))
        assert f"cannot read {data} (permission denied)" in str(err.value)
        assert "data.sources" in str(err.value)
        assert not (tmp_path / "runs").exists()  # refused before the run directory was made
        for command in ("validate", "prepare"):
            assert cli.main([command, str(path)]) == 2
            shown = capsys.readouterr().err
            assert f"qlora-sft {command}: error: data source" in shown and f"cannot read {data}" in shown
            assert "Traceback" not in shown


@pytest.mark.parametrize("kind", ["a_file", pytest.param("chmod", marks=as_user)])
def test_an_unwritable_data_cache_folder_is_named(
    kind: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """run.output_dir is writable, its .cache (shared by the runs of that output_dir) is not."""
    from qlora_sft import model
    from qlora_sft.train import train

    path = write_tiny_recipe(tiny_model, tmp_path)
    cache_root = tmp_path / "runs" / ".cache"
    cache_root.parent.mkdir()
    if kind == "a_file":
        cache_root.write_text("x")
        hold: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        cache_root.mkdir()
        hold = chmodded(cache_root, 0o555)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(model, "load_model", refuse)
    with hold:
        assert cli.main(["prepare", str(path)]) == 2
        shown = capsys.readouterr().err
        assert f"the data cache folder {cache_root}" in shown and "Traceback" not in shown
        with pytest.raises(DataError) as err:
            train(load_recipe(path))
    assert f"the data cache folder {cache_root}" in str(err.value)
    assert "run.output_dir" in str(err.value)


@as_user
def test_a_prepared_cache_training_cannot_write_beside_is_named_before_loading(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A cache another user prepared: the Trainer would write Arrow files beside its splits after the
    model is loaded."""
    from qlora_sft import model
    from qlora_sft.train import train

    path = write_tiny_recipe(tiny_model, tmp_path)
    assert cli.main(["prepare", str(path)]) == 0
    (folder,) = [p for p in (tmp_path / "runs" / ".cache").glob("data-*") if p.is_dir()]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(model, "load_model", refuse)
    with chmodded(folder / "train", 0o555), pytest.raises(DataError) as err:
        train(load_recipe(path))
    assert f"cannot write to {folder / 'train'} (permission denied)" in str(err.value)


@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_plot_names_an_unwritable_out(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    out, named, hold = unwritable(kind, tmp_path)
    with hold:
        assert cli.main(["plot", str(run), "--out", str(out / "loss.png")]) == 2
    shown = capsys.readouterr().err
    assert f"cannot write {out / 'loss.png'}" in shown and str(named) in shown and "--out" in shown


@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_submit_names_an_unwritable_output_dir_before_queueing(kind: str, tiny_model: Path, tmp_path: Path):
    from qlora_sft.submit import submit

    out, named, hold = unwritable(kind, tmp_path)
    out = named / "out"  # submit checks an output_dir this host has, or whose parent it has (below)
    path = write_tiny_recipe(tiny_model, tmp_path)
    with hold, pytest.raises(UserError) as err:
        submit(path, [f"run.output_dir={out}"], cluster="local")
    assert f"run.output_dir {out}" in str(err.value) and str(named) in str(err.value)


def test_submit_leaves_an_output_dir_this_host_does_not_mount_to_the_job(tiny_model: Path, tmp_path: Path, caplog):
    """A login node need not mount what the compute nodes do (a scratch file system): an output_dir
    of which neither it nor its parent is on this host is not refused (its nearest folder here, e.g.
    /, says nothing of it); a warning says it is not checked. submitit's local executor stands in
    for the cluster: the job runs here, and stops at once naming the folder it cannot write."""
    import logging

    from qlora_sft.submit import submit

    elsewhere = denied_folder() / "qlora-sft-scratch" / "runs"  # the nearest folder here refuses files
    path = write_tiny_recipe(tiny_model, tmp_path)
    logger = logging.getLogger("qlora_sft")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="qlora_sft"):
            job = submit(path, [f"run.output_dir={elsewhere}"], cluster="local", folder=str(tmp_path / "jobs"))
    finally:
        logger.removeHandler(caplog.handler)
    assert f"run.output_dir {elsewhere} is not on this host" in caplog.text
    with pytest.raises(Exception) as failed:  # the job itself stops at once, naming the folder
        job.result()
    assert f"run.output_dir {elsewhere}" in str(failed.value), str(failed.value)[-2000:]


@pytest.fixture(scope="module")
def finished_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qlora_sft.train import train

    root = tmp_path_factory.mktemp("finished")
    recipe = load_recipe(write_tiny_recipe(tiny_model, root))
    return train(recipe).run_dir


@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_export_names_an_unwritable_out_before_merging(
    kind: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out, named, hold = unwritable(kind, tmp_path)
    with hold:
        assert cli.main(["export", str(finished_run), "--out", str(out)]) == 2
    shown = capsys.readouterr().err
    assert f"qlora-sft export: error: export: cannot write the merged model to {out}" in shown
    assert str(named) in shown and "--out" in shown and "Traceback" not in shown


def test_atomic_write_leaves_another_writers_temporary_alone(tmp_path: Path):
    """Two hosts sharing a folder (a memo, a run record) can run writers with the same pid: this
    write neither truncates nor renames the other's temporary file (one name per pid did both)."""
    target = tmp_path / "file-digests.json"
    pid, host = os.getpid(), os.uname().nodename
    others = [tmp_path / f".{target.name}.tmp-{pid}", tmp_path / f".{target.name}.tmp-{host}-{pid}"]
    for other in others:
        other.write_text("another host's write, half done")
    atomic_write_text(target, "mine")
    assert target.read_text() == "mine"
    assert [o.read_text() for o in others] == ["another host's write, half done"] * 2
    assert sorted(tmp_path.iterdir()) == sorted([target, *others])
