"""Experiment trackers (`train.report_to`): Weights & Biases, MLflow, Trackio, Comet, on top of the
TensorBoard events and logs/metrics.jsonl that every run writes.

transformers' own callbacks do the logging, from the main process only. This module opens and
closes the trackers' runs around them: a run is named `run.name`, gets the resolved recipe and the
launch block as its config, and a relaunch of the same run directory (a resume, a requeue after
preemption, a directory moved) continues the same tracker run, its id kept in the run directory's
logs/; a copy of a run directory opens new ones. Opening the runs here, before the data and the
model, names a tracker that cannot open its run before memory is spent, and keeps the final
evaluation (after training) in the run: transformers' MLflow callback ends a run it opened itself
when training ends, and the next metrics then start a new one. A launch that fails closes them as
failed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import UserError, first_line

log = logging.getLogger("qlora_sft")

# recipe spelling -> (transformers' integration name, the module it needs, the extra that installs it)
TRACKERS: dict[str, tuple[str, str, str]] = {
    "wandb": ("wandb", "wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow", "mlflow"),
    "trackio": ("trackio", "trackio", "trackio"),
    "comet": ("comet_ml", "comet_ml", "comet"),
    "comet_ml": ("comet_ml", "comet_ml", "comet"),
}
ALWAYS = ("tensorboard",)  # written by every run whatever report_to says
WANDB_ID = "wandb_run_id"
MLFLOW_ID = "mlflow_run_id"
OWNER = "tracker_run_dir"  # the run directory that opened the kept ids (a copy of it is told apart)


def requested(report_to: Any) -> list[str]:
    """`train.report_to` as a list of names (a string or a list in the recipe; `none` is empty), each
    name once: the Trainer adds one callback per entry, and a name given twice logged every step twice
    into the same tracker run."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    kept: list[Any] = []
    for n in names:
        if (not isinstance(n, str) or n not in ("none", *ALWAYS)) and n not in kept:
            kept.append(n)
    return kept


def report_to_problems(report_to: Any) -> list[str]:
    """What is wrong with `train.report_to`, each with what to do (checked with the recipe)."""
    if report_to is not None and not isinstance(report_to, str | list | tuple):
        return [f"is {report_to!r}; give a tracker name or a list of them ({', '.join(sorted(TRACKERS))})"]
    problems = []
    raw = [report_to] if isinstance(report_to, str) else list(report_to or [])
    others = [n for n in raw if n != "none"]
    if "none" in raw and others:
        problems.append(
            f"names none beside {', '.join(map(str, others))}; give none to log to no tracker, or the trackers alone"
        )
    for name in requested(report_to):
        if not isinstance(name, str):  # `report_to: [[wandb]]`, `[{wandb: true}]`
            problems.append(
                f"holds {name!r}, which is not a tracker name; give a tracker name or a list of them "
                f"({', '.join(sorted(TRACKERS))})"
            )
        elif "," in name and all(part.strip() in TRACKERS for part in name.split(",")):
            joined = ",".join(part.strip() for part in name.split(","))
            problems.append(
                f"names `{name}`, several trackers in one name; give several trackers as a list: "
                f"train.report_to=[{joined}] (YAML: report_to: [{joined.replace(',', ', ')}])"
            )
        elif name == "all":
            problems.append("is `all`; name the trackers (e.g. [wandb]) so a run never logs somewhere by surprise")
        elif name not in TRACKERS:
            problems.append(f"names `{name}`, not a tracker qlora-sft knows: {', '.join(sorted(TRACKERS))}, none")
        elif importlib.util.find_spec(TRACKERS[name][1]) is None:
            problems.append(
                f"asks for {name} but the `{TRACKERS[name][1]}` package is not installed: "
                f"pip install 'qlora-sft[{TRACKERS[name][2]}]'"
            )
    return problems


WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")
WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")  # what W&B's settings accept


def credential_problems(report_to: Any) -> list[str]:
    """Trackers of `train.report_to` that could not open a run here: W&B online without a login (its
    run opens after the model has loaded, where the job then died with "No API key configured").
    Checked by the main process before the data and the model, with W&B's own login (which asks on
    a terminal, as wandb.init would, and reads WANDB_API_KEY or ~/.netrc elsewhere)."""
    problems: list[str] = []
    if "wandb" not in requested(report_to):
        return problems
    mode = os.environ.get("WANDB_MODE", "")
    if mode and mode.lower() not in WANDB_MODES:
        # (checked first: a misspelt offline mode would otherwise be reported as a missing login)
        return [
            f"train.report_to asks for wandb, and WANDB_MODE={mode!r} is not a mode W&B knows: set it to one of "
            f"{', '.join(WANDB_MODES)} (offline logs into the run directory), or unset it"
        ]
    if mode.lower() not in WANDB_LOCAL_MODES:
        import wandb

        leave_inherited_wandb_service()

        try:
            wandb.login(verify=False)
        except Exception as exc:  # wandb.errors.UsageError: no key and no terminal to ask on
            problems.append(
                f"train.report_to asks for wandb, which cannot log in here ({exc}): run `wandb login` once on this "
                "machine (or a node that shares its home), set WANDB_API_KEY, or set WANDB_MODE=offline to log "
                "into the run directory and `wandb sync` it later"
            )
    return problems


