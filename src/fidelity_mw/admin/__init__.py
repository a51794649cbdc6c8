"""The live state page: breakers, limiter keys, retry budgets, instances, the store,
and how fresh each reading is. A mountable ASGI app, off unless mounted.

    from fidelity_mw.admin import AdminApp
    app.mount("/_fidelity", AdminApp(engine))   # loopback clients only, or token=...
"""

from .app import AdminApp

__all__ = ["AdminApp"]
