"""Run by tests/test_sharded.py under `torchrun --nproc_per_node 2` (gloo, CPU ranks): the 4-bit
model with LoRA wrapped by accelerate's own FSDP1 `prepare_model`, set up by the project's
`prepare_sharding` (layer units, adapters replicated), rank 0 holding the loaded weights and rank 1
placeholders (meta) that FSDP materialises (accelerate's `param_init_fn`) and fills from rank 0
(sync_module_states); then one training step.

    python fsdp_memory_cpu.py MODEL_DIR OUT_DIR

accelerate turns an FSDP launch on CPUs into DDP, so its state is set to FSDP here by hand. Each
rank writes OUT_DIR/rank<i>.json: the bytes of the distinct tensor storages alive after the step
(what the GPU's steady memory is on a GPU run) and the largest of them. Every rank holds the same
shards and adapters, so the ranks must hold about the same bytes."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist


def live_storages() -> list[tuple[int, list[int], str]]:
    """(bytes, shape, dtype) of each distinct tensor storage alive in this process, largest first."""
    gc.collect()
    found: dict[int, tuple[int, list[int], str]] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:
            continue
        if storage.data_ptr() and storage.nbytes() > found.get(storage.data_ptr(), (0,))[0]:
            found[storage.data_ptr()] = (storage.nbytes(), list(obj.shape), str(obj.dtype))
    return sorted(found.values(), reverse=True)


def count_gathers(unit: Any) -> dict[str, Any]:
    """Count the all-gathers of an FSDP1 unit's flat parameter, by the phase the caller sets."""
    counts: dict[str, Any] = {"forward": 0, "backward": 0, "phase": "forward"}
    all_gather = unit._handle._all_gather_flat_param

    def counted(padded: torch.Tensor) -> torch.Tensor:
        counts[counts["phase"]] += 1
        return all_gather(padded)

    unit._handle._all_gather_flat_param = counted
    return counts


