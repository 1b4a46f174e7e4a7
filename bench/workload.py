"""Benchmark workloads: a model of a real shape with random weights (saved once to a cache folder),
a word-level tokenizer (one word = one token, so lengths are exact) with a chatml template, and
chat data with a ShareGPT-like length distribution.

Speed and memory do not depend on the weights' values, so random weights stand in for the real
checkpoints, which cannot be downloaded here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
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


def qwen2(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, tied: bool) -> dict[str, Any]:
    """Qwen2Config fields of a Qwen2.5 shape: a 152k vocabulary, biases on q/k/v, RoPE theta 1M."""
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 32768,
    }


SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": llama(4096, 14336, 32, 32, 8, tied=False),  # Llama-3.1-8B
    "llama3-70b": llama(8192, 28672, 80, 64, 8, tied=False),  # Llama-3.1-70B
    "llama3-1b": llama(2048, 8192, 16, 32, 8, tied=True),  # Llama-3.2-1B
    "qwen2.5-14b": qwen2(5120, 13824, 48, 40, 8, tied=False),  # Qwen2.5-14B
    "qwen2.5-32b": qwen2(5120, 27648, 64, 40, 8, tied=False),  # Qwen2.5-32B
    # smoke tests of the benchmark itself (on two CPU cores: small enough for seconds per step)
    "llama-smoke": llama(256, 768, 2, 4, 2, tied=False, vocab=8192),
}

CHATML = CHAT_TEMPLATES["chatml"]
WORDS = 4000
SPECIAL = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<s>"]
ROLES = ("user", "assistant", "system")


LETTERS = "abcdefghijklmnopqrstuvw"  # no x: an `x` starts a word, never sits inside one


def word(i: int) -> str:
    """The i-th word of the benchmark vocabulary: `x` and three letters (letters only, so that a
    byte-level tokenizer's pre-tokenizer, which splits digits apart, keeps it whole)."""
    n = len(LETTERS)
    return "x" + LETTERS[i // (n * n) % n] + LETTERS[i // n % n] + LETTERS[i % n]


def build_tokenizer(byte_level: bool = False) -> Any:
    """One word = one token, with a chatml template. `byte_level`: a byte-level BPE (the kind
    Qwen2's tokenizer class rebuilds from a checkpoint's vocabulary and merges: transformers loads
    Qwen2 checkpoints with that class whatever tokenizer_config.json names), whose merges build each
    word, with or without its leading space, as one token; chatml's newlines are one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    body = [word(i) for i in range(WORDS)]
    if byte_level:
        from tokenizers import Regex, decoders
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab.setdefault(ch, len(vocab))
        merges: list[tuple[str, str]] = []

        def chain(piece: str) -> None:  # merges that build `piece` letter by letter from its start
            for k in range(2, len(piece) + 1):
                if piece[:k] not in vocab:
                    vocab[piece[:k]] = len(vocab)
                    merges.append((piece[: k - 1], piece[k - 1]))

        # Merge order (rank) keeps every word whole: the words' own chains first (a word's next
        # step always outranks any pair inside it), then a leading space onto a whole word, the
        # role names last (their letter pairs also occur inside words).
        for w in body:
            chain(w)
        for w in body:
            vocab["\u0120" + w] = len(vocab)  # \u0120: byte-level's leading space
            merges.append(("\u0120", w))
        for w in ROLES:
            chain(w)
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
    else:
        for w in [*ROLES, *body]:
            vocab[w] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


def shape_config(shape: str, **extra: Any) -> Any:
    """The transformers config of a benchmark shape (Llama or Qwen2), bf16."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields, torch_dtype="bfloat16", **extra)


def make_model(shape: str, folder: Path, seed: int = 0, shard_gib: float = 4.0, prequantized: bool = False) -> Path:
    """Random weights of the shape, generated tensor by tensor (on the GPU when there is one) and
    saved as sharded safetensors; no full model is ever built in memory. Reused when already there.

    Written by a child process (`python -m bench.workload`): a process that has used the GPU keeps
    its CUDA context and cached blocks, which a capped mode (QLORA_SFT_GPU_MEMORY_GIB counts all
    memory in use outside its own allocator) would then lose. The benchmark's driver never uses the
    GPU itself (on 2026-12-01 it held 6.4 GiB after writing a 14B model, and a mode capped at 16 GiB
    got 9.1)."""
    if _complete(folder):  # the weights are reused; the tokenizer is always this code's
        build_tokenizer(byte_level=SHAPES[shape].get("model_type") == "qwen2").save_pretrained(folder)
        return folder
    cmd = [sys.executable, "-m", "bench.workload", shape, str(folder), "--seed", str(seed)]
    cmd += ["--shard-gib", str(shard_gib), *(["--prequantized"] if prequantized else [])]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
    # the weights just written (16 GB for an 8B shape) reach the disk now, not while the first row
    # trains: on 2026-12-03 a call's first row ran 1.4% slower than its second, of the same mode; the
    # kernel's write-back stealing a host-bound step's CPU is one explanation, not verified
    os.sync()
    return folder


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def write_model(shape: str, folder: Path, seed: int = 0, shard_gib: float = 4.0, prequantized: bool = False) -> Path:
    """`make_model`'s work, in this process.

    `prequantized`: the linear layers are written directly in bitsandbytes NF4 (double quant, bf16
    storage), the format `save_pretrained` of a 4-bit model writes, with a `quantization_config` in
    config.json, as `*-bnb-4bit` checkpoints on the hub are. A 70B model is about 41 GB this way
    instead of 141 GB in bf16, so it fits the GPU machine's disk; the trainer reads it as a user's
    pre-quantized checkpoint. The values are what quantizing the same random bf16 weights gives."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(byte_level=SHAPES[shape].get("model_type") == "qwen2")
    folder.mkdir(parents=True, exist_ok=True)
    config = shape_config(
        shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
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
            words = [word(rng.randrange(WORDS)) for _ in range(body)]
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


# Text-like chat rows (for data-preparation benchmarks): English words drawn by Zipf frequency,
# in sentences and paragraphs, in multi-turn ShareGPT conversations. A real BPE tokenizer cuts
# them roughly as it cuts prose, so tokenising them costs what tokenising real chats costs.
_COMMON = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
    "draw left late run while press close night real life few north open seem together next white children "
    "begin got walk example ease paper group always music those both mark often letter until mile river car feet "
    "care second book carry took science eat room friend began idea fish mountain stop once base hear horse cut "
    "sure watch color face wood main enough plain girl usual young ready above ever red list though feel talk "
    "bird soon body dog family direct pose leave song measure door product black short numeral class wind "
    "question happen complete ship area half rock order fire south problem piece told knew pass since top whole "
    "king space heard best hour better true during hundred five remember step early hold west ground interest "
    "reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay against "
    "pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit "
    "power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest "
    "correct able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean "
    "warm free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay "
    "wheel full force blue object decide surface deep moon island foot system busy test record boat common gold "
    "possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow "
    "tire bring yes distant fill east paint language among function variable model training dataset python "
    "error value return install configure network server memory gradient tensor batch layer output input"
).split()
_PUNCT = [".", ".", ".", ".", "?", "!", ":", ";"]


def _sentence(rng: random.Random, weights: list[float]) -> str:
    words = rng.choices(_COMMON, weights, k=rng.randint(5, 22))
    for i in range(1, len(words) - 1):
        if rng.random() < 0.06:
            words[i] += ","
        elif rng.random() < 0.02:
            words[i] = str(rng.randint(2, 2030))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(_PUNCT)


def _passage(rng: random.Random, weights: list[float], words: int) -> str:
    paragraphs, current, count = [], [], 0
    while count < words:
        s = _sentence(rng, weights)
        current.append(s)
        count += s.count(" ") + 1
        if rng.random() < 0.2:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def text_chat_rows(n: int, seed: int = 0, median_words: int = 190) -> Any:
    """`n` ShareGPT conversations of English-like text: 1-4 exchanges, replies about 3x the questions,
    total words log-normal around `median_words` (about 370 SmolLM2 tokens on average with its chat
    template). Yields rows; the same seed gives the same rows."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(_COMMON))]  # Zipf
    for _ in range(n):
        total = max(12, min(3000, round(math.exp(rng.gauss(math.log(median_words), 0.75)))))
        exchanges = rng.choice((1, 1, 1, 2, 2, 3, 4))
        turns = []
        for _ in range(exchanges):
            share = total / exchanges
            turns.append({"from": "human", "value": _passage(rng, weights, max(3, round(share * 0.25)))})
            turns.append({"from": "gpt", "value": _passage(rng, weights, max(3, round(share * 0.75)))})
        yield {"conversations": turns}


def make_text_data(path: Path, n: int, seed: int = 0) -> Path:
    """`text_chat_rows` as a JSON-lines file (written once; kept if it exists)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in text_chat_rows(n, seed):
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description="write a benchmark shape's random model (what make_model runs)")
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--prequantized", action="store_true")
    a = ap.parse_args()
    write_model(a.shape, a.folder, a.seed, a.shard_gib, a.prequantized)
    return 0


if __name__ == "__main__":
    sys.exit(main())
