"""Review 34: `fidelity-mw audit` and docs/migration.md against code shaped like real
projects' slowapi, tenacity, stamina, backoff, pybreaker, httpx-retries and hand-written
retry loops.

Each test is a defect found by running the audit on such code (or the old library next
to the guide's translation), and fails without its fix.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from fastapi import Request  # at module level: the routes' annotations are strings

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.decide.retry import backoff_delay
from fidelity_mw.tools.audit import RETRY, audit_paths


def _hints(path: Path) -> list[str]:
    """The `retry = { ... }` tables the audit prints, in line order."""
    report = audit_paths([str(path)])
    return [
        m.group(0)
        for f in report.findings
        for m in [re.search(r"retry = \{[^}]*\}", f.replace_with)]
        if m
    ]


def _loads(table: str) -> Policy:
    return Policy.from_dict(tomllib.loads(f'[[upstream]]\nhost = "x.internal"\n{table}\n'))


# ------------------------------------------------------------ files the scan could not read


def test_a_dangling_symlink_is_skipped_not_the_end_of_the_audit(tmp_path: Path) -> None:
    """A symlink to a file that is gone (a removed generated module, a checkout of a
    repository with links into an absent directory) raised FileNotFoundError out of
    `audit`: no report at all, for the one file it could not open."""
    (tmp_path / "client.py").write_text(
        "import httpx\nfrom tenacity import retry\n@retry\ndef get(): httpx.get('http://a/')\n"
    )
    os.symlink(tmp_path / "gone.py", tmp_path / "link.py")
    report = audit_paths([str(tmp_path)])
    assert [(f.line, f.kind) for f in report.findings] == [(3, RETRY)]
    assert [Path(file).name for file, _ in report.skipped] == ["link.py"]
    assert "FileNotFoundError" in report.skipped[0][1]


def test_a_long_concatenation_is_skipped_not_the_end_of_the_audit(tmp_path: Path) -> None:
    """`x = "a" + "b" + ...` of some hundreds of terms (a generated query, a long message)
    nests one BinOp per term: the recursive visit raised RecursionError out of `audit`,
    and a few thousand terms made ast.parse raise it."""
    for name, terms in (("medium.py", 600), ("huge.py", 5000)):
        chain = " + ".join(f'"part{i}"' for i in range(terms))
        (tmp_path / name).write_text(f"import httpx\nQUERY = ({chain})\n")
    (tmp_path / "client.py").write_text(
        "import httpx\nfrom tenacity import retry\n@retry\ndef get(): httpx.get('http://a/')\n"
    )
    report = audit_paths([str(tmp_path)])
    assert [Path(f.file).name for f in report.findings] == ["client.py"]
    assert sorted(Path(file).name for file, _ in report.skipped) == ["huge.py", "medium.py"]


def test_a_coding_line_or_a_byte_order_mark_is_read_as_python_reads_them(tmp_path: Path) -> None:
    """Valid Python the audit skipped as unparsable: a module declaring its encoding
    (`# -*- coding: latin-1 -*-`, PEP 263) with a non-UTF-8 byte in a comment, and a UTF-8
    file saved with a byte-order mark (Windows editors write one)."""
    body = "import httpx\nfrom tenacity import retry\n@retry\ndef get(): httpx.get('http://a/')\n"
    (tmp_path / "latin.py").write_bytes(
        b"# -*- coding: latin-1 -*-\n# Gr\xfc\xdfe aus M\xfcnchen\n" + body.encode()
    )
    (tmp_path / "bom.py").write_bytes(b"\xef\xbb\xbf" + body.encode())
    report = audit_paths([str(tmp_path)])
    assert report.skipped == []
    assert sorted((Path(f.file).name, f.line) for f in report.findings) == [
        ("bom.py", 3),
        ("latin.py", 5),
    ]


# ------------------------------------------------------------ loops it missed


def test_a_loop_that_matches_on_the_status_is_a_retry_loop(tmp_path: Path) -> None:
    """`match response.status_code:` with `case 200: return ...` and `case 502 | 503:`
    sleeping and going round again is the `if` loop written with a match statement; the
    audit read only `if` tests, so it found nothing."""
    (tmp_path / "client.py").write_text(
        "import asyncio\n"
        "import httpx\n"
        "async def fetch(client: httpx.AsyncClient, url: str) -> dict:\n"
        "    for attempt in range(4):\n"
        "        response = await client.get(url)\n"
        "        match response.status_code:\n"
        "            case 200:\n"
        "                return response.json()\n"
        "            case 502 | 503 | 504:\n"
        "                await asyncio.sleep(0.5 * 2 ** attempt)\n"
        "            case _:\n"
        "                response.raise_for_status()\n"
        "    return {}\n"
        "def route(event: dict) -> str:\n"
        "    for handler in ('a', 'b'):\n"
        "        match event.get('kind'):\n"
        "            case 'retry':\n"
        "                return handler\n"
        "    return ''\n"
    )
    report = audit_paths([str(tmp_path)])
    assert [(f.line, f.kind, f.library) for f in report.findings] == [(4, RETRY, "hand-written")]
    assert 'retry = { attempts = 4, base_ms = 500, max_ms = 2000, jitter = "none" }' in (
        report.findings[0].replace_with
    )


def test_a_loop_sleeping_two_to_the_attempt_gets_those_waits(tmp_path: Path) -> None:
    """`time.sleep(2 ** attempt)` (the commonest hand-written backoff) was not read, so
    the loop's table said only `attempts = 4`: the policy's default waits (0.1 s up to
    2 s, random) in place of the loop's 1, 2 and 4 seconds."""
    (tmp_path / "client.py").write_text(
        "import time\n"
        "import httpx\n"
        "def get(client: httpx.Client) -> httpx.Response:\n"
        "    for attempt in range(4):\n"
        "        response = client.get('https://quotes.internal/q')\n"
        "        if response.status_code < 500:\n"
        "            return response\n"
        "        time.sleep(2 ** attempt)\n"
        "    return response\n"
    )
    (hint,) = _hints(tmp_path)
    assert hint == 'retry = { attempts = 4, base_ms = 1000, max_ms = 4000, jitter = "none" }'
    cfg = _loads(hint).upstreams[0].retry
    waits = [
        backoff_delay(n, cfg.base_ms / 1000, cfg.max_ms / 1000, "none", lambda: 0.5)
        for n in range(3)
    ]
    assert waits == [2**attempt for attempt in range(3)]  # the loop's sleeps before retries


