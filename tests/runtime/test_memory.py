"""Episodic memory: exact retrieval against brute force, HNSW recall, persistence (round trip,
crash safety, corrupt files), validation errors, rollback targets and a bench smoke run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from runtime.config import ConfigError, load_config
from runtime.memory import KINDS, EmbeddingIndex, EpisodicMemory, Keyframe, MemoryConfig, MemoryFormatError, RobotState
from runtime.memory.bench import ClusteredEmbeddings, run_memory_bench

D_IMG, D_TXT = 6, 4
ROBOT = RobotState(joint_positions=[0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8], ee_position=[0.5, 0.0, 0.3],
                   ee_quaternion=[1.0, 0.0, 0.0, 0.0], gripper_width=0.08)


def keyframe(image, text, episode="ep0", step=0, kind="subgoal_boundary", verified=False, **extra) -> Keyframe:
    return Keyframe(episode=episode, step=step, sim_time_s=step * 0.05, kind=kind, subgoal=f"subgoal {step}",
                    image_embedding=image, text_embedding=text, robot=ROBOT,
                    objects={"bowl": ([0.4, 0.1, 0.02], [0.0, 0.0, 0.0, 1.0])}, verified=verified, **extra)


def brute_force(images, texts, w, q_image=None, q_text=None):
    """float64 cosine of combined keys concat(unit(a), sqrt(w) unit(b)) / sqrt(1 + w), the query
    built the same way with a missing modality zeroed, then renormalised."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    keys = np.concatenate([unit(images), np.sqrt(w) * unit(texts)], axis=1) / np.sqrt(1 + w)
    query = np.concatenate([unit(q_image) if q_image is not None else np.zeros(images.shape[1]),
                            np.sqrt(w) * unit(q_text) if q_text is not None else np.zeros(texts.shape[1])])
    return keys @ (query / np.linalg.norm(query))


@pytest.fixture
def filled():
    rng = np.random.default_rng(7)
    images, texts = rng.standard_normal((24, D_IMG)), rng.standard_normal((24, D_TXT))
    memory = EpisodicMemory(MemoryConfig(image_dim=D_IMG, text_dim=D_TXT, text_weight=0.5, index="exact"))
    for i in range(24):
        memory.add(keyframe(images[i], texts[i], episode=f"ep{i % 3}", step=i, kind=KINDS[i % 4],
                            verified=i % 5 == 0, sim_state=1000 + i, image_path=f"images/{i:04d}.png",
                            meta={"note": f"row {i}", "scores": [0.1, i]}))
    return memory, images, texts, rng


@pytest.mark.parametrize("modalities", ["both", "image", "text"])
def test_exact_query_equals_brute_force_cosine(filled, modalities):
    memory, images, texts, rng = filled
    q_image = rng.standard_normal(D_IMG) if modalities != "text" else None
    q_text = rng.standard_normal(D_TXT) if modalities != "image" else None
    scores = brute_force(images, texts, 0.5, q_image, q_text)
    expected = np.argsort(-scores, kind="stable")[:5]
    got = memory.query(q_image, q_text, k=5)
    assert [m.id for m in got] == expected.tolist()
    np.testing.assert_allclose([m.score for m in got], scores[expected], atol=1e-5)
    assert all(m.keyframe == memory.get(m.id) for m in got)
    # Filters: episode, kinds, verified; results are the brute-force ranking of the subset.
    allowed = np.array([i % 3 == 1 and KINDS[i % 4] in ("gripper_event", "manual") for i in range(24)])
    ranked = [i for i in np.argsort(-scores, kind="stable") if allowed[i]]
    got = memory.query(q_image, q_text, k=3, episode="ep1", kind=["gripper_event", "manual"])
    assert [m.id for m in got] == ranked[:3]
    assert [m.id for m in memory.query(q_image, q_text, k=50, verified=True)] == \
        [i for i in np.argsort(-scores, kind="stable") if i % 5 == 0]
    assert [m.id for m in memory.query(q_image, q_text, k=4, episode=["ep2", "no such episode"])] == \
        [i for i in np.argsort(-scores, kind="stable") if i % 3 == 2][:4]
    assert memory.query(q_image, q_text, episode="no such episode") == []


