"""Chat templates and tokenising: the recipe's chat template on the tokenizer (the model's own, a
named one for base models, or a .jinja file), the token that ends an assistant turn, and examples
-> token ids with labels on the assistant turns only (from the template's `{% generation %}`
markers, TRL's training variant of the template, or rendered prefixes), truncated to
`data.max_length`. `mark_trained` shows which text is trained."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .formats import Example
from .sources import BadRow, resolve_path

# Named chat templates for base models without one. Each renders a conversation so that the text
# up to an assistant turn (with the generation prompt) is a prefix of the text through that turn:
# that is how the assistant spans are found.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def set_chat_template(
    tokenizer: Any, choice: str, model_name: str, base_dir: str | os.PathLike[str] | None = None
) -> None:
    """Give the tokenizer the recipe's chat template (`auto` keeps its own)."""
    if choice == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"the tokenizer of {model_name} has no chat template. Set data.chat_template to one of "
                f"{sorted(CHAT_TEMPLATES)} (or a .jinja file), or use format: text data."
            )
        return
    if choice in CHAT_TEMPLATES:
        if choice == "chatml":
            vocab = tokenizer.get_vocab()
            missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
            if missing:
                raise DataError(
                    f"data.chat_template=chatml needs the tokens {missing}, which the tokenizer of {model_name} "
                    "lacks. Use llama2 or alpaca (they use the tokenizer's own BOS/EOS)."
                )
        tokenizer.chat_template = CHAT_TEMPLATES[choice]
        return
    path = resolve_path(choice, base_dir)
    if path is None or not path.is_file():
        raise DataError(
            f"data.chat_template is {choice!r}: not auto, not one of {sorted(CHAT_TEMPLATES)}, and not a file"
        )
    tokenizer.chat_template = path.read_text(encoding="utf-8")


def end_of_turn_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn in the rendered template (what generation stops on)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        ids = tokenizer.apply_chat_template(probe, tokenize=True, add_generation_prompt=False, return_dict=False)
    except Exception:
        return tokenizer.eos_token or ""
    special = set(tokenizer.all_special_ids)
    for tid in reversed(list(ids)):
        if tid in special:
            return tokenizer.convert_ids_to_tokens(tid)
    return tokenizer.eos_token or ""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)
    # Truncated: the labels cut from the window of the final labelled token and the two before it (where
    # a conversation's final end-of-turn token is); empty when truncation cut no labelled token.
    cut_tail: list[int] = field(default_factory=list)


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: list[dict[str, Any]] | None = None
) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


_MARKED_TEMPLATES: dict[str, str | None] = {}


