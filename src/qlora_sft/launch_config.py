"""The launch config files a user brings: a DeepSpeed JSON (axolotl's `deepspeed_configs/*.json`,
LLaMA-Factory's `examples/deepspeed/*.json`, the bundled `configs/deepspeed/`) and an accelerate
YAML (`accelerate config`'s output, LLaMA-Factory's `examples/accelerate/*.yaml`, the bundled
`configs/accelerate/`). Each is read fully, the same way whether `plan` reads the file or a rank
reads what `accelerate launch` made of it, and checked against the recipe before anything loads:

- a setting that works with QLoRA is honoured (accelerate, transformers or DeepSpeed apply it; `plan`
  models it where it changes memory);
- a setting that breaks QLoRA, or that contradicts the recipe, is refused with the reason and the fix,
  naming both the file's key and the recipe's;
- a setting that has no effect here (a TPU key, an FSDP2 key under FSDP1, a key accelerate does not
  know) is reported as a note, never dropped in silence.

A relative path resolves against the file that names it (a DeepSpeed JSON named by an accelerate
YAML: the YAML's folder); a path on the command line, against the working directory.

`python -m qlora_sft.launch_config deepspeed FILE` is the launch scripts' check of a DeepSpeed JSON
named with `--deepspeed` (readable, deepspeed installed): it prints the file's absolute path;
`... accelerate-args CONFIG` prints what `accelerate launch` needs besides `--config_file CONFIG` to
read that config as qlora-sft does (a DeepSpeed file named relative to the YAML).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

DEEPSPEED_INSTALL = "pip install 'qlora-sft[deepspeed]'"

# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def resolve_path(path: str | os.PathLike[str], named_by: str | os.PathLike[str] | None = None) -> Path:
    """A path as a file names it: absolute as is; relative to the folder of the file `named_by`;
    then (what accelerate itself does) relative to the working directory. Returns the first that
    exists, else the path relative to `named_by` (for the error message)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    candidates = []
    if named_by is not None:
        candidates.append(Path(named_by).resolve().parent / p)
        bundled = _bundled_root(Path(named_by))
        if bundled is not None:
            candidates.append(bundled / p)  # the bundled configs name `configs/deepspeed/X.json`
    candidates.append(Path.cwd() / p)
    return next((c for c in candidates if c.exists()), candidates[0]).resolve()


def _bundled_root(named_by: Path) -> Path | None:
    """The folder above `configs/` when `named_by` is one of the bundled accelerate configs."""
    # (plan.configs_dir's rule, without importing torch: the launch scripts call this module)
    here = Path(__file__).resolve().parent
    configs = here / "configs" if (here / "configs" / "accelerate").is_dir() else here.parents[1] / "configs"
    try:
        named_by.resolve().relative_to(configs.resolve())
    except ValueError:
        return None
    return configs.resolve().parent


# --------------------------------------------------------------------------------------------
# DeepSpeed JSON
# --------------------------------------------------------------------------------------------


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed(what: str) -> None:
    """One line, before anything loads: DeepSpeed was asked for and is not installed."""
    if not deepspeed_installed():
        raise UserError(f"{what} asks for DeepSpeed, which is not installed: {DEEPSPEED_INSTALL}")


def _value(section: Mapping[str, Any], *names: str) -> Any:
    """The first of `names` present (DeepSpeed accepts `stage3_X` and `X` for ZeRO-3 keys)."""
    for name in names:
        if name in section:
            return section[name]
    return None


@dataclass(frozen=True)
class DeepSpeedConfig:
    """A DeepSpeed config as training will see it (values are the file's: "auto", a number, absent)."""

    path: Path
    raw: Mapping[str, Any]
    stage: int
    offload_param: str = "none"  # none | cpu | nvme
    offload_optimizer: str = "none"
    from_accelerate_yaml: bool = False  # built by accelerate from a YAML's deepspeed_config keys

    @property
    def zero(self) -> Mapping[str, Any]:
        return self.raw.get("zero_optimization") or {}

    @property
    def offload(self) -> bool:
        return self.offload_param != "none" or self.offload_optimizer != "none"

    @property
    def leaf_modules(self) -> dict[str, list[str]]:
        """ZeRO-3's `zero_optimization.leaf_module` (`classes`, `names`, `name_suffixes`): the modules
        gathered whole when they start, with no hooks on the modules inside them; {} when unset.
        A string stands for a list of one, as DeepSpeed reads it."""
        raw = self.zero.get("leaf_module") if self.stage == 3 else None
        if not isinstance(raw, Mapping):
            return {}
        found = {}
        for key in ("classes", "names", "name_suffixes"):
            value = raw.get(key)
            if value is None:
                continue
            found[key] = [value] if isinstance(value, str) else [str(v) for v in value]
        return {k: v for k, v in found.items() if v}

    def enabled(self, precision: str) -> Any:
        """`bf16`/`fp16` `enabled`: True, False, "auto", or None when the section is absent."""
        section = self.raw.get(precision)
        if precision == "bf16" and section is None:
            section = self.raw.get("bfloat16")  # DeepSpeed's older name
        return (section or {}).get("enabled", False if section is not None else None)

    def gathers_16bit_weights(self) -> bool:
        return bool(
            _value(self.zero, "stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save")
        )

    def describe(self) -> str:
        auto = sorted(k for k, v in self.raw.items() if v == "auto") + sorted(
            f"zero_optimization.{k}" for k, v in self.zero.items() if v == "auto"
        )
        precision = ", ".join(
            f"{p} {json.dumps(self.enabled(p))}" for p in ("bf16", "fp16") if self.enabled(p) is not None
        )
        parts = [f"ZeRO-{self.stage}"]
        if self.offload:
            parts.append(f"offload params {self.offload_param}, optimizer {self.offload_optimizer}")
        if precision:
            parts.append(precision)
        if auto:
            parts.append(f"filled from the recipe: {', '.join(auto)}")
        return f"{self.path.name}: " + "; ".join(parts)


