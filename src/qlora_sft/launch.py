"""Where this process runs: launch mode, ranks, device, compute dtype, whether parameters are sharded.

One `LaunchMode` type serves a running process (`detect()`, from accelerate's state and the
launcher's environment) and a plan (`from_config_file()`, from an accelerate config file), so
`train` and `plan` speak one vocabulary. Rank checks, the recipe/launch compatibility rules and the
per-rank memory report live here too: the one place that knows about topology.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import launch_config
from .errors import UserError, agreed
from .recipe import GPU_OPTIM, ModelConfig, QuantizationConfig, Recipe

log = logging.getLogger("qlora_sft")

if TYPE_CHECKING:
    import torch


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """Recipe dtype name -> torch dtype, built on first use: importing this module does not import
    torch, so `plan` and the SLURM templates' checks start in a second."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def __getattr__(name: str) -> Any:
    """`DTYPES`: torch_dtypes(), for the modules that import it by name."""
    if name == "DTYPES":
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


KINDS = ("cpu", "single_gpu", "ddp", "deepspeed", "fsdp")
# Caps each rank's GPU memory (GiB) so a run behaves like a smaller card: the benchmark's size proofs
# and a user rehearsing a 24 GiB cluster on a larger workstation GPU.
GPU_MEMORY_CAP_ENV = "QLORA_SFT_GPU_MEMORY_GIB"
# Runs this process's kernels on that many of the GPU's streaming multiprocessors (a CUDA green
# context): with the memory cap, a benchmark's stand-in for a slower card on a fast one.
GPU_SMS_ENV = "QLORA_SFT_GPU_SMS"
# How FSDP cuts the model into units: `layers` (default) one unit per decoder layer, embedding and
# output head, the adapters replicated on every rank; `peft`: peft's policy (every LoRA layer its own
# unit too), kept for comparison (docs/larger-models.md, bench/results).
FSDP_UNITS_ENV = "QLORA_SFT_FSDP_UNITS"
# FSDP layer units: reshard the root unit (output head, final norm) as soon as the loss's backward is
# done with it, instead of at the end of the backward (model.sharding.release_root_after_head): on by
# default since 2026-11-30 (two H200s, 8B: 0.80x -> 0.69x DDP's peak per rank, tokens/s within noise,
# kill-resume and export verified); `0` keeps FSDP's own timing
FSDP_RELEASE_HEAD_ENV = "QLORA_SFT_FSDP_RELEASE_HEAD"
RELEASE_HEAD_APPLIED = "FSDP: the root unit (output head, final norm) is resharded once the loss's backward is done"
# logged by model.sharding once the frozen embedding's FSDP unit is kept from a second gather in the
# backward; bench/distributed.py records per row whether its run logged it
EMBEDDING_GATHERED_ONCE = "FSDP: the embedding's unit is not gathered again in the backward (frozen, nothing to do)"
FSDP_UNITS = ("layers", "peft")
# How ZeRO-3 gathers the weights: `layers` (default since 2026-12-01) makes each decoder layer a
# DeepSpeed leaf module (gathered whole as it starts, no hooks inside), so the fused LoRA layer and
# activation offloading apply; `modules`: DeepSpeed's own per-module gathering (one H200, 8B, one
# process: 0.45x one GPU's tokens/s at 9.18 GiB, against 0.84x at 7.37 with layers)
ZERO3_UNITS_ENV = "QLORA_SFT_ZERO3_UNITS"
ZERO3_UNITS = ("layers", "modules")
# ZeRO-3 leaf layers under gradient checkpointing: DeepSpeed gives the weights gathered while a layer is
# recomputed to the model around the layers, so every layer stays gathered to the end of the backward
# (one H200, 8B, one process, parameter offload: all 32 layers at the peak). Releasing each layer's
# weights after its own backward (model.sharding.release_recomputed_layers) is on by default where
# weights are gathered at all (several ranks, or parameter offload): 6.99 -> 5.68 GiB there, losses
# as before (2026-12-01). `1` turns it on, `0` off, everywhere
ZERO3_RELEASE_LAYERS_ENV = "QLORA_SFT_ZERO3_RELEASE_LAYERS"
RELEASE_LAYERS_APPLIED = "ZeRO-3: each recomputed decoder layer's weights are released after its own backward"


