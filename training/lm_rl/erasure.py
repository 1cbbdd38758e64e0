"""The Erasure Dependence Protocol: how much a model's later answers depend on its hidden thoughts.

Protocol (CERL, arXiv 2606.05201; details ours, see docs/cerl.md). For each held-out problem of
a committed-format domain (training.lm_rl.committed):
1. Greedy completion of the prompt (multi-turn with the tool environment for tool tasks).
2. If it is well formed (thoughts, committed state, answer), two contexts are built from the
   same sampled tokens: keep = prompt + H + A + follow-up, erase = prompt + A + follow-up
   (``build_contexts``), and each is continued greedily; the follow-up answer is verified
   exactly (``CommittedTask.verify_followup``). A malformed completion has no committed state
   to probe and counts as wrong on both paths.
3. Per domain: ``acc_keep`` and ``acc_erased`` (follow-up accuracy with thoughts kept / erased),
   ``flip_rate`` = P(erased wrong | kept correct) — the share of answers that relied on the
   thoughts — and the reverse ``reverse_flip_rate`` = P(erased correct | kept wrong), each with a
   95% Wilson interval (``runtime.stats.wilson_interval``) and its counts, so a rate over an
   empty denominator (reported 0.0) can be told apart from a measured 0. Also ``acc_answer``
   (the main answer's accuracy) and ``malformed_rate``.

``helmstack eval erasure --model DIR --out DIR`` runs it on a TinyLM or any Hugging Face
causal-LM directory and writes ``erasure.json`` and ``erasure.png``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.stats import wilson_interval
from training.lm_rl.committed import build_contexts, followup_text, parse_committed, require_followup

logger = logging.getLogger(__name__)

# Bench/CLI domain name -> committed-format task family and its default difficulty.
DOMAINS: dict[str, str] = {
    "math": "math_followup",
    "logic": "logic_followup",
    "science_qa": "science_qa",
    "tool_use": "tool_use",
}
# science_qa at 1 (2 hops): the level where a 2,000-step TinyLM start answers at all (docs/cerl.md).
DEFAULT_DIFFICULTY: dict[str, int] = {"math": 2, "logic": 1, "science_qa": 1, "tool_use": 2}
FOLLOWUP_TOKENS = 16
RESULT_FILE = "erasure.json"
PLOT_FILE = "erasure.png"


def check_domains(domains: Sequence[str]) -> list[str]:
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"unknown or no domains {unknown or list(domains)}; valid: {', '.join(DOMAINS)}")
    return list(domains)


def erasure_statistics(keep: Sequence[bool], erased: Sequence[bool]) -> dict[str, Any]:
    """Accuracies, flip rates and their 95% Wilson intervals from paired follow-up verdicts.

    keep[i] / erased[i]: whether sample i's follow-up was right with the thoughts kept / erased.
    """
    if len(keep) != len(erased):
        raise ValueError(f"keep and erased must pair up, got {len(keep)} and {len(erased)} verdicts")
    n = len(keep)
    keep_right = sum(bool(k) for k in keep)
    erased_right = sum(bool(e) for e in erased)
    flips = sum(bool(k) and not bool(e) for k, e in zip(keep, erased))
    reverse = sum(not bool(k) and bool(e) for k, e in zip(keep, erased))
    keep_wrong = n - keep_right
    return {
        "n": n,
        "acc_keep": keep_right / n if n else 0.0,
        "acc_erased": erased_right / n if n else 0.0,
        "flip_rate": flips / keep_right if keep_right else 0.0,
        "reverse_flip_rate": reverse / keep_wrong if keep_wrong else 0.0,
        "ci95_acc_keep": list(wilson_interval(keep_right, n)),
        "ci95_acc_erased": list(wilson_interval(erased_right, n)),
        "ci95_flip_rate": list(wilson_interval(flips, keep_right)),
        "ci95_reverse_flip_rate": list(wilson_interval(reverse, keep_wrong)),
        "count_keep_correct": keep_right,
        "count_erased_correct": erased_right,
        "count_flips": flips,
        "count_reverse_flips": reverse,
    }


@dataclass
class ProbeResult:
    """Per-sample verdicts of the follow-up probes (lists of length B)."""

    wellformed: list[bool]
    keep_correct: list[bool]
    erase_correct: list[bool]
    keep_texts: list[str]
    erase_texts: list[str]
    generated_tokens: int


def probe_followups(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    problems: Sequence[Any],
    followup_tokens: int = FOLLOWUP_TOKENS,
    batch_size: int = 64,
) -> ProbeResult:
    """Continue each well-formed sample on its keep and erase contexts with its follow-up (greedy).

    completion_ids: each sample's valid completion tokens; texts: their decoded texts.
    Raises ValueError when a problem's task has no follow-up (not a committed-format task).
    """
    from training.lm_rl.rollout import SamplingConfig, generate

    families = [require_followup(problem) for problem in problems]
    count = len(problems)
    if not (len(prompt_ids) == len(completion_ids) == len(texts) == count):
        raise ValueError("prompt_ids, completion_ids, texts and problems must have one entry per sample")
    wellformed = [False] * count
    contexts: list[tuple[int, list[int], list[int]]] = []
    for row in range(count):
        if parse_committed(texts[row]) is None:
            continue
        followup = tokenizer(followup_text(problems[row].meta["followup"]), add_special_tokens=False)["input_ids"]
        built = build_contexts(prompt_ids[row], completion_ids[row], followup, tokenizer)
        if built is not None:
            wellformed[row] = True
            contexts.append((row, built.keep, built.erase))
    keep_texts, erase_texts = [""] * count, [""] * count
    generated = 0
    queries = [(row, "keep", keep) for row, keep, _ in contexts] + [(row, "erase", erase) for row, _, erase in contexts]
    config = SamplingConfig(max_new_tokens=followup_tokens, temperature=0.0)
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        rollout = generate(model, tokenizer, [ids for _, _, ids in chunk], config)
        generated += rollout.num_generated_tokens
        for (row, path, _), text in zip(chunk, rollout.texts):
            (keep_texts if path == "keep" else erase_texts)[row] = text
    keep_correct = [wellformed[r] and families[r].verify_followup(problems[r], keep_texts[r]) for r in range(count)]
    erase_correct = [wellformed[r] and families[r].verify_followup(problems[r], erase_texts[r]) for r in range(count)]
    return ProbeResult(wellformed, keep_correct, erase_correct, keep_texts, erase_texts, generated)


def greedy_completions(
    model: Any, tokenizer: Any, problems: Sequence[Any], max_new_tokens: int, batch_size: int = 64
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(prompt ids, completion ids, texts) of greedy completions; tool tasks run multi-turn."""
    from training.lm_rl.rollout import SamplingConfig, generate
    from training.lm_rl.sft import encode_prompt
    from training.lm_rl.tasks import get_task
    from training.lm_rl.tool_env import greedy_tool_completions

    prompts: list[list[int]] = [encode_prompt(tokenizer, p.prompt) for p in problems]
    completions: list[list[int]] = [[] for _ in problems]
    texts = [""] * len(problems)
    for task in sorted({p.task for p in problems}):
        family = get_task(task)
        rows = [i for i, p in enumerate(problems) if p.task == task]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch_prompts = [prompts[i] for i in chunk]
            if getattr(family, "tool_env", None) is not None:
                rollout = greedy_tool_completions(
                    model, tokenizer, batch_prompts, family.tool_env, max_new_tokens, family.max_turns
                )
            else:
                rollout = generate(model, tokenizer, batch_prompts, SamplingConfig(max_new_tokens, temperature=0.0))
            for k, i in enumerate(chunk):
                completions[i] = rollout.completion_ids[k][rollout.completion_mask[k]].tolist()
                texts[i] = rollout.texts[k]
    return prompts, completions, texts


