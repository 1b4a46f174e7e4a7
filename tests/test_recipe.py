from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, recipe_problems

from qlora_sft.errors import RecipeError
from qlora_sft.recipe import (
    TRAIN_DEFAULTS,
    apply_overrides,
    build_recipe,
    field_docs,
    load_recipe,
    resolve_batch,
)

MINIMAL = {
    "model": {"name_or_path": "some/model"},
    "data": {"sources": [{"path": "train.jsonl"}]},
}


problems = recipe_problems


def test_minimal_recipe_gets_defaults():
    r = build_recipe(MINIMAL)
    assert r.quantization.method == "nf4" and r.quantization.double_quant is True
    assert r.lora.r == 16 and r.lora.target_modules == "all-linear"
    assert r.model.trust_remote_code is False
    assert r.train.args["learning_rate"] == TRAIN_DEFAULTS["learning_rate"]
    assert r.run_dir == Path("runs") / "run"
    assert r.data.sources[0].format == "auto"


def test_unknown_key_names_file_line_and_suggestion(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  name_or_path: x/y\nlora:\n  rank: 8\ndata:\n  sources: [{path: a.jsonl}]\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    (msg,) = exc.value.problems
    assert f"{f}:4:" in msg
    assert "`lora.rank` is not a recipe key; did you mean `lora.r`?" in msg


def test_all_problems_are_reported_together():
    data = {
        **MINIMAL,
        "lora": {"r": 0, "dropout": 1.5, "alpah": 3},
        "quantization": {"method": "nf5"},
        "trian": {},
        "train": {"learning_rat": 1e-4, "max_length": 10},
    }
    ps = problems(data)
    text = "\n".join(ps)
    assert "`lora.r` is 0; it must be >= 1" in text
    assert "`lora.dropout` is 1.5; it must be < 1" in text
    assert "did you mean `lora.alpha`" in text
    assert '`quantization.method` is "nf5"; expected nf4 | fp4 | int8 | none' in text
    assert "`trian` is not a recipe section; did you mean `train`?" in text
    assert "did you mean `train.learning_rate`" in text
    assert "`train.max_length` is set by data.max_length" in text
    assert len(ps) == 7


def test_wrong_types():
    text = "\n".join(
        problems(
            {
                **MINIMAL,
                "lora": {"r": "sixteen"},
                "run": {"overwrite": "yes"},
                "train": {"per_device_train_batch_size": 2.5},
            }
        )
    )
    assert '`lora.r` is "sixteen"; expected int' in text
    assert '`run.overwrite` is "yes"; expected bool' in text
    assert "`train.per_device_train_batch_size` is 2.5; expected int" in text


def test_contradictions():
    text = "\n".join(problems({**MINIMAL, "quantization": {"method": "int8", "double_quant": True}}))
    assert "double quantization applies to nf4/fp4 only" in text
    # int8 with the default double_quant is fine
    assert build_recipe({**MINIMAL, "quantization": {"method": "int8"}}).quantization.method == "int8"
    text = "\n".join(problems({**MINIMAL, "train": {"global_batch_size": 10, "per_device_train_batch_size": 4}}))
    assert "not divisible by train.per_device_train_batch_size=4" in text
    text = "\n".join(problems({**MINIMAL, "train": {"global_batch_size": 8, "gradient_accumulation_steps": 2}}))
    assert "set together with train.global_batch_size" in text
    text = "\n".join(problems({"data": {"sources": []}}))
    assert "`model.name_or_path` is required" in text and "needs at least one source" in text
    ratios = {
        "model": {"name_or_path": "m"},
        "data": {"sources": [{"path": "a", "ratio": 0.5}, {"path": "b", "ratio": 0.3}]},
    }
    assert "ratios sum to 0.8" in "\n".join(problems(ratios))


def test_overrides_are_yaml_typed():
    data, errs = apply_overrides(
        MINIMAL,
        [
            "train.learning_rate=1e-4",
            "run.name=try2",
            "lora.target_modules=[q_proj, v_proj]",
            "data.sources.0.weight=2",
            "run.overwrite=true",
        ],
    )
    assert not errs
    r = build_recipe(data)
    assert r.train.args["learning_rate"] == pytest.approx(1e-4)
    assert r.run.name == "try2" and r.run.overwrite is True
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.sources[0].weight == 2.0
    _, errs = apply_overrides(MINIMAL, ["nonsense", "data.sources.5.path=x", "lora=3"])
    assert len(errs) == 3


def test_unquoted_no_is_the_string_no_where_trl_wants_a_string():
    # YAML 1.1 reads `save_strategy: no` as false; SFTConfig wants the string
    data, _ = apply_overrides(MINIMAL, ["train.save_strategy=no", "train.eval_strategy=no"])
    r = build_recipe(data)
    assert r.train.args["save_strategy"] == "no" and r.train.args["eval_strategy"] == "no"
    (p,) = problems(MINIMAL, ["train.save_strategy=yes"])
    assert "train.save_strategy` is true; expected a string" in p
    (p,) = problems(MINIMAL, ["train.max_steps=no"])
    assert "train.max_steps` is false; expected int" in p


def test_resolved_recipe_round_trips(tmp_path: Path):
    r = build_recipe(MINIMAL)
    f = tmp_path / "resolved.yaml"
    f.write_text(r.to_yaml())
    again = load_recipe(f)
    assert again.to_dict() == r.to_dict()
    assert again.hash() == r.hash()
    # a run without 4-bit weights reads its own recipe.yaml back (double_quant resolves to false);
    # before, its relaunch into the same run directory was refused as unreadable
    plain = build_recipe({**MINIMAL, "quantization": {"method": "none"}})
    assert plain.quantization.double_quant is False
    f.write_text(plain.to_yaml())
    assert load_recipe(f).to_dict() == plain.to_dict()


def test_global_batch_arithmetic():
    r = build_recipe({**MINIMAL, "train": {"global_batch_size": 16, "per_device_train_batch_size": 4}})
    assert resolve_batch(r.train, 1).grad_accum == 4
    assert resolve_batch(r.train, 2).grad_accum == 2
    assert resolve_batch(r.train, 4).grad_accum == 1
    with pytest.raises(RecipeError, match="not divisible by micro batch 4 x 8 process"):
        resolve_batch(r.train, 8)
    plain = build_recipe({**MINIMAL, "train": {"gradient_accumulation_steps": 3, "per_device_train_batch_size": 2}})
    assert resolve_batch(plain.train, 2).global_batch == 12


def test_every_field_is_documented():
    from qlora_sft.recipe import SECTIONS, DataSource

    for cls in [*SECTIONS.values(), DataSource]:
        import dataclasses

        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_bundled_recipes_validate():
    for path in sorted((REPO / "configs" / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_cli_exit_code_2_without_traceback(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({**MINIMAL, "lora": {"rank": 4}}))
    cmd = [sys.executable, "-m", "qlora_sft", "validate", str(f)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean `lora.r`" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "qlora_sft", "--debug", *cmd[3:]], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_recipe_reference_is_generated_from_the_code():
    from qlora_sft.docs import PAGE, splice

    page = (REPO / PAGE).read_text(encoding="utf-8")
    assert splice(page) == page, f"{PAGE} is stale: run `python -m qlora_sft.docs --write`"
    assert "recipe-reference:start" not in (REPO / "README.md").read_text(encoding="utf-8")


def test_command_line_consistency(tmp_path: Path):
    """--version; --debug before or after the command; an override's error names the override."""
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({**MINIMAL, "train": {"learning_rate": 1e-4}}))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qlora_sft", *args], capture_output=True, text=True)

    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("qlora-sft ")
    for args in (("validate", str(f), "train.learning_rate=abc", "--debug"), ("--debug", "validate", str(f))):
        assert "Traceback" in cli(*args).stderr
    plain = cli("validate", str(f), "train.learning_rate=abc", "lora.r=0")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert 'override `train.learning_rate=abc`: `train.learning_rate` is "abc"; expected float' in plain.stderr
    assert "override `lora.r=0`: `lora.r` is 0; it must be >= 1" in plain.stderr
    assert not re.search(rf"{re.escape(str(f))}:\d", plain.stderr)  # no line of the file is blamed


def test_train_vocabulary_cache_checks_exactly_as_trl_itself(tmp_path: Path, monkeypatch):
    """The `train:` vocabulary kept between commands (plan runs in a second) admits and refuses the
    same values as SFTConfig's own annotations; a corrupt cache file is rebuilt, not trusted."""
    import dataclasses
    import typing

    from trl import SFTConfig

    from qlora_sft import recipe as r

    monkeypatch.setenv("QLORA_SFT_CACHE", str(tmp_path))
    r.sft_field_types.cache_clear()
    built = r.sft_field_types()
    (cache,) = tmp_path.glob("sft-fields-*.json")
    r.sft_field_types.cache_clear()
    read = r.sft_field_types()  # from the file this time
    hints = typing.get_type_hints(SFTConfig)
    live = {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(SFTConfig) if f.init}
    assert built.keys() == read.keys() == live.keys()
    for name, annotation in live.items():
        for got in (built[name], read[name]):
            assert r._checkable_type(got) == r._checkable_type(annotation), name
            for kind in (str, bool, int, float):
                assert r._admits(got, kind) == r._admits(annotation, kind), (name, kind)
    cache.write_text('{"fields": {"learning_rate": "complex"}}')  # corrupt, same name
    r.sft_field_types.cache_clear()
    assert r.sft_field_types().keys() == live.keys()
    assert "complex" not in cache.read_text()
    r.sft_field_types.cache_clear()
