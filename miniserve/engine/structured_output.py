"""Structured outputs: grammars (JSON schema, regex, choice, EBNF) compiled by xgrammar, followed token by token.

A request with `SamplingParams(structured_outputs=StructuredOutputsParams(...))` (sampling_params.py) gets one
`GrammarState` per sequence (each of its `n` choices walks the grammar on its own). Every step, the plain decoder
has the batch's next-token bitmasks filled (`MaskFiller`: one xgrammar call fills the constrained sequences' rows
of a packed int32 [B, ceil(V/32)] tensor on the CPU), copies them to the device once, and the sampler masks the
logits there (`sampler.apply_token_bitmask`, or kernels/sampling.py as it reads them). The sampler runs eagerly
after the forward pass (CUDA graphs cover only the forward), so the host can fill the masks while the GPU is still
computing the logits: it does in prompt passes and overlapped decode steps (engine/decoder.py).

Compilation is the slow part (milliseconds to seconds for a large schema or a pattern), so a server keeps it off
its step loop where it can. The API process compiles (a worker thread: xgrammar releases the GIL; cached per spec; a bad
schema is a 400 before anything reaches the engine) and sends the compiled grammar with the request, serialized
(`GrammarCompiler.payload`); the engine process deserializes it into its own cache (`GrammarCompiler.load`),
where `LLMEngine.add_request` finds it. A grammar is sent once: while the engine's cache still holds it, later
requests with the same spec send nothing (were it evicted after all, the engine would compile it itself: slower,
still right). Measured on a 128k-token vocabulary, deserializing costs what compiling a simple schema costs (a few
to tens of milliseconds for 0.3-2.5 MB) but far less than compiling a hard one (41 ms against 458 ms for a string
pattern), and it is paid once per distinct grammar. A grammar of many rules is not sent (`shippable`): xgrammar
would write it quadratically large, so the engine compiles it itself. Why not compile in the engine process
always, on a thread: the request would have to wait outside the scheduler until its grammar is ready, and the
compile would take CPU from the loop that feeds the GPU, while the API process has both to spare. Offline
(`LLM.generate`), `add_request` compiles, once per spec.

A sequence's grammar state lives with the sequence and is fed each token the sequence appends
(`GrammarState.accept`, from the output processor), whatever appended it: a preempted sequence keeps its tokens
and its state, and recomputing its KV does not touch either. With speculative decoding, constrained sequences skip
speculation: they decode one token per step (their draft cache catches up like a prompt chunk's).
"""

from __future__ import annotations

import json
import operator
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from miniserve.sampling_params import StructuredOutputsParams

T = TypeVar("T")
_CACHE_SIZE = 256  # compiled grammars kept (a compiled JSON schema is small: the token masks are computed lazily)
_CACHE_BYTES = 1 << 30  # and at most this much of them (xgrammar's count), however many distinct schemas come
# xgrammar (0.2.x) writes each rule's automaton with a copy of the whole grammar's, so a serialized grammar grows
# with rules x grammar size: 100 tools under tool_choice "required" (424 rules, 70 kB of EBNF) came to 43 MB, written
# in 2 s with 0.6 GB of memory, and 600 required properties to 98 MB, where compiling either took 35-42 ms (the demo
# vocabulary). On a 128k-token cl100k-like vocabulary (benchmarks/structured_outputs.py's, this machine's CPU), tools
# with two parameters under "required": 10 compile in 38 ms, their payload is read back in 42 ms (1.7 MB); 30: 45
# against 165 ms (7.5 MB); 100: 86 ms against 1.35 s (67 MB). Past this product (about 6 MB written) the engine
# process compiles the grammar itself.
MAX_SHIPPED_GRAMMAR = 4_000_000  # EBNF lines (rules) x characters; 1.4-1.8 bytes written per unit, measured
# JSON may have whitespace between its tokens, at most this many characters per gap: enough for pretty printing
# (a newline and the indentation of a few levels), not for a model that loops on newlines until max_tokens
MAX_JSON_WHITESPACE = 16


