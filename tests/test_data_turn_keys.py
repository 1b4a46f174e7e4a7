"""What a row holds that is not read is named with true counts, whichever path reads it: the fields
that nearly spell one a format reads and turns' names counted over the whole source when rows are
read one at a time; a turn's other keys (OpenAI's `refusal`, `audio`, axolotl's `training_detail`)
warned of once per source; OpenAI's deprecated `function_call` read as the tool call it is;
LLaMA-Factory's alpaca `tools` read; axolotl's `training: null` read as no flag."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest

from qlora_sft import data
from qlora_sft.data import BadRow, normalize_row
from qlora_sft.recipe import DataSource


def _said(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


def test_near_misses_and_names_read_row_by_row_are_counted_over_the_whole_source(tmp_path: Path, caplog):
    """Was: `iter_examples` (load_examples, `plan`'s row count, `validate`'s example) warned at the first
    row with a misspelled field or a turn's name, saying "1 row has it" when four rows had it."""
    f = tmp_path / "typo.jsonl"
    rows = [{"instruction": "Add.", "input": "1 + 1", "output": "2"}]
    rows += [{"instruction": "Add.", "imput": f"{i} + 1", "output": str(i + 1)} for i in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        data.load_examples([DataSource(path=str(f))], "error")
    said = _said(caplog, "imput")
    assert len(said) == 1, said
    assert f"{f} row 2 has the field `imput`" in said[0] and "4 rows have it" in said[0], said

    named = tmp_path / "named.jsonl"
    conv = [{"role": "user", "content": "hi", "name": "alice"}, {"role": "assistant", "content": "hello"}]
    named.write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(3)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        data.load_examples([DataSource(path=str(named))], "error")
    said = _said(caplog, "`name`")
    assert len(said) == 1 and "3 rows have one" in said[0], said


def test_a_source_read_in_part_says_its_count_is_of_the_rows_read(tmp_path: Path, caplog):
    """`validate`'s example preview reads a few rows and stops: the count claims no more than those."""
    f = tmp_path / "typo.jsonl"
    rows = [{"instruction": "Add.", "imput": f"{i} + 1", "output": str(i + 1)} for i in range(6)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = data.SourceReport(str(f), "auto")
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        examples = data.iter_examples(DataSource(path=str(f)), "error", report)
        assert len(list(itertools.islice(examples, 2))) == 2
        examples.close()
    said = _said(caplog, "imput")
    assert len(said) == 1, said
    assert f"{f} row 1 has the field `imput`" in said[0] and "2 of the first 2 rows read have it" in said[0], said


def _refusal_rows() -> list[dict]:
    def row(i: int, refusal: object) -> dict:
        answer = {"role": "assistant", "content": str(2 * i), "refusal": refusal}
        return {"messages": [{"role": "user", "content": f"{i} + {i}?", "id": f"m{i}"}, answer]}

    return [row(0, None), row(1, "I cannot help with that."), row(2, "No."), row(3, "")]


def test_a_turns_key_that_is_not_read_is_named_once_per_source_with_its_rows(tmp_path: Path, caplog):
    """Was: a turn's keys other than those read (OpenAI's assistant `refusal`, `audio`, axolotl's
    `training_detail`) were dropped without a word. A key holding something is named once per source
    with its first row, turn and count; a null or empty one (as OpenAI's SDK writes them) and a turn's
    `id` (metadata, as a row's own ids) are not. The rows train as before."""
    from qlora_sft.data import build_data
    from qlora_sft.recipe import DataConfig

    f = tmp_path / "refusal.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _refusal_rows()))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        examples = data.load_examples([DataSource(path=str(f))], "error")[0][0]
    assert len(examples) == 4
    said = _said(caplog, "`refusal`")
    assert len(said) == 1, said
    assert said[0].startswith(f"{f} row 2: turn `messages[1]` (assistant) has the key `refusal`"), said
    assert "2 rows have it" in said[0] and "not read" in said[0], said
    assert not _said(caplog, "`id`")

    g = tmp_path / "refusal_built.jsonl"  # the Arrow pipeline says the same
    g.write_text(f.read_text())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        from tiny import build_tokenizer

        from qlora_sft.model import ensure_pad_token

        tok = build_tokenizer()
        ensure_pad_token(tok)
        prepared = build_data(
            DataConfig(sources=(DataSource(path=str(g)),), eval_fraction=0.0, num_proc=1), tok, 0, None
        )
    assert prepared.report.train_rows == 4
    said = _said(caplog, "`refusal`")
    assert len(said) == 1 and "2 rows have it" in said[0], said


def test_openais_deprecated_function_call_is_read_as_a_tool_call(tmp_path: Path, caplog):
    """Was: an assistant turn's `function_call` (OpenAI's deprecated {"name", "arguments"}) was dropped,
    so its conversation, with the `function` turn of the result after it, was refused as a tool result
    without a call. It is the assistant's tool call; one with no result after it is left unread, named."""
    call = {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "function_call": call},
            {"role": "function", "name": "get_weather", "content": "12 C"},
            {"role": "assistant", "content": "It is 12 C."},
        ]
    }
    messages, _ = normalize_row(row, "messages")
    assert messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    assert messages[2] == {"role": "tool", "content": "12 C", "name": "get_weather"}
    bad = json.loads(json.dumps(row))
    bad["messages"][1]["function_call"]["arguments"] = "{city"
    with pytest.raises(BadRow, match=r"`messages\[1\]`.function_call.arguments is not JSON"):
        normalize_row(bad, "messages")
    # a call with no result after it trained before, without the call: it still does, and is named
    said_before = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "Let me look.", "function_call": call},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ]
    }
    messages, _ = normalize_row(said_before, "messages")
    assert "tool_calls" not in messages[1]
    f = tmp_path / "fc.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps(said_before) + "\n")
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        assert len(data.load_examples([DataSource(path=str(f))], "error")[0][0]) == 2
    said = _said(caplog, "`function_call`")
    assert len(said) == 1 and said[0].startswith(f"{f} row 2: turn `messages[1]` (assistant)"), said
    assert "1 row has it" in said[0], said


