"""The data path under a hostile but realistic user: a prepared cache damaged after it was written
(cut off, a piece deleted, bytes flipped in place, its report gone), a disk that fills while the
cache is built, rows that say one field twice. Each is named with the folder, file or row and the
fix; nothing damaged is trained on and nothing is dropped in silence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, cli_with_file_limit, cpu_env, free_port, recipe_dict, write_recipe, write_toy_data

from qlora_sft import data
from qlora_sft.data import build_data
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


def test_a_cache_of_an_older_version_and_the_trainers_own_files_beside_the_splits_are_used(tmp_path: Path, tok):
    """The check of a cache before use reads only what its report recorded: a cache written before
    the report recorded its files is used as before (loaded, not checked), and the Arrow cache files
    the Trainer writes into the splits' folders (packing, column removal) are not taken for damage."""
    f = write_toy_data(tmp_path / "toy.jsonl", n=20)
    root = tmp_path / "cache"
    folder = Path(data.prepare_data(cfg(f), tok, 0, root).cache)
    (folder / "train" / "cache-0123456789abcdef.arrow").write_bytes(b"written by the Trainer")
    assert data.prepare_data(cfg(f), tok, 0, root).found
    meta = json.loads((folder / "report.json").read_text())
    del meta["files"]
    (folder / "report.json").write_text(json.dumps(meta))
    assert data.prepare_data(cfg(f), tok, 0, root).found


def srun_like_ranks(recipe: Path, ranks: int = 2) -> list[subprocess.Popen]:
    """`qlora-sft train RECIPE` as `ranks` CPU ranks started the way srun starts them under `submit`:
    each its own process with its rank's variables, no torchrun agent that would end the others when
    one fails."""
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = {
            **cpu_env(),
            "PYTHONPATH": str(REPO / "src"),
            **dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks)),
            **dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SLURM_PROCID=str(rank)),
        }
        cmd = [sys.executable, "-m", "qlora_sft", "train", str(recipe)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=recipe.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


@pytest.mark.multiprocess
def test_a_cache_changed_in_place_stops_every_rank_at_once(tiny_model: Path, tmp_path: Path):
    """Bytes of the prepared cache flipped in place (size and mtime kept), two ranks launched as srun
    starts them. Was: only the node's local main process (rank 0) read the cache against its
    digests and stopped; rank 1 checked the sizes only, took the data and waited for rank 0 in the
    next collective until train.ddp_timeout (1800 s here, the default), holding its GPU. Now every
    rank names the damaged file and stops at once."""
    toy = write_toy_data(tmp_path / "toy.jsonl", n=48)
    train = {"max_steps": 2, "save_steps": 2, "ddp_timeout": 1800}
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy, tmp_path / "runs", train=train))
    prep = run_cli("prepare", str(recipe))
    assert prep.returncode == 0, prep.stderr[-3000:]
    (folder,) = [p for p in (tmp_path / "runs" / ".cache").glob("data-*") if p.is_dir()]
    _flip(folder)
    start = time.monotonic()
    procs = srun_like_ranks(recipe)
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, 240 - (time.monotonic() - start)))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    took = time.monotonic() - start
    assert took < 200, f"the ranks took {took:.0f} s"
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 2, f"rank {rank}:\n{out[-3000:]}"
        said = f"the prepared data cache {folder} is damaged: train/data-00000-of-00001.arrow is not the bytes"
        assert said in out and "Traceback" not in out, f"rank {rank}:\n{out[-3000:]}"


# --- the disk fills while the cache is built ---------------------------------------------------


