"""`helmstack train lm` on a visual task: 2-step runs of difference_feedback and grpo with
the tiny VLM (warm start, checkpoints with the image processor, resume), and the config
errors that pair a model with a task."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.lm_rl.trainer import GRPOTrainer, TrainConfig, list_checkpoints, read_metrics
from training.lm_rl.vlm.sampling import VLMRolloutContext

torch.set_num_threads(1)


def vlm_config(out_dir: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        method="grpo", task="shape_count", model="tiny-vlm", out_dir=str(out_dir), max_steps=2,
        prompts_per_step=2, group_size=2, max_new_tokens=8, lr=1e-3, save_every=2, eval_problems=2,
        sft_steps=2, seed=1, progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["difference_feedback", "grpo"])
def test_two_step_vlm_run_checkpoints_and_resumes(tmp_path: Path, method: str) -> None:
    trainer = GRPOTrainer(vlm_config(tmp_path, method=method))
    assert isinstance(trainer.context(), VLMRolloutContext)
    result = trainer.train()
    records = read_metrics(tmp_path)
    steps = [r for r in records if "charts/reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["losses/policy"]) and math.isfinite(r["losses/grad_norm"]) for r in steps)
    if method == "difference_feedback":
        assert all("method/repair_rate" in r and "method/key_fraction" in r for r in steps)
        assert "eval/difference_feedback/repair_rate" in result
    checkpoint = list_checkpoints(tmp_path)[-1]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json",
                 "optimizer.pt", "trainer_state.pt"):
        assert (checkpoint / name).is_file(), name
    assert (tmp_path / "curves.png").stat().st_size > 0 and any((tmp_path / "tb").iterdir())
    assert 0.0 <= result["eval/accuracy"] <= 1.0 and result["eval/accuracy/shape_count"] == result["eval/accuracy"]
    resumed = GRPOTrainer(vlm_config(tmp_path, method=method, max_steps=3), resume=True)
    assert resumed.step == 2 and resumed.vision is not None
    assert resumed.train()["step"] == 3


def test_model_and_task_must_match(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="visual task and needs a vision-language model"):
        vlm_config(tmp_path, model="tiny")
    with pytest.raises(ValueError, match="has no images"):
        vlm_config(tmp_path, task="arithmetic")
    with pytest.raises(ValueError, match="sft_steps"):
        vlm_config(tmp_path, model=str(tmp_path))


def test_cli_refuses_a_text_model_on_a_visual_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import main

    argv = ["train", "lm", "--method", "difference_feedback", "--task", "shape_count", "--model", "tiny",
            "--out", str(tmp_path / "run"), "--option", "alpha=2", "--no-progress"]
    assert main(argv) == 2
    assert "needs a vision-language model" in capsys.readouterr().err
    argv[argv.index("tiny")] = "tiny-vlm"
    argv[argv.index("alpha=2")] = "alpha=-2"
    assert main(argv) == 2
    assert "alpha" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
