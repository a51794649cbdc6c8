"""docs/migration.md's slowapi, tenacity and pybreaker recipes, run next to the library
they replace on scenarios the earlier side-by-side tests did not script.

Found:
- pybreaker: the page's `breaker` table (and the one `fidelity-mw audit` printed for
  every pybreaker, aiobreaker, circuitbreaker and purgatory breaker, "the table that
  opens and waits the same way") kept the ratio rule on: an upstream failing every other
  call opened it on the 20th call and the next 100 calls (50 s) were refused, where
  pybreaker refused none. The table now says `failure_ratio = 1.0` (with `min_calls = n`
  for `fail_max` above 20); the page states the difference, and `success_threshold`,
  which has no counterpart.
- tenacity: `retry_if_exception_type(httpx.TransportError)` retried a pool timeout, a
  proxy's refusal, an unsupported scheme and a local protocol error; the transport calls
  once. The page did not say so (its table said "timeouts ... are retried").
- slowapi: the page's "No window-edge bursts" read as if GCRA were the stricter of the
  two; a client sending every 5 s gets 9 in its first minute where slowapi gave 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import CircuitOpen, FidelityTransport, Policy
from fidelity_mw.testing import FakeClock, seeded_random
from test_defects_review34_migration import _slowapi_shop, _statuses, _translated_shop
from test_defects_review44_doc_migration import GUIDE, before, blocks, section

PYBREAKER = "From pybreaker (and aiobreaker, circuitbreaker, purgatory)"


# ---------------------------------------------------------------- pybreaker


class _Breakers:
    """pybreaker on a frozen clock, and a FidelityTransport with a `breaker` table on a
    FakeClock, driven by one script of (seconds later, the upstream's answer)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, breaker: dict[str, Any], **kw: Any):
        import pybreaker

        now = [0.0]
        epoch = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

        class Frozen(dt.datetime):
            @classmethod
            def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
                return epoch + dt.timedelta(seconds=now[0])

        monkeypatch.setattr(pybreaker, "datetime", Frozen)
        self.pybreaker = pybreaker
        self.now = now
        self.theirs = pybreaker.CircuitBreaker(**kw)
        upstream = {"host": "payments.internal", "retry": {"attempts": 1}, "breaker": breaker}
        self.clock = FakeClock()
        self.answer = "ok"
        self.reached = 0

        def payments(request: httpx.Request) -> httpx.Response:
            self.reached += 1
            return httpx.Response(200 if self.answer == "ok" else 500)

        self.client = httpx.AsyncClient(
            transport=FidelityTransport(
                httpx.MockTransport(payments),
                policy=Policy.from_dict({"upstream": [upstream]}),
                clock=self.clock,
                rng=seeded_random(0),
            ),
            base_url="http://payments.internal",
        )

    def _pybreaker_reaches(self) -> bool:
        before = self.reached

        def charge() -> None:
            self.reached += 1
            if self.answer != "ok":
                raise RuntimeError("500")

        with contextlib.suppress(RuntimeError, self.pybreaker.CircuitBreakerError):
            self.theirs.call(charge)
        return self.reached > before

    def _fidelity_reaches(self) -> bool:
        before = self.reached
        with contextlib.suppress(CircuitOpen):
            asyncio.run(self.client.post("/charge"))
        return self.reached > before

    def run(self, script: list[tuple[float, str]]) -> tuple[list[bool], list[bool]]:
        theirs: list[bool] = []
        ours: list[bool] = []
        for later, answer in script:
            self.now[0] += later
            self.answer = answer
            theirs.append(self._pybreaker_reaches())
        for later, answer in script:
            self.clock.advance(later)
            self.answer = answer
            ours.append(self._fidelity_reaches())
        with contextlib.suppress(Exception):
            asyncio.run(self.client.aclose())
        return theirs, ours


def _page_breaker() -> dict[str, Any]:
    toml = blocks(section(PYBREAKER), "toml")[0]
    table: dict[str, Any] = tomllib.loads(toml)["upstream"][0]["breaker"]
    return table


# an upstream failing every other call, called every 0.5 s for a minute
HALF_FAILING = [(0.5, "fail" if i % 2 == 0 else "ok") for i in range(120)]


def test_the_pages_breaker_table_refuses_what_pybreaker_refuses_at_a_50_percent_failure_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`CircuitBreaker(fail_max=5, reset_timeout=60)` never opens on failures that
    alternate with successes. The page's table did after 20 calls (its ratio rule: half
    of at least 20 calls in 30 s) and refused the next 100 calls; with `failure_ratio =
    1.0` it refuses none, as pybreaker."""
    table = _page_breaker()
    theirs, ours = _Breakers(monkeypatch, table, fail_max=5, reset_timeout=60).run(HALF_FAILING)
    assert theirs.count(False) == 0
    assert ours == theirs

    # what the page says the table does without it: the numbers it gives
    without = {k: v for k, v in table.items() if k != "failure_ratio"}
    theirs, ours = _Breakers(monkeypatch, without, fail_max=5, reset_timeout=60).run(HALF_FAILING)
    assert ours.index(False) == 20
    assert ours[20:].count(False) == 100 == len(ours[20:])
    assert "refused\n  100 of the next 100 calls" in GUIDE
    assert "opens only where `n` failures in a row already\n  have" in GUIDE


def test_the_audits_breaker_table_is_the_pages_and_opens_as_pybreaker_above_20_failures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The audit's table for the page's "Before" is the page's table; for a `fail_max`
    above the ratio rule's 20 calls it adds `min_calls`: 25 failures in a row then
    open neither pybreaker(fail_max=30) nor the printed table (20 would, without it)."""
    import re

    from fidelity_mw.policy.model import BreakerConfig
    from fidelity_mw.tools.audit import audit_paths
    from fidelity_mw.tools.toolkits import BREAKER_MIN_CALLS

    assert BreakerConfig().min_calls == BREAKER_MIN_CALLS

    def printed(source: str) -> dict[str, Any]:
        (tmp_path / "payments.py").write_text(source, encoding="utf-8")
        findings = audit_paths([str(tmp_path)]).findings
        hints = {
            m.group(1)
            for f in findings
            if f.kind == "breaker"
            for m in [re.search(r"breaker = \{ (.*?) \}", f.replace_with)]
            if m
        }
        assert len(hints) == 1, [f.replace_with for f in findings]
        table: dict[str, Any] = tomllib.loads(f"breaker = {{ {hints.pop()} }}")["breaker"]
        return table

    assert printed("import pybreaker, requests\n" + before(PYBREAKER)) == _page_breaker()

    wide = printed(
        "import pybreaker\nb = pybreaker.CircuitBreaker(fail_max=30, reset_timeout=60)\n"
    )
    assert (wide["consecutive_failures"], wide["failure_ratio"], wide["min_calls"]) == (30, 1.0, 30)
    script = [(0.5, "fail")] * 25 + [(0.5, "ok")] * 5
    theirs, ours = _Breakers(monkeypatch, wide, fail_max=30, reset_timeout=60).run(script)
    assert theirs.count(False) == 0
    assert ours == theirs
    narrow = {k: v for k, v in wide.items() if k != "min_calls"}
    _, ours = _Breakers(monkeypatch, narrow, fail_max=30, reset_timeout=60).run(script)
    assert ours.index(False) == 20


