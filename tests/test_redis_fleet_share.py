"""Fleet-aware fallback, measured: 4 uvicorn processes on one real redis-server, Redis
SIGSTOPped for 5 s while the fleet is offered 2x its limit.

With the share (the default, weighted by load), each process enforces its part of the
limit while it cannot reach Redis (about a quarter each for this even load), so the
fleet admits at most about one limit during the outage: asserted at most 1.2 x (rate x
outage + burst), where the outage is the span from the first to the last fallback
decision (the members notice the pause and come back at slightly different moments;
their own windows lie inside that span). Here the load rises 5x (from the warm-up's)
a second before the pause, so the members' last readings of their load fractions are
taken while it changes (a rise is believed one announcement late). With the share
off, each process enforces the whole limit, and a quarter of 2x the load never
reaches it: every request of the outage is admitted (about 2x the limit here; up to
4x under more load). Both are printed side by side with their numbers. A third run
gives one member 95 % of the requests (the skew of keep-alive connections under
`uvicorn --workers`): weighted by load it enforces most of the limit, not a quarter.
Redis is paused there once the fleet's load reports in Redis hold the skew, not after a
fixed time (a starved member reports late), and in the even runs once every member has
announced under the risen load. What the busy member admitted is held against what the
even share and its weight admit of the requests it was offered, as they came (replayed):
a member starved on a busy machine decides its queued requests in clumps, and a bucket
admits a burst of a clump, not the rate over the gap before it.

The load is bounded in count and time; the slack covers a busy 2-core machine (a
starved member decides late, never more often). Nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import math
import textwrap
import time
from collections import Counter

import pytest
import redis as redis_sync

from fidelity_mw.decide.fleet import load_weight, share_spec, weighted_spec
from fidelity_mw.decide.gcra import LimitSpec, gcra
from redis_server import RedisServer, require_redis
from test_redis_fleet import N_PROCESSES, Connection, Fleet, Reply, running

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

RATE = 200
BURST = 20
PAUSE_AT_S = 1.0
OUTAGE_S = 5.0
LOAD_S = 7.0
SETTLE_BUDGET_S = 30.0  # bounded: the wait for every member's announcement under the load
SLACK = 1.2  # the bound: admissions during the outage <= 1.2 x the fleet limit

APP = textwrap.dedent(
    '''
    """One fleet member; x-state-source says `<source>;<fleet size>;<age>;<weight>` of its
    limiter decision."""
    import os

    from fidelity_mw import FidelityMiddleware, Policy
    from fidelity_mw.policy import RateLimit, StateConfig

    policy = Policy(
        state=StateConfig(
            url=os.environ["FMW_URL"],
            key_prefix=os.environ["FMW_PREFIX"],
            timeout_ms=int(os.environ["FMW_TIMEOUT_MS"]),
            connect_timeout_ms=int(os.environ["FMW_TIMEOUT_MS"]),
            fleet_share_max_age_s=float(os.environ["FMW_SHARE_MAX_AGE_S"]),
        ),
        rate_limits=(
            RateLimit(name="fleet", rate="{rate}/s", burst={burst}, key="global",
                      match="/api/limited"),
        ),
        rate_limit_headers="never",
    )


    async def inner(scope, receive, send):
        await send({{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]}})
        await send({{"type": "http.response.body", "body": b"ok"}})


    mw = FidelityMiddleware(inner, policy=policy, telemetry=False)


    async def app(scope, receive, send):
        scope["state"] = {{}}

        async def tagged(message):
            if message["type"] == "http.response.start":
                ctx = scope["state"].get("fidelity")
                tag = ""
                for decision in (ctx.decisions if ctx is not None else ()):
                    if decision.layer == "ratelimit":
                        details = decision.details or {{}}
                        share = details.get("fleet_size", details.get("fleet_share", "-"))
                        age = details.get("fleet_size_age_s", "-")
                        weight = details.get("fleet_weight", "-")
                        tag = f"{{decision.state_source}};{{share}};{{age}};{{weight}}"
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"x-state-source", tag.encode())]
            await send(message)

        await mw(scope, receive, tagged)
    '''
).format(rate=RATE, burst=BURST)


@pytest.fixture(scope="module")
def share_redis(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    require_redis()
    server = RedisServer(tmp_path_factory.mktemp("share-redis")).start()
    try:
        yield server
    finally:
        server.resume()
        server.stop()


async def warm(ports: list[int], url: str, prefix: str | None) -> None:
    """Every member answers (so announces itself) until each has announced since all four
    had joined: each then holds a fleet size of four. Waited for in Redis, not for a
    time: on a busy machine a starved member announces late (its size read before the
    others joined was once still 2 when Redis paused). Without the share (`prefix`
    None: members do not announce), every member answers for 1.5 s."""
    client = redis_sync.Redis.from_url(url, socket_timeout=5.0)
    key = f"{{{prefix}}}:fleet"
    conns = [Connection(port) for port in ports]
    try:
        joined_at: float | None = None  # server time when all were members
        for rounds in range(2000):  # bounded: at least 100 s
            if prefix is None and rounds == 30:
                break
            for conn in conns:
                await asyncio.wait_for(conn.get("/api/limited"), timeout=5.0)
            await asyncio.sleep(0.05)
            if prefix is None:
                continue
            members = client.zrange(key, 0, -1, withscores=True)
            if len(members) < N_PROCESSES:
                continue
            if joined_at is None:
                seconds, micros = client.time()
                joined_at = seconds + micros / 1e6
            elif all(score > joined_at for _, score in members):
                break
        else:
            raise AssertionError(f"the fleet did not settle: {members}")
        for conn in conns:  # each announcement's reply lands just after its score
            await asyncio.wait_for(conn.get("/api/limited"), timeout=5.0)
    finally:
        for conn in conns:
            conn.close()
        client.close()


async def outage_run(share_redis: RedisServer, tmp_path, share: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    name = "share" if share else "whole"
    fleet = Fleet(
        tmp_path / name,
        share_redis.url,
        f"fs-{name}",
        timeout_ms=100,
        app=APP,
        env={"FMW_SHARE_MAX_AGE_S": "60" if share else "0"},
    )
    with running(fleet):
        await warm(fleet.ports, share_redis.url, f"fs-{name}" if share else None)
        marks: dict[str, float] = {}
        stop = asyncio.Event()

        async def outage() -> None:
            try:
                await asyncio.sleep(PAUSE_AT_S)  # the load rises 5x from the warm-up's
                if share:
                    await settled(share_redis.url, f"fs-{name}")
                marks["paused"] = time.monotonic()
                try:
                    await asyncio.to_thread(share_redis.pause)
                    await asyncio.sleep(OUTAGE_S)
                finally:
                    await asyncio.to_thread(share_redis.resume)
                    marks["resumed"] = time.monotonic()
                await asyncio.sleep(LOAD_S - PAUSE_AT_S - OUTAGE_S)
            finally:
                stop.set()

        per_member, _ = await asyncio.gather(
            skewed_load(fleet.ports, "/api/limited", rate=2 * RATE, stop=stop, skew=None),
            outage(),
        )
    return report(name, [r for replies in per_member for r in replies], marks)


async def settled(url: str, prefix: str) -> None:
    """Wait until every member holds a fleet size of four under the load: all four live at
    one server time, then each announced after it (as `warm` waits). A member starved on
    a busy machine announces late: one load 10 run had the load's first requests in
    fallback (calls past their 100 ms timeout), and a member whose calls reached Redis
    read the others dropped for that silence (sizes 2, 1) before the pause, 3 in it.
    Bounded."""
    client = redis_sync.Redis.from_url(url, socket_timeout=5.0)
    key = f"{{{prefix}}}:fleet"
    try:
        deadline = time.monotonic() + SETTLE_BUDGET_S
        joined_at: float | None = None  # server time when all four were live
        members: list[tuple[bytes, float]] = []
        while time.monotonic() < deadline:
            members = await asyncio.to_thread(client.zrange, key, 0, -1, withscores=True)
            if len(members) < N_PROCESSES:
                joined_at = None
            elif joined_at is None:
                joined_at = await asyncio.to_thread(server_time, client)
            elif all(score > joined_at for _, score in members):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the fleet did not settle under the load: {members}")
    finally:
        client.close()


def report(name: str, replies: list[Reply], marks: dict[str, float]) -> dict[str, float]:
    fallback = [r for r in replies if r.source.startswith("fallback;")]
    assert fallback, "no decision was taken in fallback: the outage was not noticed"
    span = max(r.done for r in fallback) - min(r.sent for r in fallback)
    admitted = sum(r.status == 200 for r in fallback)
    bound = RATE * span + BURST
    shares = Counter(r.source.split(";")[1] for r in fallback)
    # the outage's: a member whose calls pass their timeout on a busy machine decides in
    # fallback before the pause too, on whatever fleet it read then
    since_pause = Counter(r.source.split(";")[1] for r in fallback if r.sent >= marks["paused"])
    ages = [float(a) for r in fallback if (a := r.source.split(";")[2]) != "-"]
    statuses = Counter(r.status for r in replies)
    summary = (
        f"[{name}] {len(replies)} requests at {2 * RATE}/s, statuses {dict(statuses)}; "
        f"Redis paused {marks['resumed'] - marks['paused']:.2f} s; fallback decisions "
        f"over {span:.2f} s: {len(fallback)}, admitted {admitted} = "
        f"{admitted / bound:.2f} x the fleet limit ({bound:.0f} = {RATE}/s x {span:.2f} s "
        f"+ {BURST}); fleet share used {dict(shares)}; fleet size age "
        f"{min(ages, default=0):.2f}..{max(ages, default=0):.2f} s; each share's use, sent "
        f"from..to, s after the pause (resumed at {marks['resumed'] - marks['paused']:.2f}): "
        + ", ".join(
            f"{share}: {min(at):.2f}..{max(at):.2f}"
            for share in sorted(shares)
            if (
                at := [
                    r.sent - marks["paused"] for r in fallback if r.source.split(";")[1] == share
                ]
            )
        )
    )
    print("\n" + summary)
    # every request answered, no 500 (a failure says the whole run, for a busy machine's case)
    assert {r.status for r in replies} <= {200, 429}, summary
    return {
        "summary": summary,  # type: ignore[dict-item]
        "admitted": admitted,
        "bound": bound,
        "fallback": len(fallback),
        "shares": since_pause,  # type: ignore[dict-item]
        "since_pause": sum(since_pause.values()),
    }


async def test_outage_admits_the_fleet_limit_with_the_share(share_redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    got = await outage_run(share_redis, tmp_path, share=True)
    said = got["summary"]
    assert got["shares"] == Counter({str(N_PROCESSES): got["since_pause"]}), said  # type: ignore[comparison-overlap]
    assert got["admitted"] <= SLACK * got["bound"], said
    assert got["admitted"] < got["fallback"], said  # the share refused some of the 2x load


async def test_outage_admits_each_whole_limit_without_the_share(share_redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Today's behaviour, for comparison: a quarter of 2x the load stays under a whole
    limit, so (nearly) every request decided in fallback is admitted. Nearly: a member
    starved for a moment by the busy machine meets its queued requests at once, and
    more than a burst of them at one instant is refused (2.5 % in one measured run; runs
    beside other test suites, load 7-10, refused 10-25 %). What it shows against the
    share's test above: the fleet admits more than one fleet limit (the share's test
    holds it to 1.2 x that; this one admits about 2 x)."""
    got = await outage_run(share_redis, tmp_path, share=False)
    said = got["summary"]
    assert got["shares"] == Counter({"-": got["since_pause"]}), said  # type: ignore[comparison-overlap]
    assert got["admitted"] > got["bound"], said


