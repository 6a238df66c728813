"""A study file checked by its pydantic models, its first problem told as one flowscope line.

Pydantic's own error text (several lines, its own words) never reaches the user: the first
error becomes ``FILE[, claim K (ID)]: KEY must be ALLOWED, got VALUE``, where KEY is a dotted
path (``run.steps``) and ALLOWED is read off the JSON schema of the study file, the same
schema editors validate with; unknown keys and choices get flowscope's did-you-mean.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from flowscope.core.errors import FlowscopeError, unknown
from flowscope.study.spec_models import TomlSchema

M = TypeVar("M", bound=BaseModel)
KEY_LABELS = {"": "study key", "run": "run setting", "claim": "claim key"}  # else "KEY key"


def parse(model: type[M], raw: Any, where: str, at: tuple[str, ...] = ()) -> M:
    """``raw`` checked by ``model``, or its first problem as one :class:`FlowscopeError`.

    ``at`` is where ``raw`` sits in the study file (``("run",)`` for a config's run table),
    so that keys are named as the file names them.

    Example:
        >>> from flowscope.study.spec_models import Run
        >>> parse(Run, {"steps": 3}, "s.toml", ("run",)).steps
        3
        >>> parse(Run, {"steps": -1}, "s.toml", ("run",))
        Traceback (most recent call last):
        ...
        flowscope.core.errors.FlowscopeError: s.toml: run.steps must be an integer >= 0, got -1
    """
    try:
        return model.model_validate(raw)
    except ValidationError as err:  # a value written wrong before a key not written yet
        first = min(err.errors(), key=lambda e: e["type"] == "missing")
        raise problem(first, model, raw, where, at) from None


def problem(
    error: ErrorDetails, model: type[BaseModel], raw: Any, where: str, at: tuple[str, ...] = ()
) -> FlowscopeError:
    """One pydantic error of ``model`` on ``raw``, in flowscope's words."""
    loc = error["loc"]
    walked, node = walk(model.model_json_schema(schema_generator=TomlSchema), loc)
    value = value_at(raw, walked)
    keys, place = [*at, *walked], where
    if not at and walked[:1] == ["claim"] and len(walked) > 1:  # [[claim]]: by number and id
        name = value_at(raw, [*walked[:2], "id"])
        place += f", claim {walked[1] + 1}" + (f" ({name})" if isinstance(name, str) else "")
        keys = keys[2:]
    path = ".".join(str(k) for k in keys)
    kind = error["type"]
    if kind == "extra_forbidden":
        table = ".".join(k for k in [*at, *walked] if isinstance(k, str))
        label = KEY_LABELS.get(table, f"{table} key")
        return unknown(label, loc[len(walked)], node.get("properties", {}), place)
    if kind == "missing":
        about = f" ({node['description']})" if "description" in node else ""
        return FlowscopeError(f"{place}: missing required key {path!r}{about}")
    if kind == "literal_error":
        entry = " entry" if len(loc) > len(walked) else ""
        choices = node.get("enum") or node.get("items", {}).get("enum", [])
        return unknown(f"{path}{entry}", error["input"], choices, place)
    if kind in ("value_error", "assertion_error"):  # a validator's own message
        return FlowscopeError(f"{place}: {error.get('ctx', {}).get('error', error['msg'])}")
    verb = "needs" if keys[:1] == ["sweep"] else "must be"
    return FlowscopeError(f"{place}: {subject(keys)} {verb} {allowed(node)}, got {value!r}")


def subject(keys: list[Any]) -> str:
    """How a message names a key: ``run.steps``, ``'name'``, ``sweep axis 'net.depth'``."""
    if keys[:1] == ["sweep"] and len(keys) == 2:  # an axis is a dotted key itself
        return f"sweep axis {keys[1]!r}"
    if not keys:  # the [[claim]] entry itself (the study file is always a table)
        return "each [[claim]]"
    path = ".".join(str(k) for k in keys)
    return repr(path) if len(keys) == 1 else path


def walk(schema: dict[str, Any], loc: tuple[int | str, ...]) -> tuple[list[Any], dict[str, Any]]:
    """Follow an error's location down the JSON schema, through tables and [[claim]] lists:
    the keys walked, and the schema of what is there (what ends the walk is not a key of the
    file: an unknown key, a list index, a union member's tag)."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:  # a field's own keys win
        ref = node.get("$ref") or node.get("allOf", [{}])[0].get("$ref")  # allOf: older pydantic
        if ref is None:
            return node
        own = {k: v for k, v in node.items() if k not in ("$ref", "allOf")}
        return {**defs[ref.rpartition("/")[2]], **own}

    node, walked = schema, []
    for part in loc:
        here = resolve(node)
        extra = here.get("additionalProperties")
        if isinstance(part, str) and part in here.get("properties", {}):
            node = here["properties"][part]
        elif isinstance(part, str) and isinstance(extra, dict):
            node = extra
        elif isinstance(part, int) and "$ref" in here.get("items", {}):
            node = here["items"]
        else:
            break
        walked.append(part)
    return walked, resolve(node)


def value_at(raw: Any, keys: list[Any]) -> Any:
    """The value at ``keys`` in the parsed file (None where it is missing)."""
    for key in keys:
        try:
            raw = raw[key]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


PLURALS = {"integer": "integers", "number": "numbers", "string": "strings", "object": "tables"}


def allowed(node: dict[str, Any]) -> str:
    """What a JSON schema allows, in words: ``an integer >= 0``, ``a list of strings``.

    Example:
        >>> allowed({"type": "number", "exclusiveMinimum": 0})
        'a number > 0'
        >>> allowed({"anyOf": [{"type": "array", "items": {"type": "integer"}, "minItems": 1},
        ...                    {"type": "integer"}]})
        'a non-empty list of integers (or one)'
    """
    if "anyOf" in node:
        options = node["anyOf"]
        many = [o for o in options if o.get("type") == "array" and o.get("items") in options]
        if len(options) == 2 and many:  # a list, or one item of it
            return f"{allowed(many[0])} (or one)"
        return " or ".join(allowed(o) for o in options)
    kind = node.get("type", "object")
    if kind == "array":
        low, high = node.get("minItems", 0), node.get("maxItems")
        items = plural(node.get("items", {}))
        if low == high:
            return f"a list of {low} {items}"
        return f"a {'non-empty ' if low else ''}list of {items}"
    if kind == "object":
        extra = node.get("additionalProperties")
        return f"a table of {plural(extra)}" if isinstance(extra, dict) and extra else "a table"
    if kind in ("integer", "number"):
        bounds = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="))
        limits = "".join(f" {op} {node[key]}" for key, op in bounds if key in node)
        return f"{'an integer' if kind == 'integer' else 'a number'}{limits}"
    return {"string": "a string", "boolean": "true or false"}.get(kind, kind)


def plural(node: dict[str, Any]) -> str:
    """The items of a list, in words: ``integers``, ``tables``, ``tanh or relu``."""
    if "enum" in node:
        names = [str(v) for v in node["enum"]]
        return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
    if "$ref" in node:
        return "tables"
    return PLURALS.get(node.get("type", ""), "values")
