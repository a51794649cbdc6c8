"""What the outbound layer reads from and writes on the wire: headers, timeouts, trust.

httpx-specific helpers that the attempt loop calls between decisions; they
decide nothing themselves.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

import httpx

from ..decide.retry import ERROR_CONNECT, ERROR_LOCAL, ERROR_NETWORK, ERROR_OTHER, ERROR_TIMEOUT
from ..errors import FidelityError
from ..headers import Network, in_networks
from ..policy import MAX_ATTEMPTS

ATTEMPT_HEADER: Final = b"x-fidelity-attempt"
TIMEOUT_HEADER: Final = b"x-request-timeout-ms"
RETRY_SIGNAL_HEADER: Final = "x-fidelity-retry"
EXHAUSTED: Final = "exhausted"
# On a response a callee's own control layer produced (its middleware's refusals).
DECIDED_BY: Final = "x-fidelity-decided-by"
# On a callee's 5xx: the failure was an upstream's of the callee, which the callee's
# breaker for that upstream counted (inbound/responses.py UPSTREAM_FAULT).
FAULT_HEADER: Final = "x-fidelity-fault"
FAULT_UPSTREAM: Final = "upstream"
IDEMPOTENCY_KEY: Final = b"idempotency-key"

# Every attempt number a call can reach: its attempts and its hedges (`max_hedges` <= 3).
_ATTEMPT_VALUES: Final = tuple(str(i).encode() for i in range(MAX_ATTEMPTS + 3 + 2))
_LOCALHOST: Final = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_NO_TIMEOUT: Final[Mapping[str, float | None]] = {
    "connect": None,
    "read": None,
    "write": None,
    "pool": None,
}
OURS_SET: Final = frozenset((ATTEMPT_HEADER, TIMEOUT_HEADER))  # our per-attempt headers


def _has_fast_headers() -> bool:
    """httpx keeps headers as a list of (raw key, lower key, value); use it when it is there."""
    probe = httpx.Headers({"a": "b"})
    raw = getattr(probe, "_list", None)
    return isinstance(raw, list) and raw == [(b"a", b"a", b"b")]


FAST_HEADERS: Final = _has_fast_headers()


# An instance's place in a URL as httpx holds it parsed: (scheme, host, port), canonical.
Address = tuple[str, str, int | None]
_URL: Final = httpx.URL
_new_tuple: Final = tuple.__new__


def _parsed_type() -> Any:  # (httpx._urlparse.ParseResult, or None)
    ref: Any = getattr(httpx.URL("http://h:1/"), "_uri_reference", None)
    # (its class read before `isinstance` narrows it: compiled, `type()` of a value
    # known to be a tuple is `tuple` itself, and every copy then took the slow way)
    kind: Any = ref.__class__
    return kind if isinstance(ref, tuple) and len(ref) == 7 else None


_PARSED: Final = _parsed_type()


def address_of(url: httpx.URL) -> Address | None:
    """A base URL's scheme, host and port as its parsed form holds them (`at_instance`);
    None where httpx keeps another layout."""
    if not _URL_COPY_FITS:
        return None
    ref = url._uri_reference
    return (ref[0], ref[2], ref[3])


def at_instance(url: httpx.URL, address: Address | None, scheme: str, host: str,
                port: int | None) -> httpx.URL:  # fmt: skip
    """`url.copy_with(scheme=scheme, host=host, port=port)`: the request's URL sent to a
    service's instance. The copy parses the whole URL again (~1,700 bytecodes a call,
    half an attempt's cost); an absolute URL's parsed fields are canonical already, so
    the instance's own (`address`, parsed once) replace its three and the rest stays
    (`_URL_COPY_FITS` checked that this gives what the copy gives)."""
    if address is not None:
        ref = url._uri_reference
        if ref[0] and ref[2]:  # (absolute: scheme and host parsed; its path normalized)
            fields = (address[0], ref[1], address[1], address[2], ref[4], ref[5], ref[6])
            new = _URL.__new__(_URL)
            new._uri_reference = _new_tuple(_PARSED, fields)
            return new
    return url.copy_with(scheme=scheme, host=host, port=port)


# URLs whose copy to an instance `at_instance` must build as httpx's copy builds it.
_COPY_PROBES: Final = (
    ("http://svc/a/b?x=1&y=%20z#frag", "http://10.0.0.1:8080"),
    ("https://u:p%40w@svc:8443/%7Ea/%zz/ü?q=ü", "https://[::1]:443"),
    ("http://svc", "https://xn--bcher-kva.example"),
    ("http://svc:80/p;x?", "http://Bücher.example:81"),
)


def _url_copy_fits() -> bool:
    if _PARSED is None:
        return False
    try:
        for url, base in _COPY_PROBES:
            at, where = httpx.URL(url), httpx.URL(base)
            ref = where._uri_reference
            address = (ref[0], ref[2], ref[3])
            fields = at._uri_reference
            fast = (address[0], fields[1], address[1], address[2], *fields[4:])
            slow = at.copy_with(scheme=where.scheme, host=where.host, port=where.port)
            if fast != tuple(slow._uri_reference) or type(slow._uri_reference) is not _PARSED:
                return False
    except Exception:  # pragma: no cover - another httpx layout
        return False
    return True


_URL_COPY_FITS: Final = _url_copy_fits()


def take_ours(headers: httpx.Headers) -> list[tuple[bytes, bytes, bytes]] | None:
    """Set aside headers named like ours that the caller set (rare): None if there are none."""
    if not FAST_HEADERS:
        return None
    raw: list[tuple[bytes, bytes, bytes]] = headers._list
    for item in raw:
        if item[1] in OURS_SET:
            prior = [it for it in raw if it[1] in OURS_SET]
            raw[:] = [it for it in raw if it[1] not in OURS_SET]
            return prior
    return None


def take_ours_late(
    headers: httpx.Headers, saved: list[tuple[bytes, bytes, bytes]] | None
) -> tuple[list[tuple[bytes, bytes, bytes]] | None, list[tuple[bytes, bytes, bytes]] | None]:
    """`take_ours` for a call that began with a host not told our headers and tells it
    now (its first answer came from a trusted address: `Upstream.heard`): the caller's
    own headers of those names are set aside before our retry's, not sent beside them
    (ours, stamped already, are ours: told by identity, as `stamp` does). Also off the
    headers saved for `restore` (which gives the set-aside ones back itself)."""
    if not FAST_HEADERS:
        return None, saved
    raw: list[tuple[bytes, bytes, bytes]] = headers._list
    if not any(it[1] in OURS_SET and _foreign(it[1]) for it in raw):
        return None, saved
    prior = [it for it in raw if it[1] in OURS_SET and _foreign(it[1])]
    raw[:] = [it for it in raw if it[1] not in OURS_SET or not _foreign(it[1])]
    if saved is not None:
        saved = [it for it in saved if it[1] not in OURS_SET or not _foreign(it[1])]
    return prior, saved


def give_ours_back(
    headers: httpx.Headers,
    prior: list[tuple[bytes, bytes, bytes]] | None,
    saved: list[tuple[bytes, bytes, bytes]] | None,
) -> list[tuple[bytes, bytes, bytes]] | None:
    """The other way (a service renamed mid-call, no longer all ours: `Upstream._speak`):
    our headers off the request before the retry, the caller's own of those names back
    on it (and on the headers saved for `restore`, which now has none to give back)."""
    unstamp(headers, prior)
    if prior and saved is not None:
        saved = [*saved, *prior]
    return saved


def _foreign(key: bytes) -> bool:
    return key is not ATTEMPT_HEADER and key is not TIMEOUT_HEADER


def advertised_ms(ms: int) -> bytes:
    """The `x-request-timeout-ms` sent for an attempt of `ms`: a tenth less (at least
    2 ms, at most 250 ms), at least 1. The next hop gives up at the time it is told and
    then answers (a 504, with `x-fidelity-retry: exhausted` when it retried): told the
    attempt's whole time, its answer arrived after this side's own timeout had fired,
    so this side retried and the next hop's retries started over. Envoy has the same
    offset for `grpc-timeout` (`grpc_timeout_header_offset`)."""
    margin = ms // 10
    margin = 2 if margin < 2 else 250 if margin > 250 else margin
    told = ms - margin
    return b"%d" % (told if told > 0 else 1)


def deadline_bound_s(remaining: float) -> float:
    """An attempt's time when the rest of the deadline bounds it: that rest less a margin
    (a tenth, at least 2 ms, at most 250 ms, at most half of it), so that the attempt's own
    timeout fires before the middleware's deadline cancels the request. Cancelled, the
    attempt was counted by no breaker: a callee that hung past the deadline of every
    request never opened ours (Envoy offsets `grpc-timeout` for the same race)."""
    margin = remaining * 0.1
    margin = 0.002 if margin < 0.002 else 0.25 if margin > 0.25 else margin
    half = remaining * 0.5
    return remaining - (margin if margin < half else half)


def uncut_s(attempt_timeout_s: float) -> float:
    """The least rest of the deadline that leaves an attempt its whole timeout
    (`deadline_bound_s` of it is the attempt timeout)."""
    margin = attempt_timeout_s / 9.0
    return attempt_timeout_s + (0.002 if margin < 0.002 else 0.25 if margin > 0.25 else margin)


def stamp(headers: httpx.Headers, attempt: int, timeout_ms: bytes) -> None:
    """Set `x-fidelity-attempt` and `x-request-timeout-ms` for one attempt.

    They are per-attempt metadata: `unstamp` takes them off the request again
    when the call ends, so the request the caller gets back is the one it built
    (and httpx's own per-header work after the call does not grow). The
    caller's own headers of those names were set aside by `take_ours`.
    """
    value = _ATTEMPT_VALUES[attempt] if attempt < len(_ATTEMPT_VALUES) else str(attempt).encode()
    if not FAST_HEADERS:
        headers[ATTEMPT_HEADER.decode()] = value.decode()
        headers[TIMEOUT_HEADER.decode()] = timeout_ms.decode()
        return
    raw: list[tuple[bytes, bytes, bytes]] = headers._list
    if attempt > 1:
        # Identity, not equality: only our stamps carry these very bytes objects.
        if len(raw) >= 2 and raw[-2][1] is ATTEMPT_HEADER and raw[-1][1] is TIMEOUT_HEADER:
            raw[-2] = (ATTEMPT_HEADER, ATTEMPT_HEADER, value)
            raw[-1] = (TIMEOUT_HEADER, TIMEOUT_HEADER, timeout_ms)
            return
        raw[:] = [it for it in raw if it[1] is not ATTEMPT_HEADER and it[1] is not TIMEOUT_HEADER]
    raw.append((ATTEMPT_HEADER, ATTEMPT_HEADER, value))
    raw.append((TIMEOUT_HEADER, TIMEOUT_HEADER, timeout_ms))


# A first attempt's two headers; empty for an upstream that is not told them (`Upstream.speaks`).
Stamps = tuple[tuple[bytes, bytes, bytes], ...]


def first_stamps(timeout_ms: bytes) -> Stamps:
    """A first attempt's two headers, built once per upstream (`stamp_first`)."""
    return (
        (ATTEMPT_HEADER, ATTEMPT_HEADER, _ATTEMPT_VALUES[1]),
        (TIMEOUT_HEADER, TIMEOUT_HEADER, timeout_ms),
    )


def stamp_first(headers: httpx.Headers, stamps: Stamps) -> None:
    """`stamp(headers, 1, ...)` with the upstream's prebuilt headers (`first_stamps`)."""
    if FAST_HEADERS:
        headers._list += stamps
    elif stamps:
        stamp(headers, 1, stamps[1][2])


def unstamp(headers: httpx.Headers, prior: list[tuple[bytes, bytes, bytes]] | None) -> None:
    """Take our per-attempt headers off the request; give back the caller's own."""
    if not FAST_HEADERS:
        return
    raw: list[tuple[bytes, bytes, bytes]] = headers._list
    if len(raw) >= 2 and raw[-2][1] is ATTEMPT_HEADER and raw[-1][1] is TIMEOUT_HEADER:
        del raw[-2:]
    else:
        raw[:] = [it for it in raw if it[1] is not ATTEMPT_HEADER and it[1] is not TIMEOUT_HEADER]
    if prior:
        raw.extend(prior)


def snapshot(headers: httpx.Headers) -> list[tuple[bytes, bytes, bytes]] | None:
    """The request's headers as they are before an attempt observer runs (it may inject
    trace context: `traceparent`, `tracestate`, `baggage`), for `restore`; ours may be
    on them already (`restore` takes them off)."""
    return list(headers._list) if FAST_HEADERS else None


def restore(
    headers: httpx.Headers,
    prior: list[tuple[bytes, bytes, bytes]] | None,
    saved: list[tuple[bytes, bytes, bytes]] | None,
) -> None:
    """The call is over: the request's headers as the caller built them. `unstamp`, or,
    when an observer ran (`saved`), the headers as they were before it: a trace context
    it injected for our attempt's span is not left on the request (sent again, it would
    carry a span that has ended; the caller would read our span in its own request)."""
    if saved is not None:
        headers._list[:] = saved  # (taken before our headers, or after: taken off below)
    unstamp(headers, prior)


try:  # httpx's multipart body: private, so looked for rather than relied on
    from httpx._multipart import MultipartStream as _Multipart
except ImportError:  # pragma: no cover - another httpx layout
    _Multipart = None  # type: ignore[assignment,misc]


def replayable(stream: object) -> bool:
    """Can this request body be sent again? Bytes held in memory can; so can a
    multipart body (`files=`) whose files are bytes or seekable (httpx rewinds
    each file before sending it); a streaming body cannot. Ask before the first
    attempt: a transport that reads a streaming body leaves bytes behind."""
    if isinstance(stream, httpx.ByteStream):
        return True
    if _Multipart is None or not isinstance(stream, _Multipart):
        return False
    for part in stream.fields:
        file = getattr(part, "file", None)
        if file is None or isinstance(file, str | bytes):
            continue
        seekable = getattr(file, "seekable", None)
        try:
            if seekable is None or not seekable():
                return False
        except Exception:
            return False
    return True


# A failed attempt's answer is read to its end before it is closed when it is this short
# (an error page), within this long (real time: it is I/O), each read at most as long.
SPEND_MAX_BYTES: Final = 64 * 1024
# (not Final, and read through the module: a test against a real server on a loaded
# machine lengthens it, where a 0.1 s stall between two body messages is no failure)
SPEND_MAX_S = 0.1


def worth_reading(response: httpx.Response) -> bool:
    """Is a failed attempt's answer short enough to read to its end before it is closed?

    An HTTP/1.1 connection whose answer was read to its end goes back to the pool; one
    closed with its body unread (even an empty one: its end was not read either) is
    dropped, and the retry pays a new connection (a TLS handshake, on HTTPS) to an
    upstream that is failing already. urllib3's `Retry` drains the same way. A long or
    open-ended body (no length, not chunked) is dropped with its connection, as before;
    on HTTP/2 closing drops the stream only, and reading a short body costs nothing."""
    headers = response.headers
    length = headers.get("content-length")
    if length is not None:
        length = length.strip()
        return length.isdigit() and int(length) <= SPEND_MAX_BYTES
    return "chunked" in headers.get("transfer-encoding", "").lower()


def unread(response: httpx.Response) -> bool:
    """Is a failed attempt's body still to be read from its connection? Not when it was
    read already (a retry waiting for evidence reads its shed first) or closed: its
    HTTP/1.1 connection is back in the pool then, and reading the raw stream again reads
    that connection while another call uses it (anyio's `BusyResourceError` in one of the
    two, a 500 at the caller's app; or the other call's bytes taken)."""
    return not (response.is_stream_consumed or response.is_closed)


# A call that ended on its first attempt leaves that attempt's timeouts on the request
# (capped at the attempt timeout, or at the rest of a deadline): httpcore reads them from
# the request when the caller reads the body, which is the attempt's still. What the
# request had itself is kept here beside them, as (ours, its own): a request sent again
# is sent with its own timeouts (`own_timeouts`), not with a deadline's sliver of an
# earlier call.
OWN_TIMEOUT: Final = "fidelity_mw.own_timeout"


def own_timeouts(extensions: MutableMapping[str, Any]) -> Any:
    """The request's own timeouts (`OWN_TIMEOUT`), put back on it: a call's first step."""
    timeouts = extensions.get("timeout")
    mark = extensions.pop(OWN_TIMEOUT, None)
    if mark is None or mark[0] is not timeouts:  # (the caller set its own since)
        return timeouts
    own = mark[1]
    if own is None:
        extensions.pop("timeout", None)
    else:
        extensions["timeout"] = own
    return own


def keep_own_timeouts(extensions: MutableMapping[str, Any], own: Any) -> None:
    """The call ends with its attempt's timeouts on the request: note the request's own."""
    ours = extensions.get("timeout")
    if ours is not own:
        extensions[OWN_TIMEOUT] = (ours, own)


def spend_timeouts(request: httpx.Request) -> None:
    """Bound each read of a failed attempt's answer at `SPEND_MAX_S` while it is read to
    its end (httpcore reads the request's timeouts as it reads the body); the next
    attempt's are set again before it is sent."""
    extensions = request.extensions
    timeouts = extensions.get("timeout")
    read = None if timeouts is None else timeouts.get("read")
    extensions["timeout"] = {
        **(timeouts or {}),
        "read": SPEND_MAX_S if read is None or read > SPEND_MAX_S else read,
    }


def has_header(headers: httpx.Headers, key: bytes) -> bool:
    if not FAST_HEADERS:
        return key.decode("latin-1") in headers
    return any(item[1] == key for item in headers._list)


def bounded_timeouts(
    original: Mapping[str, float | None] | None, bound: float
) -> Mapping[str, float | None]:
    """Every httpx timeout (connect, read, write, pool) capped at `bound` seconds.

    Returns `original` itself when nothing needs capping (the common case).
    """
    if original is None:
        original = _NO_TIMEOUT
    for value in original.values():
        if value is None or value > bound:
            return {k: bound if v is None or v > bound else v for k, v in original.items()}
    return original


def error_kind(exc: BaseException) -> str:
    """Map an exception from the inner transport to a `fidelity_mw.retry` error kind."""
    if isinstance(exc, FidelityError):  # a nested fidelity layer already decided
        return ERROR_LOCAL
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ERROR_CONNECT
    if isinstance(exc, httpx.PoolTimeout):  # our own pool is full: not the upstream's fault
        return ERROR_LOCAL
    if isinstance(exc, httpx.TimeoutException):
        return ERROR_TIMEOUT
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return ERROR_NETWORK
    if isinstance(exc, httpx.TransportError):
        return ERROR_LOCAL
    return ERROR_OTHER


def literal_peer_trusted(host: str, nets: tuple[Network, ...]) -> bool | None:
    """Is `host` inside `trusted_peers`? True/False for IP literals and `localhost`
    (127.0.0.1 and ::1); None for DNS names, which are judged per response by the
    address the connection actually reached (`connected_peer_trusted`)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return any(ip in net for ip in _LOCALHOST for net in nets)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return in_networks(host, nets)


# Names that cannot be on the public internet: special-use and private-use names (RFC
# 6761 `.localhost`, RFC 6762 `.local` and its Appendix G list, RFC 8375 `.home.arpa`,
# ICANN's `.internal`) and Kubernetes' `.svc`. A single label (`payments`) is one too.
_PRIVATE_SUFFIXES: Final = (
    ".internal", ".local", ".localhost", ".home.arpa", ".svc", ".lan", ".home", ".corp",
    ".intranet", ".private",
)  # fmt: skip


def in_system(host: str, nets: tuple[Network, ...]) -> bool:
    """Is `host` part of the system, as far as its name says before any connection (who
    hears our protocol headers, `protocol_headers = "auto"`)? An IP literal or `localhost`
    inside `trusted_peers` (as for believing its reply); a DNS name with one label or under
    a name that cannot be on the public internet (`_PRIVATE_SUFFIXES`)."""
    literal = literal_peer_trusted(host, nets)
    if literal is not None:
        return literal
    name = host.lower().rstrip(".")
    return bool(name) and ("." not in name or name.endswith(_PRIVATE_SUFFIXES))


def connected_peer_trusted(response: httpx.Response, nets: tuple[Network, ...]) -> bool:
    """For a DNS name: trust the response if the socket's peer address is a trusted peer.

    httpx's own transports expose the connection as `network_stream`; a
    transport that does not (mocks, custom transports) earns no trust.
    """
    stream = response.extensions.get("network_stream")
    get_extra_info = getattr(stream, "get_extra_info", None)
    if get_extra_info is None:
        return False
    try:
        addr = get_extra_info("server_addr")
    except Exception:
        return False
    if isinstance(addr, tuple) and addr and isinstance(addr[0], str):
        return in_networks(addr[0], nets)
    return False
