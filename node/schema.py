"""JSON value types declared once: each gives its JSON Schema (for openapi.json) and checks a
value against the same rules (for the server, and for the CLI without a daemon).

Statuses, decided here for the whole API: a value that breaks its schema is a `BadRequest`
(400); a value the schema allows but the node cannot use (k >= n, a recipient whose checksum
fails, a CID whose hash does not decode, a file that is not there) is refused by the use case
with its own error, never 400 (409 or 404: `fusenode.errors`). So a request valid by
openapi.json is never answered "malformed".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fusenode.node.errors import BadRequest


def type_name(value: Any) -> str:
    """The JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}.get(
        type(value), "object"
    )


class Type:
    """A JSON value type: its schema, and a check that returns the (normalized) value."""

    description: str = ""

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def check(self, where: str, value: Any) -> Any:
        raise NotImplementedError

    def from_text(self, where: str, text: str) -> Any:
        """A path parameter: the value spelled in the URL."""
        return self.check(where, text)

    def noun(self) -> str:
        """What the type is, in a message: 'a string', 'an integer or null'."""
        raise NotImplementedError

    def _with_description(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {**schema, "description": self.description} if self.description else schema


def _search(pattern: str, value: str) -> bool:
    """ECMA-262 semantics of a schema pattern: ``$`` is the end of the string (in Python it
    also matches before a final newline)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, value) is not None


@dataclass(frozen=True)
class String(Type):
    pattern: str | None = None
    max_length: int | None = None
    description: str = ""
    enum: tuple[str, ...] = ()
    #: The sentence a value that does not match ``pattern`` is refused with (instead of the
    #: pattern itself), for a pattern no user should have to read.
    mismatch: str = ""

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string"}
        if self.pattern:
            out["pattern"] = self.pattern
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        if self.enum:
            out["enum"] = list(self.enum)
        return self._with_description(out)

    def noun(self) -> str:
        return "a string"

    def check(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be a string, not {type_name(value)}")
        if self.max_length is not None and len(value) > self.max_length:
            raise BadRequest(f"{where} is longer than {self.max_length} characters")
        if self.pattern and not _search(self.pattern, value):
            if self.mismatch:
                shown = f"{value[:20]}...{value[-6:]}" if len(value) > 40 else value
                raise BadRequest(f"{where} {shown!r}: {self.mismatch}")
            raise BadRequest(f"{where} {value[:100]!r} does not match {self.pattern}")
        if self.enum and value not in self.enum:
            raise BadRequest(f"{where} must be one of {', '.join(self.enum)}")
        return value


@dataclass(frozen=True)
class AbsolutePath(String):
    """A path on the daemon's machine: absolute, because its working directory is not the
    client's; no NUL, which no file name holds."""

    pattern: str | None = r"^/[^\x00]*$"

    def check(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be a string, not {type_name(value)}")
        if "\0" in value:
            raise BadRequest(f"{where} must not contain a NUL character")
        if not value.startswith("/"):
            raise BadRequest(f"{where} must be an absolute path, not {value[:200]!r}")
        return value


@dataclass(frozen=True)
class Integer(Type):
    minimum: int | None = None
    maximum: int | None = None
    description: str = ""

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return self._with_description(out)

    def noun(self) -> str:
        return "an integer"

    def check(self, where: str, value: Any) -> int:
        # bool is an int in Python but not in JSON: true is not k=1. 3.0 is an integer in
        # JSON Schema, so it is one here too.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"{where} must be {self.noun()}, not {type_name(value)}")
        return self._range(where, value)

    def _range(self, where: str, value: int) -> int:
        if self.minimum is not None and value < self.minimum:
            raise BadRequest(f"{where} must be at least {self.minimum}, not {value}")
        if self.maximum is not None and value > self.maximum:
            raise BadRequest(f"{where} must be at most {self.maximum}, not {value}")
        return value

    def from_text(self, where: str, text: str) -> int:
        if not re.fullmatch(r"-?[0-9]{1,19}", text):
            raise BadRequest(f"{where} must be an integer, not {text[:40]!r}")
        return self._range(where, int(text))


@dataclass(frozen=True)
class Boolean(Type):
    description: str = ""

    def schema(self) -> dict[str, Any]:
        return self._with_description({"type": "boolean"})

    def noun(self) -> str:
        return "a boolean"

    def check(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{where} must be a boolean, not {type_name(value)}")
        return value


@dataclass(frozen=True)
class Nullable(Type):
    inner: Type
    description: str = ""

    def schema(self) -> dict[str, Any]:
        inner = self.inner.schema()
        out = {**inner, "type": [inner["type"], "null"]} if "type" in inner else inner
        return self._with_description(out)

    def noun(self) -> str:
        return f"{self.inner.noun()} or null"

    def check(self, where: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.inner.check(where, value)
        except BadRequest as e:
            if isinstance(self.inner, Integer) and str(e).startswith(f"{where} must be an"):
                raise BadRequest(f"{where} must be {self.noun()}, not {type_name(value)}") from None
            raise


@dataclass(frozen=True)
class Array(Type):
    items: Type
    min_items: int = 0
    max_items: int | None = None
    description: str = ""

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.items.schema()}
        if self.min_items:
            out["minItems"] = self.min_items
        if self.max_items is not None:
            out["maxItems"] = self.max_items
        return self._with_description(out)

    def noun(self) -> str:
        return f"an array of {self.items.noun()[2:]}s".replace("an array of n ", "an array of ")

    def check(self, where: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise BadRequest(f"{where} must be {self.noun()}, not {type_name(value)}")
        if len(value) < self.min_items:
            raise BadRequest(f"{where} needs at least {self.min_items} item(s)")
        if self.max_items is not None and len(value) > self.max_items:
            raise BadRequest(f"{where} has more than {self.max_items} items")
        return [self.items.check(f"{where}[{i}]", item) for i, item in enumerate(value)]


@dataclass(frozen=True)
class Free(Type):
    """Any JSON value of the given JSON types (results whose shape is documented in prose)."""

    types: tuple[str, ...] = ("object",)
    description: str = ""

    def schema(self) -> dict[str, Any]:
        kind: Any = self.types[0] if len(self.types) == 1 else list(self.types)
        return self._with_description({"type": kind})

    def noun(self) -> str:
        return " or ".join(self.types)

    def check(self, where: str, value: Any) -> Any:
        if type_name(value) not in self.types:
            raise BadRequest(f"{where} must be {self.noun()}, not {type_name(value)}")
        return value


_REQUIRED: Any = object()


@dataclass(frozen=True)
class Field:
    """One key of an object: its type, and its default when absent (or required)."""

    type: Type
    default: Any = _REQUIRED
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class Object(Type):
    """A JSON object with known keys. ``name`` makes it a named schema in openapi.json;
    ``closed`` refuses unknown keys (requests) rather than allowing them (results)."""

    fields: Mapping[str, Field] = field(default_factory=dict)
    name: str = ""
    closed: bool = True
    extra: Type | None = None  # the type of other keys, for a map-like result
    description: str = ""

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object"}
        required = [k for k, f in self.fields.items() if f.required]
        if required:
            out["required"] = required
        if self.fields or not self.extra:
            props = {}
            for key, f in self.fields.items():
                prop = f.type.schema()
                if f.description:
                    prop["description"] = f.description
                if not f.required:
                    prop["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
                props[key] = prop
            out["properties"] = props
        if self.extra is not None:
            out["additionalProperties"] = self.extra.schema()
        elif self.closed:
            out["additionalProperties"] = False
        return self._with_description(out)

    def noun(self) -> str:
        return "a JSON object"

    def check(self, where: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise BadRequest(f"{where} must be a JSON object, not {type_name(value)}")
        if self.closed:
            unknown = sorted(set(value) - set(self.fields))
            if unknown:
                known = ", ".join(self.fields) or "none"
                raise BadRequest(f"unknown key(s): {', '.join(unknown)} (accepted: {known})")
        missing = [k for k, f in self.fields.items() if f.required and k not in value]
        if missing:
            raise BadRequest(f"missing required key(s): {', '.join(missing)}")
        out: dict[str, Any] = {}
        for key, f in self.fields.items():
            if key in value:
                out[key] = f.type.check(repr(key), value[key])
            else:
                out[key] = list(f.default) if isinstance(f.default, tuple) else f.default
        return out
