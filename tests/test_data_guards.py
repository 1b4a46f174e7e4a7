"""Issue 24: local data that cannot be read is named clearly (file, row or byte, and the fix), never a
raw traceback, a misleading "not found", or a read without end; a byte order mark is dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import DATA

from qlora_sft import data
from qlora_sft.data import build_data, sources
from qlora_sft.errors import DataError
from qlora_sft.model import ensure_pad_token
from qlora_sft.recipe import DataConfig, DataSource

ROW = {"instruction": "Name a drink.", "input": "", "output": "Coffee."}
LATIN1_ROW = '{"instruction": "Un caf\xe9.", "input": "", "output": "Oui."}\n'.encode("latin-1")


@pytest.fixture(scope="module")
def tok():
    from tiny import build_tokenizer

    t = build_tokenizer()
    ensure_pad_token(t)
    return t


def load(path: Path | str, on_bad_row: str = "error", **source) -> tuple[list, list]:
    per_source, reports = data.load_examples([DataSource(path=str(path), **source)], on_bad_row)
    return per_source[0], reports[0]


def error(path: Path | str, **source) -> str:
    with pytest.raises(DataError) as exc:
        load(path, **source)
    return str(exc.value)


def jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# --- not UTF-8 ------------------------------------------------------------------------------


def test_latin1_jsonl_names_file_row_and_iconv(tmp_path: Path):
    f = tmp_path / "latin.jsonl"
    first = jsonl(ROW)
    f.write_bytes(first + LATIN1_ROW)
    msg = error(f)
    assert msg.startswith(f"{f} row 2 (byte offset {len(first) + LATIN1_ROW.index(0xE9)}): byte 0xe9 is not UTF-8")
    assert f"iconv -f latin1 -t utf-8 {f} > {tmp_path / 'latin.utf8.jsonl'}" in msg


def test_latin1_jsonl_in_the_arrow_pipeline(tmp_path: Path, tok):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(jsonl(ROW) * 3 + LATIN1_ROW)
    with pytest.raises(DataError, match=r"latin\.jsonl row 4 \(byte offset \d+\): byte 0xe9 is not UTF-8"):
        build_data(DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1), tok, 0)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_latin1_json_and_csv_name_line_and_byte_offset(tmp_path: Path, suffix: str):
    f = tmp_path / f"latin{suffix}"
    if suffix == ".json":
        head = b'[{"instruction": "a", "input": "", "output": "b"},\n'
        body = head + b'{"instruction": "caf\xe9", "input": "", "output": "c"}]\n'
    else:
        head = b"instruction,input,output\na,,b\n"
        body = head + b"caf\xe9,,c\n"
    f.write_bytes(body)
    msg = error(f)
    line = head.count(b"\n") + 1
    assert msg.startswith(f"{f} line {line} (byte offset {body.index(0xE9)}): byte 0xe9 is not UTF-8"), msg
    assert "iconv -f latin1 -t utf-8" in msg


def test_a_character_split_across_read_chunks_is_not_an_error(tmp_path: Path):
    """The search for the bad byte reads 1 MiB chunks: a UTF-8 character cut by a chunk's end is fine."""
    f = tmp_path / "big.jsonl"
    pad = b" " * ((1 << 20) - 1)  # the 2-byte "é" of the next line straddles the first chunk's end
    f.write_bytes(pad + b'\n{"a": "\xc3\xa9"}\n' + b'{"a": "\xe9"}\n')
    assert sources._first_non_utf8(f) == (3, f.stat().st_size - 4, 0xE9)


def test_utf16_is_named_as_such(tmp_path: Path):
    f = tmp_path / "wide.jsonl"
    f.write_bytes(json.dumps(ROW).encode("utf-16"))
    msg = error(f)
    assert "row 1 (byte offset 0)" in msg and "looks like UTF-16" in msg and "iconv -f utf-16 -t utf-8" in msg


# --- byte order mark -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_dropped(tmp_path: Path, suffix: str):
    if suffix == ".jsonl":
        text = json.dumps(ROW) + "\n"
    elif suffix == ".json":
        text = json.dumps([ROW])
    else:
        text = "instruction,input,output\nName a drink.,,Coffee.\n"
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    (expected,), _ = load(plain)
    (got,), report = load(marked)
    assert report.format == "alpaca" and got.messages == expected.messages


# --- what is not a data file ------------------------------------------------------------------


