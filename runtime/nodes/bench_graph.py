"""`helmstack bench graph`: what the DDS graph costs over calling the same cores in one process.

DDS path: the real sim_bridge node runs in this process in lockstep mode (after each
tick it waits for the command that tick causes); safety, policy and harness run as their
own processes from the launch file; a task goal makes the harness forward the policy's
chunks. Latency = sim_bridge publishing a tick's sensors -> the safe command arriving
back at sim_bridge (policy -> harness -> safety: three process hops, four DDS hops).
In-process path: the same cores called in sequence on the same kind of tick (ground
truth -> WorldState -> policy -> safety filter -> backend command).
Also: simulator control steps per second with all sensors at their default rates.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.action import ActionClient
from rclpy.parameter import Parameter
from rich.progress import track

from real.safety import SafetyConfig, SafetyFilter
from runtime.config import load_config
from runtime.launcher import NodeProcessGroup, find_package_share, load_launch_file
from runtime.stats import percentile_ci
from sim.backend import PybulletRobot, SimConfig
from sim.world_state import WorldState

TASK = "bowl_then_stack"
LOCKSTEP_TIMEOUT_S = 0.15


def _summary(samples_s: list[float], seed: int) -> dict:
    ms = np.asarray(samples_s) * 1e3
    p50, p99 = percentile_ci(ms, 50, seed), percentile_ci(ms, 99, seed)
    return {"p50_ms": p50["value"], "p50_ci95_ms": p50["ci95"], "p99_ms": p99["value"], "p99_ci95_ms": p99["ci95"],
            "mean_ms": float(ms.mean()), "n": int(ms.size)}


def measure_inprocess(config: SimConfig, safety_cfg: SafetyConfig, samples: int, seed: int) -> list[float]:
    from policies.base import Observation
    from policies.scripted_expert import ScriptedExpertPolicy
    from sim.tasks.suite import get_task

    robot = PybulletRobot(config)
    policy = ScriptedExpertPolicy(config.control_hz)
    safety = SafetyFilter(safety_cfg)
    task = get_task(TASK)
    step = robot.reset(TASK, seed)
    policy.reset()
    latencies = []
    for _ in track(range(samples), description="in-process ticks", transient=True):
        t0 = time.perf_counter()
        poses, joints = step.world.object_poses, step.world.fixture_joints
        world = WorldState.from_observation(list(poses), list(poses.values()), list(joints), list(joints.values()),
                                            step.joint_positions, step.sim_time_s, policy.kinematics)
        chunk = policy.select_action(Observation(step.joint_positions, step.sim_time_s, task, 0, world))
        decision = safety.filter(robot.joint_names, chunk.positions, chunk.times_s, step.joint_positions)
        robot.command(decision.positions, decision.times_s)
        latencies.append(time.perf_counter() - t0)
        step = robot.step()
    robot.close()
    return latencies


def measure_sim_throughput(config: SimConfig, steps: int, seed: int) -> dict:
    robot = PybulletRobot(config)
    robot.reset(TASK, seed)
    t0 = time.perf_counter()
    for _ in track(range(steps), description="sim steps (all sensors)", transient=True):
        robot.step()
    elapsed = time.perf_counter() - t0
    robot.close()
    return {"control_steps_per_s": steps / elapsed, "physics_steps_per_s": steps * config.physics_hz / config.control_hz / elapsed,
            "real_time_factor": steps / config.control_hz / elapsed, "steps": steps}


def measure_dds(samples: int, seed: int, log_dir: Path) -> tuple[list[float], int]:
    from helmstack_interfaces.action import ExecuteTask
    from runtime.nodes.sim_bridge import SimBridge

    launch_file = find_package_share("helmstack") / "launch" / "helmstack.launch.yaml"
    plan = load_launch_file(launch_file, {"task": TASK, "seed": str(seed)})
    others = [n for n in plan.nodes if n.name != "sim_bridge"]
    bridge_params = next(n for n in plan.nodes if n.name == "sim_bridge").parameters
    rclpy.init()
    group = NodeProcessGroup(others, log_dir=log_dir)
    group.start()
    executor = MultiThreadedExecutor(num_threads=3)
    try:
        overrides = {k: v for p in bridge_params if isinstance(p, dict) for k, v in p.items()}
        # The policy is queried once per action chunk, so most ticks cause no command: they
        # wait out lockstep_timeout_s (kept short) and are not latency samples.
        overrides.update(lockstep=True, lockstep_timeout_s=LOCKSTEP_TIMEOUT_S, real_time_factor=0.0, seed=seed)
        bridge = SimBridge(parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        client_node = rclpy.create_node("bench_graph")
        executor.add_node(bridge)
        executor.add_node(client_node)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        client = ActionClient(client_node, ExecuteTask, "/harness/execute_task")
        if not client.wait_for_server(timeout_sec=90.0):
            raise RuntimeError(f"harness did not come up; node exits: {group.poll()}")
        deadline = time.monotonic() + 900.0
        last = 0
        sent, result, episode_seed = None, None, seed
        while len(bridge.command_latencies_s) < samples and time.monotonic() < deadline:
            if sent is not None and result is None and sent.done():
                result = sent.result().get_result_async()
            if sent is None or (result is not None and result.done()):
                # A finished task produces no more commands: run the next episode.
                sent, result = client.send_goal_async(ExecuteTask.Goal(task_id=TASK, seed=episode_seed)), None
                episode_seed += 1
            dead = group.poll()
            if dead:
                raise RuntimeError(f"node {dead[0][0]} exited with code {dead[0][1]} during the benchmark")
            time.sleep(0.2)
            if len(bridge.command_latencies_s) // 50 > last // 50:
                print(f"  dds samples: {len(bridge.command_latencies_s)}/{samples}", file=sys.stderr)
            last = len(bridge.command_latencies_s)
        latencies = list(bridge.command_latencies_s[:samples])
        timeouts = bridge.lockstep_timeouts
    finally:
        executor.shutdown()
        group.shutdown()
        rclpy.shutdown()
    # The first ticks include discovery and the goal's reset: not steady state.
    return (latencies[10:] if len(latencies) > 20 else latencies), timeouts


def main(args) -> int:
    share = find_package_share("helmstack")
    config = load_config(SimConfig, share / "launch" / "config" / "sim.yaml")
    safety_cfg = load_config(SafetyConfig, share / "launch" / "config" / "panda_safety.yaml")
    out = Path(args.out)
    print("measuring: simulator throughput, in-process cores, DDS graph", file=sys.stderr)
    sim = measure_sim_throughput(config, steps=min(args.samples, 200), seed=args.seed)
    inproc = measure_inprocess(config, safety_cfg, args.samples, args.seed)
    dds, timeouts = measure_dds(args.samples, args.seed, Path("runs") / "bench-graph-logs")
    d, i = _summary(dds, args.seed), _summary(inproc, args.seed)
    d["lockstep_ticks_without_command"] = timeouts
    result = {
        "dds": d,
        "inprocess": i,
        "ratio_p50": d["p50_ms"] / i["p50_ms"],
        "sim_steps_per_s": sim["control_steps_per_s"],
        "sim": sim,
        "config": {"task": TASK, "samples": args.samples, "sim": json.loads(json.dumps(config, default=lambda o: o.__dict__)),
                   "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
                   "latency": "sim_bridge publishes a tick -> safe command back at sim_bridge (lockstep); "
                              f"ticks without a command within {LOCKSTEP_TIMEOUT_S} s are not samples"},
        "seeds": [args.seed],
        "command": "helmstack bench graph " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"DDS p50 {d['p50_ms']:.2f} ms p99 {d['p99_ms']:.2f} ms | in-process p50 {i['p50_ms']:.2f} ms p99 {i['p99_ms']:.2f} ms | "
          f"ratio {result['ratio_p50']:.2f} | sim {sim['control_steps_per_s']:.1f} control steps/s -> {out}", file=sys.stderr)
    return 0