# ------------------------------------------------------------ retry tables


def test_every_retry_table_the_audit_prints_loads(tmp_path: Path) -> None:
    """`wait_exponential(multiplier=5)` (no `max`) printed `base_ms = 5000` and no
    `max_ms`: the default max_ms, 2000, is below it and the policy refused the table.
    A wait of more than ten minutes printed values the policy's range refuses."""
    (tmp_path / "calls.py").write_text(
        "import httpx, stamina\n"
        "from tenacity import retry, stop_after_attempt, wait_exponential, wait_fixed\n"
        "from tenacity import wait_random_exponential\n"
        "@retry(stop=stop_after_attempt(5), wait=wait_exponential(multiplier=5))\n"
        "def a(): ...\n"
        "@retry(wait=wait_random_exponential(multiplier=3))\n"
        "def b(): ...\n"
        "@retry(stop=stop_after_attempt(2), wait=wait_fixed(900))\n"
        "def c(): ...\n"
        "@stamina.retry(on=httpx.HTTPError, wait_initial=1200, wait_max=1500)\n"
        "def d(): ...\n"
        "@stamina.retry(on=httpx.TransportError, attempts=5, wait_initial=10)\n"
        "def e(): ...\n"
    )
    hints = _hints(tmp_path)
    assert hints == [
        # tenacity's waits with no cap: 5, 10, 20 and 40 s before its four retries
        'retry = { attempts = 5, base_ms = 5000, max_ms = 40000, jitter = "none" }',
        'retry = { base_ms = 3000, max_ms = 6000, jitter = "full" }',
        'retry = { attempts = 2, base_ms = 600000, max_ms = 600000, jitter = "none" }',
        'retry = { attempts = 10, base_ms = 600000, max_ms = 600000, jitter = "full" }',
        # stamina caps its first wait at wait_max too: 5 s, not wait_initial's 10 s;
        # `on=httpx.TransportError` never retried a status (review 45: it said nothing,
        # i.e. 502/503/504 retried)
        'retry = { attempts = 5, base_ms = 5000, max_ms = 5000, jitter = "full", on_status = [] }',
    ]
    for hint in hints:
        _loads(hint)


def test_a_retry_decorator_made_apart_gets_its_retry_table(tmp_path: Path) -> None:
    """The usual way to share a tenacity policy is to make the decorator once
    (`api_retry = retry(...)`, then `@api_retry`), or to wrap a function with it; and
    stamina's `retry_context` takes the decorator's arguments. The guide says the audit
    prints the `retry = { ... }` next to each decorator it finds: these got none."""
    (tmp_path / "retrying.py").write_text(
        "import httpx, stamina\n"
        "from tenacity import retry, stop_after_attempt, wait_exponential, wait_fixed\n"
        "api_retry = retry(stop=stop_after_attempt(3), wait=wait_exponential(1, 10))\n"
        "def raw(client): return client.get('https://a.internal/x')\n"
        "fetch = retry(stop=stop_after_attempt(4), wait=wait_fixed(0.5))(raw)\n"
        "def g(client):\n"
        "    for attempt in stamina.retry_context(on=httpx.HTTPError, attempts=4):\n"
        "        with attempt:\n"
        "            client.get('https://a.internal/y')\n"
    )
    assert _hints(tmp_path) == [
        'retry = { attempts = 3, base_ms = 1000, max_ms = 10000, jitter = "none" }',
        'retry = { attempts = 4, base_ms = 500, max_ms = 500, jitter = "none" }',
        'retry = { attempts = 4, base_ms = 100, max_ms = 5000, jitter = "full" }',
    ]


def _tenacity_waits(wait: object, attempts: int) -> list[float]:
    import tenacity

    sleeps: list[float] = []

    @tenacity.retry(stop=tenacity.stop_after_attempt(attempts), wait=wait, sleep=sleeps.append)
    def call() -> None:
        raise RuntimeError("down")

    with pytest.raises(tenacity.RetryError):
        call()
    return sleeps


