"""Behaviour cloning of the scripted expert on tiny real data: noisy demonstrations replay
exactly and carry clean labels, the split holds out whole episodes, training lowers the loss
and resumes exactly, and the per-subgoal evaluation reports what it should."""
import json

import numpy as np
import pytest
import torch

from sim.expert import ScriptedExpert
from sim.panda import PandaKinematics
from sim.scene import TabletopScene
from sim.tasks.suite import HELDOUT_SEED_BASE, get_task
from training.bc.dataset import embed_demo_images, load_demos, split_by_episode
from training.bc.demos import (
    DemoConfig,
    NoiseConfig,
    episode_rng,
    generate_demos,
    load_manifest,
    read_shard,
    record_episode,
)
from training.bc.model import MAX_MOTION_GAP_S, FeatureConfig, ObservationFeaturizer, RobotState, decode_chunk, load_checkpoint, motion_features
from training.bc.train import BCTrainConfig, BCTrainer, SubgoalEvalConfig, evaluate_policy, list_checkpoints, read_metrics

torch.set_num_threads(1)

TASK = "pick_place_bowl"  # the shortest suite task: about 160 control steps with the expert
NOISY = NoiseConfig(clean_episode_fraction=0.0, perturb_prob=0.6, pause_prob=0.1)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    config = DemoConfig(out_dir=str(out), tasks=(TASK,), episodes_per_task=3, episodes_per_shard=2, workers=1, noise=NOISY, progress=False)
    generate_demos(config)
    return out


def _train_config(data_dir, out_dir, **overrides) -> BCTrainConfig:
    settings = dict(
        data_dir=str(data_dir), out_dir=str(out_dir), hidden_dim=64, n_blocks=1, batch_size=64, max_steps=60, lr=3e-3,
        warmup_steps=5, eval_every=20, save_every=30, val_fraction=0.34, progress=False,
    )
    settings.update(overrides)
    return BCTrainConfig(**settings)


