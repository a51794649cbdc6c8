"""One breaker owns a fault across hops: real uvicorn chains of 3 and 4 services.

The leaf fails (503) for a while, then recovers. Only the hop next to the
leaf opens its breaker; the hops above see its marked refusals
(`x-fidelity-retry: exhausted`), which are no evidence against their callee,
so their breakers stay closed and nothing waits out a second open time.
Checked by counts: every request sent at least 0.5 s after the recovery
succeeds, and the leaf sees at most 3 calls per top-level request (0.5 on
average) during the fault. Time only enters as the recovery margin.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from _loopback import LoopbackServer
from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.errors import FidelityError

ATTEMPTS = 3
RECOVERY_MARGIN_S = 0.5
FAULT_S = 1.5
AFTER_S = 1.5
PAUSE_S = 0.01  # between top-level requests


class Leaf:
    """The last service: 503 while `failing`, else 200; counts its calls."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.calls += 1
        status = 503 if self.failing else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"leaf"})


def hop_policy() -> Policy:
    breaker = BreakerConfig(
        consecutive_failures=3, min_calls=5, window_s=5.0, open_s=0.3, open_jitter=0.0,
        half_open_probes=1,
    )  # fmt: skip
    retry = RetryConfig(attempts=ATTEMPTS, base_ms=2, max_ms=5)
    # The route breaker counts the route's own faults (500); an upstream's failure
    # answered 502 is the host breaker's evidence, not a second breaker's.
    route = BreakerConfig(failure_statuses=(500,))
    return Policy(
        breaker=route, upstreams=(UpstreamConfig(host="*", retry=retry, breaker=breaker),)
    )


def hop(next_url: str) -> Any:
    """A service that calls the next one through FidelityTransport, under FidelityMiddleware."""
    client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False), timeout=5.0)

    async def handler(request: Request) -> Response:
        try:
            upstream = await client.get(next_url)
        except FidelityError as exc:  # refused before sending: our control layer decided
            wait = getattr(exc, "retry_after_s", None) or 1.0
            return Response(b"shed", 503, headers={"retry-after": str(max(1, round(wait)))})
        await upstream.aclose()
        return Response(b"ok" if upstream.status_code < 500 else b"upstream failed",
                        200 if upstream.status_code < 500 else 502)  # fmt: skip

    app = Starlette(routes=[Route("/", handler)])
    return FidelityMiddleware(app, policy=hop_policy(), telemetry=False)


@contextmanager
def chain(hops: int) -> Iterator[tuple[Leaf, str]]:
    """`hops` services in a row, the last one the leaf; yields (leaf, the first one's URL)."""
    leaf = Leaf()
    with ExitStack() as stack:
        url = stack.enter_context(LoopbackServer(leaf)).url + "/"
        for _ in range(hops - 1):
            url = stack.enter_context(LoopbackServer(hop(url))).url + "/"
        yield leaf, url


def run(hops: int) -> tuple[list[int], list[int], list[tuple[float, int]]]:
    """Drive the chain through a fault and a recovery.

    Returns the leaf calls and the status of each top-level request sent during
    the fault, and (seconds after the recovery it was sent, status) of each one
    sent after it.
    """
    during: list[int] = []
    statuses: list[int] = []
    after: list[tuple[float, int]] = []
    with chain(hops) as (leaf, url), httpx.Client(timeout=10.0) as client:
        client.get(url)  # the first call opens the connections (and meets the fault)
        start = time.monotonic()
        while time.monotonic() - start < FAULT_S:
            before = leaf.calls
            statuses.append(client.get(url).status_code)
            during.append(leaf.calls - before)
            time.sleep(PAUSE_S)
        leaf.failing = False
        recovered = time.monotonic()
        while time.monotonic() - recovered < AFTER_S:
            sent = time.monotonic() - recovered
            after.append((sent, client.get(url).status_code))
            time.sleep(PAUSE_S)
    return during, statuses, after


@pytest.mark.parametrize("hops", [3, 4])
def test_only_the_hop_next_to_the_fault_opens_and_recovery_is_prompt(hops: int) -> None:
    during, statuses, after = run(hops)
    late = [status for sent, status in after if sent >= RECOVERY_MARGIN_S]
    print(
        f"\n{hops} hops: {len(during)} requests during the fault, leaf calls max "
        f"{max(during)} avg {sum(during) / len(during):.3f}; after recovery "
        f"{[s for _, s in after][:12]}..., {len(late)} sent >= {RECOVERY_MARGIN_S} s after"
    )
    assert len(during) >= 10
    # the hop next to the leaf answered every one (its give-up or its breaker's shed,
    # both marked): no hop above it ever refused, so no breaker above it opened
    assert set(statuses) == {502}
    assert max(during) <= ATTEMPTS
    assert sum(during) / len(during) <= 0.5
    assert late  # the run reached past the margin
    assert late == [200] * len(late)