def test_wait_exponential_min_is_the_first_wait_and_no_wait_is_shorter(tmp_path: Path) -> None:
    """`wait_exponential(multiplier=1, min=4, max=10)`, tenacity's README example and the
    commonest shape in real projects: the table said `base_ms = 1000`, first retry after
    1 s where tenacity waited 4 s (then 2 s where it waited 4). Starting from the larger
    of the two, the first wait is tenacity's and none is shorter."""
    import tenacity

    (tmp_path / "r.py").write_text(
        "from tenacity import retry, stop_after_attempt, wait_exponential\n"
        "@retry(stop=stop_after_attempt(5), wait=wait_exponential(multiplier=1, min=4, max=10))\n"
        "def a(): ...\n"
    )
    (hint,) = _hints(tmp_path)
    assert hint == 'retry = { attempts = 5, base_ms = 4000, max_ms = 10000, jitter = "none" }'
    cfg = _loads(hint).upstreams[0].retry
    ours = [
        backoff_delay(n, cfg.base_ms / 1000, cfg.max_ms / 1000, "none", lambda: 0.5)
        for n in range(4)
    ]
    theirs = _tenacity_waits(tenacity.wait_exponential(multiplier=1, min=4, max=10), 5)
    assert theirs == [4, 4, 4, 8]
    assert ours[0] == theirs[0]
    assert all(o >= t for o, t in zip(ours, theirs, strict=True))


# ------------------------------------------------------------ slowapi


def _rate_limits(hint_text: str) -> Policy:
    tables = re.findall(r"\{ (name = [^{}]*) \}", hint_text)
    toml = "".join(f"[[rate_limit]]\n{t.replace(', ', chr(10))}\n" for t in tables)
    return Policy.from_dict(tomllib.loads(toml))


def test_a_route_on_a_prefixed_router_is_matched_with_its_prefix(tmp_path: Path) -> None:
    """`router = APIRouter(prefix="/items")` with `@router.get("/search")` and
    `@limiter.limit("2/minute")` serves /items/search; the table said `match =
    "/search"`, which no request matches: pasted as printed, the route had no limit.
    Run here: the printed table on the router's app refuses the third request."""
    (tmp_path / "items.py").write_text(
        "from fastapi import APIRouter, Request\n"
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address)\n"
        "router = APIRouter(prefix='/items', tags=['items'])\n"
        "@router.get('/search')\n"
        "@limiter.limit('2/minute')\n"
        "async def search(request: Request): ...\n"
        "@router.get('/healthz')\n"
        "@limiter.exempt\n"
        "async def healthz(request: Request): ...\n"
    )
    report = audit_paths([str(tmp_path)])
    limit, exempt = [f for f in report.findings if "@limiter" in f.what]
    assert 'match = "/items/search"' in limit.replace_with
    assert 'exclude = ["/items/healthz"]' in exempt.replace_with

    from fastapi import APIRouter, FastAPI

    router = APIRouter(prefix="/items")

    @router.get("/search")
    async def search() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(FidelityMiddleware, policy=_rate_limits(limit.replace_with))

    async def three() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            return [(await client.get("/items/search")).status_code for _ in range(3)]

    assert asyncio.run(three()) == [200, 200, 429]


def test_a_slowapi_cost_is_in_the_table(tmp_path: Path) -> None:
    """`@limiter.limit("20/minute", cost=5)` charged 5 a request (the guide: `cost=` a
    number is `cost = n`); the table left it out, so 4 requests a minute became 20."""
    (tmp_path / "app.py").write_text(
        "from fastapi import FastAPI, Request\n"
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address)\n"
        "app = FastAPI()\n"
        "@app.get('/export')\n"
        "@limiter.limit('20/minute', cost=5)\n"
        "async def export(request: Request): ...\n"
        "@app.get('/batch')\n"
        "@limiter.limit('100/minute', cost=lambda request: int(request.headers['n']))\n"
        "async def batch(request: Request): ...\n"
    )
    export, batch = [f for f in audit_paths([str(tmp_path)]).findings if "@limiter" in f.what]
    (rule,) = _rate_limits(export.replace_with).rate_limits
    assert (rule.match, rule.cost) == ("/export", 5)
    assert "its cost function: RateLimit(cost=fn)" in batch.replace_with


def test_a_limiter_reached_through_its_module_is_found(tmp_path: Path) -> None:
    """`import app.limits as limits` then `@limits.limiter.limit("5/minute")` (or a
    breaker used as `@breakers.payments`): the audit knew another module's objects only
    when imported by name, so these decorators went unreported."""
    pkg = tmp_path / "app"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "limits.py").write_text(
        "import pybreaker\n"
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address)\n"
        "payments = pybreaker.CircuitBreaker(fail_max=3)\n"
    )
    (pkg / "routes.py").write_text(
        "import app.limits as limits\n"
        "from app import limits as same\n"
        "from fastapi import FastAPI, Request\n"
        "api = FastAPI()\n"
        "@api.get('/export')\n"
        "@limits.limiter.limit('5/minute')\n"
        "async def export(request: Request): ...\n"
        "@same.payments\n"
        "def charge(): ...\n"
        "reports = same.limiter.shared_limit('10/minute', scope='reports')\n"
    )
    report = audit_paths([str(tmp_path)])
    uses = [(f.line, f.kind) for f in report.findings if f.file.endswith("routes.py")]
    assert uses == [(6, "limiter"), (8, "breaker"), (10, "limiter")]
    (export,) = [f for f in report.findings if "export()" in f.what]
    assert 'match = "/export", rate = "5/minute"' in export.replace_with


