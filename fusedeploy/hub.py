"""Is the Hugging Face Hub reachable? Asked once, quickly, before any download.

The Hub client retries for about half a minute before giving up; a user with
no network should get the one-line error at once.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if offline_requested():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
