"""The layer and state map: what each layer decides, where its state lives, what overlaps."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import pytest

from fidelity_mw import Policy
from fidelity_mw.tools.statemap import (
    Layer,
    StateMap,
    build,
    from_app,
    from_policy,
    redact_url,
    render,
)

POLICY = {
    "state": {"url": "memory://"},
    "rate_limit": [{"name": "per-client", "match": "/api/*", "rate": "10/s"}],
    "route": [{"name": "pay", "match": "/pay", "breaker": {"failure_ratio": 0.3}}],
    "upstream": [{"host": "payments.internal"}],
}


def layer(smap: StateMap, direction: str, kind: str, subject: str) -> Layer:
    (found,) = [
        r
        for r in smap.layers
        if r.direction == direction and r.layer == kind and subject in r.subject
    ]
    return found


def test_memory_policy_layers_and_keys():
    smap = from_policy(Policy.from_dict(POLICY), "p.toml")
    pay = layer(smap, "inbound", "breaker", "route pay")
    assert pay.key == "route:pay"
    assert pay.config == "route[0].breaker"
    assert "failure ratio >= 0.3" in pay.data
    assert pay.state.startswith("process memory")
    assert pay.staleness == "none: exact for this process"
    other = layer(smap, "inbound", "breaker", "every other route")
    assert other.key == "route:{route}"
    assert other.config == "breaker"
    limit = layer(smap, "inbound", "ratelimit", "per-client")
    assert limit.key == "per-client|{client}"
    assert "at most 100000 keys" in limit.state
    up_breaker = layer(smap, "outbound", "breaker", "payments.internal")
    assert up_breaker.key == "upstream:{host[:port]}"
    assert layer(smap, "outbound", "budget", "payments.internal").key == "budget:{host[:port]}"
    # hosts no [[upstream]] matches get the defaults, and the map says so
    assert layer(smap, "outbound", "retry", "upstream *").config == "(built-in defaults)"
    assert any("per process" in note for note in smap.notes)


def test_redis_policy_keys_staleness_and_failure_mode():
    data = {**POLICY, "state": {"url": "redis://:hunter2@cache:6379/0", "on_error": "closed"}}
    smap = from_policy(Policy.from_dict(data), "p.toml")
    assert smap.state_url == "redis://:***@cache:6379/0"
    assert "hunter2" not in json.dumps(smap.to_json())
    limit = layer(smap, "inbound", "ratelimit", "per-client")
    assert limit.key == "{fmw}:rl:H(per-client|{client})"
    assert limit.staleness.startswith("about half a round trip")
    assert "503 + Retry-After: 1 (fail closed)" in limit.on_failure
    pay = layer(smap, "inbound", "breaker", "route pay")
    assert pay.key == "{fmw}:br:H(route:pay) + {fmw}:bp:H(route:pay)"
    assert any("blake2b-128" in note for note in smap.notes)


def test_tiered_policy_staleness_is_the_sync_interval():
    data = {**POLICY, "state": {"url": "tiered+redis://cache:6379", "sync_interval_ms": 50}}
    smap = from_policy(Policy.from_dict(data), "p.toml")
    limit = layer(smap, "inbound", "ratelimit", "per-client")
    assert limit.state.startswith("slices of the fleet's bucket in Redis at redis://cache:6379")
    assert limit.staleness.startswith("up to 50 ms (sync_interval_ms)")
    assert "decide on process-local counters" in limit.on_failure
    pay = layer(smap, "inbound", "breaker", "route pay")
    assert pay.state.startswith("a per-process cached copy of the breaker in Redis")
    assert pay.staleness.startswith("at most 50 ms (one sync interval")
    # retry budgets stay exact in Redis in tiered mode (their request counts batched:
    # review 45, the map said they were not)
    budget = layer(smap, "outbound", "budget", "payments.internal")
    assert budget.staleness.startswith("retries: about half a round trip")
    assert "at the latest after one sync interval (50 ms" in budget.staleness
    assert budget.key == "{fmw}:bu:H(budget:{host[:port]})"


def test_disabled_breaker_and_shadow_limit():
    data = {
        "route": [{"match": "/health", "breaker": False}],
        "rate_limit": [{"name": "try", "rate": "1/s", "shadow": True}],
        "breaker": False,
    }
    smap = from_policy(Policy.from_dict(data), "p.toml")
    assert layer(smap, "inbound", "breaker", "/health").decides.startswith("nothing")
    assert not [r for r in smap.layers if "every other route" in r.subject]
    assert "never rejects (shadow)" in layer(smap, "inbound", "ratelimit", "try").decides


def test_redact_url():
    assert redact_url("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
    assert redact_url("redis://h:6379") == "redis://h:6379"


# ---------------------------------------------------------------- apps


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("mapped_", "fastapi_limiter")):
            del sys.modules[name]


def write_module(where: Path, name: str, source: str) -> None:
    (where / f"{name}.py").write_text(textwrap.dedent(source))


def kinds(smap: StateMap) -> list[str]:
    return sorted(w.kind for w in smap.warnings)


def test_example_app_has_one_owner_per_concern():
    smap = from_app("examples/app.py:app")
    assert [e.role for e in smap.stack] == ["fidelity"]
    assert smap.warnings == []
    (client,) = smap.clients
    assert client.name == "payments (AsyncClient)"
    assert client.role == "fidelity"
    assert smap.policy_version == Policy.from_toml("examples/fidelity.toml").version


def test_legacy_app_warns_about_every_overlap():
    smap = from_app("examples.legacy_app:app")
    assert [(e.name, e.role) for e in smap.stack] == [
        ("examples.legacy_app.TimingMiddleware", "base_http"),
        ("slowapi.middleware.SlowAPIMiddleware", "limiter"),
        ("fidelity_mw.inbound.middleware.FidelityMiddleware", "fidelity"),
    ]
    assert kinds(smap) == [
        "base-http-middleware",
        "overlap-limiter",
        "overlap-limiter",
        "overlap-retry",
        "overlap-retry",
        "redis-retries",
    ]
    by_where = {w.where: w.message for w in smap.warnings}
    assert "runs before FidelityMiddleware" in by_where["slowapi.middleware.SlowAPIMiddleware"]
    assert "examples.legacy_app.search" in by_where["app.state.limiter"]
    assert "attempts multiply" in by_where["payments (AsyncClient)"]
    assert "total=5" in by_where["inventory (AsyncClient)"]
    assert "retries 10 times" in by_where["cache"]


def test_plain_asgi_chain_and_built_stack(app_dir: Path):
    write_module(
        app_dir,
        "mapped_plain",
        """
        from starlette.applications import Starlette
        from starlette.middleware.gzip import GZipMiddleware
        from fidelity_mw import FidelityMiddleware, Policy

        inner = Starlette()
        inner.add_middleware(GZipMiddleware)
        inner.build_middleware_stack()
        inner.middleware_stack = inner.build_middleware_stack()
        app = FidelityMiddleware(inner, policy=Policy.from_dict({"breaker": False}))
        """,
    )
    smap = from_app("mapped_plain:app")
    assert [(e.name, e.role) for e in smap.stack] == [
        ("fidelity_mw.inbound.middleware.FidelityMiddleware", "fidelity"),
        ("starlette.middleware.gzip.GZipMiddleware", "framework"),
    ]
    assert smap.warnings == []
    assert not [r for r in smap.layers if r.layer == "breaker" and r.direction == "inbound"]


def test_missing_and_duplicate_fidelity(app_dir: Path):
    write_module(
        app_dir,
        "mapped_none",
        """
        from starlette.applications import Starlette
        app = Starlette()
        """,
    )
    smap = from_app("mapped_none:app")
    assert kinds(smap) == ["no-fidelity"]
    assert smap.layers == []
    write_module(
        app_dir,
        "mapped_twice",
        """
        from starlette.applications import Starlette
        from fidelity_mw import FidelityMiddleware
        app = Starlette()
        app.add_middleware(FidelityMiddleware)
        app.add_middleware(FidelityMiddleware)
        """,
    )
    assert kinds(from_app("mapped_twice:app")) == ["duplicate-fidelity"]


def test_limiter_after_fidelity_and_named_like_a_limiter(app_dir: Path):
    write_module(
        app_dir,
        "mapped_order",
        """
        from starlette.applications import Starlette
        from fidelity_mw import FidelityMiddleware

        class ThrottleMiddleware:
            def __init__(self, app):
                self.app = app
            async def __call__(self, scope, receive, send):
                await self.app(scope, receive, send)

        app = Starlette()
        app.add_middleware(ThrottleMiddleware)
        app.add_middleware(FidelityMiddleware)
        """,
    )
    smap = from_app("mapped_order:app")
    (warning,) = smap.warnings
    assert warning.kind == "overlap-limiter"
    assert "runs after FidelityMiddleware" in warning.message


def test_fastapi_limiter_dependency_and_bypassing_client(app_dir: Path):
    pkg = app_dir / "fastapi_limiter"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "depends.py").write_text(
        "class RateLimiter:\n"
        "    def __init__(self, times, seconds):\n"
        "        self.times = times\n"
        "    async def __call__(self):\n"
        "        return None\n"
    )
    write_module(
        app_dir,
        "mapped_fastapi",
        """
        import httpx
        from fastapi import Depends, FastAPI
        from fastapi_limiter.depends import RateLimiter
        from fidelity_mw import FidelityMiddleware, Policy

        plain = httpx.Client()
        app = FastAPI()
        app.add_middleware(
            FidelityMiddleware, policy=Policy.from_dict({"upstream": [{"host": "x"}]})
        )

        @app.get("/export", dependencies=[Depends(RateLimiter(times=2, seconds=5))])
        async def export():
            return {}
        """,
    )
    smap = from_app("mapped_fastapi:app")
    assert kinds(smap) == ["bypass", "overlap-limiter"]
    by_kind = {w.kind: w for w in smap.warnings}
    assert by_kind["overlap-limiter"].where == "route /export"
    assert by_kind["bypass"].where == "plain (Client)"


def test_fastapi_limiter_on_an_included_router(app_dir: Path):
    pkg = app_dir / "fastapi_limiter"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "depends.py").write_text(
        "class RateLimiter:\n"
        "    def __init__(self, times, seconds):\n"
        "        self.times = times\n"
        "    async def __call__(self):\n"
        "        return None\n"
    )
    write_module(
        app_dir,
        "mapped_router_limiter",
        """
        from fastapi import APIRouter, Depends, FastAPI
        from fastapi_limiter.depends import RateLimiter
        from fidelity_mw import FidelityMiddleware, Policy

        router = APIRouter()
        app = FastAPI()
        app.add_middleware(FidelityMiddleware, policy=Policy())

        @router.get("/report", dependencies=[Depends(RateLimiter(times=2, seconds=5))])
        async def report():
            return {}

        app.include_router(router)
        """,
    )
    smap = from_app("mapped_router_limiter:app")
    assert [(w.kind, w.where) for w in smap.warnings] == [("overlap-limiter", "route /report")]


def test_fastapi_forms_are_layers_of_the_map(app_dir: Path):
    """`Depends(fidelity.limit(...))`, `@fidelity.breaker` and `@fidelity.deadline`
    decide too: the map lists them, on routes of the app and of included routers."""
    write_module(
        app_dir,
        "mapped_forms",
        """
        from fastapi import APIRouter, Depends, FastAPI
        from fidelity_mw import FidelityMiddleware, Policy
        from fidelity_mw.fastapi import Fidelity

        fidelity = Fidelity()
        router = APIRouter(dependencies=[Depends(fidelity.limit("20/min", name="default"))])
        app = FastAPI()
        app.add_middleware(FidelityMiddleware, policy=Policy())

        @router.get("/pay", dependencies=[Depends(fidelity.limit("2/min", key="header:k"))])
        @fidelity.breaker(failure_ratio=0.25, min_calls=10)
        @fidelity.deadline(2_000)
        async def pay():
            return {}

        @app.get("/healthz")
        @fidelity.breaker(False)
        async def healthz():
            return {}

        app.include_router(router)
        """,
    )
    smap = from_app("mapped_forms:app")
    forms = [(r.layer, r.subject) for r in smap.layers if r.config.startswith("fidelity.")]
    assert forms == [
        ("breaker", "route GET /healthz: @fidelity.breaker(False)"),
        ("ratelimit", "route GET /pay: Depends(fidelity.limit('20/min')), per client_ip"),
        ("ratelimit", "route GET /pay: Depends(fidelity.limit('2/min')), per header:k"),
        ("deadline", "route GET /pay: @fidelity.deadline"),
        ("breaker", "route GET /pay: @fidelity.breaker (this route's one breaker)"),
    ]
    shared = layer(smap, "inbound", "ratelimit", "'20/min'")
    assert shared.key == "default|{client}"
    assert "failure ratio >= 0.25" in layer(smap, "inbound", "breaker", "GET /pay").data
    # inbound, before the outbound layers
    directions = [r.direction for r in smap.layers]
    assert directions == sorted(directions, key=lambda d: d != "inbound")


def test_a_limit_with_a_cost_function_says_so_in_the_map(app_dir: Path):
    write_module(
        app_dir,
        "mapped_costs",
        """
        from fastapi import Depends, FastAPI
        from fidelity_mw import FidelityMiddleware, Policy
        from fidelity_mw.fastapi import Fidelity

        fidelity = Fidelity()
        app = FastAPI()
        app.add_middleware(FidelityMiddleware, policy=Policy())

        async def size(request):
            return len(await request.json())

        @app.post("/batch", dependencies=[Depends(fidelity.limit("10/min", cost=size))])
        async def batch():
            return {}

        @app.post("/pair", dependencies=[Depends(fidelity.limit("10/min", cost=2))])
        async def pair():
            return {}
        """,
    )
    smap = from_app("mapped_costs:app")
    assert "cost per request from a function" in layer(smap, "inbound", "ratelimit", "/batch").data
    assert "cost 2 per request" in layer(smap, "inbound", "ratelimit", "/pair").data


def test_redis_client_without_retries_is_quiet(app_dir: Path):
    write_module(
        app_dir,
        "mapped_redis",
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        from starlette.applications import Starlette
        from fidelity_mw import FidelityMiddleware

        quiet = redis.Redis(retry=Retry(NoBackoff(), 0))
        app = Starlette()
        app.add_middleware(FidelityMiddleware)
        """,
    )
    smap = from_app("mapped_redis:app")
    assert smap.warnings == []
    (client,) = smap.clients
    assert client.detail == "redis-py client, 0 retries (NoBackoff)"