def release_refusals() -> dict[str, Any]:
    """`release_root_after_head` where it cannot apply: a root unit that also holds a layer the
    forward runs before the final norm, and a model without `model.norm`. It must change nothing and
    say why: a warning where the user asked for it (QLORA_SFT_FSDP_RELEASE_HEAD=1), an info line where
    it was only the default."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora_sft.launch import FSDP_RELEASE_HEAD_ENV
    from qlora_sft.model.sharding import release_root_after_head

    class Frozen(torch.nn.Module):  # no auto-wrap: one unit, the root, holds everything
        def __init__(self, norm: bool) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.Linear(8, 8)
            if norm:
                self.model.norm = torch.nn.LayerNorm(8)
            self.lm_head = torch.nn.Linear(8, 16)
            self.requires_grad_(False)

    records: list[logging.LogRecord] = []
    capture = logging.Handler(logging.INFO)
    capture.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("qlora_sft").addHandler(capture)
    out: dict[str, Any] = {}
    for case, norm, asked in (("root holds a layer", True, "1"), ("no model.norm", False, None)):
        if asked is None:
            os.environ.pop(FSDP_RELEASE_HEAD_ENV, None)
        else:
            os.environ[FSDP_RELEASE_HEAD_ENV] = asked
        del records[:]
        wrapped = FSDP(Frozen(norm), device_id=torch.device("cpu"))
        hooks = len(wrapped.module.model.norm._forward_hooks) if norm else 0
        applied = release_root_after_head(wrapped)
        added = (len(wrapped.module.model.norm._forward_hooks) if norm else 0) - hooks
        out[case] = {"applied": applied, "hooks_added": added, "said": [(r.levelname, r.getMessage()) for r in records]}
    os.environ.pop(FSDP_RELEASE_HEAD_ENV, None)
    logging.getLogger("qlora_sft").removeHandler(capture)
    return out


def main(model_dir: str, out_dir: str) -> None:
    import torch.distributed.fsdp._init_utils as fsdp_init
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from helpers import bf16_nf4_config
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    from qlora_sft.launch import EMBEDDING_GATHERED_ONCE, RELEASE_HEAD_APPLIED, LaunchMode, fsdp_release_head
    from qlora_sft.loader import load_low_memory
    from qlora_sft.model import keep_cpu_4bit_trainable, prepare_sharding
    from qlora_sft.model.sharding import no_embedding_gather_in_backward

    bf16, cpu = torch.bfloat16, torch.device("cpu")
    accelerator = Accelerator(cpu=True)
    rank = dist.get_rank()
    # torch refuses sync_module_states for CPU tensors only because NCCL needs GPU tensors
    fsdp_init._check_module_states_for_sync_module_states = lambda states: None
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1,
        use_orig_params=False,
        mixed_precision_policy=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
    )
    plugin.sync_module_states = True
    plugin.param_init_fn = lambda m: m.to_empty(device=cpu, recurse=False)  # accelerate's, on this device
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.device = cpu  # accelerate's "cpu:0" is a device FSDP does not match with "cpu"
    accelerator.state.fsdp_plugin = plugin

    data_device = cpu if rank == 0 else torch.device("meta")
    base = load_low_memory(model_dir, bf16_nf4_config(), dtype=bf16, data_device=data_device, compute_device=cpu)
    keep_cpu_4bit_trainable(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as load_model does
    base.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.enable_input_require_grads()  # TRL's SFTTrainer adds its own hook too
    model.train()
    trainer = SimpleNamespace(
        accelerator=accelerator,
        model=model,
        _prepare_for_training=lambda: accelerator.prepare(model),
        training_step=None,
    )
    messages: list[str] = []
    collect = logging.Handler(logging.INFO)
    collect.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("qlora_sft").addHandler(collect)
    logging.getLogger("qlora_sft").setLevel(logging.INFO)
    mode = LaunchMode(kind="fsdp", world_size=dist.get_world_size(), rank=rank, fsdp_release_head=fsdp_release_head())
    prepare_sharding(trainer, mode, bf16)
    wrapped = trainer._prepare_for_training()
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(rank))
    (unit,) = [u for u in FSDP.fsdp_modules(wrapped) if isinstance(u.module, torch.nn.Embedding)]
    gathers = count_gathers(unit)
    gathers["phase"] = "forward"
    root = wrapped._handle.flat_param
    at_layer0: list[bool] = []  # the root (head, final norm) still gathered when layer 0's backward ends?

    def probe(module: Any, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.register_hook(lambda g: at_layer0.append(root.data_ptr() != root._local_shard.data_ptr()))

    layer0 = next(u for u in FSDP.fsdp_modules(wrapped) if type(u.module).__name__ == "LlamaDecoderLayer")
    probing = layer0.register_forward_pre_hook(probe, with_kwargs=True)
    loss = wrapped(input_ids=ids, labels=ids).loss
    gathers["phase"] = "backward"
    loss.backward()
    storages = live_storages()
    report = {"rank": rank, "live_bytes": sum(s[0] for s in storages), "largest": storages[:5]}
    probing.remove()
    report["root_gathered_at_layer0_backward"] = at_layer0
    report["loss"] = loss.item()
    report["embedding_gathers"] = {k: gathers[k] for k in ("forward", "backward")}
    report["logged_once"] = messages.count(EMBEDDING_GATHERED_ONCE)
    report["release_head_applied"] = RELEASE_HEAD_APPLIED in messages
    adapters = [p for p in wrapped.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in adapters]
    report["adapter_grads_nonzero"] = sum(bool(g.abs().sum() > 0) for g in grads)
    report["adapters"] = len(adapters)
    report["adapter_grads_sha256"] = hashlib.sha256(b"".join(g.float().numpy().tobytes() for g in grads)).hexdigest()

    # The same step as before the fix: the marking hook back on the embedding itself
    (outer,) = unit._forward_hooks.values()
    unit._forward_hooks.clear()
    unit.module.register_forward_hook(outer)
    del messages[:]
    no_embedding_gather_in_backward(wrapped)  # a marking hook it does not know: it moves nothing and says so
    for p in adapters:
        p.grad = None
    gathers.update(forward=0, backward=0, phase="forward")
    loss_before = wrapped(input_ids=ids, labels=ids).loss
    gathers["phase"] = "backward"
    loss_before.backward()
    report["embedding_gathers_marked_inside"] = {k: gathers[k] for k in ("forward", "backward")}
    report["warned_marked_inside"] = [m for m in messages if "gathered again in every backward" in m]
    report["same_loss_and_grads"] = bool(loss_before == loss) and all(
        torch.equal(p.grad, g) for p, g in zip(adapters, grads, strict=True)
    )
    report["release_refused"] = release_refusals()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.barrier()  # every rank done with its collectives before any tears gloo down (CI saw one abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
