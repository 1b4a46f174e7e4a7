"""Row formats -> chat messages: alpaca | dolly | sharegpt | messages | prompt_completion | text, set
on a source or detected from its first row. Each row is normalised to an `Example` (messages whose
roles are checked, or plain text) or refused as a `BadRow` with a reason (`on_bad_row` decides
whether that stops the run or is counted). Then the mix of the sources (by ratio or weight, seeded)
and the rows held out for evaluation."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import DataError
from ..recipe import DataSource
from .report import SourceReport
from .sources import BadRow, detect_format, parse_document, read_documents

log = logging.getLogger("qlora_sft")

ROLE_ALIASES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system turn
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "tool": "tool",
    "ipython": "tool",
    "function": "tool",
    "observation": "tool",  # LLaMA-Factory's sharegpt: a tool's result
}
# LLaMA-Factory's sharegpt: the assistant calling tools, its value the call as JSON text (`_function_call`)
FUNCTION_CALL_ROLE = "function_call"

FORMAT_FIELDS = {
    "alpaca": "instruction, input (optional), output",
    "dolly": "instruction, context (optional), response",
    "sharegpt": "conversations: [{from, value}, ...]",
    "messages": "messages: [{role, content}, ...]",
    "prompt_completion": "prompt, completion",
    "text": "text",
}


@dataclass
class Example:
    """One normalised row: chat `messages`, or plain `text`; with where it came from."""

    messages: list[dict[str, Any]] | None  # role, content (+ tool_calls on assistant turns, name on tool turns)
    text: str | None
    source: str
    row: int
    tools: list[dict[str, Any]] | None = None  # the row's tool definitions (OpenAI's fine-tuning format)
    # How many of `messages` came from a prompt_completion row's `prompt` (with a system prompt put before
    # it), set only where the prompt is a list of turns holding an assistant turn: those turns are context,
    # not trained (TRL's completion_only_loss). None for every other row.
    prompt_turns: int | None = None


TOOLS_FORMATS = ("messages", "sharegpt", "alpaca")  # the formats whose rows' `tools` are read


def row_tools(row: Any, fmt: str) -> list[dict[str, Any]] | None:
    """A conversation row's `tools` (the functions it may call, given to the chat template), or None:
    a list of tool definitions, or the JSON text of one (LLaMA-Factory's sharegpt and alpaca rows: its
    alpaca converter reads a `tools` column too), each in OpenAI's form (`tool_definition`)."""
    return _row_tools(row, fmt)[0]


def _row_tools(row: Any, fmt: str) -> tuple[list[dict[str, Any]] | None, int]:
    """`row_tools`, with how many of its definitions were not in OpenAI's form as written (wrapped)."""
    tools = row.get("tools") if isinstance(row, dict) and fmt in TOOLS_FORMATS else None
    if isinstance(tools, str):
        if not tools.strip():
            return None, 0
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise BadRow(
                "wrong_type",
                f"field `tools` is not JSON ({exc.msg}): give the tool definitions as a list of mappings, or as "
                "the JSON text of one",
            ) from None
    if tools is None or tools == []:
        return None, 0
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("wrong_type", "field `tools` must be a list of tool definitions (mappings)")
    out = [tool_definition(tool, f"field `tools[{i}]`") for i, tool in enumerate(tools)]
    return out, sum(new is not old for new, old in zip(out, tools, strict=True))


TOOL_SHAPE = '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
BARE_TOOL_SHAPE = '{"name": ..., "description": ..., "parameters": {...}}'


def tool_definition(tool: dict[str, Any], where: str) -> dict[str, Any]:
    """One tool definition in OpenAI's form, TOOL_SHAPE: as written where it is (the form transformers'
    `get_json_schema` and OpenAI-compatible servers give the chat template at inference, and the form
    Qwen's, Llama 3.1's, Mistral's, Gemma 4's and gpt-oss's templates read); a bare function
    (LLaMA-Factory's BARE_TOOL_SHAPE, or OpenAI's Responses API's, the same with `"type": "function"`)
    wrapped in it, as LLaMA-Factory wraps it for those templates. Another is a BadRow."""

    def named(fn: Any) -> bool:
        return isinstance(fn, dict) and isinstance(fn.get("name"), str) and bool(fn["name"].strip())

    kind = tool.get("type", "function")
    if kind == "function" and "function" in tool and named(tool["function"]):
        return tool if "type" in tool else {"type": "function", **tool}
    if kind == "function" and "function" not in tool and named(tool):
        return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
    if kind != "function" and isinstance(kind, str):
        raise BadRow(
            "wrong_type",
            f"{where} is a {kind!r} tool: only function tools, {TOOL_SHAPE}, are given to the chat template. "
            "Remove it from the row's tools",
        )
    raise BadRow(
        "wrong_type",
        f"{where} is not a function definition (it has {sorted(map(str, tool))}): write it as {TOOL_SHAPE} "
        f"(OpenAI's form), or as the bare function {BARE_TOOL_SHAPE} (LLaMA-Factory's), with a name",
    )


