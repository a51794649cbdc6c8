"""Outbound cost per call on the success path: plain httpx vs retry layers, interleaved rounds.

Every variant is an `httpx.AsyncClient` whose innermost transport is the same
`httpx.MockTransport` (a 200 with a 2-byte body), so the network does not
drown the difference:

  plain          the MockTransport alone
  fidelity       FidelityTransport around it, outside a request (a context per call)
  fidelity_req   FidelityTransport inside a request's DecisionContext (the common case),
                 bound once per batch as the middleware binds it once per request
  httpx_retries  httpx-retries' RetryTransport around it
  tenacity       a tenacity-decorated async function calling the plain client
  stamina        a stamina-decorated async function calling the plain client
  nopanic        nopanic 0.3 as its README recommends for an HTTP dependency: a composed
                 stack (deadline -> retry -> circuit breaker -> timeout) around an async
                 function that calls the plain client and `raise_for_status()`s
  pyresilience   pyresilience 0.4 as its README recommends for an HTTP client: `@resilient`
                 with retry (`retry_on_status`, `retry_after_delay`), a per-attempt
                 timeout, a circuit breaker and a retry budget around the plain call
  pybreaker      a pybreaker breaker around the plain call (`with breaker.calling():`,
                 the only form that sees an async call's failure; no retry, no timeout)
  plain_headers  a pass-through transport that only sets the two headers fidelity
                 sends (x-fidelity-attempt, x-request-timeout-ms) with httpx's public
                 API and leaves them on the request: the floor for any layer that
                 must add two headers (httpx's own per-header work included: after
                 the transport returns, its cookie handling copies every request
                 header into a urllib Request, each through `Headers.__getitem__`,
                 which scans them all); fidelity appends them to the raw list and
                 takes them off before it returns, so it pays neither

All retry layers are configured for 3 attempts; on the success path none of
them waits. The all-in-one toolkits are configured like fidelity's default
outbound policy as far as they can be (`competitors()` says where they cannot):
3 attempts, full-jitter backoff from 100 ms capped at 2 s on transport errors and
429/502/503/504, a failure-ratio breaker (0.5 over at least 20 calls, 5 s open), a
10 s attempt timeout, a retry budget (20 % of calls plus 3/s over 10 s) and, for
nopanic, a 30 s deadline per call. Rounds run the variants in a shuffled order; we report each
variant's median time per call and the medians of the per-round paired
differences and ratios against `plain`, which cancels most drift on a
shared machine. Time is process CPU time (`time.process_time`), so being
descheduled by other tenants of the machine does not count.

A second table times the layers alone: `handle_async_request` called
directly with a do-nothing inner transport, against a pass-through wrapper
(`fidelity` outside a request, `fidelity_req` inside one; `floor` makes only
fidelity's store operations and headers, hand-written: the least any layer
with a shared breaker and budget could cost here).

`--baseline REV` adds `fidelity@REV` (and `fidelity_req@REV`): the same transport as
of git revision REV, in the same rounds, so a change is measured against its
parent side by side. `--count` prints, instead of times, the Python calls, C calls,
generator/coroutine resumptions, bytecodes and allocated blocks per call of each layer
(the counters of benchmarks/callcount.py), and the functions fidelity calls and the
bytecodes each runs per call: counts do not move with the machine's load; with
`--client`, the same for whole `AsyncClient.get` calls (`plain`, `fidelity_req`,
`httpx_retries`, `plain_headers`), by function beyond `plain`'s.
`--instructions` counts machine instructions per call of the layers alone under
`valgrind --tool=callgrind` (as benchmarks/server_inprocess.py does for inbound): a run
with `--calls` calls less one that builds the same requests and calls nothing; a layer
named `NAME+compiled` runs in .venv-compiled (the mypyc build); a name of `--pieces`' variants
(`loop_1_instance`, `no_breaker`, ...) counts that variant. With `--functions` it prints
instead each layer's instructions per call by function (each function's own, from the
same two callgrind runs): the C functions of the interpreter for a pure layer, the
compiled functions themselves for a `+compiled` one (`loop_1_instance_telemetry+compiled`,
...). FIDELITY_MW_COMPILED_PYTHON=<another venv's python> counts another mypyc build.
`--pieces` counts, as `--count` does, the layer with one piece taken away or added (no
breaker, no protocol headers, telemetry on with tracing off, a service's attempt loop and
balancer, a body to watch): what each piece costs.

    .venv/bin/python benchmarks/outbound.py [--rounds 40] [--batch 500] [--no-write]
        [--baseline REV] [--layers-only]
    .venv/bin/python benchmarks/outbound.py --profile   # cProfile of the fidelity layer
    .venv/bin/python benchmarks/outbound.py --count [--client] [--baseline REV]
    .venv/bin/python benchmarks/outbound.py --instructions [--calls 20000] [--baseline REV]
        [--layers pass_through,fidelity,fidelity_req,httpx_retries,floor,fidelity+compiled]
        [--functions]
    .venv/bin/python benchmarks/outbound.py --pieces
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import nopanic
import pybreaker
import stamina
import tenacity
from httpx_retries import Retry, RetryTransport
from pyresilience import (
    CircuitBreakerConfig,
    RetryBudgetConfig,
    RetryConfig,
    TimeoutConfig,
    resilient,
)
from pyresilience.contrib.http import retry_after_delay, retry_on_status

from benchmarks._results import stamp, write_section
from fidelity_mw import FidelityTransport
from fidelity_mw.context import _CURRENT

URL = "http://upstream.internal/items/1"
# The request deadline a batch runs under: long enough that it never passes (`--count` traces
# every bytecode; on a busy machine 2,000 traced calls outlasted a 30 s one), and like any
# deadline past the 10 s attempt timeout it does not cap it (the same path as 30 s).
BATCH_DEADLINE_S = 3600.0
Call = Callable[[], Awaitable[httpx.Response]]


def handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"ok")


def mock() -> httpx.MockTransport:
    return httpx.MockTransport(handler)


class HeadersOnly(httpx.AsyncBaseTransport):
    """Pass-through that adds the two headers FidelityTransport adds, and nothing else."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.headers["x-fidelity-attempt"] = "1"
        request.headers["x-request-timeout-ms"] = "10000"
        return await self.inner.handle_async_request(request)


