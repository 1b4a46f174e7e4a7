"""Recipe values from a hostile but realistic user: a typo in an optimizer name, a section written
twice, an override into a source given as a bare path, counts of 0 or past 2**63, control characters
in paths, target modules that name nothing, trainer settings that contradict each other. Each is
refused by `build_recipe` (and so by `validate` and every command) with the key and the fix, before
a model or any data loads; before, each passed and crashed once the model had loaded (or raised a
traceback, or silently trained something else)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MINIMAL_RECIPE, REPO, recipe_problems

from qlora_sft.errors import RecipeError
from qlora_sft.recipe import apply_overrides, build_recipe, load_recipe, replace

LOADERS = ("qlora_sft.model", "qlora_sft.model.load")  # load_base: the one way a base model loads


@pytest.fixture(autouse=True)
def nothing_loads() -> Iterator[None]:
    """No test here gets as far as the model: the modules that load one stay unimported."""
    before = {name for name in LOADERS if name in sys.modules}
    yield
    assert {name for name in LOADERS if name in sys.modules} == before


def refused(overrides: list[str], data: dict[str, Any] | None = None) -> list[str]:
    """The problems of MINIMAL_RECIPE (or `data`) with `overrides`, each blamed on its override."""
    data, override_problems = apply_overrides(data or MINIMAL_RECIPE, overrides)
    assert not override_problems
    given = {o.split("=", 1)[0]: o for o in overrides}
    with pytest.raises(RecipeError) as exc:
        build_recipe(data, source="r.yaml", overrides=given)
    return exc.value.problems


def validate_cli(recipe: Path, *overrides: str, command: str = "validate") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_sft", command, str(recipe), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )


# --------------------------------------------------------------------------------------------
# train: names transformers reads into an enum (the optimizer, the scheduler, the strategies)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("optim", "adamw_torchh", "did you mean `adamw_torch`?"),
        ("optim", "paged_adamw_8bits", "did you mean `paged_adamw_8bit`?"),
        ("lr_scheduler_type", "cosinee", "did you mean `cosine`?"),
        ("eval_strategy", "epochs", "did you mean `epoch`?"),
        ("save_strategy", 0, "expected one of no, steps, epoch, best"),
        ("logging_strategy", "", "expected one of no, steps, epoch"),
        ("hub_strategy", "every-save", "did you mean `every_save`?"),
    ],
)
def test_a_name_transformers_does_not_know_is_refused_before_the_model_loads(key: str, value: Any, expected: str):
    """`train.optim: adamw_torchh` passed validate: TrainingArguments turns the name into an enum only
    when SFTConfig is built, after the model was loaded (`... is not a valid OptimizerNames`)."""
    ps = recipe_problems({**MINIMAL_RECIPE, "train": {key: value}})
    assert len(ps) == 1 and ps[0].startswith(f"`train.{key}` is {json.dumps(value)}"), ps
    assert expected in ps[0], ps
    # the names transformers knows still validate
    r = build_recipe(
        {
            **MINIMAL_RECIPE,
            "train": {
                "optim": "adamw_torch_fused",
                "lr_scheduler_type": "cosine_with_min_lr",
                "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                "save_strategy": "best",
                "metric_for_best_model": "loss",
                "logging_strategy": "steps",
                "eval_strategy": False,  # YAML 1.1's `no`
            },
        }
    )
    assert r.train.args["optim"] == "adamw_torch_fused" and r.train.args["eval_strategy"] == "no"
    assert r.train.args["save_strategy"] == "best"


# --------------------------------------------------------------------------------------------
# The YAML file
# --------------------------------------------------------------------------------------------


def test_a_key_or_section_given_twice_in_the_file_is_refused_naming_both_lines(tmp_path: Path):
    """YAML keeps the last of two equal keys without a word: a second `lora:` section at the end of the
    file dropped the first one (its `r: 64` became the default 16), and a key written twice in one
    section took whichever came last."""
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {name_or_path: m}\n"  # 1
        "lora:\n"  # 2
        "  r: 64\n"  # 3
        "data:\n"  # 4
        "  sources:\n"  # 5
        "    - path: a.jsonl\n"  # 6
        "      weight: 2\n"  # 7
        "      weight: 3\n"  # 8
        "train:\n"  # 9
        "  learning_rate: 1e-4\n"  # 10
        "  learning_rate: 2e-4\n"  # 11
        "lora:\n"  # 12
        "  alpha: 16\n"  # 13
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    text = "\n".join(exc.value.problems)
    assert f"{f}:12: `lora` is given twice (lines 2 and 12)" in text
    assert f"{f}:8: `data.sources.0.weight` is given twice (lines 7 and 8)" in text
    assert f"{f}:11: `train.learning_rate` is given twice (lines 10 and 11)" in text
    assert len(exc.value.problems) == 3
    # `<<: *anchor` then a key of the anchor's is no duplicate: the key given overrides the merged one
    f.write_text(
        "model: {name_or_path: m}\n"
        "data:\n"
        "  sources:\n"
        "    - &src {path: a.jsonl, weight: 2}\n"
        "  eval_sources:\n"
        "    - <<: *src\n"
        "      weight: 1\n"
    )
    r = load_recipe(f)
    assert r.data.sources[0].weight == 2.0 and r.data.eval_sources[0].weight == 1.0


def test_validate_refuses_a_duplicated_section_and_an_unknown_optimizer_with_exit_2(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("model: {name_or_path: m}\ndata: {sources: [a.jsonl]}\nlora: {r: 64}\nlora: {alpha: 8}\n")
    out = validate_cli(f, "train.optim=adamw_torchh")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"{f}:4: `lora` is given twice (lines 3 and 4)" in out.stderr
    assert 'override `train.optim=adamw_torchh`: `train.optim` is "adamw_torchh"' in out.stderr


@pytest.mark.parametrize(
    ("text", "key", "fix"),
    [
        ("  max_steps: 1e3\n", "train.max_steps", "write it as 1000"),
        ("  global_batch_size: 1.6e1\n", "train.global_batch_size", "write it as 16"),
    ],
)
def test_a_count_written_in_e_notation_says_how_to_write_it(tmp_path: Path, text: str, key: str, fix: str):
    """YAML 1.1 reads `1e3` (no dot) as the string "1e3": a key that takes a float reads it as the number,
    a count refused it as `"1e3"; expected int`, which reads as nonsense to whoever wrote a number."""
    f = tmp_path / "r.yaml"
    f.write_text(f"model: {{name_or_path: m}}\ndata: {{sources: [a.jsonl]}}\ntrain:\n{text}")
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    (msg,) = exc.value.problems
    assert msg.startswith(f"{f}:4: `{key}` is ") and fix in msg, msg


@pytest.mark.parametrize(
    ("key", "place"),
    [
        ("train.lora_r", "lora.r"),  # was: "did you mean `train.local_rank`?"
        ("train.lora_alpha", "lora.alpha"),  # was: no hint
        ("train.sequence_len", "data.max_length"),
        ("lora.learning_rate", "train.learning_rate"),
        ("model.max_length", "data.max_length"),
        ("quantization.r", "lora.r"),
        ("run.max_steps", "train.max_steps"),
    ],
)
def test_a_key_under_the_wrong_section_names_the_section_it_belongs_to(key: str, place: str):
    (msg,) = refused([f"{key}=8"])
    assert msg.endswith(f"`{key}` is not a recipe key; it belongs to `{place}`") or msg.endswith(
        f"`{key}` is not a trl.SFTConfig field; it belongs to `{place}`"
    ), msg


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_an_override_into_a_source_given_as_a_bare_path():
    """`sources: [a.jsonl]` (a bare string is a path) and `data.sources.0.weight=2`: apply_overrides
    raised TypeError ('str' object does not support item assignment), a traceback."""
    bare = {"model": {"name_or_path": "m"}, "data": {"sources": ["a.jsonl", {"path": "b.jsonl"}]}}
    data, problems = apply_overrides(bare, ["data.sources.0.weight=2", "data.sources.1.weight=3"])
    assert not problems
    r = build_recipe(data)
    assert (r.data.sources[0].path, r.data.sources[0].weight) == ("a.jsonl", 2.0)
    assert (r.data.sources[1].path, r.data.sources[1].weight) == ("b.jsonl", 3.0)


def test_an_override_into_an_empty_section(tmp_path: Path):
    """`train:` with every key commented out reads as null; `train.learning_rate=1e-4` was refused as
    "`train` is not a section", though the recipe itself validates."""
    f = tmp_path / "r.yaml"
    f.write_text("model: {name_or_path: m}\ndata: {sources: [a.jsonl]}\ntrain:\n  # learning_rate: 2e-4\nlora:\n")
    r = load_recipe(f, ["train.learning_rate=1e-4", "lora.r=4"])
    assert r.train.args["learning_rate"] == 1e-4 and r.lora.r == 4


def test_an_override_into_a_list_the_recipe_does_not_have_names_the_list():
    """`data.eval_sources.0.path=b.jsonl` in a recipe without eval sources was reported as
    "`data.eval_sources.0.0` is not a recipe key": a key nobody wrote."""
    _, problems = apply_overrides(MINIMAL_RECIPE, ["data.eval_sources.0.path=b.jsonl"])
    (msg,) = problems
    assert msg.startswith("override `data.eval_sources.0.path=b.jsonl`: `data.eval_sources` has no entry 0"), msg
    assert "data.eval_sources=[{path: b.jsonl}]" in msg


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def test_max_length_zero_is_refused_not_a_traceback():
    """`data.max_length: 0` raised ZeroDivisionError while the micro batch was derived from it."""
    assert refused(["data.max_length=0"]) == [
        "override `data.max_length=0`: `data.max_length` is 0; it must be >= 8",
    ]


@pytest.mark.parametrize(
    "key", ["lora.r", "data.max_length", "train.max_steps", "train.per_device_train_batch_size", "checkpoint.keep_last"]
)
def test_a_count_past_int64_is_refused(key: str):
    """2**70 passed every `>= 1` check; torch and the tokenizers hold 64-bit integers, so LoRA's
    matrices, the truncation length or the step counter failed once the model had loaded."""
    (msg,) = refused([f"{key}={2**70}"])
    assert msg == f"override `{key}={2**70}`: `{key}` is {2**70}; it must be <= {2**63 - 1}"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dataloader_num_workers", -1, "is -1; it must be >= 0 (0 loads batches in the training process)"),
        ("eval_accumulation_steps", 0, "is 0; it must be >= 1, or left out"),
        ("neftune_noise_alpha", -5, "is -5.0; it must be >= 0"),
    ],
)
def test_trainer_numbers_that_fail_in_the_middle_of_training_are_refused(key: str, value: float, expected: str):
    """dataloader_num_workers -1 reached torch's DataLoader (`num_workers option should be non-negative`)
    after the model loaded; eval_accumulation_steps 0 divided by zero at the first evaluation;
    a negative NEFTune alpha made `uniform_(a, -a)` fail on the first step."""
    ps = recipe_problems({**MINIMAL_RECIPE, "train": {key: value}})
    assert ps == [f"`train.{key}` {expected}"], ps


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("train.learning_rate", "is 1e+308; it must be > 0 and at most 1 (e.g. 2e-4)"),
        ("train.adam_epsilon", "is 1e+308; it must be > 0 and below 1 (e.g. 1e-8)"),
        ("train.weight_decay", "is 1e+308; with train.learning_rate 0.0002 each step multiplies the weights by"),
        ("lora.alpha", "is 1e+308, past the largest float32 (3.4e+38)"),
        ("data.sources.0.weight", "is 1e+308, past the largest float32 (3.4e+38)"),
        ("train.max_grad_norm", "is 1e+308, past the largest float32 (3.4e+38)"),
        ("train.num_train_epochs", "is 1e+308, past the largest float32 (3.4e+38)"),
        ("train.warmup_steps", "is 1e+308, past the largest float32 (3.4e+38)"),
        ("train.save_steps", "is 1e+308, past the largest float32 (3.4e+38)"),
        ("train.neftune_noise_alpha", "is 1e+308, past the largest float32 (3.4e+38)"),
    ],
)
def test_a_huge_finite_number_is_refused_with_its_key(key: str, expected: str):
    """`1e308` is finite, so the NaN/inf check let it through, and every `>= 0` rule too: a learning
    rate, LoRA alpha or NEFTune alpha of 1e308 becomes inf in torch's float32 and trained NaN from the
    first step (an Adam epsilon of 1e308 shrank every update to nothing; a weight decay of 1e308 flipped
    the weights to inf), once the model had loaded; a source weight of 1e308 made the data mix overflow
    (`round(inf)`)."""
    (msg,) = refused([f"{key}=1e308"])
    assert msg.startswith(f"override `{key}=1e308`: `{key}` {expected}"), msg


def test_a_learning_rate_times_weight_decay_of_one_or_more_is_refused():
    """Decoupled weight decay multiplies every weight by 1 - lr x wd each step: at 1 or more it zeroes
    the weights or flips their sign at every step."""
    (msg,) = refused(["train.learning_rate=0.01", "train.weight_decay=200"])
    assert msg == (
        "override `train.weight_decay=200`: `train.weight_decay` is 200.0; with train.learning_rate 0.01 each "
        "step multiplies the weights by 1 - learning_rate x weight_decay = -1, which zeroes them or flips their "
        "sign. Give a weight decay below 1 / learning_rate = 100 (usually 0 to 0.1)"
    ), msg
    r = build_recipe({**MINIMAL_RECIPE, "train": {"learning_rate": 0.01, "weight_decay": 1.0}})  # grokking-style
    assert r.train.args["weight_decay"] == 1.0


def test_a_count_written_in_e_notation_past_int64_is_not_told_to_write_309_digits(tmp_path: Path):
    """`max_steps: 1e308` said "write it as 1000000000000000010979063629440455417404923096773118463368106829
    6267...": a 309-digit count, which is then refused as past 2**63 - 1."""
    f = tmp_path / "r.yaml"
    f.write_text("model: {name_or_path: m}\ndata: {sources: [a.jsonl]}\ntrain:\n  max_steps: 1e308\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    (msg,) = exc.value.problems
    assert msg == f'{f}:4: `train.max_steps` is "1e308"; expected int (a count must be <= {2**63 - 1})', msg


# --------------------------------------------------------------------------------------------
# Contradictions transformers refuses only when SFTConfig is built (after the model loads)
# --------------------------------------------------------------------------------------------


def test_load_best_model_at_end_without_eval_data_is_refused():
    """qlora-sft turns evaluation off when there is no eval split; TrainingArguments then refused
    load_best_model_at_end ("requires the save and eval strategy to match") after the model loaded."""
    (msg,) = refused(["train.load_best_model_at_end=true", "data.eval_fraction=0"])
    assert msg.startswith("override `train.load_best_model_at_end=true`: `train.load_best_model_at_end` asks for")
    assert "set data.eval_fraction or data.eval_sources" in msg
    (msg,) = refused(["train.load_best_model_at_end=true", "train.save_steps=10", "train.eval_steps=7"])
    assert "`train.save_steps` is 10.0, not a multiple of train.eval_steps=7.0" in msg
    r = build_recipe({**MINIMAL_RECIPE, "train": {"load_best_model_at_end": True, "save_steps": 20, "eval_steps": 10}})
    assert r.train.args["load_best_model_at_end"] is True


def test_a_prefetch_factor_without_worker_processes_is_refused():
    (msg,) = refused(["train.dataloader_prefetch_factor=4"])
    assert "`train.dataloader_prefetch_factor` applies only with train.dataloader_num_workers > 0" in msg
    r = build_recipe({**MINIMAL_RECIPE, "train": {"dataloader_prefetch_factor": 4, "dataloader_num_workers": 2}})
    assert r.train.args["dataloader_prefetch_factor"] == 4


@pytest.mark.parametrize("eval_source", ["{path: b.jsonl, weight: 3}", "{path: b.jsonl, ratio: 0.5}"])
def test_a_mixing_key_on_an_eval_source_is_refused(eval_source: str, tmp_path: Path):
    """`weight`/`ratio` mix the training sources; an eval source is read in full. Given on one, they
    passed validate and did nothing (or, with data.streaming, where the eval sources are prepared like
    a data set of their own, a weight quietly sampled the eval rows)."""
    key = "ratio" if "ratio" in eval_source else "weight"
    (msg,) = refused([f"data.eval_sources=[{eval_source}]"])
    assert f"`data.eval_sources.0.{key}` is " in msg, msg
    assert "an eval source is read in full (weight and ratio mix the training sources); remove it" in msg, msg
    assert "max_rows: N" in msg, msg
    # a training source reused as an eval source with an alias brings its weight: blamed on the anchor's line
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {name_or_path: m}\n"
        "data:\n"
        "  sources:\n"
        "    - &src {path: a.jsonl, weight: 2}\n"  # 4
        "  eval_sources: [*src]\n"
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    (msg,) = exc.value.problems
    assert msg.startswith(f"{f}:4: `data.eval_sources.0.weight` is 2.0, but an eval source is read in full"), msg
    assert "write `{<<: *anchor, weight: 1}`" in msg, msg
    # the defaults a resolved recipe writes (weight 1.0, ratio null) read back
    data, _ = apply_overrides(MINIMAL_RECIPE, ["data.eval_sources=[{path: b.jsonl}]"])
    r = build_recipe(data)
    assert replace(r, []).data.eval_sources == r.data.eval_sources


def test_the_recipe_a_run_with_eval_sources_wrote_reads_back_and_the_run_resumes(tmp_path: Path):
    """A run's recipe.yaml names every key, `data.eval_fraction: 0.05` (the default) beside the
    `eval_sources` too, and reading it back refused it ("is set together with data.eval_sources"): every
    relaunch of a run with eval sources was refused ("recipe.yaml cannot be read as a recipe ... set
    run.overwrite=true"), so it could not resume, and `export` of the run failed the same way."""
    from helpers import fake_checkpoint

    from qlora_sft.checkpoint import check_run_dir
    from qlora_sft.recipe import read_run_recipe, write_run_recipe

    data = {**MINIMAL_RECIPE, "run": {"output_dir": str(tmp_path)}}
    data["data"] = {**data["data"], "eval_sources": ["b.jsonl"]}
    r = build_recipe(data)
    r.run_dir.mkdir(parents=True)
    write_run_recipe(r.run_dir, r, {"world_size": 1})
    fake_checkpoint(r.run_dir / "checkpoint-2", 2)
    assert read_run_recipe(r.run_dir).to_dict() == r.to_dict()
    assert check_run_dir(r) == "resume"
    # a user who gives both is still told
    data["data"] = {**data["data"], "eval_fraction": 0.1}
    with pytest.raises(RecipeError, match="is set together with data.eval_sources"):
        build_recipe(data)


# --------------------------------------------------------------------------------------------
# Warnings: what validates but may lose work (printed by validate and prepare, logged by train)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_steps", [500, None])  # None: TrainingArguments' default, 500
def test_save_steps_past_max_steps_is_warned_of_naming_both_keys(save_steps: int | None):
    """`train.save_steps: 500` with `max_steps: 100` saved no checkpoint before the end without a word:
    a run killed (OOM, node failure) before then had nothing to resume from."""
    from qlora_sft.recipe import recipe_warnings

    train = {"max_steps": 100, **({"save_steps": save_steps} if save_steps else {})}
    (warning,) = recipe_warnings(build_recipe({**MINIMAL_RECIPE, "train": train}))
    default = "" if save_steps else " (the default)"
    assert warning.startswith(
        f"train.save_steps is 500{default} and train.max_steps is 100: no checkpoint is saved before the last step"
    ), warning
    assert "starts over" in warning and "set train.save_steps below 100" in warning, warning
    # saves before the end, by epoch, or a fraction of the steps: nothing to say
    for quiet in ({"save_steps": 50}, {"save_strategy": "epoch"}, {"save_steps": 0.5}, {"save_strategy": "no"}):
        assert recipe_warnings(build_recipe({**MINIMAL_RECIPE, "train": {"max_steps": 100, **quiet}})) == []


def test_a_fraction_of_save_steps_that_saves_nothing_before_the_end_is_warned_of():
    """`save_steps: 0.99` of `max_steps: 6` is every ceil(5.94) = 6 steps (transformers rounds a
    fraction up): no checkpoint before the end, and fractions were never warned of."""
    from qlora_sft.recipe import recipe_warnings

    (warning,) = recipe_warnings(build_recipe({**MINIMAL_RECIPE, "train": {"max_steps": 6, "save_steps": 0.99}}))
    assert warning.startswith("train.save_steps is 0.99 (a fraction: every 6 steps) and train.max_steps is 6"), warning
    assert "set train.save_steps below 6 (or a fraction below 0.83)" in warning, warning
    assert recipe_warnings(build_recipe({**MINIMAL_RECIPE, "train": {"max_steps": 6, "save_steps": 0.8}})) == []


def test_save_steps_default_is_the_trainers():
    """The warning names 500 as the default: it is TrainingArguments' own."""
    import dataclasses

    from transformers import TrainingArguments

    from qlora_sft.recipe import TRAINER_SAVE_STEPS

    default = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "save_steps")
    assert default == TRAINER_SAVE_STEPS


