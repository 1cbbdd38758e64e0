from dataclasses import dataclass, field
from typing import Literal

import pytest

from runtime.config import ConfigError, load_config


@dataclass
class Inner:
    rate_hz: float = 10.0

    def __post_init__(self):
        if self.rate_hz <= 0:
            raise ValueError(f"Inner.rate_hz must be > 0, got {self.rate_hz}")


@dataclass
class Outer:
    name: str = "x"
    size: tuple[int, int] = (2, 3)
    mode: Literal["sim", "real"] = "sim"
    inner: Inner = field(default_factory=Inner)
    limit: float | None = None


def test_builds_nested_dataclass_with_int_to_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\nsize: [4, 5]\ninner: {rate_hz: 30}\n")
    cfg = load_config(Outer, p)
    assert cfg == Outer(name="a", size=(4, 5), inner=Inner(30.0))
    assert isinstance(cfg.inner.rate_hz, float)


@dataclass
class Needs:
    rate_hz: float

    def __post_init__(self):
        if self.rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {self.rate_hz}")


def test_missing_fields_and_field_messages_get_the_path():
    with pytest.raises(ConfigError, match=r"<dict>: Needs: missing field\(s\) \['rate_hz'\]"):
        load_config(Needs, {})
    with pytest.raises(ConfigError, match=r"cfg: root.rate_hz must be > 0, got -1"):
        load_config(Needs, {"rate_hz": -1}, root="root", origin="cfg")


def test_dotted_overrides():
    assert load_config(Outer, {}, {"inner.rate_hz": 5.0}).inner.rate_hz == 5.0


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"nme": "a"}, "Outer: unknown field(s) ['nme']"),
        ({"size": [1]}, "Outer.size must have 2 elements"),
        ({"mode": "mars"}, "Outer.mode must be one of"),
        ({"inner": {"rate_hz": "fast"}}, "Outer.inner.rate_hz must be a number, got 'fast'"),
        ({"inner": {"rate_hz": -1}}, "Inner.rate_hz must be > 0, got -1"),
        ({"limit": "none"}, "Outer.limit must be a number, got 'none'"),
        ({"name": True}, "Outer.name must be a str"),
    ],
)
def test_errors_name_field_and_value(data, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, data)
    assert fragment in str(exc.value)


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Outer, tmp_path / "missing.yaml")


@dataclass
class WithOptionalNested:
    inner: Inner | None = None


def test_optional_nested_dataclass_error_names_the_inner_field():
    assert load_config(WithOptionalNested, {"inner": None}) == WithOptionalNested(None)
    assert load_config(WithOptionalNested, {"inner": {"rate_hz": 5}}) == WithOptionalNested(Inner(5.0))
    with pytest.raises(ConfigError, match=r"rate_hz must be > 0"):
        load_config(WithOptionalNested, {"inner": {"rate_hz": -1}})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['speed'\]"):
        load_config(WithOptionalNested, {"inner": {"speed": 1}})
