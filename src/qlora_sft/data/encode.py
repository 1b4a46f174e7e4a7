"""Encoding to Arrow: each source's rows written as JSON text to an Arrow file, then normalised and
tokenised by `data.num_proc` worker processes (`datasets.map` over `encode_documents`), mixed and
split as row positions, so memory does not grow with the rows. `build_data` returns the splits as
`PreparedData`, with the report's counts and token statistics."""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, first_line
from ..files import no_space_behind, no_space_message
from ..recipe import DataConfig, DataSource
from .formats import (
    Example,
    bad_row_error,
    eval_rows_held_out,
    mix,
    name_near_misses,
    near_miss_text,
    normalize_row_turns,
    row_tools,
    source_format,
)
from .report import EVAL_SUFFIX, ROWS_NAMED, DataReport, SourceReport, check_end_tokens, nothing_to_train
from .sources import BadRow, limit_text, parse_document, read_documents
from .templates import end_of_turn_token, tokenize_example, tokenize_rows

log = logging.getLogger("qlora_sft")


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
            "problem": datasets.Value("string"),  # what is wrong with a skipped row, as on_bad_row=error says
            "input_ids": ids,
            "labels": ids,
            "loss_tokens": datasets.Value("int64"),
            "truncated": datasets.Value("bool"),
            # 1/0: the final turn trains its end token (0 too when truncation cut it); -1: n/a (text, bad row)
            "end_trained": datasets.Value("int8"),
            # fields that nearly spell one the format reads, a turn's name not rendered (`near_miss_text`)
            "near_miss": datasets.Value("string"),
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
    reasons: list[tuple[str, str]] = []  # (reason, problem) of each row; ("", "") for a good one
    near: list[str] = []
    for rowno, document in zip(batch["row"], batch["document"], strict=True):
        row: Any = None
        try:
            row = parse_document(document)
            messages, text, prompt_turns = normalize_row_turns(row, fmt, system_prompt, assistant_only_loss)
            tools = row_tools(row, fmt)
        except BadRow as bad:
            if on_bad_row == "error":
                raise bad_row_error(path, rowno, fmt, str(bad)) from None
            reasons.append((bad.reason, str(bad)))
            near.append(near_miss_text(row, fmt))  # ("" where it did not parse)
            continue
        near.append(near_miss_text(row, fmt))
        examples.append(Example(messages, text, path, rowno, tools, prompt_turns))
        reasons.append(("", ""))
    tokens = iter(zip(examples, tokenize_rows(examples, tokenizer, max_length, assistant_only_loss), strict=True))
    out: dict[str, list[Any]] = {k: [] for k in _encoded_features()}
    out["near_miss"] = near
    for rowno, (reason, problem) in zip(batch["row"], reasons, strict=True):
        tok = None
        if not reason:
            ex, tok = next(tokens)
            if isinstance(tok, BadRow):  # a conversation the chat template refuses
                if on_bad_row == "error":
                    raise bad_row_error(path, rowno, fmt, str(tok))
                reason, problem, tok = tok.reason, str(tok), None
        out["row"].append(rowno)
        out["bad"].append(reason)
        out["problem"].append(problem)
        if tok is None:
            for key, empty in (("input_ids", []), ("labels", []), ("loss_tokens", 0), ("truncated", False)):
                out[key].append(empty)
            out["end_trained"].append(-1)
            continue
        trained = [i for i, x in enumerate(tok.labels) if x != -100]
        end = -1
        if ex.messages is not None and tok.cut_tail and (end_id is None or end_id in tok.cut_tail):
            end = 0  # truncation cut the final assistant turn's end-of-turn token: it is not trained
        elif ex.messages is not None and trained:
            # The final labelled tokens must include the end-of-turn token (trailing whitespace
            # after it may be labelled too).
            last = trained[-1]
            end = int(end_id is not None and end_id in tok.labels[max(0, last - 2) : last + 1])
        out["input_ids"].append(tok.input_ids)
        out["labels"].append(tok.labels)
        out["loss_tokens"].append(len(trained))
        # a row that trains no token counts as truncated only where truncation cut trained tokens (cut_tail):
        # one the template marks nothing in is not, however long (the report names the two apart)
        out["truncated"].append(tok.truncated and bool(trained or tok.cut_tail))
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
    near = pc.not_equal(encoded.data.column("near_miss"), "")
    name_near_misses(
        src.path,
        fmt,
        pc.filter(encoded.data.column("row"), near).to_pylist(),
        pc.filter(encoded.data.column("near_miss"), near).to_pylist(),
    )
    bad = encoded.data.column("bad")
    for entry in pc.value_counts(pc.filter(bad, pc.not_equal(bad, ""))).to_pylist():
        report.skipped[entry["values"]] = int(entry["counts"])
    report.kept = report.rows - sum(report.skipped.values())
    name_dropped_rows(report, encoded)
    log.info(
        "data: %s: %d rows tokenized in %.0f s (%.0f rows/s)",
        src.path,
        report.rows,
        time.perf_counter() - started,
        report.rows / max(1e-9, time.perf_counter() - started),
    )
    return _Encoded(src, documents, encoded, report)


