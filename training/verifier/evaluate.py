"""Compare failure predictors on the same held-out rollouts: AUROC, and F1 / precision at
each predictor's operating threshold (chosen on data it was not scored on).

    helmstack eval verifier --test runs/sv-data-test --calibration runs/sv-data-train \
        --sv runs/sv/best --sv-nomem runs/sv-nomem/best --encoder runs/encoder \
        [--ensemble runs/bc,runs/bc-seed1,...] --out benchmarks/results/verifier.json

The learned verifiers use the threshold stored with them (F1-optimal on their validation
episodes); the rule check and the ensemble, which are not trained, get the F1-optimal
threshold on the calibration rollouts (the training rollouts). AUROC comes with an
episode-clustered bootstrap 95% interval.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.base import ActionChunk, Observation
from runtime.state_verifier import EnsembleVerifier, RuleVerifier, StateVerifier
from sim.tasks.suite import get_task
from training.verifier.dataset import Episode, build_examples, load_episodes
from training.verifier.metrics import at_threshold, auroc, best_f1_threshold, cluster_bootstrap
from training.verifier.rollouts import world_from_record

logger = logging.getLogger(__name__)


def _samples(episodes: list[Episode]):
    for e, ep in enumerate(episodes):
        task = get_task(ep.meta["task_id"])
        for s in ep.meta["samples"]:
            world = world_from_record(s["world"])
            obs = Observation(world.joint_positions, world.sim_time_s, task, int(s["subgoal_index"]), world)
            rows = ep.chunks[s["chunk_index"]]
            yield e, s, obs, ActionChunk(rows, np.arange(1, len(rows) + 1) / 20.0)


def rule_scores(episodes: list[Episode]) -> np.ndarray:
    rules = RuleVerifier()
    return np.array([rules.p_fail(obs, chunk, obs.task.subgoals[obs.subgoal_index]) for _, _, obs, chunk in _samples(episodes)])


def ensemble_scores(episodes: list[Episode], members: list[Any]) -> np.ndarray:
    """Each member sees the observation with its motion history (the previous decision)."""
    scores = []
    for _, s, obs, chunk in _samples(episodes):
        chunks = []
        for member in members:
            member.reset()
            if s["previous"] is not None and hasattr(member, "observe"):
                q, t = s["previous"]
                member.observe(Observation(np.asarray(q), t, obs.task, obs.subgoal_index, None))
            chunks.append(member.select_action(obs).positions)
        scores.append(EnsembleVerifier.spread(chunks + [chunk.positions]))
    return np.asarray(scores)


def labels_of(episodes: list[Episode]) -> tuple[np.ndarray, np.ndarray]:
    y, g = [], []
    for e, ep in enumerate(episodes):
        for s in ep.meta["samples"]:
            y.append(int(s["label"]))
            g.append(e)
    return np.asarray(y), np.asarray(g)


def report(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float) -> dict[str, Any]:
    at = at_threshold(labels, scores, threshold)
    return {"auroc": auroc(labels, scores), "auroc_ci95": cluster_bootstrap(auroc, labels, scores, groups),
            "f1": at["f1"], "precision": at["precision"], "recall": at["recall"], "threshold": threshold,
            "rejection_rate": at["rejection_rate"]}


def compare(test_dir: str, calibration_dir: str, sv: str = "", sv_nomem: str = "", encoder: str = "",
            ensemble: tuple[str, ...] = (), progress: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)
    test = load_episodes(test_dir)
    calibration = load_episodes(calibration_dir)
    y, groups = labels_of(test)
    y_cal, _ = labels_of(calibration)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    out["rule"] = report(y, rule_scores(test), groups, best_f1_threshold(y_cal, rule_scores(calibration)))
    if ensemble:
        from policies.bc import BCPolicy

        members = [BCPolicy(path) for path in ensemble]
        cal = ensemble_scores(calibration, members)
        out["ensemble"] = report(y, ensemble_scores(test, members), groups, best_f1_threshold(y_cal, cal))
        out["ensemble"]["members"] = list(ensemble)
    for name, path in (("sv_nomem", sv_nomem), ("sv", sv)):
        if not path:
            continue
        model = StateVerifier.load(path)
        enc = None
        if model.use_memory:
            from perception.encoder import load_encoder

            enc = load_encoder(encoder)
        ex = build_examples(test, model.checkpoint.features, enc, progress=progress)
        out[name] = report(ex.label, model.score_features(ex.observation, ex.chunk, ex.keyframes, ex.valid), ex.episode,
                           model.threshold)
        out[name]["checkpoint"] = path
    out["data"] = {"test": test_dir, "calibration": calibration_dir, "test_samples": int(len(y)),
                   "test_episodes": len(test), "test_positive_rate": float(y.mean()), "encoder": encoder,
                   "wall_s": time.perf_counter() - start}
    return out


def main(argv: list[str] | None = None, prog: str = "python -m training.verifier.evaluate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--sv", default="")
    parser.add_argument("--sv-nomem", default="")
    parser.add_argument("--encoder", default="")
    parser.add_argument("--ensemble", default="", help="comma-separated BC checkpoints")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = compare(a.test, a.calibration, a.sv, a.sv_nomem, a.encoder,
                         tuple(p for p in a.ensemble.split(",") if p), progress=not a.no_progress)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    result["command"] = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    for name in ("rule", "ensemble", "sv_nomem", "sv"):
        if name in result:
            r = result[name]
            print(f"{name:9s} AUROC {r['auroc']:.3f} [{r['auroc_ci95'][0]:.3f}, {r['auroc_ci95'][1]:.3f}]  "
                  f"F1 {r['f1']:.3f}  precision {r['precision']:.3f}  (threshold {r['threshold']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
