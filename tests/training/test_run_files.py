"""The shared run-directory helpers: the learning-rate schedule and the resume check."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from training.run_files import check_resumable, warmup_cosine


def test_sft_schedule_is_the_shared_one() -> None:
    from training.lm_rl.sft import sft_lr_lambda

    factor = sft_lr_lambda(100)
    assert [factor(s) for s in (0, 9, 100)] == [warmup_cosine(s, 100, 10, 0.1) for s in (0, 9, 100)]
    assert factor(0) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)


def test_warmup_cosine_schedule() -> None:
    # warm-up is capped at a tenth of the run: 10 steps here, not 50
    assert warmup_cosine(0, 100, 50, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 50, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 50, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 50, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 100, 50, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 50, 0.1) == pytest.approx(0.1)  # past max_steps it stays at the floor
    assert warmup_cosine(0, 5, 3, 0.0) == pytest.approx(1.0)  # a run too short for warm-up


@dataclass
class _Config:
    data_dir: str = "demos"
    lr: float = 1e-3
    max_steps: int = 100
    tasks: tuple[str, ...] = ("a", "b")
    num_threads: int = 1
    added_later: int = 7


SAVED = {"data_dir": "demos", "lr": 1e-3, "max_steps": 100, "tasks": ["a", "b"], "num_threads": 2}


def test_resume_allows_listed_changes_and_fields_saved_before_they_existed(tmp_path: Path) -> None:
    # num_threads is resumable; added_later was not saved, so the run had its default
    check_resumable(tmp_path, _Config(), SAVED, ("num_threads",), "fp", "fp")


def test_resume_refuses_other_changes_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot resume with different lr \(was 0.001, now 0.01\)"):
        check_resumable(tmp_path, _Config(lr=1e-2), SAVED, ("num_threads",), "fp", "fp")
    with pytest.raises(ValueError, match="added_later"):
        check_resumable(tmp_path, _Config(added_later=8), SAVED, ("num_threads",), "fp", "fp")
    with pytest.raises(ValueError, match="fingerprint new, was old"):
        check_resumable(tmp_path, _Config(), SAVED, ("num_threads",), "new", "old")


def test_resume_with_new_max_steps_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_resumable(tmp_path, _Config(max_steps=200), SAVED, ("num_threads", "max_steps"), "fp", "fp")
    assert "max_steps changed from 100 to 200" in caplog.text
