"""QLORA_SFT_LAYER_GRAPHS: the checkpointed decoder layers replayed from CUDA graphs train exactly as
the eager layers do (on a GPU: the same losses and gradients over steps whose optimizer updates the
adapters between replays, packed rows with other example boundaries each micro batch, gradients
accumulated over micro batches), and what cannot be replayed runs eagerly. On the CPU: the switch,
the padded boundaries (the same attention), the two call forms of transformers' checkpointing, what
keeps a layer eager, and which launches may use which graphs."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
import torch

from qlora_sft.model import layer_graphs


def test_switch_takes_off_forward_on_and_refuses_the_rest():
    from qlora_sft.errors import UserError

    assert layer_graphs.layer_graphs({}) == "off"
    for value in ("off", "forward", "on", " ON "):
        assert layer_graphs.layer_graphs({"QLORA_SFT_LAYER_GRAPHS": value}) == value.strip().lower()
    for bad in ("1", "yes", "backward"):
        with pytest.raises(UserError, match="QLORA_SFT_LAYER_GRAPHS"):
            layer_graphs.layer_graphs({"QLORA_SFT_LAYER_GRAPHS": bad})


@pytest.mark.parametrize(
    ("kind", "asked", "allowed"),
    [
        ("single_gpu", "on", "on"),
        ("single_gpu", "forward", "forward"),
        ("ddp", "on", "forward"),  # DDP reduces gradients in hooks the backward's graph would pass by
        ("ddp", "forward", "forward"),
        ("fsdp", "on", "off"),  # the weights are gathered into new memory for each call
        ("deepspeed", "on", "off"),
        ("cpu", "on", "off"),
        ("single_gpu", "off", "off"),
    ],
)
def test_launches_use_only_the_graphs_that_stay_true(monkeypatch, kind: str, asked: str, allowed: str):
    from types import SimpleNamespace

    from qlora_sft.train import layer_graphs_for

    monkeypatch.setenv("QLORA_SFT_LAYER_GRAPHS", asked)
    assert layer_graphs_for(SimpleNamespace(kind=kind)) == allowed


def test_padded_rows_and_boundaries_give_the_same_attention():
    """A row padded to a multiple of `ROW_GRANULE`: the padding is one more example, then empty ones;
    the per-example path (the kernel's contract) gives the real rows the same attention."""
    from qlora_sft.attention import _per_example_sdpa

    assert [layer_graphs.bucket(n) for n in (2, 16, 17, 65, 200)] == [16, 16, 32, 128, 256]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    padded = layer_graphs.padded_boundaries(cu, 8, 16)
    assert padded.tolist() == [0, 5, 6, 13, 16, 16, 16, 16] and padded.dtype == torch.int32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(13, 4, 8, generator=g) for _ in range(3))
    zeros = torch.zeros(3, 4, 8)
    out = _per_example_sdpa(*(torch.cat([t, zeros]) for t in (q, k, v)), padded, 0.3)
    torch.testing.assert_close(out[:13], _per_example_sdpa(q, k, v, cu, 0.3), rtol=0, atol=0)
    assert torch.isfinite(out).all()


def test_the_longest_example_a_graph_is_captured_for():
    """The recipe's data.max_length where the micro batch is within it, else a power of two (at
    least 128); never less than the padding example, never more than the padded row."""
    graphs = layer_graphs.LayerGraphs(torch.device("cpu"), backward=True, longest=300)
    assert graphs._longest(40, 5, 4096) == 300
    assert graphs._longest(301, 5, 4096) == 512  # beyond the recipe's: a power of two
    assert graphs._longest(40, 5, 256) == 256  # within the row
    unknown = layer_graphs.LayerGraphs(torch.device("cpu"), backward=True)
    assert unknown._longest(3, 5, 4096) == 128 and unknown._longest(1500, 5, 4096) == 2048
    assert unknown._longest(3, 127, 4096) == 128 and unknown._longest(3, 127, 120) == 120


def test_both_checkpoint_call_forms_name_the_layer():
    """transformers >= 5.2x checkpoints `partial(forward, layer, **kw)` (hooks outside); older ones
    `partial(layer.__call__, **kw)` (hooks inside, which a replay must run itself)."""
    layer = torch.nn.Linear(2, 2)
    newer = functools.partial(type(layer).forward, layer, bias=None)
    got = layer_graphs.layer_call(newer)
    assert got is not None and got[0] is layer and got[2] is False
    x = torch.ones(1, 2)
    assert torch.equal(got[1](x), layer(x))
    older = functools.partial(layer.__call__)
    got = layer_graphs.layer_call(older)
    assert got is not None and got[0] is layer and got[1] == layer.forward and got[2] is True
    assert layer_graphs.layer_call(lambda x: x) is None
    assert layer_graphs.layer_call(functools.partial(torch.add, torch.ones(1))) is None