def run_cli(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    return cli_with_file_limit(*args, fsize=fsize, timeout=120)


def test_a_disk_that_fills_while_prepare_builds_the_cache_is_named_and_the_relaunch_builds_it(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """Was: `qlora-sft prepare` (and `train`, the same build) ended on a bare traceback,
    `OSError: [Errno 27] File too large`, naming neither the cache folder nor what to do. Now the
    error names the cache folder, what stopped the write and the fix; no partial cache is left for
    a later launch to trust, and the relaunch with room builds it and the next finds it."""
    toy = write_toy_data(tmp_path / "toy.jsonl", n=400)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy, tmp_path / "runs"))
    root = tmp_path / "runs" / ".cache"
    full = run_cli("prepare", str(recipe), fsize=16 << 10)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    (folder,) = {p.with_suffix("") for p in root.glob("data-*.failed")}
    assert f"preparing the data cache {folder}" in full.stderr, full.stderr[-3000:]
    assert "file too large" in full.stderr and "run.output_dir" in full.stderr, full.stderr[-3000:]
    assert not [p.name for p in root.glob("data-*") if p.is_dir()]  # no partial cache, no temporary folder
    assert not folder.with_name(folder.name + ".lock").exists()
    from qlora_sft import cli

    assert cli.main(["prepare", str(recipe)]) == 0  # the relaunch with room (here, in this process)
    assert folder.is_dir() and "found" not in capsys.readouterr().out
    assert len(data.load_prepared(folder).train) > 0  # complete: what the next launch finds


# --- a field given twice ---------------------------------------------------------------------

TWICE = b'{"instruction": "Name a drink.", "input": "", "output": "Tea", "output": "Milk"}'
ROW = b'{"instruction": "Name a colour.", "input": "", "output": "Blue."}'
NESTED_OK = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Blue."}]}'
NESTED_TWICE = (
    b'{"messages": [{"role": "user", "content": "Hi", "content": "Hello"}, {"role": "assistant", "content": "Yo"}]}'
)


@pytest.mark.parametrize(
    "name,content,row",
    [
        ("twice.jsonl", ROW + b"\n" + TWICE + b"\n", 2),
        ("twice.json", b"[" + ROW + b",\n" + TWICE + b"]", 2),
        ("twice_lines.json", ROW + b"\n" + TWICE + b"\n", 2),
        ("nested.jsonl", NESTED_OK + b"\n" + NESTED_TWICE + b"\n", 2),
    ],
)
def test_a_row_that_gives_a_field_twice_is_a_bad_row_not_its_last_value(tmp_path: Path, tok, name, content, row):
    """Was: JSON keeps the last of a key given twice, so `"output": "Tea", "output": "Milk"` trained
    on Milk and dropped Tea in silence (an export that merged two columns, a hand edit). Now such a row
    is a bad row (`duplicate_key`) naming the key and both values: refused with on_bad_row=error,
    skipped and counted with skip; in the Arrow pipeline too (the stream parses rows the same way)."""
    f = tmp_path / name
    f.write_bytes(content)
    key, values = ("content", "'Hi' and 'Hello'") if name.startswith("nested") else ("output", "'Tea' and 'Milk'")
    with pytest.raises(DataError) as exc:
        data.load_examples([DataSource(path=str(f))], "error")
    msg = str(exc.value)
    assert f"{f} row {row}: " in msg and f"`{key}` twice ({values})" in msg, msg
    per_source, reports = data.load_examples([DataSource(path=str(f))], "skip")
    assert reports[0].skipped == {"duplicate_key": 1}
    assert [e.messages[-1]["content"] for e in per_source[0]] == ["Blue."]
    with pytest.raises(DataError, match=f"row {row}: .*`{key}` twice"):
        build_data(cfg(f), tok, 0)


def test_a_csv_header_that_names_a_column_twice_is_refused(tmp_path: Path):
    """Was: csv.DictReader keeps the last of two columns of one name: `output,output` trained on the
    second column and dropped the first in silence. Now the file is refused naming the column."""
    f = tmp_path / "twice.csv"
    f.write_text("instruction,input,output,output\nName a drink.,,Tea,Milk\n")
    with pytest.raises(DataError) as exc:
        data.load_examples([DataSource(path=str(f))], "skip")
    msg = str(exc.value)
    assert f"{f} line 1" in msg and "column `output` twice" in msg and "Rename one of them" in msg, msg


