"""A whole migration, done from the docs: tests/fixtures/migration/before -> after.

`before/app.py` is an orders service the usual way (slowapi per client, tenacity, a
pybreaker breaker entered with `calling()`, a nopanic `compose(retry, circuit_breaker,
timeout)`, a hand-written retry loop, a BaseHTTPMiddleware timing requests);
`after/app.py` and `after/fidelity.toml` are what docs/migration.md and the output of
`fidelity-mw audit` / `map` led to. Both run here under the same scripted upstreams:

- healthy upstreams: the same answers, status and body;
- a failing upstream: the after-service sends no more upstream calls than the
  before-service, and answers 502/503 problem+json, never 500;
- too many requests from one client: 429 with Retry-After for that client only;
- the tools: `audit --fail-on any` finds nothing left in after/, `check` passes on its
  policy, `map` warns about nothing.

Time: `fidelity_mw.testing.fake_time(clock, app=app)` around the after-service's
requests (its middleware, added at import time, is built on the clock; its transport
sleeps on it);
in the before-service, nopanic's `testing.instant()` and a recording `asyncio.sleep`
for tenacity and the hand-written loop. Nothing waits out a backoff.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from nopanic import testing as nopanic_testing

from fidelity_mw import FidelityTransport
from fidelity_mw.testing import FakeClock, fake_time
from fidelity_mw.tools.cli import main

HERE = Path(__file__).parent / "fixtures" / "migration"
_fresh = itertools.count()

ANSWER_BODIES: dict[str, Callable[[httpx.Request], Any]] = {
    "catalog.internal": lambda r: {"id": r.url.path.rsplit("/", 1)[-1], "name": "widget"},
    "payments.internal": lambda r: {"charge": "ch_1", "status": "paid"},
    "invoices.internal": lambda r: {"id": r.url.path.rsplit("/", 1)[-1], "total": 42},
    "shipping.internal": lambda r: {"order": r.url.path.rsplit("/", 1)[-1], "eta": "2d"},
}


class Upstreams:
    """The four upstreams, scripted: each host answers, fails with a status, or refuses
    the connection; every call is counted per host."""

    def __init__(self, faults: dict[str, int | str] | None = None) -> None:
        self.faults = faults or {}
        self.calls: Counter[str] = Counter()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls[host] += 1
        fault = self.faults.get(host)
        if fault == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(fault, int):
            return httpx.Response(fault, json={"error": "down"})
        if request.url.path.endswith("/missing"):
            return httpx.Response(404, json={"error": "not found"})
        return httpx.Response(200, json=ANSWER_BODIES[host](request))


class Service:
    """One variant's app, loaded fresh (its limiters and breakers are module state),
    with its httpx client sent to `upstreams`."""

    def __init__(self, variant: str, upstreams: Upstreams) -> None:
        self.variant = variant
        self.upstreams = upstreams
        self.module = _load(variant)
        mock = httpx.MockTransport(upstreams)
        self.clock = FakeClock()
        if variant == "after":
            # the module's client is httpx.AsyncClient(transport=FidelityTransport()):
            # the same, around the scripted upstreams instead of the network
            self.module.http = httpx.AsyncClient(transport=FidelityTransport(mock), timeout=5.0)
        else:
            self.module.http = httpx.AsyncClient(transport=mock, timeout=5.0)
        self.sleeps: list[float] = []

    @contextmanager
    def _time(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        if self.variant == "after":
            # the app's code untouched: its middleware, added at import time, is built
            # in the block (app=: its stack rebuilt there), on this clock
            with fake_time(self.clock, app=self.module.app):
                yield
            return
        real_sleep = asyncio.sleep

        async def recorded(seconds: float, result: Any = None) -> Any:
            self.sleeps.append(seconds)
            return await real_sleep(0, result)

        with monkeypatch.context() as patch, nopanic_testing.instant() as waits:
            patch.setattr(asyncio, "sleep", recorded)  # tenacity and the loop look it up
            yield
        self.sleeps.extend(waits)

    def run(
        self,
        monkeypatch: pytest.MonkeyPatch,
        requests: list[tuple[str, str, str, Any]],
    ) -> list[httpx.Response]:
        """Send (client_ip, method, path, json) in order; each client has its address."""

        async def send() -> list[httpx.Response]:
            answers = []
            for client_ip, method, path, body in requests:
                transport = httpx.ASGITransport(app=self.module.app, client=(client_ip, 40000))
                async with httpx.AsyncClient(transport=transport, base_url="http://orders") as c:
                    answers.append(await c.request(method, path, json=body))
            return answers

        with self._time(monkeypatch):
            return asyncio.run(send())


def _load(variant: str) -> ModuleType:
    path = HERE / variant / "app.py"
    spec = importlib.util.spec_from_file_location(f"_migration_{variant}_{next(_fresh)}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEALTHY_REQUESTS = [
    ("10.0.0.1", "GET", "/api/products/7", None),
    ("10.0.0.1", "GET", "/api/products/missing", None),
    ("10.0.0.1", "POST", "/api/orders", {"product_id": "7", "quantity": 2}),
    ("10.0.0.1", "POST", "/api/orders", {"product_id": "x"}),
    ("10.0.0.1", "POST", "/api/orders", {"quantity": 1}),  # invalid: 422
    ("10.0.0.1", "GET", "/api/invoices/inv-3", None),
    ("10.0.0.1", "GET", "/api/orders/o-9/tracking", None),
    ("10.0.0.1", "GET", "/healthz", None),
]


def test_healthy_upstreams_get_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {}
    calls = {}
    for variant in ("before", "after"):
        service = Service(variant, Upstreams())
        answers[variant] = [
            (r.status_code, r.json()) for r in service.run(monkeypatch, HEALTHY_REQUESTS)
        ]
        calls[variant] = service.upstreams.calls
        assert service.sleeps == []
        assert service.clock.sleeps == []
    assert answers["after"] == answers["before"]
    assert [status for status, _ in answers["after"]] == [200, 404, 201, 201, 422, 200, 200, 200]
    assert calls["after"] == calls["before"]


def _many(method: str, path: str, body: Any = None, n: int = 30) -> list[tuple[str, str, str, Any]]:
    """n requests, each from a client of its own: no per-client limit is reached."""
    return [(f"10.1.{i // 200}.{i % 200 + 1}", method, path, body) for i in range(n)]


FAILURES = [
    pytest.param("catalog.internal", 503, _many("GET", "/api/products/7"), id="catalog-503"),
    pytest.param("catalog.internal", "connect", _many("GET", "/api/products/7"), id="catalog-down"),
    pytest.param(
        "payments.internal",
        500,
        _many("POST", "/api/orders", {"product_id": "7"}),
        id="payments-500",
    ),
    pytest.param(
        "payments.internal",
        "connect",
        _many("POST", "/api/orders", {"product_id": "7"}),
        id="payments-down",
    ),
    pytest.param("invoices.internal", 503, _many("GET", "/api/invoices/inv-3"), id="invoices-503"),
    pytest.param(
        "invoices.internal", "connect", _many("GET", "/api/invoices/inv-3"), id="invoices-down"
    ),
    pytest.param(
        "shipping.internal", 503, _many("GET", "/api/orders/o-9/tracking"), id="shipping-503"
    ),
    pytest.param(
        "shipping.internal", "connect", _many("GET", "/api/orders/o-9/tracking"), id="shipping-down"
    ),
]


@pytest.mark.parametrize(("host", "fault", "requests"), FAILURES)
def test_a_failing_upstream_costs_no_more_calls_and_is_answered_502_or_503(
    host: str, fault: int | str, requests: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = Service("before", Upstreams({host: fault}))
    after = Service("after", Upstreams({host: fault}))
    before.run(monkeypatch, requests)
    answered = after.run(monkeypatch, requests)

    assert after.upstreams.calls[host] <= before.upstreams.calls[host]
    if host != "payments.internal":  # retried (a POST is sent once): waited on the clock
        assert after.clock.sleeps
    for response in answered:
        assert response.status_code in (502, 503), response.text
        assert response.headers["content-type"] == "application/problem+json"
    # the breaker opened (or the budget ran out) well before the last request
    assert answered[-1].status_code == 503
    assert "retry-after" in answered[-1].headers


def test_one_client_over_its_limit_is_refused_with_429_and_retry_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = {"product_id": "7"}
    requests = (
        [("10.0.0.1", "POST", "/api/orders", order)] * 4
        + [("10.0.0.2", "POST", "/api/orders", order)]
        + [("10.0.0.1", "GET", "/api/products/7", None)] * 11
        + [("10.0.0.1", "GET", "/api/invoices/inv-3", None)] * 61
        + [("10.0.0.2", "GET", "/api/invoices/inv-3", None)]
        + [("10.0.0.1", "GET", "/healthz", None)] * 70
    )
    service = Service("after", Upstreams())
    answered = service.run(monkeypatch, requests)
    statuses = [r.status_code for r in answered]
    assert statuses[:5] == [201, 201, 201, 429, 201]  # 3/min for 10.0.0.1; 10.0.0.2 served
    assert statuses[5:16] == [200] * 10 + [429]  # 10/min on products
    assert statuses[16:78] == [200] * 60 + [429, 200]  # the per-route default, 60/min
    assert statuses[78:] == [200] * 70  # /healthz was exempt
    for refused in (answered[3], answered[15], answered[76]):
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) > 0
    assert service.upstreams.calls["payments.internal"] == 4  # the refused order never left


def test_the_tools_find_nothing_left_to_migrate(capsys: pytest.CaptureFixture[str]) -> None:
    before, after = str(HERE / "before"), str(HERE / "after")
    assert main(["audit", before, "--fail-on", "any"]) == 1
    assert main(["audit", after, "--fail-on", "any"]) == 0
    assert main(["check", "--strict", str(HERE / "after" / "fidelity.toml")]) == 0
    capsys.readouterr()
    assert main(["map", f"{HERE / 'after' / 'app.py'}:app"]) == 0
    assert "WARNINGS (0)" in capsys.readouterr().out
