"""IBPO, Implicit Behavior Policy Optimization (arXiv 2605.16302): token credit from the
prefix tree of a group.

What the paper says (abstract and introduction; no official code): sample several
trajectories per input and treat their differences as implicit alternative decisions;
the claimed effect is lower gradient variance and more stable training.

What is ours (reconstruction, docs/papers/lm-rl.md):
- Prefix tree. Per group, a trie over the completion token ids, forced and sampled tokens
  alike (a forced prefix is the same decision path as the root it was copied from). A node
  n is a token prefix, c_n the number of samples whose completion starts with it and V(n)
  the mean reward of those samples, counted as often as they were drawn. V(root) is the
  group mean.
- Step term of token t of sample i: D[i, t] = V(n_{t+1}) - V(n_t), n_t being the prefix of
  i's first t tokens (``prefix_tree``). Where the group does not diverge (one child, no
  sample ending at n_t) the samples below n_t and n_{t+1} are the same and D = 0.
- Centring. V(n) is the count-weighted mean of its children's values, so at every branching
  node the step terms of the samples through it sum to zero (exactly, when no sample ends
  at n): the step term is the chosen child's value centred on the sibling average, one
  baseline per decision context. No group-wide shift is added on top: a constant would put
  a nonzero term on tokens at which no alternative was observed and break the identity
  sum_t D[i, t] = V(leaf_i) - V(root) = r_i - mean_g(r), i.e. the step terms redistribute
  the (unscaled) sequence advantage over the points where the group actually diverged.
- Token advantage: A[i, t] = A_i + lam * D[i, t] / s_g, with A_i the loss preset's outcome
  advantage and s_g the group's reward scale (std_g + eps under std scaling, 1 otherwise),
  so lam is unit-free: with the mean baseline and std scaling sum_t D[i, t] / s_g = A_i.
- Local re-sampling. Independent samples mostly diverge at their first token, where the
  trie only restates the sequence advantage. With ``resample_fraction`` f a group holds
  K = min(G - 1, round(f * G)) branches and R = G - K roots sampled from the prompt; branch
  j continues root j mod R from one of its step boundaries (a line start after its first
  line, drawn uniformly with ``ctx.generator``), the root's tokens before the boundary
  forced. A root with a single line offers no intermediate state: its branch is an
  independent sample. Forced tokens count in the trie and stay out of the loss mask
  (``Method.mask``), so a shared prefix is trained once, on its root, with step terms that
  the branches' outcomes inform. Branch suffixes get the full sampling budget.
- ``evaluate`` estimates gradient variance: on K batches of held-out problems it computes
  the flattened gradient of the GRPO surrogate (preset "grpo", old_logp = the detached
  current logp, so the ratio is 1) with the IBPO advantages and, on the same samples, with
  plain GRPO advantages, and reports the mean over parameters of the across-batch
  variance of each and their ratio.

Shapes: P problems per step, G = ``ctx.group_size``; the batch holds P * R roots (group-major)
then P * K branches (group-major). T is the longest completion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from training.lm_rl.core import (
    LossConfig,
    get_preset,
    group_mean_std,
    outcome_advantages_for,
    policy_loss_for,
)
from training.lm_rl.methods import register_method
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext, concat_batches
from training.lm_rl.methods.internalize import select_rows, step_starts, valid_tokens
from training.lm_rl.rollout import sequence_logprobs
from training.lm_rl.tasks import Problem

PARENT = "parent"  # info key, (B,) long: the root row a branch was re-sampled from; -1 for roots


@dataclass(frozen=True)
class PrefixTree:
    """Step terms and shape statistics of the per-group prefix trees of a batch."""

    step: torch.Tensor  # (B, T) float32: D[i, t], 0 on padding
    shared_depth: torch.Tensor  # (B,) long: leading tokens of i shared with another sample of its group
    depth: torch.Tensor  # (num_groups,) long: the longest completion of each group
    branch_nodes: int  # nodes with >= 2 children, all groups together
    branch_children: int  # children of those nodes, all groups together


def prefix_tree(
    completion_ids: torch.Tensor, completion_mask: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor
) -> PrefixTree:
    """Build one trie per group over the valid completion tokens; see the module docstring.

    completion_ids: (B, T) long; completion_mask: (B, T) bool (valid tokens, a prefix of
    each row); rewards: (B,) float; group_ids: (B,) int. Returns a ``PrefixTree``.
    """
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 2:
        raise ValueError(
            f"completion_ids and completion_mask must both be (B, T), got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    if rewards.shape != (completion_ids.shape[0],) or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must be (B={completion_ids.shape[0]},), got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    batch, width = completion_ids.shape
    step = [[0.0] * width for _ in range(batch)]
    shared_depth = [0] * batch
    depths: list[int] = []
    branch_nodes = branch_children = 0
    tokens = [completion_ids[row][completion_mask[row]].tolist() for row in range(batch)]
    reward = rewards.double().tolist()
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids.tolist()):
        groups.setdefault(group, []).append(row)
    for rows in groups.values():
        children: list[dict[int, int]] = [{}]  # node -> {token: child node}; node 0 is the root
        count = [0]
        total = [0.0]
        paths: dict[int, list[int]] = {}
        for row in rows:
            node = 0
            path = [0]
            count[0] += 1
            total[0] += reward[row]
            for token in tokens[row]:
                child = children[node].get(token)
                if child is None:
                    child = len(count)
                    children[node][token] = child
                    children.append({})
                    count.append(0)
                    total.append(0.0)
                node = child
                count[node] += 1
                total[node] += reward[row]
                path.append(node)
            paths[row] = path
        value = [s / c for s, c in zip(total, count)]
        for row, path in paths.items():
            for t in range(len(path) - 1):
                step[row][t] = value[path[t + 1]] - value[path[t]]
            # Counts only shrink along a path, so the shared nodes are a prefix of it.
            shared_depth[row] = sum(1 for node in path[1:] if count[node] >= 2)
        forks = [len(c) for c in children if len(c) >= 2]
        branch_nodes += len(forks)
        branch_children += sum(forks)
        depths.append(max(len(tokens[row]) for row in rows))
    device = completion_ids.device
    return PrefixTree(
        step=torch.tensor(step, dtype=torch.float32, device=device).reshape(batch, width),
        shared_depth=torch.tensor(shared_depth, dtype=torch.long, device=device),
        depth=torch.tensor(depths, dtype=torch.long, device=device),
        branch_nodes=branch_nodes,
        branch_children=branch_children,
    )


class RunningVariance:
    """Welford's running mean and variance of a stream of equally shaped tensors.

    Keeps two float32 tensors of the stream's shape (for gradients: two copies of the
    parameters), instead of every update.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.count += 1
        if self.mean is None or self.m2 is None:
            self.mean = value.clone()
            self.m2 = torch.zeros_like(value)
            return
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    def mean_variance(self) -> float:
        """Unbiased variance per element, averaged over elements (needs >= 2 updates)."""
        if self.count < 2 or self.m2 is None:
            raise ValueError(f"a variance needs at least 2 samples, got {self.count}")
        return float((self.m2 / (self.count - 1)).mean())


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ibpo option {name} must be an int >= {minimum}, got {value!r}")


