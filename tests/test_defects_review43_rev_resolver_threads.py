"""`FidelitySyncTransport` with a `resolver`, called from several threads while the
resolver's answer changes. `_resolved` noted the answer (`last_answer`) first, then
checked it, then renamed the service's instances: a thread with an older answer that
renamed them last left the instances of that older answer under the newer answer's
note. Every later call, whose resolver answered the newer list, took it for the answer
already taken and never renamed them: the calls went to an instance the resolver no
longer named, for as long as its answer stayed the same.

Here one thread's older answer is held (in its check) while another thread's newer answer
is taken whole; the older one then finishes. Before: every later call went to the
instance of the older answer (10.0.0.2); now the answer the resolver keeps giving names
the instances (10.0.0.3)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx

from fidelity_mw import FidelitySyncTransport
from fidelity_mw.engine import Engine
from fidelity_mw.policy import Policy, RetryConfig, UpstreamConfig
from fidelity_mw.testing import FakeClock, seeded_random


class HeldAnswer(list[str]):
    """A resolver's list whose second reading (the answer's check) waits for `go`."""

    def __init__(self, urls: list[str], reached: threading.Event, go: threading.Event) -> None:
        super().__init__(urls)
        self.reads = 0
        self.reached = reached
        self.go = go

    def __iter__(self) -> Iterator[str]:
        self.reads += 1
        if self.reads == 2:
            self.reached.set()
            assert self.go.wait(30), "the test never let the held answer go on"
        return super().__iter__()


def test_an_older_answer_taken_last_does_not_outlive_the_newer_one() -> None:
    policy = Policy(upstreams=(UpstreamConfig(host="svc", retry=RetryConfig(attempts=1)),))
    engine = Engine(policy, clock=FakeClock(), rng=seeded_random(1))
    reached, go = threading.Event(), threading.Event()
    answers: dict[str, list[str]] = {"main": ["http://10.0.0.1:80"]}

    def resolver(host: str) -> list[str] | None:
        return answers.get(threading.current_thread().name, answers["main"])

    called: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        called.append(str(request.url.host))
        return httpx.Response(200)

    transport = FidelitySyncTransport(
        httpx.MockTransport(upstream), engine=engine, telemetry=False, resolver=resolver
    )
    with httpx.Client(transport=transport) as client:
        assert client.get("http://svc/x").status_code == 200  # the service named: 10.0.0.1
        answers["older"] = HeldAnswer(["http://10.0.0.2:80"], reached, go)
        answers["newer"] = ["http://10.0.0.3:80"]
        failures: list[BaseException] = []

        def call() -> None:
            try:
                client.get("http://svc/x")
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        older = threading.Thread(target=call, name="older")
        older.start()
        assert reached.wait(30)  # the older answer noted, held in its check
        newer = threading.Thread(target=call, name="newer")
        newer.start()
        newer.join(30)  # (not held: with the older answer held, it is taken whole)
        go.set()
        older.join(30)
        assert not failures
        answers["main"] = answers["newer"]  # what the resolver answers from now on
        called.clear()
        for _ in range(5):
            assert client.get("http://svc/x").status_code == 200
    assert called == ["10.0.0.3"] * 5
