"""Fixtures and the test environment; shared helpers live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_toy_data

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture()
def toy_data(tmp_path: Path) -> Path:
    return write_toy_data(tmp_path / "toy.jsonl")
