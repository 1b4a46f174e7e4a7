"""Model: tokenizer, quantization, placement for the launch mode, LoRA adapters.

Each known trap of QLoRA is handled in the one function that owns the choice, with a comment that
says why.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..launch import DTYPES, FSDP_UNITS_ENV, LaunchMode, distributed_state
from ..recipe import ModelConfig, QuantizationConfig, Recipe, fused_lora_obstacles

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
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if mode.device_type == "cpu":
        keep_cpu_4bit_trainable(base)
    log.info(
        "model: %s loader, attention %s, %s",
        "low-memory" if uses_low_memory_loader(cfg, mode) else "transformers",
        attn,
        quantization_line(base, qconfig, model_dtype),
    )
    return base


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


def recipe_tokenizer(recipe: Recipe, base_dir: str | Path | None = None) -> Any:
    """The recipe's tokenizer with the recipe's chat template (as training renders the data)."""
    from .. import data

    tokenizer = load_tokenizer(recipe.model, base_dir)
    data.set_chat_template(tokenizer, recipe.data.chat_template, recipe.model.name_or_path, base_dir)
    return tokenizer


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

    compute_dtype = mode.compute_dtype(recipe.quantization, recipe.model)
    model = load_base(recipe, mode, base_dir)
    quantized = getattr(model, "hf_quantizer", None) is not None
    resize_for_pad(model, tokenizer)
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

    load_weights(model, recipe, base_dir)  # lora.init_from: start from an existing adapter's weights
    if mode.shards_parameters:
        check_sharded_dtypes(model, compute_dtype, mode)
    if uses_fused_lora(recipe, mode):
        log.info("lora: %d adapted 4-bit layers fused (lora.fused)", fuse_lora_layers(model))
    return model


class FusedLoraMatmul(torch.autograd.Function):
    """`x W^T + s (x A^T) B^T` for a frozen 4-bit W and a LoRA pair (A, B), s = alpha / r, with the
    LoRA term added into the base GEMM's output in place (`addmm_`, its scale an `alpha` of the
    GEMM) instead of peft's copy of the output, scaling and sum, each a pass over the output. The
    backward does the same: `g W + s (g B) A` into one buffer, and the adapter gradients from the
    rank-r products. Saved for the backward: x (which the layer's callers hold anyway) and x A^T
    (r columns). The matmuls run in the compute dtype; the adapter gradients are returned in the
    adapters' own dtype, as autocast returns them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: Any, scaling: float) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # every dtype below is chosen here
            return FusedLoraMatmul.compute(ctx, x, a, b, base, scaling)

    @staticmethod
    def compute(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: Any, scaling: float) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        dtype = base.compute_dtype or x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a_c, b_c = a.to(dtype), b.to(dtype)
        xa = x2 @ a_c.t()
        out = x2 @ dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype).t()
        out.addmm_(xa, b_c.t(), alpha=scaling)
        if base.bias is not None:
            out += base.bias.to(dtype)
        ctx.save_for_backward(x2, xa, a_c, b_c)
        ctx.base, ctx.scaling, ctx.x_dtype, ctx.x_shape = base, scaling, x.dtype, x.shape
        ctx.w_dtypes = (a.dtype, b.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        from bitsandbytes.functional import dequantize_4bit

        x2, xa, a_c, b_c = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gxa = (g @ b_c).mul_(ctx.scaling)  # d/d(xA^T), r columns
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            weight = ctx.base.weight
            grad_x = g @ dequantize_4bit(weight.data, weight.quant_state).to(x2.dtype)
            grad_x.addmm_(gxa, a_c)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (gxa.t() @ x2).to(ctx.w_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ xa).mul_(ctx.scaling).to(ctx.w_dtypes[1])
        return grad_x, grad_a, grad_b, None, None


@functools.cache
def fused_lora_class() -> type:
    """peft's LoRA layer for bitsandbytes 4-bit base layers, with `FusedLoraMatmul` as its forward
    wherever it applies (one plain LoRA adapter, active and unmerged, without dropout, and no extra
    arguments); everything else, and every other use of the layer, is peft's."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    from peft.tuners.lora.bnb import Linear4bit

    class FusedLinear4bit(Linear4bit):
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            adapters = self.active_adapters
            name = adapters[0] if len(adapters) == 1 else None
            if (
                args
                or kwargs
                or name is None
                or self.disable_adapters
                or self.merged
                or name not in self.lora_A
                or name in getattr(self, "lora_variant", {})
                or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            ):
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            fix_4bit_weight_quant_state_from_module(base)  # as bitsandbytes' own forward does
            if getattr(base.weight.quant_state, "packing_format_for_cpu", False) or (
                base.bias is not None and base.bias.requires_grad
            ):  # repacked for bitsandbytes' CPU inference, or a trained bias (lora.bias): peft's
                return super().forward(x, *args, **kwargs)
            if base.compute_dtype is None:
                base.set_compute_type(x)
                base.compute_type_is_set = True
            return FusedLoraMatmul.apply(
                x, self.lora_A[name].weight, self.lora_B[name].weight, base, self.scaling[name]
            )

    return FusedLinear4bit


def fuse_lora_layers(model: Any) -> int:
    """Give every peft LoRA layer over a bitsandbytes 4-bit layer the fused forward (`lora.fused`);
    returns how many. Only the class changes: parameters, state dict, saving and merging stay peft's."""
    from peft.tuners.lora.bnb import Linear4bit

    fused = fused_lora_class()
    count = 0
    for module in model.modules():
        if type(module) is Linear4bit:
            module.__class__ = fused
            count += 1
    return count


def uses_fused_lora(recipe: Recipe, mode: LaunchMode) -> bool:
    """`lora.fused`, resolved for this launch."""
    return recipe.lora.fused is not False and mode.layers_run_whole and not fused_lora_obstacles(recipe)


class HeldInput:
    """One checkpointed layer's input while it waits for the backward pass: in pinned host memory,
    copied there and back on a side stream (`copy_stream`) so the copies overlap the compute
    stream's work instead of queueing in it. Every GPU block involved belongs to the compute stream,
    which waits for the copy before the block can be freed or read, so no block outlives its use:
    the forward's input is released once the layer's forward is queued (`release`), after its copy
    to the host; `fetch` starts the copy back into a block allocated on the compute stream (the layer whose
    backward runs just before prefetches it); `take` makes the compute stream wait for it."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.device = hidden.device
        self.gpu: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.done: Any = None
        cuda = hidden.device.type == "cuda"
        self.host: torch.Tensor | None = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=cuda)
        if not cuda:
            self.host.copy_(hidden.detach())
            return
        stream = copy_stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))  # the input is computed
        with torch.cuda.stream(stream):
            self.host.copy_(hidden.detach(), non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(stream)
        self.source = hidden  # kept until the copy has read it (`release`)

    def release(self) -> None:
        """Let the forward's input go once the compute stream has waited for its copy."""
        if self.source is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done)
            self.source = None

    def fetch(self) -> None:
        if self.gpu is not None or self.host is None:
            return
        self.release()
        if self.device.type != "cuda":
            self.gpu = self.host.to(self.device)
            return
        compute = torch.cuda.current_stream(self.device)
        self.gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        stream = copy_stream(self.device)
        stream.wait_stream(compute)  # the block may be one the compute stream just freed
        with torch.cuda.stream(stream):
            self.gpu.copy_(self.host, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(stream)
        self.gpu.record_stream(stream)  # a block dropped before `take` outlives the copy

    def take(self) -> torch.Tensor:
        self.fetch()
        gpu, self.gpu, self.host = self.gpu, None, None
        assert gpu is not None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.done)
        return gpu


