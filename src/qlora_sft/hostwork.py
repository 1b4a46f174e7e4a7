"""The host's work per micro batch, trimmed where the Trainer repeats what cannot have changed.

On one fast GPU a small micro batch is bound by the host: on an H200, 8B at 2 x 2048 tokens, the
GPU idled while Python queued the next kernels (docs/benchmarks.md, 2026-12-01). Three pieces of
that work depend on nothing that changes during training, and `lean_trainer` skips them:

- transformers' Trainer counts the model's parameters every micro batch (for `total_flos`): a walk
  over every module and parameter. The count is taken once; `total_flos` is the same number.
- it calls `model.train()` every micro batch: a walk setting `training` on every module. Where
  every module is already in training mode and no module's `train` does more than set the flag
  (DoRA clears a cache, DeepSpeed's engine sets a flag: those keep the call), the walk is skipped.
  An evaluation, which switches the model to eval mode, makes the next micro batch walk again.
- Python's cyclic garbage collector: a full collection walks every object the process holds (the
  model's modules, the tokenizer, the data set's objects), a pause of hundreds of milliseconds that
  lands in the middle of a step, on each rank at another time (the others wait for it at the next
  collective). `collector_frozen` moves everything alive when training starts out of the
  collector's reach (`gc.freeze`, as vLLM and others do after loading) and puts it back afterwards.

`QLORA_SFT_HOST_SAVINGS=0` switches all three off (the Trainer's own behaviour), for measuring, and
with them the fused LoRA layer's direct calls of bitsandbytes' kernels (`model.fused_lora.dequantized`;
QLORA_SFT_DIRECT_DEQUANT=0 switches those alone off). On one H200 (8B, 2026-12-03) all of it made
2 x 2048 tokens per micro batch 1.20x faster, 4 x 2048 1.03x; the direct calls alone measured 0.97x
in a later call (docs/benchmarks.md), so which saving gave the 1.20x is not settled.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping
from typing import Any

HOST_SAVINGS_ENV = "QLORA_SFT_HOST_SAVINGS"


def host_savings_enabled(env: Mapping[str, str] | None = None) -> bool:
    """QLORA_SFT_HOST_SAVINGS, checked (`launch.env_switch`): on unless set to 0; a value it cannot
    mean is refused (train checks it before the model loads)."""
    from .launch import env_switch

    return env_switch(HOST_SAVINGS_ENV, env) is not False


def _flag_only_train() -> tuple[Any, ...]:
    """The `train` methods that only set `training` (and, for transformers' model, act only when the
    mode changes): a module whose class uses another keeps the Trainer's call every micro batch."""
    import torch
    from transformers import PreTrainedModel

    return (
        torch.nn.Module.train,
        torch.nn.parallel.DistributedDataParallel.train,
        PreTrainedModel.train,  # re-applies kernels only when the mode changes
    )


def _module_train_is_plain(module: Any) -> bool:
    return getattr(type(module), "train", None) in _flag_only_train()


