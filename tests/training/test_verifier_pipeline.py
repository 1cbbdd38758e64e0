"""The state-verifier pipeline end to end on tiny settings: labelled rollouts from a small
trained BC policy (resumable), retrieval replay with a real open_clip encoder, training
with a validation threshold (and resume), and the HELM evaluation as a smoke run."""
from __future__ import annotations

import json

import pytest
import torch

from perception.encoder import ClipEncoder
from runtime.state_verifier import StateVerifier
from training.bc.demos import DemoConfig, NoiseConfig, generate_demos
from training.bc.train import BCTrainConfig, BCTrainer
from training.helm_eval import HelmEvalConfig, evaluate, paired_differences
from training.verifier.dataset import RolloutDataError, build_examples, load_episodes, split_by_episode
from training.verifier.rollouts import VerifierDataConfig, generate
from training.verifier.train import VerifierTrainConfig, VerifierTrainer

torch.set_num_threads(1)
TASK = "pick_place_bowl"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    demos = tmp_path_factory.mktemp("demos")
    generate_demos(DemoConfig(out_dir=str(demos), tasks=(TASK,), episodes_per_task=3, episodes_per_shard=3, workers=1,
                              noise=NoiseConfig(), progress=False))
    run = tmp_path_factory.mktemp("bc")
    BCTrainer(BCTrainConfig(data_dir=str(demos), out_dir=str(run), hidden_dim=64, n_blocks=1, batch_size=64, max_steps=40,
                            warmup_steps=5, eval_every=20, save_every=20, val_fraction=0.34, progress=False)).train()
    return run


@pytest.fixture(scope="module")
def rollouts(policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sv-data")
    config = VerifierDataConfig(out_dir=str(out), policy=str(policy_dir), tasks=(TASK,), episodes_per_task=3,
                                branch_prob=0.5, workers=1, progress=False)
    manifest = generate(config)
    assert manifest["complete"] and len(manifest["episodes"]) == 3
    again = generate(config)  # a rerun reuses finished episodes
    assert all(e["reused"] for e in again["episodes"])
    return out


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "random.pt"
    torch.save({"state_dict": ClipEncoder().model.state_dict()}, path)
    return path


def test_rollout_samples_are_labelled_and_replayed(rollouts, encoder_file):
    episodes = load_episodes(rollouts)
    samples = [s for e in episodes for s in e.meta["samples"]]
    assert samples and {s["label"] for s in samples} <= {0, 1}
    assert all(0 < s["n_keyframes"] <= len(e.meta["keyframes"]) for e in episodes for s in e.meta["samples"])
    from runtime.state_verifier import VerifierFeatureConfig

    with_memory = build_examples(episodes, VerifierFeatureConfig(), ClipEncoder(checkpoint=encoder_file), progress=False)
    without = build_examples(episodes, VerifierFeatureConfig(), None, progress=False)
    assert with_memory.valid.any() and not without.valid.any()
    # retrieval only sees keyframes written before the sample
    assert (with_memory.valid.sum(1) <= [s["n_keyframes"] for e in episodes for s in e.meta["samples"]]).all()
    train, val = split_by_episode(without, 0.34, 0)
    assert set(train.episode).isdisjoint(val.episode)


def test_training_resume_and_threshold(rollouts, encoder_file, tmp_path):
    config = VerifierTrainConfig(data_dir=str(rollouts), out_dir=str(tmp_path / "sv"), encoder=str(encoder_file),
                                 max_steps=20, eval_every=10, batch_size=32, hidden_dim=32, memory_dim=16,
                                 val_fraction=0.34, progress=False)
    VerifierTrainer(config).train()
    resumed = VerifierTrainer(VerifierTrainConfig(**{**config.__dict__, "max_steps": 30}), resume=True)
    assert resumed.step == 20
    resumed.train()
    records = [json.loads(line) for line in (tmp_path / "sv" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    sv = StateVerifier.load(tmp_path / "sv" / "best")
    assert 0.0 <= sv.threshold <= 1.0 and sv.use_memory
    with pytest.raises(ValueError, match="encoder"):
        VerifierTrainConfig(data_dir=str(rollouts), out_dir=str(tmp_path / "x"))
    with pytest.raises(RolloutDataError):
        load_episodes(tmp_path / "nothing")


def test_helm_eval_smoke(rollouts, policy_dir, tmp_path):
    sv_dir = tmp_path / "sv-nomem"
    VerifierTrainer(VerifierTrainConfig(data_dir=str(rollouts), out_dir=str(sv_dir), use_memory=False, max_steps=10,
                                        eval_every=10, batch_size=32, hidden_dim=32, val_fraction=0.34, progress=False)).train()
    config = HelmEvalConfig(out_dir=str(tmp_path / "eval"), policy=str(policy_dir), verifier_nomem=str(sv_dir / "best"),
                            rows=("base", "helm_nomem"), protocols=("long_horizon", "recovery"), tasks=(TASK,),
                            episodes=1, seeds=(0,), workers=1, progress=False)
    summary = evaluate(config)
    for protocol in ("long_horizon", "recovery"):
        for row in ("base", "helm_nomem"):
            r = summary[protocol][row]
            assert r["episodes"] == 1 and 0.0 <= r["mean"] <= 1.0 and len(r["ci95"]) == 2
    assert (tmp_path / "eval" / "helm.md").exists() and (tmp_path / "eval" / "helm.png").exists()
    lines = (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 4
    evaluate(config)  # a rerun finds every episode done
    assert len((tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()) == 4


def test_paired_differences_match_initial_states(tmp_path):
    def episode(row, init, success, protocol="long_horizon"):
        return {"row": row, "protocol": protocol, "seed": 0, "task_id": TASK, "initial_state": init, "success": success}

    config = HelmEvalConfig(out_dir=str(tmp_path), rows=("base", "helm"), protocols=("long_horizon", "recovery"))
    # HELM wins initial state 1, ties 0 and 2; state 3 has no HELM episode and is left out.
    episodes = [episode("base", i, s) for i, s in enumerate((True, False, False, True))]
    episodes += [episode("helm", i, s) for i, s in enumerate((True, True, False))]
    paired = paired_differences(config, episodes)
    d = paired["long_horizon"]["helm_minus_base"]
    assert d["episodes"] == 3 and d["mean"] == pytest.approx(1 / 3) and d["ci95"][0] < d["mean"] < d["ci95"][1]
    assert "recovery" not in paired
