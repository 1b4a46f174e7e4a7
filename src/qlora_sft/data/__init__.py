"""Data: sources -> normalised chat messages -> tokens with a loss mask.

    read_source      local jsonl/json/parquet/csv, a save_to_disk folder, or a hub dataset id
    normalize_row    alpaca | dolly | sharegpt | messages | prompt_completion | text -> one example
    mix              weights or ratios, seeded
    tokenize_example chat template + assistant-only labels, truncation
    prepare_data     all of the above, main process first, cached on disk for the other ranks

Bad rows either stop the run naming source, row and problem (`on_bad_row: error`) or are skipped
and counted by reason (`on_bad_row: skip`).
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DataError
from ..recipe import DataConfig, DataSource

log = logging.getLogger("qlora_sft")

# Bump when the tokenised output for the same inputs changes, to invalidate caches.
CACHE_VERSION = "3"  # 2: assistant spans from generation markers, tool calls; 3: cache folder layout

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "tool": "tool",
    "ipython": "tool",
    "function": "tool",
}

FORMAT_FIELDS = {
    "alpaca": "instruction, input (optional), output",
    "dolly": "instruction, context (optional), response",
    "sharegpt": "conversations: [{from, value}, ...]",
    "messages": "messages: [{role, content}, ...]",
    "prompt_completion": "prompt, completion",
    "text": "text",
}


def eval_rows_held_out(rows: int, fraction: float) -> int:
    """Rows of the mix held out for evaluation with `data.eval_fraction` (at least one when the
    fraction is set, never all)."""
    if fraction <= 0 or rows < 2:
        return 0
    return min(rows - 1, max(1, math.floor(rows * fraction)))


# Named chat templates for base models without one. Each renders a conversation so that the text
# up to an assistant turn (with the generation prompt) is a prefix of the text through that turn:
# that is how the assistant spans are found.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short key for counting, the message explains."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Example:
    """One normalised row: chat `messages`, or plain `text`; with where it came from."""

    messages: list[dict[str, Any]] | None  # role, content (+ tool_calls on assistant turns, name on tool turns)
    text: str | None
    source: str
    row: int


@dataclass
class SourceReport:
    path: str
    format: str
    rows: int = 0
    kept: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    limit: str = ""  # data.sources[i].max_rows, as text ("" = every row read)


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0
    tokens_mean: float = 0.0
    tokens_p95: int = 0
    tokens_max: int = 0
    tokens_total: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    loss_token_fraction: float = 0.0
    eos_trained_fraction: float = 0.0
    end_token: str = ""
    streamed_sample: int = 0  # streaming: the statistics describe the first rows only
    chat_rows: int = 0  # train rows that are conversations (the end-token fraction counts these)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        d = dict(d)
        d["sources"] = [SourceReport(**s) for s in d.get("sources", [])]
        return cls(**d)

    def lines(self) -> list[str]:
        out = []
        for s in self.sources:
            skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())) or "none"
            out.append(
                f"source {s.path} [{s.format}]: {s.rows} rows{f' ({s.limit})' if s.limit else ''}, {s.kept} kept, "
                f"{s.used} used in the mix, skipped: {skipped}"
            )
        if self.streamed_sample:
            out.append(
                "streaming: training rows are read and tokenized as training goes (their number is unknown); "
                f"the figures here describe the first {self.streamed_sample} rows of each source"
            )
            out.append(f"split: train rows as the stream yields them, {self.eval_rows} eval rows")
        else:
            out.append(f"split: {self.train_rows} train rows, {self.eval_rows} eval rows")
        out.append(
            f"tokens per train example: mean {self.tokens_mean:.1f}, p95 {self.tokens_p95}, max "
            f"{self.tokens_max}, total {self.tokens_total}; truncated rows: {self.truncated}"
            + (f"; dropped (no trained tokens left): {self.dropped_no_loss}" if self.dropped_no_loss else "")
        )
        out.append(f"fraction of tokens that carry loss: {self.loss_token_fraction:.1%}")
        if self.end_token:
            out.append(
                f"examples whose final assistant turn trains its end token {self.end_token!r}: "
                f"{self.eos_trained_fraction:.1%}"
            )
            if self.chat_rows and 0 < self.eos_trained_fraction < EOS_WARN_BELOW:
                out.append(
                    f"warning: {1 - self.eos_trained_fraction:.1%} of the conversations train no end token "
                    f"{self.end_token!r} (truncated, or a template that does not end the assistant turn with it): "
                    "the model learns to stop from the rest only"
                )
        return out


# Below this fraction of conversations that train their end-of-turn token, the report warns; at 0 a
# recipe is refused (`check_end_tokens`).
EOS_WARN_BELOW = 0.95


def check_end_tokens(report: DataReport, cfg: DataConfig) -> None:
    """Refuse training data in which no conversation trains the end-of-turn token (the model would
    never learn to stop), unless `data.allow_no_eos`. Rows in `text` format are not counted."""
    if not report.chat_rows or report.eos_trained_fraction > 0 or cfg.allow_no_eos:
        return
    raise DataError(
        f"none of the {report.chat_rows} conversations trains the end-of-turn token {report.end_token!r}: the "
        "chat template does not end assistant turns with a token the tokenizer has (or every row is truncated "
        "before it), so the model would never learn to stop. Use a template whose end token is in the tokenizer "
        "(data.chat_template: auto for models with their own template; chatml, llama2 or alpaca for base models; "
        "`qlora-sft validate` shows what is trained), or, for continued-pretraining style data, set "
        "data.allow_no_eos: true"
    )


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------

FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".ndjson"}


def resolve_path(path: str, base_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """A local path as given (relative to the working directory), else relative to `base_dir`
    (the recipe's folder); None when it exists in neither place."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if base_dir is not None and not p.is_absolute():
        q = Path(base_dir) / p
        if q.exists():
            return q
    return None


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
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # A .json file may also be JSON lines.
            rows = []
            with local.open(encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as line_exc:
                        # "Extra data" after a first value that parsed: JSON lines, so name the line that is not
                        where, msg = (lineno, line_exc.msg) if exc.msg == "Extra data" else (exc.lineno, exc.msg)
                        raise DataError(f"{local}: not valid JSON (line {where}: {msg})") from None
            yield from enumerate(rows, 1)
            return
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if "data" in data and isinstance(data["data"], list):
                data = data["data"]
            elif len(lists) == 1:
                data = lists[0]
            else:
                raise DataError(f'{local}: expected a JSON list of rows (or {{"data": [...]}})')
        if not isinstance(data, list):
            raise DataError(f"{local}: expected a JSON list of rows, got {type(data).__name__}")
        yield from enumerate(data, 1)
    elif suffix == ".csv":
        with local.open(encoding="utf-8-sig", newline="") as f:  # -sig: a leading byte order mark is dropped
            try:
                for i, row in enumerate(csv.DictReader(f), 1):
                    yield i, dict(row)
            except UnicodeDecodeError:
                raise _not_utf8(local, rows_are_lines=False) from None
    elif suffix == ".parquet":
        import datasets

        try:
            ds = datasets.Dataset.from_parquet(str(local))
        except Exception as exc:
            raise DataError(
                f"data source {local}: not a readable parquet file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Write it again (e.g. pandas' to_parquet or "
                "datasets' to_parquet), or give the rows as .jsonl."
            ) from None
        yield from enumerate(ds, 1)  # type: ignore[arg-type]
    else:
        raise DataError(
            f"data source {local}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet, .csv, "
            "or a datasets.save_to_disk folder"
        )


def _json_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8-sig") as f:  # -sig: a leading byte order mark is dropped
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line
        except UnicodeDecodeError:
            raise _not_utf8(path, rows_are_lines=True) from None


def parse_document(document: str) -> Any:
    """A row from its JSON text; a BadRow when the text is not JSON."""
    try:
        return json.loads(document)
    except json.JSONDecodeError as exc:
        return BadRow("invalid_json", f"line is not valid JSON ({exc.msg})")


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
        yield rowno, json.dumps(row, ensure_ascii=False, default=str)


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


# --------------------------------------------------------------------------------------------
# Normalising rows
# --------------------------------------------------------------------------------------------


def detect_format(row: Any) -> str | None:
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


def _text_field(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise BadRow("missing_field", f"missing field `{key}`")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field `{key}` must be a string, got {type(value).__name__}")
    return value


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise BadRow("wrong_type", f"{where}: only text content parts are supported")
        return "".join(parts)
    raise BadRow("wrong_type", f"{where}: content must be a string, got {type(value).__name__}")


def _turns(turns: Any, role_key: str, content_key: str, field_name: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"field `{field_name}` must be a list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        where = f"`{field_name}[{i}]`"
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"{where} must be a mapping")
        calls = turn.get("tool_calls")
        if role_key not in turn or (content_key not in turn and not calls):
            raise BadRow("missing_field", f"{where} needs `{role_key}` and `{content_key}`")
        raw_role = turn[role_key]
        role = ROLE_ALIASES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise BadRow(
                "unknown_role",
                f"`{field_name}[{i}].{role_key}` is {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}",
            )
        content = turn.get(content_key)
        message: dict[str, Any] = {"role": role, "content": "" if content is None else _content(content, where)}
        if calls:
            if role != "assistant":
                raise BadRow("wrong_type", f"{where}: only assistant turns carry `tool_calls`")
            message["tool_calls"] = _tool_calls(calls, where)
        if role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(turn.get(key), str):
                    message[key] = turn[key]
        out.append(message)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls: [{"type": "function", "function": {"name": ..., "arguments": {...}}}]
    (arguments as an object or a JSON string; a bare {"name", "arguments"} is accepted too)."""
    if not isinstance(calls, list):
        raise BadRow("wrong_type", f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRow("wrong_type", f"{where}.tool_calls[{j}] needs a function name")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise BadRow("wrong_type", f"{where}.tool_calls[{j}].arguments is not JSON") from None
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def check_conversation(messages: list[dict[str, Any]]) -> None:
    """Optional system first, then user and assistant turns alternating, ending with an assistant
    turn; an assistant turn with tool calls is followed by the tools' results (role `tool`), then by
    the assistant again."""
    if not messages:
        raise BadRow("empty", "no turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise BadRow("roles_out_of_order", "a system turn may only come first")
    if not body:
        raise BadRow("no_assistant_turn", "no user/assistant turns")
    order = " -> ".join(t["role"] for t in messages)
    expected = "user"
    for m in body:
        role = m["role"]
        if role == "tool":
            if expected not in ("tool", "tool or assistant"):
                raise BadRow("roles_out_of_order", f"a tool result without a tool call before it ({order})")
            expected = "tool or assistant"
        elif expected == "tool or assistant" and role == "assistant":
            expected = "tool" if m.get("tool_calls") else "user"
        elif role != expected:
            raise BadRow(
                "roles_out_of_order",
                f"roles out of order ({order}); expected user/assistant alternating, tool results after tool calls",
            )
        elif role == "assistant":
            expected = "tool" if m.get("tool_calls") else "user"
        else:
            expected = "assistant"
    if body[-1]["role"] != "assistant":
        raise BadRow("no_assistant_turn", "the conversation does not end with an assistant turn")
    for m in body:
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise BadRow("empty_assistant_turn", "an assistant turn is empty")
        if m["role"] == "user" and not m["content"].strip():
            raise BadRow("empty_user_turn", "a user turn is empty")


def normalize_row(
    row: Any, fmt: str, system_prompt: str | None = None
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """One raw row -> (messages, None) or (None, text). Raises BadRow."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row must be a mapping of fields, got {type(row).__name__}")
    if fmt == "text":
        text = _text_field(row, "text")
        if not text.strip():
            raise BadRow("empty_text", "field `text` is empty")
        return None, text
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", required=False)
        output = _text_field(row, "output")
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "dolly":
        instruction = _text_field(row, "instruction")
        context = _text_field(row, "context", required=False)
        response = _text_field(row, "response")
        user = instruction + (f"\n\n{context}" if context.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    elif fmt == "sharegpt":
        if "conversations" not in row:
            raise BadRow("missing_field", "missing field `conversations`")
        messages = _turns(row["conversations"], "from", "value", "conversations")
        if (
            isinstance(row.get("system"), str)
            and row["system"].strip()
            and (not messages or messages[0]["role"] != "system")
        ):
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "messages":
        if "messages" not in row:
            raise BadRow("missing_field", "missing field `messages`")
        messages = _turns(row["messages"], "role", "content", "messages")
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in row or row[key] is None:
                raise BadRow("missing_field", f"missing field `{key}`")
        prompt, completion = row["prompt"], row["completion"]
        p_msgs = (
            _turns(prompt, "role", "content", "prompt")
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text_field(row, "prompt")}]
        )
        c_msgs = (
            _turns(completion, "role", "content", "completion")
            if isinstance(completion, list)
            else [{"role": "assistant", "content": _text_field(row, "completion")}]
        )
        messages = p_msgs + c_msgs
    else:  # pragma: no cover - formats are validated by the recipe
        raise ValueError(fmt)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    check_conversation(messages)
    return messages, None


def source_format(src: DataSource, first_row: Any, rowno: int) -> str:
    """The source's format: as set, or detected from its first row."""
    if src.format != "auto":
        return src.format
    if isinstance(first_row, BadRow):  # not JSON: there are no fields to tell the format from
        raise DataError(
            f"{src.path} row {rowno}: {first_row}; the format is detected from the first row. Fix the row, or "
            "set `format:` on this source (then data.on_bad_row decides what happens to it)."
        )
    detected = detect_format(first_row)
    if detected is None:
        keys = sorted(first_row) if isinstance(first_row, dict) else type(first_row).__name__
        raise DataError(
            f"{src.path} row {rowno}: cannot tell the format from its fields {keys}. Set "
            "`format:` on this source to one of: " + "; ".join(f"{k} ({v})" for k, v in FORMAT_FIELDS.items())
        )
    return detected


def bad_row_error(path: str, rowno: int, fmt: str, message: str) -> DataError:
    return DataError(
        f"{path} row {rowno}: {message} (format {fmt}: {FORMAT_FIELDS[fmt]}). Fix the row, or set "
        "data.on_bad_row=skip to drop bad rows and see counts by reason."
    )


def iter_examples(
    src: DataSource, on_bad_row: str, report: SourceReport, base_dir: str | os.PathLike[str] | None = None
) -> Iterator[Example]:
    """A source's rows, normalised one at a time; bad rows raise DataError or are counted in
    `report`, per `on_bad_row`."""
    fmt = ""
    for rowno, document in read_documents(src, base_dir):
        row = parse_document(document)
        if not fmt:
            fmt = report.format = source_format(src, row, rowno)
        report.rows += 1
        try:
            messages, text = normalize_row(row, fmt, src.system_prompt)
        except BadRow as bad:
            if on_bad_row == "error":
                raise bad_row_error(src.path, rowno, fmt, str(bad)) from None
            report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
            continue
        report.kept += 1
        yield Example(messages, text, src.path, rowno)
    if report.rows == 0:
        raise DataError(f"data source {src.path} has no rows")


def load_examples(
    sources: Sequence[DataSource], on_bad_row: str, base_dir: str | os.PathLike[str] | None = None
) -> tuple[list[list[Example]], list[SourceReport]]:
    """Every source's examples in memory (small data, tests; `build_data` streams instead)."""
    reports = [SourceReport(path=src.path, format=src.format) for src in sources]
    per_source = [list(iter_examples(src, on_bad_row, r, base_dir)) for src, r in zip(sources, reports, strict=True)]
    return per_source, reports


T = TypeVar("T")


def mix_counts(kept: Sequence[int], sources: Sequence[DataSource]) -> list[int]:
    """Rows each source gives the mix: by `ratio` (shares of the result, the largest mix without
    repetition) or by `weight` (weight x rows)."""
    if all(s.ratio is not None for s in sources):
        total = min((n / s.ratio) for n, s in zip(kept, sources, strict=True) if s.ratio)
        return [min(n, round(total * (s.ratio or 0))) for n, s in zip(kept, sources, strict=True)]
    return [round(n * s.weight) for n, s in zip(kept, sources, strict=True)]


def mix(per_source: Sequence[Sequence[T]], sources: Sequence[DataSource], seed: int) -> tuple[list[T], list[int]]:
    """Mix sources by `mix_counts` (fractions sample without replacement, whole parts repeat), seeded;
    returns (mixed rows, rows used per source). Rows may be examples or their positions."""
    rng = random.Random(seed)
    counts = mix_counts([len(rows) for rows in per_source], sources)
    mixed: list[T] = []
    for rows, n in zip(per_source, counts, strict=True):
        if not rows:
            continue
        whole, rest = divmod(n, len(rows))
        mixed.extend(list(rows) * whole)
        mixed.extend(rng.sample(list(rows), rest))
    rng.shuffle(mixed)
    return mixed, counts


# --------------------------------------------------------------------------------------------
# Chat templates and tokenisation
# --------------------------------------------------------------------------------------------


def set_chat_template(
    tokenizer: Any, choice: str, model_name: str, base_dir: str | os.PathLike[str] | None = None
) -> None:
    """Give the tokenizer the recipe's chat template (`auto` keeps its own)."""
    if choice == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"the tokenizer of {model_name} has no chat template. Set data.chat_template to one of "
                f"{sorted(CHAT_TEMPLATES)} (or a .jinja file), or use format: text data."
            )
        return
    if choice in CHAT_TEMPLATES:
        if choice == "chatml":
            vocab = tokenizer.get_vocab()
            missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
            if missing:
                raise DataError(
                    f"data.chat_template=chatml needs the tokens {missing}, which the tokenizer of {model_name} "
                    "lacks. Use llama2 or alpaca (they use the tokenizer's own BOS/EOS)."
                )
        tokenizer.chat_template = CHAT_TEMPLATES[choice]
        return
    path = resolve_path(choice, base_dir)
    if path is None or not path.is_file():
        raise DataError(
            f"data.chat_template is {choice!r}: not auto, not one of {sorted(CHAT_TEMPLATES)}, and not a file"
        )
    tokenizer.chat_template = path.read_text(encoding="utf-8")


