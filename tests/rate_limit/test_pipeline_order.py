"""The accounting order the pipeline is built with: the limiter's settlement is the first
subscriber, so by the time the usage recorder (and the metrics) see a request, its limits have
been settled and its concurrency lease freed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from llm_api.services.llm.stages import Accounting
from llm_api.services.llm.types import CompletionRecord
from tests.conftest import create_account
from tests.pipeline_support import admission
from tests.rate_limit.conftest import limits_on
from tests.rate_limit.test_http import post


async def test_the_limiter_settles_before_usage_is_recorded(
    app: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    tiers = {"free": {"tokens_per_minute": 100_000, "concurrent_requests": 4}}
    async with limits_on(app, tmp_path, tiers=tiers) as limiter:
        stage = admission(app)
        subscribers = stage.accounting.subscribers
        recorder = app.state.llm_api.usage.recorder
        assert subscribers.index(limiter.on_completion) == 0
        assert subscribers.index(recorder.on_completion) == 1
        # What a subscriber after them sees: is the request's reservation still open?
        unsettled: list[bool] = []

        def after(record: CompletionRecord) -> None:
            unsettled.append(record.request_id in limiter._tickets)

        stage.accounting = Accounting((*subscribers, after))
        acct = await create_account(app)
        for stream in (False, True):
            r = await post(http, acct, stream=stream, max_tokens=2)
            assert r.status_code == 200, r.text
            # Taken at admission (the headers), settled before the next subscriber ran.
            assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100_000
        assert unsettled == [False, False]
