"""Resuming bitsandbytes' paged optimizers (the default `paged_adamw_8bit` on GPUs).

bitsandbytes tags the state tensors of a paged optimizer `is_paged=True`; torch.save keeps that
Python attribute, so a loaded state claims to be paged while it is an ordinary tensor. Loaded onto
the GPU, as the Trainer does when world_size > 1, the next step's prefetch fails on it and the process
exits (`Error invalid argument at line 578 in pythonInterface.cpp`: every DDP relaunch died, measured
on two H200s); loaded onto the CPU (one process) bitsandbytes never moves it to the GPU.
`checkpoint.repage_optimizer_state` puts the loaded state back into paged memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import REPO, TESTS

from qlora_sft.checkpoint import repage_optimizer_state


def _train(opt, model: torch.nn.Module, steps: range) -> None:
    for s in steps:
        x = torch.randn(8, 512, generator=torch.Generator().manual_seed(s))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_the_paged_tag_survives_saving_and_is_dropped_after_loading():
    """The part that needs no GPU: the tag travels through torch.save/torch.load (weights_only, as the
    Trainer loads), re-paging on the CPU drops it and keeps every value, and training continues
    exactly as without the interruption."""
    import bitsandbytes as bnb

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(512, 512)
        return model, bnb.optim.PagedAdamW8bit(model.parameters(), lr=1e-3)

    straight_model, straight = fresh()
    _train(straight, straight_model, range(4))

    model, opt = fresh()
    _train(opt, model, range(2))
    for state in opt.state.values():  # what bitsandbytes' get_state_buffer sets on a CUDA device
        state["state1"].is_paged = state["state2"].is_paged = True
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    quant = saved["opt"]["state"][0]["__bnb_optimizer_quant_state__"]
    assert quant["state1"].is_paged and quant["state2"].is_paged  # the cause: the tag survives

    model2, opt2 = fresh()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    before = {k: v.clone() for k, v in opt2.state[model2.weight].items() if torch.is_tensor(v)}
    assert getattr(opt2.state[model2.weight]["state1"], "is_paged", False)
    assert repage_optimizer_state(opt2) == 0  # nothing is paged on the CPU
    after = opt2.state[model2.weight]
    assert not any(getattr(v, "is_paged", False) for v in after.values() if torch.is_tensor(v))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    _train(opt2, model2, range(2, 4))
    assert torch.equal(model2.weight, straight_model.weight) and torch.equal(model2.bias, straight_model.bias)


def test_other_optimizers_are_left_alone():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    assert repage_optimizer_state(opt) == 0


def run_case(optim: str, tmp_path: Path, variant: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(TESTS / "paged_resume.py"), optim, str(tmp_path / f"{optim}-{variant}"), variant]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


PAGED = ["paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit", "paged_lion_32bit", "paged_ademamix_8bit"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optim", PAGED)
def test_paged_optimizer_resumes_exactly_when_loaded_onto_the_gpu(optim: str, tmp_path: Path):
    """Through the Trainer's own loading with world_size > 1: re-paged, the state is paged again
    and two more steps give the uninterrupted run's weights exactly."""
    out = run_case(optim, tmp_path, "fixed")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["paged_after_load"] >= 1 and result["same_as_straight"], result  # Lion keeps one moment


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_without_repaging_the_resumed_step_fails(tmp_path: Path):
    """The regression the fix guards: the plain Trainer loading the same checkpoint onto the GPU."""
    out = run_case("paged_adamw_8bit", tmp_path, "unfixed")
    assert out.returncode != 0
    assert "invalid argument" in (out.stdout + out.stderr).lower()
