"""Review 48 (hdr48): rate-limit fields an app sets itself beside the middleware's.

Before, the middleware appended its fields to whatever the app's response carried:
- an app's (or a passed-on upstream's) `RateLimit` / `RateLimit-Policy` naming the same
  policy as ours went out beside ours: combined (RFC 9110 section 5.3) one list named
  `"per-client"` twice, with two different quotas;
- an app's line that is no Structured Field List (an older draft's `limit=100, ...`)
  combined with ours into a value no parser reads, ours lost with it;
- `X-RateLimit-Limit`, `-Remaining` and `-Reset` went out twice (`remaining: 50, 2`),
  with a `Depends(limit)` of FastAPI too, and an `on_reject` response that set
  `X-RateLimit-Limit` alone got our `-Remaining` and `-Reset` of another limit.

The combined fields are read here with a parser of RFC 9651's List grammar (no
Structured Field library is among the dev dependencies), not the module's own.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

# ------------------------------------------------ RFC 9651 section 4.2.1, a List

_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'
_TOKEN = r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*"
_NUMBER = r"-?[0-9]{1,15}(?:\.[0-9]{1,3})?"
_BARE = rf"(?:{_NUMBER}|{_STRING}|{_TOKEN}|\?[01])"
_PARAM = rf";[ ]*(?P<key>[a-z*][a-z0-9_\-.*]*)(?:=(?P<value>{_BARE}))?"
_ITEM = re.compile(rf"(?P<bare>{_BARE})(?P<params>(?:;[ ]*[a-z*][a-z0-9_\-.*]*(?:={_BARE})?)*)")


def parse_list(value: str) -> list[tuple[str, dict[str, str]]]:
    """(item, parameters) of each member; ValueError when `value` is no List."""
    out: list[tuple[str, dict[str, str]]] = []
    text = value.strip(" ")
    pos = 0
    while pos < len(text):
        found = _ITEM.match(text, pos)
        if found is None:
            raise ValueError(f"no list member at {pos}: {text!r}")
        bare = found.group("bare")
        name = bare[1:-1].replace('\\"', '"').replace("\\\\", "\\") if bare[0] == '"' else bare
        params = {
            m.group("key"): m.group("value") or "?1"
            for m in re.finditer(_PARAM, found.group("params"))
        }
        out.append((name, params))
        pos = found.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos == len(text):
            break
        if text[pos] != ",":
            raise ValueError(f"no comma at {pos}: {text!r}")
        pos += 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos == len(text):
            raise ValueError(f"a trailing comma: {text!r}")
    return out


def combined(response: httpx.Response, field: str) -> list[tuple[str, dict[str, str]]]:
    """The field's lines combined as RFC 9110 section 5.3 says, then parsed."""
    return parse_list(", ".join(response.headers.get_list(field)))


def _names(members: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [name for name, _params in members]


def test_the_parser_reads_lists_and_refuses_what_is_none() -> None:
    assert parse_list('"a";q=1;w=2, "b";r=0;t=1') == [
        ("a", {"q": "1", "w": "2"}),
        ("b", {"r": "0", "t": "1"}),
    ]
    for bad in ("limit=100, remaining=50", '"a";q=1,', '"a" "b"'):
        with pytest.raises(ValueError, match=r"no list member|no comma|trailing comma"):
            parse_list(bad)


# ------------------------------------------------ an app that sets them itself

OURS = RateLimit(name="per-client", rate="3/s")


def _app(
    fields: list[tuple[str, str]],
    names: str = "ietf",
    status: int = 200,
    on_reject: Any = None,
) -> Starlette:
    async def endpoint(request: Request) -> Response:
        response = PlainTextResponse("x", status_code=status)
        for name, value in fields:
            response.headers.append(name, value)
        return response

    app = Starlette(routes=[Route("/a", endpoint)])
    policy = Policy(rate_limits=(OURS,), rate_limit_header_names=names, breaker=None)
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False, on_reject=on_reject
    )
    return app


async def _get(app: Starlette, n: int = 1) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(n):
            response = await client.get("/a")
    return response


UPSTREAM = [
    ("RateLimit-Policy", '"upstream";q=100;w=60'),
    ("RateLimit", '"upstream";r=50;t=30'),
]


async def test_an_app_policy_of_another_name_goes_out_beside_ours() -> None:
    response = await _get(_app(UPSTREAM))
    assert _names(combined(response, "ratelimit-policy")) == ["upstream", "per-client"]
    assert combined(response, "ratelimit") == [
        ("upstream", {"r": "50", "t": "30"}),
        ("per-client", {"r": "2", "t": "1"}),
    ]


