"""State verifier: features, the attention over keyframes, checkpoints, the rule and ensemble
baselines, bad input, and the classifier metrics (hand-computed)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from policies.base import ActionChunk, Observation
from runtime.harness_controller import HarnessController, HarnessControllerConfig, HarnessState
from runtime.state_verifier import (
    EnsembleVerifier, KeyframeView, RuleVerifier, StateVerifier, StateVerifierNet, VerifierCheckpoint,
    VerifierCheckpointError, VerifierFeatureConfig, VerifierFeaturizer, VerifierInputError, VerifierModelConfig,
    VerifierNormalization, load_verifier, save_verifier,
)
from sim.scene import TabletopScene
from sim.tasks.suite import get_task
from training.verifier.metrics import at_threshold, auroc, best_f1_threshold, cluster_bootstrap

torch.set_num_threads(1)
TASK = get_task("pick_place_bowl")


@pytest.fixture(scope="module")
def world():
    with TabletopScene() as scene:
        yield scene.reset(TASK, 3)


def obs_of(world, index=0):
    return Observation(world.joint_positions.copy(), world.sim_time_s, TASK, index, world)


def hold_chunk(world, steps=6, fingers=0.04):
    rows = np.repeat(world.joint_positions[None], steps, axis=0)
    rows[:, 7:9] = fingers
    return ActionChunk(rows, np.arange(1, steps + 1) / 20.0)


def tiny_verifier(use_memory: bool, threshold: float = 0.5) -> StateVerifier:
    f = VerifierFeaturizer(VerifierFeatureConfig())
    model = VerifierModelConfig(f.observation_dim, f.chunk_dim, f.keyframe_dim, use_memory=use_memory, hidden_dim=16, memory_dim=8)
    torch.manual_seed(0)
    net = StateVerifierNet(model).eval()
    rng = np.random.default_rng(0)
    norm = VerifierNormalization.fit(rng.standard_normal((8, f.observation_dim)), rng.standard_normal((8, f.chunk_dim)),
                                     rng.standard_normal((8, 6, f.keyframe_dim)), np.ones((8, 6), bool))
    return StateVerifier(VerifierCheckpoint(VerifierFeatureConfig(), model, threshold, net, norm))


def test_feature_shapes_and_keyframe_displacement(world):
    f = VerifierFeaturizer(VerifierFeatureConfig())
    assert f.observation(world, TASK, 0).shape == (f.observation_dim,)
    short = hold_chunk(world, steps=3)  # padded to 6 rows by repeating the last
    assert f.chunk(short.positions, world).shape == (f.chunk_dim,)
    then = obs_of(world).world
    moved = json.loads(json.dumps({}))  # a copy of the world with the red cube moved 5 cm
    poses = {k: (v[0].copy(), v[1].copy()) for k, v in world.object_poses.items()}
    first = f.observation_features.entities(TASK, 0)[0].name
    poses[first][0][0] += 0.05
    now = type(world)(poses, world.fixture_joints, world.ee_position, world.ee_quaternion, world.gripper_width,
                      world.sim_time_s + 4.0, world.joint_positions)
    kf = f.keyframe(KeyframeView("subgoal_start", True, world.sim_time_s, 0, then), now, TASK, 0)
    base = 6 + 1 + 1 + 2 + 3 + 1
    assert kf[6] == 1.0 and kf[7] == pytest.approx(0.4)  # verified, age 4 s in units of 10 s
    assert kf[base:base + 3] == pytest.approx([0.05, 0.0, 0.0])  # the first slot's displacement since then
    assert moved == {}


def test_non_finite_inputs_are_refused_with_a_clear_error(world):
    sv = tiny_verifier(use_memory=False)
    chunk = hold_chunk(world)
    bad = ActionChunk(chunk.positions.copy(), chunk.times_s)
    bad.positions[2, 1] = np.nan
    with pytest.raises(VerifierInputError, match="non-finite"):
        sv.p_fail(obs_of(world), bad, TASK.subgoals[0], None)
    no_world = Observation(world.joint_positions, 0.0, TASK, 0, None)
    with pytest.raises(VerifierInputError, match="world state"):
        sv.p_fail(no_world, chunk, TASK.subgoals[0], None)
    with pytest.raises(VerifierInputError, match="non-finite|finite"):
        RuleVerifier().p_fail(obs_of(world), bad, TASK.subgoals[0])


def test_nan_verifier_input_makes_the_harness_hold(world):
    class Env:
        held = 0

        def observe(self):
            o = obs_of(world)
            o.joint_positions = np.full(9, np.nan)
            return o

        def execute(self, chunk):
            raise AssertionError("a chunk the verifier could not judge must not run")

        def subgoal_done(self, subgoal):
            return False

        def snapshot(self):
            return 0

        def restore(self, handle):
            pass

        def hold(self):
            Env.held += 1

    class Policy:
        def propose(self, observation, subgoal, attempt):
            return hold_chunk(world)

    controller = HarnessController(HarnessControllerConfig(ladder=("resample",)), Policy(), Env(), verifier=tiny_verifier(False))
    result = controller.run(TASK.instruction, subgoals=TASK.subgoals)
    assert result.final_state is HarnessState.HOLD and Env.held == 1
    assert "finite" in result.reason


def test_memory_changes_the_prediction_and_no_keyframe_reads_as_empty(world):
    sv = tiny_verifier(use_memory=True)
    obs, chunk = obs_of(world), hold_chunk(world)

    class Memory:
        def __init__(self, views):
            self.views = views

        def context(self, observation, subgoal_index, k):
            return self.views[:k]

    empty = sv.p_fail(obs, chunk, TASK.subgoals[0], Memory([]))
    assert sv.p_fail(obs, chunk, TASK.subgoals[0], None) == empty  # no memory object = no keyframes
    old = KeyframeView("failure", False, 0.0, 0, world)
    with_kf = sv.p_fail(obs, chunk, TASK.subgoals[0], Memory([old]))
    assert 0.0 <= empty <= 1.0 and with_kf != empty


def test_masked_keyframes_do_not_influence_the_logit():
    model = VerifierModelConfig(5, 4, 3, use_memory=True, hidden_dim=8, memory_dim=4)
    torch.manual_seed(1)
    net = StateVerifierNet(model).eval()
    o, c = torch.randn(2, 5), torch.randn(2, 4)
    k = torch.randn(2, 3, 3)
    valid = torch.tensor([[True, False, False], [True, False, False]])
    k2 = k.clone()
    k2[:, 1:] = 100.0  # garbage in the invalid slots
    assert torch.allclose(net(o, c, k, valid), net(o, c, k2, valid))


def test_checkpoint_round_trip_and_errors(tmp_path, world):
    sv = tiny_verifier(use_memory=True, threshold=0.37)
    save_verifier(tmp_path / "sv", sv.checkpoint)
    save_verifier(tmp_path / "sv", sv.checkpoint)  # overwriting an existing checkpoint is atomic too
    loaded = load_verifier(str(tmp_path / "sv"))
    assert isinstance(loaded, StateVerifier) and loaded.threshold == pytest.approx(0.37)
    obs, chunk = obs_of(world), hold_chunk(world)
    assert loaded.p_fail(obs, chunk, TASK.subgoals[0], None) == pytest.approx(sv.p_fail(obs, chunk, TASK.subgoals[0], None), abs=1e-6)
    with pytest.raises(ValueError, match="no verifier checkpoint"):
        load_verifier(str(tmp_path / "missing"))
    config = json.loads((tmp_path / "sv" / "config.json").read_text())
    config["threshold"] = 3.0
    (tmp_path / "sv" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerifierCheckpointError, match="threshold"):
        StateVerifier.load(tmp_path / "sv")
    assert isinstance(load_verifier("rule"), RuleVerifier)
    with pytest.raises(ValueError):
        load_verifier("")


def test_rules_fire_on_infeasible_chunks_only(world):
    rules = RuleVerifier()
    obs = obs_of(world)
    pick = TASK.subgoals[0]
    assert rules.violations(obs, hold_chunk(world), pick) == []
    assert rules.p_fail(obs, hold_chunk(world), pick) == 0.0
    # closing the fingers where the hand is (far above the cube) cannot grasp it
    assert "close_far_from_object" in rules.violations(obs, hold_chunk(world, fingers=0.0), pick)
    beyond = hold_chunk(world)
    beyond.positions[:, 3] = 0.5  # joint 4 above its upper limit (0)
    assert "joint_limits" in rules.violations(obs, beyond, pick)
    place = TASK.subgoals[2]
    assert "placing_without_holding" in rules.violations(obs_of(world, 2), hold_chunk(world), place)
    assert rules.p_fail(obs_of(world, 2), hold_chunk(world, fingers=0.0), place) == pytest.approx(0.6)


def test_ensemble_spread_grows_with_disagreement(world):
    base = hold_chunk(world).positions
    assert EnsembleVerifier.spread([base, base, base]) == pytest.approx(0.0, abs=1e-12)
    shifted = base.copy()
    shifted[:, 0] += 0.1
    assert EnsembleVerifier.spread([base, shifted]) == pytest.approx(0.05 / 7)
    with pytest.raises(ValueError):
        EnsembleVerifier([object()])


def test_metrics_on_hand_computed_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # ties count one half
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))
    at = at_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.3)
    assert at["precision"] == pytest.approx(2 / 3) and at["recall"] == 1.0 and at["f1"] == pytest.approx(0.8)
    t = best_f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert 0.2 < t < 0.7
    lo, hi = cluster_bootstrap(auroc, [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], [0, 0, 1, 1], n_boot=50)
    assert lo == hi == 1.0
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, float("nan")])