def marked_template(tokenizer: Any) -> str | None:
    """A chat template with `{% generation %}` markers around the assistant turns, which tells exactly
    which tokens are the assistant's however the template renders earlier turns: the tokenizer's own
    if it has them, else TRL's training variant of it (Qwen3, Llama 3, Gemma, DeepSeek, ... ship in
    TRL), else None (the assistant spans are then found by rendering prefixes)."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return None
    if template not in _MARKED_TEMPLATES:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        if has_generation_markers(template):
            _MARKED_TEMPLATES[template] = template
        else:
            try:
                _MARKED_TEMPLATES[template] = get_training_chat_template(tokenizer)
            except Exception:  # a template TRL has no variant of, or cannot inspect
                _MARKED_TEMPLATES[template] = None
    return _MARKED_TEMPLATES[template]


def _marked(ex: Example, tokenizer: Any, template: str, keep_text: bool) -> Tokenized:
    """Token ids with the tokens inside the template's generation markers as labels (untruncated); a
    row's prompt turns (`Example.prompt_turns`) untrained."""
    assert ex.messages is not None
    marked = tokenizer.apply_chat_template(
        ex.messages,
        tools=ex.tools,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(marked["input_ids"])
    labels = [tid if keep else -100 for tid, keep in zip(ids, marked["assistant_masks"], strict=True)]
    if not keep_text and ex.prompt_turns is None:
        return Tokenized(ids, labels, False)
    text = tokenizer.apply_chat_template(ex.messages, tools=ex.tools, chat_template=template, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:  # pragma: no cover - the same text, tokenized the same way
        raise DataError(f"{ex.source} row {ex.row}: the chat template's tokens differ between two renderings")
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if ex.prompt_turns is not None:
        labels = _mask_prompt(labels, offsets, _prompt_end(ex, tokenizer, text, template))
    return Tokenized(ids, labels, False, text, offsets) if keep_text else Tokenized(ids, labels, False)


def _prompt_end(ex: Example, tokenizer: Any, text: str, template: str | None = None) -> int:
    """Where a prompt_completion row's prompt turns (`Example.prompt_turns`) end in its rendered `text`:
    the prompt rendered alone (with the generation prompt where the completion begins with an assistant
    turn, as TRL renders it), which `text` must start with; else a BadRow rather than the prompt trained."""
    assert ex.messages is not None and ex.prompt_turns is not None
    n = ex.prompt_turns
    generation_prompt = n < len(ex.messages) and ex.messages[n]["role"] == "assistant"
    kwargs = {} if template is None else {"chat_template": template}
    prompt = tokenizer.apply_chat_template(
        ex.messages[:n], tools=ex.tools, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
    )
    if not text.startswith(prompt):
        raise BadRow(
            "prompt_rendered_differently",
            "the chat template renders the prompt differently inside the whole "
            "conversation, so the prompt's tokens cannot be told apart from the completion's (its assistant "
            "turns are context, not trained: TRL's completion_only_loss). Use a chat template that renders the "
            "prompt's turns alike alone and followed by the completion (data.chat_template), or give the row as "
            "`messages` (every assistant turn trains)",
        )
    return len(prompt)


def _mask_prompt(labels: list[int], offsets: list[tuple[int, int]], end: int) -> list[int]:
    """`labels` with the tokens that end at or before character `end` (the prompt's) untrained."""
    return [-100 if o[1] <= end else label for label, o in zip(labels, offsets, strict=True)]


def _assistant_spans(ex: Example, tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (with their end-of-turn text) in the rendered `text`,
    from rendering the conversation up to and through each assistant turn."""
    assert ex.messages is not None
    spans: list[tuple[int, int]] = []
    last = len(ex.messages) - 1
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, ex.messages[:i], True, ex.tools)
        through = text if i == last else _render(tokenizer, ex.messages[: i + 1], False, ex.tools)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{ex.source} row {ex.row}: the chat template does not render conversations "
                "incrementally (the text up to an assistant turn is not a prefix of the full "
                "text) and has no {% generation %} markers (nor does TRL ship a training variant "
                "of it), so the assistant spans cannot be found. Use a template with generation "
                "markers (data.chat_template: path/to/template.jinja) or data.assistant_only_loss=false."
            )
        spans.append((len(before), len(through)))
    return spans


def _span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels: the ids of tokens that overlap a span, -100 elsewhere."""
    import numpy as np

    if not ids:
        return []
    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    inside = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        inside |= (o[:, 0] < end) & (o[:, 1] > start)
    return np.where(inside, np.asarray(ids, dtype=np.int64), -100).tolist()


def _template_refused(exc: Exception) -> BadRow:
    """The bad row for a conversation the chat template refuses (its `raise_exception`, e.g. Gemma's
    "System role not supported", or another template error)."""
    return BadRow(
        "chat_template_error",
        f"the chat template refuses this conversation: {type(exc).__name__}: {exc}. Remove what it refuses (a "
        "system turn, for a template without one: the row's system turn or data.sources[].system_prompt), or "
        "choose a template that takes it (data.chat_template)",
    )


def _tools_left_out(
    messages: list[dict[str, Any]], text: str, tools: list[dict[str, Any]] | None = None
) -> BadRow | None:
    """The bad row for a conversation whose tool calls or tool results the chat template leaves out of
    the rendered `text` (chatml, llama2 and alpaca render neither): trained as it renders, the model
    would learn an empty answer where it should call a tool."""
    missing = []
    for tool in tools or []:
        fn = tool.get("function", tool)
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and name and name not in text:
            missing.append(f"the definition of tool {name}")
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call) if isinstance(call, dict) else {}
            name = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(name, str) and name and name not in text:
                missing.append(f"turn {i + 1}'s call of {name}")
        content = m.get("content")
        if m.get("role") == "tool" and isinstance(content, str) and content.strip():
            if content.strip()[:200] not in text:
                missing.append(f"turn {i + 1}'s tool result")
    if not missing:
        return None
    return BadRow(
        "tool_calls_not_rendered",
        f"the chat template leaves out {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: trained as "
        "rendered, the model would learn to answer without them. Use a template that renders tool calls (the "
        "model's own, data.chat_template: auto, or a .jinja file), or leave tool-calling rows out of this source",
    )


def tokenize_rows(
    examples: Sequence[Example], tokenizer: Any, max_length: int, assistant_only_loss: bool, keep_text: bool = False
) -> list[Tokenized | BadRow]:
    """`tokenize_batch`, with a `BadRow` in place of each conversation the chat template refuses."""
    import jinja2

    out: list[Tokenized | BadRow | None] = [None] * len(examples)
    template = marked_template(tokenizer) if assistant_only_loss else None
    plain: list[int] = []  # plain-text rows
    # (index, text, spans, the prompt's end) to tokenize here
    chats: list[tuple[int, str, list[tuple[int, int]] | None, int | None]] = []
    for i, ex in enumerate(examples):
        if ex.text is not None:
            plain.append(i)
            continue
        try:
            messages = ex.messages or []
            uses_tools = bool(ex.tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
            if template is not None:
                rendered = _render(tokenizer, messages, False, ex.tools) if uses_tools else ""
                if uses_tools and (left_out := _tools_left_out(messages, rendered, ex.tools)):
                    out[i] = left_out
                    continue
                out[i] = _marked(ex, tokenizer, template, keep_text)
            else:
                text = _render(tokenizer, messages, False, ex.tools)
                if uses_tools and (left_out := _tools_left_out(messages, text, ex.tools)):
                    out[i] = left_out
                    continue
                spans = _assistant_spans(ex, tokenizer, text) if assistant_only_loss else None
                end = _prompt_end(ex, tokenizer, text) if assistant_only_loss and ex.prompt_turns is not None else None
                chats.append((i, text, spans, end))
        except jinja2.TemplateError as exc:
            out[i] = _template_refused(exc)
        except BadRow as bad:  # a prompt rendered differently alone (`_prompt_end`)
            out[i] = bad
    if plain:
        texts = [examples[i].text or "" for i in plain]
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=keep_text)
        for k, i in enumerate(plain):
            ids = list(enc["input_ids"][k])
            offsets = [tuple(o) for o in enc["offset_mapping"][k]] if keep_text else []
            if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)
                offsets.append((len(texts[k]), len(texts[k])))
            out[i] = Tokenized(ids, list(ids), False, texts[k] if keep_text else "", offsets)
    if chats:
        enc = tokenizer([t for _, t, _, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
        for k, (i, text, spans, end) in enumerate(chats):
            ids = list(enc["input_ids"][k])
            offsets = [tuple(o) for o in enc["offset_mapping"][k]]
            labels = _span_labels(ids, offsets, spans) if spans is not None else list(ids)
            if end is not None:
                labels = _mask_prompt(labels, offsets, end)
            out[i] = Tokenized(ids, labels, False, text if keep_text else "", offsets if keep_text else [])
    result: list[Tokenized | BadRow] = []
    for tok in out:
        assert tok is not None
        if isinstance(tok, BadRow):
            result.append(tok)
            continue
        n = len(tok.input_ids)
        result.append(
            Tokenized(
                tok.input_ids[:max_length],
                tok.labels[:max_length],
                n > max_length,
                tok.text,
                tok.offsets[:max_length] if keep_text else [],
                _cut_tail(tok.labels, max_length),
            )
        )
    return result


def _cut_tail(labels: list[int], max_length: int) -> list[int]:
    """`Tokenized.cut_tail`: the labels truncation to `max_length` cuts from the last three positions
    through the final labelled token."""
    last = next((j for j in range(len(labels) - 1, max_length - 1, -1) if labels[j] != -100), -1)
    return labels[max(last - 2, max_length) : last + 1] if last >= 0 else []


def tokenize_batch(
    examples: Sequence[Example], tokenizer: Any, max_length: int, assistant_only_loss: bool, keep_text: bool = False
) -> list[Tokenized]:
    """Render with the chat template and tokenize; label assistant spans (or everything); truncate.
    The assistant spans come from the template's generation markers where it has them (or TRL has a
    training variant of it), else from rendering the conversation up to each assistant turn. Texts
    are tokenized together (one call per batch). A conversation the template refuses is a DataError
    naming its row."""
    result = []
    tokens = tokenize_rows(examples, tokenizer, max_length, assistant_only_loss, keep_text)
    for ex, tok in zip(examples, tokens, strict=True):
        if isinstance(tok, BadRow):
            raise DataError(f"{ex.source} row {ex.row}: {tok}.")
        result.append(tok)
    return result


def tokenize_example(
    ex: Example, tokenizer: Any, max_length: int, assistant_only_loss: bool, keep_text: bool = False
) -> Tokenized:
    """`tokenize_batch` of one example."""
    return tokenize_batch([ex], tokenizer, max_length, assistant_only_loss, keep_text)[0]


def mark_trained(tok: Tokenized, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The rendered text with the trained (labelled) spans wrapped in markers."""
    out, pos, i = [], 0, 0
    n = len(tok.input_ids)
    while i < n:
        if tok.labels[i] == -100:
            i += 1
            continue
        j = i
        while j + 1 < n and tok.labels[j + 1] != -100:
            j += 1
        start, end = tok.offsets[i][0], tok.offsets[j][1]
        out.append(tok.text[pos:start])
        out.append(open_mark + tok.text[start:end] + close_mark)
        pos = end
        i = j + 1
    last = tok.offsets[n - 1][1] if n else 0
    out.append(tok.text[pos:last])
    if last < len(tok.text):
        out.append(f"<<truncated: {len(tok.text) - last} more characters>>")
    return "".join(out)
