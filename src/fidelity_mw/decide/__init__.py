"""The pure decision core: rate limits, breakers, retry budgets, backoff, retry planning.

Synchronous arithmetic over explicit inputs: time (`now`) and randomness come
in as arguments, configuration as small frozen specs. Nothing here does I/O or
imports an adapter (ASGI, httpx, Redis, OpenTelemetry) or the policy loader.
The state stores hold these objects (memory) or mirror them (the Lua scripts),
and the differential tests hold every store to them.
"""
