"""A JSON schema as a regular expression (generate/json_schema.py): every document of the schema, written as
json.dumps writes it, matches, and documents that break one rule do not; decoding guided by a Pydantic model's
schema ($ref, optional fields, formats, bounds, tuples, maps) gives text that Pydantic validates."""

from __future__ import annotations

import datetime
import json
import random
import re
import string
import uuid
from typing import Any, Literal, Optional

import pytest
import torch
from pydantic import BaseModel, Field

from lmforge.errors import ConfigError
from lmforge.generate import TextGenerator
from lmforge.generate.json_schema import integer_range, json_schema_regex
from lmforge.model import GPT, ModelConfig
from lmforge.tokenizer import byte_tokenizer


class Address(BaseModel):
    street: str = Field(max_length=6)
    zip: Optional[int] = Field(default=None, ge=0, le=99999)


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=8, description="the name")
    age: int = Field(ge=1, le=120)
    email: Optional[str] = None
    kind: Literal["a", "b"]
    born: datetime.date
    seen: datetime.datetime
    id: uuid.UUID
    home: Address
    homes: list[Address] = Field(default=[], max_length=2)
    scores: dict[str, float]
    pair: tuple[int, str]
    mood: Any = None
    ratio: float = Field(ge=0)


SCHEMA = Person.model_json_schema()


def resolve(ref: str) -> dict:
    node: Any = SCHEMA
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def sample(schema: dict, rng: random.Random, depth: int = 0) -> Any:
    """A random value of `schema` (the subset Pydantic writes for Person), built independently of the regex."""
    if "$ref" in schema:
        return sample(resolve(schema["$ref"]), rng, depth)
    if "anyOf" in schema:
        return sample(rng.choice(schema["anyOf"]), rng, depth)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind is None:  # any value: a scalar, or a flat array or object of scalars
        scalars = [None, True, rng.randint(-99, 99), rng.random() * 10, text(rng, 0, 4)]
        return rng.choice(scalars + [scalars[:rng.randint(0, 5)], {text(rng, 0, 3): v for v in scalars[:2]}])
    if kind == "string":
        fmt = schema.get("format")
        moment = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
            seconds=rng.randint(0, 10 ** 9), microseconds=rng.choice([0, rng.randint(0, 999999)]))
        if fmt == "date":
            return moment.date().isoformat()
        if fmt == "date-time":
            return moment.astimezone(datetime.timezone(datetime.timedelta(hours=rng.randint(-12, 12)))).isoformat()
        if fmt == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return text(rng, schema.get("minLength", 0), schema.get("maxLength", 12))
    if kind == "integer":
        return rng.randint(schema.get("minimum", -10 ** 6), schema.get("maximum", 10 ** 6))
    if kind == "number":
        return rng.choice([0, 7, 0.5, 1e-7, 3.25e12, rng.random() * 1000]) * (1 if "minimum" in schema else
                                                                                rng.choice([1, -1]))
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        if "prefixItems" in schema:
            return [sample(s, rng, depth + 1) for s in schema["prefixItems"]]
        n = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 3))
        return [sample(schema["items"], rng, depth + 1) for _ in range(n)]
    if kind == "object":
        if "properties" not in schema:
            return {text(rng, 0, 5): sample(schema["additionalProperties"], rng, depth + 1)
                    for _ in range(rng.randint(0, 3))}
        required = schema.get("required", [])
        return {k: sample(s, rng, depth + 1) for k, s in schema["properties"].items()
                if k in required or rng.random() < 0.5}
    raise AssertionError(schema)


def text(rng: random.Random, low: int, high: int) -> str:
    alphabet = string.ascii_letters + ' "\\/\n\t\u00e9\u4e2d'  # quotes, escapes, control and non-ASCII characters
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def test_every_document_of_a_pydantic_schema_matches_written_as_json_dumps_writes_it():
    pattern = re.compile(json_schema_regex(SCHEMA))
    rng = random.Random(0)
    left_out = set()
    for _ in range(300):
        doc = sample(SCHEMA, rng)
        Person.model_validate_json(json.dumps(doc))  # the sampler's documents are the schema's
        left_out |= set(SCHEMA["properties"]) - set(doc)
        for written in (json.dumps(doc), json.dumps(doc, ensure_ascii=False)):
            assert pattern.fullmatch(written), written
    assert left_out == set(SCHEMA["properties"]) - set(SCHEMA["required"])  # every optional field was left out


