"""Fixtures shared by the LM RL method tests."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from training.lm_rl.methods import RolloutContext
from training.lm_rl.models import build_tiny_model
from training.lm_rl.rollout import SamplingConfig
from training.lm_rl.sft import collate_right_padded, encode_prompt

Examples = Callable[[Any], list[tuple[list[int], list[int]]]]


def _parity(completions: list[str]) -> list[float]:
    # Deterministic and text-dependent: an untrained model gets reward spread from it.
    return [float(len(text) % 2) for text in completions]


@pytest.fixture
def newline_heavy_context() -> Callable[..., RolloutContext]:
    """Factory of contexts over an untrained TinyLM biased towards newlines (many short and
    empty lines, so samples of a group share leading steps), scored by text-length parity."""

    def build(group_size: int, max_new_tokens: int = 12) -> RolloutContext:
        model, tokenizer = build_tiny_model(seed=0)
        newline = tokenizer.convert_tokens_to_ids("\n")
        old = model.lm_head
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        head.weight = old.weight
        with torch.no_grad():
            head.bias.zero_()
            head.bias[newline] = 4.0  # p(newline) ~ 0.35 at random init
        model.lm_head = head
        model.eval()

        def score(texts: list[str], problems: list[object]) -> tuple[torch.Tensor, torch.Tensor]:
            reward = torch.tensor(_parity(texts), dtype=torch.float32)
            return reward, reward.clone()

        return RolloutContext(
            model=model, tokenizer=tokenizer, sampling=SamplingConfig(max_new_tokens=max_new_tokens),
            generator=torch.Generator().manual_seed(0), group_size=group_size, score=score,
            encode_prompt=lambda text: encode_prompt(tokenizer, text),
        )

    return build


@pytest.fixture(scope="session")
def memorise() -> Callable[..., tuple[torch.nn.Module, Any]]:
    """Factory of real TinyLMs (seed 0) trained on a few examples until they reproduce them.

    `examples(tokenizer)` gives the (input ids, labels) pairs; AdamW steps until the loss is
    under 0.01, at most `steps`.
    """

    def fit(examples: Examples, steps: int = 300) -> tuple[torch.nn.Module, Any]:
        model, tokenizer = build_tiny_model(seed=0)
        ids, labels = collate_right_padded(examples(tokenizer), tokenizer.pad_token_id)
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if loss.item() < 0.01:
                break
        model.eval()
        return model, tokenizer

    return fit
