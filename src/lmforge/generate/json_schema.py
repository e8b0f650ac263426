"""A JSON schema as a regular expression (vLLM's guided_json, OpenAI's structured outputs), for generate.guided.

The expression matches the JSON texts of the schema written one way, the way json.dumps writes them: ", " between
items, ": " after keys, an object's properties in the schema's order. So json.loads of a finished answer always
succeeds, and the value follows the schema.

    schema keyword                      what the expression allows
    type (one or a list)                string, integer, number, boolean, null, object, array
    properties, required                the listed properties in order; those not in `required` may be left out
    additionalProperties (no properties) an object of any keys whose values follow it (a dict[str, X])
    items, prefixItems, min/maxItems    arrays (a tuple: prefixItems)
    enum, const, anyOf, oneOf, allOf    alternatives (allOf: of one schema, as Pydantic writes it)
    $ref, $defs, definitions            references inside the schema, written out where they are used
    minLength, maxLength, format        strings; format: date, time, date-time, uuid, email, ipv4
    pattern                             strings the whole of which match it (so they match it as JSON Schema reads
                                        it, anywhere in the string); characters JSON escapes written escaped
    minimum, maximum, exclusive*        integers between the bounds; numbers: a lower bound of 0 only
    {} or no type                       any JSON value, nested at most ANY_DEPTH deep (json_object too)

Anything else is a one-line ConfigError naming it, as is a schema that refers to itself (recursion is not regular)
or whose expression would pass MAX_CHARS (references can make a short schema's expression exponentially long).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lmforge.errors import ConfigError

ANY_DEPTH = 1  # a value with no schema: a scalar, or an array or object of scalars (deeper: slow automata)
MAX_CHARS = 200_000  # longest expression a schema may become
MAX_NESTING = 64  # deepest schema followed

_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # one character of a JSON string
STRING = f'"{_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
SCALARS = {"string": STRING, "integer": INTEGER, "number": NUMBER, "boolean": r"(?:true|false)", "null": "null"}

_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
FORMATS = {"date": _DATE, "time": _TIME, "date-time": f"{_DATE}T{_TIME}",
           "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
           "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}"}

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
               "writeOnly", "discriminator", "strict", "name"}
KEYWORDS = ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
                          "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
                          "minLength", "maxLength", "format", "pattern", "minimum", "maximum", "exclusiveMinimum",
                          "exclusiveMaximum"}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def json_schema_regex(schema: Any) -> str:
    """The regular expression of `schema` (a parsed JSON schema); see the module's table for what is understood."""
    if not isinstance(schema, dict):
        raise ConfigError(f"generate.guided_json: the schema is {schema!r}; a schema is a JSON object")
    return _Converter(schema).regex(schema, "the schema", ())


def _literal(value: Any) -> str:
    return re.escape(json.dumps(value))


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


# ------------------------------------------------------------------------------------------ string patterns
_UNSAFE = ['"', "\\"] + [chr(c) for c in range(0x20)]  # what a JSON string holds only escaped
_UNSAFE_CLASS = r'["\\\x00-\x1f]'
_CATEGORIES = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_WORD": r"\w",
               "CATEGORY_NOT_WORD": r"\W", "CATEGORY_SPACE": r"\s", "CATEGORY_NOT_SPACE": r"\S"}


def string_pattern(pattern: str, where: str = "the schema") -> str:
    """The expression of the JSON text between a string's quotes whose value, decoded, is a whole match of `pattern`
    (JSON Schema's pattern, a leading ^ and trailing $ optional): each character written as json.dumps writes it,
    so one that JSON escapes (a quote, a backslash, a control character) appears as its escape."""
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]  (Python >= 3.11)
    except ImportError:  # pragma: no cover  (Python 3.10)
        import sre_parse  # type: ignore[no-redef]
    try:
        parsed = list(sre_parse.parse(pattern))
    except re.error as e:
        raise _fail(where, f"has pattern {pattern!r}, which is not a regular expression ({e})") from None
    if parsed and str(parsed[0][0]) == "AT" and str(parsed[0][1]) in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        parsed = parsed[1:]
    if parsed and str(parsed[-1][0]) == "AT" and str(parsed[-1][1]) in ("AT_END", "AT_END_STRING"):
        parsed = parsed[:-1]
    return _PatternWriter(pattern, where).sequence(parsed)


