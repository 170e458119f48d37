"""Typed records serialised to JSON: the reports are frozen dataclasses built in one place each,
and their JSON (what `--report` writes and what users read) comes from their fields.

`Record` is the base of a report section: a frozen dataclass that is also a read-only mapping of
its JSON form, so `report["parity"]["top1_agreement"]` reads as it did when reports were dicts,
while the code that builds a report names its fields. Field metadata shapes the JSON:
`key` (the JSON name, e.g. "float" for a field `float_`), `omit_none` (no key when the value is
None) and `flatten` (the value's keys are merged into the parent's).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["Record", "to_json", "key", "optional", "flat"]


def key(name: str, **kw: Any) -> Any:
    """A field whose JSON key is `name`."""
    return dataclasses.field(metadata={"key": name}, **kw)


def optional(**kw: Any) -> Any:
    """A field (default None) left out of the JSON when it is None."""
    return dataclasses.field(default=kw.pop("default", None), metadata={"omit_none": True}, **kw)


def flat(**kw: Any) -> Any:
    """A field whose JSON keys are merged into the parent's (None: nothing)."""
    return dataclasses.field(metadata={"flatten": True}, **kw)


def to_json(value: Any) -> Any:
    """JSON-ready copy of `value`: dataclasses by their fields (with the metadata above),
    mappings with string keys, sequences as lists, numpy scalars and arrays as Python values,
    paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("flatten"):
                out.update(to_json(v) or {})
            elif not (v is None and f.metadata.get("omit_none")):
                out[f.metadata.get("key", f.name)] = to_json(v)
        return out
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class Record(Mapping):
    """Base of a frozen dataclass report section: `to_json()`, and read access to that JSON by key
    (report["verified"], report.get("activations"), dict(report))."""

    def to_json(self) -> dict:
        return dict(self._json)

    @functools.cached_property
    def _json(self) -> dict:
        return to_json(self)

    def __getitem__(self, name: str) -> Any:
        return self._json[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)

    def __getstate__(self) -> dict:  # the cached JSON is not part of the state
        return {k: v for k, v in self.__dict__.items() if k != "_json"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