def is_accelerate_json(path: Path) -> bool:
    """A .json that `accelerate config` wrote (accelerate reads JSON configs too): it has
    distributed_type and no zero_optimization. Anything else is read as a DeepSpeed JSON."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "distributed_type" in raw and "zero_optimization" not in raw


def _json_hint(text: str) -> str:
    """What usually makes a hand-edited JSON file invalid, said where the text shows it (DeepSpeed's
    and transformers' readers refuse it too, so the file is not read leniently here either)."""
    if text.startswith("\ufeff"):
        return ". It begins with a byte-order mark (BOM): save it as UTF-8 without one"
    if re.search(r"^\s*(//|/\*|#)", text, re.M):
        return ". JSON has no comments: remove the // or /* */ or # lines"
    if re.search(r",\s*[}\]]", text):
        return ". JSON allows no comma before a closing } or ]: remove the trailing comma"
    return ""


def read_deepspeed(path: str | os.PathLike[str], named_by: str | os.PathLike[str] | None = None) -> DeepSpeedConfig:
    """Read a DeepSpeed JSON (no deepspeed package needed). `named_by`: the file that names it."""
    fp = resolve_path(path, named_by)
    where = f" (named by {named_by})" if named_by else ""
    if not fp.is_file():
        raise UserError(f"DeepSpeed config {path} not found{where}: looked for {fp}")
    try:
        text = fp.read_text(encoding="utf-8")
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        hint = _json_hint(text) if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"DeepSpeed config {fp} is not valid JSON: {exc}{hint}") from None
    if not isinstance(raw, dict):
        raise UserError(f"DeepSpeed config {fp}: the top level must be a JSON object")
    zero = raw.get("zero_optimization")
    if "distributed_type" in raw and zero is None:
        raise UserError(
            f"{fp} is an accelerate config (distributed_type), not a DeepSpeed config: give it where an accelerate "
            "config goes (plan --config, accelerate launch --config_file; ACCELERATE_CONFIG takes it saved as .yaml)"
        )
    if not isinstance(zero, dict) or "stage" not in zero:
        raise UserError(
            f"DeepSpeed config {fp} has no zero_optimization.stage; accelerate needs it. Add "
            '"zero_optimization": {"stage": 2} (or 3), as in configs/deepspeed/zero2.json'
        )
    stage = zero["stage"]
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config {fp}: zero_optimization.stage is {stage!r}; expected 0, 1, 2 or 3")
    _check_deepspeed_shapes(fp, raw)
    return DeepSpeedConfig(
        fp,
        raw,
        stage,
        offload_param=str((zero.get("offload_param") or {}).get("device", "none")).lower(),
        offload_optimizer=str((zero.get("offload_optimizer") or {}).get("device", "none")).lower(),
    )


# Sections a DeepSpeed JSON holds as objects, and values it holds as numbers (or "auto", which the
# HF integration fills from the recipe): another shape stopped plan with a traceback (`"bf16": true`,
# `"offload_param": "cpu"`, `"gradient_clipping": "abc"`) or was called a mismatch with itself
# (`"train_micro_batch_size_per_gpu": "2"`: "is 2 but the recipe's micro batch is 2").
_DS_OBJECTS = (
    "bf16",
    "bfloat16",
    "fp16",
    "optimizer",
    "scheduler",
    "zero_optimization.offload_param",
    "zero_optimization.offload_optimizer",
    "optimizer.params",
)
_DS_WHOLE = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_DS_NUMBERS = ("gradient_clipping", "optimizer.params.lr", "optimizer.params.weight_decay")


def _dotted(raw: Mapping[str, Any], dotted: str) -> Any:
    value: Any = raw
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _check_deepspeed_shapes(fp: Path, raw: Mapping[str, Any]) -> None:
    for key in _DS_OBJECTS:
        value = _dotted(raw, key)
        if value is not None and not isinstance(value, Mapping):
            example = '{"device": "cpu"}' if key.startswith("zero_") else '{"enabled": "auto"}'
            if key.startswith(("optimizer", "scheduler")):
                example = '{"type": "AdamW", "params": {"lr": "auto"}}'
            raise UserError(
                f"DeepSpeed config {fp}: `{key}` is {json.dumps(value)}; DeepSpeed reads an object there, e.g. "
                f'"{key.rsplit(".", 1)[-1]}": {example}'
            )
    for key in (*_DS_WHOLE, *_DS_NUMBERS):
        value = _dotted(raw, key)
        if value is None or value == "auto":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in _DS_WHOLE:
            number = number and float(value).is_integer() and value > 0
        if not number:
            what = "a whole number, 1 or more" if key in _DS_WHOLE else "a number"
            raise UserError(
                f"DeepSpeed config {fp}: `{key}` is {json.dumps(value)}; DeepSpeed reads {what} there (no quotes), or "
                '"auto" (filled from the recipe)'
            )


def deepspeed_from_accelerate(ds: Mapping[str, Any], source: Path) -> DeepSpeedConfig:
    """The config accelerate builds from a YAML's `deepspeed_config:` keys without a JSON file
    (accelerate's own defaults where a key is absent)."""
    zero: dict[str, Any] = {
        "stage": int(ds.get("zero_stage", 2) or 0),
        "offload_optimizer": {"device": str(ds.get("offload_optimizer_device", "none") or "none")},
        "offload_param": {"device": str(ds.get("offload_param_device", "none") or "none")},
        "stage3_gather_16bit_weights_on_model_save": bool(ds.get("zero3_save_16bit_model", False)),
    }
    raw: dict[str, Any] = {
        "zero_optimization": zero,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": ds.get("gradient_accumulation_steps", "auto"),
    }
    if ds.get("gradient_clipping") is not None:
        raw["gradient_clipping"] = ds["gradient_clipping"]
    return DeepSpeedConfig(
        source,
        raw,
        zero["stage"],
        offload_param=zero["offload_param"]["device"].lower(),
        offload_optimizer=zero["offload_optimizer"]["device"].lower(),
        from_accelerate_yaml=True,
    )


def _fixed(value: Any) -> bool:
    return value is not None and value != "auto"


def _whole_number(value: Any) -> bool:
    """A number DeepSpeed's config reads into a whole number >= 0 (an int, a float without a fraction,
    a string of digits), or "auto", which it drops for its default."""
    if value == "auto" or isinstance(value, bool):
        return True
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return False
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    return isinstance(value, int) and value >= 0


