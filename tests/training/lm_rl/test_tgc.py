"""TGC (training/lm_rl/methods/tgc.py) and the shared diagnostics (training/lm_rl/diagnostics.py).

The key test works the gradient of a token shared by two responses out by hand: with
A = +a and -a it cancels exactly under TGC's loss config and advantages, and does not under
plain GRPO's per-response 1/|o_i| normaliser when |o_1| != |o_2|.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training.lm_rl.core import get_preset, outcome_advantages_for, policy_loss_for
from training.lm_rl.diagnostics import (
    FrequentTokenProbe,
    frequent_token_ids,
    sampled_entropy_estimate,
    token_logp_and_entropy,
)
from training.lm_rl.methods import GroupBatch, get_method
# Importing the module registers "tgc" for get_method and TrainConfig.
from training.lm_rl.methods.tgc import zero_sum_advantages
from training.lm_rl.models import load_policy_model
from training.lm_rl.rollout import SamplingConfig
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tasks import make_split
from training.lm_rl.trainer import GRPOTrainer, TrainConfig, read_metrics

torch.set_num_threads(1)
EPS = 1e-4


def group_batch(rewards: list[float], group_ids: list[int], completion_mask: torch.Tensor) -> GroupBatch:
    """A batch holding only what advantage and mask functions read."""
    size, width = completion_mask.shape
    return GroupBatch(
        problems=[], prompt_ids=[], completion_ids=torch.zeros(size, width, dtype=torch.long),
        completion_mask=completion_mask.bool(), forced_mask=torch.zeros(size, width, dtype=torch.bool),
        old_logp=torch.zeros(size, width), texts=[""] * size, group_ids=torch.tensor(group_ids),
        rewards=torch.tensor(rewards, dtype=torch.float64), correct=torch.zeros(size),
        num_generated_tokens=0, finish_reason=["eos"] * size,
    )


def shared_token_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two responses whose first token (id 0) follows the same context, so both read its
    log-prob from one logit vector z0; response 1 has |o_1| = 1 token, response 2 has
    |o_2| = 3 (its later tokens 1 and 2 follow their own contexts, logits z21 and z22).

    Returns (z0 (3,), z21 (3,), logp (2, 3), mask (2, 3)); logits are 0, so every softmax is
    uniform (1/3) and d log p(k) / dz = onehot(k) - 1/3.
    """
    z0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    z21 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    z22 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    shared = torch.log_softmax(z0, -1)[0]
    zero = torch.zeros((), dtype=torch.float64)
    logp = torch.stack([
        torch.stack([shared, zero, zero]),
        torch.stack([shared, torch.log_softmax(z21, -1)[1], torch.log_softmax(z22, -1)[2]]),
    ])  # (2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    return z0, z21, logp, mask


