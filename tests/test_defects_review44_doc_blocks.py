"""The user's pages' code blocks that tests/test_docs.py does not run (fragments that
need an app around them, policies shown for reading), run here with what they need
around them, each against what its page says it does.

- README.md: "Two lines in your app" and its policy file;
- quickstart.md, step 6: the three `fidelity-mw map` commands on the page's policy;
- fastapi.md: "Without the middleware" (the route class: 504 on an expired deadline,
  503 while the breaker sheds, what counts as a failure) and the app's own
  `RateLimited` handler;
- telemetry.md: the providers given to the middleware and the transport;
- outbound.md: a service's instances (`await client.get("http://payments/charge")`
  goes to one of them) and its `# default` comments;
- every TOML block of these pages is a policy `fidelity-mw check` accepts.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.testing import FakeClock, seeded_random
from test_docs import FENCE, ROOT, run_cli

PAGES = ("README.md", "quickstart.md", "migration.md", "fastapi.md", "inbound.md")
PAGES += ("outbound.md", "policy.md", "telemetry.md")


def page(name: str) -> Path:
    return ROOT / name if name == "README.md" else ROOT / "docs" / name


def fenced(name: str, lang: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every `lang` block of a page."""
    lines = page(name).read_text(encoding="utf-8").splitlines()
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith(m.group(1)):
            j += 1
        if m.group("lang") == lang:
            out.append((i + 1, "\n".join(lines[i + 1 : j]) + "\n"))
        i = j + 1
    return out


def block_after(name: str, heading: str, lang: str) -> str:
    """The first `lang` block after a heading (or any text) of a page."""
    text = page(name).read_text(encoding="utf-8")
    at = text.index(heading)
    line = text[:at].count("\n") + 1
    return next(code for start, code in fenced(name, lang) if start > line)


# the blocks no `<!-- runnable -->` marker has tests/test_docs.py validate or use
TOMLS = [
    (name, line, code)
    for name in PAGES
    for line, code in fenced(name, "toml")
    if not page(name).read_text(encoding="utf-8").splitlines()[line - 2].startswith("<!--")
]


@pytest.mark.parametrize(("name", "line", "code"), TOMLS, ids=[f"{n}:{ln}" for n, ln, _ in TOMLS])
def test_every_policy_shown_is_valid(name: str, line: int, code: str, tmp_path: Path) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text(code, encoding="utf-8")
    status, output = run_cli(["check", str(path)])
    assert status == 0, f"{name}:{line}: {output}"


def test_the_default_comments_are_the_defaults() -> None:
    """`key = value  # default` (and `# a = 1, b = 20   # defaults`) in a page's TOML
    is the key's default."""
    from fidelity_mw.policy import HedgeConfig, UpstreamConfig

    upstream, hedge = UpstreamConfig(), HedgeConfig()
    seen = 0
    for name, _line, code in TOMLS:
        for key, value in re.findall(r"^(\w+) = (\S+)\s+# default", code, flags=re.M):
            assert float(value) == getattr(upstream, key), f"{name}: {key}"
            seen += 1
        for listed in re.findall(r"^# (.*?)\s+# defaults$", code, flags=re.M):
            for key, value in re.findall(r"(\w+) = (\d+)", listed):
                assert int(value) == getattr(hedge, key), f"{name}: {key}"
                seen += 1
    assert seen == 6


# ---------------------------------------------------------------- README


