"""Decode a request body into JSON values the rest of the server can use safely.

`json.loads` accepts more than the server can handle: nesting deep enough to exhaust the interpreter's stack (in the
parser itself, or later in validation, templates and grammars), `\\ud800`-style escapes that leave lone UTF-16
surrogates in a string, which no tokenizer and no UTF-8 encoder accepts, and the non-JSON constants NaN and Infinity
(and numbers too large for a float, 1e999, which it reads as infinity), which no answer can carry back (a schema
echoed, say). All become 400s here, naming the field. The body must be UTF-8 (RFC 8259): given bytes, `json.loads`
would also take UTF-16 and UTF-32, and surrogates encoded in UTF-8 bytes, none of which the escape scan below sees.
The walk that finds deep nesting, lone surrogates and non-finite numbers runs only when a cheap byte scan (or the
parse itself, for a float past the range) says it might find something, so ordinary bodies cost a strict decode and
three C-speed scans on top of the parse.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from miniserve.server.protocol import APIError

MAX_JSON_DEPTH = 64  # arrays and objects inside one another; real requests (tool schemas included) stay far below

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a surrogate can get into a JSON string
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any surrogate left is a lone one
_NON_FINITE = re.compile(rb"NaN|Infinity")  # how json.loads makes a number JSON has not (past float's range: below)


def decode_json(raw: bytes) -> Any:
    """The JSON value of `raw`; APIError(400) if it is not UTF-8 JSON, nests too deep, or holds a lone surrogate
    or a non-finite number."""
    overflowed = False

    def read_float(text: str) -> float:  # a number past float's range (1e999, 1000...0.0e10) reads as infinity
        nonlocal overflowed
        value = float(text)
        overflowed = overflowed or math.isinf(value)
        return value

    try:
        value = json.loads(raw.decode("utf-8"), parse_float=read_float)  # strict UTF-8: no surrogate passes
    except RecursionError:
        raise _too_deep() from None
    except UnicodeDecodeError as exc:
        raise APIError(f"the request body is not UTF-8 text: {exc}", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, ints with too many digits
        raise APIError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    nested = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
    if nested or overflowed or _SURROGATE_ESCAPE.search(raw) or _NON_FINITE.search(raw):
        _check_values(value)
    return value


def _too_deep() -> APIError:
    return APIError(
        f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep", code="invalid_json"
    )


def _check_values(value: Any) -> None:
    """Walk the decoded value (without recursion): depth within the limit, no lone surrogate in any string, no
    NaN or infinity."""
    if isinstance(value, str):
        _check_text(value, ())
    _check_number(value, ())
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())] if isinstance(value, (dict, list)) else []
    while stack:
        container, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(container, dict):
            for key in container:
                _check_text(key, path + (key,))
            children = container.items()
        else:
            children = enumerate(container)
        for key, child in children:
            if isinstance(child, str):
                if _SURROGATE.search(child):
                    _check_text(child, path + (str(key),))
            elif isinstance(child, (dict, list)):
                stack.append((child, path + (str(key),)))
            else:
                _check_number(child, path + (str(key),))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    match = _SURROGATE.search(text)
    if match is None:
        return
    where = ".".join(_printable(p) for p in path) or "the request body"
    raise APIError(
        f"{where}: contains a lone UTF-16 surrogate (\\u{ord(match.group()):04x}); strings must be valid Unicode",
        param=_param(path),
    )


def _check_number(value: Any, path: tuple[str, ...]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        where = ".".join(_printable(p) for p in path) or "the request body"
        raise APIError(f"{where}: {value} is not a JSON number (numbers must be finite)", param=_param(path))


def _param(path: tuple[str, ...]) -> str | None:
    return _printable(path[0]) if path else None


def _printable(name: str) -> str:
    """A path element as it can be sent back (a key may itself hold the surrogate)."""
    return _SURROGATE.sub("\ufffd", name)
