"""The recipe: the one YAML file a user edits.

This is the only module that knows the YAML shape. It loads a file, applies `section.key=value`
overrides (YAML-typed), validates everything at once (unknown keys with a suggestion, wrong types,
out-of-range values, contradictions) and returns a frozen, typed `Recipe`. Nothing here loads a
model or data.

Each section is a dataclass whose fields carry their documentation as attribute docstrings; the
recipe reference (docs/recipe-reference.md) is generated from them (`qlora_sft.docs`), so docs and code cannot drift.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import signal
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import RecipeError

SEED_MAX = 2**32 - 1  # numpy's (and so transformers.set_seed's) largest seed
INT64_MAX = 2**63 - 1  # the largest whole number torch, numpy and the tokenizers hold
# the most nodes, GPUs, tasks per node or CPUs per task submit asks SLURM for: far past any cluster, and
# below where SLURM's counts wrap (tasks per node and CPUs per task are 16-bit there, nodes and tasks
# 32-bit: `sbatch --nodes=4294967296` asks for 0 nodes; 65535 x 65535 tasks still fit in 32 bits)
SLURM_COUNT_MAX = 65535
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: torch computes with the recipe's numbers in it

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """Run name. The run directory is `output_dir/name`."""
    output_dir: str = "runs"
    """Root folder for run directories (relative paths are relative to the working directory)."""
    seed: int = field(default=42, metadata={"min": 0, "max": SEED_MAX})
    """Seed for model init (LoRA), data mixing, shuffling and the eval split (0 to 2**32 - 1, numpy's range)."""
    overwrite: bool = False
    """Start a different recipe in an existing run directory: the old directory is moved aside to
    `<name>.replaced-<time>` (never deleted). Without it such a launch is refused. A SLURM requeue of
    the job that did so resumes the run it started instead of replacing it again."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""
    """Local folder (with config.json) or hub id of the base model. Required."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id; beside a local folder it does not
    apply (transformers reads the folder as it is), and validate and train say so."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the non-quantized weights. `auto` = the compute dtype."""
    attn_implementation: str = "auto"
    """Attention kernel. `auto`: `varlen` on CUDA GPUs when packing is on (torch's variable-length
    flash attention over each packed example; no dense mask), `sdpa` otherwise. Or any name
    transformers knows: `sdpa`, `eager`, `flash_attention_2`, `flex_attention`, `varlen`."""
    liger_kernels: bool | Literal["auto"] = "auto"
    """Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE (the loss is already computed in
    chunks without full logits). `auto`: on where a CUDA GPU and the `liger-kernel` package are
    present (`pip install qlora-sft[fast]`)."""
    upcast_frozen: bool = False
    """Cast the frozen non-quantized weights (embeddings, norms, lm_head) to fp32, as
    peft's `prepare_model_for_kbit_training` does. Off: they stay in the compute dtype, which
    saves their memory twice over and keeps the residual stream in bf16; LoRA weights are fp32
    either way."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the model's repository to run. Off by default."""
    embedding_in_host_memory: bool | Literal["auto"] = "auto"
    """Keep the frozen input embedding table in host memory: each step gathers its tokens'
    rows on the CPU (into pinned memory on a GPU machine) and copies only those to the GPU, so the
    GPU does not hold vocabulary x hidden weights (1 GB at 8B for Llama-3's 128k vocabulary). One GPU
    and DDP, quantized models, a frozen plain embedding not tied to the output head and not matched by
    a lora.target_modules pattern (`true` is refused otherwise, by validate and before any weight
    loads). With `lm_head_in_host_memory`, on one H200 at 8B and 4 x 2048 tokens: 5.50 GiB peak
    instead of 7.22, at 0.95-1.01x the tokens/s in three calls (docs/benchmarks.md). `auto`: on for
    one CUDA GPU where memory is short, that is where plan's estimate with both tables on the GPU
    passes 75% of what the GPU offers (`plan --gpu-mem N` says which; a tied, non-plain or LoRA-matched
    table stays on the GPU, and the log says so); off otherwise, and under DDP (set `true` there)."""
    lm_head_in_host_memory: bool | Literal["auto"] = "auto"
    """Keep the frozen output head in pinned host memory: each forward copies it to the GPU on a side
    stream while the last decoder layers run, and the copy is freed once the loss's backward has used
    it, before the decoder layers' backward, where a step's peak is (1 GB off that peak at 8B for
    Llama-3's 128k vocabulary). One GPU and DDP, quantized models, a frozen bias-free linear head not
    tied to the input embedding and not matched by a lora.target_modules pattern (`true` is refused
    otherwise, by validate and before any weight loads). `auto`: as `embedding_in_host_memory`."""
    loader: Literal["auto", "transformers", "low_memory"] = "auto"
    """How the base weights are read. `low_memory`: the safetensors shards one tensor at a time, each
    linear weight quantized as it is read and placed for the launch mode; under FSDP/ZeRO-3 only
    rank 0 holds the weights (in CPU memory) until they are sharded, so no GPU ever holds the whole
    model and one larger than a GPU loads. Reads bitsandbytes 4-bit checkpoints too.
    `transformers`: `from_pretrained` (every rank quantizes the whole model onto its GPU).
    `auto`: low_memory under FSDP and ZeRO-3, transformers otherwise."""


@dataclass(frozen=True)
class QuantizationConfig:
    method: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    """Base weight quantization: `nf4` (QLoRA), `fp4`, `int8` (LLM.int8) or `none` (plain LoRA)."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit/param). 4-bit methods only."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of matmuls on dequantized weights. `auto` = bfloat16 on GPUs that support it,
    float16 on other GPUs, float32 on the CPU."""
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """Storage dtype of packed 4-bit weights. `auto` = uint8, or the compute dtype under
    ZeRO-3/FSDP (which shard parameters and need one dtype throughout)."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = field(default=16, metadata={"min": 1})
    """LoRA rank (>= 1): capacity and size of the adapter."""
    alpha: float = field(default=32.0, metadata={"gt": 0})
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    """Dropout on the LoRA input, in [0, 1). 0 (the default) lets `lora.fused` run; with dropout
    every adapted layer keeps a dropped copy of its input for the backward pass."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear`, a list of module names (e.g. [q_proj, v_proj]), or one
    string with regular-expression characters, which peft matches against each module's full name
    (e.g. `.*layers\\.(0|1)\\..*q_proj`)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. [lm_head]); off by default."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    fused: bool | Literal["auto"] = "auto"
    """Compute each adapted 4-bit layer as one autograd function: the frozen 4-bit matmul and the
    LoRA update `(x A^T) B^T x alpha/r` added into its output by the same GEMM (no separate
    scaling, sum and defensive copy of the output, forward and backward); the adapter weights,
    saving and merging are peft's. `auto`: on wherever it applies (4-bit base layers, `dropout` 0,
    `bias` none, no DoRA, one GPU, DDP, the CPU, FSDP's layer units or ZeRO-3's layer leaves, the
    defaults of both); layers it does not apply to run peft's own forward. `true` refuses recipes it
    cannot serve (dropout > 0, trained biases, QLORA_SFT_FSDP_UNITS=peft, QLORA_SFT_ZERO3_UNITS=modules).
    Layers that read one input (q/k/v, gate/up) are computed together, one autograd function per set
    (`QLORA_SFT_GROUPED_LORA=0`: each alone)."""
    init_from: str | None = None
    """Start from an existing LoRA adapter: a peft adapter folder (adapter_config.json +
    adapter_model.safetensors; local, relative to the recipe, or a hub id). Training starts from its
    weights with a new optimizer, schedule and step 0 (a new run, unlike `checkpoint.resume`, which
    continues a run). Its base model, `r`, `alpha` and target modules must match this recipe's."""


