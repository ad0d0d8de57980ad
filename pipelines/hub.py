"""Is the Hugging Face Hub reachable, and is a model in the local cache? Asked before loading.

Without network and without HF_HUB_OFFLINE=1, huggingface_hub retries each download for minutes
before it gives up. Every loader here asks `offline()` first: it is True when HF_HUB_OFFLINE is set
or when one TCP connection to the Hub's host fails within a few seconds (remembered for a minute),
and then loads with `local_files_only=True`, which fails at once when the files are not cached.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

PROBE_SECONDS = 3.0  # how long one reachability probe may take
REMEMBER_SECONDS = 60.0  # how long its answer holds
_probe: tuple[float, bool] | None = None  # (when, reachable)


def offline_by_setting() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable() -> bool:
    """One TCP connection to the Hub's host (HF_ENDPOINT, default huggingface.co:443)."""
    global _probe
    now = time.monotonic()
    if _probe is not None and now - _probe[0] < REMEMBER_SECONDS:
        return _probe[1]
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
        reachable = True
    except OSError:
        reachable = False
    _probe = (now, reachable)
    return reachable


def offline() -> bool:
    """True when downloads cannot happen: HF_HUB_OFFLINE is set, or the Hub does not answer."""
    return offline_by_setting() or not hub_reachable()


def cached(repo: str, filename: str = "config.json") -> bool:
    """Whether `filename` of Hub model `repo` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)
