"""Structured outputs (xgrammar): JSON schemas, regex, choice and EBNF grammars through the server on the demo model,
sampled at temperature 1.0 with n=4; every output must parse and validate (jsonschema, re.fullmatch). Also the
engine side: masks applied on the device match the bitmask bit for bit, preempted sequences keep their grammar
state, speculative decoding leaves constrained requests alone, and compiled grammars are cached.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from collections.abc import Iterator

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch

from miniserve.config import DEMO_TARGET
from tests.test_server import patch_on_import, run_server

MODEL = "shakespeare-target"
S = {"type": "string", "maxLength": 8}  # bounded strings keep the demo model's outputs short

SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
     "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["x", "y"]}},
     "required": ["p"]},
    {"type": "object", "properties": {"name": S, "nick": S}, "required": ["name"]},  # nick optional
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["score"]},
    {"type": "object", "properties": {"kind": {"const": "play"}, "acts": {"type": "integer", "minimum": 1,
     "maximum": 5}}, "required": ["kind", "acts"]},
    {"type": "object", "properties": {"who": {"type": "object", "properties": {"first": S, "last": S},
     "required": ["first"]}, "when": {"type": "integer", "minimum": 1500, "maximum": 1700}},
     "required": ["who", "when"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
     {"type": "null"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"grid": {"type": "array", "items": {"type": "array", "items":
     {"enum": [0, 1]}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}}, "required": ["grid"]},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"enum": ["x", "y"]}},
     "required": ["a", "b", "c"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties":
     {"id": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["id"]}, "maxItems": 2}},
     "required": ["items"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1590, "maximum": 1613},
     "genre": {"enum": ["comedy", "tragedy", "history"]}}, "required": ["title", "year", "genre"]},
    {"type": "object", "properties": {"m": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}},
     "required": ["m"]},
    {"type": "string", "enum": ["aye", "nay"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"lord": {"type": "object", "properties": {"title": {"enum": ["duke",
     "earl"]}, "lands": {"type": "array", "items": S, "maxItems": 2}}, "required": ["title", "lands"]}},
     "required": ["lord"]},
]  # fmt: skip


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server(DEMO_TARGET, MINISERVE_MAX_NUM_SEQS="128") as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)


def test_the_model_path_as_given_names_the_model_too(client):
    """Without --served-model-name the server answers to the model directory's name and, as vLLM (whose served
    name defaults to it), to the --model path as given (lm-eval's model=PATH); any other name is a 404."""
    assert client.models.list().data[0].id == MODEL
    for name in (str(DEMO_TARGET), str(DEMO_TARGET) + "/"):
        assert client.models.retrieve(name).id == MODEL
        assert client.completions.create(model=name, prompt="ROMEO:", max_tokens=1).model == MODEL
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=str(DEMO_TARGET.parent), prompt="ROMEO:", max_tokens=1)


def _schema_request(i: int, schema: dict) -> dict:
    """The three spellings in turn: response_format json_schema (strict), structured_outputs.json, guided_json."""
    body: dict = {"model": MODEL, "prompt": "ROMEO:", "n": 4, "temperature": 1.0, "seed": i, "max_tokens": 120}
    options = {"structured_outputs": {"disable_any_whitespace": True}}  # compact: short outputs on a tiny model
    if i % 3 == 0:
        rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        return {**body, "response_format": rf, **options}
    if i % 3 == 1:
        return {**body, "structured_outputs": {"json": schema, "disable_any_whitespace": True}}
    return {**body, "guided_json": json.dumps(schema), **options}


def test_twenty_json_schemas_sampled_with_n4_all_parse_and_validate(url):
    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=600) as http:
            replies = await asyncio.gather(
                *(http.post(url + "/v1/completions", json=_schema_request(i, s)) for i, s in enumerate(SCHEMAS))
            )
        return [r.json() for r in replies]

    replies = asyncio.run(run())
    for schema, reply in zip(SCHEMAS, replies):
        assert "choices" in reply, reply
        texts = [c["text"] for c in reply["choices"]]
        assert len(texts) == 4
        for choice in reply["choices"]:
            assert choice["finish_reason"] == "stop", (schema, choice)
            value = json.loads(choice["text"])
            jsonschema.validate(value, schema)
            if isinstance(value, dict) and set(value) == set(schema["properties"]):  # in the schema's order
                assert list(value) == list(schema["properties"]), choice["text"]
    distinct = sum(len({c["text"] for c in r["choices"]}) for r in replies)
    assert distinct > 30  # temperature 1.0 really samples


def test_json_object_with_whitespace_and_chat_json_schema(client):
    # chat, default whitespace: allowed between tokens but bounded (no newline loop up to max_tokens)
    schema = SCHEMAS[3]
    rf = {"type": "json_schema", "json_schema": {"name": "color", "schema": schema}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe thyself."}],
                                       n=4, temperature=1.0, seed=1, max_tokens=200, response_format=rf)  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)
        gaps = re.findall(r"\s+", re.sub(r'"(?:[^"\\]|\\.)*"', '""', c.message.content))
        assert all(len(gap) <= 16 for gap in gaps), c.message.content
    # json_object: any object (unbounded, so some outputs may run to max_tokens); what ends is an object
    r = client.completions.create(model=MODEL, prompt="ROMEO:", n=4, temperature=1.0, seed=1, max_tokens=60,
                                  extra_body={"response_format": {"type": "json_object"},
                                              "structured_outputs": {"disable_any_whitespace": True}})  # fmt: skip
    for c in r.choices:
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


