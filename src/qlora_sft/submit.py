"""Submit a recipe with submitit: to SLURM (`AutoExecutor`) or, with `cluster="local"`, to this
workstation. One task per GPU; each task is one rank of the same `train` entrypoint.

    from qlora_sft import submit
    job = submit("configs/recipes/X.yaml", nodes=2, gpus_per_node=8, partition="gpu",
                 overrides=["train.learning_rate=1e-4"])
    print(job.job_id); job.result()

Executor parameters come from the keyword arguments, else from the recipe's optional `cluster:`
section. The recipe and the run directory are checked before anything is submitted.

Preemption: submitit asks SLURM for `--signal=USR2@<grace>` and catches USR2 in every task. The
training registers its own handler for it (a flag; ranks agree at the next step boundary and save
a complete checkpoint), and once that checkpoint exists the job hands the signal back to submitit,
whose handler calls `QloraJob.checkpoint()` and requeues the job. The requeued job resumes from the
checkpoint like any relaunch.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import JobFailedError, UserError
from .files import not_utf8, write_problem
from .recipe import SLURM_COUNT_MAX, ClusterConfig, load_recipe

log = logging.getLogger("qlora_sft")

SLURM_QUERY_TIMEOUT_S = 60  # how long submit waits for a SLURM client's answer (squeue, scontrol, sinfo, sacctmgr)
# the longest time limit sbatch reads as given: it counts the limit in seconds in a signed 32-bit int, rounded
# up to minutes (a longer one overflows: refused, or read as another limit, -1 being none at all)
SLURM_TIME_MAX_MIN = (2**31 - 1 - 59) // 60

TORCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def slurm_time(minutes: int) -> str:
    """Minutes -> SLURM's [D-]HH:MM:SS."""
    days = f"{minutes // 1440}-" if minutes >= 1440 else ""
    return f"{days}{minutes % 1440 // 60:02d}:{minutes % 60:02d}:00"


