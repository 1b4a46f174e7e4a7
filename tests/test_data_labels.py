"""Which tokens train where a BPE token spans the boundary of the trained text: as TRL labels them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from qlora_sft.data.formats import Example, normalize_row_turns
from qlora_sft.data.templates import marked_template, tokenize_example

# Qwen2's pre-tokenizer pattern: a run of newlines is one piece, so BPE merges the generation prompt's "\n"
# with a completion's leading "\n" into one token (as Qwen's and Llama 3's tokenizers do)
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def qwen_like():
    """A tiny byte-level BPE with Qwen2's pre-tokenizer and Qwen2.5's chat template (TRL's copy)."""
    import trl
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["system user assistant\n\nHello world\n\n What is it?\n\nThe sky is blue.\n\n"] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    assert fast.tokenize("\n\n") == ["ĊĊ"]
    return fast


def test_a_token_spanning_the_prompt_and_completion_is_labelled_as_trl_labels_it(qwen_like):
    """A completion that begins with a newline: its first token, "\\n\\n", holds the generation prompt's
    newline too. TRL trains it (its assistant mask takes every token overlapping the assistant's text;
    its completion_only_loss starts the completion where the tokenized prompt and prompt+completion
    diverge, at that token), and so does this project: every token wholly in the prompt is untrained."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "Hello world"},  # context (a prompt's assistant turn): untrained
        {"role": "user", "content": "The sky?"},
    ]
    completion = [{"role": "assistant", "content": "\nThe sky is blue."}]
    messages, _, prompt_turns = normalize_row_turns({"prompt": prompt, "completion": completion}, "prompt_completion")
    ours = tokenize_example(Example(messages, None, "s", 1, None, prompt_turns), copy.deepcopy(qwen_like), 10**6, True)

    # TRL's SFTTrainer: a conversational prompt-completion row, assistant_only_loss and completion_only_loss
    template = marked_template(qwen_like)
    prompt_ids = _tokenize(qwen_like, prompt, add_generation_prompt=True, chat_template=template)["input_ids"]
    full = _tokenize(qwen_like, prompt + completion, return_assistant_tokens_mask=True, chat_template=template)
    ids, start = full["input_ids"], common_prefix_length(prompt_ids, full["input_ids"])
    masks = enumerate(zip(ids, full["assistant_masks"], strict=True))
    trl_labels = [t if i >= start and a else -100 for i, (t, a) in masks]
    assert ours.input_ids == ids and ours.labels == trl_labels
    trained = [qwen_like.convert_ids_to_tokens(t) for t in ours.labels if t != -100]
    assert trained[:2] == ["ĊĊ", "The"] and "Hello" not in trained

    # a messages row (no markers: the spans come from rendering prefixes) trains the same first token
    rows = {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "\nHello"}]}
    messages, _, _ = normalize_row_turns(rows, "messages")
    plain = copy.deepcopy(qwen_like)
    plain.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    spans = tokenize_example(Example(messages, None, "s", 1), plain, 10**6, True)
    trained = [plain.convert_ids_to_tokens(t) for t in spans.labels if t != -100]
    assert trained == ["ĊĊ", "Hello", "<|im_end|>", "Ċ"]
