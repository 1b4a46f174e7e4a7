"""`train.offload_activations`: a checkpointed layer whose input waits in host memory gives the
same gradients as transformers' own checkpointing (LoRA dropout included, so the recompute must
replay the forward's random numbers), and training under DDP is unchanged by it.
`model.embedding_in_host_memory`: the input embedding table in host memory gives the same losses and
gradients, in one process and under DDP, and is refused where it cannot work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest


def lora_grads(
    model_dir: Path,
    offload: bool,
    device: str = "cpu",
    host_embedding: bool = False,
    host_head: bool = False,
    fused_head: bool = False,
) -> tuple[list[float], dict[str, object]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_sft import model as model_mod
    from qlora_sft.model.offload import (
        HostEmbedding,
        HostHead,
        embedding_in_host_memory,
        host_head_hooks,
        lm_head_in_host_memory,
    )

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if host_embedding:  # as load_model does: before checkpointing marks the embedding's output
        table = base.get_input_embeddings().weight.numel() * 4
        assert embedding_in_host_memory(base)[1] == table
        emb = base.get_input_embeddings()
        assert isinstance(emb, HostEmbedding) and emb.weight.device.type == "cpu" and not emb.weight.requires_grad
        assert not emb.weight.is_pinned()  # the table is never copied; only each batch's rows are pinned
    if host_head:
        assert lm_head_in_host_memory(base)[1] == base.config.vocab_size * base.config.hidden_size * 4
    if fused_head:  # trl's SFTTrainer computes the loss so, reading lm_head.weight itself
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear"))
    peft.to(device)  # as transformers' Trainer may: the host table must stay where it is
    if host_embedding:
        assert peft.get_input_embeddings().weight.device.type == "cpu"
    head = host_head_hooks(peft)
    assert isinstance(head, HostHead) == host_head
    if head is not None:
        assert head._parameters["weight"].device.type == "cpu" and head.weight.device.type == "cpu"
        assert head._parameters["weight"].is_pinned() == (device == "cuda")
        staged_by_last_layer = []  # the copy is started before the last layer runs, to overlap it
        last = base.model.layers[-1]
        last.register_forward_pre_hook(lambda *_: staged_by_last_layer.append(head.staged is not None))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave A without gradient
    peft.train()
    if offload:
        assert model_mod.offload_checkpointed_inputs(peft) == base.config.num_hidden_layers
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(123)  # the same dropout masks in both runs
    losses = []
    for _ in range(2):  # a second step: the first layer's input is not taken for the last one's
        if head is not None:
            staged_by_last_layer.clear()  # (a recompute in the backward may run the layer's hooks)
        if fused_head:
            loss = peft(input_ids=ids, labels=ids, fused_lm_head=True).loss
        else:
            loss = peft(input_ids=ids, labels=ids).loss
        if head is not None:  # the forward is over: the head holds no copy for the compute device
            assert not head.armed and head.staged is None
            assert staged_by_last_layer == [True], staged_by_last_layer
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.cpu().clone() for n, p in peft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offloaded_checkpoint_gives_the_same_gradients(tiny_model: Path, device: str):
    """On CUDA the copies run on a side stream and the backward prefetches the next layer's input."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    loss_a, a = lora_grads(tiny_model, offload=False, device=device)
    loss_b, b = lora_grads(tiny_model, offload=True, device=device)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert a[name].abs().max() > 0, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offload_without_prefetch_fetches_each_input_for_its_own_layer(
    tiny_model: Path, device: str, monkeypatch: pytest.MonkeyPatch
):
    """QLORA_SFT_OFFLOAD_PREFETCH=0 (a benchmark switch): no layer input comes back before its own
    layer's backward takes it, and the gradients are the same as with the prefetch."""
    import torch

    from qlora_sft.model import offload

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    early: list[bool] = []  # per fetch that did copy: was it outside the layer's own `take`?
    taking: list[bool] = [False]
    fetch, take = offload.HeldInput.fetch, offload.HeldInput.take

    def spy_fetch(self: offload.HeldInput) -> None:
        if self.gpu is None and self.host is not None:
            early.append(not taking[0])
        fetch(self)

    def spy_take(self: offload.HeldInput) -> torch.Tensor:
        taking[0] = True
        try:
            return take(self)
        finally:
            taking[0] = False

    monkeypatch.setattr(offload.HeldInput, "fetch", spy_fetch)
    monkeypatch.setattr(offload.HeldInput, "take", spy_take)
    import json

    n = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert n >= 2
    loss_a, a = lora_grads(tiny_model, offload=True, device=device)  # two steps
    assert len(early) == 2 * n and early.count(True) == 2 * (n - 1), early  # prefetched: all but the top layer's
    early.clear()
    monkeypatch.setenv(offload.OFFLOAD_PREFETCH_ENV, "0")
    loss_b, b = lora_grads(tiny_model, offload=True, device=device)
    assert early == [False] * (2 * n)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    monkeypatch.delenv(offload.OFFLOAD_PREFETCH_ENV)
    offload.offload_checkpointed_inputs(torch.nn.Module())  # the default back for later tests
    assert offload._PREFETCH


