"""Is a Hugging Face hub reachable? Asked once, quickly, so that a typo fails in a second, not after ~25 s of retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def offline_setting() -> str | None:
    """Why the environment says not to use the hub (``HF_HUB_OFFLINE=1`` ...), or None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}=1 is set"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return None


def probe_endpoint(timeout: float = 3.0) -> str | None:
    """None when the hub endpoint (``HF_ENDPOINT``) accepts a TCP connection, else why not."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} is not reachable: {e.strerror or type(e).__name__}"
    return None


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """None when the hub may and can be asked, else why not (environment first: it costs nothing)."""
    return offline_setting() or probe_endpoint(timeout)
