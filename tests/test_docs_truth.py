"""The docs against the code, where the code can be asked directly: the recipe reference's defaults and
limits, the train keys it says are refused, the flags of every documented command line, the names of
a run directory's files and the modules of docs/code-layout.md. (The generated key tables themselves
are kept in step by test_recipe.py::test_recipe_reference_is_generated_from_the_code.)"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from qlora_sft import checkpoint, recipe
from qlora_sft.cli import build_parser
from qlora_sft.errors import RecipeError
from qlora_sft.recipe import SECTIONS, TRAIN_DEFAULTS, TRAIN_VALUE_RULES, DataSource, build_recipe

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
REFERENCE = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
MINIMAL = {"model": {"name_or_path": "some/model"}, "data": {"sources": ["train.jsonl"]}}


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in `text` (header and rule rows left out)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith(("| key |", "| --- |")):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


# --------------------------------------------------------------------------------------------
# docs/recipe-reference.md
# --------------------------------------------------------------------------------------------


def allowed(meta: dict) -> str:
    """A field's range metadata as the limits table writes it."""
    lo = f"[{meta['min']}" if "min" in meta else (f"({meta['gt']}" if "gt" in meta else None)
    hi = f"{meta['max']}]" if "max" in meta else (f"{meta['lt']})" if "lt" in meta else None)
    if lo and hi:
        return f"{lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    assert hi
    return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]


def test_limits_table_is_the_codes_ranges():
    """Every range the recipe enforces is in the limits table with the same bounds, and the table
    lists nothing the code does not enforce."""
    expected = {}
    for name, cls in [*SECTIONS.items(), ("data.sources[]", DataSource)]:
        for f in dataclasses.fields(cls):
            if f.metadata:
                expected[f"{name}.{f.name}"] = allowed(dict(f.metadata))
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        expected[f"train.{name}"] = ">= 1"
    for name, (_, message) in TRAIN_VALUE_RULES.items():
        expected[f"train.{name}"] = message.removeprefix("it must be ")
    documented = {row[0].strip("`"): row[1] for row in table_rows(section(REFERENCE, "## Limits"))}
    assert documented == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [("lora.alpha", 0.0), ("data.max_length", 7), ("cluster.signal_grace_s", 9), ("train.micro_batch_tokens", 4)],
)
def test_limits_are_refused_at_the_documented_bound(key: str, value: float):
    """A few limits the field docstrings do not state, refused where the table says."""
    sec, name = key.split(".")
    data = json.loads(json.dumps(MINIMAL))
    data.setdefault(sec, {})[name] = value
    with pytest.raises(RecipeError, match=re.escape(f"`{key}` is {value}; it must be")):
        build_recipe(data)


def documented_defaults() -> dict[str, object]:
    """`key -> default` of the generated tables (JSON values; `—` and empty cells left out)."""
    generated = REFERENCE.split("<!-- recipe-reference:start", 1)[1].split("<!-- recipe-reference:end", 1)[0]
    out = {}
    for row in table_rows(generated):
        key, default = row[0].strip("`"), row[2]
        if default.startswith("`") and default.endswith("`"):
            out[key] = json.loads(default.strip("`"))
    return out


def test_documented_defaults_are_what_a_recipe_gets():
    """A recipe that sets only what is required gets every default the reference states (checked on
    the built recipe, after every resolution build_recipe applies, not on the dataclass)."""
    built = build_recipe(MINIMAL)
    flat = built.to_dict()
    source = dataclasses.asdict(built.data.sources[0])
    defaults = documented_defaults()
    assert len(defaults) > 60
    skip = {"model.name_or_path", "path"}  # required: given by MINIMAL
    for key, default in defaults.items():
        if key in skip:
            continue
        if "." in key:
            sec, name = key.split(".", 1)
            value = flat[sec][name]
        else:
            value = source[key]
        assert value == default, f"{key}: the reference says {default!r}, a recipe gets {value!r}"
    train_text = section(REFERENCE, "## `train:`")
    for name, value in TRAIN_DEFAULTS.items():
        assert f"`{name}: {json.dumps(value)}`" in train_text
        assert built.train.args[name] == value
    # "with packing `micro_batch_tokens // data.max_length` packed rows, else 4"
    assert built.train.args["per_device_train_batch_size"] == 8192 // 1024
    unpacked = build_recipe({**MINIMAL, "data": {**MINIMAL["data"], "packing": False}})
    assert unpacked.train.args["per_device_train_batch_size"] == 4
    assert f"rows, else {recipe.UNPACKED_MICRO_BATCH}" in train_text