def integrations(report_to: Any) -> list[str] | str:
    """The `report_to` handed to the Trainer (TensorBoard is added by qlora-sft itself)."""
    names = list(dict.fromkeys(TRACKERS[n][0] for n in requested(report_to)))  # comet and comet_ml: one
    return names or "none"


def start(report_to: Any, logs_dir: Path, run_name: str) -> None:
    """Main process, before the data and the model: open each tracker's run (a new one, or the one
    whose id the run directory keeps), named `run_name`, so that a tracker that cannot open its run
    here (an MLflow store that is a file, or does not hold the kept run) is named before any memory is
    spent. `describe` then gives the runs the resolved recipe and launch block as their config.
    transformers' callbacks log into these runs and leave them open: the final evaluation after
    training lands in the same run, and `finish` closes them.

    A run directory copied from another (`cp -r runs/a runs/b` to start a variant) keeps the
    original's ids in its logs/; continuing those would mix the copy's steps into the original's
    tracker runs. `copied_from` tells a copy (the directory that opened the ids still holds them) from
    a move (it does not): a copy opens new tracker runs that name the original."""
    names = set(requested(report_to))
    if not names:
        return
    origin = copied_from(logs_dir)
    inherited: dict[str, str | None] = {}
    if origin is not None:  # the copy's tracker runs are its own: the original keeps its ids
        for name in (WANDB_ID, MLFLOW_ID):
            inherited[name] = read_id(logs_dir / name)
            (logs_dir / name).unlink(missing_ok=True)
    opened = []
    if "wandb" in names:
        opened.append(f"W&B run {_start_wandb(logs_dir, run_name, origin, inherited.get(WANDB_ID))}")
    if "mlflow" in names:
        opened.append(f"MLflow run {_start_mlflow(logs_dir, run_name, origin, inherited.get(MLFLOW_ID))}")
    keep_id(logs_dir / OWNER, str(logs_dir.parent.resolve()))
    if origin is not None:
        before = ", ".join(
            f"{label} run {inherited[f]}" for label, f in (("W&B", WANDB_ID), ("MLflow", MLFLOW_ID)) if inherited.get(f)
        )
        log.warning(
            "trackers: %s is a copy of %s (its logs/ named the tracker runs %s logs into: %s): this run logs into "
            "new ones (%s), which name %s as where it was copied from; the original's runs are left as they are",
            logs_dir.parent,
            origin,
            origin,
            before or "none of those asked for now",
            ", ".join(opened),
            origin,
        )
    log.info("trackers: %s (run %s; the ids are kept in %s)", ", ".join(opened), run_name, logs_dir)


def leave_inherited_wandb_service() -> None:
    """Forget a W&B service this process inherited. W&B keeps the socket of the service it starts in
    WANDB_SERVICE ("<version>-<pid of the process that started it>-..."), and a child process connects
    to it: a job launched from a Python process that ran W&B (submitit from a notebook, a sweep
    driver) failed on a node where that socket is not, or met the other process's runs there ("run
    ID ... is in use" after a kill and resume). A training's W&B run is its own: it starts its own
    service, and the other process keeps its one."""
    token = os.environ.get("WANDB_SERVICE", "")
    fields = token.split("-")
    if token and not (len(fields) > 1 and fields[1] == str(os.getpid())):
        del os.environ["WANDB_SERVICE"]
        log.info("trackers: W&B starts its own service (WANDB_SERVICE named another process's: %s)", token)


def _start_wandb(logs_dir: Path, run_name: str, origin: Path | None, inherited: str | None) -> str:
    import wandb

    leave_inherited_wandb_service()

    run_id = read_id(logs_dir / WANDB_ID) or secrets.token_hex(4)  # W&B ids: 8 characters of [a-z0-9]
    config: dict[str, Any] = {}
    if origin is not None:
        config["qlora_sft_copied_from"] = {"run_dir": str(origin), "wandb_run_id": inherited}
    # WANDB_MODE as this launch sets it (W&B's settings of this process may predate it: the login check)
    mode = {"dryrun": "offline"}.get(os.environ.get("WANDB_MODE", "").lower(), os.environ.get("WANDB_MODE", "").lower())
    try:
        wandb.init(
            mode=mode if mode in ("online", "offline", "disabled", "shared") else None,  # type: ignore[arg-type]
            project=os.environ.get("WANDB_PROJECT", "qlora-sft"),
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(logs_dir),
            config=config,
        )
    except Exception as exc:  # wandb's errors: a folder it cannot write, a project it may not log to
        raise UserError(
            f"train.report_to asks for wandb, which could not open run {run_id} (project "
            f"{os.environ.get('WANDB_PROJECT', 'qlora-sft')}, files in {logs_dir / 'wandb'}): "
            f"{type(exc).__name__}: {first_line(exc)}. Fix what it names (WANDB_PROJECT, WANDB_ENTITY, the folder), "
            "or set WANDB_MODE=offline to log into the run directory and `wandb sync` it later; nothing was trained"
        ) from exc
    keep_id(logs_dir / WANDB_ID, run_id)
    return run_id


