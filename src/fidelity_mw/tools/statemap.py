"""`fidelity-mw map`: every control layer, what it decides, and where its state lives.

Two inputs:

- a policy file: the layers that policy sets up, inbound and outbound;
- `module:app`: the app is imported and its middleware stack walked. The
  policy comes from the `FidelityMiddleware` found in it, and every other
  control layer found on the way (another limiter, `BaseHTTPMiddleware`
  subclasses, retrying httpx transports, redis-py clients that retry on their
  own) is reported as a warning: two layers deciding the same thing on
  different data is the failure this library exists to remove.

Three renderings: text, Markdown (tables and a Mermaid diagram) and JSON.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..decide.balance import EWMA_TAU_S
from ..policy import (
    BreakerConfig,
    ConcurrencyConfig,
    HedgeConfig,
    Policy,
    RateLimit,
    RetryConfig,
    RouteConfig,
    UpstreamConfig,
)
from ..policy.model import RETRY_METHODS, glob_matches, names_head, redact_url, shown_methods

# ---------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Layer:
    """One deciding layer for one subject (a route, a limit, an upstream)."""

    direction: str  # inbound | outbound
    layer: str  # deadline | concurrency | breaker | ratelimit | lb | hedge | retry | budget
    subject: str  # what it applies to
    config: str  # the policy key that configures it
    decides: str
    data: str  # what the decision is computed from
    state: str  # where that data lives
    key: str  # the key pattern in that store, or "-"
    writer: str  # who updates that state
    staleness: str  # how old the data may be when the decision is taken
    on_failure: str  # what happens when the state cannot be read


@dataclass(frozen=True, slots=True)
class StackEntry:
    """One middleware (outermost first) or one httpx client transport."""

    position: int
    name: str
    role: str  # fidelity | limiter | retry | breaker | base_http | framework | other
    detail: str


@dataclass(frozen=True, slots=True)
class MapWarning:
    kind: str
    where: str
    message: str


@dataclass
class StateMap:
    source: str
    policy_version: str | None
    state_url: str | None
    layers: list[Layer] = field(default_factory=list)
    stack: list[StackEntry] = field(default_factory=list)
    clients: list[StackEntry] = field(default_factory=list)
    warnings: list[MapWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- state homes


@dataclass(frozen=True, slots=True)
class _Home:
    state: str
    prefix: str | None  # Redis key prefix, None for memory
    staleness: str
    on_failure: str


def _homes(policy: Policy) -> dict[str, _Home]:
    """Where each kind of state lives (`limit`, `breaker`, `budget`) under this policy."""
    st = policy.state
    url = st.url
    failure = {
        "local": "decide on process-local counters, marked `fallback` with age = time since "
        "the last Redis reply; a background probe switches back",
        "open": "admit (fail open), marked `fallback`",
        "closed": "503 + Retry-After: 1 (fail closed)",
    }[st.on_error]
    if url.startswith("memory://"):
        memory = _Home(
            "process memory (per worker process: not shared, lost on restart)",
            None,
            "none: exact for this process",
            "cannot fail (no remote dependency)",
        )
        return {"limit": memory, "breaker": memory, "breaker_out": memory, "budget": memory}
    on_failure = f"Redis slow/unreachable (timeout {st.timeout_ms} ms): {failure}"
    exact = _Home(
        f"Redis at {redact_url(url.removeprefix('tiered+'))}",
        st.key_prefix,
        "about half a round trip: decided atomically in Redis on the server clock",
        on_failure,
    )
    limit_failure = on_failure
    if st.on_error == "local" and st.fleet_share_max_age_s > 0:
        if st.fleet_share_even_ratio < 1.0:
            load_age = min(st.fleet_share_load_max_age_s, st.fleet_share_max_age_s)
            how = (
                f"by load: rate and burst x {st.fleet_share_even_ratio:g} / N + "
                f"{1.0 - st.fleet_share_even_ratio:g} x its fraction of the fleet's requests, "
                f"read from {{{st.key_prefix}}}:fleet:load with N, recorded as fleet_weight; "
                f"evenly when that fraction is unknown or over {load_age:g} s old: rate / N, "
                "burst / N, recorded as fleet_load_why"
            )
        else:
            how = "rate / N, burst / N"
        limit_failure = (
            f"Redis slow/unreachable (timeout {st.timeout_ms} ms): decide on process-local "
            f"counters, each process enforcing its share of the limit ({how}), "
            "N = the fleet size it last read from "
            f"{{{st.key_prefix}}}:fleet if at most {st.fleet_share_max_age_s:g} s old (else the "
            "whole limit, recorded as fleet_share=unknown); marked `fallback` with age = time "
            "since the last Redis reply; a background probe switches back"
        )
    sync = st.sync_interval_ms
    # The gate and a retry's spend are atomic, but what feeds them is not all sent at
    # once: a plain success rides on the process's next call about its breaker, a
    # request's budget count on its next outbound call, each sent after one sync
    # interval at the latest (state/redis.py `_defer_success`, `budget_request`).
    budget = dataclasses.replace(
        exact,
        staleness="retries: about half a round trip (checked and spent atomically in Redis "
        "on the server clock); request counts are batched: sent with the process's next "
        f"outbound call, at the latest after one sync interval ({sync} ms, sync_interval_ms)",
    )
    if st.on_error == "closed":  # outbound, a refusal is the call's error, not a 503
        budget = dataclasses.replace(
            budget,
            on_failure=f"Redis slow/unreachable (timeout {st.timeout_ms} ms): a call's first "
            "attempt raises CircuitOpen (an httpx.TransportError, retry_after_s 1) without "
            "reaching the upstream, with or without a breaker; a retry is not made (the "
            "budget cannot be read and the policy fails closed)",
        )
    outbound_failure = (
        f"Redis slow/unreachable (timeout {st.timeout_ms} ms): the attempt raises "
        "CircuitOpen (an httpx.TransportError, retry_after_s 1) without reaching the "
        "upstream, a retry's too (the caller gets CircuitOpen, not the answer it was to "
        "retry): the breaker cannot be read and the policy fails closed"
        if st.on_error == "closed"
        else None
    )
    if not url.startswith("tiered+"):
        limit = dataclasses.replace(exact, on_failure=limit_failure)
        breaker = dataclasses.replace(
            exact,
            staleness=f"the gate: {exact.staleness}; the window: this process's plain "
            "successes reach it with its next call about the breaker (an admission, a "
            f"failure), at the latest after one sync interval ({sync} ms, sync_interval_ms)",
        )
        homes = {"limit": limit, "breaker": breaker, "budget": budget}
        homes["breaker_out"] = (
            dataclasses.replace(breaker, on_failure=outbound_failure)
            if outbound_failure
            else breaker
        )
        return homes
    where = redact_url(url.removeprefix("tiered+"))
    tiered_breaker = _Home(
        f"a per-process cached copy of the breaker in Redis at {where}; half-open "
        "probes are leased exactly in Redis",
        st.key_prefix,
        f"at most {sync} ms (one sync interval: an older copy is refreshed before use); "
        "local outcomes reach the shared window at the next sync",
        on_failure,
    )
    return {
        "limit": _Home(
            f"slices of the fleet's bucket in Redis at {where}, leased per process and "
            "spent locally",
            st.key_prefix,
            f"up to {sync} ms (sync_interval_ms): slices are topped up and given back "
            "every sync; never more than one exact GCRA admits, but units in other "
            "processes' slices (at most burst/4 each, the whole burst for a saturated key) "
            "wait for the next sync",
            limit_failure,
        ),
        "breaker": tiered_breaker,
        "breaker_out": (
            dataclasses.replace(tiered_breaker, on_failure=outbound_failure)
            if outbound_failure
            else tiered_breaker
        ),
        "budget": budget,
    }


def _client_part(key: object) -> str:
    """The client part of a limit's counter key, as the middleware writes it
    (inbound/request.py): one counter for `global`, one per route for `route`."""
    if key == "global":
        return "*"
    if key == "route":
        return "route:{route}"
    return "{client}"


def _key(home: _Home, logical: str, *kinds: str) -> str:
    """The memory key, or the Redis keys: `{prefix}:<kind>:H(<logical key>)`.

    H is blake2b-128 in hex (state/redis.py): client input never shapes a key name,
    and the `{prefix}` hash tag keeps a script's keys in one Redis Cluster slot.
    """
    if home.prefix is None:
        return logical
    return " + ".join(f"{{{home.prefix}}}:{kind}:H({logical})" for kind in kinds)


def _breaker_key(home: _Home, logical: str, breaker: BreakerConfig | None) -> str:
    """A breaker's keys (`_key`): on a shared store, one of `scope = "process"` is each
    process's own, its logical key + "@" + the process's fleet member id
    (`state.base.breaker_home`). Shown without it, the key the map named was no key a
    process kept."""
    if home.prefix is not None and breaker is not None and breaker.scope == "process":
        logical += "@{process id}"
    return _key(home, logical, "br", "bp")


# ---------------------------------------------------------------- policy -> layers


def _ms(value: int | None) -> str:
    return "none" if value is None else f"{value} ms"


def _breaker_data(b: BreakerConfig) -> str:
    parts = [
        f"failure ratio >= {b.failure_ratio:g} over {b.window_s:g} s (min {b.min_calls} calls)",
    ]
    if b.slow_call_ms is not None and b.slow_call_ratio is not None:
        parts.append(f"slow (>= {b.slow_call_ms} ms) ratio >= {b.slow_call_ratio:g}")
    if b.consecutive_failures is not None:
        parts.append(f"or {b.consecutive_failures} consecutive failures")
    shortest = min(b.open_min_s, b.open_s)
    opened = (
        f"open {b.open_s:g} s"
        if shortest >= b.open_s
        else f"open {shortest:g} s doubling per failed probe round to {b.open_s:g} s"
    )
    probes = _count(b.half_open_probes, "half-open probe")
    parts.append(f"{opened} ±{b.open_jitter * 100:.0f} %, {probes}")
    if b.scope == "process":
        # on a shared store, a key of each process's own: `<key>@<process id>`
        parts.append("each process's own breaker (scope = process)")
    return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    """ "1 attempt", "3 attempts": a count with its noun as English says it."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _route_methods(route: RouteConfig, head_named: bool) -> str:
    """ "GET,HEAD " for a `[[route]]` with methods (HEAD as GET implies), "" without."""
    if route.methods is None:
        return ""
    return ",".join(shown_methods(route.methods, head_named)) + " "