def test_pybreakers_success_threshold_has_no_counterpart_and_the_page_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`success_threshold=2`: pybreaker stays half-open after one successful trial, so a
    failure right after it re-opens it; here the first successful probe closes the
    breaker and the failure after it is one of five in a row."""
    script = [(0.5, "fail")] * 5 + [(60.0, "ok"), (0.5, "fail"), (0.5, "ok")]
    theirs, ours = _Breakers(
        monkeypatch, _page_breaker(), fail_max=5, reset_timeout=60, success_threshold=2
    ).run(script)
    assert theirs[5:] == [True, True, False]
    assert ours[5:] == [True, True, True]
    assert "`success_threshold=k`" in section(PYBREAKER)
    assert "the first successful probe closes" in section(PYBREAKER)


# ---------------------------------------------------------------- tenacity


def _tenacity_calls(
    error: type[Exception], retry_on: type[Exception] = httpx.TransportError
) -> int:
    """Calls tenacity makes, 3 attempts at most, retrying `retry_on`, for `error`."""
    import tenacity

    calls = [0]

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        retry=tenacity.retry_if_exception_type(retry_on),
        sleep=lambda seconds: None,
        reraise=True,
    )
    def get() -> None:
        calls[0] += 1
        raise error("boom")

    with contextlib.suppress(httpx.TransportError):
        get()
    return calls[0]


def _fidelity_calls(error: type[Exception]) -> tuple[int, str]:
    retry = {"attempts": 3, "base_ms": 100, "max_ms": 2000, "jitter": "full", "on_status": []}
    return _fidelity_calls_with(error, retry)


def _fidelity_calls_with(error: type[Exception], retry: dict[str, Any]) -> tuple[int, str]:
    calls = [0]

    def users(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        raise error("boom", request=request)  # type: ignore[call-arg]

    policy = Policy.from_dict({"upstream": [{"host": "users.internal", "retry": retry}]})
    transport = FidelityTransport(httpx.MockTransport(users), policy=policy, clock=FakeClock())

    async def get() -> str:
        async with httpx.AsyncClient(transport=transport, base_url="http://users.internal") as c:
            try:
                await c.get("/users/42")
            except httpx.TransportError as exc:
                return type(exc).__name__
        return "answered"

    raised = asyncio.run(get())
    return calls[0], raised


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (httpx.ConnectError, True),
        (httpx.ConnectTimeout, True),
        (httpx.ReadTimeout, True),
        (httpx.WriteTimeout, True),
        (httpx.ReadError, True),
        (httpx.WriteError, True),
        (httpx.RemoteProtocolError, True),
        (httpx.PoolTimeout, False),
        (httpx.ProxyError, False),
        (httpx.UnsupportedProtocol, False),
        (httpx.LocalProtocolError, False),
    ],
)
def test_tenacitys_transport_errors_against_the_page(error: type[Exception], retried: bool) -> None:
    """The page's tenacity recipe (`on_status = []`) on a GET that raises `error` every
    time: tenacity calls 3 times for every transport error; the transport as often for
    the errors the page says it retries, once for those raised on this side, which the
    page now names."""
    assert _tenacity_calls(error) == 3
    assert _fidelity_calls(error) == (3 if retried else 1, error.__name__)
    if not retried:
        tenacity_section = section("From tenacity and stamina")
        assert f"`{error.__name__}`" in tenacity_section.replace(
            "`httpx.PoolTimeout`", "`PoolTimeout`"
        )


# ---------------------------------------------------------------- slowapi


def test_a_steady_client_gets_more_in_its_first_minute_than_slowapis_window_gave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A search every 5 s for 3 minutes under `5/minute`: slowapi's fixed window admits
    5 a minute; GCRA 9 in the first (its burst of 5 spent, then one unit back every 12
    s), 5 a minute after. With `burst = 1` no 60 s holds more than 6."""
    from fidelity_mw.testing import fake_time

    now = [1000.0]
    slowapi_app = _slowapi_shop(monkeypatch, now)
    ours_app = _translated_shop()
    theirs: list[int] = []
    ours: list[int] = []
    with fake_time(app=ours_app) as clock:
        for _ in range(36):
            theirs += _statuses(slowapi_app, [("GET", "/search")])
            ours += _statuses(ours_app, [("GET", "/search")])
            now[0] += 5
            clock.advance(5)

    def per_minute(statuses: list[int]) -> list[int]:
        return [statuses[i : i + 12].count(200) for i in range(0, 36, 12)]

    assert per_minute(theirs) == [5, 5, 5]
    assert per_minute(ours) == [9, 5, 5]
    assert 'slowapi admits\n  5, 5 and 5 per minute, `rate = "5/minute"` 9, 5 and 5' in GUIDE

    import starlette.applications
    import starlette.responses
    import starlette.routing

    from fidelity_mw import FidelityMiddleware

    async def search(request: Any) -> starlette.responses.Response:
        return starlette.responses.PlainTextResponse("ok")

    spaced = starlette.applications.Starlette(routes=[starlette.routing.Route("/search", search)])
    limit = {"name": "search", "match": "/search", "rate": "5/minute", "burst": 1}
    spaced.add_middleware(
        FidelityMiddleware,
        policy=Policy.from_dict({"rate_limit": [limit]}),
        clock=(spaced_clock := FakeClock()),
        telemetry=False,
    )
    admitted_at: list[int] = []
    for second in range(180):
        if _statuses(spaced, [("GET", "/search")]) == [200]:
            admitted_at.append(second)
        spaced_clock.advance(1)
    most = max(sum(1 for t in admitted_at if s <= t < s + 60) for s in range(121))
    assert most == 5  # a request every second: every 12 s, five in any 60 s
    assert max(sum(1 for t in admitted_at if s <= t <= s + 60) for s in range(121)) == 6
    assert "`burst = 1` spaces them, at most 6 in any minute" in GUIDE