def _text_field(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise BadRow("missing_field", f"missing field `{key}`")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field `{key}` must be a string, got {type(value).__name__}")
    return value


def _history(row: dict[str, Any]) -> list[dict[str, Any]]:
    """LLaMA-Factory's alpaca `history`: the conversation's earlier turns, [[user, assistant], ...]."""
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise BadRow(
            "wrong_type", f"field `history` must be a list of [user, assistant] pairs, got {type(history).__name__}"
        )
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadRow(
                "wrong_type", f"field `history[{i}]` must be a [user, assistant] pair of strings, got {pair!r}"
            )
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _content(value: Any, where: str, key: str = "") -> str:
    """A turn's content (or its `key`, such as `reasoning_content`): a string, or OpenAI's text parts
    joined."""
    if isinstance(value, str):
        return value
    what = f"{where}.{key}" if key else where
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif key:
                raise BadRow(
                    "wrong_type",
                    f'{what} must be a string (or a list of text parts, {{"type": "text", "text": ...}}), '
                    f"got a list holding {part!r}. Write it as text",
                )
            else:
                raise BadRow("wrong_type", f"{where}: only text content parts are supported")
        return "".join(parts)
    if key:
        raise BadRow(
            "wrong_type",
            f"{what} must be a string (or a list of text parts), got {type(value).__name__} {value!r}. Write it "
            "as text, or remove the key",
        )
    raise BadRow("wrong_type", f"{where}: content must be a string, got {type(value).__name__}")


def _turns(
    turns: Any,
    role_key: str,
    content_key: str,
    field_name: str,
    assistant_only_loss: bool = True,
    following: Sequence[Any] = (),
    prompt: bool = False,
) -> list[dict[str, Any]]:
    """A row's turns -> messages; `following`: the turns after these in the same conversation (a
    prompt_completion row's completion after its prompt), where a tool call's result may be;
    `prompt`: these turns are a prompt_completion row's prompt, context that does not train (its
    assistant turns included: `Example.prompt_turns`) unless every turn trains."""
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"field `{field_name}` must be a list of turns, got {type(turns).__name__}")
    out = []
    conversation = [*turns, *following] if following else turns  # (once: not per turn)
    for i, turn in enumerate(turns):
        where = f"`{field_name}[{i}]`"
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"{where} must be a mapping")
        calls = turn.get("tool_calls")
        if not calls and maps_function_call(conversation, i, role_key):
            calls = [turn["function_call"]]  # OpenAI's deprecated call: {"name", "arguments"}
        if role_key not in turn or (content_key not in turn and not calls):
            raise BadRow("missing_field", f"{where} needs `{role_key}` and `{content_key}`")
        raw_role = turn[role_key]
        role = _role(raw_role)
        function_call = isinstance(raw_role, str) and raw_role.lower() == FUNCTION_CALL_ROLE
        if function_call:
            role = "assistant"  # LLaMA-Factory's call of a tool (`_function_call`)
        if role is None:
            raise BadRow(
                "unknown_role",
                f"`{field_name}[{i}].{role_key}` is {raw_role!r}; expected one of "
                f"{sorted([*ROLE_ALIASES, FUNCTION_CALL_ROLE])}",
            )
        message: dict[str, Any]
        if function_call:
            if calls:
                raise BadRow(
                    "wrong_type", f"{where} is a function_call turn: its call is its `{content_key}`, not `tool_calls`"
                )
            message = _function_call(turn.get(content_key), f"{where} (a function_call turn)", content_key)
        else:
            content = turn.get(content_key)
            message = {"role": role, "content": "" if content is None else _content(content, where)}
        if role == "assistant" and turn.get("reasoning_content") is not None:  # a template with thinking renders it
            if "reasoning_content" in message:  # a function_call turn's <think> block (`_function_call`)
                raise BadRow(
                    "wrong_type",
                    f"{where} (a function_call turn) gives its reasoning twice, in a <think> block before its call "
                    "and as `reasoning_content`: keep one",
                )
            message["reasoning_content"] = _content(turn["reasoning_content"], where, "reasoning_content")
        trains = (role == "assistant" and not prompt) or not assistant_only_loss
        done = (
            "every turn trains (data.assistant_only_loss: false)"
            if not assistant_only_loss
            else "a conversational prompt's turns are context and do not train, its assistant turns included: only "
            "the completion trains (as TRL's completion_only_loss)"
            if prompt
            else "every assistant turn trains and no other turn does"
        )
        # axolotl's / OpenAI's `weight` and axolotl's message_field_training flags: whether the turn trains.
        # null is none (axolotl: `if training is not None`; SlimOrca and OpenHermes write `weight: null`);
        # 1/0 compare by value (converted data writes 1.0/0.0; bool is an int), and must agree with `trains`
        for flag in ("weight", "training", "train"):
            value = turn.get(flag)
            if value is None:
                continue
            number = isinstance(value, int | float)  # (bool is an int)
            if flag == "weight" and not (number and value in (0, 1)):
                raise BadRow(
                    "turn_weight",
                    f"{where}.weight is {value!r}: per-turn weights other than 0 and 1 are not supported, and "
                    f"{done}. Remove the turn (or the key), or split the conversation",
                )
            if not (number and value in (0, 1)):
                raise BadRow(
                    "wrong_type",
                    f"{where}.{flag} is {value!r}: it must be a boolean (true or false; 1 or 0), axolotl's "
                    "per-turn training flag (message_field_training). Fix the value, or remove the key",
                )
            if bool(value) is not trains:
                what = (
                    "per-turn weights (axolotl's and OpenAI's `weight: 0` to leave a turn untrained)"
                    if flag == "weight"
                    else "per-turn training flags (axolotl's message_field_training)"
                )
                raise BadRow(
                    "turn_weight",
                    f"{where}.{flag} is {value!r}: {what} are not supported; {done}. Remove the turn (or the key), "
                    "or split the conversation",
                )
        if calls:
            if role != "assistant":
                raise BadRow("wrong_type", f"{where}: only assistant turns carry `tool_calls`")
            deprecated = not turn.get("tool_calls")  # OpenAI's `function_call`: name what the user wrote
            message["tool_calls"] = _tool_calls(
                calls,
                where,
                not_json=(
                    lambda j, msg, at=where: (
                        f"{at}.function_call.arguments is not JSON ({msg}): OpenAI's "
                        f"deprecated tool call is {CALL_SHAPE}, its arguments an object or the JSON text of one. Fix "
                        "the arguments"
                    )
                )
                if deprecated
                else None,
            )
        if role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(turn.get(key), str):
                    message[key] = turn[key]
        out.append(message)
    return out


