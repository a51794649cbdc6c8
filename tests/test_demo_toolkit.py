"""`fidelity-mw demo --variants toolkit`: the front built on nopanic, an all-in-one toolkit.

The front's layers on a mock fleet (nopanic's injectable clock, `testing.instant()`
for its backoff: nothing sleeps), the decisions they log from nopanic's event
stream, the `--variants` option, and one shortened run on real servers whose
assertions are counts that do not depend on timing (docs/demo.md, "(c) toolkit").
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from nopanic import testing as nopanic_testing

from fidelity_mw.demo import _variants
from fidelity_mw.demo.clients import schedule
from fidelity_mw.demo.metrics import VariantResult
from fidelity_mw.demo.records import CURRENT_RECORD, FrontRecord, RunClock
from fidelity_mw.demo.report import render_table
from fidelity_mw.demo.scenario import ScenarioConfig
from fidelity_mw.demo.toolkit import ToolkitCaller, ToolkitLimiter
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools import cli

NAMES = ("up-a", "up-b", "up-c")
URLS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
PORTS = {9001: "up-a", 9002: "up-b", 9003: "up-c"}


def _run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["demo", *args])
    return code, out.getvalue(), err.getvalue()


class Fleet:
    """A mock fleet: which instance each call reached, and what each instance answers."""

    def __init__(self, status: Callable[[str], int]) -> None:
        self.status = status
        self.calls: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        name = PORTS[request.url.port or 0]
        self.calls.append(name)
        return httpx.Response(self.status(name))


def _caller(fleet: Fleet, clock: FakeClock, cfg: ScenarioConfig) -> ToolkitCaller:
    return ToolkitCaller(
        cfg,
        URLS,
        NAMES,
        RunClock(),
        transport=httpx.MockTransport(fleet.handler),
        policy_clock=clock.monotonic,
    )


async def _call(caller: ToolkitCaller) -> tuple[Any, FrontRecord]:
    record = FrontRecord(1, "c00", 0.0, True)
    token = CURRENT_RECORD.set(record)
    try:
        result = await caller.call()
    finally:
        CURRENT_RECORD.reset(token)
    return result, record


def _verdicts(record: FrontRecord) -> list[tuple[str, str, str]]:
    return [(d.layer, d.subject, d.verdict) for d in record.decisions]


def test_a_retry_goes_to_the_next_instance_in_the_rotation(clock: FakeClock) -> None:
    fleet = Fleet(lambda name: 503 if name == "up-a" else 200)

    async def scenario() -> tuple[Any, FrontRecord]:
        caller = _caller(fleet, clock, ScenarioConfig())
        try:
            with nopanic_testing.instant() as sleeps:
                outcome = await _call(caller)
            assert len(sleeps) == 1  # one backoff, skipped
            return outcome
        finally:
            await caller.aclose()

    result, record = asyncio.run(scenario())
    assert result.ok
    assert fleet.calls == ["up-a", "up-b"]
    # the decisions the front logged, nopanic's retry among them (from its event stream)
    assert _verdicts(record) == [
        ("lb", "up-a", "allow"),
        ("breaker", "up-a", "allow"),
        ("retry", "upstream", "retry"),
        ("lb", "up-b", "allow"),
        ("breaker", "up-b", "allow"),
    ]
    assert record.decisions[2].reason == "attempt 1: status_503"
    assert not any(d.stale for d in record.decisions)


def test_the_rotation_skips_an_instance_whose_breaker_is_open(clock: FakeClock) -> None:
    # up-a fails every call, up-b and up-c are healthy. Knobs of a 12 s run: min 5 calls,
    # window 1 s, open 1 s, so the budget allows 3 retries/s + 20 % of requests.
    cfg = ScenarioConfig(duration_s=12.0)
    fleet = Fleet(lambda name: 503 if name == "up-a" else 200)

    async def scenario() -> list[tuple[Any, FrontRecord, list[str]]]:
        caller = _caller(fleet, clock, cfg)
        outcomes = []
        try:
            with nopanic_testing.instant():
                for i in range(15):
                    if i == 14:
                        clock.advance(cfg.breaker_open_s)  # up-a's open time is over
                    before = len(fleet.calls)
                    result, record = await _call(caller)
                    outcomes.append((result, record, fleet.calls[before:]))
                    clock.advance(0.001)
        finally:
            await caller.aclose()
        return outcomes

    outcomes = asyncio.run(scenario())
    served = [(r.ok, r.failed_by, calls) for r, _, calls in outcomes]
    assert served == [
        # up-a's 503s are retried on the next instance in the rotation
        *[(True, None, ["up-a", "up-b"]), (True, None, ["up-c"])] * 4,
        # up-a's 5th failure opens its breaker; the budget is spent: no retry
        (False, "upstream", ["up-a"]),
        (True, None, ["up-b"]),
        (True, None, ["up-c"]),
        # the rotation's next pick is up-a, whose breaker is open: the front skips it
        # for up-b, and no retry (no budget) is spent on a refusal
        (True, None, ["up-b"]),
        (True, None, ["up-b"]),
        (True, None, ["up-c"]),
        # up-a's open time is over: half-open, it is picked again for its probe, which
        # fails and re-opens it; the retry goes on to up-b
        (True, None, ["up-a", "up-b"]),
    ]
    assert _verdicts(outcomes[8][1])[2:] == [
        ("breaker", "up-a", "open"),
        ("budget", "upstream", "give_up"),
    ]
    skipped = outcomes[11][1]
    assert _verdicts(skipped) == [("lb", "up-b", "allow"), ("breaker", "up-b", "allow")]
    assert skipped.decisions[0].reason == "round_robin, skipped open up-a"
    # once up-a is open, no request meets its breaker's refusal or spends the budget
    assert not [
        v for _, r, _ in outcomes[9:] for v in _verdicts(r) if v[2] == "reject" or v[0] == "budget"
    ]
    probe = outcomes[14][1]
    assert _verdicts(probe) == [
        ("lb", "up-a", "allow"),
        ("breaker", "up-a", "probe"),
        ("breaker", "up-a", "open"),
        ("retry", "upstream", "retry"),
        ("lb", "up-b", "allow"),
        ("breaker", "up-b", "allow"),
    ]
    assert not any(d.stale for _, r, _ in outcomes for d in r.decisions)


def test_every_breaker_open_the_rotation_picks_as_before_and_the_breaker_refuses(
    clock: FakeClock,
) -> None:
    # The whole fleet fails: every breaker opens, so there is nothing to skip to.
    cfg = ScenarioConfig(duration_s=12.0)
    fleet = Fleet(lambda name: 503)

    async def scenario() -> tuple[Any, FrontRecord, list[str]]:
        caller = _caller(fleet, clock, cfg)
        try:
            with nopanic_testing.instant():
                for _ in range(30):
                    await _call(caller)
                    clock.advance(0.001)
                assert {caller.breakers.get(name).state for name in NAMES} == {"open"}
                before = len(fleet.calls)
                result, record = await _call(caller)
                return result, record, fleet.calls[before:]
        finally:
            await caller.aclose()

    result, record, calls = asyncio.run(scenario())
    assert (result.ok, result.failed_by, result.status, calls) == (False, "breaker", 503, [])
    lb, breaker = record.decisions[0], record.decisions[1]
    assert (lb.layer, lb.verdict, lb.reason) == ("lb", "allow", "round_robin")
    assert (breaker.layer, breaker.subject, breaker.verdict) == ("breaker", lb.subject, "reject")


def test_the_per_client_limit_is_a_token_bucket_that_keeps_no_refused_request(
    clock: FakeClock,
) -> None:
    served: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    cfg = ScenarioConfig()
    limiter = ToolkitLimiter(app, cfg=cfg, clock=RunClock(), policy_clock=clock.monotonic)

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=limiter)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as http:
            out = []
            for i in range(8):
                client = "c01" if i < 7 else "c02"
                out.append(await http.get("/work", headers={"x-client-id": client}))
            clock.advance(1.0 / cfg.limit_count)  # one token back for c01
            out.append(await http.get("/work", headers={"x-client-id": "c01"}))
            out.append(await http.get("/work", headers={"x-client-id": "c01"}))
            return out

    responses = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    # burst 5 for c01, then 429 (twice); another client has its own bucket; after
    # 0.2 s exactly one more: the two refused requests did not keep tokens
    assert statuses == [200] * 5 + [429, 429] + [200] + [200, 429]
    assert responses[5].headers["retry-after"] == "1"
    assert len(served) == 7


def test_variants_option() -> None:
    assert _variants("fidelity,toolkit,scattered") == ("scattered", "toolkit", "fidelity")
    assert _variants("toolkit") == ("toolkit",)
    code, out, err = _run_cli("--variants", "scattered,resilience4j", "--duration", "12")
    assert code == 2
    assert "argument --variants" in err
    assert out == ""


def test_the_toolkit_variant_without_nopanic_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "nopanic" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    code, out, err = _run_cli("--variants", "toolkit,fidelity", "--duration", "12")
    assert code == 2
    assert "pip install nopanic" in err
    assert out == ""


def test_the_table_has_one_column_per_variant() -> None:
    def result(name: str, label: str) -> VariantResult:
        return VariantResult(name, label, [], [], 0, {}, {}, {}, 1.0, 5, 1.0)

    results = {
        "scattered": result("scattered", "scattered layers"),
        "toolkit": result("toolkit", "toolkit (nopanic)"),
        "fidelity": result("fidelity", "fidelity_mw"),
    }
    table = render_table(results, ScenarioConfig())
    header = table.splitlines()[1]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "",
        "scattered layers",
        "toolkit (nopanic)",
        "fidelity_mw",
    ]


# ---------------------------------------------------------------- a short run, real servers


@pytest.fixture(scope="module")
def toolkit_run() -> dict[str, Any]:
    code, out, err = _run_cli(
        "--duration", "20", "--seed", "1", "--clients", "8", "--json", "--variants", "toolkit"
    )
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    v = doc["variants"]["toolkit"]
    print(  # shown by `pytest -s`, and on failure
        f"toolkit: fidelity {v['fidelity']:.3f}, amplification {v['retry_amplification']:.2f}x, "
        f"control failures while healthy {v['control_failures_while_healthy_by_layer']}, "
        f"p99 {v['latency_p99_ms']:.0f} ms, decisions {v['decisions_by_layer']}"
    )
    return doc


def test_toolkit_run_is_the_same_scenario(toolkit_run: dict[str, Any]) -> None:
    assert set(toolkit_run["variants"]) == {"toolkit"}
    assert set(toolkit_run["toolkit_layers"]) >= {"rate_limit", "retry", "breaker"}
    toolkit = toolkit_run["variants"]["toolkit"]
    # the same requests as every other variant: the schedule comes from the seed alone
    cfg = ScenarioConfig(seed=1, duration_s=20.0, clients=8)
    assert toolkit["client_requests"] == len(schedule(cfg))
    assert toolkit["upstream_calls"] == sum(toolkit["upstream_calls_by_instance"].values())


def test_toolkit_decisions_account_for_every_attempt(toolkit_run: dict[str, Any]) -> None:
    toolkit = toolkit_run["variants"]["toolkit"]
    by_layer = toolkit["decisions_by_layer"]
    assert {"ratelimit", "lb", "breaker", "retry"} <= set(by_layer)
    # One retry layer of 3 attempts, whatever the machine's load.
    assert toolkit["upstream_calls"] <= 3 * toolkit["front_requests"]
    # Every round-robin pick (open instances skipped) met its instance's breaker:
    # admitted (allow, probe) or refused (reject), with nothing in between.
    breaker = by_layer["breaker"]
    picks = sum(by_layer["lb"].values())
    assert picks == breaker.get("allow", 0) + breaker.get("probe", 0) + breaker.get("reject", 0)
    # Every front request met the limiter once.
    assert sum(by_layer["ratelimit"].values()) == toolkit["front_requests"]
    # The breaker transitions in the JSON are the ones the decisions show.
    openings = [e for e in toolkit["breaker_events"] if e["event"].endswith("-> open")]
    assert len(openings) == breaker.get("open", 0)
    assert {e["instance"] for e in openings} <= {"up-a", "up-b", "up-c"}
    # nopanic's state is in this process, read live: no decision on stale data.
    assert toolkit["stale_decisions"] == 0
    assert set(toolkit["control_failures_while_healthy_by_layer"]) <= {
        "breaker",
        "ratelimit",
        "deadline",
    }
