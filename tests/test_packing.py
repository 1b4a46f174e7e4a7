"""Packing is correct: examples packed into one padding-free row never attend to each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import recipe_dict, write_toy_data

from qlora_sft.recipe import build_recipe


@pytest.fixture(scope="module", params=["sdpa", "varlen"])
def model_and_batch(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model with either packed-attention path: `sdpa` (transformers' dense block mask from
    the positions) and `varlen` (the GPU default; on the CPU the same boundaries drive SDPA per example)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("packing")
    recipe = build_recipe(
        recipe_dict(tiny_model, write_toy_data(root / "t.jsonl"), root, model={"attn_implementation": request.param})
    )
    tok = load_tokenizer(recipe.model)
    torch.manual_seed(0)
    model = load_model(recipe, tok, LaunchMode("cpu")).eval()
    for name, p in model.named_parameters():  # a non-trivial adapter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    examples = [torch.randint(5, len(tok) - 5, (n,)).tolist() for n in (7, 13, 4, 21)]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
        [{"input_ids": e} for e in examples]
    )
    return model, examples, batch


def per_example(logits: torch.Tensor, examples: list[list[int]]) -> list[torch.Tensor]:
    out, off = [], 0
    for e in examples:
        out.append(logits[off : off + len(e)])
        off += len(e)
    return out


def test_packed_logits_equal_one_by_one(model_and_batch):
    model, examples, batch = model_and_batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        for ex, got in zip(examples, per_example(packed, examples), strict=True):
            alone = model(input_ids=torch.tensor([ex]), use_cache=False).logits[0]
            assert torch.allclose(got, alone, atol=1e-4), (got - alone).abs().max()


def test_packed_loss_per_example_equals_one_by_one(model_and_batch):
    """The training loss path (labels through the model's own loss) on the packed row gives each
    example the same per-token loss as running that example alone."""
    model, examples, batch = model_and_batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        for ex, got in zip(examples, per_example(logp, examples), strict=True):
            ids = torch.tensor(ex)
            packed_loss = -got[:-1].gather(-1, ids[1:, None]).mean()
            alone = model(input_ids=ids[None], labels=ids[None], use_cache=False).loss
            assert packed_loss == pytest.approx(float(alone), abs=1e-5)


def test_a_kv_cache_would_lose_the_boundaries_and_training_never_has_one(model_and_batch):
    """transformers detects packed rows from position_ids only without an attention mask and without a
    cache; with a cache the examples silently attend to each other. Training and evaluation run with
    use_cache=False (model config and TRL's loss), which this pins down."""
    model, examples, batch = model_and_batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        cached = model(**inputs, use_cache=True).logits[0]
        alone = model(input_ids=torch.tensor([examples[1]]), use_cache=False).logits[0]
    gap = (per_example(cached, examples)[1] - alone).abs().max()
    if model.config._attn_implementation == "varlen":
        assert gap < 1e-4  # the boundaries travel as cu_seq_lens, so even a cache keeps them
    else:
        assert gap > 1e-2  # the trap is real
    assert model.config.use_cache is False


def test_packed_and_unpacked_evaluation_agree(tiny_model: Path, tmp_path: Path):
    """The trainer's own evaluation (a prediction step with the model as trained) gives the same
    token-weighted eval loss packed and unpacked, when the eval set fits one batch either way."""
    from trl import SFTTrainer

    from qlora_sft import data
    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_model, load_tokenizer
    from qlora_sft.recipe import resolve_batch
    from qlora_sft.train import sft_args

    losses = {}
    for packing in (False, True):
        recipe = build_recipe(
            recipe_dict(
                tiny_model,
                write_toy_data(tmp_path / "t.jsonl", n=40),
                tmp_path,
                run={"name": f"p{packing}"},
                data={"packing": packing, "eval_fraction": 0.25, "max_length": 512},
                train={"per_device_eval_batch_size": 64},
            )
        )
        tok = load_tokenizer(recipe.model)
        prepared = data.build_data(recipe.data, tok, 0)
        torch.manual_seed(0)
        model = load_model(recipe, tok, LaunchMode("cpu"))
        mode = LaunchMode("cpu")
        args = sft_args(recipe, resolve_batch(recipe.train, 1), mode, torch.float32, True)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tok
        )
        losses[packing] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4), losses


def test_varlen_boundaries_from_positions_match_the_collator():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_sft.attention import boundaries

    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": list(range(1, n + 1))} for n in (3, 5, 1, 4)]
    )
    cu, longest = boundaries(batch["position_ids"])
    assert cu.tolist() == batch["cu_seq_lens_q"].tolist() == [0, 3, 8, 9, 13]
    assert longest == batch["max_length_q"] == 5