def test_no_checkpoint_signals_is_warned_of():
    """`checkpoint.signals: []` handled no signal: SLURM's USR1 before the time limit, or a TERM at
    preemption, ended the ranks at once (the default action of both), with no checkpoint saved and no
    requeue, and validate said nothing."""
    from qlora_sft.recipe import recipe_warnings

    (warning,) = recipe_warnings(build_recipe({**MINIMAL_RECIPE, "checkpoint": {"signals": []}}))
    assert warning.startswith("checkpoint.signals is []: no signal saves a checkpoint"), warning
    assert "remove checkpoint.signals for the default [USR1, TERM]" in warning, warning
    assert recipe_warnings(build_recipe(MINIMAL_RECIPE)) == []


def test_validate_prints_the_recipe_warnings(tmp_path: Path, tiny_model: Path):
    f = tmp_path / "r.yaml"
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "2+2?", "output": "4"}) + "\n")
    f.write_text(f"model: {{name_or_path: {tiny_model}}}\ndata: {{sources: [a.jsonl], eval_fraction: 0}}\n")
    out = validate_cli(f, "train.max_steps=10", "checkpoint.signals=[]")
    assert out.returncode == 0, out.stderr
    assert "  warning: train.save_steps is 500 (the default) and train.max_steps is 10" in out.stdout, out.stdout
    assert "  warning: checkpoint.signals is []" in out.stdout, out.stdout
    # plan says them too (it reads the model's config.json, nothing more)
    plan = validate_cli(f, "train.max_steps=10", "checkpoint.signals=[]", command="plan")
    assert plan.returncode == 0, plan.stderr
    assert "warning: train.save_steps is 500 (the default) and train.max_steps is 10" in plan.stdout, plan.stdout
    assert "warning: checkpoint.signals is []" in plan.stdout, plan.stdout