def test_the_audits_slowapi_tables_with_a_month_or_a_year_load(tmp_path: Path) -> None:
    """`@limiter.limit("1000/month")` printed `rate = "1000/month"`, a table the policy
    refuses ("unknown period unit"); default and application limits the same. The audit
    now writes the days slowapi's limits library counts (30 a month, 360 a year)."""
    import re

    import limits

    from fidelity_mw.policy.model import parse_rate
    from fidelity_mw.tools.audit import audit_paths

    (tmp_path / "app.py").write_text(
        "from fastapi import FastAPI, Request\n"
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address, default_limits=['10000/year'],\n"
        "                  application_limits=['1000 per month'])\n"
        "app = FastAPI()\n"
        "@app.get('/orders')\n"
        "@limiter.limit('1000/month;5/minute')\n"
        "async def orders(request: Request):\n"
        "    return {}\n"
        "@app.get('/x')\n"
        "@limiter.limit('2 per 3 months')\n"
        "async def x(request: Request):\n"
        "    return {}\n",
        encoding="utf-8",
    )
    hints = " ".join(f.replace_with for f in audit_paths([str(tmp_path)]).findings)
    printed = re.findall(r'rate = "([^"]+)"', hints) + re.findall(
        r'fidelity\.limit\("([^"]+)"\)', hints
    )
    assert sorted(printed) == sorted(["1000/30d", "1000/30d", "5/minute", "2/90d", "10000/360d"])
    theirs = ["1000 per month", "1000/month", "5/minute", "2 per 3 months", "10000/year"]
    for rate in printed:  # each loads
        Policy.from_dict({"rate_limit": [{"name": "a", "match": "/x", "rate": rate}]})
    spans = {parse_rate(rate) for rate in printed}
    assert spans == {(limits.parse(r).amount, float(limits.parse(r).get_expiry())) for r in theirs}