class PassThrough(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)


class Null(httpx.AsyncBaseTransport):
    """An inner transport that costs nothing: a prebuilt response."""

    def __init__(self) -> None:
        self.response = httpx.Response(200, content=b"ok")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.response


class Floor(httpx.AsyncBaseTransport):
    """The store operations and headers fidelity makes on the success path, hand-written
    and nothing else: the memory store's gate (budget and breaker) before the attempt,
    its outcome record after, the two headers appended and taken off again. No context,
    decisions, deadline, timeouts or error handling: what remains above it is glue."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        from fidelity_mw.decide.breaker import SUCCESS
        from fidelity_mw.outbound.wire import first_stamps

        self.inner = inner
        fidelity = FidelityTransport(inner, telemetry=False)
        self.store: Any = fidelity.engine.store
        self.up = fidelity.upstream(fidelity.engine, httpx.URL(URL))
        self.stamps = first_stamps(self.up.timeout_header)
        self.success = SUCCESS

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        up = self.up
        gate = self.store.outbound_begin_now(
            up.breaker_key, up.breaker, up.budget_key, up.retry, time.monotonic()
        )
        raw = request.headers._list
        raw += self.stamps
        response = await self.inner.handle_async_request(request)
        self.store.record_now(
            up.breaker_key, up.breaker, gate, self.success, False, time.monotonic()
        )
        del raw[-2:]
        return response


TOOLKITS = ("nopanic", "pyresilience", "pybreaker")
RETRIED = (429, 502, 503, 504)  # fidelity's default on_status, and a 429 (with Retry-After)


def _retriable(exc: BaseException) -> bool:
    """nopanic's HTTP recipe, narrowed to what fidelity retries by default."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in RETRIED