@dataclass(frozen=True)
class DataSource:
    path: str = ""
    """Local .jsonl/.json/.parquet/.csv file, a `datasets.save_to_disk` folder, or a hub dataset id."""
    format: Literal["auto", "alpaca", "dolly", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    """Row format; `auto` detects it from the first row's fields."""
    weight: float = field(default=1.0, metadata={"gt": 0})
    """Rows taken from this source = weight x its row count (0.5: a seeded random half; 2: every
    row twice). Ignored when `ratio` is set. Training sources only (an eval source is read in full)."""
    ratio: float | None = field(default=None, metadata={"gt": 0, "max": 1})
    """Share of the mixed dataset (0-1). Give it for every source or none; the mix is the largest
    one that needs no repetition. Training sources only."""
    split: str = "train"
    """Split of a hub dataset or a DatasetDict folder."""
    subset: str | None = None
    """Config (subset) name of a hub dataset."""
    system_prompt: str | None = None
    """System message added to rows of this source that have none."""
    max_rows: int | None = field(default=None, metadata={"min": 1})
    """Read at most this many rows of the source (before bad rows are skipped and before mixing): the
    first N, or with `max_rows_seed` a seeded random sample of N (in file order). Unset: every row."""
    max_rows_seed: int | None = field(default=None, metadata={"min": 0, "max": SEED_MAX})
    """With `max_rows`: draw the N rows at random with this seed instead of taking the first N (reads
    the source twice; not with `data.streaming`)."""


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[DataSource, ...] = ()
    """Training sources (at least one), mixed by `weight` or `ratio` with `run.seed`."""
    eval_sources: tuple[DataSource, ...] = ()
    """Separate evaluation sources, each read in full (`max_rows` limits one; `weight` and `ratio` are
    refused). When set, `eval_fraction` is not used."""
    eval_fraction: float = field(default=0.05, metadata={"min": 0, "lt": 1})
    """Fraction of the mixed rows held out for evaluation (0 = no eval)."""
    max_length: int = field(default=1024, metadata={"min": 8})
    """Tokens per example; longer rows are truncated (and counted)."""
    assistant_only_loss: bool = True
    """Train on assistant tokens only (with their end-of-turn token). False: train on every token."""
    chat_template: str = "auto"
    """`auto` = the tokenizer's own template; or `chatml`, `llama2` (`[INST]`), `alpaca`
    (`### Response:`) for base models without one, or a path to a .jinja file."""
    on_bad_row: Literal["error", "skip"] = "error"
    """`error`: stop at the first bad row, naming source, row and problem. `skip`: drop bad rows
    and report counts by reason."""
    packing: bool = True
    """Pack several examples into one row of up to max_length tokens (best-fit decreasing,
    padding-free: each example keeps its own positions, so attention never crosses examples; tested).
    Then the batch sizes count packed rows. False: one padded example per row."""
    streaming: bool = False
    """Read the training sources as a stream (local files or hub datasets, never loaded whole):
    rows are normalised and tokenized as training consumes them, through a shuffle buffer. Needs
    `train.max_steps`; sources mix by `ratio`; evaluation comes from `eval_sources` only. See
    [Data](data.md#streaming) for what changes (row counts, bad rows, resume)."""
    shuffle_buffer: int = field(default=10_000, metadata={"min": 1})
    """With `streaming`: rows held in the shuffle buffer (1 = the sources' order)."""
    num_proc: int | Literal["auto"] = field(default="auto", metadata={"min": 1})
    """Processes that read and tokenize the data (one process per node prepares it; the other
    ranks wait for its cache). `auto`: every core this process may use (its CPU affinity, e.g. what
    SLURM gave the job). The output does not depend on it."""
    allow_no_eos: bool = False
    """Train although no example trains the template's end-of-turn token (the model would never learn
    to stop), or the tokenizer names no `eos_token` (text rows then get none appended): for
    continued-pretraining style data. Off: such a recipe is refused."""
    rebuild: bool = False
    """Rebuild the prepared data cache even if one exists for this recipe (as `qlora-sft prepare
    --rebuild`): for changes the cache key cannot see (a hub dataset updated in place; the tokenizer
    is keyed by its content). Every launch with it rebuilds; prefer the one-off `prepare --rebuild`."""


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int | None = field(default=None, metadata={"min": 1})
    """Examples (or packed rows) per optimizer step over all processes. Gradient accumulation is
    derived from it: global = micro batch x processes x accumulation, so the recipe optimises the
    same way on 1 or N GPUs. Unset: `gradient_accumulation_steps` is used as given."""
    micro_batch_tokens: int = field(default=8192, metadata={"min": 8})
    """With packing, the micro batch is chosen by tokens rather than rows: when
    `per_device_train_batch_size` is not given it is `micro_batch_tokens // data.max_length` packed
    rows (at least 1; the largest such number that divides `global_batch_size`). Lower it if a step
    runs out of GPU memory: it may change between launches of a run, which then resumes (with
    `global_batch_size` set, the optimisation stays the same). Without packing the micro batch defaults to 4 rows."""
    offload_activations: bool | Literal["auto"] = "auto"
    """With gradient checkpointing, hold each decoder layer's input in pinned host memory between the
    forward and the backward pass (copied on a side stream, overlapping the compute; the layer is
    recomputed from it), instead of on the GPU: for an 8B Llama at 4 x 2048 tokens per micro batch,
    1.68 GiB less GPU memory for 2.6% of speed (measured on an H100).
    `auto`: on for one CUDA GPU, DDP, FSDP's layer units and ZeRO-3's layer leaves (the defaults of
    both), off with QLORA_SFT_FSDP_UNITS=peft or QLORA_SFT_ZERO3_UNITS=modules and on the CPU (no
    host to offload to); `true` forces it (CPU ranks too)."""
    nonfinite_patience: int = field(default=3, metadata={"min": 1})
    """Stop training with an error after this many consecutive optimizer steps whose loss or gradient
    norm is not finite; the newest complete checkpoint stays the one to resume from."""
    args: Mapping[str, Any] = field(default_factory=dict)
    """Every other key of `train:` is a `trl.SFTConfig` field (learning_rate,
    per_device_train_batch_size, num_train_epochs, max_steps, logging_steps, save_steps, ...)."""


@dataclass(frozen=True)
class CheckpointConfig:
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint of the run directory; `never`: start
    over (refused if checkpoints exist, unless `run.overwrite`); or a path to a checkpoint."""
    keep_last: int | None = field(default=None, metadata={"min": 1})
    """Keep only the newest N complete checkpoints (older ones are deleted once a newer one is
    complete). Unset: keep all."""
    signals: list[str] = field(default_factory=lambda: ["USR1", "TERM"])
    """Signals that mean "save and stop" (what SLURM sends before a time limit or preemption): the
    ranks save a complete checkpoint at the next step boundary and exit with code 75. `[]`: none
    (a signal then ends the ranks without a checkpoint; validate warns)."""
    allow_data_change: bool = False
    """Resume even though the training data changed since the checkpoint was written (files, sizes,
    modification times or the split); without it such a resume is refused and the change is named."""


@dataclass(frozen=True)
class ClusterConfig:
    nodes: int = field(default=1, metadata={"min": 1, "max": SLURM_COUNT_MAX})
    """Nodes for `qlora-sft submit` (flags override every key of this section)."""
    gpus_per_node: int = field(default=1, metadata={"min": 0, "max": SLURM_COUNT_MAX})
    """GPUs per node; one task (rank) per GPU. 0: CPU ranks (see tasks_per_node)."""
    tasks_per_node: int | None = field(default=None, metadata={"min": 1, "max": SLURM_COUNT_MAX})
    """Ranks per node; default: gpus_per_node (or 1 without GPUs)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    qos: str | None = None
    """SLURM quality of service."""
    time: str = "04:00:00"
    """Time limit: minutes, HH:MM:SS or D-HH:MM:SS."""
    cpus_per_task: int | None = field(default=None, metadata={"min": 1, "max": SLURM_COUNT_MAX})
    """CPU cores per task (rank)."""
    mem: str | None = None
    """Memory per node, SLURM syntax (e.g. 200G)."""
    constraint: str | None = None
    """SLURM node constraint (e.g. h100)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, each `--key=value` or `--flag` (e.g. [--exclusive])."""
    signal_grace_s: int = field(default=300, metadata={"min": 10})
    """Seconds before the time limit at which SLURM signals the job to save and requeue."""
    job_name: str = "qlora-sft"
    """SLURM job name."""
    folder: str | None = None
    """submitit's job folder (logs, pickles); default `<output_dir>/<name>.submitit/`. Each job writes
    into a subfolder named by its job id (`<folder>/<job id>/`)."""


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "quantization": QuantizationConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "cluster": ClusterConfig,
}

# Project defaults for SFTConfig fields that differ from TRL's defaults (QLoRA paper values).
TRAIN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2.0e-4,
    "gradient_checkpointing": True,
}  # the micro batch (per_device_train_batch_size) is derived: see "Global batch arithmetic" below
# On a CUDA GPU, when `train.optim` is not given: the paged 8-bit AdamW of bitsandbytes (a quarter
# of the optimizer-state memory of 32-bit AdamW, and no OOM on a long-sequence spike).
GPU_OPTIM = "paged_adamw_8bit"

# SFTConfig fields that another part of the recipe owns: setting them under `train:` is an error
# that names the owner, so a value never comes from two places.
TRAIN_OWNED: dict[str, str] = {
    "output_dir": "run.output_dir and run.name",
    "seed": "run.seed",
    "data_seed": "run.seed",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "padding_free": "data.packing",
    "assistant_only_loss": "data.assistant_only_loss",
    "completion_only_loss": "data.assistant_only_loss",
    "dataset_text_field": "data.sources[].format",
    "chat_template_path": "data.chat_template",
    "resume_from_checkpoint": "checkpoint.resume",
    "model_init_kwargs": "the model section",
    "trust_remote_code": "model.trust_remote_code",
    "bf16": "quantization.compute_dtype (model.dtype when quantization.method is none)",
    "fp16": "quantization.compute_dtype (model.dtype when quantization.method is none)",
    "run_name": "run.name (trackers name their run after it)",
    "logging_dir": "qlora-sft (logs go to <run dir>/logs)",
    "save_total_limit": "checkpoint.keep_last",
    "pad_token": "qlora-sft (a pad token distinct from EOS is chosen for you)",
    "eos_token": "the tokenizer",
    # forced by train.sft_args / the launch (they would be replaced without a word)
    "use_cpu": "the launch (a process without a GPU runs on the CPU; ACCELERATE_USE_CPU=true asks for CPU ranks)",
    "fsdp": "the accelerate config of the launch (distributed_type: FSDP with fsdp_config:)",
    "fsdp_config": "the accelerate config of the launch (distributed_type: FSDP with fsdp_config:)",
}


@dataclass(frozen=True)
class Recipe:
    run: RunConfig
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: str | None = None
    """The file the recipe was read from (None when built in code)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def data_cache_root(self) -> Path:
        """Where prepared data is cached (`data-<key>` folders, shared by the runs of one output_dir)."""
        return Path(self.run.output_dir) / ".cache"

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (same shape as the file)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if name == "train":
                own = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "args"}
                d = {**own, **dict(section.args)}
            else:
                d = _plain(dataclasses.asdict(section))
            out[name] = d
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def fingerprint(self, ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Flat `section.key -> value` view, minus the keys in `ignore`."""
        flat = _flatten(self.to_dict())
        return {k: v for k, v in flat.items() if k not in ignore}

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------
# Field documentation (attribute docstrings)
# --------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


# --------------------------------------------------------------------------------------------
# Loading YAML with line numbers
# --------------------------------------------------------------------------------------------