# ---------------------------------------------------------------- one member takes ~all


SKEW = 0.95  # the busy member's part of the requests (a keep-alive connection's skew)
SKEW_OUTAGE_S = 2.5
SKEW_AFTER_S = 0.5  # the load goes on this long after Redis is back
SKEW_SETTLE_BUDGET_S = 90.0  # bounded: the wait for the fleet's load reports
SKEW_MAX_S = SKEW_SETTLE_BUDGET_S + SKEW_OUTAGE_S + SKEW_AFTER_S + 5.0


def load_table(client: redis_sync.Redis, prefix: str) -> dict[str, list[float]]:  # type: ignore[type-arg]
    """The fleet's load table (state/lua/fleet.lua): member id -> [at, since, rate,
    prev_since, prev_rate], in the server's time."""
    raw = client.hgetall(f"{{{prefix}}}:fleet:load")
    return {
        (k.decode() if isinstance(k, bytes) else k): [float(f) for f in v.split()]
        for k, v in raw.items()
    }


def server_time(client: redis_sync.Redis) -> float:  # type: ignore[type-arg]
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


async def skew_reported(url: str, prefix: str, since: float) -> dict[str, list[float]]:
    """Wait until the fleet's load reports hold the skewed load that began at `since`
    (server time): every member has announced twice since, so both rates it reported
    are of that load, and after that the busiest member announced once more, so the
    fraction it read (the lower of its latest and its previous rate's, each against the
    others' rates of the same time) is of that load alone. A member's announcements go
    out once a second at best (later when it is starved, or its connections busy), so
    this is waited for in Redis, not for a time: with a fixed 3 s, a starved busy member
    read 0.38 of the load (its previous interval still the warm-up's even one) and its
    weight was 0.354. Bounded; returns the table."""
    client = redis_sync.Redis.from_url(url, socket_timeout=5.0)
    try:
        deadline = time.monotonic() + SKEW_SETTLE_BUDGET_S
        settled_at: float | None = None  # server time when all had announced twice
        table: dict[str, list[float]] = {}
        while time.monotonic() < deadline:
            table = await asyncio.to_thread(load_table, client, prefix)
            if len(table) == N_PROCESSES:
                if settled_at is None:
                    if all(entry[3] >= since for entry in table.values()):
                        settled_at = await asyncio.to_thread(server_time, client)
                else:
                    busiest = max(table.values(), key=lambda entry: entry[2])
                    if busiest[0] > settled_at:
                        return table
            await asyncio.sleep(0.05)
        raise AssertionError(f"the skewed load was not reported in time: {table}")
    finally:
        client.close()