def name_dropped_rows(report: SourceReport, encoded: Any) -> None:
    """The report's first rows of each skip reason (with the first one's problem), and its kept rows
    that train no token, from a source's encoded rows (Arrow). Bad rows are read until every reason
    has its rows named."""
    import numpy as np

    rows, bad = _column(encoded, "row"), _column(encoded, "bad")
    problems = encoded.data.column("problem")
    left = dict(report.skipped)  # rows still to name, per reason
    for i in np.flatnonzero(bad != "") if left else ():
        reason = bad[i]
        if not left.get(reason):
            continue
        named = report.skipped_rows.setdefault(reason, [])
        if not named:
            report.problems[reason] = problems[int(i)].as_py()
        named.append(int(rows[i]))
        left[reason] = 0 if len(named) == ROWS_NAMED else left[reason] - 1
        if not any(left.values()):
            break
    no_loss = (bad == "") & (_column(encoded, "loss_tokens") == 0)
    cut = _column(encoded, "truncated")
    for dropped, counts in ((no_loss & cut, "no_loss"), (no_loss & ~cut, "untrained")):
        at = np.flatnonzero(dropped)
        setattr(report, counts, len(at))
        setattr(report, f"{counts}_rows", rows[at[:ROWS_NAMED]].tolist())


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


def _row_hashes(dataset: Any, name: str = "input_ids") -> Any:
    """A 64-bit hash of each row's token list (numpy int64), chunk by chunk: rows with the same tokens
    have the same hash."""
    import numpy as np

    out = np.empty(len(dataset), dtype=np.int64)
    at = 0
    for chunk in dataset.data.column(name).chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            out[at + i] = hash(values[offsets[i] : offsets[i + 1]].tobytes())
        at += len(chunk)
    return out


def _no_loss_error(cfg: DataConfig, tokenizer: Any, parts: list[_Encoded], position: int) -> DataError:
    """The error for a used row without trained tokens (`position` in the parts' concatenation),
    with its untruncated length."""
    for part in parts:
        if position >= len(part.documents):
            position -= len(part.documents)
            continue
        src, doc = part.src, part.documents[position]
        row = parse_document(doc["document"])
        messages, text, turns = normalize_row_turns(row, part.report.format, src.system_prompt, cfg.assistant_only_loss)
        ex = Example(messages, text, src.path, doc["row"], row_tools(row, part.report.format), turns)
        full = tokenize_example(ex, tokenizer, 10**9, cfg.assistant_only_loss)
        if len(full.input_ids) <= cfg.max_length or not any(label != -100 for label in full.labels):
            # nothing was cut: the template marks no token of the answer as trained
            return DataError(
                f"{src.path} row {doc['row']}: no token of it is trained, and truncation is not why (the row has "
                f"{len(full.input_ids)} tokens, data.max_length={cfg.max_length}): the chat template marks no "
                "assistant token as trained. With data.assistant_only_loss, a chat template must wrap each "
                "assistant reply in {% generation %} ... {% endgeneration %}; give such a template "
                "(data.chat_template), set data.assistant_only_loss=false, or data.on_bad_row=skip."
            )
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