def completion_budget(tokenizer: Any, problems: Sequence[Any]) -> int:
    """Sampling budget that fits the longest correct long-state completion with 25% slack."""
    from training.lm_rl.tasks import get_task

    longest = max(
        len(tokenizer(get_task(p.task).long_trace(p), add_special_tokens=False)["input_ids"]) for p in problems
    )
    return int(longest * 1.25) + 8


def evaluate_erasure(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Any],
    max_new_tokens: int | None = None,
    followup_tokens: int = FOLLOWUP_TOKENS,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The protocol's numbers for a list of problems of one task (see the module docstring)."""
    if not problems:
        raise ValueError("evaluate_erasure needs at least one problem")
    for problem in problems:
        require_followup(problem)
    import torch

    was_training = model.training
    model.eval()
    budget = max_new_tokens or completion_budget(tokenizer, problems)
    with torch.no_grad():
        prompts, completions, texts = greedy_completions(model, tokenizer, problems, budget, batch_size)
        probe = probe_followups(model, tokenizer, prompts, completions, texts, problems, followup_tokens, batch_size)
    model.train(was_training)
    from training.lm_rl.tasks import get_task

    answers = [get_task(p.task).verify(p, text) for p, text in zip(problems, texts)]
    stats = erasure_statistics(probe.keep_correct, probe.erase_correct)
    stats.update({
        "acc_answer": sum(answers) / len(answers),
        "ci95_acc_answer": list(wilson_interval(sum(answers), len(answers))),
        "malformed_rate": 1.0 - sum(probe.wellformed) / len(problems),
        "max_new_tokens": budget,
        "examples": [
            {"prompt": problems[i].prompt, "completion": texts[i], "followup": problems[i].meta["followup"],
             "keep": probe.keep_texts[i], "erase": probe.erase_texts[i],
             "expected": problems[i].meta["followup_answer"]}
            for i in range(min(3, len(problems)))
        ],
    })
    return stats


