"""The JSON files of a model directory (config.json, tokenizer_config.json, generation_config.json): a broken one
is one error that names the file, not a bare parser message or an AttributeError further on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """The object in the JSON file at `path` ({} for a missing file with `missing_ok`)."""
    if missing_ok and not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


def read_eos_token_ids(path: Path) -> set[int]:
    """A config file's eos_token_id, one id or a list, checked (none when the file or the key is missing)."""
    value = read_json_object(path, missing_ok=True).get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    return set(ids)
