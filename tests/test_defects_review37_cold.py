"""The outbound transport's first call does not import the telemetry.

Looking up the transport's attempt observer imported fidelity_mw's telemetry and the
OpenTelemetry modules (~0.3 s on an idle core) at the first call: a stall of the event loop
inside a service's first outbound call, with every request in flight waiting. It is done
when the transport is built now (dmo37 saw it stall one demo variant's first requests).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import httpx
    from fidelity_mw import FidelityTransport

    def answer(request):
        return httpx.Response(200)

    async def main():
        transport = FidelityTransport(httpx.MockTransport(answer))
        before = set(sys.modules)
        async with httpx.AsyncClient(transport=transport) as client:
            status = (await client.get("http://payments.internal/")).status_code
        new = sorted(m for m in set(sys.modules) - before
                     if m.startswith(("fidelity_mw.telemetry", "opentelemetry")))
        print(json.dumps({"status": status, "imported_by_the_call": new,
                          "telemetry": "fidelity_mw.telemetry" in sys.modules}))

    asyncio.run(main())
    """
)


def test_the_first_call_imports_no_telemetry() -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["status"] == 200
    assert seen["telemetry"] is True  # (the observer is there: looked up when built)
    assert seen["imported_by_the_call"] == []