class _PatternWriter:
    """Python's parse of a pattern (re._parser) written out again for interegular, over JSON's escaped text."""

    def __init__(self, pattern: str, where: str) -> None:
        self.pattern, self.where = pattern, where

    def refuse(self, what: str) -> ConfigError:
        return _fail(self.where, f"has pattern {self.pattern!r}, which uses {what}: lmforge writes patterns of "
                                 "characters, classes, groups, alternatives and repeats (anchors only at the ends)")

    def sequence(self, items: Any) -> str:
        return "".join(self.item(op, av) for op, av in items)

    def item(self, op: Any, av: Any) -> str:
        name = str(op)
        if name == "LITERAL":
            return re.escape(json.dumps(chr(av))[1:-1])
        if name in ("NOT_LITERAL", "ANY", "IN"):
            return self.chars(name, av)
        if name == "BRANCH":
            return "(?:" + "|".join(self.sequence(branch) for branch in av[1]) + ")"
        if name == "SUBPATTERN":
            if av[1] or av[2]:
                raise self.refuse("inline flags")
            return "(?:" + self.sequence(av[3]) + ")"
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, inner = av
            top = "" if high >= 2**31 - 1 or str(high) == "MAXREPEAT" else str(high)
            return f"(?:{self.sequence(inner)}){{{low},{top}}}"
        if name == "ATOMIC_GROUP":
            return "(?:" + self.sequence(av) + ")"
        kinds = {"AT": "an anchor inside it", "GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group",
                 "ASSERT": "a lookaround", "ASSERT_NOT": "a lookaround"}
        raise self.refuse(kinds.get(name, name.lower()))

    def chars(self, name: str, av: Any) -> str:
        """A character class: the characters JSON writes as they are, or the escapes of those it escapes."""
        if name == "ANY":
            cls = "[^\\n]"
        elif name == "NOT_LITERAL":
            cls = f"[^{re.escape(chr(av))}]"
        else:
            parts, negate = [], False
            for op, value in av:
                kind = str(op)
                if kind == "NEGATE":
                    negate = True
                elif kind == "LITERAL":
                    parts.append(re.escape(chr(value)))
                elif kind == "RANGE":
                    parts.append(f"{re.escape(chr(value[0]))}-{re.escape(chr(value[1]))}")
                elif kind == "CATEGORY" and str(value) in _CATEGORIES:
                    parts.append(_CATEGORIES[str(value)])
                else:
                    raise self.refuse(f"the class item {kind.lower()} {value}")
            cls = "[" + ("^" if negate else "") + "".join(parts) + "]"
        escaped = [re.escape(json.dumps(c)[1:-1]) for c in _UNSAFE if re.fullmatch(cls, c)]
        if not escaped:
            return cls
        return "(?:" + "|".join([f"(?!{_UNSAFE_CLASS}){cls}", *escaped]) + ")"


def _fail(where: str, what: str) -> ConfigError:
    return ConfigError(f"generate.guided_json: {where} {what}")


