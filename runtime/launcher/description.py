"""Load a ROS 2 YAML launch file into the flat list of nodes it starts.

helmstack runs where the ROS 2 launch system is not installed, yet a robot starts the
same stack with `ros2 launch`. This module reads the same YAML launch files, restricted
to a documented subset, and refuses everything else with a LaunchFileError that names
the construct and where it is, so a file that loads here also means the same thing to
`ros2 launch`. The spelling follows the launch_yaml / launch_ros frontends:

    launch:
    - arg: {name: robot, default: "sim", description: "..."}
    - let: {name: rate, value: "$(var robot)_rate"}
    - node:
        pkg: helmstack
        exec: policy_node
        name: policy
        namespace: arm
        output: screen            # screen | log | both (default log)
        args: "--verbose"
        if: "$(var use_policy)"   # or unless:; conditions are strings
        param:
        - {name: rate_hz, value: 30}
        - {from: "$(find-pkg-share helmstack)/launch/params.yaml"}
        remap:
        - {from: cmd, to: /arm/cmd}
    - group:                      # a list of actions, or a mapping:
        scoped: true              #   {scoped, if, unless, children: [...]}
        if: "$(var sim)"
        children:
        - push-ros-namespace: {namespace: sim}   # push_ros_namespace also accepted
        - node: {...}

Substitutions: see runtime.launcher.substitutions. Attribute values must be YAML strings
(as launch_yaml requires), except a parameter `value`, which keeps its YAML type: `5` is
an int and `"5"` a string; a value containing a substitution is typed from its expanded
text with YAML rules, like ros2 launch does.

Loading runs two passes over the file: the first checks the structure of every action,
including those that `if`/`unless` switch off, and collects the declared arguments so an
unknown command-line argument is reported before anything else; the second evaluates.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime.launcher.substitutions import (
    SubstitutionContext,
    SubstitutionError,
    Template,
    evaluate,
    evaluate_command_line,
    has_substitutions,
    parse_template,
)

logger = logging.getLogger(__name__)

OUTPUTS = ("screen", "log", "both")
NODE_ATTRIBUTES = ("pkg", "exec", "name", "namespace", "output", "args", "param", "remap", "if", "unless")
_CONDITIONS = ("if", "unless")
_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAMESPACE = re.compile(r"/|(/[A-Za-z_][A-Za-z0-9_]*)+")

ParameterValue = bool | int | float | str | list[bool] | list[int] | list[float] | list[str]


class LaunchFileError(ValueError):
    """The launch file (or its arguments) is malformed or uses something outside the subset."""


class LaunchArgumentError(LaunchFileError):
    """A launch argument is malformed, unknown, or required but not given."""


@dataclass
class NodeAction:
    """One node to start, with every substitution resolved.

    `parameters` keeps the launch file's order (later entries override earlier ones): a
    dict holds consecutive inline parameters with their YAML types, a Path a parameter
    file. `namespace` is absolute, or None when neither the node nor an enclosing
    push-ros-namespace sets one.
    """

    pkg: str
    executable: str
    name: str | None = None
    namespace: str | None = None
    parameters: list[dict[str, ParameterValue] | Path] = field(default_factory=list)
    remappings: list[tuple[str, str]] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)
    output: str = "log"


@dataclass
class LaunchPlan:
    """The nodes a launch file starts, and the value of every argument it declared."""

    nodes: list[NodeAction]
    arguments: dict[str, str]


def parse_launch_arguments(argv: Sequence[str]) -> dict[str, str]:
    """Parse `name:=value` command-line tokens; anything else raises LaunchArgumentError."""
    arguments: dict[str, str] = {}
    for token in argv:
        name, separator, value = token.partition(":=")
        if not separator or not name.strip():
            raise LaunchArgumentError(f"launch arguments must look like name:=value, got {token!r}")
        arguments[name.strip()] = value
    return arguments


def load_launch_file(path: str | Path, launch_arguments: dict[str, str] | None = None) -> LaunchPlan:
    """Load `path` with `launch_arguments` (name -> value) and return what it would start."""
    source = str(path)
    actions = _read_launch_list(Path(path), source)
    return _Loader(source, Path(path).resolve().parent, dict(launch_arguments or {})).load(actions)


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader whose mappings remember the line they start on, for error messages."""


