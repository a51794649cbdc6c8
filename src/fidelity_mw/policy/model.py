"""Policy: frozen, validated configuration, built in Python or loaded from TOML.

Every dataclass validates itself at construction and reports *all* problems at
once, each with its key path. `Policy.from_dict` adds the path prefix
(`rate_limit[1].rate`) and rejects unknown keys, so a typo cannot silently
disable a limit. `Policy.version` is a short hash of the normalized content.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import inspect
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx

from ..errors import PolicyError, PolicyIssue
from .lines import locate_keys

Check = Callable[[Any], str | None]
KeyFunc = Callable[[Mapping[str, Any]], str | None]
# A request's cost from the request (a Starlette `Request`, which is also the scope as a
# Mapping): plain or async, a whole number of units >= 0 (inbound/costs.py)
CostFunc = Callable[[Any], int | Awaitable[int]]

JITTER_MODES = ("full", "equal", "decorrelated", "none")
FAILURE_MODES = ("local", "open", "closed")
HEADER_MODES = ("always", "on_reject", "never")
HEADER_NAMES = ("ietf", "x-ratelimit", "both")
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")
CHARGE_MODES = ("served", "always")
BREAKER_SCOPES = ("fleet", "process")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
MAX_ATTEMPTS = 10

_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
# the largest count of a rate (and its default burst) and its longest period
MAX_RATE_COUNT = 1_000_000_000
MAX_RATE_PERIOD_S = 365 * 86400.0
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")
_PER_RE = re.compile(r"(?<=\d)\s+per\s+")  # the limits library's "5 per minute"
# \Z, not $: "$" also matches before a final newline ("x-api-key\n" is no header name)
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


# ---------------------------------------------------------------- checks


_TOML_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    tuple: "array",
    dict: "table",
    type(None): "nothing",
}


def _tname(value: object) -> str:
    """The value's type as TOML names it (most policies are TOML files)."""
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return "date-time" if isinstance(value, datetime.datetime) else type(value).__name__
    return _TOML_TYPES.get(type(value), type(value).__name__)


def redact_url(url: str) -> str:
    """`redis://user:secret@host` -> `redis://user:***@host`: messages and maps name the
    server, never its password."""
    # Up to the last "@": a password typed raw may hold "/" or "@" itself. A URL with
    # an "@" further on and no password is over-masked, never leaked.
    url = re.sub(r"(://[^:/@]*:).*@", r"\1***@", url, count=1)
    # redis-py also takes `?password=` (the way to give a unix socket one), and
    # `?ssl_password=` (the TLS key file's passphrase)
    return re.sub(r"([?&](?:ssl_)?password=)[^&#]*", r"\1***", url)


def _got(value: object) -> str:
    """What a message says it got: the type and the value (`string "x"`), or `nothing`
    (JSON's null, which has no value to spell)."""
    return "nothing" if value is None else f"{_tname(value)} {_toml(value)}"


# How much of a value a message repeats: a 5,000-character string pasted into a key
# made a 5,000-character error line (per key, and `check` prints every one).
_SHOWN_CHARS: Final = 200


