"""Tiny typed readers for settings that come from the environment."""

from __future__ import annotations

import os


def envstr(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def envint(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def envfloat(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value is None or value == "" else float(value)


def envlist(name: str, default: list[str] | None = None) -> list[str]:
    """A comma- or whitespace-separated list."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return list(default or [])
    return [item for item in value.replace(",", " ").split() if item]
