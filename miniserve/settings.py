"""Settings from the command line and the environment, generated from the fields of the config dataclasses.

Every field of `EngineConfig` and `ServerConfig` (config.py) is a flag `--field-name` and a variable
`MINISERVE_FIELD_NAME`, with the help text, choices and default of its metadata. A flag beats a variable, a
variable beats the default. A bad value is a one-line error that names the flag or variable it came from.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, fields

from miniserve.config import EngineConfig, ServerConfig, SettingError, field_type

ENV_PREFIX = "MINISERVE_"
# not settings: the benchmarks' provenance, the tests' cache of built checkpoints
OTHER_VARIABLES = ("MINISERVE_COMMIT", "MINISERVE_DIRTY", "MINISERVE_TEST_CACHE")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_var(f: Field) -> str:
    return ENV_PREFIX + f.name.upper()


def flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def shown_default(f: Field) -> str:
    if f.metadata.get("shown_default"):
        return f.metadata["shown_default"]
    default = f.default if f.default is not MISSING else None
    return str(default).lower() if isinstance(default, bool) else str(default)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; unset flags stay None so that the environment and the defaults can fill them."""
    group = parser.add_argument_group(f"{cls.__name__} (a flag overrides its {ENV_PREFIX}* variable)")
    for f in fields(cls):
        kind = field_type(cls, f)[0]
        help_text = f"{f.metadata['help']} (default: {shown_default(f)}; env {env_var(f)})"
        names = [flag(f), *([f.metadata["vllm_flag"]] if f.metadata.get("vllm_flag") else [])]
        if kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            if f.metadata.get("vllm_off_flag"):
                off = f"vLLM's spelling of {flag(f).replace('--', '--no-', 1)} (default: {shown_default(f)})"
                group.add_argument(
                    f.metadata["vllm_off_flag"], dest=f.name, action="store_false", default=None, help=off
                )
        else:
            metavar = None if f.metadata.get("choices") else f.name.upper()
            choices, nargs = f.metadata.get("choices"), "+" if f.metadata.get("several") else None
            parse = integer if kind is int else kind
            group.add_argument(
                *names, type=parse, choices=choices, nargs=nargs, default=None, metavar=metavar, help=help_text
            )


def from_sources(cls: type, args: argparse.Namespace | None = None, env: Mapping[str, str] = os.environ):
    """`cls` from the flags in `args` (where given), else the MINISERVE_* variables in `env` (else vLLM's, for the
    few it has), else defaults. A setting given where another makes it do nothing is an error (`needs`,
    `ignored_with`)."""
    values, sources = {}, {}
    for f in fields(cls):
        given = getattr(args, f.name, None) if args is not None else None
        variable = next((v for v in (env_var(f), f.metadata.get("vllm_env")) if v and env.get(v, "").strip()), None)
        if given is not None:
            values[f.name], sources[f.name] = _several(given), flag(f)
        elif variable is not None:
            source = f"{variable}={env[variable]!r}"
            values[f.name], sources[f.name] = _parse(cls, f, env[variable].strip(), source), source
    try:
        config = cls(**values)
    except SettingError as e:
        if e.name in sources:
            raise SettingError(e.name, f"{sources[e.name]}: {e}") from None
        raise
    check_combinations(config, sources, lambda f, source: flag(f) if source.startswith("--") else env_var(f))
    return config


def check_combinations(config, sources: dict[str, str], spell: Callable[[Field, str], str]) -> None:
    """A setting given where another makes it do nothing is an error (`needs`, `ignored_with`). `sources`: each
    given setting's name -> how it was given; `spell(field, source)`: the other setting's name as that source
    spells it (a flag, a variable, a keyword). Checked on the settings as set (speculative_config sets
    speculative_model)."""
    by_name = {f.name: f for f in fields(config)}
    for name, source in sources.items():
        meta = by_name[name].metadata
        if meta.get("needs") and not _is_set(getattr(config, meta["needs"])):  # (a draft, origins; a switch off)
            raise SettingError(name, f"{source}: does nothing without {spell(by_name[meta['needs']], source)}")
        for other in (o for o in meta.get("ignored_with", ()) if _is_set(getattr(config, o))):
            raise SettingError(name, f"{source}: does nothing with {spell(by_name[other], source)}")