def _toml(value: object) -> str:
    """A value spelled as in a TOML file (`true`, `"text"`, `[1, 2]`), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    if isinstance(value, str):
        if len(value) > _SHOWN_CHARS:
            head = json.dumps(value[: _SHOWN_CHARS - 20], ensure_ascii=False)
            return f'{head[:-1]}..." ({len(value):,} characters)'
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple | set | frozenset):
        text = "[" + ", ".join(_toml(v) for v in value) + "]"
        return text if len(text) <= 2 * _SHOWN_CHARS else f"{text[: 2 * _SHOWN_CHARS]}...]"
    if isinstance(value, Mapping):
        text = "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
        return text if len(text) <= 2 * _SHOWN_CHARS else f"{text[: 2 * _SHOWN_CHARS]}... }}"
    if isinstance(value, datetime.date | datetime.time):
        # TOML's dates and times (`open_s = 07:32:00`): as written, not datetime's repr
        return value.isoformat()
    return repr(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def int_in(lo: int, hi: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value):
            return f"expected an integer, got {_got(value)}"
        if value < lo or (hi is not None and value > hi):
            if hi is None:
                return f"{value} is out of range: allowed {lo} or more"
            return f"{value} is out of range: allowed between {lo} and {hi}"
        return None

    return check


def number_in(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if not _is_number(value):
            return f"expected a number, got {_got(value)}"
        if (
            value != value
            or (lo_open and value <= lo)
            or value < lo
            or (hi is not None and value > hi)
        ):
            lo_txt = f"> {lo}" if lo_open else f">= {lo}"
            hi_txt = f" and <= {hi}" if hi is not None else ""
            return f"{value} is out of range: allowed {lo_txt}{hi_txt}"
        return None

    return check


def optional(check: Check) -> Check:
    def wrapped(value: Any) -> str | None:
        return None if value is None else check(value)

    return wrapped


def one_of(choices: Iterable[str]) -> Check:
    allowed = tuple(choices)

    def check(value: Any) -> str | None:
        if value not in allowed:
            return f"{_toml(value)} is not allowed: choose one of {', '.join(map(_toml, allowed))}"
        return None

    return check


# The policy file versions this release reads (`version = N`).
SUPPORTED_VERSIONS: Final = (1,)


def _schema_version(value: Any) -> str | None:
    if not _is_int(value):
        return f"expected an integer, got {_got(value)}"
    if value not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        # (not "allowed between 1 and 1": say what a file may hold, and why this one fails)
        return (
            f"{value} is not a policy version this fidelity_mw reads: "
            f"supported versions: {supported} (write version = {SUPPORTED_VERSIONS[-1]})"
        )
    return None


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_toml(value)}"


def non_empty_str(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"expected a non-empty string, got {_toml(value)}"
    return None


def _header_safe(value: str) -> str | None:
    """Why `value` cannot travel as an RFC 8941 sf-string (RateLimit headers), or None."""
    for i, ch in enumerate(value, 1):
        if not " " <= ch <= "~" or ch in '"\\':
            code = f"U+{ord(ch):04X}"
            shown = f"{_toml(ch)} ({code})" if ch.isprintable() else code
            return (
                f"{_toml(value)} has {shown} at character {i}: names are sent in "
                'response headers, so they must be printable ASCII without " or \\'
            )
    return None


def _sf_name(value: Any) -> str | None:
    return non_empty_str(value) or _header_safe(value)


def _limit_name(value: Any) -> str | None:
    problem = _sf_name(value)
    if problem is None and "|" in value:
        # the state key is "<name>|<client key>" and a client key may hold a "|": the
        # name must not, or the admin page splits it at the wrong bar
        problem = (
            f'{_toml(value)} contains "|": a limit\'s state key is "<name>|<client key>", '
            "so its name may not"
        )
    return problem


def _key_prefix(value: Any) -> str | None:
    problem = non_empty_str(value)
    if problem is None and ("{" in value or "}" in value):
        problem = (
            f"{_toml(value)} contains a brace: the prefix becomes the Redis Cluster hash tag "
            "{prefix}, so it may not contain { or }"
        )
    return problem


def _cidrs(value: Any) -> str | None:
    if not isinstance(value, tuple | list):
        return f"expected a list of CIDR strings, got {_tname(value)}"
    for i, item in enumerate(value):
        try:
            ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            return f'item {i}: {_toml(item)} is not an IP network (for example "10.0.0.0/8")'
    return None


def _base_urls(value: Any) -> str | None:
    if not isinstance(value, tuple | list):
        return f"expected a list of base URLs, got {_tname(value)}"
    for i, item in enumerate(value):
        text = str(item)
        scheme, _, rest = text.partition("://")
        host = rest.rstrip("/")
        if scheme not in ("http", "https") or not host or "/" in host or "?" in host:
            return f'item {i}: {_toml(item)} is not a base URL (for example "http://10.0.0.7:8080")'
        try:  # what httpx cannot parse (a port that is not a number) fails every call
            httpx.URL(text)
        except httpx.InvalidURL as exc:
            return f"item {i}: {_toml(item)} is not a URL ({exc})"
    if len(set(value)) != len(value):
        return "instance URLs must be distinct"
    return None


def _header_names(value: Any) -> str | None:
    """A list of request header names (`[deadline] header`): every invalid name and
    every repeat (names are case-insensitive: `X-Timeout` and `x-timeout` are one
    header, read once) in one message."""
    if not isinstance(value, tuple | list) or not value:
        return "expected a non-empty list of header names"
    bad = [item for item in value if not isinstance(item, str) or not _HEADER_NAME_RE.match(item)]
    problems = []
    if len(bad) == 1:
        problems.append(f"{_toml(bad[0])} is not a valid header name")
    elif bad:
        problems.append(f"{', '.join(_toml(item) for item in bad)} are not valid header names")
    seen: dict[str, str] = {}
    repeats: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _HEADER_NAME_RE.match(item):
            continue
        first = seen.get(item.lower())
        if first is None:
            seen[item.lower()] = item
        elif first == item:
            repeats.append(f"{_toml(item)} is listed twice")
        else:
            repeats.append(f"{_toml(item)} repeats {_toml(first)}")
    if repeats:
        problems.append(
            "; ".join(repeats) + " (header names are case-insensitive): list each header once"
        )
    return "; ".join(problems) or None


def _header_name(value: Any) -> str | None:
    """One request header name (`priority_header`): a name no request can carry (a space,
    a colon) would never be found, and the setting would silently do nothing."""
    problem = non_empty_str(value)
    if problem is None and not _HEADER_NAME_RE.match(value):
        problem = f"{_toml(value)} is not a valid header name (letters, digits and -, no spaces)"
    return problem


def _methods(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, tuple | list) or not value:
        return "expected a non-empty list of HTTP methods, or leave it out for all methods"
    for item in value:
        if not isinstance(item, str) or item.upper() not in HTTP_METHODS:
            return f"{_toml(item)} is not an HTTP method: allowed {', '.join(HTTP_METHODS)}"
    return None


def _statuses(value: Any) -> str | None:
    """A list of HTTP statuses (and "5xx" classes, expanded before): every bad value in
    one message, not the first alone (a fix per run)."""
    if not isinstance(value, tuple | list | frozenset):
        return "expected a list of HTTP status codes (e.g. [502, 503]) or classes ('5xx')"
    bad = [item for item in value if not _is_int(item) or not 100 <= item <= 599]
    if not bad:
        return None
    if len(bad) == 1:
        return f"{_toml(bad[0])} is not an HTTP status code between 100 and 599"
    return (
        f"{', '.join(_toml(item) for item in bad)} are not HTTP status codes between 100 "
        "and 599 (or classes such as '5xx')"
    )


def _any_glob(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return f'expected a glob such as "/api/*", got {_toml(value)}'
    return None


# A route template's parameter ("{item_id}", "{path:path}"): what FastAPI and Starlette
# routes are written with, and what a request path never holds.
_TEMPLATE_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_]+)?\}")


def _glob(value: Any) -> str | None:
    """A request path glob. Paths start with "/": a pattern that cannot is a silent no-op."""
    problem = _any_glob(value)
    if problem is None and value[0] not in "/*?":
        problem = (
            f"{_toml(value)} never matches: request paths start with a slash "
            f"(write {_toml('/' + value)})"
        )
    elif problem is None and _TEMPLATE_PARAM.search(value):
        # "/items/{item_id}" is matched against the request path, which holds the id
        problem = (
            f"{_toml(value)} never matches: match is a glob over the request path, "
            f"not a route template (write {_toml(_TEMPLATE_PARAM.sub('*', value))})"
        )
    return problem


def _globs(value: Any) -> str | None:
    """Path globs a limit leaves out (`exclude`): each one as `match` checks it."""
    if not isinstance(value, tuple | list):
        return 'expected a list of path globs such as ["/healthz", "/metrics"], or leave it out'
    for i, item in enumerate(value):
        problem = _glob(item)
        if problem:
            return f"item {i}: {problem}"
    return None


_HOST_WITH_PORT = re.compile(r"[^:]+:[0-9]+")


def _host_glob(value: Any) -> str | None:
    problem = _any_glob(value)
    if problem is None and any(not " " < ch <= "~" or ch in '"\\' for ch in value):
        problem = (
            f"{_toml(value)} is not a host glob: hosts are matched in their ASCII form "
            "(write an internationalised name as xn--...), without spaces, quotes or backslashes"
        )
    elif problem is None and value.startswith("["):
        # an IPv6 address as a URL writes it: the URL's host is matched without its
        # brackets (httpx's `url.host`), so this entry was silently never taken
        address = value[1:].partition("]")[0] or "fd00::5"
        problem = (
            f"{_toml(value)} never matches: an IPv6 host is matched without brackets "
            f"or port (write {_toml(address)})"
        )
    elif problem is None and ("/" in value or _HOST_WITH_PORT.fullmatch(value)):
        # matched against the URL's host alone: a scheme, port or path never matches
        problem = (
            f"{_toml(value)} never matches: write the host alone, without a scheme, "
            'port or path (for example "payments.internal")'
        )
    return problem


def parse_rate(text: str) -> tuple[int, float]:
    """'100/s' -> (100, 1.0); '5/10min' -> (5, 600.0); '5 per 2 minutes' -> (5, 120.0).

    Raises ValueError."""
    if any(sep in text for sep in ";,|"):
        # slowapi / limits write several limits in one string: "5/minute;100/hour"
        raise ValueError(
            f"{_toml(text)} holds several rates: write one [[rate_limit]] per rate, "
            "each with its own name"
        )
    if re.search(r"[0-9/\s]M\s*$", text):
        # a capital M is a month as often as a minute (100/M), and `lower()` below made it
        # a minute: a monthly quota enforced 43,200 times over
        raise ValueError(
            f"{_toml(text)}: M may be a minute or a month: write min for a minute (a month is 30d)"
        )
    m = _RATE_RE.match(_PER_RE.sub("/", text.lower()))
    if not m:
        raise ValueError(
            f'{_toml(text)} is not a rate: write N/s, N/min, N/h or N/d (e.g. "100/s")'
        )
    count, multiple, unit = int(m.group(1)), m.group(2), m.group(3)
    if unit not in _PERIODS and len(unit) > 3 and unit[:-1] in _PERIODS:
        unit = unit[:-1]  # "minutes", "hours", "secs" (never "ms": that is no minute)
    if unit not in _PERIODS:
        # slowapi's (the limits library's) month and year, which it counts as 30 and 360
        # days: the message gives the same period in our units, not only what is allowed
        one = {"month": 30, "months": 30, "year": 360, "years": 360}.get(unit, 0)
        days = one * (int(multiple) if multiple else 1)
        fix = ""
        if 0 < days <= MAX_RATE_PERIOD_S / 86_400:
            fix = f" (slowapi counts a {unit.rstrip('s')} as {one}d: write "
            fix += f"{_toml(f'{count}/{days}d')})"
        raise ValueError(
            f"unknown period unit {_toml(unit)} in {_toml(text)}: use s, min, h or d{fix}"
        )
    if count < 1:
        raise ValueError(f"{_toml(text)} admits nothing: the count must be at least 1")
    periods = int(multiple) if multiple else 1
    if periods < 1:
        raise ValueError(f"{_toml(text)} has an empty period: the period must be at least 1 {unit}")
    # Bounded so that what the responses say of the limit stays true and readable: the
    # count is the default burst (held to what an explicit `burst` is), and the
    # RateLimit fields are Structured Field integers (at most 15 digits), their `t`
    # no later than the year `Retry-After` is capped at.
    if count > MAX_RATE_COUNT:
        raise ValueError(
            f"{_toml(text)} counts more than {MAX_RATE_COUNT} per period: "
            "write it per a shorter period"
        )
    period_s = _PERIODS[unit] * periods
    if period_s > MAX_RATE_PERIOD_S:
        raise ValueError(f"{_toml(text)} has a period longer than 365 d: the longest is 365 d")
    return count, period_s


def tidy_rate(text: str) -> str:
    """`text` without the spaces that say nothing: around it and around its `/`, runs of
    them as one (" 5 / s" -> "5/s", "5  per minute" -> "5 per minute"). What a limit's
    `rate` holds, and what a form's default counter name is built from."""
    return re.sub(r"\s*/\s*", "/", " ".join(text.split()))


_UNITS: Final = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def canonical_rate(text: str) -> str:
    """One spelling per rate, from what it means: "5/minute", "5 per minute", "5/60s"
    and "5/min" are all "5/min"; "5/10min" stays, "5/600s" is "5/10min". The policy's
    version hashes this: equal limits, equal versions, however their rate is written.
    (A rate that does not parse: as written, tidied.)"""
    try:
        count, period_s = parse_rate(text)
    except ValueError:
        return tidy_rate(text)
    seconds = round(period_s)
    for unit, size in _UNITS:
        if seconds % size == 0:
            times = seconds // size
            return f"{count}/{unit}" if times == 1 else f"{count}/{times}{unit}"
    return tidy_rate(text)  # (a period is always whole seconds)