# --------------------------------------------------------------------------------------------
# Paths and names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora.init_from", "ad\x00apter"),  # ValueError: embedded null byte, a traceback
        ("train.deepspeed", "zero3\x00.json"),  # the same
        ("model.name_or_path", "org/model\n"),
        ("run.name", "try\n2"),
        ("run.output_dir", "runs\t"),
        ("data.sources.0.path", "a\x00.jsonl"),
        ("data.sources.0.split", "train\r"),
        ("checkpoint.resume", "runs/x/checkpoint-5\x1b"),
        ("cluster.folder", "logs\n#SBATCH --time=9999"),
        ("data.chat_template", "t\x00.jinja"),
    ],
)
def test_control_characters_in_a_path_or_name_are_refused(key: str, value: str):
    """A path or name holding a control character: a NUL raised `ValueError: embedded null byte` (a
    traceback) while the recipe was read, or later, once the model had loaded; a newline in the
    submitit folder split the sbatch script's #SBATCH line."""
    data, problems = apply_overrides(MINIMAL_RECIPE, [f"{key}=x"])
    assert not problems
    *parents, last = key.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
    with pytest.raises(RecipeError) as exc:
        build_recipe(data)
    (msg,) = exc.value.problems
    bad = next(c for c in value if ord(c) < 32)
    assert msg == f"`{key}` is {value!r}, which holds the control character {bad!r}; remove it", msg
    # unicode in paths and names, and a system prompt's newlines and tabs, still validate
    r = build_recipe(
        {
            "run": {"name": "essai-été", "output_dir": "exécutions"},
            "model": {"name_or_path": "modèles/日本語"},
            "data": {"sources": [{"path": "données.jsonl", "system_prompt": "Line one.\nLine two.\tTabbed."}]},
        }
    )
    assert r.run.name == "essai-été" and r.data.sources[0].system_prompt.endswith("\tTabbed.")


