"""`fidelity-mw check`: validate policy files; every problem with file, line and key path.

Errors come from `Policy.from_toml` (the same validation the middleware runs),
placed on a line by `policy.lines`. Warnings are things that validate but
cannot be what the author meant: a `[[route]]` or `[[upstream]]` that an
earlier, broader entry always matches first (first match wins), a route's own
breaker or bulkhead table that drops values the policy's table set.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ..decide.retry import IDEMPOTENT_METHODS
from ..errors import PolicyError
from ..policy import BreakerConfig, ConcurrencyConfig, Policy
from ..policy.lines import KeyLines, locate_keys, toml_error_position
from ..policy.model import TOO_DEEP, glob_matches
from ..state.factory import REDIS_EXTRA_HINT, memory_workers_warning, web_concurrency


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem in one file. `line` is 1-based, or None when no line applies."""

    file: str
    line: int | None
    path: str
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.path}:" if self.path else ""
        tag = "" if self.severity == "error" else " warning:"
        return f"{where}:{tag}{key} {self.message}"


@dataclass
class CheckResult:
    """The outcome for one file."""

    file: str
    policy: Policy | None = None
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "ok": self.ok,
            "version": self.policy.version if self.policy is not None else None,
            "errors": [asdict(f) for f in self.errors],
            "warnings": [asdict(f) for f in self.warnings],
        }


def check_file(path: str | Path, *, workers: int | None = None) -> CheckResult:
    """Validate one policy file. Raises OSError when it cannot be read at all.

    `workers`: how many worker processes will serve the app (`--workers N`, else
    `WEB_CONCURRENCY`); more than one with `memory://` state is a warning."""
    name = str(path)
    result = CheckResult(name)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is read past, as when loaded
    except UnicodeDecodeError as exc:  # readable, but not TOML: a finding, as when loaded
        result.errors.append(
            Finding(name, None, "", f"not valid TOML: the file is not UTF-8 ({exc})")
        )
        return result
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pos = toml_error_position(str(exc))
        line = pos[0] if pos else None
        result.errors.append(Finding(name, line, "", f"not valid TOML: {exc}"))
        return result
    except RecursionError:  # tomllib recurses per level of nesting
        result.errors.append(Finding(name, None, "", f"not valid TOML: {TOO_DEEP}"))
        return result
    lines = locate_keys(text)
    try:
        result.policy = Policy.from_toml(path)
    except PolicyError as exc:
        for issue in exc.issues:
            result.errors.append(Finding(name, _line(lines, issue.path), issue.path, issue.message))
        # the warnings too, from the plain data: every problem in one run
        result.warnings.extend(_shadowed(name, lines, *_entries_from_data(data)))
        return result
    policy = result.policy
    routes: list[Entry | None] = [(r.match, r.methods) for r in policy.routes]
    hosts: list[str | None] = [u.host for u in policy.upstreams]
    result.warnings.extend(_shadowed(name, lines, routes, hosts))
    result.warnings.extend(_idle_excludes(name, lines, policy))
    result.warnings.extend(_idle_bulkhead_settings(name, lines, data, policy))
    result.warnings.extend(_idle_retry_credit(name, lines, data, policy))
    result.warnings.extend(_replaced_tables(name, lines, data, policy))
    result.warnings.extend(_capped_open_times(name, lines, policy))
    result.warnings.extend(_wide_ipv6_prefixes(name, lines, policy))
    result.warnings.extend(_retried_not_idempotent(name, lines, policy))
    result.warnings.extend(_protocol_everywhere(name, lines, policy))
    result.warnings.extend(_redis_client_missing(name, lines, policy))
    result.warnings.extend(_networks_with_host_bits(name, lines, policy))
    result.warnings.extend(_retried_successes(name, lines, policy))
    result.warnings.extend(_foreign_glob_syntax(name, lines, policy))
    result.warnings.extend(_unit_slips(name, lines, data))
    if workers is None:
        workers = web_concurrency()
    if workers is not None and workers > 1 and policy.state.url.startswith("memory://"):
        path = "state.url"
        message = memory_workers_warning(workers)
        result.warnings.append(Finding(name, _line(lines, path), path, message, "warning"))
    return result