async def test_an_app_policy_of_our_name_leaves_one_item_of_that_name_ours() -> None:
    same = [
        ("RateLimit-Policy", '"upstream";q=100;w=60, "per-client";q=100;w=60'),
        ("RateLimit", '"per-client";r=50;t=30, "upstream";r=7;t=9'),
    ]
    response = await _get(_app(same))
    policies = combined(response, "ratelimit-policy")
    limits = combined(response, "ratelimit")
    # before: "per-client" twice in each, q=100 beside q=3
    assert _names(policies) == ["upstream", "per-client"]
    assert dict(policies)["per-client"] == {"q": "3", "w": "1"}
    assert _names(limits) == ["upstream", "per-client"]
    assert dict(limits) == {"upstream": {"r": "7", "t": "9"}, "per-client": {"r": "2", "t": "1"}}


async def test_an_app_item_of_our_name_alone_is_replaced_by_ours() -> None:
    same = [("RateLimit-Policy", '"per-client";q=100;w=60'), ("RateLimit", '"per-client";r=5')]
    response = await _get(_app(same))
    assert response.headers.get_list("ratelimit-policy") == ['"per-client";q=3;w=1']
    assert response.headers.get_list("ratelimit") == ['"per-client";r=2;t=1']


async def test_an_app_field_that_is_no_list_keeps_its_line_and_ours_is_left_out() -> None:
    legacy = [("RateLimit", "limit=100, remaining=50, reset=30")]
    response = await _get(_app(legacy))
    # before: "limit=100, remaining=50, reset=30, "per-client";r=2;t=1": unreadable whole
    assert response.headers.get_list("ratelimit") == ["limit=100, remaining=50, reset=30"]
    assert _names(combined(response, "ratelimit-policy")) == ["per-client"]


TRIO = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def _trio(response: httpx.Response) -> list[list[str]]:
    return [response.headers.get_list(name) for name in TRIO]


@pytest.mark.parametrize("names", ["x-ratelimit", "both"])
async def test_the_legacy_fields_go_out_once_the_limit_closest_to_refusing(names: str) -> None:
    app_trio = [("X-RateLimit-Limit", "100"), ("X-RateLimit-Reset", "1999999999")]
    # the app's has more left: ours (3 a second, 2 left) goes out, whole
    response = await _get(_app([*app_trio, ("X-RateLimit-Remaining", "50")], names))
    limit, remaining, reset = _trio(response)
    assert (limit, remaining) == (["3"], ["2"])  # before: ["100", "3"], ["50", "2"]
    assert len(reset) == 1
    assert reset != ["1999999999"]
    # the app's has fewer left: the app's goes out, whole
    response = await _get(_app([*app_trio, ("X-RateLimit-Remaining", "0")], names))
    assert _trio(response) == [["100"], ["0"], ["1999999999"]]


async def test_an_apps_own_429_keeps_its_legacy_fields() -> None:
    refused = [("X-RateLimit-Limit", "10"), ("X-RateLimit-Remaining", "0")]
    response = await _get(_app(refused, "x-ratelimit", status=429))
    assert response.status_code == 429
    assert _trio(response) == [["10"], ["0"], []]  # not a third field of another limit


async def test_an_on_reject_response_that_sets_one_legacy_field_gets_none_of_ours() -> None:
    def hook(ctx: Any, decision: Any) -> Response:
        return JSONResponse(
            {"error": "slow down"}, status_code=429, headers={"X-RateLimit-Limit": "7"}
        )

    response = await _get(_app([], "x-ratelimit", on_reject=hook), n=4)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    # before: ["7"], ["0"], [<ours>]: the hook's limit with our count of another one
    assert _trio(response) == [["7"], [], []]


async def test_two_depends_limits_send_one_legacy_trio() -> None:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    app = FastAPI()
    fidelity.install(app)
    wide = Depends(fidelity.limit("100/h", name="wide"))
    narrow = Depends(fidelity.limit("5/h", name="narrow"))

    @app.get("/a", dependencies=[wide, narrow])
    async def endpoint() -> dict[str, bool]:
        return {"ok": True}

    policy = Policy(breaker=None, rate_limit_header_names="x-ratelimit")
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/a")
    assert response.status_code == 200
    # before: ["100", "5"], ["99", "4"]
    assert _trio(response)[:2] == [["5"], ["4"]]
    assert len(_trio(response)[2]) == 1
