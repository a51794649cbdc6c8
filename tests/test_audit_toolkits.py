"""The audit on the all-in-one toolkits: nopanic, pyresilience, throttled-py.

One finding per concern (a retry, a breaker, a timeout...), resolved through the
imports; where the arguments are literal, the policy fields that do the same
(docs/migration.md, "From nopanic or pyresilience"), and each hint pasted into a
policy validates. What has no counterpart (a fallback, a cache, a client-side
rate limit or bulkhead) is said to stay.
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
    AuditFinding,
    audit_paths,
    audit_source,
    render_text,
)
from fidelity_mw.tools.cli import main

KEEP = "no counterpart in fidelity_mw, keep it"


def audit(tmp_path: Path, source: str) -> list[AuditFinding]:
    (tmp_path / "app.py").write_text(source)
    return audit_paths([str(tmp_path)]).findings


def hint(finding: AuditFinding) -> str:
    """The "e.g. ..." part of a finding, up to the next note."""
    text = finding.replace_with.split("e.g. ", 1)[1]
    if text.startswith("{"):  # rate-limit tables, then a note
        tables = re.match(r"\{[^{}]*\}(, \{[^{}]*\})*", text)
        assert tables is not None
        return tables.group(0)
    return re.split(r"; | \(", text, maxsplit=1)[0]


def policy_of(text: str) -> Policy:
    """Paste a hint where it belongs and load the policy (raises when invalid)."""
    if text.startswith("{"):  # [[rate_limit]] tables
        tables = re.findall(r"\{ ([^{}]*) \}", text)
        toml = "".join(f"[[rate_limit]]\n{t.replace(', ', chr(10))}\n" for t in tables)
    elif text.startswith("["):
        section, body = text.split("] ", 1)
        toml = f"{section}]\n{body}\n"
    elif text.endswith(" on the route") or text.startswith("concurrency"):
        toml = f'[[route]]\nmatch = "/x"\n{text.removesuffix(" on the route")}\n'
    else:
        toml = f'[[upstream]]\nhost = "x"\n{text}\n'
    return Policy.from_dict(tomllib.loads(toml))


NOPANIC_STACK = """
import httpx
from nopanic import RetryBudget, backoff, circuit_breaker, compose, deadline, retry, timeout

client = httpx.AsyncClient()
payments_breaker = circuit_breaker(failure_threshold=0.5, min_calls=20, window=30.0,
                                   reset_timeout=5.0, name="payments")
payments_budget = RetryBudget(ratio=0.2, min_retries_per_sec=3.0, window=10.0)

@compose(
    deadline(30.0),
    retry(attempts=3, backoff=backoff.full_jitter(base=0.1, cap=2.0), budget=payments_budget),
    payments_breaker,
    timeout(10.0),
)
async def get_invoice(invoice_id: str) -> dict:
    response = await client.get(f"https://payments.internal/invoices/{invoice_id}")
    response.raise_for_status()
    return response.json()
"""


def test_nopanic_stack_is_one_finding_per_concern_with_the_policy_of_the_migration_page(
    tmp_path: Path,
):
    """docs/migration.md's nopanic "before": each concern, and the same [[upstream]] the
    page's "after" writes out."""
    found = audit(tmp_path, NOPANIC_STACK)
    assert [(f.line, f.kind, f.library) for f in found] == [
        (6, BREAKER, "nopanic"),
        (8, RETRY, "nopanic"),
        (11, TIMEOUT, "nopanic"),
        (12, RETRY, "nopanic"),
        (13, BREAKER, "nopanic"),
        (14, TIMEOUT, "nopanic"),
    ]
    assert [f.what.split(" -> ")[0] for f in found][2:] == [
        "nopanic deadline(30.0) in @compose on get_invoice()",
        "nopanic retry(attempts=3, backoff=backoff.full_jitter(base=0.1, c... "
        "in @compose on get_invoice()",
        "nopanic payments_breaker in @compose on get_invoice()",
        "nopanic timeout(10.0) in @compose on get_invoice()",
    ]
    hints = [hint(f) for f in found if "e.g. " in f.replace_with]
    assert hints == [
        "breaker = { failure_ratio = 0.5, min_calls = 20, window_s = 30, open_s = 5, "
        "open_min_s = 5, half_open_probes = 1 }",
        "retry = { budget_ratio = 0.2, budget_min_per_s = 3, budget_window_s = 10 }",
        "[deadline] default_ms = 30000",
        'retry = { attempts = 3, base_ms = 100, max_ms = 2000, jitter = "full" }',
        "attempt_timeout_ms = 10000",
    ]
    for text in hints:
        policy_of(text)
    # an httpx call: the transport owns them
    assert all(f.replace_with.startswith(("upstream[]", "the call's deadline")) for f in found)


