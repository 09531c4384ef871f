"""Garbage-collector settings for a long-running server process.

CPython's cyclic collector walks every tracked container object in the generations it collects.
After startup a worker holds ~190,000 of them (FastAPI, pydantic, SQLAlchemy, prometheus), none
of which will ever be garbage, and each full collection walked them all: ~60 ms, about ten times
in a few seconds of a busy gateway, ~10% of its event loop. Requests also allocate enough
short-lived containers that the default young-generation threshold (700) ran a collection
every few requests.

So, once startup is done: collect what startup left, move everything that survived to the
permanent generation (`gc.freeze()`, meant for this), and collect the young generation less
often. Reference counting still frees almost everything at once; the collector only matters for
cycles, which a larger threshold lets live a little longer (bounded by the threshold).
"""

from __future__ import annotations

import gc

# Young-generation threshold (allocations minus frees between collections). The older
# generations keep their defaults, so a full collection still follows ~100 young ones.
GEN0_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call after startup work (app built, models loaded); cheap to call again."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def release_heap() -> None:
    """At shutdown: hand the frozen objects back to the collector, so that an app built and
    torn down inside a longer-lived process (tests, an embedding program) can be freed."""
    gc.unfreeze()
