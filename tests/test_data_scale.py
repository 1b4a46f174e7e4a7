"""Data preparation at scale: the Arrow pipeline with worker processes, `qlora-sft prepare`, the
cache other ranks wait on, and streaming; all checked against the tokens, labels and packed rows
the in-memory pipeline produced (pinned in tests/data/pinned_tokens.json)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import DATA

PINNED = DATA / "pinned_tokens.json"
TEMPLATES = None  # TRL's chat templates folder, found on first use


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def write_chat_rows(path: Path, n: int = 240) -> Path:
    """English-like multi-turn ShareGPT rows (the data benchmark's generator), plus a tool call."""
    from bench.workload import text_chat_rows

    with path.open("w") as f:
        for row in text_chat_rows(n, seed=7):
            f.write(json.dumps(row) + "\n")
    return path


def cases(tmp: Path) -> dict[str, tuple[Any, ...]]:
    """name -> (DataConfig, template name or None)."""
    from qlora_sft.recipe import DataConfig, DataSource

    chats = write_chat_rows(tmp / "chats.jsonl")
    every = tuple(
        DataSource(path=str(DATA / n))
        for n in ("alpaca.jsonl", "dolly.jsonl", "sharegpt.json", "messages.jsonl", "prompt_completion.jsonl")
    )
    return {
        "formats_weighted": (
            DataConfig(
                sources=(*every, DataSource(path=str(DATA / "text.jsonl"), weight=2.0), DataSource(path=str(chats))),
                eval_fraction=0.2,
                max_length=384,
                on_bad_row="skip",
            ),
            None,
        ),
        "all_tokens": (DataConfig(sources=(DataSource(path=str(chats)),), assistant_only_loss=False), None),
        "ratio_skip": (
            DataConfig(
                sources=(
                    DataSource(path=str(chats), ratio=0.75),
                    DataSource(path=str(DATA / "bad_rows.jsonl"), format="alpaca", ratio=0.25),
                ),
                on_bad_row="skip",
                max_length=48,
                eval_fraction=0.1,
            ),
            None,
        ),
        "eval_sources": (
            DataConfig(
                sources=(DataSource(path=str(chats), weight=0.5),),
                eval_sources=(DataSource(path=str(DATA / "sharegpt.json")),),
                eval_fraction=0.0,
            ),
            None,
        ),
        "qwen3_marked": (DataConfig(sources=(DataSource(path=str(chats)),), max_length=2048), "qwen3.jinja"),
        "error_no_loss": (DataConfig(sources=(DataSource(path=str(chats)),), max_length=384), None),
        "error_bad_row": (DataConfig(sources=(DataSource(path=str(DATA / "bad_rows.jsonl")),)), None),
    }


def tokenizer_for(template: str | None) -> Any:
    import trl
    from tiny import build_tokenizer

    from qlora_sft.model import ensure_pad_token

    tok = build_tokenizer()
    ensure_pad_token(tok)
    if template:
        tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / template).read_text()
    return tok


def case_digests(tmp: Path, num_proc: int | None = None, **build: Any) -> dict[str, dict[str, str]]:
    """Digests of what `build_data` makes for every case: train and eval tokens and labels, the
    report, and the rows TRL's best-fit-decreasing packing makes of the train split."""
    from trl.data_utils import pack_dataset

    from qlora_sft import data

    out: dict[str, dict[str, str]] = {}
    for name, (cfg, template) in cases(tmp).items():
        if num_proc is not None:
            cfg = dataclasses.replace(cfg, num_proc=num_proc)
        try:
            prepared = data.build_data(cfg, tokenizer_for(template), 3, **build)
        except data.DataError as exc:
            out[name] = {"error": str(exc).replace(str(tmp), "<tmp>").replace(str(DATA), "<data>")}
            continue
        packed = pack_dataset(prepared.train.select_columns(["input_ids", "labels"]), cfg.max_length, "bfd")
        report = prepared.report.to_dict()
        assert report.pop("streamed_sample", 0) == 0  # a field added after the pin; zero when not streaming
        # fields added after the pin (data.sources[].max_rows and the end-token count of conversations)
        assert 0 <= report.pop("chat_rows") <= report["train_rows"]
        assert all(src.pop("limit") == "" for src in report["sources"])
        # rows that train no token with nothing cut (the template marks none), told from truncation's: none here
        assert all((src.pop("untrained"), src.pop("untrained_rows")) == (0, []) for src in report["sources"])
        report = json.loads(json.dumps(report).replace(str(tmp), "<tmp>").replace(str(DATA), "<data>"))
        out[name] = {
            "train": digest(prepared.train[:]),
            "eval": digest(prepared.eval[:] if prepared.eval is not None else None),
            "report": digest(report),
            "packed": digest(packed[:]),
            "rows": f"{len(prepared.train)} train, {len(packed)} packed",
        }
    return out