def test_nopanic_names_resolve_through_imports_and_aliases(tmp_path: Path):
    found = audit(
        tmp_path,
        "import httpx\n"
        "import nopanic as np\n"
        "from nopanic.retry import retry as with_retries\n"
        "from nopanic.hedge import hedge\n"
        "from myproject import retry, timeout\n"
        "@np.retry(attempts=5, backoff=np.backoff.exponential(base=0.2, cap=4))\n"
        "async def a(): return await httpx.AsyncClient().get('/a')\n"
        "@with_retries(4, backoff=np.backoff.decorrelated_jitter(0.05, 1.0))\n"
        "async def b(): ...\n"
        "@hedge(delay=0.05, max_hedges=5)\n"
        "async def c(): ...\n"
        "@retry(3)\n"
        "@timeout(2.0)\n"
        "def d(): ...\n"
        "@with_retries(attempts=1)\n"
        "def e(): ...\n",
    )
    assert [(f.line, f.kind) for f in found] == [(6, RETRY), (8, RETRY), (10, HEDGE)]
    assert [hint(f) for f in found] == [
        'retry = { attempts = 5, base_ms = 200, max_ms = 4000, jitter = "none" }',
        'retry = { attempts = 4, base_ms = 50, max_ms = 1000, jitter = "decorrelated" }',
        "hedge = { after_ms = 50, max_hedges = 3 }",  # the policy's range: 1 .. 3
    ]
    for f in found:
        policy_of(hint(f))


def test_a_timeout_above_a_retry_bounds_the_whole_call(tmp_path: Path):
    """nopanic's order is the stack's: a timeout outside the retry is a deadline for all
    attempts, one inside it bounds each attempt."""
    found = audit(
        tmp_path,
        "import httpx\n"
        "from nopanic import compose, retry, timeout\n"
        "@timeout(20.0)\n"
        "@retry(attempts=3, backoff=0.5, max_time=10)\n"
        "@timeout(2.0)\n"
        "async def a(): ...\n"
        "b = compose(timeout(9.0), retry(attempts=2))\n",
    )
    by_line = {f.line: f for f in found}
    assert hint(by_line[3]) == "[deadline] default_ms = 20000"
    assert by_line[3].replace_with.startswith("the call's deadline")
    assert hint(by_line[5]) == "attempt_timeout_ms = 2000"
    assert by_line[5].replace_with.startswith("upstream[].attempt_timeout_ms")
    assert by_line[4].replace_with.endswith(
        'e.g. retry = { attempts = 3, base_ms = 500, max_ms = 500, jitter = "none" }; '
        "max_time: the request's deadline, [deadline] default_ms = 10000"
    )
    (composed,) = [f for f in found if f.line == 7 and f.kind == TIMEOUT]
    assert composed.what == "nopanic timeout(9.0) in compose(...)"
    assert hint(composed) == "[deadline] default_ms = 9000"


def test_what_has_no_counterpart_stays_and_the_stack_is_kept_for_it(tmp_path: Path):
    found = audit(
        tmp_path,
        "import httpx\n"
        "from nopanic import adaptive_rate_limit, bulkhead, cache, compose, fallback\n"
        "from nopanic import rate_limit, retry\n"
        "@compose(fallback({}), cache(ttl=60), retry(attempts=3), rate_limit(5))\n"
        "async def a(): return await httpx.AsyncClient().get('/a')\n"
        "@cache(ttl=10)\n"
        "@fallback(None)\n"
        "def b(): ...\n"
        "aimd = adaptive_rate_limit(100)\n"
        "@bulkhead(4)\n"
        "async def c(): ...\n",
    )
    assert [(f.line, f.kind) for f in found] == [
        (4, LIMITER),
        (4, RETRY),
        (9, LIMITER),
        (10, BULKHEAD),
    ]
    limit, retried, aimd, pool = found
    assert retried.replace_with.endswith(
        "keep the @compose for fallback({}), cache(ttl=60), rate_limit(5) "
        "(no counterpart in fidelity_mw), without this"
    )
    assert limit.replace_with.startswith("a client-side rate limit (on calls this process makes)")
    assert KEEP in limit.replace_with
    assert "without this" not in limit.replace_with
    assert aimd.replace_with.startswith(f"an adaptive (AIMD) client-side rate limit: {KEEP}")
    assert pool.replace_with.startswith(
        f"a client-side bulkhead (on calls this process makes): {KEEP}"
    )


