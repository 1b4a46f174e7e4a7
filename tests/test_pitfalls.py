"""One regression test per known failure mode of QLoRA at scale (see docs/pitfalls.md).
Items tested elsewhere are named in docs/pitfalls.md next to their test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import accelerate_cmd, cpu_env, fake_checkpoint, recipe_dict, wait_for_losses, write_recipe, write_toy_data

from qlora_sft import checkpoint
from qlora_sft.recipe import build_recipe


def test_empty_adapter_tensors_fail_the_save_loudly(tiny_model: Path, tmp_path: Path, monkeypatch):
    """ZeRO-3 saves partitioned LoRA weights as Size([0]) (trl#4416, peft#2892, DeepSpeed#7900): the
    project re-reads every saved adapter and refuses to publish such a checkpoint."""
    import peft.peft_model

    from qlora_sft.train import train

    real = peft.peft_model.get_peft_model_state_dict

    def partitioned(*args, **kwargs):
        return {k: torch.empty(0) if "lora_" in k else v for k, v in real(*args, **kwargs).items()}

    monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", partitioned)
    data = write_toy_data(tmp_path / "t.jsonl", n=40)
    recipe = build_recipe(recipe_dict(tiny_model, data, tmp_path / "runs", train={"max_steps": 4, "save_steps": 2}))
    with pytest.raises(checkpoint.InvalidAdapterError, match=r"not a real LoRA adapter of rank 8.*shape \(0,\)"):
        train(recipe)
    assert not list((tmp_path / "runs" / "tiny").glob("checkpoint-*"))
    assert (tmp_path / "runs" / "tiny" / checkpoint.STAGING / "checkpoint-2").is_dir()


def test_adapter_check_accepts_real_adapters_and_rejects_wrong_rank(tmp_path: Path):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "rank_pattern": {"v_proj": 2}}))
    good = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 4),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(2, 16),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.zeros(8, 2),
    }
    save_file(good, str(tmp_path / "adapter_model.safetensors"))
    assert checkpoint.check_adapter(tmp_path) == 4
    save_file(
        {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 16)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(checkpoint.InvalidAdapterError, match=r"q_proj.lora_A.weight has shape \(3, 16\)"):
        checkpoint.check_adapter(tmp_path)


def test_ranks_must_be_unique_and_match_the_launcher():
    """Every node believing it is rank 0 (accelerate#2816) is caught before any model loads."""
    from qlora_sft.launch import rank_problem

    ok = [{"rank": 0, "host": "a"}, {"rank": 1, "host": "b"}]
    assert rank_problem(ok, 2) is None
    assert "duplicate ranks [0]" in rank_problem([{"rank": 0, "host": "a"}, {"rank": 0, "host": "b"}], 2)
    assert "launcher's world size is 4" in rank_problem(ok, 4)
    assert "not 0..1" in rank_problem([{"rank": 0, "host": "a"}, {"rank": 2, "host": "b"}], 2)


def test_submitit_without_torch_variables_is_refused(monkeypatch):
    """submitit does not set MASTER_ADDR/RANK/... (submitit PR #1703): the job exports them from the
    job environment and refuses to start a process group when they do not match."""
    import importlib

    import submitit

    submit_module = importlib.import_module("qlora_sft.submit")

    class FakeEnv:
        num_tasks, global_rank = 2, 1

    monkeypatch.setattr(submitit, "JobEnvironment", lambda: FakeEnv())

    class NoExport:
        def export(self, **kw):
            return self

    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", NoExport)
    for k in submit_module.TORCH_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torch.distributed environment not set"):
        submit_module.export_torch_env()


def test_missing_deepspeed_tag_folder_is_skipped_not_half_restored(tmp_path: Path, tiny_model: Path):
    """transformers#14554/#22170: a checkpoint whose DeepSpeed shards are gone is not resumed from."""
    recipe = build_recipe(recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path / "runs"))
    for step in (4, 8):
        d = recipe.run_dir / f"checkpoint-{step}"
        (d / f"global_step{step}").mkdir(parents=True)
        (d / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
        (d / "latest").write_text(f"global_step{step}")
        fake_checkpoint(d, step, world_size=2, global_batch=8)
    (recipe.run_dir / "checkpoint-8" / "global_step8" / "mp_rank_00_model_states.pt").unlink()
    assert checkpoint.find_resume(recipe) == recipe.run_dir / "checkpoint-4"
    info = checkpoint.inspect_checkpoint(recipe.run_dir / "checkpoint-8")
    assert "global_step8/mp_rank_00_model_states.pt is missing" in info.reason


@pytest.mark.multiprocess
def test_signal_to_the_launcher_reaches_every_rank(tiny_model: Path, tmp_path: Path):
    """torchrun forwards only TERM/INT/HUP/QUIT unless told otherwise (pytorch#154849). With the
    environment launch/local.sh and the SLURM templates set, USR1 sent to `accelerate launch`
    reaches both ranks, which stop at the same step with one complete checkpoint."""
    data = write_toy_data(tmp_path / "t.jsonl", n=160)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(
            tiny_model,
            data,
            tmp_path / "runs",
            train={"max_steps": 400, "save_steps": 1000, "logging_steps": 1, "global_batch_size": 8},
        ),
    )
    env = {**cpu_env(), "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    proc = subprocess.Popen(
        accelerate_cmd("train", str(recipe)),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "runs" / "tiny"
    wait_for_losses(run_dir, 1)
    os.kill(proc.pid, signal.SIGUSR1)  # the launcher, not the ranks
    out, _ = proc.communicate(timeout=300)
    stops = [int(x) for x in __import__("re").findall(r"preempted: checkpoint-(\d+) is complete", out)]
    assert len(stops) == 2 and stops[0] == stops[1], out[-3000:]
    assert checkpoint.inspect_checkpoint(run_dir / f"checkpoint-{stops[0]}").complete
    assert len([p for p in run_dir.glob("checkpoint-*")]) == 1


def test_a_gpu_launch_without_cuda_stops_instead_of_training_on_the_cpu():
    from qlora_sft.errors import UserError
    from qlora_sft.launch import check_devices

    for env, what in (
        ({"WORLD_SIZE": "2"}, "2 processes"),
        ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "1"}, "FSDP"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ):
        with pytest.raises(UserError, match=f"started {what} for GPUs, but this process sees no CUDA GPU"):
            check_devices(env, cuda=False)
    check_devices({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"}, cuda=False)  # CPU ranks on purpose
    check_devices({"WORLD_SIZE": "1"}, cuda=False)  # one process falls back to the CPU
    check_devices({"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"}, cuda=True)
