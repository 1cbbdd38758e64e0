"""GRPOTrainer: smoke runs per preset, resume-after-kill identity, damaged checkpoints, CLI errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.lm_rl.trainer import (
    CheckpointError,
    GRPOTrainer,
    TrainConfig,
    list_checkpoints,
    read_metrics,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[3]


def tiny_config(out_dir: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        method="grpo", task="arithmetic", model="tiny", out_dir=str(out_dir), max_steps=2,
        prompts_per_step=2, group_size=2, max_new_tokens=8, lr=1e-3, save_every=2,
        eval_problems=2, seed=3, progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def parity_reward(completions: list[str], problems: list[object], **kwargs: object) -> list[float]:
    """Deterministic, text-dependent reward: gives the untrained model reward spread (and gradients)."""
    return [float(len(text) % 2) for text in completions]


def with_spread(trainer: GRPOTrainer) -> GRPOTrainer:
    trainer.correctness = parity_reward
    return trainer


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_two_step_smoke_run_writes_metrics_checkpoint_and_plot(tmp_path: Path, method: str) -> None:
    result = GRPOTrainer(tiny_config(tmp_path, method=method)).train()
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "charts/reward" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for key in ("charts/tokens_per_s", "charts/accuracy", "losses/policy", "losses/clip_fraction"):
        assert all(math.isfinite(r[key]) for r in train_records), key
    assert any("eval/accuracy" in r for r in records)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    checkpoint = list_checkpoints(tmp_path)[0]
    assert (checkpoint / "model.safetensors").is_file()
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["method"] == method
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert any((tmp_path / "tb").iterdir())
    assert result["step"] == 2 and 0.0 <= result["eval/accuracy"] <= 1.0


def test_zero_variance_groups_give_finite_loss(tmp_path: Path) -> None:
    # The untrained tiny model never answers correctly: every group is all zeros.
    for method in ("grpo", "dapo"):
        trainer = GRPOTrainer(tiny_config(tmp_path / method, method=method, eval_problems=0))
        metrics = trainer.train_step()
        assert metrics["charts/reward"] == 0.0
        assert metrics["charts/zero_variance_groups"] == 2.0
        assert math.isfinite(metrics["losses/policy"]) and math.isfinite(metrics["losses/grad_norm"])
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_kl_reference_is_saved_and_reused_on_resume(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, max_steps=2, save_every=1, eval_problems=0, beta=0.1)
    trainer = with_spread(GRPOTrainer(config))
    trainer.train_step()
    metrics = trainer.train_step()
    assert math.isfinite(metrics["losses/kl"]) and metrics["losses/kl"] >= 0.0
    trainer.save_checkpoint()
    resumed = GRPOTrainer(config, resume=True)
    assert resumed.reference is not None
    for a, b in zip(trainer.reference.parameters(), resumed.reference.parameters()):
        assert torch.equal(a, b)


def _params(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_resume_after_kill_matches_straight_run(tmp_path: Path) -> None:
    steps = 4
    straight = with_spread(GRPOTrainer(tiny_config(tmp_path / "straight", max_steps=steps, save_every=2, eval_problems=0)))
    initial = _params(straight)
    straight.train()
    expected = _params(straight)
    assert any(not torch.equal(initial[k], expected[k]) for k in initial), "training must move the weights"

    out = tmp_path / "killed"
    first = with_spread(GRPOTrainer(tiny_config(out, max_steps=steps, save_every=2, eval_problems=0)))
    # Step 3 runs and is logged but never checkpointed: the "kill" comes before step 4.
    for _ in range(3):
        record = first.train_step()
        if first.step == 2:
            first.save_checkpoint()
    del first, record
    resumed = with_spread(GRPOTrainer(tiny_config(out, max_steps=steps, save_every=2, eval_problems=0), resume=True))
    assert resumed.step == 2
    resumed.train()
    got = _params(resumed)
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    assert [r["step"] for r in read_metrics(out) if "charts/reward" in r] == [3, 4]


def test_token_budget_stops_training_and_survives_resume(tmp_path: Path) -> None:
    # Each step samples at most prompts x group x max_new_tokens = 2 x 2 x 8 = 32 tokens, so
    # a budget of 40 needs at least two steps and stops long before max_steps.
    config = tiny_config(tmp_path, max_steps=50, max_generated_tokens=40, save_every=1, eval_problems=0)
    summary = with_spread(GRPOTrainer(config)).train()
    assert summary["generated_tokens"] >= 40
    assert 2 <= summary["step"] < 50
    records = [r for r in read_metrics(tmp_path) if "charts/reward" in r]
    assert records[-2]["charts/generated_tokens_total"] < 40 <= records[-1]["charts/generated_tokens_total"]
    resumed = GRPOTrainer(config, resume=True)
    assert (resumed.step, resumed.generated_tokens) == (summary["step"], summary["generated_tokens"])
    assert resumed.budget_spent()


def test_damaged_checkpoint_is_refused_and_previous_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tiny_config(tmp_path, max_steps=2, save_every=1, eval_problems=0)
    trainer = with_spread(GRPOTrainer(config))
    trainer.train_step()
    trainer.save_checkpoint()
    after_one = _params(trainer)
    trainer.train_step()
    latest = trainer.save_checkpoint()
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated write

    with caplog.at_level("WARNING"):
        resumed = GRPOTrainer(config, resume=True)
    assert resumed.step == 1
    assert "step-00000002 is damaged or incomplete" in caplog.text
    assert all(torch.equal(after_one[k], v) for k, v in _params(resumed).items())
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()

    # A missing file in every checkpoint leaves nothing to resume from: a clear error.
    for checkpoint in list_checkpoints(tmp_path):
        (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        GRPOTrainer(config, resume=True)


def test_fresh_run_refuses_existing_checkpoints(tmp_path: Path) -> None:
    GRPOTrainer(tiny_config(tmp_path, max_steps=1, save_every=1, eval_problems=0)).train()
    with pytest.raises(CheckpointError, match="--resume"):
        GRPOTrainer(tiny_config(tmp_path, max_steps=1, eval_problems=0))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"method": "ppo"}, "method"), ({"group_size": 1}, "group_size"), ({"top_p": 0.0}, "top_p"),
     ({"sft_steps": 5, "model": "/nonexistent"}, "sft_steps")],
)
def test_config_validation_names_field(tmp_path: Path, overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        tiny_config(tmp_path, **overrides)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "train", "lm", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_cli_unknown_method_exits_2_listing_valid_ones(tmp_path: Path) -> None:
    result = _cli("--method", "ppo", "--task", "arithmetic", "--model", "tiny", "--out", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ppo" in lines[0]
    for name in ("grpo", "dr_grpo", "dapo", "gspo"):
        assert name in lines[0]


def test_cli_bad_model_path_exits_2(tmp_path: Path) -> None:
    result = _cli("--method", "grpo", "--task", "arithmetic", "--model", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr


def test_cli_trains_one_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _cli("--method", "dapo", "--task", "arithmetic", "--model", "tiny", "--out", str(out),
                  "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
                  "--eval-problems", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 1
    assert list_checkpoints(out)


def test_train_accuracy_counts_only_the_policys_own_samples(tmp_path: Path) -> None:
    from training.lm_rl.methods.base import Method, concat_batches

    class AddsACorrectRow(Method):
        """Appends a copy of the first sample marked correct and non-primary (like a repaired row)."""

        def build_groups(self, ctx, problems):
            batch = super().build_groups(ctx, problems)
            from training.lm_rl.methods.internalize import select_rows

            extra = select_rows(batch, [0])
            extra.correct = torch.ones_like(extra.correct)
            extra.rewards = torch.ones_like(extra.rewards)
            extra.primary = torch.zeros_like(extra.primary)
            return concat_batches([batch, extra])

    trainer = GRPOTrainer(tiny_config(tmp_path, eval_problems=0))
    trainer.method = AddsACorrectRow()
    metrics = trainer.train_step()
    # The untrained model answers nothing correctly; the added correct row must not count.
    assert metrics["charts/accuracy"] == 0.0
    assert metrics["charts/samples"] == 5.0


def test_failing_reward_gives_zero_counts_and_training_continues(tmp_path: Path) -> None:
    from training.lm_rl.rewards import safe_reward

    calls = {"n": 0}

    def flaky(completions: list[str], problems: list[object], **kwargs: object) -> list[float]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("verifier crashed")
        return [float("nan")] + [float(len(t) % 2) for t in completions[1:]]

    trainer = GRPOTrainer(tiny_config(tmp_path, eval_problems=0))
    trainer.correctness = safe_reward(flaky)
    first = trainer.train_step()
    assert first["charts/reward"] == 0.0 and first["charts/reward_failed_samples"] == 4.0
    second = trainer.train_step()
    assert second["charts/reward_failed_samples"] == 5.0  # one NaN sample more
    assert math.isfinite(second["losses/policy"])