def test_on_a_route_a_limit_and_a_bulkhead_are_inbound(tmp_path: Path):
    found = audit(
        tmp_path,
        "from fastapi import FastAPI\n"
        "from nopanic import bulkhead, deadline, rate_limit\n"
        "app = FastAPI()\n"
        "@app.get('/items/{item_id}')\n"
        "@rate_limit(10, per=1.0, burst=20)\n"
        "@bulkhead(8)\n"
        "@deadline(2.5)\n"
        "async def item(item_id: int): ...\n",
    )
    assert [(f.kind, f.replace_with.split(";")[0]) for f in found] == [
        (LIMITER, "FidelityMiddleware: rate_limit[] (rate, burst, key, match)"),
        (BULKHEAD, "FidelityMiddleware: route[].concurrency or [concurrency] (limit)"),
        (TIMEOUT, "FidelityMiddleware: route[].deadline_ms or [deadline] default_ms"),
    ]
    assert [hint(f) for f in found] == [
        '{ name = "item", match = "/items/*", rate = "10/s", burst = 20, key = "global" }',
        "concurrency = { limit = 8 }",
        "deadline_ms = 2500 on the route",
    ]
    assert "(one bucket for all clients, as theirs; without key, one per client)" in (
        found[0].replace_with
    )
    for f in found:
        policy_of(hint(f))


def test_the_client_library_decides_the_remedy(tmp_path: Path):
    """FidelityTransport owns httpx calls only: a breaker around requests, or around no
    HTTP call at all, is not simply replaced."""
    found = audit(
        tmp_path,
        "import requests\n"
        "from nopanic import circuit_breaker, retry, timeout\n"
        "@circuit_breaker()\n"
        "@retry(attempts=2)\n"
        "def a(): return requests.get('https://x')\n",
    )
    assert found[0].replace_with.startswith("requests cannot go through FidelityTransport")
    assert found[1].replace_with.startswith("requests cannot go through FidelityTransport")
    (blind,) = audit_source(
        "from nopanic import timeout\n@timeout(1.0)\ndef q(db): return db.execute('select 1')\n"
    )
    assert blind.replace_with.startswith("no httpx call seen")
    assert "keep it (a database, an SDK on another client)" in blind.replace_with


PYRESILIENCE = """
import httpx
from pyresilience import (CircuitBreakerConfig, FallbackConfig, RetryBudgetConfig, RetryConfig,
                          TimeoutConfig, resilient)
from pyresilience.contrib.http import retry_after_delay, retry_on_status

client = httpx.AsyncClient()

@resilient(
    retry=RetryConfig(max_attempts=3, delay=0.1, max_delay=2.0, retry_on=(httpx.TransportError,),
                      retry_on_result=retry_on_status(429, 502, 503, 504),
                      delay_func=retry_after_delay(max_wait=30.0)),
    timeout=TimeoutConfig(seconds=10),
    circuit_breaker=CircuitBreakerConfig(sliding_window_size=20, minimum_calls=20,
                                         failure_rate_threshold=0.5, recovery_timeout=5),
    retry_budget=RetryBudgetConfig(max_retries=20, refill_rate=3),
    fallback=FallbackConfig(handler=lambda exc: None),
)
async def get_invoice(invoice_id: str) -> httpx.Response:
    return await client.get(f"https://payments.internal/invoices/{invoice_id}")

@resilient(retry=RetryConfig(max_attempts=1), timeout=TimeoutConfig(seconds=3, per_attempt=False))
async def once() -> None: ...

@resilient
async def plain() -> None: ...
"""


