"""A tiny smoke run of `helmstack bench lm --suite vlm`: every stage runs, vlm.json has the
schema, a re-run resumes; plus config and CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.lm_rl.vlm.bench import VLMBenchConfig, run_vlm_bench

torch.set_num_threads(1)


def test_vlm_bench_smoke(tmp_path: Path) -> None:
    config = VLMBenchConfig(
        tasks=("shape_count",), seeds=(0, 1), sft_steps=2, sft_batch_size=2, token_budget=24,
        prompts_per_step=2, group_size=2, max_new_tokens=6, eval_problems=2, evals_per_run=1, workers=1,
    )
    out, results = tmp_path / "out", tmp_path / "results"
    summary = run_vlm_bench(config, out, command="helmstack bench lm --suite vlm --out X", results_dir=results)
    saved = json.loads((results / "vlm.json").read_text())
    assert saved["command"] == "helmstack bench lm --suite vlm --out X"
    assert saved["config"]["tasks"] == ["shape_count"]
    for method in ("grpo", "difference_feedback"):
        entry = saved["tasks"]["shape_count"][method]
        assert 0.0 <= entry["acc"] <= 1.0 and len(entry["ci95"]) == 2 and len(entry["seeds"]) == 2
        assert entry["ci95"][0] <= entry["acc"] <= entry["ci95"][1]
        assert entry["generated_tokens"] >= config.token_budget  # each run stops once the budget is spent
        assert 0.0 <= saved["mean"][method] <= 1.0 and len(saved["mean_ci95"][method]) == 2
    assert "repair_rate" in saved["tasks"]["shape_count"]["difference_feedback"]["train_means"]
    assert "delta_vs_grpo" in saved["tasks"]["shape_count"]["difference_feedback"]
    assert len(saved["tasks"]["shape_count"]["start"]["seeds"]) == 2
    assert "eval/accuracy" in saved["sft"]["shape_count"]
    assert (results / "vlm.md").read_text().count("\n") == 2 + 1 + 1
    assert (results / "vlm_accuracy.png").stat().st_size > 0
    assert (out / "starts" / "shape_count" / "preprocessor_config.json").is_file()
    # Re-running finds the start and every run finished and only re-aggregates.
    again = run_vlm_bench(config, out, command="again")
    assert again["tasks"]["shape_count"]["grpo"]["acc"] == summary["tasks"]["shape_count"]["grpo"]["acc"]
    assert again["runs"] == summary["runs"]


def test_vlm_bench_config_errors() -> None:
    with pytest.raises(ValueError, match="tasks has unknown"):
        VLMBenchConfig(tasks=("arithmetic",))
    with pytest.raises(ValueError, match="grpo"):
        VLMBenchConfig(methods=("difference_feedback",))
    with pytest.raises(ValueError, match="token_budget"):
        VLMBenchConfig(token_budget=0)
    with pytest.raises(ValueError, match="seeds"):
        VLMBenchConfig(seeds=())
    with pytest.raises(ValueError, match="hint_fraction"):
        VLMBenchConfig(hint_fraction=1.5)


def test_cli_suite_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import main

    assert main(["bench", "lm", "--suite", "vlm", "--out", str(tmp_path), "--tasks", "nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert main(["bench", "lm", "--suite", "vlm", "--out", str(tmp_path), "--rl-steps", "3"]) == 2
    assert "--rl-steps" in capsys.readouterr().err
    assert main(["bench", "lm", "--suite", "vlm", "--out", str(tmp_path), "--seeds", "a"]) == 2
    # --lr reaches every suite's config, which refuses a rate that is not > 0
    for suite in ("vlm", "cerl", "methods"):
        assert main(["bench", "lm", "--suite", suite, "--out", str(tmp_path), "--lr", "0"]) == 2
        assert "lr must be > 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
