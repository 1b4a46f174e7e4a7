"""Hostile model folders and tokenizers: each is named (file, key, fix) by `validate` (and the start
of `train`: the same `recipe_tokenizer`), before any data is built or weight loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import recipe_dict, write_recipe

from qlora_sft.cli import main


@pytest.fixture()
def folder(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model, to damage."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def validate(model_dir: Path, toy_data: Path, tmp_path: Path, capsys, **sections) -> tuple[int, str]:
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(model_dir, toy_data, tmp_path / "runs", **sections))
    code = main(["validate", str(recipe), "--examples", "0"])
    out = capsys.readouterr()
    return code, out.out + out.err


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_healthy_model_validates(folder: Path, toy_data: Path, tmp_path: Path, capsys):
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code == 0, out


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        ("missing", ["has no config.json", "config.json and the .safetensors"]),
        ("cut", ["config.json is not valid JSON", "cut off?", "Re-download"]),
        ("latin1", ["config.json is not UTF-8", "byte "]),
        ("no_model_type", ["has no model_type"]),
        ("unknown", ["model_type 'llamaz'", "does not implement", "Upgrade transformers"]),
        ("remote_code", ["auto_map: modeling_my.py", "model.trust_remote_code: true"]),
    ],
)
def test_a_damaged_config_is_named_by_validate(folder, toy_data, tmp_path, capsys, damage, expect):
    """Before: a missing or unknown-architecture config.json passed validate (only the tokenizer was
    read) and stopped `train` after the data was built; remote code said only 'contains custom code'."""
    config = folder / "config.json"
    if damage == "missing":
        config.unlink()
    elif damage == "cut":
        config.write_bytes(config.read_bytes()[:40])
    elif damage == "latin1":
        config.write_bytes(config.read_bytes().replace(b'"llama"', b'"llama\xe9"'))
    elif damage == "no_model_type":
        text = json.loads(config.read_text())
        del text["model_type"]
        config.write_text(json.dumps(text))
    elif damage == "unknown":
        edit_config(folder, model_type="llamaz", architectures=["LlamazForCausalLM"])
    else:
        edit_config(folder, model_type="myllama", auto_map={"AutoModelForCausalLM": "modeling_my.MyModel"})
        (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert "Traceback" not in out
    assert "model.name_or_path" in out
    for text in expect:
        assert text in out, out


def cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def damage_header(file: Path) -> None:
    raw = bytearray(file.read_bytes())
    raw[8:20] = b"X" * 12  # same size, the JSON header broken
    file.write_bytes(bytes(raw))


def shard_index(folder: Path, *shards: str) -> None:
    (folder / "model.safetensors").rename(folder / shards[0])
    weight_map = {"model.embed_tokens.weight": shards[0], "lm_head.weight": shards[-1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        ("cut_shard", ["weight file", "model.safetensors is damaged", "cut off", "Download it again"]),
        ("header", ["model.safetensors is damaged", "header is not valid JSON"]),
        ("missing_shard", ["names 1 shard(s) not in", "model-00002-of-00002.safetensors", "download the missing"]),
        ("cut_index", ["model.safetensors.index.json is unreadable"]),
        ("gguf_only", ["holds no .safetensors weights (only model-q4.gguf)", "GGUF is llama.cpp's format"]),
    ],
)
def test_missing_or_damaged_weight_files_are_named_before_loading(folder, toy_data, tmp_path, capsys, damage, expect):
    """Before: validate passed, and both loaders stopped `train` with a safetensors/JSON traceback
    (SafetensorError 'incomplete metadata', FileNotFoundError, JSONDecodeError) or transformers'
    'no file named model.safetensors' after the data was built."""
    weights = folder / "model.safetensors"
    if damage == "cut_shard":
        cut_in_half(weights)
    elif damage == "header":
        damage_header(weights)
    elif damage == "missing_shard":
        shard_index(folder, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    elif damage == "cut_index":
        shard_index(folder, "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-0')
    else:
        weights.rename(folder / "model-q4.gguf")
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert "Traceback" not in out
    for text in expect:
        assert text in out, out


def test_load_base_names_a_damaged_shard_for_export_and_chat(folder: Path, tmp_path: Path):
    """export and chat load the base without `validate`: the damaged file is still named, for both loaders."""
    from qlora_sft.errors import UserError
    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_base
    from qlora_sft.recipe import build_recipe

    damage_header(folder / "model.safetensors")
    for loader in ("transformers", "low_memory"):
        recipe = build_recipe(recipe_dict(folder, tmp_path / "d.jsonl", tmp_path, model={"loader": loader}))
        with pytest.raises(UserError, match=r"model\.safetensors is damaged"):
            load_base(recipe, LaunchMode("cpu"))


def test_a_good_sharded_model_and_bin_weights_still_validate(folder, toy_data, tmp_path, capsys):
    """The checks refuse only what cannot load: an index whose shards are all there passes, and .bin
    weights pass with model.loader: transformers (which reads them) but not low_memory (which does not)."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert validate(folder, toy_data, tmp_path, capsys)[0] == 0
    other = Path(shutil.copytree(folder, tmp_path / "bin"))
    (other / "model.safetensors.index.json").unlink()
    (other / "model-00001-of-00001.safetensors").rename(other / "pytorch_model.bin")
    assert validate(other, toy_data, tmp_path, capsys, model={"loader": "transformers"})[0] == 0
    code, out = validate(other, toy_data, tmp_path, capsys, model={"loader": "low_memory"})
    assert code != 0 and "holds no .safetensors weights (only pytorch_model.bin)" in out


