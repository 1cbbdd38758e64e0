"""training.encoder on tiny real data: captions decided by the predicates, frames from
demonstrations with images, a contrastive run that resumes exactly after a stop, an export
that open_clip itself loads, and a held-out retrieval evaluation that reports what it should."""
import copy
import dataclasses
import json

import numpy as np
import open_clip
import pytest
import torch

from perception.encoder import EXPORT_DIR, WEIGHTS_FILE, ClipEncoder, load_encoder
from runtime.cli import main as cli_main
from runtime.config import ConfigError, load_config
from sim.scene import TabletopScene
from sim.tasks.geometry import DEFAULT_MOVABLE_SIZE_M, container_inner
from sim.tasks.suite import HELDOUT_SEED_BASE, get_task
from training.bc.dataset import embed_demo_images
from training.bc.demos import DemoConfig, NoiseConfig, generate_demos
from training.encoder.captions import CaptionError, scene_caption, scene_facts, subgoal_caption
from training.encoder.dataset import frames_from_demos, keep_rows
from training.encoder.evaluate import EncoderEvalConfig, evaluate_encoder
from training.encoder.train import CheckpointError, EncoderTrainConfig, EncoderTrainer
from training.run_files import list_checkpoints, read_records

torch.set_num_threads(1)

TASK = "pick_place_bowl"  # the shortest suite task
CUBE = DEFAULT_MOVABLE_SIZE_M["cube"]


# -- captions ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def start_states():
    """Initial world states of two tasks (real scene resets; everything rests on the table)."""
    with TabletopScene() as scene:
        return {t: scene.reset(get_task(t), 3) for t in (TASK, "drawer_put_block", "stack_three")}


def test_captions_of_known_world_states(start_states):
    start_states = copy.deepcopy(start_states)
    task = get_task(TASK)
    ws = start_states[TASK]
    assert scene_caption(ws, task) == "the red cube is on the table. the green cube is on the table. the gripper is empty"
    assert subgoal_caption(task, 2) == "put the red cube in the bowl"

    # The red cube resting on the bowl's floor.
    bowl_pos, bowl_quat = ws.object_poses["bowl"]
    floor = container_inner("bowl")[2]
    ws.object_poses["red_cube"] = (bowl_pos + np.array([0.0, 0.0, floor + CUBE[2] / 2]), bowl_quat)
    assert scene_facts(ws, task)[0] == "the red cube is in the bowl"

    # The hand closed on the green cube: held, and the gripper is no longer empty.
    green_pos, green_quat = ws.object_poses["green_cube"]
    ws.ee_position, ws.ee_quaternion, ws.gripper_width = green_pos.copy(), green_quat.copy(), CUBE[1]
    assert scene_caption(ws, task) == "the red cube is in the bowl. the gripper holds the green cube"
    # Lifted out of reach of any support, not held: in the air.
    ws.gripper_width = 0.08
    ws.object_poses["green_cube"] = (green_pos + np.array([0, 0, 0.2]), green_quat)
    assert scene_facts(ws, task)[1] == "the green cube is in the air"

    stack = get_task("stack_three")
    ws = start_states["stack_three"]
    red_pos, red_quat = ws.object_poses["red_cube"]
    ws.object_poses["blue_cube"] = (red_pos + np.array([0, 0, CUBE[2]]), red_quat)
    assert "the blue cube is on the red cube" in scene_facts(ws, stack)

    drawer_task = get_task("drawer_put_block")
    ws = start_states["drawer_put_block"]
    for slide, state in ((0.0, "closed"), (0.06, "half open"), (0.15, "open")):
        ws.fixture_joints["drawer"] = slide
        assert scene_facts(ws, drawer_task)[0] == f"the drawer is {state}"


def test_caption_errors_name_the_problem(start_states):
    task = get_task(TASK)
    ws = copy.deepcopy(start_states[TASK])
    del ws.object_poses["bowl"]
    with pytest.raises(CaptionError, match=r"no pose for \['bowl'\]"):
        scene_caption(ws, task)
    with pytest.raises(CaptionError, match="subgoals 0..2, got subgoal_index=3"):
        subgoal_caption(task, 3)


def test_keep_rows_keeps_strided_frames_and_every_change():
    episode = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    captions = ["a", "a", "a", "b", "b", "a", "a", "a"]
    subgoals = ["s"] * 8
    assert keep_rows(episode, captions, subgoals, 2).tolist() == [0, 2, 3, 4, 5, 7]
    assert keep_rows(episode, captions, subgoals, 1).tolist() == list(range(8))
    with pytest.raises(ValueError, match="frame_stride must be a positive int"):
        keep_rows(episode, captions, subgoals, 0)


