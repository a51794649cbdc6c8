"""The policy key reference (docs/policy.md), generated from the dataclasses themselves.

Type, default and allowed range come from each field's annotation, default and
validation check (`_spec(default, check)` in policy/model.py), so they cannot drift
from what `Policy` accepts. Only the one-line descriptions are written by
hand, here; `tests/test_docs.py` fails when a field has none, when a
description names a key that no longer exists, and when docs/policy.md is not
the current output of `render_markdown()`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .model import (
    SUPPORTED_VERSIONS,
    BreakerConfig,
    ConcurrencyConfig,
    DeadlineConfig,
    HedgeConfig,
    Policy,
    RateLimit,
    RetryConfig,
    RouteConfig,
    StateConfig,
    UpstreamConfig,
)

# (heading, TOML table path, class, note). Nested tables come after their parent.
SECTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("Top level", "", Policy, ""),
    (
        "`[state]`",
        "state",
        StateConfig,
        "Where counters live; what to do when they cannot be read.",
    ),
    (
        "`[deadline]`",
        "deadline",
        DeadlineConfig,
        "How much time a request has left, read from the caller or defaulted.",
    ),
    (
        "`[[rate_limit]]`",
        "rate_limit",
        RateLimit,
        "One table per limit. Every limit whose `match` (and `methods`) fits a request "
        "must admit it; a rejection names the limit that clears last.",
    ),
    (
        "`[breaker]`",
        "breaker",
        BreakerConfig,
        "The inbound circuit breaker, one per route. `breaker = false` (or `enabled = "
        "false` in the table, whose other keys are still checked) turns it off. The same "
        "keys configure `[route.breaker]` "
        "and `[upstream.breaker]`.",
    ),
    (
        "`[[route]]`",
        "route",
        RouteConfig,
        "Per-route overrides, first match wins. A route also names the breaker a request "
        "counts against: requests no route matches use the framework's route template "
        "(under a `Mount`, the mount's path and the mounted route's: `/api/items/{id}`; "
        "under a `Host`, the host pattern and the route of its app that serves the "
        "request: `api.example.com/items/{id}`, so one template under two hosts keeps two "
        "breakers and two default `Depends(fidelity.limit)` counters; a request a `Host` "
        "matches but none of its app's routes serve is `<host>/*`, as Starlette goes no "
        "further than the host; a `Host` inside a `Mount` keeps its pattern first: "
        "`api.example.com/api/items/{id}`. Apps without a `Host` route are named as "
        "before). A route's name is its identity, not its `http.route`: spans carry the "
        "framework's path template there, without a `[[route]]` name or a host pattern "
        "([telemetry.md](telemetry.md#httproute-and-fidelityroute)).",
    ),
    (
        "`[concurrency]`",
        "concurrency",
        ConcurrencyConfig,
        "A bulkhead per route: at most `limit` requests in flight (fixed, or found from "
        "latency with `adaptive = true`). Refused requests get 503 + `Retry-After`, cost "
        "no rate-limit quota and are no breaker failure. The same keys configure "
        "`[route.concurrency]`.",
    ),
    (
        "`[[upstream]]`",
        "upstream",
        UpstreamConfig,
        "Outbound policy for `FidelityTransport`, by host glob, first match wins; hosts no "
        "entry matches get the defaults below.",
    ),
    (
        "`[upstream.retry]`",
        "upstream.retry",
        RetryConfig,
        "Written as a table under its `[[upstream]]` or inline: "
        "`retry = { attempts = 3, base_ms = 100 }`.",
    ),
    (
        "`[upstream.hedge]`",
        "upstream.hedge",
        HedgeConfig,
        "Hedged requests (off when left out): an idempotent call with no answer after the "
        "delay gets another attempt, to another instance of a service; the first answer "
        'wins. Inline: `hedge = { after_ms = 50 }` or `hedge = { after = "p95" }`. '
        "`FidelityTransport` only (docs/outbound.md, hedging).",
    ),
)

# Fields whose value is another section, not a scalar key of this one.
_NESTED = {
    (Policy, "state"),
    (Policy, "deadline"),
    (Policy, "rate_limits"),
    (Policy, "breaker"),
    (Policy, "routes"),
    (Policy, "upstreams"),
    (Policy, "concurrency"),
    (UpstreamConfig, "retry"),
    (UpstreamConfig, "hedge"),
}

DESCRIPTIONS: dict[str, str] = {
    # top level
    "version": "Schema version of the file. Only 1 exists.",
    "priority_header": "Request header carrying a priority class (`critical`, `default`, "
    "`sheddable`), believed only from `trusted_peers` (through a proxy in `trusted_proxies`: "
    "only when the client it forwards for is one); unset: the route's `priority` alone.",
    "trusted_proxies": "Proxies whose `X-Forwarded-For` / `Forwarded` headers are believed "
    'when finding the client address for `key = "client_ip"`. Empty: the direct peer '
    'is the client. The peer is `scope["client"]`, which the server may already have '
    "rewritten from `X-Forwarded-For` (uvicorn's `--forwarded-allow-ips`): with `'*'` "
    "there, clients choose it (docs/operations.md, recommended settings). A network "
    "written with host bits (`10.0.0.1/8`) is the whole network (`10.0.0.0/8`); "
    "`fidelity-mw check` warns.",
    "trusted_peers": "Peers whose `x-fidelity-*` signals are believed: upstreams whose "
    "`x-fidelity-retry: exhausted` stops our retries, and callers whose `x-fidelity-attempt` "
    "is recorded. Private and loopback networks by default. A network written with host "
    "bits is the whole network, as for `trusted_proxies` (`fidelity-mw check` warns).",
    "client_ipv6_prefix": "The IPv6 prefix length a `client_ip` key counts by: an IPv6 "
    "client is given a whole /64 (or a /56, /48) and picks addresses inside it at will, so "
    "64 (the default) counts the /64 as one client, as Cloudflare's rate limiting does; "
    "clients sharing a /64 share its budget. 128: every address its own client. IPv4 "
    "addresses, IPv4-mapped IPv6 ones (`::ffff:1.2.3.4`, what a dual-stack socket "
    "reports) and NAT64's well-known prefix (`64:ff9b::1.2.3.4`, an IPv4 client behind a "
    "stateless NAT46), count by the IPv4 address. Telemetry's `fidelity.client.key_hash` and the "
    "store key hold the prefix form (`2001:db8:1:2::/64`). A `[[rate_limit]]` may set its "
    "own (`rate_limit.client_ipv6_prefix`); below 48 `fidelity-mw check` warns.",
    "forwarded_header": "The one forwarding header `trusted_proxies` set: "
    "`x-forwarded-for` (what uvicorn, nginx and most load balancers append to) or "
    "`forwarded` (RFC 7239). The other header is never read: a proxy that appends to "
    "one passes a client-sent value of the other through untouched.",
    "rate_limit_headers": "When responses carry the rate-limit fields: on every limited "
    "response, only on 429s, or never.",
    "rate_limit_header_names": "Which fields: the IETF `RateLimit` / `RateLimit-Policy` "
    "(every advertised limit); `x-ratelimit`: `X-RateLimit-Limit`, `-Remaining` and "
    "`-Reset` (Unix seconds) of the limit closest to refusing, as slowapi, GitHub and "
    "many API clients use them; `both`.",
    # [state]
    "state.url": "`memory://` (process memory), `redis://`, `rediss://`, `unix://` "
    "(one Redis, exact fleet-wide), `tiered+redis://` / `tiered+rediss://` "
    "(local-first, reconciled with Redis). Add `?cluster=true` for Redis Cluster. Query "
    "parameters go to the Redis connection: `db`, `username`, `password`, `client_name`, "
    "`health_check_interval`, `socket_keepalive`, and `ssl_*` with `rediss://`; the "
    "timeouts and the pool size are the keys below, not URL parameters (any other "
    "parameter is an error). A flag (`socket_keepalive`, `ssl_check_hostname`) takes "
    "`true` / `false` (or `1` / `0`, `yes` / `no`, `on` / `off`): redis-py reads any "
    "other value as true.",
    "state.on_error": "When Redis errors or times out: `local` decides on process-local "
    "state (marked `fallback`), `open` admits, `closed` answers 503.",
    "state.timeout_ms": (
        "Redis command timeout. Past it, `on_error` applies; a request whose deadline "
        'comes first waits only until its deadline (`fallback_why = "deadline"`).'
    ),
    "state.connect_timeout_ms": "Redis connect timeout.",
    "state.pool_size": "Redis connection pool size (bounded, blocking).",
    "state.max_keys": "Process-memory bound on limiter keys; idle keys are evicted first.",
    "state.sync_interval_ms": "Tiered state: how often local counts are reconciled with "
    "Redis, which is also their staleness bound.",
    "state.key_prefix": "Prefix of every Redis key (`{prefix}:rl:...`); also the Redis "
    "Cluster hash tag, so no braces.",
    "state.fleet_share_max_age_s": 'While Redis is unreachable (`on_error = "local"`), each '
    "process enforces its share of every limit (rate / N, burst / N), N being the fleet size "
    "it last read from Redis, if that was at most this many seconds ago; otherwise the whole "
    "limit. 0 turns the share off (every process enforces the whole limit). The share is "
    "weighted by each process's load (see `fleet_share_even_ratio`). A process silent in Redis "
    "(its calls failing) still counts in N for this long, at least 5 s and at most 60 s, as it "
    "may still enforce its share; one whose store closed leaves at once.",
    "state.fleet_share_even_ratio": "The ratio of each limit that the fleet share splits "
    "evenly (ratio / N per process) while Redis is unreachable; the rest is split by each "
    "process's fraction of the fleet's requests, read with the fleet size, so the shares "
    "still sum to one limit and a process idle when Redis went away keeps ratio / N. 1: "
    "the even share 1/N (no load reported); so is a fleet of more than 64 processes.",
    "state.fleet_share_load_max_age_s": "How long a process trusts its fraction of the "
    "fleet's load for its share while Redis is unreachable; past it (or when a member "
    "reports no load) the share is even, 1/N, recorded as `fleet_load_why`. 0: never.",
    # [deadline]
    "deadline.header": "Request headers read, in order, for the caller's remaining time "
    "(`x-request-timeout-ms` in ms, `grpc-timeout` in gRPC syntax such as `250m`). Each "
    "once: names are case-insensitive, and a repeat (`X-Timeout` after `x-timeout`) is an "
    "error.",
    "deadline.default_ms": "Deadline of a request that sends none; `false` for no "
    "default deadline (left out, it is 30 s).",
    "deadline.max_ms": "Longest deadline a caller may ask for; defaults to `default_ms`. "
    "Callers can shorten their deadline, not extend it. Not below `default_ms`.",
    # [[rate_limit]]
    "rate_limit.name": "Unique name; keys the counters and appears in `RateLimit-Policy`.",
    "rate_limit.rate": "Sustained rate: `N/s`, `N/min`, `N/h`, `N/d`, or a multiple such as "
    "`5/10min`. slowapi's spellings work too (`5/minute`, `5 per 2 minutes`), but for its "
    "month and year: write the days it counts (`1000/month` is `1000/30d`, `1/year` "
    "`1/360d`); one rate per limit: `5/minute;100/hour` is two `[[rate_limit]]` tables.",
    "rate_limit.burst": "Bucket size: how many requests may arrive at once. Defaults to the "
    "N of `rate`.",
    "rate_limit.cost": (
        "Tokens one request takes. Must not exceed the burst. Per request (a batch costs "
        "its length): in Python, `RateLimit(cost=fn)`, `fn(request)` plain or async "
        "([In Python](#in-python)); next to the route, "
        "`Depends(fidelity.limit(..., cost=fn))` (docs/fastapi.md). A file cannot name a "
        "function."
    ),
    "rate_limit.key": "Whom the limit counts: `client_ip`, `header:NAME` (falls back to the "
    "IP when absent; sent more than once, its first line, the value the app reads; a value "
    "that is an IPv6 address, as `header:x-real-ip` holds, counts by its "
    "`client_ipv6_prefix` network), `route`, "
    "`global`; a callable in Python (plain, not async: the middleware calls it as it reads "
    "the request; it returns the key's text, or a value whose `str()` is it, such as an id; "
    "an awaitable, or an object whose text is its address in memory such as an ORM row "
    "without `__str__`, counts the request by its address instead, with an ERROR: as text "
    "it would be a new key per request).",
    "rate_limit.match": "Path glob: `*` matches any run of characters (slashes included), "
    "`?` one character. Matched against the request path as the app's routes see it: "
    "without the `root_path` the app is served under (`uvicorn --root-path /svc`, a "
    "`Mount`), so `/api/*` covers `/svc/api/items/7` there. A route template such as "
    "`/items/{item_id}` is an error: write `/items/*`.",
    "rate_limit.exclude": "Paths the limit leaves out although `match` covers them, as "
    'globs: `match = "*"` with `exclude = ["/healthz", "/metrics"]` limits every route but '
    "those two (slowapi's `@limiter.exempt`).",
    "rate_limit.methods": "Only these HTTP methods; leave it out for all. `GET` covers "
    "`HEAD` too (the GET handler serves it) unless a limit names `HEAD` itself. A CORS "
    "preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is counted "
    "only by a limit that lists `OPTIONS`.",
    "rate_limit.shadow": "Decide and record (`would_reject`), never reject: try a limit on "
    "real traffic first.",
    "rate_limit.charge": "`served`: units of a request answered 5xx because of an upstream "
    "failure or a control decision (breaker, retry budget, deadline) are given back, so a "
    "fault the client did not cause does not throttle it, and of the router's own "
    "trailing-slash redirect (the request it leads to pays) and its own 405 (a method no "
    "route of the path serves, as FastAPI answers a HEAD on a GET route); `always`: every "
    "admitted "
    "request pays (for limits that guard the work itself, such as login attempts).",
    "rate_limit.retry_credit_s": 'With `charge = "served"`: each refunded request also '
    "credits the client with its cost, for its retry: the credit (at most one burst) admits "
    "requests the bucket alone would refuse, until this many seconds after the last refund "
    "that earned some. The default outlasts clients' usual retry waits (`Retry-After`, "
    'backoffs of a few seconds); 0 turns it off. No effect with `charge = "always"` '
    "(`fidelity-mw check` warns).",
    "rate_limit.client_ipv6_prefix": "This limit's own IPv6 prefix for its client keys "
    "(32 .. 128), in place of the policy's `client_ipv6_prefix`: for its `client_ip` key, "
    "and for a `header:NAME` value that is an IPv6 address. Service-to-service limits in "
    "Kubernetes, where a node's pods share one /64, want 128 (each pod its own client) "
    "while the public limits keep 64. Below 48 a key is a whole site or provider "
    "(`fidelity-mw check` warns). Unset: the policy's.",
    # [breaker]
    "breaker.failure_ratio": "Opens when failures / calls in the window reach this ratio.",
    "breaker.min_calls": "Calls the window must hold before the ratio counts.",
    "breaker.window_s": "Length of the sliding window (10 buckets).",
    "breaker.open_s": "The longest it stays open before admitting probes (see `open_min_s`).",
    "breaker.open_min_s": "The first open period: half-open probes start this soon after the "
    "breaker opens; each half-open round whose probe fails doubles it, up to `open_s`; a "
    "successful probe closes the breaker and starts over. Set it to `open_s` for a fixed "
    "open time.",
    "breaker.open_jitter": "Random spread of each open period (0.2 = ±20 %), so replicas "
    "do not probe in lockstep.",
    "breaker.half_open_probes": "Probes admitted at once while half-open; one success "
    "closes, one failure re-opens.",
    "breaker.probe_lease_s": "A probe that never reports frees its slot after this long.",
    "breaker.slow_call_ms": "Calls at least this slow count as slow. Set with "
    "`slow_call_ratio`, or neither.",
    "breaker.slow_call_ratio": "Opens when slow calls / calls in the window reach this ratio.",
    "breaker.consecutive_failures": "Also opens after this many failures in a row, whatever "
    "the window holds: for low-traffic routes.",
    "breaker.failure_statuses": 'Response statuses that count as failures (`"5xx"` '
    "classes allowed). Exceptions always do; the limiter's 429s and client disconnects "
    "never do.",
    "breaker.scope": "Whose outcomes open it on a shared store (Redis, tiered): `fleet`, "
    "every process's, one breaker for the fleet (an opening sheds on every process); "
    "`process`, this process's alone: each process keeps a breaker of its own (in Redis, "
    "under a key with its id), so one process with a bad path to an upstream (its node's "
    "network, its DNS, its pool) opens no breaker for the others. In memory mode every "
    "breaker is the process's.",
    # [[route]]
    "route.match": "Path glob, as for `rate_limit.match`. First matching route wins.",
    "route.methods": "Only these HTTP methods; leave it out for all. `GET` covers `HEAD` "
    "too unless a route names `HEAD` itself.",
    "route.name": "Unique name of the route in decisions, traces and breaker keys; defaults "
    "to `match`.",
    "route.deadline_ms": "Deadline (and cap) for this route, instead of `[deadline]`.",
    "route.breaker": "`true`: the policy's `[breaker]`; `false`: none; a table: this "
    "route's own breaker, which replaces `[breaker]`: keys it leaves out take the built-in "
    "defaults, not `[breaker]`'s values (`fidelity-mw check` warns where that differs).",
    "route.enforce": "Enforce the deadline: answer 504 for one already past on arrival "
    "(without running the app), and while the app runs, past it with no response "
    "started, answer 504 and cancel the app's work (a started response is never cut). "
    "`false`: the deadline is recorded, never acted on: one past on arrival is a "
    "`would_reject` `expired_on_arrival` decision and the app runs (the deadline, passed, "
    "still on its context and sent downstream).",
    "route.concurrency": "This route's own bulkhead (the `[concurrency]` keys; those it "
    "leaves out take the built-in defaults, not `[concurrency]`'s); `false`: no bulkhead "
    "on this route, whatever `[concurrency]` says; `true` or left out: the policy's "
    "`[concurrency]`, if any.",
    "route.priority": "Priority class of the route's requests when the bulkhead is under "
    "pressure: `sheddable` is shed first, then `default`; `critical` may fill the limit. "
    "A trusted `priority_header` overrides it.",
    # [concurrency]
    "concurrency.limit": "Requests in flight at most; with `adaptive`, where the limit starts.",
    "concurrency.adaptive": "Find the limit from latency (gradient limit): it grows while "
    "latency stays within `tolerance` of its measured floor and shrinks when it rises.",
    "concurrency.min_limit": "The adaptive limit never goes below this.",
    "concurrency.max_limit": "The adaptive limit never goes above this.",
    "concurrency.max_queue": "Requests that may wait for a slot beyond the limit (0: none; "
    "refused at once).",
    "concurrency.queue_timeout_ms": "How long a queued request waits before it is refused "
    "with 503 (never past an enforced deadline: then it is the deadline's 504, as a slot "
    "after it would only run an app cut at once).",
    "concurrency.default_share": "Share of the limit `default` requests may fill.",
    "concurrency.sheddable_share": "Share of the limit `sheddable` requests may fill "
    "(at most `default_share`).",
    "concurrency.tolerance": "Adaptive: latency / floor ratio accepted before the limit shrinks.",
    "concurrency.shed_stale": "Adaptive: while the event loop is the bottleneck, shed requests "
    "that waited too long to be read (`stale`): latency first, some goodput traded for it.",
    "concurrency.newest_first": "Adaptive: hold the requests read in one loop turn and admit "
    "the newest of them (one per turn while the event loop is the bottleneck); the others are "
    "refused (`older_in_turn`) or queued. The limit keeps at least the requests that keep the "
    "loop 90 % busy (the busy floor). Unset: on for `adaptive = true` without `shed_stale`; "
    "`false` for first come, first served.",
    "concurrency.send_stall_timeout_s": "Seconds one body message of a streamed response "
    "may wait for its client to take it (a client that stopped reading): past it the "
    "request's slot is given back, a `shed` `send_stalled` decision recorded and the "
    "response ended (the app's `send` raises, as for a client gone). `0`: never (a slot "
    "is then held for as long as such a client keeps its connection). The default is "
    "nginx's `send_timeout`. Only messages before the last: the slot is given back at "
    "the last one anyway.",
    # [[upstream]]
    "upstream.host": "Host glob (`*.internal`, `payments.internal`); `*` for the default.",
    "upstream.breaker": "Host breaker: a table with the `[breaker]` keys, or `false` for none.",
    "upstream.attempt_timeout_ms": "Timeout of one attempt; the remaining deadline shortens "
    "it. It caps each httpx timeout (connect, read, write, pool), and a shorter one of the "
    "client's stays: httpx's default is 5 s, so raise the client's (`timeout=`) for longer "
    "attempts.",
    "upstream.shared_budget": "One retry budget for every host this entry matches (the "
    "instance URLs of one service behind client-side load balancing) instead of one per "
    "host, so N instances do not get N times the budget and its floor.",
    "upstream.instances": "Base URLs of the instances of a service (`http://10.0.0.7:8080`). "
    "Set with a logical `host` (`payments`): callers address `http://payments/...` and the "
    "transport picks an instance for every attempt (docs/outbound.md, services). The `host` "
    "is a name, not a glob: under `*` every host called would go to the instances (an error).",
    "upstream.panic_threshold": "Panic mode: when fewer than this share of a service's "
    "instances are admissible, spread over all of them instead of refusing.",
    "upstream.max_ejected_ratio": "At most this share of a service's instances is ejected "
    "(skipped for an open breaker) at once; at least one may always be.",
    "upstream.failure_penalty": "How a service's balancer weighs an instance's failed "
    "attempt: right after it the instance is taken for this many times as slow as the "
    "slowest instance (1: as slow as the slowest), so other calls go elsewhere while the "
    "penalty lasts; a success ends it (Envoy's outlier detection ejects instead).",
    "upstream.failure_fade_s": "Seconds over which that penalty fades (linearly) back to "
    "the instance's own latency.",
    "upstream.retry_after_scope": "Whom a service's `Retry-After` (429 or 503) speaks for: "
    "`instance`, the instance that answered (it is paused, the retry goes to another one "
    "after its backoff); `service`, every instance (a quota shared behind a gateway or "
    "on shared state: waited before the retry, and a 429's pauses the whole service, as "
    "for a plain host).",
    "upstream.protocol_headers": "Whether attempts carry fidelity_mw's own headers "
    "(`x-fidelity-attempt`, `x-request-timeout-ms`): `auto`, to hosts that are part of the "
    "system (an address in `trusted_peers`, a name that cannot be on the public internet: "
    "one label, `.internal`, `.local`, `.svc` ..., a service whose instances all are; any "
    "other name once its first answer came from an address in `trusted_peers`); `always` "
    "(from the first attempt on, through a proxy too); `never`.",
    "upstream.client_chosen": "The clients name these hosts (webhook targets, callback "
    "URLs): a request that called one pays its rate-limit units however it ends. Its "
    "upstream failures, breaker refusals and deadline get no refund and no retry credit "
    "(else a client's own failing host made its requests free) and are no failure of the "
    "route's breaker (one client's dead host shed every client's requests). They are "
    'strangers wherever they resolve: under `protocol_headers = "auto"` no attempt carries '
    "our headers and no reply's markers are believed, an address in `trusted_peers` "
    "included. Usually on "
    '`host = "*"`, after the entries for your own upstreams (docs/inbound.md, `charge`).',
    # [upstream.hedge]
    "upstream.hedge.after": "`fixed`: hedge after `after_ms`; `p95`: after the upstream's "
    "observed attempt latency p95 (a window of recent attempts in this process), "
    "`after_ms` until it has `min_samples`.",
    "upstream.hedge.after_ms": "The hedge delay (`fixed`), or the fallback delay (`p95`).",
    "upstream.hedge.max_hedges": "Extra attempts one call may send while it waits.",
    "upstream.hedge.min_samples": "`p95`: latency samples needed before the p95 is used.",
    # [upstream.retry]
    "upstream.retry.attempts": "Attempts in total, the first included (hard cap 10).",
    "upstream.retry.methods": "The methods retried: RFC 9110's idempotent ones by default. "
    "A request with an `Idempotency-Key` is retried whatever its method. Add `POST` (or "
    "`PATCH`) only for an upstream that acts once per request however often it is sent "
    "(`fidelity-mw check` warns otherwise); a method not idempotent is never hedged. "
    "`[]`: only requests with an `Idempotency-Key`.",
    "upstream.retry.base_ms": "Backoff base: the envelope of retry n is "
    "min(max_ms, base_ms * 2^n).",
    "upstream.retry.max_ms": "Backoff cap. Not below `base_ms`.",
    "upstream.retry.jitter": "`full`: uniform in [0, envelope]; `equal`: [envelope/2, "
    "envelope]; `decorrelated`: [base, 3 x previous]; `none`: the envelope.",
    "upstream.retry.budget_ratio": "Retries allowed as a fraction of requests over the "
    "budget window (0.2 = 20 %).",
    "upstream.retry.budget_min_per_s": "Retries per second allowed on top of the ratio, so "
    "low traffic can still retry: a reserve of this x `budget_window_s` a window, which "
    "the window's retries spend like the ratio's (an outage's for a window after it).",
    "upstream.retry.budget_window_s": "Window of the retry budget.",
    "upstream.retry.retry_after_max_s": "Longest upstream `Retry-After` honoured; longer "
    "ones give up at once (`retry_after_too_long`, or `deadline` when the wait also "
    "reaches the deadline). Never waits past the deadline.",
    "upstream.retry.advice_spread": "The `Retry-After` we advise our caller after giving "
    "up is the known wait plus a uniform draw over a window of this share of it, so the "
    "callers of one failure burst do not all come back in the same second (0: the wait itself).",
    "upstream.retry.advice_spread_min_s": "The advice's spread window is at least this long. "
    "0 by default: `Retry-After` counts whole seconds, so a minimum of 1 s on a short wait "
    "sends half of its callers back a whole second after the service could answer them.",
    "upstream.retry.advice_max_s": "Longest wait advised to our caller after giving up, "
    "before the spread: an upstream asking for a day (`Retry-After: 86400`, or a date "
    "far ahead) must not send every client of ours away for that long.",
    "upstream.retry.on_status": 'Statuses that are retried (`"5xx"` classes allowed). '
    "A status below 400 is an answer that succeeded: `fidelity-mw check` warns.",
    "upstream.retry.on_connect_error": "Retry when the connection could not be made.",
    "upstream.retry.on_read_timeout": "Retry on read timeouts and network errors after "
    "connecting (the request may have been processed: idempotent methods or requests with "
    "an `Idempotency-Key` only, as always).",
    "upstream.retry.on_429": "Retry an upstream 429 that carries `Retry-After`, after it.",
}


@dataclass(frozen=True, slots=True)
class KeyDoc:
    table: str
    key: str
    type: str
    default: str
    allowed: str
    description: str

    @property
    def path(self) -> str:
        return f"{self.table}.{self.key}" if self.table else self.key


def _closure(check: Callable[..., Any]) -> dict[str, Any]:
    cells = check.__closure__ or ()
    return dict(zip(check.__code__.co_freevars, (c.cell_contents for c in cells), strict=True))


def _num(value: float) -> str:
    """TOML-style numbers: 86_400_000, 0.5."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}".replace(",", "_") if isinstance(value, int) else f"{value:g}"


