"""The longer-context BC policy (FeatureConfig.history = H): windows are built per episode and
never leak across episodes, H = 0 is the old model exactly (features, network, checkpoint
files, predictions of the trained runs/bc), a history checkpoint round-trips, the runtime
policy's rolling window matches the training windows, repeated queries at one sim time push
no extra frame, reset empties the window, the evaluation hands the last H expert decisions
over, and a tiny history training runs and resumes exactly."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.base import Observation
from policies.bc import BCPolicy, CheckpointError
from sim.scene import TabletopScene
from sim.tasks.suite import HELDOUT_SEED_BASE, get_task
from training.bc.dataset import history_windows, load_demos
from training.bc.demos import DemoConfig, NoiseConfig, generate_demos, load_manifest, read_shard, world_state_at
from training.bc.model import (
    ActionConfig,
    BCModelConfig,
    BCNet,
    FeatureConfig,
    NormalizationStats,
    decode_chunk,
    gather_windows,
    load_checkpoint,
    pad_frames,
    window_from_frames,
    write_policy_files,
)
from training.bc.train import BCTrainConfig, BCTrainer, PolicyActor, WitnessedExpert, list_checkpoints, read_metrics, train_main

torch.set_num_threads(1)

TASK = "pick_place_bowl"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    noise = NoiseConfig(clean_episode_fraction=0.0, perturb_prob=0.6, pause_prob=0.1)
    generate_demos(DemoConfig(out_dir=str(out), tasks=(TASK,), episodes_per_task=2, episodes_per_shard=2, workers=1, noise=noise, progress=False))
    return out


@pytest.fixture(scope="module")
def scene():
    s = TabletopScene()
    yield s
    s.close()


def write_checkpoint(directory, history=0, hidden_dim=32, seed=0):
    """A real checkpoint of an untrained network, statistics fitted on random data."""
    directory.mkdir(parents=True, exist_ok=True)
    features = FeatureConfig(history=history)
    action = ActionConfig()
    torch.manual_seed(seed)
    net = BCNet(BCModelConfig(input_dim=features.dim, chunk_steps=action.chunk_steps, hidden_dim=hidden_dim, n_blocks=1, history=history))
    rng = np.random.default_rng(seed)
    stats = NormalizationStats.fit(
        rng.normal(size=(16, features.dim)).astype(np.float32), (0.01 * rng.normal(size=(16, action.chunk_steps, 9))).astype(np.float32)
    )
    write_policy_files(directory, net, stats, features, action, {"note": "test"})
    return directory, net, stats


def observation(ws, subgoal=0, time_s=None):
    return Observation(ws.joint_positions, ws.sim_time_s if time_s is None else time_s, get_task(TASK), subgoal, ws, {})


# -- windows ------------------------------------------------------------------------------
def test_windows_start_each_episode_padded_and_never_cross_episodes():
    episode = np.array([0, 0, 0, 0, 1, 1, 2])
    windows = history_windows(episode, 3)
    np.testing.assert_array_equal(
        windows,
        [[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [1, 2, 3], [-1, -1, 4], [-1, 4, 5], [-1, -1, 6]],
    )
    # Every valid index of a window belongs to the row's own episode.
    for row, window in enumerate(history_windows(episode, 5)):
        valid = window[window >= 0]
        assert valid[-1] == row and np.all(episode[valid] == episode[row]) and np.all(np.diff(valid) == 1)
    assert history_windows(np.zeros(0, dtype=np.int64), 4).shape == (0, 4)
    with pytest.raises(ValueError, match="contiguous"):
        history_windows(np.array([0, 0, 1, 0]), 2)
    with pytest.raises(ValueError, match="history must be a positive int"):
        history_windows(episode, 0)
    with pytest.raises(ValueError, match="1-D"):
        history_windows(episode.reshape(1, -1), 2)


def test_gathered_windows_are_zero_padded_and_masked():
    frames = torch.arange(1.0, 13.0).reshape(4, 3)  # rows 1..4 are nonzero everywhere
    windows = torch.from_numpy(history_windows(np.array([0, 0, 1, 1]), 3))
    gathered, mask = gather_windows(pad_frames(frames), windows)
    assert gathered.shape == (4, 3, 3)
    np.testing.assert_array_equal(mask.numpy(), windows.numpy() >= 0)
    assert not gathered[~mask].any() and bool((gathered[mask] != 0).all())
    torch.testing.assert_close(gathered[3, 1:], frames[2:4])  # episode 1's frames, in order
    with pytest.raises(ValueError, match="row of zeros"):
        gather_windows(frames, windows)  # not padded: index -1 would read a real frame
    window, m = window_from_frames([frames[0], frames[1]], 3, 3)
    torch.testing.assert_close(window[0], torch.stack([torch.zeros(3), frames[0], frames[1]]))
    assert m.tolist() == [[False, True, True]]
    window, m = window_from_frames(list(frames), 3, 3)  # more frames than the window: the last 3
    torch.testing.assert_close(window[0], frames[1:])
    assert m.all()


def test_dataset_windows_hold_each_episodes_own_decisions(demo_dir):
    plain = load_demos(demo_dir, FeatureConfig())
    with_history = load_demos(demo_dir, FeatureConfig(history=8))
    # The per-decision features do not depend on the window length: H = 0 is the old data.
    np.testing.assert_array_equal(plain.features, with_history.features)
    assert with_history.features.shape[1] == FeatureConfig().dim == FeatureConfig(history=8).dim
    windows = history_windows(with_history.episode, 8)
    starts = np.flatnonzero(np.r_[True, with_history.episode[1:] != with_history.episode[:-1]])
    assert len(starts) == 2  # two episodes, each begins with a window of one valid frame
    for s in starts:
        assert windows[s].tolist() == [-1] * 7 + [s]
    valid = windows >= 0
    assert np.all(with_history.episode[np.where(valid, windows, 0)][valid] == np.repeat(with_history.episode, 8).reshape(-1, 8)[valid])


# -- H = 0 is the old model ---------------------------------------------------------------
def test_history_zero_is_the_old_network_and_checkpoint_format(tmp_path):
    path, net, stats = write_checkpoint(tmp_path / "plain")
    assert {k.split(".")[0] for k in net.state_dict()} == {"input", "blocks", "head"}
    config = json.loads((path / "config.json").read_text())
    assert "history" not in config["features"]
    assert not {"history", "history_width", "history_out_dim"} & set(config["model"])
    # The old forward pass, written out: input layer, residual blocks, head.
    x = torch.randn(5, FeatureConfig().dim)
    with torch.no_grad():
        old = net.head(net.blocks(net.input(x))).view(5, 6, 9)
        torch.testing.assert_close(net(x), old, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no history input"):
        net(x, torch.zeros(5, 2, x.shape[1]), torch.ones(5, 2, dtype=torch.bool))
    # Same seed, same initial weights as before the option existed (history modules come last).
    torch.manual_seed(3)
    a = BCNet(BCModelConfig(input_dim=x.shape[1], chunk_steps=6, hidden_dim=32, n_blocks=1))
    torch.manual_seed(3)
    b = BCNet(BCModelConfig(input_dim=x.shape[1], chunk_steps=6, hidden_dim=32, n_blocks=1, history=4))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    # A config written with an explicit history of 0 reads the same.
    config["features"]["history"] = 0
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(path)
    assert loaded.features.history == 0 and loaded.model.history == 0
    torch.testing.assert_close(loaded.net(x), net(x).detach(), rtol=0, atol=0)


# Chunks the trained runs/bc produced on pick_place_bowl (held-out seed 0) before the history
# option existed: the first row of the first and third query, the last row of the third.
RUNS_BC_REFERENCE = {
    (0, 0): [-0.0025570456, -0.7592297988, 0.0199408713, -2.3692712155, 0.0138419947, 1.6094881498, 0.8253129051, 0.0360600092, 0.0360614769],
    (2, 0): [-0.024409336, -0.2884458714, 0.2661982321, -2.3277687123, 0.0841341958, 2.0467874433, 1.3352524136, 0.036129415, 0.036116533],
    (2, 5): [-0.0225744068, -0.0392311402, 0.3340576862, -2.2180824885, 0.0159297668, 2.1804393853, 1.6009510551, 0.0361308232, 0.0361074023],
}


@pytest.mark.skipif(not (REPO / "runs" / "bc" / "best" / "config.json").exists(), reason="no trained runs/bc here (helmstack train bc --out runs/bc)")
def test_the_trained_base_policy_still_loads_and_predicts_the_same_chunks(scene):
    task = get_task(TASK)
    scene.reset(task, HELDOUT_SEED_BASE)
    policy = BCPolicy(REPO / "runs" / "bc", control_hz=20.0, num_threads=1)
    assert policy.history_length == 0
    chunks = []
    for _ in range(3):
        chunk = policy.select_action(observation(scene.world_state())).positions
        chunks.append(chunk)
        for row in chunk:
            scene.apply_joint_targets(row)
            scene.step_control()
    for (query, row), expected in RUNS_BC_REFERENCE.items():
        np.testing.assert_allclose(chunks[query][row], expected, atol=1e-8)


# -- history checkpoints and the runtime policy -------------------------------------------
def test_history_checkpoint_round_trips_and_the_policy_reads_its_window(tmp_path, scene):
    path, net, stats = write_checkpoint(tmp_path / "h4", history=4)
    config = json.loads((path / "config.json").read_text())
    assert config["features"]["history"] == 4 and config["model"]["history"] == 4
    loaded = load_checkpoint(path)
    assert loaded.features.history == 4 and loaded.model == net.config
    x, frames = torch.randn(3, net.config.input_dim), torch.randn(3, 4, net.config.input_dim)
    mask = torch.tensor([[False, False, True, True], [True] * 4, [False, False, False, True]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x, frames, mask), net(x, frames, mask), rtol=0, atol=0)
        # Padded frames do not matter: only the mask says what is there.
        noisy = frames.clone()
        noisy[~mask] = 100.0
        torch.testing.assert_close(loaded.net(x, noisy, mask), net(x, frames, mask))
        # The window does matter.
        assert not torch.allclose(net(x, frames, mask), net(x, frames, torch.ones_like(mask)))
    with pytest.raises(ValueError, match="4-frame history"):
        net(x)
    with pytest.raises(ValueError, match=r"history must be \(3, 4"):
        net(x, frames[:, :2], mask[:, :2])

    # The policy's chunk is the network's on the window of its last decisions.
    task = get_task(TASK)
    scene.reset(task, HELDOUT_SEED_BASE)
    policy = BCPolicy(path, num_threads=1)
    assert policy.history_length == 4 and policy.history_frames == 0
    states, chunk = [], None
    for _ in range(6):
        ws = scene.world_state()
        states.append(ws)
        chunk = policy.select_action(observation(ws))
        for row in chunk.positions[:2]:
            scene.apply_joint_targets(row)
            scene.step_control()
    assert policy.history_frames == 4
    # Rebuild the last window by hand: the same observations shown to a fresh policy.
    fresh = BCPolicy(path, num_threads=1)
    for ws in states:
        fresh.observe(observation(ws))
    normalised = [f for _, f in fresh._frames]
    assert len(normalised) == 4
    window, m = window_from_frames(normalised, 4, normalised[-1].shape[0])
    with torch.no_grad():
        expected = loaded.net(normalised[-1][None], window, m)[0] * stats.action_std + stats.action_mean
    np.testing.assert_allclose(chunk.positions, decode_chunk(expected.numpy(), states[-1].joint_positions), atol=1e-6)

    # Damaged history configs are refused with the field named.
    config["model"]["history"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.history is 3 but features.history is 4"):
        load_checkpoint(path)
    config["features"]["history"] = -2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="history"):
        load_checkpoint(path)


def test_policy_window_matches_the_training_windows(demo_dir, tmp_path):
    """Replaying a demonstration episode through the policy's observe() gives, frame for
    frame, the window the trainer gathers for the same decision."""
    path, _, stats = write_checkpoint(tmp_path / "h6", history=6)
    data = load_demos(demo_dir, FeatureConfig(history=6))
    x = (torch.from_numpy(data.features) - stats.feature_mean) / stats.feature_std
    windows = torch.from_numpy(history_windows(data.episode, 6))
    manifest = load_manifest(demo_dir)
    arrays, meta = read_shard(demo_dir / manifest["shards"][0]["file"])
    task = get_task(TASK)
    second = int(np.flatnonzero(arrays["episode"] == 1)[0])  # first decision of the second episode
    policy = BCPolicy(path, num_threads=1)
    for i in range(second, second + 9):
        ws = world_state_at(arrays, meta["object_names"], i)
        policy.observe(Observation(ws.joint_positions, ws.sim_time_s, task, int(arrays["subgoal_index"][i]), ws, {}))
        window, mask = window_from_frames([f for _, f in policy._frames], 6, x.shape[1])
        expected, expected_mask = gather_windows(pad_frames(x), windows[i : i + 1])
        assert mask.tolist() == expected_mask.tolist()
        torch.testing.assert_close(window, expected, atol=1e-4, rtol=1e-4)


def test_repeated_queries_at_one_time_push_no_frame_and_reset_clears(tmp_path, scene):
    path, _, _ = write_checkpoint(tmp_path / "h3", history=3)
    task = get_task(TASK)
    scene.reset(task, HELDOUT_SEED_BASE)
    policy = BCPolicy(path, num_threads=1)
    ws = scene.world_state()
    first = policy.select_action(observation(ws)).positions
    again = policy.select_action(observation(ws)).positions  # e.g. asked again after a rejection
    assert policy.history_frames == 1
    np.testing.assert_array_equal(first, again)
    for row in first[:3]:
        scene.apply_joint_targets(row)
        scene.step_control()
    later = scene.world_state()
    a = policy.select_action(observation(later)).positions
    b = policy.select_action(observation(later)).positions
    policy.observe(observation(later))  # observing the same moment adds nothing either
    assert policy.history_frames == 2
    np.testing.assert_array_equal(a, b)
    # A repeat with a new subgoal at the same moment replaces that decision's frame.
    policy.select_action(observation(later, subgoal=1))
    assert policy.history_frames == 2
    # reset() forgets everything: the next query is an episode's first decision.
    policy.reset()
    assert policy.history_frames == 0 and policy._previous is None
    np.testing.assert_array_equal(policy.select_action(observation(ws)).positions, first)
    # Time going backwards (a new episode without reset) starts a new window too.
    policy.select_action(observation(later))
    policy.select_action(observation(ws, time_s=ws.sim_time_s - 1.0))
    assert policy.history_frames == 1
    with pytest.raises(ValueError, match="sim_time_s must be finite"):
        policy.select_action(observation(ws, time_s=float("nan")))
    # The history-free policy answers a repeated query the same way too (motion is measured
    # from the decision before, not from the repeat).
    plain = BCPolicy(write_checkpoint(tmp_path / "plain")[0], num_threads=1)
    plain.select_action(observation(ws))
    c = plain.select_action(observation(later)).positions
    np.testing.assert_array_equal(plain.select_action(observation(later)).positions, c)
    assert plain.history_frames == 0


def test_take_over_shows_the_last_h_expert_decisions(tmp_path, scene):
    path, _, _ = write_checkpoint(tmp_path / "h4", history=4)
    task = get_task(TASK)
    scene.reset(task, HELDOUT_SEED_BASE)
    policy = BCPolicy(path, num_threads=1)
    actor = PolicyActor(policy, scene, {})
    assert actor.history_length == 4

    class Still:
        """A controller that holds the arm: decisions at distinct times, nothing moves."""

        def reset(self):
            pass

        def act(self, ws, q, task, k):
            return np.repeat(np.asarray(q)[None], 2, axis=0)

    witness = WitnessedExpert(Still(), actor)
    for _ in range(7):
        ws = scene.world_state()
        witness.act(ws, ws.joint_positions, task, 0)
        scene.step_control()
    times = [o.sim_time_s for o in witness.recent_observations]
    assert len(times) == 4 and times == sorted(times) and witness.last_observation.sim_time_s == times[-1]
    policy.select_action(observation(scene.world_state()))  # stale history from elsewhere
    actor.take_over(list(witness.recent_observations))
    assert [t for t, _ in policy._frames] == times
    actor.take_over(witness.last_observation)  # one observation still works
    assert policy.history_frames == 1
    actor.take_over(None)
    assert policy.history_frames == 0
    witness.reset()
    assert witness.last_observation is None
    # A history-free policy is shown the last one only.
    plain_actor = PolicyActor(BCPolicy(write_checkpoint(tmp_path / "plain")[0], num_threads=1), scene, {})
    assert plain_actor.history_length == 1 and WitnessedExpert(Still(), plain_actor).recent_observations.maxlen == 1


# -- training -----------------------------------------------------------------------------
def _config(demo_dir, out, **overrides):
    settings = dict(
        data_dir=str(demo_dir), out_dir=str(out), history=5, hidden_dim=32, n_blocks=1, batch_size=32, max_steps=20, lr=3e-3,
        warmup_steps=2, eval_every=10, save_every=10, val_fraction=0.5, progress=False,
    )
    settings.update(overrides)
    return BCTrainConfig(**settings)


def test_tiny_history_training_runs_and_resumes_exactly(demo_dir, tmp_path):
    straight = BCTrainer(_config(demo_dir, tmp_path / "a"))
    summary = straight.train()
    assert summary["step"] == 20 and np.isfinite(summary["val/l1"])
    policy_dir = load_checkpoint(tmp_path / "a")
    assert policy_dir.features.history == 5 and policy_dir.model.history == 5
    paused = BCTrainer(_config(demo_dir, tmp_path / "b"))
    paused.train(until_step=10)
    resumed = BCTrainer(_config(demo_dir, tmp_path / "b"), resume=True)
    assert resumed.step == 10
    resumed.train()
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"parameter {name} differs after resuming")
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "losses/train_l1" in r] == list(range(1, 21))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000010", "step-00000020"]
    # The window length is part of what was learned: a resume cannot change it.
    with pytest.raises(ValueError, match="history"):
        BCTrainer(_config(demo_dir, tmp_path / "b", history=6), resume=True)
    # The trained policy acts on a real observation.
    scene = TabletopScene()
    try:
        ws = scene.reset(get_task(TASK), HELDOUT_SEED_BASE)
        chunk = BCPolicy(tmp_path / "a", num_threads=1).select_action(observation(ws))
        assert chunk.positions.shape == (6, 9) and np.all(np.isfinite(chunk.positions))
    finally:
        scene.close()


def test_a_run_saved_before_the_option_resumes_as_history_zero(demo_dir, tmp_path):
    trainer = BCTrainer(_config(demo_dir, tmp_path / "old", history=0, max_steps=10, save_every=5))
    trainer.train(until_step=5)
    # Make the saved train config look like one written before the history fields existed.
    checkpoint = list_checkpoints(tmp_path / "old")[-1]
    config = json.loads((checkpoint / "config.json").read_text())
    for name in ("history", "history_width", "history_out_dim"):
        del config["training"]["train_config"][name]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert BCTrainer(_config(demo_dir, tmp_path / "old", history=0, max_steps=10, save_every=5), resume=True).step == 5


def test_bad_history_settings_are_refused_with_the_field_named(demo_dir, tmp_path, capsys):
    for bad in (-1, 1.5, True, 10_000):
        with pytest.raises(ValueError, match="history"):
            FeatureConfig(history=bad)
    with pytest.raises(ValueError, match="history"):
        BCModelConfig(input_dim=10, chunk_steps=6, history=-3)
    with pytest.raises(ValueError, match="history_width"):
        BCModelConfig(input_dim=10, chunk_steps=6, history=4, history_width=0)
    with pytest.raises(ValueError, match="history"):
        _config(demo_dir, tmp_path / "x", history=-1)
    with pytest.raises(ValueError, match="history_out_dim"):
        _config(demo_dir, tmp_path / "x", history_out_dim=0)
    with pytest.raises(SystemExit):
        train_main(["--data", str(demo_dir), "--out", str(tmp_path / "cli"), "--history", "-4", "--no-progress"])
    assert "history must be an int in [0, 256], got -4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="features.history is 2 but the network reads 0"):
        write_policy_files(tmp_path, BCNet(BCModelConfig(input_dim=10, chunk_steps=6)), None, FeatureConfig(history=2), ActionConfig())
