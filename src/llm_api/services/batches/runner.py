"""Runs one batch: the body of the Celery task, and of the embedded dispatcher.

Exactly-once output without distributed transactions:
- A lease row (`batches.lease_owner/lease_until`, taken and renewed by services/leases.py) lets
  one worker run a batch at a time. The lease is short (`batch_lease_seconds`, 6 s) and a
  heartbeat renews it every sixth of that while the worker lives, so a killed worker's batch is
  free again within seconds and another worker (or the same one after a restart) takes over. A
  worker writes a result only while its own clock says the lease still holds (`Lease.held`), so
  after a takeover the old one never adds a line the new one could also write.
- The output and error files are the record of what is done. On resume the runner reads them
  (cutting a torn last line), skips every custom_id already there, and runs the rest, so each
  custom_id appears exactly once.
- Each line's start is counted in `batch_attempts` before it runs; a line that keeps killing its
  worker is failed into the error file at the attempt limit and the batch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.api.v1.chat import serving as chat_serving
from llm_api.api.v1.completions import serving as completions_serving
from llm_api.core.exceptions import APIError, InvalidRequestError, ServerError
from llm_api.core.ids import new_request_id
from llm_api.db.tables import Batch, BatchAttempt, StoredFile, User
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.completions import CompletionRequest
from llm_api.schemas.embeddings import EmbeddingRequest
from llm_api.services import tracing
from llm_api.services.batches.input_file import BatchLine, iter_lines
from llm_api.services.batches.storage import FileStore, LineAppender, new_file_id
from llm_api.services.leases import Lease, RowLease, worker_id
from llm_api.services.llm.embeddings import EmbeddingService
from llm_api.services.llm.serving import CompletionServing
from llm_api.services.llm.types import RequestContext

log = structlog.get_logger(__name__)

LEASE_SECONDS = 6.0  # the default of `batch_lease_seconds`
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_MAX_ATTEMPTS = APIError("Maximum attempts exceeded for this request.", code="max_attempts")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class BatchRunnerConfig:
    concurrency: int = 4
    max_attempts: int = 3  # per line, across worker crashes and retryable errors
    retry_base_seconds: float = 0.5
    lease_seconds: float = LEASE_SECONDS


class BatchRunner:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        llm: CompletionServing,
        files: FileStore,
        config: BatchRunnerConfig | None = None,
        embeddings: EmbeddingService | None = None,
    ) -> None:
        self.sessions = sessions
        self.llm = llm
        self.embeddings = embeddings
        self.files = files
        self.config = config or BatchRunnerConfig()
        self.owner = worker_id()
        self.leases = RowLease(
            Batch,
            ACTIVE,
            self.owner,
            sessions,
            renew_failed_event="batch_lease_renew_failed",
            id_key="batch_id",
        )

    # --- running --------------------------------------------------------------------------------

    async def run(self, batch_id: str, traceparent: str | None = None) -> str | None:
        """Run (or resume) a batch. Returns its final status, or None when another worker holds
        it or it is already finished. With tracing on, the run is one span (continuing the
        trace of the request that created the batch, `traceparent`), the parent of every
        line's pipeline spans."""
        lease = Lease(self.config.lease_seconds)
        if not await self.leases.acquire(batch_id, lease):
            return None
        async with self.leases.renewing(batch_id, lease):
            span = None
            if tracing.TRACER is not None:
                span = tracing.start(
                    "batch run",
                    tracing.extract(traceparent),
                    tracing.SpanKind.CONSUMER,
                    {"llm_api.batch_id": batch_id},
                )
            try:
                status = await self._run(batch_id, lease, span)
                if span is not None:
                    span.set_attribute("llm_api.batch.status", status)
                return status
            except BaseException as exc:
                if span is not None:
                    tracing.fail(span, exc)
                raise
            finally:
                if span is not None:
                    span.end()

    async def _run(self, batch_id: str, lease: Lease, span: tracing.Span | None = None) -> str:
        async with self.sessions.begin() as s:
            batch = await s.get(Batch, batch_id)
            assert batch is not None
            if batch.status == "validating":
                batch.status, batch.in_progress_at = "in_progress", _now()
            for attr, purpose in (
                ("output_file_id", "batch_output"),
                ("error_file_id", "batch_error"),
            ):
                if getattr(batch, attr) is None:
                    fid = new_file_id()
                    setattr(batch, attr, fid)
                    s.add(
                        StoredFile(
                            id=fid,
                            user_id=batch.user_id,
                            filename=f"{batch_id}_{purpose.split('_')[1]}.jsonl",
                            purpose=purpose,
                            bytes=0,
                        )
                    )
            user_id, endpoint = batch.user_id, batch.endpoint
            owner = await s.get(User, user_id)
            tier = owner.tier if owner is not None else "free"
            if (owner is None or not owner.is_active) and batch.status != "cancelling":
                # Deactivation cancels a user's batches; this catches any that slipped past.
                batch.status, batch.cancelling_at = "cancelling", batch.cancelling_at or _now()
            input_id, out_id, err_id = (
                batch.input_file_id,
                batch.output_file_id,
                batch.error_file_id,
            )
            status = batch.status
        assert out_id is not None and err_id is not None
        out_path, err_path = self.files.path(out_id), self.files.path(err_id)
        # Reading and parsing files is blocking work: off the event loop (in embedded mode it
        # is the API's).
        done_ok = _custom_ids(await asyncio.to_thread(LineAppender.recover, out_path))
        done_err = _custom_ids(await asyncio.to_thread(LineAppender.recover, err_path))
        lines = await asyncio.to_thread(lambda: iter_lines(self.files.read(input_id)))
        pending = [
            ln for ln in lines if ln.custom_id not in done_ok and ln.custom_id not in done_err
        ]
        await self._set_counts(batch_id, len(lines), len(done_ok), len(done_err))
        if status != "cancelling" and pending:
            out, err = LineAppender(out_path), LineAppender(err_path)
            try:
                owner_ctx = RequestContext(
                    request_id="",
                    user_id=user_id,
                    tier=tier,
                    batch_id=batch_id,
                    trace=tracing.context_of(span) if span is not None else None,
                    priority="batch",  # after interactive work on the same model
                )
                await self._run_lines(owner_ctx, endpoint, pending, out, err, lease)
            finally:
                out.close()
                err.close()
        return await self._finalize(batch_id, out_id, err_id, lease)

    async def _run_lines(
        self,
        owner: RequestContext,
        endpoint: str,
        pending: list[BatchLine],
        out: LineAppender,
        err: LineAppender,
        lease: Lease,
    ) -> None:
        batch_id = owner.batch_id
        assert batch_id is not None
        queue: asyncio.Queue[BatchLine] = asyncio.Queue()
        for line in pending:
            queue.put_nowait(line)
        stop = asyncio.Event()
        counts = {"completed": 0, "failed": 0}

        async def watch_cancel() -> None:
            """Cancel stops the lines in flight too (their generations end at once; nothing
            partial is written), so a cancel takes effect within about a second."""
            while not stop.is_set():
                await asyncio.sleep(1.0)
                status = None
                # Database unreachable: the lease decides whether to go on.
                with contextlib.suppress(Exception):
                    async with self.sessions() as s:
                        status = await s.scalar(select(Batch.status).where(Batch.id == batch_id))
                if status in ("cancelling", "cancelled") or not lease.held():
                    stop.set()
                    for task in workers:
                        task.cancel()

        async def flush_counts() -> None:
            while True:
                await asyncio.sleep(0.5)
                await self._add_counts(batch_id, counts)

        async def worker() -> None:
            while not stop.is_set():
                try:
                    line = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                record, ok = await self._run_line(owner, endpoint, line, stop)
                if record is None:  # cancelled before it finished: not written, not counted
                    return
                if not lease.held():  # another worker may own the batch now: it runs the line
                    stop.set()
                    return
                (out if ok else err).append(record)
                counts["completed" if ok else "failed"] += 1

        workers = [asyncio.create_task(worker()) for _ in range(self.config.concurrency)]
        watcher = asyncio.create_task(watch_cancel())
        flusher = asyncio.create_task(flush_counts())
        try:
            results = await asyncio.gather(*workers, return_exceptions=True)
            for result in results:  # a worker cancelled by watch_cancel is expected
                if isinstance(result, Exception):
                    raise result
        finally:
            stop.set()
            for task in (watcher, flusher):
                task.cancel()
            await asyncio.gather(watcher, flusher, return_exceptions=True)
            await self._add_counts(batch_id, counts)

    async def _run_line(
        self, owner: RequestContext, endpoint: str, line: BatchLine, stop: asyncio.Event
    ) -> tuple[bytes | None, bool]:
        """Run one line with bounded retries. Returns (result line, succeeded), or (None, _)
        when the batch was cancelled first. Client errors (4xx) fail at once; overload, server
        and unexpected errors are retried with backoff until the attempt limit."""
        batch_id = owner.batch_id
        assert batch_id is not None
        attempt = await self._bump_attempt(batch_id, line.custom_id)
        while True:
            if attempt > self.config.max_attempts:
                return _error_line(line, "", _MAX_ATTEMPTS), False
            if stop.is_set():
                return None, False
            ctx = replace(owner, request_id=new_request_id())
            try:
                body = await self._call(endpoint, line.body, ctx)
                return _result_line(line, ctx.request_id, body), True
            except APIError as exc:
                error = exc
                if exc.status_code < 500 and exc.status_code != 429:
                    return _error_line(line, ctx.request_id, exc), False
            except Exception as exc:  # a bug or a poison line: bounded retries, then error file
                log.warning("batch_line_failed", batch_id=batch_id, line=line.line, exc_info=exc)
                error = ServerError("Internal error while processing this request.")
            if attempt >= self.config.max_attempts:
                return _error_line(line, ctx.request_id, error), False
            backoff = self.config.retry_base_seconds * 2 ** (attempt - 1)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            attempt = await self._bump_attempt(batch_id, line.custom_id)

    async def _call(
        self, endpoint: str, body: dict[str, Any], ctx: RequestContext
    ) -> dict[str, Any]:
        if endpoint == "/v1/chat/completions":
            chat, _ = await self.llm.chat(ChatCompletionRequest.model_validate(body), ctx)
            return chat_serving.chat_body(ctx.request_id, chat, self.llm.fingerprint(chat.model))
        if endpoint == "/v1/completions":
            comp, _ = await self.llm.completion(CompletionRequest.model_validate(body), ctx)
            fingerprint = self.llm.fingerprint(comp.model)
            return completions_serving.completion_body(ctx.request_id, comp, fingerprint)
        if endpoint == "/v1/embeddings" and self.embeddings is not None:
            result = await self.embeddings.embed(EmbeddingRequest.model_validate(body), ctx)
            data: dict[str, Any] = orjson.loads(result.body(body.get("encoding_format", "float")))
            return data
        raise InvalidRequestError(f"Unsupported endpoint {endpoint}")

    async def _bump_attempt(self, batch_id: str, custom_id: str) -> int:
        async with self.sessions.begin() as s:
            row = await s.get(BatchAttempt, (batch_id, custom_id))
            if row is None:
                row = BatchAttempt(batch_id=batch_id, custom_id=custom_id, attempts=0)
                s.add(row)
            row.attempts += 1
            return row.attempts

    async def _set_counts(self, batch_id: str, total: int, ok: int, failed: int) -> None:
        async with self.sessions.begin() as s:
            await s.execute(
                update(Batch)
                .where(Batch.id == batch_id)
                .values(total=total, completed=ok, failed=failed)
            )

    async def _add_counts(self, batch_id: str, counts: dict[str, int]) -> None:
        if not counts["completed"] and not counts["failed"]:
            return
        ok, failed = counts["completed"], counts["failed"]
        counts["completed"] = counts["failed"] = 0
        async with self.sessions.begin() as s:
            # Only while this worker owns the batch: a worker that took it over counted these
            # lines from the output files already.
            await s.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.lease_owner == self.owner)
                .values(completed=Batch.completed + ok, failed=Batch.failed + failed)
            )

    async def _finalize(self, batch_id: str, out_id: str, err_id: str, lease: Lease) -> str:
        if not lease.held():
            return "in_progress"  # another worker owns it now
        async with self.sessions.begin() as s:
            batch = await s.get(Batch, batch_id)
            assert batch is not None
            now = _now()
            for fid in (out_id, err_id):
                stored = await s.get(StoredFile, fid)
                if stored is not None:
                    stored.bytes = self.files.size(fid)
            done = batch.completed + batch.failed
            if batch.status in ("cancelling", "cancelled"):
                batch.status, batch.cancelled_at = "cancelled", batch.cancelled_at or now
            elif done >= batch.total:
                batch.finalizing_at = batch.finalizing_at or now
                batch.status, batch.completed_at = "completed", now
            return batch.status


def _custom_ids(lines: list[bytes]) -> set[str]:
    ids: set[str] = set()
    for raw in lines:
        try:
            ids.add(orjson.loads(raw)["custom_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def _result_line(line: BatchLine, request_id: str, body: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "id": f"batch_req_{request_id}",
            "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def _error_line(line: BatchLine, request_id: str, exc: APIError) -> bytes:
    return orjson.dumps(
        {
            "id": f"batch_req_{request_id or time.time_ns()}",
            "custom_id": line.custom_id,
            "response": {
                "status_code": exc.status_code,
                "request_id": request_id,
                "body": exc.to_dict(),
            },
            "error": {"code": exc.code or exc.type, "message": exc.message},
        }
    )
