"""Export: adapter -> one merged model folder that loads with plain `transformers`.

    qlora-sft export runs/X                              # final/ (or the newest complete checkpoint) -> runs/X/merged/
    qlora-sft export runs/X/checkpoint-400 --out merged/ --dtype bf16 --base dequantized --shard-size 5GB

Two merge bases:
  dequantized  (default when training used 4-bit or 8-bit weights) the base weights exactly as
               training saw them: quantized with the recipe's settings and dequantized again, plus
               the LoRA delta. The merged model reproduces the trained model.
  original     the full-precision base plus the delta, as the notebooks do (`merge_and_unload` on a
               freshly loaded fp16 model). It differs from what was trained; verification says how much.

The merge streams: it reads the base checkpoint one tensor at a time (safetensors), applies the
deltas of the layers in it and writes output shards of `--shard-size`, so peak memory stays near
one output shard plus the adapter, whatever the model size. Output is written under a temporary
name and renamed when complete; verification runs by default (logits of the merged model against
the adapter applied on the training-time base, on a few fixed prompts) and a failed check leaves
the folder renamed `*.incomplete` with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import (
    file_digest,
    link_loop,
    no_space_errno,
    no_space_message,
    sweep_temporaries,
    temporary_for,
    user_cache_dir,
    write_problem,
)
from .launch import DTYPES as TORCH_DTYPES
from .loader import checkpoint_files
from .recipe import QuantizationConfig, Recipe

log = logging.getLogger("qlora_sft")

# --dtype choices, and the recipe's dtype names
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, **TORCH_DTYPES}
FALLBACK_PROMPTS = [
    "Explain in one sentence what a neural network is.",
    "Write a haiku about autumn.",
    "What is 17 times 23?",
    "Give three tips for writing clear code.",
]


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `2GiB`, or bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m and str(text).strip().startswith("-"):
        raise UserError(f"--shard-size {text!r}: a shard's size is above 0 (e.g. 5GB)")
    if not m:
        raise UserError(f"--shard-size {text!r}: use e.g. 5GB, 500MB or a number of bytes")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    size = int(value * base**power)
    if size < 1 << 20:
        raise UserError(f"--shard-size {text!r}: a shard of under 1 MB would hold one tensor per file; use e.g. 5GB")
    return size


# --------------------------------------------------------------------------------------------
# What to export
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    adapter_dir: Path
    run_dir: Path | None
    base_path: str
    recipe: Recipe  # the run's recipe as trained; for an adapter alone, one that names only its base
    step: int | None
    adapter_config: dict[str, Any] = field(default_factory=dict)
    base_from: str = ""  # where base_path was read: "model.name_or_path in <run>/recipe.yaml", "--base-model"
    newer: Any = None  # the CheckpointInfo of a complete checkpoint newer than the final/ used (a relaunch)

    @property
    def base_revision(self) -> str | None:
        """The base's revision to load: the run's model.revision, unless --base-model names another model."""
        return None if self.base_from == "--base-model" else self.recipe.model.revision

    @property
    def trained_with_recipe(self) -> bool:
        return self.run_dir is not None

    @property
    def quant(self) -> QuantizationConfig:
        return self.recipe.quantization

    def recipe_on(self, base_folder: Path) -> Recipe:
        """The recipe with its model at the resolved base folder, computing attention with SDPA
        (varlen's kernels run in 16 bits; the reference is computed in fp32)."""
        model = dataclasses.replace(
            self.recipe.model, name_or_path=str(base_folder), attn_implementation="sdpa", dtype="auto"
        )
        return dataclasses.replace(self.recipe, model=model)


def adapter_alone_recipe(base: str) -> Recipe:
    """For an adapter folder without its run: only the base is known (no quantization, as peft
    would load it)."""
    from .recipe import (
        CheckpointConfig,
        DataConfig,
        LoraConfig,
        ModelConfig,
        RunConfig,
        TrainConfig,
    )

    return Recipe(
        RunConfig(),
        ModelConfig(name_or_path=base),
        QuantizationConfig(method="none", double_quant=False),
        LoraConfig(),
        DataConfig(),
        TrainConfig(),
        CheckpointConfig(),
    )


def remote_code_gate(recipe: Recipe, base_path: str, trust_remote_code: bool, command: str) -> Recipe:
    """`export` and `chat` run a model repository's own code only when their command line says
    --trust-remote-code, whatever a run directory's recipe.yaml says (run directories are copied and
    shared). Without the flag, a base whose config.json maps its classes to code files (`auto_map`)
    is refused, naming those files; a base without such code loads as usual."""
    import dataclasses

    if trust_remote_code or not recipe.model.trust_remote_code:
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, trust_remote_code=trust_remote_code))
    config = Path(base_path) / "config.json"
    if not config.is_file():
        code = f"whatever code the hub repository {base_path} holds (it cannot be read before loading)"
    else:
        try:
            auto_map = json.loads(config.read_text()).get("auto_map") or {}
        except ValueError:
            auto_map = {}
        modules = sorted({str(v).split("--")[-1].rsplit(".", 1)[0] + ".py" for v in auto_map.values()})
        code = f"its own code ({', '.join(modules)} from {base_path})" if modules else ""
    if code:
        raise UserError(
            f"{command}: the run's recipe.yaml sets model.trust_remote_code: true, and loading {base_path} would run "
            f"{code}. A run directory does not decide that: pass --trust-remote-code to `qlora-sft {command}` if "
            "you trust that code."
        )
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, trust_remote_code=False))