def test_regex_choice_and_grammar(client):
    cases = [
        ({"guided_regex": r"[0-9]{3}-[a-z]{2,5}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        ({"structured_outputs": {"regex": r"(thou|thee) (art|hast) [a-z]{1,6}"}},
         lambda t: re.fullmatch(r"(thou|thee) (art|hast) [a-z]{1,6}", t)),
        ({"guided_choice": ["yes", "no", "perchance"]}, lambda t: t in ("yes", "no", "perchance")),
        ({"structured_outputs": {"choice": ["to be", "not to be"]}}, lambda t: t in ("to be", "not to be")),
        ({"guided_grammar": 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'},
         lambda t: re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", t)),
    ]  # fmt: skip
    for extra, ok in cases:
        r = client.completions.create(model=MODEL, prompt="ROMEO:", n=4, temperature=1.0, seed=3, max_tokens=40,
                                      extra_body=extra)  # fmt: skip
        for c in r.choices:
            if c.finish_reason == "stop":
                assert ok(c.text), (extra, c.text)
            else:  # the grammar never ends on its own (a repetition): what came out is a prefix of a sentence
                assert c.finish_reason == "length" and "grammar" in str(extra), (extra, c.text)


def test_logprobs_are_the_grammars_as_vllms_are(client):
    """vLLM masks the logits with the grammar before its sampler computes logprobs: at every constrained position
    the listed alternatives that are not -9999.0 (vLLM's stand-in for -inf) are tokens the grammar allows, and they
    hold all the probability (a classifier reads P(yes) off them), chat and legacy completions alike."""
    choices = ["yes", "no", "perchance"]
    end = "</s>"  # the demo model's EOS, allowed once a choice is complete

    def check(steps: list[tuple[str, float, list[tuple[str, float]]]]) -> None:
        text = ""
        for token, logprob, top in steps:  # (two tokens may read alike: a list, not a dict)
            allowed = [(t, v) for t, v in top if v > -9999.0]
            for t, _ in allowed:
                assert any(c.startswith(text + t) for c in choices) or (t == end and text in choices), (text, top)
            assert (token, logprob) in allowed
            assert math.isclose(sum(math.exp(v) for _, v in allowed), 1.0, abs_tol=1e-3), (text, top)
            text += "" if token == end else token

    extra = {"guided_choice": choices}
    r = client.completions.create(model=MODEL, prompt="ROMEO:", n=3, temperature=1.0, seed=4, max_tokens=10,
                                  logprobs=20, extra_body=extra)  # fmt: skip
    for c in r.choices:
        assert c.text in choices
        tops = [list(top.items()) for top in c.logprobs.top_logprobs]
        check(list(zip(c.logprobs.tokens, c.logprobs.token_logprobs, tops)))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Wilt thou?"}],
                                       temperature=1.0, seed=5, max_tokens=10, logprobs=True, top_logprobs=20,
                                       extra_body=extra)  # fmt: skip
    content = r.choices[0].logprobs.content
    check([(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in content])


def test_streaming_n2_matches_non_streaming_and_stop_strings_cut_the_output(client):
    schema = SCHEMAS[15]
    extra = {"guided_json": schema, "structured_outputs": {"disable_any_whitespace": True}}
    kwargs = dict(model=MODEL, prompt="ROMEO:", n=2, temperature=1.0, seed=9, max_tokens=120, extra_body=extra)
    whole = client.completions.create(**kwargs)
    parts: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            parts[c.index] += c.text
    assert [parts[0], parts[1]] == [c.text for c in whole.choices]
    for c in whole.choices:
        jsonschema.validate(json.loads(c.text), schema)
    # a stop string ends a constrained output early, as it ends any other
    r = client.completions.create(**{**kwargs, "stop": ['"year"']})
    for c, full in zip(r.choices, whole.choices):
        assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == '"year"'
        assert full.text.startswith(c.text) and '"year"' not in c.text


def test_invalid_constraints_are_400s_naming_the_field(url):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        # a schema beside another type would constrain nothing
        ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"response_format": {"type": "text", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "guided_json"),
        ({"guided_regex": "a+", "min_tokens": 3}, "min_tokens"),  # the grammar decides where the output ends
        ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs"),  # options, no constraint
        ({"structured_outputs": {}}, "structured_outputs"),
        # masks that leave no token to begin with: token 0 (<unk>) cannot begin "a"
        ({"guided_regex": "a", "allowed_token_ids": [0]}, "allowed_token_ids"),
    ]  # fmt: skip
    for extra, param in cases:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())


@pytest.mark.parametrize(
    ("schema", "refused"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"tags": {"type": "array", "contains": {"const": 5}}}},
         "contains at properties.tags"),
        ({"type": "number", "multipleOf": 0.5}, "multipleOf (enforced on integers only)"),
        ({"not": {"type": "integer"}}, "not"),
        ({"if": {"minimum": 5}, "then": {"maximum": 6}}, "if"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf of more than one schema"),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "http://example.com/a.json"}}}, "$ref 'http://example.com/a.json'"
         " at $defs.a"),
        # what xgrammar enforces passes: keyword-named properties, uniqueItems false, integer multipleOf, one allOf
        ({"type": "object", "properties": {"not": {"type": "integer"}, "if": {"type": "string"}}}, None),
        ({"type": "array", "items": {"type": "integer", "multipleOf": 3}, "uniqueItems": False}, None),
        ({"allOf": [{"type": "integer", "minimum": 3}]}, None),
        ({"type": "string", "enum": ["ab", "abc"], "minLength": 2, "maxLength": 3}, None),  # every value fits
        ({"type": "string", "enum": ["ab", 7], "maxLength": 3}, "type beside enum value 7"),
        ({"type": "integer", "enum": [1.0, 2]}, None),  # 1.0 is an integer to JSON Schema
        # numbers compared exactly: past 2**53 (a float would round this one to its bound), and past a float's range
        ({"const": 2**53 + 1, "maximum": 2**53}, "maximum beside const value 9007199254740993"),
        ({"type": "integer", "enum": [10**400], "minimum": 0}, None),
        # pydantic's shapes: annotations beside anyOf or $ref change nothing
        ({"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Name"}, None),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "object"}}, "description": "an a"}, None),
        # a type beside anyOf, oneOf, allOf or $ref that their schemas already have restricts nothing: taken
        ({"type": "object", "oneOf": [{"type": "object", "required": ["k"]}, {"type": "object"}]}, None),
        ({"type": "number", "anyOf": [{"type": "integer"}, {"type": "number"}]}, None),
        ({"type": "object", "allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"type": "object"}}}, None),
        ({"type": "object", "$ref": "#/$defs/a", "$defs": {"a": {"type": "object"}}}, None),
        ({"type": "object", "$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}}, "type beside $ref"),
        ({"type": "string", "anyOf": [{"type": "integer"}, {"type": "string"}]}, "type beside anyOf"),
    ],
)  # fmt: skip
def test_schema_keywords_the_grammar_would_not_enforce_are_refused(schema, refused):
    """Outputs that finish must satisfy their schema: a keyword xgrammar compiles but does not enforce (it accepts
    [1, 1] under uniqueItems) is refused by name, as vLLM's xgrammar backend refuses the like."""
    from miniserve.engine.structured_output import unenforced_keyword

    got = unenforced_keyword(schema)
    assert got == refused if refused is None else got.startswith(refused), got


@pytest.mark.parametrize(
    ("schema", "breaking", "refused"),
    [
        ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "abcdef", "maxLength beside pattern"),
        ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$", "minLength": 3}}, {"a": 1},
         "minLength at propertyNames beside pattern"),
        ({"type": "string", "format": "date", "maxLength": 4}, "2020-01-01", "maxLength beside format"),
        ({"type": "integer", "multipleOf": 3, "minimum": 0}, 4, "multipleOf beside minimum"),
        ({"type": "integer", "multipleOf": 5, "exclusiveMaximum": 100}, 7, "multipleOf beside exclusiveMaximum"),
        ({"type": "string", "pattern": "^(?!no)[a-z]+$"}, "nope", "pattern with a lookaround assertion"),
        # the listed values are enforced, their lengths not (no warning)
        ({"type": "string", "enum": ["ab", "abcd"], "maxLength": 3}, "abcd", "maxLength beside enum value 'abcd'"),
        ({"type": "string", "const": "abcd", "maxLength": 2}, "abcd", "maxLength beside const value 'abcd'"),
        ({"enum": ["a", "abcdef", 1], "minLength": 3}, "a", "minLength beside enum value 'a'"),
        # the bound it breaks is named; a bound written as a float counts; a const beside an enum is checked too
        ({"type": "string", "enum": ["abcd"], "minLength": 1, "maxLength": 3}, "abcd", "maxLength beside enum value"),
        ({"type": "string", "enum": ["abcd"], "maxLength": 2.0}, "abcd", "maxLength beside enum value 'abcd'"),
        ({"type": "string", "enum": ["ab", "abcd"], "const": "abcd", "maxLength": 3}, "abcd", "maxLength beside enum"),
        # nor their type or numeric bounds
        ({"enum": [1, 10], "minimum": 5}, 1, "minimum beside enum value 1"),
        ({"enum": [1, "a"], "type": "string"}, 1, "type beside enum value 1"),
        ({"const": 5, "exclusiveMaximum": 5}, 5, "exclusiveMaximum beside const value 5"),
        # beside anyOf, oneOf, allOf or $ref only that is enforced
        ({"oneOf": [{"type": "string"}], "maxLength": 3}, "abcdef", "maxLength beside oneOf"),
        ({"allOf": [{"type": "string"}], "pattern": "^a"}, "b", "pattern beside allOf"),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}], "type": "integer"}, "s", "type beside anyOf"),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "object"}}, "required": ["b"]}, {}, "required beside $ref"),
        ({"properties": {"a": {"type": "integer"}}, "anyOf": [{"type": "object"}]}, {"a": "x"},
         "properties beside anyOf"),
        ({"anyOf": [{"type": "object"}], "minProperties": 2}, {}, "minProperties beside anyOf"),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}], "allOf": [{"type": "integer"}]}, "s",
         "allOf beside anyOf"),
        ({"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}], "maximum": 3}}}, {"a": 7},
         "maximum at properties.a beside anyOf"),
    ],
)  # fmt: skip
def test_keywords_xgrammar_drops_with_a_warning_are_refused(schema, breaking, refused):
    """xgrammar 0.2 compiles these schemas with a warning on stderr and leaves a keyword out of the grammar
    (lengths beside a pattern or format, multipleOf beside a range, a lookahead), or silently enforces an enum's
    values without their lengths: a value the schema forbids (by
    jsonschema) walks through xgrammar's own grammar to its end. Refused by name instead, as vLLM refuses the first
    two, so that no output a request gets back breaks its schema."""
    from miniserve.engine.structured_output import GrammarCompiler
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.tokenizer import Tokenizer

    xgr = pytest.importorskip("xgrammar")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(breaking, schema)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_json_schema(schema))
    assert matcher.accept_string(json.dumps(breaking)) and matcher.is_completed()  # what the grammar alone lets by
    compiler = GrammarCompiler(Tokenizer.from_pretrained(str(DEMO_TARGET)), 4096, {2})
    with pytest.raises(ValueError, match=re.escape(refused)):
        compiler.compile(StructuredOutputsParams(json=schema))


