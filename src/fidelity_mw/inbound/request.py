"""Request setup: read what the layers need from a request, once.

One scan of the header list keeps only the headers some layer wants (deadline
headers, the trusted forwarding header, `header:NAME` limit keys, the attempt
signal); the rest of the request is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from inspect import isawaitable
from typing import Any, Final

from .._logs import exception as log_exception
from .._logs import warn
from .._types import Scope
from ..context import (
    ALLOW,
    LAYER_DEADLINE,
    REJECT,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
)
from ..engine import Engine, compact_key
from ..headers import client_address, deadline_parser, in_networks, parse_attempt
from ..routeplan import RoutePlan, ip_keys_of
from .responses import OUTCOME_EXPIRED, Rejection, problem_body

logger: Final = logging.getLogger("fidelity_mw")

ATTEMPT_HEADER: Final = b"x-fidelity-attempt"
_MAX_PEERS: Final = 4096
_MAX_PARSED: Final = 1024  # deadline header values kept parsed, per header
_MAX_KEPT_CHARS: Final = 64
# The client key of a request without a client address (a server on a unix socket)
NO_PEER: Final = "unknown"


def header_key(name: str) -> bytes:
    """A `header:NAME` limit key's header, as ASGI servers spell names (lowercase bytes)."""
    return name.lower().encode("latin-1", "replace")


def scan_headers(
    headers: Iterable[tuple[bytes, bytes]], wanted: frozenset[bytes]
) -> dict[bytes, bytes] | None:
    """The wanted headers, repeated lines joined with "," (None when there are none).

    Repeats are joined once at the end: appending line by line copies the value
    so far every time (quadratic in the number of lines)."""
    found: dict[bytes, bytes] | None = None
    repeated: dict[bytes, list[bytes]] | None = None
    for name, value in headers:
        if name in wanted:
            if found is None:
                found = {}
            prior = found.get(name)
            if prior is None:
                found[name] = value
            else:
                if repeated is None:
                    repeated = {}
                parts = repeated.get(name)
                if parts is None:
                    repeated[name] = [prior, value]
                else:
                    parts.append(value)
    if repeated is not None and found is not None:
        for name, parts in repeated.items():
            found[name] = b",".join(parts)
    return found


def first_header(scope: Scope, name: bytes) -> bytes | None:
    """The first line of header `name` (lowercase bytes) in the request, as Starlette's
    `request.headers[name]` reads it; None without one."""
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value)
    return None