def test_the_limiters_key_func_is_the_routes_key(tmp_path: Path) -> None:
    """`Limiter(key_func=lambda r: r.headers["x-api-key"])` counts every route's limit
    per API key; the tables for its `@limiter.limit(...)` routes left `key` out, which
    is the client's IP: a different limit, without a word. A key function with no policy
    form is now named (the guide: `RateLimit(key=callable)`)."""
    (tmp_path / "app.py").write_text(
        "from fastapi import FastAPI, Request\n"
        "from slowapi import Limiter\n"
        "def user_of(request: Request) -> str: return request.state.user\n"
        "keyed = Limiter(key_func=lambda request: request.headers['x-api-key'])\n"
        "by_user = Limiter(key_func=user_of)\n"
        "app = FastAPI()\n"
        "@app.get('/a')\n"
        "@keyed.limit('5/minute')\n"
        "async def a(request: Request): ...\n"
        "@app.get('/b')\n"
        "@by_user.limit('5/minute')\n"
        "async def b(request: Request): ...\n"
    )
    found = {f.line: f.replace_with for f in audit_paths([str(tmp_path)]).findings}
    (rule,) = _rate_limits(found[8]).rate_limits
    assert rule.key == "header:x-api-key"
    assert "the Limiter's key_func user_of has no policy form" in found[11]
    # and its default_limits, counted by the same key
    (tmp_path / "defaults.py").write_text(
        "from slowapi import Limiter\n"
        "keyed = Limiter(key_func=lambda r: r.headers['x-api-key'], default_limits=['9/minute'])\n"
        "def user_of(request) -> str: return request.state.user\n"
        "by_user = Limiter(key_func=user_of, application_limits=['99/minute'])\n"
    )
    made = [f.replace_with for f in audit_paths([str(tmp_path / "defaults.py")]).findings]
    assert 'its key_func reads x-api-key: key = "header:x-api-key"' in made[0]
    assert "its key_func user_of: fidelity.limit(..., key=fn)" in made[1]


# ------------------------------------------------------------ what deleting a retry drops


def test_a_retried_post_is_named_where_the_retry_is_deleted(tmp_path: Path) -> None:
    """A loop (or decorator) that retried a POST was told "remove the loop; upstream[].retry
    via FidelityTransport", which sends a POST once: deleting it as told dropped those
    retries silently. The finding now says what keeps them."""
    (tmp_path / "events.py").write_text(
        "import asyncio, httpx, stamina\n"
        "async def post_event(client: httpx.AsyncClient, event: dict) -> None:\n"
        "    for attempt in range(5):\n"
        "        response = await client.post('https://events.internal/ingest', json=event)\n"
        "        if response.status_code != 503:\n"
        "            return\n"
        "        await asyncio.sleep(1)\n"
        "@stamina.retry(on=httpx.HTTPError, attempts=3)\n"
        "def send(client: httpx.Client) -> None:\n"
        "    client.request('PATCH', 'https://events.internal/e/1').raise_for_status()\n"
        "@stamina.retry(on=httpx.HTTPError, attempts=3)\n"
        "def read(client: httpx.Client) -> None:\n"
        "    client.get('https://events.internal/e/1').raise_for_status()\n"
        "def read_then_send(client: httpx.Client) -> None:\n"
        "    for attempt in range(3):\n"
        "        response = client.get('https://events.internal/e/2')\n"
        "        if response.status_code != 503:\n"
        "            break\n"
        "    client.post('https://events.internal/e', json=response.json())\n"
    )
    notes = [
        re.findall(r"it retried a (\w+) \(line (\d+)\)", f.replace_with)
        for f in audit_paths([str(tmp_path)]).findings
    ]
    assert notes == [[("POST", "4")], [("PATCH", "10")], [], []]  # the loop sends a GET


# ------------------------------------------------------------ the guide against the libraries


