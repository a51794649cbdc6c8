"""Review 12: a Starlette service under `uvicorn --workers 4` with Redis state, and its
on-call operator: the CLI, the state page, the policy file's errors at startup.

Each test names what was wrong before its fix.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from fidelity_mw import Engine, FidelityMiddleware, Policy, PolicyError, _logs
from fidelity_mw.admin import AdminApp
from fidelity_mw.policy import StateConfig
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools import cli
from fidelity_mw.tools.check import check_file
from fidelity_mw.tools.cli import main
from redis_server import PATIENT

# ---------------------------------------------------------------- the policy at startup

TYPO = """\
version = 1

[[rate_limit]]
name = "per-client"
match = "/api/*"
rate = "20/s"
brust = 40
"""


def test_a_policy_file_that_fails_at_startup_names_the_line_of_each_problem(
    tmp_path: Path,
) -> None:
    """Before: `Policy.from_toml` raised `rate_limit[0].brust: unknown key` with the file
    but no line; `fidelity-mw check` had the line, the traceback a crash-looping worker
    prints (the only thing an operator sees after a bad rollout) did not."""
    path = tmp_path / "fidelity.toml"
    path.write_text(TYPO)
    with pytest.raises(PolicyError) as caught:
        Policy.from_toml(path)
    text = str(caught.value)
    assert f"{path}: invalid policy (1 problem(s)):" in text
    assert "  - line 7: rate_limit[0].brust: unknown key; did you mean 'burst'?" in text
    # the issues themselves are as before (tools compare them)
    [issue] = caught.value.issues
    assert issue.path == "rate_limit[0].brust"
    # several problems: each on its line, a cross-check on its table's key
    path.write_text(TYPO.replace("brust = 40", "burst = 4\ncost = 5").replace("20/s", "20/sec"))
    with pytest.raises(PolicyError) as caught:
        Policy.from_toml(path)
    assert "  - line 8: rate_limit[0].cost: cost 5 exceeds burst 4" in str(caught.value)
    # from_dict has no file, so no lines
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rate_limit": [{"brust": 1}]})
    assert "  - rate_limit[0].brust: unknown key" in str(caught.value)


# ---------------------------------------------------------------- check


ROUTE_BREAKER = """\
version = 1

[breaker]
window_s = 10
min_calls = 10
open_s = 5

[concurrency]
limit = 50
max_queue = 10

[[route]]
match = "/api/search*"
breaker = { failure_ratio = 0.3 }
concurrency = { limit = 4 }

[[route]]
match = "/api/export*"
breaker = { failure_ratio = 0.3, window_s = 10, min_calls = 10, open_s = 5 }
concurrency = { limit = 4, max_queue = 10 }

[[route]]
match = "/healthz"
breaker = false
"""


def test_check_warns_that_a_route_table_replaces_the_policy_table_it_does_not_extend(
    tmp_path: Path,
) -> None:
    """Before: a `[[route]]` with `breaker = { failure_ratio = 0.3 }` under a `[breaker]`
    with `window_s = 10` got a 30 s window (the built-in default), silently: the route's
    table replaces `[breaker]`, it does not extend it, and nothing said so (`map` showed
    the 30 s only to whoever compared)."""
    path = tmp_path / "fidelity.toml"
    path.write_text(ROUTE_BREAKER)
    result = check_file(path)
    assert result.ok
    found = {(w.path, w.line): w.message for w in result.warnings}
    assert set(found) == {("route[0].breaker", 14), ("route[0].concurrency", 15)}
    breaker = found["route[0].breaker", 14]
    # open_s = 5 is the built-in default too: nothing lost there
    assert breaker.startswith("min_calls, window_s left out take the built-in defaults")
    assert "built-in defaults (20, 30), not [breaker]'s (10, 10)" in breaker
    assert "replaces [breaker]" in breaker
    assert "max_queue" in found["route[0].concurrency", 15]
    # a policy whose [breaker] sets nothing: nothing to lose, nothing to say
    path.write_text(ROUTE_BREAKER.replace("[breaker]\nwindow_s = 10\nmin_calls = 10\n", ""))
    assert not [w for w in check_file(path).warnings if w.path.endswith(".breaker")]


# ---------------------------------------------------------------- the state page


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _state(engine: Engine) -> dict[str, Any]:
    app = Starlette(routes=[Route("/", _ok), Mount("/_fidelity", app=AdminApp(engine))])
    app.add_middleware(FidelityMiddleware, engine=engine, telemetry=False)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/")
        response = await client.get("/_fidelity/state.json")
        page = await client.get("/_fidelity/")
    assert response.status_code == 200
    assert 'id="process"' in page.text  # the page shows it, next to the policy version
    state: dict[str, Any] = response.json()
    return state


@pytest.mark.anyio
async def test_the_state_page_says_which_process_answered() -> None:
    """Before: under `uvicorn --workers 4` each refresh of the page (and each curl of
    state.json) reached whichever worker accepted the connection; the store counters
    jumped between four histories (round trips 20, 735, 2186, 750 in four reads) and
    nothing said that these were four processes, not one."""
    engine = Engine(Policy())
    state = await _state(engine)
    process = state["process"]
    assert process["pid"] == os.getpid()
    assert process["host"] == socket.gethostname()
    assert process["fleet_id"] is None  # memory state: no fleet


@pytest.mark.anyio
async def test_the_state_page_gives_the_fleet_id_of_a_redis_process(redis_url: str) -> None:
    """The id this process announces in `{prefix}:fleet`: the page's process is then
    the member Redis counts in the fleet size behind each limit's share."""
    prefix = f"rev12admin{os.getpid()}"
    engine = Engine(Policy(state=StateConfig(url=redis_url, key_prefix=prefix, **PATIENT)))
    try:
        state = await _state(engine)
    finally:
        await engine.store.aclose()
    fleet = getattr(engine.store, "fleet", None)
    assert fleet is not None
    assert state["process"]["fleet_id"] == fleet.id
    assert state["process"]["pid"] == os.getpid()