@pytest.mark.parametrize("ratio", ["sequence", "token"])
def test_shared_token_gradient_cancels_under_tgc_not_under_grpo(ratio: str) -> None:
    # Rewards 1, 0 in one group: GRPO's A = +-0.5 / (std + eps), std = sqrt(0.5).
    a = 0.5 / (math.sqrt(0.5) + EPS)
    uniform_grad = torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64)  # onehot(0) - 1/3

    tgc = get_method("tgc", ratio=ratio)
    tgc_loss = get_preset("grpo", **tgc.loss_overrides(), max_completion_length=3)
    z0, z21, logp, mask = shared_token_setup()
    batch = group_batch([1.0, 0.0], [0, 0], mask)
    advantages = tgc.advantages(batch, tgc_loss)  # (2, 3)
    torch.testing.assert_close(advantages, torch.tensor([[a, 0, 0], [-a, -a, -a]], dtype=torch.float64))
    loss, _ = policy_loss_for(tgc_loss, logp, logp.detach(), advantages, tgc.mask(batch, tgc_loss))
    grad_z0, grad_z21 = torch.autograd.grad(loss, (z0, z21))
    # Constant normaliser c = 1 / (B * L) = 1/6 for both responses and A_1 + A_2 = 0:
    # d loss / d z0 = -(c a - c a) (onehot(0) - 1/3) = 0, exactly.
    assert torch.equal(grad_z0, torch.zeros(3, dtype=torch.float64))
    # The response-2-only token still learns: -(1/6)(-a)(onehot(1) - 1/3).
    torch.testing.assert_close(grad_z21, (a / 6) * torch.tensor([-1 / 3, 2 / 3, -1 / 3], dtype=torch.float64))

    # Plain GRPO: per-response 1/|o_i| breaks the cancellation.
    grpo = get_method("grpo")
    grpo_loss = get_preset("grpo")
    z0, _, logp, mask = shared_token_setup()
    batch = group_batch([1.0, 0.0], [0, 0], mask)
    loss, _ = policy_loss_for(grpo_loss, logp, logp.detach(), grpo.advantages(batch, grpo_loss), grpo.mask(batch, grpo_loss))
    (grad_z0,) = torch.autograd.grad(loss, z0)
    # loss = -(1/2) (a / 1 * log p_1 - a / 3 * sum log p_2) -> d/dz0 = -(1/2)(a - a/3)(onehot(0) - 1/3).
    expected = -(a / 3) * uniform_grad
    torch.testing.assert_close(grad_z0, expected)
    assert float(grad_z0.abs().max()) > 0.1


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "rloo", "dapo"])
def test_advantages_sum_to_zero_in_every_group(preset: str) -> None:
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(23, generator=generator)  # float32
    group_ids = torch.tensor([0] * 3 + [1] * 7 + [2] * 5 + [3] * 2 + [4] * 6)
    config = get_preset(preset, max_completion_length=4)
    got = zero_sum_advantages(rewards, group_ids, config)
    assert got.dtype == rewards.dtype
    for group in torch.unique(group_ids):
        assert abs(float(got[group_ids == group].double().sum())) < 1e-6
    # The same values as the core's outcome advantages (which are zero-sum up to rounding).
    core = outcome_advantages_for(config, rewards, group_ids, torch.ones(23, 1, dtype=torch.bool)).advantages[:, 0]
    torch.testing.assert_close(got, core)
    # Zero-variance and singleton groups stay exactly 0.
    flat = zero_sum_advantages(torch.tensor([1.0, 1.0, 0.3]), torch.tensor([0, 0, 1]), config)
    assert torch.equal(flat, torch.zeros(3))


def test_loss_overrides_restore_exchangeability() -> None:
    for ratio in ("sequence", "token"):
        overrides = get_method("tgc", ratio=ratio, clip=0.1).loss_overrides()
        assert overrides == {"aggregation": "constant", "ratio_level": ratio, "clip_low": 0.1, "clip_high": 0.1}
        # They compose with every preset, including DAPO's clip-higher and GSPO's tiny ranges.
        for preset in ("grpo", "dapo", "gspo", "rloo"):
            config = get_preset(preset, **overrides, max_completion_length=8)
            assert config.aggregation == "constant" and config.clip_low == config.clip_high


@pytest.mark.parametrize(
    ("options", "name"),
    [({"ratio": "group"}, "ratio"), ({"clip": 1.0}, "clip"), ({"clip": "0.2"}, "clip"),
     ({"probe_prompts": 0}, "probe_prompts"), ({"probe_top_k": 2.5}, "probe_top_k"), ({"probe_seed": -1}, "probe_seed")],
)
def test_bad_options_raise_value_error_naming_the_option(options: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=f"tgc option {name}"):
        get_method("tgc", **options)


# --- diagnostics ----------------------------------------------------------------------------


def test_frequent_token_ids_and_sampled_entropy_by_hand() -> None:
    tokens = torch.tensor([[5, 5, 3, 0], [3, 7, 5, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # Counts: 5 -> 3, 3 -> 2, 7 -> 1, 9 -> 1 (the masked 0 does not count); 7 < 9 breaks the tie.
    assert frequent_token_ids(tokens, mask, top_k=3).tolist() == [5, 3, 7]
    assert frequent_token_ids(tokens, mask, top_k=10).tolist() == [5, 3, 7, 9]
    with pytest.raises(ValueError, match="top_k"):
        frequent_token_ids(tokens, mask, top_k=0)
    # -(-1 - 2 - 3) / 3 over the three sampled tokens.
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -50.0]])
    assert sampled_entropy_estimate(logp, torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)) == 2.0