def test_stamina_waits_are_a_floor_the_full_jitter_table_draws_under(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """migration.md maps `wait_initial=a, wait_max=M` to `base_ms = a x 1000`, `max_ms = M
    x 1000`, `jitter = "full"`, and called it the table "that does the same". Run,
    stamina waits `a x 2^n` plus a random 0 to 1 s (`wait_jitter`): its waits start where
    ours end. The guide now says so; here, stamina's least waits are our greatest."""
    import random

    import stamina
    from stamina.instrumentation import set_on_retry_hooks

    waits: list[float] = []
    set_on_retry_hooks([lambda details: waits.append(details.wait_for)])
    monkeypatch.setattr(time, "sleep", lambda s: None)
    monkeypatch.setattr(random, "uniform", lambda low, high: low)  # stamina's least jitter
    try:

        @stamina.retry(on=RuntimeError, attempts=4, wait_initial=0.2, wait_max=2)
        def call() -> None:
            raise RuntimeError("down")

        with pytest.raises(RuntimeError):
            call()
    finally:
        set_on_retry_hooks(None)
    cfg = (
        _loads('retry = { attempts = 4, base_ms = 200, max_ms = 2000, jitter = "full" }')
        .upstreams[0]
        .retry
    )
    ours_most = [backoff_delay(n, 0.2, 2.0, cfg.jitter, lambda: 1.0) for n in range(3)]
    assert waits == pytest.approx([0.2, 0.4, 0.8])
    assert ours_most == pytest.approx(waits)
    guide = Path("docs/migration.md").read_text()
    assert "stamina waits `wait_initial x 2^n` plus" in guide


def test_urllib3_retries_once_at_once_then_waits_as_the_guide_maps() -> None:
    """migration.md: urllib3's `backoff_factor=f` is `base_ms = f x 1000`. urllib3 sleeps
    0 before its first retry, then 2f, 4f, ...: the mapping matches from the second
    retry, and the guide now says the first retry waits f here."""
    from urllib3.util.retry import RequestHistory, Retry

    retry = Retry(total=4, backoff_factor=0.5, status_forcelist=[503])
    theirs = []
    for _ in range(4):  # one more 503 in its history before each retry's sleep
        retry = retry.new(history=(*retry.history, RequestHistory("GET", "/", None, 503, None)))
        theirs.append(retry.get_backoff_time())
    ours = [backoff_delay(n, 0.5, 120.0, "none", lambda: 0.5) for n in range(4)]
    assert theirs == [0, 1.0, 2.0, 4.0]
    assert ours[1:] == theirs[1:]
    assert ours[0] == 0.5
    guide = Path("docs/migration.md").read_text()
    assert "urllib3 retries the first time at once" in guide


# ------------------------------------------------------------ more shapes of real code


def test_a_function_that_retries_by_calling_itself_is_found(tmp_path: Path) -> None:
    """`except httpx.HTTPError: if retries: time.sleep(1); return fetch(url, retries - 1)`,
    or `return await self.get_token(attempt=attempt + 1)` after a 503: a retry written as
    recursion, common in small clients, was not reported (the audit read loops only).
    Recursion over data (a tree, the next page, a parse fallback) passes something else
    than a count moved on, and is not a retry."""
    (tmp_path / "client.py").write_text(
        "import asyncio, time\n"
        "import httpx\n"
        "def fetch(url: str, retries: int = 3) -> httpx.Response:\n"
        "    try:\n"
        "        response = httpx.get(url)\n"
        "        response.raise_for_status()\n"
        "        return response\n"
        "    except httpx.HTTPError:\n"
        "        if retries > 0:\n"
        "            time.sleep(1)\n"
        "            return fetch(url, retries - 1)\n"
        "        raise\n"
        "class Tokens:\n"
        "    async def get_token(self, client: httpx.AsyncClient, attempt: int = 0):\n"
        "        response = await client.get('https://auth.internal/token')\n"
        "        if response.status_code == 503 and attempt < 3:\n"
        "            await asyncio.sleep(2 ** attempt)\n"
        "            return await self.get_token(client, attempt=attempt + 1)\n"
        "        return response\n"
        "def walk(node: dict, depth: int = 0) -> list:\n"
        "    return [node] + [w for c in node['children'] for w in walk(c, depth + 1)]\n"
        "def pages(client: httpx.Client, page: int = 1) -> list:\n"
        "    data = client.get('https://a.internal/x', params={'page': page}).json()\n"
        "    return data['items'] + (pages(client, page + 1) if data['next'] else [])\n"
        "def parse(text: str, depth: int = 0) -> int:\n"
        "    try:\n"
        "        return int(text)\n"
        "    except ValueError:\n"
        "        return parse(text.strip(), depth + 1)\n"
    )
    found = [(f.line, f.kind, f.library) for f in audit_paths([str(tmp_path)]).findings]
    assert found == [(3, RETRY, "hand-written"), (14, RETRY, "hand-written")]


def test_a_client_built_for_any_url_is_not_given_another_clients_host(tmp_path: Path) -> None:
    """A module with one client on `base_url="https://inventory.internal"` and others
    built without one (a factory returning a retrying client, a requests session, a
    function fetching whatever URL it is given): every retry in it was put in
    `[[upstream]] host = "inventory.internal"`, a table for another client's host."""
    (tmp_path / "clients.py").write_text(
        "import time\n"
        "import httpx, requests\n"
        "from httpx_retries import Retry, RetryTransport\n"
        "from requests.adapters import HTTPAdapter\n"
        "from tenacity import retry\n"
        "inventory = httpx.Client(\n"
        "    base_url='https://inventory.internal',\n"
        "    transport=RetryTransport(retry=Retry(total=3)),\n"
        ")\n"
        "def factory() -> httpx.AsyncClient:\n"
        "    return httpx.AsyncClient(transport=RetryTransport(retry=Retry(total=5)))\n"
        "def session() -> requests.Session:\n"
        "    s = requests.Session()\n"
        "    s.mount('https://', HTTPAdapter(max_retries=3))\n"
        "    return s\n"
        "@retry\n"
        "def anything(url: str) -> bytes:\n"
        "    return httpx.get(url).content\n"
        "@retry\n"
        "def stock() -> dict:\n"
        "    return inventory.get('/stock').json()\n"
    )
    hosts = {f.line: f.host for f in audit_paths([str(tmp_path)]).findings}
    assert hosts == {
        8: "inventory.internal",
        11: None,
        14: None,
        16: None,
        19: "inventory.internal",
    }


# ------------------------------------------------------------ slowapi, run next to its translation


def _slowapi_shop(monkeypatch: pytest.MonkeyPatch, now: list[float]) -> object:
    """slowapi as the guide's "before": default_limits, a route's own limit, a POST
    limit on a path whose GET has none of its own, an exempt route; its clock is `now`."""
    import types

    import limits.storage.memory
    from fastapi import FastAPI
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIMiddleware
    from slowapi.util import get_remote_address

    monkeypatch.setattr(limits.storage.memory, "time", types.SimpleNamespace(time=lambda: now[0]))
    limiter = Limiter(key_func=get_remote_address, default_limits=["3/minute"])
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIMiddleware)

    @app.get("/search")
    @limiter.limit("5/minute")
    async def search(request: Request) -> dict[str, str]:
        return {}

    @app.get("/orders")
    async def orders(request: Request) -> list[str]:
        return []

    @app.get("/invoices")
    async def invoices(request: Request) -> list[str]:
        return []

    @app.post("/carts")
    @limiter.limit("2/minute")
    async def new_cart(request: Request) -> dict[str, str]:
        return {}

    @app.get("/carts")
    async def carts(request: Request) -> list[str]:
        return []

    @app.get("/healthz")
    @limiter.exempt
    async def healthz(request: Request) -> str:
        return "ok"

    return app


