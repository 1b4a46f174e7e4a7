"""Loading for training: the tokenizer (a pad token distinct from EOS, the recipe's chat template),
the quantization (the recipe's, or what a pre-quantized checkpoint dictates), `load_base` placed
for the launch mode (transformers' loader or the low-memory one), the attention implementation,
Liger's kernels, and `load_model`: the base with LoRA adapters, fused with the 4-bit layers where
`lora.fused` resolves on, its frozen weights checked for sharding. `summarize` for the log."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import local_path
from ..launch import DTYPES, LaunchMode, distributed_state
from ..recipe import ModelConfig, QuantizationConfig, Recipe
from .fused_lora import fuse_lora_layers, uses_fused_lora

log = logging.getLogger("qlora_sft")


def quantization_config(q: QuantizationConfig, compute_dtype: torch.dtype, mode: LaunchMode) -> Any:
    """BitsAndBytesConfig for the recipe, or None for plain LoRA."""
    from transformers import BitsAndBytesConfig

    if q.method == "none":
        return None
    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = q.quant_storage
    if storage == "auto":
        # ZeRO-3 and FSDP flatten and shard parameters, which needs one dtype for all of them: the
        # packed 4-bit weights must be stored in the compute dtype (peft#1432, axolotl#1482).
        storage_dtype = compute_dtype if mode.shards_parameters else torch.uint8
    else:
        storage_dtype = DTYPES.get(storage, torch.uint8)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.method,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype,
    )


def checkpoint_quantization(q: QuantizationConfig, config: Any, path: str) -> QuantizationConfig:
    """The quantization a checkpoint dictates: a pre-quantized bitsandbytes 4-bit checkpoint keeps the
    quant type and double quantization it was saved with (its packed bytes are used as stored)."""
    import dataclasses

    from ..loader import prequantized_config

    stored = prequantized_config(config)
    if stored is None:
        return q
    if q.method not in ("nf4", "fp4"):
        raise UserError(
            f"model.name_or_path {path} is stored in bitsandbytes 4-bit but quantization.method is {q.method}; "
            f"set quantization.method: {stored.get('bnb_4bit_quant_type', 'nf4')} (or train on the full-precision "
            "original)"
        )
    actual = dataclasses.replace(
        q,
        method=stored.get("bnb_4bit_quant_type", "nf4"),
        double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)),
    )
    if (actual.method, actual.double_quant) != (q.method, q.double_quant):
        log.warning(
            "model: %s is pre-quantized as %s (double quant %s); the recipe's %s (double quant %s) does not apply",
            path,
            actual.method,
            actual.double_quant,
            q.method,
            q.double_quant,
        )
    return actual


def uses_low_memory_loader(cfg: ModelConfig, mode: LaunchMode) -> bool:
    """`model.loader: auto` reads tensor by tensor where parameters are sharded (FSDP, ZeRO-3)."""
    return cfg.loader == "low_memory" or (cfg.loader == "auto" and mode.shards_parameters)


def weight_devices(mode: LaunchMode) -> tuple[torch.device, torch.device]:
    """(where the low-memory loader puts the weights' data, where it quantizes and keeps the
    quantization constants). Under FSDP/ZeRO-3 only rank 0 materialises the model, in CPU memory:
    FSDP moves it to the GPU one wrapped layer at a time and shards it, broadcasting each layer to
    the other ranks (sync_module_states), and the ZeRO-3 partitioning (`partition_for_zero3`)
    broadcasts parameter by parameter. The other ranks hold no data until then (meta)."""
    cpu = torch.device("cpu")
    if mode.kind == "cpu":
        return cpu, cpu
    gpu = distributed_state().device
    if not mode.shards_parameters:
        return gpu, gpu
    if mode.rank == 0 or (mode.kind == "fsdp" and not mode.sync_module_states):
        return cpu, gpu
    return torch.device("meta"), gpu


def from_pretrained_placement(mode: LaunchMode, quantized: bool) -> dict[str, Any]:
    """`from_pretrained` placement for the launch mode (model.loader: transformers)."""
    if mode.kind == "cpu":
        return {"device_map": {"": "cpu"}} if quantized else {}
    # DDP with a quantized model needs each rank's full copy on its own GPU: "auto" would spread
    # layers over every visible GPU and DDP then fails (or silently runs on GPU 0). Under ZeRO-3/FSDP
    # transformers quantizes onto this GPU too: every rank holds the whole 4-bit model until it is
    # sharded (the low-memory loader avoids that).
    return {"device_map": {"": distributed_state().device}}


def load_base(
    recipe: Recipe, mode: LaunchMode, base_dir: str | Path | None = None, *, compute_dtype: torch.dtype | None = None
) -> Any:
    """The base model as training sees it: quantized with the recipe's settings (or as a
    pre-quantized checkpoint stores it), placed for the launch mode. `compute_dtype` overrides the
    recipe's (export computes its reference in fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import loader

    compute = compute_dtype or mode.compute_dtype(recipe.quantization, recipe.model)
    path = local_model_path(recipe.model, base_dir)
    cfg = recipe.model
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path={cfg.name_or_path!r}: cannot read its config.json ({str(exc).splitlines()[0]})"
        ) from None
    q = checkpoint_quantization(recipe.quantization, config, path)
    if Path(path).is_dir():  # a shard missing or cut off is named here, not a safetensors traceback
        check_weight_files(Path(path), cfg.name_or_path, uses_safetensors_only=uses_low_memory_loader(cfg, mode))
        check_generation_config(Path(path), cfg.name_or_path)
    qconfig = quantization_config(q, compute, mode)
    if qconfig is not None and mode.device_type == "cpu":
        _check_bnb_cpu()
    model_dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else compute
    attn = resolve_attn_implementation(recipe, mode.device_type, config, path)
    if uses_low_memory_loader(cfg, mode):
        data_device, compute_device = weight_devices(mode)
        base = loader.load_low_memory(
            path,
            qconfig,
            dtype=model_dtype,
            data_device=data_device,
            compute_device=compute_device,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
        )
    else:
        kwargs: dict[str, Any] = {
            "dtype": model_dtype,
            "attn_implementation": attn,
            "trust_remote_code": cfg.trust_remote_code,
            "revision": cfg.revision,
            **from_pretrained_placement(mode, qconfig is not None),
        }
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
        base, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        check_loading_info(info, cfg.name_or_path)
    if mode.device_type == "cpu":
        keep_cpu_4bit_trainable(base)
    log.info(
        "model: %s loader, attention %s, %s",
        "low-memory" if uses_low_memory_loader(cfg, mode) else "transformers",
        attn,
        quantization_line(base, qconfig, model_dtype),
    )
    return base


