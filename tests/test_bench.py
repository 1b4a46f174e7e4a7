"""The benchmark harness itself runs end to end (on the CPU, with a small shape): the numbers that
matter come from GPUs, this keeps the one command working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_bench_run_writes_results_with_ratios(tmp_path: Path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--shape",
            "llama-smoke",
            "--mode",
            "baseline,peer,project",
            "--steps",
            "4",
            "--max-length",
            "256",
            "--rows",
            "200",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "results"),
            # 4 packed rows per micro batch like the baseline's 4 padded ones (the GPU default of
            # 8192 tokens is 32 rows here and takes minutes on two CPU cores)
            "--project-overrides",
            "train.micro_batch_tokens=1024",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    (result,) = (tmp_path / "results").glob("*-llama-smoke.json")
    data = json.loads(result.read_text())
    for key in (
        "gpu",
        "shape",
        "num_gpus",
        "baseline_tokens_per_s",
        "peer_tokens_per_s",
        "project_tokens_per_s",
        "ratio",
        "peer_ratio",
        "baseline_peak_gib",
        "project_peak_gib",
        "mfu",
    ):
        assert key in data, key
    assert data["ratio"] > 0 and data["peer_ratio"] > 0
    assert data["results"]["baseline"]["padding_fraction"] > 0  # padded batches of 4
    assert data["results"]["project"]["padding_fraction"] < 0.01  # packed, padding-free rows (measured)
    assert (tmp_path / "results" / result.name.replace(".json", ".md")).is_file()
