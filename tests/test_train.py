from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import recipe_dict, write_recipe

from qlora_sft.errors import RunDirError
from qlora_sft.recipe import build_recipe, load_recipe
from qlora_sft.train import train


def losses(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real QLoRA run on the tiny Llama (bitsandbytes NF4 on the CPU), shared by the tests below."""
    from helpers import write_toy_data

    root = tmp_path_factory.mktemp("train")
    data = write_toy_data(root / "toy.jsonl")
    recipe = build_recipe(recipe_dict(tiny_model, data, root / "runs"), source=None)
    result = train(recipe)
    return recipe, result


def test_loss_goes_down_and_everything_is_written(trained):
    recipe, result = trained
    run_dir = result.run_dir
    train_losses = losses(run_dir)
    assert [s for s, _ in train_losses] == [5, 10, 15, 20, 25, 30]
    first, last = train_losses[0][1], train_losses[-1][1]
    assert last < 0.5 * first, train_losses
    assert [s for s, _ in losses(run_dir, "eval_loss")][-1] == 30
    assert result.global_step == 30 and result.eval_loss is not None
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "final" / "COMPLETE").is_file()
    for step in (10, 20, 30):
        assert (run_dir / f"checkpoint-{step}" / "COMPLETE").is_file()
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    saved = load_recipe(run_dir / "recipe.yaml")
    assert saved.to_dict() == recipe.to_dict()


def test_loss_curves_are_drawn(trained, tmp_path: Path):
    """logs/loss.png is written while training (main process); `qlora-sft plot` draws several runs."""
    import subprocess
    import sys

    from PIL import Image

    _, result = trained
    png = result.run_dir / "logs" / "loss.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
    from qlora_sft.plots import series

    curves = series(result.run_dir)
    assert sorted(curves["loss"]) == [5, 10, 15, 20, 25, 30] and 30 in curves["eval_loss"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_sft",
            "plot",
            str(result.run_dir),
            str(result.run_dir),
            "--out",
            str(tmp_path / "two.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with Image.open(tmp_path / "two.png") as im:
        assert im.format == "PNG"
    missing = subprocess.run([sys.executable, "-m", "qlora_sft", "plot", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2 and "has no logs/metrics.jsonl" in missing.stderr
    for out, said in ((tmp_path / "fig.pdf", "name the file .png"), (tmp_path, "is a folder; give the PNG file")):
        refused = subprocess.run(
            [sys.executable, "-m", "qlora_sft", "plot", str(result.run_dir), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "fig.pdf").exists()  # (PNG bytes were written into it before)


def test_final_adapter_loads_with_peft_on_a_4bit_base(trained, tiny_model: Path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, result = trained
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=q, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, result.final_dir)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.lora_A["default"].weight.shape == (8, 64)
    assert q_proj.lora_B["default"].weight.abs().sum() > 0  # trained (B starts at zero)


def test_same_recipe_resumes_different_recipe_is_refused(trained, tiny_model: Path):
    recipe, _ = trained
    from qlora_sft.checkpoint import check_run_dir

    assert check_run_dir(recipe) == "resume"
    changed = build_recipe({**recipe.to_dict(), "lora": {**recipe.to_dict()["lora"], "r": 4}})
    with pytest.raises(RunDirError, match=r"different recipe:\n    lora.r: 8 -> 4") as exc:
        check_run_dir(changed)
    assert "nothing was changed" in str(exc.value)
    # changing only how long to train is a resume, not a different recipe
    longer = build_recipe({**recipe.to_dict(), "train": {**recipe.to_dict()["train"], "max_steps": 40}})
    assert check_run_dir(longer) == "resume"


def test_overwrite_moves_the_old_run_aside(tmp_path: Path, tiny_model: Path, toy_data: Path):
    from qlora_sft.checkpoint import prepare_run_dir

    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoint-5").mkdir(parents=True)
    (run_dir / "checkpoint-5" / "adapter_model.safetensors").write_text("precious")
    recipe = build_recipe(recipe_dict(tiny_model, toy_data, tmp_path / "runs"))
    with pytest.raises(RunDirError, match="is not a qlora-sft run"):
        prepare_run_dir(recipe, {})
    assert (run_dir / "checkpoint-5" / "adapter_model.safetensors").read_text() == "precious"
    recipe = build_recipe(recipe_dict(tiny_model, toy_data, tmp_path / "runs", run={"overwrite": True}))
    prepare_run_dir(recipe, {})
    (aside,) = tmp_path.glob("runs/tiny.replaced-*")
    assert (aside / "checkpoint-5" / "adapter_model.safetensors").read_text() == "precious"
    assert (run_dir / "recipe.yaml").is_file()


def test_overwrite_is_done_once_per_slurm_job_a_requeue_resumes(
    tmp_path: Path, tiny_model: Path, toy_data: Path, monkeypatch: pytest.MonkeyPatch
):
    """run.overwrite in a recipe that SLURM requeues (preemption): the job's first launch moves the
    old run aside; its requeues (same SLURM_JOB_ID, a higher SLURM_RESTART_COUNT) go on with the run
    it started instead of moving it aside again, which started the training over at every requeue.
    Another launch in the same allocation (same restart count) or another job still replaces it."""
    from qlora_sft.checkpoint import check_run_dir, prepare_run_dir, run_metadata
    from qlora_sft.launch import LaunchMode
    from qlora_sft.recipe import resolve_batch

    run_dir = tmp_path / "runs" / "tiny"
    recipe = build_recipe(recipe_dict(tiny_model, toy_data, tmp_path / "runs", run={"overwrite": True}))
    (run_dir / "checkpoint-5").mkdir(parents=True)  # someone else's: not a qlora-sft run
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    meta = run_metadata(recipe, LaunchMode(kind="cpu"), resolve_batch(recipe.train, 1))
    prepare_run_dir(recipe, meta).release()  # the job's first launch: moved aside, a new run
    assert len(list(tmp_path.glob("runs/tiny.replaced-*"))) == 1
    (run_dir / "checkpoint-2").mkdir()  # what it trained before the preemption
    (run_dir / "logs" / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    assert check_run_dir(recipe) == "replace"  # a second launch in the same allocation: as asked
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued the job
    assert check_run_dir(recipe) != "replace"
    meta = run_metadata(recipe, LaunchMode(kind="cpu"), resolve_batch(recipe.train, 1))
    prepare_run_dir(recipe, meta).release()
    assert (run_dir / "checkpoint-2").is_dir() and len(list(tmp_path.glob("runs/tiny.replaced-*"))) == 1
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job with the same recipe: replaces
    assert check_run_dir(recipe) == "replace"


def test_resume_continues_from_newest_complete_checkpoint(tiny_model: Path, tmp_path: Path, toy_data: Path, caplog):
    base = recipe_dict(tiny_model, toy_data, tmp_path / "runs", train={"max_steps": 10, "save_steps": 5})
    train(build_recipe(base))
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoint-10" / "COMPLETE").unlink()  # as if killed while saving step 10
    longer = recipe_dict(tiny_model, toy_data, tmp_path / "runs", train={"max_steps": 15, "save_steps": 5})
    result = train(build_recipe(longer))
    assert result.global_step == 15
    steps = [s for s, _ in losses(run_dir)]
    # step 5 of the first run, then 10 and 15 after resuming from checkpoint-5: the first run's line of
    # step 10 (replayed) moved to metrics.replayed.jsonl, so every step is logged once
    assert steps == [5, 10, 15]
    replayed = [json.loads(line) for line in (run_dir / "logs" / "metrics.replayed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in replayed if "loss" in r] == [10]
    assert (run_dir / "checkpoint-10" / "COMPLETE").is_file()
    (kept,) = run_dir.glob("checkpoint-10.incomplete-*")  # the interrupted save was kept, not deleted
    assert not (kept / "COMPLETE").exists() and (kept / "adapter_model.safetensors").is_file()
    (final_10,) = run_dir.glob("final.step-10")  # the shorter run's final adapter, kept aside
    assert json.loads((final_10 / "manifest.json").read_text())["step"] == 10


def test_eval_pass_does_not_break_cpu_4bit_gradients(tiny_model: Path, tmp_path: Path, toy_data: Path):
    """bitsandbytes repacks CPU 4-bit weights for inference on the first no-grad eval forward;
    after that, training silently loses the gradient through the base layers."""
    from qlora_sft.launch import LaunchMode
    from qlora_sft.model import load_model, load_tokenizer

    recipe = build_recipe(recipe_dict(tiny_model, toy_data, tmp_path))
    tok = load_tokenizer(recipe.model)
    x = torch.randint(0, len(tok), (2, 16))

    def grads(eval_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = load_model(recipe, tok, LaunchMode("cpu"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
            model.train()
        model(input_ids=x, labels=x).loss.backward()
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad.clone()

    assert torch.allclose(grads(False), grads(True))


def test_validate_shows_report_and_marked_example(tiny_model: Path, tmp_path: Path, toy_data: Path):
    f = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy_data, tmp_path / "runs"))
    out = subprocess.run([sys.executable, "-m", "qlora_sft", "validate", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "160 rows, 160 kept" in out.stdout
    assert "split: 144 train rows, 16 eval rows" in out.stdout
    assert "fraction of tokens that carry loss" in out.stdout
    assert "trains its end token '<|im_end|>': 100.0%" in out.stdout
    assert "<|im_start|>assistant\n[[The " in out.stdout and "<|im_end|>\n]]" in out.stdout
    assert not (tmp_path / "runs").exists()  # validate writes nothing


def test_bitsandbytes_imports_without_compiling_and_its_kernels_still_run():
    """Training commands import bitsandbytes with `torch.compile` deferred to first call: torch's
    inductor is not imported at start (seconds of every training process), `torch.compile` is
    restored, and a CPU 4-bit kernel that bitsandbytes compiles (dequantizing a row length that is
    not a multiple of the block) compiles on its first call, with the same result as without the
    deferral."""
    probe = """
import sys, torch
real = torch.compile
from qlora_sft.cli import import_bitsandbytes_without_compiling
import_bitsandbytes_without_compiling()
assert torch.compile is real
started = "torch._inductor.compile_fx" in sys.modules
import bitsandbytes.functional as F
torch.manual_seed(0)
w = torch.randn(64, 63, dtype=torch.bfloat16)
q, state = F.quantize_4bit(w, quant_type="nf4")
back = F.dequantize_4bit(q, state)
print(repr(back.float().sum().item()), (back.float() - w.float()).abs().max().item() < 0.5, started,
      "torch._inductor.compile_fx" in sys.modules)
"""
    plain = probe.replace("import_bitsandbytes_without_compiling()", "import bitsandbytes")
    outs = []
    for code in (probe, plain):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        outs.append(out.stdout.split())
    deferred, eager = outs
    assert deferred[:2] == eager[:2] and deferred[1] == "True", outs  # the same dequantized values
    assert deferred[2:] == ["False", "True"], outs  # not at import; compiled at the kernel's first call
    assert eager[2] == "True", outs  # without the deferral the import alone loads the compiler


def test_profile_step_writes_each_ranks_own_profile(tmp_path: Path):
    """QLORA_SFT_PROFILE_STEP's callback profiles exactly the named step and writes this rank's file
    (on a GPU also the memory-at-peak file, checked by the GPU benchmark rows `*_profiled`)."""
    from types import SimpleNamespace

    import torch

    from qlora_sft.profiling import profile_callback

    def read_back() -> float:  # a host read of a device value: a sync on a GPU
        return (torch.ones(64, 64) @ torch.ones(64, 64)).sum().item()

    cb = profile_callback(3, tmp_path, rank=1)
    for step in range(4):  # as the Trainer calls it: global_step counts the step once it is taken
        cb.on_step_begin(None, SimpleNamespace(global_step=step), None)
        read_back()
        if step == 2:  # the profiled step reads back twice
            read_back()
        cb.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile-rank1.txt", "timeline-rank1.json"]
    text = (tmp_path / "profile-rank1.txt").read_text()
    assert "aten::mm" in text and text.startswith("step 3: ")
    timeline = json.loads((tmp_path / "timeline-rank1.json").read_text())
    assert timeline["step"] == 3 and timeline["gpu_compute_idle_share"] is None  # no GPU here
    [wait] = timeline["host_waits"]
    assert wait["op"] == "aten::_local_scalar_dense" and wait["count"] == 2, wait
    assert timeline["sync_sites"] == []  # torch's sync debug mode needs CUDA


def test_sync_sites_count_each_synchronizing_call_by_its_stack():
    """On a GPU the profiled step runs with torch's sync debug mode, whose warning for each
    synchronizing operation `SyncSites` counts under the frames that raised it (here raised by
    hand, as torch raises it); other warnings still reach the user."""
    import warnings

    from qlora_sft.profiling import SYNC_WARNING, SyncSites

    def loss_value() -> None:
        warnings.warn(f"{SYNC_WARNING}", UserWarning, stacklevel=1)

    sites = SyncSites(depth=2)
    shown: list[str] = []

    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        shown.append(str(message))

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        sites.start()
        for _ in range(2):  # one site: the same frames
            loss_value()
        warnings.warn("something else", UserWarning, stacklevel=1)
        [site] = sites.stop()
        assert warnings.showwarning is show  # put back as it was
    finally:
        warnings.showwarning = saved
    assert shown == ["something else"]
    assert site["count"] == 2, site
    inner, outer = site["where"].split(" <- ")
    assert inner.endswith("loss_value") and "test_train.py:" in inner, site
    assert outer.endswith("test_sync_sites_count_each_synchronizing_call_by_its_stack"), site


def test_gpu_timeline_counts_overlapping_kernels_once():
    """The GPU's busy time is the union of its kernels' intervals: copies on a side stream that
    overlap the compute count once in `gpu_busy_ms` and not at all in the compute's share."""
    from types import SimpleNamespace

    from qlora_sft.profiling import gpu_timeline

    def ev(name: str, start: float, end: float, device: str = "CUDA") -> SimpleNamespace:
        return SimpleNamespace(
            name=name, device_type=SimpleNamespace(name=device), time_range=SimpleNamespace(start=start, end=end)
        )

    events = [
        ev("gemm", 0, 4000),
        ev("Memcpy DtoH (Device -> Pinned)", 3000, 6000),  # overlaps the gemm by 1 ms
        ev("norm", 2000, 3000),  # inside the gemm
        ev("aten::mm", 0, 10000, device="CPU"),  # host time is not GPU time
    ]
    out = gpu_timeline(events, wall_s=0.010)
    gaps = {k: out.pop(k) for k in ("idle_gaps", "idle_with_a_copy_running_ms", "longest_gaps")}
    assert out == {
        "wall_ms": 10.0,
        "gpu_busy_ms": 6.0,
        "gpu_compute_busy_ms": 4.0,
        "gpu_compute_idle_share": 0.6,
        "kernels": 2,
    }
    assert gaps["longest_gaps"] == [] and gaps["idle_with_a_copy_running_ms"] == 0
    assert all(v == {"count": 0, "ms": 0.0} for v in gaps["idle_gaps"].values())

    # the compute's gaps between its kernels, by length, the share a copy ran, the longest named
    events = [
        ev("a", 0, 100),
        ev("b", 105, 200),  # 5 us after a
        ev("c", 150, 180),  # inside b: no gap
        ev("d", 250, 300),  # 50 us after b
        ev("Memcpy HtoD (Pinned -> Device)", 290, 1200),  # runs through most of the next gap
        ev("e", 1500, 1600),  # 1,200 us after d, 900 of it with the copy running
        ev("f", 1800, 1900),  # 200 us after e
    ]
    out = gpu_timeline(events, wall_s=0.002)
    assert out["idle_gaps"] == {
        "<10us": {"count": 1, "ms": 0.01},
        "10-100us": {"count": 1, "ms": 0.05},
        "0.1-1ms": {"count": 1, "ms": 0.2},
        ">=1ms": {"count": 1, "ms": 1.2},
    }
    assert out["idle_with_a_copy_running_ms"] == 0.9
    assert [(g["ms"], g["after"], g["before"]) for g in out["longest_gaps"][:2]] == [(1.2, "d", "e"), (0.2, "e", "f")]
    assert out["longest_gaps"][0]["at_ms"] == 0.3


def test_profile_step_variable_is_checked():
    """QLORA_SFT_PROFILE_STEP names an optimizer step from 1; anything else is refused naming the
    variable and what it takes (train checks it before loading the model)."""
    from qlora_sft.errors import UserError
    from qlora_sft.profiling import profile_step

    assert profile_step({}) is None and profile_step({"QLORA_SFT_PROFILE_STEP": " "}) is None
    assert profile_step({"QLORA_SFT_PROFILE_STEP": "5"}) == 5
    for bad in ("abc", "0", "-3", "2.5", "five", "²", "①", "٣", "9" * 5000, "+5"):
        with pytest.raises(UserError, match=re.escape(f"QLORA_SFT_PROFILE_STEP={bad!r}: name the optimizer step")):
            profile_step({"QLORA_SFT_PROFILE_STEP": bad})


def test_profile_that_never_ends_or_never_comes_switches_off_and_says_so(tmp_path: Path):
    """A profiled step that raises (an out-of-memory retry) leaves no profiler running once the next
    step begins or training ends (`close`); a launch resumed past the step says that nothing is
    profiled; an earlier launch's files are removed so that what is there is this launch's."""
    import logging
    from types import SimpleNamespace

    import torch

    from qlora_sft.profiling import profile_callback

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("qlora_sft")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        (tmp_path / "timeline-rank0.json").write_text('{"step": 2}')  # an earlier launch's
        cb = profile_callback(2, tmp_path, rank=0)
        cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
        assert not (tmp_path / "timeline-rank0.json").exists()
        cb.on_step_begin(None, SimpleNamespace(global_step=1), None)  # step 2 begins...
        assert torch.autograd.profiler._is_profiler_enabled
        # ... and raises; the Trainer retries from step 1 (auto_find_batch_size)
        cb.on_step_begin(None, SimpleNamespace(global_step=0), None)
        assert not torch.autograd.profiler._is_profiler_enabled
        assert any("step 2 did not end" in m for m in records), records
        cb.on_step_end(None, SimpleNamespace(global_step=1), None)
        assert list(tmp_path.iterdir()) == []
        cb.on_step_begin(None, SimpleNamespace(global_step=1), None)  # step 2 again, raising again:
        cb.close()  # train()'s finally
        assert not torch.autograd.profiler._is_profiler_enabled and list(tmp_path.iterdir()) == []

        records.clear()
        resumed = profile_callback(2, tmp_path, rank=0)
        resumed.on_train_begin(None, SimpleNamespace(global_step=4), None)
        assert any("training starts after step 4 (resumed), so no step is profiled" in m for m in records), records
        resumed.on_train_end(None, SimpleNamespace(global_step=8), None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_warmup_as_long_as_the_training_is_named_by_plan_and_train(
    tiny_model: Path, tmp_path: Path, toy_data: Path, capsys
):
    """A copied `warmup_steps: 100` with a short `max_steps` never reaches the learning rate; nothing said so."""
    from qlora_sft.plan import plan_lines

    def recipe(**train_args):
        args = {"max_steps": 2, "save_steps": 2, "logging_steps": 1, **train_args}
        return build_recipe(recipe_dict(tiny_model, toy_data, tmp_path / "runs", train=args))

    expected = "train.warmup_steps is 5 and the training lasts 2 optimizer steps: the learning rate never reaches"
    assert any(expected in line for line in plan_lines(recipe(warmup_steps=5)))
    assert not any("warmup_steps" in line for line in plan_lines(recipe(warmup_steps=1)))
    by_epochs = recipe(max_steps=-1, num_train_epochs=1, warmup_steps=1000)  # steps from the data
    assert any("train.warmup_steps is 1000 and the training lasts" in line for line in plan_lines(by_epochs))
    train(recipe(warmup_steps=5))
    logged = capsys.readouterr().out.splitlines()  # the main process logs to stdout: time, level, message
    assert len([line for line in logged if f" WARNING warning: {expected}" in line]) == 1, logged


def test_save_steps_past_an_epoch_counted_run_are_named_by_plan_and_train(
    tiny_model: Path, tmp_path: Path, toy_data: Path, capsys
):
    """A run counted in epochs (no max_steps) whose save_steps (10 here) come after its last step (3
    of 16 rows here) saves no checkpoint before the end: recipe_warnings cannot know it (no step count before the
    data), so plan says it from the data and train when the trainer has counted the steps."""
    from qlora_sft.plan import plan_lines

    def recipe(**train_args):
        args = {"max_steps": -1, "num_train_epochs": 1, "logging_steps": 1, "global_batch_size": 16, **train_args}
        return build_recipe(recipe_dict(tiny_model, toy_data, tmp_path / "runs", train=args))

    said = "train.save_steps is 10 and train.num_train_epochs 1 over the data is at most"
    assert any(line.startswith(f"warning: {said}") for line in plan_lines(recipe())), plan_lines(recipe())
    assert not any("save_steps" in line for line in plan_lines(recipe(save_steps=1)))
    train(recipe())
    logged = capsys.readouterr().out.splitlines()
    assert len([line for line in logged if f" WARNING warning: {said}" in line]) == 1, logged
