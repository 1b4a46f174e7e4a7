"""Packing is correct: examples packed into one padding-free row never attend to each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import recipe_dict, write_toy_data

from qlora_sft.recipe import build_recipe


@pytest.fixture(scope="module")
def model_and_batch(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_sft.model import LaunchMode, load_model, load_tokenizer

    root = tmp_path_factory.mktemp("packing")
    recipe = build_recipe(recipe_dict(tiny_model, write_toy_data(root / "t.jsonl"), root))
    tok = load_tokenizer(recipe.model)
    torch.manual_seed(0)
    model = load_model(recipe, tok, LaunchMode("cpu", 1, 0)).eval()
    for name, p in model.named_parameters():  # a non-trivial adapter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    examples = [torch.randint(5, len(tok) - 5, (n,)).tolist() for n in (7, 13, 4, 21)]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
        [{"input_ids": e} for e in examples]
    )
    return model, examples, batch


def per_example(logits: torch.Tensor, examples: list[list[int]]) -> list[torch.Tensor]:
    out, off = [], 0
    for e in examples:
        out.append(logits[off : off + len(e)])
        off += len(e)
    return out


def test_packed_logits_equal_one_by_one(model_and_batch):
    model, examples, batch = model_and_batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        for ex, got in zip(examples, per_example(packed, examples), strict=True):
            alone = model(input_ids=torch.tensor([ex]), use_cache=False).logits[0]
            assert torch.allclose(got, alone, atol=1e-4), (got - alone).abs().max()


def test_a_kv_cache_would_lose_the_boundaries_and_training_never_has_one(model_and_batch):
    """transformers detects packed rows from position_ids only without an attention mask and without a
    cache; with a cache the examples silently attend to each other. Training and evaluation run with
    use_cache=False (model config and TRL's loss), which this pins down."""
    model, examples, batch = model_and_batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        cached = model(**inputs, use_cache=True).logits[0]
        alone = model(input_ids=torch.tensor([examples[1]]), use_cache=False).logits[0]
    assert (per_example(cached, examples)[1] - alone).abs().max() > 1e-2  # the trap is real
    assert model.config.use_cache is False


def test_packed_and_unpacked_evaluation_agree(tiny_model: Path, tmp_path: Path):
    """The trainer's own evaluation (a prediction step with the model as trained) gives the same
    token-weighted eval loss packed and unpacked, when the eval set fits one batch either way."""
    from trl import SFTTrainer

    from qlora_sft import data
    from qlora_sft.model import LaunchMode, load_model, load_tokenizer
    from qlora_sft.recipe import resolve_batch
    from qlora_sft.train import sft_args

    losses = {}
    for packing in (False, True):
        recipe = build_recipe(
            recipe_dict(
                tiny_model,
                write_toy_data(tmp_path / "t.jsonl", n=40),
                tmp_path,
                run={"name": f"p{packing}"},
                data={"packing": packing, "eval_fraction": 0.25, "max_length": 512},
                train={"per_device_eval_batch_size": 64},
            )
        )
        tok = load_tokenizer(recipe.model)
        prepared = data.build_data(recipe.data, tok, 0)
        torch.manual_seed(0)
        model = load_model(recipe, tok, LaunchMode("cpu", 1, 0))
        mode = LaunchMode("cpu", 1, 0)
        args = sft_args(recipe, resolve_batch(recipe.train, 1), mode, torch.float32, True)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tok
        )
        losses[packing] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4), losses
