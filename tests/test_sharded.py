"""The sharded launch modes as far as CPUs reach: the low-memory loader (against transformers'
own), pre-quantized checkpoints, the meta placement of non-zero ranks, torch's FSDP1 over the 4-bit
model on two CPU ranks, the launch-mode reading, the dtype guard, and `plan`'s memory model against
the GPU measurements committed in bench/results. The FSDP and ZeRO-3 runs themselves need GPUs
(accelerate turns them into DDP on CPUs): their numbers are in bench/results and docs/larger-models.md."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS, REPO, TESTS, free_port, losses_by_step, recipe_dict, write_recipe

from qlora_sft.errors import UserError


def bnb_config(storage: torch.dtype, compute: torch.dtype = torch.float32, double: bool = True):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def low_memory(path: Path, q, dtype=torch.float32, device: str = "cpu"):
    from qlora_sft.loader import load_low_memory

    return load_low_memory(
        str(path), q, dtype=dtype, data_device=torch.device(device), compute_device=torch.device("cpu")
    )


def reference(path: Path, q, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=q, device_map={"": "cpu"})


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


IDS = torch.tensor([[3, 17, 42, 99, 5, 8, 250, 31]])


@pytest.mark.parametrize(
    "storage,dtype",
    [(torch.uint8, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["uint8-fp32", "bf16-fp32", "bf16-bf16"],
)
def test_low_memory_loader_builds_what_from_pretrained_builds(tiny_model: Path, storage, dtype):
    import bitsandbytes as bnb

    q = bnb_config(storage, compute=dtype)
    ref, new = reference(tiny_model, q, dtype), low_memory(tiny_model, q, dtype)
    ref_params, new_params = dict(ref.named_parameters()), dict(new.named_parameters())
    assert ref_params.keys() == new_params.keys()
    quantized = 0
    for name, a in ref_params.items():
        b = new_params[name]
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(raw_bytes(a), raw_bytes(b)), name  # the same packed bytes, bit for bit
        if isinstance(a, bnb.nn.Params4bit):
            quantized += 1
            assert torch.equal(a.quant_state.absmax, b.quant_state.absmax), name
    assert quantized == 14  # 2 layers x 7 projections
    assert new.is_loaded_in_4bit and new.hf_quantizer is not None
    assert new.config.quantization_config.bnb_4bit_quant_storage == storage
    with torch.no_grad():
        assert torch.equal(ref(IDS).logits, new(IDS).logits)


def test_tied_embeddings_stay_tied(tmp_path: Path):
    from tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "tied", tied=True)
    q = bnb_config(torch.bfloat16)
    new = low_memory(folder, q)
    assert new.lm_head.weight is new.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reference(folder, q)(IDS).logits, new(IDS).logits)


def test_prequantized_checkpoint_is_read_as_stored_and_retyped(tiny_model: Path, tmp_path: Path):
    """A `*-bnb-4bit` checkpoint (uint8 storage, as save_pretrained writes it) loads with bf16
    storage for FSDP/ZeRO-3: the same bytes, the same dequantized weights, the same logits."""
    import bitsandbytes as bnb

    four_bit = reference(tiny_model, bnb_config(torch.uint8))
    four_bit.save_pretrained(tmp_path / "tiny-bnb-4bit")
    stored = json.loads((tmp_path / "tiny-bnb-4bit" / "config.json").read_text())["quantization_config"]
    assert stored["bnb_4bit_quant_storage"] == "uint8"
    new = low_memory(tmp_path / "tiny-bnb-4bit", bnb_config(torch.bfloat16))
    packed = {n: p for n, p in new.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    assert len(packed) == 14 and {p.dtype for p in packed.values()} == {torch.bfloat16}
    for name, p in four_bit.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            q = packed[name]
            assert torch.equal(raw_bytes(p), raw_bytes(q))
            assert torch.equal(
                bnb.functional.dequantize_4bit(p.data, p.quant_state),
                bnb.functional.dequantize_4bit(q.data, q.quant_state),
            )
    with torch.no_grad():
        assert torch.equal(four_bit(IDS).logits, new(IDS).logits)


def test_prequantized_checkpoint_in_a_recipe(tiny_model: Path, tmp_path: Path, caplog):
    """Through `load_base`: the checkpoint's quant type and double quant win over the recipe's
    (with a warning), and a recipe without 4-bit quantization is refused before loading."""
    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_base
    from qlora_sft.recipe import build_recipe

    reference(tiny_model, bnb_config(torch.uint8)).save_pretrained(tmp_path / "bnb4")
    (tmp_path / "bnb4").joinpath("tokenizer.json").write_text((tiny_model / "tokenizer.json").read_text())

    def recipe(**q):
        return build_recipe(recipe_dict(tmp_path / "bnb4", tmp_path / "x.jsonl", tmp_path, quantization=q))

    for loader in ("transformers", "low_memory"):
        r = build_recipe(
            recipe_dict(
                tmp_path / "bnb4",
                tmp_path / "x.jsonl",
                tmp_path,
                quantization={"method": "nf4", "double_quant": False},
                model={"loader": loader},
            )
        )
        with caplog.at_level("WARNING", logger="qlora_sft"):
            base = load_base(r, LaunchMode("cpu"))
        assert "pre-quantized as nf4 (double quant True)" in caplog.text
        assert base.config.quantization_config.bnb_4bit_use_double_quant is True
    with pytest.raises(UserError, match="stored in bitsandbytes 4-bit but quantization.method is none"):
        load_base(recipe(method="none"), LaunchMode("cpu"))


def test_meta_ranks_hold_no_weights_but_everything_to_receive_them(tiny_model: Path):
    """Under FSDP/ZeRO-3 the ranks other than 0 load nothing (meta) but keep the quantization
    constants; given rank 0's weights (what sync_module_states / ZeRO-3's broadcast does), they
    compute exactly what rank 0 computes."""
    import bitsandbytes as bnb

    q = bnb_config(torch.bfloat16)
    rank0 = low_memory(tiny_model, q)
    other = low_memory(tiny_model, q, device="meta")
    assert {p.device.type for p in other.parameters()} == {"meta"}
    assert all(m.quant_state is not None for m in other.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert all(b.device.type == "cpu" for b in other.buffers())  # rotary frequencies are computed, not loaded
    for module in other.modules():  # FSDP's param_init_fn: storage for the parameters, garbage until the broadcast
        for name, p in list(module.named_parameters(recurse=False)):
            module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
    other.load_state_dict(rank0.state_dict(), strict=False)
    for module in other.modules():  # what bitsandbytes does when FSDP hands a layer its plain weight view
        if isinstance(module, bnb.nn.Linear4bit):
            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(module)
    with torch.no_grad():
        assert torch.equal(rank0(IDS).logits, other(IDS).logits)


def test_zero3_placeholders_of_other_ranks_get_real_storage_keeping_their_kind(tiny_model: Path):
    """What rank 1 holds before ZeRO-3 partitions the model (the low-memory loader's meta weights,
    and peft's LoRA weights created beside them on meta) gets CPU storage, as `partition_for_zero3`
    needs: `p.data = ...` on a meta parameter fails ("incompatible tensor type", what stopped ZeRO-3
    with two ranks on two H200s); replacing the parameter keeps bitsandbytes' Params4bit with its
    quantization state, requires_grad, and tied weights tied."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from tiny import build_tiny_model

    from qlora_sft.model import materialize_placeholders

    q = bnb_config(torch.bfloat16)
    tied = build_tiny_model(Path(tiny_model).parent / "tiny-tied-z3", tied=True)
    rank1 = low_memory(tied, q, device="meta")
    model = get_peft_model(rank1, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    meta = [p for p in model.parameters() if p.device.type == "meta"]
    assert meta and any(type(p).__name__ == "Params4bit" for p in meta)
    with pytest.raises(RuntimeError, match="incompatible tensor type"):
        meta[0].data = torch.empty(meta[0].shape, dtype=meta[0].dtype)  # the old way
    before = {n: (type(p), p.requires_grad, getattr(p, "quant_state", None)) for n, p in model.named_parameters()}
    assert materialize_placeholders(model) == len({id(p) for p in meta})
    after = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for p in after.values())
    for name, (kind, grad, state) in before.items():
        assert type(after[name]) is kind and after[name].requires_grad == grad, name
        assert getattr(after[name], "quant_state", None) is state, name
    base = model.get_base_model()
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight  # still tied
    for p in model.parameters():  # what partition_for_zero3 does next
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    assert all(isinstance(m.weight, bnb.nn.Params4bit) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_checkpoint_names_that_do_not_match_fail_clearly(tiny_model: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "renamed"
    bad.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(tiny_model / "model.safetensors"))
    sd["model.layers.0.mlp.fc_in.weight"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as exc:
        low_memory(bad, bnb_config(torch.bfloat16))
    text = str(exc.value)
    assert "model.layers.0.mlp.up_proj.weight" in text and "model.layers.0.mlp.fc_in.weight" in text
    assert "model.loader: transformers" in text


def test_fsdp1_shards_the_4bit_model_and_finds_its_adapter(tiny_model: Path, tmp_path: Path):
    """Two CPU ranks (gloo) run torch's FSDP1 over the model from the low-memory loader, as the
    Trainer wraps it: bf16-stored 4-bit weights flatten, the loss equals the unsharded model's (the
    rotary buffers stay fp32), and the adapter goes out of FSDP's full state dict and back in (peft
    0.21 alone finds none of it: its lookup uses module names with FSDP's segments)."""
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(TESTS / "fsdp_cpu.py"),
        str(tiny_model),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2
    assert r["flat_param_dtypes"] == ["torch.bfloat16"]  # 4-bit weights, norms, embeddings and LoRA: one dtype
    assert r["float_buffer_dtypes"] == ["torch.float32"]
    assert r["loss"] == pytest.approx(r["loss_unsharded"], rel=1e-3)
    assert len(r["reference_keys"]) == 28 and r["saved_keys"] == r["reference_keys"]
    assert r["saved_equal_reference"]
    assert r["unexpected_on_load"] == 0 and r["loaded_all_twos"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("units", ["layers", "peft"])
def test_fsdp1_resume_after_a_kill_continues_exactly(tiny_model: Path, tmp_path: Path, units: str):
    """FSDP1 on two CPU ranks, as the Trainer runs it, with each unit layout (`layers`: one unit per
    decoder layer, the adapters replicated; `peft`: every LoRA layer its own unit): rank 0 is
    SIGKILLed after the checkpoint of step 3, the relaunch loads it with qlora-sft's resume code
    (the adapter copied in place, FSDP's optimizer state, the resume check), and steps 4-6 give the
    uninterrupted run's losses exactly; on every rank the optimizer state after loading equals what
    was saved, and the adapters end identical. Checkpointing is wired as `load_model` wires it, and
    with layer units the embedding's unit is kept from the backward's gather, as in training. (On
    two H200s the Trainer's own FSDP resume drifted by 0.037 over 5 steps; it did not show on CPU
    ranks, where loading through peft before FSDP's root is initialised fails outright.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    torchrun = str(Path(sys.executable).with_name("torchrun"))

    def run(phase: str) -> subprocess.CompletedProcess:
        cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())]
        cmd += [str(TESTS / "fsdp_resume_cpu.py"), str(tiny_model), str(tmp_path), units, phase]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    def report(phase: str, rank: int) -> dict:
        return json.loads((tmp_path / f"{units}-{phase}-rank{rank}.json").read_text())

    straight = run("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert run("killed").returncode != 0  # rank 0 killed as step 4 begins
    assert (tmp_path / f"{units}-checkpoint" / "optimizer.pt").is_file()
    resumed = run("resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        r, s = report("resumed", rank), report("straight", rank)
        assert r["loaded"] == 28 and r["resume_problems"] == [] and r["optimizer_state_equal"]
        assert r["losses"] == {k: v for k, v in s["losses"].items() if int(k) > 3}
        assert r["adapter_digest"] == s["adapter_digest"] == report("straight", 0)["adapter_digest"]


@pytest.mark.multiprocess
def test_fsdp1_ranks_hold_the_same_and_gather_the_embedding_once(tmp_path: Path):
    """accelerate's FSDP1 wrapping, set up by `prepare_sharding`, on two CPU ranks: rank 0 loaded the
    weights, rank 1 placeholders that FSDP materialises and fills from rank 0. After a training step
    both hold the same live tensor bytes. accelerate's `ensure_weights_retied` wrapper of the
    param_init_fn, kept on the plugin, held rank 1's whole materialised `lm_head.weight` (a Llama
    names it tied, tied or not): 1 GiB more steady GPU memory on rank 1 for Llama-3-8B, 2 GiB for
    70B, on two H200s. A vocabulary of 32000 over 64 hidden units makes the head the largest tensor.
    With checkpointing wired as `load_model` does, the frozen embedding's unit is all-gathered in the
    forward only (`no_embedding_gather_in_backward`), with the same loss and gradients as when
    FSDP gathered it again in the backward. By default the root unit (output head, final norm) is
    resharded before the decoder layers' backward, not after it (QLORA_SFT_FSDP_RELEASE_HEAD=0), with
    bit-identical loss and gradients; where it cannot apply it changes nothing and says why."""
    from tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "wide-vocab", vocab_size=32000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("QLORA_SFT_FSDP_RELEASE_HEAD", None)  # the default, whatever the caller's shell says
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += [str(TESTS / "fsdp_memory_cpu.py"), str(model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    # By default the root unit (head, final norm) is resharded once the loss's backward is past the
    # final norm; QLORA_SFT_FSDP_RELEASE_HEAD=0 leaves it to the end of the backward: the same loss
    # and gradients, bit for bit
    kept = tmp_path / "kept"
    kept.mkdir()
    cmd[-1], cmd[4] = str(kept), str(free_port())
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "QLORA_SFT_FSDP_RELEASE_HEAD": "0"}, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, r in enumerate((r0, r1)):
        k = json.loads((kept / f"rank{rank}.json").read_text())
        assert r["root_gathered_at_layer0_backward"] == [False] and k["root_gathered_at_layer0_backward"] == [True]
        assert k["loss"] == r["loss"] and k["adapter_grads_sha256"] == r["adapter_grads_sha256"]
        assert r["release_head_applied"] and not k["release_head_applied"]
        assert r["live_bytes"] <= k["live_bytes"]
        # where it cannot apply, nothing changes and the run says why: a warning if the user asked
        refused = r["release_refused"]
        asked, default = refused["root holds a layer"], refused["no model.norm"]
        assert not asked["applied"] and asked["hooks_added"] == 0 and not default["applied"]
        assert [lvl for lvl, _ in asked["said"]] == ["WARNING"], asked
        assert "also holds model.layers.weight" in asked["said"][0][1], asked
        assert [lvl for lvl, _ in default["said"]] == ["INFO"], default
        assert "Frozen has no model.norm" in default["said"][0][1], default
    head = 32000 * 64 * 2  # bf16
    assert r0["live_bytes"] < 2 * head  # the shards, adapters and step: what each rank must hold
    assert r1["live_bytes"] <= r0["live_bytes"] + head // 20, (r0["largest"], r1["largest"])
    for r in (r0, r1):
        # The frozen embedding's unit is gathered for the forward only; marked from inside its unit
        # (what transformers, peft and TRL do) FSDP gathered it again in the backward. Same step.
        assert r["embedding_gathers"] == {"forward": 1, "backward": 0}
        assert r["embedding_gathers_marked_inside"] == {"forward": 1, "backward": 1}
        assert r["logged_once"] == 1  # after the first training forward, from what FSDP registered
        (warning,) = r["warned_marked_inside"]  # a marking hook it cannot move: reported, with the cost
        assert "GiB per rank" in warning and "(mark_output_requires_grad)" in warning
        assert r["same_loss_and_grads"]
        assert r["adapter_grads_nonzero"] == r["adapters"] // 2  # lora_B's; lora_A's are 0 while B is 0


def test_launch_mode_from_the_launchers_environment(tmp_path: Path):
    from qlora_sft.launch import from_config_file, mode_from_environment

    ranks = {"world_size": 2, "local_rank": 1, "rank": 1}
    fsdp = mode_from_environment(
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "1",
            "FSDP_OFFLOAD_PARAMS": "false",
            "FSDP_SYNC_MODULE_STATES": "true",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
        },
        cpu=False,
        **ranks,
    )
    assert fsdp.kind == "fsdp" and fsdp.shards_parameters and fsdp.rank == 1 and not fsdp.offload
    assert fsdp.default_optim == "adamw_torch_fused"
    zero3 = mode_from_environment(
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "configs/deepspeed/zero3.json"),
        },
        cpu=False,
        **ranks,
    )
    assert (zero3.kind, zero3.zero_stage, zero3.offload, zero3.shards_parameters) == ("deepspeed", 3, False, True)
    offload = mode_from_environment(
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "configs/deepspeed/zero3_offload.json"),
        },
        cpu=False,
        **ranks,
    )
    assert offload.offload
    # accelerate runs neither FSDP nor DeepSpeed on CPU ranks: they are DDP there
    assert mode_from_environment({"ACCELERATE_USE_FSDP": "true"}, cpu=True, **ranks).kind == "cpu"
    assert mode_from_environment({}, cpu=False, **ranks).kind == "ddp"
    # the bundled accelerate configs, read as plan reads them
    assert from_config_file(CONFIGS / "fsdp_qlora.yaml").label() == "fsdp"
    assert from_config_file(CONFIGS / "fsdp_qlora_offload.yaml").label() == "fsdp+offload"
    assert from_config_file(CONFIGS / "deepspeed_zero3.yaml", gpus_per_node=4, nodes=2).world_size == 8
    assert from_config_file(CONFIGS / "deepspeed_zero2.yaml").label() == "zero2"
    # plan's launch line says how ZeRO-3 gathers (QLORA_SFT_ZERO3_UNITS)
    assert (
        from_config_file(CONFIGS / "deepspeed_zero3.yaml").label()
        == "zero3, each decoder layer gathered whole, released after its backward"
    )
    assert from_config_file(CONFIGS / "deepspeed_zero3.yaml", 1).label() == "zero3, each decoder layer gathered whole"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_SFT_ZERO3_UNITS", "modules")
        assert from_config_file(CONFIGS / "deepspeed_zero3.yaml").label() == "zero3, gathered per module"


def test_uint8_weights_are_refused_before_sharding(tiny_model: Path):
    """What crashed FSDP inside torch ("Cannot flatten integer dtype tensors") is a clear error
    that names the weights and the fix, before any training."""
    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import check_sharded_dtypes

    model = reference(tiny_model, bnb_config(torch.uint8, compute=torch.bfloat16), torch.bfloat16)
    with pytest.raises(UserError) as exc:
        check_sharded_dtypes(model, torch.bfloat16, LaunchMode("fsdp", 2))
    text = str(exc.value)
    assert "14 frozen weights are not in the compute dtype bfloat16" in text
    assert "4-bit, stored as uint8" in text and "model.loader: auto" in text
    bf16 = reference(tiny_model, bnb_config(torch.bfloat16, compute=torch.bfloat16), torch.bfloat16)
    check_sharded_dtypes(bf16, torch.bfloat16, LaunchMode("fsdp", 2))  # passes


def test_training_with_the_low_memory_loader_equals_the_transformers_loader(
    tiny_model: Path, toy_data: Path, tmp_path: Path
):
    losses = {}
    for loader in ("transformers", "low_memory"):
        recipe = write_recipe(
            tmp_path / f"{loader}.yaml",
            recipe_dict(
                tiny_model,
                toy_data,
                tmp_path / "runs",
                run={"name": loader},
                model={"loader": loader},
                train={"max_steps": 6, "logging_steps": 1, "save_steps": 100},
            ),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "qlora_sft", "train", str(recipe)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{'low-memory' if loader == 'low_memory' else 'transformers'} loader" in proc.stdout
        losses[loader] = losses_by_step(tmp_path / "runs" / loader)
    assert len(losses["transformers"]) == 6
    assert losses["low_memory"] == losses["transformers"]


def command_overrides(command: str) -> list[str]:
    """The `--overrides A B ...` of a recorded bench command line."""
    words = shlex.split(command)
    if "--overrides" not in words:
        return []
    rest = words[words.index("--overrides") + 1 :]
    return list(itertools.takewhile(lambda w: not w.startswith("--"), rest))


HOST_TABLES_DEFAULT_RUNS = {
    "2026-12-02-NVIDIA_H200-llama3-8b-distributed-1gpu-host-tables-default.json",
    "2026-12-02-NVIDIA_H200-llama3-8b-distributed-1gpu-host-tables-order.json",
}
# Two calls of 2026-12-03 ran versions of QLORA_SFT_LAYER_GRAPHS that recaptured the graphs for nearly
# every micro batch and piled up their buffers (their results files say so): those rows' peaks
# measure that defect, not the launch. Their eager rows are checked as any.
RECAPTURING_GRAPH_RUNS = {
    "2026-12-03-NVIDIA_H200-llama3-8b-distributed-1gpu-layer-graphs.json",
    "2026-12-03-NVIDIA_H200-llama3-8b-distributed-1gpu-layer-graphs-2.json",
}


def test_plan_models_sharded_modes_and_matches_the_gpu_runs(tmp_path: Path):
    """`plan`'s per-rank memory (one GPU with activations offloaded or not, FSDP, ZeRO-3) against
    every launch measured on a GPU in bench/results (within 15% of the measured peak), and its
    verdicts for the 70B shape."""
    from bench.distributed import config_file, recipe_for
    from bench.run import ABLATION, project_recipe
    from bench.workload import shape_config
    from qlora_sft import launch
    from qlora_sft.plan import ModelShape, estimate_memory, plan_lines
    from qlora_sft.recipe import load_recipe

    checked = 0
    for result in sorted((REPO / "bench" / "results").glob("*-distributed*.json")):
        run = json.loads(result.read_text())
        folder = tmp_path / run["shape"]
        shape_config(run["shape"]).save_pretrained(folder)
        raw = recipe_for(folder, tmp_path / "d.jsonl", tmp_path, run["steps"], run["global_batch"], run["max_length"])
        raw["train"]["offload_activations"] = run.get("offload_activations", False)  # not in the older runs
        path = write_recipe(tmp_path / "run.yaml", raw)
        shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()))
        for r in run["results"]:
            peaks = [p for p in r.get("peak_gib_per_rank") or [] if p]
            if r["returncode"] != 0 or not peaks:
                continue
            if result.name in RECAPTURING_GRAPH_RUNS and "QLORA_SFT_LAYER_GRAPHS" in r.get("env", {}):
                continue
            peak = max(peaks)
            # runs before 2026-11-30 record no overrides per row: those of their command line then
            overrides = r["overrides"] if r.get("overrides") is not None else command_overrides(run["command"])
            # the frozen tables the run kept in host memory: recorded since 2026-12-02 (auto resolves by
            # the GPU's memory); the 1gpu rows of two calls that day ran the code of 83ee7bc, whose
            # default kept both there on one GPU
            tables = r.get("host_tables")
            if tables is None and r["mode"] == "1gpu" and result.name in HOST_TABLES_DEFAULT_RUNS:
                tables = ["embedding_in_host_memory", "lm_head_in_host_memory"]
            if tables is not None:
                keys = ("embedding_in_host_memory", "lm_head_in_host_memory")
                overrides = [*overrides, *(f"model.{k}={str(k in tables).lower()}" for k in keys)]
            recipe = load_recipe(path, overrides)
            # runs before 2026-11-30 record no environment: their FSDP used peft's units
            env = dict(r.get("env", {"QLORA_SFT_FSDP_UNITS": "peft"}))
            if "deepspeed_zero3" in r.get("config", "deepspeed_zero3" if r["mode"].startswith("zero3") else ""):
                if "zero3_leaf_layers" not in r:
                    # ran before qlora-sft made the decoder layers leaves (2026-12-01): DeepSpeed's
                    # per-module gathering unless the JSON named leaves, the fused layer and
                    # activation offloading off under ZeRO-3 either way
                    env.setdefault("QLORA_SFT_ZERO3_UNITS", "modules")
                    overrides = [*overrides, "lora.fused=false", "train.offload_activations=false"]
                    recipe = load_recipe(path, overrides)
            # FSDP rows record whether the run resharded the head before the layers' backward (the
            # default since 2026-11-30 evening); rows without the key ran before it was
            env.setdefault("QLORA_SFT_FSDP_RELEASE_HEAD", "1" if r.get("fsdp_release_head_applied") else "0")
            # ZeRO-3 rows record whether each recomputed layer's weights were released after its own
            # backward (the default with several ranks or parameter offload since 2026-12-01 night);
            # rows without the key ran before it existed, but for the first measurement's, which asked
            # for it as QLORA_SFT_ZERO3_OWN
            released = r.get("zero3_release_layers", env.get("QLORA_SFT_ZERO3_OWN") == "1")
            env["QLORA_SFT_ZERO3_RELEASE_LAYERS"] = "1" if released else "0"
            with pytest.MonkeyPatch.context() as mp:
                for key, value in env.items():
                    mp.setenv(key, value)
                # the mode's config as the bench ran it (a changed copy of its DeepSpeed JSON for some rows;
                # FSDP rows as recorded, or BACKWARD_PRE, the bundled choice of runs that record none)
                config = config_file(r["mode"], tmp_path / "configs")
                accel = yaml.safe_load(config.read_text())
                if "fsdp_config" in accel:
                    accel["fsdp_config"].update(
                        r.get("accelerate_fsdp_config")
                        or {"fsdp_backward_prefetch": "BACKWARD_PRE", **r.get("fsdp_changes", {})}
                    )
                    config = tmp_path / f"as-run-{r['mode']}.yaml"
                    config.write_text(yaml.safe_dump(accel))
                mode = launch.from_config_file(config, r["gpus"])
            if r.get("zero3_leaf_layers") is not None:
                assert mode.zero3_leaf_modules == r["zero3_leaf_layers"], (result.name, r["mode"])
            estimate = estimate_memory(shape, recipe, mode).total
            # Rows without the key ran before the embedding's unit was kept from the backward's gather:
            # BACKWARD_PRE then brought the whole embedding in while the first layer's backward ran
            gathered = r.get("fsdp_embedding_gathered_in_backward", True)
            pre = mode.fsdp is not None and mode.fsdp.backward_prefetch == "BACKWARD_PRE"
            moves = r["gpus"] > 1 or mode.offload  # the embedding's weights arrive from other ranks or the CPU
            if gathered and pre and moves and mode.adapters_replicated and not shape.tied:
                estimate += shape.vocab * shape.hidden * 2 / 2**30
            assert abs(estimate - peak) / peak <= 0.15, (result.name, r["mode"], estimate, peak)
            checked += 1
    assert checked >= 5  # 8B on 1 GPU, FSDP and ZeRO-3 (H100); 70B under FSDP (H200)

    # one GPU, bench.run's project mode and its ablations (activations offloaded or not, 4 or 2 rows,
    # LoRA fused or not, dropout 0 or 0.05)
    results = REPO / "bench" / "results"
    singles = [*results.glob("*-unsloth.json"), *results.glob("*-fused*.json"), *results.glob("*-host-embedding.json")]
    for result in sorted(singles):
        run = json.loads(result.read_text())
        folder = tmp_path / run["shape"]
        shape_config(run["shape"]).save_pretrained(folder)
        shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()))
        single = launch.from_config_file(CONFIGS / "single_gpu.yaml", 1)
        for name, r in run["results"].items():
            if not name.startswith("project") or not r.get("peak_gib"):
                continue
            overrides = ABLATION[name.removeprefix("project, ")] if name != "project" else []
            path = write_recipe(tmp_path / "p.yaml", project_recipe(folder, tmp_path / "d.jsonl", tmp_path, 20, 2048))
            recipe = load_recipe(path, overrides)
            estimate = estimate_memory(shape, recipe, single).total
            assert abs(estimate - r["peak_gib"]) / r["peak_gib"] <= 0.15, (result.name, name, estimate, r["peak_gib"])
            checked += 1
    assert checked >= 25  # and the 8B and 1B shapes, offloaded or not, fused or not

    folder = tmp_path / "llama3-70b"
    shape_config("llama3-70b").save_pretrained(folder)
    r70 = recipe_dict(folder, tmp_path / "d.jsonl", tmp_path, data={"max_length": 2048}, train={"global_batch_size": 8})
    recipe = write_recipe(tmp_path / "r70.yaml", r70)
    rec = load_recipe(recipe, ["train.per_device_train_batch_size=1"])
    one = plan_lines(rec, None, gpu_mem=24)
    assert any(line.strip().startswith("single_gpu.yaml") and "does not fit" in line for line in one)
    two = plan_lines(rec, str(CONFIGS / "fsdp_qlora_offload.yaml"), gpus=2, gpu_mem=24)
    assert any(line.strip().startswith("fsdp_qlora_offload.yaml") and line.endswith(" fits") for line in two)
    assert any("CPU memory while loading: rank 0 holds the model" in line for line in two)


def test_zero3_releases_recomputed_layers_where_weights_are_gathered(monkeypatch):
    """QLORA_SFT_ZERO3_RELEASE_LAYERS: on by default for ZeRO-3 leaf layers with several ranks or
    parameter offload, off in one process without it (every weight is whole there) and under
    per-module gathering; 1/0 decide instead; anything else is refused."""
    from qlora_sft import launch

    def mode(config: str, gpus: int, **env: str) -> launch.LaunchMode:
        for key in (launch.ZERO3_RELEASE_LAYERS_ENV, launch.ZERO3_UNITS_ENV):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return launch.from_config_file(CONFIGS / config, gpus)

    assert mode("deepspeed_zero3.yaml", 2).zero3_releases_layers
    assert mode("deepspeed_zero3_offload.yaml", 1).zero3_releases_layers
    assert not mode("deepspeed_zero3.yaml", 1).zero3_releases_layers
    assert mode("deepspeed_zero3.yaml", 1, QLORA_SFT_ZERO3_RELEASE_LAYERS="1").zero3_releases_layers
    assert not mode("deepspeed_zero3.yaml", 2, QLORA_SFT_ZERO3_RELEASE_LAYERS="0").zero3_releases_layers
    assert not mode("deepspeed_zero3.yaml", 2, QLORA_SFT_ZERO3_UNITS="modules").zero3_releases_layers
    assert not mode("fsdp_qlora.yaml", 2).zero3_releases_layers
    with pytest.raises(UserError, match="QLORA_SFT_ZERO3_RELEASE_LAYERS='maybe'"):
        mode("deepspeed_zero3.yaml", 2, QLORA_SFT_ZERO3_RELEASE_LAYERS="maybe")


def test_a_layer_recomputed_in_the_backward_owns_what_it_gathers():
    """model.sharding.own_recompute, as a layer starts: in the forward pass it leaves DeepSpeed's
    record of running backward modules alone; when the layer is recomputed inside the backward pass
    (a checkpoint) it becomes the newest entry, the module DeepSpeed gives the weights it gathers
    then (and so releases them when that layer's backward ends); a DeepSpeed without that record is
    left alone."""
    from qlora_sft.model.sharding import ACTIVE_BACKWARD, own_recompute

    class Coordinator:
        pass

    coordinator = Coordinator()
    outer, layer = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    outer.ds_id, layer.ds_id = 0, 7
    active: dict[int, torch.nn.Module] = {7: layer, 0: outer}  # the layer's id already there, not newest
    setattr(coordinator, ACTIVE_BACKWARD, active)
    seen: list[bool] = []

    def note(module: torch.nn.Module, args: object) -> None:
        seen.append(own_recompute(coordinator, module))

    layer.register_forward_pre_hook(note, prepend=True)

    class Recompute(torch.autograd.Function):  # a checkpoint: runs the layer again in its backward
        @staticmethod
        def forward(ctx, x):
            with torch.no_grad():
                layer(x)
            ctx.save_for_backward(x)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                torch.autograd.backward(layer(x).sum())
            return grad

    x = torch.ones(1, 2, requires_grad=True)
    y = Recompute.apply(x)
    layer(x)  # a plain forward with gradients on
    assert seen == [False, False] and list(active) == [7, 0]
    y.sum().backward()
    assert seen == [False, False, True]
    assert list(active) == [0, 7] and active[7] is layer
    assert not own_recompute(Coordinator(), layer)  # no record: nothing done


def test_zero3_decoder_layers_as_leaf_modules(tiny_model: Path, tmp_path: Path, caplog):
    """ZeRO-3 runs each decoder layer whole by default (QLORA_SFT_ZERO3_UNITS=layers: qlora-sft makes
    the layers DeepSpeed leaf modules); QLORA_SFT_ZERO3_UNITS=modules keeps DeepSpeed's per-module
    gathering, whatever leaves the JSON names. Before DeepSpeed starts, a module that needs its layer
    whole but is in no leaf is refused, naming it and the fixes; a JSON leaf holding decoder layers
    is warned about."""

    from qlora_sft import launch, launch_config
    from qlora_sft.model import fuse_lora_layers, sharding

    def zero3(leaf: object = None, units: str | None = None, stage: int = 3):
        zero = {"stage": stage, **({"leaf_module": leaf} if leaf is not None else {})}
        f = tmp_path / "zero3.json"
        f.write_text(json.dumps({"zero_optimization": zero}))
        env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(f)}
        if units is not None:
            env[launch.ZERO3_UNITS_ENV] = units
        return launch.mode_from_environment(env, world_size=2, local_rank=0, rank=0, cpu=False)

    assert zero3().zero3_units == "layers" and zero3().zero3_leaf_modules and zero3().layers_run_whole
    assert zero3(units=" Layers ").zero3_leaf_modules  # trimmed, any case
    modules = zero3(units="MODULES")
    assert modules.zero3_units == "modules" and not modules.zero3_leaf_modules and not modules.layers_run_whole
    # leaves a JSON names (MoE blocks, say) switch nothing on: per-module gathering stays as it was
    named = zero3({"classes": "LlamaMLP"}, units="modules")  # a string: a list of one, as DeepSpeed reads it
    assert named.deepspeed.leaf_modules == {"classes": ["LlamaMLP"]} and not named.layers_run_whole
    with pytest.raises(UserError, match=r"QLORA_SFT_ZERO3_UNITS='leaf'.*layers, modules"):
        zero3(units="leaf")
    zero2 = zero3(units="leaf", stage=2)  # read for ZeRO-3 only
    assert zero2.zero_stage == 2 and not zero2.zero3_leaf_modules

    from test_fused_lora import nf4_peft_model

    model = nf4_peft_model(tiny_model)  # real bitsandbytes NF4 layers, checkpointing on
    cls = type(model.get_base_model().model.layers[0])
    names = [n for n, m in model.named_modules() if type(m) is cls]
    assert len(names) == model.config.num_hidden_layers
    # DeepSpeed's matching: class name or fully qualified name, exact module names, name suffixes
    for leaf in (
        {"classes": [cls.__name__]},
        {"classes": [f"{cls.__module__}.{cls.__qualname__}"]},
        {"names": names},
        {"name_suffixes": [f"layers.{i}" for i in range(len(names))]},
    ):
        ds = launch_config.DeepSpeedConfig(tmp_path, {"zero_optimization": {"stage": 3, "leaf_module": leaf}}, 3)
        assert sharding.zero3_leaves(model, ds.leaf_modules) == names

    # what needs its layer whole: every fused LoRA layer, every checkpointed layer when offloading
    fused = fuse_lora_layers(model)
    needs = ("the fused LoRA layer", "activation offloading")
    assert len(sharding.needs_whole_layer(model, needs[:1])) == fused == 7 * len(names)
    assert sharding.needs_whole_layer(model, needs[1:]) == names
    assert sharding.needs_whole_layer(model, ()) == []
    for n, m in model.named_modules():  # what deepspeed.utils.set_z3_leaf_modules sets
        m._z3_leaf = n in names
    sharding.check_whole_layers(model, zero3(), needs)
    model.get_base_model().model.layers[1]._z3_leaf = False
    with pytest.raises(UserError) as err:
        sharding.check_whole_layers(model, zero3(), needs)
    text = str(err.value)
    for part in (names[1], "lora.fused: false", "train.offload_activations: false", "QLORA_SFT_ZERO3_UNITS=modules"):
        assert part in text, (part, text)
    sharding.check_whole_layers(model, zero3(), ())  # nothing needs whole layers
    model.get_base_model().model._z3_leaf = True  # a leaf above the layers covers them
    sharding.check_whole_layers(model, zero3(), needs)
    model.get_base_model().model._z3_leaf = False
    model.get_base_model().model.layers[1]._z3_leaf = True
    # a JSON leaf holding decoder layers: warned (DeepSpeed gathers them all at once)
    caplog.set_level("WARNING", logger="qlora_sft")
    sharding.check_whole_layers(model, zero3({"name_suffixes": ["model.model"]}), needs)
    assert "holds decoder layers" in caplog.text and "base_model.model.model" in caplog.text, caplog.text
    caplog.clear()
    sharding.check_whole_layers(model, zero3({"classes": ["LlamaMLP"]}), needs)  # inside the layers: fine
    assert "holds decoder layers" not in caplog.text

    # a model that names no decoder layer class: refused where whole layers are needed, with fixes that work
    model.get_base_model()._no_split_modules = []
    with pytest.raises(
        UserError, match=r"names no decoder layer class.*QLORA_SFT_ZERO3_UNITS=modules.*lora\.fused: false"
    ):
        sharding.zero3_layer_leaves(model, zero3(), needs[:1])
    sharding.zero3_layer_leaves(model, zero3(), ())  # nothing needs them: DeepSpeed gathers per module


@pytest.mark.parametrize(
    "leaf",
    [
        ["LlamaDecoderLayer"],
        {"class": ["LlamaDecoderLayer"]},
        {"classes": [3]},
        {"classes": {"a": 1}},
        "LlamaDecoderLayer",
    ],
)
def test_malformed_leaf_module_is_named_before_launch(tmp_path: Path, leaf: object):
    from qlora_sft import launch_config
    from qlora_sft.recipe import build_recipe

    f = tmp_path / "zero3.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "leaf_module": leaf}}))
    ds = launch_config.read_deepspeed(f)
    recipe = build_recipe({"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}})
    problems = launch_config.deepspeed_problems(ds, recipe)
    assert any(str(f) in p and "zero_optimization.leaf_module" in p and '"classes"' in p for p in problems), problems


@pytest.mark.parametrize(
    ("leaf", "refused"),
    [
        ({"classes": ["LlamaDecoderLayer"]}, False),
        ({"names": "model.layers.0", "name_suffixes": ["mlp"]}, False),
        ({"names": ""}, True),  # the root module: the whole model one leaf
        ({"name_suffixes": ["mlp", ""]}, True),  # every module
    ],
)
def test_leaf_module_empty_names_refused_and_good_ones_kept(tmp_path: Path, leaf: object, refused: bool):
    from qlora_sft import launch_config
    from qlora_sft.recipe import build_recipe

    f = tmp_path / "zero3.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "leaf_module": leaf}}))
    recipe = build_recipe({"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}})
    found = launch_config.deepspeed_problems(launch_config.read_deepspeed(f), recipe)
    problems = [p for p in found if "`zero_optimization.leaf" in p]
    assert bool(problems) == refused, problems
    if refused:
        assert str(f) in problems[0] and "empty string" in problems[0] and "Remove it" in problems[0]


@pytest.mark.gpu
def test_zero3_on_one_gpu_runs_whole_layers_and_trains_like_one_gpu(tiny_model: Path, toy_data: Path, tmp_path: Path):
    """ZeRO-3 in one process on a GPU (needs DeepSpeed): with the default leaf layers the fused LoRA
    layer and activation offloading run, and the losses follow the one-GPU run's; with
    QLORA_SFT_ZERO3_UNITS=modules neither runs. A run killed under per-module gathering (the
    default before 2026-12-01) resumes from its checkpoint under the leaf-layer default and goes on
    like the one-GPU run. With parameter offload each recomputed layer is released after its
    backward (not in one process without it) and the losses follow too. (The 8B rows of
    bench/results measure the same at scale; this guards it on any GPU session.)"""
    import importlib.util

    from helpers import ACCELERATE

    from qlora_sft.launch import RELEASE_LAYERS_APPLIED

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    train = {"max_steps": 6, "logging_steps": 1, "save_steps": 3, "per_device_train_batch_size": 4}

    def launch(name: str, config: str, units: str | None, fault: str | None = None) -> tuple[int, str]:
        recipe = write_recipe(
            tmp_path / f"{name}.yaml",
            recipe_dict(tiny_model, toy_data, tmp_path / name, run={"name": name}, train=train),
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for var in ("QLORA_SFT_ZERO3_UNITS", "QLORA_SFT_FAULT", "QLORA_SFT_ZERO3_RELEASE_LAYERS"):
            env.pop(var, None)
        if units:
            env["QLORA_SFT_ZERO3_UNITS"] = units
        if fault:
            env["QLORA_SFT_FAULT"] = fault
        cmd = [
            ACCELERATE,
            "launch",
            "--config_file",
            str(CONFIGS / config),
            "--num_processes",
            "1",
            "--main_process_port",
            str(free_port()),
            "-m",
            "qlora_sft",
            "train",
            str(recipe),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        return out.returncode, out.stdout + out.stderr

    runs = {}
    configs = (
        ("one", "single_gpu.yaml", None),
        ("leaf", "deepspeed_zero3.yaml", "layers"),
        ("offload", "deepspeed_zero3_offload.yaml", None),  # parameter offload: layers released (added 2026-12-01 late)
    )
    for name, config, units in configs:
        rc, log = launch(name, config, units)
        assert rc == 0, log[-6000:]
        runs[name] = (losses_by_step(tmp_path / name / name), log)
    # per-module gathering, killed as step 5 begins (checkpoint-3 complete), relaunched with the default
    rc, modules_log = launch("modules", "deepspeed_zero3.yaml", "modules", fault="kill@5")
    assert rc != 0, modules_log[-6000:]
    modules = losses_by_step(tmp_path / "modules" / "modules")
    rc, resumed_log = launch("modules", "deepspeed_zero3.yaml", None)
    assert rc == 0, resumed_log[-6000:]
    resumed = losses_by_step(tmp_path / "modules" / "modules")
    (one, _), (leaf, leaf_log), (offload, offload_log) = runs["one"], runs["leaf"], runs["offload"]
    # each recomputed layer released after its backward where weights are gathered (parameter
    # offload), not in one process that holds every weight whole
    assert RELEASE_LAYERS_APPLIED in offload_log and RELEASE_LAYERS_APPLIED not in leaf_log, offload_log[-3000:]
    assert sorted(offload) == list(range(1, 7)) and offload[6] < offload[1], offload
    for step in one:
        assert offload[step] == pytest.approx(one[step], abs=2e-2), (step, one, offload)
    assert "decoder layers are leaf modules" in leaf_log and "layers fused (lora.fused)" in leaf_log, leaf_log[-3000:]
    assert "checkpointed layers wait in pinned host memory" in leaf_log, leaf_log[-3000:]
    assert "decoder layers are leaf modules" not in modules_log and "lora.fused" not in modules_log
    assert "checkpoint-3" in resumed_log and "decoder layers are leaf modules" in resumed_log, resumed_log[-3000:]
    assert sorted(one) == sorted(leaf) == sorted(resumed) == list(range(1, 7))
    assert {1, 2, 3} <= set(modules) and 6 not in modules, modules  # killed after checkpoint-3
    for step in one:
        # bf16 compute: the sharded runs reduce in another order
        assert leaf[step] == pytest.approx(one[step], abs=2e-2), (step, one, leaf)
        assert resumed[step] == pytest.approx(one[step], abs=2e-2), (step, one, resumed)
        if step in modules:
            assert modules[step] == pytest.approx(one[step], abs=2e-2), (step, one, modules)
    assert one[6] < one[1] and leaf[6] < leaf[1] and resumed[6] < resumed[1]  # all trained


@pytest.mark.parametrize("value", [-1, "1e9", 1.5, 1e999, "-5", [1], None])
@pytest.mark.parametrize("key", ["stage3_max_reuse_distance", "stage3_max_live_parameters"])
def test_zero3_gather_limits_that_deepspeed_refuses_are_named_before_launch(tmp_path: Path, key: str, value: object):
    """DeepSpeed reads stage3_max_reuse_distance and stage3_max_live_parameters as whole numbers >= 0
    ("auto" is dropped, its default taken): anything else failed in deepspeed.initialize, after the
    model was loaded, while plan estimated memory as if it were 0 or the default (and crashed on
    1e999). Named before the launch, with the file, the key and the fix (found by a hostile test)."""
    from qlora_sft import launch_config
    from qlora_sft.recipe import build_recipe

    f = tmp_path / "zero3.json"
    zero: dict[str, object] = {"stage": 3}
    if value is not None:
        zero[key] = value
    f.write_text(json.dumps({"zero_optimization": zero}))
    recipe = build_recipe({"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}})
    problems = [p for p in launch_config.deepspeed_problems(launch_config.read_deepspeed(f), recipe) if key in p]
    if value is None:
        assert problems == []
    else:
        assert len(problems) == 1 and str(f) in problems[0] and "whole number" in problems[0], problems


@pytest.mark.parametrize("value", [0, 1000000000, 1e9, 0.0, "auto", "1000000000"])
def test_zero3_gather_limits_deepspeed_reads_are_accepted(tmp_path: Path, value: object):
    from qlora_sft import launch_config
    from qlora_sft.recipe import build_recipe

    f = tmp_path / "zero3.json"
    zero = {"stage": 3, "stage3_max_reuse_distance": value, "stage3_max_live_parameters": value}
    f.write_text(json.dumps({"zero_optimization": zero}))
    recipe = build_recipe({"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}})
    problems = launch_config.deepspeed_problems(launch_config.read_deepspeed(f), recipe)
    assert not [p for p in problems if "stage3_max" in p], problems