def _row(first_cell: str) -> str:
    (row,) = [line for line in GUIDE.splitlines() if line.startswith(f"| {first_cell} |")]
    return row


def test_retry_if_result_alone_never_retried_an_error_and_the_pages_row_says_so() -> None:
    """`retry=retry_if_result(lambda r: r.status_code == 503)`: tenacity retries the 503
    and raises a connect error at once (the predicate never sees an exception). The
    page's row said `on_status = [503]` only, which retries the connect error 3 times;
    the audit printed the two switches off already."""
    import tenacity

    calls = [0]

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        retry=tenacity.retry_if_result(lambda r: r.status_code == 503),
        sleep=lambda seconds: None,
    )
    def get() -> httpx.Response:
        calls[0] += 1
        raise httpx.ConnectError("refused")

    with contextlib.suppress(httpx.ConnectError):
        get()
    assert calls[0] == 1

    row = _row("`retry_if_result(lambda r: r.status_code == 503)`")
    table = dict(re.findall(r"`(on_\w+) = ([^`]+)`", row))
    assert table == {"on_status": "[503]", "on_connect_error": "false", "on_read_timeout": "false"}
    retry = {"attempts": 3, "base_ms": 1, "max_ms": 1, "jitter": "none"}
    retry.update({key: tomllib.loads(f"v = {value}")["v"] for key, value in table.items()})
    ours = _fidelity_calls_with(httpx.ConnectError, retry)
    assert ours == (1, "ConnectError")
    del retry["on_connect_error"]  # the row as it was: the connect error retried
    assert _fidelity_calls_with(httpx.ConnectError, retry) == (3, "ConnectError")


