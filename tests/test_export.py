"""Export: merged models that reproduce the trained adapter, streaming shard by shard."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import accelerate_cmd, cpu_env, recipe_dict, write_toy_data

from qlora_sft.errors import UserError
from qlora_sft.export import export
from qlora_sft.recipe import build_recipe
from qlora_sft.train import train


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved in several safetensors shards."""
    from tiny import build_tiny_model
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path_factory.mktemp("sharded") / "tiny", layers=3)
    model = AutoModelForCausalLM.from_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size="150KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


def trained_run(model: Path, root: Path, name: str, **quant) -> Path:
    data = write_toy_data(root / f"{name}.jsonl", n=64)
    r = build_recipe(
        recipe_dict(
            model,
            data,
            root / "runs",
            run={"name": name},
            quantization=quant or {"method": "nf4"},
            train={"max_steps": 8, "save_steps": 4, "learning_rate": 1e-2},
        )
    )
    return train(r).run_dir


@pytest.fixture(scope="module")
def run4bit(sharded_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(sharded_model, tmp_path_factory.mktemp("export"), "nf4")


def test_dequantized_merge_reproduces_the_adapter_and_loads_without_peft(run4bit: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_sft.export import resolve_source, training_time_model

    res = export(run4bit, tmp_path / "merged", dtype="fp32")
    assert res.ok and res.merged_vs_trained.top1_agreement == 1.0 and res.merged_vs_trained.max_abs < 1e-2
    # the notebook way (original base) is visibly different from what was trained
    assert res.original_vs_trained.max_abs > 5 * res.merged_vs_trained.max_abs
    out = res.out
    for f in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / f).is_file(), f
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").is_file()
    card = (out / "README.md").read_text()
    assert "merge base: **dequantized**" in card and "top-1 agreement" in card and "training step 8" in card
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not isinstance(merged, PeftModel) and not any("lora" in n for n, _ in merged.named_parameters())
    ref = training_time_model(resolve_source(run4bit), resolve_source(run4bit).base_path, "cpu")
    prompt = torch.tensor([[1, 5, 9, 23, 42, 7]])
    a = merged.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    b = ref.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()


def test_streaming_merge_is_bit_identical_to_peft_merge_in_memory(run4bit: Path, tmp_path: Path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_sft.export import resolve_source

    src = resolve_source(run4bit)
    res = export(run4bit, tmp_path / "merged", dtype="fp32", verify=False)
    streamed: dict[str, torch.Tensor] = {}
    for f in res.out.glob("*.safetensors"):
        streamed.update(load_file(str(f)))
    # reference: the base as training loaded it (4-bit), its weights dequantized into a plain
    # fp32 model, then peft's own merge_and_unload
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    q4 = AutoModelForCausalLM.from_pretrained(src.base_path, quantization_config=q, device_map={"": "cpu"})
    plain = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32)
    deq = {
        n + ".weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for n, m in q4.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    assert deq
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in deq:
                p.copy_(deq[name])
    reference = PeftModel.from_pretrained(plain, src.adapter_dir).merge_and_unload().state_dict()
    assert set(streamed) == {k for k in reference if k in streamed} and len(streamed) >= len(deq)
    for name, t in streamed.items():
        assert torch.equal(t, reference[name].float()), name


def test_refusals_leave_nothing_half_written(run4bit: Path, tmp_path: Path, sharded_model: Path):
    from tiny import build_tiny_model

    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"):
        export(run4bit, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="base model '/no/such/model' not found"):
        export(run4bit, tmp_path / "x", base_model="/no/such/model")
    other = build_tiny_model(tmp_path / "other", hidden=32)
    with pytest.raises(UserError, match=r"is not the base model .* was trained on \(config.json differs"):
        export(run4bit, tmp_path / "y", base_model=str(other))
    # told to go on anyway (--allow-other-base), the shapes still have to fit
    with pytest.raises(UserError, match=r"adapter does not fit the base model: .* in the base but the LoRA delta is"):
        export(run4bit, tmp_path / "y", base_model=str(other), other_base=True)
    assert not list(tmp_path.glob("y*")) and not list(tmp_path.glob("x*"))
    with pytest.raises(UserError, match="holds no adapter"):
        export(sharded_model, tmp_path / "z")


def test_unquantized_adapter_exports(sharded_model: Path, tmp_path: Path):
    run = trained_run(sharded_model, tmp_path, "plain", method="none")
    res = export(run, tmp_path / "merged", dtype="fp32")
    assert res.ok and res.original_vs_trained is None and res.merged_vs_trained.max_abs < 1e-2


def test_peak_memory_of_the_merge_is_near_one_shard(tmp_path: Path):
    """A ~170 MB model exported in 16 MB shards: the merge's peak RSS rises by far less than the model."""
    from peft import LoraConfig, get_peft_model
    from tiny import build_tiny_model
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "bigger", layers=8, hidden=768)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size="16MB")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "adapter")
    del model, peft_model
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_sft",
            "export",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "merged"),
            "--base-model",
            str(folder),
            "--dtype",
            "fp32",
            "--shard-size",
            "16MB",
            "--no-verify",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"peak RSS (\d+) MB \((\d+) MB before the merge\)", out.stdout + out.stderr)
    peak, before = int(m.group(1)), int(m.group(2))
    assert model_mb > 100
    assert peak - before < 0.6 * model_mb, (peak, before, model_mb)
    assert len(list((tmp_path / "merged").glob("*.safetensors"))) >= 6


