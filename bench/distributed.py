"""The same QLoRA recipe in every launch mode on real GPUs: 1 GPU, DDP, ZeRO-2, ZeRO-3, FSDP.

    python -m bench.distributed --shape llama3-8b --gpus 2            # the whole table, one results file
    python -m bench.distributed --shape llama3-8b --gpus 2 --modes 1gpu,ddp,fsdp
    python -m bench.distributed --shape llama3-8b --gpus 2 --modes zero2,zero3 --append   # same file
    python -m bench.distributed --shape llama3-70b --prequantized --gpus 2 --gpu-cap 24 --modes fsdp,fsdp_offload

Modes: 1gpu, ddp, zero2, zero3, fsdp (one FSDP unit per decoder layer, adapters replicated: the
default), fsdp_offload; ablation rows fsdp_peft (peft's units, as before 2026-11-30), fsdp_nofuse,
fsdp_nooffload, fsdp_offload_peft; ablation rows of ZeRO-3 that change its DeepSpeed JSON (a copy
of configs/deepspeed/zero3.json written beside the logs): zero3_layers (each decoder layer one
DeepSpeed leaf module named in the JSON, `leaf_module.classes`; since 2026-12-01 qlora-sft makes
the decoder layers leaves itself by default, and the fused LoRA layer and activation offloading then
apply: zero3_nofuse, zero3_nooffload, zero3_plain turn them off, zero3_modules goes back to
DeepSpeed's per-module gathering (QLORA_SFT_ZERO3_UNITS=modules, the default before), zero3_live
keeps fewer gathered weights resident), zero3_persist (stage3_param_persistence_threshold
1M elements: adapters, norms and biases stay whole on every rank), zero3_layers_persist,
zero3_prefetch and zero3_layers_prefetch (stage3_prefetch_bucket_size 1e8 elements); FSDP's
prefetch (fsdp_bwd_pre, fsdp_bwd_post, fsdp_fwd_prefetch, fsdp_offload_bwd_post: a changed copy of
the accelerate config), the root unit resharded before the decoder layers' backward
(the default since 2026-11-30; fsdp_keep_head, fsdp_offload_keep_head: QLORA_SFT_FSDP_RELEASE_HEAD=0,
FSDP's own timing; fsdp_release_head, fsdp_offload_release_head: =1, as measured before), the allocator
(*_expandable, *_segments_off), one GPU's memory levers
(1gpu_hostemb, 1gpu_mb2, 1gpu_mb1, 1gpu_mb2_hostemb, 1gpu_hosthead, 1gpu_hosttables,
1gpu_mb2_hosttables, 1gpu_adamw32; since 2026-12-02 one GPU keeps both frozen tables in host memory
by default, and 1gpu_gputables and 1gpu_mb2_gputables keep them on the GPU, the default before),
the checkpointed decoder layers replayed from CUDA graphs (*_graphs: QLORA_SFT_LAYER_GRAPHS=on;
1gpu_mb2_fwdgraphs: =forward, the forward only; the JSON's layer_graphs_per_rank counts the replays
and the graphs' pool, which only the reserved peak holds),
ZeRO-3 with parameter offload (zero3_offload, zero3_offload_modules, zero3_offload_live), each
recomputed layer released after its backward or kept (zero3_release_layers, zero3_keep_layers,
zero3_offload_keep_layers: QLORA_SFT_ZERO3_RELEASE_LAYERS=1/0; zero3_own, zero3_offload_own, zero3_offload_live_own and
zero3_offload_live_diag: the names of its first measurement) and profiled rows (*_profiled:
one step profiled on every rank; what was alive at its memory peak, how long the GPU idled and where
the host waited for it, in the row). Checks
written beside the results: speedup against one GPU, tokens/s and peak against DDP for the sharded
modes, the largest loss difference against one GPU, the largest resumed loss difference, and
plan's estimate against each peak.

For each mode it runs `accelerate launch --config_file configs/accelerate/<config> --num_processes
N -m qlora_sft train <recipe>` (the command users run) with the project's defaults (packing,
varlen attention, Liger where installed, micro batch by tokens, paged 8-bit AdamW; LoRA dropout 0
so that the modes see the same numbers), then reads the run directory: real tokens/s over the
steps after the warm-up, peak and steady (after step 1) GPU memory and the parameter bytes each
rank holds after wrapping (logs/rank<i>.json), peak CPU memory while loading, the loss at each of
the first 10 steps, and `qlora-sft plan`'s estimate for the same launch.

--kill-resume MODES   (default: all) also run each mode saving every steps/2 steps with rank 0
                      SIGKILLed two steps after the first save (10 steps: killed as step 7 begins,
                      checkpoint-5 the newest complete one), relaunch it with the same overrides,
                      and compare the resumed losses with the uninterrupted run's; `none` skips
--export MODES        (default: the sharded modes) `qlora-sft export` each mode's final adapter on
                      the GPU and record whether the merged model verifies against it
--append              keep the other modes' rows of the results file of the same tag (a table
                      split over several calls of a time-limited machine)
--gpu-cap GIB         cap every rank's GPU memory (QLORA_SFT_GPU_MEMORY_GIB) to behave like a
                      smaller card
--gpu-sms N           run every rank's kernels on N of its GPU's streaming multiprocessors
                      (QLORA_SFT_GPU_SMS, a CUDA green context): with --gpu-cap, a stand-in for
                      a slower card whose host is as fast (a proxy, not a measurement of a card)
--prequantized        build the model directly in NF4 (bf16 storage): 70B in ~41 GB of disk

Writes bench/results/<date>-<gpu>-<shape>-distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qlora_sft.cli import gib
from qlora_sft.hostwork import HOST_SAVINGS_ENV, NORM_ENV, SWIGLU_ENV
from qlora_sft.launch import (
    DEFAULT_ALLOC_CONF,
    EMBEDDING_GATHERED_ONCE,
    FSDP_RELEASE_HEAD_ENV,
    RELEASE_HEAD_APPLIED,
    RELEASE_LAYERS_APPLIED,
    ZERO3_RELEASE_LAYERS_ENV,
    ZERO3_UNITS_ENV,
)
from qlora_sft.model.fused_lora import ABSMAX_CACHE_ENV, DIRECT_DEQUANT_ENV, GROUPED_ENV
from qlora_sft.model.layer_graphs import LAYER_GRAPHS_ENV
from qlora_sft.model.nf4_kernel import TRITON_DEQUANT_ENV
from qlora_sft.model.offload import HEAD_LEAD_ENV, HEAD_TILE_ENV, OFFLOAD_PREFETCH_ENV
from qlora_sft.profiling import PROFILE_HOST_ENV

from . import measure, report
from .busy_gpu import busy_gpu
from .workload import make_data, make_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DECODER_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer")  # of the benchmark shapes


@dataclass(frozen=True)
class Mode:
    config: str  # configs/accelerate/<config>
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the launch
    overrides: tuple[str, ...] = ()  # extra recipe overrides (ablation rows)
    zero: tuple[tuple[str, Any], ...] = ()  # DeepSpeed zero_optimization keys replaced (ablation rows)
    fsdp: tuple[tuple[str, Any], ...] = ()  # the accelerate config's fsdp_config keys replaced (ablation rows)

    @property
    def one_process(self) -> bool:
        return self.config == "single_gpu.yaml"

    def processes(self, gpus: int) -> int:
        return 1 if self.one_process else gpus


# gathered parameters released after use: fewer kept gathered, and none kept for its next use
ZERO3_LIVE = (("stage3_max_live_parameters", 100_000_000), ("stage3_max_reuse_distance", 0))
KEEP_LAYERS = ((ZERO3_RELEASE_LAYERS_ENV, "0"),)
RELEASE_LAYERS = ((ZERO3_RELEASE_LAYERS_ENV, "1"),)
ZERO3_LEAF_LOGGED = re.compile(r"ZeRO-3: the \d+ decoder layers are leaf modules")  # model.sharding's line
PROFILE_STEP = "5"  # the step the *_profiled rows profile (QLORA_SFT_PROFILE_STEP): after the warm-up
PROFILED = (("QLORA_SFT_PROFILE_STEP", PROFILE_STEP),)
HOST_PROFILED = (*PROFILED, (PROFILE_HOST_ENV, "1"))  # the step profiled by Python function (cProfile)
SAVINGS_OFF = ((HOST_SAVINGS_ENV, "0"),)  # the Trainer's own host work per micro batch (qlora_sft.hostwork)
ABSMAX_CACHED = ((ABSMAX_CACHE_ENV, "1"),)
PUBLIC_DEQUANT = ((DIRECT_DEQUANT_ENV, "0"),)  # bitsandbytes' dequantize_4bit, the other savings kept
LIGER_NORM = ((NORM_ENV, "liger"),)  # Liger's RMSNorm kernel (the default; named for the rows of 2026-12-03)
TORCH_NORM = ((NORM_ENV, "torch"),)  # torch's fused RMSNorm in place of Liger's
TORCH_SWIGLU = ((SWIGLU_ENV, "torch"),)  # transformers' MLP instead of Liger's SwiGLU
UNGROUPED = ((GROUPED_ENV, "0"),)  # each fused LoRA layer computed alone, not with its siblings
BNB_DEQUANT = ((TRITON_DEQUANT_ENV, "0"),)  # bitsandbytes' kernels dequantize, not model/nf4_kernel.py's
MB2 = ("train.micro_batch_tokens=4096",)
GRAPHS = ((LAYER_GRAPHS_ENV, "on"),)
FORWARD_GRAPHS = ((LAYER_GRAPHS_ENV, "forward"),)
EXPANDABLE = (("PYTORCH_CUDA_ALLOC_CONF", DEFAULT_ALLOC_CONF),)  # what qlora-sft sets unless the user did
SEGMENTS_OFF = (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False"),)
RELEASE_HEAD = ((FSDP_RELEASE_HEAD_ENV, "1"),)
KEEP_HEAD = ((FSDP_RELEASE_HEAD_ENV, "0"),)


HOST_TABLES = ("model.embedding_in_host_memory=true", "model.lm_head_in_host_memory=true")
# what model.load logs for each table it keeps in host memory
HOST_TABLES_LOGGED = {
    "embedding_in_host_memory": "input embedding in host memory",
    "lm_head_in_host_memory": "output head in host memory",
}
# the default on one GPU since 2026-12-02 (auto) is HOST_TABLES; the rows before it kept both on the GPU
GPU_TABLES = ("model.embedding_in_host_memory=false", "model.lm_head_in_host_memory=false")
MODES = {
    "1gpu": Mode("single_gpu.yaml"),
    "ddp": Mode("multi_gpu.yaml"),
    "zero2": Mode("deepspeed_zero2.yaml"),
    "zero3": Mode("deepspeed_zero3.yaml"),
    "fsdp": Mode("fsdp_qlora.yaml"),  # one unit per decoder layer, adapters replicated (the default)
    "fsdp_offload": Mode("fsdp_qlora_offload.yaml"),
    # ablation rows of FSDP
    "fsdp_peft": Mode("fsdp_qlora.yaml", (("QLORA_SFT_FSDP_UNITS", "peft"),)),  # peft's units (before 2026-11-30)
    "fsdp_nofuse": Mode("fsdp_qlora.yaml", overrides=("lora.fused=false",)),
    "fsdp_nooffload": Mode("fsdp_qlora.yaml", overrides=("train.offload_activations=false",)),
    "fsdp_offload_peft": Mode("fsdp_qlora_offload.yaml", (("QLORA_SFT_FSDP_UNITS", "peft"),)),
    # ablation rows of ZeRO-3: each decoder layer one DeepSpeed leaf module (its parameters gathered
    # at once, no hooks on the modules inside it), and/or parameters up to 1M elements (the
    # adapters, norms and biases; not a packed 4-bit weight of these shapes) kept whole on every rank
    "zero3_layers": Mode("deepspeed_zero3.yaml", zero=(("leaf_module", {"classes": list(DECODER_LAYERS)}),)),
    "zero3_persist": Mode("deepspeed_zero3.yaml", zero=(("stage3_param_persistence_threshold", 1_000_000),)),
    "zero3_layers_persist": Mode(
        "deepspeed_zero3.yaml",
        zero=(("leaf_module", {"classes": list(DECODER_LAYERS)}), ("stage3_param_persistence_threshold", 1_000_000)),
    ),
    # ZeRO-3 with qlora-sft's leaf layers (the default since 2026-12-01: `zero3`) runs each layer
    # whole, so the fused LoRA layer and activation offloading apply; these rows turn them off, go
    # back to DeepSpeed's per-module gathering, or keep fewer gathered weights resident (DeepSpeed's
    # max live parameters and reuse distance: 1e9 in the bundled JSON)
    # (the first rows of 2026-12-01, with the leaves named in the JSON)
    "zero3_layers_plain": Mode(
        "deepspeed_zero3.yaml",
        zero=(("leaf_module", {"classes": list(DECODER_LAYERS)}),),
        overrides=("lora.fused=false", "train.offload_activations=false"),
    ),
    "zero3_layers_live": Mode(
        "deepspeed_zero3.yaml",
        zero=(
            ("leaf_module", {"classes": list(DECODER_LAYERS)}),
            ("stage3_max_live_parameters", 100_000_000),
            ("stage3_max_reuse_distance", 0),
        ),
    ),
    "zero3_modules": Mode("deepspeed_zero3.yaml", ((ZERO3_UNITS_ENV, "modules"),)),
    "zero3_nofuse": Mode("deepspeed_zero3.yaml", overrides=("lora.fused=false",)),
    "zero3_nooffload": Mode("deepspeed_zero3.yaml", overrides=("train.offload_activations=false",)),
    "zero3_plain": Mode("deepspeed_zero3.yaml", overrides=("lora.fused=false", "train.offload_activations=false")),
    "zero3_live": Mode("deepspeed_zero3.yaml", zero=ZERO3_LIVE),
    # ZeRO-3 with parameters and optimizer state in host memory: leaf layers (the default), per module,
    # and with gathered layers released after use (the bundled reuse distance, 1e9 elements, kept every
    # 8B layer gathered at the peak of 2026-12-01: 18 from the forward, 14 from the backward)
    "zero3_offload": Mode("deepspeed_zero3_offload.yaml"),
    "zero3_offload_modules": Mode("deepspeed_zero3_offload.yaml", ((ZERO3_UNITS_ENV, "modules"),)),
    "zero3_offload_live": Mode("deepspeed_zero3_offload.yaml", zero=ZERO3_LIVE),
    # each recomputed layer's weights released after its own backward (QLORA_SFT_ZERO3_RELEASE_LAYERS:
    # the default with several ranks or parameter offload since 2026-12-01 night), or kept to the end
    # of the backward as DeepSpeed does on its own. The *_own and *_diag rows are the first
    # measurement's names (their runs also logged how many layers were still gathered: 32 without, 0 with)
    "zero3_keep_layers": Mode("deepspeed_zero3.yaml", KEEP_LAYERS),
    "zero3_offload_keep_layers": Mode("deepspeed_zero3_offload.yaml", KEEP_LAYERS),
    "zero3_release_layers": Mode("deepspeed_zero3.yaml", RELEASE_LAYERS),
    "zero3_own": Mode("deepspeed_zero3.yaml", RELEASE_LAYERS),
    "zero3_offload_own": Mode("deepspeed_zero3_offload.yaml", RELEASE_LAYERS),
    "zero3_offload_live_own": Mode("deepspeed_zero3_offload.yaml", RELEASE_LAYERS, zero=ZERO3_LIVE),
    "zero3_offload_live_diag": Mode("deepspeed_zero3_offload.yaml", KEEP_LAYERS, zero=ZERO3_LIVE),
    # ZeRO-3's prefetch bucket: "auto" resolves to 0.9 x hidden^2 elements (15M at 8B, under a third of
    # one decoder layer's packed 4-bit weights); 1e8 elements prefetch about two layers ahead
    "zero3_prefetch": Mode("deepspeed_zero3.yaml", zero=(("stage3_prefetch_bucket_size", 100_000_000),)),
    "zero3_layers_prefetch": Mode(
        "deepspeed_zero3.yaml",
        zero=(("leaf_module", {"classes": list(DECODER_LAYERS)}), ("stage3_prefetch_bucket_size", 100_000_000)),
    ),
    # ablation rows of FSDP's gathers: the next unit's gather issued after the current unit's
    # gradient computation (less memory held at once), and forward prefetch
    # (BACKWARD_POST is the bundled config's since 2026-11-30 16:00 UTC, BACKWARD_PRE before)
    "fsdp_bwd_post": Mode("fsdp_qlora.yaml", fsdp=(("fsdp_backward_prefetch", "BACKWARD_POST"),)),
    "fsdp_bwd_pre": Mode("fsdp_qlora.yaml", fsdp=(("fsdp_backward_prefetch", "BACKWARD_PRE"),)),
    "fsdp_fwd_prefetch": Mode("fsdp_qlora.yaml", fsdp=(("fsdp_forward_prefetch", True),)),
    # the allocator's expandable segments under FSDP (reserved memory, what a capped card runs out
    # of, closer to what is allocated)
    "fsdp_expandable": Mode("fsdp_qlora.yaml", EXPANDABLE),
    "fsdp_offload_expandable": Mode("fsdp_qlora_offload.yaml", EXPANDABLE),
    "fsdp_offload_bwd_post": Mode("fsdp_qlora_offload.yaml", fsdp=(("fsdp_backward_prefetch", "BACKWARD_POST"),)),
    # the root unit (output head, final norm) resharded once the loss's backward is past the final norm:
    # asked for (the rows measured before it became the default), and kept gathered to the end of the
    # backward as FSDP does on its own (the rows that measure what the default saves)
    "fsdp_release_head": Mode("fsdp_qlora.yaml", RELEASE_HEAD),
    "fsdp_offload_release_head": Mode("fsdp_qlora_offload.yaml", RELEASE_HEAD),
    "fsdp_keep_head": Mode("fsdp_qlora.yaml", KEEP_HEAD),
    "fsdp_offload_keep_head": Mode("fsdp_qlora_offload.yaml", KEEP_HEAD),
    # the allocator without expandable segments (qlora-sft turns them on unless PYTORCH_CUDA_ALLOC_CONF
    # or PYTORCH_ALLOC_CONF is set, since 2026-11-30)
    "1gpu_segments_off": Mode("single_gpu.yaml", SEGMENTS_OFF),
    "fsdp_segments_off": Mode("fsdp_qlora.yaml", SEGMENTS_OFF),
    # one step profiled on every rank (torch.profiler, and what is alive at the memory peak by the
    # line that allocated it): where a mode's peak goes; its tokens/s include the profiled step
    "ddp_profiled": Mode("multi_gpu.yaml", PROFILED),
    "fsdp_profiled": Mode("fsdp_qlora.yaml", PROFILED),
    "1gpu_profiled": Mode("single_gpu.yaml", PROFILED),
    "zero3_profiled": Mode("deepspeed_zero3.yaml", PROFILED),
    "zero3_offload_profiled": Mode("deepspeed_zero3_offload.yaml", PROFILED),
    "zero3_offload_live_profiled": Mode("deepspeed_zero3_offload.yaml", PROFILED, zero=ZERO3_LIVE),
    "1gpu_mb2_profiled": Mode("single_gpu.yaml", PROFILED, overrides=("train.micro_batch_tokens=4096",)),
    # ablation rows of one GPU's memory (issue 29's levers): the frozen input embedding in host
    # memory, 2 x 2048 tokens per micro batch (twice the accumulation), both, 32-bit AdamW instead
    # of the paged 8-bit one, and the allocator's expandable segments (reserved memory closer to
    # what is allocated)
    "1gpu_hostemb": Mode(
        "single_gpu.yaml", overrides=("model.embedding_in_host_memory=true", "model.lm_head_in_host_memory=false")
    ),
    "1gpu_gputables": Mode("single_gpu.yaml", overrides=GPU_TABLES),
    "1gpu_mb2_gputables": Mode("single_gpu.yaml", overrides=("train.micro_batch_tokens=4096", *GPU_TABLES)),
    "1gpu_mb2": Mode("single_gpu.yaml", overrides=("train.micro_batch_tokens=4096",)),
    "1gpu_mb1": Mode("single_gpu.yaml", overrides=("train.micro_batch_tokens=2048",)),
    # where the host's time per micro batch goes: 1 x 2048 (host-bound on an H200) without Liger's
    # kernels, without the fused LoRA layer, without activation offloading
    "1gpu_mb1_noliger": Mode(
        "single_gpu.yaml", overrides=("train.micro_batch_tokens=2048", "model.liger_kernels=false")
    ),
    "1gpu_mb1_nofuse": Mode("single_gpu.yaml", overrides=("train.micro_batch_tokens=2048", "lora.fused=false")),
    "1gpu_mb1_nooffload": Mode(
        "single_gpu.yaml", overrides=("train.micro_batch_tokens=2048", "train.offload_activations=false")
    ),
    "1gpu_mb2_hostemb": Mode(
        "single_gpu.yaml",
        overrides=(
            "train.micro_batch_tokens=4096",
            "model.embedding_in_host_memory=true",
            "model.lm_head_in_host_memory=false",
        ),
    ),
    # the output head in host memory too (copied for each loss), and both tables
    "1gpu_hosthead": Mode(
        "single_gpu.yaml", overrides=("model.lm_head_in_host_memory=true", "model.embedding_in_host_memory=false")
    ),
    "1gpu_hosttables": Mode("single_gpu.yaml", overrides=HOST_TABLES),
    "1gpu_mb2_hosttables": Mode("single_gpu.yaml", overrides=("train.micro_batch_tokens=4096", *HOST_TABLES)),
    "1gpu_hosttables_profiled": Mode("single_gpu.yaml", PROFILED, overrides=HOST_TABLES),
    # issue 29's levers on top of both tables in host memory: trl's fused head in tiles a quarter as
    # wide (8,192 logits: 64 MiB a tile at 4,096 tokens, against 256), and no prefetch of offloaded
    # layer inputs (one fetched input alive at a time, each fetch holding up the compute)
    "1gpu_hosttables_tile8k": Mode("single_gpu.yaml", ((HEAD_TILE_ENV, "8192"),), overrides=HOST_TABLES),
    "1gpu_hosttables_noprefetch": Mode("single_gpu.yaml", ((OFFLOAD_PREFETCH_ENV, "0"),), overrides=HOST_TABLES),
    # the host's work per micro batch (issue 29, requirement 3): without qlora_sft.hostwork's savings,
    # with the block scales of the 4-bit weights dequantized once (QLORA_SFT_ABSMAX_CACHE), and a step
    # profiled by Python function with the garbage collector's pauses, with and without the savings
    "1gpu_savings_off": Mode("single_gpu.yaml", SAVINGS_OFF),
    "1gpu_mb2_savings_off": Mode("single_gpu.yaml", SAVINGS_OFF, overrides=MB2),
    "1gpu_absmax": Mode("single_gpu.yaml", ABSMAX_CACHED),
    "1gpu_bnbdequant": Mode("single_gpu.yaml", PUBLIC_DEQUANT),
    "1gpu_mb2_bnbdequant": Mode("single_gpu.yaml", PUBLIC_DEQUANT, overrides=MB2),
    "1gpu_mb2_absmax": Mode("single_gpu.yaml", ABSMAX_CACHED, overrides=MB2),
    "1gpu_mb2_hosttables_absmax": Mode("single_gpu.yaml", ABSMAX_CACHED, overrides=(*MB2, *HOST_TABLES)),
    # the head's copy to the GPU started 2 or 8 decoder layers before the end of the forward, or at
    # its start (QLORA_SFT_HEAD_LEAD; 2 until 2026-12-03, 8 since): at 2 x 2048 on an H200 two
    # layers' compute was shorter than the copy
    "1gpu_mb2_hosttables_lead2": Mode("single_gpu.yaml", ((HEAD_LEAD_ENV, "2"),), overrides=(*MB2, *HOST_TABLES)),
    "1gpu_hosttables_lead2": Mode("single_gpu.yaml", ((HEAD_LEAD_ENV, "2"),), overrides=HOST_TABLES),
    "1gpu_mb2_hosttables_lead8": Mode("single_gpu.yaml", ((HEAD_LEAD_ENV, "8"),), overrides=(*MB2, *HOST_TABLES)),
    "1gpu_mb2_hosttables_lead32": Mode("single_gpu.yaml", ((HEAD_LEAD_ENV, "32"),), overrides=(*MB2, *HOST_TABLES)),
    "1gpu_mb2_hosttables_absmax_lead8": Mode(
        "single_gpu.yaml", (*ABSMAX_CACHED, (HEAD_LEAD_ENV, "8")), overrides=(*MB2, *HOST_TABLES)
    ),
    "1gpu_mb2_hosttables_profiled": Mode("single_gpu.yaml", PROFILED, overrides=(*MB2, *HOST_TABLES)),
    "1gpu_mb2_hosttables_absmax_profiled": Mode(
        "single_gpu.yaml", (*PROFILED, *ABSMAX_CACHED), overrides=(*MB2, *HOST_TABLES)
    ),
    "1gpu_mb2_hostprofiled": Mode("single_gpu.yaml", HOST_PROFILED, overrides=MB2),
    "1gpu_mb2_hostprofiled_savings_off": Mode("single_gpu.yaml", (*HOST_PROFILED, *SAVINGS_OFF), overrides=MB2),
    # torch's fused RMSNorm against Liger's (the host's time per norm; the same values), and
    # transformers' MLP against Liger's SwiGLU (the *_ligernorm rows ran on 2026-12-03, when torch's
    # norm was briefly the default: they are the default now)
    "1gpu_torchnorm": Mode("single_gpu.yaml", TORCH_NORM),
    "1gpu_mb2_torchnorm": Mode("single_gpu.yaml", TORCH_NORM, overrides=MB2),
    "1gpu_ligernorm": Mode("single_gpu.yaml", LIGER_NORM),
    "1gpu_mb2_ligernorm": Mode("single_gpu.yaml", LIGER_NORM, overrides=MB2),
    "1gpu_torchswiglu": Mode("single_gpu.yaml", TORCH_SWIGLU),
    "1gpu_mb2_torchswiglu": Mode("single_gpu.yaml", TORCH_SWIGLU, overrides=MB2),
    "1gpu_mb2_hosttables_torchswiglu": Mode("single_gpu.yaml", TORCH_SWIGLU, overrides=(*MB2, *HOST_TABLES)),
    # the fused LoRA layers that read one input computed as one group (the default), or each alone
    "1gpu_ungrouped": Mode("single_gpu.yaml", UNGROUPED),
    "1gpu_mb2_ungrouped": Mode("single_gpu.yaml", UNGROUPED, overrides=MB2),
    "1gpu_mb2_hosttables_ungrouped": Mode("single_gpu.yaml", UNGROUPED, overrides=(*MB2, *HOST_TABLES)),
    # NF4 weights dequantized by the Triton kernel (the default since 2026-12-04) or bitsandbytes' three
    "1gpu_bnbkernels": Mode("single_gpu.yaml", BNB_DEQUANT),
    "1gpu_mb2_bnbkernels": Mode("single_gpu.yaml", BNB_DEQUANT, overrides=MB2),
    "1gpu_mb2_hosttables_bnbkernels": Mode("single_gpu.yaml", BNB_DEQUANT, overrides=(*MB2, *HOST_TABLES)),
    # the checkpointed decoder layers replayed from CUDA graphs (QLORA_SFT_LAYER_GRAPHS): the forward
    # without gradients, the recompute and backward too (`on`), or only the forward (`fwdgraphs`)
    "1gpu_graphs": Mode("single_gpu.yaml", GRAPHS),
    "1gpu_mb2_graphs": Mode("single_gpu.yaml", GRAPHS, overrides=MB2),
    "1gpu_mb2_fwdgraphs": Mode("single_gpu.yaml", FORWARD_GRAPHS, overrides=MB2),
    "1gpu_hosttables_graphs": Mode("single_gpu.yaml", GRAPHS, overrides=HOST_TABLES),
    "1gpu_mb2_hosttables_graphs": Mode("single_gpu.yaml", GRAPHS, overrides=(*MB2, *HOST_TABLES)),
    "1gpu_mb2_graphs_profiled": Mode("single_gpu.yaml", (*GRAPHS, *PROFILED), overrides=MB2),
    "1gpu_adamw32": Mode("single_gpu.yaml", overrides=("train.optim=adamw_torch",)),
    "1gpu_expandable": Mode("single_gpu.yaml", EXPANDABLE),
    "1gpu_mb2_expandable": Mode("single_gpu.yaml", EXPANDABLE, overrides=("train.micro_batch_tokens=4096",)),
}
SHARDED = ("zero3", "fsdp", "fsdp_offload")
DEFAULT_MODES = ("1gpu", "ddp", "zero2", "zero3", "fsdp", "fsdp_offload")  # others are ablation rows


def config_file(mode: str, work: Path) -> Path:
    """The accelerate config of a mode: the bundled one, or for a row that changes FSDP or DeepSpeed
    settings a copy of it (under `work`), with its fsdp_config keys replaced or naming a changed copy
    of its DeepSpeed JSON."""
    m = MODES[mode]
    bundled = REPO / "configs" / "accelerate" / m.config
    if not m.zero and not m.fsdp:
        return bundled
    accel = yaml.safe_load(bundled.read_text())
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{mode}-accelerate.yaml"
    if m.fsdp:
        accel["fsdp_config"].update(dict(m.fsdp))
        out.write_text(yaml.safe_dump(accel, sort_keys=False))
        return out
    ds_file = REPO / accel["deepspeed_config"]["deepspeed_config_file"]
    ds = json.loads(ds_file.read_text())
    ds["zero_optimization"].update(dict(m.zero))
    ds_out = work / f"{mode}-deepspeed.json"
    ds_out.write_text(json.dumps(ds, indent=1))
    accel["deepspeed_config"]["deepspeed_config_file"] = str(ds_out)
    out.write_text(yaml.safe_dump(accel, sort_keys=False))
    return out


def recipe_for(model: Path, data: Path, out: Path, steps: int, gbs: int, max_length: int) -> dict:
    return {
        "run": {"name": "bench", "output_dir": str(out), "seed": 0},
        "model": {"name_or_path": str(model)},
        "quantization": {"method": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "sources": [{"path": str(data)}],
            "eval_fraction": 0.0,
            "max_length": max_length,
            "on_bad_row": "skip",
        },
        "train": {
            "global_batch_size": gbs,
            "learning_rate": 2e-4,
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 100000,
            "lr_scheduler_type": "constant",
            "dataloader_num_workers": 2,
        },
    }


def launch(
    mode: str, gpus: int, recipe_path: Path, name: str, log: Path, env: dict[str, str], overrides: list[str]
) -> tuple[int, float]:
    """`accelerate launch` of the mode's config with the recipe, the mode's own environment and
    overrides, and `overrides` (those of the command line, given to every launch of every mode)."""
    m = MODES[mode]
    env = {**env, **dict(m.env)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file(mode, log.parent / "configs")),
        "--num_processes",
        str(m.processes(gpus)),
        "--main_process_port",
        str(29500 + sum(map(ord, name)) % 1000),
        "-m",
        "qlora_sft",
        "train",
        str(recipe_path),
        f"run.name={name}",
        *m.overrides,
        *overrides,
    ]
    t0 = time.time()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc.returncode, time.time() - t0


def losses(run_dir: Path, skip_lines: int = 0) -> dict[int, float]:
    """Loss per step from logs/metrics.jsonl (from line `skip_lines` on: a relaunch appends)."""
    metrics = run_dir / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        return {}
    rows = metrics.read_text().splitlines()[skip_lines:]
    return {r["step"]: r["loss"] for r in map(json.loads, rows) if "loss" in r}


def metrics_lines(run_dir: Path) -> int:
    metrics = run_dir / "logs" / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def read_run(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    metrics = run_dir / "logs" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        by_step = losses(run_dir)
        out["losses_first_10"] = [by_step[s] for s in sorted(by_step)][:10]
        out["tokens_per_s"] = measure.tokens_per_s_from_metrics(rows)
        out["steps"] = max((r["step"] for r in rows), default=0)
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "logs").glob("rank*.json"))]

    def per_rank(key: str) -> list[float | None]:
        return [round(r[key], 2) if r.get(key) is not None else None for r in ranks]

    out["peak_gib_per_rank"] = per_rank("peak_allocated_gib")
    out["peak_reserved_gib_per_rank"] = per_rank("peak_reserved_gib")
    # what a card of that size must hold besides the reserved peak (the CUDA context), and how often
    # the allocator hit its limit and freed its cache to retry (a cap at the edge)
    out["outside_allocator_gib_per_rank"] = per_rank("outside_allocator_gib")
    out["alloc_retries_per_rank"] = [r.get("alloc_retries") for r in ranks]
    if any("layer_graphs" in r for r in ranks):  # replays, captures and the graphs' pool (not in the peak)
        out["layer_graphs_per_rank"] = [r.get("layer_graphs") for r in ranks]
    out["steady_gib_per_rank"] = per_rank("steady_gib")
    out["held_parameter_gib_per_rank"] = per_rank("held_parameter_gib")
    out["unsharded_parameter_gib"] = per_rank("unsharded_parameter_gib")[0] if ranks else None
    out["peak_rss_gib_loading_per_rank"] = per_rank("peak_rss_gib_loading")
    peaks = [json.loads(p.read_text()) for p in sorted((run_dir / "logs").glob("memory-peak-rank*.json"))]
    if peaks:  # a profiled row: what was alive at the profiled step's peak, per rank
        out["profiled_step"] = int(PROFILE_STEP)
        out["memory_at_peak_per_rank"] = peaks
    timelines = [json.loads(p.read_text()) for p in sorted((run_dir / "logs").glob("timeline-rank*.json"))]
    if timelines:  # and how long its GPU idled, and where the host waited for it
        out["timeline_per_rank"] = timelines
    hosts = [p.read_text() for p in sorted((run_dir / "logs").glob("host-profile-rank*.txt"))]
    if hosts:  # a host-profiled row: the step's Python functions by time, and the collector's pauses
        out["profiled_step"] = int(PROFILE_STEP)
        out["host_profile_per_rank"] = hosts
    return out


def plan_estimate(
    recipe_path: Path, mode: str, gpus: int, overrides: list[str], work: Path, gpu_gib: float | None
) -> tuple[float, list[str]]:
    """plan's peak estimate for a mode as launched on a GPU of `gpu_gib` (the cap, else the GPU's own
    memory), and the frozen tables its `auto` puts in host memory there, as the launch resolves them."""
    from qlora_sft import launch as launch_mode
    from qlora_sft.plan import estimate_memory, recipe_shape, resolve_host_tables
    from qlora_sft.recipe import load_recipe

    m = MODES[mode]
    recipe = load_recipe(recipe_path, [*m.overrides, *overrides])
    saved = {k: os.environ.get(k) for k, _ in m.env}
    os.environ.update(dict(m.env))
    try:
        lm = launch_mode.from_config_file(config_file(mode, work), m.processes(gpus))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    shape = recipe_shape(recipe)
    resolved = resolve_host_tables(recipe, lm, shape, gpu_gib)
    return round(estimate_memory(shape, resolved, lm).total, 2), launch_mode.host_tables(resolved)


def kill_and_resume(
    mode: str,
    gpus: int,
    steps: int,
    recipe_path: Path,
    runs: Path,
    log: Path,
    env: dict[str, str],
    overrides: list[str],
) -> dict:
    """Checkpoints every steps/2 steps; rank 0 is killed two steps after the first one; the relaunch
    (the same command, the same overrides) must resume from it and continue as the uninterrupted run
    did, and qlora-sft's own resume check must have verified the adapter and optimizer state."""
    save_steps = max(1, steps // 2)
    kill_at = min(steps, save_steps + 2)
    name = f"{mode}-killed"
    shutil.rmtree(runs / name, ignore_errors=True)
    save = [*overrides, f"train.save_steps={save_steps}"]
    rc_killed, _ = launch(mode, gpus, recipe_path, name, log, {**env, "QLORA_SFT_FAULT": f"kill@{kill_at}:0"}, save)
    complete = sorted(p.name for p in (runs / name).glob("checkpoint-*") if (p / "COMPLETE").is_file())
    start = len(log.read_text())
    rc_resumed, wall = launch(mode, gpus, recipe_path, name, log, env, save)
    text = log.read_text()[start:]
    resumed = losses(runs / name)  # replayed steps appear once (the killed run's lines moved aside)
    full = losses(runs / mode)
    after = [s for s in sorted(resumed) if s > save_steps and s in full]
    return {
        "killed_at_step": kill_at,
        "save_steps": save_steps,
        "killed_returncode": rc_killed,
        "checkpoints_after_kill": complete,
        "resumed_returncode": rc_resumed,
        "resumed_from_log": f"resuming from {runs / name / f'checkpoint-{save_steps}'}" in text,
        "resume_verified": "adapter and optimizer state verified" in text,
        "resumed_losses": {s: resumed[s] for s in after},
        "uninterrupted_losses": {s: full[s] for s in after},
        "max_abs_loss_diff": max((abs(resumed[s] - full[s]) for s in after), default=None),
        "resumed_wall_s": round(wall, 1),
    }


def export(mode: str, runs: Path, log: Path, env: dict[str, str]) -> dict:
    out = runs / f"{mode}-merged"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "qlora_sft", "export", str(runs / mode), "--out", str(out), "--device", "cuda"]
    t0 = time.time()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    verify = [line for line in log.read_text().splitlines() if "verify: merged" in line]
    result = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1), "verified": proc.returncode == 0}
    if verify:
        result["verify_line"] = verify[-1].split("verify: ", 1)[-1]
    shutil.rmtree(out, ignore_errors=True)  # 16 GB for the 8B shape; the result is the verification
    return result


