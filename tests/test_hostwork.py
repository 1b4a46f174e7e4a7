"""qlora_sft.hostwork: the Trainer's repeated host work per micro batch, trimmed without changing
what it computes (total_flos, training mode, losses), and the garbage collector's walks kept off
what was alive when training started; QLORA_SFT_PROFILE_HOST's profile of a step by Python function."""

from __future__ import annotations

import gc
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from qlora_sft.hostwork import HOST_SAVINGS_ENV, collector_frozen, lean_trainer


class RecordingTrainer:
    """The two Trainer methods the mixin wraps, as transformers' Trainer runs them: the training step
    calls `model.train()` first; `floating_point_ops` counts the parameters every call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.train_was_class_method: list[bool] = []

    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        self.train_was_class_method.append("train" not in model.__dict__)
        model.train()
        if inputs.get("raise"):
            raise RuntimeError("out of memory")
        return torch.tensor(1.0)

    def floating_point_ops(self, inputs: dict) -> int:
        return 6 * inputs["input_ids"].numel() * self.model.num_parameters(exclude_embeddings=True)


class Counted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2))
        self.counts = 0

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        self.counts += 1
        return sum(p.numel() for p in self.parameters())


class ClearsOnTrain(torch.nn.Module):
    """A module whose `train` does more than set the flag (as peft's DoRA layer clears its cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.cleared = 0

    def train(self, mode: bool = True) -> ClearsOnTrain:
        self.cleared += 1
        return super().train(mode)


def lean(model: Any) -> Any:
    return lean_trainer(RecordingTrainer)(model)


def test_parameter_count_for_total_flos_is_taken_once_and_gives_the_same_number(monkeypatch):
    monkeypatch.delenv(HOST_SAVINGS_ENV, raising=False)
    model = Counted()
    trainer, plain = lean(model), RecordingTrainer(Counted())
    inputs = {"input_ids": torch.ones(2, 16, dtype=torch.long)}
    flops = [trainer.floating_point_ops(inputs) for _ in range(5)]
    assert flops == [plain.floating_point_ops(inputs)] * 5 == [6 * 32 * (20 + 10)] * 5
    assert model.counts == 1  # counted once, not once per micro batch
    trainer.model = other = Counted()  # another model object (a new trainer.model) is counted anew
    assert trainer.floating_point_ops(inputs) == flops[0] and other.counts == 1


def test_train_walk_is_skipped_only_where_every_module_is_already_training(monkeypatch):
    monkeypatch.delenv(HOST_SAVINGS_ENV, raising=False)
    model = Counted()
    trainer = lean(model)
    model.train()
    trainer.training_step(model, {})  # first micro batch: all training -> the walk is skipped
    assert trainer.train_was_class_method == [False]
    assert "train" not in model.__dict__ and model.training  # put back after the step

    model.eval()  # an evaluation in between: the next micro batch walks again and trains
    trainer.training_step(model, {})
    assert trainer.train_was_class_method[-1] is True
    assert all(m.training for m in model.modules())

    model.body[1].eval()  # one submodule alone in eval mode (the root still says training)
    trainer.training_step(model, {})
    assert trainer.train_was_class_method[-1] is True and model.body[1].training

    with pytest.raises(RuntimeError, match="out of memory"):  # a step that raises puts train back too
        trainer.training_step(model, {"raise": True})
    assert "train" not in model.__dict__
    model.eval()
    assert not any(m.training for m in model.modules())  # the class's train(False) works as before


def test_a_module_whose_train_does_more_keeps_the_call_every_micro_batch(monkeypatch):
    monkeypatch.delenv(HOST_SAVINGS_ENV, raising=False)
    model = Counted()
    model.extra = ClearsOnTrain()
    trainer = lean(model)
    for _ in range(3):
        trainer.training_step(model, {})
    assert trainer.train_was_class_method == [True] * 3 and model.extra.cleared == 3


def test_savings_switched_off_leave_the_trainer_as_it_was(monkeypatch):
    monkeypatch.setenv(HOST_SAVINGS_ENV, "0")
    assert lean_trainer(RecordingTrainer) is RecordingTrainer
    model = Counted()
    trainer = lean(model)
    for _ in range(3):
        trainer.floating_point_ops({"input_ids": torch.ones(1, 4, dtype=torch.long)})
        trainer.training_step(model, {})
    assert model.counts == 3 and trainer.train_was_class_method == [True] * 3
    with collector_frozen() as froze:
        assert not froze and gc.get_freeze_count() == 0


def test_collector_frozen_freezes_during_training_and_puts_it_back(monkeypatch):
    monkeypatch.delenv(HOST_SAVINGS_ENV, raising=False)
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyboardInterrupt), collector_frozen() as froze:
        assert froze and gc.get_freeze_count() > 0
        alive = [object() for _ in range(10)]
        raise KeyboardInterrupt  # however training ends
    assert gc.get_freeze_count() == 0 and alive
    gc.freeze()  # frozen by someone else (an embedding application): left as it is
    try:
        before = gc.get_freeze_count()
        with collector_frozen() as froze:
            assert not froze
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def test_training_with_and_without_the_savings_gives_the_same_losses_and_flos(tmp_path: Path, monkeypatch):
    """The real Trainer, a tiny NF4 model with an evaluation between steps: the same losses, eval
    losses and total_flos with the savings as without them."""
    import json

    from helpers import recipe_dict, write_recipe, write_toy_data
    from tiny import build_tiny_model

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    model_dir = build_tiny_model(tmp_path / "m", layers=2)
    data = write_toy_data(tmp_path / "d.jsonl", n=64)
    out: dict[str, Any] = {}
    for savings in ("1", "0"):
        monkeypatch.setenv(HOST_SAVINGS_ENV, savings)
        raw = recipe_dict(
            model_dir,
            data,
            tmp_path / f"runs{savings}",
            train={"max_steps": 6, "logging_steps": 1, "save_steps": 6, "eval_strategy": "steps", "eval_steps": 3},
            lora={"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: training mode matters to the numbers
        )
        trainers: list[Any] = []
        result = train(load_recipe(write_recipe(tmp_path / f"r{savings}.yaml", raw)), on_trainer=trainers.append)
        walk = getattr(trainers[0], "_train_walk", None)
        if savings == "1":  # every module of the real model only sets the flag: the walk was skipped
            assert walk is not None and walk[1] is not None, walk
        else:
            assert walk is None
        rows = [json.loads(x) for x in (result.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        state = json.loads((result.run_dir / "checkpoint-6" / "trainer_state.json").read_text())
        out[savings] = (
            [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows if "loss" in r or "eval_loss" in r],
            state["total_flos"],
        )
        assert gc.get_freeze_count() == 0  # put back after training
    assert len([r for r in out["1"][0] if r[2] is not None]) == 2, out  # two evaluations ran
    assert out["1"] == out["0"], out


def test_profile_host_variable_is_checked():
    from qlora_sft.errors import UserError
    from qlora_sft.profiling import profile_host

    assert profile_host({}) is False and profile_host({"QLORA_SFT_PROFILE_HOST": "0"}) is False
    assert profile_host({"QLORA_SFT_PROFILE_HOST": " 1 "}) is True
    for bad in ("on", "2", "１"):
        with pytest.raises(UserError, match=re.escape(f"QLORA_SFT_PROFILE_HOST={bad!r}: use 1 (on) or 0 (off)")):
            profile_host({"QLORA_SFT_PROFILE_HOST": bad})


def test_host_profile_names_the_step_functions_and_the_collector_pauses(tmp_path: Path):
    """QLORA_SFT_PROFILE_HOST=1: cProfile over exactly the named step, into this rank's
    host-profile file, with the garbage collector's pauses of that step; a step that never ends
    leaves the profiler off."""
    import sys

    from qlora_sft.profiling import profile_callback

    def work_of_the_step() -> list:
        junk = []
        for _ in range(3000):  # containers in cycles: the collector runs
            a: list = []
            a.append(a)
            junk.append(a)
        return junk

    cb = profile_callback(2, tmp_path, rank=3, host=True)
    for step in range(3):
        cb.on_step_begin(None, SimpleNamespace(global_step=step), None)
        if step == 1:
            work_of_the_step()
            gc.collect()
        cb.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-profile-rank3.txt"]
    text = (tmp_path / "host-profile-rank3.txt").read_text()
    assert text.startswith("step 2: ") and "work_of_the_step" in text, text[:2000]
    assert re.search(r"garbage collector pauses: .*generation 2: [1-9][0-9]* x", text), text[:500]
    assert sys.getprofile() is None

    again = profile_callback(1, tmp_path / "again", rank=0, host=True)
    (tmp_path / "again").mkdir()
    again.on_step_begin(None, SimpleNamespace(global_step=0), None)  # step 1 begins and raises:
    again.close()
    assert sys.getprofile() is None and list((tmp_path / "again").iterdir()) == []
    assert not gc.callbacks or all("GcPauses" not in repr(c) for c in gc.callbacks)


def test_the_switches_refuse_what_they_cannot_mean():
    """QLORA_SFT_HOST_SAVINGS and QLORA_SFT_ABSMAX_CACHE take 0 or 1 (or unset); anything else is
    refused naming the variable (train checks both before the model loads), not read as on."""
    from qlora_sft.errors import UserError
    from qlora_sft.hostwork import host_savings_enabled
    from qlora_sft.model.fused_lora import absmax_cached, direct_dequant

    assert host_savings_enabled({}) and host_savings_enabled({HOST_SAVINGS_ENV: " 1"})
    assert not host_savings_enabled({HOST_SAVINGS_ENV: "0"})
    assert not absmax_cached({}) and absmax_cached({"QLORA_SFT_ABSMAX_CACHE": "1"})
    assert direct_dequant({}) and not direct_dequant({"QLORA_SFT_DIRECT_DEQUANT": "0"})
    assert not direct_dequant({HOST_SAVINGS_ENV: "0"})  # the savings off take it with them
    for bad in ("O", "off", "2", "-1", "nan", "٠"):
        for name, check in (
            ("QLORA_SFT_HOST_SAVINGS", host_savings_enabled),
            ("QLORA_SFT_ABSMAX_CACHE", absmax_cached),
            ("QLORA_SFT_DIRECT_DEQUANT", direct_dequant),
        ):
            with pytest.raises(UserError, match=re.escape(f"{name}={bad.lower()!r}: use 1 (on) or 0 (off)")):
                check({name: bad})


def liger_style_patch(module: torch.nn.Module, stand_in: Any, casting_mode: str = "llama", offset: float = 0.0) -> None:
    """What liger-kernel's `_patch_rms_norm_module` does to a transformers RMSNorm (liger-kernel needs
    triton, absent from the CPU suite): its forward bound on the instance, its settings as attributes."""
    module.offset, module.casting_mode, module.in_place, module.row_mode = offset, casting_mode, True, None
    module.variance_epsilon = float(getattr(module, "variance_epsilon", 1e-6))
    module.__dict__["forward"] = stand_in.__get__(module, type(module))


def liger_llama_reference(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Liger's RMSNorm with llama casting, written out: the inverse RMS in fp32, the normalized values
    cast to the input's dtype, times the weight, stored in the input's dtype."""
    xf = x.float()
    normalized = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)
    return (normalized * self.weight).to(x.dtype)


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_torch_norm_gives_liger_llama_values_and_gradients(x_dtype, w_dtype):
    """`hostwork.torch_rms_norms` takes over the norms Liger computes with its llama casting: the same
    values and input gradients as that casting, in the input's dtype also where the weight was
    upcast to fp32 (model.upcast_frozen)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qlora_sft.hostwork import torch_rms_norms

    torch.manual_seed(0)
    hidden = 64
    ours, ref = LlamaRMSNorm(hidden, eps=1e-5), LlamaRMSNorm(hidden, eps=1e-5)
    for m in (ours, ref):
        m.weight.data = (torch.rand(hidden) + 0.5).to(w_dtype)
        m.weight.requires_grad_(False)  # frozen, as in QLoRA
    ref.weight.data = ours.weight.data.clone()
    liger_style_patch(ours, liger_llama_reference)
    liger_style_patch(ref, liger_llama_reference)
    model = torch.nn.Sequential(ours)
    assert torch_rms_norms(model, liger_forward=liger_llama_reference) == 1
    assert ours.__dict__["forward"].__func__ is not liger_llama_reference  # taken over
    x = (torch.randn(2, 5, hidden) * 3).to(x_dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), ref(x2)
    assert y1.dtype == y2.dtype == x_dtype
    assert torch.equal(y1, y2) if x_dtype == torch.float32 else torch.allclose(y1.float(), y2.float(), rtol=8e-3)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    assert torch.allclose(x1.grad.float(), x2.grad.float(), rtol=tol, atol=tol)
    if x_dtype == torch.bfloat16:  # bf16: at most one rounding step apart, in few places
        assert (y1.float() - y2.float()).abs().gt(0).float().mean() < 0.05


def test_torch_norm_leaves_other_norms_alone():
    """Only Liger's llama casting without an offset is taken over: Gemma's (offset 1, gemma casting),
    and a norm Liger did not patch stay as they are; QLORA_SFT_NORM leaves Liger's norms by default."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qlora_sft.hostwork import norm_kernel, torch_rms_norms

    gemma, plain, llama = LlamaRMSNorm(8), LlamaRMSNorm(8), LlamaRMSNorm(8)
    liger_style_patch(gemma, liger_llama_reference, casting_mode="gemma", offset=1.0)
    liger_style_patch(llama, liger_llama_reference)
    model = torch.nn.ModuleList([gemma, plain, llama])
    assert torch_rms_norms(model, liger_forward=liger_llama_reference) == 1
    assert gemma.__dict__["forward"].__func__ is liger_llama_reference
    assert "forward" not in plain.__dict__
    assert llama.__dict__["forward"].__func__ is not liger_llama_reference
    assert norm_kernel({}) == "liger" and norm_kernel({"QLORA_SFT_NORM": "Torch"}) == "torch"


def test_the_kernel_switches_refuse_what_they_cannot_mean():
    """QLORA_SFT_NORM and QLORA_SFT_SWIGLU name a kernel; anything else is refused with the choices."""
    from qlora_sft.errors import UserError
    from qlora_sft.hostwork import norm_kernel, swiglu_kernel

    assert swiglu_kernel({}) == "liger" and swiglu_kernel({"QLORA_SFT_SWIGLU": " torch "}) == "torch"
    with pytest.raises(UserError, match=re.escape("QLORA_SFT_NORM='fast': use one of liger, torch")):
        norm_kernel({"QLORA_SFT_NORM": "fast"})
    with pytest.raises(UserError, match=re.escape("QLORA_SFT_SWIGLU='0': use one of liger, torch")):
        swiglu_kernel({"QLORA_SFT_SWIGLU": "0"})


@pytest.mark.gpu
def test_torch_norms_replace_liger_norms_of_a_model_with_the_same_outputs(monkeypatch):
    """On a GPU with liger-kernel: `model.load.apply_liger` under QLORA_SFT_NORM=torch gives every norm
    of a Llama torch's fused norm, and the model's logits and input gradients equal those with Liger's
    own norms (QLORA_SFT_NORM=liger, the default) within bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel")
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_sft.hostwork import NORM_ENV
    from qlora_sft.model.load import apply_liger

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    models = {}
    for kernel in ("torch", "liger"):
        monkeypatch.setenv(NORM_ENV, kernel)
        torch.manual_seed(0)
        m = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        for name, p in m.named_parameters():
            if "norm" in name:  # not all ones: the weight's scaling is part of what is compared
                p.data.uniform_(0.5, 1.5)
        apply_liger(m)
        models[kernel] = m
    names = [type(mod).__name__ for mod in models["torch"].modules() if mod._get_name() == "RMSNorm(torch fused)"]
    assert len(names) == 2 * config.num_hidden_layers + 1
    assert not any(mod._get_name() == "RMSNorm(torch fused)" for mod in models["liger"].modules())
    ids = torch.randint(0, config.vocab_size, (1, 64), device="cuda")
    outs = {}
    for kernel, m in models.items():
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = m(inputs_embeds=emb).logits.float()
        logits.square().mean().backward()
        outs[kernel] = (logits, emb.grad.float())
    (lt, gt), (ll, gl) = outs["torch"], outs["liger"]
    assert torch.allclose(lt, ll, rtol=2e-2, atol=2e-2), (lt - ll).abs().max()
    assert torch.allclose(gt, gl, rtol=5e-2, atol=1e-3), (gt - gl).abs().max()