def _line_map(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}{i}"
            lines[key] = item.start_mark.line + 1
            lines.update(_line_map(item, key + "."))
    return lines


# A recipe is a few hundred values. YAML anchors and aliases (`&a` ... `*a`) let a small file stand
# for an exponentially large document (nine levels of nine aliases: 387 million values from 1 KB),
# which everything that walks the data (the line map, deep copies, JSON) would expand.
MAX_RECIPE_NODES = 100_000


class _AliasCycle(Exception):
    """An alias that refers to a node containing it (`a: &a [*a]`): the document is infinite."""


def _expanded_size(root: yaml.Node, limit: int = MAX_RECIPE_NODES) -> int:
    """Values (scalars, mappings, lists, keys included) in the document once every alias is expanded,
    counted once per node (memoized on node identity, so linear in the file however the aliases
    nest) and capped at `limit + 1`. Raises _AliasCycle for a recursive alias."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _AliasCycle
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total = min(limit + 1, total + size(child))
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _duplicate_keys(root: yaml.Node, source: str) -> list[str]:
    """A key given twice in one mapping (YAML keeps the last without a word: a second `lora:` section
    replaces the first whole), each as `file:line: `key` is given twice`. Keys merged in with
    `<<: *anchor` may be given again: that is how a merge is overridden. Each node is visited once
    (aliases share it), before merges are folded into their mappings."""
    problems: list[str] = []
    seen: set[int] = set()

    def walk(node: yaml.Node, prefix: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    walk(value_node, prefix)
                    continue
                key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
                if key_node.value in first:
                    problems.append(
                        f"{source}:{line}: `{key}` is given twice (lines {first[key_node.value]} and {line}); "
                        "YAML would keep the last without a word. Keep one"
                    )
                else:
                    first[key_node.value] = line
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}{i}.")

    walk(root, "")
    return problems


def _compose_recipe(text: str, source: str, duplicates: list[str] | None = None) -> tuple[Any, dict[str, int]]:
    """Parse recipe text once: compose its node graph, refuse an alias bomb or a recursive alias
    before anything expands it, then build the data and the line map from the same nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        try:
            size = _expanded_size(node)
        except _AliasCycle:
            raise RecipeError(
                [
                    "an alias (`*name`) refers to the anchor (`&name`) it is inside of, so the recipe never "
                    "ends. Write the values out instead of aliasing the mapping or list that contains them."
                ],
                source,
            ) from None
        if size > MAX_RECIPE_NODES:
            where = ""
            if isinstance(node, yaml.MappingNode):
                key, _ = max(node.value, key=lambda pair: _expanded_size(pair[1]))
                where = f" (most of them under `{key.value}`, line {key.start_mark.line + 1})"
            raise RecipeError(
                [
                    f"expands to more than {MAX_RECIPE_NODES:,} values through YAML anchors and aliases "
                    f"(`&name` ... `*name`){where}; a recipe is a few hundred. Remove the aliases that "
                    "repeat other aliases (or the keys that hold them) and write the values out."
                ],
                source,
            )
        twice = _duplicate_keys(node, source)
        if twice and duplicates is None:
            raise RecipeError(twice, source)
        if duplicates is not None:
            duplicates.extend(twice)
        data = loader.construct_document(node)
        lines = _line_map(node)  # after construction, which folds merge keys (`<<: *name`) into their mappings
    finally:
        loader.dispose()
    return data, lines