def check_utf8_path(path: Path, what: str, command: str) -> None:
    """Refuse a path with bytes that are not UTF-8 (a Latin-1 folder name): safetensors, tokenizers and
    transformers cannot open or write it, and fail with errors that blame the file or nothing."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(
            f"{command}: {what} {shown} has bytes in its name that are not UTF-8, and the model libraries "
            "(safetensors, transformers) cannot open such a path. Rename the folder to a UTF-8 name, or make a "
            "link with one to it (ln -s), and give that path."
        ) from None


def resolve_source(
    path: str | Path,
    base_override: str | None = None,
    trust_remote_code: bool = False,
    command: str = "export",
    quiet: bool = False,
) -> Source:
    """A run directory (final/, else its newest complete checkpoint), a checkpoint, or an adapter.
    Remote code runs only with `trust_remote_code` (the command's flag; see `remote_code_gate`).
    `quiet`: what it would warn of the adapter it picks goes unsaid (chat of a run's merged/ asks
    which adapter is the newest, and uses merged/)."""
    from .checkpoint import RunLock, checkpoint_step, inspect_checkpoint, list_checkpoints
    from .recipe import read_run_recipe

    warn = (lambda *args: None) if quiet else log.warning
    newer = None
    p = Path(path)
    if not p.exists():
        raise UserError(f"{command}: {p} does not exist (give a run directory, a checkpoint or an adapter folder)")
    check_utf8_path(p, "the path", command)
    run_dir: Path | None = None
    if (p / "recipe.yaml").is_file():  # a run directory
        run_dir = p
        final = p / "final"
        final_info = inspect_checkpoint(final) if final.is_dir() else None
        if final_info is not None and final_info.complete:
            p = final
            # a run relaunched to train longer keeps its old final/ until it ends: name a newer checkpoint
            final_step = checkpoint_step(final)
            # (a manifest that records no step, by hand or another tool: no checkpoint is known newer)
            newer = next((c for c in list_checkpoints(run_dir) if c.complete and 0 <= final_step < c.step), None)
            if newer is not None:
                warn(
                    "%s: %s is of step %d; the run has a newer complete checkpoint %s (step %d) (a relaunch that "
                    "trains longer%s): using final/. To use that checkpoint: qlora-sft %s %s",
                    command,
                    final,
                    final_step,
                    newer.path,
                    newer.step,
                    " is still training" if RunLock.live_holder(run_dir) is not None else " stopped before its end",
                    command,
                    newer.path,
                )
        else:
            checkpoints = list_checkpoints(p)
            complete = [c for c in checkpoints if c.complete]
            damaged = f" ({final} is not a complete adapter: {final_info.reason})" if final_info else ""
            if not complete:
                merged = "no merged/ model, " if command == "chat" else ""
                raise UserError(
                    f"{command}: {run_dir} has {merged}no complete final/ adapter and no complete checkpoint{damaged}: "
                    f"it has trained nothing yet that was saved intact. Train it until it saves a checkpoint (the "
                    f"recipe it ran is {run_dir / 'recipe.yaml'}), or give another run directory."
                )
            p = complete[0].path
            training = RunLock.live_holder(run_dir)
            if training is not None:  # a run still training: what is used now is not what it will end with
                warn(
                    "%s: %s is still training (%s holds its lock): using its newest complete checkpoint %s (step %d). "
                    "The run saves newer ones and its final/ when it ends; %s it again then for the finished adapter.",
                    command,
                    run_dir,
                    RunLock.describe(training),
                    p,
                    complete[0].step,
                    command,
                )
            # a run still training has no final/; a damaged final/ or a newer damaged checkpoint is named
            skipped = [final_info] if final_info is not None else []
            skipped += [c for c in checkpoints if not c.complete and c.step > complete[0].step]
            for info in skipped:
                warn(
                    "%s: %s is not a complete adapter (%s): using the newest complete checkpoint %s (step %d) instead. "
                    "Give that checkpoint, or another, explicitly to silence this.",
                    command,
                    info.path,
                    info.reason,
                    p,
                    complete[0].step,
                )
    elif (p.parent / "recipe.yaml").is_file():
        run_dir = p.parent
    if not (p / "adapter_config.json").is_file():
        raise UserError(f"{command}: {p} holds no adapter (adapter_config.json missing)")
    if (p / "manifest.json").exists():
        info = inspect_checkpoint(p, verify=True)  # every file against its digest, the adapter finite
        if not info.complete:
            done = "exported" if command == "export" else "used"
            raise UserError(
                f"{command}: {p} cannot be {done}: {info.reason}. Give another checkpoint of the run "
                f"(qlora-sft {command} {run_dir or p.parent}/checkpoint-<step>)."
            )
    elif (p / "adapter_model.safetensors").is_file():
        from .checkpoint import nonfinite_tensors

        bad = nonfinite_tensors(p / "adapter_model.safetensors")
        if bad:
            raise UserError(
                f"{command}: {p}/adapter_model.safetensors holds NaN/inf values ({', '.join(bad[:3])}): the training "
                f"that wrote it diverged; there is nothing to {'merge' if command == 'export' else 'chat with'}"
            )
    adapter_config = json.loads((p / "adapter_config.json").read_text())
    if adapter_config.get("use_dora"):
        raise UserError("export: DoRA adapters are not supported by the streaming merge")
    base = base_override or adapter_config.get("base_model_name_or_path") or ""
    base_from = "--base-model" if base_override else f"base_model_name_or_path in {p / 'adapter_config.json'}"
    if run_dir is not None:
        recipe = read_run_recipe(run_dir)
        base = base_override or recipe.model.name_or_path or base
        if not base_override and recipe.model.name_or_path:
            base_from = f"model.name_or_path in {run_dir / 'recipe.yaml'}"
    else:
        recipe = adapter_alone_recipe(base)
    recipe = remote_code_gate(recipe, base, trust_remote_code, command)
    step = None
    if (p / "manifest.json").is_file():
        step = json.loads((p / "manifest.json").read_text()).get("step")
    return Source(p, run_dir, base, recipe, step, adapter_config, base_from, newer)


# --------------------------------------------------------------------------------------------
# The streaming merge
# --------------------------------------------------------------------------------------------


@dataclass
class LoraPair:
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def read_adapter(adapter_dir: Path, config: dict[str, Any]) -> tuple[dict[str, LoraPair], dict[str, torch.Tensor]]:
    """LoRA pairs keyed by the base weight name they modify, and full tensors saved with the adapter
    (modules_to_save) keyed by the base name they replace."""
    from safetensors.torch import load_file

    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        raise UserError(f"export: {f} missing")
    sd = load_file(str(f))
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        name = key.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m:
            pairs.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = t
        elif ".lora_" in name:
            raise UserError(f"export: adapter tensor {key} is not a LoRA A/B weight (unsupported adapter type)")
        else:
            full[name.replace(".modules_to_save.default.", ".")] = t
    out: dict[str, LoraPair] = {}
    for weight, ab in pairs.items():
        module = weight.removesuffix(".weight")
        mr = next((v for k, v in rank_pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), r)
        ma = next((v for k, v in alpha_pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), alpha)
        scale = ma / math.sqrt(mr) if config.get("use_rslora") else ma / mr
        if "A" not in ab or "B" not in ab:
            raise UserError(f"export: adapter has an incomplete LoRA pair for {module}")
        if ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].numel() == 0:
            raise UserError(f"export: LoRA weights of {module} are empty or not 2-D ({tuple(ab['A'].shape)})")
        out[weight] = LoraPair(ab["A"], ab["B"], scale)
    return out, full


def quantized_weight_names(base_folder: Path, method: str, trust_remote_code: bool = False) -> set[str]:
    """Weights that training held in 4/8 bits: every nn.Linear transformers replaces with a bnb
    layer (all but the output head and the modules transformers keeps in full precision)."""
    if method == "none":
        return set()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(base_folder, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skip = set(get_keys_to_not_convert(model) or [])
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(
            name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip
        ):
            names.add(f"{name}.weight")
    return names


def dequantized(w: torch.Tensor, quant: QuantizationConfig) -> torch.Tensor:
    """The weight as training saw it: quantized with the recipe's settings, dequantized (fp32)."""
    import bitsandbytes.functional as F

    method = quant.method
    if method in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(
            w.float(), blocksize=64, compress_statistics=quant.double_quant, quant_type=method
        )
        return F.dequantize_4bit(packed, state).float()
    if method == "int8":
        # LLM.int8 stores row-wise absmax int8 weights; the matmul uses them dequantized.
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return cb.float() * scb.float().unsqueeze(1) / 127.0
    return w.float()


def merged_tensors(
    files: list[Path],
    pairs: dict[str, LoraPair],
    full: dict[str, torch.Tensor],
    quantized: set[str],
    quant: QuantizationConfig,
    base_kind: str,
    dtype: torch.dtype,
    device: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) one base tensor at a time. A pre-quantized base's packed weights
    are dequantized as stored (its 4-bit values are both the original and the trained base)."""
    from safetensors import safe_open

    from .loader import is_quant_state_key, stored_quant_state

    for f in files:  # (every adapted layer is there: `check_adapter_fits` ran before)
        with safe_open(str(f), framework="pt", device="cpu") as st:
            present = set(st.keys())
            for name in st.keys():
                if is_quant_state_key(name, present):
                    continue  # read with its weight
                t = st.get_tensor(name)
                state = stored_quant_state(st, name, present, torch.device(device))
                if state is not None:
                    import bitsandbytes.functional as F

                    t = F.dequantize_4bit(t.to(device), state).float().cpu()
                if name in full:
                    t = full[name]
                elif name in pairs or (state is None and base_kind == "dequantized" and name in quantized):
                    w = t.to(device)
                    if state is None and base_kind == "dequantized" and name in quantized:
                        w = dequantized(w, quant)
                    w = w.float()
                    if name in pairs:
                        p = pairs[name]
                        a, b = p.A.to(device).float(), p.B.to(device).float()
                        if (b.shape[0], a.shape[1]) != tuple(w.shape):
                            raise misfit(name, tuple(w.shape), (b.shape[0], a.shape[1]))
                        w = w + (b @ a) * p.scale
                    t = w.cpu()
                yield name, t.to(dtype) if t.is_floating_point() else t


def misfit(
    name: str = "", base: tuple[int, ...] = (), delta: tuple[int, ...] = (), missing: list[str] | None = None
) -> UserError:
    """The adapter does not fit the base: a layer of another shape, or layers the base lacks."""
    if missing:
        what = f"the base model has no weights for adapter layers {missing[:3]} ({len(missing)} in all)"
    else:
        what = f"adapter does not fit the base model: {name} is {base} in the base but the LoRA delta is {delta}"
    return UserError(f"export: {what}. Is --base-model the model that was trained?")


def check_adapter_fits(files: list[Path], pairs: dict[str, LoraPair], prequantized: bool) -> None:
    """Before the merge: every adapted layer is in the base, with the delta's shape (read from the
    safetensors headers, no weights loaded). A pre-quantized base stores packed shapes: only names."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            shapes.update({name: tuple(st.get_slice(name).get_shape()) for name in st.keys()})
    for name, p in pairs.items():
        delta = (p.B.shape[0], p.A.shape[1])
        if not prequantized and name in shapes and shapes[name] != delta:
            raise misfit(name, shapes[name], delta)
    missing = [n for n in pairs if n not in shapes]
    if missing:
        raise misfit(missing=missing)


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> dict[str, Any]:
    """Write tensors into shards of at most `shard_bytes` (a tensor larger than that gets its own)
    plus the index; returns the index."""
    from safetensors.torch import save_file

    current: dict[str, torch.Tensor] = {}
    size = total = 0
    names: list[list[str]] = []
    tmp_files: list[Path] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            path = out / f".shard-{len(tmp_files):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            tmp_files.append(path)
            names.append(list(current))
            current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    n = len(tmp_files)
    weight_map: dict[str, str] = {}
    for i, (path, keys) in enumerate(zip(tmp_files, names, strict=True)):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(out / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


# A position is decided when the reference's top token leads the runner-up by at least this
# fraction of the logits' std. Below it the reference itself is a near-tie (common in untrained and
# random-weight models with a 128k vocabulary), and rounding the weights to bf16 picks either token.
DECIDED_MARGIN = 0.1


@dataclass
class Comparison:
    max_abs: float
    mean_abs: float
    top1_agreement: float  # over all positions
    relative: float  # mean |dlogit| / std of the reference logits
    decided_agreement: float  # over the positions the reference decides (DECIDED_MARGIN)
    decided_positions: int
    positions: int

    def line(self) -> str:
        return (
            f"max |dlogit| {self.max_abs:.4g}, mean |dlogit| {self.mean_abs:.4g} ({self.relative:.2%} of the logits' "
            f"std), top-1 agreement {self.top1_agreement:.2%} ({self.decided_agreement:.2%} on the "
            f"{self.decided_positions} of {self.positions} positions where the reference's top token leads by "
            f">= {DECIDED_MARGIN:g} std)"
        )


def compare(a: torch.Tensor, ref: torch.Tensor) -> Comparison:
    a, ref = a.float(), ref.float()
    d = (a - ref).abs()
    std = max(ref.std().item(), 1e-9)
    same = a.argmax(-1) == ref.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) >= DECIDED_MARGIN * std
    n_decided = int(decided.sum().item())
    decided_agree = same[decided].float().mean().item() if n_decided else 1.0
    return Comparison(
        d.max().item(),
        d.mean().item(),
        same.float().mean().item(),
        d.mean().item() / std,
        decided_agree,
        n_decided,
        int(same.numel()),
    )