class StructuredOutputsUnavailable(RuntimeError):
    """xgrammar is not installed."""


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # an optional install on some platforms: say what to do
        raise StructuredOutputsUnavailable(
            f"structured outputs need the xgrammar package, which failed to import ({exc}): "
            "pip install xgrammar (or miniserve[structured])"
        ) from None
    return xgrammar


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF that matches exactly one of `choices` (JSON string escapes are valid EBNF string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer + vocabulary; thread-safe (server threads compile)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int] | list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._tokenizer_info: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._sent: OrderedDict[tuple, None] = OrderedDict()  # specs whose grammar `payload` gave out, LRU first
        self.num_compiled = 0  # cache misses that compiled (tests read it)

    def _xgr_compiler(self) -> Any:
        """Built on first use: TokenizerInfo reads the whole vocabulary (about a second for 128k tokens)."""
        with self._lock:
            if self._compiler is None:
                xgr = import_xgrammar()
                from transformers import PreTrainedTokenizerFast  # installed with xgrammar

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
                self._tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                    hf, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
                )
                # this class caches (LRU, per spec); xgrammar's own cache would keep every grammar ever compiled
                self._compiler = xgr.GrammarCompiler(self._tokenizer_info, cache_enabled=False)
            return self._compiler

    def warm(self) -> None:
        """Import xgrammar and read the vocabulary now, so the first grammar does not wait for it (nothing when
        xgrammar is not installed: requests that need it are refused)."""
        try:
            self._xgr_compiler()
        except StructuredOutputsUnavailable:
            pass

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The CompiledGrammar for `spec`; ValueError (naming what is wrong) for an invalid schema/regex/grammar."""
        key = spec.key()
        compiled = self._cached(key)
        if compiled is None:
            compiled = _compile(self._xgr_compiler(), spec, key)
            self._store(key, compiled)
            self.num_compiled += 1
        return compiled

    def payload(self, spec: StructuredOutputsParams) -> str | None:
        """What the engine process needs for `spec` (compiling it here): the serialized grammar, or None when it
        was sent recently enough that the engine's cache, as large as this one and used in the same order, still
        holds it, or when it is not `shippable` (the engine then compiles it)."""
        compiled, key = self.compile(spec), spec.key()
        with self._lock:
            recent = key in self._sent
            self._sent[key] = None
            self._sent.move_to_end(key)
            while len(self._sent) > _CACHE_SIZE // 2:  # half: a margin for the two caches' orders to differ
                self._sent.popitem(last=False)
        # (shippable renders the grammar's text: asked only when the grammar would be sent)
        return None if recent or not shippable(compiled) else compiled.serialize_json()

    def load(self, spec: StructuredOutputsParams, serialized: str) -> None:
        """Cache the grammar `payload` made for `spec` (in another process, with the same tokenizer)."""
        key = spec.key()
        if self._cached(key) is None:
            self._xgr_compiler()
            compiled = import_xgrammar().CompiledGrammar.deserialize_json(serialized, self._tokenizer_info)
            self._store(key, compiled)

    def _cached(self, key: tuple) -> Any:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        return None

    def _store(self, key: tuple, compiled: Any) -> None:
        """Cache `compiled`, dropping the least recently used past _CACHE_SIZE grammars or _CACHE_BYTES (never the
        newest: a request is about to use it)."""
        with self._lock:
            self._cache[key] = compiled
            size = sum(c.memory_size_bytes for c in self._cache.values())
            while len(self._cache) > 1 and (len(self._cache) > _CACHE_SIZE or size > _CACHE_BYTES):
                size -= self._cache.popitem(last=False)[1].memory_size_bytes

    def new_state(self, spec: StructuredOutputsParams) -> GrammarState:
        return GrammarState(import_xgrammar().GrammarMatcher(self.compile(spec)), spec.start_after_token)

    def first_tokens(self, spec: StructuredOutputsParams) -> np.ndarray | None:
        """Whether the grammar lets an output begin with each token, a bool per token (None while it waits for
        start_after_token: any)."""
        if spec.start_after_token is not None:
            return None
        xgr = import_xgrammar()
        mask = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(self.compile(spec)).fill_next_token_bitmask(mask)
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]  # bit i: token i
        return bits.astype(bool)


def shippable(compiled: Any) -> bool:
    """Whether a compiled grammar is small enough to send serialized (MAX_SHIPPED_GRAMMAR)."""
    text = str(compiled.grammar)
    return (text.count("\n") + 1) * len(text) <= MAX_SHIPPED_GRAMMAR


def _compile(compiler: Any, spec: StructuredOutputsParams, key: tuple) -> Any:
    kind, value = key[0], key[1]
    ws = {"any_whitespace": not spec.disable_any_whitespace}
    if not spec.disable_any_whitespace:
        ws["max_whitespace_cnt"] = MAX_JSON_WHITESPACE
    try:
        if kind == "json":
            return compiler.compile_grammar(json_schema_grammar(value, ws))
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', **ws)
        if kind == "regex":
            return compiler.compile_regex(value)
        if kind == "choice":
            return compiler.compile_grammar(choice_grammar(value))
        return compiler.compile_grammar(value)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors for a bad schema/regex/grammar
        what = {"json": "JSON schema", "json_object": "JSON", "regex": "regex", "choice": "choice"}
        lark = kind == "grammar" and "::=" not in value and re.search(r"^\s*\??[a-z_]\w*\s*:", value, re.M)
        hint = " (a Lark grammar? write it as EBNF, xgrammar's: root ::= ...)" if lark else ""
        raise ValueError(f"{kind}: invalid {what.get(kind, 'grammar')}: {_first_line(exc)}{hint}") from None


# xgrammar (0.2.x) writes the characters of a length-bounded JSON string as [^"\\\r\n], which lets raw control
# characters (U+0000..U+001F) into strings: invalid JSON that json.loads rejects. Its unbounded strings exclude them.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
# a length-bounded string as xgrammar writes it: NAME ::= (("\"" CHARS{lo, hi} "\"")), CHARS a one-class rule
_BOUNDED_STRING = re.compile(r'^(\w+) ::= \(\("\\"" (\w+)\{(\d+), (-?\d+)\} "\\""\)\)$', re.M)
_CHARACTER_CLASS = re.compile(r"^(\w+) ::= \(\((\[(?:[^\]\\]|\\.)*\])\)\)$", re.M)  # one class, escapes kept
_RULE_NAME = re.compile(r"^(\w+) ::=", re.M)
# the lookahead xgrammar gives its unbounded strings' rule: what may follow a JSON string's closing quote
_STRING_LOOKAHEAD = re.compile(r"^basic_string_sub ::= .* (\(=.+\))$", re.M)
# A chain costs a rule per character, each 45-70 ms of compiling on a 128k-token vocabulary (this machine's CPU, one
# to eight of xgrammar's threads), paid once per schema in the API process; so a schema's chains have at most this
# many rules between them (the strings first in the grammar get them), and longer strings keep the repetition
MAX_CHAINED_RULES = 40


def json_schema_grammar(schema: str, whitespace: dict[str, Any], chained_rules: int = MAX_CHAINED_RULES) -> Any:
    """xgrammar's grammar for a JSON schema, with its length-bounded strings' characters made valid JSON and
    written as chains of at most `chained_rules` rules in all (`_chained_strings`; 0: none, for benchmarks); a
    ValueError for a keyword it would not enforce (`unenforced_keyword`)."""
    unenforced = unenforced_keyword(json.loads(schema))
    if unenforced:
        raise ValueError(f"{unenforced}: the grammar engine (xgrammar) cannot enforce it, so outputs could break it")
    xgr = import_xgrammar()
    grammar = xgr.Grammar.from_json_schema(schema, strict_mode=True, **whitespace)
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(_chained_strings(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR), chained_rules))


def _chained_strings(text: str, budget: int) -> str:
    """The grammar `text` with its length-bounded strings (`budget` rules at most) written as chains of
    rules, one per count of characters read so far, each ending in the lookahead xgrammar gives its unbounded
    strings (a JSON string is followed by whitespace and one of ,}]: or ends the document).

    Why: xgrammar precomputes which tokens each rule position accepts, but not inside a repetition (a token's
    fate there depends on the count), so in a bounded string it checks most of the vocabulary one token at a time,
    every step; and a token that runs past a rule's end is checked again unless the rule says what follows it. A
    chain's rules are each precomputed, with their lookahead: the same masks (tests/test_structured_outputs.py
    compares them along random paths), filled far faster: on a 128k-token cl100k-like vocabulary at batch 32
    (this machine's CPU), a maxLength 24 name's slowest row 0.70 -> 0.12 ms a step, a minLength 3 one's 6.0 ->
    0.08 ms."""
    lookahead = _STRING_LOOKAHEAD.search(text)
    if lookahead is None:
        return text
    classes = dict(_CHARACTER_CLASS.findall(text))
    names = set(_RULE_NAME.findall(text))

    def chain(match: re.Match) -> str:
        nonlocal budget
        name, chars, lo, hi = match[1], match[2], int(match[3]), int(match[4])
        last = hi if hi >= 0 else lo  # rules for 0..last characters read; past `last` an unbounded one repeats
        links = [f"{name}_len{n}" for n in range(last + 1)]
        if chars not in classes or len(links) > budget or names.intersection(links):
            return match[0]
        budget -= len(links)
        rules = [f'{name} ::= (("\\"" {links[0]}))']
        for n, link in enumerate(links):
            ways = ['("\\"")'] if n >= lo else []
            if n < last or hi < 0:
                ways.append(f"({classes[chars]} {links[min(n + 1, last)]})")
            rules.append(f"{link} ::= ({' | '.join(ways)}) {lookahead[1]}")
        return "\n".join(rules)

    return _BOUNDED_STRING.sub(chain, text)


# schema keywords that xgrammar (0.2.x) compiles without enforcing: it would accept outputs that break them
_UNENFORCED = ("uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
               "dependentRequired", "dependentSchemas")  # fmt: skip
# where a schema keeps subschemas: one ({...}), a list of them, or a map of names to them
_SUBSCHEMA = {"items": "one", "additionalProperties": "one", "not": "one", "if": "one", "then": "one", "else": "one",
              "contains": "one", "propertyNames": "one", "unevaluatedProperties": "one", "unevaluatedItems": "one",
              "prefixItems": "list", "anyOf": "list", "oneOf": "list", "allOf": "list", "properties": "map",
              "patternProperties": "map", "$defs": "map", "definitions": "map", "dependentSchemas": "map"}  # fmt: skip
# keywords that xgrammar drops beside a combination of schemas (anyOf, oneOf, allOf, $ref: it enforces that alone)
_COMBINED = ("anyOf", "oneOf", "allOf", "$ref")
# (object keywords beside anyOf are kept or dropped depending on xgrammar's whitespace mode: refused in every mode)
_DROPPED_BESIDE_COMBINED = ("type", "enum", "const", "required", "minimum", "maximum", "exclusiveMinimum",
                            "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "format", "items",
                            "prefixItems", "minItems", "maxItems", "properties", "additionalProperties",
                            "patternProperties", "minProperties", "maxProperties", *_COMBINED)  # fmt: skip
_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
               "array": (list,), "object": (dict,)}  # fmt: skip


def unenforced_keyword(schema: Any, where: str = "", root: Any = None) -> str | None:
    """The first keyword of `schema` (and its subschemas) that the grammar would not enforce, with where it sits
    ("uniqueItems at properties.tags"), or None: those of _UNENFORCED (uniqueItems only when true), multipleOf but
    on integers without bounds, minLength/maxLength beside a pattern or format, a pattern's lookahead, allOf of more
    than one schema, a $ref outside the schema (as vLLM's xgrammar backend refuses the like), and minLength/maxLength
    beside an enum or const value that breaks them, or a type or bound such a value breaks (xgrammar enforces the
    values, not the rest), and the keywords xgrammar drops beside anyOf, oneOf, allOf or $ref (but a type their
    schemas all have already). `root`: the whole schema, where a local $ref points."""
    if not isinstance(schema, dict):
        return None
    root = schema if root is None else root
    at = f" at {where}" if where else ""
    for key in _UNENFORCED:
        if key in schema and not (key == "uniqueItems" and schema[key] is False):
            return key + at
    if "multipleOf" in schema and not (schema.get("type") == "integer" and isinstance(schema["multipleOf"], int)):
        return f"multipleOf{at} (enforced on integers only)"
    bounds = [k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema]
    if "multipleOf" in schema and bounds:  # xgrammar drops multipleOf beside a range
        return f"multipleOf{at} beside {bounds[0]} (enforced on integers without bounds only)"
    lengths = [k for k in ("minLength", "maxLength") if k in schema]
    shaped = [k for k in ("pattern", "format") if k in schema]
    if lengths and shaped:  # xgrammar compiles the pattern (format) and drops the length bounds
        return f"{lengths[0]}{at} beside {shaped[0]} (a length is enforced on strings without pattern or format)"
    broken = _listed_value_broken(schema)  # xgrammar allows every listed value, whatever its length, type or size
    if broken:
        return f"{broken[0]}{at} beside {broken[1]} value {broken[2]!r}, which breaks it (list only values it takes)"
    combined = next((k for k in _COMBINED if k in schema), None)
    beside = [k for k in _DROPPED_BESIDE_COMBINED if k in schema and k != combined] if combined else []
    dropped = next((k for k in beside if k != "type" or not _type_said_by(schema, combined, root)), None)
    if dropped:
        return f"{dropped}{at} beside {combined} (only {combined} is enforced: move {dropped} into its schemas)"
    if isinstance(schema.get("pattern"), str) and re.search(r"(?<!\\)(?:\\\\)*\(\?<?[=!]", schema["pattern"]):
        return f"pattern{at} with a lookaround assertion"  # xgrammar ignores a lookahead (and refuses a lookbehind)
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"allOf{at} of more than one schema"
    if isinstance(schema.get("$ref"), str) and not schema["$ref"].startswith("#"):
        return f"$ref {schema['$ref']!r}{at} (only references inside the schema)"
    for path, sub in _subschemas(schema):
        found = unenforced_keyword(sub, f"{where}.{path}" if where else path, root)
        if found:
            return found
    return None


def _type_said_by(schema: dict, combined: str, root: Any) -> bool:
    """Whether the schemas of `combined` (anyOf/oneOf: every one; allOf: one; $ref: its target, local) already
    have a type within the `type` beside them, which then restricts nothing xgrammar would not."""
    allowed = _types(schema.get("type"))
    branches = [schema] if combined == "$ref" else schema.get(combined)
    if allowed is None or not isinstance(branches, list) or not branches:
        return False
    allowed |= {"integer"} if "number" in allowed else set()
    within = [(t := _types(_local_target(b, root).get("type"))) is not None and t <= allowed for b in branches]
    return any(within) if combined == "allOf" else all(within)


def _types(value: Any) -> set[str] | None:
    if isinstance(value, str):
        return {value}
    return set(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _local_target(schema: Any, root: Any) -> dict:
    """What a schema's local $ref ("#/$defs/a") points to, else the schema itself ({} when it is none)."""
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str) and ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        return target if isinstance(target, dict) else {}
    return schema if isinstance(schema, dict) else {}


def _listed_value_broken(schema: dict) -> tuple[str, str, Any] | None:
    """(the keyword, enum or const, the value) of the first of the schema's listed values (its enum's and its
    const) that breaks its type, minLength or maxLength, or numeric bounds; None when all fit."""
    listed = [("enum", v) for v in schema["enum"]] if isinstance(schema.get("enum"), list) else []
    listed += [("const", schema["const"])] if "const" in schema else []
    for where, value in listed:
        if keyword := _broken_keyword(schema, value):
            return keyword, where, value
    return None


def _broken_keyword(schema: dict, value: Any) -> str | None:
    """The first of the schema's type, string lengths and numeric bounds that `value` breaks (a bound or a type
    JSON Schema does not have: ignored, as the compiler takes it). Numbers compare exactly, however large."""
    names = _types(schema.get("type"))
    if names and names <= _JSON_TYPES.keys() and not any(_of_type(value, n) for n in names):
        return "type"
    if isinstance(value, str):
        bounds, measured = (("minLength", operator.lt), ("maxLength", operator.gt)), len(value)
    elif _is_number(value):
        bounds = (("minimum", operator.lt), ("maximum", operator.gt), ("exclusiveMinimum", operator.le),
                  ("exclusiveMaximum", operator.ge))  # fmt: skip
        measured = value
    else:
        return None
    return next((k for k, past in bounds if _is_number(schema.get(k)) and past(measured, schema[k])), None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _of_type(value: Any, name: str) -> bool:
    """Whether `value` is of JSON type `name` (1.0 is an integer; True is no number)."""
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[name]) and (name == "boolean" or not isinstance(value, bool))


def _subschema_places(schema: dict) -> list[tuple[str, str, int | str | None]]:
    """(path, keyword, index or name under it; None for a keyword that holds one) of each schema that `schema` holds
    directly (_SUBSCHEMA says where)."""
    out: list[tuple[str, str, int | str | None]] = []
    for key, shape in _SUBSCHEMA.items():
        value = schema.get(key)
        if shape == "one" and isinstance(value, list):  # draft 4 tuple items: a list of schemas
            shape = "list"
        if shape == "one" and isinstance(value, dict):
            out.append((key, key, None))
        elif shape == "list" and isinstance(value, list):
            out += [(f"{key}[{i}]", key, i) for i in range(len(value))]
        elif shape == "map" and isinstance(value, dict):
            out += [(f"{key}.{name}", key, name) for name in value]
    return out


def _subschemas(schema: dict) -> list[tuple[str, Any]]:
    """(path, subschema) of each schema that `schema` holds directly."""
    return [(path, schema[k] if at is None else schema[k][at]) for path, k, at in _subschema_places(schema)]


def map_subschemas(schema: dict, fn: Callable[[Any], Any]) -> dict:
    """A copy of `schema` with each schema it holds directly replaced by fn(that schema); the rest (names, enum
    values, anything that only looks like a schema) as it is."""
    out = dict(schema)
    for _, key, at in _subschema_places(schema):
        if at is None:
            out[key] = fn(schema[key])
            continue
        if out[key] is schema[key]:  # (the list or map copied once, before its first entry changes)
            out[key] = type(schema[key])(schema[key])
        out[key][at] = fn(schema[key][at])
    return out


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /project/cpp/file.cc:94: ")."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)


