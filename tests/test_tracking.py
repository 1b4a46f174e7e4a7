"""Experiment trackers for real, offline: Weights & Biases in offline mode and MLflow with a local
file store, through two CPU ranks, a kill and a resume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import accelerate_cmd, cpu_env, losses_by_step, recipe_dict, wandb_records, write_recipe

from qlora_sft.errors import RecipeError
from qlora_sft.recipe import build_recipe


def wandb_history(run_file: Path) -> tuple[str, dict[int, float], bool]:
    """(run id, train/loss by train/global_step, whether the qlora-sft config was logged)."""
    run_id, losses, config = "", {}, False
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = r.run.config.update if kind == "run" else r.config.update
            config |= any((i.nested_key[0] if i.nested_key else i.key) == "qlora_sft" for i in items)
            run_id = r.run.run_id if kind == "run" else run_id
        elif kind == "history":
            items = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                losses[int(items["train/global_step"])] = float(items["train/loss"])
    return run_id, losses, config


def test_wandb_and_mlflow_hold_every_step_across_a_kill_and_resume(
    tiny_model: Path, toy_data: Path, tmp_path: Path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    env = {
        **cpu_env(),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        # offline W&B writes its file every 15 s by default; these steps take a fraction of a second
        "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.2",
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps the file store only on request
    }
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(
            tiny_model,
            toy_data,
            tmp_path / "runs",
            train={"max_steps": 16, "save_steps": 5, "logging_steps": 1, "report_to": ["wandb", "mlflow"]},
        ),
    )
    cmd = accelerate_cmd("train", str(recipe))
    # rank 0 is SIGKILLed as step 14 begins: checkpoint-10 is the newest complete one
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**env, "QLORA_SFT_FAULT": "kill@14:0"})
    assert killed.returncode != 0
    cmd = accelerate_cmd("train", str(recipe))  # a fresh port
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    expected = losses_by_step(run_dir)  # logs/metrics.jsonl: the relaunch's steps 11-16 win
    assert sorted(expected) == list(range(1, 17))

    # W&B: one offline run per launch, from the main process only, both the same run
    run_id = (run_dir / "logs" / "wandb_run_id").read_text().strip()
    files = sorted((run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    seen: dict[int, float] = {}
    for f in files:
        rid, losses, config = wandb_history(f)
        assert rid == run_id and config
        seen |= losses  # the second launch's steps 11.. replace the first's
    assert seen == pytest.approx(expected)

    # MLflow: the same run before and after the kill, named after the run, every step's loss
    client = MlflowClient(tracking_uri=store)
    mlflow_id = (run_dir / "logs" / "mlflow_run_id").read_text().strip()
    run = client.get_run(mlflow_id)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    history = {m.step: m.value for m in sorted(client.get_metric_history(mlflow_id, "loss"), key=lambda m: m.timestamp)}
    assert history == pytest.approx(expected)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "qlora-sft" and len(client.search_runs([experiment.experiment_id])) == 1
    recipe_artifact = json.loads(
        Path(client.download_artifacts(mlflow_id, "qlora-sft/recipe.json", str(tmp_path))).read_text()
    )
    assert recipe_artifact["recipe"]["run"]["name"] == "tiny" and recipe_artifact["launch"]["world_size"] == 2


def test_report_to_is_checked_with_the_recipe(tiny_model: Path, tmp_path: Path, monkeypatch):
    def problems(report_to):
        with pytest.raises(RecipeError) as exc:
            build_recipe(recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path, train={"report_to": report_to}))
        return exc.value.problems

    (p,) = problems("weights_and_biases")
    assert "`train.report_to` names `weights_and_biases`, not a tracker" in p and "wandb" in p
    (p,) = problems(["all"])
    assert "name the trackers" in p
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else real(name, *a))
    (p,) = problems(["wandb", "comet"])
    assert "the `comet_ml` package is not installed: pip install 'qlora-sft[comet]'" in p
    ok = build_recipe(recipe_dict(tiny_model, tmp_path / "x.jsonl", tmp_path, train={"report_to": ["tensorboard"]}))
    assert ok.train.args["report_to"] == ["tensorboard"]


def test_wandb_without_a_login_stops_before_the_data_and_the_model(
    tiny_model: Path, toy_data: Path, tmp_path: Path, monkeypatch
):
    """Online W&B with no key (a compute node where nobody ran `wandb login`): the run opened after the
    model had loaded and died there ("No API key configured"). Now the launch stops first, naming
    train.report_to and the three ways out; WANDB_MODE=offline passes the check."""
    from qlora_sft import model
    from qlora_sft.errors import UserError
    from qlora_sft.train import train

    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model, "load_model", loaded)
    recipe = build_recipe(
        recipe_dict(tiny_model, toy_data, tmp_path / "runs", train={"max_steps": 2, "report_to": ["wandb"]})
    )
    with pytest.raises(UserError) as exc:
        train(recipe)
    message = str(exc.value)
    assert "train.report_to asks for wandb, which cannot log in here" in message
    assert "wandb login" in message and "WANDB_API_KEY" in message and "WANDB_MODE=offline" in message
    assert not Path(recipe.data_cache_root).exists()  # no data was prepared either
    monkeypatch.setenv("WANDB_MODE", "ofline")  # misspelt: named as such, not as a missing login
    with pytest.raises(UserError) as exc:
        train(recipe)
    assert "WANDB_MODE='ofline' is not a mode W&B knows" in str(exc.value) and "cannot log in" not in str(exc.value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(AssertionError, match="the model was loaded"):  # past the check, up to the model
        train(recipe)


def test_submit_warns_of_wandb_without_a_login_and_the_job_stops_as_it_starts(
    tiny_model: Path, toy_data: Path, tmp_path: Path, monkeypatch, caplog
):
    """`submit` cannot know whether the job's nodes can log in (a shared ~/.netrc), so it warns; the job
    then stops in its preflight, before the data and the model."""
    import time

    from qlora_sft import submit

    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(tiny_model, toy_data, tmp_path / "runs", train={"max_steps": 2, "report_to": "wandb"}),
    )
    with caplog.at_level("WARNING", logger="qlora_sft"):
        job = submit(recipe, [], gpus_per_node=0, tasks_per_node=1, cluster="local", time=10)
    warned = "submit: train.report_to asks for wandb, which cannot log in here"
    assert any(warned in r.getMessage() for r in caplog.records)
    deadline = time.time() + 300
    while not job.done() and time.time() < deadline:
        time.sleep(1)
    with pytest.raises(Exception, match="cannot log in here"):
        job.result()
    assert not (tmp_path / "runs" / ".cache").exists()
