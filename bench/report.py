"""Benchmark results as files: `bench/results/<date>-<gpu>-<shape><suffix>.{json,md}`."""

from __future__ import annotations

import datetime as dt
import functools
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@functools.cache
def gpu_name() -> str:
    """The GPU's name, asked of a child process: the benchmark's driver keeps no CUDA context of its
    own, which a capped mode would count against its cap (see `workload.make_model`)."""
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


@functools.cache
def gpu_memory_gib() -> float | None:
    """The GPU's memory in GiB (None without CUDA), asked of a child process as `gpu_name` is."""
    probe = (
        "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30 "
        "if torch.cuda.is_available() else '')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return float(out) if out else None


def results_base(out: Path, gpu: str, shape: str, suffix: str = "") -> Path:
    """Path without extension of today's results for a GPU and a model shape."""
    return out / f"{dt.date.today().isoformat()}-{gpu.replace(' ', '_')}-{shape}{suffix}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def number(value: float | None, fmt: str) -> str:
    return "not measured" if value is None else format(value, fmt)


def write(base: Path, payload: dict[str, Any], markdown: list[str]) -> None:
    """`base`.json (the data) and `base`.md (for people), side by side; prints the markdown."""
    base.parent.mkdir(parents=True, exist_ok=True)
    (base.parent / f"{base.name}.json").write_text(json.dumps(payload, indent=2))
    (base.parent / f"{base.name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown), flush=True)
