"""Issue 24: a recipe is read in bounded time and memory, and every number the trainer would refuse
after the model loads (or take and then train wrongly) is refused by `validate`, with its key."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import MINIMAL_RECIPE, recipe_problems

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


problems = recipe_problems


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
    assert f"{f}:14: `train.learning_rate` is -1.0; it must be > 0" in text
    f.write_text(
        "model: {name_or_path: m}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.1}\n"
        "data:\n"
        "  sources:\n"
        "    - &src {path: a.jsonl, weight: 2}\n"
        "  eval_sources:\n"
        "    - <<: *src\n"  # (a bare `*src` brings weight 2, which an eval source refuses)
        "      weight: 1\n"
    )
    r = load_recipe(f)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (8, 16.0, 0.1)
    assert r.data.sources[0].weight == 2.0
    assert r.data.eval_sources[0].path == "a.jsonl" and r.data.eval_sources[0].weight == 1.0


@pytest.mark.parametrize(
    "key,value",
    [
        ("lora.alpha", ".nan"),
        ("lora.dropout", ".nan"),
        ("data.sources.0.weight", ".inf"),
        ("train.learning_rate", ".inf"),
        ("train.learning_rate", ".nan"),
        ("train.learning_rate", "nan"),  # YAML 1.1 reads it as a string; the float field takes it
        ("train.num_train_epochs", ".inf"),
        ("train.weight_decay", ".nan"),
        ("train.max_grad_norm", ".inf"),
        ("train.lr_scheduler_kwargs", "{min_lr: .nan}"),
    ],
)
def test_nan_and_infinity_are_refused_anywhere(key: str, value: str):
    override = f"{key}={value}"
    data, override_problems = apply_overrides(
        {**MINIMAL_RECIPE, "data": {"sources": [{"path": "a.jsonl"}]}}, [override]
    )
    assert not override_problems
    with pytest.raises(RecipeError) as exc:
        build_recipe(data, source="r.yaml", overrides={key: override})
    (msg,) = exc.value.problems
    assert msg.startswith(f"override `{override}`: `{key}")
    assert "expected a finite number" in msg


def test_nonfinite_in_the_file_names_its_line(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("model: {name_or_path: m}\ndata:\n  sources:\n    - path: a.jsonl\n      weight: .inf\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    assert exc.value.problems == [f"{f}:5: `data.sources.0.weight` is inf; expected a finite number"]


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("learning_rate", -1, "is -1.0; it must be > 0"),
        ("learning_rate", 0, "is 0.0; it must be > 0"),
        ("max_steps", 0, "is 0; it must be >= 1, or -1 (the default)"),
        ("max_steps", -5, "is -5; it must be >= 1, or -1"),
        ("warmup_steps", -1, "is -1.0; it must be a whole number of steps (>= 0) or a fraction"),
        ("warmup_steps", 2.5, "is 2.5; it must be a whole number of steps"),
        ("weight_decay", -0.1, "is -0.1; it must be >= 0"),
        ("max_grad_norm", -1, "is -1.0; it must be >= 0 (0 turns gradient clipping off)"),
        ("adam_beta1", 1.0, "is 1.0; it must be in [0, 1)"),
        ("adam_beta2", -0.5, "is -0.5; it must be in [0, 1)"),
        ("adam_epsilon", 0, "is 0.0; it must be > 0"),
        ("logging_steps", 0, "is 0.0; it must be a whole number of steps (>= 1) or a fraction of the training"),
        ("logging_steps", 2.5, "is 2.5; it must be a whole number of steps"),
        ("save_steps", 0, "is 0.0; it must be a whole number of steps"),
        ("save_steps", -10, "is -10.0; it must be a whole number of steps"),
        (
            "eval_steps",
            0,
            "is 0.0; it must be a whole number of steps (>= 1) or a fraction of the training steps in (0, 1); "
            "leave it out to evaluate every train.logging_steps",
        ),
        ("nonfinite_patience", 0, "is 0; it must be >= 1"),
    ],
)
def test_numbers_the_trainer_would_refuse_are_refused_by_validate(key: str, value: float, expected: str):
    ps = problems({**MINIMAL_RECIPE, "train": {key: value}})
    assert len(ps) == 1 and ps[0].startswith(f"`train.{key}` {expected}"), ps


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_a_seed_numpy_refuses_is_refused_by_validate(seed: int):
    """transformers' set_seed hands the seed to numpy, which takes 0 to 2**32 - 1: -1 passed validate and
    the launch died in set_seed ("Seed must be between 0 and 2**32 - 1"), after the data was read."""
    bound = "it must be >= 0" if seed < 0 else "it must be <= 4294967295"
    ps = problems({**MINIMAL_RECIPE, "run": {"seed": seed}})
    assert ps == [f"`run.seed` is {seed}; {bound}"], ps
    source = {"path": "a.jsonl", "max_rows": 5, "max_rows_seed": seed}
    ps = problems({**MINIMAL_RECIPE, "data": {"sources": [source]}})
    assert ps == [f"`data.sources.0.max_rows_seed` is {seed}; {bound}"], ps
    assert build_recipe({**MINIMAL_RECIPE, "run": {"seed": 2**32 - 1}}, source="r.yaml").run.seed == 2**32 - 1


def test_warmup_ratio_out_of_range_is_refused():
    for value in (1.5, -0.1):
        ps = problems({**MINIMAL_RECIPE, "train": {"warmup_ratio": value}})
        # transformers 5 has no warmup_ratio (warmup_steps < 1 is the ratio); earlier ones check [0, 1]
        assert len(ps) == 1 and ps[0].startswith("`train.warmup_ratio`"), ps
        assert "warmup_steps" in ps[0] or "it must be in [0, 1]" in ps[0]


def test_what_transformers_accepts_still_validates():
    r = build_recipe(
        {
            **MINIMAL_RECIPE,
            "train": {
                "logging_steps": 0.1,  # a fraction of the training steps
                "save_steps": 100,
                "eval_steps": 0.25,
                "warmup_steps": 0.03,
                "max_grad_norm": 0,  # clipping off
                "weight_decay": 0,
                "adam_beta1": 0.0,
                "max_steps": -1,
                "num_train_epochs": 1.5,
            },
        }
    )
    assert r.train.args["logging_steps"] == 0.1 and r.train.args["max_grad_norm"] == 0.0
    assert r.train.nonfinite_patience == 3 and r.checkpoint.allow_data_change is False
    r = build_recipe(
        {
            **MINIMAL_RECIPE,
            "train": {"nonfinite_patience": 1, "warmup_steps": 10},
            "checkpoint": {"allow_data_change": True},
        }
    )
    assert r.train.nonfinite_patience == 1 and r.checkpoint.allow_data_change is True
    assert all(math.isfinite(v) for v in r.train.args.values() if isinstance(v, float))
    assert yaml.safe_load(r.to_yaml())["checkpoint"]["allow_data_change"] is True


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "r.yaml", "--gpus", "0"],
        ["plan", "r.yaml", "--gpus", "-2"],
        ["plan", "r.yaml", "--nodes", "0"],
        ["plan", "r.yaml", "--nodes", "-1"],
        ["submit", "r.yaml", "--gpus-per-node", "-3"],
        ["submit", "r.yaml", "--nodes", "0"],
        ["submit", "r.yaml", "--tasks-per-node", "0"],
        ["submit", "r.yaml", "--cpus-per-task", "two"],
        ["chat", "m", "--max-new-tokens", "-5"],
        ["chat", "m", "--temperature", "nan"],
        ["chat", "m", "--temperature", "-1"],
    ],
)
def test_counts_and_numbers_on_the_command_line_are_checked(argv: list[str], capsys):
    """Node, GPU, task and token counts below 1 (GPUs per node below 0), and a temperature that is
    negative or NaN, are refused by the parser with the value and the fix (they were accepted:
    "-1 node(s) x 1 process(es)", or silently greedy)."""
    from qlora_sft import cli

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert repr(argv[-1]) in capsys.readouterr().err
    ok = {"--gpus-per-node": "0", "--temperature": "0.7"}.get(argv[-2], "2")
    cli.build_parser().parse_args([*argv[:-1], ok])  # a sound value of the same flag parses


def test_shard_size_is_a_size():
    from qlora_sft.errors import UserError
    from qlora_sft.export import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5MB") == 1_500_000
    for bad in (".", "1.2.3GB", "", "0", "100KB", "-5GB"):
        with pytest.raises(UserError, match="--shard-size"):
            parse_size(bad)
