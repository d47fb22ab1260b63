"""Is the Hugging Face hub reachable? Decided once, quickly, so offline runs fail at once.

transformers would otherwise retry a download for a long time before failing with a long
traceback; qgplm instead checks up front and names the offline alternatives.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or ""
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
