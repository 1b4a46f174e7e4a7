"""`lora.fused`: the fused 4-bit + LoRA layer computes what peft's layer computes (outputs, the
adapters' gradients and the input gradient through checkpointed layers, on real bitsandbytes NF4
weights), hands every case it does not cover back to peft, and is resolved and refused per launch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest


def nf4_peft_model(
    model_dir: Path,
    dropout: float = 0.0,
    device: str = "cpu",
    bias: str = "none",
    dtype_name: str = "float32",
    on_base=None,
    **lora_extra,
):
    """An NF4 peft model of `model_dir` on `device`, computing in `dtype_name`; `on_base(base)` runs
    on the quantized base before LoRA is added (an attention choice, Liger's kernels)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_sft import model as model_mod

    dtype = getattr(torch, dtype_name)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=q, device_map={"": device})
    if on_base is not None:
        on_base(base)
    model_mod.keep_cpu_4bit_trainable(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", bias=bias, **lora_extra)
    peft = get_peft_model(base, lora)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave A without gradient
    peft.train()
    return peft


def loss_and_grads(peft, fused: bool, autocast: bool = False) -> tuple[float, dict[str, object], tuple[int, int]]:
    """Loss, gradients, and how many times the fused functions computed: (layers alone, groups)."""
    import torch

    from qlora_sft.model import fused_lora

    if fused:
        layers = fused_lora.fuse_lora_layers(peft)
        assert layers == 7 * peft.config.num_hidden_layers
    ids = torch.randint(3, peft.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = {fused_lora.FusedLoraMatmul: 0, fused_lora.GroupedLoraMatmul: 0}
    computes = {cls: cls.compute for cls in calls}

    def counted(cls):
        def compute(*args):
            calls[cls] += 1
            return computes[cls](*args)

        return staticmethod(compute)

    for cls in calls:
        cls.compute = counted(cls)
    try:
        torch.manual_seed(123)
        with torch.autocast(peft.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = peft(input_ids=ids.to(peft.device), labels=ids.to(peft.device)).loss
        loss.backward()
    finally:
        for cls, compute in computes.items():
            cls.compute = staticmethod(compute)
    grads = {n: p.grad.cpu().clone() for n, p in peft.named_parameters() if p.requires_grad}
    return loss.item(), grads, tuple(calls.values())


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_layer_gives_peft_losses_and_gradients(tiny_model: Path, device: str, grouped: bool, monkeypatch):
    """Alone and grouped (q/k/v and gate/up computed together, the default; QLORA_SFT_GROUPED_LORA=0
    each alone): peft's loss and gradients."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("QLORA_SFT_GROUPED_LORA", "1" if grouped else "0")
    loss_a, a, calls_a = loss_and_grads(nf4_peft_model(tiny_model, device=device), fused=False)
    loss_b, b, calls_b = loss_and_grads(nf4_peft_model(tiny_model, device=device), fused=True)
    passes = 2 * 2  # 2 decoder layers, each forward and its checkpointed recompute
    assert calls_a == (0, 0)
    # grouped: o and down alone, q/k/v and gate/up one group each
    assert calls_b == ((2 * passes, 2 * passes) if grouped else (7 * passes, 0))
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for name in a:
        assert a[name].abs().max() > 0, name
        # lora_A of the first layers gets its gradient through every later layer's input gradient
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_layers_compute_only_for_their_own_input(tiny_model: Path):
    """A group's kept outputs go only to a sibling's call with the very input tensor (and grad mode)
    the group computed them for; an unused sibling output leaves its adapters without gradient, as
    alone; siblings of other ranks and scales match peft; a sibling that cannot run fused makes the
    others compute alone."""
    import torch

    from qlora_sft.model import fused_lora

    model = nf4_peft_model(tiny_model)
    fused_lora.fuse_lora_layers(model)
    attn = model.get_base_model().model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    group = q._qlora_sft_group
    assert group is k._qlora_sft_group is v._qlora_sft_group and group.members == (q, k, v)
    assert model.get_base_model().model.layers[1].mlp.up_proj._qlora_sft_group.members[0].in_features == 64

    def alone(layer, x):
        return fused_lora.FusedLoraMatmul.apply(x, *layer.fused_args(x))

    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
    y = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(4))
    computed = []
    compute = fused_lora.GroupedLoraMatmul.compute

    def counted(*args):
        computed.append(1)
        return compute(*args)

    fused_lora.GroupedLoraMatmul.compute = staticmethod(counted)
    try:
        with torch.no_grad():
            for order in ((q, k, v), (v, q, k), (k, v, q)):  # whichever is called first computes all three
                outs = [layer(x) for layer in order]
                for layer, out in zip(order, outs, strict=True):
                    torch.testing.assert_close(out, alone(layer, x))
                assert group._x is None and group._outputs == {}  # all handed out: nothing held
            assert len(computed) == 3 and group.on
            torch.testing.assert_close(q(x), alone(q, x))  # computes q, k and v for x
            torch.testing.assert_close(k(y), alone(k, y))  # another input: computed for it, not handed x's
            assert not torch.allclose(alone(k, x), alone(k, y))
            assert not group.on and group._outputs == {} and group._x is None  # stopped, nothing held
            torch.testing.assert_close(v(x), alone(v, x))  # alone from now on
            assert len(computed) == 4
        fused_lora.group_siblings(model)  # new groups
        group = q._qlora_sft_group
        with torch.no_grad():
            q(x)  # k's and v's outputs kept, without grad
        out = k(x)  # this call has grad: not handed the kept one
        assert out.requires_grad and out.grad_fn is not None and not group.on
        torch.testing.assert_close(out, alone(k, x))
    finally:
        fused_lora.GroupedLoraMatmul.compute = staticmethod(compute)
    fused_lora.group_siblings(model)

    # only q's output used: k's and v's adapters get no gradient, as when computed alone
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    (q(xg) * torch.arange(5.0).view(1, 5, 1)).sum().backward()
    assert xg.grad is not None and xg.grad.abs().max() > 0
    for layer in (k, v):
        assert all(p.grad is None for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    grads = [q.lora_A["default"].weight.grad.clone(), q.lora_B["default"].weight.grad.clone(), xg.grad.clone()]
    model.zero_grad(set_to_none=True)
    xa = x.clone().requires_grad_()
    (alone(q, xa) * torch.arange(5.0).view(1, 5, 1)).sum().backward()
    wants = [q.lora_A["default"].weight.grad, q.lora_B["default"].weight.grad, xa.grad]
    for got, want in zip(grads, wants, strict=True):
        torch.testing.assert_close(got, want)

    # siblings of other ranks and scales: peft's loss and gradients
    other = {"rank_pattern": {"k_proj": 2, "up_proj": 8}, "alpha_pattern": {"v_proj": 3, "gate_proj": 5}}
    loss_a, a, _ = loss_and_grads(nf4_peft_model(tiny_model, **other), fused=False)
    loss_b, b, calls = loss_and_grads(nf4_peft_model(tiny_model, **other), fused=True)
    assert calls == (8, 8) and loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)

    # a sibling that runs peft's forward (here a dropout module of p=0, which peft's layer runs):
    # its group's others compute alone
    plain, fused = nf4_peft_model(tiny_model), nf4_peft_model(tiny_model)
    for m in (plain, fused):
        for layer in m.get_base_model().model.layers:
            layer.self_attn.v_proj.lora_dropout["default"] = torch.nn.Dropout(0.0)
    loss_a, a, _ = loss_and_grads(plain, fused=False)
    loss_b, b, calls = loss_and_grads(fused, fused=True)
    assert calls == (4 * 4, 4)  # q, k, o, down alone; gate/up grouped; v peft's
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_layer_under_autocast_with_another_compute_dtype(tiny_model: Path):
    """bf16 autocast around fp32 compute layers: the fused function picks its own dtypes (fp32
    here) instead of failing on mixed ones; peft's layer runs its LoRA matmuls in bf16."""
    loss_a, _, _ = loss_and_grads(nf4_peft_model(tiny_model), fused=False, autocast=True)
    loss_b, grads, calls = loss_and_grads(nf4_peft_model(tiny_model), fused=True, autocast=True)
    assert calls == (2 * 2 * 2, 2 * 2 * 2)
    assert loss_a == pytest.approx(loss_b, rel=2e-2)
    assert all(g.abs().max() > 0 for g in grads.values())


def test_fused_layer_hands_other_cases_to_peft(tiny_model: Path):
    """Dropout (in training, where it draws masks), disabled adapters and merged weights run
    peft's forward: the same outputs as the unfused model, and the fused function never runs."""
    import torch

    from qlora_sft import model as model_mod
    from qlora_sft.model import fused_lora

    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = nf4_peft_model(tiny_model, dropout=0.2)
    fused = nf4_peft_model(tiny_model, dropout=0.2)
    model_mod.fuse_lora_layers(fused)
    compute, grouped = model_mod.FusedLoraMatmul.compute, fused_lora.GroupedLoraMatmul.compute
    model_mod.FusedLoraMatmul.compute = fused_lora.GroupedLoraMatmul.compute = None  # any call would fail
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
        model_mod.FusedLoraMatmul.compute, fused_lora.GroupedLoraMatmul.compute = compute, grouped


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
    assert calls == (2 * 2, 2 * 2)  # gate/up (a group) and down have no bias: fused (attention_bias: q, k, v, o)
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
    """`dequantized` (on a GPU bitsandbytes' CUDA kernels called without torch's op dispatch, or for
    NF4 the Triton kernel; with QLORA_SFT_ABSMAX_CACHE the block scales kept) gives exactly the values
    of bitsandbytes' public `dequantize_4bit`, for NF4 and FP4, with and without double quantization,
    in each compute dtype."""
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
                want = None
                for direct, cache, triton in (
                    (True, False, False),
                    (False, True, False),
                    (True, True, False),
                    (False, False, False),
                    (True, False, True),
                    (True, True, True),
                ):
                    if triton and device == "cpu":
                        continue  # (the kernel runs on the CPU only interpreted: tests/test_nf4_kernel.py)
                    param = bnb.nn.Params4bit(
                        w,
                        requires_grad=False,
                        quant_type=quant_type,
                        compress_statistics=nested,
                        quant_storage=torch.uint8,
                    )
                    param = param.to(device)  # quantized on the move
                    param.quant_state.dtype = dtype
                    if want is None:
                        want = dequantize_4bit(param.data, param.quant_state)
                    monkeypatch.setattr(fused_lora, "_DIRECT", direct)
                    monkeypatch.setattr(fused_lora, "_ABSMAX_CACHE", cache)
                    monkeypatch.setattr(fused_lora, "_TRITON", triton)
                    monkeypatch.setattr(fused_lora, "_CHECKED", False)  # each path checked in its own row
                    monkeypatch.setattr(fused_lora, "_TRITON_CHECKED", False)
                    for _ in range(2):  # (the second call reads the kept scales)
                        got = fused_lora.dequantized(param)
                        assert got.dtype == want.dtype == dtype and got.shape == want.shape == (96, 160)
                        assert torch.equal(got, want), (quant_type, nested, dtype, direct, cache, triton)
                    state = param.quant_state
                    # kept: the state made plain (fp32 scales), which bitsandbytes' own function reads alike
                    assert state.nested == (nested and not cache)
                    assert (state.absmax.dtype == torch.float32) == (not state.nested)
                    assert torch.equal(dequantize_4bit(param.data, state), want)
                    # each fast path kept (none fell back after its check); the kernel serves NF4 only
                    assert fused_lora._TRITON is triton and fused_lora._DIRECT is direct
                    assert fused_lora._TRITON_CHECKED is (triton and quant_type == "nf4")
                cases += 1
    assert cases == 12


def dequantized_three_times(param, want, caplog, marker: str) -> list[str]:
    """`fused_lora.dequantized(param)` three times, each equal to `want`; the warnings logged that
    contain `marker`."""
    import logging

    import torch

    from qlora_sft.model import fused_lora

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_sft"):
        for _ in range(3):
            assert torch.equal(fused_lora.dequantized(param), want)
    return [r.getMessage() for r in caplog.records if marker in r.getMessage()]


def test_direct_kernels_that_disagree_with_bitsandbytes_are_dropped_with_a_warning(monkeypatch, caplog):
    """The private bitsandbytes functions `dequantized` calls directly are compared once per process
    with bitsandbytes' public `dequantize_4bit`; where another bitsandbytes computes other values or
    takes other arguments, training goes on with the public path and says so (here on the CPU, with
    stand-ins for the CUDA functions)."""

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
        warned = dequantized_three_times(param, want, caplog, "dequantization called directly")
        assert fused_lora._DIRECT is stays and fused_lora._CHECKED
        if stays:
            assert warned == []
        else:
            assert len(warned) == 1 and why in warned[0] and "using bitsandbytes' kernels" in warned[0], warned
