"""`model.nf4_kernel`: one Triton kernel gives bitsandbytes' NF4 dequantization bit for bit (on the
CPU under Triton's interpreter, against a reference of bitsandbytes' CUDA kernels' arithmetic; on a
GPU against those kernels), is used by the fused LoRA layer
only where it serves, and is dropped with a warning where it would give other values."""

from __future__ import annotations

import pytest
from test_fused_lora import dequantized_three_times

# shapes: two nested scale blocks (300 blocks of 64), a last block cut short, an odd count of
# weights (a half-used last byte), several programs of the kernel
SHAPES = ((96, 200), (33, 70), (1, 4097), (512, 272))


def _triton_or_skip() -> None:
    pytest.importorskip("triton", reason="Triton is not installed (it comes with PyTorch's CUDA builds)")


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter on (the kernel runs on CPU tensors), the kernel built afresh before and
    after (it calls only Triton's builtins, which the interpreter runs even where another test
    imported Triton first)."""
    from qlora_sft.model import nf4_kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _triton_or_skip()
    nf4_kernel._kernel.cache_clear()
    yield nf4_kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    nf4_kernel._kernel.cache_clear()


def _quantized(shape, nested: bool, device: str = "cpu", seed: int = 0, storage=None):
    import bitsandbytes.functional as F
    import torch

    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.05
    w.view(-1)[7] = 4.0  # one large weight: its block's scale differs from the rest
    return F.quantize_4bit(
        w.to(device),
        quant_type="nf4",
        compress_statistics=nested,
        blocksize=64,
        quant_storage=storage or torch.uint8,
    )


def _reference(packed, state):
    """bitsandbytes' CUDA kernels' arithmetic in torch: each nested scale its 8-bit code times its
    block's scale, plus the offset (float32); each weight its NF4 code times its block's scale
    (float32), then rounded to the compute dtype; the high nibble first."""
    import torch

    scales = state.absmax
    if state.nested:
        inner = state.state2
        idx = torch.arange(scales.numel()) // inner.blocksize
        scales = inner.code[scales.long()] * inner.absmax[idx]
        scales = scales + state.offset
    n = 1
    for d in state.shape:
        n *= d
    b = packed.reshape(-1).long()
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    values = state.code[codes] * scales.float()[torch.arange(n) // state.blocksize]
    return values.to(state.dtype).reshape(state.shape)


def test_kernel_gives_bitsandbytes_values_under_the_interpreter(interpreted):
    import torch
    from bitsandbytes.functional import dequantize_4bit

    cases = 0
    for shape in SHAPES:
        for nested in (True, False):
            packed, state = _quantized(shape, nested)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                state.dtype = dtype
                assert interpreted.usable(packed, state)
                got = interpreted.dequantize_nf4(packed, state)
                assert got.dtype == dtype and got.shape == torch.Size(shape)
                want = _reference(packed, state)
                if dtype == torch.bfloat16:
                    # The interpreter truncates float32 to bf16 where a GPU rounds to nearest (the
                    # GPU test compares bf16 bit for bit); bitsandbytes' CPU functions round bf16
                    # otherwise again. So here: the float32 values, cut to bf16 either way.
                    state.dtype = torch.float32
                    exact = _reference(packed, state)
                    state.dtype = dtype
                    truncated = (exact.view(torch.int32) & -65536).view(torch.float32).to(dtype)
                    assert torch.equal(got, truncated) or torch.equal(got, want), (shape, nested)
                else:
                    assert torch.equal(got, want), (shape, nested, dtype)
                if shape == SHAPES[0] and dtype != torch.bfloat16:
                    # the reference reads bitsandbytes' layout as its own functions do (not for every
                    # shape: bitsandbytes 0.50's CPU dequantization of a nested (512, 272) weight is
                    # 0.14 off the weights where this kernel is 0.026 off)
                    assert torch.equal(got, dequantize_4bit(packed, state)), (shape, nested, dtype)
                cases += 1
    assert cases == len(SHAPES) * 6


def test_kernel_reads_the_bytes_of_another_quant_storage(interpreted):
    """bnb_4bit_quant_storage=bfloat16 (what FSDP shards): the packed bytes are the same, held in
    bf16 elements; the kernel reads them as bytes, as bitsandbytes does."""
    import torch

    packed, state = _quantized((96, 200), nested=True)
    packed16, state16 = _quantized((96, 200), nested=True, storage=torch.bfloat16)
    assert packed16.dtype == torch.bfloat16 and torch.equal(packed16.view(torch.uint8).reshape(-1), packed.reshape(-1))
    state.dtype = state16.dtype = torch.float32
    assert torch.equal(interpreted.dequantize_nf4(packed16, state16), interpreted.dequantize_nf4(packed, state))
    assert torch.equal(interpreted.dequantize_nf4(packed16, state16), _reference(packed, state))


def test_kernel_serves_only_nf4_with_triton_on_a_gpu_or_interpreted(monkeypatch):
    import bitsandbytes.functional as F
    import torch

    from qlora_sft.model import nf4_kernel

    packed, state = _quantized((16, 64), nested=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not nf4_kernel.usable(packed, state)  # a CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fp4, fp4_state = F.quantize_4bit(torch.randn(16, 64), quant_type="fp4")
    assert not nf4_kernel.usable(fp4, fp4_state)  # FP4: bitsandbytes' kernels serve


def test_switch_values_and_refusal():
    from qlora_sft.errors import UserError
    from qlora_sft.model import nf4_kernel

    assert nf4_kernel.triton_dequant({})
    assert nf4_kernel.triton_dequant({"QLORA_SFT_TRITON_DEQUANT": "1"})
    assert not nf4_kernel.triton_dequant({"QLORA_SFT_TRITON_DEQUANT": "0"})
    with pytest.raises(UserError, match="QLORA_SFT_TRITON_DEQUANT"):
        nf4_kernel.triton_dequant({"QLORA_SFT_TRITON_DEQUANT": "fast"})


def test_fused_layer_uses_the_kernel_and_drops_one_that_disagrees(interpreted, monkeypatch, caplog):
    """`fused_lora.dequantized` calls the kernel where it serves, compares it once per process with
    bitsandbytes' `dequantize_4bit`, and where the values differ (here a kernel made wrong) goes on
    with bitsandbytes' kernels and says so; the direct kernels keep their own check."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from qlora_sft.model import fused_lora

    torch.manual_seed(0)
    param = bnb.nn.Params4bit(torch.randn(64, 128) * 0.05, requires_grad=False, quant_type="nf4").to("cpu")
    want = dequantize_4bit(param.data, param.quant_state)
    calls = []
    real = interpreted.dequantize_nf4

    def counted(data, state):
        calls.append(1)
        return real(data, state)

    def wrong(data, state):
        calls.append(1)
        out = real(data, state)
        out.view(-1)[5] += 1.0  # one weight off: what a kernel of another bitsandbytes layout might give
        return out

    for kernel, stays in ((counted, True), (wrong, False)):
        monkeypatch.setattr(fused_lora, "_TRITON", True)
        monkeypatch.setattr(fused_lora, "_TRITON_CHECKED", False)
        monkeypatch.setattr(fused_lora, "_DIRECT", fused_lora._DIRECT)  # (put back after the test)
        monkeypatch.setattr(fused_lora, "_CHECKED", fused_lora._CHECKED)
        direct_before = fused_lora._DIRECT
        monkeypatch.setattr(interpreted, "dequantize_nf4", kernel)
        calls.clear()
        warned = dequantized_three_times(param, want, caplog, "Triton kernel")
        assert fused_lora._TRITON is stays and fused_lora._TRITON_CHECKED
        assert fused_lora._DIRECT is direct_before  # a failed Triton check leaves the direct kernels' own
        if stays:
            assert warned == [] and len(calls) == 3  # every call (the first one's values the checked ones)
        else:
            assert len(warned) == 1 and "other values" in warned[0] and len(calls) == 1  # then bitsandbytes


@pytest.mark.gpu
def test_kernel_gives_bitsandbytes_cuda_values_on_a_gpu():
    """Bit for bit bitsandbytes' CUDA `dequantize_4bit`, large and odd shapes, nested and plain
    scales, each compute dtype."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from qlora_sft.model import nf4_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _triton_or_skip()
    cases = 0
    for shape in (*SHAPES, (14336, 4096), (4096, 1024)):
        for nested in (True, False):
            packed, state = _quantized(shape, nested, device="cuda")
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                state.dtype = dtype
                assert nf4_kernel.usable(packed, state)
                got, want = nf4_kernel.dequantize_nf4(packed, state), dequantize_4bit(packed, state)
                assert got.dtype == want.dtype == dtype and got.shape == want.shape
                assert torch.equal(got, want), (shape, nested, dtype)
                cases += 1
    packed, state = _quantized((4096, 1024), nested=True, device="cuda", storage=torch.bfloat16)  # FSDP's storage
    assert torch.equal(nf4_kernel.dequantize_nf4(packed, state), dequantize_4bit(packed, state))
    assert cases == (len(SHAPES) + 2) * 6