def _translated_shop() -> object:
    """The same service after docs/migration.md's slowapi table: the route limits in the
    policy (`methods = ["POST"]` for the POST's), the per-route default as a dependency
    on the router of the routes without their own limit, the exempt route off it."""
    from fastapi import APIRouter, Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    policy = Policy.from_dict(
        {
            "rate_limit": [
                {"name": "search", "match": "/search", "rate": "5/minute"},
                {"name": "new-cart", "match": "/carts", "rate": "2/minute", "methods": ["POST"]},
            ]
        }
    )
    fidelity = Fidelity()
    defaults = APIRouter(dependencies=[Depends(fidelity.limit("3/minute"))])

    @defaults.get("/orders")
    async def orders() -> list[str]:
        return []

    @defaults.get("/invoices")
    async def invoices() -> list[str]:
        return []

    @defaults.get("/carts")
    async def carts() -> list[str]:
        return []

    app = FastAPI()
    app.add_middleware(FidelityMiddleware, policy=policy)
    app.include_router(defaults)
    fidelity.install(app)

    @app.get("/search")
    async def search() -> dict[str, str]:
        return {}

    @app.post("/carts")
    async def new_cart() -> dict[str, str]:
        return {}

    @app.get("/healthz")
    async def healthz() -> str:
        return "ok"

    return app


def _statuses(app: object, script: list[tuple[str, str]]) -> list[int]:
    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            return [(await client.request(m, p)).status_code for m, p in script]

    return asyncio.run(run())