def test_chat_prompt_and_eof(run4bit: Path, tmp_path: Path):
    res = export(run4bit, tmp_path / "merged", dtype="fp32", verify=False)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_sft",
            "chat",
            str(res.out),
            "--prompt",
            "What is the colour of the sky?",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
    interactive = subprocess.run(
        [sys.executable, "-m", "qlora_sft", "chat", str(run4bit / "final"), "--max-new-tokens", "4"],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert interactive.returncode == 0, interactive.stderr[-2000:]
    assert "Ctrl-D to quit" in interactive.stderr


def test_export_under_accelerate_launch_runs_on_the_main_process_only(run4bit: Path, tmp_path: Path):
    out = subprocess.run(
        accelerate_cmd("export", str(run4bit), "--out", str(tmp_path / "merged"), "--no-verify"),
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("merged model:") == 1, out.stdout
    assert (tmp_path / "merged" / "config.json").is_file() and not list(tmp_path.glob("merged.tmp-*"))


def test_bf16_tolerance_forgives_flipped_near_ties_but_not_flipped_decisions():
    """The bf16 check compares top tokens only where the reference decides (its top token leads by
    DECIDED_MARGIN std): rounding may flip a near-tie, a wrong merge flips decisions."""
    from qlora_sft.export import DECIDED_MARGIN, compare, tolerance_ok

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 1000, generator=g)
    # half the positions near-ties (runner-up 0.01 std below the top), half clearly decided
    top = ref.argmax(-1)
    runner = (top + 1) % 1000
    rows = torch.arange(200)
    ref[rows, top] = ref.max(-1).values + 3.0
    ref[rows[:100], runner[:100]] = ref[rows[:100], top[:100]] - 0.01
    noisy = ref + 0.02 * torch.randn(ref.shape, generator=g)
    flipped_ties = noisy.clone()
    flipped_ties[rows[:100], runner[:100]] = flipped_ties[rows[:100], top[:100]] + 0.005
    c = compare(flipped_ties, ref)
    assert c.top1_agreement <= 0.5 + 1e-6 and c.decided_positions == 100 and c.decided_agreement == 1.0
    assert tolerance_ok(c, torch.bfloat16)
    assert not tolerance_ok(c, torch.float32)  # fp32 weights leave no excuse for any flip

    wrong = noisy.clone()  # a merge that changes what the model clearly prefers at 5 of 100 decided positions
    wrong[rows[100:105], runner[100:105]] = wrong[rows[100:105], top[100:105]] + 1.0
    c = compare(wrong, ref)
    assert c.relative <= 0.1 and c.decided_agreement == pytest.approx(0.95)
    assert not tolerance_ok(c, torch.bfloat16)
    assert DECIDED_MARGIN * ref.std().item() < 3.0


def test_chat_on_the_adapter_answers_as_the_exported_model(run4bit: Path, tmp_path: Path):
    """`chat` on an adapter runs the model as trained (the 4-bit base with the recipe's settings),
    so its greedy answer is the merged export's; on the full-precision base it would be another
    model (the notebook merge)."""
    import torch

    from qlora_sft.cli import load_chat_model

    merged = export(run4bit, tmp_path / "merged", dtype="fp32").out

    def greedy(path: Path) -> list[int]:
        model, tok = load_chat_model(str(path), "cpu")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "What is the colour of the grass?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[0, ids["input_ids"].shape[1] :].tolist()

    from_adapter = greedy(run4bit / "final")
    assert from_adapter == greedy(merged)
    assert len(from_adapter) > 0


def test_push_to_hub_refuses_before_any_merge_work(run4bit: Path, tmp_path: Path):
    """The hub is unreachable here, so the upload itself is not exercised: what is tested is that
    every refusal comes first, says why, and leaves nothing behind."""
    from helpers import free_port

    def export_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "qlora_sft", "export", str(run4bit), "--out", str(tmp_path / "m"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused at once
    cases = [
        (("--push-to-hub", "me/model"), {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed}, "cannot be reached"),
        (
            ("--push-to-hub", "me/model", "--adapter-only"),
            {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed},
            "cannot be reached",
        ),
        (("--push-to-hub", "me/model"), {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        (("--push-to-hub", "not a repo"), {"HF_HUB_OFFLINE": "0"}, "give ORG/NAME"),
        (("--push-to-hub", "me/model", "--no-verify"), {}, "uploads only a verified merge"),
        (("--private",), {}, "go with --push-to-hub"),
    ]
    for args, env, message in cases:
        out = export_cli(*args, **env)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-1500:])
        assert "merged" not in out.stdout.lower()
        assert not (tmp_path / "m").exists() and not list(tmp_path.glob("m.*"))
