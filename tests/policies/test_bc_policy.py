"""BCPolicy answers real observations with valid action chunks and refuses bad checkpoints,
missing inputs and non-finite outputs with errors that say what is wrong."""
import json

import numpy as np
import pytest
import torch

from policies.base import ActionChunk, Observation
from policies.bc import BCPolicy, CheckpointError, FeatureError, NonFiniteActionError, policy_from_env
from sim.panda import POSITION_LOWER, POSITION_UPPER
from sim.scene import TabletopScene
from sim.tasks.suite import HELDOUT_SEED_BASE, get_task
from training.bc.demos import make_cameras, render_cameras
from training.bc.model import ActionConfig, BCModelConfig, BCNet, FeatureConfig, NormalizationStats, write_policy_files

torch.set_num_threads(1)

TASK = "pick_place_bowl"


def write_checkpoint(directory, features=FeatureConfig(), nan_weights=False):
    """A real checkpoint of an untrained network, statistics fitted on random data."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    action = ActionConfig()
    net = BCNet(BCModelConfig(input_dim=features.dim, chunk_steps=action.chunk_steps, hidden_dim=32, n_blocks=1))
    if nan_weights:
        with torch.no_grad():
            net.head[1].weight.fill_(float("nan"))
    rng = np.random.default_rng(0)
    stats = NormalizationStats.fit(
        rng.normal(size=(16, features.dim)).astype(np.float32),
        (0.01 * rng.normal(size=(16, action.chunk_steps, 9))).astype(np.float32),
    )
    write_policy_files(directory, net, stats, features, action, {"note": "test"})
    return directory


class ColourHistogram:
    """4-bin histogram per colour channel: a stand-in for the image tower."""

    embedding_dim = 12

    def encode_images(self, images):
        return np.stack([np.concatenate([np.histogram(im[..., c], bins=4, range=(0, 256))[0] / im[..., c].size for c in range(3)]) for im in images]).astype(np.float32)


@pytest.fixture(scope="module")
def scene():
    s = TabletopScene()
    s.reset(get_task(TASK), HELDOUT_SEED_BASE)
    yield s
    s.close()


def observation(scene, world=True, images=None):
    ws = scene.world_state()
    return Observation(ws.joint_positions, ws.sim_time_s, get_task(TASK), 0, ws if world else None, images or {})


def test_select_action_returns_a_valid_chunk(tmp_path, scene):
    policy = BCPolicy(write_checkpoint(tmp_path / "ckpt"), control_hz=20.0)
    assert policy.requires_privileged_state and policy.kinematics is not None
    policy.reset()
    chunk = policy.select_action(observation(scene))
    assert isinstance(chunk, ActionChunk)
    assert chunk.positions.shape == (6, 9) and np.all(np.isfinite(chunk.positions))
    assert np.all(chunk.positions >= POSITION_LOWER) and np.all(chunk.positions <= POSITION_UPPER)
    np.testing.assert_allclose(chunk.times_s, np.arange(1, 7) / 20.0)
    # Small predicted offsets: the targets stay near the current arm configuration.
    assert np.abs(chunk.positions[:, :7] - scene.world_state().joint_positions[:7]).max() < 0.5
    # The second query sees the first as its previous observation (motion features); reset forgets it.
    later = observation(scene)
    later.sim_time_s += 0.3
    assert policy.select_action(later).positions.shape == (6, 9) and policy._previous[1] == later.sim_time_s
    policy.reset()
    assert policy._previous is None
    policy.observe(observation(scene))  # history without acting, e.g. before taking over
    assert policy._previous is not None
    short = BCPolicy(tmp_path / "ckpt", execute_steps=3).select_action(observation(scene))
    assert short.positions.shape == (3, 9)


def test_missing_inputs_and_wrong_rate_are_refused(tmp_path, scene):
    path = write_checkpoint(tmp_path / "ckpt")
    policy = BCPolicy(path)
    with pytest.raises(FeatureError, match="privileged"):
        policy.select_action(observation(scene, world=False))
    bad = observation(scene)
    bad.joint_positions = np.full(9, np.nan)
    with pytest.raises(FeatureError, match="joint_positions"):
        policy.select_action(bad)
    with pytest.raises(ValueError, match="trained at 20.0 Hz"):
        BCPolicy(path, control_hz=10.0)
    with pytest.raises(ValueError, match="execute_steps"):
        BCPolicy(path, execute_steps=7)
    small = BCPolicy(write_checkpoint(tmp_path / "small", FeatureConfig(max_entities=2)))
    with pytest.raises(FeatureError, match="max_entities=2"):
        small.select_action(observation(scene))


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no policy checkpoint"):
        BCPolicy(tmp_path / "nothing")
    truncated = write_checkpoint(tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BCPolicy(truncated)
    mismatched = write_checkpoint(tmp_path / "mismatched")
    config = json.loads((mismatched / "config.json").read_text())
    config["features"]["max_entities"] = 5
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="input_dim"):
        BCPolicy(mismatched)
    garbled = write_checkpoint(tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        BCPolicy(garbled)
    bad_field = write_checkpoint(tmp_path / "bad_field")
    config = json.loads((bad_field / "config.json").read_text())
    config["action"]["chunk_steps"] = "six"
    (bad_field / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="action.chunk_steps"):
        BCPolicy(bad_field)
    no_stats = write_checkpoint(tmp_path / "no_stats")
    (no_stats / "normalization.safetensors").unlink()
    with pytest.raises(CheckpointError, match="normalization.safetensors"):
        BCPolicy(no_stats)


def test_non_finite_output_is_caught(tmp_path, scene):
    policy = BCPolicy(write_checkpoint(tmp_path / "nan", nan_weights=True))
    with pytest.raises(NonFiniteActionError, match="non-finite"):
        policy.select_action(observation(scene))


def test_image_policy_reads_camera_embeddings_without_privileged_state(tmp_path, scene):
    features = FeatureConfig(use_object_state=False, cameras=("front",), image_embedding_dim=ColourHistogram.embedding_dim)
    path = write_checkpoint(tmp_path / "image", features)
    with pytest.raises(FeatureError, match="image_encoder"):
        BCPolicy(path)
    policy = BCPolicy(path, image_encoder=ColourHistogram())
    assert not policy.requires_privileged_state and policy.cameras == ("front",)
    images = render_cameras(scene, make_cameras(scene, ("front",), 32, 32))
    chunk = policy.select_action(observation(scene, world=False, images=images))
    assert chunk.positions.shape == (6, 9) and np.all(np.isfinite(chunk.positions))
    with pytest.raises(FeatureError, match="'front' camera"):
        policy.select_action(observation(scene, world=False))


def test_registry_factory_reads_the_checkpoint_location(tmp_path, monkeypatch, scene):
    monkeypatch.setenv("HELMSTACK_BC_CHECKPOINT", str(write_checkpoint(tmp_path / "ckpt")))
    assert policy_from_env(20.0).select_action(observation(scene)).positions.shape == (6, 9)
    monkeypatch.setenv("HELMSTACK_BC_CHECKPOINT", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="HELMSTACK_BC_CHECKPOINT"):
        policy_from_env(20.0)
