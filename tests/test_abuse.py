"""Abuse: what a hostile client (or a hostile upstream) can make fidelity_mw do.

- A million distinct client keys: the limiter's key table stays within
  `max_keys` (default 100,000); its memory is measured with tracemalloc and
  per-decision time is measured at the start and at the end (printed, and
  attached to the test report as properties; asserted on size, never on time).
- Distinct client addresses and paths through the middleware: every cache on
  the request path stays bounded.
- Distinct upstream hosts (a service that calls URLs its clients supply):
  per-host breakers and retry budgets stay bounded.
- X-Forwarded-For / Forwarded from an untrusted peer are ignored; behind a
  trusted proxy, a spoofed left part of the chain changes nothing.
- `x-fidelity-attempt` from an untrusted caller and `x-fidelity-retry:
  exhausted` from an untrusted upstream are ignored.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from _asgi import http_scope
from _loopback import LoopbackServer
from fidelity_mw import (
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.context import context_from_scope
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

MB = 1e6


def spec_of(lim: RateLimit) -> LimitSpec:
    interval = lim.emission_interval_s
    return LimitSpec(lim.name, interval, lim.burst_size * interval, lim.cost, lim.shadow)


def ip_of(i: int) -> str:
    return f"{(i >> 24) & 255}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def per_call_us(batches: list[float]) -> float:
    return statistics.median(batches) * 1e6


# ---------------------------------------------------------------- a million client keys


@pytest.mark.slow
def test_a_million_client_keys_stay_within_max_keys(
    record_property: Callable[[str, object], None],
) -> None:
    """1,000,000 distinct clients, each still active when the next arrives (1/min,
    burst 5; the clock moves 1 us per request): the worst case, where sweeping
    finds nothing idle and has to evict the oldest keys.

    Memory: tracemalloc runs over the last 200,000 decisions. Every key still
    in the table at the end was inserted in that span (each client comes once
    and eviction takes the oldest), and the dict's arrays are rebuilt in it
    too, so the traced figure at 1M is the whole table. Growth before that is
    watched on the process RSS (200k, 500k, 800k keys). Time: per-decision
    cost of the first 50,000 decisions against the 50,000 just before tracing
    starts (after 30 sweep cycles), both without tracemalloc's overhead.
    """
    max_keys = 100_000
    n = 1_000_000
    traced_from = 800_000
    batch = 1_000
    specs = (spec_of(RateLimit(name="per-ip", rate="1/min", burst=5)),)
    store = MemoryStore(max_keys=max_keys)
    table = store.limits
    admit = store.admit_now
    fmt = "per-ip|%d.%d.%d.%d"
    now = 1_000.0
    timings: list[float] = []  # seconds per decision, per batch of 1000
    traced: dict[int, int] = {}
    rss: dict[int, int] = {}
    largest = 0
    clock = time.perf_counter
    base = 0
    gc.collect()
    try:
        for start in range(0, n, batch):
            if start == traced_from:
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
            keys = [
                (fmt % ((i >> 24) & 255, (i >> 16) & 255, (i >> 8) & 255, i & 255),)
                for i in range(start, start + batch)
            ]
            t0 = clock()
            for key in keys:
                admit(None, None, key, specs, now)
                now += 1e-6
            timings.append((clock() - t0) / batch)
            largest = max(largest, len(table.tats))
            if start + batch in (200_000, 500_000, traced_from):
                rss[start + batch] = rss_bytes()
            if start + batch == n:
                traced[n] = tracemalloc.get_traced_memory()[0] - base
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()

    untraced = timings[: traced_from // batch]
    first = per_call_us(untraced[:50])
    last = per_call_us(untraced[-50:])
    report = {
        "keys": n,
        "max_keys": max_keys,
        "table_len": len(table.tats),
        "largest_len": largest,
        "evicted_active": table.evicted_active,
        "rss_MB_at_200k": round(rss[200_000] / MB, 1),
        "rss_MB_at_500k": round(rss[500_000] / MB, 1),
        "rss_MB_at_800k": round(rss[traced_from] / MB, 1),
        "traced_MB_at_1M": round(traced[n] / MB, 1),
        "traced_peak_MB": round(peak / MB, 1),
        "bytes_per_key_at_1M": round(traced[n] / len(table.tats)),
        "us_per_decision_first_50k": round(first, 2),
        "us_per_decision_750k_800k": round(last, 2),
        "us_per_decision_worst_batch": round(max(untraced) * 1e6, 2),
    }
    for key, value in report.items():
        record_property(key, value)
    print("\nabuse/1M keys:", report)

    assert largest <= max_keys
    assert table.evicted_active == n - len(table.tats)  # every key was active: all counted
    # no growth: from 200k to 800k keys the process grew by less than a tenth of
    # what 600k more keys would cost if they were kept (600k x 168 B = 100 MB)
    assert rss[traced_from] - rss[200_000] <= 10 * MB
    # the stated bound: under 300 bytes per key, 30 MB at the default max_keys
    assert traced[n] <= max_keys * 300
    assert peak <= max_keys * 400  # with the sweep's temporary lists


def test_idle_keys_are_swept_without_loss() -> None:
    """Clients that come back after their bucket refilled: nothing active is evicted."""
    spec = spec_of(RateLimit(name="l", rate="10/s", burst=1))
    store = MemoryStore(max_keys=1_000)
    now = 1_000.0
    for i in range(50_000):
        result = store.admit_now(None, None, (f"l|{ip_of(i)}",), (spec,), now)
        assert result.admitted
        now += 0.01  # 100/s of distinct clients; each bucket refills in 0.1 s
        assert len(store.limits.tats) <= 1_000
    assert store.limits.evicted_active == 0


# ---------------------------------------------------------------- through the middleware


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _scope(path: str, client: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    return http_scope(
        path, headers=headers or [], client=(client, 40_000), server=("127.0.0.1", 8000)
    )


async def _call(mw: FidelityMiddleware, scope: dict[str, Any]) -> int:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await mw(scope, receive, send)
    assert len(statuses) == 1
    return statuses[0]


@pytest.mark.slow
def test_many_clients_and_paths_through_the_middleware(
    record_property: Callable[[str, object], None],
) -> None:
    """25,000 requests, each from a new client address, with a new API key, on a
    new path, through trusted-proxy handling: the key table (max_keys 2,000),
    the route plans (10,000, cleared when full) and the telemetry caches stay
    bounded. tracemalloc runs from request 10,000 on (after the plan cache was
    cleared once, so everything alive was allocated under tracing); traced
    memory at 25k requests is what it was at 15k (both points hold 2,000 keys
    and 5,000 plans). Per-request time is measured before tracing starts."""
    policy = Policy(
        state=StateConfig(max_keys=2_000),
        rate_limits=(
            RateLimit(name="ip", rate="1/min", burst=5),
            RateLimit(name="key", rate="1/min", burst=5, key="header:x-api-key"),
        ),
        trusted_proxies=("10.0.0.0/8",),
    )
    clock = FakeClock()
    mw = FidelityMiddleware(_ok, policy=policy, clock=clock, rng=seeded_random(3))
    store = mw.engine.store
    assert isinstance(store, MemoryStore)
    n, batch = 25_000, 1_000
    timings: list[float] = []
    traced: dict[int, int] = {}

    async def run() -> None:
        for start in range(0, n, batch):
            scopes = [
                _scope(
                    f"/items/{i}",
                    ip_of(i + 1),
                    [(b"x-api-key", f"key-{i}".encode()), (b"x-forwarded-for", b"1.2.3.4")],
                )
                for i in range(start, start + batch)
            ]
            if start == 10_000:
                tracemalloc.start()
            t0 = time.perf_counter()
            for scope in scopes:
                assert await _call(mw, scope) == 200
                clock.advance(1e-6)
            timings.append((time.perf_counter() - t0) / batch)
            if start + batch in (15_000, n):
                traced[start + batch] = tracemalloc.get_traced_memory()[0]

    gc.collect()
    try:
        asyncio.run(run())
    finally:
        tracemalloc.stop()
    telemetry = mw.observer
    report = {
        "requests": n,
        "key_table": len(store.limits.tats),
        "route_plans": len(mw.engine._plans),
        "peer_cache": len(mw._reader._peer_trust),
        "traced_MB_at_15k": round(traced[15_000] / MB, 1),
        "traced_MB_at_25k": round(traced[n] / MB, 1),
        "us_per_request_first_5k": round(per_call_us(timings[:5]), 1),
        "us_per_request_5k_10k": round(per_call_us(timings[5:10]), 1),
    }
    for key, value in report.items():
        record_property(key, value)
    print("\nabuse/middleware:", report)
    assert len(store.limits.tats) <= 2_000
    assert len(mw.engine._plans) <= 10_000
    assert len(mw._reader._peer_trust) <= 4_097
    hashes = getattr(telemetry, "_key_hashes", {})
    assert len(hashes) <= 4_096
    assert traced[n] <= traced[15_000] * 1.15


def test_distinct_upstream_hosts_keep_breakers_and_budgets_bounded() -> None:
    """Per-host breakers and retry budgets: a client that makes us call a new host
    per request (webhooks, link previews) cannot grow them past max_breakers."""
    clock = FakeClock()
    store = MemoryStore(max_breakers=500, rng=seeded_random(1))
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    transport = FidelityTransport(
        inner=inner, clock=clock, store=store, rng=seeded_random(2), telemetry=False
    )

    async def run() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for i in range(3_000):
                response = await client.get(f"http://h{i}.example.net/hook")
                assert response.status_code == 200
                assert len(store.breakers) <= 500
                assert len(store.budgets) <= 500
                clock.advance(0.1)  # 10 new hosts per second: idle once their 30 s window passed

    asyncio.run(run())
    assert 0 < len(store.breakers) <= 500
    assert 0 < len(store.budgets) <= 500
    # hosts were swept once their window had emptied: nothing active was lost
    assert store.breakers_evicted_active == 0
    assert store.budgets_evicted_active == 0


def test_distinct_upstream_hosts_all_active_are_evicted_and_counted() -> None:
    clock = FakeClock()
    store = MemoryStore(max_breakers=100, rng=seeded_random(1))
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    transport = FidelityTransport(inner=inner, clock=clock, store=store, telemetry=False)

    async def run() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for i in range(1_000):  # no clock advance: every host still in its window
                await client.get(f"http://h{i}.example.net/hook")

    asyncio.run(run())
    assert len(store.breakers) <= 100
    assert len(store.budgets) <= 100
    assert store.breakers_evicted_active > 0
    assert store.budgets_evicted_active > 0


# ---------------------------------------------------------------- forwarding headers


def _limited(**policy: Any) -> FidelityMiddleware:
    return FidelityMiddleware(
        _ok,
        policy=Policy(rate_limits=(RateLimit(rate="1/min", burst=3),), breaker=None, **policy),
        clock=FakeClock(),
        rng=seeded_random(1),
        telemetry=False,
    )


def _admitted(mw: FidelityMiddleware, peer: str, headers_for: Callable[[int], list]) -> int:
    async def run() -> int:
        ok = 0
        for i in range(20):
            ok += await _call(mw, _scope("/x", peer, headers_for(i))) == 200
        return ok

    return asyncio.run(run())


@pytest.mark.parametrize(
    "headers_for",
    [
        lambda i: [(b"x-forwarded-for", ip_of(i + 7).encode())],
        lambda i: [(b"forwarded", f"for={ip_of(i + 7)}".encode())],
        lambda i: [
            (b"x-forwarded-for", ip_of(i + 7).encode()),
            (b"forwarded", f'for="[2001:db8::{i + 1:x}]:80"'.encode()),
        ],
    ],
    ids=["xff", "forwarded", "both"],
)
@pytest.mark.parametrize("proxies", [(), ("10.0.0.0/8",)], ids=["no-proxies", "other-proxies"])
def test_forwarding_headers_from_an_untrusted_peer_are_ignored(
    headers_for: Callable[[int], list], proxies: tuple[str, ...]
) -> None:
    """20 requests from one untrusted address, each claiming another client: they
    all count against the peer (burst 3), never against the claimed addresses."""
    mw = _limited(trusted_proxies=proxies)
    assert _admitted(mw, "203.0.113.9", headers_for) == 3


def test_a_spoofed_chain_behind_a_trusted_proxy_changes_nothing() -> None:
    """The proxy appends the address it saw; what the client put to the left is ignored."""
    mw = _limited(trusted_proxies=("10.0.0.0/8",))

    def spoofed(i: int) -> list[tuple[bytes, bytes]]:
        return [(b"x-forwarded-for", f"{ip_of(i + 7)}, 10.9.9.9, 198.51.100.7".encode())]

    assert _admitted(mw, "10.0.0.1", spoofed) == 3  # all are 198.51.100.7
    # ... and the proxy's own address is not a key clients can drain for others
    mw = _limited(trusted_proxies=("10.0.0.0/8",))
    assert _admitted(mw, "10.0.0.1", lambda i: [(b"x-forwarded-for", ip_of(i + 7).encode())]) == 20


def test_client_sent_forwarded_behind_an_xff_proxy_picks_no_key() -> None:
    """Issue 12 #1: the proxy appends to X-Forwarded-For and passes the client's own
    `Forwarded: for=...` through. Every request is the same client: burst 3 admits 3."""
    mw = _limited(trusted_proxies=("10.0.0.0/8",))

    def spoofed(i: int) -> list[tuple[bytes, bytes]]:
        return [
            (b"forwarded", f"for={ip_of(i + 7)}".encode()),
            (b"x-forwarded-for", b"198.51.100.7"),
        ]

    assert _admitted(mw, "10.0.0.1", spoofed) == 3


def test_forwarded_header_policy_reads_forwarded_only() -> None:
    mw = _limited(trusted_proxies=("10.0.0.0/8",), forwarded_header="forwarded")

    def spoofed(i: int) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-forwarded-for", ip_of(i + 7).encode()),
            (b"forwarded", b"for=198.51.100.7"),
        ]

    assert _admitted(mw, "10.0.0.1", spoofed) == 3
    # ... and Forwarded is believed: distinct clients each get their own bucket
    mw = _limited(trusted_proxies=("10.0.0.0/8",), forwarded_header="forwarded")
    assert (
        _admitted(mw, "10.0.0.1", lambda i: [(b"forwarded", f"for={ip_of(i + 7)}".encode())]) == 20
    )


def test_attempt_header_from_an_untrusted_caller_is_ignored() -> None:
    mw = _limited(trusted_peers=("10.0.0.0/8",))
    contexts = []
    for peer in ("203.0.113.9", "10.1.1.1"):
        scope = _scope("/x", peer, [(b"x-fidelity-attempt", b"3")])
        assert asyncio.run(_call(mw, scope)) == 200
        contexts.append(context_from_scope(scope))
    untrusted, trusted = contexts
    assert untrusted is not None
    assert trusted is not None
    assert (untrusted.trusted_peer, untrusted.inbound_attempt) == (False, 1)
    assert (trusted.trusted_peer, trusted.inbound_attempt) == (True, 3)


# ---------------------------------------------------------------- don't-retry from upstreams


class ExhaustedUpstream:
    """Always 503 + `x-fidelity-retry: exhausted`; counts the calls it gets."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"x-fidelity-retry", b"exhausted")],
            }
        )
        await send({"type": "http.response.body", "body": b"gave up"})