def test_llama_factorys_alpaca_tools_column_is_read(tmp_path: Path):
    """LLaMA-Factory's alpaca converter reads a `tools` column (data/README.md's columns; converter.py's
    AlpacaDatasetConverter `_tools`), as its sharegpt one does: it was dropped for alpaca rows."""
    tools = [{"name": "add", "description": "Add two numbers", "parameters": {"type": "object"}}]
    row = {"instruction": "Add 1 and 2.", "output": "3", "tools": json.dumps(tools)}
    wrapped = [{"type": "function", "function": tools[0]}]  # OpenAI's form, as templates read it
    assert data.formats.row_tools(row, "alpaca") == wrapped
    assert data.formats.row_tools({**row, "tools": tools}, "alpaca") == wrapped
    f = tmp_path / "alpaca_tools.jsonl"
    f.write_text(json.dumps(row) + "\n")
    assert data.load_examples([DataSource(path=str(f))], "error")[0][0][0].tools == wrapped
    with pytest.raises(BadRow, match="field `tools` is not JSON"):
        data.formats.row_tools({**row, "tools": "{add"}, "alpaca")


def test_axolotls_training_null_is_no_flag(tmp_path: Path):
    """axolotl reads `training: null` as no flag (chat_template.py: `if training is not None`), the turn
    trained by its role; it was refused as "must be a boolean"."""
    for flag in ("training", "train"):
        for role in (0, 1):
            turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
            turns[role][flag] = None
            messages, _ = normalize_row({"messages": turns}, "messages")
            assert [m["content"] for m in messages] == ["hi", "hello"]