class LeanStepMixin:
    """Mixed into the Trainer (`lean_trainer`): the parameter count for `total_flos` taken once, and
    `model.train()` skipped where it would change nothing (see the module's text)."""

    _flos_params: tuple[int, int] | None = None  # (id of the model counted, its count)
    _train_walk: tuple[int, list[Any] | None] | None = None  # (id of the model, its modules or None)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        model = self.model  # type: ignore[attr-defined]
        main_input = getattr(model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(model, "num_parameters"):
            return super().floating_point_ops(inputs)  # type: ignore[misc]
        if self._flos_params is None or self._flos_params[0] != id(model):
            self._flos_params = (id(model), model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._flos_params[1]

    def _plain_modules(self, model: Any) -> list[Any] | None:
        """The model's modules where each one's `train` only sets the flag, else None (then the
        Trainer's call stays). Listed once per model object."""
        if self._train_walk is None or self._train_walk[0] != id(model):
            modules = list(model.modules()) if hasattr(model, "modules") else []
            plain = bool(modules) and all(_module_train_is_plain(m) for m in modules)
            self._train_walk = (id(model), modules if plain else None)
        return self._train_walk[1]

    def training_step(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        modules = self._plain_modules(model)
        if modules is None or not all(m.training for m in modules):
            return super().training_step(model, *args, **kwargs)  # type: ignore[misc]

        def already_training(mode: bool = True) -> Any:
            return model if mode else type(model).train(model, mode)

        model.__dict__["train"] = already_training  # found before the class's method
        try:
            return super().training_step(model, *args, **kwargs)  # type: ignore[misc]
        finally:
            model.__dict__.pop("train", None)


def lean_trainer(base: type) -> type:
    """`base` (a Trainer class) with the per-micro-batch savings mixed in; `base` itself where
    QLORA_SFT_HOST_SAVINGS=0."""
    if not host_savings_enabled():
        return base
    return type(f"Lean{base.__name__}", (LeanStepMixin, base), {})


@contextlib.contextmanager
def collector_frozen() -> Iterator[bool]:
    """During training, what is alive at its start is out of the cyclic collector's reach
    (`gc.freeze()` after one full collection); afterwards it is put back (`gc.unfreeze()`), so an
    in-process caller (submitit, a notebook) gets its collector as it was. Yields whether it froze
    (not where QLORA_SFT_HOST_SAVINGS=0, nor where something else had frozen objects already)."""
    if not host_savings_enabled() or gc.get_freeze_count():
        yield False
        return
    gc.collect()
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()


# Benchmark switch (issue 29's ablation rows, not a recipe key): which kernel computes the RMSNorms
# that Liger's kernels take. `liger` (the default): Liger's Triton kernel; `torch`: torch's fused
# `rms_norm` (`torch_rms_norms`), the same values as Liger's llama casting at a quarter of the host
# time per norm, which did not make training faster: on one H200 (8B, 2026-12-03, one call) 1.01x
# at 2 x 2048 tokens per micro batch and 0.96x at 4 x 2048 (docs/benchmarks.md)
NORM_ENV = "QLORA_SFT_NORM"
NORM_KERNELS = ("liger", "torch")
# Benchmark switch: which computes SwiGLU's `silu(gate) * up`: `liger` (the default: one fused
# kernel each way) or `torch` (transformers' own MLP: more kernels, fewer Python calls)
SWIGLU_ENV = "QLORA_SFT_SWIGLU"
SWIGLU_KERNELS = ("liger", "torch")


def norm_kernel(env: Mapping[str, str] | None = None) -> str:
    """QLORA_SFT_NORM, checked: `liger` (the default) or `torch`."""
    from .launch import env_choice

    return env_choice(NORM_ENV, NORM_KERNELS, env)


def swiglu_kernel(env: Mapping[str, str] | None = None) -> str:
    """QLORA_SFT_SWIGLU, checked: `liger` (the default) or `torch`."""
    from .launch import env_choice

    return env_choice(SWIGLU_ENV, SWIGLU_KERNELS, env)


def _rms_norm(self: Any, hidden_states: Any) -> Any:
    """An RMSNorm as Liger's `llama` casting computes it: the inverse RMS in fp32, the normalized
    values cast to the input's dtype, then scaled by the weight, the result in the input's dtype.
    Two of torch's kernels forward (its fused `rms_norm` without a weight, one multiply) and two
    backward, each one aten call: on an H200's host 41 us forward and 323 us forward and backward,
    against 165 and 627 us for Liger's Triton launches and their Python (`bench.hostops`, 2026-12-03)."""
    import torch

    out = torch.nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), None, self.variance_epsilon)
    weight = self.weight
    if weight is None:
        return out
    out = out * weight
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def _liger_llama_norm(module: Any, liger_forward: Any) -> bool:
    """Whether Liger computes `module` as an RMSNorm with its llama casting and no offset (its
    patched forward, or its own class): the norms `torch_rms_norms` can take over unchanged."""
    bound = module.__dict__.get("forward")
    forward = getattr(bound, "__func__", None) if bound is not None else getattr(type(module), "forward", None)
    if forward is not liger_forward:
        return False
    weight = getattr(module, "weight", None)
    return (
        getattr(module, "casting_mode", None) == "llama"
        and float(getattr(module, "offset", 1.0)) == 0.0
        and getattr(module, "row_mode", None) is None
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and (weight is None or weight.ndim == 1)
    )


def torch_rms_norms(model: Any, liger_forward: Any = None) -> int:
    """Give every RMSNorm that Liger computes with its llama casting (Llama, Qwen2, Mistral and the
    like; not Gemma's, whose weight is an offset) torch's fused norm instead (`_rms_norm`); returns
    how many. Where torch has no fused norm (before 2.8) Liger's stay. `liger_forward`: Liger's
    `LigerRMSNorm.forward` (imported where not given)."""
    import types

    import torch

    if not hasattr(torch, "_fused_rms_norm"):
        return 0
    if liger_forward is None:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        liger_forward = LigerRMSNorm.forward
    count = 0
    for module in model.modules():
        if _liger_llama_norm(module, liger_forward):
            module.__dict__["forward"] = types.MethodType(_rms_norm, module)
            module.__dict__["_get_name"] = types.MethodType(lambda self: "RMSNorm(torch fused)", module)
            count += 1
    return count