def tolerance_ok(c: Comparison, dtype: torch.dtype) -> bool:
    """Merged vs adapter-on-training-base, both computed in fp32. With fp32 weights only the
    summation order differs: everything must agree. In bf16/fp16 every merged weight is rounded once
    more (relative error 2^-9 / 2^-11), which moves logits by a few percent of their spread and
    flips near-ties (measured on an 8B shape: bench/results/*-export-bf16.log); where the reference
    clearly prefers a token, the merged model must prefer it too."""
    if dtype == torch.float32:
        return c.relative <= 1e-3 and c.top1_agreement >= 0.999
    return c.relative <= 0.1 and c.decided_agreement >= 0.98


def verification_prompts(source: Source, tokenizer: Any, n: int = 4, max_tokens: int = 96) -> list[list[int]]:
    """Token ids of a few fixed prompts: eval rows of the run when its data is at hand, else generic ones."""
    texts: list[str] = []
    if source.trained_with_recipe:
        try:
            from . import data

            rec = source.recipe
            if rec.data.streaming:  # the first rows of the stream, in the sources' order
                stream = data.stream_data(dataclasses.replace(rec.data, shuffle_buffer=1), tokenizer, rec.run.seed)
                return [list(row["input_ids"][:max_tokens]) for row in stream.train.take(n)]
            prepared = data.load_prepared(
                data.cache_folder(rec.data, tokenizer, rec.run.seed, rec.data_cache_root, None)
            )
            if prepared is None:  # the run's cache is gone: build it again (in a temporary folder)
                prepared = data.build_data(rec.data, tokenizer, rec.run.seed)
            rows = prepared.eval if prepared.eval is not None else prepared.train
            return [list(ids[:max_tokens]) for ids in rows["input_ids"][:n]]
        except Exception as exc:  # data moved or unreadable: fall back to fixed prompts
            log.info("verification: eval data not available (%s); using fixed prompts", exc)
    for p in FALLBACK_PROMPTS[:n]:
        msgs = [{"role": "user", "content": p}]
        try:
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        except Exception:
            texts.append(p)
    return [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]