def _ipv6_prefix_said(policy: Policy, lim: RateLimit, what: str = "") -> str:
    """What a limit's client keys do with an IPv6 address: by its /N network, the
    policy's `client_ipv6_prefix` or the limit's own. `what` (a header or key function's
    limit): said only for a limit with its own prefix."""
    own = lim.client_ipv6_prefix
    if own is None:
        prefix = policy.client_ipv6_prefix
        return f"; an IPv6 client by its /{prefix}" if prefix < 128 and not what else ""
    whose = " (this limit's own client_ipv6_prefix)"
    if own >= 128:
        return f"; {what or 'an IPv6 client'} by its whole address{whose}"
    return f"; {what or 'an IPv6 client'} by its /{own}{whose}"


def _limit_subject(lim: RateLimit, head_named: bool = False) -> str:
    # with the HEAD that GET implies unless a limit names HEAD (policy.model.covers_method)
    methods = f" {','.join(shown_methods(lim.methods, head_named))}" if lim.methods else ""
    key = lim.key if isinstance(lim.key, str) else "callable"
    excluded = f" except {', '.join(lim.exclude)}" if lim.exclude else ""
    return f"limit {lim.name!r} on {lim.match}{excluded}{methods}, per {key}"


def _waits(r: RetryConfig) -> str:
    """The wait before each retry as `backoff_delay` draws it, for people reading the map."""
    if r.attempts < 2:
        return "no retries"
    base, cap = r.base_ms, r.max_ms
    ceilings = [min(cap, base * 2**n) for n in range(r.attempts - 1)]
    if r.jitter == "full":
        ranges = [f"0..{c}" for c in ceilings]
    elif r.jitter == "equal":
        ranges = [f"{c / 2:g}..{c}" for c in ceilings]
    elif r.jitter == "none":
        ranges = [str(c) for c in ceilings]
    else:  # decorrelated: each wait is drawn from [base, 3 x the previous wait], capped
        return (
            f"decorrelated jitter: first retry waits {base}..{min(cap, 3 * base)} ms, "
            f"each later one {base} ms..3x the previous wait, at most {cap} ms"
        )
    label = "no jitter" if r.jitter == "none" else f"{r.jitter} jitter"
    return f"{label}: retries wait {', '.join(ranges)} ms"


def _status_runs(statuses: list[int]) -> str:
    """Status codes with runs of more than three as a range: `on_status = ["5xx"]`
    reads "500-599", while 502, 503, 504 stay as written."""
    runs: list[list[int]] = []
    for code in statuses:
        if runs and code == runs[-1][-1] + 1:
            runs[-1].append(code)
        else:
            runs.append([code])
    out: list[str] = []
    for run in runs:
        if len(run) > 3:
            out.append(f"{run[0]}-{run[-1]}")
        else:
            out.extend(map(str, run))
    return ", ".join(out)


def _retry_data(r: RetryConfig) -> str:
    statuses = sorted(r.on_status)
    on = [f"status {_status_runs(statuses)}"] if statuses else []
    if r.on_connect_error:
        on.append("connect errors")
    if r.on_read_timeout:
        on.append("read timeouts")
    if r.on_429:
        on.append("429 (after its Retry-After)")
    return (
        f"{_count(r.attempts, 'attempt')} total, {_waits(r)}, "
        f"{_retried_methods(r.methods)} or requests with an Idempotency-Key only, "
        f"on {', '.join(on)}; "
        f"Retry-After honoured up to "
        f"{r.retry_after_max_s:g} s, never past the deadline"
    )


def _retried_methods(methods: tuple[str, ...]) -> str:
    if set(methods) == set(RETRY_METHODS):
        return "idempotent methods"
    return f"{', '.join(methods)} requests" if methods else "no method:"


