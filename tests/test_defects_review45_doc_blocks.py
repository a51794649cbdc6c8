"""Every code block of the user's pages is run by a test, or listed here with why not.

tests/test_docs.py runs the `<!-- runnable -->` blocks; tests/test_defects_review44_*
ran more (the TOML blocks as policies, the `prints` blocks, the fragments that need an
app around them, the migration "Before" blocks of slowapi, tenacity and pybreaker).
19 of the 69 blocks were run by nothing. `COVERED` names the test that runs each block
without a marker, `NOT_RUN` says why a block cannot run; a block that is in neither (a
block added later) fails `test_every_block_is_run_or_says_why`, and so does an entry
that names no block (a block edited away).

The blocks run here, each against what its page says it does:
- quickstart.md, step 9: the pytest plugin's conftest and test, run by pytest;
- migration.md: `fidelity-mw audit` / `map` as step 0 gives them; the limits, stamina,
  httpx-retries, nopanic and pyresilience "Before" blocks on the real libraries against
  the page's "After"; throttled-py's "Before" (its `def` route's TypeError at import);
  the redis-py client of "redis-py clients of your own" against a real redis-server;
- outbound.md: the two transports, and the inner transport with the client's settings;
- policy.md: `Policy.from_toml("fidelity.toml")`;
- telemetry.md: `configure_otel(service_name="checkout")` in a process of its own
  (its example trace: tests/test_defects_review45_doc_trace.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport, Policy
from fidelity_mw.testing import FakeClock
from test_defects_review44_doc_blocks import PAGES, fenced, page
from test_defects_review45_doc_audit_forms import CONNECT, Upstream, hint_of
from test_docs import ROOT, run_cli

MIGRATION = "migration.md"
D44 = "tests/test_defects_review44_doc_blocks.py"
D44M = "tests/test_defects_review44_doc_migration.py"
HERE = "tests/test_defects_review45_doc_blocks.py"

# (page, a line of the block) -> the test that runs it
COVERED: dict[tuple[str, str], str] = {
    ("README.md", "client = httpx.AsyncClient(transport=FidelityTransport())"): (
        f"{D44}::test_readme_two_lines_with_its_policy_file"
    ),
    ("quickstart.md", "fidelity-mw map fidelity.toml --format markdown"): (
        f"{D44}::test_quickstart_map_commands_run_on_its_policy"
    ),
    ("quickstart.md", 'pytest_plugins = ["fidelity_mw.pytest_plugin"]'): (
        f"{HERE}::test_quickstart_pytest_plugin_block"
    ),
    (MIGRATION, "fidelity-mw audit src/ --fail-on any"): f"{HERE}::test_migration_step_0",
    (MIGRATION, "from slowapi import Limiter"): (
        f"{D44M}::test_slowapi_before_is_slowapis_api_and_admits_what_the_after_admits"
    ),
    (MIGRATION, "from limits import parse"): f"{HERE}::test_limits_before",
    (MIGRATION, "from tenacity import retry, retry_if_exception_type"): (
        f"{D44M}::test_tenacity_before_and_after_call_the_upstream_as_often"
    ),
    (MIGRATION, "@stamina.retry(on=httpx.HTTPError, attempts=3"): f"{HERE}::test_stamina_before",
    (MIGRATION, "payments_breaker = pybreaker.CircuitBreaker("): (
        f"{D44M}::test_pybreaker_before_and_after_reach_the_upstream_on_the_same_calls"
    ),
    (MIGRATION, "from httpx_retries import Retry, RetryTransport"): (
        f"{HERE}::test_httpx_retries_before"
    ),
    (MIGRATION, "from nopanic import"): f"{HERE}::test_toolkit_befores_against_the_after",
    (MIGRATION, "from pyresilience import"): f"{HERE}::test_toolkit_befores_against_the_after",
    (MIGRATION, "from throttled.asyncio import RedisStore"): f"{HERE}::test_throttled_before",
    (MIGRATION, "from redis.asyncio import Redis"): f"{HERE}::test_redis_py_client_fails_fast",
    ("fastapi.md", 'fidelity = Fidelity(policy=Policy.from_toml("fidelity.toml"))'): (
        f"{D44}::test_fastapi_without_the_middleware_does_what_the_page_says"
    ),
    ("fastapi.md", "@app.exception_handler(RateLimited)"): (
        f"{D44}::test_fastapi_an_apps_own_ratelimited_handler_answers"
    ),
    ("outbound.md", "sync_client = httpx.Client(transport=FidelitySyncTransport())"): (
        f"{HERE}::test_outbound_the_two_transports"
    ),
    ("outbound.md", 'proxy="http://proxy.internal:3128"'): (
        f"{HERE}::test_outbound_settings_on_the_inner_transport"
    ),
    ("outbound.md", 'await client.get("http://payments/charge")'): (
        f"{D44}::test_outbound_a_services_instances_take_its_calls"
    ),
    ("policy.md", 'policy = Policy.from_toml("fidelity.toml")'): f"{HERE}::test_policy_from_toml",
    ("telemetry.md", 'configure_otel(service_name="checkout")'): (
        f"{HERE}::test_configure_otel_block"
    ),
    ("telemetry.md", "frontend SERVER GET /orders/{sku}"): (
        "tests/test_defects_review45_doc_trace.py::test_the_example_trace_is_the_run"
    ),
    ("telemetry.md", '"name": "fidelity.decision"'): (
        "tests/test_defects_review45_doc_trace.py::test_the_exported_event_is_the_sheds"
    ),
    ("telemetry.md", "tracer_provider=tracer_provider, meter_provider=meter_provider)"): (
        f"{D44}::test_telemetry_providers_given_to_the_middleware_and_the_transport"
    ),
}

# (page, a line of the block) -> why no test runs it
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "bash scripts/demo.sh"): (
        "shell: builds a venv from the package registry and runs the demo or the whole "
        "suite (minutes); the scripts' existence is checked here, the demo by test_demo*"
    ),
    ("README.md", "| fidelity (healthy path -> success)"): (
        "the figures of one real-time run on a quiet machine; docs/demo.md explains them "
        "and the demo's own tests check how they are counted"
    ),
    ("quickstart.md", "python3 -m venv .venv"): (
        "shell: installs from the package registry; the `dev` extra is checked here"
    ),
    ("quickstart.md", "pip install 'fidelity-mw[otel]'"): (
        "shell: installs from the package registry; the `otel` extra is checked here"
    ),
}


def all_blocks() -> list[tuple[str, int, str, str]]:
    """(page, opening fence's line, lang, code) of every fenced block of the pages."""
    found = []
    for name in PAGES:
        lines = page(name).read_text(encoding="utf-8").splitlines()
        langs: dict[int, str] = {}
        for i, line in enumerate(lines):
            m = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", line)
            if m:
                langs[i + 1] = m.group(2)
        for lang in set(langs.values()):
            for start, code in fenced(name, lang):
                found.append((name, start, lang, code))
    return sorted(found)


def _marked(name: str, line: int) -> bool:
    return page(name).read_text(encoding="utf-8").splitlines()[line - 2].startswith("<!--")


def _printed(name: str, line: int) -> bool:
    """A block shown as what the runnable block before it prints
    (tests/test_defects_review44_doc_prints.py compares them)."""
    lines = page(name).read_text(encoding="utf-8").splitlines()
    before = [ln for ln in lines[: line - 1] if ln.strip()]
    return bool(before) and re.match(r"prints\b", before[-1]) is not None


def block(name: str, line_in_it: str) -> str:
    (code,) = [c for n, _, _, c in all_blocks() if n == name and line_in_it in c]
    return code


def how_run(name: str, line: int, lang: str, code: str) -> str:
    if _marked(name, line):
        return "tests/test_docs.py (<!-- runnable -->)"
    if lang == "toml":
        return f"{D44}::test_every_policy_shown_is_valid"
    if _printed(name, line):
        return "tests/test_defects_review44_doc_prints.py (what the block before prints)"
    keys = [key for key in (*COVERED, *NOT_RUN) if key[0] == name and key[1] in code]
    if len(keys) != 1:
        return ""
    return COVERED.get(keys[0]) or f"not run: {NOT_RUN[keys[0]]}"


def test_every_block_is_run_or_says_why() -> None:
    blocks = all_blocks()
    assert len(blocks) >= 69
    missing = [f"{n}:{ln}" for n, ln, lang, code in blocks if not how_run(n, ln, lang, code)]
    assert not missing, f"blocks no test runs and no reason is listed for: {missing}"
    for key in (*COVERED, *NOT_RUN):
        hits = [(n, ln) for n, ln, _, code in blocks if n == key[0] and key[1] in code]
        assert len(hits) == 1, f"{key} names {len(hits)} blocks"
    for target in set(COVERED.values()):
        path, _, func = target.partition("::")
        assert re.search(rf"^def {func}\(", (ROOT / path).read_text(), re.M), target
    not_run = [how_run(*b) for b in blocks if how_run(*b).startswith("not run")]
    assert len(not_run) == len(NOT_RUN) == 4


def test_a_block_added_later_is_caught() -> None:
    """A block in no list, no marker, not a policy nor a `prints` block: not run."""
    name, line, _, _ = next(b for b in all_blocks() if b[0] == "policy.md" and b[2] == "python")
    assert how_run(name, line, "python", "a block added later\n") == ""


def test_the_shell_blocks_name_what_exists() -> None:
    """What the blocks not run name: the scripts and the extras."""
    assert (ROOT / "scripts" / "demo.sh").is_file()
    assert (ROOT / "scripts" / "test.sh").is_file()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"dev", "otel"} <= set(extras["optional-dependencies"])