def test_a_csv_header_with_trailing_unnamed_columns_is_read(tmp_path: Path, tok):
    """Was: the duplicate-column check refused `instruction,input,output,,` (a spreadsheet export's
    trailing empty columns) as naming the column `` twice, though no format reads an unnamed column.
    Now unnamed (empty or blank) columns are left out of the check and the rows are read; a named
    column given twice beside them is still refused."""
    f = tmp_path / "export.csv"
    f.write_text("instruction,input,output,,, , \nName a drink.,,Tea,,,,\nName a colour.,,Blue.,,,, \n")
    per_source, reports = data.load_examples([DataSource(path=str(f))], "error")
    assert [e.messages[-1]["content"] for e in per_source[0]] == ["Tea", "Blue."]
    assert not reports[0].skipped
    build_data(cfg(f), tok, 0)
    g = tmp_path / "twice.csv"
    g.write_text("instruction,output,output,,\nName a drink.,Tea,Milk,,\n")
    with pytest.raises(DataError, match="column `output` twice"):
        data.load_examples([DataSource(path=str(g))], "skip")


def test_a_disk_that_fills_while_validate_builds_the_data_names_its_temporary_folder(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Was: `qlora-sft validate` builds the data in a temporary folder ($TMPDIR) when no cache is
    there; a full one ended on a bare `OSError: [Errno 27] File too large` traceback. Now it names
    the temporary folder, what stopped the write and the fix (TMPDIR, or `prepare`), and removes it."""
    toy = write_toy_data(tmp_path / "toy.jsonl", n=400)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy, tmp_path / "runs"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    full = run_cli("validate", str(recipe), fsize=16 << 10)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert f"building the data in the temporary folder {scratch}/qlora-sft-data-" in full.stderr, full.stderr[-3000:]
    assert "file too large" in full.stderr and "TMPDIR" in full.stderr and "qlora-sft prepare" in full.stderr
    assert list(scratch.iterdir()) == []


# --- caches of older keys -----------------------------------------------------------------------


def test_prepare_names_the_caches_an_earlier_key_left_behind(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """Was: every change of the data, a data key or the tokenizer gets a new cache folder and the old
    one stays (qlora-sft never deletes one: another run of the output_dir may use it), and nothing said
    so: .cache grew by a tokenized copy of the data per edit, unseen. `prepare` and `validate` now name
    the other caches there, what each was built from, their size, and how to remove one."""
    from qlora_sft import cli

    toy = write_toy_data(tmp_path / "toy.jsonl", n=40)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy, tmp_path / "runs"))
    root = tmp_path / "runs" / ".cache"
    assert cli.main(["prepare", str(recipe)]) == 0
    assert "other prepared" not in capsys.readouterr().out
    (old,) = root.glob("data-*")
    assert cli.main(["prepare", str(recipe), "data.max_length=100"]) == 0
    out = capsys.readouterr().out
    assert len([p for p in root.glob("data-*") if p.is_dir()]) == 2
    assert f"{root} holds 1 other prepared data cache" in out, out
    assert f"{old.name} (built by prepare at " in out and f"from {toy}" in out, out
    assert f"rm -r {old}" in out and "never deletes" in out, out


# --- paths that are not one data file ----------------------------------------------------------


def test_a_glob_is_named_as_a_pattern_with_the_files_it_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Was: `path: shards/*.jsonl` said "not found ... Fix `path:`" while the shards were there, and
    a pattern that matches nothing said the same: patterns are not expanded, and nothing said so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    for i in range(2):
        write_toy_data(tmp_path / "shards" / f"part-{i}.jsonl", n=3)
    with pytest.raises(DataError) as exc:
        data.load_examples([DataSource(path="shards/*.jsonl")], "error")
    msg = str(exc.value)
    assert "is a pattern" in msg and "not expanded" in msg and "it matches 2 files" in msg, msg
    assert f"- path: {tmp_path / 'shards' / 'part-0.jsonl'}" in msg, msg
    with pytest.raises(DataError, match=r"is a pattern.* it matches no file"):
        data.load_examples([DataSource(path="nothing/*.jsonl")], "error")


@pytest.mark.parametrize("suffix,tool", [(".gz", "gunzip -k"), (".zst", "zstd -d"), (".bz2", "bunzip2 -k")])
def test_a_compressed_file_says_how_to_decompress_it(tmp_path: Path, suffix: str, tool: str):
    """Was: "unsupported file type '.gz'" and the list of types, no word that the file is compressed."""
    f = tmp_path / f"rows.jsonl{suffix}"
    f.write_bytes(b"\x1f\x8b compressed")
    with pytest.raises(DataError) as exc:
        data.load_examples([DataSource(path=str(f))], "error")
    msg = str(exc.value)
    assert "compressed" in msg and f"{tool} {f}" in msg and f"- path: {tmp_path / 'rows.jsonl'}" in msg, msg


def test_eval_rows_that_are_also_train_rows_are_counted_and_warned(tmp_path: Path, tok):
    """data.eval_sources naming the training file itself (or a copy of it) made every eval row a train
    row: the eval loss measured memorisation, and nothing said so. The report counts the eval rows whose
    tokens are those of a train row and warns."""
    train = write_toy_data(tmp_path / "train.jsonl", n=40)
    shutil.copy(train, tmp_path / "copy.jsonl")
    other = tmp_path / "other.jsonl"
    rows = [{"instruction": f"Spell {w}.", "input": "", "output": " ".join(w)} for w in ("tea", "milk", "salt")]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    same = build_data(cfg(train, eval_sources=(DataSource(path=str(tmp_path / "copy.jsonl")),)), tok, 0, None)
    assert same.report.eval_in_train == same.report.eval_rows == 40
    lines = "\n".join(same.report.lines())
    assert "warning: 40 of the 40 eval rows are also train rows (the same tokens)" in lines
    apart = build_data(cfg(train, eval_sources=(DataSource(path=str(other)),)), tok, 0, None)
    assert apart.report.eval_rows == 12 and apart.report.eval_in_train == 0
    assert "are also train rows" not in "\n".join(apart.report.lines())


def test_a_misspelled_optional_field_is_named_not_dropped_in_silence(tmp_path: Path, tok, caplog):
    """`imput` for alpaca's optional `input` (or `contxt`, `sytem`) was left out without a word: the
    rows trained without their input. Columns the format does not read stay allowed (ids, metadata);
    one a letter or two from a field it reads is named, with the field."""
    import logging

    typo = tmp_path / "typo.jsonl"
    rows = [{"id": i, "instruction": "Add the numbers.", "imput": f"{i} + {i}", "output": str(2 * i)} for i in range(6)]
    typo.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        prepared = build_data(cfg(typo), tok, 0, None)
    assert prepared.report.train_rows == 6
    said = [r.getMessage() for r in caplog.records if "imput" in r.getMessage()]
    assert (
        said
        and f"{typo} row 1 has the field `imput`, which format alpaca does not read: did you mean `input`?" in said[0]
    )
    assert not any("`id`" in r.getMessage() for r in caplog.records)
    caplog.clear()
    fine = tmp_path / "fine.jsonl"
    fine.write_text("".join(json.dumps({**r, "input": r.pop("imput")}) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        build_data(cfg(fine), tok, 0, None)
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]


# --- a data file written to while the cache is built ------------------------------------------


def test_a_data_file_changed_while_the_cache_is_built_is_named_and_nothing_is_cached(
    tmp_path: Path, tok, monkeypatch: pytest.MonkeyPatch
):
    """The data file is appended to (a generation job still writing it, an rsync still copying)
    while its rows are tokenized: the cache was kept under the key of the file as it was before, with
    rows of neither version, and the run trained on them with nothing said. Now the build names the
    file that changed and keeps nothing; the launch after the writer has finished builds it whole."""
    from qlora_sft.data import cache

    toy = write_toy_data(tmp_path / "toy.jsonl", n=64)
    extra = write_toy_data(tmp_path / "more.jsonl", n=8, seed=1).read_bytes()
    real_build = cache.build_data

    def build_while_written(*args, **kwargs):
        with toy.open("ab") as f:  # the writer appends while the rows are read
            f.write(extra)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(cache, "build_data", build_while_written)
    root = tmp_path / "cache"
    with pytest.raises(DataError) as exc:
        data.prepare_data(cfg(toy), tok, seed=0, cache_root=root)
    message = str(exc.value)
    assert f"{toy.resolve()} changed while its rows were read" in message and "launch again" in message
    assert not [p for p in root.glob("data-*") if p.is_dir()]  # nothing cached under either version
    monkeypatch.setattr(cache, "build_data", real_build)
    prepared = data.prepare_data(cfg(toy), tok, seed=0, cache_root=root)
    assert prepared.report.train_rows == 72  # the file as the writer left it, whole


def test_a_misspelled_field_past_the_first_row_is_named_with_its_rows(tmp_path: Path, tok, caplog):
    """Two files joined into one (`cat a.jsonl b.jsonl`), the second spelling alpaca's `input` as
    `imput`: only the first row was looked at, so the second file's rows trained without their input
    with nothing said. Every row is looked at now; the field is named with its first row and count."""
    import logging

    joined = tmp_path / "joined.jsonl"
    good = [{"instruction": "Add.", "input": f"{i} + {i}", "output": str(2 * i)} for i in range(5)]
    typo = [{"instruction": "Add.", "imput": f"{i} + 1", "output": str(i + 1)} for i in range(3)]
    joined.write_text("".join(json.dumps(r) + "\n" for r in good + typo))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        build_data(cfg(joined), tok, 0, None)
    said = [r.getMessage() for r in caplog.records if "imput" in r.getMessage()]
    assert len(said) == 1, said
    assert f"{joined} row 6 has the field `imput`" in said[0] and "3 rows have it" in said[0], said
    assert "did you mean `input`?" in said[0]


def test_ctrl_c_while_prepare_tokenizes_in_processes_is_an_interruption_and_leaves_nothing_trusted(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """Ctrl-C while `prepare` tokenized with several processes: datasets' pool, cleaning up, raised
    `multiprocess.TimeoutError` over the KeyboardInterrupt, so the user got a traceback, exit code 1 and a
    `.failed` note "TimeoutError: " instead of "interrupted" (130). No partial cache, lock or temporary
    folder may be left; the next prepare builds the cache."""
    from qlora_sft import cli
    from qlora_sft.data import encode

    toy = write_toy_data(tmp_path / "toy.jsonl", n=2 * encode.ROWS_PER_PROCESS + 100)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy, tmp_path / "runs", data={"num_proc": 2}))
    parent, original = os.getpid(), encode.encode_documents

    def interrupted(*args, **kwargs):  # in a worker: Ctrl-C reaches the main process, the workers go on
        if os.getpid() != parent:
            flag = tmp_path / "sent"
            if not flag.exists():
                flag.touch()
                os.kill(parent, signal.SIGINT)
            time.sleep(2)
        return original(*args, **kwargs)

    monkeypatch.setattr(encode, "encode_documents", interrupted)
    # the pool's workers stop on SIGTERM (Pool.terminate) as in a fresh `qlora-sft prepare`; a hang fails
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "a training in this process kept its handler"

    def hung(*_: object) -> None:
        raise TimeoutError("prepare did not stop within 300 s of the Ctrl-C")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)
    try:
        code = cli.main(["prepare", str(recipe)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert code == 130
    err = capsys.readouterr().err
    assert "qlora-sft prepare: interrupted" in err and "Traceback" not in err, err
    root = tmp_path / "runs" / ".cache"
    assert not [p.name for p in root.iterdir() if p.name.startswith("data-") and not p.name.endswith(".failed")]
    assert all("interrupted" in p.read_text() for p in root.glob("data-*.failed"))
    monkeypatch.setattr(encode, "encode_documents", original)
    assert cli.main(["prepare", str(recipe)]) == 0
    assert [p.name for p in root.iterdir() if p.is_dir()], "the next prepare built the cache"


# --- data written for another trainer ------------------------------------------------------------


def test_llama_factorys_alpaca_history_is_trained_as_earlier_turns_not_dropped(tmp_path: Path, tok):
    """Was: LLaMA-Factory's alpaca rows carry the earlier turns of a conversation in `history`
    ([[user, assistant], ...]); the field was not read, and the row trained as its last exchange alone,
    its context dropped in silence (no warning: `history` spells no field alpaca reads)."""
    from qlora_sft.data import normalize_row

    row = {
        "system": "Be brief.",
        "instruction": "And of Spain?",
        "input": "",
        "output": "Madrid.",
        "history": [["The capital of France?", "Paris."], ["Of Italy?", "Rome."]],
    }
    messages, _ = normalize_row(row, "alpaca")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."),
        ("user", "The capital of France?"),
        ("assistant", "Paris."),
        ("user", "Of Italy?"),
        ("assistant", "Rome."),
        ("user", "And of Spain?"),
        ("assistant", "Madrid."),
    ]
    assert normalize_row({**row, "history": []}, "alpaca")[0][1:] == messages[5:]
    f = tmp_path / "lf.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps({**row, "history": [["only a question"]]}) + "\n")
    prepared = build_data(cfg(f, on_bad_row="skip"), tok, 0)
    assert prepared.report.sources[0].skipped == {"wrong_type": 1}
    text = tok.decode(prepared.train[0]["input_ids"])
    assert "The capital of France?" in text and "Paris." in text and "Rome." in text
    with pytest.raises(DataError, match=r"row 2: field `history\[0\]` must be a \[user, assistant\] pair"):
        build_data(cfg(f), tok, 0)


def test_axolotls_per_turn_training_flag_is_a_bad_row_not_trained_in_silence(tmp_path: Path, tok):
    """Was: axolotl marks a turn to leave untrained with `training: false` (or `train: false`,
    `message_field_training`); the flag was not read and the turn trained in full, as `weight: 0` did
    before it was made a bad row. A flag that says what is done anyway (assistant true, others false)
    is fine."""
    from qlora_sft.data import BadRow, normalize_row

    def conv(flag: str, value: object, role: str = "assistant") -> dict:
        turns = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "a sampled answer"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "the chosen answer"},
        ]
        turns[1 if role == "assistant" else 0][flag] = value
        return {"messages": turns}

    for flag in ("training", "train"):
        with pytest.raises(BadRow, match=rf"`messages\[1\]`.{flag} is False: .*not supported") as exc:
            normalize_row(conv(flag, False), "messages")
        assert exc.value.reason == "turn_weight"
        with pytest.raises(BadRow, match=rf"`messages\[0\]`.{flag} is True"):
            normalize_row(conv(flag, True, role="user"), "messages")
        assert normalize_row(conv(flag, True), "messages")[0][1]["content"] == "a sampled answer"
        assert normalize_row(conv(flag, False, role="user"), "messages")[0][0]["content"] == "hi"
        # data.assistant_only_loss: false trains every turn: a false flag anywhere is not what is done
        with pytest.raises(BadRow, match=rf"`messages\[0\]`.{flag} is False"):
            normalize_row(conv(flag, False, role="user"), "messages", assistant_only_loss=False)
        assert normalize_row(conv(flag, True, role="user"), "messages", assistant_only_loss=False)[0][0]["content"]
    f = tmp_path / "axolotl.jsonl"
    f.write_text(json.dumps(conv("training", False, role="user")) + "\n")
    assert build_data(cfg(f), tok, 0).report.train_rows == 1
    with pytest.raises(DataError, match=r"row 1: `messages\[0\]`.training is False: .*every turn trains"):
        build_data(cfg(f, assistant_only_loss=False), tok, 0)


def test_axolotls_training_flag_written_as_1_or_0_is_read_by_value(tmp_path: Path, tok):
    """Was: the flag was compared by identity (`is not True`), so converted data's `"training": 1` on an
    assistant turn (or 0 on a user turn), which says what is done anyway, was refused as a per-turn flag
    "not supported"; a value that is no boolean ("yes") got that message too, not that it must be one."""
    from qlora_sft.data import BadRow, normalize_row

    def conv(value: object, role: str = "assistant", flag: str = "training") -> dict:
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        turns[1 if role == "assistant" else 0][flag] = value
        return {"messages": turns}

    for flag in ("training", "train"):
        assert normalize_row(conv(1, flag=flag), "messages")[0][1]["content"] == "hello"
        assert normalize_row(conv(1.0, flag=flag), "messages")[0][1]["content"] == "hello"
        assert normalize_row(conv(0, role="user", flag=flag), "messages")[0][0]["content"] == "hi"
        assert normalize_row(conv(1, role="user", flag=flag), "messages", assistant_only_loss=False)[0]
        # disagreeing with what is done is still refused, as with true/false
        with pytest.raises(BadRow, match=rf"`messages\[1\]`.{flag} is 0: .*not supported") as exc:
            normalize_row(conv(0, flag=flag), "messages")
        assert exc.value.reason == "turn_weight"
        with pytest.raises(BadRow, match=rf"`messages\[0\]`.{flag} is 1: .*not supported"):
            normalize_row(conv(1, role="user", flag=flag), "messages")
    for value in ("yes", "true", "1", 2, [True]):  # (null is no flag, as axolotl reads it: test_data_turn_keys)
        with pytest.raises(BadRow, match=r"`messages\[1\]`.training is .*: it must be a boolean") as exc:
            normalize_row(conv(value), "messages")
        assert exc.value.reason == "wrong_type", value
    f = tmp_path / "converted.jsonl"
    f.write_text(json.dumps(conv(1)) + "\n" + json.dumps(conv(0, role="user")) + "\n")
    assert build_data(cfg(f), tok, 0).report.train_rows == 2


def test_a_kto_row_marked_undesirable_is_a_bad_row_not_trained_on(tmp_path: Path, tok):
    """Was: TRL's unpaired preference (KTO) rows are prompt, completion and a boolean `label`; read as
    prompt_completion, the completions labelled undesirable (`label: false`) were trained like the
    others, the model taught the answers the data says are bad, without a word."""
    f = tmp_path / "kto.jsonl"
    rows = [
        {"prompt": "The colour of the sky?", "completion": "Blue.", "label": True},
        {"prompt": "The colour of the sky?", "completion": "Green.", "label": False},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = build_data(cfg(f, on_bad_row="skip"), tok, 0)
    assert prepared.report.sources[0].skipped == {"undesirable_completion": 1}
    assert [tok.decode(r["input_ids"]).count("Green.") for r in prepared.train] == [0]
    with pytest.raises(DataError, match=r"row 2: .*`label` is false: .*undesirable"):
        build_data(cfg(f), tok, 0)


def test_validate_shows_a_row_whose_training_flags_match_assistant_only_loss_false(tmp_path: Path, tiny_model, capsys):
    """With data.assistant_only_loss: false every turn trains, so a user turn's `training: true` is what
    is done: the data builds, and `validate`'s example (read again from the source) shows the row
    instead of stopping on it as if only assistant turns trained."""
    from qlora_sft import cli

    f = tmp_path / "axolotl.jsonl"
    turns = [{"role": "user", "content": "hi", "training": True}, {"role": "assistant", "content": "hello"}]
    f.write_text(json.dumps({"messages": turns}) + "\n")
    data_section = {"eval_fraction": 0.0, "assistant_only_loss": False, "num_proc": 1}
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, f, tmp_path / "runs", data=data_section))
    assert cli.main(["validate", str(recipe)]) == 0
    assert "axolotl.jsonl row 1" in capsys.readouterr().out


def test_a_turns_name_is_named_in_a_warning_not_dropped_in_silence(tmp_path: Path, tok, caplog):
    """OpenAI's chat format allows a `name` on a user, assistant or system turn (who speaks); it was
    dropped without a word. Chat templates rarely render it, so it is not given to them (the same
    text whatever the template): a warning names the first row and turn that has one and how many
    rows do. A tool turn's `name` (the tool) is kept, as before."""
    import logging

    def row(i: int, name: str | None) -> dict:
        user = {"role": "user", "content": f"What is {i} + {i}?", **({"name": name} if name else {})}
        return {"messages": [user, {"role": "assistant", "content": str(2 * i)}]}

    f = tmp_path / "names.jsonl"
    f.write_text("".join(json.dumps(row(i, None if i == 0 else "alice")) + "\n" for i in range(6)))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        prepared = build_data(cfg(f), tok, 0, None)
    assert prepared.report.train_rows == 6
    said = [r.getMessage() for r in caplog.records if "`name`" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"{f} row 2: turn `messages[0]` (user) has a `name` ('alice')")
    assert "not given to the chat template" in said[0] and "5 rows have one" in said[0]
    caplog.clear()
    tool = tmp_path / "tool.jsonl"
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {}}}]}
    tool.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "1 + 1?"},
                    call,
                    {"role": "tool", "name": "add", "content": "2"},
                    {"role": "assistant", "content": "2"},
                ]
            }
        )
        + "\n"
    )
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        examples = data.load_examples([DataSource(path=str(tool))], "error")[0][0]
    assert examples[0].messages[2]["name"] == "add"
    assert not [r for r in caplog.records if "`name`" in r.getMessage()]