def read_yaml(
    path: str | os.PathLike[str], duplicates: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a recipe file: (data, `dotted.key -> line number`). A key given twice is refused, or with
    `duplicates` added to it (to be reported with the recipe's other problems)."""
    p = Path(path)
    if p.is_dir():
        raise RecipeError([f"recipe {p} is a folder; give the path to the .yaml recipe in it"])
    if not p.is_file():
        raise RecipeError([f"recipe file not found: {p} (give the path to a .yaml recipe)"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # saved as UTF-16 or Latin-1
        raise RecipeError(
            [
                f"recipe {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8 for a Latin-1 file)"
            ]
        ) from None
    except OSError as exc:
        raise RecipeError([f"recipe {p} cannot be read ({exc.strerror or exc})"]) from None
    try:
        data, lines = _compose_recipe(text, str(p), duplicates)
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], source=str(p)) from None
    except RecursionError:
        raise RecipeError(
            ["nests mappings or lists too deeply to read; a recipe is a few levels deep"], str(p)
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(["the top level must be a mapping of sections (run:, model:, ...)"], str(p))
    return data, lines


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply `section.key=value` overrides; values are parsed as YAML (`1e-4`, `true`, `[a, b]`).
    A numeric segment indexes a list (`data.sources.0.weight=2`). Returns (new data, problems)."""
    data = copy.deepcopy(data)
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override `{item}` is not of the form section.key=value")
            continue
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            problems.append(f"override `{item}`: the key must be section.key (e.g. train.learning_rate)")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        ok = True
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdecimal() or int(part) >= len(node):
                    problems.append(f"override `{dotted}`: `{part}` is not an index of the list")
                    ok = False
                    break
                if isinstance(node[int(part)], str) and parts[i - 1] in ("sources", "eval_sources"):
                    node[int(part)] = {"path": node[int(part)]}  # a source given as a bare path
                node = node[int(part)]
            elif not isinstance(node, dict) or not isinstance(node.get(part, {}), dict | list | None):
                problems.append(f"override `{dotted}`: `{here}` is not a section")
                ok = False
                break
            elif parts[i + 1].isdecimal() and not isinstance(node.get(part), list):
                rest = ".".join(parts[i + 2 :])
                entry = f"{{{rest}: {raw.strip()}}}" if rest else raw.strip()
                if rest and rest != "path":
                    entry = f"{{path: ..., {rest}: {raw.strip()}}}"
                problems.append(
                    f"override `{item}`: `{here}` has no entry {parts[i + 1]} (the recipe gives no list there); "
                    f"give the whole list instead: {here}=[{entry}]"
                )
                ok = False
                break
            else:
                if node.get(part) is None:  # `train:` with every key commented out reads as null
                    node[part] = {}
                node = node[part]
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdecimal() or int(last) >= len(node):
                problems.append(f"override `{dotted}`: `{last}` is not an index of the list")
                continue
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            problems.append(f"override `{dotted}`: `{'.'.join(parts[:-1])}` is not a section")
    return data, problems


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class _Problems:
    """The problems of one recipe, each prefixed with where the key came from: the file and line,
    or the command-line override that set it."""

    def __init__(self, source: str | None, lines: Mapping[str, int], overrides: Mapping[str, str] | None = None):
        self.source = source
        self.lines = lines
        self.overrides = overrides or {}
        self.problems: list[str] = []

    def where(self, key: str) -> str:
        override = next((o for k, o in self.overrides.items() if key == k or key.startswith(k + ".")), None)
        if override is not None:
            return f"override `{override}`: "
        line = self.lines.get(key)
        if self.source and line:
            return f"{self.source}:{line}: "
        return ""

    def add(self, key: str, message: str, at: str | None = None) -> None:
        """A problem of `key`, placed at the line of `at` where the file does not give `key` itself."""
        where = self.where(key) or (self.where(at) if at else "")
        self.problems.append(f"{where}`{key}` {message}")

    def has(self, key: str) -> bool:
        """Whether a problem of `key` is reported already."""
        return any(f"`{key}` " in p for p in self.problems)

    def note(self, message: str) -> None:
        """A problem of the whole file, not of one key."""
        self.problems.append(f"{self.source}: {message}" if self.source else message)


# Names users bring from peft / bitsandbytes / notebooks, and the recipe key they mean.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target": "target_modules",
    "quant_type": "method",
    "bnb_4bit_quant_type": "method",
    "use_double_quant": "double_quant",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "bnb_4bit_quant_storage": "quant_storage",
    "model_name": "name_or_path",
    "model_id": "name_or_path",
    "path": "name_or_path",
    "torch_dtype": "dtype",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "dataset": "sources",
    "datasets": "sources",
    "batch_size": "per_device_train_batch_size",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "grad_accum": "gradient_accumulation_steps",
}


# Top-level options of an axolotl or LLaMA-Factory config -> where a qlora-sft recipe has them (a
# user's first try is often their old config as it is). docs/migration.md has the same table, with
# notes; a test keeps the two in step.
FOREIGN_OPTIONS: dict[str, str] = {
    # axolotl
    "base_model": "model.name_or_path",
    "revision_of_model": "model.revision",
    "load_in_4bit": "quantization.method: nf4",
    "load_in_8bit": "quantization.method: int8",
    "adapter": "quantization.method (qlora: nf4; lora: none)",
    "lora_r": "lora.r",
    "lora_target_linear": "lora.target_modules: all-linear",
    "lora_target_modules": "lora.target_modules",
    "lora_modules_to_save": "lora.modules_to_save",
    "lora_model_dir": "lora.init_from",
    "datasets": "data.sources",
    "test_datasets": "data.eval_sources",
    "val_set_size": "data.eval_fraction",
    "sequence_len": "data.max_length",
    "sample_packing": "data.packing",
    "train_on_inputs": "data.assistant_only_loss",
    "chat_template": "data.chat_template",
    "dataset_prepared_path": "<run.output_dir>/.cache",
    "dataset_processes": "data.num_proc",
    "micro_batch_size": "train.per_device_train_batch_size",
    "num_epochs": "train.num_train_epochs",
    "optimizer": "train.optim",
    "lr_scheduler": "train.lr_scheduler_type",
    "flash_attention": "model.attn_implementation",
    "saves_per_epoch": "train.save_strategy",
    "auto_resume_from_checkpoints": "checkpoint.resume",
    "wandb_project": "train.report_to",
    "use_mlflow": "train.report_to",
    "bnb_config_kwargs": "quantization.method (bnb_4bit_quant_type) and quantization.double_quant",
    "shuffle_merged_datasets": "run.seed",
    # LLaMA-Factory
    "model_name_or_path": "model.name_or_path",
    "model_revision": "model.revision",
    "quantization_bit": "quantization.method (4: nf4; 8: int8)",
    "quantization_type": "quantization.method",
    "quantization_method": "quantization.method (bitsandbytes with quantization_bit 4: nf4)",
    "finetuning_type": "quantization.method (lora without quantization_bit: none)",
    "double_quantization": "quantization.double_quant",
    "lora_rank": "lora.r",
    "lora_target": "lora.target_modules",
    "additional_target": "lora.modules_to_save",
    "adapter_name_or_path": "lora.init_from",
    "dataset": "data.sources",
    "eval_dataset": "data.eval_sources",
    "max_samples": "data.sources[].max_rows",
    "val_size": "data.eval_fraction",
    "cutoff_len": "data.max_length",
    "neat_packing": "data.packing",
    "train_on_prompt": "data.assistant_only_loss",
    "template": "data.chat_template",
    "tokenized_path": "<run.output_dir>/.cache",
    "overwrite_cache": "data.rebuild (every launch; once: qlora-sft prepare --rebuild)",
    "disable_gradient_checkpointing": "train.gradient_checkpointing (the opposite value)",
    "preprocessing_num_workers": "data.num_proc",
    "overwrite_output_dir": "run.overwrite",
    "flash_attn": "model.attn_implementation",
    # both
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "warmup_ratio": "train.warmup_steps (a value below 1 is a ratio)",
}


def _foreign_option(name: str) -> str | None:
    """Where a recipe keeps what the top-level key `name` of another tool's config (or a section's
    own field written at the top) sets, or None."""
    if name in FOREIGN_OPTIONS:
        return FOREIGN_OPTIONS[name]
    if name in TRAIN_OWNED:
        return TRAIN_OWNED[name]
    for section, cls in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(cls)} and section != "train":
            return f"{section}.{name}"
    if name in sft_field_types():
        return f"train.{name}"
    return None


def _suggest(name: str, options: list[str], prefix: str = "") -> str:
    """`; did you mean `prefix.closest`?` (aliases first, then difflib), or ''."""
    alias = ALIASES.get(name.lower())
    if alias in options:
        return f"; did you mean `{prefix}{alias}`?"
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean `{prefix}{match[0]}`?" if match else ""


def _unknown_key_hint(name: str, fields: list[str], section: str, cls: type) -> str:
    """The hint for an unknown key of a section: its own key an alias names (`lora.lora_alpha` is
    `lora.alpha`), then the key of another section it is (`model.max_length` is `data.max_length`,
    `lora.learning_rate` is `train.learning_rate`), then the closest key of its own."""
    alias = ALIASES.get(name.lower())
    if alias in fields:
        return f"; did you mean `{section}.{alias}`?"
    if cls is not DataSource:
        place = _foreign_option(name) or (_foreign_option(alias) if alias else None)
        if place:
            return f"; it belongs to `{place}`"
    return _suggest(name, fields, section + ".")


def _check_value(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Is `value` an instance of `annotation` (the subset of typing the recipe uses)? Returns
    (ok, normalised value)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin is Literal:
        return value in typing.get_args(annotation), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, v = _check_value(value, arg)
            if ok:
                return True, v
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False, value
        (item_t, *_) = typing.get_args(annotation) or (Any,)
        out = []
        for v in value:
            ok, nv = _check_value(v, item_t)
            if not ok:
                return False, value
            out.append(nv)
        return True, (list(out) if origin is list else tuple(out))
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return isinstance(value, dict), value
    return True, value


def _type_problem(value: Any, annotation: Any) -> str:
    """`is <value>; expected <type>`, with how to write a whole number YAML 1.1 read as a string
    (`1e3` has no dot: a string, which a key that takes a float reads as the number, a count does not)."""
    problem = f"is {json.dumps(value, default=str)}; expected {type_name(annotation)}"
    if isinstance(value, str) and _admits(annotation, int):
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
            if math.isfinite(number) and number == int(number) and abs(number) <= INT64_MAX:
                problem += f" (YAML reads `{value.strip()}` as a string; write it as {int(number)})"
            elif math.isfinite(number) and number == int(number):
                problem += f" (a count must be <= {INT64_MAX})"
    return problem


def _check_range(key: str, value: Any, meta: Mapping[str, Any], ctx: _Problems) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if not math.isfinite(value):
        return  # NaN passes every comparison: `_nonfinite_problems` refuses it (and infinities)
    if "min" in meta and value < meta["min"]:
        ctx.add(key, f"is {value}; it must be >= {meta['min']}")
    if "gt" in meta and value <= meta["gt"]:
        ctx.add(key, f"is {value}; it must be > {meta['gt']}")
    if "max" in meta and value > meta["max"]:
        ctx.add(key, f"is {value}; it must be <= {meta['max']}")
    if "lt" in meta and value >= meta["lt"]:
        ctx.add(key, f"is {value}; it must be < {meta['lt']}")


def _build_section(cls: type, raw: Any, key: str, ctx: _Problems) -> Any:
    """Build one dataclass section from raw YAML data, recording problems in ctx."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        ctx.add(key, f"must be a mapping of keys, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        full = f"{key}.{name}"
        if name not in fields:
            ctx.add(full, f"is not a recipe key{_unknown_key_hint(str(name), list(fields), key, cls)}")
            continue
        ann = hints[name]
        # Nested lists of sources.
        if name in ("sources", "eval_sources"):
            if value is None:
                value = []
            if isinstance(value, dict):
                value = [value]
            if not isinstance(value, list):
                ctx.add(full, "must be a list of sources (each with at least `path:`)")
                continue
            items = []
            for i, item in enumerate(value):
                if isinstance(item, str):
                    item = {"path": item}
                items.append(_build_section(DataSource, item, f"{full}.{i}", ctx))
            kwargs[name] = tuple(items)
            continue
        ok, norm = _check_value(value, ann)
        if not ok and full == "cluster.time" and isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted `1:00:00` as the base-60 number 3600, and `90` as a number
            ctx.add(
                full,
                f'is the number {value}: write the time in quotes, e.g. time: "04:00:00" or time: "90" '
                "(minutes); unquoted, YAML reads H:MM:SS as one base-60 number (1:00:00 is 3600)",
            )
            continue
        if not ok:
            ctx.add(full, _type_problem(value, ann))
            continue
        _check_range(full, norm, fields[name].metadata, ctx)
        kwargs[name] = norm
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - all keys were checked above
        ctx.add(key, str(exc))
        return cls()


class _Other:
    """Stands for an annotation the recipe check does not look into (an enum, a dict, a class)."""


_SCALARS: dict[str, Any] = {"bool": bool, "int": int, "float": float, "str": str, "none": type(None)}


def _reduce(annotation: Any) -> Any:
    """An SFTConfig annotation reduced to what the recipe check uses: plain scalars, Literals, Any,
    unions of these, and `_Other` for the rest (a union with `_Other` is checked as Any, but still
    says whether it takes a str or a bool)."""
    if annotation is Any:
        return Any
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_reduce(a) for a in typing.get_args(annotation))]  # noqa: UP007
    if annotation in _SCALARS.values() or origin is Literal:
        return annotation
    return _Other


def _encode(annotation: Any) -> Any:
    if annotation is Any:
        return "any"
    if annotation is _Other:
        return "other"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return {"union": [_encode(a) for a in typing.get_args(annotation)]}
    if origin is Literal:
        return {"literal": list(typing.get_args(annotation))}
    return next(k for k, v in _SCALARS.items() if v is annotation)


def _decode(data: Any) -> Any:
    if isinstance(data, dict) and "union" in data:
        return typing.Union[tuple(_decode(a) for a in data["union"])]  # noqa: UP007
    if isinstance(data, dict):
        return Literal[tuple(data["literal"])]
    return {"any": Any, "other": _Other, **_SCALARS}[data]


def _vocabulary_cache() -> Path:
    """Where the `train:` vocabulary of the installed trl/transformers is kept between commands."""
    from importlib.metadata import version

    from .files import user_cache_dir

    return user_cache_dir() / f"sft-fields-v2-trl-{version('trl')}-transformers-{version('transformers')}.json"


