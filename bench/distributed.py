"""The same QLoRA recipe in every launch mode, on real GPUs: 1 GPU, DDP, ZeRO-2, ZeRO-3, FSDP.

    python bench/distributed.py --shape llama3-8b --steps 20

For each mode it runs `accelerate launch --config_file configs/accelerate/<mode>.yaml -m qlora_sft
train <recipe>` (the command users run), then reads the run directory: real tokens/s (steps after
the warm-up), peak GPU memory per rank (logs/rank<i>.json), the loss at each of the first 10 steps,
and the `qlora-sft plan` estimate of peak memory for the same launch. Writes
bench/results/<date>-<gpu>-<shape>-distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

from workload import make_data, make_model  # noqa: E402

MODES = {
    "1gpu": ("single_gpu.yaml", 1),
    "ddp": ("multi_gpu.yaml", 2),
    "zero2": ("deepspeed_zero2.yaml", 2),
    "zero3": ("deepspeed_zero3.yaml", 2),
    "fsdp": ("fsdp_qlora.yaml", 2),
}


def recipe_for(model: Path, data: Path, out: Path, steps: int, micro: int, gbs: int, max_length: int) -> dict:
    return {
        "run": {"name": "bench", "output_dir": str(out), "seed": 0},
        "model": {"name_or_path": str(model), "attn_implementation": "sdpa"},
        "quantization": {"method": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "sources": [{"path": str(data)}],
            "eval_fraction": 0.0,
            "max_length": max_length,
            "on_bad_row": "skip",
        },
        "train": {
            "global_batch_size": gbs,
            "per_device_train_batch_size": micro,
            "learning_rate": 2e-4,
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 100000,
            "lr_scheduler_type": "constant",
            "dataloader_num_workers": 2,
            "optim": "adamw_torch",
        },
    }


def tokens_per_s(rows: list[dict], skip: int) -> float | None:
    steps = [r for r in rows if "loss" in r and "num_tokens" in r]
    if len(steps) <= skip + 1:
        return None
    a, b = steps[skip], steps[-1]
    return (b["num_tokens"] - a["num_tokens"]) / (b["time"] - a["time"])


def run_mode(name: str, recipe_path: Path, out: Path, log_dir: Path) -> dict:
    config, gpus = MODES[name]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / config),
        "--num_processes",
        str(gpus),
        "--main_process_port",
        str(29500 + hash(name) % 1000),
        "-m",
        "qlora_sft",
        "train",
        str(recipe_path),
        f"run.name={name}",
    ]
    t0 = time.time()
    with (log_dir / f"{name}.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    run_dir = out / name
    result: dict = {
        "mode": name,
        "config": config,
        "gpus": gpus,
        "returncode": proc.returncode,
        "wall_s": round(time.time() - t0, 1),
        "command": " ".join(cmd),
    }
    metrics = run_dir / "logs" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        result["losses_first_10"] = [r["loss"] for r in rows if "loss" in r][:10]
        result["tokens_per_s"] = tokens_per_s(rows, skip=4)
        result["steps"] = max((r["step"] for r in rows), default=0)
    peaks = [json.loads(p.read_text()) for p in sorted((run_dir / "logs").glob("rank*.json"))]
    result["peak_gib_per_rank"] = [round(p.get("peak_allocated_gib", 0), 2) for p in peaks]
    if proc.returncode != 0:
        result["log_tail"] = (log_dir / f"{name}.log").read_text()[-3000:]
    return result


def plan_estimate(recipe_path: Path, config: str, gpus: int) -> float:
    from qlora_sft.plan import ModelShape, estimate_memory, read_launch_config, read_model_config
    from qlora_sft.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    launch = read_launch_config(REPO / "configs" / "accelerate" / config)
    shape = ModelShape.from_config(read_model_config(recipe.model.name_or_path))
    return round(estimate_memory(shape, recipe, launch, gpus if launch.kind != "single" else 1).total, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--cache", default=str(REPO / "bench" / ".cache"))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    import torch

    cache = Path(args.cache)
    t0 = time.time()
    model = make_model(args.shape, cache / args.shape)
    data = make_data(cache / "sharegpt-like.jsonl", n=4000)
    print(f"workload ready in {time.time() - t0:.0f} s", flush=True)
    runs = cache / "runs" / args.shape
    recipe_path = cache / f"{args.shape}-recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            recipe_for(model, data, runs, args.steps, args.micro, args.global_batch, args.max_length), sort_keys=False
        )
    )
    log_dir = cache / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.modes.split(","):
        import shutil

        shutil.rmtree(runs / name, ignore_errors=True)
        r = run_mode(name, recipe_path, runs, log_dir)
        r["plan_estimate_gib"] = plan_estimate(recipe_path, MODES[name][0], MODES[name][1])
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
        if "log_tail" in r:
            print(r["log_tail"], flush=True)

    by = {r["mode"]: r for r in results}
    checks = {}
    if "1gpu" in by and "ddp" in by and by["1gpu"].get("losses_first_10") and by["ddp"].get("losses_first_10"):
        a, b = by["1gpu"]["losses_first_10"], by["ddp"]["losses_first_10"]
        checks["max_abs_loss_diff_1gpu_ga2_vs_ddp"] = max(abs(x - y) for x, y in zip(a, b, strict=False))
        if by["1gpu"].get("tokens_per_s") and by["ddp"].get("tokens_per_s"):
            checks["ddp_speedup_vs_1gpu"] = by["ddp"]["tokens_per_s"] / by["1gpu"]["tokens_per_s"]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stamp = dt.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stamp}-{gpu.replace(' ', '_')}-{args.shape}-distributed"
    payload = {
        "gpu": gpu,
        "shape": args.shape,
        "steps": args.steps,
        "micro_batch": args.micro,
        "global_batch": args.global_batch,
        "max_length": args.max_length,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "results": results,
        "checks": checks,
    }
    base.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"# Launch modes on {gpu}: {args.shape}, QLoRA NF4, global batch {args.global_batch}, "
        f"micro batch {args.micro}, max_length {args.max_length}, {args.steps} steps",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| mode | GPUs | real tokens/s | peak GiB per rank (measured) | plan estimate GiB | error | loss steps 1-10 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        peak = max(r.get("peak_gib_per_rank") or [0])
        est = r["plan_estimate_gib"]
        err = f"{(est - peak) / peak:+.0%}" if peak else "n/a"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else f"failed (rc {r['returncode']})"
        losses = ", ".join(f"{x:.4f}" for x in r.get("losses_first_10", []))
        lines.append(f"| {r['mode']} | {r['gpus']} | {tps} | {r.get('peak_gib_per_rank')} | {est} | {err} | {losses} |")
    lines += ["", "Checks: " + ", ".join(f"{k} = {v:.4g}" for k, v in checks.items())]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