def test_min_tokens_and_lark_grammars_are_refused_with_what_to_do():
    from miniserve import SamplingParams
    from miniserve.engine.structured_output import GrammarCompiler
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="min_tokens cannot be combined with structured outputs"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+"))
    compiler = GrammarCompiler(Tokenizer.from_pretrained(str(DEMO_TARGET)), 4096, {2})
    with pytest.raises(ValueError, match="a Lark grammar[?] write it as EBNF"):
        compiler.compile(StructuredOutputsParams(grammar='start: "a"'))
    with pytest.raises(ValueError, match="uniqueItems: the grammar engine"):
        compiler.compile(StructuredOutputsParams(json={"type": "array", "uniqueItems": True}))


# ---------------------------------------------------------------------------------------------- the engine side


def test_bitmask_application_matches_the_bit_layout():
    from miniserve.engine.sampler import apply_token_bitmask

    g = torch.Generator().manual_seed(0)
    for vocab in (31, 32, 33, 100):
        words = -(-vocab // 32)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
        logits = torch.randn(3, vocab, generator=g)
        out = apply_token_bitmask(logits.clone(), bitmask)
        for row in range(3):
            for token in range(vocab):
                allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1  # python ints: an independent read
                assert out[row, token] == (logits[row, token] if allowed else -float("inf"))


@pytest.fixture(scope="module")
def llm_factory():
    from miniserve import LLM

    made = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            made[key] = LLM(**kwargs)
        return made[key]

    return make


def _constrained(schema: dict, **kwargs):
    from miniserve import SamplingParams
    from miniserve.sampling_params import StructuredOutputsParams

    spec = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 120, "structured_outputs": spec, **kwargs})