def _rate(value: Any) -> str | None:
    if not isinstance(value, str):
        return f'expected a string like "100/s", got {_got(value)}'
    try:
        parse_rate(value)
    except ValueError as exc:
        return str(exc)
    return None


def _one_argument(fn: Any, what: str) -> str | None:
    """None when `fn` can be called with one positional argument (or says nothing of
    its signature: a builtin), else the problem, naming the signature."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None)
    except TypeError:
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"{name}{signature} cannot be called with one argument: {what}"
    return None


def _key(value: Any) -> str | None:
    if callable(value):
        # (an object with an async `__call__` is not a coroutine function itself)
        if inspect.iscoroutinefunction(value) or (
            not inspect.isroutine(value)
            and not isinstance(value, type)
            and inspect.iscoroutinefunction(type(value).__call__)
        ):
            # the middleware calls it as it reads the request: its coroutine, as text,
            # was a new key per request (no limit at all)
            return (
                f"{getattr(value, '__qualname__', value)} is a coroutine function: the "
                "middleware's key function is called without awaiting (a cost function "
                "may be async; for an async key, Depends(fidelity.limit(..., key=fn)))"
            )
        return _one_argument(value, "the middleware calls a key function with the ASGI scope")
    if not isinstance(value, str):
        return f"expected a key kind, got {_tname(value)}"
    if value in ("client_ip", "route", "global"):
        return None
    if value.startswith("header:") and _HEADER_NAME_RE.match(value[7:]):
        return None
    return (
        f'{_toml(value)} is not a key: use "client_ip", "header:NAME", "route", "global" '
        "(or a callable in Python)"
    )


_COST_RANGE = int_in(1, 1_000_000)


def _cost(value: Any) -> str | None:
    """A whole number of units, or (in Python) a function of the request."""
    if callable(value) and not isinstance(value, type):
        return _one_argument(value, "the middleware calls a cost function with the request")
    if isinstance(value, str):
        # a file names no function: `key` strings are kinds, not import paths, either
        return (
            f"{_toml(value)} is not a cost: a cost is a whole number of units; a cost per "
            "request is a function, given in Python (RateLimit(cost=fn)), which a policy "
            "file cannot name"
        )
    return _COST_RANGE(value)


def _instance(cls: type) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, cls):
            return f"expected {_a(cls.__name__)}, got {_tname(value)}"
        return None

    return check


def _route_concurrency(value: Any) -> str | None:
    """A route's `concurrency`: a table, `true` (the policy's) or `false` (none)."""
    if value is None or isinstance(value, bool | ConcurrencyConfig):
        return None
    return (
        "expected a table of concurrency keys, true (the policy's [concurrency]) or "
        f"false (no bulkhead on this route), got {_got(value)}"
    )


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "AEIOU" else "a ") + noun


def _items(cls: type) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, tuple | list):
            return f"expected a list of {cls.__name__}, got {_tname(value)}"
        for i, item in enumerate(value):
            if not isinstance(item, cls):
                return f"item {i}: expected {_a(cls.__name__)}, got {_tname(item)}"
        return None

    return check


def _spec(default: Any, check: Check | None = None, **meta: Any) -> Any:
    metadata = {"check": check, **meta}
    if isinstance(default, list | dict | set):
        raise TypeError("mutable default")
    return field(default=default, metadata=metadata)


def _validate(obj: Any) -> None:
    """Run every field's check; raise one PolicyError listing all problems."""
    issues: list[PolicyIssue] = []
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(obj, f.name, value)
        if check is not None:
            problem = check(value)
            if problem:
                issues.append(PolicyIssue(f.metadata.get("toml", f.name), problem))
    issues.extend(obj._cross_checks())
    if issues:
        raise PolicyError(issues)


class _Validated:
    def __post_init__(self) -> None:
        _validate(self)

    def _cross_checks(self) -> list[PolicyIssue]:
        return []

    def _valid(self, *names: str) -> bool:
        """Did each named field pass its own check? A check between fields weighs only
        such values: a burst of -1 is the burst's problem, reported there, not also the
        cost's ("cost 1 exceeds burst -1"), nor a max_limit of -1 the min_limit's."""
        checks = {f.name: f.metadata.get("check") for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for name in names:
            check = checks[name]
            if check is not None and check(getattr(self, name)):
                return False
        return True


# ---------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class StateConfig(_Validated):
    """Where counters live and what to do when that place is unreachable."""

    url: str = _spec("memory://", non_empty_str)
    on_error: Literal["local", "open", "closed"] = _spec("local", one_of(FAILURE_MODES))
    timeout_ms: int = _spec(250, int_in(1, 60_000))
    connect_timeout_ms: int = _spec(250, int_in(1, 60_000))
    pool_size: int = _spec(32, int_in(1, 10_000))
    max_keys: int = _spec(100_000, int_in(16, 100_000_000))
    sync_interval_ms: int = _spec(100, int_in(1, 60_000))
    key_prefix: str = _spec("fmw", _key_prefix)
    fleet_share_max_age_s: float = _spec(60.0, number_in(0.0, 86_400.0))
    fleet_share_even_ratio: float = _spec(0.2, number_in(0.01, 1.0))
    fleet_share_load_max_age_s: float = _spec(30.0, number_in(0.0, 86_400.0))

    def _cross_checks(self) -> list[PolicyIssue]:
        schemes = (
            "memory://",
            "redis://",
            "rediss://",
            "unix://",
            "tiered+redis://",
            "tiered+rediss://",
        )
        if isinstance(self.url, str) and not self.url.startswith(schemes):
            return [
                PolicyIssue(
                    "url",
                    f"{_toml(redact_url(self.url))} has an unknown scheme: use "
                    + ", ".join(schemes),
                )
            ]
        if isinstance(self.url, str) and self.url.startswith("unix://"):
            problem = _unix_url_problem(self.url)
            if problem:
                return [PolicyIssue("url", f"{_toml(redact_url(self.url))}: {problem}")]
        if isinstance(self.url, str) and self.url.startswith(("redis", "tiered+redis")):
            problem = _tcp_redis_url_problem(self.url)
            if problem:
                return [PolicyIssue("url", f"{_toml(redact_url(self.url))}: {problem}")]
        if isinstance(self.url, str) and not self.url.startswith("memory://"):
            shown = _toml(redact_url(self.url))
            return [PolicyIssue("url", f"{shown}: {p}") for p in _url_query_problems(self.url)]
        return []


# The query of a Redis state URL: redis-py hands every parameter to the connection.
# The store sets these itself (a second value was a TypeError building the client):
_URL_SET_BY_US: Final = {
    "socket_timeout": "is set by [state] timeout_ms",
    "socket_connect_timeout": "is set by [state] connect_timeout_ms",
    "max_connections": "is set by [state] pool_size",
    "timeout": "is set by [state] timeout_ms (a call waits at most that long for a connection)",
    "retry_on_timeout": "cannot be set: fidelity_mw's client never retries (a script "
    "sent twice may charge twice), it decides per on_error instead",
    "retry_on_error": "cannot be set: fidelity_mw's client never retries (a script "
    "sent twice may charge twice), it decides per on_error instead",
}
# ...and these a connection takes (redis-py 5 to 8), with `cluster`, our own flag. (The
# reply format too: RESP3 is redis-py 8's default, and the store reads replies decoded
# to str as it reads bytes: `protocol`, `decode_responses` worked before this check.)
_URL_PLAIN: Final = (
    "cluster",
    "db",
    "username",
    "password",
    "client_name",
    "lib_name",
    "lib_version",
    "health_check_interval",
    "socket_keepalive",
    "socket_read_size",
    "protocol",
    "decode_responses",
    "encoding",
    "encoding_errors",
    "legacy_responses",
)
_URL_SSL: Final = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_include_verify_flags",
    "ssl_exclude_verify_flags",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_check_hostname",
    "ssl_min_version",
    "ssl_ciphers",
    "ssl_password",
)
_FLAG_VALUES: Final = ("1", "true", "yes", "on", "0", "false", "no", "off")
# the parameters we pass on that redis-py reads as a boolean
_URL_FLAGS: Final = (
    "socket_keepalive",
    "ssl_check_hostname",
    "legacy_responses",
    "decode_responses",
)
_CERT_REQS: Final = ("none", "optional", "required")  # redis-py's names of ssl.CERT_*


