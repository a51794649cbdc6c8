"""Policy: the frozen, validated model (`model`), its TOML key locator (`lines`)
and the generated key reference (`reference`).

Everything the model defines publicly is re-exported here, so the rest of the
package imports `from .policy import RateLimit` without knowing the split.
"""

from .model import (
    DEFAULT_TRUSTED_PEERS,
    FAILURE_MODES,
    HEADER_MODES,
    HTTP_METHODS,
    JITTER_MODES,
    MAX_ATTEMPTS,
    PRIORITIES,
    BreakerConfig,
    Check,
    ConcurrencyConfig,
    DeadlineConfig,
    KeyFunc,
    Policy,
    RateLimit,
    RetryConfig,
    RouteConfig,
    StateConfig,
    UpstreamConfig,
    boolean,
    glob_matches,
    int_in,
    non_empty_str,
    number_in,
    one_of,
    optional,
    parse_rate,
)

__all__ = [
    "DEFAULT_TRUSTED_PEERS",
    "FAILURE_MODES",
    "HEADER_MODES",
    "HTTP_METHODS",
    "JITTER_MODES",
    "MAX_ATTEMPTS",
    "PRIORITIES",
    "BreakerConfig",
    "Check",
    "ConcurrencyConfig",
    "DeadlineConfig",
    "KeyFunc",
    "Policy",
    "RateLimit",
    "RetryConfig",
    "RouteConfig",
    "StateConfig",
    "UpstreamConfig",
    "boolean",
    "glob_matches",
    "int_in",
    "non_empty_str",
    "number_in",
    "one_of",
    "optional",
    "parse_rate",
]