def _is_set(value) -> bool:
    """A setting that does something: not unset, not a switch left off, not an empty list."""
    return value not in (None, False) and not (isinstance(value, str) and value.strip() in ("", "[]"))


def _several(given):
    """A flag's value; the words given to a list setting (`several`), one as it is, more as a JSON list (as its
    variable takes them: config.several_values)."""
    if not isinstance(given, list):
        return given
    return given[0] if len(given) == 1 else json.dumps(given)


def variable_warnings(env: Mapping[str, str] = os.environ) -> list[str]:
    """One line for each MINISERVE_* variable that no setting reads, with the setting it may have meant, and for
    each setting's variable that is set but blank: a typo (MINISERVE_APIKEY for MINISERVE_API_KEY) or an empty
    value (MINISERVE_API_KEY= from an unset shell variable) would otherwise leave its setting at the default unseen."""
    settings = [env_var(f) for cls in (EngineConfig, ServerConfig) for f in fields(cls)]
    known = settings + list(OTHER_VARIABLES)
    lines = []
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX)):
        if name not in known:
            close = difflib.get_close_matches(name[len(ENV_PREFIX) :], [k[len(ENV_PREFIX) :] for k in known], n=1)
            meant = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            lines.append(f"{name} is not a miniserve setting: ignored{meant}")
        elif name in settings and not env[name].strip():
            lines.append(f"{name} is set but empty: ignored (the setting keeps its default)")
    return lines


def _parse(cls: type, f: Field, raw: str, source: str):
    kind = field_type(cls, f)[0]
    if kind is bool:
        if raw.lower() not in _TRUE + _FALSE:
            raise SettingError(f.name, f"{source}: must be one of {', '.join(_TRUE + _FALSE)}")
        return raw.lower() in _TRUE
    try:
        return integer(raw) if kind is int else kind(raw)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise SettingError(f.name, f"{source}: must be {what}") from None


_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def integer(text: str) -> int:
    """An integer setting's text, with vLLM's size suffixes: `32k` is 32,000, `32K` 32,768 (k, m, g, t decimal,
    and only those take a fraction: `25.6k`; K, M, G, T binary)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", text.strip())
    if match is None:
        return int(text)
    number, suffix = match.groups()
    if suffix.isupper() and "." in number:
        raise ValueError(f"a binary size ({suffix}) takes a whole number, got {text!r}")
    return round(float(number) * _SUFFIXES[suffix]) if "." in number else int(number) * _SUFFIXES[suffix]


def markdown_table() -> str:
    """The README's table of every setting (scripts/update_readme_settings.py writes it there)."""
    rows = ["| Environment variable | CLI flag | Default | Meaning |", "|---|---|---|---|"]
    for cls in (EngineConfig, ServerConfig):
        for f in fields(cls):
            meaning = f.metadata["help"]
            if f.metadata.get("choices"):
                meaning += ": " + ", ".join(f"`{c}`" for c in f.metadata["choices"])
            if f.metadata.get("needs"):
                meaning += f" (only with `--{f.metadata['needs'].replace('_', '-')}`)"
            if f.metadata.get("ignored_with"):
                others = " or ".join(f"`--{o.replace('_', '-')}`" for o in f.metadata["ignored_with"])
                meaning += f" (not with {others})"
            where = " (`serve` only)" if cls is ServerConfig else ""
            vllm, off = f.metadata.get("vllm_flag"), f.metadata.get("vllm_off_flag")
            also = f" (vLLM's `{vllm}` too)" if vllm else f" (vLLM's `{off}` turns it off)" if off else ""
            variable = f"`{env_var(f)}`" + (
                f" (vLLM's `{f.metadata['vllm_env']}` too)" if f.metadata["vllm_env"] else ""
            )
            rows.append(f"| {variable} | `{flag(f)}`{also}{where} | {shown_default(f)} | {meaning} |")
    return "\n".join(rows)