def test_the_slowapi_table_admits_what_slowapi_admitted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's claims about slowapi, run: a route's own limit replaces the defaults
    (6 of /search's 7 would be 3 under the default), the defaults count per route, a
    POST limit leaves the path's GET to the defaults, an exempt route is never counted.
    Its translation admits the same requests, in the same order."""
    from fidelity_mw.testing import fake_time

    script = [("GET", "/search")] * 7 + [("GET", "/orders")] * 4 + [("GET", "/invoices")] * 4
    script += [("POST", "/carts")] * 3 + [("GET", "/carts")] * 4 + [("GET", "/healthz")] * 6
    theirs = _statuses(_slowapi_shop(monkeypatch, [1000.0]), script)
    ours_app = _translated_shop()
    with fake_time(app=ours_app):
        ours = _statuses(ours_app, script)
    assert (
        theirs
        == [200] * 5
        + [429] * 2
        + ([200] * 3 + [429]) * 2
        + [200, 200, 429]
        + ([200] * 3 + [429])
        + [200] * 6
    )
    assert ours == theirs


def test_slowapi_windows_admit_twice_the_rate_across_an_edge_the_table_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guide: "slowapi's default fixed window admits 5 at the end of one minute and 5
    more at the start of the next; GCRA admits at most burst + rate x t in any interval
    t". Run: one search at 0 s opens slowapi's window, four at 59 s, five at 60.5 s, and
    slowapi admits nine in 1.5 s; `rate = "5/minute"` admits five (4 + 1)."""
    from fidelity_mw.testing import fake_time

    now = [1000.0]
    slowapi_app = _slowapi_shop(monkeypatch, now)
    ours_app = _translated_shop()
    theirs: list[int] = []
    ours: list[int] = []
    with fake_time(app=ours_app) as clock:
        for at, n in ((0.0, 1), (59.0, 4), (60.5, 5)):
            clock.advance(1000.0 + at - now[0])
            now[0] = 1000.0 + at
            theirs += _statuses(slowapi_app, [("GET", "/search")] * n)
            ours += _statuses(ours_app, [("GET", "/search")] * n)
    assert theirs == [200] * 10
    assert ours == [200] * 6 + [429] * 4
    assert ours[1:].count(200) <= 5 + 5 * 1.5 / 60  # burst + rate x t over the 1.5 s


def test_retrying_retry_and_aiohttp_retry_are_found(tmp_path: Path) -> None:
    """retrying's `@retry(stop_max_attempt_number=3, wait_fixed=2000)`, retry's
    `@retry(tries=4, delay=1, backoff=2)` / `retry_call(...)` and aiohttp-retry's
    `RetryClient` are common in real services and scripts; the audit knew none of them,
    so `--fail-on retry` passed a codebase full of them. One attempt is no retry."""
    (tmp_path / "old.py").write_text(
        "import requests\n"
        "from aiohttp_retry import ExponentialRetry, RetryClient\n"
        "from retry import retry as plain_retry\n"
        "from retry.api import retry_call\n"
        "from retrying import retry\n"
        "@retry(stop_max_attempt_number=3, wait_fixed=2000)\n"
        "def a(): return requests.get('https://a.internal/x')\n"
        "@retry(stop_max_attempt_number=5, wait_exponential_multiplier=500,"
        " wait_exponential_max=8000)\n"
        "def b(): return requests.get('https://a.internal/x')\n"
        "@retry(stop_max_attempt_number=1)\n"
        "def c(): return requests.get('https://a.internal/x')\n"
        "@plain_retry(requests.RequestException, tries=4, delay=1, backoff=2, max_delay=10)\n"
        "def d(): return requests.get('https://a.internal/x')\n"
        "def e(): return retry_call(requests.get, fargs=['https://a.internal/x'], tries=3)\n"
        "async def f(urls):\n"
        "    async with RetryClient(retry_options=ExponentialRetry(attempts=4)) as client:\n"
        "        return [await client.get(u) for u in urls]\n"
    )
    report = audit_paths([str(tmp_path)])
    assert [(f.line, f.library) for f in report.findings] == [
        (6, "retrying"),
        (8, "retrying"),
        (12, "retry"),
        (14, "retry"),
        (16, "aiohttp-retry"),
    ]
    assert _hints(tmp_path) == [
        'retry = { attempts = 3, base_ms = 2000, max_ms = 2000, jitter = "none" }',
        'retry = { attempts = 5, base_ms = 1000, max_ms = 8000, jitter = "none" }',
        'retry = { attempts = 4, base_ms = 1000, max_ms = 10000, jitter = "none" }',
    ]
    assert report.findings[-1].replace_with.startswith("aiohttp cannot go through")


def test_a_hand_written_breaker_is_found(tmp_path: Path) -> None:
    """A breaker class of the project's own (failures counted, open until a time) is as
    common in real services as pybreaker, and there was nothing for it: the audit read
    loops only. Its exception, its state enum and a listener count nothing, and a
    library's breaker subclassed is reported as that library."""
    (tmp_path / "breakers.py").write_text(
        "import time\n"
        "from enum import Enum\n"
        "import pybreaker\n"
        "class CircuitBreakerOpen(RuntimeError): ...\n"
        "class BreakerState(Enum):\n"
        "    OPEN = 'open'\n"
        "class PaymentsBreaker:\n"
        "    def __init__(self, fail_max: int = 5, reset_s: float = 30) -> None:\n"
        "        self.failures, self.fail_max, self.reset_s = 0, fail_max, reset_s\n"
        "    def allow(self) -> bool:\n"
        "        return time.monotonic() >= getattr(self, 'until', 0.0)\n"
        "    def failed(self) -> None:\n"
        "        self.failures += 1\n"
        "        if self.failures >= self.fail_max:\n"
        "            self.until = time.monotonic() + self.reset_s\n"
        "class BreakerListener(pybreaker.CircuitBreakerListener):\n"
        "    def failure(self, cb, exc): print(cb.fail_counter, time.time())\n"
        "class AuditedBreaker(pybreaker.CircuitBreaker): ...\n"
    )
    found = [(f.line, f.kind, f.library) for f in audit_paths([str(tmp_path)]).findings]
    assert found == [(7, "breaker", "hand-written"), (18, "breaker", "pybreaker")]


def test_a_route_included_with_a_prefix_elsewhere_is_matched_with_it(tmp_path: Path) -> None:
    """The usual FastAPI layout puts the version in `app.include_router(api, prefix="/v1")`
    in main.py, routers in their own modules, routers included into routers: a table
    matched the route's own path only ("/items/search"), which no request has. The match
    is now the path FastAPI serves, every prefix in the chain included."""
    from fastapi import APIRouter, FastAPI

    pkg = tmp_path / "svc"
    (pkg / "routes").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "routes" / "__init__.py").write_text("")
    (pkg / "limits.py").write_text(
        "from slowapi import Limiter\n"
        "from slowapi.util import get_remote_address\n"
        "limiter = Limiter(key_func=get_remote_address)\n"
    )
    (pkg / "routes" / "items.py").write_text(
        "from fastapi import APIRouter, Request\n"
        "from ..limits import limiter\n"
        "router = APIRouter(prefix='/items')\n"
        "@router.get('/search')\n"
        "@limiter.limit('2/minute')\n"
        "async def search(request: Request): ...\n"
    )
    (pkg / "routes" / "orders.py").write_text(
        "from fastapi import APIRouter, Request\n"
        "from svc.limits import limiter\n"
        "router = APIRouter()\n"
        "@router.post('/orders')\n"
        "@limiter.limit('1/minute')\n"
        "async def order(request: Request): ...\n"
    )
    (pkg / "main.py").write_text(
        "from fastapi import APIRouter, FastAPI\n"
        "from .routes import items\n"
        "from .routes.orders import router as orders_router\n"
        "api = APIRouter(prefix='/api')\n"
        "api.include_router(items.router)\n"
        "app = FastAPI()\n"
        "app.include_router(api, prefix='/v1')\n"
        "app.include_router(orders_router, prefix='/shop')\n"
    )
    report = audit_paths([str(tmp_path)])
    matches = sorted(
        m for f in report.findings for m in re.findall(r'match = "([^"]*)"', f.replace_with)
    )

    # the same app, put together by FastAPI: the paths it serves
    items, orders, api = APIRouter(prefix="/items"), APIRouter(), APIRouter(prefix="/api")
    items.add_api_route("/search", lambda: None)
    orders.add_api_route("/orders", lambda: None, methods=["POST"])
    api.include_router(items)
    app = FastAPI()
    app.include_router(api, prefix="/v1")
    app.include_router(orders, prefix="/shop")
    served = sorted(app.openapi()["paths"])
    assert matches == served == ["/shop/orders", "/v1/api/items/search"]


