"""A tiny smoke run of `helmstack bench lm`: every stage runs and the results file has its keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.lm_rl.bench import LMBenchConfig, run_lm_bench

torch.set_num_threads(1)


def test_bench_lm_smoke(tmp_path: Path) -> None:
    config = LMBenchConfig(
        methods=("grpo", "tgc"), seeds=(0, 1), sft_steps=2, sft_batch_size=2, token_budget=40,
        prompts_per_step=2, group_size=2, max_new_tokens=8, eval_problems=2, evals_per_run=1,
        workers=1, throughput_repeats=1, smollm2=False,
    )
    summary = run_lm_bench(config, tmp_path, command="helmstack bench lm --out X")
    saved = json.loads((tmp_path / "lm_rl.json").read_text())
    assert saved["command"] == "helmstack bench lm --out X"
    for method in ("grpo", "tgc"):
        acc = saved["methods"][method]["test_acc"]
        assert set(acc) >= {"mean", "ci95", "seeds"} and len(acc["seeds"]) == 2
        assert 0.0 <= acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1] <= 1.0 or acc["ci95"][0] < 0
        assert "response_length_drift" in saved["methods"][method]
    assert "tgc_frequent_token_logp_drift" in saved["methods"]["tgc"]
    assert set(saved["throughput"]) >= {"ours_tokens_per_s", "trl_tokens_per_s", "ratio"}
    assert saved["smollm2"] == {"skipped": "disabled"}
    assert (tmp_path / "lm_rl.md").read_text().count("\n") == 2 + 2 + 1
    for plot in summary["plots"]:
        assert Path(plot).stat().st_size > 0
    # Re-running finds every run finished and only re-aggregates.
    again = run_lm_bench(config, tmp_path, command="again")
    assert again["methods"]["grpo"]["test_acc"] == summary["methods"]["grpo"]["test_acc"]


def test_bench_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown"):
        LMBenchConfig(methods=("grpo", "nope"))
    with pytest.raises(ValueError, match="grpo"):
        LMBenchConfig(methods=("tgc",))
    with pytest.raises(ValueError, match="token_budget"):
        LMBenchConfig(token_budget=0)
