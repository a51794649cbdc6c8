"""The all-in-one resilience toolkits in `fidelity-mw audit`: nopanic, pyresilience,
throttled-py.

Each toolkit puts several concerns behind one API (`@compose(deadline(30),
retry(...), breaker, timeout(10))`, `@resilient(retry=RetryConfig(...),
timeout=TimeoutConfig(...))`, a preset such as `http_policy()`). The audit
reports one finding per concern, each with the policy field that replaces it
and, where the arguments are literal, the values (docs/migration.md, "From
nopanic or pyresilience"). What has no counterpart in fidelity_mw is said so
instead: a client-side rate limit or bulkhead (on calls this process makes) is
kept, and a stack that also holds a fallback or a cache is kept for those,
without the concerns that move.

This module holds the tables and the text; `audit._Scanner` finds the calls.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

RETRY = "retry"
BREAKER = "breaker"
LIMITER = "limiter"
TIMEOUT = "timeout"
BULKHEAD = "bulkhead"
HEDGE = "hedge"

NOPANIC = "nopanic"
PYRESILIENCE = "pyresilience"
THROTTLED = "throttled-py"
LIBRARIES = (NOPANIC, PYRESILIENCE, THROTTLED)

# What an outbound concern becomes (the retry's text is audit.RETRY_REMEDY's).
OUTBOUND_FIELD = {
    BREAKER: "upstream[].breaker",
    TIMEOUT: "upstream[].attempt_timeout_ms",
    HEDGE: "upstream[].hedge (after_ms, max_hedges)",
}
DEADLINE_FIELD = (
    "the call's deadline ([deadline] default_ms outside a request, the request's inside one)"
)
INBOUND_FIELD = {
    BREAKER: "FidelityMiddleware: breaker / route[].breaker (inbound)",
    LIMITER: "FidelityMiddleware: rate_limit[] (rate, burst, key, match)",
    TIMEOUT: "FidelityMiddleware: route[].deadline_ms or [deadline] default_ms",
    BULKHEAD: "FidelityMiddleware: route[].concurrency or [concurrency] (limit)",
}
# Around a request handler, these have no counterpart: the server never runs one twice.
INBOUND_NONE = (
    "around a request handler: no counterpart in fidelity_mw (it never runs a request "
    "twice; clients retry on its Retry-After)"
)


@dataclass(frozen=True, slots=True)
class Api:
    kind: str | None  # None: a stack of other concerns (compose, resilient, a preset)
    library: str
    name: str  # which of the toolkit's APIs: "retry", "RetryConfig", "compose", ...


def _apis() -> dict[str, Api]:
    table: dict[str, Api] = {}

    def add(library: str, kind: str | None, name: str, *modules: str) -> None:
        for module in modules:
            table[f"{module}.{name}"] = Api(kind, library, name)

    for name, kind, module in (
        ("retry", RETRY, "retry"),
        ("RetryBudget", RETRY, "budget"),
        ("circuit_breaker", BREAKER, "breaker"),
        ("CircuitBreaker", BREAKER, "breaker"),
        ("rate_limit", LIMITER, "ratelimit"),
        ("adaptive_rate_limit", LIMITER, "adaptive"),
        ("timeout", TIMEOUT, "timeout"),
        ("deadline", TIMEOUT, "deadline"),
        ("bulkhead", BULKHEAD, "bulkhead"),
        ("hedge", HEDGE, "hedge"),
        ("compose", None, "compose"),
        ("keyed", None, "keyed"),
        # no counterpart: not reported alone, named when a stack holding them moves
        ("fallback", None, "fallback"),
        ("cache", None, "cache"),
    ):
        add(NOPANIC, kind, name, "nopanic", f"nopanic.{module}")
    for name, kind in (
        ("RetryConfig", RETRY),
        ("RetryBudgetConfig", RETRY),
        ("CircuitBreakerConfig", BREAKER),
        ("RateLimiterConfig", LIMITER),
        ("TimeoutConfig", TIMEOUT),
        ("BulkheadConfig", BULKHEAD),
        ("ResilienceConfig", None),
    ):
        add(PYRESILIENCE, kind, name, "pyresilience", "pyresilience._types")
    add(PYRESILIENCE, None, "resilient", "pyresilience", "pyresilience._decorator")
    for preset in PRESETS:
        add(PYRESILIENCE, None, preset, "pyresilience", "pyresilience.presets")
        add(PYRESILIENCE, None, preset, "pyresilience._presets")
    # its ASGI middleware: what it does is its config's; without one it does nothing
    add(PYRESILIENCE, BREAKER, "ResilientMiddleware", "pyresilience.contrib.fastapi")
    fastapi = "throttled.asyncio.contrib.fastapi"
    add(THROTTLED, LIMITER, "Throttled", "throttled", "throttled.throttled")
    add(THROTTLED, LIMITER, "Throttled", "throttled.asyncio", "throttled.asyncio.throttled")
    add(THROTTLED, LIMITER, "Limiter", fastapi, f"{fastapi}.limiter")
    add(THROTTLED, LIMITER, "RateLimitMiddleware", fastapi, f"{fastapi}.middleware")
    return table


# pyresilience's presets and their defaults (pyresilience/_presets.py, 0.4.1):
# timeout_seconds, max_attempts, retry_delay, backoff factor, max_delay, jitter,
# circuit_failure_threshold, circuit_recovery_seconds, success_threshold, max_concurrent
PRESETS: dict[str, dict[str, object]] = {
    "http_policy": {
        "timeout_seconds": 10.0,
        "max_attempts": 3,
        "retry_delay": 0.5,
        "factor": 2.0,
        "max_delay": 30.0,
        "jitter": True,
        "circuit_failure_threshold": 5,
        "circuit_recovery_seconds": 30.0,
        "success_threshold": 2,
        "max_concurrent": None,
    },
    "db_policy": {
        "timeout_seconds": 30.0,
        "max_attempts": 2,
        "retry_delay": 1.0,
        "factor": 1.5,
        "max_delay": 10.0,
        "jitter": True,
        "circuit_failure_threshold": 3,
        "circuit_recovery_seconds": 60.0,
        "success_threshold": 1,
        "max_concurrent": 10,
    },
    "queue_policy": {
        "timeout_seconds": 15.0,
        "max_attempts": 5,
        "retry_delay": 2.0,
        "factor": 2.0,
        "max_delay": 60.0,
        "jitter": True,
        "circuit_failure_threshold": 10,
        "circuit_recovery_seconds": 60.0,
        "success_threshold": 3,
        "max_concurrent": None,
    },
    "llm_policy": {
        "timeout_seconds": 60.0,
        "max_attempts": 4,
        "retry_delay": 1.0,
        "factor": 2.0,
        "max_delay": 60.0,  # retry_after_max_wait
        "jitter": True,
        "circuit_failure_threshold": 5,
        "circuit_recovery_seconds": 30.0,
        "success_threshold": 2,
        "max_concurrent": None,
        "max_calls": 60,
        "period": 60.0,
        "retry_on_status_codes": (429, 500, 502, 503, 504),
    },
    "strict_policy": {
        "timeout_seconds": 5.0,
        "max_attempts": 1,
        "retry_delay": 0.1,
        "factor": 1.0,
        "max_delay": 0.5,
        "jitter": False,
        "circuit_failure_threshold": 3,
        "circuit_recovery_seconds": 60.0,
        "success_threshold": 1,
        "max_concurrent": None,
    },
}

APIS = _apis()
# The parts of a pyresilience config, by keyword; fallback and cache stay with it.
COMPONENTS = (
    "retry",
    "timeout",
    "circuit_breaker",
    "fallback",
    "bulkhead",
    "rate_limiter",
    "cache",
    "retry_budget",
)
NO_COUNTERPART = {"fallback", "cache"}  # nopanic's names, pyresilience's keywords


@dataclass(frozen=True, slots=True)
class Ctx:
    """Where a toolkit concern applies: what it decorates, in which stack, which way."""

    where: str = ""  # " on get_invoice()", " in @compose on get_invoice()"
    region: ast.AST | None = None  # the code it guards (for the client library)
    route: str | None = None  # the decorated route's path, when one is declared
    fn: str | None = None
    inbound: str | None = None  # None (outbound), "route" or "middleware"
    whole_call: bool = False  # a retry runs inside it: a timeout bounds every attempt
    stack: str = ""  # "@compose", "@resilient": kept for `keep`
    keep: tuple[str, ...] = ()  # what else the stack holds that has no counterpart
    keyed: bool = False  # made per key by nopanic's keyed(...)


# ---------------------------------------------------------------- literals


_NOT = object()


def lit(node: ast.AST | None) -> object:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT


def num(node: ast.AST | None) -> float | None:
    value = lit(node)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def arg(call: ast.Call, position: int | None, keyword: str) -> ast.expr | None:
    """An argument by keyword, or by position (None: keyword-only)."""
    for k in call.keywords:
        if k.arg == keyword:
            return k.value
    if position is not None and len(call.args) > position:
        node = call.args[position]
        return None if isinstance(node, ast.Starred) else node
    return None


def number(
    call: ast.Call, position: int | None, keyword: str, default: float | None
) -> float | None:
    """A literal number argument, its default when left out, None when not literal."""
    node = arg(call, position, keyword)
    return default if node is None else num(node)


def last_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def called(node: ast.AST | None, *names: str) -> ast.Call | None:
    """`node` when it is a call to a function so named (by its last name)."""
    if isinstance(node, ast.Call) and last_name(node.func) in names:
        return node
    return None


# ---------------------------------------------------------------- policy text


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def inline(fields: dict[str, object]) -> str:
    return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in fields.items()) + " }"


def retry_table(
    attempts: float | None,
    base_s: float | None,
    cap_s: float | None,
    jitter: str | None,
    extra: dict[str, object] | None = None,
) -> dict[str, object]:
    fields: dict[str, object] = {}
    if attempts is not None:
        fields["attempts"] = int(_clamp(int(attempts), 1, 10))  # the policy's range
    if base_s is not None:
        fields["base_ms"] = int(_clamp(ms(base_s), 0, 600_000))
    if cap_s is not None:
        cap = int(_clamp(ms(cap_s), 0, 600_000))
        base = fields.get("base_ms")
        fields["max_ms"] = max(cap, base) if isinstance(base, int) else cap
    if jitter is not None:
        fields["jitter"] = jitter
    fields.update(extra or {})
    return fields


def budget_fields(
    ratio: float | None, per_s: float | None, window: float | None
) -> dict[str, object]:
    fields: dict[str, object] = {}
    if ratio is not None:
        fields["budget_ratio"] = _clamp(ratio, 0.0, 10.0)
    if per_s is not None:
        fields["budget_min_per_s"] = _clamp(per_s, 0.0, 1_000_000.0)
    if window is not None:
        fields["budget_window_s"] = _clamp(window, 0.1, 3_600.0)
    return fields


# `[breaker] min_calls`' default (the audit imports nothing of the package's policy)
BREAKER_MIN_CALLS: Final = 20


def consecutive(fields: dict[str, object], fails: int) -> None:
    """A breaker that opens on `fails` failures in a row, and on nothing else: our
    ratio rule (half of 20 calls by default) opened on a 50 % failure rate that theirs
    never opened on. A ratio of 1 over at least `fails` calls opens only where `fails`
    failures in a row already did."""
    fields["consecutive_failures"] = fails
    fields["failure_ratio"] = 1.0
    if fails > BREAKER_MIN_CALLS:
        fields["min_calls"] = fails


def breaker_open(fields: dict[str, object], open_s: float | None, probes: float | None) -> None:
    if open_s is not None and open_s >= 0.001:
        fields["open_s"] = fields["open_min_s"] = min(open_s, 86_400.0)
    if probes is not None and probes >= 1:
        fields["half_open_probes"] = int(min(probes, 1000))


def rate_text(count: float, period_s: float) -> str | None:
    """(5, 600.0) -> "5/10min"; (1, 0.1) -> "10/s"; None when no whole form exists."""
    for m in (1, 2, 4, 5, 10, 20, 100, 1000):
        c, p = count * m, period_s * m
        if (
            abs(c - round(c)) < 1e-9
            and abs(p - round(p)) < 1e-9
            and round(c) >= 1
            and round(p) >= 1
        ):
            n, seconds = round(c), round(p)
            break
    else:
        return None
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds % size == 0:
            k = seconds // size
            return f"{n}/{unit}" if k == 1 else f"{n}/{k}{unit}"
    return None  # pragma: no cover - "s" always divides


def rate_table(
    name: str,
    route: str | None,
    count: float,
    period_s: float,
    burst: float | None,
    key: str | None,
) -> str | None:
    rate = rate_text(count, period_s)
    if rate is None:
        return None
    fields: dict[str, object] = {"name": name}
    if route is not None:
        fields["match"] = route
    fields["rate"] = rate
    if burst is not None and burst >= 1 and round(burst) != round(count):
        fields["burst"] = int(burst)
    if key is not None:
        fields["key"] = key
    return inline(fields)


# ---------------------------------------------------------------- throttled-py quotas

_THROTTLED_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), 604800),
}
_QUOTA = re.compile(
    r"^\s*(\d+)\s*(?:/\s*([a-zA-Z]+)|per\s+([a-zA-Z]+))(?:\s+burst\s+(\d+))?\s*$", re.I
)
_PER = {"per_sec": 1, "per_min": 60, "per_hour": 3600, "per_day": 86400, "per_week": 604800}


def quotas(node: ast.expr | None) -> list[tuple[int, float, int | None]] | None:
    """throttled-py's quota, "100/s burst 200" or `per_min(60, burst=120)`, as
    (count, period in seconds, burst); None when not literal."""
    text = lit(node)
    if isinstance(text, str):
        out: list[tuple[int, float, int | None]] = []
        for token in (t.strip() for t in re.split(r"[;,|]", text)):
            if not token:
                continue
            m = _QUOTA.match(token)
            unit = (m.group(2) or m.group(3)).lower() if m else ""
            if m is None or unit not in _THROTTLED_UNITS:
                return None
            out.append((int(m.group(1)), float(_THROTTLED_UNITS[unit]), _int(m.group(4))))
        return out or None
    call = called(node, *_PER)
    if call is not None:
        count = number(call, 0, "limit", None)
        burst = number(call, 1, "burst", None)
        if count is None:
            return None
        return [(int(count), float(_PER[last_name(call.func)]), _int(burst))]
    return None


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, str | int | float) and str(value) else None


# ---------------------------------------------------------------- hints


def hint(api: Api, call: ast.expr, ctx: Ctx) -> str:
    """The policy text for one concern made by `call` (a literal-argument call), or ""."""
    if not isinstance(call, ast.Call):
        return ""
    name = api.name
    fields: dict[str, object]
    if name == "retry":
        return _nopanic_retry(call)
    if name == "RetryBudget":
        fields = budget_fields(
            number(call, 0, "ratio", 0.2),
            number(call, None, "min_retries_per_sec", 1.0),
            number(call, None, "window", 10.0),
        )
        return f"e.g. retry = {inline(fields)}" if fields else ""
    if name == "RetryConfig":
        return _pyresilience_retry(call)
    if name == "RetryBudgetConfig":
        per_s = number(call, 1, "refill_rate", 10.0)
        text = "theirs is a bucket of max_retries refilled per second; ours a share of the calls"
        if per_s is None:
            return text
        return f"e.g. retry = {inline(budget_fields(None, per_s, None))} ({text})"
    if name in ("circuit_breaker", "CircuitBreaker"):
        return _nopanic_breaker(call)
    if name == "CircuitBreakerConfig":
        return _pyresilience_breaker(call)
    if name in ("timeout", "deadline", "TimeoutConfig"):
        if name == "TimeoutConfig":
            seconds = number(call, 0, "seconds", 30.0)
            per_attempt = lit(arg(call, 2, "per_attempt"))
            whole = per_attempt is False
        else:
            seconds = number(call, 0, "seconds", None)
            whole = name == "deadline" or ctx.whole_call
        return timeout_hint(seconds, whole, ctx)
    if name == "hedge":
        delay = number(call, None, "delay", None)
        fields = {}
        if delay is not None:
            fields["after_ms"] = int(_clamp(ms(delay), 1, 600_000))
        hedges = number(call, None, "max_hedges", 1)
        if hedges is not None:
            fields["max_hedges"] = int(_clamp(hedges, 1, 3))
        return f"e.g. hedge = {inline(fields)}" if fields else ""
    if name == "Limiter":  # throttled-py's FastAPI limiter
        return "its quota is the default of each @limiter.limit(), counted per route"
    if name == "Throttled":  # on requests or on calls: the table for the first
        found = quotas(arg(call, 3, "quota"))
        if found is None and arg(call, 3, "quota") is None:
            found = [(60, 60.0, None)]  # its default: 60 per minute
        key = lit(arg(call, 0, "key"))
        ctx = ctx if ctx.fn else Ctx(fn="throttled", inbound=ctx.inbound, route=ctx.route)
        return limit_hint(ctx, found or [], "global" if isinstance(key, str) else None)
    if ctx.inbound is None:
        return ""  # a client-side limit or bulkhead: nothing replaces it
    if name in ("bulkhead", "BulkheadConfig"):
        limit = number(call, 0, "max_concurrent", None if name == "bulkhead" else 10)
        if limit is None or limit < 1:
            return ""
        where = "concurrency" if ctx.inbound == "route" else "[concurrency] limit"
        fields = {"limit": int(limit)}
        return (
            f"e.g. concurrency = {inline(fields)}"
            if where == "concurrency"
            else f"e.g. [concurrency] limit = {int(limit)}"
        )
    if name in ("rate_limit", "RateLimiterConfig"):
        if name == "rate_limit":
            count, period = number(call, 0, "rate", None), number(call, 1, "per", 1.0)
            burst = number(call, None, "burst", None)
        else:
            count, period = number(call, 0, "max_calls", 10), number(call, 1, "period", 1.0)
            burst = None
        if count is None or period is None:
            return ""
        return limit_hint(ctx, [(count, period, burst)], None if ctx.keyed else "global")
    return ""


def limit_hint(
    ctx: Ctx, found: Sequence[tuple[float, float, float | None]], key: str | None
) -> str:
    """`[[rate_limit]]` tables for an inbound limit: one per rate, named after the
    route's function (or "application" for a middleware's, over every route)."""
    base = ctx.fn or "application"
    route = _glob(ctx.route) if ctx.route else ("*" if ctx.inbound == "middleware" else None)
    tables = []
    for i, (count, period, burst) in enumerate(found):
        table = rate_table(base if i == 0 else f"{base}-{i + 1}", route, count, period, burst, key)
        if table is None:
            return ""
        tables.append(table)
    if not tables:
        return ""
    text = "e.g. " + ", ".join(tables)
    if key == "global":
        text += " (one bucket for all clients, as theirs; without key, one per client)"
    elif ctx.keyed:
        text += " (per client: key = client_ip, or header:NAME for the key yours reads)"
    return text


_ROUTE_PARAM = re.compile(r"\{[^{}/]*\}")


def _glob(route: str) -> str:
    return _ROUTE_PARAM.sub("*", route)


def timeout_hint(seconds: float | None, whole: bool, ctx: Ctx) -> str:
    if seconds is None or seconds <= 0:
        return ""
    value = int(_clamp(ms(seconds), 1, 86_400_000))
    if not whole and ctx.inbound is None:
        return f"e.g. attempt_timeout_ms = {value}"
    if ctx.inbound == "route":
        return f"e.g. deadline_ms = {value} on the route"
    return f"e.g. [deadline] default_ms = {value}"


def _nopanic_retry(call: ast.Call) -> str:
    """`retry(attempts=3, backoff=backoff.full_jitter(base=0.1, cap=2.0), budget=...)`."""
    attempts = number(call, 0, "attempts", 3)
    backoff = arg(call, 2, "backoff")
    base: float | None
    cap: float | None
    jitter: str | None
    notes = []
    if backoff is None:
        base, cap, jitter = 0.1, 30.0, "full"  # full_jitter()
    elif (strategy := called(backoff, "full_jitter", "exponential")) is not None:
        base, cap = number(strategy, 0, "base", 0.1), number(strategy, 2, "cap", 30.0)
        jitter = "full" if last_name(strategy.func) == "full_jitter" else "none"
        factor = number(strategy, 1, "factor", 2.0)
        if factor is not None and factor != 2.0:
            notes.append(f"factor={factor:g}: ours doubles")
    elif (strategy := called(backoff, "decorrelated_jitter")) is not None:
        base, cap = number(strategy, 0, "base", 0.1), number(strategy, 1, "cap", 30.0)
        jitter = "decorrelated"
    elif (strategy := called(backoff, "fixed")) is not None:
        base = cap = number(strategy, 0, "delay", 1.0)
        jitter = "none"
    else:
        base = cap = num(backoff)  # a bare number is a fixed delay
        jitter = "none" if base is not None else None
    extra: dict[str, object] = {}
    budget = called(arg(call, None, "budget"), "RetryBudget")
    if budget is not None:
        extra.update(
            budget_fields(
                number(budget, 0, "ratio", 0.2),
                number(budget, None, "min_retries_per_sec", 1.0),
                number(budget, None, "window", 10.0),
            )
        )
    cap_after = number(call, None, "retry_after_cap", None)
    if cap_after is not None:
        extra["retry_after_max_s"] = _clamp(cap_after, 0.0, 86_400.0)
    fields = retry_table(attempts, base, cap, jitter, extra)
    max_time = number(call, None, "max_time", None)
    if max_time is not None and max_time > 0:
        notes.append(f"max_time: the request's deadline, [deadline] default_ms = {ms(max_time)}")
    return _join(f"e.g. retry = {inline(fields)}" if fields else "", notes)


def _pyresilience_retry(call: ast.Call) -> str:
    """`RetryConfig(max_attempts=3, delay=0.1, max_delay=2.0, jitter=True,
    retry_on_result=retry_on_status(...), delay_func=retry_after_delay(max_wait=30))`."""
    jitter = lit(arg(call, 4, "jitter"))
    extra: dict[str, object] = {}
    statuses = called(arg(call, 6, "retry_on_result"), "retry_on_status")
    if statuses is not None:
        codes = [lit(a) for a in statuses.args]
        if codes and all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
            others = [c for c in codes if c != 429]
            if others:
                extra["on_status"] = others
            extra["on_429"] = 429 in codes
    after = called(arg(call, 8, "delay_func"), "retry_after_delay")
    if after is not None:
        wait = number(after, 0, "max_wait", 60.0)
        if wait is not None:
            extra["retry_after_max_s"] = _clamp(wait, 0.0, 86_400.0)
    factor = number(call, 2, "backoff_factor", 2.0)
    fields = retry_table(
        number(call, 0, "max_attempts", 3),
        number(call, 1, "delay", 1.0),
        number(call, 3, "max_delay", 60.0),
        None if jitter is _NOT else ("full" if jitter in (True, None) else "none"),
        extra,
    )
    notes = [f"backoff_factor={factor:g}: ours doubles"] if factor not in (None, 2.0) else []
    return _join(f"e.g. retry = {inline(fields)}" if fields else "", notes)


def _nopanic_breaker(call: ast.Call) -> str:
    fields: dict[str, object] = {}
    ratio = number(call, None, "failure_threshold", 0.5)
    if ratio is not None and 0 < ratio <= 1:
        fields["failure_ratio"] = ratio
    calls = number(call, None, "min_calls", 5)
    if calls is not None and calls >= 1:
        fields["min_calls"] = int(calls)
    window = number(call, None, "window", 30.0)
    if window is not None and window >= 0.1:
        fields["window_s"] = min(window, 86_400.0)
    breaker_open(
        fields,
        number(call, None, "reset_timeout", 30.0),
        number(call, None, "half_open_max_calls", 1),
    )
    _slow(
        fields,
        number(call, None, "slow_call_duration", 0.0),
        number(call, None, "slow_call_threshold", 1.0),
    )
    return f"e.g. breaker = {inline(fields)}" if fields else ""


def _pyresilience_breaker(call: ast.Call) -> str:
    fields: dict[str, object] = {}
    notes = []
    size = number(call, 4, "sliding_window_size", 0)
    if size is not None and size > 0:
        ratio = number(call, 5, "failure_rate_threshold", 0.5)
        if ratio is not None and 0 < ratio <= 1:
            fields["failure_ratio"] = ratio
        least = number(call, 6, "minimum_calls", 0)
        if least is not None:
            fields["min_calls"] = int(least if least >= 1 else size)
        notes.append(f"theirs counts the last {int(size)} calls; window_s is a time window")
    elif size == 0:
        fails = number(call, 0, "failure_threshold", 5)
        if fails is not None and fails >= 1:
            consecutive(fields, int(fails))
    breaker_open(
        fields, number(call, 1, "recovery_timeout", 30.0), number(call, 2, "success_threshold", 2)
    )
    _slow(
        fields,
        number(call, 7, "slow_call_duration", 0.0),
        number(call, 8, "slow_call_rate_threshold", 1.0),
    )
    return _join(f"e.g. breaker = {inline(fields)}" if fields else "", notes)


def _slow(fields: dict[str, object], duration: float | None, ratio: float | None) -> None:
    if duration and duration > 0 and ratio is not None and 0 < ratio <= 1:
        fields["slow_call_ms"] = int(_clamp(ms(duration), 1, 86_400_000))
        fields["slow_call_ratio"] = ratio


def _join(text: str, notes: list[str]) -> str:
    return "; ".join([t for t in (text, *notes) if t])


def preset_hints(name: str, call: ast.Call, ctx: Ctx) -> list[tuple[str, str, str]]:
    """A pyresilience preset's concerns: (kind, label, hint) each, from its defaults
    and the literal arguments given (a non-literal one leaves its field out)."""
    given = {k.arg: k.value for k in call.keywords if k.arg}
    values: dict[str, object] = {}
    for key, default in PRESETS[name].items():
        node = given.get(
            key if key != "max_delay" or name != "llm_policy" else "retry_after_max_wait"
        )
        values[key] = default if node is None else lit(node)

    def n(key: str) -> float | None:
        v = values.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    out: list[tuple[str, str, str]] = []
    attempts = n("max_attempts")
    if attempts is None or attempts > 1:
        extra: dict[str, object] = {}
        codes = values.get("retry_on_status_codes")
        if isinstance(codes, list | tuple) and all(isinstance(c, int) for c in codes):
            others = [c for c in codes if c != 429]
            if others:
                extra["on_status"] = others
            extra["on_429"] = 429 in codes
            if n("max_delay") is not None:
                extra["retry_after_max_s"] = n("max_delay")
        jitter = values.get("jitter")
        fields = retry_table(
            attempts, n("retry_delay"), n("max_delay"), "full" if jitter else "none", extra
        )
        factor = n("factor")
        notes = [f"factor {factor:g}: ours doubles"] if factor not in (None, 2.0) else []
        out.append((RETRY, "retry", _join(f"e.g. retry = {inline(fields)}", notes)))
    out.append((TIMEOUT, "timeout", timeout_hint(n("timeout_seconds"), False, ctx)))
    fields = {}
    fails = n("circuit_failure_threshold")
    if fails is not None and fails >= 1:
        consecutive(fields, int(fails))
    breaker_open(fields, n("circuit_recovery_seconds"), n("success_threshold"))
    out.append((BREAKER, "circuit breaker", f"e.g. breaker = {inline(fields)}" if fields else ""))
    if values.get("max_concurrent") is not None:
        out.append((BULKHEAD, "bulkhead", ""))
    if "max_calls" in values:
        out.append((LIMITER, "rate limiter", ""))
    return out


def preset_keeps(name: str, call: ast.Call) -> tuple[str, ...]:
    """What a preset call holds that has no counterpart outbound."""
    given = {k.arg: k.value for k in call.keywords if k.arg}
    keep = [
        f"{k}="
        for k in ("fallback", "cache", "rate_limit")
        if k in given and lit(given[k]) is not None
    ]
    concurrent = given.get("max_concurrent")
    if (concurrent is not None and lit(concurrent) is not None) or (
        concurrent is None and PRESETS[name]["max_concurrent"] is not None
    ):
        keep.append("its bulkhead")
    if name == "llm_policy":
        keep.append("its rate limiter")
    return tuple(keep)