def _read_vocabulary() -> tuple[dict[str, Any], dict[str, tuple[str, ...]]] | None:
    """The vocabulary kept in the cache file, or None where it is missing, unreadable or foreign."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError):
        data = json.loads(_vocabulary_cache().read_text(encoding="utf-8"))
        fields = {str(k): _decode(v) for k, v in data["fields"].items()}
        choices = {str(k): tuple(str(c) for c in v) for k, v in data["choices"].items()}
        if fields and "learning_rate" in fields and "optim" in choices:
            return fields, choices
    return None


def _build_vocabulary() -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """The vocabulary read from trl itself, and kept in the cache file."""
    import enum

    from trl import SFTConfig

    try:
        hints = typing.get_type_hints(SFTConfig)
    except Exception:  # unresolvable forward references in some versions: accept any value
        hints = {}
    names = [f.name for f in dataclasses.fields(SFTConfig) if f.init]
    fields = {name: _reduce(hints.get(name, Any)) for name in names}
    # the names TrainingArguments turns into an enum (`OptimizerNames(optim)`) when SFTConfig is
    # built: after the model has loaded, so a typo is refused with the recipe instead
    choices: dict[str, tuple[str, ...]] = {}
    for name in names:
        hint = hints.get(name, Any)
        for arg in typing.get_args(hint) or (hint,):
            if isinstance(arg, type) and issubclass(arg, enum.Enum):
                choices[name] = tuple(str(member.value) for member in arg)
    with contextlib.suppress(OSError, StopIteration):
        from .files import atomic_write_text

        cache = _vocabulary_cache()
        cache.parent.mkdir(parents=True, exist_ok=True)
        encoded = {"fields": {k: _encode(v) for k, v in fields.items()}, "choices": choices}
        atomic_write_text(cache, json.dumps(encoded, indent=0))
    return fields, choices


@functools.cache
def sft_field_types() -> dict[str, Any]:
    """Field name -> (reduced) annotation of `trl.SFTConfig`: the vocabulary of the `train:` section.

    Importing trl costs seconds (it imports transformers' Trainer and peft); the vocabulary is
    kept in a small file keyed by the installed trl and transformers versions, so `plan`,
    `validate` and the SLURM templates' checks do not pay it twice. A missing, unreadable or
    foreign file is rebuilt from trl itself."""
    return (_read_vocabulary() or _build_vocabulary())[0]


@functools.cache
def sft_field_choices() -> dict[str, tuple[str, ...]]:
    """Field name -> the names transformers takes for it, for the `train:` keys it reads into an enum
    (optim, lr_scheduler_type, the strategies); kept with `sft_field_types`."""
    return (_read_vocabulary() or _build_vocabulary())[1]


def _admits(annotation: Any, kind: type) -> bool:
    """Does the annotation accept values of `kind` (Any does)?"""
    if annotation is kind or annotation is Any:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits(a, kind) for a in typing.get_args(annotation))
    return False


def _checkable_type(annotation: Any) -> Any:
    """SFTConfig annotations include enums and dicts; only check plain scalar types."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [_checkable_type(a) for a in typing.get_args(annotation)]
        if any(a is Any for a in args):
            return Any
        return typing.Union[tuple(args)]  # noqa: UP007
    if annotation in (bool, int, float, str, type(None)) or origin is Literal:
        return annotation
    return Any


def _build_train(raw: Any, ctx: _Problems) -> TrainConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        ctx.add("train", f"must be a mapping of keys, got {type(raw).__name__}")
        return TrainConfig()
    sft = sft_field_types()
    args: dict[str, Any] = dict(TRAIN_DEFAULTS)
    # qlora-sft's own keys (global_batch_size, micro_batch_tokens): checked like every other section
    own = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "args"}
    hints = typing.get_type_hints(TrainConfig)
    extra: dict[str, Any] = {}
    for name, value in raw.items():
        full = f"train.{name}"
        if name in own:
            ok, norm = _check_value(value, hints[name])
            if not ok:
                ctx.add(full, _type_problem(value, hints[name]))
                continue
            _check_range(full, norm, own[name].metadata, ctx)
            extra[name] = norm
            continue
        if name in TRAIN_OWNED:
            ctx.add(full, f"is set by {TRAIN_OWNED[name]}; remove it from `train:`")
            continue
        if name not in sft:
            hint = _suggest(str(name), [*sft, *own], "train.")
            other = _owner_of(str(name)) or FOREIGN_OPTIONS.get(str(name))  # `lora_r` is lora.r, not local_rank
            if other:
                hint = f"; did you mean `{other}`?" if other.startswith("train.") else f"; it belongs to `{other}`"
            ctx.add(full, f"is not a trl.SFTConfig field{hint}")
            continue
        if isinstance(value, bool) and _admits(sft[name], str) and not _admits(sft[name], bool):
            # YAML 1.1 reads an unquoted `no` as false (`save_strategy: no`); these fields take strings
            if value:
                ctx.add(full, 'is true; expected a string (quote it: "yes")')
                continue
            value = "no"
        ann = _checkable_type(sft[name])
        ok, norm = _check_value(value, ann)
        if not ok:
            ctx.add(full, _type_problem(value, ann))
            continue
        choices = sft_field_choices().get(name)
        if choices and norm not in choices:
            shown = json.dumps(norm, default=str)
            hint = _suggest(norm, list(choices)).removeprefix("; ") if isinstance(norm, str) else ""
            known = f"expected one of {', '.join(choices)}"
            ctx.add(full, f"is {shown}; {hint} ({known})" if hint else f"is {shown}; {known}")
            continue
        args[name] = norm
    from .tracking import report_to_problems

    for problem in report_to_problems(args.get("report_to")):
        ctx.add("train.report_to", problem)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        v = args.get(name)
        if v is not None and isinstance(v, int) and v < 1:
            ctx.add(f"train.{name}", f"is {v}; it must be >= 1")
    return TrainConfig(args=types.MappingProxyType(args), **extra)


def _owner_of(name: str) -> str | None:
    """If `name` is a key of another section, return `section.name`."""
    for section, cls in SECTIONS.items():
        if section == "train":
            continue
        if name in {f.name for f in dataclasses.fields(cls)}:
            return f"{section}.{name}"
    return None


def _check_contradictions(recipe: Recipe, raw: Mapping[str, Any], ctx: _Problems) -> None:
    q = recipe.quantization
    explicit_q = raw.get("quantization") or {}
    if q.method in ("int8", "none") and isinstance(explicit_q, dict) and explicit_q.get("double_quant"):
        ctx.add(
            "quantization.double_quant",
            f"is true but quantization.method is {q.method}; double quantization applies to nf4/fp4 "
            "only. Remove double_quant or use method nf4.",
        )
    if q.method in ("int8", "none") and q.quant_storage != "auto":
        ctx.add(
            "quantization.quant_storage",
            f"applies to 4-bit methods only (method is {q.method}); remove it",
        )
    if not recipe.model.name_or_path:
        ctx.add("model.name_or_path", "is required: a local model folder or a hub id")
    if not recipe.data.sources:
        ctx.add("data.sources", "needs at least one source (e.g. `- path: data/train.jsonl`)")
    for kind in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(recipe.data, kind)):
            if not src.path.strip():  # a stray `-`, or an entry without `path:`
                ctx.add(
                    f"data.{kind}.{i}.path",
                    "is required: a .jsonl/.json/.parquet/.csv file, a folder or a hub dataset id",
                    at=f"data.{kind}.{i}",
                )
    for i, src in enumerate(recipe.data.eval_sources):
        # read in full, also under data.streaming (where the eval sources are prepared as a data set of
        # their own, and a weight would have sampled them); 1.0 and null are what a resolved recipe writes
        for name, value, unset in (("weight", src.weight, 1.0), ("ratio", src.ratio, None)):
            if value != unset and not ctx.has(f"data.eval_sources.{i}.{name}"):
                ctx.add(
                    f"data.eval_sources.{i}.{name}",
                    f"is {value}, but an eval source is read in full (weight and ratio mix the training sources); "
                    f"remove it (a training source reused with `*anchor` brings its {name}: write "
                    f"`{{<<: *anchor, {name}: {'1' if unset else 'null'}}}`), or give max_rows: N to evaluate on N "
                    "of its rows",
                    at=f"data.eval_sources.{i}",
                )
    ratios = [s.ratio for s in recipe.data.sources]
    if any(r is not None for r in ratios):
        if any(r is None for r in ratios):
            ctx.add("data.sources", "sets `ratio` on some sources but not all; give every source a ratio or none")
        elif abs(sum(r for r in ratios if r) - 1.0) > 1e-6:
            ctx.add("data.sources", f"ratios sum to {sum(r for r in ratios if r):g}; they must sum to 1")
    if recipe.data.eval_sources and "eval_fraction" in (raw.get("data") or {}) and recipe.data.eval_fraction:
        ctx.add("data.eval_fraction", "is set together with data.eval_sources; use one of them")
    if recipe.data.streaming:
        _streaming_problems(recipe, raw, ctx)
    if recipe.lora.fused is True:
        for reason in fused_lora_obstacles(recipe):
            ctx.add("lora.fused", f"is true but {reason}, or set lora.fused: auto (peft's layer then runs)")
    _path_problems(recipe, ctx)
    _target_module_problems(recipe.lora, ctx)
    if not recipe.run.name or "/" in recipe.run.name or recipe.run.name in (".", ".."):
        ctx.add("run.name", f"is {recipe.run.name!r}; use a plain folder name (no slashes)")
    if recipe.checkpoint.resume not in ("auto", "never") and not recipe.checkpoint.resume:
        ctx.add("checkpoint.resume", "must be auto, never, or a checkpoint path")
    for name in recipe.checkpoint.signals:
        sig = f"SIG{name.upper().removeprefix('SIG')}"
        if sig not in signal.Signals.__members__ or sig in ("SIGKILL", "SIGSTOP"):
            ctx.add("checkpoint.signals", f"has {name!r}, not a catchable signal name (e.g. USR1, TERM)")

    args = recipe.train.args
    _batch_problems(recipe, raw, ctx)
    _migration_problems(recipe, ctx)
    steps, epochs = args.get("max_steps", -1), args.get("num_train_epochs", 3.0)
    if (steps is None or steps <= 0) and epochs is not None and epochs <= 0:
        ctx.add("train.num_train_epochs", "must be > 0 when train.max_steps is not set")
    if "eval_strategy" in args and args["eval_strategy"] != "no":
        if not recipe.data.eval_sources and (recipe.data.eval_fraction == 0 or recipe.data.streaming):
            ctx.add(
                "train.eval_strategy",
                "asks for evaluation but there is no eval split; set data.eval_fraction or data.eval_sources",
            )


def _control_character(text: str) -> str | None:
    """The first control character (C0 or DEL) in `text`, or None."""
    return next((c for c in text if ord(c) < 32 or ord(c) == 127), None)