@pytest.fixture(scope="module")
def trained_run(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = BCTrainer(_train_config(demo_dir, out)).train()
    return out, summary


def test_demo_shards_hold_clean_labels_and_noisy_execution(demo_dir):
    manifest = load_manifest(demo_dir)
    assert manifest["totals"]["episodes"] == 3 and len(manifest["shards"]) == 2
    assert all(seed < HELDOUT_SEED_BASE for s in manifest["shards"] for seed in (e["seed"] for e in s["episodes"]))
    arrays, meta = read_shard(demo_dir / manifest["shards"][0]["file"])
    n = len(arrays["subgoal_index"])
    assert n == meta["n_decisions"] == sum(e["n_decisions"] for e in meta["episodes"])
    assert arrays["label"].shape == (n, 6, 9) and np.all(np.isfinite(arrays["label"]))
    assert arrays["object_poses"].shape == (n, 3, 7)

    # Replay the first episode from its shard: a fresh scene and expert, the recorded
    # executed targets. The expert's output from each replayed state is the recorded label.
    task = get_task(TASK)
    episode = meta["episodes"][0]
    rows = np.flatnonzero(arrays["episode"] == 0)
    assert arrays["executed_steps"][rows].sum() == episode["total_steps"]
    scene = TabletopScene()
    kinematics = PandaKinematics()
    try:
        expert = ScriptedExpert(kinematics)
        ws = scene.reset(task, episode["seed"])
        for i in rows:
            np.testing.assert_allclose(ws.joint_positions, arrays["joint_positions"][i], atol=1e-5)
            label = expert.act(ws, ws.joint_positions, task, int(arrays["subgoal_index"][i]))
            np.testing.assert_allclose(label, arrays["label"][i], atol=1e-5)
            for row in arrays["executed"][i][: arrays["executed_steps"][i]]:
                scene.apply_joint_targets(row)
                scene.step_control()
            ws = scene.world_state()
    finally:
        scene.close()
        kinematics.close()

    # Noise went into what was executed, never into the labels.
    perturbed, paused = arrays["perturbed"], arrays["paused"]
    assert perturbed.any() and not (perturbed & paused).any()
    executed = arrays["executed"][:, :6]
    gap = np.nanmax(np.abs(executed - arrays["label"]), axis=(1, 2))
    assert np.all(gap[perturbed] > 0)
    assert np.all(gap[~perturbed & ~paused] < 1e-5)


def test_demo_generation_resumes_and_refuses_heldout_seeds(demo_dir):
    shards = sorted((demo_dir / "shards").glob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    config = DemoConfig(out_dir=str(demo_dir), tasks=(TASK,), episodes_per_task=3, episodes_per_shard=2, workers=1, noise=NOISY, progress=False)
    manifest = generate_demos(config)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # finished shards are reused
    assert manifest["totals"]["episodes"] == 3
    with pytest.raises(ValueError, match="TRAIN split"):
        DemoConfig(out_dir=str(demo_dir), first_seed=HELDOUT_SEED_BASE - 1, episodes_per_task=2)
    with pytest.raises(ValueError, match="held-out"):
        record_episode(None, None, get_task(TASK), HELDOUT_SEED_BASE, NOISY, episode_rng(0, TASK, 0))


def test_dataset_features_actions_and_episode_split(demo_dir):
    dataset = load_demos(demo_dir, FeatureConfig())
    manifest = load_manifest(demo_dir)
    assert len(dataset) == manifest["totals"]["decisions"]
    assert dataset.features.shape == (len(dataset), FeatureConfig().dim) and np.all(np.isfinite(dataset.features))
    assert dataset.actions.shape == (len(dataset), 6, 9)
    # The encoded actions decode back to the expert's labels.
    arrays, _ = read_shard(demo_dir / manifest["shards"][0]["file"])
    np.testing.assert_allclose(decode_chunk(dataset.actions[0], arrays["joint_positions"][0]), arrays["label"][0], atol=1e-5)

    train, val = split_by_episode(dataset, 0.34, seed=0)
    assert len(train) and len(val) and len(train) + len(val) == len(dataset)
    assert not set(dataset.episode[train]) & set(dataset.episode[val])
    again_train, _ = split_by_episode(dataset, 0.34, seed=0)
    np.testing.assert_array_equal(train, again_train)


def test_entity_slots_put_the_subgoal_arguments_first():
    task = get_task(TASK)
    featurizer = ObservationFeaturizer(FeatureConfig())
    place = next(k for k, sg in enumerate(task.subgoals) if sg.predicate.startswith("in("))
    names = [e.name for e in featurizer.entities(task, place)]
    assert names[:2] == ["red_cube", "bowl"] and sorted(names) == sorted(o.name for o in task.objects)


def test_motion_features_are_velocities_over_the_decision_interval():
    still = RobotState(np.zeros(9), np.array([0.4, 0.0, 0.2]), np.array([1.0, 0.0, 0.0, 0.0]), 0.07)
    moved = RobotState(np.zeros(9), np.array([0.4, 0.03, 0.17]), np.array([1.0, 0.0, 0.0, 0.0]), 0.04)
    np.testing.assert_allclose(motion_features(still, 1.0, moved, 1.3), [0.0, 0.1, -0.1, -0.1], atol=1e-12)
    assert not motion_features(None, 0.0, moved, 1.3).any()  # first decision: at rest
    assert not motion_features(still, 1.0, moved, 1.0 + 2 * MAX_MOTION_GAP_S).any()  # stale
    assert not motion_features(still, 1.3, moved, 1.0).any()  # time went backwards (a reset)


def test_image_embeddings_plug_in_through_the_encoder_protocol(tmp_path):
    class ColourHistogram:
        """4-bin histogram per colour channel: a stand-in for the image tower."""

        embedding_dim = 12

        def encode_images(self, images):
            return np.stack([np.concatenate([np.histogram(im[..., c], bins=4, range=(0, 256))[0] / im[..., c].size for c in range(3)]) for im in images]).astype(np.float32)

    config = DemoConfig(out_dir=str(tmp_path), tasks=(TASK,), episodes_per_task=1, workers=1, cameras=("front",), image_width=32, image_height=32, progress=False)
    generate_demos(config)
    embed_demo_images(tmp_path, ColourHistogram(), "histogram", progress=False)
    features = FeatureConfig(use_object_state=False, cameras=("front",), image_embedding_dim=12)
    dataset = load_demos(tmp_path, features, embeddings="histogram")
    assert dataset.features.shape[1] == features.dim
    with pytest.raises(ValueError, match="embedding set"):
        load_demos(tmp_path, features)


def test_training_lowers_the_loss_and_writes_a_loadable_policy(trained_run):
    out, summary = trained_run
    losses = [r["losses/train_l1"] for r in read_metrics(out / "metrics.jsonl") if "losses/train_l1" in r]
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert summary["step"] == 60 and summary["policy"] == str(out / "best")
    assert (out / "curves.png").exists() and list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(out)] == ["step-00000030", "step-00000060"]
    checkpoint = load_checkpoint(out)
    assert checkpoint.path == out / "best" and checkpoint.training["step"] in (20, 40, 60)


def test_resume_continues_the_same_run(demo_dir, tmp_path):
    straight = BCTrainer(_train_config(demo_dir, tmp_path / "a", max_steps=30, save_every=10))
    straight.train()
    paused = BCTrainer(_train_config(demo_dir, tmp_path / "b", max_steps=30, save_every=10))
    paused.train(until_step=20)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000010", "step-00000020"]
    resumed = BCTrainer(_train_config(demo_dir, tmp_path / "b", max_steps=30, save_every=10), resume=True)
    assert resumed.step == 20
    resumed.train()
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"parameter {name} differs after resuming")
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "losses/train_l1" in r]
    assert steps == list(range(1, 31))

    with pytest.raises(ValueError, match="lr"):
        BCTrainer(_train_config(demo_dir, tmp_path / "b", max_steps=30, lr=1e-2), resume=True)
    # A damaged newest checkpoint is refused and the one before it is used.
    newest = list_checkpoints(tmp_path / "b")[-1]
    (newest / "model.safetensors").write_bytes(b"\0" * 16)
    assert BCTrainer(_train_config(demo_dir, tmp_path / "b", max_steps=30, save_every=10), resume=True).step == 20


