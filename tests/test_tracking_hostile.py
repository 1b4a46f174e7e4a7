"""Experiment tracking as a hostile but realistic user meets it: a run directory copied to start a
variant (or moved), an MLflow store that is a file or does not hold the run, a training that fails
with its tracker runs open, a malformed `train.report_to`. W&B offline and MLflow with a local file
store, for real (no mock of their API); one tiny run trained in-process, copied per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import recipe_dict, wandb_records, write_recipe, write_toy_data

from qlora_sft.errors import RecipeError, UserError

TRACKERS = {"max_steps": 2, "save_steps": 1, "logging_steps": 1, "report_to": ["wandb", "mlflow"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store only on request
        mp.setenv("MLFLOW_TRACKING_URI", f"file://{root / 'mlruns'}")
        # a resume sets MLFLOW_MAX_LOG_PARAMS=0 in this process: gone again after this module
        mp.setenv("MLFLOW_MAX_LOG_PARAMS", "")
        mp.delenv("MLFLOW_MAX_LOG_PARAMS")
        yield root


@pytest.fixture(scope="module")
def run(env: Path, tiny_model: Path) -> Path:
    """A finished run (2 steps) that logged to W&B (offline) and MLflow (the file store in `env`)."""
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    data = write_toy_data(env / "toy.jsonl", n=48)
    path = write_recipe(env / "r.yaml", recipe_dict(tiny_model, data, env / "runs", train=TRACKERS))
    return train(load_recipe(path)).run_dir


def launch(run: Path, out: Path, name: str, **train_args: Any) -> Any:
    """Train the fixture's recipe as run `name` under `out` (train_args override)."""
    from qlora_sft.recipe import build_recipe
    from qlora_sft.train import train

    data = yaml.safe_load((run / "recipe.yaml").read_text())
    data.pop("launch", None)
    data["run"].update(name=name, output_dir=str(out))
    data["train"].update(train_args)
    return train(build_recipe(data, source=str(out / f"{name}.yaml")))


def ids(run_dir: Path) -> tuple[str, str]:
    logs = run_dir / "logs"
    return (logs / "wandb_run_id").read_text().strip(), (logs / "mlflow_run_id").read_text().strip()


def client(env: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"file://{env / 'mlruns'}")


def loss_steps(env: Path, run_id: str) -> list[int]:
    return sorted(m.step for m in client(env).get_metric_history(run_id, "loss"))