_LAST_HELD: dict[torch.device, HeldInput] = {}


@functools.cache
def copy_stream(device: torch.device) -> Any:
    """The side stream that carries offloaded activations to the host and back, one per GPU."""
    return torch.cuda.Stream(device)


class OffloadedCheckpoint(torch.autograd.Function):
    """Gradient checkpointing of one decoder layer whose input waits for the backward pass in pinned
    host memory instead of on the GPU (unsloth's "unsloth" checkpointing; torchtune's activation
    offloading does the same for all saved tensors). The forward starts the copy of the layer input
    to the host on a side stream and runs the layer without saving anything; the backward takes the
    input back (prefetched while the layer above ran its backward), starts the copy of the layer
    below's input, recomputes the layer with the forward's autocast and RNG state, and
    backpropagates through it. What stays on the GPU between forward and backward is one layer's
    activations at a time, not every layer's input (for an 8B Llama with 4 x 2048 tokens, 1.68 GiB
    less on an H100)."""

    @staticmethod
    def forward(ctx: Any, run: Any, hidden: torch.Tensor, *args: Any) -> Any:
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        kind = hidden.device.type
        ctx.autocast = {
            "device_type": kind,
            "enabled": torch.is_autocast_enabled(kind),
            "dtype": torch.get_autocast_dtype(kind),
            "cache_enabled": torch.is_autocast_cache_enabled(),
        }
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if kind == "cuda" else None
        ctx.held = HeldInput(hidden)
        # the layer below runs its backward next: this one's backward prefetches its input
        ctx.below = _LAST_HELD.get(hidden.device)
        _LAST_HELD[hidden.device] = ctx.held
        with torch.no_grad():
            out = run(hidden, *args)
        ctx.held.release()  # the stream waits here, after the layer's kernels, for the copy
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        hidden = ctx.held.take().detach().requires_grad_(True)
        if ctx.below is not None:
            ctx.below.fetch()
        ctx.held = ctx.below = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grads, strict=False)
            if torch.is_tensor(o) and o.requires_grad and g is not None
        ]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, hidden.grad, *([None] * len(ctx.args)))


