"""FastAPI per-route forms: a rate-limit dependency, breaker and deadline decorators.

```python
from fidelity_mw.fastapi import Fidelity

fidelity = Fidelity()                     # shared by every router of the app
router = APIRouter(route_class=fidelity.route_class)

@router.get("/pay", dependencies=[Depends(fidelity.limit("10/s", key="header:x-api-key"))])
@fidelity.breaker(failure_ratio=0.25, min_calls=10)
@fidelity.deadline(2_000)
async def pay() -> dict[str, str]: ...

app = FastAPI()
app.include_router(router)
app.add_middleware(FidelityMiddleware, policy=policy)   # optional
fidelity.install(app)                     # RFC 9457 handler, OpenAPI 429/503/504
```

Behind `FidelityMiddleware` the forms share its engine and its decision
context: a limit's decision lands in the request's context (and so in its
trace) next to the middleware's, its counters live in the same store, and the
breaker / deadline overrides change the plan the middleware enforces for that
route (no second breaker on the same route). Without the middleware, the
route class enforces the route's breaker and deadline itself, on the
`Fidelity` object's own engine (`Fidelity(policy=...)`), and the limits count
there too.

A rejection raises a `Rejected` (`RateLimited` 429, `BreakerOpen` 503,
`DeadlineExpired` 504): Starlette `HTTPException`s, so an app without any setup
still answers with the right status and `Retry-After`; `install(app)` adds the
RFC 9457 body (or the `on_reject` hook's response), and an app's own handler
for any of these classes takes precedence.

Importing `fidelity_mw` never imports this module or FastAPI.
"""

from .exceptions import BreakerOpen, DeadlineExpired, RateLimited, Rejected
from .forms import Fidelity
from .limit import LimitDependency
from .openapi import PROBLEM_SCHEMA, problem_responses

__all__ = [
    "PROBLEM_SCHEMA",
    "BreakerOpen",
    "DeadlineExpired",
    "Fidelity",
    "LimitDependency",
    "RateLimited",
    "Rejected",
    "problem_responses",
]
