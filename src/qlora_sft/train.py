"""The training entrypoint: recipe -> data -> model -> trl.SFTTrainer -> train -> final save.

Every launcher (`qlora-sft train`, `accelerate launch -m qlora_sft train`, sbatch, submitit) ends
here; they only decide how many processes run where. Read top to bottom: each step is one call
into the module that owns it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import (
    checkpoint,
    data,
    hostwork,
    init_adapter,
    launch,
    launch_config,
    model,
    plan,
    plots,
    profiling,
    tracking,
)
from .errors import RecipeError, UserError, first_line, interrupted
from .files import append_jsonl, is_no_space, no_space_message
from .recipe import (
    BatchPlan,
    Recipe,
    no_checkpoint_before_the_end,
    recipe_warnings,
    resolve_batch,
    warmup_outlasts_training,
)

log = logging.getLogger("qlora_sft")


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    preempted: bool = False
    finished: bool = False  # the run had finished before this launch: nothing was trained


def setup_logging(is_main: bool, rank: int = 0) -> None:
    """INFO on the main process, warnings and errors only elsewhere (each tagged with its rank)."""
    handler = logging.StreamHandler(sys.stdout if is_main else sys.stderr)
    prefix = "" if is_main else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"{prefix}%(asctime)s qlora-sft %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    import datasets
    import transformers

    # transformers 5.x renames gradient_checkpointing -> activation_checkpointing; the old names
    # still work everywhere we support, so the rename notices are noise for users.
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)
    transformers.logging.set_verbosity_warning() if is_main else transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def sft_args(recipe: Recipe, batch: BatchPlan, mode: launch.LaunchMode, compute_dtype: Any, has_eval: bool) -> Any:
    """trl.SFTConfig from the recipe's `train:` section plus what the project derives."""
    import torch
    from trl import SFTConfig

    args = dict(recipe.train.args)
    # train.deepspeed is started as accelerate's DeepSpeed launch (launch_config.prepare_environment),
    # the path every DeepSpeed launch takes: the Trainer finds the plugin in accelerate's state
    args.pop("deepspeed", None)
    args.update(
        output_dir=str(recipe.run_dir),
        seed=recipe.run.seed,
        data_seed=recipe.run.seed,
        per_device_train_batch_size=batch.micro_batch,
        gradient_accumulation_steps=batch.grad_accum,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        padding_free=recipe.data.packing,
        # tensorboard and metrics.jsonl are added as callbacks (main process only); the trackers of
        # train.report_to are transformers' own callbacks
        report_to=tracking.integrations(recipe.train.args.get("report_to")),
        run_name=recipe.run.name,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        save_total_limit=None,
    )
    if not (mode.kind == "deepspeed" and mode.zero_stage == 3):
        # Non-reentrant checkpointing (DDP with LoRA breaks with the reentrant variant). Under ZeRO-3
        # TRL switches PEFT models to reentrant checkpointing itself, as DeepSpeed requires.
        # (recipe.py refuses use_reentrant: true; the recipe's other keys are kept)
        kwargs = args.get("gradient_checkpointing_kwargs") or {}
        args["gradient_checkpointing_kwargs"] = {**kwargs, "use_reentrant": False}
    if has_eval:
        args.setdefault("eval_strategy", "steps")
        if args["eval_strategy"] == "steps":
            args.setdefault("eval_steps", args.get("save_steps", 500))
    else:
        for key in ("eval_strategy", "eval_on_start"):
            if recipe.train.args.get(key) not in (None, False, "no"):
                log.warning("train.%s is set but the data has no eval rows: no evaluation runs", key)
        args["eval_strategy"] = "no"
        args.pop("eval_on_start", None)
    if mode.world_size > 1 and mode.kind in ("ddp", "cpu"):
        # Every LoRA parameter is used in every step, so DDP need not search the graph for unused
        # ones (that search also conflicts with gradient checkpointing).
        args.setdefault("ddp_find_unused_parameters", False)
    if mode.kind == "cpu":
        args["use_cpu"] = True
    elif "optim" not in recipe.train.args:
        args["optim"] = mode.default_optim
    return SFTConfig(**args)


