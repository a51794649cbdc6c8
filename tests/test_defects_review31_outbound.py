"""The outbound transport after out30 and the lead's follow-up (`Upstream.heard`): what a
demanding user would hit. Each test of a behaviour change failed before it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport, Policy
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.loop import attempt_timeouts
from fidelity_mw.outbound.upstream import Upstream
from fidelity_mw.policy import RetryConfig, UpstreamConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
URL = "https://payments.prod.acme.net/"  # a name the rule cannot place


class _Stream:
    """A connection as httpx's own transports show it: the address it reached."""

    def __init__(self, address: str) -> None:
        self.address = address

    def get_extra_info(self, info: str) -> Any:
        return (self.address, 443) if info == "server_addr" else None


class Internal:
    """An internal service under a public-looking name (its address in trusted_peers):
    notes every attempt's raw headers, answers the statuses scripted."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.raw: list[list[tuple[bytes, bytes]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.raw.append(list(request.headers.raw))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return httpx.Response(status, extensions={"network_stream": _Stream("10.0.0.7")})


def _policy() -> Policy:
    return Policy(
        upstreams=(UpstreamConfig(retry=RETRY, breaker=None),), trusted_peers=("10.0.0.0/8",)
    )


def _named(raw: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in raw if key.lower() == name]


# ---------------------------------------------------------------- a mid-call flip of `speaks`


@pytest.mark.parametrize("traced", [False, True])
async def test_a_callers_own_timeout_header_is_not_sent_twice_after_the_first_answer(
    traced: bool,
) -> None:
    """The caller sets its own `x-request-timeout-ms`; the call's first answer (a 503)
    comes from an address in trusted_peers, so the retry carries ours: the caller's was
    not set aside (the call began speaking to a stranger), and the retry sent both, two
    different deadlines for the next hop to choose from."""
    upstream = Internal(503, 200)
    if traced:  # (an observer: the headers are saved before it injects trace context)
        from opentelemetry.sdk.trace import TracerProvider

        more: dict[str, Any] = {"tracer_provider": TracerProvider()}
    else:
        more = {"telemetry": False}
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=_policy(), clock=FakeClock(), **more
    )
    async with httpx.AsyncClient(transport=transport) as client:
        request = client.build_request("GET", URL, headers={"x-request-timeout-ms": "777"})
        assert (await client.send(request)).status_code == 200
        # the request the caller gets back is the one it built
        assert _named(list(request.headers.raw), b"x-request-timeout-ms") == [b"777"]
        assert _named(list(request.headers.raw), b"x-fidelity-attempt") == []
    first, retry = upstream.raw
    assert _named(first, b"x-request-timeout-ms") == [b"777"]  # a stranger: the caller's
    assert len(_named(retry, b"x-request-timeout-ms")) == 1  # ours now: only ours
    assert _named(retry, b"x-fidelity-attempt") == [b"2"]


def test_the_sync_transport_sends_a_callers_own_timeout_header_once_too() -> None:
    upstream = Internal(503, 200)
    transport = FidelitySyncTransport(
        httpx.MockTransport(upstream), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    with httpx.Client(transport=transport) as client:
        request = client.build_request("GET", URL, headers={"x-request-timeout-ms": "777"})
        assert client.send(request).status_code == 200
        assert _named(list(request.headers.raw), b"x-request-timeout-ms") == [b"777"]
    assert len(_named(upstream.raw[1], b"x-request-timeout-ms")) == 1


# ---------------------------------------------------------------- `heard` from another thread


class _Interleaved(Mapping[str, float | None]):
    """A request's timeouts whose reading runs `meanwhile` once: what another thread does
    between two bytecodes of this one (the sync transport under a thread pool)."""

    def __init__(self, meanwhile: Any) -> None:
        self.data: dict[str, float | None] = {
            "connect": 5.0,
            "read": 5.0,
            "write": 5.0,
            "pool": 5.0,
        }
        self.meanwhile = meanwhile

    def __getitem__(self, key: str) -> float | None:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def keys(self) -> Any:  # (read when the cache keeps a copy of them)
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        return self.data.keys()


def test_an_answer_heard_while_another_thread_builds_its_first_attempt_is_not_forgotten() -> None:
    """Thread B builds a first attempt's headers (and caches them for its timeouts) while
    thread A hears the host's first answer from a trusted address: B's headers, built for
    a stranger, were cached after A had cleared the cache, and every later call to the
    host went without our headers (until its timeouts changed)."""
    engine = Engine(_policy(), clock=FakeClock())
    up = Upstream(engine, "payments.prod.acme.net", None)
    assert up.listening
    assert not up.speaks
    answer = httpx.Response(200, extensions={"network_stream": _Stream("10.0.0.7")})
    timeouts = _Interleaved(lambda: up.heard(answer, engine))
    _, stamps = attempt_timeouts(up, timeouts)  # B: built while A heard
    assert up.speaks
    _, stamps = attempt_timeouts(up, timeouts)  # B's next call
    assert [key for key, _, _ in stamps] == [b"x-fidelity-attempt", b"x-request-timeout-ms"]


# ---------------------------------------------------------------- check's warnings


@pytest.mark.parametrize(
    "retry",
    [
        # nothing is retried at all
        'retry = { methods = ["GET", "POST"], attempts = 1 }',
        # a 429 (the upstream refused: it did not act) is the only status retried
        'retry = { methods = ["GET", "POST"], on_read_timeout = false, on_status = [429] }',
    ],
)
def test_check_does_not_warn_of_post_retried_when_it_cannot_have_acted(
    tmp_path: Any, retry: str
) -> None:
    """`fidelity-mw check` warned of a POST "retried after read timeouts and status 429"
    on an upstream that retries nothing (`attempts = 1`), or only 429s, which say the
    upstream did not act: a false alarm the user cannot act on."""
    from fidelity_mw.tools.check import check_file

    path = tmp_path / "p.toml"
    path.write_text(f'[[upstream]]\nhost = "ledger"\n{retry}\n')
    result = check_file(path)
    assert not result.errors
    assert not [w for w in result.warnings if w.path.endswith("retry.methods")]


def test_check_names_only_the_statuses_after_which_the_upstream_may_have_acted(
    tmp_path: Any,
) -> None:
    from fidelity_mw.tools.check import check_file

    path = tmp_path / "p.toml"
    path.write_text(
        '[[upstream]]\nhost = "ledger"\n'
        'retry = { methods = ["POST"], on_read_timeout = false, on_status = [429, 503] }\n'
    )
    [warning] = [w for w in check_file(path).warnings if w.path.endswith("retry.methods")]
    assert "status 503" in warning.message
    assert "429" not in warning.message


# ---------------------------------------------------------------- renamed mid-call


@pytest.mark.parametrize("own", [True, False])
async def test_a_retry_to_a_service_no_longer_all_ours_carries_none_of_our_headers(
    own: bool,
) -> None:
    """A service's instances are renamed while a call waits to retry (another call's
    resolver answer): no longer all inside trusted_peers, the service is not told our
    headers any more, yet the retry carried the first attempt's (`x-fidelity-attempt: 1`,
    its deadline) to the public instance. The caller's own header of that name goes
    instead, as to any host not told ours."""
    transport: FidelityTransport | None = None
    raw: list[list[tuple[bytes, bytes]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        raw.append(list(request.headers.raw))
        if len(raw) == 1:
            assert transport is not None
            [up] = [u for u in transport._upstreams.values() if u.host == "pay.internal"]
            up.set_instances(transport.engine, ["http://203.0.113.9"])
            assert not up.speaks
            return httpx.Response(503)
        return httpx.Response(200)

    entry = UpstreamConfig(
        host="pay.internal", retry=RETRY, breaker=None, instances=("http://10.0.0.2",)
    )
    transport = FidelityTransport(
        httpx.MockTransport(handler), policy=Policy(upstreams=(entry,)), clock=FakeClock(),
        telemetry=False,
    )  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as client:
        headers = {"x-request-timeout-ms": "777"} if own else {}
        request = client.build_request("GET", "http://pay.internal/", headers=headers)
        assert (await client.send(request)).status_code == 200
        theirs = [b"777"] if own else []
        assert _named(list(request.headers.raw), b"x-request-timeout-ms") == theirs
    first, retry = raw
    assert _named(first, b"x-fidelity-attempt") == [b"1"]
    assert _named(retry, b"x-fidelity-attempt") == []
    assert _named(retry, b"x-request-timeout-ms") == theirs


# ---------------------------------------------------------------- a plan built anew


async def test_a_plan_built_anew_for_another_engine_keeps_what_the_first_answer_said() -> None:
    """A transport used inside requests (the middleware's engine) and outside them (its
    own) builds the host's plan anew at each switch: a public-looking name heard to be one
    of ours became a stranger again, and its next first attempt went without our deadline
    (at every switch: never, for calls that alternate)."""
    upstream = Internal(200)
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(URL)).status_code == 200  # heard: one of ours
        other = Engine(_policy(), clock=FakeClock())  # equal trusted_peers
        up = transport.upstream(other, httpx.URL(URL))
        assert up.policy is other.policy
        assert up.speaks
        assert not up.listening
        # another trusted_peers: judged again
        third = Engine(Policy(trusted_peers=("192.168.0.0/16",)), clock=FakeClock())
        up = transport.upstream(third, httpx.URL(URL))
        assert up.listening
        assert not up.speaks