@pytest.mark.parametrize(
    ("trusted_peers", "host", "expected_calls"),
    [
        (("10.0.0.0/8",), "127.0.0.1", 3),  # loopback not trusted: signal ignored, retried
        (("10.0.0.0/8",), "localhost", 3),
        (("127.0.0.0/8",), "127.0.0.1", 1),  # trusted: honoured, not retried
        (("127.0.0.0/8", "::1/128"), "localhost", 1),
    ],
)
def test_exhausted_signal_only_from_trusted_upstreams(
    trusted_peers: tuple[str, ...], host: str, expected_calls: int
) -> None:
    upstream = ExhaustedUpstream()
    policy = Policy(
        trusted_peers=trusted_peers,
        upstreams=(UpstreamConfig(retry=RetryConfig(attempts=3, base_ms=1, max_ms=2)),),
    )
    with LoopbackServer(upstream) as server:
        transport = FidelityTransport(
            policy=policy, clock=FakeClock(), rng=seeded_random(1), telemetry=False
        )

        async def run() -> int:
            async with httpx.AsyncClient(transport=transport, timeout=5.0) as client:
                response = await client.get(f"http://{host}:{server.port}/pay")
                return response.status_code

        assert asyncio.run(run()) == 503
    assert upstream.calls == expected_calls


