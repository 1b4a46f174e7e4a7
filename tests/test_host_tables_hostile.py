"""Hostile uses of `model.embedding_in_host_memory` / `model.lm_head_in_host_memory`: a `true` that
cannot work is named by `validate` (and the start of `train`: the same `recipe_tokenizer`), from
config.json, before any data is built or weight loaded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import recipe_dict, write_recipe

from qlora_sft.cli import main


def validate(model_dir: Path, toy_data: Path, tmp_path: Path, capsys, **model_keys) -> tuple[int, str]:
    raw = recipe_dict(model_dir, toy_data, tmp_path / "runs", model=model_keys)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code = main(["validate", str(recipe), "--examples", "0"])
    out = capsys.readouterr()
    return code, out.out + out.err


def tiny_of(kind: str, folder: Path) -> Path:
    """A tiny untied model of another family: `phi` (its head has a bias), `gemma` (its embedding is a
    subclass that scales its rows)."""
    import torch
    from tiny import build_tokenizer
    from transformers import GemmaConfig, GemmaForCausalLM, PhiConfig, PhiForCausalLM

    tok = build_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    if kind == "phi":
        model = PhiForCausalLM(PhiConfig(**common))
    else:
        model = GemmaForCausalLM(GemmaConfig(**common, num_key_value_heads=2, head_dim=16))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("key", ["embedding_in_host_memory", "lm_head_in_host_memory"])
def test_true_on_a_tied_model_is_named_by_validate(key: str, toy_data: Path, tmp_path: Path, capsys):
    """Before: validate passed; train refused it only after building the data."""
    from tiny import build_tiny_model

    tied = build_tiny_model(tmp_path / "tied", tied=True)
    code, out = validate(tied, toy_data, tmp_path, capsys, **{key: True})
    assert code != 0, out
    assert f"model.{key} is true" in out and "tie_word_embeddings in config.json" in out and "Remove the key" in out
    code, out = validate(tied, toy_data, tmp_path, capsys, **{key: "auto"})  # auto: stays on the GPU, no refusal
    assert code == 0, out


@pytest.mark.parametrize(
    ("kind", "key", "expect"),
    [
        ("phi", "lm_head_in_host_memory", "a torch Linear with a bias"),
        ("gemma", "embedding_in_host_memory", "a GemmaTextScaledWordEmbedding, not a plain torch Embedding"),
    ],
)
def test_true_on_a_table_that_cannot_move_is_named_by_validate(
    kind: str, key: str, expect: str, toy_data: Path, tmp_path: Path, capsys
):
    """Before: validate passed, and train refused it only after every weight had loaded (minutes for a
    large model). The other table of the same model moves, and validates."""
    folder = tiny_of(kind, tmp_path / kind)
    code, out = validate(folder, toy_data, tmp_path, capsys, **{key: True})
    assert code != 0, out
    assert f"model.{key}" in out and expect in out and "Remove the key" in out
    other = "embedding_in_host_memory" if key.startswith("lm_head") else "lm_head_in_host_memory"
    code, out = validate(folder, toy_data, tmp_path, capsys, **{other: True})
    assert code == 0, out


def test_the_log_calls_only_auto_keys_auto(tiny_model: Path, caplog):
    """A recipe with one key true and the other auto: the log said the true key was on "(auto)" because
    "GPU memory is short", on a CPU launch with no GPU."""
    from helpers import MINIMAL_RECIPE

    from qlora_sft.launch import LaunchMode
    from qlora_sft.model.load import host_table_keys
    from qlora_sft.recipe import build_recipe

    model = {"name_or_path": str(tiny_model), "lm_head_in_host_memory": True}
    recipe = build_recipe({**MINIMAL_RECIPE, "model": model})
    with caplog.at_level(logging.INFO, logger="qlora_sft"):
        keys = host_table_keys(recipe, LaunchMode(kind="cpu"), None)
    assert keys == ["lm_head_in_host_memory"]
    assert "(auto)" not in caplog.text and "GPU memory is short" not in caplog.text, caplog.text


def test_a_lora_pattern_that_trains_a_table_is_named_by_validate(
    tiny_model: Path, toy_data: Path, tmp_path: Path, capsys
):
    """lora.target_modules as one regular expression (peft matches it against each module's whole name)
    that names the head or the embedding: the list form was refused, the pattern passed validate and
    train stopped after loading every weight with peft's "Target module HostHead() is not supported"."""
    pattern = ".*(q_proj|lm_head)"
    raw = recipe_dict(tiny_model, toy_data, tmp_path / "runs", model={"lm_head_in_host_memory": True})
    raw["lora"]["target_modules"] = pattern
    code = main(["validate", str(write_recipe(tmp_path / "r.yaml", raw)), "--examples", "0"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code != 0, text
    assert "model.lm_head_in_host_memory" in text and "lora.target_modules" in text and "lm_head" in text


def test_auto_leaves_a_table_a_lora_pattern_trains_on_the_gpu(tiny_model: Path):
    """`auto` resolved on (one short GPU) with a lora.target_modules pattern that names the head: the
    head stays where it is, as for the list form, instead of a HostHead peft cannot adapt."""
    import torch
    from helpers import MINIMAL_RECIPE
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_sft.model.load import tables_to_host
    from qlora_sft.recipe import build_recipe

    pattern = ".*(q_proj|embed_tokens|lm_head)"
    raw = {**MINIMAL_RECIPE, "model": {"name_or_path": str(tiny_model)}, "lora": {"target_modules": pattern}}
    recipe = build_recipe(raw)  # both keys auto
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert tables_to_host(model, recipe, ["embedding_in_host_memory", "lm_head_in_host_memory"]) == []
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    get_peft_model(model, LoraConfig(r=2, target_modules=pattern))


def test_one_process_is_not_told_what_ddp_leaves_alone(tiny_model: Path, caplog):
    """One process with both tables in host memory logged "model: DDP leaves ... alone", where no DDP
    runs; the line is for several ranks (test_offload's DDP test holds it there)."""
    from helpers import MINIMAL_RECIPE

    from qlora_sft.launch import LaunchMode
    from qlora_sft.model.load import load_model, load_tokenizer
    from qlora_sft.recipe import build_recipe

    model = {"name_or_path": str(tiny_model), "lm_head_in_host_memory": True, "embedding_in_host_memory": True}
    recipe = build_recipe({**MINIMAL_RECIPE, "model": model})
    with caplog.at_level(logging.INFO, logger="qlora_sft"):
        load_model(recipe, load_tokenizer(recipe.model), LaunchMode("cpu"))
    assert "output head in host memory" in caplog.text and "input embedding in host memory" in caplog.text
    assert "DDP leaves" not in caplog.text, caplog.text