def replayed(times: list[float], spec: LimitSpec) -> int:
    """How many requests decided at `times` one local bucket of `spec` admits (decide/gcra,
    from a full bucket: the share's own keys are fresh when Redis goes away)."""
    tat = -math.inf
    admitted = 0
    for t in sorted(times):
        verdict = gcra(tat, t, spec.interval_s, spec.tolerance_s)
        if verdict.allowed:
            tat = verdict.tat
            admitted += 1
    return admitted


async def skewed_load(
    ports: list[int], path: str, rate: float, stop: asyncio.Event, skew: float | None = SKEW
) -> list[list[Reply]]:
    """`rate` requests/s until `stop` is set (SKEW_MAX_S at most): `skew` of them to the
    first member, the rest spread over the others (None: round-robin over all); the
    replies per member. Bounded: count and time."""
    total = int(rate * SKEW_MAX_S)
    replies: list[list[Reply]] = [[] for _ in ports]
    pools: list[asyncio.Queue[Connection]] = []
    for m, port in enumerate(ports):
        pools.append(asyncio.Queue())
        for _ in range(16 if skew is None else 32 if m == 0 else 4):
            pools[m].put_nowait(Connection(port))
    start = time.monotonic()

    async def one(i: int) -> None:
        if skew is None:
            m = i % len(ports)
        else:
            m = 0 if i % 100 < 100 * skew else 1 + i % (len(ports) - 1)
        conn = await pools[m].get()
        sent = time.monotonic()
        try:
            status, source = await asyncio.wait_for(conn.get(path), timeout=5.0)
            replies[m].append(Reply(sent, time.monotonic(), status, source))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            conn.close()
            replies[m].append(Reply(sent, time.monotonic(), -1, type(exc).__name__))
        finally:
            pools[m].put_nowait(conn)

    async def offer() -> None:
        sending: list[asyncio.Task[None]] = []
        for i in range(total):
            if stop.is_set():
                break
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            sending.append(asyncio.create_task(one(i)))
        await asyncio.gather(*sending)

    try:
        await asyncio.wait_for(offer(), timeout=SKEW_MAX_S + 30.0)
    finally:
        for pool in pools:
            while not pool.empty():
                pool.get_nowait().close()
    return replies


