"""Reading sources: a local .jsonl/.json/.parquet/.csv file, a folder written by datasets'
save_to_disk, or a hub dataset id -> (row number, raw row) (`read_source`), or the row as JSON text
(`read_documents`, what the Arrow pipeline and the stream read); `max_rows` limits a source's rows.

A source that cannot be read fails here, naming the file and the fix: not found, a broken link or a
symlink loop, a device or a pipe, text that is not UTF-8, JSON or parquet that does not parse, a .json
file that holds one object rather than a list of rows or JSON lines (named with what it looks like: one
row, or the rows under a key, which is never unwrapped by a guess). A row
that is not JSON (or nested too deeply to parse), and a CSV record with more or fewer fields than the
header, become a `BadRow`, counted or refused by `data.on_bad_row` like any other bad row; CSV that does
not parse (a quote that is not closed) fails naming the line.
"""

from __future__ import annotations

import csv
import errno
import itertools
import json
import logging
import os
import random
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import local_path
from ..recipe import DataSource

log = logging.getLogger("qlora_sft")


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short key for counting, the message explains."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".ndjson"}


def resolve_path(path: str, base_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """A local path as given (relative to the working directory), else relative to `base_dir`
    (the recipe's folder); None when it exists in neither place."""
    found, other = local_path(path, base_dir)
    if found is not None and other is not None:
        raise DataError(
            f"{path} names two different files: {found.resolve()} (from the working directory) and "
            f"{other.resolve()} (beside the recipe). Write the path absolute, or launch from the recipe's folder, "
            "so that the launch reads the one you mean."
        )
    return found


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)) and Path(path).suffix not in FILE_SUFFIXES


def _refuse_broken_link(path: str, base_dir: str | os.PathLike[str] | None) -> None:
    """A path that `resolve_path` did not find because it is a symlink loop or a link to nothing is
    named as such (not as "not found", nor tried as a hub dataset id)."""
    p = Path(path).expanduser()
    candidates = [p] + ([Path(base_dir) / p] if base_dir is not None and not p.is_absolute() else [])
    for candidate in candidates:
        try:
            os.stat(candidate)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DataError(
                    f"data source {path!r}: {candidate} is a symlink loop (its links lead back to themselves; "
                    f"`ls -l {candidate}` shows where it points). Point `path:` at the data file itself, or fix "
                    "the link."
                ) from None
            if os.path.islink(candidate):
                raise DataError(
                    f"data source {path!r}: {candidate} is a symlink to {os.readlink(candidate)}, which does not "
                    "exist. Point `path:` at the data file itself, or fix the link."
                ) from None


def _refuse_pattern(path: str, base_dir: str | os.PathLike[str] | None) -> None:
    """A path with a wildcard (`shards/*.jsonl`) is not expanded: named as a pattern, with the files it
    matches (from the working directory, else beside the recipe) to list as sources of their own."""
    if not any(c in path for c in "*?["):
        return
    import glob

    pattern = os.path.expanduser(path)
    matches = sorted(glob.glob(pattern))
    if not matches and base_dir is not None and not os.path.isabs(pattern):
        matches = sorted(glob.glob(os.path.join(os.fspath(base_dir), pattern)))
    if not matches:
        raise DataError(
            f"data source {path!r} is a pattern, and patterns are not expanded; it matches no file either (looked in "
            f"{Path.cwd()}{f' and {base_dir}' if base_dir else ''}). Give each data file as a source of its own."
        )
    shown = "".join(f"\n  - path: {Path(m).resolve()}" for m in matches[:5])
    more = f"\n  (and {len(matches) - 5} more)" if len(matches) > 5 else ""
    raise DataError(
        f"data source {path!r} is a pattern, and patterns are not expanded; it matches {len(matches)} "
        f"file{'s' if len(matches) > 1 else ''}. Give each as a source of its own in data.sources:{shown}{more}"
    )