def good() -> dict:
    return {"name": "Bo", "age": 30, "kind": "a", "born": "1999-12-31", "seen": "2024-02-03T04:05:06Z",
            "id": "12345678-9abc-4def-8123-456789abcdef", "home": {"street": "Via"},
            "scores": {"x": 1.5}, "pair": [1, "a"], "ratio": 0.5}


@pytest.mark.parametrize("change, why", [
    ({}, None),
    ({"age": 0}, "below the minimum"), ({"age": 121}, "above the maximum"), ({"age": 1.5}, "not an integer"),
    ({"name": ""}, "shorter than minLength"), ({"name": "a" * 9}, "longer than maxLength"),
    ({"name": None}, "required, not nullable"), ({"email": 5}, "neither a string nor null"),
    ({"kind": "c"}, "not in the enum"), ({"born": "1999-13-01"}, "no month 13"), ({"born": "1999-1-01"}, "not a date"),
    ({"seen": "2024-02-03T04:05:06"}, "a date-time has its offset"), ({"id": "not-a-uuid"}, "not a uuid"),
    ({"home": {"zip": 1}}, "street is required"), ({"home": {"street": "Via", "zip": -1}}, "zip >= 0"),
    ({"homes": [{"street": "a"}] * 3}, "over maxItems"), ({"scores": {"x": "1"}}, "a map of numbers"),
    ({"pair": [1]}, "a tuple of two"), ({"pair": [1, "a", 2]}, "a tuple of two"), ({"pair": ["a", 1]}, "in order"),
    ({"ratio": -0.5}, "minimum 0"), ({"mood": [[1]]}, "nested past ANY_DEPTH"), ({"extra": 1}, "not a property"),
])
def test_a_document_breaking_one_rule_does_not_match(change, why):
    pattern = re.compile(json_schema_regex(SCHEMA))
    doc = {**good(), **change}
    doc = {k: doc[k] for k in [*SCHEMA["properties"], "extra"] if k in doc}  # the schema's order
    assert bool(pattern.fullmatch(json.dumps(doc))) == (why is None), why
    if why is None:
        reordered = dict(reversed(list(doc.items())))
        assert not pattern.fullmatch(json.dumps(reordered))  # one way of writing it: the schema's order
        assert not pattern.fullmatch(json.dumps(doc, indent=1))


def test_integer_ranges_hold_exactly_the_integers_between_their_bounds():
    rng = random.Random(1)
    bounds = [(None, None), (0, None), (3, None), (None, 5), (None, -3), (-5, -2), (-5, 3), (0, 0), (10, 99),
              (15, 1234), (99, 100), (100, 1000)]
    bounds += [tuple(sorted(rng.sample(range(-3000, 3000), 2))) for _ in range(40)]
    for low, high in bounds:
        pattern = re.compile(integer_range(low, high))
        for n in range(-4000, 4001):
            assert bool(pattern.fullmatch(str(n))) == ((low is None or n >= low) and (high is None or n <= high)), \
                (low, high, n)
        assert not any(pattern.fullmatch(s) for s in ["01", "-0", "+1", "", "-", "1.0"])
    schema = {"type": "integer", "exclusiveMinimum": -2.5, "exclusiveMaximum": 4}  # -2, -1, ..., 3
    assert [n for n in range(-9, 9) if re.fullmatch(json_schema_regex(schema), str(n))] == list(range(-2, 4))


