"""Argument checks shared by the library, all raising ``ValueError("{owner}: expected {name} to be ..., got ...")``."""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["check_choice", "check_non_negative_int", "check_positive_int"]


def _check_int(owner: str, name: str, value, least: int, kind: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{owner}: expected {name} to be {kind}, got {value!r}")


def check_positive_int(owner: str, name: str, value) -> None:
    """``value`` is an ``int`` (not a ``bool``) of at least 1."""
    _check_int(owner, name, value, 1, "a positive int")


def check_non_negative_int(owner: str, name: str, value) -> None:
    """``value`` is an ``int`` (not a ``bool``) of at least 0."""
    _check_int(owner, name, value, 0, "a non-negative int")


def check_choice(owner: str, name: str, value, choices: Collection) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: expected {name} to be one of {choices}, got {value!r}")
