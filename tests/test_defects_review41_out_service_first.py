"""out41: a service's first attempt without the attempt loop, every behaviour kept.

A call to a service (an upstream with instances, unhedged) on in-process state makes its
first attempt through `First` (`first_attempt` picks and gates the instance by the loop's
own `_gate_next`), and only a call that goes on (a retry, a failure, an open breaker) runs
the loop, from right after the send. Checked here against the code before the change
(9f0a749, where every service call ran the loop): the same calls give the same instances,
answers, decisions, balancer state and request afterwards, call for call, with the same
random draws, through both transports.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import fidelity_mw
from fidelity_mw import FidelityTransport, buildinfo
from fidelity_mw.engine import Engine
from fidelity_mw.policy import Policy, UpstreamConfig
from fidelity_mw.testing import FakeClock

INSTANCES = ("http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080")
BEFORE = "9f0a749"  # main before out41: every service call ran the attempt loop


@pytest.fixture(scope="module")
def before() -> Any:
    from benchmarks.overhead import baseline_package

    try:
        return baseline_package(BEFORE)
    except Exception as exc:  # (a clone without that commit)
        pytest.skip(f"no {BEFORE} to compare with: {exc}")


def _policy(n: int, package: Any) -> Any:
    from importlib import import_module

    policy = import_module(package.__name__ + ".policy")
    Policy, UpstreamConfig = policy.Policy, policy.UpstreamConfig
    BreakerConfig, RetryConfig = policy.BreakerConfig, policy.RetryConfig
    return Policy(
        upstreams=(
            UpstreamConfig(
                host="svc",
                instances=INSTANCES[:n],
                breaker=BreakerConfig(min_calls=4, failure_ratio=0.5, window_s=10),
                retry=RetryConfig(attempts=3, base_ms=10, budget_min_per_s=1000.0),
            ),
        )
    )


def _script(seed: int) -> Callable[[httpx.Request], httpx.Response]:
    """Answers by instance and call: one instance slow, one failing now and then."""
    draw = random.Random(seed)

    def answer(request: httpx.Request) -> httpx.Response:
        port_host = request.url.host
        roll = draw.random()
        if port_host == "10.0.0.2" and roll < 0.4:
            return httpx.Response(503)
        if roll < 0.08:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, content=port_host.encode())

    return answer


def _run(n: int, package: Any, sync: bool, calls: int = 60) -> list[Any]:
    from importlib import import_module

    clock = FakeClock()
    rng = random.Random(7)
    Engine = import_module(package.__name__ + ".engine").Engine
    engine = Engine(_policy(n, package), clock=clock, rng=rng.random)
    FidelityTransport, FidelitySyncTransport = (
        package.FidelityTransport,
        package.FidelitySyncTransport,
    )
    answer = _script(3)
    delays = {"10.0.0.1": 0.010, "10.0.0.2": 0.030, "10.0.0.3": 0.020}
    hits: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(request.url.host)
        clock.advance(delays[request.url.host])
        return answer(request)

    seen: list[Any] = []
    if sync:
        transport: Any = FidelitySyncTransport(
            httpx.MockTransport(handler), engine=engine, telemetry=False
        )
    else:
        transport = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)

    def note(outcome: Any, ctx: Any) -> None:
        up = transport._upstreams[("svc", None)]
        seen.append(
            (
                outcome,
                tuple(hits),
                [tuple(d) for d in ctx],
                [
                    (i.outstanding, i.latency_s, i.latency_at, i.failed_at, i.open_until)
                    for i in up.instances
                ],
            )
        )
        hits.clear()

    async def go_async() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for k in range(calls):
                clock.advance(0.05 * (k % 3))
                request = client.build_request("GET", "http://svc/x", headers={"a": "b"})
                try:
                    response = await client.send(request)
                except httpx.HTTPError as exc:
                    note(type(exc).__name__, exc.request.extensions.get("fidelity_context", []))
                    note_request(request)
                    continue
                await response.aread()
                note(
                    (response.status_code, response.content),
                    response.extensions["fidelity_context"].decisions,
                )
                note_request(request)

    def note_request(request: httpx.Request) -> None:
        # the request as it came after the call: its URL, headers and timeouts
        seen.append((str(request.url), request.headers.raw, request.extensions.get("timeout")))

    def go_sync() -> None:
        with httpx.Client(transport=transport) as client:
            for k in range(calls):
                clock.advance(0.05 * (k % 3))
                request = client.build_request("GET", "http://svc/x", headers={"a": "b"})
                try:
                    response = client.send(request)
                except httpx.HTTPError as exc:
                    note(type(exc).__name__, [])
                    note_request(request)
                    continue
                response.read()
                note(
                    (response.status_code, response.content),
                    response.extensions["fidelity_context"].decisions,
                )
                note_request(request)

    if sync:
        go_sync()
    else:
        asyncio.run(go_async())
    seen.append(("draws", rng.random()))  # as many random numbers drawn by both
    return seen


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_service_call_without_the_loop_is_the_loops_call(n: int, sync: bool, before: Any) -> None:
    fast = _run(n, fidelity_mw, sync=sync)
    loop = _run(n, before, sync=sync)
    assert len(fast) == len(loop)
    for k, (a, b) in enumerate(zip(fast, loop, strict=True)):
        assert a == b, f"step {k}"
    # the script reached calls that ended on their first attempt and calls that retried
    calls = [entry for entry in fast if len(entry) == 4]
    assert any(len(entry[1]) == 1 and entry[0][0] == 200 for entry in calls)
    assert any(len(entry[1]) > 1 for entry in calls)


@pytest.mark.skipif(
    "fidelity_mw.outbound.loop" in buildinfo.compiled_modules(),
    reason="compiled, the loop's functions make no Python frames to count",
)
@pytest.mark.parametrize("n", [1, 2])
def test_a_service_call_that_succeeds_runs_no_attempt_loop(n: int) -> None:
    """The success path of a service's call: no `attempts` generator, no `_drive`
    (before, every service call ran them: ~600 bytecodes of its ~2,000)."""
    clock = FakeClock()
    engine = Engine(_policy(n, fidelity_mw), clock=clock, rng=random.Random(1).random)
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200, content=b"ok")),
        engine=engine,
        telemetry=False,
    )
    called: dict[str, int] = {}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            name = frame.f_code.co_name
            called[name] = called.get(name, 0) + 1

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):  # (the first call arms the shortcut)
                assert (await client.get("http://svc/x")).status_code == 200
            sys.setprofile(profile)
            try:
                for _ in range(5):
                    assert (await client.get("http://svc/x")).status_code == 200
            finally:
                sys.setprofile(None)

    asyncio.run(go())
    assert called.get("first_attempt") == 5
    assert "attempts" not in called
    assert "_drive" not in called
    assert "_start" not in called  # (`_service`: what `_start` armed, read again)


class Rearranging(httpx.AsyncBaseTransport):
    """An inner transport that adds a header of its own after ours (`after`), or moves our
    two to the front (`front`), or sends them as they are (`""`)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.wire: list[list[tuple[bytes, bytes]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw = request.headers._list
        if self.how == "after":
            raw.append((b"X-Inner", b"x-inner", b"1"))
        elif self.how == "front":
            ours = [item for item in raw if item[1].startswith((b"x-fidelity", b"x-request"))]
            raw[:] = ours + [item for item in raw if item not in ours]
        self.wire.append([(item[1], item[2]) for item in raw])
        return httpx.Response(200)


@pytest.mark.parametrize("how", ["", "after", "front"])
def test_the_shortcut_takes_its_two_headers_off_wherever_the_inner_left_them(how: str) -> None:
    """The shortcut appends `x-fidelity-attempt` and `x-request-timeout-ms` and takes off
    the list's last two when they are what it appended, else both by name: the request
    after the call is the caller's (plus what the inner transport itself added)."""
    inner = Rearranging(how)
    transport = FidelityTransport(
        inner,
        engine=Engine(
            Policy(upstreams=(UpstreamConfig(host="*", protocol_headers="always"),)),
            clock=FakeClock(),
        ),
        telemetry=False,
    )

    async def go() -> list[list[tuple[bytes, bytes]]]:
        after = []
        for _ in range(4):  # (the first call arms the shortcut)
            request = httpx.Request("GET", "http://svc.internal/x", headers={"a": "b"})
            assert (await transport.handle_async_request(request)).status_code == 200
            after.append([(item[1], item[2]) for item in request.headers._list])
        return after

    after = asyncio.run(go())
    extra = [(b"x-inner", b"1")] if how == "after" else []
    for headers, wire in zip(after, inner.wire, strict=True):
        assert (b"x-fidelity-attempt", b"1") in wire
        assert any(name == b"x-request-timeout-ms" for name, _ in wire)
        assert [item for item in headers if item[0] != b"host"] == [(b"a", b"b"), *extra]