def layers_for(policy: Policy) -> list[Layer]:
    """The layers `policy` sets up, inbound outermost first, then outbound."""
    homes = _homes(policy)
    home = homes["breaker"]
    out_home = homes["breaker_out"]
    limit_home = homes["limit"]
    budget_home = homes["budget"]
    rows: list[Layer] = []
    dl = policy.deadline
    # routes that record deadlines and never act on them (`enforce = false`)
    unenforced = [r.name or r.match for r in policy.routes if not r.enforce]
    rows.append(
        Layer(
            "inbound",
            "deadline",
            "every HTTP request",
            "deadline",
            "504 before the app runs when the caller's remaining time is already spent"
            + (
                f"; recorded only (would_reject), never refused, on {', '.join(unenforced)} "
                "(enforce = false)"
                if unenforced
                else ""
            ),
            f"request headers {', '.join(dl.header)}; default {_ms(dl.default_ms)}, "
            f"cap {_ms(dl.cap_ms)}",
            "none: read from each request, kept on the decision context",
            "-",
            "the caller (its timeout header)",
            "none",
            "a malformed header is ignored: the route default applies",
        )
    )
    for i, route in enumerate(policy.routes):
        if route.deadline_ms is not None:
            rows.append(
                Layer(
                    "inbound",
                    "deadline",
                    f"route {route.name or route.match}",
                    f"route[{i}].deadline_ms",
                    (
                        "504 on arrival when expired; caps the caller's deadline"
                        if route.enforce
                        else "caps the caller's deadline; expired on arrival: recorded "
                        "(would_reject), never refused (enforce = false)"
                    ),
                    f"{route.deadline_ms} ms for "
                    + _route_methods(route, names_head(policy.routes))
                    + f"requests matching {route.match}",
                    "none: read from each request",
                    "-",
                    "the caller",
                    "none",
                    "a malformed header is ignored: the route default applies",
                )
            )
    bulkheads = [
        (f"route[{i}].concurrency", f"route {r.name or r.match}", r.concurrency)
        for i, r in enumerate(policy.routes)
        if isinstance(r.concurrency, ConcurrencyConfig)
    ]
    if policy.concurrency is not None:
        # a route may opt out (`concurrency = false`): the row names those it skips
        opted_out = [f"route {r.name or r.match}" for r in policy.routes if r.concurrency is False]
        others = "every other route" + (f" except {', '.join(opted_out)}" if opted_out else "")
        bulkheads.append(("concurrency", others, policy.concurrency))
    for config_key, subject, conc in bulkheads:
        kind = (
            f"adaptive limit from {conc.min_limit} to {conc.max_limit} (starts at {conc.limit}; "
            f"shrinks when latency passes {conc.tolerance}x its measured floor)"
            if conc.adaptive
            else f"at most {conc.limit} in flight"
        )
        queue = (
            f"; up to {conc.max_queue} wait {conc.queue_timeout_ms} ms for a slot"
            if conc.max_queue
            else ""
        )
        if conc.shed_stale:
            queue += (
                "; while the event loop is the bottleneck, sheds requests that waited over "
                f"{conc.tolerance - 1:g}x the floor to be read (tick-sampled loop clock)"
            )
        stall = (
            f", or once one body message waited {conc.send_stall_timeout_s:g} s for its "
            "client (send_stall_timeout_s: the response is ended)"
            if conc.send_stall_timeout_s
            else ""
        )
        if conc.admits_newest:
            queue += (
                "; admits the newest of each loop turn's arrivals (one per turn while the "
                "event loop is the bottleneck), never fewer in flight than keep the loop "
                "90 % busy"
            )
        rows.append(
            Layer(
                "inbound",
                "concurrency",
                subject,
                config_key,
                "503 + Retry-After when the route is full for the request's priority class "
                "(before breaker and limiter: no quota spent, no breaker outcome)",
                f"{kind}{queue}; default class may fill {conc.default_share:.0%}, "
                f"sheddable {conc.sheddable_share:.0%}, critical all",
                "process memory (per process by design: it guards this process's capacity)",
                "-",
                "FidelityMiddleware: a slot taken on admission, given back when the response "
                f"ends{stall}; the adaptive limit learns each served request's latency",
                "none",
                "cannot fail",
            )
        )
    breaker_writer = (
        "FidelityMiddleware, when an admitted response ends (exceptions and "
        "failure_statuses count as failures; limiter 429s and client disconnects never do)"
    )
    for i, route in enumerate(policy.routes):
        subject = f"route {route.name or route.match}"
        if route.breaker is False:
            rows.append(
                Layer(
                    "inbound",
                    "breaker",
                    subject,
                    f"route[{i}].breaker",
                    "nothing: breaker disabled for this route",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                )
            )
            continue
        b = route.breaker if isinstance(route.breaker, BreakerConfig) else policy.breaker
        if b is None:
            continue
        name = route.name or route.match
        rows.append(
            Layer(
                "inbound",
                "breaker",
                subject,
                f"route[{i}].breaker" if isinstance(route.breaker, BreakerConfig) else "breaker",
                "503 + Retry-After while open, without calling the app; "
                "half-open admits limited probes",
                _breaker_data(b),
                home.state,
                _breaker_key(home, f"route:{name}", b),
                breaker_writer,
                home.staleness,
                home.on_failure,
            )
        )
    if policy.breaker is not None:
        rows.append(
            Layer(
                "inbound",
                "breaker",
                "every other route (framework route template, else !unmatched)",
                "breaker",
                "503 + Retry-After while open, without calling the app; "
                "half-open admits limited probes",
                _breaker_data(policy.breaker),
                home.state,
                _breaker_key(home, "route:{route}", policy.breaker),
                breaker_writer,
                home.staleness,
                home.on_failure,
            )
        )
    limiter_state = limit_home.state
    if limit_home.prefix is None:
        limiter_state += f"; at most {policy.state.max_keys} keys, idle keys evicted first"
    for i, lim in enumerate(policy.rate_limits):
        verb = "records would-reject, never rejects (shadow)" if lim.shadow else "429"
        fn = lim.cost_fn
        cost = (
            f", cost per request from a function ({getattr(fn, '__qualname__', None) or fn})"
            if fn is not None
            else f", cost {lim.cost} per request"
            if lim.cost != 1
            else ""
        )
        if lim.charge == "served" and lim.retry_credit_s > 0:
            # kept in the same key as the TAT (docs/state.md)
            cost += f", retry credit for {lim.retry_credit_s:g} s after a refund"
        rows.append(
            Layer(
                "inbound",
                "ratelimit",
                _limit_subject(lim, names_head(policy.rate_limits)),
                f"rate_limit[{i}]",
                f"{verb} + Retry-After + RateLimit fields when the bucket is empty"
                # a handshake is a GET: the limit counts those of the paths it covers
                # (inbound/websocket.py; deadline, breaker and bulkhead do not apply)
                + (
                    "; websocket handshakes too (refused: 429, or a close 1013)"
                    if lim.methods is None or "GET" in lim.methods
                    else ""
                ),
                f"GCRA {lim.rate}, burst {lim.burst_size}{cost}; client key "
                + (
                    "from X-Forwarded-For/Forwarded only via trusted_proxies"
                    + _ipv6_prefix_said(policy, lim)
                    if lim.key == "client_ip"
                    else f"{lim.key} (the client IP when absent)"
                    + _ipv6_prefix_said(policy, lim, "an IPv6 value or client")
                    if isinstance(lim.key, str) and lim.key.startswith("header:")
                    else str(lim.key if isinstance(lim.key, str) else "callable")
                    + _ipv6_prefix_said(policy, lim, "an IPv6 client in its place")
                ),
                limiter_state,
                _key(limit_home, f"{lim.name}|{_client_part(lim.key)}", "rl"),
                "FidelityMiddleware at admission, only when every limit admits "
                "(a shed or rejected request consumes no quota)",
                limit_home.staleness,
                limit_home.on_failure,
            )
        )
    upstreams = list(policy.upstreams)
    if not any(u.host == "*" for u in upstreams):
        upstreams.append(UpstreamConfig())
    for up in upstreams:
        idx = policy.upstreams.index(up) if up in policy.upstreams else None
        cfg = f"upstream[{idx}]" if idx is not None else "(built-in defaults)"
        subject = f"upstream {up.host}"
        rows.append(
            Layer(
                "outbound",
                "deadline",
                subject,
                f"{cfg}.attempt_timeout_ms" if idx is not None else cfg,
                "attempt timeout = min(per-attempt, remaining deadline); "
                "the remaining time is sent downstream",
                f"attempt_timeout_ms {up.attempt_timeout_ms}; the request's deadline",
                "none: the decision context of the request",
                "-",
                "FidelityMiddleware (inbound deadline)",
                "none",
                "no deadline on the context: the attempt timeout alone",
            )
        )
        if up.breaker is not None:
            # A service's breakers are its instances' (the attempt's gate and outcome are
            # the instance's): no breaker is kept under the service's own host
            per = "upstream:{instance host:port}" if up.instances else "upstream:{host[:port]}"
            rows.append(
                Layer(
                    "outbound",
                    "breaker",
                    subject,
                    f"{cfg}.breaker" if idx is not None else cfg,
                    ("one breaker per instance: " if up.instances else "")
                    + "fail fast (CircuitOpen, an httpx.TransportError) while open; "
                    "half-open admits limited probes",
                    _breaker_data(up.breaker),
                    out_home.state,
                    _breaker_key(out_home, per, up.breaker),
                    "FidelityTransport, after each attempt (upstream 429s never count)",
                    out_home.staleness,
                    out_home.on_failure,
                )
            )
        if up.instances:
            rows.append(_balancer_layer(up, subject, cfg, out_home))
        if up.hedge is not None:
            rows.append(_hedge_layer(up.hedge, subject, cfg))
        r = up.retry
        rows.append(
            Layer(
                "outbound",
                "retry",
                subject,
                f"{cfg}.retry" if idx is not None else cfg,
                "retry, or give up (attempts, budget, breaker open, deadline, "
                "downstream said x-fidelity-retry: exhausted)",
                _retry_data(r),
                "attempt counter on the decision context; the pause a Retry-After sets "
                "(an upstream 429's; a service instance's 429 or 503, until it answers "
                "well again) lives in the transport's process memory",
                "-",
                "FidelityTransport",
                "none",
                "-",
            )
        )
        rows.append(
            Layer(
                "outbound",
                "budget",
                subject,
                f"{cfg}.retry.budget_ratio" if idx is not None else cfg,
                "whether a retry may be spent at all",
                f"retries <= {r.budget_ratio:g} x requests + {r.budget_min_per_s:g}/s "
                f"over {r.budget_window_s:g} s",
                budget_home.state,
                _key(budget_home, "budget:{host[:port]}", "bu"),
                "FidelityTransport: each request deposits, each retry withdraws",
                budget_home.staleness,
                budget_home.on_failure,
            )
        )
    return rows


