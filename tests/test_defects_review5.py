"""Regression tests for defects found by the review of the last round's changes: each
failed on the code before its fix."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.errors import PolicyError
from fidelity_mw.policy import DeadlineConfig, Policy, StateConfig, UpstreamConfig
from fidelity_mw.policy.model import redact_url
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.cli import main as cli_main

GOOD = ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]

# ---------------------------------------------- instances httpx cannot parse


def test_a_policy_instance_with_a_port_that_is_not_a_number_is_refused() -> None:
    """The policy's `instances` are held to the same rule as a resolver's answer: a URL
    httpx cannot parse made every call to that upstream raise (an app's 500)."""
    with pytest.raises(PolicyError) as caught:
        UpstreamConfig(host="payments", instances=("http://a:notaport", "http://b:1"))
    message = str(caught.value)
    assert "instances" in message
    assert "http://a:notaport" in message


def test_check_reports_an_instance_with_a_bad_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "fidelity.toml"
    policy.write_text(
        '[[upstream]]\nhost = "payments"\ninstances = ["http://a:notaport", "http://b:1"]\n'
    )
    assert cli_main(["check", str(policy)]) == 1
    out = capsys.readouterr()
    assert "instances" in out.out + out.err


# ---------------------------------------------- the resolver's answer, checked once


class CountingAnswer(list[str]):
    """A resolver's answer that counts how often the transport reads it."""

    reads = 0

    def __iter__(self) -> Iterator[str]:
        CountingAnswer.reads += 1
        return super().__iter__()


def _client_get(t: Any, sync: bool) -> int:
    async def get_async() -> int:
        async with httpx.AsyncClient(transport=t) as client:
            return (await client.get("http://payments/pay")).status_code

    if not sync:
        return asyncio.run(get_async())
    with httpx.Client(transport=t) as client:
        return client.get("http://payments/pay").status_code


@pytest.mark.parametrize(
    "answer",
    [
        [*GOOD, GOOD[0]],  # a duplicate: the instances kept are fewer than the answer
        [f"http://10.0.{i // 250}.{i % 250}:8001" for i in range(300)],  # past the cap
        [*GOOD, "http://a:notaport"],  # a bad answer that persists
    ],
    ids=["duplicate", "over-the-cap", "bad"],
)
@pytest.mark.parametrize("sync", [False, True])
def test_an_unchanged_resolver_answer_is_read_once_per_call(answer: list[str], sync: bool) -> None:
    """An answer the same as the last is not validated again: a duplicate, an answer
    past the 256-instance cap, or a bad answer was validated on every call (2 ms per
    call for 300 URLs, against a layer of ~2 µs)."""
    CountingAnswer.reads = 0
    counted = CountingAnswer(answer)
    engine = Engine(Policy(), clock=FakeClock(), rng=seeded_random(7))
    kind = FidelitySyncTransport if sync else FidelityTransport
    t = kind(
        httpx.MockTransport(lambda request: httpx.Response(200)),
        engine=engine,
        telemetry=False,
        resolver=lambda host: counted if host == "payments" else None,
    )
    assert _client_get(t, sync) == 200
    first = CountingAnswer.reads
    for _ in range(10):
        assert _client_get(t, sync) == 200
    # each later call reads the answer once, to compare it with the last
    assert CountingAnswer.reads - first == 10


@pytest.mark.parametrize("sync", [False, True])
def test_a_failing_resolver_is_logged_once_per_failure(
    sync: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Discovery down: one traceback when it starts failing, not one per call; again
    after it answered in between."""
    answers: list[Any] = [GOOD]

    def resolver(host: str) -> Any:
        answer = answers[-1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    engine = Engine(Policy(), clock=FakeClock(), rng=seeded_random(7))
    kind = FidelitySyncTransport if sync else FidelityTransport
    t = kind(
        httpx.MockTransport(lambda request: httpx.Response(200)),
        engine=engine,
        telemetry=False,
        resolver=resolver,
    )
    assert _client_get(t, sync) == 200
    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        answers.append(OSError("discovery is down"))
        for _ in range(5):
            assert _client_get(t, sync) == 200
        assert len([r for r in caplog.records if "resolver failed" in r.getMessage()]) == 1
        answers.append(GOOD)
        assert _client_get(t, sync) == 200
        answers.append(OSError("discovery is down"))
        for _ in range(5):
            assert _client_get(t, sync) == 200
    failed = [r for r in caplog.records if "resolver failed" in r.getMessage()]
    assert len(failed) == 2
    assert all(r.exc_info is not None for r in failed)


# ---------------------------------------------- work that outlives our own answer


@pytest.mark.anyio
async def test_a_call_after_our_own_answer_is_a_call_of_its_own() -> None:
    """The middleware answered 504 on the deadline while a task the handler spawned
    still ran: that task's later call is a call of its own (as after an app's own
    response), not refused by the answered request's passed deadline nor added to
    its record."""
    clock = FakeClock()
    entered = asyncio.Event()
    release = asyncio.Event()
    outcomes: list[Any] = []
    upstream = httpx.MockTransport(lambda request: httpx.Response(200))
    transport = FidelityTransport(upstream, telemetry=False)
    spawned: list[asyncio.Task[None]] = []

    async def later() -> None:
        await release.wait()
        try:
            async with httpx.AsyncClient(transport=transport) as client:
                response = await client.get("http://audit.internal/log")
            outcomes.append(response.status_code)
        except Exception as exc:
            outcomes.append(exc)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        spawned.append(asyncio.create_task(later()))  # carries the request's context
        entered.set()
        await asyncio.Event().wait()  # only the deadline ends it

    seen: list[DecisionContext] = []

    class Keep:
        def start(self, ctx: DecisionContext, scope: Any) -> None:
            return None

        def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
            seen.append(ctx)

    policy = Policy(deadline=DeadlineConfig(default_ms=1_000))
    mw = FidelityMiddleware(app, policy=policy, clock=clock, observer=Keep(), telemetry=False)
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = http_scope(client=("192.0.2.1", 5000))
    request = asyncio.create_task(mw(scope, receive, send))
    await entered.wait()
    clock.advance(2.0)  # the deadline passes: the middleware answers
    await request
    assert statuses == [504]
    release.set()
    await spawned[0]
    assert outcomes == [200]
    assert [d for d in seen[0].decisions if d.subject == "audit.internal"] == []


# ---------------------------------------------- passwords in messages


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("Redis://app:s3cr/et@host:6379/0", "Redis://app:***@host:6379/0"),
        ("redis://app:p@ss@host", "redis://app:***@host"),
        ("rediss://:secret@host:1/0", "rediss://:***@host:1/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_a_password_with_a_slash_or_an_at_sign_is_masked(url: str, masked: str) -> None:
    """Policy errors and the state map name the Redis URL: a password holding "/" or
    "@" was printed whole, or its tail after the "@"."""
    assert redact_url(url) == masked
    with pytest.raises(PolicyError) as caught:
        StateConfig(url=url.replace("edis", "emcache", 1))
    assert masked in str(caught.value).replace("emcache", "edis", 1)


def test_a_map_target_file_that_raises_leaves_no_half_run_module(tmp_path: Path) -> None:
    """`fidelity-mw map broken.py:app` outside the working directory: the failed
    module was left in sys.modules, half run, for a later import to find."""
    import sys

    from fidelity_mw.tools.statemap import load_target

    target = tmp_path / "broken_app_for_map.py"
    target.write_text("import os\nAPP_SECRET = os.environ['NO_SUCH_SETTING_FOR_MAP']\n")
    with pytest.raises(ImportError, match="NO_SUCH_SETTING_FOR_MAP"):
        load_target(f"{target}:app")
    assert "broken_app_for_map" not in sys.modules


# ---------------------------------------------- TOML's way to say "none"


def test_false_turns_off_the_default_deadline(tmp_path: Path) -> None:
    """docs/policy.md offers `default_ms = false` for no default deadline (TOML has no
    null; leaving the key out gives 30 s): it was refused as "expected an integer"."""
    from fidelity_mw import Policy as PolicyFromFile

    path = tmp_path / "fidelity.toml"
    path.write_text("[deadline]\ndefault_ms = false\n")
    policy = PolicyFromFile.from_toml(path)
    assert policy.deadline.default_ms is None
    assert PolicyFromFile.from_dict(policy.to_dict()).deadline.default_ms is None
    path.write_text("[deadline]\n")
    assert PolicyFromFile.from_toml(path).deadline.default_ms == 30_000
    path.write_text("[deadline]\ndefault_ms = true\n")
    with pytest.raises(PolicyError, match=r"deadline\.default_ms"):
        PolicyFromFile.from_toml(path)


# ---------------------------------------------- redis-py 8.2 and unix sockets


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:///run/redis.sock?db=0", ("unix:///run/redis.sock?db=0", False)),
        ("unix:///run/redis.sock", ("unix:///run/redis.sock", False)),
        ("tiered+unix:///run/r.sock?cluster=0&db=2", ("unix:///run/r.sock?db=2", False)),
        ("redis://h:6379/0?cluster=1", ("redis://h:6379/0", True)),
        (
            "rediss://u:p@h:1/0?ssl_cert_reqs=none&cluster=yes",
            ("rediss://u:p@h:1/0?ssl_cert_reqs=none", True),
        ),
    ],
)
def test_the_url_handed_to_redis_py_keeps_its_scheme_slashes(
    url: str, expected: tuple[str, bool]
) -> None:
    """Stripping our `cluster=` flag rebuilt the URL through urlunsplit, which turns
    `unix:///path?db=0` into `unix:/path?db=0`: redis-py 8.2 refuses that, so every
    unix-socket policy failed to connect."""
    from fidelity_mw.state.redis import redis_url

    assert redis_url(url) == expected


# ---------------------------------------------- patterns that can never match


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("rate_limit", "match", "api/*"),
        ("route", "match", "health"),
        ("upstream", "host", "https://payments.internal"),
        ("upstream", "host", "payments.internal:8443"),
        ("upstream", "host", "payments.internal/v1"),
    ],
)
def test_a_pattern_that_can_never_match_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str, value: str
) -> None:
    """A path glob without its leading slash, or a host written as a URL or with a port,
    passed `check` and silently never applied (a limit let everything through, an
    upstream's retry settings gave way to the defaults)."""
    extra = 'name = "a"\nrate = "1/min"\n' if table == "rate_limit" else ""
    path = tmp_path / "fidelity.toml"
    path.write_text(f'[[{table}]]\n{extra}{key} = "{value}"\n')
    assert cli_main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{table}[0].{key}" in out
    assert "never matches" in out


@pytest.mark.parametrize("host", ["*", "payments.internal", "*.internal", "::1", "10.0.0.7"])
def test_hosts_and_globs_that_can_match_are_accepted(host: str) -> None:
    assert UpstreamConfig(host=host).host == host


# ---------------------------------------------- a transport's own policy under a middleware


@pytest.mark.anyio
async def test_a_transports_own_policy_overridden_by_the_middleware_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/migration.md's examples build `FidelityTransport(policy=...)`; inside a request
    the middleware's policy applies, so those settings silently did nothing."""
    from fidelity_mw.policy import RetryConfig

    calls: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(503)

    own = Policy(upstreams=(UpstreamConfig(host="up.internal", retry=RetryConfig(attempts=1)),))
    transport = FidelityTransport(httpx.MockTransport(upstream), policy=own, telemetry=False)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            got = await client.get("http://up.internal/x")
        await send({"type": "http.response.start", "status": got.status_code, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = FidelityMiddleware(app, policy=Policy(breaker=None), telemetry=False)
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=mw), base_url="http://t"
        ) as client:
            for _ in range(3):
                await client.get("/")
        # outside a request the transport's own policy applies: one attempt, no warning
        async with httpx.AsyncClient(transport=transport) as outside:
            before = len(calls)
            await outside.get("http://up.internal/x")
            assert len(calls) - before == 1
    said = [r for r in caplog.records if "its own policy" in r.getMessage()]
    assert len(said) == 1
    assert "middleware's policy" in said[0].getMessage()


# ---------------------------------------------- a deadline header repeated


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        ([b"100", b"900000"], 504),  # the shorter one (100 ms) has passed by then
        ([b"900000", b"100"], 504),
        ([b"900000", b"800000"], 200),
        ([b"100", b"abc"], 200),  # one malformed value: malformed, the default applies
    ],
)
@pytest.mark.anyio
async def test_a_repeated_deadline_header_takes_the_shortest_value(
    lines: list[bytes], status: int
) -> None:
    """Two hops each adding `x-request-timeout-ms` (100 and 900000): the caller's shorter
    deadline was dropped as malformed and the 30 s default applied instead."""
    clock = FakeClock()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        clock.advance(0.5)  # the handler takes 500 ms
        await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = FidelityMiddleware(app, policy=Policy(breaker=None), clock=clock, telemetry=False)
    headers = [(b"x-request-timeout-ms", line) for line in lines]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://t") as c:
        got = await c.get("/", headers=headers)
    assert got.status_code == status


def test_a_single_entry_where_a_list_belongs_is_a_policy_error() -> None:
    """`Policy(rate_limits=RateLimit(...))` raised a bare TypeError from a check between
    fields instead of the field's own error."""
    from fidelity_mw import RateLimit

    with pytest.raises(PolicyError) as caught:
        Policy(rate_limits=RateLimit(name="a", rate="1/s"))  # type: ignore[arg-type]
    assert "expected a list of RateLimit" in str(caught.value)
    with pytest.raises(PolicyError, match="expected an UpstreamConfig"):
        Policy(upstreams=[{"host": "a"}])  # type: ignore[list-item]