def _url_query_problems(url: str) -> list[str]:
    """The parameters of a Redis state URL no client of the store can take. Before this
    check such a URL passed, and the client failed to build or to connect at run time:
    the middleware then decided without any state, enforcing no limit."""
    query = url.partition("?")[2].partition("#")[0]
    if not query:
        return []
    tls = url.startswith(("rediss://", "tiered+rediss://"))
    unix = url.startswith("unix://")
    problems: list[str] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if not value and name != "cluster":
            continue  # redis-py leaves a blank value out (`?db=`: an empty template variable)
        if name in _URL_SET_BY_US:
            problems.append(f"{name} {_URL_SET_BY_US[name]}; leave it out of the URL")
        elif name in _URL_SSL and not tls:
            problems.append(f"{name} needs rediss:// (TLS): this URL connects without it")
        elif name == "cluster":
            if value.strip().lower() not in _FLAG_VALUES:
                problems.append(f"cluster={value}: write cluster=true or cluster=false")
            elif unix and value.strip().lower() in _FLAG_VALUES[:4]:
                problems.append("Redis Cluster over a unix socket is not supported: use redis://")
        elif name in _URL_FLAGS and value.strip().lower() not in _FLAG_VALUES:
            # redis-py reads any value but 0/f/false/n/no/off as true (`maybe`: keepalive
            # on), and `decode_responses` takes the text as it is ("false" is true)
            problems.append(f"{name}={value}: write {name}=true or {name}=false")
        elif name == "protocol" and value.strip() not in ("2", "3"):
            problems.append(f"protocol={value}: write 2 or 3")
        elif name == "socket_keepalive" and unix:  # (a TypeError at the first connection)
            problems.append("socket_keepalive is for TCP: a unix:// socket connection takes none")
        elif name in ("db", "health_check_interval", "socket_read_size", "ssl_min_version"):
            number = value.strip()
            # redis-py's int(): junk failed the client ("²" is a digit to isdigit(), not int())
            if not (number.isascii() and number.isdigit()):
                problems.append(f"{name}={value}: write a whole number")
        elif name == "client_name" and not all("!" <= ch <= "~" for ch in value):
            # Redis refuses CLIENT SETNAME with a space or anything outside printable
            # ASCII, and redis-py sends it on every connect: no connection would ever open
            problems.append(
                f"client_name={value}: Redis takes a client name of printable ASCII without spaces"
            )
        elif name == "ssl_cert_reqs" and value not in _CERT_REQS:  # (exact: redis-py's dict)
            # redis-py raises building the first connection: the store never connects
            problems.append(f"ssl_cert_reqs={value}: write one of {', '.join(_CERT_REQS)}")
        elif name not in _URL_PLAIN and name not in _URL_SSL:
            known = [*_URL_PLAIN, *(_URL_SSL if tls else ())]
            close = difflib.get_close_matches(name, [*known, *_URL_SET_BY_US], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown parameter {name!r}{hint} (the URL takes: {', '.join(known)})")
    return problems


def _unix_url_problem(url: str) -> str | None:
    """A unix:// URL without a socket path: redis-py reads the path from the URL's path
    and, given none, connects to "" and fails every time, so the middleware decided
    without its state from the first request on."""
    try:
        path = urlsplit(url).path
    except ValueError as exc:
        return f"not a URL ({exc})"
    if not path.strip("/"):
        return "a unix:// URL needs the socket's path (unix:///run/redis/redis.sock)"
    return None


def _tcp_redis_url_problem(url: str) -> str | None:
    """What makes a redis:// URL one no client can be built from (the middleware then
    ran without state, one warning in the log): a port that is no number, a database
    that is no number."""
    try:
        # urlsplit itself raises for a bracket left open (`redis://[::1/0`)
        parts = urlsplit(url.removeprefix("tiered+"))
    except ValueError as exc:
        return f"not a URL ({exc}; an IPv6 address is written redis://[::1]:6379/0)"
    try:
        parts.port  # noqa: B018 - the property parses the port, and raises
    except ValueError:
        return "the port is not a number between 0 and 65535"
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):  # "²".isdigit(), and int() refuses it
        return f"the database {_toml(db)} is not a number (write redis://HOST:PORT/0)"
    return None


@dataclass(frozen=True, slots=True)
class DeadlineConfig(_Validated):
    """Where the caller's remaining time comes from, and the default when it sends none."""

    header: tuple[str, ...] = _spec(("x-request-timeout-ms", "grpc-timeout"), _header_names)
    default_ms: int | None = _spec(30_000, optional(int_in(1, 86_400_000)))
    max_ms: int | None = _spec(None, optional(int_in(1, 86_400_000)))

    def __post_init__(self) -> None:
        if isinstance(self.header, str):
            object.__setattr__(self, "header", (self.header,))
        _validate(self)
        object.__setattr__(self, "header", tuple(h.lower() for h in self.header))

    def _cross_checks(self) -> list[PolicyIssue]:
        # A default above the cap would be cut to the cap on every request without a
        # header of its own: the file would say one deadline and the service keep another.
        if (
            self._valid("default_ms", "max_ms")
            and self.default_ms is not None
            and self.max_ms is not None
            and self.default_ms > self.max_ms
        ):
            return [
                PolicyIssue(
                    "default_ms",
                    f"default_ms {self.default_ms} exceeds max_ms {self.max_ms}: "
                    "the default deadline cannot be longer than the longest one allowed",
                )
            ]
        return []

    @property
    def cap_ms(self) -> int | None:
        """Longest deadline a caller may ask for (callers can shorten, not extend)."""
        return self.max_ms if self.max_ms is not None else self.default_ms


def _statuses_from(value: Any) -> Any:
    """Accept '5xx' classes in TOML: ['5xx', 429] -> (500..599, 429)."""
    if not isinstance(value, list | tuple):
        return value
    out: list[Any] = []
    for item in value:
        if isinstance(item, str) and re.fullmatch(r"[1-5]xx", item):
            base = int(item[0]) * 100
            out.extend(range(base, base + 100))
        else:
            out.append(item)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class BreakerConfig(_Validated):
    """A circuit breaker: closed -> open on failure or slow-call ratio; half-open probes."""

    failure_ratio: float = _spec(0.5, number_in(0.0, 1.0, lo_open=True))
    min_calls: int = _spec(20, int_in(1, 1_000_000))
    window_s: float = _spec(30.0, number_in(0.1, 86_400.0))
    open_s: float = _spec(5.0, number_in(0.001, 86_400.0))
    open_min_s: float = _spec(0.5, number_in(0.001, 86_400.0))
    open_jitter: float = _spec(0.2, number_in(0.0, 0.9))
    half_open_probes: int = _spec(3, int_in(1, 1000))
    probe_lease_s: float = _spec(30.0, number_in(0.001, 86_400.0))
    slow_call_ms: int | None = _spec(None, optional(int_in(1, 86_400_000)))
    slow_call_ratio: float | None = _spec(None, optional(number_in(0.0, 1.0, lo_open=True)))
    consecutive_failures: int | None = _spec(None, optional(int_in(1, 1_000_000)))
    # Given as a list or tuple (or "5xx" classes), held as a frozenset: the annotation says
    # both, because the compiled build checks attribute types where it reads them.
    failure_statuses: frozenset[int] | tuple[int, ...] = _spec(tuple(range(500, 600)), _statuses)
    # Whose outcomes open it on a shared store (Redis, tiered): the fleet's, or this
    # process's alone (a breaker of its own there). No meaning in memory mode.
    scope: Literal["fleet", "process"] = _spec(
        "fleet", one_of(BREAKER_SCOPES), unset_unversioned=True
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "failure_statuses", _statuses_from(self.failure_statuses))
        _validate(self)
        object.__setattr__(self, "failure_statuses", frozenset(self.failure_statuses))

    def _cross_checks(self) -> list[PolicyIssue]:
        if (self.slow_call_ms is None) != (self.slow_call_ratio is None):
            return [
                PolicyIssue(
                    "slow_call_ms",
                    "slow_call_ms and slow_call_ratio go together: "
                    "set both to count slow calls, or neither",
                )
            ]
        return []


