"""A tiny random Llama with a real (trained in-process) byte-level BPE tokenizer and a chatml
template, saved like a hub model folder. Used by the tests; never downloaded."""

from __future__ import annotations

from pathlib import Path

from qlora_sft.data import CHAT_TEMPLATES

CHATML = CHAT_TEMPLATES["chatml"]

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

CORPUS = [
    "user assistant system the a of to and is in it you that he was for on are with as I his they be at one",
    "What is the colour of the sky? The sky is blue. What colour is grass? Grass is green.",
    "Translate to French: cat -> chat, dog -> chien, house -> maison. Reverse the words.",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma",
    '0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 {"name": "Ann", "age": 31}',
    "Instruction Input Response ### [INST] [/INST] <<SYS>> <</SYS>> hello world answer question",
]


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(
    folder: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    pad_token: str | None = None,
    chat_template: str | None = CHATML,
    tied: bool = False,
    vocab_size: int | None = None,
) -> Path:
    """Save a tiny Llama + tokenizer into `folder` and return it. `vocab_size`: a model vocabulary
    larger than the tokenizer's (as real checkpoints pad theirs), e.g. to make the head the largest
    tensor."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    if pad_token:
        tok.pad_token = pad_token
    tok.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tied,
        initializer_range=0.2,  # logits large enough that LoRA can move the loss quickly
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
