"""Typed recipes: a YAML mapping plus ``key=value`` overrides, checked against a pydantic schema.

Used by the training recipes (:mod:`mobilemllm.training.recipes`) and the export recipes
(:mod:`mobilemllm.export.recipes`). Each schema is a tree of :class:`Section` models (unknown keys are
errors). An override ``a.b=value`` is read as a YAML scalar (``1e-4``, ``true``, ``[a, b]``,
``{r: 8}``), except where the schema expects a string: there the text is kept as written, so
``name=007`` stays ``"007"``. Then the whole mapping is validated, and every problem is reported together
as one line, each naming the key, what is expected and what was given::

    recipe tiny: instruct.lr must be a number, got 'fast'; seed must be an integer, got 'abc'

Nothing here mutates its arguments: overrides apply to a copy, validation returns a new mapping.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Strict, ValidationError, WrapValidator, create_model
from pydantic_core import PydanticCustomError

from mobilemllm.errors import ConfigError


class Section(BaseModel):
    """A mapping of known keys: any other key is an error that lists the valid ones."""

    model_config = ConfigDict(extra="forbid")


# ---- field types ------------------------------------------------------------------------------------
def _number(value: Any, handler) -> Any:
    """A float field that keeps integers as written (``epochs: 1`` stays 1, so a run folder's fingerprint, a
    JSON dump of its recipe section, does not change) and refuses true/false."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    out = handler(value)
    return value if type(value) is int else out


Number = Annotated[float, WrapValidator(_number)]
Int = Annotated[int, Strict()]  # no true/false, no 3.0, no "3"
Bool = Annotated[bool, Strict()]  # no 1/0, no "yes" (an override's `yes` is already true as YAML)


def typed(hint: Any) -> Any:
    """A dataclass field's type hint with floats as :data:`Number`, ints and bools strict (also inside
    ``X | None``); other types unchanged."""
    if hint is float:
        return Number
    if hint is int:
        return Int
    if hint is bool:
        return Bool
    if _is_union(hint):
        return Union[tuple(typed(a) for a in typing.get_args(hint))]
    return hint


def section_from_dataclass(klass: type, name: str, rules: dict[str, Any] | None = None,
                           choices: dict[str, tuple[str, ...]] | None = None, nested: dict[str, Any] | None = None,
                           all_optional: bool = False) -> type[Section]:
    """A :class:`Section` with the fields of dataclass ``klass`` (names, types, defaults): the dataclass stays
    the one place a key is added. ``rules``: ``Field(...)`` bounds per field; ``choices``: the allowed
    strings of a field; ``nested``: the section replacing a nested dataclass field; ``all_optional``: every
    field defaults to unset (for partial overrides; only set keys are dumped)."""
    hints = typing.get_type_hints(klass)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(klass):
        hint = nested[f.name] if nested and f.name in nested else typed(hints[f.name])
        if choices and f.name in choices:
            hint = Literal[choices[f.name]]
        if rules and f.name in rules:
            hint = Annotated[hint, rules[f.name]]
        if all_optional or f.default is dataclasses.MISSING:
            default = None
        else:
            default = f.default
        fields[f.name] = (hint, default)
    return create_model(name, __base__=Section, __doc__=klass.__doc__, **fields)


# ---- overrides --------------------------------------------------------------------------------------
def split_override(item: str) -> tuple[list[str], str]:
    """``"instruct.lr=1e-4"`` -> (["instruct", "lr"], "1e-4")."""
    key, sep, value = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override {item!r} is not key=value (e.g. instruct.lr=1e-4)")
    return keys, value


def field_type(schema: type[BaseModel], keys: list[str]) -> Any:
    """The type the schema expects at ``keys`` (None when the path is not in the schema)."""
    node: Any = schema
    for key in keys:
        model = _model_in(node)
        if model is not None:
            field = model.model_fields.get(key)
            if field is None:
                return None
            node = field.annotation
        elif typing.get_origin(_unwrap(node)) is dict:
            node = typing.get_args(_unwrap(node))[1]
        else:
            return None
    return node