def _balancer_layer(up: UpstreamConfig, subject: str, cfg: str, home: _Home) -> Layer:
    """A service's instance choice: live per-instance state in the transport's memory,
    the instance breakers in the breaker store."""
    fresh = home.prefix is None and "cached" not in home.state
    breakers = (
        "read fresh from the store before each pick"
        if fresh
        else "as the transport last learned it from a gate or record answer (an instance "
        "not seen open is assumed closed until its gate says otherwise)"
    )
    return Layer(
        "outbound",
        "lb",
        subject,
        f"{cfg}.instances",
        "which instance each attempt goes to: the better of two random admissible ones, "
        "never an ejected one, a retry to one not tried yet; panic spreads over all",
        f"{len(up.instances)} instance{'' if len(up.instances) == 1 else 's'}; per instance: "
        "requests in flight, latency EWMA "
        f"(tau {EWMA_TAU_S:g} s), its last failure (taken for {up.failure_penalty:g}x "
        f"the slowest, fading over {up.failure_fade_s:g} s: failure_penalty, "
        "failure_fade_s), "
        "whether its breaker is open; panic below "
        f"{up.panic_threshold:.0%} admissible, at most {up.max_ejected_ratio:.0%} ejected "
        "(at least one may be)",
        "in flight, EWMA and failure: the transport's process memory (per transport, "
        f"this process's calls only); instance breakers: {home.state}",
        _breaker_key(home, "upstream:{instance host:port}", up.breaker),
        "FidelityTransport: in flight around each attempt, EWMA after it; the instance "
        "breakers after each attempt",
        f"in flight and EWMA: fresh, this process only; breaker state: {breakers}",
        "the balancer never refuses a call (panic, ejection bound); an instance breaker "
        f"that cannot be read: {home.on_failure}",
    )


def _hedge_layer(h: HedgeConfig, subject: str, cfg: str) -> Layer:
    """Hedged attempts: the delay is fixed, or the p95 of this process's latency window."""
    windowed = h.after == "p95"
    delay = (
        f"p95 of the upstream's last attempt latencies, once {h.min_samples} are known "
        f"({h.after_ms} ms until then)"
        if windowed
        else f"fixed {h.after_ms} ms"
    )
    return Layer(
        "outbound",
        "hedge",
        subject,
        f"{cfg}.hedge",
        f"a slow idempotent attempt gets up to {h.max_hedges} more, the first answer wins; "
        "each hedge is spent from the retry budget and gated by the breakers",
        f"hedge delay: {delay}",
        "the latency window: the transport's process memory, per upstream"
        if windowed
        else "none: the policy",
        "-",
        "FidelityTransport, after each attempt" if windowed else "-",
        "this process's own attempts only, refreshed every few samples" if windowed else "none",
        "a hedge the budget or a breaker refuses is not sent; the call goes on",
    )


def notes_for(policy: Policy) -> list[str]:
    """What a reader of the map needs to know about where the state lives."""
    url = policy.state.url
    if url.startswith("memory://"):
        return [
            "memory state is per process: with N worker processes or replicas, each "
            "counts on its own, so the fleet admits up to N x each rate and each "
            "process trips its breakers alone. Use redis:// or tiered+redis:// to share.",
        ]
    notes = [
        "Redis keys: H(x) is the blake2b-128 hex digest of x (client input never shapes a "
        f"key name); {{{policy.state.key_prefix}}} is a Redis Cluster hash tag.",
    ]
    st = policy.state
    if st.on_error == "local" and st.fleet_share_max_age_s > 0:
        notes.append(
            f"Fleet size: {{{st.key_prefix}}}:fleet, a sorted set of process ids scored by "
            "Redis TIME. Writer: each process, at most once a second while it uses Redis "
            "(fleet.lua; a process silent for 5 s drops out). Read by the same call: the "
            "fleet size N behind each limit's share while Redis is unreachable; its age "
            f"grows during the outage and past {st.fleet_share_max_age_s:g} s it is not used."
        )
        if st.fleet_share_even_ratio < 1.0:
            notes.append(
                f"Fleet load: {{{st.key_prefix}}}:fleet:load, a hash of process id -> its "
                "requests per second over its last two intervals between announcements (and "
                "when). Writer: each process, in the same fleet.lua call; kept 50 s after a "
                "process's last announcement. Read by the same call: the process's fraction "
                "of the live processes' load (a rise believed one announcement late), behind "
                "the weight of its share while Redis is unreachable (unknown when a live "
                "process reports none: then the even share)."
            )
    return notes


def from_policy(policy: Policy, source: str) -> StateMap:
    return StateMap(
        source,
        policy.version,
        redact_url(policy.state.url),
        layers_for(policy),
        notes=notes_for(policy),
    )


# ---------------------------------------------------------------- app inspection


def load_target(target: str) -> tuple[ModuleType, Any]:
    """Import `module:attr` (or `path/to/file.py:attr`); the current directory is importable.

    A file under the current directory is imported under its dotted name
    (`examples/app.py` -> `examples.app`), so class names read as in the code.
    """
    module_part, _, attr = target.partition(":")
    if not module_part.strip():
        raise ImportError(f"{target!r} names no module before its ':' (module:attr)")
    attr = attr or "app"
    cwd = Path.cwd()
    if str(cwd) not in sys.path:
        sys.path.insert(0, str(cwd))
    try:
        module = _import(module_part, cwd)
    except ImportError:
        raise
    except Exception as exc:  # the app's own import failed (a missing setting, a typo)
        raise ImportError(f"importing {module_part} raised {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):  # an app is an ASGI callable: not a module, a number, a string
        raise TypeError(f"{target} is {type(obj).__name__} {obj!r:.60}, not an ASGI app")
    return module, obj


def _import(module_part: str, cwd: Path) -> ModuleType:
    if not module_part.endswith(".py"):
        return importlib.import_module(module_part)
    path = Path(module_part).resolve()
    try:
        dotted = ".".join(path.relative_to(cwd).with_suffix("").parts)
    except ValueError:
        dotted = ""
    if dotted and all(part.isidentifier() for part in dotted.split(".")):
        return importlib.import_module(dotted)
    name = path.stem if path.stem.isidentifier() else "fidelity_map_target"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {module_part}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        # as importlib does for a failed import: no half-run module left to find later
        sys.modules.pop(name, None)
        raise
    return module


def _qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _mro_names(cls: type) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in getattr(cls, "__mro__", (cls,))}


