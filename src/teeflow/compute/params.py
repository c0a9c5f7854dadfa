"""Declarative parameters of the computations: every value arrives as a string and is
converted and bounded here, before any data moves. Light: every role imports it."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from teeflow.core.errors import ParameterError

PARAM_TYPES = ("str", "int", "float", "bool", "list[str]")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Param:
    """One parameter of a computation. Values arrive as strings and are converted by ``parse``.

    ``low``/``high`` bound numbers (``low_open``/``high_open`` make a bound strict);
    ``choices`` restricts strings; ``check`` is a last, custom test returning an error message
    (or None) for a converted value.
    """

    name: str
    type: str
    required: bool = False
    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name!r}: unknown type {self.type!r}")

    def _fail(self, message: str) -> ParameterError:
        return ParameterError(f"parameter {self.name!r}: {message}")

    def _bounds_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self._num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self._num(self.high)}")
        return " and ".join(parts)

    def _num(self, v: float) -> str:
        return str(int(v)) if self.type == "int" else repr(float(v)).removesuffix(".0")

    def _in_bounds(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def parse(self, raw: Any) -> Any:
        """The converted value of a raw string; raises ParameterError naming the parameter."""
        if not isinstance(raw, str):
            raise self._fail(f"must be a string, got {type(raw).__name__}")
        text = raw.strip()
        value: Any
        if self.type == "str":
            if not text:
                raise self._fail("required" if self.required else "must not be empty")
            if self.choices is not None and text not in self.choices:
                raise self._fail(f"must be one of {', '.join(self.choices)}; got {text!r}")
            value = text
        elif self.type == "list[str]":
            items = [item.strip() for item in raw.split(",")]
            if any(not item for item in items):
                raise self._fail(
                    f"empty column name in {raw!r} (expected a comma-separated list of names)"
                )
            dupes = sorted({item for item in items if items.count(item) > 1})
            if dupes:
                raise self._fail(f"duplicate column(s) {dupes}")
            value = items
        elif self.type == "bool":
            if text.lower() in _TRUE:
                value = True
            elif text.lower() in _FALSE:
                value = False
            else:
                raise self._fail(f"not a boolean (true or false): {raw!r}")
        elif self.type == "int":
            try:
                value = int(text, 10)
            except ValueError:
                raise self._fail(f"not an integer: {raw!r}") from None
            if not self._in_bounds(value):
                if self.low is not None and self.high is not None and not (
                    self.low_open or self.high_open
                ):
                    limits = f"between {self._num(self.low)} and {self._num(self.high)}"
                else:
                    limits = f"an integer {self._bounds_text()}"
                raise self._fail(f"must be {limits}, got {value}")
        else:  # float
            try:
                value = float(text)
            except ValueError:
                raise self._fail(f"not a number: {raw!r}") from None
            if not math.isfinite(value) or not self._in_bounds(value):
                raise self._fail(f"must be a finite number {self._bounds_text()}, got {raw!r}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise self._fail(problem)
        return value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default": self.default,
            "help": self.help,
        }
        if self.low is not None:
            out["min"] = self.low
            out["min_exclusive"] = self.low_open
        if self.high is not None:
            out["max"] = self.high
            out["max_exclusive"] = self.high_open
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def param_text(name: str, value: Any, param: Param | None = None) -> str:
    """A caller's value (SDK, CLI) as the string a spec carries, checked for its shape: a
    list, tuple or one-dimensional array of names (``list[str]`` parameters) comma-joined,
    booleans ``true`` / ``false``, numbers in full precision; a string as it is. Raises
    ParameterError naming the parameter (never its value) for a shape it cannot take."""

    def fail(message: str) -> ParameterError:
        return ParameterError(f"parameter {name!r}: {message}")

    if isinstance(value, str):
        return value
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
        value = value.tolist()  # a numpy array, a pandas Index or Series of names
    if isinstance(value, (list, tuple)):
        if param is not None and param.type != "list[str]":
            raise fail(f"a list was given, but it takes a {param.type}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise fail(f"item {i} is a {type(item).__name__}, not a name (str)")
            if "," in item or not item.strip():
                raise fail(f"item {i} is empty or holds a comma (each item is one name)")
        if not value:
            raise fail("an empty list (leave the parameter out for its default)")
        return ",".join(value)
    if param is not None and param.type == "list[str]":
        raise fail(f"takes a list of names, got a {type(value).__name__}")
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's too
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise fail("not a finite number")
        return repr(number)
    raise fail(f"a {type(value).__name__} is not a parameter value (give a str, int, float, "
               "bool, or a list of names)")


def parse_params(
    computation: str, params: Sequence[Param], raw: dict[str, Any]
) -> dict[str, Any]:
    """Every declared parameter, converted or defaulted; raises ParameterError naming the first
    unknown, missing or invalid one."""
    if not isinstance(raw, dict):
        raise ParameterError(f"{computation}: parameters must be a mapping of names to strings")
    by_name = {p.name: p for p in params}
    for key in raw:
        if key not in by_name:
            accepted = ", ".join(by_name) if by_name else "none"
            raise ParameterError(
                f"parameter {key!r}: unknown parameter for {computation} (accepted: {accepted})"
            )
    out: dict[str, Any] = {}
    for p in params:
        if p.name in raw:
            out[p.name] = p.parse(raw[p.name])
        elif p.required:
            raise ParameterError(f"parameter {p.name!r}: required ({p.help or 'no default'})")
        else:
            out[p.name] = p.default
    return out


def make_check_params(
    computation: str,
    params: Sequence[Param],
    post: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``check_params`` generated from the declared parameters, with an optional cross-check
    ``post`` on the converted values (raising ParameterError)."""

    def check_params(raw: dict[str, Any]) -> dict[str, Any]:
        checked = parse_params(computation, params, raw)
        if post is not None:
            post(checked)
        return checked

    check_params.__doc__ = f"Validate and convert the string parameters of {computation}."
    return check_params


# Parameters shared by the models.
LABEL = Param("label", "str", required=True, help="the name of the label column")
FEATURES = Param(
    "features",
    "list[str]",
    help="comma-separated feature columns; default every integer or floating column "
    "other than the label",
)
TEST_FRACTION = Param(
    "test_fraction",
    "float",
    default=0.0,
    low=0.0,
    high=1.0,
    high_open=True,
    help="share of the rows held out for testing (0 = none); test metrics are reported",
)
SEED = Param("seed", "int", default=0, low=0, high=2**32 - 1, help="seed of the held-out split")


def check_label_not_feature(checked: dict[str, Any]) -> None:
    features = checked.get("features")
    if features and checked["label"] in features:
        raise ParameterError(
            f"parameter 'features': includes the label column {checked['label']!r}"
        )
