"""Test-side access to the completion pipeline an app was built with: listen to its accounting
records, or swap its rate limiter for one test. The app builds the pipeline once, with its
subscribers given at construction; these replace the admission stage's parts for a test (and
put them back), which the completion routes, embeddings and batch lines all share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from llm_api.services.llm.stages import Accounting, AdmissionStage
from llm_api.services.llm.types import CompletionRecord
from llm_api.services.rate_limit.limiter import RateLimiter


def admission(app: Any) -> AdmissionStage:
    stage: AdmissionStage = app.state.llm_api.responses.pipeline.admission
    return stage


def listen(app: Any) -> list[CompletionRecord]:
    """Every accounting record from now on, after the app's own subscribers."""
    records: list[CompletionRecord] = []
    stage = admission(app)
    stage.accounting = Accounting((*stage.accounting.subscribers, records.append))
    return records


@contextlib.contextmanager
def limiter_swapped(app: Any, limiter: RateLimiter) -> Iterator[None]:
    """`limiter` admits and settles (first, as in the app) instead of the app's own."""
    state = app.state.llm_api
    stage = admission(app)
    old_admit, old_accounting, old_limiter = stage.admit, stage.accounting, state.rate_limiter
    others = [
        s for s in old_accounting.subscribers if getattr(s, "__self__", None) is not old_limiter
    ]
    stage.admit = limiter.admit_completion
    stage.accounting = Accounting((limiter.on_completion, *others))
    state.rate_limiter = limiter
    try:
        yield
    finally:
        stage.admit, stage.accounting, state.rate_limiter = (
            old_admit,
            old_accounting,
            old_limiter,
        )
