"""What the data report says of the rows it did not train: each reason's count, the first rows it
names (so a user can find them in the file) and the first row's problem; rows with no trained tokens
left, per source and per split (train and eval); and, when nothing is left to train, the causes with
their counts and the fix of the largest one. The same for every kind of source and every pipeline
(in memory, Arrow, streamed, cached)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from qlora_sft import data
from qlora_sft.data import build_data, prepare_data, stream_data
from qlora_sft.errors import DataError
from qlora_sft.model import ensure_pad_token
from qlora_sft.recipe import DataConfig, DataSource

LONG = "alpha beta gamma " * 40  # no trained tokens are left of a row asking this at max_length 48

ROWS = [
    {"instruction": "Name a drink.", "input": "", "output": "Coffee."},  # 1
    {"instruction": "Say hi.", "input": "", "output": "  "},  # 2 empty_assistant_turn
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},  # 3
    {"instruction": "Say bye.", "input": "", "output": ""},  # 4 empty_assistant_turn
    {"instruction": LONG, "input": "", "output": "Yes."},  # 5 no trained tokens left
    {"instruction": "", "input": "", "output": "Hello."},  # 6 empty_user_turn
    {"instruction": "Name a fruit.", "input": "", "output": "Apple."},  # 7
]
NAMED = {"empty_assistant_turn": [2, 4], "empty_user_turn": [6]}


@pytest.fixture(scope="module")
def tok():
    from tiny import build_tokenizer

    t = build_tokenizer()
    ensure_pad_token(t)
    return t


def write(folder: Path, kind: str, rows: list[dict]) -> Path:
    """`rows` as a data source of one kind: jsonl, json, csv, parquet or a save_to_disk folder."""
    import datasets

    if kind == "jsonl":
        path = folder / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = folder / "rows.json"
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "csv":
        path = folder / "rows.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        path = folder / "rows.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path = folder / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def skip_cfg(*sources: DataSource, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    kw.setdefault("max_length", 48)
    return DataConfig(sources=sources, num_proc=1, on_bad_row="skip", **kw)


KINDS = ["jsonl", "json", "csv", "parquet", "saved"]


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_rows_are_named_for_every_kind_of_source(tmp_path: Path, tok, kind: str):
    """Was: `skipped: empty_assistant_turn: 2, empty_user_turn: 1`, and no way to find the rows."""
    path = write(tmp_path, kind, ROWS)
    src = DataSource(path=str(path))
    report = build_data(skip_cfg(src), tok, 0).report
    s = report.sources[0]
    assert s.skipped == {"empty_assistant_turn": 2, "empty_user_turn": 1}  # the counts stay
    assert s.skipped_rows == NAMED
    assert s.problems == {
        "empty_assistant_turn": "an assistant turn is empty",
        "empty_user_turn": "a user turn is empty",
    }
    assert (s.no_loss, s.no_loss_rows) == (1, [5])
    assert report.train_rows == 3
    lines = report.lines()
    assert lines[0].startswith(f"source {path} [alpaca]: 7 rows, 4 kept, 4 used in the mix, skipped: ")
    assert "empty_assistant_turn: 2 (rows 2, 4; row 2: an assistant turn is empty)" in lines[0]
    assert "empty_user_turn: 1 (row 6: a user turn is empty)" in lines[0]
    assert "no trained tokens left after truncation to data.max_length: 1 (row 5)" in lines[0]
    assert "rows count from 1" in lines[1]  # what a row number means for this kind of file
    # the in-memory reader (`validate`'s examples) names the same rows
    _, (in_memory,) = data.load_examples([src], "skip")
    assert (in_memory.skipped, in_memory.skipped_rows, in_memory.problems) == (s.skipped, NAMED, s.problems)


def test_what_a_row_number_means_is_said_per_kind_of_file(tmp_path: Path, tok):
    notes = {}
    for kind in KINDS:
        (tmp_path / kind).mkdir()
        notes[kind] = build_data(skip_cfg(DataSource(path=str(write(tmp_path / kind, kind, ROWS)))), tok, 0)
    assert "a .jsonl file's are its lines" in notes["jsonl"].report.lines()[1]
    assert "a .csv file's are its records after the header line" in notes["csv"].report.lines()[1]
    assert "a .json file's are the items of its list" in notes["json"].report.lines()[1]
    assert "dataset[row - 1]" in notes["parquet"].report.lines()[1]
    assert "dataset[row - 1]" in notes["saved"].report.lines()[1]
    clean = build_data(skip_cfg(DataSource(path=str(write(tmp_path / "jsonl", "jsonl", [ROWS[0]])))), tok, 0)
    assert not any("rows count from 1" in line for line in clean.report.lines())  # nothing named, no note


def test_a_reason_names_its_first_five_rows_and_how_many_more(tmp_path: Path, tok):
    rows = [ROWS[0]] + [{"instruction": "Say hi.", "output": " "}] * 8 + ['{"instruction": "cut']
    f = tmp_path / "many.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    report = build_data(skip_cfg(DataSource(path=str(f), format="alpaca")), tok, 0).report
    s = report.sources[0]
    assert s.skipped == {"empty_assistant_turn": 8, "invalid_json": 1}
    assert s.skipped_rows == {"empty_assistant_turn": [2, 3, 4, 5, 6], "invalid_json": [10]}
    line = report.lines()[0]
    assert "empty_assistant_turn: 8 (rows 2, 3, 4, 5, 6 and 3 more; row 2: an assistant turn is empty)" in line
    assert "invalid_json: 1 (row 10: line is not valid JSON (" in line


def test_rows_a_reader_refuses_are_named_too(tmp_path: Path, tok):
    """A CSV record with the wrong number of fields (its message names its line) and a line of a
    JSON lines file that is not JSON."""
    f = tmp_path / "short.csv"
    f.write_text("instruction,input,output\nSay hi,,hi\nSay bye,bye\nName a drink.,,Tea.\n")
    s = build_data(skip_cfg(DataSource(path=str(f))), tok, 0).report.sources[0]
    assert s.skipped_rows == {"csv_too_few_fields": [2]}
    assert s.problems["csv_too_few_fields"].startswith("line 3 has 2 fields but the header has 3")


def test_skipped_rows_are_named_by_the_stream_and_kept_in_the_cache(tmp_path: Path, tok):
    path = write(tmp_path, "jsonl", ROWS)
    cfg = skip_cfg(DataSource(path=str(path)))
    streamed = stream_data(dataclasses.replace(cfg, streaming=True), tok, 0).report.sources[0]
    assert (streamed.skipped_rows, streamed.no_loss_rows) == (NAMED, [5])
    built = prepare_data(cfg, tok, 0, tmp_path / "cache")
    found = prepare_data(cfg, tok, 0, tmp_path / "cache")
    assert found.found and found.report.to_dict() == built.report.to_dict()
    assert found.report.sources[0].skipped_rows == NAMED and found.report.sources[0].no_loss_rows == [5]


# --- eval rows dropped are counted like train rows ----------------------------------------------


def test_eval_rows_with_no_trained_tokens_are_counted(tmp_path: Path, tok):
    """Was: `dropped (no trained tokens left): 1` counted the train split only; an eval source's
    rows dropped the same way were in no count."""
    train = write(tmp_path, "jsonl", ROWS)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in (ROWS[0], ROWS[4], ROWS[4], ROWS[2])))
    cfg = skip_cfg(DataSource(path=str(train)), eval_sources=(DataSource(path=str(held)),))
    report = build_data(cfg, tok, 0).report
    assert (report.train_rows, report.dropped_no_loss) == (3, 1)
    assert (report.eval_rows, report.eval_dropped_no_loss) == (2, 2)
    eval_source = report.sources[1]
    assert eval_source.path == f"{held} (eval)" and (eval_source.no_loss, eval_source.no_loss_rows) == (2, [2, 3])
    assert "dropped (no trained tokens left): 1 train row, 2 eval rows" in "\n".join(report.lines())
    # eval held out of the mix: the rows dropped from each split are counted
    mixed = skip_cfg(DataSource(path=str(held)), DataSource(path=str(train)), eval_fraction=0.5)
    report = build_data(mixed, tok, 1).report
    assert report.dropped_no_loss + report.eval_dropped_no_loss == 3
    assert report.eval_dropped_no_loss > 0 and report.dropped_no_loss > 0
    # the streamed pipeline prepares its eval sources as a cache of their own: counted as eval there too
    streamed = prepare_data(dataclasses.replace(cfg, streaming=True), tok, 0, tmp_path / "cache")
    assert (streamed.report.eval_rows, streamed.report.eval_dropped_no_loss) == (2, 2)


# --- nothing left to train: the causes, counted, and the fix of the largest --------------------


def nothing_left(cfg: DataConfig, tok) -> str:
    with pytest.raises(DataError) as exc:
        build_data(cfg, tok, 0)
    return str(exc.value)


def test_nothing_left_names_truncation_when_it_dropped_most(tmp_path: Path, tok):
    """Was: `no training examples are left after filtering (long.jsonl: invalid_json 1)`: the one bad
    row was named as the cause, not the two rows that truncation left nothing of."""
    f = tmp_path / "long.jsonl"
    f.write_text("\n".join([json.dumps(ROWS[4]), "not json", json.dumps(ROWS[4])]) + "\n")
    msg = nothing_left(skip_cfg(DataSource(path=str(f), format="alpaca")), tok)
    assert msg.startswith("no training examples are left: none of the 3 rows read from the training sources")
    assert f"no trained tokens left after truncation to data.max_length=48: 2 (rows 1, 3 of {f})" in msg
    assert f"invalid_json: 1 (row 2 of {f}: line is not valid JSON (Expecting value))" in msg
    assert "Most were dropped for no trained tokens left: raise data.max_length" in msg


def test_nothing_left_names_bad_rows_when_they_dropped_most(tmp_path: Path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps({"instruction": "x", "input": ""}) + "\n" for _ in range(3)) + "not json\n")
    msg = nothing_left(skip_cfg(DataSource(path=str(f), format="alpaca"), max_length=2048), tok)
    assert f"missing_field: 3 (rows 1, 2, 3 of {f}; row 1: missing field `output`)" in msg
    assert f"invalid_json: 1 (row 4 of {f}" in msg
    assert "max_length" not in msg  # truncation dropped nothing: it is not blamed
    assert "Most were dropped for missing_field: give each row the fields of its format" in msg
    assert "data.on_bad_row=error" in msg  # stops at the first bad row, with its problem


def test_nothing_left_names_a_mix_that_takes_no_row(tmp_path: Path, tok):
    """Sources mixed by ratio: one without a usable row scales the whole mix to nothing."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[2]) + "\n")
    bad.write_text(json.dumps(ROWS[1]) + "\n")
    msg = nothing_left(
        skip_cfg(DataSource(path=str(good), ratio=0.5), DataSource(path=str(bad), format="alpaca", ratio=0.5)), tok
    )
    assert f"empty_assistant_turn: 1 (row 1 of {bad}: an assistant turn is empty)" in msg
    assert f"not taken by the mix: 2 (the kept rows of {good})" in msg
    assert f"{bad} has no usable row, so the mix by ratio takes none" in msg


