"""Measuring a training run: step times, tokens/s after one warm-up rule, computed and real
(non-padding) tokens, MFU from the model's shape, and a one-step CUDA kernel profile."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from qlora_sft.plan import ModelShape
from qlora_sft.profiling import peak_breakdown

# Dense bf16 peak of the GPUs we know (TFLOP/s), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
# Profiler buckets: CUDA kernel names (lower case) -> what they do; the first match wins.
KERNEL_BUCKETS = [
    ("dequantize (NF4)", ("dequant", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "varlen", "sdpa", "efficient_attention")),
    ("optimizer", ("optimizer", "adam", "kpercentile", "multi_tensor")),
    ("loss (chunked lm_head)", ("logprob", "log_prob", "chunked", "cross_entropy", "logsumexp")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90", "sm80")),
    ("norm/rope/swiglu (liger)", ("rms", "rope", "swiglu", "silu", "liger")),
]
OTHER_BUCKET = "other (elementwise, copies, LoRA glue)"


def warmup_steps(steps: int) -> int:
    """Steps left out of tokens/s (allocator growth, first-step compilation and caching): the one
    rule for every benchmark."""
    return min(5, max(1, steps // 4))


def tokens_per_s(step_end_times: list[float], cumulative_tokens: list[float]) -> float | None:
    """Tokens/s from the end of the last warm-up step to the end of the last step."""
    warm = warmup_steps(len(step_end_times))
    if len(step_end_times) <= warm:
        return None
    a = warm - 1
    return (cumulative_tokens[-1] - cumulative_tokens[a]) / (step_end_times[-1] - step_end_times[a])


def tokens_per_s_from_metrics(rows: list[dict[str, Any]]) -> float | None:
    """Tokens/s from a run's logs/metrics.jsonl rows (logged every step: time and num_tokens)."""
    steps = [r for r in rows if "loss" in r and "num_tokens" in r]
    return tokens_per_s([r["time"] for r in steps], [r["num_tokens"] for r in steps])


class StepTimer(TrainerCallback):
    """Wall time at each optimizer step's end, after the GPU finished it."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.time())


class StepProfiler(TrainerCallback):
    """Profiles optimizer step `step` into `out`/profile.json: CUDA kernel time by bucket, and the
    blocks alive at the step's memory peak by the line that allocated them (`peak_breakdown`)."""

    def __init__(self, step: int, out: Path) -> None:
        self.step, self.out, self.prof = step, out, None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
            self.held_before = torch.cuda.memory_allocated()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.prof is None:
            return
        torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        breakdown = kernel_breakdown(self.prof)
        breakdown["memory"] = peak_breakdown(
            snapshot, self.held_before, torch.cuda.max_memory_allocated(), device=torch.cuda.current_device()
        )
        (self.out / "profile.json").write_text(json.dumps(breakdown, indent=1))
        self.prof = None


def kernel_breakdown(prof: Any) -> dict[str, Any]:
    """Device time of one step by bucket, plus the top kernels."""
    buckets: dict[str, float] = {name: 0.0 for name, _ in KERNEL_BUCKETS}
    buckets[OTHER_BUCKET] = 0.0
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if not us:
            continue
        key = ev.key.lower()
        kernels[ev.key[:90]] = kernels.get(ev.key[:90], 0.0) + us
        bucket = next((name for name, needles in KERNEL_BUCKETS if any(n in key for n in needles)), OTHER_BUCKET)
        buckets[bucket] += us
    total = sum(buckets.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {
        "device_ms": total / 1e3,
        "buckets_ms": {k: v / 1e3 for k, v in buckets.items()},
        "buckets_share": {k: (v / total if total else 0.0) for k, v in buckets.items()},
        "top_kernels_ms": {k: v / 1e3 for k, v in top},
    }


def count_tokens(trainer: Any, counts: dict[str, int]) -> None:
    """Count computed tokens (the input tensor) and real tokens (not padding) of every training batch,
    in the main process (collators may run in dataloader workers). Padded batches carry an attention
    mask; padding-free rows are padded, if at all, with pad tokens at their end."""
    inner = trainer.training_step
    pad_id = trainer.processing_class.pad_token_id

    def training_step(model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
        ids = inputs["input_ids"]
        counts["computed"] += int(ids.numel())
        mask = inputs.get("attention_mask")
        if mask is not None:
            counts["real"] += int(mask.sum())
        else:
            not_pad = (ids != pad_id).int()
            # everything up to the last non-pad token of each row is real
            last = ids.shape[1] - not_pad.flip(-1).argmax(-1)
            counts["real"] += int((last * not_pad.any(-1)).sum())
        return inner(model, inputs, *a, **kw)

    trainer.training_step = training_step


def peak_tflops(gpu: str) -> float | None:
    """Dense bf16 peak of the GPU, where known."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def mfu(tps: float | None, shape: ModelShape, mean_len: float, gpu: str) -> float | None:
    """MFU = real tokens/s x (6 N + 6 L h c) / peak: N non-embedding (linear) parameters (the frozen
    base's forward, its input-gradient backward and the checkpointing recompute: 3 x 2N per token;
    LoRA adds < 1%), L layers, h hidden size, c the mean attended context (half the example length)."""
    peak = peak_tflops(gpu)
    if tps is None or peak is None:
        return None
    per_token = 6 * shape.linear_params + 6 * shape.layers * shape.hidden * mean_len / 2
    return tps * per_token / (peak * 1e12)