def test_a_grammar_and_token_masks_that_leave_nothing_to_begin_with_are_refused(llm_factory):
    """allowed_token_ids or bad_words that mask every token the grammar may begin with: refused by name (the
    sampler would have had no token to draw, and took token 0); one allowed token that can begin it is enough."""
    from miniserve import SamplingParams
    from miniserve.engine.sampler import check_allowed_tokens
    from miniserve.sampling_params import StructuredOutputsParams

    llm = llm_factory()
    a = llm.get_tokenizer().encode("a", add_special_tokens=False)
    assert len(a) == 1  # (and the byte token <0x61> is "a" too: bad_words alone cannot ban both)
    regex = StructuredOutputsParams(regex="a+")
    for masks in ({"allowed_token_ids": [0]}, {"allowed_token_ids": [0, a[0]], "bad_words": ["a"]}):
        with pytest.raises(ValueError, match="^allowed_token_ids: no token the output's grammar"):
            llm.generate("x", SamplingParams(structured_outputs=regex, **masks), use_tqdm=False)
    params = SamplingParams(structured_outputs=regex, allowed_token_ids=[0, a[0]], max_tokens=5)
    assert llm.generate("x", params, use_tqdm=False)[0].outputs[0].text == "aaaaa"
    # the other two ways nothing is left, on a grammar's first tokens given outright
    banned = SamplingParams(bad_words=["a"])
    banned.bad_words_token_ids = [[5]]
    with pytest.raises(ValueError, match="^bad_words: no token the output's grammar"):
        check_allowed_tokens(banned, {2}, 10, np.arange(10) == 5)
    check_allowed_tokens(banned, {2}, 10, np.isin(np.arange(10), [5, 6]))
    with pytest.raises(ValueError, match="the grammar allows no token to begin the output with"):
        check_allowed_tokens(SamplingParams(allowed_token_ids=[5]), {2}, 10, np.zeros(10, dtype=bool))