def test_nothing_left_in_a_stream_names_the_causes(tmp_path: Path, tok):
    f = tmp_path / "long.jsonl"
    f.write_text("\n".join([json.dumps(ROWS[4]), json.dumps(ROWS[1]), json.dumps(ROWS[4])]) + "\n")
    cfg = DataConfig(
        sources=(DataSource(path=str(f), format="alpaca"),), on_bad_row="skip", max_length=48, streaming=True
    )
    with pytest.raises(DataError) as exc:
        stream_data(cfg, tok, 0)
    msg = str(exc.value)
    assert "none of the 3 rows read from the training sources (the first 1000 of each, streamed)" in msg
    assert f"no trained tokens left after truncation to data.max_length=48: 2 (rows 1, 3 of {f})" in msg
    assert f"empty_assistant_turn: 1 (row 2 of {f}: an assistant turn is empty)" in msg
    assert "Most were dropped for no trained tokens left: raise data.max_length" in msg


def test_a_stream_whose_eval_sources_leave_nothing_says_they_are_the_eval_sources(tmp_path: Path, tok):
    """Was: "no training examples are left: none of the 2 rows read from the training sources", for the
    eval sources of a streamed run (prepared as a data set of their own)."""
    good, bad = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    good.write_text("".join(json.dumps(ROWS[i]) + "\n" for i in (0, 2, 6)))
    bad.write_text("".join(json.dumps(ROWS[i]) + "\n" for i in (1, 3)))
    cfg = skip_cfg(DataSource(path=str(good)), eval_sources=(DataSource(path=str(bad)),), streaming=True)
    with pytest.raises(DataError) as exc:
        prepare_data(cfg, tok, 0, tmp_path / "cache")
    msg = str(exc.value)
    assert msg.startswith(f"data.eval_sources ({bad}): no eval examples are left: none of the 2 rows read"), msg
    assert "training" not in msg and f"empty_assistant_turn: 2 (rows 1, 2 of {bad}" in msg