def test_tokens_past_the_embedding_are_refused_with_the_fix(folder, toy_data, tmp_path, capsys):
    """Before: a tokenizer with added tokens (a tool-call pair) beyond the model's vocab_size passed
    validate and `load_model` silently grew the embedding: the new tokens trained on random, frozen
    rows (on some paths an id past the table is a device-side assert mid-training)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    rows = len(tok)
    tok.add_tokens(["<tool>", "</tool>"], special_tokens=True)
    tok.save_pretrained(folder)
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert f"embedding has {rows} rows (vocab_size in config.json)" in out
    assert f"'<tool>' (id {rows})" in out and "'</tool>'" in out
    assert "lora.modules_to_save" in out and "added_tokens" in out
    # training their rows is the documented way through: a warning, not a refusal
    code, out = validate(folder, toy_data, tmp_path, capsys, lora={"modules_to_save": ["embed_tokens", "lm_head"]})
    assert code == 0, out


def test_an_added_pad_token_alone_still_grows_the_embedding(folder: Path, tmp_path: Path):
    """The pad token qlora-sft adds to a tokenizer without one is never attended to: it gets a row
    and is not refused."""
    from transformers import AutoTokenizer

    from qlora_sft.model import recipe_tokenizer
    from qlora_sft.recipe import build_recipe

    tok = AutoTokenizer.from_pretrained(folder)
    rows = len(tok)
    vocab = tok.backend_tokenizer.get_vocab()
    assert "<pad>" in vocab
    data = json.loads((folder / "tokenizer.json").read_text())
    # no pad candidate left (<pad> renamed, no unk token), so that ensure_pad_token adds <|pad|> past the embedding
    for added in data["added_tokens"]:
        if added["content"] == "<pad>":
            added["content"] = "<nopad>"
    data["model"]["vocab"]["<nopad>"] = data["model"]["vocab"].pop("<pad>")
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config.pop("unk_token", None)  # the unk token would serve as pad otherwise
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if entry.get("content") == "<pad>":
            entry["content"] = "<nopad>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = build_recipe(recipe_dict(folder, tmp_path / "d.jsonl", tmp_path))
    tokenizer = recipe_tokenizer(recipe)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == rows


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_gptq_or_awq_model_is_refused_by_validate(folder, toy_data, tmp_path, capsys, method):
    """Before: passed validate, refused only when `train` loaded the model, without naming config.json."""
    edit_config(folder, quantization_config={"quant_method": method, "bits": 4})
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert "quantization_config in config.json" in out and repr(method) in out


def test_a_bnb_4bit_model_with_plain_lora_is_refused_by_validate(folder, toy_data, tmp_path, capsys):
    edit_config(
        folder,
        quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    )
    code, out = validate(folder, toy_data, tmp_path, capsys, quantization={"method": "none"})
    assert code != 0
    assert "stored in bitsandbytes 4-bit" in out and "set quantization.method: nf4" in out


def test_max_length_past_the_models_context_is_refused(folder, toy_data, tmp_path, capsys):
    """Before: a model with 16 positions trained rows of 64 tokens without a word (RoPE computes past
    its context; learned position tables assert on a GPU)."""
    edit_config(folder, max_position_embeddings=16)
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert "data.max_length is 64" in out and "max_position_embeddings in config.json" in out
    assert "Set data.max_length: 16" in out


def test_a_dangling_symlink_and_a_home_path(folder, toy_data, tmp_path, capsys, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, out = validate(link, toy_data, tmp_path, capsys)
    assert code != 0 and f"folder {link} not found" in out
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out = validate(Path("~/model/"), toy_data, tmp_path, capsys)
    assert code == 0, out


def test_rope_scaling_extends_the_context_the_check_allows(folder, toy_data, tmp_path, capsys):
    """A model whose RoPE is scaled (yarn, linear) runs past max_position_embeddings by the factor."""
    edit_config(folder, max_position_embeddings=16, rope_scaling={"rope_type": "linear", "factor": 4.0})
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code == 0, out


def test_a_model_folder_without_tokenizer_files_is_named(folder, toy_data, tmp_path, capsys):
    """Before: validate ended in transformers' ValueError traceback ("Couldn't instantiate the backend
    tokenizer") for a folder copied with config and weights but no tokenizer files."""
    for file in folder.glob("tokenizer*"):
        file.unlink()
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0 and "Traceback" not in out
    assert "could not load its tokenizer" in out and "tokenizer.json" in out


