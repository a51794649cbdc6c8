"""A request's decisions, summarised once per *shape* for the span and the counters.

Most requests of a route take the same decisions (`deadline/allow`,
`breaker/allow`, `ratelimit/allow`, all on fresh memory state): only the
subject, the time and the details differ, and neither the packed
`fidelity.decisions` value, the stale count nor the counter keys read those.
So the summary is computed for the first request of a shape and looked up for
the next ones: one tuple of six fields per decision to build and hash, instead
of formatting every decision, testing its staleness and building its counter
key again. A rate limit's decision names its limit in the summary
(`ratelimit:per-client/allow/under_limit@memory`), so its subject (the limit's
name, one per limit of the policy) is part of its shape; other layers' subjects
(routes, upstream hosts) are not.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Final

from ..context import (
    ALLOW,
    LAYER_BUDGET,
    LAYER_RATELIMIT,
    LAYER_RETRY,
    SOURCE_CACHE,
    SOURCE_FALLBACK,
    SOURCE_MEMORY,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
    DroppedKey,
)
from ..inbound.admission import admission_decisions, admission_shape

# Decisions on process-local state (or on the request itself) are always fresh: the
# state-age histogram records the others only.
LOCAL_SOURCES: Final = frozenset({SOURCE_MEMORY, SOURCE_REQUEST})
_STALE_SOURCES: Final = frozenset({SOURCE_CACHE, SOURCE_FALLBACK})
# the fields a summary reads: layer, verdict, reason, state_source, state_age_s, and a
# rate limit's subject (its name)
_FIELDS: Final = operator.itemgetter(0, 2, 3, 4, 5)
_MAX_SHAPES: Final = 512
# characters of a limit's name that would break the summary's `split on spaces, then on
# / and @` (and the `:` before the name), percent-encoded
_NAME_ESCAPES: Final = str.maketrans({"%": "%25", " ": "%20", "/": "%2F", "@": "%40", ":": "%3A"})


def _shape(d: Decision) -> tuple[object, ...]:
    """What a summary reads of one decision (its cache key's part)."""
    if d[0] == LAYER_RATELIMIT:
        return (d[1], *_FIELDS(d))
    return _FIELDS(d)  # type: ignore[no-any-return]


def entry_layer(layer: str, subject: str) -> str:
    """The layer as a summary entry writes it: `ratelimit:<limit name>` for a rate limit
    (the name percent-encoded where it has a space, `/`, `@`, `:` or `%`)."""
    if layer == LAYER_RATELIMIT:
        return f"{layer}:{subject.translate(_NAME_ESCAPES)}"
    return layer


class Summary:
    """What the span and the counters need of a request's decisions."""

    __slots__ = (
        "aged",
        "count",
        "counter_keys",
        "dropped",
        "dropped_entries",
        "dropped_packed",
        "flagged",
        "lean",
        "packed",
        "plain",
        "stale",
    )

    def __init__(
        self, decisions: Sequence[Decision], dropped: dict[DroppedKey, list[int]] | None = None
    ) -> None:
        parts = []
        stale = 0
        flagged = False
        aged = False
        plain = True
        for layer, subject, verdict, reason, source, age_s, _at, _details in decisions:
            entry = entry_layer(layer, subject)
            if age_s:
                aged = True
                age = f"{age_s * 1000.0:g}"
                if "e" in age:  # 1e+06 ms (a 17-minute outage's fallback age): no exponent,
                    age = f"{age_s * 1000.0:.3f}"  # whose `+` would split the entry again
                parts.append(f"{entry}/{verdict}/{reason}@{source}+{age}ms")
            else:
                parts.append(f"{entry}/{verdict}/{reason}@{source}")
            if source in _STALE_SOURCES or age_s > 1.0:
                stale += 1
            if verdict != ALLOW:
                flagged = True
            if age_s or source not in LOCAL_SOURCES or layer in (LAYER_RETRY, LAYER_BUDGET):
                plain = False
        # `fidelity.decisions`: every decision as `layer/verdict/reason@source` (a rate
        # limit's layer as `ratelimit:<name>`), `+<age>ms` appended when the state had an
        # age, separated by spaces
        self.packed = " ".join(parts)
        self.stale = stale
        self.count = len(decisions)
        # some decision is not `allow`: it gets a span event
        self.flagged = flagged
        # the `fidelity.decisions` counter's key of each decision
        self.counter_keys = tuple((d.layer, d.verdict, d.state_source) for d in decisions)
        # False: some decision also feeds the state-age histogram or the retry budget
        # counter, which read its subject or its age (see `Metrics.record`)
        self.plain = plain
        # some decision had a state age (in the packed text): a shape of its own
        self.aged = aged
        # Records the context dropped to stay bounded (a long request: context.py,
        # MAX_DECISIONS): how many, `fidelity.decisions.dropped_counts`'s text, and
        # (layer, subject, verdict, reason, source, count) for the counters.
        self.dropped = 0
        self.dropped_packed = ""
        self.dropped_entries: tuple[tuple[str, str, str, str, str, int], ...] = ()
        if dropped:
            entries = []
            counted = []
            for (layer, subject, verdict, reason, source), (n, n_stale) in dropped.items():
                self.dropped += n
                self.stale += n_stale
                if verdict != ALLOW:
                    self.flagged = True
                entries.append(f"{entry_layer(layer, subject)}/{verdict}/{reason}@{source}={n}")
                counted.append((layer, subject, verdict, reason, source, n))
            self.dropped_packed = " ".join(entries)
            self.dropped_entries = tuple(counted)
            self.plain = False
            self.aged = True  # one request's own: never cached as a shape
        # every decision `allow`, none stale, none dropped: a served request's span gets the
        # lean attributes (docs/telemetry.md, "A plain request")
        self.lean = not (self.flagged or self.stale or self.dropped)


_SHAPES: dict[tuple[tuple[object, ...], ...], Summary] = {}


def summarize(decisions: Sequence[Decision]) -> Summary:
    """The summary of these decisions, from the cache when their shape was seen before.

    A decision with a state age makes its own shape (the age is in the packed text)
    and is not cached: shared state's ages vary from request to request.
    """
    key = tuple(map(_shape, decisions))
    summary = _SHAPES.get(key)
    if summary is None:
        summary = Summary(decisions)
        if not summary.aged:
            if len(_SHAPES) >= _MAX_SHAPES:
                _SHAPES.clear()
            _SHAPES[key] = summary
    return summary


# keyed by route plan among the facts: as many as the plans the engines keep
_MAX_BY_FACTS: Final = 4096
_BY_FACTS: dict[tuple[object, ...], Summary] = {}


def summary_of(ctx: DecisionContext) -> Summary:
    """The summary of `ctx.decisions`, without building them when they are still the
    admission's facts alone (`ctx._pending`, nothing has read a decision yet) and a
    request with the same facts was summarised before: on the allowed path the span
    and the counters need only the summary, so most requests build no records."""
    pending = ctx._pending
    if pending is None or pending[0] is not admission_decisions or ctx._decisions:
        decisions = ctx.decisions  # (first: it may make room, and count what it drops)
        if ctx.dropped_total:
            return Summary(decisions, ctx._dropped)
        return summarize(decisions)
    key = admission_shape(ctx, pending[1], pending[2])
    if key is None:
        return summarize(ctx.decisions)
    summary = _BY_FACTS.get(key)
    if summary is None:
        summary = summarize(ctx.decisions)
        if len(_BY_FACTS) >= _MAX_BY_FACTS:
            _BY_FACTS.clear()
        _BY_FACTS[key] = summary
    return summary