def test_what_a_replay_would_skip_keeps_a_layer_eager():
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)).train()
    assert "dropout" in layer_graphs.layer_problem(layer, hooked=False)
    layer.eval()
    assert layer_graphs.layer_problem(layer, hooked=False) is None
    attn = torch.nn.Linear(2, 2).train()
    attn.attention_dropout = 0.1  # as transformers' attention modules keep it
    assert "attention" in layer_graphs.layer_problem(attn, hooked=False)
    plain = torch.nn.Linear(2, 2)
    handle = plain.register_forward_pre_hook(lambda m, a: None)
    assert "pre-hooks" in layer_graphs.layer_problem(plain, hooked=True)
    assert layer_graphs.layer_problem(plain, hooked=False) is None  # (newer: hooks run outside)
    handle.remove()
    plain.register_forward_pre_hook(layer_graphs.replay_safe(lambda m, a: None))
    assert layer_graphs.layer_problem(plain, hooked=True) is None
    plain.register_forward_hook(lambda m, a, o: None)
    assert "forward or backward hooks" in layer_graphs.layer_problem(plain, hooked=True)


def test_no_graphs_without_a_gpu(tiny_model: Path, monkeypatch):
    """On the CPU the switch changes nothing: the layers run eagerly."""
    from transformers import AutoModelForCausalLM

    from qlora_sft.model import offload

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert offload.offload_checkpointed_inputs(model, "on") == model.config.num_hidden_layers
        assert offload._GRAPHS is None
    finally:
        offload.offload_checkpointed_inputs(torch.nn.Module())


class _Rerun:
    """On the CPU, where nothing can be captured: a 'graph' whose replay runs its body again, on the
    static buffers, as a captured graph would run its kernels."""

    def __init__(self, body, autocast: dict, grad: bool) -> None:
        self.body, self.autocast, self.grad = body, autocast, grad

    def replay(self) -> None:
        autocast = torch.autocast("cpu", dtype=self.autocast["dtype"], enabled=self.autocast["enabled"])
        with torch.set_grad_enabled(self.grad), autocast:
            self.body()


class _CpuGraphs(layer_graphs.LayerGraphs):
    def _capture(self, layer, body, autocast, grad):
        self.counts["captures"] += 1
        return _Rerun(body, autocast, grad)