def plot_erasure(domains: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars per domain: follow-up accuracy kept vs erased (95% CIs) and the flip rate."""
    import matplotlib

    matplotlib.use("Agg")  # evaluation machines have no display
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(domains)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(names)), 4))
    for offset, key, label in ((-0.27, "acc_keep", "follow-up acc, thoughts kept"),
                               (0.0, "acc_erased", "follow-up acc, thoughts erased"),
                               (0.27, "flip_rate", "flip rate when erased")):
        values = np.array([domains[n][key] for n in names])
        ci = np.array([domains[n][f"ci95_{key}"] for n in names])
        ax.bar(x + offset, values, width=0.27, label=label,
               yerr=[np.clip(values - ci[:, 0], 0, None), np.clip(ci[:, 1] - values, 0, None)], capsize=3)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction (95% Wilson CI)")
    ax.set_title(title or "Erasure Dependence Protocol")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_erasure_eval(
    model_dir: str,
    out_dir: str | os.PathLike,
    domains: Sequence[str] = tuple(DOMAINS),
    problems: int = 128,
    seed: int = 0,
    difficulty: int | None = None,
    max_new_tokens: int | None = None,
    followup_tokens: int = FOLLOWUP_TOKENS,
) -> dict[str, Any]:
    """Load a model directory (TinyLM or any HF causal LM) and run the protocol per domain."""
    # Arguments first: a typo should not wait for torch to import.
    domains = check_domains(domains)
    for name, value in (("problems", problems), ("followup_tokens", followup_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("difficulty", difficulty), ("max_new_tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    import torch

    from training.lm_rl.committed import ensure_format_tokens
    from training.lm_rl.models import load_policy_model
    from training.lm_rl.tasks import make_split

    started = time.perf_counter()
    model, tokenizer = load_policy_model(model_dir)
    added = ensure_format_tokens(tokenizer, model)
    if added:
        logger.warning("the model did not know the format tags %s; they were added untrained", added)
    model.eval()
    results: dict[str, Any] = {}
    for domain in domains:
        level = difficulty or DEFAULT_DIFFICULTY[domain]
        test = make_split(DOMAINS[domain], "test", problems, level, seed=seed)
        with torch.no_grad():
            results[domain] = {"task": DOMAINS[domain], "difficulty": level,
                               **evaluate_erasure(model, tokenizer, test, max_new_tokens, followup_tokens)}
        logger.info("%s: acc_keep %.3f acc_erased %.3f flip %.3f", domain, results[domain]["acc_keep"],
                    results[domain]["acc_erased"], results[domain]["flip_rate"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": str(model_dir),
        "domains": results,
        "config": {"problems": problems, "seed": seed, "difficulty": difficulty, "max_new_tokens": max_new_tokens,
                   "followup_tokens": followup_tokens, "split": "test"},
        "wall_s": time.perf_counter() - started,
    }
    summary["plot"] = str(plot_erasure(results, out / PLOT_FILE, f"Erasure Dependence Protocol: {model_dir}"))
    staging = out / f".{RESULT_FILE}.tmp"
    staging.write_text(json.dumps(summary, indent=2))
    os.replace(staging, out / RESULT_FILE)
    return summary


def main(argv: list[str] | None = None, prog: str = "helmstack eval erasure") -> int:
    """CLI: ``helmstack eval erasure --model DIR --out DIR [--domains a,b] [--problems N] ...``."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description="Erasure Dependence Protocol on a trained model")
    parser.add_argument("--model", required=True, help="a save_pretrained directory (TinyLM or HF causal LM)")
    parser.add_argument("--out", required=True, help="directory for erasure.json and erasure.png")
    parser.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated, from {', '.join(DOMAINS)}")
    parser.add_argument("--problems", type=int, default=128, help="held-out TEST problems per domain")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TEST draw")
    parser.add_argument("--difficulty", type=int, help="one difficulty for every domain (default: per domain)")
    parser.add_argument("--max-new-tokens", type=int, help="completion budget (default: fits the long traces)")
    parser.add_argument("--followup-tokens", type=int, default=FOLLOWUP_TOKENS, help="follow-up answer budget")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.lm_rl.models import ModelLoadError

    try:
        summary = run_erasure_eval(
            args.model, args.out, [d.strip() for d in args.domains.split(",") if d.strip()], args.problems,
            args.seed, args.difficulty, args.max_new_tokens, args.followup_tokens,
        )
    except (ModelLoadError, ValueError) as error:
        print(f"helmstack: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(json.dumps({d: {k: r[k] for k in ("acc_keep", "acc_erased", "flip_rate", "acc_answer")}
                      for d, r in summary["domains"].items()}))
    return 0