def test_head_tile_switch_gives_the_same_gradients(tiny_model: Path, monkeypatch: pytest.MonkeyPatch):
    """QLORA_SFT_HEAD_TILE (a benchmark switch) sets the vocabulary width of trl's fused head's
    tiles: several narrow tiles give the same losses and gradients as trl's one wide one."""
    import json

    import torch
    from trl.trainer import utils as trl_utils

    from qlora_sft.model import offload

    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    loss_a, a = lora_grads(tiny_model, offload=True, fused_head=True)
    monkeypatch.setenv(offload.HEAD_TILE_ENV, "256")
    assert offload.apply_head_tile() == 256 and trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 256
    calls: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(*args: object) -> object:
        calls.append(args[5])  # the chunk size trl passes
        return apply(*args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    loss_b, b = lora_grads(tiny_model, offload=True, fused_head=True)
    assert calls == [256, 256]  # two steps
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert vocab > 256, vocab  # more than one tile
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_benchmark_switches_refuse_what_they_cannot_mean(monkeypatch: pytest.MonkeyPatch):
    from qlora_sft.errors import UserError
    from qlora_sft.model import offload

    assert offload.prefetch_offloaded_inputs({}) and offload.head_tile({}) is None
    assert not offload.prefetch_offloaded_inputs({offload.OFFLOAD_PREFETCH_ENV: "0"})
    assert not offload.prefetch_offloaded_inputs({offload.OFFLOAD_PREFETCH_ENV: " No "})  # as every switch reads
    assert offload.prefetch_offloaded_inputs({offload.OFFLOAD_PREFETCH_ENV: "1"})
    assert offload.head_tile({offload.HEAD_TILE_ENV: " 8192 "}) == 8192
    for raw in ("2", "-1", "0.5", "off", "nan"):
        with pytest.raises(UserError, match=f"{offload.OFFLOAD_PREFETCH_ENV}=.*use 1 \\(on\\) or 0 \\(off\\)"):
            offload.prefetch_offloaded_inputs({offload.OFFLOAD_PREFETCH_ENV: raw})
    for raw in ("0", "-8192", "8k", "nan", "inf", "100", str(1 << 21), "1e4"):
        with pytest.raises(UserError, match=f"{offload.HEAD_TILE_ENV}=.*whole number.*unset it"):
            offload.head_tile({offload.HEAD_TILE_ENV: raw})
    assert offload.head_lead({}) == offload.HostHead.LEAD == 8
    assert offload.head_lead({offload.HEAD_LEAD_ENV: " 8 "}) == 8
    for raw in ("0", "-1", "2.5", "all", "nan", "inf", "5000"):
        with pytest.raises(UserError, match=f"{offload.HEAD_LEAD_ENV}=.*whole number.*unset it"):
            offload.head_lead({offload.HEAD_LEAD_ENV: raw})


@pytest.mark.parametrize("lead", [None, "1", "3", "99"])
def test_host_head_copy_starts_its_lead_of_layers_before_the_end(lead: str | None, monkeypatch: pytest.MonkeyPatch):
    """The head in host memory is fetched as the forward of the `QLORA_SFT_HEAD_LEAD`-th decoder layer
    from the end begins (`HostHead.LEAD` unset; a lead past the first layer starts at the first)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_sft.model import offload

    if lead is not None:
        monkeypatch.setenv(offload.HEAD_LEAD_ENV, lead)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    offload.lm_head_in_host_memory(model)
    head = offload.host_head_hooks(model)
    assert head is not None
    fetched: list[bool] = []
    for layer in model.model.layers:  # (after the head's hook: this sees what it did)
        layer.register_forward_pre_hook(lambda module, args: fetched.append(head.staged is not None))
    model(input_ids=torch.tensor([[1, 2, 3]]))
    first = max(0, 4 - int(lead or offload.HostHead.LEAD))
    assert fetched == [i >= first for i in range(4)], fetched
    assert head.staged is None  # released when the forward returned


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_embedding_in_host_memory_gives_the_same_gradients(tiny_model: Path, device: str):
    """The table on the host, the batch's rows copied to the compute device: the same losses and
    LoRA gradients as the embedding on the device (with activation offloading too)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    loss_a, a = lora_grads(tiny_model, offload=True, device=device)
    loss_b, b = lora_grads(tiny_model, offload=True, device=device, host_embedding=True)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("fused_head", [False, True], ids=["module", "trl-fused"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_lm_head_in_host_memory_gives_the_same_gradients(tiny_model: Path, device: str, fused_head: bool):
    """The output head in host memory, copied for each forward's loss: the same losses and LoRA
    gradients as the head on the device, through the head's module (transformers' loss) and through
    trl's fused head, which reads `lm_head.weight` itself (with the embedding in host memory too)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    loss_a, a = lora_grads(tiny_model, offload=True, device=device, fused_head=fused_head)
    loss_b, b = lora_grads(tiny_model, offload=True, device=device, host_head=True, fused_head=fused_head)
    loss_c, c = lora_grads(
        tiny_model, offload=True, device=device, host_head=True, host_embedding=True, fused_head=fused_head
    )
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and loss_a == pytest.approx(loss_c, rel=1e-6)
    assert a.keys() == b.keys() == c.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(a[name], c[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
def test_lm_head_in_host_memory_leaves_the_gpu_after_the_loss(tmp_path: Path):
    """On a GPU the head reaches it for the loss and is gone again once the loss's backward has used
    it: after a step the GPU holds what it held before (the adapters' gradients aside), and during
    the decoder layers' backward it holds no copy of the head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from qlora_sft.model.offload import host_head_hooks, lm_head_in_host_memory

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = LlamaConfig(
        vocab_size=65536, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    head_bytes = config.vocab_size * config.hidden_size * 2
    moved = torch.cuda.memory_allocated()
    assert lm_head_in_host_memory(base)[1] == head_bytes
    torch.cuda.empty_cache()
    assert moved - torch.cuda.memory_allocated() >= head_bytes  # the GPU's copy is gone
    add_fused_lm_head(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    host_head_hooks(peft)
    during = []
    first = base.model.layers[0]  # its backward is the decoder's last
    first.register_full_backward_hook(lambda *_: during.append(torch.cuda.memory_allocated()))
    ids = torch.randint(3, config.vocab_size, (1, 512), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = peft(input_ids=ids, labels=ids, fused_lm_head=True).loss
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert torch.cuda.max_memory_allocated() - before >= head_bytes  # it was on the GPU for the loss
    assert during and during[0] - before < head_bytes / 2  # not during the decoder's backward
    del loss
    grads = sum(p.grad.numel() * p.grad.element_size() for p in peft.parameters() if p.grad is not None)
    assert torch.cuda.memory_allocated() - before <= grads + 2**20


@pytest.mark.gpu
def test_a_host_head_cast_after_it_moved_is_pinned_again():
    """model.upcast_frozen: peft's prepare_model_for_kbit_training casts the host table to fp32 in
    pageable memory after it moved; wiring the head pins it again, so each copy to the GPU stays
    asynchronous (from pageable memory the host would wait for every copy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_sft.model.offload import host_head_hooks, lm_head_in_host_memory

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lm_head_in_host_memory(model)
    table = model.get_output_embeddings()._parameters["weight"]
    assert table.is_pinned() and table.dtype == torch.bfloat16
    table.data = table.data.to(torch.float32)  # as prepare_model_for_kbit_training's upcast does
    assert not table.is_pinned()
    head = host_head_hooks(model)
    assert table.is_pinned() and table.dtype == torch.float32
    head.arm()  # as a forward of the model does: the copy on the GPU, from the pinned table
    copy = head.weight
    assert copy.is_cuda and torch.equal(copy.cpu(), table.detach())
    head.release()


def test_host_embedding_table_stays_on_the_host_when_the_model_moves():
    """Whatever moves or casts the model (transformers' Trainer moves a PeftModel to the GPU when it
    does not see the quantization through it) leaves the table in host memory: a move to the meta
    device stands in for the GPU here."""
    import torch

    from qlora_sft.model.offload import HostEmbedding

    emb = torch.nn.Embedding(10, 4)
    host = HostEmbedding(emb)
    model = torch.nn.Sequential(host, torch.nn.Linear(4, 4))
    model.to("meta")
    assert host.weight.device.type == "cpu" and model[1].weight.device.type == "meta"
    torch.testing.assert_close(host.weight, emb.weight.detach())
    rows = host(torch.tensor([[1, 3]]))
    torch.testing.assert_close(rows[0], emb.weight.detach()[[1, 3]])


def test_embedding_in_host_memory_refusals(tiny_model: Path, tmp_path: Path):
    """Refused, naming the key, where it cannot work: sharded or DeepSpeed launches, unquantized
    models (the Trainer moves those to the GPU whole), tied embeddings (read from config.json before
    any weight loads)."""
    import json

    from helpers import MINIMAL_RECIPE
    from helpers import two_rank_mode as mode

    from qlora_sft import launch
    from qlora_sft.errors import UserError
    from qlora_sft.model.load import check_untied_embeddings
    from qlora_sft.recipe import build_recipe

    on = build_recipe({**MINIMAL_RECIPE, "model": {**MINIMAL_RECIPE["model"], "embedding_in_host_memory": True}})
    assert launch.check_launch_compat(on, mode("ddp")) == []
    for kind, zero in (("fsdp", 0), ("deepspeed", 2), ("deepspeed", 3)):
        (problem,) = [p for p in launch.check_launch_compat(on, mode(kind, zero=zero)) if "embedding_in_host" in p]
        assert "`model.embedding_in_host_memory` is true" in problem and "Remove it" in problem
    plain = dataclasses.replace(on, quantization=dataclasses.replace(on.quantization, method="none"))
    assert any("unquantized model" in p for p in launch.check_launch_compat(plain, mode("ddp")))
    # settings that would move the table back to the GPU, silently, or train it
    low = dataclasses.replace(on, model=dataclasses.replace(on.model, loader="low_memory"))
    assert any("model.loader is low_memory" in p for p in launch.check_launch_compat(low, mode("ddp")))
    full_eval = build_recipe({**MINIMAL_RECIPE, "model": on.to_dict()["model"], "train": {"bf16_full_eval": True}})
    assert any("train.bf16_full_eval" in p for p in launch.check_launch_compat(full_eval, mode("single_gpu")))
    saved = dataclasses.replace(on, lora=dataclasses.replace(on.lora, modules_to_save=["embed_tokens"]))
    assert any("the embedding is trained" in p for p in launch.check_launch_compat(saved, mode("ddp")))
    untied = dataclasses.replace(on, model=dataclasses.replace(on.model, name_or_path=str(tiny_model)))
    check_untied_embeddings(untied, None, "model.embedding_in_host_memory")  # not tied in the tiny model
    tied = tmp_path / "tied"
    tied.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    # plan: the table leaves the GPU's estimate (untied: vocabulary x hidden x 2 bytes)
    from qlora_sft.plan import GIB, ModelShape, estimate_memory

    shape = ModelShape.from_config(config)
    off = dataclasses.replace(untied, model=dataclasses.replace(untied.model, embedding_in_host_memory=False))
    saved = estimate_memory(shape, off, mode("ddp")).total - estimate_memory(shape, untied, mode("ddp")).total
    assert saved == pytest.approx(config["vocab_size"] * config["hidden_size"] * 2 / GIB)
    # an embedding subclass may compute more than a lookup (Gemma scales its rows): left on the GPU
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_sft.model.offload import embedding_in_host_memory

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 2.0

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    old = model.get_input_embeddings()
    model.set_input_embeddings(ScaledEmbedding(old.num_embeddings, old.embedding_dim, _weight=old.weight.detach()))
    with pytest.raises(UserError, match="not a plain torch Embedding"):
        embedding_in_host_memory(model)
    with pytest.raises(UserError, match="ties its input embedding to its output head"):
        check_untied_embeddings(
            dataclasses.replace(on, model=dataclasses.replace(on.model, name_or_path=str(tied))),
            None,
            "model.embedding_in_host_memory",
        )


def test_lm_head_in_host_memory_refusals(tiny_model: Path):
    """Refused, naming the key, where it cannot work: sharded or DeepSpeed launches, a trained head,
    a head that is not a plain bias-free Linear, a head tied to the embedding; plan takes the head off
    the decoder's backward but counts it while the loss runs."""
    import json

    import torch
    from helpers import MINIMAL_RECIPE
    from helpers import two_rank_mode as mode
    from transformers import AutoModelForCausalLM

    from qlora_sft import launch
    from qlora_sft.errors import UserError
    from qlora_sft.model.offload import lm_head_in_host_memory
    from qlora_sft.plan import ModelShape, estimate_memory
    from qlora_sft.recipe import build_recipe

    on = build_recipe({**MINIMAL_RECIPE, "model": {**MINIMAL_RECIPE["model"], "lm_head_in_host_memory": True}})
    assert launch.check_launch_compat(on, mode("ddp")) == []
    for kind, zero in (("fsdp", 0), ("deepspeed", 3)):
        (problem,) = launch.check_launch_compat(on, mode(kind, zero=zero))
        assert "`model.lm_head_in_host_memory` is true" in problem and "Remove it" in problem
    saved = dataclasses.replace(on, lora=dataclasses.replace(on.lora, modules_to_save=["lm_head"]))
    (problem,) = launch.check_launch_compat(saved, mode("ddp"))
    assert "the output head is trained" in problem
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    model.set_output_embeddings(biased)
    with pytest.raises(UserError, match="model.lm_head_in_host_memory: .* a torch Linear with a bias"):
        lm_head_in_host_memory(model)
    model.set_output_embeddings(model.get_input_embeddings())  # tied: one table for both
    with pytest.raises(UserError, match="tied"):
        lm_head_in_host_memory(model)
    # plan: 8B Llama shape, 4 x 2048 tokens, one GPU: the head (1 GiB) leaves the decoder's backward,
    # and the loss's phase (head, a layer's forward) is counted where it is the larger
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256,
    )  # fmt: skip
    shape = ModelShape.from_config(config)
    rows = {"data": {**MINIMAL_RECIPE.get("data", {}), "max_length": 2048}}
    model_off = {**MINIMAL_RECIPE["model"], "embedding_in_host_memory": False, "lm_head_in_host_memory": False}
    off = build_recipe({**MINIMAL_RECIPE, **rows, "model": model_off, "train": {"per_device_train_batch_size": 4}})
    with_head = dataclasses.replace(off, model=dataclasses.replace(off.model, lm_head_in_host_memory=True))
    a, b = estimate_memory(shape, off, mode("single_gpu")), estimate_memory(shape, with_head, mode("single_gpu"))
    loss_phase = b.parts["lm_head while the loss runs (from host memory)"]
    assert 0 < loss_phase < 1.0 and a.total - b.total == pytest.approx(128256 * 4096 * 2 / 2**30 - loss_phase)


def test_host_tables_auto_is_on_for_one_gpu_where_memory_is_short(tiny_model: Path, tmp_path: Path, caplog):
    """`auto` (the default) keeps both frozen tables in host memory on one GPU where plan's estimate
    with them on the GPU passes 75% of what the GPU offers (they cost 0-5% of the tokens/s on an H200
    for 1.7 GiB at 8B), and is off, without a refusal, where memory is ample, wherever `true` would be
    refused, under DDP (measured on CPU ranks only), on the CPU, and for a model whose tables are tied
    or not plain layers, which the log says. plan reports what auto resolved to."""
    import json
    import logging

    import torch
    from helpers import MINIMAL_RECIPE
    from helpers import two_rank_mode as mode
    from transformers import AutoModelForCausalLM

    from qlora_sft import launch
    from qlora_sft.errors import UserError
    from qlora_sft.model.load import host_table_keys, tables_to_host
    from qlora_sft.plan import ModelShape, estimate_memory, host_tables_lines, resolve_host_tables
    from qlora_sft.recipe import build_recipe

    keys = ("embedding_in_host_memory", "lm_head_in_host_memory")
    one_gpu = launch.LaunchMode(kind="single_gpu", world_size=1)
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    )  # fmt: skip
    eight_b = ModelShape.from_config(config)  # 8B at 4 x 2048 tokens: 7.25 GiB with the tables on the GPU
    model = {**MINIMAL_RECIPE["model"], "name_or_path": str(tiny_model)}
    data = {**MINIMAL_RECIPE.get("data", {}), "max_length": 2048}
    auto = build_recipe({**MINIMAL_RECIPE, "model": model, "data": data, "train": {"per_device_train_batch_size": 4}})
    assert auto.model.embedding_in_host_memory == auto.model.lm_head_in_host_memory == "auto"

    def on(recipe, launch_mode, gpu_gib, shape=eight_b) -> list[bool]:
        resolved = resolve_host_tables(recipe, launch_mode, shape, gpu_gib)
        return [getattr(resolved.model, k) for k in keys]

    assert on(auto, one_gpu, 8.0) == [True, True]  # an 8 GiB card: 7.25 GiB would not leave room
    # plan's largest micro batch resolves auto at each micro batch, as a launch with it would: on a 24 GiB
    # card 4 x 2048 keeps the tables on the GPU, the largest micro batch that fits moves them to host memory
    from qlora_sft.plan import largest_micro_batch

    largest = largest_micro_batch(eight_b, auto, one_gpu, 24.0)
    gpu_tables = dataclasses.replace(auto, model=dataclasses.replace(auto.model, **dict.fromkeys(keys, False)))
    assert largest > largest_micro_batch(eight_b, gpu_tables, one_gpu, 24.0) > 4
    assert on(auto, one_gpu, 24.0) == [False, False]  # a 24 GiB card: full speed
    assert on(auto, one_gpu, None) == [False, False]  # no GPU known: off
    eight = estimate_memory(eight_b, resolve_host_tables(auto, one_gpu, eight_b, 8.0), one_gpu).total
    assert eight < 6.0 < estimate_memory(eight_b, resolve_host_tables(auto, one_gpu, eight_b, 24.0), one_gpu).total
    for other in (mode("cpu"), mode("ddp"), mode("fsdp"), mode("deepspeed", zero=3)):
        assert on(auto, other, 8.0) == [False, False], other.kind
        assert not [p for p in launch.check_launch_compat(auto, other) if "host_memory" in p]
    tied = ModelShape.from_config({**config, "tie_word_embeddings": True})
    assert on(auto, one_gpu, 8.0, tied) == [False, False]
    plain = dataclasses.replace(auto, quantization=dataclasses.replace(auto.quantization, method="none"))
    low = dataclasses.replace(auto, model=dataclasses.replace(auto.model, loader="low_memory"))
    assert on(plain, one_gpu, 8.0) == on(low, one_gpu, 8.0) == [False, False]
    head_trained = dataclasses.replace(auto, lora=dataclasses.replace(auto.lora, modules_to_save=["lm_head"]))
    assert on(head_trained, one_gpu, 8.0) == [True, False]
    # one lora.target_modules pattern that matches a table: plan keeps it on the GPU, as the load does
    for pattern, expected in ((r".*(q_proj|lm_head)", [True, False]), (r".*(embed_tokens|v_proj)", [False, True])):
        matched = dataclasses.replace(auto, lora=dataclasses.replace(auto.lora, target_modules=pattern))
        assert on(matched, one_gpu, 8.0) == expected, pattern
    other_pattern = dataclasses.replace(auto, lora=dataclasses.replace(auto.lora, target_modules=r".*_proj"))
    assert on(other_pattern, one_gpu, 8.0) == [True, True]
    (line,) = host_tables_lines(auto, resolve_host_tables(head_trained, one_gpu, eight_b, 8.0), one_gpu, 8.0)
    assert "auto: model.embedding_in_host_memory in host memory on a 8 GiB GPU" in line, line  # only the one on
    neox_head = dataclasses.replace(auto, lora=dataclasses.replace(auto.lora, modules_to_save=["embed_out"]))
    assert on(neox_head, one_gpu, 8.0) == [True, False]  # GPT-NeoX's head, not its embedding
    both = dataclasses.replace(auto, model=dataclasses.replace(auto.model, **dict.fromkeys(keys, True)))
    assert on(both, mode("ddp"), None) == [True, True]  # true: DDP too, whatever the GPU
    assert [launch.keeps_in_host_memory(both, k) for k in keys] == [True, True]
    # plan says what auto resolved to
    (line,) = host_tables_lines(auto, resolve_host_tables(auto, one_gpu, eight_b, 8.0), one_gpu, 8.0)
    assert "in host memory on a 8 GiB GPU" in line
    (line,) = host_tables_lines(auto, resolve_host_tables(auto, one_gpu, eight_b, 24.0), one_gpu, 24.0)
    assert "on the GPU on a 24 GiB GPU" in line
    # at the load: no CUDA here, so auto stays off; true needs untied tables (config.json), refused
    assert host_table_keys(auto, one_gpu, None) == []
    assert host_table_keys(both, one_gpu, None) == list(keys)
    tied_dir = tmp_path / "tied"
    tied_dir.mkdir()
    tiny_config = json.loads((tiny_model / "config.json").read_text())
    (tied_dir / "config.json").write_text(json.dumps({**tiny_config, "tie_word_embeddings": True}))
    both_tied = dataclasses.replace(both, model=dataclasses.replace(both.model, name_or_path=str(tied_dir)))
    with pytest.raises(UserError, match="model.embedding_in_host_memory is true, but .* ties"):
        host_table_keys(both_tied, one_gpu, None)
    # the model's layers: under auto an embedding that computes more than a lookup stays on the GPU

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 2.0

    def scaled_model():
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        old = model.get_input_embeddings()
        model.set_input_embeddings(ScaledEmbedding(old.num_embeddings, old.embedding_dim, _weight=old.weight.detach()))
        return model

    with caplog.at_level(logging.INFO, logger="qlora_sft"):
        assert tables_to_host(scaled_model(), auto, list(keys)) == ["lm_head.weight"]
    assert "embedding_in_host_memory (auto): off: this model's input embedding is a ScaledEmbedding" in caplog.text
    with pytest.raises(UserError, match="not a plain torch Embedding"):
        tables_to_host(scaled_model(), both, list(keys))


def test_offload_resolution_and_refusals():
    from helpers import MINIMAL_RECIPE
    from helpers import two_rank_mode as mode

    from qlora_sft import launch
    from qlora_sft.recipe import build_recipe

    base = MINIMAL_RECIPE
    auto = build_recipe(base)
    assert auto.train.offload_activations == "auto"
    assert launch.offloads_activations(auto, mode("ddp"))
    assert launch.offloads_activations(auto, mode("fsdp"))  # one unit per layer: the layer inputs can wait on the host
    assert not launch.offloads_activations(auto, dataclasses.replace(mode("fsdp"), fsdp_units="peft"))
    assert launch.offloads_activations(auto, mode("deepspeed", zero=3))  # decoder layers as leaf modules
    assert not launch.offloads_activations(auto, dataclasses.replace(mode("deepspeed", zero=3), zero3_units="modules"))
    assert not launch.offloads_activations(auto, mode("cpu"))
    no_gc = build_recipe({**base, "train": {"gradient_checkpointing": False}})
    assert not launch.offloads_activations(no_gc, mode("ddp"))
    forced = build_recipe({**base, "train": {"offload_activations": True}})
    assert launch.offloads_activations(forced, mode("cpu"))
    assert not any("offload_activations" in p for p in launch.check_launch_compat(forced, mode("deepspeed", zero=3)))
    per_module = dataclasses.replace(mode("deepspeed", zero=3), zero3_units="modules")
    problems = launch.check_launch_compat(forced, per_module)
    named = [p for p in problems if "`train.offload_activations` is true" in p]
    assert named and "QLORA_SFT_ZERO3_UNITS=modules" in named[0], problems


@pytest.mark.multiprocess
def test_ddp_losses_unchanged_by_offloading(tiny_model: Path, tmp_path: Path):
    """2 CPU ranks over gloo, with and without offloading: the same losses (DDP's gradient hooks
    fire once per parameter inside the offloaded recompute, as they do in the plain one)."""
    import subprocess

    from helpers import accelerate_cmd, cpu_env, losses_by_step, recipe_dict, write_recipe, write_toy_data

    data = write_toy_data(tmp_path / "toy.jsonl", n=64)
    train = {"max_steps": 4, "logging_steps": 1, "save_steps": 4, "global_batch_size": 8}
    runs = {}
    for name, offload, host in (("plain", False, False), ("offload", True, False), ("host", True, True)):
        r = recipe_dict(tiny_model, data, tmp_path / "runs", run={"name": name}, train=train)
        r["train"]["offload_activations"] = offload
        r["model"]["embedding_in_host_memory"] = host
        r["model"]["lm_head_in_host_memory"] = host
        r["lora"]["dropout"] = 0.1
        recipe = write_recipe(tmp_path / f"{name}.yaml", r)
        out = subprocess.run(accelerate_cmd("train", str(recipe)), capture_output=True, text=True, env=cpu_env())
        assert out.returncode == 0, out.stderr[-4000:]
        assert ("checkpointed layers wait in pinned host memory" in out.stdout) == offload
        assert ("input embedding in host memory" in out.stdout + out.stderr) == host
        assert ("output head in host memory" in out.stdout + out.stderr) == host
        # DDP is told to leave exactly the host tables alone (on CPU ranks every parameter is on the
        # CPU, so DDP's own device check cannot show it here; on a GPU it would refuse without this)
        ignored = "DDP leaves base_model.model.model.embed_tokens.weight, base_model.model.lm_head.weight alone"
        assert (ignored in out.stdout + out.stderr) == host, out.stdout[-3000:]
        runs[name] = losses_by_step(tmp_path / "runs" / name)
    assert sorted(runs["plain"]) == [1, 2, 3, 4]
    assert runs["plain"] == pytest.approx(runs["offload"], rel=1e-5), runs
    assert runs["plain"] == pytest.approx(runs["host"], rel=1e-5), runs  # DDP accepts the table on the host
