"""`export --out`: what it may never replace (a file, another run's checkpoints or final/, an alias of
the run), what a full disk leaves behind, and which adapter a run directory with a damaged final/
exports. Each refusal comes before any merge work and names the path and the fix."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import cli_with_file_limit, recipe_dict, write_recipe, write_toy_data

from qlora_sft import checkpoint
from qlora_sft.errors import UserError
from qlora_sft.export import export

SHORT = {"max_steps": 2, "save_steps": 1, "logging_steps": 1}


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: checkpoint-1, checkpoint-2 and final/ (step 2)."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    root = tmp_path_factory.mktemp("guards")
    data = write_toy_data(root / "toy.jsonl", n=48)
    path = write_recipe(root / "r.yaml", recipe_dict(tiny_model, data, root / "runs", train=SHORT))
    return train(load_recipe(path)).run_dir


@pytest.fixture(scope="module")
def good_export(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete earlier export, copied by the tests that export over it."""
    return export(run, tmp_path_factory.mktemp("good") / "merged", verify=False).out


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture()
def no_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_sft import export as export_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the merge started before the refusal")

    monkeypatch.setattr(export_module, "merge", refuse)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_out_that_is_a_file_is_refused_naming_it(run: Path, tmp_path: Path, overwrite: bool, no_merge: None):
    for target in (run / "README.md", tmp_path / "toy.jsonl"):
        if not target.exists():
            target.write_text('{"instruction": "a", "output": "b"}\n')
        before = target.read_bytes()
        with pytest.raises(UserError, match=rf"--out {target} is a file, not a folder"):
            export(run, target, overwrite=overwrite, verify=False)
        assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.jsonl"]


@pytest.mark.parametrize("entry", ["final", "checkpoint-1", "logs"])
def test_overwrite_never_replaces_a_part_of_another_run(run: Path, tmp_path: Path, entry: str, no_merge: None):
    other = tmp_path / "runs" / "other"
    shutil.copytree(run, other)
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(UserError, match=rf"--out {other / entry} is inside {other / entry}, which belongs to the run"):
        export(run, other / entry, overwrite=True, verify=False)
    assert sorted(p.name for p in other.iterdir()) == before


@pytest.mark.parametrize("below", ["", "v1"])
def test_an_out_in_another_runs_merged_is_refused(run: Path, tmp_path: Path, below: str, no_merge: None):
    """`--out runs/other/merged` (a tab completion away from the run's own): the merge of this run was
    written there without a word, and `qlora-sft chat runs/other` then chatted with it as the other
    run's export (its step was the same, so not even the older-export note came). A run's merged/ is
    the export of that run only; the run exported writes its own (the default) as before."""
    other = tmp_path / "runs" / "other"
    shutil.copytree(run, other)
    before = sorted(p.name for p in other.iterdir())
    out = other / "merged" / below if below else other / "merged"
    with pytest.raises(UserError, match=rf"--out {out} is inside {other / 'merged'}, the export of the run {other}"):
        export(run, out, verify=False)
    assert sorted(p.name for p in other.iterdir()) == before
    # reached through a symlink to the other run
    (tmp_path / "link").symlink_to(other)
    with pytest.raises(UserError, match=r"the export of the run"):
        export(run, tmp_path / "link" / "merged", verify=False)