@dataclass(frozen=True, slots=True)
class RateLimit(_Validated):
    """One limit: `rate` with `burst`, counted per `key`, on paths matching `match`."""

    name: str = _spec("default", _limit_name)
    rate: str = _spec("100/s", _rate)
    burst: int | None = _spec(None, optional(int_in(1, MAX_RATE_COUNT)))
    # an int, or (in Python) a function of the request: its cost (inbound/costs.py)
    cost: int | CostFunc = _spec(1, _cost)
    key: str | KeyFunc = _spec("client_ip", _key)
    match: str = _spec("*", _glob)
    exclude: tuple[str, ...] = _spec((), _globs)
    methods: tuple[str, ...] | None = _spec(None, _methods)
    shadow: bool = _spec(False, boolean)
    charge: Literal["served", "always"] = _spec("served", one_of(CHARGE_MODES))
    retry_credit_s: float = _spec(10.0, number_in(0.0, 3600.0))
    # this limit's own IPv6 prefix for client keys (None: the policy's client_ipv6_prefix)
    # (left out of `to_dict` while unset: a policy's version is the same as before it
    # existed, so an upgrade alone does not change the version processes report)
    client_ipv6_prefix: int | None = _spec(None, optional(int_in(32, 128)), unset_unversioned=True)

    def __post_init__(self) -> None:
        _validate(self)
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))
        object.__setattr__(self, "rate", tidy_rate(self.rate))

    def applies_to(self, path: str) -> bool:
        """Whether `path` is this limit's: its `match` covers it and no `exclude` does."""
        return glob_matches(self.match, path) and not any(
            glob_matches(glob, path) for glob in self.exclude
        )

    def _cross_checks(self) -> list[PolicyIssue]:
        issues: list[PolicyIssue] = []
        if self.client_ipv6_prefix is not None and self.key in ("route", "global"):
            # a key that counts no client: the setting would do nothing
            issues.append(
                PolicyIssue(
                    "client_ipv6_prefix",
                    f"key {_toml(self.key)} counts no client address: client_ipv6_prefix "
                    'applies to key = "client_ip", "header:NAME" or a key function (their '
                    "address); leave it out",
                )
            )
        cost = self.cost
        if not isinstance(cost, int):  # a function's cost is checked per request
            return issues
        if self._valid("burst", "cost") and self.burst is not None and self.burst < cost:
            issues.append(
                PolicyIssue(
                    "cost",
                    f"cost {self.cost} exceeds burst {self.burst}: "
                    "no request could ever be admitted",
                )
            )
        elif self.burst is None and _rate(self.rate) is None and _is_int(cost):
            count, _ = parse_rate(self.rate)
            if count < cost:
                issues.append(
                    PolicyIssue(
                        "cost",
                        f"cost {self.cost} exceeds the default burst {count}: set burst >= cost",
                    )
                )
        return issues

    @property
    def limit(self) -> int:
        return parse_rate(self.rate)[0]

    @property
    def cost_fn(self) -> CostFunc | None:
        """The function that says each request's cost, or None for a constant `cost`."""
        cost = self.cost
        return None if isinstance(cost, int) else cost

    @property
    def fixed_cost(self) -> int:
        """The constant cost, or 1 for a cost per request (the least one that is counted)."""
        cost = self.cost
        return cost if isinstance(cost, int) else 1

    @property
    def period_s(self) -> float:
        return parse_rate(self.rate)[1]

    @property
    def burst_size(self) -> int:
        """Bucket size; defaults to the count of the rate (100/s -> 100)."""
        return self.burst if self.burst is not None else self.limit

    @property
    def emission_interval_s(self) -> float:
        count, period = parse_rate(self.rate)
        return period / count


PRIORITIES = ("critical", "default", "sheddable")


@dataclass(frozen=True, slots=True)
class ConcurrencyConfig(_Validated):
    """A bulkhead: at most `limit` requests of a route in flight, fixed or found adaptively."""

    limit: int = _spec(100, int_in(1, 1_000_000))
    adaptive: bool = _spec(False, boolean)
    min_limit: int = _spec(1, int_in(1, 1_000_000))
    max_limit: int = _spec(1_000, int_in(1, 1_000_000))
    max_queue: int = _spec(0, int_in(0, 1_000_000))
    queue_timeout_ms: int = _spec(50, int_in(1, 60_000))
    default_share: float = _spec(0.9, number_in(0.0, 1.0, lo_open=True))
    sheddable_share: float = _spec(0.5, number_in(0.0, 1.0, lo_open=True))
    tolerance: float = _spec(1.5, number_in(1.0, 100.0))
    shed_stale: bool = _spec(False, boolean)
    # None: on for an adaptive limit without `shed_stale` (docs/inbound.md, "newest of the turn")
    newest_first: bool | None = _spec(None, optional(boolean))
    # One body message of a streamed response not taken by its client in this long: the
    # slot is given back and the response ended (0: never). nginx's `send_timeout`.
    send_stall_timeout_s: float = _spec(60.0, number_in(0.0, 86_400.0))

    @property
    def admits_newest(self) -> bool:
        """`newest_first` as it applies: set, or by default on for an adaptive limit
        that does not shed stale requests."""
        if self.newest_first is not None:
            return self.newest_first
        return self.adaptive and not self.shed_stale

    def _cross_checks(self) -> list[PolicyIssue]:
        issues = []
        if self.newest_first and not self.adaptive:
            issues.append(PolicyIssue("newest_first", "needs adaptive = true"))
        if self.newest_first and self.shed_stale:
            # (two answers to the same unknown: how long a request read late waited)
            issues.append(PolicyIssue("newest_first", "excludes shed_stale: choose one"))
        if self.shed_stale and not self.adaptive:
            issues.append(PolicyIssue("shed_stale", "needs adaptive = true"))
        if self.shed_stale and self._valid("tolerance") and self.tolerance <= 1.0:
            # (tolerance - 1) x floor is the wait a request may have: 0 would shed them all
            issues.append(PolicyIssue("shed_stale", "needs tolerance > 1"))
        limits_valid = self._valid("limit", "min_limit", "max_limit")
        if limits_valid and self.min_limit > self.max_limit:
            issues.append(PolicyIssue("min_limit", "must not exceed max_limit"))
        if limits_valid and self.adaptive and not self.min_limit <= self.limit <= self.max_limit:
            issues.append(
                PolicyIssue("limit", "the adaptive limit starts between min_limit and max_limit")
            )
        if (
            self._valid("sheddable_share", "default_share")
            and self.sheddable_share > self.default_share
        ):
            issues.append(
                PolicyIssue(
                    "sheddable_share", "must not exceed default_share (lower classes shed first)"
                )
            )
        return issues


@dataclass(frozen=True, slots=True)
class RouteConfig(_Validated):
    """Per-route overrides, matched by path glob (first match wins)."""

    match: str = _spec("*", _glob)
    methods: tuple[str, ...] | None = _spec(None, _methods)
    name: str | None = _spec(None, optional(_sf_name))
    deadline_ms: int | None = _spec(None, optional(int_in(1, 86_400_000)))
    # True: the policy's [breaker]; False: no breaker; a BreakerConfig: this one.
    breaker: bool | BreakerConfig = _spec(True, None)
    enforce: bool = _spec(True, boolean)
    # None (or True): the policy's [concurrency] (if any); False: no bulkhead, whatever
    # [concurrency] says; a table: this route's own bulkhead.
    concurrency: ConcurrencyConfig | bool | None = _spec(None, _route_concurrency)
    priority: Literal["critical", "default", "sheddable"] = _spec("default", one_of(PRIORITIES))

    def __post_init__(self) -> None:
        _validate(self)
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))
        if self.concurrency is True:  # the policy's, as left out: one spelling, one version
            object.__setattr__(self, "concurrency", None)

    def _cross_checks(self) -> list[PolicyIssue]:
        issues: list[PolicyIssue] = []
        if not isinstance(self.breaker, bool | BreakerConfig):
            issues.append(PolicyIssue("breaker", "expected true, false or a breaker table"))
        if self.name is None and _glob(self.match) is None:
            unsafe = _header_safe(self.match)
            if unsafe:
                issues.append(
                    PolicyIssue(
                        "match", f"{unsafe}; the route's name defaults to its match: set name"
                    )
                )
        return issues

    @property
    def route_name(self) -> str:
        """The name the route is known by: `name`, or its `match` when unnamed."""
        return self.name or self.match


_RETRY_MAX_MS_DEFAULT = 2_000
# RFC 9110's idempotent methods: retried by default (`[upstream.retry] methods`).
RETRY_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")


def _retry_methods(value: Any) -> str | None:
    """`[upstream.retry] methods`: HTTP methods, or an empty list (then only requests
    with an `Idempotency-Key` are retried)."""
    if not isinstance(value, tuple | list):
        return 'expected a list of HTTP methods, e.g. ["GET", "PUT", "POST"]'
    for item in value:
        if not isinstance(item, str) or item.upper() not in HTTP_METHODS:
            return f"{_toml(item)} is not an HTTP method: allowed {', '.join(HTTP_METHODS)}"
    return None