def deepspeed_problems(
    ds: DeepSpeedConfig,
    recipe: Any,
    *,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
    global_batch: int | None = None,
    compute_dtype: str | None = None,
) -> list[str]:
    """What in a DeepSpeed config contradicts the recipe or breaks QLoRA training. Batch values are
    checked where they are known (the accumulation needs the world size); `compute_dtype` is the
    resolved one (bfloat16/float16/float32), or None while the recipe's `auto` is unresolved."""
    args = recipe.train.args
    name = f"{ds.path}" if not ds.from_accelerate_yaml else f"{ds.path} (deepspeed_config)"
    problems: list[str] = []

    def key(k: str) -> str:
        return f"`{k}`" if not ds.from_accelerate_yaml else f"`{_ACCELERATE_DS_KEYS.get(k, k)}`"

    leaf = ds.zero.get("leaf_module")
    if leaf is not None and (
        not isinstance(leaf, Mapping)
        or set(leaf) - {"classes", "names", "name_suffixes"}
        or not all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)) for v in leaf.values()
        )
    ):
        problems.append(
            f"{name}: `zero_optimization.leaf_module` is {json.dumps(leaf)}; DeepSpeed reads an object whose keys "
            '"classes", "names" and "name_suffixes" each hold a list of strings, e.g. '
            '{"classes": ["LlamaDecoderLayer"]}.'
        )
    elif leaf is not None:
        empty = [k for k, v in ds.leaf_modules.items() if k != "classes" and "" in v]
        if empty:
            problems.append(
                f"{name}: `zero_optimization.leaf_module.{empty[0]}` holds an empty string, which DeepSpeed matches "
                "against the whole model (names) or every module (name_suffixes): it would gather all weights at "
                "once. Remove it."
            )
        version = _installed_version("deepspeed")
        if version is not None and version < (0, 18):
            problems.append(
                f"{name}: `zero_optimization.leaf_module` needs DeepSpeed 0.18 or later (installed: "
                f"{'.'.join(map(str, version))}). Upgrade DeepSpeed, or remove the key: qlora-sft makes the decoder "
                "layers leaf modules itself (QLORA_SFT_ZERO3_UNITS=layers, the default)."
            )
    for limit in ("stage3_max_live_parameters", "stage3_max_reuse_distance"):
        value = ds.zero.get(limit, "auto")
        if not _whole_number(value):
            problems.append(
                f"{name}: `zero_optimization.{limit}` is {json.dumps(value)}; DeepSpeed reads a whole number of "
                'parameters, 0 or more (e.g. 1000000000, its default), or "auto" for its default. Fix it there.'
            )
    micro = micro_batch if micro_batch is not None else args.get("per_device_train_batch_size")
    value = ds.raw.get("train_micro_batch_size_per_gpu")
    if _fixed(value) and micro is not None and value != micro:
        problems.append(
            f"{name}: {key('train_micro_batch_size_per_gpu')} is {value} but the recipe's micro batch "
            f'(train.per_device_train_batch_size) is {micro}. Set it to "auto" (the recipe fills it in).'
        )
    value = ds.raw.get("gradient_accumulation_steps")
    if grad_accum is not None and value is None:
        value = 1  # accelerate's value when the key is absent
    if _fixed(value) and grad_accum is not None and value != grad_accum:
        absent = "" if "gradient_accumulation_steps" in ds.raw else " (absent: accelerate uses 1)"
        problems.append(
            f"{name}: {key('gradient_accumulation_steps')} is {value}{absent} but the recipe needs "
            f'{grad_accum} (train.global_batch_size / micro batch / processes). Set it to "auto".'
        )
    value = ds.raw.get("train_batch_size")
    gbs = global_batch if global_batch is not None else recipe.train.global_batch_size
    if _fixed(value) and gbs is not None and value != gbs:
        problems.append(
            f"{name}: {key('train_batch_size')} is {value} but the recipe's global batch "
            f'(train.global_batch_size) is {gbs}. Set it to "auto".'
        )
    value = ds.raw.get("gradient_clipping")
    norm = args.get("max_grad_norm", 1.0)
    if _fixed(value) and float(value) != float(norm):
        problems.append(
            f"{name}: {key('gradient_clipping')} is {value} but train.max_grad_norm is {norm:g}. Set it to "
            '"auto" (or set train.max_grad_norm to the value you want).'
        )
    bf16, fp16 = ds.enabled("bf16"), ds.enabled("fp16")
    if bf16 is True and fp16 is True:
        problems.append(f'{name}: `bf16.enabled` and `fp16.enabled` are both true; set both to "auto"')
    for flag, want in ((bf16, "bfloat16"), (fp16, "float16")):
        if flag is True and compute_dtype is not None and compute_dtype != want:
            section = "bf16" if want == "bfloat16" else "fp16"
            problems.append(
                f"{name}: `{section}.enabled` is true but the recipe computes in {compute_dtype} "
                f'({_dtype_key(recipe)}). Set `{section}.enabled` to "auto" (the recipe decides), or set '
                f"{_dtype_key(recipe)}: {want}."
            )
    if ds.stage == 3 and not ds.gathers_16bit_weights():
        problems.append(
            f"{name}: ZeRO-3 without {key('stage3_gather_16bit_weights_on_model_save')}: true saves an empty "
            "adapter (each rank holds only a partition of the LoRA weights; the Trainer then writes none). "
            "Set it to true."
        )
    optimizer = ds.raw.get("optimizer")
    if optimizer:
        if "optim" in args:
            problems.append(
                f"{name}: has an `optimizer` section ({optimizer.get('type')}) and the recipe sets train.optim="
                f"{args['optim']}; DeepSpeed's would win. Remove one of them."
            )
        params = optimizer.get("params") or {}
        for ds_key, recipe_key, default in (("lr", "learning_rate", None), ("weight_decay", "weight_decay", 0.0)):
            mine = args.get(recipe_key, default)
            if _fixed(params.get(ds_key)) and mine is not None and float(params[ds_key]) != float(mine):
                problems.append(
                    f"{name}: `optimizer.params.{ds_key}` is {params[ds_key]} but train.{recipe_key} is {mine:g}. "
                    'Set it to "auto".'
                )
        # transformers compares these too, and refuses a mismatch only in trainer.train(), the model loaded
        betas = params.get("betas")
        mine_betas = [args.get("adam_beta1", 0.9), args.get("adam_beta2", 0.999)]
        if _fixed(betas) and betas != mine_betas:
            problems.append(
                f"{name}: `optimizer.params.betas` is {json.dumps(betas)} but train.adam_beta1, train.adam_beta2 are "
                f'{json.dumps(mine_betas)}. Set it to "auto" (or set train.adam_beta1 and train.adam_beta2).'
            )
        eps, mine_eps = params.get("eps"), args.get("adam_epsilon", 1e-8)
        if _fixed(eps) and eps != mine_eps:
            problems.append(
                f"{name}: `optimizer.params.eps` is {eps} but train.adam_epsilon is {mine_eps:g}. Set it to "
                '"auto" (or set train.adam_epsilon).'
            )
    elif ds.offload_optimizer != "none" and ds.raw.get("zero_force_ds_cpu_optimizer", True) is not False:
        problems.append(
            f"{name}: offloads the optimizer ({ds.offload_optimizer}) without an `optimizer` section, so the "
            "Trainer's optimizer is handed to DeepSpeed, which refuses it under ZeRO-Offload unless "
            '"zero_force_ds_cpu_optimizer": false (as configs/deepspeed/zero3_offload.json). Add that key, or an '
            '"optimizer" section with "type": "AdamW" and "auto" params.'
        )
    if ds.raw.get("scheduler") and "lr_scheduler_type" in args:
        problems.append(
            f"{name}: has a `scheduler` section and the recipe sets train.lr_scheduler_type="
            f"{args['lr_scheduler_type']}; DeepSpeed's would win. Remove one of them."
        )
    peak = _dotted(ds.raw, "scheduler.params.warmup_max_lr")
    lr = args.get("learning_rate")
    if _fixed(peak) and lr is not None and peak != lr:
        problems.append(
            f"{name}: `scheduler.params.warmup_max_lr` is {peak} but train.learning_rate is {lr:g}; transformers "
            'refuses the two once the model has loaded. Set it to "auto".'
        )
    problems += _scheduler_step_problems(name, ds.raw, args)
    return problems