class _Converter:
    def __init__(self, root: dict) -> None:
        self.root, self.depth = root, 0  # root: what '#' means here (the schema, or the nearest one with an $id)

    def regex(self, schema: Any, where: str, refs: tuple) -> str:
        """The expression of `schema`, found at `where` (for errors), inside the references `refs` ((root, ref))."""
        if self.depth >= MAX_NESTING:
            raise _fail(where, f"is nested more than {MAX_NESTING} deep: flatten the schema")
        self.depth += 1
        outer = self.root
        if isinstance(schema, dict) and "$id" in schema:  # a schema of its own inside (a tool's parameters)
            self.root = schema
        try:
            return self._checked(schema, where, refs)
        finally:
            self.depth, self.root = self.depth - 1, outer

    def _checked(self, schema: Any, where: str, refs: tuple) -> str:
        if schema is True or schema == {}:
            return any_value(ANY_DEPTH)
        if not isinstance(schema, dict):
            raise _fail(where, f"is {schema!r}; a schema is a JSON object")
        unknown = sorted(set(schema) - KEYWORDS)
        if unknown:
            raise _fail(where, f"uses {unknown[0]!r}, which lmforge cannot turn into a regular expression (it reads "
                               f"{', '.join(sorted(KEYWORDS - ANNOTATIONS))})")
        out = self._regex(schema, where, refs)
        if len(out) > MAX_CHARS:
            raise _fail(where, f"becomes a regular expression of more than {MAX_CHARS} characters (references "
                               "used many times are written out each time): simplify the schema")
        return out

    def _regex(self, schema: dict, where: str, refs: tuple) -> str:
        constraining = set(schema) - ANNOTATIONS - {"$defs", "definitions"}
        if "$ref" in schema:
            if constraining != {"$ref"}:
                raise _fail(where, f"has {sorted(constraining - {'$ref'})[0]!r} beside '$ref': lmforge reads a "
                                   "reference alone (with annotations such as description)")
            ref = schema["$ref"]
            if (id(self.root), ref) in refs:
                raise _fail(where, f"refers to {ref} inside itself: a recursive schema is not a regular language; "
                                   "write the levels out to a fixed depth")
            return self.regex(self.resolve(ref, where), ref, (*refs, (id(self.root), ref)))
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1 or constraining != {"allOf"}:
                raise _fail(where, "uses allOf with more than one schema (or beside other keywords): lmforge reads "
                                   "allOf of a single schema")
            return self.regex(parts[0], f"{where}.allOf[0]", refs)
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise _fail(where, "has an enum that is not a non-empty list")
            return _either([_literal(v) for v in schema["enum"]])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                if not isinstance(schema[key], list) or not schema[key]:
                    raise _fail(where, f"has a {key} that is not a non-empty list of schemas")
                return _either([self.regex(s, f"{where}.{key}[{i}]", refs) for i, s in enumerate(schema[key])])
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise _fail(where, "has an empty list of types")
            return _either([self._regex({**schema, "type": k}, where, refs) for k in kind])
        if kind is None:  # the type the keywords imply, or any value
            kind = ("object" if {"properties", "additionalProperties"} & constraining else
                    "array" if {"items", "prefixItems"} & constraining else None)
            if kind is None:
                if constraining:
                    raise _fail(where, f"has {sorted(constraining)[0]!r} but no type: give the type")
                return any_value(ANY_DEPTH)
        if kind == "string":
            return self.string(schema, where)
        if kind in ("integer", "number"):
            return self.number(schema, kind, where)
        if kind in ("boolean", "null"):
            return SCALARS[kind]
        if kind == "object":
            return self.object(schema, where, refs)
        if kind == "array":
            return self.array(schema, where, refs)
        raise _fail(where, f"has type {kind!r}; give one of string, integer, number, boolean, null, object, array "
                           "(or enum, const, anyOf)")

    def resolve(self, ref: Any, where: str) -> Any:
        """The schema a `$ref` names: '#' or a JSON pointer ('#/$defs/Name') into the schema, or into the nearest
        enclosing schema with an $id."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _fail(where, f"refers to {ref!r}; lmforge reads references inside the schema ('#/$defs/Name')")
        node: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise _fail(where, f"refers to {ref}, which the schema does not hold")
            node = node[part]
        return node

    def string(self, schema: dict, where: str) -> str:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        for name, value in (("minLength", low), ("maxLength", high)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise _fail(where, f"has {name} {value!r}; give a whole number >= 0")
        if "pattern" in schema:
            if {"format", "minLength", "maxLength"} & set(schema):
                raise _fail(where, "has a pattern beside a format or length: give the pattern alone (a length fits "
                                   "in it: '[a-z]{2,8}')")
            if not isinstance(schema["pattern"], str):
                raise _fail(where, f"has pattern {schema['pattern']!r}; a pattern is a regular expression (text)")
            return f'"{string_pattern(schema["pattern"], where)}"'
        if "format" in schema:
            if "minLength" in schema or "maxLength" in schema:
                raise _fail(where, "has both a format and a length: give one")
            if schema["format"] not in FORMATS:
                raise _fail(where, f"has format {schema['format']!r}; lmforge writes {', '.join(FORMATS)} (or drop "
                                   "the format)")
            return f'"{FORMATS[schema["format"]]}"'
        if high is not None and high < low:
            raise _fail(where, f"has maxLength {high} < minLength {low}")
        if low == 0 and high is None:
            return STRING
        return f'"{_CHAR}{{{low},{"" if high is None else high}}}"'

    def number(self, schema: dict, kind: str, where: str) -> str:
        bounds = {k: schema[k] for k in _BOUNDS if k in schema}
        for name, value in bounds.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise _fail(where, f"has {name} {value!r}; give a finite number")
        if not bounds:
            return SCALARS[kind]
        if kind == "number":
            if bounds != {"minimum": 0}:
                raise _fail(where, f"is a number with {', '.join(bounds)}: lmforge bounds numbers only by minimum "
                                   "0; use an integer, or an enum")
            return NUMBER[2:]  # no minus sign
        lows = ([math.ceil(bounds["minimum"])] if "minimum" in bounds else []) + \
               ([math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else [])
        highs = ([math.floor(bounds["maximum"])] if "maximum" in bounds else []) + \
                ([math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else [])
        low, high = max(lows, default=None), min(highs, default=None)
        if low is not None and high is not None and high < low:
            raise _fail(where, f"allows no integer (between {low} and {high})")
        return integer_range(low, high)

    def object(self, schema: dict, where: str, refs: tuple) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise _fail(where, "has properties that are not an object or required that is not a list")
        missing = [name for name in required if name not in properties]
        if missing:
            raise _fail(where, f"requires {missing[0]!r}, which its properties do not hold")
        if not properties:
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return r"\{\}"
            value = self.regex(extra, f"{where}.additionalProperties", refs)
            return _mapping(value)
        fields = [(re.escape(json.dumps(name)) + ": " + self.regex(sub, f"{where}.properties.{name}", refs),
                   name in required) for name, sub in properties.items()]
        return r"\{" + _fields(fields) + r"\}"

    def array(self, schema: dict, where: str, refs: tuple) -> str:
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        for name, value in (("minItems", low), ("maxItems", high)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise _fail(where, f"has {name} {value!r}; give a whole number >= 0")
        if high is not None and high < low:
            raise _fail(where, f"has maxItems {high} < minItems {low}")
        if "prefixItems" in schema:  # a tuple: the first items each have their own schema
            prefix = schema["prefixItems"]
            if not isinstance(prefix, list) or schema.get("items", False) is not False:
                raise _fail(where, "has prefixItems that are not a list, or items beside them: lmforge writes "
                                   "tuples of the prefixItems alone")
            items = [self.regex(s, f"{where}.prefixItems[{i}]", refs) for i, s in enumerate(prefix)]
            longest = len(items) if high is None else min(high, len(items))
            if longest < low:
                raise _fail(where, f"has minItems {low} but only {len(items)} prefixItems")
            lengths = [r"\[" + ", ".join(items[:n]) + r"\]" for n in range(low, longest + 1)]
            return _either(lengths)
        item = self.regex(schema.get("items", True), f"{where}.items", refs)
        if high == 0:
            return r"\[\]"
        more = f"(?:, {item}){{{max(low - 1, 0)},{'' if high is None else high - 1}}}"
        body = f"{item}{more}"
        return r"\[" + (body if low > 0 else f"(?:{body})?") + r"\]"


def _fields(fields: list[tuple[str, bool]]) -> str:
    """The inside of an object: the fields in order, the optional ones (required False) may be left out, ", "
    between those written."""
    after = ""  # the fields from i on, once one has been written before them
    first = ""  # the fields from i on, none written yet
    for text, needed in reversed(fields):
        if needed:
            after, first = f", {text}{after}", f"{text}{after}"
        else:
            after, first = f"(?:, {text})?{after}", f"(?:{text}{after}|{first})" if first else f"(?:{text})?"
    return first


def _mapping(value: str) -> str:
    entry = f"{STRING}: {value}"
    return r"\{" + f"(?:{entry}(?:, {entry})*)?" + r"\}"


def any_value(depth: int) -> str:
    """Any JSON value whose arrays and objects nest at most `depth` deep."""
    scalar = _either([STRING, NUMBER, "true", "false", "null"])
    if depth == 0:
        return scalar
    inner = any_value(depth - 1)
    return f"(?:{scalar}|" + r"\[" + f"(?:{inner}(?:, {inner})*)?" + r"\]|" + _mapping(inner) + ")"


def integer_range(low: int | None, high: int | None) -> str:
    """The decimal integers from low to high (None: unbounded), written as JSON writes them."""
    parts = []
    if low is None or low < 0:  # the negative ones: -n for n in [max(1, -high), -low]
        parts.append("-" + _natural_range(max(1, -high) if high is not None else 1, None if low is None else -low))
        if high is not None and high < 0:
            return _either(parts)
    parts.append(_natural_range(max(0, low if low is not None else 0), high))
    return _either(parts[::-1])


def _natural_range(low: int, high: int | None) -> str:
    """The integers n with low <= n <= high (high None: no bound), low >= 0, without leading zeros."""
    if high is None:  # [low, 10^d - 1] with d the digits of low, then every longer number
        digits = len(str(low))
        return _either([_natural_range(low, 10 ** digits - 1), f"[1-9][0-9]{{{digits},}}"])
    options = []
    for digits in range(len(str(low)), len(str(high)) + 1):  # split by the number of digits
        lo, hi = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(high, 10 ** digits - 1)
        options.extend(_same_length(str(lo), str(hi)))
    return _either(options)


def _same_length(lo: str, hi: str) -> list[str]:
    """Expressions for the numbers from lo to hi, both written with the same number of digits."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]" if lo != hi else lo]
    if lo[0] == hi[0]:
        return [lo[0] + _either(_same_length(lo[1:], hi[1:]))]
    rest = len(lo) - 1
    out = []
    if lo[1:] == "0" * rest:
        first = lo[0]
    else:
        out.append(lo[0] + _either(_same_length(lo[1:], "9" * rest)))
        first = str(int(lo[0]) + 1)
    last = hi[0] if hi[1:] == "9" * rest else str(int(hi[0]) - 1)
    if int(first) <= int(last):
        out.append(f"[{first}-{last}][0-9]{{{rest}}}" if first != last else f"{first}[0-9]{{{rest}}}")
    if hi[1:] != "9" * rest:
        out.append(hi[0] + _either(_same_length("0" * rest, hi[1:])))
    return out
