"""Random ids: request and generation ids (X-Request-ID, completion ids, usage records)."""

from __future__ import annotations

import os


def new_request_id() -> str:
    """128 random bits as 32 hex characters, the shape `uuid.uuid4().hex` had. Without the UUID
    object: building it (version bits, int conversions) cost more than the random bytes, and this
    runs for every request."""
    return os.urandom(16).hex()