def test_a_turns_weight_that_agrees_with_what_trains_is_read_not_refused():
    """SlimOrca-style sharegpt rows (`weight: null` on the system turn, `0.0` on the human turn, `1.0`
    on the gpt turn) and OpenHermes-style ones (`weight: null` on every turn) were refused whole, every
    row a `turn_weight` bad row, though each weight says what training does anyway. Now null is no
    weight and 0/1 compare by value with whether the turn trains; a weight that asks for something
    else (0 on an assistant turn, 0.5, a string) is still refused, naming the turn."""
    slim = {
        "conversations": [
            {"from": "system", "value": "Be brief.", "weight": None},
            {"from": "human", "value": "Capital of France?", "weight": 0.0},
            {"from": "gpt", "value": "Paris.", "weight": 1.0},
        ]
    }
    hermes = {
        "conversations": [
            {"from": "human", "value": "Hi", "weight": None},
            {"from": "gpt", "value": "Yo", "weight": None},
        ]
    }
    for row in (slim, hermes):
        messages, _ = normalize_row(row, "sharegpt")
        assert messages is not None and messages[-1] == {
            "role": "assistant",
            "content": row["conversations"][-1]["value"],
        }
    untrained = json.loads(json.dumps(slim))
    untrained["conversations"][2]["weight"] = 0  # OpenAI's `weight: 0` on an assistant turn: cannot be honoured
    with pytest.raises(BadRow, match=r"`conversations\[2\]`.weight is 0: per-turn weights") as refused:
        normalize_row(untrained, "sharegpt")
    assert refused.value.reason == "turn_weight"
    for odd in (0.5, "1", 2):
        bad = json.loads(json.dumps(slim))
        bad["conversations"][2]["weight"] = odd
        with pytest.raises(BadRow, match=rf"`conversations\[2\]`.weight is {odd!r}"):
            normalize_row(bad, "sharegpt")
    # with every turn trained (data.assistant_only_loss: false), a human turn's weight 0 is refused
    with pytest.raises(BadRow, match=r"`conversations\[1\]`.weight is 0.0"):
        normalize_row(slim, "sharegpt", assistant_only_loss=False)


def test_a_turns_name_that_is_not_a_string_is_named_not_dropped(tmp_path: Path, caplog):
    """Was: a `name` that is not a string (a number, a mapping) on a user, assistant or system turn, or
    on a tool turn, was dropped without a word: `turn_name` names only a string, and `unread_turn_keys`
    counted `name` as read. It is named as a key not read, with its first row and turn and its count."""

    def row(i: int, name: object) -> dict:
        user = {"role": "user", "content": f"{i} + {i}?"}
        answer = {"role": "assistant", "content": str(2 * i), "name": name}
        return {"messages": [user, answer]}

    f = tmp_path / "names.jsonl"
    rows = [row(0, None), row(1, 7), row(2, {"first": "Al"}), row(3, 7)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        examples = data.load_examples([DataSource(path=str(f))], "error")[0][0]
    assert [m.get("name") for m in examples[1].messages] == [None, None]  # trains as before
    said = _said(caplog, "`name`")
    assert len(said) == 1, said
    assert said[0].startswith(f"{f} row 2: turn `messages[1]` (assistant) has the key `name`"), said
    assert "3 rows have it" in said[0] and "a string" in said[0], said

    call = {"type": "function", "function": {"name": "add", "arguments": {}}, "id": "c1"}
    tool_row = {
        "messages": [
            {"role": "user", "content": "Add."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "3", "name": 12, "tool_call_id": "c1"},
            {"role": "assistant", "content": "3."},
        ]
    }
    assert data.formats.unread_turn_keys(tool_row, "messages") == [("name", "messages[2]", "tool")]
    tool_row["messages"][2]["name"] = "add"  # a tool's name, a string, is kept: nothing to name
    assert data.formats.unread_turn_keys(tool_row, "messages") == []


def test_an_assistant_turns_reasoning_content_in_text_parts_is_read_and_another_type_refused():
    """Was: an assistant turn's `reasoning_content` that is not a string (a list of OpenAI-style text
    parts, a number) was dropped without a word. Text parts are joined, as a turn's content is; another
    type is a `wrong_type` bad row naming the turn."""
    parts = [{"type": "text", "text": "1 + 1 "}, {"type": "text", "text": "is 2."}]
    row = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}
    row["messages"][1]["reasoning_content"] = parts
    messages, _ = normalize_row(row, "messages")
    assert messages[1] == {"role": "assistant", "content": "2", "reasoning_content": "1 + 1 is 2."}
    assert data.formats.unread_turn_keys(row, "messages") == []
    for odd in (5, {"text": "x"}, [{"type": "image_url", "image_url": {"url": "x"}}]):
        row["messages"][1]["reasoning_content"] = odd
        with pytest.raises(BadRow, match=r"`messages\[1\]`.reasoning_content must be a string") as refused:
            normalize_row(row, "messages")
        assert refused.value.reason == "wrong_type"


