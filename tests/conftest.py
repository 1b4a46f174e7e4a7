"""Fixtures and the test environment; shared helpers live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_toy_data

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def qlora_sft_logger_as_new():
    """Each test starts with the `qlora_sft` logger as a new process has it. `train`'s setup_logging
    gives it a handler on the sys.stdout of its moment (a test's capsys stream, closed when that test
    ends) and stops propagation: a later test in the same worker logging through it printed
    "--- Logging error --- ... I/O operation on closed file" and a traceback into its own stderr."""
    import logging

    yield
    log = logging.getLogger("qlora_sft")
    log.handlers[:] = []
    log.propagate = True
    log.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture()
def toy_data(tmp_path: Path) -> Path:
    return write_toy_data(tmp_path / "toy.jsonl")


# The longest files first (serial seconds on 2 cores, 2026-11-30): `make test` runs two workers that
# each take a whole file, and a long file started last would leave the other worker idle at the end.
LONGEST_FIRST = (
    "test_slurm.py",
    "test_checkpoint.py",
    "test_data_scale.py",
    "test_sharded.py",
    "test_migration.py",
    "test_bench.py",
    "test_smollm2.py",
    "test_distributed.py",
    "test_export.py",
    "test_run_safety.py",
    "test_tracking.py",
    "test_offload.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order is kept
