"""A tiny smoke run of `helmstack bench lm --suite cerl`: every stage runs, the results file has
the documented schema, a re-run resumes, bad settings are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime.cli import build_parser
from training.lm_rl.bench_cerl import METHODS, CerlBenchConfig, run_cerl_bench

torch.set_num_threads(1)


def test_cerl_suite_smoke(tmp_path: Path) -> None:
    config = CerlBenchConfig(
        domains=("math", "tool_use"), seeds=(0,), sft_steps=2, sft_batch_size=2, long_sft_steps=1, rl_steps=1,
        prompts_per_step=1, group_size=2, eval_problems=2, workers=1,
    )
    summary = run_cerl_bench(config, tmp_path / "out", command="helmstack bench lm --suite cerl --out X",
                             results_dir=tmp_path / "results")
    saved = json.loads((tmp_path / "out" / "cerl.json").read_text())
    assert saved["command"] == "helmstack bench lm --suite cerl --out X"
    assert saved["config"]["seeds"] == [0] and set(saved["config"]["max_new_tokens"]) == {"math", "tool_use"}
    assert set(saved["domains"]) == {"math", "tool_use"}
    for domain in saved["domains"].values():
        assert set(domain) == set(METHODS)
        for row in domain.values():
            for key in ("acc_keep", "acc_erased", "flip_rate"):
                assert 0.0 <= row[key] <= 1.0
            lo, hi = row["ci95_acc_erased"]
            assert 0.0 <= lo <= row["acc_erased"] <= hi <= 1.0
            assert row["seeds"] == [0] and row["eval_problems_per_seed"] == 2
    assert saved["domains"]["math"]["cerl"]["generated_tokens"] > 0
    assert saved["domains"]["math"]["sft"]["generated_tokens"] == 0
    table = (tmp_path / "out" / "cerl.md").read_text()
    assert table.count("\n") == 2 + 2 * len(METHODS)
    for name in ("cerl.json", "cerl.md", "cerl.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    # Every job finished: a re-run only re-aggregates (same numbers, no training).
    again = run_cerl_bench(config, tmp_path / "out", command="again")
    assert again["domains"] == summary["domains"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"domains": ("math", "poetry")}, "poetry"), ({"seeds": ()}, "seeds"), ({"rl_steps": 0}, "rl_steps"),
     ({"group_size": 1}, "group_size"), ({"cerl_variant": "keep"}, "cerl_variant"),
     ({"start_long_fraction": 1.5}, "start_long_fraction"), ({"difficulty": {"math": 0}}, "difficulty"),
     ({"lr": 0.0}, "lr")],
)
def test_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CerlBenchConfig(**overrides)


def test_cli_suite_option_keeps_methods_as_default() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "lm", "--out", "x"]).suite == "methods"
    args = parser.parse_args(["bench", "lm", "--suite", "cerl", "--out", "x", "--domains", "math", "--rl-steps", "3"])
    assert (args.suite, args.domains, args.rl_steps) == ("cerl", "math", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "lm", "--suite", "nope", "--out", "x"])


def test_cli_refuses_flags_of_other_suites(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import main

    for suite, flags in (("methods", ["--domains", "math"]), ("methods", ["--rl-steps", "3"]),
                         ("cerl", ["--token-budget", "10"]), ("cerl", ["--methods", "grpo"]),
                         ("vlm", ["--difficulty", "math=1"]), ("vlm", ["--no-smollm2"])):
        assert main(["bench", "lm", "--suite", suite, "--out", str(tmp_path / "out"), *flags]) == 2
        assert f"{flags[0]} do(es) not apply to --suite {suite}" in capsys.readouterr().err
    # A zero is a given value, refused by the suite's config (not dropped as if unset).
    assert main(["bench", "lm", "--suite", "cerl", "--out", str(tmp_path / "out"), "--rl-steps", "0"]) == 2
    assert "rl_steps must be a positive int" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_difficulty_per_domain() -> None:
    from runtime.cli import _domain_levels

    assert _domain_levels("science_qa=1, math=3") == {"science_qa": 1, "math": 3}
    for bad in ("science_qa", "math=two", "math=-1"):
        with pytest.raises(ValueError, match="DOMAIN=LEVEL"):
            _domain_levels(bad)
    with pytest.raises(ValueError, match="difficulty"):  # a level the config refuses
        CerlBenchConfig(difficulty=_domain_levels("math=0"))
