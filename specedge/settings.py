"""One configuration file for every command, with environment and flag overrides.

The keys are the argparse dest names of each command's flags (``max_batch`` or ``max-batch``),
so a flag added later is configurable with no extra code. A TOML (or YAML) file has one table
per command (``[verifier]``, ``[edge]``, ``[demo]``); precedence is

    flag  >  SPECEDGE_<SECTION>_<DEST>  >  SPECEDGE_<DEST>  >  file  >  built-in default

The file is named by ``--config PATH`` or ``$SPECEDGE_CONFIG``. Unknown sections, unknown keys
and values of the wrong type stop the command at start-up with a message naming the key and
where it came from. ``effective()`` is what the first log line prints, secrets masked.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any

SECTIONS = ("verifier", "edge", "demo")
_NOT_CONFIGURABLE = {"help", "config", "command"}
_SECRET_WORDS = {"password", "passwd", "secret", "token", "creds", "credentials", "key",
                 "nkey", "jwt"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and its source."""


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("SPECEDGE_CONFIG"),
                   help="TOML or YAML configuration file (default: $SPECEDGE_CONFIG); flags "
                        "and SPECEDGE_<KEY> variables override it")


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw) or {}
        else:
            data = tomllib.loads(raw.decode())
    except Exception as exc:  # the parsers' messages carry line and column
        raise ConfigError(f"config file {p} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected tables like [verifier] or [edge]")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"config file {p}: unknown section(s) {sorted(unknown)}; "
                          f"known: {list(SECTIONS)}")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {p}: [{name}] must be a table of key = value")
    return data


def _actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions
            if a.dest not in _NOT_CONFIGURABLE and a.option_strings}


def _is_bool(a: argparse.Action) -> bool:
    return isinstance(a, argparse.BooleanOptionalAction | argparse._StoreTrueAction
                      | argparse._StoreFalseAction)


def _convert(a: argparse.Action, value: Any, source: str) -> Any:
    """A file or environment value -> what the flag would have produced."""
    where = f"{a.dest} (from {source})"
    if _is_bool(a):
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(value, bool):  # bool is an int in Python; never a valid number here
        raise ConfigError(f"{where}: expected {_type_name(a)}, got {value!r}")
    if a.type is not None:
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected {_type_name(a)}, got {value!r}")
        try:
            out = a.type(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: expected {_type_name(a)}, got {value!r} ({exc})"
                              ) from None
    elif isinstance(value, str):
        out = value
    else:
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if a.choices is not None and out not in a.choices:
        raise ConfigError(f"{where}: {out!r} is not one of {sorted(map(str, a.choices))}")
    return out


def _type_name(a: argparse.Action) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(
        a.type, getattr(a.type, "__name__", "a value"))


def _env_for(section: str, dest: str) -> tuple[str, str] | None:
    for name in (f"SPECEDGE_{section}_{dest}".upper(), f"SPECEDGE_{dest}".upper()):
        if name in os.environ:
            return name, os.environ[name]
    return None


def parse_args(p: argparse.ArgumentParser, section: str, argv: list[str] | None = None,
               sibling_keys: frozenset[str] = frozenset()) -> argparse.Namespace:
    """parse_args with the file and the environment as defaults under the flags. Errors go
    through p.error (exit status 2, usage plus the message). sibling_keys: keys of the same
    section that belong to another command of it (e.g. `edge serve`'s port), not errors."""
    add_config_flag(p)
    first, _ = p.parse_known_args(argv)
    try:
        defaults = resolve_defaults(p, section, getattr(first, "config", None), sibling_keys)
    except ConfigError as exc:
        p.error(f"configuration: {exc}")
    p.set_defaults(**defaults)
    a = p.parse_args(argv)
    a._config_section = section
    return a


def resolve_defaults(p: argparse.ArgumentParser, section: str, path: str | None,
                     sibling_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    actions = _actions(p)
    out: dict[str, Any] = {}
    if path:
        table = read_file(path).get(section, {})
        for key, value in table.items():
            dest = key.replace("-", "_")
            if dest in sibling_keys and dest not in actions:
                continue
            if dest not in actions:
                near = difflib.get_close_matches(dest, actions, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"config file {path}: unknown key {key!r} in [{section}]{hint}")
            out[dest] = _convert(actions[dest], value, f"{path} [{section}]")
    for dest, a in actions.items():
        env = _env_for(section, dest)
        if env is not None:
            out[dest] = _convert(a, env[1], f"${env[0]}")
    return out


def _secret(key: str) -> bool:
    words = re.split(r"[_\-.]", key.lower())
    # an NKey seed is a secret; the sampling `seed` is not
    return bool(set(words) & _SECRET_WORDS) or (words[-1] == "seed" and len(words) > 1)


_URL_PASSWORD = re.compile(r"(?P<pre>[a-z]+://[^:/@\s]*:)[^@\s]+@")


def mask(key: str, value: Any) -> Any:
    """Secrets by key name are replaced; a password inside a URL (nats://u:p@h) is hidden."""
    if value is None:
        return None
    if _secret(key):
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<pre>***@", value)
    if isinstance(value, tuple | list):
        return [mask(key, v) for v in value]
    return value


def effective(a: argparse.Namespace) -> dict[str, Any]:
    """The configuration a command runs with, for its first log line."""
    return {k: mask(k, v) for k, v in sorted(vars(a).items()) if not k.startswith("_")}
