"""Decode a request body into JSON values the rest of the server can use safely.

`json.loads` accepts more than the server can handle: nesting deep enough to exhaust the interpreter's stack
(in the parser itself, or later in validation, templates and grammars), and `\\ud800`-style escapes that leave
lone UTF-16 surrogates in a string, which no tokenizer and no UTF-8 encoder accepts. Both become 400s here,
naming the field. The walk that finds them runs only when a cheap byte scan says it might find something, so
ordinary bodies cost two C-speed scans on top of the parse.
"""

from __future__ import annotations

import json
import re
from typing import Any

from miniserve.server.protocol import APIError

MAX_JSON_DEPTH = 64  # arrays and objects inside one another; real requests (tool schemas included) stay far below

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a surrogate can get into a JSON string
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any surrogate left is a lone one


def decode_json(raw: bytes) -> Any:
    """The JSON value of `raw`; APIError(400) if it is not JSON, nests too deep, or holds a lone surrogate."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ints with too many digits
        raise APIError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH or _SURROGATE_ESCAPE.search(raw):
        _check_values(value)
    return value


def _too_deep() -> APIError:
    return APIError(
        f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep", code="invalid_json"
    )


def _check_values(value: Any) -> None:
    """Walk the decoded value (without recursion): depth within the limit, no lone surrogate in any string."""
    if isinstance(value, str):
        _check_text(value, ())
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


def _check_text(text: str, path: tuple[str, ...]) -> None:
    match = _SURROGATE.search(text)
    if match is None:
        return
    where = ".".join(_printable(p) for p in path) or "the request body"
    raise APIError(
        f"{where}: contains a lone UTF-16 surrogate (\\u{ord(match.group()):04x}); strings must be valid Unicode",
        param=_printable(path[0]) if path else None,
    )


def _printable(name: str) -> str:
    """A path element as it can be sent back (a key may itself hold the surrogate)."""
    return _SURROGATE.sub("\ufffd", name)
