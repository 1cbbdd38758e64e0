"""The `$(name arg ...)` substitution syntax of ROS 2 launch files, for the supported subset.

ROS 2 launch frontends expand substitutions inside string attributes. helmstack's launcher
supports `$(var NAME [DEFAULT])`, `$(env NAME [DEFAULT])`, `$(find-pkg-share PKG)` and
`$(dirname)` (the launch file's directory); anything else, `$(eval ...)` included, is
rejected when the string is parsed.

Parsing is separate from evaluation so that a whole launch file, including branches that
`if`/`unless` switch off, is checked for unsupported substitutions before anything runs.
The syntax follows the ROS 2 launch grammar: arguments are separated by single spaces,
may be quoted with '...' or "..." and may nest substitutions; a backslash makes the next
character literal (so `\\$(` is text, not a substitution).
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runtime.launcher.packages import PackageNotFoundError, find_package_share


class SubstitutionError(ValueError):
    """A string has a malformed or unsupported substitution, or one that cannot be resolved."""


@dataclass(frozen=True)
class Substitution:
    """One `$(name args...)` occurrence; each argument is itself a template."""

    name: str
    args: tuple[tuple[str | Substitution, ...], ...]


Template = tuple[str | Substitution, ...]

# name -> (fewest, most) arguments, as ROS 2 launch accepts them.
SUPPORTED: dict[str, tuple[int, int]] = {
    "var": (1, 2),
    "env": (1, 2),
    "find-pkg-share": (1, 1),
    "dirname": (0, 0),
}
_SUPPORTED_TEXT = ", ".join(f"$({name})" for name in SUPPORTED)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass
class SubstitutionContext:
    """What substitutions are resolved against."""

    variables: Mapping[str, str]
    launch_file_dir: Path
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)


def parse_template(text: str) -> Template:
    """Split `text` into literal text and substitutions; raise SubstitutionError if malformed."""
    return _Parser(text).parse()


def has_substitutions(template: Template) -> bool:
    """Whether `template` holds at least one substitution (ROS 2 then types the result as YAML)."""
    return any(isinstance(part, Substitution) for part in template)


def evaluate(template: Template, context: SubstitutionContext) -> str:
    """Resolve every substitution in `template` and join the result."""
    return "".join(part if isinstance(part, str) else _perform(part, context) for part in template)


def evaluate_command_line(template: Template, context: SubstitutionContext) -> list[str]:
    """Resolve `template` and split it into arguments, the way ros2 launch splits `args`.

    Only the literal text is split (with shell rules); a substituted value is never split,
    even if it contains spaces, and joins the text it touches into one argument.
    """
    args: list[str] = []
    current: str | None = None  # the argument being assembled, if any
    for part in template:
        if isinstance(part, Substitution):
            current = (current or "") + _perform(part, context)
            continue
        try:
            tokens = shlex.split(part)
        except ValueError as exc:
            raise SubstitutionError(f"cannot split {part!r} into arguments: {exc}") from exc
        if current is not None and (not tokens or part[0].isspace()):
            args.append(current)
            current = None
        if not tokens:
            continue
        current = (current or "") + tokens[0]
        if len(tokens) > 1:
            args.append(current)
            args.extend(tokens[1:-1])
            current = tokens[-1]
        if part[-1].isspace():
            args.append(current)
            current = None
    if current is not None:
        args.append(current)
    return args


def _perform(sub: Substitution, context: SubstitutionContext) -> str:
    args = [evaluate(arg, context) for arg in sub.args]
    if sub.name == "var":
        if args[0] in context.variables:
            return context.variables[args[0]]
        if len(args) == 2:
            return args[1]
        known = ", ".join(sorted(context.variables)) or "none"
        raise SubstitutionError(
            f"undefined launch argument in $(var {args[0]}); declare it with 'arg' or 'let' (defined: {known})"
        )
    if sub.name == "env":
        if args[0] in context.environ:
            return context.environ[args[0]]
        if len(args) == 2:
            return args[1]
        raise SubstitutionError(f"environment variable '{args[0]}' is not set and $(env {args[0]}) has no default")
    if sub.name == "find-pkg-share":
        try:
            return str(find_package_share(args[0]))
        except PackageNotFoundError as exc:
            raise SubstitutionError(str(exc)) from exc
    # parse_template admits only SUPPORTED names, so this is $(dirname).
    return str(context.launch_file_dir)


class _Parser:
    """Recursive-descent parser over one string; `pos` is the next character to read."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> Template:
        parts: list[str | Substitution] = []
        literal: list[str] = []
        while self.pos < len(self.text):
            if self.text.startswith("$(", self.pos):
                _flush(literal, parts)
                parts.append(self._substitution())
            else:
                literal.append(self._char())
        _flush(literal, parts)
        return tuple(parts)

    def _char(self) -> str:
        """Read one literal character, honouring a backslash escape."""
        char = self.text[self.pos]
        if char == "\\" and self.pos + 1 < len(self.text):
            self.pos += 2
            return self.text[self.pos - 1]
        self.pos += 1
        return char

    def _error(self, message: str) -> SubstitutionError:
        return SubstitutionError(f"{message} in {self.text!r} (column {self.pos + 1})")

    def _substitution(self) -> Substitution:
        self.pos += 2  # "$("
        match = _IDENTIFIER.match(self.text, self.pos)
        if match is None:
            raise self._error("expected a substitution name after '$('")
        name = match.group()
        self.pos = match.end()
        args: list[Template] = []
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1
            args.append(self._argument(name))
        if self.pos >= len(self.text) or self.text[self.pos] != ")":
            raise self._error(f"unterminated substitution '$({name}' (expected ')')")
        self.pos += 1
        _check_supported(name, len(args))
        return Substitution(name, tuple(args))

    def _argument(self, name: str) -> Template:
        if self.pos < len(self.text) and self.text[self.pos] in "'\"":
            return self._quoted_argument(name)
        parts: list[str | Substitution] = []
        literal: list[str] = []
        while self.pos < len(self.text) and self.text[self.pos] not in " )":
            char = self.text[self.pos]
            if self.text.startswith("$(", self.pos):
                _flush(literal, parts)
                parts.append(self._substitution())
            elif char in "('\"":
                raise self._error(f"unexpected {char!r} in the arguments of $({name}); escape it with a backslash")
            else:
                literal.append(self._char())
        _flush(literal, parts)
        if not parts:
            raise self._error(f"empty argument in $({name})")
        return tuple(parts)

    def _quoted_argument(self, name: str) -> Template:
        quote = self.text[self.pos]
        self.pos += 1
        parts: list[str | Substitution] = []
        literal: list[str] = []
        while self.pos < len(self.text) and self.text[self.pos] != quote:
            if self.text.startswith("$(", self.pos):
                _flush(literal, parts)
                parts.append(self._substitution())
            else:
                literal.append(self._char())
        if self.pos >= len(self.text):
            raise self._error(f"unterminated quoted argument in $({name})")
        self.pos += 1
        _flush(literal, parts)
        return tuple(parts)


def _flush(literal: list[str], parts: list[str | Substitution]) -> None:
    if literal:
        parts.append("".join(literal))
        literal.clear()


def _check_supported(name: str, n_args: int) -> None:
    if name == "eval":
        raise SubstitutionError(f"$(eval ...) is not supported (supported: {_SUPPORTED_TEXT})")
    if name not in SUPPORTED:
        raise SubstitutionError(f"unsupported substitution $({name} ...) (supported: {_SUPPORTED_TEXT})")
    fewest, most = SUPPORTED[name]
    if not fewest <= n_args <= most:
        expected = str(fewest) if fewest == most else f"{fewest} or {most}"
        raise SubstitutionError(f"$({name}) takes {expected} argument(s), got {n_args}")
