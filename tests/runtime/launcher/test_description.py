"""Loading YAML launch files: the supported subset, and a precise error for everything else."""
import sys
from pathlib import Path

import pytest

from runtime.launcher import (
    LaunchArgumentError,
    LaunchFileError,
    NodeAction,
    PackageNotFoundError,
    find_package_share,
    load_launch_file,
    parse_launch_arguments,
)
from runtime.launcher.packages import SOURCE_CHECKOUT

FIXTURES = Path(__file__).parent / "fixtures"
ROBOT = FIXTURES / "robot.launch.yaml"
PARAMS = FIXTURES / "robot_params.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("HELMSTACK_TEST_NO_BRIDGE", raising=False)


def write(tmp_path, text, name="x.launch.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_representative_file_with_defaults():
    plan = load_launch_file(ROBOT, {})
    assert plan.arguments == {"robot": "sim", "use_policy": "true", "rate_hz": "50"}
    assert plan.nodes == [
        NodeAction(
            pkg="helmstack", executable="safety_node", name="safety", namespace=None,
            parameters=[PARAMS, {"rate_hz": 50, "frame": "base", "limits": [1.5, 2.5]}],
            remappings=[("cmd_in", "/sim/joint_cmd")], arguments=[], output="screen",
        ),
        NodeAction(
            pkg="helmstack", executable="policy_node", name="policy", namespace="/sim",
            parameters=[{"deterministic": True}], remappings=[],
            arguments=["--task", "reach", "--tag", "scoped"], output="log",
        ),
        NodeAction(
            pkg="helmstack", executable="harness_node", name="harness", namespace="/sim/arm",
            parameters=[], remappings=[], arguments=[], output="log",
        ),
        NodeAction(
            pkg="helmstack", executable="sim_bridge_node", name="sim_bridge", namespace="/bridge",
            parameters=[], remappings=[("joint_cmd", "/sim/joint_cmd")], arguments=[], output="log",
        ),
    ]


def test_overrides_switch_conditions_and_namespaces(monkeypatch):
    monkeypatch.setenv("HELMSTACK_TEST_NO_BRIDGE", "True")
    plan = load_launch_file(ROBOT, parse_launch_arguments(["robot:=real", "use_policy:=0", "rate_hz:=12.5"]))
    assert plan.arguments == {"robot": "real", "use_policy": "0", "rate_hz": "12.5"}
    assert [(n.executable, n.namespace) for n in plan.nodes] == [("safety_node", None)]
    assert plan.nodes[0].parameters[1]["rate_hz"] == 12.5
    assert plan.nodes[0].remappings == [("cmd_in", "/real/joint_cmd")]


def test_unless_branch_and_unnamed_node_in_nested_group(tmp_path):
    path = write(tmp_path, """
launch:
- arg: {name: enabled, default: "false"}
- group:
  - push-ros-namespace: {namespace: a}
  - group:
      scoped: false
      children:
      - push-ros-namespace: {namespace: b}
  - node: {pkg: p, exec: e, unless: "$(var enabled)"}
- node: {pkg: p, exec: top}
""")
    plan = load_launch_file(path, {})
    # The unscoped group's namespace leaks into its parent group, not past the scoped one.
    assert [(n.executable, n.name, n.namespace) for n in plan.nodes] == [("e", None, "/a/b"), ("top", None, None)]


def test_let_and_command_line_win_over_default(tmp_path):
    path = write(tmp_path, """
launch:
- let: {name: mode, value: "from_let"}
- arg: {name: mode, default: "from_default"}
- arg: {name: other, default: "$(var mode)-x"}
""")
    assert load_launch_file(path, {}).arguments == {"mode": "from_let", "other": "from_let-x"}
    assert load_launch_file(path, {"other": "cli"}).arguments == {"mode": "from_let", "other": "cli"}


def test_parameter_typing_follows_ros2_launch(tmp_path):
    path = write(tmp_path, """
launch:
- arg: {name: n, default: "3"}
- arg: {name: s, default: "'3'"}
- node:
    pkg: p
    exec: e
    param:
    - {name: int_sub, value: "$(var n)"}
    - {name: str_quoted_sub, value: "$(var s)"}
    - {name: plain_str, value: "3"}
    - {name: yaml_int, value: 3}
    - {name: yaml_float, value: 3.0}
    - {name: bool_sub, value: "$(var b true)"}
    - {name: list_sub, value: "[$(var n), 4]"}
    - {name: list_mixed_subs, value: ["$(var n)", 5]}
    - {name: text_sub, value: "id_$(var n)"}
""")
    (params,) = load_launch_file(path, {}).nodes[0].parameters
    assert params == {
        "int_sub": 3, "str_quoted_sub": "3", "plain_str": "3", "yaml_int": 3, "yaml_float": 3.0,
        "bool_sub": True, "list_sub": [3, 4], "list_mixed_subs": [3, 5], "text_sub": "id_3",
    }
    assert type(params["yaml_float"]) is float and type(params["bool_sub"]) is bool


def test_find_pkg_share_and_substitution_syntax(tmp_path, monkeypatch):
    prefix = tmp_path / "install"
    (prefix / "share" / "demo").mkdir(parents=True)
    marker_only = tmp_path / "other"
    (marker_only / "share/ament_index/resource_index/packages").mkdir(parents=True)
    (marker_only / "share/ament_index/resource_index/packages/marked").write_text("")
    monkeypatch.setenv("AMENT_PREFIX_PATH", f"{prefix}:{marker_only}")
    monkeypatch.setenv("HELMSTACK_TEST_VAR", "from env")
    path = write(tmp_path, r"""
launch:
- arg: {name: pkg, default: demo}
- node:
    pkg: p
    exec: e
    args: >-
      $(find-pkg-share $(var pkg))/cfg
      $(env HELMSTACK_TEST_VAR) $(env HELMSTACK_TEST_UNSET "fall back")
      \$(var pkg) 'two words' x$(var pkg)y $(find-pkg-share marked)
""")
    assert load_launch_file(path, {}).nodes[0].arguments == [
        f"{prefix}/share/demo/cfg", "from env", "fall back", "$(var", "pkg)", "two words", "xdemoy",
        f"{marker_only}/share/marked",
    ]


def test_helmstack_share_falls_back_to_source_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("AMENT_PREFIX_PATH", "")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert find_package_share("helmstack") == SOURCE_CHECKOUT
    assert (SOURCE_CHECKOUT / "package.xml").is_file()
    with pytest.raises(PackageNotFoundError, match="package 'nope' not found"):
        find_package_share("nope")


def test_parse_launch_arguments():
    assert parse_launch_arguments(["a:=1", "b:=", "c:=x:=y"]) == {"a": "1", "b": "", "c": "x:=y"}
    for bad in (["a=1"], [":=1"], ["--flag"]):
        with pytest.raises(LaunchArgumentError, match="name:=value"):
            parse_launch_arguments(bad)


ERROR_CASES = {
    "unknown action": (
        "launch:\n- arg: {name: a, default: '1'}\n- executable: {cmd: ls}\n", {},
        r"x.launch.yaml: launch\[1\] \(line 3\): unsupported action 'executable' "
        r"\(supported: arg, let, node, group, push-ros-namespace, push_ros_namespace\)",
    ),
    "include": ("launch:\n- include: {file: other.yaml}\n", {}, r"launch\[0\].*unsupported action 'include'"),
    "unknown node attribute": (
        "launch:\n- node: {pkg: p, exec: e, respawn: 'true'}\n", {},
        r"launch\[0\].*unsupported attribute 'respawn' in node \(supported: pkg, exec, name,",
    ),
    "missing pkg": ("launch:\n- node: {exec: e}\n", {}, r"node is missing the required attribute 'pkg'"),
    "missing exec": ("launch:\n- node: {pkg: p}\n", {}, r"node is missing the required attribute 'exec'"),
    "bad condition": (
        "launch:\n- node: {pkg: p, exec: e, if: 'yes'}\n", {},
        r"condition 'if' evaluated to 'yes'; expected true, false, 1 or 0",
    ),
    "unquoted condition": ("launch:\n- node: {pkg: p, exec: e, if: true}\n", {}, r"'if' of node must be a string"),
    "undefined var": (
        "launch:\n- arg: {name: a, default: '1'}\n- node: {pkg: p, exec: '$(var x)'}\n", {},
        r"launch\[1\] \(line 3\): undefined launch argument in \$\(var x\).*defined: a",
    ),
    "scoped let invisible outside": (
        "launch:\n- group:\n  - let: {name: v, value: '1'}\n- node: {pkg: p, exec: '$(var v)'}\n", {},
        r"undefined launch argument in \$\(var v\)",
    ),
    "eval": ("launch:\n- node: {pkg: p, exec: e, name: '$(eval 1+1)'}\n", {}, r"\$\(eval \.\.\.\) is not supported"),
    "eval in a disabled branch": (
        "launch:\n- group: {if: 'false', children: [{node: {pkg: p, exec: '$(eval 1)'}}]}\n", {},
        r"launch\[0\]\.children\[0\].*\$\(eval \.\.\.\) is not supported",
    ),
    "other substitution": ("launch:\n- let: {name: a, value: '$(command ls)'}\n", {}, r"unsupported substitution \$\(command"),
    "unterminated substitution": ("launch:\n- let: {name: a, value: '$(var a'}\n", {}, r"unterminated substitution"),
    "unknown cli arg": (
        "launch:\n- arg: {name: robot, default: sim}\n- arg: {name: rate, default: '1'}\n", {"robt": "x"},
        r"unknown launch argument\(s\) 'robt' \(declared: robot, rate\)",
    ),
    "missing arg value": (
        "launch:\n- arg: {name: robot}\n", {},
        r"launch\[0\] \(line 2\): launch argument 'robot' has no default and no value was given \(pass robot:=VALUE\)",
    ),
    "yaml syntax error": ("launch:\n- node: {pkg: p\n- node: {}\n", {}, r"x.launch.yaml:3:\d+: invalid YAML"),
    "top level not launch": ("nodes:\n- node: {pkg: p, exec: e}\n", {}, r"single key 'launch:', got keys 'nodes'"),
    "top level list": ("- node: {pkg: p, exec: e}\n", {}, r"single key 'launch:', got list"),
    "launch not a list": ("launch:\n  node: {pkg: p, exec: e}\n", {}, r"'launch' must be a list of actions"),
    "two keys in one action": ("launch:\n- node: {pkg: p, exec: e}\n  arg: {name: a}\n", {}, r"exactly one key"),
    "if and unless": ("launch:\n- node: {pkg: p, exec: e, if: '1', unless: '0'}\n", {}, r"'if' and 'unless' cannot both"),
    "bad output": ("launch:\n- node: {pkg: p, exec: e, output: own_log}\n", {}, r"unsupported node output 'own_log'"),
    "bad node name": ("launch:\n- node: {pkg: p, exec: e, name: 'a/b'}\n", {}, r"invalid node name 'a/b'"),
    "bad namespace": ("launch:\n- push-ros-namespace: {namespace: '1x'}\n", {}, r"invalid namespace '/1x'"),
    "nested params": (
        "launch:\n- node: {pkg: p, exec: e, param: [{name: g, param: [{name: a, value: 1}]}]}\n", {},
        r"launch\[0\]\.param\[0\].*unsupported attribute 'param' in param",
    ),
    "param file missing": (
        "launch:\n- node: {pkg: p, exec: e, param: [{from: /nonexistent/p.yaml}]}\n", {},
        r"parameter file not found: /nonexistent/p.yaml",
    ),
    "param mixed list": (
        "launch:\n- node: {pkg: p, exec: e, param: [{name: a, value: [1, x]}]}\n", {},
        r"list must hold scalars of one type, got int, str",
    ),
    "remap without to": ("launch:\n- node: {pkg: p, exec: e, remap: [{from: a}]}\n", {}, r"remap is missing the required attribute 'to'"),
    "group scoped as string": (
        "launch:\n- group: {scoped: 'false', children: []}\n", {}, r"'scoped' must be true or false",
    ),
    "unknown package": (
        "launch:\n- let: {name: a, value: '$(find-pkg-share no_such_pkg_xyz)'}\n", {},
        r"package 'no_such_pkg_xyz' not found",
    ),
    "quote around substitution in args": (
        "launch:\n- node: {pkg: p, exec: e, args: \"'$(env HOME)'\"}\n", {}, r"cannot split .* No closing quotation",
    ),
    "unset env": ("launch:\n- let: {name: a, value: '$(env HELMSTACK_TEST_UNSET)'}\n", {}, r"'HELMSTACK_TEST_UNSET' is not set"),
}


@pytest.mark.parametrize("text, cli, message", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_name_the_problem_and_place(tmp_path, monkeypatch, text, cli, message):
    monkeypatch.delenv("HELMSTACK_TEST_UNSET", raising=False)
    with pytest.raises(LaunchFileError, match=message):
        load_launch_file(write(tmp_path, text), cli)


def test_unreadable_file_is_a_launch_file_error(tmp_path):
    with pytest.raises(LaunchFileError, match="missing.yaml: cannot read launch file"):
        load_launch_file(tmp_path / "missing.yaml", {})