class GrammarState:
    """Where one sequence stands in its grammar; fed the sequence's output tokens in order. With `start_after`, the
    grammar waits for that token (a thinking model's end of reasoning): until then every token is free."""

    def __init__(self, matcher: Any, start_after: int | None = None):
        self.matcher = matcher
        self.start_after = start_after

    @property
    def waiting(self) -> bool:
        """The grammar has not begun: the sequence's next token is not masked."""
        return self.start_after is not None

    def accept(self, token: int) -> bool:
        """Feed the next output token; False if the grammar rejects it (the state then stays before it)."""
        if self.start_after is not None:
            if token == self.start_after:
                self.start_after = None
            return True
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return not self.waiting and self.matcher.is_terminated()


MAX_AUTO_THREADS = 4  # more filled no step faster on a 16-core H200 host, and most slower (docstring below)


def mask_threads(setting: int) -> int:
    """Threads that fill a step's masks: `grammar_threads`, or (0) half the CPUs this process may run on, at most
    MAX_AUTO_THREADS. xgrammar's own default is half the cores; but each call wakes its threads, and on the lent
    H200's 16-core host 32 rows filled as fast or faster on 4 threads as on 8, by every schema and vocabulary
    measured (benchmarks/results/grammar_fill*_h200.json, medians: cl100k-like 0.53 / 0.97 ms against 0.59 /
    1.20, strings unbounded / bounded), and the engine was faster with 4 (structured_outputs_cl100k_h200.json:
    0.94x / 0.80x the unconstrained throughput against 0.92x / 0.76x). Not on every host: a later lent one,
    whose single-thread fill was 1.7x slower, ran the JSON-heavy engine runs 9% faster on 8 threads
    (structured_outputs_h200.json: 0.63x / 0.32x against 0.57x / 0.30x); set grammar_threads where it matters."""
    if setting > 0:
        return setting
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_AUTO_THREADS, cpus // 2))


