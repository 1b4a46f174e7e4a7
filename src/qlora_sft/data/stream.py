"""`data.streaming`: the training rows read, shuffled through a buffer, normalised and tokenised as
training consumes them (the encoding of `build_data`), the sources interleaved by ratio; the report
describes the first rows of each source, tokenised up front."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..errors import DataError
from ..recipe import DataConfig, DataSource
from .encode import ENCODE_BATCH, PreparedData, _encode_kwargs, _encoded_features, _token_stats, encode_documents
from .formats import name_near_misses, source_format
from .report import DataReport, SourceReport, check_end_tokens, nothing_to_train
from .sources import limit_text, parse_document, read_documents
from .templates import end_of_turn_token

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
        # (in the rows sampled: counted as of those rows where the source may hold more)
        name_near_misses(
            src.path, fmt, encoded["row"], encoded["near_miss"], len(sample) if len(sample) >= STREAM_SAMPLE else None
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
        source = SourceReport(src.path, fmt, n, limit=limit_text(src))
        columns = ("row", "bad", "problem", "loss_tokens", "truncated")
        for rowno, reason, problem, loss, cut in zip(*(encoded[k] for k in columns), strict=True):
            if reason:
                source.skip(reason, rowno, problem)
            elif not loss:
                source.drop_no_loss(rowno, cut)
        source.kept = source.used = n - sum(source.skipped.values())
        report.sources.append(source)

    def column(key: str) -> Any:  # the samples' values of one column, as one array
        return np.asarray([v for _, _, e in samples for v in e[key]])

    loss = column("loss_tokens")
    used = column("bad") == ""
    report.dropped_no_loss = int((used & (loss == 0)).sum())
    keep = used & (loss > 0)
    if not keep.any():
        raise nothing_to_train(report.sources, cfg, streamed=STREAM_SAMPLE)
    lengths = np.asarray([len(ids) for _, _, e in samples for ids in e["input_ids"]], dtype=np.int64)
    _token_stats(report, lengths[keep], loss[keep], column("truncated")[keep], column("end_trained")[keep])
    check_end_tokens(report, cfg)
    return PreparedData(train, None, report)
