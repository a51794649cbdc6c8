"""A hedge race's cancelled loser in `http.client.request.duration`.

The loser, cancelled by the call when the hedge answered, was recorded with neither
`http.response.status_code` nor `error.type`: in the duration histogram it sat among
the successful attempts (a filter on `error.type` absent counted it as one). OTel's
HTTP conventions count a cancelled request as failed: `error.type` is the exception's
type, the same value on the span and on the metric (`CancelledError`); the span keeps
`fidelity.attempt.cancelled`, which tells it from a failure of the upstream.
"""

from __future__ import annotations

import httpx
import pytest

from fidelity_mw.telemetry import schema
from test_hedging import INSTANCES, Upstream, transport
from test_telemetry_helpers import metric_points, pipeline

pytestmark = pytest.mark.anyio


async def test_the_cancelled_loser_is_recorded_with_its_error_type() -> None:
    otel = pipeline()
    try:
        upstream = Upstream()
        t, _ = transport(upstream, instances=INSTANCES[:2])
        t._observer = otel.telemetry
        async with httpx.AsyncClient(transport=t) as client:
            assert (await client.get("http://payments/pay")).status_code == 200
        assert upstream.cancelled == 1
        points = [
            (a.get(schema.HTTP_RESPONSE_STATUS_CODE), a.get(schema.ERROR_TYPE), point.count)
            for a, point in metric_points(otel.metrics, "http.client.request.duration")
        ]
        # before: [(None, None, 1), (200, None, 1)]: the loser neither failed nor answered
        assert sorted(points, key=str) == [(200, None, 1), (None, "CancelledError", 1)]
        spans = [dict(s.attributes or {}) for s in otel.finished() if s.kind.name == "CLIENT"]
        (loser,) = [a for a in spans if a.get(schema.ATTEMPT_CANCELLED)]
        assert loser[schema.ERROR_TYPE] == "CancelledError"  # the metric's value
    finally:
        otel.shutdown()
