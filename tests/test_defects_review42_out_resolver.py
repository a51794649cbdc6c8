"""out42: a resolver's host takes the async transport's shortcut, the resolver still
asked once per call.

Before, a transport with a resolver never armed its shortcut: every call ran `_start`
(the plan looked up again, the observer, the store's operations, a context), ~300
bytecodes a call more than the shortcut. Now the shortcut asks the resolver itself, once
per call as `_start` does, and goes on as what it named: a service's first attempt
(`First`, as a policy's instances), or a plain host's inlined attempt. Checked against
the code before (88f14bb): the same calls give the same instances, answers, decisions,
balancer state, breakers forgotten and random draws, call for call, through both
transports, while the resolver's answer changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from typing import Any

import httpx
import pytest

import fidelity_mw
from fidelity_mw import FidelityTransport, buildinfo
from fidelity_mw.engine import Engine
from fidelity_mw.testing import FakeClock

BEFORE = "88f14bb"  # main before out42: a resolver's every call ran `_start`
ADDRESSES = ("http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080")


@pytest.fixture(scope="module")
def before() -> Any:
    from benchmarks.overhead import baseline_package

    try:
        return baseline_package(BEFORE)
    except Exception as exc:  # (a clone without that commit)
        pytest.skip(f"no {BEFORE} to compare with: {exc}")


def _policy(package: Any) -> Any:
    from importlib import import_module

    policy = import_module(package.__name__ + ".policy")
    return policy.Policy(
        upstreams=(
            policy.UpstreamConfig(
                host="*",
                breaker=policy.BreakerConfig(min_calls=4, failure_ratio=0.5, window_s=10),
                retry=policy.RetryConfig(attempts=3, base_ms=10, budget_min_per_s=1000.0),
            ),
        )
    )


def _answers(k: int) -> list[str] | None:
    """What the resolver names for `svc` at call `k`: instances come and go (a rolling
    restart), and for a while it names none (the last named stay)."""
    if k < 15:
        return list(ADDRESSES[:2])
    if k < 25:
        return list(ADDRESSES)
    if k < 30:
        return None
    if k < 45:
        return [ADDRESSES[2]]
    return [ADDRESSES[0], ADDRESSES[2]]


def _run(package: Any, sync: bool, calls: int = 60) -> list[Any]:
    from importlib import import_module

    clock = FakeClock()
    rng = random.Random(7)
    engine_type = import_module(package.__name__ + ".engine").Engine
    engine = engine_type(_policy(package), clock=clock, rng=rng.random)
    draw = random.Random(3)
    delays = {"10.0.0.1": 0.010, "10.0.0.2": 0.030, "10.0.0.3": 0.020, "plain.internal": 0.005}
    hits: list[str] = []
    asked: list[str] = []
    at = [0]

    def resolver(host: str) -> list[str] | None:
        asked.append(host)
        return _answers(at[0]) if host == "svc" else None

    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        hits.append(host)
        clock.advance(delays[host])
        roll = draw.random()
        if host == "10.0.0.2" and roll < 0.4:
            return httpx.Response(503)
        if roll < 0.08:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, content=host.encode())

    kind = package.FidelitySyncTransport if sync else package.FidelityTransport
    inner = httpx.MockTransport(handler)
    transport = kind(inner, engine=engine, telemetry=False, resolver=resolver)
    seen: list[Any] = []

    def note(outcome: Any, ctx: Any, request: httpx.Request) -> None:
        up = transport._upstreams.get(("svc", None))
        seen.append(
            (
                outcome,
                tuple(hits),
                tuple(asked),
                [tuple(d) for d in ctx],
                [
                    (i.url, i.outstanding, i.latency_s, i.latency_at, i.failed_at, i.open_until)
                    for i in (up.instances or ())
                    if up is not None
                ],
                sorted(engine.store.breakers),
                str(request.url),
                request.headers.raw,
                request.extensions.get("timeout"),
            )
        )
        hits.clear()
        asked.clear()

    def urls(k: int) -> str:
        return "http://plain.internal/y" if k % 4 == 3 else "http://svc/x"

    async def go_async() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for k in range(calls):
                at[0] = k
                clock.advance(0.05 * (k % 3))
                request = client.build_request("GET", urls(k), headers={"a": "b"})
                try:
                    response = await client.send(request)
                except httpx.HTTPError as exc:
                    note(type(exc).__name__, [], request)
                    continue
                await response.aread()
                note(
                    (response.status_code, response.content),
                    response.extensions["fidelity_context"].decisions,
                    request,
                )

    def go_sync() -> None:
        with httpx.Client(transport=transport) as client:
            for k in range(calls):
                at[0] = k
                clock.advance(0.05 * (k % 3))
                request = client.build_request("GET", urls(k), headers={"a": "b"})
                try:
                    response = client.send(request)
                except httpx.HTTPError as exc:
                    note(type(exc).__name__, [], request)
                    continue
                response.read()
                note(
                    (response.status_code, response.content),
                    response.extensions["fidelity_context"].decisions,
                    request,
                )

    if sync:
        go_sync()
    else:
        asyncio.run(go_async())
    seen.append(("draws", rng.random()))  # as many random numbers drawn by both
    return seen


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_resolvers_call_on_the_shortcut_is_the_call_it_was(sync: bool, before: Any) -> None:
    fast = _run(fidelity_mw, sync=sync)
    slow = _run(before, sync=sync)
    assert len(fast) == len(slow)
    for k, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert a == b, f"step {k}"
    calls = [entry for entry in fast if len(entry) > 2]
    # the script reached first-attempt successes, retries, and every call asked once
    assert any(len(entry[1]) == 1 and entry[0][0] == 200 for entry in calls)
    assert any(len(entry[1]) > 1 for entry in calls)
    assert all(len(entry[2]) == 1 for entry in calls)
    # instances the resolver dropped left their breakers behind them
    assert "upstream:10.0.0.2:8080" not in calls[-1][5]


@pytest.mark.skipif(
    "fidelity_mw.outbound.transport" in buildinfo.compiled_modules(),
    reason="compiled, the transport's functions make no Python frames to count",
)
@pytest.mark.parametrize("named", [1, 2, 0], ids=["1-instance", "2-instances", "plain"])
def test_a_resolvers_successful_call_runs_no_start(named: int) -> None:
    """No `_start`, no attempt loop, and the resolver asked once per call (before: a
    `_start` per call). A resolver naming nothing leaves the plain shortcut: no `First`."""
    asked: list[str] = []

    def resolver(host: str) -> list[str] | None:
        asked.append(host)
        return list(ADDRESSES[:named]) or None

    engine = Engine(_policy(fidelity_mw), clock=FakeClock(), rng=random.Random(1).random)
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200, content=b"ok")),
        engine=engine,
        telemetry=False,
        resolver=resolver,
    )
    called: dict[str, int] = {}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            name = frame.f_code.co_name
            called[name] = called.get(name, 0) + 1

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(2):  # (the first call arms the shortcut)
                assert (await client.get("http://svc/x")).status_code == 200
            asked.clear()
            sys.setprofile(profile)
            try:
                for _ in range(5):
                    assert (await client.get("http://svc/x")).status_code == 200
            finally:
                sys.setprofile(None)

    asyncio.run(go())
    assert asked == ["svc"] * 5
    assert "_start" not in called
    assert "attempts" not in called
    assert "_drive" not in called
    assert called.get("first_attempt", 0) == (5 if named else 0)


def test_a_host_the_resolver_starts_naming_is_a_service_at_its_next_call() -> None:
    """A plain host on the shortcut (the resolver named nothing for it) becomes a
    service the call after the resolver names its instances, and plain again never
    (the last instances named stay, as before)."""
    answer: list[list[str] | None] = [None]
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200)

    engine = Engine(_policy(fidelity_mw), clock=FakeClock(), rng=random.Random(1).random)
    transport = FidelityTransport(
        httpx.MockTransport(handler), engine=engine, telemetry=False,
        resolver=lambda host: answer[0],
    )  # fmt: skip

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for k in range(6):
                answer[0] = [ADDRESSES[1]] if k == 3 else None
                assert (await client.get("http://svc/x")).status_code == 200

    asyncio.run(go())
    assert hosts == ["svc", "svc", "svc", "10.0.0.2", "10.0.0.2", "10.0.0.2"]


def test_a_resolver_that_fails_on_the_shortcut_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Discovery down after it answered: the instances it named last take the calls, and
    its failure is logged once, not per call (as on the path through `_start`)."""
    failing = [False]
    hosts: list[str] = []

    def resolver(host: str) -> list[str]:
        if failing[0]:
            raise RuntimeError("registry down")
        return [ADDRESSES[0]]

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200)

    engine = Engine(_policy(fidelity_mw), clock=FakeClock(), rng=random.Random(1).random)
    transport = FidelityTransport(
        httpx.MockTransport(handler), engine=engine, telemetry=False, resolver=resolver
    )

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for k in range(6):
                failing[0] = k >= 2
                assert (await client.get("http://svc/x")).status_code == 200

    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        asyncio.run(go())
    assert hosts == ["10.0.0.1"] * 6
    failed = [r for r in caplog.records if "resolver failed" in r.getMessage()]
    assert len(failed) == 1
