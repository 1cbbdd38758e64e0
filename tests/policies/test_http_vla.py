"""The HTTP policy adapter against a real policy server on 127.0.0.1 (OS-assigned port):
good replies become the right ActionChunk, the request carries a decodable PNG and the
instruction, and every bad reply or transport failure raises PolicyServerError."""
from __future__ import annotations

import base64
import io
import json
import socket

import numpy as np
import pytest
from PIL import Image

from policies.base import Observation
from policies.http_vla import HttpVlaConfig, HttpVlaPolicy, PolicyServerError, policy_from_env
from runtime.config import ConfigError, load_config
from sim.panda import HOME_Q, JOINT_NAMES
from sim.tasks.suite import get_task

TASK = get_task("pick_place_bowl")


@pytest.fixture
def server(json_server):
    return json_server


def _policy(srv, **kw) -> HttpVlaPolicy:
    return HttpVlaPolicy(HttpVlaConfig(url=f"http://127.0.0.1:{srv.server_address[1]}/act", **kw), control_hz=10.0)


def _observation() -> Observation:
    image = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return Observation(HOME_Q.copy(), 4.5, TASK, 1, world=None, images={"front": image})


def _reply(obj) -> tuple[int, bytes]:
    return 200, json.dumps(obj).encode()


def _targets(steps: int) -> np.ndarray:
    rows = np.repeat(HOME_Q[None, :], steps, axis=0)
    rows[:, 0] += 0.05 * np.arange(1, steps + 1)  # move the first arm joint only: fingers stay at their limit
    return rows


def test_good_reply_is_the_chunk_and_request_carries_png_and_instruction(server):
    targets = _targets(3)
    server.reply = _reply({"actions": targets.tolist(), "times_s": [0.1, 0.25, 0.4], "model": "ignored"})
    policy, obs = _policy(server), _observation()
    chunk = policy.select_action(obs)
    np.testing.assert_array_equal(chunk.positions, targets)
    np.testing.assert_array_equal(chunk.times_s, [0.1, 0.25, 0.4])

    request = server.requests[0]
    assert request["path"] == "/act"
    body = request["json"]
    assert body["instruction"] == TASK.instruction and body["subgoal"] == TASK.subgoals[1].name == "lift the red cube"
    assert body["subgoal_index"] == 1 and body["new_episode"] is True and body["action_space"] == "joint_positions"
    assert body["proprio"] == {"joint_names": list(JOINT_NAMES), "joint_positions": HOME_Q.tolist()}
    meta = body["image"]
    assert (meta["camera"], meta["format"], meta["width"], meta["height"]) == ("front", "png", 64, 48)
    decoded = Image.open(io.BytesIO(base64.b64decode(meta["data"])))
    assert decoded.format == "PNG" and decoded.size == (64, 48) and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), obs.images["front"])

    policy.select_action(obs)
    assert server.requests[1]["json"]["new_episode"] is False
    policy.reset()
    policy.select_action(obs)
    assert server.requests[2]["json"]["new_episode"] is True


def test_default_times_and_joint_deltas(server):
    deltas = np.zeros((4, 9))
    deltas[:, 1] = 0.02
    server.reply = _reply({"actions": deltas.tolist()})
    chunk = _policy(server, action_space="joint_deltas").select_action(_observation())
    expected = HOME_Q + np.cumsum(deltas, axis=0)
    np.testing.assert_allclose(chunk.positions, expected)
    np.testing.assert_allclose(chunk.times_s, [0.1, 0.2, 0.3, 0.4])  # (k + 1) / control_hz
    assert server.requests[0]["json"]["action_space"] == "joint_deltas"


GOOD = _targets(2).tolist()


@pytest.mark.parametrize("reply, message", [
    ((200, json.dumps({"actions": GOOD}).replace("0.05", "NaN", 1).encode()), "non-finite"),
    ((200, b'{"actions": [[1e999, 0, 0, 0, 0, 0, 0, 0, 0]]}'), "non-finite"),
    (_reply({"actions": [row[:8] for row in GOOD]}), r"shape \(T, 9\)"),
    (_reply({"actions": [GOOD[0], GOOD[1][:8]]}), "differ in length"),
    (_reply({"actions": GOOD[0]}), "list of lists"),
    (_reply({"actions": [[str(x) for x in GOOD[0]]]}), "non-number"),
    (_reply({"action": GOOD}), "required key 'actions'"),
    (_reply([GOOD]), "JSON object"),
    (_reply({"actions": [GOOD[0]] * 65}), r"1 <= T <= 64"),
    (_reply({"actions": GOOD, "times_s": [0.2, 0.1]}), "strictly increasing"),
    (_reply({"actions": GOOD, "times_s": [0.1]}), "list of 2 numbers"),
    (_reply({"actions": [[5.0] + GOOD[0][1:]]}), "panda_joint1 at step 0 is outside"),
    ((200, b"actions: nope"), "invalid JSON"),
    ((500, b'{"error": "out of memory"}'), "HTTP 500.*out of memory"),
])
def test_bad_replies_raise_policy_server_error(server, reply, message):
    server.reply = reply
    with pytest.raises(PolicyServerError, match=message):
        _policy(server).select_action(_observation())


def test_timeout_and_unreachable_raise_policy_server_error(server):
    server.reply, server.delay_s = _reply({"actions": GOOD}), 2.0
    with pytest.raises(PolicyServerError, match="did not answer within 0.3 s"):
        _policy(server, timeout_s=0.3).select_action(_observation())
    with socket.socket() as probe:  # a port that was free a moment ago and now has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = HttpVlaPolicy(HttpVlaConfig(url=f"http://127.0.0.1:{port}/act", timeout_s=1.0))
    with pytest.raises(PolicyServerError, match="unreachable"):
        policy.select_action(_observation())
    # The policy node and the harness treat RuntimeError as an internal error and hold.
    assert issubclass(PolicyServerError, RuntimeError)


def test_bad_observation_is_a_value_error(server):
    obs = _observation()
    obs.images = {"wrist": obs.images["front"]}
    with pytest.raises(ValueError, match="no 'front' image"):
        _policy(server).select_action(obs)
    assert server.requests == []


def test_config_is_validated_at_load_and_read_by_the_registry_factory(tmp_path, monkeypatch, server):
    with pytest.raises(ConfigError, match=r"HttpVlaConfig\.timeout_s"):
        load_config(HttpVlaConfig, {"url": "http://127.0.0.1:1/act", "timeout_s": -1})
    with pytest.raises(ConfigError, match=r"HttpVlaConfig\.action_space"):
        load_config(HttpVlaConfig, {"url": "http://127.0.0.1:1/act", "action_space": "ee_delta"})
    with pytest.raises(ConfigError, match=r"HttpVlaConfig\.url"):
        load_config(HttpVlaConfig, {"url": "127.0.0.1:1/act"})
    monkeypatch.delenv("HELMSTACK_HTTP_VLA_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="HELMSTACK_HTTP_VLA_CONFIG"):
        policy_from_env(20.0)
    path = tmp_path / "vla.yaml"
    path.write_text(f"url: http://127.0.0.1:{server.server_address[1]}/act\ntimeout_s: 0.5\n")
    monkeypatch.setenv("HELMSTACK_HTTP_VLA_CONFIG", str(path))
    policy = policy_from_env(20.0)
    assert policy.config.timeout_s == 0.5 and policy.control_hz == 20.0
