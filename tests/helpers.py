"""Shared test helpers: paths, launching CPU ranks, recipes and toy data, reading a run's metrics.
(Fixtures are in conftest.py; tests import these from here.)"""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

TESTS = Path(__file__).parent
REPO = TESTS.parent
DATA = TESTS / "data"

COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CONFIGS = REPO / "configs" / "accelerate"


# the smallest recipe that builds: enough for tests of how keys resolve and what is refused
MINIMAL_RECIPE: dict[str, Any] = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}}


def small_recipe(tmp_path: Path, **sections: dict) -> Path:
    """MINIMAL_RECIPE with its data file and runs/ in `tmp_path`, `sections` merged into it, as
    tmp_path/r.yaml. (A copy: MINIMAL_RECIPE's own sections are never changed, which a later test's
    recipe would carry: an earlier test's model path in another's job.)"""
    (tmp_path / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    raw = copy.deepcopy({**MINIMAL_RECIPE, "run": {"output_dir": str(tmp_path / "runs")}})
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return write_recipe(tmp_path / "r.yaml", raw)


def fake_bin(folder: Path, **scripts: str) -> Path:
    """Executable bash scripts `name` (body given) in `folder`, to put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return folder


def two_rank_mode(kind: str, zero: int = 0) -> Any:
    """A `LaunchMode` of 2 ranks (`kind`: ddp, fsdp, deepspeed with `zero` stage, cpu)."""
    from qlora_sft import launch

    return launch.LaunchMode(kind=kind, world_size=2, zero_stage=zero)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    """Environment for CPU ranks: the DDP config runs as gloo ranks, one thread each."""
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def torchrun_script(*args: str, cwd: Path, timeout: float = 600) -> tuple[int, str, str]:
    """`torchrun --nproc_per_node 2 ARGS` (a driver script and its arguments, or `-m qlora_sft ...`) as
    CPU ranks in a session of its own: (exit code, stdout, stderr). On a hang past `timeout`, the
    whole session is killed (nothing outlives the test)."""
    import signal
    import subprocess

    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
    launcher = subprocess.Popen(
        [*torchrun, "--master_port", str(free_port()), *args],
        cwd=cwd,
        env={**cpu_env(), "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = launcher.communicate(timeout=timeout)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            out, err = launcher.communicate()
    return launcher.returncode, out, err


def accelerate_cmd(*args: str, ranks: int = 2, config: str = "multi_gpu.yaml") -> list[str]:
    """`accelerate launch` of the bundled DDP config as CPU ranks, then `-m qlora_sft <args>`."""
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(CONFIGS / config),
        "--mixed_precision",
        "no",
        "--num_processes",
        str(ranks),
        "--main_process_port",
        str(free_port()),
        "-m",
        "qlora_sft",
        *args,
    ]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """The value logged at each step (the last one logged wins)."""
    return {r["step"]: r[key] for r in metrics(run_dir) if key in r}


def wait_for_losses(run_dir: Path, n: int, timeout: float = 300) -> None:
    """Wait until a running job has logged at least `n` training steps."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "logs" / "metrics.jsonl").is_file() and len(losses_by_step(run_dir)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} logged fewer than {n} steps within {timeout} s")


def write_toy_data(path: Path, n: int = 160, seed: int = 0) -> Path:
    """A learnable toy task: a fixed answer per question."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            k = rng.choice(sorted(COLOURS))
            f.write(
                json.dumps(
                    {
                        "instruction": f"What is the colour of the {k}?",
                        "input": "",
                        "output": f"The {k} is {COLOURS[k]}.",
                    }
                )
                + "\n"
            )
    return path


def recipe_dict(model_dir: Path, data_path: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "run": {"name": "tiny", "output_dir": str(out_dir), "seed": 0},
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"method": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"sources": [{"path": str(data_path)}], "eval_fraction": 0.1, "max_length": 64},
        "train": {
            "global_batch_size": 8,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-3,
            "max_steps": 30,
            "logging_steps": 5,
            "save_steps": 10,
            "dataloader_num_workers": 0,
        },
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B run file (`run-<id>.wandb`, what an offline run writes): the
    LevelDB log format W&B uses (7-byte file header `:W&B` + magic + version; 32 KiB blocks of records
    with a 7-byte header: crc32, length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", raw[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    block, records, pending, pos = 32768, [], b"", 7
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # full, or the last piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def recipe_problems(data: dict[str, Any], overrides: list[str] | None = None) -> list[str]:
    """The problems `build_recipe` reports for raw recipe data (+ overrides); the recipe must fail."""
    import pytest

    from qlora_sft.errors import RecipeError
    from qlora_sft.recipe import apply_overrides, build_recipe

    data, override_problems = apply_overrides(data, overrides or [])
    assert not override_problems
    with pytest.raises(RecipeError) as exc:
        build_recipe(data, source="r.yaml")
    return exc.value.problems


def bf16_nf4_config() -> Any:
    """NF4 with double quantization, computed and stored in bf16: QLoRA as FSDP shards it."""
    import torch
    from transformers import BitsAndBytesConfig

    bf16 = torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=bf16,
        bnb_4bit_quant_storage=bf16,
    )


def fake_checkpoint(folder: Path, step: int, **meta: Any) -> Path:
    """A checkpoint folder as a run publishes it (adapter, its config, trainer state, manifest, marker),
    without training: for the checks that read checkpoints. Other files go in before the call."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((25,), float(step))}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}\n')
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
    from qlora_sft import checkpoint

    checkpoint.write_manifest(folder, {"step": step, **meta})
    return folder


def copy_checkpoint_as(run: Path, source: str, step: int) -> Path:
    """A complete checkpoint-<step> of `run`, copied from its checkpoint `source` with the manifest
    rewritten for the step: a checkpoint newer than final/, as a relaunch that trains longer leaves it."""
    import shutil

    from qlora_sft import checkpoint

    newer = run / f"checkpoint-{step}"
    shutil.copytree(run / source, newer)
    manifest = json.loads((newer / checkpoint.MANIFEST).read_text())
    (newer / checkpoint.COMPLETE).unlink()
    (newer / checkpoint.MANIFEST).unlink()
    kept = {k: v for k, v in manifest.items() if k not in ("files", "completed")}
    checkpoint.write_manifest(newer, {**kept, "step": step})
    return newer


def cli_with_file_limit(*args: str, fsize: int | None = None, timeout: float = 300) -> Any:
    """`qlora-sft ARGS` in a subprocess; `fsize`: the largest file it may write (RLIMIT_FSIZE, with
    SIGXFSZ ignored so that a larger write fails with EFBIG, as a full disk's fails with ENOSPC)."""
    import subprocess

    code = (
        "import resource, signal, sys\n"
        "from qlora_sft.cli import main\n"
        f"fsize = {fsize!r}\n"
        "if fsize:\n"
        "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout)


# a short run that saves every 2 steps: the hostile checkpoint tests' recipe
SHORT_RUN = {"max_steps": 6, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-2}


def short_run_recipe(
    root: Path, tiny_model: Path, name: str, train: dict | None = None, **checkpoint_keys: Any
) -> Path:
    """A recipe file of SHORT_RUN (with `train` over it) on 48 toy rows under `root`, its run in
    root/runs/<name>, `checkpoint:` set to `checkpoint_keys`."""
    data = root / "toy.jsonl"
    if not data.exists():
        write_toy_data(data, n=48)
    raw = recipe_dict(tiny_model, data, root / "runs", run={"name": name}, train={**SHORT_RUN, **(train or {})})
    raw["checkpoint"] = checkpoint_keys
    return write_recipe(root / f"{name}.yaml", raw)