def end_of_turn_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn in the rendered template (what generation stops on)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        ids = tokenizer.apply_chat_template(probe, tokenize=True, add_generation_prompt=False, return_dict=False)
    except Exception:
        return tokenizer.eos_token or ""
    special = set(tokenizer.all_special_ids)
    for tid in reversed(list(ids)):
        if tid in special:
            return tokenizer.convert_ids_to_tokens(tid)
    return tokenizer.eos_token or ""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


_MARKED_TEMPLATES: dict[str, str | None] = {}


def marked_template(tokenizer: Any) -> str | None:
    """A chat template with `{% generation %}` markers around the assistant turns, which tells exactly
    which tokens are the assistant's however the template renders earlier turns: the tokenizer's own
    if it has them, else TRL's training variant of it (Qwen3, Llama 3, Gemma, DeepSeek, ... ship in
    TRL), else None (the assistant spans are then found by rendering prefixes)."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return None
    if template not in _MARKED_TEMPLATES:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        if has_generation_markers(template):
            _MARKED_TEMPLATES[template] = template
        else:
            try:
                _MARKED_TEMPLATES[template] = get_training_chat_template(tokenizer)
            except Exception:  # a template TRL has no variant of, or cannot inspect
                _MARKED_TEMPLATES[template] = None
    return _MARKED_TEMPLATES[template]


def _marked(ex: Example, tokenizer: Any, template: str, keep_text: bool) -> Tokenized:
    """Token ids with the tokens inside the template's generation markers as labels (untruncated)."""
    assert ex.messages is not None
    marked = tokenizer.apply_chat_template(
        ex.messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(marked["input_ids"])
    labels = [tid if keep else -100 for tid, keep in zip(ids, marked["assistant_masks"], strict=True)]
    if not keep_text:
        return Tokenized(ids, labels, False)
    text = tokenizer.apply_chat_template(ex.messages, chat_template=template, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:  # pragma: no cover - the same text, tokenized the same way
        raise DataError(f"{ex.source} row {ex.row}: the chat template's tokens differ between two renderings")
    return Tokenized(ids, labels, False, text, [tuple(o) for o in enc["offset_mapping"]])


def _assistant_spans(ex: Example, tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (with their end-of-turn text) in the rendered `text`,
    from rendering the conversation up to and through each assistant turn."""
    assert ex.messages is not None
    spans: list[tuple[int, int]] = []
    last = len(ex.messages) - 1
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, ex.messages[:i], True)
        through = text if i == last else _render(tokenizer, ex.messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{ex.source} row {ex.row}: the chat template does not render conversations "
                "incrementally (the text up to an assistant turn is not a prefix of the full "
                "text) and has no {% generation %} markers (nor does TRL ship a training variant "
                "of it), so the assistant spans cannot be found. Use a template with generation "
                "markers (data.chat_template: path/to/template.jinja) or data.assistant_only_loss=false."
            )
        spans.append((len(before), len(through)))
    return spans


def _span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels: the ids of tokens that overlap a span, -100 elsewhere."""
    import numpy as np

    if not ids:
        return []
    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    inside = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        inside |= (o[:, 0] < end) & (o[:, 1] > start)
    return np.where(inside, np.asarray(ids, dtype=np.int64), -100).tolist()


def tokenize_batch(
    examples: Sequence[Example], tokenizer: Any, max_length: int, assistant_only_loss: bool, keep_text: bool = False
) -> list[Tokenized]:
    """Render with the chat template and tokenize; label assistant spans (or everything); truncate.
    The assistant spans come from the template's generation markers where it has them (or TRL has a
    training variant of it), else from rendering the conversation up to each assistant turn. Texts
    are tokenized together (one call per batch)."""
    out: list[Tokenized | None] = [None] * len(examples)
    template = marked_template(tokenizer) if assistant_only_loss else None
    plain: list[int] = []  # plain-text rows
    chats: list[tuple[int, str, list[tuple[int, int]] | None]] = []  # (index, text, spans) to tokenize here
    for i, ex in enumerate(examples):
        if ex.text is not None:
            plain.append(i)
        elif template is not None:
            out[i] = _marked(ex, tokenizer, template, keep_text)
        else:
            text = _render(tokenizer, ex.messages or [], False)
            chats.append((i, text, _assistant_spans(ex, tokenizer, text) if assistant_only_loss else None))
    if plain:
        texts = [examples[i].text or "" for i in plain]
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=keep_text)
        for k, i in enumerate(plain):
            ids = list(enc["input_ids"][k])
            offsets = [tuple(o) for o in enc["offset_mapping"][k]] if keep_text else []
            if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)
                offsets.append((len(texts[k]), len(texts[k])))
            out[i] = Tokenized(ids, list(ids), False, texts[k] if keep_text else "", offsets)
    if chats:
        enc = tokenizer([t for _, t, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
        for k, (i, text, spans) in enumerate(chats):
            ids = list(enc["input_ids"][k])
            offsets = [tuple(o) for o in enc["offset_mapping"][k]]
            labels = _span_labels(ids, offsets, spans) if spans is not None else list(ids)
            out[i] = Tokenized(ids, labels, False, text if keep_text else "", offsets if keep_text else [])
    result: list[Tokenized] = []
    for tok in out:
        assert tok is not None
        n = len(tok.input_ids)
        result.append(
            Tokenized(
                tok.input_ids[:max_length],
                tok.labels[:max_length],
                n > max_length,
                tok.text,
                tok.offsets[:max_length] if keep_text else [],
            )
        )
    return result


def tokenize_example(
    ex: Example, tokenizer: Any, max_length: int, assistant_only_loss: bool, keep_text: bool = False
) -> Tokenized:
    """`tokenize_batch` of one example."""
    return tokenize_batch([ex], tokenizer, max_length, assistant_only_loss, keep_text)[0]


def mark_trained(tok: Tokenized, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The rendered text with the trained (labelled) spans wrapped in markers."""
    out, pos, i = [], 0, 0
    n = len(tok.input_ids)
    while i < n:
        if tok.labels[i] == -100:
            i += 1
            continue
        j = i
        while j + 1 < n and tok.labels[j + 1] != -100:
            j += 1
        start, end = tok.offsets[i][0], tok.offsets[j][1]
        out.append(tok.text[pos:start])
        out.append(open_mark + tok.text[start:end] + close_mark)
        pos = end
        i = j + 1
    last = tok.offsets[n - 1][1] if n else 0
    out.append(tok.text[pos:last])
    if last < len(tok.text):
        out.append(f"<<truncated: {len(tok.text) - last} more characters>>")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset (or IterableDataset, streaming) with input_ids, labels
    eval: Any | None
    report: DataReport
    cache: str = ""  # the cache folder it was loaded from
    built: dict[str, Any] = field(default_factory=dict)  # who built the cache, when, in how long
    found: bool = False  # the cache existed before this process asked for it

    def origin(self) -> str:
        """Where the data came from, for the log."""
        if self.report.streamed_sample:
            return "streamed: rows are read and tokenized as training consumes them" + (
                f"; eval rows from {self.cache}" if self.cache else ""
            )
        if not self.cache:
            return "built in memory (not cached)"
        b = self.built
        how = f"by `qlora-sft {b.get('by', 'train')}` on {b.get('host', '?')} at {b.get('at', '?')}"
        how += f" in {b.get('seconds', '?')} s"
        return f"{'found' if self.found else 'using'} the prepared cache {self.cache} (built {how})"


# Worker processes tokenize shards of at least this many rows (fewer rows: no workers, whose start
# costs more than they save).
ROWS_PER_PROCESS = 2000
ENCODE_BATCH = 500  # rows per tokenizer call in the workers
DOCUMENT_BATCH = 10_000  # rows per Arrow record batch while reading a source


def resolve_num_proc(num_proc: int | str) -> int:
    """`data.num_proc`: `auto` is every core this process may run on (its CPU affinity: what SLURM
    or taskset gave it)."""
    if num_proc != "auto":
        return int(num_proc)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _encoded_features() -> Any:
    import datasets

    ids = datasets.List(datasets.Value("int64"))
    return datasets.Features(
        {
            "row": datasets.Value("int64"),
            "bad": datasets.Value("string"),  # why the row was skipped ("" = used)
            "input_ids": ids,
            "labels": ids,
            "loss_tokens": datasets.Value("int64"),
            "truncated": datasets.Value("bool"),
            "end_trained": datasets.Value("int8"),  # 1/0: the final turn trains its end token; -1: n/a
        }
    )


def _encode_kwargs(src: DataSource, fmt: str, cfg: DataConfig, tokenizer: Any, end_id: int | None) -> dict[str, Any]:
    """`encode_documents`' settings for one source (the Arrow pipeline's and the stream's)."""
    return {
        "path": src.path,
        "fmt": fmt,
        "system_prompt": src.system_prompt,
        "on_bad_row": cfg.on_bad_row,
        "tokenizer": tokenizer,
        "max_length": cfg.max_length,
        "assistant_only_loss": cfg.assistant_only_loss,
        "end_id": end_id,
    }


def encode_documents(
    batch: dict[str, list[Any]],
    *,
    path: str,
    fmt: str,
    system_prompt: str | None,
    on_bad_row: str,
    tokenizer: Any,
    max_length: int,
    assistant_only_loss: bool,
    end_id: int | None,
) -> dict[str, list[Any]]:
    """A batch of (row, document) -> tokens, labels and what the report counts (`datasets.map`)."""
    examples: list[Example] = []
    reasons: list[str] = []
    for rowno, document in zip(batch["row"], batch["document"], strict=True):
        try:
            messages, text = normalize_row(parse_document(document), fmt, system_prompt)
        except BadRow as bad:
            if on_bad_row == "error":
                raise bad_row_error(path, rowno, fmt, str(bad)) from None
            reasons.append(bad.reason)
            continue
        examples.append(Example(messages, text, path, rowno))
        reasons.append("")
    tokens = iter(zip(examples, tokenize_batch(examples, tokenizer, max_length, assistant_only_loss), strict=True))
    out: dict[str, list[Any]] = {k: [] for k in _encoded_features()}
    for rowno, reason in zip(batch["row"], reasons, strict=True):
        out["row"].append(rowno)
        out["bad"].append(reason)
        if reason:
            for key, empty in (("input_ids", []), ("labels", []), ("loss_tokens", 0), ("truncated", False)):
                out[key].append(empty)
            out["end_trained"].append(-1)
            continue
        ex, tok = next(tokens)
        trained = [i for i, x in enumerate(tok.labels) if x != -100]
        end = -1
        if ex.messages is not None and not tok.truncated and trained:
            # The final labelled tokens must include the end-of-turn token (trailing whitespace
            # after it may be labelled too).
            last = trained[-1]
            end = int(end_id is not None and end_id in tok.labels[max(0, last - 2) : last + 1])
        out["input_ids"].append(tok.input_ids)
        out["labels"].append(tok.labels)
        out["loss_tokens"].append(len(trained))
        out["truncated"].append(tok.truncated)
        out["end_trained"].append(end)
    return out


def _write_documents(src: DataSource, base_dir: str | os.PathLike[str] | None, path: Path) -> Any:
    """A source's rows as JSON text in an Arrow file, written in record batches (memory does not
    grow with the rows)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    features = datasets.Features({"row": datasets.Value("int64"), "document": datasets.Value("large_string")})
    with ArrowWriter(features=features, path=str(path)) as writer:
        rows: list[int] = []
        documents: list[str] = []
        for rowno, document in read_documents(src, base_dir):
            rows.append(rowno)
            documents.append(document)
            if len(rows) >= DOCUMENT_BATCH:
                writer.write_batch({"row": rows, "document": documents})
                rows, documents = [], []
        if rows:
            writer.write_batch({"row": rows, "document": documents})
        count, _ = writer.finalize()
    if count == 0:
        raise DataError(f"data source {src.path} has no rows")
    return datasets.Dataset.from_file(str(path))


@dataclass
class _Encoded:
    """One source, tokenized: its documents and encoded rows (Arrow, under the work folder)."""

    src: DataSource
    documents: Any
    tokens: Any
    report: SourceReport


def _encode_source(
    src: DataSource,
    name: str,
    cfg: DataConfig,
    tokenizer: Any,
    end_id: int | None,
    base_dir: str | os.PathLike[str] | None,
    work: Path,
) -> _Encoded:
    """One source read and tokenized by `data.num_proc` processes."""
    import pyarrow.compute as pc

    report = SourceReport(path=src.path, format=src.format, limit=limit_text(src))
    started = time.perf_counter()
    documents = _write_documents(src, base_dir, work / f"{name}-documents.arrow")
    report.rows = len(documents)
    first = documents[0]
    fmt = report.format = source_format(src, parse_document(first["document"]), first["row"])
    workers = min(resolve_num_proc(cfg.num_proc), max(1, report.rows // ROWS_PER_PROCESS))
    log.info("data: %s: %d rows read; tokenizing with %d process(es)", src.path, report.rows, workers)
    encoded = documents.map(
        encode_documents,
        batched=True,
        batch_size=ENCODE_BATCH,
        num_proc=workers if workers > 1 else None,
        fn_kwargs=_encode_kwargs(src, fmt, cfg, tokenizer, end_id),
        remove_columns=["document"],
        features=_encoded_features(),
        cache_file_name=str(work / f"{name}-tokens.arrow"),
        load_from_cache_file=False,
        new_fingerprint=f"{name}-{os.getpid()}-{time.time_ns()}",
        desc=f"tokenizing {src.path}",
    )
    bad = encoded.data.column("bad")
    for entry in pc.value_counts(pc.filter(bad, pc.not_equal(bad, ""))).to_pylist():
        report.skipped[entry["values"]] = int(entry["counts"])
    report.kept = report.rows - sum(report.skipped.values())
    log.info(
        "data: %s: %d rows tokenized in %.0f s (%.0f rows/s)",
        src.path,
        report.rows,
        time.perf_counter() - started,
        report.rows / max(1e-9, time.perf_counter() - started),
    )
    return _Encoded(src, documents, encoded, report)


def _scratch_folder() -> Path:
    """A temporary folder for `build_data`'s Arrow files, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="qlora-sft-data-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _column(dataset: Any, name: str) -> Any:
    """One column of an Arrow-backed dataset as a numpy array (lists: their lengths)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = dataset.data.column(name)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.list_value_length(column)
    return column.to_numpy()


def _no_loss_error(cfg: DataConfig, tokenizer: Any, parts: list[_Encoded], position: int) -> DataError:
    """The error for a used row without trained tokens (`position` in the parts' concatenation),
    with its untruncated length."""
    for part in parts:
        if position >= len(part.documents):
            position -= len(part.documents)
            continue
        src, doc = part.src, part.documents[position]
        messages, text = normalize_row(parse_document(doc["document"]), part.report.format, src.system_prompt)
        ex = Example(messages, text, src.path, doc["row"])
        full = tokenize_example(ex, tokenizer, 10**9, cfg.assistant_only_loss)
        return DataError(
            f"{src.path} row {doc['row']}: no trained tokens are left after truncation to "
            f"data.max_length={cfg.max_length} (the row has {len(full.input_ids)} tokens). "
            "Raise data.max_length, shorten the row, or set data.on_bad_row=skip."
        )
    raise AssertionError(position)  # pragma: no cover


def _token_stats(report: DataReport, lengths: Any, loss: Any, truncated: Any, end: Any) -> None:
    """The report's token statistics from the used train rows' lengths, trained-token counts,
    truncation flags and end-token flags (numpy arrays, one entry per row)."""
    import numpy as np

    report.tokens_total = int(lengths.sum())
    report.tokens_mean = report.tokens_total / len(lengths)
    report.tokens_max = int(lengths.max())
    report.tokens_p95 = int(np.sort(lengths)[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)])
    report.truncated = int(truncated.sum())
    report.loss_token_fraction = int(loss.sum()) / report.tokens_total
    chat_rows = report.chat_rows = int((end >= 0).sum())
    report.eos_trained_fraction = int((end == 1).sum()) / chat_rows if chat_rows else 0.0


def build_data(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    base_dir: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> PreparedData:
    """Read, normalise, tokenize, mix and split (no caching; see `prepare_data`). Rows stream from
    the sources into Arrow files under `workdir` (a temporary folder by default), are tokenized by
    `data.num_proc` processes, and are mixed and split as row positions: memory does not grow with
    the number of rows. The datasets returned read from `workdir`."""
    import datasets
    import numpy as np

    work = Path(workdir) if workdir is not None else _scratch_folder()
    work.mkdir(parents=True, exist_ok=True)
    report = DataReport(end_token=end_of_turn_token(tokenizer))
    end_id = tokenizer.convert_tokens_to_ids(report.end_token) if report.end_token else None
    parts = [
        _encode_source(src, f"train-{i}", cfg, tokenizer, end_id, base_dir, work) for i, src in enumerate(cfg.sources)
    ]
    report.sources = [p.report for p in parts]
    kept, offset = [], 0
    for p in parts:
        kept.append((np.flatnonzero(_column(p.tokens, "bad") == "") + offset).tolist())
        offset += len(p.tokens)
    mixed, counts = mix(kept, cfg.sources, seed)
    del kept
    for r, n in zip(report.sources, counts, strict=True):
        r.used = n
    train_all = datasets.concatenate_datasets([p.tokens for p in parts])
    if cfg.eval_sources:
        eval_parts = [
            _encode_source(src, f"eval-{i}", cfg, tokenizer, end_id, base_dir, work)
            for i, src in enumerate(cfg.eval_sources)
        ]
        for p in eval_parts:
            p.report.used = p.report.kept
            p.report.path = f"{p.report.path} (eval)"
        report.sources += [p.report for p in eval_parts]
        eval_all = datasets.concatenate_datasets([p.tokens for p in eval_parts])
        eval_idx = np.flatnonzero(_column(eval_all, "bad") == "")
        train_idx = np.asarray(mixed, dtype=np.int64)
    else:
        n_eval = eval_rows_held_out(len(mixed), cfg.eval_fraction)
        eval_all, eval_parts = train_all, parts
        eval_idx = np.asarray(mixed[:n_eval], dtype=np.int64)
        train_idx = np.asarray(mixed[n_eval:], dtype=np.int64)
    del mixed

    # Rows with no trained tokens left (truncation cut every assistant token): an error, or dropped.
    train_loss = _column(train_all, "loss_tokens")
    eval_loss = train_loss if eval_all is train_all else _column(eval_all, "loss_tokens")
    for idx, loss, split_parts in ((train_idx, train_loss, parts), (eval_idx, eval_loss, eval_parts)):
        empty = np.flatnonzero(loss[idx] == 0)
        if cfg.on_bad_row == "error" and len(empty):
            raise _no_loss_error(cfg, tokenizer, split_parts, int(idx[empty[0]]))
    report.dropped_no_loss = int((train_loss[train_idx] == 0).sum())
    train_idx = train_idx[train_loss[train_idx] > 0]
    eval_idx = eval_idx[eval_loss[eval_idx] > 0]
    if not len(train_idx):
        raise DataError(
            "no training examples are left after filtering ("
            + "; ".join(
                r.path + ": " + (", ".join(f"{k} {v}" for k, v in r.skipped.items()) or "0 rows")
                for r in report.sources
            )
            + "). Check the data files and data.on_bad_row."
        )

    report.train_rows = len(train_idx)
    report.eval_rows = len(eval_idx)
    _token_stats(
        report,
        _column(train_all, "input_ids")[train_idx],
        train_loss[train_idx],
        _column(train_all, "truncated")[train_idx],
        _column(train_all, "end_trained")[train_idx],
    )
    columns = ["input_ids", "labels"]
    train = train_all.select(train_idx).select_columns(columns)
    evald = eval_all.select(eval_idx).select_columns(columns) if len(eval_idx) else None
    check_end_tokens(report, cfg)
    return PreparedData(train, evald, report)


def _source_fingerprint(src: DataSource, base_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    local = resolve_path(src.path, base_dir)
    fp: dict[str, Any] = {"source": asdict(src)}
    if local is not None:
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        fp["files"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return fp


def _tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    return {
        "name": getattr(tokenizer, "name_or_path", ""),
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token,
        "bos": tokenizer.bos_token,
        "add_bos": getattr(tokenizer, "add_bos_token", None),
    }


# Data settings that change how the cache is built, not what it holds.
OUTPUT_INDEPENDENT = ("num_proc", "allow_no_eos", "rebuild")


def cache_key(cfg: DataConfig, tokenizer: Any, seed: int, base_dir: str | os.PathLike[str] | None) -> str:
    blob = {
        "version": CACHE_VERSION,
        "data": {k: v for k, v in asdict(cfg).items() if k not in OUTPUT_INDEPENDENT},
        "seed": seed,
        "sources": [_source_fingerprint(s, base_dir) for s in (*cfg.sources, *cfg.eval_sources)],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


STREAM_SAMPLE = 1000  # rows per source that `stream_data` tokenizes up front for its report


def _stream_documents(src: DataSource, base_dir: str | os.PathLike[str] | None) -> Iterator[dict[str, Any]]:
    for rowno, document in read_documents(src, base_dir):
        yield {"row": rowno, "document": document}


def _has_loss(batch: dict[str, list[Any]]) -> list[bool]:
    return [not bad and n > 0 for bad, n in zip(batch["bad"], batch["loss_tokens"], strict=True)]


def stream_data(
    cfg: DataConfig, tokenizer: Any, seed: int, base_dir: str | os.PathLike[str] | None = None
) -> PreparedData:
    """`data.streaming`: the training rows as a `datasets.IterableDataset` that reads each source
    as it goes, shuffles through a buffer of `data.shuffle_buffer` rows, and normalises and
    tokenizes with the same code as `build_data` (a bad row raises or is skipped as training meets
    it); sources interleave by `ratio` until the first runs out. The report describes the first
    rows of each source (tokenized here, so a broken template or format fails before training)."""
    import datasets
    import numpy as np

    report = DataReport(end_token=end_of_turn_token(tokenizer))
    end_id = tokenizer.convert_tokens_to_ids(report.end_token) if report.end_token else None
    documents = datasets.Features({"row": datasets.Value("int64"), "document": datasets.Value("large_string")})
    streams, samples = [], []
    for src in cfg.sources:
        first = next(read_documents(src, base_dir), None)
        if first is None:
            raise DataError(f"data source {src.path} has no rows")
        fmt = source_format(src, parse_document(first[1]), first[0])
        kwargs = _encode_kwargs(src, fmt, cfg, tokenizer, end_id)
        raw = datasets.IterableDataset.from_generator(
            _stream_documents, gen_kwargs={"src": src, "base_dir": base_dir}, features=documents
        )
        sample = [d for _, d in zip(range(STREAM_SAMPLE), _stream_documents(src, base_dir), strict=False)]
        encoded = encode_documents(
            {"row": [d["row"] for d in sample], "document": [d["document"] for d in sample]}, **kwargs
        )
        samples.append((src, fmt, encoded))
        stream = raw.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer) if cfg.shuffle_buffer > 1 else raw
        stream = stream.map(
            encode_documents,
            batched=True,
            batch_size=ENCODE_BATCH,
            fn_kwargs=kwargs,
            remove_columns=["document"],
            features=_encoded_features(),
        )
        streams.append(stream.filter(_has_loss, batched=True, batch_size=ENCODE_BATCH))
    if len(streams) == 1:
        train = streams[0]
    else:
        train = datasets.interleave_datasets(
            streams,
            probabilities=[s.ratio or 0.0 for s in cfg.sources],
            seed=seed,
            stopping_strategy="first_exhausted",
        )
    train = train.select_columns(["input_ids", "labels"])

    for src, fmt, encoded in samples:
        n = len(encoded["row"])
        report.streamed_sample = max(report.streamed_sample, n)
        skipped: dict[str, int] = {}
        for reason in encoded["bad"]:
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
        kept = n - sum(skipped.values())
        report.sources.append(SourceReport(src.path, fmt, n, kept, kept, skipped, limit_text(src)))

    def column(key: str) -> Any:  # the samples' values of one column, as one array
        return np.asarray([v for _, _, e in samples for v in e[key]])

    loss = column("loss_tokens")
    used = column("bad") == ""
    report.dropped_no_loss = int((used & (loss == 0)).sum())
    keep = used & (loss > 0)
    if not keep.any():
        raise DataError(
            f"none of the first {report.streamed_sample} rows of the sources has trained tokens; check the data, "
            "data.max_length and data.on_bad_row"
        )
    lengths = np.asarray([len(ids) for _, _, e in samples for ids in e["input_ids"]], dtype=np.int64)
    _token_stats(report, lengths[keep], loss[keep], column("truncated")[keep], column("end_trained")[keep])
    check_end_tokens(report, cfg)
    return PreparedData(train, None, report)


def load_prepared(folder: Path) -> PreparedData | None:
    """A complete cache folder written by `prepare_data`, or None."""
    import datasets

    if not (folder / "report.json").is_file():
        return None
    meta = json.loads((folder / "report.json").read_text())
    train = datasets.load_from_disk(str(folder / "train"))
    evald = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return PreparedData(train, evald, DataReport.from_dict(meta["report"]), str(folder), meta.get("built", {}))


def cache_folder(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None,
) -> Path:
    return Path(cache_root) / f"data-{cache_key(cfg, tokenizer, seed, base_dir)}"


def _lock_holder(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _holder_died(holder: dict[str, Any]) -> bool:
    """The lock's process ran on this host and is gone."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _wait_for_cache(folder: Path, since: float, until_unlocked: bool = False, poll: float = 1.0) -> PreparedData | None:
    """Wait (no collective, no timeout) until another process has written the cache; fail when it
    failed or died. `until_unlocked`: return None when nobody holds the lock and there is no cache
    (the caller may build it). Logs every minute."""
    lock, failed = folder.with_name(folder.name + ".lock"), folder.with_name(folder.name + ".failed")
    start, next_note = time.monotonic(), 60.0
    while True:
        prepared = load_prepared(folder)
        if prepared is not None:
            return prepared
        holder = _lock_holder(lock) if lock.exists() else None
        if holder is None and failed.exists() and failed.stat().st_mtime >= since - 5:
            raise DataError(f"preparing the data failed in another process: {failed.read_text().strip()}")
        if until_unlocked and (holder is None or _holder_died(holder)):
            return None  # nobody builds it (any more): the caller takes the lock
        waited = time.monotonic() - start
        if waited >= next_note:
            who = f"{holder.get('host')} pid {holder.get('pid')}" if holder else "the main process"
            log.info(
                "data: waiting %.0f s for %s to finish the data cache %s (if that process is gone, delete %s)",
                waited,
                who,
                folder,
                lock,
            )
            next_note += 60.0
        time.sleep(poll)


def build_cache(folder: Path, build: Any, by: str = "train") -> PreparedData | None:
    """Build the cache folder once: the process that creates its lock file builds (into a temporary
    folder, renamed when complete), the others wait for it. Returns what this process loaded, or
    None if another process holds the lock."""
    lock, failed = folder.with_name(folder.name + ".lock"), folder.with_name(folder.name + ".failed")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _lock_holder(lock)
        if _holder_died(holder):
            log.warning("data: removing the lock of a process that died (%s)", holder)
            lock.unlink(missing_ok=True)
            return build_cache(folder, build, by)
        return None
    started = time.time()
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": started}, f)
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        failed.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        prepared = build(tmp / "work")
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(tmp / "eval"))
        built = {
            "by": by,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(time.time() - started, 1),
        }
        (tmp / "report.json").write_text(json.dumps({"report": prepared.report.to_dict(), "built": built}, indent=2))
        del prepared
        shutil.rmtree(tmp / "work", ignore_errors=True)
        with contextlib.suppress(OSError):  # a process on another node may have won the rename
            tmp.rename(folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            failed.write_text(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)
    return load_prepared(folder)


def set_cache_aside(folder: Path) -> None:
    """`data.rebuild`: every process of the launch meets; one process per node moves the existing
    cache folder aside and deletes it (qlora-sft wrote it); all meet again, so no process can find
    the old cache, before the usual build-once-and-wait starts. The meetings come before the long
    work, so no collective waits for a build."""
    from ..launch import distributed_state

    state = distributed_state()
    state.wait_for_everyone()
    if state.is_local_main_process and folder.exists():
        aside = folder.with_name(f"{folder.name}.old-{socket.gethostname()}-{os.getpid()}")
        with contextlib.suppress(OSError):  # another node's process may have moved it first
            folder.rename(aside)
            log.info("data: data.rebuild: the prepared cache %s is rebuilt", folder)
        shutil.rmtree(aside, ignore_errors=True)
    state.wait_for_everyone()


def _prepare_stream(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None,
    by: str,
) -> PreparedData:
    """The training stream (under several ranks, accelerate's default for iterable datasets has the
    main process read it and send each rank its share of every batch), and the eval
    sources prepared and cached like non-streamed data."""
    prepared = stream_data(cfg, tokenizer, seed, base_dir)
    if cfg.eval_sources:
        held = replace(cfg, sources=cfg.eval_sources, eval_sources=(), eval_fraction=0.0, streaming=False)
        evald = prepare_data(held, tokenizer, seed, cache_root, base_dir, by)
        prepared.eval = evald.train
        prepared.report.eval_rows = evald.report.train_rows
        for r in evald.report.sources:
            prepared.report.sources.append(replace(r, path=f"{r.path} (eval)"))
        prepared.cache, prepared.built, prepared.found = evald.cache, evald.built, evald.found
    return prepared


def prepare_data(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    by: str = "train",
) -> PreparedData:
    """`build_data`, cached under `cache_root/data-<key>` (the key covers the data section, the
    sources' files, the tokenizer and the seed). One process per node builds it (the local main
    process, or `qlora-sft prepare` beforehand); every other process waits for the cache folder by
    polling it, never in a collective that could time out. Where the folder is shared between
    nodes, the first node builds and the others wait."""
    from ..launch import distributed_state

    if cfg.streaming:
        return _prepare_stream(cfg, tokenizer, seed, cache_root, base_dir, by)
    folder = cache_folder(cfg, tokenizer, seed, cache_root, base_dir)
    if cfg.rebuild:
        set_cache_aside(folder)
    since = time.time()
    prepared = load_prepared(folder)
    if prepared is not None:
        prepared.found = True
        check_end_tokens(prepared.report, cfg)
        return prepared
    if distributed_state().is_local_main_process:
        # build it, or wait while another process (another node, `qlora-sft prepare`) holds the lock
        while prepared is None:
            prepared = build_cache(folder, lambda work: build_data(cfg, tokenizer, seed, base_dir, work), by)
            prepared = prepared or _wait_for_cache(folder, since, until_unlocked=True)
        return prepared
    prepared = _wait_for_cache(folder, since)
    assert prepared is not None
    return prepared


def data_fingerprint(cfg: DataConfig, base_dir: str | os.PathLike[str] | None, report: DataReport) -> dict[str, Any]:
    """What a checkpoint records of the data it was trained on (a resume over changed data is
    refused): every local file of every source (path, size, modification time) and the split's
    row counts. Hub datasets are named by the recipe (id, split, revision), which resume compares."""
    files = [
        list(entry)
        for src in (*cfg.sources, *cfg.eval_sources)
        for entry in _source_fingerprint(src, base_dir).get("files", [])
    ]
    return {"files": files, "train_rows": report.train_rows, "eval_rows": report.eval_rows}