def offloaded_checkpoint(run: Any, hidden: torch.Tensor, *args: Any) -> Any:
    """A `_gradient_checkpointing_func` for transformers' decoder layers (called as
    `func(partial(forward, **kwargs), hidden_states, *positional)`). A forward without gradients
    (evaluation in train mode) has no backward to wait for: it runs the layer as is."""
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    return OffloadedCheckpoint.apply(run, hidden, *args)


def offload_checkpointed_inputs(model: Any) -> int:
    """Point every checkpointed decoder layer at `offloaded_checkpoint`; returns how many. Called at
    the start of training, after transformers/TRL have (re)enabled checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers:
        m._gradient_checkpointing_func = offloaded_checkpoint
    return len(layers)


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


def prepare_sharding(trainer: Any, mode: LaunchMode, compute_dtype: torch.dtype) -> None:
    """The last placement step, once the Trainer exists and before it wraps the model (FSDP and
    DeepSpeed wrap in `accelerator.prepare`, when training starts)."""
    if mode.kind == "fsdp":
        keep_buffers_fp32_under_fsdp(trainer)
        if mode.adapters_replicated:
            fsdp_layer_units(trainer)
    elif mode.kind == "deepspeed" and mode.zero_stage == 3:
        partition_for_zero3(trainer, mode, compute_dtype)


def adapter_modules(model: Any) -> list[Any]:
    """The modules whose own parameters all train: peft's LoRA layers (lora_A/lora_B and the like)
    and the trained copies of `modules_to_save`."""
    return [
        m for m in model.modules() if (own := list(m.parameters(recurse=False))) and all(p.requires_grad for p in own)
    ]


def layer_units_policy(model: Any) -> Any:
    """FSDP auto-wrap policy of `QLORA_SFT_FSDP_UNITS=layers`: one unit per decoder layer (the model's
    `_no_split_modules` classes), plus the input embedding as its own unit when it is not tied to the
    output head (gathered only while it is used). The output head stays in the root unit: TRL computes
    the loss from the hidden states and `lm_head.weight` directly, in chunks, without calling the
    head's forward, so a unit of its own would never be gathered. Adapters are left out of every unit
    (`fsdp_layer_units` makes them ignored modules)."""
    import functools as ft

    from peft.utils.other import _get_no_split_modules
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(_get_no_split_modules(base) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise UserError(
            f"FSDP: {type(base).__name__} names no decoder layer class (_no_split_modules), so it cannot be cut into "
            f"one unit per layer; set {FSDP_UNITS_ENV}=peft"
        )
    ends = []
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if emb is not None and (head is None or emb.weight is not head.weight):
        ends = [emb]
    layer_policy = ft.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    end_policy = ft.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: any(m is e for e in ends))
    return ft.partial(_or_policy, policies=[layer_policy, end_policy])


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce the gradients of parameters that every rank holds whole, and average them (what
    DDP does), one flat buffer per dtype."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)


def replicate_adapters(modules: list[Any], device: torch.device) -> list[torch.nn.Parameter]:
    """Put the adapter modules whole on this rank's device (placeholders, meta on ranks that loaded no
    weights, get storage). Their values become identical on every rank only with
    `broadcast_from_rank0`, called after FSDP has wrapped the model. Returns their parameters."""
    for m in modules:
        materialize_placeholders(m, device=str(device))
        m.to(device)
    return [p for m in modules for p in m.parameters(recurse=False)]


def broadcast_from_rank0(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values of `params` on every rank (in place). For the FSDP-ignored adapters this must
    come after wrapping: on a rank whose layers were placeholders, FSDP's `param_init_fn` (`to_empty`)
    runs over each unit's whole module tree, the ignored adapters inside it included, and leaves them
    uninitialised, while its `sync_module_states` broadcast covers only the parameters it shards
    (seen as NaN on CPU ranks, and as a loss 0.034 off one GPU's on two H200s)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, src=0)


def fsdp_layer_units(trainer: Any) -> None:
    """FSDP (version 1) cut into one unit per decoder layer and the embedding, with the
    adapters replicated: a few large units keep the step GPU-bound, where peft's policy (every LoRA
    Linear its own unit, 897 FSDP forwards per step for an 8B Llama) made it CPU-bound (3x slower per
    GPU than DDP, measured on two H200s). FSDP1 cannot put trainable adapters in the same flat
    parameter as frozen 4-bit weights (accelerate then upcasts the whole flat parameter, packed bytes
    included, to fp32), so the adapters are FSDP-ignored modules: whole on every rank, their
    gradients averaged after each accumulation window like DDP's, before clipping (FSDP's clip
    counts non-sharded parameters locally). Their optimizer state (small for LoRA) is then not
    sharded. The Trainer sets peft's wrap policy right before wrapping; here it is set back."""
    import transformers.trainer as trainer_module

    plugin = trainer.accelerator.state.fsdp_plugin
    device = trainer.accelerator.device
    adapters = adapter_modules(trainer.model)
    params = replicate_adapters(adapters, device)
    existing = list(plugin.ignored_modules or [])
    plugin.ignored_modules = existing + [m for m in adapters if m not in existing]
    policy = layer_units_policy(trainer.model)
    plugin.auto_wrap_policy = policy
    prepare, step = trainer._prepare_for_training, trainer.training_step

    def prepare_with_layer_units(*args: Any, **kwargs: Any) -> Any:
        update = trainer_module.update_fsdp_plugin_peft

        def update_then_layer_units(model: Any, accelerator: Any) -> None:
            update(model, accelerator)  # keeps its mixed precision from the 4-bit storage dtype
            accelerator.state.fsdp_plugin.auto_wrap_policy = policy

        trainer_module.update_fsdp_plugin_peft = update_then_layer_units
        try:
            out = prepare(*args, **kwargs)
        finally:
            trainer_module.update_fsdp_plugin_peft = update
        broadcast_from_rank0(params)  # after wrapping (and after a resume's load, which it keeps)
        return out

    def step_then_average(*args: Any, **kwargs: Any) -> Any:
        loss = step(*args, **kwargs)
        if trainer.accelerator.sync_gradients:
            average_gradients(params)
        return loss

    trainer._prepare_for_training = prepare_with_layer_units
    trainer.training_step = step_then_average
    log.info(
        "FSDP: one unit per decoder layer (+ embedding); %d adapter modules (%.1f M parameters) "
        "replicated on every rank",
        len(adapters),
        sum(p.numel() for p in params) / 1e6,
    )


