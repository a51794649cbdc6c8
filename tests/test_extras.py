"""The core install: memory state and the OpenTelemetry API only. Optional extras (redis,
otel, prometheus) are never imported on the core path, and asking for Redis state
without its extra fails at store creation with the pip command that fixes it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fidelity_mw import Policy
from fidelity_mw.errors import PolicyError

BLOCKED = ("redis", "opentelemetry.sdk", "opentelemetry.exporter", "prometheus_client")

# A meta-path finder that refuses the optional extras, as if they were not installed,
# then the core path end to end: import, a memory-state app served through the
# middleware with default telemetry, an outbound call through the transport.
SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Refuse())

    import asyncio
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import fidelity_mw
    from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, RateLimit
    from fidelity_mw.errors import PolicyError

    async def hello(request):
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/hello", hello)])
    policy = Policy(rate_limits=[RateLimit(name="per-client", rate="1/s", burst=1)])
    app.add_middleware(FidelityMiddleware, policy=policy)

    def upstream(request):
        return httpx.Response(200, text="up")

    async def main():
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = [(await client.get("/hello")).status_code for _ in range(2)]
        outbound = FidelityTransport(httpx.MockTransport(upstream))
        async with httpx.AsyncClient(transport=outbound) as client:
            statuses.append((await client.get("http://up.example/x")).status_code)
        return statuses

    assert asyncio.run(main()) == [200, 429, 200]

    for url in ("redis://127.0.0.1:6379/0", "tiered+redis://127.0.0.1:6379/0"):
        try:
            FidelityMiddleware(app, policy=Policy.from_dict({{"state": {{"url": url}}}}))
        except PolicyError as exc:
            print("ERROR", str(exc).replace("\\n", " "))
        else:
            raise SystemExit(f"{{url}}: no PolicyError without the redis extra")

    from fidelity_mw.telemetry import configure_otel

    try:
        configure_otel("svc")
    except ImportError as exc:
        print("OTEL", exc)

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("redis", "prometheus_client")
                    or m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))
    print("LOADED", loaded)
    """
).format(blocked=BLOCKED)


def test_core_path_runs_without_the_extras_and_names_the_redis_extra() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2
    for line in errors:
        assert "pip install 'fidelity-mw[redis]'" in line
        assert "state.url" in line
    assert "LOADED []" in proc.stdout
    assert "OTEL configure_otel needs the OpenTelemetry SDK: pip install 'fidelity-mw[otel]'" in (
        proc.stdout
    )


def test_redis_url_error_does_not_echo_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from fidelity_mw.state import factory

    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(PolicyError) as info:
        factory._require_redis_client("rediss://:hunter2@cache.internal:6380/0")
    assert "hunter2" not in str(info.value)
    assert "rediss://" in str(info.value)


def test_memory_url_needs_no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    from fidelity_mw.engine import Engine

    monkeypatch.setitem(sys.modules, "redis", None)
    engine = Engine(policy=Policy())
    assert type(engine.store).__name__ == "MemoryStore"