@dataclass(frozen=True, slots=True)
class RetryConfig(_Validated):
    """Outbound retry: total attempts, backoff with jitter, and the retry budget."""

    attempts: int = _spec(3, int_in(1, MAX_ATTEMPTS))
    base_ms: int = _spec(100, int_in(0, 600_000))
    max_ms: int = _spec(_RETRY_MAX_MS_DEFAULT, int_in(0, 600_000))
    jitter: Literal["full", "equal", "decorrelated", "none"] = _spec("full", one_of(JITTER_MODES))
    budget_ratio: float = _spec(0.2, number_in(0.0, 10.0))
    budget_min_per_s: float = _spec(3.0, number_in(0.0, 1_000_000.0))
    budget_window_s: float = _spec(10.0, number_in(0.1, 3_600.0))
    retry_after_max_s: float = _spec(30.0, number_in(0.0, 86_400.0))
    advice_spread: float = _spec(0.5, number_in(0.0, 10.0))
    advice_spread_min_s: float = _spec(0.0, number_in(0.0, 3_600.0))
    advice_max_s: float = _spec(300.0, number_in(1.0, 86_400.0))
    on_status: tuple[int, ...] = _spec((502, 503, 504), _statuses)
    on_connect_error: bool = _spec(True, boolean)
    on_read_timeout: bool = _spec(True, boolean)
    on_429: bool = _spec(True, boolean)
    # The methods retried (a request with an Idempotency-Key is, whatever its method).
    methods: tuple[str, ...] = _spec(RETRY_METHODS, _retry_methods)

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_status", _statuses_from(self.on_status))
        if _retry_methods(self.methods) is None:
            unique = dict.fromkeys(m.upper() for m in self.methods)
            object.__setattr__(self, "methods", tuple(unique))
        _validate(self)

    def _cross_checks(self) -> list[PolicyIssue]:
        if self._valid("base_ms", "max_ms") and self.max_ms < self.base_ms:
            default = " (the default)" if self.max_ms == _RETRY_MAX_MS_DEFAULT else ""
            return [
                PolicyIssue(
                    "max_ms",
                    f"max_ms {self.max_ms}{default} is below base_ms {self.base_ms}: "
                    f"set max_ms >= {self.base_ms}",
                )
            ]
        return []


HEDGE_DELAYS = ("fixed", "p95")
RETRY_AFTER_SCOPES = ("instance", "service")
PROTOCOL_HEADER_MODES = ("auto", "always", "never")


@dataclass(frozen=True, slots=True)
class HedgeConfig(_Validated):
    """Hedged requests: a slow idempotent attempt gets a second one, first answer wins."""

    after: Literal["fixed", "p95"] = _spec("fixed", one_of(HEDGE_DELAYS))
    after_ms: int = _spec(50, int_in(1, 600_000))
    max_hedges: int = _spec(1, int_in(1, 3))
    min_samples: int = _spec(20, int_in(1, 10_000))


@dataclass(frozen=True, slots=True)
class UpstreamConfig(_Validated):
    """Outbound policy for hosts matching `host` (a glob; '*' is the default)."""

    host: str = _spec("*", _host_glob)
    retry: RetryConfig = _spec(RetryConfig(), _instance(RetryConfig))
    breaker: BreakerConfig | None = _spec(BreakerConfig(), optional(_instance(BreakerConfig)))
    attempt_timeout_ms: int = _spec(10_000, int_in(1, 86_400_000))
    shared_budget: bool = _spec(False, boolean)
    instances: tuple[str, ...] = _spec((), _base_urls)
    panic_threshold: float = _spec(0.5, number_in(0.0, 1.0))
    max_ejected_ratio: float = _spec(0.5, number_in(0.0, 1.0))
    # How an instance's failed attempt weighs in the balancer's pick: taken for this many
    # times as slow as the slowest instance right after it, fading over `failure_fade_s`
    # (decide/balance.py `cost`). Left out of `to_dict` while at their defaults, so the
    # versions of the policies written before them stay.
    failure_penalty: float = _spec(4.0, number_in(1.0, 1000.0), unset_unversioned=True)
    failure_fade_s: float = _spec(
        10.0, number_in(0.0, 86_400.0, lo_open=True), unset_unversioned=True
    )
    retry_after_scope: Literal["instance", "service"] = _spec(
        "instance", one_of(RETRY_AFTER_SCOPES)
    )
    hedge: HedgeConfig | None = _spec(None, optional(_instance(HedgeConfig)))
    # Our cross-service headers (x-fidelity-attempt, x-request-timeout-ms): "auto" sends
    # them to hosts that are part of the system (docs/outbound.md), the others force it.
    protocol_headers: Literal["auto", "always", "never"] = _spec(
        "auto", one_of(PROTOCOL_HEADER_MODES)
    )
    # The clients name these hosts (webhook targets, callback URLs): a request that called
    # one pays its units however it ends (inbound/refusals.charged_for_upstream). Left
    # out of `to_dict` while false, as `RateLimit.client_ipv6_prefix` while unset.
    client_chosen: bool = _spec(False, boolean, unset_unversioned=True)

    def _cross_checks(self) -> list[PolicyIssue]:
        # The transport sends every host the entry matches to the instances: under a glob
        # (`*`, `*.internal`) a call to https://example.com/x went to http://10.0.0.7:8080/x,
        # silently, for every host the service's author never meant.
        if (
            self._valid("host", "instances")
            and self.instances
            and any(ch in self.host for ch in "*?")
        ):
            return [
                PolicyIssue(
                    "instances",
                    f"a service's host is the one name callers put in their URLs, not a glob: "
                    f"with host {_toml(self.host)} every host it matches would be sent to these "
                    'instances; write the service\'s name (for example host = "payments")',
                )
            ]
        return []


DEFAULT_TRUSTED_PEERS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)