class _Mapping(dict):  # type: ignore[type-arg]
    line: int = 0


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> Any:
    data = _Mapping()
    data.line = node.start_mark.line + 1
    # Yield first so that recursive (anchored) structures resolve, as PyYAML's own does.
    yield data
    data.update(loader.construct_mapping(node))


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_launch_list(path: Path, source: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LaunchFileError(f"{source}: cannot read launch file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise LaunchFileError(f"{source}: launch file is not UTF-8 text: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise LaunchFileError(f"{where}: invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise LaunchFileError(f"{source}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict) or list(data) != ["launch"]:
        found = f"keys {', '.join(map(repr, data))}" if isinstance(data, dict) else _type_name(data)
        raise LaunchFileError(f"{source}: the top level must be a mapping with the single key 'launch:', got {found}")
    return data["launch"]


@dataclass
class _Scope:
    """Launch configurations and the pushed ROS namespace visible at one point of the file."""

    variables: dict[str, str]
    ros_namespace: str | None = None

    def child(self) -> _Scope:
        return _Scope(dict(self.variables), self.ros_namespace)


def _type_name(obj: Any) -> str:
    """A YAML-flavoured type name for messages ('mapping', not the loader's dict subclass)."""
    if obj is None:
        return "null"
    return "mapping" if isinstance(obj, dict) else type(obj).__name__


def _line_of(obj: Any) -> int | None:
    return getattr(obj, "line", None)


@dataclass(frozen=True)
class _At:
    """Where an action or attribute is: a path like `launch[3].param[1]` and a line number."""

    path: str
    line: int | None

    def __str__(self) -> str:
        return f"{self.path} (line {self.line})" if self.line else self.path

    def nested(self, suffix: str, obj: Any) -> _At:
        """The location of `obj`, found at `suffix` below this one."""
        return _At(self.path + suffix, _line_of(obj) or self.line)


def _prefix_namespace(base: str | None, namespace: str | None) -> str | None:
    """Combine namespaces like launch_ros: an absolute `namespace` ignores `base`."""
    if namespace is None:
        combined = base
    elif not base or namespace.startswith("/"):
        combined = namespace
    else:
        combined = ("" if base == "/" else base) + "/" + namespace
    if combined is None or combined == "/":
        return combined
    return combined.rstrip("/")


def _absolute(namespace: str) -> str:
    return namespace if namespace.startswith("/") else "/" + namespace


class _Loader:
    """Walks the action list; with `active` False it only checks, with True it evaluates."""

    def __init__(self, source: str, launch_file_dir: Path, cli_arguments: dict[str, str]) -> None:
        self.source = source
        self.launch_file_dir = launch_file_dir
        self.cli_arguments = cli_arguments
        self.declared: dict[str, None] = {}  # ordered set of every declared arg name
        self.nodes: list[NodeAction] = []
        self.arguments: dict[str, str] = {}
        self.handlers: dict[str, Callable[[Any, _At, _Scope, bool], None]] = {
            "arg": self._arg,
            "let": self._let,
            "node": self._node,
            "group": self._group,
            "push-ros-namespace": self._push_ros_namespace,
            "push_ros_namespace": self._push_ros_namespace,
        }

    def load(self, actions: Any) -> LaunchPlan:
        self._actions(actions, _At("launch", None), _Scope({}), active=False)
        unknown = [name for name in self.cli_arguments if name not in self.declared]
        if unknown:
            declared = ", ".join(self.declared) or "none"
            raise LaunchArgumentError(
                f"{self.source}: unknown launch argument(s) {', '.join(map(repr, unknown))} (declared: {declared})"
            )
        # As in ros2 launch, command-line values are visible from the start of the file.
        self._actions(actions, _At("launch", None), _Scope(dict(self.cli_arguments)), active=True)
        logger.debug("%s: %d node(s), arguments %s", self.source, len(self.nodes), self.arguments)
        return LaunchPlan(nodes=self.nodes, arguments=self.arguments)

    # -- errors and attribute access -------------------------------------------------

    def _error(self, at: _At, message: str, cls: type[LaunchFileError] = LaunchFileError) -> LaunchFileError:
        return cls(f"{self.source}: {at}: {message}")

    def _check_keys(self, body: Any, at: _At, kind: str, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise self._error(at, f"'{kind}' must be a mapping of attributes, got {_type_name(body)}")
        for key in body:
            if key not in allowed:
                raise self._error(at, f"unsupported attribute {key!r} in {kind} (supported: {', '.join(allowed)})")
        return body

    def _template(self, body: dict[str, Any], key: str, at: _At, kind: str, required: bool = False) -> Template | None:
        """Type-check and parse one string attribute; None when absent and optional."""
        if key not in body:
            if required:
                raise self._error(at, f"{kind} is missing the required attribute '{key}'")
            return None
        value = body[key]
        if not isinstance(value, str):
            raise self._error(
                at,
                f"attribute '{key}' of {kind} must be a string, got {_type_name(value)} {value!r} "
                "(quote it: ros2 launch accepts only strings here)",
            )
        try:
            return parse_template(value)
        except SubstitutionError as exc:
            raise self._error(at, f"attribute '{key}' of {kind}: {exc}") from exc

    def _evaluate(self, template: Template, at: _At, scope: _Scope) -> str:
        try:
            return evaluate(template, self._context(scope))
        except SubstitutionError as exc:
            raise self._error(at, str(exc)) from exc

    def _text(
        self, body: dict[str, Any], key: str, at: _At, kind: str, scope: _Scope, active: bool, required: bool = False
    ) -> str | None:
        """Check one string attribute; when `active`, return it with substitutions resolved."""
        template = self._template(body, key, at, kind, required)
        if template is None or not active:
            return None
        return self._evaluate(template, at, scope)

    def _context(self, scope: _Scope) -> SubstitutionContext:
        return SubstitutionContext(variables=scope.variables, launch_file_dir=self.launch_file_dir)

    def _enabled(self, body: dict[str, Any], at: _At, kind: str, scope: _Scope, active: bool) -> bool:
        """Check `if`/`unless`; return whether the action runs (always False when inactive)."""
        if "if" in body and "unless" in body:
            raise self._error(at, f"'if' and 'unless' cannot both be set on {kind}")
        if_value = self._text(body, "if", at, kind, scope, active)
        unless_value = self._text(body, "unless", at, kind, scope, active)
        if not active:
            return False
        if if_value is not None:
            return self._truth(if_value, "if", at)
        if unless_value is not None:
            return not self._truth(unless_value, "unless", at)
        return True

    def _truth(self, value: str, key: str, at: _At) -> bool:
        # The values ros2 launch accepts, case-insensitively and ignoring surrounding space.
        normalized = value.strip().lower()
        if normalized in ("true", "1"):
            return True
        if normalized in ("false", "0"):
            return False
        raise self._error(at, f"condition '{key}' evaluated to {value!r}; expected true, false, 1 or 0")

    # -- actions -------------------------------------------------------------------

    def _actions(self, items: Any, at: _At, scope: _Scope, active: bool) -> None:
        if not isinstance(items, list):
            raise self._error(at, f"'{at.path}' must be a list of actions, got {_type_name(items)}")
        for index, item in enumerate(items):
            item_at = at.nested(f"[{index}]", item)
            if not isinstance(item, dict) or len(item) != 1:
                raise self._error(
                    item_at,
                    "each action must be a mapping with exactly one key, the action type (e.g. '- node: {...}')",
                )
            kind, body = next(iter(item.items()))
            handler = self.handlers.get(kind)
            if handler is None:
                supported = ", ".join(self.handlers)
                raise self._error(item_at, f"unsupported action {kind!r} (supported: {supported})")
            handler(body, item_at, scope, active)

    def _arg(self, body: Any, at: _At, scope: _Scope, active: bool) -> None:
        body = self._check_keys(body, at, "arg", ("name", "default", "description", *_CONDITIONS))
        name_template = self._template(body, "name", at, "arg", required=True)
        if name_template is None or has_substitutions(name_template) or not name_template:
            raise self._error(at, "arg 'name' must be a non-empty plain string")
        name = "".join(str(part) for part in name_template)
        self.declared[name] = None
        self._template(body, "description", at, "arg")
        enabled = self._enabled(body, at, "arg", scope, active)
        default = self._text(body, "default", at, "arg", scope, enabled)
        if not enabled:
            return
        # An earlier value (command line or `let`) wins over the default, as in ros2 launch.
        if name not in scope.variables:
            if default is None:
                raise self._error(
                    at,
                    f"launch argument '{name}' has no default and no value was given (pass {name}:=VALUE)",
                    LaunchArgumentError,
                )
            scope.variables[name] = default
        self.arguments[name] = scope.variables[name]

    def _let(self, body: Any, at: _At, scope: _Scope, active: bool) -> None:
        body = self._check_keys(body, at, "let", ("name", "value", *_CONDITIONS))
        enabled = self._enabled(body, at, "let", scope, active)
        name = self._text(body, "name", at, "let", scope, enabled, required=True)
        value = self._text(body, "value", at, "let", scope, enabled, required=True)
        if enabled and name is not None and value is not None:
            if not name:
                raise self._error(at, "let 'name' must not be empty")
            scope.variables[name] = value

    def _push_ros_namespace(self, body: Any, at: _At, scope: _Scope, active: bool) -> None:
        kind = "push-ros-namespace"
        body = self._check_keys(body, at, kind, ("namespace", *_CONDITIONS))
        enabled = self._enabled(body, at, kind, scope, active)
        pushed = self._text(body, "namespace", at, kind, scope, enabled, required=True)
        if enabled and pushed is not None:
            combined = _prefix_namespace(scope.ros_namespace, pushed) or ""
            scope.ros_namespace = self._valid_namespace(_absolute(combined), at)

    def _group(self, body: Any, at: _At, scope: _Scope, active: bool) -> None:
        if isinstance(body, list):
            # The short form from the ROS 2 docs: `- group: [actions...]`, scoped.
            self._actions(body, at.nested(".group", body), scope.child(), active)
            return
        if not isinstance(body, dict):
            raise self._error(at, "'group' must be a list of actions or a mapping with 'children'")
        body = self._check_keys(body, at, "group", ("scoped", "children", *_CONDITIONS))
        scoped = body.get("scoped", True)
        if not isinstance(scoped, bool):
            raise self._error(at, f"group 'scoped' must be true or false (unquoted), got {scoped!r}")
        if "children" not in body:
            raise self._error(at, "group is missing the required attribute 'children'")
        enabled = self._enabled(body, at, "group", scope, active)
        # An unscoped group shares its parent's scope: its lets and namespace stay visible after it.
        children = body["children"]
        self._actions(children, at.nested(".children", children), scope.child() if scoped else scope, enabled)

    def _node(self, body: Any, at: _At, scope: _Scope, active: bool) -> None:
        body = self._check_keys(body, at, "node", NODE_ATTRIBUTES)
        enabled = self._enabled(body, at, "node", scope, active)
        text = {
            key: self._text(body, key, at, "node", scope, enabled, required=key in ("pkg", "exec"))
            for key in ("pkg", "exec", "name", "namespace", "output")
        }
        args_template = self._template(body, "args", at, "node")
        parameters = self._parameters(body, at, scope, enabled)
        remappings = self._remappings(body, at, scope, enabled)
        pkg, executable = text["pkg"], text["exec"]
        if not enabled or pkg is None or executable is None:
            return
        if not pkg or not executable:
            raise self._error(at, "node 'pkg' and 'exec' must not be empty")
        arguments: list[str] = []
        if args_template is not None:
            try:
                arguments = evaluate_command_line(args_template, self._context(scope))
            except SubstitutionError as exc:
                raise self._error(at, f"attribute 'args' of node: {exc}") from exc
        name = text["name"]
        if name is not None and not _NODE_NAME.fullmatch(name):
            raise self._error(
                at,
                f"invalid node name {name!r}: use letters, digits and underscores, not starting with a digit",
            )
        namespace = _prefix_namespace(scope.ros_namespace, text["namespace"])
        if namespace is not None:
            namespace = self._valid_namespace(_absolute(namespace), at)
        output = "log" if text["output"] is None else text["output"]
        if output not in OUTPUTS:
            raise self._error(at, f"unsupported node output {output!r} (supported: {', '.join(OUTPUTS)})")
        self.nodes.append(NodeAction(
            pkg=pkg,
            executable=executable,
            name=name,
            namespace=namespace,
            parameters=parameters,
            remappings=remappings,
            arguments=arguments,
            output=output,
        ))

    def _valid_namespace(self, namespace: str, at: _At) -> str:
        if not _NAMESPACE.fullmatch(namespace):
            raise self._error(
                at,
                f"invalid namespace {namespace!r}: use '/'-separated tokens of letters, digits and "
                "underscores, none starting with a digit",
            )
        return namespace

    # -- node parameters and remappings --------------------------------------------------

    def _entries(self, body: dict[str, Any], key: str, at: _At, shape: str) -> list[Any]:
        if key not in body:
            return []
        entries = body[key]
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise self._error(at, f"'{key}' of node must be a list of mappings ({shape})")
        return entries

    def _parameters(
        self, body: dict[str, Any], at: _At, scope: _Scope, active: bool
    ) -> list[dict[str, ParameterValue] | Path]:
        result: list[dict[str, ParameterValue] | Path] = []
        entries = self._entries(body, "param", at, "{name: ..., value: ...} or {from: <params file>}")
        for index, entry in enumerate(entries):
            entry_at = at.nested(f".param[{index}]", entry)
            self._check_keys(entry, entry_at, "param", ("name", "value", "from"))
            if "from" in entry:
                if "name" in entry or "value" in entry:
                    raise self._error(entry_at, "param 'from' cannot be combined with 'name' or 'value'")
                file_text = self._text(entry, "from", entry_at, "param", scope, active)
                if file_text is not None:
                    result.append(self._params_file(file_text, entry_at))
                continue
            name = self._text(entry, "name", entry_at, "param", scope, active, required=True)
            if "value" not in entry:
                raise self._error(
                    entry_at,
                    "param needs a 'value' (nested params are not supported; use {from: <params file>})",
                )
            value = self._parameter_value(entry["value"], entry_at, scope, active)
            if name is None or value is None:
                continue
            if not name:
                raise self._error(entry_at, "param 'name' must not be empty")
            # Consecutive inline parameters share one dict; the order against files is kept.
            if result and isinstance(result[-1], dict):
                result[-1][name] = value
            else:
                result.append({name: value})
        return result

    def _params_file(self, text: str, at: _At) -> Path:
        # Relative paths resolve against the working directory, as in ros2 launch;
        # $(dirname) or $(find-pkg-share ...) make them independent of it.
        file = Path(text).expanduser()
        file = file if file.is_absolute() else Path.cwd() / file
        if not file.is_file():
            raise self._error(at, f"parameter file not found: {file}")
        return file

    def _parameter_value(self, raw: Any, at: _At, scope: _Scope, active: bool) -> ParameterValue | None:
        """Check a param `value`; when `active`, return it typed as ros2 launch would."""
        if isinstance(raw, list):
            items = [self._scalar(item, at, scope, active) for item in raw]
            # An empty list is refused in the checking pass too: it never becomes valid.
            return self._uniform(items, at) if active or not raw else None
        value = self._scalar(raw, at, scope, active, allow_list=True)
        return self._uniform(value, at) if isinstance(value, list) else value

    def _uniform(self, items: list[Any], at: _At) -> ParameterValue:
        if not items:
            raise self._error(at, "param 'value' must not be an empty list (its type would be unknown)")
        types = sorted({_type_name(item) for item in items})
        if len(types) != 1 or isinstance(items[0], list):
            raise self._error(at, f"param 'value' list must hold scalars of one type, got {', '.join(types)}")
        return items

    def _scalar(self, raw: Any, at: _At, scope: _Scope, active: bool, allow_list: bool = False) -> Any:
        """Check one scalar `value`; when `active`, return it typed (None when inactive)."""
        if isinstance(raw, (bool, int, float)):
            return raw
        if not isinstance(raw, str):
            raise self._error(
                at,
                f"param 'value' must be a scalar or a list of scalars, got {_type_name(raw)} {raw!r}",
            )
        try:
            template = parse_template(raw)
        except SubstitutionError as exc:
            raise self._error(at, f"param 'value': {exc}") from exc
        if not active:
            return None
        text = self._evaluate(template, at, scope)
        if not has_substitutions(template) or not text:
            return text
        # A substituted value is typed by YAML rules ("3" -> 3, "true" -> True, "'3'" -> "3").
        try:
            typed = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise self._error(at, f"param 'value' {text!r} is not valid YAML: {exc}") from exc
        if isinstance(typed, (bool, int, float, str)) or (allow_list and isinstance(typed, list)):
            return typed
        raise self._error(
            at,
            f"param 'value' {text!r} evaluates to {_type_name(typed)}; expected a scalar or a list of scalars",
        )

    def _remappings(self, body: dict[str, Any], at: _At, scope: _Scope, active: bool) -> list[tuple[str, str]]:
        result: list[tuple[str, str]] = []
        for index, entry in enumerate(self._entries(body, "remap", at, "{from: ..., to: ...}")):
            entry_at = at.nested(f".remap[{index}]", entry)
            self._check_keys(entry, entry_at, "remap", ("from", "to"))
            source = self._text(entry, "from", entry_at, "remap", scope, active, required=True)
            target = self._text(entry, "to", entry_at, "remap", scope, active, required=True)
            if source is not None and target is not None:
                result.append((source, target))
        return result