def test_json_lines_in_a_json_file_are_numbered_by_their_line(tmp_path: Path, tok):
    """Were numbered by item, so a blank line made every later row number one short of its line."""
    f = tmp_path / "lines.json"
    f.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    (examples,), _ = data.load_examples([DataSource(path=str(f))], "skip")
    assert [e.row for e in examples] == [1, 4]
    s = build_data(skip_cfg(DataSource(path=str(f))), tok, 0).report.sources[0]
    assert s.skipped_rows == {"empty_assistant_turn": [3]}


def test_rows_left_out_are_a_warning_line_that_train_logs_as_a_warning(tmp_path: Path, tok):
    """Was: the rows skipped or dropped were reported in INFO lines only, among the other figures. The
    report now ends its source lines with one `warning:` line counting them (train logs it at
    WARNING); a report with nothing left out has none."""
    src = DataSource(path=str(write(tmp_path, "jsonl", ROWS)))
    lines = build_data(skip_cfg(src), tok, 0).report.lines()
    warned = [line for line in lines if line.startswith("warning:") and "left out" in line]
    assert warned == [
        "warning: 4 of the 7 rows read are left out (3 bad rows, 1 with no trained tokens left after truncation), "
        "named by source and row above; data.on_bad_row=error stops at the first bad row with its problem"
    ]
    clean = tmp_path / "clean"
    clean.mkdir()
    good = [r for i, r in enumerate(ROWS, 1) if i in (1, 3, 7)]
    lines = build_data(skip_cfg(DataSource(path=str(write(clean, "jsonl", good)))), tok, 0).report.lines()
    assert not [line for line in lines if "left out" in line]