def _httpx_retries_run(
    retry_after: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, int, list[float]]:
    import httpx_retries.retry
    from httpx_retries import Retry, RetryTransport

    sleeps: list[float] = []
    monkeypatch.setattr(httpx_retries.retry.time, "sleep", sleeps.append)
    answers = iter([httpx.Response(503, headers={"retry-after": retry_after}), httpx.Response(200)])
    calls: list[int] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return next(answers)

    retry = Retry(total=3, backoff_factor=0.5)
    transport = RetryTransport(transport=httpx.MockTransport(upstream), retry=retry)
    with httpx.Client(transport=transport) as client:
        status = client.get("http://inventory.internal/items").status_code
    return status, len(calls), sleeps


def _ours_run(retry_after: str, policy: dict[str, object]) -> tuple[int, int, list[float]]:
    from fidelity_mw import FidelityTransport
    from fidelity_mw.testing import FakeClock

    answers = iter([httpx.Response(503, headers={"retry-after": retry_after}), httpx.Response(200)])
    calls: list[int] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return next(answers)

    clock = FakeClock()
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=Policy.from_dict(policy), clock=clock
    )

    async def get() -> int:
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get("http://inventory.internal/items")).status_code

    return asyncio.run(get()), len(calls), clock.sleeps


def test_a_retry_after_httpx_retries_waited_out_ends_the_call_here_as_the_guide_now_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guide's httpx-retries row said `respect_retry_after_header=True` is "always,
    up to retry_after_max_s": run, httpx-retries waits a `Retry-After: 60` out (up to its
    max_backoff_wait, 120 s) and the call succeeds; with the row's translation the call
    ends with the 503. The row now says so, and what keeps the old behaviour."""
    retry = {"attempts": 4, "base_ms": 1000, "max_ms": 120000}
    upstream = {"host": "inventory.internal", "retry": retry}
    assert _httpx_retries_run("5", monkeypatch) == (200, 2, [5.0])
    assert _ours_run("5", {"upstream": [upstream]}) == (200, 2, [5.0])

    assert _httpx_retries_run("60", monkeypatch) == (200, 2, [60.0])
    assert _ours_run("60", {"upstream": [upstream]}) == (503, 1, [])
    longer = {**upstream, "retry": {**retry, "retry_after_max_s": 120}}
    assert _ours_run("60", {"upstream": [longer]}) == (503, 1, [])  # past the 30 s deadline
    room = {"upstream": [longer], "deadline": {"default_ms": 300_000}}
    assert _ours_run("60", room) == (200, 2, [60.0])

    guide = Path("docs/migration.md").read_text()
    assert "A `Retry-After: 60` that httpx-retries waited out is answered 503 here" in guide


def test_a_star_import_of_a_library_is_resolved(tmp_path: Path) -> None:
    """`from pybreaker import *` / `from tenacity import *` (scripts, tests, old modules)
    bound nothing the audit knew: the breaker and the retry under them went unreported.
    A retry configured off stays unreported under a star import too."""
    (tmp_path / "star.py").write_text(
        "import httpx\n"
        "from pybreaker import *\n"
        "from tenacity import *\n"
        "breaker = CircuitBreaker(fail_max=3)\n"
        "@retry(stop=stop_after_attempt(3))\n"
        "def get(): return httpx.get('https://a.internal/x')\n"
        "@retry(stop=stop_after_attempt(1))\n"
        "def once(): return httpx.get('https://a.internal/x')\n"
    )
    found = [(f.line, f.kind, f.library) for f in audit_paths([str(tmp_path)]).findings]
    assert found == [(4, "breaker", "pybreaker"), (5, RETRY, "tenacity")]


def test_pybreaker_counted_the_404s_it_was_raised_the_breaker_table_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guide's pybreaker table said what counts here ("exceptions and 5xx") but not
    that pybreaker counted every exception: a function that calls `raise_for_status()`
    opened a `fail_max=3` breaker on three 404s, and the translation never opens on
    them (a returned 500 it never saw, this one counts). The row now says both."""
    import pybreaker

    from fidelity_mw import CircuitOpen, FidelityTransport
    from fidelity_mw.testing import FakeClock

    breaker = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=60)
    status = [404]

    @breaker
    def theirs() -> None:
        request = httpx.Request("GET", "http://catalog.internal/items/1")
        httpx.Response(status[0], request=request).raise_for_status()

    def call_theirs() -> str:
        try:
            theirs()
        except pybreaker.CircuitBreakerError:
            return "open"
        except httpx.HTTPStatusError:
            return "failed"
        return "ok"

    table = {"consecutive_failures": 3, "open_s": 60, "open_min_s": 60, "open_jitter": 0}
    policy = Policy.from_dict(
        {"upstream": [{"host": "catalog.internal", "retry": {"attempts": 1}, "breaker": table}]}
    )
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(status[0])),
        policy=policy,
        clock=FakeClock(),
    )
    client = httpx.AsyncClient(transport=transport)

    def call_ours() -> str:
        try:
            asyncio.run(client.get("http://catalog.internal/items/1"))
        except CircuitOpen:
            return "open"
        return "reached"

    assert [call_theirs() for _ in range(4)] == ["failed", "failed", "open", "open"]
    assert [call_ours() for _ in range(4)] == ["reached"] * 4
    status[0] = 500
    assert [call_ours() for _ in range(4)] == ["reached", "reached", "reached", "open"]
    guide = Path("docs/migration.md").read_text()
    assert "a run of 404s opened it unless `exclude` left them out" in guide