_SLOWAPI = {
    "slowapi.middleware.SlowAPIMiddleware",
    "slowapi.middleware.SlowAPIASGIMiddleware",
}
_BASE_HTTP = "starlette.middleware.base.BaseHTTPMiddleware"
_FRAMEWORK_PREFIXES = ("starlette.", "fastapi.")
# Added by the framework itself around every app: not worth listing.
_INTERNAL = {
    "ServerErrorMiddleware",
    "ExceptionMiddleware",
    "RequestBodyLimitMiddleware",
    "AsyncExitStackMiddleware",
}


def _classify(cls: type) -> tuple[str, str]:
    """(role, detail) for a middleware class."""
    from ..inbound import FidelityMiddleware

    names = _mro_names(cls)
    if isinstance(cls, type) and issubclass(cls, FidelityMiddleware):
        return "fidelity", "deadline -> route breaker -> rate limits"
    if names & _SLOWAPI:
        return "limiter", "slowapi rate limiter"
    lowered = cls.__qualname__.lower()
    base_http = _BASE_HTTP in names and cls.__module__ != "starlette.middleware.base"
    for word, role in (
        ("limit", "limiter"),
        ("throttl", "limiter"),
        ("retry", "retry"),
        ("breaker", "breaker"),
        ("circuit", "breaker"),
    ):
        if word in lowered:
            return role, f"named like a {role}" + (" (BaseHTTPMiddleware)" if base_http else "")
    if base_http:
        return "base_http", "BaseHTTPMiddleware subclass"
    if cls.__module__.startswith(_FRAMEWORK_PREFIXES):
        return "framework", "built-in"
    return "other", ""


@dataclass
class _Walk:
    stack: list[StackEntry] = field(default_factory=list)
    policies: list[tuple[str, Policy]] = field(default_factory=list)
    warnings: list[MapWarning] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    apps: list[Any] = field(default_factory=list)
    # the path each app in `apps` is mounted at (`app.mount("/v2", v2)`: "/v2"), by id
    mounted_at: dict[int, str] = field(default_factory=dict)

    def add(self, cls: type, where: str, policy: Policy | None = None) -> None:
        if cls.__qualname__ in _INTERNAL:
            return
        role, detail = _classify(cls)
        name = f"{cls.__module__}.{cls.__qualname__}"
        self.stack.append(StackEntry(len(self.stack) + 1, name, role, detail))
        if role == "fidelity":
            self.policies.append((where, policy if policy is not None else Policy()))


def _middleware_policy(kwargs: dict[str, Any]) -> Policy | None:
    policy = kwargs.get("policy")
    if isinstance(policy, Policy):
        return policy
    engine = kwargs.get("engine")
    engine_policy = getattr(engine, "policy", None)
    return engine_policy if isinstance(engine_policy, Policy) else None


def _walk_app(app: Any, walk: _Walk, where: str, depth: int = 0, mounted_at: str = "") -> None:
    """Walk an ASGI app: Starlette/FastAPI middleware lists, then `.app` chains.
    `mounted_at`: the path the app serves under (its mounts' paths)."""
    if app is None or id(app) in walk.seen or depth > 64:
        return
    walk.seen.add(id(app))
    user_middleware = getattr(app, "user_middleware", None)
    built = getattr(app, "middleware_stack", None)
    if isinstance(user_middleware, list) and hasattr(app, "router"):
        walk.apps.append(app)
        walk.mounted_at[id(app)] = mounted_at
        if built is not None:
            _walk_chain(built, walk, where, depth + 1, mounted_at)
        else:
            for m in user_middleware:
                cls = getattr(m, "cls", None)
                if isinstance(cls, type):
                    walk.add(cls, where, _middleware_policy(dict(getattr(m, "kwargs", {}))))
        for route in getattr(app, "routes", []):
            sub = getattr(route, "app", None)
            path = getattr(route, "path", "")
            if sub is not None and hasattr(route, "routes"):
                _walk_app(sub, walk, f"{where} mount {path}", depth + 1, mounted_at + path)
        return
    _walk_chain(app, walk, where, depth, mounted_at)


def _walk_chain(app: Any, walk: _Walk, where: str, depth: int, mounted_at: str = "") -> None:
    """Follow `.app` from middleware to middleware (the pure-ASGI convention)."""
    from ..inbound import FidelityMiddleware

    node = app
    while node is not None and depth <= 64:
        if node is not app:
            if id(node) in walk.seen:
                return
            if hasattr(node, "user_middleware") and hasattr(node, "router"):
                _walk_app(node, walk, where, depth + 1, mounted_at)  # a nested app
                return
            walk.seen.add(id(node))
        if hasattr(node, "routes") or inspect.isroutine(node):
            return  # the router (or an endpoint function): the end of the middleware chain
        cls = type(node)
        policy = node.policy if isinstance(node, FidelityMiddleware) else None
        walk.add(cls, where, policy)
        node = getattr(node, "app", None)
        depth += 1


def _fastapi_limiter_routes(app: Any) -> list[str]:
    from ..routes import flat_routes

    found: list[str] = []
    for route in flat_routes(getattr(app, "routes", [])):  # included routers too
        dependant = getattr(route, "dependant", None)
        stack = list(getattr(dependant, "dependencies", []))
        while stack:
            dep = stack.pop()
            call = getattr(dep, "call", None)
            mod = type(call).__module__ if call is not None else ""
            if mod.startswith("fastapi_limiter") or getattr(call, "__module__", "").startswith(
                "fastapi_limiter"
            ):
                found.append(str(getattr(route, "path", "?")))
            stack.extend(getattr(dep, "dependencies", []))
    return found


def _app_level_limiters(app: Any, walk: _Walk) -> None:
    state = getattr(getattr(app, "state", None), "_state", {})
    limiter = state.get("limiter") if isinstance(state, dict) else None
    if limiter is not None and _qualname(limiter).startswith("slowapi."):
        routes = sorted(getattr(limiter, "_route_limits", {}) or {})
        listed = f" on {', '.join(routes)}" if routes else ""
        walk.warnings.append(
            MapWarning(
                "overlap-limiter",
                "app.state.limiter",
                f"slowapi Limiter{listed}: a second limiter with its own counters; "
                "a request can be rejected by one after the other already spent its quota. "
                "Move its limits to [[rate_limit]] (docs/migration.md).",
            )
        )
    for path in _fastapi_limiter_routes(app):
        walk.warnings.append(
            MapWarning(
                "overlap-limiter",
                f"route {path}",
                "fastapi-limiter RateLimiter dependency: a second limiter (its own Redis "
                "counters) on this route. Move it to a [[rate_limit]] with match = "
                f"{path!r}.",
            )
        )


def _route_dependencies(route: Any) -> Iterator[Any]:
    """The `call` of every dependency of a FastAPI route, nested ones included."""
    stack = list(reversed(getattr(getattr(route, "dependant", None), "dependencies", [])))
    while stack:  # in declaration order, a dependency before its own
        dep = stack.pop()
        call = getattr(dep, "call", None)
        if call is not None:
            yield call
        stack.extend(reversed(getattr(dep, "dependencies", [])))