def test_train_logs_the_rows_left_out_as_a_warning(tiny_model: Path, tmp_path: Path, capsys):
    """`train` logs the report's `warning:` line at WARNING (the other report lines at INFO)."""
    from helpers import recipe_dict, write_recipe, write_toy_data

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    rows = write_toy_data(tmp_path / "toy.jsonl", n=24)
    with rows.open("a") as f:
        f.write(json.dumps({"instruction": "Say hi.", "input": "", "output": ""}) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(
            tiny_model, rows, tmp_path / "runs", data={"on_bad_row": "skip"}, train={"max_steps": 1, "save_steps": 1}
        ),
    )
    train(load_recipe(recipe))
    logged = capsys.readouterr().out.splitlines()  # the main process logs to stdout: time, level, message
    left_out = [line for line in logged if "left out" in line]
    assert len(left_out) == 1 and " WARNING data: 1 of the 25 rows read are left out (1 bad row)" in left_out[0]
    assert any(" INFO data: source " in line for line in logged)


def test_an_eval_fraction_that_holds_out_no_row_is_refused_before_the_model_where_evaluation_is_needed(
    tiny_model: Path, tmp_path: Path, capsys, monkeypatch
):
    """Was: data.eval_fraction of too few rows holds out none (one train row is always kept), and a
    recipe with train.load_best_model_at_end passed `validate` and stopped `train` with the Trainer's
    "--load_best_model_at_end requires the save and eval strategy to match" traceback after the model
    had loaded. Now `validate` and `train` refuse it naming the keys and the counts, before the model."""
    from helpers import recipe_dict, write_recipe

    from qlora_sft import cli, model
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    rows = tmp_path / "one.jsonl"
    rows.write_text(json.dumps({"instruction": "The colour of the sky?", "output": "Blue."}) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(
            tiny_model,
            rows,
            tmp_path / "runs",
            data={"eval_fraction": 0.5},
            train={"max_steps": 2, "save_steps": 1, "eval_steps": 1, "load_best_model_at_end": True},
        ),
    )
    assert cli.main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "train.load_best_model_at_end" in err and "no eval rows" in err and "data.eval_fraction=0.5" in err, err

    def loaded(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model, "load_model", loaded)
    with pytest.raises(DataError, match=r"train.load_best_model_at_end .* no eval rows"):
        train(load_recipe(recipe))