# ---------------------------------------------------------------- the CLI in a pipe


class _ClosedPipe(io.StringIO):
    """stdout of `fidelity-mw map x | head -1` once head has exited."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_the_cli_piped_into_head_ends_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `fidelity-mw check --json x.toml | head` ended in a BrokenPipeError
    traceback from the print, as every CLI command whose reader stops early did."""
    path = tmp_path / "fidelity.toml"
    path.write_text(TYPO)
    monkeypatch.setattr(cli.sys, "stdout", _ClosedPipe())
    monkeypatch.setattr(cli.os, "dup2", lambda fd, fd2: None)  # not the test's own stdout
    assert main(["check", "--json", str(path)]) == cli.EXIT_PIPE
    assert main(["map", str(path)]) == cli.EXIT_PIPE
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- the state URL's query


def _url_problems(url: str) -> list[str]:
    try:
        Policy.from_dict({"state": {"url": url}})
    except PolicyError as exc:
        return [f"{i.path}: {i.message}" for i in exc.issues]
    return []


def test_a_state_url_parameter_the_client_cannot_take_is_a_policy_error() -> None:
    """Before: every query parameter of the state URL went to redis-py as a connection
    argument, and `check` passed them all. One the store sets itself
    (`?socket_timeout=5`, `?max_connections=`) or one no connection takes (`?foo=`,
    a typo such as `?clustr=true`, `?ssl_cert_reqs=` on plain redis://) made building
    or connecting the client fail at run time: the middleware then decided without
    state, enforcing no limit at all, with one warning line."""
    [timeout] = _url_problems("redis://redis.internal:6379/0?socket_timeout=5")
    assert timeout.startswith('state.url: "redis://redis.internal:6379/0?socket_timeout=5": ')
    assert "socket_timeout is set by [state] timeout_ms" in timeout
    [pool] = _url_problems("tiered+redis://r:6379/0?max_connections=8")
    assert "max_connections is set by [state] pool_size" in pool
    [retry] = _url_problems("redis://r:6379/0?retry_on_timeout=true")
    assert "retry_on_timeout" in retry
    assert "never retries" in retry
    [typo] = _url_problems("redis://r:6379/0?clustr=true")
    assert "unknown parameter 'clustr'; did you mean 'cluster'?" in typo
    [junk] = _url_problems("redis://r:6379/0?foo=bar")
    assert "unknown parameter 'foo'" in junk
    [ssl] = _url_problems("redis://r:6379/0?ssl_cert_reqs=none")
    assert "ssl_cert_reqs needs rediss://" in ssl
    [flag] = _url_problems("redis://r:6379/0?cluster=maybe")
    assert "cluster=maybe: write cluster=true or cluster=false" in flag
    [number] = _url_problems("rediss://r:6380/0?health_check_interval=30s")
    assert "health_check_interval=30s: write a whole number" in number
    [unix] = _url_problems("unix:///run/redis.sock?cluster=true")
    assert "Redis Cluster over a unix socket" in unix
    # what the client takes, as before
    for fine in (
        "redis://r:6379/0?cluster=true",
        "redis://r:6379/0?cluster=false&client_name=shop&health_check_interval=30",
        "rediss://user:pw@r:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
        "unix:///run/redis.sock?db=2&password=pw",
        "redis://r:6379/0?db=1&socket_keepalive=true",
    ):
        assert _url_problems(fine) == [], fine