def _form_layers(
    apps: list[Any], policy: Policy | None, mounted_at: dict[int, str] | None = None
) -> list[Layer]:
    """The `fidelity_mw.fastapi` forms on the app's routes (docs/fastapi.md): each
    `Depends(fidelity.limit(...))` and each `@fidelity.breaker` / `@fidelity.deadline`,
    a mounted app's named by the path it serves (`mounted_at`: each app's mount path)."""
    from ..overrides import override_of
    from ..routes import flat_routes

    # Only an app that uses the forms has imported them (FastAPI stays optional).
    forms = sys.modules.get("fidelity_mw.fastapi.limit")
    limit_cls: type | None = getattr(forms, "LimitDependency", None)

    homes = _homes(policy if policy is not None else Policy())
    rows: list[Layer] = []
    for app in apps:
        prefix = (mounted_at or {}).get(id(app), "")
        for route in flat_routes(getattr(app, "routes", [])):
            path = prefix + str(getattr(route, "path", "?"))
            methods = ",".join(sorted(getattr(route, "methods", None) or ()))
            where = f"{methods} {path}" if methods else path
            # the route's unnamed limits by rate: a second one counts apart, on "#2"
            # (fastapi/limit.py `_default_name`); FastAPI runs a repeated one once
            unnamed: dict[str, list[Any]] = {}
            for found in _route_dependencies(route):
                if limit_cls is None or not isinstance(found, limit_cls):
                    continue
                call: Any = found  # a LimitDependency (fastapi/limit.py)
                if call.name is None:
                    same_rate = unnamed.setdefault(call.rate, [])
                    if any(other is call for other in same_rate):
                        continue
                    same_rate.append(call)
                home = homes["limit"]
                key = (
                    "a dependency's value"
                    if getattr(call, "key_dep", None) is not None
                    else call.key
                    if isinstance(call.key, str)
                    else "callable"
                )
                counter = call.name or f"<route>:{call.rate}"
                if call.name is None and len(unnamed[call.rate]) > 1:
                    counter += f"#{len(unnamed[call.rate])}"
                shared = "" if call.name is None else f" (counter {call.name!r}, shared by name)"
                limits = policy.rate_limits if policy is not None else ()
                namesake = next((lim for lim in limits if lim.name == call.name), None)
                if namesake is not None and (
                    namesake.burst_size != call.burst_size
                    or not math.isclose(namesake.emission_interval_s, call.interval_s)
                ):
                    # (fastapi/limit.py `_counter_for`: what the dependency counts on then)
                    counter = f"{call.name}@form"
                    shared = (
                        f" (counter {counter!r}: the policy's [[rate_limit]] {call.name!r} "
                        f"counts at {namesake.rate}, so this one keeps its own)"
                    )
                elif namesake is not None:
                    shared = f" (counter {call.name!r}, shared with the policy's [[rate_limit]])"
                rows.append(
                    Layer(
                        "inbound",
                        "ratelimit",
                        f"route {where}: Depends(fidelity.limit({call.rate!r})), per {key}",
                        f"fidelity.limit on {path}",
                        ("records would-reject, never rejects (shadow)" if call.shadow else "429")
                        + " + Retry-After + RateLimit fields when the bucket is empty; runs "
                        "after the middleware admitted the request",
                        f"GCRA {call.rate}, burst {call.burst_size}"
                        + (
                            ", cost per request from a function (over the burst: refused)"
                            if call.cost_fn is not None
                            else f", cost {call.cost} per request"
                            if call.cost != 1
                            else ""
                        )
                        + f"{shared}; charges every request it admits (charge = always)",
                        home.state,
                        _key(home, f"{counter}|{{client}}", "rl"),
                        "the dependency, before the endpoint runs",
                        home.staleness,
                        home.on_failure,
                    )
                )
            override = override_of(getattr(route, "endpoint", None))
            if override is None:
                continue
            if override.deadline_ms is not None:
                rows.append(
                    Layer(
                        "inbound",
                        "deadline",
                        f"route {where}: @fidelity.deadline",
                        f"fidelity.deadline on {path}",
                        (
                            "504 on arrival when expired, or when the endpoint runs past it; "
                            "caps the caller's deadline"
                            if policy is not None
                            # (fastapi/routing.py `_standalone`: on arrival only)
                            else "504 on arrival when expired (the route class: without "
                            "FidelityMiddleware a running endpoint is not cut); caps the "
                            "caller's deadline"
                        ),
                        f"{override.deadline_ms} ms",
                        "none: read from each request",
                        "-",
                        "the caller",
                        "none",
                        "a malformed header is ignored: the route default applies",
                    )
                )
            b = override.breaker
            if b is False:
                rows.append(
                    Layer(
                        "inbound", "breaker", f"route {where}: @fidelity.breaker(False)",
                        f"fidelity.breaker on {path}", "nothing: breaker disabled for this route",
                        "-", "-", "-", "-", "-", "-",
                    )
                )  # fmt: skip
            elif isinstance(b, BreakerConfig):
                home = homes["breaker"]
                rows.append(
                    Layer(
                        "inbound",
                        "breaker",
                        f"route {where}: @fidelity.breaker (this route's one breaker)",
                        f"fidelity.breaker on {path}",
                        "503 + Retry-After while open, without calling the app; "
                        "half-open admits limited probes",
                        _breaker_data(b),
                        home.state,
                        _breaker_key(home, "route:{route}", b),
                        "FidelityMiddleware (or the route class), when the response ends",
                        home.staleness,
                        home.on_failure,
                    )
                )
    return rows


# ---------------------------------------------------------------- clients


def _transport_chain(transport: Any) -> list[Any]:
    """A transport and the transports it wraps (FidelityTransport, RetryTransport...)."""
    chain: list[Any] = []
    node = transport
    while node is not None and len(chain) < 16 and all(node is not c for c in chain):
        chain.append(node)
        nxt = None
        for attr in ("inner", "_inner", "wrapped", "_wrapped", "transport", "_transport"):
            candidate = getattr(node, attr, None)
            if candidate is not None and (
                hasattr(candidate, "handle_request") or hasattr(candidate, "handle_async_request")
            ):
                nxt = candidate
                break
        if nxt is None:
            for attr in ("_async_transport", "_sync_transport"):
                candidate = getattr(node, attr, None)
                if candidate is not None:
                    nxt = candidate
                    break
        node = nxt
    return chain


def _transport_role(t: Any) -> tuple[str, str, int]:
    """(role, detail, retries) for one transport."""
    name = _qualname(t)
    from .. import FidelitySyncTransport, FidelityTransport

    if isinstance(t, FidelityTransport | FidelitySyncTransport):
        return "fidelity", "outbound deadline -> host breaker -> retry", 0
    if name.startswith("httpx_retries."):
        retry = getattr(t, "retry", None)
        total = int(getattr(retry, "total", 0) or 0)
        return "retry", f"httpx-retries RetryTransport, total={total}", total
    pool = getattr(t, "_pool", None)
    retries = getattr(pool, "_retries", None)
    if name.startswith("httpx.") and isinstance(retries, int):
        if retries > 0:
            return (
                "retry",
                f"{type(t).__name__}(retries={retries}): retries connect errors",
                retries,
            )
        return "other", f"{type(t).__name__}(retries=0)", 0
    if "retry" in type(t).__name__.lower():
        return "retry", "named like a retrying transport", 1
    return "other", "", 0