def test_a_turn_key_is_counted_per_row_and_named_at_the_first_rows_turn(tmp_path: Path, caplog):
    """A key in several turns of one row counts that row once; the warning names the first row's turn
    (the one that has it, not a later row's)."""

    def row(i: int, turns_with: tuple[int, ...]) -> dict:
        turns = []
        for t in range(3):
            turns += [{"role": "user", "content": f"{i}.{t}?"}, {"role": "assistant", "content": "ok"}]
            if t in turns_with:
                turns[-1]["refusal"] = "No."
        return {"messages": turns}

    f = tmp_path / "many.jsonl"
    rows = [row(0, ()), row(1, (1, 2)), row(2, (0, 1, 2)), row(3, (0,))]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        data.load_examples([DataSource(path=str(f))], "error")
    said = _said(caplog, "`refusal`")
    assert len(said) == 1, said
    assert said[0].startswith(f"{f} row 2: turn `messages[3]` (assistant) has the key `refusal`"), said
    assert "3 rows have it" in said[0], said


def test_a_prompt_completion_row_whose_tool_call_ends_the_prompt_reads_as_one_conversation(tmp_path: Path, caplog):
    """TRL's conversational prompt/completion: the prompt may end with the assistant's tool call and the
    completion begin with its result. With `tool_calls` that read; with OpenAI's deprecated
    `function_call` the call was looked for only in the prompt's own turns, so the row was refused as a
    tool result without a call (and the call named as a key not read)."""
    row = {
        "prompt": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "function_call": {"name": "w", "arguments": '{"city": "Oslo"}'}},
        ],
        "completion": [
            {"role": "function", "name": "w", "content": "12 C"},
            {"role": "assistant", "content": "It is 12 C."},
        ],
    }
    messages, _ = normalize_row(row, "prompt_completion")
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "w", "arguments": {"city": "Oslo"}}}]
    assert data.formats.unread_turn_keys(row, "prompt_completion") == []
    modern = json.loads(json.dumps(row))
    del modern["prompt"][1]["function_call"]
    modern["prompt"][1]["tool_calls"] = [{"type": "function", "function": {"name": "w", "arguments": {}}, "id": "c1"}]
    modern["completion"][0] = {"role": "tool", "content": "12 C", "tool_call_id": "c1"}
    messages, _ = normalize_row(modern, "prompt_completion")
    assert messages[2] == {"role": "tool", "content": "12 C", "tool_call_id": "c1"}


def test_a_weight_on_a_prompts_assistant_turn_is_checked_against_the_prompt_being_untrained():
    """A prompt_completion row's conversational prompt is context (its assistant turns are not trained,
    as TRL's completion_only_loss). Was: its turns' `weight` and training flags were checked as if
    every assistant turn trained, so OpenAI data split into prompt and completion (`weight: 0` on the
    earlier assistant turns, exactly what is done) was refused whole, and `weight: 1` (asking for a
    turn that is not trained) was read in silence."""
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "weight": 0},
        {"role": "user", "content": "Capital of France?"},
    ]
    row = {"prompt": prompt, "completion": [{"role": "assistant", "content": "Paris.", "weight": 1}]}
    messages, _ = normalize_row(row, "prompt_completion")
    assert messages is not None and [m["content"] for m in messages] == ["Hi", "Hello.", "Capital of France?", "Paris."]
    for flag, value in (("weight", 1), ("training", True), ("train", 1)):
        asks = json.loads(json.dumps(row))
        del asks["prompt"][1]["weight"]
        asks["prompt"][1][flag] = value
        said = rf"`prompt\[1\]`.{flag} is {value!r}: .*a conversational prompt's turns"
        with pytest.raises(BadRow, match=said) as bad:
            normalize_row(asks, "prompt_completion")
        assert bad.value.reason == "turn_weight"
        assert "only the completion trains" in str(bad.value), str(bad.value)
    # with every turn trained (data.assistant_only_loss: false) the prompt trains too: weight 1 agrees
    trained = json.loads(json.dumps(row))
    trained["prompt"][1]["weight"] = 1
    assert normalize_row(trained, "prompt_completion", assistant_only_loss=False)[0] is not None
    with pytest.raises(BadRow, match=r"`prompt\[1\]`.weight is 0"):
        normalize_row(row, "prompt_completion", assistant_only_loss=False)