def _scheduler_step_problems(name: str, raw: Mapping[str, Any], args: Mapping[str, Any]) -> list[str]:
    """`scheduler.params.total_num_steps` and `warmup_num_steps` against the recipe's step count and
    train.warmup_steps. transformers compares them (trainer_config_finalize: the step count, and
    max(1, the warmup it computes)) only in trainer.train(), after the model has loaded. With
    train.max_steps the counts are known here; counted in epochs the step count depends on the data."""
    import math

    problems: list[str] = []
    max_steps = args.get("max_steps", -1)
    total = int(max_steps) if isinstance(max_steps, int | float) and max_steps > 0 else None
    epochs = f"train.num_train_epochs ({args.get('num_train_epochs', 3.0):g}, no train.max_steps)"
    after = "transformers refuses any other number once the model has loaded"

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    value = _dotted(raw, "scheduler.params.total_num_steps")
    if _fixed(value) and total is None:
        problems.append(
            f"{name}: `scheduler.params.total_num_steps` is {json.dumps(value)}, but the recipe trains for {epochs}: "
            f"the step count depends on the data (its rows, the batch, packing) and is known only when training "
            f'starts, and {after}. Set it to "auto" (filled in with the step count), or set train.max_steps.'
        )
    elif _fixed(value) and not (number(value) and value == total):
        problems.append(
            f"{name}: `scheduler.params.total_num_steps` is {json.dumps(value)} but train.max_steps is {total}; "
            f'{after}. Set it to "auto" (filled in with train.max_steps).'
        )
    value = _dotted(raw, "scheduler.params.warmup_num_steps")
    setting = args.get("warmup_steps", 0) or 0
    warmup = float(setting) if number(setting) else 0.0
    if not _fixed(value):
        return problems
    if 0 < warmup < 1 and total is None:
        problems.append(
            f"{name}: `scheduler.params.warmup_num_steps` is {json.dumps(value)}, but train.warmup_steps {warmup:g} "
            f"is a fraction of the training steps, and the recipe trains for {epochs}: the step count depends on the "
            f'data and is known only when training starts, and {after}. Set it to "auto" (or give train.warmup_steps '
            "as a number of steps, or set train.max_steps)."
        )
        return problems
    # transformers' TrainingArguments.get_warmup_steps, kept >= 1 (DeepSpeed 0.19.6 refuses a warmup of 0 steps)
    steps = int(warmup) if warmup >= 1 else math.ceil((total or 0) * warmup)
    want = max(1, steps)
    if not (number(value) and value == want):
        how = f"train.warmup_steps: {warmup:g}"
        if 0 < warmup < 1:
            how += f" of train.max_steps {total}"
        elif steps < 1:
            how += "; transformers fills in at least 1, as DeepSpeed refuses 0"
        problems.append(
            f"{name}: `scheduler.params.warmup_num_steps` is {json.dumps(value)} but the recipe warms up for {want} "
            f'step{"s" if want != 1 else ""} ({how}); {after}. Set it to "auto" (or set train.warmup_steps).'
        )
    return problems


def deepspeed_notes(ds: DeepSpeedConfig, recipe: Any) -> list[str]:
    """What a DeepSpeed config changes that is worth knowing (nothing here is an error)."""
    notes = []
    if ds.raw.get("optimizer") and "optim" not in recipe.train.args:
        notes.append(
            f"{ds.path.name}: DeepSpeed's optimizer ({ds.raw['optimizer'].get('type')}) is used instead of "
            "the default train.optim"
        )
    if ds.raw.get("scheduler"):
        notes.append(
            f"{ds.path.name}: DeepSpeed's scheduler ({ds.raw['scheduler'].get('type')}) sets the learning rate"
        )
    for precision in ("bf16", "fp16"):
        if ds.enabled(precision) is True and _compute_setting(recipe) == "auto":
            notes.append(
                f"{ds.path.name}: `{precision}.enabled` is true: the recipe's compute dtype (auto) must resolve to "
                f"{'bfloat16' if precision == 'bf16' else 'float16'} on the GPUs that run it (checked at launch)"
            )
    if ds.leaf_modules:
        notes.append(
            f"{ds.path.name}: zero_optimization.leaf_module: DeepSpeed gathers these modules whole; qlora-sft's "
            "own leaves, the decoder layers (QLORA_SFT_ZERO3_UNITS=layers, the default), are what switch on the "
            "fused LoRA layer and activation offloading (docs/larger-models.md)"
        )
    return notes


# accelerate YAML `deepspeed_config:` keys and what they set in the DeepSpeed config
_ACCELERATE_DS_KEYS = {
    "gradient_accumulation_steps": "deepspeed_config.gradient_accumulation_steps",
    "gradient_clipping": "deepspeed_config.gradient_clipping",
    "stage3_gather_16bit_weights_on_model_save": "deepspeed_config.zero3_save_16bit_model",
    "train_micro_batch_size_per_gpu": "train_micro_batch_size_per_gpu",
    "train_batch_size": "train_batch_size",
}


def _installed_version(package: str) -> tuple[int, ...] | None:
    """The installed version's leading numbers, e.g. (0, 19, 8); None where it is not installed."""
    import importlib.metadata
    import re

    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _compute_setting(recipe: Any) -> str:
    q = recipe.quantization
    return q.compute_dtype if q.method != "none" else recipe.model.dtype


def _dtype_key(recipe: Any) -> str:
    return "quantization.compute_dtype" if recipe.quantization.method != "none" else "model.dtype"


# --------------------------------------------------------------------------------------------
# accelerate YAML
# --------------------------------------------------------------------------------------------

# Keys of an accelerate config that decide where processes start; accelerate applies them itself.
LAUNCH_KEYS = frozenset(
    {
        "compute_environment",
        "distributed_type",
        "num_processes",
        "num_machines",
        "machine_rank",
        "main_process_ip",
        "main_process_port",
        "rdzv_backend",
        "same_network",
        "gpu_ids",
        "use_cpu",
        "debug",
        "enable_cpu_affinity",
        "main_training_function",
        "mixed_precision",
        "fsdp_config",
        "deepspeed_config",
        "mpirun_config",
    }
)
# Keys for TPUs (accelerate ignores them on GPUs); a note when they are set to something.
TPU_KEYS = frozenset(
    {
        "downcast_bf16",
        "tpu_name",
        "tpu_zone",
        "tpu_use_cluster",
        "tpu_use_sudo",
        "tpu_env",
        "tpu_vm",
        "command_file",
        "commands",
    }
)
# Every top-level key accelerate's reader of `--config_file` accepts (its ClusterConfig fields, plus
# `fp16` and `dynamo_backend`, which it converts); any other key makes `accelerate launch` refuse the
# file ("had unknown keys"). A test holds this to the installed accelerate.
CONVERTED_KEYS = frozenset({"fp16", "dynamo_backend"})
ACCELERATE_KEYS = LAUNCH_KEYS | TPU_KEYS | {"fp8_config", "megatron_lm_config", "parallelism_config", "dynamo_config"}
ACCELERATE_KEYS |= CONVERTED_KEYS


def accelerate_keys() -> set[str]:
    """The top-level keys the installed accelerate reads (another version may know others); the list
    above where accelerate's config classes cannot be imported."""
    import dataclasses

    try:
        from accelerate.commands.config.config_args import ClusterConfig
    except ImportError:
        return set(ACCELERATE_KEYS)
    return {f.name for f in dataclasses.fields(ClusterConfig)} | CONVERTED_KEYS