def test_pyresilience_resilient_is_one_finding_per_config(tmp_path: Path):
    """docs/migration.md's pyresilience "before", and its mapping table."""
    found = audit(tmp_path, PYRESILIENCE)
    assert [(f.line, f.kind) for f in found] == [
        (10, RETRY),
        (13, TIMEOUT),
        (14, BREAKER),
        (16, RETRY),
        (22, TIMEOUT),
    ]
    assert all(f.library == "pyresilience" for f in found)
    assert found[0].what.endswith(" in @resilient on get_invoice()")
    hints = [hint(f) for f in found]
    assert hints == [
        'retry = { attempts = 3, base_ms = 100, max_ms = 2000, jitter = "full", '
        "on_status = [502, 503, 504], on_429 = true, retry_after_max_s = 30 }",
        "attempt_timeout_ms = 10000",
        "breaker = { failure_ratio = 0.5, min_calls = 20, open_s = 5, open_min_s = 5, "
        "half_open_probes = 2 }",
        "retry = { budget_min_per_s = 3 }",
        "[deadline] default_ms = 3000",  # per_attempt=False: the whole call
    ]
    for text in hints:
        policy_of(text)
    assert "theirs counts the last 20 calls; window_s is a time window" in found[2].replace_with
    assert "theirs is a bucket of max_retries" in found[3].replace_with
    for f in found[:4]:  # the fallback stays: the decorator too, without these
        assert f.replace_with.endswith(
            "keep the @resilient for fallback= (no counterpart in fidelity_mw), without this"
        )
    assert "keep the" not in found[4].replace_with  # max_attempts=1 retries nothing


def test_pyresilience_presets_expand_to_their_concerns(tmp_path: Path):
    found = audit(
        tmp_path,
        "import httpx\n"
        "from pyresilience import resilient\n"
        "from pyresilience.presets import db_policy, http_policy, llm_policy, strict_policy\n"
        "@resilient(**http_policy(max_attempts=5, timeout_seconds=2))\n"
        "def a(url): return httpx.get(url)\n"
        "@resilient(**strict_policy())\n"
        "def b(): ...\n"
        "@resilient(**llm_policy())\n"
        "def c(): ...\n"
        "@resilient(**db_policy(max_attempts=N, fallback=fallback_config))\n"
        "def d(): ...\n",
    )
    by = {(f.line, f.kind): f for f in found}
    assert sorted(by) == [
        (4, BREAKER),
        (4, RETRY),
        (4, TIMEOUT),
        (6, BREAKER),  # strict_policy: one attempt, no retry
        (6, TIMEOUT),
        (8, BREAKER),
        (8, LIMITER),
        (8, RETRY),
        (8, TIMEOUT),
        (10, BREAKER),
        (10, BULKHEAD),
        (10, RETRY),
        (10, TIMEOUT),
    ]
    assert by[4, RETRY].what == (
        "pyresilience http_policy(max_attempts=5, timeout_seconds=2) (its retry) "
        "in @resilient on a()"
    )
    assert hint(by[4, RETRY]) == (
        'retry = { attempts = 5, base_ms = 500, max_ms = 30000, jitter = "full" }'
    )
    assert hint(by[4, TIMEOUT]) == "attempt_timeout_ms = 2000"
    assert hint(by[4, BREAKER]) == (
        "breaker = { consecutive_failures = 5, failure_ratio = 1, open_s = 30, open_min_s = 30, "
        "half_open_probes = 2 }"
    )
    assert hint(by[8, RETRY]) == (
        'retry = { attempts = 4, base_ms = 1000, max_ms = 60000, jitter = "full", '
        "on_status = [500, 502, 503, 504], on_429 = true, retry_after_max_s = 60 }"
    )
    assert by[8, LIMITER].replace_with.startswith("a client-side rate limit")
    for kept in (by[8, LIMITER], by[10, BULKHEAD]):  # what stays is not told to go
        assert "without this" not in kept.replace_with
    assert by[8, RETRY].replace_with.endswith(
        "keep the @resilient(**llm_policy(...)) for its rate limiter "
        "(no counterpart in fidelity_mw), without this"
    )
    assert hint(by[10, RETRY]) == (  # max_attempts not literal: left out
        'retry = { base_ms = 1000, max_ms = 10000, jitter = "full" }'
    )
    assert "factor 1.5: ours doubles" in by[10, RETRY].replace_with
    for f in found:
        if "e.g. " in f.replace_with:
            policy_of(hint(f))