def layer_graphs_for(mode: launch.LaunchMode, asked: str | None = None) -> str:
    """QLORA_SFT_LAYER_GRAPHS (or `asked`, its value read already) as this launch allows it: graphs
    read the weights where they are, so not where FSDP or ZeRO-3 gather them anew; the backward's
    adds the adapters' gradients itself, past the hooks DDP reduces them with, so DDP replays only
    the forward."""
    asked = model.layer_graphs.layer_graphs() if asked is None else asked
    if mode.kind == "single_gpu":
        return asked
    if mode.kind == "ddp":
        return "forward" if asked == "on" else asked
    return "off"


def offload_callback(mode: launch.LaunchMode, recipe: Recipe) -> Any:
    """At the start of training, after transformers and TRL have (re)enabled gradient checkpointing,
    switch the checkpointed layers to `model.offloaded_checkpoint` (train.offload_activations)."""
    from transformers import TrainerCallback

    asked = model.layer_graphs.layer_graphs()
    graphs = layer_graphs_for(mode, asked)
    longest = recipe.data.max_length if recipe.data.packing else None  # a packed row's longest example

    class OffloadActivations(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            n = model.offload_checkpointed_inputs(kw["model"], graphs, longest)
            log.info("activations: the inputs of %d checkpointed layers wait in pinned host memory", n)
            if asked != "off":
                log.info(
                    "layer graphs (%s=%s): %s",
                    model.layer_graphs.LAYER_GRAPHS_ENV,
                    asked,
                    {
                        "on": "each layer's forward, recompute and backward replay CUDA graphs",
                        "forward": "each layer's forward without gradients replays a CUDA graph"
                        + ("" if asked == "forward" else " (DDP reduces gradients in hooks a replay would pass by)"),
                        "off": f"none under {mode.describe()} (graphs need one GPU, or DDP for the forward)",
                    }[graphs],
                )
            if not model.offload.prefetch_offloaded_inputs():
                log.info(
                    "activations: %s=0: each input is fetched back only when its layer needs it",
                    model.offload.OFFLOAD_PREFETCH_ENV,
                )

    return OffloadActivations()


def start_checks_callback(recipe: Recipe) -> Any:
    """At the start of training, when the step count is known: warn of a warmup that lasts as long as
    the training (a copied train.warmup_steps: 100 with max_steps: 20 never reaches the learning rate),
    and, for a run counted in epochs, of save_steps that save nothing before the end (with max_steps
    given, recipe_warnings said so before the model loaded)."""
    from transformers import TrainerCallback

    max_steps = recipe.train.args.get("max_steps", -1)
    by_epochs = not (isinstance(max_steps, int | float) and max_steps > 0)

    class StartChecks(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            notes = [warmup_outlasts_training(args.warmup_steps, state.max_steps, args.lr_scheduler_type)]
            if by_epochs:
                notes.append(no_checkpoint_before_the_end(recipe.train.args, state.max_steps, args.num_train_epochs))
            for note in filter(None, notes):
                log.warning("warning: %s", note)

    return StartChecks()


def metrics_callback(path: Path) -> Any:
    """Append one JSON object per log event to logs/metrics.jsonl (main process only)."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
            append_jsonl(path, record)

    return MetricsCallback()


def nonfinite_loss_callback() -> Any:
    """First of the Trainer's callbacks, so that metrics.jsonl, TensorBoard and every tracker log the
    same: a logging window whose every loss was NaN or inf is logged as NaN. The Trainer's
    logging_nan_inf_filter leaves such losses out of the window's average, and with all of them left
    out it logs 0.0, a perfect loss where the model diverged (its gradient norm is not finite then;
    a true loss of 0.0 has a finite one)."""
    import math

    from transformers import TrainerCallback

    class NonfiniteLoss(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or logs.get("loss") != 0.0 or logs.get("grad_norm") is None:
                return
            try:
                norm = float(logs["grad_norm"])
            except (TypeError, ValueError):
                return
            if not math.isfinite(norm):
                logs["loss"] = float("nan")

    return NonfiniteLoss()


def train(recipe: Recipe, extra_callbacks: list[Any] | None = None, on_trainer: Any = None) -> TrainResult:
    """Run the recipe. `extra_callbacks` are added to the Trainer; `on_trainer(trainer)` is called once
    the trainer exists (the benchmark uses it to count tokens)."""
    # 1. Where am I? (the launcher decided; the recipe is the same everywhere)
    launch_config.prepare_environment(recipe)  # train.deepspeed starts DeepSpeed; deepspeed installed?
    launch.check_devices()
    # train.ddp_timeout (transformers' default 1800 s) is the process group's timeout: the group is
    # created here, before the Trainer, which would otherwise be too late to apply it.
    state = launch.start_process_group(float(recipe.train.args.get("ddp_timeout") or 1800))
    setup_logging(state.is_main_process, state.process_index)
    launch.check_ranks(recipe)  # (and that every rank read the same recipe, with the same packages)
    profile_at = profiling.profile_step()
    profiling.profile_host()
    hostwork.host_savings_enabled()
    model.fused_lora.absmax_cached()
    model.fused_lora.direct_dequant()
    model.fused_lora.grouped()
    model.nf4_kernel.triton_dequant()
    model.offload.prefetch_offloaded_inputs()  # the benchmark switches, checked before anything loads
    model.offload.head_tile()
    model.offload.head_lead()
    model.layer_graphs.layer_graphs()
    hostwork.norm_kernel()
    hostwork.swiglu_kernel()
    max_steps = int(recipe.train.args.get("max_steps") or 0)
    if profile_at is not None and 0 < max_steps < profile_at and state.is_main_process:
        log.warning(
            "%s=%d: train.max_steps is %d, so no step is profiled", profiling.PROFILE_STEP_ENV, profile_at, max_steps
        )
    mode = launch.detect()
    problems = launch.check_launch_compat(recipe, mode)
    if problems:
        raise RecipeError(problems, recipe.source)
    batch = resolve_batch(recipe.train, mode.world_size)
    compute_name = model.dtype_name(mode.compute_dtype(recipe.quantization, recipe.model))
    problems = launch_config.launch_problems(recipe, mode, batch, compute_name)
    if problems:
        raise RecipeError(problems, recipe.source)
    base_dir = Path(recipe.source).parent if recipe.source else None
    log.info("launch: %s; %s", mode.describe(), batch.describe())
    for note in launch_config.launch_notes(recipe, mode):
        log.info("launch: %s", note)
    if state.is_main_process:
        for warning in recipe_warnings(recipe):
            log.warning("recipe: %s", warning)
        for warning in launch_config.launch_warnings(recipe, mode):
            log.warning("launch: %s", warning)
    cap = launch.apply_gpu_memory_cap()
    if mode.kind != "cpu":
        log.info("CUDA allocator: %s", launch.describe_allocator_settings())
    if cap is not None:
        log.info(
            "GPU memory capped at %.1f GiB per rank (%s): %.2f GiB outside PyTorch's allocator (what is in use "
            "there now, at least what the CUDA context grows to) counts against it, as on a card of that size; the "
            "allocator may reserve the rest",
            cap[0],
            launch.GPU_MEMORY_CAP_ENV,
            cap[1],
        )
    sms = launch.apply_gpu_sm_cap()
    if sms is not None:
        log.warning(
            "GPU compute held to %d (rounded up by the driver) of its %d streaming multiprocessors (%s, a CUDA "
            "green context), a stand-in for a slower GPU for benchmarks. Known defect: runs under it did not "
            "train as runs without it (8B on one H200, 2026-12-04: the losses never fell); its tokens/s are not "
            "of correct training",
            *sms,
            launch.GPU_SMS_ENV,
        )
    outlook = memory_outlook(recipe, mode, base_dir, cap[0] if cap else None, log_it=state.is_main_process)
    if "SLURM_JOB_ID" in os.environ:
        log.info(
            "SLURM job %s, restart count %s", os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_RESTART_COUNT", "0")
        )

    # 2. Run directory: a finished run stays finished; refuse a different recipe or a directory
    # another live job writes (its lock); write the resolved recipe; pick the checkpoint to resume.
    done = checkpoint.finished_run(recipe)
    if done is not None:
        log.info("%s", done)
        return TrainResult(recipe.run_dir, recipe.run_dir / "final", -1, None, None, finished=True)
    init_adapter.check_resume_is_no_adapter(recipe)  # checkpoint.resume=<an adapter>

    # lora.init_from's adapter, checked by the main process (its digests and finite values: all of it is
    # read) and the outcome given to every rank; not where this launch may resume a checkpoint, whose
    # adapter replaces it (checked after the checkpoint is picked where none is resumed after all)
    def check_adapter_unless_resuming() -> bool:
        if checkpoint.may_resume(recipe):
            return False
        init_adapter.check_init_from(recipe, base_dir)
        return True

    adapter_checked = checkpoint.main_process_decides(check_adapter_unless_resuming)

    def preflight() -> None:  # the run directory writable, the data readable (not a PermissionError later)
        plan.check_output_dir(recipe)
        plan.check_data_readable(recipe.data, base_dir)
        problems = tracking.credential_problems(recipe.train.args.get("report_to"))  # (not after loading)
        if problems:
            raise UserError("; ".join(problems))

    checkpoint.main_process_decides(preflight)
    meta = checkpoint.run_metadata(recipe, mode, batch)
    lock = checkpoint.prepare_run_dir(recipe, meta)
    try:
        return _train(recipe, mode, batch, meta, state, base_dir, extra_callbacks, on_trainer, outlook, adapter_checked)
    except BaseException as exc:  # tracker runs left open would read as finished (MLflow's exit handler)
        if state.is_main_process:
            tracking.close_after_failure(recipe.train.args.get("report_to"))
        if interrupted(exc):  # Ctrl-C: the CLI's one line says which run, and what the same command does
            exc.add_note(interrupted_note(recipe.run_dir))
        raise
    finally:
        checkpoint.restore_signal_handlers()
        if lock is not None:
            lock.release()


def _train(
    recipe: Recipe,
    mode: launch.LaunchMode,
    batch: BatchPlan,
    meta: dict[str, Any],
    state: Any,
    base_dir: Path | None,
    extra_callbacks: list[Any] | None,
    on_trainer: Any,
    outlook: plan.GpuOutlook | None = None,
    adapter_checked: bool = False,
) -> TrainResult:
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    run_dir = recipe.run_dir

    def pick_checkpoint() -> str | None:
        found = checkpoint.find_resume(recipe)
        if found is not None:
            checkpoint.check_resume(found, mode.world_size, batch.global_batch, mode.kind)
        return str(found) if found is not None else None

    picked = checkpoint.main_process_decides(pick_checkpoint)  # verified once, by the main process
    resume_from = Path(picked) if picked is not None else None
    if resume_from is None and not adapter_checked:  # lora.init_from is this run's start after all
        checkpoint.main_process_decides(lambda: init_adapter.check_init_from(recipe, base_dir) is not None)
    elif resume_from is not None and recipe.lora.init_from:
        log.info(
            "lora.init_from: %s is not read: this launch resumes from %s, whose adapter continues the run",
            recipe.lora.init_from,
            resume_from.name,
        )
    resume_step = checkpoint.checkpoint_step(resume_from) if resume_from is not None else -1
    max_steps = int(recipe.train.args.get("max_steps") or -1)
    if resume_from is not None and 0 < max_steps <= resume_step:
        # the last step's checkpoint is complete but final/ is not (a preemption during the last step,
        # a crash while final/ was saved): publish it as final/ rather than train past max_steps
        # (every rank raises the main process's error: a full disk)
        def publish_final() -> None:  # and the retention a resume applies (the stopped job's was not done)
            checkpoint.final_from_checkpoint(resume_from, run_dir / "final")
            best = checkpoint.best_checkpoint(resume_from)
            checkpoint.apply_retention(run_dir, recipe.checkpoint.keep_last, newest=resume_from, best=best)

        checkpoint.main_process_decides(publish_final)
        log.info(
            "done: %s is at step %d and train.max_steps is %d: published as %s without training further",
            resume_from.name,
            resume_step,
            max_steps,
            run_dir / "final",
        )
        return TrainResult(run_dir, run_dir / "final", resume_step, None, None)

    if resume_from is not None:  # before the data is built and the model loaded
        checkpoint.main_process_decides(
            lambda: checkpoint.check_base_unchanged(resume_from, meta["base_model"], recipe.model.name_or_path)
        )
    # the trackers' runs open before the data and the model: one that cannot open here (an MLflow store
    # that is a file, or does not hold the run this directory names) stops the launch first
    report_to = recipe.train.args.get("report_to")
    checkpoint.main_process_decides(lambda: tracking.start(report_to, run_dir / "logs", recipe.run.name))

    # 3. Tokenizer and data (one process per node builds the cache, the others wait for it; or
    # `qlora-sft prepare` built it before the launch) — before any model memory is spent.
    tokenizer, prepared = tokenizer_and_data(recipe, base_dir)
    if prepared.cache:  # the Trainer writes beside the prepared splits: not a PermissionError after loading
        checkpoint.main_process_decides(lambda: plan.check_prepared_writable(prepared.cache))
    log.info("data: %s", prepared.origin())
    for line in prepared.report.lines():
        (log.warning if line.startswith("warning:") else log.info)("data: %s", line.removeprefix("warning: "))
    data.check_eval_rows(prepared.report, recipe.data, recipe.train.args)  # before the model, not in the Trainer
    # content digests on the main process only: it writes the manifests and checks a resume
    meta["data"] = data.data_fingerprint(
        recipe.data, base_dir, prepared.report, digests=state.is_main_process, cache_root=recipe.data_cache_root
    )
    if resume_from is not None:
        allow = recipe.checkpoint.allow_data_change
        checkpoint.main_process_decides(lambda: checkpoint.check_data_unchanged(resume_from, meta["data"], allow))
    with checkpoint.main_process_writes() as is_main:
        # the steps this launch trains again leave the log (also all of them where no checkpoint could be
        # resumed: a start from step 0 in a run that had logged steps)
        if is_main and (moved := checkpoint.trim_replayed_metrics(run_dir, max(resume_step, 0))):
            since = resume_from.name if resume_from is not None else "step 0 (no checkpoint to resume)"
            log.info("logs: %d lines of steps after %s moved to metrics.replayed.jsonl", moved, since)
        if is_main and resume_from is not None:  # a checkpoint.keep_last lowered at this launch frees space now
            best = checkpoint.best_checkpoint(resume_from)  # (load_best_model_at_end: kept, as when saving)
            checkpoint.apply_retention(run_dir, recipe.checkpoint.keep_last, newest=resume_from, best=best)

    # 4. Model: quantized, placed for the launch mode, with LoRA adapters.
    compute_dtype = mode.compute_dtype(recipe.quantization, recipe.model)
    set_seed(recipe.run.seed)  # the LoRA initialisation is random: same seed, same start on every rank
    peft_model = model.load_model(recipe, tokenizer, mode, base_dir, resuming=resume_from is not None)
    launch_config.check_wrap_classes(peft_model, mode.fsdp if mode.kind == "fsdp" else None)
    for line in [*model.summarize(peft_model).lines(), launch.loading_memory_line()]:
        log.info("model: %s", line)

    # 5. Trainer.
    args = sft_args(recipe, batch, mode, compute_dtype, prepared.eval is not None)
    ckpt = checkpoint.Checkpointing(recipe, meta, state.process_index)
    if state.is_main_process:
        tracking.describe_runs(report_to, {"recipe": recipe.to_dict(), "launch": meta})
    callbacks = [
        *ckpt.callbacks(),
        launch.sharding_callback(mode, run_dir / "logs", state.process_index),
        start_checks_callback(recipe),
        *(extra_callbacks or []),
    ]
    if launch.offloads_activations(recipe, mode):
        callbacks.append(offload_callback(mode, recipe))
    profile_at = profiling.profile_step()  # (checked before the model was loaded)
    profiler = (
        None
        if profile_at is None
        else profiling.profile_callback(
            profile_at, run_dir / "logs", state.process_index, host=profiling.profile_host()
        )
    )
    if profiler is not None:
        callbacks.append(profiler)
    if state.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks += [
            metrics_callback(run_dir / "logs" / "metrics.jsonl"),
            # a relaunch hides what an interrupted launch logged after the checkpoint it resumes from
            # (those steps are trained and logged again; metrics.jsonl moved them aside above)
            TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "logs"), purge_step=max(resume_step, 0) + 1)),
            plots.loss_plot_callback(run_dir),
        ]
        log.info("logging to %s", tracking.describe(report_to))
    tile = model.offload.apply_head_tile()
    if tile is not None:
        log.info(
            "output head: %s=%d: trl's fused head computes the loss in tiles %d logits wide",
            model.offload.HEAD_TILE_ENV,
            tile,
            tile,
        )
    trainer = ckpt.trainer(
        hostwork.lean_trainer(SFTTrainer),  # the Trainer's repeated host work per micro batch, trimmed
        model=peft_model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # before the trackers' callbacks (transformers puts them first) see a diverged window's loss
    trainer.callback_handler.callbacks.insert(0, nonfinite_loss_callback())
    model.prepare_sharding(trainer, mode, compute_dtype, model.whole_layers_needed(recipe, mode))
    if on_trainer is not None:
        on_trainer(trainer)

    # 6. Train (continuing from the newest complete checkpoint, if any).
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    try:
        with hostwork.collector_frozen():  # what is alive now is out of the garbage collector's walks
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        close_progress_bars(trainer)  # before the CLI's line, not redrawn after it at exit
        raise
    except torch.OutOfMemoryError as exc:
        raise OutOfGpuMemoryError(
            out_of_memory_message(exc, run_dir, trainer.state.global_step + 1, state.process_index, outlook)
        ) from exc
    except Exception as exc:  # a full disk while the logs are written (a checkpoint's save says so itself)
        if not is_no_space(exc):
            raise
        raise UserError(no_space_in_training_message(exc, run_dir, trainer.state.global_step)) from exc
    finally:
        if profiler is not None:
            profiler.close()  # a profiled step that raised leaves nothing switched on
    final_dir = run_dir / "final"
    if ckpt.preempted:  # saved at the step boundary all ranks agreed on: the launcher requeues us
        ckpt.record_preemption(run_dir, trainer.state.global_step)
        if state.is_main_process:
            tracking.finish(report_to, preempted=True)
        return TrainResult(run_dir, final_dir, trainer.state.global_step, None, None, preempted=True)
    eval_loss = None
    if prepared.eval is not None:  # the evaluation at the last step, when the schedule just ran one
        last = [e for e in trainer.state.log_history if "eval_loss" in e]
        if last and last[-1].get("step") == trainer.state.global_step:
            eval_loss = last[-1]["eval_loss"]
        else:
            eval_loss = trainer.evaluate().get("eval_loss")

    # 7. Final adapter + tokenizer (Trainer.save_model writes from the main process and gathers
    # sharded weights), staged and published with its completion marker.
    trainer.save_final(final_dir)
    if state.is_main_process:
        tracking.finish(report_to)
    log.info("done: adapter in %s (step %d)", final_dir, trainer.state.global_step)
    return TrainResult(run_dir, final_dir, trainer.state.global_step, result.training_loss, eval_loss)


def interrupted_note(run_dir: Path) -> str:
    """What a Ctrl-C of a launch that holds `run_dir` leaves, for the CLI's one line: the newest complete
    checkpoint (an interrupted save never counts) and what the same command does next."""
    complete = checkpoint.complete_checkpoints(run_dir)
    if not complete:
        return f"Run {run_dir}: no checkpoint is complete yet; run the same command again to start it over."
    newest = complete[0]
    return (
        f"Run {run_dir}: its newest complete checkpoint is {newest.path} (step {newest.step}); run the same "
        "command again to resume from it."
    )


def close_progress_bars(trainer: Any) -> None:
    """Close the Trainer's progress bars (on the main process), which otherwise draw themselves once
    more when the interpreter exits, after the CLI's last line."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            for bar in (callback.training_bar, callback.prediction_bar):
                if bar is not None:
                    bar.close()
            callback.training_bar = callback.prediction_bar = None


class OutOfGpuMemoryError(UserError):
    """A training step ran out of GPU memory: what was lost (nothing past the newest complete
    checkpoint) and what to lower."""


def memory_outlook(
    recipe: Recipe, mode: launch.LaunchMode, base_dir: Path | None, cap_gib: float | None, log_it: bool = True
) -> plan.GpuOutlook | None:
    """Before anything loads: plan's estimate for this launch against this GPU, logged (a warning
    when it does not fit). Advisory: plan is within 15% of the measured peaks, so a launch it says
    will not fit still starts. None on the CPU, or where plan cannot read the model's config."""
    import torch

    if mode.kind == "cpu" or not torch.cuda.is_available():
        return None
    gpu = cap_gib or torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    try:
        outlook = plan.gpu_outlook(recipe, mode, base_dir, gpu)
    except Exception as exc:  # advisory only: a model plan cannot read still trains
        if log_it:
            log.info("memory: no estimate from plan (%s)", first_line(exc))
        return None
    if log_it:  # the main process: every rank has the same GPU and the same estimate
        (log.info if outlook.fits else log.warning)("memory: %s", outlook.line())
    return outlook


def out_of_memory_message(
    exc: BaseException, run_dir: Path, step: int, rank: int, outlook: plan.GpuOutlook | None
) -> str:
    """What a user needs after a step ran out of GPU memory: where, how far plan's estimate was from
    it, what is kept, and what to lower."""
    import torch

    lines = [f"rank {rank} ran out of GPU memory in optimizer step {step} ({first_line(exc)[:300]})."]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_reserved() / 2**30
        lines.append(f"PyTorch had reserved up to {peak:.2f} GiB on this rank's GPU.")
    if outlook is not None:
        lines.append(
            f"plan estimated {outlook.estimate_gib:.2f} GiB per rank on this {outlook.gpu_gib:.1f} GiB GPU "
            f"(micro batch {outlook.micro} x {outlook.max_length} tokens)."
        )
    complete = checkpoint.complete_checkpoints(run_dir)
    if complete:
        lines.append(
            f"Nothing before it is lost: {complete[0].path} is the newest complete checkpoint (step "
            f"{complete[0].step}); a relaunch resumes from it."
        )
    else:
        lines.append(f"No checkpoint of {run_dir} was complete yet: a relaunch starts from step 0.")
    if outlook is not None:
        lines.append(outlook.advice())
    else:
        lines.append(f"To fit: {plan.LOWER_MEMORY}.")
    return "\n".join(lines)


def no_space_in_training_message(exc: BaseException, run_dir: Path, step: int) -> str:
    """A write during training (metrics.jsonl, TensorBoard's events: the checkpoints say it themselves)
    found the disk full: which file or folder, what is kept, what to do."""
    where = getattr(exc, "filename", None) or run_dir / "logs"
    complete = checkpoint.complete_checkpoints(run_dir)
    safe = f"the newest complete checkpoint is {complete[0].path}" if complete else "no checkpoint was complete yet"
    why = no_space_message(Path(where), exc)
    return (
        f"step {step}: writing {where} (the run's logs) failed: {why} ({first_line(exc)}); "
        f"{safe}. Free space and relaunch the same command: training resumes from there."
    )


def tokenizer_and_data(recipe: Recipe, base_dir: Path | None, by: str = "train") -> tuple[Any, data.PreparedData]:
    """The tokenizer with the recipe's chat template, and the prepared data (cached under
    <output_dir>/.cache)."""
    tokenizer = model.recipe_tokenizer(recipe, base_dir)
    return tokenizer, data.prepare_data(
        recipe.data, tokenizer, recipe.run.seed, recipe.data_cache_root, base_dir, by=by
    )


def main(recipe: Recipe) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = train(recipe)
    return checkpoint.REQUEUE_EXIT_CODE if result.preempted else 0
