"""The plumbing shared by the LM benchmark suites: resumable results, job runner, step means."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from training.lm_rl.bench import LMBenchConfig
from training.lm_rl.bench_runs import (
    budget_train_config,
    clip_to_unit,
    finished,
    publish,
    run_jobs,
    save_result,
    step_means,
)


def _square(job: dict) -> dict:
    return {"x": job["x"], "y": job["x"] ** 2}


def test_result_round_trip_and_no_partial_file(tmp_path: Path) -> None:
    assert finished(tmp_path / "run") is None
    save_result(tmp_path / "run", {"acc": 0.5})
    assert finished(tmp_path / "run") == {"acc": 0.5}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["result.json"]  # no staging file left


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_keeps_job_order(workers: int) -> None:
    jobs = [{"x": x} for x in (3, 1, 2)]
    labels = []
    results = run_jobs(_square, jobs, workers, "test", label=lambda r: labels.append(r["x"]) or "")
    assert [r["y"] for r in results] == [9, 1, 4]
    assert labels == [3, 1, 2]
    assert run_jobs(_square, [], workers, "nothing") == []


def test_step_means_only_training_steps_and_finite_values() -> None:
    records = [
        {"step": 1, "charts/reward": 1.0, "method/flip": 0.2, "charts/accuracy": 0.5},
        {"step": 2, "charts/reward": 0.0, "method/flip": math.nan, "charts/accuracy": 0.7},
        {"step": 2, "eval/accuracy": 0.9, "method/flip": 5.0},  # an eval record, not a step
    ]
    assert step_means(records, lambda k: k.startswith("method/")) == {"flip": 0.2}
    assert step_means(records, lambda k: k == "charts/accuracy") == pytest.approx({"accuracy": 0.6})


def test_budget_train_config_matches_compute() -> None:
    config = LMBenchConfig(token_budget=1000, prompts_per_step=2, group_size=4, max_new_tokens=10,
                           evals_per_run=2, method_options={"ibpo": {"lam": 0.5}})
    job = {"method": "ibpo", "start": "start-dir", "run_dir": "run-dir", "seed": 3}
    train = budget_train_config(config, job, "arithmetic")
    # 80 tokens per GRPO step at most -> 13 steps reach the budget; evaluated twice along the way.
    assert train.max_generated_tokens == 1000 and train.max_steps == 4 * 13 + 8 and train.save_every == 7
    assert train.method_options == {"lam": 0.5} and train.seed == 3 and train.model == "start-dir"


def test_publish_copies_outputs_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    publish(tmp_path, ["a.json"], None)
    publish(tmp_path, ["a.json"], tmp_path / "results")
    assert (tmp_path / "results" / "a.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError):
        publish(tmp_path, ["missing.png"], tmp_path / "results")


def test_accuracy_intervals_are_cut_to_fractions() -> None:
    assert clip_to_unit([-0.092, 0.239]) == [0.0, 0.239]
    assert clip_to_unit([0.8, 1.3]) == [0.8, 1.0]