def _upstream_failure(exc: BaseException) -> bool:
    """What fidelity's host breaker counts: transport errors and 5xx."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500


Send = Callable[..., Awaitable[httpx.Response]]


def competitors(send: Callable[[str], Send]) -> dict[str, Send]:
    """The all-in-one toolkits (and pybreaker) around `send(name)(*args)`, one plain call
    each: the client's `get` (no args), or for the layers table an inner transport's
    `handle_async_request(request)`.

    Each is configured like fidelity's default outbound policy as far as it can be:

    - nopanic: its recommended order (fallback -> retry -> breaker -> limit -> timeout,
      without the fallback and limit), its HTTP recipe's `raise_for_status()` so 5xx
      reach the retry and the breaker as exceptions, its ratio `RetryBudget` (the same
      numbers as fidelity's budget) and a `deadline` per call (the 30 s default deadline).
    - pyresilience: its HTTP helpers (`retry_on_status` retries a returned 5xx,
      `retry_after_delay` honours Retry-After), a count window of the last 20 calls for
      the breaker (it has no time window), a per-attempt timeout (its default), and its
      retry budget, which is a token bucket (20 retries, 3 refilled per second), not a
      share of the calls. No deadline per call: one `TimeoutConfig` is either per attempt
      or for the whole call.
    - pybreaker: a breaker only. `@breaker` on an `async def` records success when the
      coroutine is created and never sees its failure (its async support is Tornado's
      `gen.coroutine`), so the call runs inside `with breaker.calling():`, the form that
      does see it; 5 consecutive failures (pybreaker has no ratio), 5 s reset.
    """
    nopanic_send = send("nopanic")
    budget = nopanic.RetryBudget(ratio=0.2, min_retries_per_sec=3.0, window=10.0)
    breaker = nopanic.circuit_breaker(
        failure_threshold=0.5,
        min_calls=20,
        window=30.0,
        reset_timeout=5.0,
        on=_upstream_failure,
        name="upstream.internal",
    )

    @nopanic.compose(
        nopanic.deadline(30.0),
        nopanic.retry(
            attempts=3,
            on=_retriable,
            backoff=nopanic.backoff.full_jitter(base=0.1, cap=2.0),
            budget=budget,
        ),
        breaker,
        nopanic.timeout(10.0),
    )
    async def with_nopanic(*args: Any) -> httpx.Response:
        response = await nopanic_send(*args)
        response.raise_for_status()
        return response

    pyresilience_send = send("pyresilience")

    @resilient(
        retry=RetryConfig(
            max_attempts=3,
            delay=0.1,
            backoff_factor=2.0,
            max_delay=2.0,
            jitter=True,
            retry_on=(httpx.TransportError,),
            retry_on_result=retry_on_status(*RETRIED),
            delay_func=retry_after_delay(max_wait=30.0),
        ),
        timeout=TimeoutConfig(seconds=10.0),
        circuit_breaker=CircuitBreakerConfig(
            sliding_window_size=20,
            minimum_calls=20,
            failure_rate_threshold=0.5,
            recovery_timeout=5.0,
            error_types=(httpx.TransportError,),
        ),
        retry_budget=RetryBudgetConfig(max_retries=20, refill_rate=3.0),
    )
    async def with_pyresilience(*args: Any) -> httpx.Response:
        return await pyresilience_send(*args)

    pybreaker_send = send("pybreaker")
    host_breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=5)

    async def with_pybreaker(*args: Any) -> httpx.Response:
        with host_breaker.calling():
            response = await pybreaker_send(*args)
            if response.status_code >= 500:
                response.raise_for_status()
            return response

    return {
        "nopanic": with_nopanic,
        "pyresilience": with_pyresilience,
        "pybreaker": with_pybreaker,
    }


class InContext:
    """A client call made inside one inbound request's context of `package` (fidelity_mw
    or a baseline copy), bound once per batch as FidelityMiddleware binds it once per
    request: binding it is the middleware's cost, not the transport's."""

    def __init__(self, package: Any, call: Call, transport: Any) -> None:
        self.call = call
        self.engine = transport.engine
        self.ctx = package.DecisionContext(
            engine=self.engine, route="/bench", method="GET", started_at=0.0
        )
        self.current = package.context._CURRENT

    def enter(self) -> Callable[[], None]:
        self.ctx.deadline_at = self.engine.clock.monotonic() + BATCH_DEADLINE_S
        self.ctx.decisions.clear()
        token = self.current.set(self.ctx)
        return lambda: self.current.reset(token)


def baseline(rev: str | None) -> Any:
    if rev is None:
        return None
    from benchmarks.overhead import baseline_package

    return baseline_package(rev)


def build(
    old: Any = None, rev: str = ""
) -> tuple[dict[str, Call | InContext], list[httpx.AsyncClient], Callable[[], None]]:
    plain = httpx.AsyncClient(transport=mock())
    headers_only = httpx.AsyncClient(transport=HeadersOnly(mock()))
    fidelity = httpx.AsyncClient(transport=FidelityTransport(mock(), telemetry=False))
    req_transport = FidelityTransport(mock(), telemetry=False)
    fidelity_req = httpx.AsyncClient(transport=req_transport)
    retries = httpx.AsyncClient(
        transport=RetryTransport(mock(), retry=Retry(total=3, backoff_factor=0.1))
    )
    tenacity_client = httpx.AsyncClient(transport=mock())
    stamina_client = httpx.AsyncClient(transport=mock())

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=2),
        retry=tenacity.retry_if_exception_type(httpx.TransportError),
        reraise=True,
    )
    async def with_tenacity() -> httpx.Response:
        return await tenacity_client.get(URL)

    @stamina.retry(on=httpx.TransportError, attempts=3)
    async def with_stamina() -> httpx.Response:
        return await stamina_client.get(URL)

    toolkit_clients = {name: httpx.AsyncClient(transport=mock()) for name in TOOLKITS}

    def toolkit_send(name: str) -> Send:
        client = toolkit_clients[name]
        return lambda: client.get(URL)

    token = _CURRENT.set(None)
    import fidelity_mw

    calls: dict[str, Call | InContext] = {
        "plain": lambda: plain.get(URL),
        "fidelity": lambda: fidelity.get(URL),
        "fidelity_req": InContext(fidelity_mw, lambda: fidelity_req.get(URL), req_transport),
        "httpx_retries": lambda: retries.get(URL),
        "tenacity": with_tenacity,
        "stamina": with_stamina,
        "plain_headers": lambda: headers_only.get(URL),
        **competitors(toolkit_send),
    }
    clients = [
        *toolkit_clients.values(),
        plain,
        fidelity,
        fidelity_req,
        retries,
        tenacity_client,
        stamina_client,
        headers_only,
    ]
    if old is not None:
        old_client = httpx.AsyncClient(transport=old.FidelityTransport(mock(), telemetry=False))
        old_req_transport = old.FidelityTransport(mock(), telemetry=False)
        old_req = httpx.AsyncClient(transport=old_req_transport)
        calls[f"fidelity@{rev}"] = lambda: old_client.get(URL)
        calls[f"fidelity_req@{rev}"] = InContext(old, lambda: old_req.get(URL), old_req_transport)
        clients += [old_client, old_req]
    return calls, clients, lambda: _CURRENT.reset(token)


async def timed(call: Call | InContext, n: int) -> float:
    """CPU seconds per call over `n` sequential calls."""
    if isinstance(call, InContext):
        leave = call.enter()
        try:
            return await timed(call.call, n)
        finally:
            leave()
    start = time.process_time()
    for _ in range(n):
        response = await call()
        assert response.status_code == 200
    return (time.process_time() - start) / n


Layer = Callable[[httpx.Request], Awaitable[httpx.Response]]


class OneChunk(httpx.AsyncByteStream):
    """A body still to be read, as a real connection's is (not `httpx.ByteStream`)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"ok"

    async def aclose(self) -> None:
        pass


class Streamed(httpx.AsyncBaseTransport):
    """An inner transport whose answer's body is still to be read (fidelity watches it)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=OneChunk())


def reading(layer: Layer) -> Layer:
    """The layer's call, its answer's body then read to its end and closed."""

    async def call(request: httpx.Request) -> httpx.Response:
        response = await layer(request)
        stream: Any = response.stream
        async for _ in stream:
            pass
        await stream.aclose()
        return response

    return call


class InRequest:
    """A layer run inside one inbound request's context, bound once per batch (as
    FidelityMiddleware binds it once per request), so no harness call is timed."""

    def __init__(self, package: Any, transport: Any, read: bool = False) -> None:
        self.layer: Layer = transport.handle_async_request
        if read:
            self.layer = reading(self.layer)
        self.engine = transport.engine
        self.ctx = package.DecisionContext(
            engine=self.engine, route="/bench", method="GET", started_at=0.0
        )
        self.current = package.context._CURRENT

    def enter(self) -> Callable[[], None]:
        self.ctx.deadline_at = self.engine.clock.monotonic() + BATCH_DEADLINE_S
        self.ctx.decisions.clear()
        token = self.current.set(self.ctx)
        return lambda: self.current.reset(token)


def build_layers(
    old: Any = None, rev: str = "", streamed: bool = False
) -> dict[str, Layer | InRequest]:
    """Each layer's `handle_async_request` around a do-nothing inner transport (and with
    `streamed`, `*_stream` layers: the inner's answer a body to read, read to its end)."""
    import fidelity_mw

    layers: dict[str, Layer | InRequest] = {
        "pass_through": PassThrough(Null()).handle_async_request,
        "fidelity": FidelityTransport(Null(), telemetry=False).handle_async_request,
        "fidelity_req": InRequest(fidelity_mw, FidelityTransport(Null(), telemetry=False)),
        "httpx_retries": RetryTransport(
            Null(), retry=Retry(total=3, backoff_factor=0.1)
        ).handle_async_request,
        "floor": Floor(Null()).handle_async_request,
    }

    def toolkit_inner(name: str) -> Send:
        inner = Null()
        inner.response.request = httpx.Request("GET", URL)  # for raise_for_status()
        return inner.handle_async_request

    layers.update(competitors(toolkit_inner))
    if streamed:
        layers["pass_through_stream"] = reading(PassThrough(Streamed()).handle_async_request)
        layers["fidelity_req_stream"] = InRequest(
            fidelity_mw, FidelityTransport(Streamed(), telemetry=False), read=True
        )
        retrying = RetryTransport(Streamed(), retry=Retry(total=3, backoff_factor=0.1))
        layers["httpx_retries_stream"] = reading(retrying.handle_async_request)
    if old is not None:
        layers[f"fidelity@{rev}"] = old.FidelityTransport(
            Null(), telemetry=False
        ).handle_async_request
        layers[f"fidelity_req@{rev}"] = InRequest(
            old, old.FidelityTransport(Null(), telemetry=False)
        )
        if streamed:
            layers[f"fidelity_req_stream@{rev}"] = InRequest(
                old, old.FidelityTransport(Streamed(), telemetry=False), read=True
            )
    return layers


