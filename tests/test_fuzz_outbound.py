"""Fuzzing what upstreams send back, through the real FidelityTransport.

Scripted upstreams (httpx.MockTransport) answer any status with any
`Retry-After` and `x-fidelity-retry` bytes, or fail with connect errors,
timeouts and broken connections, in any order. Whatever they do:

- the call ends with one response or one `httpx.HTTPError` (fidelity_mw's own
  errors are httpx errors too), never anything else;
- at most `attempts` attempts; a POST without Idempotency-Key exactly one;
- no backoff sleep is negative or longer than `retry_after_max_s`, and the
  sleeps together never pass the deadline;
- a >= 500 answer carrying `x-fidelity-retry: exhausted` from a trusted peer
  is never retried.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fidelity_mw import (
    DeadlineConfig,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

ATTEMPTS = 4
RETRY_AFTER_MAX_S = 20.0
DEADLINE_S = 30.0

retry_after_values = st.one_of(
    st.none(),
    st.sampled_from(
        [
            b"0",
            b"1",
            b"5",
            b"25",
            b"1.5",
            b"-1",
            b"+5",
            b"1e3",
            b"99999999999999999999",
            b"nan",
            b"Wed, 21 Oct 2015 07:28:00 GMT",
            b"Fri, 31 Dec 9999 23:59:59 GMT",
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            b"Sun Nov  6 08:49:37 1994",
            b"Tue, 14 Nov 2023 22:13:30 GMT",
            b"Mon, 32 Foo 2023 99:99:99 GMT",
            b"\xff\xfe",
            b"",
            b" 3 ",
            b"3, 4",
        ]
    ),
    st.binary(max_size=30),
    st.integers(-5, 100).map(lambda n: str(n).encode()),
)
signal_values = st.one_of(
    st.none(),
    st.sampled_from([b"exhausted", b"EXHAUSTED", b" exhausted ", b"exhausted, x", b"no", b"\xff"]),
    st.binary(max_size=12),
)
outcomes = st.one_of(
    st.tuples(
        st.sampled_from([200, 201, 400, 404, 429, 500, 502, 503, 504]),
        retry_after_values,
        signal_values,
    ),
    st.sampled_from(["connect", "read_timeout", "reset", "pool"]),
)


class Script:
    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps
        self.calls: list[dict[str, str]] = []  # the headers each attempt carried

    def __call__(self, request: httpx.Request) -> httpx.Response:
        step = self.steps[min(len(self.calls), len(self.steps) - 1)]
        self.calls.append(dict(request.headers))
        if step == "connect":
            raise httpx.ConnectError("refused", request=request)
        if step == "read_timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if step == "reset":
            raise httpx.RemoteProtocolError("peer closed", request=request)
        if step == "pool":
            raise httpx.PoolTimeout("pool full", request=request)
        status, retry_after, signal = step
        headers = []
        if retry_after is not None:
            headers.append((b"retry-after", retry_after))
        if signal is not None:
            headers.append((b"x-fidelity-retry", signal))
        return httpx.Response(status, headers=headers, content=b"body")


def _exhausted(step: Any) -> bool:
    if not isinstance(step, tuple):
        return False
    status, _, signal = step
    if status < 500 or signal is None:
        return False
    try:
        text = signal.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        return False
    return text.strip().lower() == "exhausted"


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    steps=st.lists(outcomes, min_size=1, max_size=ATTEMPTS + 1),
    method=st.sampled_from(["GET", "PUT", "DELETE", "POST", "PATCH"]),
    idempotency_key=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_any_upstream_behaviour_ends_in_one_answer(
    steps: list[Any], method: str, idempotency_key: bool, seed: int
) -> None:
    script = Script(steps)
    clock = FakeClock()
    policy = Policy(
        deadline=DeadlineConfig(default_ms=int(DEADLINE_S * 1000)),
        upstreams=(
            UpstreamConfig(
                retry=RetryConfig(
                    attempts=ATTEMPTS,
                    base_ms=50,
                    max_ms=1_000,
                    retry_after_max_s=RETRY_AFTER_MAX_S,
                    budget_min_per_s=100.0,
                ),
                breaker=None,
            ),
        ),
    )
    transport = FidelityTransport(
        inner=httpx.MockTransport(script),
        policy=policy,
        clock=clock,
        rng=seeded_random(seed),
        telemetry=False,
    )
    headers = {"idempotency-key": "k-1"} if idempotency_key else {}

    async def call() -> httpx.Response | BaseException:
        async with httpx.AsyncClient(transport=transport) as client:
            try:
                return await client.request(
                    method, "http://127.0.0.1:9/x", headers=headers, content=b"payload"
                )
            except httpx.HTTPError as exc:
                return exc

    answer = asyncio.run(call())
    event(type(answer).__name__)
    assert isinstance(answer, httpx.Response | httpx.HTTPError)
    n = len(script.calls)
    assert 1 <= n <= ATTEMPTS
    idempotent = idempotency_key or method in ("GET", "PUT", "DELETE")
    if not idempotent:
        assert n == 1, "a non-idempotent request was sent twice"
    for sleep in clock.sleeps:
        assert 0.0 <= sleep <= max(RETRY_AFTER_MAX_S, 1.0) + 1e-9
    assert sum(clock.sleeps) <= DEADLINE_S + 1e-9
    for i, request in enumerate(script.calls):
        assert request["x-fidelity-attempt"] == str(i + 1)
        assert 0 < float(request["x-request-timeout-ms"]) <= DEADLINE_S * 1000
    # a trusted upstream that said "exhausted" is never retried
    for i in range(n - 1):
        step = steps[min(i, len(steps) - 1)]
        assert not _exhausted(step), (i, step)
