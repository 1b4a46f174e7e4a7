"""Model: tokenizer, quantization, placement for the launch mode, LoRA adapters.

In: the recipe (model, quantization, lora, train settings), the `LaunchMode` of this process and
the recipe's folder (relative paths). Out: the tokenizer with the recipe's chat template
(`recipe_tokenizer`), the quantized base placed for the launch mode (`load_base`, the one way to
load a base as training does: train, export, chat, demo), and the peft model ready to train
(`load_model`); then, once the Trainer exists, its sharding set up (`prepare_sharding`) and its
checkpointed layers offloaded (`offload_checkpointed_inputs`).

    load        quantization config, load_base and placement, tokenizer and pad token, load_model
                (LoRA), attention choice, Liger kernels, the sharded-dtype check, summaries
    fused_lora  the fused 4-bit + LoRA layer (`lora.fused`)
    nf4_kernel  one Triton kernel dequantizing an NF4 weight (fused_lora's, QLORA_SFT_TRITON_DEQUANT)
    offload     offloaded gradient checkpointing (`train.offload_activations`)
    layer_graphs  CUDA graphs of the checkpointed layers' calls (QLORA_SFT_LAYER_GRAPHS, offload's)
    sharding    prepare_sharding: FSDP layer units with replicated adapters, fp32 buffers under FSDP,
                ZeRO-3 partitioning, materialize_placeholders

`load` uses `fused_lora`, `fused_lora` uses `nf4_kernel`, `offload` uses `layer_graphs`; the other
modules use none of each other.
Each known trap of QLoRA is handled in the one function that owns the choice, with a comment that
says why.
"""

from . import layer_graphs, nf4_kernel
from .fused_lora import FusedLoraMatmul, fuse_lora_layers, uses_fused_lora
from .load import (
    check_sharded_dtypes,
    dtype_name,
    ensure_pad_token,
    keep_cpu_4bit_trainable,
    load_base,
    load_model,
    load_tokenizer,
    recipe_tokenizer,
    resize_for_pad,
    summarize,
    uses_low_memory_loader,
    varlen_unsuitable,
)
from .offload import offload_checkpointed_inputs, offloaded_checkpoint
from .sharding import (
    adapter_modules,
    average_gradients,
    broadcast_from_rank0,
    fp32_buffer_modules,
    fsdp_layer_units,
    keep_buffers_fp32_under_fsdp,
    layer_units_policy,
    materialize_placeholders,
    partition_for_zero3,
    prepare_sharding,
    replicate_adapters,
    whole_layers_needed,
)

__all__ = [
    "FusedLoraMatmul",
    "adapter_modules",
    "average_gradients",
    "broadcast_from_rank0",
    "check_sharded_dtypes",
    "dtype_name",
    "ensure_pad_token",
    "fp32_buffer_modules",
    "fsdp_layer_units",
    "fuse_lora_layers",
    "keep_buffers_fp32_under_fsdp",
    "keep_cpu_4bit_trainable",
    "layer_graphs",
    "layer_units_policy",
    "load_base",
    "load_model",
    "load_tokenizer",
    "materialize_placeholders",
    "nf4_kernel",
    "offload_checkpointed_inputs",
    "offloaded_checkpoint",
    "partition_for_zero3",
    "prepare_sharding",
    "recipe_tokenizer",
    "replicate_adapters",
    "resize_for_pad",
    "summarize",
    "uses_fused_lora",
    "uses_low_memory_loader",
    "varlen_unsuitable",
    "whole_layers_needed",
]
