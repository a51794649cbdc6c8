"""What the demo records: per front request, per client request, per upstream call.

Both variants record the same things through the same outer ASGI wrapper
(`Recorder`), which is not a control layer: it only notes what came in, what
went out, and the decisions the layers logged for that request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .._types import ASGIApp, Message, Receive, Scope, Send
from ..clock import SYSTEM_CLOCK

CLIENT_HEADER = b"x-client-id"


def client_of(scope: Scope) -> str:
    """The demo client a request comes from (its `x-client-id`), "?" without one."""
    for name, value in scope["headers"]:
        if name == CLIENT_HEADER:
            return str(value.decode("latin-1"))
    return "?"


ATTEMPT_HEADER = b"x-client-attempt"  # informational: which try of the client this is

# failed_by values: None (served), "upstream" (the upstream's own error was the answer),
# or the control layer that produced the response.
UPSTREAM = "upstream"
CONTROL_LAYERS = frozenset({"ratelimit", "breaker", "deadline", "budget"})


@dataclass(frozen=True, slots=True)
class DemoDecision:
    """One decision by one layer, as both variants log it (times relative to the run)."""

    at: float
    layer: str
    subject: str
    verdict: str
    reason: str
    source: str = "memory"
    age_s: float = 0.0

    @property
    def stale(self) -> bool:
        """Same rule as `fidelity_mw.Decision.is_stale`: cache/fallback data, or older than 1 s."""
        return self.source in ("cache", "fallback") or self.age_s > 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "at_s": round(self.at, 4),
            "layer": self.layer,
            "subject": self.subject,
            "verdict": self.verdict,
            "reason": self.reason,
            "source": self.source,
            "age_s": round(self.age_s, 4),
        }


@dataclass(slots=True)
class FrontRecord:
    """One HTTP request received by the front service."""

    seq: int
    client: str
    start: float
    healthy_path: bool
    end: float = 0.0
    status: int = 0
    failed_by: str | None = None
    upstream_calls: int = 0
    client_attempt: int = 1
    decisions: list[DemoDecision] = field(default_factory=list)

    @property
    def admitted(self) -> bool:
        """Passed every control layer (whatever the upstream then answered)."""
        return self.status != 0 and self.failed_by not in CONTROL_LAYERS

    def log(self, decision: DemoDecision) -> None:
        self.decisions.append(decision)


@dataclass(slots=True)
class ClientRequest:
    """One request a client wanted to make (its retries included)."""

    client: str
    seq: int
    issued_at: float  # scheduled time, relative to the run
    healthy_path: bool
    started: float = 0.0
    finished: float = 0.0
    success: bool = False
    attempts: int = 0
    statuses: list[int] = field(default_factory=list)  # 0 = timeout / transport error

    @property
    def latency_s(self) -> float:
        return max(0.0, self.finished - self.started)


CURRENT_RECORD: ContextVar[FrontRecord | None] = ContextVar("demo_front_record", default=None)


class RunClock:
    """Seconds since the start of a variant's load phase (monotonic)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.started = False

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.started = True

    def start_once(self) -> None:
        """Start the load phase, unless a variant sharing this clock started it already."""
        if not self.started:
            self.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def rel(self, monotonic: float) -> float:
        return monotonic - self.t0

    def wall(self) -> float:
        """Wall time, for libraries that keep their windows on it (`limits`)."""
        return SYSTEM_CLOCK.wall()


class Recorder:
    """Outermost ASGI wrapper of a front: one `FrontRecord` per HTTP request."""

    def __init__(
        self, app: ASGIApp, clock: RunClock, script_healthy: Callable[[float], bool]
    ) -> None:
        self.app = app
        self.clock = clock
        self.healthy = script_healthy
        self.records: list[FrontRecord] = []
        self._seq = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = "?"
        attempt = 1
        for name, value in scope["headers"]:
            if name == CLIENT_HEADER:
                client = value.decode("latin-1")
            elif name == ATTEMPT_HEADER and value.isdigit():
                attempt = int(value)
        self._seq += 1
        now = self.clock.now()
        record = FrontRecord(self._seq, client, now, bool(self.healthy(now)))
        record.client_attempt = attempt
        token = CURRENT_RECORD.set(record)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            record.end = self.clock.now()
            if record.status == 0:
                record.failed_by = record.failed_by or UPSTREAM
            self.records.append(record)
            CURRENT_RECORD.reset(token)


def log_decision(
    clock: RunClock,
    layer: str,
    subject: str,
    verdict: str,
    reason: str,
    *,
    source: str = "memory",
    age_s: float = 0.0,
) -> None:
    """Append a decision to the front request being handled (no-op outside one)."""
    record = CURRENT_RECORD.get()
    if record is not None:
        record.log(DemoDecision(clock.now(), layer, subject, verdict, reason, source, age_s))


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Any = ()) -> None:
    """A small JSON response without a framework (used by pure-ASGI layers)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
