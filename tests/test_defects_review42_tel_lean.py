"""Issue 17 item 2: a plain request's span costs the SDK's validation of its decisions (and
its client key hash), not of six attributes (`Telemetry(request_attributes="lean")`, the
default); every request that is not plain keeps every attribute, and `"all"` keeps them on
every request. The count is of attributes handed to the SDK (each one validated on the
request's own time), not a timing."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import Span as SdkSpan

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.telemetry import Telemetry, schema
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import Pipeline, call, pipeline, starlette_app

pytestmark = pytest.mark.anyio

FULL = {
    schema.DECIDED_BY,
    schema.OUTCOME,
    schema.POLICY_VERSION,
    schema.ROUTE,
    schema.DECISIONS,
    schema.CLIENT_KEY_HASH,
}
LEAN = {schema.DECISIONS, schema.CLIENT_KEY_HASH}


def fidelity_attributes(span: Any) -> dict[str, Any]:
    return {k: v for k, v in (span.attributes or {}).items() if k.startswith("fidelity.")}


def instrumented(otel: Pipeline, policy: Policy, clock: FakeClock | None = None) -> Any:
    app = starlette_app()
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock or FakeClock(), observer=otel.telemetry
    )
    return OpenTelemetryMiddleware(
        app, tracer_provider=otel.tracer_provider, exclude_spans=["receive", "send"]
    )


def the_span(otel: Pipeline) -> Any:
    (span,) = [s for s in otel.finished() if schema.DECISIONS in (s.attributes or {})]
    otel.spans.clear()
    return span


class CountedSets:
    """Counts the attributes the observer hands to the SDK's span (each one validated)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        many, one = SdkSpan.set_attributes, SdkSpan.set_attribute

        def set_attributes(span: Any, attributes: Any) -> None:
            self.names += [k for k in attributes if k.startswith("fidelity.")]
            many(span, attributes)

        def set_attribute(span: Any, key: str, value: Any) -> None:
            if key.startswith("fidelity."):
                self.names.append(key)
            one(span, key, value)

        monkeypatch.setattr(SdkSpan, "set_attributes", set_attributes)
        monkeypatch.setattr(SdkSpan, "set_attribute", set_attribute)


async def test_a_plain_request_hands_the_sdk_its_decisions_and_key_hash_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: 6 `fidelity.*` attributes validated per plain request; now 2."""
    otel = pipeline(decision_events="non_allow")
    try:
        app = instrumented(otel, Policy(rate_limits=(RateLimit(name="c", rate="100/s"),)))
        assert (await call(app, "/ok")).status_code == 200  # the first builds the shapes
        the_span(otel)
        counted = CountedSets(monkeypatch)
        for _ in range(3):
            assert (await call(app, "/ok")).status_code == 200
            attrs = fidelity_attributes(the_span(otel))
            assert set(attrs) == LEAN
            assert attrs[schema.DECISIONS] == (
                "deadline/allow/route_default@request breaker/allow/breaker_closed@memory "
                "ratelimit:c/allow/under_limit@memory"
            )
        assert sorted(counted.names) == sorted(list(LEAN) * 3)
    finally:
        otel.shutdown()


async def test_all_sets_every_attribute_on_every_request() -> None:
    otel = pipeline(decision_events="non_allow", request_attributes="all")
    try:
        policy = Policy(rate_limits=(RateLimit(name="c", rate="100/s"),))
        app = instrumented(otel, policy)
        for _ in range(2):
            assert (await call(app, "/ok")).status_code == 200
            attrs = fidelity_attributes(the_span(otel))
            assert set(attrs) == FULL
            assert (attrs[schema.DECIDED_BY], attrs[schema.OUTCOME]) == ("app", "served")
            assert (attrs[schema.ROUTE], attrs[schema.POLICY_VERSION]) == ("/ok", policy.version)
    finally:
        otel.shutdown()


async def test_every_request_that_is_not_plain_keeps_every_attribute() -> None:
    """A refusal, an app's failure and a request that had a probe keep the full set: the
    lean set is for a plain request only (served, all `allow`, nothing stale)."""
    otel = pipeline(decision_events="non_allow")
    try:
        policy = Policy(rate_limits=(RateLimit(name="c", rate="1/h", burst=2),))
        app = instrumented(otel, policy)
        said = []
        for path in ("/ok", "/fail", "/ok"):
            response = await call(app, path)
            attrs = fidelity_attributes(the_span(otel))
            said.append((response.status_code, attrs.get(schema.OUTCOME)))
            if attrs.get(schema.OUTCOME) is None:
                assert set(attrs) == LEAN
            else:
                assert set(attrs) >= FULL
                assert attrs[schema.POLICY_VERSION] == policy.version
                assert attrs[schema.ROUTE] in ("/ok", "/fail")
        assert said == [(200, None), (500, "failed"), (429, "rejected")]
    finally:
        otel.shutdown()


async def test_a_stale_plain_request_keeps_every_attribute() -> None:
    """Every decision `allow` and served, but one decided on stale state: not plain."""
    from fidelity_mw.context import Decision, current

    otel = pipeline(decision_events="non_allow")
    app = starlette_app()

    async def stale_first(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: Any) -> None:
            ctx = current()
            if message["type"] == "http.response.start" and ctx is not None:
                ctx.add(Decision("breaker", "up", "allow", "breaker_closed", "cache", 2.0))
            await send(message)

        await app(scope, receive, sending)

    outer = FidelityMiddleware(
        stale_first, policy=Policy(), clock=FakeClock(), observer=otel.telemetry
    )
    wrapped = OpenTelemetryMiddleware(
        outer, tracer_provider=otel.tracer_provider, exclude_spans=["receive", "send"]
    )
    try:
        assert (await call(wrapped, "/ok")).status_code == 200
        attrs = fidelity_attributes(the_span(otel))
        assert attrs[schema.STALE_DECISIONS] == 1
        assert (attrs[schema.DECIDED_BY], attrs[schema.OUTCOME]) == ("app", "served")
        assert schema.POLICY_VERSION in attrs
        assert schema.ROUTE in attrs
    finally:
        otel.shutdown()


def test_request_attributes_is_checked() -> None:
    with pytest.raises(ValueError, match="request_attributes='some'"):
        Telemetry(request_attributes="some")
