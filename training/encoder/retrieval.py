"""Image -> text retrieval ranks over the captions of a frame set, shared by the trainer's
validation and the held-out evaluation.

For every frame, four rankings of candidate texts by cosine similarity to its image
embedding (rank 0 = retrieved first; recall@k = share of frames whose true text ranks < k):

  caption           among every distinct scene caption of the frame set
  caption_in_task   among the distinct scene captions of the frame's own task (the harness
                    knows which task it runs)
  subgoal           among every distinct subgoal text of the task suite
  subgoal_in_task   among the subgoal texts of the frame's own task

Ties count against the true text (`perception.encoder.cosine_rank`), so a collapsed
encoder that maps everything to one point scores 0, not chance.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from perception.encoder import cosine_rank
from sim.tasks.suite import get_task, load_suite

KINDS = ("caption", "caption_in_task", "subgoal", "subgoal_in_task")


def suite_subgoals(task_ids: Sequence[str] = ()) -> list[str]:
    """Distinct subgoal texts of the given tasks (default: the whole suite), sorted."""
    tasks = [get_task(t) for t in task_ids] if task_ids else list(load_suite().values())
    return sorted({sg.name for task in tasks for sg in task.subgoals})


def retrieval_ranks(
    image_emb: NDArray[np.float32],
    captions: Sequence[str],
    subgoals: Sequence[str],
    task_ids: Sequence[str],
    encode_texts: Callable[[list[str]], NDArray[np.float32]],
    subgoal_pool: Sequence[str],
) -> tuple[dict[str, NDArray[np.int64]], dict[str, int]]:
    """(ranks per kind, (N,) each; pool size per kind: the largest pool for *_in_task)."""
    n = len(captions)
    if image_emb.shape[0] != n or len(subgoals) != n or len(task_ids) != n:
        raise ValueError(f"got {image_emb.shape[0]} image embeddings for {n} captions, {len(subgoals)} subgoals, {len(task_ids)} task ids")
    missing = sorted(set(subgoals) - set(subgoal_pool))
    if missing:
        raise ValueError(f"subgoal texts {missing[:3]} are not in the candidate pool")
    caption_pool = sorted(set(captions))
    texts = caption_pool + list(subgoal_pool)
    text_emb = encode_texts(texts)
    cap_emb, sg_emb = text_emb[: len(caption_pool)], text_emb[len(caption_pool) :]
    cap_index = {c: i for i, c in enumerate(caption_pool)}
    sg_index = {s: i for i, s in enumerate(subgoal_pool)}
    cap_target = np.array([cap_index[c] for c in captions], dtype=np.int64)
    sg_target = np.array([sg_index[s] for s in subgoals], dtype=np.int64)
    ranks = {
        "caption": cosine_rank(image_emb, cap_emb, cap_target),
        "subgoal": cosine_rank(image_emb, sg_emb, sg_target),
        "caption_in_task": np.zeros(n, dtype=np.int64),
        "subgoal_in_task": np.zeros(n, dtype=np.int64),
    }
    sizes = {"caption": len(caption_pool), "subgoal": len(subgoal_pool), "caption_in_task": 0, "subgoal_in_task": 0}
    task_array = np.asarray(task_ids)
    for task_id in sorted(set(task_ids)):
        rows = np.flatnonzero(task_array == task_id)
        task_caps = sorted({captions[i] for i in rows})
        local = np.array([cap_index[c] for c in task_caps], dtype=np.int64)
        where = {c: j for j, c in enumerate(task_caps)}
        ranks["caption_in_task"][rows] = cosine_rank(image_emb[rows], cap_emb[local], np.array([where[captions[i]] for i in rows], dtype=np.int64))
        task_sgs = sorted({sg.name for sg in get_task(task_id).subgoals})
        local = np.array([sg_index[s] for s in task_sgs], dtype=np.int64)
        where = {s: j for j, s in enumerate(task_sgs)}
        ranks["subgoal_in_task"][rows] = cosine_rank(image_emb[rows], sg_emb[local], np.array([where[subgoals[i]] for i in rows], dtype=np.int64))
        sizes["caption_in_task"] = max(sizes["caption_in_task"], len(task_caps))
        sizes["subgoal_in_task"] = max(sizes["subgoal_in_task"], len(task_sgs))
    return ranks, sizes


def recall_at(ranks: NDArray[np.int64], k: int) -> float:
    """Share of queries whose true text ranks among the first k (NaN for no queries)."""
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")
