"""Starting from an existing LoRA adapter (`lora.init_from`), and telling it apart from resuming.

Resume (`checkpoint.resume`) continues a run: its optimizer and scheduler state, its step, its place in
the data. `lora.init_from` starts a new run whose adapter begins with another adapter's weights (axolotl's
`lora_model_dir`, LLaMA-Factory's `adapter_name_or_path`): new optimizer, new schedule, step 0. The
adapter must have been trained on the same base model, with the recipe's rank, alpha and target
modules (its weights are loaded into the adapter the recipe builds): checked before the model loads
where the adapter's config says enough, and against the built adapter before training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError, RunDirError, UserError

log = logging.getLogger("qlora_sft")

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterSource:
    name: str  # as the recipe gives it
    config: dict[str, Any]
    weights: Path


def _local(path: str, base_dir: str | Path | None) -> Path | None:
    p = Path(path).expanduser()
    for cand in (p, (Path(base_dir) / p) if base_dir is not None and not p.is_absolute() else None):
        if cand is not None and cand.is_dir():
            return cand
    return None


def read_adapter(path: str, base_dir: str | Path | None = None) -> AdapterSource:
    """A peft adapter folder (local, or a hub id): its config and its weights file."""
    folder = _local(path, base_dir)
    if folder is not None:
        if not (folder / CONFIG).is_file():
            raise UserError(
                f"lora.init_from={path}: {folder} has no {CONFIG}, so it is not a peft adapter folder. Give the "
                "folder that holds adapter_config.json and adapter_model.safetensors (a run's final/ or checkpoint-N/)"
            )
        weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
        if weights is None:
            raise UserError(f"lora.init_from={path}: {folder} has {CONFIG} but no {' or '.join(WEIGHTS)}")
        return AdapterSource(path, read_config(folder / CONFIG, path), weights)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"lora.init_from={path}: folder not found (nor a hub id of the form org/name)")
    try:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(path, CONFIG))
        weights = Path(hf_hub_download(path, WEIGHTS[0]))
    except Exception as exc:
        raise UserError(
            f"lora.init_from={path}: not a local folder, and the hub adapter could not be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check the id, the network "
            "(HF_HUB_OFFLINE) and HF_TOKEN, or download it and give the folder"
        ) from None
    return AdapterSource(path, read_config(config_file, path), weights)


def read_config(file: Path, name: str) -> dict[str, Any]:
    """An adapter's adapter_config.json, as a mapping, or a UserError naming the file."""
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(
            f"lora.init_from={name}: {file} does not read as JSON ({str(exc).splitlines()[0]}); it is cut off or "
            "damaged. Give an intact adapter folder (a run's final/ or checkpoint-N/)"
        ) from None
    if not isinstance(config, dict):
        raise UserError(
            f"lora.init_from={name}: {file} holds a {type(config).__name__}, not an adapter's settings (a JSON "
            "mapping with r, lora_alpha, target_modules)"
        )
    return config


def check_weights(source: AdapterSource) -> None:
    """The adapter's weights as they were written: a folder qlora-sft published (its manifest.json)
    against its digests; any safetensors adapter for non-finite values."""
    from .checkpoint import MANIFEST, inspect_checkpoint, nonfinite_tensors

    name = f"lora.init_from={source.name}"
    folder = source.weights.parent
    if (folder / MANIFEST).is_file():
        info = inspect_checkpoint(folder, verify=True)
        if not info.complete:
            raise UserError(
                f"{name}: {folder} is not intact: {info.reason}. Start from another checkpoint of that run, or "
                "export that run's adapter again"
            )
        return
    if source.weights.suffix == ".safetensors":
        try:
            bad = nonfinite_tensors(source.weights)
        except Exception as exc:  # safetensors' own errors for a damaged file
            raise UserError(f"{name}: {source.weights} cannot be read ({str(exc).splitlines()[0]})") from None
        if bad:
            raise UserError(
                f"{name}: {source.weights} holds non-finite values ({', '.join(bad[:3])}): the run that wrote it "
                "diverged. Start from an earlier checkpoint of that run"
            )


def _same_model(a: str, b: str, base_dir: str | Path | None) -> bool:
    """The same base model, named by a hub id or a local folder (a local copy of `org/name` is
    usually a folder called `name`)."""
    if not a or not b or a == b:
        return True
    la, lb = _local(a, base_dir), _local(b, base_dir)
    if la is not None and lb is not None and la.resolve() == lb.resolve():
        return True
    return Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