@pytest.mark.parametrize(
    ("error", "tenacity_calls", "ours"),
    [
        (httpx.ConnectError, 3, 3),
        (httpx.ConnectTimeout, 1, 3),  # the difference the row states
        (httpx.ReadTimeout, 1, 1),
        (httpx.ReadError, 1, 1),
    ],
)
def test_retry_if_exception_type_connect_error_against_the_pages_row(
    error: type[Exception], tenacity_calls: int, ours: int
) -> None:
    """`retry_if_exception_type(httpx.ConnectError)` retries connect errors alone. The
    page's row said `on_connect_error = true` (the default: read timeouts and 502/503/504
    retried too); it now gives `on_status = []`, `on_read_timeout = false` and names the
    one difference left, a connect timeout."""
    assert _tenacity_calls(error, httpx.ConnectError) == tenacity_calls

    row = _row("`retry_if_exception_type(httpx.ConnectError)`")
    table = dict(re.findall(r"`(on_\w+) = ([^`]+)`", row.split(": connect errors only")[0]))
    assert table == {"on_status": "[]", "on_read_timeout": "false"}
    retry = {"attempts": 3, "base_ms": 1, "max_ms": 1, "jitter": "none"}
    retry.update({key: tomllib.loads(f"v = {value}")["v"] for key, value in table.items()})
    assert _fidelity_calls_with(error, retry) == (ours, error.__name__)
    assert "a `ConnectTimeout` too, which tenacity's `ConnectError` did not retry" in row


def test_the_audit_prints_the_connect_error_rows_table(tmp_path: Path) -> None:
    """It printed `on_status = []` alone for a condition of connect errors only (stamina's
    `on=httpx.ConnectError`, backoff's, tenacity's), which retried read timeouts too."""
    from fidelity_mw.tools.audit import audit_paths

    (tmp_path / "users.py").write_text(
        "import httpx, stamina\n"
        "from tenacity import retry, retry_if_exception_type, retry_if_result\n"
        "@retry(retry=retry_if_exception_type(httpx.ConnectError))\n"
        "def a(c): return c.get('http://users.internal/a')\n"
        "@stamina.retry(on=(httpx.ConnectError, httpx.ConnectTimeout), attempts=3)\n"
        "def b(c): return c.get('http://users.internal/b')\n"
        "@retry(retry=retry_if_exception_type(httpx.ConnectError)\n"
        "       | retry_if_result(lambda r: r.status_code == 503))\n"
        "def c(c): return c.get('http://users.internal/c')\n"
        "@retry(retry=retry_if_exception_type((httpx.ConnectError, httpx.ReadTimeout)))\n"
        "def d(c): return c.get('http://users.internal/d')\n",
        encoding="utf-8",
    )
    tables = []
    for finding in audit_paths([str(tmp_path)]).findings:
        hint = re.search(r"retry = \{ (.*?) \}", finding.replace_with)
        assert hint is not None, finding.replace_with
        table = tomllib.loads(f"retry = {{ {hint.group(1)} }}")["retry"]
        tables.append({k: v for k, v in table.items() if k.startswith("on_")})
    assert tables == [
        {"on_status": [], "on_read_timeout": False},
        {"on_status": [], "on_read_timeout": False},
        {"on_status": [503], "on_read_timeout": False},
        {"on_status": []},
    ]