async def run_layer(layer: Layer | InRequest, requests: list[httpx.Request]) -> None:
    if isinstance(layer, InRequest):
        leave = layer.enter()
        try:
            await run_layer(layer.layer, requests)
        finally:
            leave()
        return
    for request in requests:
        await layer(request)


def _requests(n: int) -> list[httpx.Request]:
    timeout = httpx.Timeout(5.0).as_dict()
    return [httpx.Request("GET", URL, extensions={"timeout": dict(timeout)}) for _ in range(n)]


async def layer_costs(
    rounds: int, batch: int, old: Any = None, rev: str = ""
) -> dict[str, list[float]]:
    """Each layer's own cost per call: direct calls, inner transport does nothing."""
    layers = build_layers(old, rev)

    async def run(layer: Layer | InRequest) -> float:
        requests = _requests(batch)
        start = time.process_time()
        await run_layer(layer, requests)
        return (time.process_time() - start) / batch

    for layer in layers.values():  # warm-up
        await run(layer)

    samples: dict[str, list[float]] = {name: [] for name in layers}
    order = list(layers)
    rnd = random.Random(11)
    for _ in range(rounds):
        rnd.shuffle(order)
        for name in order:
            samples[name].append(await run(layers[name]))
    return samples


async def measure(
    rounds: int, batch: int, old: Any = None, rev: str = ""
) -> dict[str, list[float]]:
    calls, clients, done = build(old, rev)
    for call in calls.values():  # warm-up
        await timed(call, 500)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    rnd = random.Random(7)
    for _ in range(rounds):
        rnd.shuffle(order)
        for name in order:
            samples[name].append(await timed(calls[name], batch))
    for client in clients:
        await client.aclose()
    done()
    return samples