def test_a_path_to_a_weights_file_names_its_folder(folder, toy_data, tmp_path, capsys):
    """Before: 'the config file at .../model.safetensors is not a valid JSON file' (from the tokenizer)."""
    code, out = validate(folder / "model.safetensors", toy_data, tmp_path, capsys)
    assert code != 0 and "Traceback" not in out
    assert f"names the file {folder / 'model.safetensors'}" in out and f"model.name_or_path: {folder}" in out


def test_plan_reads_a_home_relative_model_path(folder, toy_data, tmp_path, capsys, monkeypatch):
    """Before: plan said 'cannot read config.json of model ~/model' (HFValidationError) where validate
    and train expand the ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(Path("~/model"), toy_data, tmp_path / "runs"))
    code = main(["plan", str(recipe)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "vocab 320" in out.out


def test_a_weights_symlink_into_a_cleaned_cache_is_named(folder, toy_data, tmp_path, capsys):
    """A hub cache snapshot holds symlinks into blobs/; a blob removed (a cache cleaned by hand) leaves a
    dangling model.safetensors. Before: FileNotFoundError traceback from the header check's stat."""
    weights = folder / "model.safetensors"
    weights.unlink()
    weights.symlink_to(tmp_path / "blobs" / "0123abcd")
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0 and "Traceback" not in out
    assert f"weight file {weights} is damaged (cannot be read:" in out


def drop_eos(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_a_tokenizer_without_an_eos_token_is_named(folder, toy_data, tmp_path, capsys):
    """Before: chat data was refused naming the wrong token ("none of the conversations trains the
    end-of-turn token '<|im_start|>'"), and text rows silently got no EOS appended (the model never
    learns to stop; the end-token check counts chat rows only)."""
    drop_eos(folder)
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0 and "Traceback" not in out
    assert "has no eos_token" in out and "tokenizer_config.json" in out and "'<|im_end|>'" in out
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "The sky is blue."}) + "\n")
    recipe = recipe_dict(folder, tmp_path / "t.jsonl", tmp_path / "runs")
    recipe["data"]["sources"] = [{"path": str(tmp_path / "t.jsonl"), "format": "text"}]
    recipe["data"]["eval_fraction"] = 0
    code = main(["validate", str(write_recipe(tmp_path / "t.yaml", recipe)), "--examples", "0"])
    assert code != 0 and "has no eos_token" in capsys.readouterr().err
    # data.allow_no_eos is the way to train without one, knowingly
    recipe["data"]["allow_no_eos"] = True
    code = main(["validate", str(write_recipe(tmp_path / "t.yaml", recipe)), "--examples", "0"])
    assert code == 0, capsys.readouterr()