def test_preempted_sequences_keep_following_their_grammar(llm_factory):
    llm = llm_factory(num_kv_blocks=7, max_num_seqs=4)  # 112 token slots for 4 sequences of ~50: preemptions
    before = llm.engine.scheduler.num_preemptions
    schema = SCHEMAS[4]
    outs = llm.generate(["ROMEO:", "JULIET:"], _constrained(schema, n=2, seed=2, max_tokens=100), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > before
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), schema)


def test_constrained_requests_skip_speculation_and_the_compiler_caches(llm_factory):
    from miniserve import SamplingParams

    llm = llm_factory(speculative_model="demo", num_speculative_tokens=3)
    schema = SCHEMAS[9]
    compiled = llm.engine.grammar.num_compiled
    constrained = _constrained(schema, seed=4)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(["ROMEO:", "JULIET:"], [constrained, free], use_tqdm=False)
    jsonschema.validate(json.loads(outs[0].outputs[0].text), schema)
    assert outs[0].metrics["num_spec_drafts"] == 0 and outs[1].metrics["num_spec_drafts"] > 0
    llm.generate(["ROMEO:"], _constrained(schema, seed=5), use_tqdm=False)
    assert llm.engine.grammar.num_compiled == compiled + 1  # the second request found it compiled


def test_a_constrained_request_reserves_no_draft_lookahead(llm_factory):
    """Never speculated, a constrained request fits a pool of exactly its length beside a draft (2 blocks of 16:
    prompt + max_tokens - 1 = 32 slots), where an unconstrained one of the same length needs the lookahead's 2k + 1
    slots more, and runs there to the end."""
    from miniserve import SamplingParams

    llm = llm_factory(speculative_model="demo", num_speculative_tokens=3, num_kv_blocks=2, block_size=16)
    prompt = llm.get_tokenizer().encode("ROMEO:")
    fits = _constrained(SCHEMAS[9], seed=4, max_tokens=32 - len(prompt) + 1, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], fits, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason in ("stop", "length") and out.metrics["num_spec_drafts"] == 0
    with pytest.raises(ValueError, match="7 of them for the draft's proposals"):
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=fits.max_tokens), use_tqdm=False)


def test_without_xgrammar_a_constrained_request_is_a_clear_error(monkeypatch):
    import sys

    from miniserve.engine.structured_output import GrammarCompiler, StructuredOutputsUnavailable
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.tokenizer import Tokenizer

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now fails, as in an install without it
    compiler = GrammarCompiler(Tokenizer.from_pretrained(DEMO_TARGET), 4096, {2})
    with pytest.raises(StructuredOutputsUnavailable, match="pip install xgrammar"):
        compiler.compile(StructuredOutputsParams(regex="[a-z]+"))


def test_a_grammar_compiled_by_the_api_process_is_loaded_by_the_engine_not_recompiled():
    """The server compiles in the API process and sends the grammar serialized, once; the engine's compiler loads it
    (no compile) and its matcher walks exactly like the one compiled in place."""
    from miniserve.engine.structured_output import GrammarCompiler, GrammarState, MaskFiller
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO_TARGET)
    vocab = json.loads((DEMO_TARGET / "config.json").read_text())["vocab_size"]
    api, engine = GrammarCompiler(tok, vocab, {2}), GrammarCompiler(tok, vocab, {2})
    spec = StructuredOutputsParams(json=SCHEMAS[3], disable_any_whitespace=True)
    engine.load(spec, api.payload(spec))
    assert api.payload(spec) is None  # sent once: the engine's cache has it
    loaded, compiled = engine.new_state(spec), GrammarState(api.new_state(spec).matcher)
    assert (api.num_compiled, engine.num_compiled) == (1, 0)
    filler = MaskFiller(vocab, torch.device("cpu"))
    for token in tok.encode('{"color": "green"}', add_special_tokens=False):
        masks = [filler.build([s]) for s in (loaded, compiled)]
        assert torch.equal(masks[0], masks[1])
        assert loaded.accept(token) and compiled.accept(token)
    assert loaded.accept(2) and loaded.terminated  # the stop token completes it