class RequestReader:
    """Everything about reading requests that one middleware decides once."""

    def __init__(self, engine: Engine) -> None:
        pol = engine.policy
        self.engine = engine
        # (name, raw name, parser, value -> seconds already parsed), chosen once
        self.deadline_headers: tuple[
            tuple[str, bytes, Callable[[bytes], float | None], dict[bytes, float | None]], ...
        ] = tuple(
            (n, n.encode("latin-1", "replace"), deadline_parser(n), {}) for n in pol.deadline.header
        )
        self.forwarded_header = pol.forwarded_header
        self.forwarded_raw = pol.forwarded_header.encode("latin-1")
        # True: the client address may come from a header, not only the peer
        self.uses_forwarding = bool(pol.trusted_proxies)
        wanted: set[bytes] = {raw for _name, raw, _parse, _parsed in self.deadline_headers}
        if pol.trusted_proxies:
            wanted.add(self.forwarded_raw)  # only this one: see headers.client_address
        for lim in pol.rate_limits:
            if isinstance(lim.key, str) and lim.key.startswith("header:"):
                wanted.add(header_key(lim.key[7:]))
        wanted.add(ATTEMPT_HEADER)
        if pol.priority_header:  # the bulkhead's priority class, from trusted peers
            wanted.add(header_key(pol.priority_header))
        self.wanted = frozenset(wanted)
        self._peer_trust: dict[str, bool] = {}
        # An address's client key (`client_ipv6_prefix`): called for IPv6 addresses only
        self.client_key = engine.client_keys.key
        self._no_peer_said = False

    # ------------------------------------------------------------ deadline, peers

    def from_headers(
        self,
        scope: Scope,
        ctx: DecisionContext,
        plan: RoutePlan,
        found: dict[bytes, bytes],
        now: float,
    ) -> tuple[float | None, Rejection | None]:
        """The caller's deadline (504 if it passed) and the trusted-peer attempt header."""
        caller = None  # the shortest valid deadline among the configured headers
        for name, raw, parse, parsed in self.deadline_headers:
            value = found.get(raw)
            if value is not None:
                # Callers repeat a few values ("5000"): each is parsed once (a bounded
                # table per header; junk is kept as None like any other value).
                try:
                    seconds = parsed[value]
                except KeyError:  # (no sentinel: compiled code boxes floats anew, so `is` fails)
                    seconds = parse(value)
                    if len(value) <= _MAX_KEPT_CHARS:  # (no valid value is longer)
                        if len(parsed) >= _MAX_PARSED:
                            parsed.clear()
                        parsed[value] = seconds
                if seconds is None:
                    ctx.decisions.append(
                        Decision(
                            LAYER_DEADLINE,
                            name,
                            ALLOW,
                            "malformed_header",
                            SOURCE_REQUEST,
                            0.0,
                            now,
                        )
                    )
                elif caller is None or seconds < caller:
                    caller = seconds
        if caller is None:
            remaining = plan.deadline_default_s
        else:
            cap = plan.deadline_cap_s
            remaining = caller if cap is None or caller < cap else cap
            ctx.deadline_from_caller = True
            if remaining <= 0.0 and plan.enforce:
                # (a route with `enforce = false` records it, and serves the request:
                # admission.admission_decisions' `would_reject`)
                return remaining, self._expired(ctx, now + remaining, now)
        attempt = found.get(ATTEMPT_HEADER)
        if attempt is not None:
            client = scope.get("client")
            if client and self.trusted_peer(client[0]):
                ctx.trusted_peer = True
                ctx.inbound_attempt = parse_attempt(attempt) or 1
        return remaining, None

    @staticmethod
    def _expired(ctx: DecisionContext, deadline_at: float, now: float) -> Rejection:
        ctx.deadline_at = deadline_at
        ctx.decisions.append(
            Decision(
                LAYER_DEADLINE, ctx.route, REJECT, "expired_on_arrival", SOURCE_REQUEST, 0.0, now
            )
        )
        ctx.decided_by = LAYER_DEADLINE
        ctx.outcome = OUTCOME_EXPIRED
        body = problem_body(
            504,
            "Gateway Timeout",
            "the caller's deadline had passed on arrival",
            "deadline-expired",
        )
        return 504, [], body

    def trusted_peer(self, peer: str) -> bool:
        trusted = self._peer_trust.get(peer)
        if trusted is None:
            trusted = in_networks(peer, self.engine.trusted_peers)
            if len(self._peer_trust) > _MAX_PEERS:
                self._peer_trust.clear()
            self._peer_trust[peer] = trusted
        return trusted

    # ------------------------------------------------------------ limiter keys

    def limit_keys(
        self,
        scope: Scope,
        plan: RoutePlan,
        found: dict[bytes, bytes] | None,
        ctx: DecisionContext,
    ) -> Sequence[str]:
        """One storage key per limit of the route; sets the context's client key."""
        if plan.ip_key_prefix is not None and not self.uses_forwarding:
            # one limit keyed by the peer address: the common case
            client = scope.get("client")
            ip = client[0] if client else self.no_peer(plan.limits[0].name)
            if ":" in ip:  # IPv6: its prefix (IPv4 pays this test alone)
                ip = self.client_key(ip)
            ctx.client_key = ip
            return plan.ip_keys[ip] if ip in plan.ip_keys else ip_keys_of(plan, ip)
        ip_: str | None = None  # the address, keyed at the policy's IPv6 prefix
        own_ip: str | None = None  # the first keyed at a limit's own prefix
        other: str | None = None  # the first header or custom key, as stored
        keys = []
        for lim, prefix in zip(plan.limits, plan.key_prefixes, strict=True):
            kind = lim.key
            if kind == "route":
                keys.append(prefix + "route:" + plan.route)
                continue
            if kind == "global":
                keys.append(prefix + "*")
                continue
            # the limit's own IPv6 prefix (`client_ipv6_prefix`; None: the policy's)
            own = lim.client_ipv6_prefix
            value: str | None = None
            if isinstance(kind, str) and kind.startswith("header:"):
                # header:NAME; a missing header falls back to the IP
                name = header_key(kind[7:])
                raw = found.get(name) if found else None
                if raw and b"," in raw:
                    # Repeated lines come joined: the key is the first line, the value the
                    # app reads (Starlette's `headers[...]`, FastAPI's `Header()`). Keyed on
                    # them all, a client that sends its valid key and then a new junk line
                    # each time had a fresh counter per request, its app seeing the key.
                    raw = first_header(scope, name)
                if raw:
                    text = raw.decode("latin-1")
                    if ":" in text:  # an IPv6 address (`header:x-real-ip`): its prefix
                        text = (
                            self.client_key(text)
                            if own is None
                            else self.engine.client_keys.at(own).key(text)
                        )
                    value = "h:" + compact_key(text)
                    if other is None:
                        other = value
            elif kind != "client_ip":
                try:
                    # called through an Any reference (compiled, the declared `str | None`
                    # was checked: a coroutine or an int was a TypeError, "failed", where
                    # the interpreter keys by its text)
                    call: Any = kind
                    custom: object = call(scope)
                except Exception:
                    log_exception(
                        logger, lim.name, "fidelity_mw: key function of %r failed", lim.name
                    )
                    custom = None
                if custom is not None and not isinstance(custom, str):
                    if isawaitable(custom):
                        # (a plain function around an async lookup): its text is a new key
                        # per request, no limit at all; the client's address counts instead
                        awaitable_key(lim.name, custom)
                        custom = None
                    elif text_is_address(custom):  # (the same: an ORM row, say)
                        addressed_key(lim.name, custom)
                        custom = None
                if custom is not None:
                    value = "k:" + compact_key(str(custom))
                    if other is None:
                        other = value
            if value is None:  # client_ip, or the address in place of a missing key
                if own is None:
                    if ip_ is None:
                        ip_ = self.client_ip(scope, found, lim.name)
                    value = ip_
                else:
                    value = self.client_ip(
                        scope, found, lim.name, self.engine.client_keys.at(own).key
                    )
                    if own_ip is None:
                        own_ip = value
            keys.append(prefix + value)
        # The client key telemetry hashes (`fidelity.client.key_hash`): the address when a
        # limit counted by it (at the policy's prefix, else the first limit's own), else
        # the API key (or custom key) a limit counted by, as the store keys it, so the
        # admin page's row of that key matches the request's traces.
        if ip_ is not None:
            ctx.client_key = ip_
        elif own_ip is not None:
            ctx.client_key = own_ip
        elif other is not None:
            ctx.client_key = other
        return keys

    def client_ip(
        self,
        scope: Scope,
        found: dict[bytes, bytes] | None,
        limit: str = "",
        keys: Callable[[str], str] | None = None,
    ) -> str:
        """The client's address as a limit's key: an IPv6 one by `keys` (a limit's own
        `client_ipv6_prefix`), else by the policy's."""
        client = scope.get("client")
        peer: str | None = client[0] if client else None
        if peer is None:
            return self.no_peer(limit)
        if found is not None and self.engine.trusted_proxies:
            peer = client_address(
                peer,
                found.get(self.forwarded_raw),
                self.engine.trusted_proxies,
                self.forwarded_header,
            )
        if ":" not in peer:
            return peer
        return self.client_key(peer) if keys is None else keys(peer)

    def no_peer(self, limit: str) -> str:
        """The client key of a request without a client address (`scope["client"]` is
        None: a server on a unix socket), said once: every such request is one client."""
        if not self._no_peer_said:
            self._no_peer_said = True
            logger.warning(
                'fidelity_mw: a request came without a client address (scope["client"] '
                "is None: a server on a unix socket); rate limit %r counts every such "
                "request as one client, %r, and neither X-Forwarded-For nor Forwarded "
                "can be believed without a peer address. Behind a proxy on a unix socket, "
                "key the limit by a header the proxy sets itself (key = "
                '"header:x-real-ip" with nginx\'s proxy_set_header X-Real-IP '
                "$remote_addr), or serve on TCP",
                limit,
                NO_PEER,
            )
        return NO_PEER


def text_is_address(value: object) -> bool:
    """Is `value`'s text its address in memory (a class with no `__str__` or `__repr__` of
    its own, as an ORM model is)? As a key, a new one per request: no limit at all."""
    kind = type(value)
    return kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__


def addressed_key(name: str, value: object) -> None:
    """A key function returned an object whose text is its address: said (throttled)."""
    kind = type(value).__name__
    warn(
        logger, name, "fidelity_mw: the key function of %r returned a %s, whose text is its "
        "address in memory, new for every request: no limit at all, so the request counts "
        "by the client's address; return the identity's id (or give %s a __str__)",
        name, kind, kind, level=logging.ERROR,
    )  # fmt: skip


def awaitable_key(name: str, value: Any) -> None:
    """A key function returned an awaitable: closed unawaited, and said (throttled)."""
    close = getattr(value, "close", None)
    if close is not None:
        close()  # (a coroutine: no "never awaited" warning)
    warn(
        logger, name, "fidelity_mw: the key function of %r returned an awaitable; a "
        "middleware key function is plain (for an async key, "
        "Depends(fidelity.limit(..., key=fn))): this request is counted by its address",
        name, level=logging.ERROR,
    )  # fmt: skip