def _path_problems(recipe: Recipe, ctx: _Problems) -> None:
    """Paths and names holding a control character: a NUL is refused by the OS (`embedded null byte`,
    once the model has loaded, or as the recipe's paths are resolved), a newline splits the lines of
    the sbatch script that names the submitit folder; none is ever meant (a system prompt may hold them)."""
    named: list[tuple[str, Any]] = [
        ("run.name", recipe.run.name),
        ("run.output_dir", recipe.run.output_dir),
        ("model.name_or_path", recipe.model.name_or_path),
        ("model.revision", recipe.model.revision),
        ("lora.init_from", recipe.lora.init_from),
        ("data.chat_template", recipe.data.chat_template),
        ("checkpoint.resume", recipe.checkpoint.resume),
        ("cluster.folder", recipe.cluster.folder),
        ("train.deepspeed", recipe.train.args.get("deepspeed")),
    ]
    for kind in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(recipe.data, kind)):
            named += [(f"data.{kind}.{i}.{name}", getattr(src, name)) for name in ("path", "split", "subset")]
    for key, value in named:
        bad = _control_character(value) if isinstance(value, str) else None
        if bad:
            ctx.add(key, f"is {value!r}, which holds the control character {bad!r}; remove it")
    # the run directory with bytes that are not UTF-8 (a Latin-1 name given on the command line, which
    # Python hands on as surrogates): tensorboard's writer and safetensors cannot write there, and
    # failed once the model had loaded
    from .files import not_utf8

    for key in ("run.name", "run.output_dir"):
        value = getattr(recipe.run, key.split(".")[1])
        shown = not_utf8(value) if isinstance(value, str) else None
        if shown:
            ctx.add(
                key,
                f"holds bytes that are not UTF-8 ({shown}), and the model libraries (tensorboard, safetensors) "
                "cannot write under such a path: give it a UTF-8 name",
            )


REGEX_CHARACTERS = ".*+?[](){}|\\^$"


def _target_module_problems(lora: LoraConfig, ctx: _Problems) -> None:
    """Target modules that adapt nothing: peft finds no module and refuses once the model is loaded."""
    target = lora.target_modules
    if isinstance(target, str) and target != "all-linear" and not set(target) & set(REGEX_CHARACTERS):
        # peft matches a string as a regular expression against full module paths
        # (model.layers.0.self_attn.q_proj): a bare name matches none
        ctx.add(
            "lora.target_modules", f"is {json.dumps(target)}; give all-linear or a list of module names: [{target}]"
        )
    elif isinstance(target, list) and not target:
        ctx.add("lora.target_modules", "is []; name at least one module (e.g. [q_proj, v_proj]) or give all-linear")
    for key, names in (("lora.target_modules", target), ("lora.modules_to_save", lora.modules_to_save)):
        if isinstance(names, list) and any(not name.strip() for name in names):
            ctx.add(key, "holds an empty name; remove it")  # a suffix every module name ends with


def _migration_problems(recipe: Recipe, ctx: _Problems) -> None:
    """Keys qlora-sft would otherwise replace or drop without a word (what `train.sft_args` forces),
    trainer settings that contradict each other (SFTConfig refuses them only once the model is
    loaded), and the per-source row limits."""
    args = recipe.train.args
    kwargs = args.get("gradient_checkpointing_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        ctx.add("train.gradient_checkpointing_kwargs", "must be a mapping (e.g. {preserve_rng_state: true})")
    elif kwargs and kwargs.get("use_reentrant") is True:
        ctx.add(
            "train.gradient_checkpointing_kwargs",
            "sets use_reentrant: true; qlora-sft checkpoints with the non-reentrant variant (the reentrant one "
            "breaks DDP with LoRA: parameters marked ready twice; under ZeRO-3 TRL switches to it itself). "
            "Remove use_reentrant (its other keys are kept)",
        )
    no_eval = not recipe.data.eval_sources and (recipe.data.eval_fraction == 0 or recipe.data.streaming)
    if args.get("eval_on_start") and no_eval:
        ctx.add(
            "train.eval_on_start",
            "asks for an evaluation before training but there is no eval split; set data.eval_fraction or "
            "data.eval_sources, or remove eval_on_start",
        )
    if args.get("load_best_model_at_end"):
        if no_eval:
            ctx.add(
                "train.load_best_model_at_end",
                "asks for the checkpoint with the best evaluation but there is no eval split; set "
                "data.eval_fraction or data.eval_sources, or remove load_best_model_at_end",
            )
        save, every = args.get("save_steps"), args.get("eval_steps")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 1 for v in (save, every))
        if numbers and math.isfinite(save) and math.isfinite(every) and save % every:
            ctx.add(
                "train.save_steps",
                f"is {save}, not a multiple of train.eval_steps={every}: train.load_best_model_at_end picks a "
                "checkpoint by its evaluation, so every save must come with one. Use a multiple of eval_steps",
            )
    if args.get("dataloader_prefetch_factor") is not None and not (args.get("dataloader_num_workers") or 0) > 0:
        ctx.add(
            "train.dataloader_prefetch_factor",
            "applies only with train.dataloader_num_workers > 0 (batches prepared ahead in worker processes); "
            "set dataloader_num_workers or remove dataloader_prefetch_factor",
        )
    for kind in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(recipe.data, kind)):
            if src.max_rows_seed is not None and src.max_rows is None:
                ctx.add(f"data.{kind}.{i}.max_rows_seed", "is set without max_rows; set max_rows: N (rows to draw)")
            if src.max_rows_seed is not None and recipe.data.streaming and kind == "sources":
                ctx.add(
                    f"data.{kind}.{i}.max_rows_seed",
                    "needs the whole source to draw from, which a stream does not have; with data.streaming "
                    "take the first max_rows rows (remove max_rows_seed)",
                )


def _with_resolved_paths(recipe: Recipe, ctx: _Problems) -> Recipe:
    """Paths to files other than data, resolved as the recipe names them (relative to the recipe's
    folder; an override's, to the working directory), so that the run's recipe.yaml names the same
    file from anywhere: `train.deepspeed` (a DeepSpeed JSON) and a local `lora.init_from`."""
    args = dict(recipe.train.args)
    ds = args.get("deepspeed")
    if isinstance(ds, dict):
        ctx.add(
            "train.deepspeed",
            "is a mapping; give the path of a DeepSpeed JSON file (e.g. configs/deepspeed/zero3.json)",
        )
    elif isinstance(ds, str) and ds and not _control_character(ds):
        args["deepspeed"] = str(_resolve_named_path(ds, "train.deepspeed", ctx))
    init = recipe.lora.init_from
    lora = recipe.lora
    if init and not _control_character(init):  # one that has one is refused (`_path_problems`)
        local = _resolve_named_path(init, "lora.init_from", ctx)
        if local.exists() or init.startswith((".", "/", "~")) or init.count("/") != 1:
            lora = dataclasses.replace(lora, init_from=str(local))  # else a hub id (org/name)
    if args == dict(recipe.train.args) and lora is recipe.lora:
        return recipe
    train = dataclasses.replace(recipe.train, args=types.MappingProxyType(args))
    return dataclasses.replace(recipe, train=train, lora=lora)


def _resolve_named_path(path: str, key: str, ctx: _Problems) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    named_on_command_line = any(key == k or key.startswith(k + ".") for k in ctx.overrides)
    if ctx.source and not named_on_command_line:
        return (Path(ctx.source).resolve().parent / p).resolve()
    return p.resolve()


def fused_lora_obstacles(recipe: Recipe) -> list[str]:
    """Why the fused 4-bit + LoRA layer (`lora.fused`) cannot compute this recipe's adapters, on
    any launch (FSDP and ZeRO-3 rule it out too: `launch.check_launch_compat`)."""
    lora, method = recipe.lora, recipe.quantization.method
    reasons = []
    if lora.dropout > 0:
        reasons.append(f"lora.dropout is {lora.dropout:g}; the fused layer has no dropout. Set lora.dropout: 0")
    if lora.bias != "none":
        reasons.append(f"lora.bias is {lora.bias}; the fused layer trains no biases. Set lora.bias: none")
    if method not in ("nf4", "fp4"):
        reasons.append(
            f"quantization.method is {method}; the fused layer computes 4-bit (nf4/fp4) base layers. Remove lora.fused"
        )
    return reasons


def _streaming_problems(recipe: Recipe, raw: Mapping[str, Any], ctx: _Problems) -> None:
    """What a stream cannot do: know its length, hold a fraction out, or weigh sources by size."""
    steps = recipe.train.args.get("max_steps", -1)
    if steps is None or steps <= 0:
        ctx.add(
            "data.streaming",
            "needs train.max_steps: a stream has no length to count epochs in (set train.max_steps=N)",
        )
    if "eval_fraction" in (raw.get("data") or {}) and recipe.data.eval_fraction:
        ctx.add(
            "data.eval_fraction",
            "cannot hold a fraction of a stream out (its length is unknown); with data.streaming, "
            "evaluate on data.eval_sources (read in full) or remove data.eval_fraction",
        )
    sources = recipe.data.sources
    if len(sources) > 1 and any(s.ratio is None for s in sources):
        ctx.add(
            "data.sources",
            "with data.streaming, several sources mix by `ratio` (each source's share of the stream); "
            "`weight` needs row counts. Give every source a ratio",
        )


def _leaves(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every scalar under `value`; list items are numbered (`data.sources.0.weight`)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}.{i}")
    else:
        yield key, value