def test_optional_properties_may_each_be_left_out_and_commas_stay_right():
    schema = {"type": "object", "properties": {k: {"const": i} for i, k in enumerate("abcd")}, "required": ["c"]}
    pattern = re.compile(json_schema_regex(schema))
    for mask in range(16):
        doc = {k: i for i, k in enumerate("abcd") if mask >> i & 1}
        assert bool(pattern.fullmatch(json.dumps(doc))) == ("c" in doc), doc
    none_required = re.compile(json_schema_regex({"properties": {"a": {"type": "null"}, "b": {"type": "null"}}}))
    assert all(none_required.fullmatch(t) for t in ["{}", '{"a": null}', '{"b": null}', '{"a": null, "b": null}'])
    assert not any(none_required.fullmatch(t) for t in ['{, "b": null}', '{"a": null, }', '{"a": null "b": null}'])


def test_references_resolve_in_the_nearest_schema_with_an_id():
    def tool(kind: str) -> dict:  # two schemas of their own, each with its own $defs/X
        return {"$id": f"tool:{kind}", "$defs": {"X": {"type": kind}}, "properties": {"x": {"$ref": "#/$defs/X"}},
                "required": ["x"]}

    schema = {"$defs": {"X": {"const": "outer"}}, "anyOf": [tool("integer"), tool("boolean"), {"$ref": "#/$defs/X"}]}
    pattern = re.compile(json_schema_regex(schema))
    assert all(pattern.fullmatch(json.dumps(doc)) for doc in [{"x": 5}, {"x": True}, "outer"])
    assert not any(pattern.fullmatch(json.dumps(doc)) for doc in [{"x": "outer"}, {"x": None}, 5])


