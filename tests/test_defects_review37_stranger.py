"""A host the client names (`client_chosen`) is a stranger wherever it resolves.

A webhook target or callback URL the client gave may be an address inside
`trusted_peers` (a request forgery aimed at an internal service): under
`protocol_headers = "auto"` it got our cross-service headers (our retry counts and
deadlines), and its replies' markers were believed (`x-fidelity-fault: upstream` made our
breaker ignore its failures).
"""

from __future__ import annotations

import httpx
import pytest

from fidelity_mw import CircuitOpen, FidelityTransport, Policy
from fidelity_mw.policy import BreakerConfig, RetryConfig, UpstreamConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

OURS = ("x-fidelity-attempt", "x-request-timeout-ms")
BREAKER = BreakerConfig(consecutive_failures=3, min_calls=1000, open_s=60.0, open_min_s=60.0)
NO_RETRY = RetryConfig(attempts=1)


class Upstream:
    """Answers 503 saying the fault is its own upstream's; notes each attempt's headers."""

    def __init__(self) -> None:
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers.copy())
        return httpx.Response(503, headers={"x-fidelity-fault": "upstream"})


def _transport(upstream: Upstream, *, chosen: bool) -> FidelityTransport:
    entry = UpstreamConfig(host="*", retry=NO_RETRY, breaker=BREAKER, client_chosen=chosen)
    return FidelityTransport(
        httpx.MockTransport(upstream), policy=Policy(upstreams=(entry,)), clock=FakeClock(),
        telemetry=False,
    )  # fmt: skip


async def _five_calls(transport: FidelityTransport, url: str) -> list[int | str]:
    seen: list[int | str] = []
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(5):
            try:
                seen.append((await client.get(url)).status_code)
            except CircuitOpen:
                seen.append("open")
    return seen


@pytest.mark.parametrize("url", ["http://10.0.0.5:8080/hook", "http://payments.internal/hook"])
async def test_a_client_chosen_host_never_hears_our_headers(url: str) -> None:
    upstream = Upstream()
    await _five_calls(_transport(upstream, chosen=True), url)
    assert upstream.headers
    assert not [h for h in upstream.headers if any(n in h for n in OURS)]
    ours = Upstream()
    await _five_calls(_transport(ours, chosen=False), url)
    assert ours.headers
    assert all(all(n in h for n in OURS) for h in ours.headers)


async def test_a_client_chosen_hosts_markers_are_not_believed() -> None:
    url = "http://10.0.0.5:8080/hook"  # inside the default trusted_peers
    # Ours: the marker says the fault is further down, so our breaker for it stays closed.
    assert await _five_calls(_transport(Upstream(), chosen=False), url) == [503] * 5
    # The client's: its marker is no evidence, three failures in a row open the breaker.
    chosen = await _five_calls(_transport(Upstream(), chosen=True), url)
    assert chosen == [503, 503, 503, "open", "open"]


async def test_protocol_headers_always_still_wins() -> None:
    upstream = Upstream()
    entry = UpstreamConfig(
        host="*", retry=NO_RETRY, breaker=None, client_chosen=True, protocol_headers="always"
    )
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=Policy(upstreams=(entry,)), clock=FakeClock(),
        telemetry=False,
    )  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("https://hooks.example.com/")).status_code == 503
    assert [all(n in h for n in OURS) for h in upstream.headers] == [True]
