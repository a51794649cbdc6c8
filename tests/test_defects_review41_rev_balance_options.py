"""Review 41: the balancer's failure penalty is a policy option of a service.

Right after an instance failed an attempt the balancer took it for 4x the slowest
instance, fading over 10 s (`decide.balance.FAILURE_PENALTY`, `FAILURE_FADE_S`):
constants no policy could change, where Envoy's outlier detection lets an operator
tune its own. `[[upstream]]` now has `failure_penalty` and `failure_fade_s` (defaults
unchanged, and left out of a policy's version while at them), validated with errors
that name the field, read when the host's plan is built (so a policy swapped in at run
time takes effect), and shown by `fidelity-mw map` and the admin page.

Fake clock and seeded randomness; the network is httpx.MockTransport.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport
from fidelity_mw.admin.view import balancers
from fidelity_mw.decide.balance import FAILURE_FADE_S, FAILURE_PENALTY, InstanceView, choose
from fidelity_mw.engine import Engine
from fidelity_mw.errors import PolicyError
from fidelity_mw.policy import Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.statemap import from_policy

pytestmark = pytest.mark.anyio

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002")
BAD = "10.0.0.1:8001"


def service(**cfg: Any) -> UpstreamConfig:
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2)  # a 500 is not retried
    return UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, breaker=None, **cfg)


class Net:
    """Two instances; the first answers 500 until `healed`, each answer takes 10 ms."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.seen: list[str] = []
        self.healed = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        self.seen.append(key)
        self.clock.advance(0.010)
        return httpx.Response(500 if key == BAD and not self.healed else 200)


async def calls_to_the_failed_one(policy: Policy, *, after_s: float) -> int:
    """Calls until the failing instance has failed once, then heal it, wait `after_s`,
    and count how many of 40 calls go to it."""
    clock = FakeClock()
    net = Net(clock)
    engine = Engine(policy, clock=clock, rng=seeded_random(7), store=MemoryStore())
    transport = FidelityTransport(httpx.MockTransport(net), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        while BAD not in net.seen:
            await client.get("http://payments/pay")
        net.healed = True
        clock.advance(after_s)
        net.seen.clear()
        for _ in range(40):
            await client.get("http://payments/pay")
    return net.seen.count(BAD)


async def test_the_defaults_keep_a_failed_instance_out_for_a_while() -> None:
    assert await calls_to_the_failed_one(Policy(upstreams=(service(),)), after_s=2.0) == 0


async def test_a_shorter_fade_brings_it_back_sooner() -> None:
    policy = Policy(upstreams=(service(failure_fade_s=1.0),))
    assert await calls_to_the_failed_one(policy, after_s=2.0) >= 10


async def test_a_penalty_of_one_weighs_it_no_slower_than_the_slowest() -> None:
    policy = Policy(upstreams=(service(failure_penalty=1.0),))
    assert await calls_to_the_failed_one(policy, after_s=2.0) >= 10


async def test_a_policy_swapped_in_takes_the_new_values() -> None:
    clock = FakeClock()
    net = Net(clock)
    engine = Engine(Policy(upstreams=(service(),)), clock=clock, rng=seeded_random(7))
    transport = FidelityTransport(httpx.MockTransport(net), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://payments/pay")
        engine.policy = Policy(upstreams=(service(failure_penalty=2.5, failure_fade_s=3.0),))
        await client.get("http://payments/pay")
    plan = transport._upstreams[("payments", None)]
    assert (plan.failure_penalty, plan.failure_fade_s) == (2.5, 3.0)


def test_choose_weighs_by_the_values_it_is_given() -> None:
    now = 100.0
    views = [
        InstanceView(0, 0.010, 0.0, 0.0, failed_at=now - 2.0),
        InstanceView(0, 0.010, 0.0, 0.0),
    ]

    def zero() -> float:
        return 0.0

    assert choose(views, (), now, zero).chosen == 1  # draws 0, then 1: the pair (0, 1)
    for options in ({"failure_fade_s": 1.0}, {"failure_penalty": 1.0}):
        assert choose(views, (), now, zero, **options).chosen == 0  # a tie: the first


# ---------------------------------------------------------------- the policy


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("failure_penalty", 0.5, r"failure_penalty: 0\.5 is out of range: allowed >= 1\.0"),
        ("failure_penalty", "4x", r"failure_penalty: expected a number"),
        ("failure_fade_s", 0, r"failure_fade_s: 0 is out of range: allowed > 0\.0"),
        ("failure_fade_s", -1.0, r"failure_fade_s: -1\.0 is out of range"),
    ],
)
def test_bad_values_are_refused_by_name(field: str, value: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        UpstreamConfig(host="payments", **{field: value})


def test_a_toml_error_names_the_entry_and_field(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[[upstream]]\nhost = "payments"\nfailure_fade_s = 0\n')
    with pytest.raises(PolicyError, match=r"upstream\[0\]\.failure_fade_s"):
        Policy.from_toml(path)


def test_the_defaults_are_the_constants_and_move_no_version(tmp_path: Path) -> None:
    cfg = UpstreamConfig(host="payments")
    assert (cfg.failure_penalty, cfg.failure_fade_s) == (FAILURE_PENALTY, FAILURE_FADE_S)
    plain = Policy(upstreams=(UpstreamConfig(host="payments"),))
    spelled = Policy(
        upstreams=(UpstreamConfig(host="payments", failure_penalty=4, failure_fade_s=10.0),)
    )
    assert spelled.version == plain.version
    assert "failure_penalty" not in plain.to_dict()["upstream"][0]
    tuned = Policy(upstreams=(UpstreamConfig(host="payments", failure_penalty=2.0),))
    assert tuned.version != plain.version
    assert tuned.to_dict()["upstream"][0]["failure_penalty"] == 2.0
    path = tmp_path / "policy.toml"
    path.write_text('[[upstream]]\nhost = "payments"\nfailure_penalty = 2.0\n')
    assert Policy.from_toml(path) == tuned


# ---------------------------------------------------------------- where it is shown


def test_the_map_says_the_services_values() -> None:
    policy = Policy(upstreams=(service(failure_penalty=2.5, failure_fade_s=3.0),))
    smap = from_policy(policy, "policy.toml")
    lb = [layer for layer in smap.layers if layer.layer == "lb"]
    assert lb, [layer.layer for layer in smap.layers]
    assert "taken for 2.5x the slowest, fading over 3 s" in lb[0].data


async def test_the_admin_page_weighs_by_the_services_fade() -> None:
    clock = FakeClock()
    net = Net(clock)
    policy = Policy(upstreams=(service(failure_penalty=2.5, failure_fade_s=4.0),))
    engine = Engine(policy, clock=clock, rng=seeded_random(7))
    transport = FidelityTransport(httpx.MockTransport(net), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        while BAD not in net.seen:
            await client.get("http://payments/pay")
    failed_at = next(i.failed_at for i in transport._upstreams[("payments", None)].instances or ())
    clock.advance(failed_at + 2.0 - clock.monotonic())
    rows, _ = balancers(engine, clock.monotonic())
    bad = next(row for row in rows if row["instance"] == BAD)
    assert bad["failure_weight"] == pytest.approx(0.5)  # 2 s of 4; with the default 10: 0.8
    assert bad["failure_penalty"] == 2.5