def wandb_config(run_dir: Path, run_id: str) -> dict[str, Any]:
    """The config the offline W&B run files of `run_id` under run_dir/logs/wandb logged (top-level keys)."""
    config: dict[str, Any] = {}
    for f in sorted((run_dir / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind in ("run", "config"):
                items = r.run.config.update if kind == "run" else r.config.update
                for i in items:
                    config[i.nested_key[0] if i.nested_key else i.key] = json.loads(i.value_json)
    return config


def test_a_copied_run_directory_logs_into_new_tracker_runs_and_leaves_the_originals(
    run: Path, env: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """`cp -r runs/tiny runs/variant` and a relaunch (a variant trained further): the copy's logs/ kept
    the original's W&B id and MLflow run id, so the variant's steps went into the original's tracker
    runs (MLflow's history of `tiny` gained step 3, its FINISHED run reopened). Now the copy opens new
    tracker runs that name the run they were copied from; the original's history is untouched; the
    copy's next launch continues its own new runs."""
    original = ids(run)
    copy = tmp_path / "variant"
    shutil.copytree(run, copy)
    capsys.readouterr()
    launch(run, tmp_path, "variant", max_steps=3)
    said = capsys.readouterr().out
    new = ids(copy)
    assert new[0] != original[0] and new[1] != original[1]
    assert loss_steps(env, original[1]) == [1, 2]  # the original's MLflow history as it was
    assert loss_steps(env, new[1]) == [3]
    assert f"{copy} is a copy of {run}" in said and original[1] in said and original[0] in said
    tags = client(env).get_run(new[1]).data.tags
    assert tags["qlora_sft.copied_from"] == str(run) and tags["qlora_sft.copied_from_run_id"] == original[1]
    assert client(env).get_run(new[1]).info.run_name == "variant"
    assert wandb_config(copy, new[0])["qlora_sft_copied_from"] == {"run_dir": str(run), "wandb_run_id": original[0]}
    launch(run, tmp_path, "variant", max_steps=4)  # the copy's own resume: its own runs continue
    assert ids(copy) == new and loss_steps(env, new[1]) == [3, 4]
    assert loss_steps(env, original[1]) == [1, 2]


def test_a_moved_run_directory_continues_its_tracker_runs(run: Path, env: Path, tmp_path: Path):
    """`mv runs/a runs/b` (or the run carried to another machine): the same run, so the same tracker runs."""
    first = tmp_path / "a"
    shutil.copytree(run, first)
    launch(run, tmp_path, "a", max_steps=3)  # a copy: its own tracker runs from here
    before = ids(first)
    moved = tmp_path / "b"
    first.rename(moved)
    launch(run, tmp_path, "b", max_steps=4)
    assert ids(moved) == before and loss_steps(env, before[1]) == [3, 4]


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_sft import model

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(model, "load_model", loaded)


def test_an_mlflow_store_that_is_a_file_stops_before_the_model_loads(
    run: Path, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """MLFLOW_TRACKING_URI left pointing at a file (a typo, a stale export): the run opened after the
    model had loaded and died in a NotADirectoryError traceback about '<file>/.trash'."""
    store = tmp_path / "notes.txt"
    store.write_text("mine\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store))
    no_model(monkeypatch)
    with pytest.raises(UserError) as exc:
        launch(run, tmp_path, "fresh", max_steps=2)
    message = str(exc.value)
    assert f"MLFLOW_TRACKING_URI={store}" in message and "could not open" in message
    assert store.read_text() == "mine\n"


def test_an_mlflow_store_that_does_not_hold_the_run_is_named_before_the_model_loads(
    run: Path, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The run carried to another machine (or MLFLOW_TRACKING_URI changed): logs/mlflow_run_id names a
    run this store does not hold. It died after the model had loaded with "Run '...' not found"."""
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    (moved / "logs" / "tracker_run_dir").write_text("/elsewhere/runs/tiny\n")  # written on the other machine
    store = tmp_path / "other-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{store}")
    no_model(monkeypatch)
    with pytest.raises(UserError) as exc:
        launch(run, tmp_path, "moved", max_steps=3)
    message = str(exc.value)
    run_id = ids(run)[1]
    assert f"{moved / 'logs' / 'mlflow_run_id'} names MLflow run {run_id}" in message
    assert f"file://{store}" in message and "MLFLOW_TRACKING_URI" in message and "delete" in message


def test_a_training_that_fails_closes_its_tracker_runs_as_failed(
    run: Path, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A training that raised left its MLflow run open; at exit MLflow's own handler ended it as
    FINISHED, so a crashed run read as a finished one. Now it is FAILED."""
    import mlflow
    from transformers import TrainerCallback

    from qlora_sft.recipe import build_recipe
    from qlora_sft.train import train

    class Boom(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            raise RuntimeError("boom")

    data = yaml.safe_load((run / "recipe.yaml").read_text())
    data.pop("launch", None)
    data["run"].update(name="crash", output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        train(build_recipe(data), extra_callbacks=[Boom()])
    assert mlflow.active_run() is None
    _, mlflow_id = ids(tmp_path / "crash")
    assert client(env).get_run(mlflow_id).info.status == "FAILED"


@pytest.mark.parametrize("report_to", [[["wandb"]], [{"wandb": True}], ["wandb", 3]])
def test_a_report_to_entry_that_is_not_a_name_is_a_recipe_error(report_to: Any, tiny_model: Path, tmp_path: Path):
    """`report_to: [[wandb]]` (a YAML list in a list): a TypeError traceback (unhashable type: 'list')."""
    from qlora_sft.recipe import build_recipe

    with pytest.raises(RecipeError) as exc:
        build_recipe(recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path, train={"report_to": report_to}))
    (problem,) = [p for p in exc.value.problems if "report_to" in p]
    assert "give a tracker name" in problem


def test_tensorboard_shows_each_step_once_after_a_failed_launch_and_a_resume(run: Path, tmp_path: Path):
    """A launch that died after logging step 3 (checkpoint-2 its newest) and a relaunch from
    checkpoint-2: metrics.jsonl moved the old step 3 aside, but TensorBoard read both event files and
    showed step 3 twice (the stale value of the dead launch beside the replayed one). The relaunch's
    writer now purges what the dead launch logged after the checkpoint (purge_step)."""
    from helpers import losses_by_step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerCallback

    class DieAtStep4(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 4:
                raise RuntimeError("died")

    from qlora_sft.recipe import build_recipe
    from qlora_sft.train import train

    data = yaml.safe_load((run / "recipe.yaml").read_text())
    data.pop("launch", None)
    data["run"].update(name="replayed", output_dir=str(tmp_path))
    data["train"].update(max_steps=5, save_steps=2, logging_steps=1, report_to="none", learning_rate=0.05)
    with pytest.raises(RuntimeError, match="died"):
        train(build_recipe(data), extra_callbacks=[DieAtStep4()])
    run_dir = tmp_path / "replayed"
    first = EventAccumulator(str(run_dir / "logs"))
    first.Reload()
    assert [s.step for s in first.Scalars("train/loss")] == [1, 2, 3]
    train(build_recipe(data))
    shown = EventAccumulator(str(run_dir / "logs"))
    shown.Reload()
    steps = [s.step for s in shown.Scalars("train/loss")]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5]
    assert {s.step: s.value for s in shown.Scalars("train/loss")} == pytest.approx(losses_by_step(run_dir))


def test_an_mlflow_server_that_does_not_answer_is_named_within_seconds(
    run: Path, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """MLFLOW_TRACKING_URI at a server that is down (a port nobody listens on): MLflow retried for
    about four minutes without a word, then died in a traceback, with the job's GPUs held. Now the
    launch's first contact retries briefly and names the URI and the way to wait longer."""
    import time

    from helpers import free_port

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    no_model(monkeypatch)
    began = time.monotonic()
    with pytest.raises(UserError) as exc:
        launch(run, tmp_path, "server", max_steps=2)
    assert time.monotonic() - began < 20
    message = str(exc.value)
    assert f"MLFLOW_TRACKING_URI={uri}" in message and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in message


def test_a_step_whose_loss_is_nan_reaches_every_tracker_as_nan_not_zero(
    run: Path, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The weights turn NaN at step 3 (the run stops after train.nonfinite_patience such steps). The
    Trainer's logging_nan_inf_filter left those steps out of the logged average, and with every step
    of the window left out it logged loss 0.0: metrics.jsonl, TensorBoard, MLflow (and W&B) showed a
    perfect loss where the model had diverged. Now such a window's loss is NaN everywhere."""
    import math

    from helpers import metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qlora_sft.recipe import build_recipe
    from qlora_sft.train import train

    monkeypatch.setenv("QLORA_SFT_FAULT", "nan@3")
    data = yaml.safe_load((run / "recipe.yaml").read_text())
    data.pop("launch", None)
    data["run"].update(name="diverged", output_dir=str(tmp_path))
    data["train"].update(max_steps=8, save_steps=2, logging_steps=1, report_to="mlflow")
    with pytest.raises(UserError, match="training diverged"):
        train(build_recipe(data))
    run_dir = tmp_path / "diverged"
    logged = {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 4] and all(math.isfinite(logged[s]) for s in (1, 2))
    assert all(math.isnan(logged[s]) for s in (3, 4)), logged
    board = EventAccumulator(str(run_dir / "logs"))
    board.Reload()
    assert all(math.isnan(s.value) for s in board.Scalars("train/loss") if s.step >= 3)
    mlflow_id = (run_dir / "logs" / "mlflow_run_id").read_text().strip()
    history = {m.step: m.value for m in client(env).get_metric_history(mlflow_id, "loss")}
    assert all(math.isnan(history[s]) for s in (3, 4)) and math.isfinite(history[2])


def test_trackers_joined_by_a_comma_are_told_the_list_syntax(tiny_model: Path, tmp_path: Path):
    """`train.report_to=wandb,mlflow` (transformers' --report_to spelling): the error said only that
    `wandb,mlflow` is not a tracker, naming the trackers the user had spelled right."""
    from qlora_sft.recipe import apply_overrides, build_recipe

    data, problems = apply_overrides(
        recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path), ["train.report_to=wandb,mlflow"]
    )
    assert not problems
    with pytest.raises(RecipeError) as exc:
        build_recipe(data)
    (problem,) = [p for p in exc.value.problems if "report_to" in p]
    assert "give several trackers as a list: train.report_to=[wandb,mlflow]" in problem


def test_none_beside_a_tracker_is_a_recipe_error(tiny_model: Path, tmp_path: Path):
    """`train.report_to: [none, wandb]` logged to W&B without a word about the `none`."""
    from qlora_sft.recipe import build_recipe

    for report_to in (["none", "tensorboard"], ["wandb", "none"]):
        data = recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path, train={"report_to": report_to})
        with pytest.raises(RecipeError) as exc:
            build_recipe(data)
        (problem,) = [p for p in exc.value.problems if "report_to" in p]
        other = next(n for n in report_to if n != "none")
        assert f"names none beside {other}; give none to log to no tracker, or the trackers alone" in problem
    for fine in ("none", ["none"], [], ["tensorboard"]):
        build_recipe(recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path, train={"report_to": fine}))


def test_a_tracker_named_twice_logs_each_step_once(run: Path, env: Path, tmp_path: Path):
    """`report_to: [mlflow, wandb, mlflow]` (a list merged from two configs, or `comet` beside
    `comet_ml`): the Trainer got one callback per entry, and MLflow's history held every step twice
    (the second tracker of the same name logged into the same run)."""
    from qlora_sft import tracking

    launch(run, tmp_path, "twice", max_steps=2, report_to=["mlflow", "wandb", "mlflow"])
    _, mlflow_id = ids(tmp_path / "twice")
    assert loss_steps(env, mlflow_id) == [1, 2]
    assert tracking.integrations(["comet", "comet_ml", "wandb", "wandb"]) == ["comet_ml", "wandb"]


W_AND_B_SCRIPT = """
import os, sys
from pathlib import Path
from qlora_sft import tracking
logs = Path(sys.argv[1])
logs.mkdir(parents=True)
tracking.start(["wandb"], logs, "first")
tracking.finish(["wandb"])
print("service after finish:", os.environ.get("WANDB_SERVICE"))
os.environ.pop("WANDB_MODE")
print("problems:", tracking.credential_problems(["wandb"]))
"""


def test_w_and_b_opens_its_own_service_not_one_inherited_from_the_launching_process(tmp_path: Path):
    """A job started from a Python process that ran W&B (submitit from a notebook, a sweep driver, a
    test worker) inherits WANDB_SERVICE, the socket of that process's W&B service: the job's W&B
    connected to it, and failed where the socket is not (a compute node: "could not open run") or
    met the parent's state there ("run ID ... is in use" after a kill and resume). The training's
    own W&B is its own: an inherited service is left to the process that started it."""
    import subprocess
    import sys

    from helpers import cpu_env

    env = {
        **cpu_env(),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HOME": str(tmp_path / "home"),  # no ~/.netrc: no login to fall back on
        "WANDB_SERVICE": f"3-1-unix-{tmp_path / 'login-node' / 'socket'}",  # another process's service
    }
    for var in ("WANDB_API_KEY", "NETRC", "WANDB_CONFIG_DIR"):
        env.pop(var, None)
    logs = tmp_path / "run" / "logs"
    done = subprocess.run(
        [sys.executable, "-c", W_AND_B_SCRIPT, str(logs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = (logs / "wandb_run_id").read_text().strip()
    assert list((logs / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    # a second training in the same process (a notebook) meets W&B as the first found it: the first's
    # offline mode and service are gone with its run, and online W&B with no login is named again
    assert "service after finish: None" in done.stdout
    assert "cannot log in here" in done.stdout.split("problems:")[1], done.stdout
