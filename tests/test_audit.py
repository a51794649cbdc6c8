"""The static audit: each pattern is found, each near-miss is not.

The fixtures under tests/fixtures/audit mark every line that must be reported
with `# expect: KIND`; any other reported line is a false positive.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fidelity_mw import Policy
from fidelity_mw.tools.audit import (
    BREAKER,
    BULKHEAD,
    HEDGE,
    LIMITER,
    RETRY,
    TIMEOUT,
    audit_paths,
    audit_source,
    iter_python_files,
    parse_fail_on,
)

FIXTURES = Path("tests/fixtures/audit")
EXPECT = re.compile(r"#\s*expect:\s*(\w+)")


def expected_findings() -> set[tuple[str, int, str]]:
    out = set()
    for path in sorted(FIXTURES.rglob("*.py")):
        if "loops" in path.parts:
            continue  # the loop corpus is scored, not required exact (test_audit_corpus.py)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            m = EXPECT.search(line)
            if m:
                out.add((path.as_posix(), number, m.group(1)))
    return out


def test_fixture_tree_exactly_as_marked():
    report = audit_paths([str(FIXTURES / "service"), str(FIXTURES / "clean")])
    got = {(f.file, f.line, f.kind) for f in report.findings}
    expected = expected_findings()
    assert got - expected == set(), "false positives"
    assert expected - got == set(), "missed"
    assert report.scanned == len(list(FIXTURES.rglob("*.py"))) - len(
        list((FIXTURES / "loops").rglob("*.py"))
    )
    assert report.skipped == []


def test_near_misses_are_not_flagged():
    report = audit_paths([str(FIXTURES / "clean")])
    assert report.scanned == 1
    assert report.findings == []


def test_each_library_is_recognised():
    report = audit_paths([str(FIXTURES)])
    libraries = {f.library for f in report.findings}
    assert libraries == {
        "tenacity",
        "backoff",
        "stamina",
        "urllib3",
        "requests",
        "httpx",
        "httpx-retries",
        "pybreaker",
        "aiobreaker",
        "circuitbreaker",
        "purgatory",
        "slowapi",
        "limits",
        "fastapi-limiter",
        "openai",
        "anthropic",
        "nopanic",
        "pyresilience",
        "throttled-py",
        "retrying",
        "retry",
        "aiohttp-retry",
        "hand-written",
    }


def test_findings_name_the_replacing_policy_key():
    report = audit_paths([str(FIXTURES / "service")])
    by_kind = {f.kind: f.replace_with for f in report.findings}
    assert by_kind[RETRY].startswith("upstream[].retry")
    assert by_kind[BREAKER].startswith("upstream[].breaker")
    assert by_kind[LIMITER].startswith("rate_limit[]")


def test_slowapi_decorator_gets_a_ready_rate_limit():
    report = audit_paths([str(FIXTURES / "service" / "limiters.py")])
    (finding,) = [f for f in report.findings if "@limiter.limit" in f.what]
    assert finding.what == "slowapi @limiter.limit('5/minute') on search()"
    assert finding.replace_with.endswith(
        'e.g. { name = "search", match = "/search", rate = "5/minute" }'
    )


def test_slowapi_hint_is_a_policy_that_validates(tmp_path):
    """The hint pastes into a valid policy: one table per rate, unique names, and a glob
    for the route template (`match = "/items/{item_id}"` would never match a request)."""
    (tmp_path / "app.py").write_text(
        "from fastapi import FastAPI, Request\n"
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address)\n"
        "app = FastAPI()\n"
        "@app.get('/items/{item_id}')\n"
        "@limiter.limit('5/minute;50/hour')\n"
        "async def item(request: Request, item_id: int): ...\n"
        "@app.get('/search')\n"
        "@limiter.limit('10 per minute')\n"
        "async def search(request: Request): ...\n"
        "@app.get('/healthz')\n"
        "@limiter.exempt\n"
        "async def healthz(request: Request): ...\n"
        "@app.get('/keyed')\n"
        "@limiter.limit('2/second', key_func=lambda r: r.headers.get('X-Api-Key', 'anon'))\n"
        "async def keyed(request: Request): ...\n"
    )
    report = audit_paths([str(tmp_path)])
    hints = [
        f.replace_with.split("e.g. ", 1)[1] for f in report.findings if "e.g. " in f.replace_with
    ]
    assert hints == [
        '{ name = "item", match = "/items/*", rate = "5/minute" }, '
        '{ name = "item-2", match = "/items/*", rate = "50/hour" }',
        '{ name = "search", match = "/search", rate = "10 per minute" }',
        '{ name = "keyed", match = "/keyed", rate = "2/second", key = "header:X-Api-Key" }',
    ]
    tables = [t.strip() for hint in hints for t in hint.split("}, ")]
    toml = "".join(f"[[rate_limit]]\n{t.strip('{} ').replace(', ', chr(10))}\n" for t in tables)
    policy = Policy.from_dict(tomllib.loads(toml))
    assert [(r.name, r.match, r.key) for r in policy.rate_limits] == [
        ("item", "/items/*", "client_ip"),
        ("item-2", "/items/*", "client_ip"),
        ("search", "/search", "client_ip"),
        ("keyed", "/keyed", "header:X-Api-Key"),
    ]
    (exempt,) = [f for f in report.findings if "exempt" in f.what]
    assert 'exclude = ["/healthz"] on each [[rate_limit]] whose match covers it' in (
        exempt.replace_with
    )


def test_slowapi_limit_on_a_post_route_names_its_method(tmp_path: Path):
    # slowapi counts the decorated endpoint only: a GET of the same path is not in it
    (tmp_path / "app.py").write_text(
        "from fastapi import FastAPI, Request\n"
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address)\n"
        "app = FastAPI()\n"
        "@app.post('/orders')\n"
        "@limiter.limit('3/minute')\n"
        "async def create_order(request: Request): ...\n"
        "@app.get('/orders/{order_id}')\n"
        "@limiter.exempt\n"
        "async def order(request: Request, order_id: str): ...\n"
    )
    report = audit_paths([str(tmp_path)])
    (hint,) = [
        f.replace_with.split("e.g. ", 1)[1] for f in report.findings if "e.g. " in f.replace_with
    ]
    assert (
        hint
        == '{ name = "create_order", match = "/orders", rate = "3/minute", methods = ["POST"] }'
    )
    table = hint.strip("{} ").replace(", ", "\n")
    policy = Policy.from_dict(tomllib.loads(f"[[rate_limit]]\n{table}\n"))
    assert policy.rate_limits[0].methods == ("POST",)
    (exempt,) = [f for f in report.findings if "exempt" in f.what]
    assert 'exclude = ["/orders/*"]' in exempt.replace_with


def test_objects_made_in_another_module():
    routes = FIXTURES / "service" / "routes.py"
    together = audit_paths([str(FIXTURES / "service")])
    found = [(f.line, f.kind) for f in together.findings if f.file == routes.as_posix()]
    assert found == [(14, LIMITER), (20, BREAKER)]
    # alone, routes.py shows no library call: the objects are made elsewhere
    assert audit_paths([str(routes)]).findings == []


def test_hand_written_loop_reports_the_loop_and_the_sleep():
    source = (
        "import time\n"
        "def f(call):\n"
        "    for i in range(3):\n"
        "        try:\n"
        "            return call()\n"
        "        except OSError:\n"
        "            time.sleep(i)\n"
    )
    (finding,) = audit_source(source, "x.py")
    assert (finding.line, finding.kind, finding.library) == (3, RETRY, "hand-written")
    assert finding.what == (
        "for loop in f() retries a call after catching its failure (line 5); "
        "waits with time.sleep(i) (line 7)"
    )
    assert finding.confidence == "high"  # a sleep, a bound, and a call named like a request


@pytest.mark.parametrize(
    "source",
    [
        # a loop that sleeps with no except: polling
        "import time\nwhile True:\n    poll()\n    time.sleep(0.1)\n",
        # an except that sleeps with no loop
        "import time\ntry:\n    call()\nexcept OSError:\n    time.sleep(0.1)\n",
        # no call inside the try
        "import time\nfor x in xs:\n    try:\n        y = x\n    except KeyError:\n"
        "        time.sleep(0.1)\n",
        # a function called retry that is not a library's
        "def retry(f):\n    return f\n\n@retry\ndef g():\n    pass\n",
        "from mypkg.retry import retry\n\n@retry(3)\ndef g():\n    pass\n",
        # retries explicitly off
        "import httpx\nt = httpx.HTTPTransport(retries=0)\n",
        "from requests.adapters import HTTPAdapter\na = HTTPAdapter(max_retries=0)\n",
        # a limiter of our own, named like slowapi's
        "class Limiter:\n    def limit(self, r):\n        return lambda f: f\n"
        "limiter = Limiter()\n\n@limiter.limit('1/s')\ndef g():\n    pass\n",
        # text that mentions libraries
        "'''tenacity.retry and pybreaker.CircuitBreaker'''\nx = 'slowapi.Limiter'\n",
    ],
)
def test_near_miss_sources(source: str):
    assert audit_source(source) == []


def test_aliases_are_resolved():
    source = (
        "import tenacity as t\nfrom pybreaker import CircuitBreaker as CB\n"
        "@t.retry\ndef f():\n    pass\nb = CB()\n"
    )
    found = [(f.line, f.kind) for f in audit_source(source)]
    assert found == [(3, RETRY), (6, BREAKER)]


def test_nonliteral_retries_are_flagged():
    (finding,) = audit_source("import httpx\nt = httpx.AsyncHTTPTransport(retries=N)\n")
    assert finding.kind == RETRY
    assert finding.library == "httpx"


def test_ignore_pragma():
    source = "import tenacity\n@tenacity.retry  # fidelity-mw: ignore\ndef f():\n    pass\n"
    assert audit_source(source) == []


def test_unparsable_files_are_skipped_not_fatal(tmp_path: Path):
    (tmp_path / "ok.py").write_text("import stamina\n@stamina.retry(on=OSError)\ndef f(): ...\n")
    (tmp_path / "broken.py").write_text("def (:\n")
    report = audit_paths([str(tmp_path)])
    assert report.scanned == 1
    assert [f.line for f in report.findings] == [2]
    assert len(report.skipped) == 1
    assert report.skipped[0][0].endswith("broken.py")


def test_excluded_directories(tmp_path: Path):
    for d in (".venv", "node_modules", "pkg", "pkg/generated"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "m.py").write_text("x = 1\n")
    files = [p.relative_to(tmp_path).as_posix() for p in iter_python_files([str(tmp_path)])]
    assert files == ["pkg/m.py", "pkg/generated/m.py"]
    files = [
        p.relative_to(tmp_path).as_posix()
        for p in iter_python_files([str(tmp_path)], ["*/generated"])
    ]
    assert files == ["pkg/m.py"]


def test_parse_fail_on():
    assert parse_fail_on("retry") == {RETRY}
    assert parse_fail_on("retry, Breaker") == {RETRY, BREAKER}
    assert parse_fail_on("any") == {RETRY, BREAKER, LIMITER, TIMEOUT, BULKHEAD, HEDGE}
    assert parse_fail_on("timeout,hedge") == {TIMEOUT, HEDGE}
    with pytest.raises(ValueError, match="'retries' is not a kind"):
        parse_fail_on("retries")
    with pytest.raises(ValueError, match="no kinds"):
        parse_fail_on(",")


def test_tenacity_and_stamina_hints_are_the_same_retry(tmp_path):
    """A retry decorator's finding carries the `[upstream.retry]` that does what it did
    (docs/migration.md's table), and the hint is a valid policy."""
    (tmp_path / "calls.py").write_text(
        "import stamina, tenacity\n"
        "from tenacity import retry, stop_after_attempt, stop_after_delay, wait_fixed\n"
        "from tenacity import wait_exponential, wait_random_exponential\n"
        "@retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.05, max=1))\n"
        "async def a(): ...\n"
        "@retry(stop=stop_after_delay(9) | stop_after_attempt(3),\n"
        "       wait=wait_random_exponential(0.1, 2))\n"
        "async def b(): ...\n"
        "@tenacity.retry(stop=tenacity.stop_after_attempt(20), wait=wait_fixed(0.5))\n"
        "async def c(): ...\n"
        "@stamina.retry(on=Exception, attempts=3, wait_initial=0.2, wait_max=2)\n"
        "async def d(): ...\n"
        "@stamina.retry(on=Exception)\n"
        "async def e(): ...\n"
        "async def f():\n"
        "    async for attempt in tenacity.AsyncRetrying(stop=stop_after_attempt(2)):\n"
        "        with attempt: ...\n"
    )
    report = audit_paths([str(tmp_path)])
    hints = [f.replace_with.split("e.g. ", 1)[1] for f in report.findings]
    assert hints == [
        'retry = { attempts = 4, base_ms = 50, max_ms = 1000, jitter = "none" }',
        'retry = { attempts = 3, base_ms = 100, max_ms = 2000, jitter = "full" }',
        'retry = { attempts = 10, base_ms = 500, max_ms = 500, jitter = "none" }',
        'retry = { attempts = 3, base_ms = 200, max_ms = 2000, jitter = "full" }',
        'retry = { attempts = 10, base_ms = 100, max_ms = 5000, jitter = "full" }',
        "retry = { attempts = 2 }",
    ]
    for hint in hints:
        table = tomllib.loads(f'[[upstream]]\nhost = "x"\n{hint}\n')
        assert Policy.from_dict(table).upstreams[0].retry is not None


def test_breaker_hints_open_and_wait_like_the_library(tmp_path):
    """pybreaker's fail_max / reset_timeout, aiobreaker's timedelta, circuitbreaker's
    failure_threshold / recovery_timeout (and their defaults) as a `breaker` table."""
    (tmp_path / "breakers.py").write_text(
        "import pybreaker, aiobreaker\n"
        "from datetime import timedelta\n"
        "from circuitbreaker import circuit\n"
        "a = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=20)\n"
        "b = aiobreaker.CircuitBreaker(fail_max=4, timeout_duration=timedelta(minutes=2))\n"
        "@circuit(failure_threshold=7)\n"
        "def c(): ...\n"
        "d = pybreaker.CircuitBreaker()\n"
        "e = pybreaker.CircuitBreaker(2, 0.5)\n"
    )
    report = audit_paths([str(tmp_path)])
    hints = [f.replace_with.split("e.g. ", 1)[1].split("; ")[0] for f in report.findings]
    # none of them retried: the migration must not add retries silently
    for finding in report.findings:
        assert finding.replace_with.endswith(
            f"; outbound, {finding.library} never retried the call: retry = {{ attempts = 1 }} "
            "keeps it so (FidelityTransport retries idempotent calls by default)"
        )
    ratio = "failure_ratio = 1.0, "
    probe = ", open_jitter = 0, half_open_probes = 1 }"
    assert hints == [
        f"breaker = {{ consecutive_failures = 3, {ratio}open_s = 20, open_min_s = 20" + probe,
        f"breaker = {{ consecutive_failures = 4, {ratio}open_s = 120, open_min_s = 120" + probe,
        f"breaker = {{ consecutive_failures = 7, {ratio}open_s = 30, open_min_s = 30" + probe,
        f"breaker = {{ consecutive_failures = 5, {ratio}open_s = 60, open_min_s = 60" + probe,
        f"breaker = {{ consecutive_failures = 2, {ratio}open_s = 0.5, open_min_s = 0.5" + probe,
    ]
    for hint in hints:
        table = tomllib.loads(f'[[upstream]]\nhost = "x"\n{hint}\n')
        assert Policy.from_dict(table).upstreams[0].breaker is not None


def test_slowapi_limiter_defaults_are_per_route_and_application_limits_are_one_bucket(tmp_path):
    """slowapi counts `default_limits` per route (a dependency on the router does the
    same) and `application_limits` over every route (a `match = "*"` limit)."""
    (tmp_path / "app.py").write_text(
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address,\n"
        "                  default_limits=['100/minute;1000/hour'],\n"
        "                  application_limits=['5000/hour'])\n"
    )
    (finding,) = audit_paths([str(tmp_path)]).findings
    assert finding.replace_with.endswith(
        'default_limits count per route: Depends(fidelity.limit("100/minute")), '
        'Depends(fidelity.limit("1000/hour")) on the router of the routes without a limit '
        "of their own (slowapi applies a route's own limits instead) "
        '(docs/migration.md, "From slowapi"); application_limits: e.g. '
        '{ name = "application", match = "*", rate = "5000/hour" }'
    )


def test_a_hand_written_httpx_loop_gets_the_retry_table_of_its_count_and_waits(tmp_path: Path):
    # attempts from a literal range(); waits only from a literal sleep after the try,
    # constant or doubling with the loop's counter (a wait before the try is skipped on
    # the first turn, so it is not the same schedule)
    (tmp_path / "loops.py").write_text(
        "import asyncio, httpx\n"
        "async def doubling(c):\n"
        "    for attempt in range(4):\n"
        "        try:\n"
        "            return await c.get('/x')\n"
        "        except httpx.TransportError:\n"
        "            pass\n"
        "        await asyncio.sleep(0.25 * 2 ** attempt)\n"
        "async def from_one(c):\n"
        "    for n in range(1, 4):\n"
        "        try:\n"
        "            return await c.get('/x')\n"
        "        except httpx.TransportError:\n"
        "            await asyncio.sleep(2 ** n * 0.1)\n"
        "async def constant(c):\n"
        "    for _ in range(3):\n"
        "        try:\n"
        "            return await c.get('/x')\n"
        "        except httpx.TransportError:\n"
        "            await asyncio.sleep(0.5)\n"
        "async def before_the_try(c):\n"
        "    for attempt in range(4):\n"
        "        if attempt:\n"
        "            await asyncio.sleep(0.1 * 2 ** attempt)\n"
        "        try:\n"
        "            return await c.get('/x')\n"
        "        except httpx.TransportError:\n"
        "            pass\n"
        "async def unbounded(c):\n"
        "    while True:\n"
        "        try:\n"
        "            return await c.get('/x')\n"
        "        except httpx.TransportError:\n"
        "            await asyncio.sleep(1)\n"
    )
    found = audit_paths([str(tmp_path)]).findings
    hints = {f.line: f.replace_with.split("e.g. ", 1)[-1] for f in found}
    assert hints == {
        3: 'retry = { attempts = 4, base_ms = 250, max_ms = 1000, jitter = "none" }',
        10: 'retry = { attempts = 3, base_ms = 200, max_ms = 400, jitter = "none" }',
        16: 'retry = { attempts = 3, base_ms = 500, max_ms = 500, jitter = "none" }',
        22: "retry = { attempts = 4 }",
        30: "remove the loop; upstream[].retry (attempts, base_ms, max_ms, jitter) via "
        "FidelityTransport",
    }
    for line in (3, 10, 16, 22):
        table = tomllib.loads(f'[[upstream]]\nhost = "x"\n{hints[line]}\n')
        assert Policy.from_dict(table).upstreams[0].retry.attempts in (3, 4)