def test_a_grammar_of_many_rules_is_not_sent_serialized_but_compiled_by_the_engine(monkeypatch):
    """xgrammar writes a grammar quadratically large in its rules (100 tools under tool_choice "required": 43 MB),
    so past MAX_SHIPPED_GRAMMAR the API process sends nothing and the engine's compiler compiles the spec itself,
    into a matcher that walks like the API's. At the bound exactly a grammar is still sent; one unit below, not."""
    import miniserve.engine.structured_output as so
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.server.tool_calls import required_schema
    from miniserve.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO_TARGET)
    vocab = json.loads((DEMO_TARGET / "config.json").read_text())["vocab_size"]
    api, engine = so.GrammarCompiler(tok, vocab, {2}), so.GrammarCompiler(tok, vocab, {2})
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": parameters}} for i in range(100)]
    big = StructuredOutputsParams(json=json.dumps(required_schema(tools, True)), disable_any_whitespace=True)
    assert api.payload(big) is None
    state, want = engine.new_state(big), so.GrammarState(api.new_state(big).matcher)
    assert (api.num_compiled, engine.num_compiled) == (1, 1)
    filler = so.MaskFiller(vocab, torch.device("cpu"))
    for token in tok.encode('[{"name": "f42", "parameters": {"a": 7}}]', add_special_tokens=False):
        assert torch.equal(filler.build([state]), filler.build([want]))
        assert state.accept(token) and want.accept(token)
    assert state.accept(2) and state.terminated

    small = StructuredOutputsParams(json=SCHEMAS[3], disable_any_whitespace=True)
    text = str(api.compile(small).grammar)
    monkeypatch.setattr(so, "MAX_SHIPPED_GRAMMAR", (text.count("\n") + 1) * len(text))
    assert so.GrammarCompiler(tok, vocab, {2}).payload(small) is not None
    monkeypatch.setattr(so, "MAX_SHIPPED_GRAMMAR", so.MAX_SHIPPED_GRAMMAR - 1)
    assert so.GrammarCompiler(tok, vocab, {2}).payload(small) is None


def test_the_grammar_cache_is_bounded_in_bytes_as_well_as_in_grammars(monkeypatch):
    """Distinct schemas do not grow the cache past _CACHE_BYTES: at the bound exactly every grammar stays; one byte
    below it, the least recently used goes (and is compiled again when asked for), never the newest."""
    import miniserve.engine.structured_output as so
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO_TARGET)
    vocab = json.loads((DEMO_TARGET / "config.json").read_text())["vocab_size"]
    specs = [StructuredOutputsParams(json=schema) for schema in SCHEMAS[:3]]
    sizes = [so.GrammarCompiler(tok, vocab, {2}).compile(spec).memory_size_bytes for spec in specs]
    for limit, compiled in ((sum(sizes), 3), (sum(sizes) - 1, 4)):
        monkeypatch.setattr(so, "_CACHE_BYTES", limit)
        grammars = so.GrammarCompiler(tok, vocab, {2})
        for spec in specs + specs[:1]:  # the first again: still cached, or dropped for the third
            grammars.compile(spec)
        assert grammars.num_compiled == compiled
    monkeypatch.setattr(so, "_CACHE_BYTES", 1)
    grammars = so.GrammarCompiler(tok, vocab, {2})
    for spec in specs:
        assert grammars.compile(spec) is grammars.compile(spec)  # the newest stays, whatever its size
    assert grammars.num_compiled == 3


# In the API process, a compile of the regex "(stuck)" waits until the file named by MINISERVE_TEST_RELEASE exists.
STUCK_COMPILE = patch_on_import(
    "miniserve.engine.structured_output",
    """
import os, time

def patch(module):
    compile_ = module.GrammarCompiler.compile

    def stuck(self, spec):
        while spec.regex == "(stuck)" and not os.path.exists(os.environ["MINISERVE_TEST_RELEASE"]):
            time.sleep(0.05)
        return compile_(self, spec)

    module.GrammarCompiler.compile = stuck
""",
)


def test_grammars_that_compile_for_long_do_not_hold_up_other_requests(tmp_path):
    """Compiles run on threads of their own: with as many stuck in compiling as the server has tokenizing threads,
    a plain text request is still answered, and the stuck ones are answered once their compiles end."""
    from miniserve.server.state import CPU_THREADS

    (tmp_path / "sitecustomize.py").write_text(STUCK_COMPILE)
    release = tmp_path / "release"
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)

    async def run(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2}
            stuck = [asyncio.create_task(http.post("/v1/completions", json={**body, "structured_outputs": {
                "regex": "(stuck)"}})) for _ in range(CPU_THREADS)]  # fmt: skip
            await asyncio.sleep(1)
            plain = await asyncio.wait_for(http.post("/v1/completions", json=body), 60)
            assert plain.status_code == 200 and not any(t.done() for t in stuck)
            release.touch()
            for r in await asyncio.gather(*stuck):  # the pattern's first tokens
                assert r.status_code == 200 and "stuck".startswith(r.json()["choices"][0]["text"])

    with run_server(DEMO_TARGET, PYTHONPATH=path, MINISERVE_TEST_RELEASE=str(release)) as base:
        asyncio.run(run(base))


