"""Bounds of generate/json_schema.py the other tests leave open: an integer's fractional and exclusive bounds, and an
array's minItems and maxItems counted exactly (tuples too), string lengths that make no sense refused, and
additionalProperties false as the empty object."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.errors import ConfigError
from lmforge.generate.json_schema import json_schema_regex


def integers(schema: dict) -> list[int]:
    pattern = re.compile(json_schema_regex(schema))
    return [n for n in range(-12, 13) if pattern.fullmatch(str(n))]


@pytest.mark.parametrize("bounds, low, high", [
    ({"minimum": 2.5}, 3, 12), ({"minimum": -2.5}, -2, 12), ({"maximum": 2.5}, -12, 2),
    ({"exclusiveMinimum": 3}, 4, 12), ({"exclusiveMinimum": 2.5}, 3, 12), ({"exclusiveMinimum": -3}, -2, 12),
    ({"exclusiveMaximum": 3}, -12, 2), ({"exclusiveMaximum": 2.5}, -12, 2),
    ({"minimum": 0, "exclusiveMinimum": 1}, 2, 12), ({"exclusiveMinimum": 0, "exclusiveMaximum": 5}, 1, 4),
])
def test_an_integers_bounds_allow_exactly_the_integers_between_them(bounds, low, high):
    assert integers({"type": "integer", **bounds}) == list(range(low, high + 1))


@pytest.mark.parametrize("low, high", [(1, None), (2, None), (3, 4), (2, 2), (0, 3)])
def test_an_array_holds_exactly_min_items_to_max_items_items(low, high):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": low}
    if high is not None:
        schema["maxItems"] = high
    pattern = re.compile(json_schema_regex(schema))
    allowed = [n for n in range(7) if pattern.fullmatch(json.dumps(list(range(n))))]
    assert allowed == list(range(low, (high if high is not None else 6) + 1))


def test_a_tuple_holds_no_more_items_than_max_items():
    schema = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}, {"type": "boolean"}],
              "minItems": 1, "maxItems": 2}
    pattern = re.compile(json_schema_regex(schema))
    assert [bool(pattern.fullmatch(json.dumps(doc))) for doc in ([], [1], [1, "a"], [1, "a", True])] == \
        [False, True, True, False]


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "minLength": 5, "maxLength": 3}, "has maxLength 3 < minLength 5"),
    ({"type": "string", "minLength": True}, "has minLength True; give a whole number >= 0"),
    ({"type": "string", "maxLength": False}, "has maxLength False; give a whole number >= 0"),
])
def test_string_lengths_that_make_no_sense_are_refused(schema, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        json_schema_regex(schema)


def test_an_object_without_properties_is_empty_when_additional_properties_is_false_and_a_map_otherwise():
    empty = re.compile(json_schema_regex({"type": "object", "additionalProperties": False}))
    assert empty.fullmatch("{}") and not empty.fullmatch('{"a": 1}')
    mapping = re.compile(json_schema_regex({"type": "object", "additionalProperties": {"type": "integer"}}))
    assert all(mapping.fullmatch(json.dumps(d)) for d in ({}, {"a": 1}, {"a": 1, "b": -2}))
    assert not mapping.fullmatch('{"a": "x"}')
