"""The outbound layer: one attempt loop for httpx calls, driven async or sync."""

from .transport import FidelitySyncTransport, FidelityTransport

__all__ = ["FidelitySyncTransport", "FidelityTransport"]
