"""Tiny smoke run of the graph benchmark's in-process half (the DDS half is what the
graph tests exercise); the real run is `helmstack bench graph`."""
from pathlib import Path

from real.safety import SafetyConfig
from runtime.config import load_config
from runtime.nodes.bench_graph import _summary, measure_inprocess, measure_sim_throughput
from sim.backend import SimConfig

ROOT = Path(__file__).resolve().parents[3]


def test_inprocess_benchmark_smoke():
    config = load_config(SimConfig, ROOT / "launch/config/sim.yaml")
    safety = load_config(SafetyConfig, ROOT / "launch/config/panda_safety.yaml")
    sim = measure_sim_throughput(config, steps=2, seed=0)
    assert sim["control_steps_per_s"] > 0 and sim["steps"] == 2
    latencies = measure_inprocess(config, safety, samples=3, seed=0)
    summary = _summary(latencies, seed=0)
    assert summary["n"] == 3 and 0 < summary["p50_ms"] <= summary["p99_ms"]