def _cpu_train(
    model_dir: Path, graphs: bool, splits: list[list[int]] | None = None
) -> tuple[list[float], list[dict[str, torch.Tensor]], dict[str, int]]:
    from transformers import AutoModelForCausalLM

    from qlora_sft import attention
    from qlora_sft.model import offload

    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="varlen")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    offload.offload_checkpointed_inputs(model)
    if graphs:
        offload._GRAPHS = _CpuGraphs(torch.device("cpu"), backward=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, applied = [], []
    splits = splits or SPLITS[:6]
    try:
        for step in range(len(splits) // 2):
            for micro in range(2):
                batch = _packed(model.config.vocab_size, splits[2 * step + micro], 10 * step + micro, "cpu")
                loss = model(**batch).loss
                (loss / 2).backward()
                losses.append(loss.item())
            applied.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counts = dict(offload._GRAPHS.counts) if graphs else {}
        if graphs:
            assert offload._GRAPHS.report()["pool_gib"] == 0
    finally:
        offload.offload_checkpointed_inputs(torch.nn.Module())
    return losses, applied, counts


def test_replays_read_fresh_inputs_and_weights_and_accumulate_gradients(tiny_model: Path):
    """The graphs' bookkeeping on the CPU (a replay runs its body again): every micro batch's input,
    its example boundaries (padded), the weights the optimizer changed, the output copied out before
    the next layer overwrites it, and the parameters' gradients added over two micro batches give
    the eager losses and gradients, every parameter trained (not only adapters)."""
    eager_losses, eager_grads, _ = _cpu_train(tiny_model, graphs=False)
    losses, grads, counts = _cpu_train(tiny_model, graphs=True)
    layers = 2
    # micro batch 1 eagerly, 2 captures (forward and backward per layer), 2-6 replay
    assert counts == {"forward": 5 * layers, "backward": 5 * layers, "captures": 2 * layers, "failures": 0}
    assert len(set(eager_losses)) == len(eager_losses)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(eager_grads, grads, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_longer_row_makes_a_longer_arena_and_captures_again(tiny_model: Path):
    """Rows of 64 tokens (padded to 128), then of 200 (256): the longer row replaces the buffers and
    drops the graphs on the old ones; both lengths train as eagerly."""
    splits = [[30, 34], [64], [150, 50], [200], [20, 180], [64, 136]]  # (longest examples: 129-256)
    eager_losses, eager_grads, _ = _cpu_train(tiny_model, graphs=False, splits=splits)
    losses, grads, counts = _cpu_train(tiny_model, graphs=True, splits=splits)
    # 128 rows: micro batch 1 eager, 2 captured; 256 rows: 3 eager, 4 captured, 5-6 replayed
    assert counts == {"forward": 2 * 4, "backward": 2 * 4, "captures": 2 * 2 * 2, "failures": 0}
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(eager_grads, grads, strict=True):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


# -- on a GPU ------------------------------------------------------------------------------------


def _nf4_varlen_model(model_dir: Path):
    """A tiny Llama as training loads it on a GPU: NF4 weights, bf16 compute, varlen attention,
    Liger's kernels where installed, the fused (grouped) LoRA layers, offloaded checkpointing."""
    from test_fused_lora import nf4_peft_model

    from qlora_sft import attention
    from qlora_sft.model import fused_lora
    from qlora_sft.model.load import apply_liger

    attention.register()

    def varlen_and_liger(base) -> None:
        base.set_attn_implementation("varlen")
        try:
            apply_liger(base)
        except ImportError:
            pass

    peft = nf4_peft_model(model_dir, device="cuda", dtype_name="bfloat16", on_base=varlen_and_liger)
    assert peft.config._attn_implementation == "varlen"
    assert fused_lora.fuse_lora_layers(peft) == 7 * peft.config.num_hidden_layers
    fused_lora.group_siblings(peft)
    peft.train()
    return peft


# rows of 49 to 64 tokens (one padded length), split into 1 to 8 examples
SPLITS = [[20, 12, 25], [64], [5, 7, 9, 11, 17], [1, 63], [30, 30], [8] * 8, [40, 24], [63, 1]]


def _packed(vocab: int, splits: list[int], seed: int, device: str = "cuda") -> dict[str, object]:
    """One padding-free row as TRL's collator gives it (its example boundaries differ per call)."""
    total = sum(splits)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, total), generator=g)
    positions = torch.cat([torch.arange(n) for n in splits]).unsqueeze(0)
    cu = torch.tensor([0, *itertools.accumulate(splits)], dtype=torch.int32)
    return {
        "input_ids": ids.to(device),
        "labels": ids.to(device),
        "position_ids": positions.to(device),
        "cu_seq_lens_q": cu.to(device),
        "cu_seq_lens_k": cu.to(device),
        "max_length_q": max(splits),
        "max_length_k": max(splits),
    }


def _train(model_dir: Path, graphs: str) -> tuple[list[float], list[dict[str, torch.Tensor]], dict[str, int]]:
    """Four steps of two micro batches each (the example boundaries differ in every one), AdamW on
    the adapters between steps: each step's losses and the gradients it applied."""
    from qlora_sft.model import offload

    peft = _nf4_varlen_model(model_dir)
    assert offload.offload_checkpointed_inputs(peft, graphs) == peft.config.num_hidden_layers
    assert (offload._GRAPHS is None) == (graphs == "off")
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses, grads = [], []
    try:
        for step in range(4):
            for micro in range(2):
                batch = _packed(peft.config.vocab_size, SPLITS[2 * step + micro], seed=10 * step + micro)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = peft(**batch).loss
                (loss / 2).backward()
                losses.append(loss.item())
            applied = {n: p.grad.detach().float().cpu().clone() for n, p in peft.named_parameters() if p.requires_grad}
            grads.append(applied)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counts = dict(offload._GRAPHS.counts) if offload._GRAPHS is not None else {}
    finally:
        offload.offload_checkpointed_inputs(torch.nn.Module())  # eager again for later tests
    return losses, grads, counts


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["forward", "on"])
def test_replayed_layers_train_as_the_eager_ones(tiny_model: Path, graphs: str):
    """The first micro batch runs eagerly, the second captures, the rest replay: losses and the
    applied gradients of every step equal the eager run's (the adapters the optimizer changed are
    read by the replays, which a graph with the weights copied or folded in would not do)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from qlora_sft.attention import available_on_cuda

    if not available_on_cuda():
        pytest.skip("this torch has no varlen attention kernel")
    eager_losses, eager_grads, _ = _train(tiny_model, "off")
    losses, grads, counts = _train(tiny_model, graphs)
    layers = 2  # tests/tiny.py's model
    assert counts["failures"] == 0, counts
    assert counts["forward"] == layers * 7, counts  # micro batch 1 eager, 2 captures, 2-8 replay
    assert counts["backward"] == (layers * 7 if graphs == "on" else 0), counts
    assert len(set(eager_losses)) == len(eager_losses)  # the steps changed the adapters
    assert losses == pytest.approx(eager_losses, rel=2e-3, abs=0)
    for step, (a, b) in enumerate(zip(eager_grads, grads, strict=True)):
        assert a.keys() == b.keys() and len(a) == 7 * 2 * layers
        for name in a:
            assert a[name].abs().max() > 0, (step, name)
            torch.testing.assert_close(b[name], a[name], rtol=2e-2, atol=2e-4, msg=f"step {step} {name}")