def _inspect_clients(
    namespace: dict[str, Any], walk: _Walk, has_upstreams: bool
) -> list[StackEntry]:
    import httpx

    out: list[StackEntry] = []
    for var, obj in sorted(namespace.items()):
        if isinstance(obj, httpx.Client | httpx.AsyncClient):
            transports: list[tuple[str, Any]] = [("", obj._transport)]
            transports += [(f" mount {pattern.pattern}", t) for pattern, t in obj._mounts.items()]
            for mount, transport in transports:
                if transport is None:
                    continue
                chain = _transport_chain(transport)
                roles = [_transport_role(t) for t in chain]
                detail = " -> ".join(
                    type(t).__name__ + (f" ({d})" if d else "")
                    for t, (_, d, _) in zip(chain, roles, strict=True)
                )
                kinds = [r for r, _, _ in roles]
                if "fidelity" in kinds:
                    role = "fidelity+retry" if "retry" in kinds else "fidelity"
                else:
                    role = "retry" if "retry" in kinds else "other"
                where = f"{var}{mount} ({type(obj).__name__})"
                out.append(StackEntry(len(out) + 1, where, role, detail))
                retrying = [d for r, d, _ in roles if r == "retry"]
                if "fidelity" in kinds and retrying:
                    walk.warnings.append(
                        MapWarning(
                            "overlap-retry",
                            where,
                            f"both FidelityTransport and the transport it wraps "
                            f"({'; '.join(retrying)}) retry: attempts multiply, and the "
                            "inner retries ignore the budget, "
                            "the breaker and the deadline. Use a plain transport inside "
                            "FidelityTransport.",
                        )
                    )
                elif retrying:
                    walk.warnings.append(
                        MapWarning(
                            "overlap-retry",
                            where,
                            f"retries outside fidelity_mw ({'; '.join(retrying)}): no budget, "
                            "no breaker, blind to the request deadline. Replace with "
                            "FidelityTransport and an [[upstream]] retry policy.",
                        )
                    )
                elif "fidelity" not in kinds and has_upstreams:
                    walk.warnings.append(
                        MapWarning(
                            "bypass",
                            where,
                            "this client does not go through FidelityTransport: the "
                            "[[upstream]] policies do not apply to its calls.",
                        )
                    )
        elif _is_redis_client(obj):
            retries, backoff = _redis_retries(obj)
            out.append(
                StackEntry(
                    len(out) + 1,
                    f"{var} ({type(obj).__module__}.{type(obj).__name__})",
                    "retry" if retries else "other",
                    f"redis-py client, {retries} retries ({backoff})",
                )
            )
            if retries:
                walk.warnings.append(
                    MapWarning(
                        "redis-retries",
                        var,
                        f"redis-py client retries {retries} times with {backoff} on "
                        "connection errors and timeouts: during a Redis outage every "
                        "call waits through those retries. Pass "
                        "retry=Retry(NoBackoff(), 0) and a short socket_timeout, and "
                        "decide what to do on failure in one place.",
                    )
                )
    return out


def _is_redis_client(obj: Any) -> bool:
    return _qualname(obj) in {"redis.client.Redis", "redis.asyncio.client.Redis"}


def _redis_retries(client: Any) -> tuple[int, str]:
    try:
        retry = client.get_retry()
    except Exception:
        retry = None
    if retry is None:
        return 0, "no retry"
    retries = int(getattr(retry, "_retries", 0) or 0)
    backoff = type(getattr(retry, "_backoff", None)).__name__
    return retries, backoff


_PARAM = re.compile(r"\{[^}]*\}")


def _served(routes: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, bool]]:
    """(path, is_prefix) for every route the app serves: a route's full path with its
    parameters filled in, or a mount of an app without routes of its own (anything
    under it may be served)."""
    from ..routes import flat_routes

    out: list[tuple[str, bool]] = []
    for route in flat_routes(routes or []):
        path = prefix + str(getattr(route, "path", "") or "")
        if hasattr(route, "routes"):  # Mount / Host
            sub = getattr(route, "routes", None)
            if sub and depth < 16:
                out += _served(sub, path, depth + 1)
            else:
                out.append((path, True))
        else:
            out.append((_PARAM.sub("x", path), False))
    return out


def _reaches(glob: str, served: list[tuple[str, bool]]) -> bool:
    literal = re.split(r"[*?]", glob, maxsplit=1)[0]
    for path, is_prefix in served:
        if is_prefix:
            if literal.startswith(path) or path.startswith(literal):
                return True
        elif glob_matches(glob, path):
            return True
    return False


def _unmatched_globs(policy: Policy, apps: list[Any]) -> list[MapWarning]:
    """Rate limits and [[route]] entries whose `match` reaches none of the app's routes:
    a typo there (`/apu/*`) passes `check` and silently limits nothing."""
    served = [s for app in apps for s in _served(getattr(app, "routes", None))]
    if not served:
        return []
    shown = ", ".join(sorted({path + ("/..." if p else "") for path, p in served})[:8])
    out = []
    entries = [
        (f"rate_limit[{i}]", f"limit {lim.name!r}", lim.match)
        for i, lim in enumerate(policy.rate_limits)
    ] + [
        (f"route[{i}]", "route" + (f" {cfg.name!r}" if cfg.name else ""), cfg.match)
        for i, cfg in enumerate(policy.routes)
    ]
    for where, what, glob in entries:
        if not _reaches(glob, served):
            out.append(
                MapWarning(
                    "unmatched-glob",
                    where,
                    f"{what}: match {glob!r} reaches none of the app's routes ({shown}): "
                    "it applies only to requests the app answers 404. A typo?",
                )
            )
    return out


