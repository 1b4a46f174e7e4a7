"""The host's time to queue one call of each operation a decoder layer runs, on a CUDA GPU (issue 29).

A micro batch of 2 x 2048 tokens on an 8B Llama is host-bound on an H200: the GPU waits while
Python queues its ~7,500 kernels. This measures what each piece costs the host, apart from the
GPU's time: a spin kernel (`torch.cuda._sleep`) keeps the GPU busy while the host queues `--calls`
calls, so the host never waits for the GPU, and the host's wall time per call is what it costs.

    python -m bench.hostops [--tokens 4096] [--calls 20] [--repeats 7]

Prints one row per operation: the median host microseconds per call over the repeats (each repeat
queues `--calls` calls behind one spin kernel), and writes the table to --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def host_us(fn: Callable[[], Any], calls: int, repeats: int, spin_cycles: int) -> float:
    """Median host microseconds per call of `fn`, queued behind a spin kernel on the GPU. A case
    that runs under autocast (as the Trainer's forward and backward do) enters it once, outside."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=getattr(fn, "autocast", False)):
        return _host_us(fn, getattr(fn, "calls", calls), repeats, spin_cycles)


def _host_us(fn: Callable[[], Any], calls: int, repeats: int, spin_cycles: int) -> float:
    for _ in range(3):  # warm-up: Triton's compile, cuBLAS's handles, the allocator's blocks
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        torch.cuda._sleep(spin_cycles)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def cases(tokens: int, hidden: int, inter: int, heads: int, kv_heads: int) -> dict[str, Callable[[], Any]]:
    import bitsandbytes as bnb
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from qlora_sft.model import fused_lora

    dev, dt = torch.device("cuda"), torch.bfloat16
    head_dim = hidden // heads
    x = torch.randn(1, tokens, hidden, device=dev, dtype=dt, requires_grad=True)
    gx = torch.randn_like(x)
    out: dict[str, Callable[[], Any]] = {}

    def fwd_bwd(module_or_fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor, grad: torch.Tensor):
        def run() -> None:
            y = module_or_fn(inp)
            y.backward(grad)

        return run

    def fwd(module_or_fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor):
        def run() -> None:
            with torch.no_grad():
                module_or_fn(inp)

        return run

    hf_norm = LlamaRMSNorm(hidden).to(dev, dt)
    out["rmsnorm hf fwd"] = fwd(hf_norm, x)
    out["rmsnorm hf fwd+bwd"] = fwd_bwd(hf_norm, x, gx)
    w = torch.nn.Parameter(torch.ones(hidden, device=dev, dtype=dt))
    out["rmsnorm torch F.rms_norm fwd"] = fwd(lambda t: torch.nn.functional.rms_norm(t, (hidden,), w, 1e-5), x)
    out["rmsnorm torch F.rms_norm fwd+bwd"] = fwd_bwd(
        lambda t: torch.nn.functional.rms_norm(t, (hidden,), w, 1e-5), x, gx
    )
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.swiglu import LigerSiLUMulFunction
    except ImportError:
        print("liger-kernel not installed: its rows are left out", file=sys.stderr)
        LigerRMSNorm = LigerSiLUMulFunction = None
    from qlora_sft.hostwork import _rms_norm

    norm = LlamaRMSNorm(hidden).to(dev, dt)
    norm.forward = _rms_norm.__get__(norm)  # what hostwork.torch_rms_norms gives Liger's llama-cast norms
    out["rmsnorm qlora_sft (torch fused, then weight) fwd"] = fwd(norm, x)
    out["rmsnorm qlora_sft (torch fused, then weight) fwd+bwd"] = fwd_bwd(norm, x, gx)
    if LigerRMSNorm is not None:
        lnorm = LigerRMSNorm(hidden).to(dev, dt)
        out["rmsnorm liger fwd"] = fwd(lnorm, x)
        out["rmsnorm liger fwd+bwd"] = fwd_bwd(lnorm, x, gx)

    gate = torch.randn(1, tokens, inter, device=dev, dtype=dt, requires_grad=True)
    up = torch.randn(1, tokens, inter, device=dev, dtype=dt, requires_grad=True)
    gg = torch.randn_like(gate)
    out["swiglu torch silu*up fwd+bwd"] = fwd_bwd(lambda g: torch.nn.functional.silu(g) * up, gate, gg)
    if LigerSiLUMulFunction is not None:
        out["swiglu liger fwd+bwd"] = fwd_bwd(lambda g: LigerSiLUMulFunction.apply(g, up), gate, gg)

    q = torch.randn(1, heads, tokens, head_dim, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, kv_heads, tokens, head_dim, device=dev, dtype=dt, requires_grad=True)
    cos = torch.randn(1, tokens, head_dim, device=dev, dtype=dt)
    sin = torch.randn(1, tokens, head_dim, device=dev, dtype=dt)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def rope(apply: Callable[..., Any]) -> Callable[[], None]:
        def run() -> None:
            qq, kk = apply(q, k, cos, sin)
            torch.autograd.backward([qq, kk], [gq, gk])

        return run

    out["rope hf fwd+bwd"] = rope(apply_rotary_pos_emb)
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        out["rope liger fwd+bwd"] = rope(liger_rotary_pos_emb)
    except ImportError:
        pass

    # one 4-bit layer (NF4, double quantization, bf16 compute) and its LoRA pair, as the default path runs it
    lin = bnb.nn.Linear4bit(hidden, hidden, bias=False, compute_dtype=dt, quant_type="nf4", compress_statistics=True)
    lin = lin.to(dev)
    rank = 16
    a = torch.nn.Parameter(torch.randn(rank, hidden, device=dev, dtype=torch.float32) * 0.01)
    b = torch.nn.Parameter(torch.zeros(hidden, rank, device=dev, dtype=torch.float32))

    def lora_fwd_bwd() -> None:
        fused_lora.FusedLoraMatmul.apply(x, a, b, lin, 2.0).backward(gx)

    def lora_fwd() -> None:
        with torch.no_grad():
            fused_lora.FusedLoraMatmul.apply(x, a, b, lin, 2.0)

    lora_fwd.autocast = lora_fwd_bwd.autocast = True  # type: ignore[attr-defined]

    out["fused lora 4096x4096 fwd (no grad)"] = lora_fwd
    out["fused lora 4096x4096 fwd+bwd"] = lora_fwd_bwd
    # a q/k/v projection set (three 4096x4096 layers here, the same host work as 8B's q/k/v but for
    # the two GEMMs' sizes): three fused layers alone, and the three as one group (GroupedLoraMatmul)
    bases = (lin, lin, lin)
    abs_ = (a, b) * 3

    def three_alone() -> None:
        outs = [fused_lora.FusedLoraMatmul.apply(x, a, b, lin, 2.0) for _ in range(3)]
        torch.autograd.backward(outs, [gx] * 3)

    def three_grouped() -> None:
        outs = fused_lora.GroupedLoraMatmul.apply(x, bases, (2.0,) * 3, *abs_)
        torch.autograd.backward(outs, [gx] * 3)

    three_alone.autocast = three_grouped.autocast = True  # type: ignore[attr-defined]
    # fewer calls per repeat: CUDA's queue of pending launches (about a thousand) must not fill, or
    # the host waits for the GPU (2026-12-03: 20 calls of ~60 kernels did, and measured the GPU)
    three_alone.calls = three_grouped.calls = 5  # type: ignore[attr-defined]
    out["3 fused lora layers alone fwd+bwd"] = three_alone
    out["3 fused lora layers grouped fwd+bwd"] = three_grouped
    out["dequantized (qlora_sft, direct kernels)"] = lambda: fused_lora.dequantized(lin.weight)
    weight = lin.weight
    out["bitsandbytes dequantize_4bit"] = lambda: bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    e = torch.randn(tokens, hidden, device=dev, dtype=dt)
    out["one aten op (add)"] = lambda: e.add(e)
    out["one empty"] = lambda: torch.empty(tokens, hidden, device=dev, dtype=dt)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per micro batch (2 x 2048)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--spin-cycles", type=int, default=400_000_000, help="the spin kernel's length (cycles)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.hostops needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = {}
    for name, fn in cases(args.tokens, args.hidden, args.intermediate, args.heads, args.kv_heads).items():
        rows[name] = round(host_us(fn, args.calls, args.repeats, args.spin_cycles), 1)
        print(f"{name:45s} {rows[name]:9.1f} us per call on the host")
    if args.out:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens}
        args.out.write_text(json.dumps({"meta": meta, "host_us_per_call": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