def test_resilient_middleware_config_is_inbound(tmp_path: Path):
    """pyresilience's ResilientMiddleware: its config's limit is one bucket for every
    client and route; its breaker and timeout are the route's."""
    found = audit(
        tmp_path,
        "from fastapi import FastAPI\n"
        "from pyresilience import (CircuitBreakerConfig, RateLimiterConfig, ResilienceConfig,\n"
        "                          TimeoutConfig)\n"
        "from pyresilience.contrib.fastapi import ResilientMiddleware\n"
        "app = FastAPI()\n"
        "config = ResilienceConfig(\n"
        "    rate_limiter=RateLimiterConfig(max_calls=100, period=1.0),\n"
        "    circuit_breaker=CircuitBreakerConfig(failure_threshold=10),\n"
        "    timeout=TimeoutConfig(seconds=30),\n"
        ")\n"
        "app.add_middleware(ResilientMiddleware, config=config)\n"
        "other = ResilientMiddleware(app, config=make_config())\n"
        "empty = ResilientMiddleware(app)\n",
    )
    assert [(f.line, f.kind) for f in found] == [
        (7, LIMITER),
        (8, BREAKER),
        (9, TIMEOUT),
        (12, BREAKER),
    ]
    assert all(f.replace_with.startswith("FidelityMiddleware") for f in found)
    assert [hint(f) for f in found[:3]] == [
        '{ name = "application", match = "*", rate = "100/s", key = "global" }',
        "breaker = { consecutive_failures = 10, failure_ratio = 1, open_s = 30, open_min_s = 30, "
        "half_open_probes = 2 }",
        "[deadline] default_ms = 30000",
    ]
    assert found[0].what.endswith(" in ResilientMiddleware's config")
    assert "its config is not literal here" in found[3].replace_with
    for f in found[:3]:
        policy_of(hint(f))


def test_throttled_fastapi_limiter_becomes_rate_limits(tmp_path: Path):
    found = audit(
        tmp_path,
        "from fastapi import FastAPI, Request\n"
        "from throttled.asyncio.contrib.fastapi import Limiter, RateLimitMiddleware\n"
        "from throttled.asyncio.contrib.fastapi import get_remote_address\n"
        "from throttled.rate_limiter import per_min\n"
        "app = FastAPI()\n"
        "limiter = Limiter(quota='100/m', key_func=get_remote_address)\n"
        "shared = Limiter(quota=per_min(30, burst=60))\n"
        "app.add_middleware(RateLimitMiddleware)\n"
        "@app.get('/items/{item_id}')\n"
        "@limiter.limit('10/s burst 20; 1000 per hour')\n"
        "async def item(request: Request, item_id: int): ...\n"
        "@app.get('/all')\n"
        "@limiter.limit()\n"
        "async def everything(request: Request): ...\n"
        "@app.get('/shared')\n"
        "@shared.limit()\n"
        "async def common(request: Request): ...\n"
        "@app.get('/keyed')\n"
        "@shared.limit('2/w', key_func=lambda r: r.headers['X-Api-Key'])\n"
        "async def keyed(request: Request): ...\n",
    )
    assert [(f.line, f.kind, f.library) for f in found] == [
        (line, LIMITER, "throttled-py") for line in (6, 7, 8, 10, 13, 16, 19)
    ]
    assert found[2].replace_with == (
        "FidelityMiddleware sends the RateLimit fields itself (rate_limit_headers)"
    )
    hints = [hint(f) for f in found[3:]]
    assert hints == [
        '{ name = "item", match = "/items/*", rate = "10/s", burst = 20 }, '
        '{ name = "item-2", match = "/items/*", rate = "1000/h" }',
        '{ name = "everything", match = "/all", rate = "100/min" }',
        '{ name = "common", match = "/shared", rate = "30/min", burst = 60, key = "global" }',
        '{ name = "keyed", match = "/keyed", rate = "2/7d", key = "header:X-Api-Key" }',
    ]
    for text in hints:
        policy_of(text)


def test_throttled_outside_a_route_may_be_either_and_with_a_wait_is_client_side(
    tmp_path: Path,
):
    found = audit(
        tmp_path,
        "from throttled import Throttled, per_sec\n"
        "@Throttled(key='/ping', quota='1/m')\n"
        "def ping(): return 'pong'\n"
        "throttle = Throttled(key='api', quota=per_sec(5), timeout=1)\n"
        "def send(): return throttle.limit('api')\n",
    )
    assert [(f.line, f.kind) for f in found] == [(2, LIMITER), (4, LIMITER), (5, LIMITER)]
    either, waits, _use = found
    assert either.replace_with.startswith(
        "on requests (a key per client): rate_limit[] (rate, burst, key, match); "
        "on calls this process makes (client-side): no counterpart in fidelity_mw"
    )
    assert hint(either) == '{ name = "ping", rate = "1/min", key = "global" }'
    assert waits.replace_with.startswith("a client-side rate limit")


