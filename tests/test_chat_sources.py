"""`qlora-sft chat` on what is not there: a base model that moved, an adapter folder or run directory
that does not exist, a run with nothing trained yet. Each is an error naming the path and the fix,
with the same base-model checks as `export` (before any model is loaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import recipe_dict, write_recipe, write_toy_data

from qlora_sft import cli

SHORT = {"max_steps": 2, "save_steps": 1, "logging_steps": 1}


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (final/ and checkpoints 1 and 2) whose base model is a copy that tests may move."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    root = tmp_path_factory.mktemp("chat")
    base = root / "base"
    shutil.copytree(tiny_model, base)
    data = write_toy_data(root / "toy.jsonl", n=48)
    path = write_recipe(root / "r.yaml", recipe_dict(base, data, root / "runs", train=SHORT))
    return train(load_recipe(path)).run_dir


def chat(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = cli.main(["chat", *args, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    return code, capsys.readouterr().err


@pytest.fixture()
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_sft import model

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base model was loaded before the error")

    monkeypatch.setattr(model, "load_base", refuse)


def moved_base(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run whose recorded base model is gone (moved to the returned folder)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    gone = tmp_path / "was-here"
    moved = tmp_path / "moved-base"
    shutil.copytree(recipe["model"]["name_or_path"], moved)
    recipe["model"]["name_or_path"] = str(gone)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return copy, moved


@pytest.mark.parametrize("which", ["run", "final", "checkpoint-1"])
def test_a_base_model_that_moved_is_named_with_the_flag_that_fixes_it(
    which: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_model_loads: None
):
    copy, _ = moved_base(run, tmp_path)
    target = copy if which == "run" else copy / which
    code, err = chat(capsys, str(target))
    assert code == 2 and "Traceback" not in err
    assert f"qlora-sft chat: error: chat: base model '{tmp_path / 'was-here'}' not found" in err
    assert f"model.name_or_path in {copy / 'recipe.yaml'}" in err and "--base-model PATH" in err


def test_base_model_flag_finds_a_moved_base(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    copy, moved = moved_base(run, tmp_path)
    code, err = chat(capsys, str(copy), "--base-model", str(moved))
    assert code == 0, err


def test_chat_refuses_another_base_like_export(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_model_loads: None
):
    """Another model in the recorded folder: the adapter's manifest tells (export's check)."""
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    code, err = chat(capsys, str(run), "--base-model", str(other))
    assert code == 2 and f"chat: {other} is not the base model" in err and "--allow-other-base" in err


def test_an_adapter_folder_or_run_that_does_not_exist_is_named(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_model_loads: None
):
    code, err = chat(capsys, str(tmp_path / "nothere"))
    assert code == 2 and f"chat: {tmp_path / 'nothere'} does not exist" in err
    assert "merged model folder" in err and "adapter folder" in err and "run directory" in err


def test_a_run_with_nothing_trained_yet_is_named(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_model_loads: None
):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "recipe.yaml", empty / "recipe.yaml")
    code, err = chat(capsys, str(empty))
    assert code == 2 and "Traceback" not in err
    assert f"chat: {empty} has no merged/ model, no complete final/ adapter and no complete checkpoint" in err
    assert "neither a model folder nor an adapter" not in err


def test_a_run_without_final_chats_with_its_newest_checkpoint(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    code, err = chat(capsys, str(copy))
    assert code == 0, err
    assert f"using its newest complete checkpoint {copy / 'checkpoint-2'}" in err


def test_a_folder_that_is_neither_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, no_model_loads: None):
    (tmp_path / "notes").mkdir()
    code, err = chat(capsys, str(tmp_path / "notes"))
    assert code == 2 and f"chat: {tmp_path / 'notes'} is neither a model folder (config.json)" in err


def test_a_hub_base_is_fetched_at_the_revision_the_run_trained_on(tmp_path: Path, monkeypatch):
    """A run whose recipe pins model.revision: `export` and `chat` read (and check, and merge onto) the
    base at that revision, not the hub's newest; --base-model names another model, at its default
    revision (found by a hostile test)."""
    import huggingface_hub

    from qlora_sft.export import Source, base_model_files
    from qlora_sft.recipe import build_recipe

    fetched: list[tuple[str, str | None]] = []
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")

    def snapshot_download(repo_id: str, revision: str | None = None, **kwargs: object) -> str:
        fetched.append((repo_id, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    recipe = build_recipe(
        {"model": {"name_or_path": "org/base", "revision": "0123abc"}, "data": {"sources": [{"path": "a.jsonl"}]}}
    )
    adapter = tmp_path / "final"
    adapter.mkdir()
    source = Source(adapter, tmp_path, "org/base", recipe, None, {}, f"model.name_or_path in {tmp_path}/recipe.yaml")
    assert base_model_files(source, command="chat")[0] == folder
    other = Source(adapter, tmp_path, "org/other", recipe, None, {}, "--base-model")
    base_model_files(other)
    assert fetched == [("org/base", "0123abc"), ("org/other", None)]


def test_a_run_with_merged_chats_with_it_and_names_an_older_export(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """`chat runs/X` after `export runs/X` uses runs/X/merged (it failed: 'merged holds no adapter');
    a merged/ exported from an earlier checkpoint than the run's final/ is used, and named as such."""

    from qlora_sft.export import export

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export(copy, verify=False)
    code, err = chat(capsys, str(copy))
    assert code == 0, err
    assert "exported from" not in err
    export(copy / "checkpoint-1", overwrite=True, verify=False)  # the default --out: the run's merged/
    code, err = chat(capsys, str(copy))
    assert code == 0, err
    assert f"chat: {copy / 'merged'} was exported from {copy / 'checkpoint-1'} (step 1)" in err
    assert f"the run's newest adapter is {copy / 'final'} (step 2)" in err