def test_hand_made_vectors_and_one_modality_scores():
    memory = EpisodicMemory(MemoryConfig(image_dim=3, text_dim=2, text_weight=3.0))
    memory.add(keyframe([1, 0, 0], [1, 0]))
    memory.add(keyframe([0, 1, 0], [0, 2]))
    memory.add(keyframe([1, 1, 0], [1, 1]))
    top = memory.query([0, 5, 0], k=3)  # image only: cos 1, 1/sqrt2, 0, scaled by 1/sqrt(1 + w) = 1/2
    assert [m.id for m in top] == [1, 2, 0]
    np.testing.assert_allclose([m.score for m in top], [0.5, 0.5 / np.sqrt(2), 0.0], atol=1e-6)
    top = memory.query(text_embedding=[3, 0], k=1)  # text only: sqrt(w) / sqrt(1 + w) * cos
    assert top[0].id == 0 and top[0].score == pytest.approx(np.sqrt(3) / 2, abs=1e-6)
    top = memory.query([0, 1, 0], [0, 1], k=1)  # both: the key itself, cosine 1
    assert top[0].id == 1 and top[0].score == pytest.approx(1.0, abs=1e-6)


def test_hnsw_recall_at_10_on_clustered_vectors():
    config = MemoryConfig(image_dim=48, text_dim=16, index="hnsw", approximate_above=100)
    data = ClusteredEmbeddings(3000, 48, 16, seed=1)
    index = EmbeddingIndex(config)
    index.add(*data.sample(np.random.default_rng(2), 3000))
    q_image, q_text = data.sample(np.random.default_rng(3), 40)
    recalls = []
    for qi, qt in zip(q_image, q_text):
        exact, _ = index.search(qi, qt, 10, method="exact")
        approx, scores = index.search(qi, qt, 10)
        recalls.append(len(np.intersect1d(exact, approx)) / 10)
        assert np.all(np.diff(scores) <= 0)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)
    # A broad filter stays on the graph (ID selector) and returns allowed rows only.
    mask = np.arange(3000) % 2 == 0
    ids, _ = index.search(q_image[0], q_text[0], 10, mask=mask)
    exact, _ = index.search(q_image[0], q_text[0], 10, mask=mask, method="exact")
    assert np.all(ids % 2 == 0) and len(np.intersect1d(ids, exact)) >= 8


def test_auto_switches_to_hnsw_and_keeps_results(filled):
    memory, images, texts, rng = filled
    auto = EpisodicMemory(MemoryConfig(image_dim=D_IMG, text_dim=D_TXT, text_weight=0.5, approximate_above=10))
    for kf in memory:
        auto.add(kf)
    assert auto.memory_bytes()["hnsw"] > 0 and memory.memory_bytes()["hnsw"] == 0
    assert auto._index._searches_graph()
    q_image, q_text = rng.standard_normal(D_IMG), rng.standard_normal(D_TXT)
    assert [m.id for m in auto.query(q_image, q_text, k=5)] == [m.id for m in memory.query(q_image, q_text, k=5)]


def test_save_load_round_trip_and_append(filled, tmp_path):
    memory, _, _, rng = filled
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0000.png").write_bytes(b"not touched by saves")
    memory.save(tmp_path)
    loaded = EpisodicMemory.load(tmp_path)
    assert len(loaded) == len(memory) and loaded.config == memory.config
    for i in range(len(memory)):
        a, b = memory.get(i), loaded.get(i)
        assert a == b and a.sim_state == b.sim_state == 1000 + i and b.meta == {"note": f"row {i}", "scores": [0.1, i]}
        assert np.array_equal(a.image_embedding, b.image_embedding)
    q_image, q_text = rng.standard_normal(D_IMG), rng.standard_normal(D_TXT)
    assert memory.query(q_image, q_text, k=7) == loaded.query(q_image, q_text, k=7)
    assert loaded.last_verified("ep0") == memory.last_verified("ep0")
    # Appending then saving again writes one more segment and loses nothing.
    loaded.add(keyframe(q_image, q_text, episode="ep9", step=99, verified=True))
    loaded.save(tmp_path)
    again = EpisodicMemory.load(tmp_path)
    assert len(again) == 25 and again.get(3) == memory.get(3) and again.last_verified("ep9")[0] == 24
    assert len(json.loads((tmp_path / "manifest.json").read_text())["segments"]) == 2
    assert (tmp_path / "images" / "0000.png").read_bytes() == b"not touched by saves"
    # The original store no longer owns the directory: refused unless overwrite.
    with pytest.raises(FileExistsError, match="manifest.json"):
        memory.save(tmp_path)
    memory.save(tmp_path, overwrite=True)
    assert len(EpisodicMemory.load(tmp_path)) == 24
    assert len(list(tmp_path.glob("seg-*"))) == 3


