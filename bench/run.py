"""Throughput and memory of qlora-sft against the plain notebook recipe, on the same GPU, same model,
same data, in one run.

    python -m bench.run --shape llama3-8b --mode baseline,peer,unsloth,project [--steps 20] [--ablation]

  baseline  the seed notebooks' recipe: bitsandbytes NF4 + double quant, peft LoRA r=16 on all 7
            projections, TRL SFTTrainer, padded batches of 4, no packing, SDPA, gradient
            checkpointing, paged AdamW 32-bit
  peer      what a well-informed TRL user gets with correct packing: the same plus
            packing_strategy="bfd", padding_free=True, Liger kernels
  unsloth   unsloth's own recipe (bench/unsloth_peer.py), from its own target directory
            (`--unsloth-site`: its trl/datasets pins conflict with the project's)
  project   `qlora-sft train` with the recipe's defaults (plus `--project-overrides`)
  --ablation  the project path again with one choice switched back at a time

--micro-batch N sets the packed rows per micro batch of project and unsloth, --gpu-cap GiB caps the
GPU in every mode (QLORA_SFT_GPU_MEMORY_GIB), --prequantized writes the model in NF4 (the 14B and
32B shapes), --tag names the results file.

Each mode runs in its own process. Reported per mode: real (non-padding) tokens/s over the steps
after the warm-up, the padding fraction of computed tokens, peak GPU memory
(torch.cuda.max_memory_allocated), the reserved peak and what is in use outside PyTorch's allocator
at the end (together what a card must hold), time to the first optimizer step, and MFU
(`measure.mfu`). Writes bench/results/<date>-<gpu>-<shape><tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qlora_sft.cli import gib
from qlora_sft.launch import (
    GPU_MEMORY_CAP_ENV,
    apply_gpu_memory_cap,
    default_allocator_settings,
    gpu_memory_outside_allocator_gib,
)
from qlora_sft.plan import ModelShape

from . import measure, report
from .workload import SHAPES, make_data, make_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The project path with one default switched back at a time (label -> recipe overrides).
ABLATION = {
    "no activation offload": ["train.offload_activations=false"],
    "no fused LoRA": ["lora.fused=false"],
    "lora dropout 0.05": ["lora.dropout=0.05"],
    "attention sdpa (dense block mask)": ["model.attn_implementation=sdpa"],
    "no liger kernels": ["model.liger_kernels=false"],
    "fp32 upcast of frozen weights": ["model.upcast_frozen=true"],
    "micro batch 2x2048 tokens": ["train.micro_batch_tokens=4096"],
    "embedding in host memory": ["model.embedding_in_host_memory=true", "model.lm_head_in_host_memory=false"],
    "micro batch 2x2048 tokens, embedding in host memory": [
        "train.micro_batch_tokens=4096",
        "model.embedding_in_host_memory=true",
        "model.lm_head_in_host_memory=false",
    ],
    # both frozen tables in host memory (what `auto` chooses on one GPU where memory is short)
    "both tables in host memory": ["model.embedding_in_host_memory=true", "model.lm_head_in_host_memory=true"],
    "micro batch 2x2048 tokens, both tables in host memory": [
        "train.micro_batch_tokens=4096",
        "model.embedding_in_host_memory=true",
        "model.lm_head_in_host_memory=true",
    ],
    "optim paged_adamw_32bit": ["train.optim=paged_adamw_32bit"],
    "no packing (padded rows of 4)": ["data.packing=false"],
    "torch.compile": ["train.torch_compile=true"],
}
PEAK_2X2048 = "micro batch 2x2048 tokens"
# --------------------------------------------------------------------------------------------
# Workers (one process each)
# --------------------------------------------------------------------------------------------


def notebook_worker(mode: str, model_dir: Path, data_path: Path, steps: int, max_length: int, out: Path) -> None:
    """The baseline (and peer) written the way the seed notebooks do it: bnb + peft + TRL, no qlora-sft."""
    import datasets
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    t0 = time.time()
    gpu = torch.cuda.is_available()  # the CPU only serves smoke tests of this script
    apply_gpu_memory_cap()  # --gpu-cap, as `qlora-sft train` applies it
    dtype = torch.bfloat16 if gpu else torch.float32
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bnb,
        device_map={"": 0 if gpu else "cpu"},
        attn_implementation="sdpa",
        dtype=dtype,
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    ds = datasets.load_dataset("json", data_files=str(data_path), split="train")
    peer = mode == "peer"
    args = SFTConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=2 if peer else 4,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        optim="paged_adamw_32bit" if gpu else "adamw_torch",
        bf16=gpu,
        use_cpu=not gpu,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=max_length,
        packing=peer,
        packing_strategy="bfd",
        padding_free=peer,
        use_liger_kernel=peer and gpu,
        dataloader_num_workers=2,
    )
    counts = {"computed": 0, "real": 0}
    timer = measure.StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=lora,
        callbacks=[timer],
    )
    measure.count_tokens(trainer, counts)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    trainer.train()
    tokens = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    write_worker_result(out, timer.times, tokens, start - t0, start, counts)


def project_recipe(model_dir: Path, data_path: Path, out: Path, steps: int, max_length: int) -> dict[str, Any]:
    """The project mode's recipe: the defaults, plus what the benchmark fixes (data, steps, lr)."""
    return {
        "run": {"name": "project", "output_dir": str(out / "runs")},
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "sources": [{"path": str(data_path)}],
            "eval_fraction": 0.0,
            "max_length": max_length,
            "on_bad_row": "skip",
        },
        "train": {
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 10**6,
            "learning_rate": 2e-4,
            "dataloader_num_workers": 2,
        },
    }


