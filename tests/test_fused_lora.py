"""`lora.fused`: the fused 4-bit + LoRA layer computes what peft's layer computes (outputs, the
adapters' gradients and the input gradient through checkpointed layers, on real bitsandbytes NF4
weights), hands every case it does not cover back to peft, and is resolved and refused per launch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest


def nf4_peft_model(model_dir: Path, dropout: float = 0.0, device: str = "cpu", bias: str = "none"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_sft import model as model_mod

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=q, device_map={"": device}
    )
    model_mod.keep_cpu_4bit_trainable(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", bias=bias)
    peft = get_peft_model(base, lora)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave A without gradient
    peft.train()
    return peft


def loss_and_grads(peft, fused: bool, autocast: bool = False) -> tuple[float, dict[str, object], int]:
    """Loss, gradients, and how many times the fused function computed a layer."""
    import torch

    from qlora_sft import model as model_mod

    if fused:
        layers = model_mod.fuse_lora_layers(peft)
        assert layers == 7 * peft.config.num_hidden_layers
    ids = torch.randint(3, peft.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    compute = model_mod.FusedLoraMatmul.compute

    def counted(*args):
        calls.append(1)
        return compute(*args)

    model_mod.FusedLoraMatmul.compute = staticmethod(counted)
    try:
        torch.manual_seed(123)
        with torch.autocast(peft.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = peft(input_ids=ids.to(peft.device), labels=ids.to(peft.device)).loss
        loss.backward()
    finally:
        model_mod.FusedLoraMatmul.compute = staticmethod(compute)
    grads = {n: p.grad.cpu().clone() for n, p in peft.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_layer_gives_peft_losses_and_gradients(tiny_model: Path, device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    loss_a, a, calls_a = loss_and_grads(nf4_peft_model(tiny_model, device=device), fused=False)
    loss_b, b, calls_b = loss_and_grads(nf4_peft_model(tiny_model, device=device), fused=True)
    layers = 7 * 2
    assert (calls_a, calls_b) == (0, 2 * layers)  # each layer's forward and its checkpointed recompute
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for name in a:
        assert a[name].abs().max() > 0, name
        # lora_A of the first layers gets its gradient through every later layer's input gradient
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_layer_under_autocast_with_another_compute_dtype(tiny_model: Path):
    """bf16 autocast around fp32 compute layers: the fused function picks its own dtypes (fp32
    here) instead of failing on mixed ones; peft's layer runs its LoRA matmuls in bf16."""
    loss_a, _, _ = loss_and_grads(nf4_peft_model(tiny_model), fused=False, autocast=True)
    loss_b, grads, calls = loss_and_grads(nf4_peft_model(tiny_model), fused=True, autocast=True)
    assert calls == 2 * 7 * 2
    assert loss_a == pytest.approx(loss_b, rel=2e-2)
    assert all(g.abs().max() > 0 for g in grads.values())


def test_fused_layer_hands_other_cases_to_peft(tiny_model: Path):
    """Dropout (in training, where it draws masks), disabled adapters and merged weights run
    peft's forward: the same outputs as the unfused model, and the fused function never runs."""
    import torch

    from qlora_sft import model as model_mod

    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = nf4_peft_model(tiny_model, dropout=0.2)
    fused = nf4_peft_model(tiny_model, dropout=0.2)
    model_mod.fuse_lora_layers(fused)
    compute = model_mod.FusedLoraMatmul.compute
    model_mod.FusedLoraMatmul.compute = None  # any call would fail
    try:
        with torch.no_grad():
            outs = []
            for m in (plain, fused):
                torch.manual_seed(5)  # the same dropout masks
                outs.append(m(input_ids=ids).logits)
            torch.testing.assert_close(*outs)
            for m in (plain, fused):
                m.eval()
            with fused.disable_adapter():
                off = fused(input_ids=ids).logits
            with plain.disable_adapter():
                torch.testing.assert_close(plain(input_ids=ids).logits, off)
            assert not torch.allclose(off, fused(input_ids=ids).logits)
            for m in (plain, fused):
                m.base_model.merge_adapter()
            torch.testing.assert_close(plain(input_ids=ids).logits, fused(input_ids=ids).logits)
    finally:
        model_mod.FusedLoraMatmul.compute = compute