def _nonfinite_problems(recipe: Recipe, ctx: _Problems) -> None:
    """Refuse every NaN or infinity in the recipe (`.nan`, `.inf`, or `nan` in a number field): no
    setting means anything with one, and a NaN passes every range check (comparisons with it are false).
    A finite number past float32's range (1e308) is refused too, unless a range check of its key said
    more already: torch computes with it in float32 (a learning rate, a LoRA scale), where it is inf."""
    for key, value in _leaves(recipe.to_dict(), ""):
        if isinstance(value, float) and not math.isfinite(value):
            ctx.add(key, f"is {value}; expected a finite number")
        elif isinstance(value, float) and abs(value) > FLOAT32_MAX and not ctx.has(key):
            ctx.add(
                key,
                f"is {value:g}, past the largest float32 ({FLOAT32_MAX:.2g}): torch computes with it in float32, "
                "where it is inf. Give a number in range (see docs/recipe-reference.md for the key's usual values)",
            )
        elif isinstance(value, int) and not isinstance(value, bool) and not ctx.has(key):
            # torch, numpy and the tokenizers hold 64-bit integers: a larger count fails once the model is loaded
            if value > INT64_MAX:
                ctx.add(key, f"is {value}; it must be <= {INT64_MAX}")
            elif value < -INT64_MAX - 1:
                ctx.add(key, f"is {value}; it must be >= {-INT64_MAX - 1}")


def _whole_or_fraction(value: float) -> bool:
    """A count of steps (a whole number >= 1) or a fraction of the training steps in (0, 1)."""
    return 0 < value < 1 or (value >= 1 and value == int(value))


_INTERVAL = "it must be a whole number of steps (>= 1) or a fraction of the training steps in (0, 1)"

# `train:` values that transformers or torch refuse only once the model is loaded (the optimizer's
# betas and epsilon, warmup < 0, a fractional step count > 1), or take without a word and then train
# wrongly (a learning rate <= 0, max_steps 0 meaning "train by epochs", save_steps 0 never saving):
# name -> (is the value acceptable, what is expected).
TRAIN_VALUE_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    # above 1 every step moves each weight by about the rate or more (AdamW normalises the update): the
    # loss diverges at once
    "learning_rate": (lambda v: 0 < v <= 1, "it must be > 0 and at most 1 (e.g. 2e-4)"),
    "max_steps": (
        lambda v: v == -1 or v >= 1,
        "it must be >= 1, or -1 (the default) to train for train.num_train_epochs",
    ),
    "warmup_steps": (
        lambda v: v == 0 or _whole_or_fraction(v),
        "it must be a whole number of steps (>= 0) or a fraction of the training steps in [0, 1)",
    ),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "it must be in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, "it must be >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "it must be >= 0 (0 turns gradient clipping off)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "it must be in [0, 1) (e.g. 0.9)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "it must be in [0, 1) (e.g. 0.999)"),
    # added to the root of the second moment (the gradient's scale, ~1e-3 and less for LoRA): at 1 or more it
    # shrinks every update to almost nothing, and the run trains nothing
    "adam_epsilon": (lambda v: 0 < v < 1, "it must be > 0 and below 1 (e.g. 1e-8)"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "it must be in [0, 1)"),
    "num_train_epochs": (lambda v: v >= 0, "it must be >= 0"),
    "logging_steps": (_whole_or_fraction, _INTERVAL),
    "save_steps": (_whole_or_fraction, _INTERVAL),
    "eval_steps": (_whole_or_fraction, _INTERVAL + "; leave it out to evaluate every train.logging_steps"),
    # torch's DataLoader refuses < 0; 0 at the first evaluation divides by zero; a negative NEFTune alpha
    # makes the noise's range empty (`uniform_(a, -a)`) at the first step
    "dataloader_num_workers": (lambda v: v >= 0, "it must be >= 0 (0 loads batches in the training process)"),
    "eval_accumulation_steps": (lambda v: v >= 1, "it must be >= 1, or left out"),
    "neftune_noise_alpha": (lambda v: v >= 0, "it must be >= 0"),
}


def warmup_outlasts_training(warmup_steps: float, total_steps: int, scheduler: Any = None) -> str | None:
    """A warning where the warmup (train.warmup_steps: a count, or a fraction of the training below 1)
    lasts as long as the training: the learning rate would never reach train.learning_rate. The
    `constant` scheduler (lr_scheduler_type) has no warmup."""
    warmup = int(warmup_steps) if warmup_steps >= 1 else math.ceil(total_steps * warmup_steps)
    if scheduler == "constant" or total_steps <= 0 or warmup < total_steps:
        return None
    return (
        f"train.warmup_steps is {warmup} and the training lasts {total_steps} optimizer steps: the learning "
        "rate never reaches train.learning_rate. Give fewer warmup steps, or a fraction of the training "
        "(warmup_steps: 0.03 warms up over 3% of the steps)"
    )


TRAINER_SAVE_STEPS = 500  # TrainingArguments' default save_steps (a test keeps it equal)


def no_checkpoint_before_the_end(args: Mapping[str, Any], total_steps: int, epochs: float | None = None) -> str | None:
    """A warning where saving by steps (`train.save_steps`, a count) saves no checkpoint before the last
    of `total_steps` optimizer steps: a run killed before then has nothing to resume from. A short run
    may mean it; a long one copied with max_steps lowered usually does not. `epochs`: the steps come
    from train.num_train_epochs over the data (no max_steps)."""
    strategy = args.get("save_strategy", "steps")
    given = "save_steps" in args
    every = args.get("save_steps", TRAINER_SAVE_STEPS)
    if strategy != "steps" or not _number(every) or every <= 0 or total_steps <= 0:
        return None
    # a fraction in (0, 1) is of the training steps, rounded up (transformers' Trainer)
    interval = math.ceil(total_steps * every) if every < 1 else every
    if interval < total_steps:
        return None
    fraction = f" (a fraction: every {interval} steps)" if every < 1 else ""
    steps = (
        f"train.max_steps is {total_steps}"
        if epochs is None
        else f"train.num_train_epochs {epochs:g} over the data is at most {total_steps} optimizer steps"
    )
    return (
        f"train.save_steps is {every:g}{fraction}{'' if given else ' (the default)'} and {steps}: "
        "no checkpoint is saved before the last step, so a run killed before then (an OOM, a node failure, "
        "SIGKILL) has nothing to resume from and starts over (a preemption signal still saves one: "
        f"checkpoint.signals). To keep the work as it goes, set train.save_steps below {total_steps}"
        + (f" (or a fraction below {(total_steps - 1) / total_steps:.2g})" if every < 1 else "")
    )


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What validates but may lose work without a word: printed by `validate` and `prepare`, logged by
    `train` at its start."""
    out = []
    steps = recipe.train.args.get("max_steps", -1)
    if _number(steps) and steps > 0 and (late := no_checkpoint_before_the_end(recipe.train.args, int(steps))):
        out.append(late)
    if not recipe.checkpoint.signals:
        out.append(
            "checkpoint.signals is []: no signal saves a checkpoint. SIGUSR1 (what the SLURM templates send "
            "before the time limit) and SIGTERM (preemption, scancel) end the ranks at once, without a checkpoint "
            "or a requeue, and the steps since the last checkpoint are lost. To save and stop on them, remove "
            "checkpoint.signals for the default [USR1, TERM]"
        )
    return out


def _number(value: Any) -> bool:
    """A finite int or float (not a bool): what the range rules compare."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _train_value_problems(args: Mapping[str, Any], ctx: _Problems) -> None:
    """Check the `train:` numbers of TRAIN_VALUE_RULES (non-finite ones are refused by `_nonfinite_problems`),
    and the weight decay against the learning rate."""
    for name, (ok, expected) in TRAIN_VALUE_RULES.items():
        value = args.get(name)
        if not _number(value):
            continue
        if not ok(value):
            ctx.add(f"train.{name}", f"is {value}; {expected}")
    lr, decay = args.get("learning_rate"), args.get("weight_decay")
    if _number(lr) and _number(decay) and lr > 0 and decay > 0 and not ctx.has("train.learning_rate"):
        # decoupled weight decay (AdamW; SGD's and Adafactor's alike): p <- p * (1 - lr * wd) at each step
        if lr * decay >= 1:
            ctx.add(
                "train.weight_decay",
                f"is {decay}; with train.learning_rate {lr:g} each step multiplies the weights by 1 - "
                f"learning_rate x weight_decay = {1 - lr * decay:g}, which zeroes them or flips their sign. Give a "
                f"weight decay below 1 / learning_rate = {1 / lr:g} (usually 0 to 0.1)",
            )