def test_train_keys_the_reference_calls_owned_are_refused():
    train_text = section(REFERENCE, "## `train:`")
    listed = train_text.split("Keys another section owns are refused here:", 1)[1].split("\n\n", 1)[0]
    owned = re.findall(r"`(\w+)` \(", listed)
    assert set(owned) == set(recipe.TRAIN_OWNED)
    data = {**MINIMAL, "train": dict.fromkeys(owned, 1)}
    with pytest.raises(RecipeError) as info:
        build_recipe(data)
    for key in owned:
        assert f"`train.{key}` is set by" in str(info.value), key


# --------------------------------------------------------------------------------------------
# Command lines in README.md and the docs this test owns
# --------------------------------------------------------------------------------------------

PAGES = ["README.md", *(f"docs/{p}" for p in ("checkpoints.md", "export.md", "tracking.md", "migration.md"))]
COMMAND = re.compile(r"qlora-sft (train|validate|prepare|plan|submit|export|chat|plot)\b([^`\n#|]*)")


def options(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {o for action in sub.choices[command]._actions for o in action.option_strings}


def test_documented_command_lines_use_real_flags():
    seen = 0
    for page in PAGES:
        for match in COMMAND.finditer((REPO / page).read_text(encoding="utf-8")):
            command, rest = match.groups()
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                seen += 1
                assert flag in options(command), f"{page}: `qlora-sft {command} ... {flag}`: no such flag"
    assert seen >= 15


def test_documented_export_and_chat_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    export = {a.dest: a.default for a in sub.choices["export"]._actions}
    chat = {a.dest: a.default for a in sub.choices["chat"]._actions}
    text = (DOCS / "export.md").read_text(encoding="utf-8")
    assert export["dtype"] == "bf16" and "`--base dequantized --dtype bf16` (default)" in text
    assert export["device"] == "cpu" and "on the CPU by default" in text
    assert export["shard_size"] == "5GB" and "--shard-size 5GB" in text
    assert chat["temperature"] == 0.0 and "`--temperature` (0 = greedy)" in text


# --------------------------------------------------------------------------------------------
# docs/checkpoints.md: the run directory
# --------------------------------------------------------------------------------------------


def test_run_directory_names_are_the_codes():
    text = (DOCS / "checkpoints.md").read_text(encoding="utf-8")
    tree = text.split("```\nruns/<name>/", 1)[1].split("```", 1)[0]
    for name in (
        checkpoint.COMPLETE,
        checkpoint.MANIFEST,
        checkpoint.STAGING,
        checkpoint.LOCK,
        checkpoint.PREEMPTED,
        recipe.RUN_RECIPE,
        "metrics.jsonl",
        "metrics.replayed.jsonl",
        "loss.png",
        "final.step-",
        "merged/",
    ):
        assert name in tree, name
    code = (REPO / "src/qlora_sft/checkpoint.py").read_text(encoding="utf-8")
    assert '"metrics.replayed.jsonl"' in code and 'f"final.step-{step}"' in code
    assert "keep_aside(final, why)" in code and '"replaced" if info.complete else "incomplete"' in code
    assert 'EXPORT_MARKER = "qlora-sft-export.json"' in (REPO / "src/qlora_sft/export.py").read_text()
    assert "qlora-sft-export.json" in tree
    assert re.search(r"logs/rank\{rank\}\.json|rank<i>\.json", (REPO / "src/qlora_sft/launch.py").read_text())
    assert checkpoint.REQUEUE_EXIT_CODE == 75 and "code **75**" in text


# --------------------------------------------------------------------------------------------
# docs/code-layout.md
# --------------------------------------------------------------------------------------------


def test_code_layout_names_every_module_and_only_those():
    text = (DOCS / "code-layout.md").read_text(encoding="utf-8")
    block = text.split("```\nsrc/qlora_sft/", 1)[1].split("```", 1)[0]
    package = REPO / "src" / "qlora_sft"
    real = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    for sub in ("data", "model"):
        real |= {p.name for p in (package / sub).glob("*.py") if p.name != "__init__.py"}
    named = set(re.findall(r"(?<![\w/.])(\w+\.py)\b", block.split("\nbench/", 1)[0]))
    assert named == real
