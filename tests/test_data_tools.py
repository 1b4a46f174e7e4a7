"""Tool-calling rows as users bring them: LLaMA-Factory's bare function definitions given to the chat
template in OpenAI's form (as the model sees them at inference), a definition that is no function a
bad row; a `<think>` block before a LLaMA-Factory function_call's JSON read as the turn's reasoning."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from qlora_sft import data
from qlora_sft.data import BadRow, build_data, normalize_row
from qlora_sft.data.formats import row_tools, unread_turn_keys
from qlora_sft.errors import DataError
from qlora_sft.recipe import DataConfig, DataSource

WEATHER = {
    "name": "get_weather",
    "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WRAPPED = {"type": "function", "function": WEATHER}
CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}


def lf_row(tools: object, call_value: str = json.dumps(CALL), **call_keys: object) -> dict:
    """A LLaMA-Factory sharegpt tool row: a question, a function_call turn, its observation, the answer."""
    return {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": call_value, **call_keys},
            {"from": "observation", "value": '{"temp": 3}'},
            {"from": "gpt", "value": "Cold: 3 degrees."},
        ],
        "tools": tools,
    }


def trl_template(name: str) -> str:
    """A real chat template, as TRL ships it (offline)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok():
    from tiny import build_tokenizer

    from qlora_sft.model import ensure_pad_token

    t = build_tokenizer()
    ensure_pad_token(t)
    return t


def jsonl(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _said(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


def test_bare_tool_definitions_reach_the_template_in_openais_form(tmp_path: Path, tok, caplog):
    """Was: LLaMA-Factory's bare definitions ({"name", "description", "parameters"}) were given to the
    template as written, while transformers' get_json_schema, OpenAI-compatible servers and the templates
    (Qwen's, Llama 3.1's, ...) use {"type": "function", "function": {...}}: Qwen2.5's template rendered
    `{"name": "get_weather", ...}` in training where the model sees `{"type": "function", "function":
    ...}` at inference (and Gemma 4's and gpt-oss's refused the row). They are wrapped; wrapped ones kept."""
    assert row_tools(lf_row(json.dumps([WEATHER])), "sharegpt") == [WRAPPED]
    assert row_tools(lf_row([WEATHER]), "sharegpt") == [WRAPPED]
    assert row_tools(lf_row([WRAPPED]), "sharegpt") == [WRAPPED]
    responses_api = {"type": "function", **WEATHER}  # OpenAI's Responses API writes the function flat
    assert row_tools(lf_row([responses_api]), "sharegpt") == [WRAPPED]
    assert row_tools({"instruction": "q", "output": "a", "tools": [WEATHER]}, "alpaca") == [WRAPPED]

    qwen = copy.deepcopy(tok)
    qwen.chat_template = trl_template("qwen2_5")
    bare = jsonl(tmp_path / "bare.jsonl", lf_row(json.dumps([WEATHER])), lf_row([WEATHER]))
    wrapped = jsonl(tmp_path / "wrapped.jsonl", lf_row([WRAPPED]))
    with caplog.at_level(logging.INFO, logger="qlora_sft"):
        encoded = [
            build_data(DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1), qwen, 0)
            for f in (bare, wrapped)
        ]
    bare_ids = [r["input_ids"] for r in encoded[0].train]
    assert bare_ids[0] == bare_ids[1] == encoded[1].train[0]["input_ids"]
    assert '{"type": "function", "function": {"name": "get_weather"' in qwen.decode(bare_ids[0])
    said = _said(caplog, "OpenAI's form")
    assert len(said) == 1 and said[0].startswith(f"{bare} row 1: its `tools`") and "2 rows have them" in said[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora_sft"):
        rows = jsonl(tmp_path / "rows.jsonl", lf_row([WRAPPED]), lf_row([WEATHER]))
        data.load_examples([DataSource(path=str(rows))], "error")
    said = _said(caplog, "OpenAI's form")
    assert len(said) == 1 and "row 2: its `tools`" in said[0] and "1 row has them" in said[0], said


@pytest.mark.parametrize(
    "tool,problem",
    [
        ({"description": "Weather now", "parameters": {}}, "is not a function definition"),
        ({"type": "function", "function": {"description": "no name"}}, "is not a function definition"),
        ({"type": "code_interpreter"}, "is a 'code_interpreter' tool"),
    ],
)
def test_a_tool_definition_that_is_no_function_is_a_bad_row_naming_the_row_and_key(tmp_path: Path, tool, problem):
    with pytest.raises(BadRow) as bad:
        row_tools(lf_row([WRAPPED, tool]), "sharegpt")
    assert bad.value.reason == "wrong_type" and f"field `tools[1]` {problem}" in str(bad.value)
    f = jsonl(tmp_path / "odd.jsonl", lf_row([WRAPPED]), lf_row([WRAPPED, tool]))
    with pytest.raises(DataError) as exc:
        data.load_examples([DataSource(path=str(f))], "error")
    assert str(exc.value).startswith(f"{f} row 2: field `tools[1]` {problem}")
    assert '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}' in str(exc.value)


THINK = "<think>\nOslo is cold in winter; I should check.\n</think>\n\n"


def test_a_think_block_before_a_function_call_is_the_turns_reasoning(tmp_path: Path, tok):
    """Was: a LLaMA-Factory function_call turn whose value is a `<think>` block and then the JSON call (its
    FunctionFormatter splits the thought off, with every template's thought words) was a bad row, "its
    `value` is not JSON". The thought is the turn's reasoning_content, the JSON its call."""
    messages, _ = normalize_row(lf_row([WRAPPED], THINK + json.dumps(CALL)), "sharegpt")
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": CALL}],
        "reasoning_content": "Oslo is cold in winter; I should check.",
    }
    # LLaMA-Factory's older thought words, without newlines; parallel calls; an empty thought
    messages, _ = normalize_row(lf_row([WRAPPED], "<think>look</think>" + json.dumps([CALL, CALL])), "sharegpt")
    assert messages[1]["reasoning_content"] == "look" and len(messages[1]["tool_calls"]) == 2
    messages, _ = normalize_row(lf_row([WRAPPED], "<think>\n\n</think>\n\n" + json.dumps(CALL)), "sharegpt")
    assert "reasoning_content" not in messages[1] and messages[1]["tool_calls"]
    # the reasoning given twice: which one trains is not guessed
    with pytest.raises(BadRow, match=r"`conversations\[1\]` \(a function_call turn\) gives its reasoning twice"):
        normalize_row(lf_row([WRAPPED], THINK + json.dumps(CALL), reasoning_content="other"), "sharegpt")
    # not a call after the thought: the bad row it was
    with pytest.raises(BadRow, match=r"its `value` is not JSON"):
        normalize_row(lf_row([WRAPPED], THINK + "get_weather(Oslo)"), "sharegpt")

    qwen3 = copy.deepcopy(tok)
    qwen3.chat_template = trl_template("qwen3")
    f = jsonl(tmp_path / "think.jsonl", lf_row(json.dumps([WEATHER]), THINK + json.dumps(CALL)))
    (row,) = build_data(DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1), qwen3, 0).train
    text = qwen3.decode(row["input_ids"])
    assert THINK + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text


def test_a_function_call_turns_reasoning_content_is_not_named_as_unread():
    """Was: a function_call turn's `reasoning_content`, read as the assistant turn's, was named in a
    warning as a key not read ("They train without it")."""
    row = lf_row([WRAPPED], reasoning_content="Check the weather.")
    assert normalize_row(row, "sharegpt")[0][1]["reasoning_content"] == "Check the weather."
    assert unread_turn_keys(row, "sharegpt") == []
