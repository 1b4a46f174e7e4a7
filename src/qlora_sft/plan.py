"""Pre-flight: what a launch will do, before it does it.

`qlora-sft plan RECIPE [--config ACCEL_YAML] [--gpus N] [--nodes M] [--gpu-mem GiB]` reads the
recipe, the accelerate config and the model's config.json only (no weights), and prints the world
size, the batch arithmetic, steps per epoch and an estimate of peak GPU memory per rank, term by
term, plus which bundled launch configs fit a GPU of the given size.

`check_output_dir` and `check_data_readable`: the run directory can be written and the data files
read, checked by `train`, `submit`, `validate` and `prepare` before anything loads (a PermissionError
deep in a launch becomes an error that names the path and the fix).

The memory model (bytes, per rank; B = micro batch, T = data.max_length, h = hidden size,
I = MLP size, L = layers, V = vocabulary, n = LoRA parameters, W = ranks sharing a shard):
  4-bit base weights    N_linear x 0.5                                 / W under ZeRO-3/FSDP
  quantization consts   N_linear x (1/64 + 4/(64*256)) with double quant, x 4/64 without: absmax etc.,
                        on every rank's GPU (not sharded: bitsandbytes needs them beside every shard)
  other weights         (embeddings, lm_head, norms) x 2 (compute dtype; x 4 with model.upcast_frozen),
                        / W under ZeRO-3/FSDP
  gathered for compute  FSDP: the root unit (embeddings, lm_head, final norm) gathered whole (during
                        the step with W > 1; when a checkpoint's full state dict is written with W = 1);
                        with layer units it is resharded before the decoder layers' backward, so only
                        what of it exceeds one recomputed layer's activations counts (with checkpointing),
                        plus with W > 1 or offload two decoder layers (the one computing and the one
                        prefetched); the embedding's unit only in the forward (model.sharding);
                        ZeRO-3 with W > 1 or offload: per module, up to stage3_max_live_parameters
                        elements; with leaf decoder layers, the layers the forward keeps for their
                        recompute (reuse distance / one layer's elements) plus the one running when
                        each is released after its backward, else every layer; with parameter
                        offload also the embedding and lm_head (one of them at reuse distance 0)
  LoRA                  n x 4 (fp32) weights + n x 4 gradients (/ W under FSDP and ZeRO-3; gradients
                        / W under ZeRO-2)
  optimizer             n x 8 (AdamW fp32 moments) or n x 2 (8-bit, the GPU default), / W under ZeRO
                        and FSDP
  offload               (FSDP offload_params, ZeRO offload): the sharded weights, LoRA and optimizer
                        live in CPU memory; the GPU keeps the quantization constants, what is gathered
                        for compute, activations and workspace
  activations           checkpointed layer inputs B*T*h*2*L + one layer recomputed in backward
                        B*T*(6h + 2I)*2 (varlen/flash attention, Liger's fused SwiGLU and norms: no T^2
                        term; fitted to the H100/H200 runs of the 1B, 8B and 70B shapes in
                        bench/results, within 15% of every measured peak), or all layers without
                        checkpointing
  LoRA dropout          (lora.dropout > 0) each adapted linear's dropped input, B*T*(6h + I)*2 for the
                        layer recomputed (every layer without checkpointing); all seven linears
                        counted whatever lora.target_modules, the dropout mask's bytes not counted
  logits                TRL's fused LM head tiles the vocabulary (no B*T x V logits): B*T*h*2*2
  workspace             the largest dequantized weight (bf16) + 0.25 GiB allocator slack
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import launch, launch_config
from .errors import DataError, RecipeError, RunDirError, UserError
from .files import os_reason, read_problem, write_problem
from .launch import CUDA_CONTEXT_GIB, PROCESS_GROUP_CONTEXT_GIB, LaunchMode, context_gib
from .recipe import (
    Recipe,
    micro_batches_dividing,
    no_checkpoint_before_the_end,
    recipe_warnings,
    resolve_batch,
    warmup_outlasts_training,
)

GIB = 1024**3


def check_output_dir(recipe: Recipe) -> None:
    """The run directory (checkpoints, logs) and the data cache beside it (`<run.output_dir>/.cache`,
    which training writes into too) can be made and written, tried for real before anything loads."""
    problem = write_problem(recipe.run_dir)
    if problem:
        where = f" in {recipe.source}" if recipe.source else ""
        raise RunDirError(
            f"run.output_dir {recipe.run.output_dir}: {problem}, so the run directory {recipe.run_dir} cannot be "
            f"written. Choose a writable run.output_dir (run.output_dir=PATH after the recipe, or{where}) or fix the "
            "folder's permissions; nothing was written."
        )
    from .data.cache import unwritable_cache_message

    problem = write_problem(recipe.data_cache_root)
    if problem:
        raise DataError(unwritable_cache_message(recipe.data_cache_root, problem))


def check_prepared_writable(cache: str | Path) -> None:
    """Training writes beside the prepared splits it reads (the Trainer's packing and column removal
    write Arrow cache files into `<cache>/train` and `eval`): a cache folder made by another user, or
    on a read-only file system, fails only there, after the model is loaded. Checked before."""
    from .data.cache import unwritable_cache_message

    for split in ("train", "eval"):
        folder = Path(cache) / split
        problem = write_problem(folder) if folder.is_dir() else None
        if problem:
            raise DataError(unwritable_cache_message(Path(cache).parent, problem))


def check_data_readable(data: Any, base_dir: str | Path | None) -> None:
    """Every local file of the data sources (`data`: a DataConfig) can be read (a folder: each of its
    files and subfolders). Hub dataset ids and paths not found are left to the readers, which name them."""
    from .data.sources import resolve_path

    for src in (*data.sources, *data.eval_sources):
        try:
            local = resolve_path(src.path, base_dir)
            problem = read_problem(local) if local is not None else None
        except OSError as exc:  # a folder on the way that may not be searched
            problem = f"cannot read {exc.filename or src.path} ({os_reason(exc)})"
        if problem:
            raise DataError(
                f"data source {src.path!r}: {problem}. Fix its permissions (e.g. `chmod -R u+rX` on it, or ask its "
                "owner), or point `path:` in data.sources at a readable copy; nothing was written."
            )


def configs_dir() -> Path:
    """The bundled configs: inside an installed wheel (qlora_sft/configs), else the source tree's."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if (packaged / "accelerate").is_dir() else Path(__file__).resolve().parents[2] / "configs"


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
    here = Path(name_or_path).expanduser()  # as validate and train read it (files.local_path)
    for cand in (here, (base_dir / here) if base_dir and not here.is_absolute() else None):
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


