"""Validation helpers of the config sections: each failure is a ConfigError naming the dotted key."""

from __future__ import annotations

from .errors import ConfigError


def require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(key, value, expected)


def one_of(key: str, value: object, choices: tuple[str, ...]) -> None:
    require(value in choices, key, value, f"must be one of {', '.join(choices)}")