def test_a_merged_export_older_than_a_newer_checkpoint_names_that_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """A run exported at the end (merged/ of final/, step 2), then relaunched to train longer and
    stopped at checkpoint-3 (final/ stays of step 2 until the longer training ends): `chat RUN` chatted
    with merged/ without a word about the newer checkpoint. It is named, and what export says of
    final/ ("using final/") is not said of a chat that uses merged/."""

    from helpers import copy_checkpoint_as

    from qlora_sft.export import export

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export(copy, verify=False)
    newer = copy_checkpoint_as(copy, "checkpoint-2", 3)
    code, err = chat(capsys, str(copy))
    assert code == 0, err
    assert f"chat: {copy / 'merged'} was exported from {copy / 'final'} (step 2)" in err
    assert f"the run's newest adapter is {newer} (step 3)" in err and f"give {newer} to chat" in err
    assert "using final/" not in err


def test_a_damaged_merged_model_is_named_before_it_loads(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """A merged/ whose weights were cut short (a disk error, a partial copy): chat ended in a raw
    SafetensorError traceback naming no file."""

    from qlora_sft.export import export

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export(copy, verify=False)
    weights = copy / "merged" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    code, err = chat(capsys, str(copy))
    assert code == 2 and "Traceback" not in err, err
    assert f"chat: {weights} has {size // 2} bytes; the export wrote {size}" in err
    assert f"qlora-sft export {copy} --overwrite" in err


def test_a_merged_model_changed_in_place_to_the_same_size_is_named_before_it_loads(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """A merged/ shard whose tensor bytes changed in place, same size and header intact (a bad disk
    block, a copy tool that wrote another file's bytes): chat loaded it and answered from weights the
    export never wrote. The export records each file's digest; chat checks them before loading."""
    import json

    from qlora_sft.export import EXPORT_MARKER, export

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export(copy, verify=False)
    recorded = json.loads((copy / "merged" / EXPORT_MARKER).read_text())["files"]
    assert recorded["model.safetensors"]["digest"].startswith("xxh3_128:")
    weights = copy / "merged" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-64:] = bytes(255 - b for b in blob[-64:])  # the last tensor's bytes, past the header
    weights.write_bytes(bytes(blob))
    code, err = chat(capsys, str(copy))
    assert code == 2 and "Traceback" not in err, err
    assert f"chat: {weights} does not hold the bytes the export wrote (its digest differs" in err
    assert f"qlora-sft export {copy} --overwrite" in err


def test_an_export_recorded_with_sizes_only_is_still_checked_by_size(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """Exports written before the digests (2026-12-02) recorded `{name: size}`: still read, by size."""
    import json

    from qlora_sft.export import EXPORT_MARKER, export

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export(copy, verify=False)
    marker_file = copy / "merged" / EXPORT_MARKER
    marker = json.loads(marker_file.read_text())
    marker["files"] = {name: entry["size"] for name, entry in marker["files"].items()}
    marker_file.write_text(json.dumps(marker))
    code, err = chat(capsys, str(copy))
    assert code == 0, err
    weights = copy / "merged" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    code, err = chat(capsys, str(copy))
    assert code == 2 and f"chat: {weights} has {size // 2} bytes; the export wrote {size}" in err, err


def test_chat_reads_an_unchanged_export_for_its_digests_once(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Checking the export's digests reads every file: for a 70B export, 140 GB before the load
    reads them again, on every chat. The digests chat has checked are kept (by path, size, times and
    inode, in the user's cache folder): an unchanged export is not read for them again, a changed one is."""
    from qlora_sft import export as export_module

    monkeypatch.setenv("QLORA_SFT_CACHE", str(tmp_path / "cache" / "qlora-sft"))
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export_module.export(copy, verify=False)
    read: list[str] = []
    real = export_module.file_digest
    monkeypatch.setattr(export_module, "file_digest", lambda p: read.append(Path(p).name) or real(p))
    import time

    time.sleep(2.1)  # a file written in the last 2 s is not kept (see DigestMemo: a second write could hide)
    assert chat(capsys, str(copy))[0] == 0
    assert "model.safetensors" in read
    assert (tmp_path / "cache" / "qlora-sft" / "export-digests.json").is_file()
    read.clear()
    assert chat(capsys, str(copy))[0] == 0
    assert read == []
