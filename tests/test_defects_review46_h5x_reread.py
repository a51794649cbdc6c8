"""Review 46 (h5x46): healthy requests answered 500 right after a whole-service outage.

benchmarks/hops_blackbox.py, `all_503`, default policy: 0-2 requests a run sent after C
recovered were answered 500, no give-up recorded anywhere. B's route let out anyio's
`BusyResourceError: Another task is already reading from this resource` from its
FidelityTransport call, on C's good answer. A retry that waited for evidence after a
callee's shed (`loop._parked`) had read the shed to its end first (READ), which gave its
connection back to the pool; the retry's backoff then "spent" that same answer again
(`_spend`), iterating its raw stream: a read on a pooled connection that another call
of B's was using meanwhile. Whichever of the two read second failed (the other call's
app raised: a 500), and the spender could take bytes of the other call's answer.

Now an answer already read (or closed) is only closed, never read again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from tests.test_defects_review45_hop_parked import HOSTS, SHED_BODY, Rig


class WireShed(httpx.AsyncByteStream):
    """A shed's body on a pooled HTTP/1.1 connection: once closed, the connection is
    back in the pool, and a read of this stream reads someone else's answer."""

    def __init__(self, reads_after_close: list[int]) -> None:
        self.closed = False
        self.reads_after_close = reads_after_close

    async def __aiter__(self) -> Any:
        if self.closed:
            self.reads_after_close.append(1)
            return
        yield SHED_BODY

    async def aclose(self) -> None:
        self.closed = True


class WireRig(Rig):
    """The review-45 rig, its sheds' bodies on the wire (`WireShed`)."""

    def __init__(self) -> None:
        self.reads_after_close: list[int] = []
        super().__init__()

    def upstream(self, request: httpx.Request) -> httpx.Response:
        answer = super().upstream(request)
        if answer.status_code != 503:
            return answer
        return httpx.Response(503, headers=answer.headers, stream=WireShed(self.reads_after_close))


def test_a_waiting_retry_does_not_read_the_shed_again_after_its_connection_went_back() -> None:
    rig = WireRig()
    rig.outage()
    rig.reads_after_close.clear()
    rig.mode = dict.fromkeys(HOSTS, "shed")

    def recovered(host: str) -> None:
        rig.mode = {h: ("shed" if h == host else "ok") for h in HOSTS}
        rig.on_shed = None

    rig.on_shed = recovered
    r1, r2 = rig.run(("r1", 0.0), ("r2", 0.2))
    # the retry waited for evidence and went to the instance that answered again
    assert r2.status_code == 200
    assert r1.status_code == 200, rig.records["r1"]
    assert len(rig.of("r1")) == 2
    # before: the retry's backoff read the shed's stream once more after it was closed
    # (its connection back in the pool): [1]
    assert rig.reads_after_close == []


class SyncWireShed(httpx.SyncByteStream):
    def __init__(self, reads_after_close: list[int]) -> None:
        self.closed = False
        self.reads_after_close = reads_after_close

    def __iter__(self) -> Any:
        if self.closed:
            self.reads_after_close.append(1)
            return
        yield SHED_BODY

    def close(self) -> None:
        self.closed = True


def _shed(stream: Any) -> httpx.Response:
    headers = {"content-length": str(len(SHED_BODY))}
    return httpx.Response(503, headers=headers, stream=stream)


def test_spending_an_answer_read_or_closed_already_reads_nothing() -> None:
    from fidelity_mw.outbound.hedge import _drain
    from fidelity_mw.outbound.transport import _spend, _spend_sync

    reads: list[int] = []

    async def go() -> None:
        for spend in (_spend, _drain):
            read = _shed(WireShed(reads))
            await read.aread()
            await spend(read)
            closed = _shed(WireShed(reads))
            await closed.aclose()
            await spend(closed)
            fresh = _shed(WireShed(reads))  # still read to its end, then closed
            await spend(fresh)
            assert fresh.is_closed

    asyncio.run(go())
    read_sync = _shed(SyncWireShed(reads))
    read_sync.read()
    _spend_sync(read_sync)
    closed_sync = _shed(SyncWireShed(reads))
    closed_sync.close()
    _spend_sync(closed_sync)
    assert reads == []