def test_a_final_older_than_the_runs_newest_checkpoint_is_named(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A finished run relaunched to train longer (train.max_steps raised) keeps its old final/ until it
    ends; stopped (or still training) past it, `export RUN` and `chat RUN` took that final/ of step 2
    with no word about the newer complete checkpoint-3. final/ is still what they use (it is the end of
    the run's last finished training), and the newer checkpoint is named with its step."""
    from helpers import copy_checkpoint_as

    from qlora_sft.export import resolve_source

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newer = copy_checkpoint_as(copy, "checkpoint-2", 3)
    for command in ("export", "chat"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qlora_sft"):
            source = resolve_source(copy, command=command)
        assert source.adapter_dir == copy / "final" and source.step == 2
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"{copy / 'final'} is of step 2" in said and f"{newer} (step 3)" in said, said
        assert f"qlora-sft {command} {newer}" in said
    # a final/ whose manifest records no step (written by hand, or by another tool) is of no known step:
    # no checkpoint is named newer than it
    manifest = copy / "final" / checkpoint.MANIFEST
    recorded = json.loads(manifest.read_text())
    del recorded["step"]
    manifest.write_text(json.dumps(recorded))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert resolve_source(copy).adapter_dir == copy / "final"
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    # the newest checkpoint at final/'s step (every finished run has one) says nothing
    shutil.rmtree(newer)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        resolve_source(copy)
    assert not caplog.records


def run_export_cli(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    """`qlora-sft export ARGS` in a subprocess, its files no larger than `fsize` (a full disk)."""
    return cli_with_file_limit("export", *args, fsize=fsize)


def test_a_file_size_limit_mid_export_keeps_the_old_export_and_names_the_path(
    run: Path, good_export: Path, tmp_path: Path
):
    out = tmp_path / "merged"
    shutil.copytree(good_export, out)
    before = digests(out)
    res = run_export_cli(str(run), "--out", str(out), "--overwrite", "--no-verify", fsize=64 << 10)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert f"export: writing the merged model to {out.parent / (out.name + '.tmp-')}" in res.stderr
    assert "file too large" in res.stderr and f"{out} (an earlier export) was left as it was" in res.stderr
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("stage", ["write_shards", "copy_model_files", "write_model_card"])
def test_a_full_disk_keeps_the_old_export_and_names_the_file_system(
    run: Path, good_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
):
    """ENOSPC as each writer reports it: safetensors (SafetensorError), tokenizers (a bare Exception),
    Python (OSError)."""
    import errno

    from safetensors import SafetensorError

    from qlora_sft import export as export_module

    raised = {
        "write_shards": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "copy_model_files": Exception("No space left on device (os error 28)"),
        "write_model_card": OSError(errno.ENOSPC, "No space left on device"),
    }[stage]
    original = getattr(export_module, stage)

    def full(*args: object, **kwargs: object) -> object:
        if stage == "write_shards":
            original(*args, **kwargs)
        raise raised

    monkeypatch.setattr(export_module, stage, full)
    out = tmp_path / "merged"
    shutil.copytree(good_export, out)
    before = digests(out)
    with pytest.raises(UserError) as exc:
        export(run, out, overwrite=True, verify=False)
    message = str(exc.value)
    assert f"no space left on the file system of {tmp_path}" in message, message
    assert f"{out} (an earlier export) was left as it was" in message
    assert digests(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def exported_instead(run: Path, used: str, skipped: str, why: str, caplog: pytest.LogCaptureFixture) -> None:
    """resolve_source(run) takes run/`used` and warns that run/`skipped` is not a complete adapter (`why`)."""
    from qlora_sft.export import resolve_source

    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        source = resolve_source(run)
    assert source.adapter_dir == run / used
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(
        f"{run / skipped} is not a complete adapter {why}" in m
        and f"using the newest complete checkpoint {run / used}" in m
        for m in warned
    ), warned


def test_a_damaged_final_is_named_when_a_checkpoint_is_exported_instead(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    adapter = copy / "final" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-16])  # cut short: its size no longer matches the manifest
    exported_instead(copy, "checkpoint-2", "final", "(file adapter_model.safetensors has", caplog)


NOT_UTF8 = os.fsdecode(b"r\xe9n-\xff")  # a Latin-1 name: bytes that are not UTF-8


def test_an_out_whose_name_is_not_utf8_is_refused_before_the_merge(run: Path, tmp_path: Path, no_merge: None):
    out = tmp_path / NOT_UTF8
    with pytest.raises(UserError, match=r"--out .*r\\xe9n-\\xff has bytes in its name that are not UTF-8"):
        export(run, out, verify=False)
    assert not list(tmp_path.iterdir())


def test_a_run_under_a_name_that_is_not_utf8_is_named_as_such_not_as_corrupt(run: Path, tmp_path: Path):
    """safetensors cannot open such a path: the error said the adapter 'cannot be read' and to give
    another checkpoint, which fails the same way."""
    from qlora_sft.cli import main

    copy = tmp_path / NOT_UTF8
    shutil.copytree(run, copy)
    with pytest.raises(UserError) as exc:
        export(copy, tmp_path / "merged", verify=False)
    message = str(exc.value)
    assert "has bytes in its name that are not UTF-8" in message and "Give another checkpoint" not in message
    assert main(["chat", str(copy), "--prompt", "hi", "--device", "cpu"]) == 2


def test_a_base_missing_adapter_layers_is_refused_before_the_merge(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A base with fewer layers (--allow-other-base, or an adapter folder without a manifest): the
    missing layers were found only after every shard had been merged and written."""
    from tiny import build_tiny_model

    from qlora_sft import export as export_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the merge started before the refusal")

    monkeypatch.setattr(export_module, "merged_tensors", refuse)
    shallow = build_tiny_model(tmp_path / "one-layer", layers=1)
    with pytest.raises(UserError, match=r"the base model has no weights for adapter layers \['model\.layers\.1\."):
        export(run, tmp_path / "merged", base_model=str(shallow), other_base=True, verify=False)
    narrow = build_tiny_model(tmp_path / "narrow", hidden=32)
    with pytest.raises(UserError, match=r"adapter does not fit the base model: .* in the base but the LoRA delta is"):
        export(run, tmp_path / "merged", base_model=str(narrow), other_base=True, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow", "one-layer"]


def test_an_earlier_export_left_aside_by_a_killed_overwrite_is_named(
    run: Path, good_export: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """`export --overwrite` moves the earlier export to `<out>.old-<time>`, renames the new one into
    place, then removes the old one: killed in between, a whole model stayed there, never named."""
    out = tmp_path / "merged"
    left = tmp_path / "merged.old-20261201-120000"
    shutil.copytree(good_export, left)
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        export(run, out, verify=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"{left} is an earlier export that an interrupted --overwrite moved aside" in m for m in warned), warned
    assert left.is_dir() and (out / "config.json").is_file()


def test_an_out_that_is_a_symlink_is_refused_naming_its_target(
    run: Path, good_export: Path, tmp_path: Path, no_merge: None
):
    """A link to an earlier export was replaced by a new folder (the export it pointed to unchanged, the
    link moved aside); a link to nothing failed after the merge with a NotADirectoryError traceback."""
    v1 = tmp_path / "v1"
    shutil.copytree(good_export, v1)
    before = digests(v1)
    current, dangling = tmp_path / "current", tmp_path / "dangling"
    current.symlink_to(v1)
    dangling.symlink_to(tmp_path / "nowhere")
    for link, target in ((current, v1), (dangling, tmp_path / "nowhere")):
        with pytest.raises(UserError, match=rf"--out {link} is a symbolic link \(to {target}\)"):
            export(run, link, overwrite=True, verify=False)
        assert link.is_symlink() and Path(os.readlink(link)) == target
    assert digests(v1) == before and sorted(p.name for p in tmp_path.iterdir()) == ["current", "dangling", "v1"]


def test_a_newer_checkpoint_without_its_marker_is_named_when_an_older_one_is_exported(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A run without final/ exports its newest complete checkpoint; a newer one that is incomplete
    (no COMPLETE marker) was passed over with no word (resume names such checkpoints)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    (copy / "checkpoint-2" / "COMPLETE").unlink()
    exported_instead(copy, "checkpoint-1", "checkpoint-2", "(no COMPLETE marker", caplog)


def test_a_run_still_training_is_named_when_its_checkpoint_is_exported(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """export (and chat) of a run whose lock a live job holds says the run is still training and that
    the checkpoint used is not what it will end with; a lock left by a job that is gone says nothing."""
    from qlora_sft.checkpoint import RunLock
    from qlora_sft.export import resolve_source

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    lock = RunLock(copy)
    lock.acquire()  # held as a training job holds it (here by this process)
    try:
        assert RunLock.live_holder(copy)["pid"] == os.getpid()
        with caplog.at_level(logging.WARNING, logger="qlora_sft"):
            assert resolve_source(copy).adapter_dir == copy / "checkpoint-2"
    finally:
        lock.release()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"{copy} is still training (" in m and f"pid {os.getpid()}" in m for m in warned), warned
    (copy / "LOCK").write_text('{"host": "elsewhere", "pid": 1}')  # left behind: no flock held
    assert RunLock.live_holder(copy) is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        resolve_source(copy)
    assert not [r for r in caplog.records if "still training" in r.getMessage()]


def test_a_users_own_recipe_yaml_above_out_does_not_make_a_run_of_the_folder(run: Path, tmp_path: Path):
    """A project folder holding the user's own recipe, saved as `recipe.yaml`, is not a run: a run's
    recipe.yaml is the resolved one a launch wrote, with its `launch:` section. `--out final` there was
    refused as "inside ... final, which belongs to the run <project>"."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "recipe.yaml").write_text((run / "recipe.yaml").read_text().split("\nlaunch:")[0] + "\n")
    out = export(run, project / "final", verify=False).out
    assert out == project / "final" and (out / "config.json").is_file()
    # a run's own recipe.yaml still marks its folder
    other = tmp_path / "runs" / "other"
    shutil.copytree(run, other)
    with pytest.raises(UserError, match=r"is inside .*final, which belongs to the run"):
        export(run, other / "final" / "merged", verify=False)


def test_a_failed_export_leaves_no_folders_it_made_for_out(run: Path, tmp_path: Path):
    """The folders above a new --out that the export made (exports/v1/) were left behind, empty, by an
    export that failed (here the disk fills while the shards are written)."""
    (tmp_path / "keep").mkdir()
    out = tmp_path / "exports" / "v1" / "merged"
    res = run_export_cli(str(run), "--out", str(out), "--no-verify", fsize=64 << 10)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "file too large" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


@pytest.mark.parametrize("below", ["", "merged"])
def test_an_out_through_a_symlink_loop_is_named_not_a_traceback(run: Path, tmp_path: Path, below: str, no_merge: None):
    """`--out loop` (or `loop/merged`), where the links of `loop` lead back to themselves, raised
    pathlib's `RuntimeError: Symlink loop` traceback while --out was checked."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = tmp_path / "a" / below if below else tmp_path / "a"
    with pytest.raises(UserError, match=rf"--out {out} goes through a symbolic link loop \(.*`ls -l {tmp_path / 'a'}`"):
        export(run, out, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_negative_shard_size_says_it_must_be_above_zero():
    """`--shard-size=-5GB` was refused as not a size at all ("use e.g. 5GB"): it is one, below 0."""
    from qlora_sft.export import parse_size

    with pytest.raises(UserError, match=r"--shard-size '-5GB': a shard's size is above 0 \(e\.g\. 5GB\)"):
        parse_size("-5GB")
    assert parse_size("5GB") == 5 * 10**9


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("step", float("inf"), "step"),
        ("step", "2", "step"),
        ("step", -2, "step"),
        ("step", 2.5, "step"),
        ("step", True, "step"),
        ("num_train_epochs", "three", "num_train_epochs"),
        ("num_train_epochs", float("nan"), "num_train_epochs"),
        ("max_steps_arg", "x", "max_steps_arg"),
        ("files", {"../recipe.yaml": 1}, "../recipe.yaml"),
        ("files", {"/etc/hostname": 1}, "/etc/hostname"),
        ("files", {"adapter_model.safetensors": {"digest": "x"}}, "adapter_model.safetensors"),
    ],
    ids=[
        "inf",
        "text",
        "negative",
        "fraction",
        "bool",
        "epochs-text",
        "epochs-nan",
        "max-steps-text",
        "file-outside",
        "file-absolute",
        "file-no-size",
    ],
)
def test_a_final_whose_manifest_holds_a_wrong_value_is_not_intact_and_nothing_crashes(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str, value: object, said: str
):
    """A final/ manifest edited by hand or written by another tool (a copied run directory), with a
    value of the wrong kind (`"step": Infinity` is valid JSON to Python), crashed export and chat
    (OverflowError from int(inf)), the relaunch of a finished run (a TypeError comparing "2" with
    max_steps) and the end of training that replaced it. Such a final/ is not intact: export takes the
    run's newest complete checkpoint and says why, naming the manifest's key, and a relaunch makes
    final/ again (keeping the damaged one aside); nothing is read from outside the checkpoint."""
    import dataclasses

    from qlora_sft.export import resolve_source
    from qlora_sft.recipe import read_run_recipe

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    manifest = copy / "final" / checkpoint.MANIFEST
    recorded = json.loads(manifest.read_text())
    if key == "files":
        recorded["files"] = {**recorded["files"], **value}
    else:
        recorded[key] = value
    manifest.write_text(json.dumps(recorded))
    info = checkpoint.inspect_checkpoint(copy / "final", verify=True)
    assert not info.complete and said in info.reason and checkpoint.MANIFEST in info.reason, info.reason
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        source = resolve_source(copy)
    assert source.adapter_dir == copy / "checkpoint-2", source
    assert said in " ".join(r.getMessage() for r in caplog.records)
    recipe = read_run_recipe(copy)
    recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, output_dir=str(tmp_path), name="run"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert checkpoint.finished_run(recipe) is None
    assert "is not intact" in " ".join(r.getMessage() for r in caplog.records)
