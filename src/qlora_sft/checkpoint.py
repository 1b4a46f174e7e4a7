"""Run directories and checkpoints: who writes what, and what counts as complete.

main_process_writes  the one helper for shared files: barrier, main process writes, barrier
prepare_run_dir      refuse a different recipe in an existing run directory; write recipe.yaml
CompletionCallback   after the Trainer saves a checkpoint, the main process writes
                     manifest.json and then COMPLETE, last
find_resume          the newest complete checkpoint; incomplete ones are skipped with the reason
Checkpointing        everything checkpointing wires into one training run: the Trainer class,
                     the preemption and fault callbacks, the manifest fields, the PREEMPTED marker
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError, RunDirError
from .recipe import Recipe, build_recipe

log = logging.getLogger("qlora_sft")

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
STAGING = ".staging"
PREEMPTED = "PREEMPTED"
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved a checkpoint, start me again"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Keys that may change between launches of the same run (they do not change what is trained).
RESUMABLE_CHANGES = (
    "run.overwrite",
    "model.loader",
    "checkpoint.",
    "cluster.",
    "train.max_steps",
    "train.num_train_epochs",
    "train.logging_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.dataloader_num_workers",
    "train.report_to",
    "train.per_device_eval_batch_size",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.deepspeed",  # the launch's DeepSpeed config (a launch may change; check_resume guards ZeRO shards)
    "data.rebuild",
    "data.allow_no_eos",
)


@contextlib.contextmanager
def main_process_writes() -> Iterator[bool]:
    """All ranks meet, the main process writes shared files inside the block (the block gets True
    there, False elsewhere), all ranks meet again. Use it for every shared file."""
    from .launch import distributed_state

    state = distributed_state()
    state.wait_for_everyone()
    try:
        yield state.is_main_process
    finally:
        state.wait_for_everyone()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------


def _ignorable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    a, b = old.fingerprint(), new.fingerprint()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _ignorable(key):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def read_run_recipe(run_dir: Path) -> Recipe:
    data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    data.pop("launch", None)
    quant = data.get("quantization") or {}
    if quant.get("method") in ("none", "int8"):
        quant.pop("double_quant", None)  # written as true by versions before it resolved to false
    return build_recipe(data, source=str(run_dir / "recipe.yaml"))


def check_run_dir(recipe: Recipe) -> str:
    """What launching `recipe` would do with its run directory: 'new', 'resume' or 'replace'.
    Raises RunDirError when it must not be touched. Reads only; safe on any rank."""
    run_dir = recipe.run_dir
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    if recipe.run.overwrite:
        return "replace" if (run_dir / "recipe.yaml").exists() or any(run_dir.iterdir()) else "new"
    if not (run_dir / "recipe.yaml").exists():
        raise RunDirError(
            f"run directory {run_dir} exists and is not a qlora-sft run (no recipe.yaml). Choose another "
            "run.name / run.output_dir, or set run.overwrite=true to move it aside."
        )
    try:
        old = read_run_recipe(run_dir)
    except RecipeError as exc:
        raise RunDirError(
            f"{run_dir}/recipe.yaml cannot be read as a recipe ({exc}). Set run.overwrite=true to move the "
            "old run aside, or choose another run.name."
        ) from None
    if recipe.checkpoint.resume == "never" and list_checkpoints(run_dir):
        raise RunDirError(
            f"checkpoint.resume=never but {run_dir} already has checkpoints. Set run.overwrite=true to move "
            "the old run aside and start over, or use another run.name."
        )
    diffs = recipe_differences(old, recipe)
    if diffs:
        shown = "\n".join(f"    {d}" for d in diffs[:12])
        more = f"\n    ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
        raise RunDirError(
            f"run directory {run_dir} holds a run of a different recipe:\n{shown}{more}\n"
            "Use another run.name for a new run, or run.overwrite=true to move the old run aside "
            f"(to {run_dir.name}.replaced-<time>); nothing was changed."
        )
    return "resume"


def prepare_run_dir(recipe: Recipe, launch: dict[str, Any]) -> Path:
    """Check the run directory on every rank, then let the main process move an old run aside
    (with run.overwrite) and write the resolved recipe. Returns the run directory."""
    action = check_run_dir(recipe)
    run_dir = recipe.run_dir
    with main_process_writes() as is_main:
        if is_main:
            if action == "replace":
                aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                run_dir.rename(aside)
                log.warning("run.overwrite: moved the previous run %s aside to %s", run_dir, aside)
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            (run_dir / PREEMPTED).unlink(missing_ok=True)  # this launch is the requeued one
            resolved = recipe.to_dict()
            resolved["launch"] = launch
            atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    complete: bool
    reason: str = ""


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Is this checkpoint complete? Marker present, manifest readable, every listed file present
    with its recorded size."""
    m = CHECKPOINT_RE.match(path.name)
    step = int(m.group(1)) if m else -1
    if not (path / COMPLETE).is_file():
        return CheckpointInfo(step, path, False, f"no {COMPLETE} marker (interrupted while saving)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return CheckpointInfo(step, path, False, f"{MANIFEST} unreadable ({exc})")
    for rel, size in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return CheckpointInfo(step, path, False, f"file {rel} is missing")
        if f.stat().st_size != size:
            return CheckpointInfo(step, path, False, f"file {rel} has {f.stat().st_size} bytes, expected {size}")
    return CheckpointInfo(step, path, True)


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """All checkpoint-<step> folders of a run, newest first."""
    if not run_dir.is_dir():
        return []
    found = [inspect_checkpoint(p) for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda c: c.step, reverse=True)


def find_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from per `checkpoint.resume`, warning about skipped ones."""
    choice = recipe.checkpoint.resume
    if choice == "never":
        return None
    if choice != "auto":
        path = Path(choice)
        info = inspect_checkpoint(path) if path.is_dir() else None
        if info is None or not info.complete:
            why = info.reason if info else "not a folder"
            raise RunDirError(f"checkpoint.resume={choice}: cannot resume from it ({why})")
        return path
    staging = recipe.run_dir / STAGING
    if staging.is_dir():
        for p in sorted(staging.glob("checkpoint-*")):
            log.warning("skipping %s for resume: an interrupted save (it never completed); left in place", p)
    for info in list_checkpoints(recipe.run_dir):
        if info.complete:
            return info.path
        log.warning("skipping %s for resume: %s", info.path, info.reason)
    return None


def write_manifest(ckpt: Path, meta: dict[str, Any]) -> None:
    """Record every file with its size, then the marker, last. Main process only."""
    files = {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE, MANIFEST) and not p.name.startswith(".")
    }
    latest = ckpt / "latest"  # DeepSpeed's tag file: the folder holding its per-rank shards
    if latest.is_file():
        meta = {**meta, "deepspeed_tag": latest.read_text().strip()}
    atomic_write_text(ckpt / MANIFEST, json.dumps({**meta, "files": files}, indent=2))
    atomic_write_text(ckpt / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")


class InvalidAdapterError(RuntimeError):
    """A saved adapter holds no real LoRA weights (e.g. ZeRO-3 partitions saved as Size([0]))."""


def check_adapter(folder: Path) -> int:
    """Re-read a saved adapter: every lora_A/lora_B must be 2-D, non-empty and of the configured
    rank. Guards against the empty adapters ZeRO-3 and FSDP can save (trl#4416, peft#2892,
    DeepSpeed#7900). Returns the number of LoRA tensors; raises InvalidAdapterError."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    config_file = folder / "adapter_config.json"
    if not weights.is_file() or not config_file.is_file():
        raise InvalidAdapterError(f"{folder}: adapter_model.safetensors or adapter_config.json was not written")
    config = json.loads(config_file.read_text())
    r, pattern = int(config.get("r", 0)), config.get("rank_pattern") or {}
    n, problems = 0, []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = re.search(r"(.+)\.lora_([AB])(?:\.\w+)?\.weight$", key)
            if not m:
                continue
            n += 1
            shape = tuple(f.get_slice(key).get_shape())
            module = m.group(1).removeprefix("base_model.model.")
            rank = next((v for k, v in pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), r)
            want = shape[0] if m.group(2) == "A" else (shape[1] if len(shape) == 2 else -1)
            if len(shape) != 2 or 0 in shape or want != rank:
                problems.append(f"{key} has shape {shape}")
    if n == 0:
        problems.append("no lora_A/lora_B tensors at all")
    if problems:
        raise InvalidAdapterError(
            f"the adapter saved in {folder} is not a real LoRA adapter of rank {r}: {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}. Under ZeRO-3/FSDP this means partitioned parameters were "
            "saved without gathering them; the checkpoint was not published."
        )
    return n


def publish(staged: Path, final: Path, meta: dict[str, Any]) -> None:
    """Check the adapter, complete a staged folder (manifest, then marker) and rename it into place.
    Main process only, after every rank has written its part. A folder already at `final` (the same
    step saved again after a resume) is moved back into staging first, never deleted before the new
    one is in place."""
    check_adapter(staged)
    write_manifest(staged, meta)
    old = None
    if final.exists():
        old = staged.parent / f"{final.name}.old-{time.time_ns()}"
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def apply_retention(run_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` complete ones of this run.
    Incomplete checkpoints are left for the user to inspect. Main process only."""
    if not keep_last:
        return []
    complete = [c for c in list_checkpoints(run_dir) if c.complete]
    removed = []
    for info in complete[keep_last:]:
        shutil.rmtree(info.path)
        removed.append(info.path)
        log.info("checkpoint.keep_last=%d: removed %s", keep_last, info.path)
    return removed


class Fault:
    """Fault injection for tests, from QLORA_SFT_FAULT="<action>@<step>[:<rank>]":
    `kill@8:1` SIGKILLs rank 1 as step 8 begins; `crashsave@10:0` SIGKILLs rank 0 while
    checkpoint 10 is saved (files written, marker not yet). Off unless the variable is set."""

    def __init__(self, spec: str | None = None):
        spec = spec if spec is not None else os.environ.get("QLORA_SFT_FAULT", "")
        self.action = ""
        self.step = -1
        self.rank: int | None = None
        m = re.fullmatch(r"(kill|crashsave)@(\d+)(?::(\d+))?", spec.strip())
        if m:
            self.action, self.step = m.group(1), int(m.group(2))
            self.rank = int(m.group(3)) if m.group(3) is not None else None

    def trigger(self, action: str, step: int, rank: int) -> None:
        """SIGKILL this process when the configured fault is `action` at `step` on this rank."""
        if self.action == action and self.step == step and self.rank in (None, rank):
            log.warning("QLORA_SFT_FAULT: %s at step %d on rank %d", action, step, rank)
            os.kill(os.getpid(), signal.SIGKILL)


class CheckpointingMixin:
    """Mixed into the Trainer by `Checkpointing.trainer`: complete-or-absent checkpoints (see the
    module docstring). `ckpt` is the run's Checkpointing."""

    ckpt: Checkpointing
    _staging_save = False

    def _get_output_dir(self, trial: Any) -> str:  # Trainer hook: where checkpoint-<step> is written
        base = super()._get_output_dir(trial)  # type: ignore[misc]
        return str(Path(base) / STAGING) if self._staging_save else base

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        state = self.state  # type: ignore[attr-defined]
        args = self.args  # type: ignore[attr-defined]
        run_dir = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        name = f"checkpoint-{state.global_step}"
        staged = run_dir / STAGING / name
        with main_process_writes() as is_main:
            if is_main:
                shutil.rmtree(staged, ignore_errors=True)  # leftovers of an interrupted save
                staged.parent.mkdir(parents=True, exist_ok=True)
        self._staging_save = True
        try:
            with peft_sees_fsdp_names(self):
                super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_save = False
        self.ckpt.fault.trigger("crashsave", state.global_step, args.process_index)
        with main_process_writes() as is_main:
            if is_main:
                publish(staged, run_dir / name, self.manifest(state.global_step))
                apply_retention(run_dir, self.ckpt.keep_last)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume loads the adapter through peft's `load_adapter`, which upcasts adapter weights to
        fp32, while a fresh QLoRA run trains them in bf16 (TRL casts them): a resumed run would then
        drift from an uninterrupted one. Restore each trainable parameter's dtype."""
        target = model if model is not None else self.model  # type: ignore[attr-defined]
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        with peft_sees_fsdp_names(self):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        for n, p in target.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])

    def manifest(self, step: int) -> dict[str, Any]:
        state = self.state  # type: ignore[attr-defined]
        meta = self.ckpt.meta
        return {**meta, "step": step, "epoch": state.epoch, "examples_consumed": step * meta.get("global_batch", 0)}

    def save_final(self, final: Path) -> None:
        """The end-of-training adapter + tokenizer, staged and published like a checkpoint."""
        staged = final.parent / STAGING / final.name
        with main_process_writes() as is_main:
            if is_main:
                shutil.rmtree(staged, ignore_errors=True)
        with peft_sees_fsdp_names(self):
            self.save_model(str(staged))  # type: ignore[attr-defined]
        with main_process_writes() as is_main:
            if is_main:
                publish(staged, final, self.manifest(self.state.global_step))  # type: ignore[attr-defined]


@functools.cache
def trainer_class(base: type) -> type:
    """`base` (a Trainer class) with complete-or-absent checkpoints mixed in."""
    return type(f"Checkpointing{base.__name__}", (CheckpointingMixin, base), {})


def run_metadata(recipe: Recipe, mode: Any, batch: Any) -> dict[str, Any]:
    """What a launch was: written as recipe.yaml's `launch:` block and into every manifest (resume
    checks the world size and global batch against it)."""
    return {
        "recipe_hash": recipe.hash(),
        "mode": mode.kind,
        "world_size": mode.world_size,
        "zero_stage": mode.zero_stage,
        "micro_batch": batch.micro_batch,
        "grad_accum": batch.grad_accum,
        "global_batch": batch.global_batch,
    }


class Checkpointing:
    """Everything checkpointing wires into one training run: the Trainer class with staged,
    published checkpoints, the preemption and fault-injection callbacks, and the PREEMPTED marker
    for the launcher."""

    def __init__(self, recipe: Recipe, meta: dict[str, Any], rank: int):
        self.meta = meta
        self.keep_last = recipe.checkpoint.keep_last
        self.rank = rank
        self.fault = Fault()
        self.preemption = preemption_callback(list(recipe.checkpoint.signals))

    def callbacks(self) -> list[Any]:
        return [self.preemption, fault_callback(self.fault, self.rank)]

    def trainer(self, base: type, **kwargs: Any) -> Any:
        """An instance of `base` (e.g. trl.SFTTrainer) that checkpoints this way."""
        trainer = trainer_class(base)(**kwargs)
        trainer.ckpt = self
        return trainer

    @property
    def preempted(self) -> bool:
        return self.preemption.stopped_at_step is not None

    def record_preemption(self, run_dir: Path, step: int) -> float:
        """After a preemption stop (the checkpoint at `step` is complete): the main process writes
        PREEMPTED for launchers that lose the exit code. Returns seconds from the signal."""
        p = self.preemption
        waited = time.time() - (p.signalled_at or time.time())
        with main_process_writes() as is_main:
            if is_main:
                record = {"step": step, "signal": p.signal_name, "seconds_from_signal_to_exit": round(waited, 3)}
                atomic_write_text(run_dir / PREEMPTED, json.dumps(record) + "\n")
        log.warning(
            "preempted: checkpoint-%d is complete; %.1f s from signal to exit; exiting with code %d "
            "so the launcher requeues the job",
            step,
            waited,
            REQUEUE_EXIT_CODE,
        )
        return waited


@contextlib.contextmanager
def peft_sees_fsdp_names(trainer: Any) -> Iterator[None]:
    """peft (0.21) picks a model's adapter tensors out of a state dict by the model's module names.
    Under FSDP1 those names carry a `_fsdp_wrapped_module.` segment per wrapped unit (every decoder
    layer and every LoRA layer is one), while FSDP's full state dict has plain keys: peft then finds
    no adapter tensor, saves an empty adapter and, on resume, loads nothing without a word (seen on an
    H100: the adapter check refused the save; `test_checkpoint.py` reproduces it on the CPU). While
    the Trainer saves or loads, the FSDP-wrapped model and the PeftModel inside it report their
    module names as the state dict spells them. Nothing changes outside FSDP."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        yield
        return
    models = [trainer.model, trainer.accelerator.unwrap_model(trainer.model)]
    with plain_fsdp_names(*models):
        yield


@contextlib.contextmanager
def plain_fsdp_names(*models: Any) -> Iterator[None]:
    """`named_modules()` of each model without FSDP's `_fsdp_wrapped_module.` segments (an instance
    attribute over the class method, removed on exit)."""
    patched = []
    for m in {id(m): m for m in models}.values():
        method = type(m).named_modules

        def named_modules(*args: Any, _model: Any = m, _method: Any = method, **kwargs: Any) -> Iterator[Any]:
            for name, module in _method(_model, *args, **kwargs):
                yield name.replace("_fsdp_wrapped_module.", ""), module

        m.named_modules = named_modules
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.named_modules


def check_resume(path: Path, world_size: int, global_batch: int, mode_kind: str) -> dict[str, Any]:
    """Refuse resumes that would restore silently partially. Returns the manifest."""
    manifest = json.loads((path / MANIFEST).read_text())
    old_ws, old_gb = manifest.get("world_size"), manifest.get("global_batch")
    if old_gb and old_gb != global_batch:
        raise RunDirError(
            f"{path} was saved with global batch {old_gb}, this launch has {global_batch}: the data position "
            "and the schedule would not match. Keep train.global_batch_size as it was (the micro batch and "
            "the number of GPUs may change)."
        )
    if old_ws != world_size:
        if manifest.get("deepspeed_tag") or mode_kind == "deepspeed":
            raise RunDirError(
                f"{path} holds a DeepSpeed checkpoint of {old_ws} rank(s) (tag {manifest.get('deepspeed_tag')}); "
                f"this launch has {world_size}. DeepSpeed cannot load optimizer shards across world sizes: "
                f"relaunch with {old_ws} processes, or convert it with DeepSpeed's universal checkpoint tool "
                f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {path}/"
                f"{manifest.get('deepspeed_tag', 'global_stepN')} --output_folder <dir>) and resume from that."
            )
        log.warning(
            "resuming %s, saved by %s rank(s), on %d rank(s): same global batch %s and data position (step %s); "
            "per-rank RNG streams are not restored, so dropout masks differ from an uninterrupted run",
            path,
            old_ws,
            world_size,
            global_batch,
            manifest.get("step"),
        )
    return manifest


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------


def parse_signal(name: str) -> signal.Signals:
    name = name.upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def preemption_callback(signals: list[str]) -> Any:
    """A TrainerCallback: the handler only records the signal; at each step boundary the ranks agree
    (all-reduce MAX) and, if any rank was signalled, save a checkpoint together and stop."""
    import torch
    from transformers import TrainerCallback

    class Preemption(TrainerCallback):
        def __init__(self) -> None:
            self.signalled_at: float | None = None
            self.signal_name = ""
            self.stopped_at_step: int | None = None
            for name in signals:
                signal.signal(parse_signal(name), self._handler)

        def _handler(self, signum: int, frame: Any) -> None:  # only sets a flag: no I/O, no collectives
            if self.signalled_at is None:
                self.signalled_at = time.time()
                self.signal_name = signal.Signals(signum).name

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            flag = 1 if self.signalled_at is not None else 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                from .launch import distributed_state

                t = torch.tensor([flag], device=distributed_state().device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                flag = int(t.item())
            if flag and self.stopped_at_step is None:
                if self.signalled_at is None:  # another rank got the signal
                    self.signalled_at = time.time()
                    self.signal_name = "another rank's signal"
                self.stopped_at_step = state.global_step
                control.should_save = True
                control.should_training_stop = True
                log.warning(
                    "preemption (%s): saving a checkpoint at step %d and stopping", self.signal_name, state.global_step
                )

    return Preemption()


def fault_callback(fault: Fault, rank: int) -> Any:
    from transformers import TrainerCallback

    class FaultCallback(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            fault.trigger("kill", state.global_step + 1, rank)

    return FaultCallback()