def table(samples: dict[str, list[float]], base_name: str) -> list[str]:
    base = samples[base_name]
    rows = [
        f"| variant | median µs/call | overhead vs {base_name} (median of paired diffs) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, values in samples.items():
        med = statistics.median(values) * 1e6
        if name == base_name:
            rows.append(f"| {name} | {med:.2f} | — | 1.000 |")
            continue
        diffs = [(v - b) * 1e6 for v, b in zip(values, base, strict=True)]
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        rows.append(
            f"| {name} | {med:.2f} | {statistics.median(diffs):+.2f} µs "
            f"(IQR {_q(diffs, 0.25):+.2f} … {_q(diffs, 0.75):+.2f}) | "
            f"{statistics.median(ratios):.3f} |"
        )
    return rows


def _delta(samples: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(
        [(v - b) * 1e6 for v, b in zip(samples[name], samples[base], strict=True)]
    )


def _ratio(samples: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median([v / b for v, b in zip(samples[name], samples[base], strict=True)])


def load() -> str:
    """The 1-minute load average, from `uptime` (the machine is shared)."""
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    return out.rsplit("load average:", 1)[-1].split(",")[0].strip() if out else "?"


def build_name() -> str:
    """Which fidelity_mw ran: compiled modules change every fidelity row but the baseline's
    (a copy of the sources at REV, always interpreted)."""
    from fidelity_mw import buildinfo

    modules = buildinfo.compiled_modules()
    if not modules:
        return "pure Python"
    return f"compiled with mypyc ({len(modules)} modules; a `--baseline` copy runs interpreted)"


def report(
    samples: dict[str, list[float]],
    layers: dict[str, list[float]],
    rounds: int,
    batch: int,
    profile_text: str,
    counts: str,
    loads: tuple[str, str],
    rev: str = "",
) -> str:
    layer = {n: _delta(layers, n, "pass_through") for n in layers if n != "pass_through"}
    client = _ratio(samples, "fidelity_req", "plain")
    per_retries = layer["fidelity_req"] / layer["httpx_retries"]
    verdicts = (
        f"the layer alone inside a request is {per_retries:.1f}x httpx-retries' layer "
        f"(+{layer['fidelity_req']:.2f} / +{layer['httpx_retries']:.2f} µs; goal ≤ 2x: "
        f"**{'met' if per_retries <= 2.0 else 'missed'}**), and through `AsyncClient` "
        f"{client:.3f}x plain (goal ≤ 1.05x: **{'met' if client <= 1.05 else 'missed'}**). "
        f"The same store operations and headers hand-written with nothing else (`floor`) "
        f"cost +{layer['floor']:.2f} µs ({layer['floor'] / layer['httpx_retries']:.1f}x "
        "httpx-retries' layer): the rest of fidelity's layer is its context, decisions, "
        "deadline, timeouts and error handling"
    )
    before = ""
    if rev:
        before = (
            f" The same rows as of `{rev}` (`--baseline {rev}`), in the same rounds: "
            f"layer +{layer[f'fidelity_req@{rev}']:.2f} µs inside a request, "
            f"+{layer[f'fidelity@{rev}']:.2f} µs outside one; through the client "
            f"{_ratio(samples, f'fidelity_req@{rev}', 'plain'):.3f}x plain. Paired with "
            f"it per round (now / then, median): through the client "
            f"{_ratio(samples, 'fidelity_req', f'fidelity_req@{rev}'):.3f} inside a request "
            f"({_delta(samples, 'fidelity_req', f'fidelity_req@{rev}'):+.2f} µs), "
            f"{_ratio(samples, 'fidelity', f'fidelity@{rev}'):.3f} outside one "
            f"({_delta(samples, 'fidelity', f'fidelity@{rev}'):+.2f} µs)."
        )
    toolkits = ""
    if all(name in samples for name in TOOLKITS):
        toolkits = (
            " Against the all-in-one toolkits, paired per round with `fidelity_req` "
            "(theirs / fidelity's, median): through the client "
            + ", ".join(
                f"{name} {_ratio(samples, name, 'fidelity_req'):.3f} "
                f"({_delta(samples, name, 'fidelity_req'):+.2f} µs)"
                for name in TOOLKITS
            )
            + "; the layers alone "
            + ", ".join(f"{name} +{layer[name]:.2f} µs" for name in TOOLKITS)
            + f" to fidelity's +{layer['fidelity_req']:.2f} µs (nopanic and pyresilience "
            "with retry, breaker, timeout and budget; pybreaker a breaker only)."
        )
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    return "\n".join(
        [
            stamp(),
            f"`uname -a`: `{uname}`",
            f"Build: {build_name()}.",
            f"Load average (1 min) before and after: {loads[0]} and {loads[1]} on the 2 cores "
            "(above 1: other work shared the machine; the ratios are paired per round).",
            "",
            f"`benchmarks/outbound.py`: {rounds} interleaved rounds x {batch} sequential "
            "`AsyncClient.get` calls per variant, each on `httpx.MockTransport` (200, 2-byte "
            "body), success path. Retry layers configured for 3 attempts. `fidelity` runs "
            "outside a request (it builds a DecisionContext per call); `fidelity_req` runs "
            "inside one request's context, bound once per batch as FidelityMiddleware binds "
            "it once per request (binding it per call, the ContextVar set and reset and a "
            "wrapper coroutine, is the middleware's cost, not the transport's). Memory state, "
            f"telemetry off, process CPU time. Issue 17 item 3: {verdicts}.{before}"
            f"{toolkits}",
            "",
            *table(samples, "plain"),
            "",
            "The layers alone (`handle_async_request` with a do-nothing inner transport, "
            f"{rounds} rounds x {batch} calls; `fidelity_req` with one request's context bound "
            "around each batch):",
            "",
            *table(layers, "pass_through"),
            "",
            "Counted, not timed (`--count`: `sys.setprofile` events and allocated blocks per "
            "call of each layer alone, as in benchmarks/callcount.py; the same on any machine "
            "with this Python):",
            "",
            counts,
            "",
            "Where fidelity's time goes (cProfile of the layer alone, own time per call, "
            "profiler overhead included, so only the proportions matter):",
            "",
            "```",
            profile_text.strip(),
            "```",
        ]
    )


def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


async def profile(n: int) -> str:
    """Own time per call of each function the fidelity layer runs (direct calls)."""
    transport = FidelityTransport(Null(), telemetry=False)
    timeout = httpx.Timeout(5.0).as_dict()
    requests = [httpx.Request("GET", URL, extensions={"timeout": dict(timeout)}) for _ in range(n)]
    for request in requests[:500]:
        await transport.handle_async_request(request)
    profiler = cProfile.Profile()
    profiler.enable()
    for request in requests[500:]:
        await transport.handle_async_request(request)
    profiler.disable()
    stats = pstats.Stats(profiler)
    calls = n - 500
    rows = []
    for (filename, _line, func), (_cc, ncalls, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = Path(filename).name if filename != "~" else "builtin"
        rows.append((tottime / calls * 1e6, ncalls / calls, f"{where}:{func}"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    out = io.StringIO()
    out.write(
        f"{'µs/call':>8} {'calls':>6}  function   (total {total:.2f} µs/call under the profiler)\n"
    )
    for per_call, ncalls, name in rows[:14]:
        out.write(f"{per_call:8.2f} {ncalls:6.1f}  {name}\n")
    return out.getvalue()


# (layer, the layer it is counted against) in --count's per-function lists
STREAMED_PAIRS = (
    ("fidelity", "pass_through"),
    ("fidelity_req", "pass_through"),
    ("fidelity_req_stream", "pass_through_stream"),
)


async def count(n: int, old: Any = None, rev: str = "", top: int = 30) -> str:
    """Python calls, C calls, resumptions, bytecodes and allocated blocks per call of
    each layer."""
    from benchmarks.callcount import Instructions, Profile

    results: dict[str, Profile] = {}
    bytecodes: dict[str, Instructions] = {}
    for name, layer in build_layers(old, rev, streamed=True).items():
        await run_layer(layer, _requests(500))  # warm up
        requests = _requests(n)
        profile = Profile()
        sys.setprofile(profile)
        try:
            await run_layer(layer, requests)
        finally:
            sys.setprofile(None)
        results[name] = profile
        requests = _requests(n)
        counter = Instructions()
        sys.settrace(counter)
        try:
            await run_layer(layer, requests)
        finally:
            sys.settrace(None)
        bytecodes[name] = counter
    lines = [
        "| layer | Python calls | resumes | C calls | bytecodes | blocks allocated (≥) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, p in results.items():
        lines.append(
            f"| {name} | {p.calls / n:.1f} | {p.resumes / n:.1f} | {p.c_calls / n:.1f} "
            f"| {bytecodes[name].count / n:.0f} | {p.blocks / n:.1f} |"
        )
    for name, against in STREAMED_PAIRS:
        base = results[against].by_function
        mine = results[name].by_function
        extra = {k: (v - base.get(k, 0)) / n for k, v in mine.items()}
        rows = sorted(((v, k) for k, v in extra.items() if v >= 0.5), reverse=True)[:top]
        lines += ["", f"`{name}`: calls per call beyond `{against}`'s:", "", "```"]
        lines += [f"{v:6.1f}  {k}" for v, k in rows]
        lines.append("```")
        ops = bytecodes[name].by_function(n)
        base_ops = bytecodes[against].by_function(n)
        diff = {k: v - base_ops.get(k, 0.0) for k, v in ops.items()}
        rows = sorted(((v, k) for k, v in diff.items() if abs(v) >= 0.5), reverse=True)[:top]
        total = bytecodes[name].count / n - bytecodes[against].count / n
        lines += ["", f"`{name}`: bytecodes per call beyond `{against}`'s ({total:+.0f}):"]
        lines += ["", "```"]
        lines += [f"{v:6.0f}  {k}" for v, k in rows]
        lines.append("```")
    return "\n".join(lines)


# The client variants `--count --client` counts, each read against `plain`.
CLIENT_VARIANTS = ("plain", "fidelity_req", "httpx_retries", "plain_headers")


async def count_client(n: int, old: Any = None, rev: str = "", top: int = 30) -> str:
    """Python calls, C calls and bytecodes per `AsyncClient.get` of each client variant
    (`CLIENT_VARIANTS`, and `fidelity_req@REV` with a baseline), and by function beyond
    `plain`'s: what a layer adds through the client, httpx's own work around it included."""
    from benchmarks.callcount import Instructions, Profile

    calls, clients, done = build(old, rev)
    names = [*CLIENT_VARIANTS, *([f"fidelity_req@{rev}"] if old is not None else [])]
    profiles: dict[str, Profile] = {}
    bytecodes: dict[str, Instructions] = {}

    async def run(call: Call | InContext, hook: Any, setter: Any) -> None:
        leave = call.enter() if isinstance(call, InContext) else None
        fn = call.call if isinstance(call, InContext) else call
        try:
            setter(hook)
            try:
                for _ in range(n):
                    await fn()
            finally:
                setter(None)
        finally:
            if leave is not None:
                leave()

    try:
        for name in names:
            await timed(calls[name], 500)  # warm up
            profiles[name] = Profile()
            await run(calls[name], profiles[name], sys.setprofile)
            bytecodes[name] = Instructions()
            await run(calls[name], bytecodes[name], sys.settrace)
    finally:
        for client in clients:
            await client.aclose()
        done()
    base = bytecodes["plain"].count / n
    lines = [
        "| variant | Python calls | C calls | bytecodes | over plain | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        p, ops = profiles[name], bytecodes[name].count / n
        lines.append(
            f"| {name} | {p.calls / n:.1f} | {p.c_calls / n:.1f} | {ops:.0f} "
            f"| {ops - base:+.0f} | {ops / base:.3f} |"
        )
    base_ops = bytecodes["plain"].by_function(n)
    for name in names[1:]:
        diff = {k: v - base_ops.get(k, 0.0) for k, v in bytecodes[name].by_function(n).items()}
        diff.update({k: -v for k, v in base_ops.items() if k not in diff})
        rows = sorted(((v, k) for k, v in diff.items() if abs(v) >= 0.5), reverse=True)[:top]
        lines += ["", f"`{name}`: bytecodes per call beyond `plain`'s, by function:", "", "```"]
        lines += [f"{v:6.0f}  {k}" for v, k in rows]
        lines.append("```")
    return "\n".join(lines)


# What each piece of the layer costs: the same call with one piece taken away (or added),
# counted as `--count` counts. (name, what it shows, the variant it is read against)
PIECES = (
    ("fidelity_req", "the shortcut as benchmarked (breaker, budget, headers, deadline)", ""),
    ("no_breaker", "breaker = none: its gate and record", "fidelity_req"),
    ("no_headers", 'protocol_headers = "never": the two headers on and off', "fidelity_req"),
    ("bare_shortcut", "neither: the budget, deadline, decision and glue left", "pass_through"),
    ("telemetry_on", "telemetry=True, no OpenTelemetry SDK (tracing off)", "fidelity_req"),
    (
        "first_path",
        "a resolver (naming nothing): asked every call, then the shortcut",
        "fidelity_req",
    ),
    (
        "loop_1_instance",
        "a service of 1 instance: the attempt loop and the balancer",
        "fidelity_req",
    ),
    ("loop_2_instances", "2 instances: the balancer's pick of two", "loop_1_instance"),
    (
        "loop_1_instance_telemetry",
        "the service of 1 instance, telemetry=True (no OpenTelemetry SDK)",
        "loop_1_instance",
    ),
    (
        "resolved_1_instance",
        "the service of 1 instance named by a resolver (asked every call)",
        "loop_1_instance",
    ),
    ("fidelity_req_stream", "a body to read: the body watcher (+ reading it)", "fidelity_req"),
    ("pass_through_stream", "(a pass-through reading the same body)", "pass_through"),
)


def build_pieces() -> dict[str, Layer | InRequest]:
    import fidelity_mw
    from fidelity_mw import Policy
    from fidelity_mw.policy import UpstreamConfig

    def transport(inner: Any = None, telemetry: bool = False, **upstream: Any) -> Any:
        # a service's instances are named by its host (a glob there is a policy error)
        host = httpx.URL(URL).host if "instances" in upstream else "*"
        policy = Policy(upstreams=(UpstreamConfig(host=host, **upstream),)) if upstream else None
        return FidelityTransport(inner or Null(), telemetry=telemetry, policy=policy)

    def in_request(transport: Any, read: bool = False) -> InRequest:
        return InRequest(fidelity_mw, transport, read=read)

    one = ("http://10.0.0.1:8080",)
    return {
        "pass_through": PassThrough(Null()).handle_async_request,
        "fidelity_req": in_request(transport()),
        "no_breaker": in_request(transport(breaker=None)),
        "no_headers": in_request(transport(protocol_headers="never")),
        "bare_shortcut": in_request(transport(breaker=None, protocol_headers="never")),
        "telemetry_on": in_request(transport(telemetry=True)),
        "first_path": in_request(
            FidelityTransport(Null(), telemetry=False, resolver=lambda host: None)
        ),
        "loop_1_instance": in_request(transport(instances=one)),
        "loop_2_instances": in_request(transport(instances=(*one, "http://10.0.0.2:8080"))),
        "loop_1_instance_telemetry": in_request(transport(telemetry=True, instances=one)),
        "resolved_1_instance": in_request(
            FidelityTransport(Null(), telemetry=False, resolver=lambda host: one)
        ),
        "fidelity_req_stream": in_request(transport(Streamed()), read=True),
        "pass_through_stream": reading(PassThrough(Streamed()).handle_async_request),
    }


async def pieces(n: int) -> str:
    """Python calls, C calls, bytecodes and allocated blocks per call of each variant of
    `PIECES`, and what it adds to (or takes from) the variant it is read against."""
    from benchmarks.callcount import Instructions, Profile

    found: dict[str, tuple[float, float, float, float]] = {}
    for name, layer in build_pieces().items():
        await run_layer(layer, _requests(500))  # warm up
        profile = Profile()
        requests = _requests(n)
        sys.setprofile(profile)
        try:
            await run_layer(layer, requests)
        finally:
            sys.setprofile(None)
        counter = Instructions()
        requests = _requests(n)
        sys.settrace(counter)
        try:
            await run_layer(layer, requests)
        finally:
            sys.settrace(None)
        found[name] = (
            profile.calls / n,
            profile.c_calls / n,
            counter.count / n,
            profile.blocks / n,
        )
    lines = [
        "| variant | what | Python calls | C calls | bytecodes | blocks | against | Δ bytecodes |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, what, against in PIECES:
        calls, c_calls, ops, blocks = found[name]
        delta = f"{ops - found[against][2]:+.0f}" if against else "—"
        lines.append(
            f"| {name} | {what} | {calls:.1f} | {c_calls:.1f} | {ops:.0f} | {blocks:.1f} "
            f"| {against or '—'} | {delta} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- instructions

INSTRUCTION_LAYERS = ("pass_through", "fidelity", "fidelity_req", "httpx_retries", "floor")
COMPILED_SUFFIX = "+compiled"
# (FIDELITY_MW_COMPILED_PYTHON: another venv's mypyc build, as benchmarks/server.py takes it)
COMPILED_PYTHON = Path(
    os.environ.get("FIDELITY_MW_COMPILED_PYTHON")
    or Path(__file__).resolve().parents[1] / ".venv-compiled" / "bin" / "python"
)


def run_one(name: str, calls: int, rev: str) -> None:
    """One callgrind run: every layer built and warmed up as in `count`, `calls` requests
    built, and `name`'s layer called on them (none when `calls` is 0: the requests are
    built all the same, so the difference of two runs is the calls alone)."""
    old = baseline(rev or None)
    layers = build_layers(old, rev, streamed=True)
    # (a piece of `--pieces` by its name too: a service's loop, the layer without its
    # breaker or headers, counted in instructions as the layers are)
    layer = layers[name] if name in layers else build_pieces()[name]

    async def go() -> None:
        await run_layer(layer, _requests(500))
        requests = _requests(abs(calls))
        if calls > 0:
            await run_layer(layer, requests)

    asyncio.run(go())


def callgrind_runs(name: str, calls: int, rev: str) -> tuple[str, str]:
    """The callgrind outputs of two runs of one layer: with `calls` calls, and one that
    builds the same requests and calls nothing (user space)."""
    import os
    import tempfile

    plain = name.removesuffix(COMPILED_SUFFIX)
    python = sys.executable if plain == name else str(COMPILED_PYTHON)
    texts = []
    for n in (-calls, calls):  # (negative: the requests built, no call made)
        with tempfile.TemporaryDirectory(prefix="outbound-cg-") as tmp:
            out = Path(tmp) / "callgrind.out"
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python]
            argv += [str(Path(__file__).resolve()), "--one", plain, "--calls", str(n)]
            if rev:
                argv += ["--baseline", rev]
            subprocess.run(
                argv,
                env={**os.environ, "PYTHONHASHSEED": "0"},
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            texts.append(out.read_text())
    return texts[0], texts[1]


def count_instructions(name: str, calls: int, rev: str) -> float:
    """Machine instructions per call of one layer (user space, callgrind): a run with
    `calls` calls less one without, divided by `calls`."""
    from benchmarks.server_inprocess import callgrind_total

    without, with_calls = callgrind_runs(name, calls, rev)
    return (callgrind_total(with_calls) - callgrind_total(without)) / calls


def callgrind_self(text: str) -> dict[str, int]:
    """Each function's own instructions (not its callees') in a callgrind output file.

    The format: `fn=` opens a function's costs (names compressed to `(id)` after their
    first use, by `fn=` and `cfn=` alike), a cost line is `position cost`, and the cost
    line after a `calls=` line is that call's inclusive cost, which is the callee's."""
    names: dict[str, str] = {}

    def name_of(spec: str) -> str:
        spec = spec.strip()
        if spec.startswith("("):
            ident, _, rest = spec.partition(")")
            rest = rest.strip()
            if rest:
                names[ident] = rest
            return names.get(ident, spec)
        return spec

    own: dict[str, int] = {}
    fn = ""
    inclusive = False
    for line in text.splitlines():
        if not line:
            continue
        head = line[0]
        if head.isdigit() or head in "+-*":
            if inclusive:
                inclusive = False
                continue
            parts = line.split()
            if fn and len(parts) >= 2:
                own[fn] = own.get(fn, 0) + int(parts[1])
        elif line.startswith("fn="):
            fn = name_of(line[3:])
        elif line.startswith("cfn="):
            name_of(line[4:])
        elif line.startswith("calls="):
            inclusive = True
    return own


def functions(names: list[str], calls: int, rev: str, top: int = 25) -> str:
    """Each layer's machine instructions per call by function (its own, callgrind), beyond
    the same run without the calls: where the instructions of one call go."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(
            zip(names, pool.map(lambda v: callgrind_runs(v, calls, rev), names), strict=True)
        )
    lines = []
    for name, (without, with_calls) in runs.items():
        before, after = callgrind_self(without), callgrind_self(with_calls)
        per_call = {fn: (after.get(fn, 0) - before.get(fn, 0)) / calls for fn in {*before, *after}}
        total = sum(per_call.values())
        rows = sorted(per_call.items(), key=lambda kv: -abs(kv[1]))[:top]
        lines += ["", f"`{name}`: {total:,.0f} instructions per call, by function (own):", ""]
        lines += ["```"] + [f"{v:8,.0f}  {fn}" for fn, v in rows] + ["```"]
    return "\n".join(lines)


def instructions(names: list[str], calls: int, rev: str) -> str:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        counted = pool.map(lambda v: count_instructions(v, calls, rev), names)
        found = dict(zip(names, counted, strict=True))
    lines = [
        "| layer | instructions/call | over pass_through | over httpx-retries' layer |",
        "|---|---:|---:|---:|",
    ]
    for name, value in found.items():
        # (a compiled layer against the compiled venv's own pass-through, when counted; a
        # streamed one against the streamed pass-through and httpx-retries)
        kind = "_stream" if "_stream" in name else ""
        suffix = kind + (COMPILED_SUFFIX if name.endswith(COMPILED_SUFFIX) else "")
        base = found.get("pass_through" + suffix, found.get("pass_through" + kind, 0.0))
        retries = found.get("httpx_retries" + suffix, found.get("httpx_retries" + kind, 0.0))
        retries -= base
        over = value - base
        mine = name.startswith(("fidelity", "floor"))
        ratio = f"{over / retries:.2f}x" if retries > 0 and mine else "—"
        lines.append(f"| {name} | {value:,.0f} | {over:+,.0f} | {ratio} |")
    lines += [
        "",
        f"callgrind, user space: each layer called directly {calls} times (inner transport "
        f"a prebuilt response) less a run that builds the same requests and calls nothing, "
        f"after a 500-call warm-up (PYTHONHASHSEED=0).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--profile", action="store_true", help="cProfile the fidelity variant")
    parser.add_argument("--count", action="store_true", help="count calls per call, no times")
    parser.add_argument("--layers-only", action="store_true", help="time the layers alone")
    parser.add_argument(
        "--baseline", metavar="REV", help="add the transport as of git revision REV"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="callgrind instructions per call of the layers alone (print only)",
    )
    parser.add_argument("--calls", type=int, default=20_000, help="with --instructions")
    parser.add_argument(
        "--layers",
        default=",".join(INSTRUCTION_LAYERS),
        help="with --instructions: layers to count (NAME+compiled runs .venv-compiled)",
    )
    parser.add_argument(
        "--functions",
        action="store_true",
        help="with --instructions: also each layer's instructions per call by function",
    )
    parser.add_argument(
        "--pieces", action="store_true", help="count each piece of the layer (ablations)"
    )
    parser.add_argument(
        "--client",
        action="store_true",
        help="with --count: count the calls through AsyncClient instead of the layers",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a callgrind run of one layer
    args = parser.parse_args()
    rev = args.baseline or ""
    if args.one:
        run_one(args.one, args.calls, rev)
        return
    if args.instructions:
        names = [n.strip() for n in args.layers.split(",") if n.strip()]
        if rev:
            names += [f"fidelity@{rev}", f"fidelity_req@{rev}"]
        if args.functions:
            print(functions(names, args.calls, rev))
        else:
            print(instructions(names, args.calls, rev))
        return
    old = baseline(args.baseline)
    if args.profile:
        print(asyncio.run(profile(20_000)))
        return
    if args.count and args.client:
        print(asyncio.run(count_client(2000, old, rev)))
        return
    if args.count:
        print(asyncio.run(count(2000, old, rev)))
        return
    if args.pieces:
        print(asyncio.run(pieces(2000)))
        return
    if args.layers_only:
        layers = asyncio.run(layer_costs(args.rounds, args.batch, old, rev))
        print("\n".join(table(layers, "pass_through")))
        retries = _delta(layers, "httpx_retries", "pass_through")
        for name in ("fidelity", "fidelity_req") if rev else ():
            then = f"{name}@{rev}"
            now_x = _delta(layers, name, "pass_through") / retries
            then_x = _delta(layers, then, "pass_through") / retries
            print(
                f"{name} now / then, paired per round (median): "
                f"{_ratio(layers, name, then):.3f} ({_delta(layers, name, then):+.2f} µs); "
                f"the layer vs httpx-retries' now {now_x:.2f}x, then {then_x:.2f}x"
            )
        return
    before = load()
    samples = asyncio.run(measure(args.rounds, args.batch, old, rev))
    layers = asyncio.run(layer_costs(args.rounds, args.batch, old, rev))
    after = load()
    profile_text = asyncio.run(profile(20_000))
    counts = asyncio.run(count(2000, old, rev, top=12))
    text = report(
        samples, layers, args.rounds, args.batch, profile_text, counts, (before, after), rev
    )
    print(text)
    if not args.no_write:
        write_section("Outbound overhead", text)
        print("\nwrote the 'Outbound overhead' section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
