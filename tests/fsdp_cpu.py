"""Run by tests/test_sharded.py under `torchrun` (gloo, CPU ranks): the 4-bit model from the
low-memory loader, with LoRA, wrapped by torch's FSDP1 the way accelerate wraps it for the Trainer
(peft's auto-wrap policy, bf16 mixed precision, use_orig_params=False, or True with a third
argument `use_orig_params`), trains one step; then its
adapter goes out through a full state dict and back in, as the Trainer's FSDP checkpoints do.

accelerate turns an FSDP launch on CPUs into plain DDP, so the project's own FSDP path needs GPUs;
this checks on CPUs what does not: that 4-bit weights stored in bf16 flatten and shard, and that
peft finds the adapter in FSDP's state dict. Writes a JSON report to argv[2]."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, out: str, use_orig_params: bool = False) -> None:
    from helpers import bf16_nf4_config
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, MixedPrecision, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora_sft.checkpoint import plain_fsdp_names
    from qlora_sft.loader import load_low_memory
    from qlora_sft.model import fp32_buffer_modules, keep_cpu_4bit_trainable

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    bf16 = torch.bfloat16
    q = bf16_nf4_config()
    cpu = torch.device("cpu")
    base = load_low_memory(model_dir, q, dtype=bf16, data_device=cpu, compute_device=cpu)
    keep_cpu_4bit_trainable(base)  # as training does on the CPU (docs/pitfalls.md, pitfall 11)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(bf16)
    model.train()
    reference = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    ids = torch.tensor([[1, 5, 9, 14, 22, 30, 41, 7]])
    with torch.no_grad():
        loss_unsharded = float(model(input_ids=ids, labels=ids).loss)
    wrapped = FSDP(
        model,
        device_id=cpu,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
        use_orig_params=use_orig_params,  # False as the bundled config; True as LLaMA-Factory's and TRL's
        # as accelerate + transformers set it up for QLoRA, and as qlora-sft keeps the rotary buffers
        ignored_modules=fp32_buffer_modules(model),
        mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
    )
    from qlora_sft.launch import held_parameter_bytes

    held, unsharded = held_parameter_bytes(wrapped)  # what the sharding report checks after wrapping
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    flat_dtypes = sorted({str(p.dtype) for p in wrapped.parameters()})
    buffer_dtypes = sorted({str(b.dtype) for b in wrapped.buffers() if b.is_floating_point()})
    # (accelerate gathers with offload_to_cpu=True; on CPU ranks FSDP's offload path fails on its own)
    full = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, full):
        as_peft_sees_it = get_peft_model_state_dict(wrapped, adapter_name="default")
        with plain_fsdp_names(wrapped):
            saved = get_peft_model_state_dict(wrapped, adapter_name="default")
        twos = {k: torch.full_like(v, 2.0) for k, v in saved.items()}
        with plain_fsdp_names(wrapped):
            result = set_peft_model_state_dict(wrapped, twos, adapter_name="default")
        state = wrapped.state_dict()
    lora_after = {k: v for k, v in state.items() if ".lora_" in k}
    report = {
        "rank": rank,
        "world": world,
        "loss": float(loss),
        "loss_unsharded": loss_unsharded,
        "flat_param_dtypes": flat_dtypes,
        "float_buffer_dtypes": buffer_dtypes,
        "reference_keys": sorted(reference),
        "saved_keys": sorted(saved),
        "saved_equal_reference": all(torch.equal(saved[k].to(reference[k].dtype), reference[k]) for k in reference),
        "unpatched_keys": len(as_peft_sees_it),
        "unexpected_on_load": len(result.unexpected_keys),
        "loaded_all_twos": bool(lora_after) and all(bool((v == 2).all()) for v in lora_after.values()),
        "held_parameter_bytes": held,
        "unsharded_parameter_bytes": unsharded,
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()  # every rank done with its collectives before any tears gloo down (CI saw one abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "use_orig_params")