def read_value(text: str, expected: Any) -> Any:
    """An override's text as a YAML value, or as written where ``expected`` takes a string and YAML would
    read a number, a boolean or a date (``name=007``, ``template=yes``)."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text
    if expected is not None and _takes_str(expected) and not isinstance(value, (str, list, dict)):
        if value is None and _takes_none(expected):
            return None
        return text
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: type[BaseModel],
                    errors: list[str] | None = None) -> dict[str, Any]:
    """A copy of ``data`` with ``overrides`` (``a.b=value``) set; missing sections are created. Problems
    (not key=value, a path through a non-section) are appended to ``errors`` when given, else raised."""
    out = copy.deepcopy(data)
    problems: list[str] = []
    for item in overrides or []:
        try:
            keys, text = split_override(item)
        except ConfigError as e:
            problems.append(str(e))
            continue
        node = out
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                problems.append(f"override {item!r}: {'.'.join(keys[:i + 1])} is not a section of keys")
                break
            node = node[k]
        else:
            node[keys[-1]] = read_value(text, field_type(schema, keys))
    if errors is not None:
        errors.extend(problems)
    elif problems:
        raise ConfigError("; ".join(problems))
    return out


# ---- validation ---------------------------------------------------------------------------------------
def validate(schema: type[BaseModel], data: Any, where: str, errors: list[str] | None = None) -> BaseModel:
    """``data`` checked against ``schema``; a :class:`ConfigError` listing every problem on one line (after
    ``errors`` found earlier, e.g. by :func:`apply_overrides`)."""
    problems = list(errors or [])
    try:
        result = schema.model_validate(data)
    except ValidationError as e:
        problems.extend(error_messages(e, data, schema))
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return result


def error_messages(err: ValidationError, data: Any, schema: type[BaseModel]) -> list[str]:
    """One message per key: ``instruct.lr must be a number, got 'fast'``; unknown keys grouped per section
    with the valid ones; the alternatives of a union (``str | list[str]``) merged into one message."""
    unknown: dict[tuple, list[str]] = {}
    phrases: dict[tuple, list[str]] = {}
    values: dict[tuple, str] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        where, value = _resolve(data, loc)
        if e["type"] == "missing" and isinstance(value, dict):  # a required key
            where, phrase, got = loc, "is required", ""
        elif e["type"] == "missing":  # a tuple item
            phrase, got = "has too few items", f", got {show(value)}"
        elif e["type"] == "value_error":  # a validator's own message, which shows the value if it helps
            phrase, got = _phrase(e), ""
        else:
            phrase, got = _phrase(e), f", got {show(value)}"
        if phrase not in phrases.setdefault(where, []):
            phrases[where].append(phrase)
        values[where] = got
    out = []
    for parent, names in unknown.items():
        model = _model_in(field_type(schema, [str(p) for p in parent]) if parent else schema)
        valid = f" (valid: {', '.join(model.model_fields)})" if model is not None else ""
        prefix = f"{dotted(parent)}: " if parent else ""
        out.append(f"{prefix}unknown key(s) {', '.join(names)}{valid}")
    for where, said in phrases.items():
        merged = said[0] + "".join(" or " + p.removeprefix("must be ") for p in said[1:])
        out.append(f"{dotted(where) or 'the recipe'} {merged}{values[where]}")
    return out


def dotted(loc: tuple) -> str:
    """("stages", 1) -> "stages[1]"; ("instruct", "lr") -> "instruct.lr"."""
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s


def show(value: Any) -> str:
    """A value as the user wrote it in YAML terms (null, true, 'text', 3)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_PHRASES = {
    "float_type": "must be a number", "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be a mapping of keys", "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _phrase(e: dict) -> str:
    kind, ctx = e["type"], e.get("ctx") or {}
    if kind in _PHRASES:
        return _PHRASES[kind]
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {bound}"
    if kind == "literal_error":
        return "must be one of " + str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
    if kind == "value_error":
        return str(ctx.get("error", e["msg"])).removeprefix("Value error, ")
    if kind in ("too_short", "too_long"):
        return "must have " + ("at least " if kind == "too_short" else "at most ") + \
            f"{ctx.get('min_length', ctx.get('max_length'))} items"
    return f"is invalid ({e['msg']})"


def _resolve(data: Any, loc: tuple) -> tuple[tuple, Any]:
    """The longest prefix of ``loc`` that exists in ``data`` (a union's member tags such as ``list[str]``
    and missing items are cut), with the value there."""
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return loc[:i], node
    return loc, node


def _unwrap(hint: Any) -> Any:
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _members(hint: Any) -> list[Any]:
    hint = _unwrap(hint)
    return [_unwrap(a) for a in typing.get_args(hint)] if _is_union(hint) else [hint]


def _model_in(hint: Any) -> type[BaseModel] | None:
    """The section class in ``hint`` (``Section``, ``Section | None``), else None."""
    models = [m for m in _members(hint) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 else None


def _takes_str(hint: Any) -> bool:
    return any(m is str for m in _members(hint))


def _takes_none(hint: Any) -> bool:
    return any(m is type(None) or m is Any for m in _members(hint))
