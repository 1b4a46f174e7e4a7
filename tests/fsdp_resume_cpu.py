"""Run by tests/test_sharded.py under `torchrun --nproc_per_node 2` (gloo, CPU ranks): FSDP1 training
of the 4-bit model with LoRA the way the Trainer runs it, killed after a checkpoint and resumed with
the project's own resume code, compared with an uninterrupted run.

    python fsdp_resume_cpu.py MODEL_DIR OUT_DIR UNITS PHASE

UNITS  `layers` (qlora-sft's default: one unit per decoder layer, adapters replicated as FSDP-ignored
       modules, their gradients averaged) or `peft` (peft's policy: every LoRA layer its own unit; the
       adapters in bf16: accelerate's upcast of trainable flat parameters to fp32 makes FSDP's
       storage handling fail on CPU ranks, "Trying to resize storage that is not resizable").
PHASE  `straight` (STEPS steps), `killed` (saves after step SAVE_AT as the Trainer does: the adapter
       through FSDP's full state dict, the optimizer through FSDP.optim_state_dict; rank 0 then
       SIGKILLs itself as step SAVE_AT + 1 begins) or `resumed` (loads that checkpoint with
       `checkpoint.load_adapter_in_place`, FSDP.optim_state_dict_to_load and `resume_problems`, and
       trains the remaining steps).

Each rank writes OUT_DIR/<phase>-rank<i>.json: its losses per step, the resume checks, and a digest
of its adapter (replicated adapters must be identical on every rank)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS, SAVE_AT = 6, 3


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as data parallelism gives it
    return [torch.randint(1, 300, (2, 12), generator=g) for _ in range(STEPS)]


def bundled_backward_prefetch() -> str:
    import yaml

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp_qlora.yaml"
    return yaml.safe_load(config.read_text())["fsdp_config"]["fsdp_backward_prefetch"]


def build(model_dir: str, units: str):
    from helpers import bf16_nf4_config
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import BackwardPrefetch, MixedPrecision
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora_sft.loader import load_low_memory
    from qlora_sft.model import (
        adapter_modules,
        broadcast_from_rank0,
        fp32_buffer_modules,
        keep_cpu_4bit_trainable,
        layer_units_policy,
        replicate_adapters,
    )
    from qlora_sft.model.sharding import no_embedding_gather_in_backward, release_root_after_head

    bf16, cpu = torch.bfloat16, torch.device("cpu")
    q = bf16_nf4_config()
    # rank 0 reads the weights, the other ranks hold placeholders (meta), as the low-memory loader
    # does under FSDP; FSDP materialises them (param_init_fn) and broadcasts rank 0's values
    # (sync_module_states), as accelerate sets it up. torch refuses sync_module_states for CPU
    # tensors only because NCCL needs GPU tensors; gloo broadcasts CPU tensors.
    import torch.distributed.fsdp._init_utils as fsdp_init

    fsdp_init._check_module_states_for_sync_module_states = lambda states: None
    data_device = torch.device("meta") if dist.get_rank() != 0 else cpu
    base = load_low_memory(model_dir, q, dtype=bf16, data_device=data_device, compute_device=cpu)
    keep_cpu_4bit_trainable(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as load_model does
    base.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    ignored = fp32_buffer_modules(model)
    params = []
    if units == "layers":
        adapters = adapter_modules(model)
        params = replicate_adapters(adapters, cpu)
        ignored += adapters
        policy = layer_units_policy(model)
    else:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(bf16)
        policy = fsdp_auto_wrap_policy(model)
    wrapped = FSDP(
        model,
        device_id=cpu,
        auto_wrap_policy=policy,
        use_orig_params=False,
        ignored_modules=ignored,
        mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
        sync_module_states=True,
        param_init_fn=lambda m: m.to_empty(device=cpu, recurse=False),  # accelerate's
        backward_prefetch=BackwardPrefetch[bundled_backward_prefetch()],  # as the bundled config sets it
    )
    broadcast_from_rank0(params)  # what fsdp_layer_units does after the Trainer's wrapping
    if units == "layers":
        assert no_embedding_gather_in_backward(wrapped)  # and this
        assert release_root_after_head(wrapped)  # and, by default, this
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    return model, wrapped, optimizer, params


def state_dict_types(wrapped):
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # accelerate offloads to the CPU, which FSDP's offload path refuses on CPU ranks
    FSDP.set_state_dict_type(
        wrapped,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False),
    )


def adapter_digest(wrapped) -> str:
    import hashlib

    from qlora_sft.checkpoint import adapter_parameters

    h = hashlib.sha256()
    for name, p in adapter_parameters(wrapped):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(model_dir: str, out_dir: str, units: str, phase: str) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora_sft import checkpoint
    from qlora_sft.model import average_gradients

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out, ckpt = Path(out_dir), Path(out_dir) / f"{units}-checkpoint"
    model, wrapped, optimizer, replicated = build(model_dir, units)
    state_dict_types(wrapped)
    report: dict = {"rank": rank, "units": units, "phase": phase, "losses": {}}
    first = 1
    if phase == "resumed":
        report["loaded"] = checkpoint.load_adapter_in_place(wrapped, ckpt)
        saved_osd = torch.load(ckpt / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(wrapped, optimizer, saved_osd))
        report["resume_problems"] = checkpoint.resume_problems(wrapped, optimizer, ckpt)
        again = FSDP.optim_state_dict(wrapped, optimizer)
        report["optimizer_state_equal"] = all(
            all(torch.equal(again["state"][k][n], v) for n, v in saved_osd["state"][k].items())
            for k in saved_osd["state"]
        ) and set(again["state"]) == set(saved_osd["state"])
        first = SAVE_AT + 1
    for step in range(first, STEPS + 1):
        if phase == "killed" and step == SAVE_AT + 1 and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        ids = batches(rank)[step - 1]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        average_gradients(replicated)  # the replicated adapters' gradients, as the Trainer's sync step does
        wrapped.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad()
        mean = torch.tensor([loss.item()])
        dist.all_reduce(mean)
        report["losses"][step] = mean.item() / dist.get_world_size()
        if phase == "killed" and step == SAVE_AT:
            with checkpoint.plain_fsdp_names(wrapped, model):
                adapter = get_peft_model_state_dict(model, state_dict=wrapped.state_dict())
            osd = FSDP.optim_state_dict(wrapped, optimizer)
            if rank == 0:
                ckpt.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in adapter.items()}, str(ckpt / checkpoint.ADAPTER_FILE))
                torch.save(osd, ckpt / "optimizer.pt")
            dist.barrier()
    report["adapter_digest"] = adapter_digest(wrapped)
    (out / f"{units}-{phase}-rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # every rank done with its collectives before any tears gloo down (CI saw one abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