def fp32_buffer_modules(model: Any) -> list[Any]:
    """Modules that hold floating-point buffers and no parameters of their own: the rotary
    embeddings (`inv_freq`)."""
    return [
        m
        for m in model.modules()
        if any(b.is_floating_point() for b in m.buffers(recurse=False))
        and not any(True for _ in m.parameters(recurse=False))
    ]


def keep_buffers_fp32_under_fsdp(trainer: Any) -> None:
    """FSDP's bf16 mixed precision casts every buffer to bf16, the rotary frequencies included:
    rounded to 8 bits of mantissa, the angle of position 2000 is off by up to several radians, so
    attention sees wrong positions at long range (DeepSpeed keeps fp32 buffers; one GPU never casts
    them). FSDP leaves the buffers of ignored modules alone, so the parameterless modules that own
    fp32 buffers are ignored, and moved to this GPU (FSDP does not move ignored modules)."""
    plugin = trainer.accelerator.state.fsdp_plugin
    device = trainer.accelerator.device
    modules = fp32_buffer_modules(trainer.model)
    for m in modules:
        m.to(device)
    existing = plugin.ignored_modules
    if isinstance(existing, str):
        pattern = re.compile(existing)
        existing = [m for name, m in trainer.model.named_modules() if pattern.fullmatch(name)]
    plugin.ignored_modules = list(existing or []) + [m for m in modules if m not in (existing or [])]
    log.info("FSDP: %d module(s) with fp32 buffers (rotary embeddings) kept out of bf16 casting", len(modules))


