"""What watching a streamed body costs per call, on a real loopback connection.

The final answer of a call counted as a success gets its body stream wrapped
(`fidelity_mw.outbound.body`), so that a break mid-body fails the call after all. On
the success path that is two small objects per call and one step of its iterator per chunk.
This measures it where it happens: `httpx.AsyncClient(transport=FidelityTransport())`
calling a real uvicorn upstream on loopback (its own process), each body read whole,
against the same client built from the source of `--baseline` (a git revision, default
`main`), in two client processes of their own. Rounds alternate the two in a shuffled
order; each reports the client's CPU time (`time.process_time`: being descheduled by
the other tenants of the machine does not count) per call; we print each side's median
and the median of the per-round paired differences.

The loopback difference is small against a call's whole cost (~0.7 ms of client CPU
here) and noisy; `--micro` times the wrapper alone instead, in process: a body of the
same chunks iterated through the wrapper (its two objects made per call) against the
same body iterated bare, interleaved rounds, medians.

    nice -n -15 .venv/bin/python benchmarks/body_watch.py [--rounds 30] [--calls 300]
        [--size 4096] [--chunks 4] [--baseline main] [--micro]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UPSTREAM = """
import sys, uvicorn
size, chunks = int(sys.argv[2]), int(sys.argv[3])
part = b"x" * (size // chunks)
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(part) * chunks).encode())]})
    for i in range(chunks):
        await send({"type": "http.response.body", "body": part, "more_body": i < chunks - 1})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error",
            access_log=False, lifespan="off")
"""

CLIENT = """
import asyncio, sys, time, httpx
from fidelity_mw import FidelityTransport
url = sys.argv[1]
async def main():
    transport = FidelityTransport(telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(200):  # warm: connection, caches, the shortcut armed
            (await client.get(url)).read()
        print("ready", flush=True)
        for line in sys.stdin:
            n = int(line)
            start = time.process_time()
            for _ in range(n):
                response = await client.get(url)
                assert response.status_code == 200
            print(time.process_time() - start, flush=True)
asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _source_of(rev: str, into: Path) -> Path:
    """The `src` folder of git revision `rev`, unpacked under `into`."""
    archive = into / "src.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _client(src: Path, url: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _round(proc: subprocess.Popen[str], calls: int) -> float:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(f"{calls}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline()) / calls


async def _micro(chunks: int, size: int, rounds: int, n: int) -> tuple[float, float]:
    """Per call: the wrapper's cost over a bare body of `chunks` chunks (median of the
    per-round paired differences, and of the bare time), in seconds."""
    import httpx

    from fidelity_mw.context import DecisionContext
    from fidelity_mw.decide.breaker import Gate
    from fidelity_mw.engine import Engine
    from fidelity_mw.outbound.body import Watch, WatchedAsyncStream
    from fidelity_mw.policy import BreakerConfig

    part = b"x" * (size // chunks)

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for _ in range(chunks):
                yield part

    engine = Engine()
    ctx = DecisionContext(engine, "outbound", "GET", 0.0)
    breaker, gate = BreakerConfig(), Gate("allow", "closed", 0, 0.0)

    async def bare() -> float:
        start = time.process_time()
        for _ in range(n):
            async for _chunk in Body():
                pass
        return time.process_time() - start

    async def watched() -> float:
        start = time.process_time()
        for _ in range(n):
            watch = Watch(ctx, "h", None, None, "upstream:h", breaker, gate, "memory", None)
            async for _chunk in WatchedAsyncStream(Body(), watch):
                pass
        return time.process_time() - start

    diffs, bares = [], []
    for _ in range(rounds):
        if random.random() < 0.5:
            b, w = await bare(), await watched()
        else:
            w, b = await watched(), await bare()
        diffs.append((w - b) / n)
        bares.append(b / n)
    return statistics.median(diffs), statistics.median(bares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096, help="body bytes")
    parser.add_argument("--chunks", type=int, default=4, help="body messages the app sends")
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--micro", action="store_true", help="time the wrapper alone")
    args = parser.parse_args()
    if args.micro:
        import asyncio

        sys.path.insert(0, str(ROOT / "src"))
        extra, bare = asyncio.run(_micro(args.chunks, args.size, args.rounds, 20_000))
        print(
            f"the wrapper alone, body of {args.chunks} chunk(s): {extra * 1e6:+.2f} us per call "
            f"over the bare body's {bare * 1e6:.2f} us (medians of {args.rounds} rounds)"
        )
        return
    port = _free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM, str(port), str(args.size), str(args.chunks)]
    )
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for _ in range(100):  # until it listens
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            clients = {
                args.baseline: _client(_source_of(args.baseline, Path(tmp)), url),
                "this tree": _client(ROOT / "src", url),
            }
            per: dict[str, list[float]] = {name: [] for name in clients}
            diffs: list[float] = []
            order = list(clients)
            for _ in range(args.rounds):
                random.shuffle(order)
                got = {name: _round(clients[name], args.calls) for name in order}
                for name, value in got.items():
                    per[name].append(value)
                diffs.append(got["this tree"] - got[args.baseline])
            for proc in clients.values():
                proc.kill()
        finally:
            upstream.kill()
    print(
        f"{args.rounds} rounds x {args.calls} calls, body {args.size} B in {args.chunks} "
        "message(s), client CPU time per call (medians):"
    )
    for name, values in per.items():
        print(f"  {name:>12}: {statistics.median(values) * 1e6:8.1f} us")
    diff = statistics.median(diffs) * 1e6
    q = statistics.quantiles(diffs, n=4)
    print(
        f"  paired difference (this tree - {args.baseline}): {diff:+.1f} us per call "
        f"(quartiles {q[0] * 1e6:+.1f} .. {q[2] * 1e6:+.1f})"
    )


if __name__ == "__main__":
    main()
