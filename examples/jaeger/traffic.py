"""Drive the example: healthy orders, a burst that trips the backend's rate limit, and
failing orders that open the breakers. Prints one line per request.

    python traffic.py [http://localhost:8000]
"""

from __future__ import annotations

import sys

import httpx


def main(base_url: str = "http://localhost:8000") -> int:
    plan = (
        [("healthy", "/orders/sku-1")] * 5
        + [("burst", "/orders/sku-2")] * 30  # over the backend's 20/s, burst 5
        + [("failing", "/orders/sku-3?fail=1")] * 12  # backend 503s: retries, then breakers
    )
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for label, path in plan:
            response = client.get(path)
            print(f"{label:8} {path:24} -> {response.status_code} {response.text[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