# What other glob dialects mean and ours does not: fnmatch's and the shell's character
# class `[12]`, the shell's alternatives `{a,b}`. Ours has only `*` and `?`, so these are
# matched as themselves, and a request path holds `[` or `{` only percent-decoded from
# `%5B` / `%7B`: such an entry quietly never matches what it was written for.
_FOREIGN_GLOB = re.compile(r"\[[^\]]+\]|\{[^{}]*,[^{}]*\}")


def _foreign_glob_syntax(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    out: list[Finding] = []
    globs: list[tuple[str, str]] = []
    for i, limit in enumerate(policy.rate_limits):
        globs.append((f"rate_limit[{i}].match", limit.match))
        globs += [(f"rate_limit[{i}].exclude", g) for g in limit.exclude]
    globs += [(f"route[{i}].match", r.match) for i, r in enumerate(policy.routes)]
    globs += [(f"upstream[{i}].host", u.host) for i, u in enumerate(policy.upstreams)]
    for path, glob in globs:
        found = _FOREIGN_GLOB.search(glob)
        if found is None:
            continue
        message = (
            f"{json.dumps(glob)} matches {json.dumps(found.group())} literally: these globs "
            "know only * (any run of characters) and ? (one), not character classes or "
            "{a,b} alternatives; write one entry per alternative, or a * in its place"
        )
        out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


# Deadlines that are surely seconds written into a milliseconds key: a default deadline
# of 30 ms for every route (`default_ms = 30`), an attempt of 5 ms. Fast routes may have
# a route deadline of tens of ms; under 10 ms no HTTP round trip fits.
_MS_FLOORS: Final = {
    "deadline.default_ms": 60,
    "deadline.max_ms": 60,
    "route.deadline_ms": 10,
    "upstream.attempt_timeout_ms": 10,
}


def _unit_slips(name: str, lines: KeyLines, data: dict[str, Any]) -> list[Finding]:
    """A duration in the other unit: milliseconds in a `_s` key (`open_s = 5000`, a
    breaker open 83 minutes), seconds in a deadline's `_ms` key (`default_ms = 30`).
    Both validate; neither can be meant. Read from the file's own keys, not defaults."""
    from ..policy.reference import key_docs

    defaults: dict[str, float] = {}
    for doc in key_docs():
        try:
            defaults[f"{doc.table}.{doc.key}" if doc.table else doc.key] = float(
                doc.default.strip("`").replace("_", "")
            )
        except ValueError:
            continue
    out: list[Finding] = []
    for path, value in _leaves(data, ""):
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        generic = re.sub(r"\[\d+\]", "", path)
        key = generic.rpartition(".")[2]
        default = (
            defaults.get(generic)
            or defaults.get(f"breaker.{key}")
            or defaults.get(f"concurrency.{key}")
        )
        message = None
        if key.endswith("_s") and default and value >= 1000 and value >= 100 * default:
            long = f"{value / 3600:.1f} h" if value >= 3600 else f"{value / 60:.0f} min"
            message = (
                f"{value:g} s is {long}: {key} counts seconds "
                f"({value:g} ms is {key} = {value / 1000:g})"
            )
        elif generic in _MS_FLOORS and 0 < value < _MS_FLOORS[generic]:
            message = (
                f"{value:g} ms is too short for an HTTP request: {key} counts "
                f"milliseconds ({value:g} s is {key} = {value * 1000:g})"
            )
        if message is not None:
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _leaves(data: Any, prefix: str) -> list[tuple[str, Any]]:
    """(key path, value) of every scalar in plain policy data, paths as errors write them."""
    out: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out += _leaves(v, f"{prefix}[{i}]")
    else:
        out.append((prefix, data))
    return out


def _redis_client_missing(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """A Redis state URL where the Redis client is not installed: the file is valid, but
    the middleware refuses to start with it here (a `PolicyError` naming the extra), and
    `check` said "ok"."""
    url = policy.state.url
    if url.startswith("memory://"):
        return []
    try:
        import redis  # noqa: F401
    except ImportError:
        path = "state.url"
        scheme = url.partition("://")[0]  # the scheme only: a URL may carry a password
        message = (
            f"{scheme}:// needs the Redis client, which is not installed here: "
            f"{REDIS_EXTRA_HINT} (the middleware refuses to start without it)"
        )
        return [Finding(name, _line(lines, path), path, message, "warning")]
    return []


def _networks_with_host_bits(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """A network written with host bits (`10.0.0.1/8`): it is read as the whole network
    (`10.0.0.0/8`, as Python's `ip_network(strict=False)` and most proxies read it), which
    trusts every address in it; more likely one address (`/32`) was meant."""
    out: list[Finding] = []
    for field_name in ("trusted_proxies", "trusted_peers"):
        for k, text in enumerate(getattr(policy, field_name)):
            try:
                ipaddress.ip_network(text)
            except ValueError:
                net = ipaddress.ip_network(text, strict=False)  # (the loader checked it)
                one = net.max_prefixlen
                address = text.partition("/")[0]
                message = (
                    f"item {k} ({json.dumps(text)}) has host bits set: it is read as "
                    f"{net} ({net.num_addresses:,} addresses); write {json.dumps(str(net))} "
                    f"for the network, or {json.dumps(f'{address}/{one}')} for the one address"
                )
                out.append(
                    Finding(name, lines.line_for(field_name), field_name, message, "warning")
                )
    return out


def _retried_successes(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """An `on_status` below 400: the call is sent again after an answer that succeeded
    (or redirected), at every attempt, and the last such answer is returned anyway."""
    out: list[Finding] = []
    for i, upstream in enumerate(policy.upstreams):
        low = sorted(status for status in upstream.retry.on_status if status < 400)
        if low and upstream.retry.attempts > 1:
            path = f"upstream[{i}].retry.on_status"
            message = (
                f"retries after {', '.join(map(str, low))}: an answer that is no failure "
                "is sent again at every attempt (on_status lists the failures worth another "
                "attempt: 429, 502, 503, 504, ...)"
            )
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _idle_excludes(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """A limit's `exclude` globs that leave out everything (the limit never counts) or,
    for a plain path, nothing (its `match` does not cover it: likely a typo)."""
    out: list[Finding] = []
    for i, lim in enumerate(policy.rate_limits):
        for k, glob in enumerate(lim.exclude):
            path = f"rate_limit[{i}].exclude"
            if glob_covers(glob, lim.match):
                message = (
                    f"the limit never applies: exclude[{k}] ({json.dumps(glob)}) covers every "
                    f"path its match ({json.dumps(lim.match)}) does"
                )
            elif not any(ch in glob for ch in "*?") and not glob_matches(lim.match, glob):
                message = (
                    f"exclude[{k}] ({json.dumps(glob)}) leaves out nothing: the limit's match "
                    f"({json.dumps(lim.match)}) does not cover that path"
                )
            else:
                continue
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


# Below this an IPv6 client key is a whole site or provider, not a subscriber: a /48 is
# the usual site assignment (RFC 6177), a /32 a provider's whole allocation.
WIDE_IPV6_PREFIX = 48


def _wide_ipv6_prefixes(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """An IPv6 prefix below /48 (`client_ipv6_prefix`, the policy's or a limit's own):
    each key then holds a whole provider's or site's clients, one budget for them all."""
    found: list[tuple[str, int]] = [("client_ipv6_prefix", policy.client_ipv6_prefix)]
    found += [
        (f"rate_limit[{i}].client_ipv6_prefix", lim.client_ipv6_prefix)
        for i, lim in enumerate(policy.rate_limits)
        if lim.client_ipv6_prefix is not None
    ]
    out: list[Finding] = []
    for path, prefix in found:
        if prefix < WIDE_IPV6_PREFIX:
            message = (
                f"/{prefix} counts every IPv6 client in a network that wide as one: a /32 "
                "is a whole provider's, a /48 one site's; one budget for all of them (64 "
                "counts a subscriber, the default; 48 a site)"
            )
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _capped_open_times(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """A breaker whose `open_min_s` is above its `open_s`: the open time starts at the
    first and doubles up to the second, so it is `open_s` every time, shorter than the
    `open_min_s` the file asks for (most likely `open_min_s` set alone, `open_s` left at
    its default of 5 s)."""
    breakers: list[tuple[str, BreakerConfig | None]] = [("breaker", policy.breaker)]
    breakers += [
        (f"route[{i}].breaker", r.breaker if isinstance(r.breaker, BreakerConfig) else None)
        for i, r in enumerate(policy.routes)
    ]
    breakers += [(f"upstream[{i}].breaker", u.breaker) for i, u in enumerate(policy.upstreams)]
    out: list[Finding] = []
    for prefix, cfg in breakers:
        if cfg is not None and cfg.open_min_s > cfg.open_s:
            path = f"{prefix}.open_min_s"
            message = (
                f"{cfg.open_min_s:g} s is above open_s ({cfg.open_s:g} s): the breaker stays "
                f"open {cfg.open_s:g} s, the cap (set open_s too, for a fixed open time the "
                "same value)"
            )
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _retried_not_idempotent(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """`[upstream.retry] methods` naming a method that is not idempotent (POST, PATCH,
    CONNECT): such a request is then retried without an Idempotency-Key, after a read
    timeout or a 5xx too, when the upstream may have acted already. Fine for an upstream
    that acts once per request however often it is sent; said so it is a choice. Not said
    when only failures before anything was sent are retried (connect errors, a 429: the
    upstream refused), nor when nothing is retried (`attempts = 1`)."""
    out: list[Finding] = []
    for i, up in enumerate(policy.upstreams):
        retry = up.retry
        risky = [m for m in retry.methods if m not in IDEMPOTENT_METHODS]
        statuses = sorted(set(retry.on_status) - {429})
        if not risky or retry.attempts <= 1 or not (retry.on_read_timeout or statuses):
            continue
        after = (["read timeouts"] if retry.on_read_timeout else []) + (
            [f"status {', '.join(str(c) for c in statuses)}"] if statuses else []
        )
        path = f"upstream[{i}].retry.methods"
        message = (
            f"{', '.join(risky)} retried without an Idempotency-Key on {up.host} after "
            f"{' and '.join(after)}, when the upstream may have acted already: a retry acts "
            "again unless the upstream deduplicates (send an Idempotency-Key instead, or "
            "keep on_read_timeout = false and on_status = [] for these calls)"
        )
        out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _protocol_everywhere(name: str, lines: KeyLines, policy: Policy) -> list[Finding]:
    """`protocol_headers = "always"` on the default entry (`host = "*"`): our headers go
    to every host then, third parties included, which is what `auto` keeps them from."""
    out: list[Finding] = []
    for i, up in enumerate(policy.upstreams):
        if up.host == "*" and up.protocol_headers == "always":
            path = f"upstream[{i}].protocol_headers"
            message = (
                "x-fidelity-attempt and x-request-timeout-ms go to every host, third parties "
                "included: set it on the entries of your own services instead (a host glob "
                'such as "*.prod.example.net")'
            )
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _idle_retry_credit(
    name: str, lines: KeyLines, data: dict[str, Any], policy: Policy
) -> list[Finding]:
    """A `retry_credit_s` written on a limit with `charge = "always"`: the credit is earned
    by refunds, and such a limit refunds nothing, so the key does nothing."""
    raw_limits = data.get("rate_limit", [])
    if isinstance(raw_limits, dict):
        raw_limits = [raw_limits]  # a single [rate_limit] table, read as one entry
    if not isinstance(raw_limits, list):
        return []
    out: list[Finding] = []
    for i, (raw, lim) in enumerate(zip(raw_limits, policy.rate_limits, strict=False)):
        written = raw.get("retry_credit_s") if isinstance(raw, dict) else None
        if lim.charge == "always" and written:  # (0 says "none", which it is)
            path = f"rate_limit[{i}].retry_credit_s"
            message = (
                "has no effect: the retry credit is earned by refunds, and a limit with "
                'charge = "always" refunds nothing (remove it, or use charge = "served")'
            )
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _idle_bulkhead_settings(
    name: str, lines: KeyLines, data: dict[str, Any], policy: Policy
) -> list[Finding]:
    """Bulkhead settings that can never act: a route's `concurrency = true` without a
    `[concurrency]` table, a route's `priority` on a route without a bulkhead, and a
    `priority_header` with no bulkhead anywhere or no trusted peer to believe it from."""
    out: list[Finding] = []

    def say(path: str, message: str) -> None:
        out.append(Finding(name, lines.line_for(path), path, message, "warning"))

    raw_routes = data.get("route", [])
    if not isinstance(raw_routes, list):
        raw_routes = []
    top = policy.concurrency
    any_bulkhead = top is not None
    for i, (raw, route) in enumerate(zip(raw_routes, policy.routes, strict=False)):
        own = route.concurrency
        has = own is not False and (top is not None or isinstance(own, ConcurrencyConfig))
        any_bulkhead = any_bulkhead or has
        raw_own = raw.get("concurrency") if isinstance(raw, dict) else None
        if raw_own is True and top is None:
            say(
                f"route[{i}].concurrency",
                "true asks for the policy's [concurrency], and there is no [concurrency] "
                "table: this route has no bulkhead (add [concurrency], or give the route "
                "its own table)",
            )
        elif not has and isinstance(raw, dict) and "priority" in raw:
            say(
                f"route[{i}].priority",
                "a priority class acts only in a bulkhead, and this route has no bulkhead "
                "(concurrency = false, or no [concurrency] table)",
            )
    if policy.priority_header:
        if not any_bulkhead:
            say(
                "priority_header",
                "a priority class acts only in a bulkhead, and there is no bulkhead: no "
                "route has one (add [concurrency])",
            )
        elif not policy.trusted_peers:
            say(
                "priority_header",
                "the header is believed from trusted_peers only, and trusted_peers is "
                "empty: no request's class ever comes from it",
            )
    return out


def _replaced_tables(
    name: str, lines: KeyLines, data: dict[str, Any], policy: Policy
) -> list[Finding]:
    """A `[[route]]`'s own `breaker` / `concurrency` table replaces the policy's
    `[breaker]` / `[concurrency]`: the keys it leaves out take the built-in defaults,
    not the policy table's values. Said where that loses a value the policy table set."""
    out: list[Finding] = []
    raw_routes = data.get("route", [])
    if not isinstance(raw_routes, list):
        return out
    for section in ("breaker", "concurrency"):
        top_raw = data.get(section)
        top = getattr(policy, section, None)
        if not isinstance(top_raw, dict) or top is None:
            continue
        for i, (raw, route) in enumerate(zip(raw_routes, policy.routes, strict=False)):
            own_raw = raw.get(section) if isinstance(raw, dict) else None
            own = getattr(route, section, None)
            if not isinstance(own_raw, dict) or own is None or isinstance(own, bool):
                continue
            lost = [
                key
                for key in sorted(top_raw)
                if key not in own_raw
                and hasattr(own, key)
                and getattr(own, key) != getattr(top, key)
            ]
            if not lost:
                continue
            path = f"route[{i}].{section}"
            defaults = ", ".join(_shown(getattr(own, key)) for key in lost)
            wanted = ", ".join(_shown(getattr(top, key)) for key in lost)
            takes = "takes the built-in default" if len(lost) == 1 else "take the built-in defaults"
            message = (
                f"{', '.join(lost)} left out {takes} ({defaults}), not [{section}]'s "
                f"({wanted}): a route's {section} table replaces [{section}], it does not "
                "extend it; repeat the keys you meant to keep"
            )
            out.append(Finding(name, lines.line_for(path), path, message, "warning"))
    return out


def _shown(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return json.dumps(list(value), default=str)
    return str(value)


# A route as shadowing sees it: its glob and its methods (None: every method).
Entry = tuple[str, tuple[str, ...] | None]


def _entries_from_data(data: dict[str, Any]) -> tuple[list[Entry | None], list[str | None]]:
    """Routes and upstream hosts of an invalid policy, as far as they can be read
    (None for an entry whose glob or methods are not usable)."""

    def items(key: str) -> list[Any]:
        value = data.get(key, [])
        return [value] if isinstance(value, dict) else value if isinstance(value, list) else []

    routes: list[Entry | None] = []
    for item in items("route"):
        match = item.get("match", "*") if isinstance(item, dict) else None
        methods = item.get("methods") if isinstance(item, dict) else None
        if not isinstance(match, str) or not match:
            routes.append(None)
        elif methods is None:
            routes.append((match, None))
        elif isinstance(methods, list) and all(isinstance(m, str) for m in methods):
            routes.append((match, tuple(m.upper() for m in methods)))
        else:
            routes.append(None)
    hosts: list[str | None] = []
    for item in items("upstream"):
        host = item.get("host", "*") if isinstance(item, dict) else None
        hosts.append(host if isinstance(host, str) and host else None)
    return routes, hosts


def _line(lines: KeyLines, path: str) -> int | None:
    return lines.line_for(path) if path else None


def glob_covers(broad: str, narrow: str) -> bool:
    """True when every text `narrow` matches is matched by `broad` too.

    Both are policy globs (`*` any run, `?` one character). The walk pairs the
    broad pattern against the narrow one symbol by symbol: a broad `*` absorbs
    any run of narrow symbols (its `*`s included), a broad `?` needs exactly
    one narrow character (a literal or `?`), a literal needs the same literal.
    It never claims cover that does not hold, so a warning built on it is
    never a false alarm.
    """
    a, b = _squash(broad), _squash(narrow)
    # reach[j]: broad[:i] can produce everything narrow[:j] produces
    reach = [True] + [False] * len(b)
    for sym in a:
        nxt = [False] * (len(b) + 1)
        for j in range(len(b) + 1):
            if sym == "*":
                nxt[j] = reach[j] or (j > 0 and nxt[j - 1])
            elif j > 0 and reach[j - 1] and b[j - 1] != "*":
                nxt[j] = sym == "?" or sym == b[j - 1]
        reach = nxt
    return reach[-1]


def _squash(glob: str) -> str:
    """Runs of `*` match what one `*` matches."""
    while "**" in glob:
        glob = glob.replace("**", "*")
    return glob


def _covers(
    first_glob: str, first_methods: tuple[str, ...] | None, glob: str, methods: object
) -> bool:
    # GET covering HEAD (policy.covers_method) needs nothing here: with no entry naming
    # HEAD, GET adds HEAD to both lists alike; with one, the methods are as written
    if not glob_covers(first_glob, glob):
        return False
    if first_methods is None:
        return True
    if not isinstance(methods, tuple):
        return False
    return set(methods) <= set(first_methods)


def _shadowed(
    name: str, lines: KeyLines, routes: list[Entry | None], upstreams: list[str | None]
) -> list[Finding]:
    """Entries that can never match because an earlier entry matches everything they do."""
    out: list[Finding] = []
    for i, route in enumerate(routes):
        for j in range(i):
            earlier = routes[j]
            if route is None or earlier is None:
                continue
            if _covers(earlier[0], earlier[1], route[0], route[1]):
                path = f"route[{i}].match"
                out.append(
                    Finding(
                        name,
                        lines.line_for(path),
                        path,
                        f"never used: route[{j}] (match {json.dumps(earlier[0])}) comes "
                        "first and matches every request this one would (first match wins); "
                        "move the narrower route up",
                        "warning",
                    )
                )
                break
    for i, upstream in enumerate(upstreams):
        for j in range(i):
            earlier_host = upstreams[j]
            if upstream is None or earlier_host is None:
                continue
            if glob_covers(earlier_host, upstream):
                path = f"upstream[{i}].host"
                out.append(
                    Finding(
                        name,
                        lines.line_for(path),
                        path,
                        f"never used: upstream[{j}] (host {json.dumps(earlier_host)}) "
                        "comes first and matches every host this one would (first match wins); "
                        "move the narrower upstream up",
                        "warning",
                    )
                )
                break
    for i, host in enumerate(upstreams):
        if host is not None and host != host.lower():
            path = f"upstream[{i}].host"
            out.append(
                Finding(
                    name,
                    lines.line_for(path),
                    path,
                    f"never used: host {json.dumps(host)} has capitals, but hosts are "
                    "compared in lower case; write it in lower case",
                    "warning",
                )
            )
    return out