def describe_check(check: Callable[..., Any] | None) -> str:
    """The allowed values, read from a validation check of policy/model.py."""
    if check is None:
        return "see description"
    name = check.__qualname__
    env = _closure(check)
    if name.startswith("optional."):
        return describe_check(env["check"]) + "; or leave out"
    if name.startswith("int_in."):
        lo, hi = env["lo"], env["hi"]
        if lo == hi:
            return _num(lo)
        return f"{_num(lo)} .. {_num(hi)}" if hi is not None else f">= {_num(lo)}"
    if name.startswith("number_in."):
        lo, hi, lo_open = env["lo"], env["hi"], env["lo_open"]
        low = f"> {_num(lo)}" if lo_open else f">= {_num(lo)}"
        return f"{low}, <= {_num(hi)}" if hi is not None else low
    if name.startswith("one_of."):
        return ", ".join(f'`"{c}"`' for c in env["allowed"])
    if name.startswith(("_instance.", "_items.")):
        return "table" if name.startswith("_instance.") else "array of tables"
    fixed = {
        "boolean": "`true` or `false`",
        "non_empty_str": "non-empty string",
        "_cidrs": 'IP networks such as `"10.0.0.0/8"`',
        "_header_names": "non-empty list of header names",
        "_header_name": "a header name",
        "_methods": "HTTP methods (GET, POST, ...)",
        "_retry_methods": "HTTP methods (GET, POST, ...), or `[]`",
        "_statuses": 'status codes 100 .. 599 or classes such as `"5xx"`',
        "_globs": "path globs, each as for `match`",
        "_glob": "non-empty glob (`*` any run of characters, `?` one)",
        "_base_urls": 'distinct base URLs such as `"http://10.0.0.7:8080"`',
        "_host_glob": (
            "non-empty ASCII host glob (`*` any run of characters, `?` one), no port; "
            "an IPv6 address without brackets (`fd00::5`)"
        ),
        "_sf_name": 'non-empty printable ASCII, without `"` or `\\`',
        "_limit_name": 'non-empty printable ASCII, without `"`, `\\` or `|`',
        "_key_prefix": "non-empty string without `{` or `}`",
        "_rate": (
            '`"N/s"`, `"N/min"`, `"N/h"`, `"N/d"`, N 1 .. 1_000_000_000, a period of at most 365 d'
        ),
        "_key": '`"client_ip"`, `"header:NAME"`, `"route"`, `"global"`',
        "_cost": "1 .. 1_000_000",
        "_route_concurrency": "table, `true` or `false`",
        "_schema_version": ", ".join(map(str, SUPPORTED_VERSIONS)),
    }
    if name in fixed:
        return fixed[name]
    raise ValueError(f"policy.reference cannot describe the check {name!r}: teach describe_check")