def parse_time(value: str | int) -> int:
    """SLURM time -> minutes. Accepts minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS. Refuses a
    limit of zero (SLURM's "no limit": submitit needs one, and the preemption signal counts back from
    it) and a field out of its range (`1-25:00:00`, `90:99`: a typo, not a time limit)."""
    if isinstance(value, int):
        value = str(value)
    if str(value).strip().upper() in ("INFINITE", "UNLIMITED", "-1"):  # (sbatch reads these as no limit)
        raise UserError(
            f"cluster.time={value!r} (--time) is SLURM's no time limit, which submit cannot ask for (the "
            "save-and-requeue signal counts back from the limit). Give the partition's longest time, e.g. 7-00:00:00"
        )
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(value).strip())
    if not m:
        raise UserError(f"cluster.time={value!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days = int(m.group(1) or 0)
    parts = [int(x) for x in m.group(2).split(":")]
    if m.group(1):  # D-HH[:MM[:SS]]
        h, mi, sec = [*parts, 0, 0][:3]
        ranges = [("hours", h, 23), ("minutes", mi, 59), ("seconds", sec, 59)]
    elif len(parts) == 3:
        h, mi, sec = parts
        ranges = [("minutes", mi, 59), ("seconds", sec, 59)]
    elif len(parts) == 2:  # MM:SS
        h, mi, sec = 0, parts[0], parts[1]
        ranges = [("seconds", sec, 59)]
    else:
        h, mi, sec = 0, parts[0], 0
        ranges = []
    for what, got, most in ranges:
        if got > most:
            raise UserError(
                f"cluster.time={value!r}: {what} {got} is out of range (0-{most}); SLURM reads minutes, MM:SS, "
                "HH:MM:SS or D-HH:MM:SS (e.g. 1-01:00:00 for 25 hours)"
            )
    minutes = days * 1440 + h * 60 + mi + (1 if sec else 0)
    if minutes == 0:
        raise UserError(
            f"cluster.time={value!r}: a limit of 0 is SLURM's no time limit, which submit cannot ask for (the "
            "save-and-requeue signal counts back from the limit). Give the partition's longest time, e.g. 2-00:00:00"
        )
    if minutes > SLURM_TIME_MAX_MIN:
        raise UserError(
            f"cluster.time={value!r} (--time) is more than SLURM's longest limit, {slurm_time(SLURM_TIME_MAX_MIN)} "
            f"({SLURM_TIME_MAX_MIN} "
            "minutes: sbatch counts it in seconds in 32 bits, and refuses a longer one or reads another limit). Give "
            "the partition's longest time (`sinfo -o '%P %l'`), e.g. 7-00:00:00; nothing was queued"
        )
    return minutes


# sbatch options that submit (or submitit) sets itself: an extra_sbatch line would replace them
# (submitit lets an additional parameter win) or stand beside them, and the job would run otherwise
# than submit printed. The value names what to set instead.
LOGS = "submitit (the job's logs: pass --folder or cluster.folder)"
MANAGED_SBATCH = {
    "time": "cluster.time (--time)",
    "signal": "cluster.signal_grace_s (submitit's USR2 signal is what the job saves and requeues on)",
    "output": LOGS,
    "error": LOGS,
    "open_mode": "submitit (it appends to the job's logs)",
    "array": "submitit (one job per submit)",
    "nodes": "cluster.nodes (--nodes)",
    "ntasks": "cluster.nodes and cluster.tasks_per_node",
    "ntasks_per_node": "cluster.tasks_per_node (--tasks-per-node)",
    "gpus_per_node": "cluster.gpus_per_node (--gpus-per-node)",
    "gpus": "cluster.gpus_per_node (--gpus-per-node)",
    "gpus_per_task": "cluster.gpus_per_node (--gpus-per-node)",
    "gres": "cluster.gpus_per_node (--gpus-per-node)",  # (a gres of GPUs; other gres pass)
    "job_name": "cluster.job_name",
}
# ... and those it sets where the cluster section (or a flag) gives them: both at once conflict
OPTIONAL_SBATCH = ("partition", "account", "qos", "mem", "constraint", "cpus_per_task")


def parse_sbatch_lines(lines: Sequence[str], merged: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`--key=value` / `--flag` lines -> submitit's slurm_additional_parameters. `merged`: the cluster
    settings beside them (an option that one of them sets too is refused)."""
    out: dict[str, Any] = {}
    for line in lines:
        text = line.strip().removeprefix("#SBATCH").strip()
        if not text.startswith("--"):
            raise UserError(f"cluster.extra_sbatch: {line!r} is not an sbatch option (--key=value or --flag)")
        # `--key=value` or sbatch's other spelling `--key value`
        name, value = re.fullmatch(r"([^=\s]*)(?:(?:=|\s+)(.*))?", text[2:], re.S).groups()  # type: ignore[union-attr]
        value = (value or "").strip()
        key = name.replace("-", "_")
        option = f"--{name}"
        if key in MANAGED_SBATCH and (key != "gres" or value.startswith("gpu")):
            raise UserError(
                f"cluster.extra_sbatch: {option} is set by submit; this line would override it or stand beside "
                f"it. Set it with {MANAGED_SBATCH[key]} instead"
            )
        if key in OPTIONAL_SBATCH and merged is not None and merged.get(key):
            raise UserError(
                f"cluster.extra_sbatch: {option} conflicts with cluster.{key}={merged[key]!r} (the flag or the "
                f"recipe's cluster section); give it once, as cluster.{key}"
            )
        out[key] = value if value else True
    return out


def _control_character(text: str) -> str | None:
    return next((repr(c) for c in text if ord(c) < 32 or ord(c) == 127), None)


def check_cluster_text(merged: dict[str, Any]) -> None:
    """A newline (or another control character) in a value submitit writes into the sbatch script
    would split its line: the rest would run as a command of the job, and sbatch would stop reading
    the #SBATCH lines after it."""
    for key in ("partition", "account", "qos", "mem", "constraint", "job_name"):
        if isinstance(merged[key], str) and not merged[key].strip():
            # `--partition "$PART"` with PART unset: the job went to the default partition, unsaid
            raise UserError(
                f"cluster.{key} is empty ({merged[key]!r}; an unset shell variable?): give a value, or leave it "
                "out for SLURM's default; nothing was queued"
            )
        bad = _control_character(str(merged[key])) if merged[key] else None
        if bad:
            raise UserError(f"cluster.{key}={merged[key]!r} holds the control character {bad}; remove it")
    for line in merged["extra_sbatch"] or ():
        bad = _control_character(str(line))
        if bad:
            raise UserError(f"cluster.extra_sbatch: {line!r} holds the control character {bad}; remove it")


def check_time_limit(params: Mapping[str, Any]) -> None:
    """On SLURM: the save-and-requeue signal comes `signal_grace_s` before the limit. A limit no
    longer than that signals the job as it starts, and every requeue does the same again."""
    minutes, grace = params["timeout_min"], params["slurm_signal_delay_s"]
    if minutes * 60 <= grace:
        raise UserError(
            f"cluster.time is {minutes} minute(s), no longer than cluster.signal_grace_s={grace} s: SLURM would "
            "signal the job to save and requeue as it starts, and again after every requeue. Give a longer time "
            f"(more than {grace // 60 + 1} minutes), or lower cluster.signal_grace_s (10 or more); nothing was queued"
        )


def slurm_fields(line: str) -> dict[str, str]:
    """`Key=value Key=value` (scontrol's --oneliner) -> a dict."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


def node_gpus(gres: str) -> int | None:
    """The GPUs a node's gres (sinfo's %G: `gpu:8(S:0-1)`, `gpu:a100:4,gpu:v100:2,shard:8`, `(null)`) holds,
    all types together; None where a count cannot be read."""
    total = 0
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = entry.strip().split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) < 2 or not parts[-1].isdecimal():
            return None
        total += int(parts[-1])
    return total


def partition_problems(
    part: Mapping[str, str], nodes: Sequence[tuple[int | None, int | None]], params: Mapping[str, Any]
) -> list[tuple[str, str, str | None]]:
    """What a partition (scontrol's fields `part`; its nodes' (CPUs, GPUs) from sinfo) can never give the
    job: (what and its fix, the Reason squeue would show, the QOS flag that lifts it or None)."""
    extra = params.get("slurm_additional_parameters", {})
    problems: list[tuple[str, str, str | None]] = []
    minutes, max_time = params["timeout_min"], part.get("MaxTime", "UNLIMITED")
    # (with --time-min SLURM may start the job with a shorter limit: not certain)
    if max_time not in ("UNLIMITED", "INFINITE", "NONE") and "time_min" not in extra:
        try:
            most = parse_time(max_time)
        except UserError:
            most = None
        if most is not None and minutes > most:
            problems.append(
                (
                    f"cluster.time (--time) is {slurm_time(minutes)}, longer than its MaxTime={max_time}; give --time "
                    f"{max_time} or less",
                    "PartitionTimeLimit",
                    "PartitionTimeLimit",
                )
            )
    count, total, max_nodes = params["nodes"], part.get("TotalNodes", ""), part.get("MaxNodes", "")
    if total.isdecimal() and count > int(total):
        problems.append(
            (
                f"cluster.nodes={count} (--nodes) is more than the {total} node(s) it has; give --nodes {total} or "
                "fewer",
                "PartitionNodeLimit",
                None,
            )
        )
    elif max_nodes.isdecimal() and count > int(max_nodes):
        problems.append(
            (
                f"cluster.nodes={count} (--nodes) is more than its MaxNodes={max_nodes}; give --nodes {max_nodes} or "
                "fewer",
                "PartitionNodeLimit",
                "PartitionMaxNodes",
            )
        )
    # (a node whose count cannot be read may hold any: then no check)
    gpus = [g for _, g in nodes if g is not None] if all(g is not None for _, g in nodes) else []
    want = int(params.get("gpus_per_node", 0))
    if want and gpus and max(gpus) < want:
        most = max(gpus)
        has = f"none of its {len(gpus)} node(s) has a GPU" if not most else f"its nodes have {most} at most"
        fix = "give --gpus-per-node 0 for CPU ranks" if not most else f"give --gpus-per-node {most} or fewer"
        problems.append((f"cluster.gpus_per_node={want} (--gpus-per-node), but {has}; {fix}", "BadConstraints", None))
    cpus = [c for c, _ in nodes if c is not None] if all(c is not None for c, _ in nodes) else []
    tasks, per_task = int(params["tasks_per_node"]), int(params.get("cpus_per_task") or 1)
    asked = (
        f"{tasks} task(s) per node x {per_task} CPU(s) per task (cluster.tasks_per_node x cluster.cpus_per_task, "
        f"--cpus-per-task) is {tasks * per_task} CPUs on a node"
    )
    max_cpus = part.get("MaxCPUsPerNode", "")
    beyond = None  # why no node of it gives the CPUs asked for
    if "overcommit" not in extra:  # (--overcommit: tasks share CPUs)
        if cpus and max(cpus) < tasks * per_task:
            beyond = f"but its nodes have {max(cpus)} at most; ask for fewer"
        elif max_cpus.isdecimal() and tasks * per_task > int(max_cpus):  # (SLURM 22.05: pending, PartitionConfig)
            beyond = f"more than its MaxCPUsPerNode={max_cpus}; ask for {max_cpus} or fewer"
    if beyond:
        problems.append((f"{asked}, {beyond}", "PartitionConfig", None))
    mem, max_mem = params.get("slurm_mem"), part.get("MaxMemPerNode", "")
    named = f"cluster.mem={mem} (--mem)"
    if os.environ.get("SBATCH_MEM_PER_NODE"):  # (sbatch reads it over the script's --mem)
        mem = os.environ["SBATCH_MEM_PER_NODE"].strip()
        named = f"SBATCH_MEM_PER_NODE={mem} (sbatch reads it over --mem)"
    mb = slurm_megabytes(str(mem)) if mem else None
    if mb and max_mem.isdecimal() and mb > int(max_mem):  # (--mem=0: all of a node's memory, whatever it is)
        problems.append(
            (
                f"{named} is more than its MaxMemPerNode={max_mem} (megabytes); give --mem {max_mem}M or less",
                "MaxMemPerLimit",
                None,
            )
        )
    return problems


def slurm_megabytes(mem: str) -> int | None:
    """SLURM's memory size (`200G`, `512M`, `1T`, `1024K`; a bare number is megabytes) in megabytes, or
    None where it is not one."""
    found = re.fullmatch(r"(\d+)([KMGTkmgt]?)", mem)
    if not found:
        return None
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2, "": 1}[found[2].upper()]
    return int(int(found[1]) * scale)


def qos_lifting(flag: str) -> str | None:
    """Why a QOS may lift a partition limit (a QOS of the cluster with `flag`: PartitionTimeLimit,
    PartitionMaxNodes), or None where none can: no QOS has it, or SLURM keeps no accounting (no QOS)."""
    config, failed = slurm_query(["scontrol", "show", "config"])
    if not failed and re.search(r"^AccountingStorageType\s*=\s*accounting_storage/none\s*$", config, re.M):
        return None
    out, failed = slurm_query(["sacctmgr", "--noheader", "--parsable2", "show", "qos", "format=name,flags"])
    if failed:
        return f"whether a QOS lifts it ({flag} flag) is not known: {failed}"
    names = [row[0] for line in out.splitlines() if len(row := line.split("|")) >= 2 and flag in row[1].split(",")]
    return f"QOS {', '.join(names)} lift(s) it ({flag} flag) for a job that runs under it" if names else None


def check_partition_limits(params: Mapping[str, Any]) -> None:
    """On SLURM: a job past its partition's limits (--time past MaxTime, more nodes than MaxNodes or
    than the partition has, more GPUs or CPUs per node than any of its nodes, more CPUs per node than
    MaxCPUsPerNode, --mem past MaxMemPerNode) is queued, where
    EnforcePartLimits is NO (SLURM's default), and then waits for ever. Refused; warned instead where a
    QOS may lift the limit, or where scontrol or sinfo cannot tell. A partition SLURM does not know is
    left to sbatch, which refuses it."""
    extra = params.get("slurm_additional_parameters", {})
    given = os.environ.get("SBATCH_PARTITION") or params.get("slurm_partition") or extra.get("partition")
    if os.environ.get("SBATCH_PARTITION"):  # (sbatch reads it over the script's --partition)
        named = f"SBATCH_PARTITION={given} (sbatch reads it over --partition)"
    elif given:
        named = f"cluster.partition={given} (--partition)"
    else:
        named = "SLURM's default partition"
    out, failed = slurm_query(["scontrol", "--all", "--oneliner", "show", "partition"])
    if failed:
        log.warning(
            "submit: %s, so whether %s can ever run this job (its time, node, GPU and CPU limits) is not checked; "
            "if it cannot, the job waits in the queue for ever (see its Reason in squeue)",
            failed,
            named,
        )
        return
    parts = {f["PartitionName"]: f for f in map(slurm_fields, out.splitlines()) if "PartitionName" in f}
    names = str(given).split(",") if given else [n for n, f in parts.items() if f.get("Default") == "YES"][:1]
    if not names or any(n not in parts for n in names):
        return  # sbatch refuses an unknown partition, or no partition and no default, in its own words
    if not given:
        named = f"SLURM's default partition {names[0]}"
    down = [n for n in names if parts[n].get("State") == "DOWN"]  # (INACTIVE and DRAIN: sbatch refuses)
    if down and len(down) == len(names):
        log.warning(
            "submit: %s is State=DOWN: SLURM queues the job but starts nothing in it until an administrator sets it "
            "UP (squeue would say Reason=PartitionDown); `sinfo -p %s` shows it. Cancel the job (scancel) and "
            "choose another partition (--partition) if it should run now",
            named,
            ",".join(down),
        )
    nodes: dict[str, list[tuple[int | None, int | None]]] = {n: [] for n in names}
    out, failed = slurm_query(["sinfo", "--noheader", "--Node", f"--partition={','.join(names)}", "--format=%R|%c|%G"])
    if failed:  # (its time and node limits are still checked)
        log.warning(
            "submit: %s, so whether the nodes of %s have the GPUs and CPUs this job asks for is not checked; if "
            "none has, the job waits in the queue for ever (see its Reason in squeue)",
            failed,
            named,
        )
    for line in out.splitlines():
        row = line.strip().split("|")
        if len(row) == 3 and row[0] in nodes:
            nodes[row[0]].append((int(row[1]) if row[1].isdecimal() else None, node_gpus(row[2])))
    found = {n: partition_problems(parts[n], nodes[n], params) for n in names}
    if not all(found.values()):
        return  # a partition it may run in can run it
    lifted = {flag: qos_lifting(flag) for n in names for _, _, flag in found[n] if flag}
    said = "; ".join(
        (f"partition {n}: " if len(names) > 1 else "")
        + "; ".join(f"{what} (squeue would say Reason={reason})" for what, reason, _ in found[n])
        for n in names
    )
    lifts = [why for why in lifted.values() if why]
    certain = all(any(not flag or not lifted[flag] for _, _, flag in found[n]) for n in names)
    if not certain:
        log.warning(
            "submit: %s cannot run this job as it is set: %s. Queued anyway, as %s; if it does not, the job waits "
            "in the queue for ever: cancel it (scancel) and submit with a limit the partition takes",
            named,
            said,
            "; ".join(lifts),
        )
        return
    who = f"{named} can never" if len(names) == 1 else f"{named}: none of these partitions can ever"
    raise UserError(
        f"submit: {who} run this job, so SLURM would queue it and leave it pending for ever: {said}. "
        "Or choose another partition (--partition; `sinfo -o '%P %l %s %D %c %G'` lists their limits); nothing "
        "was queued."
    )


# sbatch's input environment variables that override an option submit writes into the job's script (sbatch
# reads them over the script's #SBATCH lines): variable -> (submitit's parameter, the option, the recipe key)
SBATCH_ENV = {
    "SBATCH_TIMELIMIT": ("timeout_min", "--time", "cluster.time"),
    "SBATCH_PARTITION": ("slurm_partition", "--partition", "cluster.partition"),
    "SBATCH_ACCOUNT": ("slurm_account", "--account", "cluster.account"),
    "SBATCH_QOS": ("slurm_qos", "--qos", "cluster.qos"),
    "SBATCH_CONSTRAINT": ("slurm_constraint", "--constraint", "cluster.constraint"),
    "SBATCH_MEM_PER_NODE": ("slurm_mem", "--mem", "cluster.mem"),
    "SBATCH_GPUS_PER_NODE": ("gpus_per_node", "--gpus-per-node", "cluster.gpus_per_node"),
}


def _flag_set(value: str) -> bool:
    """Whether sbatch reads a flag option's environment variable as given: empty, `yes` or a number not 0."""
    text = value.strip().lower()
    return text in ("", "yes") or (text.isdecimal() and int(text) != 0)


def check_sbatch_environment(params: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """sbatch reads its SBATCH_* environment variables over the #SBATCH lines submitit writes, so one left
    in a user's shell (a cluster's login profile sets some) gave the job another time limit, partition,
    account... than submit checked and printed, or broke what a resumable job needs: the save-and-requeue
    signal (SBATCH_SIGNAL), the requeue itself (SBATCH_NO_REQUEUE) and logs appended across requeues
    (SBATCH_OPEN_MODE). Refused where it differs from what submit asks for; one that sets an option
    submit leaves unset is SLURM's to read."""
    env = os.environ if env is None else env
    grace = int(params["slurm_signal_delay_s"])
    problems = []
    for var, (key, option, recipe_key) in SBATCH_ENV.items():
        if var not in env or key not in params:
            continue
        value, ours = env[var], params[key]
        if key == "timeout_min":
            try:
                same = parse_time(value) == ours
            except UserError:
                same = False
            ours = slurm_time(ours)
        else:
            same = value.strip() == str(ours)
        if not same:
            problems.append(f"{var}={value!r} would replace {option} {ours} ({recipe_key})")
    signal_value = env.get("SBATCH_SIGNAL")
    if signal_value is not None and signal_value.strip().upper().removeprefix("SIG") != f"USR2@{grace}":
        problems.append(
            f"SBATCH_SIGNAL={signal_value!r} would replace --signal=USR2@{grace}, the signal the job saves and "
            "requeues on (cluster.signal_grace_s)"
        )
    if "SBATCH_NO_REQUEUE" in env and _flag_set(env["SBATCH_NO_REQUEUE"]):
        problems.append(
            f"SBATCH_NO_REQUEUE={env['SBATCH_NO_REQUEUE']!r} would forbid the requeue a preempted or timed-out job "
            "resumes by"
        )
    if "SBATCH_OPEN_MODE" in env and env["SBATCH_OPEN_MODE"].strip().lower() != "append":
        problems.append(
            f"SBATCH_OPEN_MODE={env['SBATCH_OPEN_MODE']!r} would replace --open-mode=append: each requeue would "
            "empty the logs of the attempts before it"
        )
    if problems:
        names = " ".join(sorted({p.split("=", 1)[0] for p in problems}))
        raise UserError(
            "submit: sbatch reads SBATCH_* variables of this shell over the options submit writes into the job: "
            + "; ".join(problems)
            + f". Unset them (`unset {names}`), or give submit the same values (--time, --partition, ... or the "
            "recipe's cluster: section); nothing was queued"
        )


def executor_parameters(cfg: ClusterConfig, **given: Any) -> dict[str, Any]:
    """submitit parameters from the recipe's cluster section, overridden by explicit arguments."""
    merged = {k: getattr(cfg, k) for k in ClusterConfig.__dataclass_fields__}
    merged.update({k: v for k, v in given.items() if v is not None})
    check_cluster_text(merged)
    for key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task"):  # (the recipe's are checked there)
        if merged[key] is not None and int(merged[key]) > SLURM_COUNT_MAX:
            raise UserError(
                f"cluster.{key}={merged[key]} (--{key.replace('_', '-')}) is more than SLURM takes: give at most "
                f"{SLURM_COUNT_MAX} (SLURM holds these counts in 16 or 32 bits and wraps a larger one); nothing "
                "was queued"
            )
    gpus = int(merged["gpus_per_node"])
    tasks = int(merged["tasks_per_node"] or (gpus if gpus > 0 else 1))
    if 0 < gpus < tasks:
        raise UserError(
            f"cluster.tasks_per_node: {tasks} tasks per node on {gpus} GPUs per node; each task is one rank on the "
            "GPU its local rank numbers (submitit sets CUDA_VISIBLE_DEVICES to it), so a task past the last GPU "
            "finds none. Give as many tasks as GPUs (leave tasks_per_node unset), or more GPUs"
        )
    if 0 < tasks < gpus:
        log.warning(
            "submit: %d tasks per node on %d GPUs per node: %d GPU(s) per node stay idle (one rank per task)",
            tasks,
            gpus,
            gpus - tasks,
        )
    params: dict[str, Any] = {
        "nodes": int(merged["nodes"]),
        "tasks_per_node": tasks,
        "timeout_min": parse_time(merged["time"]),
        "slurm_signal_delay_s": int(merged["signal_grace_s"]),
        "name": merged["job_name"],
    }
    if gpus > 0:
        params["gpus_per_node"] = gpus
    if merged["cpus_per_task"]:
        params["cpus_per_task"] = int(merged["cpus_per_task"])
    if merged["mem"] and slurm_megabytes(str(merged["mem"])) is None:
        raise UserError(
            f"cluster.mem={merged['mem']!r}: give SLURM's memory per node, a whole number with K, M, G or T "
            "(e.g. 200G; a bare number is megabytes)"
        )
    for key in ("partition", "account", "qos", "mem", "constraint"):
        if merged[key]:
            params[f"slurm_{key}"] = merged[key]
    if merged["extra_sbatch"]:
        params["slurm_additional_parameters"] = parse_sbatch_lines(merged["extra_sbatch"], merged)
    return params


# submitit parameters only SLURM reads (the local executor drops them), by the setting that gives them
SLURM_ONLY = {
    "slurm_partition": "cluster.partition (--partition)",
    "slurm_account": "cluster.account (--account)",
    "slurm_qos": "cluster.qos (--qos)",
    "slurm_mem": "cluster.mem (--mem)",
    "slurm_constraint": "cluster.constraint (--constraint)",
    "slurm_additional_parameters": "cluster.extra_sbatch (--extra-sbatch)",
}


def choose_cluster(cluster: str | None, params: Mapping[str, Any]) -> str:
    """Where the job goes: `cluster`, else SLURM where its `srun` is on PATH (what submitit looks for),
    else this machine. Refused, before anything is written: SLURM asked for where it is not (submitit's
    RuntimeError), or found without `sbatch` (submitit's FileNotFoundError as it queues), several
    nodes on this machine (its ValueError), and SLURM settings that would be dropped because SLURM
    was not found (a job meant for a partition trained on the login node)."""
    found = shutil.which("srun") is not None
    if found and cluster != "local" and shutil.which("sbatch") is None:  # (submitit's FileNotFoundError, after writing)
        raise UserError(
            f"submit{' --cluster slurm' if cluster else ''}: srun is on PATH but sbatch is not (a partial SLURM "
            "client, or a PATH without SLURM's bin folder), so nothing can be queued. Put SLURM's bin folder on "
            "PATH (e.g. `module load slurm`; `which srun` names it), or pass --cluster local to train on this "
            "machine; nothing was queued"
        )
    if cluster == "slurm" and not found:
        missing = "srun is" if shutil.which("sbatch") else "srun and sbatch are"
        raise UserError(
            f"submit --cluster slurm: {missing} not on PATH on this host (submitit needs both), so nothing can be "
            "queued. "
            "Submit from a host of the cluster with SLURM on PATH (e.g. `module load slurm`), or pass "
            "--cluster local to train on this machine; nothing was queued"
        )
    chosen = cluster or ("slurm" if found else "local")
    if chosen != "local":
        return chosen
    if cluster is None:
        meant = [SLURM_ONLY[k] for k in SLURM_ONLY if params.get(k)]
        if params["nodes"] > 1:
            meant.insert(0, f"cluster.nodes={params['nodes']} (--nodes)")
        if meant:
            raise UserError(
                f"submit: SLURM is not on this host's PATH (no srun), so the job would train on this machine "
                f"(--cluster local), where {', '.join(meant)} mean nothing. Put SLURM on PATH to queue it "
                "(e.g. `module load slurm`, or submit from a login node), or pass --cluster local without "
                "them; nothing was started"
            )
    elif params["nodes"] > 1:
        raise UserError(
            f"submit --cluster local: cluster.nodes is {params['nodes']} (--nodes), but a local job runs on this "
            "machine, one node. Give --nodes 1, or submit to SLURM (--cluster slurm); nothing was started"
        )
    return chosen


def check_job_folder(folder: Path, run_dir: Path) -> None:
    """submitit's job folder (logs, pickles), before it is written: its path goes into the sbatch
    script (UTF-8), and inside the run directory it would be there before the run is (the job's
    launch refuses a run directory that holds files and no recipe.yaml; run.overwrite would move
    the job's own logs and result aside while it runs)."""
    bad = not_utf8(os.path.abspath(folder))  # (a relative one under the working directory: submitit writes it whole)
    if bad:
        raise UserError(
            f"submit: the job folder {bad} holds bytes that are not UTF-8; submitit writes its path into the "
            "sbatch script as UTF-8. Pass --folder PATH (or cluster.folder) with a UTF-8 name, or rename the "
            "folder above it; nothing was queued."
        )
    inside, run = Path(os.path.realpath(folder)), Path(os.path.realpath(run_dir))
    if inside == run or run in inside.parents:
        raise UserError(
            f"submit: the job folder {folder} is inside the run directory {run_dir}: the job's logs would be "
            "there before the run is, and the job would refuse to start in it (a folder that is not a "
            "qlora-sft run). Pass --folder (or cluster.folder) outside it, e.g. the default "
            f"{run_dir.parent / (run_dir.name + '.submitit')}; nothing was queued."
        )


def slurm_query(argv: Sequence[str]) -> tuple[str, str | None]:
    """Run a SLURM client (squeue, scontrol, sinfo, sacctmgr): (its output, None), or ("", what failed)
    where it is missing, fails or does not answer within SLURM_QUERY_TIMEOUT_S."""
    tool = argv[0]
    try:
        out = subprocess.run(
            list(argv), capture_output=True, encoding="utf-8", errors="replace", timeout=SLURM_QUERY_TIMEOUT_S
        )
    except FileNotFoundError:
        return "", f"{tool} is not on PATH"
    except subprocess.TimeoutExpired:
        return "", f"{tool} did not answer within {SLURM_QUERY_TIMEOUT_S} s"
    except OSError as exc:
        return "", f"{tool} could not run ({exc})"
    if out.returncode:
        said = (out.stderr.strip() or out.stdout.strip()).splitlines()
        return "", f"{tool} exited {out.returncode}" + (f" ({said[-1]})" if said else "")
    return out.stdout, None


def run_tag(run_dir: Path) -> str:
    """The job comment (`sbatch --comment`) that marks a job as one of the run in `run_dir`: a digest of its
    real path (SLURM takes at most 1024 characters, and a path may hold any), the same from any job folder."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(run_dir))).hexdigest()[:20]
    return f"qlora-sft-run:{digest}"


def jobs_still_queued(folder: Path, tag: str) -> list[tuple[str, str]]:
    """(job id, state) of the jobs of this run that SLURM still holds (pending, running, requeued...):
    submitted into `folder` before (`<folder>/<id>/<id>_submitted.pkl`), or from any job folder with the
    comment `tag` (run_tag). Empty where squeue cannot tell, with a warning where `folder` holds jobs."""
    ids = {p.parent.name for p in folder.glob("*/*_submitted.pkl") if p.parent.name.isdecimal()}
    out, failed = slurm_query(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %T %k"])
    if failed:
        if not ids:
            return []
        newest = ",".join(sorted(ids, key=int)[-5:])  # (every job this run's folder ever held: the newest)
        log.warning(
            "submit: %s, so whether job(s) %s of this run are still in SLURM's queue is not known; if one is, "
            "a second job of this run may be queued beside it (check with squeue -j %s)",
            failed,
            newest,
            newest,
        )
        return []
    queued = []
    for line in out.splitlines():
        job, state, comment = [*line.split(None, 2), "", ""][:3]
        # (a job COMPLETING has trained: its processes are ending, a new job starts after them)
        if (job in ids or comment.strip() == tag) and state and state != "COMPLETING":
            queued.append((job, state))
    return sorted(queued)


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and the folders above it that do not exist yet, deepest first: what writing into it makes."""
    made, here = [], Path(os.path.abspath(folder))
    while not os.path.lexists(here) and here != here.parent:
        made.append(here)
        here = here.parent
    return made


# what submitit writes into the job folder before sbatch answers: the sbatch script and the pickled call
SUBMISSION_FILE = re.compile(r"\.submission_file_[0-9a-f]{32}\.sh|[0-9a-f]{32}\.pkl")


def submission_files(folder: Path) -> set[str]:
    """The names in `folder` that look like submitit's files of a submission not yet queued."""
    try:
        return {p.name for p in folder.iterdir() if SUBMISSION_FILE.fullmatch(p.name)}
    except OSError:
        return set()


def take_back_refused_submission(folder: Path, before: set[str], made: Sequence[Path], exc: BaseException) -> None:
    """After sbatch refused the job: remove what this submission wrote into the job folder `folder`
    (submitit's sbatch script, the one sbatch was given, and its pickle, new since `before`: only where
    it is the one new pickle, as another submission at the same moment writes one too), then the
    folders it made (`made`, deepest first) where that leaves them empty. Nothing else is touched."""
    cause = exc.__cause__  # (submitit raises its FailedJobError from sbatch's CalledProcessError)
    script = cmd[-1] if isinstance(cause, subprocess.CalledProcessError) and (cmd := cause.cmd) else None
    new = submission_files(folder) - before
    pickles = [name for name in new if name.endswith(".pkl")]
    for name in new:
        path = folder / name
        if name.endswith(".sh") and script is not None and os.path.abspath(path) != os.path.abspath(script):
            continue  # another submission's, at the same moment
        if name.endswith(".pkl") and len(pickles) > 1:
            continue  # which is this one's is unknown (submitit names it apart); another job needs its own
        try:
            path.unlink()
        except OSError:
            pass
    for path in made:
        try:
            path.rmdir()  # (only an empty one)
        except OSError:
            break


def export_torch_env() -> dict[str, str]:
    """Set the torch.distributed variables from submitit's job environment and check them before
    any process group starts (submitit leaves them unset: submitit PR #1703)."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        import torch

        chosen_port = os.environ.get("MASTER_PORT")
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=torch.cuda.is_available(), overwrite=True
        )
        # submitit picks a random port in 20000-60000, inside Linux's ephemeral range, where it can
        # collide with any open connection (seen in CI: EADDRINUSE). Use the sbatch templates' rule
        # instead (20000 + job id mod 20000), or the port the user set.
        job = os.environ.get("SLURM_JOB_ID", "")
        if chosen_port:
            os.environ["MASTER_PORT"] = chosen_port
        elif os.environ.get("MASTER_PORT") and job.isdecimal():
            os.environ["MASTER_PORT"] = str(20000 + int(job) % 20000)
    else:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if not os.environ.get("MASTER_PORT"):
            # one task: a free port of this machine, not a fixed one that two jobs sharing a node (or two
            # `--cluster local` submissions) would both take (EADDRINUSE)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    missing = [k for k in TORCH_ENV if not os.environ.get(k)]
    if missing or int(os.environ["RANK"]) != env.global_rank or int(os.environ["WORLD_SIZE"]) != env.num_tasks:
        raise RuntimeError(
            f"torch.distributed environment not set from submitit's job environment (missing {missing}, "
            f"RANK={os.environ.get('RANK')} vs task {env.global_rank}, WORLD_SIZE={os.environ.get('WORLD_SIZE')} "
            f"vs {env.num_tasks} tasks)"
        )
    return {k: os.environ[k] for k in TORCH_ENV}


class QloraJob:
    """The submitted callable: one task = one rank of `qlora_sft.train`. Checkpointable: on
    preemption submitit calls `checkpoint()`, which resubmits the same arguments; the new job
    resumes from the newest complete checkpoint."""

    def __call__(self, recipe_path: str, overrides: list[str], cwd: str, cpu_ranks: bool = False) -> dict[str, Any]:
        import submitit

        from .launch import default_allocator_settings, end_process_group
        from .train import setup_logging, train

        os.chdir(cwd)
        default_allocator_settings()  # as `qlora-sft train` does (before CUDA starts)
        if cpu_ranks:  # a job that asked for no GPUs runs CPU ranks on purpose (see launch.check_devices)
            os.environ["ACCELERATE_USE_CPU"] = "true"
        env = export_torch_env()
        setup_logging(env["RANK"] == "0", int(env["RANK"]))
        log.info("submitit task %s: %s", submitit.JobEnvironment().global_rank, env)
        sig = submitit.JobEnvironment._usr_sig()  # submitit's preemption signal (USR2)
        submitit_handler = signal.getsignal(sig)
        recipe = load_recipe(recipe_path, overrides)
        signals = [*recipe.checkpoint.signals, signal.Signals(sig).name]
        recipe = load_recipe(recipe_path, [*overrides, f"checkpoint.signals=[{','.join(signals)}]"])
        result = train(recipe)
        end_process_group()  # before submitit's exit (see launch.end_process_group)
        if result.preempted and callable(submitit_handler):
            # The checkpoint is complete on every rank: now let submitit checkpoint() and requeue.
            # `scontrol requeue` makes SLURM send SIGTERM to every process of the job, the scontrol
            # that asked included. Killed before it exits, its failure made submitit record this
            # task as failed (job.done() true, job.result() raising) although the job was requeued
            # and resumes. An ignored signal stays ignored across exec, so scontrol finishes; this
            # process needs no SIGTERM any more (SLURM's SIGKILL after KillWait still ends it).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            submitit_handler(sig, None)
        return {
            "run_dir": str(result.run_dir),
            "global_step": result.global_step,
            "preempted": result.preempted,
            "eval_loss": result.eval_loss,
        }

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(QloraJob(), *args, **kwargs)


def error_end(trace: str, most: int = 8) -> list[str]:
    """The end of a Python traceback: the exception's own lines after its last frame, at most `most`."""
    lines = trace.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    start = frames[-1] + 1 if frames else 0
    while frames and start < len(lines) and lines[start].startswith("    "):  # the frame's source line, ^^^
        start += 1
    return ([line for line in lines[start:] if line.strip()] or lines)[-most:]


def wait_for(job: Any) -> Any:
    """`submit --wait`: wait for every task of the submitit `job`, then rank 0's result. A task that
    failed (an error, or SLURM ended it without a result: cancelled, out of time, its node lost) is
    a JobFailedError naming the job, that task's log files and the last lines of its error."""
    import submitit

    job.wait()
    for rank in range(job.num_tasks):
        task = job.task(rank)
        exc = task.exception()
        if exc is None:
            continue
        parts = str(exc).split("\n----------------------\n")
        if isinstance(exc, submitit.core.utils.FailedJobError) and len(parts) >= 3:  # its error's traceback
            how, end, then = "failed", error_end(parts[1]), "Fix what it names and submit again"
        else:  # no result: the end of its error log
            try:
                text = Path(task.paths.stderr).read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            how, then = f"ended without a result (state {task.state})", "See its logs for why, then submit again"
            end = error_end(text) if text.strip() else ["(its error log is empty)"]
        said = "\n".join(f"    {line}" for line in end)
        raise JobFailedError(
            f"submit --wait: job {job.job_id} {how} in task {rank} of {job.num_tasks}. Its logs:\n"
            f"    stderr: {task.paths.stderr}\n    stdout: {task.paths.stdout}\nThe end of its error:\n{said}\n{then}"
        )
    return job.results()[0]


def interrupted_wait_note(job: Any, settle_s: float = 5.0) -> str:
    """What a Ctrl-C of `submit --wait` leaves, for the CLI's one line. A SLURM job goes on: only the
    waiting stopped. A local job's controller runs in this terminal's process group, so the terminal's
    Ctrl-C reaches it too and it stops the tasks (SIGINT, then SIGKILL a second later): its state
    says which, once it has had `settle_s` to end. (A SIGINT to this process alone leaves it running.)"""
    import time

    from submitit.local.local import LocalJob

    jid, logs = job.job_id, f"its logs: {job.paths.stdout} and {job.paths.stderr}"
    if not isinstance(job, LocalJob):
        return (
            f"Job {jid} is still queued or running in SLURM (Ctrl-C stopped only the waiting): follow it with "
            f"`squeue -j {jid}` and {logs}; cancel it with `scancel {jid}`."
        )
    deadline = time.monotonic() + settle_s
    while job.state == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    if job.state == "RUNNING":
        return (
            f"The local job {jid} is still running on this machine (the interrupt reached this process alone): "
            f"{logs}; stop it with `kill -INT {jid}`."
        )
    return (
        f"The local job {jid} stopped with it (Ctrl-C reaches its processes too); {logs}. Submit again to resume "
        "from the run's newest complete checkpoint."
    )


def check_world_size(recipe: Any, params: Mapping[str, Any]) -> None:
    """The job's ranks (nodes x tasks per node) against the recipe's global batch and its DeepSpeed
    JSON, as the job's first step checks them: else refused only once the job has its nodes."""
    from .errors import RecipeError
    from .launch_config import deepspeed_problems, recipe_deepspeed
    from .recipe import resolve_batch

    world = int(params["nodes"]) * int(params["tasks_per_node"])
    where = f"the job's {world} rank(s) (--nodes {params['nodes']} x {params['tasks_per_node']} tasks per node)"
    try:
        batch = resolve_batch(recipe.train, world)
    except RecipeError as exc:
        raise UserError(
            f"submit: {where} do not fit the recipe: {'; '.join(exc.problems)} Or change --nodes / "
            "--gpus-per-node; nothing was queued."
        ) from None
    ds = recipe_deepspeed(recipe)
    if ds is not None:
        problems = deepspeed_problems(
            ds, recipe, micro_batch=batch.micro_batch, grad_accum=batch.grad_accum, global_batch=batch.global_batch
        )
        if problems:
            raise UserError(f"submit: with {where}: {'; '.join(problems)} Nothing was queued.")


def check_submitted_files(recipe: Any, base_dir: Path) -> None:
    """Before a job is queued: the recipe's DeepSpeed JSON and adapter (as `validate` checks them),
    and deepspeed installed where the recipe asks for it."""
    from .cli import check_named_files
    from .launch_config import require_deepspeed

    check_named_files(recipe, base_dir)
    if recipe.train.args.get("deepspeed"):
        require_deepspeed(f"train.deepspeed ({Path(recipe.train.args['deepspeed']).name})")


def submit(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    tasks_per_node: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    time: str | int | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    constraint: str | None = None,
    extra_sbatch: Sequence[str] | None = None,
    cluster: str | None = None,
    folder: str | os.PathLike[str] | None = None,
    prepare: bool = False,
    deepspeed: str | os.PathLike[str] | None = None,
) -> Any:
    """Validate the recipe and its run directory, then submit. Returns the submitit Job.
    `prepare`: read, tokenize and cache the data in this process first (with every core it may
    use), so data errors show before the job is queued and the ranks find the cache."""
    import submitit

    from .checkpoint import check_run_dir, finished_run
    from .plan import check_data_readable, check_output_dir
    from .tracking import credential_problems

    overrides = list(overrides)
    if deepspeed is not None:  # `--deepspeed X.json` is train.deepspeed, named on the command line
        overrides.append(f"train.deepspeed={Path(deepspeed).resolve()}")
    r = load_recipe(recipe, overrides)
    check_submitted_files(r, Path(recipe).parent)
    check_run_dir(r)
    done = finished_run(r)  # (a job would get its nodes and start every rank to say this)
    if done is not None:
        raise UserError(f"submit: {done} Nothing was queued.")
    out = Path(r.run.output_dir)
    if out.exists() or out.parent.exists():
        check_output_dir(r)  # the job's files and the run directory, before the job is queued
    else:  # a file system the compute nodes mount and this host does not: only the job can tell
        log.warning(
            "submit: run.output_dir %s is not on this host (nor its parent), so whether the job can write it "
            "is not checked here; the job stops naming it if it cannot",
            out,
        )
    check_data_readable(r.data, Path(recipe).parent)
    for problem in credential_problems(r.train.args.get("report_to")):  # the nodes may share a login we lack
        log.warning("submit: %s. Unless the job's nodes can log in, it stops as it starts", problem)
    params = executor_parameters(
        r.cluster,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        partition=partition,
        account=account,
        qos=qos,
        time=time,
        cpus_per_task=cpus_per_task,
        mem=mem,
        constraint=constraint,
        extra_sbatch=list(extra_sbatch) if extra_sbatch is not None else None,
    )
    check_world_size(r, params)
    chosen = choose_cluster(cluster, params)
    folder = Path(folder or r.cluster.folder or (r.run_dir.parent / f"{r.run.name}.submitit")) / "%j"
    check_job_folder(folder.parent, r.run_dir)
    problem = write_problem(folder.parent)
    if problem:
        raise UserError(
            f"submit: the job folder {folder.parent}: {problem}. Pass --folder PATH (or cluster.folder in the recipe) "
            "in a writable place; nothing was queued."
        )
    if chosen != "local":
        check_sbatch_environment(params)
        check_time_limit(params)
        check_partition_limits(params)
        extra = params.get("slurm_additional_parameters", {})
        tag = run_tag(r.run_dir)
        if "comment" not in extra:  # (the user's own comment stays; their job is then found by its folder alone)
            params["slurm_comment"] = tag
        queued = jobs_still_queued(folder.parent, tag)
        if queued and "dependency" not in extra:
            ids = ",".join(job for job, _ in queued)
            states = ", ".join(f"job {job} ({state})" for job, state in queued)
            raise UserError(
                f"submit: {states} of this run (run directory {r.run_dir}) is still in SLURM's queue. A second "
                "job would start beside it (and be refused the run directory it holds) or after it (and find the "
                f"run trained). Wait for it (squeue -j {ids}), cancel it (scancel {ids}), chain the new one after "
                f"it (--extra-sbatch=--dependency=afterany:{ids}), or give another run.name; nothing was queued."
            )
    made, before = missing_folders(folder.parent), submission_files(folder.parent)  # (to take back if refused)
    # (submitit writes the python it is given into the job's command line as is: quoted, a path with a
    # space or a `$` stays one word)
    executor = submitit.AutoExecutor(folder=folder, cluster=chosen, slurm_python=shlex.quote(sys.executable))
    if executor.cluster == "local":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        params.pop("name", None)
    executor.update_parameters(**params)
    if prepare:  # after every check above: a time limit or sbatch line that is refused tokenizes nothing
        from .train import tokenizer_and_data

        prepared = tokenizer_and_data(r, Path(recipe).parent, by="prepare")[1]
        log.info("data: %s", prepared.origin())
    cpu_ranks = "gpus_per_node" not in params
    try:
        job = executor.submit(QloraJob(), str(Path(recipe).resolve()), overrides, str(Path.cwd()), cpu_ranks)
    except submitit.core.utils.FailedJobError as exc:  # sbatch refused it (its words), or could not reach SLURM
        take_back_refused_submission(folder.parent, before, made, exc)
        said = "\n".join(f"    {line}" for line in str(exc).strip().splitlines()[-8:])
        raise UserError(
            f"submit: sbatch refused the job; nothing was queued. It said:\n{said}\nFix the setting it names "
            "(--partition, --account, --qos, --time, --mem, --constraint, --extra-sbatch, or the recipe's "
            "cluster: section), or, if it could not reach SLURM, submit from a host of the cluster"
        ) from None
    log.info("submitted job %s (%s) with %s", job.job_id, executor.cluster, params)
    return job
