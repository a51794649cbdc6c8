"""The inbound adapter: `FidelityMiddleware`, a pure-ASGI middleware split by concern.

- `request`: reading the request once (wanted headers, deadline, client keys)
- `admission`: the store's verdict as decisions, and the refusals it implies
- `watch`: the app's response watched to its last message; the outcome recorded
- `refusals`: control decisions that escaped the app, answered as 503/504
- `responses`: the problem documents and responses the middleware sends itself
- `middleware`: the order of it all, per request
"""

from .middleware import FidelityMiddleware

__all__ = ["FidelityMiddleware"]