def test_varlen_attention_uses_the_collator_boundaries_and_falls_back_to_sdpa():
    """Called the way transformers calls it: with cu_seq_lens (no sync), with positions only, and with
    a padding mask (no packing: plain SDPA)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qlora_sft.attention import varlen_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    with_cu, _ = varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=4)
    with_pos, _ = varlen_attention_forward(module, q, k, v, None, position_ids=pos)
    assert torch.equal(with_cu, with_pos)
    for s, e in ((0, 4), (4, 6), (6, 9)):  # each example on its own
        alone, _ = sdpa_attention_forward(module, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None)
        assert torch.allclose(with_cu[:, s:e], alone, atol=1e-6)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    masked, _ = varlen_attention_forward(module, q, k, v, mask)
    plain, _ = sdpa_attention_forward(module, q, k, v, mask)
    assert torch.equal(masked, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_kernel_matches_sdpa_per_example_on_gpu():
    """GQA (4 query heads per KV head) included: K/V go to the kernel as they are where it computes
    GQA itself (`_takes_fewer_kv_heads`), repeated otherwise; both must match SDPA."""
    from qlora_sft.attention import _per_example_sdpa, available_on_cuda, varlen_attention_forward

    if not available_on_cuda():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    lens = [700, 33, 1200, 115]
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu.cuda(), max_length_q=max(lens))
    ref = _per_example_sdpa(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, 128**-0.5).unsqueeze(0)
    assert (out.float() - ref.float()).abs().max() < 2e-2
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a.float() - b.float()).abs().max() < 5e-2


def _tiny_pair(config_cls: type, **kw):
    """The same random weights under `sdpa` and `varlen`."""
    import copy

    from transformers import AutoModelForCausalLM

    from qlora_sft import attention

    attention.register()
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, **kw)
    # (from_config sets the implementation on the config it is given: one copy per model)
    models = {}
    for impl in ("sdpa", "varlen"):
        models[impl] = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    models["varlen"].load_state_dict(models["sdpa"].state_dict())
    assert {i: m.config._attn_implementation for i, m in models.items()} == {"sdpa": "sdpa", "varlen": "varlen"}
    return models


@torch.no_grad()
def test_varlen_keeps_several_packed_rows_apart():
    """Two packed rows without a mask (not what TRL's collator emits, but any caller may): the mask
    function hands SDPA the block-diagonal mask from the positions."""
    from transformers import LlamaConfig

    models = _tiny_pair(LlamaConfig, num_attention_heads=4, num_key_value_heads=2)
    a, b, c, d = (torch.randint(0, 100, (n,)) for n in (5, 7, 6, 6))
    ids = torch.stack([torch.cat([a, b]), torch.cat([c, d])])
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.cat([torch.arange(6), torch.arange(6)])])
    for m in models.values():
        out = m(input_ids=ids, position_ids=pos, use_cache=False).logits
        for row, (s, x) in ((0, (5, b)), (1, (6, d))):
            alone = m(input_ids=x[None], use_cache=False).logits[0]
            assert (out[row, s:] - alone).abs().max() < 1e-5


@torch.no_grad()
def test_varlen_runs_mla_value_heads_and_attention_dropout_per_example():
    """DeepSeek's MLA (value heads narrower than query/key heads) and attention dropout are not what
    the kernel takes: varlen runs them one example at a time, exactly; auto never picks varlen for them."""
    from transformers import DeepseekV3Config, LlamaConfig

    from qlora_sft.model import varlen_unsuitable

    models = _tiny_pair(
        DeepseekV3Config,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
    )
    a, b = torch.randint(0, 100, (5,)), torch.randint(0, 100, (7,))
    row, pos = torch.cat([a, b])[None], torch.cat([torch.arange(5), torch.arange(7)])[None]
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    m = models["varlen"]
    out = m(input_ids=row, position_ids=pos, cu_seq_lens_q=cu, max_length_q=7, use_cache=False).logits[0]
    assert (out[5:] - m(input_ids=b[None], use_cache=False).logits[0]).abs().max() < 1e-5
    assert varlen_unsuitable(m.config) == ("its value heads (12) differ from its query/key heads (24)", True)

    llama = _tiny_pair(LlamaConfig, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)["varlen"]
    assert varlen_unsuitable(llama.config)[1] is True
    llama.train()
    kw = dict(input_ids=row, position_ids=pos, cu_seq_lens_q=cu, max_length_q=7, use_cache=False)
    assert (llama(**kw).logits - llama(**kw).logits).abs().max() > 1e-3  # dropout is applied
    llama.eval()
    assert torch.equal(llama(**kw).logits, llama(**kw).logits)


def test_varlen_refuses_what_it_cannot_compute():
    """Softcapping / sliding windows would be silently dropped, and a packed row on top of a KV cache
    without a mask would be cut at the wrong offsets: all refused, with what to use instead."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    from qlora_sft.attention import varlen_attention_forward
    from qlora_sft.model import varlen_unsuitable

    assert varlen_unsuitable(LlamaConfig()) is None
    assert varlen_unsuitable(MistralConfig())[1] is False
    assert varlen_unsuitable(Gemma2Config())[1] is False
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    q = k = v = torch.randn(1, 2, 6, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match="softcap"):
        varlen_attention_forward(module, q, k, v, None, position_ids=pos, softcap=50.0)
    with pytest.raises(ValueError, match="KV cache"):
        varlen_attention_forward(module, q, torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), None, position_ids=pos)


def test_gqa_probe_inside_a_checkpointed_forward():
    """The one-time check whether the varlen kernel takes fewer K/V heads runs its own autograd:
    called first from inside a checkpointed layer's forward (non-reentrant checkpointing, as under
    FSDP/ZeRO-3), it must neither fail there nor break that layer's backward. A stand-in kernel
    that computes GQA, on the CPU."""
    from torch.utils.checkpoint import checkpoint

    from qlora_sft.attention import _per_example_sdpa, _takes_fewer_kv_heads

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True):
        return _per_example_sdpa(q, k, v, cu_q, q.shape[-1] ** -0.5)

    seen = []

    def layer(x: torch.Tensor) -> torch.Tensor:
        seen.append(_takes_fewer_kv_heads(kernel, "cpu"))
        return (x * 2).sin()

    x = torch.randn(8, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert seen[0] is True
    torch.testing.assert_close(x.grad, 2 * (x * 2).cos())
