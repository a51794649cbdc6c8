"""docs/operations.md's Prometheus recipe, run as written, against the series table beside
it: every series the table names (those it says appear with Redis state aside) is
scraped, with the labels the table gives. The recipe gave the meter provider to the
middleware alone, so `http_client_request_duration_seconds`, which the table lists for
each outbound attempt through `FidelityTransport`, never appeared: a transport given no
`meter_provider=` reports to the global provider."""

from __future__ import annotations

import asyncio
import re
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def prometheus_section() -> str:
    text = DOC.read_text()
    start = text.index("\n## Prometheus\n")
    return text[start : text.index("\n## ", start + 1)]


def documented_series() -> dict[str, tuple[set[str], str]]:
    """Series name -> (its labels, the row's text), from the section's table."""
    out: dict[str, tuple[set[str], str]] = {}
    for row in prometheus_section().splitlines():
        if not row.startswith("| `"):
            continue
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([a-z_]+)`", cells[0])
        # "`a` / `b`" in a row of two series: the first's label, then the second's
        either = re.findall(r"`([a-z_]+)` / `([a-z_]+)`", cells[1])
        shared = set(re.findall(r"`([a-z_]+)`", cells[1])) - {x for pair in either for x in pair}
        first = names[0]
        for i, name in enumerate(names):
            # `x_bucket` / `_sum` / `_count`: suffixes of the first name's base
            full = first.rsplit("_", 1)[0] + name if name.startswith("_") else name
            own = {pair[min(i, 1)] for pair in either}
            out[full] = (shared | own, row)
    for suffix in ("_sum", "_count"):
        for name in list(out):
            if name.endswith("_bucket") and f"`{suffix}`" in out[name][1]:
                out[name[: -len("_bucket")] + suffix] = out[name]
    return out


def recipe() -> str:
    block = re.search(r"```python\n(.*?)```", prometheus_section(), re.S)
    assert block is not None
    return block.group(1)


def scraped(registry: Any) -> dict[str, set[str]]:
    series: dict[str, set[str]] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#"):
            continue
        found = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", line)
        assert found is not None
        series.setdefault(found.group(1), set()).update(
            re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', found.group(2) or "")
        )
    return series


def test_the_recipe_scrapes_every_series_the_table_names() -> None:
    answers = iter([503])

    async def inventory(request: Request) -> PlainTextResponse:
        return PlainTextResponse("x", status_code=next(answers, 200))

    upstream = Starlette(routes=[Route("/inventory", inventory)])
    names: dict[str, Any] = {}

    async def orders(request: Request) -> PlainTextResponse:
        answer = await names["client"].get("http://inventory.internal/inventory")
        return PlainTextResponse("ok", status_code=answer.status_code)

    app = Starlette(routes=[Route("/orders", orders)])
    names.update(
        app=app,
        policy=Policy.from_dict(
            {"version": 1, "rate_limit": [{"name": "c", "rate": "2/min", "match": "/orders"}]}
        ),
        httpx=httpx,
        FidelityMiddleware=FidelityMiddleware,
        # the recipe's transports, their I/O to the app above instead of the network
        FidelityTransport=partial(FidelityTransport, httpx.ASGITransport(app=upstream)),
    )
    exec(recipe(), names)
    assert "client" in names, "the recipe builds no outbound client"

    async def traffic() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [(await client.get("/orders")).status_code for _ in range(3)]

    assert asyncio.run(traffic()) == [200, 200, 429]
    got = scraped(names["registry"])
    missing: list[str] = []
    for name, (labels, row) in documented_series().items():
        if ("Redis" in row and "appears with" in row) or "(Redis and tiered state only)" in row:
            continue  # (they appear with Redis or tiered state: this app runs on memory)
        if name not in got:
            missing.append(name)
        else:
            assert labels <= got[name], (name, labels - got[name])
    assert missing == []
