"""The outbound layer's cuts of round 39 (issue 17, item 3), held to the same behaviour.

- A service's attempt goes to its instance through `wire.at_instance`, which replaces the
  URL's scheme, host and port with the instance's own parsed ones instead of parsing the
  whole URL again (`URL.copy_with`): the URL it builds must be the copy's, for every kind
  of URL and instance (and the request's own URL is the caller's again afterwards).
- The async transport's shortcut reads what it needs of the engine once, when it arms
  (`_Armed.seen`): a change of the engine (a policy swapped in, a test's store, clock or
  observer) drops that, and the next call decides on the new values.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.outbound import wire
from fidelity_mw.outbound.upstream import Instance
from fidelity_mw.policy import BreakerConfig, Policy, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

URLS = (
    "http://payments/pay",
    "http://payments",
    "http://payments:8080/a/b/../c?x=1&y=%20z#frag",
    "https://u:p%40w@payments/%7Ea/%zz/ü?q=ü&r",
    "http://payments/p;x?",
    "http://PAYMENTS/Path%2Fenc?a=b#",
    "https://payments:443/with%20space",
)
BASES = (
    "http://10.0.0.1:8080",
    "http://10.0.0.1:80",
    "https://10.0.0.2",
    "https://10.0.0.2:443/",
    "http://[::1]:9000",
    "https://[fe80::1]",
    "http://xn--bcher-kva.example:81",
    "http://Bücher.example",
    "http://Node-1.Internal:7000",
)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("url", URLS)
def test_the_url_sent_to_an_instance_is_the_one_copy_with_builds(url: str, base: str) -> None:
    engine = Engine(Policy(), clock=FakeClock())
    target = Instance(base, engine)
    original = httpx.URL(url)
    slow = original.copy_with(scheme=target.scheme, host=target.host, port=target.port)
    fast = wire.at_instance(original, target.address, target.scheme, target.host, target.port)
    assert target.address is not None  # (this httpx's layout is the one it reads)
    assert fast == slow
    assert tuple(fast._uri_reference) == tuple(slow._uri_reference)
    assert type(fast._uri_reference) is type(slow._uri_reference)
    assert (str(fast), fast.raw_path, fast.host, fast.port) == (
        str(slow),
        slow.raw_path,
        slow.host,
        slow.port,
    )
    assert str(original) == str(httpx.URL(url))  # the caller's URL untouched


def test_a_relative_url_or_an_unknown_layout_takes_the_copy() -> None:
    engine = Engine(Policy(), clock=FakeClock())
    target = Instance("http://10.0.0.1:8080", engine)
    relative = httpx.URL("/only/a/path?q=1")
    slow = relative.copy_with(scheme=target.scheme, host=target.host, port=target.port)
    fast = wire.at_instance(relative, target.address, target.scheme, target.host, target.port)
    assert tuple(fast._uri_reference) == tuple(slow._uri_reference)
    url = httpx.URL("http://payments/x")
    copied = wire.at_instance(url, None, target.scheme, target.host, target.port)
    assert str(copied) == "http://10.0.0.1:8080/x"


class Wire:
    """An upstream that notes the URL and SNI name each attempt was sent with."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.sent: list[tuple[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((str(request.url), request.extensions.get("sni_hostname")))
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)


def test_a_service_call_goes_to_its_instances_and_leaves_the_request_as_it_was() -> None:
    """Through the transport: each attempt's URL is the instance's (a retry's another's),
    HTTPS to an address names the service for TLS, and the request's own URL and
    extensions are the caller's again when the call is over."""
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="payments",
                instances=("https://10.0.0.1:8443", "https://10.0.0.2:8443"),
            ),
        )
    )
    engine = Engine(policy, clock=FakeClock(), rng=seeded_random(5))
    upstream = Wire(503, 200)
    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    request = httpx.Request("GET", "https://payments/pay/%7Eme?x=1")
    before = (str(request.url), dict(request.extensions))

    async def main() -> httpx.Response:
        return await transport.handle_async_request(request)

    response = asyncio.run(main())
    assert response.status_code == 200
    sent = [url for url, _ in upstream.sent]
    assert len(sent) == 2
    assert sent[0] != sent[1]
    assert {url.split("/pay")[0] for url in sent} == {
        "https://10.0.0.1:8443",
        "https://10.0.0.2:8443",
    }
    assert all(url.endswith("/pay/%7Eme?x=1") for url in sent)
    assert [sni for _, sni in upstream.sent] == ["payments", "payments"]
    assert (str(request.url), dict(request.extensions)) == before


class Store(MemoryStore):
    """A memory store that notes the keys its first-attempt gates were asked for."""

    def __init__(self, name: str) -> None:
        super().__init__(rng=seeded_random(3))
        self.name = name
        self.begun: list[str] = []

    def outbound_begin_now(self, *args: Any) -> Any:
        self.begun.append(args[0])
        return super().outbound_begin_now(*args)


class Watcher:
    """An attempt observer that counts the attempts it saw start."""

    def __init__(self) -> None:
        self.started = 0

    def attempt_start(self, ctx: Any, request: httpx.Request, attempt: int) -> Any:
        self.started += 1
        return None

    def attempt_end(self, token: Any, response: Any, error: Any) -> None:
        return None