CUDA_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
# FSDP keys accelerate knows (fsdp_config:, each with its `fsdp_` prefix)
FSDP_KEYS = frozenset(
    {
        "fsdp_version",
        "fsdp_auto_wrap_policy",
        "fsdp_transformer_layer_cls_to_wrap",
        "fsdp_min_num_params",
        "fsdp_backward_prefetch",
        "fsdp_forward_prefetch",
        "fsdp_offload_params",
        "fsdp_sharding_strategy",
        "fsdp_reshard_after_forward",
        "fsdp_state_dict_type",
        "fsdp_sync_module_states",
        "fsdp_cpu_ram_efficient_loading",
        "fsdp_use_orig_params",
        "fsdp_activation_checkpointing",
        "fsdp_activation_checkpointing_offload",
        "fsdp_ignored_modules",
        "fsdp_cpu_offload_pin_memory",
    }
)
DEEPSPEED_YAML_KEYS = frozenset(
    {
        "deepspeed_config_file",
        "zero_stage",
        "offload_optimizer_device",
        "offload_param_device",
        "offload_optimizer_nvme_path",
        "offload_param_nvme_path",
        "zero3_init_flag",
        "zero3_save_16bit_model",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "deepspeed_multinode_launcher",
        "deepspeed_hostfile",
        "deepspeed_exclusion_filter",
        "deepspeed_inclusion_filter",
        "deepspeed_moe_layer_cls_names",
    }
)
# with deepspeed_config_file, accelerate refuses these in the YAML (they belong in the JSON)
DEEPSPEED_FILE_EXCLUSIVE = (
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
)


