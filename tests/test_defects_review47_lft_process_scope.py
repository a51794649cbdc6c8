"""A process's own breaker (`scope = "process"`) as the gauge and the admin page name it.

On a shared store such a breaker is kept under its key + "@" + the process's id (16 hex
digits, random per start: docs/state.md). The memory store keeps it under the plain key
and the Redis gauge names it from decisions (the plain host), but a tiered store's gauge,
read from its local copy, named it `10.0.0.7:8080@<id>`: another series per restart, and
an alert written for `10.0.0.7:8080` (as on the other stores) never matched. The admin
page's `subject` column said `<host>@<id>` on Redis and tiered, the host on memory.

Now every store kind names it by the route or host (`fidelity.subject`, the page's
`subject`); the page's `key` is the stored key, `@<id>` included, as `fidelity-mw map`
shows it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.admin.view import Since, render, snapshot_configs
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT
from test_telemetry_helpers import metric_points, pipeline

pytestmark = pytest.mark.anyio

OWN = {"consecutive_failures": 1, "min_calls": 1, "scope": "process"}


def _gauge(reader: Any) -> list[tuple[str, str | None]]:
    return sorted(
        {
            (a[schema.SUBJECT], a.get(schema.BREAKER_SCOPE))
            for a, _point in metric_points(reader, schema.METRIC_BREAKER_STATE)
        }
    )


@pytest.mark.parametrize("kind", ["memory", "redis", "tiered"])
async def test_a_process_breaker_is_named_by_its_host_in_every_store(
    kind: str, request: pytest.FixtureRequest
) -> None:
    data: dict[str, Any] = {
        "upstream": [
            {
                "host": "payments",
                "instances": ["http://10.0.0.7:8080", "http://10.0.0.8:8080"],
                "retry": {"attempts": 2},
                "breaker": OWN,
            },
            {"host": "plain.internal", "retry": {"attempts": 1}, "breaker": OWN},
        ]
    }
    if kind != "memory":
        url = request.getfixturevalue("redis_url")
        data["state"] = {"url": ("tiered+" if kind == "tiered" else "") + url, **PATIENT}
    clock = FakeClock()
    engine = Engine(Policy.from_dict(data), clock=clock, rng=seeded_random(7))
    p = pipeline()

    def upstream(r: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if r.url.host in ("10.0.0.7", "plain.internal") else 200)

    transport = FidelityTransport(
        httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
    )
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(6):
                await client.get("http://payments/x")
            await client.get("http://plain.internal/x")
        # before, tiered: ('10.0.0.7:8080@<id>', 'upstream'), ...
        assert _gauge(p.metrics) == [
            ("10.0.0.7:8080", "upstream"),
            ("10.0.0.8:8080", "upstream"),
            ("plain.internal", "upstream"),
        ]
        configs = snapshot_configs(engine)
        snap = await engine.store.snapshot(clock.monotonic(), configs=configs)
        page = render(engine, snap, clock.monotonic(), Since(), str, configs=configs)
        rows = sorted((b["subject"], b["key"]) for b in page["breakers"])
        # before, Redis and tiered: subject '10.0.0.7:8080@<id>'
        assert [subject for subject, _ in rows] == [
            "10.0.0.7:8080",
            "10.0.0.8:8080",
            "plain.internal",
        ]
        own = getattr(engine.store, "process_id", None) or getattr(
            getattr(engine.store, "exact", None), "process_id", None
        )
        if kind == "memory":
            assert own is None
            assert [key for _, key in rows] == [f"upstream:{s}" for s, _ in rows]
        else:  # the stored key, as `fidelity-mw map` names it: `...@{process id}`
            assert isinstance(own, str)
            assert [key for _, key in rows] == [f"upstream:{s}@{own}" for s, _ in rows]
    finally:
        await engine.aclose()
        p.shutdown()