def test_build_dispatches_on_the_target(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text('[[rate_limit]]\nname = "a"\nrate = "1/s"\n')
    assert build(str(path)).source == str(path)
    assert build("examples/app.py:app").stack


def test_clients_on_either_fidelity_transport_are_not_bypasses(app_dir: Path):
    write_module(
        app_dir,
        "mapped_sync",
        """
        import httpx
        from starlette.applications import Starlette
        from fidelity_mw import (
            FidelityMiddleware, FidelitySyncTransport, FidelityTransport, Policy,
        )

        policy = Policy.from_dict({"upstream": [{"host": "x"}]})
        sync_client = httpx.Client(transport=FidelitySyncTransport(policy=policy))
        async_client = httpx.AsyncClient(transport=FidelityTransport(policy=policy))
        app = Starlette()
        app.add_middleware(FidelityMiddleware, policy=policy)
        """,
    )
    smap = from_app("mapped_sync:app")
    assert smap.warnings == []
    assert sorted((c.name, c.role) for c in smap.clients) == [
        ("async_client (AsyncClient)", "fidelity"),
        ("sync_client (Client)", "fidelity"),
    ]


@pytest.mark.parametrize(
    ("jitter", "attempts", "expected"),
    [
        ("full", 4, "full jitter: retries wait 0..20, 0..40, 0..80 ms"),
        ("equal", 3, "equal jitter: retries wait 10..20, 20..40 ms"),
        ("none", 5, "no jitter: retries wait 20, 40, 80, 100 ms"),
        ("decorrelated", 3, "first retry waits 20..60 ms"),
        ("full", 1, "no retries"),
    ],
)
def test_retry_waits_match_the_backoff_each_mode_draws(jitter: str, attempts: int, expected: str):
    retry = {"attempts": attempts, "base_ms": 20, "max_ms": 100, "jitter": jitter}
    smap = from_policy(Policy.from_dict({"upstream": [{"host": "x", "retry": retry}]}), "p.toml")
    data = layer(smap, "outbound", "retry", "upstream x").data
    assert expected in data
    assert "20..100" not in data


def test_retry_statuses_given_as_a_class_read_as_a_range():
    retry = {"attempts": 2, "on_status": ["5xx", 429]}
    smap = from_policy(Policy.from_dict({"upstream": [{"host": "x", "retry": retry}]}), "p.toml")
    data = layer(smap, "outbound", "retry", "upstream x").data
    assert "on status 429, 500-599, connect errors" in data
    smap = from_policy(Policy.from_dict({"upstream": [{"host": "x"}]}), "p.toml")
    assert "on status 502, 503, 504, " in layer(smap, "outbound", "retry", "upstream x").data


def test_a_service_shows_its_balancer_and_hedging_state():
    data = {
        "state": {"url": "memory://"},
        "upstream": [
            {
                "host": "payments",
                "instances": ["http://10.0.0.1:8001", "http://10.0.0.2:8002"],
                "max_ejected_ratio": 0.34,
                "hedge": {"after": "p95", "after_ms": 80, "min_samples": 30},
            },
            {"host": "ledger", "hedge": {"after_ms": 40}},
        ],
    }
    smap = from_policy(Policy.from_dict(data), "p.toml")
    lb = layer(smap, "outbound", "lb", "payments")
    assert lb.config == "upstream[0].instances"
    assert "2 instances" in lb.data
    assert "requests in flight" in lb.data
    assert "latency EWMA" in lb.data
    assert "at most 34% ejected" in lb.data
    assert lb.key == "upstream:{instance host:port}"
    assert "read fresh" in lb.staleness  # memory state: the balancer peeks each pick
    hedge = layer(smap, "outbound", "hedge", "payments")
    assert "p95" in hedge.data
    assert "30" in hedge.data
    assert "80 ms" in hedge.data
    assert "process memory" in hedge.state
    fixed = layer(smap, "outbound", "hedge", "ledger")
    assert fixed.data == "hedge delay: fixed 40 ms"
    assert fixed.state == "none: the policy"
    # a plain upstream has no balancer row; the text rendering names both layers
    assert not [r for r in smap.layers if r.layer == "lb" and "ledger" in r.subject]
    text = render(smap, "text")
    assert "lb — upstream payments  [upstream[0].instances]" in text
    assert "hedge — upstream ledger  [upstream[1].hedge]" in text


def test_a_service_on_redis_learns_instance_breakers_from_answers():
    data = {
        "state": {"url": "redis://cache:6379/0"},
        "upstream": [{"host": "payments", "instances": ["http://10.0.0.1:8001"]}],
    }
    smap = from_policy(Policy.from_dict(data), "p.toml")
    lb = layer(smap, "outbound", "lb", "payments")
    assert (
        lb.key
        == "{fmw}:br:H(upstream:{instance host:port}) + {fmw}:bp:H(upstream:{instance host:port})"
    )
    assert "last learned" in lb.staleness


def test_counts_of_one_read_as_english():
    """`map` said "1 attempts total" and "1 half-open probes" for a call sent once and a
    breaker that lets one probe through."""
    data = {
        "breaker": {"half_open_probes": 1},
        "upstream": [{"host": "pay", "retry": {"attempts": 1}}, {"host": "inv"}],
    }
    layers = from_policy(Policy.from_dict(data), "p").layers
    text = json.dumps([dataclasses.asdict(layer) for layer in layers])
    assert "1 attempt total" in text
    assert "1 half-open probe" in text
    assert "1 attempts" not in text
    assert "1 half-open probes" not in text
    assert "3 attempts total" in text  # `inv`: the default, plural as before