def _bool(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _choice(value: Any, choices: tuple[str, ...], default: str) -> str:
    """A strategy name from its name or accelerate's 1-based number."""
    if value is None:
        return default
    text = str(value).strip().upper()
    if text.isdecimal() and 1 <= int(text) <= len(choices):
        return choices[int(text) - 1]
    return text


@dataclass(frozen=True)
class FsdpSettings:
    """An FSDP launch as accelerate sets it up (defaults: `accelerate launch`'s, for absent keys)."""

    version: int = 1
    sharding_strategy: str = "FULL_SHARD"
    offload_params: bool = False
    auto_wrap_policy: str | None = None  # None: not set (peft's policy, as for every PEFT model)
    transformer_layer_cls_to_wrap: tuple[str, ...] = ()
    backward_prefetch: str = "NO_PREFETCH"
    forward_prefetch: bool = False
    use_orig_params: bool = True
    state_dict_type: str = "FULL_STATE_DICT"
    sync_module_states: bool = True
    cpu_ram_efficient_loading: bool = True
    activation_checkpointing: bool = False
    ignored_modules: str | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def from_yaml(cls, fs: Mapping[str, Any], source: str = "") -> FsdpSettings:
        """From an accelerate YAML's `fsdp_config:` (keys with or without the `fsdp_` prefix)."""
        fs = {(k if str(k).startswith("fsdp_") else f"fsdp_{k}"): v for k, v in (fs or {}).items()}
        notes = [
            f"{source}: fsdp_config.{k} is not an accelerate FSDP setting; accelerate ignores it"
            for k in sorted(set(fs) - FSDP_KEYS)
        ]
        version = int(fs.get("fsdp_version", 1) or 1)
        if version == 1 and "fsdp_reshard_after_forward" in fs:
            notes.append(
                f"{source}: fsdp_config.fsdp_reshard_after_forward applies to FSDP2; under FSDP1 accelerate uses "
                f"fsdp_sharding_strategy ({fs.get('fsdp_sharding_strategy', 'FULL_SHARD')})"
            )
        if version == 1 and "fsdp_cpu_offload_pin_memory" in fs:
            notes.append(f"{source}: fsdp_config.fsdp_cpu_offload_pin_memory applies to FSDP2; FSDP1 ignores it")
        if "fsdp_min_num_params" in fs and str(fs.get("fsdp_auto_wrap_policy", "")).upper() != "SIZE_BASED_WRAP":
            notes.append(f"{source}: fsdp_config.fsdp_min_num_params applies to SIZE_BASED_WRAP only; ignored")
        return cls._build(lambda k: fs.get(f"fsdp_{k}"), notes)

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> FsdpSettings:
        """From the FSDP_* variables `accelerate launch` gives each rank."""
        names = {
            "version": "VERSION",
            "sharding_strategy": "SHARDING_STRATEGY",
            "offload_params": "OFFLOAD_PARAMS",
            "auto_wrap_policy": "AUTO_WRAP_POLICY",
            "transformer_layer_cls_to_wrap": "TRANSFORMER_CLS_TO_WRAP",
            "backward_prefetch": "BACKWARD_PREFETCH",
            "forward_prefetch": "FORWARD_PREFETCH",
            "use_orig_params": "USE_ORIG_PARAMS",
            "state_dict_type": "STATE_DICT_TYPE",
            "sync_module_states": "SYNC_MODULE_STATES",
            "cpu_ram_efficient_loading": "CPU_RAM_EFFICIENT_LOADING",
            "activation_checkpointing": "ACTIVATION_CHECKPOINTING",
            "ignored_modules": "IGNORED_MODULES",
        }
        return cls._build(lambda k: env.get(f"FSDP_{names[k]}") or None, [])

    @classmethod
    def _build(cls, get: Any, notes: list[str]) -> FsdpSettings:
        layers = get("transformer_layer_cls_to_wrap")
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        wrap = get("auto_wrap_policy")
        return cls(
            version=int(get("version") or 1),
            sharding_strategy=_choice(get("sharding_strategy"), SHARDING_STRATEGIES, "FULL_SHARD"),
            offload_params=_bool(get("offload_params"), False),
            auto_wrap_policy=str(wrap).upper() if wrap else None,
            transformer_layer_cls_to_wrap=tuple(layers or ()),
            backward_prefetch=_choice(get("backward_prefetch"), BACKWARD_PREFETCH, "NO_PREFETCH"),
            forward_prefetch=_bool(get("forward_prefetch"), False),
            use_orig_params=_bool(get("use_orig_params"), True),
            state_dict_type=str(get("state_dict_type") or "FULL_STATE_DICT").upper(),
            sync_module_states=_bool(get("sync_module_states"), True),
            cpu_ram_efficient_loading=_bool(get("cpu_ram_efficient_loading"), True),
            activation_checkpointing=_bool(get("activation_checkpointing"), False),
            ignored_modules=get("ignored_modules"),
            notes=tuple(notes),
        )

    @property
    def prefetches(self) -> bool:
        """Does FSDP gather the next unit while one computes?"""
        return self.backward_prefetch != "NO_PREFETCH" or self.forward_prefetch

    @property
    def reshards_after_forward(self) -> bool:
        """FULL_SHARD and HYBRID_SHARD free gathered weights after each unit's forward; SHARD_GRAD_OP
        and HYBRID_SHARD_ZERO2 keep them until the backward (ZeRO-2 style); NO_SHARD never shards."""
        return self.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")

    def describe(self) -> str:
        return (
            f"{self.sharding_strategy.lower()}, use_orig_params {str(self.use_orig_params).lower()}, backward prefetch "
            f"{self.backward_prefetch.lower()}, forward prefetch {str(self.forward_prefetch).lower()}, wrap "
            f"{(self.auto_wrap_policy or 'peft default').lower()}"
            + (f" ({', '.join(self.transformer_layer_cls_to_wrap)})" if self.transformer_layer_cls_to_wrap else "")
        )


def fsdp_problems(fs: FsdpSettings, recipe: Any, source: str = "") -> list[str]:
    """FSDP settings that cannot work with qlora-sft's QLoRA (FSDP2 and non-full state dicts are
    refused by `launch.check_launch_compat`)."""
    src = f" ({source})" if source else ""
    problems = []
    if fs.auto_wrap_policy in ("SIZE_BASED_WRAP", "NO_WRAP"):
        problems.append(
            f"the accelerate config{src} sets fsdp_auto_wrap_policy: {fs.auto_wrap_policy}, which cannot be honoured: "
            "for a PEFT model transformers replaces the wrap policy with peft's (one unit per decoder layer, one per "
            "LoRA layer). Set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"
        )
    if fs.activation_checkpointing:
        problems.append(
            f"the accelerate config{src} sets fsdp_activation_checkpointing: true; qlora-sft checkpoints the decoder "
            "layers itself (train.gradient_checkpointing, non-reentrant, optionally offloaded) and transformers "
            "refuses both at once. Remove fsdp_activation_checkpointing (train.gradient_checkpointing is on by default)"
        )
    if fs.cpu_ram_efficient_loading and not fs.sync_module_states:
        problems.append(
            f"the accelerate config{src} sets fsdp_cpu_ram_efficient_loading: true with fsdp_sync_module_states: "
            "false; accelerate refuses that (the ranks that load nothing need rank 0's weights broadcast). Set "
            "fsdp_sync_module_states: true"
        )
    if fs.sharding_strategy not in SHARDING_STRATEGIES:
        problems.append(
            f"the accelerate config{src} sets fsdp_sharding_strategy: {fs.sharding_strategy}; expected one of "
            f"{', '.join(SHARDING_STRATEGIES)}"
        )
    if fs.backward_prefetch not in BACKWARD_PREFETCH:
        problems.append(
            f"the accelerate config{src} sets fsdp_backward_prefetch: {fs.backward_prefetch}; expected one of "
            f"{', '.join(BACKWARD_PREFETCH)}"
        )
    return problems


def check_wrap_classes(model: Any, fs: FsdpSettings | None) -> None:
    """After loading, before the Trainer wraps: the decoder layer classes the config names exist in
    this model (peft's wrap policy would fail inside FSDP otherwise)."""
    if fs is None or not fs.transformer_layer_cls_to_wrap:
        return
    present = {type(m).__name__ for m in model.modules()}
    missing = [c for c in fs.transformer_layer_cls_to_wrap if c not in present]
    if missing:
        layers = sorted(c for c in present if c.endswith(("DecoderLayer", "Block", "Layer")))
        raise UserError(
            f"the accelerate config names fsdp_transformer_layer_cls_to_wrap {missing}, which this model does not "
            f"have (its layer classes: {', '.join(layers[:6])}). Set it to the model's decoder layer class, or "
            "remove it (peft then wraps each decoder layer)"
        )


def mixed_precision_problems(mixed_precision: str, recipe: Any, compute_dtype: str | None, source: str) -> list[str]:
    """The accelerate config's `mixed_precision` against the recipe's compute dtype (the recipe sets
    the Trainer's bf16/fp16, which overrides accelerate's setting: a different value would be dropped)."""
    mp = str(mixed_precision or "no").lower()
    want = {"bf16": "bfloat16", "fp16": "float16"}.get(mp)
    setting = _compute_setting(recipe)
    if mp == "no":
        return []
    if want is None:
        return [
            f"the accelerate config ({source}) sets mixed_precision: {mp}, which qlora-sft does not run (the 4-bit "
            "layers compute in bf16 or fp16). Set mixed_precision: 'no' (the recipe decides) or bf16"
        ]
    resolved = compute_dtype or (setting if setting != "auto" else None)
    if resolved is not None and resolved != want:
        return [
            f"the accelerate config ({source}) sets mixed_precision: {mp} but the recipe computes in {resolved} "
            f"({_dtype_key(recipe)}: {setting}). Set mixed_precision: 'no' (the recipe decides), or "
            f"{_dtype_key(recipe)}: {want}"
        ]
    return []


@dataclass(frozen=True)
class AccelerateConfig:
    """An accelerate YAML, read fully."""

    path: Path
    raw: Mapping[str, Any]
    distributed_type: str
    num_processes: int
    num_machines: int
    mixed_precision: str
    fsdp: FsdpSettings | None = None
    deepspeed: DeepSpeedConfig | None = None
    problems: tuple[str, ...] = ()  # what breaks whatever the recipe (a DeepSpeed file plus YAML keys, ...)
    notes: tuple[str, ...] = field(default_factory=tuple)


# Keys whose value accelerate reads as a word (it compares it, or calls .lower()/.upper()/.split() on
# it): YAML 1.1 reads a bare NO/no/off as false, YES/yes/on as true and 0 as a number. With each, the
# quoted word for a bare false, and what to give otherwise. (`accelerate launch` runs a false
# distributed_type as one process, as 'NO'; a false mixed_precision or dynamo_backend, or a number
# for gpu_ids, stops it on an AttributeError.)
_WORD_KEYS = (
    ("distributed_type", "'NO'", "'NO', MULTI_GPU, DEEPSPEED or FSDP"),
    ("mixed_precision", "'no'", "'no' (the recipe decides), bf16 or fp16"),
    ("dynamo_backend", "'NO'", "'NO' (or remove the key)"),
    ("dynamo_config.dynamo_backend", "'NO'", "'NO' (or remove dynamo_config)"),
    ("gpu_ids", None, "all, or the GPU numbers quoted: '0', '0,1'"),
)


def _refuse_bare_yaml_words(cfg: Mapping[str, Any], p: Path) -> None:
    """Refuse a key of `_WORD_KEYS` that YAML read as a bool or a number, naming the quoted spelling."""
    for dotted, for_false, otherwise in _WORD_KEYS:
        *parents, key = dotted.split(".")
        where: Any = cfg
        for parent in parents:
            where = where.get(parent) if isinstance(where, Mapping) else None
        if not isinstance(where, Mapping) or key not in where:
            continue
        value = where[key]
        if isinstance(value, bool):
            bare = "NO (or no, off, false)" if not value else "YES (or yes, on, true)"
            fix = f"write {key}: {for_false} (quoted)" if not value and for_false else f"give {key} as {otherwise}"
            raise UserError(
                f"accelerate config {p}: {dotted} is {str(value).lower()}: YAML reads a bare {bare} as "
                f"{str(value).lower()}, not as a word; {fix}"
            )
        if key == "gpu_ids" and isinstance(value, (int, float)):
            raise UserError(
                f"accelerate config {p}: gpu_ids is the number {value}: YAML reads a bare number as a number, "
                f"and `accelerate launch` stops on it (it splits gpu_ids at commas); write gpu_ids: '{value}' "
                "(quoted)"
            )


def read_accelerate(path: str | os.PathLike[str]) -> AccelerateConfig:
    """Read an accelerate config file (YAML, or the JSON `accelerate config` can write)."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise UserError(f"accelerate config {p} is a directory; name the YAML file in it")
    if not p.is_file():
        raise UserError(f"accelerate config {p} not found")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"accelerate config {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"accelerate config {p} is not valid YAML: {exc}") from None
    if cfg is None:
        raise UserError(
            f"accelerate config {p} is empty; `accelerate launch` cannot read it. Start from one of "
            "configs/accelerate/ (single_gpu.yaml for one process)"
        )
    if not isinstance(cfg, dict):
        raise UserError(f"accelerate config {p}: the top level must be a mapping")
    name = p.name
    # what `accelerate launch` refuses in the file, whatever the recipe: said here, not on every node
    unknown = sorted(str(k) for k in set(cfg) - accelerate_keys())
    if unknown:
        raise UserError(
            f"accelerate config {p}: {', '.join(unknown)} is not an accelerate config key, and `accelerate launch` "
            "refuses a file with unknown keys. Remove it, or correct its spelling"
        )
    if "distributed_type" not in cfg:
        raise UserError(
            f"accelerate config {p} has no distributed_type, which `accelerate launch` requires: add one of "
            "NO, MULTI_GPU, DEEPSPEED, FSDP (MULTI_CPU for CPU ranks)"
        )
    _refuse_bare_yaml_words(cfg, p)
    dist_type = str(cfg["distributed_type"])
    if dist_type != dist_type.upper():
        raise UserError(
            f"accelerate config {p}: distributed_type is {dist_type}; accelerate reads it in capitals only: "
            f"write distributed_type: {dist_type.upper()}"
        )
    counts = {}
    for key in ("num_processes", "num_machines"):
        value = cfg.get(key, 1)
        if value is None:
            value = 1
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"accelerate config {p}: {key} is {value!r}; give a whole number (e.g. {key}: 2)")
        # num_processes as written (below 1: `accelerate launch` needs --num_processes; plan says so);
        # num_machines 0 runs as one machine
        counts[key] = value if key == "num_processes" else value or 1
    notes, problems = [], []
    for key in sorted(TPU_KEYS & set(cfg)):
        if cfg[key] not in (None, False, "no", [], "", "NO"):
            notes.append(f"{name}: {key} applies to TPUs; ignored on GPUs")
    if str(cfg.get("compute_environment", "LOCAL_MACHINE")).upper() != "LOCAL_MACHINE":
        problems.append(
            f"{name}: compute_environment is {cfg['compute_environment']}; qlora-sft launches on this machine or "
            "under SLURM (compute_environment: LOCAL_MACHINE)"
        )
    if dist_type not in CUDA_TYPES:
        problems.append(
            f"{name}: distributed_type is {dist_type}; qlora-sft trains on CUDA GPUs (bitsandbytes 4-bit) with one "
            "of NO, MULTI_GPU, DEEPSPEED, FSDP (MULTI_CPU for CPU ranks)"
        )
    for key, what in (
        ("fp8_config", "FP8 training"),
        ("megatron_lm_config", "Megatron-LM"),
        ("parallelism_config", "tensor/context parallelism"),
    ):
        if cfg.get(key):
            problems.append(f"{name}: {key} asks for {what}, which qlora-sft does not run with QLoRA; remove it")
    dynamo = cfg.get("dynamo_config") or {}
    # accelerate still takes the older top-level dynamo_backend (converted into dynamo_config)
    for key, value, fix in (
        (
            "dynamo_config.dynamo_backend",
            dynamo.get("dynamo_backend") if isinstance(dynamo, dict) else None,
            "dynamo_config",
        ),
        ("dynamo_backend", cfg.get("dynamo_backend"), "dynamo_backend"),
    ):
        backend = str(value if value is not None else "NO").upper()
        if backend not in ("NO", "NONE"):
            problems.append(
                f"{name}: {key} is {backend}: torch.compile of the 4-bit model is not supported here; remove {fix}"
            )
    fsdp = deepspeed = None
    if dist_type == "FSDP":
        fsdp = FsdpSettings.from_yaml(cfg.get("fsdp_config") or {}, name)
        notes += fsdp.notes
    if dist_type == "DEEPSPEED":
        ds = cfg.get("deepspeed_config") or {}
        for key in sorted(set(ds) - DEEPSPEED_YAML_KEYS):
            notes.append(
                f"{name}: deepspeed_config.{key} is not an accelerate DeepSpeed setting; accelerate ignores it"
            )
        if ds.get("deepspeed_config_file"):
            both = [k for k in DEEPSPEED_FILE_EXCLUSIVE if k in ds]
            if "mixed_precision" in cfg:
                both.append("mixed_precision")
            if both:
                problems.append(
                    f"{name}: sets deepspeed_config_file and also {', '.join(both)}, which accelerate refuses beside "
                    "a DeepSpeed file. Put them in the JSON (precision: its bf16/fp16 sections) and remove them here"
                )
            deepspeed = read_deepspeed(ds["deepspeed_config_file"], p)
        else:
            deepspeed = deepspeed_from_accelerate(ds, p)
    return AccelerateConfig(
        path=p,
        raw=cfg,
        distributed_type=dist_type,
        num_processes=counts["num_processes"],
        num_machines=counts["num_machines"],
        mixed_precision=str(cfg.get("mixed_precision", "no") or "no").lower(),
        fsdp=fsdp,
        deepspeed=deepspeed,
        problems=tuple(problems),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------
# The launch, as plan and train see it
# --------------------------------------------------------------------------------------------


def launch_problems(recipe: Any, mode: Any, batch: Any = None, compute_dtype: str | None = None) -> list[str]:
    """Every problem of the launch's config files with this recipe (plan and train; beside
    `launch.check_launch_compat`). `batch`: the resolved BatchPlan, when the world size is known."""
    problems = list(mode.config_problems)
    if mode.kind == "fsdp" and mode.fsdp is not None:
        problems += fsdp_problems(mode.fsdp, recipe, mode.source)
    if mode.kind == "deepspeed" and mode.deepspeed is not None:
        problems += deepspeed_problems(
            mode.deepspeed,
            recipe,
            micro_batch=batch.micro_batch if batch else None,
            grad_accum=batch.grad_accum if batch else None,
            global_batch=batch.global_batch if batch else None,
            compute_dtype=compute_dtype,
        )
    if mode.kind in ("fsdp", "deepspeed", "ddp", "single_gpu") and mode.mixed_precision:
        if not (mode.kind == "deepspeed" and mode.deepspeed is not None and not mode.deepspeed.from_accelerate_yaml):
            problems += mixed_precision_problems(mode.mixed_precision, recipe, compute_dtype, mode.source or "launch")
    return problems


def launch_notes(recipe: Any, mode: Any) -> list[str]:
    notes = list(mode.config_notes)
    if mode.deepspeed is not None:
        notes += deepspeed_notes(mode.deepspeed, recipe)
    return notes


def fsdp_shards_nothing(mode: Any) -> bool:
    """FSDP whose shard group is one process (NO_SHARD, one process, HYBRID with one GPU per node):
    torch runs it as NO_SHARD, and its full state dict copies every weight on the GPU."""
    return mode.kind == "fsdp" and param_shards(mode, mode.num_machines) == 1


def saves_checkpoints(recipe: Any) -> bool:
    return recipe.train.args.get("save_strategy", "steps") != "no"


def launch_warnings(recipe: Any, mode: Any) -> list[str]:
    """What works but costs the user (memory, time) for nothing: logged as warnings by train, printed
    by plan."""
    out = []
    if fsdp_shards_nothing(mode) and not mode.offload:
        saves = saves_checkpoints(recipe)
        instead = (
            "configs/accelerate/single_gpu.yaml"
            if mode.world_size == 1
            else "configs/accelerate/multi_gpu.yaml (DDP; multi_node.yaml across nodes)"
        )
        out.append(
            "FSDP here shards nothing (one process per shard group: torch runs it as NO_SHARD)"
            + (
                ", and each checkpoint save copies every weight on the GPU for the full state dict (one H200, 8B, "
                "one process: 10.82 GiB at the save against 7.22 with single_gpu.yaml)"
                if saves
                else ""
            )
            + f". Launch with {instead} instead"
        )
    return out


def recipe_deepspeed(recipe: Any) -> DeepSpeedConfig | None:
    """The DeepSpeed config the recipe names (`train.deepspeed`), read; None without one."""
    path = recipe.train.args.get("deepspeed")
    if not path:
        return None
    return read_deepspeed(path)


def recipe_problems(recipe: Any) -> list[str]:
    """Before anything else (validate, plan, train, submit): the recipe's own launch file
    (`train.deepspeed`) against the recipe, as far as it can be checked without a launch."""
    ds = recipe_deepspeed(recipe)
    if ds is None:
        return []
    setting = _compute_setting(recipe)
    return deepspeed_problems(ds, recipe, compute_dtype=None if setting == "auto" else setting)


def prepare_environment(recipe: Any, env: Any = None) -> None:
    """First thing in `train`, before the process group starts: a recipe that names a DeepSpeed JSON
    (`train.deepspeed`) starts DeepSpeed the way `accelerate launch --use_deepspeed
    --deepspeed_config_file X.json` does (the variables its ranks get), on any launcher (a DDP
    `accelerate launch`, torchrun, one process). DeepSpeed, however asked for, must be installed (one
    line naming the extra), and its config file must be where the rank looks for it."""
    from .launch import accelerate_flag

    env = os.environ if env is None else env
    path = recipe.train.args.get("deepspeed")
    if path:
        ds = read_deepspeed(path)
        if accelerate_flag("ACCELERATE_USE_FSDP", env):
            raise UserError(
                f"train.deepspeed names {ds.path}, but the launcher started FSDP (its accelerate config has "
                "distributed_type: FSDP). Use one: remove train.deepspeed, or launch with a DDP config "
                "(configs/accelerate/multi_gpu.yaml) or launch/local.sh --deepspeed"
            )
        launched = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        deepspeed_launch = accelerate_flag("ACCELERATE_USE_DEEPSPEED", env)
        if deepspeed_launch and launched and Path(launched).resolve() != ds.path.resolve():
            raise UserError(
                f"two DeepSpeed configs: the launcher's {launched} and the recipe's train.deepspeed {ds.path}. "
                "Use one (remove train.deepspeed, or launch without a DeepSpeed accelerate config)"
            )
        if accelerate_flag("ACCELERATE_USE_CPU", env):
            raise UserError(
                f"train.deepspeed names {ds.path}, but this launch runs CPU ranks (ACCELERATE_USE_CPU=true) and "
                "DeepSpeed needs CUDA GPUs. For a CPU run, override train.deepspeed=null"
            )
        require_deepspeed(f"train.deepspeed ({ds.path.name})")
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds.path)
        env.setdefault("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true" if ds.stage == 3 else "false")
        if "WORLD_SIZE" not in env and "RANK" not in env:
            # one process without a launcher: DeepSpeed's process group needs torch's variables
            # (without them it would look for MPI)
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", "29500")
        return
    if accelerate_flag("ACCELERATE_USE_DEEPSPEED", env) and not accelerate_flag("ACCELERATE_USE_CPU", env):
        launched = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        require_deepspeed(f"the launch (DeepSpeed{f', {Path(launched).name}' if launched else ''})")
        if launched and not Path(launched).is_file():
            raise UserError(
                f"ACCELERATE_DEEPSPEED_CONFIG_FILE={launched}: not found from the working directory {Path.cwd()} "
                "(accelerate passes the path as the config names it). Use an absolute path, or launch with "
                "launch/local.sh or the SLURM templates, which resolve it against the accelerate config's folder"
            )


def param_shards(mode: Any, nodes: int = 1) -> int:
    """Over how many ranks one parameter is sharded (plan's memory model)."""
    if not mode.shards_parameters:
        return 1
    fs = getattr(mode, "fsdp", None)
    if mode.kind == "fsdp" and fs is not None:
        if fs.sharding_strategy == "NO_SHARD":
            return 1
        if fs.sharding_strategy.startswith("HYBRID"):
            return max(1, mode.world_size // max(1, nodes))
    return mode.world_size


# --------------------------------------------------------------------------------------------
# The launch scripts' check of `--deepspeed FILE`
# --------------------------------------------------------------------------------------------


def accelerate_args(config: str | os.PathLike[str]) -> list[str]:
    """Arguments for `accelerate launch --config_file CONFIG` that make it read the config as this
    module does: a DeepSpeed file the YAML names relative to its own folder is passed as an absolute
    path (accelerate would open it from the working directory). Checks deepspeed is installed for a
    DeepSpeed config (not in a dry run)."""
    cfg = read_accelerate(config)
    if cfg.deepspeed is None:
        return []
    if not dry_run():
        require_deepspeed(f"{cfg.path.name} (distributed_type: DEEPSPEED)")
    if cfg.deepspeed.from_accelerate_yaml:
        return []
    return ["--deepspeed_config_file", str(cfg.deepspeed.path)]


def dry_run() -> bool:
    """QLORA_SFT_DRY_RUN (the launch scripts' switch: print what would run), checked as every switch
    (`launch.env_switch`: 1/true/yes on, unset/0/false/no off, anything else refused)."""
    from .launch import env_switch

    return env_switch("QLORA_SFT_DRY_RUN") is True


USAGE = """usage: python -m qlora_sft.launch_config deepspeed FILE.json
       python -m qlora_sft.launch_config accelerate-args ACCELERATE_CONFIG.yaml"""


def main(argv: list[str] | None = None) -> int:
    """`deepspeed FILE`: check a DeepSpeed JSON named on the command line (and that deepspeed is
    installed, unless QLORA_SFT_DRY_RUN) and print its absolute path. `accelerate-args CONFIG`: print
    the extra `accelerate launch` arguments for an accelerate config, one per line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("deepspeed", "accelerate-args"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        if args[0] == "accelerate-args":
            for arg in accelerate_args(args[1]):
                print(arg)
            return 0
        ds = read_deepspeed(args[1])
        if not dry_run():
            require_deepspeed(f"--deepspeed {args[1]}")
    except UserError as exc:
        print(f"qlora-sft: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(ds.path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