CALL_SHAPE = '{"name": ..., "arguments": {...}}'


def maps_function_call(turns: list[Any], i: int, role_key: str) -> bool:
    """Whether turn `i`'s `function_call` (OpenAI's deprecated assistant tool call, {"name", "arguments"},
    its result in a `function` turn after it) is read as the turn's tool call: on an assistant turn
    without `tool_calls`, when a tool result follows it. One with no result after it is not read (such
    rows trained before without it, and a call with no result would refuse them): `unread_turn_keys`
    names it."""
    turn = turns[i]
    call = turn.get("function_call")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or turn.get("tool_calls"):
        return False
    if _role(turn.get(role_key)) != "assistant" or i + 1 >= len(turns):
        return False
    after = turns[i + 1]
    return isinstance(after, dict) and _role(after.get(role_key)) == "tool"


def _role(raw: Any) -> str | None:
    return ROLE_ALIASES.get(raw.lower()) if isinstance(raw, str) else None


# a `<think>` block before a LLaMA-Factory function_call's JSON (`_function_call`)
THOUGHT = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)


def _function_call(value: Any, where: str, content_key: str) -> dict[str, Any]:
    """LLaMA-Factory's sharegpt `function_call` turn -> an assistant turn with `tool_calls`. Its value
    is the call as JSON text, {"name": ..., "arguments": {...}}, or a list of such calls (parallel
    calls; LLaMA-Factory's FunctionFormatter reads both), after a `<think>` block where the call was
    reasoned (the FunctionFormatter splits it off with its templates' thought words, `<think>\n` and
    `\n</think>\n\n`, or `<think>` and `</think>`): the turn's `reasoning_content`, as a chat template
    with thinking renders it (Qwen3's: `<think>\n...\n</think>\n\n` before the call)."""
    fix = f"it must be a call {CALL_SHAPE}, or a list of them, as JSON text"
    calls = value
    reasoning = ""
    if isinstance(value, str) and (thought := THOUGHT.match(value)):
        reasoning, value = thought.group(1).strip(), value[thought.end() :]
    if isinstance(value, str):
        try:
            calls = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow("wrong_type", f"{where}: its `{content_key}` is not JSON ({exc.msg}); {fix}") from None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise BadRow("wrong_type", f"{where}: its `{content_key}` is {type(calls).__name__}; {fix}")
    if not calls:
        raise BadRow("wrong_type", f"{where}: its `{content_key}` holds no call; {fix}")

    def shown(j: int) -> str:
        return f"call {j}" if len(calls) > 1 else "the call"

    tool_calls = _tool_calls(
        calls,
        where,
        no_name=lambda j: f"{where}: {shown(j)} needs a function name; {fix}",
        not_json=lambda j, _: f"{where}: the arguments of {shown(j)} are not JSON; {fix}",
    )
    message: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": tool_calls}
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def _tool_calls(
    calls: Any,
    where: str,
    no_name: Callable[[int], str] | None = None,
    not_json: Callable[[int, str], str] | None = None,
) -> list[dict[str, Any]]:
    """OpenAI-style tool calls: [{"type": "function", "function": {"name": ..., "arguments": {...}}}]
    (arguments as an object or a JSON string; a bare {"name", "arguments"} is accepted too). A call
    without a name, or with arguments that are not JSON, is a BadRow: `no_name(j)` / `not_json(j,
    why)` word it for the form the row wrote the calls in (OpenAI's `tool_calls` by default)."""
    if not isinstance(calls, list):
        raise BadRow("wrong_type", f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRow("wrong_type", no_name(j) if no_name else f"{where}.tool_calls[{j}] needs a function name")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                said = not_json(j, exc.msg) if not_json else f"{where}.tool_calls[{j}].arguments is not JSON"
                raise BadRow("wrong_type", said) from None
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def check_conversation(messages: list[dict[str, Any]]) -> None:
    """Optional system first, then user and assistant turns alternating, ending with an assistant
    turn; an assistant turn with tool calls is followed by the tools' results (role `tool`), then by
    the assistant again."""
    if not messages:
        raise BadRow("empty", "no turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise BadRow("roles_out_of_order", "a system turn may only come first")
    if not body:
        raise BadRow("no_assistant_turn", "no user/assistant turns")
    order = " -> ".join(t["role"] for t in messages)
    expected = "user"
    for m in body:
        role = m["role"]
        if role == "tool":
            if expected not in ("tool", "tool or assistant"):
                raise BadRow("roles_out_of_order", f"a tool result without a tool call before it ({order})")
            expected = "tool or assistant"
        elif expected == "tool or assistant" and role == "assistant":
            expected = "tool" if m.get("tool_calls") else "user"
        elif role != expected:
            raise BadRow(
                "roles_out_of_order",
                f"roles out of order ({order}); expected user/assistant alternating, tool results after tool calls",
            )
        elif role == "assistant":
            expected = "tool" if m.get("tool_calls") else "user"
        else:
            expected = "assistant"
    if body[-1]["role"] != "assistant":
        raise BadRow("no_assistant_turn", "the conversation does not end with an assistant turn")
    for m in body:
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise BadRow("empty_assistant_turn", "an assistant turn is empty")
        if m["role"] == "user" and not m["content"].strip():
            raise BadRow("empty_user_turn", "a user turn is empty")


def normalize_row(
    row: Any, fmt: str, system_prompt: str | None = None, assistant_only_loss: bool = True
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """One raw row -> (messages, None) or (None, text). Raises BadRow (`assistant_only_loss`: which
    turns train, against which a turn's own training flag is checked)."""
    messages, text, _ = normalize_row_turns(row, fmt, system_prompt, assistant_only_loss)
    return messages, text


def normalize_row_turns(
    row: Any, fmt: str, system_prompt: str | None = None, assistant_only_loss: bool = True
) -> tuple[list[dict[str, Any]] | None, str | None, int | None]:
    """`normalize_row`, with `Example.prompt_turns`: how many of the messages came from a
    prompt_completion row's list `prompt` where it holds an assistant turn (else None)."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row must be a mapping of fields, got {type(row).__name__}")
    if fmt == "text":
        text = _text_field(row, "text")
        if not text.strip():
            raise BadRow("empty_text", "field `text` is empty")
        _check_unicode(text, "field `text`")
        return None, text, None
    prompt_turns: int | None = None
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", required=False)
        output = _text_field(row, "output")
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = [*_history(row), {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "dolly":
        instruction = _text_field(row, "instruction")
        context = _text_field(row, "context", required=False)
        response = _text_field(row, "response")
        user = instruction + (f"\n\n{context}" if context.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    elif fmt == "sharegpt":
        if "conversations" not in row:
            raise BadRow("missing_field", "missing field `conversations`")
        messages = _turns(row["conversations"], "from", "value", "conversations", assistant_only_loss)
        if (
            isinstance(row.get("system"), str)
            and row["system"].strip()
            and (not messages or messages[0]["role"] != "system")
        ):
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "messages":
        if "messages" not in row:
            raise BadRow("missing_field", "missing field `messages`")
        messages = _turns(row["messages"], "role", "content", "messages", assistant_only_loss)
        if (
            isinstance(row.get("system"), str)
            and row["system"].strip()
            and (not messages or messages[0]["role"] != "system")
        ):
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in row or row[key] is None:
                raise BadRow("missing_field", f"missing field `{key}`")
        if row.get("label") is False:  # TRL's unpaired preference (KTO) format: prompt, completion, label
            raise BadRow(
                "undesirable_completion",
                "field `label` is false: a preference (KTO) row whose completion is undesirable; supervised "
                "fine-tuning would teach it. Leave such rows out of the SFT data (keep those with label true)",
            )
        prompt, completion = row["prompt"], row["completion"]
        p_msgs = (  # one conversation: a tool call at the prompt's end may have its result in the completion
            _turns(
                prompt,
                "role",
                "content",
                "prompt",
                assistant_only_loss,
                completion if isinstance(completion, list) else (),
                prompt=True,
            )
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text_field(row, "prompt")}]
        )
        c_msgs = (
            _turns(completion, "role", "content", "completion", assistant_only_loss)
            if isinstance(completion, list)
            else [{"role": "assistant", "content": _text_field(row, "completion")}]
        )
        messages = p_msgs + c_msgs
        if isinstance(prompt, list) and any(m["role"] == "assistant" for m in p_msgs):
            prompt_turns = len(p_msgs)  # only the completion trains, as TRL's completion_only_loss does
    else:  # pragma: no cover - formats are validated by the recipe
        raise ValueError(fmt)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
        if prompt_turns is not None:
            prompt_turns += 1
    check_conversation(messages)
    for i, m in enumerate(messages):
        _check_unicode(m, f"turn {i + 1} ({m['role']})")
    return messages, None, prompt_turns


def _check_unicode(value: Any, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, as a JSON escape "\\ud83d" without its
    pair writes): the tokenizer cannot encode it."""
    if isinstance(value, str):
        if value.isascii():
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRow(
                "invalid_text",
                f"{where} is not valid Unicode text: {value[exc.start : exc.end]!r} at character {exc.start} is "
                "a lone UTF-16 surrogate (half of a pair such as an emoji's; in JSON a \\uD800-\\uDFFF escape "
                "without its other half). Write the whole character, or remove it",
            ) from None
    elif isinstance(value, dict):
        for v in value.values():
            _check_unicode(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, where)


# the fields each format reads (the optional ones among them are left out in silence where misspelled)
READ_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history", "tools"),
    "dolly": ("instruction", "context", "response"),
    "sharegpt": ("conversations", "system", "tools"),
    "messages": ("messages", "system", "tools"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_NAMED_NEAR_MISSES: set[tuple[str, str]] = set()
_NAMED_TURN_NAMES: set[str] = set()  # the sources whose turns' `name` was warned of
_NAMED_TURN_KEYS: set[tuple[str, str]] = set()  # (source, key) of the turn keys not read that were warned of
_NAMED_WRAPPED_TOOLS: set[str] = set()  # the sources whose bare tool definitions were said to be wrapped
# the fields that hold a format's turns, and the key of a turn's role
TURN_FIELDS = {
    "sharegpt": (("conversations",), "from"),
    "messages": (("messages",), "role"),
    "prompt_completion": (("prompt", "completion"), "role"),
}
# a turn's keys that `_turns` reads (besides its role and content keys), by the role they are read on
# ("" for any); `name` on a user, assistant or system turn is `turn_name`'s
TURN_KEYS_READ = {
    "": ("tool_calls", "weight", "training", "train", "name"),
    "assistant": ("reasoning_content",),
    "tool": ("tool_call_id",),
}
# a turn's keys read only where they are strings (another value is dropped: `unread_turn_keys` names it)
STRING_TURN_KEYS = frozenset({"name", "tool_call_id"})
# a turn's keys not read that hold nothing the turn says (ids and times, as a row's own ids): not named
HARMLESS_TURN_KEYS = frozenset({"id", "message_id", "parent_id", "turn_id", "timestamp", "created_at", "create_time"})


def near_misses(row: Any, fmt: str) -> list[tuple[str, str]]:
    """(field, the field of `fmt` it nearly spells) for the row's fields the format does not read but
    one a letter or two from a field it reads that the row lacks: `imput` for alpaca's `input`. Other
    fields (ids, metadata) are not named."""
    if not isinstance(row, dict):
        return []
    return list(_near_misses(tuple(k for k in row if isinstance(k, str)), fmt))


@functools.lru_cache(maxsize=1024)
def _near_misses(keys: tuple[str, ...], fmt: str) -> tuple[tuple[str, str], ...]:
    """`near_misses` of a row with these fields (every row is looked at: rows share few key sets)."""
    import difflib

    read = READ_FIELDS.get(fmt, ())
    wanted = [f for f in read if f not in keys]
    out = []
    for key in keys:
        if key not in read:
            close = difflib.get_close_matches(key.lower(), wanted, n=1, cutoff=0.8)
            if close:
                out.append((key, close[0]))
    return tuple(out)


def _row_turns(row: Any, fmt: str) -> Iterator[tuple[str, list[Any], int, dict[str, Any], str]]:
    """(field, its turns and those of the fields after it, i, turn, role key) of each turn (a mapping)
    of a conversation row (a prompt_completion row's prompt and completion are one conversation)."""
    fields, role_key = TURN_FIELDS.get(fmt, ((), ""))
    lists = [row.get(field) if isinstance(row, dict) else None for field in fields]
    for n, (field, turns) in enumerate(zip(fields, lists, strict=True)):
        if isinstance(turns, list):
            conversation = [t for later in lists[n:] if isinstance(later, list) for t in later]
            for i, turn in enumerate(turns):
                if isinstance(turn, dict):
                    yield field, conversation, i, turn, role_key


def turn_name(row: Any, fmt: str) -> tuple[str, str, str] | None:
    """(turn, role, name) of the row's first user, assistant or system turn with a `name` (OpenAI's
    chat format: who speaks), or None. Few chat templates render a turn's name, so none is given to
    the template (every template trains the same text); a tool turn's `name` (the tool) is kept."""
    for field, _, i, turn, role_key in _row_turns(row, fmt):
        if not isinstance(turn.get("name"), str) or not turn["name"]:
            continue
        raw = turn.get(role_key)
        role = _role(raw) or raw
        if role != "tool":
            return f"{field}[{i}]", str(role), turn["name"]
    return None


def unread_turn_keys(row: Any, fmt: str) -> list[tuple[str, str, str]]:
    """(key, turn, role) for each key of the row's turns that is not read, holds something (not null
    or empty, as OpenAI's SDK writes `"refusal": null`) and is not a harmless id or time, at the first
    turn that has it: OpenAI's assistant `refusal` or `audio`, axolotl's `training_detail`, a
    `function_call` with no result after it (`maps_function_call`)."""
    out: dict[str, tuple[str, str, str]] = {}
    for field, turns, i, turn, role_key in _row_turns(row, fmt):
        raw = turn.get(role_key)
        role = _role(raw) or (raw if isinstance(raw, str) else "")
        # LLaMA-Factory's function_call turn is read as the assistant's (`_turns`)
        reads_as = "assistant" if role.lower() == FUNCTION_CALL_ROLE else role
        content_key = "value" if fmt == "sharegpt" else "content"
        read = {role_key, content_key, *TURN_KEYS_READ[""], *TURN_KEYS_READ.get(reads_as, ())}
        if maps_function_call(turns, i, role_key):
            read.add("function_call")
        for key, value in turn.items():
            if key in out or not isinstance(key, str) or key in HARMLESS_TURN_KEYS:
                continue
            if key in read and not (key in STRING_TURN_KEYS and not isinstance(value, str)):
                continue
            if value is None or value == "" or value == [] or value == {}:
                continue
            out[key] = (key, f"{field}[{i}]", role or str(raw))
    return list(out.values())


def near_miss_text(row: Any, fmt: str) -> str:
    """What of the row is not read, as JSON, "" for nothing (a column of the encoded rows): its
    `near_misses`, its first turn with a `turn_name`, its `unread_turn_keys`, and how many of its tool
    definitions are given to the template wrapped in OpenAI's form (`tool_definition`)."""
    found = near_misses(row, fmt)
    named = turn_name(row, fmt)
    keys = unread_turn_keys(row, fmt)
    try:
        wrapped = _row_tools(row, fmt)[1]
    except BadRow:  # (the row's bad row says so)
        wrapped = 0
    if not (found or named or keys or wrapped):
        return ""
    return json.dumps({"near": found, "name": named, "keys": keys, "tools": wrapped})


def _how_many(n: int, read: int | None, it: str = "it") -> str:
    """ "N rows have it", or where the source was read only in part (`read` rows), of those rows."""
    if read is None:
        return f"1 row has {it}" if n == 1 else f"{n} rows have {it}"
    return f"{n} of the first {read} rows read {'has' if n == 1 else 'have'} {it}"


class UnreadCounts:
    """What `near_miss_text` found in a source's rows, added row by row: each near miss's and each
    turn key's first row and count, and the rows with a turn's name (`warn` names them)."""

    def __init__(self) -> None:
        self.near: dict[tuple[str, str], list[int]] = {}  # (key, meant) -> [first row, count]
        self.keys: dict[str, tuple[int, str, str, list[int]]] = {}  # key -> (first row, turn, role, [count])
        self.named: tuple[int, list[str]] | None = None
        self.named_rows = 0
        self.wrapped: list[int] | None = None  # [first row, count] of the rows whose tools were wrapped

    def add(self, rowno: int, text: str) -> None:
        if not text:
            return
        unread = json.loads(text)
        for key, meant in unread["near"]:
            self.near.setdefault((key, meant), [rowno, 0])[1] += 1
        if unread["name"]:
            self.named = self.named or (rowno, unread["name"])
            self.named_rows += 1
        for key, turn, role in unread.get("keys", ()):
            self.keys.setdefault(key, (rowno, turn, role, [0]))[3][0] += 1
        if unread.get("tools"):
            self.wrapped = self.wrapped or [rowno, 0]
            self.wrapped[1] += 1

    def warn(self, path: str, fmt: str, read: int | None = None) -> None:
        """Warn once per source and field (or turn key) of what was found; `read`: the rows read, where
        the source was read only in part (the counts are of those rows)."""
        for (key, meant), (rowno, n) in self.near.items():
            if (path, key) in _NAMED_NEAR_MISSES:
                continue
            _NAMED_NEAR_MISSES.add((path, key))
            log.warning(
                "%s row %d has the field `%s`, which format %s does not read: did you mean `%s`? %s; they train "
                "without it: rename the field in the data",
                path,
                rowno,
                key,
                fmt,
                meant,
                _how_many(n, read),
            )
        if self.named and path not in _NAMED_TURN_NAMES:
            _NAMED_TURN_NAMES.add(path)
            rowno, (turn, role, name) = self.named
            log.warning(
                "%s row %d: turn `%s` (%s) has a `name` (%r), which is not given to the chat template (few "
                "templates render one, so none is passed); %s. They train without it: to keep who speaks, write "
                "it into the turn's content; remove the key to silence this",
                path,
                rowno,
                turn,
                role,
                name,
                _how_many(self.named_rows, read, "one"),
            )
        if self.wrapped and path not in _NAMED_WRAPPED_TOOLS:
            _NAMED_WRAPPED_TOOLS.add(path)
            log.info(
                "%s row %d: its `tools` lists bare function definitions (%s, as LLaMA-Factory writes them); %s. "
                "They are given to the chat template in OpenAI's form, %s: the form transformers' "
                "get_json_schema and OpenAI-compatible servers give it at inference, which the templates of "
                "Qwen, Llama 3.1, Mistral, Gemma 4 and gpt-oss read (LLaMA-Factory wraps them so for those too)",
                path,
                self.wrapped[0],
                BARE_TOOL_SHAPE,
                _how_many(self.wrapped[1], read, "them"),
                TOOL_SHAPE,
            )
        for key, (rowno, turn, role, (n,)) in self.keys.items():
            if (path, key) in _NAMED_TURN_KEYS:
                continue
            _NAMED_TURN_KEYS.add((path, key))
            fix = (
                "OpenAI's deprecated tool call is read as the turn's tool call only on an assistant turn without "
                "`tool_calls` that a tool result (a `function` or `tool` turn) follows: give its result after it, "
                "or write the call as `tool_calls`"
                if key == "function_call"
                else "a turn's `name` is read only as a string (a tool turn's is kept; another turn's is named, not "
                "given to the template): write it as text, or, if it should train, into the turn's content"
                if key == "name"
                else "a `tool_call_id` is read only as a string, on a tool turn: write it so, or remove it"
                if key == "tool_call_id"
                else "if it should train, write what it holds into the turn's content"
            )
            log.warning(
                "%s row %d: turn `%s` (%s) has the key `%s`, which is not read (format %s; it is not given to the "
                "chat template); %s. They train without it: %s; remove the key to silence this",
                path,
                rowno,
                turn,
                role,
                key,
                fmt,
                _how_many(n, read),
                fix,
            )


def name_near_misses(path: str, fmt: str, rows: Sequence[int], found: Sequence[str], read: int | None = None) -> None:
    """Warn once per source and field of the fields `near_miss_text` found in its rows (`found`, ""
    for a row without one), with the first row that has it and how many do; and once per source of
    its turns' names (`turn_name`), and once per source and key of its turns' keys not read
    (`unread_turn_keys`), likewise. `read`: the rows read, where the source was read only in part."""
    counts = UnreadCounts()
    for rowno, text in zip(rows, found, strict=True):
        counts.add(rowno, text)
    counts.warn(path, fmt, read)


def source_format(src: DataSource, first_row: Any, rowno: int) -> str:
    """The source's format: as set, or detected from its first row."""
    return _source_format(src, first_row, rowno)


def _source_format(src: DataSource, first_row: Any, rowno: int) -> str:
    if src.format != "auto":
        return src.format
    if isinstance(first_row, BadRow):  # not JSON: there are no fields to tell the format from
        raise DataError(
            f"{src.path} row {rowno}: {first_row}; the format is detected from the first row. Fix the row, or "
            "set `format:` on this source (then data.on_bad_row decides what happens to it)."
        )
    detected = detect_format(first_row)
    if detected is None:
        keys = sorted(first_row) if isinstance(first_row, dict) else type(first_row).__name__
        raise DataError(
            f"{src.path} row {rowno}: cannot tell the format from its fields {keys}. Set "
            "`format:` on this source to one of: " + "; ".join(f"{k} ({v})" for k, v in FORMAT_FIELDS.items())
        )
    return detected


def bad_row_error(path: str, rowno: int, fmt: str, message: str) -> DataError:
    return DataError(
        f"{path} row {rowno}: {message} (format {fmt}: {FORMAT_FIELDS[fmt]}). Fix the row, or set "
        "data.on_bad_row=skip to drop bad rows and see counts by reason."
    )


def iter_examples(
    src: DataSource,
    on_bad_row: str,
    report: SourceReport,
    base_dir: str | os.PathLike[str] | None = None,
    assistant_only_loss: bool = True,
) -> Iterator[Example]:
    """A source's rows, normalised one at a time; bad rows raise DataError or are counted in
    `report`, per `on_bad_row`. What the rows hold that is not read (`near_miss_text`) is warned of
    once they are read, counted over the source (over the rows read, where reading stops early)."""
    fmt = ""
    unread = UnreadCounts()  # warned of when the rows are read (or reading stops), with their counts
    whole = False
    try:
        for rowno, document in read_documents(src, base_dir):
            row = parse_document(document)
            if not fmt:
                fmt = report.format = source_format(src, row, rowno)
            report.rows += 1
            unread.add(rowno, near_miss_text(row, fmt))
            try:
                messages, text, prompt_turns = normalize_row_turns(row, fmt, src.system_prompt, assistant_only_loss)
                tools = row_tools(row, fmt)
            except BadRow as bad:
                if on_bad_row == "error":
                    raise bad_row_error(src.path, rowno, fmt, str(bad)) from None
                report.skip(bad.reason, rowno, str(bad))
                continue
            report.kept += 1
            yield Example(messages, text, src.path, rowno, tools, prompt_turns)
        whole = True
    finally:  # also when the reader stops early (`validate`'s examples) or a bad row stops the run
        if fmt:
            unread.warn(src.path, fmt, None if whole else report.rows)
    if report.rows == 0:
        raise DataError(f"data source {src.path} has no rows")


def load_examples(
    sources: Sequence[DataSource], on_bad_row: str, base_dir: str | os.PathLike[str] | None = None
) -> tuple[list[list[Example]], list[SourceReport]]:
    """Every source's examples in memory (small data, tests; `build_data` streams instead)."""
    reports = [SourceReport(path=src.path, format=src.format) for src in sources]
    per_source = [list(iter_examples(src, on_bad_row, r, base_dir)) for src, r in zip(sources, reports, strict=True)]
    return per_source, reports


T = TypeVar("T")


def mix_counts(kept: Sequence[int], sources: Sequence[DataSource]) -> list[int]:
    """Rows each source gives the mix: by `ratio` (shares of the result, the largest mix without
    repetition) or by `weight` (weight x rows)."""
    if all(s.ratio is not None for s in sources):
        total = min((n / s.ratio) for n, s in zip(kept, sources, strict=True) if s.ratio)
        return [min(n, round(total * (s.ratio or 0))) for n, s in zip(kept, sources, strict=True)]
    return [round(n * s.weight) for n, s in zip(kept, sources, strict=True)]


def mix(per_source: Sequence[Sequence[T]], sources: Sequence[DataSource], seed: int) -> tuple[list[T], list[int]]:
    """Mix sources by `mix_counts` (fractions sample without replacement, whole parts repeat), seeded;
    returns (mixed rows, rows used per source). Rows may be examples or their positions."""
    rng = random.Random(seed)
    counts = mix_counts([len(rows) for rows in per_source], sources)
    mixed: list[T] = []
    for rows, n in zip(per_source, counts, strict=True):
        if not rows:
            continue
        whole, rest = divmod(n, len(rows))
        mixed.extend(list(rows) * whole)
        mixed.extend(rng.sample(list(rows), rest))
    rng.shuffle(mixed)
    return mixed, counts


def eval_rows_held_out(rows: int, fraction: float) -> int:
    """Rows of the mix held out for evaluation with `data.eval_fraction` (at least one when the
    fraction is set, never all)."""
    if fraction <= 0 or rows < 2:
        return 0
    return min(rows - 1, max(1, math.floor(rows * fraction)))
