"""Command-line arguments of a hostile but realistic user that no other file's area covers: each is
taken or refused naming the argument, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import recipe_dict, write_recipe

from qlora_sft import cli


def test_validate_examples_past_the_largest_index_shows_every_row(
    tiny_model: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """`validate --examples 99999999999999999999` ("show them all") raised islice's ValueError (a
    traceback) once the data had been read."""
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy_data, tmp_path / "runs"))
    assert cli.main(["validate", str(recipe), "--examples", "99999999999999999999"]) == 0
    assert capsys.readouterr().out.count("\nexample: ") == 160