def test_readme_two_lines_with_its_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two lines, in an app, with the README's policy file as `fidelity.toml`: the
    app answers through the middleware (the policy's limit and deadline on its requests)
    and the client's transport is the retry layer."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    (_, policy), (_, two_lines) = fenced("README.md", "toml")[0], fenced("README.md", "python")[0]
    (tmp_path / "fidelity.toml").write_text(policy, encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    async def items(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/api/items", items)])
    namespace: dict[str, Any] = {"app": app, "__name__": "readme"}
    exec(compile(two_lines, "README.md (two lines)", "exec"), namespace)
    assert isinstance(namespace["client"]._transport, FidelityTransport)

    async def one() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/api/items")

    response = asyncio.run(one())
    assert response.status_code == 200
    # the README's limit: `rate = "100/s"`, `burst = 200`
    assert response.headers["ratelimit-policy"].startswith('"per-client";q=')
    assert Policy.from_toml("fidelity.toml").deadline.default_ms == 30_000


# ---------------------------------------------------------------- quickstart step 6


def test_quickstart_map_commands_run_on_its_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = block_after("quickstart.md", "## 2. Write a policy", "toml")
    (tmp_path / "fidelity.toml").write_text(policy, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    commands = block_after("quickstart.md", "## 6. See every layer", "bash")
    ran = 0
    for line in commands.splitlines():
        argv = line.split("#")[0].split()
        assert argv[0] == "fidelity-mw"
        status, output = run_cli(argv[1:])
        assert status == 0, output
        if "json" in argv:
            json.loads(output)
        if "markdown" in argv:
            assert "```mermaid" in output
        assert "per-client" in output
        ran += 1
    assert ran == 3


# ---------------------------------------------------------------- fastapi.md


def test_fastapi_without_the_middleware_does_what_the_page_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route class alone: 504 on a deadline passed on arrival, `current()` set for
    the handler, 503 while the route's breaker sheds; another form's 429 is not counted,
    a 4xx `HTTPException` is counted as a success (the page said it did not count)."""
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request

    from fidelity_mw import current

    (tmp_path / "fidelity.toml").write_text(
        "[breaker]\nmin_calls = 2\nfailure_ratio = 0.5\nopen_min_s = 5\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    code = block_after("fastapi.md", "## Without the middleware", "python")
    namespace: dict[str, Any] = {"__name__": "forms"}
    exec("from fastapi import APIRouter\nfrom fidelity_mw import Policy\n", namespace)
    exec("from fidelity_mw.fastapi import Fidelity\n", namespace)
    exec(compile(code, "fastapi.md (without the middleware)", "exec"), namespace)
    fidelity, router = namespace["fidelity"], namespace["router"]
    assert isinstance(router, APIRouter)
    seen: list[bool] = []

    def user(request: Request) -> str:
        return request.headers["x-user"]

    @router.get("/orders/{n}", dependencies=[Depends(fidelity.limit("1/min", key=user))])
    async def order(n: int) -> dict[str, int]:
        seen.append(current() is not None)
        if n >= 400:
            raise HTTPException(n)
        return {"n": n}

    app = FastAPI()
    app.include_router(router)
    script = [
        ("a", "/orders/1", "0"),  # the caller's deadline passed on arrival: 504
        ("a", "/orders/1", None),  # a success
        ("a", "/orders/1", None),  # the limit's 429: not counted
        ("b", "/orders/404", None),  # a success: 1 failure in 3 calls after the next
        ("c", "/orders/500", None),
        ("d", "/orders/500", None),  # 2 of 4 calls failed: it opens
        ("e", "/orders/1", None),
    ]

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = []
            for who, path, timeout in script:
                headers = {"x-user": who}
                if timeout is not None:
                    headers["x-request-timeout-ms"] = timeout
                out.append((await c.get(path, headers=headers)).status_code)
            return out

    # a 429 counted as a success would leave it closed (2 of 5), a 404 left uncounted
    # would open it a call earlier (1 of 2)
    assert asyncio.run(run()) == [504, 200, 429, 404, 500, 500, 503]
    assert seen
    assert all(seen)


def test_fastapi_an_apps_own_ratelimited_handler_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "An app's own handler for any of these classes takes precedence", the page's
    handler as written; and without `install`, FastAPI's `{"detail": ...}` with the
    status and `Retry-After`."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse

    from fidelity_mw.fastapi import Fidelity, RateLimited

    def build(with_handler: bool) -> FastAPI:
        fidelity = Fidelity()
        app = FastAPI()
        app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock())

        @app.get("/x", dependencies=[Depends(fidelity.limit("1/min"))])
        async def x() -> str:
            return "ok"

        if with_handler:
            namespace = {"app": app, "Request": Request, "JSONResponse": JSONResponse}
            namespace["RateLimited"] = RateLimited
            code = block_after("fastapi.md", "An app's own handler for any", "python")
            exec(compile(code, "fastapi.md (own handler)", "exec"), namespace)
            fidelity.install(app)
        return app

    async def two(app: FastAPI) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.get("/x")
            return await c.get("/x")

    own = asyncio.run(two(build(True)))
    assert (own.status_code, own.json()) == (429, {"error": "slow down"})
    assert own.headers["retry-after"].isdigit()
    plain = asyncio.run(two(build(False)))
    assert plain.status_code == 429
    assert set(plain.json()) == {"detail"}
    assert plain.headers["retry-after"].isdigit()


# ---------------------------------------------------------------- telemetry.md


def test_telemetry_providers_given_to_the_middleware_and_the_transport() -> None:
    """ "the middleware and both transports take the providers for this app only":
    the page's two lines record the server span, the client span and the metrics on
    the providers given, none on the global ones."""
    from opentelemetry import trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    upstream = httpx.MockTransport(lambda request: httpx.Response(200))

    async def hello(request: Any) -> PlainTextResponse:
        await namespace["client"].get("http://up.internal/")
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/hello", hello)])
    code = block_after("telemetry.md", "Like OpenTelemetry's own instrumentations", "python")
    assert "FidelityTransport(tracer_provider=tracer_provider)" in code
    code = code.replace(
        "FidelityTransport(tracer_provider", "FidelityTransport(upstream, tracer_provider"
    )
    namespace: dict[str, Any] = {
        "app": app,
        "policy": Policy(),
        "tracer_provider": tracer_provider,
        "meter_provider": meter_provider,
        "httpx": httpx,
        "FidelityMiddleware": FidelityMiddleware,
        "FidelityTransport": FidelityTransport,
        "upstream": upstream,
    }
    exec(compile(code, "telemetry.md (providers)", "exec"), namespace)

    async def one() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get("/hello")).status_code

    assert asyncio.run(one()) == 200
    kinds = sorted(span.kind.name for span in exporter.get_finished_spans())
    assert kinds == ["CLIENT", "SERVER"]
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"fidelity.requests", "fidelity.decisions"} <= names
    assert not isinstance(trace.get_tracer_provider(), TracerProvider) or (
        trace.get_tracer_provider() is not tracer_provider
    )


# ---------------------------------------------------------------- outbound.md


def test_outbound_a_services_instances_take_its_calls() -> None:
    """The page's `[[upstream]] host = "payments"` with three instances and its one
    line: every call to the logical host goes to one of the instances."""
    toml = block_after("outbound.md", "A service reached through several instances", "toml")
    line = block_after("outbound.md", "A service reached through several instances", "python")
    policy = Policy.from_dict(tomllib.loads(toml))
    instances = set(policy.upstreams[0].instances)
    reached: list[str] = []

    def instance(request: httpx.Request) -> httpx.Response:
        reached.append(f"{request.url.scheme}://{request.url.host}:{request.url.port}")
        return httpx.Response(200)

    client = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(instance), policy=policy, clock=FakeClock(), rng=seeded_random(0)
        )
    )
    namespace: dict[str, Any] = {"client": client}
    exec(f"async def call():\n    {line.strip()}\n", namespace)

    async def calls() -> None:
        for _ in range(30):
            await namespace["call"]()

    asyncio.run(calls())
    assert len(reached) == 30
    assert set(reached) <= instances
    assert len(set(reached)) >= 2