# A compressed data file, and the command that decompresses it beside itself.
DECOMPRESS = {".gz": "gunzip -k", ".zst": "zstd -d", ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".zip": "unzip"}


SPECIAL_FILES = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_special_file(path: str, local: Path) -> None:
    """Only a regular file or a folder is a local source: a device or a pipe (/dev/zero, a FIFO) would be
    read without end, or wait forever for a writer."""
    mode = os.stat(local).st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = next((name for test, name in SPECIAL_FILES if test(mode)), "a special file")
    target = f" (a link to {local.resolve()})" if local.is_symlink() else ""
    raise DataError(
        f"data source {path!r}: {local}{target} is {kind}, not a regular file or folder; it would be read "
        "without end or wait for a writer. A data source is a .jsonl/.json/.parquet/.csv file, a folder written "
        "by datasets' save_to_disk, or a hub dataset id: write the data to a file first and point `path:` at it."
    )


def _first_non_utf8(path: Path) -> tuple[int, int, int] | None:
    """(line, byte offset, byte) of the first byte of `path` that is not UTF-8, read in chunks; None if
    there is none."""
    line, offset, carry = 1, 0, b""
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            buf = carry + chunk
            if not buf:
                return None
            try:
                buf.decode("utf-8")
                good, bad = len(buf), None
            except UnicodeDecodeError as exc:
                cut = exc.reason == "unexpected end of data" and bool(chunk)  # a character the chunk cut in two
                good, bad = exc.start, (None if cut else exc.start)
            line += buf.count(b"\n", 0, good)
            if bad is not None:
                return line, offset + bad, buf[bad]
            offset += good
            carry = buf[good:]
            if not chunk:
                return None


def _not_utf8(path: Path, rows_are_lines: bool) -> DataError:
    """The error for a local file that is not UTF-8: where (the row of a JSON lines file, or the line and
    byte offset), and how to re-encode it."""
    found = _first_non_utf8(path)
    if found is None:  # pragma: no cover - only a decode error brings us here
        return DataError(f"{path}: not UTF-8 text. Re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).")
    line, offset, byte = found
    where = f"row {line}" if rows_are_lines else f"line {line}"
    with path.open("rb") as f:
        utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
    encoding = "utf-16" if utf16 else "latin1"
    fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return DataError(
        f"{path} {where} (byte offset {offset}): byte 0x{byte:02x} is not UTF-8; data files are read as UTF-8 "
        f"text{' and this one looks like UTF-16' if utf16 else ''}. Re-encode the file, e.g. "
        f"`iconv -f {encoding} -t utf-8 {path} > {fixed}` (with the encoding it was written in), and point "
        "`path:` at the new file."
    )


