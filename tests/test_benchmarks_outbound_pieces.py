"""benchmarks/outbound.py's per-function callgrind reading and its pieces (ablations)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("httpx_retries")
pytest.importorskip("nopanic")
pytest.importorskip("pyresilience")


def test_callgrind_self_counts_each_function_s_own_cost_not_its_callees() -> None:
    from benchmarks.outbound import callgrind_self

    text = "\n".join(
        [
            "events: Ir",
            "fl=(1) a.c",
            "fn=(1) main",
            "10 100",
            "cfl=(1)",
            "cfn=(2) helper",
            "calls=3 20",
            "11 999",  # inclusive cost of the 3 calls: helper's, not main's
            "+1 5",
            "fn=(2)",
            "20 300",
            "* 33",
            "fn=(3) other",
            "-2 7",
            "totals: 1444",
        ]
    )
    assert callgrind_self(text) == {"main": 105, "helper": 333, "other": 7}


def test_every_piece_is_built_and_read_against_one_that_exists() -> None:
    from benchmarks.outbound import PIECES, _requests, build_pieces, run_layer

    layers = build_pieces()
    assert {name for name, _what, _against in PIECES} <= set(layers)
    for _name, _what, against in PIECES:
        assert not against or against in layers

    async def go() -> None:
        for layer in layers.values():  # each variant answers a call (none fails at setup)
            await run_layer(layer, _requests(2))

    asyncio.run(go())