def test_a_config_that_does_not_match_the_weights_is_refused_not_initialised_at_random(folder: Path, tmp_path: Path):
    """config.json copied from a larger sibling (one layer more): before, model.loader: transformers
    printed a MISSING load report and trained the extra layer from random weights without a word."""
    from tiny import build_tiny_model

    from qlora_sft.errors import UserError
    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_base
    from qlora_sft.recipe import build_recipe

    edit_config(folder, num_hidden_layers=3)
    recipe = build_recipe(recipe_dict(folder, tmp_path / "d.jsonl", tmp_path, model={"loader": "transformers"}))
    with pytest.raises(UserError) as exc:
        load_base(recipe, LaunchMode("cpu"))
    text = str(exc.value)
    assert "9 weights of the model are not in its checkpoint" in text and "model.layers.2." in text
    assert "config.json that came with the weights" in text
    # tied embeddings (lm_head is the embedding, not stored) still load
    tied = build_tiny_model(tmp_path / "tied", tied=True)
    recipe = build_recipe(recipe_dict(tied, tmp_path / "d.jsonl", tmp_path, model={"loader": "transformers"}))
    assert load_base(recipe, LaunchMode("cpu")).config.tie_word_embeddings


def test_a_learned_position_table_shorter_than_max_length_is_refused(folder, toy_data, tmp_path, capsys):
    """GPT-2-style configs name their position table n_positions: an id past it is an index error
    (a device-side assert on a GPU) mid-training. Before: validate passed."""
    config = json.loads((folder / "config.json").read_text())
    del config["max_position_embeddings"]
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=32)
    (folder / "config.json").write_text(json.dumps(config))
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert "at most 32 positions (n_positions in config.json)" in out and "Set data.max_length: 32" in out


def test_a_single_file_beside_a_stale_sharded_index_is_refused(folder, toy_data, tmp_path, capsys):
    """A folder holding model.safetensors and an index of shards from an earlier save (a copy merged
    over an older one): transformers reads model.safetensors, the low-memory loader the index's shards,
    so the two loaders would train different weights without a word. Before: validate passed."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    old = {k: v + 1 for k, v in weights.items()}
    save_file(old, str(folder / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(old, "model-00001-of-00001.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert "holds both model.safetensors and model.safetensors.index.json" in out and "remove" in out


def test_a_model_without_a_causal_lm_class_is_refused_by_validate(folder, toy_data, tmp_path, capsys):
    """An encoder-decoder (t5) or an image-text model named as the base: before, validate passed and
    `train` stopped at AutoModelForCausalLM with 'Unrecognized configuration class' after the data."""
    edit_config(folder, model_type="t5", architectures=["T5ForConditionalGeneration"])
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0
    assert "model_type 't5'" in out and "no causal language model class" in out


def test_a_cut_off_generation_config_is_named(folder, toy_data, tmp_path, capsys):
    """Before: validate passed; the low-memory loader stopped with an OSError traceback after reading
    every weight, while the transformers loader dropped the file without a word (its stop tokens lost)."""
    from qlora_sft.errors import UserError
    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_base
    from qlora_sft.recipe import build_recipe

    generation = folder / "generation_config.json"
    generation.write_text(generation.read_text()[:20])
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code != 0 and f"{generation} is not valid JSON" in out
    recipe = build_recipe(recipe_dict(folder, tmp_path / "d.jsonl", tmp_path, model={"loader": "low_memory"}))
    with pytest.raises(UserError, match="generation_config.json is not valid JSON"):
        load_base(recipe, LaunchMode("cpu"))


def test_a_revision_beside_a_local_folder_is_said_to_be_ignored(folder, toy_data, tmp_path, capsys, caplog):
    """`model.revision: <commit>` kept from a hub id after switching `name_or_path` to a local
    folder (a snapshot downloaded by hand): transformers ignores the revision for a folder, and the
    run trained whatever commit the folder holds with nothing said."""
    import logging

    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        code, out = validate(folder, toy_data, tmp_path, capsys, model={"revision": "a1b2c3d"})
    assert code == 0, out
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"model.revision a1b2c3d does not apply to the local folder {folder}" in said, said
    assert "remove model.revision" in said


def test_a_native_model_whose_config_also_maps_to_folder_code_trains_without_remote_code(
    folder, toy_data, tmp_path, capsys
):
    """Phi-3-mini's config.json names model_type `phi3`, which transformers implements, and still
    carries the `auto_map` of its earlier own code: transformers loads its own class with
    trust_remote_code false, but validate refused the model and told the user to run the folder's
    code. Now it validates, and the folder's code does not run."""
    edit_config(folder, auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.My"})
    (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    (folder / "configuration_my.py").write_text("raise SystemExit('remote code ran')\n")
    code, out = validate(folder, toy_data, tmp_path, capsys)
    assert code == 0, out
    assert "remote code ran" not in out