def read_source(src: DataSource, base_dir: str | os.PathLike[str] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (row number, raw row) from a source. Row numbers are 1-based (the line for jsonl)."""
    local = resolve_path(src.path, base_dir)
    if local is None:
        _refuse_broken_link(src.path, base_dir)
        _refuse_pattern(src.path, base_dir)
        if not _looks_like_hub_id(src.path):
            raise DataError(
                f"data source {src.path!r} not found (looked in {Path.cwd()}"
                + (f" and {base_dir}" if base_dir else "")
                + "). Fix `path:` in data.sources."
            )
        yield from _read_hub(src)
        return
    _refuse_special_file(src.path, local)
    if local.is_dir():
        yield from _read_saved(local, src)
        return
    suffix = local.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for lineno, line in _json_lines(local):
            yield lineno, parse_document(line)
    elif suffix == ".json":
        try:
            text = local.read_text(encoding="utf-8-sig")  # -sig: a leading byte order mark is dropped
        except UnicodeDecodeError:
            raise _not_utf8(local, rows_are_lines=False) from None
        try:
            data = json.loads(text, object_pairs_hook=_object_marking_duplicates)
        except (json.JSONDecodeError, RecursionError) as exc:
            # A .json file may also be JSON lines. "Extra data" after a first value that parsed: JSON lines,
            # so a line that is not JSON is named by its own line; otherwise the whole file's error is.
            whole = (exc.lineno, exc.msg) if isinstance(exc, json.JSONDecodeError) else None
            lines = whole is not None and whole[1] == "Extra data"
            rows = []
            with local.open(encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((lineno, loads_row(line)))  # numbered by line, as a .jsonl file's
                    except DuplicateKey as dup:
                        rows.append((lineno, dup.bad_row()))
                    except json.JSONDecodeError as line_exc:
                        if whole is None:
                            raise DataError(
                                f"{local}: not valid JSON that can be read (nested too deeply to parse)"
                            ) from None
                        where, msg = (lineno, line_exc.msg) if lines else whole
                        raise DataError(f"{local}: not valid JSON (line {where}: {msg})") from None
                    except RecursionError:
                        raise DataError(
                            f"{local}: not valid JSON that can be read (line {lineno}: nested too deeply to parse). "
                            "Fix or remove that value."
                        ) from None
            yield from rows
            return
        if isinstance(data, dict) and "\n" not in text.strip() and detect_format(data) is not None:
            # one row on one line: JSON lines of one row, numbered by its line
            dup = _duplicate_in(data)
            yield text[: len(text) - len(text.lstrip())].count("\n") + 1, (dup.bad_row() if dup else data)
            return
        if isinstance(data, dict) and detect_format(data) is None and _rows_list(data.get("data")):
            # {"data": [...]}: the one wrapping this reader has always read (datasets' `field="data"`), and said
            log.info("data source %s: reading the %d rows under its key `data`", local, len(data["data"]))
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(_not_a_list(local, data))
        for i, row in enumerate(data, 1):
            dup = _duplicate_in(row)
            yield i, (dup.bad_row() if dup is not None else row)
    elif suffix == ".csv":
        yield from _read_csv(local)
    elif suffix == ".parquet":
        yield from _read_parquet(local)
    elif suffix in DECOMPRESS:
        plain = local.with_suffix("")
        raise DataError(
            f"data source {local}: a compressed file ({suffix}); qlora-sft reads data files uncompressed. "
            f"Decompress it (`{DECOMPRESS[suffix]} {local}`, which writes {plain}) and point `path:` at that file "
            f"(`- path: {plain}`), or convert it to .parquet, which is compressed inside."
        )
    else:
        raise DataError(
            f"data source {local}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet, .csv, "
            "or a datasets.save_to_disk folder"
        )


def _rows_list(value: Any) -> bool:
    """Whether `value` is a non-empty list of mappings (rows)."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _not_a_list(path: Path, data: Any) -> str:
    """The error for a .json file that holds one value other than a list of rows: what it holds, the
    shapes expected, and, for an object, what it looks like (one row, or the rows under a key other
    than `data`: named, never unwrapped by a guess)."""
    kind = {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
    said = (
        f"{path}: holds one JSON {kind}, not a list of rows: expected a JSON list of rows ([{{...}}, {{...}}]) "
        "or JSON lines (one row a line)"
    )
    if not isinstance(data, dict):
        return said + "."
    fmt = detect_format(data)
    if fmt is not None:
        return (
            f"{said}; it looks like one {fmt} row: put it in a list ([{{...}}]), or write it on one line (JSON "
            "lines), one line per row."
        )
    wrapped = {k: len(v) for k, v in data.items() if _rows_list(v)}
    if not wrapped:
        keys = sorted(str(k) for k in data)
        shown = f"{keys[:10]}{' ...' if len(keys) > 10 else ''}"
        return f"{said}; it has the keys {shown}, none of which holds a list of rows (mappings)."

    def mappings(n: int) -> str:
        return f"{n} mapping{'s' if n != 1 else ''}"

    first = next(iter(wrapped))
    select = f".{first}" if re.fullmatch(r"[A-Za-z_]\w*", first) else f'.["{first}"]'
    safe = re.sub(r"[^\w.-]", "_", first)
    rows_file = path.with_name(f"{path.stem}.{safe}.json")
    extract = f"`jq '{select}' {path} > {rows_file}`"
    if len(wrapped) == 1:
        return (
            f"{said}; its key `{first}` holds a list of {mappings(wrapped[first])}: if those are the rows, write "
            f"that list to a file of its own ({extract}) and point `path:` at it."
        )
    listed = ", ".join(f"`{k}` ({mappings(n)})" for k, n in list(wrapped.items())[:-1])
    last, n = list(wrapped.items())[-1]
    return (
        f"{said}; its keys {listed} and `{last}` ({mappings(n)}) hold lists of mappings: write each list of rows "
        f"to a file of its own ({extract}, and so on) and give each as a source of its own."
    )


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """A parquet file's rows, read from the file itself in batches. (Not datasets' `from_parquet`: it
    keeps an Arrow copy in the datasets cache under the file's path and modification time, and gave
    the old rows of a file edited with its time set back, `touch -r`, after the cache key had seen
    the edit.)"""
    import pyarrow.parquet as pq

    rowno = 0
    try:
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=1000):
                for row in batch.to_pylist():
                    rowno += 1
                    yield rowno, row
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError, ...)
        raise DataError(
            f"data source {path}: not a readable parquet file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
            + (f"; read to row {rowno}" if rowno else "")
            + "). Write it again (e.g. pandas' to_parquet or datasets' to_parquet), or give the rows as .jsonl."
        ) from None