def test_a_source_without_a_path_is_refused(tmp_path: Path):
    """A stray `-` under `sources:` (or an entry with `format:` but no `path:`) built a source whose path
    was "": validate then said " names two different files: <cwd> and <the recipe's folder>", naming
    no key, or read the working directory as the dataset."""
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {name_or_path: m}\n"
        "data:\n"
        "  sources:\n"
        "    - path: a.jsonl\n"
        "    -\n"  # 5
        "  eval_sources:\n"
        "    - {format: alpaca}\n"  # 7
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    required = "is required: a .jsonl/.json/.parquet/.csv file, a folder or a hub dataset id"
    assert exc.value.problems == [
        f"{f}:5: `data.sources.1.path` {required}",
        f"{f}:7: `data.eval_sources.0.path` {required}",
    ]


# --------------------------------------------------------------------------------------------
# LoRA target modules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], "is []; name at least one module (e.g. [q_proj, v_proj]) or give all-linear"),
        (["q_proj", ""], "holds an empty name; remove it"),
        ("q_proj", 'is "q_proj"; give all-linear or a list of module names: [q_proj]'),
    ],
)
def test_target_modules_that_name_nothing_are_refused(value: Any, expected: str):
    """peft found no module to adapt and refused once the model had loaded: an empty list, an empty
    name, or one name as a plain string (peft matches a string against full module paths such as
    `model.layers.0.self_attn.q_proj`, which `q_proj` alone never matches)."""
    ps = recipe_problems({**MINIMAL_RECIPE, "lora": {"target_modules": value}})
    assert ps == [f"`lora.target_modules` {expected}"], ps