def positive_int(raw: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        n = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{raw} must be above 0")
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--modes", default="1gpu,ddp,zero2,zero3,fsdp,fsdp_offload", help=f"of {', '.join(MODES)}")
    ap.add_argument("--gpus", type=int, default=2, help="processes for the multi-process modes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--gpu-cap", type=gib, help="cap each rank's GPU memory at this many GiB")
    ap.add_argument(
        "--gpu-sms",
        type=positive_int,
        help="run each rank's kernels on this many of its GPU's SMs (QLORA_SFT_GPU_SMS; known defect: see its section)",
    )
    ap.add_argument(
        "--kill-resume", default="all", help="modes to also kill at step 7 and resume (default all; 'none')"
    )
    ap.add_argument(
        "--export", default="sharded", help=f"modes whose final adapter to export and verify (default {SHARDED})"
    )
    ap.add_argument("--append", action="store_true", help="add to the results file of the same tag (split runs)")
    ap.add_argument("--prequantized", action="store_true", help="write the model directly in NF4 (bf16 storage)")
    ap.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for every mode")
    ap.add_argument("--cache", default=str(REPO / "bench" / ".cache"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="write one results file (--out, --tag) from these results files of one table split over several "
        "calls, rows of later files replacing earlier rows of the same mode; runs nothing",
    )
    ap.add_argument("--note", action="append", default=[], help="a line for the results file (with --merge)")
    ap.add_argument(
        "--busy-gpu",
        type=int,
        default=0,
        metavar="N",
        help="share the GPU with N processes busy with matrix products while each mode trains (bench.busy_gpu: "
        "a proxy for a GPU N+1 times slower whose host is as fast)",
    )
    args = ap.parse_args()
    if args.merge:
        print(merge([Path(f) for f in args.merge], Path(args.out), args.tag, args.note))
        return 0

    cache = Path(args.cache)
    t0 = time.time()
    model_dir = cache / (args.shape + ("-nf4" if args.prequantized else ""))
    model = make_model(args.shape, model_dir, prequantized=args.prequantized)
    data = make_data(cache / "sharegpt-like-v2.jsonl", n=args.rows)
    print(f"workload ready in {time.time() - t0:.0f} s ({model})", flush=True)
    runs = cache / "runs" / args.shape
    recipe = recipe_for(model, data, runs, args.steps, args.global_batch, args.max_length)
    recipe_path = cache / f"{args.shape}-recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    log_dir = cache / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.gpu_cap:
        env["QLORA_SFT_GPU_MEMORY_GIB"] = str(args.gpu_cap)
    if args.gpu_sms:
        env["QLORA_SFT_GPU_SMS"] = str(args.gpu_sms)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; use {', '.join(MODES)}")
    kill_modes = modes if args.kill_resume == "all" else [m for m in args.kill_resume.split(",") if m != "none"]
    export_modes = list(SHARDED) if args.export == "sharded" else [m for m in args.export.split(",") if m != "none"]
    gpu = report.gpu_name()
    base = report.results_base(Path(args.out), gpu, args.shape, f"-distributed{args.tag}")
    earlier = base.with_suffix(".json")
    results = []
    if args.append and earlier.is_file():
        results = [r for r in json.loads(earlier.read_text())["results"] if r["mode"] not in modes]
    for mode in modes:
        shutil.rmtree(runs / mode, ignore_errors=True)
        log = log_dir / f"{args.shape}-{mode}.log"
        log.write_text("")
        with busy_gpu(args.busy_gpu):
            rc, wall = launch(mode, args.gpus, recipe_path, mode, log, env, args.overrides)
        r: dict[str, Any] = {
            "mode": mode,
            "config": MODES[mode].config,
            "env": dict(MODES[mode].env),
            "overrides": [*MODES[mode].overrides, *args.overrides],
            "deepspeed_changes": dict(MODES[mode].zero),
            "fsdp_changes": dict(MODES[mode].fsdp),
            # the FSDP settings as run (the bundled config changes; rows without this key ran
            # BACKWARD_PRE, the bundled choice before 2026-11-30 16:00 UTC)
            "accelerate_fsdp_config": yaml.safe_load(config_file(mode, log_dir / "configs").read_text()).get(
                "fsdp_config"
            ),
            "gpus": MODES[mode].processes(args.gpus),
            "returncode": rc,
            "wall_s": round(wall, 1),
            **read_run(runs / mode),
        }
        # plan's estimate resolves `auto` at the cap or the GPU's memory, as the launch does (rows of
        # 2026-12-02 before this key left auto's tables on the GPU in the estimate)
        r["plan_estimate_gib"], r["plan_host_tables"] = plan_estimate(
            recipe_path, mode, args.gpus, args.overrides, log_dir / "configs", args.gpu_cap or report.gpu_memory_gib()
        )
        logged = log.read_text(errors="replace")
        if r["accelerate_fsdp_config"]:
            # logged after the first training forward from what FSDP registered (None: the run never
            # got there). Rows without this key ran before the embedding's unit was kept from the
            # backward's gather.
            once = EMBEDDING_GATHERED_ONCE in logged
            r["fsdp_embedding_gathered_in_backward"] = False if once else (None if rc else True)
            # whether the run resharded the root (output head) before the layers' backward: the default
            # since 2026-11-30 evening, off in the *_keep_head rows (rows without the key ran before)
            r["fsdp_release_head_applied"] = RELEASE_HEAD_APPLIED in logged
        # the frozen tables the run kept in host memory (`auto` resolves by the GPU's memory since
        # 2026-12-02; rows without the key kept them where the row's overrides say)
        r["host_tables"] = [key for key, logged_as in HOST_TABLES_LOGGED.items() if logged_as in logged]
        if "deepspeed" in MODES[mode].config:
            # whether the decoder layers were DeepSpeed leaf modules (qlora-sft's default since
            # 2026-12-01, or a JSON's leaf_module); rows without the key ran before qlora-sft made
            # them leaves itself, with the fused layer and activation offloading off under ZeRO-3
            r["zero3_leaf_layers"] = bool(ZERO3_LEAF_LOGGED.search(logged))
            # whether each recomputed layer's weights were released after its own backward (rows
            # without the key ran before 2026-12-01 night: kept to the end of the backward)
            r["zero3_release_layers"] = RELEASE_LAYERS_APPLIED in logged
        results.append(r)
        write_results(base, args, results)  # after every phase: a call cut off by its time limit keeps it
        if rc == 0 and mode in kill_modes:
            r["kill_resume"] = kill_and_resume(mode, args.gpus, args.steps, recipe_path, runs, log, env, args.overrides)
            write_results(base, args, results)
        if rc == 0 and mode in export_modes:
            r["export"] = export(mode, runs, log, env)
        if rc != 0 or (r.get("kill_resume") or {}).get("resumed_returncode"):
            r["log_tail"] = log.read_text()[-4000:]
        write_results(base, args, results)
        print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
        if "log_tail" in r:
            print(r["log_tail"], flush=True)

    write_results(base, args, results)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


def merge(files: list[Path], out: Path, tag: str, notes: list[str]) -> Path:
    """One results file from those of a table split over several calls of a time-limited machine
    (each call run with its own --out): the rows of later files replace earlier rows of the same
    mode, every call's command is kept, and the checks and goals are computed over the union."""
    parts = [json.loads(f.read_text()) for f in files]
    for f, p in zip(files, parts, strict=True):
        for key in (
            "gpu",
            "shape",
            "num_gpus",
            "per_gpu_cap_gib",
            "per_gpu_sms",
            "busy_gpu_processes",
            "prequantized",
            "steps",
            "global_batch",
            "max_length",
        ):
            mine, first = p.get(key), parts[0].get(key)
            if key == "busy_gpu_processes":  # results written before the key ran alone on the GPU
                mine, first = mine or 0, first or 0
            if mine != first:
                raise SystemExit(f"{f}: {key} is {mine!r}, {files[0]} has {first!r}: not one table")
    rows: dict[str, dict] = {}
    for p in parts:
        for r in p["results"]:
            rows.pop(r["mode"], None)
            rows[r["mode"]] = r
    order = list(MODES)
    payload = {
        **{k: v for k, v in parts[0].items() if k not in ("command", "commands", "results", "checks", "notes")},
        "commands": [c for p in parts for c in p.get("commands", [p.get("command", "")])],
        "results": sorted(rows.values(), key=lambda r: order.index(r["mode"]) if r["mode"] in order else len(order)),
        "notes": [n for p in parts for n in p.get("notes", [])] + notes,
    }
    payload["checks"] = checks_of(payload["results"])
    base = report.results_base(out, parts[0]["gpu"], parts[0]["shape"], f"-distributed{tag}")
    report.write(base, payload, render(payload))
    return base.with_suffix(".json")


# the acceptance goals of the launch-mode table: (check prefix, comparison, bound, what it means)
GOALS = (
    ("speedup_vs_1gpu_ddp", ">=", 1.9, "DDP on 2 GPUs at least 1.9x one GPU's tokens/s"),
    ("tokens_per_s_vs_ddp_", ">=", 0.9, "sharded tokens/s at least 0.9x DDP's"),
    ("peak_vs_ddp_", "<=", 0.75, "sharded peak per rank at most 0.75x DDP's"),
    ("plan_vs_peak_", "abs<=", 0.15, "plan's estimate within 15% of the measured peak"),
)


def goals_of(payload: dict) -> list[str]:
    """A line per goal and mode: met or missed, with the number; every sharded mode's export must
    verify, and a goal a mode was not measured for is said to be not measured."""
    checks = payload.get("checks", {})
    lines = []
    for prefix, op, bound, what in GOALS:
        for key in sorted(k for k in checks if k.startswith(prefix)):
            if prefix.endswith("_") and key[len(prefix) :] not in DEFAULT_MODES:
                continue  # ablation rows are not held to the goals
            v = checks[key]
            ok = v >= bound if op == ">=" else (v <= bound if op == "<=" else abs(v) <= bound)
            lines.append(f"- {'met' if ok else '**missed**'}: {what}: {key} = {v:.4g}")
    multi = payload.get("num_gpus", 1) > 1
    for r in payload["results"]:
        if r.get("returncode"):
            lines.append(f"- **missed**: {r['mode']} failed (rc {r['returncode']}); none of its goals is judged")
            continue
        k = r.get("kill_resume")
        if k is not None:
            what = "resumed losses within 2e-3 of the uninterrupted run, from the checkpoint, state verified"
            d = k.get("max_abs_loss_diff")
            ok = (
                k.get("resumed_returncode") == 0
                and k.get("resumed_from_log")
                and k.get("resume_verified")
                and d is not None
                and d <= 2e-3
            )
            facts = (
                f"relaunch rc {k.get('resumed_returncode')}, resumed from the checkpoint: {k.get('resumed_from_log')}, "
                f"state verified: {k.get('resume_verified')}, max loss difference {d}"
            )
            lines.append(f"- {'met' if ok else '**missed**'}: {what}: {r['mode']}: {facts}")
        if "plan_host_tables" in r and r.get("host_tables") is not None:
            same = sorted(r["plan_host_tables"]) == sorted(r["host_tables"])
            lines.append(
                f"- {'met' if same else '**missed**'}: plan puts the same frozen tables in host memory as the run: "
                f"{r['mode']}: plan {r['plan_host_tables'] or 'none'}, run {r['host_tables'] or 'none'}"
            )
        if r["mode"] in SHARDED:
            e = r.get("export")
            state = "not measured" if e is None else ("met" if e.get("verified") else "**missed**")
            lines.append(f"- {state}: the merged export of the {r['mode']} adapter verifies")
        if multi and r.get("returncode") == 0 and "kill_resume" not in r:
            lines.append(f"- not measured: kill and resume of {r['mode']} in this run")
    return lines


def write_results(base: Path, args: argparse.Namespace, results: list[dict]) -> None:
    """The results file, rewritten after every mode (a call cut short by its time limit keeps what ran)."""
    import torch

    payload = {
        "gpu": report.gpu_name(),
        "shape": args.shape,
        "num_gpus": args.gpus,
        "per_gpu_cap_gib": args.gpu_cap,
        "per_gpu_sms": args.gpu_sms,  # kernels held to this many SMs (None: all; results without the key: all)
        "busy_gpu_processes": args.busy_gpu,  # sharing the GPU while training (0 in results without the key)
        "prequantized": args.prequantized,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "max_length": args.max_length,
        "offload_activations": "auto",  # the recipe's value (results before 2026-11-24 ran without offloading)
        "torch": torch.__version__,
        "command": "python -m bench.distributed " + " ".join(sys.argv[1:]),
        "results": results,
        "checks": checks_of(results),
    }
    report.write(base, payload, render(payload))


def checks_of(results: list[dict]) -> dict[str, float]:
    """The goals' numbers: speedup against one GPU, sharded modes against DDP, loss differences
    against one GPU and after a resume, plan's estimate against each peak."""
    by = {r["mode"]: r for r in results if not r.get("returncode")}  # failed launches measure nothing
    checks: dict[str, float] = {}
    ref = by.get("1gpu", {}).get("losses_first_10")
    for r in results:
        if r.get("returncode"):
            continue  # a failed launch's partial numbers are no measurement (goals_of says it failed)
        if ref and r["mode"] != "1gpu" and r.get("losses_first_10"):
            checks[f"max_abs_loss_diff_vs_1gpu_{r['mode']}"] = max(
                abs(a - b) for a, b in zip(ref, r["losses_first_10"], strict=False)
            )
        if by.get("1gpu", {}).get("tokens_per_s") and r.get("tokens_per_s") and r["mode"] != "1gpu":
            checks[f"speedup_vs_1gpu_{r['mode']}"] = r["tokens_per_s"] / by["1gpu"]["tokens_per_s"]
        one = by.get("1gpu", {}).get("peak_gib_per_rank")
        if r["mode"].startswith("1gpu_") and one and one[0] and (r.get("peak_gib_per_rank") or [None])[0]:
            checks[f"peak_vs_1gpu_{r['mode']}"] = r["peak_gib_per_rank"][0] / one[0]
        ddp = by.get("ddp", {})
        if r["mode"].startswith(("fsdp", "zero3")) and ddp.get("tokens_per_s") and r.get("tokens_per_s"):
            checks[f"tokens_per_s_vs_ddp_{r['mode']}"] = r["tokens_per_s"] / ddp["tokens_per_s"]
            if all(ddp.get("peak_gib_per_rank") or [None]) and all(r.get("peak_gib_per_rank") or [None]):
                checks[f"peak_vs_ddp_{r['mode']}"] = max(r["peak_gib_per_rank"]) / max(ddp["peak_gib_per_rank"])
        k = r.get("kill_resume") or {}
        if k.get("max_abs_loss_diff") is not None:
            checks[f"max_resumed_loss_diff_{r['mode']}"] = k["max_abs_loss_diff"]
        peaks = [x for x in r.get("peak_gib_per_rank") or [] if x]
        if peaks and r.get("plan_estimate_gib"):
            checks[f"plan_vs_peak_{r['mode']}"] = r["plan_estimate_gib"] / max(peaks) - 1
    return checks


def render(p: dict) -> list[str]:
    cap = f", each GPU capped at {p['per_gpu_cap_gib']:g} GiB" if p.get("per_gpu_cap_gib") else ""
    if p.get("per_gpu_sms"):
        cap += f", its kernels held to {p['per_gpu_sms']} streaming multiprocessors (a green context)"
    if p.get("busy_gpu_processes"):
        cap += f", the GPU shared with {p['busy_gpu_processes']} busy processes (bench.busy_gpu)"
    rows = []
    for r in p["results"]:
        if r.get("tokens_per_s"):
            tps = f"{r['tokens_per_s']:,.0f}"
        else:
            warm = measure.warmup_steps(p["steps"])
            tps = f"failed (rc {r['returncode']})" if r["returncode"] else f"n/a (<= {warm + 1} steps)"
        rows.append(
            [
                r["mode"],
                r["gpus"],
                tps,
                r.get("peak_gib_per_rank"),
                r.get("steady_gib_per_rank"),
                r.get("held_parameter_gib_per_rank"),
                r["plan_estimate_gib"],
                r.get("peak_rss_gib_loading_per_rank"),
                ", ".join(f"{x:.4f}" for x in r.get("losses_first_10", [])),
            ]
        )
    header = [
        "mode",
        "GPUs",
        "tokens/s",
        "peak GiB per rank",
        "steady GiB per rank",
        "params held GiB per rank",
        "plan GiB",
        "peak RSS loading GiB",
        "losses steps 1-10",
    ]
    lines = [
        f"# Launch modes on {p['gpu']}: {p['shape']}{' (pre-quantized NF4)' if p.get('prequantized') else ''}, "
        f"QLoRA NF4, global batch {p['global_batch']} x {p['max_length']} tokens, {p['steps']} steps{cap}",
        "",
        *(
            [f"Command: `{p['command']}`"]
            if "commands" not in p
            else [
                "Commands (one table, split over calls of a time-limited machine):",
                *(f"- `{c}`" for c in p["commands"]),
            ]
        ),
        "",
        *report.table(header, rows),
        "",
        f"tokens/s after {measure.warmup_steps(p['steps'])} warm-up steps.",
    ]
    for r in p["results"]:
        if "kill_resume" in r:
            k = r["kill_resume"]
            lines.append(
                f"\nKill and resume ({r['mode']}): rank 0 killed at step {k['killed_at_step']} (rc "
                f"{k['killed_returncode']}), complete checkpoints {k['checkpoints_after_kill']}, relaunch rc "
                f"{k['resumed_returncode']}, resumed from checkpoint-{k['save_steps']}: {k['resumed_from_log']}, "
                f"state verified: {k.get('resume_verified')}; max "
                f"|loss difference| of steps {k['save_steps'] + 1}-{p['steps']} against the uninterrupted run: "
                f"{k['max_abs_loss_diff']}"
            )
        if "export" in r:
            e = r["export"]
            verify = e.get("verify_line", "no verify line")
            lines.append(f"\nExport ({r['mode']}): rc {e['returncode']} in {e['seconds']} s; {verify}")
    if p.get("checks"):
        lines += ["", "Checks: " + ", ".join(f"{k} = {v:.4g}" for k, v in p["checks"].items())]
        lines += ["", "Goals:", *goals_of(p)]
    if p.get("notes"):
        lines += ["", "Notes:", *(f"- {n}" for n in p["notes"])]
    return lines


if __name__ == "__main__":
    sys.exit(main())
