"""Names of every attribute, event and metric fidelity_mw exports (docs/telemetry.md).

Plain string constants, so tests, dashboards and docs share one spelling.
HTTP names follow the stable OpenTelemetry HTTP semantic conventions.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------------------ span attributes (fidelity.*)

# app | deadline | concurrency | breaker | ratelimit | budget | state
DECIDED_BY: Final = "fidelity.decided_by"
OUTCOME: Final = "fidelity.outcome"  # served | failed | rejected | shed | expired | disconnected
POLICY_VERSION: Final = "fidelity.policy.version"
STALE_DECISIONS: Final = "fidelity.stale_decisions"
ROUTE: Final = "fidelity.route"
CLIENT_KEY_HASH: Final = "fidelity.client.key_hash"
UPSTREAM_EXHAUSTED: Final = "fidelity.upstream_exhausted"
INBOUND_ATTEMPT: Final = "fidelity.inbound_attempt"
# the per-request summary: every decision packed, "layer/verdict/reason@source[+Nms]" ...
DECISIONS: Final = "fidelity.decisions"
# A long request's context dropped records to stay bounded (context.MAX_DECISIONS): how
# many (absent: none), and how many of each "layer/verdict/reason@source", packed as
# "layer/verdict/reason@source=N" separated by spaces; with `fidelity.decisions` (the
# records kept) they count every decision the request took.
DECISIONS_DROPPED: Final = "fidelity.decisions.dropped"
DECISIONS_DROPPED_COUNTS: Final = "fidelity.decisions.dropped_counts"

# ------------------------------------------------------------ the decision event

DECISION_EVENT: Final = "fidelity.decision"
LAYER: Final = "fidelity.layer"
VERDICT: Final = "fidelity.verdict"
REASON: Final = "fidelity.reason"
SUBJECT: Final = "fidelity.subject"
STATE_SOURCE: Final = "fidelity.state.source"
STATE_AGE_MS: Final = "fidelity.state.age_ms"
STATE_STALE: Final = "fidelity.state.stale"
DETAIL_PREFIX: Final = "fidelity.detail."
# on a CLIENT span we did not start (httpx instrument_client's), one per attempt
ATTEMPT_EVENT: Final = "fidelity.attempt"
# An attempt the call itself cancelled (the loser of a hedge race): not an error.
ATTEMPT_CANCELLED: Final = "fidelity.attempt.cancelled"

# ------------------------------------------------------------ HTTP semantic conventions

HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_REQUEST_METHOD_ORIGINAL: Final = "http.request.method_original"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
HTTP_REQUEST_RESEND_COUNT: Final = "http.request.resend_count"
HTTP_ROUTE: Final = "http.route"
URL_FULL: Final = "url.full"
URL_PATH: Final = "url.path"
URL_SCHEME: Final = "url.scheme"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
NETWORK_PROTOCOL_VERSION: Final = "network.protocol.version"
ERROR_TYPE: Final = "error.type"

# ------------------------------------------------------------ metrics

METRIC_DECISIONS: Final = "fidelity.decisions"
METRIC_STATE_AGE: Final = "fidelity.state.age"
METRIC_REQUESTS: Final = "fidelity.requests"
METRIC_FAILURES: Final = "fidelity.failures"
METRIC_BREAKER_STATE: Final = "fidelity.breaker.state"
METRIC_RETRY_BUDGET: Final = "fidelity.retry_budget.usage"
METRIC_CLIENT_DURATION: Final = "http.client.request.duration"
# 1 for the version of each policy in force (Prometheus: fidelity_policy_info{...} 1)
METRIC_POLICY_INFO: Final = "fidelity.policy.info"
# 1 while a shared store decides without its shared state, per why; 0 otherwise
METRIC_STATE_FALLBACK: Final = "fidelity.state.fallback"

# metric-only attributes
FAILURE_CAUSE: Final = "fidelity.failure.cause"  # control | app
BREAKER_STATE: Final = "fidelity.breaker.state"  # closed | open | half_open
BREAKER_SCOPE: Final = "fidelity.breaker.scope"  # route | upstream
BUDGET_RESULT: Final = "fidelity.retry_budget.result"  # drawn | exhausted
FALLBACK_WHY: Final = "fidelity.state.fallback_why"  # unreachable | read_only
FALLBACK_WHYS: Final = ("unreachable", "read_only")

CAUSE_CONTROL: Final = "control"
CAUSE_APP: Final = "app"