def test_summary_and_fail_on_name_the_new_kinds_only_when_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "a.py").write_text(
        "from nopanic import hedge, timeout\n@hedge(delay=0.1)\n@timeout(1)\nasync def f(): ...\n"
    )
    report = audit_paths([str(tmp_path)])
    assert render_text(report).splitlines()[-1] == (
        "2 finding(s) (0 retry, 0 breaker, 0 limiter, 1 timeout, 1 hedge) in 1 file(s); "
        "1 file(s) scanned"
    )
    assert main(["audit", str(tmp_path), "--fail-on", "retry,breaker,limiter"]) == 0
    assert main(["audit", str(tmp_path), "--fail-on", "hedge"]) == 1
    assert main(["audit", str(tmp_path), "--fail-on", "any"]) == 1


def test_a_retry_around_the_request_handler_has_no_counterpart(tmp_path: Path):
    """ResilientMiddleware with a retry runs the app again: nothing here does that, so
    no `retry = {...}` is offered; its bulkhead is the policy's [concurrency]."""
    found = audit(
        tmp_path,
        "from fastapi import FastAPI\n"
        "from pyresilience import BulkheadConfig, ResilienceConfig, RetryConfig\n"
        "from pyresilience.contrib.fastapi import ResilientMiddleware\n"
        "app = FastAPI()\n"
        "app.add_middleware(ResilientMiddleware, config=ResilienceConfig(\n"
        "    retry=RetryConfig(max_attempts=3), bulkhead=BulkheadConfig(max_concurrent=50)))\n",
    )
    assert [(f.kind, f.replace_with) for f in found] == [
        (
            BULKHEAD,
            "FidelityMiddleware: route[].concurrency or [concurrency] (limit); "
            "e.g. [concurrency] limit = 50",
        ),
        (
            RETRY,
            "around a request handler: no counterpart in fidelity_mw (it never runs a "
            "request twice; clients retry on its Retry-After)",
        ),
    ]
    assert policy_of(hint(found[0])).concurrency is not None


def test_a_limit_inside_an_asgi_middleware_is_inbound(tmp_path: Path):
    """A keyed nopanic rate limit in a class that serves requests (`__call__(scope,
    receive, send)`) limits clients, not calls this process makes."""
    found = audit(
        tmp_path,
        "from nopanic import bulkhead, keyed, rate_limit\n"
        "class PerClientLimit:\n"
        "    def __init__(self, app):\n"
        "        self.app = app\n"
        "        self.limits = keyed(lambda c: rate_limit(5, per=1.0), key=lambda c: c)\n"
        "        self.pool = bulkhead(10)\n"
        "    async def __call__(self, scope, receive, send):\n"
        "        await self.app(scope, receive, send)\n"
        "class Client:\n"
        "    def __init__(self):\n"
        "        self.limits = keyed(lambda h: rate_limit(5, per=1.0), key=lambda h: h)\n",
    )
    assert [(f.line, f.kind) for f in found] == [(5, LIMITER), (6, BULKHEAD), (11, LIMITER)]
    limit, pool, outbound = found
    assert limit.replace_with == (
        "FidelityMiddleware: rate_limit[] (rate, burst, key, match); keyed: a rate_limit[] "
        'counts per key already (key); e.g. { name = "application", match = "*", '
        'rate = "5/s" } (per client: key = client_ip, or header:NAME for the key yours reads)'
    )
    assert policy_of(hint(limit)).rate_limits[0].key == "client_ip"
    assert hint(pool) == "[concurrency] limit = 10"
    assert outbound.replace_with.startswith("a client-side rate limit")


def test_uses_of_a_toolkit_policy_object_are_reported(tmp_path: Path):
    """`policy.acall(fn)`, `with policy.guard():` apply the policy where they are
    written (other libraries' objects keep their own method lists)."""
    found = audit(
        tmp_path,
        "import httpx, tenacity\n"
        "from nopanic import circuit_breaker, timeout\n"
        "breaker = circuit_breaker()\n"
        "per_attempt = timeout(2.0)\n"
        "retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(3))\n"
        "async def get(client: httpx.AsyncClient):\n"
        "    async with breaker.guard():\n"
        "        return await per_attempt.acall(client.get, '/x')\n"
        "def legacy(fn):\n"
        "    return retrying.call(fn)\n",
    )
    assert [(f.line, f.kind, f.library) for f in found] == [
        (3, BREAKER, "nopanic"),
        (4, TIMEOUT, "nopanic"),
        (5, RETRY, "tenacity"),
        (7, BREAKER, "nopanic"),
        (8, TIMEOUT, "nopanic"),
    ]
    assert found[4].replace_with == "upstream[].attempt_timeout_ms via FidelityTransport"