def project_worker(
    model_dir: Path, data_path: Path, steps: int, max_length: int, out: Path, overrides: list[str], profile_step: int
) -> None:
    """`qlora-sft train` exactly as users run it (in-process, to time it from the inside)."""
    import torch
    import yaml

    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    t0 = time.time()
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(project_recipe(model_dir, data_path, out, steps, max_length)))
    recipe = load_recipe(recipe_path, overrides)
    counts = {"computed": 0, "real": 0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    timer = measure.StepTimer()
    callbacks: list[Any] = [timer]
    if profile_step:
        callbacks.append(measure.StepProfiler(profile_step, out))
    train(recipe, extra_callbacks=callbacks, on_trainer=lambda t: measure.count_tokens(t, counts))
    rows = [json.loads(x) for x in (recipe.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["num_tokens"] for r in rows if "num_tokens" in r and "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    write_worker_result(out, timer.times, tokens, start - t0, start, counts, losses)


def write_worker_result(
    out: Path,
    times: list[float],
    tokens: list[float],
    load_s: float,
    start: float,
    counts: dict[str, int],
    losses: list[float] | None = None,
) -> None:
    import torch

    tps = measure.tokens_per_s(times, tokens)
    padding = 1 - counts["real"] / counts["computed"] if counts["computed"] else 0.0
    gpu = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    (out / "result.json").write_text(
        json.dumps(
            {
                "tokens_per_s": tps,
                "padding_fraction": padding,
                "peak_gib": peak,
                # what a card of a given size runs out of: PyTorch's reserved peak plus what is in use
                # outside its allocator (the CUDA context, other libraries' buffers)
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
                "outside_allocator_gib": gpu_memory_outside_allocator_gib() if gpu else None,
                "gpu_cap_gib": float(os.environ[GPU_MEMORY_CAP_ENV]) if os.environ.get(GPU_MEMORY_CAP_ENV) else None,
                "load_s": load_s,
                "time_to_first_step_s": times[0] - start if times else None,
                "steps": len(times),
                "step_times": [b - a for a, b in itertools.pairwise(times)],
                "losses": losses or [],
            }
        )
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def summary(result: dict[str, Any]) -> str:
    """One mode's result as printed while the run goes on (without the per-step lists)."""
    return json.dumps({k: v for k, v in result.items() if k not in ("step_times", "losses")})


def run_worker(
    name: str, argv: list[str], out: Path, timeout: int, cmd: list[str] | None = None, site: str = ""
) -> dict[str, Any]:
    """One mode in its own process (`cmd`, default a `bench.run --worker`); `site` goes first on its
    PYTHONPATH."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = cmd or [sys.executable, "-m", "bench.run", "--worker", *argv, "--worker-out", str(out)]
    env = dict(os.environ)
    if argv[:1] == ["project"]:
        default_allocator_settings(env)  # as `qlora-sft train` sets it (the worker trains in-process)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (site, env.get("PYTHONPATH", "")) if x)
    try:
        with (out / "log.txt").open("w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"mode": name, "returncode": "timeout", "log_tail": (out / "log.txt").read_text()[-2500:]}
    res = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {}
    if (out / "profile.json").is_file():
        res["profile"] = json.loads((out / "profile.json").read_text())
    res.update(mode=name, returncode=proc.returncode)
    if proc.returncode:
        res["log_tail"] = (out / "log.txt").read_text()[-2500:]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--mode", default="baseline,peer,project")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--ablation-only", default="", help="comma-separated ablation labels (default: all)")
    ap.add_argument(
        "--profile-step",
        type=int,
        default=0,
        help="profile this step (kernel time, what is alive at the memory peak) in an extra, untimed project run",
    )
    ap.add_argument("--project-overrides", nargs="*", default=[])
    ap.add_argument("--cache", default=str(HERE / ".cache"))
    ap.add_argument("--unsloth-site", default=str(REPO / ".site-unsloth"), help="unsloth's own target directory")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--worker")
    ap.add_argument("--worker-out")
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument("--prequantized", action="store_true", help="write the model directly in NF4 (bf16 storage)")
    ap.add_argument("--gpu-cap", type=gib, help="cap the GPU's memory at this many GiB in every mode")
    ap.add_argument("--tag", default="", help="suffix of the results file name (e.g. -cap24-mb4)")
    ap.add_argument(
        "--micro-batch",
        type=int,
        help="packed rows of --max-length per micro batch for project and unsloth (default: each one's own, 4)",
    )
    args = ap.parse_args()

    cache = Path(args.cache)
    model_dir = cache / (args.shape + ("-nf4" if args.prequantized else ""))
    data_path = cache / f"sharegpt-like-v2-{args.rows}.jsonl"
    if args.worker:
        out = Path(args.worker_out)
        if args.worker == "project":
            project_worker(model_dir, data_path, args.steps, args.max_length, out, args.overrides, args.profile_step)
        else:
            notebook_worker(args.worker, model_dir, data_path, args.steps, args.max_length, out)
        return 0

    import torch

    if args.gpu_cap is not None:
        os.environ[GPU_MEMORY_CAP_ENV] = str(args.gpu_cap)  # every mode's process applies it
    elif os.environ.get(GPU_MEMORY_CAP_ENV):  # set by the caller: every mode applies it too, so record it
        args.gpu_cap = gib(os.environ[GPU_MEMORY_CAP_ENV])
    if args.micro_batch is not None:
        if args.micro_batch < 1:
            ap.error(f"--micro-batch {args.micro_batch}: give a number of rows, at least 1")
        batch_keys = ("train.micro_batch_tokens", "train.per_device_train_batch_size", "train.global_batch_size")
        clash = [o for o in args.project_overrides if o.split("=", 1)[0] in (*batch_keys, "data.packing")]
        if clash:
            clashing = " ".join(clash)
            ap.error(f"--micro-batch sets the project's micro batch; --project-overrides {clashing} would change it")
    t0 = time.time()
    make_model(args.shape, model_dir, prequantized=args.prequantized)
    make_data(data_path, n=args.rows, max_len=args.max_length)
    lengths = [
        sum(len(m["content"].split()) for m in json.loads(x)["messages"]) + 6
        for x in data_path.read_text().splitlines()
    ]
    mean_len = sum(lengths) / len(lengths)
    print(f"workload ready in {time.time() - t0:.0f} s; mean example length {mean_len:.0f} tokens", flush=True)
    common = [
        "--shape",
        args.shape,
        "--steps",
        str(args.steps),
        "--max-length",
        str(args.max_length),
        "--rows",
        str(args.rows),
        "--cache",
        str(cache),
        *(["--prequantized"] if args.prequantized else []),
    ]

    gpu = report.gpu_name()  # before any mode: a failing GPU stops the run here, not after one

    def write_results() -> None:
        """The results so far (written after every mode: a run cut short keeps what it measured)."""
        shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()), args.shape)
        for r in results.values():
            r["mfu"] = measure.mfu(r.get("tokens_per_s"), shape, mean_len, gpu)

        def tps(name: str) -> float | None:
            return (results.get(name) or {}).get("tokens_per_s")

        payload = {
            "gpu": gpu,
            "shape": args.shape,
            "num_gpus": 1,
            "command": "python -m bench.run " + " ".join(sys.argv[1:]),
            "torch": torch.__version__,
            "prequantized": args.prequantized,
            "per_gpu_cap_gib": args.gpu_cap,
            "micro_batch_rows": args.micro_batch,
            "baseline_tokens_per_s": tps("baseline"),
            "peer_tokens_per_s": tps("peer"),
            "project_tokens_per_s": tps("project"),
            "ratio": tps("project") / tps("baseline") if tps("project") and tps("baseline") else None,
            "peer_ratio": tps("project") / tps("peer") if tps("project") and tps("peer") else None,
            "unsloth_tokens_per_s": tps("unsloth"),
            "unsloth_peak_gib": (results.get("unsloth") or {}).get("peak_gib"),
            "unsloth_ratio": tps("project") / tps("unsloth") if tps("project") and tps("unsloth") else None,
            "baseline_peak_gib": (results.get("baseline") or {}).get("peak_gib"),
            "project_peak_gib": (results.get("project") or {}).get("peak_gib"),
            "mfu": (results.get("project") or {}).get("mfu"),
            "peak_gib_2x2048": (results.get(f"project, {PEAK_2X2048}") or {}).get("peak_gib"),
            "profile": profile,
            "mean_example_tokens": mean_len,
            "results": results,
        }
        report.write(report.results_base(Path(args.out), gpu, args.shape, args.tag), payload, render(payload, args))

    runs = cache / "bench-runs" / args.shape
    shutil.rmtree(runs, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    profile = None
    project_overrides = list(args.project_overrides)
    if args.micro_batch:
        project_overrides.append(f"train.micro_batch_tokens={args.micro_batch * args.max_length}")
    project_extra = ["--overrides", *project_overrides] if project_overrides else []
    for mode in args.mode.split(","):
        extra = project_extra if mode == "project" else []
        if mode == "unsloth":
            cmd = [sys.executable, "-m", "bench.unsloth_peer", str(model_dir), str(data_path), str(runs / mode)]
            cmd += ["--steps", str(args.steps), "--max-length", str(args.max_length)]
            cmd += ["--micro-batch", str(args.micro_batch or 4)]
            results[mode] = run_worker(mode, [], runs / mode, args.timeout, cmd=cmd, site=args.unsloth_site)
        else:
            results[mode] = run_worker(mode, [mode, *common, *extra], runs / mode, args.timeout)
        print(summary(results[mode]), flush=True)
        write_results()
    if args.profile_step:
        # A run of its own: the profiler slows the step it records, which must not count in tokens/s.
        prof_run = run_worker(
            "project, profiled",
            ["project", *common, *project_extra, "--profile-step", str(args.profile_step)],
            runs / "project-profiled",
            args.timeout,
        )
        profile = prof_run.get("profile")
        print(json.dumps({"profile": profile, "returncode": prof_run["returncode"]}), flush=True)
    if args.ablation:
        chosen = [x.strip() for x in args.ablation_only.split(",") if x.strip()]
        for label, overrides in ABLATION.items():
            if chosen and not any(c in label for c in chosen):
                continue
            key = f"project, {label}"
            results[key] = run_worker(
                key,
                ["project", *common, "--overrides", *project_overrides, *overrides],
                runs / key.replace(" ", "_").replace(",", ""),
                args.timeout,
            )
            print(summary(results[key]), flush=True)
            write_results()

    write_results()
    return 0


def render(p: dict[str, Any], args: argparse.Namespace) -> list[str]:
    results, base_tps = p["results"], p["baseline_tokens_per_s"]
    rows = []
    for name, r in results.items():
        t = r.get("tokens_per_s")
        ratio = f"{t / base_tps:.2f}" if t and base_tps else "-"
        if t and r.get("mfu") is not None:
            rows.append(
                [
                    name,
                    f"{t:.0f}",
                    ratio,
                    f"{r.get('padding_fraction', 0):.0%}",
                    f"{r.get('peak_gib') or 0:.2f}",
                    report.number(r.get("peak_reserved_gib"), ".2f"),
                    f"{r.get('time_to_first_step_s') or 0:.1f}",
                    f"{r['mfu']:.1%}",
                ]
            )
        else:
            rows.append([name, t or "failed", ratio, "-", r.get("peak_gib"), r.get("peak_reserved_gib"), "-", "-"])
    num = report.number

    def times(ratio: float | None) -> str:
        return "not measured" if ratio is None else f"{ratio:.2f}x"

    setup = "".join(
        [
            " (pre-quantized NF4)" if p.get("prequantized") else "",
            f", GPU capped at {p['per_gpu_cap_gib']:g} GiB" if p.get("per_gpu_cap_gib") else "",
            f", {p['micro_batch_rows']} rows per micro batch" if p.get("micro_batch_rows") else "",
        ]
    )
    lines = [
        f"# {args.shape}{setup} on {p['gpu']}: {args.steps} steps, max_length {args.max_length}",
        "",
        f"Command: `{p['command']}`",
        "",
        *report.table(
            ["mode", "real tokens/s", "x baseline", "padding", "peak GiB", "reserved GiB", "first step s", "MFU"], rows
        ),
        "",
        f"- project / baseline: {times(p['ratio'])}; project / peer: {times(p['peer_ratio'])}; "
        f"project / unsloth: {times(p.get('unsloth_ratio'))}",
        f"- peak GiB: baseline {num(p['baseline_peak_gib'], '.2f')}, unsloth {num(p.get('unsloth_peak_gib'), '.2f')}, "
        f"project {num(p['project_peak_gib'], '.2f')}, "
        f"project with micro batches of 2x2048 tokens (peak_gib_2x2048) {num(p['peak_gib_2x2048'], '.2f')}",
        f"- mean example length {p['mean_example_tokens']:.0f} tokens; tokens/s counts real (non-padding) tokens "
        f"after {measure.warmup_steps(args.steps)} warm-up steps",
        f"- MFU = real tokens/s x (6 N + 6 L h c) / {num(measure.peak_tflops(p['gpu']), '.0f')} TFLOP/s (dense "
        "bf16 peak), N = non-embedding parameters, L layers, h hidden size, c = mean attended context (half the "
        "mean example length); 6 N = frozen-base forward + gradient-checkpointing recompute + input-gradient "
        "backward",
    ]
    prof = p.get("profile")
    if prof:
        lines += ["", f"## One project step, CUDA kernel time ({prof['device_ms']:.0f} ms on the device)", ""]
        lines += report.table(
            ["bucket", "ms", "share"],
            [[k, f"{v:.1f}", f"{prof['buckets_share'][k]:.1%}"] for k, v in prof["buckets_ms"].items()],
        )
        lines += ["", "Top kernels:", ""]
        lines += report.table(
            ["kernel", "ms"], [[f"`{k}`", f"{v:.1f}"] for k, v in list(prof["top_kernels_ms"].items())[:12]]
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