def _looks_like_a_factory(obj: Any) -> bool:
    """A plain function callable without arguments: not an ASGI app (that takes three)."""
    if not inspect.isfunction(obj) or inspect.iscoroutinefunction(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


def from_app(target: str) -> StateMap:
    """Import `module:app`, walk its stack and clients, and map what it finds."""
    module, app = load_target(target)
    walk = _Walk()
    _walk_app(app, walk, "app")
    for sub in walk.apps:
        _app_level_limiters(sub, walk)
    policies = walk.policies
    policy = policies[0][1] if policies else None
    namespace = dict(vars(module))
    for sub in walk.apps:
        state = getattr(getattr(sub, "state", None), "_state", None)
        if isinstance(state, dict):
            namespace.update({f"app.state.{k}": v for k, v in state.items()})
    clients = _inspect_clients(namespace, walk, bool(policy and policy.upstreams))
    layers = layers_for(policy) if policy else []
    inbound = sum(1 for layer in layers if layer.direction == "inbound")
    layers[inbound:inbound] = _form_layers(walk.apps, policy, walk.mounted_at)
    smap = StateMap(
        target,
        policy.version if policy else None,
        redact_url(policy.state.url) if policy else None,
        layers,
        walk.stack,
        clients,
        notes=notes_for(policy) if policy else [],
    )
    warnings: list[MapWarning] = []
    if not policies:
        message = "no FidelityMiddleware in the middleware stack: no inbound layer is mapped."
        if _looks_like_a_factory(app):
            message += (
                f" {target} is a function that takes no arguments: an app factory "
                "(uvicorn --factory)? Map the app it builds: a module with "
                "`app = create_app()`."
            )
        warnings.append(MapWarning("no-fidelity", target, message))
    elif len(policies) > 1:
        warnings.append(
            MapWarning(
                "duplicate-fidelity",
                target,
                f"{len(policies)} FidelityMiddleware instances: each keeps its own state, "
                "so limits and breakers are counted twice. Keep one.",
            )
        )
    fidelity_at = next((e.position for e in walk.stack if e.role == "fidelity"), None)
    for entry in walk.stack:
        if entry.role in ("limiter", "retry", "breaker"):
            order = ""
            if fidelity_at is not None:
                order = (
                    " It runs before FidelityMiddleware: requests it rejects never reach "
                    "fidelity_mw's decisions or traces."
                    if entry.position < fidelity_at
                    else " It runs after FidelityMiddleware: requests it rejects have "
                    "already spent fidelity_mw quota."
                )
            warnings.append(
                MapWarning(
                    f"overlap-{entry.role}",
                    entry.name,
                    f"another {entry.role} layer ({entry.detail}) decides on its own "
                    f"state.{order} Move it into the policy (docs/migration.md).",
                )
            )
        if "BaseHTTPMiddleware" in entry.detail or entry.role == "base_http":
            warnings.append(
                MapWarning(
                    "base-http-middleware",
                    entry.name,
                    "BaseHTTPMiddleware subclass: it runs the rest of the stack in a "
                    "separate task (context variables set below it are not seen above "
                    "it) and must not hold its own retry/limit/shed logic; prefer a pure "
                    "ASGI middleware.",
                )
            )
    if policy is not None:
        warnings += _unmatched_globs(policy, walk.apps)
    smap.warnings = warnings + walk.warnings
    return smap


def build(target: str) -> StateMap:
    """A policy file path, or `module:app`."""
    path = Path(target)
    if target.endswith(".toml") or path.is_file():
        return from_policy(Policy.from_toml(path), target)
    return from_app(target)


# ---------------------------------------------------------------- rendering


_LAYER_FIELDS = ("decides", "data", "state", "key", "writer", "staleness", "on_failure")


def render_text(smap: StateMap) -> str:
    out = ["fidelity_mw layer and state map", f"source:  {smap.source}"]
    if smap.policy_version:
        out.append(f"policy:  version {smap.policy_version}")
    if smap.state_url:
        out.append(f"state:   {smap.state_url}")
    for note in smap.notes:
        out.append(f"note:    {note}")
    if smap.stack:
        out += ["", "MIDDLEWARE STACK (outermost first)"]
        for e in smap.stack:
            detail = f"  [{e.role}] {e.detail}" if e.detail else f"  [{e.role}]"
            out.append(f"  {e.position}. {e.name}{detail}")
    for direction in ("inbound", "outbound"):
        rows = [r for r in smap.layers if r.direction == direction]
        if not rows:
            continue
        out += ["", f"{direction.upper()} LAYERS"]
        for n, r in enumerate(rows, 1):
            out.append(f"  {n}. {r.layer} — {r.subject}  [{r.config}]")
            for name in _LAYER_FIELDS:
                value = getattr(r, name)
                if value != "-":
                    out.append(f"       {name.replace('_', ' ') + ':':<11} {value}")
    if smap.clients:
        out += ["", "CLIENTS"]
        for e in smap.clients:
            out.append(f"  {e.name}: [{e.role}] {e.detail}")
    out += ["", f"WARNINGS ({len(smap.warnings)})"]
    if not smap.warnings:
        out.append("  none: one owner per concern")
    for w in smap.warnings:
        out.append(f"  ! {w.kind} at {w.where}: {w.message}")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _mermaid_label(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def render_mermaid(smap: StateMap) -> str:
    lines = ["flowchart LR", "  client([client])"]
    store_label = "process memory" if smap.state_url in (None, "memory://") else smap.state_url
    lines.append(f"  store[({_mermaid_label(store_label or 'state')})]")
    prev = "client"
    foreign: list[str] = []
    inbound = [r for r in smap.layers if r.direction == "inbound"]
    fid_nodes: list[str] = []
    if inbound:
        lines.append('  subgraph fidelity_in["FidelityMiddleware"]')
        lines.append("    direction LR")
        for kind, label in (
            ("deadline", "deadline"),
            ("breaker", "route breaker"),
            ("ratelimit", "rate limits"),
        ):
            rows = [r for r in inbound if r.layer == kind and r.state != "-"]
            if rows:
                node = f"in_{kind}"
                lines.append(f"    {node}[{_mermaid_label(f'{label} ({len(rows)})')}]")
                fid_nodes.append(node)
        lines.append("  end")
        for a, b in itertools.pairwise(fid_nodes):
            lines.append(f"  {a} --> {b}")
    stack = smap.stack
    if stack:
        for e in stack:
            if e.role == "fidelity":
                if fid_nodes:
                    lines.append(f"  {prev} --> {fid_nodes[0]}")
                    prev = fid_nodes[-1]
                continue
            if e.role == "framework":
                continue
            node = f"mw{e.position}"
            short = e.name.rsplit(".", 1)[-1]
            lines.append(f"  {node}[{_mermaid_label(f'{short} ({e.role})')}]")
            if e.role != "other":
                foreign.append(node)
            lines.append(f"  {prev} --> {node}")
            prev = node
    elif fid_nodes:
        lines.append(f"  {prev} --> {fid_nodes[0]}")
        prev = fid_nodes[-1]
    lines.append("  app[[app]]")
    lines.append(f"  {prev} --> app")
    for kind in ("breaker", "ratelimit"):
        if f"in_{kind}" in fid_nodes and any(
            r.layer == kind and r.direction == "inbound" and r.key != "-" for r in smap.layers
        ):
            lines.append(f"  in_{kind} -.-> store")
    outbound = [r for r in smap.layers if r.direction == "outbound"]
    if outbound:
        lines.append('  subgraph fidelity_out["FidelityTransport"]')
        lines.append("    direction LR")
        lines.append('    out_deadline["deadline"] --> out_breaker["host breaker"]')
        lines.append('    out_breaker --> out_retry["retry + budget"]')
        lines.append("  end")
        lines.append("  app --> out_deadline")
        lines.append("  out_breaker -.-> store")
        lines.append("  out_retry -.-> store")
        hosts = sorted({r.subject.removeprefix("upstream ") for r in outbound})
        for i, host in enumerate(hosts):
            label = "any other host" if host == "*" else host
            lines.append(f"  up{i}[{_mermaid_label(label)}]")
            lines.append(f"  out_retry --> up{i}")
    for i, c in enumerate(smap.clients):
        if c.role in ("retry", "fidelity+retry"):
            node = f"cl{i}"
            inner = c.role == "fidelity+retry" and bool(outbound)
            label = f"{c.name}: inner transport retries" if inner else f"{c.name} (retries)"
            lines.append(f"  {node}[{_mermaid_label(label)}]")
            lines.append(f"  {'out_retry' if inner else 'app'} --> {node}")
            foreign.append(node)
    if foreign:
        lines.append("  classDef overlap fill:#fde2e1,stroke:#c0392b,color:#000")
        lines.append(f"  class {','.join(foreign)} overlap")
    return "\n".join(lines)


def render_markdown(smap: StateMap) -> str:
    out = [f"# Layer and state map: `{smap.source}`", ""]
    if smap.policy_version:
        out.append(f"Policy version `{smap.policy_version}`, state `{smap.state_url}`.")
        out.append("")
    for note in smap.notes:
        out += [f"> {note}", ""]
    out += ["```mermaid", render_mermaid(smap), "```", ""]
    if smap.stack:
        out += ["## Middleware stack (outermost first)", "", "| # | middleware | role | note |"]
        out.append("|---|---|---|---|")
        for e in smap.stack:
            out.append(f"| {e.position} | `{e.name}` | {e.role} | {_md(e.detail)} |")
        out.append("")
    for direction in ("inbound", "outbound"):
        rows = [r for r in smap.layers if r.direction == direction]
        if not rows:
            continue
        out += [f"## {direction.capitalize()} layers", ""]
        out.append(
            "| layer | applies to | policy key | decides | on which data | state lives in "
            "| key | written by | staleness | if the state is unreachable |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cells = (
                r.layer,
                r.subject,
                f"`{r.config}`",
                r.decides,
                r.data,
                r.state,
                f"`{r.key}`" if r.key != "-" else "-",
                r.writer,
                r.staleness,
                r.on_failure,
            )
            out.append("| " + " | ".join(_md(c) for c in cells) + " |")
        out.append("")
    if smap.clients:
        out += ["## Clients", "", "| client | role | transports |", "|---|---|---|"]
        for e in smap.clients:
            out.append(f"| `{_md(e.name)}` | {e.role} | {_md(e.detail)} |")
        out.append("")
    out += [f"## Warnings ({len(smap.warnings)})", ""]
    if not smap.warnings:
        out.append("None: one owner per concern.")
    for w in smap.warnings:
        out.append(f"- **{w.kind}** at `{_md(w.where)}`: {_md(w.message)}")
    return "\n".join(out) + "\n"


def render(smap: StateMap, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(smap.to_json(), indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(smap)
    return render_text(smap)
