"""Pre-flight: what a launch will do, before it does it.

`qlora-sft plan RECIPE [--config ACCEL_YAML] [--gpus N] [--nodes M] [--gpu-mem GiB]` reads the
recipe, the accelerate config and the model's config.json only (no weights), and prints the world
size, the batch arithmetic, steps per epoch and an estimate of peak GPU memory per rank, term by
term, plus which bundled launch configs fit a GPU of the given size.

The memory model (bytes, per rank; B = micro batch, T = data.max_length, h = hidden size,
I = MLP size, L = layers, V = vocabulary, n = LoRA parameters, W = ranks sharing a shard):
  4-bit weights      N_linear x (0.5 + quantization constants)          / W under ZeRO-3/FSDP
  other weights      (embeddings, lm_head, norms) x 2 (compute dtype; x 4 with model.upcast_frozen),
                     / W under ZeRO-3/FSDP
  LoRA               n x 4 (fp32) weights + n x 4 gradients (/ W from ZeRO-2 on)
  optimizer          n x 8 (AdamW fp32 moments) or n x 2 (8-bit, the GPU default), / W under ZeRO,
                     0 when offloaded
  activations        checkpointed layer inputs B*T*h*2*L + one layer recomputed in backward
                     B*T*(16h + 6I)*2 (no T^2 term: SDPA/flash attention), or all layers without
                     checkpointing
  logits             TRL's fused LM head tiles the vocabulary (no B*T x V logits): B*T*h*2*2
  workspace          the largest dequantized weight (bf16) x 2 + 0.25 GiB allocator slack
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .recipe import GPU_OPTIM, Recipe, resolve_batch

GIB = 1024**3
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    name: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        text = config.get("text_config", config)
        h = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        return cls(
            hidden=h,
            intermediate=int(text.get("intermediate_size", 4 * h)),
            layers=int(text["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or h // heads),
            vocab=int(text["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            name=name,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        chosen = (
            self.linears() if targets == "all-linear" else {k: v for k, v in self.linears().items() if k in targets}
        )
        return self.layers * sum(r * (a + b) for a, b in chosen.values())


def read_model_config(name_or_path: str, base_dir: Path | None = None) -> dict[str, Any]:
    for cand in (Path(name_or_path), (base_dir / name_or_path) if base_dir else None):
        if cand is not None and (cand / "config.json").is_file():
            return json.loads((cand / "config.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "config.json")).read_text())
    except Exception as exc:
        raise UserError(
            f"plan: cannot read config.json of model {name_or_path!r} (not a local folder; hub: "
            f"{type(exc).__name__}). Point model.name_or_path at a local folder."
        ) from None


@dataclass(frozen=True)
class LaunchConfig:
    """What an accelerate config file means for memory and world size."""

    name: str
    kind: str  # single | ddp | zero2 | zero3 | fsdp
    offload: bool = False
    num_processes: int = 1
    num_machines: int = 1

    @property
    def shards_params(self) -> bool:
        return self.kind in ("zero3", "fsdp")


def read_launch_config(path: str | Path) -> LaunchConfig:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"accelerate config {p} not found")
    cfg = yaml.safe_load(p.read_text()) or {}
    dt = str(cfg.get("distributed_type", "NO")).upper()
    n, m = int(cfg.get("num_processes", 1)), int(cfg.get("num_machines", 1))
    if dt == "DEEPSPEED":
        ds = cfg.get("deepspeed_config", {}) or {}
        stage, offload = int(ds.get("zero_stage", 0) or 0), False
        file = ds.get("deepspeed_config_file")
        if file:
            fp = Path(file)
            if not fp.is_file():
                fp = p.parent.parent.parent / file if not fp.is_absolute() else fp
            if not fp.is_file():
                raise UserError(f"{p}: deepspeed_config_file {file} not found")
            js = json.loads(fp.read_text())
            zo = js.get("zero_optimization", {})
            stage = int(zo.get("stage", 0))
            offload = bool(zo.get("offload_optimizer") or zo.get("offload_param"))
        return LaunchConfig(p.name, "zero3" if stage == 3 else "zero2", offload, n, m)
    if dt == "FSDP":
        return LaunchConfig(p.name, "fsdp", bool((cfg.get("fsdp_config") or {}).get("fsdp_offload_params")), n, m)
    if dt in ("MULTI_GPU", "MULTI_CPU"):
        return LaunchConfig(p.name, "ddp", False, n, m)
    return LaunchConfig(p.name, "single", False, 1, 1)


@dataclass
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # GiB

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate_memory(shape: ModelShape, recipe: Recipe, launch: LaunchConfig, world: int) -> MemoryEstimate:
    q = recipe.quantization.method
    double = recipe.quantization.double_quant
    micro = int(recipe.train.args.get("per_device_train_batch_size", 1))
    tokens = micro * recipe.data.max_length
    h, inter, layers = shape.hidden, shape.intermediate, shape.layers
    shard = world if launch.shards_params else 1
    # frozen non-quantized weights: compute dtype, fp32 with model.upcast_frozen (quantized models only)
    other_bytes = 4 if recipe.model.upcast_frozen and q != "none" else 2
    if q in ("nf4", "fp4"):
        per_param = 0.5 + ((1 / 64) + 4 / (64 * 256) if double else 4 / 64)
    elif q == "int8":
        per_param = 1.0 + 4 / 4096
    else:
        per_param = 2.0
    n_lora = shape.lora_params(recipe.lora.r, recipe.lora.target_modules)
    optim = str(recipe.train.args.get("optim", GPU_OPTIM))
    optim_bytes = 2 if "8bit" in optim else 8
    zero = launch.kind in ("zero2", "zero3")
    gc = bool(recipe.train.args.get("gradient_checkpointing", True))
    layer_act = tokens * (16 * h + 6 * inter) * 2
    biggest = max(a * b for a, b in shape.linears().values())
    parts = {
        "4-bit base weights" if q in ("nf4", "fp4") else f"{q} base weights": shape.linear_params * per_param / shard,
        "embeddings, lm_head, norms": shape.other_params * other_bytes / shard,
        "LoRA weights + grads": n_lora * 4 + n_lora * 4 / (world if zero or launch.kind == "fsdp" else 1),
        "optimizer states": 0.0
        if launch.offload
        else n_lora * optim_bytes / (world if zero or launch.kind == "fsdp" else 1),
        "activations": (tokens * h * 2 * layers + layer_act) if gc else layer_act * layers,
        "logits (fused loss)": tokens * h * 2 * 2,
        "workspace": biggest * 2 * 2 + 0.25 * GIB,
    }
    return MemoryEstimate({k: v / GIB for k, v in parts.items()})


def count_rows(recipe: Recipe, base_dir: Path | None) -> int | None:
    from . import data

    try:
        per_source, _ = data.load_examples(recipe.data.sources, "skip", base_dir)
    except Exception:
        return None
    mixed, _ = data.mix(per_source, recipe.data.sources, recipe.run.seed)
    n = len(mixed)
    if not recipe.data.eval_sources and recipe.data.eval_fraction > 0 and n >= 2:
        n -= min(n - 1, max(1, math.floor(n * recipe.data.eval_fraction)))
    return n


def bundled_configs() -> list[Path]:
    return sorted(p for p in REPO_CONFIGS.glob("*.yaml") if p.name != "multi_node.yaml")


def plan_lines(
    recipe: Recipe,
    config: str | None = None,
    gpus: int | None = None,
    nodes: int = 1,
    gpu_mem: float | None = None,
    base_dir: Path | None = None,
) -> list[str]:
    launch = read_launch_config(config) if config else LaunchConfig("(none: one process)", "single")
    per_node = gpus if gpus is not None else (launch.num_processes // max(1, launch.num_machines))
    world = max(1, per_node * nodes) if launch.kind != "single" else 1
    from .model import check_launch_compat

    kind = {"zero2": "deepspeed", "zero3": "deepspeed"}.get(launch.kind, launch.kind)
    problems = check_launch_compat(recipe, kind, 3 if launch.kind == "zero3" else 2 if launch.kind == "zero2" else 0)
    if problems:
        from .errors import RecipeError

        raise RecipeError(problems, recipe.source)
    batch = resolve_batch(recipe.train, world)
    shape = ModelShape.from_config(read_model_config(recipe.model.name_or_path, base_dir), recipe.model.name_or_path)
    out = [
        f"recipe: {recipe.source or '(in code)'}; model {recipe.model.name_or_path}: {shape.layers} layers, hidden "
        f"{shape.hidden}, MLP {shape.intermediate}, vocab {shape.vocab}",
        f"launch: {launch.name} ({launch.kind}{', offload' if launch.offload else ''}), {nodes} node(s) x "
        f"{per_node if launch.kind != 'single' else 1} process(es) = world size {world}",
        f"batch: {batch.describe()}",
    ]
    rows = count_rows(recipe, base_dir)
    if rows is not None:
        steps = math.ceil(rows / batch.global_batch)
        if recipe.data.packing:
            out.append(
                f"data: {rows} training examples -> at most {steps} optimizer steps per epoch (packing puts "
                f"several examples in a row of {recipe.data.max_length} tokens: fewer steps)"
            )
        else:
            out.append(f"data: {rows} training examples -> {steps} optimizer steps per epoch")
    max_steps = int(recipe.train.args.get("max_steps", -1))
    if max_steps > 0:
        out.append(f"training: max_steps = {max_steps}")
    est = estimate_memory(shape, recipe, launch, world)
    out.append(
        f"estimated peak GPU memory per rank: {est.total:.2f} GiB "
        f"(micro batch {batch.micro_batch} x {recipe.data.max_length} tokens)"
    )
    out += [f"  {k:28} {v:7.2f} GiB" for k, v in est.parts.items()]
    if gpu_mem is not None:
        out.append(f"bundled configs on a {gpu_mem:g} GiB GPU ({nodes} node(s) x {per_node} GPU(s)):")
        for cfg_path in bundled_configs():
            lc = read_launch_config(cfg_path)
            w = 1 if lc.kind == "single" else max(1, per_node * nodes)
            try:
                resolve_batch(recipe.train, w)
                e = estimate_memory(shape, recipe, lc, w).total
                verdict = "fits" if e <= gpu_mem else "does not fit"
                out.append(f"  {cfg_path.name:30} {e:7.2f} GiB  {verdict}")
            except Exception as exc:  # batch not divisible for this world size
                out.append(f"  {cfg_path.name:30} cannot run: {str(exc).splitlines()[-1][:100]}")
    return out