# Starting xgrammar's threads costs about 0.3 ms a call, so a batch that one thread fills faster than this is
# filled on one (grammar_fill_h200.json: 32 rows in 0.12 ms on one thread took 0.37 ms on 8; 1.58 ms took 0.75 on 4)
THREADS_FROM_MS = 0.5
PROBE_EVERY = 32  # while filling on threads, one fill in this many runs on one thread to re-measure


class MaskFiller:
    """The batch's packed next-token masks, filled on the host by xgrammar while the GPU runs the step's forward
    pass (engine/decoder.py), and copied to the device once.

    One xgrammar call fills every constrained row (xgrammar releases the GIL meanwhile: on a GPU the decoder builds
    the rest of the sampling batch on a helper thread beside it), and, when the batch's masks are costly, on
    `threads` of xgrammar's threads: every single-thread fill is timed, and one taking THREADS_FROM_MS or more
    moves the next ones to the threads, with a single-thread fill every PROBE_EVERY calls to notice when they got
    cheap again (the threads fill rows at once: each row's matcher must be its own, as each sequence's
    GrammarState is). No CPU torch op runs beside a fill: one (filling a large tensor) starts torch's OpenMP
    workers, which then spin for a while on every core and leave the fill's threads none
    (`benchmarks/grammar_fill.py`: 32 rows took as long on 8 threads as on one until its own CPU torch ops
    stopped). So rows without a grammar are reset through numpy, and the constrained rows are left to xgrammar,
    which writes them whole; beside a fill the decoder's helper launches GPU work, builds a few small host
    tensors, and detokenizes and applies stop rules (Python and the tokenizer's Rust, no torch)."""

    def __init__(self, vocab_size: int, device: torch.device, threads: int = 0):
        self.words = (vocab_size + 31) // 32
        self.pinned = device.type == "cuda"
        # on a GPU build_beside runs its work on a helper thread beside the fill (the noise, the step read's text);
        # on the CPU that work would only compete with the fill for the cores
        self.beside = device.type == "cuda"
        self.device = device
        self.threads = mask_threads(threads)
        self.heavy = False  # the last single-thread fill took THREADS_FROM_MS or more: fill on the threads
        self._calls = 0
        self._matchers: dict[int, Any] = {}  # threads -> xgrammar's BatchGrammarMatcher (xgrammar imports lazily)
        self._buffers: list[torch.Tensor | None] = [None, None]  # two page-locked buffers, used in turn
        self._next = 0
        self._helper: ThreadPoolExecutor | None = None  # build_beside's thread, started on first use

    def build(self, states: list[GrammarState | None]) -> torch.Tensor | None:
        """The masks of a batch on the device; rows without a grammar allow everything. None when no row has one.
        The grammar states must not change until it returns. (A single-thread fill's timing includes any wait for
        the GIL after it, while the decoder's helper holds it: at worst fills stay on the threads a little longer.)"""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return None
        host = self._host_buffer(len(states))
        if len(rows) < len(states):
            allowed = host.numpy()
            for i, s in enumerate(states):
                if s is None:
                    allowed[i] = -1
        self._fill([states[i].matcher for i in rows], host, rows)
        return host.to(self.device, non_blocking=True)

    def build_beside(self, states: list[GrammarState | None], work: Callable[[], T]) -> tuple[torch.Tensor | None, T]:
        """(build(states), work()); with `beside`, work runs on a helper thread while this one fills. xgrammar releases
        the GIL as the fill begins, so the helper starts at once, and a fill that takes longer than the work finds
        it done. (The other way round, the fill on the helper, this thread had to wait until the helper held the
        GIL, or the helper could wait for the interpreter's switch interval:
        benchmarks/results/structured_outputs_ab_h200.json has the two side by side.)"""
        if not self.beside or all(s is None for s in states):  # (no masks to fill: no thread to hand over to)
            return self.build(states), work()
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="miniserve-sampling")
        done = self._helper.submit(work)
        masks = self.build(states)
        return masks, done.result()

    def _fill(self, matchers: list[Any], host: torch.Tensor, rows: list[int]) -> None:
        self._calls += 1
        threads = self.threads if self.heavy and self._calls % PROBE_EVERY else 1
        if threads not in self._matchers:
            self._matchers[threads] = import_xgrammar().BatchGrammarMatcher(max_threads=threads)
        start = time.perf_counter()
        fill_rows(self._matchers[threads], matchers, host, rows)
        if threads == 1 and self.threads > 1:
            self.heavy = time.perf_counter() - start >= THREADS_FROM_MS / 1e3

    def _host_buffer(self, num_rows: int) -> torch.Tensor:
        """A [num_rows, ceil(V/32)] int32 tensor on the host. For a GPU, one of two page-locked buffers in turn
        (allocating one per step cost about 0.5 ms): a buffer's copy to the device is done before it is reused,
        since every step reads the samples of the step before, which follow that copy."""
        if not self.pinned:
            return torch.empty((num_rows, self.words), dtype=torch.int32)
        i, self._next = self._next, 1 - self._next
        buf = self._buffers[i]
        if buf is None or buf.shape[0] < num_rows:
            buf = self._buffers[i] = torch.empty((max(num_rows, 64), self.words), dtype=torch.int32, pin_memory=True)
        return buf[:num_rows]


def fill_rows(batch: Any, matchers: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None:
    """xgrammar fills `rows` of `bitmask` from `matchers` (one each): every constrained row of a step, in one call
    (benchmarks/structured_outputs.py times the calls through here)."""
    batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