# A chat template whose {% generation %} markers wrap nothing where the answer is "fine" (it is rendered
# after them): such a row trains no token however short it is; other answers train as usual.
MARKS_NOT_FINE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{% if m['content'] != 'fine' %}{{ m['content'] + eos_token }}{% endif %}{% endgeneration %}"
    "{% if m['content'] == 'fine' %}{{ m['content'] + eos_token }}{% endif %}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_rows_the_template_marks_nothing_in_are_not_blamed_on_truncation(tmp_path: Path):
    """Was: a row that trains no token because the chat template's generation markers wrap none of the
    answer (nothing was cut: the row has a few tokens of data.max_length's 48) was reported, with
    data.on_bad_row=skip, as "no trained tokens left after truncation to data.max_length", and when no
    row was left the fix given was "raise data.max_length". A long row the template marks nothing in is
    not blamed on truncation either; a row truncation left nothing of still is."""
    from tiny import build_tokenizer

    t = build_tokenizer()
    ensure_pad_token(t)
    t.chat_template = MARKS_NOT_FINE
    rows = [
        {"instruction": "Name a drink.", "input": "", "output": "Coffee."},  # 1 trains
        {"instruction": "Say ok.", "input": "", "output": "fine"},  # 2 the template marks nothing
        {"instruction": LONG, "input": "", "output": "Yes."},  # 3 truncation left nothing
        {"instruction": LONG, "input": "", "output": "fine"},  # 4 long, but the template marks nothing
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},  # 5 trains
    ]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for report in (build_data(skip_cfg(DataSource(path=str(f))), t, 0).report, stream_report(f, t)):
        text = "\n".join(report.lines())
        assert "no trained tokens left after truncation to data.max_length: 1 (row 3)" in text, text
        assert "no token marked as trained by the chat template (nothing of it cut): 2 (rows 2, 4)" in text, text
        assert "(1 with no trained tokens left after truncation, 2 with no token marked as trained" in text, text
    # nothing left: the template is named, with its fix, not data.max_length
    f.write_text(json.dumps(rows[1]) + "\n" + json.dumps(rows[3]) + "\n")
    for build in (lambda: build_data(skip_cfg(DataSource(path=str(f))), t, 0), lambda: stream_report(f, t)):
        with pytest.raises(DataError) as exc:
            build()
        msg = str(exc.value)
        assert "no token marked as trained by the chat template (nothing of it cut): 2 (rows 1, 2 of" in msg, msg
        assert "truncation to" not in msg and "raise data.max_length" not in msg, msg
        assert "{% generation %}" in msg and "data.assistant_only_loss" in msg, msg


def stream_report(path: Path, tokenizer) -> data.DataReport:
    cfg = DataConfig(sources=(DataSource(path=str(path)),), on_bad_row="skip", max_length=48, streaming=True)
    return stream_data(cfg, tokenizer, 0).report