def _hold_out_eval(mixed: list[int], fraction: float) -> tuple[Any, Any]:
    """(eval rows, train rows) of the shuffled mix, as positions: `data.eval_fraction` of its distinct rows,
    the first ones in the mix's order, are held out, with every copy of them (a source with weight > 1
    repeats its rows), so no eval row is also trained on. Without repetition: the mix's first rows, the rest."""
    import numpy as np

    rows = np.asarray(mixed, dtype=np.int64)
    _, first = np.unique(rows, return_index=True)
    distinct = rows[np.sort(first)]  # each row once, where it first appears in the mix
    held = distinct[: eval_rows_held_out(len(distinct), fraction)]
    if len(distinct) == len(rows):
        return held, rows[len(held) :]
    return held, rows[~np.isin(rows, held)]


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
    if workdir is not None:
        return _build_data(cfg, tokenizer, seed, base_dir, Path(workdir))
    work = _scratch_folder()
    try:
        return _build_data(cfg, tokenizer, seed, base_dir, work)
    except Exception as exc:
        full = no_space_behind(exc)
        if full is None:
            raise
        shutil.rmtree(work, ignore_errors=True)
        raise DataError(
            f"building the data in the temporary folder {work}: {no_space_message(work.parent, full)} "
            f"({first_line(full)}); it was removed. Point TMPDIR at a folder with room for the tokenized data "
            "(TMPDIR=/path/with/room qlora-sft ...), or run `qlora-sft prepare RECIPE`, which builds it in the "
            "run's cache (run.output_dir/.cache) where later commands find it."
        ) from None


def _build_data(
    cfg: DataConfig, tokenizer: Any, seed: int, base_dir: str | os.PathLike[str] | None, work: Path
) -> PreparedData:
    import datasets
    import numpy as np

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
            p.report.path += EVAL_SUFFIX
        report.sources += [p.report for p in eval_parts]
        eval_all = datasets.concatenate_datasets([p.tokens for p in eval_parts])
        eval_idx = np.flatnonzero(_column(eval_all, "bad") == "")
        train_idx = np.asarray(mixed, dtype=np.int64)
    else:
        eval_all, eval_parts = train_all, parts
        eval_idx, train_idx = _hold_out_eval(mixed, cfg.eval_fraction)
        # rows of each source in the splits (fewer than the mix took where an eval row's copies were dropped)
        bounds = np.cumsum([0] + [len(p.tokens) for p in parts])
        split = np.concatenate([eval_idx, train_idx])
        for r, n in zip(report.sources, np.histogram(split, bins=bounds)[0], strict=True):
            r.used = int(n)
    del mixed

    # Rows with no trained tokens left (truncation cut every assistant token): an error, or dropped.
    train_loss = _column(train_all, "loss_tokens")
    eval_loss = train_loss if eval_all is train_all else _column(eval_all, "loss_tokens")
    for idx, loss, split_parts in ((train_idx, train_loss, parts), (eval_idx, eval_loss, eval_parts)):
        empty = np.flatnonzero(loss[idx] == 0)
        if cfg.on_bad_row == "error" and len(empty):
            raise _no_loss_error(cfg, tokenizer, split_parts, int(idx[empty[0]]))
    report.dropped_no_loss = int((train_loss[train_idx] == 0).sum())
    report.eval_dropped_no_loss = int((eval_loss[eval_idx] == 0).sum())
    train_idx = train_idx[train_loss[train_idx] > 0]
    eval_idx = eval_idx[eval_loss[eval_idx] > 0]
    if not len(train_idx):
        held = 0 if cfg.eval_sources else len(eval_idx)  # rows of the training sources held out for eval
        raise nothing_to_train([p.report for p in parts], cfg, held_for_eval=held)

    report.train_rows = len(train_idx)
    report.eval_rows = len(eval_idx)
    if len(eval_idx):  # eval rows that are train rows too (a source in both, a copy, repeated rows)
        train_hashes = _row_hashes(train_all)
        eval_hashes = train_hashes if eval_all is train_all else _row_hashes(eval_all)
        report.eval_in_train = int(np.isin(eval_hashes[eval_idx], train_hashes[train_idx]).sum())
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