def test_a_server_without_xgrammar_serves_and_refuses_constraints_by_name(tmp_path):
    """xgrammar is an optional extra: hidden from the server, plain requests work and every constrained one is a
    400 naming the field it came from and saying what to install."""
    hidden = tmp_path / "xgrammar"
    hidden.mkdir()
    (hidden / "__init__.py").write_text('raise ImportError("xgrammar is hidden by this test")\n')
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    with run_server(DEMO_TARGET, PYTHONPATH=path) as base:
        plain = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 3}
        assert httpx.post(base + "/v1/completions", json=plain, timeout=60).status_code == 200
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        cases = [
            ("/v1/completions", {**plain, "response_format": {"type": "json_object"}}, "response_format"),
            ("/v1/completions", {**plain, "guided_regex": "[a-z]+"}, "guided_regex"),
            ("/v1/completions", {**plain, "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
            ("/v1/chat/completions", {**chat, "tools": tools, "tool_choice": "required"}, "tool_choice"),
        ]
        for path_, body, param in cases:
            r = httpx.post(base + path_, json=body, timeout=60)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and "pip install xgrammar" in err["message"], err


def test_costly_fills_move_to_threads_and_cheap_ones_come_back(monkeypatch):
    """A single-thread fill that takes THREADS_FROM_MS or more sends the next fills to xgrammar's threads; every
    PROBE_EVERY-th fill runs on one thread again, and once that one is cheap the fills stay on one thread. (The
    filler's clock is a fake that each single-thread fill advances by as much as the test says it took.)"""
    import types

    from miniserve.engine import structured_output as so
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO_TARGET)
    vocab = json.loads((DEMO_TARGET / "config.json").read_text())["vocab_size"]
    compiler = so.GrammarCompiler(tok, vocab, {2})
    # one state per row, as every sequence has its own (xgrammar's threads must not share a matcher)
    states = [compiler.new_state(StructuredOutputsParams(json=SCHEMAS[3])) for _ in range(2)]
    filler = so.MaskFiller(vocab, torch.device("cpu"), threads=3)
    used, now, took_ms = [], [0.0], [so.THREADS_FROM_MS]  # exactly the threshold counts as costly
    real = so.fill_rows

    def timed(batch, *args):
        real(batch, *args)
        single = batch is filler._matchers.get(1)
        used.append(1 if single else 3)
        now[0] += took_ms[0] / 1e3 if single else 0.0

    monkeypatch.setattr(so, "fill_rows", timed)
    monkeypatch.setattr(so, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    for _ in range(so.PROBE_EVERY + 2):
        filler.build(states)
    probe = so.PROBE_EVERY - 1  # the call numbered PROBE_EVERY
    assert used[0] == 1 and used[probe] == 1 and set(used[1:probe] + used[probe + 1 :]) == {3}, used
    took_ms[0] = 0.99 * so.THREADS_FROM_MS
    used.clear()
    for _ in range(so.PROBE_EVERY + 2):
        filler.build(states)
    at = used.index(1)  # the next probe measures a cheap fill: one thread from then on
    assert set(used[:at]) == {3} and set(used[at:]) == {1} and len(used) - at > 2, used
    assert filler.heavy is False


@pytest.mark.parametrize(
    "cpus, setting, want", [(16, 0, 4), (9, 0, 4), (8, 0, 4), (7, 0, 3), (2, 0, 1), (1, 0, 1), (16, 6, 6)]
)
def test_grammar_threads_auto_is_half_the_cpus_at_most_four(cpus, setting, want, monkeypatch):
    """grammar_threads=0: half the CPUs this process may use, at most 4 (on a 16-core host 8 threads filled no step
    faster than 4); a number asked for is taken as it is."""
    from miniserve.engine import structured_output as so

    monkeypatch.setattr(so.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert so.mask_threads(setting) == want


@pytest.mark.parametrize("threads", [1, 3])
def test_masks_filled_for_a_batch_are_the_rows_filled_alone(threads, monkeypatch):
    """MaskFiller fills a batch in one xgrammar call (on one or several threads), from the calling thread; each row
    is the mask its matcher fills alone (xgrammar's own per-matcher call), and rows without a grammar allow every
    token, whatever the reused buffer held before."""
    import threading

    import xgrammar as xgr

    from miniserve.engine import structured_output as so
    from miniserve.engine.structured_output import GrammarCompiler, MaskFiller
    from miniserve.sampling_params import StructuredOutputsParams
    from miniserve.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO_TARGET)
    vocab = json.loads((DEMO_TARGET / "config.json").read_text())["vocab_size"]
    compiler = GrammarCompiler(tok, vocab, {2})
    specs = [StructuredOutputsParams(json=SCHEMAS[i], disable_any_whitespace=True) for i in (3, 4, 9)]
    states = [compiler.new_state(spec) for spec in specs]
    for state, text in zip(states, ['{"color": "', "{", ""]):  # three different points in three grammars
        for token in tok.encode(text, add_special_tokens=False):
            assert state.accept(token)
    filler = MaskFiller(vocab, torch.device("cpu"), threads)
    assert filler.threads == threads
    callers, real = set(), so.fill_rows
    monkeypatch.setattr(so, "fill_rows", lambda *args: (callers.add(threading.get_ident()), real(*args)))
    batches = [[states[0], None, states[1], states[2], None], [None, states[0], states[1], None, states[2]]]
    for batch in batches * 2:  # again: the batch matcher is reused, and rows change between grammar and none
        got = filler.build(batch)
        for row, state in enumerate(batch):
            want = torch.full_like(got[row], -1)
            if state is not None:
                alone = xgr.allocate_token_bitmask(1, vocab)
                state.matcher.fill_next_token_bitmask(alone, 0)
                want = alone[0]
            assert torch.equal(got[row], want), row
        assert not torch.equal(got[0], got[2])
    assert callers == {threading.get_ident()}
    for beside in (False, True):  # build_beside: the same masks; the work on a helper thread only when beside
        filler.beside = beside
        got, ran_on = filler.build_beside(batches[0], threading.get_ident)
        assert torch.equal(got, filler.build(batches[0]))
        assert (ran_on != threading.get_ident()) is beside
        # no grammar in the batch (penalties only): nothing to fill beside, so the work runs here
        assert filler.build_beside([None, None], threading.get_ident) == (None, threading.get_ident())


CHAINED = [  # length-bounded strings in each place a JSON string can be: value, array item, key, the whole document
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}, "b": {"type": "string", "minLength": 2,
     "maxLength": 4}, "c": {"type": "string", "minLength": 2}}, "required": ["a", "b"]},
    {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 3},
    {"type": "object", "additionalProperties": {"type": "string", "maxLength": 0}, "propertyNames": {"maxLength": 2}},
    {"type": "string", "minLength": 1, "maxLength": 3},
    {"type": "string", "minLength": 2},
]  # fmt: skip