async def test_outage_with_one_member_taking_nearly_all_requests(share_redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The review's case, bounded: 95 % of 2x the limit goes to one member. Weighted by
    load (the default) it enforces most of the limit while Redis is paused, where the
    even share let it enforce a quarter: it admits more than twice what a quarter could
    (rate / 4 x its span while paused + burst / 4), and the fleet still admits at most 1.2 x
    the fleet limit. Redis is paused once the fleet's load reports hold the skew
    (`skew_reported`). Counted, not timed."""
    fleet = Fleet(
        tmp_path / "skew",
        share_redis.url,
        "fs-skew",
        timeout_ms=100,
        app=APP,
        env={"FMW_SHARE_MAX_AGE_S": "60"},
    )
    with running(fleet):
        await warm(fleet.ports, share_redis.url, "fs-skew")
        with share_redis.client() as client:
            since = server_time(client)
        marks: dict[str, float] = {}
        stop = asyncio.Event()

        async def outage() -> None:
            try:
                await skew_reported(share_redis.url, "fs-skew", since)
                marks["paused"] = time.monotonic()
                try:
                    await asyncio.to_thread(share_redis.pause)
                    await asyncio.sleep(SKEW_OUTAGE_S)
                finally:
                    await asyncio.to_thread(share_redis.resume)
                    marks["resumed"] = time.monotonic()
                await asyncio.sleep(SKEW_AFTER_S)
            finally:
                stop.set()

        per_member, _ = await asyncio.gather(
            skewed_load(fleet.ports, "/api/limited", rate=2 * RATE, stop=stop), outage()
        )
    got = report("skew", [r for replies in per_member for r in replies], marks)
    said = got["summary"]
    busy = [r for r in per_member[0] if r.source.startswith("fallback;")]
    assert busy, said
    # The weight asserted is the one it used while Redis was paused: requests sent and
    # answered then. A member starved past its 100 ms Redis timeout also decides in
    # fallback before and after the pause (load 25: a 21.6 s fallback span around a
    # 2.6 s pause), and after it on readings taken then: weights 0.25, 0.2013 and 1.0
    # (a fleet of one) each need an announcement Redis answered, which it cannot while
    # paused. When each weight was used is in the message.
    paused = [r for r in busy if marks["paused"] <= r.sent and r.done <= marks["resumed"]]
    weights = Counter(r.source.split(";")[3] for r in paused)
    when: dict[str, list[float]] = {}
    for r in busy:
        at = when.setdefault(r.source.split(";")[3], [math.inf, -math.inf])
        at[0], at[1] = min(at[0], r.sent - marks["paused"]), max(at[1], r.sent - marks["paused"])
    # Its admissions are counted over the same requests: the span of all its fallback
    # decisions once reached from a starved moment 2.7 s before the pause to the pause's
    # end (load 28), a stretch mostly decided with Redis, and twice the even share over
    # it (595) was more than the 487 it admitted in fallback in all.
    assert paused, said
    busy_span = max(r.done for r in paused) - min(r.sent for r in paused)
    busy_admitted = sum(r.status == 200 for r in paused)
    even_bound = RATE / N_PROCESSES * busy_span + BURST / N_PROCESSES
    said += (
        f"; busy member: {len(busy)} fallback decisions, {len(paused)} while paused, over "
        f"{busy_span:.2f} s, admitted {busy_admitted} (the even share admits at most "
        f"{even_bound:.0f}), weights "
        f"while paused {dict(weights)}; each weight's use, sent from..to, s after the pause "
        f"(resumed at {marks['resumed'] - marks['paused']:.2f}): "
        + ", ".join(f"{w}: {a:.2f}..{b:.2f}" for w, (a, b) in sorted(when.items()))
    )
    assert got["admitted"] <= SLACK * got["bound"], said
    # its weight came from its load: far above the quarter (0.2 / 4 + 0.8 x 0.95 = 0.81)
    assert all(w != "-" and float(w) > 2 * load_weight(N_PROCESSES, 0.25, 0.2) for w in weights), (
        said
    )
    # It enforced its weight, not the even share, on what it was offered: counted on its
    # requests as they came. A member starved on a busy machine decides what queued on
    # its 32 connections at once, and a bucket admits a burst of such a clump, not the
    # rate over the gap before it (load 13: 127 admitted of 274+, about the even share's
    # rate x span, where twice that was asserted; SIGSTOPped 0.25 s of every 0.29 s while
    # paused, in a scratch copy: 187 where 272 was asked). So both shares are replayed on
    # these requests, each decided between its send and its reply: the even share at the
    # more generous of the two timings (the most it could have admitted), its weight at
    # the less generous (the least; 83 and 171 in that scratch run). It admitted at least
    # half way from the one to the other (the even share itself admits no more than the
    # first: 54, 110, 126 where the replays said 66, 128, 129, with the weight ignored in
    # a scratch copy), or 90 % of what it was offered when that is less.
    whole = LimitSpec("fleet", 1.0 / RATE, BURST / RATE, 1, False)
    quarter = share_spec(whole, N_PROCESSES)
    weighted = weighted_spec(whole, min(float(w) for w in weights))
    even_most = max(
        replayed([r.sent for r in paused], quarter), replayed([r.done for r in paused], quarter)
    )
    weight_least = min(
        replayed([r.sent for r in paused], weighted), replayed([r.done for r in paused], weighted)
    )
    said += (
        f"; replayed on its {len(paused)} requests while paused: the even share admits at most "
        f"{even_most}, its weight at least {weight_least}"
    )
    print(said)
    assert busy_admitted >= min(even_most + 0.5 * (weight_least - even_most), 0.9 * len(paused)), (
        said
    )
