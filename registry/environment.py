"""Settings read from environment variables, by the rules the registry's connection settings and the serving
container's settings share: blank is unset, numbers are checked and named with the variable when wrong."""

from __future__ import annotations

from collections.abc import Mapping


class SettingsError(ValueError):
    """An environment variable holds something unusable; the message names it and the fix."""


def text(environ: Mapping[str, str], name: str, default: str = "") -> str:
    """The variable without surrounding blanks; `default` when it is unset or blank (a chart's empty value)."""
    return environ.get(name, "").strip() or default


def number(environ: Mapping[str, str], name: str, default, kind: type = float, least: float | None = None):
    """The variable as a `kind` (float or int), or `default` when unset; at least `least`, or above 0 without one."""
    raw = text(environ, name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    whole = "whole " if kind is int else ""
    if least is None and (value is None or value <= 0):
        raise SettingsError(f"{name}={raw!r} is not a positive {whole}number")
    if least is not None and (value is None or value < least):
        raise SettingsError(f"{name}={raw!r} is not a {whole}number >= {least}")
    return value