@pytest.mark.parametrize("any_whitespace", [True, False])
@pytest.mark.parametrize("schema", CHAINED)
def test_bounded_strings_written_as_chains_give_xgrammars_own_masks(schema, any_whitespace):
    """Length-bounded strings are rewritten as chains of rules (structured_output._chained_strings: far faster
    mask fills); along random paths, every mask is the one xgrammar's own grammar for the schema gives (its
    characters made valid JSON, as the engine's are), and the finished outputs validate."""
    import random

    import numpy as np
    import xgrammar as xgr

    from miniserve.engine.structured_output import json_schema_grammar

    rng = random.Random(0)
    alphabet = 'abc1 "\\,:{}[]\n\t\x01'  # characters that open, close, escape, separate or break a JSON string
    vocab = sorted(set(alphabet) | {"".join(rng.choices(alphabet, k=rng.randint(2, 6))) for _ in range(3000)})
    vocab.append("</s>")
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1])
    ws = {"any_whitespace": any_whitespace, **({"max_whitespace_cnt": 2} if any_whitespace else {})}
    chained = json_schema_grammar(json.dumps(schema), ws)
    own = str(xgr.Grammar.from_json_schema(json.dumps(schema), strict_mode=True, **ws))
    assert "_len0 ::=" in str(chained) and "_len0" not in own
    own = xgr.Grammar.from_ebnf(own.replace(r"[^\"\\\r\n]", r"[^\0-\x1f\"\\]"))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    rows = 24
    walkers = [[xgr.GrammarMatcher(compiler.compile_grammar(g)) for g in (chained, own)] for _ in range(rows)]
    masks = [xgr.allocate_token_bitmask(rows, len(vocab)) for _ in range(2)]
    texts, finished = [""] * rows, 0
    for _ in range(40):
        for row, pair in enumerate(walkers):
            for mask, matcher in zip(masks, pair):
                if not matcher.is_terminated():  # (a finished row keeps its last mask)
                    matcher.fill_next_token_bitmask(mask, row)
        assert torch.equal(masks[0], masks[1])
        bits = np.unpackbits(masks[1].numpy().view(np.uint8), axis=1, bitorder="little")[:, : len(vocab)]
        for row, pair in enumerate(walkers):
            if pair[1].is_terminated():
                continue
            allowed = np.flatnonzero(bits[row])
            assert len(allowed), repr(texts[row])
            token = int(rng.choice(list(allowed)))
            assert all(m.accept_token(token) for m in pair)
            if pair[1].is_terminated():
                finished += 1
                jsonschema.validate(json.loads(texts[row]), schema)
            texts[row] += vocab[token]
    assert finished >= rows // 2


@pytest.mark.parametrize("over", [0, 1])
def test_chains_stop_at_the_grammars_rule_budget(over):
    """Each chain costs compile time per rule, so a schema's chains share MAX_CHAINED_RULES (a string of n characters
    at most takes n + 1): exactly that many are chained, one more leaves the string that would overrun unchained
    (its repetition, still enforced), and the strings before it keep theirs."""
    from miniserve.engine.structured_output import MAX_CHAINED_RULES, json_schema_grammar

    half = MAX_CHAINED_RULES // 2
    first, second = {"type": "string", "maxLength": half - 1}, {"type": "string", "maxLength": half - 1 + over}
    one = {"type": "string", "maxLength": MAX_CHAINED_RULES - 1 + over}
    two = {"type": "object", "properties": {"a": first, "b": second}, "required": ["a", "b"]}
    cases = [(one, 1, MAX_CHAINED_RULES), (two, 2, MAX_CHAINED_RULES)] if not over else [(one, 0, 0), (two, 1, half)]
    for schema, chains, rules in cases:
        text = str(json_schema_grammar(json.dumps(schema), {"any_whitespace": False}))
        assert text.count("_len0 ::=") == chains
        assert len(re.findall(r"^\w+_len\d+ ::=", text, re.M)) == rules
        strings = 2 if schema is two else 1
        assert len(re.findall(r"_characters\{\d+, \d+\}", text)) == strings - chains  # the rest: repetitions
