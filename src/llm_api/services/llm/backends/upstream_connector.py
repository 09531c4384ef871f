"""The aiohttp connector of upstream sessions, with one workaround for aiohttp 3.14.

aiohttp 3.14's StreamReader calls its protocol's `resume_reading()` after every HTTP chunk it hands
out, whether or not anything was paused, and each call feeds the HTTP parser an empty read (so that
a paused parse, or a decompression bounded by flow control, can go on). An upstream stream is one
chunk per token: ~36 such calls per proxied request here, ~5% of the gateway's instructions
(callgrind, bench/RESULTS.md). aiohttp 3.13 resumed a protocol only when it was paused.

Upstream sessions never decompress (they ask for `identity` and turn `auto_decompress` off,
openai_upstream.py), so the parser only ever waits for more input when flow control paused the
protocol, and `StreamProtocol` resumes only then, as 3.13 did. Pausing itself is unchanged: a
slow reader still stops the socket once its buffer passes aiohttp's high-water mark.

It is installed through the connector's protocol factory, which aiohttp keeps in a private
attribute, and only on the aiohttp minor it was written for: with any other aiohttp the plain
protocol is used (slower, never wrong), and tests/test_upstream_connector.py notices.
"""

from __future__ import annotations

import functools
from typing import cast

import aiohttp
from aiohttp.client_proto import ResponseHandler

WORKAROUND_FOR = "3.14."  # the aiohttp minor whose resume_reading this corrects


class StreamProtocol(ResponseHandler):
    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)


def upstream_connector(limit: int) -> aiohttp.TCPConnector:
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300)
    factory = getattr(connector, "_factory", None)
    if (
        aiohttp.__version__.startswith(WORKAROUND_FOR)
        and isinstance(factory, functools.partial)
        and factory.func is ResponseHandler
    ):
        ours = functools.partial(StreamProtocol, *factory.args, **factory.keywords)
        connector._factory = cast("functools.partial[ResponseHandler]", ours)
    return connector