@dataclass(frozen=True)
class LaunchMode:
    """How many processes run where, and what that means for the model."""

    kind: str  # one of KINDS
    world_size: int = 1
    local_rank: int = 0
    rank: int = 0
    zero_stage: int = 0
    offload: bool = False  # ZeRO offload_param/offload_optimizer, or FSDP offload_params
    fsdp_version: int = 1
    sync_module_states: bool = True  # FSDP: rank 0's weights are broadcast when wrapping
    state_dict_type: str = "FULL_STATE_DICT"  # FSDP
    fsdp_units: str = "layers"  # FSDP: one of FSDP_UNITS
    fsdp_release_head: bool = True  # FSDP layer units; QLORA_SFT_FSDP_RELEASE_HEAD=0 turns it off
    zero3_units: str = "layers"  # ZeRO-3: one of ZERO3_UNITS (QLORA_SFT_ZERO3_UNITS)
    zero3_release: bool | None = None  # QLORA_SFT_ZERO3_RELEASE_LAYERS: None (unset) is the default
    num_machines: int = 1
    source: str = ""  # the accelerate config file it was read from (plan), if any
    # the launch config files, read fully (qlora_sft.launch_config): FSDP settings, the DeepSpeed
    # config, accelerate's mixed_precision, and what they break or change whatever the recipe
    fsdp: Any = None
    deepspeed: Any = None
    mixed_precision: str = ""
    config_problems: tuple[str, ...] = ()
    config_notes: tuple[str, ...] = ()

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP shard parameters across ranks."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def adapters_replicated(self) -> bool:
        """FSDP with one unit per decoder layer: the frozen weights are sharded and each layer runs its
        own forward on gathered weights, while the adapters (and their gradients and optimizer state)
        are whole on every rank, their gradients averaged as under DDP."""
        return self.kind == "fsdp" and self.fsdp_units == "layers"

    @property
    def zero3_leaf_modules(self) -> bool:
        """ZeRO-3 with every decoder layer a DeepSpeed leaf module (gathered whole as it starts, no
        hooks inside it): qlora-sft's default, QLORA_SFT_ZERO3_UNITS=layers
        (`model.sharding.zero3_layer_leaves`). Leaf modules a DeepSpeed JSON names itself
        (`zero_optimization.leaf_module`) are DeepSpeed's business and switch nothing on here."""
        return self.kind == "deepspeed" and self.zero_stage == 3 and self.zero3_units == "layers"

    @property
    def zero3_releases_layers(self) -> bool:
        """ZeRO-3 leaf layers whose weights, gathered again to recompute a layer in the backward, are
        released after that layer's backward (`model.sharding.release_recomputed_layers`) instead of
        at the end of the backward. Default: where weights are gathered at all, i.e. several ranks or
        parameter offload (one process without it holds every weight whole anyway: there it only cost
        time, 0.87x, one H200, 8B); QLORA_SFT_ZERO3_RELEASE_LAYERS=1/0 decides instead."""
        if not self.zero3_leaf_modules:
            return False
        if self.zero3_release is not None:
            return self.zero3_release
        offloads_params = getattr(self.deepspeed, "offload_param", "none") != "none"
        return self.world_size > 1 or offloads_params

    @property
    def layers_run_whole(self) -> bool:
        """Each layer's forward sees its whole weights: no sharding, FSDP's layer units, or ZeRO-3 with
        the decoder layers as leaf modules (not ZeRO-3's default, which gathers each parameter only
        inside its own module's forward, nor FSDP's peft units)."""
        return not self.shards_parameters or self.adapters_replicated or self.zero3_leaf_modules

    @property
    def shards_gradients(self) -> bool:
        """ZeRO-2/3 and FSDP shard gradients and optimizer states."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage >= 2)

    @property
    def device_type(self) -> str:
        return "cpu" if self.kind == "cpu" else "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def label(self) -> str:
        """Short name: cpu, single_gpu, ddp, zero2, zero3, fsdp (+ offload); ZeRO-3 says how it gathers
        (layer leaves, the default, or DeepSpeed's per-module gathering)."""
        name = f"zero{self.zero_stage}" if self.kind == "deepspeed" else self.kind
        name += "+offload" if self.offload else ""
        if self.kind == "deepspeed" and self.zero_stage == 3:
            name += ", each decoder layer gathered whole" if self.zero3_leaf_modules else ", gathered per module"
            name += ", released after its backward" if self.zero3_releases_layers else ""
        return name

    def describe(self) -> str:
        extra = f" ZeRO-{self.zero_stage}" if self.kind == "deepspeed" else ""
        if self.zero3_leaf_modules:
            extra += " (leaf modules: each decoder layer gathered whole"
            extra += ", released after its backward)" if self.zero3_releases_layers else ")"
        if self.kind == "fsdp":
            extra = f" (FSDP{self.fsdp_version}, {self.state_dict_type.lower().replace('_', ' ')})"
        return f"{self.kind}{extra}{', offload' if self.offload else ''}, world size {self.world_size}"

    @property
    def default_optim(self) -> str:
        """`train.optim` when the recipe names none (GPU launches): bitsandbytes' paged 8-bit AdamW,
        except under FSDP, which can neither gather nor restore bitsandbytes optimizer state (it
        keeps its tensors in a nested dict; a resume fails), so torch's fused AdamW there."""
        return "adamw_torch_fused" if self.kind == "fsdp" else GPU_OPTIM

    def compute_dtype(self, q: QuantizationConfig, model: ModelConfig) -> torch.dtype:
        """`auto`: bfloat16 where the GPU supports it, float16 on older GPUs, float32 on the CPU."""
        return resolve_compute_dtype(q, model, self.device_type)


def resolve_compute_dtype(q: QuantizationConfig, model: ModelConfig, device_type: str) -> torch.dtype:
    """The compute dtype for a device type (export and chat use it without a launch)."""
    import torch

    choice = q.compute_dtype if q.method != "none" else model.dtype
    if choice != "auto":
        return torch_dtypes()[choice]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    if device_type in ("xpu", "mps"):
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------------------------
# A running process
# --------------------------------------------------------------------------------------------


def distributed_state(timeout_s: float | None = None) -> Any:
    """accelerate's process state, created here first so that CPU ranks work: without a GPU (or with
    ACCELERATE_USE_CPU=true) the state must be created with cpu=True, otherwise ranks started by
    `accelerate launch`/torchrun each believe they are alone (gloo is used for CPU ranks).
    `timeout_s` (the recipe's train.ddp_timeout) is the process group's collective timeout; it
    counts only where the state is created (train does that first)."""
    import torch
    from accelerate import PartialState

    if not PartialState._shared_state:  # (created here: its variables checked once, not at each call)
        check_launch_environment()
    cpu = accelerate_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    if timeout_s is None:
        return PartialState(cpu=cpu)
    return PartialState(cpu=cpu, timeout=datetime.timedelta(seconds=timeout_s))


# variables only a launcher sets: torchrun / accelerate launch, SLURM's srun (also under submitit's
# slurm executor), submitit's local executor (each task's rank: `submit --cluster local`), MPI,
# DeepSpeed's launcher
LAUNCHER_VARIABLES = (
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
    "SUBMITIT_LOCAL_GLOBALID",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "CROSS_SIZE",
)
RANK_VARIABLES = "WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR MASTER_PORT"


def world_size_variable(env: Mapping[str, str] | None = None) -> int | None:
    """$WORLD_SIZE as a number of processes (1 unset or empty), or None where it is not one (not a
    whole number, or below 1)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1").strip() or 1)
    except ValueError:
        return None
    return world if world >= 1 else None


def checked_world_size(env: Mapping[str, str] | None = None) -> int:
    """`world_size_variable`, where it is not a number of processes refused naming the variable."""
    world = world_size_variable(env)
    if world is None:
        raw = (os.environ if env is None else env)["WORLD_SIZE"]
        raise UserError(
            f"WORLD_SIZE={raw!r} is not a number of processes (a whole number from 1): unset {RANK_VARIABLES} "
            "to run one process, or start several with accelerate launch, which sets them"
        )
    return world


# accelerate's yes/no variables: it reads each, where set, with `str_to_bool` and raises a
# ValueError (a traceback, after the model loaded) on any other value, an empty one included
ACCELERATE_FLAGS = ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def accelerate_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """accelerate's yes/no variable `name` read as accelerate reads it (False where unset); a value
    accelerate would refuse is refused here, naming it."""
    env = os.environ if env is None else env
    if name not in env:
        return False
    from accelerate.utils.environment import str_to_bool

    try:
        return bool(str_to_bool(env[name]))
    except ValueError:
        raise UserError(
            f"{name}={env[name]!r}: accelerate reads it as yes or no (1 or 0, true or false, yes or no, on or off); "
            "set one of those, or unset it"
        ) from None


def check_launch_environment(env: Mapping[str, str] | None = None) -> int:
    """The launch's variables that torch or accelerate would refuse only once they start (a traceback,
    late): WORLD_SIZE (`checked_world_size`, returned), accelerate's yes/no flags, and a LOCAL_RANK
    left in the shell of a process no launcher started (a rank of a process group that has no
    MASTER_ADDR to meet at)."""
    env = os.environ if env is None else env
    world = checked_world_size(env)
    for name in ACCELERATE_FLAGS:
        accelerate_flag(name, env)
    raw = env.get("LOCAL_RANK")
    if raw is None or launcher_started(env):
        return world
    try:
        local = int(raw)
    except ValueError:
        raise UserError(f"LOCAL_RANK={raw!r} is not a rank: unset {RANK_VARIABLES} to run one process") from None
    if local != -1 and not env.get("MASTER_ADDR"):
        raise UserError(
            f"LOCAL_RANK={raw} is set, so this process would join a process group, but no launcher started it "
            f"and MASTER_ADDR is not set: unset {RANK_VARIABLES} to run one process, or start several with "
            "accelerate launch"
        )
    return world


def launcher_started(env: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher set its variables for this process (`LAUNCHER_VARIABLES`: torchrun or
    accelerate launch, srun, submitit's local executor, MPI, DeepSpeed's launcher)."""
    env = os.environ if env is None else env
    return any(env.get(name) for name in LAUNCHER_VARIABLES)


def stray_rank_variables(env: Mapping[str, str] | None = None) -> str | None:
    """WORLD_SIZE > 1 in a process no launcher started (the variables left exported in a shell): what
    it will wait for, and how to run one process instead; else None."""
    env = os.environ if env is None else env
    world = world_size_variable(env)
    if world is None:
        return f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a number of processes: unset {RANK_VARIABLES}"
    if world <= 1 or launcher_started(env):
        return None
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    return (
        f"WORLD_SIZE={world} is set, but no launcher (torchrun, accelerate launch, srun, mpirun) started this "
        f"process: it waits at {where} for the other {world - 1} rank(s) to join. To train as one process, "
        f"unset {RANK_VARIABLES}; for several, start them with accelerate launch"
    )