def test_per_subgoal_evaluation_reports_every_subgoal(trained_run, tmp_path):
    out, _ = trained_run
    config = SubgoalEvalConfig(checkpoint=str(out), out=str(tmp_path / "eval.json"), tasks=(TASK,), n_seeds=1, workers=1, max_steps_per_subgoal=20, progress=False)
    report = evaluate_policy(config)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["seeds"] == [HELDOUT_SEED_BASE] == report["seeds"]
    subgoals = report["per_task"][TASK]["subgoals"]
    assert [s["predicate"] for s in subgoals] == [sg.predicate for sg in get_task(TASK).subgoals]
    for s in subgoals:
        assert {"success_rate", "ci95", "n", "already_satisfied", "not_reached_by_expert"} <= set(s)
        assert s["n"] + s["already_satisfied"] + s["not_reached_by_expert"] == 1
    episode = report["episodes"][0]
    assert episode["expert_success"] and {r["status"] for r in episode["subgoals"]} <= {"success", "failure", "already_satisfied"}
    assert all(r["steps"] <= 20 for r in episode["subgoals"])
    assert {"subgoal", "long_horizon", "subgoals_below_target"} <= set(report["overall"])
    assert report["per_task"][TASK]["long_horizon"]["n"] == 1
    assert set(report["per_predicate"]) == {"grasped", "lifted", "in"}