@pytest.mark.parametrize("value", [".*q_proj", r".*layers\.(0|1)\..*(q_proj|v_proj)", "all-linear"])
def test_target_modules_as_a_regular_expression_stay_allowed(value: str):
    """peft's own string form is a regular expression matched against full module names: a recipe
    that gives one (copied from a peft notebook) still validates; only a bare name is refused."""
    from qlora_sft.recipe import build_recipe

    assert build_recipe({**MINIMAL_RECIPE, "lora": {"target_modules": value}}).lora.target_modules == value


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff\xfe\x00m\x00o\x00d\x00e\x00l", "is not UTF-8 text (invalid start byte at byte 0); save it as UTF-8"),
        (b"model:\n  name_or_path: caf\xe9\n", "is not UTF-8 text (invalid continuation byte at byte 26); save it"),
        (None, "is a folder; give the path to the .yaml recipe in it"),
    ],
)
def test_a_recipe_that_is_not_utf8_or_is_a_folder_is_named(tmp_path: Path, content: bytes | None, expected: str):
    """A recipe saved as UTF-16 or Latin-1 raised a UnicodeDecodeError traceback from every command; a
    folder was called "not found"."""
    f = tmp_path / "r.yaml"
    if content is None:
        f.mkdir()
    else:
        f.write_bytes(content)
    out = validate_cli(f)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"recipe {f} {expected}" in out.stderr, out.stderr


@pytest.mark.parametrize("key", ["run.name", "run.output_dir"])
def test_a_run_directory_whose_name_is_not_utf8_is_refused_before_the_model_loads(key: str):
    """A run.name or run.output_dir with bytes that are not UTF-8 (a Latin-1 name given on the command
    line) passed `validate` and `plan`; `train` loaded the model and then failed with a traceback in
    tensorboard's writer (and safetensors cannot write there either)."""
    value = "caf\udce9"  # how Python hands on the byte \xe9 of an argument
    (msg,) = _refused_with(key, value)
    assert msg.startswith(f"`{key}` holds bytes that are not UTF-8 (caf\\xe9)"), msg
    assert "give it a UTF-8 name" in msg, msg


def _refused_with(key: str, value: str) -> list[str]:
    data, problems = apply_overrides(MINIMAL_RECIPE, [f"{key}=x"])
    assert not problems
    section, name = key.split(".")
    data[section][name] = value
    with pytest.raises(RecipeError) as exc:
        build_recipe(data)
    return exc.value.problems