def start_process_group(timeout_s: float) -> Any:
    """`distributed_state(timeout_s)`, with a process group that does not form (ranks that never join
    within the timeout) named as such, and a warning first where no launcher started this process."""
    stray = stray_rank_variables()
    if stray:
        log.warning("%s", stray)
    import torch.distributed as dist

    try:
        return distributed_state(timeout_s)
    except dist.DistStoreError as exc:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UserError(
            f"the process group at {where} did not form: the other rank(s) did not join within "
            f"train.ddp_timeout={timeout_s:g} s ({str(exc).splitlines()[0]}). "
            + (
                stray + "."
                if stray
                else "Check that every rank was launched with the same MASTER_ADDR and MASTER_PORT."
            )
        ) from None


def end_process_group() -> None:
    """Take down this process's process group, where one formed, before the process exits (a command
    that returned or refused). Left to the interpreter's exit, gloo's threads were destroyed while
    still joinable: "terminate called without an active exception", SIGABRT, about 1 exit in 4 right
    after a collective (CPU ranks, 2026-12-03), and torchrun reported the rank as crashed instead of
    its exit code. Local: it waits for no other rank."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # the exit code the command chose matters more
        log.debug("destroying the process group failed: %s: %s", type(exc).__name__, exc)


def detect() -> LaunchMode:
    """The launch mode of this process, from accelerate's process state and the variables
    `accelerate launch` sets. FSDP is read from the environment: accelerate's PartialState calls an
    FSDP launch MULTI_GPU (only the Accelerator, created later by the Trainer, says FSDP), and the
    model must know it before loading (4-bit storage dtype, placement). Reading the state instead
    was why FSDP-QLoRA crashed with "Cannot flatten integer dtype tensors"."""
    state = distributed_state()
    return mode_from_environment(
        os.environ,
        world_size=state.num_processes,
        local_rank=state.local_process_index,
        rank=state.process_index,
        cpu=state.device.type == "cpu",
    )


def mode_from_environment(
    env: Mapping[str, str], *, world_size: int, local_rank: int, rank: int, cpu: bool
) -> LaunchMode:
    """The launch mode that `accelerate launch`'s variables describe (CPU ranks are always DDP:
    accelerate runs neither DeepSpeed nor FSDP on CPUs)."""
    common = {"world_size": world_size, "local_rank": local_rank, "rank": rank}

    def flag(name: str, default: bool = False) -> bool:
        value = env.get(name)
        return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")

    if cpu:
        return LaunchMode("cpu", **common)
    common["mixed_precision"] = env.get("ACCELERATE_MIXED_PRECISION", "")
    if accelerate_flag("ACCELERATE_USE_DEEPSPEED", env):
        ds = deepspeed_from_environment(env)
        return LaunchMode(
            "deepspeed",
            zero_stage=ds.stage,
            offload=ds.offload,
            deepspeed=ds,
            zero3_units=zero3_units(env, ds.stage),
            zero3_release=env_switch(ZERO3_RELEASE_LAYERS_ENV, env),
            **common,
        )
    if accelerate_flag("ACCELERATE_USE_FSDP", env):
        return LaunchMode(
            "fsdp",
            offload=flag("FSDP_OFFLOAD_PARAMS"),
            fsdp_version=int(env.get("FSDP_VERSION", "1") or 1),
            sync_module_states=flag("FSDP_SYNC_MODULE_STATES", True) or flag("FSDP_CPU_RAM_EFFICIENT_LOADING"),
            state_dict_type=env.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT") or "FULL_STATE_DICT",
            fsdp_units=fsdp_units(env),
            fsdp_release_head=fsdp_release_head(env),
            fsdp=launch_config.FsdpSettings.from_environment(env),
            **common,
        )
    return LaunchMode("ddp" if world_size > 1 else "single_gpu", **common)


def env_switch(name: str, env: Mapping[str, str] | None = None) -> bool | None:
    """An on/off environment variable, checked: unset or empty None (the default), `1` (or true/yes)
    True, `0` (or false/no) False; anything else is refused."""
    value = (os.environ if env is None else env).get(name, "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise UserError(f"{name}={value!r}: use 1 (on) or 0 (off), or leave it unset for the default")
    return None if not value else value in ("1", "true", "yes")


def fsdp_release_head(env: Mapping[str, str] | None = None) -> bool:
    """QLORA_SFT_FSDP_RELEASE_HEAD, checked: unset or `1` (or true/yes) on, `0` (or false/no) off."""
    return env_switch(FSDP_RELEASE_HEAD_ENV, env) is not False


def env_choice(name: str, choices: tuple[str, ...], env: Mapping[str, str] | None) -> str:
    """An environment variable that names one of `choices` (any case, spaces trimmed); unset or empty
    is the first; anything else is refused with the choices."""
    value = (os.environ if env is None else env).get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise UserError(f"{name}={value!r}: use one of {', '.join(choices)}")
    return value


def fsdp_units(env: Mapping[str, str] | None = None) -> str:
    """QLORA_SFT_FSDP_UNITS, checked: `layers` (default) or `peft`."""
    return env_choice(FSDP_UNITS_ENV, FSDP_UNITS, env)


def zero3_units(env: Mapping[str, str] | None = None, stage: int = 3) -> str:
    """QLORA_SFT_ZERO3_UNITS, checked: `layers` (default) or `modules`; read for ZeRO-3 only (another
    stage gets the default, unread)."""
    return env_choice(ZERO3_UNITS_ENV, ZERO3_UNITS, env) if stage == 3 else ZERO3_UNITS[0]


def deepspeed_from_environment(env: Mapping[str, str]) -> launch_config.DeepSpeedConfig:
    """The DeepSpeed config a rank of a DeepSpeed launch gets: the JSON file the launcher names, or
    the one accelerate builds from its `deepspeed_config:` keys (ACCELERATE_DEEPSPEED_* variables)."""
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and config_file != "none":
        return launch_config.read_deepspeed(config_file)
    keys = {
        "zero_stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"),
        "offload_optimizer_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
        "offload_param_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
        "zero3_save_16bit_model": env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true",
    }
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    keys["gradient_accumulation_steps"] = int(gas) if gas.isdecimal() else gas
    clipping = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clipping and clipping != "auto":
        keys["gradient_clipping"] = float(clipping)
    return launch_config.deepspeed_from_accelerate(keys, Path("(accelerate's deepspeed_config)"))


def from_config_file(
    path: str | os.PathLike[str], gpus_per_node: int | None = None, nodes: int | None = None
) -> LaunchMode:
    """What a launch config file means, for `plan` (no process is started): an accelerate config, or
    a DeepSpeed JSON (launched with accelerate's DeepSpeed plugin). `gpus_per_node` and `nodes`
    override the file's process counts as `accelerate launch` flags would (None: the file's own,
    as `accelerate launch` without the flag)."""
    p = Path(path)
    if p.suffix.lower() == ".json" and not launch_config.is_accelerate_json(p):
        ds = launch_config.read_deepspeed(p)
        nodes = nodes or 1
        return deepspeed_mode(ds, max(1, (gpus_per_node or 1) * nodes), nodes, p.name)
    return mode_from_accelerate(launch_config.read_accelerate(p), gpus_per_node, nodes)


def mode_from_accelerate(
    cfg: launch_config.AccelerateConfig, gpus_per_node: int | None, nodes: int | None
) -> LaunchMode:
    """The launch mode an accelerate config describes (every key read: qlora_sft.launch_config)."""
    machines = cfg.num_machines
    if nodes is None:  # the file's num_machines, as `accelerate launch` without --num_machines
        nodes = max(1, machines)
    if gpus_per_node is None and cfg.num_processes < 1 and (cfg.distributed_type != "NO" or cfg.num_processes == -1):
        # accelerate's -1 means "give --num_processes"; 0 or below stops torch's launcher (AssertionError)
        raise UserError(
            f"accelerate config {cfg.path}: num_processes is {cfg.num_processes}, and `accelerate launch` without "
            "--num_processes cannot start that. Set num_processes to the number of GPUs in total (e.g. "
            "num_processes: 2), or give plan --gpus N (launch/local.sh and the SLURM templates pass "
            "--num_processes themselves)"
        )
    per_node = gpus_per_node if gpus_per_node is not None else max(1, cfg.num_processes) // max(1, machines)
    world = max(1, per_node * nodes)
    common: dict[str, Any] = {
        "world_size": world,
        "num_machines": nodes,
        "source": cfg.path.name,
        "mixed_precision": cfg.mixed_precision,
        "config_problems": cfg.problems,
        "config_notes": cfg.notes,
    }
    if cfg.distributed_type == "DEEPSPEED" and cfg.deepspeed is not None:
        ds = cfg.deepspeed
        return LaunchMode(
            "deepspeed",
            zero_stage=ds.stage,
            offload=ds.offload,
            deepspeed=ds,
            zero3_units=zero3_units(stage=ds.stage),
            zero3_release=env_switch(ZERO3_RELEASE_LAYERS_ENV),
            **common,
        )
    if cfg.distributed_type == "FSDP" and cfg.fsdp is not None:
        fs = cfg.fsdp
        return LaunchMode(
            "fsdp",
            offload=fs.offload_params,
            fsdp_version=fs.version,
            sync_module_states=fs.sync_module_states or fs.cpu_ram_efficient_loading,
            state_dict_type=fs.state_dict_type,
            fsdp=fs,
            fsdp_units=fsdp_units(),
            fsdp_release_head=fsdp_release_head(),
            **common,
        )
    if cfg.distributed_type in ("MULTI_GPU", "MULTI_CPU"):
        return LaunchMode("ddp", **common)
    common.update(world_size=1, num_machines=1)
    return LaunchMode("single_gpu", **common)


def plan_mode(recipe: Recipe, config: str | os.PathLike[str] | None, gpus: int | None, nodes: int | None) -> LaunchMode:
    """The launch `plan` describes: the config file given (accelerate YAML or DeepSpeed JSON), with
    the recipe's own DeepSpeed JSON (`train.deepspeed`) as `train` would start it. `nodes` None: the
    config's num_machines (1 without one)."""
    mode = from_config_file(config, gpus, nodes) if config else None
    if nodes is None:
        nodes = mode.num_machines if mode is not None and mode.kind != "single_gpu" else 1
    ds = launch_config.recipe_deepspeed(recipe)
    asked = (gpus or 1) * (nodes or 1)
    if ds is None and asked > 1 and (mode is None or mode.kind == "single_gpu"):
        flags = " ".join(f"--{k} {v}" for k, v in (("gpus", gpus), ("nodes", nodes)) if v and v > 1)
        runs = f"{mode.source} (distributed_type NO)" if mode is not None else "a plan without --config"
        raise UserError(
            f"plan {flags} asks for {asked} processes, but {runs} runs one process. Add "
            "--config configs/accelerate/multi_gpu.yaml (DDP), or an FSDP or DeepSpeed config from configs/accelerate/"
        )
    if ds is None:
        return mode or single_process()
    if mode is not None and mode.kind == "fsdp":
        raise UserError(
            f"train.deepspeed names {ds.path}, but {mode.source} is an FSDP config; use one (remove "
            "train.deepspeed, or plan with a DDP config)"
        )
    if mode is not None and mode.deepspeed is not None and mode.deepspeed.path.resolve() != ds.path.resolve():
        raise UserError(f"two DeepSpeed configs: {mode.source} names {mode.deepspeed.path}, train.deepspeed {ds.path}")
    world = mode.world_size if mode is not None and mode.kind != "single_gpu" else max(1, (gpus or 1) * nodes)
    mixed = mode.mixed_precision if mode is not None else ""
    return deepspeed_mode(ds, world, nodes, f"train.deepspeed: {ds.path.name}", mixed)