if __name__ == "__main__":  # pin today's output: python tests/test_data_scale.py
    import sys
    import tempfile

    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    with tempfile.TemporaryDirectory() as d:
        PINNED.write_text(json.dumps(case_digests(Path(d)), indent=2) + "\n")
    print(PINNED.read_text())


def test_arrow_pipeline_matches_the_pinned_output(tmp_path: Path):
    """One process: tokens, labels, reports, packed rows and error messages as pinned."""
    assert case_digests(tmp_path, num_proc=1) == json.loads(PINNED.read_text())


def test_worker_processes_change_nothing(tmp_path: Path, monkeypatch):
    """Two worker processes (each source split between them) make the same bytes."""
    from qlora_sft.data import encode

    monkeypatch.setattr(encode, "ROWS_PER_PROCESS", 50)
    assert case_digests(tmp_path, num_proc=2) == json.loads(PINNED.read_text())


def test_memory_does_not_hold_the_rows(tmp_path: Path):
    """The prepared splits are memory-mapped Arrow files, not Python lists: the Python heap at the
    end of a build stays small, and its peak (one batch in flight) does not grow with the rows."""
    import tracemalloc

    from qlora_sft import data
    from qlora_sft.recipe import DataConfig, DataSource

    tok = tokenizer_for(None)
    # first: the imports and caches a build loads once
    few = write_chat_rows(tmp_path / "few.jsonl", n=20)
    data.build_data(DataConfig(sources=(DataSource(path=str(few)),), num_proc=1), tok, 0, workdir=tmp_path / "w")
    measured = {}
    for n in (600, 1800):
        chats = write_chat_rows(tmp_path / f"chats{n}.jsonl", n=n)
        cfg = DataConfig(sources=(DataSource(path=str(chats)),), num_proc=1, max_length=2048)
        tracemalloc.start()
        prepared = data.build_data(cfg, tok, 0, workdir=tmp_path / f"w{n}")
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        tokens = prepared.report.tokens_total
        assert prepared.report.train_rows > 0.9 * n and prepared.train.cache_files  # read from Arrow files
        # as Python lists, ids and labels alone would take > 2 x 8 bytes x tokens (22 MB at 1,800 rows)
        assert current < 8 * tokens / 4, (n, current, tokens)
        measured[n] = (peak, tokens)
    (peak_small, tokens_small), (peak_big, tokens_big) = measured[600], measured[1800]
    assert tokens_big > 2.5 * tokens_small
    assert peak_big < 1.25 * peak_small, measured  # three times the rows, about the same peak


def prepare_recipe(tiny_model: Path, data_path: Path, tmp_path: Path, **data_keys: Any) -> Path:
    from helpers import recipe_dict, write_recipe

    r = recipe_dict(
        tiny_model, data_path, tmp_path / "runs", train={"max_steps": 4, "save_steps": 2, "logging_steps": 1}
    )
    r["data"].update(data_keys)
    r["data"] = {k: v for k, v in r["data"].items() if v is not None}  # None: leave the key out
    return write_recipe(tmp_path / "r.yaml", r)


def test_prepare_once_then_train_finds_it(tiny_model: Path, toy_data: Path, tmp_path: Path):
    import subprocess
    import sys

    from helpers import cpu_env

    recipe = prepare_recipe(tiny_model, toy_data, tmp_path)
    cli = [sys.executable, "-m", "qlora_sft"]
    first = subprocess.run([*cli, "prepare", str(recipe)], capture_output=True, text=True, env=cpu_env())
    assert first.returncode == 0, first.stderr
    assert "144 train rows, 16 eval rows" in first.stdout
    assert "using the prepared cache" in first.stdout and "`train` finds it there" in first.stdout
    again = subprocess.run([*cli, "prepare", str(recipe)], capture_output=True, text=True, env=cpu_env())
    assert "found the prepared cache" in again.stdout and "by `qlora-sft prepare`" in again.stdout
    (folder,) = (tmp_path / "runs" / ".cache").glob("data-*")
    assert not list(folder.parent.glob("*.lock")) and not list(folder.parent.glob("*.tmp-*"))
    # validate reads the same cache
    shown = subprocess.run([*cli, "validate", str(recipe)], capture_output=True, text=True, env=cpu_env())
    assert f"found the prepared cache {folder}" in shown.stdout
    trained = subprocess.run([*cli, "train", str(recipe)], capture_output=True, text=True, env=cpu_env())
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"data: found the prepared cache {folder} (built by `qlora-sft prepare`" in trained.stdout
    assert list((tmp_path / "runs" / ".cache").glob("data-*")) == [folder]
    # a prepare killed mid-build left its temporary folder (a whole dataset at scale): the next build of
    # that cache on this host removes it
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{dead.pid}")
    (left / "work").mkdir(parents=True)
    rebuilt = subprocess.run([*cli, "prepare", str(recipe), "--rebuild"], capture_output=True, text=True, env=cpu_env())
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert not left.exists() and f"removed {left}" in rebuilt.stdout


