"""Data: sources -> normalised chat messages -> tokens with a loss mask -> Arrow splits.

In: the recipe's `data` section (a `DataConfig`), the tokenizer, the seed, the recipe's folder
(relative paths) and the cache root. Out: `PreparedData`, the train and eval splits (Arrow-backed
`datasets.Dataset`s with input_ids and labels, or a `datasets.IterableDataset` when streaming) and
a `DataReport` of what was read, kept, skipped and trained.

One module per stage; each imports only the ones above it in this list:

    report     SourceReport, DataReport (counts and token statistics), check_end_tokens, check_eval_rows
    sources    read_source, read_documents: local jsonl/json/parquet/csv, a save_to_disk folder, or a
               hub dataset id; errors that name an unreadable file and the fix; max_rows
    formats    normalize_row: alpaca | dolly | sharegpt | messages | prompt_completion | text -> one
               Example, its turns checked; mix (weights or ratios, seeded), eval_rows_held_out
    templates  set_chat_template, tokenize_example / tokenize_batch: chat template + assistant-only
               labels, truncation; mark_trained
    encode     build_data: rows -> Arrow files, tokenised by worker processes, mixed and split
    stream     stream_data: `data.streaming`, rows tokenised as training reads them
    cache      prepare_data: build_data (or the stream) cached on disk, built once per node under a
               lock while the other processes wait; data_fingerprint for checkpoints

Bad rows either stop the run naming source, row and problem (`on_bad_row: error`) or are skipped
and counted by reason, the first rows of each reason named in the report (`on_bad_row: skip`).

The names below are the ones the rest of qlora-sft (and its tests and benchmarks) use. Settings
such as `encode.ROWS_PER_PROCESS` are read in their own module: change them there.
"""

from ..errors import DataError
from .cache import cache_folder, data_fingerprint, load_prepared, prepare_data
from .encode import PreparedData, build_data
from .formats import Example, eval_rows_held_out, iter_examples, load_examples, mix, mix_counts, normalize_row
from .report import DataReport, SourceReport, check_end_tokens, check_eval_rows
from .sources import BadRow, read_documents, read_source
from .stream import stream_data
from .templates import (
    CHAT_TEMPLATES,
    mark_trained,
    marked_template,
    set_chat_template,
    tokenize_batch,
    tokenize_example,
)

__all__ = [
    "CHAT_TEMPLATES",
    "BadRow",
    "DataError",
    "DataReport",
    "Example",
    "PreparedData",
    "SourceReport",
    "build_data",
    "cache_folder",
    "check_end_tokens",
    "check_eval_rows",
    "data_fingerprint",
    "eval_rows_held_out",
    "iter_examples",
    "load_examples",
    "load_prepared",
    "mark_trained",
    "marked_template",
    "mix",
    "mix_counts",
    "normalize_row",
    "prepare_data",
    "read_documents",
    "read_source",
    "set_chat_template",
    "stream_data",
    "tokenize_batch",
    "tokenize_example",
]
