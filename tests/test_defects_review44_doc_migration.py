"""docs/migration.md's slowapi, tenacity and pybreaker sections: the "Before" code as the
page prints it, run on the real library, against the "After" the page gives.

The other migration tests (test_defects_review32_user, test_defects_review34_migration,
test_migration_walkthrough) run copies shaped like the page's; these read the blocks out
of the page, so a "Before" that is not the library's API, or an "After" that does not do
what its "Before" did, fails here. Only what a test cannot have is replaced: slowapi's
Redis `storage_uri` (memory), `requests.post` (a stub), the libraries' clocks and sleeps.

Found: the tenacity "Before" retries `httpx.TransportError`s only (a 503 raises
`HTTPStatusError` from `raise_for_status()`, not retried), while the "After" retried
502/503/504 three times; the page's table had no row for that decorator.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fidelity_mw import CircuitOpen, FidelityTransport, Policy
from fidelity_mw.testing import FakeClock, seeded_random

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "migration.md").read_text("utf-8")


def section(title: str) -> str:
    start = GUIDE.index(f"\n## {title}")
    end = GUIDE.find("\n## ", start + 1)
    return GUIDE[start : end if end > 0 else len(GUIDE)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def before(title: str) -> str:
    """The section's first python block, the one after "Before"."""
    text = section(title)
    return blocks(text[text.index("Before") :], "python")[0]


# ---------------------------------------------------------------- slowapi


def test_slowapi_before_is_slowapis_api_and_admits_what_the_after_admits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six searches from one client: slowapi's `@limiter.limit("5/minute")` (the route's
    own limit replaces `default_limits`) admits five, as the page's "After" asserts."""
    from fastapi import FastAPI, Request

    code = before("From slowapi")
    assert 'storage_uri="redis://redis.internal:6379"' in code
    code = code.replace('storage_uri="redis://redis.internal:6379"', 'storage_uri="memory://"')
    namespace: dict[str, Any] = {"FastAPI": FastAPI, "Request": Request, "__name__": "before"}
    exec(compile(code, "migration.md (slowapi, before)", "exec"), namespace)
    app = namespace["app"]
    # slowapi's windows read the system clock: one fixed instant, no window edge
    import limits.storage.memory as memory

    monkeypatch.setattr(memory.time, "time", lambda: 1_000.0)

    async def six_searches() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.get("/search", params={"q": "x"})).status_code for _ in range(6)]

    theirs = asyncio.run(six_searches())
    after = blocks(section("From slowapi"), "python")[1]
    assert "== [200, 200, 200, 200, 200, 429]" in after  # the page's claim for its "After"
    assert theirs == [200, 200, 200, 200, 200, 429]


# ---------------------------------------------------------------- tenacity


def tenacity_before(script: list[str]) -> tuple[str, int, list[float]]:
    """(outcome, upstream calls, waits) of the page's decorated `get_user`."""
    import tenacity

    namespace: dict[str, Any] = {"httpx": httpx, "__name__": "before"}
    exec(compile(before("From tenacity and stamina"), "migration.md (tenacity)", "exec"), namespace)
    get_user = namespace["get_user"]
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    get_user.retry.sleep = sleep  # recorded, not slept
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream(script)), base_url="http://u")
    try:
        asyncio.run(get_user(client, "42"))
        outcome = "ok"
    except tenacity.RetryError as exc:  # reraise=False: the last error inside
        outcome = type(exc.last_attempt.exception()).__name__
    except httpx.HTTPError as exc:
        outcome = type(exc).__name__
    return outcome, len(calls_of(client)), sleeps