# ---------------------------------------------------------------- quickstart.md, step 9


def test_quickstart_pytest_plugin_block(tmp_path: Path) -> None:
    """The conftest and the test as the page gives them, run by pytest, on an app
    `myservice.main` with a limit the test's advance refills."""
    code = block("quickstart.md", 'pytest_plugins = ["fidelity_mw.pytest_plugin"]')
    conftest, _, test = code.partition("# in a test module")
    (tmp_path / "conftest.py").write_text(conftest, encoding="utf-8")
    test = test.replace(
        "    ...  # requests to the app\n",
        "    assert [get() for _ in range(3)] == [200, 200, 429]\n",
    )
    assert "get()" in test
    (tmp_path / "test_app.py").write_text(
        "import asyncio\n\nimport httpx\n\nfrom myservice.main import app\n\n\n"
        "def get():\n"
        "    async def one():\n"
        "        transport = httpx.ASGITransport(app=app)\n"
        "        async with httpx.AsyncClient(transport=transport, base_url='http://t') as c:\n"
        "            return (await c.get('/')).status_code\n"
        "    return asyncio.run(one())\n\n\n"
        "# in a test module" + test + "    assert get() == 200\n",
        encoding="utf-8",
    )
    (tmp_path / "myservice").mkdir()
    (tmp_path / "myservice" / "__init__.py").write_text("")
    (tmp_path / "myservice" / "main.py").write_text(
        "from starlette.applications import Starlette\n"
        "from starlette.responses import PlainTextResponse\n"
        "from starlette.routing import Route\n"
        "from fidelity_mw import FidelityMiddleware, Policy, RateLimit\n"
        "async def home(request):\n"
        "    return PlainTextResponse('ok')\n"
        "app = Starlette(routes=[Route('/', home)])\n"
        "policy = Policy(rate_limits=[RateLimit(name='all', rate='2/min', key='global')])\n"
        "app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


# ---------------------------------------------------------------- migration.md


def test_migration_step_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three commands on the walkthrough's service before its migration: a report,
    exit 1 under `--fail-on any` while any is left (0 once none is, 3 when no file was
    found), and `map` of an app module."""
    code = block(MIGRATION, "fidelity-mw audit src/ --fail-on any")
    shutil.copytree(ROOT / "tests" / "fixtures" / "migration" / "before", tmp_path / "src")
    (tmp_path / "myservice").mkdir()
    (tmp_path / "myservice" / "__init__.py").write_text("")
    (tmp_path / "myservice" / "main.py").write_text(
        "from starlette.applications import Starlette\n"
        "from fidelity_mw import FidelityMiddleware, Policy\n"
        "app = Starlette()\n"
        "app.add_middleware(FidelityMiddleware, policy=Policy())\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    codes = []
    for line in code.splitlines():
        argv = line.split("#")[0].split()
        assert argv[0] == "fidelity-mw"
        status, output = run_cli(argv[1:])
        codes.append(status)
        if argv[1] == "audit":
            assert re.search(r"\d+ finding\(s\) \(\d+ retry, \d+ breaker, \d+ limiter", output)
        else:
            assert "FidelityMiddleware" in output or "ratelimit" in output.lower(), output
    assert codes == [0, 1, 0]
    (tmp_path / "empty").mkdir()
    assert run_cli(["audit", "empty/", "--fail-on", "any"])[0] == 3
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "ok.py").write_text("x = 1\n")
    assert run_cli(["audit", "clean/", "--fail-on", "any"])[0] == 0


def test_limits_before() -> None:
    """limits' API as the page writes it (its Redis storage in memory here): 10 a
    minute per `x-user-id`, an 11th refused; another user not."""
    from fastapi import FastAPI, HTTPException, Request

    code = block(MIGRATION, "from limits import parse").replace(
        'RedisStorage("async+redis://redis.internal:6379")', "MemoryStorage()"
    )
    app = FastAPI()
    namespace: dict[str, Any] = {"app": app, "Request": Request, "HTTPException": HTTPException}
    exec("from limits.aio.storage import MemoryStorage\n" + code, namespace)

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = [
                (await c.post("/upload", headers={"x-user-id": "a"})).status_code for _ in range(11)
            ]
            out.append((await c.post("/upload", headers={"x-user-id": "b"})).status_code)
            return out

    assert asyncio.run(run()) == [200] * 10 + [429, 200]


def _their_calls(fetch: Any, script: list[object], monkeypatch: pytest.MonkeyPatch) -> int:
    upstream = Upstream(script)

    async def no_wait(seconds: float, *args: object) -> None:
        return None

    async def run() -> None:
        inner = httpx.MockTransport(upstream)
        async with httpx.AsyncClient(transport=inner, base_url="http://users.internal") as client:
            with contextlib.suppress(Exception):
                await fetch(client)

    with monkeypatch.context() as patch:
        patch.setattr(asyncio, "sleep", no_wait)
        patch.setattr(time, "sleep", lambda seconds: None)
        asyncio.run(run())
    return upstream.calls


def _our_calls(retry: dict[str, Any], script: list[object], sync: bool = False) -> int:
    upstream = Upstream(script)
    policy = Policy.from_dict({"upstream": [{"host": "*", "retry": retry}]})
    if sync:
        transport = FidelitySyncTransport(
            httpx.MockTransport(upstream), policy=policy, clock=FakeClock()
        )
        with httpx.Client(transport=transport) as client, contextlib.suppress(httpx.HTTPError):
            client.get("http://users.internal/users/1")
        return upstream.calls

    async def run() -> None:
        inner = httpx.MockTransport(upstream)
        transport = FidelityTransport(inner, policy=policy, clock=FakeClock())
        async with httpx.AsyncClient(transport=transport) as client:
            with contextlib.suppress(httpx.HTTPError):
                await client.get("http://users.internal/users/1")

    asyncio.run(run())
    return upstream.calls


SCRIPTS = ([503, 200], [502, 200], [500, 200], [CONNECT, 200], [503] * 12, [CONNECT] * 12)


def test_stamina_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """stamina's decorator as the page writes it, its body the tenacity Before's (the
    page elides it), against the table the audit prints for it and the page's row
    (`on=httpx.HTTPError` with `raise_for_status()`: the default statuses; a 500 it
    retried is not, the row says so)."""
    code = block(MIGRATION, "@stamina.retry(on=httpx.HTTPError, attempts=3")
    body = block(MIGRATION, "from tenacity import retry, retry_if_exception_type")
    body = body[body.index("    response = await client.get") :]
    source = "import httpx, stamina\n" + code.replace("    ...\n", body)
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    retry = hint_of(source)
    assert "on_status" not in retry
    for script in SCRIPTS:
        theirs = _their_calls(lambda c: namespace["get_user"](c, "42"), script, monkeypatch)
        ours = _our_calls(retry, script)
        if script[0] == 500:
            assert (theirs, ours) == (2, 1)  # the page: "A 500 is not retried either"
        else:
            assert theirs == ours, (script, theirs, ours)


def test_httpx_retries_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's three "Before" forms build as written (the requests line on a real
    session); its `RetryTransport(retry=retry)` reaches the upstream as often as the
    page's "After" table does."""
    import requests
    import urllib3
    from requests.adapters import HTTPAdapter

    code = block(MIGRATION, "from httpx_retries import Retry, RetryTransport")
    session = requests.Session()
    namespace: dict[str, Any] = {
        "httpx": httpx,
        "session": session,
        "HTTPAdapter": HTTPAdapter,
        "urllib3": urllib3,
    }
    exec(code, namespace)
    adapter = session.get_adapter("https://x")
    assert isinstance(adapter.max_retries, urllib3.Retry)
    assert adapter.max_retries.total == 5
    from httpx_retries import RetryTransport

    after = tomllib.loads(block(MIGRATION, "# total=5, backoff_factor=0.5"))
    table = after["upstream"][0]["retry"]
    for script in ([503, 200], [500, 200], [CONNECT, 200], [503] * 12, [CONNECT] * 12):
        upstream = Upstream(script)
        theirs = RetryTransport(transport=httpx.MockTransport(upstream), retry=namespace["retry"])
        with monkeypatch.context() as patch:
            patch.setattr(time, "sleep", lambda seconds: None)
            client = httpx.Client(transport=theirs)
            with client, contextlib.suppress(httpx.HTTPError):
                client.get("http://inventory.internal/items")
        assert upstream.calls == _our_calls(table, script, sync=True), script


_TOOLKIT_AFTER = "attempt_timeout_ms = 10000          # timeout(10.0)"


@pytest.mark.parametrize("toolkit", ["from nopanic import", "from pyresilience import"])
def test_toolkit_befores_against_the_after(toolkit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """nopanic's and pyresilience's "Before" as the page writes them, on the real
    libraries, call the upstream as often as the page's "After" table (429s aside: the
    page says a 429 is retried here only with a Retry-After)."""
    code = block(MIGRATION, toolkit)
    after = tomllib.loads(block(MIGRATION, _TOOLKIT_AFTER))["upstream"][0]
    holder: dict[str, Any] = {}

    class ClientRef:
        def __getattr__(self, name: str) -> Any:
            return getattr(holder["client"], name)

    namespace: dict[str, Any] = {"httpx": httpx, "client": ClientRef()}
    exec(code, namespace)
    get_invoice = namespace["get_invoice"]

    async def fetch(client: httpx.AsyncClient) -> Any:
        holder["client"] = client
        response = await get_invoice("7")
        return response

    for script in ([503, 200], [502, 200], [500, 200], [CONNECT, 200], [503] * 5):
        theirs = _their_calls(fetch, script, monkeypatch)
        ours = _our_calls(after["retry"], script)
        assert theirs == ours, (toolkit, script, theirs, ours)


def test_throttled_before(own_redis: Any) -> None:
    """throttled-py's "Before" as written, its store a real redis-server: 3 a minute per
    route and client, as the page's "After" asserts. Its `async def export` carried the
    comment "a `def` route: TypeError at import", which reads as if that route raised
    (it does not; the page now says why it is async): a plain `def` route does (the
    page's "Any route"), checked too."""
    from fastapi import FastAPI, Request

    code = block(MIGRATION, "from throttled.asyncio import RedisStore")
    said = re.search(r"async def export\(request: Request\):\s*# (.*)", code)
    assert said is not None
    assert not said.group(1).startswith("a `def` route"), "it is not one, and does not raise"
    code = code.replace("redis://redis.internal:6379/0", own_redis.url)
    namespace: dict[str, Any] = {"FastAPI": FastAPI, "Request": Request}
    exec(code, namespace)
    app = namespace["app"]

    async def calls(client_ip: str, path: str, n: int) -> list[int]:
        transport = httpx.ASGITransport(app=app, client=(client_ip, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.get(path)).status_code for _ in range(n)]

    async def all_calls() -> list[list[int]]:  # one loop: the store's connections are its
        return [
            await calls("10.0.0.1", "/search", 4),
            await calls("10.0.0.2", "/search", 1),
            await calls("10.0.0.1", "/export", 4),
        ]

    assert asyncio.run(all_calls()) == [[200, 200, 200, 429], [200], [200, 200, 200, 429]]
    plain = code.replace("async def export(request: Request):", "def export(request: Request):")
    assert plain != code
    with pytest.raises(TypeError, match="cannot wrap sync route"):
        exec(plain, {"FastAPI": FastAPI, "Request": Request})


def test_redis_py_client_fails_fast(own_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's client against a real redis-server: it works, and once the server is
    gone a command fails after one connect; redis-py's default client (the page: "retries
    every command 10 times") makes at least 11."""
    import redis.asyncio.connection as connection
    import redis.exceptions
    from redis.asyncio import Redis

    code = block(MIGRATION, "from redis.asyncio import Redis")
    code = code.replace('host="redis.internal"', f'host="127.0.0.1", port={own_redis.port}')
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    cache = namespace["cache"]
    connects = 0
    original = connection.Connection._connect

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal connects
        connects += 1
        return await original(self, *args, **kwargs)

    async def no_wait(seconds: float, *args: object) -> None:
        return None

    async def run() -> tuple[int, int]:
        nonlocal connects
        await cache.set("k", "v")
        assert await cache.get("k") == b"v"
        default = Redis(host="127.0.0.1", port=own_redis.port)
        await default.ping()
        own_redis.stop()
        counts = []
        for client in (cache, default):
            await client.connection_pool.disconnect()
            connects = 0
            with pytest.raises(redis.exceptions.ConnectionError):
                await client.get("k")
            counts.append(connects)
        await default.aclose()
        await cache.aclose()
        return counts[0], counts[1]

    monkeypatch.setattr(connection.Connection, "_connect", counted)
    monkeypatch.setattr(asyncio, "sleep", no_wait)
    ours, default = asyncio.run(run())
    assert ours == 1
    assert default >= 11, default


# ---------------------------------------------------------------- outbound.md, policy.md


def test_outbound_the_two_transports() -> None:
    code = block("outbound.md", "sync_client = httpx.Client(transport=FidelitySyncTransport())")
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    assert isinstance(namespace["client"]._transport, FidelityTransport)
    assert isinstance(namespace["sync_client"]._transport, FidelitySyncTransport)
    namespace["sync_client"].close()


def test_outbound_settings_on_the_inner_transport() -> None:
    """The client's settings on `inner`: its proxy, CA file, HTTP/2 and limits are the
    transport's that does the I/O (the CA path is the page's placeholder: a real one).
    The page passed the CA file as `verify="/etc/ssl/internal-ca.pem"`, a form httpx
    deprecates (DeprecationWarning): an SSL context now."""
    import certifi

    code = block("outbound.md", 'proxy="http://proxy.internal:3128"')
    code = code.replace("/etc/ssl/internal-ca.pem", certifi.where())
    namespace: dict[str, Any] = {"httpx": httpx, "ssl": ssl}
    namespace["FidelityTransport"] = FidelityTransport
    with warnings.catch_warnings():
        # the page wrote `verify="<path>"`, which httpx deprecates
        warnings.simplefilter("error", DeprecationWarning)
        exec(code, namespace)
    inner, client = namespace["inner"], namespace["client"]
    assert isinstance(client._transport, FidelityTransport)
    pool = inner._pool
    assert type(pool).__name__ == "AsyncHTTPProxy"
    assert pool._proxy_url.host == b"proxy.internal"
    assert pool._max_connections == 200
    assert pool._http2
    assert client.timeout.read == 10.0
    kept = vars(client._transport).values()
    assert any(t is inner for t in kept if isinstance(t, httpx.AsyncBaseTransport))


def test_policy_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = block("policy.md", 'policy = Policy.from_toml("fidelity.toml")')
    complete = block("policy.md", "version = 1")
    (tmp_path / "fidelity.toml").write_text(complete, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"Policy": Policy}
    exec(code, namespace)
    assert namespace["policy"] == Policy.from_dict(tomllib.loads(complete))
    assert re.fullmatch(r"[0-9a-f]{12}", namespace["policy"].version)


# ---------------------------------------------------------------- telemetry.md


def test_configure_otel_block(tmp_path: Path) -> None:
    """In a process of its own (it sets the global providers): the block sets them, the
    service is named "checkout", and a span goes to the exporter the environment names."""
    code = block("telemetry.md", 'configure_otel(service_name="checkout")')
    script = (
        code
        + "from opentelemetry import trace\n"
        + "with trace.get_tracer('t').start_as_current_span('s'):\n    pass\n"
        + "trace.get_tracer_provider().force_flush()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none")
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert '"service.name": "checkout"' in run.stdout, run.stdout


def test_the_listed_tests_run_the_blocks_they_name() -> None:
    """This file's tests name their blocks by the same line as `COVERED`."""
    module = sys.modules[__name__]
    for (_name, line), target in COVERED.items():
        path, _, func = target.partition("::")
        if path != HERE:
            continue
        source = inspect.getsource(getattr(module, func))
        assert line in source or (func == "test_toolkit_befores_against_the_after"), target