def recipe_shape(recipe: Recipe, base_dir: Path | None = None) -> ModelShape:
    """The recipe's model dimensions, from its config.json (no weights read)."""
    name = recipe.model.name_or_path
    return ModelShape.from_config(read_model_config(name, base_dir), name)


ZERO3_MAX_LIVE_PARAMETERS = 1e9  # configs/deepspeed/zero3*.json, and DeepSpeed's default
ZERO3_MAX_REUSE_DISTANCE = 1e9


def zero3_setting(mode: LaunchMode, key: str, default: float) -> float:
    """A number of the DeepSpeed JSON's zero_optimization (`default` where it is absent or "auto")."""
    value = (getattr(mode.deepspeed, "zero", None) or {}).get(key)
    try:
        return max(0.0, float(value)) if value not in (None, "auto") else default
    except (TypeError, ValueError):
        return default


@dataclass
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # GiB

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate_memory(shape: ModelShape, recipe: Recipe, mode: LaunchMode, micro: int | None = None) -> MemoryEstimate:
    """Peak GPU memory per rank; `micro` (rows of data.max_length tokens) replaces the recipe's."""
    q = recipe.quantization.method
    double = recipe.quantization.double_quant
    world = mode.world_size
    if micro is None:
        micro = int(recipe.train.args.get("per_device_train_batch_size", 1))
    tokens = micro * recipe.data.max_length
    h, inter, layers = shape.hidden, shape.intermediate, shape.layers
    shard = launch_config.param_shards(mode, mode.num_machines)  # FSDP NO_SHARD / HYBRID_SHARD shard less
    # FSDP's layer units keep the adapters whole on every rank (weights, gradients, optimizer state)
    lora_shard = 1 if mode.adapters_replicated else shard
    grad_shard = shard if mode.kind == "fsdp" else (world if mode.shards_gradients else 1)
    if mode.adapters_replicated:
        grad_shard = 1
    offload = mode.offload and mode.kind in ("fsdp", "deepspeed")
    # frozen non-quantized weights: compute dtype, fp32 with model.upcast_frozen (quantized models only)
    other_bytes = 4 if recipe.model.upcast_frozen and q != "none" and not mode.shards_parameters else 2
    if q in ("nf4", "fp4"):
        data_bytes, const_bytes = 0.5, ((1 / 64) + 4 / (64 * 256) if double else 4 / 64)
    elif q == "int8":
        data_bytes, const_bytes = 1.0, 4 / 4096
    else:
        data_bytes, const_bytes = 2.0, 0.0
    n_lora = shape.lora_params(recipe.lora.r, recipe.lora.target_modules)
    optim = str(recipe.train.args.get("optim", mode.default_optim))
    optim_bytes = 2 if "8bit" in optim else 8
    gc = bool(recipe.train.args.get("gradient_checkpointing", True))
    # offloaded: the H100 runs of 2026-11-24 kept about 4 layers' inputs on the GPU (copies in flight,
    # the layer being recomputed and its gradient), at 8B and at 1B
    held = min(4, layers) if launch.offloads_activations(recipe, mode) else layers
    layer_act = tokens * (6 * h + 2 * inter) * 2
    biggest = max(a * b for a, b in shape.linears().values())
    layer_weights = sum(a * b for a, b in shape.linears().values()) * data_bytes
    gathered = 0.0
    moves_weights = world > 1 or offload  # weights arrive from other ranks or from CPU memory
    head = shape.vocab * h * other_bytes
    # LoRA dropout keeps each adapted linear's dropped input (q, k, v, o, gate, up: h each; down: the
    # intermediate size) for the backward, for the layer being recomputed under checkpointing
    dropout = (tokens * (6 * h + inter) * 2 * (1 if gc else layers)) if recipe.lora.dropout > 0 else 0.0
    if mode.kind == "fsdp":
        # the root unit stays gathered from forward to backward: with layer units it holds the norm
        # and the output head (the embedding is its own unit, gathered only while it runs), with
        # peft's units the embedding too; plus the layers running and prefetched
        root = (head if not shape.tied else 0) + h if mode.adapters_replicated else shape.other_params * other_bytes
        if releases_head(mode) and gc:
            # resharded once the loss's backward is past the final norm (model.sharding): the head then
            # never meets a recomputed layer's activations, the peak of the decoder layers' backward
            # (two H200s, 8B: 5.81 -> 5.02 GiB per rank, with parameter offload 3.30 -> 2.85)
            root = max(0.0, root - layer_act - dropout)
        units = min(layers, fsdp_gathered_layers(mode))
        gathered = root + (units * layer_weights if moves_weights else 0)
        # The embedding's unit is gathered for the forward only (model.sharding keeps FSDP from
        # gathering it again in the backward): with BACKWARD_PRE that gather arrived while the first
        # decoder layer's backward held its activations, 0.82-0.92 GiB more per rank at 8B (two H200s)
        if shard == 1:  # NO_SHARD, or one process (torch then switches to NO_SHARD): held whole already
            gathered = 0.0
    elif mode.shards_parameters and moves_weights:
        reuse = zero3_setting(mode, "stage3_max_reuse_distance", ZERO3_MAX_REUSE_DISTANCE)
        if mode.zero3_leaf_modules or getattr(mode.deepspeed, "leaf_modules", None):
            # whole decoder layers (leaf modules; the leaves a DeepSpeed JSON names are counted the same,
            # on the safe side). A layer stays gathered from the forward while its next use (its
            # recompute in the backward) comes within stage3_max_reuse_distance elements: the last
            # reuse / (one layer's elements) layers. Under checkpointing DeepSpeed gives the weights
            # gathered to recompute a layer to the model around the layers, so every other layer is
            # gathered in the backward and kept to its end: all layers at the peak, whatever the
            # distance, unless each is released after its own backward (launch.zero3_releases_layers),
            # which leaves the forward's and the one running. One H200, 8B, one process, parameter
            # offload, 104 MiB a layer (2026-12-01): 18 + 14 layers at the bundled distance, 1e9; 32 at
            # distance 0; 18 + 1 and 0 + 1 released.
            layer_elements = layer_weights / 2  # the 4-bit weights are stored in the 16-bit compute dtype
            kept = min(layers, int(reuse // max(1.0, layer_elements)))
            held_layers = min(layers, kept + 1) if (gc and mode.zero3_releases_layers) or not gc else layers
            gathered = held_layers * layer_weights
        else:
            # DeepSpeed keeps up to stage3_max_live_parameters gathered elements resident (1e9 in the
            # bundled config: 1.86 GiB of bf16-stored 4-bit weights at 8B, measured 2026-11-30)
            total = shape.linear_params * data_bytes / 2 + shape.other_params
            live = zero3_setting(mode, "stage3_max_live_parameters", ZERO3_MAX_LIVE_PARAMETERS)
            gathered = min(live, total) * 2
        if offload:
            # with the parameters in host memory nothing of the embedding and the output head stays on
            # the GPU between uses, and both are gathered whole while the loss is computed: one H200,
            # 8B, one process, leaf layers, profiled step: 1,002 MiB each at the 6.99 GiB peak beside
            # 3.25 GiB of gathered layers (2026-12-01, ...-1proc-zero3-offload-profiled); at reuse
            # distance 0 one of the two (...-1proc-zero3-offload-live-profiled)
            gathered += head * (1 if shape.tied or not reuse else 2)
    # model.embedding_in_host_memory: the input embedding table is not on the GPU
    host_embedding = 0.0
    if launch.keeps_in_host_memory(recipe, "embedding_in_host_memory") and not shape.tied:
        host_embedding = shape.vocab * h * other_bytes
    # model.lm_head_in_host_memory: the output head is on the GPU only from the last layers' forward
    # (its copy starts HostHead.LEAD layers before the end) to the loss's backward, not while the
    # decoder layers' backward runs. Its phase holds the head, the layer inputs waiting and one
    # layer's forward without gradients (SwiGLU's three intermediate outputs, a dequantized weight)
    host_head = head if launch.keeps_in_host_memory(recipe, "lm_head_in_host_memory") and not shape.tied else 0
    head_phase = host_head + tokens * (3 * inter * 2 + h * 2 * held) + biggest * 2 if host_head else 0.0
    weights_name = "4-bit base weights" if q in ("nf4", "fp4") else f"{q} base weights"
    kept = 0.0 if offload else 1.0  # what offload moves to CPU memory
    # FSDP's layer units keep the adapters out of every unit (ignored modules): parameter offload does
    # not move them, their gradients or their optimizer state (measured at 8B and 70B, 2026-11-30)
    adapters_kept = 1.0 if mode.adapters_replicated else kept
    parts = {
        weights_name: kept * shape.linear_params * data_bytes / shard,
        "quantization constants": shape.linear_params * const_bytes,
        "embeddings, lm_head, norms": kept * shape.other_params * other_bytes / shard - host_embedding - host_head,
        "gathered for compute": gathered,
        "LoRA weights + grads": adapters_kept * (n_lora * 4 / lora_shard + n_lora * 4 / grad_shard),
        "optimizer states": adapters_kept * n_lora * optim_bytes / grad_shard,
        # with checkpointing every layer's input stays until the backward pass, on the GPU or, with
        # train.offload_activations, in host memory
        "activations": (tokens * h * 2 * held + layer_act) if gc else layer_act * layers,
        "LoRA dropout": dropout,
        "logits (fused loss)": tokens * h * 2 * 2,
        # one dequantized weight at a time (bitsandbytes' 112 MiB at 8B in the profiled FSDP step of
        # two H200s, 2026-11-30, `memory-peak-rank<i>.json`)
        "workspace": biggest * 2 + 0.25 * GIB,
    }
    if head_phase:
        layers_phase = sum(parts[k] for k in ("activations", "LoRA dropout", "workspace"))
        parts["lm_head while the loss runs (from host memory)"] = max(0.0, head_phase - layers_phase)
    if launch_config.fsdp_shards_nothing(mode) and launch_config.saves_checkpoints(recipe):
        # FSDP1 without sharding (NO_SHARD, or one process, which torch runs as NO_SHARD) clones every
        # parameter on the GPU for a full state dict: each checkpoint save then holds the weights twice.
        # One H200, 8B, one process: 10.82 GiB peak at the save, 5.21 GiB above the steady 5.61, while
        # the profiled training step peaked at 7.58 (2026-12-01)
        training = sum(parts[k] for k in ("gathered for compute", "activations", "LoRA dropout", "logits (fused loss)"))
        training += parts["workspace"]
        weights_held = sum(
            v for k, v in parts.items() if k in (weights_name, "quantization constants", "embeddings, lm_head, norms")
        )
        parts["checkpoint save (NO_SHARD copies the weights)"] = max(0.0, weights_held - training)
    return MemoryEstimate({k: v / GIB for k, v in parts.items()})


# `auto` keeps the frozen tables in host memory on one GPU where plan's estimate with them on the GPU
# passes this share of what the GPU offers (usable_gib). They save 1-3 GiB (8B: 7.22 -> 5.50 GiB at
# 4 x 2048) for 0-5% of the tokens/s (one H200, three calls, 2026-12-02): worth it only where memory
# is short, so a run with room to spare keeps its speed
HOST_TABLES_AUTO_SHARE = 0.75


def resolve_host_tables(
    recipe: Recipe, mode: LaunchMode, shape: ModelShape, gpu_gib: float | None, micro: int | None = None
) -> Recipe:
    """`recipe` with `auto` of model.embedding_in_host_memory and model.lm_head_in_host_memory made
    true or false for this launch on a GPU of `gpu_gib` (None: unknown, off) at micro batch `micro`
    (rows; None: the recipe's): true on one GPU where they apply (launch.host_table_applies), the
    tables are untied, and the estimate with both on the GPU passes HOST_TABLES_AUTO_SHARE of
    usable_gib."""
    keys = [k for k in launch.HOST_TABLE_KEYS if getattr(recipe.model, k) == "auto"]
    if not keys:
        return recipe
    model = recipe.model

    def with_model(**values: bool) -> Recipe:
        return dataclasses.replace(recipe, model=dataclasses.replace(model, **values))

    off = with_model(**dict.fromkeys(keys, False))
    if gpu_gib is None or shape.tied or mode.kind != "single_gpu":
        return off
    tight = estimate_memory(shape, off, mode, micro).total > HOST_TABLES_AUTO_SHARE * usable_gib(gpu_gib, mode)
    return with_model(**{k: tight and launch.host_table_applies(recipe, mode, k) for k in keys})


def releases_head(mode: LaunchMode) -> bool:
    """Whether FSDP reshards the root unit (output head, final norm) before the decoder layers'
    backward (model.sharding.release_root_after_head): layer units, QLORA_SFT_FSDP_RELEASE_HEAD not 0,
    and a strategy that frees gathered weights in the backward. It also needs a `model.norm` before
    the head (Llama, Qwen, Mistral, Gemma); a model without one is estimated as if it applied, and the
    run logs that it did not."""
    fs = mode.fsdp
    frees = fs is None or (fs.reshards_after_forward and fs.sharding_strategy != "NO_SHARD")
    sharded = not launch_config.fsdp_shards_nothing(mode)  # one process runs as NO_SHARD
    return mode.kind == "fsdp" and mode.adapters_replicated and mode.fsdp_release_head and frees and sharded


def fsdp_gathered_layers(mode: LaunchMode) -> int:
    """Decoder layers FSDP holds gathered at once: the one computing, plus the next with backward or
    forward prefetch; every layer where weights stay gathered from the forward to the backward
    (SHARD_GRAD_OP, HYBRID_SHARD_ZERO2)."""
    fs = mode.fsdp
    if fs is None:  # a mode built in code: the bundled config's BACKWARD_POST
        return 2
    if not fs.reshards_after_forward and fs.sharding_strategy != "NO_SHARD":
        return 10**6  # (capped by the caller's layer count)
    return 2 if fs.prefetches else 1


def loading_host_memory(shape: ModelShape, recipe: Recipe, mode: LaunchMode) -> float | None:
    """GiB of CPU memory the low-memory loader needs on rank 0 under FSDP/ZeRO-3 (the whole model as
    it will be trained, before it is sharded), or None where weights load straight to the GPU."""
    from .model import uses_low_memory_loader

    if not (mode.shards_parameters and uses_low_memory_loader(recipe.model, mode)):
        return None
    data = 0.5 if recipe.quantization.method in ("nf4", "fp4") else 2.0
    return (shape.linear_params * data + shape.other_params * 2) / GIB


def count_rows(recipe: Recipe, base_dir: Path | None) -> int | None:
    """Training rows after the mix and the eval split, counted while streaming the sources (rows
    that `skip` would drop are not counted; nothing is tokenized)."""
    from . import data

    if recipe.data.streaming:
        return None  # a stream's length is unknown until it is read
    try:
        kept = []
        for src in recipe.data.sources:
            report = data.SourceReport(src.path, src.format)
            for _ in data.iter_examples(src, "skip", report, base_dir):
                pass
            kept.append(report.kept)
    except Exception:
        return None
    counts = data.mix_counts(kept, recipe.data.sources)
    n = sum(counts)
    if recipe.data.eval_sources or not n:
        return n
    # the eval split holds out distinct rows with every copy of them (a weight above 1 repeats rows):
    # exact for whole weights, within a row's copies otherwise
    distinct = sum(min(c, k) for c, k in zip(counts, kept, strict=True))
    return n - round(data.eval_rows_held_out(distinct, recipe.data.eval_fraction) * n / distinct)


def plan_compute_dtype(recipe: Recipe) -> str | None:
    """The recipe's compute dtype where it is fixed; None for `auto` (it depends on the GPU)."""
    q = recipe.quantization
    setting = q.compute_dtype if q.method != "none" else recipe.model.dtype
    return None if setting == "auto" else setting


def launch_config_lines(recipe: Recipe, mode: LaunchMode) -> list[str]:
    """What the launch config files set (FSDP settings, the DeepSpeed config) and the notes about
    them: nothing in them is passed over in silence."""
    out = []
    if mode.fsdp is not None:
        out.append(f"fsdp: {mode.fsdp.describe()}")
    if mode.deepspeed is not None:
        out.append(f"deepspeed: {mode.deepspeed.describe()}")
        if not launch_config.deepspeed_installed():
            out.append(f"note: deepspeed is not installed here; where training runs: {launch_config.DEEPSPEED_INSTALL}")
    if mode.mixed_precision and mode.mixed_precision != "no":
        out.append(f"mixed precision: {mode.mixed_precision} (the accelerate config; agrees with the recipe)")
    out += [f"note: {n}" for n in launch_config.launch_notes(recipe, mode)]
    out += [f"warning: {w}" for w in launch_config.launch_warnings(recipe, mode)]
    return out


def bundled_configs() -> list[Path]:
    return sorted(p for p in (configs_dir() / "accelerate").glob("*.yaml") if p.name != "multi_node.yaml")


def plan_lines(
    recipe: Recipe,
    config: str | None = None,
    gpus: int | None = None,
    nodes: int | None = None,
    gpu_mem: float | None = None,
    base_dir: Path | None = None,
) -> list[str]:
    mode = launch.plan_mode(recipe, config, gpus, nodes)
    nodes = mode.num_machines  # as given, else the config's num_machines (1 for one process)
    world = mode.world_size
    problems = launch.check_launch_compat(recipe, mode)
    try:
        batch = resolve_batch(recipe.train, world)
    except RecipeError as exc:
        raise RecipeError([*problems, *exc.problems], recipe.source) from None
    problems += launch_config.launch_problems(recipe, mode, batch, plan_compute_dtype(recipe))
    if problems:
        raise RecipeError(problems, recipe.source)
    shape = recipe_shape(recipe, base_dir)
    given = recipe
    recipe = resolve_host_tables(given, mode, shape, gpu_mem)
    per_node = world // max(1, nodes) if mode.kind != "single_gpu" else 1
    out = [
        f"recipe: {recipe.source or '(in code)'}; model {recipe.model.name_or_path}: {shape.layers} layers, hidden "
        f"{shape.hidden}, MLP {shape.intermediate}, vocab {shape.vocab}",
        f"launch: {mode.source} ({mode.label()}), {nodes if mode.kind != 'single_gpu' else 1} node(s) x "
        f"{per_node} process(es) = world size {world}",
        f"batch: {batch.describe()}",
        *launch_config_lines(recipe, mode),
    ]
    rows = count_rows(recipe, base_dir)
    max_steps = int(recipe.train.args.get("max_steps", -1))
    total_steps = max_steps  # (with packing, an epoch's count is an upper bound: a warmup past it outlasts)
    if rows is not None:
        steps = math.ceil(rows / batch.global_batch)
        if max_steps <= 0:
            total_steps = math.ceil(steps * float(recipe.train.args.get("num_train_epochs", 3.0)))
        if recipe.data.packing:
            out.append(
                f"data: {rows} training examples -> at most {steps} optimizer steps per epoch (packing puts "
                f"several examples in a row of {recipe.data.max_length} tokens: fewer steps)"
            )
        else:
            out.append(f"data: {rows} training examples -> {steps} optimizer steps per epoch")
    if max_steps > 0:
        out.append(f"training: max_steps = {max_steps}")
    args = recipe.train.args
    warmup = warmup_outlasts_training(float(args.get("warmup_steps", 0)), total_steps, args.get("lr_scheduler_type"))
    if warmup:
        out.append(f"warning: {warmup}")
    if max_steps <= 0 and rows is not None:  # counted in epochs (with max_steps, recipe_warnings says it)
        epochs = float(args.get("num_train_epochs", 3.0))
        if late := no_checkpoint_before_the_end(args, total_steps, epochs):
            out.append(f"warning: {late}")
    out += [f"warning: {w}" for w in recipe_warnings(recipe)]  # as validate and train say them
    out += host_tables_lines(given, recipe, mode, gpu_mem)
    est = estimate_memory(shape, recipe, mode)
    out.append(
        f"estimated peak GPU memory per rank: {est.total:.2f} GiB "
        f"(micro batch {batch.micro_batch} x {recipe.data.max_length} tokens)"
    )
    out += [f"  {k:28} {v:7.2f} GiB" for k, v in est.parts.items()]
    host = loading_host_memory(shape, recipe, mode)
    if host is not None:
        out.append(
            f"CPU memory while loading: rank 0 holds the model ({host:.1f} GiB) until it is sharded; the other "
            "ranks hold none"
        )
    if gpu_mem is not None:
        out.append(largest_micro_batch_line(shape, given, mode, gpu_mem))  # auto resolved at each micro batch
        out.append(
            f"bundled configs on a {gpu_mem:g} GiB GPU ({nodes} node(s) x {per_node} GPU(s); fits: estimate at most "
            f"{usable_beside(gpu_mem, CUDA_CONTEXT_GIB):.2f} GiB on one GPU, "
            f"{usable_beside(gpu_mem, PROCESS_GROUP_CONTEXT_GIB):.2f} with a process group: {USABLE_FRACTION:.0%} of "
            "what the CUDA context leaves):"
        )
        for cfg_path in bundled_configs():
            candidate = launch.from_config_file(cfg_path, per_node, nodes)
            at = resolve_host_tables(given, candidate, shape, gpu_mem)  # auto as this config would resolve it
            impossible = launch.check_launch_compat(at, candidate)
            if impossible:
                out.append(f"  {cfg_path.name:30} cannot run: {impossible[0][:100]}")
                continue
            try:
                resolve_batch(at.train, candidate.world_size)
                e = estimate_memory(shape, at, candidate).total
                verdict = "fits" if fits(e, gpu_mem, candidate) else "does not fit"
                out.append(f"  {cfg_path.name:30} {e:7.2f} GiB  {verdict}")
            except RecipeError as exc:  # batch not divisible for this world size
                out.append(f"  {cfg_path.name:30} cannot run: {str(exc).splitlines()[-1][:100]}")
    return out


def host_tables_lines(given: Recipe, resolved: Recipe, mode: LaunchMode, gpu_mem: float | None) -> list[str]:
    """What `auto` of the host-memory tables resolved to (`resolve_host_tables`), for plan's report."""
    keys = [k for k in launch.HOST_TABLE_KEYS if getattr(given.model, k) == "auto"]
    if not keys or mode.kind != "single_gpu":
        return []
    names = " and ".join(f"model.{k}" for k in keys)
    if gpu_mem is None:
        return [
            f"frozen tables: {names} auto: on one GPU they go to host memory where the estimate with them on "
            f"the GPU passes {HOST_TABLES_AUTO_SHARE:.0%} of what the GPU offers; give --gpu-mem N to see which"
        ]
    on = [k for k in keys if getattr(resolved.model, k)]
    where = f"{' and '.join(f'model.{k}' for k in on)} in host memory" if on else "on the GPU"
    return [
        f"frozen tables: {names} auto: {where} on a {gpu_mem:g} GiB GPU (host memory where the estimate with "
        f"them on the GPU passes {HOST_TABLES_AUTO_SHARE:.0%} of the {usable_gib(gpu_mem, mode):.2f} GiB it offers)"
    ]


# The share of a GPU's memory an estimate may fill and still be said to fit: the caching allocator
# reserves more than the peak it hands out (fragmentation; a memory cap limits what it reserves), and
# the estimate is within 15% either way. Measured (bench/results, 2026-11-30, one H200): reserved
# over allocated peak 1.07 (8B, 4 x 2048) and 1.08 (14B, 8 x 2048) with expandable segments; capped
# at 24 GiB, the 32B shape at 4 x 2048 peaked at 21.33 GiB (estimate now 21.44) and trained, and at
# 8 x 2048 (estimate now 23.22) it failed. 1 / 1.08 is 0.926: the margin is thin. Later the same
# night, plan's largest micro batches by this fraction alone trained under the caps: 32B at 5 x 2048
# (21.94 GiB, estimate 21.88, reserved 22.77 of 24) and 14B at 13 x 2048 (15.17, estimate 14.69,
# reserved 16.00: all the cap gave the allocator, with nothing left for the CUDA context a real
# 16 GiB card also holds; hence usable_gib below).
USABLE_FRACTION = 0.92


def usable_gib(gpu_mem: float, mode: LaunchMode | None = None) -> float:
    """What an estimate may reach on a GPU of `gpu_mem` GiB with this launch (None: one process
    without a process group): USABLE_FRACTION of what the CUDA context (launch.context_gib) leaves."""
    return usable_beside(gpu_mem, context_gib(mode))


def usable_beside(gpu_mem: float, context: float) -> float:
    return max(0.0, (gpu_mem - context) * USABLE_FRACTION)


def fits(estimate: float, gpu_mem: float, mode: LaunchMode | None = None) -> bool:
    """Whether an estimate fits a GPU of `gpu_mem` GiB (usable_gib)."""
    return estimate <= usable_gib(gpu_mem, mode)


def largest_micro_batch(shape: ModelShape, recipe: Recipe, mode: LaunchMode, gpu_mem: float) -> int:
    """The most rows of data.max_length tokens per micro batch whose estimate fits `gpu_mem` GiB with
    this launch (0: not even one); `auto` host tables resolved at each micro batch, as a launch with
    it would resolve them."""
    best = 0
    for micro in range(1, 1025):
        at = resolve_host_tables(recipe, mode, shape, gpu_mem, micro)
        if not fits(estimate_memory(shape, at, mode, micro).total, gpu_mem, mode):
            break  # the estimate grows with the micro batch
        best = micro
    return best


def largest_micro_batch_line(shape: ModelShape, recipe: Recipe, mode: LaunchMode, gpu_mem: float) -> str:
    length = recipe.data.max_length
    micro = largest_micro_batch(shape, recipe, mode, gpu_mem)
    head = (
        f"largest micro batch on a {gpu_mem:g} GiB GPU with this launch (estimate at most "
        f"{usable_gib(gpu_mem, mode):.2f} GiB: {USABLE_FRACTION:.0%} of what the CUDA context's ~{context_gib(mode):g} "
        "GiB leaves, the rest for the allocator)"
    )
    if micro == 0:
        need = estimate_memory(shape, resolve_host_tables(recipe, mode, shape, gpu_mem, 1), mode, 1).total
        return (
            f"{head}: none; one row of {length} tokens needs {need:.2f} GiB (shorter data.max_length, "
            "train.offload_activations, or shard the model: see the configs below)"
        )
    at = resolve_host_tables(recipe, mode, shape, gpu_mem, micro)
    line = (
        f"{head}: {micro} x {length} tokens ({micro_batch_setting(micro, length, recipe.data.packing)}, estimated "
        f"{estimate_memory(shape, at, mode, micro).total:.2f} GiB)"
    )
    gbs, world = recipe.train.global_batch_size, mode.world_size
    if gbs is not None and gbs % (micro * world):
        fits = micro_batches_dividing(gbs, world, most=micro)
        line += (
            f"; train.global_batch_size {gbs} on {world} process(es) takes a micro batch that divides it: "
            f"at most {max(fits) if fits else 'none'}"
        )
    return line


def micro_batch_setting(rows: int, length: int, packing: bool) -> str:
    """The recipe key and value that give `rows` rows of `length` tokens per micro batch."""
    return f"train.micro_batch_tokens={rows * length}" if packing else f"train.per_device_train_batch_size={rows}"


# What keeps the frozen tables off the GPU (where they are not there already)
HOST_TABLES_SETTING = "model.embedding_in_host_memory=true and model.lm_head_in_host_memory=true (one GPU, DDP)"


def lower_memory(tables_in_host: bool = False) -> str:
    """What lowers a step's GPU memory, without plan's numbers; `tables_in_host`: both frozen tables
    are in host memory already, so that is not suggested."""
    tables = "" if tables_in_host else f"or keep the frozen tables in host memory ({HOST_TABLES_SETTING}), "
    return (
        "lower the micro batch (train.micro_batch_tokens, or train.per_device_train_batch_size where the recipe sets "
        f"it; with train.global_batch_size set, the run resumes with it), {tables}or set "
        "train.offload_activations=true, or shard the model (configs/accelerate/fsdp_qlora.yaml)"
    )


LOWER_MEMORY = lower_memory()


@dataclass(frozen=True)
class GpuOutlook:
    """plan's estimate for the launch being started, against the GPU it runs on (train logs it
    before loading anything, and names it again if a step runs out of memory)."""

    gpu_gib: float  # the GPU's memory, or QLORA_SFT_GPU_MEMORY_GIB's cap
    estimate_gib: float  # peak per rank for the recipe's micro batch
    largest_micro: int  # the most rows of data.max_length tokens per micro batch that fit (0: none)
    micro: int  # the recipe's micro batch (rows)
    max_length: int
    packing: bool = True
    mode: LaunchMode | None = None  # the launch (None: one process), for the CUDA context it counts
    tables_in_host: bool = False  # both frozen tables in host memory already (true, or auto resolved so)

    @property
    def fits(self) -> bool:
        return fits(self.estimate_gib, self.gpu_gib, self.mode)

    def line(self) -> str:
        head = (
            f"plan estimates {self.estimate_gib:.2f} GiB per rank at micro batch {self.micro} x {self.max_length} "
            f"tokens; this GPU has {self.gpu_gib:.1f} GiB, of which an estimate may reach "
            f"{usable_gib(self.gpu_gib, self.mode):.2f}"
        )
        if self.fits:
            return f"{head}: fits"
        return f"{head}: it will likely run out of memory. {self.advice()}"

    def advice(self) -> str:
        """What to lower, with plan's numbers for this GPU."""
        length = self.max_length
        if self.largest_micro == 0:
            tables = "" if self.tables_in_host else f"set {HOST_TABLES_SETTING} or "
            first = (
                f"Not even one row of {length} tokens fits by plan's estimate: shorten data.max_length, or "
                f"{tables}set train.offload_activations=true, or shard the model over several GPUs "
                "(configs/accelerate/fsdp_qlora.yaml)"
            )
        elif self.largest_micro < self.micro:
            rows = self.largest_micro
            knob = micro_batch_setting(rows, length, self.packing)
            if self.packing:
                knob += f", or train.per_device_train_batch_size={rows} where the recipe sets that"
            first = (
                f"plan's largest micro batch on this GPU: {rows} rows of {length} tokens ({knob}; with "
                "train.global_batch_size set, the run resumes with it)"
            )
        else:
            lower = lower_memory(self.tables_in_host)
            first = f"plan's estimate fits this micro batch, so the peak is above it: {lower}"
        return f"{first}. `qlora-sft plan RECIPE --gpu-mem {self.gpu_gib:g}` lists the launch configs that fit."


def gpu_outlook(recipe: Recipe, mode: LaunchMode, base_dir: Path | None, gpu_gib: float) -> GpuOutlook:
    """plan's estimate for this recipe and launch mode on a GPU of `gpu_gib` (reads config.json)."""
    shape = recipe_shape(recipe, base_dir)
    resolved = resolve_host_tables(recipe, mode, shape, gpu_gib)
    return GpuOutlook(
        gpu_gib=gpu_gib,
        estimate_gib=estimate_memory(shape, resolved, mode).total,
        largest_micro=largest_micro_batch(shape, recipe, mode, gpu_gib),
        micro=int(recipe.train.args.get("per_device_train_batch_size", 1)),
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        mode=mode,
        tables_in_host=launch.host_tables(resolved) == list(launch.HOST_TABLE_KEYS),
    )