def _start_mlflow(logs_dir: Path, run_name: str, origin: Path | None, inherited: str | None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    store = (
        f"MLFLOW_TRACKING_URI={uri}"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else f"MLflow's default store {uri} (MLFLOW_TRACKING_URI is not set)"
    )
    id_file = logs_dir / MLFLOW_ID
    run_id = read_id(id_file)
    # the first contact retries briefly (MLflow's default: about four minutes without a word, the
    # job's GPUs held), unless the user set how long; the logging later keeps MLflow's retries
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    saved = {k: os.environ.get(k) for k in quick}
    if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ:
        os.environ.update(quick)
    log.info("trackers: opening the MLflow run in %s", store)
    try:
        if run_id is not None:
            try:
                mlflow.tracking.MlflowClient().get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise UserError(
                    f"{id_file} names MLflow run {run_id}, which the tracking store {store} does not hold (the run "
                    "directory came from another machine, or MLFLOW_TRACKING_URI changed since). Set "
                    f"MLFLOW_TRACKING_URI to the store that holds it, or delete {id_file} to log this run's next "
                    "steps into a new MLflow run; nothing was trained"
                ) from None
            # MLflow refuses to change a logged parameter; the first launch logged them (a resume
            # may change how long to train), and every launch logs its recipe as an artifact
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
        else:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "qlora-sft"))
        tags = (
            {"qlora_sft.copied_from": str(origin), "qlora_sft.copied_from_run_id": inherited or ""}
            if origin is not None
            else None
        )
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
    except UserError:
        raise
    except Exception as exc:  # a store that is a file, a scheme MLflow does not know, a server that refuses
        raise UserError(
            f"train.report_to asks for mlflow, which could not open its run in {store}: "
            f"{type(exc).__name__}: {first_line(exc)[:300]}. Point MLFLOW_TRACKING_URI at a folder it may create "
            "(file:/path/mlruns) or a tracking server that answers (set MLFLOW_HTTP_REQUEST_MAX_RETRIES to wait "
            "longer for a slow one); nothing was trained"
        ) from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    keep_id(id_file, run.info.run_id)
    return str(run.info.run_id)


def describe_runs(report_to: Any, config: dict[str, Any]) -> None:
    """Main process, once the data is fingerprinted: the resolved recipe and launch block as the
    tracker runs' config (W&B: config `qlora_sft`; MLflow: artifact `qlora-sft/recipe.json`)."""
    names = set(requested(report_to))
    if "wandb" in names:
        import wandb

        if wandb.run is not None:
            wandb.config.update({"qlora_sft": config}, allow_val_change=True)
    if "mlflow" in names:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_dict(config, "qlora-sft/recipe.json")


def copied_from(logs_dir: Path) -> Path | None:
    """The run directory that this one was copied from, or None: the directory recorded in
    logs/tracker_run_dir as the one that opened the kept ids is another one (not this one reached by
    another path) and still holds the same ids. A directory moved (or carried to another machine)
    leaves nothing at the recorded path and continues its tracker runs."""
    recorded = read_id(logs_dir / OWNER)
    here = logs_dir.parent
    if recorded is None:
        return None
    origin = Path(recorded)
    try:
        if not origin.is_dir() or os.path.samefile(origin, here):
            return None
    except OSError:
        return None
    for name in (WANDB_ID, MLFLOW_ID):
        mine = read_id(logs_dir / name)
        if mine is not None and read_id(origin / "logs" / name) == mine:
            return origin
    return None


def finish(report_to: Any, preempted: bool = False, failed: bool = False) -> None:
    """Main process, after the final save (or a preemption stop, or a failure): close the runs,
    flushed. A failed training is FAILED in MLflow (left open, MLflow's exit handler ended it as
    FINISHED), exit code 1 in W&B."""
    names = set(requested(report_to))
    if "wandb" in names:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 75 if preempted else 0)
            # and stop the service this training started: a later training in this process (a notebook)
            # starts from WANDB_MODE and the login as they are then, not as this one's left them
            try:
                wandb.teardown()
            except SystemExit as exc:  # W&B's service ended with an error code: the training's result stands
                log.warning("trackers: W&B's service ended with exit code %s", exc.code)
    if "mlflow" in names:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED" if failed else "KILLED" if preempted else "FINISHED")


def close_after_failure(report_to: Any) -> None:
    """Main process, when the launch raised with the tracker runs open: close them as failed, never
    masking the error that stopped the launch."""
    try:
        finish(report_to, failed=True)
    except Exception as exc:  # a full disk, a tracker server gone: the launch's own error matters more
        log.warning("trackers: could not close the runs as failed (%s)", first_line(exc))


def read_id(path: Path) -> str | None:
    return path.read_text().strip() or None if path.is_file() else None


def keep_id(path: Path, run_id: str) -> None:
    if read_id(path) != run_id:
        path.write_text(run_id + "\n")


def describe(report_to: Any) -> str:
    names = requested(report_to)
    return "tensorboard + logs/metrics.jsonl" + (" + " + ", ".join(names) if names else "")
