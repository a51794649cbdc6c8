"""Rate-limit fields the app set itself, beside ours on the same response.

An app may set `RateLimit` / `RateLimit-Policy` or `X-RateLimit-*` itself: its own
per-route limits (`Depends(fidelity.limit(...))`), or a gateway passing on its
upstream's answer, headers and all. The IETF fields are Structured Field Lists
(RFC 9651) of named policies: under RFC 9110 section 5.3 a recipient combines two field
lines of a list into one list, so the app's line and ours side by side say both limits,
and a client sees each. They conflict only where the combination is not one list a
client can read:

- the same policy name twice (the app's `"default"` beside ours): a client could not
  tell which item is whose. Ours stays, the app's item of that name goes from both
  fields: our middleware enforces that name at this hop, on this request's state; an
  item of the app's by that name is a copy made earlier or another limit under the same
  name, which no client could tell from ours.
- the app's line is not a List (an older draft's `limit=100, remaining=50`): combined
  with ours it would be one value no Structured Field parser reads, so a client lost
  both. The app's line stays as it is and ours of that field is not added.

The legacy `X-RateLimit-Limit`, `-Remaining` and `-Reset` are no lists: one limit's
three values, and a second line of each makes a client read either, or a comma-joined
`"0, 9"` no client parses. They never go out twice: of the app's three and ours, the
one closer to refusing (fewer units left) goes out whole, as among our own limits
(inbound/xratelimit.py); on a tie, or a `Remaining` of the app's that is not one whole
number, the app's.

Only a response whose app set one of these fields comes here (watch.py looks for their
names first): the common response pays one set test over its header names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Final

from .._logs import warn

logger: Final = logging.getLogger("fidelity_mw")

Fields = list[tuple[bytes, bytes]]

RATELIMIT: Final = b"ratelimit"
RATELIMIT_POLICY: Final = b"ratelimit-policy"
X_LIMIT: Final = b"x-ratelimit-limit"
X_REMAINING: Final = b"x-ratelimit-remaining"
X_RESET: Final = b"x-ratelimit-reset"
_IETF: Final = frozenset({RATELIMIT, RATELIMIT_POLICY})
_LEGACY: Final = frozenset({X_LIMIT, X_REMAINING, X_RESET})
# (lower case, as ASGI writes header names and Starlette sends them)
FIELD_NAMES: Final = _IETF | _LEGACY

# RFC 9651 section 3: bare items, parameters, items and inner lists (of a List member)
_STRING: Final = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'
_TOKEN: Final = rb"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*"
_BARE: Final = (
    rb"(?:-?[0-9]{1,15}(?:\.[0-9]{1,3})?|"
    + _STRING
    + rb"|"
    + _TOKEN
    + rb"|:[A-Za-z0-9+/=]*:|\?[01]|@-?[0-9]{1,15}|%"
    + _STRING
    + rb")"
)
_PARAMS: Final = rb"(?:;[ ]*[a-z*][a-z0-9_\-.*]*(?:=" + _BARE + rb")?)*"
_MEMBER: Final = re.compile(
    rb"(" + _BARE + rb"|\((?:[ ]*" + _BARE + _PARAMS + rb")*[ ]*\))" + _PARAMS
)
_OWS: Final = re.compile(rb"[ \t]*")
_ESCAPED: Final = re.compile(rb"\\(.)")


def list_members(value: bytes) -> list[tuple[bytes | None, bytes]] | None:
    """The members of a Structured Field List, each as (its name: the text of a String
    or a Token item, else None; its text), or None when `value` is no List."""
    members: list[tuple[bytes | None, bytes]] = []
    pos = len(value) - len(value.lstrip(b" "))
    end = len(value.rstrip(b" "))
    while pos < end:
        found = _MEMBER.match(value, pos, end)
        if found is None:
            return None
        item = found.group(1)
        if item[:1] == b'"':
            name: bytes | None = _ESCAPED.sub(rb"\1", item[1:-1])
        elif item[:1].isalpha() or item[:1] == b"*":
            name = item
        else:
            name = None
        members.append((name, found.group(0)))
        pos = _OWS.match(value, found.end(), end).end()  # type: ignore[union-attr]
        if pos == end:
            break
        if value[pos : pos + 1] != b",":
            return None
        pos = _OWS.match(value, pos + 1, end).end()  # type: ignore[union-attr]
        if pos == end:
            return None  # a trailing comma
    return members


def _names(fields: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in fields:
        if name in _IETF:
            for member, _text in list_members(value) or ():
                if member is not None:
                    names.add(member)
    return names


def _remaining(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The one whole `X-RateLimit-Remaining` among `headers`, else None."""
    values = [value for name, value in headers if bytes(name).lower() == X_REMAINING]
    if len(values) != 1:
        return None
    text = bytes(values[0]).strip()
    return int(text) if text.isdigit() and len(text) <= 15 else None


def beside_app(app_headers: Iterable[tuple[bytes, bytes]], ours: Fields) -> tuple[Fields, Fields]:
    """The app's headers and our rate-limit fields, as they go out together (the module's
    rules): the app's less its items and lines ours replace, ours less what would make
    a field unreadable or a legacy field twice."""
    app = [(bytes(name), value) for name, value in app_headers]
    ours_names = {name for name, _value in ours}
    app_names = {name.lower() for name, _value in app}
    if ours_names & _LEGACY and app_names & _LEGACY:
        app_left = _remaining(app)
        our_left = _remaining(ours)
        if app_left is not None and our_left is not None and our_left < app_left:
            app = [item for item in app if item[0].lower() not in _LEGACY]
        else:
            ours = [item for item in ours if item[0] not in _LEGACY]
    if ours_names & _IETF and app_names & _IETF:
        taken = _names(ours)
        unreadable: set[bytes] = set()
        kept: Fields = []
        for name, value in app:
            field = name.lower()
            if field not in _IETF:
                kept.append((name, value))
                continue
            members = list_members(bytes(value))
            if members is None:
                unreadable.add(field)
                kept.append((name, value))
                warn(
                    logger,
                    "unreadable",
                    "fidelity_mw: the app's %s field is no Structured Field List (%r): "
                    "ours is left out of that response, the two would not combine into "
                    "one a client reads",
                    field.decode(),
                    bytes(value)[:60],
                )
                continue
            left = [text for member, text in members if member not in taken]
            if len(left) < len(members):
                warn(
                    logger,
                    "same-name",
                    "fidelity_mw: the app's %s field names a policy the middleware's "
                    "fields name too: its item left out (rename one of them to send both)",
                    field.decode(),
                )
                if not left:
                    continue
                value = b", ".join(left)
            kept.append((name, value))
        app = kept
        if unreadable:
            ours = [item for item in ours if item[0] not in unreadable]
    return app, ours
