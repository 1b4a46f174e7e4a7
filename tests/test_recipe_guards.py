"""Issue 24: a recipe is read in bounded time and memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_sft.errors import RecipeError
from qlora_sft.recipe import apply_overrides, build_recipe, load_recipe

# nine levels of nine aliases under an unknown key: 9**9 (387 million) strings from ~1 KB
BOMB = """\
model: {name_or_path: m}
data: {sources: [a.jsonl]}
junk:
  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def problems(data: dict, overrides: list[str] | None = None) -> list[str]:
    data, override_problems = apply_overrides(data, overrides or [])
    assert not override_problems
    with pytest.raises(RecipeError) as exc:
        build_recipe(data, source="r.yaml")
    return exc.value.problems


def test_alias_bomb_is_refused_at_once_naming_the_file(tmp_path: Path):
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    started = time.perf_counter()
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    assert time.perf_counter() - started < 1.0
    assert exc.value.source == str(f) and str(f) in str(exc.value)
    (msg,) = exc.value.problems
    assert "more than 100,000 values through YAML anchors and aliases" in msg
    assert "under `junk`, line 3" in msg and "write the values out" in msg


def test_alias_bomb_through_the_cli_exits_2_quickly(tmp_path: Path):
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    out = subprocess.run(
        [sys.executable, "-m", "qlora_sft", "validate", str(f)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(f) in out.stderr and "anchors and aliases" in out.stderr


def test_recursive_alias_is_refused(tmp_path: Path):
    f = tmp_path / "loop.yaml"
    f.write_text("model: {name_or_path: m}\ndata: {sources: [a.jsonl]}\nx: &a {b: *a}\n")
    with pytest.raises(RecipeError, match="refers to the anchor .* it is inside of"):
        load_recipe(f)


def test_a_few_anchors_still_load_with_line_numbers(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {name_or_path: m}\n"  # 1
        "defaults: &lora\n"  # 2 (not a section: reported, with its line)
        "  r: 8\n"  # 3
        "  alpah: 16\n"  # 4
        "lora:\n"  # 5
        "  <<: *lora\n"  # 6
        "  dropout: 0.1\n"  # 7
        "data:\n"  # 8
        "  sources:\n"  # 9
        "    - &src {path: a.jsonl, weight: 2}\n"  # 10
        "  eval_sources: [*src]\n"  # 11
        "  eval_fraction: 0\n"  # 12
        "train:\n"  # 13
        "  learning_rate: -1\n"  # 14
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    text = "\n".join(exc.value.problems)
    assert f"{f}:2: `defaults` is not a recipe section" in text
    # a key merged into lora from the anchor is blamed on the anchor's line
    assert f"{f}:4: `lora.alpah` is not a recipe key; did you mean `lora.alpha`?" in text
    f.write_text(
        "model: {name_or_path: m}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.1}\n"
        "data:\n"
        "  sources:\n"
        "    - &src {path: a.jsonl, weight: 2}\n"
        "  eval_sources:\n"
        "    - *src\n"
        "    - <<: *src\n"
        "      weight: 1\n"
    )
    r = load_recipe(f)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (8, 16.0, 0.1)
    assert r.data.eval_sources[0] == r.data.sources[0] and r.data.sources[0].weight == 2.0
    assert r.data.eval_sources[1].path == "a.jsonl" and r.data.eval_sources[1].weight == 1.0
