"""A `[[rate_limit]]`'s own `client_ipv6_prefix`.

The policy's `client_ipv6_prefix` (64 by default) is right for public clients, each
given a /64. Kubernetes gives a node's pods one /64, so a service-to-service
`client_ip` limit at 64 counted a whole node as one client. A limit may set its own
prefix (32 .. 128): its client keys (the address, a `header:NAME` IPv6 value, the
address in place of a missing key) count by it, the other limits by the policy's;
`fidelity-mw check` warns below /48, `fidelity-mw map` says each limit's prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from _asgi import http_scope
from fidelity_mw import DecisionContext, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import context_from_scope
from fidelity_mw.errors import PolicyError
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.headers import ClientKeys
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools.check import check_file
from fidelity_mw.tools.statemap import from_policy, render

Message = dict[str, Any]

POD_A = "2001:db8:1:2::a"
POD_B = "2001:db8:1:2::b"  # the same /64: the same node


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Harness:
    def __init__(self, *limits: RateLimit, **policy: Any) -> None:
        self.mw = FidelityMiddleware(
            _ok, policy=Policy(rate_limits=limits, **policy), clock=FakeClock(), telemetry=False
        )
        self.contexts: list[DecisionContext] = []

    def status(self, peer: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> int:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = http_scope(
            "/api/x", headers=list(headers), client=(peer, 4711), server=("127.0.0.1", 8000)
        )
        asyncio.run(self.mw(scope, receive, send))
        ctx = context_from_scope(scope)
        assert ctx is not None
        self.contexts.append(ctx)
        return int(next(m for m in sent if m["type"] == "http.response.start")["status"])


def test_a_limit_at_128_counts_each_pod_of_a_node_apart() -> None:
    h = Harness(RateLimit(name="svc", rate="1/h", client_ipv6_prefix=128))
    assert [h.status(POD_A), h.status(POD_B)] == [200, 200]
    assert [h.status(POD_A), h.status(POD_B)] == [429, 429]
    assert h.contexts[0].client_key == POD_A


def test_the_other_limits_keep_the_policys_prefix() -> None:
    """One route, a public limit at the policy's /64 and a per-pod limit at /128: the
    pods share the public budget and keep their own per-pod one."""
    h = Harness(
        RateLimit(name="public", rate="3/h"),
        RateLimit(name="svc", rate="1/h", client_ipv6_prefix=128),
    )
    assert h.status(POD_A) == 200
    assert h.contexts[-1].client_key == "2001:db8:1:2::/64"  # the policy's, as before
    assert h.status(POD_B) == 200  # its own per-pod bucket; the /64 has 1 left
    assert h.status(POD_A) == 429  # the pod's own bucket is empty
    assert h.status("2001:db8:1:2::c") == 200  # a third pod: the /64's last unit
    assert h.status("2001:db8:1:2::d") == 429  # the /64's budget is spent


def test_a_limit_may_count_wider_than_the_policy() -> None:
    h = Harness(RateLimit(name="site", rate="1/h", client_ipv6_prefix=48), client_ipv6_prefix=128)
    assert h.status("2001:db8:1:2::1") == 200
    assert h.status("2001:db8:1:ffff::1") == 429  # the same /48
    assert h.contexts[0].client_key == "2001:db8:1::/48"


def test_a_header_keys_ipv6_value_counts_by_the_limits_prefix() -> None:
    h = Harness(
        RateLimit(name="real-ip", rate="1/h", key="header:x-real-ip", client_ipv6_prefix=128)
    )
    assert h.status("10.0.0.1", [(b"x-real-ip", POD_A.encode())]) == 200
    assert h.contexts[-1].client_key == "h:" + POD_A
    assert h.status("10.0.0.1", [(b"x-real-ip", POD_B.encode())]) == 200
    assert h.status("10.0.0.1", [(b"x-real-ip", POD_A.encode())]) == 429
    # no header: the peer address, at the limit's prefix
    assert h.status(POD_A) == 200
    assert h.status(POD_B) == 200


def test_a_key_functions_missing_value_falls_back_to_the_address_at_the_limits_prefix() -> None:
    def tenant(scope: Mapping[str, Any]) -> str | None:
        return None

    h = Harness(RateLimit(name="tenant", rate="1/h", key=tenant, client_ipv6_prefix=128))
    assert [h.status(POD_A), h.status(POD_B), h.status(POD_A)] == [200, 200, 429]


def test_ipv4_clients_are_unchanged() -> None:
    h = Harness(RateLimit(name="svc", rate="1/h", client_ipv6_prefix=128))
    assert [h.status("10.1.2.3"), h.status("10.1.2.4"), h.status("10.1.2.3")] == [200, 200, 429]
    assert h.contexts[0].client_key == "10.1.2.3"


@pytest.mark.parametrize("prefix", [31, 129, "64", True, 64.0])
def test_the_limits_prefix_is_held_to_32_to_128(prefix: Any) -> None:
    with pytest.raises(PolicyError, match=r"client_ipv6_prefix"):
        RateLimit(name="x", client_ipv6_prefix=prefix)


@pytest.mark.parametrize("key", ["route", "global"])
def test_a_prefix_on_a_key_that_counts_no_client_is_an_error(key: str) -> None:
    with pytest.raises(PolicyError, match=r"counts no client address"):
        RateLimit(name="x", key=key, client_ipv6_prefix=128)


def test_the_prefix_loads_from_toml_with_the_policy_wide_one(tmp_path: Path) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text(
        "version = 1\nclient_ipv6_prefix = 56\n"
        '[[rate_limit]]\nname = "public"\nrate = "10/s"\n'
        '[[rate_limit]]\nname = "svc"\nrate = "10/s"\nclient_ipv6_prefix = 128\n'
    )
    policy = Policy.from_toml(path)
    assert policy.client_ipv6_prefix == 56
    assert [lim.client_ipv6_prefix for lim in policy.rate_limits] == [None, 128]
    path.write_text('version = 1\n[[rate_limit]]\nname = "svc"\nclient_ipv6_prefix = 20\n')
    with pytest.raises(PolicyError, match=r"rate_limit\[0\]\.client_ipv6_prefix.*between 32"):
        Policy.from_toml(path)


def test_client_keys_keep_one_cache_per_prefix() -> None:
    keys = ClientKeys(64)
    assert keys.at(None) is keys
    assert keys.at(64) is keys
    at128 = keys.at(128)
    assert at128 is keys.at(128)
    assert at128.prefix == 128
    assert at128.key(POD_A) == POD_A
    assert keys.key(POD_A) == "2001:db8:1:2::/64"


def test_check_warns_below_48(tmp_path: Path) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text(
        "version = 1\nclient_ipv6_prefix = 40\n"
        '[[rate_limit]]\nname = "isp"\nrate = "10/s"\nclient_ipv6_prefix = 32\n'
        '[[rate_limit]]\nname = "site"\nrate = "10/s"\nclient_ipv6_prefix = 48\n'
    )
    result = check_file(path)
    assert result.ok
    said = {w.path: (w.line, w.message) for w in result.warnings}
    assert set(said) == {"client_ipv6_prefix", "rate_limit[0].client_ipv6_prefix"}
    assert said["client_ipv6_prefix"][0] == 2
    assert said["rate_limit[0].client_ipv6_prefix"][0] == 6
    assert "/32 counts every IPv6 client" in said["rate_limit[0].client_ipv6_prefix"][1]
    assert "whole provider" in said["rate_limit[0].client_ipv6_prefix"][1]


def test_map_says_each_limits_prefix() -> None:
    policy = Policy(
        rate_limits=(
            RateLimit(name="public", rate="10/s"),
            RateLimit(name="svc", rate="10/s", client_ipv6_prefix=128),
            RateLimit(name="site", rate="10/s", client_ipv6_prefix=48),
            RateLimit(name="real", rate="10/s", key="header:x-real-ip", client_ipv6_prefix=56),
        )
    )
    text = render(from_policy(policy, "p.toml"), "text")
    rows = text.splitlines()

    def data_of(name: str) -> str:
        at = next(i for i, row in enumerate(rows) if f"limit {name!r}" in row)
        return next(row for row in rows[at:] if "data:" in row)

    lines = {name: data_of(name) for name in ("public", "svc", "site", "real")}
    assert "an IPv6 client by its /64" in lines["public"]
    assert "own client_ipv6_prefix" not in lines["public"]
    assert (
        "an IPv6 client by its whole address (this limit's own client_ipv6_prefix)"
        in (lines["svc"])
    )
    assert "an IPv6 client by its /48 (this limit's own client_ipv6_prefix)" in lines["site"]
    assert "an IPv6 value or client by its /56 (this limit's own" in lines["real"]


def test_the_fastapi_limit_takes_its_own_prefix() -> None:
    fidelity = Fidelity(policy=Policy(), clock=FakeClock())
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("1/h", client_ipv6_prefix=128))])
    async def x() -> dict[str, str]:
        return {}

    async def get(peer: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(peer, 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get("/x")).status_code

    async def run() -> list[int]:
        return [await get(POD_A), await get(POD_B), await get(POD_A)]

    assert asyncio.run(run()) == [200, 200, 429]
    with pytest.raises(PolicyError, match="client_ipv6_prefix"):
        fidelity.limit("1/h", client_ipv6_prefix=16)


def test_an_unset_prefix_leaves_the_policy_version_as_it_was() -> None:
    """Left unset, the key is not part of the normalised policy: an upgrade alone does
    not change the version every process reports (logs, traces, the admin page)."""
    plain = Policy(rate_limits=(RateLimit(name="a"),))
    assert "client_ipv6_prefix" not in plain.to_dict()["rate_limit"][0]
    own = Policy(rate_limits=(RateLimit(name="a", client_ipv6_prefix=128),))
    assert own.to_dict()["rate_limit"][0]["client_ipv6_prefix"] == 128
    assert own.version != plain.version
    assert Policy.from_dict(own.to_dict()) == own
