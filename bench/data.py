"""Data preparation at scale, on the CPU: rows/s and peak memory of `prepare_data` (read, normalise,
mix, tokenize, mask, pack, write the cache), each size and `data.num_proc` in a fresh process.

    python -m bench.data --tokenizer data/models/smollm2-135m-instruct
    python -m bench.data --rows 20000 200000 1000000 --num-proc 1 2

Rows are `workload.text_chat_rows` (English-like multi-turn ShareGPT conversations, written once as
JSON lines under --cache). Writes `bench/results/<date>-cpu-data{tag}.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.workload import make_text_data


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_parts_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process now (MiB): the second is pages of
    memory-mapped files (the Arrow files datasets reads), which the kernel can drop at any time."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    return parts.get("RssAnon", 0.0), parts.get("RssFile", 0.0)


class PeakSampler:
    """Peak anonymous and file-backed RSS, sampled every 20 ms in a thread (the kernel keeps a
    high-water mark for the total only)."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = rss_parts_mb()
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_one(rows_file: Path, tokenizer_path: str, num_proc: int) -> dict[str, Any]:
    """One preparation, in this (fresh) process: time, peak RSS of this process and of its workers;
    then the packing the launch does (TRL's best-fit decreasing over the prepared train split)."""
    import dataclasses

    from transformers import AutoTokenizer

    from qlora_sft import data
    from qlora_sft.recipe import DataConfig, DataSource

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    extra = {"num_proc": num_proc} if "num_proc" in fields else {}
    if not extra and num_proc != 1:
        raise SystemExit("this version of qlora_sft has no data.num_proc")
    cfg = DataConfig(sources=[DataSource(path=str(rows_file), format="sharegpt")], **extra)
    baseline = rss_mb()
    anon_baseline, _ = rss_parts_mb()
    with tempfile.TemporaryDirectory(dir=rows_file.parent) as cache:
        start = time.perf_counter()
        with PeakSampler() as peaks:
            prepared = data.prepare_data(cfg, tokenizer, 0, cache)
        seconds = time.perf_counter() - start
        prepare_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        from trl.data_utils import pack_dataset

        start = time.perf_counter()
        packed = pack_dataset(prepared.train.select_columns(["input_ids", "labels"]), cfg.max_length, "bfd")
        pack_seconds = time.perf_counter() - start
    rows = prepared.report.sources[0].rows
    return {
        "rows": rows,
        "num_proc": num_proc,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1),
        "peak_rss_mb": round(prepare_peak, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_above_baseline_mb": round(prepare_peak - baseline, 1),
        "peak_anon_mb": round(peaks.anon, 1),
        "anon_above_baseline_mb": round(peaks.anon - anon_baseline, 1),
        "peak_file_backed_mb": round(peaks.file, 1),
        "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "train_rows": prepared.report.train_rows,
        "tokens_mean": round(prepared.report.tokens_mean, 1),
        "pack_seconds": round(pack_seconds, 2),
        "packed_rows": len(packed),
        "pack_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "code": data.__file__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", default="data/models/smollm2-135m-instruct", help="a local tokenizer folder")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qlora-sft-bench-data")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--one", nargs=2, metavar=("FILE", "NUM_PROC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        result = measure_one(Path(args.one[0]), args.tokenizer, int(args.one[1]))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    results: list[dict[str, Any]] = []
    for rows in args.rows:
        rows_file = make_text_data(args.cache / f"text-chat-{rows}.jsonl", rows)
        for num_proc in args.num_proc:
            cmd = [sys.executable, "-m", "bench.data", "--one", str(rows_file), str(num_proc)]
            cmd += ["--tokenizer", args.tokenizer]
            print(f"== {rows:,} rows, num_proc {num_proc}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                tail = (proc.stdout + proc.stderr)[-3000:]
                results.append({"rows": rows, "num_proc": num_proc, "error": f"exit {proc.returncode}: {tail}"})
                print(tail, flush=True)
                continue
            results.append(json.loads(line[len("RESULT ") :]))
            print(json.dumps(results[-1]), flush=True)
    rows_table = [
        [
            f"{r['rows']:,}",
            r["num_proc"],
            report.number(r.get("rows_per_s"), ",.0f"),
            report.number(r.get("seconds"), ".1f"),
            report.number(r.get("peak_rss_mb"), ",.0f"),
            report.number(r.get("peak_above_baseline_mb"), ",.0f"),
            report.number(r.get("anon_above_baseline_mb"), ",.0f"),
            report.number(r.get("peak_file_backed_mb"), ",.0f"),
            report.number(r.get("worker_peak_rss_mb"), ",.0f"),
            report.number(r.get("pack_seconds"), ".1f"),
            "failed" if "error" in r else "",
        ]
        for r in results
    ]
    markdown = [
        f"# Data preparation on the CPU ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}",
        "",
        "`prepare_data` end to end (read, normalise, tokenize with masks, mix, split, write the cache) of",
        f"`text_chat_rows` conversations (ShareGPT format), tokenizer {args.tokenizer}. Each row is a fresh",
        "process; peak RSS is the main process's (ru_maxrss) during preparation, the baseline its RSS after",
        "imports and the tokenizer. RSS splits into anonymous memory (the process's own; peak sampled every",
        "20 ms) and file-backed pages of the memory-mapped Arrow files it reads (page cache the kernel may",
        "drop at any time). Workers' peak is the largest worker's. `pack s`: TRL's best-fit",
        "decreasing packing of the prepared train split afterwards (what the launch does), not in rows/s.",
        "",
        *report.table(
            [
                "rows",
                "num_proc",
                "rows/s",
                "seconds",
                "peak RSS MB",
                "above baseline MB",
                "anonymous above baseline MB",
                "file-backed peak MB",
                "worker peak MB",
                "pack s",
                "",
            ],
            rows_table,
        ),
    ]
    payload = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "tokenizer": args.tokenizer}
    payload["results"] = results
    base = args.out / f"{time.strftime('%Y-%m-%d')}-cpu-data{args.tag}"
    report.write(base, payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