@register_method("ibpo")
class IBPO(Method):
    """GRPO with prefix-tree step advantages over each group, optionally re-sampled as a tree.

    lam: weight of the step term (a finite number >= 0; 0 is plain GRPO on the same groups).
    resample_fraction: share of each group re-sampled from the roots' step boundaries,
        in [0, 1) (0: independent samples only).
    grad_var_batches: batches K of the gradient-variance estimate in ``evaluate``
        (0 skips it, else >= 2).
    grad_var_problems: held-out problems per such batch (>= 1).
    """

    name = "ibpo"
    default_loss = "grpo"

    def __init__(
        self,
        lam: float = 1.0,
        resample_fraction: float = 0.5,
        grad_var_batches: int = 4,
        grad_var_problems: int = 2,
        **unknown: Any,
    ) -> None:
        # Options arrive from the CLI as free-form KEY=VALUE pairs: a misspelt key must be a
        # clear ValueError, not a TypeError from the call.
        if unknown:
            raise ValueError(
                f"unknown ibpo option(s) {sorted(unknown)}; valid options: "
                "lam, resample_fraction, grad_var_batches, grad_var_problems"
            )
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"ibpo option lam must be a finite number >= 0, got {lam!r}")
        if (
            isinstance(resample_fraction, bool)
            or not isinstance(resample_fraction, (int, float))
            or not 0 <= resample_fraction < 1
        ):
            raise ValueError(f"ibpo option resample_fraction must be a number in [0, 1), got {resample_fraction!r}")
        _check_count("grad_var_batches", grad_var_batches, 0)
        if grad_var_batches == 1:
            raise ValueError("ibpo option grad_var_batches must be 0 (off) or >= 2 (a variance needs 2 batches), got 1")
        _check_count("grad_var_problems", grad_var_problems, 1)
        self.lam = float(lam)
        self.resample_fraction = float(resample_fraction)
        self.grad_var_batches = grad_var_batches
        self.grad_var_problems = grad_var_problems

    def num_branches(self, group_size: int) -> int:
        """K: re-sampled members of a group of ``group_size``; at least one root remains."""
        return min(group_size - 1, round(self.resample_fraction * group_size))

    def max_completion_length(self, max_new_tokens: int) -> int:
        if self.resample_fraction == 0:
            return max_new_tokens
        # A forced prefix is a proper prefix of a root (at most max_new_tokens - 1 tokens),
        # followed by a full sampling budget.
        return 2 * max_new_tokens - 1

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """R roots per problem, then K branches re-sampled from the roots' step boundaries.

        Returns B = P * G rows (roots first) with info[PARENT] (B,) long and tree metrics.
        """
        branches = self.num_branches(ctx.group_size)
        num_roots = ctx.group_size - branches
        prompts = [ctx.encode_prompt(p.prompt) for p in problems]
        rollout = ctx.sample(prompts, num_roots)
        expanded = [p for p in problems for _ in range(num_roots)]  # group-major
        roots = GroupBatch.from_rollout(rollout, expanded, *ctx.score(rollout.texts, expanded))
        device = roots.group_ids.device
        roots.info[PARENT] = torch.full((roots.size,), -1, dtype=torch.long, device=device)
        batch = roots
        if branches:
            parents: list[int] = []
            prefixes: list[list[int]] = []
            for index in range(len(problems)):
                for branch in range(branches):
                    row = index * num_roots + branch % num_roots
                    tokens = valid_tokens(roots, row)
                    boundaries = step_starts(tokens, ctx.tokenizer)[1:]
                    cut = 0
                    if boundaries:
                        pick = torch.randint(len(boundaries), (1,), generator=ctx.generator, device=ctx.generator.device)
                        cut = boundaries[int(pick)]
                    parents.append(row)
                    prefixes.append(tokens[:cut])
            rollout = ctx.sample(prompts, branches, prefixes=prefixes)
            expanded = [p for p in problems for _ in range(branches)]
            grown = GroupBatch.from_rollout(rollout, expanded, *ctx.score(rollout.texts, expanded))
            grown.info[PARENT] = torch.tensor(parents, dtype=torch.long, device=device)
            # Both rollouts number their groups by problem index, so the ids already agree.
            batch = concat_batches([roots, grown])
        batch.metrics = self._tree_metrics(batch)
        return batch

    def _tree_metrics(self, batch: GroupBatch) -> dict[str, float]:
        tree = prefix_tree(batch.completion_ids, batch.completion_mask, batch.rewards, batch.group_ids)
        sampled = batch.completion_mask & ~batch.forced_mask  # (B, T)
        tokens = sampled.sum().clamp(min=1)
        step = tree.step.abs()[sampled]
        forced = batch.forced_mask.sum(dim=1)  # (B,) forced prefix lengths
        grown = batch.info[PARENT] >= 0  # (B,)
        return {
            "tree_depth": float(tree.depth.float().mean()),
            "tree_shared_depth": float(tree.shared_depth.float().mean()),
            "tree_branch_nodes": tree.branch_nodes / tree.depth.numel(),
            "tree_branching": tree.branch_children / tree.branch_nodes if tree.branch_nodes else 0.0,
            "step_abs_mean": float(step.sum() / tokens),
            "step_nonzero_fraction": float((step > 0).sum() / tokens),
            "branches": float(grown.sum()),
            "branch_prefix_len_mean": float(forced[grown].float().mean()) if grown.any() else 0.0,
        }

    def step_advantages(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """lam-free step term D[i, t] / s_g (B, T), on the loss preset's reward scale."""
        step = prefix_tree(batch.completion_ids, batch.completion_mask, batch.rewards, batch.group_ids).step
        if loss.scale_rewards == "std":
            _, std = group_mean_std(batch.rewards, batch.group_ids)
            step = step / (std + loss.advantage_eps)[:, None]
        return step

    def advantages(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """A[B, T] = A_i + lam * D[i, t] / s_g on valid tokens (rows dropped by the preset: 0)."""
        outcome = outcome_advantages_for(loss, batch.rewards, batch.group_ids, batch.completion_mask)
        step = self.step_advantages(batch, loss)
        return outcome.advantages + self.lam * step * outcome.mask.to(step.dtype)

    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """Gradient variance of the IBPO and plain GRPO advantages on the same samples.

        Batch k (of ``grad_var_batches``) holds the groups of ``grad_var_problems`` held-out
        problems, taken in order and wrapping around; all groups are sampled in one
        ``build_groups`` call (two decoding passes instead of two per batch). Returns
        "ibpo/grad_var", "ibpo/grad_var_grpo" (mean per-parameter variance across batches)
        and "ibpo/grad_var_ratio" (IBPO / GRPO; 1.0 when both are 0, e.g. no group had a
        reward spread); {} when off or without problems. Gradients come from
        ``torch.autograd.grad``, so no parameter's ``.grad`` changes.
        """
        if not problems or self.grad_var_batches == 0:
            return {}
        config = get_preset("grpo", max_completion_length=self.max_completion_length(ctx.sampling.max_new_tokens))
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        per_batch = self.grad_var_problems
        drawn = [problems[j % len(problems)] for j in range(self.grad_var_batches * per_batch)]
        with torch.no_grad():
            everything = self.build_groups(ctx, drawn)  # group id j = drawn[j]
        variances = {"ibpo": RunningVariance(), "grpo": RunningVariance()}
        for k in range(self.grad_var_batches):
            in_batch = (everything.group_ids >= k * per_batch) & (everything.group_ids < (k + 1) * per_batch)
            batch = select_rows(everything, torch.nonzero(in_batch)[:, 0].tolist())
            mask = self.mask(batch, config)
            targets = {
                "ibpo": self.advantages(batch, config),
                "grpo": outcome_advantages_for(config, batch.rewards, batch.group_ids, batch.completion_mask).advantages,
            }
            with torch.enable_grad():
                logp = sequence_logprobs(
                    ctx.model, batch.prompt_ids, batch.completion_ids, batch.completion_mask, pad_id=pad_id
                )  # (B, T)
                for name, advantages in targets.items():
                    loss, _ = policy_loss_for(config, logp, logp.detach(), advantages, mask)
                    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    flat = torch.cat([
                        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
                    ])
                    variances[name].update(flat)
        ibpo, grpo = variances["ibpo"].mean_variance(), variances["grpo"].mean_variance()
        if grpo > 0:
            ratio = ibpo / grpo
        else:
            ratio = 1.0 if ibpo == 0 else math.inf
        return {"ibpo/grad_var": ibpo, "ibpo/grad_var_grpo": grpo, "ibpo/grad_var_ratio": ratio}