def deepspeed_mode(ds: Any, world: int, nodes: int, source: str, mixed_precision: str = "") -> LaunchMode:
    """The launch a DeepSpeed JSON describes, for `plan` (its ZeRO stage and offload read from it)."""
    return LaunchMode(
        "deepspeed",
        world_size=world,
        num_machines=nodes,
        zero_stage=ds.stage,
        offload=ds.offload,
        source=source,
        deepspeed=ds,
        mixed_precision=mixed_precision,
        zero3_units=zero3_units(stage=ds.stage),
        zero3_release=env_switch(ZERO3_RELEASE_LAYERS_ENV),
    )


def single_process() -> LaunchMode:
    """One process on one GPU (plan without a config file)."""
    return LaunchMode("single_gpu", source="(none: one process)")


def check_devices(env: Mapping[str, str] | None = None, cuda: bool | None = None) -> None:
    """Before anything starts: a launch that asked for GPUs (several processes, DeepSpeed or FSDP)
    in a process that sees no CUDA GPU stops here, instead of quietly training on CPU ranks. One
    process falls back to the CPU (a laptop smoke test); ACCELERATE_USE_CPU=true asks for CPU ranks.
    The launch's variables that would fail later stop here too (`check_launch_environment`)."""
    import torch

    env = os.environ if env is None else env
    world = check_launch_environment(env)  # (torch and accelerate would raise a ValueError, late)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda or accelerate_flag("ACCELERATE_USE_CPU", env):
        return
    if accelerate_flag("ACCELERATE_USE_DEEPSPEED", env):
        what = "DeepSpeed"
    elif accelerate_flag("ACCELERATE_USE_FSDP", env):
        what = "FSDP"
    elif world > 1:
        what = f"{world} processes"
    else:
        return
    raise UserError(
        f"launch: the launcher started {what} for GPUs, but this process sees no CUDA GPU (torch "
        f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
        f"{env.get('CUDA_VISIBLE_DEVICES', '(unset)')}). Check the job's GPU request (e.g. --gpus-per-node), "
        "the driver (nvidia-smi) and that torch is a CUDA build; to run CPU ranks on purpose, set "
        "ACCELERATE_USE_CPU=true."
    )