@pytest.mark.parametrize("schema, words", [
    ({"$defs": {"N": {"properties": {"next": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}}}},
      "$ref": "#/$defs/N"}, "refers to #/$defs/N inside itself: a recursive schema is not a regular language"),
    ({"properties": {"me": {"$ref": "#"}}}, "refers to # inside itself"),
    ({"$ref": "https://example.com/s.json"}, "lmforge reads references inside the schema"),
    ({"$ref": "#/$defs/Nope"}, "refers to #/$defs/Nope, which the schema does not hold"),
    ({"$ref": "#/$defs/A", "type": "object", "$defs": {"A": {}}}, "has 'type' beside '$ref'"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "allOf with more than one schema"),
    ({"type": "string", "format": "uri"}, "has format 'uri'; lmforge writes date, time, date-time"),
    ({"type": "string", "pattern": "a+", "maxLength": 3}, "has a pattern beside a format or length"),
    ({"type": "string", "pattern": r"(a)\1"}, "uses a backreference"),
    ({"type": "string", "pattern": "a(?=b)"}, "uses a lookaround"),
    ({"type": "string", "pattern": "(?i:a)"}, "uses inline flags"),
    ({"type": "string", "pattern": "a$b"}, "uses an anchor inside it"),
    ({"type": "string", "pattern": "a("}, "which is not a regular expression"),
    ({"type": "string", "pattern": 5}, "has pattern 5; a pattern is a regular expression"),
    ({"type": "string", "format": "date", "maxLength": 3}, "has both a format and a length"),
    ({"type": "number", "maximum": 3}, "lmforge bounds numbers only by minimum 0"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "allows no integer (between 5 and 4)"),
    ({"type": "integer", "minimum": "1"}, "has minimum '1'; give a finite number"),
    ({"type": "string", "maxLength": -1}, "has maxLength -1; give a whole number >= 0"),
    ({"type": "array", "prefixItems": [{"type": "null"}], "items": {"type": "null"}}, "items beside them"),
    ({"type": "array", "prefixItems": [{"type": "null"}], "minItems": 2}, "minItems 2 but only 1 prefixItems"),
    ({"type": "object", "required": ["a"], "properties": {"b": {}}}, "requires 'a', which its properties"),
    ({"minimum": 1}, "has 'minimum' but no type"),
    ({"$defs": {f"L{i}": {"type": "array", "prefixItems": [{"$ref": f"#/$defs/L{i + 1}"}] * 2} for i in range(25)}
      | {"L25": {"type": "integer"}}, "$ref": "#/$defs/L0"}, "more than 200000 characters (references"),
    (json.loads('{"items": ' * 80 + "{}" + "}" * 80), "nested more than 64 deep"),
])
def test_what_cannot_be_a_regular_expression_is_one_clear_error(schema, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as caught:
        json_schema_regex(schema)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("generate.guided_json: ")


PATTERNS = [r"^[0-9]-[a-z]$", r"a\"b|\\\n", r"(ab|\d)+,?", r".{2}", r"[^a1]+", r"\w\s?\W", r"[\x00-\x1f\"]b*",
            r"(?:a|b\\){1,3}?", r"\S\D"]
ALPHABET = ['a', 'b', '1', '2', '-', ',', ' ', '"', '\\', '\n', '\x01']


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_string_pattern_holds_the_json_text_of_exactly_the_strings_that_match_it(pattern):
    """Every string of up to 3 characters (quotes, backslashes and control characters among them): its JSON text,
    as json.dumps writes it, matches the string's expression exactly when the string is a whole match of the
    pattern; Python's re and interegular's automaton (what decoding walks) agree on it."""
    import itertools

    import interegular

    text_regex = json_schema_regex({"type": "string", "pattern": pattern})
    automaton = interegular.parse_pattern(text_regex).to_fsm()
    bare = pattern.removeprefix("^").removesuffix("$")
    matched = 0
    for n in range(4):
        for chars in itertools.product(ALPHABET, repeat=n):
            value = "".join(chars)
            want = re.fullmatch(bare, value) is not None
            assert (re.fullmatch(text_regex, json.dumps(value)) is not None) == want, (pattern, value)
            assert automaton.accepts(json.dumps(value)) == want, (pattern, value)
            matched += want
    assert matched > 0


def test_decoding_guided_by_a_pydantic_model_with_patterns_gives_what_pydantic_validates():
    class Ticket(BaseModel):
        code: str = Field(pattern=r"^[A-Z]{2}-\d{3}$")
        note: str = Field(pattern=r'^[a-z"\\ ]{1,6}$')

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=259, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    samples = TextGenerator(model, byte_tokenizer()).complete(
        ["Ticket: "], temperature=1.5, seed=0, guided_json=Ticket.model_json_schema(), max_new_tokens=60,
        num_return_sequences=12)[0]
    done = [Ticket.model_validate_json(c.text) for c in samples if c.finish_reason == "stop"]
    assert len(done) >= 10
    assert all(re.fullmatch(r"[A-Z]{2}-\d{3}", t.code) and re.fullmatch(r'[a-z"\\ ]{1,6}', t.note) for t in done)
    assert any('"' in t.note or "\\" in t.note for t in done)  # written escaped, read back


def test_decoding_guided_by_a_nested_pydantic_model_gives_json_that_pydantic_validates():
    class Place(BaseModel):
        city: str = Field(max_length=3)
        zip: Optional[int] = Field(default=None, ge=0, le=99)

    class Event(BaseModel):
        kind: Literal["talk", "game"]
        day: datetime.date
        place: Place
        rank: int = Field(ge=-3, le=12)
        tags: list[Literal["x", "y"]] = Field(default=[], max_length=2)
        pair: tuple[bool, Optional[int]]

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=259, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    gen = TextGenerator(model, byte_tokenizer())
    schema = Event.model_json_schema()
    assert "$defs" in schema and "$ref" in json.dumps(schema["properties"])  # a reference, as Pydantic writes it
    samples = gen.complete(["Event: "], temperature=1.5, seed=0, guided_json=schema, max_new_tokens=200,
                           num_return_sequences=12)[0]
    done = [Event.model_validate_json(c.text) for c in samples if c.finish_reason == "stop"]
    assert len(done) >= 10
    fields = [set(json.loads(c.text)) | set(json.loads(c.text)["place"]) for c in samples if c.finish_reason == "stop"]
    assert any("zip" not in f for f in fields) and any("zip" in f for f in fields)  # optional: sometimes left out