def check_loading_info(info: dict[str, Any], name: str) -> None:
    """transformers initialises at random, with only a printed report, the weights of the model its
    config.json describes that the checkpoint lacks or holds in another shape (a config.json from
    another size of the model, an incomplete conversion): the run would train on noise. Refused."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, list | tuple) else str(m) for m in info.get("mismatched_keys") or []]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights of the model are not in its checkpoint: {', '.join(missing[:4])}")
    if mismatched:
        problems.append(f"{len(mismatched)} have another shape in the checkpoint: {', '.join(sorted(mismatched)[:4])}")
    if problems:
        raise UserError(
            f"model.name_or_path {name}: {'; '.join(problems)}{' ...' if len(missing) > 4 else ''}. transformers "
            "would start them at random. config.json does not describe these weights (a config from another size "
            "of the model?): use the config.json that came with the weights."
        )


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def quantization_line(model: Any, qconfig: Any, model_dtype: torch.dtype) -> str:
    """What was loaded, read off the model (a pre-quantized checkpoint keeps its own storage dtype
    under `model.loader: transformers`)."""
    if qconfig is None:
        return f"weights in {dtype_name(model_dtype)} (no quantization)"
    if getattr(qconfig, "load_in_8bit", False):
        return "LLM.int8 weights"
    packed = next((p for p in model.parameters() if type(p).__name__ == "Params4bit"), None)
    storage = packed.dtype if packed is not None else qconfig.bnb_4bit_quant_storage
    return (
        f"{qconfig.bnb_4bit_quant_type} weights (double quant {qconfig.bnb_4bit_use_double_quant}) stored as "
        f"{dtype_name(storage)}, compute {dtype_name(qconfig.bnb_4bit_compute_dtype)}, "
        f"other weights {dtype_name(model_dtype)}"
    )


def local_model_path(cfg: ModelConfig, base_dir: str | Path | None = None) -> str:
    """A local folder as given or relative to the recipe; otherwise the hub id unchanged."""
    found, other = local_path(cfg.name_or_path, base_dir)
    if found is not None and other is not None:
        raise UserError(
            f"model.name_or_path: {cfg.name_or_path} names two different folders: {found.resolve()} (from the "
            f"working directory) and {other.resolve()} (beside the recipe). Write the path absolute, or launch from "
            "the recipe's folder, so that the run trains the model you mean."
        )
    if found is not None and found.is_file():
        raise UserError(
            f"model.name_or_path names the file {found}; a model is a folder (config.json, tokenizer files and "
            f".safetensors weights as save_pretrained writes them): set model.name_or_path: {found.parent}"
            + (" (GGUF is llama.cpp's format: train on the original model)" if found.suffix == ".gguf" else "")
        )
    if found is not None:
        return str(found)
    p = Path(cfg.name_or_path).expanduser()
    if p.is_absolute() or cfg.name_or_path.startswith((".", "~")) or cfg.name_or_path.count("/") > 1:
        raise UserError(f"model.name_or_path: folder {cfg.name_or_path} not found")
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig, base_dir: str | Path | None = None) -> Any:
    from transformers import AutoTokenizer

    path = local_model_path(cfg, base_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:  # ValueError: a folder without tokenizer files ("Couldn't instantiate")
        raise UserError(
            f"model.name_or_path={cfg.name_or_path!r}: could not load its tokenizer ({str(exc).splitlines()[0]}). "
            "Use a local folder with the model's tokenizer files (tokenizer.json or tokenizer.model, and "
            "tokenizer_config.json: copy them from the model it came from), or a hub id where the hub is reachable."
        ) from None
    ensure_pad_token(tok)
    tok.padding_side = "right"
    return tok


def recipe_tokenizer(recipe: Recipe, base_dir: str | Path | None = None) -> Any:
    """The recipe's tokenizer with the recipe's chat template (as training renders the data). The
    model folder is checked first (`check_model_folder`: config.json, weight files) and the tokenizer
    against the model's embedding after: validate, prepare and train stop here, before any data is
    built or weight loaded, rather than with a traceback at loading time or a device-side assert."""
    from .. import data

    config = check_model_folder(recipe, base_dir)
    tokenizer = load_tokenizer(recipe.model, base_dir)
    if tokenizer.eos_token is None and not recipe.data.allow_no_eos:
        vocab = tokenizer.get_vocab()
        ends = [t for t in END_TOKENS if t in vocab]
        raise UserError(
            f"model.name_or_path {recipe.model.name_or_path}: its tokenizer has no eos_token (tokenizer_config.json), "
            "so text rows end without one and chat turns without the token generation stops on: the model would "
            "never learn to stop. Set eos_token in tokenizer_config.json to the token that ends the model's turns"
            f"{' (this vocabulary has ' + ', '.join(repr(t) for t in ends) + ')' if ends else ''}, or, to train "
            "without one knowingly, data.allow_no_eos: true."
        )
    data.set_chat_template(tokenizer, recipe.data.chat_template, recipe.model.name_or_path, base_dir)
    if config is not None:
        check_tokenizer_fits(recipe, tokenizer, config)
    return tokenizer


# end-of-turn tokens of common families, named when a tokenizer lacks its eos_token
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|end|>")


def read_config_json(folder: Path, name: str, filename: str = "config.json") -> dict[str, Any]:
    """A model folder's config.json (or generation_config.json) as a dict; a missing, non-UTF-8 or
    cut-off file is named."""
    import json

    file = folder / filename
    if not file.is_file():
        raise UserError(
            f"model.name_or_path {name}: {folder} has no config.json, so it is not a model folder as "
            "save_pretrained writes it (a GGUF or a bare weights file is not enough). Point it at the folder "
            "that holds config.json and the .safetensors weights."
        )
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"model.name_or_path {name}: {file} is not UTF-8 (byte {exc.start}); transformers reads it as UTF-8 "
            "JSON. Re-download it or re-save it as UTF-8."
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"model.name_or_path {name}: {file} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}; {len(raw)} bytes, cut off?). Re-download the model's {filename}."
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"model.name_or_path {name}: {file} holds a JSON {type(config).__name__}, not an object")
    return config


def check_model_folder(recipe: Recipe, base_dir: str | Path | None = None) -> dict[str, Any] | None:
    """A local model folder checked without loading a weight: its config.json (readable, an
    architecture this transformers knows or remote code allowed, a quantization qlora-sft trains on,
    a context as long as data.max_length) and its weight files (`check_weight_files`). Returns the
    config, or None for a hub id (transformers fetches and checks it)."""
    cfg = recipe.model
    path = local_model_path(cfg, base_dir)
    folder = Path(path)
    if not folder.is_dir():
        return None
    if cfg.revision and os.environ.get("RANK", "0") in ("0", ""):  # said once: by rank 0 (RANK set by launchers)
        log.warning(
            "model.revision %s does not apply to the local folder %s (transformers reads the folder as it is; a "
            "revision picks a commit of a hub id): check the folder holds that commit, and remove model.revision",
            cfg.revision,
            folder,
        )
    config = read_config_json(folder, cfg.name_or_path)
    model_type = config.get("model_type")
    import transformers
    from transformers import CONFIG_MAPPING

    # transformers runs a folder's own code (auto_map) only with trust_remote_code; without it, a
    # model_type it implements loads its own class (Phi-3's config still maps to its earlier code)
    remote = bool(config.get("auto_map")) and (cfg.trust_remote_code or model_type not in CONFIG_MAPPING)
    if remote and not cfg.trust_remote_code:
        code = sorted(p.name for p in folder.glob("*.py"))
        raise UserError(
            f"model.name_or_path {cfg.name_or_path}: its config.json maps the model to code in the folder "
            f"(auto_map{': ' + ', '.join(code) if code else ''}), which runs only with model.trust_remote_code: "
            "true. Read that code, then set the key (or use a model transformers implements)."
        )
    if not remote:
        if not model_type and not _config_loads(folder):  # (transformers also guesses from the folder's name)
            raise UserError(
                f"model.name_or_path {cfg.name_or_path}: {folder / 'config.json'} has no model_type, so transformers "
                "cannot tell the architecture. Re-download the model's config.json."
            )
        if model_type and model_type not in CONFIG_MAPPING:
            raise UserError(
                f"model.name_or_path {cfg.name_or_path}: config.json names model_type {model_type!r} "
                f"(architectures {config.get('architectures')}), which transformers {transformers.__version__} does "
                "not implement. Upgrade transformers, or, for a model that ships its own code, set "
                "model.trust_remote_code: true."
            )
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type and model_type in CONFIG_MAPPING and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserError(
                f"model.name_or_path {cfg.name_or_path}: config.json names model_type {model_type!r} "
                f"(architectures {config.get('architectures')}), which has no causal language model class in "
                f"transformers {transformers.__version__} (AutoModelForCausalLM): qlora-sft trains decoder-only "
                "causal LMs. Use a causal LM (or its text-only variant) as the base."
            )
    if config.get("quantization_config") is not None:
        from types import SimpleNamespace

        try:
            checkpoint_quantization(recipe.quantization, SimpleNamespace(**config), cfg.name_or_path)
        except UserError as exc:
            raise UserError(
                f"model.name_or_path {cfg.name_or_path} (quantization_config in config.json): {exc}"
            ) from None
    context, key = model_context(config)
    if isinstance(context, int) and 0 < context < recipe.data.max_length:
        raise UserError(
            f"data.max_length is {recipe.data.max_length} but {cfg.name_or_path} was built for at most {context} "
            f"positions ({key} in config.json): longer rows index past its position table or "
            f"run outside the context it learned. Set data.max_length: {context} (or less)."
        )
    check_weight_files(folder, cfg.name_or_path, uses_safetensors_only=cfg.loader == "low_memory")
    check_generation_config(folder, cfg.name_or_path)
    check_host_tables(recipe, base_dir)
    return config


def model_context(config: dict[str, Any]) -> tuple[int | None, str | None]:
    """The most positions a model takes (and the config.json key that says it), from its config as a
    dict: max_position_embeddings (n_positions), times the RoPE scaling factor where the scaling
    extends it (yarn, linear, dynamic: Qwen2.5's long context); not where max_position_embeddings is
    already the extended length (Llama 3.1: above the scaling's original_max_position_embeddings)."""
    text = config.get("text_config") or config
    key = next((k for k in ("max_position_embeddings", "n_positions") if isinstance(text.get(k), int)), None)
    context = text.get(key) if key else None
    scaling = text.get("rope_scaling") or text.get("rope_parameters") or {}  # (transformers 5 names it so)
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    original = scaling.get("original_max_position_embeddings") if isinstance(scaling, dict) else None
    already = isinstance(original, int) and isinstance(context, int) and context > original
    if isinstance(context, int) and isinstance(factor, int | float) and factor > 1 and not already:
        context = int(context * factor)  # RoPE scaled past the positions it was trained on
    return context, key


def check_generation_config(folder: Path, name: str) -> None:
    """generation_config.json (the stop tokens chat and export keep) readable where there is one: the
    low-memory loader fails on a damaged one after reading every weight, transformers drops it."""
    if (folder / "generation_config.json").is_file():
        read_config_json(folder, name, "generation_config.json")


def _config_loads(folder: Path) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder)
    except Exception:
        return False
    return True


def check_weight_files(folder: Path, name: str, *, uses_safetensors_only: bool = False) -> None:
    """`weight_files_problem` as the error of `model.name_or_path`."""
    problem = weight_files_problem(folder, uses_safetensors_only=uses_safetensors_only)
    if problem:
        what, fix = problem
        raise UserError(f"model.name_or_path {name}: {what}. {fix}")


def weight_files_problem(folder: Path, *, uses_safetensors_only: bool = False) -> tuple[str, str] | None:
    """Whether the weight files a loader will read are there and whole: the shards the index names,
    and each safetensors header readable and covering the file (a download cut off, a shard missing, a
    damaged header). Reads only the headers. (what is wrong, the fix for a downloaded model), or None."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            shards = sorted({folder / str(f) for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{index} is unreadable ({type(exc).__name__}: {exc}; cut off?)", "Re-download it with the shards."
        single = folder / "model.safetensors"
        if single.is_file() and single not in shards:
            return (
                f"{folder} holds both model.safetensors and model.safetensors.index.json (naming {len(shards)} other "
                "shard file(s)), one of them left from an earlier save: transformers' loader reads model.safetensors, "
                "the low-memory loader the index's shards",
                "Keep the files of the weights you mean and remove the others (the index and its shards, or "
                "model.safetensors).",
            )
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            return (
                f"{index.name} names {len(missing)} shard(s) not in {folder}: "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
                "The download is incomplete: download the missing files.",
            )
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".gguf", ".pt", ".pth", ".ckpt"))
        if other and not uses_safetensors_only and all(p.endswith(".bin") for p in other):
            return None  # PyTorch .bin weights: transformers reads them
        return (
            f"{folder} holds no .safetensors weights{' (only ' + ', '.join(other[:4]) + ')' if other else ''}",
            "GGUF is llama.cpp's format; train on the original (safetensors) model it was made from."
            if any(p.endswith(".gguf") for p in other)
            else "Give the folder that holds the model's .safetensors files (the low-memory loader reads only "
            "safetensors; convert .bin weights with save_pretrained).",
        )
    for shard in shards:
        problem = safetensors_header_problem(shard)
        if problem:
            return (
                f"weight file {shard} is damaged ({problem})",
                "Download it again (a download cut off or a copy that failed leaves such a file).",
            )
    return None


def safetensors_header_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be whole, from its header alone; None when it looks whole: an
    8-byte header length, a JSON header of that length, and tensors that end exactly at the file's end."""
    import json
    import struct

    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"its header says {n} bytes of metadata but the file has {size} bytes in all: cut off"
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                return "its metadata header is not valid JSON"
    except OSError as exc:  # a symlink into a cache whose blob is gone, a file this user cannot read
        return f"cannot be read: {exc.strerror or exc}"
    if not isinstance(header, dict):
        return "its metadata header is not a JSON object"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "its metadata header has a tensor without data_offsets"
    if 8 + n + end != size:
        return f"its tensors need {8 + n + end} bytes but the file has {size}: cut off or padded"
    return None


def check_tokenizer_fits(recipe: Recipe, tokenizer: Any, config: dict[str, Any]) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding (vocab_size in
    config.json). An id past it is a device-side assert mid-training on a GPU; resizing gives the
    new tokens random rows that LoRA never trains. The pad token qlora-sft adds is the exception (never
    attended to nor trained; `resize_for_pad` gives it a row). Tokens past the embedding train only
    where the embedding and head train (lora.modules_to_save)."""
    text = config.get("text_config") or config
    rows = text.get("vocab_size", config.get("vocab_size"))
    if not isinstance(rows, int) or len(tokenizer) <= rows:
        return
    beyond = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= rows and i != tokenizer.pad_token_id)
    if not beyond:
        return
    trained = [m for m in recipe.lora.modules_to_save or [] if "embed" in m]
    if trained:
        log.warning(
            "model: %d tokenizer tokens have no row in the embedding of %s (%s); the embedding grows and "
            "lora.modules_to_save (%s) trains their rows",
            len(beyond),
            recipe.model.name_or_path,
            ", ".join(repr(t) for _, t in beyond[:4]),
            ", ".join(recipe.lora.modules_to_save or []),
        )
        return
    raise UserError(
        f"model.name_or_path {recipe.model.name_or_path}: the tokenizer has {len(tokenizer)} tokens but the model's "
        f"embedding has {rows} rows (vocab_size in config.json): {len(beyond)} token(s) have no row, e.g. "
        f"{', '.join(f'{t!r} (id {i})' for i, t in beyond[:4])}. On a GPU these ids stop training with a "
        "device-side assert; given new rows, they would stay random (LoRA does not train the embedding). "
        "Remove the added tokens from the tokenizer (added_tokens in tokenizer.json / tokenizer_config.json), "
        "use the tokenizer that came with the weights, or train their rows: lora.modules_to_save: "
        "[embed_tokens, lm_head]."
    )


def ensure_pad_token(tokenizer: Any) -> None:
    """Use a pad token distinct from EOS. With pad == eos, collators that mask padding labels
    also mask the real EOS, so the model never learns to stop (trl#1623)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    candidates = [
        "<|finetune_right_pad_id|>",  # Llama 3.1
        "<pad>",
        "<|pad|>",
        "[PAD]",
        "<|reserved_special_token_0|>",
        tokenizer.unk_token,
    ]
    for cand in candidates:
        if cand and cand in vocab and vocab[cand] != tokenizer.eos_token_id:
            tokenizer.pad_token = cand
            return
    # Add one. It is never attended to nor trained; `resize_for_pad` grows the embeddings if needed.
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def load_model(
    recipe: Recipe, tokenizer: Any, mode: LaunchMode, base_dir: str | Path | None = None, resuming: bool = False
) -> Any:
    """Base model (quantized, placed for the launch mode) with LoRA adapters, ready to train.
    `resuming`: the adapters start from a checkpoint's, loaded by the Trainer; `lora.init_from` is not read."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    compute_dtype = mode.compute_dtype(recipe.quantization, recipe.model)
    in_host = host_table_keys(recipe, mode, base_dir)
    model = load_base(recipe, mode, base_dir)
    quantized = getattr(model, "hf_quantizer", None) is not None
    resize_for_pad(model, tokenizer)
    host_tables = tables_to_host(model, recipe, in_host)  # frozen tables in host memory: DDP leaves them alone
    model.config.use_cache = False  # no KV cache while training (and checkpointing needs it off)
    if use_liger(recipe.model, mode.device_type):
        apply_liger(model)

    gc = bool(recipe.train.args.get("gradient_checkpointing", True))
    if quantized and recipe.model.upcast_frozen and not mode.shards_parameters:
        # Casts norms/embeddings to fp32 and wires input grads for checkpointing. Non-reentrant
        # checkpointing: the reentrant variant breaks under DDP with LoRA (parameters "marked ready
        # twice") and needs inputs that require grad.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gc:
        # The default: prepare_model_for_kbit_training's fp32 upcast would double the memory of the
        # embeddings and lm_head (2 GB more for an 8B model) and make the residual stream and lm_head
        # matmuls fp32, for weights that are frozen; under ZeRO-3/FSDP it also breaks the one-dtype
        # rule of the shards. Keep the model dtype and only wire checkpointing (get_peft_model
        # freezes everything but the adapters).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    lora = recipe.lora
    target = lora.target_modules
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules={target!r}: {exc}") from None
    from ..init_adapter import load_weights

    if not resuming:
        load_weights(model, recipe, base_dir)  # lora.init_from: start from an existing adapter's weights
    if host_tables:
        # DDP refuses a module with parameters on two device types unless told to leave some alone;
        # the frozen tables need no gradient sync and are the same on every rank
        tables = {id(p) for n, p in model.get_base_model().named_parameters() if n in host_tables}
        model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if id(p) in tables]
        if mode.world_size > 1:  # (one process: there is no DDP to tell)
            log.info(
                "model: DDP leaves %s alone (frozen, in host memory)",
                ", ".join(model._ddp_params_and_buffers_to_ignore),
            )
        from .offload import host_head_hooks

        host_head_hooks(model)  # (where the head stayed on the GPU it is no HostHead: nothing to wire)
    if mode.shards_parameters:
        check_sharded_dtypes(model, compute_dtype, mode)
    if uses_fused_lora(recipe, mode):
        log.info("lora: %d adapted 4-bit layers fused (lora.fused)", fuse_lora_layers(model))
    return model


def host_table_keys(recipe: Recipe, mode: LaunchMode, base_dir: str | Path | None) -> list[str]:
    """The `model.*_in_host_memory` keys (`launch.HOST_TABLE_KEYS`) on for this launch: `true`, and
    `auto` as `plan.resolve_host_tables` resolves it on this GPU (as train's memory outlook did). Both
    need an input embedding that is not the output head (one table would be both on the GPU and in
    host memory), read from config.json before any weight loads: refused for `true`."""
    from ..launch import HOST_TABLE_KEYS, gpu_memory_gib, host_tables
    from ..plan import recipe_shape, resolve_host_tables

    keys = host_tables(recipe)
    for key in keys:
        check_untied_embeddings(recipe, base_dir, f"model.{key}")
    if any(getattr(recipe.model, key) == "auto" for key in HOST_TABLE_KEYS):
        try:
            resolved = resolve_host_tables(recipe, mode, recipe_shape(recipe, base_dir), gpu_memory_gib())
        except Exception as exc:  # a config plan cannot read: the tables stay on the GPU (it fails at the load)
            log.info("model.*_in_host_memory (auto): on the GPU, no estimate from plan (%s)", exc)
            resolved = recipe
        auto = [key for key in host_tables(resolved) if key not in keys]  # (the true ones stay, unsaid)
        if auto:
            log.info("model: %s (auto): GPU memory is short for this launch by plan's estimate", ", ".join(auto))
        keys = host_tables(resolved)
    return keys


def tables_to_host(model: Any, recipe: Recipe, keys: list[str]) -> list[str]:
    """Move the frozen tables of `keys` (`host_table_keys`) to host memory; returns their parameters'
    names. A table the model has in a form that cannot move (not a plain layer, tied) is refused for
    `true` and stays on the GPU for `auto`, which the log says."""
    from ..launch import keeps_in_host_memory
    from . import offload

    names = []
    for key in keys:
        try:
            name, moved = getattr(offload, key)(model, recipe.lora.target_modules)
        except UserError as exc:
            if keeps_in_host_memory(recipe, key):
                raise
            log.info("model.%s (auto): off: %s", key, str(exc).split(": ", 1)[-1].split(". Remove")[0])
            continue
        names.append(name)
        what = "input embedding in host memory" if key.startswith("embedding") else "output head in host memory"
        log.info("model: %s (model.%s; %.2f GiB off the GPU)", what, key, moved / 2**30)
    return names


def check_untied_embeddings(recipe: Recipe, base_dir: str | Path | None, key: str) -> None:
    """`model.embedding_in_host_memory` and `model.lm_head_in_host_memory` need an input embedding
    that is not the output head: one table would be both on the GPU and in host memory. Read from
    config.json, before any weight loads."""
    from transformers import AutoConfig

    cfg = recipe.model
    config = AutoConfig.from_pretrained(
        local_model_path(cfg, base_dir), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    text = getattr(config, "get_text_config", lambda: config)()
    if getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        raise UserError(
            f"{key} is true, but {cfg.name_or_path} ties its input embedding to its output head "
            "(tie_word_embeddings in config.json): one table serves both. Remove the key for this model."
        )


def check_host_tables(recipe: Recipe, base_dir: str | Path | None) -> None:
    """The tables `model.*_in_host_memory: true` names can move to host memory in this model: not tied
    (`check_untied_embeddings`), a plain embedding, a plain bias-free head (`offload.embedding_problem`,
    `offload.head_problem`). Read from config.json and the model's classes built on the meta device,
    before any weight loads (validate, prepare and train; `tables_to_host` would refuse it only after
    every weight had loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..launch import host_tables
    from . import offload

    keys = host_tables(recipe)
    if not keys:
        return
    for key in keys:
        check_untied_embeddings(recipe, base_dir, f"model.{key}")
    cfg = recipe.model
    path = local_model_path(cfg, base_dir)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # a model's own code that cannot build on the meta device: tables_to_host checks it
        log.info("model.*_in_host_memory: checked once the weights load (%s: %s)", type(exc).__name__, exc)
        return
    problems = {"embedding_in_host_memory": offload.embedding_problem, "lm_head_in_host_memory": offload.head_problem}
    for key in keys:
        problem = problems[key](model, recipe.lora.target_modules)
        if problem:
            raise UserError(f"{problem} (model.name_or_path {cfg.name_or_path}, read from its config.json)")


def check_sharded_dtypes(model: Any, compute_dtype: torch.dtype, mode: LaunchMode) -> None:
    """Before any training: under FSDP/ZeRO-3 every frozen weight, the packed 4-bit ones included,
    must be in the compute dtype. Shards are flattened per dtype, and integer storage cannot be
    flattened at all (torch: "Cannot flatten integer dtype tensors"; accelerate's FSDP2 path leaves
    such weights unsharded with only a warning). The adapters may differ: they are wrapped apart."""
    wrong = [
        f"{name} ({'4-bit, stored as ' if type(p).__name__ == 'Params4bit' else ''}{dtype_name(p.dtype)})"
        for name, p in model.named_parameters()
        if not p.requires_grad and p.dtype != compute_dtype
    ]
    if wrong:
        want = dtype_name(compute_dtype)
        raise UserError(
            f"{mode.describe()}: {len(wrong)} frozen weights are not in the compute dtype {want}, so they cannot be "
            f"sharded: {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}. A pre-quantized checkpoint stored "
            "as uint8 loaded with model.loader: transformers does this; use model.loader: auto (it re-types the "
            "packed bytes), and leave quantization.quant_storage and model.dtype at auto."
        )


def resolve_attn_implementation(recipe: Recipe, device_type: str, config: Any, path: str) -> str:
    """`auto` -> `varlen` (flash attention per packed example) on CUDA with packing, for models with
    plain causal attention; `sdpa` otherwise. `varlen` is registered with transformers here."""
    from .. import attention

    choice = recipe.model.attn_implementation
    wants_varlen = choice == attention.NAME or (
        choice == "auto" and device_type == "cuda" and recipe.data.packing and attention.available_on_cuda()
    )
    if choice == "auto":
        choice = "sdpa"
    if wants_varlen:
        unsuitable = varlen_unsuitable(config.get_text_config())
        if unsuitable is None:
            choice = attention.NAME
        elif recipe.model.attn_implementation == attention.NAME:
            reason, exact = unsuitable
            if not exact:
                raise UserError(f"model.attn_implementation: varlen cannot run {path}: {reason}; use sdpa (or auto)")
            log.warning("attention: varlen runs %s one example at a time (%s); sdpa may be faster", path, reason)
            choice = attention.NAME
    if choice == attention.NAME:
        attention.register()
    return choice


def varlen_unsuitable(text: Any) -> tuple[str, bool] | None:
    """Why the varlen kernel does not suit this model's attention, and whether varlen still computes
    it exactly (one example at a time, slower); None when the kernel runs it as is."""
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "it uses sliding-window attention", False
    if not set(getattr(text, "layer_types", None) or ["full_attention"]) <= {"full_attention"}:
        return "it mixes attention types across layers", False
    for key in ("attn_logit_softcapping", "attn_softcapping"):
        if getattr(text, key, None):
            return f"it softcaps attention logits ({key})", False
    v_dim = getattr(text, "v_head_dim", None)
    qk_dim = getattr(text, "qk_head_dim", None) or getattr(text, "head_dim", None)
    if v_dim is not None and qk_dim is not None and v_dim != qk_dim:
        return f"its value heads ({v_dim}) differ from its query/key heads ({qk_dim})", True
    if getattr(text, "attention_dropout", 0.0):
        return f"it uses attention dropout ({text.attention_dropout})", True
    return None


def use_liger(cfg: ModelConfig, device_type: str) -> bool:
    if cfg.liger_kernels is False:
        return False
    if device_type != "cuda":
        if cfg.liger_kernels is True:
            log.warning("model.liger_kernels: Liger's kernels need a CUDA GPU; running without them")
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:
        if cfg.liger_kernels is True:
            raise UserError(
                f"model.liger_kernels is true but liger-kernel does not import ({exc}). "
                "Install it (`pip install 'qlora-sft[fast]'`) or set model.liger_kernels: auto"
            ) from None
        log.info("liger-kernel not installed: running without its fused kernels (pip install 'qlora-sft[fast]')")
        return False
    return True


def apply_liger(model: Any) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on this model instance (not its loss: TRL computes the
    loss in chunks from the hidden states already). Benchmark switches: QLORA_SFT_NORM=torch gives
    the norms Liger computes with its llama casting torch's fused RMSNorm (`hostwork.torch_rms_norms`),
    QLORA_SFT_SWIGLU=torch keeps transformers' MLP."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    from ..hostwork import norm_kernel, swiglu_kernel, torch_rms_norms

    swiglu = swiglu_kernel() == "liger"
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False, swiglu=swiglu)
    norms = torch_rms_norms(model) if norm_kernel() == "torch" else 0
    names = ["rope", *(["swiglu"] if swiglu else []), *([] if norms else ["rms_norm"])]
    log.info("liger kernels: %s%s", ", ".join(names), f"; torch's fused rms_norm in {norms} norms" if norms else "")


def resize_for_pad(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings only if an added pad token does not fit in the existing rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def keep_cpu_4bit_trainable(model: Any) -> None:
    """bitsandbytes' CPU Linear4bit repacks its weight for a fast inference kernel the first time it
    runs in eval mode without grad (e.g. an evaluation pass) on CPUs with AVX512-BF16. That kernel
    has no autograd formula, so every later training step silently drops the gradient through the
    base layers. Keep the trainable layout for models we train."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _check_bnb_cpu() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # pragma: no cover
        raise UserError(f"quantization needs bitsandbytes, which failed to import: {exc}") from None


@dataclass(frozen=True)
class ModelSummary:
    trainable_params: int
    total_params: int
    adapter_mb: float
    base_footprint_gb: float

    def lines(self) -> list[str]:
        return [
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_params / max(1, self.total_params):.3f}%)",
            f"adapter size: {self.adapter_mb:.1f} MB",
            f"base model memory footprint: {self.base_footprint_gb * 1000:.1f} MB"
            if self.base_footprint_gb < 1
            else f"base model memory footprint: {self.base_footprint_gb:.2f} GB",
        ]


def summarize(model: Any) -> ModelSummary:
    trainable = 0
    adapter_bytes = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
            adapter_bytes += p.numel() * p.element_size()
    _, total = model.get_nb_trainable_parameters()
    footprint = model.get_base_model().get_memory_footprint() if hasattr(model, "get_base_model") else 0
    return ModelSummary(trainable, int(total), adapter_bytes / 1e6, footprint / 1e9)