def build_recipe(
    data: Mapping[str, Any],
    source: str | None = None,
    lines: Mapping[str, int] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Recipe:
    """Validate raw recipe data and build a frozen Recipe; raises RecipeError listing every problem.
    `overrides` maps the dotted keys set on the command line to the override text, so their
    problems name the override rather than a line of the file."""
    ctx = _Problems(source, lines or {}, overrides)
    foreign = False
    for name in data:
        if name not in SECTIONS and name != "launch":  # `launch:` is written into run dirs, informational
            place = _foreign_option(str(name))
            foreign = foreign or place is not None
            if place is None:
                ctx.add(str(name), f"is not a recipe section{_suggest(str(name), list(SECTIONS))}")
            else:
                ctx.add(str(name), f"is not a recipe section; a recipe sets this as `{place}`")
    if foreign:
        ctx.note(
            "options at the top level, as in an axolotl or LLaMA-Factory config: a recipe groups them in "
            f"the sections {', '.join(SECTIONS)}. docs/migration.md maps every option; configs/recipes/ "
            "holds converted examples"
        )
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        if name == "train":
            built[name] = _build_train(data.get(name), ctx)
        else:
            built[name] = _build_section(cls, data.get(name), name, ctx)
    built["train"] = _with_micro_batch(built["train"], built["data"], data.get("train"))
    recipe = Recipe(**built, source=source)
    _check_contradictions(recipe, data, ctx)
    _train_value_problems(recipe.train.args, ctx)  # before: a key's own range says more than float32's
    _nonfinite_problems(recipe, ctx)
    recipe = _with_resolved_paths(recipe, ctx)
    if ctx.problems:
        raise RecipeError(ctx.problems, source)
    if recipe.data.streaming and recipe.data.eval_fraction and not recipe.data.eval_sources:
        # the default held-out fraction means nothing for a stream (an explicit one is refused above)
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, eval_fraction=0.0))
    if recipe.quantization.method not in ("nf4", "fp4") and recipe.quantization.double_quant:
        # the default (true) means nothing without 4-bit weights; resolved as false, so that the
        # recipe.yaml a run writes reads back (an explicit true is refused above)
        recipe = dataclasses.replace(recipe, quantization=dataclasses.replace(recipe.quantization, double_quant=False))
    return recipe


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    twice: list[str] = []  # keys given twice in the file, reported with every other problem
    data, lines = read_yaml(path, twice)
    data, problems = apply_overrides(data, list(overrides or []))
    if problems:
        raise RecipeError([*twice, *problems], str(path))
    given = {o.split("=", 1)[0].strip(): o for o in overrides or []}
    try:
        recipe = build_recipe(data, source=str(path), lines=lines, overrides=given)
    except RecipeError as exc:
        raise RecipeError([*twice, *exc.problems], str(path)) from None
    if twice:
        raise RecipeError(twice, str(path))
    return recipe


def replace(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A validated copy of `recipe` with `section.key=value` overrides applied."""
    data, problems = apply_overrides(_as_given(recipe.to_dict()), overrides)
    if problems:
        raise RecipeError(problems, recipe.source)
    return build_recipe(data, source=recipe.source)


def _as_given(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe (`Recipe.to_dict`, a run's recipe.yaml) as a recipe to build again: it names every
    key, defaults included, and `data.eval_fraction` (unused beside `data.eval_sources`) written beside
    eval sources is its default, not the user's (a user's is refused), so it is dropped; else the check
    meant for a user who gave both refused the recipe of every run with eval sources (and its resume)."""
    data = resolved.get("data")
    if isinstance(data, dict) and data.get("eval_sources") and "eval_fraction" in data:
        resolved = {**resolved, "data": {k: v for k, v in data.items() if k != "eval_fraction"}}
    return resolved


# --------------------------------------------------------------------------------------------
# Global batch arithmetic
# --------------------------------------------------------------------------------------------


# One place owns how examples are grouped: the micro batch a recipe gets when it names none, the
# checks of a global batch against it, and gradient accumulation for a launch
# (global = micro batch x processes x accumulation).

UNPACKED_MICRO_BATCH = 4  # padded rows per micro batch without packing


def default_micro_batch(train: TrainConfig, data: DataConfig) -> int:
    """With packing, as many packed rows as fit in `train.micro_batch_tokens` (the largest such
    count that divides the global batch); without packing, 4 padded rows."""
    if not data.packing:
        return UNPACKED_MICRO_BATCH
    micro = max(1, train.micro_batch_tokens // max(1, data.max_length))  # max_length < 8 is refused
    if train.global_batch_size is not None:
        micro = max(m for m in range(1, micro + 1) if train.global_batch_size % m == 0)
    return micro


def _with_micro_batch(train: TrainConfig, data: DataConfig, raw_train: Any) -> TrainConfig:
    """The train section with its micro batch set, unless the recipe sets one."""
    if isinstance(raw_train, dict) and "per_device_train_batch_size" in raw_train:
        return train
    args = {**train.args, "per_device_train_batch_size": default_micro_batch(train, data)}
    return dataclasses.replace(train, args=types.MappingProxyType(args))


def _batch_problems(recipe: Recipe, raw: Mapping[str, Any], ctx: _Problems) -> None:
    args = recipe.train.args
    micro = args.get("per_device_train_batch_size", 1)
    gbs = recipe.train.global_batch_size
    if gbs is None or not isinstance(micro, int) or micro < 1:
        return
    if gbs % micro:
        ctx.add(
            "train.global_batch_size",
            f"is {gbs}, not divisible by train.per_device_train_batch_size={micro}. "
            f"Use a multiple of {micro} (e.g. {micro * max(1, round(gbs / micro))}).",
        )
    if args.get("gradient_accumulation_steps") is not None and "gradient_accumulation_steps" in (
        raw.get("train") or {}
    ):
        ctx.add(
            "train.gradient_accumulation_steps",
            "is set together with train.global_batch_size; accumulation is derived from the "
            "global batch. Remove one of them.",
        )


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    def describe(self) -> str:
        return (
            f"{self.world_size} process(es) x micro batch {self.micro_batch} x gradient accumulation "
            f"{self.grad_accum} = global batch {self.global_batch}"
        )


def micro_batches_dividing(global_batch: int, world_size: int, most: int | None = None) -> list[int]:
    """The micro batches (up to `most`) that `world_size` processes can accumulate into `global_batch`."""
    top = global_batch if most is None else min(most, global_batch)
    return [m for m in range(1, top + 1) if global_batch % (m * world_size) == 0]


# where a process count that no batch fits came from (a stray or mistyped WORLD_SIZE was not named)
PROCESSES_FROM = ": the launcher's WORLD_SIZE, or plan's --gpus x --nodes"


def resolve_batch(train: TrainConfig, world_size: int) -> BatchPlan:
    """Gradient accumulation from the global batch, the micro batch and the world size."""
    micro = int(train.args.get("per_device_train_batch_size", 1))
    if train.global_batch_size is None:
        return BatchPlan(world_size, micro, int(train.args.get("gradient_accumulation_steps", 1)))
    per_step = micro * world_size
    gbs = train.global_batch_size
    if gbs % per_step:
        micros = micro_batches_dividing(gbs, world_size)
        fix = (
            f"or set train.per_device_train_batch_size to one of {micros}"
            if micros
            else f"({gbs} is smaller than the {world_size} processes{PROCESSES_FROM})"
            if gbs < world_size
            else f"({gbs} is not a multiple of the {world_size} processes{PROCESSES_FROM}: no micro batch fits)"
        )
        raise RecipeError(
            [
                f"`train.global_batch_size` is {gbs}, not divisible by micro batch {micro} x {world_size} "
                f"process(es) = {per_step}. Use a global batch that is a multiple of {per_step}, {fix}."
            ]
        )
    return BatchPlan(world_size, micro, train.global_batch_size // per_step)


# --------------------------------------------------------------------------------------------
# A run's recipe.yaml: written by each launch, read back and compared by the next one
# --------------------------------------------------------------------------------------------

RUN_RECIPE = "recipe.yaml"

# Keys that may change between launches of the same run (they do not change what is trained).
RESUMABLE_CHANGES = (
    "run.overwrite",
    # where the run lives: a run directory moved or copied elsewhere is the same run (the launch found it)
    "run.output_dir",
    "run.name",
    "model.loader",
    "model.embedding_in_host_memory",  # where the frozen table waits; the same rows reach the layers
    "model.lm_head_in_host_memory",  # the same: the same head computes the loss
    "checkpoint.",
    "cluster.",
    "train.max_steps",
    "train.num_train_epochs",
    "train.logging_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.dataloader_num_workers",
    "train.report_to",
    "train.per_device_eval_batch_size",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    # the micro batch and where activations wait: memory, not what is trained (the global batch, which
    # check_resume guards, stays)
    "train.micro_batch_tokens",
    "train.offload_activations",
    "train.nonfinite_patience",
    "train.deepspeed",  # the launch's DeepSpeed config (a launch may change; check_resume guards ZeRO shards)
    "data.rebuild",
    "data.allow_no_eos",
)


def write_run_recipe(run_dir: Path, recipe: Recipe, launch: Mapping[str, Any]) -> None:
    """The resolved recipe as run, with the launch it ran under (`launch:`, informational)."""
    from .files import atomic_write_text

    resolved = recipe.to_dict()
    resolved["launch"] = dict(launch)
    atomic_write_text(run_dir / RUN_RECIPE, yaml.safe_dump(resolved, sort_keys=False))


def is_run_directory(folder: Path) -> bool:
    """Whether `folder` is a qlora-sft run: its recipe.yaml is one a launch wrote (the resolved recipe
    with its `launch:` section), not a user's own recipe saved under that name. One that does not read
    counts as a run: the answer guards against overwriting one."""
    path = folder / RUN_RECIPE
    if not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_bytes())
    except (OSError, yaml.YAMLError):
        return True
    return not isinstance(data, dict) or "launch" in data


def read_run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run directory was last launched with (raises RecipeError if it does not read)."""
    path = run_dir / RUN_RECIPE
    data, lines = read_yaml(path)
    data.pop("launch", None)
    data = _as_given(data)
    quant = data.get("quantization") or {}
    if isinstance(quant, dict) and quant.get("method") in ("none", "int8"):
        quant.pop("double_quant", None)  # written as true by versions before it resolved to false
    return build_recipe(data, source=str(path), lines=lines)


def trained_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The flat keys of a recipe that decide what is trained (RESUMABLE_CHANGES left out), as JSON
    gives them back: every checkpoint records it, and all checkpoints of one run share it."""

    def resumable(key: str) -> bool:
        return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)

    trained = {k: v for k, v in recipe.fingerprint().items() if not resumable(k)}
    return json.loads(json.dumps(trained, default=str))


def fingerprint_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """`key: a -> b` for every key of two trained fingerprints that differs."""
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def run_recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """`key: old -> new` for every key that differs and would change what is trained."""
    return fingerprint_differences(trained_fingerprint(old), trained_fingerprint(new))
