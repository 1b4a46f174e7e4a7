"""Model: tokenizer, quantization, placement for the launch mode, LoRA adapters.

Each known trap of QLoRA is handled in the one function that owns the choice, with a comment that
says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .recipe import ModelConfig, QuantizationConfig, Recipe

log = logging.getLogger("qlora_sft")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LaunchMode:
    """Where this process runs, as far as model loading cares."""

    kind: str  # "cpu" | "single_gpu" | "ddp" | "deepspeed" | "fsdp"
    world_size: int
    local_rank: int
    zero_stage: int = 0

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP shard parameters across ranks."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    def describe(self) -> str:
        extra = f" ZeRO-{self.zero_stage}" if self.kind == "deepspeed" else ""
        return f"{self.kind}{extra}, world size {self.world_size}"


def distributed_state() -> Any:
    """accelerate's process state, created here first so that CPU ranks work: without a GPU (or with
    ACCELERATE_USE_CPU=true) the state must be created with cpu=True, otherwise ranks started by
    `accelerate launch`/torchrun each believe they are alone (gloo is used for CPU ranks)."""
    import os

    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def check_ranks() -> list[dict[str, Any]]:
    """Pre-flight, before any model loads: every process reports (rank, local rank, host); the
    ranks must be unique, 0..N-1, and N must equal the world size the launcher set. Catches the
    classic multi-node mistake where every node believes it is rank 0 (accelerate#2816)."""
    import os
    import socket

    import torch.distributed as dist

    state = distributed_state()
    me = {
        "rank": state.process_index,
        "local_rank": state.local_process_index,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    everyone = [me]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(everyone, me)
    problem = rank_problem(everyone, int(os.environ.get("WORLD_SIZE", state.num_processes)))
    if problem:
        raise UserError(
            f"launch: {problem}. Check the launcher: machine_rank/--node_rank per node, "
            "--num_processes = GPUs in total, the same MASTER_ADDR/MASTER_PORT everywhere."
        )
    return everyone


def rank_problem(reports: list[dict[str, Any]], launcher_world_size: int) -> str | None:
    ranks = sorted(r["rank"] for r in reports)
    if len(set(ranks)) != len(ranks):
        dup = sorted({x for x in ranks if ranks.count(x) > 1})
        return f"duplicate ranks {dup} across processes {[(r['host'], r['rank']) for r in reports]}"
    if ranks != list(range(len(ranks))):
        return f"ranks {ranks} are not 0..{len(ranks) - 1}"
    if len(ranks) != launcher_world_size:
        return f"{len(ranks)} processes joined but the launcher's world size is {launcher_world_size}"
    return None


def memory_report(model: Any) -> list[str]:
    """After loading: is ZeRO-3 partitioning active, and how much memory each rank holds."""
    import torch.distributed as dist

    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
    except Exception:  # pragma: no cover
        zero3 = False
    state = distributed_state()
    if torch.cuda.is_available():
        mine = torch.cuda.memory_allocated() / 2**30
        what = "GPU memory allocated"
    else:
        import resource

        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        what = "peak RSS"
    everyone = [mine]
    if dist.is_available() and dist.is_initialized():
        everyone = [0.0] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    fsdp = state.distributed_type.name == "FSDP" if hasattr(state.distributed_type, "name") else False
    lines = [
        f"ZeRO-3 partitioning: {'active' if zero3 else 'not active'}"
        + ("; FSDP shards parameters when the trainer wraps the model" if fsdp else "")
    ]
    lines.append(f"{what} after loading, per rank: " + ", ".join(f"{x:.2f} GiB" for x in everyone))
    return lines


def detect_launch_mode() -> LaunchMode:
    """Read the launch mode from accelerate's state (set by `accelerate launch` / torchrun)."""
    from accelerate.utils import DistributedType

    state = distributed_state()
    dt = state.distributed_type
    if dt == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        stage = 0
        if plugin is None:
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()
        stage = int(getattr(plugin, "zero_stage", 0) or 0)
        return LaunchMode("deepspeed", state.num_processes, state.local_process_index, stage)
    if dt == DistributedType.FSDP:
        return LaunchMode("fsdp", state.num_processes, state.local_process_index)
    if state.device.type == "cpu":
        return LaunchMode("cpu", state.num_processes, state.local_process_index)
    if state.num_processes > 1:
        return LaunchMode("ddp", state.num_processes, state.local_process_index)
    return LaunchMode("single_gpu", 1, state.local_process_index)


def check_launch_compat(recipe: Recipe, mode_kind: str, zero_stage: int = 0) -> list[str]:
    """Combinations that cannot work in a launch mode, as recipe problems (checked before loading).
    ZeRO-3 and FSDP flatten parameters into shards of one dtype, so the packed 4-bit storage, the
    model dtype and the mixed-precision (compute) dtype must all be the same (peft#1432,
    axolotl#1482, peft#2014); LLM.int8 weights cannot be sharded at all."""
    q, problems = recipe.quantization, []
    shards = mode_kind == "fsdp" or (mode_kind == "deepspeed" and zero_stage == 3)
    where = "FSDP" if mode_kind == "fsdp" else f"DeepSpeed ZeRO-{zero_stage}"
    if not shards:
        return problems
    if q.method == "int8":
        problems.append(
            f"`quantization.method` is int8, which {where} cannot shard; use nf4 (QLoRA) or none, "
            "or launch with DDP / ZeRO-2"
        )
    compute = q.compute_dtype if q.method != "none" else recipe.model.dtype
    if q.method in ("nf4", "fp4") and q.quant_storage not in ("auto", compute) and compute != "auto":
        problems.append(
            f"`quantization.quant_storage` is {q.quant_storage} but the compute dtype is {compute}; "
            f"{where} needs them equal. Remove quant_storage (auto picks the compute dtype)."
        )
    elif q.method in ("nf4", "fp4") and q.quant_storage in ("uint8",):
        problems.append(
            f"`quantization.quant_storage` is uint8; {where} needs the 4-bit weights stored in the "
            "compute dtype. Remove quant_storage (auto picks it)."
        )
    if recipe.model.dtype != "auto" and compute != "auto" and recipe.model.dtype != compute:
        problems.append(
            f"`model.dtype` is {recipe.model.dtype} but the compute dtype is {compute}; {where} needs "
            "one dtype for every sharded parameter. Set model.dtype: auto."
        )
    if compute == "float32" and q.method in ("nf4", "fp4"):
        problems.append(
            f"`quantization.compute_dtype` is float32; under {where} use bfloat16 (or float16 on GPUs "
            "without bf16) so storage, weights and mixed precision agree"
        )
    return problems


def resolve_compute_dtype(q: QuantizationConfig, model: ModelConfig, device_type: str) -> torch.dtype:
    """`auto`: bfloat16 where the GPU supports it, float16 on older GPUs, float32 on the CPU."""
    choice = q.compute_dtype if q.method != "none" else model.dtype
    if choice != "auto":
        return DTYPES[choice]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type in ("xpu", "mps"):
        return torch.bfloat16
    return torch.float32


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


def placement(mode: LaunchMode, quantized: bool) -> dict[str, Any]:
    """from_pretrained placement kwargs for the launch mode (the one place that decides it)."""
    if mode.shards_parameters:
        # ZeRO-3/FSDP place and shard the weights themselves: no device map, and the low-memory
        # path so each rank does not materialise a full copy first.
        return {"device_map": None, "low_cpu_mem_usage": True}
    if mode.kind == "cpu":
        return {"device_map": {"": "cpu"}} if quantized else {}
    if mode.kind in ("ddp", "deepspeed", "single_gpu"):
        # DDP with a quantized model needs each rank's full copy on its own GPU: "auto" would spread
        # layers over every visible GPU and DDP then fails (or silently runs on GPU 0).
        return {"device_map": {"": distributed_state().device}}
    return {}


def local_model_path(cfg: ModelConfig, base_dir: str | Path | None = None) -> str:
    """A local folder as given or relative to the recipe; otherwise the hub id unchanged."""
    p = Path(cfg.name_or_path).expanduser()
    if p.exists():
        return str(p)
    if base_dir is not None and not p.is_absolute() and (Path(base_dir) / p).exists():
        return str(Path(base_dir) / p)
    if p.is_absolute() or cfg.name_or_path.startswith((".", "~")) or cfg.name_or_path.count("/") > 1:
        raise UserError(f"model.name_or_path: folder {cfg.name_or_path} not found")
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig, base_dir: str | Path | None = None) -> Any:
    from transformers import AutoTokenizer

    path = local_model_path(cfg, base_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise UserError(
            f"model.name_or_path={cfg.name_or_path!r}: could not load its tokenizer ({str(exc).splitlines()[0]}). "
            "Use a local folder with tokenizer files, or a hub id where the hub is reachable."
        ) from None
    ensure_pad_token(tok)
    tok.padding_side = "right"
    return tok


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


def load_model(recipe: Recipe, tokenizer: Any, mode: LaunchMode, base_dir: str | Path | None = None) -> Any:
    """Base model (quantized, placed for the launch mode) with LoRA adapters, ready to train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device_type = "cpu" if mode.kind == "cpu" else "cuda"
    compute_dtype = resolve_compute_dtype(recipe.quantization, recipe.model, device_type)
    qconfig = quantization_config(recipe.quantization, compute_dtype, mode)
    if qconfig is not None and recipe.quantization.method != "none" and device_type == "cpu":
        _check_bnb_cpu()
    path = local_model_path(recipe.model, base_dir)
    model_dtype = DTYPES[recipe.model.dtype] if recipe.model.dtype != "auto" else compute_dtype
    attn = resolve_attn_implementation(recipe, device_type, path)
    kwargs: dict[str, Any] = {
        "dtype": model_dtype,
        "attn_implementation": attn,
        "trust_remote_code": recipe.model.trust_remote_code,
        "revision": recipe.model.revision,
        **placement(mode, qconfig is not None),
    }
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    resize_for_pad(model, tokenizer)
    model.config.use_cache = False  # no KV cache while training (and checkpointing needs it off)
    log.info("attention: %s", attn)
    if use_liger(recipe.model, device_type):
        apply_liger(model)

    gc = bool(recipe.train.args.get("gradient_checkpointing", True))
    if qconfig is not None and recipe.model.upcast_frozen and not mode.shards_parameters:
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
    if device_type == "cpu":
        keep_cpu_4bit_trainable(model)

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
    return model


def resolve_attn_implementation(recipe: Recipe, device_type: str, path: str) -> str:
    """`auto` -> `varlen` (flash attention per packed example) on CUDA with packing, for models with
    plain causal attention; `sdpa` otherwise. `varlen` is registered with transformers here."""
    from . import attention

    choice = recipe.model.attn_implementation
    wants_varlen = choice == attention.NAME or (
        choice == "auto" and device_type == "cuda" and recipe.data.packing and attention.available_on_cuda()
    )
    if choice == "auto":
        choice = "sdpa"
    if wants_varlen:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
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
    loss in chunks from the hidden states already)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    log.info("liger kernels: rms_norm, swiglu, rope")


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