# -- data and training ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    config = DemoConfig(out_dir=str(out), tasks=(TASK,), episodes_per_task=2, episodes_per_shard=1, workers=1, cameras=("front", "wrist"),
                        image_width=96, image_height=96, noise=NoiseConfig(clean_episode_fraction=1.0), progress=False)
    generate_demos(config)
    return out


def _config(demo_dir, out, **overrides) -> EncoderTrainConfig:
    settings = dict(data_dir=str(demo_dir), out_dir=str(out), batch_size=8, max_steps=2, warmup_steps=0, lr=1e-3, frame_stride=3,
                    val_fraction=0.5, val_max_frames=16, eval_every=2, save_every=1, progress=False)
    settings.update(overrides)
    return EncoderTrainConfig(**settings)


def test_frames_from_demos_pair_each_image_with_its_captions(demo_dir, tmp_path):
    frames = frames_from_demos(demo_dir, ("front",), frame_stride=3)
    assert frames.images.shape[1:] == (96, 96, 3) and frames.images.dtype == np.uint8
    assert len(frames) == len(frames.captions) == len(frames.subgoals) == len(frames.episode)
    assert {e["seed"] for e in frames.episodes} == {0, 1}
    task = get_task(TASK)
    assert set(frames.subgoals) <= {sg.name for sg in task.subgoals}
    assert frames.captions[0] == "the red cube is on the table. the green cube is on the table. the gripper is empty"
    assert "the gripper holds the red cube. the green cube is on the table" in frames.captions
    both = frames_from_demos(demo_dir, ("front", "wrist"), frame_stride=3)
    assert len(both) == 2 * len(frames) and len(both.episodes) == len(frames.episodes) == 2
    wrist = np.array(both.camera) == "wrist"
    np.testing.assert_array_equal(both.episode[wrist], frames.episode)
    assert [c for c, w in zip(both.captions, wrist) if w] == frames.captions
    assert not np.array_equal(both.images[wrist], frames.images)  # a different view of the same moments
    # Demonstrations made without images cannot train an encoder.
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    manifest["config"]["cameras"] = []
    (no_images / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"store images of no camera, not \['front'\]; regenerate with: helmstack demos"):
        frames_from_demos(no_images, ("front",))
    with pytest.raises(ValueError, match=r"tasks \['sort_three'\] have no demonstrations"):
        frames_from_demos(demo_dir, ("front",), tasks=("sort_three",))


@pytest.fixture(scope="module")
def straight_run(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    trainer = EncoderTrainer(_config(demo_dir, out))
    summary = trainer.train()
    return out, trainer, summary


def test_training_steps_checkpoints_and_export(straight_run):
    out, trainer, summary = straight_run
    assert summary["step"] == 2 and np.isfinite(summary["losses/total"])
    assert 0.0 <= summary["val/caption_r1"] <= 1.0 and summary["charts/batch"] >= 2
    records = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in records if "losses/total" in r] == [1, 2]
    assert [c.name for c in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert (out / "curves.png").stat().st_size > 0 and any((out / "tb").iterdir())
    # open_clip's training-script format: the step checkpoints carry the optimizer, the export not.
    step = torch.load(list_checkpoints(out)[-1] / WEIGHTS_FILE, weights_only=True)
    final = torch.load(out / EXPORT_DIR / WEIGHTS_FILE, weights_only=True)
    assert {"epoch", "name", "state_dict", "optimizer"} <= set(step) and "optimizer" not in final
    assert final["step"] == 2 and final["model_name"] == "helm-vit-tiny"


def test_export_reloads_through_open_clip_with_identical_embeddings(straight_run):
    out, trainer, _ = straight_run
    rows = np.arange(4)
    expected = trainer.encode_frames(rows)
    for model_name, pretrained in (("helm-vit-tiny", str(out / EXPORT_DIR / WEIGHTS_FILE)), (f"local-dir:{out / EXPORT_DIR}", None)):
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        model.eval()
        from PIL import Image

        with torch.no_grad():
            x = torch.stack([preprocess(Image.fromarray(im)) for im in trainer.frames.images[rows]])
            np.testing.assert_allclose(model.encode_image(x, normalize=True).numpy(), expected, atol=1e-5)
    encoder = load_encoder(out)
    np.testing.assert_allclose(encoder.encode_images(trainer.frames.images[rows]), expected, atol=1e-5)
    texts = ["pick up the red cube", trainer.frames.captions[0]]
    np.testing.assert_allclose(encoder.encode_texts(texts), trainer.encode_texts(texts), atol=1e-5)


def test_resume_after_a_stop_equals_the_straight_run(demo_dir, straight_run, tmp_path):
    out, straight, _ = straight_run
    first = EncoderTrainer(_config(demo_dir, tmp_path))
    first.train(until_step=1)  # stops after checkpointing step 1, as a killed run leaves it
    assert not (tmp_path / EXPORT_DIR).exists()
    # A half-written later log record, as a kill could leave it, is dropped on resume.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "losses/total": 99.0}) + "\n")
    resumed = EncoderTrainer(_config(demo_dir, tmp_path), resume=True)
    assert resumed.step == 1
    resumed.train()
    assert resumed.step == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_records(tmp_path / "metrics.jsonl") if "losses/total" in r]
    assert steps == [1, 2]