def test_a_password_in_the_state_urls_query_is_never_shown(tmp_path: Path) -> None:
    """`unix:///run/redis.sock?password=...` (redis-py's way to give a socket a password)
    was shown whole in policy errors and in `fidelity-mw map`: only `user:pw@` was
    masked."""
    [problem] = _url_problems("unix:///run/redis.sock?password=hunter2&foo=1")
    assert "hunter2" not in problem
    assert "password=***" in problem
    path = tmp_path / "fidelity.toml"
    path.write_text('[state]\nurl = "unix:///run/redis.sock?db=0&password=hunter2"\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["map", str(path)]) == 0
    assert "hunter2" not in out.getvalue()
    assert "password=***" in out.getvalue()


# ---------------------------------------------------------------- the log, after a fault


def test_lines_left_out_are_told_when_the_fault_stops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a throttled warning told what it had left out only with its next line,
    so when the fault stopped (Redis given memory again) the last interval's count
    was never logged: in the walkthrough the last line said `862 more like it in the
    last 10 s`, the ~400 errors of the 5 s after it were never told, and nothing said
    when they had stopped."""
    clock = FakeClock()
    later: list[tuple[float, Callable[[], None]]] = []

    def schedule(delay: float, callback: Callable[[], None]) -> bool:
        later.append((clock.monotonic() + delay, callback))
        return True

    monkeypatch.setattr(_logs, "clock", clock.monotonic)
    monkeypatch.setattr(_logs, "schedule", schedule)
    _logs.reset()
    log = logging.getLogger("fidelity_mw.test_review12")

    def run_due() -> None:
        due = [item for item in later if item[0] <= clock.monotonic()]
        for item in due:
            later.remove(item)
            item[1]()

    with caplog.at_level(logging.WARNING, logger=log.name):
        assert _logs.warn(log, "OOM", "redis said %s", "OOM")
        for _ in range(5):
            clock.advance(1.0)
            assert not _logs.warn(log, "OOM", "redis said %s", "OOM")
        assert len(later) == 1  # one line scheduled for the interval, not one per call
        clock.advance(5.0)  # the fault stopped at t=5; the interval ends at t=10
        run_due()
        clock.advance(2.0)  # it comes back once at t=12
        assert not _logs.warn(log, "OOM", "redis said %s", "OOM")
        clock.advance(8.0)
        run_due()
        clock.advance(30.0)
        run_due()  # nothing left out: nothing more to say
    said = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert said == [
        "redis said OOM (repeats: at most one line per 10 s, with a count)",
        "redis said OOM (5 more like it in the last 10 s, not logged; the last 5.0 s ago)",
        "redis said OOM (1 more like it in the last 10 s, not logged; the last 8.0 s ago)",
    ]
    assert later == []


def test_the_map_names_the_counter_key_of_a_global_and_a_route_limit(tmp_path: Path) -> None:
    """Before: every limit's Redis key was shown as `H(name|{client})`, a global limit's
    too, which has one counter (`name|*`), and a per-route one (`name|route:<route>`):
    an operator looking for the key to inspect or reset went looking for a client."""
    path = tmp_path / "fidelity.toml"
    path.write_text(
        '[state]\nurl = "redis://r:6379/0"\n'
        '[[rate_limit]]\nname = "exports"\nkey = "global"\nrate = "5/min"\n'
        '[[rate_limit]]\nname = "per-route"\nkey = "route"\nrate = "50/s"\n'
        '[[rate_limit]]\nname = "per-client"\nrate = "5/s"\n'
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["map", str(path)]) == 0
    text = out.getvalue()
    assert "{fmw}:rl:H(exports|*)" in text
    assert "{fmw}:rl:H(per-route|route:{route})" in text
    assert "{fmw}:rl:H(per-client|{client})" in text
