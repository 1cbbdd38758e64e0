"""IBPO: hand-computed prefix-tree step terms and advantages, the re-sampled tree
constructor, the gradient-variance evaluation, a trainer run and option errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.lm_rl.core import get_preset
from training.lm_rl.methods import GroupBatch, get_method
# Importing the module registers "ibpo" for get_method and TrainConfig.
from training.lm_rl.methods.ibpo import IBPO, PARENT, RunningVariance, prefix_tree
from training.lm_rl.methods.internalize import step_starts
from training.lm_rl.tasks import make_split
from training.lm_rl.tokenizer import build_tokenizer
from training.lm_rl.trainer import GRPOTrainer, TrainConfig, read_metrics

torch.set_num_threads(1)


def parity_reward(completions: list[str], problems: list[object], **kwargs: object) -> list[float]:
    """Deterministic, text-dependent reward: gives the untrained model reward spread."""
    return [float(len(text) % 2) for text in completions]


def hand_batch(forced_b: int = 0) -> GroupBatch:
    """Group 0: a = 5 6 7 (r=1), b = 5 6 8 (r=0), c = 5 9 (r=1); group 1: d = 5 6, e = 7 (r=0, 0).

    ``forced_b`` tokens of b are flagged as forced (b re-sampled from a's prefix).
    """
    rows = [[5, 6, 7], [5, 6, 8], [5, 9], [5, 6], [7]]
    width = 3
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[t < len(r) for t in range(width)] for r in rows])
    forced = torch.zeros_like(mask)
    forced[1, :forced_b] = True
    return GroupBatch(
        problems=[None] * 5,  # type: ignore[list-item]
        prompt_ids=[torch.tensor([1])] * 5,
        completion_ids=ids,
        completion_mask=mask,
        forced_mask=forced,
        old_logp=torch.zeros(5, width),
        texts=[""] * 5,
        group_ids=torch.tensor([0, 0, 0, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]),
        correct=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]),
        num_generated_tokens=10,
        finish_reason=["eos"] * 5,
        info={PARENT: torch.tensor([-1, 0, -1, -1, -1])},
    )


# Trie of group 0 (V = mean reward of the samples below a node):
#   root {a,b,c} V=2/3 -> "5" {a,b,c} V=2/3 -> "5 6" {a,b} V=1/2 -> "5 6 7" {a} V=1
#                                                                -> "5 6 8" {b} V=0
#                                           -> "5 9" {c} V=1
# D[i, t] = V(child) - V(parent):
#   a: [2/3-2/3, 1/2-2/3, 1-1/2] = [0, -1/6, 1/2]
#   b: [0, -1/6, 0-1/2]          = [0, -1/6, -1/2]
#   c: [0, 1-2/3]                = [0, 1/3]
# Group 1 has no reward spread: every V is 0, so D = 0.
STEP = torch.tensor([
    [0.0, -1 / 6, 1 / 2],
    [0.0, -1 / 6, -1 / 2],
    [0.0, 1 / 3, 0.0],
    [0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0],
])


def test_prefix_tree_step_terms_by_hand() -> None:
    batch = hand_batch()
    tree = prefix_tree(batch.completion_ids, batch.completion_mask, batch.rewards, batch.group_ids)
    assert torch.allclose(tree.step, STEP, atol=1e-6)
    # Telescoping: a sample's step terms add up to r_i - mean_g(r).
    assert torch.allclose(tree.step.sum(1), torch.tensor([1 / 3, -2 / 3, 1 / 3, 0.0, 0.0]), atol=1e-6)
    # At the fork after "5" the samples' terms sum to 0: a and b get -1/6, c gets +1/3.
    assert tree.step[:3, 1].sum().abs() < 1e-6
    # a and b share "5 6", c shares "5"; d and e differ from their first token.
    assert tree.shared_depth.tolist() == [2, 2, 1, 0, 0]
    assert tree.depth.tolist() == [3, 2]
    # Forks: "5" (6, 9) and "5 6" (7, 8) in group 0; the root (5, 7) in group 1.
    assert (tree.branch_nodes, tree.branch_children) == (3, 6)


def test_ibpo_advantages_by_hand() -> None:
    batch = hand_batch()
    # Without std scaling A_i = r_i - mean_g = [1/3, -2/3, 1/3] in group 0, 0 in group 1;
    # A[i, t] = A_i + lam * D[i, t]:
    #   lam = 1:   a [1/3, 1/6, 5/6], b [-2/3, -5/6, -7/6], c [1/3, 2/3, pad]
    dr = get_preset("grpo", scale_rewards="none")
    expected = torch.tensor([
        [1 / 3, 1 / 6, 5 / 6],
        [-2 / 3, -5 / 6, -7 / 6],
        [1 / 3, 2 / 3, 0.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
    ])
    assert torch.allclose(IBPO(lam=1.0).advantages(batch, dr), expected, atol=1e-6)
    #   lam = 0.5: a [1/3, 1/4, 7/12]
    half = IBPO(lam=0.5).advantages(batch, dr)
    assert torch.allclose(half[0], torch.tensor([1 / 3, 1 / 4, 7 / 12]), atol=1e-6)
    # lam = 0 is plain GRPO.
    grpo = get_preset("grpo")
    plain = get_method("grpo").advantages(batch, grpo)
    assert torch.allclose(IBPO(lam=0.0).advantages(batch, grpo), plain)

    # With std scaling both parts are divided by std_g + eps, std_0 = sqrt(1/3) (unbiased).
    scaled = IBPO(lam=1.0).advantages(batch, grpo)
    assert torch.allclose(scaled[:3], expected[:3] / (math.sqrt(1 / 3) + 1e-4), atol=1e-5)
    assert (scaled[3:] == 0).all()


def test_forced_tokens_count_in_the_trie_but_not_in_the_mask() -> None:
    batch = hand_batch(forced_b=2)  # b = a's "5 6" forced, then 8 sampled
    method = IBPO()
    advantages = method.advantages(batch, get_preset("grpo", scale_rewards="none"))
    assert torch.allclose(advantages[1], torch.tensor([-2 / 3, -5 / 6, -7 / 6]), atol=1e-6)
    mask = method.mask(batch, get_preset("grpo"))
    assert mask[1].tolist() == [False, False, True]
    assert mask[0].tolist() == [True, True, True] and mask[2].tolist() == [True, True, False]
    # DAPO's dynamic sampling drops the zero-variance group 1, advantages and mask alike.
    dapo = get_preset("dapo")
    assert not method.mask(batch, dapo)[3:].any()
    assert (method.advantages(batch, dapo)[3:] == 0).all()


def test_step_starts_are_line_starts() -> None:
    tokenizer = build_tokenizer()
    text = "3 + 4 = 7\n7 * 2 = 14\nAnswer: 14"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert step_starts(ids, tokenizer) == [0, 10, 21]
    # A trailing newline opens no empty step; an empty completion has none.
    assert step_starts(tokenizer("ab\n", add_special_tokens=False)["input_ids"], tokenizer) == [0]
    assert step_starts([], tokenizer) == []


def test_resampled_groups_form_a_tree_with_forced_shared_prefixes(newline_heavy_context) -> None:
    ctx = newline_heavy_context(group_size=4)
    problems = make_split("arithmetic", "train", 2, 1, seed=0)
    method = IBPO(resample_fraction=0.5)
    batch = method.build_groups(ctx, problems)

    assert batch.size == 2 * 4
    assert torch.unique(batch.group_ids, return_counts=True)[1].tolist() == [4, 4]
    parents = batch.info[PARENT]
    # Two roots per problem (rows 0-3), then two branches per problem, one per root.
    assert parents.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]
    assert batch.completion_ids.shape[1] <= method.max_completion_length(12)
    mask = method.mask(batch, get_preset("grpo"))
    tree = prefix_tree(batch.completion_ids, batch.completion_mask, batch.rewards, batch.group_ids)
    prefix_lengths = []
    for row in range(4, 8):
        parent = int(parents[row])
        forced = int(batch.forced_mask[row].sum())
        prefix_lengths.append(forced)
        assert batch.forced_mask[row, :forced].all()  # forced tokens are a prefix of the row
        root = batch.completion_ids[parent][batch.completion_mask[parent]].tolist()
        assert batch.completion_ids[row, :forced].tolist() == root[:forced]
        assert forced in step_starts(root, ctx.tokenizer) and forced < len(root)
        assert batch.group_ids[row] == batch.group_ids[parent]
        assert not mask[row, :forced].any() and mask[row, forced:].sum() > 0
        # The trie merges the copied prefix with its root.
        assert tree.shared_depth[row] >= forced and tree.shared_depth[parent] >= forced
    assert max(prefix_lengths) > 0, "with newline-heavy roots some branch must start mid-completion"
    metrics = batch.metrics
    assert metrics["branches"] == 4.0
    assert metrics["branch_prefix_len_mean"] == pytest.approx(sum(prefix_lengths) / 4)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["tree_shared_depth"] > 0

    # No re-sampling: G independent roots and the plain length bound.
    flat = IBPO(resample_fraction=0.0)
    plain = flat.build_groups(ctx, problems)
    assert plain.size == 8 and not plain.forced_mask.any() and (plain.info[PARENT] == -1).all()
    assert flat.max_completion_length(12) == 12


def test_running_variance_matches_torch() -> None:
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    running = RunningVariance()
    for value in values:
        running.update(value)
    assert running.mean_variance() == pytest.approx(float(values.var(dim=0).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        RunningVariance().mean_variance()


def tiny_config(out_dir: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        method="ibpo", task="arithmetic", model="tiny", max_steps=2, prompts_per_step=2, group_size=4,
        max_new_tokens=8, eval_problems=2, save_every=2, progress=False, out_dir=str(out_dir), lr=1e-3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def test_trainer_runs_ibpo_end_to_end_and_evaluates_gradient_variance(tmp_path: Path) -> None:
    trainer = GRPOTrainer(tiny_config(tmp_path))
    trainer.correctness = parity_reward
    result = trainer.train()
    assert result["step"] == 2
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "charts/reward" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for record in train_records:
        for key in ("losses/policy", "losses/grad_norm", "method/step_abs_mean", "method/tree_shared_depth"):
            assert math.isfinite(record[key]), key
    for key in ("eval/ibpo/grad_var", "eval/ibpo/grad_var_grpo", "eval/ibpo/grad_var_ratio"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["eval/ibpo/grad_var_grpo"] > 0  # parity rewards give every batch a spread

    # Deterministic given the generator, and the parameters' .grad are left as they were.
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    first = trainer.method.evaluate(trainer.context(torch.Generator().manual_seed(7)), trainer.test_problems)
    second = trainer.method.evaluate(trainer.context(torch.Generator().manual_seed(7)), trainer.test_problems)
    assert first == second
    for name, p in trainer.model.named_parameters():
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name
    assert IBPO(grad_var_batches=0).evaluate(trainer.context(), trainer.test_problems) == {}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lam": -1.0}, "lam"),
        ({"lam": "big"}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"resample_fraction": 1.0}, "resample_fraction"),
        ({"resample_fraction": True}, "resample_fraction"),
        ({"grad_var_batches": 1}, "grad_var_batches"),
        ({"grad_var_problems": 0}, "grad_var_problems"),
        ({"lamda": 1.0}, "unknown ibpo option"),
    ],
)
def test_bad_options_raise_value_error(tmp_path: Path, options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("ibpo", **options)
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, method_options=options)