def adapter_problems(source: AdapterSource, recipe: Any, base_dir: str | Path | None = None) -> list[str]:
    """What in the adapter's config does not match the recipe (before anything loads)."""
    cfg, lora, name = source.config, recipe.lora, f"lora.init_from={source.name}"
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"{name} is a {cfg.get('peft_type')} adapter; qlora-sft trains LoRA adapters")
    base = str(cfg.get("base_model_name_or_path") or "")
    if not _same_model(base, recipe.model.name_or_path, base_dir):
        problems.append(
            f"{name} was trained on {base}, but model.name_or_path is {recipe.model.name_or_path}. Set "
            f"model.name_or_path to {base} (or a local copy of it)"
        )
    numbers = {}  # r and lora_alpha where they are numbers (each one that is not is a problem of its own)
    for key, kind in (("r", int), ("lora_alpha", float)):
        value = cfg.get(key)
        try:
            if value is not None and (isinstance(value, bool) or kind(value) != float(value)):
                raise ValueError
        except (TypeError, ValueError):
            what = "a whole number" if kind is int else "a number"
            file = source.weights.parent / CONFIG
            problems.append(
                f"{name}: {file} has {key}={value!r}, which is not {what}; it is not a LoRA adapter's config"
            )
            continue
        numbers[key] = value
    if numbers.get("r") is not None and int(cfg["r"]) != lora.r:
        problems.append(f"{name} has rank r={cfg['r']}, the recipe lora.r={lora.r}. Set lora.r: {cfg['r']}")
    if numbers.get("lora_alpha") is not None and float(cfg["lora_alpha"]) != float(lora.alpha):
        problems.append(
            f"{name} was trained with lora_alpha={cfg['lora_alpha']}, the recipe has lora.alpha={lora.alpha:g} (the "
            f"adapter's update would be scaled differently). Set lora.alpha: {cfg['lora_alpha']}"
        )
    theirs = cfg.get("target_modules")
    if isinstance(lora.target_modules, list) and isinstance(theirs, list) and set(theirs) != set(lora.target_modules):
        problems.append(
            f"{name} adapts {sorted(theirs)}, the recipe's lora.target_modules are {sorted(lora.target_modules)}. Set "
            f"lora.target_modules: {sorted(theirs)}"
        )
    if sorted(cfg.get("modules_to_save") or []) != sorted(lora.modules_to_save or []):
        problems.append(
            f"{name} trains modules_to_save {cfg.get('modules_to_save') or []} in full, the recipe's "
            f"lora.modules_to_save are {lora.modules_to_save or []}; set them alike"
        )
    if cfg.get("use_dora"):
        problems.append(f"{name} is a DoRA adapter; qlora-sft trains plain LoRA")
    return problems


def check_before_loading(recipe: Any, base_dir: str | Path | None = None) -> AdapterSource | None:
    """Before any model loads: `checkpoint.resume` names a checkpoint, not an adapter; the adapter of
    `lora.init_from` exists and matches the recipe. Returns the adapter, if any. (`train` runs the
    two apart: the adapter's check reads all of it, once, and only where no checkpoint is resumed.)"""
    check_resume_is_no_adapter(recipe)
    return check_init_from(recipe, base_dir)


def check_resume_is_no_adapter(recipe: Any) -> None:
    """`checkpoint.resume` names a checkpoint, not an adapter folder (which `lora.init_from` takes)."""
    resume = recipe.checkpoint.resume
    if resume not in ("auto", "never"):
        p = Path(resume)
        if p.is_dir() and (p / CONFIG).is_file() and not (p / "trainer_state.json").is_file():
            raise RunDirError(
                f"checkpoint.resume={resume} is an adapter ({CONFIG}, no trainer_state.json), not a checkpoint. "
                "Resume continues a run from its checkpoint-N folder (optimizer, schedule, step, data position). "
                f"To start a new run from this adapter's weights, set lora.init_from: {resume} and leave "
                "checkpoint.resume: auto"
            )


def check_init_from(recipe: Any, base_dir: str | Path | None = None) -> AdapterSource | None:
    """The adapter of `lora.init_from` exists, matches the recipe and is intact (its digests and finite
    values: every byte of it is read). Returns the adapter, if any."""
    if not recipe.lora.init_from:
        return None
    source = read_adapter(recipe.lora.init_from, base_dir)
    problems = adapter_problems(source, recipe, base_dir)
    if problems:
        raise RecipeError(problems, recipe.source)
    check_weights(source)
    return source


def load_weights(peft_model: Any, recipe: Any, base_dir: str | Path | None = None) -> int:
    """Put the `lora.init_from` adapter's weights into the adapter the recipe built (same modules,
    same shapes, or a clear error). Ranks whose weights are not materialised (meta, under FSDP/ZeRO-3)
    load nothing: rank 0's weights reach them when the model is sharded. Returns the tensors loaded."""
    if not recipe.lora.init_from:
        return 0
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    source = read_adapter(recipe.lora.init_from, base_dir)
    name = f"lora.init_from={source.name}"
    mine = set(peft_model.peft_config["default"].target_modules or [])
    theirs = source.config.get("target_modules")
    if isinstance(theirs, list) and mine and set(theirs) != mine:
        raise RecipeError(
            [
                f"{name} adapts {sorted(theirs)}, the recipe's lora.target_modules={recipe.lora.target_modules!r} "
                f"resolves to {sorted(mine)}. Set lora.target_modules: {sorted(theirs)}"
            ],
            recipe.source,
        )
    if source.weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(source.weights))
    else:
        import torch

        state = torch.load(source.weights, map_location="cpu", weights_only=True)
    expected = get_peft_model_state_dict(peft_model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("not in this model", unexpected), ("other shapes", sorted(wrong)))
            if keys
        )
        raise UserError(
            f"{name}: its weights do not fit the adapter this recipe builds on {recipe.model.name_or_path} ({detail}). "
            "Use the base model, lora.r and lora.target_modules it was trained with"
        )
    if any(p.device.type == "meta" for n, p in peft_model.named_parameters() if "lora_" in n):
        return 0
    set_peft_model_state_dict(peft_model, state)
    log.info("lora: started from the adapter %s (%d tensors; new optimizer, step 0)", source.name, len(state))
    return len(state)
