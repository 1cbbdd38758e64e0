"""Tests for the GRPO core (training/lm_rl/core): every expected number is worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from training.lm_rl.core import (
    LossConfig,
    aggregate,
    clipped_surrogate,
    get_preset,
    grpo_advantages,
    importance_ratio,
    kl_k3,
    outcome_advantages,
    outcome_advantages_for,
    policy_loss,
    policy_loss_for,
    preset_names,
    to_token_advantages,
)

torch.set_num_threads(1)

EPS = 1e-4
LN2 = math.log(2.0)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- advantages -------------------------------------------------------------------------


def test_grpo_advantages_two_groups_of_two() -> None:
    # group 7: rewards 1, 0 -> mean 0.5, unbiased std sqrt(0.25 + 0.25) = sqrt(0.5)
    # group 2: rewards 3, 1 -> mean 2, unbiased std sqrt(1 + 1) = sqrt(2)
    rewards = t([1.0, 0.0, 3.0, 1.0])
    group_ids = torch.tensor([7, 7, 2, 2])
    a7 = 0.5 / (math.sqrt(0.5) + EPS)
    a2 = 1.0 / (math.sqrt(2.0) + EPS)
    adv = grpo_advantages(rewards, group_ids)
    torch.testing.assert_close(adv, t([a7, -a7, a2, -a2]))
    # Dr. GRPO: centred only
    torch.testing.assert_close(grpo_advantages(rewards, group_ids, scale="none"), t([0.5, -0.5, 1.0, -1.0]))


def test_grpo_advantages_unequal_groups_and_singleton() -> None:
    # group 0: 1, 0, 0 -> mean 1/3, deviations 2/3, -1/3, -1/3, unbiased var (6/9) / 2 = 1/3
    # group 1: a single sample -> advantage 0, not NaN
    rewards = t([1.0, 0.0, 0.0, 5.0])
    group_ids = torch.tensor([0, 0, 0, 1])
    std = math.sqrt(1.0 / 3.0)
    expected = t([(2 / 3) / (std + EPS), (-1 / 3) / (std + EPS), (-1 / 3) / (std + EPS), 0.0])
    torch.testing.assert_close(grpo_advantages(rewards, group_ids), expected)


def test_leave_one_out_baseline_by_hand() -> None:
    # Group 0: rewards 1, 0, 0 -> baselines 0, 0.5, 0.5 -> A = 1, -0.5, -0.5.
    # Group 1: rewards 2, 4 -> A = 2 - 4, 4 - 2. Group 2: a singleton -> 0.
    rewards = t([1.0, 0.0, 0.0, 2.0, 4.0, 7.0])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2])
    got = grpo_advantages(rewards, group_ids, scale="none", baseline="leave_one_out")
    torch.testing.assert_close(got, t([1.0, -0.5, -0.5, -2.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="baseline"):
        grpo_advantages(rewards, group_ids, baseline="median")


def test_to_token_advantages_zero_on_padding() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    out = to_token_advantages(t([1.0, -1.0, 2.0, 3.0]), mask)
    torch.testing.assert_close(out, t([[1, 1, 0], [-1, 0, 0], [2, 2, 2], [0, 0, 0]]))


@pytest.mark.parametrize("scale", ["std", "none"])
def test_all_equal_rewards_and_singletons_give_no_nan(scale: str) -> None:
    mask = torch.ones(4, 3, dtype=torch.bool)
    for rewards, group_ids in [
        (t([1.0, 1.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])),
        (t([0.3, 0.7, 0.1, 0.9]), torch.tensor([0, 1, 2, 3])),
    ]:
        for mode in ("keep", "drop"):
            out = outcome_advantages(rewards, group_ids, mask, scale=scale, zero_variance=mode)
            assert torch.isfinite(out.advantages).all()
            assert torch.count_nonzero(out.advantages) == 0
            assert out.num_zero_variance_groups == int(torch.unique(group_ids).numel())


def test_zero_variance_keep_vs_drop() -> None:
    # group 0 (rewards 1, 1) has no spread; group 1 (0, 1) does
    rewards = t([1.0, 1.0, 0.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    a = 0.5 / (math.sqrt(0.5) + EPS)

    keep = outcome_advantages(rewards, group_ids, mask, zero_variance="keep")
    torch.testing.assert_close(keep.advantages, t([[0, 0, 0], [0, 0, 0], [-a, -a, 0], [a, a, 0]]))
    assert torch.equal(keep.mask, mask.bool())
    assert (keep.num_zero_variance_groups, keep.num_dropped_groups) == (1, 0)

    drop = outcome_advantages(rewards, group_ids, mask, zero_variance="drop")
    torch.testing.assert_close(drop.advantages, keep.advantages)
    assert torch.equal(drop.mask, torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]]).bool())
    assert (drop.num_zero_variance_groups, drop.num_dropped_groups) == (1, 1)


def test_drop_removes_zero_variance_tokens_from_normaliser() -> None:
    # group 0 (1, 0) has spread: A = +a, -a; group 1 (1, 1) has none. Ratio 1, so L_it = -A_it.
    rewards = t([1.0, 0.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    a = 0.5 / (math.sqrt(0.5) + EPS)
    logp = torch.zeros(4, 3, dtype=torch.float64)
    results = {}
    for mode in ("keep", "drop"):
        out = outcome_advantages(rewards, group_ids, mask, zero_variance=mode)
        results[mode] = policy_loss(logp, logp, out.advantages, out.mask, aggregation="token_mean")
    # token sum: -(3a) + a = -2a; keep counts 3 + 1 + 2 + 2 = 8 tokens, drop counts 3 + 1 = 4
    assert results["keep"][0].item() == pytest.approx(-2 * a / 8)
    assert results["drop"][0].item() == pytest.approx(-2 * a / 4)
    assert (results["keep"][1]["num_tokens"], results["drop"][1]["num_tokens"]) == (8.0, 4.0)


def test_advantage_input_errors() -> None:
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(t([1.0]), torch.tensor([0]), scale="batch")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group_ids"):
        grpo_advantages(t([1.0, 2.0]), t([0.0, 0.0]))
    with pytest.raises(ValueError, match="zero_variance"):
        outcome_advantages(
            t([1.0]), torch.tensor([0]), torch.ones(1, 2), zero_variance="skip"  # type: ignore[arg-type]
        )


# --- ratios, clipping, KL -----------------------------------------------------------------


def test_token_vs_sequence_ratio() -> None:
    # row 0: log-ratios ln 2, 0, 0 (all valid); row 1: ln 4, 0, then padding holding junk
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = t([[LN2, 0.0, 0.0], [2 * LN2, 0.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    torch.testing.assert_close(importance_ratio(logp, old, mask, "token"), t([[2, 1, 1], [4, 1, 1]]))
    # GSPO: exp(mean of valid log-ratios) = 2^(1/3) for row 0, exp(ln 4 / 2) = 2 for row 1
    c = 2 ** (1 / 3)
    torch.testing.assert_close(importance_ratio(logp, old, mask, "sequence"), t([[c, c, c], [2, 2, 2]]))
    # equal log-ratios within a row: both levels agree
    same = t([[0.1, 0.1, 0.1], [0.3, 0.3, 9.0]])
    per_token = importance_ratio(same, old, mask, "token") * mask
    torch.testing.assert_close(per_token, importance_ratio(same, old, mask, "sequence") * mask)


def test_token_vs_sequence_ratio_in_the_loss() -> None:
    # token ratios 2, 1, 1 with A = +1, clip 0.2: losses -1.2, -1, -1 -> token mean -3.2 / 3
    # sequence ratio 2^(1/3) ~ 1.26 > 1.2 for every token: -1.2 each -> -1.2
    logp = t([[LN2, 0.0, 0.0]])
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.ones(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    token, token_stats = policy_loss(logp, old, adv, mask, aggregation="token_mean")
    seq, seq_stats = policy_loss(logp, old, adv, mask, aggregation="token_mean", ratio_level="sequence")
    assert token.item() == pytest.approx(-3.2 / 3)
    assert seq.item() == pytest.approx(-1.2)
    assert token_stats["clip_fraction"] == pytest.approx(1 / 3)
    assert seq_stats["clip_fraction"] == pytest.approx(1.0)
    assert token_stats["ratio_mean"] == pytest.approx(4 / 3)
    assert seq_stats["ratio_mean"] == pytest.approx(2 ** (1 / 3))


def test_clip_higher_changes_only_positive_advantage_clipped_tokens() -> None:
    ratio = t([[1.25, 1.25, 0.7, 0.7]])
    adv = t([[1.0, -1.0, 1.0, -1.0]])
    # symmetric 0.2: min(1.25, 1.2) = 1.2; min(-1.25, -1.2) = -1.25; min(0.7, 0.8) = 0.7; min(-0.7, -0.8) = -0.8
    symmetric = clipped_surrogate(ratio, adv, 0.2, 0.2)
    torch.testing.assert_close(symmetric, t([[-1.2, 1.25, -0.7, 0.8]]))
    # clip-higher 0.28: only the first token (ratio 1.25 < 1.28, A > 0) changes
    higher = clipped_surrogate(ratio, adv, 0.2, 0.28)
    torch.testing.assert_close(higher, t([[-1.25, 1.25, -0.7, 0.8]]))

    logp, old, mask = ratio.log(), torch.zeros_like(ratio), torch.ones_like(ratio, dtype=torch.bool)
    _, stats_sym = policy_loss(logp, old, adv, mask)
    _, stats_high = policy_loss(logp, old, adv, mask, clip_high=0.28)
    assert stats_sym["clip_fraction"] == pytest.approx(2 / 4)  # tokens 0 and 3
    assert stats_high["clip_fraction"] == pytest.approx(1 / 4)  # token 3 only


def test_kl_k3_zero_at_reference_positive_elsewhere() -> None:
    x = t([[-1.0, -0.5, -2.0]])
    torch.testing.assert_close(kl_k3(x, x), torch.zeros_like(x))
    # ref - logp = ln 2: 2 - ln 2 - 1 = 1 - ln 2; ref - logp = -ln 2: 1/2 + ln 2 - 1
    kl = kl_k3(torch.zeros(1, 2, dtype=torch.float64), t([[LN2, -LN2]]))
    torch.testing.assert_close(kl, t([[1 - LN2, LN2 - 0.5]]))
    assert (kl > 0).all()


def test_kl_enters_the_same_aggregation() -> None:
    # ratio 1 and A = 0, so the loss is beta * KL; KL = 1 - ln 2 on token 0, 0 on token 1
    logp = torch.zeros(1, 2, dtype=torch.float64)
    ref = t([[LN2, 0.0]])
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logp, logp, zeros, mask, aggregation="token_mean", beta=0.1, ref_logp=ref)
    assert loss.item() == pytest.approx(0.1 * (1 - LN2) / 2)
    assert stats["kl_mean"] == pytest.approx((1 - LN2) / 2)
    # beta 0 with a reference: KL reported, not added
    loss0, stats0 = policy_loss(logp, logp, zeros, mask, ref_logp=ref)
    assert loss0.item() == 0.0 and stats0["kl_mean"] == pytest.approx((1 - LN2) / 2)


# --- aggregation --------------------------------------------------------------------------


def test_three_aggregations_with_unequal_lengths() -> None:
    # ratio 1, so L_it = -A_it; row lengths 3 and 2; 100 on the padded token must not count
    adv = t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logp = torch.zeros(2, 3, dtype=torch.float64)
    grpo, _ = policy_loss(logp, logp, adv, mask, aggregation="seq_mean_token_mean")
    dr_grpo, _ = policy_loss(logp, logp, adv, mask, aggregation="constant", max_completion_length=4)
    dapo, stats = policy_loss(logp, logp, adv, mask, aggregation="token_mean")
    assert grpo.item() == pytest.approx((-6 / 3 + -9 / 2) / 2)  # -3.25
    assert dr_grpo.item() == pytest.approx(-15 / (2 * 4))  # -1.875
    assert dapo.item() == pytest.approx(-15 / 5)  # -3.0
    assert stats["num_tokens"] == 5.0


def test_empty_rows_are_not_counted_as_sequences() -> None:
    per_token = t([[1.0, 3.0, 7.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, "constant", max_completion_length=4).item() == pytest.approx(4 / 4)
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(2.0)
    assert aggregate(per_token, torch.zeros_like(mask), "token_mean").item() == 0.0


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_gradient_flows_only_through_logp_and_valid_tokens(ratio_level: str) -> None:
    logp = t([[-0.5, -1.0, -float("inf")], [-0.2, -0.3, -0.4]]).requires_grad_()
    old = t([[-0.6, -0.9, -1.0], [-0.2, -0.5, -0.1]]).requires_grad_()
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]).requires_grad_()
    ref = t([[-0.4, -1.1, -float("inf")], [-0.3, -0.3, -0.2]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = policy_loss(logp, old, adv, mask, ratio_level=ratio_level, beta=0.05, ref_logp=ref)
    loss.backward()
    assert torch.isfinite(loss)
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2] == 0.0
    assert logp.grad[0, :2].abs().sum() > 0
    assert old.grad is None and adv.grad is None and ref.grad is None


# --- config and registry ------------------------------------------------------------------


def test_presets() -> None:
    assert preset_names() == ["dapo", "dr_grpo", "grpo", "gspo", "rloo"]
    dapo = get_preset("dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.aggregation, dapo.zero_variance) == (0.2, 0.28, "token_mean", "drop")
    dr = get_preset("dr_grpo", max_completion_length=8)
    assert (dr.scale_rewards, dr.aggregation, dr.max_completion_length) == ("none", "constant", 8)
    assert get_preset("gspo").ratio_level == "sequence"
    assert get_preset("grpo") == LossConfig()
    rloo = get_preset("rloo")
    assert (rloo.baseline, rloo.scale_rewards) == ("leave_one_out", "none")


def test_every_preset_runs_end_to_end() -> None:
    rewards = t([1.0, 0.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    old = torch.full((4, 3), -1.0, dtype=torch.float64)
    for name in preset_names():
        config = get_preset(name, max_completion_length=3)
        out = outcome_advantages_for(config, rewards, group_ids, completion_mask)
        logp = (old + 0.1).requires_grad_()
        loss, stats = policy_loss_for(config, logp, old, out.advantages, out.mask)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
        assert stats["num_tokens"] == (4.0 if config.zero_variance == "drop" else 8.0)


def test_every_config_field_has_help() -> None:
    for name, spec in LossConfig.__dataclass_fields__.items():
        assert spec.metadata.get("help"), name


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"aggregation": "constant"}, "max_completion_length"),
        ({"beta": 0.04}, "beta"),
        ({"ratio_level": "segment"}, "ratio_level"),
        ({"aggregation": "sum"}, "aggregation"),
        ({"clip_low": 1.5}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"advantage_eps": 0.0}, "advantage_eps"),
        ({"zero_variance": "skip"}, "zero_variance"),
        ({"scale_rewards": "batch"}, "scale_rewards"),
        ({"max_completion_length": 0}, "max_completion_length"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        LossConfig(**kwargs)


def test_registry_and_loss_errors() -> None:
    with pytest.raises(ValueError, match="dapo, dr_grpo, grpo, gspo"):
        get_preset("ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        get_preset("dr_grpo")
    with pytest.raises(TypeError, match="epsilon"):
        get_preset("grpo", epsilon=0.1)
    assert LossConfig(beta=0.04, use_reference=True).beta == 0.04

    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, x, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(x, x, x, mask, aggregation="constant")
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(x, x, x, mask, aggregation="constant", max_completion_length=2)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss_for(LossConfig(beta=0.1, use_reference=True), x, x, x, mask)
