"""Turns finished requests into buffered records: a usage record per request (the LLMService
observer, plus cache hits reported by the cache layer through the same observer list) and, when
enabled, a conversation record per whole response.

Both run synchronously on the request's task: one `os.write` each, no await, so they also run to
completion inside a cancelled request's `finally` (a cancelled stream's partial tokens are
recorded there).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from llm_api.core.metrics import USAGE_BUFFER_BACKLOG
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.cache.service import ResponseEvent
from llm_api.services.llm.types import CompletionRecord
from llm_api.services.usage.buffer import DurableBuffer

log = structlog.get_logger(__name__)


class UsageRecorder:
    def __init__(self, buffer: DurableBuffer, *, conversation_log: bool) -> None:
        self.buffer = buffer
        self.conversation_log = conversation_log

    def on_completion(self, rec: CompletionRecord) -> None:
        self.buffer.append(
            {
                "kind": "usage",
                "request_id": rec.request_id,
                "created_at": time.time(),
                "user_id": rec.user_id,
                "key_id": rec.key_id,
                "batch_id": rec.batch_id,
                "model": rec.model,
                "endpoint": rec.endpoint,
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": rec.completion_tokens,
                "cache_hit": rec.cache_hit,
                "status": rec.status,
                "finish_reason": rec.finish_reason,
                "ttft_ms": rec.ttft_ms,
                "latency_ms": rec.latency_ms,
                "disconnected": rec.cancelled,
                "stream": rec.stream,
                "cost_nanos": rec.cost_nanos,
                "team_id": rec.team_id,
            }
        )
        USAGE_BUFFER_BACKLOG.inc()

    def on_response(self, event: ResponseEvent) -> None:
        """The guide's `log_conversation`, made durable. Opt-outs are applied by the flusher, so
        the request path never waits for the database."""
        if not self.conversation_log:
            return
        self.buffer.append(
            {
                "kind": "conversation",
                "request_id": event.ctx.request_id,
                "created_at": time.time(),
                "user_id": event.ctx.user_id,
                "model": event.model,
                "endpoint": event.endpoint,
                "request": _prompt_of(event),
                "response": event.outputs,
                "cache_hit": event.cache_hit,
            }
        )


def _prompt_of(event: ResponseEvent) -> dict[str, Any]:
    req = event.request
    if isinstance(req, ChatCompletionRequest):
        return {"messages": [{"role": m.role, "content": m.text()} for m in req.messages]}
    if isinstance(req, CompletionRequest):
        return {"prompt": req.prompts()}
    return {}
