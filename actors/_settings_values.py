"""What a setting's value may be: coercion from TOML or env text, and its rules.

Private to ``actors.settings`` (the one place that reads configuration): the
dataclasses there carry these rules as field metadata, and ``build`` turns a
table of raw values into one of them, naming the key, the value and what is
allowed whenever it refuses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

__all__ = ["SettingsError", "build", "choice", "docker_repository", "minimum"]


class SettingsError(ValueError):
    """A configuration value is missing, unknown or out of range."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid setting {key} = {value!r}: {allowed}")


def libpq_url() -> dict[str, Any]:
    """A libpq connection string: a postgresql:// URL or ``key=value`` pairs."""
    return {"database_url": True}


def redact_url(url: str) -> str:
    """``scheme://user:password@host`` with the password as ``***``: for messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def _check_database_url(key: str, value: str) -> None:
    if not value:
        return
    scheme, sep, _rest = value.partition("://")
    if sep and scheme not in ("postgresql", "postgres"):
        raise SettingsError(
            key,
            redact_url(value),
            "must be a PostgreSQL URL (postgresql://user@host:5432/dbname) or "
            "libpq key=value pairs (host=... dbname=...); the password goes in "
            "PGPASSWORD or ~/.pgpass",
        )
    if not sep and "=" not in value:
        raise SettingsError(
            key,
            value,
            "must be a PostgreSQL URL (postgresql://user@host:5432/dbname) or "
            "libpq key=value pairs (host=... dbname=...)",
        )


def minimum(value: float) -> dict[str, Any]:
    return {"min": value}


def choice(*values: str) -> dict[str, Any]:
    return {"choices": values}


# Docker's repository grammar (distribution/reference): lowercase path
# components, an optional registry host[:port] first. "Snap" passed before and
# then failed every commit ("repository name must be lowercase").
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
_REPOSITORY = rf"(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
# Room for the "/<slug>" a snapshot name adds within Docker's 255 characters.
_MAX_REPOSITORY = 128


def docker_repository() -> dict[str, Any]:
    return {
        "pattern": _REPOSITORY,
        "max_length": _MAX_REPOSITORY,
        "allowed": (
            "must be a Docker repository name: lowercase letters, digits and "
            "'.', '_', '-' between them, '/' between parts (e.g. snapyard-snapshot), "
            f"at most {_MAX_REPOSITORY} characters"
        ),
    }


def _hint_parts(hint: Any) -> tuple[Any, bool]:
    """The concrete type behind a hint, and whether None is allowed."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(key: str, raw: object, hint: Any, meta: Mapping[str, Any]) -> object:
    kind, optional = _hint_parts(hint)
    if raw is None:
        if optional:
            return None
        raise SettingsError(key, raw, "a value is required")
    value: object
    if kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.lower() in {"1", "true", "yes", "on"}:
            value = True
        elif isinstance(raw, str) and raw.lower() in {"0", "false", "no", "off"}:
            value = False
        else:
            raise SettingsError(key, raw, "must be true or false")
    elif kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise SettingsError(key, raw, "must be a whole number")
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(key, raw, "must be a whole number") from None
    elif kind is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise SettingsError(key, raw, "must be a number")
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(key, raw, "must be a number") from None
        except OverflowError:  # a TOML integer past the float range
            raise SettingsError(key, raw, "must be a finite number") from None
        if not math.isfinite(value):
            raise SettingsError(key, raw, "must be a finite number")
    elif kind is str:
        if not isinstance(raw, str):
            raise SettingsError(key, raw, "must be a string")
        value = raw
    elif typing.get_origin(kind) is tuple:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise SettingsError(
                    key, raw, 'must be a JSON list of strings: ["sh", "-c", "..."]'
                ) from None
        if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
            raise SettingsError(key, raw, "must be a list of strings")
        value = tuple(raw)
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unsupported setting type {hint!r} for {key}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        why = f" ({meta['why']})" if "why" in meta else ""
        if "min" in meta and value < meta["min"]:
            raise SettingsError(key, raw, f"must be >= {meta['min']}{why}")
        if "max" in meta and value > meta["max"]:
            raise SettingsError(key, raw, f"must be <= {meta['max']}{why}")
    if "pattern" in meta and not (
        isinstance(value, str)
        and len(value) <= meta["max_length"]
        and re.fullmatch(meta["pattern"], value)
    ):
        raise SettingsError(key, raw, meta["allowed"])
    if "choices" in meta and value not in meta["choices"]:
        raise SettingsError(key, raw, f"must be one of {', '.join(meta['choices'])}")
    if "database_url" in meta and isinstance(value, str):
        _check_database_url(key, value)
    return value


def build(cls: type[Any], prefix: str, values: Mapping[str, object]) -> Any:
    if not isinstance(values, Mapping):
        raise SettingsError(prefix, values, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(
            f"{prefix}.{unknown[0]}",
            values[unknown[0]],
            f"unknown key; known keys: {', '.join(fields)}",
        )
    kwargs = {
        name: _coerce(f"{prefix}.{name}", raw, hints[name], fields[name].metadata)
        for name, raw in values.items()
    }
    return cls(**kwargs)