def test_symlink_loop_is_named_not_reported_as_not_found(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for a, b in (("a.jsonl", "b.jsonl"), ("loopy", "loopy")):  # `loopy` would otherwise be tried as a hub id
        os.symlink(b, tmp_path / a)
        if a != b:
            os.symlink(a, tmp_path / b)
        msg = error(a)
        assert f"data source {a!r}: {a} is a symlink loop" in msg and "not found" not in msg


def test_symlink_to_nothing_is_named(tmp_path: Path):
    link = tmp_path / "gone.jsonl"
    os.symlink(tmp_path / "moved.jsonl", link)
    msg = error(link)
    assert f"{link} is a symlink to {tmp_path / 'moved.jsonl'}, which does not exist" in msg


READ_IN_A_CHILD = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a read without end fails here, not the host
    from qlora_sft import data
    from qlora_sft.recipe import DataSource
    try:
        list(data.read_documents(DataSource(path=sys.argv[1])))
    except data.DataError as exc:
        print(exc)
    """
)


def read_in_a_child(path: Path) -> str:
    """Read a source in a child process with a memory cap and a deadline (today's code would read
    /dev/zero without end, or wait on a FIFO forever)."""
    out = subprocess.run([sys.executable, "-c", READ_IN_A_CHILD, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_devices_and_pipes_are_refused_up_front(tmp_path: Path):
    zero = tmp_path / "zeros.jsonl"
    os.symlink("/dev/zero", zero)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for path, kind in ((zero, "a character device"), (fifo, "a named pipe (FIFO)"), (Path("/dev/zero"), None)):
        msg = read_in_a_child(path)
        assert f"data source {str(path)!r}: {path}" in msg
        assert f"is {kind or 'a character device'}, not a regular file or folder" in msg
        assert "a folder written by datasets' save_to_disk" in msg
    assert "(a link to /dev/zero)" in read_in_a_child(zero)


# --- empty, blank, truncated -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\n   \n\t\n"),
        ("empty.json", b""),
        ("empty_list.json", b"[]"),
        ("header_only.csv", b"instruction,input,output\n"),
    ],
)
def test_empty_and_blank_files_have_no_rows(tmp_path: Path, tok, name: str, content: bytes):
    f = tmp_path / name
    f.write_bytes(content)
    assert f"data source {f} has no rows" in error(f)
    with pytest.raises(DataError, match=f"data source {f} has no rows"):
        build_data(DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1), tok, 0)


def test_a_folder_not_written_by_datasets_says_what_it_holds(tmp_path: Path):
    folder = tmp_path / "exports"
    folder.mkdir()
    assert error(folder).endswith("; it is empty")
    (folder / "part-1.jsonl").write_bytes(jsonl(ROW))
    (folder / "notes.txt").write_text("x")
    msg = error(folder)
    assert "a folder must be written by datasets' save_to_disk" in msg
    assert f"it holds part-1.jsonl: give each file as a source of its own (`- path: {folder / 'part-1.jsonl'}`)" in msg


def test_a_truncated_last_line(tmp_path: Path):
    f = tmp_path / "cut.jsonl"
    f.write_bytes(jsonl(ROW, ROW) + b'{"instruction": "Name a dri')
    assert error(f).startswith(f"{f} row 3: line is not valid JSON (Unterminated string")
    rows, report = load(f, on_bad_row="skip")
    assert len(rows) == 2 and report.skipped == {"invalid_json": 1}
    # a .json file of JSON lines: the line that is cut is named (not "Extra data" at line 2)
    g = tmp_path / "cut.json"
    g.write_bytes(f.read_bytes())
    assert error(g) == f"{g}: not valid JSON (line 3: Unterminated string starting at)"


def test_a_first_line_that_is_not_json(tmp_path: Path):
    f = tmp_path / "cut.jsonl"
    f.write_bytes(b'{"instruction": "Name a dri')
    msg = error(f)
    assert msg.startswith(f"{f} row 1: line is not valid JSON (Unterminated string")
    assert "the format is detected from the first row" in msg and "BadRow" not in msg
    # with the format given, the row is a bad row like any other
    assert "data.on_bad_row=skip" in error(f, format="alpaca")


def test_a_file_that_is_not_parquet(tmp_path: Path):
    f = tmp_path / "rows.parquet"
    f.write_bytes(jsonl(ROW))
    msg = error(f)
    assert msg.startswith(f"data source {f}: not a readable parquet file (")


def test_valid_files_read_as_before():
    """The guards change nothing for good files (the pinned digests in test_data_scale check the tokens)."""
    for name in ("alpaca.jsonl", "sharegpt.json", "mixed.csv"):
        rows, report = load(DATA / name)
        assert rows and report.rows == report.kept
