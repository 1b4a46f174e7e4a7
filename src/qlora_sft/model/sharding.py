"""The last placement step under FSDP and ZeRO-3, once the Trainer exists (`prepare_sharding`): FSDP
cut into one unit per decoder layer with the adapters replicated on every rank (their gradients
averaged like DDP's), buffers kept in fp32 (the rotary frequencies), ZeRO-3's partitioning before
DeepSpeed's engine starts, and `materialize_placeholders` for the meta parameters of the ranks that
loaded no weights."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from ..errors import UserError
from ..launch import (
    EMBEDDING_GATHERED_ONCE,
    FSDP_RELEASE_HEAD_ENV,
    FSDP_UNITS_ENV,
    RELEASE_HEAD_APPLIED,
    RELEASE_LAYERS_APPLIED,
    ZERO3_UNITS_ENV,
    LaunchMode,
)

log = logging.getLogger("qlora_sft")


def prepare_sharding(
    trainer: Any, mode: LaunchMode, compute_dtype: torch.dtype, whole_layers_for: tuple[str, ...] = ()
) -> None:
    """The last placement step, once the Trainer exists and before it wraps the model (FSDP and
    DeepSpeed wrap in `accelerator.prepare`, when training starts). `whole_layers_for`: the settings
    of this launch that need each decoder layer to run on its whole weights (under ZeRO-3 they were
    turned on by qlora-sft's leaf layers, checked here)."""
    if mode.zero3_leaf_modules:
        zero3_layer_leaves(trainer.model, mode, whole_layers_for)
        if mode.zero3_releases_layers:
            release_recomputed_layers(trainer)
    if mode.kind == "fsdp":
        release_retied_parameters(trainer.accelerator)
        keep_buffers_fp32_under_fsdp(trainer)
        if mode.adapters_replicated:
            fsdp_layer_units(trainer, release_head=mode.fsdp_release_head)
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


def fsdp_layer_units(trainer: Any, release_head: bool = False) -> None:
    """FSDP (version 1) cut into one unit per decoder layer and the embedding, with the
    adapters replicated: a few large units keep the step GPU-bound, where peft's policy (every LoRA
    Linear its own unit, 897 FSDP forwards per step for an 8B Llama) made it CPU-bound (3x slower per
    GPU than DDP, measured on two H200s). FSDP1 cannot put trainable adapters in the same flat
    parameter as frozen 4-bit weights (accelerate then upcasts the whole flat parameter, packed bytes
    included, to fp32), so the adapters are FSDP-ignored modules: whole on every rank, their
    gradients averaged after each accumulation window like DDP's, before clipping (FSDP's clip
    counts non-sharded parameters locally). Their optimizer state (small for LoRA) is then not
    sharded. The Trainer sets peft's wrap policy right before wrapping; here it is set back. After
    wrapping: the embedding's unit gathered for the forward only, and with `release_head` (the
    default; QLORA_SFT_FSDP_RELEASE_HEAD=0 turns it off) the root resharded before the decoder
    layers' backward."""
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
        wrapped = out[0] if isinstance(out, tuple) else out
        no_embedding_gather_in_backward(wrapped)  # logs what FSDP does after the first forward
        if release_head and release_root_after_head(wrapped):
            log.info(RELEASE_HEAD_APPLIED)
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


def no_embedding_gather_in_backward(wrapped: Any) -> bool:
    """Keep FSDP1 from gathering the frozen input embedding's unit a second time, in the backward.

    Checkpointing marks the embedding's output as requiring grad (transformers, peft and TRL each
    register `enable_input_require_grads`'s forward hook on the embedding), and FSDP1 registers a
    pre-backward hook, which unshards the unit, on every output of a unit that requires grad. The
    gradient stops there (the table is frozen), so the gather is pure cost: on two H200s (Llama-3-8B,
    BACKWARD_PRE) the embedding's 1,002 MiB was gathered during the first layer's backward, at the
    step's peak. Here those hooks move from the embedding to the outside of its FSDP unit: the
    output is marked after FSDP has registered its hooks, so the first decoder layer still receives
    an input that requires grad (what reentrant or offloaded checkpointing needs) and the values are
    unchanged. After the first training forward it logs whether FSDP will gather the unit in the
    backward (`EMBEDDING_GATHERED_ONCE`, or a warning naming the cost). Returns whether a hook was
    moved (False where the embedding is no unit of its own or no such hook exists)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [u for u in FSDP.fsdp_modules(wrapped) if isinstance(u.module, torch.nn.Embedding)]
    if len(units) != 1:
        return False
    unit, embedding = units[0], units[0].module
    hooks = embedding._forward_hooks
    marking = [k for k, h in hooks.items() if getattr(h, "__name__", "") in MARKING_HOOK_NAMES]
    for key in marking:
        for table in (hooks, embedding._forward_hooks_with_kwargs, embedding._forward_hooks_always_called):
            table.pop(key, None)
    if marking:
        unit.register_forward_hook(mark_output_requires_grad)
    gib = embedding.weight.numel() * embedding.weight.element_size() / 2**30

    def report_once(module: Any, inputs: Any, output: Any) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return  # FSDP registers no backward hooks outside training
        handle.remove()
        if module._handle is not None and module._handle._needs_pre_backward_unshard:
            log.warning(
                "FSDP: the frozen embedding's unit will be gathered again in every backward (%.2f GiB per rank "
                "more at that moment than plan counts): a hook outside qlora-sft marks its output as requiring "
                "grad (%s)",
                gib,
                ", ".join(getattr(h, "__name__", repr(h)) for h in module.module._forward_hooks.values()) or "none",
            )
        else:
            log.info(EMBEDDING_GATHERED_ONCE)

    handle = unit.register_forward_hook(report_once)  # after the marking hook: FSDP's own hooks are set by then
    return bool(marking)


def release_root_after_head(wrapped: Any) -> bool:
    """Reshard FSDP1's root unit as soon as the backward is past the final norm (the default with
    layer units; QLORA_SFT_FSDP_RELEASE_HEAD=0 turns it off). Measured on two H200s at 8B: 0.80x ->
    0.69x DDP's peak per rank, tokens/s within noise; with parameter offload 0.45x -> 0.39x.

    FSDP1 never reshards the root after the forward, and the root's flat parameter is frozen, so only
    the end-of-backward callback reshards it: the output head (1 GiB at 8B, 2 GiB at 70B, per rank once
    gathered) stays whole through every decoder layer's backward, where the step peaks, though only the
    loss and the final norm use it. A gradient hook on the final norm's input reshards it there; the
    end-of-backward callback then finds it resharded. The root is gathered once per forward either way
    (under FULL_SHARD; FSDP's own rule decides when to free).
    Returns False, and says why, where it cannot apply: no `model.norm`, nothing sharded in the
    root, or a root holding anything the forward uses before the final norm (its backward would need
    it again) or anything trainable. That is a warning where the user asked for it
    (QLORA_SFT_FSDP_RELEASE_HEAD=1), an info line where it was only the default."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._runtime_utils import _reshard, _should_free_in_backward

    def refuse(why: str) -> bool:
        asked = bool(os.environ.get(FSDP_RELEASE_HEAD_ENV, "").strip())
        log.log(
            logging.WARNING if asked else logging.INFO,
            "FSDP: the output head stays gathered until the end of the backward (%s not applied: %s)",
            FSDP_RELEASE_HEAD_ENV,
            why,
        )
        return False

    handle = getattr(wrapped, "_handle", None)
    if not isinstance(wrapped, FSDP) or handle is None or not handle.uses_sharded_strategy:
        return refuse("the root unit holds nothing sharded")
    base = wrapped.module.get_base_model() if hasattr(wrapped.module, "get_base_model") else wrapped.module
    norm = getattr(getattr(base, "model", None), "norm", None)
    if not isinstance(norm, torch.nn.Module):
        return refuse(f"{type(base).__name__} has no model.norm before its output head")
    flat = handle.flat_param
    allowed = ("lm_head.", "model.norm.", "model.embed_tokens.")  # a tied embedding is the head
    others = [n for n in flat._fqns if not any(a in n for a in allowed)]
    if flat.requires_grad or others:
        return refuse(f"the root unit also holds {', '.join(others[:3]) or 'trainable parameters'}")

    def release(grad: torch.Tensor) -> None:
        if flat.data_ptr() != flat._local_shard.data_ptr():  # gathered (FSDP's own check)
            _reshard(wrapped, handle, _should_free_in_backward(wrapped, handle))

    def hook_input(module: Any, inputs: Any, output: Any) -> None:
        hidden = inputs[0] if inputs else None
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(release)

    norm.register_forward_hook(hook_input)
    return True


# transformers' `enable_input_require_grads` (make_inputs_require_grads) and peft's and TRL's own
# copies of it (make_inputs_require_grad)
MARKING_HOOK_NAMES = ("make_inputs_require_grads", "make_inputs_require_grad")


def mark_output_requires_grad(module: Any, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def release_retied_parameters(accelerator: Any) -> None:
    """accelerate's FSDP1 `prepare_model` wraps the plugin's `param_init_fn` in `ensure_weights_retied`
    (accelerate/utils/fsdp_utils.py) whenever the model class names tied weights (`_tied_weights_keys`:
    every Llama, tied or not) and stores the wrapper on the plugin. The wrapper's closure keeps the
    first parameter it materialised under each of those names: on the ranks that loaded placeholders
    (meta), `to_empty` gives `lm_head.weight` a whole tensor on the GPU, which FSDP then copies into
    its flat parameter and shards, while the closure keeps the whole one alive for the rest of the run
    (1 GiB more on rank 1 than on rank 0 for Llama-3-8B, 2 GiB for 70B, measured on two H200s; rank 0
    loaded real weights, so its param_init_fn never runs). The plugin's own param_init_fn is put back
    after each wrapping, which drops the wrapper and what it holds."""
    prepare_model = accelerator.prepare_model

    def prepare_model_then_release(*args: Any, **kwargs: Any) -> Any:
        plugin = accelerator.state.fsdp_plugin
        init_fn = plugin.param_init_fn
        try:
            return prepare_model(*args, **kwargs)
        finally:
            plugin.param_init_fn = init_fn

    accelerator.prepare_model = prepare_model_then_release


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


def zero3_leaves(model: Any, leaf: dict[str, list[str]]) -> list[str]:
    """Names of the modules that a DeepSpeed JSON's `zero_optimization.leaf_module` names (matched as
    deepspeed.utils.z3_leaf_module matches them: a class by name or fully qualified name, a module by
    its exact name or a suffix of it in `named_modules()`; DeepSpeed's default MoE classes aside)."""
    classes, names, suffixes = (set(leaf.get(k, [])) for k in ("classes", "names", "name_suffixes"))
    found = []
    for name, module in model.named_modules():
        cls = type(module)
        if (
            cls.__name__ in classes
            or f"{cls.__module__}.{cls.__qualname__}" in classes
            or name in names
            or any(name.endswith(s) for s in suffixes)
        ):
            found.append(name)
    return found


def decoder_layers(model: Any) -> tuple[set[str], list[str]]:
    """The model's decoder layer classes (`_no_split_modules`) and the names of their modules."""
    from peft.utils.other import _get_no_split_modules

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = set(_get_no_split_modules(base) or [])
    return classes, [n for n, m in model.named_modules() if type(m).__name__ in classes]


def zero3_coordinator(trainer: Any) -> Any:
    """DeepSpeed's parameter coordinator of the Trainer's engine, once the engine exists (None before)."""
    engine = getattr(trainer, "model_wrapped", None)
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None)
    return offload.get_param_coordinator() if offload is not None else None


# DeepSpeed's record of the modules whose backward has started and not ended (an ordered dict by
# ds_id; deepspeed 0.19 PartitionedParameterCoordinator, private)
ACTIVE_BACKWARD = "_PartitionedParameterCoordinator__active_backward_submodules"


def own_recompute(coordinator: Any, module: Any) -> bool:
    """Called as `module` starts a forward. Inside the backward pass with gradients on, that is a
    recompute of a checkpointed layer: make `module` the newest module whose backward runs, the
    one DeepSpeed gives the weights it gathers now. Returns whether it did."""
    if not torch.is_grad_enabled() or torch._C._current_graph_task_id() == -1:
        return False  # a forward of the forward pass (or without gradients): DeepSpeed's own rules
    active = getattr(coordinator, ACTIVE_BACKWARD, None)
    if not isinstance(active, dict) or not hasattr(module, "ds_id"):
        return False  # a DeepSpeed without recompute attribution: nothing is given to another module
    active.pop(module.ds_id, None)
    active[module.ds_id] = module
    return True


def release_recomputed_layers(trainer: Any) -> int:
    """ZeRO-3 leaf layers under gradient checkpointing (QLORA_SFT_ZERO3_RELEASE_LAYERS, see launch):
    DeepSpeed gives the frozen weights gathered while a layer is recomputed in the backward pass to
    the newest module whose backward has started ("checkpoint recompute" attribution in deepspeed's
    PartitionedParameterCoordinator) and releases them when that module's backward ends. For a
    decoder layer recomputed inside its own checkpoint that module is the model around the layers,
    whose backward ends after the last layer's: every layer's weights stay gathered to the end of the
    backward (one H200, 8B, one process with parameter offload: all 32 layers, 3.25 GiB, at the
    peak). A hook that runs before DeepSpeed's own as each layer starts makes the layer that module
    (`own_recompute`): its weights are released when its own backward ends. Returns how many layers."""
    _, names = decoder_layers(trainer.model)
    wanted = set(names)
    layers = [m for n, m in trainer.model.named_modules() if n in wanted]

    def hook(module: Any, args: Any) -> None:
        coordinator = zero3_coordinator(trainer)
        if coordinator is not None:
            own_recompute(coordinator, module)

    for layer in layers:
        layer.register_forward_pre_hook(hook, prepend=True)
    if layers:
        log.info("%s (%d layers)", RELEASE_LAYERS_APPLIED, len(layers))
    return len(layers)


def zero3_layer_leaves(model: Any, mode: LaunchMode, needed_by: tuple[str, ...] = ()) -> None:
    """QLORA_SFT_ZERO3_UNITS=layers (the default): make every decoder layer a DeepSpeed leaf module
    (deepspeed.utils.set_z3_leaf_modules), so DeepSpeed's engine gathers each layer's weights
    together as it starts and puts no hooks on the modules inside it. Then check, before DeepSpeed
    starts, that everything `needed_by` needs whole (the fused LoRA layers, the offloaded
    checkpointed layers) sits inside a leaf. A model that names no decoder layer class keeps
    DeepSpeed's per-module gathering when nothing needs whole layers, and is refused otherwise."""
    classes, layers = decoder_layers(model)
    if not layers:
        if needed_by:
            raise UserError(
                f"ZeRO-3: {type(model).__name__} names no decoder layer class (_no_split_modules), so qlora-sft "
                f"cannot gather one layer at a time, which {' and '.join(needed_by)} need. Launch with "
                f"{ZERO3_UNITS_ENV}=modules (DeepSpeed's per-module gathering; both then stay off), or set "
                f"{' and '.join(WHOLE_LAYER_SETTINGS[k] for k in needed_by)}."
            )
        log.warning(
            "ZeRO-3: %s names no decoder layer class (_no_split_modules): DeepSpeed gathers per module",
            type(model).__name__,
        )
        return
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, sorted(classes))
    check_whole_layers(model, mode, needed_by)
    log.info("ZeRO-3: the %d decoder layers are leaf modules: each is gathered whole as it starts", len(layers))