_TYPES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "bool | None": "boolean",
    "int | None": "integer",
    "float | None": "number",
    "str | None": "string",
    "tuple[str, ...]": "array of strings",
    "tuple[str, ...] | None": "array of strings",
    "tuple[int, ...]": "array of integers / strings",
    "frozenset[int] | tuple[int, ...]": "array of integers / strings",
    "str | KeyFunc": "string",
    "int | CostFunc": "integer",
    "bool | BreakerConfig": "boolean or table",
    "BreakerConfig | None": "table or `false`",
    "RetryConfig": "table",
    "ConcurrencyConfig | None": "table",
    "ConcurrencyConfig | bool | None": "table or boolean",
    "HedgeConfig | None": "table",
}


def describe_type(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if text.startswith("Literal["):
        return "string"
    if text in _TYPES:
        return _TYPES[text]
    raise ValueError(f"policy.reference cannot describe the type {text!r}: teach describe_type")


def toml_value(value: Any) -> str:
    """A default as it would be written in TOML."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{json.dumps(value)}`"
    if isinstance(value, int):
        return f"`{_num(value)}`"
    if isinstance(value, float):
        return f"`{value}`"
    if isinstance(value, BreakerConfig):
        return "a breaker with the default values above"
    if dataclasses.is_dataclass(value):
        return "table, defaults below"
    if isinstance(value, tuple | frozenset):
        items = sorted(value) if isinstance(value, frozenset) else list(value)
        if items and items == list(range(500, 600)):
            return '`["5xx"]`'
        return f"`{json.dumps(items)}`"
    raise ValueError(f"cannot write {value!r} as TOML")


def _scalar_fields(cls: type) -> Iterator[dataclasses.Field[Any]]:
    for f in dataclasses.fields(cls):
        if f.init and (cls, f.name) not in _NESTED:
            yield f


def key_docs() -> list[KeyDoc]:
    """Every key of every section, with its description; raises if one is undocumented."""
    rows: list[KeyDoc] = []
    missing: list[str] = []
    for _, table, cls, _ in SECTIONS:
        # `version` opens a file: list it first.
        fields = sorted(_scalar_fields(cls), key=lambda f: f.metadata.get("toml") != "version")
        for f in fields:
            key = f.metadata.get("toml", f.name)
            path = f"{table}.{key}" if table else key
            desc = DESCRIPTIONS.get(path)
            if desc is None:
                missing.append(path)
                continue
            allowed = describe_check(f.metadata.get("check"))
            if f.default is not None:  # None is not the default: TOML reaches it with `false`
                allowed = allowed.replace("; or leave out", "; or `false` for none")
            rows.append(
                KeyDoc(table, key, describe_type(f.type), toml_value(f.default), allowed, desc)
            )
    stale = sorted(set(DESCRIPTIONS) - {r.path for r in rows} - set(missing))
    if missing or stale:
        raise ValueError(
            f"policy reference out of date: undocumented {missing}, described but unknown {stale}"
        )
    return rows


def render_markdown() -> str:
    """The key tables of docs/policy.md."""
    rows = key_docs()
    out: list[str] = []
    for heading, table, _, note in SECTIONS:
        out += [f"### {heading}", ""]
        if note:
            out += [note, ""]
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for r in rows:
            if r.table == table:
                cells = (f"`{r.key}`", r.type, r.default, r.allowed, r.description)
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)