def test_resume_refuses_changed_settings_and_damaged_checkpoints(demo_dir, tmp_path):
    EncoderTrainer(_config(demo_dir, tmp_path)).train(until_step=1)
    with pytest.raises(ValueError, match=r"cannot resume with different lr \(was 0.001, now 0.01\)"):
        EncoderTrainer(_config(demo_dir, tmp_path, lr=1e-2), resume=True)
    (list_checkpoints(tmp_path)[-1] / WEIGHTS_FILE).write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="step-00000001"):
        EncoderTrainer(_config(demo_dir, tmp_path), resume=True)


def test_bad_training_config_is_refused_with_the_field_named(demo_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        _config(demo_dir, tmp_path, batch_size=1)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['shift_pxx'\]"):
        load_config(EncoderTrainConfig, {"data_dir": "d", "out_dir": "o", "shift_pxx": 1}, root="encoder")
    with pytest.raises(ConfigError, match="encoder.batch_size"):
        load_config(EncoderTrainConfig, {"data_dir": "d", "out_dir": "o", "batch_size": "many"}, root="encoder")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "encoder", "--data", str(demo_dir), "--out", str(tmp_path), "--model", "no-such-model"])
    assert exit_info.value.code == 2 and "unknown open_clip model 'no-such-model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "encoder", "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert "cannot read the demonstration manifest" in capsys.readouterr().err


def test_trained_encoder_embeds_demo_images_for_the_bc_policy(demo_dir, straight_run):
    encoder = load_encoder(straight_run[0])
    folder = embed_demo_images(demo_dir, encoder, "encoder_test", progress=False)
    arrays = np.load(next(folder.glob("*.npz")))
    assert arrays["front"].shape[1] == encoder.embedding_dim
    np.testing.assert_allclose(np.linalg.norm(arrays["front"], axis=1), 1.0, atol=1e-5)


def test_held_out_evaluation_writes_the_report(straight_run, tmp_path):
    out = tmp_path / "encoder.json"
    config = EncoderEvalConfig(checkpoint=str(straight_run[0]), out=str(out), tasks=(TASK,), n_seeds=1, frame_stride=4, workers=1,
                               frames_cache=str(tmp_path / "frames.npz"), progress=False)
    report = evaluate_encoder(config)
    assert json.loads(out.read_text())["frames"] == report["frames"]
    assert report["frames"]["seeds"] == [HELDOUT_SEED_BASE] and report["frames"]["n"] > 3
    for kind in ("caption", "caption_in_task", "subgoal", "subgoal_in_task"):
        entry = report["retrieval"][kind]
        assert 0.0 <= entry["r1"]["frames"] <= entry["r5"]["frames"] <= 1.0
        assert 0.0 < entry["r1"]["chance"] <= entry["r5"]["chance"] <= 1.0
        assert kind in report["baseline_untrained"]
    # Only this task's subgoals can be retrieved within the task: R@5 over its 3 subgoals is 1.
    assert report["retrieval"]["subgoal_in_task"]["r5"]["frames"] == 1.0
    assert report["encoder"]["training"]["step"] == 2 and report["speed"]["image_ms_batch1"] > 0
    # The cached frames are reused as they are.
    again = evaluate_encoder(dataclasses.replace(config, baseline=False))
    assert again["retrieval"]["caption"]["r1"] == report["retrieval"]["caption"]["r1"]
    with pytest.raises(ValueError, match="n_seeds must be a positive int"):
        EncoderEvalConfig(checkpoint="x", out="y", n_seeds=0)


def test_untrained_encoder_is_a_valid_protocol_implementation():
    encoder = ClipEncoder()
    assert isinstance(encoder.embedding_dim, int)
    assert encoder.encode_images(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, encoder.embedding_dim)