def partition_for_zero3(trainer: Any, mode: LaunchMode, compute_dtype: torch.dtype) -> None:
    """ZeRO-3: partition the parameters across ranks before the Trainer hands the model to
    DeepSpeed. A model that was not built under `deepspeed.zero.Init` is moved to the GPU whole by
    DeepSpeed's engine and only then partitioned, so a model larger than one GPU would not fit;
    transformers builds quantized models without zero.Init. `zero.Init(module=...)` moves one
    parameter at a time to the GPU, broadcasts rank 0's values (the other ranks loaded none: their
    placeholders are untouched CPU pages) and keeps this rank's partition."""
    import copy

    import deepspeed

    model = trainer.model
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    # the hidden-size dependent values transformers fills in when training starts
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for section in (config, zero):
        for key in [k for k, v in section.items() if v == "auto"]:
            del section[key]
    materialize_placeholders(model)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)  # as DeepSpeed's engine casts every parameter
    deepspeed.zero.Init(module=model, config_dict_or_path=config, dtype=compute_dtype, mem_efficient_linear=False)
    log.info("ZeRO-3: parameters partitioned across %d rank(s) before DeepSpeed's engine starts", mode.world_size)


def materialize_placeholders(model: Any, device: str = "cpu") -> int:
    """Give every parameter still on the meta device (the weights the low-memory loader leaves
    unloaded on ranks other than 0 under ZeRO-3, and the LoRA weights peft creates beside them)
    uninitialised storage on `device`, to be overwritten by rank 0's broadcast. The parameter is
    replaced in its module, keeping its class (bitsandbytes' `Params4bit` with its quantization
    state and settings), `requires_grad` and ties (one new parameter for all modules that share
    one): a meta parameter's data cannot be swapped in place (`p.data = ...` raises "variable and
    tensor have incompatible tensor type"). Returns how many parameters were replaced."""
    import bitsandbytes as bnb

    new_for: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            new = new_for.get(id(p))
            if new is None:
                data = torch.empty(p.shape, dtype=p.dtype, device=device)
                if isinstance(p, bnb.nn.Params4bit):
                    new = bnb.nn.Params4bit(
                        data,
                        requires_grad=False,
                        quant_state=p.quant_state,
                        blocksize=p.blocksize,
                        compress_statistics=p.compress_statistics,
                        quant_type=p.quant_type,
                        quant_storage=p.quant_storage,
                        module=p.module,
                        bnb_quantized=p.bnb_quantized,
                    )
                else:
                    new = torch.nn.Parameter(data, requires_grad=p.requires_grad)
                new_for[id(p)] = new
            module._parameters[name] = new
    return len(new_for)


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