def needs_whole_layer(model: Any, needed_by: tuple[str, ...]) -> list[str]:
    """Names of the modules that compute on weights they do not gather themselves: the fused LoRA
    layers (`lora.fused`) and the checkpointed layers whose recompute activation offloading runs."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .fused_lora import fused_lora_class

    fused = fused_lora_class() if FUSED_LAYER in needed_by else None
    offload = OFFLOADING in needed_by
    return [
        n
        for n, m in model.named_modules()
        if (fused is not None and isinstance(m, fused)) or (offload and isinstance(m, GradientCheckpointingLayer))
    ]


def check_whole_layers(model: Any, mode: LaunchMode, needed_by: tuple[str, ...]) -> None:
    """Refuse a ZeRO-3 model where a module that needs its layer whole (`needs_whole_layer`) is in no
    leaf module (its weights would never be gathered: DeepSpeed would crash or compute with empty
    partitions); warn where a leaf of the DeepSpeed JSON contains decoder layers (DeepSpeed then
    gathers all of them at once)."""
    leaves = [n for n, m in model.named_modules() if getattr(m, "_z3_leaf", False)]

    def inside(name: str, leaf: str) -> bool:
        return leaf == "" or name == leaf or name.startswith(leaf + ".")

    uncovered = [n for n in needs_whole_layer(model, needed_by) if not any(inside(n, leaf) for leaf in leaves)]
    if uncovered:
        raise UserError(
            f"ZeRO-3: {len(uncovered)} module(s) that {' and '.join(needed_by)} need gathered whole are in no "
            f"decoder layer (first: {uncovered[0]}), so DeepSpeed would not gather their weights. Set "
            f"{' and '.join(WHOLE_LAYER_SETTINGS[k] for k in needed_by)}, or launch with {ZERO3_UNITS_ENV}=modules."
        )
    _, layers = decoder_layers(model)
    json_leaves = zero3_leaves(model, getattr(mode.deepspeed, "leaf_modules", None) or {})
    wide = sorted({leaf for leaf in json_leaves for n in layers if leaf != n and inside(n, leaf)})
    if wide:
        log.warning(
            "ZeRO-3: %s: zero_optimization.leaf_module makes %s a leaf, which holds decoder layers: DeepSpeed "
            "gathers all of them at once (more GPU memory than one layer at a time)",
            getattr(mode.deepspeed, "path", "the DeepSpeed config"),
            ", ".join(repr(w) for w in wide[:3]),
        )


# what needs each layer to run whole, and the recipe setting that turns it off
FUSED_LAYER, OFFLOADING = "the fused LoRA layer", "activation offloading"
WHOLE_LAYER_SETTINGS = {FUSED_LAYER: "lora.fused: false", OFFLOADING: "train.offload_activations: false"}


def whole_layers_needed(recipe: Any, mode: LaunchMode) -> tuple[str, ...]:
    """What of this launch needs each decoder layer to run on its whole weights (`prepare_sharding`'s
    `whole_layers_for`): the fused LoRA layer, activation offloading."""
    from ..launch import offloads_activations
    from .fused_lora import uses_fused_lora

    on = {FUSED_LAYER: uses_fused_lora(recipe, mode), OFFLOADING: offloads_activations(recipe, mode)}
    return tuple(what for what, used in on.items() if used)


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
