"""Parsing of everything callers send us. Pure and defensive: junk yields None, never raises."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Final

_GRPC_UNITS: Final = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MAX_HEADER_CHARS: Final = 64


def _ascii(value: bytes) -> str | None:
    if len(value) > _MAX_HEADER_CHARS:
        return None
    try:
        return value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None


def parse_timeout_ms(value: bytes) -> float | None:
    """`x-request-timeout-ms` / `x-envoy-expected-rq-timeout-ms`: milliseconds -> seconds.

    The header's grammar is ASCII digits and nothing else: no sign, decimal point,
    exponent, digit separator or whitespace (`float()` and `int()` accept all of
    those, and `-0` would then read as an expired deadline).
    """
    if not value or len(value) > _MAX_HEADER_CHARS or not value.isdigit():
        return None  # bytes.isdigit() is ASCII-only
    return int(value) / 1000.0


def parse_grpc_timeout(value: bytes) -> float | None:
    """`grpc-timeout`: TimeoutValue (1-8 ASCII digits) then TimeoutUnit (H M S m u n)."""
    if not 2 <= len(value) <= 9:
        return None
    unit = _GRPC_UNITS.get(chr(value[-1]))
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def _shortest(parse: Callable[[bytes], float | None]) -> Callable[[bytes], float | None]:
    """The header repeated (its lines joined with ","): the shortest of the values, as
    each hop that added one allows no more; any malformed value makes it malformed."""

    def parse_list(value: bytes) -> float | None:
        if b"," not in value:
            return parse(value)
        if len(value) > 8 * _MAX_HEADER_CHARS:  # a few hops' values, not a list to scan
            return None
        shortest: float | None = None
        for part in value.split(b","):
            seconds = parse(part.strip(b" \t"))
            if seconds is None:
                return None
            if shortest is None or seconds < shortest:
                shortest = seconds
        return shortest

    return parse_list


_PARSE_TIMEOUT_MS_LIST: Final = _shortest(parse_timeout_ms)
_PARSE_GRPC_TIMEOUT_LIST: Final = _shortest(parse_grpc_timeout)


def deadline_parser(name: str) -> Callable[[bytes], float | None]:
    """The parser for a deadline header: `grpc-timeout` syntax, else milliseconds."""
    return _PARSE_GRPC_TIMEOUT_LIST if name == "grpc-timeout" else _PARSE_TIMEOUT_MS_LIST


def parse_deadline(name: str, value: bytes) -> float | None:
    return deadline_parser(name)(value)


def parse_attempt(value: bytes) -> int | None:
    text = _ascii(value)
    if not text or not text.isdigit() or len(text) > 3:
        return None
    return int(text)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_cors_preflight(headers: Iterable[object]) -> bool:
    """An `OPTIONS` request's ASGI headers: a CORS preflight carries `Origin` and
    `Access-Control-Request-Method` (Fetch standard). Anything odd is not one."""
    origin = asked = False
    for item in headers:
        if not isinstance(item, list | tuple) or len(item) != 2:
            continue
        name = item[0]
        if name == b"access-control-request-method":
            asked = True
        elif name == b"origin":
            origin = True
    return origin and asked


_V4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
# IPv6 addresses whose client keys are kept (cleared when full: clients that rotate
# addresses inside their prefix would otherwise grow it without bound)
_MAX_CLIENT_KEYS: Final = 8192
# 64:ff9b::/96 shifted right by 32 bits: NAT64's well-known prefix (RFC 6052)
_NAT64_TOP: Final = 0x0064FF9B << 64


def _network(cidr: str) -> Network:
    """One network; an IPv4-mapped one (`::ffff:10.0.0.0/104`) as the IPv4 network it
    covers: `in_networks` matches a mapped address as its IPv4 address, so the mapped
    form of a network matched nothing."""
    net = ipaddress.ip_network(cidr, strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(_network(c) for c in cidrs)


def client_key(address: str, prefix: int = 64) -> str:
    """The client key of an address: IPv4 as it is, IPv4-mapped IPv6 (`::ffff:1.2.3.4`,
    what a dual-stack socket reports) and NAT64's well-known prefix (`64:ff9b::1.2.3.4`,
    an IPv4 client behind a stateless NAT46) as the IPv4 address, other IPv6 as its
    /`prefix` network (`2001:db8:1:2::/64`: a client given a /64 rotates addresses inside
    it at will), the address itself at 128 (normalised, without a zone). Junk comes back
    unchanged."""
    if ":" not in address:
        return address
    key = _ipv6_key(address, prefix)
    return address if key is None else key


def _ipv6_key(address: str, prefix: int) -> str | None:
    """`client_key` of a text with a ":"; None when it is no IPv6 address."""
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return None
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    number = int(ip)
    if number >> 32 == _NAT64_TOP:  # 64:ff9b::/96 (RFC 6052): an IPv4 host, embedded
        return str(ipaddress.IPv4Address(number & 0xFFFFFFFF))
    if prefix >= 128:
        return ipaddress.IPv6Address(number).compressed  # one text per address
    bits = 128 - prefix
    return ipaddress.IPv6Network(((number >> bits) << bits, prefix)).compressed


class ClientKeys:
    """`client_key` with one `client_ipv6_prefix` (`at`: another), kept per IPv6 address (ipaddress
    takes microseconds); IPv4 addresses pass through untouched, junk and addresses
    over 64 characters (a zone can be any length) are not kept.

    Shared by threads (sync routes, the blocking transport): each dict operation is
    atomic, a race between the size test and `clear` at worst clears twice or keeps a
    few entries over the bound; a key is a pure function of its address."""

    def __init__(self, prefix: int = 64) -> None:
        self.prefix = prefix
        self._keys: dict[str, str] = {}
        # the keys at other prefixes (a `[[rate_limit]]`'s own): one cache per prefix
        self._others: dict[int, ClientKeys] = {}

    def at(self, prefix: int | None) -> ClientKeys:
        """The client keys at `prefix` (None: this one's), one cache per prefix, shared
        by every limit that counts by it (and bounded as this one is)."""
        if prefix is None or prefix == self.prefix:
            return self
        other = self._others.get(prefix)
        if other is None:
            other = self._others.setdefault(prefix, ClientKeys(prefix))
        return other

    def key(self, address: str) -> str:
        if ":" not in address:
            return address
        found = self._keys.get(address)
        if found is None:
            found = _ipv6_key(address, self.prefix)
            if found is None:
                return address  # junk (a header's value): not kept, it could be anything
            if len(address) > _MAX_HEADER_CHARS:
                return found  # (a long zone, `fe80::1%...`: keyed, not kept)
            if len(self._keys) >= _MAX_CLIENT_KEYS:
                self._keys.clear()
            self._keys[address] = found
        return found


def in_networks(address: str, nets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack server reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in net for net in nets)


def _strip_port(token: str) -> str:
    token = token.strip().strip('"')
    if token.startswith("["):  # [v6]:port
        end = token.find("]")
        return token[1:end] if end > 0 else ""
    if token.count(":") == 1:  # v4:port
        return token.split(":", 1)[0]
    return token


def forwarded_chain(value: bytes | None, header: str = "x-forwarded-for") -> list[str]:
    """Addresses from one forwarding header (`x-forwarded-for` or `forwarded`), client
    first. Junk hops become "" (they stop the walk)."""
    chain: list[str] = []
    if value is None or len(value) > 4096:
        return chain
    text = value.decode("latin-1")
    if header == "forwarded":
        for element in text.split(","):
            for pair in element.split(";"):
                key, _, val = pair.partition("=")
                if key.strip().lower() == "for":
                    chain.append(_strip_port(val))
    else:
        chain = [_strip_port(part) for part in text.split(",")]
    valid = []
    for address in chain:
        try:
            valid.append(str(ipaddress.ip_address(address)))
        except ValueError:
            valid.append("")  # unknown hop ("unknown", obfuscated id, junk)
    return valid


def client_address(
    peer: str | None,
    value: bytes | None,
    proxies: tuple[Network, ...],
    header: str = "x-forwarded-for",
) -> str:
    """The client's address: walk the forwarding chain right to left over trusted proxies.

    Only the one header the policy trusts (`forwarded_header`) is read: a proxy
    that appends to X-Forwarded-For passes a client-sent `Forwarded` through
    untouched, so believing the other header would let the client pick its key.
    Headers are believed only when the direct peer is a trusted proxy; the
    first hop that is not a trusted proxy is the client. An unparseable hop
    stops the walk there (we cannot vouch for anything left of it).
    """
    if peer is None:
        return "unknown"
    if not proxies or value is None or not in_networks(peer, proxies):
        return peer
    address = peer
    for hop in reversed(forwarded_chain(value, header)):
        if not hop:
            return address
        address = hop
        if not in_networks(hop, proxies):
            return hop
    return address