@dataclass(frozen=True, slots=True)
class Policy(_Validated):
    """The whole configuration. Build it in Python or load it with `from_toml`."""

    state: StateConfig = _spec(StateConfig(), _instance(StateConfig))
    deadline: DeadlineConfig = _spec(DeadlineConfig(), _instance(DeadlineConfig))
    rate_limits: tuple[RateLimit, ...] = _spec((), _items(RateLimit), toml="rate_limit")
    breaker: BreakerConfig | None = _spec(BreakerConfig(), optional(_instance(BreakerConfig)))
    routes: tuple[RouteConfig, ...] = _spec((), _items(RouteConfig), toml="route")
    concurrency: ConcurrencyConfig | None = _spec(None, optional(_instance(ConcurrencyConfig)))
    priority_header: str | None = _spec(None, optional(_header_name))
    upstreams: tuple[UpstreamConfig, ...] = _spec((), _items(UpstreamConfig), toml="upstream")
    trusted_proxies: tuple[str, ...] = _spec((), _cidrs)
    trusted_peers: tuple[str, ...] = _spec(DEFAULT_TRUSTED_PEERS, _cidrs)
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = _spec(
        "x-forwarded-for", one_of(FORWARDED_HEADERS)
    )
    client_ipv6_prefix: int = _spec(64, int_in(32, 128))
    rate_limit_headers: Literal["always", "on_reject", "never"] = _spec(
        "always", one_of(HEADER_MODES)
    )
    rate_limit_header_names: Literal["ietf", "x-ratelimit", "both"] = _spec(
        "ietf", one_of(HEADER_NAMES)
    )
    schema_version: int = _spec(1, _schema_version, toml="version")

    _version: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)
        blob = json.dumps(_versioned(self.to_dict()), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "_version", hashlib.sha256(blob.encode()).hexdigest()[:12])

    def _cross_checks(self) -> list[PolicyIssue]:
        if not self._valid("rate_limits", "routes"):  # (reported as those fields' own)
            return []
        limits = [lim.name if isinstance(lim, RateLimit) else None for lim in self.rate_limits]
        routes = [r.route_name if isinstance(r, RouteConfig) else None for r in self.routes]
        return _duplicate_names(limits, routes)

    # ------------------------------------------------------------ loading

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        """Load and validate a TOML policy file. Errors name the file and each key path."""
        source = str(path)
        if not isinstance(path, str | bytes | os.PathLike):
            # open() takes an int as a file descriptor: `from_toml(5)` read whatever fd 5
            # was (a socket of the server's, blocking) and closed it behind its owner
            message = f"expected the policy file's path (a str or a Path), got {_tname(path)}"
            raise PolicyError([PolicyIssue("", message)], source)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
            # "utf-8-sig": a byte order mark (Windows editors write one) is no TOML
            # statement for tomllib, but no reason to refuse the file either
            text = raw.decode("utf-8-sig")
            data = tomllib.loads(text)
        except OSError as exc:
            where = ""
            if isinstance(exc, FileNotFoundError) and not Path(path).is_absolute():
                # a server started from another directory looks for it there
                where = f" (relative to the working directory {Path.cwd()})"
            message = f"cannot read policy file: {exc}{where}"
            raise PolicyError([PolicyIssue("", message)], source) from exc
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError([PolicyIssue("", f"not valid TOML: {exc}")], source) from exc
        except RecursionError:  # tomllib recurses per level of nested arrays and tables
            raise PolicyError([PolicyIssue("", f"not valid TOML: {TOO_DEEP}")], source) from None
        except UnicodeDecodeError as exc:  # TOML files are UTF-8
            raise PolicyError(
                [PolicyIssue("", f"not valid TOML: the file is not UTF-8 ({exc})")], source
            ) from exc
        try:
            return cls.from_dict(data)
        except PolicyError as exc:
            try:
                found = locate_keys(text)
                lines = {i.path: found.line_for(i.path) for i in exc.issues if i.path}
            except RecursionError:  # nesting tomllib just managed: no lines, same issues
                lines = {}
            raise PolicyError(exc.issues, source, lines) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build from plain data (parsed TOML or JSON). Unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise PolicyError.at("", f"expected a table at the top level, got {_tname(data)}")
        issues: list[PolicyIssue] = []
        kwargs = _read_table(cls, data, "", issues, nested=_POLICY_NESTED)
        if issues:
            if _unknown_keys_only(issues, ""):
                _more_issues(cls, kwargs, "", issues)  # its cross-checks among them
            else:
                # The policy cannot be built, so its own checks would not run: check the
                # plain values of its top level, and find duplicate names in the plain
                # data, so every problem is reported at once.
                _field_checks(cls, kwargs, "", issues, _POLICY_NESTED)
                issues.extend(_duplicate_names(*_raw_names(data)))
            raise PolicyError(issues)
        try:
            return cls(**kwargs)
        except PolicyError as exc:
            raise PolicyError(exc.issues) from None

    # ------------------------------------------------------------ identity

    def to_dict(self) -> dict[str, Any]:
        """Normalized plain data; the input of `version` (there with each rate in its
        one spelling: `canonical_rate`)."""
        plain: dict[str, Any] = _plain(self)
        return plain

    @property
    def version(self) -> str:
        """Short content hash: equal policies have equal versions, whatever their source."""
        return self._version

    def upstream_for(self, host: str) -> UpstreamConfig:
        """The first `[[upstream]]` whose host glob matches, else the defaults."""
        for upstream in self.upstreams:
            if glob_matches(upstream.host, host.lower()):
                return upstream
        return _DEFAULT_UPSTREAM


_DEFAULT_UPSTREAM = UpstreamConfig()


# ---------------------------------------------------------------- helpers


def _duplicate_names(
    limits: Iterable[str | None], routes: Iterable[str | None]
) -> list[PolicyIssue]:
    """Names key the counters (limits) and the breakers (routes): two entries sharing
    one would share, and keep resetting, each other's state."""
    issues: list[PolicyIssue] = []
    for table, names, why in (
        ("rate_limit", limits, "names must be unique (they key the counters)"),
        (
            "route",
            routes,
            "names must be unique (they key the route's breaker); "
            "a route without a name is named by its match: set name",
        ),
    ):
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name is None:
                continue
            if name in seen:
                issues.append(
                    PolicyIssue(
                        f"{table}[{i}].name",
                        f"{_toml(name)} is already the name of {table}[{seen[name]}]: {why}",
                    )
                )
            else:
                seen[name] = i
    return issues


def _raw_names(data: Mapping[str, Any]) -> tuple[list[str | None], list[str | None]]:
    """The names of limits and routes as plain data gives them (defaults applied)."""

    def entries(key: str) -> list[Any]:
        value = data.get(key, [])
        return [value] if isinstance(value, Mapping) else value if isinstance(value, list) else []

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    limits = [
        text(item.get("name", "default")) if isinstance(item, Mapping) else None
        for item in entries("rate_limit")
    ]
    routes = [
        text(item.get("name") or item.get("match", "*")) if isinstance(item, Mapping) else None
        for item in entries("route")
    ]
    return limits, routes


def _versioned(plain: dict[str, Any]) -> dict[str, Any]:
    """`Policy.to_dict()` as `version` hashes it: each limit's rate in its one spelling
    (" 5/s" and "5/s", "5/minute" and "5/min" were different versions of one policy)."""
    limits = plain.get("rate_limit")
    if not limits:
        return plain
    rates = [{**lim, "rate": canonical_rate(lim["rate"])} for lim in limits]
    return {**plain, "rate_limit": rates}


# The annotations of number fields (`number_in`), which take an int for a float
_FLOAT_FIELDS: Final = frozenset({"float", "float | None"})


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            if f.metadata.get("unset_unversioned") and (
                value is None or value is False or value == f.default
            ):  # (a key added later, left at its default: the version a policy had stays)
                continue
            if type(value) is int and f.type in _FLOAT_FIELDS:
                # `max_ejected_ratio = 1` and `= 1.0` are one policy (they compare equal):
                # one version, not two a fleet's gauge would show as a policy change
                value = float(value)
            out[f.metadata.get("toml", f.name)] = _plain(value)
        return out
    if isinstance(obj, frozenset):
        return sorted(obj)
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if callable(obj):
        return f"callable:{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    return obj


def _glob_segment(segment: str) -> re.Pattern[str]:
    """A fixed-length piece of a glob (no '*'): '?' is any one character."""
    return re.compile("".join("." if ch == "?" else re.escape(ch) for ch in segment), re.DOTALL)


class _Glob:
    """A glob split at its '*'s into fixed-length segments.

    Greedy leftmost placement of each middle segment is exact for globs whose
    only variable-length part is '*', and it never backtracks: matching costs
    O(len(text) x len(pattern)), where a backtracking regex (`.*a.*b`) is
    quadratic or worse in the path length (a 32 KB path took most of a second).
    """

    __slots__ = ("head", "head_len", "middle", "min_len", "tail", "tail_len")

    def __init__(self, pattern: str) -> None:
        segments = pattern.split("*")
        self.head = _glob_segment(segments[0])
        self.head_len = len(segments[0])
        self.tail: re.Pattern[str] | None = None
        self.tail_len = 0
        self.middle: tuple[re.Pattern[str], ...] = ()
        if len(segments) > 1:
            self.tail = _glob_segment(segments[-1])
            self.tail_len = len(segments[-1])
            self.middle = tuple(_glob_segment(s) for s in segments[1:-1] if s)
        self.min_len = sum(len(s) for s in segments)

    def matches(self, text: str) -> bool:
        if self.tail is None:
            return self.head.fullmatch(text) is not None
        end = len(text) - self.tail_len
        if len(text) < self.min_len or self.head.match(text) is None:
            return False
        if self.tail.fullmatch(text, end) is None:
            return False
        start = self.head_len
        for segment in self.middle:
            found = segment.search(text, start, end)
            if found is None:
                return False
            start = found.end()
        return True


_GLOB_CACHE: dict[str, _Glob] = {}


TOO_DEEP = "arrays or tables nested too deeply to parse"


def names_head(entries: Iterable[RateLimit | RouteConfig]) -> bool:
    """Whether an entry of this list (`[[rate_limit]]` or `[[route]]`) names HEAD itself."""
    return any(entry.methods is not None and "HEAD" in entry.methods for entry in entries)


def covers_method(methods: tuple[str, ...] | None, method: str, head_named: bool) -> bool:
    """Whether an entry with `methods` (None: every method) applies to `method`.

    HEAD is GET without the body (RFC 9110 9.3.2), and Starlette serves it with the GET
    handler (Flask and Django do the same): an entry that lists GET covers HEAD too, as
    a limit left out of it could be bypassed, unless an entry of the same list names
    HEAD itself (`head_named`, from `names_head`): then HEAD is that entry's alone."""
    if methods is None or method in methods:
        return True
    return method == "HEAD" and not head_named and "GET" in methods


def shown_methods(methods: tuple[str, ...], head_named: bool) -> tuple[str, ...]:
    """`methods` as they apply: with the HEAD that GET implies (`covers_method`)."""
    if "GET" in methods and "HEAD" not in methods and not head_named:
        return (*methods, "HEAD")
    return methods


