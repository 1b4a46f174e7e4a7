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

import contextlib
import csv
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .recipe import DataConfig, DataSource

# Bump when the tokenised output for the same inputs changes, to invalidate caches.
CACHE_VERSION = "2"  # 2: assistant spans from generation markers (TRL training templates), tool calls

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
                f"source {s.path} [{s.format}]: {s.rows} rows, {s.kept} kept, {s.used} used in the mix, "
                f"skipped: {skipped}"
            )
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
        return out


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


def read_source(src: DataSource, base_dir: str | os.PathLike[str] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (row number, raw row) from a source. Row numbers are 1-based (the line for jsonl)."""
    local = resolve_path(src.path, base_dir)
    if local is None:
        if not _looks_like_hub_id(src.path):
            raise DataError(
                f"data source {src.path!r} not found (looked in {Path.cwd()}"
                + (f" and {base_dir}" if base_dir else "")
                + "). Fix `path:` in data.sources."
            )
        yield from _read_hub(src)
        return
    if local.is_dir():
        yield from _read_saved(local, src)
        return
    suffix = local.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with local.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, BadRow("invalid_json", f"line is not valid JSON ({exc.msg})")
    elif suffix == ".json":
        try:
            data = json.loads(local.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            # A .json file may also be JSON lines.
            try:
                with local.open(encoding="utf-8") as f:
                    rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError:
                raise DataError(f"{local}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
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
        with local.open(encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f), 1):
                yield i, dict(row)
    elif suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(local))
        yield from enumerate(ds, 1)  # type: ignore[arg-type]
    else:
        raise DataError(
            f"data source {local}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet, .csv, "
            "or a datasets.save_to_disk folder"
        )


def _read_saved(folder: Path, src: DataSource) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(f"data source {folder}: a folder must be written by datasets' save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise DataError(f"data source {folder}: no split {src.split!r}; it has {sorted(ds)}")
        ds = ds[src.split]
    yield from enumerate(ds, 1)  # type: ignore[arg-type]


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


def load_examples(
    sources: Sequence[DataSource], on_bad_row: str, base_dir: str | os.PathLike[str] | None = None
) -> tuple[list[list[Example]], list[SourceReport]]:
    """Read and normalise every source. Bad rows raise DataError or are counted, per `on_bad_row`."""
    per_source: list[list[Example]] = []
    reports: list[SourceReport] = []
    for src in sources:
        fmt = src.format
        report = SourceReport(path=src.path, format=fmt)
        examples: list[Example] = []
        for rowno, row in read_source(src, base_dir):
            report.rows += 1
            if fmt == "auto":
                detected = detect_format(row)
                if detected is None:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(
                        f"{src.path} row {rowno}: cannot tell the format from its fields {keys}. Set "
                        f"`format:` on this source to one of: "
                        + "; ".join(f"{k} ({v})" for k, v in FORMAT_FIELDS.items())
                    )
                fmt = report.format = detected
            try:
                messages, text = normalize_row(row, fmt, src.system_prompt)
            except BadRow as bad:
                if on_bad_row == "error":
                    raise DataError(
                        f"{src.path} row {rowno}: {bad} (format {fmt}: {FORMAT_FIELDS[fmt]}). Fix the row, or set "
                        "data.on_bad_row=skip to drop bad rows and see counts by reason."
                    ) from None
                report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
                continue
            examples.append(Example(messages, text, src.path, rowno))
        report.kept = len(examples)
        if report.rows == 0:
            raise DataError(f"data source {src.path} has no rows")
        per_source.append(examples)
        reports.append(report)
    return per_source, reports


def mix(per_source: list[list[Example]], sources: Sequence[DataSource], seed: int) -> tuple[list[Example], list[int]]:
    """Mix sources by `ratio` (shares of the result, largest mix without repetition) or `weight`
    (rows taken = weight x rows: fractions sample without replacement, whole parts repeat).
    Seeded; returns (mixed rows, rows used per source)."""
    rng = random.Random(seed)
    counts: list[int]
    if all(s.ratio is not None for s in sources):
        total = min((len(ex) / s.ratio) for ex, s in zip(per_source, sources, strict=True) if s.ratio)
        counts = [min(len(ex), round(total * (s.ratio or 0))) for ex, s in zip(per_source, sources, strict=True)]
    else:
        counts = [round(len(ex) * s.weight) for ex, s in zip(per_source, sources, strict=True)]
    mixed: list[Example] = []
    for examples, n in zip(per_source, counts, strict=True):
        if not examples:
            continue
        whole, rest = divmod(n, len(examples))
        mixed.extend(examples * whole)
        mixed.extend(rng.sample(examples, rest))
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


def _marked_labels(
    ex: Example, tokenizer: Any, template: str
) -> tuple[str, list[int], list[int], list[tuple[int, int]]]:
    """(text, input ids, labels, offsets) with the tokens inside the template's generation markers
    as labels."""
    assert ex.messages is not None
    text = tokenizer.apply_chat_template(ex.messages, chat_template=template, tokenize=False)
    marked = tokenizer.apply_chat_template(
        ex.messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if ids != list(marked["input_ids"]):  # pragma: no cover - the same text, tokenized the same way
        raise DataError(f"{ex.source} row {ex.row}: the chat template's tokens differ between two renderings")
    labels = [tid if keep else -100 for tid, keep in zip(ids, marked["assistant_masks"], strict=True)]
    return text, ids, labels, [tuple(o) for o in enc["offset_mapping"]]


def tokenize_example(
    ex: Example, tokenizer: Any, max_length: int, assistant_only_loss: bool, keep_text: bool = False
) -> Tokenized:
    """Render with the chat template and tokenize; label assistant spans (or everything). The
    assistant spans come from the template's generation markers where it has them (or TRL has a
    training variant of it), else from rendering the conversation up to each assistant turn."""
    template = marked_template(tokenizer) if assistant_only_loss and ex.messages is not None else None
    if ex.text is not None:
        enc = tokenizer(ex.text, add_special_tokens=True, return_offsets_mapping=keep_text)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc.get("offset_mapping", [])]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
            offsets.append((len(ex.text), len(ex.text)))
        labels = list(ids)
        text = ex.text
    elif template is not None:
        text, ids, labels, offsets = _marked_labels(ex, tokenizer, template)
    else:
        assert ex.messages is not None
        text = _render(tokenizer, ex.messages, False)
        spans: list[tuple[int, int]] = []
        if assistant_only_loss:
            for i, m in enumerate(ex.messages):
                if m["role"] != "assistant":
                    continue
                before = _render(tokenizer, ex.messages[:i], True)
                through = _render(tokenizer, ex.messages[: i + 1], False)
                if not (text.startswith(through) and through.startswith(before)):
                    raise DataError(
                        f"{ex.source} row {ex.row}: the chat template does not render conversations "
                        "incrementally (the text up to an assistant turn is not a prefix of the full "
                        "text) and has no {% generation %} markers (nor does TRL ship a training variant "
                        "of it), so the assistant spans cannot be found. Use a template with generation "
                        "markers (data.chat_template: path/to/template.jinja) or data.assistant_only_loss=false."
                    )
                spans.append((len(before), len(through)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        if assistant_only_loss:
            labels = [
                tid if any(a < end and b > start for start, end in spans) else -100
                for tid, (a, b) in zip(ids, offsets, strict=True)
            ]
        else:
            labels = list(ids)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(ids, labels, truncated, text if keep_text else "", offsets[:max_length] if keep_text else [])


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
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    report: DataReport
    first_example: Example | None = None


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


def cache_key(cfg: DataConfig, tokenizer: Any, seed: int, base_dir: str | os.PathLike[str] | None) -> str:
    blob = {
        "version": CACHE_VERSION,
        "data": asdict(cfg),
        "seed": seed,
        "sources": [_source_fingerprint(s, base_dir) for s in (*cfg.sources, *cfg.eval_sources)],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def build_data(
    cfg: DataConfig, tokenizer: Any, seed: int, base_dir: str | os.PathLike[str] | None = None
) -> PreparedData:
    """Read, normalise, mix, split and tokenize (no caching; see `prepare_data`)."""
    import datasets

    per_source, reports = load_examples(cfg.sources, cfg.on_bad_row, base_dir)
    mixed, counts = mix(per_source, cfg.sources, seed)
    for report, n in zip(reports, counts, strict=True):
        report.used = n
    if cfg.eval_sources:
        eval_per_source, eval_reports = load_examples(cfg.eval_sources, cfg.on_bad_row, base_dir)
        eval_rows = [e for ex in eval_per_source for e in ex]
        for r in eval_reports:
            r.used = r.kept
            r.path = f"{r.path} (eval)"
        reports += eval_reports
        train_rows = mixed
    else:
        n_eval = eval_rows_held_out(len(mixed), cfg.eval_fraction)
        eval_rows, train_rows = mixed[:n_eval], mixed[n_eval:]

    report = DataReport(sources=reports, end_token=end_of_turn_token(tokenizer))

    def encode(rows: list[Example], split: str) -> tuple[dict[str, list[Any]], list[int]]:
        cols: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        lengths: list[int] = []
        end_id = tokenizer.convert_tokens_to_ids(report.end_token) if report.end_token else None
        trained = loss_tokens = eos_ok = chat_rows = 0
        for ex in rows:
            tok = tokenize_example(ex, tokenizer, cfg.max_length, cfg.assistant_only_loss)
            n_loss = sum(1 for x in tok.labels if x != -100)
            if n_loss == 0:
                if cfg.on_bad_row == "error":
                    full = tokenize_example(ex, tokenizer, 10**9, cfg.assistant_only_loss)
                    raise DataError(
                        f"{ex.source} row {ex.row}: no trained tokens are left after truncation to "
                        f"data.max_length={cfg.max_length} (the row has {len(full.input_ids)} tokens). "
                        "Raise data.max_length, shorten the row, or set data.on_bad_row=skip."
                    )
                if split == "train":
                    report.dropped_no_loss += 1
                continue
            if split == "train":
                report.truncated += int(tok.truncated)
                trained += len(tok.input_ids)
                loss_tokens += n_loss
                if ex.messages is not None and not tok.truncated:
                    chat_rows += 1
                    last = max(i for i, x in enumerate(tok.labels) if x != -100)
                    # The final labelled tokens must include the end-of-turn token (trailing
                    # whitespace after it may be labelled too).
                    if end_id is not None and end_id in tok.labels[max(0, last - 2) : last + 1]:
                        eos_ok += 1
            cols["input_ids"].append(tok.input_ids)
            cols["labels"].append(tok.labels)
            lengths.append(len(tok.input_ids))
        if split == "train":
            report.loss_token_fraction = loss_tokens / trained if trained else 0.0
            report.eos_trained_fraction = eos_ok / chat_rows if chat_rows else 0.0
        return cols, lengths

    train_cols, lengths = encode(train_rows, "train")
    eval_cols, _ = encode(eval_rows, "eval")
    if not train_cols["input_ids"]:
        raise DataError(
            "no training examples are left after filtering ("
            + "; ".join(
                r.path + ": " + (", ".join(f"{k} {v}" for k, v in r.skipped.items()) or "0 rows") for r in reports
            )
            + "). Check the data files and data.on_bad_row."
        )
    report.train_rows = len(train_cols["input_ids"])
    report.eval_rows = len(eval_cols["input_ids"])
    report.tokens_total = sum(lengths)
    report.tokens_mean = statistics.fmean(lengths)
    report.tokens_max = max(lengths)
    report.tokens_p95 = sorted(lengths)[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
    train = datasets.Dataset.from_dict(train_cols)
    evald = datasets.Dataset.from_dict(eval_cols) if eval_cols["input_ids"] else None
    return PreparedData(train, evald, report, train_rows[0] if train_rows else None)


def prepare_data(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
) -> PreparedData:
    """`build_data`, run by the main process first and cached under `cache_root/<key>`; the other
    ranks then load the cache (or, where the folder is not shared between nodes, build their own)."""
    import datasets

    from .launch import distributed_state

    key = cache_key(cfg, tokenizer, seed, base_dir)
    folder = Path(cache_root) / f"data-{key}"
    state = distributed_state()

    def load() -> PreparedData | None:
        if not (folder / "report.json").is_file():
            return None
        report = DataReport.from_dict(json.loads((folder / "report.json").read_text()))
        train = datasets.load_from_disk(str(folder / "train"))
        evald = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
        return PreparedData(train, evald, report)

    with state.main_process_first():
        prepared = load()
        if prepared is None:
            prepared = build_data(cfg, tokenizer, seed, base_dir)
            if state.is_local_main_process:
                tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                prepared.train.save_to_disk(str(tmp / "train"))
                if prepared.eval is not None:
                    prepared.eval.save_to_disk(str(tmp / "eval"))
                (tmp / "report.json").write_text(json.dumps(prepared.report.to_dict(), indent=2))
                with contextlib.suppress(OSError):  # another node may have won the rename
                    tmp.rename(folder)
                shutil.rmtree(tmp, ignore_errors=True)
    return prepared
