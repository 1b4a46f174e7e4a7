"""Experiment trackers (`train.report_to`): Weights & Biases, MLflow, Trackio, Comet, on top of the
TensorBoard events and logs/metrics.jsonl that every run writes.

transformers' own callbacks do the logging, from the main process only. This module opens and
closes the trackers' runs around them: a run is named `run.name`, gets the resolved recipe and the
launch block as its config, and a relaunch of the same run directory (a resume, a requeue after
preemption) continues the same tracker run, its id kept in the run directory's logs/. Opening the
runs here also keeps the final evaluation (after training) in the run: transformers' MLflow callback
ends a run it opened itself when training ends, and the next metrics then start a new one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
from pathlib import Path
from typing import Any

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


def requested(report_to: Any) -> list[str]:
    """`train.report_to` as a list of names (a string or a list in the recipe; `none` is empty)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n not in ("none", *ALWAYS)]


def report_to_problems(report_to: Any) -> list[str]:
    """What is wrong with `train.report_to`, each with what to do (checked with the recipe)."""
    if report_to is not None and not isinstance(report_to, str | list | tuple):
        return [f"is {report_to!r}; give a tracker name or a list of them ({', '.join(sorted(TRACKERS))})"]
    problems = []
    for name in requested(report_to):
        if name == "all":
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


def credential_problems(report_to: Any) -> list[str]:
    """Trackers of `train.report_to` that could not open a run here: W&B online without a login (its
    run opens after the model has loaded, where the job then died with "No API key configured").
    Checked by the main process before the data and the model, with W&B's own login (which asks on
    a terminal, as wandb.init would, and reads WANDB_API_KEY or ~/.netrc elsewhere)."""
    problems = []
    if "wandb" in requested(report_to) and os.environ.get("WANDB_MODE", "").lower() not in WANDB_LOCAL_MODES:
        import wandb

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
    names = [TRACKERS[n][0] for n in requested(report_to)]
    return names or "none"


def start(report_to: Any, logs_dir: Path, run_name: str, config: dict[str, Any]) -> None:
    """Main process, before the Trainer exists: open each tracker's run (a new one, or the one whose
    id the run directory keeps), named `run_name`, with the resolved recipe and launch block as its
    config. transformers' callbacks then log into these runs and leave them open: the final
    evaluation after training lands in the same run, and `finish` closes them."""
    names = set(requested(report_to))
    if "wandb" in names:
        import wandb

        run_id = read_id(logs_dir / WANDB_ID) or secrets.token_hex(4)  # W&B ids: 8 characters of [a-z0-9]
        wandb.init(
            project=os.environ.get("WANDB_PROJECT", "qlora-sft"),
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(logs_dir),
            config={"qlora_sft": config},
        )
        keep_id(logs_dir / WANDB_ID, run_id)
    if "mlflow" in names:
        import mlflow

        run_id = read_id(logs_dir / MLFLOW_ID)
        if run_id is None:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "qlora-sft"))
        else:
            # MLflow refuses to change a logged parameter; the first launch logged them (a resume
            # may change how long to train), and every launch logs its recipe as an artifact
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        keep_id(logs_dir / MLFLOW_ID, run.info.run_id)
        mlflow.log_dict(config, "qlora-sft/recipe.json")
    if names:
        log.info("trackers: %s (run %s; the ids are kept in %s)", ", ".join(sorted(names)), run_name, logs_dir)


def finish(report_to: Any, preempted: bool = False) -> None:
    """Main process, after the final save (or a preemption stop): close the runs, flushed."""
    names = set(requested(report_to))
    if "wandb" in names:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=75 if preempted else 0)
    if "mlflow" in names:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(status="KILLED" if preempted else "FINISHED")


def read_id(path: Path) -> str | None:
    return path.read_text().strip() or None if path.is_file() else None


def keep_id(path: Path, run_id: str) -> None:
    if read_id(path) != run_id:
        path.write_text(run_id + "\n")


def describe(report_to: Any) -> str:
    names = requested(report_to)
    return "tensorboard + logs/metrics.jsonl" + (" + " + ", ".join(names) if names else "")