def glob_matches(pattern: str, text: str) -> bool:
    """'*' matches any run of characters (slashes included); '?' matches one."""
    if pattern == "*":
        return True
    compiled = _GLOB_CACHE.get(pattern)
    if compiled is None:
        compiled = _GLOB_CACHE[pattern] = _Glob(pattern)
    return compiled.matches(text)


# How nested tables map to classes when reading plain data.
_Nested = dict[str, tuple[type, bool]]  # toml key -> (class, is_array_of_tables)
_POLICY_NESTED: _Nested = {
    "state": (StateConfig, False),
    "deadline": (DeadlineConfig, False),
    "rate_limit": (RateLimit, True),
    "breaker": (BreakerConfig, False),
    "route": (RouteConfig, True),
    "upstream": (UpstreamConfig, True),
    "concurrency": (ConcurrencyConfig, False),
}
_SUB_NESTED: dict[type, _Nested] = {
    RouteConfig: {"breaker": (BreakerConfig, False), "concurrency": (ConcurrencyConfig, False)},
    UpstreamConfig: {
        "retry": (RetryConfig, False),
        "breaker": (BreakerConfig, False),
        "hedge": (HedgeConfig, False),
    },
}


def _read_table(
    cls: type, data: Mapping[str, Any], path: str, issues: list[PolicyIssue], nested: _Nested
) -> dict[str, Any]:
    """Map TOML keys to constructor kwargs, checking unknown keys and nested tables."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    by_toml = {f.metadata.get("toml", f.name): f.name for f in fields.values()}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            # only plain data can hold one (TOML keys are strings): YAML's `1:`, a dict
            # built in code. Named as written, an unknown key like any other.
            key = repr(key)
        where = f"{path}.{key}" if path else key
        if key not in by_toml:
            # a breaker table's `enabled` is read (and taken out) before it gets here:
            # still one of its keys, for the hint (`enabeld`) and the list
            known = [*by_toml, "enabled"] if cls is BreakerConfig else list(by_toml)
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            issues.append(
                PolicyIssue(where, f"unknown key{suggestion} (allowed: {', '.join(sorted(known))})")
            )
            continue
        attr = by_toml[key]
        if key in nested:
            sub_cls, is_array = nested[key]
            kwargs[attr] = _read_nested(sub_cls, value, where, issues, is_array, cls)
        elif value is False and _false_means_none(fields[attr]):
            kwargs[attr] = None  # TOML has no null: `false` turns an optional value off
        else:
            kwargs[attr] = tuple(value) if isinstance(value, list) else value
    return kwargs


def _false_means_none(f: dataclasses.Field[Any]) -> bool:
    """A value that may be none but is not by default (`deadline.default_ms`): TOML
    has no null, so `false` says none. A flag's `false` is just false."""
    kind = str(f.type)
    return f.default is not None and kind.endswith("| None") and "bool" not in kind


def _read_nested(
    sub_cls: type, value: Any, where: str, issues: list[PolicyIssue], is_array: bool, parent: type
) -> Any:
    sub_nested = _SUB_NESTED.get(sub_cls, {})
    if is_array:
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list):
            issues.append(PolicyIssue(where, f"expected an array of tables ([[{where}]])"))
            return ()
        return tuple(
            _build(sub_cls, item, f"{where}[{i}]", issues, sub_nested)
            for i, item in enumerate(value)
        )
    if sub_cls in (ConcurrencyConfig, HedgeConfig) and value is None:
        return None  # JSON null (what `to_dict` writes when there is none)
    if sub_cls is ConcurrencyConfig and parent is RouteConfig and isinstance(value, bool):
        return None if value else False  # true: the policy's; false: no bulkhead
    if sub_cls is ConcurrencyConfig and parent is RouteConfig and not isinstance(value, Mapping):
        issues.append(PolicyIssue(where, _route_concurrency(value) or "expected a table"))
        return None
    if sub_cls is BreakerConfig and value is None and parent is not RouteConfig:
        return None  # JSON null (what `to_dict` writes for a disabled breaker): no breaker
    if sub_cls is BreakerConfig and isinstance(value, bool):
        if parent is RouteConfig:
            return value
        if value is False:
            return None
        return BreakerConfig()
    if sub_cls is BreakerConfig and isinstance(value, Mapping) and "enabled" in value:
        enabled = value["enabled"]
        if not isinstance(enabled, bool):
            issues.append(
                PolicyIssue(f"{where}.enabled", f"expected true or false, got {_toml(enabled)}")
            )
            return None
        value = {k: v for k, v in value.items() if k != "enabled"}
        if not enabled:
            # its other keys are still checked: a typo kept in a table switched off for a
            # while would otherwise surface only on the day it is switched back on
            _build(sub_cls, value, where, issues, sub_nested)
            return False if parent is RouteConfig else None
    if sub_cls is BreakerConfig and not isinstance(value, Mapping):
        # `breaker = "off"`: say what a breaker may be, not only that a table was expected
        issues.append(
            PolicyIssue(
                where,
                f"expected a table of breaker keys, true or false (no breaker), got {_got(value)}",
            )
        )
        return None
    return _build(sub_cls, value, where, issues, sub_nested)


def _unknown_keys_only(found: list[PolicyIssue], where: str) -> bool:
    """Every issue found in the table at `where` is an unknown key of its own (none in a
    table within it, which would leave a hole in what the table is built from)."""
    prefix = f"{where}." if where else ""
    return all(
        i.message.startswith("unknown key")
        and i.path.startswith(prefix)
        and "." not in i.path[len(prefix) :]
        and "[" not in i.path[len(prefix) :]
        for i in found
    )


def _more_issues(cls: type, kwargs: dict[str, Any], where: str, issues: list[PolicyIssue]) -> None:
    """A table with an unknown key is not built; its known keys are still checked, so one
    run of `check` names every problem, not the typo first and the rest next time."""
    try:
        cls(**kwargs)
    except PolicyError as exc:
        issues.extend(exc.prefixed(where).issues if where else exc.issues)
    except TypeError:  # pragma: no cover - guarded by the unknown-key check
        pass


def _field_checks(
    cls: type, kwargs: Mapping[str, Any], where: str, issues: list[PolicyIssue], nested: _Nested
) -> None:
    """Each plain value's own check (not the tables within, which report their own), for
    a table that cannot be built because a table within it failed: without it, a bad
    `trusted_proxies` surfaced only once a bad `[[rate_limit]]` was fixed. (The classes
    with tables within check their plain values as given, without converting them first.)"""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name, value in kwargs.items():
        f = fields.get(name)
        key = f.metadata.get("toml", name) if f is not None else name
        check = f.metadata.get("check") if f is not None else None
        if check is None or key in nested:
            continue
        problem = check(value)
        if problem:
            issues.append(PolicyIssue(f"{where}.{key}" if where else key, problem))


# What `retry = false` and the like mean to say, for tables that cannot be switched off
# with a boolean (a breaker can: `breaker = false`)
_NO_TABLE: Final[dict[type, str]] = {
    RetryConfig: "the default retry needs no table (leave retry out); for no retries: "
    "retry = { attempts = 1 } (the first attempt alone)",
    HedgeConfig: "the default hedge is hedge = {} (after 50 ms); for none, leave hedge out",
    ConcurrencyConfig: "for no bulkhead leave [concurrency] out (a route's own: "
    "concurrency = false); the default one is [concurrency] with no keys",
    StateConfig: "leave [state] out for memory://",
    DeadlineConfig: "for no default deadline: [deadline] default_ms = false",
}


def _build(cls: type, value: Any, where: str, issues: list[PolicyIssue], nested: _Nested) -> Any:
    if not isinstance(value, Mapping):
        hint = _NO_TABLE.get(cls) if isinstance(value, bool) else None
        said = f"expected a table, got {_got(value)}" + (f"; {hint}" if hint else "")
        issues.append(PolicyIssue(where, said))
        return None
    before = len(issues)
    kwargs = _read_table(cls, value, where, issues, nested)
    if len(issues) > before:
        if _unknown_keys_only(issues[before:], where):
            _more_issues(cls, kwargs, where, issues)
        else:  # a table within failed: the table's own plain values are still checked
            _field_checks(cls, kwargs, where, issues, nested)
        return None
    try:
        return cls(**kwargs)
    except PolicyError as exc:
        issues.extend(exc.prefixed(where).issues)
        return None
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-key check
        issues.append(PolicyIssue(where, str(exc)))
        return None