def test_many_repeated_wanted_headers_are_joined_in_linear_time() -> None:
    """Issue 12 #7: 200,000 repeated deadline and key headers. Joining them pairwise
    copies ~10^12 bytes (many minutes); joining once copies a few MB. A subprocess, so the
    old code can be killed: the limit separates "at once" from "never"."""
    code = (
        "import asyncio\n"
        "from fidelity_mw import FidelityMiddleware, Policy, RateLimit\n"
        "async def app(scope, receive, send):\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b''})\n"
        "policy = Policy(rate_limits=(RateLimit(rate='10/s', key='header:x-api-key'),))\n"
        "mw = FidelityMiddleware(app, policy=policy, telemetry=False)\n"
        "headers = [(b'x-request-timeout-ms', b'1' * 200), (b'x-api-key', b'k' * 200)] * 100000\n"
        "scope = {'type': 'http', 'method': 'GET', 'path': '/', 'headers': headers,\n"
        "         'client': ('192.0.2.1', 1), 'query_string': b''}\n"
        "sent = []\n"
        "async def receive():\n"
        "    return {'type': 'http.request', 'body': b''}\n"
        "async def send(message):\n"
        "    sent.append(message)\n"
        "asyncio.run(mw(scope, receive, send))\n"
        "assert sent[0]['status'] == 200, sent[0]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