@torch.no_grad()
def logits_of(model: Any, prompts: list[list[int]]) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = [model(input_ids=torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts]
    return torch.cat(outs)


def training_time_model(source: Source, base_folder: Path, device: str) -> Any:
    """The adapter applied (unmerged) on the base loaded exactly as training loaded it
    (`model.load_base`: the recipe's quantization, or the checkpoint's if it is pre-quantized),
    computed in float32: the trained model is its weights (the 4-bit base dequantized plus the
    adapter), and the bf16 arithmetic of a training step is rounding noise, not part of it (on a GPU
    that noise alone moves an 8B model's logits by several percent of their spread: docs/export.md)."""
    from peft import PeftModel

    from .launch import LaunchMode
    from .model import load_base

    mode = LaunchMode("cpu" if device == "cpu" else "single_gpu")
    base = load_base(source.recipe_on(base_folder), mode, compute_dtype=torch.float32)
    return adapter_in_fp32(PeftModel.from_pretrained(base, source.adapter_dir).eval())


def adapter_in_fp32(model: Any) -> Any:
    """Compute the LoRA branch in fp32 (QLoRA trains the adapter weights in bf16, and a bf16 branch
    adds its own rounding noise): the reference is then the adapter itself, not bf16 arithmetic."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model


def original_base_model(source: Source, base_folder: Path, device: str) -> Any:
    """The notebook merge's base: the full-precision weights, never quantized (fp32 compute)."""
    from peft import PeftModel

    from .launch import LaunchMode
    from .model import load_base

    recipe = source.recipe_on(base_folder)
    recipe = dataclasses.replace(recipe, quantization=QuantizationConfig(method="none", double_quant=False))
    base = load_base(recipe, LaunchMode("cpu" if device == "cpu" else "single_gpu"), compute_dtype=torch.float32)
    return adapter_in_fp32(PeftModel.from_pretrained(base, source.adapter_dir).eval())


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    ok: bool
    merged_vs_trained: Comparison | None
    original_vs_trained: Comparison | None
    merge_peak_rss_mb: float
    seconds: float
    shards: int
    uploaded_to: str | None = None


@dataclass
class ExportPlan:
    """What `export` will do, checked before anything is written."""

    out_dir: Path
    dtype: torch.dtype
    dtype_name: str
    base_kind: str  # dequantized | original
    base_folder: Path
    files: list[Path]
    shard_bytes: int
    device: str


def plan_export(
    source: Source,
    out: str | Path | None,
    dtype: str,
    base: str | None,
    shard_size: str | int,
    device: str,
    overwrite: bool,
    other_base: bool = False,
) -> ExportPlan:
    if dtype not in DTYPES:
        raise UserError(f"export: --dtype {dtype!r}: use bf16, fp16 or fp32")
    out_dir = Path(out) if out else (source.run_dir or source.adapter_dir.parent) / "merged"
    check_utf8_path(out_dir, "--out", "export")
    check_out_dir(out_dir, source, overwrite)
    problem = write_problem(out_dir.parent)  # the merge is written beside --out, then renamed
    if problem:
        raise UserError(
            f"export: cannot write the merged model to {out_dir}: {problem}. Choose --out in a writable folder, or "
            "fix the folder's permissions; nothing was written."
        )
    base_kind = base or ("dequantized" if source.quant.method != "none" else "original")
    if base_kind not in ("dequantized", "original"):
        raise UserError(f"export: --base {base_kind!r}: use dequantized or original")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("export: --device cuda but no GPU is visible")
    shard_bytes = parse_size(shard_size)
    base_folder, files = base_model_files(source, other_base)
    if relative_below(base_folder, out_dir) is not None:
        raise UserError(
            f"export: --out {out_dir} is (or holds) the base model folder {base_folder} the adapter is merged onto; "
            "choose another folder"
        )
    return ExportPlan(out_dir, DTYPES[dtype], dtype, base_kind, base_folder, files, shard_bytes, device)


def base_model_files(source: Source, other_base: bool = False, command: str = "export") -> tuple[Path, list[Path]]:
    """The base model the adapter goes on (`export` merges onto it, `chat` loads it): its folder and
    weight files. Refused, before anything loads, when it is not there (naming where its path was
    recorded, and --base-model for a base that moved) or is another model (`check_base`)."""
    try:
        base_folder, files = checkpoint_files(source.base_path, source.base_revision, what="base model")
    except UserError as exc:
        if source.base_from == "--base-model":
            hint = "Pass --base-model PATH to the base model folder."
        else:
            hint = (
                f"It is the model {source.adapter_dir} was trained on ({source.base_from}). If it moved, pass "
                "--base-model PATH to the folder it is in now (its files are checked against those the adapter "
                "trained on)."
            )
        raise UserError(f"{command}: {exc} {hint}") from None
    check_utf8_path(base_folder, "the base model folder", command)
    check_base(source, base_folder, other_base, command)
    return base_folder, files


def check_base(source: Source, base_folder: Path, other_base: bool, command: str = "export") -> None:
    """Refuse to merge onto another model than the one the adapter trained on, where its manifest
    recorded that model (runs since 2026-12-01): the merge would be wrong, and the verification, which
    loads the same base, could not see it. `other_base` (--allow-other-base): the same weights saved
    in other files."""
    from .checkpoint import MANIFEST, base_changes, model_folder_fingerprint

    manifest = source.adapter_dir / MANIFEST
    saved = json.loads(manifest.read_text()).get("base_model") if manifest.is_file() else None
    if not saved or "weights" not in saved:
        return
    changes = base_changes(saved, model_folder_fingerprint(base_folder))
    if not changes:
        return
    shown = "; ".join(changes[:6]) + (" ..." if len(changes) > 6 else "")
    if other_base:
        log.warning(
            "%s: %s is not the base model the adapter trained on (%s): --allow-other-base", command, base_folder, shown
        )
        return
    raise UserError(
        f"{command}: {base_folder} is not the base model {source.adapter_dir} was trained on ({shown}). Pass "
        "--base-model PATH of the model it trained on; if this folder holds those same weights saved in other "
        "files, pass --allow-other-base."
    )


# Written into every merged folder: `--overwrite` replaces only folders that carry it (an earlier
# export); any other folder at --out is moved aside, never deleted.
EXPORT_MARKER = "qlora-sft-export.json"


def relative_below(inner: Path, outer: Path) -> Path | None:
    """`inner`'s path below `outer` (`.` where they are the same folder), or None where it is not
    inside it. Also where `inner` reaches `outer` under another name: a symlink, `..`, a bind mount or
    another spelling on a case-insensitive file system (the same folder on disk)."""
    inner_r, outer_r = inner.resolve(), outer.resolve()
    outer_id = outer_r.stat() if outer_r.exists() else None
    for above in (inner_r, *inner_r.parents):
        if above == outer_r:
            return inner_r.relative_to(above)
        if outer_id is not None and above.exists():
            st = above.stat()
            if (st.st_dev, st.st_ino) == (outer_id.st_dev, outer_id.st_ino):
                return inner_r.relative_to(above)
    return None


EXPORT_DIGESTS = "export-digests.json"


def export_digest_memo() -> Any:
    """The digests of exported files already checked, kept in the user's cache folder
    (`files.user_cache_dir`) by path, size, times and inode, as the data
    cache keeps its files' (`DigestMemo`): chat reads an unchanged export once for them, not before
    every load (140 GB for a 70B model). Where that folder cannot be written, every chat reads them."""
    from .data.cache import DigestMemo

    root = user_cache_dir()
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
    return DigestMemo(root / EXPORT_DIGESTS, read=lambda p: file_digest(p))


def export_damage(folder: Path) -> str | None:
    """Which file of an export differs from what export wrote, or None: the size and the digest its
    marker records for each file (`{name: size}` alone in exports before 2026-12-02); also None for
    a folder without that record (another model, an export before 2026-12-01)."""
    try:
        files = json.loads((folder / EXPORT_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    memo = export_digest_memo()
    try:
        for name, entry in (files or {}).items() if isinstance(files, dict) else ():
            size, digest = (entry.get("size"), entry.get("digest")) if isinstance(entry, dict) else (entry, None)
            f = folder / name
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != size:
                return f"{f} has {f.stat().st_size} bytes; the export wrote {size}"
            if digest and memo.digest(f.resolve()) != digest:
                return (
                    f"{f} does not hold the bytes the export wrote (its digest differs from "
                    f"{folder / EXPORT_MARKER}'s; same size: changed in place)"
                )
    finally:
        memo.save()
    return None


def check_out_dir(out_dir: Path, source: Source, overwrite: bool) -> None:
    """Where the merged model may go: never over or around the run (or adapter) being exported, never
    into any run's checkpoints, logs or final/ (also reached by another name: a symlink, a bind
    mount); never over a file or a folder holding a qlora-sft run; a non-empty folder only with
    --overwrite."""
    from .checkpoint import CHECKPOINT_RE, RUN_ENTRIES
    from .recipe import RUN_RECIPE, is_run_directory

    default = (source.run_dir or source.adapter_dir.parent) / "merged"
    loop = link_loop(out_dir)
    if loop is not None:
        raise UserError(
            f"export: --out {out_dir} goes through a symbolic link loop ({loop}: its links lead back to themselves; "
            f"`ls -l {loop}` shows where it points). Fix the link, or choose another --out (the default is "
            f"{default}); nothing was written."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(
            f"export: --out {out_dir} is a file, not a folder: the merged model is a folder of files. Choose a folder "
            f"(the default is {default}); nothing was written."
        )

    def refuse_run_entry(holder: Path, below: Path) -> None:
        first = below.parts[0] if below.parts else ""
        if first in RUN_ENTRIES or CHECKPOINT_RE.match(first) or first.startswith(("checkpoint-", "final.")):
            raise UserError(
                f"export: --out {out_dir} is inside {holder / first}, which belongs to the run {holder}; choose "
                f"another folder (e.g. {holder / 'merged'})"
            )

    for protected in filter(None, (source.run_dir, source.adapter_dir)):
        below = relative_below(out_dir, protected)
        if relative_below(protected, out_dir) is not None:
            what = "run" if protected == source.run_dir else "adapter"
            where = "" if below is not None else "a folder around "
            raise UserError(
                f"export: --out {out_dir} is {where}the {what} being exported ({protected}); writing there would "
                f"replace it. Choose a folder outside it (the default is {default})."
            )
        if below is not None:
            refuse_run_entry(protected, below)
    out = out_dir.resolve()
    for run in out.parents:  # any run's checkpoints, final/ and logs, not only the exported one's
        if is_run_directory(run):
            refuse_run_entry(run, out.relative_to(run))
            # another run's merged/ is what `chat` and `export` of that run take for its own export
            ours = source.run_dir is not None and relative_below(run, source.run_dir) == Path(".")
            if not ours and out.relative_to(run).parts[:1] == ("merged",):
                raise UserError(
                    f"export: --out {out_dir} is inside {run / 'merged'}, the export of the run {run} (`qlora-sft "
                    f"chat {run}` would take this merge for that run's); {source.adapter_dir} is not of that run. "
                    f"Choose another --out (the default is {default}); nothing was written."
                )
    if out_dir.is_symlink():  # publishing renames over the link itself, never into its target
        raise UserError(
            f"export: --out {out_dir} is a symbolic link (to {os.readlink(out_dir)}); give the folder it names "
            "itself as --out, or remove the link; nothing was written."
        )
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(
            f"export: {out_dir} exists and is not empty; pass --overwrite to replace it, or --out elsewhere"
        )
    runs = [p for p in (out_dir, *out_dir.iterdir()) if p.is_dir() and (p / RUN_RECIPE).is_file()]
    if runs:
        raise UserError(
            f"export: --out {out_dir} holds a qlora-sft run ({runs[0]}); --overwrite replaces an earlier export, "
            "never a run. Choose another --out."
        )


def sweep_interrupted(out_dir: Path) -> None:
    """Remove the temporary folders that exports into `out_dir` killed on this machine left behind (a
    whole model each); name those of other machines or live processes."""
    from .checkpoint import _process_start

    removed, others = sweep_temporaries(out_dir, lambda pid: _process_start(pid) is None)
    for tmp in removed:
        log.info("export: removed %s, left by an interrupted export (its process is gone)", tmp)
    for tmp, host, pid in others:
        log.warning(
            "export: %s is another export's unfinished folder (process %d on %s); left alone. Remove it once "
            "no export is running there.",
            tmp,
            pid,
            host,
        )
    for old in sorted(out_dir.parent.glob(f"{out_dir.name}.old-*")):  # publish's aside, left by a kill
        if (old / EXPORT_MARKER).is_file():
            log.warning(
                "export: %s is an earlier export that an interrupted --overwrite moved aside (a whole model); "
                "remove it once you no longer need it",
                old,
            )


def merge(source: Source, plan: ExportPlan) -> tuple[Path, dict[str, Any], float]:
    """Stream the merged weights into a temporary folder beside the output, with config and
    tokenizer. Returns (folder, shard index, peak RSS of the merge in MB); nothing is left behind on
    failure."""
    pairs, full = read_adapter(source.adapter_dir, source.adapter_config)
    check_adapter_fits(plan.files, pairs, is_prequantized(plan.base_folder))
    method = source.quant.method
    quantized = quantized_weight_names(plan.base_folder, method, source.recipe.model.trust_remote_code)
    if method != "none" and not quantized:
        raise UserError(f"export: found no quantized layers in {plan.base_folder} for method {method}")
    log.info(
        "export: %s (%d LoRA layers, base %s, %s merge) -> %s [%s, shards of %s bytes]",
        source.adapter_dir,
        len(pairs),
        plan.base_folder,
        plan.base_kind,
        plan.out_dir,
        plan.dtype_name,
        plan.shard_bytes,
    )
    sweep_interrupted(plan.out_dir)
    tmp = temporary_for(plan.out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    made = [p for p in tmp.parents if not p.exists()]  # the folders above --out this export makes, nearest first
    tmp.mkdir(parents=True)
    try:
        rss_before = peak_rss_mb()
        tensors = merged_tensors(
            plan.files, pairs, full, quantized, source.quant, plan.base_kind, plan.dtype, plan.device
        )
        index = write_shards(tensors, tmp, plan.shard_bytes)
        merge_rss = peak_rss_mb()
        copy_model_files(plan.base_folder, source, tmp, plan.dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # unless something else was put there meanwhile
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    log.info(
        "export: merged %d tensors into %d shard(s); peak RSS %.0f MB (%.0f MB before the merge)",
        len(index["weight_map"]),
        len(set(index["weight_map"].values())),
        merge_rss,
        rss_before,
    )
    return tmp, index, merge_rss


def verify_merge(source: Source, plan: ExportPlan, merged_dir: Path) -> tuple[Comparison, Comparison | None, bool]:
    """Logits of the merged folder against the adapter on the training-time base (and, for a
    quantized run, of the notebook merge: the original base plus the adapter), on a few prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = source.recipe.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust)
    prompts = verification_prompts(source, tokenizer)
    ref_model = training_time_model(source, plan.base_folder, plan.device)
    ref = logits_of(ref_model, prompts)
    del ref_model
    # the exported weights as stored, computed in fp32 like the reference: what is measured is the
    # merge and the rounding to --dtype, not bf16 arithmetic
    merged = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, device_map={"": plan.device}, trust_remote_code=trust
    )
    merged_vs = compare(logits_of(merged.eval(), prompts), ref)
    del merged
    original_vs = None
    if source.quant.method != "none" and not is_prequantized(plan.base_folder):
        orig = original_base_model(source, plan.base_folder, plan.device)
        original_vs = compare(logits_of(orig, prompts), ref)
        del orig
    ok = (
        tolerance_ok(merged_vs, plan.dtype)
        if plan.base_kind == "dequantized" or source.quant.method == "none"
        else True
    )
    log.info(
        "verify: merged (%s base, %s) vs adapter on the training-time base: %s",
        plan.base_kind,
        plan.dtype_name,
        merged_vs.line(),
    )
    if original_vs is not None:
        log.info(
            "verify: the original full-precision base + adapter vs the training-time model: %s", original_vs.line()
        )
    return merged_vs, original_vs, ok


def is_prequantized(base_folder: Path) -> bool:
    """A bitsandbytes 4-bit checkpoint: its dequantized weights are the original (no other base)."""
    config = json.loads((base_folder / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"


def publish(tmp: Path, out_dir: Path, ok: bool, overwrite: bool = True) -> Path:
    """Rename the finished folder into place (`<out>.incomplete` when verification failed). A folder
    already there is an earlier export (it has the marker): moved aside, and removed once the new
    one is in place; or anything else: moved aside to `<out>.replaced-<time>` and kept. Without
    `overwrite`, a folder that appeared at `<out>` while this export ran (another export to the same
    place) is left as it is and this export is kept beside it."""
    from .checkpoint import keep_aside

    final = out_dir if ok else out_dir.with_name(out_dir.name + ".incomplete")
    if not final.exists():
        tmp.rename(final)
        return final
    if ok and not overwrite and any(final.iterdir()):
        kept = final.with_name(f"{final.name}.export-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        tmp.rename(kept)
        raise UserError(
            f"export: {final} appeared while this export ran (another export to the same --out?) and was left as "
            f"it is; this export is complete and kept as {kept}. Compare them, then move one into place, or rerun "
            "with --overwrite."
        )

    ours = (final / EXPORT_MARKER).is_file()
    aside = keep_aside(final, "old" if ours else "replaced")
    tmp.rename(final)
    if ours:
        shutil.rmtree(aside, ignore_errors=True)
    else:
        log.warning("export: %s was not written by qlora-sft export: moved aside to %s (kept)", final, aside)
    return final


def merge_verify_publish(
    source: Source, plan: ExportPlan, verify: bool, overwrite: bool
) -> tuple[Path, bool, dict[str, Any], float, Comparison | None, Comparison | None]:
    """Merge into a temporary folder, verify, write the card and the marker, and rename it into place;
    on any failure or interruption before that, the temporary folder is removed."""
    tmp, index, merge_rss = merge(source, plan)
    try:
        try:
            merged_vs, original_vs, ok = verify_merge(source, plan, tmp) if verify else (None, None, True)
        except Exception as exc:
            if source.adapter_dir.is_dir():
                raise
            raise UserError(
                f"export: {source.adapter_dir} was deleted while it was exported (the run's checkpoint.keep_last "
                "removes older checkpoints while it trains). Export the run once training has ended, or a "
                "checkpoint that retention keeps; nothing was written."
            ) from exc
        write_model_card(tmp, source, plan.base_kind, plan.dtype_name, merged_vs, original_vs, merge_rss, ok)
        marker = {
            "adapter": str(source.adapter_dir.resolve()),
            "step": source.step,
            "verified": ok if verify else None,
            "files": {
                f.name: {"size": f.stat().st_size, "digest": file_digest(f)}
                for f in sorted(tmp.iterdir())
                if f.is_file()
            },
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        final = publish(tmp, plan.out_dir, ok, overwrite)
    except BaseException:  # interrupted or failed before publishing: no unverified copy of the model stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, ok, index, merge_rss, merged_vs, original_vs


@contextlib.contextmanager
def writes_named(out_dir: Path) -> Iterator[None]:
    """A full disk, a quota or a file size limit while the merged model is written becomes an error
    naming the folder and what was left (the temporary folder is removed by then; `--out` untouched)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        code = no_space_errno(exc)
        if code is None:
            raise
        why = no_space_message(out_dir.parent, exc)
        if code == errno.EFBIG:
            why += "; a smaller --shard-size makes smaller files"
        earlier = " (an earlier export)" if (out_dir / EXPORT_MARKER).is_file() else ""
        kept = f"{out_dir}{earlier} was left as it was" if out_dir.exists() else f"nothing is at {out_dir}"
        raise UserError(
            f"export: writing the merged model to {temporary_for(out_dir)} failed: {why}. That folder was removed "
            f"and {kept}. Free space, or choose --out on another file system, and export again."
        ) from None


def export(
    path: str | Path,
    out: str | Path | None = None,
    *,
    dtype: str = "bf16",
    base: str | None = None,
    base_model: str | None = None,
    shard_size: str | int = "5GB",
    device: str = "cpu",
    overwrite: bool = False,
    verify: bool = True,
    hub: HubTarget | None = None,
    trust_remote_code: bool = False,
    other_base: bool = False,
) -> ExportResult:
    """Merge, verify, publish, and with `hub` upload what was verified. Main process only (see
    `main_process_writes`)."""
    t0 = time.time()
    source = resolve_source(path, base_model, trust_remote_code)
    if hub is not None and not hub.adapter_only and not verify:
        raise UserError("export: --push-to-hub uploads only a verified merge; drop --no-verify (or use --adapter-only)")
    token = hub_token(hub) if hub is not None else None
    if hub is not None and hub.adapter_only:
        url = push_to_hub(source.adapter_dir, hub, token or "", f"qlora-sft adapter {source.adapter_dir.name}")
        log.info("export: uploaded the adapter %s to %s", source.adapter_dir, url)
        return ExportResult(source.adapter_dir, True, None, None, 0.0, time.time() - t0, 0, url)
    plan = plan_export(source, out, dtype, base, shard_size, device, overwrite, other_base)
    with writes_named(plan.out_dir):
        final, ok, index, merge_rss, merged_vs, original_vs = merge_verify_publish(source, plan, verify, overwrite)
    url = None
    if not ok:
        log.error("export: the merged model does not reproduce the adapter within tolerance; left in %s", final)
        if hub is not None:
            log.error("export: nothing was uploaded to %s", hub.repo_id)
    else:
        if hub is not None:
            url = push_to_hub(final, hub, token or "", f"qlora-sft merged model ({plan.dtype_name}, verified)")
            log.info("export: uploaded %s to %s", final, url)
        log.info("export: done in %.1f s: %s", time.time() - t0, final)
    shards = len(set(index["weight_map"].values()))
    return ExportResult(final, ok, merged_vs, original_vs, merge_rss, time.time() - t0, shards, url)


# --------------------------------------------------------------------------------------------
# Push to the hub (after verification only)
# --------------------------------------------------------------------------------------------

HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HubTarget:
    repo_id: str
    private: bool = False
    revision: str | None = None
    adapter_only: bool = False


def hub_token(target: HubTarget) -> str:
    """Before any merge work: the hub answers within seconds and a token is known (HF_TOKEN or
    `hf auth login`), or a clear error says which is missing. Returns the token."""
    import requests
    from huggingface_hub import constants, get_token

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", target.repo_id):
        raise UserError(f"export: --push-to-hub {target.repo_id!r}: give ORG/NAME (or USER/NAME)")
    if constants.HF_HUB_OFFLINE:
        raise UserError("export: --push-to-hub: HF_HUB_OFFLINE is set; unset it to upload (nothing was merged)")
    endpoint = constants.ENDPOINT
    try:
        requests.head(endpoint, timeout=HUB_TIMEOUT_S, allow_redirects=True)
    except requests.RequestException as exc:
        raise UserError(
            f"export: --push-to-hub: the hub at {endpoint} cannot be reached ({type(exc).__name__}); nothing was "
            "merged or uploaded. Export without --push-to-hub here and upload the folder from a machine with "
            "network access (`hf upload ORG/NAME runs/X/merged`)."
        ) from None
    token = get_token()
    if not token:
        raise UserError("export: --push-to-hub: no hub token; set HF_TOKEN or run `hf auth login` (nothing was merged)")
    return token


def push_to_hub(folder: Path, target: HubTarget, token: str, message: str) -> str:
    """Upload a finished folder (the verified merge, or the adapter) to `target`; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(target.repo_id, private=target.private, exist_ok=True, repo_type="model")
    if target.revision:
        api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=target.repo_id, revision=target.revision, commit_message=message
    )
    return str(getattr(info, "commit_url", None) or target.repo_id)


def copy_model_files(base_folder: Path, source: Source, out: Path, dtype: torch.dtype) -> None:
    """config.json (without quantization), generation_config.json, tokenizer + chat template (the
    run's tokenizer, saved with the adapter, which has the chat template training used)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    trust = source.recipe.model.trust_remote_code
    config = AutoConfig.from_pretrained(base_folder, trust_remote_code=trust)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    tok_dir = source.adapter_dir if (source.adapter_dir / "tokenizer_config.json").is_file() else base_folder
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(base_folder)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    if eos is not None:
        ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        gen.eos_token_id = sorted({i for i in [*ids, eos] if i is not None})
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_model_card(
    out: Path,
    source: Source,
    base_kind: str,
    dtype: str,
    merged_vs: Comparison | None,
    original_vs: Comparison | None,
    merge_rss: float,
    ok: bool,
) -> None:

    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {source.base_path}",
        "tags: [qlora-sft, merged-lora]",
        "---",
        "",
        f"# Merged model ({'verified' if ok else 'FAILED verification'})",
        "",
        f"- base model: `{source.base_path}`",
        f"- adapter: `{source.adapter_dir}` (training step {source.step if source.step is not None else 'unknown'})",
        f"- training quantization: {source.quant.method}"
        + (f", double quant {source.quant.double_quant}" if source.quant.method in ("nf4", "fp4") else ""),
        f"- merge base: **{base_kind}**, weights in {dtype}",
        f"- peak RSS during the merge: {merge_rss:.0f} MB",
        "",
        "Loads with plain transformers: `AutoModelForCausalLM.from_pretrained(<this folder>)`.",
        "",
        "## Verification",
        "",
    ]
    if merged_vs is None:
        lines.append("Not run (--no-verify).")
    else:
        lines.append("Logits on fixed prompts, against the adapter applied on the base as training loaded it:")
        lines.append("")
        lines.append(f"- this merged model: {merged_vs.line()}")
        if original_vs is not None:
            lines.append(f"- the original full-precision base + adapter (the notebook merge): {original_vs.line()}")
    if source.trained_with_recipe:
        lines += ["", "## Recipe", "", "```yaml", source.recipe.to_yaml().rstrip(), "```"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
