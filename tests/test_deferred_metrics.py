"""trl's per-micro-batch metrics (entropy, token accuracy, tokens seen) wait on the device until a
log reads them (`train.sft_trainer_class`): the logged values, losses and evaluation are the same as
with trl's own `compute_loss`, which reads each back per micro batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import metrics, recipe_dict, write_recipe, write_toy_data

KEYS = ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm", "eval_loss", "eval_entropy")


def logged(tmp_path: Path, tiny_model: Path, name: str, packing: bool) -> list[dict]:
    from qlora_sft.recipe import load_recipe
    from qlora_sft.train import train

    data = write_toy_data(tmp_path / "toy.jsonl", n=48)
    raw = recipe_dict(
        tiny_model,
        data,
        tmp_path / "runs",
        run={"name": name},
        data={"packing": packing},
        train={"max_steps": 4, "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-2},
    )
    result = train(load_recipe(write_recipe(tmp_path / f"{name}.yaml", raw)))
    assert result.global_step == 4
    return [{k: r[k] for k in KEYS if k in r} | {"step": r["step"]} for r in metrics(result.run_dir)]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_deferred_metrics_log_what_trl_logs(tiny_model: Path, tmp_path: Path, monkeypatch, packing: bool):
    from qlora_sft.train import sft_trainer_class

    cls = sft_trainer_class()
    decide = cls._defers_metrics
    taken: list[bool] = []

    def spy(self, return_outputs: bool) -> bool:
        taken.append(decide(self, return_outputs))
        return taken[-1]

    monkeypatch.setattr(cls, "_defers_metrics", spy)
    deferred = logged(tmp_path, tiny_model, "deferred", packing)
    assert taken.count(True) == 4 * 2  # every training micro batch (4 steps of 2), none of the evaluation's
    assert taken.count(False) > 0
    monkeypatch.setattr(cls, "_defers_metrics", lambda self, return_outputs: False)
    own = logged(tmp_path, tiny_model, "trl", packing)
    train_rows = [r for r in deferred if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(isinstance(r["entropy"], float) and r["num_tokens"] > 0 for r in train_rows), train_rows
    assert any("eval_loss" in r for r in deferred)
    assert len(deferred) == len(own)
    for a, b in zip(deferred, own, strict=True):
        assert a.keys() == b.keys(), (a, b)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, a, b)