def check_ranks(recipe: Recipe | None = None) -> list[dict[str, Any]]:
    """Pre-flight, before any model loads: every process reports (rank, local rank, host, and with
    `recipe` the recipe it read and its packages' versions); the ranks must be unique, 0..N-1, N must
    equal the world size the launcher set (the classic multi-node mistake where every node believes
    it is rank 0, accelerate#2816), and every rank must train the same recipe with the same packages
    (`sameness_problem`)."""
    import torch.distributed as dist

    state = distributed_state()
    me: dict[str, Any] = {
        "rank": state.process_index,
        "local_rank": state.local_process_index,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if recipe is not None:
        from .checkpoint import base_fingerprint

        me["recipe"] = json.loads(json.dumps(recipe.fingerprint(), default=str))
        me["versions"] = package_versions()
        try:  # (what its model.name_or_path holds here; a rank that cannot read it is told when it loads)
            me["base_model"] = base_fingerprint(recipe)
        except OSError:  # (not raised before the gather: the other ranks would wait in it)
            me["base_model"] = None
    everyone = [me]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(everyone, me)
    problem = rank_problem(everyone, int(os.environ.get("WORLD_SIZE", state.num_processes)))
    if problem:
        raise UserError(
            f"launch: {problem}. Check the launcher: machine_rank/--node_rank per node, "
            "--num_processes = GPUs in total, the same MASTER_ADDR/MASTER_PORT everywhere."
        )
    if recipe is not None:
        problem, notes = sameness_problem(everyone)
        if problem:
            raise agreed(UserError(f"launch: {problem}"))  # (every rank compared the same reports)
        if state.is_main_process:
            for note in notes:
                log.warning("launch: %s", note)
    return everyone


# the packages every rank must have in one version: a node with another transformers or peft trains
# (or saves) otherwise, and the ranks' replicas drift apart without an error
RANK_PACKAGES = ("qlora-sft", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
# recipe keys that may name the same files by another path on another node (a node-local copy of the
# model or the data): said, not refused (the files' content is checked where it is read)
PATH_KEYS = ("model.name_or_path",)
PATH_LIST_KEYS = ("data.sources", "data.eval_sources")  # lists of sources: their `path` may differ


def package_versions() -> dict[str, str | None]:
    """The installed version of each of `RANK_PACKAGES` (None where it is not installed)."""
    import importlib.metadata

    versions: dict[str, str | None] = {}
    for name in RANK_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sameness_problem(reports: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """(why the ranks cannot train together, notes): every rank's recipe (its flat keys, as the rank
    resolved it: the file and its overrides) and package versions against rank 0's. A recipe edited
    between two nodes' starts, a node's command line with other overrides, or a node with another
    environment would train another learning rate, or save other files, with no error from DDP: the
    replicas drift apart. Paths to the model or the data may differ (node-local copies): noted."""
    first = min(reports, key=lambda r: r["rank"])
    problems: list[str] = []
    notes: list[str] = []
    for report in sorted(reports, key=lambda r: r["rank"]):
        if report is first:
            continue
        who = f"rank {report['rank']} (host {report['host']})"
        than = f"rank {first['rank']} (host {first['host']})"
        a, b = first.get("recipe") or {}, report.get("recipe") or {}
        paths = []
        keys = []
        for key in sorted(set(a) | set(b)):
            if a.get(key) == b.get(key):
                continue
            other = _other_model(first, report) if key == "model.name_or_path" else None
            if other:  # not a copy: the files differ
                keys.append(f"{key}: {a.get(key)!r} on {than}, {b.get(key)!r} on {who} (other model files: {other})")
            elif key in PATH_KEYS or (
                key in PATH_LIST_KEYS and _without_paths(a.get(key)) == _without_paths(b.get(key))
            ):
                paths.append(f"{key}: {a.get(key)!r} there, {b.get(key)!r} here")
            else:
                keys.append(f"{key}: {a.get(key)!r} on {than}, {b.get(key)!r} on {who}")
        versions = [
            f"{name} {first['versions'].get(name) or 'not installed'} on {than}, "
            f"{report['versions'].get(name) or 'not installed'} on {who}"
            for name in RANK_PACKAGES
            if first.get("versions", {}).get(name) != report.get("versions", {}).get(name)
        ]
        if keys:
            shown = "; ".join(keys[:6]) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")
            problems.append(
                f"the ranks read different recipes ({shown}). Every rank must read the same recipe file with the "
                "same overrides: give every node the same command line, and the recipe on a file system they share "
                "(not a copy edited on one node)"
            )
        if versions:
            problems.append(
                f"the ranks run different package versions ({'; '.join(versions)}). Install one environment on "
                "every node (one virtual environment on a shared file system, or one container image)"
            )
        if problems:
            return "; and ".join(problems) + ". Nothing was loaded or written.", notes
        if paths:
            notes.append(f"{who} names its files by other paths than {than} ({'; '.join(paths)})")
    if notes:  # (one line: on many nodes, every rank of them would say it)
        more = f", and {len(notes) - 1} more rank(s) as well" if len(notes) > 1 else ""
        notes = [f"{notes[0]}{more}: each node reads its own copy, which must hold the same files"]
    return None, notes


def _other_model(first: dict[str, Any], report: dict[str, Any]) -> str | None:
    """How the base model `report`'s rank names differs from `first`'s (`base_fingerprint`: two hub
    ids, or two local folders' files), or None where they may be one model: the same files, either
    unknown, or a hub id on one rank and a local folder (perhaps its copy) on the other."""
    from .checkpoint import base_changes

    a, b = first.get("base_model"), report.get("base_model")
    if not a or not b or ("hub_id" in a) != ("hub_id" in b):
        return None
    return "; ".join(base_changes(a, b)[:3]) or None


def _without_paths(sources: Any) -> Any:
    """A recipe's list of data sources with their `path` left out."""
    if not isinstance(sources, list):
        return sources
    return [{k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s for s in sources]


def rank_problem(reports: list[dict[str, Any]], launcher_world_size: int) -> str | None:
    ranks = sorted(r["rank"] for r in reports)
    if len(set(ranks)) != len(ranks):
        dup = sorted({x for x in ranks if ranks.count(x) > 1})
        return f"duplicate ranks {dup} across processes {[(r['host'], r['rank']) for r in reports]}"
    if ranks != list(range(len(ranks))):
        return f"ranks {ranks} are not 0..{len(ranks) - 1}"
    if len(ranks) != launcher_world_size:
        return f"{len(ranks)} processes joined but the launcher's world size is {launcher_world_size}"
    return None


ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch's names, the first wins
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def default_allocator_settings(environ: MutableMapping[str, str] | None = None) -> None:
    """Turn on the CUDA caching allocator's expandable segments, unless the user configured the
    allocator (PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF set, even to other keys). Memory is then
    reserved in segments that grow, not in fixed blocks split and left partly free: what a GPU (or
    QLORA_SFT_GPU_MEMORY_GIB's cap) runs out of is reserved memory. Measured on H200s (2026-11-30,
    Llama-3-8B): peak reserved 8.14 -> 7.74 GiB on one GPU, 8.27 -> 7.72 under FSDP, 7.78 -> 6.28
    under FSDP with parameter offload, tokens/s unchanged. Called before torch initialises CUDA (the
    allocator reads the variable then); child processes (accelerate's ranks) inherit it."""
    env = os.environ if environ is None else environ
    if not any(env.get(name) for name in ALLOC_CONF_ENVS):
        env["PYTORCH_CUDA_ALLOC_CONF"] = DEFAULT_ALLOC_CONF


def describe_allocator_settings(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    for name in ALLOC_CONF_ENVS:
        if env.get(name):
            unset = " nor ".join(ALLOC_CONF_ENVS)
            return f"{name}={env[name]} (qlora-sft sets {DEFAULT_ALLOC_CONF} where neither {unset} is set)"
    return "torch's defaults (neither PYTORCH_ALLOC_CONF nor PYTORCH_CUDA_ALLOC_CONF set)"


# What a card's memory holds besides PyTorch's allocator by the end of a run: the CUDA context (about
# 0.3-0.45 GiB when created, with lazy module loading) and the kernels' modules loaded as they are
# first used. Measured at the end of one-GPU runs on an H200 (bench/results, 2026-12-01,
# `outside_allocator_gib`): 0.93 GiB at 8B, 0.95 at 14B, 1.07 at 32B, 0.91 under unsloth; 1.30-1.41
# with one process under FSDP or ZeRO-3, whose NCCL process group holds its own buffers (more ranks:
# not yet measured). plan counts it against a card's memory, and QLORA_SFT_GPU_MEMORY_GIB keeps it out
# of the cap from the start, before the context has grown to it.
CUDA_CONTEXT_GIB = 0.95
PROCESS_GROUP_CONTEXT_GIB = 1.4


def context_gib(mode: LaunchMode | None = None, process_group: bool | None = None) -> float:
    """What plan and the cap count outside PyTorch's allocator for a launch: more where ranks talk
    through a process group (DDP, DeepSpeed, FSDP, even with one process)."""
    if process_group is None:
        process_group = mode is not None and mode.kind in ("ddp", "deepspeed", "fsdp")
    return PROCESS_GROUP_CONTEXT_GIB if process_group else CUDA_CONTEXT_GIB


def allocator_fraction(raw: str, total_gib: float, outside_gib: float) -> tuple[float, float]:
    """QLORA_SFT_GPU_MEMORY_GIB=`raw` on a GPU of `total_gib`, `outside_gib` of it counted as outside
    PyTorch's allocator (in use now, at least `context_gib`): (the cap in GiB, the share of the GPU
    PyTorch's allocator may reserve). The cap stands for a card of that size, where the CUDA context
    takes its part too, so the allocator gets the cap less what is counted outside it."""
    try:
        cap = float(raw)
    except ValueError:
        raise UserError(f"{GPU_MEMORY_CAP_ENV}={raw!r}: give a number of GiB (e.g. 24)") from None
    if not 0 < cap <= total_gib:  # also refuses nan and inf
        raise UserError(f"{GPU_MEMORY_CAP_ENV}={raw}: must be > 0 and at most this GPU's {total_gib:.1f} GiB")
    if outside_gib >= cap:
        raise UserError(
            f"{GPU_MEMORY_CAP_ENV}={raw}: {outside_gib:.2f} GiB of this GPU count as outside PyTorch's allocator "
            f"(the CUDA context, at least {CUDA_CONTEXT_GIB:g} GiB once its kernels load, more with a process group, "
            "and any other process on the GPU), which leaves nothing of the cap: give a larger cap, or free the GPU"
        )
    return cap, (cap - outside_gib) / total_gib


def apply_gpu_memory_cap() -> tuple[float, float] | None:
    """With QLORA_SFT_GPU_MEMORY_GIB set, make this process's GPU behave like a card of that many GiB:
    what is in use outside PyTorch's allocator counts against it, at least `context_gib` (what the
    context grows to as kernels load, as on the card; more with a process group), and the caching
    allocator refuses to reserve more than the rest. Until 2026-12-01 only what was outside when the
    cap was applied counted (about 0.5 GiB): a 14B run at 11 x 2048 under a 16 GiB cap then
    reserved 15.34 GiB and ended with 0.95 outside, 16.29 in all. The benchmark records what is
    outside at the end (`outside_allocator_gib`).
    Returns (cap, GiB counted outside the allocator), or None."""
    import torch

    raw = os.environ.get(GPU_MEMORY_CAP_ENV)
    if not raw or not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    import torch.distributed as dist

    # at least what the context grows to; what other processes hold is counted only as far as it
    # is measured now (the cap rehearses a card on an otherwise idle GPU)
    floor = context_gib(process_group=dist.is_available() and dist.is_initialized())
    outside = max(floor, gpu_memory_outside_allocator_gib(device))
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    cap, fraction = allocator_fraction(raw, total, outside)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return cap, outside


_GREEN: list[Any] = []  # the green context and its stream, alive while the process runs on them


def sm_count(raw: str, total: int | None) -> int:
    """QLORA_SFT_GPU_SMS=`raw` on a GPU of `total` streaming multiprocessors (None: no GPU here), checked."""
    try:
        n = int(raw)
    except ValueError:
        raise UserError(f"{GPU_SMS_ENV}={raw!r}: give a whole number of streaming multiprocessors (e.g. 16)") from None
    if n <= 0 or (total is not None and n > total):
        most = "" if total is None else f" and at most this GPU's {total} streaming multiprocessors"
        raise UserError(f"{GPU_SMS_ENV}={raw}: must be > 0{most}")
    return n


def apply_gpu_sm_cap() -> tuple[int, int] | None:
    """With QLORA_SFT_GPU_SMS set, run this process's kernels on that many of the GPU's streaming
    multiprocessors: a CUDA green context holding them, and its stream made this thread's current
    stream for the rest of the process. Kernels run where their stream is, so the backward (run by
    autograd on the streams of the forward) and the optimizer are held to them too; copies on other
    streams use the copy engines. The driver rounds the count up to its granule (8 on an H100/H200).
    A benchmark's stand-in for a slower GPU (bench.distributed --gpu-sms): the host stays as fast and
    the memory bandwidth is what the SMs can draw, so it is a proxy, not a measurement of a card.
    Known defect (8B on one H200, 2026-12-04): runs under it did not train as runs without it (the
    losses never fell, and differed from step 1 on). Not established why. The step-1 losses come
    before any optimizer step, so something in the forward or its data is affected; that the
    losses do not fall may also come from bitsandbytes' optimizer kernels, which take no stream and
    run on the legacy default stream, which nothing orders with this one. Until that is found, the
    switch's tokens/s are not of correct training (its log line says so).
    Returns (SMs asked, SMs of the GPU), or None; the driver rounds the count up to its granule."""
    import torch

    raw = os.environ.get(GPU_SMS_ENV)
    if not raw:
        return None
    if not torch.cuda.is_available():
        sm_count(raw, None)  # the value checked all the same; no GPU to hold it to
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).multi_processor_count
    n = sm_count(raw, total)
    try:
        from torch.cuda import green_contexts
    except ImportError:
        green_contexts = None
    if not getattr(green_contexts, "SUPPORTED", False):
        raise UserError(f"{GPU_SMS_ENV}={raw}: this PyTorch build has no CUDA green contexts (CUDA 12.8+ needed)")
    try:
        green = green_contexts.GreenContext.create(num_sms=n, device_id=device)
        stream = green.Stream()
    except Exception as exc:  # the driver's own limits
        raise UserError(
            f"{GPU_SMS_ENV}={raw}: the CUDA driver could not hold this GPU's kernels to {n} of its {total} streaming "
            f"multiprocessors ({type(exc).__name__}: {exc}); give fewer, or unset it"
        ) from exc
    torch.cuda.set_stream(stream)
    _GREEN[:] = [green, stream]
    return n, total


def gpu_memory_outside_allocator_gib(device: int | None = None) -> float:
    """GiB in use on this GPU that PyTorch's caching allocator has not reserved: the CUDA context
    (creating it, if need be) and any other process on the GPU."""
    import torch

    device = torch.cuda.current_device() if device is None else device
    free, total = torch.cuda.mem_get_info(device)
    return max(0.0, (total - free - torch.cuda.memory_reserved(device)) / 2**30)


# --------------------------------------------------------------------------------------------
# What cannot work in a launch mode (checked before anything loads)
# --------------------------------------------------------------------------------------------


HOST_TABLE_KEYS = ("embedding_in_host_memory", "lm_head_in_host_memory")


def _host_table_reasons(recipe: Recipe, mode: LaunchMode, key: str) -> list[str]:
    """Why `model.<key>` (a `HOST_TABLE_KEYS` key) cannot work in this launch: something would move
    the table back to the GPU (silently undoing it) or train it."""
    table, names_it, usual = _TABLES[key]
    why = []
    if mode.kind not in ("cpu", "single_gpu", "ddp"):
        why.append(f"the launch is {mode.describe()}, which places every weight itself")
    if recipe.quantization.method == "none":
        why.append("the model is not quantized, and the Trainer moves an unquantized model to the GPU whole")
    if recipe.model.loader == "low_memory":
        why.append("model.loader is low_memory, whose model accelerate moves to the GPU whole on one GPU and DDP")
    for arg in ("bf16_full_eval", "fp16_full_eval"):
        if recipe.train.args.get(arg):
            why.append(f"train.{arg} is true, for which the Trainer moves the whole model to the GPU")
    lora = recipe.lora
    target = lora.target_modules
    trained = [*(lora.modules_to_save or []), *([] if isinstance(target, str) else target)]
    if any(names_it(name) for name in trained):
        why.append(f"the {table} is trained (lora.modules_to_save or lora.target_modules name it)")
    elif isinstance(target, str) and target != "all-linear" and _pattern_matches(target, usual):
        # (peft matches one pattern against each module's whole name; the load checks the model's own
        # names, `offload.embedding_problem` / `head_problem`: these are the usual ones, for plan)
        why.append(f"the {table} is trained (the lora.target_modules pattern {target!r} matches it)")
    return why


# per HOST_TABLE_KEYS key: the table's name in messages, whether a short module name in a list of
# lora.target_modules / modules_to_save names it, and the whole module names it usually has (for a
# target_modules pattern): Llama/Qwen/Mistral/Gemma, GPT-2, GPT-NeoX (whose head is embed_out)
_TABLES: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "embedding_in_host_memory": (
        "embedding",
        lambda n: ("embed" in n and "embed_out" not in n) or n == "wte",
        ("model.embed_tokens", "transformer.wte", "gpt_neox.embed_in"),
    ),
    "lm_head_in_host_memory": (
        "output head",
        lambda n: "lm_head" in n or n in ("output", "embed_out"),
        ("lm_head", "embed_out"),
    ),
}


def _pattern_matches(pattern: str, names: tuple[str, ...]) -> bool:
    import re

    try:
        return any(re.fullmatch(pattern, name) for name in names)
    except re.error:  # (an invalid pattern is the recipe's problem, said where the adapters are built)
        return False


def _host_table_problems(recipe: Recipe, mode: LaunchMode) -> list[str]:
    """`model.embedding_in_host_memory` / `model.lm_head_in_host_memory` set true where they cannot
    work (`auto` turns itself off there)."""
    problems = []
    for key in HOST_TABLE_KEYS:
        if keeps_in_host_memory(recipe, key):
            table = "embedding" if key.startswith("embedding") else "output head"
            problems += [
                f"`model.{key}` is true, but {w}. It works on one GPU and under DDP with a quantized model whose "
                f"{table} is frozen. Remove it, or the other setting."
                for w in _host_table_reasons(recipe, mode, key)
            ]
    return problems


def keeps_in_host_memory(recipe: Recipe, key: str) -> bool:
    """Whether `model.<key>` (a `HOST_TABLE_KEYS` key) is true. `auto` counts as off until
    `plan.resolve_host_tables` has made it true or false for the launch and its GPU."""
    return getattr(recipe.model, key) is True


def host_tables(recipe: Recipe) -> list[str]:
    """The `HOST_TABLE_KEYS` that are true (`keeps_in_host_memory`), in that order."""
    return [key for key in HOST_TABLE_KEYS if keeps_in_host_memory(recipe, key)]


def host_table_applies(recipe: Recipe, mode: LaunchMode, key: str) -> bool:
    """Whether `auto` may turn `model.<key>` on in this launch: one CUDA GPU, and nothing in the recipe
    that would move the table back to the GPU or train it."""
    return mode.kind == "single_gpu" and not _host_table_reasons(recipe, mode, key)


def gpu_memory_gib() -> float | None:
    """This process's GPU's memory as plan counts it: QLORA_SFT_GPU_MEMORY_GIB's cap where it is set
    (and valid; `apply_gpu_memory_cap` names a wrong one), else the device's; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    try:
        cap = float(os.environ.get(GPU_MEMORY_CAP_ENV) or "nan")
    except ValueError:
        return total
    return cap if 0 < cap <= total else total


def check_launch_compat(recipe: Recipe, mode: LaunchMode) -> list[str]:
    """Combinations that cannot work in a launch mode, as recipe problems. ZeRO-3 and FSDP flatten
    parameters into shards of one dtype, so the packed 4-bit storage, the model dtype and the
    mixed-precision (compute) dtype must all be the same (peft#1432, axolotl#1482, peft#2014);
    LLM.int8 weights cannot be sharded at all."""
    q, problems = recipe.quantization, []
    problems += _host_table_problems(recipe, mode)
    if mode.kind == "fsdp":
        problems += _fsdp_problems(recipe, mode)
    if not mode.shards_parameters:
        return problems
    where = "FSDP" if mode.kind == "fsdp" else f"DeepSpeed ZeRO-{mode.zero_stage}"
    if not mode.layers_run_whole:
        units = f" with {FSDP_UNITS_ENV}=peft" if mode.kind == "fsdp" else ""
        if mode.kind == "deepspeed":
            units = (
                f" with {ZERO3_UNITS_ENV}=modules (DeepSpeed's per-module gathering; unset it: the default "
                "gathers each decoder layer whole)"
            )
        if recipe.train.offload_activations is True:
            problems.append(
                f"`train.offload_activations` is true, which is not supported under {where}{units} (it is built "
                "and tested for one GPU, DDP, FSDP's layer units and ZeRO-3's layer leaves). Remove it: auto "
                "leaves it off there."
            )
        if recipe.lora.fused is True:
            problems.append(
                f"`lora.fused` is true, which is not supported under {where}{units} (the sharded base layers "
                "must run their own forward to be gathered). Remove it: auto leaves it off there."
            )
    if mode.kind == "fsdp" and recipe.lora.bias != "none":
        problems.append(
            f"`lora.bias` is {recipe.lora.bias}: FSDP would have to shard a layer whose weight is frozen and whose "
            "bias trains, which FSDP (version 1) cannot flatten together. Set lora.bias: none, or launch with DDP."
        )
    if q.method == "int8":
        problems.append(
            f"`quantization.method` is int8, which {where} cannot shard; use nf4 (QLoRA) or none, "
            "or launch with DDP / ZeRO-2"
        )
    compute = q.compute_dtype if q.method != "none" else recipe.model.dtype
    if q.method in ("nf4", "fp4") and q.quant_storage not in ("auto", compute) and compute != "auto":
        problems.append(
            f"`quantization.quant_storage` is {q.quant_storage} but the compute dtype is {compute}; "
            f"{where} needs them equal. Remove quant_storage (auto picks the compute dtype)."
        )
    elif q.method in ("nf4", "fp4") and q.quant_storage in ("uint8",):
        problems.append(
            f"`quantization.quant_storage` is uint8; {where} needs the 4-bit weights stored in the "
            "compute dtype. Remove quant_storage (auto picks it)."
        )
    if recipe.model.dtype != "auto" and compute != "auto" and recipe.model.dtype != compute:
        problems.append(
            f"`model.dtype` is {recipe.model.dtype} but the compute dtype is {compute}; {where} needs "
            "one dtype for every sharded parameter. Set model.dtype: auto."
        )
    if compute == "float32" and q.method in ("nf4", "fp4"):
        problems.append(
            f"`quantization.compute_dtype` is float32; under {where} use bfloat16 (or float16 on GPUs "
            "without bf16) so storage, weights and mixed precision agree"
        )
    if recipe.model.upcast_frozen and q.method != "none":
        problems.append(
            f"`model.upcast_frozen` is true; under {where} every frozen weight must stay in the compute "
            "dtype (one dtype per shard). Set model.upcast_frozen: false."
        )
    return problems


def offloads_activations(recipe: Recipe, mode: LaunchMode) -> bool:
    """`train.offload_activations`, resolved for this launch (it needs gradient checkpointing)."""
    if not recipe.train.args.get("gradient_checkpointing", True):
        return False
    if recipe.train.offload_activations == "auto":
        return mode.device_type == "cuda" and mode.layers_run_whole
    return bool(recipe.train.offload_activations)


def is_bitsandbytes_optim(name: str) -> bool:
    """transformers' optimizer names that bitsandbytes implements."""
    name = name.lower()
    return "bnb" in name or "8bit" in name or name.startswith(("paged_", "lion", "ademamix", "rmsprop_bnb"))


def _fsdp_problems(recipe: Recipe, mode: LaunchMode) -> list[str]:
    src = f" ({mode.source})" if mode.source else ""
    problems = []
    optim = str(recipe.train.args.get("optim", ""))
    if optim and is_bitsandbytes_optim(optim):
        problems.append(
            f"`train.optim` is {optim}, a bitsandbytes optimizer; FSDP can neither gather nor restore its state "
            "(bitsandbytes keeps it in a nested dict), so checkpoints would not resume. Remove train.optim (under "
            "FSDP the default is adamw_torch_fused; LoRA's optimizer state is small and sharded)"
        )
    if mode.fsdp_version != 1:
        problems.append(
            f"the accelerate config{src} asks for FSDP{mode.fsdp_version}; qlora-sft runs QLoRA under FSDP1 "
            "(fsdp_version: 1, as configs/accelerate/fsdp_qlora.yaml): accelerate's FSDP2 drops peft's wrap policy "
            "(no unit per decoder layer), leaves uint8-stored 4-bit weights unsharded, and casts bf16-stored ones "
            "in groups where bitsandbytes#1945 reports rewritten bytes on CUDA"
        )
    if not mode.state_dict_type.upper().startswith("FULL"):
        problems.append(
            f"the accelerate config{src} sets fsdp_state_dict_type: {mode.state_dict_type}; checkpoints must "
            "hold the adapter as adapter_model.safetensors (export and resume read it), which needs "
            "FULL_STATE_DICT (only the LoRA weights are written; the 4-bit base is never saved)"
        )
    return problems


# --------------------------------------------------------------------------------------------
# Per-rank memory: what each rank holds once the model is wrapped, and after a step
# --------------------------------------------------------------------------------------------


def held_parameter_bytes(model: Any) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the unsharded parameters). Under ZeRO-3 a
    parameter's local part is its `ds_tensor`; under FSDP1 (use_orig_params=False) the flat
    parameters are the local shards and `_unpadded_unsharded_size` gives the whole."""
    held = total = 0
    for p in fsdp_flat_parameters(model) or model.parameters():  # each shared parameter once
        size = p.element_size()
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, plus the whole tensor if it persists
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
            held += p.data.numel() * size if getattr(p, "ds_persist", False) else 0
            total += p.ds_numel * size
        elif hasattr(p, "_unpadded_unsharded_size"):  # FSDP1 flat parameter: its data is this rank's shard
            held += p.numel() * size
            total += p._unpadded_unsharded_size.numel() * size
        else:
            held += p.numel() * size
            total += p.numel() * size
    return held, total


def fsdp_flat_parameters(model: Any) -> list[Any]:
    """FSDP1's flat parameters (this rank's shards), which `model.parameters()` does not yield under
    `use_orig_params: true` (it yields views of the original parameters, of which a rank holds parts):
    read from each FSDP unit, so both settings are counted alike. Empty outside FSDP1."""
    flat = []
    for m in model.modules():
        handle = getattr(m, "_handle", None) if type(m).__name__ == "FullyShardedDataParallel" else None
        if handle is not None and getattr(handle, "flat_param", None) is not None:
            flat.append(handle.flat_param)
    return flat


def gather_floats(value: float) -> list[float]:
    """One float from every rank, in rank order (this rank's alone without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    everyone = [0.0] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def peak_rss_gib() -> float:
    """This process's peak resident CPU memory so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_now_gib() -> tuple[float, str]:
    """(GiB, what): GPU memory allocated on this rank, or the process's peak RSS on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30, "GPU memory allocated"
    return peak_rss_gib(), "peak RSS"


def loading_memory_line() -> str:
    """After loading, per rank: GPU memory held and the peak CPU memory of loading (the low-memory
    loader keeps rank 0's weights in CPU memory under FSDP/ZeRO-3 until they are sharded)."""
    import torch

    rss = gather_floats(peak_rss_gib())
    line = "peak CPU RSS while loading, per rank: " + ", ".join(f"{x:.2f} GiB" for x in rss)
    if torch.cuda.is_available():
        gpu = gather_floats(torch.cuda.memory_allocated() / 2**30)
        line = "GPU memory after loading, per rank: " + ", ".join(f"{x:.2f} GiB" for x in gpu) + "; " + line
    return line


def sharding_callback(mode: LaunchMode, logs_dir: Path, rank: int) -> Any:
    """A TrainerCallback that reports, once the Trainer has wrapped the model (FSDP/DeepSpeed wrap
    in `accelerator.prepare`, before the first step), the parameter bytes each rank holds, and after
    the first optimizer step the steady GPU memory per rank (load-time copies freed). Under ZeRO-3
    or FSDP with several ranks, a rank that still holds every parameter stops the run: training
    unsharded would silently need the whole model on every GPU. Each rank writes its numbers into
    its own logs/rank<i>.json."""
    import torch
    from transformers import TrainerCallback

    class ShardingReport(TrainerCallback):
        def __init__(self) -> None:
            self.record: dict[str, Any] = {"rank": rank}

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            # `model` is the Trainer's model after accelerator.prepare: FSDP-wrapped under FSDP, the
            # PeftModel with ZeRO-3-partitioned parameters under DeepSpeed
            if model is None:
                return
            held, total = held_parameter_bytes(model)
            held_all = gather_floats(held / 2**30)
            total_gib = total / 2**30
            self.record.update(
                held_parameter_gib=held / 2**30, unsharded_parameter_gib=total_gib, peak_rss_gib_loading=peak_rss_gib()
            )
            log.info(
                "sharding: parameters held per rank after wrapping: %s (unsharded %.2f GiB; %s)",
                ", ".join(f"{x:.2f} GiB" for x in held_all),
                total_gib,
                mode.describe(),
            )
            if mode.shards_parameters and mode.world_size > 1 and max(held_all) > 0.9 * total_gib:
                raise RuntimeError(
                    f"{mode.describe()}: a rank holds {max(held_all):.2f} of {total_gib:.2f} GiB of parameters after "
                    "wrapping, so the model is not sharded. Stopping instead of training unsharded: check that the "
                    "4-bit weights are stored in the compute dtype (the log's model lines) and that the accelerate "
                    "config is the bundled one."
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if "steady_gib" in self.record:
                return
            now, what = memory_now_gib()
            everyone = gather_floats(now)
            self.record["steady_gib"] = now
            self.record["steady_what"] = what
            log.info(
                "memory: %s per rank after step %d (steady, load-time copies freed): %s",
                what,
                state.global_step,
                ", ".join(f"{x:.2f} GiB" for x in everyone),
            )
            self.write()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.record["global_step"] = state.global_step
            if torch.cuda.is_available():
                self.record.update(
                    device=torch.cuda.get_device_name(),
                    peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                    peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                    # the CUDA context (and any other process on the GPU) at the end: a card's memory
                    # holds it besides the reserved peak
                    outside_allocator_gib=gpu_memory_outside_allocator_gib(),
                    alloc_retries=int(torch.cuda.memory_stats().get("num_alloc_retries", 0)),
                )
                from .model import offload

                if offload._GRAPHS is not None:  # QLORA_SFT_LAYER_GRAPHS: replays, captures, their pool
                    self.record["layer_graphs"] = offload._GRAPHS.report()
            self.write()

        def write(self) -> None:
            # each rank writes only its own file
            path = logs_dir / f"rank{rank}.json"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(self.record, indent=2))
            os.replace(tmp, path)

    return ShardingReport()
