"""Secrets in configs: one marker on the field, one helper that masks a config.

A config field whose value is a secret (an operator's token, an API key, an admin token, a URL
that carries credentials) says so in its type:

    openpi_api_key: Annotated[str | None, SECRET] = None

and everything that shows a config — `--help` (tyro prints defaults, and the defaults are the
config file's values), config errors, logs — shows it through `masked(config)` (or, for a
message built from a value, `redact(text, config)`), which reads that marker: a secret prints
as `***`, a secret URL keeps its scheme, host and path and masks its password and parameters.
Any URL with a password masks it, marked or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"
# Query parameters masked in any URL: `?token=...`, `?api_key=...`
_CREDENTIAL_PARAMS = ("token", "key", "secret", "password", "auth")


class Secret:
    """The marker: `Annotated[T, SECRET]`. Only its presence matters."""

    def __repr__(self) -> str:
        return "SECRET"


SECRET = Secret()


def is_secret(hint: Any) -> bool:
    """Whether a type hint (as `typing.get_type_hints(cls, include_extras=True)` gives it)
    carries the marker."""
    while typing.get_origin(hint) is typing.Annotated:
        if any(isinstance(m, Secret) for m in hint.__metadata__):
            return True
        hint = typing.get_args(hint)[0]
    return False


def secret_fields(cls: type) -> list[str]:
    """Names of the marked fields of dataclass `cls` (not of its nested configs)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return [f.name for f in dataclasses.fields(cls) if is_secret(hints.get(f.name))]


def mask_value(value: Any) -> Any:
    """A secret's value as it may be shown: None stays None (nothing set reveals nothing),
    a dict keeps its keys (operator names) and masks its values, a URL keeps where it points."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: mask_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_value(v) for v in value)
    if isinstance(value, str) and "://" in value:
        return mask_url(value, everything=True)
    return MASK


def mask_url(url: str, everything: bool = False) -> str:
    """`url` with its password masked (`ws://ana:***@host/`); with `everything`, also its
    user, every query parameter's value and its fragment (`/query?token=***`)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK if everything else url
    if not parts.scheme or not parts.netloc:
        return MASK if everything else url
    netloc, query, fragment = parts.netloc, parts.query, parts.fragment
    if "@" in netloc:
        user, hostport = netloc.rsplit("@", 1)
        user = MASK if everything else user.split(":", 1)[0]
        netloc = f"{user}{':' + MASK if password is not None else ''}@{hostport}"
    if everything or any(c in query.lower() for c in _CREDENTIAL_PARAMS):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={MASK if everything or _credential(k) else v}" for k, v in pairs)
    if fragment and (everything or _credential(fragment)):  # the pendant's `#token=...`
        fragment = MASK
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _credential(name: str) -> bool:
    return any(c in name.lower() for c in _CREDENTIAL_PARAMS)


def masked(config: Any) -> Any:
    """A copy of dataclass `config` with every marked field masked, nested configs included,
    and every other URL's password masked. For `--help`, logs and error messages."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    hints = typing.get_type_hints(type(config), include_extras=True)
    changes = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if is_secret(hints.get(f.name)):
            new = mask_value(value)
        elif dataclasses.is_dataclass(value):
            new = masked(value)
        elif isinstance(value, str) and "://" in value:
            new = mask_url(value)
        else:
            continue
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(config, **changes) if changes else config


def unmask(parsed: Any, original: Any) -> Any:
    """`parsed` (what tyro made from `masked(original)` and the flags) with every value still
    masked put back to `original`'s: flags given override, the rest keep the file's secrets."""
    if parsed == mask_value(original) and parsed != original:
        return original
    if isinstance(parsed, dict) and isinstance(original, dict):
        return {k: unmask(v, original[k]) if k in original else v for k, v in parsed.items()}
    if (
        dataclasses.is_dataclass(parsed)
        and not isinstance(parsed, type)
        and type(parsed) is type(original)
    ):
        changes = {}
        for f in dataclasses.fields(parsed):
            if not f.init:
                continue
            value = getattr(parsed, f.name)
            new = unmask(value, getattr(original, f.name))
            if new is not value:
                changes[f.name] = new
        return dataclasses.replace(parsed, **changes) if changes else parsed
    if isinstance(parsed, str) and isinstance(original, str) and parsed == mask_url(original):
        return original  # an unmarked URL whose password `masked` hid
    return parsed


def secret_values(config: Any) -> list[str]:
    """Every secret string of `config` (marked fields, URL passwords), nested configs included."""
    out: list[str] = []
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return out
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if is_secret(hints.get(f.name)):
            out += _strings(value)
        elif dataclasses.is_dataclass(value):
            out += secret_values(value)
        elif isinstance(value, str) and "@" in value:
            with contextlib.suppress(ValueError):
                password = urlsplit(value).password
                if password:
                    out.append(password)
    return out


def redact(text: str, *configs: Any) -> str:
    """`text` with every secret of `configs` replaced by `***` (for messages built elsewhere,
    such as a parser's error that quotes what it was given)."""
    for value in sorted({v for c in configs for v in secret_values(c)}, key=len, reverse=True):
        if len(value) >= 3:  # masking "a" everywhere would make the message unreadable
            text = text.replace(value, MASK)
    return text


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []
