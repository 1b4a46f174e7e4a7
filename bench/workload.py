"""Benchmark workloads: a model of a real shape with random weights (saved once to a cache folder),
a word-level tokenizer (one word = one token, so lengths are exact) with a chatml template, and
chat data with a ShareGPT-like length distribution.

Speed and memory do not depend on the weights' values, so random weights stand in for the real
checkpoints, which cannot be downloaded here.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from qlora_sft.data import CHAT_TEMPLATES


def llama(
    hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, tied: bool, vocab: int = 128256
) -> dict[str, Any]:
    """LlamaConfig fields of a Llama-3 style shape (RoPE theta 500k, 128k context) or, with a 32k
    vocabulary, a small Llama-2 style one (theta 10k, 4k context)."""
    llama3 = vocab == 128256
    return {
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rope_theta": 500000.0 if llama3 else 10000.0,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 131072 if llama3 else 4096,
    }


SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": llama(4096, 14336, 32, 32, 8, tied=False),  # Llama-3.1-8B
    "llama3-70b": llama(8192, 28672, 80, 64, 8, tied=False),  # Llama-3.1-70B
    "llama3-1b": llama(2048, 8192, 16, 32, 8, tied=True),  # Llama-3.2-1B
    "llama-smoke": llama(512, 1536, 4, 8, 4, tied=False, vocab=32000),  # smoke tests of the benchmark itself
}

CHATML = CHAT_TEMPLATES["chatml"]
WORDS = 4000


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<s>"]
    vocab = {t: i for i, t in enumerate(special)}
    for role in ("user", "assistant", "system"):
        vocab[role] = len(vocab)
    for i in range(WORDS):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


def make_model(shape: str, folder: Path, seed: int = 0, shard_gib: float = 4.0, prequantized: bool = False) -> Path:
    """Random weights of the shape, generated tensor by tensor (on the GPU when there is one) and
    saved as sharded safetensors; no full model is ever built in memory. Reused when already there.

    `prequantized`: the linear layers are written directly in bitsandbytes NF4 (double quant, bf16
    storage), the format `save_pretrained` of a 4-bit model writes, with a `quantization_config` in
    config.json, as `*-bnb-4bit` checkpoints on the hub are. A 70B model is about 41 GB this way
    instead of 141 GB in bf16, so it fits the GPU machine's disk; the trainer reads it as a user's
    pre-quantized checkpoint. The values are what quantizing the same random bf16 weights gives."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, index, n = 0, {}, 0

    def flush() -> None:
        nonlocal shard, size, n
        if not shard:
            return
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, size = {}, 0

    linear = {f"{name}.weight" for name, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    linear.discard("lm_head.weight")  # transformers keeps the output head in 16 bits
    for name, p in meta.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            tensors = {name: torch.ones(p.shape, dtype=torch.bfloat16)}
        else:
            t = (torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            tensors = quantized(name, t) if prequantized and name in linear else {name: t.cpu()}
        for key, t in tensors.items():
            shard[key] = t
            size += t.numel() * t.element_size()
        if size >= shard_gib * 2**30:
            flush()
    flush()
    total = sum((folder / f).stat().st_size for f in set(index.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    if prequantized:
        from transformers import BitsAndBytesConfig

        config.quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        ).to_dict()
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def quantized(name: str, weight: Any) -> dict[str, Any]:
    """One linear weight as a bitsandbytes 4-bit checkpoint stores it: the packed NF4 data (bf16
    storage) plus its quantization state under `<name>.absmax`, `.quant_map`, ... (CPU tensors)."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
    )
    out = {name: packed.cpu()}
    out.update({f"{name}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
    return out


def sharegpt_lengths(n: int, seed: int = 0, median: int = 350, sigma: float = 0.9, max_len: int = 2048) -> list[int]:
    """Conversation lengths in tokens: log-normal around the median, capped (ShareGPT-like)."""
    rng = random.Random(seed)
    return [max(24, min(max_len, round(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(n)]


def make_data(path: Path, n: int, seed: int = 0, median: int = 350, max_len: int = 2048) -> Path:
    """Chat rows whose rendered length follows `sharegpt_lengths` (chatml adds 10 tokens)."""
    if path.is_file():
        return path
    rng = random.Random(seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for total in sharegpt_lengths(n, seed, median, max_len=max_len):
            body = max(4, total - 10)
            user = max(2, int(body * rng.uniform(0.1, 0.4)))
            words = [f"w{rng.randrange(WORDS)}" for _ in range(body)]
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": " ".join(words[:user])},
                            {"role": "assistant", "content": " ".join(words[user:])},
                        ]
                    }
                )
                + "\n"
            )
    return path