def upstream(script: list[str]) -> Any:
    """A handler answering from `script` ("connect" | "503" | "ok"), then "ok"."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        answer = script[len(seen)] if len(seen) < len(script) else "ok"
        seen.append(answer)
        if answer == "connect":
            raise httpx.ConnectError("refused", request=request)
        if answer == "503":
            return httpx.Response(503)
        return httpx.Response(200, json={"id": "42"})

    handler.seen = seen  # type: ignore[attr-defined]
    return handler


def calls_of(client: httpx.AsyncClient) -> list[str]:
    return client._transport.handler.seen  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize(
    "script",
    [[], ["connect"], ["connect", "connect"], ["connect"] * 3, ["503"], ["503", "503"]],
    ids=lambda s: "+".join(s) or "healthy",
)
def test_tenacity_before_and_after_call_the_upstream_as_often(script: list[str]) -> None:
    """The same calls either way, the waits under the same envelope
    (`wait_random_exponential(multiplier=0.1, max=2)`: at most 0.1 s, then 0.2 s). A
    503 is not retried by the "Before" (`raise_for_status()` raises an
    `HTTPStatusError`, not a `TransportError`), nor by the "After" since its
    `on_status = []`."""
    theirs = tenacity_before(script)
    ours = tenacity_after_calls(script)
    assert ours[:2] == theirs[:2], f"after {ours[:2]}, before {theirs[:2]}"
    assert len(ours[2]) == len(theirs[2])
    for n, (mine, their) in enumerate(zip(ours[2], theirs[2], strict=True)):
        assert 0 <= mine <= 0.1 * 2**n
        assert 0 <= their <= 0.1 * 2**n


def tenacity_after_calls(script: list[str]) -> tuple[str, int, list[float]]:
    toml = blocks(section("From tenacity and stamina"), "toml")[0]
    policy = Policy.from_dict(tomllib.loads(toml))
    clock = FakeClock()
    handler = upstream(script)
    transport = FidelityTransport(
        httpx.MockTransport(handler), policy=policy, clock=clock, rng=seeded_random(0)
    )
    client = httpx.AsyncClient(transport=transport, base_url="http://users.internal")

    async def get_user(user_id: str) -> dict[str, str]:  # the page's plain function
        response = await client.get(f"/users/{user_id}")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    try:
        asyncio.run(get_user("42"))
        outcome = "ok"
    except httpx.HTTPError as exc:
        outcome = type(exc).__name__
    return outcome, len(handler.seen), clock.sleeps


# ---------------------------------------------------------------- pybreaker


def test_pybreaker_before_and_after_reach_the_upstream_on_the_same_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`CircuitBreaker(fail_max=5, reset_timeout=60)` and the page's `breaker` table:
    five failures open both, the sixth call fails fast (`CircuitBreakerError` there,
    `CircuitOpen` here), a call 60 s later is the one trial that reaches the upstream."""
    import pybreaker

    now = [0.0]
    epoch = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            return epoch + dt.timedelta(seconds=now[0])

    monkeypatch.setattr(pybreaker, "datetime", Frozen)
    outcome = ["fail"]
    reached: list[str] = []

    class ConnectionRefused(Exception):
        pass

    def post(url: str, json: object) -> Any:  # requests.post, stubbed
        reached.append(url)
        if outcome[0] == "fail":
            raise ConnectionRefused(url)
        return SimpleNamespace(json=lambda: {"ok": True})

    namespace: dict[str, Any] = {
        "pybreaker": pybreaker,
        "requests": SimpleNamespace(post=post),
        "__name__": "before",
    }
    code = before("From pybreaker (and aiobreaker, circuitbreaker, purgatory)")
    exec(compile(code, "migration.md (pybreaker, before)", "exec"), namespace)
    charge = namespace["charge"]

    toml = blocks(section("From pybreaker (and aiobreaker, circuitbreaker, purgatory)"), "toml")[0]
    policy = Policy.from_dict(tomllib.loads(toml))
    clock = FakeClock()

    def payments(request: httpx.Request) -> httpx.Response:
        reached.append(str(request.url))
        if outcome[0] == "fail":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    client = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(payments), policy=policy, clock=clock, rng=seeded_random(0)
        )
    )

    def theirs() -> str:
        before = len(reached)
        try:
            charge(10)
        except pybreaker.CircuitBreakerError:
            return "fast" if len(reached) == before else "opened"
        except ConnectionRefused:
            return "failed"
        return "ok"

    def mine() -> str:
        before = len(reached)
        try:
            asyncio.run(client.post("https://payments.internal/charge", json={"amount": 10}))
        except CircuitOpen:
            return "fast" if len(reached) == before else "opened"
        except httpx.ConnectError:
            return "failed"
        return "ok"

    script = [(0.0, "fail")] * 6 + [(59.0, "ok"), (1.5, "ok"), (0.0, "ok")]
    got: dict[str, list[str]] = {"theirs": [], "mine": []}
    for later, answer in script:
        now[0] += later
        clock.advance(later)
        outcome[0] = answer
        got["theirs"].append(theirs())
        got["mine"].append(mine())
    # pybreaker raises CircuitBreakerError on the failure that opens it, the page's
    # transport the failure itself; the calls that reach the upstream are the same
    reaching = {name: [r != "fast" for r in results] for name, results in got.items()}
    assert reaching["mine"] == reaching["theirs"], got
    assert got["theirs"][5:] == ["fast", "fast", "ok", "ok"]
    # the table's `CircuitBreakerError` row: the opening call raises it there only
    assert (got["theirs"][4], got["mine"][4]) == ("opened", "failed")
    with contextlib.suppress(Exception):
        asyncio.run(client.aclose())


def test_the_audit_prints_the_pages_after_for_its_before(tmp_path: Path) -> None:
    """The page: "`fidelity-mw audit` prints, next to each decorator ..., the `retry =
    { ... }` that does the same". For the page's decorator it printed no `on_status`,
    i.e. 502/503/504 retried where the decorator retried none."""
    from fidelity_mw.tools.audit import audit_paths

    (tmp_path / "users.py").write_text(
        "import httpx\n" + before("From tenacity and stamina"), encoding="utf-8"
    )
    (finding,) = [f for f in audit_paths([str(tmp_path)]).findings if f.kind == "retry"]
    hint = re.search(r"retry = \{ (.*?) \}", finding.replace_with)
    assert hint is not None, finding.replace_with
    printed = tomllib.loads(f"retry = {{ {hint.group(1)} }}")["retry"]
    toml = blocks(section("From tenacity and stamina"), "toml")[0]
    page = tomllib.loads(toml)["upstream"][0]["retry"]
    assert printed == page
