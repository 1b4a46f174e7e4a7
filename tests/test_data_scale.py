"""Data preparation at scale: the Arrow pipeline with worker processes, `qlora-sft prepare`, the
cache other ranks wait on, and streaming; all checked against the tokens, labels and packed rows
the in-memory pipeline produced (pinned in tests/data/pinned_tokens.json)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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


def case_digests(tmp: Path, **build: Any) -> dict[str, dict[str, str]]:
    """Digests of what `build_data` makes for every case: train and eval tokens and labels, the
    report, and the rows TRL's best-fit-decreasing packing makes of the train split."""
    from trl.data_utils import pack_dataset

    from qlora_sft import data

    out: dict[str, dict[str, str]] = {}
    for name, (cfg, template) in cases(tmp).items():
        try:
            prepared = data.build_data(cfg, tokenizer_for(template), 3, **build)
        except data.DataError as exc:
            out[name] = {"error": str(exc).replace(str(tmp), "<tmp>").replace(str(DATA), "<data>")}
            continue
        packed = pack_dataset(prepared.train.select_columns(["input_ids", "labels"]), cfg.max_length, "bfd")
        out[name] = {
            "train": digest(prepared.train[:]),
            "eval": digest(prepared.eval[:] if prepared.eval is not None else None),
            "report": digest(json.loads(json.dumps(prepared.report.to_dict()).replace(str(tmp), "<tmp>").replace(str(DATA), "<data>"))),
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