def test_a_change_of_the_engine_is_seen_by_the_next_call_of_the_shortcut() -> None:
    """Armed once, the shortcut decides on what it read of the engine then; each change of
    the engine (a policy swapped in, a store, a clock, an observer) is seen by the very
    next call, which the shortcut serves again once armed anew."""
    first_store = Store("first")
    clock = FakeClock()
    engine = Engine(Policy(), clock=clock, store=first_store)
    statuses: list[int] = []
    wire_timeouts: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        wire_timeouts.append(request.headers.get("x-request-timeout-ms"))
        return httpx.Response(statuses.pop(0) if statuses else 200)

    transport = FidelityTransport(httpx.MockTransport(answer), engine=engine, telemetry=False)
    url = "http://svc.internal/x"
    handled: list[int] = []
    original_handle = transport._handle

    async def counting(request: httpx.Request) -> httpx.Response:
        handled.append(1)
        return await original_handle(request)

    transport._handle = counting  # type: ignore[method-assign]

    async def call() -> httpx.Response:
        return await transport.handle_async_request(httpx.Request("GET", url))

    async def main() -> list[Any]:
        seen: list[Any] = []
        await call()  # arms the shortcut (through `_handle`)
        response = await call()  # the shortcut's
        seen.append((len(handled), response.extensions["fidelity_context"].started_at))

        # a policy swapped in: its attempt timeout (the header) and no breaker
        engine.policy = Policy(
            upstreams=(UpstreamConfig(host="*", attempt_timeout_ms=2000, breaker=None),)
        )
        await call()
        seen.append(len(handled))
        await call()
        seen.append(len(handled))

        # a store swapped in (a test's fresh state): the next gate is on it
        engine.policy = Policy(upstreams=(UpstreamConfig(host="*", breaker=BreakerConfig()),))
        await call()
        second_store = Store("second")
        engine.store = second_store
        await call()
        await call()
        seen.append((len(first_store.begun), len(second_store.begun)))

        # a clock swapped in: the next call's context starts on it
        later = FakeClock(start=5000.0)
        engine.clock = later
        response = await call()
        seen.append(response.extensions["fidelity_context"].started_at)
        response = await call()
        seen.append(response.extensions["fidelity_context"].started_at)

        # an observer set on the engine: the next attempt is watched
        watcher = Watcher()
        engine.attempt_observer = watcher  # type: ignore[assignment]
        await call()
        await call()
        seen.append(watcher.started)
        return seen

    seen = asyncio.run(main())
    # the second call was the shortcut's; after each change one call re-arms it
    assert seen[0] == (1, clock.monotonic())
    assert seen[1:3] == [2, 2]
    assert wire_timeouts[:2] == ["9750", "9750"]
    assert wire_timeouts[2:4] == ["1800", "1800"]
    # five first attempts begun on the first store (the request counted on its budget,
    # with a breaker or without), then each call after the swap on the second one
    assert seen[3] == (5, 2)
    assert seen[4:6] == [5000.0, 5000.0]
    assert seen[6] == 2


class Injecting:
    """An attempt observer that injects trace context as OpenTelemetry's propagator does
    (`headers[key] = value`: the caller's own replaced in place, a new one appended)."""

    def __init__(self) -> None:
        self.ended = 0

    def attempt_start(self, ctx: Any, request: httpx.Request, attempt: int) -> Any:
        request.headers["traceparent"] = f"00-{attempt:032x}-{attempt:016x}-01"
        request.headers["baggage"] = "k=v"
        return attempt

    def attempt_end(self, token: Any, response: Any, error: Any) -> None:
        self.ended += 1


@pytest.mark.parametrize("deadline_ms", [None, 500.0])
def test_what_an_observer_injects_is_sent_and_taken_off_again(deadline_ms: float | None) -> None:
    """The shortcut gives the request back with the caller's headers as they were (its
    own trace context too), after an attempt that carried the observer's and ours; so
    too when the deadline caps the attempt (the headers are stamped another way)."""
    from fidelity_mw.context import _CURRENT, DecisionContext

    clock = FakeClock()
    engine = Engine(Policy(), clock=clock)
    sent: list[list[tuple[str, str]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(list(request.headers.items()))
        return httpx.Response(200)

    observer = Injecting()
    transport = FidelityTransport(
        httpx.MockTransport(answer), engine=engine, observer=observer, telemetry=False
    )
    own = [("x-caller", "1"), ("traceparent", "00-caller-01")]

    async def main() -> list[list[tuple[str, str]]]:
        after = []
        for _ in range(3):  # the first call arms the shortcut, the others take it
            request = httpx.Request("GET", "http://svc.internal/x", headers=own)
            ctx = DecisionContext(engine, "/r", "GET", clock.monotonic())
            if deadline_ms is not None:
                ctx.deadline_at = clock.monotonic() + deadline_ms / 1000.0
            token = _CURRENT.set(ctx)
            try:
                response = await transport.handle_async_request(request)
            finally:
                _CURRENT.reset(token)
            assert response.status_code == 200
            after.append(list(request.headers.items()))
        return after

    after = asyncio.run(main())
    assert after == [[("host", "svc.internal"), *own]] * 3
    assert observer.ended == 3
    for headers in sent:
        names = [name for name, _ in headers]
        assert names[:3] == ["host", "x-caller", "traceparent"]
        assert headers[2][1] == "00-00000000000000000000000000000001-0000000000000001-01"
        assert set(names[3:]) == {"x-fidelity-attempt", "x-request-timeout-ms", "baggage"}