def test_trained_biases_run_peft_layers(tiny_model: Path, tmp_path: Path):
    """lora.bias: all on a model with biases: those layers run peft's forward, so their biases get
    their gradients (the fused function does not train them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.attention_bias = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "biased")
    loss_a, a, _ = loss_and_grads(nf4_peft_model(tmp_path / "biased", bias="all"), fused=False)
    loss_b, b, calls = loss_and_grads(nf4_peft_model(tmp_path / "biased", bias="all"), fused=True)
    assert calls == 2 * 3 * 2  # gate, up and down have no bias: fused (attention_bias covers q, k, v, o)
    biases = [n for n in a if n.endswith("base_layer.bias")]
    assert len(biases) == 4 * 2
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in biases:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_resolution_and_refusals():
    from helpers import MINIMAL_RECIPE
    from helpers import two_rank_mode as mode

    from qlora_sft import launch
    from qlora_sft.errors import UserError
    from qlora_sft.model import uses_fused_lora
    from qlora_sft.recipe import build_recipe

    base = MINIMAL_RECIPE
    auto = build_recipe(base)
    assert auto.lora.fused == "auto" and auto.lora.dropout == 0
    assert uses_fused_lora(auto, mode("ddp")) and uses_fused_lora(auto, mode("cpu"))
    assert uses_fused_lora(auto, mode("fsdp"))  # one unit per layer: each layer runs its own forward, gathered
    peft_units = dataclasses.replace(mode("fsdp"), fsdp_units="peft")
    assert not uses_fused_lora(auto, peft_units)
    # ZeRO-3: each decoder layer a leaf module by default (QLORA_SFT_ZERO3_UNITS=layers), gathered whole
    assert uses_fused_lora(auto, mode("deepspeed", zero=3))
    per_module = dataclasses.replace(mode("deepspeed", zero=3), zero3_units="modules")
    assert not uses_fused_lora(auto, per_module)
    problems = launch.check_launch_compat(forced_fused := build_recipe({**base, "lora": {"fused": True}}), per_module)
    assert any("`lora.fused` is true" in p and "QLORA_SFT_ZERO3_UNITS=modules" in p for p in problems), problems
    assert not any("`lora.fused`" in p for p in launch.check_launch_compat(forced_fused, mode("deepspeed", zero=3)))
    assert not uses_fused_lora(build_recipe({**base, "lora": {"dropout": 0.05}}), mode("ddp"))
    assert not uses_fused_lora(build_recipe({**base, "quantization": {"method": "none"}}), mode("ddp"))
    forced = build_recipe({**base, "lora": {"fused": True}})
    assert not any("`lora.fused`" in p for p in launch.check_launch_compat(forced, mode("fsdp")))
    problems = launch.check_launch_compat(forced, peft_units)
    assert any("`lora.fused` is true" in p and "QLORA_SFT_FSDP_UNITS=peft" in p for p in problems), problems
    with pytest.raises(UserError, match=r"lora\.fused.*lora\.dropout is 0\.05"):
        build_recipe({**base, "lora": {"fused": True, "dropout": 0.05}})
    assert not uses_fused_lora(build_recipe({**base, "lora": {"bias": "all"}}), mode("ddp"))
    with pytest.raises(UserError, match=r"lora\.fused.*lora\.bias is all"):
        build_recipe({**base, "lora": {"fused": True, "bias": "all"}})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dequantized_weights_are_bitsandbytes_own_values(device: str, monkeypatch):
    """`dequantized` (on a GPU bitsandbytes' CUDA kernels called without torch's op dispatch; with
    QLORA_SFT_ABSMAX_CACHE the block scales kept) gives exactly the values of bitsandbytes' public
    `dequantize_4bit`, for NF4 and FP4, with and without double quantization, in each compute dtype."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from qlora_sft.model import fused_lora

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    cases = 0
    for quant_type in ("nf4", "fp4"):
        for nested in (True, False):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                w = torch.randn(96, 160) * 0.05
                w[3, 7] = 4.0  # one large weight: its block's scale differs from the rest
                param = bnb.nn.Params4bit(
                    w, requires_grad=False, quant_type=quant_type, compress_statistics=nested, quant_storage=torch.uint8
                )
                param = param.to(device)  # quantized on the move
                param.quant_state.dtype = dtype
                want = dequantize_4bit(param.data, param.quant_state)
                for direct, cache in ((True, False), (False, True), (True, True), (False, False)):
                    monkeypatch.setattr(fused_lora, "_DIRECT", direct)
                    monkeypatch.setattr(fused_lora, "_ABSMAX_CACHE", cache)
                    for _ in range(2):  # (the second call reads the kept scales)
                        got = fused_lora.dequantized(param)
                        assert got.dtype == want.dtype == dtype and got.shape == want.shape == (96, 160)
                        assert torch.equal(got, want), (quant_type, nested, dtype, direct, cache)
                    assert hasattr(param.quant_state, "_qlora_sft_absmax") == (cache and nested)
                    if hasattr(param.quant_state, "_qlora_sft_absmax"):
                        del param.quant_state._qlora_sft_absmax
                cases += 1
    assert cases == 12


def test_direct_kernels_that_disagree_with_bitsandbytes_are_dropped_with_a_warning(monkeypatch, caplog):
    """The private bitsandbytes functions `dequantized` calls directly are compared once per process
    with bitsandbytes' public `dequantize_4bit`; where another bitsandbytes computes other values or
    takes other arguments, training goes on with the public path and says so (here on the CPU, with
    stand-ins for the CUDA functions)."""
    import logging

    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from qlora_sft.model import fused_lora

    torch.manual_seed(0)
    param = bnb.nn.Params4bit(torch.randn(64, 128) * 0.05, requires_grad=False, quant_type="nf4").to("cpu")
    want = dequantize_4bit(param.data, param.quant_state)

    def blockwise(a, absmax, code, blocksize, dtype, out):  # bitsandbytes' own values, through its op
        out.copy_(torch.ops.bitsandbytes.dequantize_blockwise.default(a, absmax, code, blocksize, dtype))

    def right(a, absmax, blocksize, quant_type, dtype, out):
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(a, absmax, blocksize, quant_type, out.shape, dtype))

    def wrong(a, absmax, blocksize, quant_type, dtype, out):
        out.zero_()

    def other_arguments(a, absmax, blocksize, quant_type, out):
        raise AssertionError("not reached")

    for second, stays, why in (
        (right, True, None),
        (wrong, False, "other values"),
        (other_arguments, False, "TypeError"),
    ):
        monkeypatch.setattr(fused_lora, "_DIRECT", True)
        monkeypatch.setattr(fused_lora, "_CHECKED", False)

        def kernels(data, second=second):
            return (blockwise, second) if fused_lora._DIRECT else None

        monkeypatch.setattr(fused_lora, "_direct_kernels", kernels)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qlora_sft"):
            for _ in range(3):
                assert torch.equal(fused_lora.dequantized(param), want)
        assert fused_lora._DIRECT is stays and fused_lora._CHECKED
        warned = [r.getMessage() for r in caplog.records if "dequantization called directly" in r.getMessage()]
        if stays:
            assert warned == []
        else:
            assert len(warned) == 1 and why in warned[0] and "using dequantize_4bit" in warned[0], warned