def test_saves_beyond_max_segments_compact_into_one(tmp_path):
    memory = EpisodicMemory(MemoryConfig(image_dim=D_IMG, text_dim=D_TXT, max_segments=2))
    for step in range(4):
        memory.add(keyframe(np.arange(1, D_IMG + 1.0) + step, np.ones(D_TXT), step=step))
        memory.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["count"] for s in manifest["segments"]] == [3, 1]  # 1, 1 -> compacted to 3 at the third save
    assert len(list(tmp_path.glob("seg-*"))) == 6
    assert [kf.step for kf in EpisodicMemory.load(tmp_path)] == [0, 1, 2, 3]


def test_killed_save_keeps_the_previous_complete_save(filled, tmp_path, monkeypatch):
    memory, images, texts, _ = filled
    memory.save(tmp_path)
    memory.add(keyframe(images[0], texts[0], step=50))
    real_replace = os.replace

    def die_on_manifest(src, dst):
        if Path(dst).name == "manifest.json":
            raise KeyboardInterrupt("killed before the commit point")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        memory.save(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(EpisodicMemory.load(tmp_path)) == 24  # the new segment is written but not committed
    assert len(list(tmp_path.glob("seg-*"))) == 6
    memory.save(tmp_path)
    assert len(EpisodicMemory.load(tmp_path)) == 25
    assert len(list(tmp_path.glob("seg-*"))) == 6  # the orphan is gone, the new segment is in
    assert not list(tmp_path.glob(".*tmp*"))


def _saved(filled, tmp_path) -> dict:
    filled[0].save(tmp_path)
    return json.loads((tmp_path / "manifest.json").read_text())


def test_corrupt_manifest_is_an_error_naming_it(filled, tmp_path):
    _saved(filled, tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "helmstack-episodic-memory", "vers')
    with pytest.raises(MemoryFormatError, match="manifest.json.*not valid JSON"):
        EpisodicMemory.load(tmp_path)


def test_count_mismatch_is_an_error_naming_the_manifest(filled, tmp_path):
    manifest = _saved(filled, tmp_path)
    manifest["count"] = 30
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFormatError, match="manifest.json: count = 30 but the segments hold 24"):
        EpisodicMemory.load(tmp_path)


def test_truncated_or_corrupt_npy_is_an_error_naming_the_file(filled, tmp_path):
    manifest = _saved(filled, tmp_path)
    image_file = tmp_path / manifest["segments"][0]["files"]["image"]["name"]
    data = image_file.read_bytes()
    image_file.write_bytes(data[:-40])
    with pytest.raises(MemoryFormatError, match=f"{image_file.name}.*truncated"):
        EpisodicMemory.load(tmp_path)
    image_file.write_bytes(data[:-4] + b"\x00\x00\xc0\x7f")  # same size, last value now NaN
    with pytest.raises(MemoryFormatError, match=f"{image_file.name}: SHA-256"):
        EpisodicMemory.load(tmp_path)
    with pytest.raises(MemoryFormatError, match=f"{image_file.name}: embedding row 23 is not finite"):
        EpisodicMemory.load(tmp_path, verify=False)


def test_bad_record_line_is_an_error_naming_file_line_and_field(filled, tmp_path):
    manifest = _saved(filled, tmp_path)
    records = tmp_path / manifest["segments"][0]["files"]["records"]["name"]
    records.write_text(records.read_text().replace('"kind":"manual"', '"kind":"manuax"', 1))
    with pytest.raises(MemoryFormatError, match=rf"{records.name}:4: kind must be one of"):
        EpisodicMemory.load(tmp_path, verify=False)


def test_dims_mismatch_on_load(filled, tmp_path):
    _saved(filled, tmp_path)
    with pytest.raises(ValueError, match="image_dim = 8 but .*manifest.json holds image_dim = 6"):
        EpisodicMemory.load(tmp_path, MemoryConfig(image_dim=8, text_dim=D_TXT))


def test_bad_inputs_raise_value_errors_naming_the_field():
    memory = EpisodicMemory(MemoryConfig(image_dim=D_IMG, text_dim=D_TXT))
    good_image, good_text = np.ones(D_IMG), np.ones(D_TXT)
    with pytest.raises(ValueError, match="image_embedding must be finite"):
        keyframe(np.r_[np.nan, np.ones(D_IMG - 1)], good_text)
    with pytest.raises(ValueError, match="text_embedding must be non-zero"):
        keyframe(good_image, np.zeros(D_TXT))
    with pytest.raises(ValueError, match=r"image_embedding must have 6 elements \(MemoryConfig.image_dim\), got 5"):
        memory.add(keyframe(np.ones(5), good_text))
    with pytest.raises(ValueError, match="kind must be one of"):
        keyframe(good_image, good_text, kind="checkpoint")
    with pytest.raises(ValueError, match="robot.ee_quaternion must be a unit quaternion"):
        RobotState(np.zeros(7), [0, 0, 0], [0, 0, 0, 2], 0.04)
    with pytest.raises(ValueError, match="image_path must be relative"):
        keyframe(good_image, good_text, image_path="../outside.png")
    with pytest.raises(ValueError, match="meta must be JSON-serialisable"):
        keyframe(good_image, good_text, meta={"x": float("nan")})
    with pytest.raises(ValueError, match="objects.bowl"):
        Keyframe("ep", 0, 0.0, "manual", "", good_image, good_text, ROBOT, objects={"bowl": [0, 0, 0]})
    memory.add(keyframe(good_image, good_text))
    with pytest.raises(ValueError, match=r"text_embedding must have shape \(4,\)"):
        memory.query(good_image, np.ones(3))
    with pytest.raises(ValueError, match="image_embedding must be finite"):
        memory.query(np.full(D_IMG, np.inf))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        memory.query(good_image, k=0)
    with pytest.raises(KeyError, match="unknown keyframe id 1"):
        memory.get(1)
    with pytest.raises(ConfigError, match=r"MemoryConfig.text_weight must be a finite number >= 0, got -1"):
        load_config(MemoryConfig, {"text_weight": -1.0})
    with pytest.raises(ConfigError, match="MemoryConfig.index must be one of"):
        load_config(MemoryConfig, {"index": "ivf"})


def test_last_verified_is_the_newest_confirmed_keyframe_of_the_episode():
    memory = EpisodicMemory(MemoryConfig(image_dim=D_IMG, text_dim=D_TXT))
    image, text = np.ones(D_IMG), np.ones(D_TXT)
    steps = [("a", 10, True), ("b", 12, True), ("a", 40, True), ("a", 45, False), ("b", 50, False),
             ("a", 20, True), ("a", 30, False)]  # ("a", 20) comes after a rollback: newer despite a lower step
    for episode, step, verified in steps:
        memory.add(keyframe(image, text, episode=episode, step=step, verified=verified, sim_state=f"state-{step}"))
    kf_id, kf = memory.last_verified("a")
    assert kf_id == 5 and kf.step == 20 and kf.sim_state == "state-20"
    assert memory.last_verified("a", before=5)[0] == 2
    assert memory.last_verified("a", before=0) is None
    assert memory.last_verified("b")[0] == 1
    assert memory.last_verified("never seen") is None


def test_bench_smoke(tmp_path):
    out = tmp_path / "memory.json"
    result = run_memory_bench(sizes=(100, 1000), image_dim=32, text_dim=16, queries=20, k=10, seed=0, out=out)
    assert json.loads(out.read_text()) == result
    assert result["seeds"] == [0] and result["config"]["sizes"] == [100, 1000]
    for row, n in zip(result["results"], (100, 1000)):
        assert row["n"] == n
        for path in ("exact", "hnsw"):
            for key in ("p50_ms", "p50_ci95_ms", "p99_ms", "p99_ci95_ms", "mean_ms"):
                assert key in row[path]
            assert row[path]["p50_ci95_ms"][0] <= row[path]["p50_ms"] <= row[path]["p50_ci95_ms"][1]
        assert row["hnsw"]["build_s"] >= 0 and 0.9 <= row["hnsw"]["recall_at_10"] <= 1.0
        assert row["memory_bytes"]["embeddings"] == n * (32 + 16 + 2) * 4 and row["memory_bytes"]["hnsw"] > 0


def test_bench_memory_command_forwards_its_options(tmp_path):
    import json

    from runtime.cli import main

    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--out", str(out), "--sizes", "100", "--queries", "5"]) == 0
    result = json.loads(out.read_text())
    assert [row["n"] for row in result["results"]] == [100]