# A CSV cell may hold a whole document: the csv module's default limit (128 KiB) is raised to this.
CSV_FIELD_LIMIT = min(sys.maxsize, (1 << 31) - 1)


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    """A CSV file's records as rows keyed by the header (strict: a quote that is not closed, or text
    after a closing quote, fails naming the line). A record with more or fewer fields than the header
    is a `BadRow` naming its line (a comma inside a field that is not quoted splits it in two)."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a leading byte order mark is dropped
        lines = _CountedLines(f)
        reader = csv.DictReader(lines, strict=True)
        try:
            header = reader.fieldnames or []
            # An unnamed column (empty or blank: a spreadsheet's trailing `,,`) is read by no format.
            twice = sorted({name for name in header if name.strip() and header.count(name) > 1})
            if twice:
                raise DataError(
                    f"{path} line 1: the header names the column `{twice[0]}` twice ({', '.join(header)}); each "
                    "record would keep only the last of them and drop the other in silence. Rename one of them "
                    "(or remove the column that is not wanted)."
                )
            lines.start = None
            for i, row in enumerate(reader, 1):
                start, lines.start = lines.start or lines.n, None
                yield i, _csv_record(row, header, start, lines.n)
        except UnicodeDecodeError:
            raise _not_utf8(path, rows_are_lines=False) from None
        except csv.Error as exc:
            start = lines.start or lines.n
            where = (
                f"line {start}"
                if start == lines.n
                else f"the record that starts on line {start} (read to line {lines.n})"
            )
            raise DataError(
                f"{path}: not valid CSV at {where} ({exc}). A field that holds a comma, a quote or a line break "
                'must be quoted, with each quote inside it doubled: "He said ""hi"", then left". Fix the line '
                "(pandas' to_csv or Python's csv module quote fields for you), or give the rows as .jsonl."
            ) from None


class _CountedLines:
    """A text file's lines, counted: `n` lines read, `start` the first one that is not blank since
    `start` was last set to None (where the CSV record being read begins)."""

    def __init__(self, f: Any):
        self.f, self.n, self.start = f, 0, None

    def __iter__(self) -> _CountedLines:
        return self

    def __next__(self) -> str:
        line = next(self.f)
        self.n += 1
        if self.start is None and line.strip("\r\n"):
            self.start = self.n
        return line


def _csv_record(row: dict[Any, Any], header: list[str], start: int, end: int) -> Any:
    """One CSV record as a row, or a `BadRow` when its field count is not the header's."""
    lines = f"line {start}" if start == end else f"lines {start}-{end}"
    n = len(header)
    if None in row:  # DictReader puts the fields beyond the header under the key None
        extra = row[None]
        got = n + len(extra)
        return BadRow(
            "csv_too_many_fields",
            f"{lines} has {got} fields but the header has {n} ({', '.join(header)}); the extra "
            f"{'field is' if len(extra) == 1 else 'fields are'} {', '.join(repr(x) for x in extra[:3])}"
            f"{' ...' if len(extra) > 3 else ''}. A field that holds a comma must be quoted "
            '("The sky is blue, mostly.")',
        )
    missing = [k for k, v in row.items() if v is None]  # DictReader fills the fields a short record lacks with None
    if missing:
        return BadRow(
            "csv_too_few_fields",
            f"{lines} has {n - len(missing)} fields but the header has {n} ({', '.join(header)}); "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. Give every field (an empty "
            "one as nothing between two commas), and quote a field that holds a line break",
        )
    return dict(row)


def _json_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8-sig") as f:  # -sig: a leading byte order mark is dropped
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line
        except UnicodeDecodeError:
            raise _not_utf8(path, rows_are_lines=True) from None


class DuplicateKey(ValueError):
    """A JSON object that gives one key twice (JSON would keep the last value and drop the other)."""

    def __init__(self, key: str, first: Any, last: Any):
        super().__init__(key)
        self.key, self.first, self.last = key, first, last

    def bad_row(self) -> BadRow:
        first, last = (_shown(v) for v in (self.first, self.last))
        return BadRow(
            "duplicate_key",
            f"the row gives `{self.key}` twice ({first} and {last}); JSON keeps only the last, so the other "
            "would be dropped in silence. Keep one of them (or give them different field names)",
        )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def detect_format(row: Any) -> str | None:
    """The format a row's fields say it is in (`formats`), or None."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def _object_refusing_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`' object_pairs_hook: a JSON object as a dict, `DuplicateKey` where a key comes twice."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DuplicateKey(key, seen[key], value)
            seen[key] = value
    return row


class _Duplicated(dict):
    """A JSON object that gave a key twice (`duplicate`: the `DuplicateKey`), where a whole .json file is
    parsed at once and the row that holds it is found afterwards (`_duplicate_in`)."""

    duplicate: DuplicateKey


def _object_marking_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    try:
        return _object_refusing_duplicates(pairs)
    except DuplicateKey as dup:
        marked = _Duplicated(pairs)
        marked.duplicate = dup
        return marked


def _duplicate_in(value: Any) -> DuplicateKey | None:
    """The first object given a key twice inside a value parsed with `_object_marking_duplicates`."""
    if isinstance(value, _Duplicated):
        return value.duplicate
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        found = _duplicate_in(child)
        if found is not None:
            return found
    return None


def loads_row(text: str) -> Any:
    """A row's JSON text parsed; `DuplicateKey` where one of its objects gives a key twice."""
    return json.loads(text, object_pairs_hook=_object_refusing_duplicates)


# The JSON text of a row that `read_source` found bad before it was JSON (a CSV record with the wrong
# number of fields): this prefix, then [reason, message]. Not JSON, so no data file's row is read as one.
BAD_ROW_PREFIX = "\x00qlora-sft bad row\x00"


def bad_row_document(bad: BadRow) -> str:
    """A `BadRow` as a row's JSON text (`parse_document` gives it back)."""
    return BAD_ROW_PREFIX + json.dumps([bad.reason, str(bad)])


def parse_document(document: str) -> Any:
    """A row from its JSON text; a BadRow when the text is not JSON (or is a `bad_row_document`)."""
    if document.startswith(BAD_ROW_PREFIX):
        reason, message = json.loads(document[len(BAD_ROW_PREFIX) :])
        return BadRow(reason, message)
    try:
        return loads_row(document)
    except DuplicateKey as dup:
        return dup.bad_row()
    except json.JSONDecodeError as exc:
        return BadRow("invalid_json", f"line is not valid JSON ({exc.msg})")
    except RecursionError:
        return BadRow("invalid_json", "line is not valid JSON that can be read (nested too deeply to parse)")


def read_documents(src: DataSource, base_dir: str | os.PathLike[str] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row number, the row as JSON text) from a source without holding it: JSON lines as they
    are in the file (parsed later, where the work is spread over processes), other rows serialised.
    `max_rows` limits the rows (`limited_rows`)."""
    if src.max_rows is not None:
        yield from limited_rows(src, lambda: _all_documents(src, base_dir))
        return
    yield from _all_documents(src, base_dir)


def limited_rows(src: DataSource, rows: Any) -> Iterator[Any]:
    """`data.sources[i].max_rows`: the first N rows of `rows()` (an iterator factory), or with
    `max_rows_seed` a seeded sample of N of them in their order (a first pass counts the rows)."""
    n = src.max_rows
    if src.max_rows_seed is None:
        yield from itertools.islice(rows(), n)
        return
    total = sum(1 for _ in rows())
    chosen = set(random.Random(src.max_rows_seed).sample(range(total), min(n, total)))
    yield from (row for i, row in enumerate(rows()) if i in chosen)


def limit_text(src: DataSource) -> str:
    """How a source's rows were limited, for the report ('' when every row is read)."""
    if src.max_rows is None:
        return ""
    if src.max_rows_seed is None:
        return f"the first {src.max_rows} rows (max_rows)"
    return f"a sample of {src.max_rows} rows drawn with seed {src.max_rows_seed} (max_rows, max_rows_seed)"


def _all_documents(src: DataSource, base_dir: str | os.PathLike[str] | None = None) -> Iterator[tuple[int, str]]:
    local = resolve_path(src.path, base_dir)
    if local is not None and local.is_file() and local.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _json_lines(local)
        return
    for rowno, row in read_source(src, base_dir):
        if isinstance(row, BadRow):
            yield rowno, bad_row_document(row)
            continue
        document = json.dumps(row, ensure_ascii=False, default=str)
        if not document.isascii():
            try:
                document.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud83d" in a .json file): escaped, refused later
                document = json.dumps(row, default=str)
        yield rowno, document


def _read_saved(folder: Path, src: DataSource) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(
            f"data source {folder}: a folder must be written by datasets' save_to_disk ({exc}){_folder_hint(folder)}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise DataError(f"data source {folder}: no split {src.split!r}; it has {sorted(ds)}")
        ds = ds[src.split]
    yield from enumerate(ds, 1)  # type: ignore[arg-type]


def _folder_hint(folder: Path) -> str:
    """What a folder that is not a datasets folder holds instead: its data files, or nothing."""
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError:
        return ""
    if not entries:
        return "; it is empty"
    files = [name for name in entries if Path(name).suffix.lower() in FILE_SUFFIXES]
    if files:
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        return f"; it holds {shown}: give each file as a source of its own (`- path: {folder / files[0]}`)"
    return ""


def _read_hub(src: DataSource) -> Iterator[tuple[int, Any]]:
    import datasets

    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    hint = "This machine looks offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). " if offline else ""
    try:
        ds = datasets.load_dataset(src.path, name=src.subset, split=src.split)
    except Exception as exc:
        raise DataError(
            f"data source {src.path!r} is not a local file or folder, and loading it as a hub dataset failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. {hint}"
            "Check the path, or download the dataset where a hub is reachable (datasets' save_to_disk) and "
            "point `path:` at the folder."
        ) from None
    yield from enumerate(ds, 1)  # type: ignore[arg-type]
