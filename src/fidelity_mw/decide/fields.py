"""What the slotted decision records (`LimitSpec`, `LimitVerdict`, `Gate`,
`InboundResult`) share with a NamedTuple besides field access: `_replace` and the repr,
both from the record's `_fields` and `_key()` (each record's `__init__` takes its fields
by those names). Kept out of the request path: tests, logs and the odd copy use them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar


class Record(Protocol):
    _fields: ClassVar[tuple[str, ...]]

    def _key(self) -> tuple[Any, ...]: ...


R = TypeVar("R", bound=Record)


def replaced(record: R, changes: dict[str, Any]) -> R:
    """A copy of `record` with `changes` (NamedTuple's `_replace`, the same error for a
    name that is no field)."""
    fields = record._fields
    unknown = [name for name in changes if name not in fields]
    if unknown:
        raise ValueError(f"Got unexpected field names: {sorted(unknown)!r}")
    values = dict(zip(fields, record._key(), strict=True))
    values.update(changes)
    make: Callable[..., R] = type(record)
    return make(**values)


def shown(record: Record) -> str:
    """`Name(field=value, ...)`, as a NamedTuple's repr."""
    pairs = ", ".join(f"{n}={v!r}" for n, v in zip(record._fields, record._key(), strict=True))
    return f"{type(record).__name__}({pairs})"