def test_ranks_wait_for_the_cache_longer_than_the_collective_timeout(tiny_model: Path, toy_data: Path, tmp_path: Path):
    """Another process holds the cache's lock (as `qlora-sft prepare` on a login node would) for
    longer than train.ddp_timeout: both ranks wait by polling, not in a collective, so nothing times
    out; when the lock goes, rank 0 builds the cache and rank 1 loads it."""
    import os
    import socket
    import subprocess
    import time

    from helpers import accelerate_cmd, cpu_env, losses_by_step

    from qlora_sft import data, model
    from qlora_sft.recipe import load_recipe

    recipe_path = prepare_recipe(tiny_model, toy_data, tmp_path)
    recipe = load_recipe(recipe_path, ["train.ddp_timeout=6"])
    tok = model.load_tokenizer(recipe.model, recipe_path.parent)
    data.set_chat_template(tok, recipe.data.chat_template, recipe.model.name_or_path, recipe_path.parent)
    folder = data.cache_folder(recipe.data, tok, recipe.run.seed, tmp_path / "runs" / ".cache", recipe_path.parent)
    folder.parent.mkdir(parents=True)
    lock = folder.with_name(folder.name + ".lock")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
    proc = subprocess.Popen(
        accelerate_cmd("train", str(recipe_path), "train.ddp_timeout=6"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cpu_env(),
    )
    time.sleep(15)  # > 2 x ddp_timeout with both ranks started
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert not folder.exists()
    lock.unlink()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert folder.is_dir() and sorted(losses_by_step(tmp_path / "runs" / "tiny")) == [1, 2, 3, 4]
    assert "data: using the prepared cache" in out and "(built by `qlora-sft train`" in out


def test_streaming_gives_the_same_examples_and_resumes(tiny_model: Path, tmp_path: Path):
    """A streamed source yields exactly the rows `build_data` makes (in another order); training on
    it runs to max_steps, and a run killed after a checkpoint resumes with the losses of an
    uninterrupted one (the stream is replayed up to the checkpoint)."""
    import collections
    import subprocess
    import sys

    from helpers import cpu_env, losses_by_step

    from qlora_sft import data
    from qlora_sft.recipe import DataConfig, DataSource

    chats = write_chat_rows(tmp_path / "chats.jsonl", n=120)
    tok = tokenizer_for(None)
    keys = {"max_length": 256, "on_bad_row": "skip", "eval_fraction": 0.0}
    full = data.build_data(DataConfig(sources=(DataSource(path=str(chats)),), **keys), tok, 0)
    stream = data.stream_data(
        DataConfig(sources=(DataSource(path=str(chats)),), streaming=True, shuffle_buffer=16, **keys), tok, 0
    )

    def rows(dataset: Any) -> collections.Counter:
        return collections.Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in dataset)

    assert rows(stream.train) == rows(full.train)
    assert stream.report.streamed_sample == 120 and stream.report.tokens_total == full.report.tokens_total

    cli = [sys.executable, "-m", "qlora_sft", "train"]
    # (at the default max_length every conversation is truncated before its end token: refused since 2026-12-01)
    recipe = prepare_recipe(
        tiny_model, chats, tmp_path, streaming=True, shuffle_buffer=16, eval_fraction=None, max_length=256
    )
    args = ["train.max_steps=6", "train.save_steps=3", "train.logging_steps=1"]
    whole = subprocess.run([*cli, str(recipe), *args, "run.name=whole"], capture_output=True, text=True, env=cpu_env())
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "data: streamed: rows are read and tokenized as training consumes them" in whole.stdout
    env = {**cpu_env(), "QLORA_SFT_FAULT": "kill@5"}
    killed = subprocess.run([*cli, str(recipe), *args, "run.name=cut"], capture_output=True, text=True, env=env)
    assert killed.returncode != 0
    resumed = subprocess.run([*cli, str(recipe), *args, "run.name=cut"], capture_output=True, text=True, env=cpu_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses_by_step(tmp_path / "runs" / "whole"), losses_by_step(tmp_path / "runs" / "cut")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def test_streaming_recipe_checks():
    from qlora_sft.errors import RecipeError
    from qlora_sft.recipe import build_recipe

    base = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}], "streaming": True}}
    with pytest.raises(RecipeError, match="`data.streaming` needs train.max_steps"):
        build_recipe(base)
    ok = build_recipe({**base, "train": {"max_steps": 10}})
    assert ok.data.eval_fraction == 0.0  # the default hold-out means nothing for a stream
    two = {"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl"}], "streaming": True, "eval_fraction": 0.1}
    with pytest.raises(RecipeError) as err:
        build_recipe({**base, "data": two, "train": {"max_steps": 10}})
    assert "`data.eval_fraction` cannot hold a fraction of a stream out" in str(err.value)
    assert "several sources mix by `ratio`" in str(err.value)
