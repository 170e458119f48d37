"""Command-line options of search methods, declared as plain data next to each method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["CliOption"]


@dataclass(frozen=True)
class CliOption:
    """decls: click declaration ("--budget" or "--per-channel/--per-tensor" for a boolean pair);
    field: the settings field it sets; type: int, float, str, bool or a tuple of choices;
    convert: optional str -> value parser for structured values. Unset options are not passed,
    so the settings dataclass default applies (say it in help)."""

    decls: str
    field: str
    type: Any
    help: str
    convert: Callable[[Any], Any] | None = None