class UniformLM(torch.nn.Module):
    """Logits 0 everywhere: every next-token distribution is uniform over V tokens."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def test_token_logp_and_entropy_of_a_uniform_policy() -> None:
    vocab = 5
    prompts = [torch.tensor([1, 2]), torch.tensor([3])]
    completion_ids = torch.tensor([[4, 0, 0], [2, 3, 1]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    logp, entropy = token_logp_and_entropy(UniformLM(vocab), prompts, completion_ids, mask, pad_id=0, batch_size=1)
    log_v = math.log(vocab)
    torch.testing.assert_close(logp, -log_v * mask.float())
    torch.testing.assert_close(entropy, log_v * mask.float())


def test_probe_drift_is_zero_for_the_initial_policy_and_moves_with_it() -> None:
    model, tokenizer = load_policy_model("tiny", seed=0)
    model.eval()
    prompts = [encode_prompt(tokenizer, p.prompt) for p in make_split("arithmetic", "test", 4, 1)]
    probe = FrequentTokenProbe.build(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=12), top_k=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert probe.frequent_tokens.numel() == 3
    assert bool((probe.frequent_mask <= probe.completion_mask).all()) and bool(probe.frequent_mask.any())
    now, drift = probe.drift(model, tokenizer.pad_token_id)
    assert drift.frequent_token_logp == 0.0 and drift.entropy == 0.0
    assert 0 < now.entropy <= math.log(model.config.vocab_size) + 1e-5
    # Add +3 to the frequent tokens' logits: their log-prob must go up; mass concentrated on
    # 3 of ~100 tokens lowers the entropy.
    bias = torch.zeros(model.config.vocab_size)
    bias[probe.frequent_tokens] = 3.0
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, output: output + bias)
    try:
        _, drift = probe.drift(model, tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert drift.frequent_token_logp > 0 and drift.entropy < 0
    restored = FrequentTokenProbe.from_state_dict(probe.state_dict())
    assert restored.initial == probe.initial and torch.equal(restored.frequent_mask, probe.frequent_mask)


# --- end to end and resume ------------------------------------------------------------------


def parity_rewards(self: GRPOTrainer, texts: list[str], problems: list[object]) -> tuple[torch.Tensor, torch.Tensor]:
    reward = torch.tensor([float(len(text) % 2) for text in texts])
    return reward, torch.zeros_like(reward)


def tgc_config(out_dir: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        method="tgc", task="arithmetic", model="tiny", max_steps=2, prompts_per_step=2, group_size=2,
        max_new_tokens=8, eval_problems=2, save_every=2, progress=False, out_dir=str(out_dir), lr=1e-3,
        method_options={"probe_prompts": 4},
    )
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", ["sequence", "token"])
def test_trainer_runs_tgc(tmp_path: Path, ratio: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GRPOTrainer, "_rewards", parity_rewards)
    trainer = GRPOTrainer(tgc_config(tmp_path, method_options={"ratio": ratio, "probe_prompts": 4}))
    assert trainer.loss_config.aggregation == "constant" and trainer.loss_config.ratio_level == ratio
    assert trainer.loss_config.clip_low == trainer.loss_config.clip_high
    result = trainer.train()
    train_records = [r for r in read_metrics(tmp_path) if "charts/reward" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for record in train_records:
        for key in ("losses/policy", "losses/grad_norm", "method/sampled_token_entropy"):
            assert math.isfinite(record[key]), key
    for key in ("eval/tgc/frequent_token_logp_drift", "eval/tgc/entropy"):
        assert math.isfinite(result[key]), key
    # Two AdamW steps at lr 1e-3 moved the policy, so the probe reads a drift.
    assert result["eval/tgc/frequent_token_logp_drift"] != 0.0


def test_resume_restores_probe_and_initial_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GRPOTrainer, "_rewards", parity_rewards)
    config = tgc_config(tmp_path, save_every=1)
    first = GRPOTrainer(config)
    first.train_step()
    first.save_checkpoint()
    probe = first.method.probe
    assert probe is not None
    before = first.evaluate()

    resumed = GRPOTrainer(config, resume=True)
    restored = resumed.method.probe
    assert restored is not None and restored is not probe
    assert restored.initial == probe.initial
    for name in ("completion_ids", "completion_mask", "frequent_mask", "frequent_tokens"):
        assert torch.equal(getattr(restored, name), getattr(probe, name)), name
    assert all(torch.equal(a, b) for a, b in zip(restored.prompt_ids, probe.prompt_ids))
    after = resumed.evaluate()
    assert after["eval/tgc/frequent_token_logp_drift"] == before["eval/tgc/frequent_token_logp_drift"]
    assert after["eval/tgc/entropy"] == before["eval/tgc/entropy"]

    with pytest.raises(ValueError, match="tgc state"):
        resumed.method.load_state_dict({"probe": restored.state_dict(), "extra": 1})
