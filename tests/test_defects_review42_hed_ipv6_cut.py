"""Review 42 (hed42): a body cut by the request's deadline, from an IPv6 upstream with a port.

rev41 left it: `Watch.cut_by_deadline` (outbound/body.py) judged whether the deadline
was at least half the upstream's attempt timeout by parsing the watch's subject back into
a host, and `fd00::5:8080` cannot say whether it ends in a port: the subject was looked
up whole, matched no `[[upstream]]`, and the default entry's attempt timeout (10 s) was
used instead of the entry's. A trickling body cut by a 2 s deadline from an entry with a
1 s attempt timeout was then taken for the caller's short deadline and counted nothing.
The transport now carries the attempt timeout of the plan the call used on the watch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.outbound import body as body_module
from fidelity_mw.policy import DeadlineConfig, Policy, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

DEADLINE_MS = 2_000  # at least half of the entry's 1 s attempt timeout, not of the default's 10 s


class Trickle(httpx.AsyncByteStream, httpx.SyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"a"

    def __iter__(self) -> Iterator[bytes]:
        yield b"a"


def _answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, stream=Trickle())


def _engine(host: str, **entry: object) -> tuple[Engine, FakeClock]:
    clock = FakeClock()
    entry.setdefault("attempt_timeout_ms", 1_000)
    policy = Policy(
        upstreams=(UpstreamConfig(host=host, **entry),),  # type: ignore[arg-type]
        deadline=DeadlineConfig(default_ms=DEADLINE_MS),
    )
    return Engine(policy, clock=clock, store=MemoryStore()), clock


def _watch(response: httpx.Response) -> body_module.Watch:
    watch = response.stream._watch  # type: ignore[attr-defined]
    assert isinstance(watch, tuple)
    return watch  # type: ignore[return-value]


def _cut(response: httpx.Response, clock: FakeClock) -> bool:
    watch = _watch(response)
    ctx = watch.ctx
    assert isinstance(ctx, DecisionContext)
    assert ctx.deadline_at is not None
    clock.advance(ctx.deadline_at - clock.monotonic())  # the deadline passes mid-body
    return watch.cut_by_deadline()


URLS = [
    ("fd00::5", "http://[fd00::5]:8080/x"),
    ("fd00::5", "http://[fd00::5]/x"),
    ("10.0.4.1", "http://10.0.4.1:8080/x"),
    ("svc.internal", "http://svc.internal:8443/x"),
]


@pytest.mark.parametrize(("host", "url"), URLS)
async def test_the_async_transports_cut_reads_the_entry_of_the_host(host: str, url: str) -> None:
    engine, clock = _engine(host)
    t = FidelityTransport(httpx.MockTransport(_answer), engine=engine, telemetry=False)
    response = await t.handle_async_request(httpx.Request("GET", url))
    assert _cut(response, clock)


@pytest.mark.parametrize(("host", "url"), URLS)
def test_the_sync_transports_cut_reads_the_entry_of_the_host(host: str, url: str) -> None:
    engine, clock = _engine(host)
    t = FidelitySyncTransport(httpx.MockTransport(_answer), engine=engine, telemetry=False)
    response = t.handle_request(httpx.Request("GET", url))
    assert _cut(response, clock)


async def test_a_service_of_ipv6_instances_reads_its_entry() -> None:
    engine, clock = _engine("svc", instances=("http://[fd00::5]:8080", "http://[fd00::6]:8080"))
    t = FidelityTransport(httpx.MockTransport(_answer), engine=engine, telemetry=False)
    response = await t.handle_async_request(httpx.Request("GET", "http://svc/x"))
    assert _cut(response, clock)


async def test_a_short_deadline_still_counts_nothing() -> None:
    # the rule itself stands: a deadline under half the attempt timeout is the caller's
    engine, clock = _engine("fd00::5", attempt_timeout_ms=5_000)
    t = FidelityTransport(httpx.MockTransport(_answer), engine=engine, telemetry=False)
    response = await t.handle_async_request(httpx.Request("GET", "http://[fd00::5]:8080/x"))
    assert not _cut(response, clock)
